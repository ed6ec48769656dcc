//! `lockstep`: the one binary. It parses arguments and dispatches: `train` to the trainer
//! library (Burn), everything else to the coordinator library (no Burn). Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lockstep_api::Resume;
use lockstep_coordinator::cli::{self, ckpt::CkptCommand, jobs};
use lockstep_storage::RetentionPolicy;
use lockstep_trainer::export;
use lockstep_trainer::model::hf::WeightDtype;
use lockstep_trainer::worker::{self, CollectiveKind, Device, Gang};

/// mimalloc keeps freed memory for reuse instead of returning it to the kernel: checkpoint IO
/// allocates and frees tens of MiB per chunk batch and the training step many large tensors;
/// with glibc each paid fresh page faults. Loading 1.17 GB went from 0.66 s to 0.38 s
/// (benchmarks/README.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc reserves address space 1 GiB at a time by default, which under an address-space
/// limit (`ulimit -v`, common on shared clusters) leaves too little for thread stacks and data:
/// `lockstep ckpt verify` of a 256 MiB tensor failed under 1.5 GB. mimalloc reads its options
/// once, before `main`, from the environment; so under such a limit (and only then) lockstep
/// executes itself again, once, with `MIMALLOC_ARENA_RESERVE=64MiB`. If that fails it carries
/// on as it is.
fn fit_address_space_limit() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_ARENA_RESERVE").is_some() {
        return;
    }
    // "Max address space  SOFT  HARD  bytes": the soft limit is the one enforced.
    let limited = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Max address space"))
                .and_then(|rest| rest.split_whitespace().next())
                .map(|soft| soft != "unlimited")
        })
        .unwrap_or(false);
    if !limited {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // Started through the dynamic loader (`ld-linux… lockstep …`): executing "ourselves" would
    // run the loader without the program.
    if exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("ld-"))
    {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("MIMALLOC_ARENA_RESERVE", "64MiB")
        .exec();
    eprintln!("warning: could not restart with smaller memory reservations: {err}");
}

/// lockstep — distributed training and checkpoint runtime.
///
/// Start with `lockstep run configs/quickstart.toml`: it fine-tunes a small Llama model on this
/// machine with two data-parallel ranks, checkpoints, and restarts the gang if a rank dies.
///
/// Checkpoint URLs are `file://PATH` (relative paths resolve against the working directory;
/// NFS is a path), `s3://BUCKET/PREFIX` (credentials, region and endpoint from the usual
/// AWS_* environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT,
/// AWS_ALLOW_HTTP) or `memory://`. Logs go to stderr; LOCKSTEP_LOG filters them
/// (e.g. `LOCKSTEP_LOG=info`, default `warn`).
#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about, long_about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job on this machine: a coordinator in this process starts job.world_size ranks
    /// (this executable as `lockstep train`), restarts the whole gang from the newest committed
    /// checkpoint when a rank dies or hangs, and shows progress until the job ends; with an
    /// [export] section the final checkpoint is then exported and, if it passes the eval-loss
    /// gate, promoted (see `lockstep export`). Exit status 0 when it succeeds (exported or
    /// not), 1 when it fails, 130 when interrupted (the gang is torn down; running it again
    /// resumes from the newest checkpoint).
    Run(RunArgs),
    /// Run the coordinator service: jobs are submitted to it (`lockstep submit`) and kept in
    /// DATA_DIR/jobs.redb, so a restarted coordinator resumes every live job.
    Serve(ServeArgs),
    /// Submit a job to a running coordinator; prints its id. With --kubernetes, create it as a
    /// LockstepJob in the current kubeconfig context instead (the in-cluster coordinator runs
    /// it); one that already exists under its name is left alone, so a CronJob that runs twice
    /// the same night submits once.
    Submit {
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
    },
    /// Show one job, or every job.
    Status {
        /// The job id (default: all jobs).
        job: Option<String>,
        /// One JSON object per job.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a job until it ends (progress bar, then a summary); exit status as `run`.
    Watch {
        /// The job id.
        job: String,
        /// JSON lines instead of a progress bar.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job: its workers are killed and it ends Cancelled.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inspect, verify and garbage-collect checkpoints.
    #[command(subcommand)]
    Ckpt(Ckpt),
    /// Print the LockstepJob CustomResourceDefinition (`lockstep crd | kubectl apply -f -`).
    Crd,
    /// Print the Kubernetes objects a config becomes, as YAML, for review and GitOps: the
    /// LockstepJob (`kubectl apply -f` it, as `submit --kubernetes` would create it) and, with
    /// --attempt, what the coordinator creates for that attempt (the JobSet, or Indexed Job and
    /// headless Service; the ConfigMap with the config; the NetworkPolicy of the gang).
    Render {
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
    },
    /// Train as one rank (what `run`, `serve` and Kubernetes pods start; also for debugging).
    ///
    /// Alone it trains the job in CONFIG at world size 1; with --rank and --peers it is one
    /// rank of a static data-parallel gang whose gradients are summed over a TCP ring (rank 0
    /// commits checkpoints); with --coordinator it is a worker of a coordinator, which assigns
    /// its rank and starting checkpoint and commits. It loads the base model (or initialises
    /// one), reads and packs the data, starts from the newest committed checkpoint that
    /// verifies (checkpoint.resume; a corrupt one is set aside, never deleted), and checkpoints
    /// every checkpoint.every_steps steps and at the end. SIGINT or SIGTERM checkpoints the
    /// current step and exits (status 130 / 143); a second signal exits at once. Running the
    /// same command again continues from the newest checkpoint, bit-identically.
    ///
    /// Exit status: 0 done; 1 error (the message names the field, file or checkpoint at
    /// fault); 2 bad command line; 3 an error a restart cannot fix (config, base model, data,
    /// a checkpoint of another architecture, a non-finite loss: a coordinator fails the job at
    /// once instead of restarting it); 4 another rank of the gang went away (the ring broke or
    /// stalled); 130 / 143 stopped by SIGINT / SIGTERM after checkpointing.
    Train(TrainArgs),
    /// Export a checkpoint as a Hugging Face model directory (model.safetensors, config.json,
    /// generation_config.json, the base's tokenizer files, lockstep.json with the lineage and
    /// every file's sha256) to TO/NAME/VERSION/, and with --promote move TO/NAME/latest.json to
    /// it (compare-and-swap) unless its eval loss is worse than the promoted version's by more
    /// than --max-eval-regression. `lockstep export ls TO/NAME` lists the versions.
    ///
    /// Exporting the same weights to the same version again writes nothing; other weights to
    /// an existing version are refused. Exit status 0 exported (promoted or not: the line
    /// says which and why), 1 error.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ExportArgs {
    #[command(subcommand)]
    list: Option<ExportList>,
    /// The checkpoint: URL[@STEP] (without @STEP the newest committed).
    #[arg(required = true)]
    checkpoint: Option<String>,
    /// The export root (a job's export.url): the version goes to TO/NAME/VERSION/.
    #[arg(long, required = true, value_name = "URL")]
    to: Option<String>,
    /// The lineage (default: the checkpoint's job name).
    #[arg(long)]
    name: Option<String>,
    /// The version (default: JOB-YYYYMMDD-stepN-HASH: the checkpoint's commit date and the
    /// first 8 hex digits of model.safetensors' sha256, so the same weights give the same
    /// version).
    #[arg(long)]
    version: Option<String>,
    /// Weight dtype of model.safetensors.
    #[arg(long, value_enum, default_value_t = ExportDtype::F32)]
    dtype: ExportDtype,
    /// A Hugging Face directory or URL whose tokenizer files go with the export (the job's
    /// model.base).
    #[arg(long, value_name = "DIR_OR_URL")]
    base: Option<String>,
    /// Promote the version (move latest.json to it) if it passes the eval-loss gate.
    #[arg(long)]
    promote: bool,
    /// How much worse than the promoted version's eval loss the new one may be and still be
    /// promoted.
    #[arg(long, default_value_t = 0.0, value_name = "LOSS")]
    max_eval_regression: f64,
    /// One JSON object instead of a line.
    #[arg(long)]
    json: bool,
    /// POST a JSON notice (model, version, URL, step, losses) here when the version is
    /// promoted; retried with backoff for up to a minute.
    #[arg(
        long,
        value_name = "URL",
        env = "LOCKSTEP_EXPORT_WEBHOOK",
        hide_env_values = true
    )]
    webhook: Option<String>,
    /// Also write the result (the --json object) to this file (on Kubernetes the export pod's
    /// /dev/termination-log, where the coordinator reads it).
    #[arg(long, value_name = "PATH")]
    result_file: Option<PathBuf>,
    /// Lineage facts for lockstep.json, as a JSON object (set by the coordinator).
    #[arg(long, hide = true, value_name = "JSON")]
    lineage: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ExportList {
    /// List a lineage's finished versions (step, train and eval loss, promotion decision; `*`
    /// marks the promoted one).
    Ls {
        /// The lineage: TO/NAME, e.g. file://runs/quickstart/export/quickstart.
        url: String,
        /// One JSON object per version.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportDtype {
    /// 32-bit floats: the trained weights exactly.
    F32,
    /// bfloat16: half the size, what serving usually loads.
    Bf16,
}

#[derive(Debug, Args)]
struct RunArgs {
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

/// How a LockstepJob's pods run (`render`, `submit --kubernetes`).
#[derive(Debug, Args)]
struct KubeJobArgs {
    /// Override a config field: `--set train.steps=20` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// What `{date}` in the config and --name becomes (YYYY-MM-DD; default: today, UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    date: Option<String>,
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
    /// A ReadWriteMany PersistentVolumeClaim every pod mounts at PATH and runs in, so relative
    /// file:// URLs resolve under it (default for configs with relative file:// URLs:
    /// lockstep-data:/data).
    #[arg(long, value_name = "CLAIM[:PATH]")]
    shared_volume: Option<String>,
    /// Create it suspended (no pods until `spec.suspend` is set to false).
    #[arg(long)]
    suspend: bool,
}

impl KubeJobArgs {
    fn into_lib(self, config: PathBuf) -> cli::kube::JobArgs {
        cli::kube::JobArgs {
            config,
            set: self.set,
            date: self.date,
            name: self.name,
            namespace: self.namespace,
            image: self.image,
            resources: lockstep_coordinator::k8s::crd::PodResources {
                cpu: self.cpu,
                memory: self.memory,
                gpu: self.gpus,
            },
            s3_secret: self.s3_secret,
            queue: self.kueue_queue,
            shared_volume: self.shared_volume,
            suspend: self.suspend,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GangFlavor {
    /// jobset.x-k8s.io/v1alpha2 JobSet.
    Jobset,
    /// batch/v1 Indexed Job and a headless Service.
    IndexedJob,
}

impl GangFlavor {
    fn into_lib(self) -> lockstep_coordinator::k8s::Flavor {
        match self {
            GangFlavor::Jobset => lockstep_coordinator::k8s::Flavor::JobSet,
            GangFlavor::IndexedJob => lockstep_coordinator::k8s::Flavor::IndexedJob,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LauncherKind {
    /// Workers are processes of this machine; jobs are kept in DATA_DIR/jobs.redb.
    Local,
    /// Workers are pods: the coordinator is the controller of the namespace's LockstepJobs,
    /// whose status is the job store.
    Kubernetes,
}

#[derive(Debug, Args)]
struct ServeArgs {
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
    /// gRPC address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Job store (`jobs.redb`), admin token (`admin.token`) and worker logs.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value_os_t = jobs::default_data_dir())]
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

/// How a client reaches a coordinator.
#[derive(Debug, Args)]
struct ClientArgs {
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
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value_os_t = jobs::default_data_dir())]
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

/// `lockstep ckpt` subcommands.
#[derive(Debug, Subcommand)]
enum Ckpt {
    /// List the checkpoints under URL: committed ones and uncommitted debris.
    Ls {
        /// Checkpoint root, e.g. file://runs/quickstart/checkpoints or s3://bucket/job/checkpoints.
        url: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a checkpoint's manifest: shards, tensors, dtypes, sizes and compression ratios.
    Inspect {
        /// URL[@STEP]; without @STEP (or with @latest) the newest committed checkpoint.
        target: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every file size, footer, chunk hash and tensor hash of a checkpoint. Exits 0 only
    /// when everything checks; 1 when something is corrupt (each problem names its file and
    /// chunk); 2 when the checkpoint cannot be read at all.
    Verify {
        /// URL[@STEP]; without @STEP (or with @latest) the newest committed checkpoint.
        target: String,
        /// Verify every committed checkpoint instead of one.
        #[arg(long)]
        all: bool,
    },
    /// Delete committed checkpoints outside the retention policy, and uncommitted debris older
    /// than the newest commit. The newest committed checkpoint is never deleted.
    Gc {
        /// Checkpoint root.
        url: String,
        /// Keep this many of the newest checkpoints.
        #[arg(long)]
        keep_last: usize,
        /// Also keep every step divisible by this.
        #[arg(long)]
        keep_every: Option<u64>,
        /// Never delete this step (repeatable), e.g. one a running job resumed from.
        #[arg(long = "protect", value_name = "STEP")]
        protect: Vec<u64>,
        /// Show what would be deleted without deleting.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// The job config (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Override a config field: `--set train.steps=20` (repeatable; values in TOML syntax or
    /// bare strings).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Where to start: `latest`, `none` or a step number (default: checkpoint.resume).
    #[arg(long, value_parser = parse_resume)]
    resume: Option<Resume>,
    /// Stop after this step, checkpointing it; the LR schedule still spans train.steps.
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// This process's rank in a static data-parallel gang (with --peers; or LOCKSTEP_RANK,
    /// read only when neither --rank/--peers nor --coordinator is given).
    #[arg(long, requires = "peers")]
    rank: Option<usize>,
    /// Every rank's `host:port` for the gradient ring, in rank order, comma-separated; this
    /// rank listens on its own entry. Their number must equal job.world_size. Without it (and
    /// without --coordinator) the trainer runs alone (world size 1). Or LOCKSTEP_PEERS, as
    /// LOCKSTEP_RANK. Set LOCKSTEP_RING_KEY to the same secret on every rank to authenticate
    /// the ring's connections.
    #[arg(long, value_delimiter = ',', requires = "rank")]
    peers: Vec<String>,
    /// Run as a worker of a coordinator at this gRPC URL (set by `lockstep run`/`serve`; the
    /// job token comes in LOCKSTEP_TOKEN). The worker joins the gang, gets its rank and peers,
    /// starts from the checkpoint the coordinator names, and reports its checkpoint shards to
    /// it for commit.
    #[arg(long, value_name = "URL", requires_all = ["job", "attempt", "worker"], conflicts_with_all = ["rank", "resume", "stop_at"])]
    coordinator: Option<String>,
    /// The job id (with --coordinator).
    #[arg(long, requires = "coordinator")]
    job: Option<String>,
    /// The attempt (with --coordinator).
    #[arg(long, requires = "coordinator")]
    attempt: Option<u32>,
    /// This worker's index in the attempt (with --coordinator).
    #[arg(long, requires = "coordinator")]
    worker: Option<u32>,
    /// Compute device: `cpu` (Burn's flex backend, all cores) or `cuda` (--cuda-device; needs
    /// a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// How gradients are summed across ranks: `auto` is NCCL with --device cuda in a gang and
    /// the TCP ring otherwise; `ring` forces the ring; `nccl` forces NCCL (also alone, as a
    /// smoke test of the GPU path).
    #[arg(long, default_value = "auto")]
    collective: CollectiveKind,
    /// CUDA device ordinal of this rank (with --device cuda).
    #[arg(long, env = "LOCKSTEP_CUDA_DEVICE", default_value_t = 0)]
    cuda_device: usize,
    /// Progress as log lines instead of a bar (the default when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// What `{date}` in the config becomes (YYYY-MM-DD; default: today, UTC). Workers of a
    /// coordinator get a config in which it is already replaced.
    #[arg(long, value_name = "YYYY-MM-DD")]
    date: Option<String>,
    /// Where the tokenised training data is cached (private to this user; the ranks of a
    /// machine share it; unused entries are removed after a week). Default:
    /// $XDG_CACHE_HOME/lockstep/tokens or ~/.cache/lockstep/tokens.
    #[arg(long, env = "LOCKSTEP_DATA_CACHE", value_name = "DIR")]
    data_cache: Option<PathBuf>,
}

fn parse_resume(s: &str) -> Result<Resume, String> {
    Resume::parse(s).ok_or_else(|| format!("`{s}` is not `latest`, `none` or a step number"))
}

impl ClientArgs {
    fn into_lib(self) -> jobs::ClientArgs {
        jobs::ClientArgs {
            coordinator: self.coordinator,
            token: self.token,
            data_dir: self.data_dir,
            tls_ca: self.tls_ca,
            insecure_plaintext: self.insecure_plaintext,
        }
    }
}

/// A static gang from LOCKSTEP_RANK and LOCKSTEP_PEERS (both set and non-empty), for
/// launchers that pass them in the environment.
fn static_gang_from_env() -> Result<Option<(usize, Vec<String>)>, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    match (var("LOCKSTEP_RANK"), var("LOCKSTEP_PEERS")) {
        (Some(rank), Some(peers)) => {
            let rank = rank
                .trim()
                .parse()
                .map_err(|_| format!("LOCKSTEP_RANK `{rank}` is not a rank number"))?;
            let peers = peers.split(',').map(|p| p.trim().to_string()).collect();
            Ok(Some((rank, peers)))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err("LOCKSTEP_RANK is set but LOCKSTEP_PEERS is not".into()),
        (None, Some(_)) => Err("LOCKSTEP_PEERS is set but LOCKSTEP_RANK is not".into()),
    }
}

impl TrainArgs {
    fn into_options(mut self) -> Result<worker::Options, String> {
        if self.coordinator.is_none()
            && self.rank.is_none()
            && let Some((rank, peers)) = static_gang_from_env()?
        {
            self.rank = Some(rank);
            self.peers = peers;
        }
        let gang = match (self.coordinator, self.rank) {
            (Some(url), _) => Gang::Coordinated {
                url,
                // clap's `requires_all` guarantees these with --coordinator.
                job: self.job.unwrap_or_default(),
                attempt: self.attempt.unwrap_or_default(),
                worker: self.worker.unwrap_or_default(),
            },
            (None, Some(rank)) => Gang::Static {
                rank,
                peers: self.peers,
            },
            (None, None) => Gang::Alone,
        };
        Ok(worker::Options {
            config: self.config,
            set: self.set,
            resume: self.resume,
            stop_at: self.stop_at,
            gang,
            device: self.device,
            collective: self.collective,
            cuda_device: self.cuda_device,
            progress_bar: !self.no_progress,
            data_cache: self.data_cache,
            date: self.date,
        })
    }
}

impl Ckpt {
    fn into_lib(self) -> CkptCommand {
        match self {
            Ckpt::Ls { url, json } => CkptCommand::Ls { url, json },
            Ckpt::Inspect { target, json } => CkptCommand::Inspect { target, json },
            Ckpt::Verify { target, all } => CkptCommand::Verify { target, all },
            Ckpt::Gc {
                url,
                keep_last,
                keep_every,
                protect,
                dry_run,
            } => CkptCommand::Gc {
                url,
                policy: RetentionPolicy {
                    keep_last,
                    keep_every,
                },
                protect,
                dry_run,
            },
        }
    }
}

fn main() -> ExitCode {
    fit_address_space_limit();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // `ckpt` documents 2 for "cannot read"; the job commands use 1 for every failure.
    match cli.command {
        // Training runs on its own threads; it needs no async runtime of ours.
        Command::Train(args) => match args.into_options().map(|o| worker::run(&o)) {
            Err(usage) => {
                eprintln!("error: {usage}");
                ExitCode::from(2)
            }
            Ok(result) => match result {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    // The last line a launcher reads from the log, and the job's message.
                    eprintln!("error: {e}");
                    if e.is_permanent() {
                        ExitCode::from(lockstep_api::EXIT_PERMANENT)
                    } else if e.is_peer_lost() {
                        ExitCode::from(lockstep_api::EXIT_PEER_LOST)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            },
        },
        Command::Export(a) => {
            let lineage = match a.lineage.as_deref().map(export::parse_lineage).transpose() {
                Ok(l) => l.unwrap_or_default(),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = match (a.list, a.checkpoint, a.to) {
                (Some(ExportList::Ls { url, json }), _, _) => export::list_cli(&url, json),
                (None, Some(checkpoint), Some(to)) => export::run_cli(
                    &export::Request {
                        checkpoint,
                        name: a.name,
                        version: a.version,
                        dtype: match a.dtype {
                            ExportDtype::F32 => WeightDtype::F32,
                            ExportDtype::Bf16 => WeightDtype::Bf16,
                        },
                        base: a.base,
                        promote: a.promote,
                        max_eval_regression: a.max_eval_regression,
                        lineage,
                        webhook: a.webhook,
                    },
                    &to,
                    a.json,
                    a.result_file.as_deref(),
                ),
                // clap requires both without a subcommand.
                _ => Err(lockstep_trainer::Error::Invalid(
                    "give a checkpoint and --to, or `export ls URL`".into(),
                )),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ckpt(cmd) => block_on(2, async move {
            cli::ckpt::run(cmd.into_lib(), &mut std::io::stdout().lock()).await
        }),
        Command::Run(a) => block_on(
            1,
            jobs::run(jobs::RunArgs {
                config: a.config,
                set: a.set,
                json: a.json,
                data_dir: a.data_dir,
                metrics_addr: a.metrics_addr,
                date: a.date,
            }),
        ),
        Command::Serve(a) if a.launcher == LauncherKind::Kubernetes => {
            if a.tls_cert.is_some() {
                eprintln!(
                    "error: --tls-cert: with --launcher kubernetes the coordinator serves plain \
                     gRPC inside the cluster (its NetworkPolicy admits only lockstep pods); \
                     terminate TLS in front of it for clients outside"
                );
                return ExitCode::from(2);
            }
            block_on(
                1,
                cli::kube::serve(cli::kube::ServeArgs {
                    listen: a.listen,
                    advertise_url: a.advertise_url,
                    namespace: a.namespace,
                    // clap requires it with --launcher kubernetes.
                    http_addr: a
                        .metrics_addr
                        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9090))),
                    data_dir: a.data_dir,
                    flavor: a.flavor.map(GangFlavor::into_lib),
                }),
            )
        }
        Command::Serve(a) => block_on(
            1,
            jobs::serve(jobs::ServeArgs {
                listen: a.listen,
                data_dir: a.data_dir,
                metrics_addr: a.metrics_addr,
                tls: a.tls_cert.zip(a.tls_key),
                insecure_plaintext: a.insecure_plaintext,
            }),
        ),
        Command::Crd => block_on(1, async { cli::kube::crd() }),
        Command::Render {
            config,
            attempt,
            coordinator_url,
            flavor,
            kube,
        } => block_on(1, async move {
            let coordinator_url = coordinator_url.unwrap_or_else(|| {
                let ns = kube.namespace.as_deref().unwrap_or("default");
                format!("http://lockstep-coordinator.{ns}.svc:7070")
            });
            cli::kube::render(&cli::kube::RenderArgs {
                job: kube.into_lib(config),
                attempt,
                coordinator_url,
                flavor: flavor.into_lib(),
            })
        }),
        Command::Submit {
            config,
            kubernetes: true,
            kube,
            watch,
            ..
        } => {
            if watch {
                eprintln!(
                    "error: --watch: with --kubernetes, watch with `kubectl get lsj NAME -w` \
                     (or `lockstep watch JOB` through a port-forward to the coordinator)"
                );
                return ExitCode::from(2);
            }
            block_on(
                1,
                async move { cli::kube::submit(&kube.into_lib(config)).await },
            )
        }
        Command::Submit {
            config,
            kube,
            watch,
            json,
            client,
            ..
        } => block_on(1, async move {
            let (set, date) = (kube.set, kube.date);
            jobs::submit(
                &config,
                set,
                date.as_deref(),
                watch,
                json,
                &client.into_lib(),
            )
            .await
        }),
        Command::Status { job, json, client } => block_on(1, async move {
            jobs::status(job, json, &client.into_lib()).await
        }),
        Command::Watch { job, json, client } => block_on(1, async move {
            jobs::watch_job(&job, json, &client.into_lib()).await
        }),
        Command::Cancel { job, client } => {
            block_on(
                1,
                async move { jobs::cancel(&job, &client.into_lib()).await },
            )
        }
    }
}

/// Runs a command on a multi-threaded runtime; an error is printed and exits `error_code`.
fn block_on(error_code: u8, command: impl Future<Output = cli::Result>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(error_code);
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(error_code)
        }
    }
}

/// The one tracing initialisation: stderr, LOCKSTEP_LOG (default `warn`).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
