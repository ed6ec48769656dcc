//! Which committed checkpoints to keep: a pure policy, applied by
//! [`crate::CheckpointStore::gc`].

use serde::{Deserialize, Serialize};

/// Keep the newest `keep_last` checkpoints and every step that is a multiple of `keep_every`.
/// The newest committed checkpoint and any protected step (one a running job resumed from) are
/// always kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// How many of the newest checkpoints to keep (at least 1 is always kept).
    pub keep_last: usize,
    /// Also keep every step divisible by this (milestones); `None` keeps no milestones.
    pub keep_every: Option<u64>,
}

/// What to do with one committed step, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionAction {
    /// Keep it.
    Keep {
        /// The step.
        step: u64,
        /// Why it is kept.
        reason: KeepReason,
    },
    /// Delete it.
    Delete {
        /// The step.
        step: u64,
    },
}

/// Why a checkpoint survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepReason {
    /// The newest committed checkpoint.
    Newest,
    /// Among the newest `keep_last`.
    Recent,
    /// A multiple of `keep_every`.
    Milestone,
    /// A running job resumed from it.
    Protected,
}

impl RetentionPolicy {
    /// Decides the fate of every committed step (any order, duplicates ignored), newest first.
    pub fn decide(&self, committed: &[u64], protected: &[u64]) -> Vec<RetentionAction> {
        let mut steps = committed.to_vec();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        steps.dedup();
        steps
            .iter()
            .enumerate()
            .map(|(i, &step)| {
                let reason = if i == 0 {
                    Some(KeepReason::Newest)
                } else if protected.contains(&step) {
                    Some(KeepReason::Protected)
                } else if i < self.keep_last {
                    Some(KeepReason::Recent)
                } else if self.keep_every.is_some_and(|m| m > 0 && step % m == 0) {
                    Some(KeepReason::Milestone)
                } else {
                    None
                };
                match reason {
                    Some(reason) => RetentionAction::Keep { step, reason },
                    None => RetentionAction::Delete { step },
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deleted(p: RetentionPolicy, steps: &[u64], protected: &[u64]) -> Vec<u64> {
        p.decide(steps, protected)
            .into_iter()
            .filter_map(|a| match a {
                RetentionAction::Delete { step } => Some(step),
                RetentionAction::Keep { .. } => None,
            })
            .collect()
    }

    #[test]
    fn keeps_last_n_and_milestones() {
        let p = RetentionPolicy {
            keep_last: 2,
            keep_every: Some(100),
        };
        let steps = [50, 100, 150, 200, 250, 300, 350];
        assert_eq!(deleted(p, &steps, &[]), vec![250, 150, 50]);
    }

    #[test]
    fn never_deletes_the_newest_or_a_protected_step() {
        let p = RetentionPolicy {
            keep_last: 0,
            keep_every: None,
        };
        assert_eq!(deleted(p, &[3, 1, 2], &[1]), vec![2]);
        assert!(deleted(p, &[7], &[]).is_empty());
        assert!(deleted(p, &[], &[]).is_empty());
    }
}
