//! The trainer's side of the control protocol: join the gang, stream heartbeats and progress,
//! report checkpoint shards to the coordinator (the commit authority), obey its commands.
//!
//! The gRPC client runs on its own small Tokio runtime; the training thread calls in with
//! blocking methods. Losing the coordinator ends the process: nobody could commit this
//! worker's checkpoints or restart its gang, and a coordinator that comes back starts a new
//! attempt anyway.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_api::proto::{self, coordinator_client::CoordinatorClient};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::checkpoint::{ShardCommitter, ShardReport};
use crate::error::{Error, Result};
use crate::train::{Event, Summary};

use proto::Client;

/// Who this worker is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The coordinator's URL.
    pub url: String,
    /// The job's token.
    pub token: String,
    /// The job.
    pub job: String,
    /// The attempt.
    pub attempt: u32,
    /// This worker's index (its rank once joined).
    pub worker: u32,
    /// How long the coordinator may stay silent (stopped, partitioned) before this worker
    /// gives it up: at least the job's heartbeat timeout, so a stall the coordinator forgives
    /// (it counts heartbeat timeouts from the end of its own stalls) does not end the worker.
    pub patience: Duration,
}

/// A connected worker.
pub struct Control {
    rt: tokio::runtime::Runtime,
    client: Client,
    id: Identity,
    rank: u32,
    reports: Mutex<Option<mpsc::UnboundedSender<proto::WorkerReport>>>,
    acked: watch::Receiver<bool>,
    acked_tx: watch::Sender<bool>,
    finishing: Arc<AtomicBool>,
    stall: Mutex<f64>,
    /// What this rank is doing before its first step, sent with every heartbeat.
    doing: Arc<Mutex<String>>,
    /// One more than the newest ring generation the coordinator said to leave (0: none).
    leave_below: Arc<AtomicU32>,
    /// The heartbeat stream broke: the coordinator is gone.
    orphaned: Arc<AtomicBool>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("job", &self.id.job)
            .field("attempt", &self.id.attempt)
            .field("rank", &self.rank)
            .finish()
    }
}

/// A failed call in the trainer's terms: this attempt is over, the coordinator is gone, or it
/// refused the call.
fn rpc(url: &str, what: &str, s: tonic::Status) -> Error {
    let what = what.to_string();
    match s.code() {
        tonic::Code::FailedPrecondition => Error::AttemptOver {
            what,
            message: s.message().to_string(),
        },
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            Error::CoordinatorGone {
                what,
                url: url.to_string(),
                reason: s.message().to_string(),
            }
        }
        code => Error::Refused {
            what,
            code,
            message: s.message().to_string(),
        },
    }
}

impl Control {
    /// Connects to the coordinator.
    pub fn connect(id: Identity) -> Result<Control> {
        let rt = crate::runtime::io("control")?;
        let auth = proto::BearerToken::new(&id.token)
            .ok_or_else(|| Error::Usage("LOCKSTEP_TOKEN is not a valid header value".into()))?;
        let channel = Channel::from_shared(id.url.clone())
            .map_err(|e| Error::Usage(format!("--coordinator {}: {e}", id.url)))?
            .connect_timeout(Duration::from_secs(10))
            // A coordinator that stops answering (stopped, partitioned) fails the calls in
            // flight within seconds instead of hanging them: HTTP/2 PINGs must be answered.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(id.patience.max(Duration::from_secs(20)))
            .keep_alive_while_idle(true);
        let channel = rt
            .block_on(channel.connect())
            .map_err(|e| Error::CoordinatorGone {
                what: "connect".into(),
                url: id.url.clone(),
                reason: e.to_string(),
            })?;
        let client = CoordinatorClient::with_interceptor(channel, auth);
        let (acked_tx, acked) = watch::channel(false);
        Ok(Control {
            rt,
            client,
            rank: id.worker,
            id,
            reports: Mutex::new(None),
            acked,
            acked_tx,
            finishing: Arc::new(AtomicBool::new(false)),
            leave_below: Arc::new(AtomicU32::new(0)),
            orphaned: Arc::new(AtomicBool::new(false)),
            stall: Mutex::new(0.0),
            doing: Arc::default(),
        })
    }

    /// Joins the gang with this worker's ring address; returns once all have joined.
    pub fn join(&mut self, data_addr: String) -> Result<proto::JoinResponse> {
        let mut client = self.client.clone();
        let req = proto::JoinRequest {
            job_id: self.id.job.clone(),
            attempt: self.id.attempt,
            worker: self.id.worker,
            data_addr,
            holds_step: None,
            left_generation: 0,
        };
        let resp = self
            .rt
            .block_on(client.join(req))
            .map_err(|s| {
                let what = format!(
                    "join job {} attempt {} as worker {}",
                    self.id.job, self.id.attempt, self.id.worker
                );
                rpc(&self.id.url, &what, s)
            })?
            .into_inner();
        self.rank = resp.rank;
        Ok(resp)
    }

    /// Regroups after the gang lost a rank: joins the re-formed gang of this attempt with a new
    /// ring address, holding the state of `holds_step` and leaving ring `left_generation`;
    /// returns once every rank (the replacement too) has joined.
    pub fn rejoin(
        &self,
        data_addr: String,
        holds_step: u64,
        left_generation: u32,
    ) -> Result<proto::JoinResponse> {
        let mut client = self.client.clone();
        let req = proto::JoinRequest {
            job_id: self.id.job.clone(),
            attempt: self.id.attempt,
            worker: self.id.worker,
            data_addr,
            holds_step: Some(holds_step),
            left_generation,
        };
        let resp = self
            .rt
            .block_on(client.join(req))
            .map_err(|s| {
                let what = format!(
                    "regroup job {} attempt {} as rank {}",
                    self.id.job, self.id.attempt, self.rank
                );
                rpc(&self.id.url, &what, s)
            })?
            .into_inner();
        if resp.rank != self.rank {
            return Err(Error::Internal(format!(
                "the re-formed gang made rank {} rank {}",
                self.rank, resp.rank
            )));
        }
        Ok(resp)
    }

    /// Whether the coordinator said to leave ring `generation` (a member was lost as it
    /// formed).
    pub fn told_to_leave(&self, generation: u32) -> bool {
        self.leave_below.load(Ordering::SeqCst) > generation
    }

    /// Whether this rank lost its coordinator (its heartbeat stream broke).
    pub fn orphaned(&self) -> bool {
        self.orphaned.load(Ordering::SeqCst)
    }

    /// Starts the heartbeat stream: a liveness report every `interval`, progress as it
    /// happens; a Stop command sets `stop`. If the stream breaks (the coordinator is gone),
    /// `stop` is set too: the gang checkpoints the step it is at, rank 0 commits it through the
    /// store, and the rank exits — a coordinator that takes the job over resumes from that
    /// step. Whatever is not done `orphan_deadline` after the loss, the process exits (status
    /// 1) there.
    pub fn start_heartbeat(
        &self,
        interval: Duration,
        stop: Arc<AtomicBool>,
        orphan_deadline: Duration,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let report = |r| proto::WorkerReport {
            job_id: self.id.job.clone(),
            attempt: self.id.attempt,
            rank: self.rank,
            report: Some(r),
        };
        let alive = report(proto::worker_report::Report::Alive(proto::Alive::default()));
        let _ = tx.send(alive.clone());
        *self.reports.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        let mut client = self.client.clone();
        let acked = self.acked_tx.clone();
        let finishing = self.finishing.clone();
        let leave_below = self.leave_below.clone();
        let orphaned = self.orphaned.clone();
        let url = self.id.url.clone();
        let stop_on_loss = stop.clone();
        self.rt.spawn(async move {
            let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            // Nobody can restart this gang now: it checkpoints where it is (rank 0 commits)
            // and exits, so that the coordinator's restart resumes from there; bounded by
            // `orphan_deadline`.
            let lost = |e: Error| {
                if finishing.load(Ordering::SeqCst) || orphaned.swap(true, Ordering::SeqCst) {
                    return;
                }
                eprintln!(
                    "error: {e}; checkpointing the step this gang is at (rank 0 commits it) \
                     and exiting (at most {orphan_deadline:?} from now)"
                );
                stop_on_loss.store(true, Ordering::SeqCst);
                let watchdog = std::thread::Builder::new()
                    .name("orphan-deadline".into())
                    .spawn(move || {
                        std::thread::sleep(orphan_deadline);
                        eprintln!(
                            "error: lost the coordinator {orphan_deadline:?} ago and could not \
                             checkpoint since; exiting"
                        );
                        std::process::exit(1);
                    });
                if watchdog.is_err() {
                    eprintln!("error: lost the coordinator; exiting");
                    std::process::exit(1);
                }
            };
            let mut inbound = match client.heartbeat(outbound).await {
                Ok(r) => r.into_inner(),
                Err(s) => return lost(rpc(&url, "heartbeat", s)),
            };
            loop {
                match inbound.message().await {
                    Ok(Some(cmd)) => match cmd.command {
                        Some(proto::command::Command::Stop(s)) => {
                            tracing::warn!(reason = %s.reason, "the coordinator asked to stop");
                            stop.store(true, Ordering::SeqCst);
                        }
                        Some(proto::command::Command::Ack(_)) => {
                            acked.send_replace(true);
                        }
                        Some(proto::command::Command::Regroup(r)) => {
                            tracing::warn!(
                                generation = r.left_generation,
                                "the coordinator says the ring being formed lost a member"
                            );
                            leave_below
                                .fetch_max(r.left_generation.saturating_add(1), Ordering::SeqCst);
                        }
                        None => {}
                    },
                    Ok(None) => {
                        return lost(Error::CoordinatorGone {
                            what: "heartbeat".into(),
                            url: url.clone(),
                            reason: "the stream ended".into(),
                        });
                    }
                    Err(s) => return lost(rpc(&url, "heartbeat", s)),
                }
            }
        });
        let doing = self.doing.clone();
        self.rt.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let mut report = alive.clone();
                let now = doing.lock().unwrap_or_else(|p| p.into_inner()).clone();
                report.report = Some(proto::worker_report::Report::Alive(proto::Alive {
                    doing: now,
                }));
                if tx.send(report).is_err() {
                    return;
                }
            }
        });
    }

    fn send(&self, r: proto::worker_report::Report) {
        let guard = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = guard.as_ref() {
            let _ = tx.send(proto::WorkerReport {
                job_id: self.id.job.clone(),
                attempt: self.id.attempt,
                rank: self.rank,
                report: Some(r),
            });
        }
    }

    fn doing_now(&self, doing: &str) {
        doing.clone_into(&mut self.doing.lock().unwrap_or_else(|p| p.into_inner()));
        self.send(proto::worker_report::Report::Alive(proto::Alive {
            doing: doing.to_string(),
        }));
    }

    /// Forwards a training event (steps; checkpoint stalls ride on the next step).
    pub fn on_event(&self, e: &Event) {
        match e {
            // Said now and with every heartbeat until the first step.
            Event::Preparing { doing } => self.doing_now(doing),
            Event::Started { .. } => self.doing_now(""),
            Event::Step {
                step,
                loss,
                tokens_per_sec,
                elapsed,
                ..
            } => {
                let stall =
                    std::mem::take(&mut *self.stall.lock().unwrap_or_else(|p| p.into_inner()));
                self.send(proto::worker_report::Report::Step(proto::StepDone {
                    step: *step,
                    loss: *loss,
                    tokens_per_sec: *tokens_per_sec,
                    step_seconds: elapsed.as_secs_f64(),
                    stall_seconds: stall,
                }));
            }
            Event::CheckpointStarted { stall, .. } => {
                *self.stall.lock().unwrap_or_else(|p| p.into_inner()) += stall.as_secs_f64();
            }
            Event::CheckpointFailed {
                step,
                reason,
                in_a_row,
                ..
            } if self.rank == 0 => {
                self.send(proto::worker_report::Report::CheckpointFailed(
                    proto::CheckpointFailed {
                        step: *step,
                        reason: reason.clone(),
                        in_a_row: *in_a_row,
                    },
                ));
            }
            Event::Eval { step, loss, .. } if self.rank == 0 => {
                self.send(proto::worker_report::Report::Evaluated(proto::Evaluated {
                    step: *step,
                    loss: *loss,
                }));
            }
            _ => {}
        }
    }

    /// Reports the end of training and waits (up to `wait`) until the coordinator recorded it,
    /// so the process's exit is never seen before its report.
    pub fn finished(&self, summary: &Summary, wait: Duration) -> Result<()> {
        self.finishing.store(true, Ordering::SeqCst);
        self.send(proto::worker_report::Report::Finished(proto::Finished {
            step: summary.step,
            params_hash: summary.params_hash.clone(),
            stopped_early: summary.stopped_early,
        }));
        let mut acked = self.acked.clone();
        let got = self
            .rt
            .block_on(async { tokio::time::timeout(wait, acked.wait_for(|a| *a)).await });
        match got {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Internal(format!(
                "the coordinator did not acknowledge the end of training within {wait:?}"
            ))),
        }
    }
}

impl ShardCommitter for Control {
    fn orphaned(&self) -> bool {
        Control::orphaned(self)
    }

    fn commit_shard(&self, r: ShardReport<'_>) -> Result<(u64, u64)> {
        let encode = |what: &str, v: serde_json::Result<Vec<u8>>| {
            v.map_err(|e| Error::Internal(format!("cannot serialise the {what}: {e}")))
        };
        let req = proto::CommitShardRequest {
            job_id: self.id.job.clone(),
            attempt: self.id.attempt,
            rank: r.rank,
            step: r.state.step,
            shard_meta_json: encode("shard metadata", serde_json::to_vec(r.shard))?,
            trainer_state_json: encode("trainer state", serde_json::to_vec(r.state))?,
            write_seconds: r.write_time.as_secs_f64(),
            config_hash: r.config_hash.to_string(),
        };
        let mut client = self.client.clone();
        let resp = self
            .rt
            .block_on(client.commit_shard(req))
            .map_err(|s| {
                let what = format!("commit checkpoint {}", r.state.step);
                if s.metadata().get(proto::REGROUPING).is_some() {
                    return Error::Regrouping { what };
                }
                rpc(&self.id.url, &what, s)
            })?
            .into_inner();
        Ok((resp.bytes, resp.raw_bytes))
    }
}
