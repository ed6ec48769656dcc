//! lockstep on Kubernetes, against a real kube-apiserver + etcd (v1.20, built and started by
//! scripts/kube-apiserver; envtest style: no controllers, no kubelet). The coordinator is the
//! real `lockstep serve --launcher kubernetes`, running as its ServiceAccount (impersonated)
//! with the Role from jobsets/rbac.yaml; the LockstepJobs are made by `lockstep submit
//! --kubernetes`. This test plays the missing parts of a cluster: the JobSet and Job
//! controllers (it creates the pods of each JobSet/Job from its template) and the kubelet (it
//! runs each pod's container as a real `lockstep` process, with the pod's args and env, and
//! writes its exit into the pod's status, as a kubelet does; pods of a deleted JobSet are
//! killed). What 1.20 cannot serve (Indexed Jobs) is covered by the coordinator's tower_test
//! mock tests and the schema validation in scripts/validate-manifests.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use lockstep_api::testing::TestJob;
use lockstep_coordinator::k8s::LockstepJob;
use lockstep_coordinator::k8s::crd::JobPhase;
use lockstep_coordinator::k8s::jobset_resource;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::common::free_port;

const NS: &str = "lsj-test";

/// The test's directory, for [`logs`].
static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The coordinator's log and every pod's stderr tail, for failure messages.
fn logs() -> String {
    let Some(root) = ROOT.get() else {
        return String::new();
    };
    let tail = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let mut out = format!(
        "coordinator.log:\n{}\n",
        tail(&root.join("coordinator.log"))
    );
    if let Ok(pods) = std::fs::read_dir(root.join("pods")) {
        for p in pods.flatten() {
            out.push_str(&format!(
                "pod {:?}:\n{}\n",
                p.file_name(),
                tail(&p.path().join("stderr"))
            ));
        }
    }
    out
}
const SA: &str = "lockstep-coordinator";

/// kube-apiserver + etcd, stopped on drop.
struct ApiServer {
    dir: tempfile::TempDir,
}

impl ApiServer {
    fn start() -> ApiServer {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-apiserver");
        let out = std::process::Command::new(&script)
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/kube-apiserver start failed (run `scripts/kube-apiserver build` first, or \
             scripts/test, which does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ApiServer { dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kubeconfig acting as `NS`'s ServiceAccount `sa` (impersonated by the admin).
    fn kubeconfig_as(&self, sa: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.kubeconfig()).unwrap();
        let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let user = &mut kc["users"][0]["user"];
        user["as"] = format!("system:serviceaccount:{NS}:{sa}").into();
        user["as-groups"] = serde_yaml::to_value([
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{NS}"),
            "system:authenticated",
        ])
        .unwrap();
        kc["contexts"][0]["context"]["namespace"] = NS.into();
        let path = self.dir.path().join(format!("kubeconfig-{sa}"));
        std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
        path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-apiserver");
        let _ = std::process::Command::new(script)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Polls `f` every 200 ms until it returns `Some`, failing after `limit` with `what`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ours = lockstep_coordinator::k8s::crd::crd_yaml().unwrap();
    let jobset = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/jobset.x-k8s.io_jobsets.k8s-1.20.yaml"),
    )
    .unwrap();
    for text in [ours, jobset] {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
        eventually(
            Duration::from_secs(30),
            &format!("CRD {name} established"),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let c = crds.get(&name).await.ok()?;
                    let established = c
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    established.then_some(())
                }
            },
        )
        .await;
    }
}

/// `kubectl apply -f FILE -n NS` as the admin.
fn kubectl_apply(api: &ApiServer, file: &Path) {
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", api.kubeconfig())
        .args(["apply", "-n", NS, "-f"])
        .arg(file)
        .output()
        .expect("kubectl (1.32 on the machine image; Debian's kubernetes-client otherwise)");
    assert!(
        out.status.success(),
        "kubectl apply {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lockstep() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

/// `GET path` on 127.0.0.1:port: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    ))
}

/// A `lockstep serve --launcher kubernetes` acting as the coordinator's ServiceAccount.
struct Coordinator {
    child: std::process::Child,
    port: u16,
}

impl Coordinator {
    fn start(kubeconfig: &Path, dir: &Path) -> Coordinator {
        let (port, http) = (free_port(), free_port());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("coordinator.log"))
            .unwrap();
        let child = lockstep()
            .args(["serve", "--launcher", "kubernetes", "--namespace", NS])
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--metrics-addr=127.0.0.1:{http}"))
            .arg(format!("--advertise-url=http://127.0.0.1:{port}"))
            // 1.20 predates `backoffLimitPerIndex` (auto would leave it off); the Job
            // controller here (`Cluster`) neither retries a failed pod nor fails its gang,
            // which is what that field asks of a 1.29+ one.
            .arg("--pod-replacement=on")
            .arg("--data-dir")
            .arg(dir.join("coordinator"))
            .env("KUBECONFIG", kubeconfig)
            .env("LOCKSTEP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some((200, _)) = http_get(http, "/readyz") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the coordinator never became ready; log: {}",
                std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(http_get(http, "/healthz").unwrap().0, 200);
        Coordinator { child, port }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The parts of a cluster an API server alone lacks: JobSet/Job controllers (pods from
/// templates) and the kubelet (containers as real processes, exits into pod status).
#[derive(Clone)]
struct Cluster {
    admin: Client,
    root: PathBuf,
    /// Live "containers" by pod name.
    running: Arc<Mutex<HashMap<String, u32>>>,
    /// Pods made so far, by owner (JobSet or Job) name.
    made: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

impl Cluster {
    fn new(admin: Client, root: PathBuf) -> Cluster {
        Cluster {
            admin,
            root,
            running: Arc::default(),
            made: Arc::default(),
        }
    }

    /// Pid of the process of pod `name`, while it runs.
    fn pid(&self, pod: &str) -> Option<u32> {
        self.running.lock().unwrap().get(pod).copied()
    }

    /// Runs forever: every 300 ms, makes the pods of new JobSets and Jobs and kills those of
    /// deleted ones.
    async fn run(self) {
        let jobsets =
            Api::<DynamicObject>::namespaced_with(self.admin.clone(), NS, &jobset_resource());
        let jobs = Api::<Job>::namespaced(self.admin.clone(), NS);
        loop {
            let mut owners: Vec<(String, Value, u32)> = Vec::new();
            if let Ok(list) = jobsets.list(&ListParams::default()).await {
                for js in list.items {
                    // Suspended: Kueue has not admitted it yet.
                    if js.data["spec"]["suspend"] == json!(true) {
                        continue;
                    }
                    let name = js.metadata.name.clone().unwrap();
                    let job = &js.data["spec"]["replicatedJobs"][0]["template"]["spec"];
                    let n = job["parallelism"].as_u64().unwrap_or(1) as u32;
                    owners.push((name, job["template"].clone(), n));
                }
            }
            if let Ok(list) = jobs.list(&ListParams::default()).await {
                for j in list.items {
                    if j.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
                        continue;
                    }
                    let name = j.metadata.name.clone().unwrap();
                    let spec = serde_json::to_value(j.spec.as_ref().unwrap()).unwrap();
                    owners.push((name, spec["template"].clone(), 1));
                }
            }
            let live: Vec<String> = owners.iter().map(|(n, _, _)| n.clone()).collect();
            for (owner, template, n) in owners {
                if self.made.lock().unwrap().contains_key(&owner) {
                    continue;
                }
                let mut pods = Vec::new();
                for i in 0..n {
                    pods.push(self.make_pod(&owner, &template, i).await);
                }
                self.made.lock().unwrap().insert(owner, pods);
            }
            // Pods others made (the coordinator's replacement of a lost pod), owned by a
            // JobSet or Job: the kubelet runs them too.
            if let Ok(list) = Api::<Pod>::namespaced(self.admin.clone(), NS)
                .list(&ListParams::default().labels("lockstep.dev/role=trainer"))
                .await
            {
                for pod in list.items {
                    let name = pod.metadata.name.clone().unwrap();
                    let Some(owner) = pod
                        .metadata
                        .owner_references
                        .as_ref()
                        .and_then(|o| o.first())
                        .map(|o| o.name.clone())
                    else {
                        continue;
                    };
                    {
                        let mut made = self.made.lock().unwrap();
                        let Some(pods) = made.get_mut(&owner) else {
                            continue;
                        };
                        if pods.contains(&name) {
                            continue;
                        }
                        pods.push(name.clone());
                    }
                    let index: u32 = pod.metadata.annotations.as_ref().unwrap()
                        ["batch.kubernetes.io/job-completion-index"]
                        .parse()
                        .unwrap();
                    let spec = serde_json::to_value(pod.spec.as_ref().unwrap()).unwrap();
                    let c = self.clone();
                    tokio::spawn(async move { c.run_container(name, spec, index).await });
                }
            }
            // Deleted owners: their pods go (the garbage collector and kubelet would do it).
            let gone: Vec<(String, Vec<String>)> = self
                .made
                .lock()
                .unwrap()
                .iter()
                .filter(|(o, _)| !live.contains(o))
                .map(|(o, p)| (o.clone(), p.clone()))
                .collect();
            for (owner, pods) in gone {
                for pod in pods {
                    if let Some(pid) = self.pid(&pod) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    let _ = Api::<Pod>::namespaced(self.admin.clone(), NS)
                        .delete(&pod, &DeleteParams::default().grace_period(0))
                        .await;
                }
                self.made.lock().unwrap().remove(&owner);
                // Keep the entry's key out of `made` so a recreated owner gets new pods.
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Creates pod `i` of `owner` from `template` and starts its container.
    async fn make_pod(&self, owner: &str, template: &Value, i: u32) -> String {
        let pods = Api::<Pod>::namespaced(self.admin.clone(), NS);
        let name = if template["spec"]["subdomain"].is_null() && owner.ends_with("-export") {
            format!("{owner}-{i}")
        } else {
            format!("{owner}-rank-0-{i}")
        };
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": template["metadata"]["labels"],
                "annotations": {"batch.kubernetes.io/job-completion-index": i.to_string()},
            },
            "spec": template["spec"],
        });
        let pod: Pod = serde_json::from_value(pod).unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let c = self.clone();
        let (pod_name, spec) = (name.clone(), template["spec"].clone());
        tokio::spawn(async move { c.run_container(pod_name, spec, i).await });
        name
    }

    /// What the kubelet does: runs the container (args with $(VAR) expanded, env from field
    /// refs and Secrets, the config from its ConfigMap), then writes its exit into the pod.
    async fn run_container(self, pod: String, spec: Value, index: u32) {
        let c = &spec["containers"][0];
        // Images the kubelet cannot pull (a registry that does not exist) or parse (upper
        // case): the container waits, and never runs.
        let image = c["image"].as_str().unwrap_or("");
        let waiting = if image.starts_with("registry.invalid/") {
            Some((
                "ImagePullBackOff",
                format!("Back-off pulling image \"{image}\""),
            ))
        } else if image == "lockstep:unparseable" {
            Some((
                "InvalidImageName",
                format!(
                    "Failed to apply default image tag \"{image}\": couldn't parse image reference"
                ),
            ))
        } else {
            None
        };
        if let Some((reason, message)) = waiting {
            let patch = json!({"status": {"phase": "Pending", "containerStatuses": [{
                "name": c["name"], "image": image, "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}},
            }]}});
            let _ = Api::<Pod>::namespaced(self.admin.clone(), NS)
                .patch_status(&pod, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            return;
        }
        let dir = self.root.join("pods").join(&pod);
        std::fs::create_dir_all(&dir).unwrap();
        // The config volume.
        let cm_name = spec["volumes"][0]["configMap"]["name"].as_str().unwrap();
        let cm = Api::<ConfigMap>::namespaced(self.admin.clone(), NS)
            .get(cm_name)
            .await
            .unwrap();
        let config = dir.join("config.toml");
        let mut text = cm.data.unwrap()["config.toml"].clone();
        // Another lockstep version, reading the config otherwise (a learning rate).
        if image == "lockstep:skewed" {
            let lines: Vec<&str> = text
                .lines()
                .map(|l| {
                    if l.starts_with("lr = ") {
                        "lr = 0.5"
                    } else {
                        l
                    }
                })
                .collect();
            text = lines.join("\n");
        }
        std::fs::write(&config, text).unwrap();
        let termination_log = dir.join("termination-log");
        let mut env: HashMap<String, String> = HashMap::new();
        for e in c["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match f {
                    "status.podIP" => "127.0.0.1".into(),
                    _ => index.to_string(),
                }
            } else {
                let r = &e["valueFrom"]["secretKeyRef"];
                let s = Api::<Secret>::namespaced(self.admin.clone(), NS)
                    .get(r["name"].as_str().unwrap())
                    .await
                    .unwrap();
                let data = s.data.unwrap();
                String::from_utf8(data[r["key"].as_str().unwrap()].0.clone()).unwrap()
            };
            env.insert(name, value);
        }
        env.insert("HOME".into(), dir.display().to_string());
        let args: Vec<String> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap();
                let mut a = a.replace("/etc/lockstep/config.toml", &config.display().to_string());
                a = a.replace(
                    "/dev/termination-log",
                    &termination_log.display().to_string(),
                );
                a = a.replace(
                    "/var/cache/lockstep",
                    &dir.join("cache").display().to_string(),
                );
                for (k, v) in &env {
                    a = a.replace(&format!("$({k})"), v);
                }
                a
            })
            .collect();
        let workdir = c["workingDir"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or(dir.clone());
        let stderr_path = dir.join("stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(&args)
            .envs(&env)
            .current_dir(workdir)
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        self.running
            .lock()
            .unwrap()
            .insert(pod.clone(), child.id().unwrap());
        let pods = Api::<Pod>::namespaced(self.admin.clone(), NS);
        let running = json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}});
        let _ = pods
            .patch_status(&pod, &PatchParams::default(), &Patch::Merge(&running))
            .await;
        let status = child.wait().await.unwrap();
        self.running.lock().unwrap().remove(&pod);
        use std::os::unix::process::ExitStatusExt;
        let (code, signal) = match (status.code(), status.signal()) {
            (Some(c), _) => (c, None),
            (None, Some(s)) => (128 + s, Some(s)),
            _ => (255, None),
        };
        // terminationMessagePolicy FallbackToLogsOnError: the file, else on failure the
        // log's tail.
        let mut message = std::fs::read_to_string(&termination_log).unwrap_or_default();
        if message.is_empty() && code != 0 {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            message = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        }
        let mut terminated = json!({"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"},
            "message": message});
        if let Some(s) = signal {
            terminated["signal"] = json!(s);
        }
        let phase = if code == 0 { "Succeeded" } else { "Failed" };
        let name = c["name"].as_str().unwrap();
        let patch = json!({"status": {"phase": phase, "containerStatuses": [{
            "name": name, "image": c["image"], "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": terminated},
        }]}});
        // The pod may already be gone (its JobSet was deleted).
        let _ = pods
            .patch_status(&pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        // The Job controller: a Job whose pod succeeded (or failed) says so.
        if let Some(job) = pod.strip_suffix("-0").filter(|j| j.ends_with("-export")) {
            let cond = if code == 0 { "Complete" } else { "Failed" };
            let patch = json!({"status": {"conditions": [{"type": cond, "status": "True"}],
                "succeeded": i32::from(code == 0), "failed": i32::from(code != 0)}});
            let _ = Api::<Job>::namespaced(self.admin.clone(), NS)
                .patch_status(job, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
    }
}

async fn lsj(client: &Client, name: &str) -> Option<LockstepJob> {
    Api::<LockstepJob>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .ok()
}

/// Waits until `name`'s status satisfies `ok`; the failure shows the status.
async fn wait_status(
    client: &Client,
    name: &str,
    limit: Duration,
    what: &str,
    ok: impl Fn(&lockstep_coordinator::k8s::LockstepJobStatus) -> bool,
) -> lockstep_coordinator::k8s::LockstepJobStatus {
    let start = Instant::now();
    loop {
        let st = lsj(client, name)
            .await
            .and_then(|l| l.status)
            .unwrap_or_default();
        if ok(&st) {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "{name}: timed out after {limit:?} waiting for {what}; status: {st:#?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn submit(api: &ApiServer, config: &Path, name: &str, shared: &Path) -> String {
    let out = lockstep()
        .env("KUBECONFIG", api.kubeconfig())
        .args(["submit", "--kubernetes"])
        .arg(config)
        .args([
            "--namespace",
            NS,
            "--name",
            name,
            "--image",
            "lockstep:test",
        ])
        .arg(format!("--shared-volume=shared:{}", shared.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn owner_uid(meta: &kube::api::ObjectMeta) -> Option<String> {
    let o = meta.owner_references.as_ref()?.first()?;
    (o.kind == "LockstepJob" && o.controller == Some(true)).then(|| o.uid.clone())
}

// `one_gang` is a std Mutex the synchronous tests share; nothing async waits for it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lockstep_jobs_run_restart_export_and_clean_up_on_a_real_api_server() {
    let _gang = crate::common::one_gang();
    let api = ApiServer::start();
    let admin = client_from(&api.kubeconfig()).await;
    install_crds(&admin).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    // The ServiceAccount admission plugin needs `default` (a controller would make it).
    let default_sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &default_sa)
        .await
        .unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    kubectl_apply(&api, &repo.join("jobsets/rbac.yaml"));
    // The serving Deployment the export rolls (the one name the rollout Role allows).
    let serving: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "model-server"},
        "spec": {"selector": {"matchLabels": {"app": "serve"}}, "template": {
            "metadata": {"labels": {"app": "serve"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]}}}
    }))
    .unwrap();
    Api::<Deployment>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &serving)
        .await
        .unwrap();

    // Not under /tmp: the pods mount their own scratch there, so a volume cannot go there.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let shared = tmp.path().join("shared");
    ROOT.set(tmp.path().to_path_buf()).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    // The data lives on the shared volume, as on a cluster (URLs outside it are refused).
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data/quickstart.jsonl"),
        shared.join("data.jsonl"),
    )
    .unwrap();
    let cluster = Cluster::new(admin.clone(), tmp.path().to_path_buf());
    let kubelet = tokio::spawn(cluster.clone().run());
    let sa_kubeconfig = api.kubeconfig_as(SA);
    let mut coordinator = Coordinator::start(&sa_kubeconfig, tmp.path());

    // RBAC: the ServiceAccount may do what the controller does (it is running as it) and
    // nothing else.
    let sa = client_from(&sa_kubeconfig).await;
    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    forbidden(
        Api::<Pod>::namespaced(sa.clone(), NS)
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .map(drop),
        "delete pods",
    );
    forbidden(
        Api::<Secret>::namespaced(sa.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(drop),
        "list secrets of another namespace",
    );
    forbidden(
        Api::<Namespace>::all(sa.clone())
            .list(&ListParams::default())
            .await
            .map(drop),
        "list namespaces",
    );
    forbidden(
        Api::<LockstepJob>::namespaced(sa.clone(), NS)
            .delete("anything", &DeleteParams::default())
            .await
            .map(drop),
        "delete a LockstepJob",
    );
    let patch = json!({"metadata": {"labels": {"x": "y"}}});
    forbidden(
        Api::<Deployment>::namespaced(sa.clone(), NS)
            .patch(
                "other-server",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(drop),
        "patch a Deployment other than the rollout's",
    );
    Api::<Deployment>::namespaced(sa.clone(), NS)
        .patch(
            "model-server",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("the rollout Role allows patching model-server");

    // A job: W=2, 300 steps (long enough to kill a rank mid-run even on a loaded machine),
    // checkpoints every 10, exported and rolled out to model-server.
    let config = TestJob::tiny("k8s")
        .world(2)
        .set("data.train", "[\"file://data.jsonl\"]")
        .steps(300)
        .set("checkpoint.every_steps", 10)
        .set("job.gang_timeout", "\"60s\"")
        .set("export.url", "\"file://export\"")
        .set("export.rollout", "\"model-server\"")
        .write_to(tmp.path());
    let out = submit(&api, &config, "e2e", &shared);
    assert!(
        out.contains(&format!("lockstepjob {NS}/e2e created")),
        "{out}"
    );
    // Submitting it again (a CronJob that runs twice) does nothing.
    let again = submit(&api, &config, "e2e", &shared);
    assert!(again.contains("already exists: nothing to do"), "{again}");

    // Attempt 1's objects exist, owned by the LockstepJob; the token only in the Secret.
    let jobsets = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &jobset_resource());
    let js = eventually(Duration::from_secs(60), "JobSet e2e-a1", || {
        let jobsets = jobsets.clone();
        async move { jobsets.get("e2e-a1").await.ok() }
    })
    .await;
    let job = lsj(&admin, "e2e").await.unwrap();
    let uid = job.metadata.uid.clone().unwrap();
    assert!(
        job.metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .contains(&"lockstep.dev/cleanup".to_string())
    );
    assert_eq!(owner_uid(&js.metadata), Some(uid.clone()), "JobSet owner");
    assert_eq!(js.data["spec"]["failurePolicy"]["maxRestarts"], 0);
    let secret = Api::<Secret>::namespaced(admin.clone(), NS)
        .get("e2e-token")
        .await
        .unwrap();
    assert_eq!(
        owner_uid(&secret.metadata),
        Some(uid.clone()),
        "Secret owner"
    );
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    assert!(token.len() >= 32);
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), NS)
        .get("e2e-config")
        .await
        .unwrap();
    assert_eq!(
        owner_uid(&cm.metadata),
        Some(uid.clone()),
        "ConfigMap owner"
    );
    let np = Api::<NetworkPolicy>::namespaced(admin.clone(), NS)
        .get("e2e-gang")
        .await
        .unwrap();
    assert_eq!(
        owner_uid(&np.metadata),
        Some(uid.clone()),
        "NetworkPolicy owner"
    );
    let everything = serde_json::to_string(&(&job, &js.data)).unwrap();
    assert!(
        !everything.contains(&token),
        "the token leaked into the spec or pod template"
    );

    // In-place recovery: the gang's Job fails a lost pod's index alone, without a retry of
    // its own (the coordinator makes the replacement).
    let gang = &js.data["spec"]["replicatedJobs"][0]["template"]["spec"];
    assert_eq!(
        (&gang["backoffLimitPerIndex"], &gang["maxFailedIndexes"]),
        (&json!(0), &json!(2)),
        "{gang}"
    );

    // Rank 1 dies (SIGKILL) mid-run: one new pod replaces it, joins the running gang and gets
    // the state from rank 0, whose pod keeps running untouched; no step is lost, no restart.
    let st = wait_status(
        &admin,
        "e2e",
        Duration::from_secs(180),
        "a committed checkpoint",
        |s| {
            s.last_committed_checkpoint.is_some_and(|c| c >= 10)
                && s.phase == Some(JobPhase::Running)
        },
    )
    .await;
    assert_eq!(st.attempt, 1);
    assert!(
        st.condition("Running").is_some_and(|c| c.status == "True"),
        "{st:#?}"
    );
    let pods = Api::<Pod>::namespaced(admin.clone(), NS);
    let rank0 = pods.get("e2e-a1-rank-0-0").await.unwrap().metadata.uid;
    let rank0_pid = cluster.pid("e2e-a1-rank-0-0").expect("rank 0 runs");
    let pid = cluster.pid("e2e-a1-rank-0-1").expect("rank 1 runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = wait_status(
        &admin,
        "e2e",
        Duration::from_secs(120),
        "rank 1 recovered in place",
        |s| s.recoveries.first().is_some_and(|r| r.steps_lost.is_some()),
    )
    .await;
    let r = &st.recoveries[0];
    assert_eq!(
        (r.rank, r.path.as_str(), r.steps_lost),
        (Some(1), "in-place", Some(0)),
        "{st:#?}"
    );
    assert!(r.cause.contains("rank 1 was killed by SIGKILL"), "{r:?}");
    assert_eq!((st.attempt, st.restarts), (1, 0), "{st:#?}");
    let names: Vec<String> = pods
        .list(&ListParams::default().labels("lockstep.dev/job=e2e,lockstep.dev/attempt=1"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        ["e2e-a1-rank-0-0", "e2e-a1-rank-0-1", "e2e-a1-rank-0-1-r1"],
        "exactly one new pod"
    );
    assert_eq!(
        pods.get("e2e-a1-rank-0-0").await.unwrap().metadata.uid,
        rank0,
        "rank 0's pod is the same pod"
    );
    assert_eq!(
        cluster.pid("e2e-a1-rank-0-0"),
        Some(rank0_pid),
        "rank 0's trainer is the same process"
    );

    // Success: the export Job runs, the version is promoted and model-server rolls to it.
    let st = wait_status(&admin, "e2e", Duration::from_secs(300), "exported", |s| {
        matches!(s.phase, Some(JobPhase::Exported | JobPhase::Failed))
    })
    .await;
    assert_eq!(st.phase, Some(JobPhase::Exported), "{st:#?}");
    assert_eq!(st.step, 300);
    assert_eq!((st.attempt, st.restarts), (1, 0), "{st:#?}");
    let version = st.export_version.clone().expect("export version");
    assert!(
        st.condition("Exported").is_some_and(|c| c.status == "True"),
        "{st:#?}"
    );
    assert!(
        st.condition("Succeeded")
            .is_some_and(|c| c.status == "True"),
        "{st:#?}"
    );
    assert_eq!(st.observed_generation, job.metadata.generation);
    let export = Api::<Job>::namespaced(admin.clone(), NS)
        .get("e2e-export")
        .await
        .unwrap();
    assert_eq!(
        owner_uid(&export.metadata),
        Some(uid.clone()),
        "export Job owner"
    );
    assert!(
        shared
            .join("export/k8s")
            .join(&version)
            .join("model.safetensors")
            .exists()
    );
    let d = Api::<Deployment>::namespaced(admin.clone(), NS)
        .get("model-server")
        .await
        .unwrap();
    let ann = d
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap_or_default();
    assert_eq!(ann.get("lockstep.dev/model-version"), Some(&version));

    // A LockstepJob that cannot run says why, naming the field.
    std::fs::create_dir_all(tmp.path().join("bad")).unwrap();
    std::fs::create_dir_all(tmp.path().join("long")).unwrap();
    let bad = TestJob::tiny("bad")
        .world(2)
        .write_to(&tmp.path().join("bad"));
    let out = lockstep()
        .env("KUBECONFIG", api.kubeconfig())
        .args(["render"])
        .arg(&bad)
        .args([
            "--namespace",
            NS,
            "--name",
            "bad",
            "--shared-volume",
            "x:/data",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut bad_lsj: LockstepJob = serde_yaml::from_slice(&out.stdout).unwrap();
    bad_lsj.spec.shared_volume = None; // relative file://ckpt with no volume to resolve it
    Api::<LockstepJob>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &bad_lsj)
        .await
        .unwrap();
    let st = wait_status(&admin, "bad", Duration::from_secs(30), "refused", |s| {
        s.phase == Some(JobPhase::Failed)
    })
    .await;
    let why = st.message.unwrap_or_default();
    assert!(
        why.contains("checkpoint.url") && why.contains("spec.sharedVolume"),
        "{why}"
    );

    // A config the API server accepts but lockstep cannot read (a duration `banana`) is
    // refused on its own, naming the field; the controller keeps listing the others (the
    // coordinator restart below lists it again).
    let mut poison = serde_json::to_value(&bad_lsj).unwrap();
    poison["metadata"]["name"] = json!("poison");
    poison["spec"]["config"]["job"]["gang_timeout"] = json!("banana");
    let poison: DynamicObject = serde_json::from_value(poison).unwrap();
    let lsj_resource = kube::core::ApiResource::erase::<LockstepJob>(&());
    Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &lsj_resource)
        .create(&PostParams::default(), &poison)
        .await
        .unwrap();
    let st = wait_status(&admin, "poison", Duration::from_secs(30), "refused", |s| {
        s.phase == Some(JobPhase::Failed)
    })
    .await;
    let why = st.message.unwrap_or_default();
    assert!(why.contains("spec.config.job.gang_timeout"), "{why}");

    // A pod that waits for what may never come is named in the status with the reason; one
    // that can never start (an invalid image name) fails the job at once, not at the gang
    // timeout (10 minutes here).
    let small = |name: &str, image: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = TestJob::tiny(name)
            .set("data.train", "[\"file://data.jsonl\"]")
            .checkpoint_url(&format!("file://ckpt-{name}"))
            .set("job.gang_timeout", "\"10m\"")
            .write_to(&dir);
        let out = lockstep()
            .env("KUBECONFIG", api.kubeconfig())
            .args(["submit", "--kubernetes"])
            .arg(&config)
            .args(["--namespace", NS, "--name", name, "--image", image])
            .arg(format!("--shared-volume=shared:{}", shared.display()))
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    small("stuck", "registry.invalid/lockstep:1", &[]);
    small("badname", "lockstep:unparseable", &[]);
    // One lockstep can tell is not an image reference is refused before anything is made.
    let out = lockstep()
        .env("KUBECONFIG", api.kubeconfig())
        .args(["submit", "--kubernetes"])
        .arg(tmp.path().join("bad").join("job.toml"))
        .args([
            "--namespace",
            NS,
            "--name",
            "upper",
            "--image",
            "Lockstep:BAD",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("spec.image `Lockstep:BAD`: not an image reference"),
        "{err}"
    );
    small("skewed", "lockstep:skewed", &[]);
    // A rank that cannot fit its pod's memory limit fails at once, naming the figures and the
    // knob, before any pod is made (not OOM-killed and restarted).
    small("cramped", "lockstep:test", &["--memory", "64Mi"]);
    // The export's webhook URL from a Secret: one that is not there is refused up front.
    small(
        "hooked",
        "lockstep:test",
        &[
            "--set",
            "export.url=\"file://exports-hooked\"",
            "--export-webhook-secret",
            "serving-hooks:url",
        ],
    );
    let st = wait_status(&admin, "stuck", Duration::from_secs(60), "Waiting", |s| {
        s.condition("Waiting").is_some_and(|c| c.status == "True")
    })
    .await;
    let waiting = st.condition("Waiting").unwrap();
    let said = waiting.message.clone().unwrap_or_default();
    assert_eq!(waiting.reason, "ImagePullBackOff", "{st:#?}");
    assert!(
        said.contains("pod stuck-a1-rank-0-0") && said.contains("spec.image"),
        "{said}"
    );
    assert_eq!(st.phase, Some(JobPhase::Admitting), "{st:#?}");
    let st = wait_status(&admin, "cramped", Duration::from_secs(60), "refused", |s| {
        s.phase == Some(JobPhase::Failed)
    })
    .await;
    let why = st.message.clone().unwrap_or_default();
    assert!(
        why.starts_with("spec.resources.memory: full fine-tuning of")
            && why.contains("spec.resources.memory has 67 MB")
            && why.contains("set [lora]"),
        "{why}"
    );
    let pods = Api::<Pod>::namespaced(admin.clone(), NS)
        .list(&ListParams::default().labels("lockstep.dev/job=cramped"))
        .await
        .unwrap();
    assert!(pods.items.is_empty(), "{:?}", pods.items.len());
    let st = wait_status(&admin, "badname", Duration::from_secs(60), "failed", |s| {
        s.phase == Some(JobPhase::Failed)
    })
    .await;
    let why = st.message.clone().unwrap_or_default();
    assert!(
        why.contains("InvalidImageName") && why.contains("badname-a1-rank-0-0"),
        "{why}"
    );
    assert_eq!(st.restarts, 0, "{st:#?}");
    // A worker whose config is not the one the coordinator started the job with refuses to
    // train, and that is not a restart's to fix.
    let st = wait_status(&admin, "skewed", Duration::from_secs(60), "failed", |s| {
        s.phase == Some(JobPhase::Failed)
    })
    .await;
    let why = st.message.clone().unwrap_or_default();
    assert!(
        why.contains("differs from the one the coordinator started"),
        "{why}"
    );
    assert_eq!(st.restarts, 0, "{st:#?}");
    let st = wait_status(&admin, "hooked", Duration::from_secs(60), "refused", |s| {
        s.phase == Some(JobPhase::Failed)
    })
    .await;
    let why = st.message.clone().unwrap_or_default();
    assert!(
        why.starts_with("spec.exportWebhookSecret: Secret serving-hooks has no key `url`"),
        "{why}"
    );

    // Kueue holds a gang back (its JobSet suspended): no gang timeout (3 s here) runs while it
    // is queued, the status says it waits; once admitted, it runs.
    let dir = tmp.path().join("queued");
    std::fs::create_dir_all(&dir).unwrap();
    let queued = TestJob::tiny("queued")
        .set("data.train", "[\"file://data.jsonl\"]")
        .checkpoint_url("file://ckpt-queued")
        .set("job.gang_timeout", "\"3s\"")
        .write_to(&dir);
    let out = lockstep()
        .env("KUBECONFIG", api.kubeconfig())
        .args(["submit", "--kubernetes"])
        .arg(&queued)
        .args([
            "--namespace",
            NS,
            "--name",
            "queued",
            "--image",
            "lockstep:test",
        ])
        .args(["--kueue-queue", "team-a"])
        .arg(format!("--shared-volume=shared:{}", shared.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = wait_status(&admin, "queued", Duration::from_secs(60), "queued", |s| {
        s.condition("Waiting").is_some_and(|c| c.reason == "Queued")
    })
    .await;
    assert!(
        st.condition("Waiting")
            .unwrap()
            .message
            .as_deref()
            .unwrap()
            .contains("team-a")
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let st = lsj(&admin, "queued").await.unwrap().status.unwrap();
    assert_eq!(
        (st.phase, st.attempt, st.restarts),
        (Some(JobPhase::Admitting), 1, 0),
        "{st:#?}"
    );
    let admit = json!({"spec": {"suspend": false}});
    jobsets
        .patch("queued-a1", &PatchParams::default(), &Patch::Merge(&admit))
        .await
        .unwrap();
    let st = wait_status(
        &admin,
        "queued",
        Duration::from_secs(120),
        "succeeded",
        |s| s.phase == Some(JobPhase::Succeeded),
    )
    .await;
    assert_eq!((st.attempt, st.restarts, st.step), (1, 0, 8), "{st:#?}");
    assert_eq!(
        st.condition("Waiting").map(|c| c.status.as_str()),
        Some("False")
    );
    for name in ["stuck", "badname", "skewed", "hooked", "queued"] {
        Api::<LockstepJob>::namespaced(admin.clone(), NS)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    // The coordinator is killed mid-job: its gang checkpoints the step it is at (rank 0
    // commits it) and exits; the next coordinator waits for that, adopts the job from its
    // status and restarts its gang (attempt + 1) from that checkpoint.
    let long = TestJob::tiny("k8s-long")
        .world(2)
        .set("data.train", "[\"file://data.jsonl\"]")
        .checkpoint_url("file://ckpt-long")
        .steps(100_000)
        .set("job.gang_timeout", "\"60s\"")
        .write_to(&tmp.path().join("long"));
    submit(&api, &long, "long", &shared);
    let st = wait_status(
        &admin,
        "long",
        Duration::from_secs(120),
        "running with a checkpoint",
        |s| s.phase == Some(JobPhase::Running) && s.last_committed_checkpoint.is_some(),
    )
    .await;
    assert_eq!(st.attempt, 1);
    let committed = st.last_committed_checkpoint.unwrap();
    coordinator.kill();
    // Edited while no coordinator runs: the next one keeps the config the job started with.
    let edit = json!({"spec": {"config": {"train": {"steps": 7}}}});
    Api::<LockstepJob>::namespaced(admin.clone(), NS)
        .patch("long", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let mut coordinator = Coordinator::start(&sa_kubeconfig, tmp.path());
    let st = wait_status(
        &admin,
        "long",
        Duration::from_secs(120),
        "adopted as attempt 2",
        |s| s.attempt == 2 && s.phase == Some(JobPhase::Running),
    )
    .await;
    assert!(
        st.last_committed_checkpoint.unwrap() >= committed,
        "{st:#?}"
    );
    let r = st
        .recoveries
        .last()
        .expect("the coordinator restart is a recovery");
    assert_eq!(r.path, "emergency-checkpoint", "{st:#?}");
    // "…; its workers checkpointed step N as they lost the coordinator, …", N at least the
    // step committed before the kill.
    let kept: u64 = r
        .cause
        .split("its workers checkpointed step ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{st:#?}"));
    assert!(kept >= committed, "{st:#?}");
    assert_eq!(
        st.total_steps, 100_000,
        "the edited spec.config was run: {st:#?}"
    );
    assert!(
        jobsets.get("long-a1").await.is_err(),
        "the old gang was left running"
    );

    // `lockstep status` through the coordinator's gRPC port (a port-forward in a cluster),
    // with the admin token from its Secret.
    let admin_secret = Api::<Secret>::namespaced(admin.clone(), NS)
        .get("lockstep-admin")
        .await
        .unwrap();
    let admin_token = String::from_utf8(admin_secret.data.unwrap()["token"].0.clone()).unwrap();
    let out = lockstep()
        .args(["status", st.job_id.as_deref().unwrap(), "--json"])
        .arg(format!(
            "--coordinator=http://127.0.0.1:{}",
            coordinator.port
        ))
        .env("LOCKSTEP_ADMIN_TOKEN", &admin_token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["attempt"], 2, "{shown}");
    // A plain `lockstep submit` cannot run here (the jobs are LockstepJobs): refused before
    // anything is made, saying how to submit instead.
    let out = lockstep()
        .arg("submit")
        .arg(&long)
        .arg(format!(
            "--coordinator=http://127.0.0.1:{}",
            coordinator.port
        ))
        .env("LOCKSTEP_ADMIN_TOKEN", &admin_token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("lockstep submit --kubernetes"), "{err}");

    // Suspend: the gang checkpoints and stops; resume: the next attempt continues from there.
    let lsjs = Api::<LockstepJob>::namespaced(admin.clone(), NS);
    // The image may change while it is suspended: the next attempt runs it.
    let suspend = |on: bool| json!({"spec": {"suspend": on, "image": "lockstep:edited"}});
    lsjs.patch(
        "long",
        &PatchParams::default(),
        &Patch::Merge(&suspend(true)),
    )
    .await
    .unwrap();
    let st = wait_status(&admin, "long", Duration::from_secs(60), "suspended", |s| {
        s.phase == Some(JobPhase::Suspended)
    })
    .await;
    let stopped_at = st.last_committed_checkpoint.unwrap();
    eventually(Duration::from_secs(30), "the suspended gang gone", || {
        let jobsets = jobsets.clone();
        async move { jobsets.get("long-a2").await.is_err().then_some(()) }
    })
    .await;
    lsjs.patch(
        "long",
        &PatchParams::default(),
        &Patch::Merge(&suspend(false)),
    )
    .await
    .unwrap();
    let st = wait_status(
        &admin,
        "long",
        Duration::from_secs(120),
        "resumed as attempt 3",
        |s| s.attempt == 3 && s.phase == Some(JobPhase::Running),
    )
    .await;
    assert!(
        st.last_committed_checkpoint.unwrap() >= stopped_at,
        "{st:#?}"
    );
    let a3 = jobsets.get("long-a3").await.unwrap();
    assert_eq!(
        a3.data["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
            [0]["image"],
        "lockstep:edited"
    );

    // A user's ConfigMap that a LockstepJob's would replace is neither overwritten nor,
    // when the LockstepJob goes, deleted.
    let mine: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "victim-config", "labels": {"lockstep.dev/job": "victim"}},
        "data": {"mine": "yes"}}))
    .unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &mine)
        .await
        .unwrap();
    std::fs::create_dir_all(tmp.path().join("victim")).unwrap();
    let victim = TestJob::tiny("k8s-victim")
        .set("data.train", "[\"file://data.jsonl\"]")
        .checkpoint_url("file://ckpt-victim")
        .write_to(&tmp.path().join("victim"));
    submit(&api, &victim, "victim", &shared);
    let st = wait_status(&admin, "victim", Duration::from_secs(60), "refused", |s| {
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("does not belong to this LockstepJob"))
    })
    .await;
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("ConfigMap lsj-test/victim-config"),
        "{st:#?}"
    );

    // Deleting LockstepJobs: the finalizer stops the gang and deletes everything made for it.
    for name in ["long", "e2e", "victim"] {
        Api::<LockstepJob>::namespaced(admin.clone(), NS)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(60), "the LockstepJobs gone", || {
        let admin = admin.clone();
        async move {
            (lsj(&admin, "long").await.is_none()
                && lsj(&admin, "e2e").await.is_none()
                && lsj(&admin, "victim").await.is_none())
            .then_some(())
        }
    })
    .await;
    let kept = Api::<ConfigMap>::namespaced(admin.clone(), NS)
        .get("victim-config")
        .await
        .expect("the user's ConfigMap survives");
    assert_eq!(
        kept.data.unwrap().get("mine").map(String::as_str),
        Some("yes")
    );
    let lp = ListParams::default().labels("lockstep.dev/job in (long,e2e)");
    for (kind, resource) in [
        ("JobSet", jobset_resource()),
        ("Job", kube::core::ApiResource::erase::<Job>(&())),
        ("Secret", kube::core::ApiResource::erase::<Secret>(&())),
        (
            "ConfigMap",
            kube::core::ApiResource::erase::<ConfigMap>(&()),
        ),
        ("Service", kube::core::ApiResource::erase::<Service>(&())),
        (
            "NetworkPolicy",
            kube::core::ApiResource::erase::<NetworkPolicy>(&()),
        ),
    ] {
        let left = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &resource)
            .list(&lp)
            .await
            .unwrap()
            .items;
        assert!(left.is_empty(), "{kind}s left: {left:?}");
    }
    coordinator.kill();
    kubelet.abort();
    // No trainer outlives its pod.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        cluster.running.lock().unwrap().is_empty(),
        "{:?}",
        cluster.running.lock().unwrap()
    );
}
