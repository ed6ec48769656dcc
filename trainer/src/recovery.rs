//! In-place recovery: a gang that lost a rank re-forms without it and with its replacement, and
//! the replacement gets the state of the last finished step from a survivor, so no step is lost.
//!
//! A survivor sees the loss as a broken ring (a peer closed its connection, or sent nothing for
//! the collective timeout). No update of the interrupted step was applied (the all-reduce did not
//! complete), so its state is the last finished step's. It leaves the broken ring and asks the
//! coordinator to re-form the gang ([`Regroup::regroup`]); the coordinator starts one replacement,
//! and once every rank has joined again each gets the new ring and the rank that holds the newest
//! state (the survivor with the most finished steps, the lowest such rank). That rank streams its
//! state ([`send_state`]) over the new ring — which is authenticated by the job's token — and
//! every other rank receives it ([`receive_state`]), checks its hash, and continues from it.
//!
//! The state is what a checkpoint holds (parameters or adapters, AdamW moments, the trainer state
//! with the data cursor), so the replacement starts from it exactly as from a checkpoint.

use lockstep_storage::{Checkpoint, DType, Manifest, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Snapshot, TrainerState};
use crate::collective::{Collective, TcpRing};
use crate::error::{Error, Result};

/// How a rank of a coordinated gang re-forms it after losing a peer.
pub trait Regroup: Send + Sync + std::fmt::Debug {
    /// Leaves the broken ring, holding the state of finished step `holds_step`; returns once
    /// the gang (the survivors and the replacement) has re-formed, or the coordinator gave up
    /// re-forming it and asks for an emergency checkpoint.
    fn regroup(&self, holds_step: u64) -> Result<Reunion>;
}

/// How a regroup ended.
#[derive(Debug)]
pub enum Reunion {
    /// The gang re-formed with a replacement.
    Reformed(Regrouped),
    /// It could not: the survivors holding the newest state write it as an emergency
    /// checkpoint, then the gang restarts from it.
    Emergency(Emergency),
}

/// An emergency checkpoint the coordinator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emergency {
    /// Its step.
    pub step: u64,
    /// The ranks that write it, in shard order (shard `i` is `writers[i]`'s).
    pub writers: Vec<u32>,
}

/// A re-formed gang.
#[derive(Debug)]
pub struct Regrouped {
    /// The new ring (same ranks, new connections).
    pub ring: TcpRing,
    /// The rank that streams its state to the others.
    pub from: usize,
    /// The step of that state.
    pub step: u64,
}

/// The header of a state transfer: what the body holds.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    step: u64,
    state: TrainerState,
    tensors: Vec<Entry>,
    /// xxh3-128 of the body, 32 hex digits.
    hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    shape: Vec<u64>,
    bytes: u64,
}

/// The longest header a rank accepts (a trainer state and a tensor list).
const MAX_HEADER: u64 = 64 << 20;

fn xxh3_128(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// Streams `snap` from this rank (the root) to every other rank of `collective`.
pub fn send_state(snap: &Snapshot, collective: &mut dyn Collective) -> Result<()> {
    let root = collective.rank();
    let total: usize = snap.tensors.iter().map(|t| t.data.len()).sum();
    let mut body = Vec::with_capacity(total);
    for t in &snap.tensors {
        body.extend_from_slice(&t.data);
    }
    let header = Header {
        step: snap.step,
        state: snap.state.clone(),
        tensors: snap
            .tensors
            .iter()
            .map(|t| Entry {
                name: t.name.clone(),
                shape: t.shape.clone(),
                bytes: t.data.len() as u64,
            })
            .collect(),
        hash: xxh3_128(&body),
    };
    let mut head = serde_json::to_vec(&header)
        .map_err(|e| Error::Internal(format!("cannot serialise the state to send: {e}")))?;
    let mut sizes = [0u8; 16];
    sizes[..8].copy_from_slice(&(head.len() as u64).to_le_bytes());
    sizes[8..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    collective.broadcast(&mut sizes, root)?;
    collective.broadcast(&mut head, root)?;
    collective.broadcast(&mut body, root)?;
    Ok(())
}

/// Receives the state `from` streams ([`send_state`]) and checks it: at most `max_body` bytes of
/// tensors, sizes that add up, the hash, and the `step` the coordinator announced. Returns it as an in-memory checkpoint of `job`
/// (what a resume reads), with the step it holds.
pub fn receive_state(
    from: usize,
    step: u64,
    max_body: u64,
    job: &str,
    collective: &mut dyn Collective,
) -> Result<Checkpoint> {
    let bad = |what: String| {
        Error::Internal(format!("the state rank {from} sent cannot be used: {what}"))
    };
    let mut sizes = [0u8; 16];
    collective.broadcast(&mut sizes, from)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(&sizes[..8]);
    let head_len = u64::from_le_bytes(word);
    word.copy_from_slice(&sizes[8..]);
    let body_len = u64::from_le_bytes(word);
    if head_len > MAX_HEADER || body_len > max_body {
        return Err(bad(format!(
            "{head_len} header and {body_len} tensor bytes, more than this job's model can \
             hold ({max_body} bytes)"
        )));
    }
    let mut head = vec![0u8; head_len as usize];
    collective.broadcast(&mut head, from)?;
    let mut body = vec![0u8; body_len as usize];
    collective.broadcast(&mut body, from)?;
    let header: Header =
        serde_json::from_slice(&head).map_err(|e| bad(format!("its header: {e}")))?;
    let hash = xxh3_128(&body);
    if hash != header.hash {
        return Err(bad(format!(
            "its tensors hash to {hash}, the sender said {}",
            header.hash
        )));
    }
    let mut at = 0usize;
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for e in header.tensors {
        let numel = e
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(4));
        let end = at.checked_add(e.bytes as usize);
        match (numel, end) {
            (Some(n), Some(end)) if n == e.bytes && end <= body.len() => {
                tensors.push(Tensor {
                    name: e.name,
                    dtype: DType::F32,
                    shape: e.shape,
                    data: body[at..end].to_vec(),
                });
                at = end;
            }
            _ => {
                return Err(bad(format!(
                    "tensor `{}` of shape {:?} does not fit its {} bytes",
                    e.name, e.shape, e.bytes
                )));
            }
        }
    }
    if at != body.len() {
        return Err(bad(format!(
            "{} bytes follow its last tensor",
            body.len() - at
        )));
    }
    if header.step != step {
        return Err(bad(format!(
            "it is of step {}, the coordinator announced step {step}",
            header.step
        )));
    }
    if header.state.step != header.step {
        return Err(bad(format!(
            "it says step {} but its trainer state is of step {}",
            header.step, header.state.step
        )));
    }
    let trainer_state = serde_json::to_value(&header.state)
        .map_err(|e| Error::Internal(format!("cannot re-serialise a trainer state: {e}")))?;
    Ok(Checkpoint {
        manifest: Manifest {
            format: lockstep_storage::format::manifest::MANIFEST_FORMAT.to_string(),
            version: lockstep_storage::format::FORMAT_VERSION,
            job: job.to_string(),
            step: header.step,
            world_size: header.state.world_size,
            config_hash: String::new(),
            parent: None,
            created_unix_ms: 0,
            shards: Vec::new(),
            tensors: Vec::new(),
            trainer_state,
        },
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use bytes::Bytes;
    use lockstep_storage::TensorInput;

    use super::*;
    use crate::collective::CollectiveError;
    use crate::model::LlamaConfig;
    use crate::plan::Plan;

    /// Two ranks of a gang in one process: rank 0's broadcasts arrive at rank 1, through
    /// `tamper` on the way.
    struct Pipe {
        rank: usize,
        tx: Option<mpsc::Sender<Vec<u8>>>,
        rx: Option<mpsc::Receiver<Vec<u8>>>,
    }

    impl Collective for Pipe {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), CollectiveError> {
            Err(CollectiveError::Broken)
        }
        fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError> {
            assert_eq!(root, 0);
            match (&self.tx, &self.rx) {
                (Some(tx), _) => {
                    tx.send(buf.to_vec()).map_err(|_| CollectiveError::Broken)?;
                }
                (_, Some(rx)) => {
                    let got = rx.recv().map_err(|_| CollectiveError::Broken)?;
                    if got.len() != buf.len() {
                        return Err(CollectiveError::Protocol {
                            peer: 0,
                            what: "length".into(),
                        });
                    }
                    buf.copy_from_slice(&got);
                }
                _ => unreachable!(),
            }
            Ok(())
        }
        fn barrier(&mut self) -> Result<(), CollectiveError> {
            Ok(())
        }
    }

    fn snapshot() -> Snapshot {
        let config = lockstep_api::testing::TestJob::tiny("xfer")
            .config()
            .unwrap();
        let plan = Plan::new(&config, 0, 2, None);
        let model = LlamaConfig::from_section(&config.model, config.data.seq_len as usize);
        let mut state = plan.trainer_state(&config, &model, None);
        state.step = 7;
        state.cursor = 56;
        let tensor = |name: &str, n: usize, v: f32| TensorInput {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n as u64, 1],
            data: Bytes::from(
                (0..n)
                    .flat_map(|i| (v + i as f32).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        };
        Snapshot {
            step: 7,
            tensors: vec![tensor("a", 5, 1.0), tensor("optim.exp_avg/a", 5, 2.0)],
            state,
        }
    }

    /// Sends `snap` from rank 0 and receives it on rank 1, each message through `tamper`.
    fn transfer(
        snap: &Snapshot,
        max: u64,
        tamper: impl Fn(usize, &mut Vec<u8>),
    ) -> Result<Checkpoint> {
        let (tx, rx) = mpsc::channel();
        let (tx2, rx2) = mpsc::channel();
        let mut root = Pipe {
            rank: 0,
            tx: Some(tx),
            rx: None,
        };
        send_state(snap, &mut root)?;
        for (i, mut m) in rx.try_iter().enumerate() {
            tamper(i, &mut m);
            tx2.send(m).unwrap();
        }
        drop(tx2);
        let mut other = Pipe {
            rank: 1,
            tx: None,
            rx: Some(rx2),
        };
        receive_state(0, 7, max, "xfer", &mut other)
    }

    #[test]
    fn the_state_arrives_as_sent_and_reads_as_a_checkpoint_of_its_step() {
        let snap = snapshot();
        let got = transfer(&snap, 1 << 20, |_, _| {}).unwrap();
        assert_eq!(got.manifest.step, 7);
        assert_eq!(got.manifest.job, "xfer");
        let state: TrainerState = serde_json::from_value(got.manifest.trainer_state).unwrap();
        assert_eq!(state, snap.state);
        assert_eq!(got.tensors.len(), 2);
        for (a, b) in got.tensors.iter().zip(&snap.tensors) {
            assert_eq!(
                (&a.name, &a.shape, &a.data[..]),
                (&b.name, &b.shape, &b.data[..])
            );
        }
    }

    #[test]
    fn a_damaged_or_oversized_state_is_refused_by_name() {
        let snap = snapshot();
        // Message 2 is the tensors' bytes: one bit flipped on the way.
        let e = transfer(&snap, 1 << 20, |i, m| {
            if i == 2 {
                m[3] ^= 1;
            }
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("hash") && e.contains("rank 0"), "{e}");
        // More tensor bytes than the job's model can hold: refused before any is allocated.
        let e = transfer(&snap, 16, |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("more than this job's model can hold"), "{e}");
        // A header whose tensor list does not add up to the bytes.
        let e = transfer(&snap, 1 << 20, |i, m| {
            if i == 1 {
                let s = String::from_utf8(m.clone()).unwrap().replacen(
                    "\"bytes\":20",
                    "\"bytes\":24",
                    1,
                );
                *m = s.into_bytes();
            }
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be used"), "{e}");
    }
}
