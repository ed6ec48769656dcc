//! The conformance suite against every backend: memory, file (a temp dir), and S3 over the real
//! HTTP protocol (an in-process s3s server on 127.0.0.1), plus a real bucket when
//! `LOCKSTEP_TEST_S3_URL` is set.

// Test helpers: a failed unwrap is a failed test.

use std::sync::Arc;
use std::time::Duration;

use lockstep_storage::testing::S3Server;
use lockstep_storage::{CheckpointStore, RetryPolicy, StoreOptions, conformance};
use object_store::ObjectStoreExt;

/// Small chunks and parts so the suite's tensors span many chunks and multipart uploads.
fn small() -> StoreOptions {
    StoreOptions::default()
        .with_chunk_size(64 << 10)
        .with_part_size(256 << 10)
        .with_retry(RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(100),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    let store = CheckpointStore::open_with("memory://", small()).unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ckpts", dir.path().display());
    let store = CheckpointStore::open_with(&url, small()).unwrap();
    conformance::run_all(&store).await;
}

/// S3's smallest part; the suite's large tensor spans multipart uploads only in the
/// dedicated test below.
fn s3() -> StoreOptions {
    small().with_part_size(lockstep_storage::store::MIN_S3_PART)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let store = server.store("bucket", "jobs/a").unwrap().with_options(s3());
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_shards_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let store = server.store("bucket", "big").unwrap().with_options(s3());
    // 16 MiB of weight-like floats in one tensor: more than one 5 MiB part after compression.
    let data: Vec<u8> = (0..4u32 << 20)
        .flat_map(|i| ((i.wrapping_mul(2654435761) >> 8) as f32 * 1e-9).to_le_bytes())
        .collect();
    let tensors = vec![lockstep_storage::TensorInput {
        name: "w".into(),
        dtype: lockstep_storage::DType::F32,
        shape: vec![4 << 20],
        data: data.into(),
    }];
    let info = lockstep_storage::CommitInfo {
        job: "big".into(),
        step: 1,
        config_hash: "h".into(),
        parent: None,
        trainer_state: serde_json::json!(null),
    };
    let m = store.save(info, &tensors, 1).await.unwrap();
    assert!(
        m.shards[0].bytes > lockstep_storage::store::MIN_S3_PART as u64,
        "one part only: {}",
        m.shards[0].bytes
    );
    let c = store.load(1).await.unwrap();
    assert!(c.tensors[0].data == tensors[0].data);
}

/// Setting aside a checkpoint whose shard is over S3's CopyObject limit (5 GiB; here an
/// injected 1 MiB limit on the real S3 protocol) streams the copy through a multipart upload;
/// the copy is byte-identical and the original step is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_set_aside_of_a_shard_over_the_copy_limit_streams_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let plain = server.store("bucket", "big").unwrap();
    let limited = lockstep_storage::UnreliableStore::new(
        plain.object_store().clone(),
        lockstep_storage::Faults {
            copy_limit: Some(1 << 20),
            ..Default::default()
        },
    );
    let with_limit = |limit: u64| {
        CheckpointStore::new(Arc::new(limited.clone()), "big".into(), "s3://bucket/big")
            .with_options(s3().with_server_copy_limit(limit))
    };
    let data: Vec<u8> = (0..1u32 << 20)
        .flat_map(|i| ((i.wrapping_mul(2654435761) >> 8) as f32 * 1e-9).to_le_bytes())
        .collect();
    let tensors = vec![lockstep_storage::TensorInput {
        name: "w".into(),
        dtype: lockstep_storage::DType::F32,
        shape: vec![1 << 20],
        data: data.into(),
    }];
    let info = |step| lockstep_storage::CommitInfo {
        job: "big".into(),
        step,
        config_hash: "h".into(),
        parent: None,
        trainer_state: serde_json::json!(null),
    };
    let store = with_limit(1 << 20);
    let m = store.save(info(1), &tensors, 1).await.unwrap();
    assert!(
        m.shards[0].bytes > 1 << 20,
        "shard {} bytes",
        m.shards[0].bytes
    );
    // Every file of step 1, by name.
    let raw = plain.object_store().clone();
    let files = |prefix: String| {
        let raw = raw.clone();
        async move {
            use futures::TryStreamExt;
            let metas: Vec<_> = raw
                .list(Some(&prefix.as_str().into()))
                .try_collect()
                .await
                .unwrap();
            let mut out = std::collections::BTreeMap::new();
            for m in metas {
                let bytes = raw.get(&m.location).await.unwrap().bytes().await.unwrap();
                out.insert(m.location.filename().unwrap().to_string(), bytes);
            }
            out
        }
    };
    let before = files("big/step-000000000001".into()).await;
    assert!(before.len() >= 2, "{:?}", before.keys());
    // Without the streaming copy (limit above the shard), the server refuses, as S3 does.
    let e = with_limit(u64::MAX).set_aside(1).await.unwrap_err();
    assert!(e.to_string().contains("copy limit"), "{e}");
    assert!(
        store.load(1).await.is_ok(),
        "a failed set-aside leaves the step committed"
    );
    let moved = store.set_aside(1).await.unwrap();
    assert!(
        store.load(1).await.is_err(),
        "step 1 is no longer committed"
    );
    let after = files(moved.trim_start_matches("s3://bucket/").to_string()).await;
    assert!(
        after == before,
        "the copy at {moved} differs from the original"
    );
}

/// `LOCKSTEP_TEST_S3_URL=s3://bucket/prefix cargo test -p lockstep-storage -- --ignored`
/// (credentials from AWS_*).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real bucket in LOCKSTEP_TEST_S3_URL"]
async fn real_s3_bucket() {
    let url =
        std::env::var("LOCKSTEP_TEST_S3_URL").expect("set LOCKSTEP_TEST_S3_URL=s3://bucket/prefix");
    let store = CheckpointStore::open_with(&url, s3()).unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_refuses_wrong_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let bad = server
        .object_store("bucket", "lockstep-test-access", "wrong-secret")
        .unwrap();
    let store = CheckpointStore::new(Arc::new(bad), Default::default(), "s3://bucket")
        .with_options(small());
    let e = store
        .list()
        .await
        .expect_err("a wrong secret must be refused");
    assert!(!e.is_transient(), "auth failures are permanent: {e}");
    let good = server.store("bucket", "").unwrap().with_options(small());
    assert!(good.list().await.unwrap().is_empty());
    let raw = server
        .object_store("bucket", "lockstep-test-access", "wrong-secret")
        .unwrap();
    assert!(raw.get(&"x".into()).await.is_err());
}

/// `latest.json`'s compare-and-swap over the real S3 protocol (If-None-Match / If-Match).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_pointer_swaps_are_compare_and_swap() {
    use lockstep_storage::pointer::Pointer;
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let store = server.store("bucket", "lineage").unwrap();
    let p = Pointer::with_store(
        store.object_store().clone(),
        "lineage/latest.json".into(),
        "s3://bucket/lineage/latest.json",
    );
    lockstep_storage::conformance::pointer_swaps(&p).await;
}
