//! `lockstep run | serve | submit | status | watch | cancel`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lockstep_api::proto::{self, Client, coordinator_client::CoordinatorClient};
use tonic::transport::Channel;

use super::view::{View, is_final, status_json};
use super::{CliError, Result};
use crate::auth::new_token;
use crate::launcher::LocalProcess;
use crate::{Coordinator, Settings};

/// `lockstep run`.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// The job config (TOML).
    pub config: PathBuf,
    /// `section.key=value` overrides.
    pub set: Vec<String>,
    /// JSON status lines on stdout instead of a progress bar.
    pub json: bool,
    /// Worker logs and configs go under `DATA_DIR/jobs/JOB/`.
    pub data_dir: PathBuf,
    /// Serve Prometheus metrics here while the job runs.
    pub metrics_addr: Option<SocketAddr>,
    /// `{date}` in the config (default: today, UTC).
    pub date: Option<String>,
}

/// `lockstep serve`.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Job store, admin token and worker logs.
    pub data_dir: PathBuf,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// Serve gRPC over TLS: the certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Allow a non-loopback `listen` without TLS.
    pub insecure_plaintext: bool,
}

/// How a client reaches a coordinator.
#[derive(Debug, Clone)]
pub struct ClientArgs {
    /// The coordinator's URL.
    pub coordinator: String,
    /// The admin token (default: read from `DATA_DIR/admin.token`).
    pub token: Option<String>,
    /// The coordinator's data dir, for its admin token and worker logs.
    pub data_dir: PathBuf,
    /// The CA certificate (PEM) of an `https://` coordinator; `None`: the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// Allow `http://` to another machine (the token then crosses the network in clear).
    pub insecure_plaintext: bool,
}

/// `~/.lockstep`, or `.lockstep` without a home.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".lockstep"),
        |h| PathBuf::from(h).join(".lockstep"),
    )
}

/// Reads and validates a config file, `{date}` replaced by `date` (default: today, UTC)
/// (blocking: called before any job starts).
pub(crate) fn read_config(path: &Path, set: &[String], date: Option<&str>) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        op: "read config",
        path: path.to_path_buf(),
        source,
    })?;
    let date = match date {
        Some(d) => {
            lockstep_api::date::check(d).map_err(CliError::Usage)?;
            d.to_string()
        }
        None => lockstep_api::date::today(),
    };
    let text = lockstep_api::date::apply(&text, &date);
    let config = lockstep_api::JobConfig::parse(&text, set).map_err(|source| CliError::Config {
        file: path.to_path_buf(),
        source,
    })?;
    // Workers are other processes: an in-memory store of one is invisible to the others.
    if config.checkpoint.url.starts_with("memory:") {
        return Err(CliError::Usage(format!(
            "config {}: checkpoint.url `{}` lives in one process's memory, and a job's workers \
             are separate processes; use a file:// or s3:// URL",
            path.display(),
            config.checkpoint.url
        )));
    }
    Ok(text)
}

fn current_dir() -> Result<PathBuf> {
    std::env::current_dir().map_err(|source| CliError::Io {
        op: "find",
        path: PathBuf::from("the working directory"),
        source,
    })
}

pub(crate) async fn serve_grpc(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> std::result::Result<(), tonic::transport::Error> {
    use crate::listen::{MAX_CONNECTIONS, incoming};
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        // Dead peers are found by HTTP/2 PINGs; one connection cannot hog the server.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .concurrency_limit_per_connection(64)
        // Every call is authenticated before its body is decoded.
        .add_service(
            proto::coordinator_server::CoordinatorServer::with_interceptor(
                coordinator.clone(),
                coordinator.interceptor(),
            ),
        )
        .serve_with_incoming(incoming(listener, MAX_CONNECTIONS))
        .await
}

pub(crate) async fn bind(flag: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CliError::Listen { flag, addr, source })
}

async fn start_metrics(addr: Option<SocketAddr>, c: &Coordinator) -> Result<()> {
    if let Some(addr) = addr {
        let l = bind("--metrics-addr", addr).await?;
        let c = c.clone();
        tokio::spawn(crate::metrics::serve(
            l,
            move || c.metrics_text(),
            || Ok(()),
        ));
        eprintln!("metrics at http://{addr}/metrics");
    }
    Ok(())
}

/// The address a listener got (the port of `:0`).
fn local_addr(
    flag: &'static str,
    l: &tokio::net::TcpListener,
    asked: SocketAddr,
) -> Result<SocketAddr> {
    l.local_addr().map_err(|source| CliError::Listen {
        flag,
        addr: asked,
        source,
    })
}

/// `lockstep run CONFIG`: a coordinator in this process, local workers (this executable as
/// `lockstep train`), a progress bar. Exit status 0 succeeded, 1 failed, 130 interrupted.
pub async fn run(args: RunArgs) -> Result {
    // Validate before starting anything, naming the file.
    let text = read_config(&args.config, &args.set, args.date.as_deref())?;
    let launcher = LocalProcess::current_exe().map_err(crate::Error::from)?;
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
    let record = coordinator.submit(text, args.set, cwd).await?;
    let id = record.id.clone();
    let mut changes = coordinator.subscribe(&id)?;
    let mut view = View::new(args.json, &record.status());
    let mut cancelled = false;
    loop {
        let s = coordinator.get(&id)?.status();
        view.show(&s);
        if is_final(&s.state) {
            view.finish(&s, &data_dir.join("jobs").join(&id));
            return Ok(exit_code(&s, cancelled));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() {
                return Err(CliError::Usage("the coordinator stopped".into()));
            },
            _ = tokio::signal::ctrl_c() => {
                if cancelled {
                    // A second Ctrl-C: no more waiting for the gang to checkpoint.
                    view.note("interrupted again: killing the workers");
                    coordinator.kill_workers(&id)?;
                    return Ok(std::process::ExitCode::from(130));
                }
                cancelled = true;
                view.note("interrupted: the gang checkpoints and stops (Ctrl-C again to kill it now)");
                coordinator.cancel(&id)?;
            }
        }
    }
}

fn exit_code(s: &proto::JobStatus, interrupted: bool) -> ExitCode {
    match s.state.as_str() {
        "succeeded" | "exported" => ExitCode::SUCCESS,
        "cancelled" if interrupted => ExitCode::from(130),
        _ => ExitCode::from(1),
    }
}

/// `lockstep serve`: the coordinator service with a persistent job store.
pub async fn serve(mut args: ServeArgs) -> Result {
    // Workers run in their job's directory: every path handed to them must be absolute.
    args.data_dir = current_dir()?.join(&args.data_dir);
    let tls = match args.tls.clone() {
        Some((cert, key)) => Some(
            tokio::task::spawn_blocking(move || server_tls(&cert, &key))
                .await
                .map_err(crate::Error::from)??,
        ),
        None if !args.listen.ip().is_loopback() && !args.insecure_plaintext => {
            return Err(CliError::Usage(format!(
                "--listen {}: not a loopback address, and without TLS every token would cross \
                 the network in clear; give --tls-cert and --tls-key (or, behind a \
                 TLS-terminating proxy, --insecure-plaintext)",
                args.listen
            )));
        }
        None => None,
    };
    let dir = args.data_dir.clone();
    let token = tokio::task::spawn_blocking(move || admin_token(&dir, true))
        .await
        .map_err(crate::Error::from)??;
    let launcher = LocalProcess::current_exe().map_err(crate::Error::from)?;
    let coordinator = Coordinator::open(
        Settings {
            data_dir: args.data_dir.clone(),
            admin_token: token,
            persist: true,
        },
        Arc::new(launcher),
    )
    .await?;
    let listener = bind("--listen", args.listen).await?;
    let addr = local_addr("--listen", &listener, args.listen)?;
    // With TLS, this machine's workers reach the coordinator on a loopback listener of their
    // own (they hold their job's token, never the admin's); without, on the one listener.
    let workers = match &tls {
        Some(_) => {
            let asked: SocketAddr = ([127, 0, 0, 1], 0).into();
            let l = bind("the workers' loopback address", asked).await?;
            let a = local_addr("the workers' loopback address", &l, asked)?;
            Some((l, a))
        }
        None => None,
    };
    let worker_addr = workers.as_ref().map_or(addr, |(_, a)| *a);
    coordinator.start(format!("http://{worker_addr}")).await?;
    start_metrics(args.metrics_addr, &coordinator).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!(
        "lockstep coordinator listening on {scheme}://{addr} (data dir {}, admin token in {})",
        args.data_dir.display(),
        args.data_dir.join("admin.token").display()
    );
    let for_workers = async {
        match workers {
            Some((l, _)) => serve_grpc(coordinator.clone(), l, None).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = serve_grpc(coordinator.clone(), listener, tls) => r?,
        r = for_workers => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopping; running jobs resume when the coordinator restarts");
        }
    }
    coordinator.flush().await?;
    Ok(ExitCode::SUCCESS)
}

/// The TLS identity in `cert` and `key` (PEM), checked now so a bad file is named before
/// anything starts. Blocking.
fn server_tls(cert: &Path, key: &Path) -> Result<tonic::transport::ServerTlsConfig> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|source| CliError::Io {
            op: if flag == "--tls-cert" {
                "read --tls-cert"
            } else {
                "read --tls-key"
            },
            path: path.to_path_buf(),
            source,
        })
    };
    let (c, k) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
    // A client has 10 s to finish its TLS handshake: a stalled one cannot hold a connection.
    let config = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(c, k))
        .timeout(Duration::from_secs(10));
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            CliError::Usage(format!(
                "--tls-cert {} / --tls-key {}: not a usable certificate and key: {}",
                cert.display(),
                key.display(),
                error_chain(&e)
            ))
        })?;
    Ok(config)
}

/// `e` and its sources, joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // Some errors already print their source.
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Reads `DIR/admin.token`, creating it (mode 0600) when `create`. Blocking.
fn admin_token(dir: &Path, create: bool) -> Result<String> {
    let path = dir.join("admin.token");
    let io = |op, source| CliError::Io {
        op,
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= crate::auth::MIN_TOKEN_LEN => return Ok(t.trim().to_string()),
        Ok(t) => {
            return Err(CliError::Usage(format!(
                "the admin token in {} is {} characters long, shorter than the {} required (a \
                 crash while it was being written can leave it empty): delete the file and \
                 restart `lockstep serve` to create a new one",
                path.display(),
                t.trim().len(),
                crate::auth::MIN_TOKEN_LEN
            )));
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound || !create => {
            return Err(io(
                "read the admin token (pass --token or set LOCKSTEP_ADMIN_TOKEN)",
                e,
            ));
        }
        Err(_) => {}
    }
    let token = new_token();
    // Atomic: a crash leaves no file or the whole token, never an empty one.
    crate::private::write(&path, format!("{token}\n").as_bytes()).map_err(|e| io("write", e))?;
    Ok(token)
}

async fn client(args: &ClientArgs) -> Result<Client> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let dir = args.data_dir.clone();
            tokio::task::spawn_blocking(move || admin_token(&dir, false))
                .await
                .map_err(crate::Error::from)??
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
                let pem = tokio::task::spawn_blocking(move || {
                    std::fs::read(&path).map_err(|source| CliError::Io {
                        op: "read --tls-ca",
                        path,
                        source,
                    })
                })
                .await
                .map_err(crate::Error::from)??;
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

/// `lockstep submit CONFIG`: prints the job id; with `watch`, follows it.
pub async fn submit(
    config: &Path,
    set: Vec<String>,
    date: Option<&str>,
    watch: bool,
    json: bool,
    args: &ClientArgs,
) -> Result {
    let text = read_config(config, &set, date)?;
    let mut c = client(args).await?;
    let cwd = current_dir()?;
    let s = c
        .submit(proto::SubmitRequest {
            config_toml: text,
            overrides: set,
            workdir: cwd.display().to_string(),
        })
        .await?
        .into_inner();
    println!("{}", s.job_id);
    if watch {
        return watch_job(&s.job_id, json, args).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `lockstep status [JOB]`.
pub async fn status(job: Option<String>, json: bool, args: &ClientArgs) -> Result {
    let mut c = client(args).await?;
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
pub async fn watch_job(id: &str, json: bool, args: &ClientArgs) -> Result {
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
            v.finish(&s, &args.data_dir.join("jobs").join(id));
            return Ok(exit_code(&s, false));
        }
    }
    Err(CliError::Rpc(format!(
        "the coordinator closed the watch before job {id} ended"
    )))
}

/// `lockstep cancel JOB`.
pub async fn cancel(id: &str, args: &ClientArgs) -> Result {
    let mut c = client(args).await?;
    let s = c
        .cancel(proto::JobRef { job_id: id.into() })
        .await?
        .into_inner();
    eprintln!("cancelling {} (was {})", s.job_id, s.state);
    Ok(ExitCode::SUCCESS)
}
