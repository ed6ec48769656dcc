//! lockstep-coordinator: runs jobs. It keeps each job's record, launches its gang of workers,
//! lets them meet, commits their checkpoints, and restarts the gang from the last committed
//! checkpoint when a worker dies. It never links Burn and never prints: the `lockstep` binary
//! (crate `cli/`, one file per command) links it with the trainer.
//!
//! # Layout
//! - [`state`]: the job lifecycle as pure decisions (unit-tested without IO).
//! - [`attempt`]: one attempt's deadlines and timeouts as a pure value.
//! - [`commit`]: which shards of which step have arrived, and the commit of a step once all
//!   have.
//! - [`registry`]: the jobs in memory and their live attempt (bookkeeping under short locks).
//! - [`stall`]: noticing the coordinator's own stalls, so they are not blamed on ranks.
//! - `context`: what the parts of a running coordinator share.
//! - [`supervisor`]: one task per job: launch, watch, tear down, restart.
//! - [`service`]: [`Coordinator`], the operations behind the gRPC calls.
//! - [`rpc`]: the gRPC service: proto ↔ domain and [`Error`] → `Status` only.
//! - [`auth`]: bearer tokens (admin and per job) and the gate in front of every call.
//! - [`persist`]: one task writes job records to disk (redb) on the blocking pool.
//! - [`record`]: jobs as stored.
//! - [`launcher`]: the [`launcher::Launcher`] trait and [`launcher::LocalProcess`].
//! - [`metrics`]: Prometheus counters and the `/metrics` endpoint.
//! - [`listen`]: bounded, back-off accepting for both servers.
//! - [`preflight`]: inputs checked before a job is accepted (data and base model exist).
//! - [`private`]: the data dir and its files, readable by this user only.
//!
//! # Checkpoints and resume
//! Workers write shards; the coordinator commits a step with
//! [`lockstep_storage::CheckpointStore::commit_step`] once every rank's shard has arrived, and
//! chooses where an attempt starts with
//! [`lockstep_storage::CheckpointStore::choose_start`] (the same calls a gang without a
//! coordinator makes): the newest checkpoint that verifies; a corrupt one is set aside, never
//! deleted.

pub mod attempt;
pub mod auth;
pub mod commit;
mod context;
pub mod error;
pub mod k8s;
pub mod launcher;
pub mod lease;
pub mod listen;
pub mod metrics;
pub mod persist;
pub mod preflight;
pub mod private;
pub mod record;
pub mod registry;
pub mod rpc;
pub mod service;
pub mod stall;
pub mod state;
pub mod supervisor;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, Result};
pub use service::{Coordinator, Settings};
