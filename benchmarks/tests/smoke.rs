//! Every hand-run benchmark that needs no GPU, in its smoke mode (tiny sizes, no anchor,
//! seconds), so that none can break unseen: the figures come from the real runs by hand.

use std::path::PathBuf;
use std::process::Command;

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
