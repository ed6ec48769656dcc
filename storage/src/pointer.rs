//! A small object that names something else (an export lineage's `latest.json`), moved only by
//! compare-and-swap: a writer says which version it read, and the swap fails if anyone moved
//! the pointer since. On S3 and in memory that is object_store's conditional put (`If-Match` /
//! `If-None-Match`); on a `file://` path, where object_store has no conditional update, an
//! exclusive lock on a sibling `.lock` file around read-compare-rename (also on NFS with
//! working `flock`).

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::{Error, Location, Result};

/// What a reader saw: the version a swap must still find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    e_tag: Option<String>,
    version: Option<String>,
}

/// How a swap ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// The pointer now holds the new bytes.
    Done,
    /// Someone moved (or created) it since it was read; nothing was written.
    Conflict,
}

/// A pointer object.
#[derive(Debug, Clone)]
pub struct Pointer {
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: String,
    /// The file, for `file://` pointers (swapped under a lock; object_store cannot).
    local: Option<PathBuf>,
}

impl Pointer {
    /// The pointer at `url` (`file://` or `s3://`).
    pub fn open(url: &str) -> Result<Pointer> {
        let local = match Location::parse(url)? {
            Location::File(p) => Some(p),
            _ => None,
        };
        let (store, path) = crate::objects::open_url(url)?;
        Ok(Pointer {
            store,
            path,
            url: url.to_string(),
            local,
        })
    }

    /// The pointer at `path` of `store` (tests: a wrapped or in-memory store).
    pub fn with_store(store: Arc<dyn ObjectStore>, path: Path, url: &str) -> Pointer {
        Pointer {
            store,
            path,
            url: url.to_string(),
            local: None,
        }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its bytes and version, or `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<(Bytes, Seen)>> {
        if let Some(file) = self.local.clone() {
            return tokio::task::spawn_blocking(move || match read_local(&file) {
                Ok(b) => {
                    let seen = Seen {
                        e_tag: Some(content_tag(&b)),
                        version: None,
                    };
                    Ok(Some((Bytes::from(b), seen)))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Io {
                    op: "read",
                    path: file,
                    source,
                }),
            })
            .await
            .map_err(|e| Error::Invalid(format!("{}: {e}", self.url)))?;
        }
        let got = match self.store.get(&self.path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::store("read", self.url.clone(), e)),
        };
        let seen = Seen {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got
            .bytes()
            .await
            .map_err(|e| Error::store("read", self.url.clone(), e))?;
        Ok(Some((bytes, seen)))
    }

    /// Writes `bytes` if the pointer is still as `expected` saw it (`None`: still absent).
    pub async fn swap(&self, expected: Option<&Seen>, bytes: Bytes) -> Result<Swap> {
        if let Some(file) = self.local.clone() {
            let expected = expected.cloned();
            return tokio::task::spawn_blocking(move || swap_file(&file, expected, &bytes))
                .await
                .map_err(|e| Error::Invalid(format!("{}: {e}", self.url)))?;
        }
        let mode = match expected {
            None => PutMode::Create,
            Some(seen) => PutMode::Update(UpdateVersion {
                e_tag: seen.e_tag.clone(),
                version: seen.version.clone(),
            }),
        };
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(Swap::Done),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Swap::Conflict),
            Err(e) => Err(Error::store("swap", self.url.clone(), e)),
        }
    }
}

/// The largest pointer read.
pub const MAX_POINTER_BYTES: u64 = 1 << 20;

/// A local pointer's bytes: a regular file (not a FIFO or device) of at most
/// [`MAX_POINTER_BYTES`].
/// Opens `path` without following a symbolic link (one there is an error, never someone
/// else's file written through) and without blocking on a FIFO.
fn open_plain(
    path: &std::path::Path,
    opts: &mut std::fs::OpenOptions,
) -> std::io::Result<std::fs::File> {
    crate::files::open_regular(path, opts, false)
}

fn read_local(file: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = open_plain(file, std::fs::OpenOptions::new().read(true))?;
    let m = f.metadata()?;
    if !m.is_file() || m.len() > MAX_POINTER_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not what lockstep keeps there (a latest.json, or a checkpoint directory's \
                 lease.json): a regular file of at most {MAX_POINTER_BYTES} bytes is \
                 expected; move it aside"
            ),
        ));
    }
    let mut out = Vec::new();
    f.take(MAX_POINTER_BYTES).read_to_end(&mut out)?;
    Ok(out)
}

/// A local file's version: a hash of its bytes.
fn content_tag(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// The `file://` swap: under an exclusive lock on `FILE.lock`, compare, then write a temporary
/// file, sync it, rename it over the pointer and sync the directory.
fn swap_file(file: &std::path::Path, expected: Option<Seen>, bytes: &[u8]) -> Result<Swap> {
    use std::io::Write;
    let io = |source| Error::Io {
        op: "swap",
        path: file.to_path_buf(),
        source,
    };
    let dir = file
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{}: no parent directory", file.display())))?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path = dir.join(format!(".{name}.lock"));
    let lock = open_plain(
        &lock_path,
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
    )
    .map_err(|source| Error::Io {
        op: "lock",
        path: lock_path.clone(),
        source,
    })?;
    lock.lock().map_err(io)?;
    let now = match read_local(file) {
        Ok(b) => Some(content_tag(&b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    if now != expected.and_then(|s| s.e_tag) {
        return Ok(Swap::Conflict);
    }
    // A fresh name, created new: nothing planted there can be written through.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(".{name}.{}.{nonce:x}.tmp", std::process::id()));
    let mut f = open_plain(
        &tmp,
        std::fs::OpenOptions::new().write(true).create_new(true),
    )
    .map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(Swap::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_one_of_two_racing_writers_wins_in_memory_and_on_disk() {
        let mem = Pointer::with_store(
            Arc::new(object_store::memory::InMemory::new()),
            Path::from("m/latest.json"),
            "memory://m/latest.json",
        );
        crate::conformance::pointer_swaps(&mem).await;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/m/latest.json", dir.path().display());
        crate::conformance::pointer_swaps(&Pointer::open(&url).unwrap()).await;
    }
}
