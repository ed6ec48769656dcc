//! What the controller does about one LockstepJob, decided in pure code: [`decide`] takes the
//! object, what the coordinator knows of its job and what was read from the API server, and
//! returns the [`Step`]s to carry out. The controller observes, calls it, and applies the
//! steps; the decisions are unit-tested here without an API server.

use std::path::PathBuf;
use std::sync::Arc;

use lockstep_api::JobConfig;

use super::crd::{JobPhase, LockstepJob, LockstepJobStatus};
use super::render;
use crate::record::JobRecord;
use crate::state::{Lifecycle, Phase};

/// What was read for a LockstepJob before deciding.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The coordinator's record of its job, if this coordinator runs it.
    pub record: Option<JobRecord>,
    /// The `config.toml` of the job's own ConfigMap (the config its first attempt started
    /// with), read when a coordinator before this one started it.
    pub started_config: Option<String>,
    /// The generation whose changed `spec.config` was last warned about.
    pub config_warned: Option<i64>,
    /// The generation whose unusable pod settings were last warned about.
    pub pod_settings_warned: Option<i64>,
    /// This controller stopped the job for a suspend (its status may not say so yet: the gang
    /// can still be checkpointing).
    pub suspending: bool,
    /// Now, RFC 3339 (for condition transition times).
    pub now: String,
}

/// One thing for the controller to do.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write this status (the job is refused or waits suspended; a live job's status is
    /// written from its record instead: [`Step::Sync`]).
    WriteStatus(Box<LockstepJobStatus>),
    /// Delete every gang a coordinator before this one left of the job (before refusing a job
    /// whose spec was edited into one that cannot run while no coordinator ran).
    KillLeftovers {
        /// The job id.
        id: String,
    },
    /// Log once per generation that `spec.config` changed after the job started (it keeps the
    /// config it started with).
    WarnConfigChanged {
        /// The generation warned about.
        generation: Option<i64>,
    },
    /// Log (once per generation) that the edited pod settings cannot work (the job keeps its
    /// previous ones).
    WarnPodSettings {
        /// The generation warned about.
        generation: Option<i64>,
        /// What is wrong, naming the field.
        error: String,
    },
    /// The pods of the job's next attempts are made from this LockstepJob (its pod settings,
    /// with the config the job started with).
    UsePodSettings {
        /// The job id.
        id: String,
        /// The object to render from.
        lsj: Arc<LockstepJob>,
    },
    /// A new job: submit it (the preflight checks run first; a refusal fails the LockstepJob).
    Submit {
        /// The job id (derived from the LockstepJob, stable across coordinator restarts).
        id: String,
        /// `spec.config` as TOML.
        config_text: String,
        /// Where relative `file://` URLs resolve.
        workdir: PathBuf,
        /// The object its pods are made from.
        lsj: Arc<LockstepJob>,
    },
    /// A job a coordinator before this one ran (or one resumed after a suspend): take it over
    /// from this record; it restarts from its last committed checkpoint.
    Adopt {
        /// The job's record, rebuilt from the status.
        record: Box<JobRecord>,
        /// The object its pods are made from.
        lsj: Arc<LockstepJob>,
        /// The coordinator knows the (cancelled) job: forget it first.
        forget: bool,
    },
    /// Suspended while live: checkpoint and stop the gang.
    Suspend {
        /// The job id.
        id: String,
    },
    /// Keep the status in step with the job's record from now on.
    Sync {
        /// The job id.
        id: String,
    },
}

/// The coordinator's job id for a LockstepJob: its name and 16 hex digits of its uid (stable
/// across coordinator restarts, new for a LockstepJob deleted and created again).
pub fn job_id(lsj: &LockstepJob) -> Result<String, String> {
    let (name, _) = render::name_of(lsj)?;
    let uid: String = lsj
        .metadata
        .uid
        .as_deref()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    if uid.len() < 16 {
        return Err("metadata.uid: missing (is this object from the API server?)".into());
    }
    Ok(format!("{name}-{}", uid.to_ascii_lowercase()))
}

/// Where relative `file://` URLs resolve: the shared volume's mount path, or `/` (none).
pub fn workdir_of(lsj: &LockstepJob) -> PathBuf {
    lsj.spec
        .shared_volume
        .as_ref()
        .map_or_else(|| "/".into(), |v| v.mount_path.clone().into())
}

/// What to do about `lsj` (not being deleted: [`Step`]s of a deletion are the controller's
/// cleanup).
pub fn decide(lsj: &Arc<LockstepJob>, seen: &Observed) -> Vec<Step> {
    let id = match job_id(lsj) {
        Ok(id) => id,
        Err(why) => return refuse(lsj, None, why, &seen.now),
    };
    match &seen.record {
        Some(record) => decide_known(lsj, id, record, seen),
        None => decide_new(lsj, id, seen),
    }
}

/// A job this coordinator runs: keep its status, follow suspend/resume and pod-setting edits.
fn decide_known(
    lsj: &Arc<LockstepJob>,
    id: String,
    record: &JobRecord,
    seen: &Observed,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let generation = lsj.metadata.generation;
    // A started job keeps the config it started with, whatever the spec says now.
    if render::config_toml(lsj).ok().as_deref() != Some(record.config_text.as_str())
        && seen.config_warned != generation
    {
        steps.push(Step::WarnConfigChanged { generation });
    }
    let started = JobConfig::parse(&record.config_text, &record.overrides).ok();
    // Pod settings (image, resources…) may change: the next attempt uses them, with the config
    // the job started with. Ones that cannot work are ignored, with a word.
    let kept = started.map(|c| {
        let mut kept = (**lsj).clone();
        kept.spec.config = c.into();
        Arc::new(kept)
    });
    let usable = match lsj.spec.check() {
        Ok(()) => {
            if let Some(lsj) = &kept {
                steps.push(Step::UsePodSettings {
                    id: id.clone(),
                    lsj: lsj.clone(),
                });
            }
            true
        }
        Err(error) => {
            if seen.pod_settings_warned != generation {
                steps.push(Step::WarnPodSettings { generation, error });
            }
            false
        }
    };
    let shown = lsj.status.as_ref().and_then(|s| s.phase);
    let suspended = shown == Some(JobPhase::Suspended) || seen.suspending;
    if lsj.spec.suspend && !record.phase().is_final() {
        steps.push(Step::Suspend { id: id.clone() });
    } else if !lsj.spec.suspend && record.phase() == Phase::Cancelled && suspended && usable {
        // (With pod settings that cannot work it stays suspended until they are fixed.)
        // Resumed: a new attempt from the checkpoint it stopped at.
        let Some(lsj) = kept else {
            let why = "resume: the config the job started with no longer parses".to_string();
            return refuse(lsj, Some(id), why, &seen.now);
        };
        let mut r = record.clone();
        r.lifecycle.phase = Phase::Queued;
        r.lifecycle.message = "resumed after a suspend".into();
        steps.push(Step::Adopt {
            record: Box::new(r),
            lsj,
            forget: true,
        });
    }
    steps.push(Step::Sync { id });
    steps
}

/// A job this coordinator does not know: new, finished, or started by a coordinator before it.
fn decide_new(lsj: &Arc<LockstepJob>, id: String, seen: &Observed) -> Vec<Step> {
    let status = lsj.status.clone().unwrap_or_default();
    let shown = status.phase;
    if shown.is_some_and(JobPhase::is_final) {
        return Vec::new();
    }
    let started_before = status.attempt > 0;
    let leftovers = started_before.then(|| id.clone());
    // A job a coordinator before this one started keeps the config it started with: the one
    // in its ConfigMap, whatever spec.config says now.
    let lsj = match (&seen.started_config, started_before) {
        (Some(text), true) => match JobConfig::parse(text, &[]) {
            Ok(c) => {
                let mut kept = (**lsj).clone();
                kept.spec.config = c.into();
                Arc::new(kept)
            }
            Err(e) => {
                let name = render::config_map_name(&lsj.metadata.name.clone().unwrap_or_default());
                let why = format!(
                    "ConfigMap {name}: the config the job started with does not parse: {e}"
                );
                return refuse(lsj, leftovers, why, &seen.now);
            }
        },
        _ => lsj.clone(),
    };
    let lsj = match fill_date(&lsj, &seen.now) {
        Ok(l) => l,
        Err(e) => return refuse(&lsj, leftovers, e, &seen.now),
    };
    // What the LockstepJob asks must be runnable before anything starts.
    let config = match lsj.spec.config.get() {
        Ok(c) => c,
        Err(e) => return refuse(&lsj, leftovers, e, &seen.now),
    };
    if let Err(e) = config.validate() {
        return refuse(&lsj, leftovers, format!("spec.config: {e}"), &seen.now);
    }
    if let Err(e) = lsj.spec.check() {
        return refuse(&lsj, leftovers, e, &seen.now);
    }
    let config_text = match render::config_toml(&lsj) {
        Ok(t) => t,
        Err(e) => return refuse(&lsj, leftovers, e, &seen.now),
    };
    if lsj.spec.suspend {
        if shown == Some(JobPhase::Suspended) {
            return Vec::new();
        }
        // A coordinator before this one may have left its gang running: it goes.
        let mut steps: Vec<Step> = leftovers
            .map(|id| Step::KillLeftovers { id })
            .into_iter()
            .collect();
        let mut st = status;
        st.phase = Some(JobPhase::Suspended);
        st.observed_generation = lsj.metadata.generation;
        st.set_condition(
            "Running",
            false,
            "Suspended",
            "spec.suspend is true",
            &seen.now,
        );
        steps.push(Step::WriteStatus(Box::new(st)));
        return steps;
    }
    let workdir = workdir_of(&lsj);
    if started_before {
        let record = record_from_status(&lsj, config, &id, config_text, workdir);
        vec![Step::Adopt {
            record: Box::new(record),
            lsj,
            forget: false,
        }]
    } else {
        vec![Step::Submit {
            id,
            config_text,
            workdir,
            lsj,
        }]
    }
}

/// `lsj` with `{date}` in its config replaced by the day it was created (UTC; `now`'s day if
/// the object has no creation time): the job's config is fixed for every attempt and every
/// coordinator that runs it, and the ConfigMap its pods read holds it filled.
fn fill_date(lsj: &Arc<LockstepJob>, now: &str) -> Result<Arc<LockstepJob>, String> {
    let text = render::config_toml(lsj)?;
    if !text.contains("{date}") {
        return Ok(lsj.clone());
    }
    let date = lsj.metadata.creation_timestamp.as_ref().map_or_else(
        || now.chars().take(10).collect(),
        |t| lockstep_api::date::iso(u64::try_from(t.0.as_millisecond()).unwrap_or(0)),
    );
    let filled = lockstep_api::date::apply(&text, &date);
    let config = JobConfig::parse(&filled, &[])
        .map_err(|e| format!("spec.config (with {{date}} = {date}): {e}"))?;
    let mut kept = (**lsj).clone();
    kept.spec.config = config.into();
    Ok(Arc::new(kept))
}

/// A LockstepJob that cannot run: failed, saying why (nothing to write when its status says
/// so already); `leftovers`: the job id whose gangs a coordinator before this one left.
pub fn refuse(lsj: &LockstepJob, leftovers: Option<String>, why: String, now: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = leftovers
        .map(|id| Step::KillLeftovers { id })
        .into_iter()
        .collect();
    let mut st = lsj.status.clone().unwrap_or_default();
    if st.phase != Some(JobPhase::Failed) || st.message.as_deref() != Some(why.as_str()) {
        st.phase = Some(JobPhase::Failed);
        st.message = Some(why.clone());
        st.observed_generation = lsj.metadata.generation;
        st.set_condition("Failed", true, "InvalidSpec", &why, now);
        steps.push(Step::WriteStatus(Box::new(st)));
    }
    steps
}

/// The job's record as its status keeps it, to adopt it.
fn record_from_status(
    lsj: &LockstepJob,
    config: &JobConfig,
    id: &str,
    config_text: String,
    workdir: PathBuf,
) -> JobRecord {
    let st = lsj.status.clone().unwrap_or_default();
    // Resumed after a suspend (or never started): queued for its next attempt.
    let phase = st.phase.and_then(JobPhase::job).unwrap_or(Phase::Queued);
    let created = lsj
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_millisecond());
    let mut r = JobRecord::new(id.to_string(), config, config_text, Vec::new(), workdir);
    r.lifecycle = Lifecycle {
        phase,
        attempt: st.attempt,
        restarts: st.restarts,
        max_restarts: config.job.max_restarts,
        // Kubernetes restarts gangs; it does not replace ranks in place.
        replacements: 0,
        message: st.message.clone().unwrap_or_default(),
    };
    r.step = st.step;
    r.loss = st.loss;
    r.first_loss = st.first_loss;
    r.eval_loss = st.eval_loss;
    r.eval_step = st.eval_step;
    r.last_checkpoint = st.last_committed_checkpoint;
    r.params_hash = st.params_hash.clone().unwrap_or_default();
    r.created_ms = created;
    r
}

#[cfg(test)]
mod tests;
