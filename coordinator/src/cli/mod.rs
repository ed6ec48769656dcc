//! The user commands of the `lockstep` binary that need no Burn: run a job on this machine,
//! serve, submit, status, watch, cancel ([`jobs`]), and the checkpoint tools ([`ckpt`]). The
//! binary parses arguments and calls these; they print and return the exit status.

pub mod ckpt;
pub mod jobs;
pub mod kube;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a command failed. The message names the file, address or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A local file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read config").
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The job config is unusable.
    #[error("config {file}: {source}")]
    Config {
        /// The file.
        file: PathBuf,
        /// What is wrong, naming the field.
        source: lockstep_api::ConfigError,
    },
    /// An address cannot be listened on.
    #[error("{flag} {addr}: {source}")]
    Listen {
        /// The flag that gave it.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The coordinator cannot be reached.
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Connect {
        /// Its URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The coordinator refused or failed a call; its message says why.
    #[error("{0}")]
    Rpc(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// A checkpoint store failed.
    #[error(transparent)]
    Storage(#[from] lockstep_storage::Error),
    /// The coordinator of this process failed.
    #[error(transparent)]
    Coordinator(#[from] crate::Error),
    /// Arguments that cannot work together.
    #[error("{0}")]
    Usage(String),
    /// Writing the report to stdout failed.
    #[error("write the report: {0}")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        CliError::Rpc(s.message().to_string())
    }
}

/// Command results: the process's exit status, or why it failed.
pub type Result<T = std::process::ExitCode, E = CliError> = std::result::Result<T, E>;
