//! Retries with exponential backoff and jitter for transient store errors.

use std::future::Future;
use std::time::Duration;

use crate::Error;

/// How often and how patiently to retry a failed store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub base_delay: Duration,
    /// Upper bound on one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` (attempt counts from 1): exponential, capped, with
    /// "equal jitter" (half fixed, half random) so that ranks retrying together spread out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(jitter())
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` rejects, or attempts run out.
    pub async fn run<T, F, Fut>(
        &self,
        what: &str,
        retryable: impl Fn(&Error) -> bool,
        mut op: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.max_attempts && retryable(&e) => {
                    let delay = self.delay(attempt);
                    tracing::warn!(cause = %e, attempt, ?delay, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A number in [0, 1) that differs between calls, threads and processes; not for cryptography.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for attempt in 1..12 {
            let d = p.delay(attempt);
            let full = (Duration::from_millis(100) * (1 << (attempt - 1).min(10))).min(p.max_delay);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_then_gives_up_on_permanent_ones() {
        let p = RetryPolicy::default();
        let mut calls = 0;
        let r: Result<u32, Error> = p
            .run("op", Error::is_transient, || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(Error::TornUpload {
                            path: "x".into(),
                            expected: 2,
                            found: 1,
                        })
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 3);

        let mut calls = 0;
        let r: Result<(), Error> = p
            .run("op", Error::is_transient, || {
                calls += 1;
                async { Err(Error::NotFound { path: "x".into() }) }
            })
            .await;
        assert!(matches!(r, Err(Error::NotFound { .. })));
        assert_eq!(calls, 1);
    }
}
