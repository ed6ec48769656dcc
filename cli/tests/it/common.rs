//! What the tests that run `lockstep run` share: the binary, its JSON status lines, the
//! workers it starts.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// The binary under test, in `dir`.
pub fn lockstep(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    c.current_dir(dir);
    c
}

/// Pids of live `lockstep train` processes of `job` (optionally only worker `worker`).
pub fn trainers(job: &str, worker: Option<u32>) -> Vec<i32> {
    lockstep_coordinator::launcher::local_trainers(job, worker)
        .into_iter()
        .map(|p| p as i32)
        .collect()
}

/// A port nothing listens on now (on 127.0.0.1).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// Runs `lockstep run --json`; when `hit` is given, sends its signal to its worker once the
/// job reaches its step. Returns the exit code and every status line.
pub fn run(dir: &Path, hit: Option<(u32, nix::sys::signal::Signal, u64)>) -> (i32, Vec<Value>) {
    match hit {
        Some((worker, sig, at)) => run_hitting(dir, &[(worker, sig)], at),
        None => run_hitting(dir, &[], 0),
    }
}

/// Runs `lockstep run --json`; once the job reaches step `at`, sends each of `hits`' signals
/// to its worker, at once. Returns the exit code and every status line.
pub fn run_hitting(
    dir: &Path,
    hits: &[(u32, nix::sys::signal::Signal)],
    at: u64,
) -> (i32, Vec<Value>) {
    let mut pending = !hits.is_empty();
    run_watching(dir, |s| {
        if pending && s["state"] == "running" && s["step"].as_u64().unwrap() >= at {
            let pids: Vec<(i32, nix::sys::signal::Signal)> = hits
                .iter()
                .map(|&(worker, sig)| {
                    let pids = trainers(s["job"].as_str().unwrap(), Some(worker));
                    assert_eq!(pids.len(), 1, "worker {worker}: {pids:?}");
                    (pids[0], sig)
                })
                .collect();
            for (pid, sig) in pids {
                signal(pid, sig);
            }
            pending = false;
        }
    })
}

/// Runs `lockstep run --json`, showing `watch` each status line as it comes. Returns the exit
/// code and every status line.
pub fn run_watching(dir: &Path, mut watch: impl FnMut(&Value)) -> (i32, Vec<Value>) {
    run_watching_pid(dir, |s, _| watch(s))
}

/// As [`run_watching`], also showing `watch` the pid of the `lockstep run` process.
pub fn run_watching_pid(dir: &Path, mut watch: impl FnMut(&Value, i32)) -> (i32, Vec<Value>) {
    let mut child = lockstep(dir)
        .args(["run", "job.toml", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for line in out.lines() {
        let s: Value = serde_json::from_str(&line.unwrap()).unwrap();
        watch(&s, pid);
        lines.push(s);
    }
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, lines)
}

/// Why the job restarted, each time: for assertion messages.
pub fn causes(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .filter(|s| s["state"] == "restarting")
        .filter_map(|s| s["message"].as_str())
        .collect()
}

pub fn last(lines: &[Value]) -> &Value {
    lines.last().expect("no status lines")
}

/// One gang at a time: these tests measure timeouts (heartbeats, gang formation) on a 2-core
/// machine, and gangs of several tests at once would starve each other. Every test that starts
/// `lockstep` processes that train holds it.
static ONE_GANG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits until no other test runs a gang; the gang may run while the guard lives.
pub fn one_gang() -> std::sync::MutexGuard<'static, ()> {
    ONE_GANG.lock().unwrap_or_else(|p| p.into_inner())
}
