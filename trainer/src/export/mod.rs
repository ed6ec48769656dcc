//! Export: a committed checkpoint becomes a Hugging Face model directory a serving system can
//! load, in a lineage of versions with one promoted.
//!
//! `<export.url>/<name>/<version>/` holds `model.safetensors` (HF Llama names; f32 or bf16;
//! the same weights always give the same bytes), `config.json`, `generation_config.json`, the
//! base model's tokenizer files when it had them, and `lockstep.json` — the lineage (job,
//! checkpoint, step, config hash, base, train and eval loss, extra facts from the caller) and
//! the sha256 of every other file. `lockstep.json` is written last: a version without it is
//! unfinished and is neither listed nor promoted.
//!
//! `<export.url>/<name>/latest.json` names the promoted version. It moves only by
//! compare-and-swap ([`lockstep_storage::pointer`]), only after the new version is complete,
//! and only if the new eval loss is not worse than the promoted one's by more than
//! `max_eval_regression`; otherwise the version stays, and its `promotion.json` says why.

use bytes::Bytes;
use lockstep_api::base::{BaseModel, as_url};
use lockstep_storage::{CheckpointStore, objects};
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

use crate::checkpoint::TrainerState;
use crate::error::{Error, Result};
use crate::model::hf::{self, WeightDtype};
use crate::model::{LlamaConfig, param_specs};

mod lineage;
mod promote;
mod read;

pub use lineage::{Damaged, Decision, FileEntry, Handoff, Latest, Lineage, Record};
pub use promote::gate;
use promote::promote;
pub use read::{Listing, Promoted, list, resolve_latest, resolve_promoted};

/// The marker (and lineage record) of a finished version.
pub const LINEAGE_FILE: &str = "lockstep.json";
/// The promoted version's name.
pub const LATEST_FILE: &str = "latest.json";
/// A version's promotion decision.
pub const PROMOTION_FILE: &str = "promotion.json";
/// The files a version was claimed for (written first, once).
pub const CLAIM_FILE: &str = "claim.json";
/// Tokenizer files copied from the base model when present.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];
/// The largest JSON record read back (lockstep.json, latest.json, promotion.json).
const MAX_RECORD: u64 = 1 << 20;

fn store_err(op: &'static str, at: &str, e: object_store::Error) -> Error {
    Error::Storage(lockstep_storage::Error::Store {
        op,
        path: at.to_string(),
        source: e,
    })
}

/// A name or version: it becomes one path segment.
fn check_segment(what: &str, s: &str) -> Result<()> {
    if lockstep_api::config::is_path_segment(s) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{what} `{s}`: use 1–128 letters, digits, `-`, `_` or `.`"
        )))
    }
}

/// A version name: one path segment that is not one of the lineage's own files
/// (`latest.json`, its lock, any other hidden name).
pub fn check_version(v: &str) -> Result<()> {
    check_segment("the version", v)?;
    // Case-insensitively: on a case-insensitive file system `LATEST.JSON` is `latest.json`.
    if v.starts_with('.') || v.eq_ignore_ascii_case(LATEST_FILE) {
        return Err(Error::Usage(format!(
            "the version `{v}`: reserved for the lineage's own files (`{LATEST_FILE}`, and \
             names starting with `.`); choose another"
        )));
    }
    Ok(())
}

/// What to export and how.
#[derive(Debug, Clone)]
pub struct Request {
    /// `URL[@STEP]` of the checkpoint (no step: the newest committed).
    pub checkpoint: String,
    /// The lineage name (default: the checkpoint's job name).
    pub name: Option<String>,
    /// The version (default: `JOB-YYYYMMDD-stepN`, from the checkpoint's commit time).
    pub version: Option<String>,
    /// Weight dtype.
    pub dtype: WeightDtype,
    /// A Hugging Face directory or URL whose tokenizer files go with the export.
    pub base: Option<String>,
    /// How a LoRA checkpoint is exported (a full fine-tune's ignores it).
    pub lora: LoraExport,
    /// Move `latest.json` to this version if it passes the gate.
    pub promote: bool,
    /// How much worse than the promoted version's eval loss the new one may be.
    pub max_eval_regression: f64,
    /// Extra lineage facts for `lockstep.json`.
    pub lineage: serde_json::Value,
    /// POST a notice here when the version is promoted ([`crate::webhook`]).
    pub webhook: Option<String>,
}

/// How a LoRA checkpoint is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraExport {
    /// The base with the adapters merged in: a plain Hugging Face model.
    #[default]
    Merge,
    /// A PEFT adapter directory: `adapter_config.json` + `adapter_model.safetensors`.
    Adapter,
}

/// What happened to the promotion.
#[derive(Debug, Clone, PartialEq)]
pub enum Promotion {
    /// Not asked for.
    NotAsked,
    /// `latest.json` now names the version (it named `replaced` before).
    Promoted {
        /// The version promoted before, if any.
        replaced: Option<String>,
    },
    /// The version stays, not promoted.
    Kept {
        /// Why.
        reason: String,
    },
    /// This exact version was already exported; its files were not written again.
    AlreadyExported {
        /// Whether it is the promoted version (`latest.json` names it).
        promoted: bool,
    },
}

/// The result of an export.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The version's record.
    pub record: Record,
    /// Its directory's URL.
    pub url: String,
    /// The promotion.
    pub promotion: Promotion,
    /// The webhook's delivery (the try that was accepted, or why none was), when one was due.
    pub webhook: Option<std::result::Result<u32, String>>,
    /// Another export of the same version that is delivering the notice now (`HOST pid N,
    /// for S s`): this one did not send it.
    pub notice_sent_by: Option<String>,
    /// Whether this export wrote the version's files (false: a finished version with the
    /// same files was there).
    pub written: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A directory path or URL as a URL.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `YYYYMMDD` of Unix milliseconds (UTC).
pub fn utc_date(unix_ms: u64) -> String {
    lockstep_api::date::iso(unix_ms).replace('-', "")
}

/// A LoRA checkpoint's claims, checked against each other before anything is exported: its
/// settings are valid, its base identity is the one its provenance recorded, and it holds
/// exactly the adapters its settings make (no more, no fewer).
fn check_lora_state(
    state: &TrainerState,
    lora: &crate::checkpoint::LoraState,
    tensors: &[lockstep_storage::Tensor],
) -> std::result::Result<(), String> {
    let s = &lora.settings;
    if s.r == 0
        || !(s.alpha.is_finite() && s.alpha > 0.0)
        || !(s.dropout.is_finite() && (0.0..1.0).contains(&s.dropout))
        || s.targets.is_empty()
        || s.targets
            .iter()
            .any(|t| !lockstep_api::LORA_TARGETS.contains(&t.as_str()))
    {
        return Err(format!(
            "its trainer state records LoRA settings no job can have ({s:?}): the manifest is \
             damaged"
        ));
    }
    let recorded = state
        .provenance
        .get("base_safetensors_sha256")
        .and_then(|v| v.as_str());
    let consistent = match (lora.base.strip_prefix("sha256 "), recorded) {
        (Some(a), Some(b)) => a == b,
        (None, None) => lora.base.starts_with("init seed "),
        _ => false,
    };
    if !consistent {
        return Err(format!(
            "its trainer state names base `{}` but its provenance records {}: the manifest is \
             damaged",
            lora.base,
            recorded.map_or("a random base".into(), |r| format!("sha256 {r}"))
        ));
    }
    let names: std::collections::HashSet<String> = s
        .specs(&state.model_config)
        .into_iter()
        .map(|p| p.name)
        .collect();
    if let Some(extra) = tensors
        .iter()
        .map(|t| t.name.trim_start_matches(crate::checkpoint::EXP_AVG_SQ))
        .map(|n| n.trim_start_matches(crate::checkpoint::EXP_AVG))
        .find(|n| !names.contains(*n))
    {
        return Err(format!(
            "it holds tensor `{extra}`, which its LoRA settings do not make: the manifest is \
             damaged"
        ));
    }
    Ok(())
}

/// The `model.safetensors` a LoRA checkpoint's adapters were trained on, checked against
/// `identity` (`sha256 HEX`): read from `from` (`--base`, a directory or URL) when given,
/// else from where the checkpoint's provenance says it was read; `None` for a random
/// (`init seed N`) base, which is made again.
async fn lora_base(
    state: &TrainerState,
    identity: &str,
    from: Option<&str>,
) -> Result<Option<(String, Bytes)>> {
    let Some(want) = identity.strip_prefix("sha256 ") else {
        return Ok(None);
    };
    let recorded = state
        .provenance
        .get("base_read_from")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let dir = match (from.map(BaseModel::parse), recorded) {
        (Some(BaseModel::Dir(d)), _) => as_url(&d),
        (Some(BaseModel::LatestExport(l)), _) => resolve_latest(&as_url(&l)).await?,
        (_, Some(r)) => r,
        (_, None) => {
            return Err(Error::Usage(
                "the checkpoint holds LoRA adapters but does not say where its base was read \
                 from: give the base with --base to merge into"
                    .into(),
            ));
        }
    };
    let url = format!("{dir}/model.safetensors");
    let bytes = objects::read_url(&url).await.map_err(|e| match e {
        lockstep_storage::Error::NotFound { .. } => Error::Usage(format!(
            "{url}: not found. It is the base the adapters were trained on, and a merge needs it \
             (moved? give its directory with --base; its model.safetensors must have sha256 \
             {want})"
        )),
        e => e.into(),
    })?;
    let got = sha256_hex(&bytes);
    if got != want {
        return Err(Error::Usage(format!(
            "{url}: its sha256 is {got}, but the adapters were trained on {want}: the base \
             changed since training, and merging into another base would export other weights"
        )));
    }
    Ok(Some((url, bytes)))
}

/// The parameter values of a checkpoint, in [`param_specs`] order: every parameter of a full
/// fine-tune's; a LoRA one's adapters merged into its base (`base`: the base's URL and
/// `model.safetensors`; `None`: the random base `init seed N` made again).
fn checkpoint_values(
    state: &TrainerState,
    tensors: &[lockstep_storage::Tensor],
    base: Option<&(String, Bytes)>,
) -> Result<Vec<Vec<f32>>> {
    let config: &LlamaConfig = &state.model_config;
    let Some(lora) = &state.lora else {
        return read_values(tensors, &param_specs(config));
    };
    let mut values = match base {
        Some((url, bytes)) => crate::model::hf::import(bytes, url, config)?.values,
        None => crate::model::init_values(config, state.seed),
    };
    let adapters = read_values(tensors, &lora.settings.specs(config))?;
    crate::model::lora::merge(&lora.settings, config, &mut values, &adapters);
    Ok(values)
}

/// `specs`' tensors from a checkpoint, as f32 values.
fn read_values(
    tensors: &[lockstep_storage::Tensor],
    specs: &[crate::model::ParamSpec],
) -> Result<Vec<Vec<f32>>> {
    let mut values = Vec::new();
    for spec in specs {
        let t = tensors
            .iter()
            .find(|t| t.name == spec.name)
            .ok_or_else(|| Error::Usage(format!("the checkpoint has no tensor `{}`", spec.name)))?;
        if t.data.len() != spec.numel() * 4 {
            return Err(Error::Usage(format!(
                "checkpoint tensor `{}` holds {} bytes; its shape needs {}",
                spec.name,
                t.data.len(),
                spec.numel() * 4
            )));
        }
        values.push(
            t.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>(),
        );
    }
    Ok(values)
}

/// A LoRA checkpoint as a PEFT adapter directory: `adapter_model.safetensors` (the adapters
/// under PEFT's names) and `adapter_config.json`, naming the base it was trained on.
fn adapter_files(
    state: &TrainerState,
    lora: &crate::checkpoint::LoraState,
    tensors: &[lockstep_storage::Tensor],
    dtype: WeightDtype,
) -> Result<Vec<(String, Bytes)>> {
    let specs = lora.settings.specs(&state.model_config);
    let values = read_values(tensors, &specs)?;
    let st = hf::write_tensors(&specs, &values, dtype)?;
    let base = state
        .provenance
        .get("base_read_from")
        .and_then(|v| v.as_str())
        .map(|u| u.strip_prefix("file://").unwrap_or(u).to_string());
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.settings.r,
        "lora_alpha": lora.settings.alpha,
        "lora_dropout": lora.settings.dropout,
        "target_modules": lora.settings.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let config = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Internal(format!("adapter_config.json: {e}")))?;
    Ok(vec![
        ("adapter_model.safetensors".into(), Bytes::from(st)),
        ("adapter_config.json".into(), Bytes::from(config + "\n")),
    ])
}

/// The model files of a checkpoint: safetensors, config.json, generation_config.json.
fn model_files(
    state: &TrainerState,
    tensors: &[lockstep_storage::Tensor],
    base: Option<&(String, Bytes)>,
    dtype: WeightDtype,
) -> Result<Vec<(String, Bytes)>> {
    let config: &LlamaConfig = &state.model_config;
    let values = checkpoint_values(state, tensors, base)?;
    let st = hf::export(config, &values, dtype)?;
    let cfg = hf::config_json(config, dtype)?;
    let mut generation = serde_json::Map::new();
    generation.insert("_from_model_config".into(), true.into());
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.extra.get(key) {
            generation.insert(key.into(), v.clone());
        }
    }
    let generation = serde_json::to_string_pretty(&generation)
        .map_err(|e| Error::Internal(format!("generation_config.json: {e}")))?;
    Ok(vec![
        ("model.safetensors".into(), Bytes::from(st)),
        ("config.json".into(), Bytes::from(cfg)),
        (
            "generation_config.json".into(),
            Bytes::from(generation + "\n"),
        ),
    ])
}

/// The tokenizer files `base` has (a directory path or URL, or a `latest-export:` lineage).
async fn tokenizer_files(base: &str) -> Result<Vec<(String, Bytes)>> {
    let base = match BaseModel::parse(base) {
        BaseModel::LatestExport(lineage) => match resolve_promoted(&as_url(&lineage)).await? {
            Promoted::Model(dir) => dir,
            Promoted::Adapter { base, .. } => base,
        },
        BaseModel::Dir(dir) => as_url(&dir),
        BaseModel::Init => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for name in TOKENIZER_FILES {
        match objects::read_url(&format!("{base}/{name}")).await {
            Ok(b) => out.push((name.to_string(), b)),
            Err(lockstep_storage::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Exports `req.checkpoint` into `lineage` (opened by the caller from `export.url` and the
/// name; `None`: open it from `to` and the name the checkpoint implies), and promotes it if
/// asked and the gate allows.
pub async fn export(req: &Request, to: &str, lineage: Option<Lineage>) -> Result<Exported> {
    let (url, step) = lockstep_storage::store::split_target(&req.checkpoint)?;
    let store = CheckpointStore::open_existing(url)?;
    let step = match step {
        Some(s) => s,
        None => store
            .latest()
            .await?
            .ok_or_else(|| Error::Usage(format!("{url}: no committed checkpoint to export")))?,
    };
    let ckpt = store.load(step).await?;
    let state: TrainerState =
        serde_json::from_value(ckpt.manifest.trainer_state.clone()).map_err(|e| {
            Error::Usage(format!(
                "{url}@{step}: cannot export: its trainer state is not lockstep's: {e}"
            ))
        })?;
    // An eval loss measured at an earlier step (a run stopped in its last step) does not
    // describe these weights.
    let eval_loss = match state.eval_step {
        Some(at) if at != step => None,
        _ => state.eval_loss,
    };
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| ckpt.manifest.job.clone());
    check_segment("export.name", &name)?;

    // The files, in memory: hashed before anything is written.
    let dtype = req.dtype;
    let tensors = ckpt.tensors;
    // A LoRA checkpoint holds only the adapters: the base they were trained on is read again
    // (and must be that base, byte for byte) and they are merged into it.
    if req.lora == LoraExport::Adapter && state.lora.is_none() {
        return Err(Error::Usage(format!(
            "{url}@{step} is a full fine-tune's checkpoint, not a LoRA one: it has no adapters \
             to export (drop --lora adapter / export.lora)"
        )));
    }
    if let Some(lora) = &state.lora {
        check_lora_state(&state, lora, &tensors)
            .map_err(|why| Error::Usage(format!("{url}@{step}: {why}")))?;
    }
    let base_file = match &state.lora {
        Some(lora) if req.lora == LoraExport::Merge => {
            lora_base(&state, &lora.base, req.base.as_deref()).await?
        }
        _ => None,
    };
    let state2 = state.clone();
    let adapter = req.lora == LoraExport::Adapter;
    let mut files = tokio::task::spawn_blocking(move || match &state2.lora {
        Some(lora) if adapter => adapter_files(&state2, lora, &tensors, dtype),
        _ => model_files(&state2, &tensors, base_file.as_ref(), dtype),
    })
    .await
    .map_err(|e| Error::Internal(format!("export: {e}")))??;
    if let Some(base) = &req.base {
        files.extend(tokenizer_files(base).await?);
    }
    let entries: Vec<FileEntry> = files
        .iter()
        .map(|(n, b)| FileEntry {
            name: n.clone(),
            bytes: b.len() as u64,
            sha256: sha256_hex(b),
        })
        .collect();
    // The default version names the weights: the same weights (a re-run of the night) give
    // the same version, other weights (another job of the same name) another.
    let version = match &req.version {
        Some(v) => v.clone(),
        None => format!(
            "{}-{}-step{step}-{}",
            ckpt.manifest.job,
            utc_date(ckpt.manifest.created_unix_ms),
            &entries[0].sha256[..8]
        ),
    };
    check_version(&version)?;
    let lineage = match lineage {
        Some(l) => l,
        None => Lineage::open(to, &name)?,
    };
    let dir = lineage.root.clone().join(version.as_str());
    let dir_url = format!("{}/{version}", lineage.url);

    // A version finished with these files is not written again (it may still need promoting,
    // or its serving handoff delivering). Looked at before the claim, so that re-exporting a
    // finished version writes nothing, also on a store this exporter may only read.
    let record_path = dir.clone().join(LINEAGE_FILE);
    let same = |existing: Option<Record>| match existing {
        Some(existing) if existing.files == entries => Ok(Some(existing)),
        Some(_) => Err(Error::Usage(format!(
            "{dir_url} already holds a version with other files; choose another version"
        ))),
        None => Ok(None),
    };
    let (record, written) = match same(lineage.read_json::<Record>(&record_path).await?)? {
        Some(existing) => (existing, false),
        None => {
            claim(&lineage, &dir, &dir_url, &entries).await?;
            // Another exporter of the same files may have finished meanwhile.
            match same(lineage.read_json::<Record>(&record_path).await?)? {
                Some(existing) => (existing, false),
                None => {
                    for (n, b) in files {
                        lineage.put(&dir.clone().join(n.as_str()), b).await?;
                    }
                    let record = Record {
                        format: "lockstep-export/1".into(),
                        name,
                        version: version.clone(),
                        job: ckpt.manifest.job.clone(),
                        checkpoint: format!("{}@{step}", store.url()),
                        step,
                        config_hash: ckpt.manifest.config_hash.clone(),
                        dtype: dtype.torch_name().into(),
                        base: req.base.clone(),
                        train_loss: state.loss,
                        eval_loss,
                        created_unix_ms: now_ms(),
                        files: entries.clone(),
                        lineage: req.lineage.clone(),
                        trained_from: state.provenance.clone(),
                    };
                    let json = serde_json::to_vec_pretty(&record)
                        .map_err(|e| Error::Internal(format!("lockstep.json: {e}")))?;
                    // Last: from here on the version exists. Created, never replaced: of
                    // two exports of the same files at once, one writes the record.
                    if lineage.create(&record_path, Bytes::from(json)).await? {
                        (record, true)
                    } else {
                        match same(lineage.read_json::<Record>(&record_path).await?)? {
                            Some(existing) => (existing, false),
                            None => {
                                return Err(Error::Internal(format!(
                                    "{dir_url}: its lockstep.json vanished while it was written"
                                )));
                            }
                        }
                    }
                }
            }
        }
    };

    // A version that was promoted once and has since been replaced is not promoted back by
    // a re-run of its export (that would roll serving back to older weights).
    let replaced_since = if req.promote && !written {
        let was: Option<Decision> = lineage
            .read_json(&dir.clone().join(PROMOTION_FILE))
            .await
            .unwrap_or(None);
        let now = lineage.latest().await.ok().flatten().map(|l| l.version);
        match (was, now) {
            (Some(d), Some(now)) if d.promoted && now != version => Some(now),
            _ => None,
        }
    } else {
        None
    };
    let promotion = match &replaced_since {
        Some(now) => Promotion::Kept {
            reason: format!(
                "it was promoted before and has been replaced by {now}; a re-run does not roll \
                 serving back (export it under a new version to promote these weights again)"
            ),
        },
        None if req.promote => {
            promote(&lineage, &record, &dir_url, req.max_eval_regression).await?
        }
        None => Promotion::NotAsked,
    };
    let promotion = match promotion {
        Promotion::NotAsked if !written => Promotion::AlreadyExported {
            promoted: matches!(lineage.latest().await, Ok(Some(l)) if l.version == version),
        },
        p => p,
    };
    // The record of the version's earlier promotion stays as it was.
    let handed = if replaced_since.is_some() {
        Handed::default()
    } else {
        handoff(&lineage, &record, &dir_url, &promotion, req).await
    };
    Ok(Exported {
        record,
        url: dir_url,
        promotion,
        webhook: handed.webhook,
        notice_sent_by: handed.elsewhere,
        written,
    })
}

/// Claims the version directory for `entries` before any file is written: an export of other
/// weights under the same version, at the same time or later, is refused instead of mixing
/// files.
async fn claim(
    lineage: &Lineage,
    dir: &object_store::path::Path,
    dir_url: &str,
    entries: &[FileEntry],
) -> Result<()> {
    let claim = serde_json::to_vec(entries).map_err(|e| Error::Internal(e.to_string()))?;
    let claim_path = dir.clone().join(CLAIM_FILE);
    match lineage
        .store
        .put_opts(
            &claim_path,
            PutPayload::from(claim),
            object_store::PutOptions {
                mode: object_store::PutMode::Create,
                ..Default::default()
            },
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let theirs: Option<Vec<FileEntry>> = lineage.read_json(&claim_path).await?;
            if theirs.as_deref() == Some(entries) {
                Ok(())
            } else {
                Err(Error::Usage(format!(
                    "{dir_url} is (being) exported with other weights; choose another version \
                     (if no export of it is running and it has no lockstep.json, it is an \
                     abandoned attempt: remove that directory)"
                )))
            }
        }
        Err(e) => Err(store_err("claim", &lineage.display(&claim_path), e)),
    }
}

/// How long a delivery under way keeps other exports of the version from sending the same
/// notice: the webhook's whole deadline and a margin. A sender on this machine whose process
/// is gone gives it up at once.
const SENDING_FOR_MS: u64 = crate::webhook::DEADLINE.as_millis() as u64 + 30_000;

/// Who this export is in a [`Handoff`]: `HOST pid N export K` (K tells apart exports that
/// one process runs at once).
fn sender_id() -> String {
    static EXPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    let k = EXPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{host} pid {} export {k}", std::process::id())
}

/// Whether process `pid` of this machine is running (not gone, not a zombie).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `PID (COMM) STATE …`: COMM may hold anything, the state follows its last `)`.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Who is delivering `h` now, if somebody is (not delivered, claimed within
/// [`SENDING_FOR_MS`], by a process that is not known to be gone).
fn sending(h: &Handoff, me: &str) -> Option<String> {
    let (who, since) = (h.sender.as_ref()?, h.sending_since_unix_ms?);
    let age = now_ms().saturating_sub(since);
    if h.delivered_unix_ms.is_some() || age > SENDING_FOR_MS || who == me {
        return None;
    }
    // A sender on this machine whose process is gone is not sending.
    let (host, rest) = who.rsplit_once(" pid ")?;
    let my_host = me.rsplit_once(" pid ").map(|(h, _)| h);
    let pid = rest.split_whitespace().next().and_then(|p| p.parse().ok());
    if Some(host) == my_host && pid.is_some_and(|p| !running(p)) {
        return None;
    }
    Some(format!("{who}, for {} s", age / 1000))
}

/// The outcome of [`handoff`].
#[derive(Debug, Default)]
struct Handed {
    /// The webhook's delivery, when this export owed one.
    webhook: Option<std::result::Result<u32, String>>,
    /// Another export of the same version delivering it now (who).
    elsewhere: Option<String>,
}

/// Records the promotion decision in the version's `promotion.json` and delivers the serving
/// handoff (the webhook notice) of a promoted version, once: `promotion.json` moves by
/// compare-and-swap, and whoever records the notice as being sent by itself sends it (two
/// exports of one version at once send one notice). It is recorded as delivered (or failed)
/// after, so that an export stopped in between (Ctrl-C, a cancel, a crash) is finished by the
/// next export of the same version, which finds the notice still owed. A notice whose sending
/// cannot be recorded (a read-only store) is not sent: every export would send it again. A
/// version kept by an earlier export keeps that record.
async fn handoff(
    lineage: &Lineage,
    record: &Record,
    dir_url: &str,
    promotion: &Promotion,
    req: &Request,
) -> Handed {
    // What this export decided itself (`None`: promoted by an earlier export).
    let fresh = match promotion {
        Promotion::Promoted { replaced } => Some(Decision {
            promoted: true,
            reason: replaced
                .as_ref()
                .map_or("the first promoted version".into(), |r| {
                    format!("replaced {r}")
                }),
            decided_unix_ms: now_ms(),
            replaced: replaced.clone(),
            handoff: None,
        }),
        Promotion::Kept { reason } => Some(Decision {
            promoted: false,
            reason: reason.clone(),
            decided_unix_ms: now_ms(),
            replaced: None,
            handoff: None,
        }),
        Promotion::AlreadyExported { promoted: true } if req.promote => None,
        _ => return Handed::default(),
    };
    let due = req.webhook.is_some() && fresh.as_ref().is_none_or(|d| d.promoted);
    let failed = |why: String| Handed {
        webhook: due.then_some(Err(why)),
        elsewhere: None,
    };
    let pointer = match lineage.decision(&record.version) {
        Ok(p) => p,
        Err(e) => return failed(format!("not sent: {e}")),
    };
    let at = pointer.url().to_string();
    let me = sender_id();
    let mut claimed = None;
    for _ in 0..16 {
        let (prior, seen) = match pointer.read().await {
            Ok(Some((bytes, seen))) => {
                (serde_json::from_slice::<Decision>(&bytes).ok(), Some(seen))
            }
            Ok(None) => (None, None),
            Err(e) => {
                tracing::warn!(error = %e, at, "cannot read the promotion decision");
                return failed(format!("not sent: cannot read {at}: {e}"));
            }
        };
        let next = match (&fresh, prior) {
            // Kept: the first decision about the version is its record.
            (Some(f), _) if !f.promoted => {
                if seen.is_some() {
                    return Handed::default();
                }
                f.clone()
            }
            // Promoted now, while another export of it already took up its notice.
            (Some(f), Some(p)) if p.promoted && p.handoff.is_some() => Decision {
                handoff: p.handoff,
                ..f.clone()
            },
            (Some(f), _) => f.clone(),
            (None, Some(p)) if p.promoted => p,
            // latest.json names it, whatever was (or was not) recorded.
            (None, _) => Decision {
                promoted: true,
                reason: "promoted by an earlier export".into(),
                decided_unix_ms: now_ms(),
                replaced: None,
                handoff: None,
            },
        };
        let mut next = next;
        if due {
            if !next.owes_handoff() {
                // Delivered already: by an earlier export, or one running alongside.
                if fresh.as_ref().is_none_or(|f| !f.promoted) {
                    return Handed::default();
                }
            } else if let Some(who) = next.handoff.as_ref().and_then(|h| sending(h, &me)) {
                tracing::info!(at, sender = %who, "another export of this version is delivering its notice");
                return Handed {
                    webhook: None,
                    elsewhere: Some(who),
                };
            } else {
                next.handoff = Some(Handoff {
                    delivered_unix_ms: None,
                    error: next.handoff.and_then(|h| h.error),
                    sender: Some(me.clone()),
                    sending_since_unix_ms: Some(now_ms()),
                });
            }
        }
        let bytes = match serde_json::to_vec_pretty(&next) {
            Ok(b) => Bytes::from(b),
            Err(e) => return failed(format!("not sent: promotion.json: {e}")),
        };
        match pointer.swap(seen.as_ref(), bytes).await {
            Ok(lockstep_storage::pointer::Swap::Done) => {
                claimed = Some(next);
                break;
            }
            Ok(lockstep_storage::pointer::Swap::Conflict) => continue,
            Err(e) => {
                tracing::warn!(error = %e, at, "cannot record the promotion decision");
                return failed(format!(
                    "not sent: its delivery cannot be recorded in {at} ({e}), and every \
                     export would send it again"
                ));
            }
        }
    }
    let Some(mut decision) = claimed else {
        return failed(format!(
            "not sent: {at} was moved by other exports 16 times in a row"
        ));
    };
    let Some(url) = req.webhook.as_ref().filter(|_| {
        decision
            .handoff
            .as_ref()
            .is_some_and(|h| h.sender.as_deref() == Some(me.as_str()))
    }) else {
        return Handed::default();
    };
    let notice = serde_json::json!({
        "model": record.name, "version": record.version, "url": dir_url,
        "step": record.step, "train_loss": record.train_loss,
        "eval_loss": record.eval_loss, "job": record.job, "replaced": decision.replaced,
    });
    let delivery = crate::webhook::notify(url, &notice).await;
    decision.handoff = Some(match &delivery {
        Ok(_) => Handoff {
            delivered_unix_ms: Some(now_ms()),
            error: None,
            sender: None,
            sending_since_unix_ms: None,
        },
        Err(e) => Handoff {
            delivered_unix_ms: None,
            error: Some(e.clone()),
            sender: None,
            sending_since_unix_ms: None,
        },
    });
    write_decision(&pointer, &decision).await;
    Handed {
        webhook: Some(delivery),
        elsewhere: None,
    }
}

/// Writes `promotion.json` (by compare-and-swap, as every writer of it does). The decision
/// stands without it (`latest.json` is what serving reads); only the note is lost, and a
/// handoff recorded as owed is delivered again.
async fn write_decision(pointer: &lockstep_storage::pointer::Pointer, d: &Decision) {
    let bytes = match serde_json::to_vec_pretty(d) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the promotion decision");
            return;
        }
    };
    for _ in 0..16 {
        let seen = match pointer.read().await {
            Ok(r) => r.map(|(_, seen)| seen),
            Err(e) => {
                tracing::warn!(error = %e, at = pointer.url(), "cannot record the promotion decision");
                return;
            }
        };
        match pointer.swap(seen.as_ref(), bytes.clone()).await {
            Ok(lockstep_storage::pointer::Swap::Done) => return,
            Ok(lockstep_storage::pointer::Swap::Conflict) => continue,
            Err(e) => {
                tracing::warn!(error = %e, at = pointer.url(), "cannot record the promotion decision");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "19700101");
        assert_eq!(utc_date(1_795_824_000_000), "20261128");
        assert_eq!(utc_date(951_782_400_000), "20000229");
    }

    #[test]
    fn names_are_one_safe_path_segment() {
        for ok in ["quickstart", "nightly-20261128-step300", "v1.2_b"] {
            check_segment("x", ok).unwrap();
        }
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_segment("x", bad).is_err(), "{bad}");
        }
        for reserved in ["latest.json", "LATEST.JSON", ".latest.json.lock", ".hidden"] {
            let e = check_version(reserved).unwrap_err();
            assert!(e.to_string().contains("reserved"), "{e}");
            assert!(e.is_permanent(), "{e}");
        }
        check_version("nightly-2026-12-03").unwrap();
    }
}
