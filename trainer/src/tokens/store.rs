//! A token store on disk: its files, and opening one with every claim of its `meta.json`
//! checked against them.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::{Encoding, FORMAT};
use crate::error::{Error, Result};

/// One document's place in `tokens.bin`.
#[derive(Debug, Clone, Copy)]
struct Doc {
    /// Offset of its first token.
    start: u64,
    /// Tokens, end-of-sequence included.
    len: u32,
    /// Leading tokens that are prompt (not counted as targets).
    prompt: u32,
    /// The next document is the rest of the same record (a chat's next turn): they are
    /// shuffled as one.
    continues: bool,
}

/// The bit of a document's prompt field (in `docs.bin`) that says the next document continues
/// the same record.
pub(crate) const CONTINUES: u32 = 1 << 31;

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) format: u32,
    /// Bytes per token id (2 or 4).
    pub(super) width: u8,
    pub(super) vocab: u64,
    pub(super) docs: u64,
    pub(super) tokens: u64,
    /// Records left out as bad (with `data.skip_bad_records`).
    pub(super) skipped: u64,
    /// Files read.
    pub(super) files: u64,
    pub(super) tokens_xxh3: String,
    pub(super) docs_xxh3: String,
    /// Per file: its URL, the records kept and the records skipped (the lineage of an export).
    #[serde(default)]
    pub(super) per_file: Vec<FileCount>,
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
    pub(super) lock: Option<File>,
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

    /// Whether document `d + 1` is the rest of `d`'s record (they stay together).
    pub fn continues(&self, d: usize) -> bool {
        self.docs[d].continues
    }

    /// The records: each one's documents, `start..end`, in order.
    pub fn records(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        for (d, doc) in self.docs.iter().enumerate() {
            if !doc.continues {
                out.push(start..d + 1);
                start = d + 1;
            }
        }
        out
    }

    /// Appends tokens `offset..offset + n` of document `d` to `out`.
    pub fn read(&self, d: usize, offset: u32, n: u32, out: &mut Vec<u32>) -> Result<()> {
        let doc = self.docs[d];
        if u64::from(offset) + u64::from(n) > u64::from(doc.len) {
            return Err(Error::Internal(format!(
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

/// Opens the store in `dir`, checking every claim of its `meta.json` against the files.
pub fn open(dir: &Path, enc: &Encoding<'_>) -> Result<TokenStore> {
    let damaged = |reason: String| Error::Internal(format!("{}: {reason}", dir.display()));
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
            let field = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
            let (prompt, continues) = (field & !CONTINUES, field & CONTINUES != 0);
            if len == 0 || prompt >= len {
                return Err(damaged(format!(
                    "document {} claims {len} tokens with a {prompt}-token prompt",
                    docs.len()
                )));
            }
            docs.push(Doc {
                start,
                len,
                prompt,
                continues,
            });
            start += u64::from(len);
        }
    }
    if docs.last().is_some_and(|d| d.continues) {
        return Err(damaged(
            "the last document claims that another of its record follows".into(),
        ));
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

/// Reads until `buf` is full or the stream ends.
pub(super) fn read_full(f: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
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
