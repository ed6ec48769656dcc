//! The coordinator: accepts jobs, answers their workers (the Join barrier, heartbeats, shard
//! commits) and runs one [supervisor](crate::supervisor) per job. The gRPC surface is
//! [`crate::rpc`]; this is the domain side it calls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lockstep_api::JobConfig;
use lockstep_api::proto;
use lockstep_storage::{CheckpointStore, ShardMeta, StepCommit};
use tokio::sync::{broadcast, mpsc, watch};
// Tokio's clock, so tests can run the supervisor's timeouts in paused time.
use tokio::time::Instant;

use crate::attempt::Finished;
use crate::auth;
use crate::commit::{CommitFailed, Outcome};
use crate::error::{Error, Result};
use crate::launcher::Launcher;
use crate::metrics::Metrics;
use crate::persist::Persister;
use crate::record::{JobRecord, JobStore, now_ms};
use crate::registry::{Job, JobState, Registry, lock};
use crate::state::{Input, Lifecycle};

/// Resolves a relative `file://` URL against `workdir`.
pub fn resolve_url(url: &str, workdir: &Path) -> String {
    match url.strip_prefix("file://") {
        Some(p) if !p.starts_with('/') => format!("file://{}", workdir.join(p).display()),
        _ => url.to_string(),
    }
}

/// Settings of a coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Job logs and configs go under `DATA_DIR/jobs/ID/`; the job store lives here.
    pub data_dir: PathBuf,
    /// Token of the user calls.
    pub admin_token: String,
    /// Keep jobs in `DATA_DIR/jobs.redb` (serve) or only in memory (run).
    pub persist: bool,
}

/// The coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) settings: Settings,
    /// gRPC URL workers call; set once the server is bound.
    pub(crate) url: Mutex<String>,
    pub(crate) launcher: Arc<dyn Launcher>,
    pub(crate) store: Option<Arc<JobStore>>,
    pub(crate) persister: Persister,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    pub(crate) clock: crate::stall::StallClock,
}

/// A report from a worker's heartbeat stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Still here.
    Alive,
    /// A step finished (rank 0's numbers are the job's).
    Step(proto::StepDone),
    /// Training ended.
    Finished(Finished),
    /// The held-out loss after a step (rank 0's is the job's).
    Evaluated(proto::Evaluated),
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
            inner: Arc::new(Inner {
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
            self.inner.launcher.kill_leftovers(&id).await;
        }
        for mut record in stored.jobs {
            // Tokens are not stored; this coordinator's workers get a new one.
            record.token = auth::new_token();
            let live = !record.phase().is_final();
            // A job that ended recently may have been mid-teardown when the last coordinator
            // died: its workers may still be there too.
            let recent = crate::record::now_ms().saturating_sub(record.updated_ms) < 600_000;
            if live || recent {
                self.inner.launcher.kill_leftovers(&record.id).await;
            }
            let config = match JobConfig::parse(&record.config_text, &record.overrides) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(job = %record.id, error = %e, "stored job has a bad config");
                    continue;
                }
            };
            let job = match self.add(record, config).await {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "cannot resume a stored job");
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
    /// create a directory) runs on the blocking pool.
    async fn add(&self, record: JobRecord, config: JobConfig) -> Result<Arc<Job>> {
        let url = record.checkpoint_url.clone();
        let store = tokio::task::spawn_blocking(move || CheckpointStore::open(&url))
            .await?
            .map_err(|e| Error::InvalidArgument(format!("checkpoint.url: {e}")))?;
        let (inbox, rx) = mpsc::unbounded_channel();
        let job = Arc::new(Job {
            id: record.id.clone(),
            token: record.token.clone(),
            store,
            store_lock: tokio::sync::Mutex::new(()),
            config,
            state: Mutex::new(JobState { record, live: None }),
            changed: watch::channel(0).0,
            inbox,
        });
        self.inner.registry.insert(job.clone())?;
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
    /// job durably, queues it.
    pub async fn submit(
        &self,
        config_text: String,
        overrides: Vec<String>,
        workdir: PathBuf,
    ) -> Result<JobRecord> {
        self.submit_as(None, config_text, overrides, workdir).await
    }

    /// [`Coordinator::submit`] under a given job id (Kubernetes: derived from the
    /// LockstepJob, so a restarted coordinator finds the same job). A job with that id must
    /// not exist.
    pub async fn submit_as(
        &self,
        id: Option<String>,
        config_text: String,
        overrides: Vec<String>,
        workdir: PathBuf,
    ) -> Result<JobRecord> {
        let config = JobConfig::parse(&config_text, &overrides)?;
        self.inner
            .launcher
            .admit(&config)
            .map_err(Error::InvalidArgument)?;
        if !workdir.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "workdir `{}` must be absolute",
                workdir.display()
            )));
        }
        self.inner
            .launcher
            .preflight(&config, &workdir)
            .await
            .map_err(Error::InvalidArgument)?;
        // 64 random bits: ids do not collide in practice, and a collision is refused.
        let id = id.unwrap_or_else(|| format!("{}-{}", config.job.name, &auth::new_token()[..16]));
        let now = now_ms();
        let record = JobRecord {
            id,
            name: config.job.name.clone(),
            token: auth::new_token(),
            config_text,
            overrides,
            lifecycle: Lifecycle::new(config.job.max_restarts),
            world_size: config.job.world_size,
            total_steps: config.train.steps,
            step: 0,
            loss: None,
            first_loss: None,
            eval_loss: None,
            eval_step: None,
            tokens_per_sec: 0.0,
            last_checkpoint: None,
            params_hash: String::new(),
            checkpoint_url: resolve_url(&config.checkpoint.url, &workdir),
            workdir,
            created_ms: now,
            updated_ms: now,
            gang_wait_seconds: 0.0,
        };
        let job = self.add(record, config).await?;
        // The job's current record (its supervisor may already have changed it).
        self.inner.persister.put(lock(&job.state).record.clone());
        if let Err(e) = self.inner.persister.flush().await {
            // Not durable, so not accepted: it must not run (nor linger as queued).
            let mut st = lock(&job.state);
            st.record.lifecycle.phase = crate::state::Phase::Failed;
            st.record.lifecycle.message = format!("cannot store the job: {e}");
            // Replaces the queued record still waiting to be written.
            st.touch(&job, &self.inner.persister, true);
            return Err(e.into());
        }
        job.send(Input::Start);
        let record = lock(&job.state).record.clone();
        Ok(record)
    }

    /// Takes over a job whose record was kept elsewhere (Kubernetes: a LockstepJob's status,
    /// after this coordinator restarted): whatever is left of its workers is killed, and a live
    /// job restarts from its newest committed checkpoint as the next attempt.
    pub async fn adopt(&self, mut record: JobRecord) -> Result<JobRecord> {
        let config = JobConfig::parse(&record.config_text, &record.overrides)?;
        record.token = auth::new_token();
        let live = !record.phase().is_final();
        if live {
            self.inner.launcher.kill_leftovers(&record.id).await;
        }
        let job = self.add(record, config).await?;
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

    /// Checks a user call's admin token.
    /// The gate in front of every call, before its body is decoded: the call must carry the
    /// admin token or a job's token. One answer for every wrong token, so nobody learns which
    /// jobs exist. The handlers then check the token against what the call is about.
    pub fn gate(
        &self,
        md: &tonic::metadata::MetadataMap,
    ) -> std::result::Result<(), tonic::Status> {
        let Some(token) = auth::bearer(md) else {
            return Err(tonic::Status::unauthenticated(
                "this call needs a token (`authorization: Bearer TOKEN`)",
            ));
        };
        let admin = &self.inner.settings.admin_token;
        let is_admin = admin.len() >= auth::MIN_TOKEN_LEN
            && auth::constant_eq(admin.as_bytes(), token.as_bytes());
        if token.len() >= auth::MIN_TOKEN_LEN
            && (is_admin || self.inner.registry.knows_token(token))
        {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(
                "the token is not valid here",
            ))
        }
    }

    /// [`Coordinator::gate`] as a tonic interceptor.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status>
    + Clone
    + use<> {
        let c = self.clone();
        move |req: tonic::Request<()>| {
            c.gate(req.metadata())?;
            Ok(req)
        }
    }

    pub(crate) fn authorize_admin(&self, md: &tonic::metadata::MetadataMap) -> Result<()> {
        auth::check(
            md,
            &self.inner.settings.admin_token,
            "the coordinator's admin",
        )
    }

    /// Checks a worker call's token and attempt; returns the job.
    pub(crate) fn authorize_worker(
        &self,
        md: &tonic::metadata::MetadataMap,
        id: &str,
        attempt: u32,
    ) -> Result<Arc<Job>> {
        // An unknown job answers like a wrong token: callers cannot probe for job ids.
        let job = self
            .inner
            .registry
            .get(id)
            .map_err(|_| Error::PermissionDenied {
                whose: format!("job `{id}`'s"),
            })?;
        auth::check(md, &job.token, &format!("job `{id}`'s"))?;
        job.live(&mut lock(&job.state), attempt)?;
        Ok(job)
    }

    /// The gang barrier: records `worker`'s ring address and returns once the whole gang of
    /// `attempt` has joined (or fails when the attempt is torn down or the gang timeout ends).
    pub(crate) async fn join(
        &self,
        job: &Job,
        attempt: u32,
        worker: u32,
        data_addr: String,
    ) -> Result<proto::JoinResponse> {
        let mut rx = {
            let mut st = lock(&job.state);
            let live = job.live(&mut st, attempt)?;
            let rx = live.join_result.subscribe();
            if let Some(peers) = live.attempt.join(worker, data_addr, Instant::now())? {
                live.join_result.send_replace(Some(proto::JoinResponse {
                    rank: 0,
                    world_size: live.attempt.world,
                    peers,
                    collective: "ring".into(),
                    resume_step: live.attempt.resume_step,
                }));
                job.send(Input::AllJoined { attempt });
            }
            rx
        };
        let wait = rx.wait_for(Option::is_some);
        let resp = match tokio::time::timeout(job.config.job.gang_timeout, wait).await {
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
            Report::Step(s) if rank == 0 => {
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
            _ => {}
        }
        true
    }

    /// `rank`'s shard of a checkpoint is durable. Once every rank's is, the caller that
    /// completed the step commits it; every caller returns the outcome (stored and raw bytes).
    pub(crate) async fn commit_shard(
        &self,
        job: &Arc<Job>,
        attempt: u32,
        shard: ShardMeta,
        state: Option<(serde_json::Value, String)>,
        write_seconds: f64,
    ) -> Result<(u64, u64)> {
        let step = shard.step;
        let (mut rx, ready, resume_step) = {
            let mut st = lock(&job.state);
            let live = job.live(&mut st, attempt)?;
            if shard.rank >= live.attempt.world {
                return Err(Error::InvalidArgument(format!(
                    "rank {} is outside a gang of {}",
                    shard.rank, live.attempt.world
                )));
            }
            let world = live.attempt.world;
            let (rx, ready) = live.commits.report(world, shard.rank, shard, state);
            (rx, ready, live.attempt.resume_step)
        };
        self.inner.metrics.checkpoint_write(write_seconds);
        if let Some(ready) = ready {
            let commit = StepCommit {
                job: job.config.job.name.clone(),
                step,
                config_hash: ready.config_hash,
                trainer_state: ready.trainer_state,
                shards: ready.shards,
                retention: lockstep_storage::RetentionPolicy {
                    keep_last: job.config.checkpoint.keep_last,
                    keep_every: job.config.checkpoint.keep_every,
                },
                protected: resume_step.into_iter().collect(),
            };
            // Its own task: a caller that goes away (a worker killed mid-call) must not cancel
            // a commit halfway.
            let (inner, job2) = (self.inner.clone(), job.clone());
            tokio::spawn(async move {
                let job = job2;
                let _store = job.store_lock.lock().await;
                let live = {
                    let mut st = lock(&job.state);
                    job.live(&mut st, attempt).is_ok()
                };
                let outcome: Outcome = if !live {
                    Err(CommitFailed::TornDown)
                } else {
                    match job.store.commit_step(commit).await {
                        Ok(c) => {
                            inner.metrics.checkpoint_committed(c.bytes);
                            let mut st = lock(&job.state);
                            st.record.last_checkpoint = Some(step);
                            tracing::info!(job = %job.id, step, bytes = c.bytes, "committed checkpoint");
                            st.touch(&job, &inner.persister, true);
                            Ok((c.bytes, c.raw_bytes))
                        }
                        Err(e) => {
                            tracing::error!(job = %job.id, step, error = %e, "cannot commit a checkpoint");
                            Err(CommitFailed::Store(e.to_string()))
                        }
                    }
                };
                ready.done.send_replace(Some(outcome));
            });
        }
        let wait = rx.wait_for(Option::is_some);
        let outcome = match tokio::time::timeout(job.config.job.collective_timeout, wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        match outcome {
            Some(Ok(sizes)) => Ok(sizes),
            // The attempt is over: the worker should exit, not report a failure.
            Some(Err(CommitFailed::TornDown)) => Err(Error::StaleAttempt {
                job: job.id.clone(),
                attempt,
                current: lock(&job.state).live.as_ref().map(|l| l.attempt.number),
            }),
            Some(Err(e)) => Err(Error::Commit {
                step,
                reason: e.to_string(),
            }),
            None => Err(Error::CommitTimeout { step }),
        }
    }
}
