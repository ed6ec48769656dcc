//! What the benchmark binaries (`src/bin/`) share.

use anyhow::{Context, Result};

/// The message sizes an all-reduce benchmark runs, in MiB: its command-line arguments, or
/// 1, 16, 64 and 256 without any.
pub fn sizes_mib() -> Result<Vec<usize>> {
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
