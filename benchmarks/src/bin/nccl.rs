//! NCCL all-reduce on one GPU (feature `cuda`; run by hand on a GPU host).
//!
//! ```text
//! cargo build --release -p lockstep-benchmarks --features cuda --bin nccl
//! LD_LIBRARY_PATH=/dir/with/libnccl.so target/release/nccl [MiB ...]
//! ```
//!
//! One GPU means one rank: NCCL's all-reduce at world size 1 moves no data between GPUs, so
//! this measures what the trainer pays per bucket on that path — the host → device copy, the
//! NCCL call and the device → host copy of [`lockstep_trainer::Nccl`] — not inter-GPU bandwidth.
//! Per size: 2 warm-up calls, then `max(5, 1024 / MiB)` timed ones. Prints a table and, last,
//! one JSON object.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lockstep_trainer::{Collective, Nccl, TcpRing};
use serde_json::json;

fn main() -> Result<()> {
    let sizes = lockstep_benchmarks::sizes_mib()?;
    let timeout = Duration::from_secs(60);
    let mut nccl = Nccl::new(TcpRing::alone(timeout), 0, timeout).context("form NCCL")?;
    println!("NCCL all-reduce through lockstep_trainer::Nccl, world size 1 (one GPU)");
    println!("  size    seconds/call   GB/s (bucket bytes / time)");
    let mut rows = Vec::new();
    for &mib in &sizes {
        let mut buf = vec![1.0f32; mib * 1024 * 1024 / 4];
        for _ in 0..2 {
            nccl.all_reduce_sum(&mut buf)?;
        }
        let iters = (1024 / mib).max(5);
        let start = Instant::now();
        for _ in 0..iters {
            nccl.all_reduce_sum(&mut buf)?;
        }
        let t = start.elapsed().as_secs_f64() / iters as f64;
        anyhow::ensure!(
            buf.iter().all(|&x| x == 1.0),
            "world size 1 changed the data"
        );
        let gbps = (mib * 1024 * 1024) as f64 / t / 1e9;
        println!("  {mib:4} MiB  {t:12.6}   {gbps:8.2}");
        rows.push(json!({"mib": mib, "seconds": t, "gbps": gbps}));
    }
    println!("{}", json!({"world": 1, "sizes": rows}));
    Ok(())
}
