//! With 10% of requests failing (before or after reaching the store) and some shard uploads
//! silently truncated, every checkpoint still commits, and a reader polling all the while
//! never loads a torn one.

// Test helpers: a failed unwrap is a failed test.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lockstep_storage::conformance::sample_tensors;
use lockstep_storage::testing::S3Server;
use lockstep_storage::{
    CheckpointStore, CommitInfo, Error, Faults, RetryPolicy, StoreOptions, UnreliableStore,
};
use object_store::ObjectStore;

fn options() -> StoreOptions {
    StoreOptions::default()
        .with_chunk_size(64 << 10)
        .with_part_size(lockstep_storage::store::MIN_S3_PART)
        .with_retry(RetryPolicy {
            max_attempts: 30,
            base_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(50),
        })
}

async fn run(inner: Arc<dyn ObjectStore>, label: &str) {
    let faults = Faults {
        fail_rate: 0.10,
        truncate_rate: 0.25,
        latency: Some((Duration::ZERO, Duration::from_millis(2))),
        seed: 7,
        ..Default::default()
    };
    let flaky = UnreliableStore::new(inner.clone(), faults);
    let writer = CheckpointStore::new(Arc::new(flaky.clone()), Default::default(), label)
        .with_options(options());
    // The reader sees the same faults on its own requests.
    let reader = CheckpointStore::new(
        Arc::new(UnreliableStore::new(inner, Faults { seed: 99, ..faults })),
        Default::default(),
        label,
    )
    .with_options(options());

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut loads = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Some(step) = reader.latest().await.expect("latest") {
                    match reader.load(step).await {
                        Ok(c) => {
                            assert_eq!(c.manifest.step, step);
                            for t in sample_tensors(step) {
                                assert!(c.tensor(&t.name).unwrap().data == t.data, "torn read");
                            }
                            loads += 1;
                        }
                        // Only a store that stayed down past the retries may fail a load.
                        Err(e) => assert!(
                            !matches!(e, Error::Corrupt { .. }),
                            "torn checkpoint seen: {e}"
                        ),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            loads
        })
    };
    let steps: Vec<u64> = (1..=12).map(|i| i * 10).collect();
    for &step in &steps {
        let info = CommitInfo {
            job: "faults".into(),
            step,
            config_hash: "x".into(),
            parent: None,
            trainer_state: serde_json::json!({}),
        };
        writer
            .save(info, &sample_tensors(step), 2)
            .await
            .unwrap_or_else(|e| panic!("{label}: step {step} did not commit: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    let loads = poll.await.unwrap();
    assert_eq!(writer.list().await.unwrap(), steps, "{label}");
    for &step in &steps {
        let report = writer.verify(step).await.unwrap();
        assert!(report.is_ok(), "{label}: {:?}", report.problems);
    }
    let c = flaky.counts();
    eprintln!(
        "{label}: {} requests, {} failed, {} truncated; reader loaded {loads} checkpoints",
        c.requests.load(Ordering::Relaxed),
        c.failures.load(Ordering::Relaxed),
        c.truncations.load(Ordering::Relaxed)
    );
    assert!(
        c.failures.load(Ordering::Relaxed) > 5,
        "too few faults injected to mean anything"
    );
    assert!(c.truncations.load(Ordering::Relaxed) > 0);
    assert!(loads > 0, "the reader never loaded anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_over_memory() {
    run(
        Arc::new(object_store::memory::InMemory::new()),
        "memory://faults",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_over_s3() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let s3 = server
        .object_store(
            "bucket",
            lockstep_storage::testing::ACCESS_KEY,
            lockstep_storage::testing::SECRET_KEY,
        )
        .unwrap();
    run(Arc::new(s3), "s3://bucket").await;
}
