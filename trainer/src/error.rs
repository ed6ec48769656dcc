//! The trainer's one public error type.

/// Why training cannot go on. Each variant names what was at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job config is unusable.
    #[error("config: {0}")]
    Config(#[from] lockstep_api::ConfigError),
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
    /// Anything else that is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// Trainer results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
