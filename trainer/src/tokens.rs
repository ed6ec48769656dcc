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
//! - `docs.bin`: per document, its token count and prompt length (little-endian u32 each);
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
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use lockstep_storage::objects::{self, Object};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Bumped when the files' layout changes (old stores are then never opened, only swept).
const FORMAT: u32 = 2;
/// Bytes of a JSONL file fetched per request.
const RANGE: u64 = 8 << 20;
/// The longest JSONL record accepted (a line without a newline is not read without end).
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// A store nobody opened for this long is removed by the next build in its cache.
pub const UNUSED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a long tokenisation says how far it got.
const REPORT_EVERY: Duration = Duration::from_secs(5);
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
            Error::Invalid(
                "no place for the tokenised data: set --data-cache (or LOCKSTEP_DATA_CACHE, \
                 XDG_CACHE_HOME or HOME)"
                    .into(),
            )
        })
}

/// One document's place in `tokens.bin`.
#[derive(Debug, Clone, Copy)]
struct Doc {
    /// Offset of its first token.
    start: u64,
    /// Tokens, end-of-sequence included.
    len: u32,
    /// Leading tokens that are prompt (not counted as targets).
    prompt: u32,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    /// Bytes per token id (2 or 4).
    width: u8,
    vocab: u64,
    docs: u64,
    tokens: u64,
    /// Records left out as bad (with `data.skip_bad_records`).
    skipped: u64,
    /// Files read.
    files: u64,
    tokens_xxh3: String,
    docs_xxh3: String,
    /// Per file: its URL, the records kept and the records skipped (the lineage of an export).
    #[serde(default)]
    per_file: Vec<FileCount>,
}

/// How many records one data file gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCount {
    /// The file's URL.
    pub url: String,
    /// Records tokenised.
    pub records: u64,
    /// Bad records left out (with `data.skip_bad_records`).
    pub skipped: u64,
}

/// Tokenised documents, read from disk on demand.
#[derive(Debug)]
pub struct TokenStore {
    dir: PathBuf,
    /// The store's lock, held shared while it is in use (`None`: opened without the cache).
    lock: Option<File>,
    tokens_file: File,
    width: u8,
    docs: Vec<Doc>,
    tokens: u64,
    skipped: u64,
    files: u64,
    per_file: Vec<FileCount>,
}

impl TokenStore {
    /// Records per data file.
    pub fn per_file(&self) -> &[FileCount] {
        &self.per_file
    }

    /// Documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// True when no document was read.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Tokens over all documents.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Records skipped as bad.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Files read.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// The directory holding the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token count and prompt length of document `d`.
    pub fn doc(&self, d: usize) -> (u32, u32) {
        let doc = self.docs[d];
        (doc.len, doc.prompt)
    }

    /// Appends tokens `offset..offset + n` of document `d` to `out`.
    pub fn read(&self, d: usize, offset: u32, n: u32, out: &mut Vec<u32>) -> Result<()> {
        let doc = self.docs[d];
        if u64::from(offset) + u64::from(n) > u64::from(doc.len) {
            return Err(Error::Invalid(format!(
                "token store: read past the end of document {d}"
            )));
        }
        let w = u64::from(self.width);
        let mut buf = vec![0u8; n as usize * self.width as usize];
        self.tokens_file
            .read_exact_at(&mut buf, (doc.start + u64::from(offset)) * w)
            .map_err(|source| Error::Io {
                path: self.dir.join("tokens.bin").display().to_string(),
                source,
            })?;
        decode(&buf, self.width, out);
        Ok(())
    }
}

fn decode(bytes: &[u8], width: u8, out: &mut Vec<u32>) {
    if width == 2 {
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
        );
    } else {
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
}

/// How records become tokens.
pub struct Encoding<'a> {
    /// The tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's vocabulary: every id must be below it.
    pub vocab: usize,
    /// Leave bad records out (counting them) instead of failing.
    pub skip_bad: bool,
}

impl Encoding<'_> {
    fn width(&self) -> u8 {
        if self.vocab <= 1 << 16 { 2 } else { 4 }
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
        if lock.try_lock_shared().is_err() {
            tracing::info!(cache = %cache.display(), "another process on this machine is tokenising the same data; waiting for it");
            lock.lock_shared().map_err(io(&lock_path))?;
        }
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
        if !lock_exclusive(&lock, &lock_path, || {
            stamp(&dir).is_some_and(|s| Some(s) != before)
        })? {
            continue;
        }
        // Another process may have built (or repaired) it meanwhile.
        if dir.join("meta.json").is_file() && open(&dir, enc).is_ok() {
            continue;
        }
        // Whatever is in the way — a damaged store, one without meta.json (a crash while it
        // was being removed), a stray file or link — goes.
        remove_any(&dir).map_err(io(&dir))?;
        let partial = cache.join(format!("{key}.partial"));
        remove_any(&partial).map_err(io(&partial))?;
        if let Err(e) = build(&partial, &sources, enc, rt) {
            // A failed build (a bad record, a full disk) leaves nothing behind.
            let _ = remove_any(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &dir).map_err(io(&dir))?;
        File::open(cache)
            .and_then(|d| d.sync_all())
            .map_err(io(cache))?;
    }
    Err(Error::Invalid(format!(
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

/// Takes `lock` exclusively (true), saying so while it waits for other processes using or
/// building the store; returns false without it as soon as `instead()` says the wait is moot;
/// gives up after [`LOCK_PATIENCE`].
fn lock_exclusive(lock: &File, path: &Path, instead: impl Fn() -> bool) -> Result<bool> {
    let started = Instant::now();
    let mut said = None::<Instant>;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
        if instead() {
            return Ok(false);
        }
        if started.elapsed() > LOCK_PATIENCE {
            return Err(Error::Invalid(format!(
                "{}: still locked by another process after {} minutes",
                path.display(),
                LOCK_PATIENCE.as_secs() / 60
            )));
        }
        if said.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            tracing::info!(lock = %path.display(), "waiting for other processes using or building this token store");
            said = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
        return Err(Error::Invalid(format!(
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

/// A new (truncated) or existing file readable by its owner only.
fn private_file(path: &Path, truncate: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .open(path)
}

/// Tokenises `sources` into a new store in `dir`.
fn build(
    dir: &Path,
    sources: &[Object],
    enc: &Encoding<'_>,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let total: u64 = sources.iter().map(|o| o.size).sum();
    tracing::info!(files = sources.len(), bytes = total, "tokenising data");
    let mut b = Builder::create(dir, enc)?;
    let (started, mut reported) = (Instant::now(), Instant::now());
    let mut done = 0u64;
    for object in sources {
        let mut lines = Lines::new(&object.url);
        let (docs_before, skipped_before) = (b.meta.docs, b.meta.skipped);
        let mut offset = 0;
        while offset < object.size {
            let end = (offset + RANGE).min(object.size);
            let chunk = rt.block_on(object.read_range(offset..end))?;
            if chunk.len() as u64 != end - offset {
                return Err(Error::Data {
                    file: object.url.clone(),
                    line: 0,
                    reason: format!(
                        "read {} bytes at offset {offset} where {} were expected (the object \
                         changed while it was being read?)",
                        chunk.len(),
                        end - offset
                    ),
                });
            }
            lines.feed(&chunk, |line_no, line| b.add(&object.url, line_no, line))?;
            offset = end;
            done += chunk.len() as u64;
            if reported.elapsed() >= REPORT_EVERY {
                reported = Instant::now();
                tracing::info!(
                    "tokenised {} of {} MB ({:.0}%), {} documents",
                    done >> 20,
                    total >> 20,
                    100.0 * done as f64 / total.max(1) as f64,
                    b.meta.docs
                );
            }
        }
        lines.finish(|line_no, line| b.add(&object.url, line_no, line))?;
        b.meta.files += 1;
        b.meta.per_file.push(FileCount {
            url: object.url.clone(),
            records: b.meta.docs - docs_before,
            skipped: b.meta.skipped - skipped_before,
        });
    }
    let meta = b.write_meta(dir)?;
    tracing::info!(
        docs = meta.docs,
        tokens = meta.tokens,
        skipped = meta.skipped,
        secs = started.elapsed().as_secs_f64(),
        "tokenised data into the token store"
    );
    Ok(())
}

/// Splits a byte stream into JSONL lines, numbering them, bounding their length.
pub struct Lines {
    file: String,
    pending: Vec<u8>,
    line_no: u64,
}

impl Lines {
    /// Lines of `file` (named in errors).
    pub fn new(file: &str) -> Lines {
        Lines {
            file: file.to_string(),
            pending: Vec::new(),
            line_no: 0,
        }
    }

    /// Hands every line completed by `chunk` to `each` (its 1-based number and bytes, without
    /// the newline or a trailing `\r`).
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            self.bound(nl)?;
            self.line_no += 1;
            let line = if self.pending.is_empty() {
                &chunk[..nl]
            } else {
                self.pending.extend_from_slice(&chunk[..nl]);
                &self.pending[..]
            };
            each(self.line_no, line.strip_suffix(b"\r").unwrap_or(line))?;
            self.pending.clear();
            chunk = &chunk[nl + 1..];
        }
        self.bound(chunk.len())?;
        self.pending.extend_from_slice(chunk);
        Ok(())
    }

    /// Hands the last line (one without a newline) to `each`.
    pub fn finish(mut self, mut each: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.line_no += 1;
        let line = std::mem::take(&mut self.pending);
        each(self.line_no, line.strip_suffix(b"\r").unwrap_or(&line))
    }

    fn bound(&self, more: usize) -> Result<()> {
        if self.pending.len() + more > MAX_RECORD_BYTES {
            return Err(Error::Data {
                file: self.file.clone(),
                line: self.line_no + 1,
                reason: format!(
                    "the record is longer than {} MiB (the limit on one JSONL line)",
                    MAX_RECORD_BYTES >> 20
                ),
            });
        }
        Ok(())
    }
}

/// Writes a new store.
pub struct Builder<'a> {
    dir: PathBuf,
    enc: &'a Encoding<'a>,
    tokens: BufWriter<File>,
    docs: BufWriter<File>,
    tokens_hash: Xxh3,
    docs_hash: Xxh3,
    meta: Meta,
    ids: Vec<u8>,
}

impl<'a> Builder<'a> {
    /// Starts a store in `dir` (created, private; it must not exist).
    pub fn create(dir: &Path, enc: &'a Encoding<'a>) -> Result<Builder<'a>> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            private_file(&path, true)
                .map(|f| BufWriter::with_capacity(1 << 20, f))
                .map_err(io(&path))
        };
        Ok(Builder {
            dir: dir.to_path_buf(),
            enc,
            tokens: open("tokens.bin")?,
            docs: open("docs.bin")?,
            tokens_hash: Xxh3::new(),
            docs_hash: Xxh3::new(),
            meta: Meta {
                format: FORMAT,
                width: enc.width(),
                vocab: enc.vocab as u64,
                docs: 0,
                tokens: 0,
                skipped: 0,
                files: 0,
                tokens_xxh3: String::new(),
                docs_xxh3: String::new(),
                per_file: Vec::new(),
            },
            ids: Vec::new(),
        })
    }

    /// Adds the JSONL record `line` (line `line_no` of `file`): blank lines are skipped, a bad
    /// record is an error naming the file and line, or — with `skip_bad` — counted and left out.
    pub fn add(&mut self, file: &str, line_no: u64, line: &[u8]) -> Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let (tokens, prompt) =
            match crate::data::encode_record(line, self.enc.tokenizer, self.enc.vocab) {
                Ok(t) => t,
                Err(_) if self.enc.skip_bad => {
                    self.meta.skipped += 1;
                    return Ok(());
                }
                Err(reason) => {
                    return Err(Error::Data {
                        file: file.into(),
                        line: line_no,
                        reason: format!(
                            "{reason} (set data.skip_bad_records = true to skip such records)"
                        ),
                    });
                }
            };
        let len = u32::try_from(tokens.len()).map_err(|_| Error::Data {
            file: file.into(),
            line: line_no,
            reason: "the record has more than 4 billion tokens".into(),
        })?;
        self.ids.clear();
        for &t in &tokens {
            if self.meta.width == 2 {
                self.ids.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                self.ids.extend_from_slice(&t.to_le_bytes());
            }
        }
        let mut doc = [0u8; 8];
        doc[..4].copy_from_slice(&len.to_le_bytes());
        doc[4..].copy_from_slice(&(prompt as u32).to_le_bytes());
        self.tokens_hash.update(&self.ids);
        self.docs_hash.update(&doc);
        let io = |name: &str| {
            let path = self.dir.join(name).display().to_string();
            move |source| Error::Io { path, source }
        };
        self.tokens.write_all(&self.ids).map_err(io("tokens.bin"))?;
        self.docs.write_all(&doc).map_err(io("docs.bin"))?;
        self.meta.docs += 1;
        self.meta.tokens += u64::from(len);
        Ok(())
    }

    /// Syncs both files and writes `meta.json` (synced) last.
    pub fn finish(self, dir: &Path) -> Result<()> {
        self.write_meta(dir).map(|_| ())
    }

    fn write_meta(mut self, dir: &Path) -> Result<Meta> {
        let io = |path: PathBuf| {
            move |source| Error::Io {
                path: path.display().to_string(),
                source,
            }
        };
        for (name, w) in [("tokens.bin", self.tokens), ("docs.bin", self.docs)] {
            let f = w
                .into_inner()
                .map_err(|e| io(dir.join(name))(e.into_error()))?;
            f.sync_all().map_err(io(dir.join(name)))?;
        }
        self.meta.tokens_xxh3 = format!("{:016x}", self.tokens_hash.digest());
        self.meta.docs_xxh3 = format!("{:016x}", self.docs_hash.digest());
        let path = dir.join("meta.json");
        let mut f = private_file(&path, true).map_err(io(path.clone()))?;
        let json = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| Error::Invalid(format!("token store meta: {e}")))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io(path))?;
        Ok(self.meta)
    }
}

/// Opens the store in `dir`, checking every claim of its `meta.json` against the files.
pub fn open(dir: &Path, enc: &Encoding<'_>) -> Result<TokenStore> {
    let damaged = |reason: String| Error::Invalid(format!("{}: {reason}", dir.display()));
    let io = |name: &str| {
        let path = dir.join(name).display().to_string();
        move |source| Error::Io { path, source }
    };
    let meta_bytes = std::fs::read(dir.join("meta.json")).map_err(io("meta.json"))?;
    let meta: Meta = serde_json::from_slice(&meta_bytes)
        .map_err(|e| damaged(format!("meta.json is not a token store's: {e}")))?;
    if meta.format != FORMAT || meta.width != enc.width() || meta.vocab != enc.vocab as u64 {
        return Err(damaged(format!(
            "format {}, width {}, vocabulary {} where {FORMAT}, {}, {} were expected",
            meta.format,
            meta.width,
            meta.vocab,
            enc.width(),
            enc.vocab
        )));
    }
    // docs.bin: sizes, the hash, and the token total it implies.
    let mut docs_file = File::open(dir.join("docs.bin")).map_err(io("docs.bin"))?;
    let docs_len = docs_file.metadata().map_err(io("docs.bin"))?.len();
    if Some(docs_len) != meta.docs.checked_mul(8) {
        return Err(damaged(format!(
            "docs.bin holds {docs_len} bytes; meta.json claims {} documents",
            meta.docs
        )));
    }
    let mut docs = Vec::new();
    docs.try_reserve_exact(meta.docs as usize)
        .map_err(|_| damaged(format!("no memory for {} documents", meta.docs)))?;
    let mut hash = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut start = 0u64;
    loop {
        let n = read_full(&mut docs_file, &mut buf).map_err(io("docs.bin"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        for d in buf[..n].chunks_exact(8) {
            let len = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            let prompt = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
            if len == 0 || prompt >= len {
                return Err(damaged(format!(
                    "document {} claims {len} tokens with a {prompt}-token prompt",
                    docs.len()
                )));
            }
            docs.push(Doc { start, len, prompt });
            start += u64::from(len);
        }
    }
    if docs.len() as u64 != meta.docs || start != meta.tokens {
        return Err(damaged(format!(
            "docs.bin lists {} documents of {start} tokens; meta.json claims {} of {}",
            docs.len(),
            meta.docs,
            meta.tokens
        )));
    }
    if format!("{:016x}", hash.digest()) != meta.docs_xxh3 {
        return Err(damaged("docs.bin does not match its hash".into()));
    }
    // tokens.bin: size, hash, every id inside the vocabulary.
    let mut tokens_file = File::open(dir.join("tokens.bin")).map_err(io("tokens.bin"))?;
    let tokens_len = tokens_file.metadata().map_err(io("tokens.bin"))?.len();
    if Some(tokens_len) != meta.tokens.checked_mul(u64::from(meta.width)) {
        return Err(damaged(format!(
            "tokens.bin holds {tokens_len} bytes; meta.json claims {} tokens of {} bytes",
            meta.tokens, meta.width
        )));
    }
    let mut hash = Xxh3::new();
    let mut ids = Vec::new();
    loop {
        let n = read_full(&mut tokens_file, &mut buf).map_err(io("tokens.bin"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        ids.clear();
        decode(&buf[..n], meta.width, &mut ids);
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= enc.vocab) {
            return Err(damaged(format!(
                "tokens.bin holds id {bad}, outside the vocabulary of {}",
                enc.vocab
            )));
        }
    }
    if format!("{:016x}", hash.digest()) != meta.tokens_xxh3 {
        return Err(damaged("tokens.bin does not match its hash".into()));
    }
    if meta.docs > u64::from(u32::MAX) {
        return Err(damaged(format!(
            "{} documents; at most {} are supported",
            meta.docs,
            u32::MAX
        )));
    }
    Ok(TokenStore {
        dir: dir.to_path_buf(),
        lock: None,
        tokens_file,
        width: meta.width,
        docs,
        tokens: meta.tokens,
        skipped: meta.skipped,
        files: meta.files,
        per_file: meta.per_file,
    })
}

/// Reads until `buf` is full or the file ends (a multiple of 8 bytes unless at the end).
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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
    use super::*;

    fn enc() -> Encoding<'static> {
        Encoding {
            tokenizer: &Tokenizer::Bytes,
            vocab: 256,
            skip_bad: false,
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
                .map(|_| s.spawn(|| prepare(&cache, std::slice::from_ref(&url), &enc(), &rt)))
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
        let s = prepare(&cache, std::slice::from_ref(&url), &enc(), &rt).unwrap();
        assert_eq!(s.tokens(), 5);
        assert_ne!(s.dir(), stores[0].dir());
        assert_eq!(entries(&cache).len(), 4);
        // A damaged store is rebuilt, not used (once its users are done with it).
        std::fs::write(s.dir().join("docs.bin"), b"").unwrap();
        drop(s);
        let again = prepare(&cache, std::slice::from_ref(&url), &enc(), &rt).unwrap();
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
        prepare(&cache, std::slice::from_ref(&url), &enc(), &rt).unwrap();
        assert!(first.exists(), "swept while in use");
        drop(stores);
        prepare(&cache, std::slice::from_ref(&url), &enc(), &rt).unwrap();
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
        let s = prepare(&cache, std::slice::from_ref(&url), &enc(), &rt).unwrap();
        let dir = s.dir().to_path_buf();
        drop(s);
        // A store left without meta.json (killed while being removed), then a stray file.
        std::fs::remove_file(dir.join("meta.json")).unwrap();
        assert_eq!(
            prepare(&cache, std::slice::from_ref(&url), &enc(), &rt)
                .unwrap()
                .tokens(),
            4
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"stray").unwrap();
        assert_eq!(
            prepare(&cache, std::slice::from_ref(&url), &enc(), &rt)
                .unwrap()
                .tokens(),
            4
        );
        // A build that fails on a bad record leaves no partial store.
        let bad = tmp.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"text\":\"ok\"}\nnot json\n").unwrap();
        let bad_url = format!("file://{}", bad.display());
        let e = prepare(&cache, std::slice::from_ref(&bad_url), &enc(), &rt).unwrap_err();
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
        let e = prepare(&shared, &[url], &enc(), &rt)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by others") && e.contains("shared"),
            "{e}"
        );
    }
}
