//! Recovery time: SIGKILL of one rank → the first training step completed after the restart,
//! lockstep against torchrun (`../shared/anchors/torchrun_recovery.py`: TorchElastic
//! `--max-restarts` + gloo DDP) on the same model size, side by side in one run.
//!
//! ```text
//! cargo build --release
//! LOCKSTEP_BENCH_PYTHON=/path/to/venv/bin/python \
//! cargo run --release -p lockstep-benchmarks --bin recovery [-- ROUNDS]
//! ```
//!
//! Both sides as the anchor does it: the quickstart Llama (hidden 256, 4 layers, 8 heads, 4 KV
//! heads, MLP 768, vocabulary 256), 2 ranks on this machine, batch 4 × 128 tokens per rank,
//! a checkpoint every 5 steps, 30 steps, rank 1 SIGKILLed once it has done step 12; recovery is
//! the time from the kill to the first step the new gang completes. lockstep's includes the
//! whole gang's teardown, its 1 s restart backoff, relaunch, rendezvous, choosing and
//! verifying the checkpoint, loading it and one step. lockstep trains the quickstart data; the
//! anchor random tokens. Prints a table and, last, one JSON object. `recovery --smoke` (the
//! test suite's run): a tiny model, 8 steps, rank 1 killed after step 3, `$LOCKSTEP_BIN`
//! (default target/debug/lockstep), no anchor.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const KILL_AFTER: u64 = 12;
/// In smoke mode: a model of a few thousand parameters, rank 1 killed after step 3 of 8.
const SMOKE_KILL_AFTER: u64 = 3;
const SMOKE_SETS: [&str; 9] = [
    "train.steps=8",
    "train.batch_size=2",
    "checkpoint.every_steps=2",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "data.seq_len=32",
];

fn trainer_pid(job: &str, worker: u32) -> Option<i32> {
    lockstep_coordinator::launcher::local_trainers(job, Some(worker))
        .first()
        .map(|&p| p as i32)
}

/// One lockstep recovery, in seconds, and the step the new gang completed first.
fn lockstep_once(dir: &std::path::Path) -> Result<(f64, u64)> {
    let smoke = lockstep_benchmarks::smoke();
    let lockstep = std::path::absolute(lockstep_benchmarks::lockstep_bin())?;
    if !lockstep.is_file() {
        bail!(
            "{} not found: build first (cargo build --release)",
            lockstep.display()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut sets = vec![
        "train.steps=30".to_string(),
        "train.batch_size=4".into(),
        "checkpoint.every_steps=5".into(),
        "checkpoint.keep_last=2".into(),
        format!("checkpoint.url=\"file://{}/ckpt\"", dir.display()),
        format!("export.url=\"file://{}/export\"", dir.display()),
    ];
    let kill_after = if smoke {
        sets.extend(SMOKE_SETS.iter().map(|s| s.to_string()));
        SMOKE_KILL_AFTER
    } else {
        KILL_AFTER
    };
    let mut cmd = Command::new(&lockstep);
    // The quickstart's data paths are relative to the repository's root.
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["run", "configs/quickstart.toml", "--json", "--data-dir"])
        .arg(dir.join("coordinator"));
    for s in &sets {
        cmd.arg("--set").arg(s);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start lockstep run")?;
    let out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut killed: Option<i64> = None;
    let mut result = None;
    for line in out.lines() {
        let s: Value = serde_json::from_str(&line?)?;
        let step = s["step"].as_u64().unwrap_or(0);
        match killed {
            None if s["state"] == "running" && step >= kill_after => {
                let job = s["job"].as_str().unwrap_or_default();
                let pid = trainer_pid(job, 1).context("rank 1's pid")?;
                killed = Some(lockstep_benchmarks::now_ms());
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
            }
            // The coordinator's record of the recovery: when it acted and when the next
            // step finished.
            Some(at) if result.is_none() => {
                if let Some(r) = lockstep_benchmarks::recovered(&s, 0, at) {
                    result = Some((r.seconds, r.first_step, r.path));
                }
            }
            _ => {}
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("lockstep run failed ({status})");
    }
    let (secs, first, path) = result.context("no step after the recovery was seen")?;
    println!("  lockstep recovered {path}, first step {first}");
    Ok((secs, first))
}

fn torchrun_once() -> Result<Option<(f64, u64)>> {
    let Ok(python) = std::env::var("LOCKSTEP_BENCH_PYTHON") else {
        eprintln!("LOCKSTEP_BENCH_PYTHON unset: skipping the torchrun anchor");
        return Ok(None);
    };
    let script = std::env::var("LOCKSTEP_BENCH_ANCHOR")
        .unwrap_or_else(|_| "../shared/anchors/torchrun_recovery.py".into());
    // torch 2.15's gloo connects its full mesh eagerly at init, and after an elastic restart
    // that connect fails on this machine ("Gloo connectFullMesh failed ... Connection
    // refused"; the job never recovers). Lazy init is gloo's own switch for it.
    let o = Command::new(&python)
        .arg(&script)
        .args(["--kill-after-step", &KILL_AFTER.to_string()])
        .env("TORCH_GLOO_LAZY_INIT", "1")
        .output()
        .with_context(|| format!("run {python} {script}"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line).with_context(|| {
        format!(
            "anchor output: {text} {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    let r = v["recovery_s"]
        .as_f64()
        .context("the anchor did not recover")?;
    Ok(Some((r, v["resumed_at_step"].as_u64().unwrap_or(0))))
}

fn main() -> Result<()> {
    let smoke = lockstep_benchmarks::smoke();
    let rounds: usize = if smoke {
        1
    } else {
        std::env::args()
            .nth(1)
            .map_or(Ok(3), |s| s.parse())
            .context("ROUNDS is a number")?
    };
    let dir = std::env::temp_dir().join(format!("lockstep-recovery-{}", std::process::id()));
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 1..=rounds {
        let (l, ls) = lockstep_once(&dir)?;
        let t = if smoke { None } else { torchrun_once()? };
        println!(
            "round {round}: lockstep {l:.2} s (first step {ls}); torchrun {}",
            t.map_or("-".into(), |(t, ts)| format!("{t:.2} s (first step {ts})"))
        );
        ours.push(l);
        if let Some((t, _)) = t {
            theirs.push(t);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let (l, t) = (median(&mut ours), median(&mut theirs));
    let ratio = match (l, t) {
        (Some(l), Some(t)) => Some(l / t),
        _ => None,
    };
    println!(
        "median recovery: lockstep {} s, torchrun {} s, ratio {} (target ≤ 0.5)",
        l.map_or("-".into(), |x| format!("{x:.2}")),
        t.map_or("-".into(), |x| format!("{x:.2}")),
        ratio.map_or("-".into(), |x| format!("{x:.2}"))
    );
    println!(
        "{}",
        json!({"lockstep_seconds": ours, "torchrun_seconds": theirs, "lockstep_median": l,
               "torchrun_median": t, "ratio": ratio, "target": 0.5})
    );
    Ok(())
}
