//! The tunnel listener on the node's address, port 15008: mTLS, then HTTP/2 CONNECT
//! streams, each checked and delivered to a pod of this node as its source pod.
//!
//! Checks, in order (each refusal is counted in `tunnel_handshake_failures` or
//! `tunnel_rejected`, and logged with both identities):
//! 1. the TLS handshake: TLS 1.3, a client certificate chained to the trust bundle and
//!    valid now, and a server name that is the DNS name of an identity this agent holds;
//! 2. the client's certificate names a workload (not a node or the CA);
//! 3. per stream: a CONNECT to `<ip>:<port>` with `forwarded: for=<source ip>`;
//! 4. the source address is a meshed workload whose identity is the client's and whose
//!    node's address is where the connection comes from;
//! 5. the destination is an enrolled pod of this node whose identity is the one the
//!    client asked for (its SNI), and the pod's connection limit allows one more.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};

use super::{
    parse_forwarded,
    pool::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW},
    FORWARDED,
};
use crate::{
    identity::{tls, SpiffeId},
    metrics::Metrics,
    proxy::{
        conn::{Permit, PodConns},
        dial,
        error::REASON_HEADER,
        listener::{next_connection, reset, Backoff},
        stream::forward,
        ProxyInputs,
    },
};

/// Streams one tunnel connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1000;
/// The longest request head accepted on a tunnel stream.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A tunnel connection accepted, as the admin API lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Accepted {
    pub peer: SocketAddrV4,
    /// The identity the peer proved (its source workload).
    pub source: String,
    /// The identity this agent presented (the destination workload asked for).
    pub destination: String,
    /// Streams accepted on it so far.
    pub streams: u64,
    /// Seconds since the epoch.
    pub since: i64,
}

/// The node's tunnel listener and what its connections share.
pub struct TunnelServer {
    listener: TcpListener,
    inputs: ProxyInputs,
    shared: Arc<Shared>,
}

/// Live tunnel connections, by a number of their own.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Accepted>>,
}

impl Registry {
    pub fn list(&self) -> Vec<Accepted> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn add(&self, a: Accepted) -> u64 {
        let id = self.next.fetch_add(1, Relaxed);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, a);
        id
    }

    fn stream(&self, id: u64) {
        if let Some(a) = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            a.streams += 1;
        }
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

struct Shared {
    /// Tunnel connections count against the node's connection limit, and against a limit
    /// of their own as large as a pod's.
    conns: Arc<PodConns>,
    /// The TLS configuration for the current roots.
    tls: Mutex<Option<(u64, Arc<ServerConfig>)>>,
}

impl TunnelServer {
    pub fn new(listener: TcpListener, inputs: ProxyInputs) -> Self {
        Self {
            listener,
            inputs,
            shared: Arc::new(Shared {
                conns: Arc::new(PodConns::default()),
                tls: Mutex::new(None),
            }),
        }
    }

    /// Accept until draining begins; open connections get a GOAWAY then and finish their
    /// streams.
    pub async fn run(self) {
        let Self {
            listener,
            inputs,
            shared,
        } = self;
        let drain = inputs.drain.clone();
        let mut backoff = Backoff::new(&inputs.metrics.accept_errors);
        let own = listener
            .local_addr()
            .ok()
            .and_then(|a| match a {
                SocketAddr::V4(a) => Some(*a.ip()),
                SocketAddr::V6(_) => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        while let Some((tcp, peer)) =
            next_connection(&listener, &drain, &mut backoff, "the tunnel listener").await
        {
            let Ok(permit) = inputs.conns.admit(&shared.conns, own) else {
                reset(&tcp);
                continue;
            };
            let Some(cfg) = shared.config(&inputs) else {
                Metrics::inc(&inputs.metrics.tunnel_handshake_failures);
                tracing::warn!(%peer, "no trust bundle yet: refusing a tunnel connection");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(connection(inputs.clone(), cfg, tcp, peer, permit));
        }
    }
}

impl Shared {
    fn config(&self, inputs: &ProxyInputs) -> Option<Arc<ServerConfig>> {
        let certs = &inputs.tunnels.certs;
        let version = certs
            .roots_version
            .load(std::sync::atomic::Ordering::Acquire);
        let mut c = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, cfg)) = &*c {
            if *v == version {
                return Some(cfg.clone());
            }
        }
        let cfg = tls::server_config(
            certs.roots()?,
            Arc::new(tls::ByName(certs.clone())),
            &[tls::ALPN_H2],
        )
        .map_err(|e| tracing::error!(error = %e, "building the tunnel's TLS configuration"))
        .ok()?;
        *c = Some((version, cfg.clone()));
        Some(cfg)
    }
}

/// What every stream of one connection knows.
struct Peer {
    inputs: ProxyInputs,
    addr: SocketAddrV4,
    /// The client's proven identity.
    source: SpiffeId,
    /// The identity this agent presented.
    destination: SpiffeId,
    registry_id: u64,
    _permit: Permit,
}

async fn connection(
    inputs: ProxyInputs,
    cfg: Arc<ServerConfig>,
    tcp: TcpStream,
    addr: SocketAddrV4,
    permit: Permit,
) {
    let m = &inputs.metrics;
    let handshake = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp);
    let tls = match tokio::time::timeout(inputs.config.timeouts.header_read, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            Metrics::inc(&m.tunnel_handshake_failures);
            tracing::info!(peer = %addr, error = %e, "tunnel connection refused: TLS handshake failed");
            return;
        }
        Err(_) => {
            Metrics::inc(&m.tunnel_handshake_failures);
            Metrics::inc(&m.header_read_timeouts);
            tracing::info!(peer = %addr, "tunnel connection refused: no TLS handshake within the header read timeout");
            return;
        }
    };
    let conn = tls.get_ref().1;
    let source = tls::peer_id(conn).filter(|id| id.workload_parts().is_some());
    // The connection does not outlive the client's certificate.
    let expires = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::identity::not_after)
        .unwrap_or(0);
    let destination = conn
        .server_name()
        .and_then(|n| inputs.tunnels.certs.id_by_dns_name(n));
    let (Some(source), Some(destination)) = (source, destination) else {
        Metrics::inc(&m.tunnel_handshake_failures);
        tracing::info!(peer = %addr, client = ?tls::peer_id(conn).map(|i| i.to_string()), "tunnel connection refused: the client is not a workload identity");
        return;
    };
    Metrics::inc(&m.tunnel_connections_accepted);
    let registry = inputs.tunnels.accepted.clone();
    let registry_id = registry.add(Accepted {
        peer: addr,
        source: source.to_string(),
        destination: destination.to_string(),
        streams: 0,
        since: crate::identity::unix_now(),
    });
    tracing::debug!(peer = %addr, %source, %destination, "tunnel connection accepted");
    let t = inputs.config.timeouts;
    let drain = inputs.drain.clone();
    let peer = Arc::new(Peer {
        inputs,
        addr,
        source,
        destination,
        registry_id,
        _permit: permit,
    });
    let svc = hyper::service::service_fn(move |req| {
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(stream(&peer, req).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(t.h2_keepalive_interval)
        .keep_alive_timeout(t.h2_keepalive_timeout);
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let left = u64::try_from(expires - crate::identity::unix_now()).unwrap_or(0);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = tokio::time::sleep(std::time::Duration::from_secs(left)) => {
            tracing::debug!(peer = %addr, "the client's certificate expired: closing the tunnel connection once its streams end");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(peer = %addr, error = %e, "tunnel connection ended");
    }
    registry.remove(registry_id);
}

fn refuse(
    peer: &Peer,
    status: StatusCode,
    reason: &'static str,
    detail: String,
) -> Response<Empty<Bytes>> {
    Metrics::inc(&peer.inputs.metrics.tunnel_rejected);
    tracing::info!(peer = %peer.addr, source = %peer.source, destination = %peer.destination, reason, "tunnel stream refused: {detail}");
    Response::builder()
        .status(status)
        .header(REASON_HEADER, reason)
        .body(Empty::new())
        .expect("a response")
}

async fn stream(peer: &Peer, mut req: Request<Incoming>) -> Response<Empty<Bytes>> {
    let inputs = &peer.inputs;
    if req.method() != Method::CONNECT {
        return refuse(
            peer,
            StatusCode::METHOD_NOT_ALLOWED,
            "not-connect",
            format!("{} instead of CONNECT", req.method()),
        );
    }
    let target: Option<SocketAddrV4> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let src = req
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded);
    let (Some(target), Some(src)) = (target, src) else {
        return refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "malformed-connect",
            format!(
                "target {:?}, {FORWARDED} {:?}",
                req.uri().authority(),
                req.headers().get(FORWARDED)
            ),
        );
    };
    let state = inputs.state.load();
    // The source: a workload with the client's identity, on the node the connection comes from.
    let src_ok = state.workloads.get(&src).is_some_and(|w| {
        w.meshed
            && state.identities.get(&src) == Some(&peer.source)
            && state.node_addresses.get(&w.node) == Some(peer.addr.ip())
    });
    if !src_ok {
        return refuse(
            peer,
            StatusCode::FORBIDDEN,
            "source-identity-mismatch",
            format!(
                "source {src} is not a workload of {} on the node at {}",
                peer.source,
                peer.addr.ip()
            ),
        );
    }
    // The destination: a pod of this node with the identity the client asked for.
    let dst_ok = state.local.get(target.ip()).is_some_and(|w| w.meshed)
        && state.identities.get(target.ip()) == Some(&peer.destination);
    if !dst_ok {
        return refuse(
            peer,
            StatusCode::FORBIDDEN,
            "destination-identity-mismatch",
            format!(
                "{target} is not a pod of this node with identity {}",
                peer.destination
            ),
        );
    }
    let id = peer.source.to_string();
    if !crate::proxy::authz::quarantine_admits(inputs, &state, *target.ip(), src, Some(&id)) {
        return refuse(
            peer,
            StatusCode::SERVICE_UNAVAILABLE,
            "quarantined",
            format!(
                "{target} is quarantined and {} is not a debug source",
                peer.source
            ),
        );
    }
    let http = crate::config::authz::Http::JudgedBySender;
    let m = &inputs.metrics;
    let allowed = crate::proxy::authz::allowed(
        &state,
        inputs,
        src,
        Some(&peer.source),
        target,
        http,
        "tunnel",
    );
    drop(state);
    if !allowed {
        Metrics::inc(&m.policy_denied);
        return refuse(
            peer,
            StatusCode::FORBIDDEN,
            "policy-denied",
            format!("an AuthorizationPolicy denies {} to {target}", peer.source),
        );
    }
    let Some(pod) = inputs.pods.load().get(target.ip()).cloned() else {
        return refuse(
            peer,
            StatusCode::SERVICE_UNAVAILABLE,
            "not-enrolled",
            format!("{target} is not enrolled yet"),
        );
    };
    let Ok(permit) = inputs.conns.admit(&pod.conns, pod.ip) else {
        return refuse(
            peer,
            StatusCode::SERVICE_UNAVAILABLE,
            "connection-limit",
            format!("{target}'s pod or this node holds its maximum of connections"),
        );
    };
    let app = match dial::deliver(inputs, &*pod.sockets, src, target).await {
        Ok(app) => app,
        Err(e) => {
            let status = if e.is_timeout() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            return refuse(peer, status, "app-unreachable", e.to_string());
        }
    };
    Metrics::inc(&inputs.metrics.tunnel_accepted);
    inputs.tunnels.accepted.stream(peer.registry_id);
    tracing::debug!(peer = %peer.addr, source = %peer.source, destination = %peer.destination, %src, %target, "tunnelled connection accepted");
    let upgrade = hyper::upgrade::on(&mut req);
    let metrics = inputs.metrics.clone();
    let idle = inputs.config.timeouts.idle;
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(up) => {
                forward(&metrics, TokioIo::new(up), app, idle).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, %target, "the tunnel stream closed before it opened")
            }
        }
    });
    Response::new(Empty::new())
}
