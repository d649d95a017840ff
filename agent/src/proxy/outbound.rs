//! Outbound: the listener on 127.0.0.1:15001 inside a pod, where connect4 sends the pod's
//! service connects. Recovers the original destination, picks an endpoint, connects.

use std::{net::SocketAddrV4, sync::atomic::Ordering};

use tokio::net::TcpStream;

use std::sync::Arc;

use super::{
    detect::{detect, Detected},
    dial,
    http::{self, Clients},
    sni::{name_matches, peek_server_name},
    splice, ActiveGuard, PodCtx, PodListener, Reach,
};
use crate::{
    config::{AppProtocol, Protocol},
    state::{Endpoint, NodeState, ServiceEntry},
};

/// How long to wait for a client's first bytes before treating the connection as opaque
/// TCP (server-speaks-first protocols send nothing).
const DETECT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// How long to wait for a TLS client's ClientHello when routing by server name.
const SNI_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Endpoints tried per connection before the client's connection is closed.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The listener on 127.0.0.1:15001 inside one pod.
pub struct Outbound(PodListener);

impl Outbound {
    pub fn new(listener: PodListener) -> Self {
        Self(listener)
    }

    pub async fn run(self) {
        let l = &self.0;
        let clients = Arc::new(Clients::new(PodCtx {
            pod: l.pod.clone(),
            pod_ip: l.pod_ip,
            inputs: l.inputs.clone(),
        }));
        self.0
            .serve(move |ctx, conn, peer| {
                let clients = clients.clone();
                async move { handle(ctx, clients, conn, peer).await }
            })
            .await;
    }
}

async fn handle(ctx: PodCtx, clients: Arc<Clients>, conn: TcpStream, peer: SocketAddrV4) {
    let PodCtx {
        pod,
        pod_ip,
        inputs,
    } = ctx.clone();
    let m = &inputs.metrics;
    m.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(m);
    // Before the agent writes a byte on this connection, so every byte it sends the app
    // takes the same path.
    if let Err(e) = inputs.capture.accelerate(pod.cookie(), &conn) {
        tracing::debug!(error = %e, "could not add the connection to LOCAL_SOCKS");
    }
    let Some(orig) = inputs.capture.orig_dst(pod.cookie(), peer) else {
        m.outbound_no_orig_dst.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, pod = %pod_ip, "no original destination recorded for this connection; closing it");
        return;
    };
    let Some(svc) = inputs.state.load().service(orig, Protocol::Tcp).cloned() else {
        m.outbound_no_service.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%orig, pod = %pod_ip, "connection to an address that is no longer a service; closing it");
        return;
    };
    // HTTP goes to the HTTP proxy; anything else (or a port declared tcp/tls) is forwarded
    // as bytes.
    let proto = match svc.app_protocol {
        Some(AppProtocol::Tcp | AppProtocol::Tls) => Detected::Opaque,
        _ => detect(&conn, DETECT_WAIT).await,
    };
    let http = matches!(proto, Detected::Http1 | Detected::Http2);
    // The service's connection limit (circuit breaker): HTTP clients hear why.
    let _slot = match svc.traffic.connect(svc.policy.breaker.max_connections) {
        Ok(slot) => slot,
        Err(o) => {
            m.http_circuit_open.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %svc.name, "connection limit reached; refusing");
            if http {
                http::refuse(conn, proto, o.reason()).await;
            }
            return;
        }
    };
    if http {
        m.outbound_http.fetch_add(1, Ordering::Relaxed);
        return http::serve(ctx, clients, conn, svc, proto).await;
    }
    // TLS to a service with TLSRoutes: the backend service is chosen by server name.
    let svc = if proto == Detected::Tls && !svc.tls_routes.is_empty() {
        let name = peek_server_name(&conn, SNI_WAIT).await;
        let target = name
            .as_deref()
            .and_then(|n| tls_backend(&inputs.state.load(), &svc, n));
        match target {
            Some(target) => target,
            None => {
                m.outbound_no_route.fetch_add(1, Ordering::Relaxed);
                tracing::info!(service = %svc.name, server_name = ?name, "no TLSRoute hostname matches; closing the connection");
                return;
            }
        }
    } else {
        svc
    };
    let state = inputs.state.load();
    // Try up to three endpoints: a connect failure (endpoint gone, its node's agent down)
    // moves on to the next one instead of failing the client.
    let attempts = svc.endpoints.len().min(MAX_CONNECT_ATTEMPTS);
    if attempts == 0 {
        m.outbound_no_endpoint.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %svc.name, "no endpoint; closing the connection");
        return;
    }
    let candidates: Vec<(Endpoint, Reach)> = svc
        .candidates(attempts)
        .map(|e| (e.clone(), Reach::of(&state, *e.addr.ip())))
        .collect();
    drop(state);
    for (ep, reach) in candidates {
        match dial(&inputs, &pod, pod_ip, ep.addr, reach).await {
            Ok(upstream) => return splice(m, conn, upstream).await,
            Err(e) => {
                m.upstream_connect_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %ep.addr, workload = %ep.workload, error = %e, "connecting to the endpoint failed");
            }
        }
    }
}

/// The backend Service for a TLS connection asking for `name`: among the service's
/// TLSRoutes, an exact hostname wins over a wildcard, a longer wildcard over a shorter
/// one; then a backend by weight.
fn tls_backend(state: &NodeState, svc: &ServiceEntry, name: &str) -> Option<Arc<ServiceEntry>> {
    let (route, _) = svc
        .tls_routes
        .iter()
        .flat_map(|r| r.hostnames.iter().map(move |h| (r, h)))
        .filter(|(_, h)| name_matches(h, name))
        .max_by_key(|(_, h)| (!h.starts_with("*."), h.len()))?;
    let b = http::routing::choose_backend(&route.backends)?;
    state
        .service_in(&svc.namespace, &b.service, b.port)
        .cloned()
}
