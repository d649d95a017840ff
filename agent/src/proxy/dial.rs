//! Opening the proxy's upstream connections, always as a pod of this node and always under
//! the connect timeout: delivered inside the endpoint's pod as the original client
//! ([`deliver`]), through the endpoint node's agent ([`super::tunnel`]), or directly from
//! the client pod. Failures are counted here, once, by kind.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use super::{socket::PodSockets, stream::Stream, tunnel, ProxyInputs};
use crate::{metrics::Metrics, state::NodeState};

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
    pub fn of(state: &NodeState, ip: Ipv4Addr) -> Self {
        match state.workloads.get(&ip) {
            Some(w) if w.meshed && w.node == state.node => Self::InPod,
            Some(w) if w.meshed => Self::Tunnel,
            _ => Self::Direct,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("making a socket: {0}")]
    Socket(io::Error),
    #[error("connecting to {addr} took longer than the connect timeout ({after:?}): is the endpoint up, or is something dropping its packets?")]
    ConnectTimeout { addr: SocketAddrV4, after: Duration },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddrV4,
        source: io::Error,
    },
    #[error("the agent at {via} did not answer the tunnel request for {target} within {after:?}")]
    TunnelTimeout {
        via: SocketAddrV4,
        target: SocketAddrV4,
        after: Duration,
    },
    #[error("tunnel to {target} through {via}: {source}")]
    Tunnel {
        via: SocketAddrV4,
        target: SocketAddrV4,
        source: tunnel::TunnelError,
    },
}

impl DialError {
    fn count(&self, m: &Metrics) {
        Metrics::inc(match self {
            Self::ConnectTimeout { .. } => &m.upstream_connect_timeouts,
            Self::TunnelTimeout { .. } => &m.tunnel_answer_timeouts,
            _ => &m.upstream_connect_errors,
        });
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::ConnectTimeout { .. } | Self::TunnelTimeout { .. }
        )
    }
}

impl From<DialError> for io::Error {
    fn from(e: DialError) -> Self {
        let kind = match &e {
            DialError::ConnectTimeout { .. } | DialError::TunnelTimeout { .. } => {
                io::ErrorKind::TimedOut
            }
            DialError::Connect { source, .. } | DialError::Socket(source) => source.kind(),
            DialError::Tunnel { .. } => io::ErrorKind::ConnectionRefused,
        };
        io::Error::new(kind, e)
    }
}

/// Connect `sock` to `addr` within `timeout`.
pub async fn connect(
    sock: TcpSocket,
    addr: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(timeout, sock.connect(addr.into())).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(DialError::Connect { addr, source }),
        Err(_) => Err(DialError::ConnectTimeout {
            addr,
            after: timeout,
        }),
    }
}

/// Open a connection from `src` (a pod of this node, address `src_ip`) to `dst`.
pub async fn dial(
    inputs: &ProxyInputs,
    src: &dyn PodSockets,
    src_ip: Ipv4Addr,
    dst: SocketAddrV4,
    reach: Reach,
) -> Result<Stream, DialError> {
    let timeouts = &inputs.config.timeouts;
    let res = match reach {
        Reach::Tunnel => tunnel::connect(inputs, src_ip, dst).await,
        Reach::InPod => match inputs.pods.load().get(dst.ip()).cloned() {
            Some(dst_pod) => deliver_uncounted(inputs, &*dst_pod.sockets, src_ip, dst)
                .await
                .map(Stream::Tcp),
            None => direct(src, dst, timeouts.connect).await,
        },
        // Not meshed (or not enrolled yet): a plain connection from inside the client pod.
        Reach::Direct => direct(src, dst, timeouts.connect).await,
    };
    if let Err(e) = &res {
        e.count(&inputs.metrics);
    }
    res
}

async fn direct(src: &dyn PodSockets, dst: SocketAddrV4, t: Duration) -> Result<Stream, DialError> {
    let sock = src.tcp_socket(None).map_err(DialError::Socket)?;
    connect(sock, dst, t).await.map(Stream::Tcp)
}

/// Deliver a connection to an app inside `pod`, as if it came from `src`: the socket is
/// made in the pod's netns, bound transparently to `src` and marked, so the app sees the
/// real client and its replies come back to the agent (docs/architecture.md, "Delivering
/// to the app").
pub async fn deliver(
    inputs: &ProxyInputs,
    pod: &dyn PodSockets,
    src: Ipv4Addr,
    dst: SocketAddrV4,
) -> Result<TcpStream, DialError> {
    let res = deliver_uncounted(inputs, pod, src, dst).await;
    if let Err(e) = &res {
        e.count(&inputs.metrics);
    }
    res
}

async fn deliver_uncounted(
    inputs: &ProxyInputs,
    pod: &dyn PodSockets,
    src: Ipv4Addr,
    dst: SocketAddrV4,
) -> Result<TcpStream, DialError> {
    let sock = pod.tcp_socket(Some(src)).map_err(DialError::Socket)?;
    let bound = match sock.local_addr().map_err(DialError::Socket)? {
        std::net::SocketAddr::V4(bound) => bound,
        other => {
            return Err(DialError::Socket(io::Error::other(format!(
                "delivery socket bound to {other}"
            ))))
        }
    };
    inputs
        .capture
        .announce_delivery(bound, dst)
        .map_err(DialError::Socket)?;
    let res = connect(sock, dst, inputs.config.timeouts.connect).await;
    // Until now every SYN of this connection (a retransmitted one too) had to reach the
    // app; from now on the 4-tuple is the connection's own.
    inputs.capture.withdraw_delivery(bound, dst);
    res
}
