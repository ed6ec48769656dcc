//! The token store: a job's training data tokenised once per machine into a private cache
//! directory and read back window by window with positioned reads. A rank's memory does not
//! grow with the tokens (it holds 16 bytes per document, and 12 more for an epoch's order), the JSONL files
//! are streamed in 8 MiB ranges rather than read whole, and the ranks of a machine share one
//! copy: the first to arrive builds it while the others wait on its lock, then all read it.
//!
//! `<cache>/<key>/` holds (key: a hash of the format, the tokenizer, the vocabulary, the
//! bad-record policy and every source's URL, size and version, so changed data or a changed
//! tokenizer is tokenised again):
//! - `tokens.bin`: every document's token ids back to back, little-endian, 2 bytes each when
//!   the vocabulary fits in 16 bits and 4 otherwise;
//! - `docs.bin`: per document, its token count and prompt length (little-endian u32 each; the
//!   prompt length's top bit says the next document is the rest of the same record, a chat's
//!   next assistant turn, and shuffles with it);
//! - `meta.json`: the counts, the width and the xxh3 of both files.
//!
//! A store is built in `<key>.partial/`, synced, and renamed into place while `<key>.lock` is
//! held exclusively, so a crash never leaves a half-built store that looks finished; users of
//! a store hold that lock shared (and check the store side by side), so it is never swept or
//! rebuilt under them. The cache directory must be the user's own and writable by nobody else. The cache is input
//! like any other file: on every open both files are checked against `meta.json` (sizes,
//! hashes, token counts, every id inside the vocabulary), and a store that fails is rebuilt.
//! Stores unused for [`UNUSED_FOR`] are removed by the next build in the same cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lockstep_storage::objects::{self, Object};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

mod build;
mod parquet;
pub mod record;
mod store;

use build::build;
pub use build::{Builder, Lines};
pub use record::encode_record;
pub use store::{FileCount, TokenStore, open};

/// Bumped when the files' layout changes (old stores are then never opened, only swept).
pub(crate) const FORMAT: u32 = 3;
/// Bytes of a JSONL file fetched per request.
pub(crate) const RANGE: u64 = 8 << 20;
/// The longest JSONL record accepted (a line without a newline is not read without end).
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// A store nobody opened for this long is removed by the next build in its cache.
pub const UNUSED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a long tokenisation says how far it got.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(5);
/// The longest a process waits to build a store others hold.
const LOCK_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// The cache of a run that names none: `$XDG_CACHE_HOME/lockstep/tokens`, else
/// `$HOME/.cache/lockstep/tokens`.
pub fn default_cache() -> Result<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|c| c.join("lockstep").join("tokens"))
        .ok_or_else(|| {
            Error::Usage(
                "no place for the tokenised data: set --data-cache (or LOCKSTEP_DATA_CACHE, \
                 XDG_CACHE_HOME or HOME)"
                    .into(),
            )
        })
}

/// How records become tokens.
pub struct Encoding<'a> {
    /// The tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's vocabulary: every id must be below it.
    pub vocab: usize,
    /// Leave bad records out (counting them) instead of failing.
    pub skip_bad: bool,
    /// Parquet: the column each record field is read from (`[data.columns]`).
    pub columns: std::collections::BTreeMap<String, String>,
}

impl Encoding<'_> {
    fn width(&self) -> u8 {
        if self.vocab <= 1 << 16 { 2 } else { 4 }
    }
}

/// Who is preparing a store, what stops them, and where they say what they are doing.
pub struct Watch<'a> {
    /// Who this is, for others waiting on its build (`job NAME`).
    pub who: String,
    /// Set when the run is to stop (a signal, the coordinator's cancel): tokenising and
    /// waiting end with [`Error::Stopped`] and leave nothing half-built behind.
    pub stop: Option<&'a AtomicBool>,
    /// Told what is going on while it takes long (tokenising progress, waiting for another
    /// process's build), so that a run never looks hung.
    pub note: &'a mut dyn FnMut(String),
}

impl Watch<'_> {
    fn stopped(&self) -> Result<()> {
        if self.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            Err(Error::Stopped {
                what: "tokenising the data".into(),
            })
        } else {
            Ok(())
        }
    }
}

/// The token store of the JSONL files `urls` (globs allowed) in `cache`: opened if this
/// machine already built it, built otherwise. Concurrent callers on one machine (the ranks of
/// a gang) build it once.
pub fn prepare(
    cache: &Path,
    urls: &[String],
    enc: &Encoding<'_>,
    rt: &tokio::runtime::Runtime,
    watch: &mut Watch<'_>,
) -> Result<TokenStore> {
    let mut sources = Vec::new();
    for pattern in urls {
        for url in rt.block_on(objects::expand(pattern))? {
            sources.push(rt.block_on(objects::head_url(&url))?);
        }
    }
    let key = cache_key(&sources, enc);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache)
        .map_err(io(cache))?;
    check_private(cache)?;
    let lock_path = cache.join(format!("{key}.lock"));
    let dir = cache.join(&key);
    // Readers hold the store's lock shared for as long as they use it (so a sweep cannot
    // remove it under them) and check it side by side; building takes it exclusively.
    for _ in 0..10 {
        let lock = private_file(&lock_path, false).map_err(io(&lock_path))?;
        wait_for(&lock, &lock_path, false, watch, || false)?;
        if dir.join("meta.json").is_file() {
            match open(&dir, enc) {
                Ok(mut store) => {
                    tracing::info!(store = %dir.display(), docs = store.len(), tokens = store.tokens(), "using the tokenised data");
                    // Mark it used (the sweep's clock); a failure only makes it look older.
                    let _ = File::options()
                        .write(true)
                        .open(dir.join("meta.json"))
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    store.lock = Some(lock);
                    sweep(cache, &key);
                    return Ok(store);
                }
                Err(e) => {
                    tracing::warn!(store = %dir.display(), "the cached token store is damaged ({e}); tokenising again");
                }
            }
        }
        let before = stamp(&dir);
        drop(lock);
        let lock = private_file(&lock_path, false).map_err(io(&lock_path))?;
        // Whoever holds the lock may be building this very store: once it appears (or is
        // replaced), use it instead of waiting for its users to finish.
        if !wait_for(&lock, &lock_path, true, watch, || {
            stamp(&dir).is_some_and(|s| Some(s) != before)
        })? {
            continue;
        }
        // Others waiting for this build are told whose it is.
        holder_write(&lock, &watch.who);
        // Another process may have built (or repaired) it meanwhile.
        if dir.join("meta.json").is_file() && open(&dir, enc).is_ok() {
            continue;
        }
        // Whatever is in the way — a damaged store, one without meta.json (a crash while it
        // was being removed), a stray file or link — goes.
        remove_any(&dir).map_err(io(&dir))?;
        let partial = cache.join(format!("{key}.partial"));
        remove_any(&partial).map_err(io(&partial))?;
        if let Err(e) = build(&partial, &sources, enc, rt, watch) {
            // A failed or stopped build (a bad record, a full disk, a cancel) leaves nothing
            // behind.
            let _ = remove_any(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &dir).map_err(io(&dir))?;
        File::open(cache)
            .and_then(|d| d.sync_all())
            .map_err(io(cache))?;
    }
    Err(Error::Internal(format!(
        "{}: the token store could not be opened (built or rebuilt ten times)",
        dir.display()
    )))
}

/// Removes `path` whatever it is (a directory, a file, a link: the link, not its target).
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
}

/// Identifies `dir/meta.json` as it is now (inode and modification time), if it exists.
fn stamp(dir: &Path) -> Option<(u64, SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join("meta.json")).ok()?;
    Some((m.ino(), m.modified().ok()?))
}

/// Takes `lock` (exclusively, or shared) and returns true, saying who holds it while it waits;
/// returns false without it as soon as `instead()` says the wait is moot; ends with
/// [`Error::Stopped`] when the run is stopped, and gives up waiting to build after
/// [`LOCK_PATIENCE`].
fn wait_for(
    lock: &File,
    path: &Path,
    exclusive: bool,
    watch: &mut Watch<'_>,
    instead: impl Fn() -> bool,
) -> Result<bool> {
    let started = Instant::now();
    let mut said = None::<Instant>;
    loop {
        let tried = if exclusive {
            lock.try_lock()
        } else {
            lock.try_lock_shared()
        };
        match tried {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
        watch.stopped()?;
        if instead() {
            return Ok(false);
        }
        // Waiting for a build is waiting for progress the builder reports; waiting to build
        // behind other users of the store is bounded.
        if exclusive && started.elapsed() > LOCK_PATIENCE {
            return Err(Error::Internal(format!(
                "{}: still locked by another process after {} minutes",
                path.display(),
                LOCK_PATIENCE.as_secs() / 60
            )));
        }
        if said.is_none_or(|t| t.elapsed() > REPORT_EVERY * 6) {
            let holder = holder_read(path);
            let waited = match started.elapsed().as_secs() {
                0 => String::new(),
                s => format!(" ({s}s so far)"),
            };
            let line = if exclusive {
                format!(
                    "waiting for other processes using or building this machine's token store \
                     of the same data{}{waited}",
                    holder.map_or(String::new(), |h| format!("; last built by {h}")),
                )
            } else {
                format!(
                    "waiting for {} to finish tokenising the same data on this machine{waited}",
                    holder.unwrap_or_else(|| "another process".into()),
                )
            };
            tracing::info!(lock = %path.display(), "{line}");
            (watch.note)(line);
            said = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes who builds the store into its lock file (held exclusively), for those who wait.
fn holder_write(lock: &File, who: &str) {
    use std::io::{Seek, Write};
    let mut f = lock;
    let text = format!("{who} (pid {})\n", std::process::id());
    // Best effort: a waiter without it only says "another process".
    let _ = f
        .set_len(0)
        .and_then(|()| f.seek(std::io::SeekFrom::Start(0)))
        .and_then(|_| f.write_all(text.as_bytes()));
}

/// Who last built the store whose lock file is `path` (one short line of printable text).
fn holder_read(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    // Never waiting on a FIFO planted there.
    lockstep_storage::files::open_regular(path, OpenOptions::new().read(true), false)
        .ok()?
        .take(200)
        .read_to_string(&mut text)
        .ok()?;
    let line = text.lines().next()?.trim();
    // Printable only: no terminal escapes, and no bidirectional overrides that would show
    // the line reordered.
    let shown = |c: char| {
        !c.is_control()
            && !matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    (!line.is_empty() && line.chars().all(shown)).then(|| line.to_string())
}

/// The effective user: the owner of `/proc/self`.
fn euid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Refuses a cache directory that others could plant a store in: owned by another user, or
/// writable by group or others.
fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mode = m.permissions().mode() & 0o777;
    let mine = euid().is_none_or(|u| u == m.uid());
    if !mine || mode & 0o022 != 0 {
        return Err(Error::Usage(format!(
            "token cache {}: {} (mode {mode:o}, owner uid {}); others could plant tokenised \
             data there: use a directory only you can write (--data-cache)",
            dir.display(),
            if mine {
                "writable by others"
            } else {
                "owned by another user"
            },
            m.uid()
        )));
    }
    Ok(())
}

/// The cache key of `sources` read with `enc`.
fn cache_key(sources: &[Object], enc: &Encoding<'_>) -> String {
    let key = serde_json::json!({
        "format": FORMAT,
        "tokenizer": enc.tokenizer.fingerprint(),
        "vocab": enc.vocab,
        "skip_bad": enc.skip_bad,
        "columns": enc.columns,
        "sources": sources
            .iter()
            .map(|o| serde_json::json!([o.url, o.size, o.version]))
            .collect::<Vec<_>>(),
    });
    format!(
        "{:032x}",
        xxhash_rust::xxh3::xxh3_128(key.to_string().as_bytes())
    )
}

/// A new (truncated) or existing file readable by its owner only; a link or anything but a
/// regular file there (a FIFO would hang its readers) is an error naming it.
pub(crate) fn private_file(path: &Path, truncate: bool) -> std::io::Result<File> {
    lockstep_storage::files::open_regular(
        path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .mode(0o600),
        false,
    )
}

/// Removes stores of `cache` other than `keep` that nobody opened for [`UNUSED_FOR`], and
/// partial builds nobody is working on. Best effort: what cannot be removed stays.
fn sweep(cache: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (key, partial) = match name.strip_suffix(".partial") {
            Some(k) => (k.to_string(), true),
            None => (name.clone(), false),
        };
        if key == keep || key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let path = entry.path();
        if !partial {
            let unused = std::fs::metadata(path.join("meta.json"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age >= UNUSED_FOR);
            if !unused {
                continue;
            }
        }
        let lock_path = cache.join(format!("{key}.lock"));
        let Ok(lock) = private_file(&lock_path, false) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            tracing::info!(store = %path.display(), "removed an unused token store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::store::Meta;
    use super::*;

    /// `prepare` of one file, nobody watching.
    fn prep(cache: &Path, url: &str, rt: &tokio::runtime::Runtime) -> Result<TokenStore> {
        let mut watch = Watch {
            who: "job test".into(),
            stop: None,
            note: &mut |_| {},
        };
        prepare(cache, &[url.to_string()], &enc(), rt, &mut watch)
    }

    fn enc() -> Encoding<'static> {
        Encoding {
            tokenizer: &Tokenizer::Bytes,
            vocab: 256,
            skip_bad: false,
            columns: Default::default(),
        }
    }

    fn write_store(dir: &Path, text: &str) -> Meta {
        let enc = enc();
        let mut b = Builder::create(dir, &enc).unwrap();
        let mut lines = Lines::new("mem://d.jsonl");
        lines
            .feed(text.as_bytes(), |n, l| b.add("mem://d.jsonl", n, l))
            .unwrap();
        lines.finish(|n, l| b.add("mem://d.jsonl", n, l)).unwrap();
        b.write_meta(dir).unwrap()
    }

    #[test]
    fn lines_split_across_chunks_and_are_bounded() {
        let mut got = Vec::new();
        let mut lines = Lines::new("f");
        for chunk in [&b"ab"[..], b"c\r\nd", b"e\n", b"", b"last"] {
            lines
                .feed(chunk, |n, l| {
                    got.push((n, l.to_vec()));
                    Ok(())
                })
                .unwrap();
        }
        lines
            .finish(|n, l| {
                got.push((n, l.to_vec()));
                Ok(())
            })
            .unwrap();
        let want: Vec<(u64, Vec<u8>)> = vec![
            (1, b"abc".to_vec()),
            (2, b"de".to_vec()),
            (3, b"last".to_vec()),
        ];
        assert_eq!(got, want);

        let mut lines = Lines::new("big.jsonl");
        let chunk = vec![b'x'; 1 << 20];
        let mut err = None;
        for _ in 0..=MAX_RECORD_BYTES >> 20 {
            if let Err(e) = lines.feed(&chunk, |_, _| Ok(())) {
                err = Some(e.to_string());
                break;
            }
        }
        let err = err.expect("a line over the limit is refused");
        assert!(
            err.starts_with("big.jsonl:1:") && err.contains("64 MiB"),
            "{err}"
        );
    }

    #[test]
    fn a_store_reads_back_what_was_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let meta = write_store(
            &dir,
            "{\"text\":\"hello\"}\n{\"prompt\":\"ab\",\"completion\":\"c\"}",
        );
        assert_eq!((meta.docs, meta.tokens, meta.width), (2, 10, 2));
        let store = open(&dir, &enc()).unwrap();
        assert_eq!(store.doc(1), (4, 2));
        let mut out = Vec::new();
        store.read(0, 1, 5, &mut out).unwrap();
        store.read(1, 0, 4, &mut out).unwrap();
        assert_eq!(out, vec![101, 108, 108, 111, 0, 97, 98, 99, 0]);
        assert!(store.read(1, 2, 3, &mut out).is_err());
    }

    #[test]
    fn a_damaged_store_is_refused_naming_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        write_store(&dir, "{\"text\":\"hello world\"}\n{\"text\":\"again\"}\n");
        // A flipped token id (still inside the vocabulary): the hash catches it.
        let path = dir.join("tokens.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = open(&dir, &enc()).unwrap_err().to_string();
        assert!(e.contains("tokens.bin does not match its hash"), "{e}");
        // An id outside the vocabulary.
        bytes[0] = 0xff;
        bytes[1] = 0x7f;
        std::fs::write(&path, &bytes).unwrap();
        let e = open(&dir, &enc()).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        // A truncated file.
        std::fs::write(&path, &bytes[..4]).unwrap();
        let e = open(&dir, &enc()).unwrap_err().to_string();
        assert!(e.contains("tokens.bin holds 4 bytes"), "{e}");
        // docs.bin claiming more tokens than there are.
        let docs = dir.join("docs.bin");
        let mut d = std::fs::read(&docs).unwrap();
        d[0] = 200;
        std::fs::write(&docs, &d).unwrap();
        let e = open(&dir, &enc()).unwrap_err().to_string();
        assert!(e.contains("meta.json claims 2 of"), "{e}");
    }

    #[test]
    fn the_ranks_of_a_machine_tokenise_once_and_changed_data_is_tokenised_again() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d.jsonl");
        std::fs::write(&data, "{\"text\":\"one two three\"}\n").unwrap();
        let url = format!("file://{}", data.display());
        let cache = tmp.path().join("cache");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stores: Vec<TokenStore> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| prep(&cache, &url, &rt)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert!(
            stores
                .iter()
                .all(|s| s.dir() == stores[0].dir() && s.tokens() == 14)
        );
        let entries = |p: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            entries(&cache).len(),
            2,
            "one store and its lock: {:?}",
            entries(&cache)
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&stores[0].dir().join("tokens.bin")), 0o600);

        // New data: a new store; the old one stays until unused for a week.
        std::fs::write(&data, "{\"text\":\"four\"}\n").unwrap();
        let s = prep(&cache, &url, &rt).unwrap();
        assert_eq!(s.tokens(), 5);
        assert_ne!(s.dir(), stores[0].dir());
        assert_eq!(entries(&cache).len(), 4);
        // A damaged store is rebuilt, not used (once its users are done with it).
        std::fs::write(s.dir().join("docs.bin"), b"").unwrap();
        drop(s);
        let again = prep(&cache, &url, &rt).unwrap();
        assert_eq!(again.tokens(), 5);
        drop(again);
        // A store last used eight days ago is swept by the next build — once nobody uses it.
        let first = stores[0].dir().to_path_buf();
        let old = std::fs::File::options()
            .write(true)
            .open(stores[0].dir().join("meta.json"))
            .unwrap();
        old.set_modified(SystemTime::now() - UNUSED_FOR - Duration::from_secs(86400))
            .unwrap();
        prep(&cache, &url, &rt).unwrap();
        assert!(first.exists(), "swept while in use");
        drop(stores);
        prep(&cache, &url, &rt).unwrap();
        assert!(!first.exists());
    }

    #[test]
    fn leftovers_of_crashes_and_failures_do_not_block_the_next_run() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d.jsonl");
        std::fs::write(&data, "{\"text\":\"one\"}\n").unwrap();
        let url = format!("file://{}", data.display());
        let cache = tmp.path().join("cache");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let s = prep(&cache, &url, &rt).unwrap();
        let dir = s.dir().to_path_buf();
        drop(s);
        // A store left without meta.json (killed while being removed), then a stray file.
        std::fs::remove_file(dir.join("meta.json")).unwrap();
        assert_eq!(prep(&cache, &url, &rt).unwrap().tokens(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"stray").unwrap();
        assert_eq!(prep(&cache, &url, &rt).unwrap().tokens(), 4);
        // A build that fails on a bad record leaves no partial store.
        let bad = tmp.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"text\":\"ok\"}\nnot json\n").unwrap();
        let bad_url = format!("file://{}", bad.display());
        let e = prep(&cache, &bad_url, &rt).unwrap_err();
        assert!(e.to_string().contains("bad.jsonl:2:"), "{e}");
        let partials = std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
            .count();
        assert_eq!(partials, 0);
    }

    #[test]
    fn a_cache_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d.jsonl");
        std::fs::write(&data, "{\"text\":\"one\"}\n").unwrap();
        let url = format!("file://{}", data.display());
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let e = prep(&shared, &url, &rt).unwrap_err().to_string();
        assert!(
            e.contains("writable by others") && e.contains("shared"),
            "{e}"
        );
    }

    fn partials(cache: &Path) -> usize {
        std::fs::read_dir(cache)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
            .count()
    }

    /// A stop (Ctrl-C, a cancel) ends tokenising at once and leaves no partial store; one that
    /// comes while waiting for another process's build ends the wait, which is said, naming
    /// whose build it is.
    #[test]
    fn a_stop_ends_tokenising_and_waiting_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d.jsonl");
        let line = format!("{{\"text\":\"{}\"}}\n", "x".repeat(1000));
        std::fs::write(&data, line.repeat(1000)).unwrap();
        let url = format!("file://{}", data.display());
        let cache = tmp.path().join("cache");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stop = AtomicBool::new(false);
        let mut said = Vec::new();
        let e = {
            let mut note = |line: String| {
                said.push(line);
                // Stopped once tokenising is under way.
                stop.store(true, Ordering::SeqCst);
            };
            let mut watch = Watch {
                who: "job a".into(),
                stop: Some(&stop),
                note: &mut note,
            };
            prepare(&cache, std::slice::from_ref(&url), &enc(), &rt, &mut watch).unwrap_err()
        };
        assert!(matches!(e, Error::Stopped { .. }), "{e}");
        assert!(said[0].starts_with("tokenising 1 file(s)"), "{said:?}");
        assert_eq!(partials(&cache), 0);
        assert!(
            !std::fs::read_dir(&cache).unwrap().any(|e| e
                .unwrap()
                .path()
                .join("meta.json")
                .exists()),
            "a stopped build must not look finished"
        );

        // Another process builds the store (it holds the lock exclusively): the waiter says
        // whose build it waits for, and a stop ends the wait.
        let key = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .find_map(|n| n.strip_suffix(".lock").map(str::to_string))
            .unwrap();
        let lock_path = cache.join(format!("{key}.lock"));
        let builder = private_file(&lock_path, false).unwrap();
        builder.lock().unwrap();
        holder_write(&builder, "job nightly");
        let stop = AtomicBool::new(false);
        let mut said = Vec::new();
        let e = {
            let mut note = |line: String| {
                said.push(line);
                stop.store(true, Ordering::SeqCst);
            };
            let mut watch = Watch {
                who: "job b".into(),
                stop: Some(&stop),
                note: &mut note,
            };
            prepare(&cache, std::slice::from_ref(&url), &enc(), &rt, &mut watch).unwrap_err()
        };
        assert!(matches!(e, Error::Stopped { .. }), "{e}");
        assert!(
            said[0].starts_with("waiting for job nightly (pid ")
                && said[0].contains("to finish tokenising the same data"),
            "{said:?}"
        );

        // A holder line that would print reordered (a bidirectional override) is not shown.
        holder_write(&builder, "job \u{202e}lanoitan");
        assert_eq!(holder_read(&lock_path), None);
        holder_write(&builder, "job nightly");
        assert!(holder_read(&lock_path).is_some_and(|h| h.starts_with("job nightly (pid ")));

        // A FIFO where the lock file belongs is an error naming it, never a hang.
        drop(builder);
        std::fs::remove_file(&lock_path).unwrap();
        let ok = std::process::Command::new("mkfifo")
            .arg(&lock_path)
            .status()
            .unwrap();
        assert!(ok.success());
        let mut note = |_: String| {};
        let mut watch = Watch {
            who: "job c".into(),
            stop: None,
            note: &mut note,
        };
        let e = prepare(&cache, std::slice::from_ref(&url), &enc(), &rt, &mut watch).unwrap_err();
        assert!(
            e.to_string()
                .contains(".lock is a FIFO, not a regular file"),
            "{e}"
        );
        assert!(holder_read(&lock_path).is_none());
    }

    /// A data file rewritten in place with its size and modification time kept (`cp -p`,
    /// `rsync --inplace -t`) is tokenised again, not served from the old tokens.
    #[test]
    fn data_rewritten_in_place_with_the_same_size_and_mtime_is_tokenised_again() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d.jsonl");
        std::fs::write(&data, "{\"text\":\"aaaa\"}\n").unwrap();
        let mtime = std::fs::metadata(&data).unwrap().modified().unwrap();
        let url = format!("file://{}", data.display());
        let cache = tmp.path().join("cache");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let first = prep(&cache, &url, &rt).unwrap();
        let mut old = Vec::new();
        first.read(0, 0, 4, &mut old).unwrap();
        drop(first);
        // Same inode, same size, the old modification time put back.
        let mut f = std::fs::File::options().write(true).open(&data).unwrap();
        f.write_all(b"{\"text\":\"bbbb\"}\n").unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let second = prep(&cache, &url, &rt).unwrap();
        let mut new = Vec::new();
        second.read(0, 0, 4, &mut new).unwrap();
        assert_ne!(old, new, "stale tokens served for rewritten data");
        assert!(new.contains(&u32::from(b'b')), "{new:?}");
    }

    /// Every document's tokens, in order.
    fn all_tokens(s: &TokenStore) -> Vec<Vec<u32>> {
        (0..s.len())
            .map(|d| {
                let mut out = Vec::new();
                s.read(d, 0, s.doc(d).0, &mut out).unwrap();
                out
            })
            .collect()
    }

    /// `.jsonl.gz` (also of several gzip members, as `cat a.gz b.gz` makes) and `.jsonl.zst`
    /// give the tokens the plain file gives, streamed over several 8 MiB ranges; a damaged
    /// compressed file is an error naming it.
    #[test]
    fn compressed_jsonl_gives_the_tokens_of_the_plain_file() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let rt = tokio::runtime::Runtime::new().unwrap();
        // Text that compresses poorly, so the compressed file spans more than one range.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut text = String::new();
        while text.len() < 20 << 20 {
            let words: String = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (b'a' + (x % 26) as u8) as char
                })
                .collect();
            text.push_str(&format!("{{\"text\":\"{words}\"}}\n"));
        }
        let plain = tmp.path().join("d.jsonl");
        std::fs::write(&plain, &text).unwrap();
        let zst = tmp.path().join("d.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 1).unwrap()).unwrap();
        assert!(
            std::fs::metadata(&zst).unwrap().len() > RANGE,
            "one range only"
        );
        // Two gzip members: the first half of the lines, then the rest.
        let cut = text[..text.len() / 2].rfind('\n').unwrap() + 1;
        let mut gz = Vec::new();
        for part in [&text[..cut], &text[cut..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part.as_bytes()).unwrap();
            gz.extend(e.finish().unwrap());
        }
        let gz_path = tmp.path().join("d.jsonl.gz");
        std::fs::write(&gz_path, &gz).unwrap();
        let url = |p: &Path| format!("file://{}", p.display());
        let want = all_tokens(&prep(&cache, &url(&plain), &rt).unwrap());
        assert!(want.len() > 90_000, "{}", want.len());
        for p in [&zst, &gz_path] {
            let got = prep(&cache, &url(p), &rt).unwrap();
            assert_eq!(
                got.per_file()[0].records,
                want.len() as u64,
                "{}",
                p.display()
            );
            assert!(all_tokens(&got) == want, "{}: other tokens", p.display());
        }
        // Damaged: cut short, and not compressed at all.
        std::fs::write(&zst, &std::fs::read(&zst).unwrap()[..1000]).unwrap();
        let e = prep(&cache, &url(&zst), &rt).unwrap_err();
        assert!(
            matches!(&e, Error::Data { file, .. } if file.ends_with("d.jsonl.zst")),
            "{e}"
        );
        std::fs::write(&gz_path, "{\"text\":\"plain\"}\n").unwrap();
        let e = prep(&cache, &url(&gz_path), &rt).unwrap_err().to_string();
        assert!(e.contains("d.jsonl.gz") && e.contains("gzip"), "{e}");
        assert_eq!(partials(&cache), 0);
    }
}
