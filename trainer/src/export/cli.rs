//! `lockstep export` and `lockstep export ls`: what they print.

use lockstep_storage::objects;
use lockstep_storage::pointer::Pointer;

use super::{LATEST_FILE, Lineage, Promotion, Request, export};
use crate::error::{Error, Result};

/// `lockstep export`: exports, prints what happened (a line, or JSON), returns the exit status
/// (0 exported, 1 error).
pub fn run_cli(
    req: &Request,
    to: &str,
    json: bool,
    result_file: Option<&std::path::Path>,
) -> Result<()> {
    if let Some(url) = &req.webhook {
        crate::webhook::check_url(url).map_err(Error::Invalid)?;
    }
    if !req.max_eval_regression.is_finite() || req.max_eval_regression < 0.0 {
        return Err(Error::Invalid(format!(
            "--max-eval-regression {}: must be a finite number ≥ 0",
            req.max_eval_regression
        )));
    }
    let rt = runtime()?;
    let out = rt.block_on(export(req, to, None))?;
    let (promoted, mut note) = match &out.promotion {
        Promotion::NotAsked => (false, "not promoted (no --promote)".to_string()),
        Promotion::Promoted { replaced: None } => (true, "promoted (the first)".into()),
        Promotion::Promoted { replaced: Some(r) } => (true, format!("promoted, replacing {r}")),
        Promotion::Kept { reason } => (false, format!("kept, not promoted: {reason}")),
        Promotion::AlreadyExported => (false, "already exported; nothing written".into()),
    };
    match &out.webhook {
        Some(Ok(1)) => note.push_str("; webhook notified"),
        Some(Ok(n)) => note.push_str(&format!("; webhook notified (try {n})")),
        Some(Err(e)) => note.push_str(&format!("; webhook FAILED: {e}")),
        None => {}
    }
    let result = serde_json::json!({"url": out.url, "version": out.record.version,
        "step": out.record.step, "train_loss": out.record.train_loss,
        "eval_loss": out.record.eval_loss, "promoted": promoted, "note": note});
    if let Some(path) = result_file {
        // On Kubernetes: /dev/termination-log, where the coordinator reads the result.
        std::fs::write(path, format!("{result}\n")).map_err(|e| {
            Error::Invalid(format!(
                "--result-file {}: cannot write it: {e}",
                path.display()
            ))
        })?;
    }
    if json {
        println!("{result}");
    } else {
        let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
        println!(
            "exported step {} to {} (train loss {}, eval loss {}; {} files); {note}",
            out.record.step,
            out.url,
            loss(out.record.train_loss),
            loss(out.record.eval_loss),
            out.record.files.len() + 1
        );
    }
    Ok(())
}

/// `lockstep export ls URL/NAME`: the lineage's versions with their losses, and which is
/// promoted.
pub fn list_cli(lineage_url: &str, json: bool) -> Result<()> {
    let rt = runtime()?;
    let (store, root) = objects::open_url(lineage_url.trim_end_matches('/'))?;
    let lineage = Lineage::with_store(store, root, lineage_url.trim_end_matches('/'));
    let lineage = Lineage {
        latest: Pointer::open(&format!("{}/{LATEST_FILE}", lineage.url))?,
        ..lineage
    };
    let (versions, latest) = rt
        .block_on(async { Ok::<_, Error>((lineage.versions().await?, lineage.latest().await?)) })?;
    let promoted = latest.as_ref().map(|l| l.version.clone());
    if json {
        for (r, d) in &versions {
            println!(
                "{}",
                serde_json::json!({"version": r.version, "step": r.step, "job": r.job,
                    "train_loss": r.train_loss, "eval_loss": r.eval_loss,
                    "created_unix_ms": r.created_unix_ms,
                    "promoted": promoted.as_deref() == Some(r.version.as_str()),
                    "decision": d.as_ref().map(|d| d.reason.clone())})
            );
        }
        return Ok(());
    }
    if versions.is_empty() {
        println!("no finished versions under {}", lineage.url);
        return Ok(());
    }
    println!(
        "{:<2} {:<40} {:>8} {:>10} {:>10}  NOTE",
        "", "VERSION", "STEP", "TRAIN", "EVAL"
    );
    for (r, d) in &versions {
        let mark = if promoted.as_deref() == Some(r.version.as_str()) {
            "*"
        } else {
            ""
        };
        let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
        println!(
            "{mark:<2} {:<40} {:>8} {:>10} {:>10}  {}",
            r.version,
            r.step,
            loss(r.train_loss),
            loss(r.eval_loss),
            d.as_ref().map_or(String::new(), |d| d.reason.clone())
        );
    }
    if promoted.is_none() {
        println!("(no version is promoted)");
    }
    Ok(())
}

/// `--lineage`: a JSON object of lineage facts.
pub fn parse_lineage(text: &str) -> Result<serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(Error::Invalid("--lineage must be a JSON object".into())),
        Err(e) => Err(Error::Invalid(format!("--lineage is not JSON: {e}"))),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the IO runtime: {e}")))
}
