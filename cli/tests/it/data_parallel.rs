//! Data-parallel training with real `lockstep train` processes on loopback: replicas stay
//! byte-identical, W ranks × batch b follow 1 rank × batch W·b, a killed rank is an error on
//! the others within the collective timeout, and checkpoints resume at the same or another
//! world size.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockstep_api::testing::TestJob;

fn config(dir: &Path, steps: u64, world: usize, batch: usize) -> PathBuf {
    let job = TestJob::tiny("dp-test")
        .world(world as u32)
        .steps(steps)
        .batch(batch as u32)
        .set("job.collective_timeout", "\"5s\"")
        .set("data.eval", eval_data())
        .set("train.eval_every", 3)
        .checkpoint_url(&format!("file://{}/ckpt", dir.display()));
    let path = dir.join(format!("job-w{world}.toml"));
    std::fs::write(&path, job.toml()).unwrap();
    path
}

fn free_peers(world: usize) -> Vec<String> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

fn spawn(cfg: &Path, rank: usize, peers: &[String], args: &[&str]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    c.arg("train")
        .arg("--config")
        .arg(cfg)
        .arg("--no-progress")
        .args(args)
        .arg("--data-cache")
        .arg(cfg.parent().unwrap().join("tokens"));
    if peers.len() > 1 {
        c.arg("--rank")
            .arg(rank.to_string())
            .arg("--peers")
            .arg(peers.join(","));
    }
    c.env("LOCKSTEP_LOG", "info")
        .arg("--log-format")
        .arg("json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// Runs a gang of `world` ranks to completion.
fn gang(cfg: &Path, world: usize, args: &[&str]) -> Vec<Output> {
    let peers = free_peers(world);
    let children: Vec<Child> = (0..world).map(|r| spawn(cfg, r, &peers, args)).collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            if !out.status.success() {
                eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            }
            out
        })
        .collect()
}

/// The quickstart's held-out split.
fn eval_data() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data/quickstart-eval.jsonl");
    format!("[\"file://{}\"]", p.canonicalize().unwrap().display())
}

/// (step, eval loss) of every `evaluated` event in a JSON log.
fn eval_losses(out: &Output) -> Vec<(u64, f64)> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "evaluated")
        .map(|v| {
            (
                v["fields"]["step"].as_u64().unwrap(),
                v["fields"]["eval_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn params_hash(out: &Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout);
    s.split("params xxh3 ")
        .nth(1)
        .unwrap_or_else(|| panic!("no hash in {s}"))
        .trim()
        .to_string()
}

/// (step, loss) of every `step` event in a JSON log.
fn losses(out: &Output) -> Vec<(u64, f64)> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "step")
        .map(|v| {
            (
                v["fields"]["step"].as_u64().unwrap(),
                v["fields"]["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn replicas_stay_identical_and_match_one_rank_with_the_whole_batch() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let two = gang(&config(dir.path(), 6, 2, 2), 2, &["--resume", "none"]);
    assert!(two.iter().all(|o| o.status.success()));
    assert_eq!(
        params_hash(&two[0]),
        params_hash(&two[1]),
        "replicas diverged"
    );
    // The two ranks of this machine tokenised each data set (training and held-out) once,
    // into one shared store each.
    let built: usize = two
        .iter()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .matches("tokenised data into the token store")
                .count()
        })
        .sum();
    assert_eq!(built, 2, "each data set is tokenised by one rank");
    let stores = std::fs::read_dir(dir.path().join("tokens"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(stores, 2);

    let one_dir = tempfile::tempdir().unwrap();
    let one = gang(&config(one_dir.path(), 6, 1, 4), 1, &[]);
    assert!(one[0].status.success());
    let (a, b) = (losses(&two[0]), losses(&one[0]));
    assert_eq!(a.len(), 6);
    assert_eq!(a, losses(&two[1]), "ranks report different losses");
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            ((x - y) / y).abs() < 1e-5,
            "step {step}: W=2×2 loss {x}, W=1×4 loss {y}"
        );
    }
    // The held-out loss, after steps 3 and 6: the same bits on both ranks, and what one rank
    // measures on the whole set.
    let (e2, e1) = (eval_losses(&two[0]), eval_losses(&one[0]));
    assert_eq!(e2.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 6]);
    assert_eq!(
        e2,
        eval_losses(&two[1]),
        "ranks measured different eval losses"
    );
    for ((step, x), (_, y)) in e2.iter().zip(&e1) {
        assert!(
            ((x - y) / y).abs() < 1e-5,
            "step {step}: W=2 eval loss {x}, W=1 eval loss {y}"
        );
    }
}

#[test]
fn killing_a_rank_fails_the_others_within_the_timeout() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 100_000, 2, 2);
    let peers = free_peers(2);
    let mut survivor = spawn(&cfg, 0, &peers, &[]);
    let mut victim = spawn(&cfg, 1, &peers, &[]);
    let lines = BufReader::new(victim.stderr.take().unwrap()).lines();
    for line in lines {
        if line.unwrap().contains("\"message\":\"step\"") {
            break;
        }
    }
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let killed = Instant::now();
    let out = loop {
        if let Some(_status) = survivor.try_wait().unwrap() {
            break survivor.wait_with_output().unwrap();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "rank 0 still running 30 s after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Status 4: "a peer broke the ring" (a coordinator then reports the peer's own failure).
    assert_eq!(
        out.status.code(),
        Some(i32::from(lockstep_api::EXIT_PEER_LOST))
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("collective") && err.contains("rank 1"),
        "{err}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
}

#[test]
fn checkpoints_resume_at_the_same_and_at_another_world_size() {
    let _gang = crate::common::one_gang();
    let straight = tempfile::tempdir().unwrap();
    let a = gang(&config(straight.path(), 8, 2, 2), 2, &[]);
    assert!(a.iter().all(|o| o.status.success()));

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 8, 2, 2);
    let stopped = gang(&cfg, 2, &["--stop-at", "4"]);
    assert!(stopped.iter().all(|o| o.status.success()));
    let resumed = gang(&cfg, 2, &[]);
    assert!(resumed.iter().all(|o| o.status.success()));
    assert!(String::from_utf8_lossy(&resumed[1].stderr).contains("resuming from step 4"));
    assert_eq!(
        params_hash(&resumed[0]),
        params_hash(&a[0]),
        "resume at W=2 diverged"
    );

    // Resuming an older step under newer ones is refused up front.
    let refused = gang(&config(dir.path(), 8, 1, 4), 1, &["--resume", "4"]);
    assert_eq!(refused[0].status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused[0].stderr).contains("newer checkpoints"));

    // The W=2 step-4 checkpoint, copied, at one rank with the whole batch: training goes on.
    let fork = tempfile::tempdir().unwrap();
    let from = dir.path().join("ckpt/step-000000000004");
    let to = fork.path().join("ckpt/step-000000000004");
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(&from).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
    let one = gang(&config(fork.path(), 8, 1, 4), 1, &[]);
    assert!(one[0].status.success());
    let l = losses(&one[0]);
    assert_eq!(l.first().map(|x| x.0), Some(5));
    assert!(l.iter().all(|(_, x)| x.is_finite() && *x < 6.0), "{l:?}");
}

/// `checkpoint.every`: time-based checkpoints beside `every_steps`, decided on rank 0's clock
/// and agreed by the gang, so both ranks checkpoint the same steps (a disagreement could not
/// commit); they change nothing about the results.
#[test]
fn time_based_checkpoints_are_agreed_by_the_gang() {
    let _gang = crate::common::one_gang();
    const STEPS: u64 = 600;
    let job = |dir: &Path| {
        TestJob::tiny("dp-test")
            .world(2)
            .steps(STEPS)
            .batch(2)
            .set("job.collective_timeout", "\"60s\"")
            .set("checkpoint.every_steps", 100_000)
            .set("checkpoint.keep_last", 1000)
            .checkpoint_url(&format!("file://{}/ckpt", dir.display()))
    };
    // A gang whose logs go to files (hundreds of steps' log lines would fill a pipe that is
    // read only after the other rank exits).
    let quiet_gang = |cfg: &Path| -> Vec<Output> {
        let peers = free_peers(2);
        let children: Vec<Child> = (0..2)
            .map(|r| {
                let log =
                    std::fs::File::create(cfg.with_extension(format!("rank{r}.log"))).unwrap();
                Command::new(env!("CARGO_BIN_EXE_lockstep"))
                    .args(["train", "--no-progress", "--config"])
                    .arg(cfg)
                    .arg("--data-cache")
                    .arg(cfg.parent().unwrap().join("tokens"))
                    .args(["--rank", &r.to_string(), "--peers", &peers.join(",")])
                    .stdout(Stdio::piped())
                    .stderr(log)
                    .spawn()
                    .unwrap()
            })
            .collect();
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect()
    };
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = quiet_gang(&job(plain_dir.path()).write_to(plain_dir.path()));
    assert!(plain.iter().all(|o| o.status.success()));

    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path())
        .set("checkpoint.every", "\"1s\"")
        .write_to(dir.path());
    let started = Instant::now();
    let timed = quiet_gang(&cfg);
    let took = started.elapsed();
    assert!(timed.iter().all(|o| o.status.success()));
    assert_eq!(params_hash(&timed[0]), params_hash(&plain[0]));
    assert_eq!(params_hash(&timed[1]), params_hash(&plain[0]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store =
        lockstep_storage::CheckpointStore::open(&format!("file://{}/ckpt", dir.path().display()))
            .unwrap();
    let steps = rt.block_on(store.list()).unwrap();
    eprintln!("checkpoints {steps:?} in {took:?}");
    assert_eq!(steps.last(), Some(&STEPS), "{steps:?}");
    // Every second one (the first after a second of training at the earliest).
    let most = took.as_secs() + 1;
    assert!(steps.len() as u64 <= most + 1, "{steps:?} in {took:?}");
    // Starting the gang is part of `took`; when the whole run took this long, its training
    // loop ran well past a second on any machine seen so far.
    if took >= Duration::from_secs(4) {
        assert!(
            steps.len() >= 2,
            "no time-based checkpoint in {took:?}: {steps:?}"
        );
    }
    for s in steps {
        rt.block_on(store.load(s)).unwrap();
    }
}
