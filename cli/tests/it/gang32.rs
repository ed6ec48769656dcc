//! A gang of 32 local ranks (it holds `one_gang`, so it runs alone: 32 processes load a
//! 2-core machine).

use lockstep_api::testing::TestJob;

use crate::common::{causes, last, run};

/// A gang of 32 local ranks forms and finishes: every worker's `Join` finds its attempt,
/// however early it starts (the attempt is registered before any worker is launched).
#[test]
fn a_32_rank_local_gang_forms_and_finishes() {
    let _gang = crate::common::one_gang();
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
    let (code, lines) = run(dir.path(), None);
    let end = last(&lines);
    assert_eq!(code, 0, "{end}");
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["restarts"], 0, "{end}; causes: {:?}", causes(&lines));
    assert_eq!(end["step"], 2, "{end}");
}
