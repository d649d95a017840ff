//! Node-to-node transport. The client agent connects from inside the source pod's netns to
//! the destination pod's tunnel port (15008), where the destination node's agent listens,
//! says which port it wants, and waits for a one-byte answer. The destination agent
//! delivers to the app with the source pod's IP (the tunnel connection's peer) as source.
//!
//! Plaintext for now. Everything above this file sees only [`connect`] (returning a
//! [`Stream`]) and [`TunnelServer`], so mTLS (HTTP/2 CONNECT over rustls, with both
//! workload identities checked) replaces the wire format below without touching them.
//!
//! Request:  `WEFT` | version (1) | target IPv4 (4 bytes) | target port (u16, big endian)
//! Response: one byte, [`Status`].

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    conn::{ConnCtx, Timeouts},
    dial::{self, DialError},
    listener::PodListener,
    socket::PodSockets,
    stream::{forward, Stream},
};
use crate::metrics::Metrics;

const MAGIC: &[u8; 4] = b"WEFT";
const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 11;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Connected = 0,
    /// The app refused or could not be reached.
    Unreachable = 1,
    /// The request was malformed or named an address this pod does not serve.
    Rejected = 2,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("malformed tunnel header")]
    Malformed,
    #[error("the peer agent answered {0} (1: the app could not be reached, 2: request rejected)")]
    Refused(u8),
    #[error("the peer agent closed the tunnel without answering: {0}")]
    NoAnswer(std::io::Error),
}

pub fn encode(target: SocketAddrV4) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5..9].copy_from_slice(&target.ip().octets());
    h[9..].copy_from_slice(&target.port().to_be_bytes());
    h
}

pub fn decode(h: &[u8; HEADER_LEN]) -> Result<SocketAddrV4, TunnelError> {
    if &h[..4] != MAGIC || h[4] != VERSION {
        return Err(TunnelError::Malformed);
    }
    let ip = Ipv4Addr::new(h[5], h[6], h[7], h[8]);
    Ok(SocketAddrV4::new(ip, u16::from_be_bytes([h[9], h[10]])))
}

/// Open a tunnelled connection from `src` (the client pod) to `target` on another node:
/// connect within the connect timeout, then wait at most the tunnel answer timeout.
pub async fn connect(
    src: &dyn PodSockets,
    target: SocketAddrV4,
    t: &Timeouts,
) -> Result<Stream, DialError> {
    let via = SocketAddrV4::new(*target.ip(), weft_common::TUNNEL_PORT);
    let sock = src.tcp_socket(None).map_err(DialError::Socket)?;
    let mut s = dial::connect(sock, via, t.connect).await?;
    let tunnel = |source| DialError::Tunnel {
        via,
        target,
        source,
    };
    let answer = async {
        s.write_all(&encode(target)).await?;
        s.read_u8().await
    };
    match tokio::time::timeout(t.tunnel_answer, answer).await {
        Err(_) => Err(DialError::TunnelTimeout {
            via,
            target,
            after: t.tunnel_answer,
        }),
        Ok(Err(e)) => Err(tunnel(TunnelError::NoAnswer(e))),
        Ok(Ok(status)) if status == Status::Connected as u8 => Ok(Stream::Tcp(s)),
        Ok(Ok(status)) => Err(tunnel(TunnelError::Refused(status))),
    }
}

/// The tunnel listener (0.0.0.0:15008) inside one pod; `ports` are the pod's declared
/// ports, the only ones a tunnel may ask for.
pub struct TunnelServer {
    listener: PodListener,
    ports: Arc<Vec<u16>>,
}

impl TunnelServer {
    pub fn new(listener: PodListener, ports: Vec<u16>) -> Self {
        Self {
            listener,
            ports: Arc::new(ports),
        }
    }

    pub async fn run(self) {
        let ports = self.ports;
        self.listener
            .serve(move |ctx, conn| {
                let ports = ports.clone();
                async move { handle(ctx, &ports, conn).await }
            })
            .await;
    }
}

async fn handle(ctx: ConnCtx, ports: &[u16], mut conn: TcpStream) {
    let (pod, peer) = (&ctx.pod, ctx.peer);
    let m = ctx.metrics();
    let mut h = [0u8; HEADER_LEN];
    let target = match tokio::time::timeout(ctx.timeouts().header_read, conn.read_exact(&mut h))
        .await
    {
        Ok(Ok(_)) => decode(&h),
        Ok(Err(_)) => Err(TunnelError::Malformed),
        Err(_) => {
            Metrics::inc(&m.header_read_timeouts);
            tracing::debug!(%peer, pod = %pod.ip, "no tunnel request within the header read timeout; closing");
            return;
        }
    };
    let target = match target {
        Ok(t) if *t.ip() == pod.ip && ports.contains(&t.port()) => t,
        other => {
            Metrics::inc(&m.tunnel_rejected);
            tracing::info!(%peer, ?other, pod = %pod.ip, "rejecting tunnel request");
            let _ = conn.write_u8(Status::Rejected as u8).await;
            return;
        }
    };
    Metrics::inc(&m.tunnel_accepted);
    match dial::deliver(ctx.inputs(), &*pod.sockets, *peer.ip(), target).await {
        Ok(app) => {
            if conn.write_u8(Status::Connected as u8).await.is_ok() {
                forward(m, conn, app, ctx.timeouts().idle).await;
            }
        }
        Err(e) => {
            tracing::info!(%target, %peer, error = %e, "delivering a tunnelled connection failed");
            let _ = conn.write_u8(Status::Unreachable as u8).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let t: SocketAddrV4 = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(decode(&encode(t)).unwrap(), t);
    }

    #[test]
    fn header_with_wrong_magic_or_version_is_rejected() {
        let mut h = encode("10.1.2.3:80".parse().unwrap());
        h[0] = b'X';
        assert!(decode(&h).is_err());
        let mut h = encode("10.1.2.3:80".parse().unwrap());
        h[4] = 9;
        assert!(decode(&h).is_err());
    }
}
