//! The Prometheus export: labelled families for the golden signals, the proxy's flat
//! counters (metrics.rs), and values the agent reads at scrape time (eBPF counters, agent
//! health), encoded in the Prometheus text format (0.0.4) by the `prometheus-client` crate.
//!
//! Labels are bounded by construction: workload names come from the configuration (pods
//! of one app share one, [`super::canonical_name`]), services and routes from the
//! configuration, status classes and reasons from fixed sets; never a path, a header or
//! an address. As a second fence, a family that reaches [`MAX_SERIES`] label sets puts
//! new ones under `other` and counts them (`weft_telemetry_series_overflow_total`).

use std::{
    fmt::Write as _,
    ops::Deref,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::{Family, MetricConstructor},
        gauge::ConstGauge,
        histogram::Histogram,
        TypedMetric,
    },
    registry::Registry,
};

use super::{HttpRecord, TcpRecord};
use crate::metrics::{Kind, Metrics};

/// The most label sets one family holds; beyond, new ones are counted under `other`.
pub const MAX_SERIES: usize = 10_000;

/// Upper bounds (seconds) of the request latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The label value of what is not known (a request the proxy answered before routing
/// it has no destination workload) or over the series bound.
const UNKNOWN: &str = "unknown";
const OTHER: &str = "other";

/// Where a request came from and went, as metrics label it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source_workload: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub route: Arc<str>,
}

/// [`RequestLabels`] and how the request ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub source_workload: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub route: Arc<str>,
    /// `2xx` ... `5xx`.
    pub status_class: &'static str,
    /// The proxy's `x-weft-reason`, or empty when the app answered.
    pub reason: &'static str,
}

/// A forwarded TCP connection's ends.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub source_workload: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
}

/// A TCP connection's ends and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpOutcomeLabels {
    pub source_workload: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub outcome: &'static str,
}

/// One endpoint of a service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
}

/// An authorization decision about a workload's traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub destination_workload: Arc<str>,
    /// `allow`, `deny`, `would-deny` (a dryRun policy), `audit`.
    pub decision: &'static str,
}

/// A pre-fault warning about one endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarningLabels {
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub kind: &'static str,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// A family and how many label sets it holds (the crate does not say outside its tests).
struct Bounded<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    sets: AtomicUsize,
    /// Shared by every family: records put under `other`.
    overflowed: Arc<AtomicU64>,
}

impl<S, M, C> Bounded<S, M, C>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: Clone + EncodeMetric + TypedMetric + std::fmt::Debug + Send + Sync + 'static,
    C: MetricConstructor<M> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    /// Register `family` so that it is always listed (HELP and TYPE), even before its
    /// first series: a scrape shows every metric the agent has.
    fn register(
        (registry, overflowed): (&mut Registry, &Arc<AtomicU64>),
        name: &'static str,
        help: &'static str,
        family: Family<S, M, C>,
    ) -> Self {
        registry.register_collector(Box::new(Listed {
            name,
            help,
            family: family.clone(),
        }));
        Self {
            family,
            sets: AtomicUsize::new(0),
            overflowed: overflowed.clone(),
        }
    }

    /// The metric of `labels`, or, once [`MAX_SERIES`] label sets are held, the one of
    /// `overflow(labels)` (and `overflowed` counts it).
    fn get(&self, labels: &S, overflow: impl Fn(&S) -> S) -> impl Deref<Target = M> + '_ {
        if let Some(m) = self.family.get(labels) {
            return m;
        }
        if self.sets.fetch_add(1, Relaxed) >= MAX_SERIES {
            self.sets.fetch_sub(1, Relaxed);
            self.overflowed.fetch_add(1, Relaxed);
            return self.family.get_or_create(&overflow(labels));
        }
        self.family.get_or_create(labels)
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The series one request outcome counts into.
#[derive(Debug)]
struct Series {
    requests: Counter,
    latency: Histogram,
    request_bytes: Counter,
    response_bytes: Counter,
    retries: Counter,
}

/// The series a connection last counted into. Requests on one connection nearly always
/// share their labels (one client pod, one service, one route, one app behind it, 2xx),
/// so they skip the families' lookups (hashing every label) and reuse these.
#[derive(Debug, Default)]
pub struct SeriesCache(Mutex<Option<(OutcomeLabels, Series)>>);

/// A value read at scrape time, for [`Families::encode`].
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Every family, and the registry that encodes them.
pub struct Families {
    registry: Registry,
    requests: Bounded<OutcomeLabels, Counter>,
    latency: Bounded<RequestLabels, Histogram>,
    request_bytes: Bounded<RequestLabels, Counter>,
    response_bytes: Bounded<RequestLabels, Counter>,
    retries: Bounded<RequestLabels, Counter>,
    tcp_opened: Bounded<TcpLabels, Counter>,
    tcp_closed: Bounded<TcpOutcomeLabels, Counter>,
    tcp_sent: Bounded<TcpLabels, Counter>,
    tcp_received: Bounded<TcpLabels, Counter>,
    ejections: Bounded<EndpointLabels, Counter>,
    warnings: Bounded<WarningLabels, Counter>,
    policy: Bounded<PolicyLabels, Counter>,
    /// What the scraper read at scrape time, encoded by [`ScrapeTime`].
    scrape_time: Arc<Mutex<Vec<Sample>>>,
}

impl Families {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let mut registry = Registry::with_prefix("weft");
        let overflow = Arc::new(AtomicU64::new(0));
        let requests = Bounded::register(
            (&mut registry, &overflow),
            "requests",
            "HTTP requests served, by where they came from and went and how they ended",
            Family::default(),
        );
        let latency = Bounded::register(
            (&mut registry, &overflow),
            "request_duration_seconds",
            "Time from a request's first byte to the end of its response",
            Histograms::new_with_constructor(latency_histogram as fn() -> Histogram),
        );
        let request_bytes = Bounded::register(
            (&mut registry, &overflow),
            "request_bytes",
            "Bytes of request bodies",
            Family::default(),
        );
        let response_bytes = Bounded::register(
            (&mut registry, &overflow),
            "response_bytes",
            "Bytes of response bodies",
            Family::default(),
        );
        let retries = Bounded::register(
            (&mut registry, &overflow),
            "request_retries",
            "Attempts made again under a route's retry policy",
            Family::default(),
        );
        let tcp_opened = Bounded::register(
            (&mut registry, &overflow),
            "tcp_connections_opened",
            "Forwarded TCP connections opened to an endpoint",
            Family::default(),
        );
        let tcp_closed = Bounded::register(
            (&mut registry, &overflow),
            "tcp_connections_closed",
            "Forwarded TCP connections closed, by how they ended",
            Family::default(),
        );
        let tcp_sent = Bounded::register(
            (&mut registry, &overflow),
            "tcp_sent_bytes",
            "Bytes forwarded from the client to the endpoint",
            Family::default(),
        );
        let tcp_received = Bounded::register(
            (&mut registry, &overflow),
            "tcp_received_bytes",
            "Bytes forwarded from the endpoint to the client",
            Family::default(),
        );
        let ejections = Bounded::register(
            (&mut registry, &overflow),
            "endpoint_ejections",
            "Times outlier detection ejected an endpoint",
            Family::default(),
        );
        let warnings = Bounded::register(
            (&mut registry, &overflow),
            "endpoint_warnings",
            "Pre-fault warnings raised about an endpoint, by kind",
            Family::default(),
        );
        let policy = Bounded::register(
            (&mut registry, &overflow),
            "policy_decisions",
            "Authorization decisions on requests and connections to workloads a policy selects",
            Family::default(),
        );
        let scrape_time = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(Flat {
            metrics,
            overflow: overflow.clone(),
        }));
        registry.register_collector(Box::new(ScrapeTime(scrape_time.clone())));
        Self {
            registry,
            requests,
            latency,
            request_bytes,
            response_bytes,
            retries,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            ejections,
            warnings,
            policy,
            scrape_time,
        }
    }

    pub(super) fn http(&self, r: &HttpRecord, cache: Option<&SeriesCache>) {
        let outcome = OutcomeLabels {
            source_workload: label(&r.source.workload),
            destination_service: label(&r.service),
            destination_workload: label(&r.destination.workload),
            route: r.route.clone().unwrap_or_else(|| Arc::from("")),
            status_class: status_class(r.status),
            reason: r.reason.unwrap_or(""),
        };
        let count = |h: &Series| {
            h.requests.inc();
            h.latency.observe(r.duration_ms / 1000.0);
            if r.request_bytes > 0 {
                h.request_bytes.inc_by(r.request_bytes);
            }
            if r.response_bytes > 0 {
                h.response_bytes.inc_by(r.response_bytes);
            }
            if r.retries > 0 {
                h.retries.inc_by(u64::from(r.retries));
            }
        };
        let Some(cache) = cache else {
            return count(&self.series(&outcome));
        };
        let mut last = cache.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((labels, series)) if *labels == outcome => count(series),
            _ => {
                let series = self.series(&outcome);
                count(&series);
                *last = Some((outcome, series));
            }
        }
    }

    /// The series of one request outcome, looked up in (or added to) every family.
    fn series(&self, outcome: &OutcomeLabels) -> Series {
        let labels = RequestLabels {
            source_workload: outcome.source_workload.clone(),
            destination_service: outcome.destination_service.clone(),
            destination_workload: outcome.destination_workload.clone(),
            route: outcome.route.clone(),
        };
        Series {
            requests: self.requests.get(outcome, overflow_outcome).clone(),
            latency: self.latency.get(&labels, overflow_request).clone(),
            request_bytes: self.request_bytes.get(&labels, overflow_request).clone(),
            response_bytes: self.response_bytes.get(&labels, overflow_request).clone(),
            retries: self.retries.get(&labels, overflow_request).clone(),
        }
    }

    pub(super) fn tcp(&self, r: &TcpRecord) {
        let labels = TcpLabels {
            source_workload: label(&r.source.workload),
            destination_service: label(&r.service),
            destination_workload: label(&r.destination.workload),
        };
        if r.endpoint.is_some() {
            self.tcp_opened.get(&labels, overflow_tcp).inc();
        }
        let outcome = TcpOutcomeLabels {
            source_workload: labels.source_workload.clone(),
            destination_service: labels.destination_service.clone(),
            destination_workload: labels.destination_workload.clone(),
            outcome: r.outcome,
        };
        self.tcp_closed
            .get(&outcome, |o| TcpOutcomeLabels {
                source_workload: Arc::from(OTHER),
                destination_service: Arc::from(OTHER),
                destination_workload: Arc::from(OTHER),
                outcome: o.outcome,
            })
            .inc();
        self.tcp_sent
            .get(&labels, overflow_tcp)
            .inc_by(r.sent_bytes);
        self.tcp_received
            .get(&labels, overflow_tcp)
            .inc_by(r.received_bytes);
    }

    /// Outlier detection ejected `workload`'s endpoint of `service`.
    pub fn ejected(&self, service: &Arc<str>, workload: &Arc<str>) {
        let l = EndpointLabels {
            destination_service: service.clone(),
            destination_workload: workload.clone(),
        };
        self.ejections
            .get(&l, |_| EndpointLabels {
                destination_service: Arc::from(OTHER),
                destination_workload: Arc::from(OTHER),
            })
            .inc();
    }

    /// An AuthorizationPolicy decided about traffic to `workload`.
    pub fn policy(&self, workload: &Arc<str>, decision: &'static str) {
        let l = PolicyLabels {
            destination_workload: workload.clone(),
            decision,
        };
        self.policy
            .get(&l, |l| PolicyLabels {
                destination_workload: Arc::from(OTHER),
                decision: l.decision,
            })
            .inc();
    }

    /// The pre-fault detector warned about `workload`'s endpoint of `service`.
    pub fn warned(&self, service: &Arc<str>, workload: &Arc<str>, kind: &'static str) {
        let l = WarningLabels {
            destination_service: service.clone(),
            destination_workload: workload.clone(),
            kind,
        };
        self.warnings
            .get(&l, |l| WarningLabels {
                destination_service: Arc::from(OTHER),
                destination_workload: Arc::from(OTHER),
                kind: l.kind,
            })
            .inc();
    }

    /// Everything in the Prometheus text format, with `scrape_time` samples (read by the
    /// caller just now) among them.
    pub fn encode(&self, scrape_time: Vec<Sample>) -> String {
        let mut held = self
            .scrape_time
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *held = scrape_time;
        drop(held);
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

fn label(v: &Option<Arc<str>>) -> Arc<str> {
    v.clone().unwrap_or_else(|| Arc::from(UNKNOWN))
}

fn overflow_request(_: &RequestLabels) -> RequestLabels {
    RequestLabels {
        source_workload: Arc::from(OTHER),
        destination_service: Arc::from(OTHER),
        destination_workload: Arc::from(OTHER),
        route: Arc::from(OTHER),
    }
}

fn overflow_outcome(l: &OutcomeLabels) -> OutcomeLabels {
    OutcomeLabels {
        source_workload: Arc::from(OTHER),
        destination_service: Arc::from(OTHER),
        destination_workload: Arc::from(OTHER),
        route: Arc::from(OTHER),
        status_class: l.status_class,
        reason: l.reason,
    }
}

fn overflow_tcp(_: &TcpLabels) -> TcpLabels {
    TcpLabels {
        source_workload: Arc::from(OTHER),
        destination_service: Arc::from(OTHER),
        destination_workload: Arc::from(OTHER),
    }
}

/// `2xx` for 200, and so on.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A family encoded with its descriptor even while it has no series.
#[derive(Debug)]
struct Listed<S, M, C> {
    name: &'static str,
    help: &'static str,
    family: Family<S, M, C>,
}

impl<S, M, C> Collector for Listed<S, M, C>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: EncodeMetric + TypedMetric + std::fmt::Debug + Send + Sync + 'static,
    C: MetricConstructor<M> + std::fmt::Debug + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = encoder.encode_descriptor(self.name, self.help, None, M::TYPE)?;
        self.family.encode(m)
    }
}

/// The proxy's flat counters and gauges (metrics.rs), as `weft_proxy_<name>`.
#[derive(Debug)]
struct Flat {
    metrics: Arc<Metrics>,
    overflow: Arc<AtomicU64>,
}

impl Collector for Flat {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (def, (_, value)) in Metrics::DEFS.iter().zip(self.metrics.snapshot()) {
            let name = format!("proxy_{}", def.name);
            encode_one(&mut encoder, &name, def.help, def.kind, value as f64, &[])?;
        }
        encode_one(
            &mut encoder,
            "telemetry_series_overflow",
            "Records counted under `other` because a family held its maximum of label sets.",
            Kind::Counter,
            self.overflow.load(Relaxed) as f64,
            &[],
        )
    }
}

/// Values read at scrape time: consecutive samples of one name share a descriptor.
#[derive(Debug)]
struct ScrapeTime(Arc<Mutex<Vec<Sample>>>);

impl Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut i = 0;
        while i < samples.len() {
            let first = &samples[i];
            let n = samples[i..]
                .iter()
                .take_while(|s| s.name == first.name)
                .count();
            let group = &samples[i..i + n];
            let mut m = encoder.encode_descriptor(
                first.name,
                first.help,
                None,
                match first.kind {
                    Kind::Counter => prometheus_client::metrics::MetricType::Counter,
                    Kind::Gauge => prometheus_client::metrics::MetricType::Gauge,
                },
            )?;
            for s in group {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                encode_value(m.encode_family(&labels)?, s.kind, s.value)?;
            }
            i += n;
        }
        Ok(())
    }
}

fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    value: f64,
    labels: &[(&str, &str)],
) -> Result<(), std::fmt::Error> {
    let t = match kind {
        Kind::Counter => prometheus_client::metrics::MetricType::Counter,
        Kind::Gauge => prometheus_client::metrics::MetricType::Gauge,
    };
    let mut m = encoder.encode_descriptor(name, help, None, t)?;
    if labels.is_empty() {
        return encode_value(m, kind, value);
    }
    encode_value(m.encode_family(&labels)?, kind, value)
}

/// Whole numbers as integers (`7`, not `7.0`), the rest as they are.
fn encode_value(
    e: prometheus_client::encoding::MetricEncoder,
    kind: Kind,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let whole = value.fract() == 0.0 && value.abs() < 9.0e15;
    match (kind, whole) {
        (Kind::Counter, true) if value >= 0.0 => ConstCounter::new(value as u64).encode(e),
        (Kind::Counter, _) => ConstCounter::new(value).encode(e),
        (Kind::Gauge, true) => ConstGauge::new(value as i64).encode(e),
        (Kind::Gauge, false) => ConstGauge::new(value).encode(e),
    }
}
