//! The shared L4 proxy. One [`outbound::Outbound`], [`inbound::Inbound`] and
//! [`tunnel::TunnelServer`] per enrolled pod, all reading the same [`ProxyInputs`].
//!
//! Paths a connection can take (see docs/architecture.md for the picture):
//! - outbound, endpoint meshed on this node: delivered inside the endpoint's netns with the
//!   client pod's IP as source ([`deliver`]);
//! - outbound, endpoint meshed on another node: through that node's agent ([`tunnel`]);
//! - outbound, endpoint not meshed: connected from inside the client pod's netns;
//! - inbound (steered by sk_lookup) and tunnelled: delivered like the first case.

pub mod detect;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod sni;
pub mod tunnel;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::watch};

use crate::{netns::PodNetns, state::NodeState};

/// The seam between capture and proxy: where a captured connection wanted to go, and
/// telling inbound capture to let one of the agent's own deliveries through. The agent
/// answers from eBPF maps; tests can answer from a table.
pub trait Capture: Send + Sync + 'static {
    fn orig_dst(&self, netns_cookie: u64, client: SocketAddrV4) -> Option<SocketAddrV4>;
    fn announce_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<()>;
    /// Offer the agent's end of a captured loopback connection for sk_msg acceleration.
    fn accelerate(&self, netns_cookie: u64, conn: &TcpStream) -> std::io::Result<()>;
}

impl Capture for crate::datapath::CaptureMaps {
    fn orig_dst(&self, netns_cookie: u64, client: SocketAddrV4) -> Option<SocketAddrV4> {
        self.orig_dst(netns_cookie, client)
    }

    fn announce_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<()> {
        self.announce_delivery(src, dst)
    }

    fn accelerate(&self, netns_cookie: u64, conn: &TcpStream) -> std::io::Result<()> {
        match (conn.local_addr()?, conn.peer_addr()?) {
            (std::net::SocketAddr::V4(l), std::net::SocketAddr::V4(r)) => {
                self.accelerate(netns_cookie, l, r, conn)
            }
            _ => Ok(()),
        }
    }
}

/// Counters of the proxy, served by the admin API.
#[derive(Debug, Default)]
pub struct Metrics {
    pub outbound_accepted: AtomicU64,
    /// Outbound connections served by the HTTP proxy.
    pub outbound_http: AtomicU64,
    pub outbound_no_orig_dst: AtomicU64,
    pub outbound_no_service: AtomicU64,
    /// TLS connections whose server name no TLSRoute of their service matches.
    pub outbound_no_route: AtomicU64,
    pub outbound_no_endpoint: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    /// Requests sent again under a route's retry policy.
    pub http_retries: AtomicU64,
    /// Retries the retry budget refused (the failure went to the client).
    pub http_retry_budget_exhausted: AtomicU64,
    pub http_ejections: AtomicU64,
    /// Requests and connections the circuit breaker refused.
    pub http_circuit_open: AtomicU64,
    pub http_rate_limited: AtomicU64,
    pub http_faults: AtomicU64,
    pub http_mirrored: AtomicU64,
    /// Mirroring skipped: the body was too large or of unknown length to copy.
    pub http_mirror_skipped: AtomicU64,
    pub inbound_accepted: AtomicU64,
    pub tunnel_accepted: AtomicU64,
    pub tunnel_rejected: AtomicU64,
    pub active: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
}

impl Metrics {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("outbound_accepted", g(&self.outbound_accepted)),
            ("outbound_http", g(&self.outbound_http)),
            ("outbound_no_orig_dst", g(&self.outbound_no_orig_dst)),
            ("outbound_no_service", g(&self.outbound_no_service)),
            ("outbound_no_route", g(&self.outbound_no_route)),
            ("outbound_no_endpoint", g(&self.outbound_no_endpoint)),
            ("upstream_connect_errors", g(&self.upstream_connect_errors)),
            ("http_retries", g(&self.http_retries)),
            (
                "http_retry_budget_exhausted",
                g(&self.http_retry_budget_exhausted),
            ),
            ("http_ejections", g(&self.http_ejections)),
            ("http_circuit_open", g(&self.http_circuit_open)),
            ("http_rate_limited", g(&self.http_rate_limited)),
            ("http_faults", g(&self.http_faults)),
            ("http_mirrored", g(&self.http_mirrored)),
            ("http_mirror_skipped", g(&self.http_mirror_skipped)),
            ("inbound_accepted", g(&self.inbound_accepted)),
            ("tunnel_accepted", g(&self.tunnel_accepted)),
            ("tunnel_rejected", g(&self.tunnel_rejected)),
            ("active_connections", g(&self.active)),
            ("bytes_client_to_server", g(&self.bytes_out)),
            ("bytes_server_to_client", g(&self.bytes_in)),
        ]
    }
}

/// Everything the proxies read, passed together.
#[derive(Clone)]
pub struct ProxyInputs {
    pub state: Arc<ArcSwap<NodeState>>,
    pub capture: Arc<dyn Capture>,
    /// Enrolled pods of this node, by IP.
    pub pods: Arc<ArcSwap<HashMap<Ipv4Addr, Arc<PodNetns>>>>,
    pub metrics: Arc<Metrics>,
    /// Turns true when the agent stops accepting (drain or shutdown).
    pub stop: watch::Receiver<bool>,
    pub http_limits: http::Limits,
}

/// Deliver a connection to an app inside `pod`, as if it came from `src`: the socket is
/// made in the pod's netns, bound transparently to `src` and marked, so the app sees the
/// real client and its replies come back to the agent (docs/architecture.md, "Delivering
/// to the app").
pub async fn deliver(
    capture: &dyn Capture,
    pod: &PodNetns,
    src: Ipv4Addr,
    dst: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    let sock = pod.tcp_socket(Some(src))?;
    match sock.local_addr()? {
        std::net::SocketAddr::V4(bound) => capture.announce_delivery(bound, dst)?,
        other => {
            return Err(std::io::Error::other(format!(
                "delivery socket bound to {other}"
            )))
        }
    }
    sock.connect(dst.into()).await
}

/// How weft reaches an address from a pod of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// A meshed pod of this node: delivered inside its netns with the client's IP.
    InPod,
    /// A meshed pod of another node: through that node's agent.
    Tunnel,
    /// Anything else: a plain connection from inside the client pod.
    Direct,
}

impl Reach {
    pub fn of(state: &crate::state::NodeState, ip: Ipv4Addr) -> Self {
        match state.workloads.get(&ip) {
            Some(w) if w.meshed && w.node == state.node => Self::InPod,
            Some(w) if w.meshed => Self::Tunnel,
            _ => Self::Direct,
        }
    }
}

/// Open a connection from `src` (a pod of this node, address `src_ip`) to `dst`.
pub async fn dial(
    inputs: &ProxyInputs,
    src: &PodNetns,
    src_ip: Ipv4Addr,
    dst: SocketAddrV4,
    reach: Reach,
) -> std::io::Result<TcpStream> {
    match reach {
        Reach::InPod => {
            if let Some(dst_pod) = inputs.pods.load().get(dst.ip()).cloned() {
                return deliver(&*inputs.capture, &dst_pod, src_ip, dst).await;
            }
        }
        Reach::Tunnel => return tunnel::connect(src, dst).await,
        Reach::Direct => {}
    }
    // Not meshed (or not enrolled yet): a plain connection from inside the client pod.
    src.tcp_socket(None)?.connect(dst.into()).await
}

/// Counts a connection as active for as long as it lives.
pub struct ActiveGuard(Arc<Metrics>);

impl ActiveGuard {
    pub fn new(m: &Arc<Metrics>) -> Self {
        m.active.fetch_add(1, Ordering::Relaxed);
        Self(m.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copy both directions until both are done, passing each half-close on.
pub async fn splice(metrics: &Metrics, mut client: TcpStream, mut server: TcpStream) {
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((out, inn)) => {
            metrics.bytes_out.fetch_add(out, Ordering::Relaxed);
            metrics.bytes_in.fetch_add(inn, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
    }
    let _ = client.shutdown().await;
    let _ = server.shutdown().await;
}

/// What every per-pod proxy is made of: its listener inside the pod, and the pod.
pub struct PodListener {
    pub listener: tokio::net::TcpListener,
    pub pod: Arc<PodNetns>,
    pub pod_ip: Ipv4Addr,
    pub inputs: ProxyInputs,
}

/// What a connection's handler gets besides the connection.
#[derive(Clone)]
pub struct PodCtx {
    pub pod: Arc<PodNetns>,
    pub pod_ip: Ipv4Addr,
    pub inputs: ProxyInputs,
}

impl PodListener {
    /// Accept until told to stop, handing each connection to `handle` in its own task.
    pub async fn serve<F, Fut>(self, handle: F)
    where
        F: Fn(PodCtx, TcpStream, SocketAddrV4) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Self {
            listener,
            pod,
            pod_ip,
            inputs,
        } = self;
        let mut stop = inputs.stop.clone();
        let ctx = PodCtx {
            pod,
            pod_ip,
            inputs,
        };
        loop {
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((conn, std::net::SocketAddr::V4(peer))) => {
                        let _ = conn.set_nodelay(true);
                        tokio::spawn(handle(ctx.clone(), conn, peer));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, pod = %ctx.pod_ip, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(&mut stop) => break,
            }
        }
    }
}

/// Resolves once the stop flag is true.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
