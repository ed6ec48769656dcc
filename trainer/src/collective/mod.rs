//! The seam between the training loop and cross-rank communication: gradient all-reduce,
//! broadcast of small values, barriers. World size 1 is [`Solo`], which does nothing;
//! [`TcpRing`] connects CPU ranks over TCP; `Nccl` (feature `cuda`) reduces on GPUs.
//!
//! Every operation is bounded by a timeout: a dead or hung peer is an error naming it, never a
//! hang. After an error the collective is broken and every later call fails.

mod handshake;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp_ring;

use std::time::Duration;

pub use handshake::Abandon;
#[cfg(feature = "cuda")]
pub use nccl::Nccl;
pub use tcp_ring::{RingKey, TcpRing};

/// Why a collective operation failed. Each variant names the peer rank involved.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// This rank cannot listen on its address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A peer could not be reached while the ring was being formed.
    #[error("cannot connect to rank {peer} at {addr} within {timeout:?}: {reason}")]
    Connect {
        /// Its rank.
        peer: usize,
        /// Its address.
        addr: String,
        /// How long was tried.
        timeout: Duration,
        /// The last error.
        reason: String,
    },
    /// The ring was given up as it formed: a member was lost (the coordinator said so).
    #[error("gave up forming the ring: {0}")]
    Abandoned(String),
    /// A peer closed its connection or the connection broke: the peer died.
    #[error("rank {peer} is gone ({op}): {source}")]
    PeerLost {
        /// Its rank.
        peer: usize,
        /// The operation.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A peer sent or accepted nothing for the whole timeout: hung, or stuck on a dead rank.
    #[error("no progress with rank {peer} for {timeout:?} ({op}); a rank is dead or hung")]
    Timeout {
        /// Its rank.
        peer: usize,
        /// The operation.
        op: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// A peer sent something that is not this protocol.
    #[error("rank {peer}: {what}")]
    Protocol {
        /// Its rank.
        peer: usize,
        /// What was wrong.
        what: String,
    },
    /// The GPU side (CUDA or NCCL) failed.
    #[error("GPU collective: {what}")]
    Device {
        /// What failed, with the library's error.
        what: String,
    },
    /// An earlier failure broke the collective.
    #[error("the collective failed earlier and cannot be used")]
    Broken,
}

/// Cross-rank operations of a data-parallel gang. All ranks call the same operations in the
/// same order with buffers of the same length.
pub trait Collective {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Ranks in the gang.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum over all ranks. Every rank gets
    /// bit-identical results, and the same inputs always give the same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// Leaves the gang after a failure: closes this rank's connections, so that every peer
    /// still waiting on it fails at once instead of at its timeout. Every later call fails.
    fn leave(&mut self) {}
    /// Continues over `ring`, a re-formed gang of the same ranks (in-place recovery: a lost
    /// rank was replaced). Fails where the collective cannot take a new member in place.
    fn reform(&mut self, ring: TcpRing) -> Result<(), CollectiveError> {
        drop(ring);
        Err(CollectiveError::Device {
            what: "this collective cannot re-form in place".into(),
        })
    }
}

/// A gang of one.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [u8], _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}
