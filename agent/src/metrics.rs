//! The proxy's counters and gauges, each defined once: its name, kind and help text live
//! in the one table below, and everything that reads them (the admin API's `/stats`,
//! `weftctl stats`, the docs test that keeps docs/operations.md complete, and later a
//! Prometheus export) walks [`Metrics::DEFS`] instead of keeping its own list.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How a value behaves over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Only ever grows.
    Counter,
    /// Goes up and down (a current amount).
    Gauge,
}

/// One metric's definition.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

macro_rules! metrics {
    ($( #[doc = $help:literal] $name:ident : $kind:ident, )*) => {
        /// Every counter and gauge of the proxy; see the table in metrics.rs.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( #[doc = $help] pub $name: AtomicU64, )*
        }

        impl Metrics {
            /// Name, kind and help of every metric, in the order `snapshot` lists them.
            pub const DEFS: &'static [Def] = &[
                $( Def { name: stringify!($name), kind: Kind::$kind, help: $help.trim_ascii() }, )*
            ];

            /// Every metric's current value, in [`Self::DEFS`] order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name.load(Relaxed)), )* ]
            }
        }
    };
}

metrics! {
    /// Captured outbound connections accepted from a pod.
    outbound_accepted: Counter,
    /// Outbound connections served by the HTTP proxy (the rest are forwarded as bytes).
    outbound_http: Counter,
    /// Captured connections without a recorded original destination (should stay 0).
    outbound_no_orig_dst: Counter,
    /// Captured connections to an address that is no longer a service.
    outbound_no_service: Counter,
    /// TLS connections whose server name no TLSRoute of their service matches.
    outbound_no_route: Counter,
    /// Forwarded TCP connections to a service without an endpoint.
    outbound_no_endpoint: Counter,
    /// Connections the inbound listener accepted for a pod.
    inbound_accepted: Counter,
    /// Plaintext connections from outside the mesh delivered to a PERMISSIVE pod.
    inbound_plaintext: Counter,
    /// Plaintext connections from outside the mesh refused by a STRICT pod.
    inbound_plaintext_refused: Counter,
    /// Tunnelled connections (CONNECT streams) accepted from another node's agent.
    tunnel_accepted: Counter,
    /// Tunnel streams refused: not a CONNECT, a source address that is not the peer's identity on the peer's node, or a destination that is not a pod of this node with the identity the peer asked for.
    tunnel_rejected: Counter,
    /// Tunnel connections refused before HTTP/2: no TLS, no or an untrusted or expired certificate, not a workload identity, an unknown server name, or (client side) a peer with the wrong identity.
    tunnel_handshake_failures: Counter,
    /// mTLS connections this agent opened to peer agents (each carries many tunnelled connections).
    tunnel_connections_opened: Counter,
    /// mTLS connections from peer agents accepted (handshake done).
    tunnel_connections_accepted: Counter,
    /// Requests and connections an AuthorizationPolicy denied (HTTP: 403 policy-denied; TCP and tunnel streams: refused).
    policy_denied: Counter,
    /// Requests and connections a dryRun policy would have denied (allowed, logged).
    policy_would_deny: Counter,
    /// Requests and connections an AUDIT policy matched (logged).
    policy_audited: Counter,
    /// Connections refused because their pod held its maximum (--max-connections-per-pod).
    connections_refused_pod_limit: Counter,
    /// Connections refused because the node held its maximum (--max-connections).
    connections_refused_node_limit: Counter,
    /// Accepting failed (for example out of file descriptors); the listener backed off.
    accept_errors: Counter,
    /// Connecting to an endpoint, an app or a peer agent failed (refused, unreachable).
    upstream_connect_errors: Counter,
    /// Connecting took longer than the connect timeout.
    upstream_connect_timeouts: Counter,
    /// A peer agent did not answer a tunnel request within the tunnel answer timeout.
    tunnel_answer_timeouts: Counter,
    /// Forwarded TCP connections closed after the idle timeout without a byte either way.
    tcp_idle_timeouts: Counter,
    /// Clients that sent no complete head (HTTP/1, tunnel, ClientHello) within the header read timeout.
    header_read_timeouts: Counter,
    /// HTTP connections closed after the idle timeout with no request in flight.
    http_idle_timeouts: Counter,
    /// Requests sent again under a route's retry policy.
    http_retries: Counter,
    /// Retries the retry budget refused (the failure went to the client).
    http_retry_budget_exhausted: Counter,
    /// Endpoints ejected by outlier detection.
    http_ejections: Counter,
    /// Requests and connections the circuit breaker refused.
    http_circuit_open: Counter,
    /// Requests answered 429 by a rate limit.
    http_rate_limited: Counter,
    /// Injected delays and aborts.
    http_faults: Counter,
    /// Requests copied to a mirror.
    http_mirrored: Counter,
    /// Mirror copies skipped: body too large or of unknown length, or too many mirrors in flight.
    http_mirror_skipped: Counter,
    /// Requests the client broke: a malformed or cut-short body, or a body that stalled (never counted against an endpoint).
    http_client_errors: Counter,
    /// Requests the client abandoned (reset or closed) before the answer.
    http_client_cancelled: Counter,
    /// Requests answered by the proxy itself, any reason (x-weft-reason).
    http_proxy_answers: Counter,
    /// Upgraded (WebSocket-style) connections open now.
    upgraded_connections: Gauge,
    /// Connections the proxy holds open now (captured, inbound, tunnelled, upgraded).
    active_connections: Gauge,
    /// Bytes forwarded from clients to servers over forwarded TCP connections.
    bytes_client_to_server: Counter,
    /// Bytes forwarded from servers to clients over forwarded TCP connections.
    bytes_server_to_client: Counter,
    /// Access log records dropped because the writer fell behind (its queue was full).
    access_log_dropped: Counter,
    /// New connections to a quarantined pod refused (not from its node or a debug source).
    quarantine_refused: Counter,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

/// Counts one unit of a gauge for as long as it lives.
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_a_name_and_help_in_snapshot_order() {
        let m = Metrics::default();
        let names: Vec<_> = m.snapshot().into_iter().map(|(n, _)| n).collect();
        let defs: Vec<_> = Metrics::DEFS.iter().map(|d| d.name).collect();
        assert_eq!(names, defs);
        for d in Metrics::DEFS {
            assert!(!d.help.is_empty() && d.help.ends_with('.'), "{}", d.name);
        }
    }

    /// docs/operations.md lists every proxy counter (and no other).
    #[test]
    fn operations_guide_lists_every_counter() {
        let doc = include_str!("../../docs/operations.md");
        let listed: std::collections::BTreeSet<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `proxy "))
            .filter_map(|l| l.split('`').next())
            .collect();
        let defined: std::collections::BTreeSet<&str> =
            Metrics::DEFS.iter().map(|d| d.name).collect();
        assert_eq!(
            listed, defined,
            "docs/operations.md's counter table and metrics.rs disagree"
        );
    }
}
