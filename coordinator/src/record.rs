//! A job as the coordinator stores it, and the embedded store that keeps jobs across
//! coordinator restarts (redb, one table, one JSON value per job).

use std::path::{Path, PathBuf};

use lockstep_api::proto;
use serde::{Deserialize, Serialize};

use crate::state::{Lifecycle, Phase};

/// Everything the coordinator knows about a job; persisted on every change of phase and
/// every committed checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// `NAME-` and 16 hex digits (64 random bits).
    pub id: String,
    /// `job.name`: the name users see, and the checkpoints' and exports' job.
    pub name: String,
    /// The job's secret: workers present it on every call. In memory only, never stored: a
    /// coordinator that restarts gives each live job a new one (the old workers are killed).
    #[serde(skip_serializing, default)]
    pub token: String,
    /// The config as submitted.
    pub config_text: String,
    /// Overrides applied to it.
    pub overrides: Vec<String>,
    /// Where relative `file://` URLs resolve.
    pub workdir: PathBuf,
    /// Phase, attempt and restarts: what the state machine decides on.
    pub lifecycle: Lifecycle,
    /// Ranks in the gang (`job.world_size`).
    pub world_size: u32,
    /// The step training ends at (`train.steps`).
    pub total_steps: u64,
    /// Newest step reported by rank 0.
    pub step: u64,
    /// The training loss of that step (rank 0's, summed over the gang).
    pub loss: Option<f64>,
    /// The first loss this job reported.
    pub first_loss: Option<f64>,
    /// The newest held-out loss.
    #[serde(default)]
    pub eval_loss: Option<f64>,
    /// The step `eval_loss` was measured after.
    #[serde(default)]
    pub eval_step: Option<u64>,
    /// Tokens per second over the gang, last step.
    pub tokens_per_sec: f64,
    /// The step of the newest checkpoint this coordinator committed for the job.
    pub last_checkpoint: Option<u64>,
    /// Final parameters' xxh3 (rank 0's report).
    pub params_hash: String,
    /// `checkpoint.url`, resolved.
    pub checkpoint_url: String,
    /// When the job was accepted (Unix ms).
    pub created_ms: i64,
    /// When the record last changed (Unix ms); finished jobs are forgotten a week after.
    pub updated_ms: i64,
    /// Seconds the current attempt's gang took to join.
    pub gang_wait_seconds: f64,
    /// What a rank of an attempt said it is doing before its first step (tokenising, waiting
    /// for another job's tokenising): the attempt and `rank N: …`. Shown while that attempt
    /// is admitting or running and has taken no step; not stored.
    #[serde(skip)]
    pub doing: Option<(u32, String)>,
    /// Where its workers' logs are (a directory on the coordinator's machine, or the
    /// `kubectl logs` command that shows them).
    #[serde(default)]
    pub logs: String,
    /// Checkpoints that failed (each retried by the next).
    #[serde(default)]
    pub checkpoint_failures: u32,
    /// The newest failure, `step N: reason`; empty when none failed.
    #[serde(default)]
    pub checkpoint_error: String,
    /// What each recovery from a lost rank did, oldest first (the newest
    /// [`MAX_RECOVERIES`]).
    #[serde(default)]
    pub recoveries: Vec<RecoveryRecord>,
}

/// Recoveries a job's record keeps (the oldest are dropped first).
pub const MAX_RECOVERIES: usize = 256;

/// One recovery from a lost rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    /// The rank lost, when one was named.
    pub rank: Option<u32>,
    /// What happened, as the job's message said it.
    pub cause: String,
    /// `in-place` (the lost rank replaced, the others kept their state), `emergency-checkpoint`
    /// (the gang could not re-form: its survivors checkpointed the state they held, and it
    /// restarted from that) or `checkpoint` (the gang restarted from its last checkpoint).
    pub path: String,
    /// When the coordinator acted on the loss (Unix ms).
    pub at_ms: i64,
    /// The newest step rank 0 had reported then.
    pub step: u64,
    /// Steps trained again: `step` minus the step the gang continued from; known at the first
    /// step after the recovery.
    pub steps_lost: Option<u64>,
    /// From `at_ms` to the first finished step after the recovery (or to the end of training,
    /// for one at the last step). Not the time a hung rank took to be caught: it counts from
    /// when the coordinator acted (`job.heartbeat_timeout` after the rank's last heartbeat).
    pub seconds: Option<f64>,
    /// It did not finish: another recovery took over before the gang's next step (a second
    /// rank lost, the replacement lost or late).
    #[serde(default)]
    pub superseded: bool,
}

impl JobRecord {
    /// Notes a recovery that begins now.
    pub fn recovering(&mut self, rank: Option<u32>, path: &str) {
        if self.recoveries.len() >= MAX_RECOVERIES {
            self.recoveries.remove(0);
        }
        if let Some(r) = self.recoveries.last_mut()
            && r.seconds.is_none()
        {
            r.superseded = true;
        }
        self.recoveries.push(RecoveryRecord {
            rank,
            cause: self.lifecycle.message.clone(),
            path: path.to_string(),
            at_ms: now_ms(),
            step: self.step,
            steps_lost: None,
            seconds: None,
            superseded: false,
        });
    }

    /// The newest recovery is under way and takes the last checkpoint (its gang is restarting).
    pub fn recovering_from_checkpoint(&self) -> bool {
        self.recoveries
            .last()
            .is_some_and(|r| r.seconds.is_none() && !r.superseded && r.path == "checkpoint")
    }

    /// The gang of the newest recovery, which lost its coordinator, checkpointed the step it
    /// was at (`step`, committed by its rank 0) before it went: the restart resumes from it, as
    /// from an emergency checkpoint.
    pub fn kept_by_orphans(&mut self, step: u64) {
        self.lifecycle.message.push_str(&format!(
            "; its workers checkpointed step {step} as they lost the coordinator, and the gang \
             restarts from it"
        ));
        if let Some(r) = self.recoveries.last_mut() {
            r.path = "emergency-checkpoint".into();
            r.step = r.step.max(step);
            r.cause = self.lifecycle.message.clone();
        }
    }

    /// The survivors of the newest recovery's gang committed an emergency checkpoint of `step`
    /// (`writers` shards) before it restarts: the restart resumes from it.
    pub fn emergency_checkpoint(&mut self, step: u64, writers: usize) {
        self.lifecycle.message.push_str(&format!(
            "; its survivors wrote an emergency checkpoint of step {step} ({writers} shard{}), \
             and the gang restarts from it",
            if writers == 1 { "" } else { "s" }
        ));
        if let Some(r) = self.recoveries.last_mut()
            && r.seconds.is_none()
        {
            r.path = "emergency-checkpoint".into();
            r.cause = self.lifecycle.message.clone();
        }
    }

    /// Training ended at `step` (the last): a recovery at that step, which no step followed,
    /// is complete, having lost none.
    pub fn trained(&mut self, step: u64) {
        if let Some(r) = self.recoveries.last_mut()
            && r.seconds.is_none()
            && !r.superseded
            && r.step >= step
        {
            r.seconds = Some((now_ms() - r.at_ms).max(0) as f64 / 1e3);
            r.steps_lost = Some(0);
        }
    }

    /// Rank 0 finished `step`: completes a recovery still waiting for its first step.
    pub fn stepped(&mut self, step: u64) {
        if let Some(r) = self.recoveries.last_mut()
            && r.seconds.is_none()
            && !r.superseded
        {
            r.seconds = Some((now_ms() - r.at_ms).max(0) as f64 / 1e3);
            r.steps_lost = Some(r.step.saturating_sub(step.saturating_sub(1)));
        }
    }
}

/// Resolves a relative `file://` URL against `workdir`.
pub fn resolve_url(url: &str, workdir: &Path) -> String {
    match url.strip_prefix("file://") {
        Some(p) if !p.starts_with('/') => format!("file://{}", workdir.join(p).display()),
        _ => url.to_string(),
    }
}

impl JobRecord {
    /// A new job `id` of `config` (parsed from `config_text` with `overrides`), queued for its
    /// first attempt; relative `file://` URLs resolve against `workdir`. Its token is empty
    /// until the coordinator gives it one.
    pub fn new(
        id: String,
        config: &lockstep_api::JobConfig,
        config_text: String,
        overrides: Vec<String>,
        workdir: PathBuf,
    ) -> JobRecord {
        let now = now_ms();
        JobRecord {
            id,
            name: config.job.name.clone(),
            token: String::new(),
            config_text,
            overrides,
            lifecycle: Lifecycle::new(config.job.max_restarts),
            world_size: config.job.world_size,
            total_steps: config.train.steps,
            step: 0,
            loss: None,
            first_loss: None,
            eval_loss: None,
            eval_step: None,
            tokens_per_sec: 0.0,
            last_checkpoint: None,
            params_hash: String::new(),
            checkpoint_url: resolve_url(&config.checkpoint.url, &workdir),
            workdir,
            created_ms: now,
            updated_ms: now,
            gang_wait_seconds: 0.0,
            doing: None,
            logs: String::new(),
            checkpoint_failures: 0,
            checkpoint_error: String::new(),
            recoveries: Vec::new(),
        }
    }

    /// The wire form.
    pub fn status(&self) -> proto::JobStatus {
        proto::JobStatus {
            job_id: self.id.clone(),
            name: self.name.clone(),
            state: self.lifecycle.phase.as_str().into(),
            attempt: self.lifecycle.attempt,
            restarts: self.lifecycle.restarts,
            replacements: self.lifecycle.replacements,
            world_size: self.world_size,
            step: self.step,
            total_steps: self.total_steps,
            loss: self.loss,
            first_loss: self.first_loss,
            eval_loss: self.eval_loss,
            eval_step: self.eval_step,
            tokens_per_sec: self.tokens_per_sec,
            last_checkpoint: self.last_checkpoint,
            message: self.lifecycle.message.clone(),
            params_hash: self.params_hash.clone(),
            checkpoint_url: self.checkpoint_url.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            gang_wait_seconds: self.gang_wait_seconds,
            checkpoint_failures: self.checkpoint_failures,
            checkpoint_error: self.checkpoint_error.clone(),
            recoveries: self
                .recoveries
                .iter()
                .map(|r| proto::Recovery {
                    rank: r.rank,
                    cause: r.cause.clone(),
                    path: r.path.clone(),
                    at_ms: r.at_ms,
                    step: r.step,
                    steps_lost: r.steps_lost,
                    seconds: r.seconds,
                    superseded: r.superseded,
                })
                .collect(),
            doing: match &self.doing {
                Some((attempt, words))
                    if *attempt == self.lifecycle.attempt
                        && matches!(self.phase(), Phase::Admitting | Phase::Running) =>
                {
                    words.clone()
                }
                _ => String::new(),
            },
            logs: self.logs.clone(),
        }
    }

    /// Phase, for short.
    pub fn phase(&self) -> Phase {
        self.lifecycle.phase
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The persistent store could not be used.
#[derive(Debug, thiserror::Error)]
#[error("job store {path}: {reason}")]
pub struct StoreError {
    path: String,
    reason: String,
}

impl StoreError {
    pub(crate) fn new(reason: impl ToString) -> StoreError {
        StoreError {
            path: "jobs.redb".into(),
            reason: reason.to_string(),
        }
    }
}

const JOBS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("jobs");

/// Jobs on disk: `DATA_DIR/jobs.redb`.
pub struct JobStore {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore")
            .field("path", &self.path)
            .finish()
    }
}

impl JobStore {
    /// Opens (or creates) the store in `dir`. Blocking.
    pub fn open(dir: &Path) -> Result<JobStore, StoreError> {
        let path = dir.join("jobs.redb");
        let err = |reason: String| StoreError {
            path: path.display().to_string(),
            reason,
        };
        crate::private::dir(dir).map_err(|e| err(e.to_string()))?;
        // redb asserts (panics) on some damaged files: a damaged store is an error with a
        // way out, not a crash of the coordinator.
        let way_out = |what: String| {
            err(format!(
                "{what}. The job store is damaged: move it aside (`mv {0} {0}.damaged`) and \
                 start again; jobs' checkpoints are not affected, resubmit the jobs to resume \
                 them",
                path.display()
            ))
        };
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            redb::Database::create(&path)
        }));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(err(
                    "another coordinator is using this data dir (its job store is locked); \
                     stop it, or give this one another --data-dir"
                        .into(),
                ));
            }
            Ok(Err(e)) => return Err(way_out(e.to_string())),
            Err(_) => return Err(way_out("redb could not read it".into())),
        };
        // It holds every job's config and token.
        crate::private::restrict(&path).map_err(|e| err(e.to_string()))?;
        let store = JobStore { db, path };
        // Create the table so that reads of an empty store work.
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        tx.open_table(JOBS).map_err(|e| store.err(e))?;
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// Writes `jobs` durably in one transaction (redb commits are fsynced). Blocking.
    pub fn put_all(&self, jobs: &[JobRecord]) -> Result<(), StoreError> {
        let changes: Vec<(String, Option<JobRecord>)> = jobs
            .iter()
            .map(|j| (j.id.clone(), Some(j.clone())))
            .collect();
        self.apply(&changes)
    }

    /// Writes (`Some`) or deletes (`None`) records by job id, durably, in one transaction.
    /// Blocking.
    pub fn apply(&self, changes: &[(String, Option<JobRecord>)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
            for (id, job) in changes {
                match job {
                    Some(job) => {
                        let value = encode(job).map_err(|e| self.err(e))?;
                        t.insert(id.as_str(), value.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        t.remove(id.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every job, and the ids of records that fail their checksum or do not parse (with
    /// why), which the caller reports. Blocking.
    pub fn all(&self) -> Result<Stored, StoreError> {
        use redb::{ReadableDatabase as _, ReadableTable as _};
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut stored = Stored::default();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match decode(v.value()) {
                Ok(j) if j.id == k.value() => stored.jobs.push(j),
                Ok(j) => stored.bad.push((
                    k.value().to_string(),
                    format!("the record is job `{}`'s", j.id),
                )),
                Err(e) => stored.bad.push((k.value().to_string(), e)),
            }
        }
        Ok(stored)
    }
}

/// How long a finished job is kept (in the store and in `status`).
pub const FINISHED_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;
/// At most this many finished jobs are kept; older ones go first.
pub const MAX_FINISHED: usize = 1000;

/// The finished jobs to forget: those finished before `now_ms - keep_ms`, and beyond the
/// newest `max`. `finished` is (id, last update in ms) of every finished job.
pub fn expired(finished: &[(String, i64)], now_ms: i64, keep_ms: i64, max: usize) -> Vec<String> {
    let mut by_age: Vec<&(String, i64)> = finished.iter().collect();
    by_age.sort_by_key(|(id, ms)| (std::cmp::Reverse(*ms), id.clone()));
    by_age
        .into_iter()
        .enumerate()
        .filter(|(i, (_, ms))| *i >= max || now_ms.saturating_sub(*ms) > keep_ms)
        .map(|(_, (id, _))| id.clone())
        .collect()
}

/// What [`JobStore::all`] found.
#[derive(Debug, Default)]
pub struct Stored {
    /// Readable jobs.
    pub jobs: Vec<JobRecord>,
    /// Unreadable records: the job id (the key) and why.
    pub bad: Vec<(String, String)>,
}

/// Version byte of a stored record: `1`, an xxh3-64 of the JSON (little-endian), the JSON.
const RECORD_V1: u8 = 1;

fn encode(job: &JobRecord) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(job)?;
    let mut out = Vec::with_capacity(json.len() + 9);
    out.push(RECORD_V1);
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<JobRecord, String> {
    let json = match bytes.split_first() {
        // Written before records carried a checksum.
        Some((b'{', _)) => bytes,
        Some((&RECORD_V1, rest)) if rest.len() >= 8 => {
            let (sum, json) = rest.split_at(8);
            let want = u64::from_le_bytes(sum.try_into().map_err(|_| "short record")?);
            if xxhash_rust::xxh3::xxh3_64(json) != want {
                return Err("the record fails its checksum".into());
            }
            json
        }
        _ => return Err("not a job record of a known version".into()),
    };
    serde_json::from_slice(json).map_err(|e| format!("the record does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Lifecycle;

    fn record(id: &str) -> JobRecord {
        let config = lockstep_api::testing::TestJob::tiny("j")
            .world(1)
            .config()
            .expect("the test config");
        let mut r = JobRecord::new(id.into(), &config, String::new(), vec![], "/".into());
        r.lifecycle = Lifecycle::new(1);
        (r.created_ms, r.updated_ms) = (0, 0);
        r
    }

    #[test]
    fn finished_jobs_are_forgotten_after_a_week_or_beyond_the_newest_thousand() {
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        let jobs = vec![
            ("old".to_string(), now - 8 * day),
            ("fresh".to_string(), now - day),
            ("newest".to_string(), now),
        ];
        assert_eq!(expired(&jobs, now, FINISHED_KEPT_MS, 1000), vec!["old"]);
        assert_eq!(
            expired(&jobs, now, FINISHED_KEPT_MS, 1),
            vec!["fresh", "old"]
        );
        assert!(expired(&[], now, FINISHED_KEPT_MS, 0).is_empty());
    }

    #[test]
    fn tokens_are_never_written_to_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = JobStore::open(dir.path()).expect("open");
        let secret = "s3cr3t".repeat(8);
        let mut r = record("a-1");
        r.token = secret.clone();
        store.put_all(&[r]).expect("put");
        drop(store);
        let bytes = std::fs::read(dir.path().join("jobs.redb")).expect("read");
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the job token is in jobs.redb"
        );
        let store = JobStore::open(dir.path()).expect("reopen");
        assert_eq!(store.all().expect("all").jobs[0].token, "");
    }

    #[test]
    fn a_damaged_record_is_reported_by_id_not_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = JobStore::open(dir.path()).expect("open");
        store.put_all(&[record("a-1"), record("b-2")]).expect("put");
        // Flip one bit of b-2's JSON.
        let mut bad = encode(&record("b-2")).expect("encode");
        let n = bad.len();
        bad[n - 5] ^= 1;
        let tx = store.db.begin_write().expect("tx");
        tx.open_table(JOBS)
            .expect("table")
            .insert("b-2", bad.as_slice())
            .expect("insert");
        tx.commit().expect("commit");
        let stored = store.all().expect("all");
        assert_eq!(stored.jobs.len(), 1);
        assert_eq!(stored.jobs[0].id, "a-1");
        assert_eq!(stored.bad.len(), 1);
        assert_eq!(stored.bad[0].0, "b-2");
        assert!(stored.bad[0].1.contains("checksum"), "{:?}", stored.bad);
    }

    #[test]
    fn a_damaged_store_is_an_error_with_a_way_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(JobStore::open(dir.path()).expect("open"));
        let path = dir.path().join("jobs.redb");
        let len = std::fs::metadata(&path).expect("stat").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open file");
        f.set_len(len / 3).expect("truncate");
        drop(f);
        let e = JobStore::open(dir.path()).expect_err("damaged");
        assert!(e.to_string().contains("move it aside"), "{e}");
    }
}
