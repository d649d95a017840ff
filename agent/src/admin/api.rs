//! The admin API's paths and their answers. Everything is JSON except `/metrics`
//! (Prometheus text) and `/tap` (a stream of JSON lines). [`PATHS`] lists them all, with
//! what each answers; an unknown path gets 404 with that list.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::{Frame, Incoming},
    header::{HeaderValue, CONTENT_TYPE},
    Method, Request, Response, StatusCode,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use super::{AdminState, Change, Control, Scope};
use crate::{
    config::route::TlsRoute,
    metrics::Kind,
    telemetry::{families::Sample, tap::Filter},
};

pub type Body = BoxBody<Bytes, Infallible>;

/// Every path, and what it answers.
pub const PATHS: &[(&str, &str)] = &[
    (
        "/ready",
        "200 once the agent captures in every enrolled pod, else 503",
    ),
    ("/live", "200 while the agent answers"),
    ("/version", "the agent's version"),
    (
        "/status",
        "readiness, configuration generation and source, last refused change, limits",
    ),
    (
        "/workloads",
        "this node's workloads and whether they are enrolled",
    ),
    (
        "/services",
        "services with their endpoints, health and ejection",
    ),
    ("/stats", "eBPF and proxy counters"),
    (
        "/stats/services",
        "golden signals per service over the last minute: requests per second, success rate, latency quantiles",
    ),
    (
        "/maps",
        "the eBPF programs loaded and the service map as the kernel holds them",
    ),
    ("/routes", "the HTTPRoute rules of every service, as compiled"),
    (
        "/policies",
        "AuthorizationPolicies and the workloads of this node they select",
    ),
    (
        "/config",
        "the configuration in force as this node sees it: generation, source, workloads, services, routes, policies",
    ),
    (
        "/log-level",
        "GET the log filter; PUT ?level=debug (any RUST_LOG filter) to change it",
    ),
    (
        "/certificates",
        "workload certificates held, expiry, missing ones",
    ),
    ("/tunnels", "tunnel connections from other nodes' agents"),
    (
        "/connections",
        "connections held now against the node's limit, and by each enrolled pod against its own",
    ),
    ("/metrics", "Prometheus text format"),
    (
        "/explain",
        "what a request would meet, without sending it: ?source=NS/POD&destination=ADDR|SERVICE[:PORT]&method=&path=&header=NAME:VALUE",
    ),
    (
        "/events",
        "pre-fault warnings about endpoints and what came of them, oldest first",
    ),
    (
        "/tap",
        "live requests as JSON lines; filters: workload, service, path, status, seconds",
    ),
    (
        "/quarantine",
        "POST {\"pod\",\"reason\",\"allowFrom\"} quarantines a pod; DELETE ?pod=ns/name lifts it",
    ),
];

/// The largest request body read (a quarantine request).
const MAX_BODY: usize = 16 * 1024;

/// `name`'s value in a query string, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == name).then(|| crate::telemetry::tap::percent_decode(v))
    })
}

/// `POST /quarantine` with `{"pod": "ns/name", "reason": "...", "allowFrom": [...]}`.
async fn quarantine(admin: &AdminState, req: Request<Incoming>) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Ask {
        pod: String,
        reason: String,
        #[serde(default)]
        allow_from: Vec<String>,
    }
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = match tokio::time::timeout(Duration::from_secs(10), body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("reading the request: {e}")),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within 10 s".into(),
            )
        }
    };
    let ask: Ask = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{e}: send {{\"pod\": \"namespace/name\", \"reason\": \"...\", \"allowFrom\": [\"10.0.0.0/8\", \"spiffe://...\"]}}"),
            )
        }
    };
    let quarantine = crate::config::quarantine::Quarantine {
        reason: ask.reason,
        allow_from: ask.allow_from,
        set_by: crate::config::quarantine::SetBy::Weftctl,
    };
    change(
        admin,
        Change::Quarantine {
            pod: ask.pod,
            quarantine,
        },
    )
    .await
}

/// Hand `what` to the control loop and answer with what it made of it.
async fn change(admin: &AdminState, what: Change) -> Response<Body> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if admin.control.send(Control { what, reply }).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".into(),
        );
    }
    match answer.await {
        Ok(Ok(generation)) => ok(json!({ "config_generation": generation })),
        Ok(Err(e)) => error(StatusCode::CONFLICT, e),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".into(),
        ),
    }
}

/// The longest a tap stream runs unless `seconds` says otherwise (and at most).
const TAP_DEFAULT: Duration = Duration::from_secs(600);
const TAP_MAX: Duration = Duration::from_secs(3600);

pub async fn answer(admin: &AdminState, scope: Scope, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if scope == Scope::Metrics && !matches!(path.as_str(), "/metrics" | "/ready" | "/live") {
        return error(
            StatusCode::NOT_FOUND,
            format!("{path}: this port serves /metrics, /ready and /live; the rest of the admin API is on the agent's Unix socket"),
        );
    }
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/quarantine") => return quarantine(admin, req).await,
        (Method::DELETE, "/quarantine") => {
            let pod = query_value(req.uri().query().unwrap_or(""), "pod");
            return change(
                admin,
                Change::Unquarantine {
                    pod: pod.unwrap_or_default(),
                },
            )
            .await;
        }
        (Method::PUT, "/log-level") => {
            let level = query_value(req.uri().query().unwrap_or(""), "level").unwrap_or_default();
            return match admin.log_level.set(&level) {
                Ok(now) => ok(json!({ "level": now })),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            };
        }
        (Method::GET | Method::HEAD, _) => {}
        (m, p) => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{m} {p} is not served; every path is GET but /quarantine (POST to set, DELETE ?pod= to lift)"),
            )
        }
    }
    let query = req.uri().query().unwrap_or("");
    match path.as_str() {
        "/ready" => {
            let ready = admin.status.load().ready;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &json!({ "ready": ready }))
        }
        "/live" => json_response(StatusCode::OK, &json!({ "live": true })),
        "/version" => ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "abi": weft_common::ABI_VERSION,
        })),
        "/status" => ok(json!(*admin.status.load_full())),
        "/services" => ok(services(admin)),
        "/workloads" => ok(workloads(admin)),
        "/stats" => ok(stats(admin).await),
        "/stats/services" => ok(json!({
            "window_s": (crate::telemetry::window::STEP * (crate::telemetry::window::KEPT as u32 - 1)).as_secs(),
            "services": admin.telemetry.windows.signals(&admin.state.load()),
        })),
        "/maps" => ok(maps(admin).await),
        "/certificates" => ok(certificates(admin)),
        "/tunnels" => ok(json!({
            "pooled_connections": admin.tunnels.pool.len(),
            "accepted": admin.tunnels.accepted.list(),
        })),
        "/connections" => {
            let st = admin.state.load();
            let mut pods: Vec<Value> = admin
                .pods
                .load()
                .values()
                .map(|p| {
                    json!({
                        "pod": st.local.get(&p.ip).map(|w| w.id()),
                        "ip": p.ip.to_string(),
                        "held": p.conns.held(),
                    })
                })
                .collect();
            pods.sort_by_key(|p| std::cmp::Reverse(p["held"].as_u64()));
            ok(json!({
                "held": admin.conns.held(),
                "limit": admin.conns.limits().per_node,
                "per_pod_limit": admin.conns.limits().per_pod,
                "pods": pods,
            }))
        }
        "/metrics" => {
            let samples = scrape_time(admin).await;
            let text = admin.telemetry.families.encode(samples);
            let mut r = Response::new(full(text));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/tap" => tap(admin, query),
        "/routes" => ok(routes(admin)),
        "/policies" => ok(policies(admin)),
        "/config" => ok(config(admin)),
        "/log-level" => ok(json!({ "level": admin.log_level.get() })),
        "/explain" => explain(admin, query).await,
        "/events" => ok(json!({ "events": admin.telemetry.events.list() })),
        other => {
            let known: Vec<Value> = PATHS
                .iter()
                .map(|(p, what)| json!({"path": p, "answers": what}))
                .collect();
            json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("unknown path {other}"), "paths": known}),
            )
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ok(v: Value) -> Response<Body> {
    json_response(StatusCode::OK, &v)
}

fn error(status: StatusCode, msg: String) -> Response<Body> {
    json_response(status, &json!({ "error": msg }))
}

fn services(admin: &AdminState) -> Value {
    let st = admin.state.load();
    let svcs: Vec<_> = st
        .services
        .values()
        .map(|s| {
            json!({
                "name": s.name,
                "address": s.addr.vip.to_string(),
                "protocol": s.addr.protocol,
                "routes": s.routes.route_names(),
                "balancer": s.policy.balancer,
                "endpoints": s.endpoints,
                "quarantined": s.quarantined,
            })
        })
        .collect();
    json!({"generation": st.generation, "services": svcs})
}

fn routes(admin: &AdminState) -> Value {
    let st = admin.state.load();
    let name = |a| {
        st.services
            .get(&a)
            .map_or_else(|| "(missing Service)".to_owned(), |s| s.name.to_string())
    };
    let services: Vec<Value> = st
        .services
        .values()
        .filter(|s| !s.routes.is_empty() || !s.tls_routes.is_empty() || !s.consumers.is_empty())
        .map(|s| {
            let tls = |rs: &[Arc<TlsRoute>]| {
                rs.iter()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .collect::<Vec<_>>()
            };
            // Consumer routes: what clients of each of those namespaces get instead.
            let consumers: Vec<Value> = s
                .consumers
                .iter()
                .map(|c| {
                    json!({
                        "namespace": c.namespace,
                        "rules": c.routes.describe(name),
                        "tls_routes": tls(&c.tls_routes),
                    })
                })
                .collect();
            json!({
                "service": s.name,
                "address": s.addr.vip.to_string(),
                "rules": s.routes.describe(name),
                "tls_routes": tls(&s.tls_routes),
                "consumers": consumers,
            })
        })
        .collect();
    json!({"generation": st.generation, "services": services})
}

fn policies(admin: &AdminState) -> Value {
    let st = admin.state.load();
    let mut by_policy: std::collections::BTreeMap<String, (Value, Vec<String>)> =
        std::collections::BTreeMap::new();
    for (ip, ps) in st.authz.iter() {
        let Some(w) = st.local.get(ip) else { continue };
        for p in &ps.0 {
            by_policy
                .entry(p.id())
                .or_insert_with(|| {
                    (
                        json!({
                            "name": p.id(),
                            "action": p.action,
                            "dry_run": p.dry_run,
                            "rules": p.rules.len(),
                        }),
                        vec![],
                    )
                })
                .1
                .push(w.id());
        }
    }
    let list: Vec<Value> = by_policy
        .into_values()
        .map(|(mut p, ws)| {
            p["selects"] = json!(ws);
            p
        })
        .collect();
    json!({"trust_domain": st.trust_domain, "policies": list})
}

fn config(admin: &AdminState) -> Value {
    let status = admin.status.load();
    json!({
        "generation": status.config_generation,
        "source": status.config_source,
        "last_config_error": status.last_config_error,
        "rejected": status.rejected,
        "node": admin.state.load().node,
        "workloads": workloads(admin)["workloads"],
        "services": services(admin)["services"],
        "routes": routes(admin)["services"],
        "policies": policies(admin)["policies"],
    })
}

fn workloads(admin: &AdminState) -> Value {
    let st = admin.state.load();
    let enrolled = &admin.status.load().enrolled;
    let ws: Vec<_> = st
        .local
        .values()
        .map(|w| {
            json!({
                "name": w.id(),
                "workload": crate::telemetry::canonical_name(w),
                "ip": w.ip.to_string(),
                "meshed": w.meshed,
                "agent_down": w.agent_down,
                "mtls": w.mtls,
                "enrolled": enrolled.contains(&w.id()),
                "service_account": w.service_account,
                "identity": st.identities.get(&w.ip).map(ToString::to_string),
                "quarantine": w.quarantine.as_deref(),
            })
        })
        .collect();
    json!({"node": st.node, "workloads": ws})
}

async fn stats(admin: &AdminState) -> Value {
    let ebpf: serde_json::Map<String, Value> = admin
        .datapath
        .lock()
        .await
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

async fn maps(admin: &AdminState) -> Value {
    let dp = admin.datapath.lock().await;
    let services: Vec<_> = dp
        .dump_services()
        .into_iter()
        .map(|(vip, proto, id, eps)| {
            json!({
                "address": vip.to_string(),
                "proto": proto,
                "id": id,
                "endpoints": eps.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    let cap = dp.capacity();
    json!({
        "pin_root": dp.pin_root().display().to_string(),
        "attachment": dp.attachment,
        "programs": dp.programs(),
        "capacity": {"services": cap.services, "endpoints": cap.endpoints},
        "services": services,
    })
}

fn certificates(admin: &AdminState) -> Value {
    let st = admin.state.load();
    let ids = &admin.identities;
    let now = crate::identity::unix_now();
    let held: Vec<_> = ids
        .store
        .list()
        .into_iter()
        .map(|(id, nb, na)| {
            json!({"identity": id, "not_before": nb, "not_after": na, "expires_in_s": na - now})
        })
        .collect();
    json!({
        "trust_domain": st.trust_domain,
        "source": ids.source(),
        "roots": ids.store.roots().map_or(0, |r| r.len()),
        "certificates": held,
        "pending": ids.pending(),
    })
}

async fn explain(admin: &AdminState, query: &str) -> Response<Body> {
    let ask = match super::explain::Ask::from_query(query) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let st = admin.state.load_full();
    let source = st.workloads.values().find(|w| w.id() == ask.source);
    let ns = source.map_or("default", |w| w.namespace.as_str());
    let kernel = match super::explain::resolve(&st, &ask.destination, ns) {
        Ok(dst) => admin
            .datapath
            .lock()
            .await
            .lookup_service(dst, crate::config::Protocol::Tcp),
        Err(_) => None,
    };
    let source_id = source.and_then(|w| st.identities.get(&w.ip));
    let now = crate::identity::unix_now();
    let facts = super::explain::Facts {
        enrolled: admin.status.load().enrolled.contains(&ask.source),
        kernel,
        cert_expires_in: admin
            .identities
            .store
            .list()
            .into_iter()
            .find(|(id, _, _)| Some(id) == source_id)
            .map(|(_, _, not_after)| not_after - now),
    };
    match super::explain::explain(&st, &ask, &facts) {
        Ok(v) => ok(v),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

/// What `/metrics` reads at scrape time: the eBPF counters and the agent's health.
async fn scrape_time(admin: &AdminState) -> Vec<Sample> {
    let sample = |name, help, kind, labels: Vec<(&'static str, String)>, value: f64| Sample {
        name,
        help,
        kind,
        labels,
        value,
    };
    let mut out = Vec::new();
    let (ebpf, cap) = {
        let dp = admin.datapath.lock().await;
        (dp.stats(), dp.capacity())
    };
    for (name, v) in ebpf {
        out.push(sample(
            "ebpf_events",
            "Events counted by the eBPF programs (all CPUs), by event.",
            Kind::Counter,
            vec![("event", name.to_owned())],
            v as f64,
        ));
    }
    let status = admin.status.load();
    out.push(sample(
        "ready",
        "1 while the agent captures in every enrolled pod.",
        Kind::Gauge,
        vec![],
        f64::from(u8::from(status.ready)),
    ));
    out.push(sample(
        "config_generation",
        "The configuration generation in force (bumped on every accepted change).",
        Kind::Gauge,
        vec![],
        status.config_generation as f64,
    ));
    out.push(sample(
        "config_reload_errors",
        "Configuration changes refused (the last good configuration stayed in force).",
        Kind::Counter,
        vec![],
        status.config_reload_errors as f64,
    ));
    out.push(sample(
        "config_last_reload_failed",
        "1 when the latest configuration change was refused.",
        Kind::Gauge,
        vec![],
        f64::from(u8::from(status.last_config_error.is_some())),
    ));
    out.push(sample(
        "config_objects_rejected",
        "Objects of the configuration in force that were refused (each keeps its last accepted version, if any).",
        Kind::Gauge,
        vec![],
        status.rejected.len() as f64,
    ));
    out.push(sample(
        "enrolled_workloads",
        "Pods of this node the agent captures for.",
        Kind::Gauge,
        vec![],
        status.enrolled.len() as f64,
    ));
    let st = admin.state.load();
    out.push(sample(
        "quarantined_workloads",
        "Pods of this node in quarantine.",
        Kind::Gauge,
        vec![],
        st.local.values().filter(|w| w.quarantine.is_some()).count() as f64,
    ));
    for w in st.local.values().filter(|w| w.quarantine.is_some()) {
        out.push(sample(
            "workload_quarantined",
            "1 for each pod of this node in quarantine (out of balancing and new inbound traffic).",
            Kind::Gauge,
            vec![("workload", w.id())],
            1.0,
        ));
    }
    let endpoints: usize = st.services.values().map(|s| s.endpoints.len()).sum();
    for (map, n, capacity) in [
        ("services", st.services.len(), cap.services),
        ("endpoints", endpoints, cap.endpoints),
    ] {
        out.push(sample(
            "bpf_map_entries",
            "Entries the agent keeps in a service map of the kernel.",
            Kind::Gauge,
            vec![("map", map.to_owned())],
            n as f64,
        ));
        out.push(sample(
            "bpf_map_capacity",
            "The most entries a service map of the kernel holds.",
            Kind::Gauge,
            vec![("map", map.to_owned())],
            f64::from(capacity),
        ));
    }
    out.push(sample(
        "connections_held",
        "Connections the proxy holds now, against --max-connections.",
        Kind::Gauge,
        vec![],
        f64::from(admin.conns.held()),
    ));
    out.push(sample(
        "connections_limit",
        "The most connections the proxy holds at once (--max-connections).",
        Kind::Gauge,
        vec![],
        f64::from(admin.conns.limits().per_node),
    ));
    for (id, _, not_after) in admin.identities.store.list() {
        out.push(sample(
            "certificate_expiration_timestamp_seconds",
            "When a workload certificate the agent holds expires (Unix time).",
            Kind::Gauge,
            vec![("identity", id.to_string())],
            not_after as f64,
        ));
    }
    out
}

/// A live stream of records matching the query's filters, one JSON object per line,
/// for `seconds` (default 600, at most 3600) or until the client goes away.
fn tap(admin: &AdminState, query: &str) -> Response<Body> {
    let mut seconds = None;
    let filters: Vec<&str> = query
        .split('&')
        .filter(|p| match p.strip_prefix("seconds=") {
            Some(n) => {
                seconds = Some(n.parse::<u64>().map_err(|_| n.to_owned()));
                false
            }
            None => true,
        })
        .collect();
    let duration = match seconds {
        None => TAP_DEFAULT,
        Some(Ok(n)) => Duration::from_secs(n).min(TAP_MAX),
        Some(Err(n)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("seconds={n}: give a whole number of seconds"),
            )
        }
    };
    let filter = match Filter::from_query(&filters.join("&")) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(mut records) = admin.telemetry.tap.subscribe() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} taps are open on this agent already; try again when one ends",
                crate::telemetry::tap::MAX_LISTENERS
            ),
        );
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(duration);
        tokio::pin!(deadline);
        loop {
            let line = tokio::select! {
                () = &mut deadline => return,
                () = tx.closed() => return,
                r = records.recv() => match r {
                    Ok(rec) if filter.matches(&rec) => serde_json::to_vec(&*rec).ok(),
                    Ok(_) => None,
                    Err(RecvError::Lagged(n)) => serde_json::to_vec(&json!({"kind": "skipped", "records": n})).ok(),
                    Err(RecvError::Closed) => return,
                },
            };
            if let Some(mut line) = line {
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut r = Response::new(Lines(rx).boxed());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// A body of the lines a tap task sends, ending when it stops.
struct Lines(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|l| l.map(|b| Ok(Frame::data(b))))
    }
}
