//! What the benchmark binaries (`src/bin/`) share.

use anyhow::{Context, Result};

/// The message sizes an all-reduce benchmark runs, in MiB: its command-line arguments, or
/// 1, 16, 64 and 256 without any.
pub fn sizes_mib() -> Result<Vec<usize>> {
    if smoke() {
        return Ok(vec![1]);
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().context("sizes are MiB numbers"))
        .collect::<Result<_>>()?;
    Ok(if sizes.is_empty() {
        vec![1, 16, 64, 256]
    } else {
        sizes
    })
}

/// Whether the benchmark runs in its smoke mode (`--smoke` first): tiny sizes, no anchor,
/// seconds, checking that it still works end to end (`benchmarks/tests/smoke.rs`); its
/// figures mean nothing.
pub fn smoke() -> bool {
    std::env::args().nth(1).as_deref() == Some("--smoke")
}

/// The `lockstep` binary a benchmark drives: `$LOCKSTEP_BIN`, else target/release/lockstep
/// (target/debug/lockstep in smoke mode).
pub fn lockstep_bin() -> std::path::PathBuf {
    std::env::var_os("LOCKSTEP_BIN").map_or_else(
        || {
            if smoke() {
                "target/debug/lockstep".into()
            } else {
                "target/release/lockstep".into()
            }
        },
        std::path::PathBuf::from,
    )
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How one recovery went, from the job's status (`recoveries`, which the coordinator completes
/// at rank 0's first finished step after it) and the moment the benchmark sent its signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    /// Signal → the first finished step after the recovery, in seconds.
    pub seconds: f64,
    /// `in-place` or `checkpoint`.
    pub path: String,
    /// Steps trained again.
    pub steps_lost: u64,
    /// The first step finished after it.
    pub first_step: u64,
}

/// The `nth` (0-based) recovery of a `lockstep run --json` status line, once complete; its
/// time counts from `signalled_ms` (Unix ms).
pub fn recovered(status: &serde_json::Value, nth: usize, signalled_ms: i64) -> Option<Recovered> {
    let r = status["recoveries"].as_array()?.get(nth)?;
    let seconds = r["seconds"].as_f64()?;
    let steps_lost = r["steps_lost"].as_u64()?;
    let at_ms = r["at_ms"].as_i64()?;
    let step = r["step"].as_u64()?;
    Some(Recovered {
        seconds: ((at_ms - signalled_ms) as f64 / 1e3 + seconds).max(0.0),
        path: r["path"].as_str().unwrap_or_default().to_string(),
        steps_lost,
        first_step: step.saturating_sub(steps_lost) + 1,
    })
}
