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
    /// `NAME-xxxxxx`.
    pub id: String,
    /// `job.name`.
    pub name: String,
    /// The job's secret: workers present it on every call.
    pub token: String,
    /// The config as submitted.
    pub config_text: String,
    /// Overrides applied to it.
    pub overrides: Vec<String>,
    /// Where relative `file://` URLs resolve.
    pub workdir: PathBuf,
    /// State machine.
    pub lifecycle: Lifecycle,
    /// Ranks.
    pub world_size: u32,
    /// `train.steps`.
    pub total_steps: u64,
    /// Newest step reported by rank 0.
    pub step: u64,
    /// Its loss.
    pub loss: Option<f64>,
    /// The first loss this job reported.
    pub first_loss: Option<f64>,
    /// Tokens per second over the gang, last step.
    pub tokens_per_sec: f64,
    /// Newest committed checkpoint.
    pub last_checkpoint: Option<u64>,
    /// Final parameters' xxh3 (rank 0's report).
    pub params_hash: String,
    /// `checkpoint.url`, resolved.
    pub checkpoint_url: String,
    /// Unix ms.
    pub created_ms: i64,
    /// Unix ms.
    pub updated_ms: i64,
    /// Seconds the current attempt's gang took to join.
    pub gang_wait_seconds: f64,
}

impl JobRecord {
    /// The wire form.
    pub fn status(&self) -> proto::JobStatus {
        proto::JobStatus {
            job_id: self.id.clone(),
            name: self.name.clone(),
            state: self.lifecycle.phase.as_str().into(),
            attempt: self.lifecycle.attempt,
            restarts: self.lifecycle.restarts,
            world_size: self.world_size,
            step: self.step,
            total_steps: self.total_steps,
            loss: self.loss,
            first_loss: self.first_loss,
            tokens_per_sec: self.tokens_per_sec,
            last_checkpoint: self.last_checkpoint,
            message: self.lifecycle.message.clone(),
            params_hash: self.params_hash.clone(),
            checkpoint_url: self.checkpoint_url.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            gang_wait_seconds: self.gang_wait_seconds,
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
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let db = redb::Database::create(&path).map_err(|e| err(e.to_string()))?;
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
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
            for job in jobs {
                let value = serde_json::to_vec(job).map_err(|e| self.err(e))?;
                t.insert(job.id.as_str(), value.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every job. A record that does not parse is reported by id and skipped. Blocking.
    pub fn all(&self) -> Result<Vec<JobRecord>, StoreError> {
        use redb::{ReadableDatabase as _, ReadableTable as _};
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut jobs = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match serde_json::from_slice::<JobRecord>(v.value()) {
                Ok(j) => jobs.push(j),
                Err(e) => {
                    tracing::error!(job = k.value(), error = %e, "unreadable job record skipped")
                }
            }
        }
        Ok(jobs)
    }
}
