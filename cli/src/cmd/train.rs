//! `lockstep train`: one rank. Training runs on its own threads; it needs no async runtime of
//! ours.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lockstep_api::Resume;
use lockstep_trainer::worker::{self, CollectiveKind, Device, Gang};

/// Train as one rank (what `run`, `serve` and Kubernetes pods start; also for debugging).
///
/// Alone it trains the job in CONFIG at world size 1; with --rank and --peers it is one rank of
/// a static data-parallel gang whose gradients are summed over a TCP ring (rank 0 commits
/// checkpoints); with --coordinator it is a worker of a coordinator, which assigns its rank and
/// starting checkpoint and commits. It loads the base model (or initialises one), reads and
/// packs the data, starts from the newest committed checkpoint that verifies
/// (checkpoint.resume; a corrupt one is set aside, never deleted), and checkpoints every
/// checkpoint.every_steps steps and at the end. SIGINT or SIGTERM checkpoints the current step
/// and exits (status 130 / 143); a second signal exits at once. Running the same command again
/// continues from the newest checkpoint, bit-identically.
///
/// Exit status: 0 done; 1 error (the message names the field, file or checkpoint at fault); 2
/// bad command line; 3 an error a restart cannot fix (config, base model, data, a checkpoint of
/// another architecture, a non-finite loss: a coordinator fails the job at once instead of
/// restarting it); 4 another rank of the gang went away (the ring broke or stalled); 130 / 143
/// stopped by SIGINT / SIGTERM after checkpointing.
#[derive(Debug, Args)]
pub struct TrainArgs {
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

/// Trains; the exit status says how it ended (see [`TrainArgs`]).
pub fn run(args: TrainArgs) -> ExitCode {
    let options = match args.into_options() {
        Ok(o) => o,
        Err(usage) => {
            eprintln!("error: {usage}");
            return ExitCode::from(2);
        }
    };
    match worker::run(&options) {
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
    }
}
