//! Rendezvous benchmark: 1,024 simulated workers join one job on a real coordinator (gRPC over
//! loopback), each on its own connection. Measures the time from the first `Join` sent to the
//! last response received (the gang barrier), against the target of < 1 s.
//!
//! ```text
//! cargo run --release -p lockstep-benchmarks --bin rendezvous [-- WORKERS]
//! ```
//!
//! The workers are Tokio tasks of this process, not trainer processes (the launcher records
//! what it would start and starts nothing), so this measures the coordinator's Join path:
//! authentication, attempt checks, the barrier and the fan-out of the peer list. Prints a line
//! and, last, one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lockstep_api::proto::{self, coordinator_client::CoordinatorClient};
use lockstep_api::testing::TestJob;
use lockstep_coordinator::testing::Simulated;
use lockstep_coordinator::{Coordinator, Settings};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let workers: u32 = match std::env::args().nth(1) {
        Some(w) => w.parse().context("WORKERS is a number")?,
        None => 1024,
    };
    let dir = std::env::temp_dir().join(format!("lockstep-rendezvous-{}", std::process::id()));
    let launcher = Arc::new(Simulated::default());
    let coordinator = Coordinator::open(
        Settings {
            data_dir: dir.clone(),
            admin_token: "bench".into(),
            persist: false,
        },
        launcher.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = coordinator.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(proto::coordinator_server::CoordinatorServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    coordinator.start(format!("http://{addr}")).await?;
    let config = TestJob::simulated("rendezvous", workers)
        .set("job.gang_timeout", "\"60s\"")
        .checkpoint_url(&format!("file://{}/ckpt", dir.display()))
        .toml();
    let status = coordinator
        .submit(config, vec![], dir.clone())
        .await?
        .status();
    // Wait for the (simulated) launch.
    let deadline = Instant::now() + Duration::from_secs(30);
    let specs = loop {
        let specs = launcher.specs();
        if specs.len() == workers as usize {
            break specs;
        }
        anyhow::ensure!(Instant::now() < deadline, "the coordinator did not launch");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // One connection per worker, opened before timing starts (as real workers connect on
    // their own schedule; the barrier is what is timed).
    let mut clients = Vec::new();
    for spec in &specs {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let auth = proto::BearerToken::new(&spec.token).context("token")?;
        clients.push((
            spec.clone(),
            CoordinatorClient::with_interceptor(channel, auth),
        ));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (spec, mut client) in clients {
        tasks.push(tokio::spawn(async move {
            let r = client
                .join(proto::JoinRequest {
                    job_id: spec.job_id.clone(),
                    attempt: spec.attempt,
                    worker: spec.worker,
                    data_addr: format!("10.0.{}.{}:29500", spec.worker / 256, spec.worker % 256),
                    ..Default::default()
                })
                .await;
            (spec.worker, r.map(|r| r.into_inner()))
        }));
    }
    let mut peers_ok = true;
    for t in tasks {
        let (worker, r) = t.await?;
        let r = r.map_err(|s| anyhow::anyhow!("worker {worker}: {}", s.message()))?;
        peers_ok &= r.rank == worker && r.peers.len() == workers as usize;
    }
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(peers_ok, "a worker got a wrong rank or peer list");
    println!(
        "{workers} workers joined job {} in {:.3} s (target < 1 s: {})",
        status.job_id,
        secs,
        if secs < 1.0 { "met" } else { "not met" }
    );
    println!(
        "{}",
        json!({"workers": workers, "seconds": secs, "target_seconds": 1.0})
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
