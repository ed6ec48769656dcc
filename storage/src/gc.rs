//! [`CheckpointStore::gc`]: the retention policy applied to the checkpoints that verify, with
//! debris and symbolic links removed.

use std::path::PathBuf;

use crate::Result;
use crate::retention::{RetentionAction, RetentionPolicy};
use crate::store::{CheckpointStore, GcReport};

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
            } else if let Some(root) = self.local_dir.clone() {
                // What the run will list once the links are gone: a step directory that is
                // a link disappears; one with links inside is committed if its manifest is a
                // plain file.
                let after = crate::local::blocking("list checkpoints", root.clone(), |r| {
                    crate::local::list_steps(r)
                })
                .await?;
                listing = after
                    .into_iter()
                    .filter(|s| !s.links.iter().any(|l| l.parent() == Some(root.as_path())))
                    .map(|s| crate::store::StepListing {
                        step: s.step,
                        committed: s.manifest,
                        files: s.files,
                        bytes: s.bytes,
                        links: Vec::new(),
                    })
                    .collect();
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
