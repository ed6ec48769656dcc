//! A LockstepJob's status: what a job's record means (phase, figures and conditions, computed
//! in pure code: [`fill_status`]) and the controller's one writer of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::KubeError;
use super::crd::{JobPhase, LockstepJob, LockstepJobStatus};
use super::exits::Waiting;
use super::launcher::KubeLauncher;
use crate::Coordinator;
use crate::record::JobRecord;
use crate::registry::lock;
use crate::state::Phase;

/// RFC 3339 UTC of now, to the second.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// What the controller remembers of a job from the newest LockstepJob seen (the status writer
/// reads it).
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// The spec generation last seen.
    pub generation: Option<i64>,
    /// The generation whose changed `spec.config` was last warned about.
    pub config_warned: Option<i64>,
    /// The generation whose unusable pod settings were last warned about.
    pub pod_settings_warned: Option<i64>,
    /// `spec.suspend` as last seen.
    pub suspend: bool,
    /// Stopped by the controller for a suspend (until resumed).
    pub suspending: bool,
    /// A writer task keeps its status.
    syncing: bool,
}

/// The one writer of LockstepJob statuses: a task per live job writes its record as it
/// changes; the controller writes a refusal or a suspension through [`StatusWriter::write`].
pub struct StatusWriter {
    api: Api<LockstepJob>,
    coordinator: Coordinator,
    launcher: Arc<KubeLauncher>,
    jobs: Mutex<HashMap<String, Watched>>,
}

impl StatusWriter {
    /// A writer through `api` of the jobs `coordinator` runs on `launcher`.
    pub fn new(
        api: Api<LockstepJob>,
        coordinator: Coordinator,
        launcher: Arc<KubeLauncher>,
    ) -> Arc<StatusWriter> {
        Arc::new(StatusWriter {
            api,
            coordinator,
            launcher,
            jobs: Mutex::default(),
        })
    }

    /// Changes what is remembered of job `id`; returns it as changed.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Watched)) -> Watched {
        let mut jobs = lock(&self.jobs);
        let w = jobs.entry(id.to_string()).or_default();
        f(w);
        w.clone()
    }

    /// Forgets job `id` (its LockstepJob is gone).
    pub fn forget(&self, id: &str) {
        lock(&self.jobs).remove(id);
    }

    /// Writes LockstepJob `name`'s status.
    pub async fn write(&self, name: &str, status: &LockstepJobStatus) -> Result<(), KubeError> {
        self.api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map(drop)
            .map_err(KubeError::api(format!("write the status of {name}")))
    }

    /// Keeps job `id`'s record in LockstepJob `name`'s status: writes it whenever it changes
    /// (at most once a second), until the job is final (and written) or the LockstepJob is
    /// gone. One task per job.
    pub fn start_sync(self: &Arc<Self>, name: &str, id: &str, mut status: LockstepJobStatus) {
        let mut first = false;
        self.update(id, |w| first = !std::mem::replace(&mut w.syncing, true));
        if !first {
            return;
        }
        let (this, name, id) = (self.clone(), name.to_string(), id.to_string());
        tokio::spawn(async move {
            let Ok(mut changed) = this.coordinator.subscribe(&id) else {
                this.update(&id, |w| w.syncing = false);
                return;
            };
            // (A receiver sees a change made while its task slept.)
            let mut pods = this.launcher.pods_changed.subscribe();
            while let Ok(record) = this.coordinator.get(&id) {
                let w = this.update(&id, |_| {});
                let before = status.clone();
                let waiting = this.launcher.waiting(&id);
                let seen = Seen {
                    generation: w.generation,
                    suspend: w.suspend || w.suspending,
                    export_version: this.launcher.exported_version(&id),
                    waiting: waiting.as_ref(),
                };
                fill_status(&mut status, &record, &seen, &now_rfc3339());
                if status != before {
                    match this.write(&name, &status).await {
                        Ok(()) => {}
                        Err(e) if e.code() == Some(404) => break,
                        Err(e) => {
                            tracing::warn!(lockstepjob = %name, error = %e, "retrying");
                            status = before;
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                    }
                }
                if record.phase().is_final() {
                    break;
                }
                // At most one write a second; at least a look every 30 s.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let either = async {
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = pods.changed() => {}
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), either).await;
            }
            this.update(&id, |w| w.syncing = false);
        });
    }
}

/// What the status shows beside the job's record.
#[derive(Debug, Clone, Default)]
pub struct Seen<'a> {
    /// The spec generation it describes.
    pub generation: Option<i64>,
    /// `spec.suspend`: a cancelled job shows `suspended`.
    pub suspend: bool,
    /// The version the job's export produced, once it did.
    pub export_version: Option<String>,
    /// A pod of the newest attempt stuck waiting, or the gang waiting in a queue.
    pub waiting: Option<&'a Waiting>,
}

/// The status a job record means (conditions keep their transition times while unchanged).
pub fn fill_status(st: &mut LockstepJobStatus, r: &JobRecord, seen: &Seen<'_>, now: &str) {
    let phase = r.phase();
    let suspended = seen.suspend && phase == Phase::Cancelled;
    st.phase = Some(if suspended {
        JobPhase::Suspended
    } else {
        phase.into()
    });
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
    if seen.export_version.is_some() {
        st.export_version.clone_from(&seen.export_version);
    }
    st.observed_generation = seen.generation;
    let skip = r
        .recoveries
        .len()
        .saturating_sub(super::crd::MAX_RECOVERIES_SHOWN);
    st.recoveries = r.recoveries[skip..]
        .iter()
        .map(|x| super::crd::RecoveryStatus {
            rank: x.rank,
            cause: x.cause.clone(),
            path: x.path.clone(),
            step: x.step,
            steps_lost: x.steps_lost,
            seconds: x.seconds,
        })
        .collect();
    // A pod stuck waiting (or a gang Kueue holds back) while the gang forms or runs.
    match seen
        .waiting
        .filter(|_| matches!(phase, Phase::Admitting | Phase::Running))
    {
        Some(w) => st.set_condition("Waiting", true, &w.reason, &w.message, now),
        None if st.condition("Waiting").is_some() => {
            st.set_condition("Waiting", false, "NotWaiting", "", now);
        }
        None => {}
    }
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
