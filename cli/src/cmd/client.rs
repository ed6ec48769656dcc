//! The calls to a running coordinator: `lockstep submit`, `status`, `watch`, `cancel`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use lockstep_api::proto::{self, Client, coordinator_client::CoordinatorClient};
use tonic::transport::Channel;

use super::kube::KubeJobArgs;
use super::run::exit_code;
use super::serve::{admin_token, default_data_dir};
use super::view::{View, is_final, status_json};
use super::{CliError, Result, current_dir, error_chain, load_for_workers};

/// How a client reaches a coordinator.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "LOCKSTEP_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// The admin token (default: read from DATA_DIR/admin.token, which `serve` writes).
    #[arg(long, env = "LOCKSTEP_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The coordinator's data dir, for its admin token.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// The CA certificate (PEM) that signed an https:// coordinator's certificate (default:
    /// the system's roots).
    #[arg(long, env = "LOCKSTEP_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Allow an http:// coordinator on another machine (the admin token then crosses the
    /// network in clear; only on a trusted network).
    #[arg(long)]
    insecure_plaintext: bool,
}

/// Submit a job to a running coordinator; prints its id. With --kubernetes, create it as a
/// LockstepJob in the current kubeconfig context instead (the in-cluster coordinator runs it);
/// one that already exists under its name is left alone, so a CronJob that runs twice the same
/// night submits once.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job config (TOML).
    config: PathBuf,
    /// Create a LockstepJob on Kubernetes (the settings below) instead of calling a
    /// coordinator.
    #[arg(long)]
    kubernetes: bool,
    #[command(flatten)]
    kube: KubeJobArgs,
    /// Watch it until it ends.
    #[arg(long)]
    watch: bool,
    /// JSON lines instead of a progress bar (with --watch).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Show one job, or every job.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job id (default: all jobs).
    job: Option<String>,
    /// One JSON object per job.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Follow a job until it ends (progress bar, then a summary); exit status as `run`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job id.
    job: String,
    /// JSON lines instead of a progress bar.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Cancel a job: its workers are killed and it ends Cancelled.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    job: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// A gRPC client of the coordinator at `--coordinator`, with the admin token.
async fn client(args: &ClientArgs) -> Result<Client> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let dir = args.data_dir.clone();
            tokio::task::spawn_blocking(move || admin_token(&dir, false)).await??
        }
    };
    let auth = proto::BearerToken::new(&token).ok_or_else(|| {
        CliError::Usage("the admin token has characters a header cannot carry".into())
    })?;
    let connect = |reason: String| CliError::Connect {
        url: args.coordinator.clone(),
        reason,
    };
    let url = args.coordinator.clone();
    let lower = url.to_ascii_lowercase();
    let https = lower.starts_with("https://");
    if !https {
        // The admin token travels in every call: in clear only to this machine.
        let host = lower
            .strip_prefix("http://")
            .unwrap_or(&lower)
            .split(['/', '?'])
            .next()
            .unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback && !args.insecure_plaintext {
            return Err(CliError::Usage(format!(
                "--coordinator {url}: plain http to another machine would send the admin token \
                 in clear; use https:// (the coordinator serves TLS with --tls-cert), or pass \
                 --insecure-plaintext on a trusted network"
            )));
        }
    }
    let mut endpoint = Channel::from_shared(url.clone())
        .map_err(|e| connect(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    if https {
        let tls = tonic::transport::ClientTlsConfig::new();
        let tls = match args.tls_ca.clone() {
            Some(path) => {
                let shown = path.display().to_string();
                let pem =
                    tokio::task::spawn_blocking(move || super::read_small("read --tls-ca", &path))
                        .await??;
                // A key or any other file would only fail later as "UnknownIssuer".
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(CliError::Usage(format!(
                        "--tls-ca {shown}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)"
                    )));
                }
                tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| connect(error_chain(&e)))?;
    } else if args.tls_ca.is_some() {
        tracing::warn!("--tls-ca (LOCKSTEP_TLS_CA) is ignored: {url} is not https://");
    }
    // A TLS handshake that never finishes is not allowed to hang the command either.
    let channel = match tokio::time::timeout(Duration::from_secs(30), endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let hint = if https {
                ""
            } else {
                " (if the coordinator serves TLS, use https://)"
            };
            return Err(connect(format!("{}{hint}", error_chain(&e))));
        }
        Err(_) => return Err(connect("no connection within 30 s".into())),
    };
    Ok(CoordinatorClient::with_interceptor(channel, auth))
}

/// `lockstep submit CONFIG`: prints the job id; with `--watch`, follows it. With
/// `--kubernetes`, creates the LockstepJob instead. Exit status 0 submitted (or, with
/// `--watch`, as `run`), 1 failed, 2 for arguments that cannot work together.
pub fn run_submit(args: SubmitArgs) -> ExitCode {
    if args.kubernetes && args.watch {
        eprintln!(
            "error: --watch: with --kubernetes, watch with `kubectl get lsj NAME -w` (or \
             `lockstep watch JOB` through a port-forward to the coordinator)"
        );
        return ExitCode::from(2);
    }
    super::block_on(1, submit(args))
}

async fn submit(args: SubmitArgs) -> Result {
    if args.kubernetes {
        return super::kube::submit(&args.kube, &args.config).await;
    }
    let (set, date) = (args.kube.set, args.kube.date);
    let loaded = load_for_workers(&args.config, &set, date.as_deref())?;
    let mut c = client(&args.client).await?;
    let cwd = current_dir()?;
    let s = c
        .submit(proto::SubmitRequest {
            config_toml: loaded.text,
            overrides: loaded.sets,
            workdir: cwd.display().to_string(),
        })
        .await?
        .into_inner();
    println!("{}", s.job_id);
    if args.watch {
        return watch_job(&s.job_id, args.json, &args.client).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `lockstep status [JOB]`.
pub async fn status(args: StatusArgs) -> Result {
    let StatusArgs {
        job,
        json,
        client: args,
    } = args;
    let mut c = client(&args).await?;
    let jobs = match job {
        Some(id) => vec![c.get(proto::JobRef { job_id: id }).await?.into_inner()],
        None => {
            let mut jobs = Vec::new();
            let mut token = String::new();
            loop {
                let page = c
                    .list(proto::ListRequest {
                        page_size: 500,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                jobs.extend(page.jobs);
                if page.next_page_token.is_empty() {
                    break jobs;
                }
                token = page.next_page_token;
            }
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

/// `lockstep watch JOB`: exit status as `run`.
pub async fn watch(args: WatchArgs) -> Result {
    watch_job(&args.job, args.json, &args.client).await
}

async fn watch_job(id: &str, json: bool, args: &ClientArgs) -> Result {
    let mut c = client(args).await?;
    let mut stream = c
        .watch(proto::JobRef { job_id: id.into() })
        .await?
        .into_inner();
    let mut view: Option<View> = None;
    while let Some(s) = stream.message().await? {
        let v = view.get_or_insert_with(|| View::new(json, &s));
        v.show(&s);
        if is_final(&s.state) {
            v.finish(&s, None);
            return Ok(exit_code(&s, false));
        }
    }
    Err(CliError::Rpc(format!(
        "the coordinator closed the watch before job {id} ended"
    )))
}

/// `lockstep cancel JOB`.
pub async fn cancel(args: CancelArgs) -> Result {
    let (id, mut c) = (args.job, client(&args.client).await?);
    let s = c.cancel(proto::JobRef { job_id: id }).await?.into_inner();
    eprintln!("cancelling {} (was {})", s.job_id, s.state);
    Ok(ExitCode::SUCCESS)
}
