//! The training loop of one rank: load the base model, tokenizer and data, resume or start,
//! step, checkpoint, finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use lockstep_api::{JobConfig, Resume};
use lockstep_storage::{CheckpointStore, RetentionPolicy, objects};

use crate::checkpoint::{CheckpointWriter, TrainState, TrainerState, WriterConfig, Written};
use crate::collective::Collective;
use crate::data::{Corpus, Packer};
use crate::error::{Error, Result};
use crate::model::{Llama, LlamaConfig, hf};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::tokenizer::Tokenizer;

/// Knobs of one run that are not part of the job config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Where to start; `None` uses `checkpoint.resume`.
    pub resume: Option<Resume>,
    /// Stop after this step (checkpointing it) even if `train.steps` is further; the schedule
    /// still spans `train.steps`. For preemption drills and tests.
    pub stop_at: Option<u64>,
    /// Set from outside (SIGTERM, SIGINT) to checkpoint the current step and stop.
    pub stop: Option<Arc<AtomicBool>>,
    /// The commit authority (the coordinator). With one, every rank (also at world size 1)
    /// writes only its shard and reports it here; without, rank 0 commits.
    pub committer: Option<Arc<dyn ShardCommitter>>,
}

/// A rank's durable shard of a checkpoint, reported to the commit authority.
#[derive(Debug)]
pub struct ShardReport<'a> {
    /// This rank.
    pub rank: u32,
    /// The trainer state at that step (the same on every rank).
    pub state: &'a TrainerState,
    /// The shard.
    pub shard: &'a lockstep_storage::ShardMeta,
    /// Hash of the job config, for the manifest.
    pub config_hash: &'a str,
    /// Time the writer took.
    pub write_time: Duration,
}

/// Commits checkpoints on behalf of the gang: the coordinator's `CommitShard`.
pub trait ShardCommitter: Send + Sync + std::fmt::Debug {
    /// Reports `report`'s shard as durable; returns once the whole checkpoint is committed,
    /// with its stored and raw bytes, or why it cannot be.
    fn commit_shard(&self, report: ShardReport<'_>) -> Result<(u64, u64)>;
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// Model, data and starting point are ready.
    Started {
        /// Parameters.
        params: usize,
        /// Documents and tokens of the data.
        docs: usize,
        /// Tokens of the data.
        data_tokens: u64,
        /// Records skipped as bad.
        skipped: u64,
        /// The step training starts from (0, or the resumed checkpoint's).
        from_step: u64,
        /// The last step.
        total_steps: u64,
    },
    /// A checkpoint failed verification: it is deleted and an older one is used instead.
    SkippedCheckpoint {
        /// Its step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// A step finished.
    Step {
        /// Steps completed.
        step: u64,
        /// Mean loss.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Input tokens per second over all ranks, this step.
        tokens_per_sec: f64,
        /// Wall time of the step.
        elapsed: Duration,
    },
    /// A snapshot was handed to the writer.
    CheckpointStarted {
        /// Its step.
        step: u64,
        /// Time the loop stood still copying the snapshot to host memory.
        stall: Duration,
        /// Time the loop waited for the previous checkpoint to finish.
        waited: Duration,
    },
    /// A checkpoint was committed.
    CheckpointCommitted(Written),
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The step the run started from.
    pub from_step: u64,
    /// Steps completed at the end.
    pub step: u64,
    /// Loss of the first and last step run, if any ran.
    pub first_loss: Option<f64>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// Checkpoints committed by this run.
    pub checkpoints: Vec<Written>,
    /// The longest snapshot stall.
    pub max_stall: Duration,
    /// Mean input tokens per second over all ranks.
    pub tokens_per_sec: f64,
    /// True when stopped early (signal or `stop_at`) rather than at `train.steps`.
    pub stopped_early: bool,
    /// xxh3-64 of every parameter's bytes at the end: equal on every rank of a gang.
    pub params_hash: String,
}

/// xxh3-64 (hex) of the parameters' f32 bytes, in order.
pub fn params_hash<B: burn::tensor::backend::Backend>(model: &Llama<B>) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for v in model.values() {
        h.update(bytemuck::cast_slice(&v));
    }
    format!("{:016x}", h.digest())
}

/// One rank's checkpointing. At world size 1 the writer thread writes and commits. In a gang
/// every rank's writer writes that rank's shard (about 1/W of the bytes); once every rank's
/// shard is durable, the ranks agree on it over the collective, rank 0 gathers the shards'
/// metadata, commits the manifest and tells the others. All ranks make the same collective
/// calls after every step, so they agree on when a checkpoint is complete.
struct Checkpoints {
    writer: CheckpointWriter,
    gang: Option<Gang>,
}

struct Gang {
    rank: usize,
    world: usize,
    /// Rank 0 commits through it.
    store: CheckpointStore,
    job: String,
    config_hash: String,
    retention: RetentionPolicy,
    protected: Vec<u64>,
    parent: Option<u64>,
    /// The checkpoint being written: its state and, once this rank's writer is done, the result.
    pending: Option<(TrainerState, Option<Result<Written>>)>,
    /// Reports shards here instead of gathering them on rank 0.
    committer: Option<Arc<dyn ShardCommitter>>,
}

impl Checkpoints {
    fn submit(&mut self, snap: crate::checkpoint::Snapshot) -> Result<()> {
        if let Some(g) = &mut self.gang {
            g.pending = Some((snap.state.clone(), None));
        }
        self.writer.submit(snap)
    }

    /// After every step: the stop decision all ranks agree on, and a checkpoint that became
    /// committed, if any. Never waits for the writer.
    fn progress(
        &mut self,
        stop: bool,
        collective: &mut dyn Collective,
        rt: &tokio::runtime::Runtime,
    ) -> Result<(bool, Option<Written>)> {
        let Some(g) = &mut self.gang else {
            return Ok((stop, self.writer.poll()?));
        };
        if let Some((_, result @ None)) = &mut g.pending {
            match self.writer.poll() {
                Ok(Some(w)) => *result = Some(Ok(w)),
                Ok(None) => {}
                Err(e) => *result = Some(Err(e)),
            }
        }
        let (done, failed) = match &g.pending {
            Some((_, Some(Ok(_)))) => (1.0, 0.0),
            Some((_, Some(Err(_)))) => (1.0, 1.0),
            _ => (0.0, 0.0),
        };
        // A signal reaches ranks at different steps: agree, so all stop at the same one.
        let mut flags = [if stop { 1.0f32 } else { 0.0 }, done, failed];
        collective.all_reduce_sum(&mut flags)?;
        let committed = if flags[2] > 0.0 || flags[1] as usize == g.world {
            g.commit_round(flags[2] > 0.0, collective, rt)?
        } else {
            None
        };
        Ok((flags[0] > 0.0, committed))
    }

    /// Waits for the checkpoint in flight, if any, until it is committed.
    fn finish(
        &mut self,
        collective: &mut dyn Collective,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Option<Written>> {
        let Some(g) = &mut self.gang else {
            return self.writer.wait();
        };
        let Some((_, result)) = &mut g.pending else {
            return Ok(None);
        };
        if result.is_none() {
            *result = Some(self.writer.wait().and_then(|w| {
                w.ok_or_else(|| Error::Invalid("the checkpoint writer lost a checkpoint".into()))
            }));
        }
        let mut failed = [if matches!(result, Some(Err(_))) {
            1.0f32
        } else {
            0.0
        }];
        collective.all_reduce_sum(&mut failed)?;
        g.commit_round(failed[0] > 0.0, collective, rt)
    }
}

impl Gang {
    /// Every rank's shard of the pending checkpoint is done (or one failed): gather the shard
    /// metadata on rank 0, which commits and reports the outcome to all.
    fn commit_round(
        &mut self,
        any_failed: bool,
        collective: &mut dyn Collective,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Option<Written>> {
        let Some((state, result)) = self.pending.take() else {
            return Ok(None);
        };
        let step = state.step;
        let mine = match result {
            Some(Ok(w)) if !any_failed => w,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Error::Invalid(format!(
                    "another rank failed to write its shard of checkpoint {step} (its log says why)"
                )));
            }
        };
        if let Some(c) = &self.committer {
            let shard = mine.shard.as_ref().ok_or_else(|| {
                Error::Invalid(format!(
                    "the writer reported no shard for checkpoint {step}"
                ))
            })?;
            let (bytes, raw_bytes) = c.commit_shard(ShardReport {
                rank: self.rank as u32,
                state: &state,
                shard,
                config_hash: &self.config_hash,
                write_time: mine.elapsed,
            })?;
            self.parent = Some(step);
            return Ok(Some(Written {
                bytes,
                raw_bytes,
                ..mine
            }));
        }
        let meta = serde_json::to_vec(&mine.shard)
            .map_err(|e| Error::Invalid(format!("cannot serialise a shard's metadata: {e}")))?;
        let mut metas = Vec::new();
        for r in 0..self.world {
            let mut len = (if r == self.rank { meta.len() } else { 0 } as u64).to_le_bytes();
            collective.broadcast(&mut len, r)?;
            let mut buf = if r == self.rank {
                meta.clone()
            } else {
                vec![0u8; u64::from_le_bytes(len) as usize]
            };
            collective.broadcast(&mut buf, r)?;
            if self.rank == 0 {
                let m: Option<lockstep_storage::ShardMeta> =
                    serde_json::from_slice(&buf).map_err(|e| {
                        Error::Invalid(format!("rank {r} sent bad shard metadata: {e}"))
                    })?;
                metas.push(m.ok_or_else(|| {
                    Error::Invalid(format!("rank {r} reported no shard for checkpoint {step}"))
                })?);
            }
        }
        let mut status = [0u8];
        let mut written = mine;
        if self.rank == 0 {
            let bytes = metas.iter().map(|m| m.bytes).sum();
            let raw_bytes = metas.iter().map(|m| m.raw_bytes).sum();
            let outcome = self.commit(state, metas, rt);
            status[0] = if outcome.is_ok() { 1 } else { 2 };
            collective.broadcast(&mut status, 0)?;
            outcome?;
            written.bytes = bytes;
            written.raw_bytes = raw_bytes;
        } else {
            collective.broadcast(&mut status, 0)?;
            if status[0] != 1 {
                return Err(Error::Invalid(format!(
                    "rank 0 could not commit checkpoint {step} (its log says why)"
                )));
            }
        }
        self.parent = Some(step);
        Ok(Some(written))
    }

    fn commit(
        &self,
        state: TrainerState,
        metas: Vec<lockstep_storage::ShardMeta>,
        rt: &tokio::runtime::Runtime,
    ) -> Result<()> {
        let info = lockstep_storage::CommitInfo {
            job: self.job.clone(),
            step: state.step,
            config_hash: self.config_hash.clone(),
            parent: self.parent,
            trainer_state: serde_json::to_value(&state)
                .map_err(|e| Error::Invalid(format!("cannot serialise the trainer state: {e}")))?,
        };
        let manifest = lockstep_storage::assemble_manifest(info, metas)?;
        rt.block_on(async {
            self.store.commit(&manifest).await?;
            crate::checkpoint::collect(&self.store, &self.retention, &self.protected).await
        })
    }
}

/// A hash of what decides a run's results (model, data, training): stored in each manifest.
pub fn config_hash(config: &JobConfig) -> String {
    let key = serde_json::json!({
        "model": config.model,
        "data": config.data,
        "train": config.train,
    });
    format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(key.to_string().as_bytes())
    )
}

/// `base` as a URL: URLs pass through, bare paths become `file://` URLs.
fn base_url(base: &str) -> String {
    if base.contains("://") {
        base.trim_end_matches('/').to_string()
    } else {
        format!("file://{}", base.trim_end_matches('/'))
    }
}

struct Base {
    config: LlamaConfig,
    values: Option<Vec<Vec<f32>>>,
    tokenizer: Tokenizer,
}

fn load_base(config: &JobConfig, rt: &tokio::runtime::Runtime) -> Result<Base> {
    if config.model.base == "init" {
        let llama = LlamaConfig::from_section(&config.model, config.data.seq_len as usize);
        return Ok(Base {
            config: llama,
            values: None,
            tokenizer: Tokenizer::Bytes,
        });
    }
    let base = base_url(&config.model.base);
    let read = |name: &str| rt.block_on(objects::read_url(&format!("{base}/{name}")));
    let file = format!("{base}/config.json");
    let text = read("config.json")?;
    let text = std::str::from_utf8(&text).map_err(|_| Error::Model {
        file: file.clone(),
        reason: "not UTF-8".into(),
    })?;
    let llama = LlamaConfig::parse(text, &file)?;
    let file = format!("{base}/model.safetensors");
    let weights = hf::import(&read("model.safetensors")?, &file, &llama)?;
    let tokenizer = match read("tokenizer.json") {
        Ok(bytes) => {
            let eos = llama
                .extra
                .get("eos_token_id")
                .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
                .map(|v| v as u32);
            Tokenizer::from_json(&bytes, &format!("{base}/tokenizer.json"), eos)?
        }
        Err(lockstep_storage::Error::NotFound { .. }) => {
            tracing::warn!(
                base = %base,
                "the base model has no tokenizer.json: tokenising as bytes (ids 0-255), which \
                 only suits a byte-level model"
            );
            Tokenizer::Bytes
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Base {
        config: llama,
        values: Some(weights.values),
        tokenizer,
    })
}

fn load_corpus(
    config: &JobConfig,
    tokenizer: &Tokenizer,
    vocab: usize,
    rt: &tokio::runtime::Runtime,
) -> Result<Corpus> {
    let mut corpus = Corpus::default();
    for pattern in &config.data.train {
        for url in rt.block_on(objects::expand(pattern))? {
            let bytes = rt.block_on(objects::read_url(&url))?;
            corpus.add_jsonl(&url, &bytes, tokenizer, vocab, config.data.skip_bad_records)?;
            tracing::debug!(file = %url, docs = corpus.len(), "read training data");
        }
    }
    Ok(corpus)
}

/// Trains `config` as `collective`'s rank on `device` (the inner backend of `B` does the work),
/// reporting progress to `on_event`. Checkpoints go to `checkpoint.url`; at world size 1 this
/// process commits them itself.
pub fn train<B: AutodiffBackend>(
    config: &JobConfig,
    opts: &RunOptions,
    device: &burn::tensor::Device<B::InnerBackend>,
    collective: &mut dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("trainer-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the IO runtime: {e}")))?;
    let t = &config.train;
    let (rank, world) = (collective.rank(), collective.world_size());
    let seq_len = config.data.seq_len as usize;

    let base = load_base(config, &rt)?;
    if base.tokenizer.vocab_size() > base.config.vocab_size {
        return Err(Error::Model {
            file: config.model.base.clone(),
            reason: format!(
                "the tokenizer has {} ids but the model's vocabulary is {}",
                base.tokenizer.vocab_size(),
                base.config.vocab_size
            ),
        });
    }
    let corpus = load_corpus(config, &base.tokenizer, base.config.vocab_size, &rt)?;
    let (docs, data_tokens, skipped) = (corpus.len(), corpus.tokens(), corpus.skipped);
    let mut packer = Packer::new(corpus, seq_len, t.seed)?;

    let store = CheckpointStore::open(&config.checkpoint.url)?;
    let adamw = AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let schedule = LrSchedule {
        lr: t.lr,
        warmup: t.warmup_steps,
        total: t.steps,
        kind: t.schedule,
        min_ratio: t.min_lr_ratio,
    };
    let resume = opts
        .resume
        .unwrap_or_else(|| config.checkpoint.resume_from());
    let mut choose = || -> Result<Option<lockstep_storage::Checkpoint>> {
        Ok(match resume {
            Resume::Fresh => {
                if let Some(step) = rt.block_on(store.latest())? {
                    return Err(Error::Resume {
                        step,
                        reason: format!(
                            "checkpoint.resume = \"none\" but `{}` already holds committed \
                         checkpoints; use resume = \"latest\" to continue them or another \
                         checkpoint.url",
                            config.checkpoint.url
                        ),
                    });
                }
                None
            }
            Resume::Latest => match rt.block_on(store.latest_valid())? {
                Some((ckpt, bad)) => {
                    // Newer checkpoints that fail verification can never be loaded, and this run
                    // will commit those steps again: remove them (fail closed, then repair).
                    for (step, e) in bad {
                        if !matches!(e, lockstep_storage::Error::Corrupt { .. }) {
                            // A newer format version, say: not ours to delete.
                            return Err(Error::Resume {
                                step,
                                reason: e.to_string(),
                            });
                        }
                        on_event(&Event::SkippedCheckpoint {
                            step,
                            reason: e.to_string(),
                        });
                        rt.block_on(store.delete(step))?;
                    }
                    Some(ckpt)
                }
                None => match rt.block_on(store.latest())? {
                    Some(step) => {
                        return Err(Error::Resume {
                            step,
                            reason: format!(
                                "no committed checkpoint under `{}` verifies (run `lockstep ckpt \
                             verify --all` to see why); refusing to start over on top of them",
                                config.checkpoint.url
                            ),
                        });
                    }
                    None => None,
                },
            },
            Resume::Step(step) => {
                if let Some(newest) = rt.block_on(store.latest())?
                    && newest > step
                {
                    return Err(Error::Resume {
                        step,
                        reason: format!(
                            "`{}` holds newer checkpoints (up to step {newest}) that this run would \
                         have to overwrite; resume from the newest, or copy step {step} to another \
                         checkpoint.url",
                            config.checkpoint.url
                        ),
                    });
                }
                Some(rt.block_on(store.load(step))?)
            }
        })
    };
    // Rank 0 chooses (and repairs) the checkpoint; the others load the step it announces, so
    // every rank starts from the same one.
    const FRESH: u64 = u64::MAX;
    const FAILED: u64 = u64::MAX - 1;
    let loaded = if rank == 0 {
        let chosen = choose();
        let code = match &chosen {
            Ok(Some(c)) => c.manifest.step,
            Ok(None) => FRESH,
            Err(_) => FAILED,
        };
        if world > 1 {
            collective.broadcast(&mut code.to_le_bytes(), 0)?;
        }
        chosen?
    } else {
        let mut code = [0u8; 8];
        collective.broadcast(&mut code, 0)?;
        match u64::from_le_bytes(code) {
            FRESH => None,
            FAILED => {
                return Err(Error::Invalid(
                    "rank 0 could not choose a checkpoint to start from (its log says why)".into(),
                ));
            }
            step => Some(rt.block_on(store.load(step))?),
        }
    };
    let (mut state, mut ts) = match loaded {
        Some(ckpt) => {
            let (state, ts) = TrainState::<B>::restore(&base.config, &ckpt, device)?;
            if ts.seq_len != config.data.seq_len || ts.seed != t.seed {
                tracing::warn!(
                    "resuming with a different data.seq_len or train.seed than the checkpoint \
                     was trained with: the data order changes"
                );
            }
            let ts = TrainerState {
                schedule,
                adamw,
                world_size: world as u32,
                batch_size: t.batch_size,
                grad_accum: t.grad_accum,
                seq_len: config.data.seq_len,
                seed: t.seed,
                ..ts
            };
            let mut state = state;
            state.optim.config = adamw;
            (state, ts)
        }
        None => {
            let model = match base.values {
                Some(values) => Llama::from_values(base.config.clone(), values, device),
                None => Llama::init(base.config.clone(), t.seed, device),
            };
            let shapes: Vec<[usize; 2]> = model.specs.iter().map(|s| s.shape2()).collect();
            let optim = AdamW::new(adamw, &shapes, device);
            let ts = TrainerState {
                step: 0,
                cursor: 0,
                tokens: 0,
                seed: t.seed,
                schedule,
                adamw,
                adamw_steps: 0,
                architecture: base.config.architecture(),
                model_config: base.config.clone(),
                world_size: world as u32,
                batch_size: t.batch_size,
                grad_accum: t.grad_accum,
                seq_len: config.data.seq_len,
                loss: None,
            };
            (TrainState { model, optim }, ts)
        }
    };
    let from_step = ts.step;
    on_event(&Event::Started {
        params: state.model.num_params(),
        docs,
        data_tokens,
        skipped,
        from_step,
        total_steps: t.steps,
    });

    let retention = RetentionPolicy {
        keep_last: config.checkpoint.keep_last,
        keep_every: config.checkpoint.keep_every,
    };
    let protected = if from_step > 0 {
        vec![from_step]
    } else {
        vec![]
    };
    let sharded = world > 1 || opts.committer.is_some();
    let gang = sharded.then(|| Gang {
        rank,
        world,
        store: store.clone(),
        job: config.job.name.clone(),
        config_hash: config_hash(config),
        retention,
        protected: protected.clone(),
        parent: (from_step > 0).then_some(from_step),
        pending: None,
        committer: opts.committer.clone(),
    });
    let mut ckpt = Checkpoints {
        writer: CheckpointWriter::spawn(
            store,
            WriterConfig {
                job: config.job.name.clone(),
                config_hash: config_hash(config),
                world_size: world as u32,
                shard_of: sharded.then_some(rank as u32),
                retention,
                protected,
            },
        )?,
        gang,
    };
    let mut summary = Summary {
        from_step,
        step: from_step,
        first_loss: None,
        last_loss: None,
        checkpoints: Vec::new(),
        max_stall: Duration::ZERO,
        tokens_per_sec: 0.0,
        stopped_early: false,
        params_hash: String::new(),
    };
    let last = opts.stop_at.map_or(t.steps, |s| s.min(t.steps));
    let per_step = Packer::per_step(world, t.batch_size as usize, t.grad_accum as usize);
    let tokens_per_step = per_step * seq_len as u64;
    let loop_start = Instant::now();
    while ts.step < last {
        let started = Instant::now();
        let batches = packer.step_batches(
            ts.cursor,
            rank,
            world,
            t.batch_size as usize,
            t.grad_accum as usize,
        );
        let lr = schedule.at(ts.step);
        let stats = state.step(ts.step, &batches, lr, t.grad_clip, collective)?;
        ts.step += 1;
        ts.cursor += per_step;
        ts.tokens += stats.counted as u64;
        ts.loss = Some(stats.loss);
        ts.adamw_steps = state.optim.steps;
        summary.first_loss.get_or_insert(stats.loss);
        summary.last_loss = Some(stats.loss);
        let elapsed = started.elapsed();
        on_event(&Event::Step {
            step: ts.step,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_sec: tokens_per_step as f64 / elapsed.as_secs_f64().max(1e-9),
            elapsed,
        });
        let stop = opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed));
        let (stop, committed) = ckpt.progress(stop, collective, &rt)?;
        if let Some(w) = committed {
            on_event(&Event::CheckpointCommitted(w.clone()));
            summary.checkpoints.push(w);
        }
        let due = ts.step.is_multiple_of(config.checkpoint.every_steps) || ts.step == last || stop;
        if due {
            let waited = Instant::now();
            if let Some(w) = ckpt.finish(collective, &rt)? {
                on_event(&Event::CheckpointCommitted(w.clone()));
                summary.checkpoints.push(w);
            }
            let waited = waited.elapsed();
            let copy = Instant::now();
            let snap = state.snapshot(ts.clone());
            let stall = copy.elapsed();
            ckpt.submit(snap)?;
            summary.max_stall = summary.max_stall.max(stall);
            on_event(&Event::CheckpointStarted {
                step: ts.step,
                stall,
                waited,
            });
        }
        if stop {
            summary.stopped_early = true;
            break;
        }
    }
    if let Some(w) = ckpt.finish(collective, &rt)? {
        on_event(&Event::CheckpointCommitted(w.clone()));
        summary.checkpoints.push(w);
    }
    summary.step = ts.step;
    summary.params_hash = params_hash(&state.model);
    summary.stopped_early |= ts.step < t.steps;
    let trained = ts.step - from_step;
    if trained > 0 {
        summary.tokens_per_sec =
            (trained * tokens_per_step) as f64 / loop_start.elapsed().as_secs_f64().max(1e-9);
    }
    Ok(summary)
}
