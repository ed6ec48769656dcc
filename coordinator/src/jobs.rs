//! `lockstep run | serve | submit | status | watch | cancel`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::proto::{self, coordinator_client::CoordinatorClient};
use lockstep_coordinator::launcher::LocalProcess;
use lockstep_coordinator::{Coordinator, Settings};
use tonic::transport::Channel;

/// `lockstep run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job config (TOML).
    pub config: PathBuf,
    /// Override a config field: `--set train.steps=20` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// One JSON status object per line on stdout instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// Where worker logs and configs go (`DIR/jobs/JOB/attempt-N/rank-R.log`).
    #[arg(long, default_value = ".lockstep")]
    pub data_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics while the job runs.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// `lockstep serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Job store (`jobs.redb`), admin token (`admin.token`) and worker logs.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// How a client reaches a coordinator.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "LOCKSTEP_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// The admin token (default: read from DATA_DIR/admin.token, which `serve` writes).
    #[arg(long, env = "LOCKSTEP_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The coordinator's data dir, for its admin token.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".lockstep"),
        |h| PathBuf::from(h).join(".lockstep"),
    )
}

fn read_config(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))
}

async fn serve_grpc(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(proto::coordinator_server::CoordinatorServer::new(
            coordinator,
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

async fn start_metrics(addr: Option<SocketAddr>, c: &Coordinator) -> Result<()> {
    if let Some(addr) = addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}"))?;
        let c = c.clone();
        tokio::spawn(lockstep_coordinator::metrics::serve(l, move || {
            c.metrics_text()
        }));
        eprintln!("metrics at http://{addr}/metrics");
    }
    Ok(())
}

/// `lockstep run CONFIG`: a coordinator in this process, local workers, a progress bar.
pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let text = read_config(&args.config)?;
    // Validate before starting anything, naming the file.
    lockstep_api::JobConfig::parse(&text, &args.set)
        .with_context(|| format!("config {}", args.config.display()))?;
    let launcher = LocalProcess::discover()?;
    let cwd = std::env::current_dir().context("the working directory")?;
    let data_dir = cwd.join(&args.data_dir);
    let coordinator = Coordinator::new(
        Settings {
            data_dir: data_dir.clone(),
            admin_token: lockstep_coordinator::service::new_token(),
            persist: false,
        },
        Arc::new(launcher),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_grpc(coordinator.clone(), listener));
    coordinator.start(format!("http://{addr}"));
    start_metrics(args.metrics_addr, &coordinator).await?;
    let status = coordinator
        .submit(text, args.set, cwd)
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let id = status.job_id.clone();
    let mut changes = coordinator.subscribe(&id)?;
    let mut view = View::new(args.json, &status);
    let mut cancelled = false;
    loop {
        let s = coordinator.get(&id)?;
        view.show(&s);
        if is_final(&s.state) {
            view.finish(&s, &data_dir.join("jobs").join(&id));
            return Ok(exit_code(&s, cancelled));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { bail!("the coordinator stopped") },
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                view.note("interrupted: tearing the gang down");
                coordinator.cancel(&id)?;
            }
        }
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

fn exit_code(s: &proto::JobStatus, interrupted: bool) -> ExitCode {
    match s.state.as_str() {
        "succeeded" => ExitCode::SUCCESS,
        "cancelled" if interrupted => ExitCode::from(130),
        _ => ExitCode::from(1),
    }
}

/// `lockstep serve`: the coordinator service with a persistent job store.
pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let token = admin_token(&args.data_dir, true)?;
    let launcher = LocalProcess::discover()?;
    let coordinator = Coordinator::new(
        Settings {
            data_dir: args.data_dir.clone(),
            admin_token: token,
            persist: true,
        },
        Arc::new(launcher),
    )?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    coordinator.start(format!("http://{addr}"));
    start_metrics(args.metrics_addr, &coordinator).await?;
    eprintln!(
        "lockstep coordinator listening on http://{addr} (data dir {}, admin token in {})",
        args.data_dir.display(),
        args.data_dir.join("admin.token").display()
    );
    tokio::select! {
        r = serve_grpc(coordinator, listener) => r.context("gRPC server")?,
        _ = tokio::signal::ctrl_c() => eprintln!("stopping; running jobs resume when the coordinator restarts"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads `DIR/admin.token`, creating it (mode 0600) when `create`.
fn admin_token(dir: &Path, create: bool) -> Result<String> {
    let path = dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) => return Ok(t.trim().to_string()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound || !create => {
            return Err(e).with_context(|| {
                format!(
                    "read the admin token {} (pass --token or set LOCKSTEP_ADMIN_TOKEN)",
                    path.display()
                )
            });
        }
        Err(_) => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let token = lockstep_coordinator::service::new_token();
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(f, "{token}").with_context(|| format!("write {}", path.display()))?;
    Ok(token)
}

use proto::Client;

async fn client(args: &ClientArgs) -> Result<Client> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => admin_token(&args.data_dir, false)?,
    };
    let auth = proto::BearerToken::new(&token)
        .context("the admin token has characters a header cannot carry")?;
    let channel = Channel::from_shared(args.coordinator.clone())
        .with_context(|| format!("--coordinator {}", args.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", args.coordinator))?;
    Ok(CoordinatorClient::with_interceptor(channel, auth))
}

fn rpc_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// `lockstep submit CONFIG`: prints the job id.
pub async fn submit(
    config: &Path,
    set: Vec<String>,
    watch: bool,
    json: bool,
    args: &ClientArgs,
) -> Result<ExitCode> {
    let text = read_config(config)?;
    lockstep_api::JobConfig::parse(&text, &set)
        .with_context(|| format!("config {}", config.display()))?;
    let mut c = client(args).await?;
    let cwd = std::env::current_dir().context("the working directory")?;
    let s = c
        .submit(proto::SubmitRequest {
            config_toml: text,
            overrides: set,
            workdir: cwd.display().to_string(),
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    println!("{}", s.job_id);
    if watch {
        return watch_job(&s.job_id, json, args).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `lockstep status [JOB]`.
pub async fn status(job: Option<String>, json: bool, args: &ClientArgs) -> Result<ExitCode> {
    let mut c = client(args).await?;
    let jobs = match job {
        Some(id) => vec![
            c.get(proto::JobRef { job_id: id })
                .await
                .map_err(rpc_err)?
                .into_inner(),
        ],
        None => {
            c.list(proto::ListRequest {})
                .await
                .map_err(rpc_err)?
                .into_inner()
                .jobs
        }
    };
    if json {
        for j in &jobs {
            println!("{}", status_json(j));
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<11} {:>7} {:>13} {:>9} {:>8} {:>10}  MESSAGE",
        "JOB", "STATE", "ATTEMPT", "STEP", "LOSS", "RESTARTS", "CHECKPOINT"
    );
    for j in &jobs {
        println!(
            "{:<28} {:<11} {:>7} {:>13} {:>9} {:>8} {:>10}  {}",
            j.job_id,
            j.state,
            j.attempt,
            format!("{}/{}", j.step, j.total_steps),
            j.loss.map_or("-".into(), |l| format!("{l:.4}")),
            j.restarts,
            j.last_checkpoint.map_or("-".into(), |s| s.to_string()),
            j.message
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `lockstep watch JOB`.
pub async fn watch_job(id: &str, json: bool, args: &ClientArgs) -> Result<ExitCode> {
    let mut c = client(args).await?;
    let mut stream = c
        .watch(proto::JobRef { job_id: id.into() })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let mut view: Option<View> = None;
    while let Some(s) = stream.message().await.map_err(rpc_err)? {
        let v = view.get_or_insert_with(|| View::new(json, &s));
        v.show(&s);
        if is_final(&s.state) {
            v.finish(&s, &args.data_dir.join("jobs").join(id));
            return Ok(exit_code(&s, false));
        }
    }
    bail!("the coordinator closed the watch before job {id} ended")
}

/// `lockstep cancel JOB`.
pub async fn cancel(id: &str, args: &ClientArgs) -> Result<ExitCode> {
    let mut c = client(args).await?;
    let s = c
        .cancel(proto::JobRef { job_id: id.into() })
        .await
        .map_err(rpc_err)?
        .into_inner();
    eprintln!("cancelling {} (was {})", s.job_id, s.state);
    Ok(ExitCode::SUCCESS)
}

/// A job status as JSON.
pub fn status_json(s: &proto::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job": s.job_id, "name": s.name, "state": s.state, "attempt": s.attempt,
        "restarts": s.restarts, "world_size": s.world_size, "step": s.step,
        "total_steps": s.total_steps, "loss": s.loss, "first_loss": s.first_loss,
        "tokens_per_sec": s.tokens_per_sec, "last_checkpoint": s.last_checkpoint,
        "message": s.message, "params_hash": s.params_hash, "checkpoint_url": s.checkpoint_url,
        "gang_wait_seconds": s.gang_wait_seconds,
    })
}

/// Progress of a job: a bar on a terminal, log lines otherwise, JSON lines with --json.
struct View {
    json: bool,
    bar: Option<ProgressBar>,
    last_line: String,
    last_state: String,
    last_restarts: u32,
}

impl View {
    fn new(json: bool, s: &proto::JobStatus) -> View {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(s.total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} (ETA {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(s.job_id.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        View {
            json,
            bar,
            last_line: String::new(),
            last_state: String::new(),
            last_restarts: 0,
        }
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None if !self.json => eprintln!("{line}"),
            None => {}
        }
    }

    fn show(&mut self, s: &proto::JobStatus) {
        if self.json {
            let line = status_json(s).to_string();
            if line != self.last_line {
                println!("{line}");
                self.last_line = line;
            }
            return;
        }
        if s.state != self.last_state || s.restarts != self.last_restarts {
            let mut line = format!("{}: {} (attempt {})", s.job_id, s.state, s.attempt);
            if !s.message.is_empty() {
                line.push_str(&format!(": {}", s.message));
            }
            self.note(&line);
            self.last_state = s.state.clone();
            self.last_restarts = s.restarts;
        }
        let msg = format!(
            "loss {} | {:.0} tok/s | restarts {} | ckpt {}",
            s.loss.map_or("-".into(), |l| format!("{l:.4}")),
            s.tokens_per_sec,
            s.restarts,
            s.last_checkpoint.map_or("-".into(), |c| c.to_string())
        );
        match &self.bar {
            Some(b) => {
                b.set_position(s.step);
                b.set_message(msg);
            }
            None => {
                // A line every tenth of the run.
                let tenth = (s.total_steps / 10).max(1);
                let line = format!("step {}/{} {msg}", s.step, s.total_steps);
                if s.step.is_multiple_of(tenth) && s.step > 0 && line != self.last_line {
                    eprintln!("{line}");
                    self.last_line = line;
                }
            }
        }
    }

    fn finish(&self, s: &proto::JobStatus, logs: &Path) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.json {
            return;
        }
        let loss = match (s.first_loss, s.loss) {
            (Some(a), Some(b)) => format!("loss {a:.3} -> {b:.3}"),
            _ => "no steps run".into(),
        };
        eprintln!(
            "{}: {} at step {}/{}; {loss}; {} restart{}; last checkpoint {} at {}{}",
            s.job_id,
            s.state,
            s.step,
            s.total_steps,
            s.restarts,
            if s.restarts == 1 { "" } else { "s" },
            s.last_checkpoint.map_or("none".into(), |c| c.to_string()),
            s.checkpoint_url,
            if s.params_hash.is_empty() {
                String::new()
            } else {
                format!("; params xxh3 {}", s.params_hash)
            }
        );
        if !s.message.is_empty() {
            eprintln!("  {}", s.message);
        }
        eprintln!("  worker logs: {}", logs.display());
    }
}
