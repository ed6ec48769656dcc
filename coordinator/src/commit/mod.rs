//! Committing checkpoints: when the last rank's shard of a step arrives, that caller commits
//! it (through storage's one `commit_step`) and every rank waiting on the step gets the
//! outcome ([`book`] keeps the shards and outcomes).

pub mod book;

use std::sync::Arc;

use lockstep_storage::{ShardMeta, StepCommit};

pub use book::{CommitFailed, Commits, Outcome, Ready};

use crate::Coordinator;
use crate::error::{Error, Result};
use crate::registry::{Job, lock};

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
            // The shards of an emergency checkpoint: one per survivor that writes it.
            let emergency = live
                .attempt
                .emergency()
                .map(|e| (e.step, e.writers.len() as u32));
            let world = match emergency {
                Some((s, writers)) if s == step => writers,
                _ => live.attempt.world,
            };
            if shard.shard.rank >= world {
                return Err(Error::InvalidArgument(format!(
                    "shard {} of step {step} is outside a checkpoint of {world} shards",
                    shard.shard.rank
                )));
            }
            // A shard that comes while the gang re-forms belongs to a checkpoint that lost a
            // rank's shard: it will never be complete.
            if live.attempt.forming() && emergency.is_none_or(|(s, _)| s != step) {
                return Err(Error::Regrouping { step });
            }
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
            Some(Err(CommitFailed::Regrouping)) => Err(Error::Regrouping { step }),
            Some(Err(CommitFailed::Store(source))) => Err(Error::Commit { step, source }),
            None => Err(Error::CommitTimeout { step }),
        }
    }
}
