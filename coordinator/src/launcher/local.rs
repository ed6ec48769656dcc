//! [`LocalProcess`]: workers as processes of this machine, started as `EXE train …` (the one
//! `lockstep` binary), each leading its own process group.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::sync::mpsc;

use super::{Exit, LaunchError, Launcher, WorkerHandle, WorkerSpec};

/// Runs workers as `EXE train …` processes on this machine.
#[derive(Debug, Clone)]
pub struct LocalProcess {
    exe: PathBuf,
}

impl LocalProcess {
    /// Workers are this executable (`lockstep`) run as `lockstep train`: the binary that
    /// coordinates is the binary that trains, so the two always agree on their protocol.
    pub fn current_exe() -> Result<LocalProcess, LaunchError> {
        std::env::current_exe()
            .map(|exe| LocalProcess { exe })
            .map_err(LaunchError::NoExecutable)
    }

    /// Workers are `exe train …` (any executable taking `lockstep train`'s arguments).
    pub fn with_executable(exe: PathBuf) -> LocalProcess {
        LocalProcess { exe }
    }

    /// The executable it runs.
    pub fn executable(&self) -> &Path {
        &self.exe
    }

    /// The command line of `spec`'s worker, after the executable.
    fn args(spec: &WorkerSpec) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["train".into(), "--config".into()];
        args.push(spec.config.clone().into());
        for a in [
            "--no-progress",
            "--coordinator",
            &spec.coordinator,
            "--job",
            &spec.job_id,
            "--attempt",
            &spec.attempt.to_string(),
            "--worker",
            &spec.worker.to_string(),
        ] {
            args.push(a.into());
        }
        for o in &spec.overrides {
            args.push("--set".into());
            args.push(o.into());
        }
        args
    }
}

struct LocalWorker {
    pid: u32,
}

impl WorkerHandle for LocalWorker {
    fn kill(&self) {
        kill_group(self.pid);
    }
}

/// Live local workers of job `job` on this machine (of worker `worker` only, when given),
/// found by their command lines in /proc (`… train … --job JOB … --worker N`); zombies do not
/// count. Used to kill what a dead coordinator left behind, and by tests, chaos drills and
/// benchmarks that signal a rank.
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
        let flag = |name: &str, value: &str| args.windows(2).any(|p| p[0] == name && p[1] == value);
        let trainer = args.get(1).is_some_and(|a| a == "train") && flag("--job", job);
        let this_worker = worker.is_none_or(|w| flag("--worker", &w.to_string()));
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

#[async_trait::async_trait]
impl Launcher for LocalProcess {
    async fn launch(
        &self,
        spec: &WorkerSpec,
        exited: mpsc::UnboundedSender<Exit>,
    ) -> Result<Box<dyn WorkerHandle>, LaunchError> {
        let what = format!("worker {} of attempt {}", spec.worker, spec.attempt);
        let spawn_err = |source| LaunchError::Spawn {
            what: what.clone(),
            source,
        };
        // The log file is disk IO: on the blocking pool.
        let path = spec.log.clone();
        let log = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let log = std::fs::File::create(&path)?;
            let log2 = log.try_clone()?;
            Ok::<_, std::io::Error>((log, log2))
        })
        .await
        .map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let (log, log2) = log.map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(Self::args(spec))
            .env("LOCKSTEP_TOKEN", &spec.token)
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

    async fn kill_leftovers(&self, job: &str) {
        let job = job.to_string();
        // Reads /proc: on the blocking pool. Processes are this job's workers by their command
        // line (`train … --job JOB`), so a reused pid is never mistaken for one.
        let scan = tokio::task::spawn_blocking(move || {
            for pid in local_trainers(&job, None) {
                tracing::warn!(pid, job = %job, "killing a worker left by the previous coordinator");
                kill_group(pid);
            }
        });
        if let Err(e) = scan.await {
            tracing::error!(error = %e, "cannot look for leftover workers");
        }
    }
}
