//! [`KubeLauncher`]: an attempt's gang as Kubernetes objects. Launching worker 0 applies the
//! attempt's objects (server-side apply, so a retry is harmless; [`super::objects`]) and starts
//! a watch on its pods; a pod that terminates becomes that worker's [`Exit`]
//! ([`super::exits`]). Killing a worker deletes the attempt's JobSet/Job (its pods go with it).
//! The export runs as its own Job ([`super::export`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::watcher;
use tokio::sync::mpsc;

use super::crd::LockstepJob;
use super::exits::{Waiting, pod_exit, pod_waiting};
use super::objects::{attempts, jobset_resource};
use super::render::{self, Flavor, Target};
use super::{KubeError, LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE, LABEL_UID};
use crate::launcher::{
    Exit, ExportError, ExportSpec, LaunchError, Launcher, Placement, Refused, WorkerHandle,
    WorkerSpec,
};
use crate::registry::lock;

/// Launches gangs as JobSets or Indexed Jobs.
pub struct KubeLauncher {
    pub(super) client: Client,
    pub(super) flavor: Flavor,
    /// A lost pod of an in-place job is replaced alone ([`render::Target::replace_pods`]);
    /// turned off for good if the API server turns out not to keep the Job fields it needs.
    replace_pods: AtomicBool,
    /// Live attempts: (job id, attempt) → their exits.
    attempts: Mutex<HashMap<(String, u32), Arc<AttemptWatch>>>,
    /// The version each job's export produced.
    pub(super) exported: Mutex<HashMap<String, String>>,
    /// Notified when a pod of a gang starts or stops waiting (the status shows it).
    pub(super) pods_changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for KubeLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLauncher")
            .field("flavor", &self.flavor)
            .finish()
    }
}

impl KubeLauncher {
    /// A launcher making `flavor` gangs through `client`; a lost pod fails its gang.
    pub fn new(client: Client, flavor: Flavor) -> Arc<KubeLauncher> {
        KubeLauncher::replacing_pods(client, flavor, false)
    }

    /// A launcher making `flavor` gangs through `client`; with `replace_pods`, a lost pod of a
    /// `job.recovery = "in-place"` job is replaced by one new pod and the other pods keep
    /// running (the API server must serve `backoffLimitPerIndex`: see
    /// [`KubeLauncher::serves_pod_replacement`]).
    pub fn replacing_pods(client: Client, flavor: Flavor, replace_pods: bool) -> Arc<KubeLauncher> {
        Arc::new(KubeLauncher {
            client,
            flavor,
            replace_pods: AtomicBool::new(replace_pods),
            attempts: Mutex::default(),
            exported: Mutex::default(),
            pods_changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// JobSet where its CRD is served, else Indexed Job.
    pub async fn detect_flavor(client: &Client) -> Flavor {
        super::objects::detect_flavor(client).await
    }

    /// How gangs are made.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Whether the API server's Jobs can fail one index without failing the others
    /// (`backoffLimitPerIndex`, on by default from Kubernetes 1.29), which replacing a lost pod
    /// alone needs; false when its version cannot be read.
    pub async fn serves_pod_replacement(client: &Client) -> bool {
        match client.apiserver_version().await {
            Ok(v) => {
                let minor: u32 = v
                    .minor
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap_or(0);
                v.major == "1" && minor >= 29
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the API server's version; lost pods fail their gang");
                false
            }
        }
    }

    /// Whether a lost pod of an in-place job is replaced alone.
    pub fn replaces_pods(&self) -> bool {
        self.replace_pods.load(Ordering::Relaxed)
    }

    /// Forgets what it knows of a job (its LockstepJob is gone).
    pub fn forget(&self, job_id: &str) {
        lock(&self.exported).remove(job_id);
        lock(&self.attempts).retain(|(j, _), _| j != job_id);
    }

    /// The version `job_id`'s export produced, once it did.
    pub fn exported_version(&self, job_id: &str) -> Option<String> {
        lock(&self.exported).get(job_id).cloned()
    }

    /// A pod of `job_id`'s newest attempt that waits for what may never come (an image it
    /// cannot pull, a missing Secret, no node that fits), if one does.
    pub fn waiting(&self, job_id: &str) -> Option<Waiting> {
        let attempts = lock(&self.attempts);
        let (_, watch) = attempts
            .iter()
            .filter(|((j, _), _)| j == job_id)
            .max_by_key(|((_, a), _)| *a)?;
        let st = lock(&watch.state);
        if let Some(w) = st.waiting.values().next() {
            return Some(w.clone());
        }
        let queue = watch
            .queue
            .as_ref()
            .filter(|_| !st.pods_seen && !st.admitted)?;
        Some(Waiting {
            pod: String::new(),
            worker: 0,
            reason: "Queued".into(),
            message: format!(
                "the gang waits for Kueue to admit it (queue {queue}); its gang timeout starts then"
            ),
            permanent: false,
        })
    }

    /// The LockstepJob a job's pods are made from.
    pub(super) fn lsj<'a>(
        job_id: &str,
        placement: &'a Placement,
    ) -> Result<&'a Arc<LockstepJob>, String> {
        match placement {
            Placement::Pods(lsj) => Ok(lsj),
            Placement::Here => Err(format!(
                "job {job_id} has no LockstepJob to make its pods from (a Kubernetes \
                 coordinator runs LockstepJobs only)"
            )),
        }
    }

    /// Applies the job's objects and `attempt`'s, and starts watching its pods.
    async fn create_attempt(&self, lsj: &LockstepJob, spec: &WorkerSpec) -> Result<(), KubeError> {
        let (name, ns) = render::name_of(lsj).map_err(KubeError::Invalid)?;
        let target = self.target(spec);
        let mut objects = vec![render::secret(lsj, &spec.token).map_err(KubeError::Invalid)?];
        objects.extend(render::job_objects(lsj).map_err(KubeError::Invalid)?);
        objects.extend(
            render::attempt_objects(lsj, &target, spec.attempt).map_err(KubeError::Invalid)?,
        );
        let uid = lsj.metadata.uid.as_deref().unwrap_or("");
        for o in &objects {
            super::objects::check_owner(&self.client, ns, o, uid).await?;
            super::objects::apply(&self.client, ns, o).await?;
        }
        tracing::info!(job = %spec.job_id, lockstepjob = %format!("{ns}/{name}"), attempt = spec.attempt,
            flavor = ?self.flavor, "created the attempt's objects");
        Ok(())
    }

    fn target<'a>(&self, spec: &'a WorkerSpec) -> Target<'a> {
        Target {
            job_id: &spec.job_id,
            coordinator_url: &spec.coordinator,
            flavor: self.flavor,
            replace_pods: self.replaces_pods(),
        }
    }

    /// Creates the pod that replaces lost worker `spec.worker` of its attempt, joining ring
    /// `generation`, owned by the attempt's JobSet (or Job); returns its name.
    async fn create_replacement(
        &self,
        lsj: &LockstepJob,
        spec: &WorkerSpec,
        generation: u32,
        watch: &AttemptWatch,
    ) -> Result<String, KubeError> {
        let (name, ns) = render::name_of(lsj).map_err(KubeError::Invalid)?;
        let object = render::attempt_name(name, spec.attempt);
        // The live object: its pod template is what the gang's pods were made from (with what
        // a queue or a webhook added: node selectors, tolerations).
        let (uid, job_spec) = match self.flavor {
            Flavor::JobSet => {
                Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &jobset_resource())
                    .get(&object)
                    .await
                    .map(|o| {
                        let spec = o.data["spec"]["replicatedJobs"][0]["template"]["spec"].clone();
                        (o.metadata.uid, spec)
                    })
                    .map_err(KubeError::api(format!("get JobSet {ns}/{object}")))?
            }
            Flavor::IndexedJob => Api::<Job>::namespaced(self.client.clone(), ns)
                .get(&object)
                .await
                .map(|o| {
                    let spec = serde_json::to_value(&o.spec).unwrap_or_default();
                    (o.metadata.uid, spec)
                })
                .map_err(KubeError::api(format!("get Job {ns}/{object}")))?,
        };
        let uid = uid.ok_or_else(|| KubeError::Invalid(format!("{object} has no uid")))?;
        if job_spec["backoffLimitPerIndex"] != serde_json::json!(0) {
            // Dropped by the API server: the Job would retry a lost pod itself, beside the
            // coordinator's replacement. Restart gangs instead from now on.
            self.replace_pods.store(false, Ordering::Relaxed);
            return Err(KubeError::Invalid(format!(
                "{object}: the API server dropped `backoffLimitPerIndex` from the gang's Job \
                 (Kubernetes older than 1.29, its JobBackoffLimitPerIndex feature gate off, or a \
                 JobSet CRD older than the field), so a lost pod cannot be replaced alone: the \
                 gang restarts instead, and so will the next ones (run the coordinator with \
                 --pod-replacement off to say so)"
            )));
        }
        let owner = match self.flavor {
            Flavor::JobSet => ("jobset.x-k8s.io/v1alpha2", "JobSet", uid.as_str()),
            Flavor::IndexedJob => ("batch/v1", "Job", uid.as_str()),
        };
        let pod = render::replacement_pod(
            lsj,
            &job_spec["template"],
            spec.attempt,
            spec.worker,
            generation,
            owner,
        )
        .map_err(KubeError::Invalid)?;
        let pod_name = render::replacement_pod_name(name, spec.attempt, spec.worker, generation);
        // Its exits, and only its, are the worker's from now on.
        watch.expect(spec.worker, &pod_name);
        let pod: Pod =
            serde_json::from_value(pod).map_err(|e| KubeError::Invalid(e.to_string()))?;
        match Api::<Pod>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &pod)
            .await
        {
            Ok(_) => {}
            // Created by an earlier try of this call.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(KubeError::api(format!("create Pod {ns}/{pod_name}"))(e));
            }
        }
        tracing::info!(job = %spec.job_id, pod = %pod_name, attempt = spec.attempt, worker = spec.worker,
            generation, "created a pod to replace the lost one");
        Ok(pod_name)
    }

    fn watch_attempt(
        &self,
        lsj: &LockstepJob,
        job_id: &str,
        attempt: u32,
        world: u32,
    ) -> Result<Arc<AttemptWatch>, String> {
        let (name, ns) = render::name_of(lsj)?;
        let uid = lsj.metadata.uid.as_deref();
        let key = (job_id.to_string(), attempt);
        let mut attempts = lock(&self.attempts);
        if let Some(w) = attempts.get(&key) {
            return Ok(w.clone());
        }
        let queue = lsj.spec.scheduling.kueue_queue.clone();
        let w = Arc::new(AttemptWatch::new(world, queue));
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let selector = pod_selector(name, uid, attempt);
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
        let pods_changed = self.pods_changed.clone();
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(pods, cfg));
            while let Some(ev) = events.next().await {
                let Some(watch) = weak.upgrade() else { return };
                match ev {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        let waiting = pod_waiting(&pod, world);
                        let fatal = waiting.as_ref().and_then(|w| w.exit(attempt));
                        if watch.waits(&pod, waiting) {
                            pods_changed.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        let pod_name = pod.metadata.name.as_deref();
                        if let Some((w, exit)) = pod_exit(&pod, attempt, world, false) {
                            watch.deliver(w, exit, pod_name);
                        } else if let Some(exit) = fatal {
                            tracing::error!(job = %job, attempt, cause = %exit.describe(), "a pod of the gang cannot start");
                            watch.deliver(exit.worker, exit, pod_name);
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if watch.waits(&pod, None) {
                            pods_changed.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        if let Some((w, exit)) = pod_exit(&pod, attempt, world, true) {
                            watch.deliver(w, exit, pod.metadata.name.as_deref());
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
                super::objects::delete_attempt(client, flavor, ns_, name_, attempt).await;
            }
        });
        lock(&w.tasks).push(task.abort_handle());
        if w.queue.is_some() {
            let admission = KubeLauncher::watch_admission(
                self.client.clone(),
                self.flavor,
                ns.to_string(),
                render::attempt_name(name, attempt),
                Arc::downgrade(&w),
                self.pods_changed.clone(),
            );
            lock(&w.tasks).push(admission.abort_handle());
        }
        // Earlier attempts of the job are over: only their workers' handles keep them now.
        attempts.retain(|(j, a), _| j != job_id || *a >= attempt);
        attempts.insert(key, w.clone());
        Ok(w)
    }
}

impl KubeLauncher {
    /// Looks every 2 s at a queued attempt's JobSet (or Job) until the queue unsuspends it:
    /// the gang is admitted then, whether or not its pods come (the gang timeout bounds that).
    fn watch_admission(
        client: Client,
        flavor: Flavor,
        ns: String,
        object: String,
        watch: std::sync::Weak<AttemptWatch>,
        changed: tokio::sync::watch::Sender<u64>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let suspended = match flavor {
                    Flavor::JobSet => Api::<DynamicObject>::namespaced_with(
                        client.clone(),
                        &ns,
                        &jobset_resource(),
                    )
                    .get_opt(&object)
                    .await
                    .map(|o| o.map(|o| o.data["spec"]["suspend"] == serde_json::json!(true))),
                    Flavor::IndexedJob => Api::<Job>::namespaced(client.clone(), &ns)
                        .get_opt(&object)
                        .await
                        .map(|j| j.map(|j| j.spec.and_then(|s| s.suspend) == Some(true))),
                };
                match suspended {
                    Ok(Some(false)) => {
                        let Some(w) = watch.upgrade() else { return };
                        lock(&w.state).admitted = true;
                        changed.send_modify(|n| *n = n.wrapping_add(1));
                        return;
                    }
                    // Not created yet, still suspended, or the API server did not answer.
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%object, error = %e, "looking at a queued gang"),
                }
                if watch.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    }
}

/// The label selector of `attempt`'s trainer pods (of the LockstepJob with that uid only).
fn pod_selector(name: &str, uid: Option<&str>, attempt: u32) -> String {
    let mut selector = format!("{LABEL_JOB}={name},{LABEL_ATTEMPT}={attempt},{LABEL_ROLE}=trainer");
    if let Some(uid) = uid {
        selector.push_str(&format!(",{LABEL_UID}={uid}"));
    }
    selector
}

/// One attempt's workers and the exits seen for them.
struct AttemptWatch {
    /// The Kueue queue that admits the gang (its JobSet or Job is created suspended).
    queue: Option<String>,
    state: Mutex<WatchState>,
    /// Its watch tasks, aborted when it goes.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct WatchState {
    senders: Vec<Option<mpsc::UnboundedSender<Exit>>>,
    delivered: Vec<bool>,
    pending: BTreeMap<u32, Exit>,
    /// The pod each worker is now, where the coordinator made it (a replacement): exits of
    /// the worker's other pods (the one it replaced) are not its.
    expected: Vec<Option<String>>,
    deleting: bool,
    /// Pods seen (a queue that held the gang back let it start).
    pods_seen: bool,
    /// The queue unsuspended the attempt's JobSet (or Job): it admitted the gang.
    admitted: bool,
    /// Pods waiting for what may never come, by name.
    waiting: BTreeMap<String, Waiting>,
}

impl AttemptWatch {
    fn new(world: u32, queue: Option<String>) -> AttemptWatch {
        AttemptWatch {
            queue,
            state: Mutex::new(WatchState {
                senders: vec![None; world as usize],
                delivered: vec![false; world as usize],
                pending: BTreeMap::new(),
                expected: vec![None; world as usize],
                deleting: false,
                pods_seen: false,
                admitted: false,
                waiting: BTreeMap::new(),
            }),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Records that `pod` exists and what it waits for (`None`: nothing, or it is gone);
    /// true when that changed what the gang waits for.
    fn waits(&self, pod: &Pod, waiting: Option<Waiting>) -> bool {
        let mut st = lock(&self.state);
        st.pods_seen = true;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let before = match waiting {
            Some(w) => st.waiting.insert(name, w.clone()).filter(|b| *b == w),
            None => return st.waiting.remove(&name).is_some(),
        };
        before.is_none()
    }

    /// Worker `w`'s exit, once; `pod`: the pod it came from (`None`: the worker was killed).
    fn deliver(&self, w: u32, exit: Exit, pod: Option<&str>) {
        let mut st = lock(&self.state);
        let i = w as usize;
        if st.delivered.get(i).copied().unwrap_or(true) {
            return;
        }
        if let (Some(Some(expected)), Some(pod)) = (st.expected.get(i), pod)
            && expected != pod
        {
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

    /// Worker `w` is pod `pod` from now on (its replacement): its next exit is that pod's.
    fn expect(&self, w: u32, pod: &str) {
        let mut st = lock(&self.state);
        let i = w as usize;
        if i >= st.senders.len() {
            return;
        }
        st.expected[i] = Some(pod.to_string());
        st.delivered[i] = false;
        st.senders[i] = None;
        st.pending.remove(&w);
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
        for t in lock(&self.tasks).drain(..) {
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
    /// The label selector of the attempt's trainer pods.
    selector: String,
    attempt: u32,
    worker: u32,
}

impl KubeWorker {
    /// Reports this worker killed (its pod deleted), at once.
    fn killed(&self, how: &str) {
        self.watch.deliver(
            self.worker,
            Exit {
                attempt: self.attempt,
                worker: self.worker,
                code: None,
                signal: Some(9),
                message: Some(how.into()),
                unstartable: false,
            },
            None,
        );
    }
}

impl WorkerHandle for KubeWorker {
    fn kill(&self) {
        let first = {
            let mut st = lock(&self.watch.state);
            !std::mem::replace(&mut st.deleting, true)
        };
        if first {
            tokio::spawn(super::objects::delete_attempt(
                self.client.clone(),
                self.flavor,
                self.ns.clone(),
                self.name.clone(),
                self.attempt,
            ));
        }
        self.killed("its pod was deleted with the attempt");
    }

    /// Deletes this worker's pod (the attempt's other pods keep running) and reports it
    /// killed: the replacement pod it is, or else the pod the gang's Job made for its index —
    /// never a newer replacement.
    fn kill_one(&self) {
        let mine = lock(&self.watch.state)
            .expected
            .get(self.worker as usize)
            .cloned()
            .flatten();
        let (client, ns, selector, attempt, worker) = (
            self.client.clone(),
            self.ns.clone(),
            self.selector.clone(),
            self.attempt,
            self.worker,
        );
        tokio::spawn(async move {
            let pods = Api::<Pod>::namespaced(client, &ns);
            let doomed: Vec<String> = match mine {
                Some(pod) => vec![pod],
                None => match pods.list(&ListParams::default().labels(&selector)).await {
                    Ok(l) => {
                        l.items
                            .into_iter()
                            .filter(|p| {
                                let index = p.metadata.annotations.as_ref().and_then(|a| {
                                    a.get("batch.kubernetes.io/job-completion-index")
                                });
                                let by_job =
                                    p.metadata.owner_references.as_ref().is_some_and(|o| {
                                        o.iter().any(|r| r.controller == Some(true))
                                    });
                                by_job && index.is_some_and(|i| *i == worker.to_string())
                            })
                            .filter_map(|p| p.metadata.name)
                            .collect()
                    }
                    Err(e) => {
                        tracing::error!(attempt, worker, error = %e, "cannot list the pods to kill");
                        return;
                    }
                },
            };
            for p in doomed {
                match pods
                    .delete(&p, &DeleteParams::default().grace_period(0))
                    .await
                {
                    Ok(_) => tracing::info!(pod = %p, worker, "deleted the pod of a lost rank"),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        tracing::error!(pod = %p, error = %e, "cannot delete the pod of a lost rank")
                    }
                }
            }
        });
        self.killed("its pod was deleted");
    }

    /// Kueue unsuspends the gang's JobSet (or Job) when it admits it; its pods appear then.
    fn admitted(&self) -> bool {
        let st = lock(&self.watch.state);
        self.watch.queue.is_none() || st.admitted || st.pods_seen
    }
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
        let lsj =
            KubeLauncher::lsj(&spec.job_id, &spec.placement).map_err(|e| launch_error(&what, e))?;
        let (name, ns) = render::name_of(lsj).map_err(|e| launch_error(&what, e))?;
        let world = lsj
            .spec
            .config
            .get()
            .map_err(|e| launch_error(&what, e))?
            .job
            .world_size;
        if spec.worker == 0 && spec.replacing.is_none() {
            self.create_attempt(lsj, spec)
                .await
                .map_err(|e| launch_error(&format!("the pods of attempt {}", spec.attempt), e))?;
        }
        let watch = self
            .watch_attempt(lsj, &spec.job_id, spec.attempt, world)
            .map_err(|e| launch_error(&what, e))?;
        if let Some(generation) = spec.replacing {
            self.create_replacement(lsj, spec, generation, &watch)
                .await
                .map_err(|e| launch_error(&format!("the replacement of {what}"), e))?;
        }
        watch.attach(spec.worker, exited);
        Ok(Box::new(KubeWorker {
            watch,
            client: self.client.clone(),
            flavor: self.flavor,
            ns: ns.to_string(),
            name: name.to_string(),
            selector: pod_selector(name, lsj.metadata.uid.as_deref(), spec.attempt),
            attempt: spec.attempt,
            worker: spec.worker,
        }))
    }

    fn replaces_in_place(&self) -> bool {
        self.replaces_pods()
    }

    fn logs(&self, job: &str, placement: &Placement, dir: &std::path::Path) -> String {
        match KubeLauncher::lsj(job, placement).and_then(|l| render::name_of(l)) {
            Ok((name, ns)) => {
                format!("kubectl logs -n {ns} -l {LABEL_JOB}={name},{LABEL_ROLE}=trainer")
            }
            Err(_) => dir.display().to_string(),
        }
    }

    async fn kill_leftovers(&self, job: &str, placement: &Placement) {
        let Ok(lsj) = KubeLauncher::lsj(job, placement) else {
            return;
        };
        let Ok((name, ns)) = render::name_of(lsj) else {
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
        // Trainers that lost their coordinator checkpoint the step they are at and exit by
        // themselves: give their running pods that long before the gang is deleted.
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let until = tokio::time::Instant::now() + crate::launcher::LEFTOVER_GRACE;
        let mut told = false;
        loop {
            let running = match pods.list(&lp).await {
                Ok(l) => l
                    .items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count(),
                Err(e) => {
                    tracing::warn!(job, error = %e, "cannot list the pods a previous coordinator left");
                    0
                }
            };
            if running == 0 || tokio::time::Instant::now() >= until {
                break;
            }
            if !std::mem::replace(&mut told, true) {
                tracing::warn!(job, running, grace = ?crate::launcher::LEFTOVER_GRACE,
                    "trainer pods left by the previous coordinator still run: waiting for them to checkpoint and exit");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for a in attempts {
            tracing::warn!(
                job,
                attempt = a,
                "deleting a gang left by the previous coordinator"
            );
            super::objects::delete_attempt(
                self.client.clone(),
                self.flavor,
                ns.into(),
                name.into(),
                a,
            )
            .await;
        }
    }

    fn accepts_submits(&self) -> Result<(), Refused> {
        Err(Refused(
            "this coordinator runs the LockstepJobs of its namespace and takes no jobs over \
             gRPC: submit with `lockstep submit --kubernetes CONFIG`, or `kubectl apply -f` the \
             LockstepJob that `lockstep render CONFIG` prints"
                .into(),
        ))
    }

    async fn preflight(
        &self,
        config: &lockstep_api::JobConfig,
        workdir: &std::path::Path,
    ) -> Result<(), Refused> {
        let urls = config.urls();
        // The controller passes the shared volume's mount path; `/` means there is none.
        if workdir != std::path::Path::new("/") {
            for (field, url) in urls {
                if let Some(path) = url.strip_prefix("file:///")
                    && !std::path::Path::new("/").join(path).starts_with(workdir)
                {
                    return Err(Refused(format!(
                        "{field} `{url}`: outside spec.sharedVolume.mountPath `{}`, so the pods \
                         do not share it; make it relative (it then resolves under the volume)",
                        workdir.display()
                    )));
                }
            }
            // The coordinator commits checkpoints there: it must mount the same claim at the
            // same path.
            return match tokio::fs::metadata(workdir).await {
                Ok(m) if m.is_dir() => Ok(()),
                _ => Err(Refused(format!(
                    "spec.sharedVolume.mountPath `{}`: the coordinator does not mount it (it \
                     commits the checkpoints, so it must mount the same claim at the same path)",
                    workdir.display()
                ))),
            };
        }
        for (field, url) in urls {
            if url.starts_with("file://") {
                return Err(Refused(format!(
                    "{field} `{url}`: a file:// URL needs spec.sharedVolume (a volume every pod \
                     and the coordinator mount; relative URLs resolve under it), or use s3://"
                )));
            }
        }
        Ok(())
    }

    async fn export(&self, spec: &ExportSpec) -> Result<String, ExportError> {
        self.run_export(spec).await.map_err(ExportError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn killed(worker: u32) -> Exit {
        Exit {
            attempt: 1,
            worker,
            code: None,
            signal: Some(9),
            message: None,
            unstartable: false,
        }
    }

    #[test]
    fn a_replaced_worker_takes_only_its_replacement_pods_exit() {
        let watch = AttemptWatch::new(2, None);
        let (tx, mut rx) = mpsc::unbounded_channel();
        watch.attach(1, tx);
        watch.deliver(1, killed(1), Some("ft-a1-rank-0-1"));
        assert!(rx.try_recv().is_ok(), "the lost pod's exit");

        watch.expect(1, "ft-a1-rank-0-1-r1");
        // The replacement ends before its worker is attached: kept for it.
        watch.deliver(1, killed(1), Some("ft-a1-rank-0-1-r1"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        watch.attach(1, tx);
        assert!(rx.try_recv().is_ok(), "the replacement's exit, kept");

        watch.expect(1, "ft-a1-rank-0-1-r2");
        let (tx, mut rx) = mpsc::unbounded_channel();
        watch.attach(1, tx);
        // The lost pods, listed again when the watch restarts: not the new worker's.
        watch.deliver(1, killed(1), Some("ft-a1-rank-0-1"));
        watch.deliver(1, killed(1), Some("ft-a1-rank-0-1-r1"));
        assert!(rx.try_recv().is_err());
        assert!(!watch.all_delivered());
        watch.deliver(1, killed(1), Some("ft-a1-rank-0-1-r2"));
        assert!(rx.try_recv().is_ok());
    }
}
