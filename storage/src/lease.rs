//! A lease on a checkpoint root: one live job at a time writes under a `checkpoint.url`.
//!
//! `<checkpoint.url>/lease.json` names the job that holds the root and until when. It is taken
//! and renewed by compare-and-swap ([`crate::pointer`]: a conditional put on S3, a locked
//! read-compare-rename on `file://`), so two coordinators (two `lockstep run`s, or a `serve`
//! and a `run`) cannot both take it. The holder renews it well before it expires and gives it
//! up when its job ends; a holder that died keeps it only until it expires. The same job (a
//! restarted coordinator adopting it) takes its own lease back at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::pointer::{Pointer, Seen, Swap};
use crate::{Error, Location, Result};

/// The lease object under a checkpoint root.
pub const LEASE_FILE: &str = "lease.json";

/// What the lease object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The job id holding it.
    pub job: String,
    /// Who runs that job, for people: the coordinator's process and host.
    pub by: String,
    /// Until when (Unix milliseconds); a lease past it is free.
    pub expires_unix_ms: u64,
}

impl Holder {
    /// "job ID (BY)".
    pub fn describe(&self) -> String {
        format!("job {} ({})", self.job, self.by)
    }
}

/// A held lease. Renew it within its time to live; release it when the job ends.
#[derive(Debug)]
pub struct Lease {
    pointer: Pointer,
    me: Holder,
    ttl: Duration,
    seen: Seen,
}

/// The root's URL as the lease names it, and its lease object; `None` for `memory://` roots
/// (one process's own: nothing to share). One directory has one lease however its URL is
/// spelt (`..`, links, trailing slashes).
fn lease_object(url: &str) -> Result<Option<(String, Pointer)>> {
    let root = match Location::parse(url)? {
        Location::Memory => return Ok(None),
        Location::File(dir) => {
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            format!("file://{}", dir.display())
        }
        Location::S3 { .. } => url.trim_end_matches('/').to_string(),
    };
    let pointer = Pointer::open(&format!("{root}/{LEASE_FILE}"))?;
    Ok(Some((root, pointer)))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn encode(h: &Holder) -> Result<Bytes> {
    serde_json::to_vec_pretty(h)
        .map(Bytes::from)
        .map_err(|e| Error::Invalid(format!("{LEASE_FILE}: {e}")))
}

impl Lease {
    /// Takes the lease on checkpoint root `url` for job `job` (described by `by`) for `ttl`.
    /// `Ok(None)` for `memory://` roots (one process's own: nothing to share). Another live
    /// job's lease is [`Error::Refused`], naming it and until when it holds.
    pub async fn acquire(url: &str, job: &str, by: &str, ttl: Duration) -> Result<Option<Lease>> {
        Lease::take(url, job, by, ttl, None).await
    }

    /// As [`Lease::acquire`], also taking it from `stale`, a holder known to be gone before its
    /// lease expired (its coordinator died, and its workers with it), if it still holds it.
    pub async fn take_over(
        url: &str,
        job: &str,
        by: &str,
        ttl: Duration,
        stale: &Holder,
    ) -> Result<Option<Lease>> {
        Lease::take(url, job, by, ttl, Some(stale)).await
    }

    async fn take(
        url: &str,
        job: &str,
        by: &str,
        ttl: Duration,
        stale: Option<&Holder>,
    ) -> Result<Option<Lease>> {
        let Some((root, pointer)) = lease_object(url)? else {
            return Ok(None);
        };
        let root = root.as_str();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..8 {
            let me = Holder {
                job: job.to_string(),
                by: by.to_string(),
                expires_unix_ms: now_ms().saturating_add(ttl_ms),
            };
            let current = pointer.read().await?;
            let expected = match &current {
                None => None,
                Some((bytes, seen)) => {
                    // A lease object that is not one (damaged, hand-edited) holds nothing.
                    // An expiry further off than a lease lives (hand-edited) holds nothing.
                    let plausible = now_ms().saturating_add(ttl_ms.saturating_mul(2));
                    if let Ok(h) = serde_json::from_slice::<Holder>(bytes)
                        && h.job != job
                        && h.expires_unix_ms > now_ms()
                        && h.expires_unix_ms <= plausible
                        && stale.is_none_or(|s| *s != h)
                    {
                        let left = (h.expires_unix_ms - now_ms()).div_ceil(1000);
                        return Err(Error::Refused {
                            reason: format!(
                                "checkpoint.url `{root}` is in use by {} (its lease runs \
                                 {left} s more, renewed while that job lives): two jobs must \
                                 not write one checkpoint directory; wait for it to end \
                                 (a job whose coordinator was killed holds it no longer than \
                                 that), cancel it, or use another checkpoint.url",
                                h.describe()
                            ),
                        });
                    }
                    Some(seen)
                }
            };
            match pointer.swap(expected, encode(&me)?).await? {
                Swap::Conflict => continue,
                Swap::Done => {
                    let Some((_, seen)) = pointer.read().await? else {
                        continue;
                    };
                    return Ok(Some(Lease {
                        pointer,
                        me,
                        ttl,
                        seen,
                    }));
                }
            }
        }
        Err(Error::Refused {
            reason: format!(
                "checkpoint.url `{root}`: its lease changed hands 8 times while taking it; try \
                 again"
            ),
        })
    }

    /// Extends the lease by its time to live. `Ok(false)`: it was lost (taken by another job
    /// after it expired); the job must stop writing there.
    pub async fn renew(&mut self) -> Result<bool> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut next = self.me.clone();
        next.expires_unix_ms = now_ms().saturating_add(ttl_ms);
        match self.pointer.swap(Some(&self.seen), encode(&next)?).await? {
            Swap::Conflict => Ok(false),
            Swap::Done => {
                let Some((bytes, seen)) = self.pointer.read().await? else {
                    return Ok(false);
                };
                let mine = serde_json::from_slice::<Holder>(&bytes).is_ok_and(|h| h == next);
                self.seen = seen;
                self.me = next;
                Ok(mine)
            }
        }
    }

    /// Who holds it now, as its object says (for a message after it was lost).
    pub async fn holder(&self) -> Option<Holder> {
        let (bytes, _) = self.pointer.read().await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Gives it up (marks it expired, if it is still this job's).
    pub async fn release(self) -> Result<()> {
        let mut gone = self.me.clone();
        gone.expires_unix_ms = 0;
        self.pointer.swap(Some(&self.seen), encode(&gone)?).await?;
        Ok(())
    }

    /// Its time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The live job holding checkpoint root `url`, if one does (for a writer that takes no lease
/// of its own, such as a standalone `lockstep train`, to refuse to write beside it).
pub async fn holder(url: &str) -> Result<Option<Holder>> {
    let Some((_, pointer)) = lease_object(url)? else {
        return Ok(None);
    };
    let Some((bytes, _)) = pointer.read().await? else {
        return Ok(None);
    };
    let now = now_ms();
    // (An expiry further off than any lease lives is a hand-edited one: not a holder.)
    Ok(serde_json::from_slice::<Holder>(&bytes)
        .ok()
        .filter(|h| h.expires_unix_ms > now && h.expires_unix_ms <= now + 600_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_is_taken_over_only_from_the_holder_known_to_be_gone() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}/ckpt", d.path().display());
        let ttl = Duration::from_secs(60);
        let _a = Lease::acquire(&url, "a-1", "pid 1 on h", ttl)
            .await
            .unwrap()
            .unwrap();
        let dead = holder(&url).await.unwrap().unwrap();
        // A holder other than the one known gone is still refused.
        let other = Holder {
            job: "x-0".into(),
            ..dead.clone()
        };
        let e = Lease::take_over(&url, "b-2", "pid 2 on h", ttl, &other)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("in use by job a-1"), "{e}");
        let _b = Lease::take_over(&url, "b-2", "pid 2 on h", ttl, &dead)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(holder(&url).await.unwrap().unwrap().job, "b-2");
        // Once b holds it, a's staleness is no key to it.
        let e = Lease::take_over(&url, "c-3", "pid 3 on h", ttl, &dead)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("in use by job b-2"), "{e}");
    }

    #[tokio::test]
    async fn one_job_holds_a_root_until_it_releases_or_its_lease_expires() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}/ckpt", d.path().display());
        let ttl = Duration::from_secs(60);
        let mut a = Lease::acquire(&url, "a-1", "pid 1 on h", ttl)
            .await
            .unwrap()
            .unwrap();
        let e = Lease::acquire(&url, "b-2", "pid 2 on h", ttl)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("in use by job a-1 (pid 1 on h)"),
            "{e}"
        );
        assert!(a.renew().await.unwrap());
        // The same job (its coordinator restarted) takes it back.
        let a2 = Lease::acquire(&url, "a-1", "pid 3 on h", ttl)
            .await
            .unwrap()
            .unwrap();
        // The first holder's renewal now finds it moved: lost.
        assert!(!a.renew().await.unwrap());
        a2.release().await.unwrap();
        let b = Lease::acquire(&url, "b-2", "pid 2 on h", Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        // Expired (a dead holder): free for the next job.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = Lease::acquire(&url, "c-3", "pid 4 on h", ttl)
            .await
            .unwrap();
        assert!(c.is_some());
        drop(b);
        // The lock file planted as a link elsewhere: refused, the other file untouched.
        let d2 = tempfile::tempdir().unwrap();
        let root = d2.path().join("ckpt");
        std::fs::create_dir_all(&root).unwrap();
        let victim = d2.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join(".lease.json.lock")).unwrap();
        let url2 = format!("file://{}", root.display());
        assert!(Lease::acquire(&url2, "a-1", "h", ttl).await.is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // `..` in the URL is the same directory, and the same lease.
        let spelt = format!("file://{}/ckpt/../ckpt", d.path().display());
        let e = Lease::acquire(&spelt, "z-9", "h", ttl).await.unwrap_err();
        assert!(e.to_string().contains("in use by job c-3"), "{e}");
        assert!(
            Lease::acquire("memory://", "x", "y", ttl)
                .await
                .unwrap()
                .is_none()
        );
    }
}
