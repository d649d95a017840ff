//! The HTTP proxy for captured connections that speak HTTP/1.1 or HTTP/2 (h2c): each
//! request is matched against the HTTPRoutes of the service it was sent to, changed by the
//! rule's filters, sent to a backend service picked by weight, and from there to one of its
//! endpoints over a pooled connection. Responses the proxy makes itself carry
//! `x-weft-reason` so an operator can tell them from the app's.

mod client;
mod framing;
pub mod routing;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{atomic::Ordering::Relaxed, Arc},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, Limited};
use hyper::body::Body as _;
use hyper::{
    body::Incoming,
    header::{HeaderValue, HOST, LOCATION},
    server::conn::{http1, http2},
    service::service_fn,
    Request, Response, StatusCode, Uri, Version,
};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

pub use client::Clients;

use super::{detect::Detected, PodCtx};
use crate::{
    config::{
        route::{Filter, PathRewrite, Retry, RouteRule},
        AppProtocol,
    },
    state::ServiceEntry,
    traffic::{self, now_ns, ActiveSlot, InFlight},
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// The limits every client connection gets (docs/configuration.md, "Safe limits").
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long an HTTP/1.1 client may take to send a request's head (hyper has none
    /// unless a timer and this are set).
    pub header_read_timeout: Duration,
    /// Header fields in one HTTP/1.1 request (hyper answers 431 above it).
    pub max_headers: usize,
    /// Bytes of one request head: HTTP/1.1 buffer (431 above it), HTTP/2 header list.
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// Streams a client may open and reset before they are served (rapid reset,
    /// CVE-2023-44487); beyond it, GOAWAY.
    pub h2_max_pending_resets: usize,
    /// Streams the server may reset for the client's protocol errors before GOAWAY.
    pub h2_max_local_error_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            h2_max_concurrent_streams: 256,
            h2_stream_window: 1024 * 1024,
            h2_connection_window: 4 * 1024 * 1024,
            h2_max_pending_resets: 20,
            h2_max_local_error_resets: 1024,
        }
    }
}
/// Endpoints a request is tried on when connecting fails (nothing reached a server).
const MAX_CONNECT_ATTEMPTS: usize = 3;
/// The largest request body read into memory so it can be retried or mirrored; larger or
/// unknown-length bodies stream through once.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;
/// Wait before the n-th retry: n times the route's backoff, or this.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
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
    let limits = ctx.inputs.http_limits;
    let res = if proto == Detected::Http2 {
        let svc_fn = service_fn(move |req| {
            let (ctx, clients, svc) = (ctx.clone(), clients.clone(), svc.clone());
            async move { Ok::<_, Infallible>(handle(&ctx, &clients, &svc, req, true).await) }
        });
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
            .max_local_error_reset_streams(limits.h2_max_local_error_resets)
            .serve_connection(TokioIo::new(conn), svc_fn)
            .await
    } else {
        // HTTP/1.1: the framing of every request is followed so one that carries both
        // Content-Length and Transfer-Encoding is refused (see framing.rs).
        let (io, conflicting) = framing::Inspected::new(conn);
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let svc_fn = service_fn(move |req| {
            let (ctx, clients, svc) = (ctx.clone(), clients.clone(), svc.clone());
            let index = seen.fetch_add(1, Relaxed);
            let smuggled = conflicting.load(Relaxed) == index;
            async move {
                if smuggled {
                    let mut r = reply(StatusCode::BAD_REQUEST, "conflicting-framing");
                    r.headers_mut()
                        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                    return Ok::<_, Infallible>(r);
                }
                Ok(handle(&ctx, &clients, &svc, req, false).await)
            }
        });
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_headers(limits.max_headers)
            .max_header_size(limits.max_header_bytes)
            .serve_connection(TokioIo::new(io), svc_fn)
            .with_upgrades()
            .await
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Answer every request of a connection the circuit breaker refused with 503 and `reason`,
/// then close it.
pub async fn refuse(conn: TcpStream, proto: Detected, reason: &'static str) {
    let io = TokioIo::new(conn);
    let svc_fn = service_fn(move |_req| async move {
        let mut r = reply(StatusCode::SERVICE_UNAVAILABLE, reason);
        r.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        Ok::<_, Infallible>(r)
    });
    let res = if proto == Detected::Http2 {
        // Answered for a few seconds (HTTP/2 has no per-response close), then closed.
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(8)
            .serve_connection(io, svc_fn);
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .unwrap_or(Ok(()))
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            .keep_alive(false)
            .serve_connection(io, svc_fn);
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .unwrap_or(Ok(()))
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "refused connection ended with an error");
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
    let m = &ctx.inputs.metrics;
    // Which service: the rule's backends by weight, or the service itself without routes;
    // and the rate limits that apply (the rule's, then the service's).
    let (backend, buckets) = {
        let state = ctx.inputs.state.load();
        let backend = match rule {
            None => Some(svc.clone()),
            Some(rule) => routing::choose_backend(&rule.backends).and_then(|b| {
                state
                    .service_in(&svc.namespace, &b.service, b.port)
                    .cloned()
            }),
        };
        let buckets: Vec<_> = rule
            .into_iter()
            .flat_map(|r| &r.filters)
            .filter_map(|f| match f {
                Filter::Extension {
                    rate_limit: Some(l),
                    bucket,
                    ..
                } => Some((*l, state.buckets.get(bucket)?.clone())),
                _ => None,
            })
            .collect();
        (backend, buckets)
    };
    let service_limit = svc.policy.rate_limit.map(|l| (l, &svc.traffic.bucket));
    let limited = buckets.iter().any(|(l, b)| !b.try_take(l))
        || service_limit.is_some_and(|(l, b)| !b.try_take(&l));
    if limited {
        m.http_rate_limited.fetch_add(1, Relaxed);
        let mut r = reply(StatusCode::TOO_MANY_REQUESTS, "rate-limited");
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    for f in rule.into_iter().flat_map(|r| &r.filters) {
        if let Filter::Extension {
            fault: Some(fault), ..
        } = f
        {
            if let Some((delay, pct)) = fault.delay {
                if fastrand::u32(0..100) < pct {
                    m.http_faults.fetch_add(1, Relaxed);
                    tokio::time::sleep(delay).await;
                }
            }
            if let Some((status, pct)) = fault.abort {
                if fastrand::u32(0..100) < pct {
                    m.http_faults.fetch_add(1, Relaxed);
                    let status =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return reply(status, "fault-injected");
                }
            }
        }
    }
    let Some(backend) = backend else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "no-backend");
    };
    if backend.endpoints.is_empty() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "no-healthy-endpoint");
    }

    let (mut parts, body) = req.into_parts();
    let mut path = parts.uri.path().to_owned();
    let mut host_override = None;
    let mut mirrors = vec![];
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
                Filter::Mirror {
                    service,
                    port,
                    percent,
                } if fastrand::u32(0..100) < *percent => mirrors.push((service, *port)),
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
    if let Some(q) = parts.uri.query() {
        path.push('?');
        path.push_str(q);
    }
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

    // A request is sent again (on a connect failure, or a retry) only if its body is
    // known: none, or a small one with a declared length, read into memory first.
    let retry = rule.and_then(|r| r.retry.as_ref());
    let wants_copy = retry.is_some() || !mirrors.is_empty();
    let mut body = RequestBody::Stream(Some(body));
    if body.is_empty() {
        body = RequestBody::Buffered(Bytes::new());
    } else if wants_copy {
        body = body.buffer().await;
    }
    for (service, port) in mirrors {
        match &body {
            RequestBody::Buffered(b) => {
                let target = ctx
                    .inputs
                    .state
                    .load()
                    .service_in(&svc.namespace, service, port)
                    .cloned();
                if let Some(target) = target {
                    m.http_mirrored.fetch_add(1, Relaxed);
                    mirror(client.clone(), &target, &parts, &path, b.clone());
                }
            }
            RequestBody::Stream(_) => {
                m.http_mirror_skipped.fetch_add(1, Relaxed);
                tracing::debug!("request body too large or of unknown length to mirror");
            }
        }
    }

    // The circuit breaker of the backend service: an active slot, maybe after waiting.
    let slot = match backend.traffic.admit(&backend.policy.breaker).await {
        Ok(s) => s,
        Err(o) => {
            m.http_circuit_open.fetch_add(1, Relaxed);
            return reply(StatusCode::SERVICE_UNAVAILABLE, o.reason());
        }
    };
    let attempt = Attempts {
        ctx,
        client,
        backend: &backend,
        retry,
        backend_timeout: rule.and_then(|r| r.backend_timeout),
        parts: &parts,
        path: &path,
    };
    let result = match rule.and_then(|r| r.request_timeout) {
        Some(t) => match tokio::time::timeout(t, attempt.run(body)).await {
            Ok(r) => r,
            Err(_) => Err(reply(StatusCode::GATEWAY_TIMEOUT, "request-timeout")),
        },
        None => attempt.run(body).await,
    };
    let (mut resp, in_flight) = match result {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_upgrade {
            let upstream_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(join_upgraded(client_side, upstream_side));
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, body.boxed());
        }
    }
    let (mut parts, body) = resp.into_parts();
    routing::strip_hop_by_hop(&mut parts.headers);
    if let Some(rule) = rule {
        response_filters(rule, &mut parts.headers);
    }
    // The request stays active (breaker, least-request) until its response body ends.
    let body = Tracked {
        inner: body,
        _held: (slot, in_flight),
    };
    Response::from_parts(parts, body.boxed())
}

/// A request body: as it streams from the client, or read into memory so it can be sent
/// more than once.
enum RequestBody {
    /// `None` once sent.
    Stream(Option<Incoming>),
    Buffered(Bytes),
}

impl RequestBody {
    fn is_empty(&self) -> bool {
        match self {
            Self::Stream(b) => b.as_ref().is_none_or(|b| b.is_end_stream()),
            Self::Buffered(b) => b.is_empty(),
        }
    }

    /// Read a body of declared length up to [`MAX_BUFFERED_BODY`] into memory; longer or
    /// unknown-length bodies keep streaming (and are sent once).
    async fn buffer(self) -> Self {
        let Self::Stream(Some(b)) = self else {
            return self;
        };
        match b.size_hint().exact() {
            Some(n) if n <= MAX_BUFFERED_BODY as u64 => {
                match Limited::new(b, MAX_BUFFERED_BODY).collect().await {
                    Ok(c) => Self::Buffered(c.to_bytes()),
                    // The client broke off or lied about the length: nothing to send.
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the request body failed");
                        Self::Buffered(Bytes::new())
                    }
                }
            }
            _ => Self::Stream(Some(b)),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    /// The body for one attempt; `None` once a streamed body has been sent.
    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Buffered(b) => Some(Full::new(b.clone()).map_err(|n| match n {}).boxed()),
            Self::Stream(b) => b.take().map(|b| b.boxed()),
        }
    }
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

/// The response body, holding the request's breaker slot and in-flight count until the
/// body ends or the client goes away.
struct Tracked {
    inner: Incoming,
    _held: (ActiveSlot, InFlight),
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Send a copy of a request to one endpoint of `target` and forget it: its answer, its
/// failure and its time never touch the client's response.
fn mirror(
    client: Client<client::PodConnector, Body>,
    target: &ServiceEntry,
    parts: &hyper::http::request::Parts,
    path: &str,
    body: Bytes,
) {
    let Some(i) = traffic::pick(
        target,
        target.policy.balancer,
        &target.traffic.rr,
        |_| false,
        now_ns(),
    ) else {
        return;
    };
    let Ok(uri) = Uri::try_from(format!("http://{}{path}", target.endpoints[i].addr)) else {
        return;
    };
    let mut req = Request::new(Full::new(body).map_err(|n| match n {}).boxed());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(MIRROR_TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) => {
                let _ = resp.into_body().collect().await;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "mirrored request failed"),
            Err(_) => tracing::debug!("mirrored request timed out"),
        }
    });
}

/// How one attempt at a request ended.
enum Outcome {
    Answered(Response<Incoming>),
    ConnectFailed(hyper_util::client::legacy::Error),
    Failed(hyper_util::client::legacy::Error),
    TimedOut,
}

/// The attempts at one request: endpoint choice, retries within the budget, outlier
/// reports.
struct Attempts<'a> {
    ctx: &'a PodCtx,
    client: &'a Client<client::PodConnector, Body>,
    backend: &'a ServiceEntry,
    retry: Option<&'a Retry>,
    backend_timeout: Option<Duration>,
    parts: &'a hyper::http::request::Parts,
    path: &'a str,
}

/// Endpoints remembered as tried for one request (more are still avoided by chance).
const MAX_TRIED: usize = 8;

impl Attempts<'_> {
    async fn run(
        &self,
        mut body: RequestBody,
    ) -> Result<(Response<Incoming>, InFlight), Response<Body>> {
        let m = &self.ctx.inputs.metrics;
        let svc = self.backend;
        let policy = &svc.policy;
        if self.retry.is_some() {
            svc.traffic.deposit();
        }
        let (mut tried, mut n_tried) = ([usize::MAX; MAX_TRIED], 0);
        let (mut retries, mut connect_failures) = (0u32, 0usize);
        loop {
            let now = now_ns();
            let seen = |i: usize| tried[..n_tried].contains(&i);
            let pick = |skip: &dyn Fn(usize) -> bool| {
                traffic::pick(svc, policy.balancer, &svc.traffic.rr, skip, now)
            };
            let Some(i) = pick(&seen).or_else(|| pick(&|_| false)) else {
                return Err(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-healthy-endpoint",
                ));
            };
            if n_tried < MAX_TRIED && !seen(i) {
                tried[n_tried] = i;
                n_tried += 1;
            }
            let ep = &svc.endpoints[i];
            let Some(b) = body.take() else {
                return Err(reply(StatusCode::BAD_GATEWAY, "upstream-error"));
            };
            let uri = Uri::try_from(format!("http://{}{}", ep.addr, self.path))
                .map_err(|_| reply(StatusCode::BAD_REQUEST, "bad-path"))?;
            let mut req = Request::new(b);
            *req.method_mut() = self.parts.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = self.parts.version;
            *req.headers_mut() = self.parts.headers.clone();
            let in_flight = ep.stats.start();
            let sent = self.client.request(req);
            let outcome = match self.backend_timeout {
                Some(t) => match tokio::time::timeout(t, sent).await {
                    Ok(r) => r.map_err(|e| e.into()),
                    Err(_) => Err(Outcome::TimedOut),
                },
                None => sent.await.map_err(|e| e.into()),
            };
            let outcome = match outcome {
                Ok(r) => Outcome::Answered(r),
                Err(o) => o,
            };
            let done = now_ns();
            let ok = matches!(&outcome, Outcome::Answered(r) if r.status().as_u16() < 500);
            // A failure counts as a slow answer, so P2C steers away from an endpoint that
            // fails fast.
            let rtt = done.saturating_sub(now);
            let rtt = if ok {
                rtt
            } else {
                rtt.max(traffic::EndpointStats::FAILURE_RTT_NS)
            };
            ep.stats.observe_rtt(rtt, done);
            if let Some(t) = traffic::report(svc, i, ok, policy.outlier.as_ref(), done) {
                m.http_ejections.fetch_add(1, Relaxed);
                tracing::warn!(service = %svc.name, endpoint = %ep.addr, workload = %ep.workload, seconds = t.as_secs_f64(), "endpoint ejected after failures in a row");
            }
            let retry_on = |status: u16| {
                self.retry.is_some_and(|r| {
                    retries < r.attempts && r.codes.contains(&status) && body.replayable()
                })
            };
            let wants_retry = match &outcome {
                Outcome::Answered(r) => retry_on(r.status().as_u16()),
                Outcome::ConnectFailed(_) => {
                    m.upstream_connect_errors.fetch_add(1, Relaxed);
                    connect_failures += 1;
                    // Nothing reached the server: another endpoint is always safe to try.
                    if connect_failures < MAX_CONNECT_ATTEMPTS
                        && body.replayable()
                        && n_tried < svc.endpoints.len()
                    {
                        continue;
                    }
                    retry_on(503)
                }
                Outcome::Failed(_) => retry_on(502),
                Outcome::TimedOut => retry_on(504),
            };
            if wants_retry {
                if svc.traffic.withdraw(&policy.retry_budget) {
                    retries += 1;
                    m.http_retries.fetch_add(1, Relaxed);
                    let backoff = self
                        .retry
                        .and_then(|r| r.backoff)
                        .unwrap_or(DEFAULT_BACKOFF);
                    tokio::time::sleep(backoff * retries).await;
                    continue;
                }
                m.http_retry_budget_exhausted.fetch_add(1, Relaxed);
            }
            return match outcome {
                Outcome::Answered(r) => Ok((r, in_flight)),
                Outcome::ConnectFailed(e) => {
                    tracing::info!(endpoint = %ep.addr, error = %e, "upstream connect failed");
                    Err(reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream-connect-failed",
                    ))
                }
                Outcome::Failed(e) => {
                    tracing::info!(endpoint = %ep.addr, error = %e, "upstream request failed");
                    Err(reply(StatusCode::BAD_GATEWAY, "upstream-error"))
                }
                Outcome::TimedOut => Err(reply(StatusCode::GATEWAY_TIMEOUT, "backend-timeout")),
            };
        }
    }
}

impl From<hyper_util::client::legacy::Error> for Outcome {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            Self::ConnectFailed(e)
        } else {
            Self::Failed(e)
        }
    }
}
