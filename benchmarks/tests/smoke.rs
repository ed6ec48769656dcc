//! Every hand-run benchmark that needs no GPU, in its smoke mode (tiny sizes, no anchor,
//! seconds), so that none can break unseen: the figures come from the real runs by hand.

use std::path::PathBuf;
use std::process::Command;

/// One benchmark at a time: they start gangs of processes and time things; side by side on a
/// 2-core machine they would starve each other's heartbeats.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `lockstep` binary of this build (beside the test binary's directory).
fn lockstep_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/debug/deps/smoke-HASH → target/debug/lockstep
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|d| d.join("lockstep"))
        .expect("target directory")
}

#[test]
fn chaos_smoke_ends_like_an_uninterrupted_run() {
    let _one = one_at_a_time();
    let bin = lockstep_bin();
    assert!(bin.is_file(), "{} not built", bin.display());
    let out = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .arg("--smoke")
        .env("LOCKSTEP_BIN", &bin)
        .output()
        .expect("run chaos");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SIGKILL rank"), "no kill happened: {text}");
    assert!(text.contains("IDENTICAL"), "{text}");
}

#[test]
fn rendezvous_smoke_forms_a_small_gang() {
    let _one = one_at_a_time();
    let out = Command::new(env!("CARGO_BIN_EXE_rendezvous"))
        .arg("8")
        .output()
        .expect("run rendezvous");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("8 workers joined"), "{text}");
}

/// Runs benchmark `exe --smoke` (with the build's `lockstep` as `$LOCKSTEP_BIN`); returns its
/// standard output, failing with both outputs when it fails.
fn smoke(exe: &str) -> String {
    let _one = one_at_a_time();
    let bin = lockstep_bin();
    assert!(bin.is_file(), "{} not built", bin.display());
    let out = Command::new(exe)
        .arg("--smoke")
        .env("LOCKSTEP_BIN", &bin)
        .env_remove("LOCKSTEP_BENCH_PYTHON")
        .output()
        .expect("run the benchmark");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{exe}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The last line: the benchmark's JSON object.
fn figures(text: &str) -> serde_json::Value {
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON object last ({e}): {text}"))
}

#[test]
fn allreduce_smoke_sums_right_over_a_ring() {
    let f = figures(&smoke(env!("CARGO_BIN_EXE_allreduce")));
    assert!(f["sizes"][0]["busbw"].as_f64().unwrap() > 0.0, "{f}");
}

#[test]
fn train_step_smoke_trains() {
    let f = figures(&smoke(env!("CARGO_BIN_EXE_train_step")));
    assert!(f["lockstep_ms_per_step"].as_f64().unwrap() > 0.0, "{f}");
}

#[test]
fn ckpt_smoke_saves_and_loads_the_same_bytes() {
    let f = figures(&smoke(env!("CARGO_BIN_EXE_ckpt")));
    assert!(f["fp32"]["save_s"].as_f64().unwrap() > 0.0, "{f}");
    assert!(f["bf16"]["load_s"].as_f64().unwrap() > 0.0, "{f}");
}

#[test]
fn data_memory_smoke_measures_a_run() {
    let f = figures(&smoke(env!("CARGO_BIN_EXE_data_memory")));
    let row = &f["data_memory"][0];
    assert!(row["peak_rss_kib_first"].as_u64().unwrap() > 0, "{f}");
    assert!(row["peak_rss_kib_cached"].as_u64().unwrap() > 0, "{f}");
}

#[test]
fn recovery_smoke_recovers_from_a_kill() {
    let text = smoke(env!("CARGO_BIN_EXE_recovery"));
    let f = figures(&text);
    assert_eq!(f["lockstep_seconds"].as_array().unwrap().len(), 1, "{text}");
}

#[test]
fn memory_plan_smoke_sets_a_plan_beside_a_measured_run() {
    let f = figures(&smoke(env!("CARGO_BIN_EXE_memory_plan")));
    let row = &f["memory_plan"][0];
    assert!(row["peak_rss_bytes"].as_u64().unwrap() > 0, "{f}");
    assert!(row["plan"]["total"].as_u64().unwrap() > 0, "{f}");
}
