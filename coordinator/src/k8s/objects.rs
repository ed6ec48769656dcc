//! The objects lockstep makes on the API server: applying them (server-side apply, after the
//! owner check: lockstep never takes over an object it does not own), and deleting an attempt's
//! gang or, when its LockstepJob goes, everything the job owns (the sweep).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

use super::render::{self, Flavor};
use super::{FIELD_MANAGER, KubeError, LABEL_ATTEMPT, LABEL_JOB};

/// JobSet's API resource (no Rust type: it is a CRD).
pub fn jobset_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("jobset.x-k8s.io", "v1alpha2", "JobSet"),
        "jobsets",
    )
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

/// The API of the kind of object lockstep makes, in `ns`.
fn api_of(client: &Client, ns: &str, kind: &str) -> Result<Api<DynamicObject>, KubeError> {
    let resource = match kind {
        "ConfigMap" => ApiResource::erase::<ConfigMap>(&()),
        "Secret" => ApiResource::erase::<Secret>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "NetworkPolicy" => ApiResource::erase::<NetworkPolicy>(&()),
        "Job" => ApiResource::erase::<Job>(&()),
        "JobSet" => jobset_resource(),
        other => return Err(KubeError::Invalid(format!("cannot make a {other}"))),
    };
    Ok(Api::namespaced_with(client.clone(), ns, &resource))
}

/// Server-side applies `object` in `ns` (a retry is harmless).
pub(super) async fn apply(client: &Client, ns: &str, object: &Value) -> Result<(), KubeError> {
    let kind = object["kind"].as_str().unwrap_or("");
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api_of(client, ns, kind)?
        .patch(name, &pp, &Patch::Apply(object))
        .await
        .map(drop)
        .map_err(KubeError::api(format!("apply {kind} {ns}/{name}")))
}

/// Refuses to take over an object of that name that this LockstepJob does not own (a
/// user's ConfigMap, another job's Secret): applying would overwrite it and deleting the
/// LockstepJob would delete it.
pub(super) async fn check_owner(
    client: &Client,
    ns: &str,
    object: &Value,
    uid: &str,
) -> Result<(), KubeError> {
    let kind = object["kind"].as_str().unwrap_or("");
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let meta = api_of(client, ns, kind)?
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

/// Deletes `attempt`'s JobSet/Job and Service (their pods go with them).
pub(super) async fn delete_attempt(
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
pub async fn delete_all(client: &Client, ns: &str, name: &str, uid: &str) -> Result<(), KubeError> {
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
    if detect_flavor(client).await == Flavor::JobSet {
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

/// Whether `meta` names LockstepJob `uid` as an owner.
pub(super) fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o.kind == "LockstepJob" && o.uid == uid))
}

/// The attempt an object belongs to (its label).
pub(super) fn attempt_of(meta: &kube::api::ObjectMeta) -> Option<u32> {
    meta.labels.as_ref()?.get(LABEL_ATTEMPT)?.parse().ok()
}

/// The attempts the `objects` belong to (by their label).
pub(super) fn attempts<K: kube::Resource>(objects: &[K]) -> Vec<u32> {
    objects
        .iter()
        .filter_map(|o| attempt_of(o.meta()))
        .collect()
}

/// Whether Secret key `w` holds a usable webhook URL (the export pod reads it as is);
/// `Ok(Err(why))` names the field and what is wrong.
pub(super) async fn check_webhook_secret(
    client: &Client,
    ns: &str,
    w: &super::crd::SecretKey,
) -> Result<Result<(), String>, KubeError> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&w.name)
        .await
        .map_err(KubeError::api(format!("read Secret {}", w.name)))?;
    let Some(value) = secret.and_then(|s| s.data?.remove(&w.key)).map(|v| v.0) else {
        return Ok(Err(format!(
            "spec.exportWebhookSecret: Secret {} has no key `{}` (create it, or fix the \
             reference)",
            w.name, w.key
        )));
    };
    let url = String::from_utf8_lossy(&value);
    let why = if url.trim() != url {
        Some("it has surrounding whitespace (a trailing newline?)")
    } else {
        lockstep_api::config::check_webhook(&url).err()
    };
    Ok(match why {
        Some(why) => Err(format!(
            "spec.exportWebhookSecret: key `{}` of Secret {}: {why}",
            w.key, w.name
        )),
        None => Ok(()),
    })
}
