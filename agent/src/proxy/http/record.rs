//! One request's telemetry record, gathered as the request passes the phases
//! ([`Exchange`]) and handed to [`crate::telemetry::Telemetry`] when its response body
//! ends or the client goes away ([`Recorded`]), so durations and bytes are the whole
//! exchange's.

use std::{
    net::SocketAddrV4,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use hyper::{
    body::{Body as _, Frame, SizeHint},
    Request, Version,
};

use super::body::{Body, BoxError, ClientFault};
use crate::{
    state::Endpoint,
    telemetry::{families::SeriesCache, ms_since, HttpRecord, Peer, RequestLine, Telemetry},
};

/// What is known of a request so far.
pub(super) struct Exchange {
    started: Instant,
    start: SystemTime,
    source: Peer,
    request: RequestLine,
    protocol: &'static str,
    pub service: Arc<str>,
    pub route: Option<Arc<str>>,
    destination: Peer,
    endpoint: Option<SocketAddrV4>,
    pub upstream_ms: Option<f64>,
    pub retries: u32,
    pub reason: Option<&'static str>,
    /// The client's body (bytes read).
    pub body: ClientFault,
    /// The request's span, when tracing is on.
    pub trace: Option<opentelemetry::Context>,
    /// The routed service's running totals (golden signals).
    pub golden: Option<Arc<crate::traffic::ServiceTraffic>>,
    /// The route rule's access logging.
    pub access_log: Option<crate::config::policy::AccessLogRule>,
}

impl Exchange {
    /// What the request line says; with `record` false (request telemetry off) only
    /// what costs no allocation.
    pub fn start<B>(
        req: &Request<B>,
        source: &Peer,
        service: &Arc<str>,
        telemetry: &Telemetry,
    ) -> Self {
        let mut ex = Self {
            started: Instant::now(),
            start: SystemTime::UNIX_EPOCH,
            source: Peer::default(),
            request: RequestLine::default(),
            protocol: "",
            service: service.clone(),
            route: None,
            destination: Peer::default(),
            endpoint: None,
            upstream_ms: None,
            retries: 0,
            reason: None,
            body: ClientFault::default(),
            trace: None,
            golden: None,
            access_log: None,
        };
        if !telemetry.enabled {
            return ex;
        }
        ex.start = SystemTime::now();
        ex.source = source.clone();
        ex.request = RequestLine {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: if req.uri().authority().is_some() {
                None
            } else {
                req.headers().get(hyper::header::HOST).cloned()
            },
        };
        ex.protocol = match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        ex.trace = telemetry.tracing.as_ref().map(|t| {
            use opentelemetry::KeyValue;
            let mut attrs = vec![
                KeyValue::new("http.request.method", req.method().as_str().to_owned()),
                KeyValue::new("url.path", req.uri().path().to_owned()),
                KeyValue::new("weft.service", service.to_string()),
            ];
            if let Some(pod) = &source.pod {
                attrs.push(KeyValue::new("weft.source.pod", pod.to_string()));
            }
            if let Some(id) = &source.identity {
                attrs.push(KeyValue::new("weft.source.identity", id.to_string()));
            }
            t.request_span(req.headers(), format!("{} {service}", req.method()), attrs)
        });
        ex
    }

    /// An attempt goes to `ep`.
    pub fn attempt(&mut self, ep: &Endpoint) {
        if self.endpoint != Some(ep.addr) {
            self.endpoint = Some(ep.addr);
            self.destination = ep.peer();
        }
    }

    fn finish(self, status: u16, response_bytes: u64, incomplete: bool) -> HttpRecord {
        let duration_ms = ms_since(self.started);
        if let Some(g) = &self.golden {
            g.golden.record(status, duration_ms / 1000.0);
        }
        let trace_id = self.trace.as_ref().map(|cx| {
            use opentelemetry::KeyValue;
            let mut extra = vec![
                KeyValue::new("weft.retries", i64::from(self.retries)),
                KeyValue::new("weft.destination.service", self.service.to_string()),
            ];
            if let Some(r) = &self.route {
                extra.push(KeyValue::new("weft.route", r.to_string()));
            }
            if let Some(ep) = self.endpoint {
                extra.push(KeyValue::new("server.address", ep.to_string()));
            }
            crate::telemetry::trace::end(cx, status, self.reason, extra);
            crate::telemetry::trace::trace_id(cx)
        });
        HttpRecord {
            trace_id,
            access_log: self.access_log,
            duration_ms,
            start: self.start,
            source: self.source,
            destination: self.destination,
            service: Some(self.service),
            route: self.route,
            endpoint: self.endpoint,
            request: self.request,
            protocol: self.protocol,
            status,
            reason: self.reason,
            upstream_ms: self.upstream_ms,
            request_bytes: self.body.bytes(),
            response_bytes,
            retries: self.retries,
            incomplete,
        }
    }
}

/// A response body on its way to the client; when it ends (or is dropped before its end)
/// the request's record is made.
pub(super) struct Recorded {
    inner: Body,
    pending: Option<(Exchange, u16)>,
    bytes: u64,
    telemetry: Arc<Telemetry>,
    /// The series its connection counted into last.
    series: Arc<SeriesCache>,
}

impl Recorded {
    pub fn new(
        inner: Body,
        ex: Exchange,
        status: u16,
        telemetry: Arc<Telemetry>,
        series: Arc<SeriesCache>,
    ) -> Self {
        Self {
            inner,
            pending: Some((ex, status)),
            bytes: 0,
            telemetry,
            series,
        }
    }

    fn done(&mut self, incomplete: bool) {
        if let Some((ex, status)) = self.pending.take() {
            self.telemetry.http(
                ex.finish(status, self.bytes, incomplete),
                Some(&self.series),
            );
        }
    }
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.done(false);
                }
            }
            Poll::Ready(None) => this.done(false),
            Poll::Ready(Some(Err(_))) => this.done(true),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // A body hyper never polled (HEAD, 204, an upgrade) ended here whole; one it
        // stopped polling part way did not.
        let whole = self.bytes == 0 && self.inner.is_end_stream();
        self.done(!whole);
    }
}
