//! All-reduce over a ring of TCP connections: each rank connects to the next and accepts the
//! previous, once, and keeps both connections.
//!
//! `all_reduce_sum` is reduce-scatter then all-gather over `W` segments of the buffer. In each of
//! the `W - 1` steps of each phase a rank sends one segment to the next rank while it receives
//! another from the previous one, chunk by chunk (256 KiB), adding each chunk as it arrives: the
//! send runs on its own thread, so sending, receiving and summing overlap, and at most one chunk
//! is buffered. Each segment's sum is computed once, by one rank, in ring order, and the
//! all-gather copies its bits, so every rank ends with identical results.
//!
//! Forming the ring is authenticated ([`super::handshake`]): both ends of each connection
//! prove that they hold the gang's [`RingKey`] (derived from the job token and attempt under a
//! coordinator), so a stranger cannot join the ring or inject gradients.
//!
//! Sockets carry read and write timeouts: a peer that closes (dies) fails the operation at once
//! (`PeerLost`); one that stops sending (hung, or waiting on a dead rank) fails it after the
//! timeout (`Timeout`). Either way the ring is then broken.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub use super::handshake::RingKey;
use super::handshake::{Abandon, accept_prev, connect_next};
use super::{Collective, CollectiveError};

#[cfg(not(target_endian = "little"))]
compile_error!("the TCP ring sends f32 in native byte order and assumes little-endian peers");

/// Floats per chunk (256 KiB).
const CHUNK: usize = 64 * 1024;

/// A ring of `W` ranks over TCP. See the module docs.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Connections to the next and from the previous rank (`None` at world size 1).
    links: Option<Links>,
    broken: bool,
    scratch: Vec<f32>,
}

#[derive(Debug)]
struct Links {
    next: TcpStream,
    prev: TcpStream,
}

impl TcpRing {
    /// Listens on `peers[rank]` and forms the ring with the other ranks (`peers` lists every
    /// rank's `host:port`, in rank order), waiting up to `timeout` for them.
    pub fn connect(
        rank: usize,
        peers: &[String],
        timeout: Duration,
        key: &RingKey,
    ) -> Result<TcpRing, CollectiveError> {
        let addr = peers.get(rank).ok_or_else(|| CollectiveError::Protocol {
            peer: rank,
            what: format!("rank {rank} is outside a peer list of {}", peers.len()),
        })?;
        let listener = TcpListener::bind(addr).map_err(|source| CollectiveError::Bind {
            addr: addr.clone(),
            source,
        })?;
        TcpRing::with_listener(listener, rank, peers, timeout, key)
    }

    /// A ring of one rank: every operation is a no-op. Lets a collective that bootstraps over
    /// the ring (NCCL) run at world size 1.
    pub fn alone(timeout: Duration) -> TcpRing {
        TcpRing {
            rank: 0,
            world: 1,
            timeout,
            links: None,
            broken: false,
            scratch: Vec::new(),
        }
    }

    /// As [`TcpRing::connect`], with this rank's listener already bound (tests bind port 0).
    pub fn with_listener(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        timeout: Duration,
        key: &RingKey,
    ) -> Result<TcpRing, CollectiveError> {
        TcpRing::with_listener_unless(listener, rank, peers, timeout, key, &|| None)
    }

    /// As [`TcpRing::with_listener`], giving up as soon as `abandon` says why (a member was
    /// lost as the ring formed) instead of waiting out `timeout` for it.
    pub fn with_listener_unless(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        timeout: Duration,
        key: &RingKey,
        abandon: Abandon<'_>,
    ) -> Result<TcpRing, CollectiveError> {
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::Protocol {
                peer: rank,
                what: format!("rank {rank} is outside a peer list of {world}"),
            });
        }
        let mut ring = TcpRing {
            rank,
            world,
            timeout,
            links: None,
            broken: false,
            scratch: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let (next, prev) = std::thread::scope(|s| {
            let next = s.spawn(|| {
                connect_next(
                    rank,
                    world,
                    next_rank,
                    &peers[next_rank],
                    deadline,
                    key,
                    abandon,
                )
            });
            let prev = accept_prev(&listener, world, prev_rank, deadline, key, abandon);
            let next = next.join().unwrap_or_else(|_| {
                Err(CollectiveError::Protocol {
                    peer: next_rank,
                    what: "the connecting thread panicked".into(),
                })
            });
            (next, prev)
        });
        let (next, prev) = (next?, prev?);
        for s in [&next, &prev] {
            let set = s
                .set_nodelay(true)
                .and_then(|_| s.set_read_timeout(Some(timeout)))
                .and_then(|_| s.set_write_timeout(Some(timeout)));
            if let Err(source) = set {
                return Err(CollectiveError::PeerLost {
                    peer: next_rank,
                    op: "configure socket",
                    source,
                });
            }
        }
        ring.links = Some(Links { next, prev });
        Ok(ring)
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Runs `f` unless broken; breaks on error.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut TcpRing) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        if self.broken {
            return Err(CollectiveError::Broken);
        }
        let r = f(self);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// One step: send `buf[send]` to the next rank while receiving the previous rank's copy of
    /// `buf[recv]`, added into it (`add`) or written over it.
    fn exchange(
        &mut self,
        buf: &mut [f32],
        send: std::ops::Range<usize>,
        recv: std::ops::Range<usize>,
        add: bool,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let (src, dst) = disjoint(buf, send, recv);
        let scratch = &mut self.scratch;
        let next = &mut links.next;
        let prev = &mut links.prev;
        std::thread::scope(|s| {
            let sender = s.spawn(move || {
                for chunk in src.chunks(CHUNK) {
                    next.write_all(bytemuck::cast_slice(chunk))
                        .map_err(|e| io_error(e, next_rank, op, timeout))?;
                }
                Ok::<(), CollectiveError>(())
            });
            let received = (|| {
                for chunk in dst.chunks_mut(CHUNK) {
                    if add {
                        scratch.resize(chunk.len(), 0.0);
                        prev.read_exact(bytemuck::cast_slice_mut(&mut scratch[..]))
                            .map_err(|e| io_error(e, prev_rank, op, timeout))?;
                        for (d, x) in chunk.iter_mut().zip(scratch.iter()) {
                            *d += *x;
                        }
                    } else {
                        prev.read_exact(bytemuck::cast_slice_mut(chunk))
                            .map_err(|e| io_error(e, prev_rank, op, timeout))?;
                    }
                }
                Ok::<(), CollectiveError>(())
            })();
            let sent = sender.join().unwrap_or_else(|_| {
                Err(CollectiveError::Protocol {
                    peer: next_rank,
                    what: "the sending thread panicked".into(),
                })
            });
            received.and(sent)
        })
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        self.guarded(|ring| {
            let (w, r, n) = (ring.world, ring.rank, buf.len());
            let seg = |i: usize| i * n / w..(i + 1) * n / w;
            // Reduce-scatter: afterwards rank r holds the full sum of segment (r + 1) % w.
            for step in 0..w - 1 {
                let send = (r + w - step) % w;
                let recv = (r + 2 * w - step - 1) % w;
                ring.exchange(buf, seg(send), seg(recv), true, "all-reduce")?;
            }
            // All-gather: pass the finished segments around.
            for step in 0..w - 1 {
                let send = (r + 1 + w - step) % w;
                let recv = (r + w - step) % w;
                ring.exchange(buf, seg(send), seg(recv), false, "all-reduce")?;
            }
            Ok(())
        })
    }

    fn leave(&mut self) {
        if let Some(links) = self.links.take() {
            let _ = links.next.shutdown(std::net::Shutdown::Both);
            let _ = links.prev.shutdown(std::net::Shutdown::Both);
        }
        self.broken = true;
    }

    fn reform(&mut self, ring: TcpRing) -> Result<(), CollectiveError> {
        if (ring.rank, ring.world) != (self.rank, self.world) {
            return Err(CollectiveError::Protocol {
                peer: ring.rank,
                what: format!(
                    "the re-formed ring makes this rank {} of {}; it was {} of {}",
                    ring.rank, ring.world, self.rank, self.world
                ),
            });
        }
        *self = ring;
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let (next_rank, prev_rank, timeout, rank) =
            (self.next_rank(), self.prev_rank(), self.timeout, self.rank);
        self.guarded(|ring| {
            let Some(links) = ring.links.as_mut() else {
                return Ok(());
            };
            let op = "broadcast";
            if rank != root {
                let mut len = [0u8; 8];
                links
                    .prev
                    .read_exact(&mut len)
                    .map_err(|e| io_error(e, prev_rank, op, timeout))?;
                if u64::from_le_bytes(len) != buf.len() as u64 {
                    return Err(CollectiveError::Protocol {
                        peer: prev_rank,
                        what: format!(
                            "broadcast of {} bytes, this rank expected {}",
                            u64::from_le_bytes(len),
                            buf.len()
                        ),
                    });
                }
                links
                    .prev
                    .read_exact(buf)
                    .map_err(|e| io_error(e, prev_rank, op, timeout))?;
            }
            if next_rank != root {
                links
                    .next
                    .write_all(&(buf.len() as u64).to_le_bytes())
                    .and_then(|_| links.next.write_all(buf))
                    .map_err(|e| io_error(e, next_rank, op, timeout))?;
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [1.0f32];
        self.all_reduce_sum(&mut one)?;
        if one[0] != self.world as f32 {
            self.broken = true;
            return Err(CollectiveError::Protocol {
                peer: self.prev_rank(),
                what: format!("barrier counted {} ranks of {}", one[0], self.world),
            });
        }
        Ok(())
    }
}

/// `buf[a]` and `buf[b]` for disjoint ranges (either may be empty).
fn disjoint(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

fn io_error(
    e: std::io::Error,
    peer: usize,
    op: &'static str,
    timeout: Duration,
) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            CollectiveError::Timeout { peer, op, timeout }
        }
        _ => CollectiveError::PeerLost {
            peer,
            op,
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::handshake::header;
    use super::*;

    /// Forms a ring of `world` threads on loopback and runs `f` on each rank.
    fn gang<T: Send>(world: usize, timeout: Duration, f: impl Fn(TcpRing) -> T + Sync) -> Vec<T> {
        let (listeners, peers) = loopback(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (peers, f) = (&peers, &f);
                    s.spawn(move || {
                        let key = RingKey::derive(b"test", "gang");
                        f(TcpRing::with_listener(l, rank, peers, timeout, &key).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn input(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + rank * 17) % 1000) as f32 * 0.001 + 1.0 / (rank as f32 + 3.0))
            .collect()
    }

    #[test]
    fn every_rank_gets_the_same_bits_for_any_size() {
        for world in 1..=4 {
            for n in [0, 1, 3, 5, 1000, 200_003] {
                let out = gang(world, Duration::from_secs(20), |mut ring| {
                    let mut buf = input(ring.rank(), n);
                    ring.all_reduce_sum(&mut buf).unwrap();
                    ring.all_reduce_sum(&mut buf).unwrap(); // twice: the links are reused
                    buf
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n)).collect();
                for i in 0..n {
                    let want: f64 = inputs.iter().map(|x| x[i] as f64).sum::<f64>() * world as f64;
                    assert!(((out[0][i] as f64) - want).abs() <= 1e-4 * want.abs().max(1.0));
                }
                for o in &out[1..] {
                    assert!(
                        o.iter()
                            .map(|x| x.to_bits())
                            .eq(out[0].iter().map(|x| x.to_bits())),
                        "world {world} n {n}: ranks differ"
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        let out = gang(3, Duration::from_secs(20), |mut ring| {
            let mut id = if ring.rank() == 1 {
                *b"nccl-unique-id!!"
            } else {
                [0u8; 16]
            };
            ring.broadcast(&mut id, 1).unwrap();
            ring.barrier().unwrap();
            id
        });
        assert!(out.iter().all(|id| id == b"nccl-unique-id!!"));
    }

    #[test]
    fn a_dead_rank_is_an_error_naming_a_peer_within_the_timeout() {
        let timeout = Duration::from_secs(2);
        let started = Instant::now();
        let out = gang(3, timeout, |mut ring| {
            if ring.rank() == 2 {
                return None; // dies: its sockets close
            }
            let mut buf = vec![1.0f32; 1 << 20];
            let first = ring.all_reduce_sum(&mut buf).err();
            let again = ring.all_reduce_sum(&mut buf).err();
            assert!(matches!(again, Some(CollectiveError::Broken)));
            first.map(|e| e.to_string())
        });
        assert!(
            started.elapsed() < timeout * 3,
            "took {:?}",
            started.elapsed()
        );
        for e in out.into_iter().take(2) {
            let e = e.expect("a survivor must fail");
            assert!(e.contains("rank"), "{e}");
        }
    }

    /// `n` listeners on loopback and their addresses.
    fn loopback(n: usize) -> (Vec<TcpListener>, Vec<String>) {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let peers = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        (listeners, peers)
    }

    #[test]
    fn strangers_and_other_gangs_cannot_join_the_ring() {
        let (listeners, peers) = loopback(2);
        let key = RingKey::derive(b"job token", "job/1");
        // A stranger connects to rank 1's port first, claiming to be rank 0 with the right
        // header but no key; another gang's rank 0 does the same with its own key.
        let target = peers[1].clone();
        let stranger = std::thread::spawn(move || {
            let mut s = TcpStream::connect(&target).expect("connect");
            let mut hello = [0u8; 32];
            hello[..16].copy_from_slice(&header(0, 2));
            s.write_all(&hello).expect("hello");
            let mut answer = [0u8; 64];
            s.read_exact(&mut answer).expect("answer");
            let _ = s.write_all(&[0u8; 32]); // a forged proof
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            rest.len()
        });
        let other = RingKey::derive(b"another token", "job/1");
        let timeout = Duration::from_secs(20);
        let mut ls = listeners.into_iter();
        let (l0, l1) = (ls.next().expect("l0"), ls.next().expect("l1"));
        let impostor_peers = peers.clone();
        let impostor = std::thread::spawn(move || {
            // Another gang's rank 0: it cannot prove it belongs, so rank 1 ignores it.
            let spare = TcpListener::bind("127.0.0.1:0").expect("bind");
            TcpRing::with_listener(spare, 0, &impostor_peers, Duration::from_secs(2), &other)
                .map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(300));
        let (p0, p1) = (peers.clone(), peers.clone());
        let (k0, k1) = (key.clone(), key.clone());
        let r0 = std::thread::spawn(move || TcpRing::with_listener(l0, 0, &p0, timeout, &k0));
        let r1 = std::thread::spawn(move || TcpRing::with_listener(l1, 1, &p1, timeout, &k1));
        let (mut r0, mut r1) = (
            r0.join().expect("rank 0").expect("ring 0"),
            r1.join().expect("rank 1").expect("ring 1"),
        );
        assert_eq!(
            stranger.join().expect("stranger"),
            0,
            "the stranger got nothing"
        );
        assert!(
            impostor.join().expect("impostor").is_err(),
            "the impostor joined"
        );
        let t = std::thread::spawn(move || {
            let mut b = vec![1.0f32; 8];
            r1.all_reduce_sum(&mut b).map(|()| b)
        });
        let mut a = vec![2.0f32; 8];
        r0.all_reduce_sum(&mut a).expect("all-reduce");
        assert_eq!(a, vec![3.0; 8]);
        assert_eq!(t.join().expect("rank 1").expect("all-reduce"), vec![3.0; 8]);
    }

    #[test]
    fn silent_strangers_do_not_delay_the_ring() {
        let (listeners, peers) = loopback(2);
        // Five connections to rank 1's port that never say a word, queued before rank 0's.
        let silent: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(&peers[1]).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let key = RingKey::derive(b"job token", "job/1");
        let started = Instant::now();
        let mut ls = listeners.into_iter();
        let (l0, l1) = (ls.next().expect("l0"), ls.next().expect("l1"));
        let (p0, p1, k0, k1) = (peers.clone(), peers, key.clone(), key);
        let timeout = Duration::from_secs(60);
        let r0 = std::thread::spawn(move || TcpRing::with_listener(l0, 0, &p0, timeout, &k0));
        let r1 = std::thread::spawn(move || TcpRing::with_listener(l1, 1, &p1, timeout, &k1));
        r0.join().expect("rank 0").expect("ring 0");
        r1.join().expect("rank 1").expect("ring 1");
        // Heard one after another, each would have held rank 1 for its whole 5 s hello
        // timeout (25 s); heard side by side, none holds it at all.
        assert!(
            started.elapsed() < super::super::handshake::HELLO_TIMEOUT,
            "the ring took {:?}",
            started.elapsed()
        );
        drop(silent);
    }

    #[test]
    fn a_ring_whose_member_was_lost_as_it_formed_is_given_up_when_told_not_at_the_timeout() {
        // Rank 1 joined (its address is in the list) and died: it never connects or accepts.
        let (listeners, peers) = loopback(2);
        let mut ls = listeners.into_iter();
        let l0 = ls.next().expect("l0");
        drop(ls);
        let key = RingKey::derive(b"job token", "job/1");
        let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = told.clone();
        let teller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let abandon = || {
            told.load(std::sync::atomic::Ordering::SeqCst)
                .then(|| "rank 1 was lost".to_string())
        };
        // With a timeout no test waits out: only being told ends it.
        let r =
            TcpRing::with_listener_unless(l0, 0, &peers, Duration::from_secs(600), &key, &abandon);
        teller.join().expect("teller");
        match r {
            Err(CollectiveError::Abandoned(why)) => assert_eq!(why, "rank 1 was lost"),
            Err(e) => panic!("expected the ring given up, got {e}"),
            Ok(_) => panic!("a ring formed with a dead member"),
        }
    }
}
