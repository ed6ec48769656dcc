//! What a run reads before it trains: the base model (a Hugging Face directory or URL, or
//! random initialisation), its tokenizer, and the training data.

use lockstep_api::JobConfig;
use lockstep_api::base::{BaseModel, as_url};
use lockstep_storage::objects;

use crate::error::{Error, Result};
use crate::export::Promoted;
use crate::model::{LlamaConfig, hf};
use crate::tokenizer::Tokenizer;
use crate::tokens::{self, Encoding, TokenStore, Watch};

/// `base` as a URL: URLs pass through, bare paths become `file://` URLs.
/// The model a run starts from.
pub struct Base {
    /// Its architecture and HF config.
    pub config: LlamaConfig,
    /// Its weights, in parameter order; `None`: initialise randomly.
    pub values: Option<Vec<Vec<f32>>>,
    /// Its tokenizer (bytes when it has none).
    pub tokenizer: Tokenizer,
    /// Where it was read from and the sha256 of its model.safetensors (`None` for `init`).
    pub origin: Option<(String, String)>,
    /// LoRA adapters to start from instead of fresh ones (a promoted adapter export, on the
    /// base it was trained on), in [`crate::model::LoraSettings::specs`] order.
    pub adapters: Option<Vec<Vec<f32>>>,
}

/// Loads `model.base` (or describes a random initialisation), checking that the tokenizer fits
/// the vocabulary.
pub fn load_base(config: &JobConfig, rt: &tokio::runtime::Runtime) -> Result<Base> {
    let base = match &config.model.base {
        BaseModel::Init => Base {
            config: LlamaConfig::from_section(&config.model, config.data.seq_len as usize),
            values: None,
            tokenizer: Tokenizer::Bytes,
            origin: None,
            adapters: None,
        },
        BaseModel::LatestExport(lineage) => {
            // Last night's promoted model (or adapter), checked against its lockstep.json.
            match rt.block_on(crate::export::resolve_promoted(&as_url(lineage)))? {
                Promoted::Model(dir) => {
                    tracing::info!(version = %dir, "starting from the promoted export");
                    load_hf(&dir, rt)?
                }
                Promoted::Adapter {
                    dir,
                    base,
                    base_sha256,
                } => {
                    tracing::info!(version = %dir, base = %base, "starting from the promoted adapter on its base");
                    load_adapter(config, &dir, &base, &base_sha256, rt)?
                }
            }
        }
        BaseModel::Dir(dir) => load_hf(&as_url(dir), rt)?,
    };
    if base.tokenizer.vocab_size() > base.config.vocab_size {
        return Err(Error::Model {
            file: config.model.base.to_string(),
            reason: format!(
                "the tokenizer has {} ids but the model's vocabulary is {}",
                base.tokenizer.vocab_size(),
                base.config.vocab_size
            ),
        });
    }
    Ok(base)
}

/// A Hugging Face directory: config.json, model.safetensors and, if present, tokenizer.json.
fn load_hf(base: &str, rt: &tokio::runtime::Runtime) -> Result<Base> {
    let read = |name: &str| rt.block_on(objects::read_url(&format!("{base}/{name}")));
    let file = format!("{base}/config.json");
    let text = match read("config.json") {
        Err(lockstep_storage::Error::NotFound { .. }) if read("adapter_config.json").is_ok() => {
            return Err(Error::Model {
                file: base.to_string(),
                reason: "a PEFT adapter directory, not a model: train on its base (with [lora]), \
                         or promote the adapter and set model.base = \"latest-export:LINEAGE\""
                    .into(),
            });
        }
        r => r?,
    };
    let text = std::str::from_utf8(&text).map_err(|_| Error::Model {
        file: file.clone(),
        reason: "not UTF-8".into(),
    })?;
    let llama = LlamaConfig::parse(text, &file)?;
    let file = format!("{base}/model.safetensors");
    let st = read("model.safetensors")?;
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&st)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let weights = hf::import(&st, &file, &llama)?;
    drop(st);
    let tokenizer = hf_tokenizer(base, &llama, rt)?;
    Ok(Base {
        config: llama,
        values: Some(weights.values),
        tokenizer,
        origin: Some((base.to_string(), sha)),
        adapters: None,
    })
}

/// A promoted LoRA adapter (`dir`) on the base it was trained on (`base`, whose
/// model.safetensors must still have sha256 `base_sha256`), for a job whose `[lora]` has the
/// adapter's rank, alpha and targets.
fn load_adapter(
    config: &JobConfig,
    dir: &str,
    base: &str,
    base_sha256: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<Base> {
    let record = format!("{dir}/lockstep.json");
    let refuse = |file: &str, reason: String| Error::Model {
        file: file.to_string(),
        reason,
    };
    let Some(section) = &config.lora else {
        return Err(refuse(
            &record,
            "the promoted version is a LoRA adapter: a job starting from it needs the [lora] it \
             was trained with"
                .into(),
        ));
    };
    let mut loaded = load_hf(base, rt)?;
    if let Some((_, sha)) = &loaded.origin
        && sha != base_sha256
    {
        return Err(refuse(
            &format!("{base}/model.safetensors"),
            format!(
                "its sha256 is {sha}, but the promoted adapter was trained on {base_sha256}: the \
                 base changed since, and the adapter does not fit another base"
            ),
        ));
    }
    let settings = crate::model::LoraSettings::from_section(section);
    let file = format!("{dir}/adapter_config.json");
    let text = rt.block_on(objects::read_url(&file))?;
    let adapter: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| refuse(&file, format!("not an adapter config: {e}")))?;
    let mut targets: Vec<String> = adapter["target_modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    targets.sort();
    let mut want = settings.targets.clone();
    want.sort();
    let same = adapter["r"].as_u64() == Some(settings.r as u64)
        && adapter["lora_alpha"].as_f64() == Some(settings.alpha)
        && targets == want;
    if !same {
        return Err(refuse(
            &file,
            format!(
                "the promoted adapter is r = {}, alpha = {}, target_modules = {:?}; this job's \
                 [lora] is r = {}, alpha = {}, {:?}: they must be the same to train on from it",
                adapter["r"], adapter["lora_alpha"], targets, settings.r, settings.alpha, want
            ),
        ));
    }
    let file = format!("{dir}/adapter_model.safetensors");
    let bytes = rt.block_on(objects::read_url(&file))?;
    let values = hf::import_tensors(&bytes, &file, &settings.specs(&loaded.config))?;
    loaded.adapters = Some(values);
    Ok(loaded)
}

/// The tokenizer a run of `config` encodes its data with, and the model's vocabulary, without
/// reading the base model's weights (`lockstep data preview`).
pub fn load_tokenizer(
    config: &JobConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<(Tokenizer, usize)> {
    let base = match &config.model.base {
        BaseModel::Init => return Ok((Tokenizer::Bytes, config.model.vocab_size as usize)),
        BaseModel::LatestExport(lineage) => {
            match rt.block_on(crate::export::resolve_promoted(&as_url(lineage)))? {
                Promoted::Model(dir) => dir,
                // An adapter's tokenizer is its base's.
                Promoted::Adapter { base, .. } => base,
            }
        }
        BaseModel::Dir(dir) => as_url(dir),
    };
    let file = format!("{base}/config.json");
    let text = rt.block_on(objects::read_url(&file))?;
    let text = std::str::from_utf8(&text).map_err(|_| Error::Model {
        file: file.clone(),
        reason: "not UTF-8".into(),
    })?;
    let llama = LlamaConfig::parse(text, &file)?;
    let tokenizer = hf_tokenizer(&base, &llama, rt)?;
    Ok((tokenizer, llama.vocab_size))
}

/// The tokenizer of the Hugging Face directory `base` (bytes when it has no tokenizer.json).
fn hf_tokenizer(
    base: &str,
    llama: &LlamaConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<Tokenizer> {
    let read = |name: &str| rt.block_on(objects::read_url(&format!("{base}/{name}")));
    Ok(match read("tokenizer.json") {
        Ok(bytes) => {
            let eos = llama
                .extra
                .get("eos_token_id")
                .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
                .map(|v| v as u32);
            let tokenizer = Tokenizer::from_json(&bytes, &format!("{base}/tokenizer.json"), eos)?;
            // Its chat template, for chat records (`messages`).
            let file = format!("{base}/tokenizer_config.json");
            let chat = match read("tokenizer_config.json") {
                Ok(b) => crate::chat::ChatTemplate::from_config(&b, &file)?,
                Err(lockstep_storage::Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            tokenizer.with_chat(chat)
        }
        Err(lockstep_storage::Error::NotFound { .. }) => {
            tracing::warn!(
                base = %base,
                "the base model has no tokenizer.json: tokenising as bytes (ids 0-255), which \
                 only suits a byte-level model"
            );
            Tokenizer::Bytes
        }
        Err(e) => return Err(e.into()),
    })
}

/// The token store of the JSONL files `urls` (`data.train` or `data.eval`) in `cache` (built
/// by the first rank of this machine to get there, reused by the others and by later runs on
/// the same data).
pub fn load_tokens(
    config: &JobConfig,
    urls: &[String],
    cache: &std::path::Path,
    tokenizer: &Tokenizer,
    vocab: usize,
    rt: &tokio::runtime::Runtime,
    watch: &mut Watch<'_>,
) -> Result<TokenStore> {
    let enc = Encoding {
        tokenizer,
        vocab,
        skip_bad: config.data.skip_bad_records,
        columns: config.data.columns.clone(),
    };
    tokens::prepare(cache, urls, &enc, rt, watch)
}
