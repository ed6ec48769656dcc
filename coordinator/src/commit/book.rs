//! The commit authority's bookkeeping, as plain data: the shards each rank reported for each
//! step of the live attempt, and the outcome every rank waiting on a step gets.

use std::collections::BTreeMap;
use std::sync::Arc;

use lockstep_storage::ShardMeta;
use tokio::sync::watch;

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
    /// The gang lost a rank and re-forms in place: the lost rank's shard will not come.
    #[error("the gang re-forms")]
    Regrouping,
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

    /// The outcome of `step`'s commit, for a watcher that reports no shard (the coordinator
    /// waiting on an emergency checkpoint).
    pub fn watch(&mut self, step: u64) -> watch::Receiver<Option<Outcome>> {
        self.pending
            .entry(step)
            .or_insert_with(|| Pending {
                shards: BTreeMap::new(),
                state: None,
                done: watch::channel(None).0,
            })
            .done
            .subscribe()
    }

    /// The gang re-forms in place: every rank still waiting learns that its checkpoint will
    /// not be committed, and the shards reported so far are forgotten.
    pub fn regroup(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            p.done.send_replace(Some(Err(CommitFailed::Regrouping)));
        }
    }

    /// The attempt ended: every rank still waiting learns that nothing will be committed.
    pub fn tear_down(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            p.done.send_replace(Some(Err(CommitFailed::TornDown)));
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
    fn a_watcher_learns_the_outcome_of_a_step_it_reported_nothing_for() {
        let mut c = Commits::default();
        let mut rx = c.watch(4);
        assert!(c.report(2, 0, shard(4, 0), state()).1.is_none());
        let ready = c.report(2, 1, shard(4, 1), None).1.expect("complete");
        ready.done.send_replace(Some(Ok((1, 2))));
        assert!(matches!(*rx.borrow_and_update(), Some(Ok((1, 2)))));
    }

    #[test]
    fn tearing_down_tells_every_waiter() {
        let mut c = Commits::default();
        let (rx, _) = c.report(2, 0, shard(4, 0), state());
        c.tear_down();
        assert!(matches!(*rx.borrow(), Some(Err(CommitFailed::TornDown))));
    }
}
