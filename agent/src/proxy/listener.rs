//! The accept loop every per-pod listener shares: admit each connection against the
//! connection limits, hand it to its handler in a task of its own, back off when accepting
//! fails (out of file descriptors, say) and never give up, stop when draining begins.

use std::{
    future::Future,
    net::{SocketAddr, SocketAddrV4},
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use super::conn::{ConnCtx, Drain, Pod};
use crate::metrics::Metrics;

/// A listener inside one pod, and the pod.
pub struct PodListener {
    pub listener: TcpListener,
    pub pod: Arc<Pod>,
}

impl PodListener {
    /// Accept until draining begins, handing each admitted connection to `handle` in its
    /// own task. A connection over a limit is reset at once (counted and logged by the
    /// tracker).
    pub async fn serve<F, Fut>(self, handle: F)
    where
        F: Fn(ConnCtx, TcpStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self { listener, pod } = self;
        let inputs = &pod.inputs;
        let drain = inputs.drain.clone();
        let mut backoff = Backoff::new(&inputs.metrics.accept_errors);
        while let Some((conn, peer)) =
            next_connection(&listener, &drain, &mut backoff, "a pod listener").await
        {
            match inputs.conns.admit(&pod.conns, pod.ip) {
                Ok(permit) => {
                    let _ = conn.set_nodelay(true);
                    let ctx = ConnCtx {
                        pod: pod.clone(),
                        peer,
                        permit: Arc::new(permit),
                    };
                    tokio::spawn(handle(ctx, conn));
                }
                Err(_) => {
                    // Its capture record (outbound connections have one) is not needed.
                    let _ = inputs.capture.orig_dst(pod.sockets.netns_cookie(), peer);
                    reset(&conn);
                }
            }
        }
    }
}

/// The next IPv4 connection `listener` accepts, or `None` once draining begins. Accept
/// errors are counted and backed off, never given up on.
pub async fn next_connection(
    listener: &TcpListener,
    drain: &Drain,
    backoff: &mut Backoff<'_>,
    what: &str,
) -> Option<(TcpStream, SocketAddrV4)> {
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            () = drain.signaled() => return None,
        };
        match accepted {
            Ok((conn, SocketAddr::V4(peer))) => {
                backoff.succeeded();
                return Some((conn, peer));
            }
            Ok(_) => {}
            Err(e) => backoff.failed(&e, what).await,
        }
    }
}

/// Refuse a connection with a reset when it is dropped: it tells the client at once, where
/// a plain close would look like an answer with nothing in it.
pub fn reset(conn: &TcpStream) {
    let _ = socket2::SockRef::from(conn).set_linger(Some(Duration::ZERO));
}

/// What an accept loop does when accepting fails: count it, say so now and then, and wait
/// a little longer each time (5 ms doubling to 1 s) so a full file table is not spun on.
pub struct Backoff<'a> {
    wait: Duration,
    counter: &'a AtomicU64,
    last_log: AtomicU64,
}

impl<'a> Backoff<'a> {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new(counter: &'a AtomicU64) -> Self {
        Self {
            wait: Self::FIRST,
            counter,
            last_log: AtomicU64::new(0),
        }
    }

    pub async fn failed(&mut self, e: &std::io::Error, what: &str) {
        Metrics::inc(self.counter);
        if super::conn::log_due(&self.last_log) {
            tracing::warn!(error = %e, listener = what, retry_in_ms = self.wait.as_millis() as u64, "accepting a connection failed; backing off");
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Self::MAX);
    }

    pub fn succeeded(&mut self) {
        self.wait = Self::FIRST;
    }
}
