//! `lockstep ckpt` as a user runs it: the real binary against checkpoints on disk and on S3
//! over HTTP, including every kind of corruption `verify` must name.

// Test helpers: a failed unwrap is a failed test.

use std::process::{Command, Output};

use lockstep_storage::conformance::sample_tensors;
use lockstep_storage::testing::{S3Server, SECRET_KEY};
use lockstep_storage::{CheckpointStore, CommitInfo};
use object_store::{ObjectStoreExt, PutPayload};

fn lockstep(args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run lockstep")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn save(store: &CheckpointStore, step: u64, world: u32) {
    let info = CommitInfo {
        job: "cli".into(),
        step,
        config_hash: "abc".into(),
        parent: None,
        trainer_state: serde_json::json!({ "step": step }),
    };
    store
        .save(info, &sample_tensors(step), world)
        .await
        .unwrap();
}

async fn rewrite(
    store: &CheckpointStore,
    path: &object_store::path::Path,
    f: impl FnOnce(&mut Vec<u8>),
) {
    let os = store.object_store();
    let mut b = os.get(path).await.unwrap().bytes().await.unwrap().to_vec();
    f(&mut b);
    os.put(path, PutPayload::from(b)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_inspect_verify_gc_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ck", dir.path().display());
    let store = CheckpointStore::open(&url).unwrap();
    for step in [100, 200, 300] {
        save(&store, step, 2).await;
    }

    let o = lockstep(&["ckpt", "ls", &url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert_eq!(out.matches("committed").count(), 3, "{out}");

    let o = lockstep(&["ckpt", "inspect", &format!("{url}@200")], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for needle in [
        "model.embed_tokens.weight",
        "bf16",
        "[600, 500]",
        "rank-00001.shard",
        "ratio",
    ] {
        assert!(out.contains(needle), "inspect lacks {needle}:\n{out}");
    }

    let o = lockstep(&["ckpt", "verify", &url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("OK") && text(&o).contains("@300"),
        "{}",
        text(&o)
    );

    // A flipped byte in chunk 0 of rank 1's shard of step 300.
    rewrite(&store, &store.shard_path(300, 1), |b| b[20] ^= 0x10).await;
    let o = lockstep(&["ckpt", "verify", &format!("{url}@300")], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("step-000000000300/rank-00001.shard") && out.contains("chunk 0"),
        "{out}"
    );

    // Truncated shard.
    rewrite(&store, &store.shard_path(200, 0), |b| {
        b.truncate(b.len() - 100)
    })
    .await;
    let o = lockstep(&["ckpt", "verify", &format!("{url}@200")], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("rank-00000.shard") && text(&o).contains("truncated"),
        "{}",
        text(&o)
    );

    // Missing shard.
    store
        .object_store()
        .delete(&store.shard_path(100, 1))
        .await
        .unwrap();
    let o = lockstep(&["ckpt", "verify", "--all", &url], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("rank-00001.shard") && text(&o).contains("missing"),
        "{}",
        text(&o)
    );

    // Unknown version.
    rewrite(&store, &store.manifest_path(300), |b| {
        *b = String::from_utf8_lossy(b)
            .replace("\"version\": 1", "\"version\": 2")
            .into_bytes()
    })
    .await;
    let o = lockstep(&["ckpt", "verify", &format!("{url}@300")], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("format version 2"), "{}", text(&o));

    // A step that does not exist is an error, not a pass.
    let o = lockstep(&["ckpt", "verify", &format!("{url}@7")], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no committed checkpoint at step 7"),
        "{}",
        text(&o)
    );

    // gc: keep the newest only (of those that verify; the damaged ones above are outside the
    // policy's window, the protected one is kept although it does not verify).
    for step in [400, 500, 600] {
        save(&store, step, 2).await;
    }
    let o = lockstep(&["ckpt", "gc", &url, "--keep-last", "1", "--dry-run"], &[]);
    assert!(
        o.status.success() && text(&o).contains("would delete"),
        "{}",
        text(&o)
    );
    assert_eq!(
        store.list().await.unwrap(),
        vec![100, 200, 300, 400, 500, 600]
    );
    let o = lockstep(
        &["ckpt", "gc", &url, "--keep-last", "1", "--protect", "100"],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(store.list().await.unwrap(), vec![100, 600]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_over_s3_without_printing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["bucket"]).await.unwrap();
    let store = server.store("bucket", "job/ck").unwrap();
    save(&store, 5, 2).await;
    let env = server.env();
    let o = tokio::task::spawn_blocking(move || {
        lockstep(&["ckpt", "verify", "s3://bucket/job/ck"], &env)
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("OK"), "{}", text(&o));

    let mut env = server.env();
    env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_SECRET_ACCESS_KEY", format!("{SECRET_KEY}-wrong")));
    let o =
        tokio::task::spawn_blocking(move || lockstep(&["ckpt", "ls", "s3://bucket/job/ck"], &env))
            .await
            .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        !text(&o).contains(SECRET_KEY),
        "the secret leaked: {}",
        text(&o)
    );
}

#[test]
fn help_explains_each_subcommand() {
    let o = lockstep(&["ckpt", "--help"], &[]);
    let out = text(&o);
    for sub in ["ls", "inspect", "verify", "gc"] {
        assert!(out.contains(sub), "{out}");
    }
    let o = lockstep(&["ckpt", "verify", "--help"], &[]);
    assert!(text(&o).contains("Exits 0 only"), "{}", text(&o));
}

/// A checkpoint that compresses extremely well is not mistaken for a decompression bomb:
/// 256 MiB of zeros stored in a few kilobytes (written by the real writer, every size and hash
/// consistent) verifies under a 1.5 GB address-space limit (`ulimit -v`), decoding bounded per
/// chunk and per read batch. (Footers that claim
/// more than any chunk or shard can decode to are refused when parsed, before anything is
/// decoded: storage/tests/parsers.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_a_highly_compressed_checkpoint_under_a_1_5_gb_address_space_limit() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/zeros", dir.path().display());
    let store = CheckpointStore::open(&url).unwrap();
    let zeros = lockstep_storage::TensorInput {
        name: "model.embed_tokens.weight".into(),
        dtype: lockstep_storage::DType::F32,
        shape: vec![64 << 10, 1 << 10],
        data: bytes::Bytes::from(vec![0u8; 256 << 20]),
    };
    let info = CommitInfo {
        job: "zeros".into(),
        step: 1,
        config_hash: "abc".into(),
        parent: None,
        trainer_state: serde_json::json!({ "step": 1 }),
    };
    store.save(info, &[zeros], 1).await.unwrap();
    let exe = env!("CARGO_BIN_EXE_lockstep");
    let o = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v 1500000 && exec '{exe}' ckpt verify '{url}'"
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("OK"), "{out}");
}

/// A crafted checkpoint whose shard footer claims 64 MiB decoded per chunk from a few stored
/// bytes (a decompression bomb; its footer hash recomputed so it looks intact) is refused
/// before anything is decoded: exit 1 naming the file, under a 1.5 GB address-space limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_a_crafted_decompression_bomb_under_a_1_5_gb_limit() {
    use lockstep_storage::format::shard;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bomb", dir.path().display());
    let store = CheckpointStore::open_with(
        &url,
        lockstep_storage::StoreOptions::default().with_chunk_size(64 << 10),
    )
    .unwrap();
    let t = lockstep_storage::TensorInput {
        name: "w".into(),
        dtype: lockstep_storage::DType::F32,
        shape: vec![1 << 18],
        data: bytes::Bytes::from(vec![0u8; 1 << 20]),
    };
    let info = CommitInfo {
        job: "bomb".into(),
        step: 1,
        config_hash: "abc".into(),
        parent: None,
        trainer_state: serde_json::json!({ "step": 1 }),
    };
    store.save(info, &[t], 1).await.unwrap();
    let file = dir.path().join("bomb/step-000000000001/rank-00000.shard");
    let bytes = std::fs::read(&file).unwrap();
    let len = bytes.len() as u64;
    let trailer = shard::parse_trailer(&bytes[bytes.len() - 32..], len).unwrap();
    let footer_start = (len - shard::TRAILER_LEN - trailer.footer_len) as usize;
    let mut footer =
        shard::parse_footer(&bytes[footer_start..bytes.len() - 32], &trailer, len).unwrap();
    assert!(footer.chunks.len() >= 4);
    for (i, c) in footer.chunks.iter_mut().enumerate() {
        c.raw_len = shard::MAX_CHUNK_RAW_LEN;
        c.raw_offset = i as u64 * shard::MAX_CHUNK_RAW_LEN;
    }
    footer.raw_bytes = footer.chunks.len() as u64 * shard::MAX_CHUNK_RAW_LEN;
    let (tail, _) = shard::encode_footer(&footer);
    let mut crafted = bytes[..footer_start].to_vec();
    crafted.extend_from_slice(&tail);
    std::fs::write(&file, &crafted).unwrap();
    // The manifest's size claim follows, as a forger's would.
    let manifest = dir.path().join("bomb/step-000000000001/manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["shards"][0]["bytes"] = crafted.len().into();
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();

    let exe = env!("CARGO_BIN_EXE_lockstep");
    let o = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v 1500000 && exec '{exe}' ckpt verify '{url}'"
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("rank-00000.shard") && out.contains("decompression bomb"),
        "{out}"
    );
}

/// The read-only tools never create anything: a checkpoint root that does not exist is an
/// error (exit 2), and stays absent.
#[test]
fn reading_a_root_that_does_not_exist_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope/a");
    let url = format!("file://{}", missing.display());
    for args in [
        vec!["ckpt", "ls", url.as_str()],
        vec!["ckpt", "verify", url.as_str()],
    ] {
        let o = lockstep(&args, &[]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains("not found"), "{}", text(&o));
    }
    assert!(!dir.path().join("nope").exists(), "a directory was created");
}

/// A symbolic link in a checkpoint tree (lockstep makes none) is never followed: `ls` shows it,
/// `verify` and resume refuse it at once naming it, and `gc` removes the link itself, never the
/// files it points to, nor a kept checkpoint reached through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_ls_and_verify_never_follow_symbolic_links() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ck");
    let url = format!("file://{}", root.display());
    let store = CheckpointStore::open(&url).unwrap();
    for step in [5, 6] {
        save(&store, step, 1).await;
    }
    let step_dir = |s: u64| root.join(format!("step-{s:012}"));
    // Elsewhere: files gc must not touch.
    let outside = dir.path().join("precious");
    std::fs::create_dir_all(&outside).unwrap();
    for i in 0..5 {
        std::fs::write(outside.join(format!("f{i}")), b"keep me").unwrap();
    }
    std::os::unix::fs::symlink(&outside, step_dir(2)).unwrap();
    // Another step reaching the kept step 6; a loop inside step 5.
    std::os::unix::fs::symlink(step_dir(6), step_dir(9)).unwrap();
    std::os::unix::fs::symlink("..", step_dir(5).join("up")).unwrap();

    let o = lockstep(&["ckpt", "ls", &url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("symlink").count(), 3, "{}", text(&o));

    let started = std::time::Instant::now();
    let o = lockstep(&["ckpt", "verify", &format!("{url}@5")], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("step-000000000005/up` is a symbolic link"),
        "{}",
        text(&o)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "no retries"
    );
    // Resume refuses the tree, naming the link, as a permanent error.
    let e = store
        .choose_start(lockstep_storage::Want::Latest)
        .await
        .unwrap_err();
    assert!(matches!(e, lockstep_storage::Error::Refused { .. }), "{e}");

    // A dry run says what the run will do: step 5 (a link inside, a whole checkpoint) is
    // deleted by the policy, not called uncommitted debris.
    let o = lockstep(&["ckpt", "gc", &url, "--keep-last", "1", "--dry-run"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("(uncommitted debris)"), "{}", text(&o));
    assert!(text(&o).contains("would delete"), "{}", text(&o));
    let o = lockstep(&["ckpt", "gc", &url, "--keep-last", "1"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("3 link(s) or special file(s) removed"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        5,
        "files behind a link"
    );
    assert!(!step_dir(2).exists() && !step_dir(9).exists());
    assert!(std::fs::symlink_metadata(step_dir(5).join("up")).is_err());
    // The checkpoints themselves are whole: the newest kept, the older one deleted by policy.
    let o = lockstep(&["ckpt", "verify", &format!("{url}@6")], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(store.list().await.unwrap(), vec![6]);
}

/// `lockstep` with `args`, killed (and the test failed) if it is not done within 30 s: the
/// point is that it does not hang.
fn lockstep_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lockstep");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("lockstep {args:?} hung: {}", text(&o));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &std::path::Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(ok.success(), "mkfifo {}", path.display());
}

/// A FIFO in a checkpoint tree (lockstep makes none; opening one waits for a writer forever)
/// is never opened: `ls` shows it, `verify` and resume refuse it at once naming it, and `gc`
/// removes it. A `set-aside` that is a link out of the tree never receives resume's copies:
/// resume refuses it naming it, and `gc` removes the link, not what it points to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_and_a_linked_set_aside_are_never_opened_or_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ck");
    let url = format!("file://{}", root.display());
    let store = CheckpointStore::open(&url).unwrap();
    for step in [5, 6, 7] {
        save(&store, step, 1).await;
    }
    let step_dir = |s: u64| root.join(format!("step-{s:012}"));
    // Step 7's manifest is a FIFO; step 6 has one beside its shards and a flipped byte.
    std::fs::remove_file(step_dir(7).join("manifest.json")).unwrap();
    mkfifo(&step_dir(7).join("manifest.json"));
    mkfifo(&step_dir(6).join("notes"));
    rewrite(&store, &store.shard_path(6, 0), |b| b[20] ^= 0x10).await;
    let outside = dir.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("set-aside")).unwrap();

    let o = lockstep_bounded(&["ckpt", "ls", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("special").count(), 2, "{}", text(&o));
    let o = lockstep_bounded(&["ckpt", "verify", &format!("{url}@7")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("step-000000000007/manifest.json` is a FIFO"),
        "{}",
        text(&o)
    );
    let resume = || {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            store.choose_start(lockstep_storage::Want::Latest),
        )
    };
    let e = resume().await.expect("resume hung").unwrap_err();
    assert!(
        matches!(&e, lockstep_storage::Error::Refused { reason } if reason.contains("is a FIFO")),
        "{e}"
    );

    // ls names the planted set-aside; a dry run previews the removals without failing on
    // them.
    let o = lockstep_bounded(&["ckpt", "ls", &url]);
    assert!(text(&o).contains("set-aside: `"), "{}", text(&o));
    let o = lockstep_bounded(&["ckpt", "gc", &url, "--keep-last", "1", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("would remove") && text(&o).contains("verified once gc removes them"),
        "{}",
        text(&o)
    );
    // gc removes both FIFOs and the link; step 6 does not verify (kept, not counted), so
    // step 5 is kept as the one that does.
    let o = lockstep_bounded(&["ckpt", "gc", &url, "--keep-last", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("3 link(s) or special file(s) removed")
            && out.contains("set-aside` (a symbolic link)"),
        "{out}"
    );
    assert!(outside.is_dir(), "the link's target stays");
    assert_eq!(store.list().await.unwrap(), vec![5, 6]);

    // Resume must set step 6 aside; through a planted link it refuses instead.
    std::os::unix::fs::symlink(&outside, root.join("set-aside")).unwrap();
    let e = resume().await.expect("resume hung").unwrap_err();
    assert!(
        matches!(&e, lockstep_storage::Error::Refused { reason } if reason.contains("set-aside` is a symbolic link")),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "copied out of the tree"
    );
    assert_eq!(store.list().await.unwrap(), vec![5, 6], "nothing moved");
    std::fs::remove_file(root.join("set-aside")).unwrap();
    let start = resume().await.expect("resume hung").unwrap();
    assert_eq!(start.step, Some(5));
    assert!(
        start.set_aside[0]
            .moved_to
            .starts_with(&format!("{url}/set-aside/")),
        "{:?}",
        start.set_aside
    );

    // A regular file where a step directory belongs is shown and left alone.
    std::fs::write(step_dir(3), b"my notes").unwrap();
    let o = lockstep_bounded(&["ckpt", "ls", &url]);
    assert!(text(&o).contains("not a dir"), "{}", text(&o));
    let o = lockstep_bounded(&["ckpt", "gc", &url, "--keep-last", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("left "), "{}", text(&o));
    assert_eq!(std::fs::read(step_dir(3)).unwrap(), b"my notes");

    // A link in an old step does not stand in the way of verifying the newest one.
    save(&store, 8, 1).await;
    std::os::unix::fs::symlink(&outside, step_dir(5).join("l")).unwrap();
    let o = lockstep_bounded(&["ckpt", "verify", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("@8"), "{}", text(&o));
}

/// gc counts only checkpoints that verify: with the newest corrupt, `--keep-last 1` keeps it
/// (resume sets it aside) and the newest one that verifies, so something restorable is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_a_verified_checkpoint_when_the_newest_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ck", dir.path().display());
    let store = CheckpointStore::open(&url).unwrap();
    for step in [100, 200, 300] {
        save(&store, step, 1).await;
    }
    rewrite(&store, &store.shard_path(300, 0), |b| b[20] ^= 0x10).await;
    let o = lockstep(&["ckpt", "gc", &url, "--keep-last", "1"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("does not verify, not counted"), "{out}");
    assert_eq!(store.list().await.unwrap(), vec![200, 300], "{out}");
    let start = store
        .choose_start(lockstep_storage::Want::Latest)
        .await
        .unwrap();
    assert_eq!(start.step, Some(200));
    // When none verifies, nothing is deleted.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ck", dir.path().display());
    let store = CheckpointStore::open(&url).unwrap();
    for step in [1, 2] {
        save(&store, step, 1).await;
        rewrite(&store, &store.shard_path(step, 0), |b| b[20] ^= 0x10).await;
    }
    let o = lockstep(&["ckpt", "gc", &url, "--keep-last", "1"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(store.list().await.unwrap(), vec![1, 2], "{}", text(&o));
}

/// What `ckpt inspect` reads and prints is bounded: a checkpoint of 100 shards lists 64 and
/// sums the rest in one line (`--json` has them all); a manifest past 64 MiB is refused by its
/// size before it is read (trailing spaces keep it valid JSON, so only the cap refuses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_summarises_many_shards_and_a_huge_manifest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ck", tmp.path().display());
    let store = CheckpointStore::open(&url).unwrap();
    save(&store, 3, 100).await;
    let out = lockstep(&["ckpt", "inspect", &format!("{url}@3")], &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let shard_lines = t
        .lines()
        .filter(|l| l.contains("rank-") && l.contains(".shard"))
        .count();
    assert_eq!(shard_lines, 64, "{t}");
    assert!(t.contains("… and 36 more shards"), "{t}");
    let out = lockstep(&["ckpt", "inspect", &format!("{url}@3"), "--json"], &[]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["shards"].as_array().unwrap().len(), 100);

    let manifest = tmp.path().join("ck/step-000000000003/manifest.json");
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes.resize(65 << 20, b' ');
    std::fs::write(&manifest, &bytes).unwrap();
    let out = lockstep(&["ckpt", "inspect", &format!("{url}@3")], &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("68157440 bytes") && t.contains("64 MiB") && t.contains("manifest.json"),
        "{t}"
    );
    // A file where a step's directory belongs is refused at once, not retried for 25 s.
    std::fs::write(tmp.path().join("ck/step-000000000009"), b"x").unwrap();
    let started = std::time::Instant::now();
    let out = lockstep(&["ckpt", "verify", &format!("{url}@9")], &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("is a file, not a checkpoint directory"), "{t}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{t}"
    );
}
