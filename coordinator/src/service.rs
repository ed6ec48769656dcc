//! The coordinator: the gRPC service (users and workers), one supervisor task per job that
//! drives the [`state`](crate::state) machine, and the checkpoint commit authority.
//!
//! Locks are `std::sync::Mutex`es held only for bookkeeping, never across an `.await`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// Tokio's clock, so tests can run the supervisor's timeouts in paused time.
use tokio::time::Instant;

use futures::Stream;
use lockstep_api::JobConfig;
use lockstep_api::proto::{self, coordinator_server::Coordinator as Rpc};
use lockstep_storage::{CheckpointStore, RetentionPolicy, ShardMeta};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status};

use crate::launcher::{Exit, Launcher, WorkerHandle, WorkerSpec, kill_group};
use crate::metrics::Metrics;
use crate::record::{JobRecord, JobStore};
use crate::state::{Action, Input, Lifecycle, Phase};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// 128 random bits, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    // getrandom fails only without an OS entropy source; fall back to time and pid mixing.
    if getrandom::fill(&mut b).is_err() {
        let seed = xxhash_rust::xxh3::xxh3_128(
            format!("{}-{}-{:?}", now_ms(), std::process::id(), Instant::now()).as_bytes(),
        );
        b = seed.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

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
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    /// gRPC URL workers call; set once the server is bound.
    url: Mutex<String>,
    launcher: Arc<dyn Launcher>,
    store: Option<JobStore>,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    metrics: Metrics,
}

/// A job and its live attempt.
struct Job {
    id: String,
    token: String,
    config: JobConfig,
    /// The job's checkpoint store, opened once (an S3 store keeps its connection pool), or
    /// why `checkpoint.url` cannot be opened.
    store: Result<CheckpointStore, String>,
    state: Mutex<JobState>,
    /// Bumped on every change, for Watch.
    changed: watch::Sender<u64>,
    /// To the supervisor.
    inbox: mpsc::UnboundedSender<Msg>,
}

struct JobState {
    record: JobRecord,
    attempt: Option<Attempt>,
}

struct Attempt {
    number: u32,
    started: Instant,
    workers: Vec<Box<dyn WorkerHandle>>,
    exited: Vec<Option<Exit>>,
    joined: BTreeMap<u32, String>,
    join_result: watch::Sender<Option<proto::JoinResponse>>,
    resume_step: Option<u64>,
    last_seen: Vec<Option<Instant>>,
    finished: Vec<Option<proto::Finished>>,
    shards: BTreeMap<u64, Pending>,
    commands: broadcast::Sender<proto::Command>,
}

#[derive(Default)]
struct Pending {
    metas: BTreeMap<u32, ShardMeta>,
    trainer_state: Option<serde_json::Value>,
    config_hash: String,
    done: Option<watch::Sender<Option<CommitOutcome>>>,
}

/// A checkpoint's stored and raw bytes, or why it could not be committed.
type CommitOutcome = Result<(u64, u64), String>;

enum Msg {
    Input(Input),
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Coordinator {
    /// A coordinator launching workers with `launcher`. With `settings.persist`, jobs found in
    /// the store are resumed: live ones are restarted from their newest committed checkpoint
    /// (their old workers, if any survived, are killed first).
    pub fn new(
        settings: Settings,
        launcher: Arc<dyn Launcher>,
    ) -> Result<Coordinator, crate::record::StoreError> {
        let store = if settings.persist {
            Some(JobStore::open(&settings.data_dir)?)
        } else {
            None
        };
        let c = Coordinator {
            inner: Arc::new(Inner {
                settings,
                url: Mutex::new(String::new()),
                launcher,
                store,
                jobs: Mutex::new(BTreeMap::new()),
                metrics: Metrics::default(),
            }),
        };
        Ok(c)
    }

    /// Sets the URL workers use to reach this coordinator and resumes stored jobs. Call once
    /// the server listens.
    pub fn start(&self, url: String) {
        *lock(&self.inner.url) = url;
        let Some(store) = &self.inner.store else {
            return;
        };
        let records = match store.all() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored jobs");
                return;
            }
        };
        for mut record in records {
            let config = match JobConfig::parse(&record.config_text, &record.overrides) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(job = %record.id, error = %e, "stored job has a bad config");
                    continue;
                }
            };
            let live = !record.phase().is_final();
            if live {
                for pid in record.worker_pids.drain(..) {
                    kill_orphan(pid, &record.id);
                }
            }
            let job = self.add(record, config);
            if live {
                tracing::info!(job = %job.id, "resuming a job found in the store");
                let _ = job.inbox.send(Msg::Input(Input::CoordinatorRestarted));
            }
        }
    }

    /// Registers a job and starts its supervisor.
    fn add(&self, record: JobRecord, config: JobConfig) -> Arc<Job> {
        let (inbox, rx) = mpsc::unbounded_channel();
        let job = Arc::new(Job {
            id: record.id.clone(),
            token: record.token.clone(),
            store: CheckpointStore::open(&record.checkpoint_url).map_err(|e| e.to_string()),
            config,
            state: Mutex::new(JobState {
                record,
                attempt: None,
            }),
            changed: watch::channel(0).0,
            inbox,
        });
        lock(&self.inner.jobs).insert(job.id.clone(), job.clone());
        tokio::spawn(supervise(self.inner.clone(), job.clone(), rx));
        job
    }

    /// Accepts a job: parses and validates the config, stores the job, queues it.
    pub fn submit(
        &self,
        config_text: String,
        overrides: Vec<String>,
        workdir: PathBuf,
    ) -> Result<proto::JobStatus, Status> {
        let config = JobConfig::parse(&config_text, &overrides)
            .map_err(|e| Status::invalid_argument(format!("config: {e}")))?;
        if !workdir.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "workdir `{}` must be absolute",
                workdir.display()
            )));
        }
        let id = format!("{}-{}", config.job.name, &new_token()[..6]);
        let now = now_ms();
        let record = JobRecord {
            id,
            name: config.job.name.clone(),
            token: new_token(),
            config_text,
            overrides,
            lifecycle: Lifecycle::new(config.job.max_restarts),
            world_size: config.job.world_size,
            total_steps: config.train.steps,
            step: 0,
            loss: None,
            first_loss: None,
            tokens_per_sec: 0.0,
            last_checkpoint: None,
            params_hash: String::new(),
            checkpoint_url: resolve_url(&config.checkpoint.url, &workdir),
            workdir,
            created_ms: now,
            updated_ms: now,
            gang_wait_seconds: 0.0,
            worker_pids: vec![],
        };
        persist(&self.inner, &record).map_err(|e| Status::internal(e.to_string()))?;
        let status = record.status();
        let job = self.add(record, config);
        let _ = job.inbox.send(Msg::Input(Input::Start));
        Ok(status)
    }

    /// A job's status.
    pub fn get(&self, id: &str) -> Result<proto::JobStatus, Status> {
        let job = self.job(id)?;
        let st = lock(&job.state);
        Ok(st.record.status())
    }

    /// Asks a job to stop; its supervisor tears the gang down.
    pub fn cancel(&self, id: &str) -> Result<proto::JobStatus, Status> {
        let job = self.job(id)?;
        let _ = job.inbox.send(Msg::Input(Input::Cancel));
        self.get(id)
    }

    /// A receiver that changes with the job.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<u64>, Status> {
        Ok(self.job(id)?.changed.subscribe())
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        let jobs: Vec<JobRecord> = lock(&self.inner.jobs)
            .values()
            .map(|j| lock(&j.state).record.clone())
            .collect();
        self.inner.metrics.render(&jobs)
    }

    fn job(&self, id: &str) -> Result<Arc<Job>, Status> {
        lock(&self.inner.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no job `{id}`")))
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        check_token(
            req,
            &self.inner.settings.admin_token,
            "the coordinator's admin",
        )
    }

    /// Checks a worker call's token and attempt; returns the job.
    fn worker<T>(&self, req: &Request<T>, id: &str, attempt: u32) -> Result<Arc<Job>, Status> {
        let job = self.job(id)?;
        check_token(req, &job.token, &format!("job `{id}`'s"))?;
        let st = lock(&job.state);
        let current = st.attempt.as_ref().map(|a| a.number);
        if current != Some(attempt) {
            return Err(Status::failed_precondition(format!(
                "attempt {attempt} of job `{id}` is over (current: {})",
                current.map_or("none".into(), |c| c.to_string())
            )));
        }
        drop(st);
        Ok(job)
    }
}

fn kill_orphan(pid: u32, job: &str) {
    // Only if that pid is still one of our trainers for this job (pids are reused).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("lockstep-trainer") && cmdline.contains(job) {
        tracing::warn!(
            pid,
            job,
            "killing a worker left by the previous coordinator"
        );
        kill_group(pid);
    }
}

fn check_token<T>(req: &Request<T>, want: &str, whose: &str) -> Result<(), Status> {
    let got = req
        .metadata()
        .get(proto::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match got {
        None => Err(Status::unauthenticated(format!(
            "this call needs {whose} token (`authorization: Bearer TOKEN`)"
        ))),
        Some(t) if constant_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
        Some(_) => Err(Status::permission_denied(format!(
            "the token is not {whose} token"
        ))),
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a bookkeeping lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn persist(inner: &Inner, record: &JobRecord) -> Result<(), crate::record::StoreError> {
    match &inner.store {
        Some(s) => s.put(record),
        None => Ok(()),
    }
}

/// Saves and announces a change of `job`.
fn touched(inner: &Inner, job: &Job, st: &mut JobState, durable: bool) {
    st.record.updated_ms = now_ms();
    if durable && let Err(e) = persist(inner, &st.record) {
        tracing::error!(job = %job.id, error = %e, "cannot persist the job");
    }
    job.changed.send_modify(|v| *v += 1);
}

/// Chooses the checkpoint an attempt starts from: the newest committed one that verifies.
/// Newer ones that fail verification are deleted (they can never load, and the attempt will
/// commit those steps again); one of a newer format is an error, not deleted.
async fn choose_checkpoint(store: &CheckpointStore) -> Result<Option<u64>, String> {
    let steps = store.list().await.map_err(|e| e.to_string())?;
    for step in steps.into_iter().rev() {
        let report = match store.verify(step).await {
            Ok(r) => r,
            Err(lockstep_storage::Error::NotCommitted { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        };
        if report.is_ok() {
            return Ok(Some(step));
        }
        if report
            .problems
            .iter()
            .any(|p| matches!(p, lockstep_storage::Error::UnsupportedVersion { .. }))
        {
            return Err(format!(
                "checkpoint {step}: {}",
                report
                    .problems
                    .first()
                    .map_or(String::new(), |p| p.to_string())
            ));
        }
        tracing::warn!(
            step,
            problem = %report.problems.first().map_or(String::new(), |p| p.to_string()),
            "committed checkpoint does not verify: deleting it and using an older one"
        );
        store.delete(step).await.map_err(|e| e.to_string())?;
    }
    Ok(None)
}

/// Drives one job: feeds inputs to its state machine and carries out the actions.
async fn supervise(inner: Arc<Inner>, job: Arc<Job>, mut inbox: mpsc::UnboundedReceiver<Msg>) {
    let (exit_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    let mut retry_at: Option<Instant> = None;
    let hb_timeout = job.config.job.heartbeat_timeout;
    let gang_timeout = job.config.job.gang_timeout;
    loop {
        let deadline = {
            let st = lock(&job.state);
            next_deadline(&st, retry_at, gang_timeout, hb_timeout)
        };
        let input = tokio::select! {
            msg = inbox.recv() => match msg {
                Some(Msg::Input(i)) => Some(i),
                None => return,
            },
            Some(e) = exits.recv() => on_exit(&job, e),
            () = sleep_until(deadline) => timed_out(&job, &mut retry_at, gang_timeout, hb_timeout),
        };
        let Some(input) = input else { continue };
        // A final state is published only once its teardown is done, so that whoever sees
        // `cancelled` or `failed` sees no worker left.
        let (actions, next, grace) = {
            let mut st = lock(&job.state);
            let before = st.record.lifecycle.phase;
            let mut next = st.record.lifecycle.clone();
            let actions = next.apply(input.clone());
            if next.phase != before {
                tracing::info!(job = %job.id, from = before.as_str(), to = next.phase.as_str(),
                    message = %next.message, "job state");
                if matches!(input, Input::AllJoined { .. })
                    && let Some(a) = &st.attempt
                {
                    st.record.gang_wait_seconds = a.started.elapsed().as_secs_f64();
                    inner.metrics.gang_wait(st.record.gang_wait_seconds);
                }
                if next.phase == Phase::Restarting {
                    inner.metrics.restart();
                }
            }
            // A cancelled running gang checkpoints before it goes; a failed one is killed.
            let grace = (next.phase == Phase::Cancelled
                && st
                    .attempt
                    .as_ref()
                    .is_some_and(|a| a.joined.len() as u32 == st.record.world_size))
            .then_some(job.config.job.collective_timeout);
            if next.phase.is_final() {
                st.record.lifecycle.message = format!("{} (stopping the workers)", next.message);
            } else {
                st.record.lifecycle = next.clone();
            }
            touched(&inner, &job, &mut st, true);
            (actions, next, grace)
        };
        for action in actions {
            match action {
                Action::TearDown => tear_down(&inner, &job, &mut exits, grace).await,
                Action::RetryAfter(d) => retry_at = Some(Instant::now() + d),
                Action::Launch { attempt } => {
                    retry_at = None;
                    if let Err(error) = launch(&inner, &job, attempt, &exit_tx).await {
                        let _ = job
                            .inbox
                            .send(Msg::Input(Input::LaunchFailed { attempt, error }));
                    }
                }
            }
        }
        if next.phase.is_final() {
            let mut st = lock(&job.state);
            st.record.lifecycle = next;
            touched(&inner, &job, &mut st, true);
            return;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn next_deadline(
    st: &JobState,
    retry_at: Option<Instant>,
    gang_timeout: Duration,
    hb_timeout: Duration,
) -> Option<Instant> {
    match (st.record.phase(), &st.attempt) {
        (Phase::Queued | Phase::Restarting, _) => retry_at,
        (Phase::Admitting, Some(a)) => Some(a.started + gang_timeout),
        (Phase::Running, Some(a)) => a
            .last_seen
            .iter()
            .map(|s| s.unwrap_or(a.started) + hb_timeout)
            .min(),
        _ => None,
    }
}

fn timed_out(
    job: &Job,
    retry_at: &mut Option<Instant>,
    gang_timeout: Duration,
    hb_timeout: Duration,
) -> Option<Input> {
    let st = lock(&job.state);
    let now = Instant::now();
    match (st.record.phase(), &st.attempt) {
        (Phase::Queued | Phase::Restarting, _) => {
            *retry_at = None;
            Some(Input::Start)
        }
        (Phase::Admitting, Some(a)) if now >= a.started + gang_timeout => {
            Some(Input::GangTimeout {
                attempt: a.number,
                joined: a.joined.len() as u32,
                world: st.record.world_size,
            })
        }
        (Phase::Running, Some(a)) => a
            .last_seen
            .iter()
            .enumerate()
            .find(|(_, s)| now >= s.unwrap_or(a.started) + hb_timeout)
            .map(|(rank, _)| Input::HeartbeatTimeout {
                attempt: a.number,
                rank: rank as u32,
                after: hb_timeout,
            }),
        _ => None,
    }
}

/// Records a worker's exit; returns the input it means, if any.
fn on_exit(job: &Job, e: Exit) -> Option<Input> {
    let mut st = lock(&job.state);
    let st = &mut *st;
    let world = st.record.world_size;
    let a = st.attempt.as_mut().filter(|a| a.number == e.attempt)?;
    let w = e.worker as usize;
    if w >= a.exited.len() {
        return None;
    }
    a.exited[w] = Some(e.clone());
    if !e.success() {
        return Some(Input::WorkerFailed {
            attempt: e.attempt,
            worker: e.worker,
            cause: e.describe(),
        });
    }
    let finished = a.finished[w].as_ref().is_some_and(|f| !f.stopped_early);
    if !finished {
        return Some(Input::WorkerFailed {
            attempt: e.attempt,
            worker: e.worker,
            cause: "exited before the last step without an error".into(),
        });
    }
    let all = a.exited.iter().flatten().filter(|x| x.success()).count() as u32 == world;
    if all {
        if let Some(f) = &a.finished[0] {
            st.record.params_hash = f.params_hash.clone();
            st.record.step = f.step;
        }
        return Some(Input::AllFinished { attempt: e.attempt });
    }
    None
}

/// Ends the current attempt. With `grace`, the workers are first asked to stop (they
/// checkpoint the step they are on, commit it, and exit) and given that long; then every worker
/// still there is killed with its process group and reaped, so no process outlives the attempt.
async fn tear_down(
    inner: &Inner,
    job: &Job,
    exits: &mut mpsc::UnboundedReceiver<Exit>,
    grace: Option<Duration>,
) {
    let Some(number) = lock(&job.state).attempt.as_ref().map(|a| a.number) else {
        return;
    };
    if let Some(grace) = grace {
        let asked = {
            let st = lock(&job.state);
            st.attempt.as_ref().is_some_and(|a| {
                let stop = proto::Command {
                    command: Some(proto::command::Command::Stop(proto::Stop {
                        reason: st.record.lifecycle.message.clone(),
                    })),
                };
                a.commands.send(stop).is_ok()
            })
        };
        if asked {
            tracing::info!(job = %job.id, attempt = number, ?grace, "asked the workers to checkpoint and stop");
            wait_exits(job, exits, number, Instant::now() + grace).await;
        }
    }
    {
        let mut st = lock(&job.state);
        st.record.worker_pids.clear();
        if let Some(a) = st.attempt.as_mut() {
            for (w, exited) in a.workers.iter().zip(&a.exited) {
                if exited.is_none() {
                    w.kill();
                }
            }
            // Wake joiners and committers of the dead attempt.
            a.join_result.send_replace(None);
            for p in a.shards.values_mut() {
                if let Some(d) = p.done.take() {
                    d.send_replace(Some(Err("the attempt was torn down".into())));
                }
            }
        }
    }
    if !wait_exits(job, exits, number, Instant::now() + Duration::from_secs(30)).await {
        tracing::error!(job = %job.id, attempt = number, "workers did not exit after SIGKILL");
    }
    let mut st = lock(&job.state);
    touched(inner, job, &mut st, true);
}

/// Records exits of `attempt`'s workers until all have exited (true) or `deadline` (false).
async fn wait_exits(
    job: &Job,
    exits: &mut mpsc::UnboundedReceiver<Exit>,
    attempt: u32,
    deadline: Instant,
) -> bool {
    loop {
        let alive = lock(&job.state)
            .attempt
            .as_ref()
            .map_or(0, |a| a.exited.iter().filter(|e| e.is_none()).count());
        if alive == 0 {
            return true;
        }
        match tokio::time::timeout_at(deadline, exits.recv()).await {
            Ok(Some(e)) if e.attempt == attempt => {
                let mut st = lock(&job.state);
                if let Some(a) = st.attempt.as_mut()
                    && let Some(slot) = a.exited.get_mut(e.worker as usize)
                    && slot.is_none()
                {
                    *slot = Some(e);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
}

async fn launch(
    inner: &Inner,
    job: &Job,
    attempt: u32,
    exit_tx: &mpsc::UnboundedSender<Exit>,
) -> Result<(), String> {
    let store = job.store.as_ref().map_err(Clone::clone)?;
    let resume_step = choose_checkpoint(store)
        .await
        .map_err(|e| format!("cannot choose a checkpoint to start from: {e}"))?;
    let (world, workdir, overrides, text, token) = {
        let st = lock(&job.state);
        let r = &st.record;
        (
            r.world_size,
            r.workdir.clone(),
            r.overrides.clone(),
            r.config_text.clone(),
            r.token.clone(),
        )
    };
    let dir = inner.settings.data_dir.join("jobs").join(&job.id);
    let config_path = dir.join("config.toml");
    let write = {
        let (dir, path) = (dir.clone(), config_path.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, text))
        })
    };
    write
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let url = lock(&inner.url).clone();
    let mut handles = Vec::new();
    let mut pids = Vec::new();
    for worker in 0..world {
        let spec = WorkerSpec {
            job_id: job.id.clone(),
            attempt,
            worker,
            coordinator: url.clone(),
            token: token.clone(),
            config: config_path.clone(),
            overrides: overrides.clone(),
            workdir: workdir.clone(),
            log: dir
                .join(format!("attempt-{attempt}"))
                .join(format!("rank-{worker}.log")),
        };
        match inner.launcher.launch(&spec, exit_tx.clone()) {
            Ok(h) => {
                pids.extend(h.pid());
                handles.push(h);
            }
            Err(e) => {
                for h in &handles {
                    h.kill();
                }
                return Err(e.to_string());
            }
        }
    }
    let mut st = lock(&job.state);
    st.record.worker_pids = pids;
    // A job resumed from an existing checkpoint (a rerun, a coordinator restart) has it as its
    // newest committed one until it commits another.
    if resume_step > st.record.last_checkpoint {
        st.record.last_checkpoint = resume_step;
    }
    st.attempt = Some(Attempt {
        number: attempt,
        started: Instant::now(),
        workers: handles,
        exited: vec![None; world as usize],
        joined: BTreeMap::new(),
        join_result: watch::channel(None).0,
        resume_step,
        last_seen: vec![None; world as usize],
        finished: vec![None; world as usize],
        shards: BTreeMap::new(),
        commands: broadcast::channel(16).0,
    });
    tracing::info!(job = %job.id, attempt, world, resume_step, "launched the gang");
    touched(inner, job, &mut st, true);
    Ok(())
}

#[tonic::async_trait]
impl Rpc for Coordinator {
    async fn submit(
        &self,
        req: Request<proto::SubmitRequest>,
    ) -> Result<Response<proto::JobStatus>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        self.submit(r.config_toml, r.overrides, PathBuf::from(r.workdir))
            .map(Response::new)
    }

    async fn get(&self, req: Request<proto::JobRef>) -> Result<Response<proto::JobStatus>, Status> {
        self.admin(&req)?;
        self.get(&req.get_ref().job_id).map(Response::new)
    }

    async fn list(
        &self,
        req: Request<proto::ListRequest>,
    ) -> Result<Response<proto::JobList>, Status> {
        self.admin(&req)?;
        let mut jobs: Vec<proto::JobStatus> = lock(&self.inner.jobs)
            .values()
            .map(|j| lock(&j.state).record.status())
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created_ms));
        Ok(Response::new(proto::JobList { jobs }))
    }

    async fn cancel(
        &self,
        req: Request<proto::JobRef>,
    ) -> Result<Response<proto::JobStatus>, Status> {
        self.admin(&req)?;
        self.cancel(&req.get_ref().job_id).map(Response::new)
    }

    type WatchStream = Stream2<proto::JobStatus>;

    async fn watch(
        &self,
        req: Request<proto::JobRef>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.admin(&req)?;
        let id = req.into_inner().job_id;
        let mut rx = self.subscribe(&id)?;
        let this = self.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                rx.borrow_and_update();
                let status = this.get(&id);
                let end = status.as_ref().map_or(true, |s| {
                    matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled")
                });
                if tx.send(status).await.is_err() || end {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        let job = self.worker(&req, &req.get_ref().job_id, req.get_ref().attempt)?;
        let r = req.into_inner();
        let world = job.config.job.world_size;
        if r.worker >= world {
            return Err(Status::invalid_argument(format!(
                "worker {} is outside a gang of {world}",
                r.worker
            )));
        }
        let mut rx = {
            let mut st = lock(&job.state);
            let a = st
                .attempt
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("no live attempt"))?;
            a.joined.insert(r.worker, r.data_addr);
            a.last_seen[r.worker as usize] = Some(Instant::now());
            let rx = a.join_result.subscribe();
            if a.joined.len() as u32 == world {
                let resp = proto::JoinResponse {
                    rank: 0,
                    world_size: world,
                    peers: a.joined.values().cloned().collect(),
                    collective: "ring".into(),
                    resume_step: a.resume_step,
                };
                a.join_result.send_replace(Some(resp));
                let _ = job
                    .inbox
                    .send(Msg::Input(Input::AllJoined { attempt: r.attempt }));
            }
            rx
        };
        let wait = rx.wait_for(|v| v.is_some());
        let resp = match tokio::time::timeout(job.config.job.gang_timeout, wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        let mut resp = resp.ok_or_else(|| {
            Status::deadline_exceeded("the gang did not assemble (attempt torn down or timed out)")
        })?;
        resp.rank = r.worker;
        Ok(Response::new(resp))
    }

    type HeartbeatStream = Stream2<proto::Command>;

    async fn heartbeat(
        &self,
        req: Request<tonic::Streaming<proto::WorkerReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let metadata = req.metadata().clone();
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty heartbeat stream"))?;
        let mut check = Request::new(());
        *check.metadata_mut() = metadata;
        let job = self.worker(&check, &first.job_id, first.attempt)?;
        let (attempt, rank) = (first.attempt, first.rank);
        let commands = {
            let st = lock(&job.state);
            let a = st
                .attempt
                .as_ref()
                .ok_or_else(|| Status::failed_precondition("no live attempt"))?;
            if rank >= st.record.world_size {
                return Err(Status::invalid_argument(format!(
                    "rank {rank} is outside the gang"
                )));
            }
            a.commands.subscribe()
        };
        let inner = self.inner.clone();
        let (out, rx) = mpsc::channel::<Result<proto::Command, Status>>(16);
        let acks = out.clone();
        tokio::spawn(async move {
            let mut report = Some(first);
            loop {
                if let Some(r) = report.take() {
                    let finished =
                        matches!(r.report, Some(proto::worker_report::Report::Finished(_)));
                    if !on_report(&inner, &job, attempt, rank, r) {
                        return;
                    }
                    if finished {
                        // The worker waits for this before it exits, so its exit is never
                        // seen before its report.
                        let ack = proto::Command {
                            command: Some(proto::command::Command::Ack(proto::Ack {})),
                        };
                        let _ = acks.send(Ok(ack)).await;
                    }
                }
                match inbound.message().await {
                    Ok(Some(r)) => report = Some(r),
                    _ => return,
                }
            }
        });
        tokio::spawn(async move {
            let mut commands = commands;
            while let Ok(c) = commands.recv().await {
                if out.send(Ok(c)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn commit_shard(
        &self,
        req: Request<proto::CommitShardRequest>,
    ) -> Result<Response<proto::CommitShardResponse>, Status> {
        let job = self.worker(&req, &req.get_ref().job_id, req.get_ref().attempt)?;
        let r = req.into_inner();
        let meta: ShardMeta = serde_json::from_slice(&r.shard_meta_json)
            .map_err(|e| Status::invalid_argument(format!("shard metadata: {e}")))?;
        if meta.rank != r.rank || meta.step != r.step {
            return Err(Status::invalid_argument(format!(
                "shard metadata says rank {} step {}, the call rank {} step {}",
                meta.rank, meta.step, r.rank, r.step
            )));
        }
        let trainer_state: serde_json::Value = serde_json::from_slice(&r.trainer_state_json)
            .map_err(|e| Status::invalid_argument(format!("trainer state: {e}")))?;
        let world = job.config.job.world_size;
        let (mut rx, ready) = {
            let mut st = lock(&job.state);
            let a = st
                .attempt
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("no live attempt"))?;
            let p = a.shards.entry(r.step).or_default();
            let done = p.done.get_or_insert_with(|| watch::channel(None).0);
            let rx = done.subscribe();
            p.metas.insert(r.rank, meta);
            if r.rank == 0 {
                p.trainer_state = Some(trainer_state);
                p.config_hash = r.config_hash.clone();
            }
            self.inner.metrics.checkpoint_write(r.write_seconds);
            let ready = (p.metas.len() as u32 == world && p.trainer_state.is_some()).then(|| {
                (
                    std::mem::take(&mut p.metas),
                    p.trainer_state.take(),
                    p.config_hash.clone(),
                    p.done.clone(),
                    a.resume_step,
                )
            });
            (rx, ready)
        };
        if let Some((metas, Some(state), config_hash, Some(done), resume_step)) = ready {
            let outcome = self
                .commit(&job, r.step, metas, state, config_hash, resume_step)
                .await;
            done.send_replace(Some(outcome));
        }
        let wait = rx.wait_for(|v| v.is_some());
        let outcome = match tokio::time::timeout(job.config.job.collective_timeout, wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        };
        match outcome {
            Some(Ok((bytes, raw_bytes))) => Ok(Response::new(proto::CommitShardResponse {
                bytes,
                raw_bytes,
            })),
            Some(Err(e)) => Err(Status::aborted(format!("checkpoint {}: {e}", r.step))),
            None => Err(Status::deadline_exceeded(format!(
                "checkpoint {}: not every rank reported its shard within job.collective_timeout",
                r.step
            ))),
        }
    }
}

impl Coordinator {
    /// Every rank's shard of `step` is durable: write the manifest, then apply retention.
    async fn commit(
        &self,
        job: &Job,
        step: u64,
        metas: BTreeMap<u32, ShardMeta>,
        trainer_state: serde_json::Value,
        config_hash: String,
        resume_step: Option<u64>,
    ) -> Result<(u64, u64), String> {
        let metas: Vec<ShardMeta> = metas.into_values().collect();
        let bytes = metas.iter().map(|m| m.bytes).sum();
        let raw = metas.iter().map(|m| m.raw_bytes).sum();
        let parent = lock(&job.state).record.last_checkpoint;
        let info = lockstep_storage::CommitInfo {
            job: job.config.job.name.clone(),
            step,
            config_hash,
            parent,
            trainer_state,
        };
        let store = job.store.as_ref().map_err(Clone::clone)?;
        let manifest =
            lockstep_storage::assemble_manifest(info, metas).map_err(|e| e.to_string())?;
        store.commit(&manifest).await.map_err(|e| e.to_string())?;
        let retention = RetentionPolicy {
            keep_last: job.config.checkpoint.keep_last,
            keep_every: job.config.checkpoint.keep_every,
        };
        let protected: Vec<u64> = resume_step.into_iter().collect();
        if let Err(e) = store.gc(&retention, &protected, false).await {
            tracing::warn!(job = %job.id, error = %e, "retention failed; old checkpoints stay");
        }
        self.inner.metrics.checkpoint_committed(bytes);
        let mut st = lock(&job.state);
        st.record.last_checkpoint = Some(step);
        tracing::info!(job = %job.id, step, bytes, "committed checkpoint");
        touched(&self.inner, job, &mut st, true);
        Ok((bytes, raw))
    }
}

/// Applies one worker report; false when the attempt is over.
fn on_report(inner: &Inner, job: &Job, attempt: u32, rank: u32, r: proto::WorkerReport) -> bool {
    let mut st = lock(&job.state);
    let st = &mut *st;
    let Some(a) = st.attempt.as_mut().filter(|a| a.number == attempt) else {
        return false;
    };
    a.last_seen[rank as usize] = Some(Instant::now());
    match r.report {
        Some(proto::worker_report::Report::Step(s)) if rank == 0 => {
            st.record.step = s.step;
            st.record.loss = Some(s.loss);
            st.record.first_loss.get_or_insert(s.loss);
            st.record.tokens_per_sec = s.tokens_per_sec;
            inner.metrics.step(s.step_seconds, s.stall_seconds);
            touched(inner, job, st, false);
        }
        Some(proto::worker_report::Report::Finished(f)) => {
            a.finished[rank as usize] = Some(f);
        }
        _ => {}
    }
    true
}

/// A stream fed by a task: `f` gets the sending half.
fn async_stream<T, F, Fut>(f: F) -> Stream2<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
