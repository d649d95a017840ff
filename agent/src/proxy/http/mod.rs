//! The HTTP proxy for captured connections that speak HTTP/1.1 or HTTP/2 (h2c): each
//! request is matched against the HTTPRoutes of the service it was sent to, changed by the
//! rule's filters, sent to a backend service picked by weight, and from there to one of its
//! endpoints over a pooled connection. Responses the proxy makes itself carry
//! `x-weft-reason` so an operator can tell them from the app's.

mod client;
pub mod routing;

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Empty, Full};
use hyper::body::Body as _;
use hyper::{
    body::Incoming,
    header::{HeaderValue, HOST, LOCATION},
    server::conn::{http1, http2},
    service::service_fn,
    Request, Response, StatusCode, Uri, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub use client::Clients;

use super::{detect::Detected, PodCtx};
use crate::{
    config::{
        route::{Filter, PathRewrite, RouteRule},
        AppProtocol,
    },
    state::ServiceEntry,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request's headers (hyper has no default).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Endpoints a request without a body is tried on when connecting fails.
const MAX_CONNECT_ATTEMPTS: usize = 3;
/// The reason header on every response the proxy generates.
pub const REASON: &str = "x-weft-reason";

/// A response made by the proxy, with its reason in a header and the body.
pub fn reply(status: StatusCode, reason: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("weft: {reason}\n")))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        REASON,
        HeaderValue::from_str(reason).unwrap_or(HeaderValue::from_static("proxy")),
    );
    r
}

/// Serve one captured client connection as HTTP, for service `svc`.
pub async fn serve(
    ctx: PodCtx,
    clients: Arc<Clients>,
    conn: TcpStream,
    svc: Arc<ServiceEntry>,
    proto: Detected,
) {
    let io = TokioIo::new(conn);
    let downstream_h2 = proto == Detected::Http2;
    let svc_fn = service_fn(move |req| {
        let (ctx, clients, svc) = (ctx.clone(), clients.clone(), svc.clone());
        async move { Ok::<_, Infallible>(handle(&ctx, &clients, &svc, req, downstream_h2).await) }
    });
    let res = if downstream_h2 {
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc_fn)
            .await
    } else {
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, svc_fn)
            .with_upgrades()
            .await
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

async fn handle(
    ctx: &PodCtx,
    clients: &Clients,
    svc: &Arc<ServiceEntry>,
    mut req: Request<Incoming>,
    downstream_h2: bool,
) -> Response<Body> {
    // An HTTP/1.1 Upgrade (WebSocket and the like): keep its headers, and once the
    // upstream agrees (101) join the two upgraded connections.
    let upgrade = routing::upgrade_of(req.headers()).filter(|_| !downstream_h2);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let view = routing::RequestView {
        method: req.method(),
        uri: req.uri(),
        headers: req.headers(),
    };
    let selected = routing::select(&svc.routes, &view);
    if selected.is_none() && !svc.routes.is_empty() {
        return reply(StatusCode::NOT_FOUND, "no-route");
    }
    let rule = selected.map(|(_, rule)| rule);
    let matched_prefix = rule
        .and_then(|r| routing::matched_prefix(r, &view))
        .map(str::to_owned);
    if let Some(redirect) = rule.and_then(|r| {
        r.filters
            .iter()
            .find(|f| matches!(f, Filter::Redirect { .. }))
    }) {
        return redirect_response(redirect, &req, matched_prefix.as_deref());
    }
    // Which service: the rule's backends by weight, or the service itself without routes.
    let state = ctx.inputs.state.load();
    let backend = match rule {
        None => Some(svc.clone()),
        Some(rule) => {
            let total = routing::total_weight(&rule.backends);
            routing::pick_backend(&rule.backends, fastrand::u64(0..total.max(1))).and_then(|b| {
                state
                    .service_named(&format!("{}/{}", svc.namespace, b.service), b.port)
                    .cloned()
            })
        }
    };
    let Some(backend) = backend else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "no-backend");
    };
    let endpoints: Vec<std::net::SocketAddrV4> = backend
        .candidates(MAX_CONNECT_ATTEMPTS)
        .map(|e| e.addr)
        .collect();
    if endpoints.is_empty() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "no-healthy-endpoint");
    }
    drop(state);

    let (mut parts, body) = req.into_parts();
    let mut path = parts.uri.path().to_owned();
    let mut host_override = None;
    if let Some(rule) = rule {
        for f in &rule.filters {
            match f {
                Filter::RequestHeaders(c) => routing::change_headers(&mut parts.headers, c),
                Filter::Rewrite { hostname, path: p } => {
                    if let Some(p) = p {
                        path = routing::rewrite_path(&path, p, matched_prefix.as_deref());
                    }
                    host_override.clone_from(hostname);
                }
                _ => {}
            }
        }
    }
    routing::strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = &upgrade {
        parts.headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        parts.headers.insert(hyper::header::UPGRADE, u.clone());
    }
    if let Some(h) = host_override.and_then(|h| HeaderValue::from_str(&h).ok()) {
        parts.headers.insert(HOST, h);
    }
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    // The upstream speaks what the backend port declares, else what the client spoke;
    // upgrades are HTTP/1.1 only.
    let upstream_h2 = match backend.app_protocol {
        Some(AppProtocol::Http2) => true,
        Some(AppProtocol::Http) => false,
        _ => downstream_h2,
    } && upgrade.is_none();
    parts.version = if upstream_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let client = if upstream_h2 {
        &clients.h2
    } else {
        &clients.h1
    };
    let backend_timeout = rule.and_then(|r| r.backend_timeout.or(r.request_timeout));
    // A request without a body can be sent again: if connecting to one endpoint fails, try
    // the next. (Requests with a body are tried once; replaying them needs buffering under
    // a retry budget.)
    let replayable = body.is_end_stream();
    let mut body = Some(body.boxed());
    for (attempt, addr) in endpoints.iter().enumerate() {
        let uri = match Uri::try_from(format!("http://{addr}{pq}")) {
            Ok(u) => u,
            Err(_) => return reply(StatusCode::BAD_REQUEST, "bad-path"),
        };
        let mut req = Request::new(match body.take() {
            Some(b) => b,
            None if replayable => Empty::new().map_err(|n: Infallible| match n {}).boxed(),
            None => break,
        });
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        let sent = client.request(req);
        let result = match backend_timeout {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => return reply(StatusCode::GATEWAY_TIMEOUT, "backend-timeout"),
            },
            None => sent.await,
        };
        match result {
            Ok(mut resp) => {
                let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if let (true, Some(client_side)) = (upgraded, client_upgrade) {
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    tokio::spawn(join_upgraded(client_side, upstream_side));
                    let (parts, body) = resp.into_parts();
                    return Response::from_parts(parts, body.boxed());
                }
                let (mut parts, body) = resp.into_parts();
                routing::strip_hop_by_hop(&mut parts.headers);
                if let Some(rule) = rule {
                    response_filters(rule, &mut parts.headers);
                }
                return Response::from_parts(parts, body.boxed());
            }
            Err(e) if e.is_connect() && attempt + 1 < endpoints.len() => {
                ctx.inputs
                    .metrics
                    .upstream_connect_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(endpoint = %addr, error = %e, "upstream connect failed; trying the next endpoint");
            }
            Err(e) if e.is_connect() => {
                ctx.inputs
                    .metrics
                    .upstream_connect_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(endpoint = %addr, error = %e, "upstream connect failed");
                return reply(StatusCode::SERVICE_UNAVAILABLE, "upstream-connect-failed");
            }
            Err(e) => {
                tracing::info!(endpoint = %addr, error = %e, "upstream request failed");
                return reply(StatusCode::BAD_GATEWAY, "upstream-error");
            }
        }
    }
    reply(StatusCode::SERVICE_UNAVAILABLE, "upstream-connect-failed")
}

/// Copy between the client's and the upstream's upgraded connections until both close.
async fn join_upgraded(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::info!(error = %e, "upgrade failed"),
    }
}

fn response_filters(rule: &RouteRule, h: &mut hyper::HeaderMap) {
    for f in &rule.filters {
        if let Filter::ResponseHeaders(c) = f {
            routing::change_headers(h, c);
        }
    }
}

fn redirect_response(f: &Filter, req: &Request<Incoming>, matched: Option<&str>) -> Response<Body> {
    let Filter::Redirect {
        scheme,
        hostname,
        path,
        port,
        status,
    } = f
    else {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, "bad-redirect");
    };
    let req_host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    let host = hostname
        .clone()
        .unwrap_or_else(|| req_host.split(':').next().unwrap_or("").to_owned());
    let scheme = scheme.clone().unwrap_or_else(|| "http".into());
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let p = match path {
        Some(PathRewrite::Full(p)) => p.clone(),
        Some(rw) => routing::rewrite_path(req.uri().path(), rw, matched),
        None => req.uri().path().to_owned(),
    };
    let q = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut r = reply(
        StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND),
        "redirect",
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{port}{p}{q}")) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}
