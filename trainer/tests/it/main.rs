//! The trainer library's integration tests, as one test binary (one link instead of two).

#![allow(clippy::unwrap_used)]

mod export;
mod lora;
mod parity;
