//! The Kubernetes commands: `lockstep crd`, `lockstep render`, `lockstep submit --kubernetes`,
//! and `lockstep serve --launcher kubernetes` (the coordinator as the LockstepJob controller).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::Value;

use super::{CliError, Result};
use crate::k8s::crd::{LockstepJob, LockstepJobSpec, PodResources, Scheduling, SharedVolume};
use crate::k8s::render::{self, Flavor, Target};
use crate::k8s::{Controller, ControllerSettings, KubeLauncher};
use crate::{Coordinator, Settings};

/// What a LockstepJob is made from: a config file and how its pods run.
#[derive(Debug, Clone)]
pub struct JobArgs {
    /// The job config (TOML).
    pub config: PathBuf,
    /// `--set SECTION.KEY=VALUE` overrides, applied to the config.
    pub set: Vec<String>,
    /// What `{date}` becomes (default today, UTC).
    pub date: Option<String>,
    /// The LockstepJob's name (`{date}` allowed; default: `job.name`).
    pub name: Option<String>,
    /// Its namespace (default: the kubeconfig context's, else `default`).
    pub namespace: Option<String>,
    /// The lockstep image.
    pub image: String,
    /// CPU, memory and GPUs per trainer pod.
    pub resources: PodResources,
    /// A Secret with the S3 settings.
    pub s3_secret: Option<String>,
    /// A Kueue LocalQueue.
    pub queue: Option<String>,
    /// `CLAIM[:MOUNT]`: the shared volume (default for configs with relative `file://` URLs:
    /// `lockstep-data:/data`).
    pub shared_volume: Option<String>,
    /// Create it suspended.
    pub suspend: bool,
}

/// The claim mounted when a config has relative `file://` URLs and no `--shared-volume`.
pub const DEFAULT_SHARED_VOLUME: &str = "lockstep-data:/data";

fn parse_shared_volume(s: &str) -> Result<SharedVolume> {
    let (claim, mount) = s.split_once(':').unwrap_or((s, "/data"));
    Ok(SharedVolume {
        claim_name: claim.to_string(),
        mount_path: mount.to_string(),
    })
}

/// Whether any URL of the config is a `file://` path (on Kubernetes: on the shared volume).
fn has_relative_files(c: &lockstep_api::JobConfig) -> bool {
    std::iter::once(&c.checkpoint.url)
        .chain(&c.data.train)
        .chain(&c.data.eval)
        .chain(c.export.iter().map(|e| &e.url))
        .chain(std::iter::once(&c.model.base))
        .map(|u| u.strip_prefix("latest-export:").unwrap_or(u))
        .any(|u| u.starts_with("file://"))
}

impl JobArgs {
    /// The LockstepJob (checked as the controller checks it). Notes for the user go to stderr.
    pub fn lockstep_job(&self, namespace: &str) -> Result<LockstepJob> {
        let date = match &self.date {
            Some(d) => {
                lockstep_api::date::check(d).map_err(CliError::Usage)?;
                d.clone()
            }
            None => lockstep_api::date::today(),
        };
        let text = super::jobs::read_config(&self.config, &self.set, Some(&date))?;
        let config = lockstep_api::JobConfig::parse(&text, &self.set).map_err(|source| {
            CliError::Config {
                file: self.config.clone(),
                source,
            }
        })?;
        let name =
            lockstep_api::date::apply(self.name.as_deref().unwrap_or(&config.job.name), &date);
        let shared_volume = match &self.shared_volume {
            Some(s) => Some(parse_shared_volume(s)?),
            None if has_relative_files(&config) => {
                eprintln!(
                    "note: {} has file:// URLs; its pods mount PersistentVolumeClaim \
                     `lockstep-data` at /data and run there (--shared-volume CLAIM:PATH to change)",
                    self.config.display()
                );
                Some(parse_shared_volume(DEFAULT_SHARED_VOLUME)?)
            }
            None => None,
        };
        let lsj = LockstepJob {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            spec: LockstepJobSpec {
                config: config.into(),
                image: self.image.clone(),
                image_pull_policy: None,
                resources: self.resources.clone(),
                node_selector: BTreeMap::new(),
                tolerations: Vec::new(),
                service_account_name: None,
                s3_credentials_secret: self.s3_secret.clone(),
                shared_volume,
                scheduling: Scheduling {
                    kueue_queue: self.queue.clone(),
                },
                suspend: self.suspend,
            },
            status: None,
        };
        render::name_of(&lsj).map_err(|e| CliError::Usage(format!("--name: {e}")))?;
        lsj.spec.check().map_err(CliError::Usage)?;
        Ok(lsj)
    }
}

/// `lockstep crd`: the CustomResourceDefinition, as YAML.
pub fn crd() -> Result {
    let yaml = crate::k8s::crd::crd_yaml()
        .map_err(|e| CliError::Usage(format!("cannot write the CRD as YAML: {e}")))?;
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}

/// `lockstep render`'s own settings.
#[derive(Debug, Clone)]
pub struct RenderArgs {
    /// The LockstepJob.
    pub job: JobArgs,
    /// Also print the objects of this attempt.
    pub attempt: Option<u32>,
    /// The coordinator URL the trainer pods get.
    pub coordinator_url: String,
    /// JobSet or Indexed Job.
    pub flavor: Flavor,
}

/// The uid `render` puts in owner references (the API server assigns the real one).
const RENDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// `lockstep render`: the LockstepJob and, with `--attempt`, what the controller creates for
/// that attempt, as a YAML stream.
pub fn render(args: &RenderArgs) -> Result {
    let ns = args
        .job
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let lsj = args.job.lockstep_job(&ns)?;
    let mut out = String::from(
        "# The LockstepJob: `kubectl apply -f` this, or `lockstep submit --kubernetes`.\n",
    );
    let mut doc = serde_json::to_value(&lsj).map_err(usage)?;
    strip_nulls(&mut doc);
    out.push_str(&to_yaml(&doc)?);
    if let Some(attempt) = args.attempt {
        if attempt == 0 {
            return Err(CliError::Usage("--attempt: attempts count from 1".into()));
        }
        let mut owned = lsj.clone();
        owned.metadata.uid = Some(RENDER_UID.into());
        let job_id = crate::k8s::controller::job_id(&owned).map_err(CliError::Usage)?;
        let target = Target {
            job_id: &job_id,
            coordinator_url: &args.coordinator_url,
            flavor: args.flavor,
        };
        let mut objects = render::job_objects(&owned).map_err(CliError::Usage)?;
        objects.extend(render::attempt_objects(&owned, &target, attempt).map_err(CliError::Usage)?);
        out.push_str(&format!(
            "---\n# What the controller creates for attempt {attempt}. It also makes Secret \
             `{}` (the job's token, which the pods read) and owns every object by the \
             LockstepJob (the uid here is a placeholder).\n",
            render::secret_name(owned.metadata.name.as_deref().unwrap_or(""))
        ));
        let docs: Vec<String> = objects.iter().map(to_yaml).collect::<Result<_>>()?;
        out.push_str(&docs.join("---\n"));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Removes `null` fields (unset options read the same without them).
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

fn to_yaml(v: &Value) -> Result<String> {
    serde_yaml::to_string(v).map_err(|e| CliError::Usage(format!("cannot write YAML: {e}")))
}

async fn kube_client() -> Result<Client> {
    Client::try_default().await.map_err(|e| CliError::Connect {
        url: "the Kubernetes API server (kubeconfig or in-cluster)".into(),
        reason: e.to_string(),
    })
}

/// `lockstep submit --kubernetes`: creates the LockstepJob. One that already exists under the
/// name is left alone (a CronJob re-run the same night is a no-op).
pub async fn submit(args: &JobArgs) -> Result {
    let client = kube_client().await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let lsj = args.lockstep_job(&ns)?;
    let name = lsj.metadata.name.clone().unwrap_or_default();
    let api: Api<LockstepJob> = Api::namespaced(client, &ns);
    match api.create(&PostParams::default(), &lsj).await {
        Ok(_) => {
            println!("lockstepjob {ns}/{name} created");
            eprintln!("watch it: kubectl get lsj {name} -n {ns} -w");
            Ok(ExitCode::SUCCESS)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            println!("lockstepjob {ns}/{name} already exists: nothing to do");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(CliError::Rpc(format!(
            "create LockstepJob {ns}/{name}: {e}"
        ))),
    }
}

/// `lockstep serve --launcher kubernetes`.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// gRPC address (workers and clients).
    pub listen: SocketAddr,
    /// The URL trainer pods reach this coordinator at (default: its Service in jobsets/,
    /// `http://lockstep-coordinator.NAMESPACE.svc:PORT`).
    pub advertise_url: Option<String>,
    /// The namespace whose LockstepJobs it runs (default: its own).
    pub namespace: Option<String>,
    /// Metrics and probes.
    pub http_addr: SocketAddr,
    /// Scratch (worker logs stay in the pods; nothing durable lives here).
    pub data_dir: PathBuf,
    /// JobSet, Indexed Job, or whatever the cluster serves.
    pub flavor: Option<Flavor>,
}

/// Name of the Secret holding the admin token (`lockstep status`/`watch` through a
/// port-forward read it).
pub const ADMIN_SECRET: &str = "lockstep-admin";

/// The admin token kept in Secret `lockstep-admin` (made on first start), so it survives the
/// coordinator pod.
async fn admin_token(client: &Client, ns: &str) -> Result<String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let read = |s: &Secret| -> Option<String> {
        let b = s.data.as_ref()?.get("token")?;
        String::from_utf8(b.0.clone())
            .ok()
            .filter(|t| t.len() >= 32)
    };
    match api.get(ADMIN_SECRET).await {
        Ok(s) => {
            return read(&s).ok_or_else(|| {
                CliError::Usage(format!(
                    "Secret {ns}/{ADMIN_SECRET}: key `token` is missing or shorter than 32 \
                     characters; delete the Secret and the coordinator makes a new one"
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
    let token = crate::auth::new_token();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ADMIN_SECRET.into()),
            labels: Some(BTreeMap::from([(
                crate::k8s::LABEL_MANAGED.to_string(),
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

/// Runs the coordinator as the LockstepJob controller until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> Result {
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
    let token = admin_token(&client, &ns).await?;
    let flavor = match args.flavor {
        Some(f) => f,
        None => KubeLauncher::detect_flavor(&client).await,
    };
    let launcher = KubeLauncher::new(client.clone(), flavor);
    let data_dir = absolute(&args.data_dir)?;
    let coordinator = Coordinator::open(
        Settings {
            data_dir,
            admin_token: token,
            // The LockstepJobs' status is the job store.
            persist: false,
        },
        launcher.clone(),
    )
    .await?;
    let listener = super::jobs::bind("--listen", args.listen).await?;
    coordinator.start(advertise_url.clone()).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let http = super::jobs::bind("--http-addr", args.http_addr).await?;
    {
        let (c, r) = (coordinator.clone(), ready.clone());
        tokio::spawn(crate::metrics::serve(
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
        "lockstep coordinator: LockstepJob controller of namespace {ns} ({flavor:?} gangs); \
         gRPC on {} (workers reach it at {}); metrics and probes on http://{}",
        args.listen, advertise_url, args.http_addr
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
        r = super::jobs::serve_grpc(coordinator.clone(), listener, None) => r?,
        _ = shutdown_signal() => {
            eprintln!("stopping; the LockstepJobs' gangs are adopted by the next coordinator");
        }
    }
    let _ = stop_tx.send(());
    let _ = controller.await;
    Ok(ExitCode::SUCCESS)
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

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|source| CliError::Io {
        op: "read the working directory",
        path: ".".into(),
        source,
    })?;
    Ok(cwd.join(p))
}
