//! lockstep-api: the types every lockstep process agrees on. No IO.
//!
//! # Layout
//! - [`config`]: the job configuration schema (TOML; the same schema is embedded in the
//!   Kubernetes TrainJob), with named defaults, `--set key=value` overrides and validation
//!   errors that name the field.
//!
//! The gRPC protocol between coordinator and trainers lands here with the coordinator.

pub mod config;

pub use config::{ConfigError, JobConfig, Resume, Schedule};
