//! Node-to-node transport, in the shape of Istio's HBONE: HTTP/2 CONNECT inside TLS 1.3
//! with mutual authentication, from this node's agent to the destination node's agent on
//! its node address, port 15008.
//!
//! - Both ends prove workload identities. The client presents the source workload's
//!   certificate and names the destination workload's identity in its SNI
//!   ([`SpiffeId::dns_name`]); it accepts only a server that proves exactly that identity.
//!   The server presents the identity asked for, if it runs one of its pods.
//! - One TLS connection carries many pod connections, one CONNECT stream each; connections
//!   are pooled per (source identity, destination identity, destination node)
//!   ([`pool::Pool`]).
//! - A stream is `CONNECT <pod IP>:<port>` with `forwarded: for=<source pod IP>`. The
//!   server ([`server::TunnelServer`]) checks that the source address belongs to a workload
//!   with the client's identity on the node the connection comes from, and that the
//!   destination is one of its pods with the identity the client asked for; then it
//!   delivers to the app with the source pod's address, and answers 200. A refusal is a
//!   4xx or 5xx with the reason in `x-weft-reason`.
//!
//! Everything above this module sees only [`connect`] (returning a [`Stream`]).

pub mod pool;
pub mod server;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::{dial::DialError, stream::Stream, ProxyInputs};
use crate::identity::{certs::CertStore, SpiffeId};

/// The header that carries the source pod's address (RFC 7239).
pub const FORWARDED: &str = "forwarded";

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the source pod {0} has no workload identity (is it meshed?)")]
    NoSourceIdentity(Ipv4Addr),
    #[error("the destination {0} is not a meshed workload of a declared node")]
    NoDestination(Ipv4Addr),
    #[error("no certificate for {0} yet (is the CA reachable?)")]
    NoCertificate(SpiffeId),
    #[error("no trust bundle loaded yet")]
    NoRoots,
    #[error("TLS with the peer agent: {0}")]
    Tls(std::io::Error),
    #[error("the peer agent proved {got}, not {wanted}")]
    WrongPeer { wanted: SpiffeId, got: String },
    #[error("HTTP/2 with the peer agent: {}", chain(.0))]
    H2(hyper::Error),
    #[error("the peer agent refused: {status} {reason}")]
    Refused { status: StatusCode, reason: String },
}

/// What the tunnels of a node share: the certificates, the pool of connections to peer
/// agents, and the connections accepted from them.
pub struct Tunnels {
    pub certs: Arc<CertStore>,
    pub pool: pool::Pool,
    pub accepted: Arc<server::Registry>,
}

impl Tunnels {
    pub fn new(certs: Arc<CertStore>) -> Self {
        Self {
            pool: pool::Pool::new(certs.clone()),
            certs,
            accepted: Arc::default(),
        }
    }
}

/// An error and its sources ("http2 error: stream refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `for=<ip>` of a `forwarded` header value; the first element only.
pub fn parse_forwarded(v: &str) -> Option<Ipv4Addr> {
    v.split(',')
        .next()?
        .split(';')
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
        })?
        .trim_matches('"')
        .parse()
        .ok()
}

/// Open a tunnelled connection from the pod `src` to `target`, a meshed pod of another
/// node: a stream on a pooled mTLS connection to that node's agent (made within the connect
/// timeout and its handshake within the tunnel answer timeout), and the agent's answer
/// within the tunnel answer timeout.
pub async fn connect(
    inputs: &ProxyInputs,
    src: Ipv4Addr,
    target: SocketAddrV4,
) -> Result<Stream, DialError> {
    let t = &inputs.config.timeouts;
    let state = inputs.state.load();
    let (dst_id, node) = match state.tunnel_to(*target.ip()) {
        Some((id, node)) => (id.clone(), node),
        None => {
            return Err(DialError::Tunnel {
                via: SocketAddrV4::new(*target.ip(), weft_common::TUNNEL_PORT),
                target,
                source: TunnelError::NoDestination(*target.ip()),
            })
        }
    };
    let via = SocketAddrV4::new(node, weft_common::TUNNEL_PORT);
    let tunnel = |source| DialError::Tunnel {
        via,
        target,
        source,
    };
    let src_id = state
        .identities
        .get(&src)
        .cloned()
        .ok_or_else(|| tunnel(TunnelError::NoSourceIdentity(src)))?;
    let key = pool::Key {
        src: src_id,
        dst: dst_id,
        node: via,
    };
    let bind = state.own_address();
    drop(state);
    // A connection the peer is closing (it drains, or a certificate of its handshake
    // expired: GOAWAY) refuses new streams: one more try on a fresh connection.
    for attempt in 0..2 {
        let pooled = inputs
            .tunnels
            .pool
            .sender(&key, bind, t, &inputs.metrics)
            .await?;
        let mut sender = pooled.sender;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(FORWARDED, format!("for={src}"))
            .body(Empty::<Bytes>::new())
            .expect("a CONNECT request");
        let answer = async {
            sender.ready().await?;
            sender.send_request(req).await
        };
        let res = match tokio::time::timeout(t.tunnel_answer, answer).await {
            Err(_) => {
                return Err(DialError::TunnelTimeout {
                    via,
                    target,
                    after: t.tunnel_answer,
                })
            }
            // No answer came, so the peer delivered nothing: safe to ask again.
            Ok(Err(e)) if attempt == 0 => {
                tracing::debug!(%via, error = %e, "a tunnel connection failed a stream; asking on a fresh one");
                inputs.tunnels.pool.forget(&key, pooled.generation).await;
                continue;
            }
            Ok(Err(e)) => return Err(tunnel(TunnelError::H2(e))),
            Ok(Ok(res)) => res,
        };
        if res.status() != StatusCode::OK {
            let reason = res
                .headers()
                .get(super::error::REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            return Err(tunnel(TunnelError::Refused {
                status: res.status(),
                reason,
            }));
        }
        let upgraded = hyper::upgrade::on(res)
            .await
            .map_err(|e| tunnel(TunnelError::H2(e)))?;
        return Ok(Stream::Other(Box::new(TokioIo::new(upgraded))));
    }
    unreachable!("the loop returns on its second attempt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_read_from_the_first_element() {
        assert_eq!(
            parse_forwarded("for=10.1.2.3"),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
        assert_eq!(
            parse_forwarded("proto=http; For=\"10.1.2.3\", for=10.9.9.9"),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
        assert_eq!(parse_forwarded("for=unknown"), None);
        assert_eq!(parse_forwarded("by=10.1.2.3"), None);
        assert_eq!(parse_forwarded(""), None);
    }
}
