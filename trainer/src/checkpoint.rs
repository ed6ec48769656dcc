//! Checkpoints of a training run: the snapshot the loop takes (a host copy of parameters, AdamW
//! moments and the trainer state), the writer thread that streams it to the checkpoint store
//! while training goes on, and restoring a [`TrainState`] from a loaded checkpoint.
//!
//! At most one checkpoint is in flight: before taking a snapshot, the loop waits for the
//! previous one to finish, so host memory holds at most one snapshot and the loop's stall is
//! the snapshot copy (plus any wait for a slow store, which is logged apart).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use bytes::Bytes;
use lockstep_storage::{
    CheckpointStore, CommitInfo, DType, RetentionPolicy, ShardMeta, TensorInput, pieces_for_rank,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Llama, LlamaConfig, tensor_values};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
pub use crate::step::TrainState;

/// Prefix of the AdamW first-moment tensors' names (followed by the parameter's name).
pub const EXP_AVG: &str = "optim.exp_avg/";
/// Prefix of the AdamW second-moment tensors' names.
pub const EXP_AVG_SQ: &str = "optim.exp_avg_sq/";

/// Everything besides tensors that a resumed run needs to continue bit-identically. Stored as
/// the manifest's `trainer_state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Global index of the next data window (see [`crate::data`]).
    pub cursor: u64,
    /// Targets trained on so far, across all ranks.
    pub tokens: u64,
    /// The seed every RNG derives from (data order per epoch, init).
    pub seed: u64,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// AdamW hyperparameters and its step count.
    pub adamw: AdamWConfig,
    /// AdamW steps taken (bias correction).
    pub adamw_steps: u64,
    /// The model's architecture ([`LlamaConfig::architecture`]); a resume must match it.
    pub architecture: serde_json::Value,
    /// The full HF `config.json` (export writes it).
    pub model_config: LlamaConfig,
    /// Ranks that trained up to here.
    pub world_size: u32,
    /// Sequences per rank per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per step.
    pub grad_accum: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Mean loss of the last step (none before the first).
    pub loss: Option<f64>,
}

/// A host copy of one checkpoint, ready to write.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The step.
    pub step: u64,
    /// Parameters (HF names and shapes) then moments.
    pub tensors: Vec<TensorInput>,
    /// The trainer state.
    pub state: TrainerState,
}

fn f32_bytes(values: Vec<f32>) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

impl<B: AutodiffBackend> TrainState<B> {
    /// Copies parameters and moments to host memory.
    pub fn snapshot(&self, state: TrainerState) -> Snapshot {
        let mut tensors = Vec::with_capacity(self.model.params.len() * 3);
        let groups = [
            ("", &self.model.params),
            (EXP_AVG, &self.optim.m),
            (EXP_AVG_SQ, &self.optim.v),
        ];
        for (prefix, list) in groups {
            for (spec, t) in self.model.specs.iter().zip(list.iter()) {
                tensors.push(TensorInput {
                    name: format!("{prefix}{}", spec.name),
                    dtype: DType::F32,
                    shape: spec.shape.iter().map(|&d| d as u64).collect(),
                    data: f32_bytes(tensor_values(t.clone())),
                });
            }
        }
        Snapshot {
            step: state.step,
            tensors,
            state,
        }
    }

    /// Rebuilds parameters and moments from a loaded checkpoint, after checking that its
    /// architecture is `config`'s.
    pub fn restore(
        config: &LlamaConfig,
        ckpt: &lockstep_storage::Checkpoint,
        device: &burn::tensor::Device<B::InnerBackend>,
    ) -> Result<(TrainState<B>, TrainerState)> {
        let step = ckpt.manifest.step;
        let state: TrainerState = serde_json::from_value(ckpt.manifest.trainer_state.clone())
            .map_err(|e| Error::Resume {
                step,
                reason: format!("its trainer state is not one this trainer wrote: {e}"),
            })?;
        let want = config.architecture();
        if state.architecture != want {
            let mut diffs = Vec::new();
            if let (Some(a), Some(b)) = (state.architecture.as_object(), want.as_object()) {
                for (k, v) in b {
                    if a.get(k) != Some(v) {
                        let was = a.get(k).map(|x| x.to_string()).unwrap_or("absent".into());
                        diffs.push(format!("{k}: checkpoint {was}, this job {v}"));
                    }
                }
            }
            return Err(Error::Resume {
                step,
                reason: format!(
                    "the model architecture differs ({}); use a new checkpoint.url or \
                     checkpoint.resume = \"none\" with an empty checkpoint directory",
                    diffs.join("; ")
                ),
            });
        }
        let specs = crate::model::param_specs(config);
        let load = |name: &str, shape: [usize; 2]| -> Result<Tensor<B::InnerBackend, 2>> {
            let t = ckpt.tensor(name).ok_or_else(|| Error::Resume {
                step,
                reason: format!("tensor `{name}` is missing"),
            })?;
            if t.dtype != DType::F32 || t.data.len() != shape[0] * shape[1] * 4 {
                return Err(Error::Resume {
                    step,
                    reason: format!("tensor `{name}` is not f32 of shape {shape:?}"),
                });
            }
            let values: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok(Tensor::from_data(TensorData::new(values, shape), device))
        };
        let mut params = Vec::with_capacity(specs.len());
        let mut m = Vec::with_capacity(specs.len());
        let mut v = Vec::with_capacity(specs.len());
        for s in &specs {
            params.push(load(&s.name, s.shape2())?);
            m.push(load(&format!("{EXP_AVG}{}", s.name), s.shape2())?);
            v.push(load(&format!("{EXP_AVG_SQ}{}", s.name), s.shape2())?);
        }
        let model = Llama {
            config: config.clone(),
            specs,
            params,
        };
        let optim = AdamW {
            config: state.adamw,
            m,
            v,
            steps: state.adamw_steps,
        };
        Ok((TrainState { model, optim }, state))
    }
}

/// A checkpoint the writer finished.
#[derive(Debug, Clone)]
pub struct Written {
    /// The step.
    pub step: u64,
    /// Stored bytes.
    pub bytes: u64,
    /// Uncompressed bytes.
    pub raw_bytes: u64,
    /// From hand-off to commit (or, for one rank's shard, to the shard being durable).
    pub elapsed: Duration,
    /// The shard written, when the writer writes one rank's shard rather than committing.
    pub shard: Option<ShardMeta>,
}

/// What the writer thread is told to do with a snapshot.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Job name (in the manifest).
    pub job: String,
    /// Hash of the job config (in the manifest).
    pub config_hash: String,
    /// Ranks whose shards make one checkpoint.
    pub world_size: u32,
    /// `Some(rank)`: write only this rank's shard (about 1/W of the bytes) and report it, for
    /// the committer to assemble; `None`: write every shard and commit.
    pub shard_of: Option<u32>,
    /// Retention after each commit.
    pub retention: RetentionPolicy,
    /// Steps never collected (the one this run resumed from).
    pub protected: Vec<u64>,
}

/// A thread with its own Tokio runtime that writes, commits and garbage-collects checkpoints,
/// one at a time.
pub struct CheckpointWriter {
    jobs: Option<mpsc::SyncSender<Snapshot>>,
    done: mpsc::Receiver<Result<Written>>,
    in_flight: Option<u64>,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointWriter {
    /// Starts the writer for `store`.
    pub fn spawn(store: CheckpointStore, cfg: WriterConfig) -> Result<CheckpointWriter> {
        let (jobs, rx) = mpsc::sync_channel::<Snapshot>(1);
        let (tx, done) = mpsc::channel();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ckpt-io")
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the checkpoint runtime: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("ckpt-writer".into())
            .spawn(move || {
                let mut parent: Option<u64> = cfg.protected.first().copied();
                while let Ok(snap) = rx.recv() {
                    let started = Instant::now();
                    let step = snap.step;
                    let result = rt.block_on(write(&store, &cfg, parent, snap)).map(
                        |(bytes, raw_bytes, shard)| Written {
                            step,
                            bytes,
                            raw_bytes,
                            elapsed: started.elapsed(),
                            shard,
                        },
                    );
                    if result.is_ok() {
                        parent = Some(step);
                    }
                    if tx.send(result).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the checkpoint writer: {e}")))?;
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
            Err(_) => Err(Error::Invalid("the checkpoint writer stopped".into())),
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
                Err(Error::Invalid("the checkpoint writer stopped".into()))
            }
        }
    }

    /// Hands `snap` to the writer. Call [`CheckpointWriter::wait`] first: one in flight.
    pub fn submit(&mut self, snap: Snapshot) -> Result<()> {
        let step = snap.step;
        self.jobs
            .as_ref()
            .ok_or_else(|| Error::Invalid("the checkpoint writer is closed".into()))?
            .send(snap)
            .map_err(|_| Error::Invalid("the checkpoint writer stopped".into()))?;
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

async fn write(
    store: &CheckpointStore,
    cfg: &WriterConfig,
    parent: Option<u64>,
    snap: Snapshot,
) -> Result<(u64, u64, Option<ShardMeta>)> {
    if let Some(rank) = cfg.shard_of {
        let pieces = pieces_for_rank(&snap.tensors, rank, cfg.world_size);
        let meta = store.write_shard(snap.step, rank, &pieces).await?;
        return Ok((meta.bytes, meta.raw_bytes, Some(meta)));
    }
    let info = CommitInfo {
        job: cfg.job.clone(),
        step: snap.step,
        config_hash: cfg.config_hash.clone(),
        parent,
        trainer_state: serde_json::to_value(&snap.state)
            .map_err(|e| Error::Invalid(format!("cannot serialise the trainer state: {e}")))?,
    };
    let manifest = store.save(info, &snap.tensors, cfg.world_size).await?;
    let bytes = manifest.shards.iter().map(|s| s.bytes).sum();
    let raw = snap.tensors.iter().map(|t| t.data.len() as u64).sum();
    collect(store, &cfg.retention, &cfg.protected).await?;
    Ok((bytes, raw, None))
}

/// Applies the retention policy after a commit.
pub async fn collect(
    store: &CheckpointStore,
    retention: &RetentionPolicy,
    protected: &[u64],
) -> Result<()> {
    let report = store.gc(retention, protected, false).await?;
    if !report.deleted.is_empty() {
        tracing::debug!(deleted = ?report.deleted, "retention removed old checkpoints");
    }
    Ok(())
}
