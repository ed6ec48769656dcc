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
    match base_architecture(config, workdir, deadline).await {
        Ok(sized) => sized,
        Err(e) => {
            tracing::warn!("{}; its size is not checked", e.why);
            None
        }
    }
}

/// Why a base's `config.json` cannot size a job.
#[derive(Debug, Clone)]
pub struct Unsized {
    /// Naming the file and what is wrong.
    pub why: String,
    /// It could not be read in time (or at all, the store being unreachable): not proof that
    /// it is bad.
    pub unread: bool,
}

/// As [`with_base_architecture`], saying why a base's `config.json` cannot size the job:
/// `Ok(None)` when `model.base` is not a model directory; `Err` naming the file and what is
/// wrong with it (missing, unreadable, not JSON, a field missing or out of `[model]`'s bounds,
/// an architecture training refuses).
pub async fn base_architecture(
    config: &JobConfig,
    workdir: &Path,
    deadline: tokio::time::Instant,
) -> Result<Option<JobConfig>, Unsized> {
    base_architecture_inner(config, workdir, deadline)
        .await
        .map_err(|(why, unread)| Unsized { why, unread })
}

async fn base_architecture_inner(
    config: &JobConfig,
    workdir: &Path,
    deadline: tokio::time::Instant,
) -> Result<Option<JobConfig>, (String, bool)> {
    // (A promoted export was sized when it was trained.)
    let BaseModel::Dir(dir) = &config.model.base else {
        return Ok(None);
    };
    let url = format!("{}/config.json", resolve_url(&as_url(dir), workdir));
    let read = async {
        let object = objects::head_url(&url).await.map_err(|e| {
            // A store that cannot be reached says nothing about the file.
            let unread = e.is_transient() || matches!(e, lockstep_storage::Error::Store { .. });
            (e.to_string(), unread)
        })?;
        if object.size > MAX_BASE_CONFIG {
            return Err((
                format!(
                    "it is {} bytes, more than a config.json's {MAX_BASE_CONFIG}",
                    object.size
                ),
                false,
            ));
        }
        if object.size == 0 {
            return Err(("empty".into(), false));
        }
        let bytes = object
            .read_range(0..object.size)
            .await
            .map_err(|e| (e.to_string(), true))?;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| (format!("not JSON: {e}"), false))
    };
    let at = |why: String| (format!("model.base `{dir}`: config.json: {why}"), false);
    let hf = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => return Err((at("not read in time".into()).0, true)),
        Ok(Err((why, unread))) => return Err((at(why).0, unread)),
        Ok(Ok(hf)) => hf,
    };
    let field = |name: &str| -> Result<u32, (String, bool)> {
        match hf.get(name) {
            None => Err(at(format!("no `{name}`"))),
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| at(format!("`{name}` is {v}, not a whole number that fits u32"))),
        }
    };
    let mut out = config.clone();
    let m = &mut out.model;
    m.hidden_size = field("hidden_size")?;
    m.num_layers = field("num_hidden_layers")?;
    m.intermediate_size = field("intermediate_size")?;
    m.vocab_size = field("vocab_size")?;
    m.num_heads = field("num_attention_heads")?;
    m.num_kv_heads = match hf.get("num_key_value_heads") {
        None => m.num_heads,
        Some(_) => field("num_key_value_heads")?,
    };
    m.tie_embeddings = match hf.get("tie_word_embeddings") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| at(format!("`tie_word_embeddings` is {v}, not true or false")))?,
    };
    // What training refuses (trainer/src/model/config.rs), refused here before launch too.
    let text = |k: &str, default: &str| {
        hf.get(k)
            .and_then(|v| v.as_str())
            .map_or(default.to_string(), str::to_string)
    };
    if hf.get("model_type").is_some() && text("model_type", "") != "llama" {
        return Err(at(format!(
            "model_type `{}` is not supported (only `llama`)",
            text("model_type", "")
        )));
    }
    if text("hidden_act", "silu") != "silu" {
        return Err(at(format!(
            "hidden_act `{}` is not supported (only `silu`)",
            text("hidden_act", "")
        )));
    }
    if let Some(hd) = hf.get("head_dim").filter(|v| !v.is_null()) {
        let heads = u64::from(m.num_heads);
        if hd
            .as_u64()
            .is_none_or(|hd| hd * heads != u64::from(m.hidden_size))
        {
            return Err(at(format!(
                "head_dim {hd} × {heads} heads ≠ hidden_size {}",
                m.hidden_size
            )));
        }
    }
    // The bounds `[model]` has, named by config.json's keys.
    out.validate().map_err(|e| {
        let e = e
            .to_string()
            .replace("model.num_layers", "num_hidden_layers")
            .replace("model.num_heads", "num_attention_heads")
            .replace("model.num_kv_heads", "num_key_value_heads")
            .replace("model.", "");
        at(format!("as an architecture: {e}"))
    })?;
    Ok(Some(out))
}

/// A store that cannot be reached (or an unusable URL) is not proof that an input is missing.
fn unreachable_store(e: &lockstep_storage::Error) -> Result<(), String> {
    match e {
        lockstep_storage::Error::InvalidUrl { .. } | lockstep_storage::Error::NotAFile { .. } => {
            Err(e.to_string())
        }
        _ => {
            tracing::warn!(error = %e, "cannot check the job's inputs now; the workers will");
            Ok(())
        }
    }
}
