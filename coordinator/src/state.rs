//! The job state machine: pure decisions, no IO. The supervisor feeds it what happened
//! ([`Input`]) and carries out what it answers ([`Action`]); the launcher, the store and the
//! clock live at the edges.
//!
//! ```text
//! Queued ─launch─▶ Admitting ─all joined─▶ Running ─all finished─▶ Succeeded
//!                     │                       │        (with [export]) └─▶ Exporting ─▶ Exported
//!                     │                       │                                 └─(fails)─▶ Failed
//!        gang timeout / rank exit   rank exit / heartbeat timeout
//!                     ▼                       ▼
//!               Restarting(attempt+1) ◀───────┘   (after backoff; beyond max_restarts: Failed)
//! any non-final state ─cancel─▶ Cancelled
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use lockstep_api::Phase;

/// The part of a job the state machine decides on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// Where the job is.
    pub phase: Phase,
    /// The current (or last) attempt; 0 before the first launch.
    pub attempt: u32,
    /// Gang restarts so far.
    pub restarts: u32,
    /// Restarts allowed (`job.max_restarts`).
    pub max_restarts: u32,
    /// Why the job restarted, failed or was cancelled.
    pub message: String,
    /// Lost ranks replaced in place (not gang restarts: no step was lost to them).
    #[serde(default)]
    pub replacements: u32,
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Time to launch (a new job, or a restart's backoff elapsed).
    Start,
    /// Every worker of `attempt` joined.
    AllJoined {
        /// The attempt.
        attempt: u32,
    },
    /// `attempt`'s workers did not all join within the gang timeout.
    GangTimeout {
        /// The attempt.
        attempt: u32,
        /// Workers that joined.
        joined: u32,
        /// Workers expected.
        world: u32,
    },
    /// A worker of `attempt` exited with a failure (non-zero status or a signal).
    WorkerFailed {
        /// The attempt.
        attempt: u32,
        /// Its worker index (= rank).
        worker: u32,
        /// How it ended, in words.
        cause: String,
        /// It reported an error a restart cannot fix ([`lockstep_api::EXIT_PERMANENT`]).
        permanent: bool,
    },
    /// A rank of `attempt` sent nothing for the heartbeat timeout.
    HeartbeatTimeout {
        /// The attempt.
        attempt: u32,
        /// The silent rank.
        rank: u32,
        /// The timeout.
        after: Duration,
    },
    /// A lost rank of `attempt`'s running gang (exited, or silent and killed) is to be replaced
    /// in place: the survivors keep their processes and state, and one new worker joins them.
    /// The supervisor sends this instead of [`Input::WorkerFailed`] or
    /// [`Input::HeartbeatTimeout`] when the gang can be re-formed so.
    ReplaceWorker {
        /// The attempt.
        attempt: u32,
        /// The lost worker (= rank).
        worker: u32,
        /// How it was lost, in words.
        cause: String,
    },
    /// The replacement of `worker` did not join the re-formed gang within the gang timeout.
    ReplacementTimeout {
        /// The attempt.
        attempt: u32,
        /// The worker being replaced.
        worker: u32,
        /// The timeout.
        after: Duration,
    },
    /// Every worker of `attempt` exited 0 after training to the last step.
    AllFinished {
        /// The attempt.
        attempt: u32,
        /// The job has an `[export]` section: export the final checkpoint next.
        export: bool,
    },
    /// The export finished: `note` says what it wrote and whether it was promoted.
    Exported {
        /// What happened, in words.
        note: String,
    },
    /// The export failed (the trained checkpoint stays).
    ExportFailed {
        /// Why.
        error: String,
    },
    /// `attempt` could not be launched: a missing binary or unusable checkpoints (restarting
    /// cannot help), or a transient store error while choosing the checkpoint (it can).
    LaunchFailed {
        /// The attempt.
        attempt: u32,
        /// Why.
        error: String,
        /// Retrying may help: restart (within `max_restarts`) instead of failing.
        transient: bool,
    },
    /// A user asked to cancel.
    Cancel,
    /// The job cannot go on, for a reason outside its gang (it lost its checkpoint URL's
    /// lease to another job): it fails, its gang torn down.
    Fail {
        /// Why.
        why: String,
    },
    /// The coordinator restarted and found the job mid-attempt; its old workers are gone.
    CoordinatorRestarted,
}

/// What the supervisor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Kill every worker of the current attempt (and wait for them).
    TearDown,
    /// Launch all workers of this attempt.
    Launch {
        /// The attempt.
        attempt: u32,
    },
    /// Replace this worker of the running attempt with a new process (killing the old one if
    /// it is still there); the gang re-forms in place.
    Replace {
        /// The attempt.
        attempt: u32,
        /// The worker.
        worker: u32,
    },
    /// Feed [`Input::Start`] back after this long.
    RetryAfter(Duration),
    /// Export the final checkpoint; feed back [`Input::Exported`] or [`Input::ExportFailed`].
    Export,
}

/// Backoff before restart number `restart` (1-based): 1 s, 2 s, 4 s, … capped at 30 s.
pub fn backoff(restart: u32) -> Duration {
    let exp = restart.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(30))
}

impl Lifecycle {
    /// A new job, queued.
    pub fn new(max_restarts: u32) -> Lifecycle {
        Lifecycle {
            phase: Phase::Queued,
            attempt: 0,
            restarts: 0,
            max_restarts,
            message: String::new(),
            replacements: 0,
        }
    }

    /// Applies `input`: updates the lifecycle and returns the actions to carry out. Inputs
    /// about an attempt other than the current one, or that do not apply in the current phase,
    /// change nothing.
    pub fn apply(&mut self, input: Input) -> Vec<Action> {
        if self.phase.is_final() {
            return vec![];
        }
        let current = |a: u32| a == self.attempt;
        match input {
            Input::Start => match self.phase {
                Phase::Queued | Phase::Restarting => {
                    // Saturating: a record edited by hand cannot overflow it.
                    self.attempt = self.attempt.saturating_add(1);
                    self.phase = Phase::Admitting;
                    vec![Action::Launch {
                        attempt: self.attempt,
                    }]
                }
                _ => vec![],
            },
            Input::AllJoined { attempt } if current(attempt) && self.phase == Phase::Admitting => {
                self.phase = Phase::Running;
                vec![]
            }
            Input::GangTimeout {
                attempt,
                joined,
                world,
            } if current(attempt) && self.phase == Phase::Admitting => self.restart(format!(
                "attempt {attempt}: only {joined} of {world} workers joined within the gang timeout"
            )),
            Input::WorkerFailed {
                attempt,
                worker,
                cause,
                permanent,
            } if current(attempt) && matches!(self.phase, Phase::Admitting | Phase::Running) => {
                if permanent {
                    self.phase = Phase::Failed;
                    self.message = format!(
                        "attempt {attempt}: rank {worker} {cause}; not restarted: the error \
                         would repeat (fix it and submit the job again)"
                    );
                    return vec![Action::TearDown];
                }
                self.restart(format!("attempt {attempt}: rank {worker} {cause}"))
            }
            // The gang was torn down for another rank's failure, but one of its ranks had
            // failed for good (its exit arrived second): restarting would only repeat it.
            Input::WorkerFailed {
                attempt,
                worker,
                cause,
                permanent: true,
            } if current(attempt) && self.phase == Phase::Restarting => {
                self.phase = Phase::Failed;
                self.message = format!(
                    "attempt {attempt}: rank {worker} {cause}; not restarted: the error would \
                     repeat (fix it and submit the job again)"
                );
                vec![]
            }
            Input::HeartbeatTimeout {
                attempt,
                rank,
                after,
            } if current(attempt) && matches!(self.phase, Phase::Admitting | Phase::Running) => {
                self.restart(format!(
                    "attempt {attempt}: rank {rank} sent no heartbeat for {after:?} (hung or \
                     unreachable)"
                ))
            }
            Input::ReplaceWorker {
                attempt,
                worker,
                cause,
            } if current(attempt) && self.phase == Phase::Running => {
                self.replacements = self.replacements.saturating_add(1);
                self.message = format!(
                    "attempt {attempt}: rank {worker} {cause}; replaced in place (the other \
                     ranks keep their state, so no step is lost)"
                );
                vec![Action::Replace { attempt, worker }]
            }
            Input::ReplacementTimeout {
                attempt,
                worker,
                after,
            } if current(attempt) && self.phase == Phase::Running => self.restart(format!(
                "attempt {attempt}: the replacement of rank {worker} did not join the gang within \
                 {after:?}"
            )),
            Input::AllFinished { attempt, export }
                if current(attempt) && self.phase == Phase::Running =>
            {
                self.message.clear();
                if export {
                    self.phase = Phase::Exporting;
                    return vec![Action::TearDown, Action::Export];
                }
                self.phase = Phase::Succeeded;
                vec![Action::TearDown]
            }
            Input::Exported { note } if self.phase == Phase::Exporting => {
                self.phase = Phase::Exported;
                self.message = note;
                vec![]
            }
            Input::ExportFailed { error } if self.phase == Phase::Exporting => {
                self.phase = Phase::Failed;
                self.message = format!(
                    "trained to the last step, but the export failed: {error} (the final \
                     checkpoint is committed: export it with `lockstep export`)"
                );
                vec![]
            }
            Input::LaunchFailed {
                attempt,
                error,
                transient: true,
            } if current(attempt) => self.restart(format!(
                "attempt {attempt}: cannot launch the workers: {error}"
            )),
            Input::LaunchFailed { attempt, error, .. } if current(attempt) => {
                self.phase = Phase::Failed;
                self.message = format!("attempt {attempt}: cannot launch the workers: {error}");
                vec![Action::TearDown]
            }
            Input::Cancel => {
                self.message = if self.phase == Phase::Exporting {
                    "cancelled by a user while exporting: the version may be unfinished, or \
                     promoted with its webhook notice still owed; exporting the same checkpoint \
                     again (`lockstep export CHECKPOINT --to URL --promote [--webhook URL]`, or \
                     the job run again) finishes it and delivers a notice still owed"
                        .into()
                } else {
                    "cancelled by a user".into()
                };
                self.phase = Phase::Cancelled;
                vec![Action::TearDown]
            }
            Input::Fail { why } => {
                self.phase = Phase::Failed;
                self.message = why;
                vec![Action::TearDown]
            }
            Input::CoordinatorRestarted => match self.phase {
                // Exporting again is safe: the same weights to the same version are a no-op.
                Phase::Exporting => vec![Action::Export],
                // Not the gang's fault: relaunched at once, and not counted against
                // job.max_restarts (on Kubernetes a coordinator pod is rescheduled routinely).
                Phase::Admitting | Phase::Running => {
                    self.phase = Phase::Restarting;
                    self.message = format!("attempt {}: the coordinator restarted", self.attempt);
                    vec![Action::TearDown, Action::RetryAfter(Duration::ZERO)]
                }
                Phase::Queued | Phase::Restarting => vec![Action::RetryAfter(Duration::ZERO)],
                _ => vec![],
            },
            _ => vec![],
        }
    }

    fn restart(&mut self, cause: String) -> Vec<Action> {
        if self.restarts >= self.max_restarts {
            self.phase = Phase::Failed;
            self.message = format!(
                "{cause}; gave up after {} restart{} (job.max_restarts = {})",
                self.restarts,
                if self.restarts == 1 { "" } else { "s" },
                self.max_restarts
            );
            return vec![Action::TearDown];
        }
        self.restarts += 1;
        self.phase = Phase::Restarting;
        self.message = cause;
        vec![Action::TearDown, Action::RetryAfter(backoff(self.restarts))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(max_restarts: u32) -> Lifecycle {
        let mut l = Lifecycle::new(max_restarts);
        assert_eq!(l.apply(Input::Start), vec![Action::Launch { attempt: 1 }]);
        assert_eq!(l.apply(Input::AllJoined { attempt: 1 }), vec![]);
        assert_eq!(l.phase, Phase::Running);
        l
    }

    #[test]
    fn a_replaced_rank_keeps_the_job_running_and_a_late_replacement_restarts_it() {
        let mut l = running(1);
        let replace = Input::ReplaceWorker {
            attempt: 1,
            worker: 1,
            cause: "was killed by signal 9".into(),
        };
        assert_eq!(
            l.apply(replace),
            vec![Action::Replace {
                attempt: 1,
                worker: 1
            }]
        );
        assert_eq!(
            (l.phase, l.restarts, l.replacements),
            (Phase::Running, 0, 1)
        );
        assert!(l.message.contains("replaced in place"), "{}", l.message);
        // Of another attempt: nothing.
        assert_eq!(
            l.apply(Input::ReplaceWorker {
                attempt: 7,
                worker: 1,
                cause: "gone".into(),
            }),
            vec![]
        );
        let actions = l.apply(Input::ReplacementTimeout {
            attempt: 1,
            worker: 1,
            after: Duration::from_secs(60),
        });
        assert_eq!(l.phase, Phase::Restarting);
        assert_eq!(actions[0], Action::TearDown);
        assert!(l.message.contains("did not join"), "{}", l.message);
    }

    #[test]
    fn a_clean_run_succeeds() {
        let mut l = running(3);
        assert_eq!(
            l.apply(Input::AllFinished {
                attempt: 1,
                export: false
            }),
            vec![Action::TearDown]
        );
        assert_eq!(l.phase, Phase::Succeeded);
        assert_eq!(l.apply(Input::Cancel), vec![], "final phases stay final");
        assert_eq!(l.phase, Phase::Succeeded);
    }

    #[test]
    fn a_dead_rank_restarts_the_gang_with_backoff_then_fails_past_max_restarts() {
        let mut l = running(2);
        let fail = |attempt| Input::WorkerFailed {
            attempt,
            worker: 1,
            cause: "was killed by SIGKILL".into(),
            permanent: false,
        };
        assert_eq!(
            l.apply(fail(1)),
            vec![Action::TearDown, Action::RetryAfter(Duration::from_secs(1))]
        );
        assert_eq!(l.phase, Phase::Restarting);
        assert!(
            l.message.contains("rank 1 was killed by SIGKILL"),
            "{}",
            l.message
        );
        assert_eq!(l.apply(Input::Start), vec![Action::Launch { attempt: 2 }]);
        l.apply(Input::AllJoined { attempt: 2 });
        // The other rank of the dead attempt reports late: ignored.
        assert_eq!(l.apply(fail(1)), vec![]);
        assert_eq!(l.phase, Phase::Running);
        assert_eq!(
            l.apply(Input::HeartbeatTimeout {
                attempt: 2,
                rank: 0,
                after: Duration::from_secs(30)
            }),
            vec![Action::TearDown, Action::RetryAfter(Duration::from_secs(2))]
        );
        assert!(l.message.contains("no heartbeat"), "{}", l.message);
        l.apply(Input::Start);
        l.apply(Input::AllJoined { attempt: 3 });
        assert_eq!(l.apply(fail(3)), vec![Action::TearDown]);
        assert_eq!(l.phase, Phase::Failed);
        assert!(
            l.message.contains("rank 1 was killed by SIGKILL")
                && l.message.contains("gave up after 2 restarts"),
            "{}",
            l.message
        );
    }

    #[test]
    fn a_gang_that_does_not_assemble_is_torn_down_and_retried() {
        let mut l = Lifecycle::new(1);
        l.apply(Input::Start);
        assert_eq!(
            l.apply(Input::AllFinished {
                attempt: 1,
                export: false
            }),
            vec![],
            "not running yet"
        );
        assert_eq!(
            l.apply(Input::GangTimeout {
                attempt: 1,
                joined: 1,
                world: 2
            }),
            vec![Action::TearDown, Action::RetryAfter(Duration::from_secs(1))]
        );
        assert!(
            l.message.contains("only 1 of 2 workers joined"),
            "{}",
            l.message
        );
    }

    #[test]
    fn cancel_tears_down_from_any_live_phase() {
        for setup in [0, 1, 2] {
            let mut l = Lifecycle::new(3);
            if setup >= 1 {
                l.apply(Input::Start);
            }
            if setup >= 2 {
                l.apply(Input::AllJoined { attempt: 1 });
            }
            assert_eq!(l.apply(Input::Cancel), vec![Action::TearDown]);
            assert_eq!(l.phase, Phase::Cancelled);
            assert_eq!(l.apply(Input::Start), vec![]);
        }
    }

    #[test]
    fn a_launch_failure_is_final() {
        let mut l = Lifecycle::new(3);
        l.apply(Input::Start);
        l.apply(Input::LaunchFailed {
            attempt: 1,
            error: "S3 timed out".into(),
            transient: true,
        });
        assert_eq!(l.phase, Phase::Restarting, "a transient error is retried");
        l.apply(Input::Start);
        l.apply(Input::LaunchFailed {
            attempt: 2,
            error: "the executable is gone".into(),
            transient: false,
        });
        assert_eq!(l.phase, Phase::Failed);
        assert!(l.message.contains("the executable is gone"));
    }

    #[test]
    fn a_coordinator_restart_relaunches_live_jobs() {
        // Any number of coordinator restarts: none counts against max_restarts (here 1).
        let mut l = running(1);
        for _ in 0..5 {
            assert_eq!(
                l.apply(Input::CoordinatorRestarted),
                vec![Action::TearDown, Action::RetryAfter(Duration::ZERO)]
            );
            assert_eq!(l.phase, Phase::Restarting);
            assert_eq!(l.restarts, 0);
            let next = l.attempt + 1;
            assert_eq!(
                l.apply(Input::Start),
                vec![Action::Launch { attempt: next }]
            );
            assert_eq!(l.apply(Input::AllJoined { attempt: next }), vec![]);
        }
        let mut q = Lifecycle::new(3);
        assert_eq!(
            q.apply(Input::CoordinatorRestarted),
            vec![Action::RetryAfter(Duration::ZERO)]
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let got: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn an_error_a_restart_cannot_fix_fails_the_job_at_once() {
        let mut l = Lifecycle::new(3);
        l.apply(Input::Start);
        let actions = l.apply(Input::WorkerFailed {
            attempt: 1,
            worker: 0,
            cause: "exited with status 3: error: config.json not found".into(),
            permanent: true,
        });
        assert_eq!(actions, vec![Action::TearDown]);
        assert_eq!(l.phase, Phase::Failed);
        assert_eq!(l.restarts, 0);
        assert!(l.message.contains("config.json not found"), "{}", l.message);
        assert!(l.message.contains("not restarted"), "{}", l.message);
    }

    #[test]
    fn a_permanent_error_found_while_tearing_down_stops_the_restart() {
        let mut l = Lifecycle::new(3);
        l.apply(Input::Start);
        // Rank 1's transient failure arrives first; the gang is torn down for a restart.
        l.apply(Input::WorkerFailed {
            attempt: 1,
            worker: 1,
            cause: "exited with status 1".into(),
            permanent: false,
        });
        assert_eq!(l.phase, Phase::Restarting);
        // Rank 0's exit, collected during the teardown, was permanent.
        let actions = l.apply(Input::WorkerFailed {
            attempt: 1,
            worker: 0,
            cause: "exited with status 3: error: bad.jsonl:2: not a JSON record".into(),
            permanent: true,
        });
        assert!(actions.is_empty());
        assert_eq!(l.phase, Phase::Failed);
        assert!(l.message.contains("bad.jsonl:2"), "{}", l.message);
    }

    #[test]
    fn a_job_with_an_export_section_exports_after_training() {
        let mut l = running(3);
        assert_eq!(
            l.apply(Input::AllFinished {
                attempt: 1,
                export: true
            }),
            vec![Action::TearDown, Action::Export]
        );
        assert_eq!(l.phase, Phase::Exporting);
        assert!(!l.phase.is_final());
        // A restarted coordinator exports again (the same version is a no-op).
        assert_eq!(l.apply(Input::CoordinatorRestarted), vec![Action::Export]);
        // A cancel now says how to finish the export and its owed notice.
        let mut cancelled = l.clone();
        assert_eq!(cancelled.apply(Input::Cancel), vec![Action::TearDown]);
        assert!(
            cancelled.message.contains("while exporting")
                && cancelled.message.contains("notice still owed"),
            "{}",
            cancelled.message
        );
        l.apply(Input::Exported {
            note: "exported v to u; promoted".into(),
        });
        assert_eq!(
            (l.phase, l.message.as_str()),
            (Phase::Exported, "exported v to u; promoted")
        );
        assert!(l.phase.is_final());

        let mut l = running(3);
        l.apply(Input::AllFinished {
            attempt: 1,
            export: true,
        });
        l.apply(Input::ExportFailed {
            error: "file:///x: permission denied".into(),
        });
        assert_eq!(l.phase, Phase::Failed);
        assert!(
            l.message
                .contains("export failed: file:///x: permission denied"),
            "{}",
            l.message
        );
        assert!(l.message.contains("lockstep export"), "{}", l.message);
    }
}
