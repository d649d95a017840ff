//! What every connection the proxy holds carries: the timeouts it lives under, the drain
//! signal, and its permit against the per-pod and per-node connection limits, so one pod
//! or client can hold only its share of the agent. Defaults are documented in
//! docs/operations.md ("Timeouts and limits").

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use tokio::sync::watch;

use super::{socket::PodSockets, ProxyInputs};
use crate::{metrics::Metrics, traffic::now_ns};

/// Every timeout of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to an endpoint, an app or a peer agent (each attempt).
    pub connect: Duration,
    /// After a tunnel request is sent, how long the peer agent may take to answer it.
    pub tunnel_answer: Duration,
    /// A head must arrive whole within this: an HTTP/1 request head (hyper also applies it
    /// to the wait for the next request on a kept-alive connection), a tunnel request, an
    /// admin request, a TLS ClientHello being routed by name.
    pub header_read: Duration,
    /// A forwarded TCP connection with no byte either way, or an HTTP/2 connection with no
    /// request in flight, is closed after this.
    pub idle: Duration,
    /// HTTP/2 connections are pinged this often ...
    pub h2_keepalive_interval: Duration,
    /// ... and closed when a ping is not acknowledged within this.
    pub h2_keepalive_timeout: Duration,
    /// A request body the proxy reads into memory (for retries or mirroring) must arrive
    /// within this; a streamed body may pause at most this long between chunks.
    pub request_body: Duration,
    /// While draining, an HTTP/1.1 connection that sent no request for this long is
    /// closed (until then, every response on it carries `Connection: close`).
    pub drain_idle_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            tunnel_answer: Duration::from_secs(5),
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(3600),
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(10),
            request_body: Duration::from_secs(10),
            drain_idle_grace: Duration::from_secs(1),
        }
    }
}

/// How many connections the agent holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Per pod: its outbound connections plus the inbound and tunnelled ones to it.
    pub per_pod: u32,
    /// For the whole node.
    pub per_node: u32,
}

impl ConnLimits {
    pub const DEFAULT_PER_POD: u32 = 16_384;
    pub const DEFAULT_PER_NODE: u32 = 131_072;
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            per_pod: Self::DEFAULT_PER_POD,
            per_node: Self::DEFAULT_PER_NODE,
        }
    }
}

/// The drain signal: turns on once when the agent stops accepting (handoff or shutdown).
#[derive(Clone, Debug)]
pub struct Drain(watch::Receiver<bool>);

/// The side that turns draining on.
#[derive(Debug)]
pub struct DrainTrigger(watch::Sender<bool>);

impl Drain {
    pub fn new() -> (DrainTrigger, Self) {
        let (tx, rx) = watch::channel(false);
        (DrainTrigger(tx), Self(rx))
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once draining has begun.
    pub async fn signaled(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

impl DrainTrigger {
    pub fn start(&self) {
        let _ = self.0.send(true);
    }
}

/// Connections held by one pod, and when its limit was last reported.
#[derive(Debug, Default)]
pub struct PodConns {
    held: AtomicU32,
    refused: AtomicU64,
    last_log_ns: AtomicU64,
}

impl PodConns {
    pub fn held(&self) -> u32 {
        self.held.load(Relaxed)
    }
}

/// Connections held by the node, against [`ConnLimits`].
#[derive(Debug)]
pub struct ConnTracker {
    limits: ConnLimits,
    held: AtomicU32,
    refused: AtomicU64,
    last_log_ns: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Which limit turned a connection away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Pod,
    Node,
}

/// How often at most a limit being hit is logged (per pod, and for the node).
const LIMIT_LOG_EVERY_NS: u64 = 10_000_000_000;

fn try_increment(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
        .is_ok()
}

/// True at most once per [`LIMIT_LOG_EVERY_NS`] for the same `last` stamp.
pub(crate) fn log_due(last: &AtomicU64) -> bool {
    let now = now_ns();
    let seen = last.load(Relaxed);
    (seen == 0 || now.saturating_sub(seen) >= LIMIT_LOG_EVERY_NS)
        && last.compare_exchange(seen, now, Relaxed, Relaxed).is_ok()
}

impl ConnTracker {
    pub fn new(limits: ConnLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            limits,
            held: AtomicU32::new(0),
            refused: AtomicU64::new(0),
            last_log_ns: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    pub fn held(&self) -> u32 {
        self.held.load(Relaxed)
    }

    /// A permit for one more connection of `pod`, if both limits allow it. A refusal is
    /// counted, and logged now and then with how many were refused since.
    pub fn admit(
        self: &Arc<Self>,
        pod: &Arc<PodConns>,
        pod_ip: Ipv4Addr,
    ) -> Result<Permit, Refused> {
        if !try_increment(&pod.held, self.limits.per_pod) {
            Metrics::inc(&self.metrics.connections_refused_pod_limit);
            let n = pod.refused.fetch_add(1, Relaxed) + 1;
            if log_due(&pod.last_log_ns) {
                tracing::warn!(pod = %pod_ip, limit = self.limits.per_pod, refused_so_far = n, "the pod holds its maximum of connections; refusing new ones (--max-connections-per-pod)");
            }
            return Err(Refused::Pod);
        }
        if !try_increment(&self.held, self.limits.per_node) {
            pod.held.fetch_sub(1, Relaxed);
            Metrics::inc(&self.metrics.connections_refused_node_limit);
            let n = self.refused.fetch_add(1, Relaxed) + 1;
            if log_due(&self.last_log_ns) {
                tracing::warn!(limit = self.limits.per_node, refused_so_far = n, "the node holds its maximum of connections; refusing new ones (--max-connections)");
            }
            return Err(Refused::Node);
        }
        self.metrics.active_connections.fetch_add(1, Relaxed);
        Ok(Permit {
            node: self.clone(),
            pod: pod.clone(),
        })
    }
}

/// One connection counted against its pod's and the node's limits, until dropped.
#[derive(Debug)]
pub struct Permit {
    node: Arc<ConnTracker>,
    pod: Arc<PodConns>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pod.held.fetch_sub(1, Relaxed);
        self.node.held.fetch_sub(1, Relaxed);
        self.node.metrics.active_connections.fetch_sub(1, Relaxed);
    }
}

/// One enrolled pod as the proxy sees it: how to make its sockets, its address, what
/// every proxy reads, and the connections it holds.
pub struct Pod {
    pub sockets: Arc<dyn PodSockets>,
    pub ip: Ipv4Addr,
    pub inputs: ProxyInputs,
    pub conns: Arc<PodConns>,
}

/// A connection the proxy accepted: its pod, the peer, and its permit (shared with what
/// outlives the connection's own task, such as an upgraded connection).
#[derive(Clone)]
pub struct ConnCtx {
    pub pod: Arc<Pod>,
    pub peer: SocketAddrV4,
    pub permit: Arc<Permit>,
}

impl ConnCtx {
    pub fn inputs(&self) -> &ProxyInputs {
        &self.pod.inputs
    }

    pub fn metrics(&self) -> &Metrics {
        &self.pod.inputs.metrics
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.pod.inputs.config.timeouts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_against_the_pod_and_the_node() {
        let m = Arc::new(Metrics::default());
        let t = Arc::new(ConnTracker::new(
            ConnLimits {
                per_pod: 2,
                per_node: 3,
            },
            m.clone(),
        ));
        let (a, b) = (Arc::new(PodConns::default()), Arc::new(PodConns::default()));
        let ip = Ipv4Addr::LOCALHOST;
        let a1 = t.admit(&a, ip).unwrap();
        let _a2 = t.admit(&a, ip).unwrap();
        assert_eq!(t.admit(&a, ip).unwrap_err(), Refused::Pod);
        let _b1 = t.admit(&b, ip).unwrap();
        assert_eq!(t.admit(&b, ip).unwrap_err(), Refused::Node);
        assert_eq!(b.held(), 1, "a node refusal gives the pod's count back");
        drop(a1);
        let _b2 = t.admit(&b, ip).unwrap();
        assert_eq!(m.connections_refused_pod_limit.load(Relaxed), 1);
        assert_eq!(m.connections_refused_node_limit.load(Relaxed), 1);
        assert_eq!(m.active_connections.load(Relaxed), 3);
    }
}
