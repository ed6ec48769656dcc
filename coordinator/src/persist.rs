//! Job records reach the job store from one task: callers hand over a copy and go on, the task
//! writes batches on the blocking pool (a redb commit fsyncs). No lock is ever held across a
//! disk write, and no async worker ever waits for one. [`Persister::flush`] waits until
//! everything handed over before it is durable (a submitted job is acknowledged only then).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::record::{JobRecord, JobStore, StoreError};

enum Msg {
    Put(Box<JobRecord>),
    Delete(String),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// The handle to the persistence task. Cheap to clone.
#[derive(Clone)]
pub struct Persister {
    tx: Option<mpsc::UnboundedSender<Msg>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persister")
            .field("durable", &self.tx.is_some())
            .finish()
    }
}

impl Persister {
    /// Starts the task writing to `store`; without a store (`lockstep run`) records are only
    /// kept in memory and this does nothing.
    pub fn start(store: Option<Arc<JobStore>>) -> Persister {
        let Some(store) = store else {
            return Persister { tx: None };
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, rx));
        Persister { tx: Some(tx) }
    }

    /// Hands `record` over for writing; a newer record of the same job replaces an unwritten
    /// older one.
    pub fn put(&self, record: JobRecord) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Put(Box::new(record)));
        }
    }

    /// Deletes job `id`'s record (after anything handed over before).
    pub fn delete(&self, id: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Delete(id.to_string()));
        }
    }

    /// Returns once every record handed over before this call is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        tx.send(Msg::Flush(done))
            .map_err(|_| StoreError::new("the job store writer stopped"))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::new(e)),
            Err(_) => Err(StoreError::new("the job store writer stopped")),
        }
    }
}

async fn write_loop(store: Arc<JobStore>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    // Records not yet durable, newest per job: a failed write keeps them for the next try.
    let mut pending: BTreeMap<String, Option<JobRecord>> = BTreeMap::new();
    loop {
        let first = if pending.is_empty() {
            match rx.recv().await {
                Some(m) => Some(m),
                None => return,
            }
        } else {
            // Retry what failed, sooner if more arrives.
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => Some(m),
                    // Everyone is gone: one last try, then stop.
                    None => {
                        let changes: Vec<(String, Option<JobRecord>)> =
                            pending.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                        let store = store.clone();
                        let _ = tokio::task::spawn_blocking(move || store.apply(&changes)).await;
                        return;
                    }
                },
                () = tokio::time::sleep(RETRY_AFTER) => None,
            }
        };
        // Everything queued now goes in one transaction; the newest record of a job wins.
        let mut waiters = Vec::new();
        let mut next = first;
        while let Some(msg) = next {
            match msg {
                Msg::Put(r) => {
                    pending.insert(r.id.clone(), Some(*r));
                }
                Msg::Delete(id) => {
                    pending.insert(id, None);
                }
                Msg::Flush(w) => waiters.push(w),
            }
            next = rx.try_recv().ok();
        }
        let result = if pending.is_empty() {
            Ok(())
        } else {
            let changes: Vec<(String, Option<JobRecord>)> = pending
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.apply(&changes)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the job store writer failed: {e}")),
            }
        };
        match &result {
            Ok(()) => pending.clear(),
            Err(e) => {
                tracing::error!(error = %e, jobs = pending.len(), "cannot persist jobs; will retry")
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Pause before writing records again after a failed write.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
