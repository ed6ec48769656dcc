//! What the v1.20 API server of the Kubernetes tests cannot serve, against kube's `tower_test`
//! mock of an API server: the Indexed Job gang (completionMode Indexed is v1.21+) — the objects
//! the launcher applies, a pod's termination becoming its worker's exit, and the kill deleting
//! the attempt. The same launcher's JobSet gang runs against a real API server in
//! cli/tests/kubernetes.rs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use lockstep_coordinator::k8s::{Flavor, KubeLauncher, LockstepJob};
use lockstep_coordinator::launcher::{Launcher, Placement, WorkerSpec};
use serde_json::{Value, json};

/// (method, path and query, body) of every call.
type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Answers as an API server would: nothing exists before it is applied; an apply returns the
/// object (a get then returns it too); a create returns the object; listing pods returns worker
/// 1's pod, killed by SIGKILL; a watch stays open; a delete succeeds.
fn api_server() -> (Client, Calls) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    tokio::spawn(async move {
        let mut open_watches = Vec::new();
        let mut applied = std::collections::HashMap::<String, Value>::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let body = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.lock()
                .unwrap()
                .push((method.clone(), uri.clone(), body.clone()));
            let reply = match method.as_str() {
                "PATCH" | "POST" => {
                    let mut o = body;
                    o["metadata"]["resourceVersion"] = json!("1");
                    o["metadata"]["uid"] = json!("u");
                    let path = uri.split('?').next().unwrap_or("").to_string();
                    applied.insert(path, o.clone());
                    o
                }
                "GET" if uri.contains("watch=true") => {
                    open_watches.push(send);
                    continue;
                }
                "GET" if applied.contains_key(&uri) => applied[&uri].clone(),
                // Nothing of the job exists yet (the owner check before each apply).
                "GET" if !uri.contains("/pods") => {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"});
                    let mut r = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    send.send_response(r);
                    continue;
                }
                "GET" => json!({"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"}, "items": [{
                        "metadata": {"name": "ft-a1-1-xyz", "namespace": "ml",
                            "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                "name": "ft-a1", "uid": "u", "controller": true}]},
                        "status": {"phase": "Failed", "containerStatuses": [{
                            "name": "trainer", "image": "lockstep", "imageID": "", "ready": false,
                            "restartCount": 0, "state": {"terminated": {"exitCode": 137,
                                "message": "step 3/10\nerror: the ring to rank 0 broke"}}}]}}]}),
                "DELETE" => json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                other => panic!("unexpected {other} {uri}"),
            };
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&reply).unwrap(),
            )));
        }
    });
    (Client::new(service, "default"), calls)
}

/// The DELETE calls so far, once `done` says they are what the test waits for (within 10 s).
async fn deleted_once(calls: &Calls, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let deleted: Vec<String> = calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(m, _, _)| m == "DELETE")
                .map(|(_, u, _)| u.clone())
                .collect();
            if done(&deleted) {
                return deleted;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} not deleted within 10 s"))
}

fn lockstep_job() -> LockstepJob {
    let config = lockstep_api::testing::TestJob::tiny("ft")
        .world(2)
        .checkpoint_url("s3://bucket/ft")
        .config()
        .unwrap();
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "LockstepJob",
        "metadata": {"name": "ft", "namespace": "ml", "uid": "0123456789abcdef-0000"},
        "spec": {"config": config, "image": "lockstep:1", "resources": {"gpu": 1}},
    }))
    .unwrap()
}

fn worker(w: u32) -> WorkerSpec {
    WorkerSpec {
        job_id: "ft-0123456789abcdef".into(),
        attempt: 1,
        worker: w,
        coordinator: "http://lockstep-coordinator.ml.svc:7070".into(),
        token: "t".repeat(43),
        config: "/unused".into(),
        overrides: Vec::new(),
        workdir: "/".into(),
        log: "/unused".into(),
        data_cache: "/unused".into(),
        replacing: None,
        placement: Placement::Pods(Arc::new(lockstep_job())),
    }
}

#[tokio::test]
async fn an_indexed_job_gang_is_applied_its_pod_exits_reach_the_workers_and_kill_deletes_it() {
    let (client, calls) = api_server();
    let launcher = KubeLauncher::new(client, Flavor::IndexedJob);
    let (tx0, mut rx0) = tokio::sync::mpsc::unbounded_channel();
    let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
    let w0 = launcher.launch(&worker(0), tx0).await.unwrap();
    let _w1 = launcher.launch(&worker(1), tx1).await.unwrap();

    // Worker 1's pod was killed (exit 137): its worker exits by SIGKILL, with its last words.
    let exit = tokio::time::timeout(Duration::from_secs(10), rx1.recv())
        .await
        .expect("worker 1's exit")
        .unwrap();
    assert_eq!((exit.code, exit.signal), (None, Some(9)), "{exit:?}");
    assert_eq!(
        exit.message.as_deref(),
        Some("error: the ring to rank 0 broke")
    );
    assert!(rx0.try_recv().is_err(), "worker 0 still runs");

    let applied: Vec<(String, String, Value)> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _, _)| m == "PATCH")
        .cloned()
        .collect();
    let find = |path: &str| {
        applied
            .iter()
            .find(|(_, uri, _)| uri.starts_with(path))
            .unwrap_or_else(|| panic!("no apply of {path}: {applied:#?}"))
    };
    // Server-side apply, as lockstep, forcing its fields.
    let (_, uri, _) = find("/apis/batch/v1/namespaces/ml/jobs/ft-a1");
    assert!(
        uri.contains("fieldManager=lockstep") && uri.contains("force=true"),
        "{uri}"
    );
    let (_, _, job) = find("/apis/batch/v1/namespaces/ml/jobs/ft-a1");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["completions"], 2);
    assert_eq!(job["spec"]["parallelism"], 2);
    assert_eq!(
        job["spec"]["backoffLimit"], 0,
        "the coordinator owns restarts"
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["subdomain"], "ft-a1",
        "pods resolve through the headless Service"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--device", "cuda"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--worker", "$(LOCKSTEP_WORKER)"]),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.contains(&"t".repeat(43))),
        "the token is in the args"
    );
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "LockstepJob");
    let (_, _, svc) = find("/api/v1/namespaces/ml/services/ft-a1");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["selector"]["lockstep.dev/attempt"], "1");
    let (_, _, secret) = find("/api/v1/namespaces/ml/secrets/ft-token");
    assert_eq!(secret["stringData"]["token"], "t".repeat(43));
    find("/api/v1/namespaces/ml/configmaps/ft-config");
    find("/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/ft-gang");

    // Killing a worker deletes the attempt's Job and Service; its exit arrives.
    w0.kill();
    let exit = tokio::time::timeout(Duration::from_secs(10), rx0.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.signal, Some(9));
    deleted_once(&calls, "the attempt's Job and Service", |d| {
        d.iter()
            .any(|u| u.starts_with("/apis/batch/v1/namespaces/ml/jobs/ft-a1"))
            && d.iter()
                .any(|u| u.starts_with("/api/v1/namespaces/ml/services/ft-a1"))
    })
    .await;
}

#[tokio::test]
async fn a_lost_pod_of_an_in_place_gang_is_replaced_by_one_pod_and_its_job_fails_no_other() {
    let (client, calls) = api_server();
    let launcher = KubeLauncher::replacing_pods(client, Flavor::IndexedJob, true);
    assert!(launcher.replaces_in_place());
    let (tx0, _rx0) = tokio::sync::mpsc::unbounded_channel();
    let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
    let _w0 = launcher.launch(&worker(0), tx0).await.unwrap();
    let _w1 = launcher.launch(&worker(1), tx1).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), rx1.recv())
        .await
        .expect("worker 1's exit")
        .unwrap();
    assert_eq!(exit.worker, 1);

    // The Job fails a lost pod's index alone and never retries it itself.
    let job = calls
        .lock()
        .unwrap()
        .iter()
        .find(|(m, u, _)| m == "PATCH" && u.starts_with("/apis/batch/v1/namespaces/ml/jobs/ft-a1"))
        .map(|(_, _, b)| b.clone())
        .expect("the Job applied");
    assert_eq!(job["spec"]["backoffLimitPerIndex"], 0, "{job}");
    assert_eq!(job["spec"]["maxFailedIndexes"], 2, "{job}");
    assert_eq!(job["spec"]["podReplacementPolicy"], "Failed", "{job}");
    assert_eq!(job["spec"]["backoffLimit"], i32::MAX, "{job}");

    // Its replacement: one pod, owned by the attempt's Job, with worker 1's index.
    let (tx1b, mut rx1b) = tokio::sync::mpsc::unbounded_channel();
    let mut spec = worker(1);
    spec.replacing = Some(1);
    let w1b = launcher.launch(&spec, tx1b).await.unwrap();
    let created: Vec<(String, Value)> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _, _)| m == "POST")
        .map(|(_, u, b)| (u.clone(), b.clone()))
        .collect();
    assert_eq!(created.len(), 1, "{created:#?}");
    let (uri, pod) = &created[0];
    assert!(uri.starts_with("/api/v1/namespaces/ml/pods"), "{uri}");
    assert_eq!(pod["metadata"]["name"], "ft-a1-rank-0-1-r1");
    assert_eq!(
        pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"],
        "1"
    );
    assert_eq!(pod["metadata"]["labels"]["lockstep.dev/attempt"], "1");
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"], &owner["uid"]),
        (&json!("Job"), &json!("ft-a1"), &json!("u"))
    );
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    assert_eq!(pod["spec"]["containers"][0]["name"], "trainer");
    assert!(
        rx1b.try_recv().is_err(),
        "the lost pod's exit is not its replacement's"
    );

    // Killing that worker alone deletes its pod — the replacement, not the pod it replaced —
    // and not the attempt; its exit arrives.
    w1b.kill_one();
    let exit = tokio::time::timeout(Duration::from_secs(10), rx1b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((exit.worker, exit.signal), (1, Some(9)));
    let deleted = deleted_once(&calls, "worker 1's replacement pod", |d| {
        d.iter()
            .any(|u| u.starts_with("/api/v1/namespaces/ml/pods/ft-a1-rank-0-1-r1"))
    })
    .await;
    assert!(
        !deleted.iter().any(|u| u.contains("ft-a1-1-xyz")),
        "the replaced pod was deleted again: {deleted:?}"
    );
    assert!(
        !deleted.iter().any(|u| u.contains("/jobs/")),
        "the attempt's Job was deleted: {deleted:?}"
    );
}

#[tokio::test]
async fn killing_one_lost_worker_deletes_the_pod_its_job_made_for_it_and_nothing_else() {
    let (client, calls) = api_server();
    let launcher = KubeLauncher::replacing_pods(client, Flavor::IndexedJob, true);
    let (tx0, _rx0) = tokio::sync::mpsc::unbounded_channel();
    let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
    let _w0 = launcher.launch(&worker(0), tx0).await.unwrap();
    let w1 = launcher.launch(&worker(1), tx1).await.unwrap();
    // Rank 1 hangs (no heartbeat): only its pod goes.
    w1.kill_one();
    let exit = tokio::time::timeout(Duration::from_secs(10), rx1.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.worker, 1);
    let deleted = deleted_once(&calls, "rank 1's pod", |d| !d.is_empty()).await;
    assert_eq!(
        deleted,
        ["/api/v1/namespaces/ml/pods/ft-a1-1-xyz?"],
        "only rank 1's pod"
    );
    let listed = calls
        .lock()
        .unwrap()
        .iter()
        .find(|(m, u, _)| m == "GET" && u.contains("/pods?") && !u.contains("watch"))
        .map(|(_, u, _)| u.clone())
        .unwrap();
    assert!(
        listed.contains("lockstep.dev%2Fjob-uid%3D0123456789abcdef-0000"),
        "only this LockstepJob's pods: {listed}"
    );
}
