//! `lockstep serve`: the coordinator service, with workers as local processes (jobs kept in
//! `DATA_DIR/jobs.redb`) or as Kubernetes pods (the LockstepJob controller; their status is
//! the job store).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use lockstep_api::proto;
use lockstep_coordinator::auth::{MIN_TOKEN_LEN, new_token};
use lockstep_coordinator::k8s::crd::LockstepJob;
use lockstep_coordinator::k8s::{Controller, ControllerSettings, KubeLauncher};
use lockstep_coordinator::launcher::LocalProcess;
use lockstep_coordinator::{Coordinator, Settings};

use super::kube::{GangFlavor, kube_client};
use super::{CliError, Result, current_dir, error_chain};

/// Run the coordinator service: jobs are submitted to it (`lockstep submit`) and kept in
/// DATA_DIR/jobs.redb, so a restarted coordinator resumes every live job.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where workers run: on this machine, or as pods (in a cluster: the LockstepJob
    /// controller).
    #[arg(long, value_enum, default_value_t = LauncherKind::Local)]
    launcher: LauncherKind,
    /// The namespace whose LockstepJobs the controller runs (--launcher kubernetes; default:
    /// the in-cluster or kubeconfig namespace).
    #[arg(long, env = "LOCKSTEP_NAMESPACE")]
    namespace: Option<String>,
    /// The gRPC URL trainer pods reach this coordinator at (--launcher kubernetes; default:
    /// http://lockstep-coordinator.NAMESPACE.svc:PORT, the Service in jobsets/).
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// How gangs are made (--launcher kubernetes; default: JobSet where its CRD is served,
    /// else Indexed Job).
    #[arg(long, value_enum)]
    flavor: Option<GangFlavor>,
    /// Whether a lost pod of a `job.recovery = "in-place"` job is replaced by one new pod
    /// while the others keep running and keep their state (--launcher kubernetes). It needs
    /// Jobs that fail one index alone (`backoffLimitPerIndex`): `auto` turns it on where the
    /// API server is 1.29 or newer; `off`: a lost pod restarts the whole gang from its
    /// checkpoint.
    #[arg(long, value_enum, default_value_t = PodReplacement::Auto)]
    pod_replacement: PodReplacement,
    /// gRPC address to listen on: IP:PORT, or localhost:PORT.
    #[arg(long, default_value = "127.0.0.1:7070", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Job store (`jobs.redb`), admin token (`admin.token`) and worker logs.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics, and the probes /healthz and /readyz
    /// (required with --launcher kubernetes).
    #[arg(long, value_name = "ADDR", required_if_eq("launcher", "kubernetes"))]
    metrics_addr: Option<SocketAddr>,
    /// Serve gRPC over TLS with this certificate chain (PEM; with --tls-key). Clients then use
    /// https:// and --tls-ca. Local workers reach the coordinator over a loopback-only
    /// listener of their own.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow --listen on an address other than loopback without TLS (tokens would cross the
    /// network in clear; only behind a TLS-terminating proxy or on a trusted network).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_plaintext: bool,
}

/// `--pod-replacement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PodReplacement {
    /// On where the API server is Kubernetes 1.29 or newer.
    Auto,
    /// On (the API server serves `backoffLimitPerIndex`, e.g. 1.28 with its feature gate).
    On,
    /// Off: a lost pod restarts the gang.
    Off,
}

/// Where a coordinator's workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LauncherKind {
    /// Workers are processes of this machine; jobs are kept in DATA_DIR/jobs.redb.
    Local,
    /// Workers are pods: the coordinator is the controller of the namespace's LockstepJobs,
    /// whose status is the job store.
    Kubernetes,
}

/// `~/.lockstep`, or `.lockstep` without a home.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".lockstep"),
        |h| PathBuf::from(h).join(".lockstep"),
    )
}

/// Serves until SIGINT (and, on Kubernetes, SIGTERM). Exit status 0 when stopped by a
/// signal; 2 for arguments that cannot work together.
pub fn run(args: ServeArgs) -> ExitCode {
    match args.launcher {
        LauncherKind::Kubernetes if args.tls_cert.is_some() => {
            eprintln!(
                "error: --tls-cert: with --launcher kubernetes the coordinator serves plain \
                 gRPC inside the cluster (its NetworkPolicy admits only lockstep pods); \
                 terminate TLS in front of it for clients outside"
            );
            ExitCode::from(2)
        }
        LauncherKind::Kubernetes => super::block_on(1, serve_kubernetes(args)),
        LauncherKind::Local => super::block_on(1, serve_local(args)),
    }
}

/// The coordinator service with local workers and a persistent job store.
async fn serve_local(mut args: ServeArgs) -> Result {
    // Workers run in their job's directory: every path handed to them must be absolute.
    args.data_dir = current_dir()?.join(&args.data_dir);
    let tls = match args.tls_cert.clone().zip(args.tls_key.clone()) {
        Some((cert, key)) => {
            Some(tokio::task::spawn_blocking(move || server_tls(&cert, &key)).await??)
        }
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
    let token = tokio::task::spawn_blocking(move || admin_token(&dir, true)).await??;
    let launcher = LocalProcess::current_exe().map_err(lockstep_coordinator::Error::from)?;
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

/// The coordinator as the LockstepJob controller of one namespace, until SIGINT/SIGTERM.
async fn serve_kubernetes(args: ServeArgs) -> Result {
    // clap requires it with --launcher kubernetes.
    let http_addr = args
        .metrics_addr
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9090)));
    let client = kube_client().await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let advertise_url = args.advertise_url.clone().unwrap_or_else(|| {
        format!(
            "http://lockstep-coordinator.{ns}.svc:{}",
            args.listen.port()
        )
    });
    let token = admin_secret(&client, &ns).await?;
    let flavor = match args.flavor {
        Some(f) => f.into_lib(),
        None => KubeLauncher::detect_flavor(&client).await,
    };
    let replace_pods = match args.pod_replacement {
        PodReplacement::Auto => KubeLauncher::serves_pod_replacement(&client).await,
        PodReplacement::On => true,
        PodReplacement::Off => false,
    };
    let launcher = KubeLauncher::replacing_pods(client.clone(), flavor, replace_pods);
    let coordinator = Coordinator::open(
        Settings {
            // Scratch only: worker logs stay in the pods; nothing durable lives here.
            data_dir: current_dir()?.join(&args.data_dir),
            admin_token: token,
            // The LockstepJobs' status is the job store.
            persist: false,
        },
        launcher.clone(),
    )
    .await?;
    let listener = bind("--listen", args.listen).await?;
    coordinator.start(advertise_url.clone()).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let http = bind("--metrics-addr", http_addr).await?;
    {
        let (c, r) = (coordinator.clone(), ready.clone());
        tokio::spawn(lockstep_coordinator::metrics::serve(
            http,
            move || c.metrics_text(),
            move || {
                if r.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("the LockstepJob controller has not listed its jobs yet".into())
                }
            },
        ));
    }
    // Ready once the API server answers a list of LockstepJobs (the CRD is installed and the
    // RBAC allows it).
    let lsjs: Api<LockstepJob> = Api::namespaced(client.clone(), &ns);
    lsjs.list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| {
            CliError::Rpc(format!(
                "list LockstepJobs in namespace {ns}: {e} (is the CRD installed — `lockstep crd | \
                 kubectl apply -f -` — and may this ServiceAccount list them?)"
            ))
        })?;
    ready.store(true, Ordering::Relaxed);
    eprintln!(
        "lockstep coordinator: LockstepJob controller of namespace {ns} ({flavor:?} gangs; {}); \
         gRPC on {} (workers reach it at {}); metrics and probes on http://{}",
        if replace_pods {
            "a lost pod of an in-place job is replaced alone"
        } else {
            "a lost pod restarts its gang"
        },
        args.listen,
        advertise_url,
        http_addr
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = Controller::new(
        client,
        coordinator.clone(),
        launcher,
        ControllerSettings { namespace: ns },
    );
    let controller = tokio::spawn(controller.run(async move {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        r = serve_grpc(coordinator.clone(), listener, None) => r?,
        _ = shutdown_signal() => {
            eprintln!("stopping; the LockstepJobs' gangs are adopted by the next coordinator");
        }
    }
    let _ = stop_tx.send(());
    let _ = controller.await;
    Ok(ExitCode::SUCCESS)
}

/// Serves the coordinator's gRPC API on `listener` (TLS when `tls`), until it fails.
pub(super) async fn serve_grpc(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> std::result::Result<(), tonic::transport::Error> {
    use lockstep_coordinator::listen::{MAX_CONNECTIONS, incoming};
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        // Dead peers are found by HTTP/2 PINGs; one connection cannot hog the server.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
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

/// Binds `addr`; an error names the flag that gave it.
pub(super) async fn bind(flag: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CliError::Listen { flag, addr, source })
}

/// Serves `/metrics` (and always-ready probes) at `addr`, when given.
pub(super) async fn start_metrics(addr: Option<SocketAddr>, c: &Coordinator) -> Result<()> {
    if let Some(addr) = addr {
        let l = bind("--metrics-addr", addr).await?;
        let c = c.clone();
        tokio::spawn(lockstep_coordinator::metrics::serve(
            l,
            move || c.metrics_text(),
            || Ok(()),
        ));
        eprintln!("metrics at http://{addr}/metrics");
    }
    Ok(())
}

/// The address a listener got (the port of `:0`).
pub(super) fn local_addr(
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

/// The TLS identity in `cert` and `key` (PEM), checked now so a bad file is named before
/// anything starts. Blocking.
fn server_tls(cert: &Path, key: &Path) -> Result<tonic::transport::ServerTlsConfig> {
    let (c, k) = (
        super::read_small("read --tls-cert", cert)?,
        super::read_small("read --tls-key", key)?,
    );
    check_end_entity(cert, &c)?;
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

/// Refuses a CA certificate as the server's own (the first of the chain): rustls clients
/// reject it (`CaUsedAsEndEntity`) on every connection, which would surface only there.
fn check_end_entity(path: &Path, pem: &[u8]) -> Result<()> {
    let Ok((_, first)) = x509_parser::pem::parse_x509_pem(pem) else {
        // Not PEM: the identity check that follows names the file.
        return Ok(());
    };
    let Ok(cert) = first.parse_x509() else {
        return Ok(());
    };
    if cert.is_ca() {
        return Err(CliError::Usage(format!(
            "--tls-cert {}: its first certificate ({}) is a CA certificate (basicConstraints \
             CA:TRUE), which clients refuse as a server's; give the server's own certificate, \
             signed by that CA, as --tls-cert (followed by any intermediates), and the CA to \
             clients as --tls-ca",
            path.display(),
            cert.subject()
        )));
    }
    Ok(())
}

/// `--listen`: an IP address and port, or `localhost:PORT` (the loopback address).
fn parse_listen(s: &str) -> std::result::Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: the port must be a number 0-65535"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|e| {
        format!("`{s}`: {e} (expected IP:PORT such as 127.0.0.1:7070 or 0.0.0.0:7070, or localhost:PORT)")
    })
}

/// Reads `DIR/admin.token`, creating it (mode 0600) when `create`. Blocking.
pub(super) fn admin_token(dir: &Path, create: bool) -> Result<String> {
    let path = dir.join("admin.token");
    let io = |op, source| CliError::Io {
        op,
        path: path.clone(),
        source,
    };
    // The coordinator's own token file must be its own: a plain file no one else can read
    // (a token others may have read is not kept).
    if create && let Ok(m) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = m.permissions().mode() & 0o777;
        // Owned by whoever owns the data dir (this coordinator's user), not planted by another.
        let foreign = std::fs::metadata(dir).is_ok_and(|d| d.uid() != m.uid());
        if !m.file_type().is_file() || mode & 0o077 != 0 || foreign {
            return Err(CliError::Usage(format!(
                "{}: {} (mode {mode:o}); others may have read the admin token: delete it and \
                 restart `lockstep serve` to make a new one (mode 600)",
                path.display(),
                if !m.file_type().is_file() {
                    "not a plain file"
                } else if foreign {
                    "owned by another user than the data directory"
                } else {
                    "readable by others"
                }
            )));
        }
    }
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= MIN_TOKEN_LEN => return Ok(t.trim().to_string()),
        Ok(t) => {
            return Err(CliError::Usage(format!(
                "the admin token in {} is {} characters long, shorter than the {} required (a \
                 crash while it was being written can leave it empty): delete the file and \
                 restart `lockstep serve` to create a new one",
                path.display(),
                t.trim().len(),
                MIN_TOKEN_LEN
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
    lockstep_coordinator::private::write(&path, format!("{token}\n").as_bytes())
        .map_err(|e| io("write", e))?;
    Ok(token)
}

/// Name of the Secret holding a Kubernetes coordinator's admin token (`lockstep status`/`watch`
/// through a port-forward read it).
pub const ADMIN_SECRET: &str = "lockstep-admin";

/// The admin token kept in Secret `lockstep-admin` (made on first start), so it survives the
/// coordinator pod.
async fn admin_secret(client: &Client, ns: &str) -> Result<String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let read = |s: &Secret| -> Option<String> {
        let b = s.data.as_ref()?.get("token")?;
        String::from_utf8(b.0.clone())
            .ok()
            .filter(|t| t.len() >= MIN_TOKEN_LEN)
    };
    match api.get(ADMIN_SECRET).await {
        Ok(s) => {
            return read(&s).ok_or_else(|| {
                CliError::Usage(format!(
                    "Secret {ns}/{ADMIN_SECRET}: key `token` is missing or shorter than \
                     {MIN_TOKEN_LEN} characters; delete the Secret and the coordinator makes a \
                     new one"
                ))
            });
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => {
            return Err(CliError::Rpc(format!(
                "read Secret {ns}/{ADMIN_SECRET}: {e}"
            )));
        }
    }
    let token = new_token();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ADMIN_SECRET.into()),
            labels: Some(BTreeMap::from([(
                lockstep_coordinator::k8s::LABEL_MANAGED.to_string(),
                "lockstep".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "token".to_string(),
            ByteString(token.clone().into_bytes()),
        )])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(token),
        // Another coordinator made it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = api
                .get(ADMIN_SECRET)
                .await
                .map_err(|e| CliError::Rpc(format!("read Secret {ns}/{ADMIN_SECRET}: {e}")))?;
            read(&s)
                .ok_or_else(|| CliError::Rpc(format!("Secret {ns}/{ADMIN_SECRET} has no token")))
        }
        Err(e) => Err(CliError::Rpc(format!(
            "create Secret {ns}/{ADMIN_SECRET}: {e}"
        ))),
    }
}

/// SIGINT or SIGTERM (what the kubelet sends).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
