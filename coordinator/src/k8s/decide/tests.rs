//! [`decide`](super::decide) over LockstepJobs as the API server hands them over.
use super::*;
use crate::k8s::crd::{JobPhase, LockstepJobStatus};

const ID: &str = "e2e-0123abcd456789ef";
const NOW: &str = "2026-12-03T00:00:00Z";

fn seen(record: Option<JobRecord>) -> Observed {
    Observed {
        record,
        now: NOW.into(),
        ..Observed::default()
    }
}

fn status(phase: JobPhase, attempt: u32) -> LockstepJobStatus {
    LockstepJobStatus {
        phase: Some(phase),
        attempt,
        step: 40,
        last_committed_checkpoint: Some(40),
        ..LockstepJobStatus::default()
    }
}

/// The coordinator's record of `lsj`'s job, in `phase`.
fn record(lsj: &LockstepJob, phase: Phase) -> JobRecord {
    let c = lsj.spec.config.get().unwrap();
    let text = render::config_toml(lsj).unwrap();
    let mut r = JobRecord::new(ID.into(), c, text, Vec::new(), "/".into());
    r.lifecycle.phase = phase;
    r
}

/// The status the steps write (the only one).
fn written(steps: &[Step]) -> &LockstepJobStatus {
    let mut st = steps.iter().filter_map(|s| match s {
        Step::WriteStatus(st) => Some(st.as_ref()),
        _ => None,
    });
    let first = st.next().expect("a status is written");
    assert!(st.next().is_none(), "one status write: {steps:?}");
    first
}

#[test]
fn a_new_job_is_submitted_under_an_id_from_its_uid() {
    let lsj = Arc::new(LockstepJob::test("e2e"));
    let steps = decide(&lsj, &seen(None));
    let [
        Step::Submit {
            id,
            config_text,
            workdir,
            lsj: run,
        },
    ] = &steps[..]
    else {
        panic!("{steps:?}")
    };
    assert_eq!(id, ID);
    assert_eq!(workdir, &PathBuf::from("/"));
    assert_eq!(config_text, &render::config_toml(&lsj).unwrap());
    assert_eq!(run.spec, lsj.spec);
}

#[test]
fn an_object_without_a_uid_is_refused_naming_the_field() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.metadata.uid = None;
    let steps = decide(&Arc::new(lsj), &seen(None));
    let st = written(&steps);
    assert_eq!(st.phase, Some(JobPhase::Failed));
    assert!(
        st.message.as_deref().unwrap().contains("metadata.uid"),
        "{st:?}"
    );
}

#[test]
fn a_spec_that_cannot_run_fails_once_naming_the_field() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.spec.image = "two words".into();
    lsj.spec.config = lsj.spec.config.get().unwrap().clone().into();
    let steps = decide(&Arc::new(lsj.clone()), &seen(None));
    let st = written(&steps).clone();
    assert!(
        st.message.as_deref().unwrap().starts_with("spec.image"),
        "{st:?}"
    );
    let failed = st.condition("Failed").unwrap();
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "InvalidSpec")
    );
    // Seen again with that status: nothing more to write (no loop of writes).
    lsj.status = Some(st);
    assert!(decide(&Arc::new(lsj), &seen(None)).is_empty());
}

#[test]
fn a_config_that_does_not_validate_is_refused_before_anything_starts() {
    let mut lsj = LockstepJob::test("e2e");
    let mut c = lsj.spec.config.get().unwrap().clone();
    c.model.num_heads = 5;
    lsj.spec.config = c.into();
    let steps = decide(&Arc::new(lsj), &seen(None));
    assert!(!steps.iter().any(|s| matches!(s, Step::Submit { .. })));
    let st = written(&steps);
    let why = st.message.as_deref().unwrap();
    assert!(
        why.starts_with("spec.config: ") && why.contains("model.num_heads"),
        "{why}"
    );
}

#[test]
fn a_job_created_suspended_says_so_once_and_starts_nothing() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.spec.suspend = true;
    let steps = decide(&Arc::new(lsj.clone()), &seen(None));
    let st = written(&steps).clone();
    assert_eq!(st.phase, Some(JobPhase::Suspended));
    assert_eq!(st.condition("Running").unwrap().reason, "Suspended");
    lsj.status = Some(st);
    assert!(decide(&Arc::new(lsj.clone()), &seen(None)).is_empty());
    // Resumed before it ever ran: a new job.
    lsj.spec.suspend = false;
    let steps = decide(&Arc::new(lsj), &seen(None));
    assert!(matches!(&steps[..], [Step::Submit { .. }]), "{steps:?}");
}

#[test]
fn a_finished_job_is_left_alone_by_a_new_coordinator() {
    for phase in [
        JobPhase::Succeeded,
        JobPhase::Exported,
        JobPhase::Failed,
        JobPhase::Cancelled,
    ] {
        let mut lsj = LockstepJob::test("e2e");
        lsj.status = Some(status(phase, 3));
        assert!(decide(&Arc::new(lsj), &seen(None)).is_empty(), "{phase:?}");
    }
}

#[test]
fn a_job_started_before_is_adopted_with_the_config_it_started_with() {
    let original = LockstepJob::test("e2e");
    let started_text = render::config_toml(&original).unwrap();
    let mut lsj = original.clone();
    // Edited while no coordinator ran: more steps, a new image.
    let mut c = lsj.spec.config.get().unwrap().clone();
    c.train.steps = 500;
    lsj.spec.config = c.into();
    lsj.spec.image = "lockstep:2".into();
    lsj.status = Some(status(JobPhase::Running, 2));
    let observed = Observed {
        started_config: Some(started_text.clone()),
        ..seen(None)
    };
    let steps = decide(&Arc::new(lsj), &observed);
    let [
        Step::Adopt {
            record,
            lsj: run,
            forget: false,
        },
    ] = &steps[..]
    else {
        panic!("{steps:?}")
    };
    assert_eq!(record.id, ID);
    assert_eq!(record.config_text, started_text);
    assert_eq!(record.total_steps, 8);
    assert_eq!((record.lifecycle.attempt, record.step), (2, 40));
    assert_eq!(record.last_checkpoint, Some(40));
    assert_eq!(run.spec.config.get().unwrap().train.steps, 8);
    assert_eq!(run.spec.image, "lockstep:2", "pod settings follow the spec");
}

#[test]
fn an_adopted_job_whose_started_config_is_damaged_is_refused_and_its_gang_deleted() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.status = Some(status(JobPhase::Running, 2));
    let observed = Observed {
        started_config: Some("[train\nsteps = ".into()),
        ..seen(None)
    };
    let steps = decide(&Arc::new(lsj), &observed);
    assert!(
        matches!(&steps[0], Step::KillLeftovers { id } if id == ID),
        "{steps:?}"
    );
    let why = written(&steps).message.clone().unwrap();
    assert!(why.starts_with("ConfigMap e2e-config:"), "{why}");
}

#[test]
fn an_edited_live_job_keeps_its_config_and_takes_the_new_pod_settings() {
    let original = LockstepJob::test("e2e");
    let running = record(&original, Phase::Running);
    let mut lsj = original.clone();
    let mut c = lsj.spec.config.get().unwrap().clone();
    c.train.lr = 0.5;
    lsj.spec.config = c.into();
    lsj.spec.image = "lockstep:2".into();
    lsj.metadata.generation = Some(2);
    let lsj = Arc::new(lsj);
    let steps = decide(&lsj, &seen(Some(running.clone())));
    assert!(
        matches!(
            &steps[..],
            [
                Step::WarnConfigChanged {
                    generation: Some(2)
                },
                Step::UsePodSettings { .. },
                Step::Sync { .. }
            ]
        ),
        "{steps:?}"
    );
    let Step::UsePodSettings { lsj: run, .. } = &steps[1] else {
        unreachable!()
    };
    assert_eq!(run.spec.config.get().unwrap().train.lr, 1e-3);
    assert_eq!(run.spec.image, "lockstep:2");
    // Warned once per generation.
    let again = Observed {
        config_warned: Some(2),
        ..seen(Some(running))
    };
    assert!(
        !decide(&lsj, &again)
            .iter()
            .any(|s| matches!(s, Step::WarnConfigChanged { .. }))
    );
}

#[test]
fn pod_settings_that_cannot_work_are_not_taken() {
    let original = LockstepJob::test("e2e");
    let running = record(&original, Phase::Running);
    let mut lsj = original;
    lsj.spec.resources.memory = Some("lots".into());
    let steps = decide(&Arc::new(lsj), &seen(Some(running)));
    assert!(
        matches!(
            &steps[..],
            [Step::WarnPodSettings { error, .. }, Step::Sync { .. }]
                if error.contains("spec.resources.memory")
        ),
        "{steps:?}"
    );
}

#[test]
fn suspending_stops_a_live_job_and_resuming_adopts_it_queued() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.spec.suspend = true;
    let running = record(&lsj, Phase::Running);
    let steps = decide(&Arc::new(lsj.clone()), &seen(Some(running)));
    assert!(
        steps
            .iter()
            .any(|s| matches!(s, Step::Suspend { id } if id == ID)),
        "{steps:?}"
    );
    // Stopped (its record cancelled, its status `suspended`), then resumed.
    let cancelled = record(&lsj, Phase::Cancelled);
    lsj.status = Some(status(JobPhase::Suspended, 1));
    let steps = decide(&Arc::new(lsj.clone()), &seen(Some(cancelled.clone())));
    assert!(
        !steps
            .iter()
            .any(|s| matches!(s, Step::Adopt { .. } | Step::Suspend { .. }))
    );
    lsj.spec.suspend = false;
    let steps = decide(&Arc::new(lsj.clone()), &seen(Some(cancelled.clone())));
    let Some(Step::Adopt {
        record,
        forget: true,
        ..
    }) = steps.iter().find(|s| matches!(s, Step::Adopt { .. }))
    else {
        panic!("{steps:?}")
    };
    assert_eq!(record.phase(), Phase::Queued);
    // A job cancelled by a user (not suspended) is not resumed by the spec.
    lsj.status = Some(status(JobPhase::Cancelled, 1));
    let steps = decide(&Arc::new(lsj), &seen(Some(cancelled)));
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Adopt { .. })),
        "{steps:?}"
    );
}

#[test]
fn a_webhook_secret_needs_an_export_and_excludes_a_plain_webhook() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.spec.export_webhook_secret = Some(crate::k8s::crd::SecretKey {
        name: "hooks".into(),
        key: "url".into(),
    });
    let steps = decide(&Arc::new(lsj.clone()), &seen(None));
    let why = written(&steps).message.clone().unwrap();
    assert!(
        why.starts_with("spec.exportWebhookSecret: the config has no [export]"),
        "{why}"
    );
    let mut c = lsj.spec.config.get().unwrap().clone();
    let mut export: lockstep_api::config::ExportSection =
        toml::from_str("url = \"s3://bucket/exports\"\nwebhook = \"https://h/x\"").unwrap();
    c.export = Some(export.clone());
    lsj.spec.config = c.clone().into();
    let steps = decide(&Arc::new(lsj.clone()), &seen(None));
    let why = written(&steps).message.clone().unwrap();
    assert!(why.contains("set one of them"), "{why}");
    export.webhook = None;
    c.export = Some(export);
    lsj.spec.config = c.into();
    let steps = decide(&Arc::new(lsj), &seen(None));
    assert!(matches!(&steps[..], [Step::Submit { .. }]), "{steps:?}");
}

#[test]
fn a_resume_that_comes_while_the_suspend_still_stops_the_gang_is_not_lost() {
    let mut lsj = LockstepJob::test("e2e");
    // Suspended and resumed before the status said `suspended`: the record ends cancelled.
    lsj.status = Some(status(JobPhase::Running, 1));
    let cancelled = record(&lsj, Phase::Cancelled);
    let seen = Observed {
        suspending: true,
        ..seen(Some(cancelled.clone()))
    };
    let steps = decide(&Arc::new(lsj.clone()), &seen);
    assert!(
        steps
            .iter()
            .any(|s| matches!(s, Step::Adopt { forget: true, .. })),
        "{steps:?}"
    );
    // Without the suspend it was a user's cancel: final.
    let steps = decide(&Arc::new(lsj), &self::seen(Some(cancelled)));
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Adopt { .. })),
        "{steps:?}"
    );
}

#[test]
fn a_resume_with_pod_settings_that_cannot_work_waits_warning_once() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.status = Some(status(JobPhase::Suspended, 1));
    lsj.spec.resources.memory = Some("16GB".into());
    lsj.metadata.generation = Some(3);
    let cancelled = record(&lsj, Phase::Cancelled);
    let steps = decide(&Arc::new(lsj.clone()), &seen(Some(cancelled.clone())));
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Adopt { .. })),
        "{steps:?}"
    );
    assert!(steps.iter().any(|s| matches!(
        s,
        Step::WarnPodSettings {
            generation: Some(3),
            ..
        }
    )));
    let again = Observed {
        pod_settings_warned: Some(3),
        ..seen(Some(cancelled))
    };
    let steps = decide(&Arc::new(lsj), &again);
    assert!(
        !steps
            .iter()
            .any(|s| matches!(s, Step::WarnPodSettings { .. })),
        "{steps:?}"
    );
}

#[test]
fn suspending_a_job_no_coordinator_runs_deletes_the_gang_it_left() {
    let mut lsj = LockstepJob::test("e2e");
    lsj.spec.suspend = true;
    lsj.status = Some(status(JobPhase::Running, 2));
    let steps = decide(&Arc::new(lsj), &seen(None));
    assert!(
        matches!(&steps[0], Step::KillLeftovers { id } if id == ID),
        "{steps:?}"
    );
    assert_eq!(written(&steps).phase, Some(JobPhase::Suspended));
}

#[test]
fn date_in_a_lockstep_job_is_the_day_it_was_created() {
    let mut lsj = LockstepJob::test("e2e");
    let mut c = lsj.spec.config.get().unwrap().clone();
    c.checkpoint.url = "s3://bucket/nightly/{date}/ckpt".into();
    lsj.spec.config = c.into();
    lsj.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-11-28T23:59:00Z".parse().unwrap(),
    ));
    let steps = decide(&Arc::new(lsj), &seen(None));
    let [
        Step::Submit {
            config_text,
            lsj: run,
            ..
        },
    ] = &steps[..]
    else {
        panic!("{steps:?}")
    };
    assert!(
        config_text.contains("s3://bucket/nightly/2026-11-28/ckpt"),
        "{config_text}"
    );
    assert_eq!(
        run.spec.config.get().unwrap().checkpoint.url,
        "s3://bucket/nightly/2026-11-28/ckpt",
        "the pods read the filled config"
    );
}
