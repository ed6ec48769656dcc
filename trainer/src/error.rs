//! The trainer's one public error type.

/// Why training cannot go on. Each variant names what was at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job config is unusable.
    #[error("config: {0}")]
    Config(#[from] lockstep_api::ConfigError),
    /// The job config file is unusable.
    #[error("config {file}: {source}")]
    ConfigFile {
        /// The file.
        file: String,
        /// What is wrong, naming the field.
        source: lockstep_api::ConfigError,
    },
    /// A model file (config.json, safetensors) is unusable.
    #[error("{file}: {reason}")]
    Model {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A training data record or file is unusable.
    #[error("{file}:{line}: {reason}")]
    Data {
        /// The file (URL).
        file: String,
        /// 1-based line; 0 when the whole file is at fault.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// A local file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The checkpoint store failed.
    #[error(transparent)]
    Storage(#[from] lockstep_storage::Error),
    /// A checkpoint cannot be resumed by this job.
    #[error("cannot resume from step {step}: {reason}")]
    Resume {
        /// The checkpoint's step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// The loss or a gradient became NaN or infinite.
    #[error("step {step}: {what} is not finite")]
    NotFinite {
        /// The step.
        step: u64,
        /// What went non-finite.
        what: &'static str,
    },
    /// The collective (gradient all-reduce) failed.
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    /// This worker's attempt is over: the coordinator has moved on (a newer attempt, a job that
    /// ended). Nothing is lost by exiting; the coordinator refused the call with
    /// `FailedPrecondition`.
    #[error("{what}: {message}")]
    AttemptOver {
        /// The call.
        what: String,
        /// The coordinator's words (they name the current attempt).
        message: String,
    },
    /// The coordinator cannot be reached or stopped answering; its restart starts a new
    /// attempt from the last committed checkpoint.
    #[error("{what}: lost the coordinator at {url}: {reason}")]
    CoordinatorGone {
        /// The call.
        what: String,
        /// The coordinator's URL.
        url: String,
        /// What the transport said.
        reason: String,
    },
    /// The coordinator refused a call for another reason (a bad token, a bad request).
    #[error("{what}: the coordinator refused ({code:?}): {message}")]
    Refused {
        /// The call.
        what: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The coordinator's words.
        message: String,
    },
    /// The run was asked to stop (a signal, the coordinator's cancel) before training began;
    /// nothing was left half-done.
    #[error("stopped while {what}")]
    Stopped {
        /// What it was doing.
        what: String,
    },
    /// What was asked cannot work as given: a bad argument or setting, a build without the
    /// feature asked for, a file that is not what it must be, a version name that is taken.
    /// The user's to fix; a restart would fail the same way.
    #[error("{0}")]
    Usage(String),
    /// Checkpoints cannot be stored: the store is full, read-only or denies access, or
    /// several checkpoints in a row failed. The run stopped with its last committed
    /// checkpoint intact.
    #[error("{reason}")]
    CheckpointsFailing {
        /// What failed, where, and what is kept.
        reason: String,
        /// The store refuses writes: a restart cannot help.
        refused: bool,
    },
    /// The coordinator is re-forming the gang (a rank was lost): the call was abandoned, and
    /// this rank must regroup ([`crate::recovery`]).
    #[error("{what}: the coordinator is re-forming the gang")]
    Regrouping {
        /// What was abandoned.
        what: String,
    },
    /// The gang lost a rank and could not re-form in place: the coordinator restarts it from
    /// the emergency checkpoint its survivors wrote (or, if that failed, the last one).
    #[error(
        "the gang lost a rank and could not re-form in place: {}",
        match wrote {
            Some(shard) => format!(
                "this rank wrote shard {shard} of the emergency checkpoint of step {step}, and the \
                 coordinator restarts the gang from it"
            ),
            None => format!(
                "other ranks write the emergency checkpoint of step {step}, and the coordinator \
                 restarts the gang from it"
            ),
        }
    )]
    NotReformed {
        /// The emergency checkpoint's step.
        step: u64,
        /// The shard this rank wrote, if it was a writer.
        wrote: Option<u32>,
    },
    /// This process (or a peer it depends on) failed on its own: a thread or runtime would not
    /// start, the ring would not form, a peer sent what it must not. A restart may help.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// This rank failed only because a peer broke or stalled the ring (the coordinator looks
    /// for the peer's own failure before blaming this rank): `lockstep train` exits with
    /// [`lockstep_api::EXIT_PEER_LOST`].
    pub fn is_peer_lost(&self) -> bool {
        matches!(
            self,
            Error::Collective(
                crate::collective::CollectiveError::PeerLost { .. }
                    | crate::collective::CollectiveError::Timeout { .. }
            )
        )
    }

    /// The gang lost a rank (a peer closed or stalled the ring, or the coordinator is
    /// re-forming the gang): with a coordinator that replaces ranks in place, this rank
    /// regroups instead of exiting.
    pub fn breaks_gang(&self) -> bool {
        self.is_peer_lost()
            || matches!(
                self,
                Error::Regrouping { .. }
                    | Error::Collective(crate::collective::CollectiveError::Broken)
            )
    }

    /// A restart cannot fix it: the config, the base model, the data, a checkpoint this job
    /// cannot resume, a non-finite loss (training is bit-reproducible, so it would recur), or
    /// an input that does not exist. `lockstep train` exits with
    /// [`lockstep_api::EXIT_PERMANENT`] for these, and a coordinator fails the job at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Config(_)
            | Error::ConfigFile { .. }
            | Error::Model { .. }
            | Error::Data { .. }
            | Error::Resume { .. }
            | Error::NotFinite { .. }
            | Error::Usage(_) => true,
            // A store that refuses writes refuses them after a restart too; repeated transient
            // failures may pass.
            Error::CheckpointsFailing { refused, .. } => *refused,
            Error::Storage(e) => matches!(
                e,
                // Not `NotFound`: a checkpoint upload can see one transiently. Missing inputs
                // are caught before launch (the coordinator's preflight) or name their file.
                lockstep_storage::Error::InvalidUrl { .. }
                    | lockstep_storage::Error::NotAFile { .. }
                    | lockstep_storage::Error::Refused { .. }
                    | lockstep_storage::Error::Invalid(_)
            ),
            Error::Io { .. }
            | Error::Collective(_)
            | Error::AttemptOver { .. }
            | Error::CoordinatorGone { .. }
            | Error::Refused { .. }
            | Error::Stopped { .. }
            | Error::Regrouping { .. }
            | Error::NotReformed { .. }
            // Internal failures (threads, runtimes, forming the ring, a peer's bad word): a
            // restart may help.
            | Error::Internal(_) => false,
        }
    }
}

/// Trainer results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
