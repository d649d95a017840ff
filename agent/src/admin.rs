//! The admin API on a Unix socket: one request line (`GET /path`), one JSON document back.
//! `weftctl` is its client. Paths: /ready, /status, /services, /workloads, /stats, /maps,
//! /certificates, /tunnels.

use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::Mutex,
};

use crate::{
    datapath::Datapath, identity::certs::Identities, metrics::Metrics, proxy::tunnel::Tunnels,
    state::NodeState,
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

#[derive(Clone)]
pub struct AdminState {
    pub status: Arc<ArcSwap<Status>>,
    pub state: Arc<ArcSwap<NodeState>>,
    pub metrics: Arc<Metrics>,
    pub datapath: Arc<Mutex<Datapath>>,
    pub identities: Arc<Identities>,
    pub tunnels: Arc<Tunnels>,
}

/// Admin connections answered at once; more wait for a place.
const MAX_ADMIN_CONNECTIONS: usize = 32;
/// The longest request line read.
const MAX_REQUEST_LINE: u64 = 1024;

/// Bind the admin socket (failing at once if that is not possible).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Answer admin requests until the process ends: a request line must arrive, and the
/// answer be taken, within `header_read`; at most [`MAX_ADMIN_CONNECTIONS`] are served at
/// once; a failing accept (out of file descriptors) backs off and tries again, never
/// ending the loop.
pub async fn serve(listener: UnixListener, admin: AdminState, header_read: std::time::Duration) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let accept_errors = std::sync::atomic::AtomicU64::new(0);
    let mut backoff = crate::proxy::listener::Backoff::new(&accept_errors);
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                backoff.failed(&e, "the admin socket").await;
                continue;
            }
        };
        backoff.succeeded();
        if let Err(e) = crate::peer::check_root(&conn) {
            tracing::warn!(error = %e, "refusing an admin client");
            continue;
        }
        let Ok(place) = places.clone().acquire_owned().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _place = place;
            let (r, mut w) = conn.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r.take(MAX_REQUEST_LINE));
            let read = reader.read_line(&mut line);
            let body = match tokio::time::timeout(header_read, read).await {
                Ok(Ok(_)) => match line.trim().strip_prefix("GET ") {
                    Some(path) => answer(&admin, path.trim()).await,
                    None => json!({"error": "expected a request line `GET /path`"}),
                },
                Ok(Err(_)) => return,
                Err(_) => json!({"error": "no request line within the header read timeout"}),
            };
            // A client that does not read its answer does not keep the place either.
            let answer = format!("{body}\n");
            let _ = tokio::time::timeout(header_read, w.write_all(answer.as_bytes())).await;
        });
    }
}

async fn answer(admin: &AdminState, path: &str) -> Value {
    match path {
        "/ready" => json!({"ready": admin.status.load().ready}),
        "/status" => json!(*admin.status.load_full()),
        "/services" => {
            let st = admin.state.load();
            let svcs: Vec<_> = st
                .services
                .values()
                .map(|s| json!({"name": s.name, "address": s.addr.vip.to_string(), "protocol": s.addr.protocol, "endpoints": s.endpoints}))
                .collect();
            json!({"generation": st.generation, "services": svcs})
        }
        "/workloads" => {
            let st = admin.state.load();
            let enrolled = &admin.status.load().enrolled;
            let ws: Vec<_> = st
                .local
                .values()
                .map(|w| json!({"name": w.id(), "ip": w.ip.to_string(), "meshed": w.meshed, "agent_down": w.agent_down, "enrolled": enrolled.contains(&w.id()), "service_account": w.service_account}))
                .collect();
            json!({"node": st.node, "workloads": ws})
        }
        "/stats" => {
            let dp = admin.datapath.lock().await;
            let ebpf: serde_json::Map<String, Value> = dp
                .stats()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect();
            let proxy: serde_json::Map<String, Value> = admin
                .metrics
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect();
            json!({"ebpf": ebpf, "proxy": proxy})
        }
        "/maps" => {
            let dp = admin.datapath.lock().await;
            let services: Vec<_> = dp
                .dump_services()
                .into_iter()
                .map(|(vip, proto, id, eps)| json!({"address": vip.to_string(), "proto": proto, "id": id, "endpoints": eps.iter().map(ToString::to_string).collect::<Vec<_>>()}))
                .collect();
            json!({"pin_root": dp.pin_root().display().to_string(), "services": services})
        }
        "/certificates" => {
            let st = admin.state.load();
            let ids = &admin.identities;
            let now = crate::identity::unix_now();
            let held: Vec<_> = ids
                .store
                .list()
                .into_iter()
                .map(|(id, nb, na)| json!({"identity": id, "not_before": nb, "not_after": na, "expires_in_s": na - now}))
                .collect();
            json!({
                "trust_domain": st.trust_domain,
                "source": ids.source(),
                "roots": ids.store.roots().map_or(0, |r| r.len()),
                "certificates": held,
                "pending": ids.pending(),
            })
        }
        "/tunnels" => json!({
            "pooled_connections": admin.tunnels.pool.len(),
            "accepted": admin.tunnels.accepted.list(),
        }),
        other => {
            json!({"error": format!("unknown path {other}; try /ready, /status, /services, /workloads, /stats, /maps, /certificates, /tunnels")})
        }
    }
}

/// Send one request to the admin socket at `path` and return the JSON answer.
pub fn request(path: &Path, what: &str) -> std::io::Result<Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(format!("GET {what}\n").as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
