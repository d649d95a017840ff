//! What the proxy reads and writes: [`Stream`], a plain TCP connection or any other byte
//! stream (a TLS session, a stream inside a multiplexed tunnel), so the node-to-node
//! transport can change without the outbound and inbound paths knowing; and [`forward`],
//! which joins two of them until both sides are done or neither has sent a byte for the
//! idle timeout.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};

use tokio::time::Instant;

use crate::metrics::Metrics;

/// Any bidirectional byte stream the proxy can forward.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection to or from the proxy.
pub enum Stream {
    Tcp(TcpStream),
    Other(Box<dyn Io>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Self::Tcp(s)
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(s) => write!(f, "Tcp({:?} -> {:?})", s.local_addr(), s.peer_addr()),
            Self::Other(_) => f.write_str("Other"),
        }
    }
}

impl Stream {
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(s) => Some(s),
            Self::Other(_) => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Other($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Other(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// Buffer per direction when forwarding: large enough that bulk transfers move in few
/// system calls.
const FORWARD_BUF: usize = 64 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished (each half-close passed on).
    Done,
    /// Neither side sent a byte for the idle timeout.
    Idle,
    /// One side failed (reset, broken pipe).
    Error(io::ErrorKind),
}

impl Ended {
    /// How telemetry names it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Idle => "idle-timeout",
            Self::Error(_) => "error",
        }
    }
}

/// What one forwarded connection carried, and how it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub ended: Ended,
    /// Bytes from the client to the server.
    pub sent: u64,
    /// Bytes from the server to the client.
    pub received: u64,
}

/// Copy both directions until both are done, passing each half-close on, or until neither
/// side has sent anything for `idle`. Bytes are added to the metrics either way.
pub async fn forward(
    m: &Metrics,
    client: impl AsyncRead + AsyncWrite + Unpin,
    server: impl AsyncRead + AsyncWrite + Unpin,
    idle: Duration,
) -> Forwarded {
    let clock = Clock::start();
    let mut client = Touch {
        inner: client,
        clock: clock.clone(),
        bytes: 0,
    };
    let mut server = Touch {
        inner: server,
        clock: clock.clone(),
        bytes: 0,
    };
    let ended = {
        let copy = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut server,
            FORWARD_BUF,
            FORWARD_BUF,
        );
        tokio::select! {
            r = copy => match r {
                Ok(_) => Ended::Done,
                Err(e) => Ended::Error(e.kind()),
            },
            () = clock.idle_for(idle) => Ended::Idle,
        }
    };
    m.bytes_client_to_server.fetch_add(client.bytes, Relaxed);
    m.bytes_server_to_client.fetch_add(server.bytes, Relaxed);
    if ended == Ended::Idle {
        Metrics::inc(&m.tcp_idle_timeouts);
    }
    let _ = client.inner.shutdown().await;
    let _ = server.inner.shutdown().await;
    Forwarded {
        ended,
        sent: client.bytes,
        received: server.bytes,
    }
}

/// When something last happened on a connection, for idle timeouts. Cheap to touch from
/// the hot path (one relaxed store); follows tokio's clock, so tests can pause time.
#[derive(Clone)]
pub struct Clock {
    start: Instant,
    /// Nanoseconds after `start` of the last activity.
    last: Arc<AtomicU64>,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_nanos() as u64, Relaxed);
    }

    /// Resolves once the last activity is `idle` in the past.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.start + Duration::from_nanos(self.last.load(Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A stream that notes when it last received bytes and how many.
struct Touch<T> {
    inner: T,
    clock: Clock,
    bytes: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Touch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.bytes += n as u64;
            this.clock.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt as _};

    #[tokio::test]
    async fn forwards_both_ways_and_passes_the_half_close_on() {
        let (mut app, client_side) = duplex(1024);
        let (server_side, mut srv) = duplex(1024);
        let fwd = tokio::spawn(async move {
            let m = Metrics::default();
            let f = forward(&m, client_side, server_side, Duration::from_secs(5)).await;
            (f.ended, f.sent, m.bytes_client_to_server.load(Relaxed))
        });
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = vec![];
        srv.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        srv.write_all(b"pong").await.unwrap();
        srv.shutdown().await.unwrap();
        let mut back = vec![];
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(fwd.await.unwrap(), (Ended::Done, 4, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_ends_at_the_idle_timeout() {
        let m = Metrics::default();
        let (_app, client_side) = duplex(64);
        let (server_side, _srv) = duplex(64);
        let t0 = tokio::time::Instant::now();
        let f = forward(&m, client_side, server_side, Duration::from_secs(30)).await;
        assert_eq!(f.ended, Ended::Idle);
        assert!(t0.elapsed() >= Duration::from_secs(30));
        assert_eq!(m.tcp_idle_timeouts.load(Relaxed), 1);
    }
}
