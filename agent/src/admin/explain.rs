//! `/explain` (`weftctl explain`): what would happen to a request from a pod of this node
//! to a destination, step by step, without sending anything: what the eBPF connect hook
//! does with it (from the kernel's own map), the service, the HTTPRoute rule and backend,
//! the endpoint the balancer prefers right now, the authorization verdict, and the
//! identities and certificates that would be used. Every step is computed by the same
//! code the proxy runs (route plan, policy decision, balancer costs) on the same state.

use std::{net::SocketAddrV4, str::FromStr as _};

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap, Method, Uri,
};
use serde_json::{json, Value};

use crate::{
    config::{
        authz::{Http, Request},
        Protocol,
    },
    state::{NodeState, ServiceEntry},
    traffic::now_ns,
};

/// What to explain.
#[derive(Debug)]
pub struct Ask {
    /// `namespace/name` of the client pod.
    pub source: String,
    /// `IP:PORT`, `IP` (port 80), or a Service as `name[.namespace][:port]`.
    pub destination: String,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

impl Ask {
    /// From `/explain`'s query string.
    pub fn from_query(q: &str) -> Result<Self, String> {
        let mut ask = Self {
            source: String::new(),
            destination: String::new(),
            method: Method::GET,
            path: "/".into(),
            headers: HeaderMap::new(),
        };
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::telemetry::tap::percent_decode(v);
            match k {
                "source" => ask.source = v,
                "destination" => ask.destination = v,
                "method" => {
                    ask.method = Method::from_str(&v)
                        .map_err(|_| format!("method {v:?} is not a method"))?;
                }
                "path" => ask.path = v,
                "header" => {
                    let (n, val) = v
                        .split_once(':')
                        .ok_or_else(|| format!("header {v:?}: give NAME:VALUE"))?;
                    let name = HeaderName::from_str(n.trim())
                        .map_err(|_| format!("header name {n:?} is not valid"))?;
                    let val = HeaderValue::from_str(val.trim())
                        .map_err(|_| format!("header value of {n} is not valid"))?;
                    ask.headers.append(name, val);
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; use source, destination, method, path, header"
                    ))
                }
            }
        }
        if ask.source.is_empty() || ask.destination.is_empty() {
            return Err(
                "give source=NAMESPACE/POD and destination=IP:PORT or SERVICE[:PORT]".into(),
            );
        }
        if !ask.path.starts_with('/') {
            return Err(format!("path {:?} must start with /", ask.path));
        }
        Ok(ask)
    }
}

/// What the caller knows besides the state: whether the source pod is enrolled, what the
/// kernel's service map says of the destination, and the source's certificate.
pub struct Facts {
    pub enrolled: bool,
    pub kernel: Option<(u32, u32)>,
    /// Seconds until the source identity's certificate expires, if this agent holds one.
    pub cert_expires_in: Option<i64>,
}

/// The destination as an address, if it is one of a service or a pod.
pub fn resolve(st: &NodeState, dst: &str, source_ns: &str) -> Result<SocketAddrV4, String> {
    if let Ok(a) = dst.parse::<SocketAddrV4>() {
        return Ok(a);
    }
    if let Ok(ip) = dst.parse() {
        return Ok(SocketAddrV4::new(ip, 80));
    }
    let (name, port) = match dst.rsplit_once(':') {
        Some((n, p)) => (
            n,
            p.parse::<u16>()
                .map_err(|_| format!("{dst:?}: the port must be a number"))?,
        ),
        None => (dst, 80),
    };
    let (name, ns) = name.split_once('.').unwrap_or((name, source_ns));
    st.service_in(ns, name, port)
        .map(|s| s.addr.vip)
        .ok_or_else(|| format!("no Service {ns}/{name} with port {port}"))
}

/// The explanation, as JSON with `steps` a person reads in order.
pub fn explain(st: &NodeState, ask: &Ask, facts: &Facts) -> Result<Value, String> {
    let w = st
        .workloads
        .values()
        .find(|w| w.id() == ask.source)
        .ok_or_else(|| format!("no workload {} in the configuration", ask.source))?;
    if w.node != st.node {
        return Err(format!(
            "{} runs on node {}: ask that node's agent (weftctl --node {} explain ...)",
            ask.source, w.node, w.node
        ));
    }
    let dst = resolve(st, &ask.destination, &w.namespace)?;
    let source_id = st.identities.get(&w.ip);
    let mut steps = Vec::new();
    let source = json!({
        "pod": w.id(),
        "ip": w.ip.to_string(),
        "meshed": w.meshed,
        "enrolled": facts.enrolled,
        "identity": source_id.map(ToString::to_string),
        "certificate_expires_in_s": facts.cert_expires_in,
    });
    let svc = st.service(dst, Protocol::Tcp);
    // 1. The connect hook.
    let datapath = match (svc, w.meshed, facts.enrolled) {
        (None, _, _) => {
            steps.push(format!("{dst} is not a service address: connect4 leaves the connect as it is and it goes straight to that address"));
            "not-a-service"
        }
        (Some(_), true, true) => {
            steps.push(format!("connect4 sees {} connect to {dst}, a service address, and rewrites it to the agent's listener 127.0.0.1:15001 in the pod (captured), recording {dst} as the original destination", w.id()));
            "captured"
        }
        (Some(_), true, false) => {
            let what = match w.agent_down {
                crate::config::AgentDown::FailClosed => "refused (fail-closed)",
                crate::config::AgentDown::FailOpen => {
                    "load-balanced by the kernel, bypassing the mesh (fail-open)"
                }
            };
            steps.push(format!(
                "{} is meshed but the agent holds no listener in it yet: the connect is {what}",
                w.id()
            ));
            "not-enrolled"
        }
        (Some(s), false, _) => {
            steps.push(format!("{} is not meshed: connect4 picks one of the {} endpoints of {} in the kernel and connects straight to it (socket load balancing)", w.id(), s.endpoints.len(), s.name));
            "socket-lb"
        }
    };
    match (svc.is_some(), facts.kernel) {
        (true, Some((id, n))) => steps.push(format!("the kernel's service map has {dst} as service id {id} with {n} endpoint(s)")),
        (true, None) => steps.push(format!("WARNING: the kernel's service map lacks {dst}: the maps disagree with the configuration (see weftctl status)")),
        _ => {}
    }
    let mut out = json!({
        "source": source,
        "destination": {"address": dst.to_string(), "service": svc.map(|s| s.name.clone())},
        "datapath": datapath,
    });
    let Some(svc) = svc else {
        out["outcome"] = json!(direct_outcome(st, dst, &mut steps));
        out["steps"] = json!(steps);
        return Ok(out);
    };
    if datapath != "captured" {
        out["outcome"] = json!(if datapath == "socket-lb" {
            "connected directly to an endpoint by the kernel"
        } else {
            "not through the proxy"
        });
        out["steps"] = json!(steps);
        return Ok(out);
    }
    // 2. Routing.
    let uri: Uri = ask
        .path
        .parse()
        .map_err(|_| format!("path {:?} is not a valid request target", ask.path))?;
    // The source's namespace may have consumer routes for this service.
    let plan = svc.routes_for(Some(&w.namespace));
    let (backends, route) = if plan.is_empty() {
        steps.push(format!(
            "{} has no HTTPRoute: every request goes to the service itself",
            svc.name
        ));
        (vec![(Some(svc.addr), 1u32)], None)
    } else {
        match plan.select(&ask.method, &uri, &ask.headers) {
            None => {
                steps.push(format!("no rule of the HTTPRoutes of {} ({}) matches {} {}: the proxy answers 404 no-route", svc.name, plan.route_names().join(", "), ask.method, ask.path));
                out["route"] = Value::Null;
                out["outcome"] = json!("answered 404 no-route by the proxy");
                out["steps"] = json!(steps);
                return Ok(out);
            }
            Some(sel) => {
                if let Some(r) = &sel.rule.redirect {
                    steps.push(format!(
                        "HTTPRoute {} matches and redirects ({})",
                        sel.rule.route, r.status
                    ));
                    out["route"] = json!(&*sel.rule.route);
                    out["outcome"] = json!(format!("answered {} redirect by the proxy", r.status));
                    out["steps"] = json!(steps);
                    return Ok(out);
                }
                steps.push(format!(
                    "HTTPRoute {} matches {} {}",
                    sel.rule.route, ask.method, ask.path
                ));
                (sel.rule.backends.clone(), Some(sel.rule.route.clone()))
            }
        }
    };
    out["route"] = json!(route.as_deref());
    let total: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut listed = Vec::new();
    for (addr, weight) in &backends {
        let name = addr.and_then(|a| st.services.get(&a)).map_or_else(
            || "(a Service that does not exist)".to_owned(),
            |s| s.name.to_string(),
        );
        let pct = if total == 0 {
            0.0
        } else {
            f64::from(*weight) * 100.0 / total as f64
        };
        listed.push(json!({"service": name, "weight": weight, "percent": pct}));
    }
    if backends.len() > 1 {
        let parts: Vec<String> = listed
            .iter()
            .map(|b| {
                format!(
                    "{} {:.0}%",
                    b["service"].as_str().unwrap_or("-"),
                    b["percent"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        steps.push(format!("backends by weight: {}", parts.join(", ")));
    }
    out["backends"] = json!(listed);
    // The backend explained further: the heaviest.
    let heaviest = backends.iter().max_by_key(|(_, w)| *w);
    let Some(backend) = heaviest.and_then(|(a, _)| a.and_then(|a| st.services.get(&a))) else {
        let (status, reason, why) = if heaviest.is_some_and(|(a, _)| a.is_none()) {
            (
                500,
                "backend-not-found",
                "names a Service that is not declared",
            )
        } else {
            (503, "no-backend", "is gone from this node's state")
        };
        steps.push(format!(
            "the chosen backend Service {why}: the proxy answers {status} {reason}"
        ));
        out["outcome"] = json!(format!("answered {status} {reason} by the proxy"));
        out["steps"] = json!(steps);
        return Ok(out);
    };
    // 3. The endpoint.
    let Some(ep) = preferred(backend) else {
        let q = if backend.quarantined.is_empty() {
            String::new()
        } else {
            format!(" ({} quarantined)", backend.quarantined.len())
        };
        steps.push(format!(
            "{} has no endpoint{q}: the proxy answers 503 no-healthy-endpoint",
            backend.name
        ));
        out["outcome"] = json!("answered 503 no-healthy-endpoint by the proxy");
        out["steps"] = json!(steps);
        return Ok(out);
    };
    let now = now_ns();
    let reach = if st.local.contains_key(ep.addr.ip()) {
        "on this node: delivered into its pod by this agent".to_owned()
    } else if ep.meshed {
        match st.tunnel_to(*ep.addr.ip()) {
            Some((id, node)) => format!("on another node: through the mTLS tunnel to the agent at {node}:15008, which must prove {id}"),
            None => "on another node, with no identity known: the tunnel cannot be used".to_owned(),
        }
    } else {
        "not meshed: connected to directly from the client pod".to_owned()
    };
    steps.push(format!(
        "{} balances over {} endpoint(s) ({:?}); right now it prefers {} ({}, latency estimate {:.2} ms{}): {reach}",
        backend.name,
        backend.endpoints.len(),
        backend.policy.balancer,
        ep.addr,
        ep.workload,
        ep.stats.cost(now) / 1e6,
        if ep.stats.is_ejected(now) { ", EJECTED" } else { "" }
    ));
    out["endpoint"] = json!({
        "address": ep.addr.to_string(),
        "workload": ep.workload,
        "node": ep.node,
        "identity": ep.identity.as_deref(),
        "reach": reach,
        "candidates": backend.endpoints.len(),
        "balancer": backend.policy.balancer,
    });
    // 4. Authorization, as the proxy judges it before sending.
    let d = st.authorize(
        *ep.addr.ip(),
        &Request {
            source: source_id,
            port: ep.addr.port(),
            http: Http::Known {
                method: ask.method.as_str(),
                path: ask.path.as_str(),
                headers: &ask.headers,
            },
        },
    );
    let verdict = if d.denied.is_some() { "deny" } else { "allow" };
    match (&d.denied, st.authz.contains_key(ep.addr.ip())) {
        (Some(why), _) => steps.push(format!(
            "authorization: DENIED ({why}): the proxy answers 403 policy-denied"
        )),
        (None, true) => steps.push(
            "authorization: allowed by the AuthorizationPolicies of the endpoint's workload".into(),
        ),
        (None, false) => steps.push(
            "authorization: no AuthorizationPolicy selects the endpoint's workload: allowed".into(),
        ),
    }
    if let Some(why) = &d.would_deny {
        steps.push(format!("a dryRun policy would deny it: {why}"));
    }
    for p in &d.audited {
        steps.push(format!("AUDIT policy {p} matches: logged"));
    }
    out["policy"] = json!({"verdict": verdict, "denied": d.denied, "would_deny": d.would_deny, "audited": d.audited});
    if let (Some(src), Some(dst_id)) = (source_id, ep.identity.as_deref()) {
        let cert = facts.cert_expires_in.map_or_else(
            || "which this agent does not hold yet".to_owned(),
            |s| format!("whose certificate expires in {s} s"),
        );
        steps.push(format!("identities: {src} ({cert}) to {dst_id}; the app sees x-forwarded-client-cert with both"));
    }
    out["outcome"] = json!(if d.denied.is_some() {
        "answered 403 policy-denied by the proxy".to_owned()
    } else {
        format!("sent to {} ({})", ep.addr, ep.workload)
    });
    out["steps"] = json!(steps);
    Ok(out)
}

/// The endpoint the balancer would most likely pick now: the cheapest one not ejected
/// (or any, when all are).
fn preferred(svc: &ServiceEntry) -> Option<&crate::state::Endpoint> {
    let now = now_ns();
    let cost = |e: &&crate::state::Endpoint| e.stats.cost(now);
    let pick = |healthy: bool| {
        svc.endpoints
            .iter()
            .filter(|e| !healthy || !e.stats.is_ejected(now))
            .min_by(|a, b| cost(a).total_cmp(&cost(b)))
    };
    pick(true).or_else(|| pick(false))
}

/// What happens to a connection straight to a pod's address.
fn direct_outcome(st: &NodeState, dst: SocketAddrV4, steps: &mut Vec<String>) -> String {
    let Some(w) = st.workloads.get(dst.ip()) else {
        steps.push(format!("{dst} is not a workload of the configuration either: routed by the node as any address"));
        return "not through the mesh".into();
    };
    if !w.meshed {
        steps.push(format!(
            "{} is not meshed: the connection reaches it directly",
            w.id()
        ));
        return format!("connected directly to {}", w.id());
    }
    steps.push(format!("at {}, sk_lookup steers the connection to its node's agent ({}): it arrives as plaintext from outside the mesh", w.id(), w.node));
    if w.quarantine.is_some() {
        steps.push(format!(
            "{} is QUARANTINED: refused unless from its own node or an allowed debug source",
            w.id()
        ));
    }
    match w.mtls {
        crate::config::Mtls::Strict => {
            steps.push("it is STRICT: plaintext from outside the mesh is refused".into());
            "refused (STRICT)".into()
        }
        crate::config::Mtls::Permissive => {
            steps.push("it is PERMISSIVE: delivered, judged by its AuthorizationPolicies as a source without identity".into());
            format!("delivered to {} as plaintext", w.id())
        }
    }
}
