//! `lockstep run CONFIG`: a whole job on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use lockstep_api::{Phase, proto};
use lockstep_coordinator::auth::new_token;
use lockstep_coordinator::launcher::LocalProcess;
use lockstep_coordinator::{Coordinator, Settings};

use super::serve::{bind, local_addr, serve_grpc, start_metrics};
use super::view::{View, is_final};
use super::{CliError, Result, current_dir, load_for_workers};

/// Run a job on this machine: a coordinator in this process starts job.world_size ranks (this
/// executable as `lockstep train`), replaces a rank that dies or hangs while the others keep
/// their state (`job.recovery = "in-place"`; else, or when that cannot work, restarts the gang
/// from an emergency checkpoint of the state the others hold, or from the newest committed
/// checkpoint), and shows progress until the job ends; with an
/// [export] section the final checkpoint is then exported and, if it passes the eval-loss
/// gate, promoted (see `lockstep export`). Exit status 0 when it succeeds (exported or not), 1
/// when it fails, 130 when interrupted (the gang is torn down; running it again resumes from
/// the newest checkpoint).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job config (TOML).
    config: PathBuf,
    /// Override a config field: `--set train.steps=20` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// One JSON status object per line on stdout instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Where worker logs and configs go (`DIR/jobs/JOB/attempt-N/rank-R.log`).
    #[arg(long, default_value = ".lockstep")]
    data_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics while the job runs.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// What `{date}` in the config becomes (YYYY-MM-DD; default: today, UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    date: Option<String>,
}

/// A coordinator in this process, local workers (this executable as `lockstep train`), a
/// progress bar. Exit status 0 succeeded, 1 failed, 130 interrupted.
pub async fn run(args: RunArgs) -> Result {
    // Validate before starting anything, naming the file.
    let loaded = load_for_workers(&args.config, &args.set, args.date.as_deref())?;
    let launcher = LocalProcess::current_exe().map_err(lockstep_coordinator::Error::from)?;
    let cwd = current_dir()?;
    let data_dir = cwd.join(&args.data_dir);
    let coordinator = Coordinator::open(
        Settings {
            data_dir: data_dir.clone(),
            admin_token: new_token(),
            persist: false,
        },
        Arc::new(launcher),
    )
    .await?;
    let asked: SocketAddr = ([127, 0, 0, 1], 0).into();
    let listener = bind("the coordinator's gRPC address", asked).await?;
    let addr = local_addr("the coordinator's gRPC address", &listener, asked)?;
    tokio::spawn(serve_grpc(coordinator.clone(), listener, None));
    coordinator.start(format!("http://{addr}")).await?;
    start_metrics(args.metrics_addr, &coordinator).await?;
    // Listening from here on, once: a signal that arrives while the loop below is between two
    // waits is kept for the next (a listener made per wait would lose it, and the run would
    // carry on as if never interrupted).
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let record = coordinator.submit(loaded.text, loaded.sets, cwd).await?;
    let id = record.id.clone();
    let mut changes = coordinator.subscribe(&id)?;
    let mut view = View::new(args.json, &record.status());
    let mut cancelled = false;
    loop {
        let s = coordinator.get(&id)?.status();
        view.show(&s);
        if is_final(&s.state) {
            view.finish(&s, Some(&data_dir.join("jobs").join(&id)));
            return Ok(exit_code(&s, cancelled));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() {
                return Err(CliError::Usage("the coordinator stopped".into()));
            },
            // SIGTERM (`kill`, `timeout`, a service manager) stops the run as Ctrl-C does.
            () = stop_signal(&mut int, &mut term) => {
                if cancelled {
                    // A second Ctrl-C: no more waiting for the gang to checkpoint.
                    view.note("interrupted again: killing the workers");
                    coordinator.kill_workers(&id)?;
                    return Ok(ExitCode::from(130));
                }
                cancelled = true;
                view.note("interrupted: the gang checkpoints and stops (Ctrl-C again to kill it now)");
                coordinator.cancel(&id)?;
            }
        }
    }
}

/// The next SIGINT or SIGTERM, from listeners made once (either may be missing where it
/// cannot be installed: then only the other stops the run).
async fn stop_signal(
    int: &mut Option<tokio::signal::unix::Signal>,
    term: &mut Option<tokio::signal::unix::Signal>,
) {
    tokio::select! {
        () = next_of(int) => {}
        () = next_of(term) => {}
    }
}

/// The next signal `s` listens for; never, without a listener.
async fn next_of(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// 0 for a job that succeeded, 130 for one this command interrupted, 1 otherwise.
pub(super) fn exit_code(s: &proto::JobStatus, interrupted: bool) -> ExitCode {
    match Phase::parse(&s.state) {
        Some(Phase::Succeeded | Phase::Exported) => ExitCode::SUCCESS,
        Some(Phase::Cancelled) if interrupted => ExitCode::from(130),
        _ => ExitCode::from(1),
    }
}
