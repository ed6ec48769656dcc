//! lockstep-trainer: one rank of a lockstep job — a Llama fine-tuner in Burn.
//!
//! # Layout
//! - [`worker`]: `lockstep train` — one rank: signals, finding the gang, the device, the run.
//! - [`train`]: the training loop of one rank; [`plan`]: what a run derives from its config,
//!   once; [`inputs`]: base model, tokenizer and data; [`resume`]: where the gang starts.
//! - [`checkpoint`]: snapshots, restore, the shard writer thread, and committing (through the
//!   coordinator, or rank 0 through storage's one `commit_step`).
//! - [`progress`]: the progress bar or log lines, and the summary line.
//! - [`model`]: the Llama decoder, its HF `config.json` and safetensors import/export.
//! - [`optim`]: AdamW, gradient clipping, the learning-rate schedule.
//! - [`step`]: one optimizer step (forward, backward, all-reduce, clip, AdamW).
//! - [`collective`]: the [`Collective`] seam: [`Solo`], the [`TcpRing`] all-reduce, NCCL.
//! - [`control`]: the coordinator client: join, heartbeats, shard commits.
//! - [`data`]: packing, shuffling, sharding by rank; the data cursor.
//! - [`eval`]: the held-out loss, summed over the gang.
//! - [`export`]: a checkpoint as a versioned Hugging Face directory; promotion by
//!   compare-and-swap of `latest.json` behind an eval-loss gate.
//! - [`tokenizer`]: HF `tokenizers` or bytes.
//! - [`tokens`]: what a JSONL record holds, and the token store: data tokenised once per
//!   machine, read window by window.
//! - [`webhook`]: the serving handoff: a notice POSTed when an export is promoted.
//! - [`rng`]: the seedable RNG whose state goes into checkpoints.
//! - [`runtime`]: the small IO runtimes of the control stream, checkpoint writes and reads.

pub mod chat;
pub mod checkpoint;
pub mod collective;
pub mod control;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod inputs;
pub mod model;
pub mod optim;
pub mod plan;
pub mod preview;
pub mod progress;
pub mod recovery;
pub mod resume;
pub mod rng;
pub mod runtime;
pub mod step;
pub mod tokenizer;
pub mod tokens;
pub mod train;
pub mod webhook;
pub mod worker;

#[cfg(feature = "cuda")]
pub use collective::Nccl;
pub use collective::{Collective, CollectiveError, RingKey, Solo, TcpRing};
pub use error::{Error, Result};
