//! Writing checkpoints: the streaming [`ShardWriter`], whole-shard retries, and manifest
//! assembly from the ranks' [`ShardMeta`]s.

use std::collections::VecDeque;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};

use crate::format::FORMAT_VERSION;
use crate::format::codec::{self, Codec};
use crate::format::manifest::{MANIFEST_FORMAT, Manifest, PieceEntry, ShardInfo, TensorEntry};
use crate::format::shard::{self, ChunkEntry, ShardFooter};
use crate::plan::{TensorSize, plan};
use crate::{CheckpointStore, DType, Error, Result};

/// A whole tensor to checkpoint: host bytes, little-endian, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInput {
    /// Name, unique in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// The bytes (`product(shape) * dtype.size()` of them).
    pub data: Bytes,
}

/// A byte range of a tensor, as one rank writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PieceInput {
    /// Tensor name.
    pub tensor: String,
    /// Element type of the tensor.
    pub dtype: DType,
    /// Shape of the whole tensor.
    pub shape: Vec<u64>,
    /// Offset of `data` within the tensor's bytes.
    pub tensor_offset: u64,
    /// The piece's bytes.
    pub data: Bytes,
}

/// What a rank reports after its shard is durable; the coordinator assembles the manifest
/// from all ranks' metas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Step of the checkpoint.
    pub step: u64,
    /// The shard file as the manifest will record it (rank, file, sizes, chunks, footer hash);
    /// flattened, so the JSON a rank sends keeps its fields at the top level.
    #[serde(flatten)]
    pub shard: ShardInfo,
    /// The pieces, in shard order.
    pub pieces: Vec<PieceMeta>,
}

/// One written piece.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceMeta {
    /// Tensor name.
    pub tensor: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of the whole tensor.
    pub shape: Vec<u64>,
    /// Offset within the tensor.
    pub tensor_offset: u64,
    /// Offset within the shard's decoded stream.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// xxh3-128 of the bytes, 32 hex digits.
    pub hash: String,
}

/// The parts of a manifest that do not come from the shards.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitInfo {
    /// Job name.
    pub job: String,
    /// Step.
    pub step: u64,
    /// Hash of the job config.
    pub config_hash: String,
    /// The checkpoint this run resumed from.
    pub parent: Option<u64>,
    /// Trainer state (opaque to storage).
    pub trainer_state: serde_json::Value,
}

/// Rank `rank`'s pieces of `tensors` at `world_size` (see [`crate::plan`]).
pub fn pieces_for_rank(tensors: &[TensorInput], rank: u32, world_size: u32) -> Vec<PieceInput> {
    let sizes: Vec<TensorSize> = tensors
        .iter()
        .map(|t| TensorSize {
            nbytes: t.data.len() as u64,
            element_size: t.dtype.size() as u64,
        })
        .collect();
    let mut plan = plan(&sizes, world_size);
    if rank as usize >= plan.len() {
        return Vec::new();
    }
    plan.swap_remove(rank as usize)
        .into_iter()
        .map(|p| {
            let t = &tensors[p.tensor];
            PieceInput {
                tensor: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                tensor_offset: p.range.start,
                data: t.data.slice(p.range.start as usize..p.range.end as usize),
            }
        })
        .collect()
}

/// Builds and validates the manifest from every rank's [`ShardMeta`] (any order).
pub fn assemble_manifest(info: CommitInfo, mut shards: Vec<ShardMeta>) -> Result<Manifest> {
    shards.sort_by_key(|s| s.shard.rank);
    let mut tensors: Vec<TensorEntry> = Vec::new();
    let mut index = std::collections::HashMap::<String, usize>::new();
    for s in &shards {
        if s.step != info.step {
            return Err(Error::Invalid(format!(
                "rank {} reported a shard of step {}, not {}",
                s.shard.rank, s.step, info.step
            )));
        }
        for p in &s.pieces {
            let i = *index.entry(p.tensor.clone()).or_insert_with(|| {
                tensors.push(TensorEntry {
                    name: p.tensor.clone(),
                    dtype: p.dtype,
                    shape: p.shape.clone(),
                    pieces: Vec::new(),
                });
                tensors.len() - 1
            });
            let t = &mut tensors[i];
            if t.dtype != p.dtype || t.shape != p.shape {
                return Err(Error::Invalid(format!(
                    "ranks disagree on the type or shape of tensor `{}`",
                    p.tensor
                )));
            }
            t.pieces.push(PieceEntry {
                shard: s.shard.rank,
                tensor_offset: p.tensor_offset,
                offset: p.offset,
                length: p.length,
                hash: p.hash.clone(),
            });
        }
    }
    for t in &mut tensors {
        t.pieces.sort_by_key(|p| p.tensor_offset);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        version: FORMAT_VERSION,
        job: info.job,
        step: info.step,
        world_size: shards.len() as u32,
        config_hash: info.config_hash,
        parent: info.parent,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        shards: shards.iter().map(|s| s.shard.clone()).collect(),
        tensors,
        trainer_state: info.trainer_state,
    };
    manifest.validate().map_err(|r| {
        Error::Invalid(format!(
            "cannot assemble the manifest of step {}: {r}",
            info.step
        ))
    })?;
    Ok(manifest)
}

impl CheckpointStore {
    /// Starts streaming `rank`'s shard of `step`. Prefer [`CheckpointStore::write_shard`],
    /// which retries; a writer that fails must be [`ShardWriter::abort`]ed.
    pub fn shard_writer(&self, step: u64, rank: u32) -> ShardWriter {
        ShardWriter {
            store: self.clone(),
            path: self.shard_path(step, rank),
            step,
            rank,
            sink: Sink::Buffered {
                parts: vec![Bytes::from_static(&HEADER)],
                len: HEADER.len(),
            },
            chunks: Vec::new(),
            raw_offset: 0,
            queued_raw: 0,
            file_offset: shard::HEADER_LEN,
            pending: VecDeque::new(),
            pieces: Vec::new(),
        }
    }

    /// Writes `rank`'s shard of `step` from `pieces` and returns its meta once it is durable.
    /// A failed or torn upload is retried whole, with backoff.
    pub async fn write_shard(
        &self,
        step: u64,
        rank: u32,
        pieces: &[PieceInput],
    ) -> Result<ShardMeta> {
        self.opts
            .retry
            .run("write shard", Error::is_transient, || async move {
                let mut w = self.shard_writer(step, rank);
                for p in pieces {
                    if let Err(e) = w.write_piece(p.clone()).await {
                        w.abort().await;
                        return Err(e);
                    }
                }
                w.finish().await
            })
            .await
    }

    /// Saves a whole checkpoint from one process: plans pieces for `world_size` shards, writes
    /// them concurrently and commits. (Distributed jobs call [`CheckpointStore::write_shard`] on
    /// each rank and commit through the coordinator.)
    pub async fn save(
        &self,
        info: CommitInfo,
        tensors: &[TensorInput],
        world_size: u32,
    ) -> Result<Manifest> {
        for t in tensors {
            let expected = t
                .shape
                .iter()
                .try_fold(t.dtype.size() as u64, |a, &d| a.checked_mul(d));
            if expected != Some(t.data.len() as u64) {
                return Err(Error::Invalid(format!(
                    "tensor `{}` has {} bytes; shape {:?} of {} needs {:?}",
                    t.name,
                    t.data.len(),
                    t.shape,
                    t.dtype,
                    expected
                )));
            }
        }
        let writes = (0..world_size.max(1)).map(|rank| {
            let pieces = pieces_for_rank(tensors, rank, world_size.max(1));
            async move { self.write_shard(info.step, rank, &pieces).await }
        });
        let metas = futures::future::try_join_all(writes).await?;
        let manifest = assemble_manifest(info, metas)?;
        self.commit(&manifest).await?;
        Ok(manifest)
    }
}

const HEADER: [u8; shard::HEADER_LEN as usize] = shard::encode_header();

/// Where stored bytes go: held in memory until one part's worth has accumulated (small shards
/// become a single put), then a multipart upload with bounded parts in flight.
enum Sink {
    Buffered { parts: Vec<Bytes>, len: usize },
    Multipart(WriteMultipart),
}

/// Streams one shard to the store. Pieces are cut into chunks; each chunk is compressed and
/// hashed as its own task on the blocking pool, up to [`ShardWriter::window`] tasks ahead of the
/// upload, across piece boundaries (a model of many small tensors keeps every core busy), and
/// the results are uploaded in order.
pub struct ShardWriter {
    store: CheckpointStore,
    path: Path,
    step: u64,
    rank: u32,
    sink: Sink,
    chunks: Vec<ChunkEntry>,
    /// Decoded bytes uploaded so far.
    raw_offset: u64,
    /// Decoded bytes handed to tasks so far (≥ `raw_offset`).
    queued_raw: u64,
    file_offset: u64,
    pending: VecDeque<Pending>,
    pieces: Vec<PieceMeta>,
}

/// Work in flight, in shard order.
enum Pending {
    /// A chunk being encoded: (codec used, stored bytes, hash of the stored bytes, decoded length).
    Chunk(tokio::task::JoinHandle<(Codec, Vec<u8>, String, u64)>),
    /// A piece whose chunks precede it in the queue, and the task hashing its bytes.
    Piece(PieceMeta, tokio::task::JoinHandle<String>),
}

impl ShardWriter {
    /// Chunk tasks in flight: two per core keeps the cores busy while results upload; with the
    /// chunk size this bounds the writer's memory (about 2 × cores × `chunk_size` of output).
    fn window() -> usize {
        2 * std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Appends one piece. Returns once its chunks are queued; errors of earlier pieces surface
    /// here or in [`ShardWriter::finish`].
    pub async fn write_piece(&mut self, piece: PieceInput) -> Result<()> {
        let elem = piece.dtype.size();
        if !piece.data.len().is_multiple_of(elem)
            || !piece.tensor_offset.is_multiple_of(elem as u64)
        {
            return Err(Error::Invalid(format!(
                "piece of `{}` at {} with {} bytes is not aligned to {}-byte elements",
                piece.tensor,
                piece.tensor_offset,
                piece.data.len(),
                elem
            )));
        }
        let chunk = (self.store.opts.chunk_size / elem).max(1) * elem;
        let codec = Codec::for_dtype(piece.dtype);
        let level = self.store.opts.zstd_level;
        let start = self.queued_raw;
        for at in (0..piece.data.len()).step_by(chunk) {
            let c = piece.data.slice(at..(at + chunk).min(piece.data.len()));
            self.queued_raw += c.len() as u64;
            self.pending
                .push_back(Pending::Chunk(tokio::task::spawn_blocking(move || {
                    let (codec, stored) = codec::encode(codec, &c, level);
                    let hash = shard::hash128_hex(&stored);
                    (codec, stored, hash, c.len() as u64)
                })));
            self.drain(Self::window()).await?;
        }
        let data = piece.data.clone();
        let hash = tokio::task::spawn_blocking(move || shard::hash128_hex(&data));
        let meta = PieceMeta {
            tensor: piece.tensor,
            dtype: piece.dtype,
            shape: piece.shape,
            tensor_offset: piece.tensor_offset,
            offset: start,
            length: piece.data.len() as u64,
            hash: String::new(),
        };
        self.pending.push_back(Pending::Piece(meta, hash));
        self.drain(Self::window()).await
    }

    /// Completes queued work in order until at most `keep` items remain.
    async fn drain(&mut self, keep: usize) -> Result<()> {
        while self.pending.len() > keep {
            match self.pending.pop_front() {
                Some(Pending::Chunk(task)) => {
                    let (codec, stored, hash, raw_len) = task.await?;
                    self.chunks.push(ChunkEntry {
                        raw_offset: self.raw_offset,
                        raw_len,
                        offset: self.file_offset,
                        len: stored.len() as u64,
                        codec,
                        hash,
                    });
                    self.raw_offset += raw_len;
                    self.file_offset += stored.len() as u64;
                    self.push(Bytes::from(stored)).await?;
                }
                Some(Pending::Piece(mut meta, hash)) => {
                    meta.hash = hash.await?;
                    self.pieces.push(meta);
                }
                None => break,
            }
        }
        Ok(())
    }

    async fn push(&mut self, bytes: Bytes) -> Result<()> {
        let opts = &self.store.opts;
        match &mut self.sink {
            Sink::Buffered { parts, len } => {
                *len += bytes.len();
                parts.push(bytes);
                if *len >= opts.part_size {
                    let upload = self
                        .store
                        .inner
                        .put_multipart(&self.path)
                        .await
                        .map_err(|e| {
                            Error::store("start shard upload", self.store.display(&self.path), e)
                        })?;
                    let mut w = WriteMultipart::new_with_chunk_size(upload, opts.part_size);
                    for p in std::mem::take(parts) {
                        w.put(p);
                    }
                    self.sink = Sink::Multipart(w);
                }
            }
            Sink::Multipart(w) => {
                w.wait_for_capacity(opts.parts_in_flight)
                    .await
                    .map_err(|e| {
                        Error::store("upload shard part", self.store.display(&self.path), e)
                    })?;
                w.put(bytes);
            }
        }
        Ok(())
    }

    /// Writes the footer, completes the upload, makes it durable and checks the stored size.
    pub async fn finish(mut self) -> Result<ShardMeta> {
        self.drain(0).await?;
        let footer = ShardFooter {
            version: FORMAT_VERSION,
            chunks: std::mem::take(&mut self.chunks),
            raw_bytes: self.raw_offset,
        };
        let (tail, footer_hash) = shard::encode_footer(&footer);
        let total = self.file_offset + tail.len() as u64;
        self.push(Bytes::from(tail)).await?;
        let display = self.store.display(&self.path);
        match self.sink {
            Sink::Buffered { parts, .. } => {
                self.store
                    .inner
                    .put(&self.path, PutPayload::from_iter(parts))
                    .await
                    .map_err(|e| Error::store("upload shard", &display, e))?;
            }
            Sink::Multipart(w) => {
                w.finish()
                    .await
                    .map_err(|e| Error::store("complete shard upload", &display, e))?;
            }
        }
        self.store.sync_local(&self.path, false).await?;
        let found = self.store.head_size(&self.path, "check shard").await?;
        if found != total {
            return Err(Error::TornUpload {
                path: display,
                expected: total,
                found,
            });
        }
        tracing::debug!(
            step = self.step,
            rank = self.rank,
            bytes = total,
            "shard written"
        );
        Ok(ShardMeta {
            step: self.step,
            shard: ShardInfo {
                rank: self.rank,
                file: CheckpointStore::shard_file(self.rank),
                bytes: total,
                raw_bytes: self.raw_offset,
                chunks: footer.chunks.len() as u64,
                footer_hash: format!("{footer_hash:016x}"),
            },
            pieces: self.pieces,
        })
    }

    /// Abandons the shard, aborting a multipart upload in progress.
    pub async fn abort(self) {
        if let Sink::Multipart(w) = self.sink
            && let Err(e) = w.abort().await
        {
            tracing::warn!(cause = %e, path = %self.path, "abort shard upload");
        }
    }
}
