//! The pre-fault detector: once a second it reads what every endpoint did since the last
//! look (`traffic::Trend`, the running totals the proxy keeps per endpoint) and raises an
//! event when an endpoint drifts from its own healthy baseline, before it fails outright:
//!
//! - `latency-rising`: its recent mean latency is `latency_factor` times its baseline
//!   and at least `latency_min_ms` above it, two looks in a row. The baseline learns the
//!   endpoint's healthy latency: it follows a faster mean quickly and a slower one only
//!   very slowly, so a slow climb stands out instead of becoming the new normal.
//! - `errors-rising`: at least `min_failures` failed attempts in a look, and at least
//!   `error_rate` of them.
//! - `connect-failures`: connects failed in two looks in a row.
//!
//! A condition that has held is reported once, and `recovered` once it has been clear
//! for five looks. With auto-quarantine on, an endpoint far past the thresholds
//! (`quarantine_factor` times its baseline latency, or half of its attempts failing) is
//! quarantined on this node, unless the service would be left with fewer than two other
//! endpoints.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use super::{events::Event, Telemetry};
use crate::{
    admin::{Change, Control},
    state::{Endpoint, NodeState},
};

/// When the detector speaks up.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub interval: Duration,
    pub latency_factor: f64,
    pub latency_min_ms: f64,
    /// Answers needed before the baseline is trusted.
    pub baseline_samples: u64,
    pub error_rate: f64,
    pub min_failures: u64,
    /// Auto-quarantine past this many times the baseline latency (`None`: never).
    pub quarantine_factor: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            latency_factor: 2.0,
            latency_min_ms: 2.0,
            baseline_samples: 20,
            error_rate: 0.05,
            min_failures: 3,
            quarantine_factor: None,
        }
    }
}

/// Looks in a row a condition must be clear before it is reported recovered.
const CLEAR_LOOKS: u32 = 5;
/// Weight of a new look in the recent mean.
const FAST: f64 = 0.5;
/// Weight of a faster look in the baseline, and of a slower one.
const BASELINE_DOWN: f64 = 0.2;
const BASELINE_UP: f64 = 0.002;

/// What the detector remembers of one endpoint.
#[derive(Debug, Default)]
struct Track {
    last: [u64; 4],
    baseline_ms: Option<f64>,
    answers: u64,
    recent_ms: Option<f64>,
    hot_latency: u32,
    hot_connect: u32,
    /// Conditions reported and not yet recovered, with how many clear looks they have had.
    active: HashMap<&'static str, u32>,
    quarantined: bool,
}

/// What one look found.
#[derive(Debug, Default, PartialEq)]
struct Look {
    latency: bool,
    errors: bool,
    connects: bool,
    quarantine: bool,
    message: String,
}

impl Track {
    /// Take the totals since the last look and judge them.
    fn look(&mut self, totals: [u64; 4], t: &Thresholds) -> Look {
        let [answered, latency_ns, failed, connect_failed] = totals;
        let d = |i: usize, now: u64| now.saturating_sub(self.last[i]);
        let (da, dl, df, dc) = (
            d(0, answered),
            d(1, latency_ns),
            d(2, failed),
            d(3, connect_failed),
        );
        self.last = totals;
        let mut look = Look::default();
        if da > 0 {
            let mean = dl as f64 / da as f64 / 1e6;
            let recent = self
                .recent_ms
                .map_or(mean, |r| r * (1.0 - FAST) + mean * FAST);
            self.recent_ms = Some(recent);
            self.answers += da;
            let base = *self.baseline_ms.get_or_insert(mean);
            let trusted = self.answers >= t.baseline_samples;
            let rising =
                trusted && recent >= base * t.latency_factor && recent - base >= t.latency_min_ms;
            self.hot_latency = if rising { self.hot_latency + 1 } else { 0 };
            look.latency = self.hot_latency >= 2;
            if look.latency {
                look.message = format!(
                    "latency {recent:.1} ms against a baseline of {base:.1} ms ({:.1}x)",
                    recent / base.max(1e-3)
                );
                look.quarantine |= t.quarantine_factor.is_some_and(|f| recent >= base * f);
            }
            // The baseline is the healthy latency: quick to learn a better one, slow to
            // accept a worse one, and not moved at all while latency is rising.
            if !rising {
                let w = if mean < base {
                    BASELINE_DOWN
                } else {
                    BASELINE_UP
                };
                self.baseline_ms = Some(base * (1.0 - w) + mean * w);
            }
        }
        let attempts = da + dc;
        if df >= t.min_failures && attempts > 0 {
            let rate = df as f64 / attempts.max(df) as f64;
            if rate >= t.error_rate {
                look.errors = true;
                look.message = format!(
                    "{df} of {} attempts failed in the last look ({:.0}%)",
                    attempts.max(df),
                    rate * 100.0
                );
                look.quarantine |= t.quarantine_factor.is_some() && rate >= 0.5 && df >= 10;
            }
        }
        self.hot_connect = if dc > 0 { self.hot_connect + 1 } else { 0 };
        if self.hot_connect >= 2 {
            look.connects = true;
            look.message = format!("{dc} connects failed in the last look");
        }
        look
    }
}

/// Watch every endpoint of the node's view until the process ends.
pub async fn run(
    state: Arc<ArcSwap<NodeState>>,
    telemetry: Arc<Telemetry>,
    control: tokio::sync::mpsc::Sender<Control>,
    t: Thresholds,
) {
    let mut tracks: HashMap<(Arc<str>, SocketAddrV4), Track> = HashMap::new();
    let mut tick = tokio::time::interval(t.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = state.load_full();
        let mut seen = HashSet::new();
        for svc in st.services.values() {
            for ep in &svc.endpoints {
                let key = (svc.name.clone(), ep.addr);
                let tr = &ep.stats.trend;
                let totals = [
                    tr.answered.load(Relaxed),
                    tr.latency_ns.load(Relaxed),
                    tr.failed.load(Relaxed),
                    tr.connect_failed.load(Relaxed),
                ];
                let track = tracks.entry(key.clone()).or_insert_with(|| Track {
                    last: totals,
                    ..Track::default()
                });
                let look = track.look(totals, &t);
                report(&telemetry, &svc.name, ep, track, &look);
                if look.quarantine && !track.quarantined && others_healthy(svc, ep) >= 2 {
                    track.quarantined = true;
                    auto_quarantine(&telemetry, &control, &svc.name, ep, &look.message).await;
                }
                seen.insert(key);
            }
        }
        tracks.retain(|k, _| seen.contains(k));
    }
}

/// Endpoints of `svc` other than `ep` that are not ejected.
fn others_healthy(svc: &crate::state::ServiceEntry, ep: &Endpoint) -> usize {
    let now = crate::traffic::now_ns();
    svc.endpoints
        .iter()
        .filter(|e| e.addr != ep.addr && !e.stats.is_ejected(now))
        .count()
}

/// Raise what newly holds; report what has been clear long enough as recovered.
fn report(
    telemetry: &Telemetry,
    service: &Arc<str>,
    ep: &Endpoint,
    track: &mut Track,
    look: &Look,
) {
    for (kind, holds) in [
        ("latency-rising", look.latency),
        ("errors-rising", look.errors),
        ("connect-failures", look.connects),
    ] {
        match (holds, track.active.get_mut(kind)) {
            (true, Some(clear)) => *clear = 0,
            (true, None) => {
                track.active.insert(kind, 0);
                telemetry.families.warned(service, &ep.app, kind);
                telemetry
                    .events
                    .push(event(kind, "warning", service, ep, look.message.clone()));
            }
            (false, Some(clear)) => {
                *clear += 1;
                if *clear >= CLEAR_LOOKS {
                    track.active.remove(kind);
                    telemetry.events.push(event(
                        "recovered",
                        "info",
                        service,
                        ep,
                        format!("{kind} cleared"),
                    ));
                }
            }
            (false, None) => {}
        }
    }
}

fn event(
    kind: &'static str,
    severity: &'static str,
    service: &Arc<str>,
    ep: &Endpoint,
    message: String,
) -> Event {
    Event {
        time: SystemTime::now(),
        kind,
        severity,
        service: service.clone(),
        endpoint: ep.addr,
        workload: ep.workload.clone(),
        message,
    }
}

async fn auto_quarantine(
    telemetry: &Telemetry,
    control: &tokio::sync::mpsc::Sender<Control>,
    service: &Arc<str>,
    ep: &Endpoint,
    why: &str,
) {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let what = Change::Quarantine {
        pod: ep.workload.to_string(),
        quarantine: crate::config::quarantine::Quarantine {
            reason: format!("auto-quarantined by the pre-fault detector: {why}"),
            allow_from: vec![],
            set_by: crate::config::quarantine::SetBy::Weftctl,
        },
    };
    let outcome = match control.send(Control { what, reply }).await {
        Ok(()) => answer
            .await
            .unwrap_or_else(|_| Err("the agent is stopping".into())),
        Err(_) => Err("the agent is stopping".into()),
    };
    let message = match outcome {
        Ok(_) => format!("quarantined: {why}"),
        Err(e) => format!("auto-quarantine refused: {e}"),
    };
    telemetry
        .families
        .warned(service, &ep.app, "auto-quarantined");
    telemetry
        .events
        .push(event("auto-quarantined", "warning", service, ep, message));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals after `n` more answers of `ms` each and `failed` failures.
    fn step(totals: &mut [u64; 4], n: u64, ms: f64, failed: u64, connects: u64) -> [u64; 4] {
        totals[0] += n;
        totals[1] += (n as f64 * ms * 1e6) as u64;
        totals[2] += failed + connects;
        totals[3] += connects;
        *totals
    }

    #[test]
    fn a_slow_climb_is_reported_before_it_becomes_the_baseline() {
        let t = Thresholds::default();
        let mut tr = Track::default();
        let mut totals = [0; 4];
        for _ in 0..10 {
            assert_eq!(
                tr.look(step(&mut totals, 20, 1.0, 0, 0), &t),
                Look::default()
            );
        }
        // +0.5 ms a second: 2x the baseline (and 2 ms over it) after ~4 s, reported on
        // the second look over it.
        let mut reported_at = None;
        for s in 1..60 {
            let look = tr.look(step(&mut totals, 20, 1.0 + 0.5 * s as f64, 0, 0), &t);
            if look.latency {
                reported_at = Some(s);
                assert!(
                    look.message.contains("baseline of 1.0 ms"),
                    "{}",
                    look.message
                );
                break;
            }
        }
        let s = reported_at.expect("reported");
        assert!((5..=9).contains(&s), "after {s} s");
    }

    #[test]
    fn noise_around_the_baseline_says_nothing() {
        let t = Thresholds::default();
        let mut tr = Track::default();
        let mut totals = [0; 4];
        for i in 0..200 {
            let ms = if i % 7 == 0 { 2.2 } else { 1.0 };
            let look = tr.look(step(&mut totals, 20, ms, 0, 0), &t);
            assert!(
                !look.latency && !look.errors && !look.connects,
                "{i}: {look:?}"
            );
        }
    }

    #[test]
    fn failures_and_failed_connects_are_reported() {
        let t = Thresholds::default();
        let mut tr = Track::default();
        let mut totals = [0; 4];
        tr.look(step(&mut totals, 50, 1.0, 0, 0), &t);
        let look = tr.look(step(&mut totals, 50, 1.0, 5, 0), &t);
        assert!(look.errors && look.message.contains("5 of 50"), "{look:?}");
        assert!(!tr.look(step(&mut totals, 10, 1.0, 0, 1), &t).connects);
        assert!(tr.look(step(&mut totals, 10, 1.0, 0, 1), &t).connects);
    }

    #[test]
    fn far_past_the_threshold_asks_for_quarantine_only_when_enabled() {
        let mut t = Thresholds::default();
        for (factor, want) in [(None, false), (Some(5.0), true)] {
            t.quarantine_factor = factor;
            let mut tr = Track::default();
            let mut totals = [0; 4];
            for _ in 0..5 {
                tr.look(step(&mut totals, 20, 1.0, 0, 0), &t);
            }
            tr.look(step(&mut totals, 20, 20.0, 0, 0), &t);
            let look = tr.look(step(&mut totals, 20, 20.0, 0, 0), &t);
            assert!(look.latency);
            assert_eq!(look.quarantine, want);
        }
    }
}
