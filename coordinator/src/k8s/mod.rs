//! Kubernetes: the `LockstepJob` custom resource ([`crd`]), the objects an attempt is made of
//! ([`render`], pure), the launcher that creates them and turns pod terminations into worker
//! exits ([`launcher`]), and the controller that runs LockstepJobs through the coordinator and
//! keeps their status ([`controller`]), deciding what to do in pure code ([`decide`]).
//!
//! On Kubernetes the API server is the job store: a job's record is its LockstepJob's status, so
//! a coordinator pod that is rescheduled re-reads the objects and restarts their gangs from the
//! last committed checkpoint.

pub mod controller;
pub mod crd;
pub mod decide;
mod exits;
mod export;
pub mod launcher;
mod names;
mod objects;
pub mod render;
pub mod status;

pub use controller::{Controller, ControllerSettings};
pub use crd::{LockstepJob, LockstepJobSpec, LockstepJobStatus};
pub use decide::job_id;
pub use launcher::KubeLauncher;
pub use objects::jobset_resource;
pub use render::Flavor;

/// Label: the LockstepJob an object belongs to.
pub const LABEL_JOB: &str = "lockstep.dev/job";
/// Label: the uid of the LockstepJob an object belongs to.
pub const LABEL_UID: &str = "lockstep.dev/job-uid";
/// Label: the attempt an object belongs to.
pub const LABEL_ATTEMPT: &str = "lockstep.dev/attempt";
/// Label: `trainer` or `export`.
pub const LABEL_ROLE: &str = "lockstep.dev/role";
/// Label on every object lockstep creates.
pub const LABEL_MANAGED: &str = "app.kubernetes.io/managed-by";
/// The finalizer that tears a job's gang down before its LockstepJob goes.
pub const FINALIZER: &str = "lockstep.dev/cleanup";
/// The annotation a serving Deployment's pod template gets with each promoted version.
pub const ROLLOUT_ANNOTATION: &str = "lockstep.dev/model-version";
/// Server-side apply field manager.
pub const FIELD_MANAGER: &str = "lockstep";

/// What the controller calls on the API server: (API group, resource, verbs). The Role in
/// `jobsets/rbac.yaml` grants exactly these (a test compares the two). `create` is there for
/// server-side apply, which creates what does not exist yet; `lockstepjobs/finalizers` update
/// for owner references that block their owner's deletion.
pub const API_CALLS: &[(&str, &str, &[&str])] = &[
    ("lockstep.dev", "lockstepjobs", &["list", "watch", "patch"]),
    ("lockstep.dev", "lockstepjobs/status", &["patch"]),
    ("lockstep.dev", "lockstepjobs/finalizers", &["update"]),
    (
        "batch",
        "jobs",
        &["get", "list", "create", "patch", "delete"],
    ),
    (
        "jobset.x-k8s.io",
        "jobsets",
        &["get", "list", "create", "patch", "delete"],
    ),
    // `create`, `delete`: the pod that replaces a lost one, and a lost one that hangs.
    ("", "pods", &["list", "watch", "create", "delete"]),
    (
        "",
        "services",
        &["get", "list", "create", "patch", "delete"],
    ),
    (
        "",
        "configmaps",
        &["get", "list", "create", "patch", "delete"],
    ),
    ("", "secrets", &["get", "list", "create", "patch", "delete"]),
    (
        "networking.k8s.io",
        "networkpolicies",
        &["get", "list", "create", "patch", "delete"],
    ),
];

/// Errors talking to Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The API server refused or failed a call.
    #[error("{what}: {source}")]
    Api {
        /// The call, in words.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// A LockstepJob cannot run as it is.
    #[error("{0}")]
    Invalid(String),
    /// LockstepJob NAME was deleted and its gang is still checkpointing and stopping.
    #[error("{0}: deleted; its gang is still stopping")]
    Stopping(String),
}

impl KubeError {
    pub(crate) fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
        let what = what.into();
        move |source| KubeError::Api { what, source }
    }

    /// HTTP status of the API server's answer, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            _ => None,
        }
    }
}
