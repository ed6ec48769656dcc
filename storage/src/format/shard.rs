//! Shard files: a header, the chunks, a JSON footer that indexes them, and a fixed trailer.
//!
//! ```text
//! header  (16 B)  b"LKSHARD\0" | version: u32 LE | flags: u32 LE (0)
//! chunk 0 .. chunk n-1        stored bytes, see [`super::codec`]
//! footer  (JSON)  ShardFooter: one ChunkEntry per chunk
//! trailer (32 B)  footer_len: u64 LE | footer_hash: u64 LE (xxh3-64) | version: u32 LE | 0u32 | b"LKSHEND\0"
//! ```
//! A reader fetches the trailer first (its position follows from the file size the manifest
//! records), then the footer, then the chunks it needs. Every chunk carries the xxh3-128 hash of
//! its stored bytes; the manifest carries the footer hash and the file size, so a shard from
//! another checkpoint or a truncated one is refused before any chunk is decoded.

use serde::{Deserialize, Serialize};

use super::FORMAT_VERSION;
use super::codec::Codec;

/// Magic bytes opening every shard.
pub const HEADER_MAGIC: &[u8; 8] = b"LKSHARD\0";
/// Magic bytes closing every shard.
pub const TRAILER_MAGIC: &[u8; 8] = b"LKSHEND\0";
/// Header size in bytes.
pub const HEADER_LEN: u64 = 16;
/// Trailer size in bytes.
pub const TRAILER_LEN: u64 = 32;
/// Largest footer a reader accepts (a footer entry is ~150 B; this is ~100k chunks).
pub const MAX_FOOTER_LEN: u64 = 16 << 20;
/// Largest decoded chunk a reader accepts and a writer may be configured for (writers default
/// to 4 MiB). With the read batches this bounds a reader's memory whatever a footer claims.
pub const MAX_CHUNK_RAW_LEN: u64 = 64 << 20;
/// Decoded bytes a shard may claim per stored byte, beyond one chunk's worth: above what zstd
/// reaches even on all-zero data (a 1 MiB zero plane stores in ~55 bytes, ~19,000×), so every
/// shard a writer produced passes, while a footer claiming more is refused before anything is
/// decoded or allocated. (Memory does not depend on it: decoding is bounded per chunk and per
/// read batch.)
pub const MAX_INFLATION: u64 = 65_536;

/// One chunk's index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkEntry {
    /// Offset of the chunk's decoded bytes in the shard's logical (decoded) stream.
    pub raw_offset: u64,
    /// Decoded length.
    pub raw_len: u64,
    /// Offset of the stored bytes in the shard file.
    pub offset: u64,
    /// Stored length.
    pub len: u64,
    /// How the bytes are stored.
    pub codec: Codec,
    /// xxh3-128 of the stored bytes, 32 lower-case hex digits.
    pub hash: String,
}

/// The footer: the chunk index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardFooter {
    /// Format version (repeated from the header and trailer).
    pub version: u32,
    /// The chunks in file order; their decoded ranges tile `[0, raw_bytes)`.
    pub chunks: Vec<ChunkEntry>,
    /// Total decoded bytes.
    pub raw_bytes: u64,
}

/// A parse failure; the caller adds the file name.
#[derive(Debug, thiserror::Error)]
pub enum ShardFormatError {
    /// A version other than [`FORMAT_VERSION`].
    #[error("format version {0}")]
    Version(u32),
    /// Anything else.
    #[error("{0}")]
    Malformed(String),
}

fn malformed(s: impl Into<String>) -> ShardFormatError {
    ShardFormatError::Malformed(s.into())
}

/// The 16-byte header.
pub const fn encode_header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    let mut i = 0;
    while i < 8 {
        h[i] = HEADER_MAGIC[i];
        i += 1;
    }
    let v = FORMAT_VERSION.to_le_bytes();
    h[8] = v[0];
    h[9] = v[1];
    h[10] = v[2];
    h[11] = v[3];
    h
}

/// Checks a header.
pub fn parse_header(bytes: &[u8]) -> Result<(), ShardFormatError> {
    if bytes.len() != HEADER_LEN as usize || &bytes[..8] != HEADER_MAGIC {
        return Err(malformed("not a lockstep shard (bad header magic)"));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(ShardFormatError::Version(version));
    }
    Ok(())
}

/// Footer bytes plus trailer, ready to append after the last chunk; also returns the footer hash.
pub fn encode_footer(footer: &ShardFooter) -> (Vec<u8>, u64) {
    // Serialising plain structs of strings and integers cannot fail.
    let json = serde_json::to_vec(footer).unwrap_or_default();
    let hash = xxhash_rust::xxh3::xxh3_64(&json);
    let mut out = json;
    let footer_len = out.len() as u64;
    out.extend_from_slice(&footer_len.to_le_bytes());
    out.extend_from_slice(&hash.to_le_bytes());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(TRAILER_MAGIC);
    (out, hash)
}

/// Parsed trailer: where the footer is and what it must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Footer length in bytes.
    pub footer_len: u64,
    /// xxh3-64 of the footer bytes.
    pub footer_hash: u64,
}

/// Parses the 32-byte trailer of a file of `file_len` bytes.
pub fn parse_trailer(bytes: &[u8], file_len: u64) -> Result<Trailer, ShardFormatError> {
    if bytes.len() != TRAILER_LEN as usize || &bytes[24..32] != TRAILER_MAGIC {
        return Err(malformed(
            "bad trailer magic (the file is truncated or not a lockstep shard)",
        ));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if version != FORMAT_VERSION {
        return Err(ShardFormatError::Version(version));
    }
    let footer_len = u64_at(0);
    if footer_len > MAX_FOOTER_LEN || footer_len + TRAILER_LEN + HEADER_LEN > file_len {
        return Err(malformed(format!(
            "footer length {footer_len} does not fit a {file_len}-byte file"
        )));
    }
    Ok(Trailer {
        footer_len,
        footer_hash: u64_at(8),
    })
}

/// Parses and checks a footer: its hash, version, and that the chunks tile both the decoded
/// stream and the file region between header and footer.
pub fn parse_footer(
    bytes: &[u8],
    trailer: &Trailer,
    file_len: u64,
) -> Result<ShardFooter, ShardFormatError> {
    if xxhash_rust::xxh3::xxh3_64(bytes) != trailer.footer_hash {
        return Err(malformed("footer hash mismatch"));
    }
    let footer: ShardFooter =
        serde_json::from_slice(bytes).map_err(|e| malformed(format!("footer: {e}")))?;
    if footer.version != FORMAT_VERSION {
        return Err(ShardFormatError::Version(footer.version));
    }
    let data_end = file_len
        .checked_sub(TRAILER_LEN + trailer.footer_len)
        .filter(|end| *end >= HEADER_LEN)
        .ok_or_else(|| malformed("footer does not fit the file"))?;
    let (mut raw, mut off) = (0u64, HEADER_LEN);
    for (i, c) in footer.chunks.iter().enumerate() {
        if c.raw_offset != raw || c.offset != off {
            return Err(malformed(format!("chunk {i} is out of place")));
        }
        if c.raw_len > MAX_CHUNK_RAW_LEN || c.len > MAX_CHUNK_RAW_LEN + 4096 {
            return Err(malformed(format!("chunk {i} is implausibly large")));
        }
        if c.codec == Codec::Raw && c.len != c.raw_len {
            return Err(malformed(format!("raw chunk {i} has mismatched lengths")));
        }
        parse_hash128(&c.hash).ok_or_else(|| malformed(format!("chunk {i} has a bad hash")))?;
        raw += c.raw_len;
        off += c.len;
        if off > data_end {
            return Err(malformed(format!("chunk {i} runs past the footer")));
        }
    }
    if raw != footer.raw_bytes || off != data_end {
        return Err(malformed("chunks do not cover the shard"));
    }
    let stored = off - HEADER_LEN;
    if raw
        > stored
            .saturating_mul(MAX_INFLATION)
            .saturating_add(MAX_CHUNK_RAW_LEN)
    {
        return Err(malformed(format!(
            "claims {raw} decoded bytes from {stored} stored, more than {MAX_INFLATION}× \
             (a decompression bomb?); refusing to decode it"
        )));
    }
    Ok(footer)
}

/// Formats an xxh3-128 hash as 32 hex digits.
pub fn hash128_hex(data: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(data))
}

/// Parses 32 hex digits.
pub fn parse_hash128(s: &str) -> Option<u128> {
    if s.len() != 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}
