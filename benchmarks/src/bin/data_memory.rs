//! Memory against dataset size: the peak RSS of `lockstep run` (the coordinator and its two
//! ranks; the largest process counts) training the quickstart model on synthetic JSONL files of
//! growing size, through the real launcher. The data is tokenised into the token store
//! (trainer/src/tokens.rs) and read window by window, so the peak should stay nearly flat as
//! the dataset grows.
//!
//! ```text
//! cargo build --release
//! cargo run --release -p lockstep-benchmarks --bin data_memory [-- MB ...]   # default 100 1000
//! ```
//!
//! `LOCKSTEP_BENCH_BASELINE=/path/to/an/older/lockstep` measures that binary too, on files up
//! to `LOCKSTEP_BENCH_BASELINE_MAX_MB` (default 100; the old reader held ~10× the dataset per
//! rank). Each run: 4 steps, batch 8 × 128 tokens per rank, one checkpoint. The time includes
//! tokenising (the first run on a file) and the verifying open of the store. Prints a table and,
//! last, one JSON object. `data_memory --smoke` (the test suite's run): 1 MB with
//! `$LOCKSTEP_BIN` (default target/debug/lockstep).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Writes about `mb` MB of JSONL records (text and prompt/completion, 200–3,000 bytes each).
fn make_data(path: &Path, mb: u64) -> Result<u64> {
    const WORDS: [&str; 16] = [
        "the",
        "gradient",
        "ring",
        "checkpoint",
        "token",
        "rank",
        "model",
        "step",
        "loss",
        "restart",
        "shard",
        "commit",
        "layer",
        "batch",
        "window",
        "epoch",
    ];
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let (mut written, mut x, mut docs) = (0u64, 0x9e37_79b9_7f4a_7c15_u64, 0u64);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    while written < mb * 1_000_000 {
        let words = 30 + next() % 450;
        let mut text = String::new();
        for i in 0..words {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(WORDS[(next() % 16) as usize]);
        }
        let line = if docs % 10 == 0 {
            format!("{{\"prompt\":\"question {docs}:\",\"completion\":\"{text}\"}}\n")
        } else {
            format!("{{\"text\":\"{text}\"}}\n")
        };
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
        docs += 1;
    }
    out.flush()?;
    Ok(written)
}

/// Runs `lockstep run` once with coordinator data dir `coord` (its `tokens/` is the token
/// cache) and checkpoints under `ckpt`; returns (peak RSS in KiB of its largest process,
/// seconds). Runs in a child of this benchmark (`--one`), whose RUSAGE_CHILDREN covers exactly
/// that run.
fn measure(
    exe: &Path,
    lockstep: &Path,
    data: &Path,
    coord: &Path,
    ckpt: &Path,
) -> Result<(u64, f64)> {
    let _ = std::fs::remove_dir_all(ckpt);
    let out = Command::new(exe)
        .arg("--one")
        .args([lockstep, data, coord, ckpt])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{} failed on {}", lockstep.display(), data.display());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut parts = text.split_whitespace();
    let rss = parts.next().context("rss")?.parse()?;
    let secs = parts.next().context("secs")?.parse()?;
    Ok((rss, secs))
}

fn one(lockstep: &Path, data: &Path, coord: &Path, ckpt: &Path) -> Result<()> {
    let started = Instant::now();
    let export = ckpt.parent().unwrap_or(ckpt).join("export");
    let status = Command::new(lockstep)
        // The quickstart's other paths are relative to the repository's root.
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["run", "configs/quickstart.toml", "--json", "--data-dir"])
        .arg(coord)
        .arg("--set")
        .arg(format!("export.url=\"file://{}\"", export.display()))
        .arg("--set")
        .arg(format!("data.train=[\"file://{}\"]", data.display()))
        .arg("--set")
        .arg(format!("checkpoint.url=\"file://{}\"", ckpt.display()))
        .args([
            "--set",
            "train.steps=4",
            "--set",
            "checkpoint.every_steps=4",
        ])
        .args(["--set", "train.warmup_steps=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("lockstep run: {status}");
    }
    let secs = started.elapsed().as_secs_f64();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    println!("{} {secs}", usage.max_rss());
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "--one") && args.len() == 6 {
        let p = |i: usize| Path::new(&args[i]);
        return one(p(2), p(3), p(4), p(5));
    }
    let smoke = lockstep_benchmarks::smoke();
    let sizes: Vec<u64> = if smoke {
        vec![1]
    } else if args.len() > 1 {
        args[1..]
            .iter()
            .map(|s| s.parse().context("sizes are MB"))
            .collect::<Result<_>>()?
    } else {
        vec![100, 1000]
    };
    let lockstep = std::path::absolute(lockstep_benchmarks::lockstep_bin())?;
    if !lockstep.is_file() {
        bail!(
            "{} not found: build first (cargo build --release)",
            lockstep.display()
        );
    }
    let baseline = std::env::var_os("LOCKSTEP_BENCH_BASELINE").map(PathBuf::from);
    let baseline_max: u64 = std::env::var("LOCKSTEP_BENCH_BASELINE_MAX_MB")
        .ok()
        .map_or(Ok(100), |s| s.parse())
        .context("LOCKSTEP_BENCH_BASELINE_MAX_MB is a number")?;
    let exe = std::env::current_exe()?;
    let root = std::env::temp_dir().join(format!("lockstep-data-memory-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let (coord, ckpt) = (root.join("coordinator"), root.join("ckpt"));
    let mut rows = Vec::new();
    println!(
        "| JSONL | lockstep peak RSS, 1st run / cached | seconds, 1st / cached | baseline peak RSS |"
    );
    println!("|---|---|---|---|");
    for mb in sizes {
        let data = root.join(format!("data-{mb}MB.jsonl"));
        let bytes = make_data(&data, mb)?;
        let _ = std::fs::remove_dir_all(&coord);
        // The first run tokenises; the second, on the same coordinator data dir, reuses it.
        let (first, t1) = measure(&exe, &lockstep, &data, &coord, &ckpt)?;
        let (second, t2) = measure(&exe, &lockstep, &data, &coord, &ckpt)?;
        let base = match &baseline {
            Some(b) if mb <= baseline_max => {
                let dir = root.join("baseline");
                let _ = std::fs::remove_dir_all(&dir);
                Some(measure(&exe, b, &data, &dir, &ckpt)?)
            }
            _ => None,
        };
        println!(
            "| {:.0} MB | {:.0} MB / {:.0} MB | {t1:.1} / {t2:.1} | {} |",
            bytes as f64 / 1e6,
            first as f64 / 1024.0,
            second as f64 / 1024.0,
            base.map_or("-".into(), |(r, t)| format!(
                "{:.0} MB ({t:.1} s)",
                r as f64 / 1024.0
            ))
        );
        rows.push(json!({"jsonl_bytes": bytes, "peak_rss_kib_first": first,
            "peak_rss_kib_cached": second, "secs_first": t1, "secs_cached": t2,
            "baseline_peak_rss_kib": base.map(|b| b.0), "baseline_secs": base.map(|b| b.1)}));
        let _ = std::fs::remove_file(&data);
    }
    let _ = std::fs::remove_dir_all(&root);
    println!("{}", json!({"data_memory": rows}));
    Ok(())
}
