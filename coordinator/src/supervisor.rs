//! One supervisor task per job: it feeds the job's [`state`](crate::state) machine what happened
//! (inputs from the service, worker exits, deadlines of the live [`Attempt`]) and carries out
//! the actions: launch a gang, tear it down, retry after a backoff.

use std::sync::Arc;
use std::time::Duration;

// Tokio's clock, so tests can run the supervisor's timeouts in paused time.
use tokio::time::Instant;

use lockstep_api::{Resume, proto};
use lockstep_storage::Want;
use tokio::sync::mpsc;

use crate::attempt::Attempt;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::launcher::{Exit, WorkerSpec};
use crate::registry::{Job, Live, lock};
use crate::state::{Action, Input, Phase};
use lockstep_api::Recovery;

/// How often a gang that a queue holds back is looked at (to start its gang timeout).
const QUEUE_POLL: Duration = Duration::from_secs(1);

/// How long a failure that only reports a lost peer waits for that peer's own exit.
const PEER_FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Drives `job` until it reaches a final state.
pub(crate) async fn supervise(
    inner: Arc<Context>,
    job: Arc<Job>,
    mut inbox: mpsc::UnboundedReceiver<Input>,
) {
    let (exit_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    let mut retry_at: Option<Instant> = None;
    // A rank that failed only because a peer went away is held back briefly: the peer's own
    // exit (killed, crashed) is the cause worth reporting, and it may be reaped second.
    let mut held: Option<(Input, Instant)> = None;
    // The running export, so a cancel can stop it (its process dies with the task).
    let mut export_task: Option<tokio::task::AbortHandle> = None;
    let mut queue_poll: Option<Instant> = None;
    loop {
        let deadline = {
            let mut st = lock(&job.state);
            let phase = st.record.phase();
            // A gang a queue holds back (Kueue) has no gang timeout yet: look again shortly.
            if phase == Phase::Admitting
                && let Some(l) = st.live.as_mut()
                && l.attempt.queued()
            {
                if l.workers.iter().all(|w| w.admitted()) {
                    tracing::info!(job = %job.id, attempt = l.attempt.number, "the queue admitted the gang");
                    l.attempt.admit(Instant::now());
                } else {
                    queue_poll = Some(Instant::now() + QUEUE_POLL);
                }
            }
            match phase {
                Phase::Queued | Phase::Restarting => retry_at,
                phase => st
                    .live
                    .as_ref()
                    .and_then(|l| l.attempt.deadline(phase, job.timeouts())),
            }
        };
        let deadline = [deadline, held.as_ref().map(|h| h.1), queue_poll.take()]
            .into_iter()
            .flatten()
            .min();
        let input = tokio::select! {
            msg = inbox.recv() => match msg {
                Some(i) => Some(i),
                None => return,
            },
            Some(e) = exits.recv() => {
                let secondary = e.peer_lost();
                match on_exit(&job, e) {
                    Some(i @ Input::WorkerFailed { .. }) if secondary => {
                        if held.is_none() {
                            held = Some((i, Instant::now() + PEER_FAILURE_GRACE));
                        }
                        None
                    }
                    // The root cause arrived: report it, not the rank that lost it.
                    Some(i @ Input::WorkerFailed { .. }) => {
                        held = None;
                        Some(i)
                    }
                    other => other,
                }
            }
            () = sleep_until(deadline) => match held.take_if(|h| Instant::now() >= h.1) {
                Some((i, _)) => Some(i),
                None => timed_out(&inner, &job, &mut retry_at),
            },
        };
        let Some(input) = input else { continue };
        let input = in_place(&inner, &job, input);
        // A final state is published only once its teardown is done, so that whoever sees
        // `cancelled` or `failed` sees no worker left.
        let (actions, next, grace, emergency_due) = {
            let mut st = lock(&job.state);
            let before = st.record.lifecycle.phase;
            let mut next = st.record.lifecycle.clone();
            let actions = next.apply(input.clone());
            if next.phase != before {
                tracing::info!(job = %job.id, from = before.as_str(), to = next.phase.as_str(),
                    message = %next.message, "job state");
                if matches!(input, Input::AllJoined { .. })
                    && let Some(l) = &st.live
                {
                    st.record.gang_wait_seconds = l.attempt.started.elapsed().as_secs_f64();
                    inner.metrics.gang_wait(st.record.gang_wait_seconds);
                }
                if next.phase == Phase::Restarting {
                    inner.metrics.restart();
                }
            }
            let lost = match &input {
                Input::WorkerFailed { worker, .. }
                | Input::ReplaceWorker { worker, .. }
                | Input::ReplacementTimeout { worker, .. } => Some(*worker),
                Input::HeartbeatTimeout { rank, .. } => Some(*rank),
                _ => None,
            };
            if actions.iter().any(|a| matches!(a, Action::Replace { .. })) {
                inner.metrics.replacement();
                st.record.lifecycle.message = next.message.clone();
                st.record.recovering(lost, "in-place");
            } else if next.phase == Phase::Restarting && before == Phase::Running {
                st.record.lifecycle.message = next.message.clone();
                st.record.recovering(lost, "checkpoint");
            }
            // A cancelled running gang checkpoints before it goes; a failed one is killed.
            let grace = (next.phase == Phase::Cancelled
                && st.live.as_ref().is_some_and(|l| l.attempt.all_joined()))
            .then_some(job.config.job.collective_timeout);
            if next.phase.is_final() {
                st.record.lifecycle.message = format!("{} (stopping the workers)", next.message);
                st.touch(&job, &inner.persister, false);
                // Durable at once: a coordinator that dies during the teardown must not
                // resume a job that was cancelled or failed.
                let mut durable = st.record.clone();
                durable.lifecycle = next.clone();
                inner.persister.put(durable);
            } else {
                st.record.lifecycle = next.clone();
                st.touch(&job, &inner.persister, true);
            }
            // A gang that could not re-form in place first saves what its survivors hold.
            let emergency_due = (next.phase == Phase::Restarting
                && before == Phase::Running
                && job.config.job.recovery == Recovery::InPlace
                && inner.launcher.replaces_in_place())
            .then_some(lost);
            (actions, next, grace, emergency_due)
        };
        if let Some(lost) = emergency_due {
            emergency(&inner, &job, lost, &mut exits).await;
        }
        if next.phase == Phase::Cancelled
            && let Some(t) = export_task.take()
        {
            t.abort();
        }
        for action in actions {
            match action {
                Action::TearDown => {
                    let permanent = tear_down(&inner, &job, &mut exits, grace).await;
                    // Exits collected while tearing down may show a rank that failed for good
                    // although another rank's failure arrived first.
                    if let Some((attempt, worker, cause)) = permanent
                        && next.phase == Phase::Restarting
                    {
                        job.send(Input::WorkerFailed {
                            attempt,
                            worker,
                            cause,
                            permanent: true,
                        });
                    }
                }
                Action::Replace { attempt, worker } => {
                    if let Err(e) =
                        replace(&inner, &job, attempt, worker, &mut exits, &exit_tx).await
                    {
                        tracing::error!(job = %job.id, attempt, worker, error = %e, "cannot replace the lost rank");
                        // The gang restarts from its last checkpoint instead.
                        job.send(Input::LaunchFailed {
                            attempt,
                            error: format!("cannot replace rank {worker}: {e}"),
                            transient: true,
                        });
                    }
                }
                Action::RetryAfter(d) => {
                    retry_at = Some(Instant::now().checked_add(d).unwrap_or_else(far_future))
                }
                Action::Export => match export_spec(&inner, &job) {
                    Ok(spec) => {
                        tracing::info!(job = %job.id, checkpoint = %spec.checkpoint, to = %spec.to, "exporting");
                        let (inner, job) = (inner.clone(), job.clone());
                        // Its own task: a long export must not keep the job from being
                        // cancelled or listed; a cancel aborts it (and kills its process).
                        let task = tokio::spawn(async move {
                            job.send(match inner.launcher.export(&spec).await {
                                Ok(note) => Input::Exported { note },
                                Err(e) => Input::ExportFailed {
                                    error: e.to_string(),
                                },
                            });
                        });
                        export_task = Some(task.abort_handle());
                    }
                    Err(error) => job.send(Input::ExportFailed { error }),
                },
                Action::Launch { attempt } => {
                    retry_at = None;
                    if let Err(e) = launch(&inner, &job, attempt, &exit_tx).await {
                        tracing::error!(job = %job.id, attempt, error = %e, "cannot launch the gang");
                        let transient = e.is_transient();
                        job.send(Input::LaunchFailed {
                            attempt,
                            error: e.to_string(),
                            transient,
                        });
                    }
                }
            }
        }
        if next.phase.is_final() {
            // The checkpoint URL is free before anyone sees the end.
            crate::lease::release(&job).await;
            let mut st = lock(&job.state);
            st.record.lifecycle = next;
            st.touch(&job, &inner.persister, true);
            return;
        }
    }
}

/// The job's supervisor panicked (a bug): fail the job with the cause and kill its workers,
/// so that nothing keeps running under a job nobody supervises.
pub(crate) fn crashed(inner: &Context, job: &Job, panic: Box<dyn std::any::Any + Send>) {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    tracing::error!(job = %job.id, panic = %what, "the job's supervisor panicked; failing the job");
    let mut st = lock(&job.state);
    if let Some(mut live) = st.live.take() {
        for handle in &live.workers {
            handle.kill();
        }
        live.join_result.send_replace(None);
        live.commits.tear_down();
    }
    if !st.record.lifecycle.phase.is_final() {
        st.record.lifecycle.phase = Phase::Failed;
        st.record.lifecycle.message = format!(
            "internal error: the coordinator's supervisor of this job crashed ({what}); its \
             workers were killed. Please report this; submitting the job again resumes from \
             its last checkpoint"
        );
    }
    st.touch(job, &inner.persister, true);
    // Its checkpoint URL is free again (the lease would otherwise be renewed for ever).
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let job = job.id.clone();
        let registry_job = inner.registry.get(&job).ok();
        handle.spawn(async move {
            if let Some(j) = registry_job {
                crate::lease::release(&j).await;
            }
        });
    }
}

/// About 30 years from now: a deadline that never comes.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A deadline passed: what it means now. Silence during a stall of the coordinator itself
/// is excused first.
fn timed_out(inner: &Context, job: &Job, retry_at: &mut Option<Instant>) -> Option<Input> {
    let now = Instant::now();
    let stall_ended = inner.clock.stall_ended(now);
    let mut st = lock(&job.state);
    match st.record.phase() {
        Phase::Queued | Phase::Restarting => {
            *retry_at = None;
            Some(Input::Start)
        }
        phase => {
            let attempt = &mut st.live.as_mut()?.attempt;
            if let Some(until) = stall_ended {
                attempt.excuse(until);
            }
            attempt.timed_out(phase, now, job.timeouts())
        }
    }
}

/// A lost rank of a running gang (exited, or silent) becomes [`Input::ReplaceWorker`] when
/// the gang can re-form in place: the launcher can start one worker into a running gang, the
/// gang formed and finished a step since, and every other rank is still there (a rank that
/// exited because it lost its peer cannot rejoin). Otherwise the input stays, and the gang
/// restarts from its last checkpoint.
fn in_place(inner: &Context, job: &Job, input: Input) -> Input {
    let (attempt, worker, cause) = match &input {
        Input::WorkerFailed {
            attempt,
            worker,
            cause,
            permanent: false,
        } => (*attempt, *worker, cause.clone()),
        Input::HeartbeatTimeout {
            attempt,
            rank,
            after,
        } => (
            *attempt,
            *rank,
            format!("sent no heartbeat for {after:?} (hung or unreachable) and was killed"),
        ),
        _ => return input,
    };
    if !inner.launcher.replaces_in_place() || job.config.job.recovery != Recovery::InPlace {
        return input;
    }
    let st = lock(&job.state);
    let live = st.live.as_ref().filter(|l| l.attempt.number == attempt);
    if live.is_some_and(|l| l.attempt.replacing() == Some(worker)) {
        // The replacement itself was lost before the gang re-formed: say so.
        return match input {
            Input::WorkerFailed {
                attempt,
                worker,
                cause,
                permanent,
            } => Input::WorkerFailed {
                attempt,
                worker,
                cause: format!("(the replacement started for it) {cause}"),
                permanent,
            },
            other => other,
        };
    }
    let replaceable =
        st.record.phase() == Phase::Running && live.is_some_and(|l| l.attempt.replaceable(worker));
    if !replaceable {
        return input;
    }
    Input::ReplaceWorker {
        attempt,
        worker,
        cause,
    }
}

/// How long survivors that have not regrouped yet are waited for before an emergency checkpoint
/// (a survivor sees a broken ring within milliseconds).
const REGROUP_GRACE: Duration = Duration::from_secs(2);

/// The gang could not re-form in place (its replacement did not join in time or was lost, or
/// a second rank was lost meanwhile) and restarts. If survivors regrouped holding a state newer
/// than the last checkpoint, they first write it as an emergency checkpoint — split among those
/// that hold it, committed like any other — so the restart resumes from it and loses no step.
/// It has `job.collective_timeout`, and ends early when a writer exits before it is committed;
/// if it fails, the restart uses the last checkpoint. Exits meanwhile are recorded.
async fn emergency(
    inner: &Context,
    job: &Job,
    lost: Option<u32>,
    exits: &mut mpsc::UnboundedReceiver<Exit>,
) {
    let mut until = Instant::now() + REGROUP_GRACE;
    let (e, mut rx, number) = loop {
        {
            let mut st = lock(&job.state);
            let committed = st.record.last_checkpoint;
            let Some(live) = st.live.as_mut() else { return };
            let attempt = &mut live.attempt;
            let others = (0..attempt.world).any(|w| Some(w) != lost && !attempt.has_exited(w));
            if !others {
                return;
            }
            if attempt.unsettled() {
                // Lost as the gang re-formed: the survivors may be waiting on the ring for the
                // lost member; told so, they leave it and regroup into this (older trainers do
                // once job.collective_timeout passes).
                live.regroup_survivors();
                until = Instant::now()
                    .checked_add(job.config.job.collective_timeout + REGROUP_GRACE)
                    .unwrap_or_else(far_future);
                continue;
            }
            let attempt = &mut live.attempt;
            let late = Instant::now() >= until;
            if attempt.forming() && (late || attempt.regrouped(lost)) {
                let committed = committed.max(attempt.resume_step);
                let Some(e) = attempt.begin_emergency(committed) else {
                    return;
                };
                let rx = live.commits.watch(e.step);
                let number = live.attempt.number;
                live.join_result.send_replace(Some(proto::JoinResponse {
                    rank: 0,
                    world_size: live.attempt.world,
                    peers: vec![],
                    collective: "ring".into(),
                    resume_step: live.attempt.resume_step,
                    config_hash: job.config.results_hash(),
                    generation: live.attempt.generation(),
                    state_from: None,
                    state_step: None,
                    emergency_step: Some(e.step),
                    emergency_writers: e.writers.clone(),
                }));
                break (e, rx, number);
            }
            if late {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tracing::info!(job = %job.id, step = e.step, writers = ?e.writers,
        "the gang cannot re-form in place: its survivors write an emergency checkpoint");
    let started = Instant::now();
    let until = started
        .checked_add(job.config.job.collective_timeout)
        .unwrap_or_else(far_future);
    let mut writer_gone = None;
    let outcome = loop {
        let x = tokio::select! {
            biased;
            r = rx.wait_for(Option::is_some) => break r.ok().and_then(|v| v.clone()),
            Some(x) = exits.recv() => x,
            () = tokio::time::sleep_until(until) => break None,
        };
        let writer = x.attempt == number && e.writers.contains(&x.worker);
        let worker = x.worker;
        on_exit(job, x);
        // A writer reports its shard before it exits: one gone without the commit means it
        // failed.
        if writer && rx.borrow().is_none() {
            writer_gone = Some(worker);
            break None;
        }
    };
    let mut st = lock(&job.state);
    match (outcome, writer_gone) {
        (Some(Ok((bytes, _))), _) => {
            tracing::info!(job = %job.id, step = e.step, bytes, seconds = started.elapsed().as_secs_f64(),
                "committed the emergency checkpoint");
            st.record.emergency_checkpoint(e.step, e.writers.len());
        }
        (Some(Err(why)), _) => {
            tracing::warn!(job = %job.id, step = e.step, error = %why,
                "the emergency checkpoint failed: restarting from the last checkpoint");
            st.record.lifecycle.message.push_str(&format!(
                "; the emergency checkpoint of step {} failed ({why}), so the gang restarts \
                 from its last checkpoint",
                e.step
            ));
        }
        (None, Some(w)) => {
            tracing::warn!(job = %job.id, step = e.step, writer = w,
                "a writer of the emergency checkpoint exited before it was committed: restarting from the last checkpoint");
            st.record.lifecycle.message.push_str(&format!(
                "; rank {w} failed to write its shard of the emergency checkpoint of step {} (its \
                 log says why), so the gang restarts from its last checkpoint",
                e.step
            ));
        }
        (None, None) => {
            tracing::warn!(job = %job.id, step = e.step,
                "the emergency checkpoint was not committed in time: restarting from the last checkpoint");
            st.record.lifecycle.message.push_str(&format!(
                "; the emergency checkpoint of step {} was not committed within \
                 job.collective_timeout ({:?}), so the gang restarts from its last checkpoint",
                e.step, job.config.job.collective_timeout
            ));
        }
    }
    st.touch(job, &inner.persister, true);
}

/// Replaces `worker` of the running `attempt` in place: kills it if it is still there (a silent
/// rank) and reaps it — so its exit is not taken for its replacement's —, begins re-forming
/// the gang, and launches the new worker, which joins the survivors.
async fn replace(
    inner: &Context,
    job: &Job,
    attempt: u32,
    worker: u32,
    exits: &mut mpsc::UnboundedReceiver<Exit>,
    exit_tx: &mpsc::UnboundedSender<Exit>,
) -> std::result::Result<(), String> {
    let current = |st: &crate::registry::JobState| {
        st.live
            .as_ref()
            .is_some_and(|l| l.attempt.number == attempt)
    };
    let running = {
        let st = lock(&job.state);
        let live = st.live.as_ref().filter(|l| l.attempt.number == attempt);
        match live {
            None => return Ok(()),
            Some(l) if !l.attempt.has_exited(worker) => {
                if let Some(h) = l.workers.get(worker as usize) {
                    h.kill_one();
                }
                true
            }
            Some(_) => false,
        }
    };
    if running {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let e = match tokio::time::timeout_at(until, exits.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) | Err(_) => {
                    return Err(format!("rank {worker} did not exit within 30 s of SIGKILL"));
                }
            };
            let theirs = e.attempt == attempt && e.worker == worker;
            // Another rank's exit meanwhile is handled as usual (it restarts the gang).
            if let Some(i) = on_exit(job, e)
                && !theirs
            {
                job.send(i);
            }
            if theirs {
                break;
            }
        }
    }
    let generation = {
        let mut st = lock(&job.state);
        if !current(&st) {
            return Ok(());
        }
        let Some(live) = st.live.as_mut() else {
            return Ok(());
        };
        if live
            .attempt
            .replace(worker, Instant::now())
            .map_err(|e| e.to_string())?
        {
            live.reforming();
        }
        live.attempt.generation()
    };
    let spec = worker_spec(inner, job, attempt, worker, Some(generation));
    let handle = match inner.launcher.launch(&spec, exit_tx.clone()).await {
        Ok(h) => h,
        Err(e) => {
            // Nothing will report this worker's end: record one, so that the teardown that
            // follows does not wait for it.
            let _ = exit_tx.send(Exit {
                attempt,
                worker,
                code: None,
                signal: None,
                message: Some(format!("its replacement could not be started: {e}")),
                unstartable: false,
            });
            return Err(e.to_string());
        }
    };
    let mut st = lock(&job.state);
    match st.live.as_mut() {
        Some(l) if l.attempt.number == attempt => {
            if let Some(slot) = l.workers.get_mut(worker as usize) {
                *slot = handle;
            } else {
                handle.kill();
            }
        }
        _ => handle.kill(),
    }
    tracing::info!(job = %job.id, attempt, worker, generation, "launched a replacement for the lost rank");
    Ok(())
}

/// What launching `worker` of `attempt` takes; `replacing`: the ring generation a replacement
/// of a lost rank joins (its log is its own).
fn worker_spec(
    inner: &Context,
    job: &Job,
    attempt: u32,
    worker: u32,
    replacing: Option<u32>,
) -> WorkerSpec {
    let dir = inner.settings.data_dir.join("jobs").join(&job.id);
    let (workdir, overrides) = {
        let st = lock(&job.state);
        (st.record.workdir.clone(), st.record.overrides.clone())
    };
    let log = match replacing {
        None => format!("rank-{worker}.log"),
        Some(g) => format!("rank-{worker}.replacement-{g}.log"),
    };
    WorkerSpec {
        job_id: job.id.clone(),
        attempt,
        worker,
        coordinator: lock(&inner.url).clone(),
        token: job.token.clone(),
        config: dir.join("config.toml"),
        overrides,
        workdir,
        log: dir.join(format!("attempt-{attempt}")).join(log),
        data_cache: inner.settings.data_dir.join("tokens"),
        // Every worker of the attempt is placed alike (a change applies to the next attempt).
        placement: lock(&job.placement).clone(),
        replacing,
    }
}

/// Records a worker's exit; returns the input it means, if any.
fn on_exit(job: &Job, e: Exit) -> Option<Input> {
    let mut st = lock(&job.state);
    let st = &mut *st;
    let live = st.live.as_mut()?;
    let input = match live.attempt.on_exit(e) {
        Some(Input::AllFinished { attempt, .. }) => Some(Input::AllFinished {
            attempt,
            export: job.config.export.is_some(),
        }),
        other => other,
    };
    if matches!(input, Some(Input::AllFinished { .. }))
        && let Some(f) = live.attempt.final_report()
    {
        st.record.params_hash = f.params_hash.clone();
        st.record.step = f.step;
        let step = f.step;
        st.record.trained(step);
    }
    input
}

/// What exporting `job`'s final checkpoint takes: its `[export]` section, the last committed
/// step, paths resolved against the job's working directory, and the lineage facts only the
/// coordinator knows.
fn export_spec(
    inner: &Context,
    job: &Job,
) -> std::result::Result<crate::launcher::ExportSpec, String> {
    use crate::record::resolve_url;
    let export = job
        .config
        .export
        .as_ref()
        .ok_or_else(|| "the job has no [export] section".to_string())?;
    let st = lock(&job.state);
    let r = &st.record;
    let step = r
        .last_checkpoint
        .ok_or_else(|| "no checkpoint was committed".to_string())?;
    // `lockstep export --base` takes the base as a config writes it, resolved here.
    let base = job
        .config
        .model
        .base
        .map_location(|l| resolve_url(&lockstep_api::base::as_url(l), &r.workdir));
    let base = (base != lockstep_api::BaseModel::Init).then(|| base.to_string());
    let lineage = serde_json::json!({
        "job_id": job.id,
        "attempts": r.lifecycle.attempt,
        "restarts": r.lifecycle.restarts,
        "world_size": r.world_size,
        "data": {
            "train": job.config.data.train.iter().map(|u| resolve_url(u, &r.workdir)).collect::<Vec<_>>(),
            "eval": job.config.data.eval.iter().map(|u| resolve_url(u, &r.workdir)).collect::<Vec<_>>(),
        },
        "eval_step": r.eval_step,
    });
    let dir = inner.settings.data_dir.join("jobs").join(&job.id);
    Ok(crate::launcher::ExportSpec {
        job_id: job.id.clone(),
        checkpoint: format!("{}@{step}", r.checkpoint_url),
        to: resolve_url(&export.url, &r.workdir),
        name: export.lineage(&job.config.job.name).to_string(),
        dtype: export.dtype.clone(),
        lora: export.lora.clone(),
        base,
        max_eval_regression: export.max_eval_regression,
        lineage: lineage.to_string(),
        webhook: export.webhook.clone(),
        workdir: r.workdir.clone(),
        log: dir.join("export.log"),
        placement: lock(&job.placement).clone(),
    })
}

/// Chooses the checkpoint, registers the attempt (before any worker starts, so the earliest
/// `Join` finds it), then launches every worker.
async fn launch(
    inner: &Context,
    job: &Job,
    attempt: u32,
    exit_tx: &mpsc::UnboundedSender<Exit>,
) -> Result<()> {
    // The job's first attempt starts where its config says; later attempts (restarts, a
    // restarted coordinator) continue from the job's own newest checkpoint.
    let want = match job.config.checkpoint.resume_from() {
        _ if attempt > 1 => Want::Latest,
        Resume::Latest => Want::Latest,
        Resume::Fresh => Want::Fresh,
        Resume::Step(s) => Want::Step(s),
    };
    let start = {
        // No commit of an earlier attempt runs while this one chooses.
        let _store = job.store_lock.lock().await;
        job.store.choose_start(want).await?
    };
    // Whether its gang committed that checkpoint itself as it lost its coordinator.
    let orphans_kept = match start.step {
        Some(step) => job.store.manifest(step).await.is_ok_and(|m| {
            m.trainer_state[lockstep_storage::WITHOUT_COORDINATOR] == serde_json::json!(true)
        }),
        None => false,
    };
    for s in &start.set_aside {
        tracing::warn!(job = %job.id, step = s.step, reason = %s.reason, moved_to = %s.moved_to,
            "committed checkpoint does not verify: set aside; starting from an older one");
    }
    // Tell the user, in the job's status: a checkpoint they may count on is gone from use.
    let set_aside_note = (!start.set_aside.is_empty()).then(|| {
        let what: Vec<String> = start
            .set_aside
            .iter()
            .map(|s| format!("step {} ({}) moved to {}", s.step, s.reason, s.moved_to))
            .collect();
        format!(
            "checkpoints that failed verification were set aside: {}; attempt {attempt} starts \
             from {}",
            what.join("; "),
            start
                .step
                .map_or("scratch".to_string(), |s| format!("step {s}"))
        )
    });
    let (world, text) = {
        let st = lock(&job.state);
        (st.record.world_size, st.record.config_text.clone())
    };
    let dir = inner.settings.data_dir.join("jobs").join(&job.id);
    let config_path = dir.join("config.toml");
    let (d, path) = (dir.clone(), config_path.clone());
    // It holds the job's config (and its data dir holds tokens): private to this user.
    tokio::task::spawn_blocking(move || {
        crate::private::dir(&d).and_then(|_| crate::private::write(&path, text.as_bytes()))
    })
    .await?
    .map_err(|source| Error::Io {
        op: "write the job config",
        path: config_path.clone(),
        source,
    })?;
    {
        let mut st = lock(&job.state);
        // A job resumed from an existing checkpoint (a rerun, a coordinator restart) has it as
        // its newest committed one until it commits another; after a set-aside, the newest is
        // the one it starts from.
        if start.step > st.record.last_checkpoint && set_aside_note.is_none() {
            // Newer than any this coordinator committed, and marked as the gang's own, taken as
            // it lost its coordinator (the step it was at): a restart from it loses nothing.
            if let Some(step) = start.step
                && orphans_kept
                && st.record.recovering_from_checkpoint()
            {
                st.record.kept_by_orphans(step);
            }
        }
        if start.step > st.record.last_checkpoint || set_aside_note.is_some() {
            st.record.last_checkpoint = start.step;
        }
        if let Some(note) = set_aside_note {
            st.record.lifecycle.message = note;
        }
        st.live = Some(Live::new(Attempt::new(
            attempt,
            world,
            Instant::now(),
            start.step,
        )));
        st.touch(job, &inner.persister, true);
    }
    for worker in 0..world {
        let spec = worker_spec(inner, job, attempt, worker, None);
        // On failure the state machine fails the attempt and its teardown kills those started.
        let handle = inner.launcher.launch(&spec, exit_tx.clone()).await?;
        let mut st = lock(&job.state);
        match st.live.as_mut() {
            Some(l) if l.attempt.number == attempt => {
                if !handle.admitted() {
                    l.attempt.queue();
                }
                l.workers.push(handle);
            }
            _ => handle.kill(),
        }
    }
    tracing::info!(job = %job.id, attempt, world, resume_step = start.step, "launched the gang");
    Ok(())
}

/// Ends the current attempt; returns a worker of it that failed for good (attempt, worker,
/// how), if any. With `grace`, the workers are first asked to stop (they
/// checkpoint the step they are on, commit it, and exit) and given that long; then every worker
/// still there is killed with its process group and reaped, so no process outlives the attempt.
async fn tear_down(
    inner: &Context,
    job: &Job,
    exits: &mut mpsc::UnboundedReceiver<Exit>,
    grace: Option<Duration>,
) -> Option<(u32, u32, String)> {
    let number = lock(&job.state).live.as_ref().map(|l| l.attempt.number)?;
    if let Some(grace) = grace {
        let asked = {
            let st = lock(&job.state);
            st.live.as_ref().is_some_and(|l| {
                let stop = proto::Command {
                    command: Some(proto::command::Command::Stop(proto::Stop {
                        reason: st.record.lifecycle.message.clone(),
                    })),
                };
                l.commands.send(stop).is_ok()
            })
        };
        if asked {
            tracing::info!(job = %job.id, attempt = number, ?grace, "asked the workers to checkpoint and stop");
            let until = Instant::now().checked_add(grace).unwrap_or_else(far_future);
            wait_exits(job, exits, number, until).await;
        }
    }
    {
        let mut st = lock(&job.state);
        if let Some(l) = st.live.as_mut() {
            for (w, handle) in l.workers.iter().enumerate() {
                if !l.attempt.has_exited(w as u32) {
                    handle.kill();
                }
            }
            // Wake joiners and committers of the dead attempt.
            l.join_result.send_replace(None);
            l.commits.tear_down();
        }
    }
    if !wait_exits(job, exits, number, Instant::now() + Duration::from_secs(30)).await {
        tracing::error!(job = %job.id, attempt = number, "workers did not exit after SIGKILL");
    }
    let mut st = lock(&job.state);
    let permanent = st
        .live
        .as_ref()
        .and_then(|l| l.attempt.permanent_failure())
        .map(|(worker, cause)| (number, worker, cause));
    st.live = None;
    st.touch(job, &inner.persister, true);
    permanent
}

/// Records exits of `attempt`'s launched workers until all have exited (true) or `deadline`
/// (false).
async fn wait_exits(
    job: &Job,
    exits: &mut mpsc::UnboundedReceiver<Exit>,
    attempt: u32,
    deadline: Instant,
) -> bool {
    loop {
        let alive = lock(&job.state).live.as_ref().map_or(0, |l| {
            (0..l.workers.len() as u32)
                .filter(|&w| !l.attempt.has_exited(w))
                .count()
        });
        if alive == 0 {
            return true;
        }
        match tokio::time::timeout_at(deadline, exits.recv()).await {
            Ok(Some(e)) if e.attempt == attempt => {
                let mut st = lock(&job.state);
                if let Some(l) = st.live.as_mut() {
                    l.attempt.on_exit(e);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
}
