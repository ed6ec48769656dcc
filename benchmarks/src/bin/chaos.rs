//! Chaos soak: SIGKILL and SIGSTOP random ranks of a `lockstep run` at random moments, and
//! check that the job still ends with the parameters of an uninterrupted run; measure each
//! recovery (the signal → the first step finished after it, from the coordinator's record of
//! the recovery), the steps it lost and the path it took (`in-place`: the rank replaced, the
//! others kept their state; `emergency-checkpoint`: the gang could not re-form and restarted
//! from the state its survivors checkpointed; `checkpoint`: the gang restarted from its last
//! checkpoint).
//!
//! ```text
//! cargo build --release
//! cargo run --release -p lockstep-benchmarks --bin chaos -- [CONFIG] [KILLS] [SEED] \
//!     [--stops N] [--coordinator-kills N] [--store-faults SPEC] [--set SECTION.KEY=VALUE ...]
//! ```
//!
//! CONFIG defaults to configs/quickstart.toml, KILLS to 5, SEED to 1, no SIGSTOPs.
//! `--coordinator-kills N` also SIGKILLs the `lockstep run` process itself N times (spread
//! among the other signals) and runs it again at once, as a user would: its workers checkpoint
//! the step they are at and exit, and the new run takes the checkpoint URL over and resumes; its
//! recovery counts from the kill to the new run's first finished step, its steps lost from the
//! newest step seen before the kill to the step the new run starts from.
//! `--store-faults` runs the chaos run's checkpoint stores through `UnreliableStore`
//! (`LOCKSTEP_STORE_FAULTS`, e.g. `fail=0.1,truncate=0.1`): every checkpoint the run committed
//! is then verified, and the status's checkpoint failures are reported. A stopped
//! rank is caught by `job.heartbeat_timeout` (lower it with `--set` for a soak). `--set`s apply
//! to both runs. Both runs write their checkpoints under a temporary directory. Uses
//! target/release/lockstep (its workers are the same binary). Each signal waits for the
//! previous recovery to finish. A run with no status change for 5 minutes counts as a hang and
//! is killed. Prints each signal and recovery, a summary and, last, one JSON object; exits with
//! an error when the chaos run does not end as the clean one did (the same final state,
//! succeeded or exported, and the same parameters), or hung.
//!
//! `chaos --smoke` is the test suite's run (benchmarks/tests/smoke.rs): a tiny two-rank job,
//! one kill of a rank and one of the coordinator, the binary `$LOCKSTEP_BIN` (default
//! target/debug/lockstep); seconds, no figures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lockstep_benchmarks::{Recovered, now_ms, recovered};
use nix::sys::signal::Signal;
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

/// One planned signal: at (or after) this step, after this many ms, to this rank (or to the
/// coordinator, the `lockstep run` process).
#[derive(Debug, Clone, Copy)]
struct Event {
    step: u64,
    delay_ms: u64,
    rank: u32,
    signal: Signal,
    coordinator: bool,
}

impl Event {
    fn what(&self) -> String {
        if self.coordinator {
            "coordinator SIGKILL".into()
        } else {
            format!("{:?}", self.signal)
        }
    }
}

/// A signal sent and how its recovery went.
struct Hit {
    event: Event,
    step: u64,
    recovered: Option<Recovered>,
}

struct Outcome {
    end: Value,
    hits: Vec<Hit>,
    hung: bool,
}

/// No status change for this long: the run hangs.
const HANG: Duration = Duration::from_secs(300);

fn run(
    lockstep: &Path,
    config: &Path,
    ckpt: &Path,
    sets: &[String],
    plan: &[Event],
    faults: Option<&str>,
) -> Result<Outcome> {
    let mut cmd = Command::new(lockstep);
    match faults {
        Some(spec) => cmd.env(lockstep_storage::fault::FAULTS_ENV, spec),
        None => cmd.env_remove(lockstep_storage::fault::FAULTS_ENV),
    };
    cmd.arg("run")
        .arg(config)
        .arg("--json")
        .arg("--set")
        .arg(format!("checkpoint.url=\"file://{}\"", ckpt.display()))
        .arg("--set")
        .arg(format!("job.max_restarts={}", plan.len() + 1))
        .arg("--data-dir")
        .arg(ckpt.with_file_name("coordinator"));
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let start = |cmd: &mut Command| -> Result<(std::process::Child, mpsc::Receiver<_>)> {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", lockstep.display()))?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok((child, rx))
    };
    let (mut child, mut rx) = start(&mut cmd)?;
    let mut plan = plan.iter().copied().peekable();
    // The hit whose recovery is awaited: its index and when its signal went (Unix ms).
    let mut pending: Option<(usize, i64)> = None;
    let mut hits: Vec<Hit> = Vec::new();
    // Hits before the current `lockstep run` (its recoveries list starts after them).
    let mut base = 0usize;
    // The coordinator was killed: the hit, when, the newest step and checkpoint seen before.
    let mut orphaned: Option<(usize, i64, u64, u64)> = None;
    // The run after a coordinator kill: the step it started from, once it said.
    let mut resumed: Option<u64> = None;
    // The lines come from the run started after the coordinator kill.
    let mut fresh = false;
    let mut end = Value::Null;
    let mut hung = false;
    loop {
        let line = match rx.recv_timeout(HANG) {
            Ok(line) => line?,
            Err(mpsc::RecvTimeoutError::Disconnected) if orphaned.is_some() => {
                // Run it again at once: it takes the URL over from the dead run.
                child.wait()?;
                (child, rx) = start(&mut cmd)?;
                base = hits.len();
                resumed = None;
                fresh = true;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                println!("no status change for {HANG:?}: the run hangs; killing it");
                hung = true;
                let _ = child.kill();
                break;
            }
        };
        // What the killed run printed before it died is not the new run's.
        if orphaned.is_some() && resumed.is_none() && !fresh {
            continue;
        }
        let s: Value = serde_json::from_str(&line)?;
        let step = s["step"].as_u64().unwrap_or(0);
        if let Some((i, at, seen, kept)) = orphaned
            && s["state"] == "running"
        {
            let from = *resumed.get_or_insert(s["last_checkpoint"].as_u64().unwrap_or(0));
            if step > from {
                let r = Recovered {
                    seconds: (now_ms() - at).max(0) as f64 / 1e3,
                    path: if from > kept {
                        "emergency-checkpoint".into()
                    } else {
                        "checkpoint".into()
                    },
                    steps_lost: seen.saturating_sub(from),
                    first_step: step,
                };
                println!(
                    "  recovered ({}, from step {from}) in {:.2} s, {} steps lost, first step {}",
                    r.path, r.seconds, r.steps_lost, r.first_step
                );
                hits[i].recovered = Some(r);
                orphaned = None;
            }
        }
        if let Some((i, at)) = pending
            && let Some(r) = recovered(&s, i - base, at)
        {
            println!(
                "  recovered {} in {:.2} s, {} steps lost, first step {}",
                r.path, r.seconds, r.steps_lost, r.first_step
            );
            hits[i].recovered = Some(r);
            pending = None;
        }
        if pending.is_none()
            && orphaned.is_none()
            && s["state"] == "running"
            && let Some(&e) = plan.peek()
            && step >= e.step
        {
            let job = s["job"].as_str().unwrap_or_default().to_string();
            // A random moment within a step.
            std::thread::sleep(Duration::from_millis(e.delay_ms));
            if e.coordinator {
                let at = now_ms();
                child.kill()?;
                println!(
                    "SIGKILL the coordinator (pid {}) at step {step}",
                    child.id()
                );
                hits.push(Hit {
                    event: e,
                    step,
                    recovered: None,
                });
                let kept = s["last_checkpoint"].as_u64().unwrap_or(0);
                orphaned = Some((hits.len() - 1, at, step, kept));
                fresh = false;
            } else if let Some(&pid) = trainer_pids(&job, e.rank).first() {
                let at = now_ms();
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), e.signal)?;
                println!("{:?} rank {} (pid {pid}) at step {step}", e.signal, e.rank);
                hits.push(Hit {
                    event: e,
                    step,
                    recovered: None,
                });
                pending = Some((hits.len() - 1, at));
            }
            plan.next();
        }
        end = s;
    }
    child.wait()?;
    Ok(Outcome { end, hits, hung })
}

/// Verifies every committed checkpoint under `dir` (every chunk's hash): how many there are,
/// and what is wrong with those that do not verify.
fn verify_all(dir: &Path) -> Result<(usize, Vec<String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = lockstep_storage::CheckpointStore::open(&format!("file://{}", dir.display()))?;
    rt.block_on(async {
        let steps = store.list().await?;
        let mut bad = Vec::new();
        for step in &steps {
            if let Err(e) = store.verify(*step).await {
                bad.push(format!("step {step}: {e}"));
            }
        }
        Ok((steps.len(), bad))
    })
}

/// The q-quantile (0..=1) of `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn main() -> Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let mut args = Vec::new();
    let mut sets = Vec::new();
    let mut stops = 0usize;
    let mut coordinator_kills = 0usize;
    let mut faults: Option<String> = None;
    let mut it = all.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--set" => sets.push(it.next().context("--set needs SECTION.KEY=VALUE")?.clone()),
            "--store-faults" => {
                let spec = it.next().context("--store-faults needs a spec")?;
                lockstep_storage::Faults::parse(spec)
                    .map_err(|e| anyhow::anyhow!("--store-faults: {e}"))?;
                faults = Some(spec.clone());
            }
            "--stops" => {
                stops = it
                    .next()
                    .context("--stops needs N")?
                    .parse()
                    .context("--stops")?
            }
            "--coordinator-kills" => {
                coordinator_kills = it
                    .next()
                    .context("--coordinator-kills needs N")?
                    .parse()
                    .context("--coordinator-kills")?
            }
            _ => args.push(a.clone()),
        }
    }
    if std::env::var_os(lockstep_storage::fault::FAULTS_ENV).is_some() {
        bail!(
            "{} is set: it would inject faults into the clean run and the verification too; \
             use --store-faults SPEC (the chaos run only)",
            lockstep_storage::fault::FAULTS_ENV
        );
    }
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
        // One rank killed and the coordinator killed once.
        coordinator_kills = 1;
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
    let parsed = lockstep_api::JobConfig::parse(&text, &sets)?;
    let (steps, world) = (parsed.train.steps, parsed.job.world_size);
    // Signal steps spread over the run (each after the previous recovery), a random rank and
    // moment each time; the SIGSTOPs spread among the SIGKILLs.
    let events = kills + stops + coordinator_kills;
    let mut rng = seed;
    let span = (steps / (events as u64 + 1)).max(1);
    // Exactly `stops` of the events are SIGSTOPs and `coordinator_kills` of the others kill the
    // coordinator, each kind evenly spread.
    let is_stop = |i: usize| (i * stops) / events != ((i + 1) * stops) / events;
    let others: Vec<usize> = (0..events).filter(|&i| !is_stop(i)).collect();
    let coordinator_at: Vec<usize> = (0..coordinator_kills)
        .filter_map(|j| others.get((2 * j + 1) * others.len() / (2 * coordinator_kills)))
        .copied()
        .collect();
    let plan: Vec<Event> = (0..events)
        .map(|i| {
            let at = span * (i as u64 + 1) - span / 4 + next(&mut rng) % (span / 2).max(1);
            let stop = is_stop(i);
            let coordinator = coordinator_at.contains(&i);
            Event {
                coordinator,
                step: at.min(steps.saturating_sub(1)),
                delay_ms: next(&mut rng) % 300,
                rank: (next(&mut rng) % u64::from(world)) as u32,
                signal: if stop {
                    Signal::SIGSTOP
                } else {
                    Signal::SIGKILL
                },
            }
        })
        .collect();
    println!(
        "clean run of {} ({steps} steps, {world} ranks)",
        config.display()
    );
    let t = Instant::now();
    let clean = run(
        &lockstep,
        &config,
        &tmp.join("clean/ckpt"),
        &sets,
        &[],
        None,
    )?;
    let clean_secs = t.elapsed().as_secs_f64();
    let n_stop = plan.iter().filter(|e| e.signal == Signal::SIGSTOP).count();
    let n_coord = plan.iter().filter(|e| e.coordinator).count();
    println!(
        "chaos run: {} SIGKILLs of ranks, {n_stop} SIGSTOPs, {n_coord} SIGKILLs of the coordinator",
        plan.len() - n_stop - n_coord
    );
    let t = Instant::now();
    let chaos = run(
        &lockstep,
        &config,
        &tmp.join("chaos/ckpt"),
        &sets,
        &plan,
        faults.as_deref(),
    )?;
    let chaos_secs = t.elapsed().as_secs_f64();
    // Jobs with an [export] end `exported`, others `succeeded`: both runs must end alike.
    let ended = |o: &Outcome| matches!(o.end["state"].as_str(), Some("succeeded" | "exported"));
    let same = clean.end["params_hash"] == chaos.end["params_hash"]
        && chaos.end["state"] == clean.end["state"]
        && ended(&clean)
        && !chaos.hung;
    let done: Vec<&Recovered> = chaos
        .hits
        .iter()
        .filter_map(|h| h.recovered.as_ref())
        .collect();
    let secs = |sig: Signal| -> Vec<f64> {
        chaos
            .hits
            .iter()
            .filter(|h| h.event.signal == sig && !h.event.coordinator)
            .filter_map(|h| h.recovered.as_ref().map(|r| r.seconds))
            .collect()
    };
    let (kill_secs, stop_secs) = (secs(Signal::SIGKILL), secs(Signal::SIGSTOP));
    let coord_secs: Vec<f64> = chaos
        .hits
        .iter()
        .filter(|h| h.event.coordinator)
        .filter_map(|h| h.recovered.as_ref().map(|r| r.seconds))
        .collect();
    let lost_coord: u64 = chaos
        .hits
        .iter()
        .filter(|h| h.event.coordinator)
        .filter_map(|h| h.recovered.as_ref().map(|r| r.steps_lost))
        .sum();
    let on = |path: &str| done.iter().filter(|r| r.path == path).count();
    let (in_place, emergency) = (on("in-place"), on("emergency-checkpoint"));
    let lost: u64 = done.iter().map(|r| r.steps_lost).sum();
    let lost_kills: u64 = chaos
        .hits
        .iter()
        .filter(|h| h.event.signal == Signal::SIGKILL && !h.event.coordinator)
        .filter_map(|h| h.recovered.as_ref().map(|r| r.steps_lost))
        .sum();
    println!(
        "clean {clean_secs:.1} s, chaos {chaos_secs:.1} s; {} signals, {} recoveries seen ({in_place} \
         in place, {emergency} from an emergency checkpoint), {} restarts, {} replacements; steps \
         lost: {lost} ({lost_kills} by SIGKILLs of ranks, {lost_coord} by coordinator kills)",
        chaos.hits.len(),
        done.len(),
        chaos.end["restarts"],
        chaos.end["replacements"],
    );
    println!(
        "SIGKILL → next step: median {:.2} s, p99 {:.2} s, max {:.2} s; SIGSTOP → next step: \
         median {:.2} s, max {:.2} s",
        quantile(&kill_secs, 0.5),
        quantile(&kill_secs, 0.99),
        quantile(&kill_secs, 1.0),
        quantile(&stop_secs, 0.5),
        quantile(&stop_secs, 1.0),
    );
    if !coord_secs.is_empty() {
        println!(
            "coordinator SIGKILL → the next run's first step: {}",
            coord_secs
                .iter()
                .map(|s| format!("{s:.2} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "params xxh3 clean {} chaos {} → {}{}",
        clean.end["params_hash"],
        chaos.end["params_hash"],
        if same { "IDENTICAL" } else { "DIFFERENT" },
        if chaos.hung {
            " (the chaos run hung)"
        } else {
            ""
        }
    );
    let (committed, torn) = verify_all(&tmp.join("chaos/ckpt"))?;
    println!(
        "checkpoints: {committed} committed at the end, {} that do not verify{}; {} checkpoint \
         failures in the status{}",
        torn.len(),
        if torn.is_empty() {
            String::new()
        } else {
            format!(" ({})", torn.join("; "))
        },
        chaos.end["checkpoint_failures"],
        faults
            .as_deref()
            .map_or(String::new(), |f| format!(" (store faults: {f})")),
    );
    let table: Vec<Value> = chaos
        .hits
        .iter()
        .map(|h| {
            json!({"signal": h.event.what(), "rank": (!h.event.coordinator).then_some(h.event.rank), "step": h.step,
                   "path": h.recovered.as_ref().map(|r| r.path.clone()),
                   "steps_lost": h.recovered.as_ref().map(|r| r.steps_lost),
                   "seconds": h.recovered.as_ref().map(|r| r.seconds)})
        })
        .collect();
    println!(
        "{}",
        json!({"config": config.display().to_string(), "sets": sets, "signals": table,
               "restarts": chaos.end["restarts"], "replacements": chaos.end["replacements"],
               "kill_seconds_median": quantile(&kill_secs, 0.5),
               "kill_seconds_p99": quantile(&kill_secs, 0.99),
               "kill_seconds_max": quantile(&kill_secs, 1.0),
               "coordinator_kill_seconds": coord_secs,
               "steps_lost_by_coordinator_kills": lost_coord,
               "steps_lost": lost, "steps_lost_by_kills": lost_kills, "hung": chaos.hung,
               "clean_seconds": clean_secs, "chaos_seconds": chaos_secs,
               "params_hash_clean": clean.end["params_hash"], "params_hash_chaos": chaos.end["params_hash"],
               "identical": same, "store_faults": faults,
               "checkpoints_committed": committed, "checkpoints_torn": torn,
               "checkpoint_failures": chaos.end["checkpoint_failures"]})
    );
    let _ = std::fs::remove_dir_all(&tmp);
    if !same {
        bail!("the chaos run did not end like the clean run");
    }
    if !torn.is_empty() {
        bail!("a committed checkpoint does not verify");
    }
    if smoke && done.len() != chaos.hits.len() {
        bail!("a recovery was not seen in the job's status");
    }
    Ok(())
}
