//! End to end: `lockstep run` / `serve` starting real `lockstep train` workers (the same
//! binary) on loopback, ranks killed and stopped with real signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lockstep_api::testing::TestJob;

use crate::common::{
    causes, free_port, last, lockstep, one_gang, run, run_hitting, run_watching, run_watching_pid,
    signal, trainers,
};
use serde_json::Value;

/// The quickstart's held-out split.
fn eval_data() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data/quickstart-eval.jsonl");
    format!("[\"file://{}\"]", p.canonicalize().unwrap().display())
}

/// A small W=2 job of `steps` steps in `dir/job.toml`, checkpointing every 25 steps and
/// evaluating on the quickstart's held-out split every 50. `job_extra` are `job.KEY=VALUE`
/// overrides.
fn config(dir: &Path, steps: u64, job_extra: &[(&str, &str)]) -> PathBuf {
    let mut job = TestJob::tiny("e2e")
        .world(2)
        .steps(steps)
        .set("job.gang_timeout", "\"30s\"")
        .set("data.eval", eval_data())
        .set("train.eval_every", 50)
        .set("train.warmup_steps", 5)
        .set("checkpoint.every_steps", 25)
        .set("checkpoint.keep_last", 2);
    for (k, v) in job_extra {
        job = job.set(&format!("job.{k}"), v);
    }
    job.write_to(dir)
}

/// Every tensor (parameters and both AdamW moments) of the newest checkpoint under `dir/ckpt`.
fn final_tensors(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("file://{}/ckpt", dir.display());
    let store = lockstep_storage::CheckpointStore::open(&url).unwrap();
    let step = rt.block_on(store.latest()).unwrap().unwrap();
    let c = rt.block_on(store.load(step)).unwrap();
    c.tensors
        .into_iter()
        .map(|t| (t.name, t.data.to_vec()))
        .collect()
}

fn straight(steps: u64) -> (tempfile::TempDir, Value) {
    straight_with(steps, &[])
}

/// An uninterrupted run of `config(dir, steps, job_extra)`: its directory and final status.
fn straight_with(steps: u64, job_extra: &[(&str, &str)]) -> (tempfile::TempDir, Value) {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), steps, job_extra);
    let (code, lines) = run(dir.path(), None);
    assert_eq!(code, 0, "{:?}", last(&lines));
    let end = last(&lines).clone();
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(
        end["restarts"],
        0,
        "a healthy gang restarted: {end}; causes: {:?}",
        causes(&lines)
    );
    (dir, end)
}

/// The final state of `dir`'s run is the same bits as the clean run's: parameters and both
/// AdamW moments of the last checkpoint, the parameters' hash and the held-out loss.
fn assert_identical(clean_dir: &Path, clean: &Value, dir: &Path, end: &Value) {
    assert_eq!(end["params_hash"], clean["params_hash"]);
    assert!(!clean["params_hash"].as_str().unwrap().is_empty());
    // The held-out loss after the last step is the same bits as the uninterrupted run's.
    assert_eq!(end["eval_step"], 300, "{end}");
    assert!(
        end["eval_loss"].as_f64().is_some_and(f64::is_finite),
        "{end}"
    );
    assert_eq!(end["eval_loss"], clean["eval_loss"], "{end} vs {clean}");
    let (a, b) = (final_tensors(clean_dir), final_tensors(dir));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().any(|(n, _)| n.starts_with("optim.")),
        "moments are compared too"
    );
    for ((na, da), (nb, db)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "{na} differs between the clean and the recovered run"
        );
    }
}

/// The step the survivors continued from after re-forming in place, from the log of `rank`
/// of attempt 1 (`the gang lost a rank (...) and re-formed ...: continuing after step N`).
fn continued_after(end: &Value, rank: u32) -> Vec<u64> {
    let logs = Path::new(end["logs"].as_str().unwrap());
    let log =
        std::fs::read_to_string(logs.join("attempt-1").join(format!("rank-{rank}.log"))).unwrap();
    log.lines()
        .filter_map(|l| l.split_once("continuing after step "))
        .map(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_rank_killed_mid_run_is_replaced_in_place_losing_no_step_and_the_result_is_bit_identical() {
    let _gang = one_gang();
    let (clean_dir, clean) = straight(300);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 300, &[]);
    // Between the checkpoints of steps 100 and 125.
    let (code, lines) = run(
        dir.path(),
        Some((1, nix::sys::signal::Signal::SIGKILL, 110)),
    );
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded");
    // No gang restart: the survivor kept its process and state.
    assert_eq!(end["restarts"], 0, "{end}; causes: {:?}", causes(&lines));
    assert_eq!(end["attempt"], 1, "{end}");
    assert_eq!(end["replacements"], 1, "{end}");
    assert!(
        lines.iter().any(|s| s["message"]
            .as_str()
            .unwrap()
            .contains("rank 1 was killed by SIGKILL; replaced in place")),
        "the status names the loss and what was done"
    );
    // What the recovery did, in the final status.
    let r = end["recoveries"].as_array().unwrap();
    assert_eq!(r.len(), 1, "{end}");
    assert_eq!(r[0]["path"], "in-place", "{end}");
    assert_eq!(r[0]["rank"], 1, "{end}");
    assert_eq!(r[0]["steps_lost"], 0, "{end}");
    assert!(r[0]["seconds"].as_f64().is_some_and(|s| s < 30.0), "{end}");
    // No step was trained twice: the gang went on from the step it had reached when rank 1
    // died (at step 110 or later), not from the checkpoint of step 100.
    let after = continued_after(end, 0);
    assert_eq!(after.len(), 1, "one recovery: {after:?}");
    assert!(after[0] >= 110, "continued after step {}", after[0]);
    let replacement = std::fs::read_to_string(
        Path::new(end["logs"].as_str().unwrap()).join("attempt-1/rank-1.replacement-1.log"),
    )
    .unwrap();
    assert!(
        replacement.contains(&format!("resuming from step {}", after[0])),
        "the replacement starts where the survivor was: {replacement}"
    );
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

#[test]
fn in_a_gang_of_three_the_survivors_re_form_with_the_replacement_bit_identically() {
    let _gang = one_gang();
    let three = [("world_size", "3")];
    let (clean_dir, clean) = straight_with(300, &three);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 300, &three);
    // The middle rank: the ring's both neighbours lose it.
    let (code, lines) = run(dir.path(), Some((1, nix::sys::signal::Signal::SIGKILL, 60)));
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(
        (end["restarts"].as_u64(), end["replacements"].as_u64()),
        (Some(0), Some(1)),
        "{end}; causes: {:?}",
        causes(&lines)
    );
    assert_eq!(end["recoveries"][0]["steps_lost"], 0, "{end}");
    // Both survivors continued from the same step.
    let (a, b) = (continued_after(end, 0), continued_after(end, 2));
    assert_eq!(a, b);
    assert!(a.len() == 1 && a[0] >= 60, "{a:?}");
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
}

#[test]
fn a_rank_lost_while_another_is_replaced_restarts_the_gang_from_its_checkpoint_bit_identically() {
    let _gang = one_gang();
    let (clean_dir, clean) = straight(300);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 300, &[("heartbeat_timeout", "\"5s\"")]);
    // Two ranks lost at once: rank 1 dies, rank 0 hangs. Rank 1's replacement cannot be
    // given the state (rank 0, which holds it, never regroups): once rank 0's silence is
    // caught, the gang restarts from its last checkpoint instead of waiting.
    let (code, lines) = run_hitting(
        dir.path(),
        &[
            (1, nix::sys::signal::Signal::SIGKILL),
            (0, nix::sys::signal::Signal::SIGSTOP),
        ],
        110,
    );
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded");
    assert_eq!(end["restarts"], 1, "{end}; causes: {:?}", causes(&lines));
    let paths: Vec<&str> = end["recoveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["in-place", "checkpoint"], "{end}");
    // The in-place attempt did not finish: the restart took over.
    assert_eq!(end["recoveries"][0]["superseded"], true, "{end}");
    assert_eq!(end["recoveries"][1]["superseded"], false, "{end}");
    let msg = causes(&lines).join(" | ");
    assert!(msg.contains("rank 0 sent no heartbeat"), "{msg}");
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

/// Runs the job in `dir`, SIGKILLs rank 1 once the job reaches step 110 and sends `sig` to
/// its replacement as soon as that starts. Returns the exit code and every status line.
fn run_losing_the_replacement(dir: &Path, sig: nix::sys::signal::Signal) -> (i32, Vec<Value>) {
    let mut hunter = None;
    let (code, lines) = run_watching(dir, |s| {
        if hunter.is_none() && s["state"] == "running" && s["step"].as_u64().unwrap() >= 110 {
            let job = s["job"].as_str().unwrap().to_string();
            let pids = trainers(&job, Some(1));
            assert_eq!(pids.len(), 1, "{pids:?}");
            let killed = pids[0];
            signal(killed, nix::sys::signal::Signal::SIGKILL);
            // The replacement: rank 1's next process.
            hunter = Some(std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(60);
                while Instant::now() < until {
                    if let Some(&pid) = trainers(&job, Some(1)).iter().find(|&&p| p != killed) {
                        signal(pid, sig);
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                false
            }));
        }
    });
    assert!(
        hunter.expect("reached step 110").join().unwrap(),
        "no replacement was started"
    );
    (code, lines)
}

/// The recovery paths of the final status, and the last recovery.
fn recovery_paths(end: &Value) -> (Vec<String>, Value) {
    let r = end["recoveries"].as_array().unwrap();
    (
        r.iter()
            .map(|r| r["path"].as_str().unwrap().to_string())
            .collect(),
        r.last().cloned().unwrap_or_default(),
    )
}

#[test]
fn a_replacement_lost_before_it_joins_makes_the_survivor_write_an_emergency_checkpoint_losing_no_step()
 {
    let _gang = one_gang();
    let (clean_dir, clean) = straight(300);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 300, &[]);
    let (code, lines) = run_losing_the_replacement(dir.path(), nix::sys::signal::Signal::SIGKILL);
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded");
    assert_eq!(end["restarts"], 1, "{end}; causes: {:?}", causes(&lines));
    let (paths, r) = recovery_paths(end);
    assert_eq!(paths, ["in-place", "emergency-checkpoint"], "{end}");
    // The survivor's state of the step it held (110 or later, between the checkpoints of 100
    // and 125) was checkpointed and the gang restarted from it: no step trained again.
    assert_eq!(r["steps_lost"], 0, "{end}");
    assert_eq!(r["superseded"], false, "{end}");
    let held = r["step"].as_u64().unwrap();
    assert!(held >= 110, "{end}");
    let msg = causes(&lines).join(" | ");
    assert!(msg.contains("(the replacement started for it)"), "{msg}");
    assert!(
        msg.contains(&format!("emergency checkpoint of step {held}")),
        "{msg}"
    );
    // Attempt 2 resumed from the emergency checkpoint.
    let logs = Path::new(end["logs"].as_str().unwrap());
    let rank0 = std::fs::read_to_string(logs.join("attempt-2/rank-0.log")).unwrap();
    assert!(
        rank0.contains(&format!("resuming from step {held}")),
        "{rank0}"
    );
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

#[test]
fn a_replacement_that_never_joins_is_timed_out_and_the_survivor_checkpoints_what_it_holds() {
    let _gang = one_gang();
    let (clean_dir, clean) = straight(300);
    let dir = tempfile::tempdir().unwrap();
    // A hung replacement: only the gang timeout catches it.
    config(dir.path(), 300, &[("gang_timeout", "\"8s\"")]);
    let (code, lines) = run_losing_the_replacement(dir.path(), nix::sys::signal::Signal::SIGSTOP);
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["restarts"], 1, "{end}; causes: {:?}", causes(&lines));
    let (paths, r) = recovery_paths(end);
    assert_eq!(paths, ["in-place", "emergency-checkpoint"], "{end}");
    assert_eq!(r["steps_lost"], 0, "{end}");
    let msg = causes(&lines).join(" | ");
    assert!(msg.contains("did not join the gang within"), "{msg}");
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

#[test]
fn two_ranks_of_three_lost_at_once_restart_from_the_survivors_emergency_checkpoint() {
    let _gang = one_gang();
    let three = [("world_size", "3")];
    let (clean_dir, clean) = straight_with(300, &three);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 300, &three);
    let (code, lines) = run_hitting(
        dir.path(),
        &[
            (1, nix::sys::signal::Signal::SIGKILL),
            (2, nix::sys::signal::Signal::SIGKILL),
        ],
        60,
    );
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["restarts"], 1, "{end}; causes: {:?}", causes(&lines));
    // The first loss began an in-place recovery; the second made it impossible, and rank 0,
    // the one survivor, checkpointed the step it held (between the checkpoints of 50 and 75).
    let (paths, r) = recovery_paths(end);
    assert_eq!(
        paths.last().map(String::as_str),
        Some("emergency-checkpoint"),
        "{end}"
    );
    assert_eq!(r["steps_lost"], 0, "{end}");
    assert!(r["step"].as_u64().unwrap() >= 60, "{end}");
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

#[test]
fn with_recovery_restart_a_killed_rank_restarts_the_gang_from_its_checkpoint_bit_identically() {
    let _gang = one_gang();
    let (clean_dir, clean) = straight(300);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 300, &[("recovery", "\"restart\"")]);
    let (code, lines) = run(
        dir.path(),
        Some((1, nix::sys::signal::Signal::SIGKILL, 110)),
    );
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded");
    assert_eq!(end["restarts"], 1, "{end}; causes: {:?}", causes(&lines));
    assert_eq!(end["replacements"], 0, "{end}");
    let r = end["recoveries"].as_array().unwrap();
    assert_eq!(r.len(), 1, "{end}");
    assert_eq!(r[0]["path"], "checkpoint", "{end}");
    // The steps since the checkpoint it restarted from (every 25 steps) were trained again.
    let lost = r[0]["steps_lost"].as_u64().unwrap();
    let from = r[0]["step"].as_u64().unwrap() - lost;
    assert!(lost > 0 && from >= 100 && from.is_multiple_of(25), "{end}");
    assert_eq!(end["attempt"], 2);
    assert!(
        lines.iter().any(|s| s["state"] == "restarting"
            && s["message"]
                .as_str()
                .unwrap()
                .contains("rank 1 was killed by SIGKILL")),
        "the restart names its cause"
    );
    // Attempt 2 resumed from the checkpoint before the kill, not from scratch.
    assert!(
        lines
            .iter()
            .any(|s| s["attempt"] == 2 && s["last_checkpoint"].as_u64().is_some_and(|c| c >= 100)),
    );
    assert_identical(clean_dir.path(), &clean, dir.path(), end);
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

#[test]
fn a_hung_rank_is_detected_by_heartbeat_killed_and_replaced_in_place() {
    let _gang = one_gang();
    let dir = tempfile::tempdir().unwrap();
    // The ring's timeout is far longer than the heartbeat's: only the heartbeat can catch it.
    config(
        dir.path(),
        300,
        &[
            ("heartbeat_timeout", "\"5s\""),
            ("collective_timeout", "\"60s\""),
        ],
    );
    let started = Instant::now();
    let (code, lines) = run(
        dir.path(),
        Some((0, nix::sys::signal::Signal::SIGSTOP, 110)),
    );
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded");
    assert_eq!(end["restarts"], 0, "{end}; causes: {:?}", causes(&lines));
    assert_eq!(end["replacements"], 1, "{end}");
    let msg = lines
        .iter()
        .filter_map(|s| s["message"].as_str())
        .find(|m| m.contains("replaced in place"))
        .expect("a replacement");
    assert!(msg.contains("rank 0 sent no heartbeat for 5s"), "{msg}");
    // Rank 1 held the state and continued from where the gang was when rank 0 stopped.
    let after = continued_after(end, 1);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0] >= 110, "continued after step {}", after[0]);
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "well within the ring's 60 s"
    );
    // The stopped process was killed with its gang, not left behind.
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

#[test]
fn past_max_restarts_the_job_fails_with_the_cause() {
    let _gang = one_gang();
    let dir = tempfile::tempdir().unwrap();
    config(
        dir.path(),
        300,
        &[("max_restarts", "0"), ("recovery", "\"restart\"")],
    );
    let (code, lines) = run(dir.path(), Some((1, nix::sys::signal::Signal::SIGKILL, 60)));
    let end = last(&lines);
    assert_eq!(code, 1, "{end}");
    assert_eq!(end["state"], "failed");
    let msg = end["message"].as_str().unwrap();
    assert!(
        msg.contains("rank 1 was killed by SIGKILL") && msg.contains("gave up after 0 restarts"),
        "{msg}"
    );
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

struct Server {
    child: Child,
    url: String,
    data: PathBuf,
    metrics: u16,
}

impl Server {
    fn start(dir: &Path, port: u16) -> Server {
        let data = dir.join("coordinator");
        let metrics = free_port();
        let child = lockstep(dir)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics}"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            data,
            metrics,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn cli(&self, dir: &Path, args: &[&str]) -> (i32, String) {
        let out = lockstep(dir)
            .args(args)
            .arg("--coordinator")
            .arg(&self.url)
            .arg("--data-dir")
            .arg(&self.data)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn status(&self, dir: &Path, job: &str) -> Value {
        let (code, out) = self.cli(dir, &["status", job, "--json"]);
        assert_eq!(code, 0, "{out}");
        serde_json::from_str(out.trim()).unwrap()
    }

    fn wait_for(&self, dir: &Path, job: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.status(dir, job);
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "waiting for {what}: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Server {
    /// `GET /metrics`.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cancel_tears_the_gang_down_and_a_killed_coordinator_loses_no_job() {
    let _gang = one_gang();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d, 3000, &[]);
    let port = free_port();
    let server = Server::start(d, port);

    // Unauthenticated calls are refused.
    let (code, out) = server.cli(d, &["status", "--token", "wrong"]);
    assert_eq!(code, 1);
    assert!(out.contains("token"), "{out}");

    // (d) cancel.
    let (code, out) = server.cli(d, &["submit", "job.toml"]);
    assert_eq!(code, 0, "{out}");
    let job = out.lines().next().unwrap().trim().to_string();
    server.wait_for(d, &job, "running", |s| {
        s["state"] == "running" && s["step"].as_u64() > Some(5)
    });
    assert_eq!(trainers(&job, None).len(), 2);
    // One live job per checkpoint URL: a second submit (to this coordinator) and a `lockstep
    // run` (another coordinator) of the same config are refused, naming the job holding it.
    let (code, out) = server.cli(d, &["submit", "job.toml"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("in use by job {job}")), "{out}");
    let err = refused(d);
    assert!(err.contains(&format!("in use by job {job}")), "{err}");
    let (code, out) = server.cli(d, &["cancel", &job]);
    assert_eq!(code, 0, "{out}");
    let end = server.wait_for(d, &job, "cancelled", |s| s["state"] == "cancelled");
    assert!(
        trainers(&job, None).is_empty(),
        "cancel left workers behind"
    );
    // The gang was asked to stop first: it checkpointed the step it stopped at.
    assert_eq!(end["last_checkpoint"], end["step"], "{end}");
    assert!(end["step"].as_u64() > Some(5));
    // `watch` from a client with another data dir names the coordinator's log directory.
    let logs = server.data.join("jobs").join(&job);
    assert_eq!(end["logs"], logs.display().to_string(), "{end}");
    let token = std::fs::read_to_string(server.data.join("admin.token")).unwrap();
    let out = lockstep(d)
        .args([
            "watch",
            &job,
            "--coordinator",
            &server.url,
            "--token",
            token.trim(),
        ])
        .arg("--data-dir")
        .arg(d.join("elsewhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("worker logs: {}", logs.display())),
        "{err}"
    );

    // Persistence: kill -9 the coordinator between two checkpoints; its workers lose it, so
    // they checkpoint the step they are at (rank 0 commits it through the store) and go; a
    // new coordinator finds the job in its store and restarts it from that step.
    std::fs::remove_dir_all(d.join("ckpt")).ok();
    config(d, 600, &[("heartbeat_timeout", "\"3s\"")]);
    let (code, out) = server.cli(d, &["submit", "job.toml"]);
    assert_eq!(code, 0, "{out}");
    let job = out.lines().next().unwrap().trim().to_string();
    let seen = server.wait_for(d, &job, "a step between checkpoints", |s| {
        s["last_checkpoint"].as_u64().is_some_and(|c| c >= 100)
            && s["step"]
                .as_u64()
                .is_some_and(|t| (5..20).contains(&(t % 25)))
    });
    let logs = server.data.join("jobs").join(&job);
    drop(server); // SIGKILL
    let deadline = Instant::now() + Duration::from_secs(30);
    while !trainers(&job, None).is_empty() {
        assert!(
            Instant::now() < deadline,
            "workers outlived their coordinator"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kept = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let url = format!("file://{}/ckpt", d.display());
        let store = lockstep_storage::CheckpointStore::open(&url).unwrap();
        rt.block_on(store.latest()).unwrap().unwrap()
    };
    assert!(
        kept >= seen["step"].as_u64().unwrap(),
        "the newest checkpoint, {kept}, is older than the step seen before the kill: {seen}"
    );
    let rank0 = std::fs::read_to_string(logs.join("attempt-1/rank-0.log")).unwrap();
    assert!(
        rank0.contains(&format!(
            "lost the coordinator; rank 0 committed checkpoint {kept} of the step it stopped at"
        )),
        "{rank0}"
    );
    let server = Server::start(d, port);
    let end = server.wait_for(d, &job, "the end", |s| {
        matches!(
            s["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
    });
    assert_eq!(end["state"], "succeeded", "{end}");
    assert!(end["attempt"].as_u64() >= Some(2), "{end}");
    let rank0 = std::fs::read_to_string(logs.join("attempt-2/rank-0.log")).unwrap();
    assert!(
        rank0.contains(&format!("resuming from step {kept} of")),
        "attempt 2 did not resume from the step the workers kept: {rank0}"
    );
    let r = &end["recoveries"][0];
    assert_eq!(
        (r["path"].as_str(), r["steps_lost"].as_u64()),
        (Some("emergency-checkpoint"), Some(0)),
        "{end}"
    );
    assert!(
        r["cause"]
            .as_str()
            .is_some_and(|c| c.contains(&format!("its workers checkpointed step {kept}"))),
        "{end}"
    );
    let m = server.metrics();
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    for name in [
        "lockstep_steps_total",
        "lockstep_checkpoints_total",
        "lockstep_restarts_total",
        "lockstep_replacements_total",
        "lockstep_gang_wait_seconds_total",
        &format!("lockstep_job_step{{job=\"{job}\",state=\"succeeded\"}} 600"),
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }

    let (clean_dir, clean) = {
        let dir = tempfile::tempdir().unwrap();
        config(dir.path(), 600, &[]);
        let (code, lines) = run(dir.path(), None);
        assert_eq!(code, 0);
        let end = last(&lines).clone();
        (dir, end)
    };
    assert_eq!(end["params_hash"], clean["params_hash"]);
    let (a, b) = (final_tensors(clean_dir.path()), final_tensors(d));
    assert!(
        a == b,
        "the resumed job's checkpoint differs from a clean run's"
    );
}

/// `lockstep run` killed with SIGKILL between two checkpoints: its workers checkpoint the step
/// they are at (rank 0 commits it) and go; running it again takes the checkpoint URL over at
/// once instead of being refused until the dead run's lease expires, resumes from that step,
/// and ends bit-identical to a run never killed.
#[test]
fn a_lockstep_run_killed_and_run_again_loses_no_step() {
    let _gang = one_gang();
    let (clean_dir, clean) = straight(300);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d, 300, &[]);
    let mut seen: Option<Value> = None;
    run_watching_pid(d, |s, run| {
        if seen.is_none()
            && s["state"] == "running"
            && s["last_checkpoint"].as_u64().is_some_and(|c| c >= 100)
            && s["step"]
                .as_u64()
                .is_some_and(|t| (5..20).contains(&(t % 25)))
        {
            seen = Some(s.clone());
            signal(run, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let seen = seen.expect("the run reached a step between two checkpoints");

    let (code, lines) = run(d, None);
    assert_eq!(code, 0, "{:?}", last(&lines));
    let first = lines
        .iter()
        .find(|s| s["state"] == "running")
        .expect("the rerun ran");
    assert!(
        first["last_checkpoint"].as_u64() >= seen["step"].as_u64(),
        "the rerun started from checkpoint {} although the killed run was at step {}",
        first["last_checkpoint"],
        seen["step"]
    );
    assert_identical(clean_dir.path(), &clean, d, last(&lines));
}

/// An error a restart cannot fix (here: a base model whose config.json is not one) fails the
/// job at once, with the worker's own message in the job's status, instead of being retried
/// `max_restarts` times and reported as a bare exit status.
#[test]
fn a_worker_error_that_would_repeat_fails_the_job_at_once_with_its_message() {
    let _gang = one_gang();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken-model");
    std::fs::create_dir(&broken).unwrap();
    // A config.json the preflight accepts; the weights only a worker reads.
    std::fs::write(
        broken.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 256, "num_attention_heads": 4}"#,
    )
    .unwrap();
    std::fs::write(broken.join("model.safetensors"), "not safetensors").unwrap();
    let job = TestJob::tiny("e2e")
        .world(2)
        .steps(20)
        .set("job.max_restarts", 3)
        .set("model.base", format!("\"file://{}\"", broken.display()));
    job.write_to(dir.path());
    let (code, lines) = run(dir.path(), None);
    let end = last(&lines);
    assert_eq!(code, 1, "{end}");
    assert_eq!(end["state"], "failed", "{end}");
    assert_eq!(end["restarts"], 0, "not retried: {end}");
    let msg = end["message"].as_str().unwrap();
    assert!(
        msg.contains("broken-model") && msg.contains("not restarted"),
        "the worker's own error reaches the user: {msg}"
    );
    assert!(trainers(end["job"].as_str().unwrap(), None).is_empty());
}

/// `lockstep run job.toml` in `dir` refuses the job before starting anything: exit status 1,
/// no status line. Returns what it printed on stderr.
fn refused(dir: &Path) -> String {
    let out = lockstep(dir)
        .args(["run", "job.toml", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "a job was started: {err}");
    err
}

/// Every duration and count of a config is bounded: a timeout that would overflow the
/// supervisor's clock is refused up front, naming the field and the limit.
#[test]
fn absurd_config_values_are_refused_before_anything_starts() {
    let _gang = one_gang();
    let dir = tempfile::tempdir().unwrap();
    config(
        dir.path(),
        10,
        &[("gang_timeout", "\"9223372036854775807s\"")],
    );
    let err = refused(dir.path());
    assert!(
        err.contains("job.gang_timeout") && err.contains("between 1s and 7days"),
        "{err}"
    );

    // Inputs that do not exist are refused up front, naming the field.
    let missing = dir.path().join("no-such-model");
    TestJob::tiny("e2e")
        .set("model.base", format!("\"file://{}\"", missing.display()))
        .write_to(dir.path());
    let err = refused(dir.path());
    assert!(
        err.contains("model.base") && err.contains("config.json not found"),
        "{err}"
    );
    // A base whose config.json training would refuse, or whose config.json is a FIFO, is
    // refused before any worker starts (and the FIFO is never opened).
    let base = dir.path().join("mistral");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(
        base.join("config.json"),
        r#"{"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 256, "num_attention_heads": 4}"#,
    )
    .unwrap();
    std::fs::write(base.join("model.safetensors"), b"").unwrap();
    TestJob::tiny("e2e")
        .set("model.base", format!("\"file://{}\"", base.display()))
        .write_to(dir.path());
    let err = refused(dir.path());
    assert!(
        err.contains("model_type `mistral` is not supported"),
        "{err}"
    );
    std::fs::remove_file(base.join("config.json")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(base.join("config.json"))
        .status()
        .unwrap();
    assert!(made.success());
    let started = Instant::now();
    let err = refused(dir.path());
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let glob = format!("\"file://{}/nothing-*.jsonl\"", dir.path().display());
    TestJob::tiny("e2e")
        .set("data.train", format!("[{glob}]"))
        .write_to(dir.path());
    let err = refused(dir.path());
    assert!(
        err.contains("data.train[0]") && err.contains("matches no object"),
        "{err}"
    );

    // A promoted version that leaves its lineage (a damaged latest.json) is refused up front,
    // not retried as if a restart could fix it.
    let lineage = dir.path().join("lineage");
    std::fs::create_dir_all(&lineage).unwrap();
    std::fs::write(
        lineage.join("latest.json"),
        r#"{"version": "../elsewhere"}"#,
    )
    .unwrap();
    TestJob::tiny("e2e")
        .set(
            "model.base",
            format!("\"latest-export:file://{}\"", lineage.display()),
        )
        .write_to(dir.path());
    let err = refused(dir.path());
    assert!(
        err.contains("model.base") && err.contains("does not name a version"),
        "{err}"
    );

    // A gang this machine cannot hold is refused with the numbers, before any process starts.
    config(dir.path(), 10, &[("world_size", "4000")]);
    let err = refused(dir.path());
    assert!(
        err.contains("each of job.world_size = 4000 local ranks (this machine has")
            && err.contains("; or job.world_size = "),
        "{err}"
    );
}

/// A job with an `[export]` section ends `exported`: its final checkpoint is a promoted
/// version of its lineage; a worse run of the same lineage is exported but kept out of
/// `latest.json`, saying why; an export that cannot be written fails the job naming it, with
/// the trained checkpoint left committed.
#[test]
fn a_finished_job_is_exported_and_only_improvements_are_promoted() {
    let _gang = one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let export = format!("file://{}/export", tmp.path().display());
    let job = |dir: &Path, steps: u64, url: &str| {
        std::fs::create_dir_all(dir).unwrap();
        TestJob::tiny("lineage")
            .world(2)
            .steps(steps)
            .set("train.warmup_steps", 2)
            .set("checkpoint.every_steps", steps)
            .set("data.eval", eval_data())
            .set("export.url", format!("\"{url}\""))
            .write_to(dir);
    };
    // 60 steps: the first version, promoted.
    let a = tmp.path().join("a");
    job(&a, 60, &export);
    let (code, lines) = run(&a, None);
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "exported", "{end}");
    let msg = end["message"].as_str().unwrap();
    assert!(msg.contains("promoted (the first)"), "{msg}");
    let latest: Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("export/lineage/latest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(latest["step"], 60);
    assert_eq!(latest["eval_loss"], end["eval_loss"]);
    // 3 steps: a worse eval loss; exported, not promoted.
    let b = tmp.path().join("b");
    job(&b, 3, &export);
    let (code, lines) = run(&b, None);
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "exported", "{end}");
    let msg = end["message"].as_str().unwrap();
    assert!(
        msg.contains("kept, not promoted") && msg.contains("eval loss"),
        "{msg}"
    );
    let after: Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("export/lineage/latest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(after["version"], latest["version"]);
    // An export root that cannot be written: failed, naming the export.
    let c = tmp.path().join("c");
    std::fs::write(tmp.path().join("not-a-dir"), b"").unwrap();
    job(
        &c,
        3,
        &format!("file://{}/not-a-dir/x", tmp.path().display()),
    );
    let (code, lines) = run(&c, None);
    let end = last(&lines);
    assert_eq!(code, 1, "{end}");
    assert_eq!(end["state"], "failed", "{end}");
    let msg = end["message"].as_str().unwrap();
    assert!(
        msg.contains("export failed") && msg.contains("not-a-dir"),
        "{msg}"
    );
    assert_eq!(end["last_checkpoint"], 3, "{end}");
}

/// `serve` keeps no admin token others could have read: a token file readable by others (or
/// not a plain file) is refused at start, naming it.
#[test]
fn serve_refuses_an_admin_token_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    std::fs::create_dir_all(&data).unwrap();
    let token = data.join("admin.token");
    std::fs::write(&token, "x".repeat(64)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = lockstep(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with a token file others can read");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("admin.token") && err.contains("readable by others"),
        "{err}"
    );

    // Endless files given by mistake are refused, not read into memory.
    let out = lockstep(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/dev/zero",
        ])
        .args(["--tls-key", "/dev/zero", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/dev/zero: larger than 4 MiB"),
        "{err}"
    );
    let out = lockstep(dir.path())
        .args(["run", "/dev/zero"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/dev/zero: larger than 4 MiB"),
        "{err}"
    );

    // Mode 600: it starts, and `localhost:PORT` is a listen address.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let mut child = lockstep(dir.path())
        .args([
            "serve",
            "--listen",
            &format!("localhost:{port}"),
            "--data-dir",
        ])
        .arg(&data)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(
            Instant::now() < deadline,
            "serve did not listen on localhost:{port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A config saved with a UTF-8 byte order mark (Windows editors) reads like any other.
#[test]
fn a_config_with_a_byte_order_mark_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TestJob::tiny("bom").write_to(dir.path());
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("\u{feff}{text}")).unwrap();
    let out = lockstep(dir.path())
        .args([
            "render",
            "job.toml",
            "--namespace",
            "ml",
            "--shared-volume",
            "data:/data",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Floats as YAML 1.1 (PyYAML) reads them: `1.0e-8`, not `1e-8` (a string there).
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        yaml.contains("eps: 1.0e-8") && !yaml.contains(": 1e-8"),
        "{yaml}"
    );
    // A namespace Kubernetes would refuse is refused here, naming the flag.
    let out = lockstep(dir.path())
        .args([
            "render",
            "job.toml",
            "--namespace",
            "Bad_NS",
            "--shared-volume",
            "data:/data",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--namespace: metadata.namespace `Bad_NS`"),
        "{err}"
    );
}

/// Ctrl-C while the data is being tokenised: `lockstep run` has said what the ranks are doing
/// (tokenising, or waiting for the rank that does), and it stops at once — not after the
/// collective timeout — without finishing the store or leaving a half-built one behind.
#[test]
fn ctrl_c_while_tokenising_stops_at_once_and_leaves_nothing_half_built() {
    use std::io::{BufRead, BufReader, Write};
    let _gang = one_gang();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 64 MB of text: seconds of tokenising, eight 8 MiB ranges.
    let data = d.join("big.jsonl");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
    let line = format!("{{\"text\":\"{}\"}}\n", "lockstep ".repeat(110));
    for _ in 0..(64 << 20) / line.len() {
        w.write_all(line.as_bytes()).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    TestJob::tiny("tok")
        .world(2)
        .steps(5)
        .set("data.train", format!("[\"file://{}\"]", data.display()))
        .set("job.gang_timeout", "\"60s\"")
        .write_to(d);
    let mut child = lockstep(d)
        .args(["run", "job.toml", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut doing = String::new();
    for line in out.by_ref() {
        let s: Value = serde_json::from_str(&line.unwrap()).unwrap();
        assert_ne!(s["state"], "failed", "{s}");
        if let Some(d) = s["doing"].as_str().filter(|d| d.contains("tokenis")) {
            doing = d.to_string();
            break;
        }
    }
    assert!(doing.starts_with("rank "), "never said it was tokenising");
    let interrupted = Instant::now();
    signal(child.id() as i32, nix::sys::signal::Signal::SIGINT);
    let lines: Vec<Value> = out
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let code = child.wait().unwrap().code();
    let took = interrupted.elapsed();
    assert_eq!(code, Some(130), "{:?}", lines.last());
    assert_eq!(last(&lines)["state"], "cancelled", "{:?}", lines.last());
    // Before the fix the ranks finished tokenising first and waited out a 60 s timeout.
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");
    assert!(trainers(last(&lines)["job"].as_str().unwrap(), None).is_empty());
    // Nothing half-built, and no store finished after the stop.
    let tokens = d.join(".lockstep/tokens");
    let left: Vec<String> = std::fs::read_dir(&tokens)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left in the token cache: {left:?}");
}

/// A FIFO named as the config is read as what its writer writes (`lockstep run <(…)` works)
/// and, with no writer, as empty: refused naming the file, never a hang.
#[test]
fn a_fifo_config_without_a_writer_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("job.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut child = lockstep(dir.path())
        .args(["run", "job.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`lockstep run FIFO` hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("job.toml: a pipe that delivered nothing"),
        "{err}"
    );
}

/// `lockstep train` on the quickstart data compressed (`.jsonl.zst`, `.jsonl.gz`) ends with
/// the parameters it ends with on the plain file.
#[test]
fn compressed_training_data_trains_to_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/data/quickstart.jsonl")
        .canonicalize()
        .unwrap();
    let text = std::fs::read(&plain).unwrap();
    std::fs::write(d.join("q.jsonl.zst"), zstd_frame(&text)).unwrap();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&text).unwrap();
        e.finish().unwrap()
    };
    std::fs::write(d.join("q.jsonl.gz"), gz).unwrap();
    let hash = |data: &Path, ckpt: &str| {
        TestJob::tiny("zip")
            .steps(2)
            .set("data.train", format!("[\"file://{}\"]", data.display()))
            .set("checkpoint.url", format!("\"file://{ckpt}\""))
            .write_to(d);
        let out = lockstep(d)
            .args([
                "train",
                "--config",
                "job.toml",
                "--no-progress",
                "--data-cache",
                "cache",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.rsplit_once("params xxh3 ")
            .map(|(_, h)| h.trim().to_string())
            .unwrap_or_else(|| panic!("no params hash: {text}"))
    };
    let want = hash(&plain, "ck-plain");
    assert_eq!(hash(&d.join("q.jsonl.zst"), "ck-zst"), want);
    assert_eq!(hash(&d.join("q.jsonl.gz"), "ck-gz"), want);
}

/// Parquet data (other column names, mapped back by `[data.columns]`; row groups of 500, zstd)
/// trains to the parameters the same records in JSONL train to; so does a chat Parquet file
/// (a list-of-structs column) against its JSONL. A file with no mapped column is refused
/// saying which columns it has.
#[test]
fn parquet_training_data_trains_to_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../trainer/tests/fixtures")
        .canonicalize()
        .unwrap();
    let repo = fixtures.join("../../..").canonicalize().unwrap();
    let train = |data: &Path, ckpt: &str, extra: &[(&str, String)]| {
        let mut job = TestJob::tiny("pq")
            .steps(2)
            .set("data.train", format!("[\"file://{}\"]", data.display()))
            .set("checkpoint.url", format!("\"file://{ckpt}\""));
        for (k, v) in extra {
            job = job.set(k, v);
        }
        job.write_to(d);
        let out = lockstep(d)
            .args(["train", "--config", "job.toml", "--no-progress"])
            .args(["--data-cache", "cache"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let hash = |(ok, text): (bool, String)| {
        assert!(ok, "{text}");
        text.rsplit_once("params xxh3 ")
            .map(|(_, h)| h.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("no params hash: {text}"))
    };
    let columns = (
        "data.columns",
        r#"{ text = "body", prompt = "question", completion = "answer" }"#.to_string(),
    );
    let want = hash(train(
        &repo.join("configs/data/quickstart.jsonl"),
        "ck-a",
        &[],
    ));
    let got = hash(train(
        &fixtures.join("parquet/quickstart.parquet"),
        "ck-b",
        std::slice::from_ref(&columns),
    ));
    assert_eq!(got, want);
    // Chats: the Llama 3-style chat base, messages from a list-of-structs column.
    let base = (
        "model.base",
        format!(
            "\"{}\"",
            repo.join("configs/models/llama3-chat-tiny").display()
        ),
    );
    let want = hash(train(
        &fixtures.join("parquet/chat.jsonl"),
        "ck-c",
        std::slice::from_ref(&base),
    ));
    let got = hash(train(
        &fixtures.join("parquet/chat.parquet"),
        "ck-d",
        &[
            base,
            ("data.columns", r#"{ messages = "conversation" }"#.into()),
        ],
    ));
    assert_eq!(got, want);
    // Unmapped columns: refused, naming the ones the file has.
    let (ok, text) = train(&fixtures.join("parquet/quickstart.parquet"), "ck-e", &[]);
    assert!(!ok);
    assert!(
        text.contains("id, body, question, answer") && text.contains("[data.columns]"),
        "{text}"
    );
    // A number column read as text is refused, not read as its digits or base64.
    let (ok, text) = train(
        &fixtures.join("parquet/quickstart.parquet"),
        "ck-f",
        &[("data.columns", r#"{ text = "id" }"#.into())],
    );
    assert!(!ok);
    assert!(
        text.contains("column `id` (read as `text`) is not a string column"),
        "{text}"
    );
    // A FIFO named as data is refused, never opened (it would wait for a writer forever).
    let fifo = d.join("x.parquet");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (ok, text) = train(&fifo, "ck-g", &[]);
    assert!(!ok);
    assert!(text.contains("not a regular file"), "{text}");
}

fn zstd_frame(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// `lockstep train --config` reads a bounded config: `/dev/zero` is refused by its size, not
/// read until memory runs out.
#[test]
fn train_refuses_an_endless_config_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = lockstep(dir.path())
        .args(["train", "--config", "/dev/zero"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("/dev/zero: larger than 4 MiB"), "{err}");

    // A FIFO nobody writes to: refused at once, saying so (not "missing field job").
    let fifo = dir.path().join("job.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = lockstep(dir.path())
        .args(["train", "--config"])
        .arg(&fifo)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("a pipe that delivered nothing"), "{err}");
}

/// A checkpoint that fails under a coordinator (a file where its step directory must go) does
/// not restart the gang: training goes on, the next checkpoint commits, and the job's status
/// (`run --json`, `status`, metrics) counts the failure and says why.
#[test]
fn a_failed_checkpoint_shows_in_the_status_and_the_job_goes_on() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d, 50, &[]);
    std::fs::create_dir_all(d.join("ckpt")).unwrap();
    std::fs::write(d.join("ckpt/step-000000000025"), b"in the way").unwrap();
    let out = crate::common::lockstep(d)
        .args(["run", "job.toml", "--json"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let end = crate::common::last(&lines);
    assert_eq!(out.status.code(), Some(0), "{end}");
    assert_eq!(end["restarts"], 0, "{end}");
    assert_eq!(end["last_checkpoint"], 50, "{end}");
    assert_eq!(end["checkpoint_failures"], 1, "{end}");
    let why = end["checkpoint_error"].as_str().unwrap();
    assert!(why.starts_with("step 25: "), "{why}");
}
