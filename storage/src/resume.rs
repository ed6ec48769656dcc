//! Which committed checkpoint a run starts from: one pure decision ([`plan`]) for every caller
//! (the standalone trainer, a static gang's rank 0, the coordinator), and the driver
//! [`CheckpointStore::choose_start`] that feeds it verification results and carries it out.
//!
//! The rules:
//! - `Fresh` (`checkpoint.resume = "none"`) refuses to start over committed checkpoints.
//! - `Step(s)` refuses when newer checkpoints exist (the run would overwrite them), when `s` is
//!   not committed, and when `s` does not verify.
//! - `Latest` takes the newest committed checkpoint that verifies. Newer ones that are corrupt
//!   are **set aside** (moved under `set-aside/`, never deleted) so their steps can be committed
//!   again; one of a newer format refuses (a newer lockstep wrote it; rolling back past it is not
//!   ours to decide). When committed checkpoints exist and none verifies, it refuses: a run
//!   never starts over from step 0 on top of committed checkpoints, and nothing is moved.
//!
//! Nothing on this path deletes a committed checkpoint.

use std::collections::BTreeMap;

use crate::{CheckpointStore, Error, Result};

/// Folder under the checkpoint root where checkpoints that failed verification are moved.
pub const SET_ASIDE_DIR: &str = "set-aside";

/// Where a run asks to start (`checkpoint.resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The newest committed checkpoint that verifies, or the beginning when there is none.
    Latest,
    /// The beginning; refused over committed checkpoints.
    Fresh,
    /// This committed step.
    Step(u64),
}

/// What verifying one committed step found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every byte checks.
    Valid,
    /// Bad data (a flipped bit, a missing or truncated shard); the reason names the file.
    Corrupt(String),
    /// Written in a format this build does not read.
    Unsupported(String),
    /// No longer committed (deleted between listing and verifying).
    Gone,
}

/// Why a run must not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `Fresh` over committed checkpoints.
    FreshOverCommitted {
        /// The newest committed step.
        newest: u64,
    },
    /// `Step(step)` under newer committed checkpoints.
    NewerExist {
        /// The requested step.
        step: u64,
        /// The newest committed step.
        newest: u64,
    },
    /// `Step(step)` is not committed.
    NotCommitted {
        /// The requested step.
        step: u64,
    },
    /// `Step(step)` does not verify.
    Corrupt {
        /// The requested step.
        step: u64,
        /// What failed.
        reason: String,
    },
    /// A checkpoint in a format this build does not read stands in the way.
    Unsupported {
        /// Its step.
        step: u64,
        /// The version problem.
        reason: String,
    },
    /// Committed checkpoints exist and none verifies.
    NoneVerifies {
        /// The newest committed step.
        newest: u64,
    },
}

impl Refusal {
    /// The refusal in words, for a checkpoint root at `url`.
    pub fn describe(&self, url: &str) -> String {
        match self {
            Refusal::FreshOverCommitted { newest } => format!(
                "checkpoint.resume = \"none\" but `{url}` already holds committed checkpoints \
                 (newest: step {newest}); use resume = \"latest\" to continue them or another \
                 checkpoint.url"
            ),
            Refusal::NewerExist { step, newest } => format!(
                "cannot resume from step {step}: `{url}` holds newer checkpoints (up to step \
                 {newest}) that this run would have to overwrite; resume from the newest, or \
                 copy step {step} to another checkpoint.url"
            ),
            Refusal::NotCommitted { step } => {
                format!(
                    "cannot resume from step {step}: no committed checkpoint at that step under `{url}`"
                )
            }
            Refusal::Corrupt { step, reason } => {
                format!("cannot resume from step {step}: it does not verify: {reason}")
            }
            Refusal::Unsupported { step, reason } => format!(
                "cannot resume past step {step}: {reason} (use the lockstep that wrote it, or \
                 another checkpoint.url)"
            ),
            Refusal::NoneVerifies { newest } => format!(
                "no committed checkpoint under `{url}` verifies (newest: step {newest}; run \
                 `lockstep ckpt verify --all {url}` to see why); refusing to start over on top \
                 of them"
            ),
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Verify this step and decide again with its verdict.
    Verify(u64),
    /// Start from `step` (`None`: from the beginning), after moving the newer committed
    /// checkpoints in `set_aside` (step, why) out of the way.
    Start {
        /// The checkpoint to start from.
        step: Option<u64>,
        /// Newer checkpoints that do not verify.
        set_aside: Vec<(u64, String)>,
    },
    /// Do not start.
    Refuse(Refusal),
}

/// Decides where a run starts, given the committed steps (any order) and the verdicts known so
/// far. Asks for one verification at a time, newest first, so that a valid newest checkpoint
/// costs one verification.
pub fn plan(want: Want, committed: &[u64], verdicts: &BTreeMap<u64, Verdict>) -> Decision {
    let mut steps = committed.to_vec();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    let newest = steps.first().copied();
    match want {
        Want::Fresh => match newest {
            Some(newest) => Decision::Refuse(Refusal::FreshOverCommitted { newest }),
            None => Decision::Start {
                step: None,
                set_aside: vec![],
            },
        },
        Want::Step(step) => {
            if let Some(newest) = newest.filter(|&n| n > step) {
                return Decision::Refuse(Refusal::NewerExist { step, newest });
            }
            if newest != Some(step) {
                return Decision::Refuse(Refusal::NotCommitted { step });
            }
            match verdicts.get(&step) {
                None => Decision::Verify(step),
                Some(Verdict::Valid) => Decision::Start {
                    step: Some(step),
                    set_aside: vec![],
                },
                Some(Verdict::Corrupt(reason)) => Decision::Refuse(Refusal::Corrupt {
                    step,
                    reason: reason.clone(),
                }),
                Some(Verdict::Unsupported(reason)) => Decision::Refuse(Refusal::Unsupported {
                    step,
                    reason: reason.clone(),
                }),
                Some(Verdict::Gone) => Decision::Refuse(Refusal::NotCommitted { step }),
            }
        }
        Want::Latest => {
            let mut set_aside = Vec::new();
            for &step in &steps {
                match verdicts.get(&step) {
                    None => return Decision::Verify(step),
                    Some(Verdict::Valid) => {
                        return Decision::Start {
                            step: Some(step),
                            set_aside,
                        };
                    }
                    Some(Verdict::Corrupt(reason)) => set_aside.push((step, reason.clone())),
                    Some(Verdict::Unsupported(reason)) => {
                        return Decision::Refuse(Refusal::Unsupported {
                            step,
                            reason: reason.clone(),
                        });
                    }
                    Some(Verdict::Gone) => {}
                }
            }
            match (set_aside.is_empty(), newest) {
                (false, Some(newest)) => Decision::Refuse(Refusal::NoneVerifies { newest }),
                _ => Decision::Start {
                    step: None,
                    set_aside: vec![],
                },
            }
        }
    }
}

/// A checkpoint moved out of the way by [`CheckpointStore::choose_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    /// Its step.
    pub step: u64,
    /// Why it did not verify.
    pub reason: String,
    /// Where it is now (URL).
    pub moved_to: String,
}

/// Where a run starts, as [`CheckpointStore::choose_start`] decided and prepared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPoint {
    /// The verified checkpoint to start from; `None`: the beginning.
    pub step: Option<u64>,
    /// Newer checkpoints that did not verify and were moved under `set-aside/`.
    pub set_aside: Vec<SetAside>,
}

impl CheckpointStore {
    /// Chooses where a run starts ([`plan`]), verifying committed checkpoints newest first and
    /// moving corrupt newer ones under `set-aside/` (never deleting them). A refusal is
    /// [`Error::Refused`]; store errors (the store cannot be read) are returned as they are,
    /// never taken for corruption, so an unreachable store cannot roll a job back.
    pub async fn choose_start(&self, want: Want) -> Result<StartPoint> {
        let committed = self.list().await?;
        let mut verdicts = BTreeMap::new();
        loop {
            match plan(want, &committed, &verdicts) {
                Decision::Verify(step) => {
                    let verdict = self.verdict(step).await?;
                    verdicts.insert(step, verdict);
                }
                Decision::Start { step, set_aside } => {
                    let mut moved = Vec::with_capacity(set_aside.len());
                    for (s, reason) in set_aside {
                        // The caller reports it (the trainer prints it, the coordinator puts
                        // it in the job's message and log).
                        let moved_to = self.set_aside(s).await?;
                        moved.push(SetAside {
                            step: s,
                            reason,
                            moved_to,
                        });
                    }
                    return Ok(StartPoint {
                        step,
                        set_aside: moved,
                    });
                }
                Decision::Refuse(r) => {
                    return Err(Error::Refused {
                        reason: r.describe(&self.url),
                    });
                }
            }
        }
    }

    /// Verifies `step` and classifies the outcome.
    pub(crate) async fn verdict(&self, step: u64) -> Result<Verdict> {
        let report = match self.verify(step).await {
            Ok(r) => r,
            Err(Error::NotCommitted { .. }) => return Ok(Verdict::Gone),
            Err(e) => return Err(e),
        };
        if let Some(v) = report
            .problems
            .iter()
            .find(|p| matches!(p, Error::UnsupportedVersion { .. }))
        {
            return Ok(Verdict::Unsupported(v.to_string()));
        }
        Ok(match report.problems.first() {
            None => Verdict::Valid,
            Some(p) => Verdict::Corrupt(p.to_string()),
        })
    }

    /// `set-aside` of a `file://` store when it is there but is not a directory (a link, a
    /// special file, a file): resume refuses to set checkpoints aside through it.
    pub async fn set_aside_stray(&self) -> Result<Option<crate::store::Stray>> {
        let Some(root) = self.local_dir.clone() else {
            return Ok(None);
        };
        let aside = root.join(SET_ASIDE_DIR);
        let kind = crate::local::blocking("check set-aside", aside.clone(), |d| {
            crate::local::not_a_dir(d)
        })
        .await?;
        Ok(kind.map(|kind| crate::store::Stray {
            path: aside.display().to_string(),
            kind,
        }))
    }

    /// Moves `step` to `set-aside/step-NNNNNNNNNNNN-UNIXMS-XXXXXXXX/` (a fresh folder each
    /// time) and returns its URL. Crash-safe: every file is copied first while the original
    /// stays committed; then the original manifest is deleted (the step is uncommitted from
    /// then on, and can be committed again), then the original's other files. Whenever it
    /// stops, either the original is still committed or the copy is complete.
    pub async fn set_aside(&self, step: u64) -> Result<String> {
        // Copies go under `set-aside/` only when it is a directory of the tree: through a link
        // they would land wherever it points.
        if let Some(stray) = self.set_aside_stray().await? {
            let fix = if stray.kind.removable() {
                "remove it (`lockstep ckpt gc` removes it)"
            } else {
                "move it aside"
            };
            return Err(Error::Refused {
                reason: format!(
                    "`{}` is {}: a checkpoint that does not verify is moved under `set-aside/`, \
                     a directory of the checkpoint tree, and never through a link; {fix}",
                    stray.path,
                    stray.kind.describe()
                ),
            });
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let unique = xxhash_rust::xxh3::xxh3_64(
            format!("{}-{}-{step}", now.as_nanos(), std::process::id()).as_bytes(),
        ) as u32;
        let to = self
            .root
            .clone()
            .join(SET_ASIDE_DIR)
            .join(format!("step-{step:012}-{}-{unique:08x}", now.as_millis()));
        let dir = self.step_dir(step);
        let files = self.list_dir_sizes(&dir).await?;
        for (from, size) in &files {
            let Some(name) = from.filename() else {
                continue;
            };
            let copy = to.clone().join(name);
            self.copy_object(from, &copy, *size).await?;
            // On `file://` stores: each copy is durable before the original goes.
            self.sync_local(&copy, false).await?;
        }
        // The copy's folder, `set-aside/` and the root (directories fsync like files).
        self.sync_local(&to.clone().join(crate::store::MANIFEST_FILE), true)
            .await?;
        self.sync_local(&self.root.clone().join(SET_ASIDE_DIR), false)
            .await?;
        let (manifest, rest): (Vec<_>, Vec<_>) = files
            .into_iter()
            .map(|(p, _)| p)
            .partition(|p| p.filename() == Some(crate::store::MANIFEST_FILE));
        for p in manifest.iter().chain(&rest) {
            self.delete_object(p).await?;
        }
        Ok(self.display(&to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(entries: &[(u64, Verdict)]) -> BTreeMap<u64, Verdict> {
        entries.iter().cloned().collect()
    }

    fn corrupt() -> Verdict {
        Verdict::Corrupt("chunk 3".into())
    }

    #[test]
    fn latest_verifies_newest_first_and_sets_aside_corrupt_ones() {
        let committed = [100, 300, 200];
        assert_eq!(
            plan(Want::Latest, &committed, &v(&[])),
            Decision::Verify(300)
        );
        assert_eq!(
            plan(Want::Latest, &committed, &v(&[(300, corrupt())])),
            Decision::Verify(200)
        );
        assert_eq!(
            plan(
                Want::Latest,
                &committed,
                &v(&[(300, corrupt()), (200, Verdict::Valid)])
            ),
            Decision::Start {
                step: Some(200),
                set_aside: vec![(300, "chunk 3".into())]
            }
        );
    }

    #[test]
    fn latest_never_starts_over_on_top_of_committed_checkpoints() {
        let all_bad = v(&[(300, corrupt()), (200, corrupt())]);
        assert_eq!(
            plan(Want::Latest, &[200, 300], &all_bad),
            Decision::Refuse(Refusal::NoneVerifies { newest: 300 })
        );
        // Nothing committed: the beginning.
        assert_eq!(
            plan(Want::Latest, &[], &v(&[])),
            Decision::Start {
                step: None,
                set_aside: vec![]
            }
        );
        // Deleted between listing and verifying (another process's gc): not a checkpoint.
        assert_eq!(
            plan(Want::Latest, &[5], &v(&[(5, Verdict::Gone)])),
            Decision::Start {
                step: None,
                set_aside: vec![]
            }
        );
    }

    #[test]
    fn a_newer_format_is_not_rolled_back_past() {
        let d = plan(
            Want::Latest,
            &[1, 2],
            &v(&[(2, Verdict::Unsupported("version 9".into()))]),
        );
        assert!(matches!(
            d,
            Decision::Refuse(Refusal::Unsupported { step: 2, .. })
        ));
    }

    #[test]
    fn fresh_refuses_over_committed_checkpoints() {
        assert_eq!(
            plan(Want::Fresh, &[4], &v(&[])),
            Decision::Refuse(Refusal::FreshOverCommitted { newest: 4 })
        );
        assert_eq!(
            plan(Want::Fresh, &[], &v(&[])),
            Decision::Start {
                step: None,
                set_aside: vec![]
            }
        );
    }

    #[test]
    fn a_named_step_must_be_the_newest_committed_and_verify() {
        assert_eq!(
            plan(Want::Step(4), &[4, 8], &v(&[])),
            Decision::Refuse(Refusal::NewerExist { step: 4, newest: 8 })
        );
        assert_eq!(
            plan(Want::Step(6), &[4], &v(&[])),
            Decision::Refuse(Refusal::NotCommitted { step: 6 })
        );
        assert_eq!(plan(Want::Step(8), &[4, 8], &v(&[])), Decision::Verify(8));
        assert_eq!(
            plan(Want::Step(8), &[4, 8], &v(&[(8, Verdict::Valid)])),
            Decision::Start {
                step: Some(8),
                set_aside: vec![]
            }
        );
        assert!(matches!(
            plan(Want::Step(8), &[4, 8], &v(&[(8, corrupt())])),
            Decision::Refuse(Refusal::Corrupt { step: 8, .. })
        ));
    }

    #[test]
    fn refusals_name_the_url_and_what_to_do() {
        let url = "file:///ckpt";
        let text = Refusal::NoneVerifies { newest: 3 }.describe(url);
        assert!(
            text.contains(url) && text.contains("lockstep ckpt verify"),
            "{text}"
        );
        let text = Refusal::FreshOverCommitted { newest: 3 }.describe(url);
        assert!(text.contains("already holds committed"), "{text}");
    }
}
