//! Golden signals per service over the last minute, for `weftctl stats` and `top`:
//! every service keeps running totals of the requests routed to it (`Golden`, in its
//! `ServiceTraffic`); a task takes a snapshot of them every [`STEP`] and keeps the last
//! [`KEPT`], and `/stats/services` answers with the difference between the oldest and the
//! totals now: requests per second, success rate, latency quantiles from the buckets.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use super::families::LATENCY_BUCKETS;
use crate::state::NodeState;

/// How often totals are read.
pub const STEP: Duration = Duration::from_secs(5);
/// Snapshots kept: the window is `(KEPT - 1) * STEP`, a minute.
pub const KEPT: usize = 13;

/// Running totals of one service's requests (never reset).
#[derive(Debug, Default)]
pub struct Golden {
    requests: AtomicU64,
    /// Answered 5xx (by the endpoint or the proxy).
    failures: AtomicU64,
    /// Requests by the latency bucket they fell in (the last counts the rest).
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

impl Golden {
    pub fn record(&self, status: u16, seconds: f64) {
        self.requests.fetch_add(1, Relaxed);
        if status >= 500 {
            self.failures.fetch_add(1, Relaxed);
        }
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
    }

    fn read(&self) -> Totals {
        Totals {
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Totals {
    requests: u64,
    failures: u64,
    buckets: Vec<u64>,
}

/// One service's snapshots, oldest first.
type Ring = VecDeque<(Instant, Totals)>;

/// Snapshots per service (only of services that have had requests).
#[derive(Debug, Default)]
pub struct Windows {
    by_service: Mutex<HashMap<Arc<str>, Ring>>,
    last_step: Mutex<Option<Instant>>,
}

impl Windows {
    /// Take a snapshot of every service now.
    fn step(&self, st: &NodeState) {
        let now = Instant::now();
        let previous = self
            .last_step
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(now)
            .unwrap_or(now);
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::HashSet::new();
        for svc in st.services.values() {
            let t = svc.traffic.golden.read();
            seen.insert(svc.name.clone());
            if t.requests == 0 && !map.contains_key(&svc.name) {
                continue;
            }
            let ring = map.entry(svc.name.clone()).or_insert_with(|| {
                // Its first requests came after the previous look, when it had none.
                let zero = Totals {
                    buckets: vec![0; t.buckets.len()],
                    ..Totals::default()
                };
                VecDeque::from([(previous, zero)])
            });
            if ring.len() == KEPT {
                ring.pop_front();
            }
            ring.push_back((now, t));
        }
        map.retain(|k, _| seen.contains(k));
    }

    /// Each service's signals from the oldest snapshot kept to now, busiest first.
    pub fn signals(&self, st: &NodeState) -> Vec<serde_json::Value> {
        let map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out: Vec<(f64, serde_json::Value)> = st
            .services
            .values()
            .filter_map(|svc| {
                let (t0, a) = map.get(&svc.name)?.front()?;
                let b = svc.traffic.golden.read();
                let secs = now.duration_since(*t0).as_secs_f64();
                let n = b.requests.saturating_sub(a.requests);
                let rps = if secs > 0.0 { n as f64 / secs } else { 0.0 };
                let failed = b.failures.saturating_sub(a.failures);
                let buckets: Vec<u64> = b
                    .buckets
                    .iter()
                    .zip(&a.buckets)
                    .map(|(x, y)| x.saturating_sub(*y))
                    .collect();
                let q = |p: f64| quantile(&buckets, p).map(|s| s * 1000.0);
                Some((
                    rps,
                    serde_json::json!({
                        "service": svc.name,
                        "window_s": secs.round(),
                        "requests": n,
                        "rps": rps,
                        "success_rate": (n > 0).then(|| 1.0 - failed as f64 / n as f64),
                        "p50_ms": q(0.5),
                        "p95_ms": q(0.95),
                        "p99_ms": q(0.99),
                    }),
                ))
            })
            .collect();
        out.sort_by(|x, y| y.0.total_cmp(&x.0));
        out.into_iter().map(|(_, v)| v).collect()
    }
}

/// The `p` quantile of requests counted in `buckets`, as Prometheus estimates it: linear
/// within the bucket it falls in (the last, unbounded one answers its lower bound).
fn quantile(buckets: &[u64], p: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = p * total as f64;
    let mut seen = 0.0;
    for (i, n) in buckets.iter().enumerate() {
        let next = seen + *n as f64;
        if next >= rank && *n > 0 {
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let Some(upper) = LATENCY_BUCKETS.get(i) else {
                return Some(lower);
            };
            return Some(lower + (upper - lower) * (rank - seen) / *n as f64);
        }
        seen = next;
    }
    None
}

/// Take snapshots until the process ends.
pub async fn run(state: Arc<ArcSwap<NodeState>>, windows: Arc<Windows>) {
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        windows.step(&state.load());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let g = Golden::default();
        for _ in 0..90 {
            g.record(200, 0.0007); // (0.5 ms, 1 ms]
        }
        for _ in 0..10 {
            g.record(503, 0.2); // (0.1 s, 0.25 s]
        }
        let t = g.read();
        assert_eq!((t.requests, t.failures), (100, 10));
        let p50 = quantile(&t.buckets, 0.5).unwrap();
        assert!((0.0005..=0.001).contains(&p50), "{p50}");
        let p99 = quantile(&t.buckets, 0.99).unwrap();
        assert!((0.1..=0.25).contains(&p99), "{p99}");
        assert_eq!(quantile(&[0; 16], 0.5), None);
    }
}
