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
    /// The ring generation: 0 for the gang as launched, one more each time it re-forms in
    /// place after losing a rank.
    generation: u32,
    /// A re-formed gang is assembling (its members join again); `joined` holds its members.
    forming: bool,
    /// The finished step each survivor holds, in the gang being re-formed.
    holds: BTreeMap<u32, u64>,
    /// The worker being replaced in place, and since when.
    replacing: Option<(u32, Instant)>,
    /// A rank reported a finished step since the gang (re-)formed.
    stepped: bool,
    /// The gang could not re-form: its survivors write this emergency checkpoint.
    emergency: Option<Emergency>,
}

/// An emergency checkpoint: the state survivors of a gang that could not re-form hold, written
/// by them before the gang restarts from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emergency {
    /// Its step: the newest any survivor holds.
    pub step: u64,
    /// The survivors that hold it, in shard order (shard `i` is `writers[i]`'s).
    pub writers: Vec<u32>,
}

/// A gang that has (re-)formed: what every member's `Join` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formed {
    /// Every rank's ring address, in rank order.
    pub peers: Vec<String>,
    /// The ring generation.
    pub generation: u32,
    /// A re-formed gang: the rank holding the newest state (the most finished steps, the
    /// lowest such rank), which streams it to the others, and that step.
    pub state_from: Option<(u32, u64)>,
}

/// What a `Join` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The generation the caller joined (its answer must be of it).
    pub generation: u32,
    /// This join began re-forming the gang (a survivor was first to regroup): the previous
    /// gang's barrier and its checkpoint in flight are void.
    pub began_reforming: bool,
    /// The gang is complete with this join.
    pub formed: Option<Formed>,
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
            generation: 0,
            forming: false,
            holds: BTreeMap::new(),
            replacing: None,
            stepped: false,
            emergency: None,
        }
    }

    /// Records that `worker` joined with ring address `addr`: a launched worker (`holds`
    /// `None`), or a survivor regrouping after the gang lost a rank, holding the state of
    /// finished step `holds` and leaving ring `left` — the first such survivor begins
    /// re-forming the gang, if the coordinator has not already. Says which generation the
    /// caller joined and, once the last member has joined, the formed gang.
    pub fn join(
        &mut self,
        worker: u32,
        addr: String,
        holds: Option<u64>,
        left: u32,
        now: Instant,
    ) -> Result<Joined> {
        self.rank_in_gang(worker)?;
        if let Some(e) = &self.emergency {
            return Err(Error::InvalidArgument(format!(
                "worker {worker} joins a gang that could not re-form: its survivors write an \
                 emergency checkpoint of step {} and the gang restarts",
                e.step
            )));
        }
        let mut began_reforming = false;
        if let Some(step) = holds {
            if left > self.generation {
                return Err(Error::InvalidArgument(format!(
                    "worker {worker} leaves ring {left}, but this gang's newest is {}",
                    self.generation
                )));
            }
            if left == self.generation {
                began_reforming = self.reform();
            } else if !self.forming {
                return Err(Error::InvalidArgument(format!(
                    "worker {worker} leaves ring {left}, but ring {} formed without it",
                    self.generation
                )));
            }
            self.holds.insert(worker, step);
        }
        self.joined.insert(worker, addr);
        self.last_seen[worker as usize] = Some(now);
        let formed = self.all_joined().then(|| self.formed(now));
        Ok(Joined {
            generation: self.generation,
            began_reforming,
            formed,
        })
    }

    /// The gang is complete: its answer, and a re-formed one stops forming.
    fn formed(&mut self, now: Instant) -> Formed {
        let state_from = if self.generation == 0 {
            None
        } else {
            // The most steps, then the lowest rank.
            self.holds
                .iter()
                .max_by_key(|(rank, step)| (**step, std::cmp::Reverse(**rank)))
                .map(|(rank, step)| (*rank, *step))
        };
        if self.forming {
            self.forming = false;
            self.replacing = None;
            self.stepped = false;
            for seen in &mut self.last_seen {
                *seen = Some(now);
            }
        }
        Formed {
            peers: self.joined.values().cloned().collect(),
            generation: self.generation,
            state_from,
        }
    }

    /// Begins re-forming the gang (a new ring generation whose members join again), unless it
    /// is already being re-formed. Returns whether it began now.
    fn reform(&mut self) -> bool {
        if self.forming {
            return false;
        }
        self.generation = self.generation.saturating_add(1);
        self.forming = true;
        self.joined.clear();
        self.holds.clear();
        true
    }

    /// `worker` (exited, or killed for its silence) is replaced in place by a new process at
    /// `now`: the gang re-forms with it and the survivors. Returns whether this began the
    /// re-forming (else a survivor already had).
    pub fn replace(&mut self, worker: u32, now: Instant) -> Result<bool> {
        self.rank_in_gang(worker)?;
        let began = self.reform();
        // A survivor's regroup may already have listed it: it is gone.
        self.joined.remove(&worker);
        self.holds.remove(&worker);
        let w = worker as usize;
        self.exited[w] = None;
        self.finished[w] = None;
        self.last_seen[w] = None;
        self.replacing = Some((worker, now));
        Ok(began)
    }

    /// Whether `worker`, lost, may be replaced in place now: the gang finished a step since it
    /// (re-)formed (a replacement that fails before that, or a rank lost while one is being
    /// replaced, restarts the gang instead), every other rank is still there, and there are
    /// others. Survivors may already be regrouping (they often see the loss first).
    pub fn replaceable(&self, worker: u32) -> bool {
        let others_there = self
            .exited
            .iter()
            .enumerate()
            .all(|(w, e)| w == worker as usize || e.is_none());
        self.world > 1 && self.replacing.is_none() && self.stepped && others_there
    }

    /// Every rank that survived the loss of `lost` (every other rank that has not exited, and
    /// is not a replacement) has regrouped into the gang being re-formed.
    pub fn regrouped(&self, lost: Option<u32>) -> bool {
        let replacing = self.replacing();
        self.forming
            && self.exited.iter().enumerate().all(|(w, e)| {
                let w = w as u32;
                Some(w) == lost
                    || Some(w) == replacing
                    || e.is_some()
                    || self.holds.contains_key(&w)
            })
    }

    /// The gang being re-formed cannot be: begins the emergency checkpoint of the newest state
    /// its regrouped survivors hold, written by those that hold it — unless none regrouped or
    /// that state is not newer than the `committed` checkpoint. Joins are refused from now on.
    pub fn begin_emergency(&mut self, committed: Option<u64>) -> Option<Emergency> {
        if !self.forming || self.emergency.is_some() {
            return None;
        }
        let step = *self.holds.values().max()?;
        if step == 0 || committed.is_some_and(|c| c >= step) {
            return None;
        }
        let writers = self
            .holds
            .iter()
            .filter(|(_, s)| **s == step)
            .map(|(w, _)| *w)
            .collect();
        let e = Emergency { step, writers };
        self.emergency = Some(e.clone());
        Some(e)
    }

    /// The gang re-formed in place and has not finished a step since: a member lost now (the
    /// replacement, while the ring formed or the state streamed) leaves the survivors holding
    /// their state but waiting on the ring until `job.collective_timeout`, then regrouping.
    pub fn unsettled(&self) -> bool {
        self.generation > 0 && !self.forming && !self.stepped
    }

    /// Begins re-forming the gang without a replacement, for the survivors of an
    /// [`Attempt::unsettled`] gang to regroup into (then write an emergency checkpoint).
    /// Returns whether it began now.
    pub fn regroup_survivors(&mut self) -> bool {
        self.reform()
    }

    /// The emergency checkpoint being written, if any.
    pub fn emergency(&self) -> Option<&Emergency> {
        self.emergency.as_ref()
    }

    /// A rank reported a finished step.
    pub fn stepped(&mut self) {
        self.stepped = true;
    }

    /// The worker being replaced in place, if one is.
    pub fn replacing(&self) -> Option<u32> {
        self.replacing.map(|r| r.0)
    }

    /// A re-formed gang is assembling.
    pub fn forming(&self) -> bool {
        self.forming
    }

    /// The ring generation.
    pub fn generation(&self) -> u32 {
        self.generation
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
        // A gang being re-formed does not count a member that is gone.
        if self.forming {
            self.joined.remove(&e.worker);
            self.holds.remove(&e.worker);
        }
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
                .silences()
                .filter_map(|(_, s)| s.checked_add(t.heartbeat))
                .chain(
                    self.replacing
                        .and_then(|(_, since)| since.checked_add(t.gang)),
                )
                .min(),
            _ => None,
        }
    }

    /// Each rank that must be heard from, and since when it is silent: not a replacement that
    /// has not joined yet (the gang timeout bounds it).
    fn silences(&self) -> impl Iterator<Item = (usize, Instant)> + '_ {
        self.last_seen
            .iter()
            .enumerate()
            .filter(|(rank, _)| self.replacing.is_none_or(|(w, _)| w as usize != *rank))
            .map(|(rank, s)| (rank, s.unwrap_or(self.since())))
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
            Phase::Running => {
                if let Some((worker, since)) = self.replacing
                    && past(since, t.gang)
                {
                    return Some(Input::ReplacementTimeout {
                        attempt: self.number,
                        worker,
                        after: t.gang,
                    });
                }
                self.silences()
                    .find(|(_, s)| past(*s, t.heartbeat))
                    .map(|(rank, _)| Input::HeartbeatTimeout {
                        attempt: self.number,
                        rank: rank as u32,
                        after: t.heartbeat,
                    })
            }
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

    #[test]
    fn a_gang_that_cannot_re_form_checkpoints_the_newest_state_its_survivors_hold() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 3, t0, Some(100));
        for w in 0..3 {
            a.join(w, format!("h:{w}"), None, 0, t0).unwrap();
        }
        a.stepped();
        // Rank 2 is lost; rank 1 regroups at once, rank 0 not yet.
        a.replace(2, t0).unwrap();
        a.join(1, "h:11".into(), Some(112), 0, t0).unwrap();
        assert!(!a.regrouped(Some(2)), "rank 0 has not regrouped");
        a.join(0, "h:10".into(), Some(112), 1, t0).unwrap();
        assert!(a.regrouped(Some(2)));
        // Nothing newer than the committed checkpoint: no emergency checkpoint.
        assert_eq!(a.clone().begin_emergency(Some(112)), None);
        let e = a
            .begin_emergency(Some(100))
            .expect("newer than checkpoint 100");
        assert_eq!(
            e,
            Emergency {
                step: 112,
                writers: vec![0, 1]
            }
        );
        assert_eq!(a.emergency(), Some(&e));
        // Once it is written, nobody joins the gang it gave up on.
        assert!(a.join(2, "h:12".into(), None, 0, t0).is_err());
        assert_eq!(a.begin_emergency(Some(100)), None, "one at a time");
    }

    #[test]
    fn a_replacement_that_joined_and_died_is_not_counted_in_the_gang_being_re_formed() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, Some(100));
        a.join(0, "h:0".into(), None, 0, t0).unwrap();
        a.join(1, "h:1".into(), None, 0, t0).unwrap();
        a.stepped();
        a.replace(1, t0).unwrap();
        // The replacement joins, then dies before the survivor regroups.
        assert!(
            a.join(1, "h:2".into(), None, 0, t0)
                .unwrap()
                .formed
                .is_none()
        );
        assert!(a.on_exit(exit(1, None, Some(9))).is_some());
        // The survivor's join does not complete a gang with a dead member.
        let j = a.join(0, "h:3".into(), Some(112), 0, t0).unwrap();
        assert_eq!(j.formed, None);
        assert!(a.regrouped(Some(1)));
        assert_eq!(
            a.begin_emergency(Some(100)),
            Some(Emergency {
                step: 112,
                writers: vec![0]
            })
        );
    }

    #[test]
    fn only_the_survivors_holding_the_newest_step_write_the_emergency_checkpoint() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 3, t0, None);
        for w in 0..3 {
            a.join(w, format!("h:{w}"), None, 0, t0).unwrap();
        }
        a.stepped();
        // The lost rank broke the ring while step 8's all-reduce finished on rank 2 only.
        a.join(0, "h:10".into(), Some(7), 0, t0).unwrap();
        a.join(2, "h:12".into(), Some(8), 0, t0).unwrap();
        let e = a.begin_emergency(None).expect("no checkpoint yet");
        assert_eq!(
            e,
            Emergency {
                step: 8,
                writers: vec![2]
            }
        );
    }

    #[test]
    fn survivors_of_a_gang_that_lost_its_replacement_as_it_formed_regroup_for_an_emergency() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, Some(100));
        a.join(0, "h:0".into(), None, 0, t0).unwrap();
        a.join(1, "h:1".into(), None, 0, t0).unwrap();
        a.stepped();
        assert!(!a.unsettled());
        a.replace(1, t0).unwrap();
        a.join(0, "h:2".into(), Some(130), 0, t0).unwrap();
        assert!(
            a.join(1, "h:3".into(), None, 0, t0)
                .unwrap()
                .formed
                .is_some()
        );
        // The replacement dies before the gang's first step.
        assert!(a.unsettled());
        assert!(a.on_exit(exit(1, None, Some(9))).is_some());
        assert!(a.regroup_survivors());
        // Rank 0's ring fails; it regroups from ring 1 into ring 2.
        a.join(0, "h:4".into(), Some(130), 1, t0).unwrap();
        assert!(a.regrouped(Some(1)));
        assert_eq!(
            a.begin_emergency(Some(100)),
            Some(Emergency {
                step: 130,
                writers: vec![0]
            })
        );
    }

    #[test]
    fn survivors_that_never_stepped_have_nothing_to_checkpoint() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, None);
        a.join(0, "h:0".into(), None, 0, t0).unwrap();
        a.join(1, "h:1".into(), None, 0, t0).unwrap();
        a.join(0, "h:2".into(), Some(0), 0, t0).unwrap();
        assert_eq!(a.begin_emergency(None), None);
    }

    #[test]
    fn a_gang_not_re_forming_has_no_emergency_checkpoint() {
        let t0 = Instant::now();
        let mut a = Attempt::new(1, 2, t0, None);
        a.join(0, "h:0".into(), None, 0, t0).unwrap();
        a.join(1, "h:1".into(), None, 0, t0).unwrap();
        assert!(!a.regrouped(Some(1)));
        assert_eq!(a.begin_emergency(None), None);
    }

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
        assert_eq!(a.join(1, "b:2".into(), None, 0, t0).unwrap().formed, None);
        assert_eq!(
            a.join(0, "a:1".into(), None, 0, t0).unwrap().formed,
            Some(Formed {
                peers: vec!["a:1".to_string(), "b:2".to_string()],
                generation: 0,
                state_from: None,
            })
        );
        assert!(a.all_joined());
        assert!(matches!(
            a.join(2, "c:3".into(), None, 0, t0),
            Err(Error::InvalidArgument(_))
        ));
    }

    /// A gang of 3 that formed and stepped.
    fn running(t0: Instant) -> Attempt {
        let mut a = Attempt::new(1, 3, t0, None);
        for w in 0..3 {
            a.join(w, format!("r{w}:1"), None, 0, t0).unwrap();
        }
        a.stepped();
        a
    }

    #[test]
    fn a_replaced_rank_re_forms_the_gang_with_the_survivor_holding_the_most_steps() {
        let t0 = Instant::now();
        let mut a = running(t0);
        assert!(a.replaceable(1));
        // Rank 1 died; the coordinator saw its exit before any survivor regrouped.
        a.on_exit(exit(1, None, Some(9)));
        assert!(a.replace(1, t0).unwrap());
        assert!(!a.replaceable(0), "one replacement at a time");
        assert_eq!(a.replacing(), Some(1));
        // Survivors leave ring 0: rank 2 finished one more step than rank 0.
        let j = a.join(2, "r2:2".into(), Some(8), 0, t0).unwrap();
        assert_eq!(
            (j.generation, j.began_reforming, j.formed),
            (1, false, None)
        );
        let j = a.join(0, "r0:2".into(), Some(7), 0, t0).unwrap();
        assert_eq!(j.formed, None);
        // The replacement holds nothing.
        let j = a.join(1, "r1:2".into(), None, 0, t0).unwrap();
        assert_eq!(
            j.formed,
            Some(Formed {
                peers: vec!["r0:2".into(), "r1:2".into(), "r2:2".into()],
                generation: 1,
                state_from: Some((2, 8)),
            })
        );
        assert_eq!(a.replacing(), None);
        // Not again until the re-formed gang finished a step.
        assert!(!a.replaceable(0));
        a.stepped();
        assert!(a.replaceable(0));
        // Not when another rank exited too (it lost its peer and gave up).
        a.on_exit(exit(2, Some(4), None));
        assert!(!a.replaceable(0));
    }

    #[test]
    fn a_survivor_that_regroups_first_voids_the_old_gang_and_ties_go_to_the_lowest_rank() {
        let t0 = Instant::now();
        let mut a = running(t0);
        let j = a.join(2, "r2:2".into(), Some(5), 0, t0).unwrap();
        assert!(j.began_reforming);
        assert_eq!(j.generation, 1);
        // The coordinator learns of the loss after: no second re-forming, and the dead
        // rank's old address is not in the new gang.
        assert!(a.replaceable(1));
        assert!(!a.replace(1, t0).unwrap());
        a.join(0, "r0:2".into(), Some(5), 0, t0).unwrap();
        let formed = a
            .join(1, "r1:2".into(), None, 0, t0)
            .unwrap()
            .formed
            .unwrap();
        assert_eq!(formed.peers[1], "r1:2");
        assert_eq!(formed.state_from, Some((0, 5)));
        // A worker claiming a ring newer than the gang's is refused, and so is one leaving an
        // old ring once the new one formed without it (it would overwrite a member's address).
        assert!(matches!(
            a.join(0, "x".into(), Some(6), 9, t0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            a.join(2, "x".into(), Some(6), 0, t0),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(formed.peers[2], "r2:2");
    }

    #[test]
    fn a_replacement_that_does_not_join_in_the_gang_timeout_is_named_and_its_silence_is_not() {
        let t0 = Instant::now();
        let t = Timeouts {
            gang: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
        };
        let mut a = running(t0);
        a.replace(1, t0).unwrap();
        for w in [0, 2] {
            a.join(w, format!("r{w}:2"), Some(3), 0, t0).unwrap();
        }
        // Survivors keep beating; the replacement (still loading) is not blamed for silence.
        let t30 = t0 + Duration::from_secs(30);
        a.seen(0, t30 - Duration::from_secs(1)).unwrap();
        a.seen(2, t30 - Duration::from_secs(1)).unwrap();
        assert_eq!(a.timed_out(Phase::Running, t30, t), None);
        let t61 = t0 + Duration::from_secs(61);
        a.seen(0, t61).unwrap();
        a.seen(2, t61).unwrap();
        assert_eq!(a.deadline(Phase::Running, t), Some(t0 + t.gang));
        assert_eq!(
            a.timed_out(Phase::Running, t61, t),
            Some(Input::ReplacementTimeout {
                attempt: 1,
                worker: 1,
                after: t.gang
            })
        );
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
        a.join(0, "a".into(), None, 0, t0).unwrap();
        a.join(1, "b".into(), None, 0, t0).unwrap();
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
        a.join(0, "a".into(), None, 0, t0).unwrap();
        a.join(1, "b".into(), None, 0, t0).unwrap();
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
