//! Fuzzing the parsers with proptest: arbitrary and mutated bytes into the manifest, header,
//! trailer, footer and chunk decoders must produce errors, never panics or huge allocations.

// Test helpers: a failed unwrap is a failed test.

use lockstep_storage::Manifest;
use lockstep_storage::format::codec::{self, Codec};
use lockstep_storage::format::shard::{self, ShardFooter};
use proptest::prelude::*;

const CODECS: [Codec; 5] = [Codec::Raw, Codec::Zstd, Codec::F32, Codec::Bf16, Codec::F16];

fn valid_footer_bytes(n: usize) -> (Vec<u8>, u64) {
    let data: Vec<u8> = (0..n as u32 * 64)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    let mut chunks = Vec::new();
    let mut off = shard::HEADER_LEN;
    let mut raw = 0;
    for c in data.chunks(1024) {
        let (codec, stored) = codec::encode(Codec::F32, c, 1);
        chunks.push(shard::ChunkEntry {
            raw_offset: raw,
            raw_len: c.len() as u64,
            offset: off,
            len: stored.len() as u64,
            codec,
            hash: shard::hash128_hex(&stored),
        });
        off += stored.len() as u64;
        raw += c.len() as u64;
    }
    let footer = ShardFooter {
        version: 1,
        chunks,
        raw_bytes: raw,
    };
    let (tail, _) = shard::encode_footer(&footer);
    (tail, off)
}

fn valid_manifest() -> Vec<u8> {
    br#"{"format":"lockstep-checkpoint","version":1,"job":"j","step":3,"world_size":1,
    "config_hash":"c","parent":null,"created_unix_ms":0,
    "shards":[{"rank":0,"file":"rank-00000.shard","bytes":100,"raw_bytes":8,"chunks":1,"footer_hash":"0000000000000000"}],
    "tensors":[{"name":"w","dtype":"f32","shape":[2],"pieces":[{"shard":0,"tensor_offset":0,"offset":0,"length":8,"hash":"0123456789abcdef0123456789abcdef"}]}],
    "trainer_state":{}}"#
        .to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn manifest_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Manifest::parse(&bytes);
    }

    #[test]
    fn mutated_manifests_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut m = valid_manifest();
        prop_assert!(Manifest::parse(&m).is_ok());
        for (i, b) in flips {
            let at = i.index(m.len());
            m[at] = b;
        }
        let _ = Manifest::parse(&m);
    }

    #[test]
    fn huge_numbers_in_manifests_are_errors(n in any::<u64>(), d in any::<u64>()) {
        let m = String::from_utf8(valid_manifest()).unwrap()
            .replace("\"shape\":[2]", &format!("\"shape\":[{n},{d}]"))
            .replace("\"length\":8", &format!("\"length\":{n}"));
        let _ = Manifest::parse(m.as_bytes());
    }

    #[test]
    fn shard_index_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), file_len in any::<u64>()) {
        let _ = shard::parse_header(&bytes);
        if let Ok(t) = shard::parse_trailer(&bytes[..bytes.len().min(32)], file_len) {
            let _ = shard::parse_footer(&bytes, &t, file_len);
        }
    }

    #[test]
    fn mutated_footers_never_panic(n in 1usize..6, flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let (mut tail, data_end) = valid_footer_bytes(n);
        for (i, b) in flips {
            let at = i.index(tail.len());
            tail[at] = b;
        }
        let file_len = data_end + tail.len() as u64;
        let trailer = &tail[tail.len() - 32..];
        if let Ok(t) = shard::parse_trailer(trailer, file_len) {
            let start = (tail.len() as u64 - 32).saturating_sub(t.footer_len) as usize;
            let _ = shard::parse_footer(&tail[start..tail.len() - 32], &t, file_len);
        }
    }

    #[test]
    fn chunk_decoder_never_panics(codec in 0usize..5, bytes in proptest::collection::vec(any::<u8>(), 0..300), raw_len in 0usize..100_000) {
        let _ = codec::decode(CODECS[codec], &bytes, raw_len);
    }

    #[test]
    fn mutated_chunks_never_panic(codec in 0usize..5, flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let data: Vec<u8> = (0..4096u32).flat_map(|i| ((i % 97) as f32 * 0.25).to_le_bytes()).collect();
        let (used, mut stored) = codec::encode(CODECS[codec], &data, 1);
        for (i, b) in flips {
            let at = i.index(stored.len());
            stored[at] = b;
        }
        let _ = codec::decode(used, &stored, data.len());
    }

    #[test]
    fn codecs_roundtrip_any_bytes(codec in 0usize..5, data in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let (used, stored) = codec::encode(CODECS[codec], &data, 1);
        prop_assert_eq!(codec::decode(used, &stored, data.len()).unwrap(), data);
    }
}

/// A footer that claims more decoded bytes than any chunk or shard can hold (the shape of a
/// decompression bomb: a few kilobytes claiming gigabytes) is refused when parsed, before
/// anything is decoded or allocated.
#[test]
fn footers_claiming_implausible_decoded_sizes_are_refused() {
    let parse = |chunks: Vec<shard::ChunkEntry>, raw: u64, stored_end: u64| {
        let footer = ShardFooter {
            version: 1,
            chunks,
            raw_bytes: raw,
        };
        let (tail, _) = shard::encode_footer(&footer);
        let file_len = stored_end + tail.len() as u64;
        let t = shard::parse_trailer(&tail[tail.len() - 32..], file_len).unwrap();
        shard::parse_footer(&tail[..tail.len() - 32], &t, file_len)
    };
    let chunk = |i: u64, raw_len: u64, len: u64| shard::ChunkEntry {
        raw_offset: i * raw_len,
        raw_len,
        offset: shard::HEADER_LEN + i * len,
        len,
        codec: Codec::Zstd,
        hash: shard::hash128_hex(b"x"),
    };
    // One chunk claiming 256 MiB.
    let e = parse(
        vec![chunk(0, 256 << 20, 100)],
        256 << 20,
        shard::HEADER_LEN + 100,
    )
    .unwrap_err();
    assert!(e.to_string().contains("implausibly large"), "{e}");
    // 1,000 chunks of 64 MiB from 10 bytes each: 62.5 GiB from 10 KB.
    let n = 1000;
    let chunks: Vec<_> = (0..n).map(|i| chunk(i, 64 << 20, 10)).collect();
    let e = parse(chunks, n * (64 << 20), shard::HEADER_LEN + n * 10).unwrap_err();
    assert!(e.to_string().contains("decompression bomb"), "{e}");
}
