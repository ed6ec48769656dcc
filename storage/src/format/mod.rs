//! Checkpoint format v1: shard files of compressed, hashed chunks, and the JSON manifest that
//! commits them.
//!
//! - [`codec`]: float-aware byte planes, then zstd.
//! - [`shard`]: header, chunks, footer index, trailer.
//! - [`manifest`]: the commit marker and table of contents.
//!
//! Every file carries [`FORMAT_VERSION`]; readers refuse any other version by name.

pub mod codec;
pub mod manifest;
pub mod shard;

/// The one format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
