//! Resume is bit-identical: the real `lockstep train` command, stopped (by `--stop-at` or a
//! real SIGTERM) and started again, ends with exactly the parameters and AdamW moments of an
//! uninterrupted run; a corrupt newest checkpoint is never loaded; a checkpoint of another
//! architecture is refused.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use lockstep_api::testing::TestJob;
use lockstep_storage::CheckpointStore;

const STEPS: u64 = 8;

fn config(dir: &Path) -> PathBuf {
    config_with_steps(dir, STEPS)
}

fn config_with_steps(dir: &Path, steps: u64) -> PathBuf {
    TestJob::tiny("resume-test")
        .steps(steps)
        .batch(4)
        .set("train.grad_accum", 2)
        .set("train.weight_decay", 0.01)
        .checkpoint_url(&format!("file://{}/ckpt", dir.display()))
        .write_to(dir)
}

fn trainer(cfg: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    c.arg("train")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .arg("--no-progress")
        .arg("--data-cache")
        .arg(cfg.parent().unwrap().join("tokens"));
    c
}

fn run(cfg: &Path, args: &[&str]) -> Output {
    let out = trainer(cfg, args).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn store(dir: &Path) -> CheckpointStore {
    CheckpointStore::open(&format!("file://{}/ckpt", dir.display())).unwrap()
}

/// Every tensor of `step` (parameters and moments) and the trainer state.
fn final_state(dir: &Path, step: u64) -> (Vec<(String, Vec<u8>)>, serde_json::Value) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(store(dir).load(step)).unwrap();
    let tensors = c.tensors.into_iter().map(|t| (t.name, t.data)).collect();
    (tensors, c.manifest.trainer_state)
}

fn assert_same(a: &Path, b: &Path) {
    assert_same_at(a, b, STEPS)
}

fn assert_same_at(a: &Path, b: &Path, step: u64) {
    let (ta, sa) = final_state(a, step);
    let (tb, sb) = final_state(b, step);
    assert_eq!(ta.len(), tb.len());
    assert!(ta.iter().any(|(n, _)| n.starts_with("optim.exp_avg_sq/")));
    for ((na, da), (nb, db)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(da == db, "tensor `{na}` differs between the runs");
    }
    assert_eq!(sa, sb, "trainer state differs");
}

fn straight_run(steps: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&config_with_steps(dir.path(), steps), &[]);
    assert!(out.status.success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(store(dir.path()).latest()).unwrap(),
        Some(steps)
    );
    dir
}

#[test]
fn stop_and_resume_is_bit_identical_and_corrupt_checkpoints_are_skipped() {
    let _gang = crate::common::one_gang();
    let straight = straight_run(STEPS);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(store(straight.path()).list()).unwrap(),
        vec![4, 8]
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = run(&cfg, &["--stop-at", "4"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopped at step 4 of 8"), "{stdout}");
    let out = run(&cfg, &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from step 4"));
    assert_same(straight.path(), dir.path());

    // Flip one byte of the newest checkpoint: the next start refuses it, resumes from step 4,
    // and trains the same step 8 again.
    let shard = dir.path().join("ckpt/step-000000000008/rank-00000.shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let out = run(&cfg, &[]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming from step 4"), "{err}");
    assert!(err.contains("failed verification"), "{err}");
    assert_same(straight.path(), dir.path());
}

#[test]
fn sigterm_checkpoints_and_the_rerun_finishes_identically() {
    let _gang = crate::common::one_gang();
    // Enough steps that the signal lands mid-run.
    const LONG: u64 = 60;
    let straight = straight_run(LONG);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_steps(dir.path(), LONG);
    let mut child = trainer(&cfg, &[]).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("step ") {
            let pid = child.id().to_string();
            assert!(
                Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            break;
        }
    }
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    eprintln!("{}", rest.join("\n"));
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "SIGTERM exits 143 after checkpointing"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stopped_at = rt.block_on(store(dir.path()).latest()).unwrap().unwrap();
    assert!((2..LONG).contains(&stopped_at), "{stopped_at}");
    let out = run(&cfg, &[]);
    assert!(out.status.success());
    assert_same_at(straight.path(), dir.path(), LONG);
}

#[test]
fn another_architecture_is_refused_by_name() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    assert!(run(&cfg, &["--stop-at", "1"]).status.success());
    let out = run(&cfg, &["--set", "model.intermediate_size=96"]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("architecture differs"), "{err}");
    assert!(
        err.contains("intermediate_size: checkpoint 64, this job 96"),
        "{err}"
    );
    // And a fresh start over existing checkpoints is refused too.
    let out = run(&cfg, &["--resume", "none"]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds committed"));
}

/// Two jobs must not share a checkpoint directory: another job's checkpoint is refused by
/// name (unless `checkpoint.resume_job` names that job), and so is one past this job's last
/// step (its weights are not this job's to export).
#[test]
fn another_jobs_checkpoint_is_refused_by_name() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    assert!(run(&cfg, &["--stop-at", "4"]).status.success());
    let out = run(&cfg, &["--set", "job.name=\"intruder\""]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("job `resume-test` wrote it; this is job `intruder`"),
        "{err}"
    );
    // Renamed on purpose: resumes.
    let out = run(
        &cfg,
        &[
            "--set",
            "job.name=\"renamed\"",
            "--set",
            "checkpoint.resume_job=\"resume-test\"",
            "--stop-at",
            "6",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Step 6 was written by `renamed`; the original job resuming past its 5 steps is refused.
    let out = run(
        &cfg,
        &["--set", "job.name=\"renamed\"", "--set", "train.steps=5"],
    );
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past this job's train.steps = 5"), "{err}");
}

/// A `lockstep train` without a coordinator takes no lease, so it must not write beside a job
/// that holds the checkpoint URL.
#[test]
fn a_standalone_train_refuses_a_checkpoint_url_a_live_job_holds() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let url = format!("file://{}/ckpt", dir.path().display());
    std::fs::create_dir_all(dir.path().join("ckpt")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lease = rt
        .block_on(lockstep_storage::lease::Lease::acquire(
            &url,
            "other-0123456789abcdef",
            "coordinator pid 1 on h",
            std::time::Duration::from_secs(60),
        ))
        .unwrap()
        .unwrap();
    let out = run(&cfg, &[]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by job other-0123456789abcdef"),
        "{err}"
    );
    rt.block_on(lease.release()).unwrap();
    assert!(run(&cfg, &["--stop-at", "1"]).status.success());
}

#[test]
fn bad_inputs_exit_nonzero_naming_the_culprit() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = run(&cfg, &["--set", "train.lr=-1"]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("train.lr"));

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
    let set = format!("data.train=[\"file://{}\"]", bad.display());
    let out = run(&cfg, &["--set", &set]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2:"), "{err}");

    let set = format!(
        "data.train=[\"file://{}/missing-*.jsonl\"]",
        dir.path().display()
    );
    let out = run(&cfg, &["--set", &set]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing-*.jsonl"));
    // An argument that cannot work: the user's to fix, not a restart's.
    let out = run(&cfg, &["--collective", "nccl"]);
    assert_eq!(out.status.code(), Some(3), "a restart cannot fix it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--collective nccl needs --device cuda"));
}

/// `{date}` in a config becomes `--date` (or today, UTC): a nightly job's checkpoints land in
/// that night's directory; a date that does not exist is refused by name.
#[test]
fn date_placeholders_become_the_runs_date() {
    let _gang = crate::common::one_gang();
    let dir = tempfile::tempdir().unwrap();
    let cfg = TestJob::tiny("dated")
        .steps(1)
        .set("checkpoint.every_steps", 1)
        .checkpoint_url(&format!("file://{}/{{date}}/ckpt", dir.path().display()))
        .write_to(dir.path());
    let out = run(&cfg, &["--date", "2026-01-02"]);
    assert!(out.status.success());
    assert!(dir.path().join("2026-01-02/ckpt").is_dir());
    let out = run(&cfg, &["--date", "2026-02-30"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--date `2026-02-30`"));
    // In a --set value too (not last night's directory under a literal `{date}`).
    let set = format!(
        "checkpoint.url=\"file://{}/set-{{date}}/ckpt\"",
        dir.path().display()
    );
    let out = run(&cfg, &["--date", "2026-01-03", "--set", &set]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("set-2026-01-03/ckpt").is_dir());
    assert!(!dir.path().join("set-{date}").exists());
}

fn lora_config(dir: &Path, steps: u64, seed: u64) -> PathBuf {
    TestJob::tiny("lora-test")
        .steps(steps)
        .batch(4)
        .set("train.grad_accum", 2)
        .set("train.seed", seed)
        .set("lora.r", 4)
        .set("lora.alpha", 8)
        .set("lora.dropout", 0.1)
        .set("lora.target_modules", r#"["q_proj","v_proj","down_proj"]"#)
        .checkpoint_url(&format!("file://{}/ckpt", dir.display()))
        .write_to(dir)
}

/// A LoRA job's checkpoints hold only the adapters and their moments; killed (SIGKILL) mid-run
/// and started again, it ends byte-identical to an uninterrupted run (adapter dropout
/// included); a changed base is refused naming both; its export merges the adapters in.
#[test]
fn a_killed_lora_run_resumes_identically_and_its_checkpoints_hold_only_adapters() {
    let _gang = crate::common::one_gang();
    // Enough steps that the kill lands mid-run on a loaded machine.
    const LONG: u64 = 200;
    let straight = tempfile::tempdir().unwrap();
    let out = run(&lora_config(straight.path(), LONG, 42), &[]);
    assert!(out.status.success());
    let (tensors, state) = final_state(straight.path(), LONG);
    // 2 layers × 3 projections × (A, B), each with two moments.
    assert_eq!(
        tensors.len(),
        2 * 3 * 2 * 3,
        "{:?}",
        tensors.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    assert!(
        tensors
            .iter()
            .all(|(n, _)| n.contains("base_model.model.model.layers.") && n.contains(".lora_")),
        "{:?}",
        tensors.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    assert_eq!(state["lora"]["base"], "init seed 42", "{state}");

    // Killed once a checkpoint is committed, then run again.
    let dir = tempfile::tempdir().unwrap();
    let cfg = lora_config(dir.path(), LONG, 42);
    let mut child = trainer(&cfg, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let latest = rt.block_on(store(dir.path()).latest()).unwrap_or(None);
        if latest.is_some_and(|s| s >= 8) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = rt.block_on(store(dir.path()).latest()).unwrap().unwrap();
    assert!(killed_at < LONG, "{killed_at}");
    let out = run(&cfg, &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from step"));
    assert_same_at(straight.path(), dir.path(), LONG);

    // Another base (a random one of another seed) with the same adapters: refused by name.
    let cfg = lora_config(dir.path(), LONG + 10, 7);
    let out = run(&cfg, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("base `init seed 42`") && err.contains("model.base is `init seed 7`"),
        "{err}"
    );

    // The export is the base with the adapters merged: not the base's weights.
    let ckpt = format!("file://{}/ckpt@{LONG}", straight.path().display());
    let to = format!("file://{}/exp", straight.path().display());
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["export", &ckpt, "--to", &to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = std::fs::read_dir(straight.path().join("exp/lora-test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("model.safetensors").is_file())
        .expect("an exported version");
    let bytes = std::fs::read(exported.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let names: Vec<&String> = header.as_object().unwrap().keys().collect();
    assert!(
        names
            .iter()
            .any(|n| *n == "model.layers.0.self_attn.q_proj.weight"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("lora")),
        "merged, not adapters: {names:?}"
    );

    // As a PEFT adapter directory (scripts/peft_check.py loads it with PEFT by hand).
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["export", &ckpt, "--to", &to, "--version", "adapter"])
        .args(["--lora", "adapter", "--promote"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = straight.path().join("exp/lora-test/adapter");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let a = &header["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    assert_eq!(a["shape"], serde_json::json!([4, 64]), "{header}");
    assert!(!dir.join("model.safetensors").exists());
    // A promoted adapter is not a base for the next run: refused, saying why.
    let next = tempfile::tempdir().unwrap();
    let cfg = TestJob::tiny("lora-next")
        .set("model.base", format!("\"latest-export:{to}/lora-test\""))
        .checkpoint_url(&format!("file://{}/ckpt", next.path().display()))
        .write_to(next.path());
    let out = run(&cfg, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a LoRA adapter"), "{err}");
}

/// The nightly chain with LoRA: a job whose `model.base` is a lineage whose promoted version is
/// a LoRA adapter starts from that adapter, on the base it was trained on; other [lora]
/// settings, or no [lora], are refused saying why.
#[test]
fn a_lora_job_starts_from_a_promoted_adapter_on_its_base() {
    let _gang = crate::common::one_gang();
    let d = tempfile::tempdir().unwrap();
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../trainer/tests/fixtures/tiny-llama3")
        .canonicalize()
        .unwrap();
    let to = format!("file://{}/exp", d.path().display());
    let job = |name: &str, dir: &Path, base: &str, r: u32| {
        std::fs::create_dir_all(dir).unwrap();
        TestJob::tiny(name)
            .steps(4)
            .set("model.base", format!("\"{base}\""))
            .set("lora.r", r)
            .checkpoint_url(&format!("file://{}/ckpt", dir.display()))
            .write_to(dir)
    };
    let first = d.path().join("first");
    let out = run(&job("nightly", &first, &base.display().to_string(), 4), &[]);
    assert!(out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["export", &format!("file://{}/ckpt", first.display())])
        .args(["--to", &to, "--lora", "adapter", "--promote"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lineage = format!("latest-export:{to}/nightly");
    let next = d.path().join("next");
    let out = run(&job("nightly", &next, &lineage, 4), &[]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("from the promoted adapter"), "{err}");
    // Its first loss is the trained adapter's, not a fresh one's (which is the base's).
    let first_loss = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("step 1/4 loss "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    };
    let fresh = run(
        &job(
            "nightly",
            &d.path().join("fresh"),
            &base.display().to_string(),
            4,
        ),
        &[],
    );
    let fresh_err = String::from_utf8_lossy(&fresh.stderr);
    assert!(first_loss(&err).is_some(), "{err}");
    assert_ne!(
        first_loss(&err),
        first_loss(&fresh_err),
        "{err}\n{fresh_err}"
    );

    // A rank above a targeted projection's smaller side is not low-rank: refused by name.
    let wide = d.path().join("wide");
    let out = run(&job("wide", &wide, &base.display().to_string(), 200), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lora.r = 200 is more than"), "{err}");

    let other = d.path().join("other");
    let out = run(&job("nightly", &other, &lineage, 8), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("adapter_config.json") && err.contains("r = 4"),
        "{err}"
    );
}

/// `train.precision = "bf16-mixed"`: a LoRA job (frozen base in bf16) and a full fine-tune are
/// bit-reproducible (a run stopped and resumed ends byte-identical to one that was not), and
/// really compute in bf16: the weights differ from the f32 run's, the loss stays close to it.
#[test]
fn bf16_mixed_runs_resume_identically_and_train_like_f32() {
    let _gang = crate::common::one_gang();
    const STEPS: u64 = 24;
    let loss_of = |out: &Output| -> f64 {
        let err = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let line = err
            .lines()
            .find(|l| l.starts_with("finished at step"))
            .unwrap_or_else(|| panic!("no summary: {err}"));
        let after = line.split(" → ").nth(1).unwrap_or_default();
        let loss = after.split([',', ';']).next().unwrap_or_default().trim();
        loss.parse()
            .unwrap_or_else(|_| panic!("no final loss in `{line}`"))
    };
    for lora in [true, false] {
        let make = |dir: &Path, precision: &str| {
            let job = if lora {
                TestJob::tiny("bf16-lora")
                    .set("lora.r", 4)
                    .set("lora.dropout", 0.1)
                    .set("lora.target_modules", r#"["q_proj","v_proj","down_proj"]"#)
            } else {
                TestJob::tiny("bf16-full")
            };
            job.steps(STEPS)
                .batch(4)
                .set("train.precision", format!("\"{precision}\""))
                .checkpoint_url(&format!("file://{}/ckpt", dir.display()))
                .write_to(dir)
        };
        let f32_run = tempfile::tempdir().unwrap();
        let out = run(&make(f32_run.path(), "f32"), &[]);
        assert!(out.status.success());
        let f32_loss = loss_of(&out);

        let straight = tempfile::tempdir().unwrap();
        let out = run(&make(straight.path(), "bf16-mixed"), &[]);
        assert!(out.status.success());
        let bf16_loss = loss_of(&out);
        assert!(
            (bf16_loss - f32_loss).abs() < 0.05 * f32_loss,
            "lora {lora}: bf16 {bf16_loss} f32 {f32_loss}"
        );
        let (a, _) = final_state(straight.path(), STEPS);
        let (b, _) = final_state(f32_run.path(), STEPS);
        assert!(a != b, "lora {lora}: bf16-mixed trained exactly as f32");

        let resumed = tempfile::tempdir().unwrap();
        let cfg = make(resumed.path(), "bf16-mixed");
        assert!(run(&cfg, &["--stop-at", "9"]).status.success());
        let out = run(&cfg, &[]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from step 9"));
        assert_same_at(straight.path(), resumed.path(), STEPS);
    }
}

/// A checkpoint that fails (here: a file stands where its step directory must go) is reported
/// and retried by the next one; training goes on, and ends as an unfailed run does.
#[test]
fn a_failed_checkpoint_is_reported_and_training_goes_on() {
    let _gang = crate::common::one_gang();
    let straight = straight_run(STEPS);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("step-000000000004"), b"in the way").unwrap();
    let out = run(&cfg, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("checkpoint step 4 failed (1 in a row; training goes on and the next"),
        "{err}"
    );
    assert!(err.contains("checkpoint step 8 committed"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(store(dir.path()).list()).unwrap(), vec![8]);
    assert_same(straight.path(), dir.path());

    // The last checkpoint is what the run ends with (and what an export reads): if it fails,
    // the run fails (a restart may pass), naming the checkpoint kept.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("step-000000000008"), b"in the way").unwrap();
    let out = run(&cfg, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("it was the run's last, which it must end with, so the run stops (its last committed checkpoint, step 4, is intact)"),
        "{err}"
    );
}

/// A checkpoint directory that fills up mid-run (a 1 MiB tmpfs, mounted in a user and mount
/// namespace of our own): the run stops at once saying so by name, exits as a restart cannot
/// help (3), and its committed checkpoints stay intact and load.
#[test]
fn a_full_checkpoint_store_stops_the_run_cleanly() {
    let _gang = crate::common::one_gang();
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: no user and mount namespaces here (unshare), so no tmpfs to fill");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let cfg = TestJob::tiny("full-disk")
        .steps(400)
        .set("checkpoint.every_steps", 2)
        .set("checkpoint.keep_last", 1000)
        .checkpoint_url(&format!("file://{}/ckpt", mnt.display()))
        .write_to(dir.path());
    let exe = env!("CARGO_BIN_EXE_lockstep");
    // Inside the namespace: mount, train, then list and verify what is there (the mount goes
    // away with the namespace).
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs '{mnt}' || exit 99; \
         '{exe}' train --config '{cfg}' --no-progress --data-cache '{cache}'; echo \"exit=$?\"; \
         '{exe}' ckpt verify 'file://{mnt}/ckpt' 2>&1; echo \"verify=$?\"",
        mnt = mnt.display(),
        cfg = cfg.display(),
        cache = dir.path().join("tokens").display(),
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!said.contains("exit=99"), "{said}");
    assert!(said.contains("exit=3"), "{said}");
    assert!(
        said.contains(
            "the store takes no more writes (no space left on the device), so the run stops \
             (its last committed checkpoint, step "
        ),
        "{said}"
    );
    assert!(said.contains("verify=0"), "{said}");
}
