//! Node-to-node transport. The client agent connects from inside the source pod's netns to
//! the destination pod's tunnel port (15008), where the destination node's agent listens,
//! says which port it wants, and waits for a one-byte answer. The destination agent
//! delivers to the app with the source pod's IP (the tunnel connection's peer) as source.
//!
//! Plaintext for now: the wire format below is the seam where mTLS (HTTP/2 CONNECT over
//! rustls, with both workload identities checked) replaces it.
//!
//! Request:  `WEFT` | version (1) | target IPv4 (4 bytes) | target port (u16, big endian)
//! Response: one byte, [`Status`].

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{deliver, splice, ActiveGuard, PodCtx, PodListener};
use crate::netns::PodNetns;

const MAGIC: &[u8; 4] = b"WEFT";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 11;
/// How long a tunnel peer may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("tunnel peer answered {0:?}")]
    Refused(u8),
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

/// Open a tunnelled connection from `src` (the client pod) to `target` on another node.
pub async fn connect(src: &PodNetns, target: SocketAddrV4) -> std::io::Result<TcpStream> {
    let via = SocketAddrV4::new(*target.ip(), weft_common::TUNNEL_PORT);
    let mut s = src.tcp_socket(None)?.connect(via.into()).await?;
    s.write_all(&encode(target)).await?;
    let status = s.read_u8().await?;
    if status != Status::Connected as u8 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            TunnelError::Refused(status),
        ));
    }
    Ok(s)
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
            .serve(move |ctx, conn, peer| {
                let ports = ports.clone();
                async move { handle(ctx, &ports, conn, peer).await }
            })
            .await;
    }
}

async fn handle(ctx: PodCtx, ports: &[u16], mut conn: TcpStream, peer: SocketAddrV4) {
    let PodCtx {
        pod,
        pod_ip,
        inputs,
    } = ctx;
    let m = &inputs.metrics;
    let _active = ActiveGuard::new(m);
    let mut h = [0u8; HEADER_LEN];
    let target = match tokio::time::timeout(HEADER_TIMEOUT, conn.read_exact(&mut h)).await {
        Ok(Ok(_)) => decode(&h),
        _ => Err(TunnelError::Malformed),
    };
    let target = match target {
        Ok(t) if *t.ip() == pod_ip && ports.contains(&t.port()) => t,
        other => {
            m.tunnel_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, ?other, pod = %pod_ip, "rejecting tunnel request");
            let _ = conn.write_u8(Status::Rejected as u8).await;
            return;
        }
    };
    m.tunnel_accepted.fetch_add(1, Ordering::Relaxed);
    match deliver(&*inputs.capture, &pod, *peer.ip(), target).await {
        Ok(app) => {
            if conn.write_u8(Status::Connected as u8).await.is_ok() {
                splice(m, conn, app).await;
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
