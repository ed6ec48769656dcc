//! Reading arbitrary objects by URL (`file://PATH`, `s3://BUCKET/KEY`): training data files and
//! base models. Globs (`*` within one path segment, `**` across segments, `?` one character)
//! expand to the matching objects in sorted order.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::{Error, Location, Result};

/// An object store and the path of one object (or prefix) in it.
pub fn open_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let bad = |reason: String| Error::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    match Location::parse(url)? {
        Location::File(path) => {
            let p = Path::from_absolute_path(&path).map_err(|e| bad(e.to_string()))?;
            Ok((Arc::new(object_store::local::LocalFileSystem::new()), p))
        }
        Location::S3 { bucket, prefix } => {
            let s3 = crate::location::s3_from_env(&bucket).map_err(|e| bad(e.to_string()))?;
            Ok((Arc::new(s3), Path::from(prefix)))
        }
        Location::Memory => Err(bad("memory:// holds checkpoints only".into())),
    }
}

/// The whole object at `url`.
pub async fn read_url(url: &str) -> Result<Bytes> {
    refuse_special(url).await?;
    let (store, path) = open_url(url)?;
    let err = |source: object_store::Error| match source {
        object_store::Error::NotFound { .. } => Error::NotFound {
            path: url.to_string(),
        },
        source => Error::Store {
            op: "read",
            path: url.to_string(),
            source,
        },
    };
    let got = store.get(&path).await.map_err(err)?;
    got.bytes().await.map_err(err)
}

/// A local path that is there but is not a regular file (a FIFO, socket, device or
/// directory) is refused before anything opens it: object_store's local store opens files to
/// look at them, and a FIFO would hang that open, a device never end the read.
async fn refuse_special(url: &str) -> Result<()> {
    let Ok(Location::File(local)) = Location::parse(url) else {
        return Ok(());
    };
    let kind =
        tokio::task::spawn_blocking(move || std::fs::metadata(local).map(|m| m.file_type())).await;
    if let Ok(Ok(t)) = kind
        && !t.is_file()
    {
        let what = crate::files::describe(t);
        return Err(Error::NotAFile {
            path: url.to_string(),
            what,
        });
    }
    Ok(())
}

/// One object, as it was when [`head_url`] looked: its size and a version tag (ETag, else
/// modification time) that changes when it is rewritten.
#[derive(Debug, Clone)]
pub struct Object {
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// Its URL.
    pub url: String,
    /// Bytes.
    pub size: u64,
    /// ETag (or modification time; for a local file also its status-change time, which
    /// every write moves): different after the object is rewritten.
    pub version: String,
    e_tag: Option<String>,
}

/// Looks `url` up without reading it.
pub async fn head_url(url: &str) -> Result<Object> {
    refuse_special(url).await?;
    let (store, path) = open_url(url)?;
    let meta = store.head(&path).await.map_err(|source| match source {
        object_store::Error::NotFound { .. } => Error::NotFound {
            path: url.to_string(),
        },
        source => Error::Store {
            op: "check",
            path: url.to_string(),
            source,
        },
    })?;
    let mut version = meta
        .e_tag
        .clone()
        .unwrap_or_else(|| meta.last_modified.timestamp_micros().to_string());
    // A local file's tag is its inode, size and modification time, which an in-place rewrite
    // can keep (`cp -p`, `rsync --inplace -t`, `touch -d`); its status-change time it cannot.
    if let Ok(Location::File(local)) = Location::parse(url) {
        let ctime = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(local).map(|m| (m.ctime(), m.ctime_nsec()))
        })
        .await;
        if let Ok(Ok((secs, nanos))) = ctime {
            version.push_str(&format!("-c{secs}.{nanos:09}"));
        }
    }
    Ok(Object {
        store,
        path,
        url: url.to_string(),
        size: meta.size,
        version,
        e_tag: meta.e_tag,
    })
}

impl Object {
    /// Bytes `range` of the object (one request; retried by the store's client). An object
    /// rewritten since [`head_url`] looked is an error, not a mix of two versions.
    pub async fn read_range(&self, range: std::ops::Range<u64>) -> Result<Bytes> {
        let options = object_store::GetOptions {
            range: Some(range.into()),
            if_match: self.e_tag.clone(),
            ..Default::default()
        };
        let got = async {
            self.store
                .get_opts(&self.path, options)
                .await?
                .bytes()
                .await
        };
        got.await.map_err(|source| match source {
            object_store::Error::NotFound { .. } => Error::NotFound {
                path: self.url.clone(),
            },
            object_store::Error::Precondition { .. } => Error::Invalid(format!(
                "{}: the object changed while it was being read",
                self.url
            )),
            source => Error::Store {
                op: "read",
                path: self.url.clone(),
                source,
            },
        })
    }
}

/// Whether the object at `url` exists (`Ok(false)` only for a definite "not found").
pub async fn exists(url: &str) -> Result<bool> {
    refuse_special(url).await?;
    let (store, path) = open_url(url)?;
    match store.head(&path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(source) => Err(Error::Store {
            op: "check",
            path: url.to_string(),
            source,
        }),
    }
}

/// True when `url` contains glob characters.
pub fn is_glob(url: &str) -> bool {
    url.contains(['*', '?', '['])
}

/// The URLs of the objects `url` matches: itself when it has no glob characters, else every
/// object under the glob's fixed prefix whose key matches, sorted. A glob that matches nothing
/// is an error.
pub async fn expand(url: &str) -> Result<Vec<String>> {
    if !is_glob(url) {
        return Ok(vec![url.to_string()]);
    }
    let first = url.find(['*', '?', '[']).unwrap_or(url.len());
    let cut = url[..first].rfind('/').unwrap_or(0);
    let (base, pattern) = url.split_at(cut + 1);
    let (store, prefix) = open_url(base.trim_end_matches('/'))?;
    let listed: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| Error::Store {
            op: "list",
            path: base.to_string(),
            source,
        })?;
    let mut out: Vec<String> = listed
        .into_iter()
        .filter_map(|meta| {
            let key = meta.location.as_ref();
            let rel = key
                .strip_prefix(prefix.as_ref())
                .unwrap_or(key)
                .trim_start_matches('/');
            glob_match(pattern, rel).then(|| format!("{base}{rel}"))
        })
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::Invalid(format!("{url}: the glob matches no object")));
    }
    Ok(out)
}

/// Matches `text` against `pattern`: `*` any run within a segment, `**` any run, `?` one
/// character other than `/`, `[abc]` one of the listed characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') if p.get(1) == Some(&'*') => {
                let rest = &p[2..];
                // `**/` also matches zero segments.
                if let Some(after) = rest.strip_prefix(&['/'])
                    && go(after, t)
                {
                    return true;
                }
                (0..=t.len()).any(|i| go(rest, &t[i..]))
            }
            Some('*') => (0..=t.len())
                .take_while(|&i| i == 0 || t[i - 1] != '/')
                .any(|i| go(&p[1..], &t[i..])),
            Some('?') => !t.is_empty() && t[0] != '/' && go(&p[1..], &t[1..]),
            Some('[') => match p.iter().position(|&c| c == ']') {
                Some(end) if !t.is_empty() => {
                    p[1..end].contains(&t[0]) && go(&p[end + 1..], &t[1..])
                }
                _ => false,
            },
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("*.jsonl", "a.jsonl"));
        assert!(!glob_match("*.jsonl", "d/a.jsonl"));
        assert!(glob_match("**/*.jsonl", "d/e/a.jsonl"));
        assert!(glob_match("**/*.jsonl", "a.jsonl"));
        assert!(glob_match("d/**", "d/e/a.jsonl"));
        assert!(glob_match("part-??.json[lx]", "part-07.jsonl"));
        assert!(!glob_match("part-??.jsonl", "part-7.jsonl"));
        assert!(!glob_match("a*", "b"));
    }

    #[tokio::test]
    async fn expands_file_globs_sorted_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jsonl", "a.jsonl", "c.txt", "sub/d.jsonl"] {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, name).unwrap();
        }
        let base = format!("file://{}", dir.path().display());
        let got = expand(&format!("{base}/*.jsonl")).await.unwrap();
        assert_eq!(
            got,
            vec![format!("{base}/a.jsonl"), format!("{base}/b.jsonl")]
        );
        let all = expand(&format!("{base}/**/*.jsonl")).await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(&read_url(&got[1]).await.unwrap()[..], b"b.jsonl");
        assert!(expand(&format!("{base}/*.csv")).await.is_err());
        let e = read_url(&format!("{base}/missing.jsonl"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("missing.jsonl"), "{e}");
    }
}
