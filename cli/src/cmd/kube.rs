//! The Kubernetes commands: `lockstep crd`, `lockstep render`, and the LockstepJob that
//! `lockstep submit --kubernetes` creates (`serve --launcher kubernetes` lives in
//! [`super::serve`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use lockstep_coordinator::k8s::crd::{
    LockstepJob, LockstepJobSpec, PodResources, Scheduling, SecretKey, SharedVolume,
};
use lockstep_coordinator::k8s::render::{self, Target};
use serde_json::Value;

use super::{CliError, Result};

/// How a LockstepJob's pods run (`render`, `submit --kubernetes`).
#[derive(Debug, Args)]
pub struct KubeJobArgs {
    /// Override a config field: `--set train.steps=20` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub(super) set: Vec<String>,
    /// What `{date}` in the config and --name becomes (YYYY-MM-DD; default: today, UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub(super) date: Option<String>,
    /// The LockstepJob's name, at most 40 characters (`{date}` allowed, e.g.
    /// `nightly-{date}`; default: job.name).
    #[arg(long)]
    name: Option<String>,
    /// Its namespace (default: the kubeconfig context's; `default` for render).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// The lockstep image the pods run.
    #[arg(long, env = "LOCKSTEP_IMAGE", default_value = concat!("lockstep:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// CPU per trainer pod (a Kubernetes quantity: 4, 500m).
    #[arg(long)]
    cpu: Option<String>,
    /// Memory per trainer pod (16Gi).
    #[arg(long)]
    memory: Option<String>,
    /// nvidia.com/gpu per trainer pod (the pods then train with --device cuda).
    #[arg(long)]
    gpus: Option<u32>,
    /// A Secret with the S3 settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT,
    /// AWS_REGION, …) given to every pod.
    #[arg(long, value_name = "SECRET")]
    s3_secret: Option<String>,
    /// A Kueue LocalQueue: each gang is created suspended and admitted whole.
    #[arg(long, value_name = "QUEUE")]
    kueue_queue: Option<String>,
    /// Take the export's webhook URL from key KEY of Secret SECRET (instead of
    /// export.webhook in the config, which would be stored in the LockstepJob as plain text).
    #[arg(long, value_name = "SECRET:KEY")]
    export_webhook_secret: Option<String>,
    /// A ReadWriteMany PersistentVolumeClaim every pod mounts at PATH and runs in, so relative
    /// file:// URLs resolve under it (default for configs with relative file:// URLs:
    /// lockstep-data:/data).
    #[arg(long, value_name = "CLAIM[:PATH]")]
    shared_volume: Option<String>,
    /// Create it suspended (no pods until `spec.suspend` is set to false).
    #[arg(long)]
    suspend: bool,
}

/// Print the Kubernetes objects a config becomes, as YAML, for review and GitOps: the
/// LockstepJob (`kubectl apply -f` it, as `submit --kubernetes` would create it) and, with
/// --attempt, what the coordinator creates for that attempt (the JobSet, or Indexed Job and
/// headless Service; the ConfigMap with the config; the NetworkPolicy of the gang).
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The job config (TOML).
    config: PathBuf,
    /// Also print the objects of this attempt (1 is the first).
    #[arg(long, value_name = "N")]
    attempt: Option<u32>,
    /// The coordinator URL the trainer pods are given (with --attempt; default: what
    /// `serve --launcher kubernetes` advertises, http://lockstep-coordinator.NAMESPACE.svc:7070).
    #[arg(long, value_name = "URL")]
    coordinator_url: Option<String>,
    /// How a gang is made (with --attempt): a JobSet, or where JobSet is not installed an
    /// Indexed Job and a headless Service.
    #[arg(long, value_enum, default_value_t = GangFlavor::Jobset)]
    flavor: GangFlavor,
    #[command(flatten)]
    kube: KubeJobArgs,
}

/// How a gang of pods is made.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GangFlavor {
    /// jobset.x-k8s.io/v1alpha2 JobSet.
    Jobset,
    /// batch/v1 Indexed Job and a headless Service.
    IndexedJob,
}

impl GangFlavor {
    /// The launcher's name for it.
    pub fn into_lib(self) -> lockstep_coordinator::k8s::Flavor {
        match self {
            GangFlavor::Jobset => lockstep_coordinator::k8s::Flavor::JobSet,
            GangFlavor::IndexedJob => lockstep_coordinator::k8s::Flavor::IndexedJob,
        }
    }
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

fn parse_secret_key(s: &str) -> Result<SecretKey> {
    let Some((name, key)) = s.split_once(':') else {
        return Err(CliError::Usage(format!(
            "--export-webhook-secret `{s}`: expected SECRET:KEY"
        )));
    };
    Ok(SecretKey {
        name: name.to_string(),
        key: key.to_string(),
    })
}

/// Whether any URL of the config is a `file://` path (on Kubernetes: on the shared volume).
fn has_relative_files(c: &lockstep_api::JobConfig) -> bool {
    c.urls().iter().any(|(_, u)| u.starts_with("file://"))
}

impl KubeJobArgs {
    /// The LockstepJob made of the config at `path` (checked as the controller checks it).
    /// Notes for the user go to stderr.
    fn lockstep_job(&self, path: &Path, namespace: &str) -> Result<LockstepJob> {
        let super::Loaded { config, date, .. } =
            super::load_for_workers(path, &self.set, self.date.as_deref())?;
        let name =
            lockstep_api::date::apply(self.name.as_deref().unwrap_or(&config.job.name), &date);
        let shared_volume = match &self.shared_volume {
            Some(s) => Some(parse_shared_volume(s)?),
            None if has_relative_files(&config) => {
                eprintln!(
                    "note: {} has file:// URLs; its pods mount PersistentVolumeClaim \
                     `lockstep-data` at /data and run there (--shared-volume CLAIM:PATH to change)",
                    path.display()
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
                resources: PodResources {
                    cpu: self.cpu.clone(),
                    memory: self.memory.clone(),
                    gpu: self.gpus,
                },
                node_selector: BTreeMap::new(),
                tolerations: Vec::new(),
                service_account_name: None,
                s3_credentials_secret: self.s3_secret.clone(),
                shared_volume,
                export_webhook_secret: match &self.export_webhook_secret {
                    Some(s) => Some(parse_secret_key(s)?),
                    None => None,
                },
                scheduling: Scheduling {
                    kueue_queue: self.kueue_queue.clone(),
                },
                suspend: self.suspend,
            },
            status: None,
        };
        render::name_of(&lsj).map_err(|e| {
            CliError::Usage(if e.starts_with("metadata.namespace") {
                format!("--namespace: {e}")
            } else if self.name.is_some() {
                format!("--name: {e}")
            } else {
                format!(
                    "{}: job.name names the LockstepJob: {e}; choose another name with --name",
                    path.display()
                )
            })
        })?;
        lsj.spec.check().map_err(CliError::Usage)?;
        Ok(lsj)
    }
}

/// `lockstep crd`: the CustomResourceDefinition, as YAML.
pub fn crd() -> Result {
    let yaml = lockstep_coordinator::k8s::crd::crd_yaml()
        .map_err(|e| CliError::Usage(format!("cannot write the CRD as YAML: {e}")))?;
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}

/// The uid `render` puts in owner references (the API server assigns the real one).
const RENDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// `lockstep render`: the LockstepJob and, with `--attempt`, what the controller creates for
/// that attempt, as a YAML stream.
pub fn render(args: RenderArgs) -> Result {
    let ns = args
        .kube
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let coordinator_url = args
        .coordinator_url
        .clone()
        .unwrap_or_else(|| format!("http://lockstep-coordinator.{ns}.svc:7070"));
    let lsj = args.kube.lockstep_job(&args.config, &ns)?;
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
        let job_id = lockstep_coordinator::k8s::job_id(&owned).map_err(CliError::Usage)?;
        let target = Target {
            job_id: &job_id,
            coordinator_url: &coordinator_url,
            flavor: args.flavor.into_lib(),
            // As a controller whose API server serves per-index Job backoff renders them.
            replace_pods: true,
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
    serde_yaml::to_string(v)
        .map(|y| yaml11_floats(&y))
        .map_err(|e| CliError::Usage(format!("cannot write YAML: {e}")))
}

/// `yaml` with numbers like `1e-8` written `1.0e-8`: YAML 1.1 readers (PyYAML, so most
/// Python GitOps tooling) read a float only with a `.` and a signed exponent, and would take
/// `1e-8` for a string.
fn yaml11_floats(yaml: &str) -> String {
    let fix = |v: &str| -> Option<String> {
        let (mantissa, exp) = v.split_once(['e', 'E'])?;
        let digits = mantissa.strip_prefix('-').unwrap_or(mantissa);
        let exp_digits = exp.strip_prefix(['-', '+']).unwrap_or(exp);
        let number = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && !exp_digits.is_empty()
            && exp_digits.bytes().all(|b| b.is_ascii_digit());
        if !number {
            return None;
        }
        let mantissa = if digits.contains('.') {
            mantissa.to_string()
        } else {
            format!("{mantissa}.0")
        };
        let sign = if exp.starts_with(['-', '+']) { "" } else { "+" };
        Some(format!("{mantissa}e{sign}{exp}"))
    };
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.lines() {
        let split = line.rfind(": ").map(|i| i + 2).or_else(|| {
            line.trim_start()
                .starts_with("- ")
                .then(|| line.find("- ").map_or(0, |i| i + 2))
        });
        match split.and_then(|i| fix(&line[i..]).map(|v| (i, v))) {
            Some((i, v)) => {
                out.push_str(&line[..i]);
                out.push_str(&v);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A client of the API server of the kubeconfig context (or the cluster this runs in).
pub(super) async fn kube_client() -> Result<Client> {
    Client::try_default().await.map_err(|e| CliError::Connect {
        url: "the Kubernetes API server (kubeconfig or in-cluster)".into(),
        reason: e.to_string(),
    })
}

/// `lockstep submit --kubernetes`: creates the LockstepJob. One that already exists under the
/// name is left alone (a CronJob re-run the same night is a no-op).
pub(super) async fn submit(args: &KubeJobArgs, config: &Path) -> Result {
    let client = kube_client().await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let lsj = args.lockstep_job(config, &ns)?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn floats_are_written_so_yaml_1_1_reads_them_as_floats() {
        let y = "eps: 1e-8\nlr: 0.0003\nbig: 1e20\nx: -2.5e-7\nname: 1e-8x\n- 3e5\n";
        assert_eq!(
            super::yaml11_floats(y),
            "eps: 1.0e-8\nlr: 0.0003\nbig: 1.0e+20\nx: -2.5e-7\nname: 1e-8x\n- 3.0e+5\n"
        );
    }
}
