//! [`KubeLauncher`]: an attempt's gang as Kubernetes objects. Launching worker 0 applies the
//! attempt's objects (server-side apply, so a retry is harmless) and starts a watch on its pods;
//! a pod that terminates becomes that worker's [`Exit`] (its exit code, signal and last
//! `error:` line from the termination message). Killing a worker deletes the attempt's
//! JobSet/Job (its pods go with it). The export runs as its own Job.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::crd::LockstepJob;
use super::render::{self, Flavor, Target};
use super::{
    FIELD_MANAGER, KubeError, LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE, LABEL_UID, ROLLOUT_ANNOTATION,
};
use crate::launcher::{Exit, ExportSpec, LaunchError, Launcher, WorkerHandle, WorkerSpec};
use crate::registry::lock;

/// The annotation Indexed Job (and JobSet) pods carry their index in.
const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
/// How often a running export Job is looked at.
const EXPORT_POLL: Duration = Duration::from_secs(2);

/// JobSet's API resource (no Rust type: it is a CRD).
pub fn jobset_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("jobset.x-k8s.io", "v1alpha2", "JobSet"),
        "jobsets",
    )
}

/// Launches gangs as JobSets or Indexed Jobs.
pub struct KubeLauncher {
    client: Client,
    flavor: Flavor,
    /// The LockstepJob of each job id the controller handed over.
    jobs: Mutex<HashMap<String, Arc<LockstepJob>>>,
    /// Live attempts: (job id, attempt) → their exits.
    attempts: Mutex<HashMap<(String, u32), Arc<AttemptWatch>>>,
    /// The version each job's export produced.
    exported: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for KubeLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLauncher")
            .field("flavor", &self.flavor)
            .finish()
    }
}

impl KubeLauncher {
    /// A launcher making `flavor` gangs through `client`.
    pub fn new(client: Client, flavor: Flavor) -> Arc<KubeLauncher> {
        Arc::new(KubeLauncher {
            client,
            flavor,
            jobs: Mutex::default(),
            attempts: Mutex::default(),
            exported: Mutex::default(),
        })
    }

    /// JobSet where its CRD is served, else Indexed Job.
    pub async fn detect_flavor(client: &Client) -> Flavor {
        match client
            .list_api_group_resources("jobset.x-k8s.io/v1alpha2")
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == "jobsets") => Flavor::JobSet,
            _ => Flavor::IndexedJob,
        }
    }

    /// How gangs are made.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Hands over `job_id`'s LockstepJob (before the coordinator launches anything of it).
    pub fn register(&self, job_id: &str, lsj: Arc<LockstepJob>) {
        lock(&self.jobs).insert(job_id.to_string(), lsj);
    }

    /// Forgets a job (its LockstepJob is gone).
    pub fn unregister(&self, job_id: &str) {
        lock(&self.jobs).remove(job_id);
        lock(&self.exported).remove(job_id);
        lock(&self.attempts).retain(|(j, _), _| j != job_id);
    }

    /// The version `job_id`'s export produced, once it did.
    pub fn exported_version(&self, job_id: &str) -> Option<String> {
        lock(&self.exported).get(job_id).cloned()
    }

    fn lsj(&self, job_id: &str) -> Result<Arc<LockstepJob>, String> {
        lock(&self.jobs)
            .get(job_id)
            .cloned()
            .ok_or_else(|| format!("job {job_id} has no LockstepJob (was it deleted?)"))
    }

    /// The API of the kind of object lockstep makes, in `ns`.
    fn api_of(&self, ns: &str, kind: &str) -> Result<Api<DynamicObject>, KubeError> {
        let resource = match kind {
            "ConfigMap" => ApiResource::erase::<ConfigMap>(&()),
            "Secret" => ApiResource::erase::<Secret>(&()),
            "Service" => ApiResource::erase::<Service>(&()),
            "NetworkPolicy" => ApiResource::erase::<NetworkPolicy>(&()),
            "Job" => ApiResource::erase::<Job>(&()),
            "JobSet" => jobset_resource(),
            other => return Err(KubeError::Invalid(format!("cannot make a {other}"))),
        };
        Ok(Api::namespaced_with(self.client.clone(), ns, &resource))
    }

    async fn apply(&self, ns: &str, object: &Value) -> Result<(), KubeError> {
        let kind = object["kind"].as_str().unwrap_or("");
        let name = object["metadata"]["name"].as_str().unwrap_or("");
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api_of(ns, kind)?
            .patch(name, &pp, &Patch::Apply(object))
            .await
            .map(drop)
            .map_err(KubeError::api(format!("apply {kind} {ns}/{name}")))
    }

    /// Refuses to take over an object of that name that this LockstepJob does not own (a
    /// user's ConfigMap, another job's Secret): applying would overwrite it and deleting the
    /// LockstepJob would delete it.
    async fn check_owner(&self, ns: &str, object: &Value, uid: &str) -> Result<(), KubeError> {
        let kind = object["kind"].as_str().unwrap_or("");
        let name = object["metadata"]["name"].as_str().unwrap_or("");
        let meta = self
            .api_of(ns, kind)?
            .get_metadata_opt(name)
            .await
            .map_err(KubeError::api(format!("read {kind} {ns}/{name}")))?;
        match meta {
            Some(m) if !owned_by(&m.metadata, uid) => Err(KubeError::Invalid(format!(
                "{kind} {ns}/{name} exists and does not belong to this LockstepJob; lockstep \
                 will not overwrite it (rename the LockstepJob, or delete the {kind})"
            ))),
            _ => Ok(()),
        }
    }

    /// Applies the job's objects and `attempt`'s, and starts watching its pods.
    async fn create_attempt(&self, lsj: &LockstepJob, spec: &WorkerSpec) -> Result<(), KubeError> {
        let (name, ns) = render::name_of(lsj).map_err(KubeError::Invalid)?;
        let target = Target {
            job_id: &spec.job_id,
            coordinator_url: &spec.coordinator,
            flavor: self.flavor,
        };
        let mut objects = vec![render::secret(lsj, &spec.token).map_err(KubeError::Invalid)?];
        objects.extend(render::job_objects(lsj).map_err(KubeError::Invalid)?);
        objects.extend(
            render::attempt_objects(lsj, &target, spec.attempt).map_err(KubeError::Invalid)?,
        );
        let uid = lsj.metadata.uid.as_deref().unwrap_or("");
        for o in &objects {
            self.check_owner(ns, o, uid).await?;
            self.apply(ns, o).await?;
        }
        tracing::info!(job = %spec.job_id, lockstepjob = %format!("{ns}/{name}"), attempt = spec.attempt,
            flavor = ?self.flavor, "created the attempt's objects");
        Ok(())
    }

    /// Deletes `attempt`'s JobSet/Job and Service (their pods go with them).
    async fn delete_attempt(
        client: Client,
        flavor: Flavor,
        ns: String,
        name: String,
        attempt: u32,
    ) {
        let object = render::attempt_name(&name, attempt);
        let dp = DeleteParams::background();
        let r = match flavor {
            Flavor::JobSet => {
                Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &jobset_resource())
                    .delete(&object, &dp)
                    .await
                    .map(drop)
            }
            Flavor::IndexedJob => {
                let a = Api::<Job>::namespaced(client.clone(), &ns)
                    .delete(&object, &dp)
                    .await
                    .map(drop);
                let b = Api::<Service>::namespaced(client.clone(), &ns)
                    .delete(&object, &dp)
                    .await
                    .map(drop);
                a.and(b)
            }
        };
        match r {
            Ok(()) => tracing::info!(attempt = %object, "deleted the attempt's objects"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::error!(attempt = %object, error = %e, "cannot delete the attempt's objects")
            }
        }
    }

    /// Deletes everything lockstep made for LockstepJob `name`: every attempt's JobSet, Jobs,
    /// Services, and the per-job ConfigMap, Secret and NetworkPolicy (what owner references
    /// would also remove, where a garbage collector runs).
    pub async fn delete_all(
        client: &Client,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), KubeError> {
        let lp = ListParams::default().labels(&format!("{LABEL_JOB}={name}"));
        let dp = DeleteParams::background();
        macro_rules! sweep {
            ($api:expr, $what:expr) => {{
                let api = $api;
                let list = api
                    .list(&lp)
                    .await
                    .map_err(KubeError::api(format!("list {}", $what)))?;
                // Only what this LockstepJob owns (not a user's object of the same name).
                for o in list
                    .items
                    .into_iter()
                    .filter(|o| owned_by(&o.metadata, uid))
                {
                    let n = o.metadata.name.clone().unwrap_or_default();
                    match api.delete(&n, &dp).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => {
                            return Err(KubeError::Api {
                                what: format!("delete {} {n}", $what),
                                source: e,
                            });
                        }
                    }
                }
            }};
        }
        sweep!(Api::<Job>::namespaced(client.clone(), ns), "jobs");
        if KubeLauncher::detect_flavor(client).await == Flavor::JobSet {
            sweep!(
                Api::<DynamicObject>::namespaced_with(client.clone(), ns, &jobset_resource()),
                "jobsets"
            );
        }
        sweep!(Api::<Service>::namespaced(client.clone(), ns), "services");
        sweep!(
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            "configmaps"
        );
        sweep!(Api::<Secret>::namespaced(client.clone(), ns), "secrets");
        sweep!(
            Api::<NetworkPolicy>::namespaced(client.clone(), ns),
            "networkpolicies"
        );
        Ok(())
    }

    fn watch_attempt(
        &self,
        ns: &str,
        name: &str,
        job_id: &str,
        attempt: u32,
        world: u32,
        uid: Option<&str>,
    ) -> Arc<AttemptWatch> {
        let key = (job_id.to_string(), attempt);
        let mut attempts = lock(&self.attempts);
        if let Some(w) = attempts.get(&key) {
            return w.clone();
        }
        let w = Arc::new(AttemptWatch::new(world));
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let mut selector =
            format!("{LABEL_JOB}={name},{LABEL_ATTEMPT}={attempt},{LABEL_ROLE}=trainer");
        if let Some(uid) = uid {
            selector.push_str(&format!(",{LABEL_UID}={uid}"));
        }
        let cfg = watcher::Config::default().labels(&selector);
        // The task holds the watch weakly: once the attempt's workers and this launcher let
        // go of it, dropping it aborts the task (a gang whose pods never came leaks no watch).
        let (weak, job) = (Arc::downgrade(&w), job_id.to_string());
        let (client, flavor, ns_, name_) = (
            self.client.clone(),
            self.flavor,
            ns.to_string(),
            name.to_string(),
        );
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(pods, cfg));
            while let Some(ev) = events.next().await {
                let Some(watch) = weak.upgrade() else { return };
                match ev {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        if let Some((w, exit)) = pod_exit(&pod, attempt, world, false) {
                            watch.deliver(w, exit);
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some((w, exit)) = pod_exit(&pod, attempt, world, true) {
                            watch.deliver(w, exit);
                        }
                    }
                    Ok(_) => {}
                    // The watcher retries by itself; say why it had to.
                    Err(e) => {
                        tracing::warn!(job = %job, attempt, error = %e, "watching the gang's pods");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                if watch.all_delivered() {
                    break;
                }
            }
            // Every worker ended (failed, stopped or done): the attempt is over for good (a
            // restart is a new attempt), so its objects go. Why it ended is in the job's
            // status.
            let Some(watch) = weak.upgrade() else { return };
            let delete = {
                let mut st = lock(&watch.state);
                !std::mem::replace(&mut st.deleting, true)
            };
            drop(watch);
            if delete {
                KubeLauncher::delete_attempt(client, flavor, ns_, name_, attempt).await;
            }
        });
        *lock(&w.task) = Some(task.abort_handle());
        // Earlier attempts of the job are over: only their workers' handles keep them now.
        attempts.retain(|(j, a), _| j != job_id || *a >= attempt);
        attempts.insert(key, w.clone());
        w
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

/// The exit a pod's state means for its worker, if it ended (or, `deleted`, went away).
fn pod_exit(pod: &Pod, attempt: u32, world: u32, deleted: bool) -> Option<(u32, Exit)> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let index = pod.metadata.annotations.as_ref()?.get(INDEX_ANNOTATION)?;
    let Some(worker) = index.parse::<u32>().ok().filter(|w| *w < world) else {
        tracing::warn!(pod = %pod_name, index = %index, "pod of the gang has an index outside it; ignored");
        return None;
    };
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "trainer"))
        .and_then(|c| c.state.as_ref().and_then(|s| s.terminated.clone()));
    let exit = |code, signal, message| Exit {
        attempt,
        worker,
        code,
        signal,
        message,
    };
    match (phase, terminated) {
        ("Succeeded" | "Failed", Some(t)) => {
            // Runtimes report a signal as exit status 128 + N (and rarely set `signal`); 130
            // and 143 are also the trainer's own "stopped after checkpointing" statuses, so
            // they stay statuses.
            let signal = t.signal.or_else(|| {
                ((129..=192).contains(&t.exit_code) && ![130, 143].contains(&t.exit_code))
                    .then(|| t.exit_code - 128)
            });
            let code = if signal.is_some() {
                None
            } else {
                Some(t.exit_code)
            };
            // A killed trainer said nothing: its log's last line is not a reason.
            let mut message = t
                .message
                .as_deref()
                .and_then(|m| last_words(m, signal.is_none()));
            if t.reason.as_deref() == Some("OOMKilled") {
                message = Some(format!(
                    "pod {pod_name} ran out of memory (OOMKilled): raise spec.resources.memory"
                ));
            }
            Some((worker, exit(code, signal, message)))
        }
        ("Succeeded", None) => Some((worker, exit(Some(0), None, None))),
        ("Failed", None) => {
            let s = status?;
            let why = format!(
                "pod {pod_name} failed: {} {}",
                s.reason.as_deref().unwrap_or(""),
                s.message.as_deref().unwrap_or("")
            );
            Some((worker, exit(None, None, Some(why.trim().to_string()))))
        }
        _ if deleted => Some((
            worker,
            exit(None, Some(9), Some(format!("pod {pod_name} was deleted"))),
        )),
        _ => None,
    }
}

/// A trainer's own last words in its termination message: its last `error: …` line, else (with
/// `any_line`) its last line; at most 2,000 characters.
fn last_words(message: &str, any_line: bool) -> Option<String> {
    let line = message
        .lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .or_else(|| {
            any_line
                .then(|| message.lines().rev().find(|l| !l.trim().is_empty()))
                .flatten()
        })?;
    Some(line.chars().take(2000).collect())
}

/// One attempt's workers and the exits seen for them.
struct AttemptWatch {
    state: Mutex<WatchState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

struct WatchState {
    senders: Vec<Option<mpsc::UnboundedSender<Exit>>>,
    delivered: Vec<bool>,
    pending: BTreeMap<u32, Exit>,
    deleting: bool,
}

impl AttemptWatch {
    fn new(world: u32) -> AttemptWatch {
        AttemptWatch {
            state: Mutex::new(WatchState {
                senders: vec![None; world as usize],
                delivered: vec![false; world as usize],
                pending: BTreeMap::new(),
                deleting: false,
            }),
            task: Mutex::new(None),
        }
    }

    /// Worker `w`'s exit, once.
    fn deliver(&self, w: u32, exit: Exit) {
        let mut st = lock(&self.state);
        let i = w as usize;
        if st.delivered.get(i).copied().unwrap_or(true) {
            return;
        }
        match st.senders[i].clone() {
            Some(tx) => {
                st.delivered[i] = true;
                let _ = tx.send(exit);
            }
            None => {
                st.pending.entry(w).or_insert(exit);
            }
        }
    }

    fn attach(&self, w: u32, tx: mpsc::UnboundedSender<Exit>) {
        let mut st = lock(&self.state);
        let i = w as usize;
        if i >= st.senders.len() {
            return;
        }
        st.senders[i] = Some(tx.clone());
        if let Some(exit) = st.pending.remove(&w) {
            st.delivered[i] = true;
            let _ = tx.send(exit);
        }
    }

    fn all_delivered(&self) -> bool {
        lock(&self.state).delivered.iter().all(|d| *d)
    }
}

impl Drop for AttemptWatch {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

/// A worker of a Kubernetes gang: killing it deletes the attempt's objects.
struct KubeWorker {
    watch: Arc<AttemptWatch>,
    client: Client,
    flavor: Flavor,
    ns: String,
    name: String,
    attempt: u32,
    worker: u32,
}

impl WorkerHandle for KubeWorker {
    fn kill(&self) {
        let first = {
            let mut st = lock(&self.watch.state);
            !std::mem::replace(&mut st.deleting, true)
        };
        if first {
            tokio::spawn(KubeLauncher::delete_attempt(
                self.client.clone(),
                self.flavor,
                self.ns.clone(),
                self.name.clone(),
                self.attempt,
            ));
        }
        self.watch.deliver(
            self.worker,
            Exit {
                attempt: self.attempt,
                worker: self.worker,
                code: None,
                signal: Some(9),
                message: Some("its pod was deleted with the attempt".into()),
            },
        );
    }
}

/// The attempts the `objects` belong to (by their label).
fn attempts<K: kube::Resource>(objects: &[K]) -> Vec<u32> {
    objects
        .iter()
        .filter_map(|o| attempt_of(o.meta()))
        .collect()
}

fn launch_error(what: &str, why: impl std::fmt::Display) -> LaunchError {
    LaunchError::Spawn {
        what: what.to_string(),
        source: std::io::Error::other(why.to_string()),
    }
}

#[async_trait::async_trait]
impl Launcher for KubeLauncher {
    async fn launch(
        &self,
        spec: &WorkerSpec,
        exited: mpsc::UnboundedSender<Exit>,
    ) -> Result<Box<dyn WorkerHandle>, LaunchError> {
        let what = format!("worker {} of attempt {}", spec.worker, spec.attempt);
        let lsj = self.lsj(&spec.job_id).map_err(|e| launch_error(&what, e))?;
        let (name, ns) = render::name_of(&lsj).map_err(|e| launch_error(&what, e))?;
        let world = lsj
            .spec
            .config
            .get()
            .map_err(|e| launch_error(&what, e))?
            .job
            .world_size;
        if spec.worker == 0 {
            self.create_attempt(&lsj, spec)
                .await
                .map_err(|e| launch_error(&format!("the pods of attempt {}", spec.attempt), e))?;
        }
        let watch = self.watch_attempt(
            ns,
            name,
            &spec.job_id,
            spec.attempt,
            world,
            lsj.metadata.uid.as_deref(),
        );
        watch.attach(spec.worker, exited);
        Ok(Box::new(KubeWorker {
            watch,
            client: self.client.clone(),
            flavor: self.flavor,
            ns: ns.to_string(),
            name: name.to_string(),
            attempt: spec.attempt,
            worker: spec.worker,
        }))
    }

    async fn kill_leftovers(&self, job: &str) {
        let Ok(lsj) = self.lsj(job) else { return };
        let Ok((name, ns)) = render::name_of(&lsj) else {
            return;
        };
        // Every attempt's gang: a restarted coordinator starts a new attempt.
        let lp = ListParams::default().labels(&format!("{LABEL_JOB}={name},{LABEL_ROLE}=trainer"));
        let attempts: Vec<u32> = match self.flavor {
            Flavor::JobSet => {
                Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &jobset_resource())
                    .list(&lp)
                    .await
                    .map(|l| attempts(&l.items))
            }
            Flavor::IndexedJob => Api::<Job>::namespaced(self.client.clone(), ns)
                .list(&lp)
                .await
                .map(|l| attempts(&l.items)),
        }
        .unwrap_or_else(|e| {
            tracing::error!(job, error = %e, "cannot list the gangs a previous coordinator left");
            Vec::new()
        });
        for a in attempts {
            tracing::warn!(
                job,
                attempt = a,
                "deleting a gang left by the previous coordinator"
            );
            KubeLauncher::delete_attempt(
                self.client.clone(),
                self.flavor,
                ns.into(),
                name.into(),
                a,
            )
            .await;
        }
    }

    async fn preflight(
        &self,
        config: &lockstep_api::JobConfig,
        workdir: &std::path::Path,
    ) -> Result<(), String> {
        let urls = config.urls();
        // The controller passes the shared volume's mount path; `/` means there is none.
        if workdir != std::path::Path::new("/") {
            for (field, url) in urls {
                if let Some(path) = url.strip_prefix("file:///")
                    && !std::path::Path::new("/").join(path).starts_with(workdir)
                {
                    return Err(format!(
                        "{field} `{url}`: outside spec.sharedVolume.mountPath `{}`, so the pods \
                         do not share it; make it relative (it then resolves under the volume)",
                        workdir.display()
                    ));
                }
            }
            // The coordinator commits checkpoints there: it must mount the same claim at the
            // same path.
            return match tokio::fs::metadata(workdir).await {
                Ok(m) if m.is_dir() => Ok(()),
                _ => Err(format!(
                    "spec.sharedVolume.mountPath `{}`: the coordinator does not mount it (it \
                     commits the checkpoints, so it must mount the same claim at the same path)",
                    workdir.display()
                )),
            };
        }
        for (field, url) in urls {
            if url.starts_with("file://") {
                return Err(format!(
                    "{field} `{url}`: a file:// URL needs spec.sharedVolume (a volume every pod \
                     and the coordinator mount; relative URLs resolve under it), or use s3://"
                ));
            }
        }
        Ok(())
    }

    async fn export(&self, spec: &ExportSpec) -> Result<String, String> {
        let lsj = self.lsj(&spec.job_id)?;
        let (name, ns) = render::name_of(&lsj)?;
        let job = render::export_job(&lsj, spec)?;
        self.apply(ns, &job).await.map_err(|e| e.to_string())?;
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
}

/// Whether `meta` names LockstepJob `uid` as an owner.
fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o.kind == "LockstepJob" && o.uid == uid))
}

fn attempt_of(meta: &kube::api::ObjectMeta) -> Option<u32> {
    meta.labels.as_ref()?.get(LABEL_ATTEMPT)?.parse().ok()
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
