//! The trainer's async runtimes: each IO side (the control stream, checkpoint writes, the
//! training loop's reads) owns a small runtime of its own, so a slow store never stalls the
//! training thread and nothing async runs on it.

use crate::error::{Error, Result};

/// A runtime of one worker thread named `name`, IO and timers on.
pub fn io(name: &'static str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the {name} runtime: {e}")))
}
