//! `lockstep export` and `lockstep export ls`: what they print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use lockstep_trainer::export::{self, Promotion, Request};
use lockstep_trainer::model::hf::WeightDtype;

use super::{CliError, Result};

/// Export a checkpoint as a Hugging Face model directory (model.safetensors, config.json,
/// generation_config.json, the base's tokenizer files, lockstep.json with the lineage and every
/// file's sha256) to TO/NAME/VERSION/, and with --promote move TO/NAME/latest.json to it
/// (compare-and-swap) unless its eval loss is worse than the promoted version's by more than
/// --max-eval-regression. `lockstep export ls TO/NAME` lists the versions.
///
/// Exporting the same weights to the same version again writes no file (a webhook notice an
/// earlier export of it owes is delivered); other weights to an existing version are refused.
/// Exit status 0 exported (promoted or not: the line says which and why), 1 error.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ExportArgs {
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
    /// Weight dtype of model.safetensors (or adapter_model.safetensors).
    #[arg(long, value_enum, default_value_t = ExportDtype::F32)]
    dtype: ExportDtype,
    /// For a LoRA checkpoint: `merge` writes the base with the adapters merged in (a plain
    /// Hugging Face model; the base is read again and must be the one trained on), `adapter`
    /// a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
    /// `peft.PeftModel.from_pretrained(base, dir)` loads.
    #[arg(long, value_enum, default_value_t = ExportLora::Merge)]
    lora: ExportLora,
    /// A Hugging Face directory or URL whose tokenizer files go with the export (the job's
    /// model.base); for a LoRA checkpoint also the base merged into (by default the one the
    /// checkpoint says it was trained on; its model.safetensors must have the same sha256).
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
    /// marks the promoted one), and what is damaged: a version whose lockstep.json cannot be
    /// read, a promoted version that is missing or lacks a file, an unreadable latest.json or
    /// one naming no valid version. Exits 1 when anything is damaged, or when nothing at all
    /// is stored under URL (a mistyped name).
    Ls {
        /// The lineage: TO/NAME, e.g. file://runs/quickstart/export/quickstart.
        url: String,
        /// One JSON object per version.
        #[arg(long)]
        json: bool,
    },
}

/// How a LoRA checkpoint is exported.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportLora {
    /// The base with the adapters merged in.
    Merge,
    /// A PEFT adapter directory.
    Adapter,
}

/// The dtype of the exported weights.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportDtype {
    /// 32-bit floats: the trained weights exactly.
    F32,
    /// bfloat16: half the size, what serving usually loads.
    Bf16,
}

/// Exit status 0 exported (or listed), 1 error, 2 a bad `--lineage`.
pub fn run(args: ExportArgs) -> ExitCode {
    let lineage = match args.lineage.as_deref().map(parse_lineage).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    super::block_on(1, async move {
        match (args.list, args.checkpoint, args.to) {
            (Some(ExportList::Ls { url, json }), _, _) => list(&url, json).await,
            (None, Some(checkpoint), Some(to)) => {
                let req = Request {
                    checkpoint,
                    name: args.name,
                    version: args.version,
                    dtype: match args.dtype {
                        ExportDtype::F32 => WeightDtype::F32,
                        ExportDtype::Bf16 => WeightDtype::Bf16,
                    },
                    base: args.base,
                    lora: match args.lora {
                        ExportLora::Merge => export::LoraExport::Merge,
                        ExportLora::Adapter => export::LoraExport::Adapter,
                    },
                    promote: args.promote,
                    max_eval_regression: args.max_eval_regression,
                    lineage,
                    webhook: args.webhook,
                };
                write(&req, &to, args.json, args.result_file.as_deref()).await
            }
            // clap requires both without a subcommand.
            _ => Err(CliError::Usage(
                "give a checkpoint and --to, or `export ls URL`".into(),
            )),
        }
    })
}

/// `lockstep export`: exports, prints what happened (a line, or JSON).
async fn write(req: &Request, to: &str, json: bool, result_file: Option<&Path>) -> Result {
    if let Some(url) = &req.webhook {
        lockstep_trainer::webhook::check_url(url).map_err(CliError::Usage)?;
    }
    if !req.max_eval_regression.is_finite() || req.max_eval_regression < 0.0 {
        return Err(CliError::Usage(format!(
            "--max-eval-regression {}: must be a finite number ≥ 0",
            req.max_eval_regression
        )));
    }
    let out = export::export(req, to, None).await?;
    let (promoted, mut note) = match &out.promotion {
        Promotion::NotAsked => (false, "not promoted (no --promote)".to_string()),
        Promotion::Promoted { replaced: None } => (true, "promoted (the first)".into()),
        Promotion::Promoted { replaced: Some(r) } => (true, format!("promoted, replacing {r}")),
        Promotion::Kept { reason } => (false, format!("kept, not promoted: {reason}")),
        Promotion::AlreadyExported { promoted: true } if out.written => (
            true,
            "files written again (the version had no lockstep.json: removed or unfinished); \
             it is the promoted version"
                .into(),
        ),
        Promotion::AlreadyExported { promoted: true } => (
            true,
            "already exported, and the promoted version; files not written again".into(),
        ),
        Promotion::AlreadyExported { promoted: false } => {
            (false, "already exported; files not written again".into())
        }
    };
    match &out.webhook {
        Some(Ok(_)) if matches!(out.promotion, Promotion::AlreadyExported { .. }) => {
            note.push_str("; webhook notified (an earlier export had not delivered it)")
        }
        Some(Ok(1)) => note.push_str("; webhook notified"),
        Some(Ok(n)) => note.push_str(&format!("; webhook notified (try {n})")),
        Some(Err(e)) => note.push_str(&format!("; webhook FAILED: {e}")),
        None => {}
    }
    if let Some(who) = &out.notice_sent_by {
        note.push_str(&format!(
            "; webhook left to the export of this version running alongside ({who})"
        ));
    }
    let result = serde_json::json!({"url": out.url, "version": out.record.version,
        "step": out.record.step, "train_loss": out.record.train_loss,
        "eval_loss": out.record.eval_loss, "promoted": promoted, "note": note});
    if let Some(path) = result_file {
        // On Kubernetes: /dev/termination-log, where the coordinator reads the result.
        let (path, text) = (path.to_path_buf(), format!("{result}\n"));
        tokio::task::spawn_blocking(move || {
            std::fs::write(&path, text).map_err(|e| {
                CliError::Usage(format!(
                    "--result-file {}: cannot write it: {e}",
                    path.display()
                ))
            })
        })
        .await??;
    }
    if json {
        println!("{result}");
    } else {
        println!(
            "exported step {} to {} (train loss {}, eval loss {}; {} files); {note}",
            out.record.step,
            out.url,
            loss(out.record.train_loss),
            loss(out.record.eval_loss),
            out.record.files.len() + 1
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `lockstep export ls URL/NAME`: the lineage's versions with their losses, and which is
/// promoted.
async fn list(lineage_url: &str, json: bool) -> Result {
    let listing = export::list(lineage_url).await?;
    let promoted = listing.promoted.as_deref();
    if json {
        for (r, d) in &listing.versions {
            println!(
                "{}",
                serde_json::json!({"version": r.version, "step": r.step, "job": r.job,
                    "train_loss": r.train_loss, "eval_loss": r.eval_loss,
                    "created_unix_ms": r.created_unix_ms,
                    "promoted": promoted == Some(r.version.as_str()),
                    "decision": d.as_ref().map(|d| d.reason.clone())})
            );
        }
        for d in &listing.damaged {
            println!(
                "{}",
                serde_json::json!({"version": d.version,
                    "promoted": promoted == Some(d.version.as_str()), "damaged": d.why})
            );
        }
        return Ok(damaged_status(&listing));
    }
    if listing.empty {
        return Err(CliError::Usage(format!(
            "nothing is stored under {}: no lineage there (check the name: `lockstep export \
             ls EXPORT_URL/NAME`, NAME being export.name or the job's name)",
            listing.url
        )));
    }
    if listing.versions.is_empty() && listing.damaged.is_empty() {
        println!("no finished versions under {}", listing.url);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<2} {:<40} {:>8} {:>10} {:>10}  NOTE",
        "", "VERSION", "STEP", "TRAIN", "EVAL"
    );
    for (r, d) in &listing.versions {
        let mark = if promoted == Some(r.version.as_str()) {
            "*"
        } else {
            ""
        };
        println!(
            "{mark:<2} {:<40} {:>8} {:>10} {:>10}  {}",
            r.version,
            r.step,
            loss(r.train_loss),
            loss(r.eval_loss),
            d.as_ref().map_or(String::new(), |d| d.reason.clone())
        );
    }
    for d in &listing.damaged {
        let mark = if promoted == Some(d.version.as_str()) {
            "*"
        } else {
            ""
        };
        println!("{mark:<2} {:<40} DAMAGED: {}", d.version, d.why);
    }
    if promoted.is_none() {
        println!("(no version is promoted)");
    }
    if !listing.damaged.is_empty() {
        println!("{} damaged (see above)", listing.damaged.len());
    }
    Ok(damaged_status(&listing))
}

/// `export ls` exits 1 when something in the lineage is damaged, as `ckpt verify` does.
fn damaged_status(listing: &export::Listing) -> ExitCode {
    if listing.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn loss(l: Option<f64>) -> String {
    l.map_or("-".into(), |l| format!("{l:.4}"))
}

/// `--lineage`: a JSON object of lineage facts.
fn parse_lineage(text: &str) -> Result<serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(CliError::Usage("--lineage must be a JSON object".into())),
        Err(e) => Err(CliError::Usage(format!("--lineage is not JSON: {e}"))),
    }
}
