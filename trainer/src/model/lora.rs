//! LoRA adapters as PEFT makes them: for each targeted projection `W` (`[out, in]`) of each
//! layer, `A` (`[r, in]`) and `B` (`[out, r]`); the projection computes
//! `x·Wᵀ + dropout(x)·Aᵀ·Bᵀ · alpha/r`. `A` starts as PEFT's Kaiming-uniform draw (bound
//! `1/sqrt(in)`), `B` at zero, so an untrained adapter changes nothing.
//!
//! Adapters are named as PEFT saves them (`base_model.model.model.layers.0.self_attn.q_proj.
//! lora_A.weight`), so checkpoints and the adapter export need no renaming.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use lockstep_api::{LORA_TARGETS, LoraSection};
use serde::{Deserialize, Serialize};

use super::{DOWN, GATE, K, LlamaConfig, O, ParamSpec, Q, UP, V};
use crate::rng::Rng;

/// A layer's parameter index (within its block) of each of [`LORA_TARGETS`].
const SLOT: [usize; 7] = [Q, K, V, O, GATE, UP, DOWN];

/// What a LoRA job trains, as the checkpoint records it (a resume must match it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Rank.
    pub r: usize,
    /// Scale numerator (`alpha / r` scales the adapters' output).
    pub alpha: f64,
    /// Dropout on the adapters' input while training.
    pub dropout: f64,
    /// Targeted projections, in [`LORA_TARGETS`] order.
    pub targets: Vec<String>,
}

impl LoraSettings {
    /// From the config's `[lora]`.
    pub fn from_section(s: &LoraSection) -> LoraSettings {
        LoraSettings {
            r: s.r as usize,
            alpha: s.alpha,
            dropout: s.dropout,
            targets: LORA_TARGETS
                .iter()
                .filter(|t| s.target_modules.iter().any(|m| m == *t))
                .map(|t| t.to_string())
                .collect(),
        }
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The adapters' names and shapes for `cfg`: per layer, per target, `A` then `B`.
    pub fn specs(&self, cfg: &LlamaConfig) -> Vec<ParamSpec> {
        let base = super::param_specs(cfg);
        let mut out = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            for (t, slot) in LORA_TARGETS.iter().zip(SLOT) {
                if !self.targets.iter().any(|x| x == t) {
                    continue;
                }
                let w = &base[1 + l * super::PER_LAYER + slot];
                let stem = w.name.trim_end_matches(".weight");
                let (rows, cols) = (w.shape[0], w.shape[1]);
                out.push(ParamSpec::new(
                    format!("base_model.model.{stem}.lora_A.weight"),
                    &[self.r, cols],
                ));
                out.push(ParamSpec::new(
                    format!("base_model.model.{stem}.lora_B.weight"),
                    &[rows, self.r],
                ));
            }
        }
        out
    }
}

/// A model's adapters.
#[derive(Debug, Clone)]
pub struct Lora<B: Backend> {
    /// What they are.
    pub settings: LoraSettings,
    /// Names and shapes, parallel to `params`.
    pub specs: Vec<ParamSpec>,
    /// `A` and `B` of each adapted projection, in [`LoraSettings::specs`] order.
    pub params: Vec<Tensor<B, 2>>,
    /// Per layer and parameter slot: the index of its `A` in `params` (`B` follows).
    slots: Vec<Option<usize>>,
    /// What each training pass's dropout masks derive from (with the step and the lane).
    pub seed: u64,
}

impl<B: Backend> Lora<B> {
    /// Fresh adapters: `A` drawn from `seed` (uniform in ±1/sqrt(in), PEFT's
    /// `kaiming_uniform_(a=sqrt(5))`), `B` zero.
    pub fn init(
        settings: LoraSettings,
        cfg: &LlamaConfig,
        seed: u64,
        device: &B::Device,
    ) -> Lora<B> {
        let specs = settings.specs(cfg);
        let mut rng = Rng::derive(seed, 0x104a);
        let values = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i % 2 == 0 {
                    let bound = 1.0 / (s.shape[1] as f64).sqrt();
                    (0..s.numel())
                        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                        .collect()
                } else {
                    vec![0.0; s.numel()]
                }
            })
            .collect();
        let mut lora = Self::from_values(settings, cfg, values, device);
        lora.seed = seed;
        lora
    }

    /// Adapters from values in [`LoraSettings::specs`] order.
    pub fn from_values(
        settings: LoraSettings,
        cfg: &LlamaConfig,
        values: Vec<Vec<f32>>,
        device: &B::Device,
    ) -> Lora<B> {
        let specs = settings.specs(cfg);
        let params = specs
            .iter()
            .zip(values)
            .map(|(s, v)| Tensor::from_data(TensorData::new(v, s.shape2()), device))
            .collect();
        Self::with_params(settings, cfg, specs, params)
    }

    /// Adapters holding `params` (e.g. autodiff leaves of another's).
    pub fn with_params(
        settings: LoraSettings,
        cfg: &LlamaConfig,
        specs: Vec<ParamSpec>,
        params: Vec<Tensor<B, 2>>,
    ) -> Lora<B> {
        let mut slots = vec![None; cfg.num_hidden_layers * super::PER_LAYER];
        let mut at = 0;
        for l in 0..cfg.num_hidden_layers {
            for (t, slot) in LORA_TARGETS.iter().zip(SLOT) {
                if settings.targets.iter().any(|x| x == t) {
                    slots[l * super::PER_LAYER + slot] = Some(at);
                    at += 2;
                }
            }
        }
        Lora {
            settings,
            specs,
            params,
            slots,
            seed: 0,
        }
    }

    /// `A` and `B` of layer `l`'s parameter `slot`, if it is adapted.
    pub(super) fn pair(&self, l: usize, slot: usize) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        let i = self
            .slots
            .get(l * super::PER_LAYER + slot)
            .copied()
            .flatten()?;
        Some((self.params[i].clone(), self.params[i + 1].clone()))
    }

    /// Layer `l`'s parameter `slot`'s merged weight: `W + B·A · alpha/r` (as PEFT's
    /// `merge_and_unload`); `W` itself when it is not adapted.
    pub fn merged(&self, l: usize, slot: usize, w: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.pair(l, slot) {
            Some((a, b)) => w + b.matmul(a).mul_scalar(self.settings.scale()),
            None => w,
        }
    }
}

/// Merges adapters into base weights on the host, as PEFT's `merge_and_unload`: each adapted
/// `W` (in `values`, [`super::param_specs`] order) becomes `W + B·A · alpha/r`. `adapters` are
/// in [`LoraSettings::specs`] order.
pub fn merge(
    settings: &LoraSettings,
    cfg: &LlamaConfig,
    values: &mut [Vec<f32>],
    adapters: &[Vec<f32>],
) {
    let scale = settings.scale() as f32;
    let r = settings.r;
    let mut at = 0;
    for l in 0..cfg.num_hidden_layers {
        for (t, slot) in LORA_TARGETS.iter().zip(SLOT) {
            if !settings.targets.iter().any(|x| x == t) {
                continue;
            }
            let (a, b) = (&adapters[at], &adapters[at + 1]);
            at += 2;
            let w = &mut values[1 + l * super::PER_LAYER + slot];
            let cols = a.len() / r;
            let rows = b.len() / r;
            for o in 0..rows {
                let row = &mut w[o * cols..(o + 1) * cols];
                let mut delta = vec![0.0f32; cols];
                for k in 0..r {
                    let bk = b[o * r + k];
                    for (d, ak) in delta.iter_mut().zip(&a[k * cols..(k + 1) * cols]) {
                        *d += bk * ak;
                    }
                }
                for (x, d) in row.iter_mut().zip(delta) {
                    *x += d * scale;
                }
            }
        }
    }
}

/// A dropout mask `[n, width]` for the adapters' input: 0 with probability `p`, `1/(1-p)`
/// otherwise, drawn on the host from `rng` (so it is the same on every backend and run).
pub(super) fn dropout_mask(rng: &mut Rng, n: usize, width: usize, p: f64) -> Vec<f32> {
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..n * width)
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep })
        .collect()
}
