//! [`LocalProcess`]: workers as processes of this machine, started as `EXE train …` (the one
//! `lockstep` binary), each leading its own process group.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use lockstep_api::memory::{MemoryPlan, Target};
use tokio::sync::mpsc;

use super::{
    Exit, ExportError, ExportSpec, LaunchError, Launcher, Placement, Refused, WorkerHandle,
    WorkerSpec,
};

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
        for a in [
            std::ffi::OsStr::new("--data-cache"),
            spec.data_cache.as_os_str(),
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

/// Whether a variable of the coordinator's environment reaches its workers. Only what a
/// trainer uses: the system basics, logging, the device and NCCL, the S3 settings its
/// checkpoints and data need. Not the admin token, not a static gang's rank and peers, not
/// anything else a user happened to export.
pub fn passes_to_workers(name: &std::ffi::OsStr) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "RUST_BACKTRACE",
        "LOCKSTEP_LOG",
        "LOCKSTEP_DATA_HOST",
        "LOCKSTEP_CUDA_DEVICE",
        // Fault injection of a soak or drill (lockstep_storage::fault::FAULTS_ENV).
        "LOCKSTEP_STORE_FAULTS",
        "CUDA_VISIBLE_DEVICES",
    ];
    const PREFIXES: &[&str] = &[
        "LC_",
        "AWS_",
        "NCCL_",
        // S3 behind a proxy.
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
    ];
    let Some(name) = name.to_str() else {
        return false;
    };
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The last `error: …` line of a worker's log (its own words for why it failed), from the
/// log's last 64 KiB, at most 2,000 characters of it.
fn last_error(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut tail = Vec::new();
    f.take(64 << 10).read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().find(|l| l.starts_with("error: "))?;
    Some(line.chars().take(2000).collect())
}

/// `MemAvailable` from /proc/meminfo, in bytes (`None` off Linux).
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Whether all of `config`'s ranks (its `[model]` being the real architecture) fit this
/// machine's available memory.
fn admit_sized(config: &lockstep_api::JobConfig) -> Result<(), Refused> {
    let Some(available) = mem_available() else {
        return Ok(()); // not Linux: nothing to compare with
    };
    let plan = MemoryPlan::of(config, Target::Cpu);
    let world = u64::from(config.job.world_size.max(1));
    let place = format!(
        "each of job.world_size = {world} local ranks (this machine has {} available)",
        lockstep_api::memory::bytes(available)
    );
    if let Some(why) = plan.refusal(config, available / world, &place) {
        // The most ranks of this size the machine holds.
        let most = available / plan.total.max(1);
        let fewer = if world > 1 && most >= 1 {
            format!("; or job.world_size = {most} (the same per-rank figures)")
        } else {
            String::new()
        };
        return Err(Refused(format!(
            "{why}{fewer}; or run the job on a cluster (`lockstep plan` shows the figures)"
        )));
    }
    Ok(())
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
        // What this launcher starts: `EXE train … --coordinator URL --job JOB …`.
        let trainer = args.get(1).is_some_and(|a| a == "train")
            && args.iter().any(|a| a == "--coordinator")
            && flag("--job", job);
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

/// How long workers left by a coordinator that died get to checkpoint and exit by themselves
/// before the coordinator that takes their job over kills them.
pub const LEFTOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits up to [`LEFTOVER_GRACE`] for `job`'s workers here that `whose` picks (workers that lost
/// their coordinator checkpoint the step they are at and exit by themselves), then kills those
/// left. Blocking: reads /proc.
pub fn reap_leftovers(job: &str, whose: impl Fn(u32) -> bool) {
    let left = || -> Vec<u32> {
        local_trainers(job, None)
            .into_iter()
            .filter(|&pid| whose(pid))
            .collect()
    };
    let until = std::time::Instant::now() + LEFTOVER_GRACE;
    let mut told = false;
    while !left().is_empty() && std::time::Instant::now() < until {
        if !std::mem::replace(&mut told, true) {
            tracing::warn!(job, grace = ?LEFTOVER_GRACE,
                "workers whose coordinator died are still running: waiting for them to checkpoint and exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for pid in left() {
        tracing::warn!(pid, job, "killing a worker whose coordinator died");
        kill_leftover(pid);
    }
}

/// Whether process `pid`'s parent is a `lockstep` process (its coordinator is alive).
pub fn parent_is_lockstep(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // pid (comm) state ppid …: the command may hold spaces and parentheses.
    let Some(ppid) = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{ppid}/cmdline")) else {
        return false;
    };
    let exe = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    std::str::from_utf8(exe)
        .ok()
        .and_then(|e| std::path::Path::new(e).file_name())
        .is_some_and(|n| n == "lockstep")
}

/// SIGKILL to a leftover worker just found alive in /proc: its group, or the process alone
/// when it leads none (started by something else).
fn kill_leftover(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        let p = nix::unistd::Pid::from_raw(p);
        if nix::sys::signal::killpg(p, nix::sys::signal::Signal::SIGKILL).is_err() {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
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
            let log = crate::private::create(&path)?;
            let log2 = log.try_clone()?;
            Ok::<_, std::io::Error>((log, log2))
        })
        .await
        .map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let (log, log2) = log.map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(Self::args(spec))
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| passes_to_workers(k)))
            .env("LOCKSTEP_TOKEN", &spec.token)
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
        let (attempt, worker, log) = (spec.attempt, spec.worker, spec.log.clone());
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let mut exit = match child.wait().await {
                Ok(status) => Exit {
                    attempt,
                    worker,
                    code: status.code(),
                    signal: status.signal(),
                    message: None,
                    unstartable: false,
                },
                Err(_) => Exit {
                    attempt,
                    worker,
                    code: None,
                    signal: None,
                    message: None,
                    unstartable: false,
                },
            };
            // The worker is gone; anything it started in its group goes with it.
            kill_group(pid);
            if exit.code.is_some_and(|c| c != 0) {
                exit.message = tokio::task::spawn_blocking(move || last_error(&log))
                    .await
                    .ok()
                    .flatten();
            }
            let _ = exited.send(exit);
        });
        Ok(Box::new(LocalWorker { pid }))
    }

    /// All ranks run on this machine: their estimated memory must fit in what it has free.
    fn admit(&self, config: &lockstep_api::JobConfig) -> Result<(), Refused> {
        // A model directory's size is in its config.json, not `[model]`: the preflight
        // checks it sized by that.
        if matches!(config.model.base, lockstep_api::BaseModel::Dir(_)) {
            return Ok(());
        }
        admit_sized(config)
    }

    /// Workers run on this machine: they read what this process can see.
    async fn preflight(
        &self,
        config: &lockstep_api::JobConfig,
        workdir: &Path,
    ) -> Result<(), Refused> {
        let deadline = tokio::time::Instant::now() + crate::preflight::LIMIT;
        crate::preflight::check(config, workdir).await?;
        // A Hugging Face base model's size is in its config.json, not in `[model]`; one that
        // cannot be a base is refused here, before any worker starts.
        match crate::preflight::base_architecture(config, workdir, deadline).await {
            Ok(Some(sized)) => admit_sized(&sized)
                .map_err(|e| Refused(format!("{e} (sized by model.base's config.json)")))?,
            Ok(None) => {}
            Err(e) if e.unread => {
                tracing::warn!("{}; the job's memory is not checked", e.why);
            }
            Err(e) => return Err(Refused(e.why)),
        }
        Ok(())
    }

    async fn export(&self, spec: &ExportSpec) -> Result<String, ExportError> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args([
            "export",
            spec.checkpoint.as_str(),
            "--to",
            spec.to.as_str(),
            "--name",
            spec.name.as_str(),
            "--dtype",
            spec.dtype.as_str(),
            "--lora",
            spec.lora.as_str(),
            "--promote",
            "--json",
            "--max-eval-regression",
            &spec.max_eval_regression.to_string(),
            "--lineage",
            spec.lineage.as_str(),
        ]);
        if let Some(base) = &spec.base {
            cmd.args(["--base", base.as_str()]);
        }
        let out = cmd
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| passes_to_workers(k)))
            // In the environment, not on the command line: the URL may carry credentials.
            .envs(spec.webhook.iter().map(|u| ("LOCKSTEP_EXPORT_WEBHOOK", u)))
            .current_dir(&spec.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                ExportError::Failed(format!("cannot run `{} export`: {e}", self.exe.display()))
            })?;
        // Its output is kept with the job's logs (disk IO: on the blocking pool).
        let (path, text) = (
            spec.log.clone(),
            [&out.stdout[..], &out.stderr[..]].concat(),
        );
        let kept = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            crate::private::create(&path).and_then(|mut f| f.write_all(&text))
        })
        .await;
        if !matches!(kept, Ok(Ok(()))) {
            tracing::warn!(log = %spec.log.display(), "cannot keep the export's output");
        }
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .map_or_else(
                    || format!("`lockstep export` ended with {}", out.status),
                    |l| l.chars().take(2000).collect(),
                );
            return Err(ExportError::Failed(format!(
                "{why} (log: {})",
                spec.log.display()
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            ExportError::Failed(format!("`lockstep export` printed no result ({e}): {line}"))
        })?;
        Ok(format!(
            "exported {} to {}; {}",
            v["version"].as_str().unwrap_or("?"),
            v["url"].as_str().unwrap_or("?"),
            v["note"].as_str().unwrap_or("")
        ))
    }

    fn replaces_in_place(&self) -> bool {
        true
    }

    async fn kill_leftovers(&self, job: &str, _placement: &Placement) {
        let job = job.to_string();
        // Reads /proc: on the blocking pool. Processes are this job's workers by their command
        // line (`train … --job JOB`), so a reused pid is never mistaken for one.
        let scan = tokio::task::spawn_blocking(move || reap_leftovers(&job, |_| true));
        if let Err(e) = scan.await {
            tracing::error!(error = %e, "cannot look for leftover workers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::passes_to_workers;

    #[test]
    fn workers_get_only_the_environment_they_need() {
        for name in [
            "PATH",
            "AWS_SECRET_ACCESS_KEY",
            "LC_ALL",
            "NCCL_DEBUG",
            "LOCKSTEP_LOG",
        ] {
            assert!(passes_to_workers(name.as_ref()), "{name}");
        }
        for name in [
            "LOCKSTEP_ADMIN_TOKEN",
            "LOCKSTEP_RANK",
            "LOCKSTEP_PEERS",
            "LOCKSTEP_TOKEN",
            "GITHUB_TOKEN",
            "DATABASE_URL",
        ] {
            assert!(!passes_to_workers(name.as_ref()), "{name}");
        }
    }
}
