//! Forming the ring: each rank connects to the next and accepts the previous, and both ends
//! prove with an HMAC-SHA256 over fresh nonces that they hold the gang's [`RingKey`]. A
//! connection that cannot prove it (a stranger, another gang, an older attempt) is dropped and
//! accepting goes on; a peer of this gang that speaks another protocol version or claims
//! another gang shape is an error.
//!
//! Wire: the connector sends `header | nonce` (16 + 16 bytes); the acceptor answers
//! `header | nonce | HMAC("accept", transcript)` (16 + 16 + 32); the connector checks it and
//! sends `HMAC("connect", transcript)` (32). A header is magic, version, rank, world (u32 LE).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::CollectiveError;

pub(super) const MAGIC: u32 = 0x4C53_5452; // "LSTR"
/// 2: the handshake carries nonces and HMACs.
pub(super) const VERSION: u32 = 2;
/// How long an accepted connection has to introduce itself before it is dropped.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

type Mac = hmac::Hmac<sha2::Sha256>;

/// The secret a gang's ranks prove they share when they connect.
#[derive(Clone)]
pub struct RingKey([u8; 32]);

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

impl RingKey {
    /// A key from `secret` (the job token) bound to `context` (job and attempt), so a worker of
    /// another job or of an older attempt cannot connect.
    pub fn derive(secret: &[u8], context: &str) -> RingKey {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"lockstep ring key v2\0");
        h.update(context.as_bytes());
        h.update(b"\0");
        h.update(secret);
        RingKey(h.finalize().into())
    }

    fn tag(&self, role: &[u8], transcript: &[u8]) -> Mac {
        use hmac::Mac as _;
        // HMAC takes keys of any length; 32 bytes cannot fail.
        let mut m = <Mac as hmac::digest::KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(role);
        m.update(transcript);
        m
    }

    fn sign(&self, role: &[u8], transcript: &[u8]) -> [u8; 32] {
        use hmac::Mac as _;
        self.tag(role, transcript).finalize().into_bytes().into()
    }

    fn verify(&self, role: &[u8], transcript: &[u8], tag: &[u8]) -> bool {
        use hmac::Mac as _;
        self.tag(role, transcript).verify_slice(tag).is_ok()
    }
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    if getrandom::fill(&mut n).is_err() {
        // No OS entropy: still unique per connection (time and pid), if not secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        n = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    n
}
pub(super) fn header(rank: usize, world: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

pub(super) fn word(h: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]])
}

/// Whether to give up forming the ring, and why (a member was lost as it formed).
pub type Abandon<'a> = &'a (dyn Fn() -> Option<String> + Sync);

/// Connects to the next rank (retrying while it is not yet listening, until `deadline` or
/// `abandon` says to give up) and introduces this rank.
pub(super) fn connect_next(
    rank: usize,
    world: usize,
    next: usize,
    addr: &str,
    deadline: Instant,
    key: &RingKey,
    abandon: Abandon<'_>,
) -> Result<TcpStream, CollectiveError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let fail = |reason: String| CollectiveError::Connect {
        peer: next,
        addr: addr.to_string(),
        timeout,
        reason,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("the address resolves to nothing".into()))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail("timed out".into()));
        }
        if let Some(why) = abandon() {
            return Err(CollectiveError::Abandoned(why));
        }
        // A bounded try, so that `abandon` is heard while a peer does not answer.
        match TcpStream::connect_timeout(&target, left.min(Duration::from_secs(1))) {
            Ok(mut s) => {
                // hello: header + nonce; the acceptor answers with its header, nonce and proof;
                // this rank checks it and sends its own proof.
                let mut hello = [0u8; 32];
                hello[..16].copy_from_slice(&header(rank, world));
                hello[16..].copy_from_slice(&nonce());
                s.set_write_timeout(Some(left))
                    .and_then(|_| s.set_read_timeout(Some(left)))
                    .and_then(|_| s.write_all(&hello))
                    .map_err(|e| fail(e.to_string()))?;
                let mut answer = [0u8; 64];
                s.read_exact(&mut answer).map_err(|e| fail(e.to_string()))?;
                let ack: [u8; 16] = answer[..16].try_into().unwrap_or([0; 16]);
                if word(&ack, 0) != MAGIC || word(&ack, 2) as usize != next {
                    return Err(fail(format!("the peer is not lockstep rank {next}")));
                }
                let transcript = [&hello[..], &answer[..32]].concat();
                if !key.verify(b"accept", &transcript, &answer[32..]) {
                    return Err(fail(format!(
                        "the peer at {addr} could not prove it is rank {next} of this gang \
                         (another job, an older attempt, or not lockstep)"
                    )));
                }
                s.write_all(&key.sign(b"connect", &transcript))
                    .map_err(|e| fail(e.to_string()))?;
                return Ok(s);
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(fail(e.to_string()));
                }
                // Not listening yet: the gang starts in any order.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Handshakes heard at once on a ring port.
const MAX_HANDSHAKES: usize = 64;

/// Accepts the previous rank's connection and checks who it is (until `deadline`, or
/// `abandon` says to give up).
pub(super) fn accept_prev(
    listener: &TcpListener,
    world: usize,
    prev: usize,
    deadline: Instant,
    key: &RingKey,
    abandon: Abandon<'_>,
) -> Result<TcpStream, CollectiveError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let fail = |reason: String| CollectiveError::Connect {
        peer: prev,
        addr: addr.clone(),
        timeout,
        reason,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    // Each accepted connection is heard on its own thread, so a stranger that dribbles its
    // hello (up to HELLO_TIMEOUT) delays nobody; beyond MAX_HANDSHAKES at once, connections
    // wait in the listen backlog (the real peer's connect waits there too, not refused).
    let (tx, rx) = std::sync::mpsc::channel();
    let mut in_flight = 0usize;
    let mut last_refusal: Option<String> = None;
    loop {
        while let Ok(heard) = rx.try_recv() {
            in_flight -= 1;
            match heard {
                Ok(s) => return Ok(s),
                Err(Refusal::Fatal(e)) => return Err(e),
                Err(Refusal::Ignore(why)) => {
                    // A stranger (or a rank of another gang): dropped; keep accepting.
                    tracing::warn!(reason = %why, "refused a connection on the ring port");
                    last_refusal = Some(why);
                }
            }
        }
        if in_flight < MAX_HANDSHAKES {
            match listener.accept() {
                Ok((s, _)) => {
                    let (tx, key) = (tx.clone(), key.clone());
                    in_flight += 1;
                    let spawned =
                        std::thread::Builder::new()
                            .name("ring-hello".into())
                            .spawn(move || {
                                let _ = tx.send(hello_from_prev(s, world, prev, deadline, &key));
                            });
                    if let Err(e) = spawned {
                        return Err(fail(format!("cannot start a handshake thread: {e}")));
                    }
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        if let Some(why) = abandon() {
            return Err(CollectiveError::Abandoned(why));
        }
        if Instant::now() >= deadline {
            return Err(fail(match &last_refusal {
                Some(why) => format!("no authenticated connection from it (refused: {why})"),
                None => "no connection from it".into(),
            }));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads exactly `buf.len()` bytes by `until` (an absolute deadline, not one per read).
fn read_by(s: &mut TcpStream, buf: &mut [u8], until: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum Refusal {
    /// Not our peer: drop the connection and keep accepting.
    Ignore(String),
    /// Our peer, but it cannot work (another protocol version or gang shape).
    Fatal(CollectiveError),
}

/// The previous rank's side of the handshake, on an accepted connection: its hello, this
/// rank's answer and proof, its proof.
fn hello_from_prev(
    mut s: TcpStream,
    world: usize,
    prev: usize,
    deadline: Instant,
    key: &RingKey,
) -> Result<TcpStream, Refusal> {
    let ignore = |why: &str| Refusal::Ignore(why.to_string());
    // One deadline for the whole handshake, however the peer dribbles its bytes.
    let until = deadline.min(Instant::now() + HELLO_TIMEOUT);
    s.set_nonblocking(false)
        .map_err(|e| ignore(&e.to_string()))?;
    let mut hello = [0u8; 32];
    if read_by(&mut s, &mut hello, until).is_err() {
        return Err(ignore("it sent no hello in time"));
    }
    let h: [u8; 16] = hello[..16].try_into().unwrap_or([0; 16]);
    if word(&h, 0) != MAGIC {
        return Err(ignore("not a lockstep rank"));
    }
    // Before it has proven anything, a peer cannot end the ring: another version is a
    // refusal like any other (the ring's timeout error then names it).
    if word(&h, 1) != VERSION {
        return Err(ignore(&format!(
            "it speaks ring protocol version {}, this rank {VERSION}",
            word(&h, 1)
        )));
    }
    let me = (prev + 1) % world;
    let mut answer = [0u8; 64];
    answer[..16].copy_from_slice(&header(me, world));
    answer[16..32].copy_from_slice(&nonce());
    let transcript = [&hello[..], &answer[..32]].concat();
    answer[32..].copy_from_slice(&key.sign(b"accept", &transcript));
    let mut proof = [0u8; 32];
    let left = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    if s.set_write_timeout(Some(left)).is_err()
        || s.write_all(&answer).is_err()
        || read_by(&mut s, &mut proof, until).is_err()
    {
        return Err(ignore("it did not finish the handshake"));
    }
    if !key.verify(b"connect", &transcript, &proof) {
        return Err(ignore(&format!(
            "it claimed to be rank {} but could not prove it belongs to this gang",
            word(&h, 2)
        )));
    }
    if word(&h, 3) as usize != world || word(&h, 2) as usize != prev {
        return Err(Refusal::Fatal(CollectiveError::Protocol {
            peer: word(&h, 2) as usize,
            what: format!(
                "connected as rank {} of {}; expected rank {prev} of {world}",
                word(&h, 2),
                word(&h, 3)
            ),
        }));
    }
    Ok(s)
}
