//! The setup plan: everything a run derives from its job config and its place in the gang,
//! computed once (the config hash, the optimizer and schedule, retention, the data per step),
//! and the one place a [`TrainerState`] is built — fresh, or carried on from a checkpoint with
//! this job's hyperparameters.

use lockstep_api::JobConfig;
use lockstep_storage::RetentionPolicy;

use crate::checkpoint::TrainerState;
use crate::data::Packer;
use crate::model::LlamaConfig;
use crate::optim::{AdamWConfig, LrSchedule};

/// One rank's run, derived from the job config.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Hash of what decides the results ([`config_hash`]); in every manifest.
    pub config_hash: String,
    /// AdamW hyperparameters.
    pub adamw: AdamWConfig,
    /// The learning-rate schedule over `train.steps`.
    pub schedule: LrSchedule,
    /// Retention after each commit.
    pub retention: RetentionPolicy,
    /// This rank.
    pub rank: usize,
    /// Ranks in the gang.
    pub world: usize,
    /// Data windows the whole gang consumes per step.
    pub windows_per_step: u64,
    /// Input tokens the whole gang consumes per step.
    pub tokens_per_step: u64,
    /// The step this run stops after (`train.steps`, or `--stop-at` if earlier).
    pub last_step: u64,
}

impl Plan {
    /// The plan of `rank` of `world` for `config`, stopping after `stop_at` if given.
    pub fn new(config: &JobConfig, rank: usize, world: usize, stop_at: Option<u64>) -> Plan {
        let t = &config.train;
        let windows_per_step =
            Packer::per_step(world, t.batch_size as usize, t.grad_accum as usize);
        Plan {
            config_hash: config_hash(config),
            adamw: AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
            schedule: LrSchedule {
                lr: t.lr,
                warmup: t.warmup_steps,
                total: t.steps,
                kind: t.schedule,
                min_ratio: t.min_lr_ratio,
            },
            retention: RetentionPolicy {
                keep_last: config.checkpoint.keep_last,
                keep_every: config.checkpoint.keep_every,
            },
            rank,
            world,
            windows_per_step,
            tokens_per_step: windows_per_step * u64::from(config.data.seq_len),
            last_step: stop_at.map_or(t.steps, |s| s.min(t.steps)),
        }
    }

    /// The trainer state this run trains with: `restored`'s counters (step, data cursor,
    /// tokens, AdamW steps, last loss) when resuming, zero otherwise, and this job's
    /// hyperparameters, gang shape and model config either way.
    pub fn trainer_state(
        &self,
        config: &JobConfig,
        model: &LlamaConfig,
        restored: Option<&TrainerState>,
    ) -> TrainerState {
        let t = &config.train;
        TrainerState {
            step: restored.map_or(0, |r| r.step),
            cursor: restored.map_or(0, |r| r.cursor),
            tokens: restored.map_or(0, |r| r.tokens),
            seed: t.seed,
            schedule: self.schedule,
            adamw: self.adamw,
            adamw_steps: restored.map_or(0, |r| r.adamw_steps),
            architecture: model.architecture(),
            model_config: model.clone(),
            world_size: self.world as u32,
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            seq_len: config.data.seq_len,
            loss: restored.and_then(|r| r.loss),
            eval_loss: restored.and_then(|r| r.eval_loss),
            eval_step: restored.and_then(|r| r.eval_step),
            provenance: restored.map_or(serde_json::Value::Null, |r| r.provenance.clone()),
            lora: restored.and_then(|r| r.lora.clone()),
            precision: t.precision,
        }
    }
}

/// A hash of what decides a run's results (model, data, training): stored in each manifest
/// ([`JobConfig::results_hash`]).
pub fn config_hash(config: &JobConfig) -> String {
    config.results_hash()
}
