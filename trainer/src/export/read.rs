//! Reading a lineage: the promoted version, verified file by file (the base of a nightly
//! run), and the list of versions with their promotion decisions (`lockstep export ls`).

use lockstep_storage::objects;

use super::lineage::{Damaged, Decision};
use super::{
    LATEST_FILE, LINEAGE_FILE, Latest, Lineage, MAX_RECORD, Record, check_segment, check_version,
    sha256_hex,
};
use crate::error::{Error, Result};

/// What `latest.json` promotes: a model, or a LoRA adapter and the base it was trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promoted {
    /// A Hugging Face model directory (URL).
    Model(String),
    /// A PEFT adapter directory (URL) for `base` (the directory URL it was trained on), whose
    /// `model.safetensors` must have sha256 `base_sha256`.
    Adapter {
        /// The adapter's directory.
        dir: String,
        /// The base's directory.
        base: String,
        /// Its `model.safetensors`' sha256 when the adapter was trained.
        base_sha256: String,
    },
}

/// The directory URL of the model version `<lineage_url>/latest.json` promotes (see
/// [`resolve_promoted`]); a promoted LoRA adapter is refused: it is not a model.
pub async fn resolve_latest(lineage_url: &str) -> Result<String> {
    match resolve_promoted(lineage_url).await? {
        Promoted::Model(dir) => Ok(dir),
        Promoted::Adapter { dir, .. } => Err(Error::Model {
            file: format!("{dir}/{LINEAGE_FILE}"),
            reason: "the promoted version is a LoRA adapter (export.lora = \"adapter\"), not a \
                     model: only a job with [lora] can start from it (on its base)"
                .into(),
        }),
    }
}

/// What `<lineage_url>/latest.json` promotes, once every file its `lockstep.json` lists has
/// the size and sha256 recorded there (a damaged export is refused, naming the file). For a
/// nightly job starting from last night's model (or adapter).
pub async fn resolve_promoted(lineage_url: &str) -> Result<Promoted> {
    let lineage_url = lineage_url.trim_end_matches('/');
    let latest_url = format!("{lineage_url}/{LATEST_FILE}");
    let model = |file: &str, reason: String| Error::Model {
        file: file.to_string(),
        reason,
    };
    let read_small = |url: String| async move {
        let object = match objects::head_url(&url).await {
            Ok(o) => o,
            Err(lockstep_storage::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::from(e)),
        };
        if object.size > MAX_RECORD {
            return Err(model(
                &url,
                format!("{} bytes: not a lockstep record", object.size),
            ));
        }
        Ok(Some(object.read_range(0..object.size).await?))
    };
    let bytes = read_small(latest_url.clone()).await?.ok_or_else(|| {
        model(
            &latest_url,
            "not found: the lineage has no promoted version (export one with --promote first)"
                .into(),
        )
    })?;
    let latest: Latest = serde_json::from_slice(&bytes)
        .map_err(|e| model(&latest_url, format!("not a lockstep latest.json: {e}")))?;
    // The version directory inside this lineage, whatever URL the record claims.
    if check_version(&latest.version).is_err() {
        return Err(model(
            &latest_url,
            format!(
                "names version `{}`, which is not a version of this lineage: the lineage is \
                 damaged",
                latest.version
            ),
        ));
    }
    let dir = format!("{lineage_url}/{}", latest.version);
    let record_url = format!("{dir}/{LINEAGE_FILE}");
    let bytes = read_small(record_url.clone()).await?.ok_or_else(|| {
        model(
            &record_url,
            "not found: the promoted version is incomplete".into(),
        )
    })?;
    let record: Record = serde_json::from_slice(&bytes)
        .map_err(|e| model(&record_url, format!("not a lockstep.json: {e}")))?;
    // What makes a model (or an adapter): an export without them (an empty list checks
    // nothing) is refused.
    let adapter = record.files.iter().any(|f| f.name == "adapter_config.json");
    let required: &[&str] = if adapter {
        &["adapter_model.safetensors", "adapter_config.json"]
    } else {
        &["model.safetensors", "config.json"]
    };
    for &required in required {
        if !record.files.iter().any(|f| f.name == required) {
            return Err(model(
                &record_url,
                format!("lists no `{required}`: not a complete export, so it cannot be a base"),
            ));
        }
    }
    // Every name first: none may lead outside the version's directory.
    for f in &record.files {
        if check_segment("a file of the export", &f.name).is_err() {
            return Err(model(
                &record_url,
                format!(
                    "lists file `{}`, which is not a file name: the export is damaged",
                    f.name
                ),
            ));
        }
    }
    for f in &record.files {
        let url = format!("{dir}/{}", f.name);
        let bytes = objects::read_url(&url).await.map_err(|e| match e {
            lockstep_storage::Error::NotFound { .. } => {
                model(&url, "missing (lockstep.json lists it)".into())
            }
            e => e.into(),
        })?;
        let sha = sha256_hex(&bytes);
        if bytes.len() as u64 != f.bytes || sha != f.sha256 {
            return Err(model(
                &url,
                format!(
                    "{} bytes with sha256 {sha}; lockstep.json records {} bytes with sha256 {}: \
                     the export is damaged",
                    bytes.len(),
                    f.bytes,
                    f.sha256
                ),
            ));
        }
    }
    if !adapter {
        return Ok(Promoted::Model(dir));
    }
    // An adapter names the base it was trained on and that base's hash.
    if record.trained_from.get("base").and_then(|b| b.as_str()) == Some("init") {
        return Err(model(
            &record_url,
            "the promoted version is a LoRA adapter trained on a random base (model.base = \
             \"init\"), which no other job has: it cannot be started from"
                .into(),
        ));
    }
    let from = |key: &str| {
        record
            .trained_from
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                model(
                    &record_url,
                    format!(
                        "the promoted adapter's lineage has no `{key}`: its base is unknown, so \
                         it cannot be trained on"
                    ),
                )
            })
    };
    Ok(Promoted::Adapter {
        base: from("base_read_from")?,
        base_sha256: from("base_safetensors_sha256")?,
        dir,
    })
}

/// A lineage's finished versions, oldest first, each with its promotion decision, and which
/// one is promoted.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The lineage: `<export.url>/<name>`.
    pub url: String,
    /// The finished versions and the decision taken on each (none: promotion not asked).
    pub versions: Vec<(Record, Option<Decision>)>,
    /// The promoted version's name (what `latest.json` names).
    pub promoted: Option<String>,
    /// What is wrong in the lineage: version directories whose `lockstep.json` cannot be read,
    /// a promoted version that is missing or lacks a file (or has one of another size) than
    /// its record lists, a `latest.json` that cannot be read. Serving would meet these.
    pub damaged: Vec<Damaged>,
    /// Nothing at all is stored under the lineage's URL (a mistyped name, most likely).
    pub empty: bool,
}

/// Lists the lineage at `lineage_url` (`<export.url>/<name>`, `file://` or `s3://`).
pub async fn list(lineage_url: &str) -> Result<Listing> {
    let url = lineage_url.trim_end_matches('/');
    let (store, root) = objects::open_url(url)?;
    let lineage = Lineage::with_store(store, root, url);
    let local = super::lineage::local_dir(url)?;
    let lineage = Lineage {
        latest: lockstep_storage::pointer::Pointer::open(&format!(
            "{}/{LATEST_FILE}",
            lineage.url
        ))?,
        by_url: true,
        local,
        ..lineage
    };
    let super::lineage::Scan {
        versions,
        mut damaged,
        empty,
    } = lineage.scan().await?;
    let promoted = match lineage.latest().await {
        Ok(l) => l.map(|l| l.version),
        Err(e) => {
            damaged.push(Damaged {
                version: LATEST_FILE.into(),
                why: e.to_string(),
            });
            None
        }
    };
    // The promoted version is what serving loads: each of its files must be there, of the
    // size its record lists (the sha256 is checked where it is loaded: `resolve_latest`).
    if let Some(p) = &promoted {
        match versions.iter().find(|(r, _)| &r.version == p) {
            _ if super::check_version(p).is_err() => damaged.push(Damaged {
                version: LATEST_FILE.into(),
                why: format!("it names `{p}`, which is not a version name"),
            }),
            Some((record, _)) => {
                for f in &record.files {
                    let url = format!("{}/{p}/{}", lineage.url, f.name);
                    let why = match objects::head_url(&url).await {
                        Ok(o) if o.size == f.bytes => continue,
                        Ok(o) => format!(
                            "the promoted version's {} holds {} bytes; its lockstep.json \
                             records {}",
                            f.name, o.size, f.bytes
                        ),
                        Err(e) => format!("the promoted version's {}: {e}", f.name),
                    };
                    damaged.push(Damaged {
                        version: p.clone(),
                        why,
                    });
                }
            }
            None if damaged.iter().any(|d| &d.version == p) => {}
            None => damaged.push(Damaged {
                version: p.clone(),
                why: format!(
                    "{LATEST_FILE} promotes it, but it has no {LINEAGE_FILE} (unfinished or \
                     removed)"
                ),
            }),
        }
    }
    Ok(Listing {
        url: lineage.url,
        versions,
        empty: empty && promoted.is_none() && damaged.is_empty(),
        promoted,
        damaged,
    })
}
