//! `lockstep-trainer`: one rank of a lockstep job. Run standalone (`--config x.toml`) it trains
//! at world size 1 with a progress bar and commits its own checkpoints.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::{JobConfig, Resume};
use lockstep_trainer::control::{Control, Identity};
use lockstep_trainer::train::{Event, RunOptions, Summary, train};
use lockstep_trainer::{Collective, Solo, TcpRing};

/// Writes a line to stderr; a closed stderr (the reader went away) must not kill training.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// mimalloc: the training step allocates and frees many large tensors; glibc's allocator returns
/// them to the kernel and pays fresh page faults each step.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// lockstep-trainer — fine-tune a Llama model, one rank of a lockstep job.
///
/// Alone it trains the job in CONFIG at world size 1; with --rank and --peers it is one rank of
/// a data-parallel gang whose gradients are summed over a TCP ring. It loads the base model (or
/// initialises one), reads and packs the data, resumes from the newest committed checkpoint
/// under checkpoint.url when there is one (checkpoint.resume), and checkpoints every
/// checkpoint.every_steps steps and at the end. SIGINT or SIGTERM checkpoints the current step
/// and exits (status 130 / 143); a second signal exits at once. Running the same command again
/// continues from the newest checkpoint, bit-identically.
///
/// Exit status: 0 done; 1 error (the message names the field, file or checkpoint at fault);
/// 2 bad command line; 130 / 143 stopped by SIGINT / SIGTERM after checkpointing.
#[derive(Debug, Parser)]
#[command(name = "lockstep-trainer", version, about, long_about)]
struct Cli {
    /// The job config (TOML).
    #[arg(long, short)]
    config: std::path::PathBuf,
    /// Override a config field: `--set train.steps=20` (repeatable; values in TOML syntax or
    /// bare strings).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Where to start: `latest`, `none` or a step number (default: checkpoint.resume).
    #[arg(long)]
    resume: Option<String>,
    /// Stop after this step, checkpointing it; the LR schedule still spans train.steps.
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// This process's rank in a data-parallel gang (with --peers).
    #[arg(long, env = "LOCKSTEP_RANK", requires = "peers")]
    rank: Option<usize>,
    /// Every rank's `host:port` for the gradient ring, in rank order, comma-separated; this
    /// rank listens on its own entry. Their number must equal job.world_size. Without it the
    /// trainer runs alone (world size 1).
    #[arg(long, env = "LOCKSTEP_PEERS", value_delimiter = ',', requires = "rank")]
    peers: Vec<String>,
    /// Run as a worker of a coordinator at this gRPC URL (set by `lockstep run`/`serve`; the
    /// job token comes in LOCKSTEP_TOKEN). The worker joins the gang, gets its rank and peers,
    /// starts from the checkpoint the coordinator names, and reports its checkpoint shards to
    /// it for commit.
    #[arg(long, value_name = "URL", requires_all = ["job", "attempt", "worker"], conflicts_with_all = ["rank", "resume"])]
    coordinator: Option<String>,
    /// The job id (with --coordinator).
    #[arg(long)]
    job: Option<String>,
    /// The attempt (with --coordinator).
    #[arg(long)]
    attempt: Option<u32>,
    /// This worker's index in the attempt (with --coordinator).
    #[arg(long)]
    worker: Option<u32>,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// How gradients are summed across ranks: `auto` is NCCL with --device cuda in a gang and
    /// the TCP ring otherwise; `nccl` forces NCCL (also alone, as a smoke test of the GPU path).
    #[arg(long, value_enum, default_value_t = CollectiveKind::Auto)]
    collective: CollectiveKind,
    /// CUDA device ordinal of this rank (with --device cuda).
    #[arg(long, env = "LOCKSTEP_CUDA_DEVICE", default_value_t = 0)]
    cuda_device: usize,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Progress as log lines instead of a bar (the default when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceKind {
    /// Burn's flex CPU backend (all cores).
    Cpu,
    /// A CUDA GPU, --cuda-device (needs a build with `--features cuda`).
    Cuda,
}

/// The ring from --rank/--peers, or none when running alone.
fn ring_from_peers(cli: &Cli, config: &JobConfig) -> anyhow::Result<Option<TcpRing>> {
    Ok(match cli.rank {
        Some(rank) if !cli.peers.is_empty() => {
            if cli.peers.len() != config.job.world_size as usize {
                anyhow::bail!(
                    "--peers lists {} ranks but job.world_size is {}",
                    cli.peers.len(),
                    config.job.world_size
                );
            }
            if rank >= cli.peers.len() {
                anyhow::bail!("--rank {rank} is outside the {} peers", cli.peers.len());
            }
            let ring = TcpRing::connect(rank, &cli.peers, config.job.collective_timeout)
                .with_context(|| format!("form the gradient ring as rank {rank}"))?;
            Some(ring)
        }
        _ => None,
    })
}

/// Worker mode: connect to the coordinator, listen for ring peers, join the gang, form the
/// ring, start heartbeats. Returns the ring, the control client and the checkpoint the
/// coordinator chose.
fn join_gang(
    cli: &Cli,
    url: &str,
    config: &JobConfig,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(TcpRing, Arc<Control>, Resume)> {
    let (Some(job), Some(attempt), Some(worker)) = (&cli.job, cli.attempt, cli.worker) else {
        anyhow::bail!("--coordinator needs --job, --attempt and --worker");
    };
    let token = std::env::var("LOCKSTEP_TOKEN")
        .context("--coordinator: the job token must be in LOCKSTEP_TOKEN")?;
    let mut control = Control::connect(Identity {
        url: url.to_string(),
        token,
        job: job.clone(),
        attempt,
        worker,
    })?;
    // The ring listens on LOCKSTEP_DATA_HOST (a pod's IP on Kubernetes), loopback by default.
    let host = std::env::var("LOCKSTEP_DATA_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = std::net::TcpListener::bind((host.as_str(), 0))
        .with_context(|| format!("listen for ring peers on {host}"))?;
    let addr = listener.local_addr()?;
    let joined = control
        .join(format!("{host}:{}", addr.port()))
        .with_context(|| format!("join job {job} attempt {attempt} as worker {worker}"))?;
    if joined.world_size != config.job.world_size {
        anyhow::bail!(
            "the coordinator's gang has {} ranks but job.world_size is {}",
            joined.world_size,
            config.job.world_size
        );
    }
    let rank = joined.rank as usize;
    tracing::info!(rank, world = joined.world_size, resume = ?joined.resume_step, "joined the gang");
    let hb = (config.job.heartbeat_timeout / 5)
        .clamp(Duration::from_millis(100), Duration::from_secs(2));
    control.start_heartbeat(hb, stop);
    let ring = TcpRing::with_listener(listener, rank, &joined.peers, config.job.collective_timeout)
        .with_context(|| format!("form the gradient ring as rank {rank}"))?;
    let resume = match joined.resume_step {
        Some(step) => Resume::Step(step),
        None => Resume::Fresh,
    };
    Ok((ring, Arc::new(control), resume))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CollectiveKind {
    /// NCCL for a CUDA gang, the TCP ring otherwise.
    Auto,
    /// The TCP ring (host buffers).
    Ring,
    /// NCCL (needs --device cuda and a build with `--features cuda`).
    Nccl,
}

/// The gang's collective: nothing alone, the ring on CPU, NCCL (bootstrapped over the ring)
/// on CUDA.
fn make_collective(
    cli: &Cli,
    ring: Option<TcpRing>,
    timeout: Duration,
) -> anyhow::Result<Box<dyn Collective>> {
    let nccl = match cli.collective {
        CollectiveKind::Ring => false,
        CollectiveKind::Nccl => {
            if cli.device != DeviceKind::Cuda {
                anyhow::bail!("--collective nccl needs --device cuda");
            }
            true
        }
        CollectiveKind::Auto => cli.device == DeviceKind::Cuda && ring.is_some(),
    };
    if nccl {
        return make_nccl(
            ring.unwrap_or_else(|| TcpRing::alone(timeout)),
            cli.cuda_device,
            timeout,
        );
    }
    Ok(match ring {
        Some(ring) => Box::new(ring),
        None => Box::new(Solo),
    })
}

#[cfg(feature = "cuda")]
fn make_nccl(
    ring: TcpRing,
    ordinal: usize,
    timeout: Duration,
) -> anyhow::Result<Box<dyn Collective>> {
    let rank = ring.rank();
    let nccl = lockstep_trainer::Nccl::new(ring, ordinal, timeout)
        .with_context(|| format!("form the NCCL communicator as rank {rank}"))?;
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "cuda"))]
fn make_nccl(_: TcpRing, _: usize, _: Duration) -> anyhow::Result<Box<dyn Collective>> {
    anyhow::bail!("NCCL: this lockstep-trainer was built without the `cuda` feature")
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            say!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&cli.config)
        .with_context(|| format!("read config {}", cli.config.display()))?;
    let config = JobConfig::parse(&text, &cli.set)
        .with_context(|| format!("config {}", cli.config.display()))?;
    let resume = match &cli.resume {
        Some(r) => Some(Resume::parse(r).with_context(|| {
            format!("--resume {r}: expected `latest`, `none` or a step number")
        })?),
        None => None,
    };
    let term = Arc::new(AtomicBool::new(false));
    let int = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // A second signal while the first one's checkpoint is being taken exits at once.
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGTERM,
        143,
        stop.clone(),
    )?;
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        stop.clone(),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, int.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let mut opts = RunOptions {
        resume,
        stop_at: cli.stop_at,
        stop: Some(stop.clone()),
        committer: None,
    };
    let (ring, control) = match &cli.coordinator {
        Some(url) => {
            let (ring, control, resume) = join_gang(cli, url, &config, stop)?;
            opts.resume = Some(resume);
            opts.committer = Some(control.clone());
            (Some(ring), Some(control))
        }
        None => (ring_from_peers(cli, &config)?, None),
    };
    let mut collective = make_collective(cli, ring, config.job.collective_timeout)?;
    let mut progress = Progress::new(!cli.no_progress && std::io::stderr().is_terminal());
    let mut on_event = |e: &Event| {
        progress.on(e);
        if let Some(c) = &control {
            c.on_event(e);
        }
    };
    let summary = match cli.device {
        DeviceKind::Cpu => {
            use burn::backend::{Autodiff, Flex};
            train::<Autodiff<Flex>>(
                &config,
                &opts,
                &Default::default(),
                collective.as_mut(),
                &mut on_event,
            )?
        }
        DeviceKind::Cuda => train_cuda(
            &config,
            &opts,
            cli.cuda_device,
            collective.as_mut(),
            &mut on_event,
        )?,
    };
    progress.finish();
    if let Some(c) = &control {
        c.finished(&summary, Duration::from_secs(10))?;
    }
    print_summary(&config, &summary);
    Ok(if term.load(Ordering::Relaxed) {
        ExitCode::from(143)
    } else if int.load(Ordering::Relaxed) {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(feature = "cuda")]
fn train_cuda(
    config: &JobConfig,
    opts: &RunOptions,
    ordinal: usize,
    collective: &mut dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> anyhow::Result<Summary> {
    use burn::backend::{Autodiff, Cuda, cuda::CudaDevice};
    Ok(train::<Autodiff<Cuda>>(
        config,
        opts,
        &CudaDevice::new(ordinal),
        collective,
        on_event,
    )?)
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(
    _: &JobConfig,
    _: &RunOptions,
    _: usize,
    _: &mut dyn Collective,
    _: &mut dyn FnMut(&Event),
) -> anyhow::Result<Summary> {
    anyhow::bail!("--device cuda: this lockstep-trainer was built without the `cuda` feature")
}

/// The progress bar (or, without a terminal, a log line every tenth of the run).
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    ema_step: Option<f64>,
    last_ckpt: Option<u64>,
}

impl Progress {
    fn new(bar: bool) -> Progress {
        Progress {
            bar: bar.then(ProgressBar::hidden),
            total: 0,
            every: 1,
            ema_step: None,
            last_ckpt: None,
        }
    }

    fn on(&mut self, e: &Event) {
        match e {
            Event::Started {
                params,
                docs,
                data_tokens,
                skipped,
                from_step,
                total_steps,
            } => {
                self.total = *total_steps;
                self.every = (total_steps / 10).max(1);
                let from = if *from_step > 0 {
                    format!("resuming from step {from_step}")
                } else {
                    "starting from step 0".into()
                };
                let skipped = if *skipped > 0 {
                    format!(" ({skipped} bad records skipped)")
                } else {
                    String::new()
                };
                say!(
                    "model: {:.2}M parameters; data: {docs} documents, {data_tokens} tokens{skipped}; {from} of {total_steps}",
                    *params as f64 / 1e6
                );
                if let Some(bar) = &self.bar {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    bar.set_length(*total_steps);
                    bar.set_position(*from_step);
                    if let Ok(style) = ProgressStyle::with_template(
                        "{bar:30.cyan/blue} step {pos}/{len} {msg} ETA {eta}",
                    ) {
                        bar.set_style(style);
                    }
                }
            }
            Event::SkippedCheckpoint { step, reason } => {
                tracing::warn!(step, %reason, "checkpoint failed verification; deleting it and resuming from an older one");
            }
            Event::Step {
                step,
                loss,
                lr,
                tokens_per_sec,
                elapsed,
                ..
            } => {
                tracing::info!(step, loss, lr, tokens_per_sec, "step");
                let s = elapsed.as_secs_f64();
                let ema = self.ema_step.map_or(s, |e| 0.9 * e + 0.1 * s);
                self.ema_step = Some(ema);
                let ckpt = self
                    .last_ckpt
                    .map(|c| format!(" ckpt {c}"))
                    .unwrap_or_default();
                let msg = format!("loss {loss:.4} lr {lr:.2e} {tokens_per_sec:.0} tok/s{ckpt}");
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(*step);
                        bar.set_message(msg);
                    }
                    None if step.is_multiple_of(self.every) || *step == self.total => {
                        let eta = Duration::from_secs_f64(ema * (self.total - step) as f64);
                        say!(
                            "step {step}/{} {msg} ETA {}",
                            self.total,
                            humantime::format_duration(Duration::from_secs(eta.as_secs()))
                        );
                    }
                    None => {}
                }
            }
            Event::CheckpointStarted {
                step,
                stall,
                waited,
            } => {
                tracing::info!(
                    step,
                    stall_ms = stall.as_secs_f64() * 1e3,
                    waited_ms = waited.as_secs_f64() * 1e3,
                    "checkpoint snapshot taken"
                );
            }
            Event::CheckpointCommitted(w) => {
                self.last_ckpt = Some(w.step);
                tracing::info!(
                    step = w.step,
                    bytes = w.bytes,
                    secs = w.elapsed.as_secs_f64(),
                    "checkpoint committed"
                );
                if self.bar.is_none() {
                    say!(
                        "checkpoint step {} committed: {:.1} MB in {:.2} s",
                        w.step,
                        w.bytes as f64 / 1e6,
                        w.elapsed.as_secs_f64()
                    );
                }
            }
        }
    }

    /// Leaves the bar at the step reached (a stopped run is not drawn as complete).
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
            say!();
        }
    }
}

fn print_summary(config: &JobConfig, s: &Summary) {
    if s.first_loss.is_none() && s.step >= config.train.steps {
        println!(
            "nothing to do: the checkpoint under {} is already at step {} of {}",
            config.checkpoint.url, s.step, config.train.steps
        );
        return;
    }
    let loss = match (s.first_loss, s.last_loss) {
        (Some(a), Some(b)) => format!("loss {a:.4} → {b:.4}"),
        _ => "no steps run".into(),
    };
    let end = if s.stopped_early {
        format!("stopped at step {} of {}", s.step, config.train.steps)
    } else {
        format!("finished at step {}", s.step)
    };
    let ckpt = s
        .checkpoints
        .last()
        .map(|w| {
            format!(
                "last checkpoint: step {} under {}",
                w.step, config.checkpoint.url
            )
        })
        .unwrap_or_else(|| "no checkpoint written".into());
    println!(
        "{end}: {loss}; {:.0} tokens/s; snapshot stall max {:.1} ms; {ckpt}; params xxh3 {}",
        s.tokens_per_sec,
        s.max_stall.as_secs_f64() * 1e3,
        s.params_hash
    );
}

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
