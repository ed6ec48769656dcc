//! The export of a finished job as its own Kubernetes Job: started with the job's pod
//! settings, its result read back from the export pod's termination message, the Job deleted
//! if the export is cancelled, and on promotion the serving Deployment rolled (annotated with
//! the version).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use super::launcher::KubeLauncher;
use super::render;
use super::{LABEL_JOB, LABEL_ROLE, ROLLOUT_ANNOTATION};
use crate::launcher::ExportSpec;
use crate::registry::lock;

/// How often a running export Job is looked at.
const EXPORT_POLL: Duration = Duration::from_secs(2);

impl KubeLauncher {
    /// Runs `spec`'s export Job to its end; returns what happened, in words.
    pub(super) async fn run_export(&self, spec: &ExportSpec) -> Result<String, String> {
        let lsj = KubeLauncher::lsj(&spec.job_id, &spec.placement)?;
        let (name, ns) = render::name_of(lsj)?;
        // The export pod reads the webhook URL from the user's Secret: a missing one would
        // leave it waiting for hours; say so now (the trained checkpoint stays committed).
        if let Some(w) = &lsj.spec.export_webhook_secret {
            super::objects::check_webhook_secret(&self.client, ns, w)
                .await
                .map_err(|e| e.to_string())??;
        }
        let job = render::export_job(lsj, spec)?;
        super::objects::apply(&self.client, ns, &job)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(job = %spec.job_id, export = %render::export_name(name), "started the export Job");
        // A cancel drops this future: the export Job goes with it.
        let guard = DeleteOnDrop {
            client: Some(self.client.clone()),
            ns: ns.to_string(),
            object: render::export_name(name),
        };
        let result = loop {
            if let Some(v) = self.export_result(ns, name).await? {
                break v;
            }
            tokio::time::sleep(EXPORT_POLL).await;
        };
        guard.keep();
        let version = result["version"].as_str().unwrap_or("?").to_string();
        let url = result["url"].as_str().unwrap_or("?").to_string();
        let mut note = format!(
            "exported {version} to {url}; {}",
            result["note"].as_str().unwrap_or("")
        );
        lock(&self.exported).insert(spec.job_id.clone(), version.clone());
        let rollout = lsj
            .spec
            .config
            .get()?
            .export
            .as_ref()
            .and_then(|e| e.rollout.clone());
        if result["promoted"].as_bool() == Some(true)
            && let Some(d) = rollout
        {
            self.roll_out(ns, &d, &version, &url).await?;
            note.push_str(&format!("; Deployment {d} rolls to it"));
        }
        Ok(note)
    }

    /// Reads the export Job's result; `Ok(None)` while it runs.
    async fn export_result(&self, ns: &str, name: &str) -> Result<Option<Value>, String> {
        let object = render::export_name(name);
        let job = Api::<Job>::namespaced(self.client.clone(), ns)
            .get(&object)
            .await
            .map_err(|e| format!("read Job {ns}/{object}: {e}"))?;
        let conds = job.status.and_then(|s| s.conditions).unwrap_or_default();
        let done = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name},{LABEL_ROLE}=export")))
            .await
            .map_err(|e| format!("list the export pods: {e}"))?;
        let message = |p: &Pod| -> Option<String> {
            let cs = p.status.as_ref()?.container_statuses.as_ref()?;
            let t = cs
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.as_ref())?;
            t.message.clone()
        };
        if done("Complete") {
            for p in &pods.items {
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
                    && let Some(m) = message(p)
                    && let Some(line) = m.lines().rev().find(|l| l.starts_with('{'))
                {
                    return serde_json::from_str(line)
                        .map(Some)
                        .map_err(|e| format!("the export pod's result is not JSON ({e}): {line}"));
                }
            }
            return Err(format!(
                "Job {ns}/{object} completed but no pod left its result"
            ));
        }
        if done("Failed") {
            let why = pods
                .items
                .iter()
                .rev()
                .filter_map(message)
                .find_map(|m| {
                    m.lines()
                        .rev()
                        .find_map(|l| l.strip_prefix("error: "))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "its pods failed".into());
            return Err(format!("export Job {ns}/{object} failed: {why}"));
        }
        Ok(None)
    }

    async fn roll_out(
        &self,
        ns: &str,
        deployment: &str,
        version: &str,
        url: &str,
    ) -> Result<(), String> {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            ROLLOUT_ANNOTATION: version,
            "lockstep.dev/model-url": url,
        }}}}});
        Api::<Deployment>::namespaced(self.client.clone(), ns)
            .patch(
                deployment,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .map(drop)
            .map_err(|e| format!("roll Deployment {ns}/{deployment} to {version}: {e}"))
    }
}

/// Deletes the export Job when dropped unless [`DeleteOnDrop::keep`] was called.
struct DeleteOnDrop {
    client: Option<Client>,
    ns: String,
    object: String,
}

impl DeleteOnDrop {
    fn keep(mut self) {
        self.client = None;
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let (ns, object) = (
                std::mem::take(&mut self.ns),
                std::mem::take(&mut self.object),
            );
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = Api::<Job>::namespaced(client, &ns)
                        .delete(&object, &DeleteParams::background())
                        .await;
                });
            }
        }
    }
}
