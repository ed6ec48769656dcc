//! The coordinator's one error type, and how each error reaches a gRPC caller.

use tonic::{Code, Status};

use crate::launcher::LaunchError;
use crate::record::StoreError;

/// Why a coordinator operation failed. Each variant names what was at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No job has this id.
    #[error("no job `{0}`")]
    NoSuchJob(String),
    /// The call carries no bearer token.
    #[error("this call needs {whose} token (`authorization: Bearer TOKEN`)")]
    Unauthenticated {
        /// Whose token it needs ("the coordinator's admin", "job `x`'s").
        whose: String,
    },
    /// The call carries a token, but not the right one.
    #[error("the token is not {whose} token")]
    PermissionDenied {
        /// Whose token it needs.
        whose: String,
    },
    /// A worker call for an attempt that is not the job's current one.
    #[error("attempt {attempt} of job `{job}` is over (current: {})", current.map_or("none".into(), |c| c.to_string()))]
    StaleAttempt {
        /// The job.
        job: String,
        /// The attempt the caller belongs to.
        attempt: u32,
        /// The job's current attempt, if any.
        current: Option<u32>,
    },
    /// A request that cannot be carried out as asked.
    #[error("{0}")]
    InvalidArgument(String),
    /// The submitted config is unusable.
    #[error("config: {0}")]
    Config(#[from] lockstep_api::ConfigError),
    /// The job store failed.
    #[error(transparent)]
    JobStore(#[from] StoreError),
    /// A checkpoint store failed.
    #[error(transparent)]
    Storage(#[from] lockstep_storage::Error),
    /// The launcher will not run the job as configured, or its inputs are missing.
    #[error(transparent)]
    Refused(#[from] crate::launcher::Refused),
    /// The launcher could not start a worker.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The store refused or failed a checkpoint's commit.
    #[error("checkpoint {step}: {source}")]
    Commit {
        /// Its step.
        step: u64,
        /// The store's error (shared by every rank waiting on the commit).
        source: std::sync::Arc<lockstep_storage::Error>,
    },
    /// Not every rank reported its shard of a checkpoint in time.
    #[error("checkpoint {step}: not every rank reported its shard within job.collective_timeout")]
    CommitTimeout {
        /// Its step.
        step: u64,
    },
    /// The gang re-forms in place (a rank was lost) before every shard of a checkpoint came:
    /// it will not be committed, and the caller must regroup.
    #[error("checkpoint {step} will not be committed: the gang lost a rank and re-forms")]
    Regrouping {
        /// Its step.
        step: u64,
    },
    /// The gang of an attempt did not assemble (torn down, or the gang timeout passed).
    #[error("the gang did not assemble (attempt torn down or timed out)")]
    GangNotFormed,
    /// Local file IO of the coordinator (its data dir) failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A job with this id exists already (ids carry 64 random bits: a collision is a bug or
    /// a replayed store, and must not overwrite a job).
    #[error("a job `{0}` exists already")]
    JobExists(String),
    /// A background task died (a panic or a cancelled blocking task).
    #[error("internal: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// The store failed in a way that trying again may fix (a timeout, a throttled or
    /// unreachable store), here or in a checkpoint's commit.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Storage(s) => s.is_transient(),
            Error::Commit { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::NoSuchJob(_) => Code::NotFound,
            Error::JobExists(_) => Code::AlreadyExists,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            // The caller's attempt is over (torn down, or its gang never formed).
            Error::StaleAttempt { .. } | Error::GangNotFormed => Code::FailedPrecondition,
            Error::InvalidArgument(_) | Error::Refused(_) | Error::Config(_) => {
                Code::InvalidArgument
            }
            // The attempt restarts (and retries the checkpoint) either way.
            Error::Commit { .. } | Error::Regrouping { .. } => Code::Aborted,
            Error::CommitTimeout { .. } => Code::DeadlineExceeded,
            Error::Storage(s) if s.is_transient() => Code::Unavailable,
            Error::JobStore(_)
            | Error::Storage(_)
            | Error::Launch(_)
            | Error::Io { .. }
            | Error::Task(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        if matches!(e, Error::Regrouping { .. }) {
            status.metadata_mut().insert(
                lockstep_api::proto::REGROUPING,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        status
    }
}

/// Coordinator results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
