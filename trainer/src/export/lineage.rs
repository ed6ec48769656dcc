//! A lineage (`<export.url>/<name>/`): its versions' records, its promoted version, and the
//! small JSON records in them.

use std::sync::Arc;

use bytes::Bytes;
use lockstep_storage::objects;
use lockstep_storage::pointer::Pointer;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::{LATEST_FILE, LINEAGE_FILE, MAX_RECORD, PROMOTION_FILE, check_segment, store_err};
use crate::error::{Error, Result};

/// Where a lineage lives: `<export.url>/<name>`.
#[derive(Debug, Clone)]
pub struct Lineage {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) root: Path,
    pub(super) url: String,
    pub(super) latest: Pointer,
    /// Opened by URL (so a `file://` pointer swaps under a lock file), not from a store.
    pub(super) by_url: bool,
    /// The lineage's directory, for a `file://` lineage: its records are read without ever
    /// opening a FIFO or following a link planted there.
    pub(super) local: Option<std::path::PathBuf>,
}

impl Lineage {
    /// The lineage `name` under `export_url` (`file://` or `s3://`).
    pub fn open(export_url: &str, name: &str) -> Result<Lineage> {
        check_segment("export.name", name)?;
        let url = format!("{}/{name}", export_url.trim_end_matches('/'));
        let (store, root) = objects::open_url(&url)?;
        let latest = Pointer::open(&format!("{url}/{LATEST_FILE}"))?;
        let local = local_dir(&url)?;
        Ok(Lineage {
            store,
            root,
            url,
            latest,
            by_url: true,
            local,
        })
    }

    /// The lineage at `root` of `store` (tests: a wrapped or in-memory store).
    pub fn with_store(store: Arc<dyn ObjectStore>, root: Path, url: &str) -> Lineage {
        let latest = Pointer::with_store(store.clone(), root.clone().join(LATEST_FILE), url);
        Lineage {
            store,
            root,
            url: url.to_string(),
            latest,
            by_url: false,
            local: None,
        }
    }

    /// `version`'s `promotion.json`, moved by compare-and-swap like `latest.json`: two
    /// exports of one version agree on which of them delivers its serving handoff.
    pub(super) fn decision(&self, version: &str) -> Result<Pointer> {
        let url = format!("{}/{version}/{PROMOTION_FILE}", self.url);
        if self.by_url {
            return Ok(Pointer::open(&url)?);
        }
        let path = self.root.clone().join(version).join(PROMOTION_FILE);
        Ok(Pointer::with_store(self.store.clone(), path, &url))
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(super) async fn put(&self, path: &Path, bytes: Bytes) -> Result<()> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| store_err("write", &self.display(path), e))
    }

    /// Writes `bytes` at `path` unless something is there already; false when it was.
    pub(super) async fn create(&self, path: &Path, bytes: Bytes) -> Result<bool> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_err("write", &self.display(path), e)),
        }
    }

    /// A small JSON record, or `None` when absent.
    pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
    ) -> Result<Option<T>> {
        let at = self.display(path);
        if let Some(root) = &self.local {
            let rel = path
                .as_ref()
                .strip_prefix(self.root.as_ref())
                .unwrap_or(path.as_ref())
                .trim_start_matches('/')
                .to_string();
            let file = root.join(rel);
            let read = tokio::task::spawn_blocking(move || read_local_record(&file))
                .await
                .map_err(|e| Error::Internal(format!("read {at}: {e}")))?;
            let bytes = match read {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::Usage(format!("{at}: {e}"))),
            };
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Usage(format!("{at}: not a lockstep record: {e}")));
        }
        let meta = match self.store.head(path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err("read", &at, e)),
        };
        if meta.size > MAX_RECORD {
            return Err(Error::Usage(format!(
                "{at}: {} bytes, more than a {MAX_RECORD}-byte record can be",
                meta.size
            )));
        }
        let bytes = self
            .store
            .get(path)
            .await
            .map_err(|e| store_err("read", &at, e))?
            .bytes()
            .await
            .map_err(|e| store_err("read", &at, e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Usage(format!("{at}: not a lockstep record: {e}")))
    }

    pub(super) fn display(&self, path: &Path) -> String {
        let rel = path
            .as_ref()
            .strip_prefix(self.root.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        format!("{}/{rel}", self.url)
    }

    /// The promoted version, if any.
    pub async fn latest(&self) -> Result<Option<Latest>> {
        match self.latest.read().await? {
            None => Ok(None),
            Some((bytes, _)) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::Usage(format!(
                    "{}: not a lockstep latest.json: {e}",
                    self.latest.url()
                ))
            }),
        }
    }

    /// Every finished version (those with a `lockstep.json`), oldest first by creation time,
    /// with its promotion decision.
    pub async fn versions(&self) -> Result<Vec<(Record, Option<Decision>)>> {
        Ok(self.scan().await?.versions)
    }

    /// Every finished version (as [`Lineage::versions`]), and every version directory whose
    /// `lockstep.json` cannot be read, with why.
    pub(super) async fn scan(&self) -> Result<Scan> {
        use futures::TryStreamExt;
        let listed: Vec<_> = self
            .store
            .list(Some(&self.root))
            .try_collect()
            .await
            .map_err(|e| store_err("list", &self.url, e))?;
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        let empty = listed.is_empty();
        for meta in listed {
            // Only `<root>/<version>/lockstep.json`; the directory names the version.
            let rel = meta
                .location
                .as_ref()
                .strip_prefix(self.root.as_ref())
                .unwrap_or("")
                .trim_start_matches('/')
                .to_string();
            let Some((dir, file)) = rel.split_once('/') else {
                continue;
            };
            if file
                .strip_prefix(LINEAGE_FILE)
                .is_some_and(|r| r.starts_with('/'))
                && !damaged.iter().any(|d: &Damaged| d.version == dir)
            {
                damaged.push(Damaged {
                    version: dir.to_string(),
                    why: format!("its {LINEAGE_FILE} is a directory, not a record"),
                });
                continue;
            }
            if file != LINEAGE_FILE {
                continue;
            }
            // One damaged record does not hide the others.
            let record = match self.read_json::<Record>(&meta.location).await {
                Ok(Some(r)) if r.version == dir => r,
                Ok(Some(r)) => {
                    damaged.push(Damaged {
                        version: dir.to_string(),
                        why: format!("its lockstep.json names version `{}`", r.version),
                    });
                    continue;
                }
                Ok(None) => continue,
                Err(e) => {
                    damaged.push(Damaged {
                        version: dir.to_string(),
                        why: e.to_string(),
                    });
                    continue;
                }
            };
            let decision = self
                .read_json::<Decision>(
                    &self
                        .root
                        .clone()
                        .join(record.version.as_str())
                        .join(PROMOTION_FILE),
                )
                .await
                .unwrap_or(None);
            out.push((record, decision));
        }
        out.sort_by(|a, b| {
            (a.0.created_unix_ms, &a.0.version).cmp(&(b.0.created_unix_ms, &b.0.version))
        });
        if let Some(root) = self.local.clone() {
            let odd = tokio::task::spawn_blocking(move || odd_records(&root))
                .await
                .unwrap_or_default();
            for d in odd {
                if !damaged.iter().any(|x| x.version == d.version) {
                    damaged.push(d);
                }
            }
        }
        Ok(Scan {
            versions: out,
            damaged,
            empty,
        })
    }
}

/// A `file://` URL's directory (`None` for other stores).
pub(super) fn local_dir(url: &str) -> Result<Option<std::path::PathBuf>> {
    Ok(match lockstep_storage::Location::parse(url)? {
        lockstep_storage::Location::File(p) => Some(p),
        _ => None,
    })
}

/// A record file of a local lineage: `None` when absent; a link, FIFO, directory or a file
/// over [`MAX_RECORD`] is an error saying what it is (never opened, never followed).
fn read_local_record(file: &std::path::Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match lockstep_storage::files::open_regular(
        file,
        std::fs::OpenOptions::new().read(true),
        false,
    ) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.take(MAX_RECORD + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(std::io::Error::other(format!(
            "more than a {MAX_RECORD}-byte record can be"
        )));
    }
    Ok(Some(bytes))
}

/// Version directories of a local lineage whose `lockstep.json` is there but is not a regular
/// file (a directory, a FIFO, a link), with what it is: a listing of objects does not show
/// them, and they must not vanish from `export ls`.
fn odd_records(root: &std::path::Path) -> Vec<Damaged> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(e.path().join(LINEAGE_FILE)) else {
            continue;
        };
        let t = m.file_type();
        let what = if t.is_file() {
            continue;
        } else if t.is_dir() {
            "a directory"
        } else if t.is_symlink() {
            "a symbolic link"
        } else if t.is_fifo() {
            "a FIFO"
        } else {
            "not a regular file"
        };
        out.push(Damaged {
            version: e.file_name().to_string_lossy().into_owned(),
            why: format!("its {LINEAGE_FILE} is {what}, not a record"),
        });
    }
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}

/// What [`Lineage::scan`] found.
pub(super) struct Scan {
    pub versions: Vec<(Record, Option<Decision>)>,
    pub damaged: Vec<Damaged>,
    /// Nothing at all is stored under the lineage (a mistyped name, most likely).
    pub empty: bool,
}

/// A version directory that is not a usable version.
#[derive(Debug, Clone, PartialEq)]
pub struct Damaged {
    /// The directory's name (or `latest.json`).
    pub version: String,
    /// What is wrong.
    pub why: String,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name in the version directory.
    pub name: String,
    /// Bytes.
    pub bytes: u64,
    /// Hex sha256 of its bytes.
    pub sha256: String,
}

/// `lockstep.json`: a finished version's lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `lockstep-export/1`.
    pub format: String,
    /// The lineage.
    pub name: String,
    /// This version.
    pub version: String,
    /// The job that trained it.
    pub job: String,
    /// The checkpoint it was exported from (`URL@STEP`).
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// The checkpoint's config hash.
    pub config_hash: String,
    /// Weight dtype in `model.safetensors`.
    pub dtype: String,
    /// The base model the tokenizer files came from, if any.
    pub base: Option<String>,
    /// Loss of the checkpoint's last step.
    pub train_loss: Option<f64>,
    /// Its held-out loss.
    pub eval_loss: Option<f64>,
    /// When the export finished (Unix milliseconds).
    pub created_unix_ms: u64,
    /// Every other file of the version.
    pub files: Vec<FileEntry>,
    /// Facts the caller knows and the checkpoint does not (attempts, data, base hash, …).
    #[serde(default)]
    pub lineage: serde_json::Value,
    /// What the training run started from and read: the base model (and its safetensors'
    /// sha256) and the records per training and held-out file.
    #[serde(default)]
    pub trained_from: serde_json::Value,
}

/// `latest.json`: the promoted version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    /// The version.
    pub version: String,
    /// Its directory's URL.
    pub url: String,
    /// Its step.
    pub step: u64,
    /// Its losses.
    pub train_loss: Option<f64>,
    /// Its held-out loss.
    pub eval_loss: Option<f64>,
    /// When it was promoted (Unix milliseconds).
    pub promoted_unix_ms: u64,
}

/// `promotion.json`: what was decided for a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether it became `latest.json`.
    pub promoted: bool,
    /// Why not, or what it replaced.
    pub reason: String,
    /// When (Unix milliseconds).
    pub decided_unix_ms: u64,
    /// The version it replaced, when promoted (absent in records of older exports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
    /// The serving handoff (the webhook notice) of a promoted version, when one was due:
    /// written as pending before the notice is sent and as delivered (or failed) after, so an
    /// export cut off in between is finished by the next export of the same version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
}

/// The webhook notice of a promoted version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handoff {
    /// When the webhook accepted it (Unix milliseconds); `None`: not delivered (yet).
    pub delivered_unix_ms: Option<u64>,
    /// Why the last delivery failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who is delivering it (`HOST pid N`) while a delivery is under way: another export of
    /// the same version leaves it to them instead of sending it twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// Since when (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending_since_unix_ms: Option<u64>,
}

impl Decision {
    /// Whether a webhook notice of this promoted version is still owed.
    pub fn owes_handoff(&self) -> bool {
        self.promoted
            && self
                .handoff
                .as_ref()
                .is_none_or(|h| h.delivered_unix_ms.is_none())
    }
}
