//! The manifest: the commit marker of a checkpoint and its table of contents.

use serde::{Deserialize, Serialize};

use super::FORMAT_VERSION;
use crate::DType;

/// The `format` field of every manifest.
pub const MANIFEST_FORMAT: &str = "lockstep-checkpoint";

/// A committed checkpoint's description. Written last, once, by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Format version of the manifest and its shards.
    pub version: u32,
    /// The job that wrote it.
    pub job: String,
    /// Training step the state belongs to.
    pub step: u64,
    /// Ranks that wrote shards (one shard each).
    pub world_size: u32,
    /// Hash of the job config the state was trained with.
    pub config_hash: String,
    /// The step of the checkpoint this run resumed from, if any.
    pub parent: Option<u64>,
    /// Commit time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The shard files, one per rank, in rank order.
    pub shards: Vec<ShardInfo>,
    /// Every tensor of the checkpoint.
    pub tensors: Vec<TensorEntry>,
    /// Trainer state (step, data cursor, RNGs, schedule...), opaque to storage.
    pub trainer_state: serde_json::Value,
}

/// A shard file as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The rank that wrote it.
    pub rank: u32,
    /// File name relative to the step directory.
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// Decoded bytes.
    pub raw_bytes: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// xxh3-64 of the footer, 16 hex digits: binds the shard to this manifest.
    pub footer_hash: String,
}

/// One tensor: its type, shape and where its bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Name, unique in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major, little-endian elements).
    pub shape: Vec<u64>,
    /// Pieces in tensor order; they tile the tensor's bytes.
    pub pieces: Vec<PieceEntry>,
}

/// A contiguous byte range of a tensor stored in one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceEntry {
    /// Rank of the shard holding it.
    pub shard: u32,
    /// Offset of the piece within the tensor's bytes.
    pub tensor_offset: u64,
    /// Offset within the shard's decoded stream.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// xxh3-128 of the piece's decoded bytes, 32 hex digits.
    pub hash: String,
}

impl TensorEntry {
    /// Size in bytes, or `None` when the shape overflows.
    pub fn nbytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |acc, &d| acc.checked_mul(d))
    }
}

#[derive(Deserialize)]
struct Versioned {
    format: Option<String>,
    version: Option<u32>,
}

/// Why a manifest was refused; the caller adds the file name.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A version other than [`FORMAT_VERSION`].
    #[error("format version {0}")]
    Version(u32),
    /// Anything else.
    #[error("{0}")]
    Invalid(String),
}

impl Manifest {
    /// Serialises to pretty JSON (manifests are read by people too).
    pub fn to_json(&self) -> Vec<u8> {
        // A Manifest holds only strings, integers and a JSON value: it always serialises.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and validates a manifest: format and version first (so a newer format is
    /// reported as such, not as a parse error), then the full structure and its invariants.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let head: Versioned = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::Invalid(format!("not a manifest: {e}")))?;
        if head.format.as_deref() != Some(MANIFEST_FORMAT) {
            return Err(ManifestError::Invalid(format!(
                "`format` is {:?}, expected \"{MANIFEST_FORMAT}\"",
                head.format
            )));
        }
        match head.version {
            Some(FORMAT_VERSION) => {}
            Some(v) => return Err(ManifestError::Version(v)),
            None => return Err(ManifestError::Invalid("missing `version`".into())),
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        m.validate().map_err(ManifestError::Invalid)?;
        Ok(m)
    }

    /// Checks the invariants every reader relies on: one shard per rank, pieces that tile each
    /// tensor and lie inside their shard, unique tensor names.
    pub fn validate(&self) -> Result<(), String> {
        if self.world_size == 0 || self.shards.len() != self.world_size as usize {
            return Err(format!(
                "{} shards for world size {}",
                self.shards.len(),
                self.world_size
            ));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.rank as usize != i {
                return Err(format!("shard {i} is labelled rank {}", s.rank));
            }
            if s.file.is_empty() || s.file.contains('/') || s.file.contains("..") {
                return Err(format!("shard {i} has a bad file name {:?}", s.file));
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor `{}` appears twice", t.name));
            }
            let nbytes = t
                .nbytes()
                .ok_or_else(|| format!("tensor `{}` has an overflowing shape", t.name))?;
            let mut at = 0u64;
            for p in &t.pieces {
                let shard = self.shards.get(p.shard as usize).ok_or_else(|| {
                    format!("tensor `{}` names missing shard {}", t.name, p.shard)
                })?;
                let end = p.offset.checked_add(p.length);
                if p.tensor_offset != at || end.is_none_or(|e| e > shard.raw_bytes) {
                    return Err(format!("tensor `{}` has a misplaced piece", t.name));
                }
                if super::shard::parse_hash128(&p.hash).is_none() {
                    return Err(format!("tensor `{}` has a bad piece hash", t.name));
                }
                at = at
                    .checked_add(p.length)
                    .ok_or_else(|| format!("tensor `{}` pieces overflow", t.name))?;
            }
            if at != nbytes {
                return Err(format!(
                    "tensor `{}` pieces hold {at} bytes, its shape needs {nbytes}",
                    t.name
                ));
            }
        }
        Ok(())
    }
}
