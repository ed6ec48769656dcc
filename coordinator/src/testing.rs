//! Test support (feature `testing`): a launcher that starts nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::launcher::{Exit, LaunchError, Launcher, Placement, WorkerHandle, WorkerSpec};
use crate::registry::lock;

/// Records what it would start and starts nothing. A killed worker "exits" at once with
/// SIGKILL, as a real one reaped after the kill.
#[derive(Default)]
pub struct Simulated {
    specs: Mutex<Vec<WorkerSpec>>,
    /// Where each launched worker's exit goes, by (attempt, worker).
    exits: Mutex<Vec<(u32, u32, mpsc::UnboundedSender<Exit>)>>,
    kills: Arc<AtomicU32>,
    panic_at: Option<u32>,
    in_place: bool,
}

impl Simulated {
    /// A launcher with a bug: launching worker `worker` panics (the workers before it start).
    pub fn panicking_at(worker: u32) -> Simulated {
        Simulated {
            panic_at: Some(worker),
            ..Simulated::default()
        }
    }

    /// A launcher that can start one worker into a running gang (in-place recovery), as the
    /// local one can.
    pub fn replacing_in_place() -> Simulated {
        Simulated {
            in_place: true,
            ..Simulated::default()
        }
    }

    /// Every worker launched so far, in order.
    pub fn specs(&self) -> Vec<WorkerSpec> {
        lock(&self.specs).clone()
    }

    /// Worker `worker` of the newest attempt "exits" with `code` or `signal`.
    pub fn exit(&self, worker: u32, code: Option<i32>, signal: Option<i32>) {
        let exits = lock(&self.exits);
        if let Some((attempt, w, tx)) = exits.iter().rev().find(|(_, w, _)| *w == worker) {
            let _ = tx.send(Exit {
                message: None,
                unstartable: false,
                attempt: *attempt,
                worker: *w,
                code,
                signal,
            });
        }
    }

    /// How many workers have been killed.
    pub fn kills(&self) -> u32 {
        self.kills.load(Ordering::SeqCst)
    }
}

struct Handle {
    attempt: u32,
    worker: u32,
    exited: mpsc::UnboundedSender<Exit>,
    killed: AtomicBool,
    kills: Arc<AtomicU32>,
}

impl WorkerHandle for Handle {
    fn kill(&self) {
        if !self.killed.swap(true, Ordering::SeqCst) {
            self.kills.fetch_add(1, Ordering::SeqCst);
            let _ = self.exited.send(Exit {
                message: None,
                unstartable: false,
                attempt: self.attempt,
                worker: self.worker,
                code: None,
                signal: Some(9),
            });
        }
    }
}

#[async_trait::async_trait]
impl Launcher for Simulated {
    async fn launch(
        &self,
        spec: &WorkerSpec,
        exited: mpsc::UnboundedSender<Exit>,
    ) -> Result<Box<dyn WorkerHandle>, LaunchError> {
        assert!(
            self.panic_at != Some(spec.worker),
            "simulated launcher bug at worker {}",
            spec.worker
        );
        lock(&self.specs).push(spec.clone());
        lock(&self.exits).push((spec.attempt, spec.worker, exited.clone()));
        Ok(Box::new(Handle {
            attempt: spec.attempt,
            worker: spec.worker,
            exited,
            killed: AtomicBool::new(false),
            kills: self.kills.clone(),
        }))
    }

    fn replaces_in_place(&self) -> bool {
        self.in_place
    }

    async fn kill_leftovers(&self, _job: &str, _placement: &Placement) {}
}
