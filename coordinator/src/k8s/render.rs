//! The objects the controller creates for a LockstepJob, as JSON: pure functions of the
//! LockstepJob, the attempt and where the coordinator is, so `lockstep render` prints exactly
//! what the controller applies.
//!
//! Per job (owned by the LockstepJob): a ConfigMap with the config, a NetworkPolicy that lets
//! the trainer pods accept connections only from their own gang, and the Secret with the job's
//! token (never rendered: it is made when the coordinator gives the job one). Per attempt: a
//! JobSet (one replicated job of W pods; its headless Service is JobSet's own) or, where JobSet
//! is not installed, an Indexed Job and a headless Service. After training: the export Job.

use serde_json::{Value, json};

use super::crd::LockstepJob;
use super::{LABEL_ATTEMPT, LABEL_JOB, LABEL_MANAGED, LABEL_ROLE, LABEL_UID};
use crate::launcher::ExportSpec;

/// How an attempt's gang is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// A JobSet (`jobset.x-k8s.io/v1alpha2`).
    JobSet,
    /// An Indexed Job and a headless Service (where the JobSet CRD is not installed).
    IndexedJob,
}

/// Where the trainer pods read the config.
pub const CONFIG_PATH: &str = "/etc/lockstep/config.toml";
/// The pods' writable scratch: tokenised data and temporary files.
const CACHE_DIR: &str = "/var/cache/lockstep";
/// The non-root user every pod runs as (the image's `lockstep` user).
const RUN_AS: i64 = 65532;
/// Longest LockstepJob name: attempt objects are `NAME-aN` and pod host names
/// `NAME-aN-rank-0-I`, within 63 characters.
pub const MAX_NAME: usize = 40;

/// The labels of the coordinator's pods (`jobsets/coordinator.yaml`).
pub const COORDINATOR_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "lockstep"),
    ("app.kubernetes.io/component", "coordinator"),
];

/// What [`attempt_objects`] and [`job_objects`] need besides the LockstepJob.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The coordinator's job id.
    pub job_id: &'a str,
    /// The gRPC URL trainer pods reach the coordinator at.
    pub coordinator_url: &'a str,
    /// JobSet or Indexed Job.
    pub flavor: Flavor,
    /// A lost pod of an in-place job (`job.recovery = "in-place"`) is replaced by one new pod
    /// while the others keep running: the gang's Job fails that index alone, without a retry
    /// of its own (`backoffLimitPerIndex`, Kubernetes 1.29+). Else a lost pod fails the gang.
    pub replace_pods: bool,
}

/// The LockstepJob's name and namespace (checked: names are bounded for the objects made
/// from them).
pub fn name_of(lsj: &LockstepJob) -> Result<(&str, &str), String> {
    let name = lsj.metadata.name.as_deref().unwrap_or("");
    let ns = lsj.metadata.namespace.as_deref().unwrap_or("default");
    if !lockstep_api::config::is_dns_label(name) || name.len() > MAX_NAME {
        return Err(format!(
            "metadata.name `{name}`: must be 1–{MAX_NAME} lower-case letters, digits and `-` \
             (its pods are named after it)"
        ));
    }
    if !lockstep_api::config::is_dns_label(ns) {
        return Err(format!(
            "metadata.namespace `{ns}`: not a namespace name (1–63 lower-case letters, digits \
             and `-`)"
        ));
    }
    Ok((name, ns))
}

/// The owner reference every object of the job carries (deleting the LockstepJob deletes
/// them).
fn owner(lsj: &LockstepJob) -> Value {
    json!([{
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "LockstepJob",
        "name": lsj.metadata.name.clone().unwrap_or_default(),
        "uid": lsj.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

fn labels(lsj: &LockstepJob, name: &str, role: &str, attempt: Option<u32>) -> Value {
    let mut l = json!({
        "app.kubernetes.io/name": "lockstep",
        LABEL_MANAGED: "lockstep",
        LABEL_JOB: name,
        LABEL_ROLE: role,
    });
    if let Some(a) = attempt {
        l[LABEL_ATTEMPT] = json!(a.to_string());
    }
    // Which LockstepJob of that name: an earlier one's leftovers are never taken for its.
    if let Some(uid) = lsj.metadata.uid.as_deref().filter(|u| is_label_value(u)) {
        l[LABEL_UID] = json!(uid);
    }
    l
}

fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn metadata(
    lsj: &LockstepJob,
    name: &str,
    object: &str,
    role: &str,
    attempt: Option<u32>,
) -> Value {
    json!({
        "name": object,
        "namespace": lsj.metadata.namespace.as_deref().unwrap_or("default"),
        "labels": labels(lsj, name, role, attempt),
        "ownerReferences": owner(lsj),
    })
}

/// The job's ConfigMap: `config.toml` is the spec's config.
pub fn config_map_name(name: &str) -> String {
    format!("{name}-config")
}

/// The job's Secret: `token` (the job's token) and, with `export.webhook`, `webhook`.
pub fn secret_name(name: &str) -> String {
    format!("{name}-token")
}

/// The attempt's JobSet, or Job and Service.
pub fn attempt_name(name: &str, attempt: u32) -> String {
    format!("{name}-a{attempt}")
}

/// The export Job.
pub fn export_name(name: &str) -> String {
    format!("{name}-export")
}

/// The config as the trainers read it (TOML).
pub fn config_toml(lsj: &LockstepJob) -> Result<String, String> {
    toml::to_string(lsj.spec.config.get()?)
        .map_err(|e| format!("spec.config: cannot write it as TOML: {e}"))
}

/// Objects made once per job: the ConfigMap and the NetworkPolicy.
pub fn job_objects(lsj: &LockstepJob) -> Result<Vec<Value>, String> {
    let (name, _) = name_of(lsj)?;
    let config = config_toml(lsj)?;
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(lsj, name, &config_map_name(name), "trainer", None),
        "data": {"config.toml": config},
    });
    // Trainer pods accept connections only from their own gang (the gradient ring) and the
    // coordinator; they call the coordinator and S3 themselves, which egress rules leave open.
    let netpol = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(lsj, name, &format!("{name}-gang"), "trainer", None),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: name, LABEL_ROLE: "trainer"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {LABEL_JOB: name, LABEL_ROLE: "trainer"}}},
                    {"podSelector": {"matchLabels": COORDINATOR_LABELS.iter().copied().collect::<std::collections::BTreeMap<_, _>>()}},
                ]
            }],
        },
    });
    Ok(vec![cm, netpol])
}

/// The job's Secret (not part of `lockstep render`: it holds the token).
pub fn secret(lsj: &LockstepJob, token: &str) -> Result<Value, String> {
    let (name, _) = name_of(lsj)?;
    let mut data = json!({"token": token});
    if let Some(w) = lsj
        .spec
        .config
        .get()?
        .export
        .as_ref()
        .and_then(|e| e.webhook.as_ref())
    {
        data["webhook"] = json!(w);
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(lsj, name, &secret_name(name), "trainer", None),
        "type": "Opaque",
        "stringData": data,
    }))
}

/// The pod settings trainer and export pods share.
fn pod_spec(lsj: &LockstepJob, name: &str, container: Value, subdomain: Option<&str>) -> Value {
    let s = &lsj.spec;
    let mut pod = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name)}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    });
    if let Some(v) = &s.shared_volume
        && let Some(vols) = pod["volumes"].as_array_mut()
    {
        vols.push(json!({"name": "shared", "persistentVolumeClaim": {"claimName": v.claim_name}}));
    }
    if let Some(sub) = subdomain {
        pod["subdomain"] = json!(sub);
    }
    if let Some(sa) = &s.service_account_name {
        pod["serviceAccountName"] = json!(sa);
    }
    if !s.node_selector.is_empty() {
        pod["nodeSelector"] = json!(s.node_selector);
    }
    if !s.tolerations.is_empty() {
        pod["tolerations"] = json!(s.tolerations);
    }
    pod
}

fn container(lsj: &LockstepJob, cname: &str, args: Vec<String>, mut env: Vec<Value>) -> Value {
    let s = &lsj.spec;
    env.push(json!({"name": "HOME", "value": "/tmp"}));
    let mut c = json!({
        "name": cname,
        "image": s.image,
        "args": args,
        "env": env,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/lockstep", "readOnly": true},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    if let Some(p) = &s.image_pull_policy {
        c["imagePullPolicy"] = json!(p);
    }
    if let Some(secret) = &s.s3_credentials_secret {
        c["envFrom"] = json!([{"secretRef": {"name": secret}}]);
    }
    let mut limits = serde_json::Map::new();
    if let Some(cpu) = &s.resources.cpu {
        limits.insert("cpu".into(), json!(cpu));
    }
    if let Some(m) = &s.resources.memory {
        limits.insert("memory".into(), json!(m));
    }
    if let Some(g) = s.resources.gpu.filter(|g| *g > 0) {
        limits.insert("nvidia.com/gpu".into(), json!(g.to_string()));
    }
    if !limits.is_empty() {
        c["resources"] = json!({"requests": limits.clone(), "limits": limits});
    }
    if let Some(v) = &s.shared_volume {
        // Relative file:// URLs of the config resolve here, as in `lockstep run`'s directory.
        c["workingDir"] = json!(v.mount_path);
        if let Some(m) = c["volumeMounts"].as_array_mut() {
            m.push(json!({"name": "shared", "mountPath": v.mount_path}));
        }
    }
    c
}

/// The trainer pod template of `attempt`.
fn trainer_template(lsj: &LockstepJob, t: &Target<'_>, attempt: u32) -> Result<Value, String> {
    let (name, _) = name_of(lsj)?;
    let mut args: Vec<String> = [
        "train",
        "--config",
        CONFIG_PATH,
        "--no-progress",
        "--coordinator",
        t.coordinator_url,
        "--job",
        t.job_id,
        "--attempt",
        &attempt.to_string(),
        // Kubernetes expands $(VAR) from the container's environment.
        "--worker",
        "$(LOCKSTEP_WORKER)",
        "--data-cache",
        &format!("{CACHE_DIR}/tokens"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if lsj.spec.resources.gpu.is_some_and(|g| g > 0) {
        args.extend(["--device".to_string(), "cuda".to_string()]);
    }
    let env = vec![
        // The pod's index in the gang: set on Indexed Job (and so JobSet) pods.
        json!({"name": "LOCKSTEP_WORKER", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}),
        // The gradient ring listens on the pod's IP.
        json!({"name": "LOCKSTEP_DATA_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        // The job's token: from its Secret, never in the spec, the args or a log.
        json!({"name": "LOCKSTEP_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": secret_name(name), "key": "token"}}}),
    ];
    let mut c = container(lsj, "trainer", args, env);
    // A failed trainer's last log lines become its pod's termination message: the
    // coordinator reads the `error: …` line there.
    c["terminationMessagePolicy"] = json!("FallbackToLogsOnError");
    let subdomain = (t.flavor == Flavor::IndexedJob).then(|| attempt_name(name, attempt));
    Ok(json!({
        "metadata": {"labels": labels(lsj, name, "trainer", Some(attempt))},
        "spec": pod_spec(lsj, name, c, subdomain.as_deref()),
    }))
}

/// The objects of `attempt`: a JobSet, or an Indexed Job and its headless Service.
pub fn attempt_objects(
    lsj: &LockstepJob,
    t: &Target<'_>,
    attempt: u32,
) -> Result<Vec<Value>, String> {
    let (name, _) = name_of(lsj)?;
    let world = lsj.spec.config.get()?.job.world_size;
    let object = attempt_name(name, attempt);
    let queue = lsj.spec.scheduling.kueue_queue.as_deref();
    let mut meta = metadata(lsj, name, &object, "trainer", Some(attempt));
    if let Some(q) = queue {
        meta["labels"]["kueue.x-k8s.io/queue-name"] = json!(q);
    }
    let mut job_spec = json!({
        "parallelism": world,
        "completions": world,
        "completionMode": "Indexed",
        // The coordinator owns restarts: a failed pod fails the attempt.
        "backoffLimit": 0,
        "template": trainer_template(lsj, t, attempt)?,
    });
    if replaces_pods(lsj, t)? {
        // The coordinator owns replacements too: a failed pod fails its index only (never
        // retried by the Job, which would race the coordinator's replacement pod), the other
        // pods keep running, and the Job never fails early (at most every index fails).
        job_spec["backoffLimit"] = json!(i32::MAX);
        job_spec["backoffLimitPerIndex"] = json!(0);
        job_spec["maxFailedIndexes"] = json!(world);
        job_spec["podReplacementPolicy"] = json!("Failed");
    }
    Ok(match t.flavor {
        Flavor::JobSet => {
            let mut spec = json!({
                "failurePolicy": {"maxRestarts": 0},
                "network": {"enableDNSHostnames": true},
                "replicatedJobs": [{"name": "rank", "replicas": 1, "template": {"spec": job_spec}}],
            });
            if queue.is_some() {
                // Kueue admits the whole gang or nothing, then unsuspends it.
                spec["suspend"] = json!(true);
            }
            vec![json!({
                "apiVersion": "jobset.x-k8s.io/v1alpha2",
                "kind": "JobSet",
                "metadata": meta,
                "spec": spec,
            })]
        }
        Flavor::IndexedJob => {
            let mut spec = job_spec;
            if queue.is_some() {
                spec["suspend"] = json!(true);
            }
            let service = json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(lsj, name, &object, "trainer", Some(attempt)),
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": true,
                    "selector": {LABEL_JOB: name, LABEL_ATTEMPT: attempt.to_string()},
                },
            });
            vec![
                service,
                json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}),
            ]
        }
    })
}

/// Whether `attempt_objects` lets a lost pod be replaced alone (see [`Target::replace_pods`]).
pub fn replaces_pods(lsj: &LockstepJob, t: &Target<'_>) -> Result<bool, String> {
    let job = &lsj.spec.config.get()?.job;
    Ok(t.replace_pods && job.recovery.is_in_place() && job.world_size > 1)
}

/// The name of the pod that replaces lost `worker` of `attempt`, joining ring `generation`.
pub fn replacement_pod_name(name: &str, attempt: u32, worker: u32, generation: u32) -> String {
    format!(
        "{}-rank-0-{worker}-r{generation}",
        attempt_name(name, attempt)
    )
}

/// The pod that replaces lost `worker` of `attempt` (in-place recovery), joining ring
/// `generation`: a pod of the gang's live pod `template` (as the attempt's JobSet or Job holds it)
/// with that worker's index, owned by the attempt's JobSet or Job (`owner`: its apiVersion, kind
/// and uid) so it goes with the attempt. It carries none of a Job controller's labels, so no Job
/// takes it for its own.
pub fn replacement_pod(
    lsj: &LockstepJob,
    template: &Value,
    attempt: u32,
    worker: u32,
    generation: u32,
    owner: (&str, &str, &str),
) -> Result<Value, String> {
    let (name, _) = name_of(lsj)?;
    if !template["spec"]["containers"].is_array() {
        return Err(format!(
            "{}: the gang's pod template has no containers",
            attempt_name(name, attempt)
        ));
    }
    let mut labels = template["metadata"]["labels"].clone();
    if let Some(l) = labels.as_object_mut() {
        l.retain(|k, _| {
            !matches!(
                k.as_str(),
                "controller-uid"
                    | "job-name"
                    | "batch.kubernetes.io/controller-uid"
                    | "batch.kubernetes.io/job-name"
            )
        });
    }
    let mut annotations = template["metadata"]["annotations"].clone();
    if !annotations.is_object() {
        annotations = json!({});
    }
    // Where the trainer reads its worker index (as on a Job's pods).
    annotations["batch.kubernetes.io/job-completion-index"] = json!(worker.to_string());
    let (api_version, kind, uid) = owner;
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": replacement_pod_name(name, attempt, worker, generation),
            "namespace": lsj.metadata.namespace.as_deref().unwrap_or("default"),
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": api_version,
                "kind": kind,
                "name": attempt_name(name, attempt),
                "uid": uid,
            }],
        },
        "spec": template["spec"],
    }))
}

/// The export Job: `lockstep export … --promote`, its JSON result in the pod's termination
/// message.
pub fn export_job(lsj: &LockstepJob, spec: &ExportSpec) -> Result<Value, String> {
    let (name, _) = name_of(lsj)?;
    let mut args: Vec<String> = vec![
        "export".into(),
        spec.checkpoint.clone(),
        "--to".into(),
        spec.to.clone(),
        "--name".into(),
        spec.name.clone(),
        "--dtype".into(),
        spec.dtype.clone(),
        "--lora".into(),
        spec.lora.clone(),
        "--promote".into(),
        "--json".into(),
        "--max-eval-regression".into(),
        spec.max_eval_regression.to_string(),
        "--lineage".into(),
        spec.lineage.clone(),
        "--result-file".into(),
        "/dev/termination-log".into(),
    ];
    if let Some(base) = &spec.base {
        args.extend(["--base".into(), base.clone()]);
    }
    // From a Secret (the URL may carry credentials): the user's, or the job's own with the
    // config's `export.webhook`.
    let webhook = match (&lsj.spec.export_webhook_secret, &spec.webhook) {
        (Some(w), _) => Some((w.name.clone(), w.key.as_str())),
        (None, Some(_)) => Some((secret_name(name), "webhook")),
        (None, None) => None,
    };
    let env: Vec<Value> = webhook
        .map(|(secret, key)| {
            json!({"name": "LOCKSTEP_EXPORT_WEBHOOK", "valueFrom": {"secretKeyRef": {
                "name": secret, "key": key}}})
        })
        .into_iter()
        .collect();
    let mut c = container(lsj, "export", args, env);
    // The result goes to the termination log; a failed export's last log lines do instead.
    c["terminationMessagePolicy"] = json!("FallbackToLogsOnError");
    let mut pod = pod_spec(lsj, name, c, None);
    // Exporting needs no GPU: the export pod asks for no accelerator.
    if let Some(r) = pod["containers"][0].get_mut("resources") {
        for k in ["requests", "limits"] {
            if let Some(m) = r.get_mut(k).and_then(Value::as_object_mut) {
                m.remove("nvidia.com/gpu");
            }
        }
    }
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(lsj, name, &export_name(name), "export", None),
        "spec": {
            // An export is idempotent (the same weights make the same version): retried twice.
            "backoffLimit": 2,
            "activeDeadlineSeconds": 6 * 3600,
            "template": {
                "metadata": {"labels": labels(lsj, name, "export", None)},
                "spec": pod,
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::SecretKey;

    fn export_spec(webhook: Option<&str>) -> ExportSpec {
        ExportSpec {
            job_id: "e2e-0123abcd456789ef".into(),
            checkpoint: "s3://bucket/ckpt@8".into(),
            to: "s3://bucket/exports".into(),
            name: "e2e".into(),
            dtype: "f32".into(),
            lora: "merge".into(),
            base: None,
            max_eval_regression: 0.0,
            lineage: "{}".into(),
            webhook: webhook.map(str::to_string),
            workdir: "/".into(),
            log: "/dev/null".into(),
            placement: crate::launcher::Placement::Here,
        }
    }

    /// Where the export pod's LOCKSTEP_EXPORT_WEBHOOK comes from: (Secret, key).
    fn webhook_source(job: &Value) -> Option<(String, String)> {
        let env = job["spec"]["template"]["spec"]["containers"][0]["env"].as_array()?;
        let e = env
            .iter()
            .find(|e| e["name"] == "LOCKSTEP_EXPORT_WEBHOOK")?;
        let r = &e["valueFrom"]["secretKeyRef"];
        Some((r["name"].as_str()?.into(), r["key"].as_str()?.into()))
    }

    #[test]
    fn the_export_pod_reads_the_webhook_from_a_secret_never_from_its_spec() {
        let mut lsj = LockstepJob::test("e2e");
        let plain = export_job(&lsj, &export_spec(Some("https://hook.example/x"))).unwrap();
        assert_eq!(
            webhook_source(&plain),
            Some(("e2e-token".into(), "webhook".into()))
        );
        assert!(!plain.to_string().contains("hook.example"), "{plain}");
        lsj.spec.export_webhook_secret = Some(SecretKey {
            name: "serving-hooks".into(),
            key: "url".into(),
        });
        let referenced = export_job(&lsj, &export_spec(None)).unwrap();
        assert_eq!(
            webhook_source(&referenced),
            Some(("serving-hooks".into(), "url".into()))
        );
        lsj.spec.export_webhook_secret = None;
        assert_eq!(
            webhook_source(&export_job(&lsj, &export_spec(None)).unwrap()),
            None
        );
    }
}
