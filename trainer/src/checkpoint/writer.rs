//! The writer thread: streams this rank's shard of each checkpoint to the store while training
//! goes on. It never commits: committing is [`super::commit`]'s, once every rank's shard is
//! durable.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lockstep_storage::{CheckpointStore, ShardMeta, pieces_for_rank};

use super::Snapshot;
use crate::error::{Error, Result};

/// A checkpoint this rank wrote (its shard), or, once committed, the whole checkpoint.
#[derive(Debug, Clone)]
pub struct Written {
    /// The step.
    pub step: u64,
    /// Stored bytes: this rank's shard; once committed, the whole checkpoint.
    pub bytes: u64,
    /// Uncompressed bytes, likewise.
    pub raw_bytes: u64,
    /// From hand-off to the shard being durable.
    pub elapsed: Duration,
    /// This rank's shard.
    pub shard: ShardMeta,
}

/// A thread with its own Tokio runtime that writes one rank's shard of each checkpoint, one at
/// a time.
pub struct CheckpointWriter {
    jobs: Option<mpsc::SyncSender<Snapshot>>,
    done: mpsc::Receiver<Result<Written>>,
    in_flight: Option<u64>,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointWriter {
    /// Starts the writer of `rank`'s shards (about 1/`world_size` of each checkpoint's bytes;
    /// see [`pieces_for_rank`]).
    pub fn spawn(store: CheckpointStore, rank: u32, world_size: u32) -> Result<CheckpointWriter> {
        let (jobs, rx) = mpsc::sync_channel::<Snapshot>(1);
        let (tx, done) = mpsc::channel();
        let rt = crate::runtime::io("ckpt-io")?;
        let thread = std::thread::Builder::new()
            .name("ckpt-writer".into())
            .spawn(move || {
                while let Ok(snap) = rx.recv() {
                    let started = Instant::now();
                    let step = snap.step;
                    let pieces = pieces_for_rank(&snap.tensors, rank, world_size);
                    drop(snap);
                    let result = rt
                        .block_on(store.write_shard(step, rank, &pieces))
                        .map(|shard| Written {
                            step,
                            bytes: shard.shard.bytes,
                            raw_bytes: shard.shard.raw_bytes,
                            elapsed: started.elapsed(),
                            shard,
                        })
                        .map_err(Error::from);
                    if tx.send(result).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the checkpoint writer: {e}")))?;
        Ok(CheckpointWriter {
            jobs: Some(jobs),
            done,
            in_flight: None,
            thread: Some(thread),
        })
    }

    /// The step being written, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Waits for the checkpoint in flight, if any, and returns how it went.
    pub fn wait(&mut self) -> Result<Option<Written>> {
        if self.in_flight.take().is_none() {
            return Ok(None);
        }
        match self.done.recv() {
            Ok(r) => r.map(Some),
            Err(_) => Err(Error::Internal("the checkpoint writer stopped".into())),
        }
    }

    /// A finished checkpoint, without waiting.
    pub fn poll(&mut self) -> Result<Option<Written>> {
        if self.in_flight.is_none() {
            return Ok(None);
        }
        match self.done.try_recv() {
            Ok(r) => {
                self.in_flight = None;
                r.map(Some)
            }
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => {
                self.in_flight = None;
                Err(Error::Internal("the checkpoint writer stopped".into()))
            }
        }
    }

    /// Hands `snap` to the writer. Call [`CheckpointWriter::wait`] first: one in flight.
    pub fn submit(&mut self, snap: Snapshot) -> Result<()> {
        let step = snap.step;
        self.jobs
            .as_ref()
            .ok_or_else(|| Error::Internal("the checkpoint writer is closed".into()))?
            .send(snap)
            .map_err(|_| Error::Internal("the checkpoint writer stopped".into()))?;
        self.in_flight = Some(step);
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
