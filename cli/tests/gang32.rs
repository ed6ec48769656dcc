//! A gang of 32 local ranks (its own test binary, so it runs alone: 32 processes load a
//! 2-core machine).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use lockstep_api::testing::TestJob;
use serde_json::Value;

/// A gang of 32 local ranks forms and finishes: every worker's `Join` finds its attempt,
/// however early it starts (the attempt is registered before any worker is launched).
#[test]
fn a_32_rank_local_gang_forms_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    TestJob::tiny("e2e")
        .world(32)
        .steps(2)
        .batch(1)
        .set("job.max_restarts", 0)
        .set("job.gang_timeout", "\"300s\"")
        .set("job.collective_timeout", "\"300s\"")
        .set("job.heartbeat_timeout", "\"300s\"")
        .write_to(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .current_dir(dir.path())
        .args(["run", "job.toml", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<Value> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let code = child.wait().unwrap().code().unwrap_or(-1);
    let causes: Vec<&str> = lines
        .iter()
        .filter(|s| s["state"] == "restarting")
        .filter_map(|s| s["message"].as_str())
        .collect();
    let end = lines.last().expect("no status lines");
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["restarts"], 0, "{end}; causes: {causes:?}");
    assert_eq!(end["step"], 2, "{end}");
}
