//! `lockstep`: the one binary. It parses arguments and dispatches to the command's home under
//! [`cmd`]; `train` reaches the trainer library (Burn), the others the coordinator library
//! (no Burn). Nothing else lives here.

mod alloc;
mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// lockstep — distributed training and checkpoint runtime.
///
/// Start with `lockstep run configs/quickstart.toml`: it fine-tunes a small Llama model on this
/// machine with two data-parallel ranks, checkpoints, and replaces a rank that dies.
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
    Run(cmd::run::RunArgs),
    Serve(cmd::serve::ServeArgs),
    Submit(cmd::client::SubmitArgs),
    Status(cmd::client::StatusArgs),
    Watch(cmd::client::WatchArgs),
    Cancel(cmd::client::CancelArgs),
    /// Inspect, verify and garbage-collect checkpoints.
    #[command(subcommand)]
    Ckpt(cmd::ckpt::CkptCommand),
    /// Print the LockstepJob CustomResourceDefinition (`lockstep crd | kubectl apply -f -`).
    Crd,
    Render(cmd::kube::RenderArgs),
    Train(cmd::train::TrainArgs),
    Plan(cmd::plan::PlanArgs),
    Export(cmd::export::ExportArgs),
    /// Look at a job's training data as training sees it (`data preview`).
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
}

fn main() -> ExitCode {
    alloc::fit_address_space_limit();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // `ckpt` documents 2 for "cannot read"; the job commands use 1 for every failure.
    match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Data(args) => cmd::data::run(args),
        Command::Ckpt(args) => cmd::ckpt::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Run(args) => cmd::block_on(1, cmd::run::run(args)),
        Command::Submit(args) => cmd::client::run_submit(args),
        Command::Status(args) => cmd::block_on(1, cmd::client::status(args)),
        Command::Watch(args) => cmd::block_on(1, cmd::client::watch(args)),
        Command::Cancel(args) => cmd::block_on(1, cmd::client::cancel(args)),
        Command::Crd => cmd::block_on(1, async { cmd::kube::crd() }),
        Command::Render(args) => cmd::block_on(1, async move { cmd::kube::render(args) }),
    }
}

/// The one tracing initialisation: stderr, LOCKSTEP_LOG (default `warn`).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only for a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
