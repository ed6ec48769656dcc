//! One attempt of a job as plain data: who joined, who was last heard from when, who exited
//! how, who finished. Its deadlines and what they mean ([`Attempt::deadline`],
//! [`Attempt::timed_out`], [`Attempt::on_exit`]) are pure functions of it and the clock, tested
//! without processes or timers. The supervisor holds the process handles beside it.

use std::collections::BTreeMap;
use std::time::Duration;

// Tokio's clock, so the supervisor's timeouts run in paused time in tests.
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::launcher::Exit;
use crate::state::{Input, Phase};

/// How long a gang may take to assemble, and a rank to stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `job.gang_timeout`: from admission (launch, or when a queue let the gang start) until
    /// every worker has joined.
    pub gang: Duration,
    /// `job.heartbeat_timeout`: the longest silence of a rank.
    pub heartbeat: Duration,
}

/// A worker's report that it trained to its last step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The step it reached.
    pub step: u64,
    /// xxh3 of its final parameters.
    pub params_hash: String,
    /// True when it stopped before `train.steps` (a stop command or a signal).
    pub stopped_early: bool,
}

/// One attempt of a job.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Its number (1-based).
    pub number: u32,
    /// Ranks in its gang.
    pub world: u32,
    /// When it was registered (before its workers were launched).
    pub started: Instant,
    /// The committed checkpoint it starts from.
    pub resume_step: Option<u64>,
    /// When its workers were let start: at `started`, or later when a queue held the gang
    /// back (Kueue); `None` while one does.
    admitted: Option<Instant>,
    joined: BTreeMap<u32, String>,
    last_seen: Vec<Option<Instant>>,
    exited: Vec<Option<Exit>>,
    finished: Vec<Option<Finished>>,
}

impl Attempt {
    /// Attempt `number` of a gang of `world`, starting from `resume_step`.
    pub fn new(number: u32, world: u32, started: Instant, resume_step: Option<u64>) -> Attempt {
        let w = world as usize;
        Attempt {
            number,
            world,
            started,
            resume_step,
            admitted: Some(started),
            joined: BTreeMap::new(),
            last_seen: vec![None; w],
            exited: vec![None; w],
            finished: vec![None; w],
        }
    }

    /// Records that `worker` joined with ring address `addr`. Returns every worker's address
    /// in rank order once the last one has joined (the gang is complete).
    pub fn join(&mut self, worker: u32, addr: String, now: Instant) -> Result<Option<Vec<String>>> {
        self.rank_in_gang(worker)?;
        self.joined.insert(worker, addr);
        self.last_seen[worker as usize] = Some(now);
        Ok(self
            .all_joined()
            .then(|| self.joined.values().cloned().collect()))
    }

    /// A queue holds the gang back (its workers were launched but may not start yet): no gang
    /// timeout runs until [`Attempt::admit`].
    pub fn queue(&mut self) {
        if self.joined.is_empty() {
            self.admitted = None;
        }
    }

    /// The queue let the gang start at `now`: the gang timeout counts from here.
    pub fn admit(&mut self, now: Instant) {
        self.admitted.get_or_insert(now);
    }

    /// Whether a queue still holds the gang back.
    pub fn queued(&self) -> bool {
        self.admitted.is_none()
    }

    /// Every worker has joined.
    pub fn all_joined(&self) -> bool {
        self.joined.len() as u32 == self.world
    }

    /// Workers that have joined.
    pub fn joined(&self) -> u32 {
        self.joined.len() as u32
    }

    /// Rank `rank` was heard from.
    pub fn seen(&mut self, rank: u32, now: Instant) -> Result<()> {
        self.rank_in_gang(rank)?;
        self.last_seen[rank as usize] = Some(now);
        Ok(())
    }

    /// The coordinator itself could not hear anyone until `until` (it was stalled: stopped,
    /// swapped out, starved): no joined rank counts as silent before then.
    pub fn excuse(&mut self, until: Instant) {
        for seen in self.last_seen.iter_mut().flatten() {
            if *seen < until {
                *seen = until;
            }
        }
    }

    /// The first worker of this attempt that exited with an error a restart cannot fix, and
    /// how it ended.
    pub fn permanent_failure(&self) -> Option<(u32, String)> {
        self.exited
            .iter()
            .flatten()
            .find(|e| e.permanent())
            .map(|e| (e.worker, e.describe()))
    }

    /// Rank `rank` reported the end of its training.
    pub fn finish(&mut self, rank: u32, f: Finished) -> Result<()> {
        self.rank_in_gang(rank)?;
        self.finished[rank as usize] = Some(f);
        Ok(())
    }

    /// Rank 0's end-of-training report, once every worker exited after one.
    pub fn final_report(&self) -> Option<&Finished> {
        self.finished.first().and_then(Option::as_ref)
    }

    /// Workers that have not exited.
    pub fn alive(&self) -> usize {
        self.exited.iter().filter(|e| e.is_none()).count()
    }

    /// Whether `worker` has exited.
    pub fn has_exited(&self, worker: u32) -> bool {
        self.exited
            .get(worker as usize)
            .is_some_and(Option::is_some)
    }

    /// Records a worker's exit; returns what it means for the job, if anything: a failure
    /// (a non-zero status, a signal, or status 0 before its last step) or, with the last of a
    /// gang that all finished, success. Exits of other attempts are ignored.
    pub fn on_exit(&mut self, e: Exit) -> Option<Input> {
        if e.attempt != self.number {
            return None;
        }
        let w = e.worker as usize;
        let slot = self.exited.get_mut(w)?;
        *slot = Some(e.clone());
        if !e.success() {
            return Some(Input::WorkerFailed {
                attempt: e.attempt,
                worker: e.worker,
                cause: e.describe(),
                permanent: e.permanent(),
            });
        }
        if self.finished[w].as_ref().is_none_or(|f| f.stopped_early) {
            return Some(Input::WorkerFailed {
                attempt: e.attempt,
                worker: e.worker,
                cause: "exited before the last step without an error".into(),
                permanent: false,
            });
        }
        let all = self.exited.iter().flatten().filter(|x| x.success()).count() as u32 == self.world;
        // (Whether to export is the supervisor's to say: it knows the config.)
        all.then_some(Input::AllFinished {
            attempt: e.attempt,
            export: false,
        })
    }

    /// When something must happen next if nothing else does: the gang timeout while
    /// admitting, the earliest heartbeat deadline while running. `None`: no deadline (or one
    /// too far to represent, which is the same).
    pub fn deadline(&self, phase: Phase, t: Timeouts) -> Option<Instant> {
        match phase {
            Phase::Admitting => self.admitted?.checked_add(t.gang),
            Phase::Running => self
                .last_seen
                .iter()
                .filter_map(|s| s.unwrap_or(self.since()).checked_add(t.heartbeat))
                .min(),
            _ => None,
        }
    }

    /// What a deadline passing at `now` means: the gang did not assemble, or a rank went
    /// silent. `None` when nothing is due.
    pub fn timed_out(&self, phase: Phase, now: Instant, t: Timeouts) -> Option<Input> {
        let past =
            |since: Instant, limit: Duration| since.checked_add(limit).is_some_and(|d| now >= d);
        match phase {
            Phase::Admitting if self.admitted.is_some_and(|a| past(a, t.gang)) => {
                Some(Input::GangTimeout {
                    attempt: self.number,
                    joined: self.joined(),
                    world: self.world,
                })
            }
            Phase::Running => self
                .last_seen
                .iter()
                .position(|s| past(s.unwrap_or(self.since()), t.heartbeat))
                .map(|rank| Input::HeartbeatTimeout {
                    attempt: self.number,
                    rank: rank as u32,
                    after: t.heartbeat,
                }),
            _ => None,
        }
    }

    /// When the gang was let start (or now, while queued).
    fn since(&self) -> Instant {
        self.admitted.unwrap_or_else(Instant::now)
    }

    fn rank_in_gang(&self, rank: u32) -> Result<()> {
        if rank >= self.world {
            return Err(Error::InvalidArgument(format!(
                "worker {rank} is outside a gang of {}",
                self.world
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        gang: Duration::from_secs(60),
        heartbeat: Duration::from_secs(10),
    };

    fn exit(worker: u32, code: Option<i32>, signal: Option<i32>) -> Exit {
        Exit {
            message: None,
            unstartable: false,
            attempt: 1,
            worker,
            code,
            signal,
        }
    }

    fn done(step: u64, early: bool) -> Finished {
        Finished {
            step,
            params_hash: "h".into(),
            stopped_early: early,
        }
    }

    #[test]
    fn the_gang_completes_when_the_last_worker_joins() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, Some(50));
        assert_eq!(a.join(1, "b:2".into(), t0).unwrap(), None);
        assert_eq!(
            a.join(0, "a:1".into(), t0).unwrap(),
            Some(vec!["a:1".to_string(), "b:2".to_string()])
        );
        assert!(a.all_joined());
        assert!(matches!(
            a.join(2, "c:3".into(), t0),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_gang_timeout_counts_from_registration() {
        let t0 = Instant::now();
        let a = Attempt::new(3, 2, t0, None);
        assert_eq!(a.deadline(Phase::Admitting, T), Some(t0 + T.gang));
        assert_eq!(
            a.timed_out(Phase::Admitting, t0 + Duration::from_secs(59), T),
            None
        );
        assert_eq!(
            a.timed_out(Phase::Admitting, t0 + T.gang, T),
            Some(Input::GangTimeout {
                attempt: 3,
                joined: 0,
                world: 2
            })
        );
    }

    #[test]
    fn a_queued_gang_has_no_gang_timeout_until_admitted_and_then_the_whole_timeout() {
        let t0 = Instant::now();
        let mut a = Attempt::new(2, 2, t0, None);
        a.queue();
        assert!(a.queued());
        assert_eq!(a.deadline(Phase::Admitting, T), None);
        let hour = t0 + Duration::from_secs(3600);
        assert_eq!(
            a.timed_out(Phase::Admitting, hour, T),
            None,
            "queued for an hour"
        );
        a.admit(hour);
        assert!(!a.queued());
        assert_eq!(a.deadline(Phase::Admitting, T), Some(hour + T.gang));
        assert_eq!(
            a.timed_out(Phase::Admitting, hour + Duration::from_secs(59), T),
            None
        );
        assert!(a.timed_out(Phase::Admitting, hour + T.gang, T).is_some());
        // Admitted once: a later look does not move it.
        a.admit(hour + T.gang);
        assert_eq!(a.deadline(Phase::Admitting, T), Some(hour + T.gang));
    }

    #[test]
    fn the_silent_rank_is_named_at_its_heartbeat_deadline() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, None);
        a.join(0, "a".into(), t0).unwrap();
        a.join(1, "b".into(), t0).unwrap();
        a.seen(0, t0 + Duration::from_secs(8)).unwrap();
        // Rank 1 was last heard at t0, rank 0 at t0+8.
        assert_eq!(a.deadline(Phase::Running, T), Some(t0 + T.heartbeat));
        assert_eq!(
            a.timed_out(Phase::Running, t0 + T.heartbeat, T),
            Some(Input::HeartbeatTimeout {
                attempt: 1,
                rank: 1,
                after: T.heartbeat
            })
        );
        a.seen(1, t0 + Duration::from_secs(9)).unwrap();
        assert_eq!(a.timed_out(Phase::Running, t0 + T.heartbeat, T), None);
        assert!(a.seen(5, t0).is_err());
    }

    #[test]
    fn a_stall_of_the_coordinator_itself_is_not_blamed_on_the_ranks() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, None);
        a.join(0, "a".into(), t0).unwrap();
        a.join(1, "b".into(), t0).unwrap();
        // The coordinator was stopped from t0+5 s to t0+100 s.
        let resumed = t0 + Duration::from_secs(100);
        a.excuse(resumed);
        assert_eq!(a.timed_out(Phase::Running, resumed, T), None);
        assert_eq!(a.deadline(Phase::Running, T), Some(resumed + T.heartbeat));
        assert!(
            a.timed_out(Phase::Running, resumed + T.heartbeat, T)
                .is_some()
        );
    }

    #[test]
    fn durations_too_long_to_represent_mean_no_deadline() {
        let t0 = Instant::now();
        let huge = Timeouts {
            gang: Duration::MAX,
            heartbeat: Duration::MAX,
        };
        let a = Attempt::new(1, 1, t0, None);
        assert_eq!(a.deadline(Phase::Admitting, huge), None);
        assert_eq!(a.deadline(Phase::Running, huge), None);
        assert_eq!(a.timed_out(Phase::Admitting, t0 + T.gang, huge), None);
    }

    #[test]
    fn exits_fail_the_attempt_unless_every_worker_finished() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, None);
        // A signal.
        assert!(matches!(
            a.clone().on_exit(exit(0, None, Some(9))),
            Some(Input::WorkerFailed { worker: 0, ref cause, .. }) if cause == "was killed by SIGKILL"
        ));
        // Status 0 without a finished report.
        assert!(matches!(
            a.clone().on_exit(exit(1, Some(0), None)),
            Some(Input::WorkerFailed { worker: 1, .. })
        ));
        // Status 0 after stopping early (a stop command) is not success either.
        let mut early = a.clone();
        early.finish(1, done(5, true)).unwrap();
        assert!(matches!(
            early.on_exit(exit(1, Some(0), None)),
            Some(Input::WorkerFailed { .. })
        ));
        // Both finish: success with the last exit, rank 0's report kept.
        a.finish(0, done(10, false)).unwrap();
        a.finish(1, done(10, false)).unwrap();
        assert_eq!(a.on_exit(exit(1, Some(0), None)), None);
        assert_eq!(
            a.on_exit(exit(0, Some(0), None)),
            Some(Input::AllFinished {
                attempt: 1,
                export: false
            })
        );
        assert_eq!(a.final_report().map(|f| f.step), Some(10));
        assert_eq!(a.alive(), 0);
        // Another attempt's exit changes nothing.
        let mut b = Attempt::new(2, 1, t0, None);
        assert_eq!(b.on_exit(exit(0, Some(1), None)), None);
        assert_eq!(b.alive(), 1);
    }
}
