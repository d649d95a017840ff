//! weft's own policy kinds (`weft.dev/v1alpha1`), for what the Gateway API does not say:
//! - `TrafficPolicy` attaches to a Service (`targetRef`) and sets how requests to it are
//!   balanced, when its endpoints are ejected, its circuit-breaker limits, its retry
//!   budget and a per-node rate limit;
//! - `HTTPRouteFilter` is referenced from an HTTPRoute rule (`type: ExtensionRef`) and
//!   injects faults or rate-limits that rule.
//!
//! Every limit is local to one node's agent: weft has no central rate-limit service.

use std::time::Duration;

use serde::Deserialize;

use super::route::parse_duration;

/// How a service's endpoints are chosen for each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub enum Balancer {
    /// Power of two choices over peak-EWMA latency times in-flight requests (as Linkerd).
    #[default]
    PeakEwma,
    RoundRobin,
    /// Power of two choices over in-flight requests (as Envoy's LEAST_REQUEST).
    LeastRequest,
}

/// Ejecting an endpoint that keeps failing, for a time that grows with each ejection.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    /// 5xx responses or connection failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection lasts this long; the n-th lasts n times as long ...
    pub base_ejection: Duration,
    /// ... up to this.
    pub max_ejection: Duration,
    /// At most this share of a service's endpoints is ejected at once (at least one).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// Circuit-breaker limits of one service on one node.
#[derive(Clone, Debug, PartialEq)]
pub struct CircuitBreaker {
    /// Concurrent client connections to the service through this node's proxy.
    pub max_connections: Option<u32>,
    /// Requests sent and not yet answered in full.
    pub max_active_requests: u32,
    /// Requests waiting for an active slot; beyond this, 503 at once.
    pub max_pending_requests: u32,
    /// How long a request may wait for an active slot.
    pub pending_timeout: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_active_requests: 1024,
            max_pending_requests: 1024,
            pending_timeout: Duration::from_secs(10),
        }
    }
}

/// Retries allowed to a service: `min_per_second * ttl` plus `ratio` of the requests
/// seen in the last `ttl` (Linkerd's budget), so retries cannot multiply an outage.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    pub ttl: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct TrafficPolicy {
    pub balancer: Balancer,
    pub outlier: Option<OutlierDetection>,
    pub breaker: CircuitBreaker,
    pub retry_budget: RetryBudget,
    pub rate_limit: Option<RateLimit>,
}

/// A `TrafficPolicy` document: which Service it is for, and the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePolicy {
    pub name: String,
    pub namespace: String,
    /// The Services of its namespace it applies to.
    pub services: Vec<String>,
    pub policy: TrafficPolicy,
}

/// Faults injected into a share of a rule's requests.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Fault {
    /// Delay before the request is sent on, for `percent` of requests.
    pub delay: Option<(Duration, u32)>,
    /// Answer with this status instead of sending the request, for `percent` of requests.
    pub abort: Option<(u16, u32)>,
}

/// An `HTTPRouteFilter` document.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RouteFilter {
    pub fault: Option<Fault>,
    pub rate_limit: Option<RateLimit>,
    pub access_log: Option<AccessLogRule>,
}

/// Whether the requests of a rule are access-logged, and which share of the successful
/// ones (failures always are, while the rule logs at all).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLogRule {
    pub enabled: bool,
    /// `None`: the agent's `--access-log-sample`.
    pub sample: Option<f64>,
}

// ---- the documents as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicySpec {
    /// One Service (weft's first shape), or `targetRefs` (the Gateway API's policy
    /// attachment, GEP-2648): one or more.
    #[serde(default)]
    target_ref: Option<RawTargetRef>,
    #[serde(default)]
    target_refs: Vec<RawTargetRef>,
    #[serde(default)]
    load_balancer: Option<String>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
    #[serde(default)]
    circuit_breaker: Option<RawBreaker>,
    #[serde(default)]
    retry_budget: Option<RawBudget>,
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default, rename = "sectionName")]
    section_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOutlier {
    #[serde(default)]
    consecutive_failures: Option<u32>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBreaker {
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    max_active_requests: Option<u32>,
    #[serde(default)]
    max_pending_requests: Option<u32>,
    #[serde(default)]
    pending_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBudget {
    #[serde(default)]
    ratio: Option<f64>,
    #[serde(default)]
    min_retries_per_second: Option<u32>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRateLimit {
    requests_per_second: f64,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FilterSpec {
    #[serde(default)]
    fault: Option<RawFault>,
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    access_log: Option<RawAccessLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAccessLog {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    sample: Option<f64>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFault {
    #[serde(default)]
    delay: Option<RawDelay>,
    #[serde(default)]
    abort: Option<RawAbort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDelay {
    fixed_delay: String,
    #[serde(default)]
    percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAbort {
    http_status: u16,
    #[serde(default)]
    percent: Option<u32>,
}

/// Errors are `(field, message)` for the caller to locate.
type Res<T> = Result<T, (String, String)>;

fn duration(v: Option<String>, field: &str, default: Duration) -> Res<Duration> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(&s).map_err(|m| (field.to_owned(), m)),
    }
}

fn percent(v: Option<u32>, field: &str) -> Res<u32> {
    match v.unwrap_or(100) {
        p @ 0..=100 => Ok(p),
        p => Err((field.to_owned(), format!("{p}: must be 0 to 100"))),
    }
}

fn rate_limit(r: RawRateLimit, field: &str) -> Res<RateLimit> {
    if !(r.requests_per_second > 0.0 && r.requests_per_second <= 1e9) {
        return Err((
            format!("{field}.requestsPerSecond"),
            "must be above 0".into(),
        ));
    }
    let burst = r
        .burst
        .unwrap_or_else(|| r.requests_per_second.ceil() as u32)
        .max(1);
    Ok(RateLimit {
        per_second: r.requests_per_second,
        burst,
    })
}

/// Convert a `TrafficPolicy` spec; `services` are the Service names of its namespace.
pub(super) fn convert_policy(
    name: String,
    namespace: String,
    spec: PolicySpec,
    services: &[&str],
) -> Res<ServicePolicy> {
    let (field, targets) = match (spec.target_ref, spec.target_refs.is_empty()) {
        (Some(t), true) => ("spec.targetRef", vec![t]),
        (None, false) => ("spec.targetRefs", spec.target_refs),
        _ => {
            return Err((
                "spec.targetRefs".into(),
                "give the Services it applies to in targetRefs (or one in targetRef)".into(),
            ))
        }
    };
    let mut targets_named = Vec::new();
    for (i, t) in targets.into_iter().enumerate() {
        let at = |x: &str| {
            if field == "spec.targetRef" {
                format!("{field}{x}")
            } else {
                format!("{field}[{i}]{x}")
            }
        };
        if t.kind.as_deref().is_some_and(|k| k != "Service")
            || t.group
                .as_deref()
                .is_some_and(|g| !g.is_empty() && g != "core")
        {
            return Err((
                at(".kind"),
                "a TrafficPolicy targets Services (kind: Service, group: \"\")".into(),
            ));
        }
        if t.section_name.is_some() {
            return Err((
                at(".sectionName"),
                "a TrafficPolicy applies to every port of a Service: leave sectionName out".into(),
            ));
        }
        if !services.contains(&t.name.as_str()) {
            return Err((
                at(".name"),
                format!("no Service {namespace}/{} is declared", t.name),
            ));
        }
        if targets_named.contains(&t.name) {
            return Err((at(".name"), format!("Service {} is named twice", t.name)));
        }
        targets_named.push(t.name);
    }
    let mut p = TrafficPolicy::default();
    if let Some(lb) = spec.load_balancer {
        p.balancer = match lb.as_str() {
            "PeakEWMA" => Balancer::PeakEwma,
            "RoundRobin" => Balancer::RoundRobin,
            "LeastRequest" => Balancer::LeastRequest,
            other => {
                return Err((
                    "spec.loadBalancer".into(),
                    format!("{other:?}: expected PeakEWMA, RoundRobin or LeastRequest"),
                ))
            }
        };
    }
    if let Some(o) = spec.outlier_detection {
        let d = OutlierDetection::default();
        let f = "spec.outlierDetection";
        let od = OutlierDetection {
            consecutive_failures: o.consecutive_failures.unwrap_or(d.consecutive_failures),
            base_ejection: duration(
                o.base_ejection_time,
                &format!("{f}.baseEjectionTime"),
                d.base_ejection,
            )?,
            max_ejection: duration(
                o.max_ejection_time,
                &format!("{f}.maxEjectionTime"),
                d.max_ejection,
            )?,
            max_ejection_percent: percent(
                Some(o.max_ejection_percent.unwrap_or(d.max_ejection_percent)),
                &format!("{f}.maxEjectionPercent"),
            )?,
        };
        if od.consecutive_failures == 0 {
            return Err((
                format!("{f}.consecutiveFailures"),
                "must be at least 1".into(),
            ));
        }
        if od.base_ejection.is_zero() || od.max_ejection < od.base_ejection {
            return Err((
                format!("{f}.maxEjectionTime"),
                "baseEjectionTime must be above 0 and not above maxEjectionTime".into(),
            ));
        }
        p.outlier = Some(od);
    }
    if let Some(b) = spec.circuit_breaker {
        let d = CircuitBreaker::default();
        let f = "spec.circuitBreaker";
        p.breaker = CircuitBreaker {
            max_connections: b.max_connections,
            max_active_requests: b.max_active_requests.unwrap_or(d.max_active_requests),
            max_pending_requests: b.max_pending_requests.unwrap_or(d.max_pending_requests),
            pending_timeout: duration(
                b.pending_timeout,
                &format!("{f}.pendingTimeout"),
                d.pending_timeout,
            )?,
        };
        if p.breaker.max_connections == Some(0) || p.breaker.max_active_requests == 0 {
            return Err((
                f.into(),
                "maxConnections and maxActiveRequests must be at least 1".into(),
            ));
        }
    }
    if let Some(b) = spec.retry_budget {
        let d = RetryBudget::default();
        let f = "spec.retryBudget";
        p.retry_budget = RetryBudget {
            ratio: b.ratio.unwrap_or(d.ratio),
            min_per_second: b.min_retries_per_second.unwrap_or(d.min_per_second),
            ttl: duration(b.ttl, &format!("{f}.ttl"), d.ttl)?,
        };
        if !(0.0..=10.0).contains(&p.retry_budget.ratio) {
            return Err((format!("{f}.ratio"), "must be 0 to 10".into()));
        }
        let ttl = p.retry_budget.ttl;
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err((format!("{f}.ttl"), "must be 1s to 60s".into()));
        }
    }
    if let Some(r) = spec.rate_limit {
        p.rate_limit = Some(rate_limit(r, "spec.rateLimit")?);
    }
    Ok(ServicePolicy {
        name,
        namespace,
        services: targets_named,
        policy: p,
    })
}

/// Convert an `HTTPRouteFilter` spec.
pub(super) fn convert_filter(spec: FilterSpec) -> Res<RouteFilter> {
    let fault = match spec.fault {
        None => None,
        Some(f) => {
            let delay = f
                .delay
                .map(|d| -> Res<_> {
                    let t = duration(
                        Some(d.fixed_delay),
                        "spec.fault.delay.fixedDelay",
                        Duration::ZERO,
                    )?;
                    Ok((t, percent(d.percent, "spec.fault.delay.percent")?))
                })
                .transpose()?;
            let abort = f
                .abort
                .map(|a| -> Res<_> {
                    if !(200..=599).contains(&a.http_status) {
                        return Err((
                            "spec.fault.abort.httpStatus".into(),
                            format!("{}: must be 200 to 599", a.http_status),
                        ));
                    }
                    Ok((
                        a.http_status,
                        percent(a.percent, "spec.fault.abort.percent")?,
                    ))
                })
                .transpose()?;
            if delay.is_none() && abort.is_none() {
                return Err(("spec.fault".into(), "needs a delay or an abort".into()));
            }
            Some(Fault { delay, abort })
        }
    };
    let rate_limit = spec
        .rate_limit
        .map(|r| rate_limit(r, "spec.rateLimit"))
        .transpose()?;
    let access_log = match spec.access_log {
        None => None,
        Some(a) => {
            if let Some(s) = a.sample {
                if !(0.0..=1.0).contains(&s) {
                    return Err((
                        "spec.accessLog.sample".into(),
                        format!("{s}: a share of requests, 0 to 1"),
                    ));
                }
            }
            Some(AccessLogRule {
                enabled: a.enabled,
                sample: a.sample,
            })
        }
    };
    if fault.is_none() && rate_limit.is_none() && access_log.is_none() {
        return Err(("spec".into(), "needs fault, rateLimit or accessLog".into()));
    }
    Ok(RouteFilter {
        fault,
        rate_limit,
        access_log,
    })
}
