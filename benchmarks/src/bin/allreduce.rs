//! All-reduce benchmark: lockstep's TCP ring at world size 2 on loopback against PyTorch's gloo
//! (`../shared/anchors/torch_allreduce.py`) and against the loopback limit (one plain TCP stream
//! between two threads), side by side in one run.
//!
//! ```text
//! LOCKSTEP_BENCH_PYTHON=/path/to/venv/bin/python \
//! cargo run --release -p lockstep-benchmarks --bin allreduce [-- MiB ...]
//! ```
//!
//! `allreduce --smoke` (the test suite's run): 1 MiB, a 16 MiB loopback stream, no anchor.
//!
//! Method as the anchor's (nccl-tests conventions): per size, 2 warm-up all-reduces, then
//! `max(3, 256 / MiB)` timed ones ending with a barrier; algbw = bytes / time, busbw = algbw ×
//! 2(W−1)/W. lockstep's two ranks are two threads of this process, each with its own ring and
//! sockets (gloo's are two processes). Prints a table and, last, one JSON object.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lockstep_trainer::{Collective, RingKey, TcpRing};
use serde_json::json;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORLD: usize = 2;

/// Seconds per all-reduce of `mib` MiB at world size 2 (rank 0's view).
fn ring(mib: usize) -> Result<f64> {
    let listeners: Vec<TcpListener> = (0..WORLD)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    let n = mib * 1024 * 1024 / 4;
    let iters = (256 / mib).max(3);
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = &peers;
                s.spawn(move || -> Result<f64> {
                    let mut ring = TcpRing::with_listener(
                        l,
                        rank,
                        peers,
                        Duration::from_secs(60),
                        &RingKey::derive(b"bench", "allreduce"),
                    )?;
                    // Right before fast: ranks holding 1 and 2 must both end with 3.
                    let mut check = vec![rank as f32 + 1.0; n];
                    ring.all_reduce_sum(&mut check)?;
                    if let Some(bad) = check.iter().position(|&x| x != 3.0) {
                        bail!(
                            "rank {rank}: element {bad} all-reduced to {}, not 3",
                            check[bad]
                        );
                    }
                    let mut buf = vec![1.0f32; n];
                    for _ in 0..2 {
                        ring.all_reduce_sum(&mut buf)?;
                    }
                    ring.barrier()?;
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce_sum(&mut buf)?;
                    }
                    ring.barrier()?;
                    Ok(t0.elapsed().as_secs_f64() / iters as f64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
            .collect::<Result<Vec<f64>>>()
    })?;
    Ok(times[0])
}

/// GB/s of one TCP stream on loopback (1 GiB in 1 MiB writes; 16 MiB in smoke mode).
fn loopback() -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let total: usize = if lockstep_benchmarks::smoke() {
        16 << 20
    } else {
        1 << 30
    };
    let reader = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            let k = s.read(&mut buf)?;
            if k == 0 {
                bail!("stream closed early");
            }
            got += k;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let chunk = vec![1u8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..total / chunk.len() {
        s.write_all(&chunk)?;
    }
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(total as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// gloo's (MiB, busbw GB/s) per size, if LOCKSTEP_BENCH_PYTHON is set.
fn gloo(sizes: &[usize]) -> Result<Vec<(usize, f64)>> {
    let Ok(python) = std::env::var("LOCKSTEP_BENCH_PYTHON") else {
        eprintln!("LOCKSTEP_BENCH_PYTHON unset: skipping the gloo anchor");
        return Ok(Vec::new());
    };
    let script = std::env::var("LOCKSTEP_BENCH_ANCHOR")
        .unwrap_or_else(|_| "../shared/anchors/torch_allreduce.py".into());
    let o = Command::new(&python)
        .arg(&script)
        .arg(WORLD.to_string())
        .args(sizes.iter().map(|s| s.to_string()))
        .output()
        .with_context(|| format!("run {python} {script}"))?;
    if !o.status.success() {
        bail!("anchor failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut out = Vec::new();
    for line in text.lines() {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(|v| {
                    v.trim_end_matches("GB/s")
                        .trim_end_matches("MiB")
                        .to_string()
                })
        };
        if let (Some(mib), Some(bus)) = (field("size="), field("busbw=")) {
            out.push((mib.parse()?, bus.parse()?));
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let sizes = lockstep_benchmarks::sizes_mib()?;
    let limit = loopback()?;
    let anchor = if lockstep_benchmarks::smoke() {
        Vec::new()
    } else {
        gloo(&sizes)?
    };
    let bus = |alg: f64| alg * 2.0 * (WORLD as f64 - 1.0) / WORLD as f64;
    println!("all-reduce, world size {WORLD}, loopback; one TCP stream: {limit:.2} GB/s");
    println!("  size    lockstep busbw    gloo busbw   ÷ gloo   ÷ loopback");
    let mut rows = Vec::new();
    for &mib in &sizes {
        let t = ring(mib)?;
        let alg = (mib * 1024 * 1024) as f64 / t / 1e9;
        let g = anchor.iter().find(|(m, _)| *m == mib).map(|x| x.1);
        println!(
            "  {mib:4} MiB  {:8.3} GB/s  {:>10}  {:>7}  {:8.2}",
            bus(alg),
            g.map(|g| format!("{g:.3} GB/s")).unwrap_or("-".into()),
            g.map(|g| format!("{:.2}", bus(alg) / g))
                .unwrap_or("-".into()),
            bus(alg) / limit
        );
        rows.push(json!({
            "mib": mib, "seconds": t, "algbw": alg, "busbw": bus(alg),
            "gloo_busbw": g, "vs_gloo": g.map(|g| bus(alg) / g), "vs_loopback": bus(alg) / limit,
        }));
    }
    println!(
        "{}",
        json!({"world": WORLD, "loopback_gbps": limit, "sizes": rows})
    );
    Ok(())
}
