//! The gRPC surface: each handler authenticates, converts the request to domain types, calls the
//! [`Coordinator`], and converts the answer (or the [`Error`](crate::Error), through
//! `From<Error> for Status`) back.

use std::path::PathBuf;
use std::pin::Pin;

use futures::Stream;
use lockstep_api::proto::{self, coordinator_server::Coordinator as Rpc};
use lockstep_storage::ShardMeta;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::attempt::Finished;
use crate::error::Error;
use crate::service::{Coordinator, Report};

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Rpc for Coordinator {
    async fn submit(
        &self,
        req: Request<proto::SubmitRequest>,
    ) -> Result<Response<proto::JobStatus>, Status> {
        self.authorize_admin(req.metadata())?;
        let r = req.into_inner();
        let record = self
            .submit(r.config_toml, r.overrides, PathBuf::from(r.workdir))
            .await?;
        Ok(Response::new(record.status()))
    }

    async fn get(&self, req: Request<proto::JobRef>) -> Result<Response<proto::JobStatus>, Status> {
        self.authorize_admin(req.metadata())?;
        Ok(Response::new(self.get(&req.get_ref().job_id)?.status()))
    }

    async fn list(
        &self,
        req: Request<proto::ListRequest>,
    ) -> Result<Response<proto::JobList>, Status> {
        self.authorize_admin(req.metadata())?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let (page, next) = self.page(after, size);
        Ok(Response::new(proto::JobList {
            jobs: page.iter().map(|r| r.status()).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn cancel(
        &self,
        req: Request<proto::JobRef>,
    ) -> Result<Response<proto::JobStatus>, Status> {
        self.authorize_admin(req.metadata())?;
        Ok(Response::new(self.cancel(&req.get_ref().job_id)?.status()))
    }

    type WatchStream = Stream2<proto::JobStatus>;

    async fn watch(
        &self,
        req: Request<proto::JobRef>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize_admin(req.metadata())?;
        let id = req.into_inner().job_id;
        let mut rx = self.subscribe(&id)?;
        let this = self.clone();
        let (tx, out) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                rx.borrow_and_update();
                let status = this.get(&id).map(|r| r.status()).map_err(Status::from);
                let end = status.as_ref().map_or(true, |s| {
                    lockstep_api::Phase::parse(&s.state).is_some_and(lockstep_api::Phase::is_final)
                });
                if tx.send(status).await.is_err() || end {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        let r = req.get_ref();
        let job = self.authorize_worker(req.metadata(), &r.job_id, r.attempt)?;
        let r = req.into_inner();
        let resp = self
            .join(
                &job,
                r.attempt,
                r.worker,
                r.data_addr,
                r.holds_step,
                r.left_generation,
            )
            .await?;
        Ok(Response::new(resp))
    }

    type HeartbeatStream = Stream2<proto::Command>;

    async fn heartbeat(
        &self,
        req: Request<tonic::Streaming<proto::WorkerReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let metadata = req.metadata().clone();
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty heartbeat stream"))?;
        let job = self.authorize_worker(&metadata, &first.job_id, first.attempt)?;
        let (attempt, rank) = (first.attempt, first.rank);
        let mut commands = self.commands(&job, attempt, rank)?;
        let this = self.clone();
        let (out, rx) = mpsc::channel::<Result<proto::Command, Status>>(16);
        let acks = out.clone();
        tokio::spawn(async move {
            let mut next = Some(first);
            while let Some(r) = next.take() {
                let report = report(r);
                let finished = matches!(report, Report::Finished(_));
                if !this.report(&job, attempt, rank, report) {
                    return;
                }
                if finished {
                    // The worker waits for this before it exits, so its exit is never seen
                    // before its report.
                    let ack = proto::Command {
                        command: Some(proto::command::Command::Ack(proto::Ack {})),
                    };
                    let _ = acks.send(Ok(ack)).await;
                }
                next = inbound.message().await.ok().flatten();
            }
        });
        tokio::spawn(async move {
            while let Ok(c) = commands.recv().await {
                if out.send(Ok(c)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn commit_shard(
        &self,
        req: Request<proto::CommitShardRequest>,
    ) -> Result<Response<proto::CommitShardResponse>, Status> {
        let r = req.get_ref();
        let job = self.authorize_worker(req.metadata(), &r.job_id, r.attempt)?;
        let r = req.into_inner();
        let shard: ShardMeta = serde_json::from_slice(&r.shard_meta_json)
            .map_err(|e| Error::InvalidArgument(format!("shard metadata: {e}")))?;
        if shard.shard.rank != r.rank || shard.step != r.step {
            return Err(Error::InvalidArgument(format!(
                "shard metadata says rank {} step {}, the call rank {} step {}",
                shard.shard.rank, shard.step, r.rank, r.step
            ))
            .into());
        }
        // Rank 0's trainer state and config hash go into the manifest.
        let state = if r.rank == 0 {
            let value = serde_json::from_slice(&r.trainer_state_json)
                .map_err(|e| Error::InvalidArgument(format!("trainer state: {e}")))?;
            Some((value, r.config_hash))
        } else {
            None
        };
        let (bytes, raw_bytes) = self
            .commit_shard(&job, r.attempt, shard, state, r.write_seconds)
            .await?;
        Ok(Response::new(proto::CommitShardResponse {
            bytes,
            raw_bytes,
        }))
    }
}

/// A heartbeat report in domain terms (an empty one says the worker is alive).
fn report(r: proto::WorkerReport) -> Report {
    match r.report {
        None => Report::Alive {
            doing: String::new(),
        },
        Some(proto::worker_report::Report::Alive(a)) => Report::Alive { doing: a.doing },
        Some(proto::worker_report::Report::Step(s)) => Report::Step(s),
        Some(proto::worker_report::Report::Evaluated(e)) => Report::Evaluated(e),
        Some(proto::worker_report::Report::CheckpointFailed(c)) => Report::CheckpointFailed(c),
        Some(proto::worker_report::Report::Finished(f)) => Report::Finished(Finished {
            step: f.step,
            params_hash: f.params_hash,
            stopped_early: f.stopped_early,
        }),
    }
}
