//! `lockstep plan`: how much memory one rank of a job needs, and whether it fits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use lockstep_api::memory::{self, MemoryPlan, Target};

use super::{CliError, Result};

/// Print one rank's memory — weights, gradients, optimizer state, activations of
/// train.batch_size × data.seq_len tokens, with [lora] and train.precision taken into account —
/// and a total, then whether it fits: per rank in --device-memory, or (without it) all
/// job.world_size ranks in this machine's available memory, as `lockstep run` would place
/// them. A Hugging Face base model is sized by its config.json. The coordinator makes the same
/// check before it launches a job. The figures are estimates fitted to measured peak memory on
/// CPUs (within about 15 %); on GPUs they are not yet measured. Exit status: 0 fits, 1 does not
/// fit (the message names the figures and what would make it fit), 2 bad command line or
/// config.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The job config (TOML).
    config: PathBuf,
    /// Override a config field: `--set train.batch_size=4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// What the ranks run on (default: gpu with --device-memory, else cpu).
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Memory of the device each rank has to itself: `80GB`, `24GiB`, `512MiB`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    device_memory: Option<u64>,
    /// One JSON object: the figures in bytes and whether it fits.
    #[arg(long)]
    json: bool,
    /// What `{date}` in the config becomes (YYYY-MM-DD; default: today, UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    date: Option<String>,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    /// Host memory: the process, the model, activations, checkpoint copies.
    Cpu,
    /// GPU memory: the model, activations, the CUDA context.
    Gpu,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    memory::parse_size(s)
}

/// Exit status 0 fits, 1 does not, 2 bad config.
pub fn run(args: PlanArgs) -> ExitCode {
    super::block_on(2, plan(args))
}

async fn plan(args: PlanArgs) -> Result {
    let loaded = super::load(&args.config, &args.set, args.date.as_deref())?;
    let mut config = loaded.config;
    let workdir = std::env::current_dir().map_err(|e| CliError::Io {
        op: "read the working directory",
        path: ".".into(),
        source: e,
    })?;
    // A Hugging Face base: its config.json says the architecture, not [model].
    let mut sized_by = "[model]".to_string();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    match lockstep_coordinator::preflight::base_architecture(&config, &workdir, deadline).await {
        Ok(Some(sized)) => {
            // And everything else training checks of it (RoPE scaling, biases…).
            if let lockstep_api::BaseModel::Dir(dir) = &config.model.base {
                let url = format!(
                    "{}/config.json",
                    lockstep_coordinator::record::resolve_url(
                        &lockstep_api::base::as_url(dir),
                        &workdir
                    )
                );
                let bytes = lockstep_storage::objects::read_url(&url).await?;
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    CliError::Usage(format!("model.base `{dir}`: config.json: not UTF-8"))
                })?;
                lockstep_trainer::model::LlamaConfig::parse(text, &url)
                    .map_err(|e| CliError::Usage(format!("model.base `{dir}`: {e}")))?;
            }
            sized_by = format!("model.base {}'s config.json", config.model.base);
            config = sized;
        }
        Ok(None) => {}
        Err(e) => return Err(CliError::Usage(e.why)),
    }
    if let Some(lora) = &config.lora {
        memory::Shape::of(&config)
            .check_lora(lora)
            .map_err(CliError::Usage)?;
    }
    let device = args.device.unwrap_or(if args.device_memory.is_some() {
        Device::Gpu
    } else {
        Device::Cpu
    });
    let target = match device {
        Device::Cpu => Target::Cpu,
        Device::Gpu => Target::Gpu,
    };
    let p = MemoryPlan::of(&config, target);
    let world = u64::from(config.job.world_size);
    // Where the ranks run and how much each may have.
    let (available, place) = match (args.device_memory, device) {
        (Some(m), Device::Gpu) => (m, "this GPU".to_string()),
        (Some(m), Device::Cpu) => (m, "each rank's machine".to_string()),
        (None, Device::Gpu) => {
            return Err(CliError::Usage(
                "--device gpu needs --device-memory (e.g. 80GB): lockstep cannot ask a GPU \
                 it is not running on"
                    .into(),
            ));
        }
        (None, Device::Cpu) => {
            let Some(free) = lockstep_coordinator::launcher::mem_available() else {
                return Err(CliError::Usage(
                    "cannot read this machine's available memory (/proc/meminfo): give \
                     --device-memory"
                        .into(),
                ));
            };
            (
                free / world.max(1),
                format!(
                    "this machine ({} available, shared by job.world_size = {world} ranks)",
                    memory::bytes(free)
                ),
            )
        }
    };
    let refusal = p.refusal(&config, available, &place);
    if args.json {
        let line = |name: &str| p.lines().iter().find(|l| l.0 == name).map_or(0, |l| l.1);
        println!(
            "{}",
            serde_json::json!({
                "device": match device { Device::Cpu => "cpu", Device::Gpu => "gpu" },
                "sized_by": sized_by,
                "params": p.params,
                "trained_params": p.trained,
                "tokens_per_micro_batch": p.tokens,
                "precision": config.train.precision.as_str(),
                "weights": p.weights,
                "gradients": p.gradients,
                "optimizer": p.optimizer,
                "activations": p.activations,
                "checkpoint": line("checkpoint"),
                "loading": p.loading,
                "runtime": p.runtime,
                "total": p.total,
                "available_per_rank": available,
                "fits": refusal.is_none(),
                "reason": refusal,
            })
        );
    } else {
        println!(
            "{} per rank on {} ({}, sized by {sized_by}; train.precision = \"{}\"):",
            config.job.name,
            match device {
                Device::Cpu => "a CPU",
                Device::Gpu => "a GPU",
            },
            match &config.lora {
                Some(l) => format!("LoRA r = {}", l.r),
                None => "full fine-tune".into(),
            },
            config.train.precision.as_str(),
        );
        for (name, value, note) in p.lines() {
            println!("  {name:<12} {:>10}   {note}", memory::bytes(value));
        }
        match &refusal {
            None => println!(
                "fits: {} available per rank on {place}",
                memory::bytes(available)
            ),
            Some(why) => eprintln!("does not fit: {why}"),
        }
    }
    Ok(if refusal.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
