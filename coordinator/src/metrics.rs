//! Prometheus metrics of the coordinator, in the text exposition format, and the small HTTP
//! endpoint that serves them (`GET /metrics`).

use std::fmt::Write as _;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::record::JobRecord;

/// Process-wide counters; per-job gauges come from the job records at scrape time.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    steps: u64,
    step_seconds: f64,
    stall_seconds: f64,
    checkpoints: u64,
    checkpoint_bytes: u64,
    checkpoint_write_seconds: f64,
    restarts: u64,
    gang_wait_seconds: f64,
    gangs: u64,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
    }

    /// Rank 0 finished a step.
    pub fn step(&self, seconds: f64, stall: f64) {
        self.with(|c| {
            c.steps += 1;
            c.step_seconds += seconds;
            c.stall_seconds += stall;
        });
    }

    /// A rank reported a durable shard after `seconds` of writing.
    pub fn checkpoint_write(&self, seconds: f64) {
        self.with(|c| c.checkpoint_write_seconds += seconds);
    }

    /// A checkpoint of `bytes` was committed.
    pub fn checkpoint_committed(&self, bytes: u64) {
        self.with(|c| {
            c.checkpoints += 1;
            c.checkpoint_bytes += bytes;
        });
    }

    /// A gang restart.
    pub fn restart(&self) {
        self.with(|c| c.restarts += 1);
    }

    /// A gang assembled after `seconds`.
    pub fn gang_wait(&self, seconds: f64) {
        self.with(|c| {
            c.gangs += 1;
            c.gang_wait_seconds += seconds;
        });
    }

    /// The exposition text.
    pub fn render(&self, jobs: &[JobRecord]) -> String {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "lockstep_steps_total",
            "Training steps completed (rank 0).",
            c.steps as f64,
        );
        counter(
            "lockstep_step_seconds_total",
            "Wall time of those steps.",
            c.step_seconds,
        );
        counter(
            "lockstep_checkpoint_stall_seconds_total",
            "Time training stood still snapshotting checkpoints (rank 0).",
            c.stall_seconds,
        );
        counter(
            "lockstep_checkpoints_total",
            "Checkpoints committed.",
            c.checkpoints as f64,
        );
        counter(
            "lockstep_checkpoint_bytes_total",
            "Stored bytes of committed checkpoints.",
            c.checkpoint_bytes as f64,
        );
        counter(
            "lockstep_checkpoint_write_seconds_total",
            "Time ranks spent writing checkpoint shards.",
            c.checkpoint_write_seconds,
        );
        counter(
            "lockstep_restarts_total",
            "Gang restarts.",
            c.restarts as f64,
        );
        counter(
            "lockstep_gangs_total",
            "Gangs that assembled.",
            c.gangs as f64,
        );
        counter(
            "lockstep_gang_wait_seconds_total",
            "Time from launch until every worker joined.",
            c.gang_wait_seconds,
        );
        let mut gauge = |name: &str, help: &str, f: &dyn Fn(&JobRecord) -> Option<f64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for j in jobs {
                if let Some(v) = f(j) {
                    let _ = writeln!(
                        out,
                        "{name}{{job=\"{}\",state=\"{}\"}} {v}",
                        j.id,
                        j.phase().as_str()
                    );
                }
            }
        };
        gauge("lockstep_job_step", "Newest step of the job.", &|j| {
            Some(j.step as f64)
        });
        gauge("lockstep_job_loss", "Loss of the newest step.", &|j| j.loss);
        gauge(
            "lockstep_job_tokens_per_second",
            "Tokens per second over the gang.",
            &|j| Some(j.tokens_per_sec),
        );
        gauge("lockstep_job_restarts", "Gang restarts of the job.", &|j| {
            Some(f64::from(j.lifecycle.restarts))
        });
        gauge(
            "lockstep_job_last_checkpoint_step",
            "Newest committed checkpoint.",
            &|j| j.last_checkpoint.map(|s| s as f64),
        );
        gauge(
            "lockstep_job_gang_wait_seconds",
            "Gang wait of the current attempt.",
            &|j| Some(j.gang_wait_seconds),
        );
        out
    }
}

/// Serves `render()` at `GET /metrics` on `listener` (HTTP/1.1, one response per connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) {
    use futures::StreamExt;
    let render = std::sync::Arc::new(render);
    // Bounded, backing off on accept errors (see `listen`).
    let mut conns = Box::pin(crate::listen::incoming(listener, 64));
    while let Some(conn) = conns.next().await {
        let Ok(mut sock) = conn else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded) and answer.
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: \
                 {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
