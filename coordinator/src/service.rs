//! The coordinator: accepts jobs, answers their workers (the Join barrier, heartbeats, shard
//! commits) and runs one [supervisor](crate::supervisor) per job. The gRPC surface is
//! [`crate::rpc`]; this is the domain side it calls.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lockstep_api::JobConfig;
use lockstep_api::proto;
use lockstep_storage::CheckpointStore;
use tokio::sync::{broadcast, mpsc, watch};
// Tokio's clock, so tests can run the supervisor's timeouts in paused time.
use tokio::time::Instant;

use crate::attempt::Finished;
use crate::auth;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::launcher::{Launcher, Placement};
use crate::metrics::Metrics;
use crate::persist::Persister;
use crate::record::{JobRecord, JobStore, now_ms};
use crate::registry::{Job, JobState, Registry, lock};
use crate::state::Input;

pub use crate::record::resolve_url;

pub use crate::context::Settings;

/// The coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) inner: Arc<Context>,
}

/// A report from a worker's heartbeat stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Still here (and, before the first step, what it is doing).
    Alive {
        /// In words; empty once training runs.
        doing: String,
    },
    /// A step finished (rank 0's numbers are the job's).
    Step(proto::StepDone),
    /// Training ended.
    Finished(Finished),
    /// The held-out loss after a step (rank 0's is the job's).
    Evaluated(proto::Evaluated),
    /// A checkpoint failed (rank 0 reports what the gang agreed).
    CheckpointFailed(proto::CheckpointFailed),
}

impl Coordinator {
    /// A coordinator launching workers with `launcher`. With `settings.persist` the job store
    /// `DATA_DIR/jobs.redb` is opened (on the blocking pool); [`Coordinator::start`] resumes
    /// the jobs in it.
    pub async fn open(settings: Settings, launcher: Arc<dyn Launcher>) -> Result<Coordinator> {
        let store = if settings.persist {
            let dir = settings.data_dir.clone();
            Some(Arc::new(
                tokio::task::spawn_blocking(move || JobStore::open(&dir)).await??,
            ))
        } else {
            None
        };
        let persister = Persister::start(store.clone());
        Ok(Coordinator {
            inner: Arc::new(Context {
                settings,
                url: Mutex::new(String::new()),
                launcher,
                store,
                persister,
                registry: Registry::default(),
                metrics: Metrics::default(),
                clock: crate::stall::StallClock::start(),
            }),
        })
    }

    /// Sets the URL workers use to reach this coordinator and resumes stored jobs: live ones
    /// have whatever the previous coordinator left of their workers killed, then restart from
    /// their newest committed checkpoint. Call once the server listens.
    pub async fn start(&self, url: String) -> Result<()> {
        *lock(&self.inner.url) = url;
        let Some(store) = self.inner.store.clone() else {
            return Ok(());
        };
        let stored = tokio::task::spawn_blocking(move || store.all()).await??;
        for (id, why) in stored.bad {
            // Its workers may still run: kill them even though the job cannot be resumed.
            tracing::error!(job = %id, reason = %why,
                "a stored job record is unreadable; killing what is left of its workers and skipping it");
            self.inner
                .launcher
                .kill_leftovers(&id, &Placement::Here)
                .await;
        }
        for mut record in stored.jobs {
            // Tokens are not stored; this coordinator's workers get a new one.
            record.token = auth::new_token();
            let live = !record.phase().is_final();
            // A job that ended recently may have been mid-teardown when the last coordinator
            // died: its workers may still be there too.
            let recent = crate::record::now_ms().saturating_sub(record.updated_ms) < 600_000;
            if live || recent {
                let here = Placement::Here;
                self.inner.launcher.kill_leftovers(&record.id, &here).await;
            }
            let config = match JobConfig::parse(&record.config_text, &record.overrides) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(job = %record.id, error = %e, "stored job has a bad config");
                    continue;
                }
            };
            let id = record.id.clone();
            let job = match self
                .add(record.clone(), config.clone(), Placement::Here)
                .await
            {
                Ok(j) => j,
                // Its checkpoint URL is another live job's now: it cannot go on, and says so
                // (kept as failed, so that `status` shows why instead of losing it).
                Err(Error::Refused(why)) if live => {
                    tracing::error!(job = %id, reason = %why, "cannot resume a stored job");
                    let mut failed = record;
                    failed.lifecycle.phase = crate::state::Phase::Failed;
                    failed.lifecycle.message =
                        format!("not resumed after a coordinator restart: {why}");
                    if let Ok(job) = self.add(failed, config, Placement::Here).await {
                        let st = lock(&job.state);
                        self.inner.persister.put(st.record.clone());
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "cannot resume a stored job");
                    continue;
                }
            };
            if live {
                tracing::info!(job = %job.id, "resuming a job found in the store");
                job.send(Input::CoordinatorRestarted);
            }
        }
        // Finished jobs are kept a week (at most a thousand): the store and `List` stay bounded.
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                c.forget_expired();
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
            }
        });
        Ok(())
    }

    /// Registers a job and starts its supervisor. Opening its checkpoint store (which may
    /// create a directory) runs on the blocking pool. A live job takes its checkpoint URL's
    /// lease first: a URL another live job writes to is refused, naming that job.
    async fn add(
        &self,
        mut record: JobRecord,
        config: JobConfig,
        placement: Placement,
    ) -> Result<Arc<Job>> {
        record.logs = self.inner.launcher.logs(
            &record.id,
            &placement,
            &self.inner.settings.data_dir.join("jobs").join(&record.id),
        );
        let url = record.checkpoint_url.clone();
        let store = tokio::task::spawn_blocking(move || CheckpointStore::open(&url))
            .await?
            .map_err(|e| Error::InvalidArgument(format!("checkpoint.url: {e}")))?;
        // (Before the lease: taking it for a job id that exists would take the live job's.)
        if self.inner.registry.get(&record.id).is_ok() {
            return Err(Error::JobExists(record.id.clone()));
        }
        let lease = if record.phase().is_final() {
            None
        } else {
            crate::lease::take(&record.checkpoint_url, &record.id).await?
        };
        let (inbox, rx) = mpsc::unbounded_channel();
        let job = Arc::new(Job {
            id: record.id.clone(),
            token: record.token.clone(),
            store,
            store_lock: tokio::sync::Mutex::new(()),
            config,
            placement: Mutex::new(placement),
            lease: tokio::sync::Mutex::new(lease),
            state: Mutex::new(JobState { record, live: None }),
            changed: watch::channel(0).0,
            inbox,
        });
        // (A lease taken for a job that then cannot be added expires by itself.)
        self.inner.registry.insert(job.clone())?;
        crate::lease::hold(job.clone());
        let supervisor = tokio::spawn(crate::supervisor::supervise(
            self.inner.clone(),
            job.clone(),
            rx,
        ));
        // A supervisor that panics must not leave its job looking alive with workers running.
        let (inner, watched) = (self.inner.clone(), job.clone());
        tokio::spawn(async move {
            if let Err(e) = supervisor.await
                && e.is_panic()
            {
                crate::supervisor::crashed(&inner, &watched, e.into_panic());
            }
        });
        Ok(job)
    }

    /// Accepts a job: parses and validates the config, opens its checkpoint store, stores the
    /// job durably, queues it. Refused where the launcher takes no direct submits (Kubernetes:
    /// the jobs are LockstepJobs).
    pub async fn submit(
        &self,
        config_text: String,
        overrides: Vec<String>,
        workdir: PathBuf,
    ) -> Result<JobRecord> {
        self.inner.launcher.accepts_submits()?;
        self.submit_as(None, config_text, overrides, workdir, Placement::Here)
            .await
    }

    /// [`Coordinator::submit`] under a given job id (Kubernetes: derived from the
    /// LockstepJob, so a restarted coordinator finds the same job) and placement (Kubernetes:
    /// the LockstepJob its pods are made from). A job with that id must not exist.
    pub async fn submit_as(
        &self,
        id: Option<String>,
        config_text: String,
        overrides: Vec<String>,
        workdir: PathBuf,
        placement: Placement,
    ) -> Result<JobRecord> {
        // `{date}` left in what was sent (the command line fills it from --date) is today's:
        // the job's config is fixed when it is accepted, for every attempt and worker.
        let today = lockstep_api::date::today();
        let config_text = lockstep_api::date::apply(&config_text, &today);
        let overrides: Vec<String> = overrides
            .iter()
            .map(|o| lockstep_api::date::apply(o, &today))
            .collect();
        let config = JobConfig::parse(&config_text, &overrides)?;
        self.inner.launcher.admit(&config)?;
        if !workdir.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "workdir `{}` must be absolute",
                workdir.display()
            )));
        }
        self.inner.launcher.preflight(&config, &workdir).await?;
        // 64 random bits: ids do not collide in practice, and a collision is refused.
        let id = id.unwrap_or_else(|| format!("{}-{}", config.job.name, &auth::new_token()[..16]));
        let mut record = JobRecord::new(id, &config, config_text, overrides, workdir);
        record.token = auth::new_token();
        let job = self.add(record, config, placement).await?;
        // The job's current record (its supervisor may already have changed it).
        self.inner.persister.put(lock(&job.state).record.clone());
        if let Err(e) = self.inner.persister.flush().await {
            // Not durable, so not accepted: it must not run (nor linger as queued).
            {
                let mut st = lock(&job.state);
                st.record.lifecycle.phase = crate::state::Phase::Failed;
                st.record.lifecycle.message = format!("cannot store the job: {e}");
                // Replaces the queued record still waiting to be written.
                st.touch(&job, &self.inner.persister, true);
            }
            crate::lease::release(&job).await;
            return Err(e.into());
        }
        job.send(Input::Start);
        let record = lock(&job.state).record.clone();
        Ok(record)
    }

    /// Takes over a job whose record was kept elsewhere (Kubernetes: a LockstepJob's status,
    /// after this coordinator restarted), placed by `placement`: whatever is left of its
    /// workers is killed, and a live job restarts from its newest committed checkpoint as the
    /// next attempt.
    pub async fn adopt(&self, mut record: JobRecord, placement: Placement) -> Result<JobRecord> {
        let config = JobConfig::parse(&record.config_text, &record.overrides)?;
        record.token = auth::new_token();
        let live = !record.phase().is_final();
        if live {
            self.inner
                .launcher
                .kill_leftovers(&record.id, &placement)
                .await;
        }
        let job = self.add(record, config, placement).await?;
        if live {
            tracing::info!(job = %job.id, "adopting a job kept outside this coordinator");
            job.send(Input::CoordinatorRestarted);
        }
        let record = lock(&job.state).record.clone();
        Ok(record)
    }

    /// Forgets a job (it must have reached a final state; Kubernetes: its LockstepJob was
    /// deleted or is resumed after a suspend).
    pub fn forget(&self, id: &str) {
        self.inner.registry.remove(id);
        self.inner.persister.delete(id);
    }

    /// Replaces job `id`'s placement: its next attempt (and export) uses `placement`.
    pub fn set_placement(&self, id: &str, placement: Placement) -> Result<()> {
        let job = self.inner.registry.get(id)?;
        *lock(&job.placement) = placement;
        Ok(())
    }

    /// A job's record.
    pub fn get(&self, id: &str) -> Result<JobRecord> {
        let job = self.inner.registry.get(id)?;
        let st = lock(&job.state);
        Ok(st.record.clone())
    }

    /// Every job's record, newest first.
    pub fn list(&self) -> Vec<JobRecord> {
        self.inner.registry.records()
    }

    /// One page of [`Coordinator::list`]: up to `size` records after the cursor `after`, and
    /// the next page's cursor.
    pub fn page(&self, after: Option<&str>, size: usize) -> (Vec<JobRecord>, Option<String>) {
        self.inner.registry.page(after, size)
    }

    /// Asks a job to stop; its supervisor tears the gang down.
    pub fn cancel(&self, id: &str) -> Result<JobRecord> {
        self.inner.registry.get(id)?.send(Input::Cancel);
        self.get(id)
    }

    /// Forgets finished jobs past their retention ([`crate::record::expired`]).
    fn forget_expired(&self) {
        let finished: Vec<(String, i64)> = self
            .inner
            .registry
            .records()
            .into_iter()
            .filter(|r| r.phase().is_final())
            .map(|r| (r.id, r.updated_ms))
            .collect();
        let gone = crate::record::expired(
            &finished,
            now_ms(),
            crate::record::FINISHED_KEPT_MS,
            crate::record::MAX_FINISHED,
        );
        for id in gone {
            tracing::info!(job = %id, "forgetting a finished job past its retention");
            self.inner.registry.remove(&id);
            self.inner.persister.delete(&id);
        }
    }

    /// Kills the job's live workers now, without the grace a cancel gives them (a second
    /// Ctrl-C). Their exits reach the supervisor as usual.
    pub fn kill_workers(&self, id: &str) -> Result<()> {
        let job = self.inner.registry.get(id)?;
        let st = lock(&job.state);
        if let Some(live) = &st.live {
            for w in &live.workers {
                w.kill();
            }
        }
        Ok(())
    }

    /// A receiver that changes with the job.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<u64>> {
        Ok(self.inner.registry.get(id)?.changed.subscribe())
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render(&self.list())
    }

    /// Returns once every job record handed to the job store is durable (before a clean
    /// shutdown).
    pub async fn flush(&self) -> Result<()> {
        Ok(self.inner.persister.flush().await?)
    }

    /// The gang barrier: records `worker`'s ring address and returns once the whole gang of
    /// `attempt` has joined (or fails when the attempt is torn down or the gang timeout ends).
    pub(crate) async fn join(
        &self,
        job: &Job,
        attempt: u32,
        worker: u32,
        data_addr: String,
        holds_step: Option<u64>,
        left_generation: u32,
    ) -> Result<proto::JoinResponse> {
        let (mut rx, generation) = {
            let mut st = lock(&job.state);
            let live = job.live(&mut st, attempt)?;
            let joined = live.attempt.join(
                worker,
                data_addr,
                holds_step,
                left_generation,
                Instant::now(),
            )?;
            if joined.began_reforming {
                tracing::info!(job = %job.id, attempt, worker, generation = joined.generation,
                    "a rank regroups: the gang re-forms in place");
                live.reforming();
            }
            let rx = live.join_result.subscribe();
            if let Some(formed) = joined.formed {
                if formed.generation > 0 {
                    tracing::info!(job = %job.id, attempt, generation = formed.generation,
                        state_from = ?formed.state_from, "the gang re-formed in place");
                }
                live.join_result.send_replace(Some(proto::JoinResponse {
                    rank: 0,
                    world_size: live.attempt.world,
                    peers: formed.peers,
                    collective: "ring".into(),
                    resume_step: live.attempt.resume_step,
                    config_hash: job.config.results_hash(),
                    generation: formed.generation,
                    state_from: formed.state_from.map(|s| s.0),
                    state_step: formed.state_from.map(|s| s.1),
                    emergency_step: None,
                    emergency_writers: vec![],
                }));
                job.send(Input::AllJoined { attempt });
            }
            (rx, joined.generation)
        };
        // The answer of the gang this worker joined (not of the one before it). A survivor
        // may regroup before the coordinator learns of the loss (within the heartbeat timeout)
        // and waits out its replacement's gang timeout and the emergency checkpoint after it.
        let wait = rx.wait_for(|r| r.as_ref().is_some_and(|r| r.generation == generation));
        let t = &job.config.job;
        let patience = match holds_step {
            Some(_) => t
                .heartbeat_timeout
                .saturating_add(t.gang_timeout.saturating_mul(2))
                .saturating_add(t.collective_timeout),
            None => t.gang_timeout,
        };
        let resp = match tokio::time::timeout(patience, wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        let mut resp = resp.ok_or(Error::GangNotFormed)?;
        resp.rank = worker;
        Ok(resp)
    }

    /// The command stream of `rank` of `attempt` (stop, acks).
    pub(crate) fn commands(
        &self,
        job: &Job,
        attempt: u32,
        rank: u32,
    ) -> Result<broadcast::Receiver<proto::Command>> {
        let mut st = lock(&job.state);
        let live = job.live(&mut st, attempt)?;
        live.attempt.seen(rank, Instant::now())?;
        Ok(live.commands.subscribe())
    }

    /// Applies one heartbeat report of `rank`; false once the attempt is over.
    pub(crate) fn report(&self, job: &Job, attempt: u32, rank: u32, report: Report) -> bool {
        let mut st = lock(&job.state);
        let Some(live) = st.live.as_mut().filter(|l| l.attempt.number == attempt) else {
            return false;
        };
        if live.attempt.seen(rank, Instant::now()).is_err() {
            return false;
        }
        match report {
            Report::Finished(f) => {
                let _ = live.attempt.finish(rank, f);
            }
            Report::Alive { doing } => {
                // A rank's words, bounded and printable: they are shown to users.
                let doing: String = doing
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(300)
                    .collect();
                let mine = format!("rank {rank}: ");
                let now = match &st.record.doing {
                    _ if !doing.is_empty() => Some((attempt, format!("{mine}{doing}"))),
                    Some((a, w)) if *a == attempt && w.starts_with(&mine) => None,
                    other => other.clone(),
                };
                if now != st.record.doing {
                    st.record.doing = now;
                    st.touch(job, &self.inner.persister, false);
                }
            }
            Report::Step(_) if rank != 0 => live.attempt.stepped(),
            Report::Step(s) => {
                live.attempt.stepped();
                // A step reported while the gang re-forms finished before the loss: not the
                // first after the recovery.
                let settled = !live.attempt.forming() && live.attempt.replacing().is_none();
                if settled {
                    st.record.stepped(s.step);
                }
                st.record.doing = None;
                st.record.step = s.step;
                st.record.loss = Some(s.loss);
                st.record.first_loss.get_or_insert(s.loss);
                st.record.tokens_per_sec = s.tokens_per_sec;
                self.inner.metrics.step(s.step_seconds, s.stall_seconds);
                st.touch(job, &self.inner.persister, false);
            }
            Report::Evaluated(e) if rank == 0 => {
                st.record.eval_loss = Some(e.loss);
                st.record.eval_step = Some(e.step);
                st.touch(job, &self.inner.persister, false);
            }
            Report::CheckpointFailed(c) if rank == 0 => {
                let reason: String = c.reason.chars().take(2000).collect();
                tracing::warn!(job = %st.record.id, step = c.step, in_a_row = c.in_a_row, "checkpoint failed: {reason}");
                st.record.checkpoint_failures = st.record.checkpoint_failures.saturating_add(1);
                st.record.checkpoint_error = format!("step {}: {reason}", c.step);
                self.inner.metrics.checkpoint_failed();
                st.touch(job, &self.inner.persister, false);
            }
            _ => {}
        }
        true
    }
}
