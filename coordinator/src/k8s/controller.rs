//! The LockstepJob controller (`kube_runtime::Controller`): each LockstepJob becomes a job of
//! this coordinator (id derived from its uid), launched through [`KubeLauncher`]; the job's
//! record is written back to the LockstepJob's status as it changes. The status is the job's
//! durable record: a coordinator that restarts adopts every live LockstepJob from it and
//! restarts its gang from the last committed checkpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller as Runtime};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::crd::{LockstepJob, LockstepJobStatus};
use super::launcher::KubeLauncher;
use super::{FINALIZER, KubeError, render};
use crate::Coordinator;
use crate::record::JobRecord;
use crate::registry::lock;
use crate::state::{Lifecycle, Phase};
use lockstep_api::JobConfig;

/// Where the controller works.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// The namespace whose LockstepJobs it runs.
    pub namespace: String,
}

/// The controller. Cheap to share.
pub struct Controller {
    client: Client,
    coordinator: Coordinator,
    launcher: Arc<KubeLauncher>,
    settings: ControllerSettings,
    /// Per job id: what the status writer needs from the newest LockstepJob seen.
    jobs: Mutex<HashMap<String, Watched>>,
}

#[derive(Debug, Clone, Default)]
struct Watched {
    generation: Option<i64>,
    /// The generation whose changed `spec.config` was last warned about.
    config_warned: Option<i64>,
    suspend: bool,
    syncing: bool,
}

/// The coordinator's job id for a LockstepJob: its name and 16 hex digits of its uid (stable
/// across coordinator restarts, new for a LockstepJob deleted and created again).
pub fn job_id(lsj: &LockstepJob) -> Result<String, String> {
    let (name, _) = render::name_of(lsj)?;
    let uid: String = lsj
        .metadata
        .uid
        .as_deref()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    if uid.len() < 16 {
        return Err("metadata.uid: missing (is this object from the API server?)".into());
    }
    Ok(format!("{name}-{}", uid.to_ascii_lowercase()))
}

/// Where relative `file://` URLs resolve: the shared volume's mount path, or `/` (none).
fn workdir_of(lsj: &LockstepJob) -> std::path::PathBuf {
    lsj.spec
        .shared_volume
        .as_ref()
        .map_or_else(|| "/".into(), |v| v.mount_path.clone().into())
}

/// RFC 3339 UTC of now, to the second.
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl Controller {
    /// A controller of `settings.namespace`'s LockstepJobs running them on `coordinator`,
    /// whose launcher is `launcher`.
    pub fn new(
        client: Client,
        coordinator: Coordinator,
        launcher: Arc<KubeLauncher>,
        settings: ControllerSettings,
    ) -> Arc<Controller> {
        Arc::new(Controller {
            client,
            coordinator,
            launcher,
            settings,
            jobs: Mutex::default(),
        })
    }

    fn api(&self) -> Api<LockstepJob> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        Runtime::new(self.api(), watcher::Config::default())
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, self.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "reconcile");
                }
            })
            .await;
    }

    async fn patch_status(
        &self,
        name: &str,
        status: &LockstepJobStatus,
    ) -> Result<(), kube::Error> {
        self.api()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map(drop)
    }

    /// Writes job `id`'s record into LockstepJob `name`'s status whenever it changes, until
    /// the job is final (and written) or the LockstepJob is gone.
    fn start_sync(self: &Arc<Self>, name: &str, id: &str, mut status: LockstepJobStatus) {
        {
            let mut jobs = lock(&self.jobs);
            let w = jobs.entry(id.to_string()).or_default();
            if w.syncing {
                return;
            }
            w.syncing = true;
        }
        let (ctl, name, id) = (self.clone(), name.to_string(), id.to_string());
        tokio::spawn(async move {
            let Ok(mut changed) = ctl.coordinator.subscribe(&id) else {
                ctl.sync_ended(&id);
                return;
            };
            loop {
                let Ok(record) = ctl.coordinator.get(&id) else {
                    break;
                };
                let w = lock(&ctl.jobs).get(&id).cloned().unwrap_or_default();
                let before = status.clone();
                fill_status(
                    &mut status,
                    &record,
                    w.generation,
                    w.suspend,
                    ctl.launcher.exported_version(&id),
                    &now_rfc3339(),
                );
                let done = record.phase().is_final();
                if status != before {
                    match ctl.patch_status(&name, &status).await {
                        Ok(()) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => break,
                        Err(e) => {
                            tracing::warn!(lockstepjob = %name, error = %e, "cannot write the status; retrying");
                            status = before;
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                    }
                }
                if done {
                    break;
                }
                // At most one write a second; at least a look every 30 s.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tokio::time::timeout(Duration::from_secs(30), changed.changed()).await;
            }
            ctl.sync_ended(&id);
        });
    }

    fn sync_ended(&self, id: &str) {
        if let Some(w) = lock(&self.jobs).get_mut(id) {
            w.syncing = false;
        }
    }

    async fn set_finalizers(
        &self,
        lsj: &LockstepJob,
        finalizers: Vec<String>,
    ) -> Result<(), KubeError> {
        // With the resourceVersion: a concurrent change makes this fail and the reconcile retry.
        let patch = json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": lsj.metadata.resource_version,
        }});
        self.api()
            .patch(
                &lsj.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(drop)
            .map_err(KubeError::api(format!(
                "update the finalizers of {}",
                lsj.name_any()
            )))
    }

    /// The job's record as its status keeps it, to adopt it.
    fn record_from_status(
        &self,
        lsj: &LockstepJob,
        id: &str,
        config_text: String,
        workdir: std::path::PathBuf,
    ) -> Result<JobRecord, String> {
        let st = lsj.status.clone().unwrap_or_default();
        let c = lsj.spec.config.get()?;
        let phase = match st.phase.as_deref() {
            // Resumed after a suspend: queued for its next attempt.
            Some("suspended") | None => Phase::Queued,
            // Anything else (edited by hand): queued, so it restarts from its checkpoint.
            Some(p) => Phase::parse(p).unwrap_or(Phase::Queued),
        };
        let created = lsj
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_millisecond());
        let mut r = JobRecord::new(id.to_string(), c, config_text, Vec::new(), workdir);
        r.lifecycle = Lifecycle {
            phase,
            attempt: st.attempt,
            restarts: st.restarts,
            max_restarts: c.job.max_restarts,
            message: st.message.clone().unwrap_or_default(),
        };
        r.step = st.step;
        r.loss = st.loss;
        r.first_loss = st.first_loss;
        r.eval_loss = st.eval_loss;
        r.eval_step = st.eval_step;
        r.last_checkpoint = st.last_committed_checkpoint;
        r.params_hash = st.params_hash.clone().unwrap_or_default();
        r.created_ms = created;
        Ok(r)
    }

    /// [`Controller::refuse`], after deleting what a coordinator before this one left running
    /// of the job (its spec was edited into one that cannot run while no coordinator ran).
    async fn refuse_started(
        &self,
        lsj: &Arc<LockstepJob>,
        id: &str,
        why: String,
    ) -> Result<Action, KubeError> {
        if lsj.status.as_ref().is_some_and(|s| s.attempt > 0) {
            self.launcher.register(id, lsj.clone());
            crate::launcher::Launcher::kill_leftovers(&*self.launcher, id).await;
            self.launcher.unregister(id);
        }
        self.refuse(lsj, why).await
    }

    /// `lsj` with the config its job started with: the `config.toml` of its ConfigMap (made
    /// when its first attempt was, owned by it), if there is one.
    async fn started_config(&self, lsj: &Arc<LockstepJob>) -> Result<Arc<LockstepJob>, KubeError> {
        use k8s_openapi::api::core::v1::ConfigMap;
        let name = lsj.name_any();
        let cm_name = render::config_map_name(&name);
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), &self.settings.namespace)
            .get_opt(&cm_name)
            .await
            .map_err(KubeError::api(format!("read ConfigMap {cm_name}")))?;
        let uid = lsj.metadata.uid.as_deref().unwrap_or("");
        let owned = |cm: &ConfigMap| super::objects::owned_by(&cm.metadata, uid);
        let Some(text) = cm
            .filter(owned)
            .and_then(|cm| cm.data?.get("config.toml").cloned())
        else {
            return Ok(lsj.clone());
        };
        match JobConfig::parse(&text, &[]) {
            Ok(started) => {
                let mut kept = (**lsj).clone();
                if kept.spec.config.get().ok() != Some(&started) {
                    tracing::warn!(lockstepjob = %name,
                        "spec.config differs from the config the job started with; it keeps \
                         the one it started with (create a new LockstepJob to run the new one)");
                }
                kept.spec.config = started.into();
                Ok(Arc::new(kept))
            }
            Err(e) => Err(KubeError::Invalid(format!(
                "ConfigMap {cm_name}: the config the job started with does not parse: {e}"
            ))),
        }
    }

    /// A LockstepJob that cannot run: failed, saying why.
    async fn refuse(&self, lsj: &LockstepJob, why: String) -> Result<Action, KubeError> {
        let mut st = lsj.status.clone().unwrap_or_default();
        let failed = Phase::Failed.as_str();
        if st.phase.as_deref() != Some(failed) || st.message.as_deref() != Some(why.as_str()) {
            st.phase = Some(failed.into());
            st.message = Some(why.clone());
            st.observed_generation = lsj.metadata.generation;
            st.set_condition("Failed", true, "InvalidSpec", &why, &now_rfc3339());
            self.patch_status(&lsj.name_any(), &st)
                .await
                .map_err(KubeError::api(format!(
                    "write the status of {}",
                    lsj.name_any()
                )))?;
        }
        Ok(Action::await_change())
    }
}

/// One LockstepJob: run it, keep its status, clean up after it.
async fn reconcile(lsj: Arc<LockstepJob>, ctl: Arc<Controller>) -> Result<Action, KubeError> {
    let name = lsj.name_any();
    let ns = ctl.settings.namespace.clone();
    let id = match job_id(&lsj) {
        Ok(id) => Some(id),
        Err(e) if lsj.metadata.deletion_timestamp.is_none() => return ctl.refuse(&lsj, e).await,
        Err(_) => None,
    };
    let has_finalizer = lsj.finalizers().iter().any(|f| f == FINALIZER);

    // Deleted: stop the gang (it checkpoints), delete what was made for it, let it go.
    if lsj.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        if let Some(id) = &id
            && let Ok(r) = ctl.coordinator.get(id)
            && !r.phase().is_final()
        {
            tracing::info!(lockstepjob = %name, job = %id, "deleted: stopping its gang");
            let _ = ctl.coordinator.cancel(id);
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        let uid = lsj.metadata.uid.clone().unwrap_or_default();
        KubeLauncher::delete_all(&ctl.client, &ns, &name, &uid).await?;
        if let Some(id) = &id {
            ctl.coordinator.forget(id);
            ctl.launcher.unregister(id);
            lock(&ctl.jobs).remove(id);
        }
        let rest: Vec<String> = lsj
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        ctl.set_finalizers(&lsj, rest).await?;
        tracing::info!(lockstepjob = %name, "deleted; its objects are gone");
        return Ok(Action::await_change());
    }
    let Some(id) = id else {
        return Ok(Action::await_change());
    };
    {
        let mut jobs = lock(&ctl.jobs);
        let w = jobs.entry(id.clone()).or_default();
        w.generation = lsj.metadata.generation;
        w.suspend = lsj.spec.suspend;
    }
    let status = lsj.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref();
    match ctl.coordinator.get(&id) {
        Ok(record) => {
            // A started job keeps the config it started with, whatever the spec says now.
            if render::config_toml(&lsj).ok().as_deref() != Some(record.config_text.as_str()) {
                let first = {
                    let mut jobs = lock(&ctl.jobs);
                    let w = jobs.entry(id.clone()).or_default();
                    let seen = w.config_warned == lsj.metadata.generation;
                    w.config_warned = lsj.metadata.generation;
                    !seen
                };
                if first {
                    tracing::warn!(lockstepjob = %name,
                        "spec.config changed after the job started; the job keeps the config \
                         it started with (create a new LockstepJob to run the new one)");
                }
            }
            // Pod settings (image, resources…) may change: the next attempt uses them, with
            // the config the job started with. Ones that cannot work are ignored, with a word.
            match lsj.spec.check() {
                Ok(()) => {
                    if let Ok(started) = JobConfig::parse(&record.config_text, &record.overrides) {
                        let mut kept = (*lsj).clone();
                        kept.spec.config = started.into();
                        ctl.launcher.register(&id, Arc::new(kept));
                    }
                }
                Err(e) => {
                    tracing::warn!(lockstepjob = %name, error = %e,
                        "the edited spec cannot work; the job keeps its previous pod settings");
                }
            }
            if lsj.spec.suspend && !record.phase().is_final() {
                tracing::info!(lockstepjob = %name, "suspended: checkpointing and stopping its gang");
                let _ = ctl.coordinator.cancel(&id);
            } else if !lsj.spec.suspend
                && record.phase() == Phase::Cancelled
                && phase == Some("suspended")
            {
                // Resumed: a new attempt from the checkpoint it stopped at.
                let started = JobConfig::parse(&record.config_text, &record.overrides)
                    .map_err(|e| KubeError::Invalid(format!("resume {name}: {e}")))?;
                let mut kept = (*lsj).clone();
                kept.spec.config = started.into();
                ctl.coordinator.forget(&id);
                let mut r = record;
                r.lifecycle.phase = Phase::Queued;
                r.lifecycle.message = "resumed after a suspend".into();
                ctl.launcher.register(&id, Arc::new(kept));
                ctl.coordinator
                    .adopt(r)
                    .await
                    .map_err(|e| KubeError::Invalid(format!("resume {name}: {e}")))?;
            }
            ctl.start_sync(&name, &id, status);
        }
        Err(_) => {
            let finished = phase.and_then(Phase::parse).is_some_and(Phase::is_final);
            if finished {
                return Ok(Action::await_change());
            }
            // A job a coordinator before this one started keeps the config it started with:
            // the one in its ConfigMap, whatever spec.config says now.
            let lsj = if status.attempt > 0 {
                ctl.started_config(&lsj).await?
            } else {
                lsj
            };
            // What the LockstepJob asks must be runnable before anything starts.
            if let Err(e) = lsj
                .spec
                .config
                .get()
                .and_then(|c| c.validate().map_err(|e| format!("spec.config: {e}")))
            {
                return ctl.refuse_started(&lsj, &id, e).await;
            }
            if let Err(e) = lsj.spec.check() {
                return ctl.refuse_started(&lsj, &id, e).await;
            }
            let workdir = workdir_of(&lsj);
            if let Err(e) = crate::launcher::Launcher::preflight(
                &*ctl.launcher,
                lsj.spec.config.get().map_err(KubeError::Invalid)?,
                &workdir,
            )
            .await
            {
                // Messages name the config field (`checkpoint.url`) or the spec's.
                let e = if e.0.starts_with("spec.") {
                    e.0
                } else {
                    format!("spec.config: {e}")
                };
                return ctl.refuse_started(&lsj, &id, e).await;
            }
            let config_text = match render::config_toml(&lsj) {
                Ok(t) => t,
                Err(e) => return ctl.refuse_started(&lsj, &id, e).await,
            };
            {
                let mut jobs = lock(&ctl.jobs);
                let w = jobs.entry(id.clone()).or_default();
                w.generation = lsj.metadata.generation;
                w.suspend = lsj.spec.suspend;
            }

            if lsj.spec.suspend {
                if phase != Some("suspended") {
                    let mut st = status.clone();
                    st.phase = Some("suspended".into());
                    st.observed_generation = lsj.metadata.generation;
                    st.set_condition(
                        "Running",
                        false,
                        "Suspended",
                        "spec.suspend is true",
                        &now_rfc3339(),
                    );
                    ctl.patch_status(&name, &st)
                        .await
                        .map_err(KubeError::api(format!("write the status of {name}")))?;
                }
                return Ok(Action::await_change());
            }
            // Before anything is made for it: the finalizer that cleans up after it (a
            // refused or suspended job made nothing and needs none).
            if !has_finalizer {
                let mut all = lsj.finalizers().to_vec();
                all.push(FINALIZER.into());
                ctl.set_finalizers(&lsj, all).await?;
                return Ok(Action::await_change());
            }
            ctl.launcher.register(&id, lsj.clone());
            let r = if status.attempt == 0 {
                tracing::info!(lockstepjob = %name, job = %id, "new job");
                ctl.coordinator
                    .submit_as(Some(id.clone()), config_text, Vec::new(), workdir)
                    .await
            } else {
                // A coordinator before this one ran it: adopt it from its status.
                let record = ctl
                    .record_from_status(&lsj, &id, config_text, workdir)
                    .map_err(KubeError::Invalid)?;
                ctl.coordinator.adopt(record).await
            };
            match r {
                Ok(_) => ctl.start_sync(&name, &id, status),
                Err(
                    e @ (crate::Error::InvalidArgument(_)
                    | crate::Error::Refused(_)
                    | crate::Error::Config(_)),
                ) => {
                    ctl.launcher.unregister(&id);
                    return ctl.refuse(&lsj, e.to_string()).await;
                }
                Err(e) => {
                    ctl.launcher.unregister(&id);
                    return Err(KubeError::Invalid(format!("start {name}: {e}")));
                }
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy(lsj: Arc<LockstepJob>, error: &KubeError, _ctl: Arc<Controller>) -> Action {
    tracing::warn!(lockstepjob = %lsj.name_any(), %error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

/// The status a job record means (conditions keep their transition times while unchanged).
pub fn fill_status(
    st: &mut LockstepJobStatus,
    r: &JobRecord,
    generation: Option<i64>,
    suspend: bool,
    export_version: Option<String>,
    now: &str,
) {
    let phase = r.phase();
    let suspended = suspend && phase == Phase::Cancelled;
    st.phase = Some(
        if suspended {
            "suspended"
        } else {
            phase.as_str()
        }
        .into(),
    );
    st.job_id = Some(r.id.clone());
    st.attempt = r.lifecycle.attempt;
    st.restarts = r.lifecycle.restarts;
    st.message = (!r.lifecycle.message.is_empty()).then(|| r.lifecycle.message.clone());
    st.step = r.step;
    st.total_steps = r.total_steps;
    st.loss = r.loss;
    st.first_loss = r.first_loss;
    st.eval_loss = r.eval_loss;
    st.eval_step = r.eval_step;
    st.last_committed_checkpoint = r.last_checkpoint;
    st.checkpoint_url = Some(r.checkpoint_url.clone());
    st.params_hash = (!r.params_hash.is_empty()).then(|| r.params_hash.clone());
    if export_version.is_some() {
        st.export_version = export_version;
    }
    st.observed_generation = generation;
    let msg = r.lifecycle.message.as_str();
    let attempt = format!("attempt {}", r.lifecycle.attempt);
    // Training is over and succeeded (whatever the export does next).
    let trained = |st: &mut LockstepJobStatus| {
        st.set_condition("Running", false, "Trained", "", now);
        st.set_condition("Restarting", false, "Trained", "", now);
        let steps = format!("trained {} steps", r.step);
        st.set_condition("Succeeded", true, "Trained", &steps, now);
    };
    match phase {
        Phase::Queued => st.set_condition("Admitted", false, "Queued", "waiting to launch", now),
        Phase::Admitting => {
            st.set_condition(
                "Admitted",
                true,
                "GangCreated",
                &format!("{attempt}: pods created; waiting for all to join"),
                now,
            );
            st.set_condition("Running", false, "GangForming", &attempt, now);
        }
        Phase::Running => {
            st.set_condition("Admitted", true, "GangCreated", &attempt, now);
            st.set_condition(
                "Running",
                true,
                "AllJoined",
                &format!("{attempt}: every rank joined"),
                now,
            );
            st.set_condition("Restarting", false, "Running", "", now);
        }
        Phase::Restarting => {
            st.set_condition("Running", false, "GangLost", msg, now);
            st.set_condition("Restarting", true, "GangRestart", msg, now);
        }
        Phase::Exporting => {
            trained(st);
            st.set_condition("Exported", false, "Exporting", "the export Job runs", now);
        }
        Phase::Succeeded => {
            trained(st);
        }
        Phase::Exported => {
            trained(st);
            let reason = if msg.contains("promoted") && !msg.contains("not promoted") {
                "Promoted"
            } else {
                "Kept"
            };
            st.set_condition("Exported", true, reason, msg, now);
        }
        Phase::Failed => {
            st.set_condition("Running", false, "Failed", "", now);
            st.set_condition("Restarting", false, "Failed", "", now);
            st.set_condition("Failed", true, "JobFailed", msg, now);
        }
        Phase::Cancelled => {
            st.set_condition(
                "Running",
                false,
                if suspended { "Suspended" } else { "Cancelled" },
                msg,
                now,
            );
            st.set_condition("Restarting", false, "Stopped", "", now);
        }
    }
}
