//! The supervisor's timeouts in paused Tokio time: a gang that never assembles, a rank that
//! never sends a heartbeat. Workers are simulated (the launcher records what it would start);
//! the coordinator, its state machine and its Join barrier are the real ones.

use std::sync::Arc;
use std::time::Duration;

use lockstep_api::proto::{self, coordinator_server::Coordinator as Rpc};
use lockstep_api::testing::TestJob;
use lockstep_coordinator::launcher::WorkerSpec;
use lockstep_coordinator::testing::Simulated;
use lockstep_coordinator::{Coordinator, Settings};
use tokio::time::Instant;

/// The coordinator's admin token in these tests.
const ADMIN: &str = "0123456789abcdef0123456789abcdef";

/// A started coordinator whose workers `launcher` simulates.
async fn coordinator_with(
    dir: &std::path::Path,
    launcher: Simulated,
) -> (Coordinator, Arc<Simulated>) {
    let launcher = Arc::new(launcher);
    let c = Coordinator::open(
        Settings {
            data_dir: dir.to_path_buf(),
            admin_token: ADMIN.into(),
            persist: false,
        },
        launcher.clone(),
    )
    .await
    .unwrap();
    c.start("http://127.0.0.1:1".into()).await.unwrap();
    (c, launcher)
}

async fn coordinator(dir: &std::path::Path) -> (Coordinator, Arc<Simulated>) {
    coordinator_with(dir, Simulated::default()).await
}

/// The first worker the launcher was asked to start (the state is published before it is).
async fn first_spec(launcher: &Simulated) -> WorkerSpec {
    loop {
        if let Some(s) = launcher.specs().first() {
            return s.clone();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A `Join` of worker 0 of `job`'s `attempt`, with `token` as its bearer token (if any).
fn join_request(
    job: &str,
    attempt: u32,
    token: Option<&str>,
) -> tonic::Request<proto::JoinRequest> {
    let mut r = tonic::Request::new(proto::JoinRequest {
        job_id: job.into(),
        attempt,
        worker: 0,
        data_addr: "127.0.0.1:1".into(),
        ..Default::default()
    });
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

async fn wait_until(
    c: &Coordinator,
    id: &str,
    what: &str,
    f: impl Fn(&proto::JobStatus) -> bool,
) -> proto::JobStatus {
    let mut rx = c.subscribe(id).unwrap();
    loop {
        let s = c.get(id).unwrap().status();
        if f(&s) {
            return s;
        }
        tokio::time::timeout(Duration::from_secs(3600), rx.changed())
            .await
            .unwrap_or_else(|_| panic!("an hour passed waiting for {what}: {s:?}"))
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_gang_that_never_assembles_is_retried_after_the_gang_timeout_then_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = coordinator(dir.path()).await;
    let t0 = Instant::now();
    let job = TestJob::simulated("sim", 2)
        .set("job.gang_timeout", "\"60s\"")
        .set("job.max_restarts", 1);
    let s = c
        .submit(job.toml(), vec![], dir.path().to_path_buf())
        .await
        .unwrap()
        .status();
    let first = wait_until(&c, &s.job_id, "admitting", |s| s.state == "admitting").await;
    assert_eq!(first.attempt, 1);
    let restarting = wait_until(&c, &s.job_id, "restarting", |s| s.state == "restarting").await;
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(60) && at < Duration::from_secs(61),
        "torn down at {at:?}"
    );
    assert!(
        restarting
            .message
            .contains("only 0 of 2 workers joined within the gang timeout"),
        "{}",
        restarting.message
    );
    let failed = wait_until(&c, &s.job_id, "failed", |s| s.state == "failed").await;
    let at = t0.elapsed();
    // 60 s, 1 s backoff, 60 s.
    assert!(
        at >= Duration::from_secs(121) && at < Duration::from_secs(122),
        "failed at {at:?}"
    );
    assert_eq!(failed.attempt, 2);
    assert!(
        failed.message.contains("gave up after 1 restart"),
        "{}",
        failed.message
    );
    assert_eq!(launcher.specs().len(), 4, "2 attempts × 2 workers");
    assert_eq!(launcher.kills(), 4, "every worker torn down");
}

#[tokio::test(start_paused = true)]
async fn a_joined_rank_that_sends_no_heartbeat_restarts_the_gang() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = coordinator(dir.path()).await;
    let job = TestJob::simulated("sim", 1).set("job.heartbeat_timeout", "\"10s\"");
    let s = c
        .submit(job.toml(), vec![], dir.path().to_path_buf())
        .await
        .unwrap()
        .status();
    wait_until(&c, &s.job_id, "admitting", |s| s.state == "admitting").await;
    let spec = first_spec(&launcher).await;

    // A wrong token, none, the admin's (not a job token) and a stale attempt are refused.
    let e = Rpc::join(&c, join_request(&spec.job_id, spec.attempt, Some("nope")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = Rpc::join(&c, join_request(&spec.job_id, spec.attempt, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = Rpc::join(&c, join_request(&spec.job_id, spec.attempt, Some(ADMIN)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let join = |attempt| join_request(&spec.job_id, attempt, Some(&spec.token));
    let e = Rpc::join(&c, join(7)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    let t0 = Instant::now();
    let r = Rpc::join(&c, join(1)).await.unwrap().into_inner();
    assert_eq!((r.rank, r.world_size, r.resume_step), (0, 1, None));
    wait_until(&c, &s.job_id, "running", |s| s.state == "running").await;
    let restarting = wait_until(&c, &s.job_id, "restarting", |s| s.state == "restarting").await;
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(10) && at < Duration::from_secs(11),
        "detected at {at:?}"
    );
    assert!(
        restarting
            .message
            .contains("rank 0 sent no heartbeat for 10s"),
        "{}",
        restarting.message
    );
    let second = wait_until(&c, &s.job_id, "attempt 2", |s| s.attempt == 2).await;
    assert_eq!(second.state, "admitting");
    assert_eq!(second.restarts, 1);
}

/// A bug that panics a job's supervisor (here, in the launcher) fails that job with the cause
/// and kills the workers it had started, instead of leaving it "admitting" forever.
#[tokio::test(start_paused = true)]
async fn a_supervisor_that_panics_fails_its_job_and_kills_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = coordinator_with(dir.path(), Simulated::panicking_at(1)).await;
    let s = c
        .submit(
            TestJob::simulated("sim", 2).toml(),
            vec![],
            dir.path().to_path_buf(),
        )
        .await
        .unwrap()
        .status();
    let failed = wait_until(&c, &s.job_id, "failed", |s| s.state == "failed").await;
    assert!(
        failed.message.contains("supervisor of this job crashed")
            && failed
                .message
                .contains("simulated launcher bug at worker 1"),
        "{}",
        failed.message
    );
    assert_eq!(launcher.specs().len(), 1, "worker 0 was started");
    assert_eq!(launcher.kills(), 1, "and killed");
}

/// A coordinator that was itself stalled (stopped, starved) does not blame the silence on a
/// healthy rank: heartbeat timeouts count from the end of its stall.
#[tokio::test(start_paused = true)]
async fn a_stall_of_the_coordinator_costs_no_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = coordinator(dir.path()).await;
    let job = TestJob::simulated("sim", 1).set("job.heartbeat_timeout", "\"10s\"");
    let s = c
        .submit(job.toml(), vec![], dir.path().to_path_buf())
        .await
        .unwrap()
        .status();
    let spec = first_spec(&launcher).await;
    Rpc::join(
        &c,
        join_request(&spec.job_id, spec.attempt, Some(&spec.token)),
    )
    .await
    .unwrap();
    wait_until(&c, &s.job_id, "running", |s| s.state == "running").await;
    // The whole coordinator stops for 100 s (the rank's heartbeats could not be heard).
    let t0 = Instant::now();
    tokio::time::advance(Duration::from_secs(100)).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(c.get(&s.job_id).unwrap().status().state, "running");
    // A rank that stays silent after the stall is still caught, a heartbeat timeout later.
    let restarting = wait_until(&c, &s.job_id, "restarting", |s| s.state == "restarting").await;
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(110) && at < Duration::from_secs(112),
        "detected at {at:?}: {}",
        restarting.message
    );
}

/// `List` pages through every job, newest first, in bounded pages.
#[tokio::test]
async fn the_job_list_comes_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(dir.path()).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let job = TestJob::simulated("sim", 1).toml();
        ids.push(
            c.submit(job, vec![], dir.path().to_path_buf())
                .await
                .unwrap()
                .id,
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let mut req = tonic::Request::new(proto::ListRequest {
            page_size: 2,
            page_token: token,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
        let page = Rpc::list(&c, req).await.unwrap().into_inner();
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.into_iter().map(|j| j.job_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let want: Vec<String> = c.list().into_iter().map(|r| r.id).collect();
    assert_eq!(seen, want, "every job once, newest first");
    ids.sort();
    seen.sort();
    assert_eq!(seen, ids);
}

/// The gate in front of every call: no token, a wrong one, and one for a job that does not
/// exist get the same answers whatever the call is about; the admin's and a job's pass.
#[tokio::test]
async fn the_gate_admits_only_known_tokens_and_tells_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(dir.path()).await;
    let job = c
        .submit(
            TestJob::simulated("sim", 1).toml(),
            vec![],
            dir.path().to_path_buf(),
        )
        .await
        .unwrap();
    let md = |token: Option<&str>| {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        m
    };
    assert_eq!(
        c.gate(&md(None)).unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let wrong = "b".repeat(32);
    let e = c.gate(&md(Some(&wrong))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(!e.message().contains("sim"), "{}", e.message());
    assert!(c.gate(&md(Some(""))).is_err());
    assert!(c.gate(&md(Some(ADMIN))).is_ok());
    assert!(c.gate(&md(Some(&job.token))).is_ok());
    // A worker asking about a job that does not exist hears what a wrong token hears.
    let probe = join_request("no-such-job", 1, Some(&job.token));
    assert_eq!(
        Rpc::join(&c, probe).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
}

/// When rank 1 is killed, rank 0 fails too ("rank 1 is gone", exit status 4); whichever exit
/// is reaped first, the restart names rank 1's death. A rank whose peer-lost failure is alone
/// is reported after a short grace.
#[tokio::test(start_paused = true)]
async fn a_restart_names_the_rank_that_died_not_the_one_that_lost_it() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = coordinator(dir.path()).await;
    let job = TestJob::simulated("sim", 2).set("job.heartbeat_timeout", "\"600s\"");
    let s = c
        .submit(job.toml(), vec![], dir.path().to_path_buf())
        .await
        .unwrap()
        .status();
    let join_all = |attempt: u32| {
        let (c, launcher) = (c.clone(), launcher.clone());
        async move {
            let specs: Vec<WorkerSpec> = loop {
                let specs: Vec<_> = launcher
                    .specs()
                    .into_iter()
                    .filter(|s| s.attempt == attempt)
                    .collect();
                if specs.len() == 2 {
                    break specs;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let joins = specs.iter().map(|spec| {
                let mut r = join_request(&spec.job_id, attempt, Some(&spec.token));
                r.get_mut().worker = spec.worker;
                Rpc::join(&c, r)
            });
            for j in futures::future::join_all(joins).await {
                j.unwrap();
            }
        }
    };
    join_all(1).await;
    wait_until(&c, &s.job_id, "running", |s| s.state == "running").await;
    // Rank 0's "peer lost" exit is reaped first, rank 1's SIGKILL half a second later.
    launcher.exit(0, Some(i32::from(lockstep_api::EXIT_PEER_LOST)), None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    launcher.exit(1, None, Some(9));
    let r = wait_until(&c, &s.job_id, "restarting", |s| s.state == "restarting").await;
    assert!(
        r.message.contains("rank 1 was killed by SIGKILL"),
        "{}",
        r.message
    );

    // Alone, a peer-lost failure is still reported, after the grace.
    wait_until(&c, &s.job_id, "attempt 2", |s| s.attempt == 2).await;
    join_all(2).await;
    wait_until(&c, &s.job_id, "running", |s| {
        s.state == "running" && s.attempt == 2
    })
    .await;
    let t0 = Instant::now();
    launcher.exit(1, Some(i32::from(lockstep_api::EXIT_PEER_LOST)), None);
    let r = wait_until(&c, &s.job_id, "restarting", |s| {
        s.state == "restarting" && s.attempt == 2
    })
    .await;
    assert!(
        r.message.contains("rank 1 exited with status 4"),
        "{}",
        r.message
    );
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(2) && at < Duration::from_secs(3),
        "after {at:?}"
    );
}

/// A gang of two whose rank 0 regrouped holding step 12 (its checkpoint URL under `dir`), then
/// lost rank 1 before it could re-form: the coordinator asks rank 0 for an emergency
/// checkpoint. Returns the coordinator, the job, rank 0's spec and its `Join`'s answer.
async fn emergency(
    dir: &std::path::Path,
) -> (
    Coordinator,
    Arc<Simulated>,
    String,
    WorkerSpec,
    proto::JoinResponse,
) {
    let (c, launcher) = coordinator_with(dir, Simulated::replacing_in_place()).await;
    let url = format!("file://{}/ckpt", dir.display());
    let job = TestJob::simulated("sim", 2)
        .set("checkpoint.url", format!("\"{url}\""))
        .set("job.heartbeat_timeout", "\"600s\"")
        .set("job.collective_timeout", "\"30s\"");
    let s = c
        .submit(job.toml(), vec![], dir.to_path_buf())
        .await
        .unwrap()
        .status();
    let specs: Vec<WorkerSpec> = loop {
        let specs = launcher.specs();
        if specs.len() == 2 {
            break specs;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let joins = specs.iter().map(|spec| {
        let mut r = join_request(&spec.job_id, 1, Some(&spec.token));
        r.get_mut().worker = spec.worker;
        Rpc::join(&c, r)
    });
    for j in futures::future::join_all(joins).await {
        j.unwrap();
    }
    wait_until(&c, &s.job_id, "running", |s| s.state == "running").await;
    // Rank 0 sees the ring break and regroups, holding step 12; then rank 1's exit arrives.
    let spec = specs[0].clone();
    let mut r = join_request(&spec.job_id, 1, Some(&spec.token));
    r.get_mut().holds_step = Some(12);
    let regroup = {
        let c = c.clone();
        tokio::spawn(async move { Rpc::join(&c, r).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    launcher.exit(1, None, Some(9));
    let answer = regroup.await.unwrap().unwrap().into_inner();
    (c, launcher, s.job_id, spec, answer)
}

#[tokio::test(start_paused = true)]
async fn a_gang_that_cannot_re_form_restarts_from_its_survivors_emergency_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _launcher, id, spec, answer) = emergency(dir.path()).await;
    assert_eq!(answer.emergency_step, Some(12));
    assert_eq!(answer.emergency_writers, [0]);
    // Rank 0 writes its shard (one of one) and reports it, as a trainer does.
    let store =
        lockstep_storage::CheckpointStore::open(&format!("file://{}/ckpt", dir.path().display()))
            .unwrap();
    let tensors = [lockstep_storage::TensorInput {
        name: "w".into(),
        dtype: lockstep_storage::DType::F32,
        shape: vec![4],
        data: vec![7u8; 16].into(),
    }];
    let pieces = lockstep_storage::pieces_for_rank(&tensors, 0, 1);
    let shard = store.write_shard(12, 0, &pieces).await.unwrap();
    let mut r = tonic::Request::new(proto::CommitShardRequest {
        job_id: spec.job_id.clone(),
        attempt: 1,
        rank: 0,
        step: 12,
        shard_meta_json: serde_json::to_vec(&shard).unwrap(),
        trainer_state_json: br#"{"step": 12}"#.to_vec(),
        write_seconds: 0.1,
        config_hash: String::new(),
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", spec.token).parse().unwrap(),
    );
    Rpc::commit_shard(&c, r).await.unwrap();
    let s = wait_until(&c, &id, "attempt 2", |s| s.attempt == 2).await;
    assert_eq!(s.last_checkpoint, Some(12), "{s:?}");
    let last = s.recoveries.last().unwrap();
    assert_eq!(last.path, "emergency-checkpoint", "{s:?}");
    assert!(
        s.message
            .contains("its survivors wrote an emergency checkpoint of step 12 (1 shard)"),
        "{}",
        s.message
    );
    assert_eq!(store.list().await.unwrap(), [12]);
}

#[tokio::test(start_paused = true)]
async fn an_emergency_checkpoint_not_committed_in_time_falls_back_to_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _launcher, id, _spec, answer) = emergency(dir.path()).await;
    assert_eq!(answer.emergency_step, Some(12));
    // Rank 0 never reports its shard (a store that hangs): after job.collective_timeout the
    // gang restarts from its last checkpoint (none here: the beginning).
    let t0 = Instant::now();
    let s = wait_until(&c, &id, "attempt 2", |s| s.attempt == 2).await;
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(30) && at < Duration::from_secs(40),
        "gave up after {at:?}"
    );
    assert_eq!(s.last_checkpoint, None, "{s:?}");
    assert_eq!(s.recoveries.last().unwrap().path, "checkpoint", "{s:?}");
    assert!(
        s.message.contains(
            "the emergency checkpoint of step 12 was not committed within job.collective_timeout"
        ),
        "{}",
        s.message
    );
}

#[tokio::test(start_paused = true)]
async fn a_writer_that_fails_its_emergency_shard_ends_the_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher, id, _spec, answer) = emergency(dir.path()).await;
    assert_eq!(answer.emergency_writers, [0]);
    let t0 = Instant::now();
    // Rank 0 could not write its shard (a full disk) and exits with the error.
    launcher.exit(0, Some(1), None);
    let s = wait_until(&c, &id, "attempt 2", |s| s.attempt == 2).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(s.recoveries.last().unwrap().path, "checkpoint", "{s:?}");
    assert!(
        s.message
            .contains("rank 0 failed to write its shard of the emergency checkpoint of step 12"),
        "{}",
        s.message
    );
}
