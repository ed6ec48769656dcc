//! The training loop of one rank: read the inputs, agree on the starting point, then step and
//! checkpoint until the last step (or a stop), and finish the checkpoint in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use lockstep_api::JobConfig;
use lockstep_storage::CheckpointStore;

use crate::checkpoint::commit::Authority;
use crate::checkpoint::commit::Outcome;
use crate::checkpoint::{Checkpoints, ShardCommitter, Written};
use crate::collective::Collective;
use crate::data::Packer;
use crate::error::{Error, Result};
use crate::eval::Evaluator;
use crate::inputs::{load_base, load_tokens};
use crate::model::{Llama, tensor_values};
use crate::plan::Plan;
use crate::resume::{self, Start};

/// Knobs of one run that are not part of the job config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Where to start; `None`: rank 0 chooses by `checkpoint.resume`.
    pub start: Option<Start>,
    /// Stop after this step (checkpointing it) even if `train.steps` is further; the schedule
    /// still spans `train.steps`. For preemption drills and tests.
    pub stop_at: Option<u64>,
    /// Set from outside (SIGTERM, SIGINT, the coordinator) to checkpoint the current step and
    /// stop.
    pub stop: Option<Arc<AtomicBool>>,
    /// The commit authority (the coordinator). Without one, rank 0 commits.
    pub committer: Option<Arc<dyn ShardCommitter>>,
    /// Where tokenised data is cached (shared by the ranks of a machine); `None`: the
    /// per-user default ([`crate::tokens::default_cache`]).
    pub data_cache: Option<std::path::PathBuf>,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// Before the first step: what takes long (tokenising the data, waiting for another
    /// process's tokenising of it), in words.
    Preparing {
        /// What, and how far.
        doing: String,
    },
    /// Model, data and starting point are ready.
    Started {
        /// Parameters.
        params: usize,
        /// A LoRA run's adapters, in words (rank, targets, trained parameters, where they start
        /// from); `None`: a full fine-tune.
        lora: Option<String>,
        /// Documents of the data.
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
    /// A newer checkpoint failed verification and was moved aside; an older one is used.
    SetAside {
        /// Its step.
        step: u64,
        /// Why.
        reason: String,
        /// Where it is now.
        moved_to: String,
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
    /// The held-out loss was measured (after `step`).
    Eval {
        /// Steps completed.
        step: u64,
        /// Mean loss per counted target over `data.eval`.
        loss: f64,
        /// Windows evaluated over the gang.
        windows: u64,
        /// Wall time of the evaluation.
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
    /// A checkpoint could not be written or committed; training goes on unless it cannot.
    CheckpointFailed {
        /// Its step.
        step: u64,
        /// Why.
        reason: String,
        /// Failures in a row, this one included.
        in_a_row: u32,
        /// The run stops for it (the store refuses writes, or too many in a row).
        stopping: bool,
    },
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The step the run started from.
    pub from_step: u64,
    /// Steps completed at the end.
    pub step: u64,
    /// Loss of the first step run, if any ran.
    pub first_loss: Option<f64>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// The newest held-out loss (this run's, or the resumed checkpoint's).
    pub eval_loss: Option<f64>,
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
    // A LoRA run's adapters too (the base they change is frozen).
    for p in model.lora.iter().flat_map(|l| &l.params) {
        h.update(bytemuck::cast_slice(&tensor_values(p.clone())));
    }
    format!("{:016x}", h.digest())
}

/// Trains `config` as `collective`'s rank on `device` (the inner backend of `B` does the work),
/// reporting progress to `on_event`. Checkpoints go to `checkpoint.url`; the coordinator commits
/// them, or rank 0 when there is none.
pub fn train<B: AutodiffBackend>(
    config: &JobConfig,
    opts: &RunOptions,
    device: &burn::tensor::Device<B::InnerBackend>,
    collective: &mut dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary> {
    let rt = crate::runtime::io("trainer-io")?;
    let t = &config.train;
    let plan = Plan::new(
        config,
        collective.rank(),
        collective.world_size(),
        opts.stop_at,
    );

    let base = load_base(config, &rt)?;
    let cache = match &opts.data_cache {
        Some(dir) => dir.clone(),
        None => crate::tokens::default_cache()?,
    };
    let vocab = base.config.vocab_size;
    let mut note = |doing: String| on_event(&Event::Preparing { doing });
    let mut watch = crate::tokens::Watch {
        who: format!("job {}", config.job.name),
        stop: opts.stop.as_deref(),
        note: &mut note,
    };
    let corpus = load_tokens(
        config,
        &config.data.train,
        &cache,
        &base.tokenizer,
        vocab,
        &rt,
        &mut watch,
    )?;
    let (docs, data_tokens, skipped) = (corpus.len(), corpus.tokens(), corpus.skipped());
    let train_files = corpus.per_file().to_vec();
    let mut eval_files = Vec::new();
    let seq_len = config.data.seq_len as usize;
    let mut packer = Packer::new(corpus, seq_len, t.seed)?;
    let mut evaluator = if config.data.eval.is_empty() {
        None
    } else {
        let held_out = load_tokens(
            config,
            &config.data.eval,
            &cache,
            &base.tokenizer,
            vocab,
            &rt,
            &mut watch,
        )?;
        eval_files = held_out.per_file().to_vec();
        Some(Evaluator::new(
            held_out,
            seq_len,
            t.seed,
            t.batch_size as usize,
        )?)
    };
    // What this run starts from and reads, for an export's lineage.
    let provenance = serde_json::json!({
        "base": config.model.base,
        "base_read_from": base.origin.as_ref().map(|o| o.0.clone()),
        "base_safetensors_sha256": base.origin.as_ref().map(|o| o.1.clone()),
        "train": train_files,
        "eval": eval_files,
    });

    let store = CheckpointStore::open(&config.checkpoint.url)?;
    let start = opts
        .start
        .unwrap_or(Start::Choose(config.checkpoint.resume_from()));
    let (ckpt, set_aside) = resume::agree(start, &store, collective, &rt)?;
    for s in set_aside {
        on_event(&Event::SetAside {
            step: s.step,
            reason: s.reason,
            moved_to: s.moved_to,
        });
    }
    let from_adapter = base.adapters.is_some();
    let resumed = ckpt.is_some();
    let (mut state, mut ts) = resume::begin::<B>(&plan, config, base, ckpt.as_ref(), device)?;
    drop(ckpt);
    ts.provenance = provenance;
    let from_step = ts.step;
    let lora = state.model.lora.as_ref().map(|l| {
        let trained: usize = l.specs.iter().map(|s| s.numel()).sum();
        let start = if resumed {
            "from the checkpoint"
        } else if from_adapter {
            "from the promoted adapter"
        } else {
            "fresh"
        };
        format!(
            "LoRA r = {} on {}: {:.3}M trained, {start}",
            l.settings.r,
            l.settings.targets.join(", "),
            trained as f64 / 1e6
        )
    });
    on_event(&Event::Started {
        params: state.model.num_params(),
        lora,
        docs,
        data_tokens,
        skipped,
        from_step,
        total_steps: t.steps,
    });

    let authority = match &opts.committer {
        Some(c) => Authority::Coordinator(c.clone()),
        None => Authority::Rank0 {
            job: config.job.name.clone(),
            retention: plan.retention,
            protected: (from_step > 0).then_some(from_step).into_iter().collect(),
        },
    };
    let mut ckpt = Checkpoints::new(
        store,
        authority,
        plan.rank,
        plan.world,
        plan.config_hash.clone(),
    )?;
    let mut summary = Summary {
        from_step,
        step: from_step,
        first_loss: None,
        last_loss: None,
        eval_loss: ts.eval_loss,
        checkpoints: Vec::new(),
        max_stall: Duration::ZERO,
        tokens_per_sec: 0.0,
        stopped_early: false,
        params_hash: String::new(),
    };
    let loop_start = Instant::now();
    let mut last_checkpoint = loop_start;
    // Checkpoints that failed in a row.
    let mut failing = 0u32;
    while ts.step < plan.last_step {
        let started = Instant::now();
        let batches = packer.step_batches(
            ts.cursor,
            plan.rank,
            plan.world,
            t.batch_size as usize,
            t.grad_accum as usize,
        )?;
        let lr = plan.schedule.at(ts.step);
        let stats = state.step(ts.step, &batches, lr, t.grad_clip, collective)?;
        ts.step += 1;
        ts.cursor += plan.windows_per_step;
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
            tokens_per_sec: plan.tokens_per_step as f64 / elapsed.as_secs_f64().max(1e-9),
            elapsed,
        });
        let stop = opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed));
        if let Some(ev) = evaluator.as_mut()
            && !stop
            && ((t.eval_every > 0 && ts.step.is_multiple_of(t.eval_every)) || ts.step == t.steps)
        {
            let started = Instant::now();
            let loss = ev.run(ts.step, &state.model, collective)?;
            ts.eval_loss = Some(loss);
            ts.eval_step = Some(ts.step);
            summary.eval_loss = Some(loss);
            on_event(&Event::Eval {
                step: ts.step,
                loss,
                windows: ev.windows(),
                elapsed: started.elapsed(),
            });
        }
        // `checkpoint.every`: rank 0's clock since the last checkpoint it started.
        let time_due = plan.rank == 0
            && config
                .checkpoint
                .every
                .is_some_and(|every| last_checkpoint.elapsed() >= every);
        let agreed = ckpt.progress(stop, time_due, collective, &rt)?;
        let stop = agreed.stop;
        if let Some(o) = agreed.committed {
            settle(o, &mut summary, &mut failing, false, config, on_event)?;
        }
        let due = ts.step.is_multiple_of(config.checkpoint.every_steps)
            || ts.step == plan.last_step
            || stop
            || agreed.time_due;
        if due {
            last_checkpoint = Instant::now();
            let waited = Instant::now();
            if let Some(o) = ckpt.finish(collective, &rt)? {
                settle(o, &mut summary, &mut failing, false, config, on_event)?;
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
    // The last (or the stop's) checkpoint: the run's result, so it must commit.
    if let Some(o) = ckpt.finish(collective, &rt)? {
        settle(o, &mut summary, &mut failing, true, config, on_event)?;
    }
    summary.step = ts.step;
    summary.params_hash = params_hash(&state.model);
    summary.stopped_early |= ts.step < t.steps;
    let trained = ts.step - from_step;
    if trained > 0 {
        summary.tokens_per_sec =
            (trained * plan.tokens_per_step) as f64 / loop_start.elapsed().as_secs_f64().max(1e-9);
    }
    Ok(summary)
}

/// Checkpoints that may fail in a row (each retried by the next) before the run stops.
pub const MAX_CHECKPOINT_FAILURES: u32 = 3;

/// Reports how a checkpoint ended. A failed one is reported and training goes on (the next
/// checkpoint tries again), unless the store refuses writes (full, read-only, denied),
/// [`MAX_CHECKPOINT_FAILURES`] failed in a row, or it was the run's last (`last`: what the run
/// ends with, and what an export reads): then the run stops, naming the store and the last
/// committed checkpoint, which is left intact.
fn settle(
    outcome: Outcome,
    summary: &mut Summary,
    failing: &mut u32,
    last: bool,
    config: &JobConfig,
    on_event: &mut dyn FnMut(&Event),
) -> Result<()> {
    let f = match outcome {
        Ok(w) => {
            *failing = 0;
            committed(w, summary, on_event);
            return Ok(());
        }
        Err(f) => f,
    };
    *failing += 1;
    let stopping = f.refused.is_some() || *failing >= MAX_CHECKPOINT_FAILURES || last;
    on_event(&Event::CheckpointFailed {
        step: f.step,
        reason: f.reason.clone(),
        in_a_row: *failing,
        stopping,
    });
    if !stopping {
        return Ok(());
    }
    let newest = summary
        .checkpoints
        .last()
        .map(|w| w.step)
        .or((summary.from_step > 0).then_some(summary.from_step));
    let kept = match newest {
        Some(s) => format!("its last committed checkpoint, step {s}, is intact"),
        None => "no checkpoint was committed".into(),
    };
    let why = match &f.refused {
        Some(what) => format!("the store takes no more writes ({what})"),
        None if *failing >= MAX_CHECKPOINT_FAILURES => {
            format!("{} checkpoints in a row failed", *failing)
        }
        None => "it was the run's last, which it must end with".to_string(),
    };
    Err(Error::CheckpointsFailing {
        reason: format!(
            "checkpoint {} could not be stored under {}: {}; {why}, so the run stops ({kept}): \
             free space or fix access to checkpoint.url, then run again to resume",
            f.step, config.checkpoint.url, f.reason
        ),
        refused: f.refused.is_some(),
    })
}

/// Reports a committed checkpoint and keeps it in the summary.
fn committed(w: Written, summary: &mut Summary, on_event: &mut dyn FnMut(&Event)) {
    on_event(&Event::CheckpointCommitted(w.clone()));
    summary.checkpoints.push(w);
}
