//! What a person sees of a run: a progress bar on a terminal (or a log line every tenth of the
//! run), checkpoint notes, and the summary line.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::JobConfig;

use crate::train::{Event, Summary};

/// Writes a line to stderr; a closed stderr (the reader went away) must not kill training.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The progress bar (or, without a terminal, a log line every tenth of the run).
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    ema_step: Option<f64>,
    last_ckpt: Option<u64>,
}

impl Progress {
    /// A bar on stderr when `bar`, log lines otherwise.
    pub fn new(bar: bool) -> Progress {
        Progress {
            bar: bar.then(ProgressBar::hidden),
            total: 0,
            every: 1,
            ema_step: None,
            last_ckpt: None,
        }
    }

    /// Shows one event.
    pub fn on(&mut self, e: &Event) {
        match e {
            // Logged where it happens (tokens); the coordinator shows it to `lockstep run`.
            Event::Preparing { .. } => {}
            Event::Started {
                params,
                lora,
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
                let lora = lora.as_ref().map_or(String::new(), |l| format!(" ({l})"));
                say!(
                    "model: {:.2}M parameters{lora}; data: {docs} documents, {data_tokens} tokens{skipped}; {from} of {total_steps}",
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
            Event::SetAside {
                step,
                reason,
                moved_to,
            } => {
                say!(
                    "checkpoint step {step} failed verification ({reason}); set aside to {moved_to}, resuming from an older one"
                );
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
            Event::Eval {
                step,
                loss,
                windows,
                elapsed,
            } => {
                tracing::info!(
                    step,
                    eval_loss = loss,
                    windows,
                    secs = elapsed.as_secs_f64(),
                    "evaluated"
                );
                let line = format!(
                    "step {step}: eval loss {loss:.4} ({windows} held-out windows, {:.1} s)",
                    elapsed.as_secs_f64()
                );
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => say!("{line}"),
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
            Event::Recovered {
                step,
                held,
                from,
                cause,
                abandoned,
                elapsed,
            } => {
                let took = if held == step {
                    format!("this rank held step {held}")
                } else {
                    format!("took step {step} from rank {from} (this rank held {held})")
                };
                let abandoned = abandoned.map_or(String::new(), |a| {
                    format!("; checkpoint {a} was in flight and is taken again")
                });
                let line = format!(
                    "the gang lost a rank ({cause}) and re-formed with a replacement in {:.2} s: \
                     continuing after step {step}, no step lost ({took}){abandoned}",
                    elapsed.as_secs_f64()
                );
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => say!("{line}"),
                }
            }
            Event::CheckpointFailed {
                step,
                reason,
                in_a_row,
                stopping,
            } => {
                tracing::info!(step, in_a_row, reason = %reason, "checkpoint failed");
                if *stopping {
                    return; // the run's error says it all
                }
                let line = format!(
                    "checkpoint step {step} failed ({in_a_row} in a row; training goes on and \
                     the next checkpoint tries again): {reason}"
                );
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => say!("{line}"),
                }
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
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
            say!();
        }
    }
}

/// The run's one-line summary on stdout (tests and scripts read `params xxh3`).
pub fn print_summary(config: &JobConfig, s: &Summary) {
    if s.first_loss.is_none() && s.step >= config.train.steps && s.replacement {
        println!(
            "replaced a lost rank at the last step, {} of {}, and finished its evaluation and \
             checkpoint with the gang; params xxh3 {}",
            s.step, config.train.steps, s.params_hash
        );
        return;
    }
    if s.first_loss.is_none() && s.step >= config.train.steps {
        println!(
            "nothing to do: the checkpoint under {} is already at step {} of {}",
            config.checkpoint.url, s.step, config.train.steps
        );
        return;
    }
    let mut loss = match (s.first_loss, s.last_loss) {
        (Some(a), Some(b)) => format!("loss {a:.4} → {b:.4}"),
        _ => "no steps run".into(),
    };
    if let Some(e) = s.eval_loss {
        loss.push_str(&format!(", eval loss {e:.4}"));
    }
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
