//! Knowing when the coordinator itself was stalled (stopped with SIGSTOP, swapped out,
//! starved of CPU): a task ticks every second, and a gap of more than [`STALL`] between ticks
//! (or since the last tick) means nobody could have been heard meanwhile. Heartbeat timeouts
//! are then counted from the end of the stall, so the coordinator's own pause never costs a
//! gang a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

// Tokio's clock, so tests can stall it with `tokio::time::advance`.
use tokio::time::Instant;

use crate::registry::lock;

/// Ticks this far apart mean the coordinator was stalled.
pub const STALL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Ticks {
    last: Option<Instant>,
    stall_ended: Option<Instant>,
}

/// The ticking task's record. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StallClock(Arc<Mutex<Ticks>>);

impl StallClock {
    /// Starts ticking (on the current Tokio runtime).
    pub fn start() -> StallClock {
        let clock = StallClock(Arc::new(Mutex::new(Ticks {
            last: Some(Instant::now()),
            stall_ended: None,
        })));
        let ticks = Arc::downgrade(&clock.0);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let Some(ticks) = ticks.upgrade() else {
                    return; // the coordinator is gone
                };
                let now = Instant::now();
                let mut t = lock(&ticks);
                if let Some(last) = t.last
                    && now.saturating_duration_since(last) > STALL
                {
                    tracing::warn!(stalled = ?now.saturating_duration_since(last),
                        "the coordinator was stalled; heartbeat timeouts count from now");
                    t.stall_ended = Some(now);
                }
                t.last = Some(now);
            }
        });
        clock
    }

    /// The end of the coordinator's latest stall, if any: `now` while one is still being
    /// noticed (the ticker has not run since).
    pub fn stall_ended(&self, now: Instant) -> Option<Instant> {
        let t = lock(&self.0);
        match t.last {
            Some(last) if now.saturating_duration_since(last) > STALL => Some(now),
            _ => t.stall_ended,
        }
    }
}
