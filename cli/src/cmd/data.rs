//! `lockstep data preview`: what a job's records become before a long run trains on them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use lockstep_trainer::preview::{self, Preview};

use super::Result;

/// Look at a job's training data as training will see it.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    Preview(PreviewArgs),
}

/// Show how the first records of a job's data become tokens: the text the tokenizer reads
/// back from them, the token ids, and which ids carry loss (`[…]` in the text; `prompt` parts
/// of prompt/completion records carry none). It tokenises through the same token store a run
/// of the config uses on this machine (building it if there is none yet), so what it shows is
/// what training reads. Exit status 0 shown, 1 error (a bad record is named by file and line
/// unless data.skip_bad_records).
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The job config (TOML).
    config: PathBuf,
    /// Override a config field: `--set data.seq_len=512` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// How many records to show (1–1000).
    #[arg(long, default_value_t = 3)]
    records: usize,
    /// Preview data.eval instead of data.train.
    #[arg(long)]
    eval: bool,
    /// One JSON object per record (`index`, `file`, `input_ids`, `loss_mask`, `text`).
    #[arg(long)]
    json: bool,
    /// The token cache (as `lockstep train --data-cache`). Default:
    /// $XDG_CACHE_HOME/lockstep/tokens or ~/.cache/lockstep/tokens.
    #[arg(long, env = "LOCKSTEP_DATA_CACHE", value_name = "DIR")]
    data_cache: Option<PathBuf>,
    /// What `{date}` in the config becomes (YYYY-MM-DD; default: today, UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    date: Option<String>,
}

/// Exit status 0 shown, 1 error.
pub fn run(cmd: DataCommand) -> ExitCode {
    let DataCommand::Preview(args) = cmd;
    match show(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn show(args: PreviewArgs) -> Result {
    let loaded = super::load(&args.config, &args.set, args.date.as_deref())?;
    let cache = match args.data_cache {
        Some(c) => c,
        None => lockstep_trainer::tokens::default_cache()?,
    };
    let mut note = |line: String| eprintln!("{line}");
    let p = preview::preview(&loaded.config, args.eval, &cache, args.records, &mut note)?;
    if args.json {
        for r in &p.records {
            let text: String = r.spans.iter().map(|(_, t)| t.as_str()).collect();
            println!(
                "{}",
                serde_json::json!({"index": r.index, "file": r.file, "input_ids": r.input_ids,
                    "loss_mask": r.loss_mask.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(),
                    "text": text})
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    print(&p, args.eval);
    Ok(ExitCode::SUCCESS)
}

fn print(p: &Preview, eval: bool) {
    println!(
        "{}: {} records, {} tokens{}; the first {}: text read back from the tokens, [in \
         brackets] what carries loss",
        if eval { "data.eval" } else { "data.train" },
        p.docs,
        p.tokens,
        if p.skipped > 0 {
            format!(" ({} bad records skipped)", p.skipped)
        } else {
            String::new()
        },
        p.records.len()
    );
    for r in &p.records {
        let in_loss = r.loss_mask.iter().filter(|&&m| m).count();
        println!(
            "\nrecord {} ({}): {} tokens, {in_loss} carry loss",
            r.index,
            r.file,
            r.input_ids.len()
        );
        let text: String = r
            .spans
            .iter()
            .map(|(loss, t)| {
                if *loss {
                    format!("[{}]", t.escape_debug())
                } else {
                    t.escape_debug().to_string()
                }
            })
            .collect();
        println!("  text: {text}");
        let ids: Vec<String> = r.input_ids.iter().map(u32::to_string).collect();
        println!("  ids:  {}", ids.join(" "));
        let mask: String = r
            .loss_mask
            .iter()
            .map(|&m| if m { '1' } else { '0' })
            .collect();
        println!("  loss: {mask}");
    }
}
