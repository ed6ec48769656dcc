//! Checkpoints of a training run: the snapshot the loop takes (a host copy of parameters, AdamW
//! moments and the trainer state) and restoring a [`TrainState`] from a loaded checkpoint.
//!
//! - [`writer`]: the thread that streams this rank's shard to the store while training goes on.
//! - [`commit`]: how the gang agrees that every shard is durable and who commits: the
//!   coordinator (`CommitShard`), or rank 0 through [`lockstep_storage::CheckpointStore::commit_step`]
//!   when there is none. Both end in that one storage function.
//!
//! At most one checkpoint is in flight: before taking a snapshot, the loop waits for the
//! previous one to finish, so host memory holds at most one snapshot and the loop's stall is
//! the snapshot copy (plus any wait for a slow store, which is logged apart).

pub mod commit;
pub mod writer;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use bytes::Bytes;
use lockstep_storage::{DType, TensorInput};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Llama, LlamaConfig, Lora, LoraSettings, tensor_values};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
pub use crate::step::TrainState;
pub use commit::{Checkpoints, ShardCommitter, ShardReport};
pub use writer::{CheckpointWriter, Written};

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
    /// The newest held-out loss (`data.eval`), and none without eval data.
    #[serde(default)]
    pub eval_loss: Option<f64>,
    /// The step `eval_loss` was measured after.
    #[serde(default)]
    pub eval_step: Option<u64>,
    /// What the run started from and read, for an export's lineage: `base` (model.base and,
    /// for a Hugging Face base, the sha256 of its model.safetensors) and the records per
    /// training and held-out file. Not part of what a resume checks.
    #[serde(default)]
    pub provenance: serde_json::Value,
    /// A LoRA run's adapters and the base they train on (`None`: a full fine-tune, whose
    /// checkpoints hold every parameter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraState>,
    /// `train.precision` of the steps that made it (absent: f32).
    #[serde(default, skip_serializing_if = "lockstep_api::Precision::is_f32")]
    pub precision: lockstep_api::Precision,
}

/// What a LoRA checkpoint holds adapters for: a resume must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraState {
    /// Rank, alpha, dropout, targets.
    pub settings: LoraSettings,
    /// The frozen base: the sha256 of its `model.safetensors`, or `init seed N` for a random
    /// one. The checkpoint holds only the adapters, so a resume on another base is refused.
    pub base: String,
}

/// A LoRA run's start: its adapters' settings, its base's identity ([`LoraState::base`]) and
/// the base model itself.
pub struct LoraStart<B: burn::tensor::backend::Backend> {
    /// Rank, alpha, dropout, targets.
    pub settings: LoraSettings,
    /// The base's identity.
    pub base: String,
    /// The base model (its weights are not in a LoRA checkpoint).
    pub model: Llama<B>,
    /// Seeds the adapters' dropout.
    pub seed: u64,
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
    /// Copies the trained parameters (every parameter, or a LoRA run's adapters) and their
    /// moments to host memory.
    pub fn snapshot(&self, state: TrainerState) -> Snapshot {
        let (specs, params) = self.model.trained();
        let mut tensors = Vec::with_capacity(params.len() * 3);
        let groups = [
            ("", params),
            (EXP_AVG, self.optim.m.as_slice()),
            (EXP_AVG_SQ, self.optim.v.as_slice()),
        ];
        for (prefix, list) in groups {
            for (spec, t) in specs.iter().zip(list.iter()) {
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
    /// architecture is `config`'s. With `lora`, the checkpoint must be a LoRA one of the same
    /// settings on the same base, and its adapters go on `lora`'s base model.
    pub fn restore(
        config: &LlamaConfig,
        lora: Option<LoraStart<B::InnerBackend>>,
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
        let refuse = |reason: String| Error::Resume { step, reason };
        match (&state.lora, &lora) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(refuse(
                    "it holds LoRA adapters, and this job has no [lora] (a full fine-tune cannot \
                     continue from adapters): add the [lora] it was trained with, or use another \
                     checkpoint.url"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                return Err(refuse(
                    "it is a full fine-tune's, and this job sets [lora]: remove [lora], or use \
                     another checkpoint.url"
                        .into(),
                ));
            }
            (Some(was), Some(now)) => {
                let (a, b) = (&was.settings, &now.settings);
                if (a.r, a.alpha, &a.targets) != (b.r, b.alpha, &b.targets) {
                    return Err(refuse(format!(
                        "its adapters are lora.r = {}, alpha = {}, target_modules = {:?}; this \
                         job's are r = {}, alpha = {}, {:?}: use the checkpoint's [lora], or \
                         another checkpoint.url",
                        a.r, a.alpha, a.targets, b.r, b.alpha, b.targets
                    )));
                }
                if was.base != now.base {
                    return Err(refuse(format!(
                        "its adapters were trained on base `{}`; this job's model.base is `{}` \
                         (a checkpoint of adapters holds no base, so it resumes only on the base \
                         it was trained on)",
                        was.base, now.base
                    )));
                }
            }
        }
        let specs = match &lora {
            Some(l) => l.settings.specs(config),
            None => crate::model::param_specs(config),
        };
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
        let model = match lora {
            Some(start) => {
                let mut model = start.model;
                let mut adapters = Lora::with_params(start.settings, config, specs, params);
                adapters.seed = start.seed;
                model.lora = Some(adapters);
                model
            }
            None => Llama {
                config: config.clone(),
                specs,
                params,
                lora: None,
                noise: None,
                precision: lockstep_api::Precision::F32,
            },
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
