//! lockstep-storage: the checkpoint format and the store that writes, commits, verifies and
//! garbage-collects checkpoints over any `object_store` backend (`file://` and NFS paths,
//! `s3://`, `memory://`).
//!
//! # Layout
//! - [`format`]: format v1 — the float-aware chunk [`format::codec`], [`format::shard`] files
//!   (chunks + footer index + trailer) and the [`format::manifest`] commit marker.
//! - [`store`]: [`CheckpointStore`] — list, latest, commit, [`CheckpointStore::commit_step`]
//!   (the one commit path: manifest, then retention), delete, gc; its contract.
//! - [`writer`]: the streaming [`ShardWriter`], whole-shard retries, manifest assembly.
//! - [`reader`]: load and verify, failing closed.
//! - [`resume`]: which checkpoint a run starts from ([`resume::plan`], pure) and
//!   [`CheckpointStore::choose_start`], which sets corrupt ones aside and never deletes.
//! - [`plan`]: which rank writes which bytes (each byte once across data-parallel ranks).
//! - [`files`]: opening local files without hanging on a FIFO or reading without end.
//! - [`objects`]: read any object by URL, expand globs (training data, base models).
//! - [`retention`]: the pure keep-last-N / keep-every-M policy behind [`CheckpointStore::gc`].
//! - [`retry`]: backoff for transient errors. [`fault`]: an [`UnreliableStore`] for tests.
//! - [`conformance`]: the suite every backend passes.

pub mod conformance;
mod dtype;
mod error;
pub mod fault;
pub mod files;
pub mod format;
mod gc;
mod layout;
pub mod lease;
mod local;
mod location;
pub mod objects;
pub mod plan;
pub mod pointer;
pub mod reader;
pub mod resume;
pub mod retention;
pub mod retry;
pub mod store;
#[cfg(feature = "s3-test-server")]
pub mod testing;
pub mod writer;

pub use dtype::DType;
pub use error::{Error, Result, refuses_writes};
pub use fault::{Faults, UnreliableStore};
pub use format::manifest::{Manifest, ShardInfo};
pub use location::Location;
pub use reader::{Checkpoint, Tensor, VerifyReport};
pub use resume::{SetAside, StartPoint, Want};
pub use retention::{KeepReason, RetentionAction, RetentionPolicy};

/// Marks, in a manifest's `trainer_state`, a checkpoint the gang committed itself after it lost
/// its coordinator (the step it was at when it did).
pub const WITHOUT_COORDINATOR: &str = "committed_without_coordinator";
pub use retry::RetryPolicy;
pub use store::{
    CheckpointStore, Committed, GcReport, StepCommit, StepListing, StoreOptions, Stray, StrayKind,
};
pub use writer::{
    CommitInfo, PieceInput, PieceMeta, ShardMeta, ShardWriter, TensorInput, assemble_manifest,
    pieces_for_rank,
};
