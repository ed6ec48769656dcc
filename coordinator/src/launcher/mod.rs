//! Launchers start and kill a job's workers: the [`Launcher`] trait, with one file per
//! backend. [`LocalProcess`] runs `lockstep train` processes on this machine, each in its own
//! process group so that tearing a worker down kills everything it started; Kubernetes gets its
//! own launcher.

mod local;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

pub use local::{
    LEFTOVER_GRACE, LocalProcess, kill_group, local_trainers, mem_available, parent_is_lockstep,
    reap_leftovers,
};

/// What a job's launcher needs beyond its config, from whoever submitted it. It travels with
/// every launch, export and cleanup of the job: set when the job is submitted or adopted,
/// replaced by [`crate::Coordinator::set_placement`] (the next attempt uses the new one).
#[derive(Debug, Clone, Default)]
pub enum Placement {
    /// Nothing more: processes on this machine.
    #[default]
    Here,
    /// Pods made from this LockstepJob: its pod settings, with the config the job started
    /// with in its `spec.config`.
    Pods(Arc<crate::k8s::LockstepJob>),
}

/// What a worker needs to find its job.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The job id (`NAME-` and 16 hex digits).
    pub job_id: String,
    /// The attempt this worker belongs to.
    pub attempt: u32,
    /// Its index in the attempt (it becomes its rank).
    pub worker: u32,
    /// The coordinator's gRPC URL (`http://host:port`).
    pub coordinator: String,
    /// The job's secret: the worker presents it on every call (never on a command line).
    pub token: String,
    /// The job config file and its overrides.
    pub config: PathBuf,
    /// `section.key=value` overrides.
    pub overrides: Vec<String>,
    /// Working directory (relative `file://` URLs resolve against it).
    pub workdir: PathBuf,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// Where its tokenised data is cached (shared by the coordinator's workers on a machine).
    pub data_cache: PathBuf,
    /// Where and how it runs, beyond its config.
    pub placement: Placement,
    /// A replacement of this lost worker (in-place recovery), joining this ring generation of
    /// the running gang; `None`: one of the gang as it starts.
    pub replacing: Option<u32>,
}

/// An export of a job's final checkpoint (`lockstep export`, run by the launcher where the
/// checkpoint can be read: a process here, a Job on Kubernetes).
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The job id.
    pub job_id: String,
    /// `URL@STEP` of the checkpoint.
    pub checkpoint: String,
    /// `export.url`, resolved.
    pub to: String,
    /// The lineage the version joins (`<to>/<name>/`; the job's name).
    pub name: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// A LoRA job's export: `merge` or `adapter`.
    pub lora: String,
    /// `model.base` (resolved) when it is a Hugging Face directory: its tokenizer files go
    /// with the export.
    pub base: Option<String>,
    /// How much worse than the promoted version's eval loss the new one may be and still be
    /// promoted.
    pub max_eval_regression: f64,
    /// Lineage facts for `lockstep.json` (JSON).
    pub lineage: String,
    /// `export.webhook`: where the promotion notice is POSTed (passed in the environment, as
    /// it may carry credentials).
    pub webhook: Option<String>,
    /// Where the export runs (relative `file://` URLs resolve against it).
    pub workdir: PathBuf,
    /// Where its output goes.
    pub log: PathBuf,
    /// Where and how it runs, beyond the job's config.
    pub placement: Placement,
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The attempt the worker belonged to.
    pub attempt: u32,
    /// Its index in the attempt (its rank).
    pub worker: u32,
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Its own last words when it failed: the `error: …` line it printed.
    pub message: Option<String>,
    /// It never started and cannot as specified (Kubernetes: an invalid image name): a
    /// restart cannot fix it. `message` says why.
    pub unstartable: bool,
}

impl Exit {
    /// True for exit status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// It failed with an error a restart cannot fix ([`lockstep_api::EXIT_PERMANENT`]).
    pub fn permanent(&self) -> bool {
        self.unstartable || self.code == Some(i32::from(lockstep_api::EXIT_PERMANENT))
    }

    /// It failed only because another rank went away ([`lockstep_api::EXIT_PEER_LOST`]).
    pub fn peer_lost(&self) -> bool {
        self.code == Some(i32::from(lockstep_api::EXIT_PEER_LOST))
    }

    /// "exited with status 1: error: …", "was killed by SIGKILL".
    pub fn describe(&self) -> String {
        let how = self.how();
        match &self.message {
            Some(m) => format!("{how}: {m}"),
            None => how,
        }
    }

    fn how(&self) -> String {
        match (self.code, self.signal) {
            _ if self.unstartable => "cannot start".into(),
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => format!("was killed by {sig}"),
                Err(_) => format!("was killed by signal {s}"),
            },
            (None, None) => "ended for an unknown reason".into(),
        }
    }
}

/// A launcher could not start a worker.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// This process cannot find its own executable (to start it as `lockstep train`).
    #[error("cannot find this executable to start workers: {0}")]
    NoExecutable(std::io::Error),
    /// Spawning failed.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What could not be started ("worker 1 of attempt 2").
        what: String,
        /// The operating system's (or the API server's) reason.
        source: std::io::Error,
    },
}

/// A job a launcher will not run as configured, or whose inputs are missing: the message names
/// the field (and the figures). The user's to fix: the same config gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Why an export produced no version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// This launcher has no way to run exports.
    #[error("this launcher cannot run exports")]
    Unsupported,
    /// The export ran and failed, or its result could not be read: the message says why.
    #[error("{0}")]
    Failed(String),
}

/// A started worker.
pub trait WorkerHandle: Send + Sync {
    /// Kills it and everything it started (idempotent). Its exit still arrives on the channel.
    fn kill(&self);

    /// Kills this worker alone, whose gang goes on without it (a rank lost for its silence,
    /// before its replacement starts). Its exit still arrives on the channel.
    fn kill_one(&self) {
        self.kill();
    }

    /// Whether it may start: false while a queue holds its gang back (Kubernetes: Kueue keeps
    /// the attempt's JobSet suspended until it admits the whole gang). The gang timeout counts
    /// from when every worker may start.
    fn admitted(&self) -> bool {
        true
    }
}

/// Starts workers.
#[async_trait::async_trait]
pub trait Launcher: Send + Sync + 'static {
    /// Starts `spec`'s worker. When it ends, its [`Exit`] is sent on `exited`.
    async fn launch(
        &self,
        spec: &WorkerSpec,
        exited: mpsc::UnboundedSender<Exit>,
    ) -> Result<Box<dyn WorkerHandle>, LaunchError>;

    /// Whether one worker can be started into a running gang to replace a lost one (in-place
    /// recovery); where not, a lost rank restarts the gang.
    fn replaces_in_place(&self) -> bool {
        false
    }

    /// Kills whatever is left of `job`'s workers from a previous coordinator that died. Only
    /// this job's workers are touched.
    async fn kill_leftovers(&self, job: &str, placement: &Placement);

    /// Where `job`'s workers' logs are, for a user to read: `dir` on this machine (where
    /// the supervisor keeps them), unless the workers run elsewhere.
    fn logs(&self, _job: &str, _placement: &Placement, dir: &std::path::Path) -> String {
        dir.display().to_string()
    }

    /// Whether jobs may be submitted to the coordinator directly (`lockstep submit`, the gRPC
    /// `Submit`). Not where something else owns the jobs (on Kubernetes, LockstepJobs): the
    /// refusal says how to submit there instead.
    fn accepts_submits(&self) -> Result<(), Refused> {
        Ok(())
    }

    /// Whether this launcher can run `config`'s gang at all (checked before a job is
    /// accepted); the error says what is short, with the numbers.
    fn admit(&self, _config: &lockstep_api::JobConfig) -> Result<(), Refused> {
        Ok(())
    }

    /// Checks, where this launcher's workers will read them, that the job's inputs exist
    /// (before the job is accepted); the error names the field. Relative `file://` URLs
    /// resolve against `workdir`.
    async fn preflight(
        &self,
        _config: &lockstep_api::JobConfig,
        _workdir: &std::path::Path,
    ) -> Result<(), Refused> {
        Ok(())
    }

    /// Exports a finished job's checkpoint and promotes it if it passes the gate; returns what
    /// happened, in words (the version, where, promoted or why not), or why it failed.
    async fn export(&self, _spec: &ExportSpec) -> Result<String, ExportError> {
        Err(ExportError::Unsupported)
    }
}
