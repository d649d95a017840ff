//! The attempts at one request: pick an endpoint, send, judge the outcome, maybe try again.
//! Only what the endpoint did counts against it (latency estimate, outlier detection): a
//! request the client broke or abandoned is never reported, and never retried.

use std::time::Duration;

use hyper::{
    body::Incoming,
    http::uri::{PathAndQuery, Scheme},
    Request, Response, Uri,
};
use hyper_util::client::legacy::Client;

use super::{
    body::{Body, ClientFault, RequestBody},
    client::PodConnector,
    record::Exchange,
    DEFAULT_BACKOFF,
};
use crate::{
    config::{authz::Http, route::Retry},
    metrics::Metrics,
    proxy::{
        authz,
        conn::ConnCtx,
        error::{ProxyError, Reason},
    },
    state::ServiceEntry,
    traffic::{self, now_ns, InFlight},
};

/// Endpoints a request is tried on when connecting fails (nothing reached a server).
const MAX_CONNECT_ATTEMPTS: usize = 3;
/// Endpoints remembered as tried for one request (more are still avoided by chance).
const MAX_TRIED: usize = 8;

/// How one attempt at a request ended.
enum Outcome {
    Answered(Response<Incoming>),
    ConnectFailed(hyper_util::client::legacy::Error),
    Failed(hyper_util::client::legacy::Error),
    TimedOut,
    /// The client's body broke or stalled: the client's doing, not the endpoint's.
    ClientFault(Reason),
}

pub(super) struct Attempts<'a> {
    pub ctx: &'a ConnCtx,
    pub client: &'a Client<PodConnector, Body>,
    pub backend: &'a ServiceEntry,
    pub retry: Option<&'a Retry>,
    pub backend_timeout: Option<Duration>,
    pub parts: &'a hyper::http::request::Parts,
    pub path: &'a PathAndQuery,
    pub fault: &'a ClientFault,
}

impl Attempts<'_> {
    pub async fn run(
        &self,
        mut body: RequestBody,
        ex: &mut Exchange,
    ) -> Result<(Response<Incoming>, InFlight), ProxyError> {
        let m = self.ctx.metrics();
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
                return Err(Reason::NoHealthyEndpoint.into());
            };
            if n_tried < MAX_TRIED && !seen(i) {
                tried[n_tried] = i;
                n_tried += 1;
            }
            let ep = &svc.endpoints[i];
            ex.attempt(ep);
            let client_identity = {
                let state = self.ctx.inputs().state.load();
                let source = state.identities.get(&self.ctx.pod.ip);
                let http = Http::Known {
                    method: self.parts.method.as_str(),
                    path: self.path.as_str(),
                    headers: &self.parts.headers,
                };
                if !authz::allowed(
                    &state,
                    self.ctx.inputs(),
                    self.ctx.pod.ip,
                    source,
                    ep.addr,
                    http,
                    "http",
                ) {
                    return Err(Reason::PolicyDenied.into());
                }
                authz::client_identity(source, state.identities.get(ep.addr.ip()))
            };
            let replayable = body.replayable();
            let Some(b) = body.take() else {
                return Err(Reason::UpstreamError.into());
            };
            let mut parts = Uri::from_static("/").into_parts();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(ep.authority.clone());
            parts.path_and_query = Some(self.path.clone());
            // Scheme, authority and path are all there: this cannot fail.
            let uri = Uri::from_parts(parts).map_err(|_| Reason::UpstreamError)?;
            let mut req = Request::new(b);
            *req.method_mut() = self.parts.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = self.parts.version;
            *req.headers_mut() = self.parts.headers.clone();
            authz::set_client_identity(req.headers_mut(), client_identity.as_ref());
            let attempt_span = match (&ex.trace, &self.ctx.inputs().telemetry.tracing) {
                (Some(cx), Some(t)) => {
                    use opentelemetry::KeyValue;
                    let attrs = vec![
                        KeyValue::new("server.address", ep.addr.to_string()),
                        KeyValue::new("weft.destination.pod", ep.workload.to_string()),
                        KeyValue::new("weft.destination.service", svc.name.to_string()),
                        KeyValue::new(
                            "weft.attempt",
                            i64::from(retries) + connect_failures as i64 + 1,
                        ),
                    ];
                    Some(t.attempt_span(cx, req.headers_mut(), attrs))
                }
                _ => None,
            };
            let in_flight = ep.stats.start();
            let sent = self.client.request(req);
            let outcome = match self.backend_timeout {
                Some(t) => match tokio::time::timeout(t, sent).await {
                    Ok(r) => self.judge(r),
                    Err(_) => Outcome::TimedOut,
                },
                None => self.judge(sent.await),
            };
            if let Some(cx) = &attempt_span {
                let (status, reason) = match &outcome {
                    Outcome::Answered(r) => (r.status().as_u16(), None),
                    Outcome::ConnectFailed(_) => {
                        (503, Some(Reason::UpstreamConnectFailed.as_str()))
                    }
                    Outcome::Failed(_) => (502, Some(Reason::UpstreamError.as_str())),
                    Outcome::TimedOut => (504, Some(Reason::BackendTimeout.as_str())),
                    Outcome::ClientFault(r) => (r.status().as_u16(), Some(r.as_str())),
                };
                crate::telemetry::trace::end(cx, status, reason, vec![]);
            }
            if let Outcome::ClientFault(r) = outcome {
                tracing::debug!(reason = r.as_str(), endpoint = %ep.addr, "the client's request body failed; not held against the endpoint");
                return Err(r.into());
            }
            let done = now_ns();
            let ok = matches!(&outcome, Outcome::Answered(r) if r.status().as_u16() < 500);
            ep.stats.trend.record(
                matches!(&outcome, Outcome::Answered(_)).then(|| done.saturating_sub(now)),
                !ok,
                matches!(&outcome, Outcome::ConnectFailed(_)),
            );
            // A failure counts as a slow answer, so P2C steers away from an endpoint that
            // fails fast.
            let rtt = done.saturating_sub(now);
            let rtt = if ok {
                rtt
            } else {
                rtt.max(traffic::EndpointStats::FAILURE_RTT_NS)
            };
            ex.upstream_ms = Some(done.saturating_sub(now) as f64 / 1e6);
            ep.stats.observe_rtt(rtt, done);
            if let Some(t) = traffic::report(svc, i, ok, policy.outlier.as_ref(), done) {
                Metrics::inc(&m.http_ejections);
                self.ctx
                    .inputs()
                    .telemetry
                    .families
                    .ejected(&svc.name, &ep.app);
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
                    connect_failures += 1;
                    // Nothing reached the server: another endpoint is always safe to try.
                    if connect_failures < MAX_CONNECT_ATTEMPTS
                        && replayable
                        && n_tried < svc.endpoints.len()
                    {
                        continue;
                    }
                    retry_on(503)
                }
                Outcome::Failed(_) => retry_on(502),
                Outcome::TimedOut => retry_on(504),
                Outcome::ClientFault(_) => false,
            };
            if wants_retry {
                if svc.traffic.withdraw(&policy.retry_budget) {
                    retries += 1;
                    ex.retries = retries;
                    Metrics::inc(&m.http_retries);
                    let backoff = self
                        .retry
                        .and_then(|r| r.backoff)
                        .unwrap_or(DEFAULT_BACKOFF);
                    tokio::time::sleep(backoff * retries).await;
                    continue;
                }
                Metrics::inc(&m.http_retry_budget_exhausted);
            }
            return match outcome {
                Outcome::Answered(r) => Ok((r, in_flight)),
                Outcome::ConnectFailed(e) => {
                    tracing::info!(endpoint = %ep.addr, error = %e, "upstream connect failed");
                    Err(Reason::UpstreamConnectFailed.into())
                }
                Outcome::Failed(e) => {
                    tracing::info!(endpoint = %ep.addr, error = %e, "upstream request failed");
                    Err(Reason::UpstreamError.into())
                }
                Outcome::TimedOut => Err(Reason::BackendTimeout.into()),
                Outcome::ClientFault(r) => Err(r.into()),
            };
        }
    }

    /// What an attempt's result says about whose fault a failure was.
    fn judge(&self, r: Result<Response<Incoming>, hyper_util::client::legacy::Error>) -> Outcome {
        match r {
            // The client's body broke while the endpoint was answering (one that answers
            // without reading the body can be that quick): the client's request was not
            // what the endpoint answered, so the client hears about its own fault.
            Ok(resp) => match self.fault.reason() {
                Some(r) => Outcome::ClientFault(r),
                None => Outcome::Answered(resp),
            },
            Err(e) if e.is_connect() => Outcome::ConnectFailed(e),
            Err(e) => match self.fault.reason() {
                Some(r) => Outcome::ClientFault(r),
                None => Outcome::Failed(e),
            },
        }
    }
}
