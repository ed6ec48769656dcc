//! lockstep-trainer: one rank of a lockstep job — a Llama fine-tuner in Burn.
//!
//! # Layout
//! - [`model`]: the Llama decoder, its HF `config.json` and safetensors import/export.
//! - [`optim`]: AdamW, gradient clipping, the learning-rate schedule.
//! - [`step`]: one optimizer step (forward, backward, all-reduce, clip, AdamW).
//! - [`collective`]: the [`Collective`] seam for gradient all-reduce.
//! - [`rng`]: the seedable RNG whose state goes into checkpoints.

pub mod collective;
pub mod error;
pub mod model;
pub mod optim;
pub mod rng;
pub mod step;

pub use collective::{Collective, Solo};
pub use error::{Error, Result};
