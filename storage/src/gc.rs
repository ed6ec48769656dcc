//! [`CheckpointStore::gc`]: the retention policy applied to the checkpoints that verify, with
//! debris, symbolic links and special files removed.

use std::path::PathBuf;

use crate::Result;
use crate::retention::{RetentionAction, RetentionPolicy};
use crate::store::{CheckpointStore, GcReport, Stray};

impl CheckpointStore {
    /// Applies `policy` (see [`RetentionPolicy::decide`]) to the checkpoints that verify, with
    /// the rules resume uses: each checkpoint the policy would keep is verified first (read in
    /// full), and one that does not verify is kept but not counted, so the policy keeps that
    /// many verified ones besides (and gc deletes nothing when none verifies). Never deletes
    /// the newest verified step or a `protected` one. Also removes uncommitted debris older
    /// than the newest commit, and symbolic links and special files (FIFOs, sockets, devices)
    /// in the tree, `set-aside` included (the links themselves, never what they point to); a
    /// regular file where a step directory belongs is reported, not removed. With `dry_run`,
    /// reports without deleting.
    pub async fn gc(
        &self,
        policy: &RetentionPolicy,
        protected: &[u64],
        dry_run: bool,
    ) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut listing = self.list_all().await?;
        let mut strays: Vec<Stray> = listing.iter().flat_map(|s| s.strays.clone()).collect();
        // Steps with links or special files inside, which gc removes before verifying: a dry
        // run cannot verify them as they will be (it removes nothing).
        let cleaned: Vec<u64> = listing
            .iter()
            .filter(|s| !s.strays.is_empty() && s.strays.iter().all(|x| x.kind.removable()))
            .map(|s| s.step)
            .collect();
        // `set-aside/` itself: a link there would take resume's copies out of the tree.
        strays.extend(self.set_aside_stray().await?);
        let removable: Vec<PathBuf> = strays
            .iter()
            .filter(|s| s.kind.removable())
            .map(|s| PathBuf::from(&s.path))
            .collect();
        if !removable.is_empty() {
            if !dry_run {
                let root = self.local_dir.clone().unwrap_or_default();
                crate::local::blocking("remove links and special files", root, move |_| {
                    crate::local::remove_strays(&removable)
                })
                .await?;
                listing = self.list_all().await?;
            } else if let Some(root) = self.local_dir.clone() {
                // What the run will list once they are gone: a step directory that is a link
                // or special file disappears; one with them inside is committed if its
                // manifest is a plain file.
                let after = crate::local::blocking("list checkpoints", root.clone(), |r| {
                    crate::local::list_steps(r)
                })
                .await?;
                listing = after
                    .into_iter()
                    .filter(|s| {
                        !s.strays
                            .iter()
                            .any(|(p, k)| k.removable() && p.parent() == Some(root.as_path()))
                    })
                    .map(|s| {
                        let strays: Vec<Stray> = s
                            .strays
                            .into_iter()
                            .filter(|(_, k)| !k.removable())
                            .map(|(path, kind)| Stray {
                                path: path.display().to_string(),
                                kind,
                            })
                            .collect();
                        crate::store::StepListing {
                            step: s.step,
                            committed: s.manifest && strays.is_empty(),
                            files: s.files,
                            bytes: s.bytes,
                            strays,
                        }
                    })
                    .collect();
            }
        }
        report.strays = strays;
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
                    if dry_run && cleaned.contains(step) {
                        verified.insert(*step);
                        report.unchecked.push(*step);
                        continue;
                    }
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
            // A regular file where a step directory belongs is not lockstep's debris.
            .filter(|s| !s.strays.iter().any(|x| !x.kind.removable()))
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
