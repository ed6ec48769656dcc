//! The `LockstepJob` custom resource (`lockstep.dev/v1alpha1`, short name `lsj`): a job config
//! (the TOML schema, [`JobConfig`], reused as is) plus how its pods run; its status is the
//! job's record on Kubernetes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::CustomResource;
use lockstep_api::{JobConfig, Phase};

use super::names::{is_dns_subdomain, is_image_ref, is_quantity};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A fine-tune: the job config and how its gang of pods runs.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "LockstepJob",
    plural = "lockstepjobs",
    shortname = "lsj",
    namespaced,
    status = "LockstepJobStatus",
    doc = "A lockstep fine-tune: a job config run as a gang of trainer pods.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Attempt","type":"integer","jsonPath":".status.attempt"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Of","type":"integer","jsonPath":".status.totalSteps"}"#,
    printcolumn = r#"{"name":"Loss","type":"number","jsonPath":".status.loss"}"#,
    printcolumn = r#"{"name":"Checkpoint","type":"integer","jsonPath":".status.lastCommittedCheckpoint"}"#,
    printcolumn = r#"{"name":"Export","type":"string","jsonPath":".status.exportVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockstepJobSpec {
    /// The job config: the same fields as the TOML file (`job`, `model`, `data`, `train`,
    /// `checkpoint`, `export`). URLs must be `s3://` or absolute `file://` paths on a volume
    /// every pod mounts at the same place.
    #[schemars(with = "JobConfig")]
    pub config: SpecConfig,
    /// The lockstep image every pod runs (the one `lockstep` binary).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never` (default: Kubernetes' own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// What each trainer pod asks for (requests = limits).
    #[serde(default)]
    pub resources: PodResources,
    /// Node labels the trainer pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the trainer pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The ServiceAccount the trainer pods run as (default: the namespace's `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// A Secret in this namespace holding S3 settings (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, `AWS_REGION`, …), given to every trainer and
    /// export pod as environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_credentials_secret: Option<String>,
    /// A PersistentVolumeClaim (ReadWriteMany: NFS and the like) every trainer and export pod
    /// mounts at `mountPath` and runs in, so relative `file://` URLs of the config resolve
    /// under it as they do in `lockstep run`'s working directory. The coordinator must mount
    /// the same claim at the same path (it commits the checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_volume: Option<SharedVolume>,
    /// Where the export's webhook URL is (`export.webhook` of the config, which then stays
    /// unset): a key of a Secret in this namespace, as the URL may carry credentials. The
    /// coordinator checks that it is there before the job starts; only the export pod reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_webhook_secret: Option<SecretKey>,
    /// Gang admission.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// A suspended job starts no pods; suspending a running job checkpoints and stops it, and
    /// resuming continues from that checkpoint.
    #[serde(default)]
    pub suspend: bool,
}

/// `spec.config` as read: the config, or why it cannot be read. A LockstepJob whose config
/// does not parse (a duration `banana`, a number out of range) is refused on its own, instead
/// of failing the controller's list of every LockstepJob.
#[derive(Debug, Clone, PartialEq)]
pub enum SpecConfig {
    /// A config that parsed (not yet validated: see [`JobConfig::validate`]).
    Valid(Box<JobConfig>),
    /// What was there, and why it is not a config (naming the field).
    Invalid {
        /// The object as stored.
        raw: serde_json::Value,
        /// Why it does not parse.
        error: String,
    },
}

impl SpecConfig {
    /// The config, or why there is none (the message names the field).
    pub fn get(&self) -> Result<&JobConfig, String> {
        match self {
            SpecConfig::Valid(c) => Ok(c.as_ref()),
            SpecConfig::Invalid { error, .. } => Err(error.clone()),
        }
    }
}

impl From<JobConfig> for SpecConfig {
    fn from(c: JobConfig) -> SpecConfig {
        SpecConfig::Valid(Box::new(c))
    }
}

impl Serialize for SpecConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SpecConfig::Valid(c) => c.serialize(s),
            SpecConfig::Invalid { raw, .. } => raw.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SpecConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SpecConfig, D::Error> {
        let raw = serde_json::Value::deserialize(d)?;
        Ok(
            match serde_path_to_error::deserialize::<_, JobConfig>(&raw) {
                Ok(c) => SpecConfig::Valid(Box::new(c)),
                Err(e) => SpecConfig::Invalid {
                    error: format!("spec.config.{}: {}", e.path(), e.inner()),
                    raw,
                },
            },
        )
    }
}

/// Requests (= limits) of one trainer pod. Unset means none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodResources {
    /// CPU, as Kubernetes writes quantities (`"4"`, `"500m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory (`"16Gi"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// `nvidia.com/gpu` per pod (run with `--device cuda`; 0 or unset: CPU training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
}

/// A claim mounted by every pod of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedVolume {
    /// The PersistentVolumeClaim in this namespace.
    pub claim_name: String,
    /// Where it is mounted (absolute); the pods' working directory.
    pub mount_path: String,
}

/// A key of a Secret in the LockstepJob's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKey {
    /// The Secret.
    pub name: String,
    /// The key whose value is used.
    pub key: String,
}

/// How the gang is admitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scheduling {
    /// A Kueue LocalQueue: the attempt's JobSet carries `kueue.x-k8s.io/queue-name` and is
    /// created suspended, so Kueue admits all of its pods or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kueue_queue: Option<String>,
}

#[cfg(test)]
impl LockstepJob {
    /// A LockstepJob as the API server would hand it over (namespace `ns`, a uid, generation
    /// 1, no status) running `TestJob::tiny(name)` with checkpoints on S3, for unit tests.
    pub fn test(name: &str) -> LockstepJob {
        let config = lockstep_api::testing::TestJob::tiny(name)
            .checkpoint_url("s3://bucket/ckpt")
            .config()
            .unwrap_or_else(|e| panic!("TestJob: {e}"));
        LockstepJob {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some("0123abcd-4567-89ef-0123-456789abcdef".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: LockstepJobSpec {
                config: config.into(),
                image: "lockstep:1".into(),
                image_pull_policy: None,
                resources: PodResources::default(),
                node_selector: BTreeMap::new(),
                tolerations: Vec::new(),
                service_account_name: None,
                s3_credentials_secret: None,
                shared_volume: None,
                export_webhook_secret: None,
                scheduling: Scheduling::default(),
                suspend: false,
            },
            status: None,
        }
    }
}

impl LockstepJobSpec {
    /// What the config cannot say: the pod settings are usable. The error names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.image.len() > 512 || !is_image_ref(&self.image) {
            return Err(format!(
                "spec.image `{}`: not an image reference ([REGISTRY/]NAME[:TAG][@DIGEST], the \
                 name in lower case)",
                self.image
            ));
        }
        if let Some(p) = &self.image_pull_policy
            && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
        {
            return Err(format!(
                "spec.imagePullPolicy `{p}`: must be Always, IfNotPresent or Never"
            ));
        }
        for (field, q) in [
            ("spec.resources.cpu", &self.resources.cpu),
            ("spec.resources.memory", &self.resources.memory),
        ] {
            if let Some(q) = q
                && !is_quantity(q)
            {
                return Err(format!(
                    "{field} `{q}`: not a Kubernetes quantity (e.g. \"4\", \"500m\", \"16Gi\")"
                ));
            }
        }
        if let Some(g) = self.resources.gpu
            && g > 64
        {
            return Err(format!("spec.resources.gpu {g}: at most 64 per pod"));
        }
        for (field, name) in [
            ("spec.serviceAccountName", &self.service_account_name),
            ("spec.s3CredentialsSecret", &self.s3_credentials_secret),
            ("spec.scheduling.kueueQueue", &self.scheduling.kueue_queue),
        ] {
            if let Some(n) = name
                && !is_dns_subdomain(n)
            {
                return Err(format!(
                    "{field} `{n}`: not a Kubernetes object name (lower-case letters, digits, `-` and `.`)"
                ));
            }
        }
        if let Some(w) = &self.export_webhook_secret {
            if !is_dns_subdomain(&w.name) {
                return Err(format!(
                    "spec.exportWebhookSecret.name `{}`: not a Kubernetes object name",
                    w.name
                ));
            }
            let key_ok = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
            if w.key.is_empty()
                || w.key.len() > 253
                || w.key == "."
                || w.key == ".."
                || !w.key.bytes().all(key_ok)
            {
                return Err(format!(
                    "spec.exportWebhookSecret.key `{}`: not a Secret key (letters, digits, `-`, \
                     `_` and `.`)",
                    w.key
                ));
            }
            match self.config.get().ok().map(|c| c.export.as_ref()) {
                Some(None) => {
                    return Err(
                        "spec.exportWebhookSecret: the config has no [export] section, \
                                so there is no export to notify"
                            .into(),
                    );
                }
                Some(Some(e)) if e.webhook.is_some() => {
                    return Err(
                        "spec.exportWebhookSecret and spec.config.export.webhook: set \
                                one of them"
                            .into(),
                    );
                }
                _ => {}
            }
        }
        if let Some(v) = &self.shared_volume {
            if !is_dns_subdomain(&v.claim_name) {
                return Err(format!(
                    "spec.sharedVolume.claimName `{}`: not a Kubernetes object name",
                    v.claim_name
                ));
            }
            let p = &v.mount_path;
            // Directories of the image and of the pods' own mounts: a volume on or in them
            // would hide the binary, the CA certificates or the config. (/tmp and /var may hold
            // a volume below them, not be one.)
            const HIDES: [&str; 11] = [
                "/bin",
                "/dev",
                "/etc",
                "/lib",
                "/lib64",
                "/proc",
                "/run",
                "/sbin",
                "/sys",
                "/usr",
                "/var/cache/lockstep",
            ];
            const IS: [&str; 3] = ["/tmp", "/var", "/var/cache"];
            let segments: Vec<&str> = p.split('/').skip(1).collect();
            if !p.starts_with('/')
                || p.len() > 1024
                || segments
                    .iter()
                    .any(|s| s.is_empty() || *s == ".." || *s == ".")
                || p.contains(':')
                || IS.contains(&p.as_str())
                || HIDES
                    .iter()
                    .any(|d| p == d || p.starts_with(&format!("{d}/")))
            {
                return Err(format!(
                    "spec.sharedVolume.mountPath `{p}`: must be an absolute path such as /data or \
                     /mnt/nfs (no empty, `.` or `..` segments, no `:`; not /, /tmp, /var, or on \
                     or under {})",
                    HIDES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// What the coordinator knows of the job: the job's record on Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockstepJobStatus {
    /// Where the job is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// The coordinator's job id (`lockstep status`/`watch` take it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The current (or last) attempt; each has its own JobSet/Job.
    #[serde(default)]
    pub attempt: u32,
    /// Gang restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// Why the job restarted, failed, was cancelled, or how it was exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Admitted, Waiting, Running, Restarting, Succeeded, Failed, Exported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Newest step rank 0 reported.
    #[serde(default)]
    pub step: u64,
    /// `train.steps`.
    #[serde(default)]
    pub total_steps: u64,
    /// The newest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The first training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_loss: Option<f64>,
    /// The newest held-out loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The step `evalLoss` was measured after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_step: Option<u64>,
    /// The newest committed checkpoint step (restarts resume from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_committed_checkpoint: Option<u64>,
    /// Where the checkpoints are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_url: Option<String>,
    /// Final parameters' xxh3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params_hash: Option<String>,
    /// The exported version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_version: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What each recovery from a lost rank did, oldest first (the newest
    /// [`MAX_RECOVERIES_SHOWN`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recoveries: Vec<RecoveryStatus>,
}

/// How many recoveries a LockstepJob's status lists (the newest).
pub const MAX_RECOVERIES_SHOWN: usize = 50;

/// One recovery from a lost rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryStatus {
    /// The rank lost, when one was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// What happened, as the job's message said it.
    pub cause: String,
    /// `in-place` (one new pod replaced the lost one; the others kept their state),
    /// `emergency-checkpoint` (the survivors checkpointed the state they held and the gang
    /// restarted from it) or `checkpoint` (the gang restarted from its last checkpoint).
    pub path: String,
    /// The newest step rank 0 had reported when the coordinator acted on the loss.
    pub step: u64,
    /// Steps trained again; known at the first step after the recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_lost: Option<u64>,
    /// Seconds from the coordinator acting on the loss to the next finished step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// Where a LockstepJob's job is: one of the coordinator's phases, or suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Accepted, not launched yet.
    Queued,
    /// Pods created; waiting for all of them to join.
    Admitting,
    /// Every rank joined; training.
    Running,
    /// The gang was torn down; relaunching after the backoff.
    Restarting,
    /// Trained; the export Job runs.
    Exporting,
    /// Trained to the last step; the final checkpoint is committed.
    Succeeded,
    /// Trained and exported (promoted or kept: the message says which).
    Exported,
    /// Gave up, or cannot run (the message names the field).
    Failed,
    /// Stopped by a user.
    Cancelled,
    /// `spec.suspend` is true: no pods (a running gang checkpointed and stopped).
    Suspended,
}

impl JobPhase {
    /// The coordinator's phase this is (`None`: suspended).
    pub fn job(self) -> Option<Phase> {
        Some(match self {
            JobPhase::Queued => Phase::Queued,
            JobPhase::Admitting => Phase::Admitting,
            JobPhase::Running => Phase::Running,
            JobPhase::Restarting => Phase::Restarting,
            JobPhase::Exporting => Phase::Exporting,
            JobPhase::Succeeded => Phase::Succeeded,
            JobPhase::Exported => Phase::Exported,
            JobPhase::Failed => Phase::Failed,
            JobPhase::Cancelled => Phase::Cancelled,
            JobPhase::Suspended => return None,
        })
    }

    /// No transition leaves this phase (suspended is left by resuming).
    pub fn is_final(self) -> bool {
        self.job().is_some_and(Phase::is_final)
    }
}

impl From<Phase> for JobPhase {
    fn from(p: Phase) -> JobPhase {
        match p {
            Phase::Queued => JobPhase::Queued,
            Phase::Admitting => JobPhase::Admitting,
            Phase::Running => JobPhase::Running,
            Phase::Restarting => JobPhase::Restarting,
            Phase::Exporting => JobPhase::Exporting,
            Phase::Succeeded => JobPhase::Succeeded,
            Phase::Exported => JobPhase::Exported,
            Phase::Failed => JobPhase::Failed,
            Phase::Cancelled => JobPhase::Cancelled,
        }
    }
}

/// A condition (`type`, `status`, `reason`, `message`, `lastTransitionTime`), as
/// `metav1.Condition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Admitted`, `Waiting` (a pod stuck: an image it cannot pull, a missing Secret, no node
    /// that fits; or the gang queued in Kueue), `Running`, `Restarting`, `Succeeded`, `Failed`
    /// or `Exported`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// Human words (absent when there are none: the v1.20 API server the tests run turns an
    /// empty string into null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// The condition types, in the order they are shown.
pub const CONDITIONS: [&str; 7] = [
    "Admitted",
    "Waiting",
    "Running",
    "Restarting",
    "Succeeded",
    "Failed",
    "Exported",
];

impl LockstepJobStatus {
    /// Sets condition `type_` (its transition time changes only when its status does).
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
        now: &str,
    ) {
        let status = if status { "True" } else { "False" };
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now.to_string();
                }
                c.status = status.to_string();
                c.reason = reason.to_string();
                c.message = (!message.is_empty()).then(|| message.to_string());
            }
            None => self.conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: (!message.is_empty()).then(|| message.to_string()),
                last_transition_time: now.to_string(),
            }),
        }
        self.conditions.sort_by_key(|c| {
            CONDITIONS
                .iter()
                .position(|t| *t == c.type_)
                .unwrap_or(CONDITIONS.len())
        });
    }

    /// Condition `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The CRD. Every 8-, 16- and 32-bit unsigned field gets its `maximum`, so the API server
/// refuses a value the controller could not read back (64-bit fields are int64 there anyway).
pub fn crd() -> serde_json::Value {
    use kube::CustomResourceExt;
    fn bound(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                let max = match m.get("format").and_then(|f| f.as_str()) {
                    Some("uint32") => Some(u64::from(u32::MAX)),
                    Some("uint16") => Some(u64::from(u16::MAX)),
                    Some("uint8") => Some(u64::from(u8::MAX)),
                    _ => None,
                };
                if let Some(max) = max {
                    m.entry("maximum").or_insert(serde_json::json!(max));
                }
                m.values_mut().for_each(bound);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(bound),
            _ => {}
        }
    }
    let mut crd = serde_json::to_value(LockstepJob::crd()).unwrap_or_default();
    bound(&mut crd);
    crd
}

/// The CRD as YAML (`lockstep crd`; `jobsets/crd.yaml` is this, and a test keeps them equal).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated by `lockstep crd`; do not edit (a test keeps this file equal to it).\n{}",
        serde_yaml::to_string(&crd())?
    ))
}
