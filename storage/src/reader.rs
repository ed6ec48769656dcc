//! Reading checkpoints: [`CheckpointStore::load`] and [`CheckpointStore::verify`] (which
//! [`CheckpointStore::choose_start`] builds on). Every byte is checked: file sizes, header, trailer,
//! footer hash, each chunk's hash, each piece's hash. Loading fails closed.

use bytes::Bytes;
use futures::StreamExt;
use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::format::FORMAT_VERSION;
use crate::format::codec;
use crate::format::manifest::{Manifest, ShardInfo};
use crate::format::shard::{self, ChunkEntry, ShardFooter, ShardFormatError};
use crate::{CheckpointStore, DType, Error, Result};

/// A loaded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Little-endian, row-major bytes.
    pub data: Vec<u8>,
}

/// A loaded, verified checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its tensors, in manifest order.
    pub tensors: Vec<Tensor>,
}

impl Checkpoint {
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The outcome of [`CheckpointStore::verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// The step checked.
    pub step: u64,
    /// Shard files checked.
    pub shards: usize,
    /// Chunks whose hash was checked.
    pub chunks: u64,
    /// Stored bytes read.
    pub stored_bytes: u64,
    /// Decoded bytes checked.
    pub raw_bytes: u64,
    /// Everything that failed, each naming its file (and chunk).
    pub problems: Vec<Error>,
}

impl VerifyReport {
    /// True when every check passed.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl CheckpointStore {
    /// Loads `step`, verifying every hash. Any mismatch is an error ([`Error::Corrupt`] naming
    /// the file and chunk); no partially verified data is returned.
    pub async fn load(&self, step: u64) -> Result<Checkpoint> {
        let manifest = self.manifest(step).await?;
        let (tensors, report) = self.scan(&manifest, true).await?;
        if let Some(e) = report.problems.into_iter().next() {
            return Err(e);
        }
        let tensors = manifest
            .tensors
            .iter()
            .zip(tensors)
            .map(|(t, data)| Tensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data,
            })
            .collect();
        Ok(Checkpoint { manifest, tensors })
    }

    /// Checks every file, chunk and piece of `step` and reports all problems found. Returns
    /// `Err` only when the store cannot be read or `step` is not committed; a manifest that
    /// exists but is corrupt or of another version is reported as a problem.
    pub async fn verify(&self, step: u64) -> Result<VerifyReport> {
        let manifest = match self.manifest(step).await {
            Ok(m) => m,
            Err(e @ (Error::Corrupt { .. } | Error::UnsupportedVersion { .. })) => {
                return Ok(VerifyReport {
                    step,
                    problems: vec![e],
                    ..Default::default()
                });
            }
            Err(e) => return Err(e),
        };
        Ok(self.scan(&manifest, false).await?.1)
    }

    /// Reads and checks the index of one shard of `step`: its size, header, trailer and footer
    /// (no chunk is read). Used by tools that report per-chunk sizes.
    pub async fn read_index(&self, step: u64, info: &ShardInfo) -> Result<ShardFooter> {
        let path = self.step_dir(step).join(info.file.as_str());
        let file = self.display(&path);
        let size = match self.head_size(&path, "read shard").await {
            Err(Error::NotFound { .. }) => {
                return Err(Error::corrupt(&file, None, "shard file is missing"));
            }
            r => r?,
        };
        if size != info.bytes {
            return Err(Error::corrupt(
                &file,
                None,
                format!(
                    "file is {size} bytes, the manifest records {} (truncated or replaced)",
                    info.bytes
                ),
            ));
        }
        if size < shard::HEADER_LEN + shard::TRAILER_LEN {
            return Err(Error::corrupt(
                &file,
                None,
                "file is too short to be a shard",
            ));
        }
        let fmt = |e: ShardFormatError| match e {
            ShardFormatError::Version(found) => Error::UnsupportedVersion {
                file: file.clone(),
                found,
                supported: FORMAT_VERSION,
            },
            ShardFormatError::Malformed(reason) => Error::corrupt(&file, None, reason),
        };
        let header = self
            .get_range(&path, 0..shard::HEADER_LEN, "read shard header")
            .await?;
        shard::parse_header(&header).map_err(fmt)?;
        let tail = self
            .get_range(&path, size - shard::TRAILER_LEN..size, "read shard trailer")
            .await?;
        let trailer = shard::parse_trailer(&tail, size).map_err(fmt)?;
        let footer_start = size - shard::TRAILER_LEN - trailer.footer_len;
        let footer_bytes = self
            .get_range(
                &path,
                footer_start..size - shard::TRAILER_LEN,
                "read shard footer",
            )
            .await?;
        let footer = shard::parse_footer(&footer_bytes, &trailer, size).map_err(fmt)?;
        if format!("{:016x}", trailer.footer_hash) != info.footer_hash
            || footer.raw_bytes != info.raw_bytes
            || footer.chunks.len() as u64 != info.chunks
        {
            return Err(Error::corrupt(
                &file,
                None,
                "footer does not match the manifest (a shard of another checkpoint?)",
            ));
        }
        Ok(footer)
    }

    /// Streams every chunk of every shard through hash checks (and, with `keep`, into tensor
    /// buffers). Problems are collected; with `keep` the scan stops at the first one.
    async fn scan(&self, m: &Manifest, keep: bool) -> Result<(Vec<Vec<u8>>, VerifyReport)> {
        let mut report = VerifyReport {
            step: m.step,
            shards: m.shards.len(),
            ..Default::default()
        };
        // Indexes of all shards, concurrently.
        let indexes =
            futures::future::join_all(m.shards.iter().map(|s| self.read_index(m.step, s))).await;
        let mut batches = Vec::new();
        let mut bad_shards = vec![false; m.shards.len()];
        for (rank, idx) in indexes.into_iter().enumerate() {
            match idx {
                Ok(footer) => {
                    let path = self.shard_path(m.step, rank as u32);
                    // A batch is bounded in stored bytes and in decoded bytes (what the
                    // decoders allocate at once), whatever the compression ratio.
                    let raw_cap = (self.opts.read_batch as u64).max(shard::MAX_CHUNK_RAW_LEN);
                    let mut at = 0;
                    while at < footer.chunks.len() {
                        let first = at;
                        let start = footer.chunks[at].offset;
                        let (mut end, mut raw) = (start, 0u64);
                        while at < footer.chunks.len()
                            && (at == first
                                || (end - start + footer.chunks[at].len
                                    <= self.opts.read_batch as u64
                                    && raw + footer.chunks[at].raw_len <= raw_cap))
                        {
                            end += footer.chunks[at].len;
                            raw += footer.chunks[at].raw_len;
                            at += 1;
                        }
                        batches.push(Batch {
                            rank,
                            path: path.clone(),
                            first,
                            entries: footer.chunks[first..at].to_vec(),
                            range: start..end,
                        });
                    }
                }
                Err(e @ (Error::Corrupt { .. } | Error::UnsupportedVersion { .. })) => {
                    bad_shards[rank] = true;
                    report.problems.push(e);
                    if keep {
                        return Ok((Vec::new(), report));
                    }
                }
                Err(e) => return Err(e),
            }
        }

        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Batch, Bytes)>(2);
        let consumer = {
            let mut sink = Sink::new(self, m, keep, bad_shards)?;
            tokio::task::spawn_blocking(move || {
                while let Some((batch, data)) = rx.blocking_recv() {
                    sink.consume(batch, data);
                    if keep && !sink.problems.is_empty() {
                        break;
                    }
                }
                sink.finish()
            })
        };
        let mut fetches = futures::stream::iter(batches)
            .map(|b| async move {
                let data = self.get_range(&b.path, b.range.clone(), "read shard").await;
                (b, data)
            })
            .buffered(self.opts.reads_in_flight.max(1));
        let mut fetch_error = None;
        while let Some((batch, data)) = fetches.next().await {
            match data {
                Ok(data) => {
                    if tx.send((batch, data)).await.is_err() {
                        break; // the consumer stopped at a problem
                    }
                }
                Err(e @ Error::Corrupt { .. }) => {
                    fetch_error = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        drop(tx);
        let sink = consumer.await?;
        report.chunks = sink.chunks;
        report.stored_bytes = sink.stored_bytes;
        report.raw_bytes = sink.raw_bytes;
        report.problems.extend(fetch_error);
        report.problems.extend(sink.problems);
        Ok((sink.tensors, report))
    }
}

struct Batch {
    rank: usize,
    path: object_store::path::Path,
    first: usize,
    entries: Vec<ChunkEntry>,
    range: std::ops::Range<u64>,
}

/// One piece as the consumer tracks it.
struct PieceState {
    tensor: usize,
    tensor_offset: u64,
    offset: u64,
    length: u64,
    hash: u128,
    hasher: Xxh3,
    seen: u64,
    tainted: bool,
    done: bool,
}

/// The blocking side of a scan: decodes chunks in parallel, checks hashes, fills buffers.
struct Sink {
    files: Vec<String>,
    names: Vec<String>,
    /// Per shard, its pieces sorted by offset.
    pieces: Vec<Vec<PieceState>>,
    cursor: Vec<usize>,
    bad_shards: Vec<bool>,
    keep: bool,
    tensors: Vec<Vec<u8>>,
    problems: Vec<Error>,
    chunks: u64,
    stored_bytes: u64,
    raw_bytes: u64,
}

impl Sink {
    fn new(
        store: &CheckpointStore,
        m: &Manifest,
        keep: bool,
        bad_shards: Vec<bool>,
    ) -> Result<Sink> {
        let mut pieces: Vec<Vec<PieceState>> = (0..m.shards.len()).map(|_| Vec::new()).collect();
        for (ti, t) in m.tensors.iter().enumerate() {
            for p in &t.pieces {
                pieces[p.shard as usize].push(PieceState {
                    tensor: ti,
                    tensor_offset: p.tensor_offset,
                    offset: p.offset,
                    length: p.length,
                    hash: shard::parse_hash128(&p.hash).unwrap_or_default(),
                    hasher: Xxh3::new(),
                    seen: 0,
                    tainted: false,
                    done: false,
                });
            }
        }
        for ps in &mut pieces {
            ps.sort_by_key(|p| p.offset);
        }
        let mut tensors = Vec::new();
        if keep {
            // `nbytes` was validated with the manifest, and is bounded by the shards' decoded
            // sizes, which their footers bound by the stored sizes. Still, the allocation is
            // fallible: a checkpoint too big for this machine is an error, not an abort.
            for t in &m.tensors {
                let n = t.nbytes().unwrap_or_default();
                let mut buf = Vec::new();
                usize::try_from(n)
                    .ok()
                    .and_then(|n| buf.try_reserve_exact(n).ok().map(|()| n))
                    .map(|n| buf.resize(n, 0))
                    .ok_or_else(|| Error::OutOfMemory {
                        what: format!("tensor `{}` of step {}", t.name, m.step),
                        bytes: n,
                    })?;
                tensors.push(buf);
            }
        }
        Ok(Sink {
            files: m
                .shards
                .iter()
                .map(|s| store.display(&store.step_dir(m.step).join(s.file.as_str())))
                .collect(),
            names: m.tensors.iter().map(|t| t.name.clone()).collect(),
            cursor: vec![0; m.shards.len()],
            pieces,
            bad_shards,
            keep,
            tensors,
            problems: Vec::new(),
            chunks: 0,
            stored_bytes: 0,
            raw_bytes: 0,
        })
    }

    /// Checks and decodes one batch of chunks. Chunks decode in parallel: with `keep`, straight
    /// into their place in the tensor buffers (piece hashes are checked in [`Sink::finish`]);
    /// without, into temporary buffers that feed each piece's streaming hash.
    fn consume(&mut self, batch: Batch, data: Bytes) {
        let rank = batch.rank;
        let base = batch.range.start;
        // Which piece each chunk belongs to (chunks arrive in shard order).
        let mut owner: Vec<Option<usize>> = Vec::with_capacity(batch.entries.len());
        for (i, c) in batch.entries.iter().enumerate() {
            let pieces = &mut self.pieces[rank];
            let cur = &mut self.cursor[rank];
            while *cur < pieces.len()
                && (pieces[*cur].length == 0
                    || pieces[*cur].offset + pieces[*cur].length <= c.raw_offset)
            {
                pieces[*cur].done |= pieces[*cur].length == 0;
                *cur += 1;
            }
            let o = match pieces.get_mut(*cur) {
                // Bytes no piece refers to, or a gap before the next piece.
                None => None,
                Some(p) if c.raw_offset < p.offset => None,
                Some(p) if c.raw_offset + c.raw_len > p.offset + p.length => {
                    p.tainted = true;
                    self.problems.push(Error::corrupt(
                        &self.files[rank],
                        Some(batch.first + i),
                        format!(
                            "chunk straddles the end of a piece of `{}`",
                            self.names[p.tensor]
                        ),
                    ));
                    None
                }
                Some(_) => Some(*cur),
            };
            owner.push(o);
        }

        let check = |c: &ChunkEntry| -> Result<&[u8], String> {
            let stored = &data[(c.offset - base) as usize..(c.offset - base + c.len) as usize];
            if shard::hash128_hex(stored) != c.hash {
                return Err("chunk hash mismatch".to_string());
            }
            Ok(stored)
        };
        let results: Vec<(usize, Result<Vec<u8>, String>)> = if self.keep {
            // Carve disjoint destination slices out of the tensor buffers, then decode into them.
            let mut targets: Vec<(usize, usize, usize)> = owner
                .iter()
                .enumerate()
                .filter_map(|(i, o)| {
                    let p = &self.pieces[rank][(*o)?];
                    let c = &batch.entries[i];
                    Some((
                        i,
                        p.tensor,
                        (p.tensor_offset + c.raw_offset - p.offset) as usize,
                    ))
                })
                .collect();
            targets.sort_by_key(|&(_, t, at)| (t, at));
            let mut jobs: Vec<(usize, &mut [u8])> = Vec::with_capacity(targets.len());
            let mut targets = targets.into_iter().peekable();
            for (t, buf) in self.tensors.iter_mut().enumerate() {
                let mut rest: &mut [u8] = buf;
                let mut consumed = 0usize;
                while let Some(&(i, _, at)) = targets.peek().filter(|&&(_, tt, _)| tt == t) {
                    targets.next();
                    let len = batch.entries[i].raw_len as usize;
                    // Pieces tile tensors and chunks tile pieces, so targets never overlap.
                    if at < consumed || at + len > consumed + rest.len() {
                        continue;
                    }
                    let tail = std::mem::take(&mut rest);
                    let (_, tail) = tail.split_at_mut(at - consumed);
                    let (dest, tail) = tail.split_at_mut(len);
                    rest = tail;
                    consumed = at + len;
                    jobs.push((i, dest));
                }
            }
            jobs.into_par_iter()
                .map(|(i, dest)| {
                    let c = &batch.entries[i];
                    let r = check(c).and_then(|stored| {
                        codec::decode_into(c.codec, stored, dest).map_err(|e| e.to_string())
                    });
                    (i, r.map(|()| Vec::new()))
                })
                .collect()
        } else {
            batch
                .entries
                .par_iter()
                .enumerate()
                .map(|(i, c)| {
                    let r = check(c).and_then(|stored| {
                        codec::decode(c.codec, stored, c.raw_len as usize)
                            .map_err(|e| e.to_string())
                    });
                    (i, r)
                })
                .collect()
        };
        let mut results: Vec<Option<Result<Vec<u8>, String>>> = {
            let mut v: Vec<Option<_>> = (0..batch.entries.len()).map(|_| None).collect();
            for (i, r) in results {
                v[i] = Some(r);
            }
            v
        };

        for (i, c) in batch.entries.iter().enumerate() {
            self.chunks += 1;
            self.stored_bytes += c.len;
            self.raw_bytes += c.raw_len;
            let Some(pi) = owner[i] else { continue };
            let p = &mut self.pieces[rank][pi];
            match results[i].take() {
                Some(Ok(bytes)) => {
                    if !self.keep {
                        p.hasher.update(&bytes);
                    }
                }
                Some(Err(reason)) => {
                    self.problems.push(Error::corrupt(
                        &self.files[rank],
                        Some(batch.first + i),
                        reason,
                    ));
                    p.tainted = true;
                }
                None => p.tainted = true,
            }
            p.seen += c.raw_len;
            if p.seen == p.length {
                p.done = true;
                if !self.keep && !p.tainted && p.hasher.digest128() != p.hash {
                    self.problems.push(piece_mismatch(
                        &self.files[rank],
                        &self.names[p.tensor],
                        p.tensor_offset,
                    ));
                }
            }
        }
    }

    fn finish(mut self) -> Sink {
        if self.keep {
            // Piece hashes over the filled tensor buffers, in parallel.
            let tensors = &self.tensors;
            let bad: Vec<(usize, usize, u64)> = self
                .pieces
                .par_iter()
                .enumerate()
                .flat_map_iter(|(rank, pieces)| {
                    pieces.iter().filter_map(move |p| {
                        let start = p.tensor_offset as usize;
                        let bytes = &tensors[p.tensor][start..start + p.length as usize];
                        (p.done && !p.tainted && xxhash_rust::xxh3::xxh3_128(bytes) != p.hash)
                            .then_some((rank, p.tensor, p.tensor_offset))
                    })
                })
                .collect();
            for (rank, tensor, offset) in bad {
                self.problems.push(piece_mismatch(
                    &self.files[rank],
                    &self.names[tensor],
                    offset,
                ));
            }
        }
        for (rank, pieces) in self.pieces.iter().enumerate() {
            if self.bad_shards[rank] {
                continue;
            }
            for p in pieces {
                if !p.done && !p.tainted && p.length > 0 {
                    self.problems.push(Error::corrupt(
                        &self.files[rank],
                        None,
                        format!(
                            "piece of `{}` at tensor offset {} is not fully stored",
                            self.names[p.tensor], p.tensor_offset
                        ),
                    ));
                }
            }
        }
        self
    }
}

fn piece_mismatch(file: &str, tensor: &str, offset: u64) -> Error {
    Error::corrupt(
        file,
        None,
        format!("piece of `{tensor}` at tensor offset {offset} fails its hash"),
    )
}
