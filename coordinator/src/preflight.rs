//! What can be checked before a gang is launched, so that a job whose inputs do not exist is
//! refused at once, naming the field, instead of failing in every worker: each `data.train`
//! and `data.eval` entry names at least one object, and a `model.base` directory has its `config.json` and
//! `model.safetensors`. Only a definite "not found" refuses; a store that cannot be reached
//! now is left to the workers (they retry, and report).

use std::path::Path;
use std::time::Duration;

use lockstep_api::JobConfig;
use lockstep_api::base::{BaseModel, as_url};
use lockstep_storage::objects;

use crate::launcher::Refused;
use crate::service::resolve_url;

/// The longest the checks (and sizing the base model) may take together before the job is
/// accepted unchecked.
pub(crate) const LIMIT: Duration = Duration::from_secs(30);

/// Checks `config`'s inputs (relative `file://` URLs resolve against `workdir`).
pub async fn check(config: &JobConfig, workdir: &Path) -> Result<(), Refused> {
    match tokio::time::timeout(LIMIT, inputs(config, workdir)).await {
        Ok(r) => r.map_err(Refused),
        Err(_) => {
            tracing::warn!("checking the job's inputs took over {LIMIT:?}; accepting it unchecked");
            Ok(())
        }
    }
}

async fn inputs(config: &JobConfig, workdir: &Path) -> Result<(), String> {
    let mut entries: Vec<(&str, usize, &String)> = Vec::new();
    for (field, urls) in [
        ("data.train", &config.data.train),
        ("data.eval", &config.data.eval),
    ] {
        entries.extend(urls.iter().enumerate().map(|(i, u)| (field, i, u)));
    }
    for (field, i, url) in entries {
        let resolved = resolve_url(url, workdir);
        let missing = if objects::is_glob(&resolved) {
            match objects::expand(&resolved).await {
                Ok(_) => None,
                Err(lockstep_storage::Error::Invalid(why)) => Some(why),
                Err(e) => return unreachable_store(&e),
            }
        } else {
            match objects::exists(&resolved).await {
                Ok(true) => None,
                Ok(false) => Some("not found".to_string()),
                Err(e) => return unreachable_store(&e),
            }
        };
        if let Some(why) = missing {
            return Err(format!("{field}[{i}] `{url}`: {why}"));
        }
    }
    let base = &config.model.base;
    match base {
        BaseModel::Init => {}
        BaseModel::LatestExport(lineage) => {
            let url = resolve_url(&format!("{}/latest.json", as_url(lineage)), workdir);
            match objects::exists(&url).await {
                Ok(true) => {
                    if !names_a_version(&url).await {
                        return Err(format!(
                            "model.base `{base}`: {url} does not name a version of the lineage \
                             (damaged: fix or remove it, then promote a version)"
                        ));
                    }
                }
                Ok(false) => {
                    return Err(format!(
                        "model.base `{base}`: {url} not found: the lineage has no promoted \
                         version yet"
                    ));
                }
                Err(e) => return unreachable_store(&e),
            }
        }
        BaseModel::Dir(dir) => {
            let url = resolve_url(&as_url(dir), workdir);
            for file in ["config.json", "model.safetensors"] {
                match objects::exists(&format!("{url}/{file}")).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(format!(
                            "model.base `{base}`: {file} not found (a Hugging Face Llama \
                             directory holds config.json and model.safetensors)"
                        ));
                    }
                    Err(e) => return unreachable_store(&e),
                }
            }
        }
    }
    Ok(())
}

/// Whether the `latest.json` at `url` names a version (one path segment inside its lineage,
/// not one of the lineage's own files). A store error is not a verdict: true (the worker
/// reads it again and says why).
async fn names_a_version(url: &str) -> bool {
    let Ok(object) = objects::head_url(url).await else {
        return true;
    };
    if object.size > MAX_BASE_CONFIG {
        return false;
    }
    let Ok(bytes) = object.read_range(0..object.size).await else {
        return true;
    };
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|j| j["version"].as_str().map(str::to_string));
    version.is_some_and(|v| {
        lockstep_api::config::is_path_segment(&v) && !v.starts_with('.') && v != "latest.json"
    })
}

/// The largest `config.json` read to size a base model.
const MAX_BASE_CONFIG: u64 = 1 << 20;

/// `config` with its `[model]` architecture replaced by that of its Hugging Face base model
/// (`model.base`'s `config.json`), for estimating memory: the `[model]` section describes only
/// a random initialisation. `None` when there is no base, or its config cannot be read now
/// (the workers report why), or it lacks the fields.
pub async fn with_base_architecture(
    config: &JobConfig,
    workdir: &Path,
    deadline: tokio::time::Instant,
) -> Option<JobConfig> {
    // (A promoted export was sized when it was trained.)
    let BaseModel::Dir(dir) = &config.model.base else {
        return None;
    };
    let url = format!("{}/config.json", resolve_url(&as_url(dir), workdir));
    let read = async {
        let object = objects::head_url(&url).await.ok()?;
        if object.size > MAX_BASE_CONFIG {
            return None;
        }
        let bytes = object.read_range(0..object.size).await.ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()
    };
    let Ok(hf) = tokio::time::timeout_at(deadline, read).await else {
        tracing::warn!(url = %url, "cannot read the base model's config.json in time; its size is not checked");
        return None;
    };
    let hf = hf?;
    let field = |name: &str| {
        hf.get(name)
            .and_then(serde_json::Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    let mut out = config.clone();
    let m = &mut out.model;
    m.hidden_size = field("hidden_size")?;
    m.num_layers = field("num_hidden_layers")?;
    m.intermediate_size = field("intermediate_size")?;
    m.vocab_size = field("vocab_size")?;
    m.num_heads = field("num_attention_heads")?;
    m.num_kv_heads = field("num_key_value_heads").unwrap_or(m.num_heads);
    m.tie_embeddings = hf
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    Some(out)
}

/// A store that cannot be reached (or an unusable URL) is not proof that an input is missing.
fn unreachable_store(e: &lockstep_storage::Error) -> Result<(), String> {
    match e {
        lockstep_storage::Error::InvalidUrl { .. } => Err(e.to_string()),
        _ => {
            tracing::warn!(error = %e, "cannot check the job's inputs now; the workers will");
            Ok(())
        }
    }
}
