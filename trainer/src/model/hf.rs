//! Hugging Face `model.safetensors` import and export, in HF's Llama tensor names.
//!
//! Import accepts f32, bf16 and f16 tensors and widens them to f32 master weights; export writes
//! f32, bf16 or f16 (round to nearest even) with `{"format": "pt"}` metadata, the layout
//! `safetensors.torch.save_file` produces, so a model imported and exported at its own dtype is
//! byte-identical to the file it came from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use half::{bf16, f16};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::{LlamaConfig, param_specs};
use crate::error::{Error, Result};

/// Element type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl WeightDtype {
    fn safetensors(self) -> Dtype {
        match self {
            WeightDtype::F32 => Dtype::F32,
            WeightDtype::Bf16 => Dtype::BF16,
            WeightDtype::F16 => Dtype::F16,
        }
    }

    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }
}

/// Weights read from a safetensors file, in [`param_specs`] order.
#[derive(Debug, Clone)]
pub struct ImportedWeights {
    /// Values, widened to f32.
    pub values: Vec<Vec<f32>>,
    /// The dtype the file stored (the most common one, if mixed).
    pub dtype: WeightDtype,
}

/// Reads a HF Llama `model.safetensors` (`bytes`; `file` names it in errors) for `config`.
/// Every parameter must be present with its HF shape; unknown tensors are refused so a
/// mismatched architecture cannot load silently. (`lm_head.weight` of a tied model and RoPE
/// `inv_freq` buffers are ignored.)
pub fn import(bytes: &[u8], file: &str, config: &LlamaConfig) -> Result<ImportedWeights> {
    let bad = |reason: String| Error::Model {
        file: file.into(),
        reason,
    };
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let specs = param_specs(config);
    let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut names = st.names();
    names.sort();
    for name in names {
        let ignorable = name.ends_with("rotary_emb.inv_freq")
            || (config.tie_word_embeddings && name == "lm_head.weight");
        if !wanted.contains(name) && !ignorable {
            return Err(bad(format!(
                "unexpected tensor `{name}` (not part of this Llama architecture)"
            )));
        }
    }
    let mut dtypes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for spec in &specs {
        let (v, d) = read_tensor(&st, spec, "config.json", &bad)?;
        *dtypes.entry(d.torch_name()).or_default() += 1;
        out.push(v);
    }
    let dtype = match dtypes.iter().max_by_key(|(_, n)| **n).map(|(d, _)| *d) {
        Some("bfloat16") => WeightDtype::Bf16,
        Some("float16") => WeightDtype::F16,
        _ => WeightDtype::F32,
    };
    Ok(ImportedWeights { values: out, dtype })
}

/// Exactly the tensors `specs` names (in that order, as f32), from a safetensors file that
/// holds nothing else (a LoRA adapter file): each must be there with its shape.
pub fn import_tensors(
    bytes: &[u8],
    file: &str,
    specs: &[super::ParamSpec],
) -> Result<Vec<Vec<f32>>> {
    let bad = |reason: String| Error::Model {
        file: file.into(),
        reason,
    };
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut names = st.names();
    names.sort();
    if let Some(extra) = names.iter().find(|n| !wanted.contains(**n)) {
        return Err(bad(format!(
            "unexpected tensor `{extra}` (not one of the adapters [lora] makes)"
        )));
    }
    specs
        .iter()
        .map(|spec| read_tensor(&st, spec, "[lora]", &bad).map(|(v, _)| v))
        .collect()
}

/// `spec`'s tensor of `st` as f32, with its stored dtype: there, of the shape `implied_by`
/// (the config that says it) implies, and of a float dtype.
fn read_tensor(
    st: &SafeTensors<'_>,
    spec: &super::ParamSpec,
    implied_by: &str,
    bad: &dyn Fn(String) -> Error,
) -> Result<(Vec<f32>, WeightDtype)> {
    let name = &spec.name;
    let view = st
        .tensor(name)
        .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
    if view.shape() != spec.shape.as_slice() {
        return Err(bad(format!(
            "tensor `{name}` has shape {:?}; {implied_by} implies {:?}",
            view.shape(),
            spec.shape
        )));
    }
    widen(&view).ok_or_else(|| {
        bad(format!(
            "tensor `{name}` has dtype {:?}; only F32, BF16 and F16 are supported",
            view.dtype()
        ))
    })
}

fn widen(view: &TensorView<'_>) -> Option<(Vec<f32>, WeightDtype)> {
    let d = view.data();
    Some(match view.dtype() {
        Dtype::F32 => (
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            WeightDtype::F32,
        ),
        Dtype::BF16 => (
            d.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            WeightDtype::Bf16,
        ),
        Dtype::F16 => (
            d.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            WeightDtype::F16,
        ),
        _ => return None,
    })
}

/// `values` (f32, [`param_specs`] order) as little-endian bytes of `dtype`.
pub fn narrow(values: &[f32], dtype: WeightDtype) -> Vec<u8> {
    match dtype {
        WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightDtype::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        WeightDtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Serialises `values` as a HF Llama `model.safetensors` of `dtype`.
pub fn export(config: &LlamaConfig, values: &[Vec<f32>], dtype: WeightDtype) -> Result<Vec<u8>> {
    write_tensors(&param_specs(config), values, dtype)
}

/// A safetensors file of `values` named and shaped by `specs`, at `dtype`.
pub fn write_tensors(
    specs: &[super::ParamSpec],
    values: &[Vec<f32>],
    dtype: WeightDtype,
) -> Result<Vec<u8>> {
    if specs.len() != values.len() {
        return Err(Error::Internal(format!(
            "{} tensors given for {} parameters",
            values.len(),
            specs.len()
        )));
    }
    let bytes: Vec<Vec<u8>> = values.iter().map(|v| narrow(v, dtype)).collect();
    let mut views = Vec::with_capacity(specs.len());
    for (s, b) in specs.iter().zip(&bytes) {
        let view = TensorView::new(dtype.safetensors(), s.shape.clone(), b)
            .map_err(|e| Error::Internal(format!("tensor `{}`: {e}", s.name)))?;
        views.push((s.name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Internal(format!("cannot serialise safetensors: {e}")))
}

/// A model directory's `config.json` as written by export: the config with `torch_dtype` set.
pub fn config_json(config: &LlamaConfig, dtype: WeightDtype) -> Result<String> {
    let mut c = config.clone();
    // transformers 5 names it `dtype`, 4 `torch_dtype`; keep whichever the config uses.
    let key = if c.extra.contains_key("dtype") {
        "dtype"
    } else {
        "torch_dtype"
    };
    c.extra.insert(key.into(), dtype.torch_name().into());
    serde_json::to_string_pretty(&c)
        .map(|s| s + "\n")
        .map_err(|e| Error::Internal(format!("cannot serialise config.json: {e}")))
}

/// A Hugging Face model directory read from disk.
#[derive(Debug, Clone)]
pub struct HfModel {
    /// Its `config.json`.
    pub config: LlamaConfig,
    /// Its `model.safetensors`.
    pub weights: ImportedWeights,
}

/// Reads `dir/config.json` and `dir/model.safetensors`.
pub fn read_dir(dir: &Path) -> Result<HfModel> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })
    };
    let cfg_file = dir.join("config.json").display().to_string();
    let text = read("config.json")?;
    let text = String::from_utf8(text).map_err(|_| Error::Model {
        file: cfg_file.clone(),
        reason: "not UTF-8".into(),
    })?;
    let config = LlamaConfig::parse(&text, &cfg_file)?;
    let st_file = dir.join("model.safetensors").display().to_string();
    let weights = import(&read("model.safetensors")?, &st_file, &config)?;
    Ok(HfModel { config, weights })
}

/// Writes `dir/config.json` and `dir/model.safetensors` (creating `dir`).
pub fn write_dir(
    dir: &Path,
    config: &LlamaConfig,
    values: &[Vec<f32>],
    dtype: WeightDtype,
) -> Result<()> {
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let st = export(config, values, dtype)?;
    let p = dir.join("model.safetensors");
    std::fs::write(&p, st).map_err(io(&p))?;
    let p = dir.join("config.json");
    std::fs::write(&p, config_json(config, dtype)?).map_err(io(&p))?;
    Ok(())
}
