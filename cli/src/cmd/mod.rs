//! The commands of the `lockstep` binary, one file each: its clap arguments and its
//! `run(args) -> Result<ExitCode>`. The libraries return values and typed errors; these files
//! are the only code that prints.
//!
//! - [`run`]: `lockstep run` — a whole job on this machine.
//! - [`serve`]: `lockstep serve` — the coordinator service (local processes or Kubernetes).
//! - [`client`]: `submit`, `status`, `watch`, `cancel` — calls to a running coordinator.
//! - [`kube`]: `crd`, `render`, and the LockstepJob that `submit --kubernetes` creates.
//! - [`ckpt`]: `ckpt ls|inspect|verify|gc`.
//! - [`export`]: `export` and `export ls`.
//! - [`plan`]: `plan` — one rank's memory, and whether it fits.
//! - [`train`]: `train` — one rank.
//! - [`view`]: how a job's progress and summary look (`run`, `watch`).

pub mod ckpt;
pub mod client;
pub mod data;
pub mod export;
pub mod kube;
pub mod plan;
pub mod run;
pub mod serve;
pub mod train;
mod view;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lockstep_api::JobConfig;

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
    Coordinator(#[from] lockstep_coordinator::Error),
    /// The trainer library failed (export).
    #[error(transparent)]
    Trainer(#[from] lockstep_trainer::Error),
    /// Arguments that cannot work together.
    #[error("{0}")]
    Usage(String),
    /// Writing the report to stdout failed.
    #[error("write the report: {0}")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        use tonic::Code;
        let msg = s.message();
        // No answer at all, only a connection that broke: most often a client speaking
        // plaintext to a TLS coordinator (or TLS to a plaintext one), which says nothing more.
        let broke = matches!(
            s.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled | Code::Internal
        ) && [
            "operation was canceled",
            "transport error",
            "h2 protocol error",
            "connection",
        ]
        .iter()
        .any(|w| msg.contains(w));
        if broke {
            return CliError::Rpc(format!(
                "{msg} (the connection broke before the coordinator answered: one that serves \
                 TLS needs an https:// --coordinator URL, one without TLS an http:// URL)"
            ));
        }
        CliError::Rpc(msg.to_string())
    }
}

impl From<tokio::task::JoinError> for CliError {
    fn from(e: tokio::task::JoinError) -> CliError {
        CliError::Coordinator(e.into())
    }
}

/// Command results: the process's exit status, or why it failed.
pub type Result<T = ExitCode, E = CliError> = std::result::Result<T, E>;

/// The one async runtime of a command: multi-threaded, IO and timers on. An error (printed)
/// exits with `error_code`.
pub fn block_on(error_code: u8, command: impl Future<Output = Result>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(error_code);
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(error_code)
        }
    }
}

/// A job config as read from its file: the text (`{date}` filled in; what a coordinator keeps
/// and hands its workers) and what it parses to with the `--set` overrides.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file's text with `{date}` replaced.
    pub text: String,
    /// The validated config, overrides applied.
    pub config: JobConfig,
    /// What `{date}` became (YYYY-MM-DD).
    pub date: String,
    /// The `--set` overrides, `{date}` replaced in them too.
    pub sets: Vec<String>,
}

/// Reads and validates the config at `path` once: `{date}` replaced by `date` (default: today,
/// UTC), `sets` applied, every field checked; errors name the file and field. Blocking (a
/// command calls it before it starts anything).
pub fn load(path: &Path, sets: &[String], date: Option<&str>) -> Result<Loaded> {
    let date = match date {
        Some(d) => {
            lockstep_api::date::check(d).map_err(CliError::Usage)?;
            d.to_string()
        }
        None => lockstep_api::date::today(),
    };
    let text = String::from_utf8(read_small("read config", path)?).map_err(|e| {
        CliError::Usage(format!(
            "{}: not UTF-8 text (byte {}): not a config",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let text = lockstep_api::date::apply(&text, &date);
    let sets: Vec<String> = sets
        .iter()
        .map(|s| lockstep_api::date::apply(s, &date))
        .collect();
    let config = JobConfig::parse(&text, &sets).map_err(|source| CliError::Config {
        file: path.to_path_buf(),
        source,
    })?;
    Ok(Loaded {
        text,
        config,
        date,
        sets,
    })
}

/// Loads a config whose job runs as separate worker processes (`run`, `submit`): an
/// in-memory checkpoint store would be invisible to them.
pub fn load_for_workers(path: &Path, sets: &[String], date: Option<&str>) -> Result<Loaded> {
    let loaded = load(path, sets, date)?;
    if loaded.config.checkpoint.url.starts_with("memory:") {
        return Err(CliError::Usage(format!(
            "config {}: checkpoint.url `{}` lives in one process's memory, and a job's workers \
             are separate processes; use a file:// or s3:// URL",
            path.display(),
            loaded.config.checkpoint.url
        )));
    }
    Ok(loaded)
}

/// The most bytes read from a config, certificate or key file: far more than any real one,
/// and a `/dev/zero` given by mistake is refused instead of filling memory.
pub const MAX_SMALL_FILE: u64 = 4 << 20;

/// Reads `path` (for `op`, e.g. "read --tls-cert"), refusing one larger than
/// [`MAX_SMALL_FILE`] (or endless). Blocking.
pub fn read_small(op: &'static str, path: &Path) -> Result<Vec<u8>> {
    let io = |source| CliError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    // Opened without blocking (a FIFO nobody writes to would hang the open), then read
    // blocking: a pipe (`<(…)`) still delivers what its writer writes, and one without a
    // writer reads as empty.
    let bytes = lockstep_storage::files::read_bounded(path, MAX_SMALL_FILE).map_err(io)?;
    if bytes.is_empty() {
        return Err(CliError::Usage(format!(
            "{op} {}: {}",
            path.display(),
            if lockstep_storage::files::is_pipe(path) {
                "a pipe that delivered nothing (nobody wrote to it)"
            } else {
                "the file is empty"
            }
        )));
    }
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(CliError::Usage(format!(
            "{}: larger than {} MiB: not a config, certificate or key ({op})",
            path.display(),
            MAX_SMALL_FILE >> 20
        )));
    }
    Ok(bytes)
}

/// The working directory (relative paths of a config resolve against it).
pub fn current_dir() -> Result<PathBuf> {
    std::env::current_dir().map_err(|source| CliError::Io {
        op: "find",
        path: PathBuf::from("the working directory"),
        source,
    })
}

/// `e` and its sources, joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // Some errors already print their source.
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
