//! Outbound: the listener on 127.0.0.1:15001 inside a pod, where connect4 sends the pod's
//! service connects. Recovers the original destination, tells HTTP from the rest, and
//! serves HTTP per request or forwards the bytes to an endpoint.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::net::TcpStream;

use super::{
    conn::ConnCtx,
    detect::{detect, Detected},
    dial::{dial, Reach},
    http::{self, Clients},
    listener::PodListener,
    sni::{name_matches, peek_server_name},
    stream::{forward, Forwarded},
};
use crate::{
    config::{authz::Http, route::TlsRoute, AppProtocol, Protocol},
    metrics::Metrics,
    state::{Endpoint, NodeState, ServiceEntry},
    telemetry::{ms_since, TcpRecord},
};

/// How long to wait for a client's first bytes before treating the connection as opaque
/// TCP (server-speaks-first protocols send nothing).
const DETECT_WAIT: Duration = Duration::from_millis(100);

/// Endpoints tried per connection before the client's connection is closed.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The listener on 127.0.0.1:15001 inside one pod.
pub struct Outbound(PodListener);

impl Outbound {
    pub fn new(listener: PodListener) -> Self {
        Self(listener)
    }

    pub async fn run(self) {
        let clients = Arc::new(Clients::new(self.0.pod.clone()));
        self.0
            .serve(move |ctx, conn| {
                let clients = clients.clone();
                async move { handle(ctx, clients, conn).await }
            })
            .await;
    }
}

async fn handle(ctx: ConnCtx, clients: Arc<Clients>, conn: TcpStream) {
    let started = (Instant::now(), SystemTime::now());
    let (pod, peer) = (&ctx.pod, ctx.peer);
    let inputs = ctx.inputs();
    let m = ctx.metrics();
    Metrics::inc(&m.outbound_accepted);
    let cookie = pod.sockets.netns_cookie();
    // Before the agent writes a byte on this connection, so every byte it sends the app
    // takes the same path.
    if let Err(e) = inputs.capture.accelerate(cookie, &conn) {
        tracing::debug!(error = %e, "could not add the connection to LOCAL_SOCKS");
    }
    let Some(orig) = inputs.capture.orig_dst(cookie, peer) else {
        Metrics::inc(&m.outbound_no_orig_dst);
        tracing::warn!(%peer, pod = %pod.ip, "no original destination recorded for this connection; closing it");
        return;
    };
    let Some(svc) = inputs.state.load().service(orig, Protocol::Tcp).cloned() else {
        Metrics::inc(&m.outbound_no_service);
        tracing::warn!(%orig, pod = %pod.ip, "connection to an address that is no longer a service; closing it");
        return;
    };
    // HTTP goes to the HTTP proxy; anything else (or a port declared tcp/tls) is forwarded
    // as bytes.
    let proto = match svc.app_protocol {
        Some(AppProtocol::Tcp | AppProtocol::Tls) => Detected::Opaque,
        _ => detect(&conn, DETECT_WAIT).await,
    };
    let is_http = matches!(proto, Detected::Http1 | Detected::Http2);
    // The service's connection limit (circuit breaker): HTTP clients hear why.
    let _slot = match svc.traffic.connect(svc.policy.breaker.max_connections) {
        Ok(slot) => slot,
        Err(o) => {
            tracing::debug!(service = %svc.name, "connection limit reached; refusing");
            if is_http {
                http::refuse(&ctx, conn, proto, o.reason()).await;
            } else {
                Metrics::inc(&m.http_circuit_open);
            }
            return;
        }
    };
    if is_http {
        Metrics::inc(&m.outbound_http);
        return http::serve(ctx.clone(), clients, conn, svc, proto).await;
    }
    // TLS to a service with TLSRoutes (for this client's namespace): the backend service
    // is chosen by server name.
    let tls_routes = if proto == Detected::Tls {
        let state = inputs.state.load();
        svc.tls_routes_for(state.namespace_of(pod.ip)).to_vec()
    } else {
        Vec::new()
    };
    let svc = if !tls_routes.is_empty() {
        let name = {
            // Bounded: each read holds a 16 KiB buffer.
            let Ok(_peek) = inputs.sni_peeks.acquire().await else {
                return;
            };
            peek_server_name(&conn, ctx.timeouts().header_read).await
        };
        let target = name
            .as_deref()
            .and_then(|n| tls_backend(&inputs.state.load(), &tls_routes, n));
        match target {
            Some(target) => target,
            None => {
                Metrics::inc(&m.outbound_no_route);
                tracing::info!(service = %svc.name, server_name = ?name, "no TLSRoute hostname matches; closing the connection");
                return;
            }
        }
    } else {
        svc
    };
    // Try up to three endpoints: a connect failure (endpoint gone, its node's agent down)
    // moves on to the next one instead of failing the client.
    // Endpoints an AuthorizationPolicy denies this pod are left out.
    let (candidates, denied) = {
        let state = inputs.state.load();
        let source = state.identities.get(&pod.ip);
        let mut denied = 0;
        let mut allowed: Vec<(Endpoint, Reach)> = Vec::new();
        for e in svc.candidates(MAX_CONNECT_ATTEMPTS) {
            if super::authz::allowed(&state, inputs, pod.ip, source, e.addr, Http::Opaque, "tcp") {
                allowed.push((e.clone(), Reach::of(&state, *e.addr.ip())));
            } else {
                denied += 1;
            }
        }
        (allowed, denied)
    };
    let record = |ep: Option<&Endpoint>, outcome: &'static str, f: Option<&Forwarded>| {
        if !inputs.telemetry.enabled {
            return;
        }
        inputs.telemetry.tcp(TcpRecord {
            start: started.1,
            source: inputs.state.load().peer(pod.ip),
            destination: ep.map(Endpoint::peer).unwrap_or_default(),
            service: Some(svc.name.clone()),
            endpoint: ep.map(|e| e.addr),
            duration_ms: ms_since(started.0),
            sent_bytes: f.map_or(0, |f| f.sent),
            received_bytes: f.map_or(0, |f| f.received),
            outcome,
        });
    };
    if candidates.is_empty() {
        if denied > 0 {
            Metrics::inc(&m.policy_denied);
            record(None, "denied", None);
        } else {
            Metrics::inc(&m.outbound_no_endpoint);
            tracing::info!(service = %svc.name, "no endpoint; closing the connection");
            record(None, "no-endpoint", None);
        }
        return;
    }
    let mut last = None;
    for (ep, reach) in &candidates {
        match dial(inputs, &*pod.sockets, pod.ip, ep.addr, *reach).await {
            Ok(upstream) => {
                let f = forward(m, conn, upstream, ctx.timeouts().idle).await;
                record(Some(ep), f.ended.as_str(), Some(&f));
                return;
            }
            Err(e) => {
                tracing::warn!(endpoint = %ep.addr, workload = %ep.workload, error = %e, "connecting to the endpoint failed");
                ep.stats.trend.record(None, true, true);
                last = Some(ep);
            }
        }
    }
    record(last, "connect-failed", None);
}

/// The backend Service for a TLS connection asking for `name`: among the service's
/// TLSRoutes, an exact hostname wins over a wildcard, a longer wildcard over a shorter
/// one; then a backend by weight.
fn tls_backend(
    state: &NodeState,
    routes: &[Arc<TlsRoute>],
    name: &str,
) -> Option<Arc<ServiceEntry>> {
    let (route, _) = routes
        .iter()
        .flat_map(|r| r.hostnames.iter().map(move |h| (r, h)))
        .filter(|(_, h)| name_matches(h, name))
        .max_by_key(|(_, h)| (!h.starts_with("*."), h.len()))?;
    let b = http::routing::choose_backend(&route.backends)?;
    if !b.resolved() {
        return None;
    }
    state.service_in(&b.namespace, &b.service, b.port).cloned()
}
