//! The architecture of a Llama model: read from (and written as) a Hugging Face `config.json`,
//! or built from the job config's `[model]` section for random init.

use std::collections::BTreeMap;

use lockstep_api::config::ModelSection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
        if let Some(s) = self.extra.get("rope_scaling")
            && !s.is_null()
        {
            return bad(format!("`rope_scaling` {s} is not supported"));
        }
        if let Some(t) = self
            .extra
            .get("rope_parameters")
            .and_then(|p| p.get("rope_type"))
            .and_then(|t| t.as_str())
            && t != "default"
        {
            return bad(format!(
                "rope_parameters.rope_type `{t}` is not supported (only `default`)"
            ));
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
        serde_json::json!({
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
        })
    }

    /// Parameter count.
    pub fn num_params(&self) -> usize {
        super::param_specs(self).iter().map(|s| s.numel()).sum()
    }
}
