//! `lockstep train`: one rank, as launchers start it (`current_exe() train …` on this machine,
//! the same binary in a pod) and as a person runs it to debug.
//!
//! Alone it trains the job at world size 1; with a static gang (`--rank/--peers`) it is one rank
//! whose gradients are summed over a TCP ring and rank 0 commits; under a coordinator it joins
//! the attempt's gang, gets its rank, peers and starting checkpoint, streams heartbeats and has
//! its shards committed by the coordinator. SIGINT or SIGTERM checkpoints the current step and
//! ends the run (status 130 / 143); a second signal exits at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lockstep_api::{JobConfig, Resume};

use crate::collective::{Collective, RingKey, Solo, TcpRing};
use crate::control::{Control, Identity};
use crate::error::{Error, Result};
use crate::progress::{Progress, print_summary};
use crate::resume::Start;
use crate::train::{Event, RunOptions, Summary, train};

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Burn's flex CPU backend (all cores).
    Cpu,
    /// A CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(format!("`{s}` is not a device: use `cpu` or `cuda`")),
        }
    }
}

/// How gradients are summed across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveKind {
    /// NCCL for a CUDA gang, the TCP ring otherwise.
    Auto,
    /// The TCP ring (host buffers).
    Ring,
    /// NCCL (needs `--device cuda` and a build with the `cuda` feature).
    Nccl,
}

impl std::str::FromStr for CollectiveKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<CollectiveKind, String> {
        match s {
            "auto" => Ok(CollectiveKind::Auto),
            "ring" => Ok(CollectiveKind::Ring),
            "nccl" => Ok(CollectiveKind::Nccl),
            _ => Err(format!(
                "`{s}` is not a collective: use `auto`, `ring` or `nccl`"
            )),
        }
    }
}

/// How this rank finds its gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gang {
    /// World size 1, no coordinator.
    Alone,
    /// A static gang without a coordinator: this rank and every rank's `host:port`.
    Static {
        /// This rank.
        rank: usize,
        /// Every rank's ring address, in rank order.
        peers: Vec<String>,
    },
    /// A worker of a coordinator (the job token comes in `LOCKSTEP_TOKEN`).
    Coordinated {
        /// The coordinator's gRPC URL.
        url: String,
        /// The job id.
        job: String,
        /// The attempt.
        attempt: u32,
        /// This worker's index in the attempt.
        worker: u32,
    },
}

/// Everything `lockstep train` is told.
#[derive(Debug, Clone)]
pub struct Options {
    /// The job config file.
    pub config: PathBuf,
    /// `section.key=value` overrides.
    pub set: Vec<String>,
    /// Where to start (default: `checkpoint.resume`); not with a coordinator, which decides.
    pub resume: Option<Resume>,
    /// Stop after this step, checkpointing it.
    pub stop_at: Option<u64>,
    /// How this rank finds its gang.
    pub gang: Gang,
    /// Compute device.
    pub device: Device,
    /// Collective.
    pub collective: CollectiveKind,
    /// CUDA ordinal (with `Device::Cuda`).
    pub cuda_device: usize,
    /// A progress bar (on a terminal) instead of log lines.
    pub progress_bar: bool,
    /// Where tokenised data is cached; `None`: the per-user default.
    pub data_cache: Option<PathBuf>,
    /// What `{date}` in the config becomes; `None`: today, UTC.
    pub date: Option<String>,
}

/// Runs one rank to the end; returns the process's exit status: 0 done (or stopped by the
/// coordinator), 130 / 143 stopped by SIGINT / SIGTERM after checkpointing.
pub fn run(opts: &Options) -> Result<u8> {
    let path = opts.config.display().to_string();
    // Bounded: a config is small; `/dev/zero` or a huge file is refused, not read into memory.
    const MAX_CONFIG: u64 = 4 << 20;
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    // Opened without waiting on a FIFO nobody writes to.
    let bytes = lockstep_storage::files::read_bounded(&opts.config, MAX_CONFIG).map_err(io)?;
    if bytes.len() as u64 > MAX_CONFIG {
        return Err(Error::Usage(format!(
            "{path}: larger than {} MiB: not a config",
            MAX_CONFIG >> 20
        )));
    }
    if bytes.is_empty() {
        return Err(Error::Usage(format!(
            "{path}: {}",
            if lockstep_storage::files::is_pipe(&opts.config) {
                "a pipe that delivered nothing (nobody wrote to it)"
            } else {
                "the config is empty"
            }
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Usage(format!("{path}: not UTF-8 text ({e})")))?;
    let date = match &opts.date {
        Some(d) => {
            lockstep_api::date::check(d).map_err(Error::Usage)?;
            d.clone()
        }
        None => lockstep_api::date::today(),
    };
    let text = lockstep_api::date::apply(&text, &date);
    let sets: Vec<String> = opts
        .set
        .iter()
        .map(|s| lockstep_api::date::apply(s, &date))
        .collect();
    let config = JobConfig::parse(&text, &sets)
        .map_err(|source| Error::ConfigFile { file: path, source })?;
    let signals = Signals::install()?;
    let mut run = RunOptions {
        start: opts.resume.map(Start::Choose),
        stop_at: opts.stop_at,
        stop: Some(signals.stop.clone()),
        committer: None,
        data_cache: opts.data_cache.clone(),
        regroup: None,
    };
    // Without a coordinator this run takes no lease on the checkpoint URL: it must not write
    // beside a job that holds one.
    if !matches!(opts.gang, Gang::Coordinated { .. }) {
        let url = config.checkpoint.url.clone();
        let held =
            crate::runtime::io("lease check")?.block_on(lockstep_storage::lease::holder(&url))?;
        if let Some(h) = held {
            return Err(Error::Usage(format!(
                "checkpoint.url `{url}` is in use by {}: a `lockstep train` without a \
                 coordinator must not write beside it (wait for that job, or use another \
                 checkpoint.url)",
                h.describe()
            )));
        }
    }
    let (ring, control) = match &opts.gang {
        Gang::Alone => (None, None),
        Gang::Static { rank, peers } => (Some(static_ring(*rank, peers, &config)?), None),
        Gang::Coordinated {
            url,
            job,
            attempt,
            worker,
        } => {
            let id = Identity {
                url: url.clone(),
                token: std::env::var("LOCKSTEP_TOKEN").map_err(|_| {
                    Error::Usage("--coordinator: the job token must be in LOCKSTEP_TOKEN".into())
                })?,
                job: job.clone(),
                attempt: *attempt,
                worker: *worker,
                patience: config
                    .job
                    .heartbeat_timeout
                    .saturating_mul(2)
                    .clamp(Duration::from_secs(20), Duration::from_secs(600)),
            };
            let (ring, control, start, rejoiner) = join_gang(id, &config, signals.stop.clone())?;
            run.start = Some(start);
            run.committer = Some(control.clone());
            // A gang summed over the ring re-forms in place when it loses a rank; NCCL's
            // communicator cannot take a replacement, so its ranks exit and the gang restarts.
            if !uses_nccl(opts, true) {
                run.regroup = Some(Arc::new(rejoiner));
            }
            (Some(ring), Some(control))
        }
    };
    let mut collective = make_collective(opts, ring, config.job.collective_timeout)?;
    let mut progress = Progress::new(opts.progress_bar);
    let mut on_event = |e: &Event| {
        progress.on(e);
        if let Some(c) = &control {
            c.on_event(e);
        }
    };
    let trained = match opts.device {
        Device::Cpu => {
            use burn::backend::{Autodiff, Flex};
            train::<Autodiff<Flex>>(
                &config,
                &run,
                &Default::default(),
                collective.as_mut(),
                &mut on_event,
            )
        }
        Device::Cuda => train_cuda(
            &config,
            &run,
            opts.cuda_device,
            collective.as_mut(),
            &mut on_event,
        ),
    };
    let summary = match trained {
        // Stopped before the first step (a signal, a cancel): nothing to checkpoint.
        Err(Error::Stopped { what }) => {
            progress.finish();
            eprintln!("stopped while {what}; nothing was trained");
            return Ok(signals.exit_status());
        }
        other => other?,
    };
    progress.finish();
    if control.as_ref().is_some_and(|c| c.orphaned()) {
        // Nobody to report to: say what is left for the coordinator that takes the job over.
        print_summary(&config, &summary);
        let kept = match summary.checkpoints.last() {
            Some(w) if summary.orphaned => format!(
                "rank 0 committed checkpoint {} of the step it stopped at, which a coordinator \
                 taking the job over resumes from",
                w.step
            ),
            _ => "its newest committed checkpoint is where a coordinator taking the job over \
                  resumes"
                .to_string(),
        };
        eprintln!("error: lost the coordinator; {kept}");
        return Ok(1);
    }
    if let Some(c) = &control {
        c.finished(&summary, Duration::from_secs(10))?;
    }
    print_summary(&config, &summary);
    Ok(signals.exit_status())
}

/// SIGTERM and SIGINT: the first asks the loop to checkpoint and stop, a second exits at once.
struct Signals {
    term: Arc<AtomicBool>,
    int: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let s = Signals {
            term: Arc::new(AtomicBool::new(false)),
            int: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let err = |e: std::io::Error| Error::Internal(format!("cannot handle signals: {e}"));
        // A second signal while the first one's checkpoint is being taken exits at once.
        signal_hook::flag::register_conditional_shutdown(SIGTERM, 143, s.stop.clone())
            .map_err(err)?;
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, s.stop.clone())
            .map_err(err)?;
        for (sig, flag) in [(SIGTERM, &s.term), (SIGINT, &s.int)] {
            signal_hook::flag::register(sig, flag.clone()).map_err(err)?;
            signal_hook::flag::register(sig, s.stop.clone()).map_err(err)?;
        }
        Ok(s)
    }

    fn exit_status(&self) -> u8 {
        if self.term.load(Ordering::Relaxed) {
            143
        } else if self.int.load(Ordering::Relaxed) {
            130
        } else {
            0
        }
    }
}

/// The ring of a static gang.
fn static_ring(rank: usize, peers: &[String], config: &JobConfig) -> Result<TcpRing> {
    if peers.len() > 1 && config.checkpoint.url.starts_with("memory:") {
        return Err(Error::Usage(format!(
            "checkpoint.url `{}` lives in one process's memory; the ranks of a gang are \
             separate processes: use a file:// or s3:// URL",
            config.checkpoint.url
        )));
    }
    if peers.len() != config.job.world_size as usize {
        return Err(Error::Usage(format!(
            "--peers lists {} ranks but job.world_size is {}",
            peers.len(),
            config.job.world_size
        )));
    }
    if rank >= peers.len() {
        return Err(Error::Usage(format!(
            "--rank {rank} is outside the {} peers",
            peers.len()
        )));
    }
    // A static gang has no job token: ranks prove they share LOCKSTEP_RING_KEY when it is set
    // (set the same value on every rank), and only that they speak lockstep otherwise.
    let secret = std::env::var("LOCKSTEP_RING_KEY").unwrap_or_default();
    if secret.is_empty() {
        tracing::info!(
            "static gang without LOCKSTEP_RING_KEY: ring connections are not authenticated"
        );
    }
    let key = RingKey::derive(secret.as_bytes(), &format!("static/{}", config.job.name));
    TcpRing::connect(rank, peers, config.job.collective_timeout, &key)
        .map_err(|e| Error::Internal(format!("form the gradient ring as rank {rank}: {e}")))
}

/// Binds a listener for ring peers on `host` (any free port); returns it and its `host:port`.
fn ring_listener(host: &str) -> Result<(std::net::TcpListener, String)> {
    let err = |e: std::io::Error| Error::Internal(format!("listen for ring peers on {host}: {e}"));
    let listener = std::net::TcpListener::bind((host, 0)).map_err(err)?;
    let port = listener.local_addr().map_err(err)?.port();
    Ok((listener, format!("{host}:{port}")))
}

/// Worker mode: connect to the coordinator, listen for ring peers, join the gang, start
/// heartbeats, form the ring. Returns the ring, the control client, where to start (the
/// checkpoint the coordinator chose, or — for a replacement of a lost rank — the state a
/// survivor streams) and how to regroup when the gang loses a rank.
fn join_gang(
    id: Identity,
    config: &JobConfig,
    stop: Arc<AtomicBool>,
) -> Result<(TcpRing, Arc<Control>, Start, Rejoiner)> {
    let (job, attempt, worker) = (id.job.clone(), id.attempt, id.worker);
    // Ranks prove they hold this job's token, for this attempt, when they form the ring.
    let key = RingKey::derive(id.token.as_bytes(), &format!("{job}/{attempt}"));
    let mut control = Control::connect(id)?;
    // The ring listens on LOCKSTEP_DATA_HOST (a pod's IP on Kubernetes), loopback by default.
    let host = std::env::var("LOCKSTEP_DATA_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let (listener, addr) = ring_listener(&host)?;
    let joined = control.join(addr)?;
    tracing::debug!(%job, attempt, worker, "joined");
    if joined.world_size != config.job.world_size {
        return Err(Error::Usage(format!(
            "the coordinator's gang has {} ranks but job.world_size is {}",
            joined.world_size, config.job.world_size
        )));
    }
    let mine = config.results_hash();
    if !joined.config_hash.is_empty() && joined.config_hash != mine {
        return Err(Error::Usage(format!(
            "this worker's config (model, data, train: hash {mine}) differs from the one the \
             coordinator started job {job} with (hash {}): its config file was changed, or the \
             worker runs another lockstep version than the coordinator",
            joined.config_hash
        )));
    }
    let rank = joined.rank as usize;
    let start = match joined.state_from {
        Some(from) if from as usize != rank && (from as usize) < joined.peers.len() => {
            let step = joined.state_step.ok_or_else(|| {
                Error::Internal("the coordinator named no step for the state to take".into())
            })?;
            tracing::info!(
                rank,
                world = joined.world_size,
                from,
                step,
                "joined a running gang as the replacement of a lost rank"
            );
            Start::FromPeer {
                from: from as usize,
                step,
            }
        }
        Some(from) => {
            return Err(Error::Internal(format!(
                "the coordinator named rank {from} to send this new rank {rank} its state"
            )));
        }
        None => {
            tracing::info!(rank, world = joined.world_size, resume = ?joined.resume_step, "joined the gang");
            Start::Given(joined.resume_step)
        }
    };
    let hb = (config.job.heartbeat_timeout / 5)
        .clamp(Duration::from_millis(100), Duration::from_secs(2));
    // Losing the coordinator leaves the gang this long to finish its step and checkpoint it.
    let orphan_deadline = config
        .job
        .collective_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(120));
    control.start_heartbeat(hb, stop, orphan_deadline);
    let ring = TcpRing::with_listener(
        listener,
        rank,
        &joined.peers,
        config.job.collective_timeout,
        &key,
    )
    .map_err(|e| Error::Internal(format!("form the gradient ring as rank {rank}: {e}")))?;
    let control = Arc::new(control);
    let rejoiner = Rejoiner {
        control: control.clone(),
        host,
        key,
        rank,
        timeout: config.job.collective_timeout,
        generation: std::sync::Mutex::new(joined.generation),
    };
    Ok((ring, control, start, rejoiner))
}

/// Regroups through the coordinator ([`crate::recovery::Regroup`]): a new listener, a `Join`
/// that says which state this rank holds, then the new ring.
struct Rejoiner {
    control: Arc<Control>,
    host: String,
    key: RingKey,
    rank: usize,
    timeout: Duration,
    /// The ring generation this rank is in.
    generation: std::sync::Mutex<u32>,
}

impl std::fmt::Debug for Rejoiner {
    // Not the ring key: it is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejoiner")
            .field("rank", &self.rank)
            .field("host", &self.host)
            .finish()
    }
}

impl crate::recovery::Regroup for Rejoiner {
    fn regroup(&self, holds_step: u64) -> Result<crate::recovery::Reunion> {
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let (listener, addr) = ring_listener(&self.host)?;
        let joined = self.control.rejoin(addr, holds_step, *generation)?;
        if let Some(step) = joined.emergency_step {
            tracing::warn!(
                rank = self.rank,
                step,
                writers = ?joined.emergency_writers,
                "the gang cannot re-form in place: emergency checkpoint"
            );
            return Ok(crate::recovery::Reunion::Emergency(
                crate::recovery::Emergency {
                    step,
                    writers: joined.emergency_writers,
                },
            ));
        }
        let from = joined
            .state_from
            .map(|f| f as usize)
            .filter(|&f| f < joined.peers.len())
            .ok_or_else(|| {
                Error::Internal("the re-formed gang names no rank to take the state from".into())
            })?;
        let step = joined.state_step.ok_or_else(|| {
            Error::Internal("the re-formed gang names no step for the state to take".into())
        })?;
        if joined.generation <= *generation {
            return Err(Error::Internal(format!(
                "the coordinator re-formed the gang as ring {}, not after ring {}",
                joined.generation, *generation
            )));
        }
        *generation = joined.generation;
        let ring_generation = joined.generation;
        let control = &self.control;
        let abandon = move || {
            control.told_to_leave(ring_generation).then(|| {
                format!("the coordinator says ring {ring_generation} lost a member as it formed")
            })
        };
        let ring = TcpRing::with_listener_unless(
            listener,
            self.rank,
            &joined.peers,
            self.timeout,
            &self.key,
            &abandon,
        )
        // A member lost while the ring re-forms (the replacement died): regroup again
        // (bounded by MAX_REGROUPS), so the coordinator can still take this rank's
        // state as an emergency checkpoint.
        .map_err(|e| Error::Regrouping {
            what: format!("re-form the gradient ring as rank {}: {e}", self.rank),
        })?;
        tracing::info!(
            rank = self.rank,
            generation = *generation,
            from,
            step,
            "the gang re-formed"
        );
        Ok(crate::recovery::Reunion::Reformed(
            crate::recovery::Regrouped { ring, from, step },
        ))
    }
}

/// The gang's collective: nothing alone, the ring on CPU, NCCL (bootstrapped over the ring) on
/// CUDA.
fn make_collective(
    opts: &Options,
    ring: Option<TcpRing>,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    if opts.collective == CollectiveKind::Nccl && opts.device != Device::Cuda {
        return Err(Error::Usage("--collective nccl needs --device cuda".into()));
    }
    if uses_nccl(opts, ring.is_some()) {
        return make_nccl(
            ring.unwrap_or_else(|| TcpRing::alone(timeout)),
            opts.cuda_device,
            timeout,
        );
    }
    Ok(match ring {
        Some(ring) => Box::new(ring),
        None => Box::new(Solo),
    })
}

/// Whether gradients go through NCCL (`gang`: this rank has peers).
fn uses_nccl(opts: &Options, gang: bool) -> bool {
    match opts.collective {
        CollectiveKind::Ring => false,
        CollectiveKind::Nccl => true,
        CollectiveKind::Auto => opts.device == Device::Cuda && gang,
    }
}

#[cfg(feature = "cuda")]
fn make_nccl(ring: TcpRing, ordinal: usize, timeout: Duration) -> Result<Box<dyn Collective>> {
    let rank = ring.rank();
    let nccl = crate::collective::Nccl::new(ring, ordinal, timeout)
        .map_err(|e| Error::Internal(format!("form the NCCL communicator as rank {rank}: {e}")))?;
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "cuda"))]
fn make_nccl(_: TcpRing, _: usize, _: Duration) -> Result<Box<dyn Collective>> {
    Err(Error::Usage(
        "NCCL: this lockstep was built without the `cuda` feature".into(),
    ))
}

#[cfg(feature = "cuda")]
fn train_cuda(
    config: &JobConfig,
    opts: &RunOptions,
    ordinal: usize,
    collective: &mut dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary> {
    use burn::backend::{Autodiff, Cuda, cuda::CudaDevice};
    train::<Autodiff<Cuda>>(
        config,
        opts,
        &CudaDevice::new(ordinal),
        collective,
        on_event,
    )
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(
    _: &JobConfig,
    _: &RunOptions,
    _: usize,
    _: &mut dyn Collective,
    _: &mut dyn FnMut(&Event),
) -> Result<Summary> {
    Err(Error::Usage(
        "--device cuda: this lockstep was built without the `cuda` feature".into(),
    ))
}
