//! What can be checked before a gang is launched, so that a job whose inputs do not exist is
//! refused at once, naming the field, instead of failing in every worker: each `data.train`
//! entry names at least one object, and a `model.base` directory has its `config.json` and
//! `model.safetensors`. Only a definite "not found" refuses; a store that cannot be reached
//! now is left to the workers (they retry, and report).

use std::path::Path;
use std::time::Duration;

use lockstep_api::JobConfig;
use lockstep_storage::objects;

use crate::service::resolve_url;

/// The longest the checks may take before the job is accepted unchecked.
const LIMIT: Duration = Duration::from_secs(30);

/// Checks `config`'s inputs (relative `file://` URLs resolve against `workdir`).
pub async fn check(config: &JobConfig, workdir: &Path) -> Result<(), String> {
    match tokio::time::timeout(LIMIT, inputs(config, workdir)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("checking the job's inputs took over {LIMIT:?}; accepting it unchecked");
            Ok(())
        }
    }
}

async fn inputs(config: &JobConfig, workdir: &Path) -> Result<(), String> {
    for (i, url) in config.data.train.iter().enumerate() {
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
            return Err(format!("data.train[{i}] `{url}`: {why}"));
        }
    }
    let base = &config.model.base;
    if base != "init" {
        let url = if base.contains("://") {
            base.trim_end_matches('/').to_string()
        } else {
            format!("file://{}", base.trim_end_matches('/'))
        };
        let url = resolve_url(&url, workdir);
        for file in ["config.json", "model.safetensors"] {
            match objects::exists(&format!("{url}/{file}")).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!(
                        "model.base `{base}`: {file} not found (a Hugging Face Llama directory \
                         holds config.json and model.safetensors)"
                    ));
                }
                Err(e) => return unreachable_store(&e),
            }
        }
    }
    Ok(())
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
