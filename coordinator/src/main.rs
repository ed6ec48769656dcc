//! `lockstep`: the user's command-line tool.

mod ckpt;
mod jobs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed memory for reuse instead of returning it to the kernel: checkpoint IO
/// allocates and frees tens of MiB per chunk batch, and with glibc every batch paid fresh page
/// faults. Loading 1.17 GB went from 0.66 s to 0.38 s (benchmarks/README.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// lockstep — distributed training and checkpoint runtime.
///
/// Checkpoint URLs are `file://PATH` (relative paths resolve against the working directory;
/// NFS is a path), `s3://BUCKET/PREFIX` (credentials, region and endpoint from the usual
/// AWS_* environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT,
/// AWS_ALLOW_HTTP) or `memory://`.
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
    /// Run a job on this machine: a coordinator in this process launches job.world_size
    /// local `lockstep-trainer` ranks, restarts the whole gang from the newest committed
    /// checkpoint when a rank dies or hangs, and shows progress until the job ends. Exit
    /// status 0 when it succeeds, 1 when it fails, 130 when interrupted (the gang is torn down;
    /// running it again resumes from the newest checkpoint).
    Run(jobs::RunArgs),
    /// Run the coordinator service: jobs are submitted to it (`lockstep submit`) and kept in
    /// DATA_DIR/jobs.redb, so a restarted coordinator resumes every live job.
    Serve(jobs::ServeArgs),
    /// Submit a job to a running coordinator; prints its id.
    Submit {
        /// The job config (TOML).
        config: std::path::PathBuf,
        /// Override a config field (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Watch it until it ends.
        #[arg(long)]
        watch: bool,
        /// JSON lines instead of a progress bar (with --watch).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: jobs::ClientArgs,
    },
    /// Show one job, or every job.
    Status {
        /// The job id (default: all jobs).
        job: Option<String>,
        /// One JSON object per job.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: jobs::ClientArgs,
    },
    /// Follow a job until it ends (progress bar, then a summary); exit status as `run`.
    Watch {
        /// The job id.
        job: String,
        /// JSON lines instead of a progress bar.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: jobs::ClientArgs,
    },
    /// Cancel a job: its workers are killed and it ends Cancelled.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        client: jobs::ClientArgs,
    },
    /// Inspect, verify and garbage-collect checkpoints.
    #[command(subcommand)]
    Ckpt(ckpt::CkptCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // `ckpt` documents 2 for "cannot read"; the job commands use 1 for every failure.
    let error_code = if matches!(cli.command, Command::Ckpt(_)) {
        2
    } else {
        1
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Ckpt(cmd) => ckpt::run(cmd, &mut std::io::stdout().lock()).await,
            Command::Run(args) => jobs::run(args).await,
            Command::Serve(args) => jobs::serve(args).await,
            Command::Submit {
                config,
                set,
                watch,
                json,
                client,
            } => jobs::submit(&config, set, watch, json, &client).await,
            Command::Status { job, json, client } => jobs::status(job, json, &client).await,
            Command::Watch { job, json, client } => jobs::watch_job(&job, json, &client).await,
            Command::Cancel { job, client } => jobs::cancel(&job, &client).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(error_code)
        }
    }
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
