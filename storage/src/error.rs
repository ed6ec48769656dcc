//! The storage crate's one public error type.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing checkpoints.
///
/// Variants name the file (object path) and, for corruption, the chunk, so an operator can act on
/// the message alone. [`Error::is_transient`] tells retry loops which errors are worth retrying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkpoint URL could not be understood.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The object store failed an operation.
    #[error("{op} `{path}`: {source}")]
    Store {
        /// The operation, as a verb ("upload shard", "read manifest").
        op: &'static str,
        /// The object path.
        path: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },

    /// A local path that must be a file is a FIFO, socket, device or directory (never opened:
    /// a FIFO would hang the open).
    #[error("`{path}` is {what}, not a regular file")]
    NotAFile {
        /// The URL.
        path: String,
        /// What it is instead ("a FIFO").
        what: &'static str,
    },

    /// A file that must exist does not.
    #[error("`{path}` not found")]
    NotFound {
        /// The object path.
        path: String,
    },

    /// The step has no committed manifest.
    #[error("no committed checkpoint at step {step} under `{url}`")]
    NotCommitted {
        /// The checkpoint root.
        url: String,
        /// The requested step.
        step: u64,
    },

    /// A file was written by a format version this build does not read.
    #[error("`{file}` has format version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        /// The object path.
        file: String,
        /// The version found in the file.
        found: u32,
        /// The version this build supports.
        supported: u32,
    },

    /// A file's bytes do not match what the checkpoint promised: a flipped bit, a truncated or
    /// missing part, a file from another checkpoint.
    #[error("corrupt checkpoint file `{file}`{}: {reason}", chunk.map(|c| format!(" (chunk {c})")).unwrap_or_default())]
    Corrupt {
        /// The object path.
        file: String,
        /// The chunk index within a shard, when the problem is in one chunk.
        chunk: Option<usize>,
        /// What failed to check.
        reason: String,
    },

    /// Another committer already wrote a different manifest for this step.
    #[error("step {step} is already committed with a different manifest at `{path}`")]
    AlreadyCommitted {
        /// The step.
        step: u64,
        /// The manifest path.
        path: String,
    },

    /// An upload reported success but the stored object is not what was sent.
    #[error("upload of `{path}` is torn: stored {found} bytes, sent {expected}")]
    TornUpload {
        /// The object path.
        path: String,
        /// Bytes sent.
        expected: u64,
        /// Bytes the store holds.
        found: u64,
    },

    /// A run must not start from these checkpoints (see [`crate::resume`]); the reason names the
    /// checkpoint root and what to do.
    #[error("{reason}")]
    Refused {
        /// Why, in words.
        reason: String,
    },

    /// Not enough memory for something a checkpoint needs (it is too big for this machine).
    #[error("not enough memory for {what} ({bytes} bytes)")]
    OutOfMemory {
        /// What needed it.
        what: String,
        /// How much.
        bytes: u64,
    },

    /// The caller asked for something that cannot be done (a bad argument, not bad data).
    #[error("invalid request: {0}")]
    Invalid(String),

    /// Local file IO (fsync of a `file://` store) failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// The operation, as a verb.
        op: &'static str,
        /// The local path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },

    /// A blocking task (compression, hashing, fsync) panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// Whether retrying the same operation may succeed: network and server errors are
    /// transient; corruption, missing files, version and precondition errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { source, .. } => store_error_is_transient(source),
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            // Writing it again is the fix.
            Error::TornUpload { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn store(
        op: &'static str,
        path: impl ToString,
        source: object_store::Error,
    ) -> Self {
        match source {
            object_store::Error::NotFound { path, .. } => Error::NotFound { path },
            source => Error::Store {
                op,
                path: path.to_string(),
                source,
            },
        }
    }

    pub(crate) fn corrupt(
        file: impl ToString,
        chunk: Option<usize>,
        reason: impl ToString,
    ) -> Self {
        Error::Corrupt {
            file: file.to_string(),
            chunk,
            reason: reason.to_string(),
        }
    }
}

/// Classifies object store errors for retry loops. HTTP client errors (4xx other than 408 and
/// 429: bad credentials, a missing bucket, a rejected request) are permanent; everything else
/// an object store reports generically (5xx, connection resets, injected faults) is transient.
/// Why a store takes no more writes, if that is what `e` (or a cause of it) says: full, over
/// its quota, read-only, or denied. A retry, or a restart, fails the same way.
pub fn refuses_writes(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(o) = c.downcast_ref::<object_store::Error>()
            && matches!(
                o,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            )
        {
            return Some("access denied");
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.raw_os_error() {
                Some(28) => return Some("no space left on the device"),
                Some(122) => return Some("disk quota exceeded"),
                Some(30) => return Some("read-only file system"),
                Some(13) | Some(1) => return Some("permission denied"),
                _ => {}
            }
        }
        cause = c.source();
    }
    None
}

pub(crate) fn store_error_is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    if refuses_writes(e).is_some() {
        return false;
    }
    // object_store 0.14 keeps its HTTP error type private; its message carries the status.
    if let Some(status) = http_status(&e.to_string())
        && (400..500).contains(&status)
        && status != 408
        && status != 429
    {
        return false;
    }
    !matches!(
        e,
        E::NotFound { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotImplemented { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

/// Result with the storage [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The HTTP status in an object store error message ("... non-2xx status code: 403 ...").
fn http_status(message: &str) -> Option<u16> {
    let at = message.find("status code: ")? + "status code: ".len();
    message.get(at..at + 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_permanent_server_errors_transient() {
        let generic = |m: &str| object_store::Error::Generic {
            store: "S3",
            source: m.to_string().into(),
        };
        let forbidden = generic("Server returned non-2xx status code: 403 Forbidden: <Error/>");
        assert!(!store_error_is_transient(&forbidden));
        let slow_down = generic("Server returned non-2xx status code: 503 Service Unavailable");
        assert!(store_error_is_transient(&slow_down));
        assert!(store_error_is_transient(&generic("connection reset")));
        assert!(store_error_is_transient(&generic(
            "non-2xx status code: 429 Too Many"
        )));
    }
}
