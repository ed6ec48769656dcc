//! What a pod's state means for its worker: a trainer pod that terminated (or was deleted)
//! becomes that worker's [`Exit`] — its exit status, the signal that killed it (137 reads as
//! SIGKILL), OOMKilled, and its own last `error:` line from the termination message. A pod
//! that waits for what may never come (an image it cannot pull, a Secret that is missing, no
//! node that fits it) is [`Waiting`]; one that can never start anywhere (an invalid image
//! name) is an exit a restart cannot fix.

use k8s_openapi::api::core::v1::Pod;

use crate::launcher::Exit;

/// The annotation Indexed Job (and JobSet) pods carry their index in.
const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

/// The exit a pod's state means for its worker, if it ended (or, `deleted`, went away).
pub(super) fn pod_exit(pod: &Pod, attempt: u32, world: u32, deleted: bool) -> Option<(u32, Exit)> {
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
        unstartable: false,
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

/// A trainer pod waiting for something that may never come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The pod.
    pub pod: String,
    /// Its worker.
    pub worker: u32,
    /// The kubelet's or scheduler's reason (`ImagePullBackOff`, `Unschedulable`, …).
    pub reason: String,
    /// `pod NAME: REASON: what Kubernetes says (what to check)`.
    pub message: String,
    /// It cannot resolve without a new spec: the worker fails for good.
    pub permanent: bool,
}

impl Waiting {
    /// The exit it means for its worker when it is permanent.
    pub fn exit(&self, attempt: u32) -> Option<Exit> {
        self.permanent.then(|| Exit {
            attempt,
            worker: self.worker,
            code: None,
            signal: None,
            message: Some(self.message.clone()),
            unstartable: true,
        })
    }
}

/// Waiting reasons of the trainer container: (reason, permanent, what to check).
const WAITING: [(&str, bool, &str); 7] = [
    (
        "InvalidImageName",
        true,
        "spec.image is not a valid image reference",
    ),
    // Per node: a restart may land where the image is.
    (
        "ErrImageNeverPull",
        false,
        "spec.imagePullPolicy is Never and this node lacks spec.image",
    ),
    (
        "ErrImagePull",
        false,
        "check spec.image and the registry's credentials",
    ),
    (
        "ImagePullBackOff",
        false,
        "check spec.image and the registry's credentials",
    ),
    (
        "CreateContainerConfigError",
        false,
        "a Secret or ConfigMap the pod needs is missing (spec.s3CredentialsSecret?)",
    ),
    (
        "CreateContainerError",
        false,
        "the runtime cannot create the container",
    ),
    (
        "RunContainerError",
        false,
        "the runtime cannot start the container",
    ),
];

/// What a trainer pod of a gang of `world` is stuck on, if anything.
pub(super) fn pod_waiting(pod: &Pod, world: u32) -> Option<Waiting> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let index = pod.metadata.annotations.as_ref()?.get(INDEX_ANNOTATION)?;
    let worker = index.parse::<u32>().ok().filter(|w| *w < world)?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let waiting = |reason: &str, said: Option<&str>, permanent: bool, hint: &str| {
        let said: String = said.unwrap_or("").chars().take(500).collect();
        let said = if said.is_empty() {
            String::new()
        } else {
            format!("{said} ")
        };
        Waiting {
            pod: pod_name.clone(),
            worker,
            reason: reason.to_string(),
            message: format!("pod {pod_name}: {reason}: {said}({hint})"),
            permanent,
        }
    };
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == "trainer"))
        .and_then(|c| c.state.as_ref()?.waiting.as_ref());
    if let Some(w) = container
        && let Some(reason) = w.reason.as_deref()
        && let Some((_, permanent, hint)) = WAITING.iter().find(|(r, _, _)| *r == reason)
    {
        return Some(waiting(reason, w.message.as_deref(), *permanent, hint));
    }
    // Not placed: no node fits it, or its claim is not bound.
    let unschedulable = status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .filter(|c| c.reason.as_deref() == Some("Unschedulable"))?;
    Some(waiting(
        "Unschedulable",
        unschedulable.message.as_deref(),
        false,
        "no node fits spec.resources, spec.nodeSelector and spec.tolerations, or \
         spec.sharedVolume's claim is not bound",
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod of worker `index`, as the API server reports it (`status` in its JSON form).
    fn pod(index: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("q-1-trainer-0-{index}"),
                "annotations": {INDEX_ANNOTATION: index},
            },
            "status": status,
        }))
        .expect("a pod")
    }

    fn terminated(phase: &str, t: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "phase": phase,
            "containerStatuses": [{
                "name": "trainer", "image": "lockstep", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": t},
            }],
        })
    }

    #[test]
    fn a_trainer_that_exited_reports_its_status_and_last_error_line() {
        let p = pod(
            "1",
            terminated(
                "Failed",
                serde_json::json!({"exitCode": 3, "message":
                    "step 5\nerror: data.train[0]: not found\nbye"}),
            ),
        );
        let (worker, exit) = pod_exit(&p, 2, 2, false).expect("an exit");
        assert_eq!(worker, 1);
        assert_eq!((exit.attempt, exit.code, exit.signal), (2, Some(3), None));
        assert_eq!(
            exit.message.as_deref(),
            Some("error: data.train[0]: not found")
        );
        assert!(exit.permanent());
    }

    #[test]
    fn exit_137_is_sigkill_and_a_killed_trainer_said_nothing() {
        let p = pod(
            "0",
            terminated(
                "Failed",
                serde_json::json!({"exitCode": 137, "message": "step 7 loss 2.1"}),
            ),
        );
        let (_, exit) = pod_exit(&p, 1, 2, false).expect("an exit");
        assert_eq!(
            (exit.code, exit.signal, exit.message.as_deref()),
            (None, Some(9), None)
        );
        assert_eq!(exit.describe(), "was killed by SIGKILL");
    }

    #[test]
    fn the_trainers_own_stop_statuses_stay_statuses() {
        for code in [130, 143] {
            let p = pod(
                "0",
                terminated("Failed", serde_json::json!({"exitCode": code})),
            );
            let (_, exit) = pod_exit(&p, 1, 1, false).expect("an exit");
            assert_eq!((exit.code, exit.signal), (Some(code), None));
        }
    }

    #[test]
    fn oom_killed_names_the_pod_and_the_setting_to_raise() {
        let p = pod(
            "0",
            terminated(
                "Failed",
                serde_json::json!({"exitCode": 137, "reason": "OOMKilled"}),
            ),
        );
        let (_, exit) = pod_exit(&p, 1, 1, false).expect("an exit");
        let m = exit.message.expect("a message");
        assert!(
            m.contains("q-1-trainer-0-0") && m.contains("spec.resources.memory"),
            "{m}"
        );
    }

    #[test]
    fn success_and_a_pod_failed_before_its_container_ran() {
        let ok = pod("0", serde_json::json!({"phase": "Succeeded"}));
        assert!(pod_exit(&ok, 1, 1, false).expect("an exit").1.success());
        let evicted = pod(
            "0",
            serde_json::json!({"phase": "Failed", "reason": "Evicted",
                "message": "the node was low on memory"}),
        );
        let (_, exit) = pod_exit(&evicted, 1, 1, false).expect("an exit");
        assert_eq!(exit.code, None);
        assert_eq!(
            exit.message.as_deref(),
            Some("pod q-1-trainer-0-0 failed: Evicted the node was low on memory")
        );
    }

    fn waiting(reason: &str, message: &str) -> Pod {
        pod(
            "1",
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
                "name": "trainer", "image": "lockstep", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}),
        )
    }

    #[test]
    fn a_pod_that_cannot_pull_its_image_is_named_with_the_field_to_check() {
        let p = waiting(
            "ImagePullBackOff",
            "Back-off pulling image \"lockstep:nope\"",
        );
        let w = pod_waiting(&p, 2).expect("waiting");
        assert_eq!(
            (w.worker, w.reason.as_str(), w.permanent),
            (1, "ImagePullBackOff", false)
        );
        assert_eq!(
            w.message,
            "pod q-1-trainer-0-1: ImagePullBackOff: Back-off pulling image \"lockstep:nope\" \
             (check spec.image and the registry's credentials)"
        );
        assert_eq!(w.exit(1), None, "the image may still appear: no exit");
        let secret = waiting("CreateContainerConfigError", "secret \"s3\" not found");
        let w = pod_waiting(&secret, 2).expect("waiting");
        assert!(
            !w.permanent && w.message.contains("spec.s3CredentialsSecret"),
            "{w:?}"
        );
    }

    #[test]
    fn an_invalid_image_name_fails_the_worker_for_good() {
        let p = waiting(
            "InvalidImageName",
            "couldn't parse image reference \"Lockstep:X\"",
        );
        let w = pod_waiting(&p, 2).expect("waiting");
        let exit = w.exit(4).expect("permanent");
        assert_eq!((exit.attempt, exit.worker), (4, 1));
        assert!(exit.permanent());
        assert_eq!(
            exit.describe(),
            "cannot start: pod q-1-trainer-0-1: InvalidImageName: couldn't parse image \
             reference \"Lockstep:X\" (spec.image is not a valid image reference)"
        );
    }

    #[test]
    fn an_unschedulable_pod_says_why_and_a_starting_one_is_not_stuck() {
        let p = pod(
            "0",
            serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable",
                "message": "pod has unbound immediate PersistentVolumeClaims"}]}),
        );
        let w = pod_waiting(&p, 1).expect("waiting");
        assert_eq!(w.reason, "Unschedulable");
        assert!(
            w.message
                .contains("unbound immediate PersistentVolumeClaims"),
            "{w:?}"
        );
        assert!(w.message.contains("spec.sharedVolume"), "{w:?}");
        assert_eq!(pod_waiting(&waiting("ContainerCreating", ""), 2), None);
        let running = pod("0", serde_json::json!({"phase": "Running"}));
        assert_eq!(pod_waiting(&running, 1), None);
    }

    #[test]
    fn running_pending_and_foreign_pods_are_no_exit_until_deleted() {
        let running = pod("1", serde_json::json!({"phase": "Running"}));
        assert_eq!(pod_exit(&running, 1, 2, false), None);
        let pending = pod(
            "1",
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
                "name": "trainer", "image": "lockstep", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}),
        );
        assert_eq!(pod_exit(&pending, 1, 2, false), None);
        let (worker, exit) = pod_exit(&running, 1, 2, true).expect("deleted");
        assert_eq!((worker, exit.signal), (1, Some(9)));
        assert_eq!(
            exit.message.as_deref(),
            Some("pod q-1-trainer-0-1 was deleted")
        );
        // An index outside the gang is not a worker of it.
        assert_eq!(
            pod_exit(
                &pod("5", serde_json::json!({"phase": "Succeeded"})),
                1,
                2,
                false
            ),
            None
        );
    }
}
