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
