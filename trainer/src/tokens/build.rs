//! Building a token store: JSONL streamed in ranges, split into lines, each record tokenised
//! and appended.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lockstep_storage::objects::Object;
use xxhash_rust::xxh3::Xxh3;

use super::store::{FileCount, Meta};
use super::{Encoding, FORMAT, MAX_RECORD_BYTES, RANGE, REPORT_EVERY, Watch, private_file};
use crate::error::{Error, Result};

/// Tokenises `sources` into a new store in `dir`.
pub(super) fn build(
    dir: &Path,
    sources: &[Object],
    enc: &Encoding<'_>,
    rt: &tokio::runtime::Runtime,
    watch: &mut Watch<'_>,
) -> Result<()> {
    let total: u64 = sources.iter().map(|o| o.size).sum();
    tracing::info!(files = sources.len(), bytes = total, "tokenising data");
    (watch.note)(format!(
        "tokenising {} file(s), {} MB",
        sources.len(),
        total >> 20
    ));
    let mut b = Builder::create(dir, enc)?;
    let (started, mut reported) = (Instant::now(), Instant::now());
    // Bytes of the files before this one (compressed bytes for compressed files).
    let mut done = 0u64;
    for object in sources {
        let mut lines = Lines::new(&object.url);
        let (records_before, skipped_before) = (b.records, b.meta.skipped);
        let columns = b.enc.columns.clone();
        let mut each = |line_no: u64, line: &[u8]| b.add(&object.url, line_no, line);
        let mut progress = |watch: &mut Watch<'_>, read: u64| {
            if reported.elapsed() >= REPORT_EVERY {
                reported = Instant::now();
                let line = format!(
                    "tokenised {} of {} MB ({:.0}%)",
                    (done + read) >> 20,
                    total >> 20,
                    100.0 * (done + read) as f64 / total.max(1) as f64,
                );
                tracing::info!("{line}");
                (watch.note)(line);
            }
        };
        if is_parquet(&object.url) {
            // Rows become records through `[data.columns]`; row groups are read one by one.
            let mut row_no = 0u64;
            super::parquet::rows(object, rt, &columns, &mut |row: &[u8]| {
                watch.stopped()?;
                row_no += 1;
                each(row_no, row)
            })?;
        } else {
            match Compression::of(&object.url) {
                None => {
                    let mut offset = 0;
                    while offset < object.size {
                        watch.stopped()?;
                        let end = (offset + RANGE).min(object.size);
                        let chunk = read_range(object, offset..end, rt)?;
                        lines.feed(&chunk, &mut each)?;
                        offset = end;
                        progress(watch, offset);
                    }
                }
                Some(kind) => {
                    // Decompressed as it streams: the compressed file is read in ranges, the
                    // decompressed text handed on in pieces of the same size.
                    let (reader, read) = Ranges::new(object, rt);
                    let mut text = kind.decoder(reader).map_err(|e| kind.error(object, e))?;
                    let mut piece = vec![0u8; RANGE as usize];
                    loop {
                        watch.stopped()?;
                        let n = super::store::read_full(&mut text, &mut piece).map_err(|e| {
                            read.take_error().unwrap_or_else(|| kind.error(object, e))
                        })?;
                        if n == 0 {
                            break;
                        }
                        lines.feed(&piece[..n], &mut each)?;
                        progress(watch, read.offset());
                    }
                }
            }
        }
        lines.finish(&mut each)?;
        done += object.size;
        b.meta.files += 1;
        b.meta.per_file.push(FileCount {
            url: object.url.clone(),
            records: b.records - records_before,
            skipped: b.meta.skipped - skipped_before,
        });
    }
    if let Some(first) = b.first_skip.take() {
        let line = format!(
            "{} bad record(s) skipped (data.skip_bad_records); the first: {first}",
            b.meta.skipped
        );
        tracing::warn!("{line}");
        (watch.note)(line);
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

/// Bytes `range` of `object`, all of them.
fn read_range(
    object: &Object,
    range: std::ops::Range<u64>,
    rt: &tokio::runtime::Runtime,
) -> Result<bytes::Bytes> {
    let (offset, want) = (range.start, range.end - range.start);
    let chunk = rt.block_on(object.read_range(range))?;
    if chunk.len() as u64 != want {
        return Err(Error::Data {
            file: object.url.clone(),
            line: 0,
            reason: format!(
                "read {} bytes at offset {offset} where {want} were expected (the object \
                 changed while it was being read?)",
                chunk.len()
            ),
        });
    }
    Ok(chunk)
}

/// Whether a data file is Parquet, by its name.
pub(crate) fn is_parquet(url: &str) -> bool {
    url.to_ascii_lowercase().ends_with(".parquet")
}

/// How a data file is compressed, by its name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Compression {
    /// `.gz` (gzip; concatenated members are read as one stream, as `zcat` does).
    Gzip,
    /// `.zst` / `.zstd`.
    Zstd,
}

impl Compression {
    /// The compression `url`'s name says, if any.
    pub(crate) fn of(url: &str) -> Option<Compression> {
        let name = url.rsplit('/').next().unwrap_or(url).to_ascii_lowercase();
        if name.ends_with(".gz") {
            Some(Compression::Gzip)
        } else if name.ends_with(".zst") || name.ends_with(".zstd") {
            Some(Compression::Zstd)
        } else {
            None
        }
    }

    fn decoder<'a>(self, r: Ranges<'a>) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                std::io::BufReader::with_capacity(1 << 20, r),
            )),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(
                std::io::BufReader::with_capacity(1 << 20, r),
            )?),
        })
    }

    fn error(self, object: &Object, e: std::io::Error) -> Error {
        let what = match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        };
        Error::Data {
            file: object.url.clone(),
            line: 0,
            reason: format!("not a readable {what} file (its name ends so): {e}"),
        }
    }
}

/// An object read front to back in [`RANGE`]-sized requests, as a [`Read`] for a decoder.
/// A failed request is kept (the decoder only sees an I/O error) so that a storage error
/// stays one (transient ones are retried by the job, not blamed on the data).
pub(crate) struct Ranges<'a> {
    object: &'a Object,
    rt: &'a tokio::runtime::Runtime,
    chunk: bytes::Bytes,
    shared: std::rc::Rc<RangesState>,
}

/// What the reader of [`Ranges`] can ask of it while a decoder owns it.
#[derive(Default)]
pub(crate) struct RangesState {
    offset: std::cell::Cell<u64>,
    error: std::cell::RefCell<Option<Error>>,
}

impl RangesState {
    /// Compressed bytes fetched so far.
    fn offset(&self) -> u64 {
        self.offset.get()
    }

    /// The storage error that failed a read, if one did.
    fn take_error(&self) -> Option<Error> {
        self.error.borrow_mut().take()
    }
}

impl<'a> Ranges<'a> {
    fn new(
        object: &'a Object,
        rt: &'a tokio::runtime::Runtime,
    ) -> (Ranges<'a>, std::rc::Rc<RangesState>) {
        let shared = std::rc::Rc::new(RangesState::default());
        let r = Ranges {
            object,
            rt,
            chunk: bytes::Bytes::new(),
            shared: shared.clone(),
        };
        (r, shared)
    }
}

impl Read for Ranges<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.chunk.is_empty() {
            let offset = self.shared.offset.get();
            if offset >= self.object.size {
                return Ok(0);
            }
            let end = (offset + RANGE).min(self.object.size);
            match read_range(self.object, offset..end, self.rt) {
                Ok(c) => {
                    self.chunk = c;
                    self.shared.offset.set(end);
                }
                Err(e) => {
                    let shown = e.to_string();
                    *self.shared.error.borrow_mut() = Some(e);
                    return Err(std::io::Error::other(shown));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
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
    /// Records kept (a chat record is several documents).
    records: u64,
    /// The first record skipped as bad, and why (`file:line: reason`).
    first_skip: Option<String>,
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
            records: 0,
            first_skip: None,
        })
    }

    /// Adds the JSONL record `line` (line `line_no` of `file`): blank lines are skipped, a bad
    /// record is an error naming the file and line, or — with `skip_bad` — counted and left out.
    pub fn add(&mut self, file: &str, line_no: u64, line: &[u8]) -> Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let segments = match super::encode_record(line, self.enc.tokenizer, self.enc.vocab) {
            Ok(t) => t,
            Err(reason) if self.enc.skip_bad => {
                self.meta.skipped += 1;
                if self.first_skip.is_none() {
                    self.first_skip = Some(format!("{file}:{line_no}: {reason}"));
                }
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
        let last = segments.len().saturating_sub(1);
        for (i, (tokens, prompt)) in segments.into_iter().enumerate() {
            self.add_doc(file, line_no, &tokens, prompt, i < last)?;
        }
        self.records += 1;
        Ok(())
    }

    /// Writes one document; `continues`: the next document is the rest of the same record.
    fn add_doc(
        &mut self,
        file: &str,
        line_no: u64,
        tokens: &[u32],
        prompt: usize,
        continues: bool,
    ) -> Result<()> {
        let len = u32::try_from(tokens.len())
            .ok()
            .filter(|&l| l < super::store::CONTINUES)
            .ok_or_else(|| Error::Data {
                file: file.into(),
                line: line_no,
                reason: "the record has more than 2 billion tokens".into(),
            })?;
        let flag = if continues {
            super::store::CONTINUES
        } else {
            0
        };
        self.ids.clear();
        for &t in tokens {
            if self.meta.width == 2 {
                self.ids.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                self.ids.extend_from_slice(&t.to_le_bytes());
            }
        }
        let mut doc = [0u8; 8];
        doc[..4].copy_from_slice(&len.to_le_bytes());
        doc[4..].copy_from_slice(&(prompt as u32 | flag).to_le_bytes());
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

    pub(super) fn write_meta(mut self, dir: &Path) -> Result<Meta> {
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
            .map_err(|e| Error::Internal(format!("token store meta: {e}")))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io(path))?;
        Ok(self.meta)
    }
}
