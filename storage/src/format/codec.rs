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
/// # Panics
/// Never on any input: a length that is not a multiple of the element size falls back to
/// plain zstd, which [`decode`] is told about through the returned codec.
pub fn encode(codec: Codec, data: &[u8], level: i32) -> (Codec, Vec<u8>) {
    let codec = if !data.len().is_multiple_of(codec.element_size()) {
        Codec::Zstd
    } else {
        codec
    };
    match codec {
        Codec::Raw => (Codec::Raw, data.to_vec()),
        Codec::Zstd => match compress_plane(data, level) {
            (MODE_ZSTD, z) => (Codec::Zstd, z),
            _ => (Codec::Raw, data.to_vec()),
        },
        Codec::F32 | Codec::Bf16 | Codec::F16 => {
            let planes = split(codec, data);
            let mut header = vec![planes.len() as u8];
            let mut body = Vec::with_capacity(data.len());
            for plane in &planes {
                let (mode, bytes) = compress_plane(plane, level);
                let stored: &[u8] = if mode == MODE_RAW { plane } else { &bytes };
                header.push(mode);
                header.extend_from_slice(&(stored.len() as u32).to_le_bytes());
                body.extend_from_slice(stored);
            }
            header.extend_from_slice(&body);
            (codec, header)
        }
    }
}

/// Decodes a chunk that holds `raw_len` bytes when decoded.
pub fn decode(codec: Codec, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    match codec {
        Codec::Raw => {
            if stored.len() != raw_len {
                return Err(DecodeError(format!(
                    "raw chunk holds {} bytes, expected {raw_len}",
                    stored.len()
                )));
            }
            Ok(stored.to_vec())
        }
        Codec::Zstd => decompress_exact(stored, raw_len),
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
            let mut planes = Vec::with_capacity(elem);
            for (i, (mode, len)) in entries.into_iter().enumerate() {
                if rest.len() < len {
                    return Err(DecodeError(format!("plane {i} is truncated")));
                }
                let (bytes, tail) = rest.split_at(len);
                rest = tail;
                let plane = match mode {
                    MODE_RAW if bytes.len() == n => bytes.to_vec(),
                    MODE_RAW => {
                        return Err(DecodeError(format!(
                            "raw plane {i} holds {} bytes, expected {n}",
                            bytes.len()
                        )));
                    }
                    MODE_ZSTD => decompress_exact(bytes, n)?,
                    other => {
                        return Err(DecodeError(format!("plane {i} has unknown mode {other}")));
                    }
                };
                planes.push(plane);
            }
            if !rest.is_empty() {
                return Err(DecodeError(format!(
                    "{} trailing bytes after the last plane",
                    rest.len()
                )));
            }
            Ok(join(codec, &planes, n))
        }
    }
}

fn compress_plane(plane: &[u8], level: i32) -> (u8, Vec<u8>) {
    if plane.len() > 2 * SAMPLE {
        let sample = &plane[..SAMPLE];
        match zstd::bulk::compress(sample, level) {
            Ok(z) if (z.len() as f64) < SAMPLE_KEEP_RATIO * sample.len() as f64 => {}
            _ => return (MODE_RAW, Vec::new()),
        }
    }
    match zstd::bulk::compress(plane, level) {
        Ok(z) if z.len() < plane.len() => (MODE_ZSTD, z),
        _ => (MODE_RAW, Vec::new()),
    }
}

fn decompress_exact(stored: &[u8], raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    let out =
        zstd::bulk::decompress(stored, raw_len).map_err(|e| DecodeError(format!("zstd: {e}")))?;
    if out.len() != raw_len {
        return Err(DecodeError(format!(
            "zstd frame decodes to {} bytes, expected {raw_len}",
            out.len()
        )));
    }
    Ok(out)
}

/// Splits little-endian elements into planes (see the module docs for the bit layout).
fn split(codec: Codec, data: &[u8]) -> Vec<Vec<u8>> {
    match codec {
        Codec::F32 => {
            let n = data.len() / 4;
            let (mut e, mut s, mut m, mut l) =
                (vec![0u8; n], vec![0u8; n], vec![0u8; n], vec![0u8; n]);
            for ((((c, e), s), m), l) in data
                .chunks_exact(4)
                .zip(&mut e)
                .zip(&mut s)
                .zip(&mut m)
                .zip(&mut l)
            {
                let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                *e = (x >> 23) as u8;
                *s = (((x >> 31) << 7) | ((x >> 16) & 0x7f)) as u8;
                *m = (x >> 8) as u8;
                *l = x as u8;
            }
            vec![e, s, m, l]
        }
        Codec::Bf16 => {
            let n = data.len() / 2;
            let (mut e, mut s) = (vec![0u8; n], vec![0u8; n]);
            for ((c, e), s) in data.chunks_exact(2).zip(&mut e).zip(&mut s) {
                let x = u16::from_le_bytes([c[0], c[1]]);
                *e = (x >> 7) as u8;
                *s = (((x >> 15) << 7) | (x & 0x7f)) as u8;
            }
            vec![e, s]
        }
        Codec::F16 => {
            let n = data.len() / 2;
            let (mut h, mut l) = (vec![0u8; n], vec![0u8; n]);
            for ((c, h), l) in data.chunks_exact(2).zip(&mut h).zip(&mut l) {
                *l = c[0];
                *h = c[1];
            }
            vec![h, l]
        }
        Codec::Raw | Codec::Zstd => vec![data.to_vec()],
    }
}

/// Inverse of [`split`]; every plane holds `n` bytes (checked by the caller).
fn join(codec: Codec, planes: &[Vec<u8>], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * codec.element_size()];
    match codec {
        Codec::F32 => {
            for ((((o, &e), &s), &m), &l) in out
                .chunks_exact_mut(4)
                .zip(&planes[0])
                .zip(&planes[1])
                .zip(&planes[2])
                .zip(&planes[3])
            {
                let x = ((s as u32 >> 7) << 31)
                    | ((e as u32) << 23)
                    | ((s as u32 & 0x7f) << 16)
                    | ((m as u32) << 8)
                    | l as u32;
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Codec::Bf16 => {
            for ((o, &e), &s) in out.chunks_exact_mut(2).zip(&planes[0]).zip(&planes[1]) {
                let x = ((s as u16 >> 7) << 15) | ((e as u16) << 7) | (s as u16 & 0x7f);
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Codec::F16 => {
            for ((o, &h), &l) in out.chunks_exact_mut(2).zip(&planes[0]).zip(&planes[1]) {
                o[0] = l;
                o[1] = h;
            }
        }
        Codec::Raw | Codec::Zstd => out.copy_from_slice(&planes[0]),
    }
    out
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
