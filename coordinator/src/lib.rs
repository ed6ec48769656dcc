//! lockstep-coordinator: the job state machine, the gRPC service with its commit authority,
//! launchers and metrics. The `lockstep` binary (`main.rs`) is its command line.
//!
//! # Layout
//! - [`state`]: the job lifecycle as pure decisions (unit-tested without IO).
//! - [`service`]: the gRPC service and one supervisor task per job (IO at the edges).
//! - [`launcher`]: the [`launcher::Launcher`] trait and [`launcher::LocalProcess`].
//! - [`record`]: jobs as stored, and the embedded job store (redb).
//! - [`metrics`]: Prometheus counters and the `/metrics` endpoint.

pub mod launcher;
pub mod metrics;
pub mod record;
pub mod service;
pub mod state;

pub use service::{Coordinator, Settings};
