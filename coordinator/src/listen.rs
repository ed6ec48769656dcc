//! Accepting connections without being taken down by them: at most [`MAX_CONNECTIONS`] at
//! once (more wait in the kernel's backlog), a connection that sends nothing within
//! [`FIRST_BYTE_TIMEOUT`] is closed, and an accept error (out of file descriptors) backs off
//! instead of spinning. Used by the gRPC server and the metrics endpoint.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Connections served at once: every rank of the largest gang keeps one, plus room for users.
pub const MAX_CONNECTIONS: usize = lockstep_api::config::limits::MAX_WORLD_SIZE as usize + 512;
/// A connection must send its first [`OPENING_BYTES`] within this (an HTTP/2 client's preface
/// is 24 bytes; after it, HTTP/2 PINGs find peers that stop answering).
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a new connection must send before [`FIRST_BYTE_TIMEOUT`].
pub const OPENING_BYTES: usize = 24;
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An accepted connection; it holds one of the [`MAX_CONNECTIONS`] slots while open.
pub struct Conn {
    stream: TcpStream,
    first_byte: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far while the opening deadline runs.
    opened: usize,
    _slot: OwnedSemaphorePermit,
}

/// Accepted connections of `listener`, at most `max` open at once.
pub fn incoming(listener: TcpListener, max: usize) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        loop {
            // At capacity, stop accepting: new connections wait in the backlog.
            let slot = slots.clone().acquire_owned().await.ok()?;
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = Conn {
                        stream,
                        first_byte: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_TIMEOUT))),
                        opened: 0,
                        _slot: slot,
                    };
                    return Some((Ok(conn), (listener, slots)));
                }
                Err(e) => {
                    drop(slot);
                    tracing::warn!(error = %e, "cannot accept a connection; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.first_byte.is_some() {
            match &r {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    self.opened += buf.filled().len() - before;
                    if self.opened >= OPENING_BYTES {
                        self.first_byte = None;
                    }
                }
                Poll::Pending => {
                    if let Some(deadline) = self.first_byte.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client did not open the connection in time",
                        )));
                    }
                }
                _ => {}
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_silent_ones_are_closed() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut conns = Box::pin(incoming(l, 2));
        let _a = TcpStream::connect(addr).await.expect("a");
        let mut b = TcpStream::connect(addr).await.expect("b");
        let _c = TcpStream::connect(addr).await.expect("c");
        let first = conns.next().await.expect("one").expect("ok");
        let mut second = conns.next().await.expect("two").expect("ok");
        // A third is not accepted while two are open.
        let third = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
        assert!(third.is_err(), "a third connection was accepted");
        // A connection that talks works; a silent one is cut at the first-byte timeout.
        b.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        second.read_exact(&mut one).await.expect("read");
        drop(second);
        let mut first = first;
        tokio::time::pause();
        let r = first.read(&mut one).await;
        assert_eq!(r.expect_err("silent").kind(), io::ErrorKind::TimedOut);
        tokio::time::resume();
        // Slots freed: the waiting connection is accepted now.
        drop(first);
        let _third = tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .expect("accepted after a slot freed");
    }
}
