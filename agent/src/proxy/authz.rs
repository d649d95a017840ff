//! Enforcing `AuthorizationPolicy` (config/authz.rs) where the proxy meets a connection or
//! request to a meshed workload:
//!
//! - the client's agent, for every HTTP request (all fields) and TCP connection (no HTTP
//!   fields) it sends, same node or not: it knows the source pod and its identity;
//! - the destination's agent, for every tunnel stream (the source identity proven by its
//!   certificate; HTTP fields left to the sender) and every plaintext connection from
//!   outside the mesh (no identity).
//!
//! Every denial is logged with both identities and counted in `policy_denied`; dry-run
//! denials in `policy_would_deny`, AUDIT matches in `policy_audited`.

use std::net::{Ipv4Addr, SocketAddrV4};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::{
    config::authz::{Http, Request},
    identity::SpiffeId,
    metrics::Metrics,
    state::NodeState,
};

/// The header the client's agent sets on every HTTP request to a meshed workload, in the
/// shape of Envoy's: `By=<destination identity>;URI=<source identity>`. Whatever a client
/// sent under this name is removed.
pub const CLIENT_CERT_HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Whether `source` may reach `dst` with this request; logs and counts what the policies
/// say besides. A denial is counted by the caller (an HTTP answer counts its reason).
pub fn allowed(
    state: &NodeState,
    inputs: &super::ProxyInputs,
    src_ip: Ipv4Addr,
    source: Option<&SpiffeId>,
    dst: SocketAddrV4,
    http: Http<'_>,
    path: &'static str,
) -> bool {
    let m = &*inputs.metrics;
    let d = state.authorize(
        *dst.ip(),
        &Request {
            source,
            port: dst.port(),
            http,
        },
    );
    // Counted per destination workload wherever a policy selects it.
    if let Some(app) = state.authz_apps.get(dst.ip()) {
        let f = &inputs.telemetry.families;
        f.policy(app, if d.denied.is_some() { "deny" } else { "allow" });
        if d.would_deny.is_some() {
            f.policy(app, "would-deny");
        }
        if !d.audited.is_empty() {
            f.policy(app, "audit");
        }
    }
    if d.denied.is_none() && d.would_deny.is_none() && d.audited.is_empty() {
        // Nothing to log: the common case costs no formatting.
        return true;
    }
    let src = source.map_or_else(|| format!("plaintext from {src_ip}"), ToString::to_string);
    let dst_id = state
        .identities
        .get(dst.ip())
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let (method, uri) = match http {
        Http::Known { method, path, .. } => (method, path),
        _ => ("-", "-"),
    };
    for p in &d.audited {
        Metrics::inc(&m.policy_audited);
        tracing::info!(policy = %p, source = %src, destination = %dst_id, %dst, method, path = uri, via = path, "audit: matched");
    }
    if let Some(why) = &d.would_deny {
        Metrics::inc(&m.policy_would_deny);
        tracing::info!(source = %src, destination = %dst_id, %dst, method, path = uri, via = path, "dry run: would be denied ({why})");
    }
    if let Some(why) = &d.denied {
        tracing::info!(source = %src, destination = %dst_id, %dst, method, path = uri, via = path, "denied: {why}");
        return false;
    }
    true
}

/// The identity header's value for a request from `source` to `destination`, when both are
/// meshed workloads.
pub fn client_identity(
    source: Option<&SpiffeId>,
    destination: Option<&SpiffeId>,
) -> Option<HeaderValue> {
    let (s, d) = (source?, destination?);
    HeaderValue::from_str(&format!("By={d};URI={s}")).ok()
}

/// Replace any client-supplied identity header with `value` (none: removed).
pub fn set_client_identity(headers: &mut HeaderMap, value: Option<&HeaderValue>) {
    headers.remove(&CLIENT_CERT_HEADER);
    if let Some(v) = value {
        headers.insert(CLIENT_CERT_HEADER, v.clone());
    }
}

/// Whether a new connection from `src` (with `identity` when a peer agent proved one) may
/// reach the local pod `dst`: yes unless `dst` is quarantined; then only from the pod
/// itself, from this node (kubelet probes), or from a debug source its quarantine allows.
/// A refusal is counted (`quarantine_refused`).
pub fn quarantine_admits(
    inputs: &super::ProxyInputs,
    state: &NodeState,
    dst: Ipv4Addr,
    src: Ipv4Addr,
    identity: Option<&str>,
) -> bool {
    let Some(q) = state.local.get(&dst).and_then(|w| w.quarantine.as_ref()) else {
        return true;
    };
    if src == dst || inputs.node_addrs.contains(&src) || q.allows(src, identity) {
        return true;
    }
    Metrics::inc(&inputs.metrics.quarantine_refused);
    tracing::debug!(%src, %dst, identity, reason = %q.reason, "quarantined: connection refused");
    false
}
