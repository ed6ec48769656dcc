//! The LockstepJob controller (`kube_runtime::Controller`): each LockstepJob becomes a job of
//! this coordinator (id derived from its uid), launched through [`KubeLauncher`]; the job's
//! record is written back to the LockstepJob's status as it changes. The status is the job's
//! durable record: a coordinator that restarts adopts every live LockstepJob from it and
//! restarts its gang from the last committed checkpoint.
//!
//! Each reconcile observes (the coordinator's record, the ConfigMap of a job started before),
//! [decides](super::decide) in pure code, and applies the steps. The finalizer
//! (`kube::runtime::finalizer`) stops the gang and deletes what was made for a LockstepJob
//! before it goes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller as Runtime};
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::crd::LockstepJob;
use super::decide::{self, Observed, Step, decide, job_id, workdir_of};
use super::launcher::KubeLauncher;
use super::status::{StatusWriter, now_rfc3339};
use super::{FINALIZER, KubeError, render};
use crate::Coordinator;
use crate::launcher::{Launcher, Placement};

/// How long a deletion waits for the job's gang to checkpoint and stop before it looks again.
const STOP_WAIT: Duration = Duration::from_secs(10);

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
    /// The one writer of the statuses, and what it remembers of each job.
    status: Arc<StatusWriter>,
}

type ReconcileError = finalizer::Error<KubeError>;

impl Controller {
    /// A controller of `settings.namespace`'s LockstepJobs running them on `coordinator`,
    /// whose launcher is `launcher`.
    pub fn new(
        client: Client,
        coordinator: Coordinator,
        launcher: Arc<KubeLauncher>,
        settings: ControllerSettings,
    ) -> Arc<Controller> {
        let api = Api::namespaced(client.clone(), &settings.namespace);
        let status = StatusWriter::new(api, coordinator.clone(), launcher.clone());
        Arc::new(Controller {
            client,
            coordinator,
            launcher,
            settings,
            status,
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

    /// The `config.toml` of the LockstepJob's own ConfigMap (made with its first attempt).
    async fn started_config(&self, lsj: &LockstepJob) -> Result<Option<String>, KubeError> {
        let cm_name = render::config_map_name(&lsj.name_any());
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), &self.settings.namespace)
            .get_opt(&cm_name)
            .await
            .map_err(KubeError::api(format!("read ConfigMap {cm_name}")))?;
        let uid = lsj.metadata.uid.as_deref().unwrap_or("");
        Ok(cm
            .filter(|cm| super::objects::owned_by(&cm.metadata, uid))
            .and_then(|cm| cm.data?.get("config.toml").cloned()))
    }

    /// Observe, decide, apply.
    async fn apply(self: &Arc<Self>, lsj: Arc<LockstepJob>) -> Result<Action, KubeError> {
        let id = job_id(&lsj).ok();
        let record = id.as_ref().and_then(|id| self.coordinator.get(id).ok());
        let started_before = lsj.status.as_ref().is_some_and(|s| s.attempt > 0);
        let started_config = if record.is_none() && started_before {
            self.started_config(&lsj).await?
        } else {
            None
        };
        let w = id
            .as_ref()
            .map(|id| {
                self.status.update(id, |w| {
                    w.generation = lsj.metadata.generation;
                    w.suspend = lsj.spec.suspend;
                })
            })
            .unwrap_or_default();
        let seen = Observed {
            record,
            started_config,
            config_warned: w.config_warned,
            pod_settings_warned: w.pod_settings_warned,
            suspending: w.suspending,
            now: now_rfc3339(),
        };
        let mut steps: VecDeque<Step> = decide(&lsj, &seen).into();
        while let Some(step) = steps.pop_front() {
            if let Err(why) = self.apply_step(&lsj, step).await? {
                // Refused where it was to start: nothing of it runs; say why.
                let leftovers = started_before.then(|| id.clone()).flatten();
                steps = decide::refuse(&lsj, leftovers, why, &seen.now).into();
            }
        }
        Ok(Action::requeue(Duration::from_secs(300)))
    }

    /// Carries out one step; `Ok(Err(why))`: the job is refused.
    async fn apply_step(
        self: &Arc<Self>,
        lsj: &Arc<LockstepJob>,
        step: Step,
    ) -> Result<Result<(), String>, KubeError> {
        let name = lsj.name_any();
        match step {
            Step::WriteStatus(st) => self.status.write(&name, &st).await?,
            Step::KillLeftovers { id } => {
                let placement = Placement::Pods(lsj.clone());
                self.launcher.kill_leftovers(&id, &placement).await;
            }
            Step::WarnConfigChanged { generation } => {
                self.status.update(&job_id(lsj).unwrap_or_default(), |w| {
                    w.config_warned = generation
                });
                tracing::warn!(lockstepjob = %name,
                    "spec.config changed after the job started; the job keeps the config it \
                     started with (create a new LockstepJob to run the new one)");
            }
            Step::WarnPodSettings { generation, error } => {
                self.status.update(&job_id(lsj).unwrap_or_default(), |w| {
                    w.pod_settings_warned = generation
                });
                tracing::warn!(lockstepjob = %name, %error,
                    "the edited spec cannot work; the job keeps its previous pod settings");
            }
            Step::UsePodSettings { id, lsj } => {
                let _ = self.coordinator.set_placement(&id, Placement::Pods(lsj));
            }
            Step::Suspend { id } => {
                tracing::info!(lockstepjob = %name, "suspended: checkpointing and stopping its gang");
                self.status.update(&id, |w| w.suspending = true);
                let _ = self.coordinator.cancel(&id);
            }
            Step::Sync { id } => {
                self.status
                    .start_sync(&name, &id, lsj.status.clone().unwrap_or_default())
            }
            Step::Submit {
                id,
                config_text,
                workdir,
                lsj,
            } => {
                if let Err(why) = self.preflight(&lsj, true).await? {
                    return Ok(Err(why));
                }
                tracing::info!(lockstepjob = %name, job = %id, "new job");
                let placement = Placement::Pods(lsj.clone());
                let r = self
                    .coordinator
                    .submit_as(
                        Some(id.clone()),
                        config_text,
                        Vec::new(),
                        workdir,
                        placement,
                    )
                    .await;
                return self.started(&lsj, &id, r.map(drop));
            }
            Step::Adopt {
                record,
                lsj,
                forget,
            } => {
                let id = record.id.clone();
                if let Err(why) = self.preflight(&lsj, false).await? {
                    return Ok(Err(why));
                }
                if forget {
                    self.coordinator.forget(&id);
                    self.status.update(&id, |w| w.suspending = false);
                }
                let placement = Placement::Pods(lsj.clone());
                let r = self.coordinator.adopt(*record, placement).await;
                return self.started(&lsj, &id, r.map(drop));
            }
        }
        Ok(Ok(()))
    }

    /// The launcher's checks of where the job's inputs are, and (for a `new` job; the export
    /// checks it again before it runs) the Secret the export's webhook URL is in;
    /// `Ok(Err(why))` when they fail.
    async fn preflight(
        &self,
        lsj: &LockstepJob,
        new: bool,
    ) -> Result<Result<(), String>, KubeError> {
        if let Some(w) = &lsj.spec.export_webhook_secret
            && new
            && let Err(why) =
                super::objects::check_webhook_secret(&self.client, &self.settings.namespace, w)
                    .await?
        {
            return Ok(Err(why));
        }
        let config = lsj.spec.config.get().map_err(KubeError::Invalid)?;
        match self.launcher.preflight(config, &workdir_of(lsj)).await {
            Ok(()) => {}
            // Messages name the config field (`checkpoint.url`) or the spec's.
            Err(e) if e.0.starts_with("spec.") => return Ok(Err(e.0)),
            Err(e) => return Ok(Err(format!("spec.config: {e}"))),
        }
        Ok(fits_pod_memory(lsj, config, &workdir_of(lsj)).await)
    }

    /// After a submit or adopt: keep its status, or say why it cannot run.
    fn started(
        self: &Arc<Self>,
        lsj: &LockstepJob,
        id: &str,
        r: crate::Result<()>,
    ) -> Result<Result<(), String>, KubeError> {
        let name = lsj.name_any();
        match r {
            Ok(()) => {
                self.status
                    .start_sync(&name, id, lsj.status.clone().unwrap_or_default());
                Ok(Ok(()))
            }
            Err(
                e @ (crate::Error::InvalidArgument(_)
                | crate::Error::Refused(_)
                | crate::Error::Config(_)),
            ) => Ok(Err(e.to_string())),
            Err(e) => Err(KubeError::Invalid(format!("start {name}: {e}"))),
        }
    }

    /// Deleted: stop the gang (it checkpoints), delete what was made for it, forget it.
    async fn cleanup(&self, lsj: Arc<LockstepJob>) -> Result<Action, KubeError> {
        let name = lsj.name_any();
        let id = job_id(&lsj).ok();
        if let Some(id) = &id
            && let Ok(r) = self.coordinator.get(id)
            && !r.phase().is_final()
        {
            tracing::info!(lockstepjob = %name, job = %id, "deleted: stopping its gang");
            let _ = self.coordinator.cancel(id);
            if let Ok(mut changed) = self.coordinator.subscribe(id) {
                let stopped = async {
                    while self
                        .coordinator
                        .get(id)
                        .is_ok_and(|r| !r.phase().is_final())
                    {
                        if changed.changed().await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(STOP_WAIT, stopped).await;
            }
            if self
                .coordinator
                .get(id)
                .is_ok_and(|r| !r.phase().is_final())
            {
                return Err(KubeError::Stopping(name));
            }
        }
        let uid = lsj.metadata.uid.clone().unwrap_or_default();
        super::objects::delete_all(&self.client, &self.settings.namespace, &name, &uid).await?;
        if let Some(id) = &id {
            self.coordinator.forget(id);
            self.launcher.forget(id);
            self.status.forget(id);
        }
        tracing::info!(lockstepjob = %name, "deleted; its objects are gone");
        Ok(Action::await_change())
    }
}

/// One LockstepJob: run it, keep its status, clean up after it.
async fn reconcile(lsj: Arc<LockstepJob>, ctl: Arc<Controller>) -> Result<Action, ReconcileError> {
    finalizer(&ctl.api(), FINALIZER, lsj, |event| async {
        match event {
            Event::Apply(lsj) => ctl.apply(lsj).await,
            Event::Cleanup(lsj) => ctl.cleanup(lsj).await,
        }
    })
    .await
}

fn error_policy(lsj: Arc<LockstepJob>, error: &ReconcileError, _ctl: Arc<Controller>) -> Action {
    if let finalizer::Error::CleanupFailed(KubeError::Stopping(_)) = error {
        return Action::requeue(Duration::from_secs(2));
    }
    tracing::warn!(lockstepjob = %lsj.name_any(), %error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

/// A CPU job's rank must fit its pod's memory limit (`spec.resources.memory`): checked before
/// anything is created, so a job that cannot fit fails at once, naming the figures, instead of
/// being OOM-killed and restarted. (GPU pods: the device's memory is not known here.)
async fn fits_pod_memory(
    lsj: &LockstepJob,
    config: &lockstep_api::JobConfig,
    workdir: &std::path::Path,
) -> Result<(), String> {
    use lockstep_api::memory::{MemoryPlan, Target, parse_size};
    let r = &lsj.spec.resources;
    let Some(limit) = &r.memory else {
        return Ok(());
    };
    if r.gpu.is_some_and(|g| g > 0) {
        return Ok(());
    }
    // A quantity this cannot read (milli-bytes, `500m`) is left to Kubernetes to judge.
    let limit = match parse_size(limit) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("spec.resources.memory: {e}; the job's memory is not checked");
            return Ok(());
        }
    };
    let deadline = tokio::time::Instant::now() + crate::preflight::LIMIT;
    // A model directory is sized by its config.json; one that cannot be read now is not
    // judged by `[model]` (which it ignores): the workers say what is wrong with it.
    let sized = match crate::preflight::base_architecture(config, workdir, deadline).await {
        Ok(Some(sized)) => sized,
        Ok(None) => config.clone(),
        Err(e) if e.unread => {
            tracing::warn!("{}; the job's memory is not checked", e.why);
            return Ok(());
        }
        Err(e) => return Err(format!("spec.config: {}", e.why)),
    };
    let plan = MemoryPlan::of(&sized, Target::Cpu);
    match plan.refusal(&sized, limit, "spec.resources.memory") {
        None => Ok(()),
        Some(why) => Err(format!(
            "spec.resources.memory: {why} (`lockstep plan` shows the figures)"
        )),
    }
}
