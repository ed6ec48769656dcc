//! The coordinator's jobs in memory: each job's record, its live attempt (the pure
//! [`Attempt`], its workers' handles, its Join barrier, command fan-out and commit
//! bookkeeping), and the channels that announce changes and feed its supervisor.
//!
//! Locks are `std::sync::Mutex`es held only for bookkeeping, never across an `.await` or a disk
//! write: persistence goes through the [`Persister`] task.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use lockstep_api::JobConfig;
use lockstep_api::proto;
use lockstep_storage::CheckpointStore;
use tokio::sync::{broadcast, mpsc, watch};

use crate::attempt::{Attempt, Timeouts};
use crate::commit::book::Commits;
use crate::error::{Error, Result};
use crate::launcher::{Placement, WorkerHandle};
use crate::persist::Persister;
use crate::record::{JobRecord, now_ms};
use crate::state::Input;

/// Locks `m`. A panic while holding a bookkeeping lock leaves plain data behind; keep serving.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every job, by id.
#[derive(Default)]
pub struct Registry {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
}

impl Registry {
    /// Adds `job`; never replaces one with the same id.
    pub fn insert(&self, job: Arc<Job>) -> Result<()> {
        let mut jobs = lock(&self.jobs);
        if jobs.contains_key(&job.id) {
            return Err(Error::JobExists(job.id.clone()));
        }
        jobs.insert(job.id.clone(), job);
        Ok(())
    }

    /// The job called `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Job>> {
        lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NoSuchJob(id.to_string()))
    }

    /// Every job's record, newest first.
    pub fn records(&self) -> Vec<JobRecord> {
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        let mut records: Vec<JobRecord> =
            jobs.iter().map(|j| lock(&j.state).record.clone()).collect();
        records.sort_by_key(newest_first);
        records
    }

    /// Up to `size` records after the cursor `after` (a previous page's last job), newest
    /// first, and the cursor of the next page (`None` on the last).
    pub fn page(&self, after: Option<&str>, size: usize) -> (Vec<JobRecord>, Option<String>) {
        let all = self.records();
        let start = after
            .and_then(|cursor| {
                let (ms, id) = cursor.split_once(':')?;
                let key = (std::cmp::Reverse(ms.parse::<i64>().ok()?), id.to_string());
                Some(all.partition_point(|r| newest_first(r) <= key))
            })
            .unwrap_or(0);
        let page: Vec<JobRecord> = all.iter().skip(start).take(size).cloned().collect();
        let more = start + page.len() < all.len();
        let next = page
            .last()
            .filter(|_| more)
            .map(|r| format!("{}:{}", r.created_ms, r.id));
        (page, next)
    }

    /// Whether `pred` holds for some job, asking every job (no early exit: how long it takes
    /// does not tell which job matched).
    pub fn any_job(&self, pred: impl Fn(&Job) -> bool) -> bool {
        let jobs = lock(&self.jobs);
        jobs.values().fold(false, |found, job| found | pred(job))
    }

    /// Forgets `id` (a finished job past its retention).
    pub fn remove(&self, id: &str) {
        lock(&self.jobs).remove(id);
    }
}

/// The sort key of the job list: newest first, then by id.
fn newest_first(r: &JobRecord) -> (std::cmp::Reverse<i64>, String) {
    (std::cmp::Reverse(r.created_ms), r.id.clone())
}

/// One job.
pub struct Job {
    /// Its id.
    pub id: String,
    /// The token its workers present.
    pub token: String,
    /// Its validated config.
    pub config: JobConfig,
    /// Where and how its workers run beyond the config (each launch takes the current one).
    pub placement: Mutex<Placement>,
    /// Its lease on its checkpoint URL while it lives ([`crate::lease`]).
    pub lease: tokio::sync::Mutex<Option<lockstep_storage::lease::Lease>>,
    /// Its checkpoint store, opened once (an S3 store keeps its connection pool).
    pub store: CheckpointStore,
    /// Serialises what changes which checkpoints exist: a commit (and its retention) and an
    /// attempt's choice of where to start. A commit re-checks under it that its attempt is
    /// still live, so a torn-down attempt's commit never lands beside the next attempt.
    pub store_lock: tokio::sync::Mutex<()>,
    /// Record and live attempt.
    pub state: Mutex<JobState>,
    /// Bumped on every change, for Watch.
    pub changed: watch::Sender<u64>,
    /// To its supervisor.
    pub inbox: mpsc::UnboundedSender<Input>,
}

impl Job {
    /// The gang and heartbeat timeouts of its attempts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            gang: self.config.job.gang_timeout,
            heartbeat: self.config.job.heartbeat_timeout,
        }
    }

    /// Tells the supervisor. A job whose supervisor has ended ignores it.
    pub fn send(&self, input: Input) {
        let _ = self.inbox.send(input);
    }

    /// The live attempt numbered `attempt`, or why a worker of it is refused.
    pub fn live<'a>(&self, st: &'a mut JobState, attempt: u32) -> Result<&'a mut Live> {
        let current = st.live.as_ref().map(|l| l.attempt.number);
        match st.live.as_mut() {
            Some(l) if l.attempt.number == attempt => Ok(l),
            _ => Err(Error::StaleAttempt {
                job: self.id.clone(),
                attempt,
                current,
            }),
        }
    }
}

/// What can change about a job.
pub struct JobState {
    /// As stored.
    pub record: JobRecord,
    /// The current attempt, from just before its workers are launched until it is torn down.
    pub live: Option<Live>,
}

impl JobState {
    /// Marks a change: announces it to watchers and, when `durable`, hands the record to the
    /// persistence task (no disk IO here).
    pub fn touch(&mut self, job: &Job, persister: &Persister, durable: bool) {
        self.record.updated_ms = now_ms();
        if durable {
            persister.put(self.record.clone());
        }
        job.changed.send_modify(|v| *v += 1);
    }
}

/// A live attempt: the pure attempt plus what talks to processes and waiting callers.
pub struct Live {
    /// Joins, heartbeats, exits, deadlines.
    pub attempt: Attempt,
    /// The launched workers, in worker order (filled while launching).
    pub workers: Vec<Box<dyn WorkerHandle>>,
    /// The Join barrier: set once every worker joined (`None` again if torn down).
    pub join_result: watch::Sender<Option<proto::JoinResponse>>,
    /// Commands to the workers' heartbeat streams.
    pub commands: broadcast::Sender<proto::Command>,
    /// Shards reported per step.
    pub commits: Commits,
}

impl Live {
    /// A live attempt around `attempt`, with no worker launched yet.
    pub fn new(attempt: Attempt) -> Live {
        Live {
            attempt,
            workers: Vec::new(),
            join_result: watch::channel(None).0,
            commands: broadcast::channel(16).0,
            commits: Commits::default(),
        }
    }

    /// The gang re-forms in place (a rank was lost): the old gang's barrier answer is void, and
    /// the checkpoint in flight will never have every shard, so its waiting ranks are told to
    /// regroup.
    pub fn reforming(&mut self) {
        self.join_result.send_replace(None);
        self.commits.regroup();
    }

    /// A member of the gang that just re-formed was lost before its first step (the gang is
    /// [`Attempt::unsettled`]): re-forms it again for its survivors only, and tells them to leave
    /// the ring they are forming with the lost member (else they wait on it until
    /// `job.collective_timeout`) and regroup.
    pub fn regroup_survivors(&mut self) {
        let left = self.attempt.generation();
        self.attempt.regroup_survivors();
        self.reforming();
        let _ = self.commands.send(proto::Command {
            command: Some(proto::command::Command::Regroup(proto::Regroup {
                left_generation: left,
            })),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survivors_of_an_unsettled_gang_are_told_to_leave_its_ring() {
        let mut live = Live::new(Attempt::new(1, 2, tokio::time::Instant::now(), None));
        let mut heard = live.commands.subscribe();
        live.regroup_survivors();
        let c = heard.try_recv().expect("a command to the workers");
        assert_eq!(
            c.command,
            Some(proto::command::Command::Regroup(proto::Regroup {
                left_generation: 0
            }))
        );
        assert!(
            live.attempt.forming(),
            "the gang re-forms for its survivors"
        );
        assert_eq!(live.attempt.generation(), 1);
    }
}
