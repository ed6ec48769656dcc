//! The conformance suite every backend must pass. Each function takes a store over an empty
//! root and panics with a description when the backend breaks the [`CheckpointStore`]
//! contract. `tests/it/backends.rs` runs all of them against `memory://`, `file://` and S3 over
//! HTTP; point `LOCKSTEP_TEST_S3_URL` at a real bucket to run them there too.

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};

use crate::pointer::{Pointer, Swap};
use crate::retention::RetentionPolicy;
use crate::writer::{CommitInfo, TensorInput};
use crate::{CheckpointStore, DType, Error};

/// Runs every check in turn.
pub async fn run_all(store: &CheckpointStore) {
    roundtrip(store).await;
    latest_ignores_uncommitted(store).await;
    commit_is_exclusive(store).await;
    delete_is_idempotent(store).await;
    gc_follows_policy(store).await;
    detects_flipped_byte(store).await;
    detects_truncated_shard(store).await;
    detects_missing_shard(store).await;
    detects_manifest_without_shards(store).await;
    refuses_unknown_versions(store).await;
    detects_wrong_piece_hash(store).await;
    choose_start_sets_corrupt_checkpoints_aside(store).await;
    commit_step_commits_and_applies_retention(store).await;
}

/// A deterministic set of tensors of every codec, with odd sizes, an empty tensor and one
/// large enough to span several chunks and parts.
pub fn sample_tensors(seed: u64) -> Vec<TensorInput> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut f32s = |n: usize| -> Bytes {
        (0..n)
            .flat_map(|_| (((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1).to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    };
    let big = f32s(300_000);
    let bf16: Bytes = f32s(5_001)
        .chunks_exact(4)
        .flat_map(|c| [c[2], c[3]])
        .collect::<Vec<u8>>()
        .into();
    let f16: Bytes = (0..777u16)
        .flat_map(|i| (i.wrapping_mul(31)).to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    let ids: Bytes = (0..1000i64)
        .flat_map(|i| (i * i).to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    let small = f32s(3);
    vec![
        t("model.embed_tokens.weight", DType::F32, &[600, 500], big),
        t("model.norm.weight", DType::F32, &[3], small),
        t("optim.step", DType::I64, &[1000], ids),
        t("layers.0.bf16", DType::Bf16, &[5001], bf16),
        t("layers.0.f16", DType::F16, &[777], f16),
        t("empty", DType::F32, &[0, 4], Bytes::new()),
        t(
            "bytes",
            DType::U8,
            &[13],
            Bytes::from_static(b"hello, world!"),
        ),
    ]
}

fn t(name: &str, dtype: DType, shape: &[u64], data: Bytes) -> TensorInput {
    TensorInput {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn info(step: u64) -> CommitInfo {
    CommitInfo {
        job: "conformance".into(),
        step,
        config_hash: "cafe".into(),
        parent: step.checked_sub(10),
        trainer_state: serde_json::json!({ "step": step, "cursor": [1, 2, 3] }),
    }
}

async fn save(store: &CheckpointStore, step: u64, world: u32) {
    store
        .save(info(step), &sample_tensors(step), world)
        .await
        .unwrap_or_else(|e| panic!("save step {step} at world {world}: {e}"));
}

async fn clear(store: &CheckpointStore) {
    for s in store.list_all().await.expect("list") {
        store.delete(s.step).await.expect("delete");
    }
    for p in set_aside_objects(store).await {
        store
            .object_store()
            .delete(&object_store::path::Path::from(p))
            .await
            .expect("delete set-aside object");
    }
    assert!(
        store.list_all().await.expect("list").is_empty(),
        "root not empty after clearing"
    );
}

/// Saved tensors load back byte for byte, with manifest and trainer state, at several world sizes.
pub async fn roundtrip(store: &CheckpointStore) {
    clear(store).await;
    for (step, world) in [(10, 1), (20, 3)] {
        save(store, step, world).await;
        let c = store
            .load(step)
            .await
            .unwrap_or_else(|e| panic!("load {step}: {e}"));
        assert_eq!(c.manifest.world_size, world);
        assert_eq!(c.manifest.trainer_state["cursor"][2], 3);
        let expected = sample_tensors(step);
        assert_eq!(c.tensors.len(), expected.len());
        for e in &expected {
            let got = c
                .tensor(&e.name)
                .unwrap_or_else(|| panic!("tensor {} missing", e.name));
            assert_eq!((got.dtype, &got.shape), (e.dtype, &e.shape), "{}", e.name);
            assert!(
                got.data == e.data,
                "tensor {} differs after roundtrip",
                e.name
            );
        }
        let report = store.verify(step).await.expect("verify");
        assert!(report.is_ok(), "verify: {:?}", report.problems);
        assert_eq!(report.shards, world as usize);
    }
    assert_eq!(store.list().await.expect("list"), vec![10, 20]);
}

/// Shards without a manifest are not a checkpoint.
pub async fn latest_ignores_uncommitted(store: &CheckpointStore) {
    clear(store).await;
    save(store, 10, 1).await;
    let pieces = crate::writer::pieces_for_rank(&sample_tensors(20), 0, 2);
    store
        .write_shard(20, 0, &pieces)
        .await
        .expect("write shard");
    assert_eq!(store.latest().await.expect("latest"), Some(10));
    assert!(matches!(
        store.load(20).await,
        Err(Error::NotCommitted { step: 20, .. })
    ));
}

/// Of two different manifests for one step, only the first commits; re-committing the same
/// manifest succeeds.
pub async fn commit_is_exclusive(store: &CheckpointStore) {
    clear(store).await;
    let tensors = sample_tensors(30);
    let m = store.save(info(30), &tensors, 1).await.expect("save");
    store.commit(&m).await.expect("identical re-commit");
    let mut other = m.clone();
    other.trainer_state = serde_json::json!({ "step": 31 });
    match store.commit(&other).await {
        Err(Error::AlreadyCommitted { step: 30, .. }) => {}
        r => panic!("second committer must lose, got {r:?}"),
    }
    assert_eq!(store.manifest(30).await.expect("manifest"), m);
}

/// Deleting removes every file; deleting again, or a step that never existed, succeeds.
pub async fn delete_is_idempotent(store: &CheckpointStore) {
    clear(store).await;
    save(store, 40, 2).await;
    store.delete(40).await.expect("delete");
    store.delete(40).await.expect("delete again");
    store.delete(41).await.expect("delete missing");
    assert!(store.list_all().await.expect("list").is_empty());
}

/// gc keeps the newest N, milestones and protected steps, and removes old debris.
pub async fn gc_follows_policy(store: &CheckpointStore) {
    clear(store).await;
    for step in [10, 20, 30, 40, 50] {
        save(store, step, 1).await;
    }
    let pieces = crate::writer::pieces_for_rank(&sample_tensors(25), 0, 1);
    store.write_shard(25, 0, &pieces).await.expect("debris");
    store.write_shard(60, 0, &pieces).await.expect("in flight");
    let policy = RetentionPolicy {
        keep_last: 2,
        keep_every: Some(20),
    };
    let dry = store.gc(&policy, &[10], true).await.expect("dry run");
    assert_eq!(dry.deleted, vec![30]);
    assert_eq!(
        store.list().await.expect("list").len(),
        5,
        "dry run deleted something"
    );
    let report = store.gc(&policy, &[10], false).await.expect("gc");
    assert_eq!(report.deleted, vec![30]);
    assert_eq!(report.debris, vec![25]);
    let left: Vec<u64> = store
        .list_all()
        .await
        .expect("list")
        .iter()
        .map(|s| s.step)
        .collect();
    assert_eq!(left, vec![10, 20, 40, 50, 60]);
}

async fn overwrite(
    store: &CheckpointStore,
    path: &object_store::path::Path,
    f: impl FnOnce(&mut Vec<u8>),
) {
    let os = store.object_store();
    let mut bytes = os
        .get(path)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes")
        .to_vec();
    f(&mut bytes);
    os.put(path, PutPayload::from(bytes)).await.expect("put");
}

fn assert_corrupt(e: &Error, file_part: &str, chunk: Option<usize>) {
    match e {
        Error::Corrupt { file, chunk: c, .. } => {
            assert!(
                file.contains(file_part),
                "error names {file}, expected {file_part}"
            );
            if chunk.is_some() {
                assert_eq!(*c, chunk, "wrong chunk in {e}");
            }
        }
        other => panic!("expected a corruption naming {file_part}, got {other}"),
    }
}

/// One flipped byte inside a chunk is caught by verify and load, naming file and chunk.
pub async fn detects_flipped_byte(store: &CheckpointStore) {
    clear(store).await;
    save(store, 50, 2).await;
    let path = store.shard_path(50, 1);
    overwrite(store, &path, |b| {
        b[crate::format::shard::HEADER_LEN as usize + 5] ^= 0x40
    })
    .await;
    let report = store.verify(50).await.expect("verify");
    assert!(!report.is_ok());
    assert_corrupt(
        &report.problems[0],
        "step-000000000050/rank-00001.shard",
        Some(0),
    );
    assert_corrupt(
        &store.load(50).await.expect_err("load must fail"),
        "rank-00001.shard",
        Some(0),
    );
}

/// A shard cut short is caught before any chunk is decoded.
pub async fn detects_truncated_shard(store: &CheckpointStore) {
    clear(store).await;
    save(store, 60, 2).await;
    let path = store.shard_path(60, 0);
    overwrite(store, &path, |b| b.truncate(b.len() / 2)).await;
    let report = store.verify(60).await.expect("verify");
    assert_corrupt(&report.problems[0], "rank-00000.shard", None);
    assert!(
        report.problems[0].to_string().contains("truncated"),
        "{}",
        report.problems[0]
    );
    assert!(store.load(60).await.is_err());
}

/// A deleted shard is reported as missing.
pub async fn detects_missing_shard(store: &CheckpointStore) {
    clear(store).await;
    save(store, 70, 3).await;
    store
        .object_store()
        .delete(&store.shard_path(70, 2))
        .await
        .expect("delete");
    let report = store.verify(70).await.expect("verify");
    assert_corrupt(&report.problems[0], "rank-00002.shard", None);
    assert!(report.problems[0].to_string().contains("missing"));
}

/// A manifest whose shards are all gone is detected, and commit refuses such a manifest.
pub async fn detects_manifest_without_shards(store: &CheckpointStore) {
    clear(store).await;
    let m = store
        .save(info(80), &sample_tensors(80), 2)
        .await
        .expect("save");
    for r in 0..2 {
        store
            .object_store()
            .delete(&store.shard_path(80, r))
            .await
            .expect("delete");
    }
    let report = store.verify(80).await.expect("verify");
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    let mut again = m.clone();
    again.step = 81;
    let e = store
        .commit(&again)
        .await
        .expect_err("commit without shards");
    assert!(e.to_string().contains("missing"), "{e}");
    assert_eq!(store.latest().await.expect("latest"), Some(80));
}

/// Files of an unknown format version are refused by name, not misread.
pub async fn refuses_unknown_versions(store: &CheckpointStore) {
    clear(store).await;
    save(store, 90, 1).await;
    save(store, 100, 1).await;
    overwrite(store, &store.manifest_path(100), |b| {
        let s = String::from_utf8_lossy(b).replace("\"version\": 1", "\"version\": 99");
        *b = s.into_bytes();
    })
    .await;
    match store.load(100).await {
        Err(Error::UnsupportedVersion {
            file, found: 99, ..
        }) => assert!(file.ends_with("manifest.json")),
        r => panic!("expected an unsupported manifest version, got {r:?}"),
    }
    overwrite(store, &store.shard_path(90, 0), |b| b[8] = 7).await;
    match store.load(90).await {
        Err(Error::UnsupportedVersion { file, found: 7, .. }) => {
            assert!(file.ends_with("rank-00000.shard"))
        }
        r => panic!("expected an unsupported shard version, got {r:?}"),
    }
}

/// Decoded bytes that differ from what was saved (a codec fault behind valid chunk hashes) are
/// caught by the piece hashes, on load and on verify.
pub async fn detects_wrong_piece_hash(store: &CheckpointStore) {
    clear(store).await;
    save(store, 130, 2).await;
    overwrite(store, &store.manifest_path(130), |b| {
        let mut m = crate::Manifest::parse(b).expect("manifest");
        let t = m
            .tensors
            .iter_mut()
            .find(|t| t.name == "model.embed_tokens.weight")
            .expect("tensor");
        t.pieces[0].hash = "0".repeat(32);
        *b = m.to_json();
    })
    .await;
    let e = store.load(130).await.expect_err("load must fail");
    assert!(e.to_string().contains("fails its hash"), "{e}");
    let report = store.verify(130).await.expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0]
            .to_string()
            .contains("model.embed_tokens.weight")
    );
}

/// `choose_start` moves a corrupt newest checkpoint aside (not deleted) and starts from the
/// previous one; the set-aside step can be committed again. When nothing verifies it refuses
/// and moves nothing.
pub async fn choose_start_sets_corrupt_checkpoints_aside(store: &CheckpointStore) {
    use crate::resume::Want;
    clear(store).await;
    save(store, 110, 2).await;
    save(store, 120, 2).await;
    overwrite(store, &store.shard_path(120, 0), |b| {
        let n = b.len();
        b[n / 2] ^= 1;
    })
    .await;
    let start = store
        .choose_start(Want::Latest)
        .await
        .expect("choose_start");
    assert_eq!(start.step, Some(110));
    assert_eq!(start.set_aside.len(), 1);
    assert_eq!(start.set_aside[0].step, 120);
    assert!(
        start.set_aside[0]
            .moved_to
            .contains("set-aside/step-000000000120-")
    );
    assert_eq!(store.list().await.expect("list"), vec![110]);
    assert!(
        store
            .list_all()
            .await
            .expect("list all")
            .iter()
            .all(|s| s.step != 120),
        "the set-aside step left files behind"
    );
    let kept = set_aside_objects(store).await;
    assert!(
        kept.iter().any(|p| p.ends_with("rank-00001.shard")),
        "every file of the corrupt checkpoint is kept: {kept:?}"
    );
    assert!(
        kept.iter().any(|p| p.ends_with("manifest.json"))
            && kept.iter().any(|p| p.ends_with("rank-00000.shard")),
        "the corrupt checkpoint was not kept: {kept:?}"
    );
    save(store, 120, 2).await;
    assert_eq!(store.list().await.expect("list"), vec![110, 120]);

    // Nothing verifies: refused, nothing moved.
    for step in [110, 120] {
        overwrite(store, &store.shard_path(step, 1), |b| {
            let n = b.len();
            b[n / 3] ^= 1;
        })
        .await;
    }
    let e = store
        .choose_start(Want::Latest)
        .await
        .expect_err("nothing verifies");
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    assert!(e.to_string().contains("refusing to start over"), "{e}");
    assert_eq!(store.list().await.expect("list"), vec![110, 120]);
    clear(store).await;
}

/// `commit_step` assembles the manifest from every rank's shard, records the parent and
/// applies retention.
pub async fn commit_step_commits_and_applies_retention(store: &CheckpointStore) {
    use crate::store::StepCommit;
    use crate::writer::pieces_for_rank;
    clear(store).await;
    let tensors = sample_tensors(7);
    for step in [1, 2, 3] {
        let mut shards = Vec::new();
        for rank in 0..2 {
            let pieces = pieces_for_rank(&tensors, rank, 2);
            shards.push(store.write_shard(step, rank, &pieces).await.expect("shard"));
        }
        let c = store
            .commit_step(StepCommit {
                job: "conformance".into(),
                step,
                config_hash: "h".into(),
                trainer_state: serde_json::json!({"step": step}),
                shards,
                retention: RetentionPolicy {
                    keep_last: 2,
                    keep_every: None,
                },
                protected: vec![],
            })
            .await
            .expect("commit_step");
        assert_eq!(c.parent, step.checked_sub(1).filter(|&p| p > 0));
        assert!(c.retention.is_ok(), "{:?}", c.retention);
    }
    assert_eq!(store.list().await.expect("list"), vec![2, 3]);
    let m = store.manifest(3).await.expect("manifest");
    assert_eq!(m.parent, Some(2));
    let c = store.load(3).await.expect("load");
    assert_eq!(c.tensors.len(), tensors.len());
    for e in &tensors {
        let got = c
            .tensor(&e.name)
            .unwrap_or_else(|| panic!("tensor {} missing", e.name));
        assert!(got.data == e.data, "tensor {} differs", e.name);
    }
    clear(store).await;
}

async fn set_aside_objects(store: &CheckpointStore) -> Vec<String> {
    use futures::TryStreamExt;
    let dir = store.root.clone().join(crate::resume::SET_ASIDE_DIR);
    store
        .object_store()
        .list(Some(&dir))
        .try_collect::<Vec<_>>()
        .await
        .expect("list set-aside")
        .into_iter()
        .map(|o| o.location.to_string())
        .collect()
}

/// A [`Pointer`] over an empty location is compare-and-swap: creating twice conflicts, and of
/// two writers that read the same version only the first swap lands.
pub async fn pointer_swaps(p: &Pointer) {
    assert!(p.read().await.expect("read").is_none());
    assert_eq!(p.swap(None, "a".into()).await.expect("swap"), Swap::Done);
    // Creating again: someone already did.
    assert_eq!(
        p.swap(None, "x".into()).await.expect("swap"),
        Swap::Conflict
    );
    let (b, seen) = p.read().await.expect("read").expect("the pointer exists");
    assert_eq!(&b[..], b"a");
    // Two writers read the same version; the first swap wins, the second conflicts.
    assert_eq!(
        p.swap(Some(&seen), "b".into()).await.expect("swap"),
        Swap::Done
    );
    assert_eq!(
        p.swap(Some(&seen), "c".into()).await.expect("swap"),
        Swap::Conflict
    );
    let (b, _) = p.read().await.expect("read").expect("the pointer exists");
    assert_eq!(&b[..], b"b");
}
