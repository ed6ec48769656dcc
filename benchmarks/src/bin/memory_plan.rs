//! `lockstep plan` against what training really takes: for each config, the peak RSS of one
//! `lockstep train` rank (4 steps, a checkpoint at the end) beside the total `lockstep plan`
//! prints for it. The target is the plan within 15 % of the measurement.
//!
//! ```text
//! cargo build --release
//! cargo run --release -p lockstep-benchmarks --bin memory_plan
//! ```
//!
//! Each config is configs/quickstart.toml (one rank) with a few overrides: the quickstart in
//! f32 and bf16-mixed, more tokens, longer sequences, a bigger model, LoRA on that bigger
//! model in f32 and bf16-mixed, and LoRA on a 272M-parameter base with few tokens (where
//! loading the base is the peak). Prints a table and, last, one JSON object; exits 1 when an
//! estimate is off by more than 15 %. `memory_plan --smoke` (the test suite's run): one tiny
//! config with `$LOCKSTEP_BIN` (default target/debug/lockstep), no target.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::json;

const BIG: &[&str] = &[
    "model.hidden_size=512",
    "model.intermediate_size=1536",
    "model.num_layers=8",
];
const LOADING: &[&str] = &[
    "model.hidden_size=2048",
    "model.num_layers=6",
    "model.num_heads=16",
    "model.num_kv_heads=4",
    "model.intermediate_size=5632",
    "data.seq_len=64",
    "train.batch_size=1",
];
const LORA: &[&str] = &["lora.r=16", "lora.target_modules=[\"q_proj\",\"v_proj\"]"];

fn configs(smoke: bool) -> Vec<(&'static str, Vec<&'static str>)> {
    if smoke {
        return vec![(
            "tiny",
            vec![
                "model.hidden_size=64",
                "model.intermediate_size=128",
                "model.num_layers=2",
                "train.batch_size=2",
                "data.seq_len=32",
            ],
        )];
    }
    let with = |a: &[&'static str], b: &[&'static str]| [a, b].concat();
    vec![
        ("quickstart", vec![]),
        ("quickstart bf16-mixed", vec!["train.precision=bf16-mixed"]),
        ("batch 32", vec!["train.batch_size=32"]),
        ("seq_len 512", vec!["data.seq_len=512"]),
        ("vocab 32000", vec!["model.vocab_size=32000"]),
        ("h512 L8", BIG.to_vec()),
        ("h512 L8 LoRA r16 q,v", with(BIG, LORA)),
        (
            "h512 L8 LoRA r16 q,v bf16-mixed",
            with(&with(BIG, LORA), &["train.precision=bf16-mixed"]),
        ),
        // Loading dominates: a 272M-parameter base, 64 tokens per step.
        ("h2048 L6 LoRA r8, 64 tokens", with(LOADING, &["lora.r=8"])),
        (
            "h2048 L6 LoRA r8, 64 tokens, bf16-mixed",
            with(LOADING, &["lora.r=8", "train.precision=bf16-mixed"]),
        ),
    ]
}

/// Runs one rank in a child of this benchmark (`--one`), whose RUSAGE_CHILDREN is exactly
/// that run's; returns its peak RSS in bytes.
fn measure(exe: &Path, lockstep: &Path, dir: &Path, sets: &[&str]) -> Result<u64> {
    let out = Command::new(exe)
        .arg("--one")
        .arg(lockstep)
        .arg(dir)
        .args(sets)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("lockstep train {sets:?} failed");
    }
    let kib: u64 = String::from_utf8(out.stdout)?.trim().parse()?;
    Ok(kib * 1024)
}

/// The fixed part of every run: one rank, 4 steps, one checkpoint at the end, under `dir`.
fn common(dir: &Path) -> Vec<String> {
    vec![
        "job.world_size=1".into(),
        "train.steps=4".into(),
        "train.warmup_steps=0".into(),
        "train.eval_every=0".into(),
        "checkpoint.every_steps=1000".into(),
        format!("checkpoint.url=\"file://{}/ckpt\"", dir.display()),
        format!("export.url=\"file://{}/export\"", dir.display()),
    ]
}

fn one(lockstep: &Path, dir: &Path, sets: &[String]) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let mut cmd = Command::new(lockstep);
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "train",
            "--config",
            "configs/quickstart.toml",
            "--no-progress",
        ])
        .arg("--data-cache")
        .arg(dir.with_extension("tokens"));
    for s in common(dir).iter().chain(sets) {
        cmd.arg("--set").arg(s);
    }
    let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    if !status.success() {
        bail!("lockstep train: {status}");
    }
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    println!("{}", usage.max_rss());
    Ok(())
}

fn planned(lockstep: &Path, dir: &Path, sets: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = Command::new(lockstep);
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "plan",
            "configs/quickstart.toml",
            "--json",
            "--device",
            "cpu",
        ])
        .args(["--device-memory", "1TB"]);
    for s in common(dir)
        .iter()
        .map(String::as_str)
        .chain(sets.iter().copied())
    {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("lockstep plan {sets:?}: {}", out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "--one") && args.len() >= 4 {
        return one(Path::new(&args[2]), Path::new(&args[3]), &args[4..]);
    }
    let smoke = lockstep_benchmarks::smoke();
    let lockstep = std::path::absolute(lockstep_benchmarks::lockstep_bin())?;
    if !lockstep.is_file() {
        bail!(
            "{} not found: build first (cargo build --release)",
            lockstep.display()
        );
    }
    let exe = std::env::current_exe()?;
    let root = std::env::temp_dir().join(format!("lockstep-memory-plan-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    println!("| config | measured peak RSS | `lockstep plan` total | plan − measured |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    let mut worst: f64 = 0.0;
    for (i, (name, sets)) in configs(smoke).into_iter().enumerate() {
        let dir = root.join(format!("run-{i}"));
        let rss = measure(&exe, &lockstep, &dir, &sets)?;
        let plan = planned(&lockstep, &dir, &sets)?;
        let total = plan["total"].as_u64().context("plan total")?;
        let off = (total as f64 - rss as f64) / rss as f64 * 100.0;
        worst = worst.max(off.abs());
        println!(
            "| {name} | {:.0} MiB | {:.0} MiB | {off:+.1} % |",
            rss as f64 / 1048576.0,
            total as f64 / 1048576.0
        );
        rows.push(
            json!({"config": name, "overrides": sets, "peak_rss_bytes": rss,
            "plan": plan, "error_percent": off}),
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "{}",
        json!({"memory_plan": rows, "worst_error_percent": worst, "target_percent": 15})
    );
    if !smoke && worst > 15.0 {
        bail!("an estimate is {worst:.1} % off (target: within 15 %)");
    }
    Ok(())
}
