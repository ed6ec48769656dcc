//! Prometheus metrics of the coordinator, in the text exposition format, and the coordinator's
//! HTTP side (axum): `GET /metrics`, and the probes `GET /healthz` and `GET /readyz`.

use std::fmt::Write as _;
use std::sync::Mutex;

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
    checkpoint_failures: u64,
    restarts: u64,
    replacements: u64,
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

    /// A checkpoint failed (the gang trains on; the next one tries again).
    pub fn checkpoint_failed(&self) {
        self.with(|c| c.checkpoint_failures += 1);
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

    /// A lost rank replaced in place.
    pub fn replacement(&self) {
        self.with(|c| c.replacements += 1);
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
            "lockstep_checkpoint_failures_total",
            "Checkpoints that could not be written or committed (each retried by the next).",
            c.checkpoint_failures as f64,
        );
        counter(
            "lockstep_restarts_total",
            "Gang restarts.",
            c.restarts as f64,
        );
        counter(
            "lockstep_replacements_total",
            "Lost ranks replaced in place (the other ranks kept their state).",
            c.replacements as f64,
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
            "lockstep_job_eval_loss",
            "The newest held-out loss (data.eval).",
            &|j| j.eval_loss,
        );
        gauge(
            "lockstep_job_tokens_per_second",
            "Tokens per second over the gang.",
            &|j| Some(j.tokens_per_sec),
        );
        gauge("lockstep_job_restarts", "Gang restarts of the job.", &|j| {
            Some(f64::from(j.lifecycle.restarts))
        });
        gauge(
            "lockstep_job_replacements",
            "Lost ranks of the job replaced in place.",
            &|j| Some(f64::from(j.lifecycle.replacements)),
        );
        gauge(
            "lockstep_job_last_checkpoint_step",
            "Newest committed checkpoint.",
            &|j| j.last_checkpoint.map(|s| s as f64),
        );
        gauge(
            "lockstep_job_checkpoint_failures",
            "Checkpoints of the job that failed.",
            &|j| Some(f64::from(j.checkpoint_failures)),
        );
        gauge(
            "lockstep_job_gang_wait_seconds",
            "Gang wait of the current attempt.",
            &|j| Some(j.gang_wait_seconds),
        );
        out
    }
}

/// How long one HTTP connection may take, request to response.
pub const EXCHANGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves on `listener` (HTTP/1.1, axum): `GET /metrics` is `render()` (Prometheus text),
/// `GET /healthz` answers 200 while the process serves, `GET /readyz` 200 when `ready()` is
/// `Ok` and 503 with its reason otherwise (the kubelet's probes).
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) {
    serve_within(listener, render, ready, EXCHANGE_DEADLINE).await;
}

fn router(
    render: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let (render, ready) = (std::sync::Arc::new(render), std::sync::Arc::new(ready));
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "try GET /metrics, /healthz or /readyz\n",
            )
        })
}

async fn serve_within(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    deadline: std::time::Duration,
) {
    use futures::StreamExt;
    let app = router(render, ready);
    // Bounded, backing off on accept errors (see `listen`).
    // Room for scrapers, the kubelet's probes and some idle clients; an idle or slow client
    // loses its connection after 2 s without a complete request head.
    let mut conns = Box::pin(crate::listen::incoming(listener, 256));
    while let Some(conn) = conns.next().await {
        let Ok(sock) = conn else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        // One deadline for the whole connection: a client dribbling its request a byte at a
        // time cannot hold one of the 64 connections longer than this.
        tokio::spawn(tokio::time::timeout(deadline, async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(2))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service)
                .await;
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_dribbling_client_is_cut_off_and_a_real_one_is_answered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(super::serve_within(
            listener,
            || "lockstep_up 1\n".to_string(),
            || Err("still starting".into()),
            Duration::from_millis(500),
        ));
        // A byte every 100 ms: the whole request would take 2.4 s; the exchange may take 0.5 s.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut closed = false;
        for &b in b"GET /metrics HTTP/1.1\r\n\r\n" {
            if slow.write_all(&[b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut probe = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => panic!("answered a dribbled request: {:?}", &probe[..n]),
                Err(_) => {}
            }
        }
        assert!(
            closed,
            "the dribbling client kept its connection for {:?}",
            started.elapsed()
        );
        let mut fast = tokio::net::TcpStream::connect(addr).await.unwrap();
        fast.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        fast.read_to_string(&mut resp).await.unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("lockstep_up 1\n"),
            "{resp}"
        );
        // The probes: alive, not ready (with the reason), anything else 404.
        for (path, status, body) in [
            ("/healthz", "200", "ok\n"),
            ("/readyz", "503", "not ready: still starting\n"),
            ("/nope", "404", "try GET /metrics, /healthz or /readyz\n"),
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut resp = String::new();
            c.read_to_string(&mut resp).await.unwrap();
            assert!(
                resp.starts_with(&format!("HTTP/1.1 {status}")) && resp.ends_with(body),
                "{path}: {resp}"
            );
        }
    }
}
