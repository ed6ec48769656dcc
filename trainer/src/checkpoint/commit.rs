//! Committing checkpoints from a gang (world size 1 is a gang of one). Every rank's writer writes
//! that rank's shard; after every step the ranks agree over the collective whether every shard
//! is durable (or one failed), so they all see a checkpoint complete at the same step. Then the
//! commit authority commits it:
//! - with a coordinator, each rank reports its shard (`CommitShard`); the coordinator commits
//!   once it has all of them and answers every rank;
//! - without one, rank 0 gathers the shards' metadata over the collective, commits with
//!   [`CheckpointStore::commit_step`] and tells the others how it went.

use std::sync::Arc;
use std::time::Duration;

use lockstep_storage::{CheckpointStore, RetentionPolicy, ShardMeta, StepCommit};

use super::{CheckpointWriter, Snapshot, TrainerState, Written};
use crate::collective::Collective;
use crate::error::{Error, Result};

/// A rank's durable shard of a checkpoint, reported to the commit authority.
#[derive(Debug)]
pub struct ShardReport<'a> {
    /// This rank.
    pub rank: u32,
    /// The trainer state at that step (the same on every rank).
    pub state: &'a TrainerState,
    /// The shard.
    pub shard: &'a ShardMeta,
    /// Hash of the job config, for the manifest.
    pub config_hash: &'a str,
    /// Time the writer took.
    pub write_time: Duration,
}

/// Commits checkpoints on behalf of the gang: the coordinator's `CommitShard`.
pub trait ShardCommitter: Send + Sync + std::fmt::Debug {
    /// Reports `report`'s shard as durable; returns once the whole checkpoint is committed,
    /// with its stored and raw bytes, or why it cannot be.
    fn commit_shard(&self, report: ShardReport<'_>) -> Result<(u64, u64)>;

    /// The coordinator is gone (this rank lost its heartbeat stream): the gang commits its
    /// last checkpoint without it ([`Checkpoints::orphan_commits_by`]).
    fn orphaned(&self) -> bool {
        false
    }
}

/// Who commits.
#[derive(Debug)]
pub enum Authority {
    /// The coordinator.
    Coordinator(Arc<dyn ShardCommitter>),
    /// Rank 0 of a gang without a coordinator, through the store the shards go to.
    Rank0 {
        /// Job name (in the manifest).
        job: String,
        /// Retention after each commit.
        retention: RetentionPolicy,
        /// Steps retention keeps (the one the run resumed from).
        protected: Vec<u64>,
    },
}

/// One rank's checkpointing: the writer thread and the gang's agreement on commits.
pub struct Checkpoints {
    writer: CheckpointWriter,
    store: CheckpointStore,
    authority: Authority,
    rank: usize,
    world: usize,
    config_hash: String,
    /// The checkpoint being written: its state and, once this rank's writer is done, the result.
    pending: Option<(TrainerState, Option<Result<Written>>)>,
    /// A checkpoint whose commit the gang's loss of a rank interrupted.
    interrupted: Option<u64>,
    /// Who commits once the gang agrees it lost its coordinator.
    orphan: Option<Authority>,
    /// The gang lost its coordinator: `orphan` commits.
    orphaned: bool,
}

/// What the gang agreed after a step ([`Checkpoints::progress`]).
#[derive(Debug)]
pub struct Agreed {
    /// Stop after this step (a rank was signalled).
    pub stop: bool,
    /// Checkpoint this step: `checkpoint.every` has passed on rank 0's clock.
    pub time_due: bool,
    /// The checkpoint in flight became committed, or failed.
    pub committed: Option<Outcome>,
}

/// How a checkpoint ended: committed, or not (every rank agrees which).
pub type Outcome = std::result::Result<Written, Failed>;

/// A checkpoint that could not be written or committed. Training goes on (the next checkpoint
/// tries again) unless the store cannot take more (`permanent`: full, read-only, access denied).
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    /// The checkpoint's step.
    pub step: u64,
    /// Why, in this rank's words (another rank's failure says to read its log).
    pub reason: String,
    /// Why the store takes no more writes (a retry cannot help), when that is the cause.
    pub refused: Option<String>,
}

/// Why a store cannot take more writes, if that is what `e` says: full, over quota, read-only
/// or denied (a retry, or a restart, would fail the same way).
pub fn store_refuses(e: &Error) -> Option<&'static str> {
    match e {
        Error::Storage(lockstep_storage::Error::Refused { .. }) => Some("writes refused"),
        e => lockstep_storage::refuses_writes(e),
    }
}

impl Checkpoints {
    /// Checkpointing for `rank` of `world` into `store`.
    pub fn new(
        store: CheckpointStore,
        authority: Authority,
        rank: usize,
        world: usize,
        config_hash: String,
    ) -> Result<Checkpoints> {
        Ok(Checkpoints {
            writer: CheckpointWriter::spawn(store.clone(), rank as u32, world as u32)?,
            store,
            authority,
            rank,
            world,
            config_hash,
            pending: None,
            interrupted: None,
            orphan: None,
            orphaned: false,
        })
    }

    /// Once the gang agrees it lost its coordinator (any rank's [`ShardCommitter::orphaned`]),
    /// checkpoints are committed by `authority` instead (rank 0, through the store), so the
    /// step the gang stops at survives the coordinator.
    pub fn orphan_commits_by(&mut self, authority: Authority) {
        self.orphan = Some(authority);
    }

    /// 1 when this rank's coordinator is gone, else 0.
    fn orphaned(&self) -> f32 {
        match &self.authority {
            Authority::Coordinator(c) if c.orphaned() => 1.0,
            _ => 0.0,
        }
    }

    /// The gang agreed it lost its coordinator: commit without it from now on.
    fn orphan(&mut self, agreed: bool) {
        if agreed && let Some(a) = self.orphan.take() {
            tracing::warn!(
                rank = self.rank,
                "the gang lost its coordinator: rank 0 commits its checkpoints through the store"
            );
            self.authority = a;
            self.orphaned = true;
        }
    }

    /// Whether the gang lost its coordinator and commits without it.
    pub fn orphaned_gang(&self) -> bool {
        self.orphaned
    }

    /// Hands a snapshot to the writer. Call [`Checkpoints::finish`] first: one in flight.
    pub fn submit(&mut self, snap: Snapshot) -> Result<()> {
        self.pending = Some((snap.state.clone(), None));
        self.writer.submit(snap)
    }

    /// The gang lost a rank while a checkpoint was in flight: it will not be committed (the lost
    /// rank's shard is missing). Waits for this rank's writer to finish with it and forgets it;
    /// returns its step (or that of a checkpoint whose commit the loss interrupted). Its shards
    /// stay without a manifest, which makes no checkpoint.
    pub fn abandon(&mut self) -> Option<u64> {
        let interrupted = self.interrupted.take();
        let Some((state, result)) = self.pending.take() else {
            return interrupted;
        };
        if result.is_none()
            && let Err(e) = self.writer.wait()
        {
            tracing::debug!(step = state.step, error = %e, "abandoned checkpoint's shard failed");
        }
        Some(state.step)
    }

    /// Writes shard `index` of `count` of an emergency checkpoint of `snap` (the gang could not
    /// re-form in place, [`crate::recovery::Emergency`]) and reports it to the coordinator,
    /// which commits the checkpoint once every writer's shard is durable. Returns its stored
    /// bytes. Call after [`Checkpoints::abandon`], so this rank's writer is idle.
    pub fn emergency(
        &mut self,
        snap: Snapshot,
        index: u32,
        count: u32,
        rt: &tokio::runtime::Runtime,
    ) -> Result<u64> {
        let Authority::Coordinator(committer) = &self.authority else {
            return Err(Error::Internal(
                "an emergency checkpoint is committed by a coordinator; this gang has none".into(),
            ));
        };
        let started = std::time::Instant::now();
        let pieces = lockstep_storage::pieces_for_rank(&snap.tensors, index, count);
        let shard = rt.block_on(self.store.write_shard(snap.step, index, &pieces))?;
        let (bytes, _) = committer.commit_shard(ShardReport {
            rank: index,
            state: &snap.state,
            shard: &shard,
            config_hash: &self.config_hash,
            write_time: started.elapsed(),
        })?;
        Ok(bytes)
    }

    /// After every step: the stop and time-checkpoint decisions all ranks agree on (`stop` and
    /// `time_due` are this rank's wishes: any rank's stop stops all; only rank 0 passes
    /// `time_due`, so its clock decides), and a checkpoint that became committed, if any.
    /// Never waits for the writer.
    pub fn progress(
        &mut self,
        stop: bool,
        time_due: bool,
        collective: &mut dyn Collective,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Agreed> {
        if let Some((_, result @ None)) = &mut self.pending {
            match self.writer.poll() {
                Ok(Some(w)) => *result = Some(Ok(w)),
                Ok(None) => {}
                Err(e) => *result = Some(Err(e)),
            }
        }
        let (done, failed) = match &self.pending {
            Some((_, Some(Ok(_)))) => (1.0, 0.0),
            Some((_, Some(Err(_)))) => (1.0, 1.0),
            _ => (0.0, 0.0),
        };
        // A signal reaches ranks at different steps: agree, so all stop at the same one.
        let flag = |b: bool| if b { 1.0f32 } else { 0.0 };
        let mut flags = [
            flag(stop),
            done,
            failed,
            flag(time_due),
            self.refused(),
            self.orphaned(),
        ];
        collective.all_reduce_sum(&mut flags)?;
        self.orphan(flags[5] > 0.0);
        let committed = if flags[2] > 0.0 || flags[1] as usize == self.world {
            self.commit_round(flags[2] > 0.0, flags[4] > 0.0, collective, rt)?
        } else {
            None
        };
        Ok(Agreed {
            stop: flags[0] > 0.0,
            time_due: flags[3] > 0.0,
            committed,
        })
    }

    /// 1 when this rank's shard of the pending checkpoint failed because the store refuses
    /// writes ([`store_refuses`]), else 0.
    fn refused(&self) -> f32 {
        match &self.pending {
            Some((_, Some(Err(e)))) if store_refuses(e).is_some() => 1.0,
            _ => 0.0,
        }
    }

    /// Waits for the checkpoint in flight, if any, until it is committed (or failed).
    pub fn finish(
        &mut self,
        collective: &mut dyn Collective,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Option<Outcome>> {
        let Some((_, result)) = &mut self.pending else {
            return Ok(None);
        };
        if result.is_none() {
            *result = Some(self.writer.wait().and_then(|w| {
                w.ok_or_else(|| Error::Internal("the checkpoint writer lost a checkpoint".into()))
            }));
        }
        let failed = if matches!(result, Some(Err(_))) {
            1.0f32
        } else {
            0.0
        };
        let mut flags = [failed, self.refused(), self.orphaned()];
        collective.all_reduce_sum(&mut flags)?;
        self.orphan(flags[2] > 0.0);
        self.commit_round(flags[0] > 0.0, flags[1] > 0.0, collective, rt)
    }

    /// Every rank's shard of the pending checkpoint is durable (or one failed): commit it.
    fn commit_round(
        &mut self,
        any_failed: bool,
        any_refused: bool,
        collective: &mut dyn Collective,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Option<Outcome>> {
        let Some((state, result)) = self.pending.take() else {
            return Ok(None);
        };
        let step = state.step;
        let elsewhere = || "the store refuses another rank's writes (its log says why)".to_string();
        let failed = |reason: String, refused: Option<String>| {
            Ok(Some(Err(Failed {
                step,
                reason,
                refused,
            })))
        };
        let mine = match result {
            Some(Ok(w)) if !any_failed => w,
            Some(Err(e)) => {
                let refused =
                    any_refused.then(|| store_refuses(&e).map_or_else(elsewhere, str::to_string));
                return failed(e.to_string(), refused);
            }
            _ => {
                return failed(
                    format!(
                        "another rank failed to write its shard of checkpoint {step} (its log \
                         says why)"
                    ),
                    any_refused.then(elsewhere),
                );
            }
        };
        let mut coordinated = None;
        if let Authority::Coordinator(c) = &self.authority {
            let c = c.clone();
            let r = c.commit_shard(ShardReport {
                rank: self.rank as u32,
                state: &state,
                shard: &mine.shard,
                config_hash: &self.config_hash,
                write_time: mine.elapsed,
            });
            match r {
                Err(e) if e.breaks_gang() => {
                    self.interrupted = Some(step);
                    return Err(e);
                }
                r => {
                    // The coordinator died with the commit in flight: every rank says whether
                    // it lost it, and if one did, rank 0 commits the same shards instead.
                    let lost = match &r {
                        Err(e) => c.orphaned() || matches!(e, Error::CoordinatorGone { .. }),
                        Ok(_) => false,
                    };
                    let mut flag = [if lost { 1.0f32 } else { 0.0 }];
                    collective.all_reduce_sum(&mut flag)?;
                    self.orphan(flag[0] > 0.0);
                    if !self.orphaned {
                        coordinated = Some(r?);
                    }
                }
            }
        }
        let (bytes, raw_bytes) = match (coordinated, &self.authority) {
            (Some(sizes), _) => sizes,
            (None, Authority::Coordinator(_)) => {
                return Err(Error::Internal(format!(
                    "checkpoint {step}: the coordinator's commit gave no answer"
                )));
            }
            (
                None,
                Authority::Rank0 {
                    job,
                    retention,
                    protected,
                },
            ) => {
                let shards = gather_shards(&mine.shard, self.rank, self.world, collective)?;
                // Rank 0 tells the others how the commit went and the checkpoint's sizes:
                // [ok: 1 | failed: 2 | the store refuses writes: 3, stored bytes (u64 LE), raw
                // bytes (u64 LE)].
                let mut status = [0u8; 17];
                if self.rank == 0 {
                    let commit = StepCommit {
                        job: job.clone(),
                        step,
                        config_hash: self.config_hash.clone(),
                        trainer_state: {
                            let mut v = serde_json::to_value(&state).map_err(|e| {
                                Error::Internal(format!("cannot serialise the trainer state: {e}"))
                            })?;
                            // For the coordinator that takes the job over (resuming ignores it).
                            if self.orphaned {
                                v[lockstep_storage::WITHOUT_COORDINATOR] = true.into();
                            }
                            v
                        },
                        shards,
                        retention: *retention,
                        protected: protected.clone(),
                    };
                    let outcome = rt
                        .block_on(self.store.commit_step(commit))
                        .map_err(Error::from);
                    match &outcome {
                        Ok(c) => {
                            status[0] = 1;
                            status[1..9].copy_from_slice(&c.bytes.to_le_bytes());
                            status[9..17].copy_from_slice(&c.raw_bytes.to_le_bytes());
                        }
                        Err(e) if store_refuses(e).is_some() => status[0] = 3,
                        Err(_) => status[0] = 2,
                    }
                    collective.broadcast(&mut status, 0)?;
                    match outcome {
                        Ok(c) => (c.bytes, c.raw_bytes),
                        Err(e) => {
                            let refused = store_refuses(&e).map(str::to_string);
                            return failed(e.to_string(), refused);
                        }
                    }
                } else {
                    collective.broadcast(&mut status, 0)?;
                    if status[0] != 1 {
                        return failed(
                            format!("rank 0 could not commit checkpoint {step} (its log says why)"),
                            (status[0] == 3)
                                .then(|| "the store refuses rank 0's writes".to_string()),
                        );
                    }
                    let word = |r: std::ops::Range<usize>| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&status[r]);
                        u64::from_le_bytes(b)
                    };
                    (word(1..9), word(9..17))
                }
            }
        };
        Ok(Some(Ok(Written {
            bytes,
            raw_bytes,
            ..mine
        })))
    }
}

/// Every rank's shard metadata, gathered on rank 0 (other ranks get an empty list): each rank
/// in turn broadcasts its length, then its JSON.
fn gather_shards(
    mine: &ShardMeta,
    rank: usize,
    world: usize,
    collective: &mut dyn Collective,
) -> Result<Vec<ShardMeta>> {
    let json = serde_json::to_vec(mine)
        .map_err(|e| Error::Internal(format!("cannot serialise a shard's metadata: {e}")))?;
    let mut metas = Vec::new();
    for r in 0..world {
        if r == rank && rank == 0 {
            metas.push(mine.clone());
        }
        if world == 1 {
            break;
        }
        let mut len = (if r == rank { json.len() } else { 0 } as u64).to_le_bytes();
        collective.broadcast(&mut len, r)?;
        let len = u64::from_le_bytes(len);
        // A shard's metadata is a few KB per tensor piece; anything past this is not one.
        const MAX_META: u64 = 256 << 20;
        if len > MAX_META {
            return Err(Error::Internal(format!(
                "rank {r} announced {len} bytes of shard metadata (more than {MAX_META})"
            )));
        }
        let mut buf = if r == rank {
            json.clone()
        } else {
            vec![0u8; len as usize]
        };
        collective.broadcast(&mut buf, r)?;
        if rank == 0 && r != 0 {
            let m: ShardMeta = serde_json::from_slice(&buf)
                .map_err(|e| Error::Internal(format!("rank {r} sent bad shard metadata: {e}")))?;
            metas.push(m);
        }
    }
    Ok(metas)
}
