//! What the agent tells about the traffic it serves. Every HTTP request and every forwarded
//! TCP connection ends as one record ([`HttpRecord`], [`TcpRecord`]); [`Telemetry::http`]
//! and [`Telemetry::tcp`] hand it to the three consumers:
//!
//! - [`families`]: Prometheus families per source workload, destination service,
//!   destination workload and route (labels bounded, see docs/operations.md);
//! - [`access_log`]: one JSON line per record, written off the request path;
//! - [`tap`]: live subscribers (the admin API's `/tap`, `weftctl tap`), only while any
//!   listen.

pub mod access_log;
pub mod events;
pub mod families;
pub mod prefault;
pub mod tap;
pub mod trace;
pub mod window;

use std::{
    net::SocketAddrV4,
    sync::Arc,
    time::{Instant, SystemTime},
};

use serde::Serialize;

use crate::{config::Workload, metrics::Metrics};

/// The telemetry consumers of one agent.
pub struct Telemetry {
    /// Whether requests and connections are recorded at all (`--request-telemetry`);
    /// off, the proxy skips every step below (for measuring what they cost).
    pub enabled: bool,
    pub families: families::Families,
    pub access_log: Option<access_log::AccessLog>,
    pub tap: tap::Tap,
    /// Pre-fault warnings and what came of them.
    pub events: events::Events,
    /// Spans exported over OTLP, when `--otlp-endpoint` is given.
    pub tracing: Option<trace::Tracing>,
    /// Golden signals per service over the last minute.
    pub windows: Arc<window::Windows>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("access_log", &self.access_log.is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Families registered next to the proxy's flat counters; no access log.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            enabled: true,
            families: families::Families::new(metrics),
            access_log: None,
            tap: tap::Tap::default(),
            events: events::Events::default(),
            tracing: None,
            windows: Arc::default(),
        }
    }

    pub fn with_access_log(mut self, log: access_log::AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    pub fn with_tracing(mut self, tracing: Option<trace::Tracing>) -> Self {
        self.tracing = tracing;
        self
    }

    pub fn with_requests_recorded(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// One HTTP request is over (its response body ended or the client went away).
    /// `cache` holds the last series its connection counted into.
    pub fn http(&self, rec: HttpRecord, cache: Option<&families::SeriesCache>) {
        self.families.http(&rec, cache);
        let logged = self.access_log.is_some() && rec.access_log.is_none_or(|r| r.enabled);
        if !logged && !self.tap.listened() {
            return;
        }
        let rec = Arc::new(Record::Http(rec));
        self.tap.publish(&rec);
        if let (Some(log), true) = (&self.access_log, logged) {
            log.write(rec);
        }
    }

    /// One forwarded TCP connection is over.
    pub fn tcp(&self, rec: TcpRecord) {
        self.families.tcp(&rec);
        if self.access_log.is_none() && !self.tap.listened() {
            return;
        }
        let rec = Arc::new(Record::Tcp(rec));
        self.tap.publish(&rec);
        if let Some(log) = &self.access_log {
            log.write(rec);
        }
    }
}

/// What an access log line, a tap event and the metrics are made from.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[expect(
    clippy::large_enum_variant,
    reason = "made once per request and moved behind an Arc at once; boxing the HTTP variant would cost the common case an allocation"
)]
pub enum Record {
    Http(HttpRecord),
    Tcp(TcpRecord),
}

impl Record {
    pub fn start(&self) -> SystemTime {
        match self {
            Self::Http(r) => r.start,
            Self::Tcp(r) => r.start,
        }
    }
}

/// Who is at one end of a request: the pod (`namespace/name`), its workload name for
/// metrics (bounded, [`canonical_name`]) and its identity when it has one.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Peer {
    pub pod: Option<Arc<str>>,
    #[serde(skip)]
    pub workload: Option<Arc<str>>,
    pub identity: Option<Arc<str>>,
}

/// One HTTP request as the proxy served it.
#[derive(Debug, Serialize)]
pub struct HttpRecord {
    #[serde(serialize_with = "rfc3339")]
    pub start: SystemTime,
    pub source: Peer,
    pub destination: Peer,
    /// `namespace/name` of the service the request went to (after routing).
    pub service: Option<Arc<str>>,
    /// `namespace/name` of the HTTPRoute whose rule matched.
    pub route: Option<Arc<str>>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddrV4>,
    /// `method`, `authority` and `path` (with the query) in records.
    #[serde(flatten)]
    pub request: RequestLine,
    pub protocol: &'static str,
    pub status: u16,
    /// `x-weft-reason` when the proxy answered itself.
    pub reason: Option<&'static str>,
    pub duration_ms: f64,
    /// From sending the last attempt to its response head.
    pub upstream_ms: Option<f64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub retries: u32,
    /// The body ended before it was whole (the client left or the upstream broke).
    pub incomplete: bool,
    /// The W3C trace it belongs to, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Its route rule's access logging, when the rule says.
    #[serde(skip)]
    pub access_log: Option<crate::config::policy::AccessLogRule>,
}

/// What the request line and Host say: held as hyper's own values (shared, not copied)
/// and spelled out only when a record is written.
#[derive(Debug, Default)]
pub struct RequestLine {
    pub method: hyper::Method,
    pub uri: hyper::Uri,
    /// The Host header, when the URI has no authority (HTTP/1.1).
    pub host: Option<hyper::header::HeaderValue>,
}

impl RequestLine {
    pub fn path(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    pub fn authority(&self) -> &str {
        self.uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("")
    }
}

impl Serialize for RequestLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("method", self.method.as_str())?;
        m.serialize_entry("authority", self.authority())?;
        m.serialize_entry("path", self.path())?;
        m.end()
    }
}

/// One forwarded (opaque or TLS) TCP connection.
#[derive(Debug, Serialize)]
pub struct TcpRecord {
    #[serde(serialize_with = "rfc3339")]
    pub start: SystemTime,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<Arc<str>>,
    pub endpoint: Option<SocketAddrV4>,
    pub duration_ms: f64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// `done`, `idle-timeout`, `error`, `connect-failed`, `no-endpoint`, `denied`.
    pub outcome: &'static str,
}

/// Milliseconds since `t`, for records.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-12-06T14:36:38.123Z`).
pub fn format_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// The name metrics give a workload: its `app.kubernetes.io/name` label, else its `app`
/// label, else the pod's own name; with its namespace. Pods of one deployment share it,
/// so metrics keep their series when pods are replaced.
pub fn canonical_name(w: &Workload) -> String {
    let name = w
        .labels
        .get("app.kubernetes.io/name")
        .or_else(|| w.labels.get("app"))
        .unwrap_or(&w.name);
    format!("{}/{}", w.namespace, name)
}

#[cfg(test)]
mod tests;
