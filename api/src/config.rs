//! The job configuration: what `lockstep run CONFIG` and `lockstep train --config` read.
//!
//! Unknown fields are rejected (a typo must not silently fall back to a default); every field
//! is documented; defaults are named constants. Durations use humantime (`"60s"`, `"5m"`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A whole job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Gang and recovery settings.
    pub job: JobSection,
    /// Model architecture or base model.
    pub model: ModelSection,
    /// What to train on (and evaluate on), and how it is packed into sequences.
    pub data: DataSection,
    /// The optimizer and its schedule: steps, batch size, learning rate, AdamW, clipping.
    pub train: TrainSection,
    /// Where checkpoints go, how often, how many are kept, and where a run resumes from.
    pub checkpoint: CheckpointSection,
    /// Export of the finished model; none means no export.
    #[serde(default)]
    pub export: Option<ExportSection>,
    /// Train low-rank adapters on a frozen base (LoRA, as PEFT) instead of every weight; none
    /// means a full fine-tune.
    #[serde(default)]
    pub lora: Option<LoraSection>,
}

/// `[lora]`: low-rank adapters (PEFT's LoRA). Each targeted projection `W` of every layer
/// computes `x·Wᵀ + dropout(x)·Aᵀ·Bᵀ · alpha/r`; only `A` (`[r, in]`) and `B` (`[out, r]`)
/// are trained, all-reduced, given optimizer state and checkpointed, the base stays frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// The adapters' rank.
    #[serde(default = "defaults::lora_r")]
    pub r: u32,
    /// Scale numerator: the adapters' output is scaled by `alpha / r`.
    #[serde(default = "defaults::lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapters' input while training (0 to less than 1; never at eval).
    #[serde(default)]
    pub dropout: f64,
    /// The projections that get adapters, by PEFT's names: any of `q_proj`, `k_proj`,
    /// `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    #[serde(default = "defaults::lora_targets")]
    pub target_modules: Vec<String>,
}

/// The projections `[lora] target_modules` may name, in a layer's order.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Upper (and lower) bounds of config values. A config outside them is refused naming the field,
/// the limit and the value: every number a job carries into arithmetic, allocation, process
/// counts or timers is bounded here, once.
pub mod limits {
    use std::time::Duration;

    /// `job.world_size`.
    pub const MAX_WORLD_SIZE: u32 = 4096;
    /// `job.max_restarts`.
    pub const MAX_RESTARTS: u32 = 10_000;
    /// The shortest `job.gang_timeout`, `job.heartbeat_timeout`, `job.collective_timeout`.
    pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest of them (a week).
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `model.hidden_size`.
    pub const MAX_HIDDEN: u32 = 65_536;
    /// `model.intermediate_size`.
    pub const MAX_INTERMEDIATE: u32 = 262_144;
    /// `model.num_layers`.
    pub const MAX_LAYERS: u32 = 1024;
    /// `model.num_heads`.
    pub const MAX_HEADS: u32 = 1024;
    /// `model.vocab_size`.
    pub const MAX_VOCAB: u32 = 4_194_304;
    /// `data.seq_len`.
    pub const MAX_SEQ_LEN: u32 = 1_048_576;
    /// `data.train` entries.
    pub const MAX_TRAIN_FILES: usize = 100_000;
    /// `train.batch_size` and `train.grad_accum`.
    pub const MAX_BATCH: u32 = 65_536;
    /// `train.steps`, `train.warmup_steps`, `checkpoint.every_steps`, `checkpoint.keep_every`
    /// and a resume step (2^40: far past any run, far from overflow).
    pub const MAX_STEPS: u64 = 1 << 40;
    /// `checkpoint.keep_last`.
    pub const MAX_KEEP_LAST: usize = 1_000_000;
    /// `lora.r`.
    pub const MAX_LORA_R: u32 = 65_536;
    /// `lora.alpha` (the adapters' scale is `alpha / r`; far past any useful value, well inside
    /// f32).
    pub const MAX_LORA_ALPHA: f64 = 1e6;
}

/// `[job]`: the job's name, its gang (world size), and how it recovers (restarts, timeouts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job name: lower-case letters, digits and `-` (it names Kubernetes objects).
    pub name: String,
    /// Ranks in the gang.
    #[serde(default = "defaults::world_size")]
    pub world_size: u32,
    /// Whole-gang restarts allowed before the job fails.
    #[serde(default = "defaults::max_restarts")]
    pub max_restarts: u32,
    /// Time for all ranks to launch and join before the attempt is torn down.
    #[serde(default = "defaults::gang_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub gang_timeout: Duration,
    /// A rank silent for this long is dead.
    #[serde(default = "defaults::heartbeat_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub heartbeat_timeout: Duration,
    /// How long a collective operation (gradient all-reduce, forming the ring) waits for a peer
    /// before failing: a dead or hung rank is an error within this time, never a hang. It must
    /// also cover rank 0 loading the starting checkpoint and the slowest rank finishing its
    /// shard of a checkpoint still in flight, which the other ranks wait for.
    #[serde(default = "defaults::collective_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub collective_timeout: Duration,
    /// What the job does when a rank dies or hangs while the gang trains: `in-place` (the
    /// default) keeps the other ranks and their state, starts one replacement that takes the
    /// state from them, and loses no step; `restart` restarts the whole gang from the last
    /// checkpoint. In-place needs the TCP ring (a NCCL gang restarts) and a launcher that can
    /// start one worker into a running gang (this machine's); otherwise the gang restarts.
    /// When a replacement fails or does not join within `gang_timeout`, the other ranks
    /// first write the state they hold as an emergency checkpoint, and the gang restarts from
    /// it (from the last checkpoint if that fails).
    #[serde(default, skip_serializing_if = "Recovery::is_in_place")]
    pub recovery: Recovery,
}

/// `job.recovery`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Recovery {
    /// Replace the lost rank; the others keep their state.
    #[default]
    #[serde(rename = "in-place")]
    InPlace,
    /// Restart the whole gang from the last checkpoint.
    #[serde(rename = "restart")]
    Restart,
}

impl Recovery {
    /// Whether this is `in-place`.
    pub fn is_in_place(&self) -> bool {
        *self == Recovery::InPlace
    }
}

/// `[model]`: the Llama architecture to train from scratch, or the base model to fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"init"` (random weights, architecture below) or a Hugging Face model directory/URL.
    #[serde(default = "defaults::base")]
    #[schemars(with = "String")]
    pub base: crate::BaseModel,
    /// Hidden size (for `init`).
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: u32,
    /// Decoder layers (for `init`).
    #[serde(default = "defaults::num_layers")]
    pub num_layers: u32,
    /// Attention heads (for `init`).
    #[serde(default = "defaults::num_heads")]
    pub num_heads: u32,
    /// Key/value heads (grouped-query attention; for `init`).
    #[serde(default = "defaults::num_kv_heads")]
    pub num_kv_heads: u32,
    /// MLP inner size (for `init`).
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: u32,
    /// Vocabulary size (for `init`; 256 is the byte-level tokenizer).
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: u32,
    /// RoPE base frequency (for `init`).
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon (for `init`).
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Share the input embedding with the output projection (for `init`).
    #[serde(default)]
    pub tie_embeddings: bool,
}

/// `[data]`: the training (and held-out) JSONL files and the sequence length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL files (plain, or compressed: `.gz`, `.zst`) or Parquet files (`.parquet`):
    /// object_store URLs or globs.
    pub train: Vec<String>,
    /// Tokens per packed sequence.
    #[serde(default = "defaults::seq_len")]
    pub seq_len: u32,
    /// Skip (and count) records that are not valid JSON or lack `text` / `prompt`+`completion`,
    /// instead of failing with the file and line.
    #[serde(default)]
    pub skip_bad_records: bool,
    /// Held-out JSONL (URLs or globs, the same record formats): its loss is measured every
    /// `train.eval_every` steps and at the end, never trained on. Empty: no evaluation.
    #[serde(default)]
    pub eval: Vec<String>,
    /// Parquet files: which column holds each record field, e.g. `{ text = "body" }` or
    /// `{ prompt = "question", completion = "answer" }`, `messages` for chats (a list of
    /// `{role, content}` structs). Unnamed fields are read from columns of their own name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub columns: std::collections::BTreeMap<String, String>,
}

/// The record fields `[data.columns]` may map.
pub const RECORD_FIELDS: [&str; 4] = ["text", "prompt", "completion", "messages"];

/// `[train]`: the optimizer (AdamW), its learning-rate schedule and the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps to train for (each `batch_size × grad_accum` sequences per rank); the
    /// job ends, and exports, after the last.
    pub steps: u64,
    /// Sequences per rank per step.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// Peak learning rate.
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    /// Linear warmup steps.
    #[serde(default = "defaults::warmup_steps")]
    pub warmup_steps: u64,
    /// Seed of every RNG (init, shuffling, dropout).
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Learning-rate decay after warmup.
    #[serde(default)]
    pub schedule: Schedule,
    /// The decayed learning rate at the last step, as a fraction of `lr`.
    #[serde(default = "defaults::min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    /// AdamW second-moment decay.
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    /// AdamW epsilon: added to the second moment's square root in the update's denominator.
    #[serde(default = "defaults::adam_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[serde(default = "defaults::grad_clip")]
    pub grad_clip: f64,
    /// Micro-batches accumulated per optimizer step (each of `batch_size` sequences).
    #[serde(default = "defaults::grad_accum")]
    pub grad_accum: u32,
    /// Measure the loss on `data.eval` every this many steps (and always after the last);
    /// 0: only after the last.
    #[serde(default)]
    pub eval_every: u64,
    /// Numeric precision: `f32`, or `bf16-mixed` (matrix products in bf16, master weights,
    /// gradients and optimizer state in f32, a `[lora]` job's frozen base held in bf16).
    // Left out when f32, so an f32 job's results hash is what it was before this field.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// `train.precision`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// The projections' and the output head's matrix products in bf16 (inputs and weights
    /// rounded to bf16, products accumulated in f32 and rounded to bf16), everything else —
    /// norms, RoPE, attention, the residual stream, the loss — in f32; what is trained keeps
    /// f32 master weights, gradients and AdamW moments; a `[lora]` job's frozen base is held in
    /// bf16, halving its memory.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
}

impl Precision {
    /// Whether this is `f32`.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16Mixed => "bf16-mixed",
        }
    }
}

/// How the learning rate decays after warmup.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine from `lr` to `lr * min_lr_ratio`.
    #[default]
    Cosine,
    /// Linear from `lr` to `lr * min_lr_ratio`.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// `[checkpoint]`: where checkpoints are committed, how often, how many are kept, and which
/// one a run resumes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Checkpoint root: `file://PATH`, `s3://BUCKET/PREFIX`.
    pub url: String,
    /// Steps between checkpoints.
    #[serde(default = "defaults::every_steps")]
    pub every_steps: u64,
    /// Also checkpoint when this much time has passed since the last one (`"10m"`; 1 s to a
    /// week), whichever of the two comes first. Rank 0's clock decides and the gang agrees, so
    /// every rank checkpoints the same step.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub every: Option<Duration>,
    /// Committed checkpoints to keep (the newest is always kept).
    #[serde(default = "defaults::keep_last")]
    pub keep_last: usize,
    /// Also keep every step divisible by this.
    #[serde(default)]
    pub keep_every: Option<u64>,
    /// Where a started job begins: `"latest"` (the newest committed checkpoint that verifies,
    /// or from scratch when there is none), `"none"` (from scratch; refuses to run over
    /// existing checkpoints) or a step number.
    #[serde(default = "defaults::resume")]
    pub resume: String,
    /// Also resume checkpoints written by the job of this name (to continue a renamed job).
    /// By default a run resumes only checkpoints its own `job.name` wrote, so two jobs never
    /// share a checkpoint directory (and train on, or export, each other's weights) unnoticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_job: Option<String>,
}

/// Where a started job begins (see [`CheckpointSection::resume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The newest committed checkpoint that verifies; from scratch when there is none.
    Latest,
    /// From scratch.
    Fresh,
    /// This step.
    Step(u64),
}

impl Resume {
    /// Parses `"latest"`, `"none"` or a step number.
    pub fn parse(text: &str) -> Option<Resume> {
        match text {
            "latest" => Some(Resume::Latest),
            "none" => Some(Resume::Fresh),
            n => n.parse().ok().map(Resume::Step),
        }
    }
}

impl CheckpointSection {
    /// [`CheckpointSection::resume`], parsed (validation guarantees it parses).
    pub fn resume_from(&self) -> Resume {
        Resume::parse(&self.resume).unwrap_or(Resume::Latest)
    }
}

/// `[export]`: where the finished model goes as a Hugging Face directory, in which dtype, and
/// the gate and notices of its promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// Where exported models go: a version lands in `<url>/<name>/<version>/`.
    pub url: String,
    /// The lineage (default: `job.name`); `<url>/<name>/latest.json` names its promoted
    /// version.
    #[serde(default)]
    pub name: Option<String>,
    /// Weight dtype of `model.safetensors`: `f32` or `bf16`.
    #[serde(default = "defaults::export_dtype")]
    pub dtype: String,
    /// With `[lora]`: `merge` writes the base with the adapters merged in (a plain Hugging
    /// Face model), `adapter` a PEFT adapter directory (`adapter_config.json` +
    /// `adapter_model.safetensors`) for the base the job trained on.
    #[serde(default = "defaults::export_lora")]
    pub lora: String,
    /// How much worse than the promoted version's eval loss a new version may be and still
    /// be promoted (0: never promote a regression).
    #[serde(default)]
    pub max_eval_regression: f64,
    /// POST a JSON notice (model, version, URL, step, losses) here when a version is promoted.
    #[serde(default)]
    pub webhook: Option<String>,
    /// On Kubernetes: the serving Deployment (same namespace) whose pod template is annotated
    /// with each promoted version (`lockstep.dev/model-version`), so it rolls to it.
    #[serde(default)]
    pub rollout: Option<String>,
}

impl ExportSection {
    /// The lineage name: `name`, else the job's.
    pub fn lineage<'a>(&'a self, job: &'a str) -> &'a str {
        self.name.as_deref().unwrap_or(job)
    }
}

/// Whether `s` can name one directory in a URL: 1–128 letters, digits, `-`, `_` or `.`, and
/// not `.` or `..` (export lineage names and versions).
pub fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `url` can be a webhook: an http:// or https:// URL with a host, at most 2,048
/// characters. The error says what it must be.
pub fn check_webhook(url: &str) -> Result<(), &'static str> {
    let l = url.to_ascii_lowercase();
    let host = l
        .strip_prefix("http://")
        .or_else(|| l.strip_prefix("https://"))
        .unwrap_or("");
    if host.is_empty() || host.starts_with('/') || url.len() > 2048 {
        return Err("must be an http:// or https:// URL with a host");
    }
    Ok(())
}

/// Whether `s` is a Kubernetes DNS label (RFC 1123): 1–63 lower-case letters, digits and
/// `-`, starting and ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Named defaults of every optional field.
pub mod defaults {
    use std::time::Duration;

    /// `export.dtype`.
    pub fn export_dtype() -> String {
        "f32".into()
    }

    /// `export.lora`.
    pub fn export_lora() -> String {
        "merge".into()
    }
    /// `lora.r`.
    pub fn lora_r() -> u32 {
        8
    }
    /// `lora.alpha`.
    pub fn lora_alpha() -> f64 {
        16.0
    }
    /// `lora.target_modules` (PEFT's default for Llama).
    pub fn lora_targets() -> Vec<String> {
        vec!["q_proj".into(), "v_proj".into()]
    }

    /// `job.world_size`.
    pub fn world_size() -> u32 {
        1
    }
    /// `job.max_restarts`.
    pub fn max_restarts() -> u32 {
        3
    }
    /// `job.gang_timeout`.
    pub fn gang_timeout() -> Duration {
        Duration::from_secs(60)
    }
    /// `job.heartbeat_timeout`.
    pub fn heartbeat_timeout() -> Duration {
        Duration::from_secs(30)
    }
    /// `job.collective_timeout`.
    pub fn collective_timeout() -> Duration {
        Duration::from_secs(60)
    }
    /// `model.base`.
    pub fn base() -> crate::BaseModel {
        crate::BaseModel::Init
    }
    /// `model.hidden_size`.
    pub fn hidden_size() -> u32 {
        256
    }
    /// `model.num_layers`.
    pub fn num_layers() -> u32 {
        4
    }
    /// `model.num_heads`.
    pub fn num_heads() -> u32 {
        8
    }
    /// `model.num_kv_heads`.
    pub fn num_kv_heads() -> u32 {
        4
    }
    /// `model.intermediate_size`.
    pub fn intermediate_size() -> u32 {
        768
    }
    /// `model.vocab_size`.
    pub fn vocab_size() -> u32 {
        256
    }
    /// `model.rope_theta`.
    pub fn rope_theta() -> f64 {
        10000.0
    }
    /// `model.rms_norm_eps`.
    pub fn rms_norm_eps() -> f64 {
        1e-5
    }
    /// `data.seq_len`.
    pub fn seq_len() -> u32 {
        128
    }
    /// `train.batch_size`.
    pub fn batch_size() -> u32 {
        8
    }
    /// `train.lr`.
    pub fn lr() -> f64 {
        3e-4
    }
    /// `train.warmup_steps`.
    pub fn warmup_steps() -> u64 {
        20
    }
    /// `train.seed`.
    pub fn seed() -> u64 {
        42
    }
    /// `train.min_lr_ratio`.
    pub fn min_lr_ratio() -> f64 {
        0.1
    }
    /// `train.beta1`.
    pub fn beta1() -> f64 {
        0.9
    }
    /// `train.beta2`.
    pub fn beta2() -> f64 {
        0.999
    }
    /// `train.eps`.
    pub fn adam_eps() -> f64 {
        1e-8
    }
    /// `train.grad_clip`.
    pub fn grad_clip() -> f64 {
        1.0
    }
    /// `train.grad_accum`.
    pub fn grad_accum() -> u32 {
        1
    }
    /// `checkpoint.resume`.
    pub fn resume() -> String {
        "latest".into()
    }
    /// `checkpoint.every_steps`.
    pub fn every_steps() -> u64 {
        50
    }
    /// `checkpoint.keep_last`.
    pub fn keep_last() -> usize {
        3
    }
}

/// A config that cannot be used, with the field (or override) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid TOML, or a field of the wrong type, or an unknown field.
    #[error(transparent)]
    Parse {
        /// The TOML error (it names the line and the key).
        #[from]
        source: toml::de::Error,
    },
    /// A `--set key=value` that cannot be applied.
    #[error("override `{spec}`: {reason}")]
    Override {
        /// The override as given.
        spec: String,
        /// Why it cannot be applied.
        reason: String,
    },
    /// A value out of range.
    #[error("`{field}` {reason}")]
    Invalid {
        /// Dotted field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl JobConfig {
    /// A hash of what decides a run's results (the model, data and train sections): stored in
    /// each checkpoint's manifest, and checked by each worker against the coordinator's when it
    /// joins. 16 hex digits of xxh3 over their JSON.
    pub fn results_hash(&self) -> String {
        let mut key = serde_json::json!({
            "model": self.model,
            "data": self.data,
            "train": self.train,
        });
        // Only when set: a full fine-tune's hash is what it was before `[lora]` existed.
        if let Some(l) = &self.lora {
            key["lora"] = serde_json::json!(l);
        }
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(key.to_string().as_bytes())
        )
    }

    /// Every location the job reads or writes, each with the field that names it, as written
    /// (URLs or paths): `checkpoint.url`, each `data.train` and `data.eval` entry, `export.url`,
    /// and `model.base`'s directory or lineage.
    pub fn urls(&self) -> Vec<(&'static str, &str)> {
        let mut urls = vec![("checkpoint.url", self.checkpoint.url.as_str())];
        urls.extend(self.data.train.iter().map(|u| ("data.train", u.as_str())));
        urls.extend(self.data.eval.iter().map(|u| ("data.eval", u.as_str())));
        urls.extend(self.export.iter().map(|e| ("export.url", e.url.as_str())));
        urls.extend(self.model.base.location().map(|b| ("model.base", b)));
        urls
    }

    /// Parses TOML, applies `overrides` (`section.key=value`, the value in TOML syntax or a bare
    /// string), then validates.
    pub fn parse(text: &str, overrides: &[String]) -> Result<JobConfig, ConfigError> {
        // A UTF-8 byte order mark (editors on Windows write one) is not part of the TOML.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut doc: toml::Table = toml::from_str(text)?;
        for spec in overrides {
            apply_override(&mut doc, spec)?;
        }
        let config: JobConfig = toml::Table::try_into(doc)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against [`limits`].
    fn check_limits(&self) -> Result<(), ConfigError> {
        use limits::*;
        fn most<T: PartialOrd + std::fmt::Display>(
            field: &'static str,
            value: T,
            max: T,
        ) -> Result<(), ConfigError> {
            if value > max {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("must be at most {max} (it is {value})"),
                });
            }
            Ok(())
        }
        fn timeout(field: &'static str, d: Duration) -> Result<(), ConfigError> {
            if d < MIN_TIMEOUT || d > MAX_TIMEOUT {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!(
                        "must be between {} and {} (it is {})",
                        humantime::format_duration(MIN_TIMEOUT),
                        humantime::format_duration(MAX_TIMEOUT),
                        humantime::format_duration(d)
                    ),
                });
            }
            Ok(())
        }
        let (j, m, t, c) = (&self.job, &self.model, &self.train, &self.checkpoint);
        most("job.world_size", j.world_size, MAX_WORLD_SIZE)?;
        most("job.max_restarts", j.max_restarts, MAX_RESTARTS)?;
        timeout("job.gang_timeout", j.gang_timeout)?;
        timeout("job.heartbeat_timeout", j.heartbeat_timeout)?;
        timeout("job.collective_timeout", j.collective_timeout)?;
        if let Some(every) = c.every {
            timeout("checkpoint.every", every)?;
        }
        most("model.hidden_size", m.hidden_size, MAX_HIDDEN)?;
        most(
            "model.intermediate_size",
            m.intermediate_size,
            MAX_INTERMEDIATE,
        )?;
        most("model.num_layers", m.num_layers, MAX_LAYERS)?;
        most("model.num_heads", m.num_heads, MAX_HEADS)?;
        most("model.vocab_size", m.vocab_size, MAX_VOCAB)?;
        most("data.seq_len", self.data.seq_len, MAX_SEQ_LEN)?;
        most("data.train", self.data.train.len(), MAX_TRAIN_FILES)?;
        most("data.eval", self.data.eval.len(), MAX_TRAIN_FILES)?;
        most("train.eval_every", t.eval_every, MAX_STEPS)?;
        most("train.steps", t.steps, MAX_STEPS)?;
        most("train.warmup_steps", t.warmup_steps, MAX_STEPS)?;
        most("train.batch_size", t.batch_size, MAX_BATCH)?;
        most("train.grad_accum", t.grad_accum, MAX_BATCH)?;
        most("checkpoint.every_steps", c.every_steps, MAX_STEPS)?;
        most("checkpoint.keep_last", c.keep_last, MAX_KEEP_LAST)?;
        if let Some(k) = c.keep_every {
            if k == 0 {
                return Err(ConfigError::Invalid {
                    field: "checkpoint.keep_every",
                    reason: "must be at least 1 (or left out)".into(),
                });
            }
            most("checkpoint.keep_every", k, MAX_STEPS)?;
        }
        if let Some(Resume::Step(s)) = Resume::parse(&c.resume) {
            most("checkpoint.resume", s, MAX_STEPS)?;
        }
        Ok(())
    }

    /// Checks ranges and relations the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        let job_name = |name: &str| {
            !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-')
        };
        const NAME_RULE: &str =
            "must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'";
        if !job_name(&self.job.name) {
            return bad("job.name", NAME_RULE);
        }
        if let Some(other) = &self.checkpoint.resume_job
            && !job_name(other)
        {
            return bad("checkpoint.resume_job", NAME_RULE);
        }
        if self.job.world_size == 0 {
            return bad("job.world_size", "must be at least 1");
        }
        self.check_limits()?;
        let m = &self.model;
        if m.num_heads == 0 || !m.hidden_size.is_multiple_of(m.num_heads) {
            return bad("model.num_heads", "must divide model.hidden_size");
        }
        if m.num_kv_heads == 0 || !m.num_heads.is_multiple_of(m.num_kv_heads) {
            return bad("model.num_kv_heads", "must divide model.num_heads");
        }
        if let Some(e) = &self.export {
            let url = e.url.to_ascii_lowercase();
            if !(url.starts_with("file://") || url.starts_with("s3://")) || url.len() < 8 {
                return bad(
                    "export.url",
                    "must be a file:// or s3:// URL naming where exports go",
                );
            }
            if !matches!(e.dtype.as_str(), "f32" | "bf16") {
                return bad("export.dtype", "must be `f32` or `bf16`");
            }
            match (e.lora.as_str(), &self.lora) {
                ("merge", _) | ("adapter", Some(_)) => {}
                ("adapter", None) => {
                    return bad(
                        "export.lora",
                        "`adapter` exports LoRA adapters: the job needs a [lora] section",
                    );
                }
                _ => return bad("export.lora", "must be `merge` or `adapter`"),
            }
            if !e.max_eval_regression.is_finite() || e.max_eval_regression < 0.0 {
                return bad("export.max_eval_regression", "must be a finite number ≥ 0");
            }
            if let Some(w) = &e.webhook
                && let Err(why) = check_webhook(w)
            {
                return bad("export.webhook", why);
            }
            if let Some(d) = &e.rollout
                && !is_dns_label(d)
            {
                return bad(
                    "export.rollout",
                    "must name a Deployment: 1–63 lower-case letters, digits and `-`, starting and ending with a letter or digit",
                );
            }
            if let Some(n) = &e.name
                && !is_path_segment(n)
            {
                return bad(
                    "export.name",
                    "use 1–128 letters, digits, `-`, `_` or `.` (it names a directory)",
                );
            }
        }
        if let Some(l) = &self.lora {
            if l.r == 0 || l.r > limits::MAX_LORA_R {
                return bad(
                    "lora.r",
                    &format!("must be 1 to {} (it is {})", limits::MAX_LORA_R, l.r),
                );
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0 && l.alpha <= limits::MAX_LORA_ALPHA) {
                return bad(
                    "lora.alpha",
                    &format!(
                        "must be a positive number of at most {} (it is {})",
                        limits::MAX_LORA_ALPHA,
                        l.alpha
                    ),
                );
            }
            if !(l.dropout.is_finite() && (0.0..1.0).contains(&l.dropout)) {
                return bad("lora.dropout", "must be at least 0 and less than 1");
            }
            if l.target_modules.is_empty() {
                return bad("lora.target_modules", "must name at least one projection");
            }
            for (i, t) in l.target_modules.iter().enumerate() {
                if !LORA_TARGETS.contains(&t.as_str()) {
                    return bad(
                        "lora.target_modules",
                        &format!("`{t}` is not one of {}", LORA_TARGETS.join(", ")),
                    );
                }
                if l.target_modules[..i].contains(t) {
                    return bad("lora.target_modules", &format!("`{t}` is named twice"));
                }
            }
        }
        if self.data.train.is_empty() {
            return bad("data.train", "must list at least one file");
        }
        for (field, column) in &self.data.columns {
            if !RECORD_FIELDS.contains(&field.as_str()) {
                return bad(
                    "data.columns",
                    &format!("`{field}` is not one of {}", RECORD_FIELDS.join(", ")),
                );
            }
            if column.is_empty() || column.len() > 256 {
                return bad("data.columns", &format!("`{field}` names no column"));
            }
        }
        if self.data.seq_len < 2 {
            return bad("data.seq_len", "must be at least 2");
        }
        if self.train.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if !(self.train.lr.is_finite() && self.train.lr > 0.0) {
            return bad("train.lr", "must be a positive number");
        }
        if m.hidden_size == 0 || m.num_layers == 0 || m.intermediate_size == 0 {
            return bad(
                "model.hidden_size",
                "hidden_size, num_layers and intermediate_size must be at least 1",
            );
        }
        if !(m.hidden_size / m.num_heads).is_multiple_of(2) {
            return bad("model.num_heads", "must leave an even head size (RoPE)");
        }
        if m.vocab_size < 2 {
            return bad("model.vocab_size", "must be at least 2");
        }
        if !(m.rope_theta.is_finite() && m.rope_theta > 0.0) {
            return bad("model.rope_theta", "must be a positive number");
        }
        if !(m.rms_norm_eps.is_finite() && m.rms_norm_eps > 0.0) {
            return bad("model.rms_norm_eps", "must be a positive number");
        }
        let t = &self.train;
        if !(t.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&t.min_lr_ratio)) {
            return bad("train.min_lr_ratio", "must be between 0 and 1");
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad("train.weight_decay", "must be zero or positive");
        }
        if !(t.beta1.is_finite() && (0.0..1.0).contains(&t.beta1)) {
            return bad("train.beta1", "must be in [0, 1)");
        }
        if !(t.beta2.is_finite() && (0.0..1.0).contains(&t.beta2)) {
            return bad("train.beta2", "must be in [0, 1)");
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return bad("train.eps", "must be a positive number");
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return bad("train.grad_clip", "must be zero (off) or positive");
        }
        if t.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1");
        }
        if Resume::parse(&self.checkpoint.resume).is_none() {
            return bad(
                "checkpoint.resume",
                "must be \"latest\", \"none\" or a step number",
            );
        }
        if self.checkpoint.every_steps == 0 {
            return bad("checkpoint.every_steps", "must be at least 1");
        }
        Ok(())
    }
}

pub(crate) fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let err = |reason: &str| ConfigError::Override {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| err("expected section.key=value"))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(err("the key has an empty part"));
    }
    // The value as TOML (numbers, booleans, arrays, quoted strings), else a bare string.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = path.split_last().ok_or_else(|| err("empty key"))?;
    let mut table = doc;
    for p in parents {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| err(&format!("`{p}` is not a section")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [job]
        name = "quickstart"
        [model]
        [data]
        train = ["file://configs/data/quickstart.jsonl"]
        [train]
        steps = 300
        [checkpoint]
        url = "file://runs/quickstart/checkpoints"
    "#;

    #[test]
    fn lora_settings_are_checked_by_name() {
        let with = |set: &[&str]| {
            let mut o: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            o.push("export.url=\"file:///x\"".into());
            JobConfig::parse(MINIMAL, &o)
        };
        assert!(with(&["lora.r=8"]).is_ok());
        for (set, field) in [
            ("lora.r=0", "lora.r"),
            ("lora.alpha=-1", "lora.alpha"),
            ("lora.alpha=1e308", "lora.alpha"),
            ("lora.dropout=1.0", "lora.dropout"),
            ("lora.target_modules=[\"qproj\"]", "lora.target_modules"),
            ("lora.target_modules=[]", "lora.target_modules"),
            (
                "lora.target_modules=[\"q_proj\",\"q_proj\"]",
                "lora.target_modules",
            ),
        ] {
            let e = with(&[set]).unwrap_err().to_string();
            assert!(e.contains(field), "{set}: {e}");
        }
        let e = with(&["export.lora=\"adapter\""]).unwrap_err().to_string();
        assert!(e.contains("export.lora") && e.contains("[lora]"), "{e}");
        assert!(with(&["export.lora=\"adapter\"", "lora.r=4"]).is_ok());
        // A full fine-tune's results hash is what it was before [lora] existed.
        let plain = JobConfig::parse(MINIMAL, &[]).unwrap();
        let lora = JobConfig::parse(MINIMAL, &["lora.r=4".into()]).unwrap();
        assert_ne!(plain.results_hash(), lora.results_hash());
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = JobConfig::parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.job.world_size, 1);
        assert_eq!(c.job.gang_timeout, Duration::from_secs(60));
        assert_eq!(c.model.hidden_size, 256);
        assert_eq!(c.checkpoint.keep_last, 3);
        assert!(c.export.is_none());
    }

    #[test]
    fn overrides_apply_with_types() {
        let sets = [
            "train.steps=20".to_string(),
            "job.gang_timeout=\"5s\"".to_string(),
            "checkpoint.url=s3://b/p".to_string(),
        ];
        let c = JobConfig::parse(MINIMAL, &sets).unwrap();
        assert_eq!(c.train.steps, 20);
        assert_eq!(c.job.gang_timeout, Duration::from_secs(5));
        assert_eq!(c.checkpoint.url, "s3://b/p");
    }

    #[test]
    fn errors_name_the_field() {
        let e = JobConfig::parse(&format!("{MINIMAL}\n[export]\nurl = \"x\"\nbogus = 1"), &[])
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = JobConfig::parse(MINIMAL, &["model.num_kv_heads=3".into()]).unwrap_err();
        assert!(e.to_string().contains("model.num_kv_heads"), "{e}");
        let e = JobConfig::parse(MINIMAL, &["train.steps".into()]).unwrap_err();
        assert!(e.to_string().contains("train.steps"), "{e}");
        let e = JobConfig::parse(MINIMAL, &["job.name=Bad_Name".into()]).unwrap_err();
        assert!(e.to_string().contains("job.name"), "{e}");
    }

    #[test]
    fn export_sections_are_checked_before_training() {
        let base = "[job]\nname = \"x\"\n[model]\n[data]\ntrain = [\"file:///d.jsonl\"]\n[train]\nsteps = 1\n[checkpoint]\nurl = \"file:///c\"\n[export]\n";
        for (extra, field) in [
            ("url = \"memory://x\"", "export.url"),
            ("url = \"ftp://x/y\"", "export.url"),
            ("url = \"file:///e\"\ndtype = \"f16\"", "export.dtype"),
            (
                "url = \"file:///e\"\nwebhook = \"http://\"",
                "export.webhook",
            ),
            ("url = \"file:///e\"\nname = \"../x\"", "export.name"),
            (
                "url = \"file:///e\"\nmax_eval_regression = -1.0",
                "export.max_eval_regression",
            ),
        ] {
            let e = JobConfig::parse(&format!("{base}{extra}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        JobConfig::parse(
            &format!("{base}url = \"s3://b/e\"\nwebhook = \"https://h/x\"\n"),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_limit_and_the_value() {
        for (set, field, says) in [
            (
                "job.gang_timeout=\"9223372036854775807s\"",
                "job.gang_timeout",
                "between 1s and 7days",
            ),
            (
                "job.heartbeat_timeout=\"10ms\"",
                "job.heartbeat_timeout",
                "(it is 10ms)",
            ),
            (
                "job.world_size=200000",
                "job.world_size",
                "at most 4096 (it is 200000)",
            ),
            (
                "train.steps=2199023255552",
                "train.steps",
                "at most 1099511627776",
            ),
            ("data.seq_len=4294967295", "data.seq_len", "at most 1048576"),
            (
                "checkpoint.keep_every=0",
                "checkpoint.keep_every",
                "at least 1",
            ),
            (
                "checkpoint.resume=\"2199023255552\"",
                "checkpoint.resume",
                "at most",
            ),
        ] {
            let e = JobConfig::parse(MINIMAL, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains(says), "{set}: {e}");
        }
        // The limits themselves are accepted.
        let ok = [
            format!("job.world_size={}", limits::MAX_WORLD_SIZE),
            "job.gang_timeout=\"7days\"".to_string(),
            "job.heartbeat_timeout=\"1s\"".to_string(),
        ];
        JobConfig::parse(MINIMAL, &ok).unwrap();
    }
}
