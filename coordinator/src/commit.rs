//! The commit authority's bookkeeping: the shards each rank reported for each step of the live
//! attempt. When the last rank's shard of a step arrives, that caller commits it (through
//! storage's one `commit_step`) and every rank waiting on the step gets the outcome.

use std::collections::BTreeMap;
use std::sync::Arc;

use lockstep_storage::{ShardMeta, StepCommit};
use tokio::sync::watch;

use crate::Coordinator;
use crate::error::{Error, Result};
use crate::registry::{Job, lock};

/// How a commit ended, as every waiting rank sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitFailed {
    /// The store refused or failed the commit ([`lockstep_storage::Error::is_transient`] says
    /// whether trying again may help).
    #[error("{0}")]
    Store(Arc<lockstep_storage::Error>),
    /// The attempt ended before the checkpoint was committed.
    #[error("the attempt was torn down")]
    TornDown,
}

/// Stored and raw bytes of a committed checkpoint, or why it was not committed.
pub type Outcome = Result<(u64, u64), CommitFailed>;

/// A step whose every shard has been reported: the caller that completed it commits it and
/// announces the outcome on `done`.
#[derive(Debug)]
pub struct Ready {
    /// The step.
    pub step: u64,
    /// Every rank's shard.
    pub shards: Vec<ShardMeta>,
    /// Rank 0's trainer state.
    pub trainer_state: serde_json::Value,
    /// Rank 0's config hash.
    pub config_hash: String,
    /// Where the outcome goes.
    pub done: watch::Sender<Option<Outcome>>,
}

#[derive(Debug)]
struct Pending {
    shards: BTreeMap<u32, ShardMeta>,
    /// Rank 0's.
    state: Option<(serde_json::Value, String)>,
    done: watch::Sender<Option<Outcome>>,
}

/// Shards reported so far, per step, for one attempt.
#[derive(Debug, Default)]
pub struct Commits {
    pending: BTreeMap<u64, Pending>,
}

impl Commits {
    /// Records `rank`'s shard of `step` (rank 0 also brings the trainer state and config
    /// hash). Returns the receiver of the step's outcome and, when this report completes the
    /// step for a gang of `world`, what to commit.
    pub fn report(
        &mut self,
        world: u32,
        rank: u32,
        shard: ShardMeta,
        state: Option<(serde_json::Value, String)>,
    ) -> (watch::Receiver<Option<Outcome>>, Option<Ready>) {
        let step = shard.step;
        let p = self.pending.entry(step).or_insert_with(|| Pending {
            shards: BTreeMap::new(),
            state: None,
            done: watch::channel(None).0,
        });
        let rx = p.done.subscribe();
        p.shards.insert(rank, shard);
        if state.is_some() {
            p.state = state;
        }
        if p.shards.len() as u32 != world || p.state.is_none() {
            return (rx, None);
        }
        let ready = self.pending.remove(&step).and_then(|p| {
            let (trainer_state, config_hash) = p.state?;
            Some(Ready {
                step,
                shards: p.shards.into_values().collect(),
                trainer_state,
                config_hash,
                done: p.done,
            })
        });
        (rx, ready)
    }

    /// The attempt ended: every rank still waiting learns that nothing will be committed.
    pub fn tear_down(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            p.done.send_replace(Some(Err(CommitFailed::TornDown)));
        }
    }
}

/// Committing: the last rank's shard of a step starts the commit, in a task of its own.
impl Coordinator {
    /// `rank`'s shard of a checkpoint is durable. Once every rank's is, the caller that
    /// completed the step commits it; every caller returns the outcome (stored and raw bytes).
    pub(crate) async fn commit_shard(
        &self,
        job: &Arc<Job>,
        attempt: u32,
        shard: ShardMeta,
        state: Option<(serde_json::Value, String)>,
        write_seconds: f64,
    ) -> Result<(u64, u64)> {
        let step = shard.step;
        let (mut rx, ready, resume_step) = {
            let mut st = lock(&job.state);
            let live = job.live(&mut st, attempt)?;
            if shard.shard.rank >= live.attempt.world {
                return Err(Error::InvalidArgument(format!(
                    "rank {} is outside a gang of {}",
                    shard.shard.rank, live.attempt.world
                )));
            }
            let world = live.attempt.world;
            let (rx, ready) = live.commits.report(world, shard.shard.rank, shard, state);
            (rx, ready, live.attempt.resume_step)
        };
        self.inner.metrics.checkpoint_write(write_seconds);
        if let Some(ready) = ready {
            let commit = StepCommit {
                job: job.config.job.name.clone(),
                step,
                config_hash: ready.config_hash,
                trainer_state: ready.trainer_state,
                shards: ready.shards,
                retention: lockstep_storage::RetentionPolicy {
                    keep_last: job.config.checkpoint.keep_last,
                    keep_every: job.config.checkpoint.keep_every,
                },
                protected: resume_step.into_iter().collect(),
            };
            // Its own task: a caller that goes away (a worker killed mid-call) must not cancel
            // a commit halfway.
            let (inner, job2) = (self.inner.clone(), job.clone());
            tokio::spawn(async move {
                let job = job2;
                let _store = job.store_lock.lock().await;
                let live = {
                    let mut st = lock(&job.state);
                    job.live(&mut st, attempt).is_ok()
                };
                let outcome: Outcome = if !live {
                    Err(CommitFailed::TornDown)
                } else {
                    match job.store.commit_step(commit).await {
                        Ok(c) => {
                            inner.metrics.checkpoint_committed(c.bytes);
                            let mut st = lock(&job.state);
                            st.record.last_checkpoint = Some(step);
                            tracing::info!(job = %job.id, step, bytes = c.bytes, "committed checkpoint");
                            st.touch(&job, &inner.persister, true);
                            Ok((c.bytes, c.raw_bytes))
                        }
                        Err(e) => {
                            tracing::error!(job = %job.id, step, error = %e, "cannot commit a checkpoint");
                            Err(CommitFailed::Store(Arc::new(e)))
                        }
                    }
                };
                ready.done.send_replace(Some(outcome));
            });
        }
        let wait = rx.wait_for(Option::is_some);
        let outcome = match tokio::time::timeout(job.config.job.collective_timeout, wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        match outcome {
            Some(Ok(sizes)) => Ok(sizes),
            // The attempt is over: the worker should exit, not report a failure.
            Some(Err(CommitFailed::TornDown)) => Err(Error::StaleAttempt {
                job: job.id.clone(),
                attempt,
                current: lock(&job.state).live.as_ref().map(|l| l.attempt.number),
            }),
            Some(Err(CommitFailed::Store(source))) => Err(Error::Commit { step, source }),
            None => Err(Error::CommitTimeout { step }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(step: u64, rank: u32) -> ShardMeta {
        ShardMeta {
            step,
            shard: lockstep_storage::ShardInfo {
                rank,
                file: format!("rank-{rank:05}.shard"),
                bytes: 10,
                raw_bytes: 20,
                chunks: 1,
                footer_hash: "0".repeat(16),
            },
            pieces: vec![],
        }
    }

    fn state() -> Option<(serde_json::Value, String)> {
        Some((serde_json::json!({"step": 4}), "hash".into()))
    }

    #[test]
    fn the_last_shard_of_a_step_makes_it_ready_whatever_the_order() {
        let mut c = Commits::default();
        let (_rx1, r) = c.report(3, 2, shard(4, 2), None);
        assert!(r.is_none());
        let (_rx0, r) = c.report(3, 0, shard(4, 0), state());
        assert!(r.is_none());
        // Another step's shard does not complete this one.
        assert!(c.report(3, 1, shard(8, 1), None).1.is_none());
        let (mut rx, r) = c.report(3, 1, shard(4, 1), None);
        let ready = r.expect("complete");
        assert_eq!(ready.step, 4);
        assert_eq!(
            ready
                .shards
                .iter()
                .map(|s| s.shard.rank)
                .collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(ready.config_hash, "hash");
        ready.done.send_replace(Some(Ok((30, 60))));
        assert!(matches!(*rx.borrow_and_update(), Some(Ok((30, 60)))));
    }

    #[test]
    fn a_step_without_rank_zeros_state_is_not_ready() {
        let mut c = Commits::default();
        assert!(c.report(1, 0, shard(4, 0), None).1.is_none());
    }

    #[test]
    fn tearing_down_tells_every_waiter() {
        let mut c = Commits::default();
        let (rx, _) = c.report(2, 0, shard(4, 0), state());
        c.tear_down();
        assert!(matches!(*rx.borrow(), Some(Err(CommitFailed::TornDown))));
    }
}
