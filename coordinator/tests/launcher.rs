//! The local launcher kills a worker with everything it started: no orphan survives.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use lockstep_coordinator::launcher::{Launcher, LocalProcess, WorkerSpec};

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn killing_a_worker_kills_its_children_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A "trainer" that starts a child of its own (as a data loader or a shell wrapper would),
    // writes both pids, and waits.
    let script = d.join("fake-trainer");
    std::fs::write(
        &script,
        "#!/bin/sh\nenv > \"$PWD/env.txt\"\nsleep 300 &\necho $! > \"$PWD/child.pid\"\necho $$ > \"$PWD/self.pid\"\nwait\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let launcher = LocalProcess::with_executable(script);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spec = WorkerSpec {
        job_id: "job-1".into(),
        attempt: 1,
        worker: 0,
        coordinator: "http://127.0.0.1:1".into(),
        token: "t".into(),
        config: d.join("job.toml"),
        overrides: vec![],
        workdir: d.to_path_buf(),
        log: d.join("logs/rank-0.log"),
        data_cache: d.join("tokens"),
    };
    let handle = launcher.launch(&spec, tx).await.unwrap();
    let read = |name: &str| -> Option<u32> {
        std::fs::read_to_string(d.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (worker, child) = loop {
        if let (Some(w), Some(c)) = (read("self.pid"), read("child.pid")) {
            break (w, c);
        }
        assert!(Instant::now() < deadline, "the fake trainer did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(alive(worker) && alive(child));
    handle.kill();
    let exit = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((exit.attempt, exit.worker, exit.signal), (1, 0, Some(9)));
    assert_eq!(exit.describe(), "was killed by SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(child) {
        assert!(
            Instant::now() < deadline,
            "the worker's child {child} outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(worker));
    assert!(Path::new(&spec.log).exists(), "its output goes to the log");
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(&spec.log).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "others cannot read a worker's log");
    // The worker gets its job token and PATH, not the rest of the coordinator's environment
    // (cargo runs this test with CARGO_* variables set).
    let env = std::fs::read_to_string(d.join("env.txt")).unwrap();
    assert!(env.lines().any(|l| l == "LOCKSTEP_TOKEN=t"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    assert!(!env.lines().any(|l| l.starts_with("CARGO_")), "{env}");
}
