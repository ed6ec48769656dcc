//! [`Nccl`]: gradient all-reduce on NVIDIA GPUs through NCCL (feature `cuda`), with cudarc's
//! safe bindings. The communicator is formed from a unique id that rank 0 creates and sends to
//! the others over the gang's [`TcpRing`], which also carries the small host-side broadcasts and
//! barriers (a few bytes per step, not worth a device round trip).
//!
//! # The copy this makes, and why
//! The training step hands the collective host `f32` buckets (`&mut [f32]`), the same seam the
//! CPU ring uses, so each bucket is copied host → device into one reused device buffer,
//! all-reduced in place there by NCCL, and copied back (two PCIe copies of the bucket per step
//! on top of the gradient download the step already makes). The zero-copy path — handing NCCL
//! the device pointers of Burn's own gradient buffers (design.md "Dependency facts": cubecl
//! handle → resource pointer → `upgrade_device_ptr` → `leak`) — needs `unsafe` access to
//! memory Burn owns, and no GPU was available to test it; an untested `unsafe` path that could
//! free or corrupt Burn's memory is worse than a measured copy. This module has no `unsafe`.
//!
//! # Never a hang
//! NCCL kernels wait forever for a dead peer. Each all-reduce records an event after the kernel
//! and waits for it at most `timeout` (sleeping between queries, starting at 50 µs); past that
//! the collective is broken and the communicator is dropped, which aborts it
//! (`ncclCommAbort`) and frees the stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError, TcpRing};

/// NCCL's unique id is 128 bytes.
const ID_BYTES: usize = 128;

/// One rank of an NCCL gang on CUDA device `ordinal` of this process.
pub struct Nccl {
    ring: TcpRing,
    /// Dropped (aborted) on failure.
    comm: Option<Comm>,
    stream: Arc<CudaStream>,
    staging: Option<CudaSlice<f32>>,
    timeout: Duration,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.ring.rank())
            .field("world_size", &self.ring.world_size())
            .field("broken", &self.comm.is_none())
            .finish()
    }
}

fn device_err(what: impl std::fmt::Display, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Device {
        what: format!("{what}: {e:?}"),
    }
}

impl Nccl {
    /// Forms the NCCL communicator for the ranks of `ring` on CUDA device `ordinal`. Rank 0
    /// creates the unique id and broadcasts it over the ring; every rank then joins.
    /// `timeout` bounds each all-reduce.
    pub fn new(
        mut ring: TcpRing,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| device_err(format!("open CUDA device {ordinal}"), e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| device_err("create a CUDA stream", e))?;
        let mut id_bytes = [0u8; ID_BYTES];
        if ring.rank() == 0 {
            let id = Id::new().map_err(|e| {
                device_err(
                    "create the NCCL unique id (is libnccl.so on the loader path?)",
                    e.0,
                )
            })?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
                *b = c.to_ne_bytes()[0];
            }
        }
        ring.broadcast(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (c, b) in internal.iter_mut().zip(id_bytes) {
            *c = std::ffi::c_char::from_ne_bytes([b]);
        }
        let (rank, world) = (ring.rank(), ring.world_size());
        // ncclCommInitRank waits for every rank; the ring above just proved they are all alive.
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| device_err(format!("join the NCCL communicator as rank {rank}"), e.0))?;
        tracing::info!(rank, world, ordinal, "NCCL communicator formed");
        Ok(Self {
            ring,
            comm: Some(comm),
            stream,
            staging: None,
            timeout,
        })
    }

    fn reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let comm = self.comm.as_ref().ok_or(CollectiveError::Broken)?;
        let stream = &self.stream;
        if self.staging.as_ref().is_none_or(|s| s.len() < buf.len()) {
            self.staging = Some(
                stream
                    .alloc_zeros::<f32>(buf.len())
                    .map_err(|e| device_err(format!("allocate {} floats", buf.len()), e))?,
            );
        }
        let Some(staging) = self.staging.as_mut() else {
            return Err(CollectiveError::Broken);
        };
        let mut view = staging.slice_mut(0..buf.len());
        stream
            .memcpy_htod(&*buf, &mut view)
            .map_err(|e| device_err("copy a bucket to the GPU", e))?;
        comm.all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| device_err("NCCL all-reduce", e.0))?;
        let done = stream
            .record_event(None)
            .map_err(|e| device_err("record a CUDA event", e))?;
        let start = Instant::now();
        let mut nap = Duration::from_micros(50);
        loop {
            match done.try_is_complete() {
                Ok(true) => break,
                Ok(false) if start.elapsed() < self.timeout => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(2));
                }
                Ok(false) => {
                    // The peer that stalls is unknown to NCCL; name the ring neighbour.
                    return Err(CollectiveError::Timeout {
                        peer: (self.ring.rank() + 1) % self.ring.world_size(),
                        op: "NCCL all-reduce",
                        timeout: self.timeout,
                    });
                }
                Err(e) => return Err(device_err("wait for the NCCL all-reduce", e)),
            }
        }
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(|e| device_err("copy a bucket from the GPU", e))?;
        stream
            .synchronize()
            .map_err(|e| device_err("synchronise the CUDA stream", e))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world_size(&self) -> usize {
        self.ring.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return if self.comm.is_some() {
                Ok(())
            } else {
                Err(CollectiveError::Broken)
            };
        }
        let result = self.reduce(buf);
        if result.is_err() {
            // Dropping the communicator aborts it, releasing kernels stuck on a dead peer.
            self.staging = None;
            self.comm = None;
        }
        result
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        if self.comm.is_none() {
            return Err(CollectiveError::Broken);
        }
        self.ring.broadcast(buf, root)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        if self.comm.is_none() {
            return Err(CollectiveError::Broken);
        }
        self.ring.barrier()
    }
}
