//! Chaos: kill random ranks of a `lockstep run` N times with SIGKILL and check that the job
//! still ends with the parameters of an uninterrupted run; measure each recovery (SIGKILL →
//! the first step past the one reached before the kill, reported by the new gang).
//!
//! ```text
//! cargo build --release
//! cargo run --release -p lockstep-benchmarks --bin chaos -- [CONFIG] [KILLS] [SEED]
//! ```
//!
//! CONFIG defaults to configs/quickstart.toml, KILLS to 5, SEED to 1. Both runs write their
//! checkpoints under a temporary directory (`--set checkpoint.url=...`). Uses
//! target/release/lockstep (its workers are the same binary). Prints each kill and, last, one JSON
//! object; exits with an error when the chaos run does not end as the clean one did (the same
//! final state, succeeded or exported, and the same parameters).
//!
//! `chaos --smoke` is the test suite's run (benchmarks/tests/smoke.rs): a tiny two-rank job,
//! one kill, the binary `$LOCKSTEP_BIN` (default target/debug/lockstep); seconds, no figures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

fn trainer_pids(job: &str, worker: u32) -> Vec<i32> {
    lockstep_coordinator::launcher::local_trainers(job, Some(worker))
        .into_iter()
        .map(|p| p as i32)
        .collect()
}

/// SplitMix64: a reproducible schedule from SEED.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Outcome {
    end: Value,
    recoveries: Vec<f64>,
    kills: Vec<(u64, u32)>,
}

fn run(lockstep: &Path, config: &Path, ckpt: &Path, plan: &[(u64, u32)]) -> Result<Outcome> {
    let mut child = Command::new(lockstep)
        .arg("run")
        .arg(config)
        .arg("--json")
        .arg("--set")
        .arg(format!("checkpoint.url=\"file://{}\"", ckpt.display()))
        .arg("--set")
        .arg(format!("job.max_restarts={}", plan.len() + 1))
        .arg("--data-dir")
        .arg(ckpt.with_file_name("coordinator"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", lockstep.display()))?;
    let out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut plan = plan.iter().copied().peekable();
    let mut pending: Option<(Instant, u64)> = None;
    let mut recoveries = Vec::new();
    let mut kills = Vec::new();
    let mut end = Value::Null;
    for line in out.lines() {
        let s: Value = serde_json::from_str(&line?)?;
        let step = s["step"].as_u64().unwrap_or(0);
        if let Some((at, reached)) = pending
            && s["state"] == "running"
            && step > reached
            && s["restarts"].as_u64().unwrap_or(0) as usize == kills.len()
        {
            recoveries.push(at.elapsed().as_secs_f64());
            pending = None;
            println!("  recovered in {:.2} s", at.elapsed().as_secs_f64());
        }
        if pending.is_none()
            && s["state"] == "running"
            && let Some(&(kill_at, worker)) = plan.peek()
            && step >= kill_at
        {
            let job = s["job"].as_str().unwrap_or_default();
            if let Some(&pid) = trainer_pids(job, worker).first() {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
                println!("SIGKILL rank {worker} (pid {pid}) at step {step}");
                kills.push((step, worker));
                pending = Some((Instant::now(), step));
            }
            plan.next();
        }
        end = s;
    }
    child.wait()?;
    Ok(Outcome {
        end,
        recoveries,
        kills,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = std::env::temp_dir().join(format!("lockstep-chaos-{}", std::process::id()));
    let smoke = args.first().map(String::as_str) == Some("--smoke");
    let (config, kills, seed, lockstep) = if smoke {
        std::fs::create_dir_all(&tmp)?;
        let config = lockstep_api::testing::TestJob::tiny("chaos-smoke")
            .world(2)
            .steps(300)
            .set("checkpoint.every_steps", 20)
            .write_to(&tmp);
        let bin = std::env::var("LOCKSTEP_BIN").unwrap_or_else(|_| "target/debug/lockstep".into());
        (config, 1, 1, PathBuf::from(bin))
    } else {
        let config = PathBuf::from(
            args.first()
                .map_or("configs/quickstart.toml", |s| s.as_str()),
        );
        let kills: usize = args.get(1).map_or(Ok(5), |s| s.parse()).context("KILLS")?;
        let seed: u64 = args.get(2).map_or(Ok(1), |s| s.parse()).context("SEED")?;
        (
            config,
            kills,
            seed,
            PathBuf::from("target/release/lockstep"),
        )
    };
    if !lockstep.is_file() {
        bail!(
            "{} not found: build first (cargo build --release)",
            lockstep.display()
        );
    }
    let text = std::fs::read_to_string(&config).with_context(|| config.display().to_string())?;
    let parsed = lockstep_api::JobConfig::parse(&text, &[])?;
    let (steps, world) = (parsed.train.steps, parsed.job.world_size);
    // Kill steps spread over the run, a random rank each time.
    let mut rng = seed;
    let mut plan: Vec<(u64, u32)> = (0..kills)
        .map(|i| {
            let span = steps / (kills as u64 + 1);
            let at = span * (i as u64 + 1) - span / 4 + next(&mut rng) % (span / 2).max(1);
            (
                at.min(steps - 1),
                (next(&mut rng) % u64::from(world)) as u32,
            )
        })
        .collect();
    plan.sort();
    println!(
        "clean run of {} ({steps} steps, {world} ranks)",
        config.display()
    );
    let t = Instant::now();
    let clean = run(&lockstep, &config, &tmp.join("clean/ckpt"), &[])?;
    let clean_secs = t.elapsed().as_secs_f64();
    println!("chaos run: {kills} SIGKILLs at {plan:?} (step, rank)");
    let t = Instant::now();
    let chaos = run(&lockstep, &config, &tmp.join("chaos/ckpt"), &plan)?;
    let chaos_secs = t.elapsed().as_secs_f64();
    // Jobs with an [export] end `exported`, others `succeeded`: both runs must end alike.
    let ended = |o: &Outcome| matches!(o.end["state"].as_str(), Some("succeeded" | "exported"));
    let same = clean.end["params_hash"] == chaos.end["params_hash"]
        && chaos.end["state"] == clean.end["state"]
        && ended(&clean);
    let mean = chaos.recoveries.iter().sum::<f64>() / chaos.recoveries.len().max(1) as f64;
    println!(
        "clean {clean_secs:.1} s, chaos {chaos_secs:.1} s, {} kills, {} restarts, mean recovery \
         {mean:.2} s; params xxh3 clean {} chaos {} → {}",
        chaos.kills.len(),
        chaos.end["restarts"],
        clean.end["params_hash"],
        chaos.end["params_hash"],
        if same { "IDENTICAL" } else { "DIFFERENT" }
    );
    println!(
        "{}",
        json!({"config": config.display().to_string(), "kills": chaos.kills, "restarts": chaos.end["restarts"],
               "recovery_seconds": chaos.recoveries, "mean_recovery_seconds": mean,
               "clean_seconds": clean_secs, "chaos_seconds": chaos_secs,
               "params_hash_clean": clean.end["params_hash"], "params_hash_chaos": chaos.end["params_hash"],
               "identical": same})
    );
    let _ = std::fs::remove_dir_all(&tmp);
    if !same {
        bail!("the chaos run did not end like the clean run");
    }
    Ok(())
}
