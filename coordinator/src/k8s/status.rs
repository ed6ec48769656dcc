//! A LockstepJob's status: what a job's record means (phase, figures and conditions, computed
//! in pure code: [`fill_status`]) and the controller's one writer of it.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::KubeError;
use super::controller::Controller;
use super::crd::{JobPhase, LockstepJobStatus};
use super::exits::Waiting;
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

impl Controller {
    /// The one place a status is written.
    pub(super) async fn write_status(
        &self,
        name: &str,
        status: &LockstepJobStatus,
    ) -> Result<(), KubeError> {
        self.api()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map(drop)
            .map_err(KubeError::api(format!("write the status of {name}")))
    }

    /// The status writer of a live job: writes job `id`'s record into LockstepJob `name`'s
    /// status whenever it changes, until the job is final (and written) or the LockstepJob is
    /// gone. One per job.
    pub(super) fn start_sync(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        mut status: LockstepJobStatus,
    ) {
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
            // (A receiver sees a change made while its task slept.)
            let mut pods = ctl.launcher.pods_changed.subscribe();
            while let Ok(record) = ctl.coordinator.get(&id) {
                let w = lock(&ctl.jobs).get(&id).cloned().unwrap_or_default();
                let before = status.clone();
                let waiting = ctl.launcher.waiting(&id);
                let seen = Seen {
                    generation: w.generation,
                    suspend: w.suspend || w.suspending,
                    export_version: ctl.launcher.exported_version(&id),
                    waiting: waiting.as_ref(),
                };
                fill_status(&mut status, &record, &seen, &now_rfc3339());
                if status != before {
                    match ctl.write_status(&name, &status).await {
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
            ctl.sync_ended(&id);
        });
    }

    fn sync_ended(&self, id: &str) {
        if let Some(w) = lock(&self.jobs).get_mut(id) {
            w.syncing = false;
        }
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
