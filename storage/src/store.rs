//! [`CheckpointStore`]: checkpoints over any [`ObjectStore`].

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::format::manifest::{Manifest, ManifestError};
use crate::layout::parse_step_dir;
use crate::location::Location;
use crate::retention::{KeepReason, RetentionPolicy};
use crate::retry::RetryPolicy;
use crate::writer::{CommitInfo, ShardMeta, assemble_manifest};
use crate::{Error, Result};

pub use crate::layout::MANIFEST_FILE;
pub use crate::local::StrayKind;

/// The largest manifest read: a Llama 3 8B (291 tensors) with every tensor split over 1,024
/// ranks needs about 25 MB.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The smallest part S3 accepts (but for the last part of an upload).
pub const MIN_S3_PART: usize = 5 << 20;

/// Tuning knobs of a [`CheckpointStore`]. The defaults suit local disks and S3 alike.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Decoded bytes per chunk (the unit of compression, hashing and parallelism).
    pub chunk_size: usize,
    /// Bytes per multipart-upload part; shards smaller than one part are written with one put.
    /// S3 refuses parts under 5 MiB (but the last); `open` raises it to that for `s3://`.
    pub part_size: usize,
    /// Parts uploaded concurrently per shard; with `part_size` this bounds upload memory.
    pub parts_in_flight: usize,
    /// zstd level for chunk compression.
    pub zstd_level: i32,
    /// Stored bytes fetched per range read when loading.
    pub read_batch: usize,
    /// Range reads in flight when loading.
    pub reads_in_flight: usize,
    /// Retries of failed store operations (and of whole shard uploads).
    pub retry: RetryPolicy,
    /// `fsync` shards and manifests of `file://` stores before reporting them durable.
    pub fsync: bool,
    /// Objects larger than this are copied by streaming them through a multipart upload
    /// instead of one server-side copy (S3's CopyObject refuses sources over 5 GiB).
    pub server_copy_limit: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: 4 << 20,
            part_size: 16 << 20,
            parts_in_flight: 4,
            zstd_level: 1,
            read_batch: 16 << 20,
            reads_in_flight: 4,
            retry: RetryPolicy::default(),
            fsync: true,
            server_copy_limit: 5 << 30,
        }
    }
}

impl StoreOptions {
    /// Sets [`StoreOptions::server_copy_limit`].
    #[must_use]
    pub fn with_server_copy_limit(mut self, bytes: u64) -> Self {
        self.server_copy_limit = bytes;
        self
    }
    /// Sets [`StoreOptions::chunk_size`].
    #[must_use]
    pub fn with_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.clamp(64, crate::format::shard::MAX_CHUNK_RAW_LEN as usize);
        self
    }
    /// Sets [`StoreOptions::part_size`].
    #[must_use]
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(1);
        self
    }
    /// Sets [`StoreOptions::zstd_level`].
    #[must_use]
    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }
    /// Sets [`StoreOptions::retry`].
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Sets [`StoreOptions::fsync`].
    #[must_use]
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }
}

/// Checkpoints under one URL, over any [`ObjectStore`] (`file://`, `s3://`, `memory://`).
///
/// Layout: `step-{step:012}/rank-{rank:05}.shard` for each rank, then
/// `step-{step:012}/manifest.json`.
///
/// # Guarantees
/// - A checkpoint exists only once its manifest exists. The manifest is written last, with
///   create-only semantics ([`PutMode::Create`]): of two committers of one step, one wins and
///   the other gets [`Error::AlreadyCommitted`] (or success, if it wrote identical bytes).
/// - [`CheckpointStore::commit`] first checks that every shard is present with the size the
///   manifest records; on `file://` stores shards and manifest are `fsync`ed.
/// - Readers verify every chunk hash, every piece hash, the footer hash and the file sizes, and
///   fail closed with [`Error::Corrupt`] naming the file and chunk.
/// - Transient store errors are retried with backoff ([`StoreOptions::retry`]).
///
/// # Tokio compatibility
/// All methods are `async` and must run inside a Tokio runtime. Compression, hashing and
/// `fsync` run on Tokio's blocking pool (and Rayon's pool for chunk parallelism), never on the
/// async workers.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pub(crate) inner: Arc<dyn ObjectStore>,
    pub(crate) root: Path,
    pub(crate) url: String,
    pub(crate) local_dir: Option<PathBuf>,
    pub(crate) opts: StoreOptions,
}

/// One step directory as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepListing {
    /// The step.
    pub step: u64,
    /// Whether its manifest exists.
    pub committed: bool,
    /// Files in the directory.
    pub files: usize,
    /// Stored bytes in the directory.
    pub bytes: u64,
    /// What lockstep never writes there (`file://` stores): symbolic links and special files
    /// (FIFOs, sockets, devices) that are the directory or are in it, or a regular file where
    /// the directory belongs. None is followed or opened: a step with strays is not a usable
    /// checkpoint until they are removed (`lockstep ckpt gc` removes links and special files
    /// themselves, never what a link points to).
    pub strays: Vec<Stray>,
}

/// An entry in a `file://` checkpoint tree that lockstep never writes, follows or opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    /// Its path.
    pub path: String,
    /// What it is.
    pub kind: StrayKind,
}

impl Stray {
    fn new((path, kind): (PathBuf, StrayKind)) -> Self {
        Self {
            path: path.display().to_string(),
            kind,
        }
    }
}

impl std::fmt::Display for Stray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` ({})", self.path, self.kind.describe())
    }
}

/// One checkpoint to commit with [`CheckpointStore::commit_step`].
#[derive(Debug, Clone)]
pub struct StepCommit {
    /// Job name (in the manifest).
    pub job: String,
    /// The step.
    pub step: u64,
    /// Hash of what decides the run's results (in the manifest).
    pub config_hash: String,
    /// The trainer state at this step (opaque to storage).
    pub trainer_state: serde_json::Value,
    /// Every rank's durable shard, any order.
    pub shards: Vec<ShardMeta>,
    /// Retention applied after the commit.
    pub retention: RetentionPolicy,
    /// Steps retention must keep (the one the run resumed from).
    pub protected: Vec<u64>,
}

/// A committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The step.
    pub step: u64,
    /// Stored bytes of all shards.
    pub bytes: u64,
    /// Decoded bytes of all shards.
    pub raw_bytes: u64,
    /// The manifest's parent.
    pub parent: Option<u64>,
    /// What retention did, or why it failed (the commit stands either way).
    pub retention: std::result::Result<GcReport, String>,
}

/// What [`CheckpointStore::gc`] did (or would do, in a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Committed steps kept, with the reason.
    pub kept: Vec<(u64, KeepReason)>,
    /// Committed steps deleted.
    pub deleted: Vec<u64>,
    /// Uncommitted step directories older than the newest commit (debris of failed attempts),
    /// deleted.
    pub debris: Vec<u64>,
    /// Committed steps that do not verify, with why: kept (resume sets them aside), not
    /// counted towards the policy.
    pub unverified: Vec<(u64, String)>,
    /// Links and special files found in the tree and removed (a link, never what it points
    /// to), and regular files where a step directory belongs (left alone, reported).
    pub strays: Vec<Stray>,
    /// A dry run's kept steps that hold links or special files: the real gc removes those,
    /// then verifies the step; the dry run, which removes nothing, counts it as verifying.
    pub unchecked: Vec<u64>,
}

/// Splits a checkpoint target `URL[@STEP]`; `@latest` and no suffix mean the newest. Only a
/// numeric suffix is a step (an `@` elsewhere stays in the URL).
pub fn split_target(target: &str) -> Result<(&str, Option<u64>)> {
    match target.rsplit_once('@') {
        Some((url, "latest")) => Ok((url, None)),
        Some((url, step)) if !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()) => {
            let step = step
                .parse()
                .map_err(|_| Error::Invalid(format!("step `{step}` is out of range")))?;
            Ok((url, Some(step)))
        }
        _ => Ok((target, None)),
    }
}

/// `inner` wrapped in an [`crate::UnreliableStore`] when [`crate::fault::FAULTS_ENV`] asks for
/// one (a soak or drill), each process with its own fault sequence.
fn faulty(inner: Arc<dyn ObjectStore>, url: &str) -> Result<Arc<dyn ObjectStore>> {
    let env = crate::fault::FAULTS_ENV;
    let spec = match std::env::var(env) {
        Ok(spec) if !spec.trim().is_empty() => spec,
        _ => return Ok(inner),
    };
    let mut faults = crate::Faults::parse(&spec)
        .map_err(|e| Error::Invalid(format!("the environment variable {env}: {e}")))?;
    if faults == crate::Faults::default() {
        return Ok(inner);
    }
    faults.seed ^= u64::from(std::process::id()).rotate_left(32);
    tracing::warn!(%url, %spec, "{env} is set: this checkpoint store injects faults");
    Ok(Arc::new(crate::UnreliableStore::new(inner, faults)))
}

impl CheckpointStore {
    /// Opens the checkpoint root at `url` with default options. `file://` directories are
    /// created if missing; `s3://` reads credentials, region and endpoint from `AWS_*`.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, StoreOptions::default())
    }

    /// Opens the checkpoint root at `url` for reading: a `file://` directory that does not
    /// exist is [`Error::NotFound`], never created (the `ckpt` tools).
    pub fn open_existing(url: &str) -> Result<Self> {
        if let Location::File(dir) = Location::parse(url.trim_end_matches('/'))?
            && !dir.is_dir()
        {
            return Err(Error::NotFound {
                path: dir.display().to_string(),
            });
        }
        Self::open(url)
    }

    /// Opens `url` with `opts`.
    pub fn open_with(url: &str, opts: StoreOptions) -> Result<Self> {
        let mut url = url.to_string();
        while url.ends_with('/') && !url.ends_with("://") {
            url.pop();
        }
        let mut opts = opts;
        let bad = |reason: String| Error::InvalidUrl {
            url: url.clone(),
            reason,
        };
        let (inner, root, local_dir): (Arc<dyn ObjectStore>, Path, Option<PathBuf>) =
            match Location::parse(&url)? {
                Location::File(dir) => {
                    std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
                        op: "create checkpoint directory",
                        path: dir.clone(),
                        source: e,
                    })?;
                    let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| bad(e.to_string()))?
                        .with_automatic_cleanup(true);
                    (Arc::new(fs), Path::default(), Some(dir))
                }
                Location::S3 { bucket, prefix } => {
                    opts.part_size = opts.part_size.max(MIN_S3_PART);
                    let s3 =
                        crate::location::s3_from_env(&bucket).map_err(|e| bad(e.to_string()))?;
                    (Arc::new(s3), Path::from(prefix), None)
                }
                Location::Memory => (
                    Arc::new(object_store::memory::InMemory::new()),
                    Path::default(),
                    None,
                ),
            };
        let inner = faulty(inner, &url)?;
        Ok(CheckpointStore {
            inner,
            root,
            url,
            local_dir,
            opts,
        })
    }

    /// Wraps an existing object store; checkpoints live under `root`. `url` is used in
    /// messages only.
    pub fn new(inner: Arc<dyn ObjectStore>, root: Path, url: impl Into<String>) -> Self {
        CheckpointStore {
            inner,
            root,
            url: url.into(),
            local_dir: None,
            opts: StoreOptions::default(),
        }
    }

    /// Replaces the options.
    #[must_use]
    pub fn with_options(mut self, opts: StoreOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The options in force.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The URL this store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store (for tools and fault-injection tests).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Directory of `step`.
    pub fn step_dir(&self, step: u64) -> Path {
        self.root.clone().join(format!("step-{step:012}"))
    }

    /// File name of `rank`'s shard within a step directory.
    pub fn shard_file(rank: u32) -> String {
        format!("rank-{rank:05}.shard")
    }

    /// Path of `rank`'s shard of `step`.
    pub fn shard_path(&self, step: u64, rank: u32) -> Path {
        self.step_dir(step).join(Self::shard_file(rank))
    }

    /// Path of `step`'s manifest.
    pub fn manifest_path(&self, step: u64) -> Path {
        self.step_dir(step).join(MANIFEST_FILE)
    }

    /// `path` as a user should read it in a message: the store URL plus the relative path.
    pub(crate) fn display(&self, path: &Path) -> String {
        let rel: Vec<_> = match path.prefix_match(&self.root) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect(),
            None => vec![path.to_string()],
        };
        format!("{}/{}", self.url, rel.join("/"))
    }

    /// Lists every step directory, committed or not, in ascending step order.
    pub async fn list_all(&self) -> Result<Vec<StepListing>> {
        if let Some(dir) = self.local_dir.clone() {
            // Not through object_store: its local listing follows links (out of the tree,
            // or round a loop).
            let listed =
                crate::local::blocking("list checkpoints", dir, crate::local::list_steps).await?;
            return Ok(listed
                .into_iter()
                .map(|s| StepListing {
                    step: s.step,
                    committed: s.manifest && s.strays.is_empty(),
                    files: s.files,
                    bytes: s.bytes,
                    strays: s.strays.into_iter().map(Stray::new).collect(),
                })
                .collect());
        }
        let root = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let objects: Vec<_> = self
            .opts
            .retry
            .run("list checkpoints", Error::is_transient, || async {
                self.inner
                    .list(root)
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| Error::store("list checkpoints", &self.url, e))
            })
            .await?;
        let mut steps = std::collections::BTreeMap::<u64, StepListing>::new();
        for o in objects {
            let Some(parts) = o.location.prefix_match(&self.root) else {
                continue;
            };
            let parts: Vec<_> = parts.map(|p| p.as_ref().to_string()).collect();
            let [dir, file] = parts.as_slice() else {
                continue;
            };
            let Some(step) = parse_step_dir(dir) else {
                continue;
            };
            let e = steps.entry(step).or_insert(StepListing {
                step,
                committed: false,
                files: 0,
                bytes: 0,
                strays: Vec::new(),
            });
            e.files += 1;
            e.bytes += o.size;
            e.committed |= file == MANIFEST_FILE;
        }
        Ok(steps.into_values().collect())
    }

    /// Committed steps, ascending. A link or special file in the tree is refused, naming it
    /// (a run must not start from, or past, a checkpoint it cannot read as written); a regular
    /// file where a step directory belongs is not a checkpoint and is passed over.
    pub async fn list(&self) -> Result<Vec<u64>> {
        let all = self.list_all().await?;
        if let Some(stray) = all
            .iter()
            .flat_map(|s| &s.strays)
            .find(|s| s.kind.removable())
        {
            return Err(stray_refused(stray));
        }
        Ok(all
            .into_iter()
            .filter(|s| s.committed)
            .map(|s| s.step)
            .collect())
    }

    /// The newest committed step (not verified: see [`CheckpointStore::choose_start`]).
    pub async fn latest(&self) -> Result<Option<u64>> {
        Ok(self.list().await?.last().copied())
    }

    /// Reads and validates `step`'s manifest (a step directory that is or holds a symbolic
    /// link or a special file is refused, naming it: its files are not read through links,
    /// and a FIFO is never opened).
    pub async fn manifest(&self, step: u64) -> Result<Manifest> {
        if let Some(dir) = &self.local_dir {
            let dir = dir.join(format!("step-{step:012}"));
            let strays = crate::local::blocking(
                "read checkpoint directory",
                dir.clone(),
                crate::local::strays_in,
            )
            .await?;
            if let Some(stray) = strays.into_iter().next() {
                // Nothing to retry.
                return Err(stray_refused(&Stray::new(stray)));
            }
        }
        let path = self.manifest_path(step);
        let file = self.display(&path);
        // Its size is a claim like any other: a manifest past the cap is not read.
        let size = match self.head_size(&path, "read manifest").await {
            Err(Error::NotFound { .. }) => {
                return Err(Error::NotCommitted {
                    url: self.url.clone(),
                    step,
                });
            }
            r => r?,
        };
        if size > MAX_MANIFEST_BYTES {
            return Err(Error::corrupt(
                &file,
                None,
                format!(
                    "the manifest is {size} bytes, more than the {} MiB one may be",
                    MAX_MANIFEST_BYTES >> 20
                ),
            ));
        }
        let bytes = match self.get_range(&path, 0..size, "read manifest").await {
            Err(Error::NotFound { .. }) => {
                return Err(Error::NotCommitted {
                    url: self.url.clone(),
                    step,
                });
            }
            r => r?,
        };
        let m = Manifest::parse(&bytes).map_err(|e| match e {
            ManifestError::Version(found) => Error::UnsupportedVersion {
                file: file.clone(),
                found,
                supported: crate::format::FORMAT_VERSION,
            },
            ManifestError::Invalid(reason) => Error::corrupt(&file, None, reason),
        })?;
        if m.step != step {
            return Err(Error::corrupt(
                file,
                None,
                format!("manifest is for step {}", m.step),
            ));
        }
        Ok(m)
    }

    /// Commits a checkpoint: checks that every shard the manifest names is present with its
    /// recorded size, then writes the manifest create-only. Idempotent for identical manifests.
    pub async fn commit(&self, manifest: &Manifest) -> Result<()> {
        manifest
            .validate()
            .map_err(|r| Error::Invalid(format!("manifest for step {}: {r}", manifest.step)))?;
        let step = manifest.step;
        for s in &manifest.shards {
            let path = self.step_dir(step).join(s.file.as_str());
            let size = match self.head_size(&path, "check shard").await {
                Err(Error::NotFound { .. }) => {
                    return Err(Error::Invalid(format!(
                        "cannot commit step {step}: shard `{}` is missing",
                        self.display(&path)
                    )));
                }
                r => r?,
            };
            if size != s.bytes {
                return Err(Error::TornUpload {
                    path: self.display(&path),
                    expected: s.bytes,
                    found: size,
                });
            }
        }
        let path = self.manifest_path(step);
        let json = Bytes::from(manifest.to_json());
        self.opts
            .retry
            .run("commit manifest", Error::is_transient, || async {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match self
                    .inner
                    .put_opts(&path, PutPayload::from(json.clone()), opts)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => {
                        // Ours, if an earlier attempt succeeded but its reply was lost.
                        let existing = self.get(&path, "read manifest").await?;
                        if existing == json {
                            Ok(())
                        } else {
                            Err(Error::AlreadyCommitted {
                                step,
                                path: self.display(&path),
                            })
                        }
                    }
                    Err(e) => Err(Error::store("commit manifest", self.display(&path), e)),
                }
            })
            .await?;
        self.sync_local(&path, true).await?;
        tracing::info!(step, url = %self.url, "checkpoint committed");
        Ok(())
    }

    /// Commits a checkpoint from every rank's durable shard, then applies retention: the one
    /// commit path, whoever holds the commit authority (the coordinator, or rank 0 of a gang
    /// without one). The manifest's parent is the newest committed step before this one (the
    /// checkpoint this run descends from: runs never resume under newer checkpoints). A
    /// retention failure does not undo the commit: it is logged and reported in
    /// [`Committed::retention`].
    pub async fn commit_step(&self, c: StepCommit) -> Result<Committed> {
        let parent = self.list().await?.into_iter().filter(|&s| s < c.step).max();
        let bytes = c.shards.iter().map(|m| m.shard.bytes).sum();
        let raw_bytes = c.shards.iter().map(|m| m.shard.raw_bytes).sum();
        let info = CommitInfo {
            job: c.job,
            step: c.step,
            config_hash: c.config_hash,
            parent,
            trainer_state: c.trainer_state,
        };
        let manifest = assemble_manifest(info, c.shards)?;
        self.commit(&manifest).await?;
        let retention = self.gc(&c.retention, &c.protected, false).await;
        match &retention {
            Ok(r) if !r.deleted.is_empty() || !r.debris.is_empty() => {
                tracing::debug!(deleted = ?r.deleted, debris = ?r.debris, "retention applied");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(step = c.step, url = %self.url, error = %e,
                    "retention failed after the commit; old checkpoints stay until the next one");
            }
        }
        Ok(Committed {
            step: c.step,
            bytes,
            raw_bytes,
            parent,
            retention: retention.map_err(|e| e.to_string()),
        })
    }

    /// Deletes `step`: the manifest first (so the checkpoint stops existing atomically), then
    /// the rest of the directory. Deleting a missing step succeeds.
    pub async fn delete(&self, step: u64) -> Result<()> {
        if let Some(dir) = &self.local_dir {
            // Not through object_store, whose local listing follows links: a link is removed,
            // never what it points to.
            let dir = dir.join(format!("step-{step:012}"));
            return crate::local::blocking("delete checkpoint", dir, crate::local::remove_step)
                .await;
        }
        let manifest = self.manifest_path(step);
        self.delete_object(&manifest).await?;
        for f in self.list_dir(&self.step_dir(step)).await? {
            self.delete_object(&f).await?;
        }
        Ok(())
    }

    /// Every object under `dir`.
    pub(crate) async fn list_dir(&self, dir: &Path) -> Result<Vec<Path>> {
        let files = self.list_dir_sizes(dir).await?;
        Ok(files.into_iter().map(|(p, _)| p).collect())
    }

    /// Copies one object of `size` bytes: server-side up to
    /// [`StoreOptions::server_copy_limit`], else streamed through a multipart upload.
    pub(crate) async fn copy_object(&self, from: &Path, to: &Path, size: u64) -> Result<()> {
        if size > self.opts.server_copy_limit {
            return self
                .opts
                .retry
                .run("copy", Error::is_transient, || self.stream_copy(from, to))
                .await;
        }
        self.opts
            .retry
            .run("copy", Error::is_transient, || async {
                self.inner
                    .copy(from, to)
                    .await
                    .map_err(|e| Error::store("copy", self.display(from), e))
            })
            .await
    }

    /// Copies `from` to `to` by reading it and writing it back in parts.
    async fn stream_copy(&self, from: &Path, to: &Path) -> Result<()> {
        use futures::StreamExt;
        let err = |e| Error::store("copy", self.display(from), e);
        let got = self.inner.get(from).await.map_err(err)?;
        let mut stream = got.into_stream();
        let upload = self.inner.put_multipart(to).await.map_err(err)?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, self.opts.part_size);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(err(e));
                }
            };
            if let Err(e) = w.wait_for_capacity(self.opts.parts_in_flight.max(1)).await {
                // Abort, or the parts uploaded so far stay (and are billed) on S3.
                let _ = w.abort().await;
                return Err(err(e));
            }
            w.write(&chunk);
        }
        // (On failure `finish` aborts the upload itself.)
        w.finish().await.map_err(err)?;
        Ok(())
    }

    /// Every object under `dir`, with its size.
    pub(crate) async fn list_dir_sizes(&self, dir: &Path) -> Result<Vec<(Path, u64)>> {
        let files: Vec<_> = self
            .opts
            .retry
            .run("list step", Error::is_transient, || async {
                self.inner
                    .list(Some(dir))
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| Error::store("list step", self.display(dir), e))
            })
            .await?;
        Ok(files.into_iter().map(|f| (f.location, f.size)).collect())
    }

    pub(crate) async fn get(&self, path: &Path, op: &'static str) -> Result<Bytes> {
        self.opts
            .retry
            .run(op, Error::is_transient, || async {
                let r = self
                    .inner
                    .get(path)
                    .await
                    .map_err(|e| Error::store(op, self.display(path), e))?;
                r.bytes()
                    .await
                    .map_err(|e| Error::store(op, self.display(path), e))
            })
            .await
    }

    pub(crate) async fn get_range(
        &self,
        path: &Path,
        range: std::ops::Range<u64>,
        op: &'static str,
    ) -> Result<Bytes> {
        let expected = range.end - range.start;
        let bytes = self
            .opts
            .retry
            .run(op, Error::is_transient, || async {
                self.inner
                    .get_range(path, range.clone())
                    .await
                    .map_err(|e| Error::store(op, self.display(path), e))
            })
            .await?;
        if bytes.len() as u64 != expected {
            return Err(Error::corrupt(
                self.display(path),
                None,
                format!(
                    "read of bytes {range:?} returned {} bytes (truncated)",
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    pub(crate) async fn head_size(&self, path: &Path, op: &'static str) -> Result<u64> {
        self.opts
            .retry
            .run(op, Error::is_transient, || async {
                self.inner
                    .head(path)
                    .await
                    .map(|m| m.size)
                    .map_err(|e| Error::store(op, self.display(path), e))
            })
            .await
    }

    /// Deletes one object; one already gone is fine.
    pub(crate) async fn delete_object(&self, path: &Path) -> Result<()> {
        self.opts
            .retry
            .run("delete", Error::is_transient, || async {
                match self.inner.delete(path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(Error::store("delete", self.display(path), e)),
                }
            })
            .await
    }

    /// On `file://` stores with fsync on: flushes `path` (and with `dirs`, its directory and
    /// the root) to disk. A no-op elsewhere: object stores acknowledge durable writes.
    pub(crate) async fn sync_local(&self, path: &Path, dirs: bool) -> Result<()> {
        let Some(root) = self.local_dir.clone().filter(|_| self.opts.fsync) else {
            return Ok(());
        };
        let file = root.join(path.as_ref());
        tokio::task::spawn_blocking(move || {
            let sync = |p: &std::path::Path| {
                std::fs::File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::Io {
                        op: "fsync",
                        path: p.to_path_buf(),
                        source: e,
                    })
            };
            sync(&file)?;
            if dirs {
                if let Some(dir) = file.parent() {
                    sync(dir)?;
                }
                sync(&root)?;
            }
            Ok(())
        })
        .await?
    }
}

/// A stray in a checkpoint tree: a permanent refusal naming it.
pub(crate) fn stray_refused(stray: &Stray) -> Error {
    let reason = match stray.kind {
        StrayKind::File => format!(
            "`{}` is a file, not a checkpoint directory (lockstep wrote no such file: move it \
             aside)",
            stray.path
        ),
        StrayKind::Link => format!(
            "`{}` is a symbolic link in the checkpoint tree: lockstep never follows links \
             there (remove it; `lockstep ckpt gc` removes links without touching what they \
             point to)",
            stray.path
        ),
        kind => format!(
            "`{}` is {} in the checkpoint tree: lockstep never opens one there (remove it; \
             `lockstep ckpt gc` removes it)",
            stray.path,
            kind.describe()
        ),
    };
    Error::Refused { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_on_a_numeric_suffix_only() {
        assert_eq!(split_target("file://a@3").unwrap(), ("file://a", Some(3)));
        assert_eq!(split_target("file://a@latest").unwrap(), ("file://a", None));
        assert_eq!(split_target("file://a").unwrap(), ("file://a", None));
        assert_eq!(split_target("s3://b/x@y").unwrap(), ("s3://b/x@y", None));
        assert!(split_target("file://a@99999999999999999999999").is_err());
    }

    #[test]
    fn step_dirs_parse_strictly() {
        assert_eq!(parse_step_dir("step-000000001200"), Some(1200));
        assert_eq!(parse_step_dir("step-"), None);
        assert_eq!(parse_step_dir("step-12a"), None);
        assert_eq!(parse_step_dir("rank-1"), None);
        assert_eq!(parse_step_dir("step-35"), None, "not as lockstep writes it");
        assert_eq!(
            parse_step_dir("step-1234567890123"),
            Some(1_234_567_890_123)
        );
    }
}
