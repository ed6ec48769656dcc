//! Which committed checkpoints to keep: a pure policy, and [`CheckpointStore::gc`], which
//! applies it to the checkpoints that verify.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::store::{CheckpointStore, GcReport};

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

impl CheckpointStore {
    /// Applies `policy` (see [`RetentionPolicy::decide`]) to the checkpoints that verify, with
    /// the rules resume uses: each checkpoint the policy would keep is verified first (read in
    /// full), and one that does not verify is kept but not counted, so the policy keeps that
    /// many verified ones besides (and gc deletes nothing when none verifies). Never deletes
    /// the newest verified step or a `protected` one. Also removes uncommitted debris older
    /// than the newest commit, and symbolic links in the tree (the links themselves, never
    /// what they point to). With `dry_run`, reports without deleting.
    pub async fn gc(
        &self,
        policy: &RetentionPolicy,
        protected: &[u64],
        dry_run: bool,
    ) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut listing = self.list_all().await?;
        let links: Vec<String> = listing.iter().flat_map(|s| s.links.clone()).collect();
        if !links.is_empty() {
            if !dry_run {
                let paths: Vec<PathBuf> = links.iter().map(PathBuf::from).collect();
                let root = self.local_dir.clone().unwrap_or_default();
                crate::local::blocking("remove symbolic links", root, move |_| {
                    crate::local::remove_links(&paths)
                })
                .await?;
                listing = self.list_all().await?;
            }
            report.links = links;
        }
        let committed: Vec<u64> = listing
            .iter()
            .filter(|s| s.committed)
            .map(|s| s.step)
            .collect();
        let newest = committed.iter().max().copied();
        // Decide on the checkpoints that verify: verify what would be kept, newest first; one
        // that fails is set apart and the policy decides again without it.
        let mut verified = std::collections::BTreeSet::new();
        let actions = 'decide: loop {
            let counted: Vec<u64> = committed
                .iter()
                .filter(|s| !report.unverified.iter().any(|(u, _)| u == *s))
                .copied()
                .collect();
            let actions = policy.decide(&counted, protected);
            for a in &actions {
                if let RetentionAction::Keep { step, .. } = a
                    && !verified.contains(step)
                {
                    match self.verdict(*step).await? {
                        crate::resume::Verdict::Valid => {
                            verified.insert(*step);
                        }
                        crate::resume::Verdict::Gone => {
                            report.unverified.push((*step, "deleted meanwhile".into()));
                            continue 'decide;
                        }
                        crate::resume::Verdict::Corrupt(why)
                        | crate::resume::Verdict::Unsupported(why) => {
                            report.unverified.push((*step, why));
                            continue 'decide;
                        }
                    }
                }
            }
            break actions;
        };
        for action in actions {
            match action {
                RetentionAction::Keep { step, reason } => report.kept.push((step, reason)),
                RetentionAction::Delete { step } => report.deleted.push(step),
            }
        }
        report.debris = listing
            .iter()
            .filter(|s| !s.committed && newest.is_some_and(|n| s.step < n))
            .map(|s| s.step)
            .collect();
        if !dry_run {
            for &step in report.deleted.iter().chain(&report.debris) {
                self.delete(step).await?;
                tracing::info!(step, url = %self.url, "checkpoint deleted");
            }
        }
        Ok(report)
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
