//! The chunk codec: float-aware byte planes, then zstd.
//!
//! Floating-point weights compress poorly as a byte stream because every element mixes a
//! low-entropy exponent with a near-random mantissa. The float codecs first move each element's
//! bits into planes of equal significance — for `f32` and `bf16` the whole 8-bit exponent gets a
//! plane of its own — and then compress each plane separately with zstd. Planes that do not
//! shrink (the low mantissa bytes of trained weights, usually) are stored raw, which also keeps
//! the codec fast: a zstd pass over random bytes is skipped after a small sample.
//!
//! Stored layout of a float chunk: `n_planes: u8`, then per plane `mode: u8` (0 raw, 1 zstd) and
//! `stored_len: u32` (little-endian), then the planes' bytes in order. `Raw` and `Zstd` chunks are
//! the bytes themselves or one zstd frame.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use crate::DType;

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Stored as is.
    Raw,
    /// One zstd frame.
    Zstd,
    /// `f32` elements split into exponent / sign+high mantissa / mid / low planes, each zstd'd.
    F32,
    /// `bf16` elements split into exponent / sign+mantissa planes, each zstd'd.
    Bf16,
    /// `f16` elements split into high / low byte planes, each zstd'd.
    F16,
}

impl Codec {
    /// The codec used for tensors of `dtype`.
    pub fn for_dtype(dtype: DType) -> Codec {
        match dtype {
            DType::F32 => Codec::F32,
            DType::Bf16 => Codec::Bf16,
            DType::F16 => Codec::F16,
            _ => Codec::Zstd,
        }
    }

    /// The name used in footers and reports (`raw`, `zstd`, `f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::F32 => "f32",
            Codec::Bf16 => "bf16",
            Codec::F16 => "f16",
        }
    }

    /// Element size the codec's transform works on (1 for byte codecs).
    pub fn element_size(self) -> usize {
        match self {
            Codec::Raw | Codec::Zstd => 1,
            Codec::F32 => 4,
            Codec::Bf16 | Codec::F16 => 2,
        }
    }
}

/// A chunk failed to decode. The caller adds file and chunk.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

const MODE_RAW: u8 = 0;
const MODE_ZSTD: u8 = 1;
/// Bytes of a plane compressed first to decide whether the whole plane is worth compressing.
const SAMPLE: usize = 64 * 1024;
/// A plane whose sample compresses to more than this fraction is stored raw.
const SAMPLE_KEEP_RATIO: f64 = 0.97;

/// Encodes `data` with `codec` at zstd `level`.
///
/// Never panics: a length that is not a multiple of the element size falls back to plain
/// zstd, and data that does not shrink is stored raw; the returned codec says which was used.
/// zstd contexts and plane buffers are kept per thread and reused, so a steady stream of chunks
/// allocates only its outputs.
pub fn encode(codec: Codec, data: &[u8], level: i32) -> (Codec, Vec<u8>) {
    let codec = if !data.len().is_multiple_of(codec.element_size()) {
        Codec::Zstd
    } else {
        codec
    };
    match codec {
        Codec::Raw => (Codec::Raw, data.to_vec()),
        Codec::Zstd => {
            let mut out = Vec::new();
            if compress_plane_into(data, level, false, &mut out) {
                (Codec::Zstd, out)
            } else {
                (Codec::Raw, data.to_vec())
            }
        }
        Codec::F32 | Codec::Bf16 | Codec::F16 => PLANES.with(|planes| {
            let mut planes = planes.borrow_mut();
            let elem = codec.element_size();
            planes.resize_with(elem, Vec::new);
            split(codec, data, &mut planes[..elem]);
            let header = 1 + 5 * elem;
            let mut out = Vec::with_capacity(header + data.len() + 64);
            out.push(elem as u8);
            out.resize(header, 0);
            for (i, plane) in planes[..elem].iter().enumerate() {
                let start = out.len();
                let mode = if compress_plane_into(plane, level, true, &mut out) {
                    MODE_ZSTD
                } else {
                    out.extend_from_slice(plane);
                    MODE_RAW
                };
                let len = (out.len() - start) as u32;
                out[1 + 5 * i] = mode;
                out[2 + 5 * i..6 + 5 * i].copy_from_slice(&len.to_le_bytes());
            }
            (codec, out)
        }),
    }
}

/// Decodes a chunk that holds `raw_len` bytes when decoded.
pub fn decode(codec: Codec, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; raw_len];
    decode_into(codec, stored, &mut out)?;
    Ok(out)
}

/// Decodes a chunk straight into `out`, whose length is the chunk's decoded length.
pub fn decode_into(codec: Codec, stored: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let raw_len = out.len();
    match codec {
        Codec::Raw => {
            if stored.len() != raw_len {
                return Err(DecodeError(format!(
                    "raw chunk holds {} bytes, expected {raw_len}",
                    stored.len()
                )));
            }
            out.copy_from_slice(stored);
            Ok(())
        }
        Codec::Zstd => decompress_exact(stored, out),
        Codec::F32 | Codec::Bf16 | Codec::F16 => {
            let elem = codec.element_size();
            if !raw_len.is_multiple_of(elem) {
                return Err(DecodeError(format!(
                    "{raw_len} bytes is not a whole number of {elem}-byte elements"
                )));
            }
            let n = raw_len / elem;
            let (&n_planes, mut rest) = stored
                .split_first()
                .ok_or_else(|| DecodeError("empty float chunk".into()))?;
            if n_planes as usize != elem {
                return Err(DecodeError(format!(
                    "float chunk has {n_planes} planes, expected {elem}"
                )));
            }
            let mut entries = Vec::with_capacity(elem);
            for _ in 0..elem {
                if rest.len() < 5 {
                    return Err(DecodeError("float chunk header is truncated".into()));
                }
                let mode = rest[0];
                let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                entries.push((mode, len));
                rest = &rest[5..];
            }
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize_with(elem, Vec::new);
                // Raw planes are used in place; zstd planes decode into per-thread buffers.
                let mut raw_planes: Vec<Option<&[u8]>> = Vec::with_capacity(elem);
                for (i, (mode, len)) in entries.into_iter().enumerate() {
                    if rest.len() < len {
                        return Err(DecodeError(format!("plane {i} is truncated")));
                    }
                    let (bytes, tail) = rest.split_at(len);
                    rest = tail;
                    match mode {
                        MODE_RAW if bytes.len() == n => raw_planes.push(Some(bytes)),
                        MODE_RAW => {
                            return Err(DecodeError(format!(
                                "raw plane {i} holds {} bytes, expected {n}",
                                bytes.len()
                            )));
                        }
                        MODE_ZSTD => {
                            let buf = &mut scratch[i];
                            buf.resize(n, 0);
                            decompress_exact(bytes, buf)?;
                            raw_planes.push(None);
                        }
                        other => {
                            return Err(DecodeError(format!("plane {i} has unknown mode {other}")));
                        }
                    }
                }
                if !rest.is_empty() {
                    return Err(DecodeError(format!(
                        "{} trailing bytes after the last plane",
                        rest.len()
                    )));
                }
                let planes: Vec<&[u8]> = raw_planes
                    .iter()
                    .zip(scratch.iter())
                    .map(|(raw, buf)| match raw {
                        Some(r) => *r,
                        None => &buf[..n],
                    })
                    .collect();
                join(codec, &planes, out);
                Ok(())
            })
        }
    }
}

thread_local! {
    /// Per-thread zstd compression context, with the level and tuning it was set to.
    static CCTX: RefCell<Option<(i32, bool, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    /// Per-thread zstd decompression context.
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// Per-thread plane buffers for encoding.
    static PLANES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Per-thread plane buffers for decoding.
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A compressor at `level`; `tuned` for byte planes of floats: a tiny match table (hash log 6)
/// and long minimum matches (7) make zstd spend its time on Huffman-coding literals rather than
/// on searching for the short, useless matches an exponent plane is full of. On trained MiniLM
/// weights this took the ratio from 0.829 to 0.819 (fp32) and 0.684 to 0.665 (bf16), and
/// encoding from 0.75 to 1.1 GB/s per core (benchmarks/README.md).
fn new_compressor(level: i32, tuned: bool) -> Option<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::CParameter;
    let mut c = zstd::bulk::Compressor::new(level).ok()?;
    if tuned {
        c.set_parameter(CParameter::HashLog(6)).ok()?;
        c.set_parameter(CParameter::MinMatch(7)).ok()?;
    }
    Some(c)
}

/// zstd-compresses `data` at `level`, appending the frame to `out`. Returns false (and leaves
/// `out` as it was) when the data does not shrink, judged first on a sample. `tuned` selects
/// the float-plane settings of [`new_compressor`].
fn compress_plane_into(data: &[u8], level: i32, tuned: bool, out: &mut Vec<u8>) -> bool {
    CCTX.with(|cctx| {
        let mut cctx = cctx.borrow_mut();
        if cctx
            .as_ref()
            .is_none_or(|(l, t, _)| (*l, *t) != (level, tuned))
        {
            match new_compressor(level, tuned) {
                Some(c) => *cctx = Some((level, tuned, c)),
                None => return false,
            }
        }
        let Some((_, _, c)) = cctx.as_mut() else {
            return false;
        };
        let start = out.len();
        if data.len() > 2 * SAMPLE {
            let sample = &data[..SAMPLE];
            out.reserve(zstd::zstd_safe::compress_bound(SAMPLE));
            let mut cur = std::io::Cursor::new(&mut *out);
            cur.set_position(start as u64);
            let keep = matches!(c.compress_to_buffer(sample, &mut cur),
                Ok(n) if (n as f64) < SAMPLE_KEEP_RATIO * SAMPLE as f64);
            out.truncate(start);
            if !keep {
                return false;
            }
        }
        out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        let mut cur = std::io::Cursor::new(&mut *out);
        cur.set_position(start as u64);
        match c.compress_to_buffer(data, &mut cur) {
            Ok(n) if n < data.len() => true,
            _ => {
                out.truncate(start);
                false
            }
        }
    })
}

fn decompress_exact(stored: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    DCTX.with(|dctx| {
        let mut dctx = dctx.borrow_mut();
        if dctx.is_none() {
            *dctx = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| DecodeError(format!("zstd context: {e}")))?,
            );
        }
        let Some(d) = dctx.as_mut() else {
            return Err(DecodeError("zstd context unavailable".into()));
        };
        let n = d
            .decompress_to_buffer(stored, &mut *out)
            .map_err(|e| DecodeError(format!("zstd: {e}")))?;
        if n != out.len() {
            return Err(DecodeError(format!(
                "zstd frame decodes to {n} bytes, expected {}",
                out.len()
            )));
        }
        Ok(())
    })
}

/// Splits little-endian elements into `planes` (see the module docs for the bit layout).
fn split(codec: Codec, data: &[u8], planes: &mut [Vec<u8>]) {
    let n = data.len() / codec.element_size();
    for p in planes.iter_mut() {
        p.resize(n, 0);
    }
    match (codec, planes) {
        (Codec::F32, [e, s, m, l]) => {
            // Fixed-size blocks (arrays: no bounds checks in the inner loop).
            const B: usize = 16;
            let f = |c: &[u8]| {
                let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                (
                    x as u8,
                    (x >> 8) as u8,
                    (x >> 23) as u8,
                    (((x >> 31) << 7) | ((x >> 16) & 0x7f)) as u8,
                )
            };
            let blocks = data
                .chunks_exact(4 * B)
                .zip(e.chunks_exact_mut(B))
                .zip(s.chunks_exact_mut(B))
                .zip(m.chunks_exact_mut(B))
                .zip(l.chunks_exact_mut(B));
            for ((((c, e), s), m), l) in blocks {
                let (Ok(c), Ok(e), Ok(s), Ok(m), Ok(l)) = (
                    <&[u8; 4 * B]>::try_from(c),
                    <&mut [u8; B]>::try_from(e),
                    <&mut [u8; B]>::try_from(s),
                    <&mut [u8; B]>::try_from(m),
                    <&mut [u8; B]>::try_from(l),
                ) else {
                    continue;
                };
                for i in 0..B {
                    (l[i], m[i], e[i], s[i]) = f(&c[4 * i..4 * i + 4]);
                }
            }
            for i in n / B * B..n {
                (l[i], m[i], e[i], s[i]) = f(&data[4 * i..4 * i + 4]);
            }
        }
        (Codec::Bf16, [e, s]) => {
            let f = |x: u16| ((x >> 7) as u8, (((x >> 15) << 7) | (x & 0x7f)) as u8);
            const B: usize = 32;
            let blocks = n / B;
            for b in 0..blocks {
                let c = &data[2 * B * b..2 * B * (b + 1)];
                let (eb, sb) = (&mut e[B * b..B * (b + 1)], &mut s[B * b..B * (b + 1)]);
                for i in 0..B {
                    (eb[i], sb[i]) = f(u16::from_le_bytes([c[2 * i], c[2 * i + 1]]));
                }
            }
            for i in blocks * B..n {
                (e[i], s[i]) = f(u16::from_le_bytes([data[2 * i], data[2 * i + 1]]));
            }
        }
        (Codec::F16, [h, l]) => {
            for ((c, h), l) in data.chunks_exact(2).zip(h.iter_mut()).zip(l.iter_mut()) {
                *l = c[0];
                *h = c[1];
            }
        }
        _ => {}
    }
}

/// Inverse of [`split`]; every plane holds `out.len() / element_size` bytes.
fn join(codec: Codec, planes: &[&[u8]], out: &mut [u8]) {
    match (codec, planes) {
        (Codec::F32, [e, s, m, l]) => {
            let f = |e: u8, s: u8, m: u8, l: u8| {
                ((s as u32 >> 7) << 31)
                    | ((e as u32) << 23)
                    | ((s as u32 & 0x7f) << 16)
                    | ((m as u32) << 8)
                    | l as u32
            };
            const B: usize = 16;
            let n = out.len() / 4;
            let blocks = n / B;
            for b in 0..blocks {
                let r = B * b..B * (b + 1);
                let (eb, sb, mb, lb) = (&e[r.clone()], &s[r.clone()], &m[r.clone()], &l[r]);
                let o = &mut out[4 * B * b..4 * B * (b + 1)];
                for i in 0..B {
                    o[4 * i..4 * i + 4]
                        .copy_from_slice(&f(eb[i], sb[i], mb[i], lb[i]).to_le_bytes());
                }
            }
            for i in blocks * B..n {
                out[4 * i..4 * i + 4].copy_from_slice(&f(e[i], s[i], m[i], l[i]).to_le_bytes());
            }
        }
        (Codec::Bf16, [e, s]) => {
            for ((o, &e), &s) in out.chunks_exact_mut(2).zip(e.iter()).zip(s.iter()) {
                let x = ((s as u16 >> 7) << 15) | ((e as u16) << 7) | (s as u16 & 0x7f);
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        (Codec::F16, [h, l]) => {
            for ((o, &h), &l) in out.chunks_exact_mut(2).zip(h.iter()).zip(l.iter()) {
                o[0] = l;
                o[1] = h;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(n: usize) -> Vec<u8> {
        // Deterministic, weight-like values: small magnitudes, both signs.
        let mut s = 0x9e3779b97f4a7c15u64;
        (0..n)
            .flat_map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                (u * 0.04).to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn every_codec_roundtrips() {
        let data = floats(50_000);
        for codec in [Codec::Raw, Codec::Zstd, Codec::F32, Codec::Bf16, Codec::F16] {
            let (used, stored) = encode(codec, &data, 1);
            assert_eq!(
                decode(used, &stored, data.len()).unwrap(),
                data,
                "{codec:?}"
            );
        }
    }

    #[test]
    fn float_planes_beat_plain_zstd_on_weights() {
        let data = floats(200_000);
        let (_, planes) = encode(Codec::F32, &data, 3);
        let (_, plain) = encode(Codec::Zstd, &data, 3);
        assert!(
            planes.len() < plain.len(),
            "{} vs {}",
            planes.len(),
            plain.len()
        );
    }

    #[test]
    fn misaligned_length_falls_back_to_zstd() {
        let data = floats(10);
        let (used, stored) = encode(Codec::F32, &data[..39], 1);
        assert!(matches!(used, Codec::Zstd | Codec::Raw), "{used:?}");
        assert_eq!(decode(used, &stored, 39).unwrap(), &data[..39]);
    }

    #[test]
    fn wrong_length_is_an_error() {
        let data = floats(1000);
        let (used, stored) = encode(Codec::F32, &data, 1);
        assert!(decode(used, &stored, data.len() - 4).is_err());
        assert!(decode(used, &stored[..stored.len() - 1], data.len()).is_err());
    }
}
