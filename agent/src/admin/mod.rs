//! The admin API: HTTP/1.1 on a Unix socket (root only), so `weftctl` and
//! `curl --unix-socket` can ask the agent what it sees; and the Prometheus scrape port
//! (`--metrics-address`), which serves only `/metrics`, `/ready` and `/live`. Every
//! connection has a header read timeout, and at most [`MAX_ADMIN_CONNECTIONS`] are served
//! at once. The paths and their answers are in [`api`]; [`client`] is the blocking client
//! weftctl uses.

pub mod api;
pub mod client;
pub mod explain;

use std::{convert::Infallible, path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::Mutex,
};

use crate::{
    datapath::Datapath, identity::certs::Identities, metrics::Metrics, proxy::tunnel::Tunnels,
    state::NodeState, telemetry::Telemetry,
};

/// What the control side publishes about itself.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Status {
    pub ready: bool,
    /// The agent's process id (two agents share the admin path during a handoff).
    pub pid: u32,
    pub node: String,
    pub config_generation: u64,
    /// The last configuration change that was refused, and why (`None` once a later one
    /// is accepted).
    pub last_config_error: Option<String>,
    pub attachment: Option<crate::datapath::Attachment>,
    /// Other owners' programs on weft's cgroup hooks, in the order they run relative to
    /// weft's; `conflict` when one runs first where it can take connections from weft.
    pub foreign_programs: Vec<crate::datapath::coexist::Foreign>,
    /// Milliseconds from process start to ready (capturing in every enrolled pod).
    pub startup_ms: Option<u64>,
    pub inherited_listeners: usize,
    pub enrolled: Vec<String>,
    pub draining: bool,
    /// What the datapath did while no agent ran before this one started: meshed connects
    /// that bypassed the mesh (fail-open) or were refused (fail-closed), inbound likewise.
    pub while_agent_down: std::collections::BTreeMap<String, u64>,
    /// The agent's file descriptor limit (RLIMIT_NOFILE), raised at start to the hard
    /// limit, and the connection limits it serves under.
    pub limits: Limits,
    /// Where the configuration is read from.
    pub config_source: String,
    /// Configuration changes refused since the agent started.
    pub config_reload_errors: u64,
    /// Objects of the configuration in force that were refused (each kept its last
    /// accepted version, if it had one, or is left out), and why.
    pub rejected: Vec<crate::config::Rejected>,
}

/// Limits the agent runs under.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Limits {
    pub open_files: u64,
    /// What the limit was before the agent raised it.
    pub open_files_at_start: u64,
    pub max_connections: u32,
    pub max_connections_per_pod: u32,
}

/// A change asked for through the admin API, carried out by the agent's control loop.
#[derive(Debug)]
pub enum Change {
    Quarantine {
        pod: String,
        quarantine: crate::config::quarantine::Quarantine,
    },
    Unquarantine {
        pod: String,
    },
}

/// A [`Change`] and where its outcome goes: the configuration generation it made, or
/// why it was refused.
#[derive(Debug)]
pub struct Control {
    pub what: Change,
    pub reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Reads and changes the agent's log filter (a `tracing_subscriber` reload handle, set up
/// by main.rs); tests and embedders without one get a fixed filter.
type SetFilter = dyn Fn(&str) -> Result<String, String> + Send + Sync;

#[derive(Clone)]
pub struct LogLevel {
    get: Arc<dyn Fn() -> String + Send + Sync>,
    set: Arc<SetFilter>,
}

impl LogLevel {
    pub fn new(
        get: impl Fn() -> String + Send + Sync + 'static,
        set: impl Fn(&str) -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            get: Arc::new(get),
            set: Arc::new(set),
        }
    }

    /// A filter that cannot be changed.
    pub fn fixed(level: &'static str) -> Self {
        Self::new(
            move || level.to_owned(),
            |_| Err("this agent's log filter cannot be changed".into()),
        )
    }

    pub fn get(&self) -> String {
        (self.get)()
    }

    /// Set the filter (`debug`, `weft_agent::proxy=trace,info`, ...); the new one, or why
    /// not.
    pub fn set(&self, filter: &str) -> Result<String, String> {
        (self.set)(filter)
    }
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogLevel({})", self.get())
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub log_level: LogLevel,
    /// Changes go to the control loop (app.rs), one at a time.
    pub control: tokio::sync::mpsc::Sender<Control>,
    pub status: Arc<ArcSwap<Status>>,
    pub state: Arc<ArcSwap<NodeState>>,
    pub metrics: Arc<Metrics>,
    pub telemetry: Arc<Telemetry>,
    pub datapath: Arc<Mutex<Datapath>>,
    pub identities: Arc<Identities>,
    pub tunnels: Arc<Tunnels>,
    /// The limits the proxy counts connections against.
    pub conns: Arc<crate::proxy::conn::ConnTracker>,
    /// Enrolled pods, with the connections each holds.
    pub pods:
        Arc<ArcSwap<std::collections::HashMap<std::net::Ipv4Addr, Arc<crate::proxy::conn::Pod>>>>,
}

/// Admin connections answered at once, on each listener; more wait for a place.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Which paths a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The Unix socket: everything.
    Full,
    /// The TCP scrape port: `/metrics`, `/ready`, `/live`.
    Metrics,
}

/// Bind the admin socket (failing at once if that is not possible).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// A listener the admin API answers on: the Unix socket (root peers only) or the scrape
/// port.
pub trait Listener: Send + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What it is, for logs.
    const WHAT: &'static str;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Conn>> + Send;
    /// Whether to answer this peer at all.
    fn admit(conn: &Self::Conn) -> bool;
}

impl Listener for UnixListener {
    type Conn = tokio::net::UnixStream;
    const WHAT: &'static str = "the admin socket";

    async fn accept(&self) -> std::io::Result<Self::Conn> {
        UnixListener::accept(self).await.map(|(c, _)| c)
    }

    fn admit(conn: &Self::Conn) -> bool {
        match crate::peer::check_root(conn) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "refusing an admin client");
                false
            }
        }
    }
}

impl Listener for TcpListener {
    type Conn = tokio::net::TcpStream;
    const WHAT: &'static str = "the metrics listener";

    async fn accept(&self) -> std::io::Result<Self::Conn> {
        TcpListener::accept(self).await.map(|(c, _)| c)
    }

    fn admit(_: &Self::Conn) -> bool {
        true
    }
}

/// Answer on `listener` until the process ends: the Unix socket with every path
/// ([`Scope::Full`]), the scrape port with [`Scope::Metrics`]. A failing accept (out of
/// file descriptors) backs off and tries again, never ending the loop.
pub async fn serve<L: Listener>(
    listener: L,
    admin: AdminState,
    scope: Scope,
    header_read: Duration,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let accept_errors = std::sync::atomic::AtomicU64::new(0);
    let mut backoff = crate::proxy::listener::Backoff::new(&accept_errors);
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                backoff.failed(&e, L::WHAT).await;
                continue;
            }
        };
        backoff.succeeded();
        if !L::admit(&conn) {
            continue;
        }
        let Ok(place) = places.clone().acquire_owned().await else {
            continue;
        };
        tokio::spawn(connection(conn, admin.clone(), scope, header_read, place));
    }
}

/// One admin connection: requests must arrive whole within `header_read`; answers are
/// made by [`api::answer`].
async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    conn: S,
    admin: AdminState,
    scope: Scope,
    header_read: Duration,
    _place: tokio::sync::OwnedSemaphorePermit,
) {
    let svc = service_fn(move |req| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(api::answer(&admin, scope, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_headers(64)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(conn), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}
