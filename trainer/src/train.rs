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
use crate::checkpoint::{
    Checkpoints, LoraStart, ShardCommitter, TrainState, TrainerState, Written,
};
use crate::collective::Collective;
use crate::data::Packer;
use crate::error::{Error, Result};
use crate::eval::Evaluator;
use crate::inputs::{load_base, load_tokens};
use crate::model::{Llama, LlamaConfig, tensor_values};
use crate::plan::Plan;
use crate::recovery::{Emergency, Regroup, Regrouped, Reunion};
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
    /// How the gang re-forms after losing a rank (a coordinator that replaces ranks in
    /// place); `None`: a lost rank ends this one.
    pub regroup: Option<Arc<dyn Regroup>>,
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
    /// The gang lost a rank and re-formed with a replacement (in-place recovery).
    Recovered {
        /// The step the gang continues from (no step after it is lost).
        step: u64,
        /// The step this rank held when the gang broke.
        held: u64,
        /// The rank whose state every other rank took.
        from: usize,
        /// How this rank saw the loss.
        cause: String,
        /// A checkpoint in flight that will not be committed (the next one is taken at once).
        abandoned: Option<u64>,
        /// From this rank seeing the loss to the gang re-formed with the state.
        elapsed: Duration,
    },
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
    /// This rank replaced a lost one and started from a survivor's state.
    pub replacement: bool,
    /// The gang lost its coordinator and stopped, rank 0 committing its last checkpoint.
    pub orphaned: bool,
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
    let replacement = matches!(start, Start::FromPeer { .. });
    let (ckpt, set_aside) = match start {
        Start::FromPeer { from, step } => {
            let got = crate::recovery::receive_state(
                from,
                step,
                max_state_bytes(config, &base.config),
                &config.job.name,
                collective,
            )?;
            (Some(got), Vec::new())
        }
        start => resume::agree(start, &store, collective, &rt)?,
    };
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
    if opts.committer.is_some() {
        // The coordinator lost: the gang's last checkpoint is committed by rank 0 instead,
        // keeping every checkpoint (a coordinator that takes the job over resumes from it).
        ckpt.orphan_commits_by(Authority::Rank0 {
            job: config.job.name.clone(),
            retention: lockstep_storage::RetentionPolicy {
                keep_last: usize::MAX,
                keep_every: None,
            },
            protected: Vec::new(),
        });
    }
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
        replacement,
        orphaned: false,
    };
    let loop_start = Instant::now();
    let mut last_checkpoint = loop_start;
    // Checkpoints that failed in a row.
    let mut failing = 0u32;
    // A replacement of a lost rank does what the survivors do once the gang re-formed.
    if replacement {
        let mut rejoined = Rejoined {
            evaluator: evaluator.as_mut(),
            summary: &mut summary,
            failing: &mut failing,
            ckpt: &mut ckpt,
            rt: &rt,
        };
        match rejoined.catch_up(
            &state, &mut ts, false, false, &plan, config, collective, on_event,
        ) {
            Ok(()) => {}
            // Regrouped by the loop's first step, which finds the ring broken.
            Err(e) if e.breaks_gang() && opts.regroup.is_some() => {
                tracing::warn!(error = %e, "the gang broke while this replacement joined it");
            }
            Err(e) => return Err(e),
        }
    } else if from_step > 0 {
        // A checkpoint taken before its step's evaluation (an emergency checkpoint of a step
        // whose evaluation the lost rank interrupted) still owes it.
        match evaluate_if_missed(
            evaluator.as_mut(),
            &state,
            &mut ts,
            &mut summary,
            config,
            collective,
            on_event,
        ) {
            Ok(()) => {}
            Err(e) if e.breaks_gang() && opts.regroup.is_some() => {
                tracing::warn!(error = %e, "the gang broke while evaluating the resumed step");
            }
            Err(e) => return Err(e),
        }
    }
    // Recoveries in a row that ended before a step finished.
    let mut regroups = 0u32;
    while ts.step < plan.last_step {
        // One step and what follows it (eval, the gang's agreement, a checkpoint). A lost rank
        // surfaces here as a broken ring; the state is then that of the last finished step.
        let mut iteration = || -> Result<bool> {
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
            if !stop {
                evaluate(
                    evaluator.as_mut(),
                    &state,
                    &mut ts,
                    &mut summary,
                    config,
                    collective,
                    on_event,
                )?;
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
                checkpoint_now(
                    &state,
                    &ts,
                    &mut ckpt,
                    &mut summary,
                    &mut failing,
                    config,
                    collective,
                    &rt,
                    on_event,
                )?;
            }
            Ok(stop)
        };
        match iteration() {
            Ok(stop) => {
                regroups = 0;
                if stop {
                    summary.stopped_early = true;
                    break;
                }
            }
            Err(e) if e.breaks_gang() && opts.regroup.is_some() => {
                let Some(regroup) = opts.regroup.as_deref() else {
                    return Err(e);
                };
                regroups += 1;
                if regroups > MAX_REGROUPS {
                    return Err(e);
                }
                tracing::warn!(held = ts.step, error = %e, "the gang lost a rank: regrouping");
                let recovered = recover(
                    regroup,
                    &e.to_string(),
                    &mut state,
                    &mut ts,
                    &mut ckpt,
                    &plan,
                    config,
                    collective,
                    &rt,
                    on_event,
                );
                let after = recovered.and_then(|done| {
                    last_checkpoint = Instant::now();
                    let committed = ts.step == from_step && !replacement
                        || summary.checkpoints.iter().any(|w| w.step == ts.step);
                    let mut rejoined = Rejoined {
                        evaluator: evaluator.as_mut(),
                        summary: &mut summary,
                        failing: &mut failing,
                        ckpt: &mut ckpt,
                        rt: &rt,
                    };
                    rejoined.catch_up(
                        &state,
                        &mut ts,
                        done.abandoned.is_some(),
                        committed,
                        &plan,
                        config,
                        collective,
                        on_event,
                    )
                });
                match after {
                    Ok(()) => {}
                    // The gang broke again while re-forming: regroup again (bounded above).
                    Err(e) if e.breaks_gang() => {
                        tracing::warn!(error = %e, "the gang broke while re-forming");
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    // The last (or the stop's) checkpoint: the run's result, so it must commit.
    if let Some(o) = ckpt.finish(collective, &rt)? {
        settle(o, &mut summary, &mut failing, true, config, on_event)?;
    }
    summary.step = ts.step;
    summary.orphaned = ckpt.orphaned_gang();
    summary.params_hash = params_hash(&state.model);
    summary.stopped_early |= ts.step < t.steps;
    let trained = ts.step - from_step;
    if trained > 0 {
        summary.tokens_per_sec =
            (trained * plan.tokens_per_step) as f64 / loop_start.elapsed().as_secs_f64().max(1e-9);
    }
    Ok(summary)
}

/// Regroups in a row, with no step finished between them, before a rank gives up (and exits,
/// so its coordinator restarts the gang from the last checkpoint).
pub const MAX_REGROUPS: u32 = 5;

/// The held-out loss after this step, when it is due (`train.eval_every` and the last step).
#[allow(clippy::too_many_arguments)]
fn evaluate<B: AutodiffBackend>(
    evaluator: Option<&mut Evaluator>,
    state: &TrainState<B>,
    ts: &mut TrainerState,
    summary: &mut Summary,
    config: &JobConfig,
    collective: &mut dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> Result<()> {
    let t = &config.train;
    let Some(ev) = evaluator else { return Ok(()) };
    if !((t.eval_every > 0 && ts.step.is_multiple_of(t.eval_every)) || ts.step == t.steps) {
        return Ok(());
    }
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
    Ok(())
}

/// After a recovery: the evaluation of the step the gang continues from, if it was due and
/// the interrupted iteration did not finish it.
#[allow(clippy::too_many_arguments)]
fn evaluate_if_missed<B: AutodiffBackend>(
    evaluator: Option<&mut Evaluator>,
    state: &TrainState<B>,
    ts: &mut TrainerState,
    summary: &mut Summary,
    config: &JobConfig,
    collective: &mut dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> Result<()> {
    if ts.step == 0 || ts.eval_step == Some(ts.step) {
        return Ok(());
    }
    evaluate(evaluator, state, ts, summary, config, collective, on_event)
}

/// Checkpoints the step just finished: waits for the one in flight (reporting how it ended),
/// then hands a snapshot to the writer.
#[allow(clippy::too_many_arguments)]
fn checkpoint_now<B: AutodiffBackend>(
    state: &TrainState<B>,
    ts: &TrainerState,
    ckpt: &mut Checkpoints,
    summary: &mut Summary,
    failing: &mut u32,
    config: &JobConfig,
    collective: &mut dyn Collective,
    rt: &tokio::runtime::Runtime,
    on_event: &mut dyn FnMut(&Event),
) -> Result<()> {
    let waited = Instant::now();
    if let Some(o) = ckpt.finish(collective, rt)? {
        settle(o, summary, failing, false, config, on_event)?;
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
    Ok(())
}

/// What a rank that re-formed its gang still owes the step the gang continues from.
struct Rejoined<'a> {
    evaluator: Option<&'a mut Evaluator>,
    summary: &'a mut Summary,
    failing: &'a mut u32,
    ckpt: &'a mut Checkpoints,
    rt: &'a tokio::runtime::Runtime,
}

impl Rejoined<'_> {
    /// What the interrupted iteration may not have done for the step the gang continues from,
    /// decided on what every rank shares (the state taken, and one agreement) so that all
    /// ranks, the replacement too, make the same collective calls: its evaluation if it was
    /// due and not taken, and a checkpoint if one was due, or in flight and `abandoned` on any
    /// rank — unless a rank knows this step is `committed`.
    #[allow(clippy::too_many_arguments)]
    fn catch_up<B: AutodiffBackend>(
        &mut self,
        state: &TrainState<B>,
        ts: &mut TrainerState,
        abandoned: bool,
        committed: bool,
        plan: &Plan,
        config: &JobConfig,
        collective: &mut dyn Collective,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        evaluate_if_missed(
            self.evaluator.as_deref_mut(),
            state,
            ts,
            self.summary,
            config,
            collective,
            on_event,
        )?;
        let mut flags = [
            f32::from(u8::from(abandoned)),
            f32::from(u8::from(committed)),
        ];
        collective.all_reduce_sum(&mut flags)?;
        let due =
            ts.step.is_multiple_of(config.checkpoint.every_steps) || ts.step == plan.last_step;
        if (flags[0] > 0.0 || due) && flags[1] == 0.0 && ts.step > 0 {
            checkpoint_now(
                state,
                ts,
                self.ckpt,
                self.summary,
                self.failing,
                config,
                collective,
                self.rt,
                on_event,
            )?;
        }
        Ok(())
    }
}

/// What a recovery did.
struct Recovered {
    /// The checkpoint that was in flight and will not be committed.
    abandoned: Option<u64>,
}

/// Re-forms the gang after it lost a rank ([`crate::recovery`]): regroups through the
/// coordinator, continues over the new ring, and takes the newest state from the rank that
/// holds it. Reports [`Event::Recovered`].
#[allow(clippy::too_many_arguments)]
fn recover<B: AutodiffBackend>(
    regroup: &dyn Regroup,
    cause: &str,
    state: &mut TrainState<B>,
    ts: &mut TrainerState,
    ckpt: &mut Checkpoints,
    plan: &Plan,
    config: &JobConfig,
    collective: &mut dyn Collective,
    rt: &tokio::runtime::Runtime,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Recovered> {
    let lost = Instant::now();
    let held = ts.step;
    // Peers still waiting on this rank (a ring of three or more: not every rank neighbours the
    // lost one) fail now and regroup too.
    collective.leave();
    // Regroup first: the coordinator learns at once which step this rank holds, even while
    // its writer is still busy with a checkpoint the loss interrupted (waited for next).
    let reunion = regroup.regroup(held);
    let abandoned = ckpt.abandon();
    let Regrouped { ring, from, step } = match reunion? {
        Reunion::Reformed(r) => r,
        Reunion::Emergency(e) => {
            return Err(write_emergency(&e, held, state, ts, ckpt, collective, rt));
        }
    };
    collective.reform(ring)?;
    if collective.rank() == from {
        crate::recovery::send_state(&state.snapshot(ts.clone()), collective)?;
    } else {
        let got = crate::recovery::receive_state(
            from,
            step,
            max_state_bytes(config, &state.model.config),
            &config.job.name,
            collective,
        )?;
        let restored = if got.manifest.step != held {
            // This rank is behind the one that sent (the lost rank broke the ring while the
            // last step's all-reduce was finishing): take its parameters and moments too.
            let (mut s, restored) = adopt::<B>(state, ts, &got)?;
            s.optim.config = plan.adamw;
            s.model.precision = config.train.precision;
            *state = s;
            restored
        } else {
            // The same step: the same parameters and moments (replicas are bit-identical),
            // but the trainer state is the sender's too — it may have finished the step's
            // evaluation, which this rank then must not run again alone.
            serde_json::from_value(got.manifest.trainer_state.clone())
                .map_err(|e| Error::Internal(format!("the trainer state rank {from} sent: {e}")))?
        };
        let provenance = std::mem::take(&mut ts.provenance);
        *ts = plan.trainer_state(config, &state.model.config, Some(&restored));
        ts.provenance = provenance;
        if let (Some(now), Some(l)) = (&mut ts.lora, &state.model.lora) {
            now.settings = l.settings.clone();
        }
    }
    on_event(&Event::Recovered {
        step,
        held,
        from,
        cause: cause.to_string(),
        abandoned,
        elapsed: lost.elapsed(),
    });
    Ok(Recovered { abandoned })
}

/// The gang could not re-form in place ([`Reunion::Emergency`]): a rank the coordinator named
/// writes its shard of the emergency checkpoint of the state it holds and reports it, and the
/// coordinator commits the checkpoint once every writer's shard is durable. Either way this
/// rank is done: the error says what it did, and the coordinator restarts the gang.
fn write_emergency<B: AutodiffBackend>(
    e: &Emergency,
    held: u64,
    state: &TrainState<B>,
    ts: &TrainerState,
    ckpt: &mut Checkpoints,
    collective: &dyn Collective,
    rt: &tokio::runtime::Runtime,
) -> Error {
    let rank = collective.rank();
    let Some(index) = e.writers.iter().position(|&w| w as usize == rank) else {
        return Error::NotReformed {
            step: e.step,
            wrote: None,
        };
    };
    if e.step != held {
        return Error::Internal(format!(
            "the coordinator asked rank {rank} for an emergency checkpoint of step {}, but it \
             holds step {held}",
            e.step
        ));
    }
    let started = Instant::now();
    let (index, count) = (index as u32, e.writers.len() as u32);
    match ckpt.emergency(state.snapshot(ts.clone()), index, count, rt) {
        Ok(bytes) => {
            tracing::warn!(
                step = held,
                shard = index,
                shards = count,
                bytes,
                seconds = started.elapsed().as_secs_f64(),
                "wrote and committed the emergency checkpoint"
            );
            Error::NotReformed {
                step: e.step,
                wrote: Some(index),
            }
        }
        Err(err) => Error::Internal(format!(
            "the gang lost a rank and could not re-form in place; writing shard {index} of the \
             emergency checkpoint of step {held} failed: {err} (the coordinator restarts the gang \
             from its last checkpoint)"
        )),
    }
}

/// The most tensor bytes a state transfer of this job can carry: parameters, adapters and two
/// AdamW moments of each, in f32.
pub fn max_state_bytes(config: &JobConfig, model: &LlamaConfig) -> u64 {
    let mut numel: u64 = crate::model::param_specs(model)
        .iter()
        .map(|s| s.numel() as u64)
        .sum();
    if let Some(section) = &config.lora {
        numel += crate::model::LoraSettings::from_section(section)
            .specs(model)
            .iter()
            .map(|s| s.numel() as u64)
            .sum::<u64>();
    }
    numel.saturating_mul(3 * 4)
}

/// This rank's model and optimizer rebuilt from `got` (another rank's newer state), keeping its
/// own frozen base under LoRA.
fn adopt<B: AutodiffBackend>(
    state: &TrainState<B>,
    ts: &TrainerState,
    got: &lockstep_storage::Checkpoint,
) -> Result<(TrainState<B>, TrainerState)> {
    let device = state
        .model
        .params
        .first()
        .map(|p| p.device())
        .ok_or_else(|| Error::Internal("a model without parameters".into()))?;
    let lora = match (&state.model.lora, &ts.lora) {
        (Some(l), Some(identity)) => {
            let mut base = state.model.clone();
            base.lora = None;
            Some(LoraStart {
                settings: l.settings.clone(),
                base: identity.base.clone(),
                model: base,
                seed: l.seed,
            })
        }
        _ => None,
    };
    TrainState::<B>::restore(&state.model.config, lora, got, &device)
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
