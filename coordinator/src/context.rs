//! What every part of a running coordinator shares: its settings, the workers' URL, the
//! launcher, the job store and its writer, the jobs in memory, the metrics and the stall clock.
//! [`crate::Coordinator`] holds one behind an `Arc`; each job's supervisor gets a clone of
//! that `Arc`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::launcher::Launcher;
use crate::metrics::Metrics;
use crate::persist::Persister;
use crate::record::JobStore;
use crate::registry::Registry;
use crate::stall::StallClock;

/// A coordinator's shared state.
pub(crate) struct Context {
    /// How it was started.
    pub(crate) settings: Settings,
    /// gRPC URL workers call; set once the server is bound.
    pub(crate) url: Mutex<String>,
    /// Starts and stops workers.
    pub(crate) launcher: Arc<dyn Launcher>,
    /// The job store (`serve`); none for `run` and on Kubernetes.
    pub(crate) store: Option<Arc<JobStore>>,
    /// Writes job records to the store, off the async workers.
    pub(crate) persister: Persister,
    /// The jobs in memory and their live attempts.
    pub(crate) registry: Registry,
    /// Prometheus counters.
    pub(crate) metrics: Metrics,
    /// Notices this process's own stalls, so they are not blamed on workers.
    pub(crate) clock: StallClock,
}

/// Settings of a coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Job logs and configs go under `DATA_DIR/jobs/ID/`; the job store lives here.
    pub data_dir: PathBuf,
    /// Token of the user calls.
    pub admin_token: String,
    /// Keep jobs in `DATA_DIR/jobs.redb` (serve) or only in memory (run).
    pub persist: bool,
}
