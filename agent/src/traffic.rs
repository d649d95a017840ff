//! What the HTTP proxy learns and limits at run time, per service and per endpoint: latency
//! estimates and in-flight requests (load balancing), failures in a row and ejections
//! (outlier detection), active and waiting requests (circuit breaking), the retry budget
//! and token buckets. Counters are atomics owned by one service or endpoint, so requests
//! to different services never contend; [`crate::state::NodeState::build`] hands them from
//! one configuration generation to the next so a reload forgets nothing.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::config::policy::{Balancer, CircuitBreaker, OutlierDetection, RateLimit, RetryBudget};

/// Nanoseconds on a monotonic clock that starts with the process.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The latency assumed of an endpoint not measured yet (Linkerd's default).
const DEFAULT_RTT_NS: f64 = 30_000_000.0;
/// How fast a latency estimate decays towards recent samples and, while an endpoint gets
/// no requests, towards zero, so a slow endpoint is tried again now and then.
const DECAY_NS: f64 = 10_000_000_000.0;

/// What one endpoint of one service has shown.
#[derive(Debug)]
pub struct EndpointStats {
    /// Peak-EWMA latency estimate (f64 bits, nanoseconds) and when it was updated.
    rtt: AtomicU64,
    stamp: AtomicU64,
    in_flight: AtomicU32,
    failures_in_a_row: AtomicU32,
    ejected_until: AtomicU64,
    /// Ejections so far, less one per base ejection time healthy: the next one lasts
    /// (this + 1) times the base time.
    ejections: AtomicU32,
    /// Answers (or failures) measured so far: what the latency estimate is made of.
    samples: AtomicU64,
    /// Running totals the pre-fault detector reads as deltas (telemetry/prefault.rs).
    pub trend: Trend,
}

/// Running totals of what one endpoint did, only ever growing.
#[derive(Debug, Default)]
pub struct Trend {
    /// Attempts answered (any status) and the sum of their latencies.
    pub answered: AtomicU64,
    pub latency_ns: AtomicU64,
    /// Attempts that failed: a 5xx, a broken answer, a timeout, a failed connect.
    pub failed: AtomicU64,
    /// Of those, connects that failed.
    pub connect_failed: AtomicU64,
}

impl Trend {
    /// An attempt ended: answered in `latency_ns` (when it was answered at all), and
    /// whether it failed, and whether connecting did.
    pub fn record(&self, latency_ns: Option<u64>, failed: bool, connect_failed: bool) {
        if let Some(ns) = latency_ns {
            self.answered.fetch_add(1, Relaxed);
            self.latency_ns.fetch_add(ns, Relaxed);
        }
        if failed {
            self.failed.fetch_add(1, Relaxed);
        }
        if connect_failed {
            self.connect_failed.fetch_add(1, Relaxed);
        }
    }
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            rtt: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            stamp: AtomicU64::new(now_ns()),
            in_flight: AtomicU32::new(0),
            failures_in_a_row: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            samples: AtomicU64::new(0),
            trend: Trend::default(),
        }
    }
}

impl EndpointStats {
    fn decayed_rtt(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Relaxed));
        let elapsed = now.saturating_sub(self.stamp.load(Relaxed)) as f64;
        rtt * (-elapsed / DECAY_NS).exp()
    }

    /// Peak-EWMA cost: the latency estimate times the requests it would queue behind.
    pub fn cost(&self, now: u64) -> f64 {
        self.decayed_rtt(now) * f64::from(self.in_flight.load(Relaxed) + 1)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// A response took `rtt_ns`: a slower sample replaces the estimate at once (peak), a
    /// faster one pulls it down gradually.
    pub fn observe_rtt(&self, rtt_ns: u64, now: u64) {
        let prior = self.decayed_rtt(now);
        let sample = rtt_ns as f64;
        let next = if sample > prior {
            sample
        } else {
            let elapsed = now.saturating_sub(self.stamp.load(Relaxed)) as f64;
            let w = (-elapsed / DECAY_NS).exp();
            prior * w + sample * (1.0 - w)
        };
        self.rtt.store(next.to_bits(), Relaxed);
        self.stamp.store(now, Relaxed);
        self.samples.fetch_add(1, Relaxed);
    }

    pub fn samples(&self) -> u64 {
        self.samples.load(Relaxed)
    }

    pub fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row.load(Relaxed)
    }

    /// A failed request counts as this slow, so balancing by latency steers away from an
    /// endpoint that fails fast.
    pub const FAILURE_RTT_NS: u64 = 1_000_000_000;

    /// Count a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// Ejected until this many nanoseconds from now (0 when admitted).
    pub fn ejected_for(&self, now: u64) -> u64 {
        self.ejected_until.load(Relaxed).saturating_sub(now)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }
}

/// What the admin API shows of an endpoint.
impl serde::Serialize for EndpointStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let now = now_ns();
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("in_flight", &self.in_flight())?;
        m.serialize_entry("latency_ms", &(self.decayed_rtt(now) / 1e6))?;
        m.serialize_entry("samples", &self.samples())?;
        m.serialize_entry("failures_in_a_row", &self.failures_in_a_row())?;
        m.serialize_entry("ejected", &self.is_ejected(now))?;
        m.serialize_entry("ejected_for_ms", &(self.ejected_for(now) / 1_000_000))?;
        m.serialize_entry("ejections", &self.ejections())?;
        m.end()
    }
}

/// An in-flight request on an endpoint.
pub struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The endpoints a balancer chooses among, with their stats.
pub trait Pool {
    fn size(&self) -> usize;
    fn stats(&self, i: usize) -> &EndpointStats;
}

/// Choose an endpoint: one not in `skip` (already tried for this request) and not
/// ejected; when every remaining endpoint is ejected, among those (better a likely
/// failure than a certain one). `rr` is the service's round-robin cursor.
pub fn pick(
    pool: &impl Pool,
    balancer: Balancer,
    rr: &AtomicUsize,
    skip: impl Fn(usize) -> bool,
    now: u64,
) -> Option<usize> {
    let n = pool.size();
    let healthy = |i: usize| !skip(i) && !pool.stats(i).is_ejected(now);
    let count = (0..n).filter(|&i| healthy(i)).count();
    let eligible: &dyn Fn(usize) -> bool = if count > 0 { &healthy } else { &|i| !skip(i) };
    let count = if count > 0 {
        count
    } else {
        (0..n).filter(|&i| eligible(i)).count()
    };
    let nth = |k: usize| (0..n).filter(|&i| eligible(i)).nth(k);
    match (count, balancer) {
        (0, _) => None,
        (1, _) => nth(0),
        (_, Balancer::RoundRobin) => nth(rr.fetch_add(1, Relaxed) % count),
        (_, b) => {
            // Power of two choices: two distinct random candidates, the cheaper wins.
            let a = fastrand::usize(0..count);
            let mut c = fastrand::usize(0..count - 1);
            if c >= a {
                c += 1;
            }
            let (a, c) = (nth(a)?, nth(c)?);
            let cost = |i: usize| match b {
                Balancer::LeastRequest => f64::from(pool.stats(i).in_flight()),
                _ => pool.stats(i).cost(now),
            };
            Some(if cost(c) < cost(a) { c } else { a })
        }
    }
}

/// Record how a request to endpoint `i` ended, for outlier detection. Returns how long
/// the endpoint is now ejected for, if this failure ejected it.
pub fn report(
    pool: &impl Pool,
    i: usize,
    ok: bool,
    od: Option<&OutlierDetection>,
    now: u64,
) -> Option<Duration> {
    let s = pool.stats(i);
    if ok {
        s.failures_in_a_row.store(0, Relaxed);
        return None;
    }
    let od = od?;
    let failures = s.failures_in_a_row.fetch_add(1, Relaxed) + 1;
    if failures < od.consecutive_failures || s.is_ejected(now) {
        return None;
    }
    let n = pool.size();
    let ejected = (0..n).filter(|&j| pool.stats(j).is_ejected(now)).count();
    let allowed = (n * od.max_ejection_percent as usize / 100).max(1);
    if ejected >= allowed {
        return None;
    }
    // Time healthy since the last ejection ended earns back one step per base time.
    let base = od.base_ejection.as_nanos() as u64;
    let healthy_for = now.saturating_sub(s.ejected_until.load(Relaxed));
    let earned = u32::try_from(healthy_for / base.max(1)).unwrap_or(u32::MAX);
    let count = s.ejections.load(Relaxed).saturating_sub(earned) + 1;
    s.ejections.store(count, Relaxed);
    let time = (od.base_ejection * count).min(od.max_ejection);
    s.ejected_until.store(now + time.as_nanos() as u64, Relaxed);
    s.failures_in_a_row.store(0, Relaxed);
    Some(time)
}

/// Why the circuit breaker turned a request or connection away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    Connections,
    Requests,
}

impl Overload {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Connections => "circuit-open-connections",
            Self::Requests => "circuit-open-requests",
        }
    }
}

/// Seconds of retry-budget history kept at most (`ttl` is 1 to 60 s).
const BUDGET_SLOTS: usize = 60;

#[derive(Debug, Default)]
struct BudgetSlot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// What one service runs up on this node: breaker counts, retry budget, rate limit.
#[derive(Debug)]
pub struct ServiceTraffic {
    pub rr: AtomicUsize,
    active: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
    freed: Notify,
    /// Made on the first request: most services of a large cluster never see one from
    /// this node.
    budget: std::sync::OnceLock<Box<[BudgetSlot]>>,
    pub bucket: TokenBucket,
    /// Requests routed to it, for the golden signals over the last minute.
    pub golden: crate::telemetry::window::Golden,
}

impl Default for ServiceTraffic {
    fn default() -> Self {
        Self {
            rr: AtomicUsize::new(0),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            freed: Notify::new(),
            budget: std::sync::OnceLock::new(),
            bucket: TokenBucket::default(),
            golden: Default::default(),
        }
    }
}

impl ServiceTraffic {
    fn budget(&self) -> &[BudgetSlot] {
        self.budget
            .get_or_init(|| (0..BUDGET_SLOTS).map(|_| BudgetSlot::default()).collect())
    }
}

fn try_increment(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
        .is_ok()
}

impl ServiceTraffic {
    /// A client connection to this service, if `max` allows one more.
    pub fn connect(self: &Arc<Self>, max: Option<u32>) -> Result<ConnSlot, Overload> {
        if !try_increment(&self.connections, max.unwrap_or(u32::MAX)) {
            return Err(Overload::Connections);
        }
        Ok(ConnSlot(self.clone()))
    }

    /// An active-request slot: at once if one is free, else after waiting in line (if the
    /// line is not full) until one frees or the pending timeout passes.
    pub async fn admit(self: &Arc<Self>, cb: &CircuitBreaker) -> Result<ActiveSlot, Overload> {
        if try_increment(&self.active, cb.max_active_requests) {
            return Ok(ActiveSlot(self.clone()));
        }
        if !try_increment(&self.pending, cb.max_pending_requests) {
            return Err(Overload::Requests);
        }
        let waited = tokio::time::timeout(cb.pending_timeout, async {
            loop {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if try_increment(&self.active, cb.max_active_requests) {
                    return;
                }
                freed.await;
            }
        })
        .await;
        self.pending.fetch_sub(1, Relaxed);
        match waited {
            Ok(()) => Ok(ActiveSlot(self.clone())),
            Err(_) => Err(Overload::Requests),
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }

    fn slot(&self, second: u64) -> &BudgetSlot {
        let s = &self.budget()[second as usize % BUDGET_SLOTS];
        let seen = s.second.load(Relaxed);
        if seen != second
            && s.second
                .compare_exchange(seen, second, Relaxed, Relaxed)
                .is_ok()
        {
            s.requests.store(0, Relaxed);
            s.retries.store(0, Relaxed);
        }
        s
    }

    /// A first attempt: it earns `ratio` of a retry.
    pub fn deposit(&self) {
        self.slot(now_ns() / 1_000_000_000)
            .requests
            .fetch_add(1, Relaxed);
    }

    /// Take one retry from the budget, if it has one.
    pub fn withdraw(&self, b: &RetryBudget) -> bool {
        let now = now_ns() / 1_000_000_000;
        let ttl = b.ttl.as_secs().clamp(1, BUDGET_SLOTS as u64);
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in self.budget() {
            let sec = s.second.load(Relaxed);
            if sec <= now && now - sec < ttl {
                requests += u64::from(s.requests.load(Relaxed));
                retries += u64::from(s.retries.load(Relaxed));
            }
        }
        let allowed = f64::from(b.min_per_second) * ttl as f64 + b.ratio * requests as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        self.slot(now).retries.fetch_add(1, Relaxed);
        true
    }
}

/// A client connection counted against `maxConnections`.
pub struct ConnSlot(Arc<ServiceTraffic>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

/// An active request counted against `maxActiveRequests`.
pub struct ActiveSlot(Arc<ServiceTraffic>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.freed.notify_one();
    }
}

/// A token bucket; the rate comes with each call so a reload can change it.
#[derive(Debug, Default)]
pub struct TokenBucket(Mutex<Option<(f64, u64)>>);

impl TokenBucket {
    /// Take a token if there is one.
    pub fn try_take(&self, limit: &RateLimit) -> bool {
        let now = now_ns();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let burst = f64::from(limit.burst);
        let (tokens, stamp) = g.unwrap_or((burst, now));
        let elapsed = now.saturating_sub(stamp) as f64 / 1e9;
        let tokens = (tokens + elapsed * limit.per_second).min(burst);
        let (left, ok) = if tokens >= 1.0 {
            (tokens - 1.0, true)
        } else {
            (tokens, false)
        };
        *g = Some((left, now));
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Eps(Vec<EndpointStats>);
    impl Pool for Eps {
        fn size(&self) -> usize {
            self.0.len()
        }
        fn stats(&self, i: usize) -> &EndpointStats {
            &self.0[i]
        }
    }

    fn eps(n: usize) -> Eps {
        Eps((0..n).map(|_| EndpointStats::default()).collect())
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let p = eps(2);
        let now = now_ns();
        p.0[0].observe_rtt(50_000_000, now);
        p.0[1].observe_rtt(1_000_000, now);
        let rr = AtomicUsize::new(0);
        let picks: Vec<_> = (0..100)
            .map(|_| pick(&p, Balancer::PeakEwma, &rr, |_| false, now).unwrap())
            .collect();
        assert!(picks.iter().all(|&i| i == 1), "{picks:?}");
        let rr_picks: Vec<_> = (0..4)
            .map(|_| pick(&p, Balancer::RoundRobin, &rr, |_| false, now).unwrap())
            .collect();
        assert_eq!(rr_picks, [0, 1, 0, 1]);
    }

    #[test]
    fn a_slower_sample_is_taken_at_once_a_faster_one_gradually() {
        let s = EndpointStats::default();
        let t = now_ns();
        s.observe_rtt(100_000_000, t);
        assert!((s.cost(t) - 100_000_000.0).abs() < 1.0);
        s.observe_rtt(1_000_000, t + 1_000_000_000);
        let c = s.cost(t + 1_000_000_000);
        assert!(c > 1_000_000.0 && c < 100_000_000.0, "{c}");
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let p = eps(2);
        p.0[0].in_flight.store(3, Relaxed);
        let rr = AtomicUsize::new(0);
        for _ in 0..20 {
            assert_eq!(
                pick(&p, Balancer::LeastRequest, &rr, |_| false, now_ns()),
                Some(1)
            );
        }
    }

    #[test]
    fn ejection_grows_and_is_capped_and_skipped_endpoints_stay_skipped() {
        let p = eps(3);
        let od = OutlierDetection {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
            max_ejection_percent: 50,
        };
        let t = 1_000_000_000_000;
        assert_eq!(report(&p, 0, false, Some(&od), t), None);
        assert_eq!(
            report(&p, 0, false, Some(&od), t),
            Some(Duration::from_secs(1))
        );
        assert!(p.0[0].is_ejected(t));
        // Only one of three may be out at 50%.
        report(&p, 1, false, Some(&od), t);
        assert_eq!(report(&p, 1, false, Some(&od), t), None);
        let rr = AtomicUsize::new(0);
        for _ in 0..20 {
            assert_ne!(pick(&p, Balancer::PeakEwma, &rr, |i| i == 2, t), Some(0));
        }
        // Back after a second; failing again at once ejects it for twice as long.
        let t2 = t + 1_000_000_001;
        assert!(!p.0[0].is_ejected(t2));
        report(&p, 0, false, Some(&od), t2);
        assert_eq!(
            report(&p, 0, false, Some(&od), t2),
            Some(Duration::from_secs(2))
        );
        // Everything left is ejected or tried: the ejected one is still chosen.
        assert_eq!(pick(&p, Balancer::RoundRobin, &rr, |i| i != 0, t2), Some(0));
    }

    #[test]
    fn the_retry_budget_allows_its_ratio() {
        let t = ServiceTraffic::default();
        let b = RetryBudget {
            ratio: 0.2,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        };
        for _ in 0..100 {
            t.deposit();
        }
        let granted = (0..100).filter(|_| t.withdraw(&b)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn the_token_bucket_allows_its_burst() {
        let b = TokenBucket::default();
        let l = RateLimit {
            per_second: 0.001,
            burst: 5,
        };
        assert_eq!((0..10).filter(|_| b.try_take(&l)).count(), 5);
    }

    #[tokio::test]
    async fn the_breaker_queues_then_refuses() {
        let t = Arc::new(ServiceTraffic::default());
        let cb = CircuitBreaker {
            max_connections: Some(1),
            max_active_requests: 1,
            max_pending_requests: 1,
            pending_timeout: Duration::from_secs(5),
        };
        let first = t.admit(&cb).await.unwrap();
        let t2 = t.clone();
        let cb2 = cb.clone();
        let waiting = tokio::spawn(async move { t2.admit(&cb2).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(t.admit(&cb).await.err(), Some(Overload::Requests));
        drop(first);
        assert!(
            waiting.await.unwrap(),
            "the waiting request got the freed slot"
        );
        let c = t.connect(Some(1)).ok().unwrap();
        assert!(t.connect(Some(1)).is_err());
        drop(c);
        assert!(t.connect(Some(1)).is_ok());
    }
}
