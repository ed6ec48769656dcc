//! Launchers start and kill a job's workers. [`LocalProcess`] runs `lockstep-trainer`
//! processes on this machine, each in its own process group so that tearing a worker down kills
//! everything it started; Kubernetes gets its own launcher.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::sync::mpsc;

/// What a worker needs to find its job.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The job.
    pub job_id: String,
    /// The attempt this worker belongs to.
    pub attempt: u32,
    /// Its index in the attempt (it becomes its rank).
    pub worker: u32,
    /// The coordinator's gRPC URL (`http://host:port`).
    pub coordinator: String,
    /// The job's token.
    pub token: String,
    /// The job config file and its overrides.
    pub config: PathBuf,
    /// `section.key=value` overrides.
    pub overrides: Vec<String>,
    /// Working directory (relative `file://` URLs resolve against it).
    pub workdir: PathBuf,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Its attempt.
    pub attempt: u32,
    /// Its index.
    pub worker: u32,
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
}

impl Exit {
    /// True for exit status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "exited with status 1", "was killed by SIGKILL".
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => format!("was killed by {sig}"),
                Err(_) => format!("was killed by signal {s}"),
            },
            (None, None) => "ended for an unknown reason".into(),
        }
    }
}

/// A launcher could not start a worker.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The trainer binary is not there.
    #[error(
        "cannot find `{0}` next to this executable or on PATH (build it with `cargo build --release`)"
    )]
    NotFound(String),
    /// Spawning failed.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A started worker.
pub trait WorkerHandle: Send + Sync {
    /// Kills it and everything it started (idempotent). Its exit still arrives on the channel.
    fn kill(&self);
    /// Process id, for local workers.
    fn pid(&self) -> Option<u32>;
}

/// Starts workers.
pub trait Launcher: Send + Sync + 'static {
    /// Starts `spec`'s worker. When it ends, its [`Exit`] is sent on `exited`.
    fn launch(
        &self,
        spec: &WorkerSpec,
        exited: mpsc::UnboundedSender<Exit>,
    ) -> Result<Box<dyn WorkerHandle>, LaunchError>;
}

/// Runs `lockstep-trainer` processes on this machine.
#[derive(Debug, Clone)]
pub struct LocalProcess {
    trainer: PathBuf,
}

impl LocalProcess {
    /// Finds `lockstep-trainer`: `$LOCKSTEP_TRAINER`, then next to this executable, then on
    /// PATH.
    pub fn discover() -> Result<LocalProcess, LaunchError> {
        const NAME: &str = "lockstep-trainer";
        if let Some(p) = std::env::var_os("LOCKSTEP_TRAINER") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(LocalProcess { trainer: p })
            } else {
                Err(LaunchError::NotFound(p.display().to_string()))
            };
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(NAME)));
        // Test binaries live in target/*/deps; the trainer one level up.
        let above = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().and_then(Path::parent).map(|d| d.join(NAME)));
        let on_path = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(NAME));
        beside
            .into_iter()
            .chain(above)
            .chain(on_path)
            .find(|p| p.is_file())
            .map(|trainer| LocalProcess { trainer })
            .ok_or_else(|| LaunchError::NotFound(NAME.into()))
    }

    /// Runs `trainer` (any executable taking the trainer's arguments).
    pub fn with_trainer(trainer: PathBuf) -> LocalProcess {
        LocalProcess { trainer }
    }

    /// The trainer binary it runs.
    pub fn trainer(&self) -> &Path {
        &self.trainer
    }
}

struct LocalWorker {
    pid: u32,
}

impl WorkerHandle for LocalWorker {
    fn kill(&self) {
        kill_group(self.pid);
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }
}

/// Live `lockstep-trainer` processes of job `job` on this machine (of worker `worker` only,
/// when given), found by their command lines in /proc; zombies do not count. For tests, chaos
/// drills and benchmarks that signal a rank.
pub fn local_trainers(job: &str, worker: Option<u32>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let trainer = args
            .first()
            .is_some_and(|a| a.ends_with("lockstep-trainer"))
            && args.iter().any(|a| a == job);
        let this_worker = worker.is_none_or(|w| {
            args.windows(2)
                .any(|p| p[0] == "--worker" && p[1] == w.to_string())
        });
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        });
        if trainer && this_worker && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILL to process group `pid` (each worker leads its own). ESRCH (already gone) is fine.
pub fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Launcher for LocalProcess {
    fn launch(
        &self,
        spec: &WorkerSpec,
        exited: mpsc::UnboundedSender<Exit>,
    ) -> Result<Box<dyn WorkerHandle>, LaunchError> {
        let what = format!("worker {} of attempt {}", spec.worker, spec.attempt);
        let spawn_err = |source| LaunchError::Spawn {
            what: what.clone(),
            source,
        };
        if let Some(dir) = spec.log.parent() {
            std::fs::create_dir_all(dir).map_err(spawn_err)?;
        }
        let log = std::fs::File::create(&spec.log).map_err(spawn_err)?;
        let log2 = log.try_clone().map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(&self.trainer);
        cmd.arg("--config")
            .arg(&spec.config)
            .arg("--no-progress")
            .arg("--coordinator")
            .arg(&spec.coordinator)
            .arg("--job")
            .arg(&spec.job_id)
            .arg("--attempt")
            .arg(spec.attempt.to_string())
            .arg("--worker")
            .arg(spec.worker.to_string());
        for o in &spec.overrides {
            cmd.arg("--set").arg(o);
        }
        cmd.env("LOCKSTEP_TOKEN", &spec.token)
            .env_remove("LOCKSTEP_RANK")
            .env_remove("LOCKSTEP_PEERS")
            .current_dir(&spec.workdir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id().ok_or_else(|| {
            spawn_err(std::io::Error::other(
                "the worker exited before it had a pid",
            ))
        })?;
        let (attempt, worker) = (spec.attempt, spec.worker);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let exit = match child.wait().await {
                Ok(status) => Exit {
                    attempt,
                    worker,
                    code: status.code(),
                    signal: status.signal(),
                },
                Err(_) => Exit {
                    attempt,
                    worker,
                    code: None,
                    signal: None,
                },
            };
            // The worker is gone; anything it started in its group goes with it.
            kill_group(pid);
            let _ = exited.send(exit);
        });
        Ok(Box::new(LocalWorker { pid }))
    }
}
