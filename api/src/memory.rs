//! How much memory one rank of a job needs: what `lockstep plan` prints and what the
//! coordinator checks before it launches anything.
//!
//! The figures are what lockstep's trainer holds, not a textbook formula: Burn's autodiff keeps
//! every tensor a backward pass needs (no activation recomputation), a step runs two lanes of
//! rows with a gradient each, and a checkpoint copies the weights and moments while it is
//! written. The per-token activation coefficients were fitted to the peak RSS of 20 CPU runs
//! (hidden 128–1024, 1–16 layers, sequences 32–512, batches 1–32, vocabularies 256–32k; all
//! within 12 %, see benchmarks/README.md "Memory plan").

use crate::config::{JobConfig, LoraSection, Precision};

/// What a rank runs on: its memory holds different things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The host's memory: the process, the model, its activations and checkpoint copies.
    Cpu,
    /// A GPU's memory: the model, its activations and the CUDA context (checkpoint copies are
    /// made in host memory).
    Gpu,
}

/// The process itself on a CPU (binary, runtime, threads, tokenizer, data windows): the
/// fitted intercept of the measured runs.
const CPU_RUNTIME: u64 = 150 << 20;
/// A CUDA context and the backend's memory pools (not measured here: no GPU).
const GPU_RUNTIME: u64 = 1 << 30;
/// Activation floats kept per token and layer, per unit of the hidden size, the MLP's inner
/// size, and attention width (heads × sequence length); per token, per vocabulary entry
/// (the logits, their log-softmax and gradient). Fitted (see the module docs).
const ACT_HIDDEN: f64 = 3.6;
const ACT_INNER: f64 = 5.0;
const ACT_ATTENTION: f64 = 4.1;
const ACT_VOCAB: f64 = 3.0;
/// Under bf16-mixed the four matrix-product inputs of a layer (three of the hidden size, one of
/// the inner size) are kept in bf16: 2 bytes less each.
const BF16_SAVED_HIDDEN: f64 = 1.5;
const BF16_SAVED_INNER: f64 = 0.5;
/// Bytes per trained parameter while a checkpoint is written: its weights and two moments, a
/// copy of all three for the writer, and the serialised pieces (fitted: 28).
const CHECKPOINT_BYTES: u64 = 28;

/// The architecture the estimate is for: `[model]` (for a Hugging Face base, the caller puts
/// its `config.json` values there first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Hidden size.
    pub hidden: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Attention heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// MLP inner size.
    pub inner: u64,
    /// Vocabulary size.
    pub vocab: u64,
    /// Whether the output head shares the embedding.
    pub tied: bool,
}

impl Shape {
    /// The shape `[model]` describes.
    pub fn of(config: &JobConfig) -> Shape {
        let m = &config.model;
        Shape {
            hidden: m.hidden_size.into(),
            layers: m.num_layers.into(),
            heads: u64::from(m.num_heads).max(1),
            kv_heads: m.num_kv_heads.into(),
            inner: m.intermediate_size.into(),
            vocab: m.vocab_size.into(),
            tied: m.tie_embeddings,
        }
    }

    fn kv_width(&self) -> u128 {
        u128::from(self.hidden) / u128::from(self.heads) * u128::from(self.kv_heads)
    }

    /// Every parameter.
    pub fn params(&self) -> u128 {
        let (h, l, i, v) = self.wide();
        let kv = self.kv_width();
        let per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h;
        per_layer * l + v * h * if self.tied { 1 } else { 2 } + h
    }

    /// The parameters of `lora`'s adapters.
    pub fn adapter_params(&self, lora: &LoraSection) -> u128 {
        let (h, l, i, _) = self.wide();
        let kv = self.kv_width();
        let r = u128::from(lora.r);
        let per_layer: u128 = lora
            .target_modules
            .iter()
            .map(|t| match t.as_str() {
                "q_proj" | "o_proj" => r * (h + h),
                "k_proj" | "v_proj" => r * (h + kv),
                "gate_proj" | "up_proj" | "down_proj" => r * (h + i),
                _ => 0,
            })
            .sum();
        per_layer * l
    }

    /// Refuses a `lora.r` above the smaller side of a targeted projection, as training does
    /// (such an adapter is not low-rank).
    pub fn check_lora(&self, lora: &LoraSection) -> Result<(), String> {
        let (h, kv, i) = (self.hidden, self.kv_width() as u64, self.inner);
        for t in &lora.target_modules {
            let (rows, cols) = match t.as_str() {
                "q_proj" | "o_proj" => (h, h),
                "k_proj" | "v_proj" => (kv, h),
                "gate_proj" | "up_proj" => (i, h),
                "down_proj" => (h, i),
                _ => continue,
            };
            let most = rows.min(cols);
            if u64::from(lora.r) > most {
                return Err(format!(
                    "lora.r = {} is more than {t}'s smaller side ({rows}x{cols}): an adapter of \
                     that rank is not low-rank; use lora.r ≤ {most}",
                    lora.r
                ));
            }
        }
        Ok(())
    }

    /// The largest weight matrix (bf16 products on a CPU widen it to f32 while they run).
    fn largest_matrix(&self) -> u128 {
        let (h, _, i, v) = self.wide();
        (v * h).max(h * i)
    }

    fn wide(&self) -> (u128, u128, u128, u128) {
        (
            self.hidden.into(),
            self.layers.into(),
            self.inner.into(),
            self.vocab.into(),
        )
    }
}

/// One rank's memory, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// What it runs on.
    pub target: Target,
    /// All of the model's parameters.
    pub params: u64,
    /// The trained ones (the adapters with `[lora]`).
    pub trained: u64,
    /// Tokens of one micro-batch (`train.batch_size × data.seq_len`).
    pub tokens: u64,
    /// Trained weights in f32 (and their bf16 copies under bf16-mixed), the frozen base in its
    /// dtype.
    pub weights: u64,
    /// The step's gradients: one per lane of rows, plus the accumulated sum or the all-reduce
    /// buffer.
    pub gradients: u64,
    /// AdamW's two moments, f32.
    pub optimizer: u64,
    /// What the backward pass keeps of one micro-batch.
    pub activations: u64,
    /// While a checkpoint is written (CPU: host memory; after the step, not during it): the
    /// trained weights and moments and their copies.
    pub checkpoint: u64,
    /// While the model is loaded (CPU): every parameter's f32 values beside the tensors made
    /// from them (before training starts, not added to the above).
    pub loading: u64,
    /// The process (CPU) or the CUDA context (GPU).
    pub runtime: u64,
    /// Under bf16-mixed.
    pub bf16: bool,
    /// The peak: runtime + the largest of training (weights, gradients, optimizer,
    /// activations), checkpointing (frozen weights + checkpoint) and loading.
    pub total: u64,
}

fn sat(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

impl MemoryPlan {
    /// The plan of one rank of `config` (with `[model]` holding the real architecture) on
    /// `target`.
    pub fn of(config: &JobConfig, target: Target) -> MemoryPlan {
        let shape = Shape::of(config);
        let t = &config.train;
        let params = shape.params();
        let bf16 = t.precision == Precision::Bf16Mixed;
        let (trained, frozen) = match &config.lora {
            Some(l) => (shape.adapter_params(l), params),
            None => (params, 0),
        };
        let frozen_bytes = frozen * if bf16 { 2 } else { 4 };
        // Full fine-tune under bf16-mixed: the products keep bf16 copies of the weights.
        let copies = if bf16 && config.lora.is_none() {
            trained * 2
        } else {
            0
        };
        // On a CPU a bf16 product widens its operands to f32 while it runs (bf16 + f32 copy).
        let widening = if bf16 && target == Target::Cpu {
            shape.largest_matrix() * 6
        } else {
            0
        };
        let weights = trained * 4 + frozen_bytes + copies + widening;
        // A gradient per lane (a micro-batch of two or more rows runs as two lanes), the sum
        // of the micro-batches when accumulating; across ranks, the all-reduce's flat buffer
        // and the tensors rebuilt from it, beside the sum.
        let lanes: u128 = if t.batch_size > 1 { 2 } else { 1 };
        let mut per_param = lanes * 4 + if t.grad_accum > 1 { 4 } else { 0 };
        if config.job.world_size > 1 {
            per_param = per_param.max(12);
        }
        let gradients = trained * per_param;
        let optimizer = trained * 8;
        let tokens = u128::from(t.batch_size) * u128::from(config.data.seq_len);
        let (h, l, i, v) = shape.wide();
        let attention = u128::from(shape.heads) * u128::from(config.data.seq_len);
        let (ah, ai) = if bf16 {
            (ACT_HIDDEN - BF16_SAVED_HIDDEN, ACT_INNER - BF16_SAVED_INNER)
        } else {
            (ACT_HIDDEN, ACT_INNER)
        };
        // Floats per token, in tenths (integer arithmetic: the values can be huge).
        let tenths = |c: f64| (c * 10.0).round() as u128;
        let per_token = l * (tenths(ah) * h + tenths(ai) * i + tenths(ACT_ATTENTION) * attention)
            + tenths(ACT_VOCAB) * v;
        let activations = tokens.saturating_mul(per_token).saturating_mul(4) / 10;
        let checkpoint = match target {
            Target::Cpu => trained * u128::from(CHECKPOINT_BYTES),
            Target::Gpu => 0,
        };
        let runtime = match target {
            Target::Cpu => CPU_RUNTIME,
            Target::Gpu => GPU_RUNTIME,
        };
        let loading = match target {
            // f32 values for every parameter, and the tensors made from them.
            Target::Cpu => trained * 8 + frozen * 4 + frozen_bytes,
            Target::Gpu => 0,
        };
        let training = weights + gradients + optimizer + activations;
        let checkpointing = frozen_bytes + checkpoint;
        MemoryPlan {
            target,
            params: sat(params),
            trained: sat(trained),
            tokens: sat(tokens),
            weights: sat(weights),
            gradients: sat(gradients),
            optimizer: sat(optimizer),
            activations: sat(activations),
            checkpoint: sat(checkpoint),
            loading: sat(loading),
            runtime,
            total: sat(u128::from(runtime) + training.max(checkpointing).max(loading)),
            bf16,
        }
    }

    /// The breakdown, a line each, ending with `total`.
    pub fn lines(&self) -> Vec<(&'static str, u64, String)> {
        let trained = match (self.trained == self.params, self.bf16) {
            (true, false) => format!("{} parameters, f32", count(self.params)),
            (true, true) => format!(
                "{} parameters, f32 masters + bf16 copies for the products",
                count(self.params)
            ),
            (false, bf16) => format!(
                "{} frozen ({}) + {} trained parameters (f32)",
                count(self.params),
                if bf16 { "bf16" } else { "f32" },
                count(self.trained)
            ),
        };
        let mut lines = vec![
            ("weights", self.weights, trained),
            (
                "gradients",
                self.gradients,
                "f32, one per lane of rows (+ the sum or all-reduce buffer)".into(),
            ),
            ("optimizer", self.optimizer, "AdamW moments, f32".into()),
            (
                "activations",
                self.activations,
                format!("{} tokens per micro-batch", self.tokens),
            ),
        ];
        if self.target == Target::Cpu {
            lines.push((
                "checkpoint",
                self.checkpoint,
                "while one is written (after the step: not added to the above)".into(),
            ));
            lines.push((
                "loading",
                self.loading,
                "f32 values beside the tensors while the model loads (before training)".into(),
            ));
        }
        lines.push((
            "runtime",
            self.runtime,
            match self.target {
                Target::Cpu => "the process".into(),
                Target::Gpu => "CUDA context and memory pools".into(),
            },
        ));
        lines.push(("total", self.total, "per rank".into()));
        lines
    }

    /// Why `config` (whose plan this is) cannot run in `available` bytes per rank of `place`
    /// ("this GPU", "this machine (2 ranks)"), with what would make it fit; `None` if it fits.
    pub fn refusal(&self, config: &JobConfig, available: u64, place: &str) -> Option<String> {
        if self.total <= available {
            return None;
        }
        let what = match &config.lora {
            None => format!("full fine-tuning of {} parameters", count(self.params)),
            Some(_) => format!(
                "LoRA fine-tuning of {} parameters ({} trained)",
                count(self.params),
                count(self.trained)
            ),
        };
        // Each knob with what the rank would then need; offered only when that fits (else the
        // smallest is named as not enough).
        let mut tried: Vec<(String, u64)> = Vec::new();
        let mut try_knob = |knob: String, changed: JobConfig| {
            let p = MemoryPlan::of(&changed, self.target);
            if p.total < self.total {
                tried.push((knob, p.total));
            }
        };
        if config.lora.is_none() {
            let mut c = config.clone();
            let lora = LoraSection {
                r: crate::config::defaults::lora_r(),
                alpha: crate::config::defaults::lora_alpha(),
                dropout: 0.0,
                target_modules: crate::config::defaults::lora_targets(),
            };
            let knob = format!(
                "set [lora] (r = {} on {}) and train.precision = \"bf16-mixed\"",
                lora.r,
                lora.target_modules.join(", ")
            );
            c.lora = Some(lora);
            c.train.precision = Precision::Bf16Mixed;
            try_knob(knob, c);
        } else if config.train.precision == Precision::F32 {
            let mut c = config.clone();
            c.train.precision = Precision::Bf16Mixed;
            try_knob("set train.precision = \"bf16-mixed\"".into(), c);
        }
        let accum = u64::from(config.train.batch_size) * u64::from(config.train.grad_accum);
        if config.train.batch_size > 1 && accum <= u64::from(crate::config::limits::MAX_BATCH) {
            let mut c = config.clone();
            c.train.batch_size = 1;
            c.train.grad_accum = accum as u32;
            try_knob(
                format!("train.batch_size = 1 with train.grad_accum = {accum} (the same step)"),
                c,
            );
        }
        // The longest halved sequence that fits, down to 256 tokens.
        let mut seq = config.data.seq_len;
        while seq > 256 {
            seq /= 2;
            let mut c = config.clone();
            c.data.seq_len = seq;
            if MemoryPlan::of(&c, self.target).total <= available || seq <= 256 {
                try_knob(format!("data.seq_len = {seq}"), c);
                break;
            }
        }
        let fitting: Vec<String> = tried
            .iter()
            .filter(|(_, total)| *total <= available)
            .map(|(knob, total)| format!("{knob} ({} per rank)", bytes(*total)))
            .collect();
        let knobs = if !fitting.is_empty() {
            format!(
                "{}; or use a device with more memory",
                fitting.join("; or ")
            )
        } else if let Some((knob, total)) = tried.iter().min_by_key(|(_, t)| *t) {
            format!(
                "use a device with more memory (even {knob} needs {} per rank)",
                bytes(*total)
            )
        } else {
            "use a device with more memory".to_string()
        };
        Some(format!(
            "{what} needs {} per rank at its peak, {}; {place} has {}: {knobs}",
            bytes(self.total),
            self.peak(),
            bytes(available),
        ))
    }

    /// When the peak comes and what makes it up, in words.
    fn peak(&self) -> String {
        let runtime = match self.target {
            Target::Cpu => format!("the process {}", bytes(self.runtime)),
            Target::Gpu => format!("the CUDA context {}", bytes(self.runtime)),
        };
        let training = self.weights + self.gradients + self.optimizer + self.activations;
        let frozen = self.total - self.runtime;
        if self.runtime.saturating_add(training) >= self.total {
            format!(
                "while training (weights {}, gradients {}, optimizer {}, activations {} of \
                 train.batch_size × data.seq_len = {} tokens, {runtime})",
                bytes(self.weights),
                bytes(self.gradients),
                bytes(self.optimizer),
                bytes(self.activations),
                self.tokens,
            )
        } else if self.loading >= frozen {
            format!(
                "while the model loads (its f32 values beside the tensors made from them, {}; \
                 {runtime})",
                bytes(self.loading)
            )
        } else {
            format!(
                "while a checkpoint is written (the trained weights, moments and their copies, \
                 {}; {runtime})",
                bytes(self.checkpoint)
            )
        }
    }
}

/// `n` bytes for people: `128.5 GB`, `750 MB`, `12 kB` (powers of 1000, as device makers
/// count).
pub fn bytes(n: u64) -> String {
    let f = n as f64;
    if n == u64::MAX {
        "more than 18 EB".to_string()
    } else if f >= 1e15 {
        format!("{:.1} PB", f / 1e15)
    } else if f >= 1e12 {
        format!("{:.1} TB", f / 1e12)
    } else if f >= 1e9 {
        format!("{:.1} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.0} MB", f / 1e6)
    } else {
        format!("{:.0} kB", f / 1e3)
    }
}

/// `n` things for people: `8.0B`, `3.3M`, `12.5k`.
pub fn count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e12 {
        format!("{:.1}T", f / 1e12)
    } else if f >= 1e9 {
        format!("{:.1}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}k", f / 1e3)
    } else {
        n.to_string()
    }
}

/// A memory size: bytes, or a number with a unit — `80GB`, `80G`, `16Gi`, `16GiB`, `512MiB`,
/// `1.5T`, `1e9` (k/M/G/T/P/E powers of 1000, Ki/Mi/Gi/Ti/Pi/Ei of 1024, in either case for
/// M/G/T; what Kubernetes writes for memory reads the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a memory size (e.g. 80GB, 16Gi, 512MiB)");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    // A decimal number: digits, at most one point, with a digit after it.
    if num.is_empty() || num.ends_with('.') || num.starts_with('.') {
        return Err(bad());
    }
    let mut value: f64 = num.parse().map_err(|_| bad())?;
    let mut unit = unit.trim();
    // An exponent (`1e9`, Kubernetes' decimal exponent form).
    if let Some(exp) = unit.strip_prefix(['e', 'E'])
        && !exp.is_empty()
        && exp.bytes().all(|b| b.is_ascii_digit())
    {
        let e: i32 = exp.parse().map_err(|_| bad())?;
        value *= 10f64.powi(e.min(400));
        unit = "";
    }
    let stem = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    // A bare `m` is Kubernetes' milli, not mega: only `mb` reads as megabytes.
    let scale: f64 = match stem {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "m" if stem.len() < unit.len() => 1e6,
        "G" | "g" => 1e9,
        "T" | "t" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" | "ki" => 1024.0,
        "Mi" | "mi" => 1024.0 * 1024.0,
        "Gi" | "gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use k, M, G, T, P, E or Ki, Mi, Gi, Ti, Pi, Ei, \
                 optionally followed by B)"
            ));
        }
    };
    let b = value * scale;
    if !b.is_finite() || b < 1.0 || b >= u64::MAX as f64 {
        return Err(format!(
            "`{s}`: a memory size must be at least 1 byte and less than 16 EiB"
        ));
    }
    if b.fract() != 0.0 {
        return Err(format!("`{s}` is not a whole number of bytes"));
    }
    Ok(b as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_8b(with_lora: bool) -> JobConfig {
        let lora = if with_lora {
            "[lora]\nr = 16\ntarget_modules = [\"q_proj\", \"v_proj\"]\n"
        } else {
            ""
        };
        let precision = if with_lora { "bf16-mixed" } else { "f32" };
        let text = format!(
            "[job]\nname = \"big\"\n[model]\nhidden_size = 4096\nnum_layers = 32\n\
             num_heads = 32\nnum_kv_heads = 8\nintermediate_size = 14336\nvocab_size = 128256\n\
             [data]\ntrain = [\"file:///d.jsonl\"]\nseq_len = 1024\n[train]\nsteps = 10\n\
             batch_size = 1\nprecision = \"{precision}\"\n[checkpoint]\nurl = \"file:///c\"\n{lora}"
        );
        JobConfig::parse(&text, &[]).expect("config")
    }

    #[test]
    fn an_8b_full_fine_tune_does_not_fit_an_80gb_gpu_and_its_lora_version_does() {
        let gpu = parse_size("80GB").expect("size");
        let full = MemoryPlan::of(&llama_8b(false), Target::Gpu);
        assert_eq!(count(full.params), "8.0B");
        // 4 + 8 + 8 bytes per parameter before activations.
        assert!(full.total > 160_000_000_000, "{}", bytes(full.total));
        let why = full
            .refusal(&llama_8b(false), gpu, "this GPU")
            .expect("refused");
        assert!(
            why.starts_with("full fine-tuning of 8.0B parameters needs")
                && why.contains("this GPU has 80.0 GB")
                && why.contains("set [lora] (r = 8 on q_proj, v_proj)"),
            "{why}"
        );
        let lora = MemoryPlan::of(&llama_8b(true), Target::Gpu);
        assert!(lora.trained < 10_000_000, "{}", lora.trained);
        // The frozen base in bf16: 2 bytes per parameter.
        assert!(lora.weights < lora.params * 2 + 100_000_000);
        assert!(lora.total < gpu, "{}", bytes(lora.total));
        assert_eq!(lora.refusal(&llama_8b(true), gpu, "this GPU"), None);
    }

    #[test]
    fn sizes_parse_in_both_unit_families_and_bad_ones_are_named() {
        assert_eq!(parse_size("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_size("80G"), Ok(80_000_000_000));
        assert_eq!(parse_size("16Gi"), Ok(16 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5T"), Ok(1_500_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_size("80gb"), Ok(80_000_000_000));
        assert_eq!(parse_size("2Pi"), Ok(1 << 51));
        for bad in [
            "",
            "GB",
            "80XB",
            "-1G",
            "0",
            "1e30",
            "9999999999T",
            "80GBB",
            "5.",
            ".5G",
            "1.5.3G",
            "NaN",
            "inf",
            "0x10G",
            "+5G",
            "1.5",
            "16Ei",
            "500m",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
