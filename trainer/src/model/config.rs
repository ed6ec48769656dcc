//! The architecture of a Llama model: read from (and written as) a Hugging Face `config.json`,
//! or built from the job config's `[model]` section for random init.

use std::collections::BTreeMap;

use lockstep_api::config::ModelSection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// RoPE frequency scaling (`rope_parameters.rope_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Unscaled.
    Default,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, smoothed between.
    Llama3 {
        /// The factor.
        factor: f64,
        /// Wavelengths above `original_max_position / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context the model was first trained at.
        original_max_position: f64,
    },
}

/// The fields of a Hugging Face `LlamaConfig` this trainer reads. Every other field of the file
/// is kept in `extra` and written back unchanged on export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); HF's default is `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 writes it here; 5 inside `rope_parameters`, see
    /// [`LlamaConfig::theta`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// The output projection reuses the input embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Per-head size; HF's default is `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Must be `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Every other field, kept as read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// The architecture a `[model]` section with `base = "init"` describes.
    pub fn from_section(m: &ModelSection, seq_len: usize) -> LlamaConfig {
        let mut extra = BTreeMap::new();
        extra.insert("model_type".into(), "llama".into());
        extra.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        extra.insert("torch_dtype".into(), "float32".into());
        extra.insert("attention_bias".into(), false.into());
        extra.insert("mlp_bias".into(), false.into());
        extra.insert("rope_scaling".into(), serde_json::Value::Null);
        LlamaConfig {
            hidden_size: m.hidden_size as usize,
            intermediate_size: m.intermediate_size as usize,
            num_hidden_layers: m.num_layers as usize,
            num_attention_heads: m.num_heads as usize,
            num_key_value_heads: Some(m.num_kv_heads as usize),
            vocab_size: m.vocab_size as usize,
            rms_norm_eps: m.rms_norm_eps,
            rope_theta: Some(m.rope_theta),
            tie_word_embeddings: m.tie_embeddings,
            max_position_embeddings: seq_len.max(2048),
            head_dim: None,
            hidden_act: "silu".into(),
            extra,
        }
    }

    /// Parses a `config.json`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<LlamaConfig> {
        let c: LlamaConfig = serde_json::from_str(text).map_err(|e| Error::Model {
            file: file.into(),
            reason: format!("not a Llama config.json: {e}"),
        })?;
        c.check(file)?;
        Ok(c)
    }

    /// The RoPE base: `rope_theta`, else `rope_parameters.rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.extra
                    .get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10000.0)
    }

    /// The RoPE scaling: `rope_parameters` (transformers 5) or `rope_scaling` (4), by
    /// `rope_type` (or `type`). `default`, `linear` and `llama3` are supported; others
    /// (`dynamic`, `yarn`, `longrope`, …) are refused by name.
    pub fn rope_scaling(&self) -> std::result::Result<RopeScaling, String> {
        let params = ["rope_parameters", "rope_scaling"]
            .iter()
            .filter_map(|k| self.extra.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
            .find(|(_, v)| v.get("rope_type").or_else(|| v.get("type")).is_some());
        let Some((key, p)) = params else {
            return Ok(RopeScaling::Default);
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let num = |name: &str| {
            p.get(name)
                .and_then(serde_json::Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("{key}.{name} must be a positive number for `{kind}`"))
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(format!(
                        "{key}: high_freq_factor ({high}) must exceed low_freq_factor ({low})"
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position: num("original_max_position_embeddings")?,
                })
            }
            other => Err(format!(
                "{key}.rope_type `{other}` is not supported (supported: default, linear, llama3)"
            )),
        }
    }

    /// RoPE's inverse frequencies, as transformers computes them (in f32): `theta^(-2i/d)`,
    /// then the scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_size();
        let base: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / (self.theta() as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        match self.rope_scaling().unwrap_or(RopeScaling::Default) {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                // transformers' `_compute_llama3_parameters`, operation for operation.
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = (old / wavelen - low) / (high - low);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        // (transformers: `~(wavelen < high) * ~(wavelen > low)`; no NaN here.)
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium { smoothed } else { scaled }
                    })
                    .collect()
            }
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head size.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Refuses what this implementation does not compute, naming the field.
    pub fn check(&self, file: &str) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Model {
                file: file.into(),
                reason,
            })
        };
        if let Some(t) = self.extra.get("model_type").and_then(|v| v.as_str())
            && t != "llama"
        {
            return bad(format!("model_type `{t}` is not supported (only `llama`)"));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only `silu`)",
                self.hidden_act
            ));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if self.extra.get(flag).and_then(|v| v.as_bool()) == Some(true) {
                return bad(format!("`{flag}: true` is not supported"));
            }
        }
        if let Err(e) = self.rope_scaling() {
            return bad(e);
        }
        if !(self.theta().is_finite() && self.theta() > 0.0) {
            return bad("the RoPE base must be a positive number".into());
        }
        let (h, nh, nkv) = (self.hidden_size, self.num_attention_heads, self.kv_heads());
        if h == 0 || nh == 0 || nkv == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("sizes must be at least 1".into());
        }
        if !nh.is_multiple_of(nkv) {
            return bad(format!(
                "num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}"
            ));
        }
        if self.head_size() * nh != h {
            return bad(format!(
                "head_dim {} × {nh} heads ≠ hidden_size {h}",
                self.head_size()
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return bad("the head size must be even (RoPE)".into());
        }
        Ok(())
    }

    /// The fields that decide the parameters' names, shapes and meaning; two checkpoints are
    /// compatible only when these are equal.
    pub fn architecture(&self) -> serde_json::Value {
        let mut a = serde_json::json!({
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads(),
            "head_dim": self.head_size(),
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.theta(),
            "tie_word_embeddings": self.tie_word_embeddings,
        });
        // Only when scaled: an unscaled model's architecture is what it was before this key
        // existed, so its older checkpoints still resume.
        match self.rope_scaling() {
            Ok(RopeScaling::Default) => {}
            Ok(scaling) => a["rope_scaling"] = serde_json::json!(format!("{scaling:?}")),
            Err(e) => a["rope_scaling"] = serde_json::json!(e),
        }
        a
    }

    /// Parameter count.
    pub fn num_params(&self) -> usize {
        super::param_specs(self).iter().map(|s| s.numel()).sum()
    }
}
