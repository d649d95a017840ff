//! The HTTP proxy for captured connections that speak HTTP/1.1 or HTTP/2 (h2c). A client
//! connection is served by hyper ([`serve`]), under the connection's timeouts and the drain
//! signal; each request goes through five phases, each a function below:
//!
//! ```text
//! route    the rule it matches (plan.rs), the backend service; redirects answer here
//! admit    rate limits, injected faults, an endpoint to go to at all
//! prepare  the upstream request: filters, hop-by-hop headers, the body (streamed, or
//!          read into memory for retries and mirrors), mirrors sent off
//! attempts the backend's circuit breaker, then endpoint choice, retries within the
//!          budget, outlier reports (attempts.rs)
//! respond  the answer on its way back: upgrades joined, response filters, the request
//!          held busy until its body ends
//! ```
//!
//! A phase that answers itself returns a [`ProxyError`], made into a response in one place
//! ([`ProxyError::respond`]) with `x-weft-reason`.

mod attempts;
pub mod body;
mod client;
pub mod framing;
pub mod plan;
mod record;
pub mod routing;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    body::Incoming,
    header::{HeaderValue, CONNECTION, HOST},
    http::uri::PathAndQuery,
    server::conn::{http1, http2},
    service::service_fn,
    Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub use client::Clients;

use self::{
    attempts::Attempts,
    body::{Body, ClientBody, ClientFault, RequestBody, Tracked},
    plan::Rule,
    record::{Exchange, Recorded},
};
use super::{
    conn::ConnCtx,
    detect::Detected,
    error::{ProxyError, Reason},
    stream::{forward, Clock},
};
use crate::{
    config::AppProtocol,
    metrics::{GaugeGuard, Metrics},
    state::{ServiceAddr, ServiceEntry},
    traffic,
};

/// The limits every client connection gets (docs/traffic.md, "Safe limits").
#[derive(Clone, Copy, Debug)]
pub struct Limits {
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

/// Wait before the n-th retry: n times the route's backoff, or this.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// One client connection being served as HTTP, for one service.
struct HttpConn {
    ctx: ConnCtx,
    clients: Arc<Clients>,
    svc: Arc<ServiceEntry>,
    /// The client speaks HTTP/2.
    h2: bool,
    /// Requests in flight, and the last time one started or ended (idle timeout).
    busy: AtomicUsize,
    clock: Clock,
    /// HTTP/1.1: the request framing the client's bytes showed (framing.rs).
    framing: Option<Arc<framing::Control>>,
    /// HTTP/1.1: requests seen so far on the connection.
    seen: AtomicU64,
    /// The client pod, as telemetry names it.
    source: crate::telemetry::Peer,
    /// The client pod's namespace (which consumer routes apply).
    namespace: Option<String>,
    /// The metric series this connection's requests counted into last.
    series: Arc<crate::telemetry::families::SeriesCache>,
}

/// Serve one captured client connection as HTTP, for service `svc`.
pub async fn serve(
    ctx: ConnCtx,
    clients: Arc<Clients>,
    conn: TcpStream,
    svc: Arc<ServiceEntry>,
    proto: Detected,
) {
    let limits = ctx.inputs().config.http;
    let t = *ctx.timeouts();
    let h2 = proto == Detected::Http2;
    let (io, framing) = if h2 {
        (framing::Inspected::passthrough(conn), None)
    } else {
        let (io, control) = framing::Inspected::new(conn);
        (io, Some(control))
    };
    let (source, namespace) = {
        let state = ctx.inputs().state.load();
        (
            state.peer(ctx.pod.ip),
            state.namespace_of(ctx.pod.ip).map(str::to_owned),
        )
    };
    let st = Arc::new(HttpConn {
        clients,
        svc,
        h2,
        busy: AtomicUsize::new(0),
        clock: Clock::start(),
        framing,
        seen: AtomicU64::new(0),
        source,
        namespace,
        series: Arc::default(),
        ctx,
    });
    let svc_fn = {
        let st = st.clone();
        service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(st.handle(req).await) }
        })
    };
    let res = if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(t.h2_keepalive_interval)
            .keep_alive_timeout(t.h2_keepalive_timeout)
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
            .max_local_error_reset_streams(limits.h2_max_local_error_resets)
            .serve_connection(TokioIo::new(io), svc_fn);
        st.drive(conn, |c| c.graceful_shutdown()).await
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(t.header_read)
            .max_headers(limits.max_headers)
            .max_header_size(limits.max_header_bytes)
            .serve_connection(TokioIo::new(io), svc_fn)
            .with_upgrades();
        st.drive(conn, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = res {
        if e.is_timeout() {
            Metrics::inc(&st.ctx.metrics().header_read_timeouts);
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Answer every request of a connection the circuit breaker refused with 503 and `reason`,
/// then close it.
pub async fn refuse(ctx: &ConnCtx, conn: TcpStream, proto: Detected, reason: &'static str) {
    let reason = if reason == Reason::CircuitOpenConnections.as_str() {
        Reason::CircuitOpenConnections
    } else {
        Reason::CircuitOpenRequests
    };
    let metrics = ctx.inputs().metrics.clone();
    let io = TokioIo::new(conn);
    let svc_fn = service_fn(move |_req| {
        let mut r = ProxyError::from(reason).respond(&metrics);
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        async move { Ok::<_, Infallible>(r) }
    });
    let wait = ctx.timeouts().header_read;
    let res = if proto == Detected::Http2 {
        // Answered for the header read timeout (HTTP/2 has no per-response close), then
        // closed.
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(8)
            .serve_connection(io, svc_fn);
        tokio::time::timeout(wait, conn).await.unwrap_or(Ok(()))
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(wait)
            .keep_alive(false)
            .serve_connection(io, svc_fn);
        tokio::time::timeout(wait, conn).await.unwrap_or(Ok(()))
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "refused connection ended with an error");
    }
}

/// Where a request is going, once routed.
struct Routed<'a> {
    rule: Option<&'a Rule>,
    /// The PathPrefix the rule matched by (for ReplacePrefixMatch).
    prefix: Option<&'a str>,
    backend: Arc<ServiceEntry>,
}

/// The upstream request, ready to be sent to an endpoint.
struct Prepared {
    parts: hyper::http::request::Parts,
    path: PathAndQuery,
    body: RequestBody,
    fault: ClientFault,
    /// The client asked to upgrade (HTTP/1.1): joined with the upstream's on 101.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    upstream_h2: bool,
}

/// Counts a request in flight on its connection, and as cancelled by the client if it is
/// dropped (the client reset the stream or closed the connection) before it was answered.
struct InProgress<'a> {
    conn: &'a HttpConn,
    answered: bool,
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.conn.busy.fetch_sub(1, Relaxed);
        self.conn.clock.touch();
        if !self.answered {
            Metrics::inc(&self.conn.ctx.metrics().http_client_cancelled);
        }
    }
}

impl HttpConn {
    fn metrics(&self) -> &Metrics {
        self.ctx.metrics()
    }

    /// Run the connection until it ends: on drain, HTTP/2 gets GOAWAY at once, HTTP/1.1
    /// answers with `Connection: close` and is closed after the drain grace; an HTTP/2
    /// connection with no request for the idle timeout is closed.
    async fn drive<C>(&self, conn: C, shutdown: fn(Pin<&mut C>)) -> Result<(), hyper::Error>
    where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        tokio::pin!(conn);
        let t = self.ctx.timeouts();
        let drain = &self.ctx.inputs().drain;
        let mut grace_until: Option<tokio::time::Instant> = None;
        let mut shut = false;
        loop {
            tokio::select! {
                r = &mut conn => return r,
                () = drain.signaled(), if grace_until.is_none() && !shut => {
                    if self.h2 {
                        shutdown(conn.as_mut());
                        shut = true;
                    } else {
                        grace_until = Some(tokio::time::Instant::now() + t.drain_idle_grace);
                    }
                }
                () = sleep_until(grace_until), if !shut => {
                    shutdown(conn.as_mut());
                    shut = true;
                }
                () = self.idle(t.idle), if self.h2 && !shut => {
                    Metrics::inc(&self.metrics().http_idle_timeouts);
                    shutdown(conn.as_mut());
                    shut = true;
                }
            }
        }
    }

    /// Resolves once no request has been in flight for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            self.clock.idle_for(idle).await;
            if self.busy.load(Relaxed) == 0 {
                return;
            }
            // Busy with a long request: look again one idle period from now.
            self.clock.touch();
        }
    }

    /// One request, through every phase; whatever the proxy answers itself is made into
    /// a response here.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.busy.fetch_add(1, Relaxed);
        self.clock.touch();
        let mut progress = InProgress {
            conn: self,
            answered: false,
        };
        let telemetry = &self.ctx.inputs().telemetry;
        let mut ex = Exchange::start(&req, &self.source, &self.svc.name, telemetry);
        // Golden signals count against the service dialed until the request is routed
        // (a 404 no-route is that service's), then against the backend it went to.
        if telemetry.enabled {
            ex.golden = Some(self.svc.traffic.clone());
        }
        let mut resp = match self.proxy(req, &mut ex).await {
            Ok(r) => r,
            Err(e) => {
                ex.reason = Some(e.reason.as_str());
                e.respond(self.metrics())
            }
        };
        if !self.h2 {
            // The client hears HTTP/1.1 whatever the upstream spoke; while draining it
            // is told to take its next request elsewhere.
            *resp.version_mut() = Version::HTTP_11;
            if self.ctx.inputs().drain.is_draining() {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        progress.answered = true;
        if !telemetry.enabled {
            return resp;
        }
        let status = resp.status().as_u16();
        let telemetry = telemetry.clone();
        let series = self.series.clone();
        resp.map(|b| body::boxed(Recorded::new(b, ex, status, telemetry, series)))
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(f) = &self.framing {
            // Requests arrive in order on an HTTP/1.1 connection.
            if f.conflicting(self.seen.fetch_add(1, Relaxed)) {
                return Err(Reason::ConflictingFraming.into());
            }
        }
        let routed = self.route(&req)?;
        ex.service = routed.backend.name.clone();
        if self.ctx.inputs().telemetry.enabled {
            // Routed: from here the backend service's (see `handle`).
            ex.golden = Some(routed.backend.traffic.clone());
        }
        ex.route = routed.rule.map(|r| r.route.clone());
        ex.access_log = routed.rule.and_then(|r| r.access_log);
        self.admit(&routed).await?;
        let prepared = self.prepare(req, &routed).await?;
        ex.body = prepared.fault.clone();
        let backend = &routed.backend;
        let slot = backend
            .traffic
            .admit(&backend.policy.breaker)
            .await
            .map_err(|o| match o {
                traffic::Overload::Connections => Reason::CircuitOpenConnections,
                traffic::Overload::Requests => Reason::CircuitOpenRequests,
            })?;
        let rule = routed.rule;
        let client = if prepared.upstream_h2 {
            &self.clients.h2
        } else {
            &self.clients.h1
        };
        let attempts = Attempts {
            ctx: &self.ctx,
            client,
            backend,
            retry: rule.and_then(|r| r.retry.as_ref()),
            backend_timeout: rule.and_then(|r| r.backend_timeout),
            parts: &prepared.parts,
            path: &prepared.path,
            fault: &prepared.fault,
        };
        let run = attempts.run(prepared.body, ex);
        let (resp, in_flight) = match rule.and_then(|r| r.request_timeout) {
            Some(t) => tokio::time::timeout(t, run)
                .await
                .map_err(|_| ProxyError::from(Reason::RequestTimeout))??,
            None => run.await?,
        };
        Ok(self.respond(resp, rule, prepared.client_upgrade, (slot, in_flight)))
    }

    /// Phase 1: the rule and the backend service.
    fn route<'a>(&'a self, req: &Request<Incoming>) -> Result<Routed<'a>, ProxyError> {
        let plan = self.svc.routes_for(self.namespace.as_deref());
        if plan.is_empty() {
            return Ok(Routed {
                rule: None,
                prefix: None,
                backend: self.svc.clone(),
            });
        }
        let sel = plan
            .select(req.method(), req.uri(), req.headers())
            .ok_or(Reason::NoRoute)?;
        if let Some(r) = &sel.rule.redirect {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().host())
                .unwrap_or("");
            return Err(ProxyError {
                location: r.location(req.uri(), host, sel.prefix),
                ..ProxyError::with_status(Reason::Redirect, r.status)
            });
        }
        // A backendRef naming a Service that is not declared: 500, as the Gateway API
        // asks (the route's status says ResolvedRefs=False, BackendNotFound).
        let addr = sel
            .rule
            .choose_backend()
            .ok_or(if sel.rule.backends.is_empty() {
                Reason::NoBackend
            } else {
                Reason::BackendNotFound
            })?;
        let backend = self
            .ctx
            .inputs()
            .state
            .load()
            .services
            .get(&addr)
            .cloned()
            .ok_or(Reason::NoBackend)?;
        Ok(Routed {
            rule: Some(sel.rule),
            prefix: sel.prefix,
            backend,
        })
    }

    /// Phase 2: rate limits (the rule's, then the service's), faults, and whether there
    /// is an endpoint to go to at all.
    async fn admit(&self, routed: &Routed<'_>) -> Result<(), ProxyError> {
        let rule = routed.rule;
        let limited = rule.is_some_and(|r| r.rate_limits.iter().any(|(l, b)| !b.try_take(l)))
            || self
                .svc
                .policy
                .rate_limit
                .is_some_and(|l| !self.svc.traffic.bucket.try_take(&l));
        if limited {
            return Err(Reason::RateLimited.into());
        }
        for fault in rule.into_iter().flat_map(|r| &r.faults) {
            if let Some((delay, pct)) = fault.delay {
                if fastrand::u32(0..100) < pct {
                    Metrics::inc(&self.metrics().http_faults);
                    tokio::time::sleep(delay).await;
                }
            }
            if let Some((status, pct)) = fault.abort {
                if fastrand::u32(0..100) < pct {
                    let status =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return Err(ProxyError::with_status(Reason::FaultInjected, status));
                }
            }
        }
        if routed.backend.endpoints.is_empty() {
            return Err(Reason::NoHealthyEndpoint.into());
        }
        Ok(())
    }

    /// Phase 3: the upstream request.
    async fn prepare(
        &self,
        mut req: Request<Incoming>,
        routed: &Routed<'_>,
    ) -> Result<Prepared, ProxyError> {
        let rule = routed.rule;
        // An HTTP/1.1 Upgrade (WebSocket and the like): keep its headers, and once the
        // upstream agrees (101) join the two upgraded connections.
        let upgrade = (!self.h2)
            .then(|| routing::upgrade_of(req.headers()))
            .flatten();
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let path = match rule.and_then(|r| r.rewrite_path.as_ref()) {
            None => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            Some(rw) => {
                let mut p = routing::rewrite_path(parts.uri.path(), rw, routed.prefix);
                if let Some(q) = parts.uri.query() {
                    p.push('?');
                    p.push_str(q);
                }
                // A valid path with a prefix replaced by a valid one (checked with the
                // configuration) is valid; should it not be, the original path is sent.
                PathAndQuery::try_from(p).unwrap_or_else(|_| {
                    parts
                        .uri
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/"))
                })
            }
        };
        // An HTTP/2 client names the host in :authority, an HTTP/1.1 upstream wants Host.
        if !parts.headers.contains_key(HOST) {
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        routing::strip_hop_by_hop(&mut parts.headers);
        if let Some(rule) = rule {
            rule.request_headers.apply(&mut parts.headers);
            if let Some(h) = &rule.rewrite_host {
                parts.headers.insert(HOST, h.clone());
            }
        }
        if let Some(u) = &upgrade {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(hyper::header::UPGRADE, u.clone());
        }
        // The upstream speaks what the backend port declares, else what the client spoke;
        // upgrades are HTTP/1.1 only.
        let upstream_h2 = match routed.backend.app_protocol {
            Some(AppProtocol::Http2) => true,
            Some(AppProtocol::Http) => false,
            _ => self.h2,
        } && upgrade.is_none();
        parts.version = if upstream_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

        // A request is sent again (on a connect failure, or a retry) only if its body is
        // known: none, or a small one with a declared length, read into memory first.
        let t = self.ctx.timeouts();
        let mirrors = rule.map_or(&[][..], |r| &r.mirrors);
        let (mut body, fault) = if hyper::body::Body::is_end_stream(&body) {
            (RequestBody::Buffered(Bytes::new()), ClientFault::default())
        } else {
            let fault = ClientFault::watch();
            let body = ClientBody::new(body, fault.clone(), t.request_body);
            (RequestBody::Stream(Some(body)), fault)
        };
        if !body.replayable() && (rule.is_some_and(|r| r.retry.is_some()) || !mirrors.is_empty()) {
            body = body
                .buffer(t.request_body)
                .await
                .map_err(ProxyError::from)?;
        }
        for m in mirrors {
            if fastrand::u32(0..100) < m.percent {
                self.mirror(m.target, &parts, &path, &body);
            }
        }
        Ok(Prepared {
            parts,
            path,
            body,
            fault,
            client_upgrade,
            upstream_h2,
        })
    }

    /// Send a copy of a request to one endpoint of `target` and forget it: its answer, its
    /// failure and its time never touch the client's response. Bounded per node.
    fn mirror(
        &self,
        target: Option<ServiceAddr>,
        parts: &hyper::http::request::Parts,
        path: &PathAndQuery,
        body: &RequestBody,
    ) {
        let m = self.metrics();
        let RequestBody::Buffered(bytes) = body else {
            Metrics::inc(&m.http_mirror_skipped);
            return;
        };
        let Some(target) =
            target.and_then(|a| self.ctx.inputs().state.load().services.get(&a).cloned())
        else {
            return;
        };
        let Ok(permit) = self.ctx.inputs().mirrors.clone().try_acquire_owned() else {
            Metrics::inc(&m.http_mirror_skipped);
            return;
        };
        let Some(i) = traffic::pick(
            &*target,
            target.policy.balancer,
            &target.traffic.rr,
            |_| false,
            traffic::now_ns(),
        ) else {
            return;
        };
        let Ok(uri) = hyper::Uri::builder()
            .scheme("http")
            .authority(target.endpoints[i].authority.clone())
            .path_and_query(path.clone())
            .build()
        else {
            return;
        };
        Metrics::inc(&m.http_mirrored);
        let mut req = Request::new(body::full(bytes.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        let client = if parts.version == Version::HTTP_2 {
            self.clients.h2.clone()
        } else {
            self.clients.h1.clone()
        };
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(MIRROR_TIMEOUT, client.request(req)).await {
                Ok(Ok(resp)) => {
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "mirrored request failed"),
                Err(_) => tracing::debug!("mirrored request timed out"),
            }
        });
    }

    /// Phase 5: the upstream's answer on its way to the client.
    fn respond<H: Send + Sync + Unpin + 'static>(
        &self,
        mut resp: Response<Incoming>,
        rule: Option<&Rule>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        held: H,
    ) -> Response<Body> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = client_upgrade {
                // From here the client's bytes are no longer HTTP requests.
                if let Some(f) = &self.framing {
                    f.stop();
                }
                let upstream_side = hyper::upgrade::on(&mut resp);
                let ctx = self.ctx.clone();
                tokio::spawn(async move { join_upgraded(ctx, client_side, upstream_side).await });
                return resp.map(body::incoming);
            }
        }
        let (mut parts, body) = resp.into_parts();
        routing::strip_hop_by_hop(&mut parts.headers);
        if let Some(rule) = rule {
            rule.response_headers.apply(&mut parts.headers);
        }
        // The request stays active (breaker, least-request) until its response body ends.
        Response::from_parts(parts, body::boxed(Tracked { inner: body, held }))
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Copy between the client's and the upstream's upgraded connections until both close or
/// neither sends anything for the idle timeout. The connection stays counted (its permit
/// and the upgraded gauge) for as long.
async fn join_upgraded(
    ctx: ConnCtx,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    let m = ctx.metrics();
    let _upgraded = GaugeGuard::new(&m.upgraded_connections);
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            forward(m, TokioIo::new(c), TokioIo::new(u), ctx.timeouts().idle).await;
        }
        Err(e) => tracing::info!(error = %e, "upgrade failed"),
    }
}
