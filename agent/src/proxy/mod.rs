//! The shared proxy. One [`outbound::Outbound`] and [`inbound::Inbound`] per enrolled pod,
//! one [`tunnel::server::TunnelServer`] per node, all reading the same [`ProxyInputs`].
//!
//! A connection's way through (docs/architecture.md has the picture):
//! - [`listener`] accepts it inside a pod, admits it against the connection limits and
//!   gives it a [`conn::ConnCtx`] (pod, peer, permit; timeouts and drain through the inputs);
//! - [`outbound`] finds where it wanted to go ([`capture::Capture`]), looks at its first
//!   bytes ([`detect`]) and hands HTTP to [`http`], the rest to [`stream::forward`];
//! - [`dial`] opens the upstream side as a pod of this node ([`socket::PodSockets`]):
//!   delivered in the endpoint's pod, through the endpoint node's agent ([`tunnel`], mTLS),
//!   or directly, always under the connect timeout, always as a [`stream::Stream`];
//! - [`inbound`] and [`tunnel::server`] serve what arrives for a pod and deliver it to the
//!   app;
//! - answers the proxy makes itself are [`error::ProxyError`]s.

pub mod authz;
pub mod capture;
pub mod conn;
pub mod detect;
pub mod dial;
pub mod error;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod outbound;
pub mod sni;
pub mod socket;
pub mod stream;
pub mod tunnel;

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::{identity::certs::CertStore, metrics::Metrics, state::NodeState, telemetry::Telemetry};
use capture::Capture;
use conn::{ConnLimits, ConnTracker, Drain, Pod, Timeouts};
use tunnel::Tunnels;

/// The proxy's settings (flags of `weft-agent run`; defaults in docs/operations.md).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyConfig {
    pub timeouts: Timeouts,
    pub limits: ConnLimits,
    pub http: http::Limits,
    pub tasks: TaskLimits,
}

/// Bounds on work the proxy starts besides serving connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLimits {
    /// Mirrored requests in flight on the node; more are skipped and counted.
    pub mirrors: usize,
    /// ClientHellos being read at once (each holds a 16 KiB buffer); more wait.
    pub sni_peeks: usize,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            mirrors: 256,
            sni_peeks: 1024,
        }
    }
}

/// Everything the proxies read, passed together.
#[derive(Clone)]
pub struct ProxyInputs {
    pub state: Arc<ArcSwap<NodeState>>,
    pub capture: Arc<dyn Capture>,
    /// Enrolled pods of this node, by IP (where deliveries to them are made).
    pub pods: Arc<ArcSwap<HashMap<Ipv4Addr, Arc<Pod>>>>,
    pub metrics: Arc<Metrics>,
    /// Turns on when the agent stops accepting (handoff or shutdown).
    pub drain: Drain,
    pub config: Arc<ProxyConfig>,
    /// Connections held by the node, against the limits.
    pub conns: Arc<ConnTracker>,
    pub mirrors: Arc<Semaphore>,
    pub sni_peeks: Arc<Semaphore>,
    /// Node-to-node: certificates, pooled connections to peer agents, accepted ones.
    pub tunnels: Arc<Tunnels>,
    /// Where every request and connection is recorded: metrics, access log, tap.
    pub telemetry: Arc<Telemetry>,
    /// This node's own addresses (its network namespace's): connections from them are
    /// the node's, such as kubelet probes.
    pub node_addrs: Arc<std::collections::HashSet<Ipv4Addr>>,
}

impl ProxyInputs {
    pub fn new(
        state: Arc<ArcSwap<NodeState>>,
        capture: Arc<dyn Capture>,
        config: ProxyConfig,
        drain: Drain,
        certs: Arc<CertStore>,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        Self {
            state,
            capture,
            pods: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            conns: Arc::new(ConnTracker::new(config.limits, metrics.clone())),
            drain,
            mirrors: Arc::new(Semaphore::new(config.tasks.mirrors)),
            sni_peeks: Arc::new(Semaphore::new(config.tasks.sni_peeks)),
            tunnels: Arc::new(Tunnels::new(certs)),
            telemetry: Arc::new(Telemetry::new(metrics.clone())),
            node_addrs: Arc::default(),
            metrics,
            config: Arc::new(config),
        }
    }

    /// The same inputs with this telemetry: requests recorded or not, an access log.
    pub fn with_telemetry(
        mut self,
        record_requests: bool,
        log: Option<crate::telemetry::access_log::AccessLog>,
        tracing: Option<crate::telemetry::trace::Tracing>,
    ) -> Self {
        let mut t = Telemetry::new(self.metrics.clone())
            .with_requests_recorded(record_requests)
            .with_tracing(tracing);
        if let Some(log) = log {
            t = t.with_access_log(log);
        }
        self.telemetry = Arc::new(t);
        self
    }
}
