//! How a job's progress looks: a bar on a terminal, log lines otherwise, JSON lines on request;
//! and the summary when it ends.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::{Phase, proto};

/// A job status as JSON.
pub fn status_json(s: &proto::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job": s.job_id, "name": s.name, "state": s.state, "attempt": s.attempt,
        "restarts": s.restarts, "replacements": s.replacements,
        "recoveries": s.recoveries.iter().map(|r| serde_json::json!({
            "rank": r.rank, "cause": r.cause, "path": r.path, "at_ms": r.at_ms,
            "step": r.step, "steps_lost": r.steps_lost, "seconds": r.seconds,
            "superseded": r.superseded,
        })).collect::<Vec<_>>(),
        "world_size": s.world_size, "step": s.step,
        "total_steps": s.total_steps, "loss": s.loss, "first_loss": s.first_loss,
        "tokens_per_sec": s.tokens_per_sec, "last_checkpoint": s.last_checkpoint,
        "message": s.message, "params_hash": s.params_hash, "checkpoint_url": s.checkpoint_url,
        "gang_wait_seconds": s.gang_wait_seconds, "eval_loss": s.eval_loss,
        "eval_step": s.eval_step, "doing": s.doing, "logs": s.logs,
        "checkpoint_failures": s.checkpoint_failures, "checkpoint_error": s.checkpoint_error,
    })
}

/// No transition leaves this state (the wire spelling of a [`Phase`]).
pub fn is_final(state: &str) -> bool {
    Phase::parse(state).is_some_and(Phase::is_final)
}

/// Progress of a job: a bar on a terminal, log lines otherwise, JSON lines with --json.
pub struct View {
    json: bool,
    bar: Option<ProgressBar>,
    last_line: String,
    last_state: String,
    last_restarts: u32,
    last_replacements: u32,
    last_doing: String,
}

impl View {
    /// A view of the job `s` describes.
    pub fn new(json: bool, s: &proto::JobStatus) -> View {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(s.total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} (ETA {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(s.job_id.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        View {
            json,
            bar,
            last_line: String::new(),
            last_state: String::new(),
            last_restarts: 0,
            last_replacements: 0,
            last_doing: String::new(),
        }
    }

    /// A line above the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None if !self.json => eprintln!("{line}"),
            None => {}
        }
    }

    /// Shows a status.
    pub fn show(&mut self, s: &proto::JobStatus) {
        if self.json {
            let line = status_json(s).to_string();
            if line != self.last_line {
                println!("{line}");
                self.last_line = line;
            }
            return;
        }
        if s.state != self.last_state
            || s.restarts != self.last_restarts
            || s.replacements != self.last_replacements
        {
            let mut line = format!("{}: {} (attempt {})", s.job_id, s.state, s.attempt);
            if !s.message.is_empty() {
                line.push_str(&format!(": {}", s.message));
            }
            self.note(&line);
            self.last_state = s.state.clone();
            self.last_restarts = s.restarts;
            self.last_replacements = s.replacements;
        }
        // Before the first step: what takes long (tokenising, waiting for another job's).
        if s.doing != self.last_doing {
            if !s.doing.is_empty() {
                self.note(&format!("{}: {}", s.job_id, s.doing));
            }
            self.last_doing = s.doing.clone();
        }
        let msg = format!(
            "loss {} | {:.0} tok/s | restarts {} | ckpt {}",
            s.loss.map_or("-".into(), |l| format!("{l:.4}")),
            s.tokens_per_sec,
            s.restarts,
            s.last_checkpoint.map_or("-".into(), |c| c.to_string())
        );
        match &self.bar {
            Some(b) => {
                b.set_position(s.step);
                b.set_message(msg);
            }
            None => {
                // A line every tenth of the run.
                let tenth = (s.total_steps / 10).max(1);
                let line = format!("step {}/{} {msg}", s.step, s.total_steps);
                if s.step.is_multiple_of(tenth) && s.step > 0 && line != self.last_line {
                    eprintln!("{line}");
                    self.last_line = line;
                }
            }
        }
    }

    /// The summary of a job that ended; `logs` is its worker log folder.
    /// The closing lines; the workers' logs are where the coordinator says (`s.logs`), else
    /// `local` (a coordinator this process runs).
    pub fn finish(&self, s: &proto::JobStatus, local: Option<&Path>) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.json {
            return;
        }
        let mut loss = match (s.first_loss, s.loss) {
            (Some(a), Some(b)) => format!("loss {a:.3} -> {b:.3}"),
            _ => "no steps run".into(),
        };
        if let (Some(e), Some(at)) = (s.eval_loss, s.eval_step) {
            loss.push_str(&format!(", eval loss {e:.3} at step {at}"));
        }
        eprintln!(
            "{}: {} at step {}/{}; {loss}; {} restart{}{}; last checkpoint {} at {}{}",
            s.job_id,
            s.state,
            s.step,
            s.total_steps,
            s.restarts,
            if s.restarts == 1 { "" } else { "s" },
            match s.replacements {
                0 => String::new(),
                1 => ", 1 rank replaced in place".into(),
                n => format!(", {n} ranks replaced in place"),
            },
            s.last_checkpoint.map_or("none".into(), |c| c.to_string()),
            s.checkpoint_url,
            if s.params_hash.is_empty() {
                String::new()
            } else {
                format!("; params xxh3 {}", s.params_hash)
            }
        );
        if !s.message.is_empty() {
            eprintln!("  {}", s.message);
        }
        if s.checkpoint_failures > 0 {
            eprintln!(
                "  {} checkpoint{} failed; the newest: {}",
                s.checkpoint_failures,
                if s.checkpoint_failures == 1 { "" } else { "s" },
                s.checkpoint_error
            );
        }
        match (s.logs.as_str(), local) {
            ("", Some(dir)) => eprintln!("  worker logs: {}", dir.display()),
            ("", None) => {}
            (logs, _) => eprintln!("  worker logs: {logs}"),
        }
    }
}
