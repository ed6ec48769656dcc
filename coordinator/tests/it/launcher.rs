//! The local launcher kills a worker with everything it started: no orphan survives.

use std::path::Path;
use std::time::{Duration, Instant};

use lockstep_coordinator::launcher::{Launcher, LocalProcess, Placement, WorkerSpec};

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
        replacing: None,
        placement: Placement::Here,
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

/// A job fine-tuning a Hugging Face base model is sized by the base's config.json, not by the
/// `[model]` section (which only describes a random initialisation): a 70B-parameter base is
/// refused before any worker starts, with the numbers; a small one is admitted.
#[tokio::test]
async fn a_base_model_too_big_for_the_machine_is_refused_by_its_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("d.jsonl");
    std::fs::write(&data, "{\"text\":\"hi\"}\n").unwrap();
    let base = d.join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("model.safetensors"), b"").unwrap();
    let job = lockstep_api::testing::TestJob::tiny("big")
        .set("model.base", format!("\"{}\"", base.display()))
        .set("data.train", format!("[\"file://{}\"]", data.display()))
        .config()
        .unwrap();
    let launcher = LocalProcess::with_executable(d.join("unused"));
    let hf = |hidden: u32, layers: u32, inter: u32| {
        format!(
            r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{hidden},
            "num_hidden_layers":{layers},"intermediate_size":{inter},"vocab_size":128256,
            "num_attention_heads":64,"num_key_value_heads":8}}"#
        )
    };
    std::fs::write(base.join("config.json"), hf(8192, 80, 28672)).unwrap();
    assert!(
        launcher.admit(&job).is_ok(),
        "the [model] section alone is tiny"
    );
    let e = launcher.preflight(&job, d).await.unwrap_err();
    let e = e.to_string();
    assert!(
        e.starts_with("full fine-tuning of 70.6B parameters needs")
            && e.contains("(this machine has")
            && e.contains("(sized by model.base's config.json)"),
        "{e}"
    );
    std::fs::write(base.join("config.json"), hf(512, 2, 128)).unwrap();
    launcher.preflight(&job, d).await.unwrap();
}
