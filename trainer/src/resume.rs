//! Where a run starts, agreed by the gang, and the model and optimizer state it starts with.
//!
//! The decision itself is storage's ([`CheckpointStore::choose_start`], the same rules the
//! coordinator applies). Without a coordinator rank 0 makes it and broadcasts the step, so every
//! rank loads the same checkpoint; with one, the coordinator made it and every rank got the same
//! answer from `Join`.

use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use lockstep_api::{JobConfig, Precision, Resume};
use lockstep_storage::{Checkpoint, CheckpointStore, SetAside, Want};

use crate::checkpoint::{LoraStart, LoraState, TrainState, TrainerState};
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::inputs::Base;
use crate::model::{Llama, LlamaConfig, Lora, LoraSettings};
use crate::optim::AdamW;
use crate::plan::Plan;

/// Who decides where a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// This run: rank 0 applies the rules of [`lockstep_storage::resume`] to `Resume`.
    Choose(Resume),
    /// The coordinator already did: this committed step, or `None` for the beginning.
    Given(Option<u64>),
    /// This rank replaces a lost one in a running gang: it starts from the state `from`
    /// streams ([`crate::recovery`]), not from a checkpoint.
    FromPeer {
        /// The rank that streams it.
        from: usize,
        /// The step of that state, as the coordinator announced it.
        step: u64,
    },
}

/// `checkpoint.resume` in storage's terms.
pub fn want(r: Resume) -> Want {
    match r {
        Resume::Latest => Want::Latest,
        Resume::Fresh => Want::Fresh,
        Resume::Step(s) => Want::Step(s),
    }
}

/// The checkpoint every rank starts from (`None`: the beginning) and, on the rank that chose,
/// the newer checkpoints it set aside.
pub fn agree(
    start: Start,
    store: &CheckpointStore,
    collective: &mut dyn Collective,
    rt: &tokio::runtime::Runtime,
) -> Result<(Option<Checkpoint>, Vec<SetAside>)> {
    let load = |step: Option<u64>| -> Result<Option<Checkpoint>> {
        step.map(|s| rt.block_on(store.load(s)).map_err(Error::from))
            .transpose()
    };
    let resume = match start {
        Start::Given(step) => return Ok((load(step)?, vec![])),
        Start::Choose(r) => r,
        Start::FromPeer { from, .. } => {
            return Err(Error::Internal(format!(
                "a replacement starts from rank {from}'s state, not from a checkpoint of the \
                 store (the training loop receives it)"
            )));
        }
    };
    // The step rank 0 announces: a step, the beginning, or "I failed".
    const FRESH: u64 = u64::MAX;
    const FAILED: u64 = u64::MAX - 1;
    if collective.rank() == 0 {
        let chosen = rt.block_on(store.choose_start(want(resume)));
        let code = match &chosen {
            Ok(p) => p.step.unwrap_or(FRESH),
            Err(_) => FAILED,
        };
        if collective.world_size() > 1 {
            collective.broadcast(&mut code.to_le_bytes(), 0)?;
        }
        let point = chosen?;
        Ok((load(point.step)?, point.set_aside))
    } else {
        let mut code = [0u8; 8];
        collective.broadcast(&mut code, 0)?;
        match u64::from_le_bytes(code) {
            FRESH => Ok((None, vec![])),
            FAILED => Err(Error::Internal(
                "rank 0 could not choose a checkpoint to start from (its log says why)".into(),
            )),
            step => Ok((load(Some(step))?, vec![])),
        }
    }
}

/// Whether this job may resume `m`: one its own job (or `checkpoint.resume_job`) wrote, not
/// past its own last step.
fn check_owner(config: &JobConfig, m: &lockstep_storage::Manifest) -> Result<()> {
    let (mine, theirs) = (&config.job.name, &m.job);
    if theirs != mine && config.checkpoint.resume_job.as_ref() != Some(theirs) {
        return Err(Error::Resume {
            step: m.step,
            reason: format!(
                "job `{theirs}` wrote it; this is job `{mine}`, and two jobs must not share \
                 checkpoint.url `{}` (use a URL of its own; to continue a renamed job, set \
                 checkpoint.resume_job = \"{theirs}\")",
                config.checkpoint.url
            ),
        });
    }
    if m.step > config.train.steps {
        return Err(Error::Resume {
            step: m.step,
            reason: format!(
                "it is past this job's train.steps = {}: there is nothing to train, and its \
                 weights are not this job's to export (raise train.steps to train on, or use \
                 another checkpoint.url)",
                config.train.steps
            ),
        });
    }
    Ok(())
}

/// Refuses a LoRA rank above the smaller side of a targeted projection: such an adapter is no
/// longer low-rank, only larger than the weight it adapts (the check `lockstep plan` makes).
fn check_rank(section: &lockstep_api::LoraSection, cfg: &LlamaConfig) -> Result<()> {
    let shape = lockstep_api::memory::Shape {
        hidden: cfg.hidden_size as u64,
        layers: cfg.num_hidden_layers as u64,
        heads: cfg.num_attention_heads.max(1) as u64,
        kv_heads: cfg.kv_heads() as u64,
        inner: cfg.intermediate_size as u64,
        vocab: cfg.vocab_size as u64,
        tied: cfg.tie_word_embeddings,
    };
    shape.check_lora(section).map_err(Error::Usage)
}

/// The model, optimizer and trainer state a run starts with: restored from `ckpt` (its
/// architecture must be the base model's), or the base model's weights (or a random init)
/// with fresh moments.
pub fn begin<B: AutodiffBackend>(
    plan: &Plan,
    config: &JobConfig,
    mut base: Base,
    ckpt: Option<&Checkpoint>,
    device: &burn::tensor::Device<B::InnerBackend>,
) -> Result<(TrainState<B>, TrainerState)> {
    let seed = config.train.seed;
    // A promoted adapter to start from (instead of fresh adapters).
    let adapters = base.adapters.take();
    // With [lora], the base (frozen) is needed whether or not a checkpoint is resumed: a LoRA
    // checkpoint holds only the adapters.
    let lora = match &config.lora {
        None => None,
        Some(section) => {
            check_rank(section, &base.config)?;
            let identity = match &base.origin {
                Some((_, sha256)) => format!("sha256 {sha256}"),
                None => format!("init seed {seed}"),
            };
            // The frozen base: in bf16 under bf16-mixed (half its memory).
            let dtype = match config.train.precision {
                Precision::F32 => DType::F32,
                Precision::Bf16Mixed => DType::BF16,
            };
            let values = match base.values.take() {
                Some(values) => values,
                None => crate::model::init_values(&base.config, seed),
            };
            let model = Llama::from_values_as(base.config.clone(), values, device, dtype);
            Some(LoraStart {
                settings: LoraSettings::from_section(section),
                base: identity,
                model,
                seed,
            })
        }
    };
    let Some(ckpt) = ckpt else {
        let mut lora_state = None;
        let model = match lora {
            Some(start) => {
                let mut model = start.model;
                model.lora = Some(match adapters {
                    Some(values) => {
                        let mut l =
                            Lora::from_values(start.settings.clone(), &base.config, values, device);
                        l.seed = seed;
                        l
                    }
                    None => Lora::init(start.settings.clone(), &base.config, seed, device),
                });
                lora_state = Some(LoraState {
                    settings: start.settings,
                    base: start.base,
                });
                model
            }
            None => match base.values {
                Some(values) => Llama::from_values(base.config.clone(), values, device),
                None => Llama::init(base.config.clone(), seed, device),
            },
        };
        let mut model = model;
        model.precision = config.train.precision;
        let shapes: Vec<[usize; 2]> = model.trained().0.iter().map(|s| s.shape2()).collect();
        let optim = AdamW::new(plan.adamw, &shapes, device);
        let mut ts = plan.trainer_state(config, &base.config, None);
        ts.lora = lora_state;
        return Ok((TrainState { model, optim }, ts));
    };
    check_owner(config, &ckpt.manifest)?;
    let (mut state, restored) = TrainState::<B>::restore(&base.config, lora, ckpt, device)?;
    if restored.seq_len != config.data.seq_len || restored.seed != config.train.seed {
        tracing::warn!(
            "resuming with a different data.seq_len or train.seed than the checkpoint was \
             trained with: the data order changes"
        );
    }
    if restored.precision != config.train.precision {
        tracing::warn!(
            "resuming a checkpoint trained with train.precision = \"{}\" as \"{}\": the run \
             continues in the new precision, so its results match an uninterrupted run of \
             neither",
            restored.precision.as_str(),
            config.train.precision.as_str()
        );
    }
    state.optim.config = plan.adamw;
    state.model.precision = config.train.precision;
    let mut ts = plan.trainer_state(config, &base.config, Some(&restored));
    // What this run trains with from here on (a changed lora.dropout is allowed and recorded).
    if let (Some(now), Some(l)) = (&mut ts.lora, &state.model.lora) {
        now.settings = l.settings.clone();
    }
    Ok((state, ts))
}
