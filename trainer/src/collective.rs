//! The seam between the training loop and the gradient all-reduce. World size 1 is [`Solo`],
//! which does nothing; the TCP ring and NCCL implement the same trait.

use crate::error::Result;

/// Sums buffers across the ranks of a data-parallel gang.
pub trait Collective: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Ranks in the gang.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum over all ranks, bit-identical on
    /// every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
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
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}
