//! Request and response changes as pure functions over `http` types: path rewrites,
//! hop-by-hop headers, upgrades, and picking a backend by weight (for TLSRoutes; HTTP
//! routes are compiled in plan.rs).

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap,
};

use crate::config::route::{BackendRef, PathRewrite};

/// A backend picked by weight; `roll` is uniform in `0..total weight`.
pub fn pick_backend(backends: &[BackendRef], roll: u64) -> Option<&BackendRef> {
    let mut left = roll;
    for b in backends {
        if left < u64::from(b.weight) {
            return Some(b);
        }
        left -= u64::from(b.weight);
    }
    None
}

pub fn total_weight(backends: &[BackendRef]) -> u64 {
    backends.iter().map(|b| u64::from(b.weight)).sum()
}

/// A backend picked at random by weight.
pub fn choose_backend(backends: &[BackendRef]) -> Option<&BackendRef> {
    pick_backend(backends, fastrand::u64(0..total_weight(backends).max(1)))
}

/// The new path for a rewrite or redirect; `matched` is the rule's PathPrefix that matched.
pub fn rewrite_path(path: &str, rewrite: &PathRewrite, matched: Option<&str>) -> String {
    match rewrite {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(new) => {
            let old = matched.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(old).unwrap_or(path);
            let new = new.trim_end_matches('/');
            match (new.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (true, false) => rest.to_owned(),
                (false, _) => format!("{new}{rest}"),
            }
        }
    }
}

/// Headers that describe one connection (RFC 9110 7.6.1) and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    hyper::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TRANSFER_ENCODING,
    hyper::header::UPGRADE,
    hyper::header::TE,
    hyper::header::TRAILER,
    hyper::header::PROXY_AUTHENTICATE,
    hyper::header::PROXY_AUTHORIZATION,
];

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection and must not be
/// forwarded, nor any header the Connection header names. Most messages carry none, and
/// then nothing is looked up or allocated.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // `te: trailers` is the one TE value that passes (gRPC needs it, RFC 9113 8.2.2).
    let trailers = h
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    let named: Vec<HeaderName> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if trailers {
        h.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` plus an
/// `Upgrade` header), if any.
pub fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    asks.then(|| h.get(hyper::header::UPGRADE).cloned())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_partition_the_rolls() {
        let b = |s: &str, w| BackendRef {
            namespace: "default".into(),
            resolution: crate::config::route::Resolution::Resolved,
            service: s.into(),
            port: 80,
            weight: w,
        };
        let bs = vec![b("v1", 90), b("v2", 10), b("off", 0)];
        assert_eq!(total_weight(&bs), 100);
        let counts = (0..100).fold((0, 0), |(a, c), roll| {
            match pick_backend(&bs, roll).unwrap().service.as_str() {
                "v1" => (a + 1, c),
                _ => (a, c + 1),
            }
        });
        assert_eq!(counts, (90, 10));
    }

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path() {
        let r = PathRewrite::Prefix("/v2".into());
        assert_eq!(rewrite_path("/api/users", &r, Some("/api")), "/v2/users");
        assert_eq!(rewrite_path("/api", &r, Some("/api")), "/v2");
        assert_eq!(
            rewrite_path("/api/users", &PathRewrite::Prefix("/".into()), Some("/api")),
            "/users"
        );
        assert_eq!(
            rewrite_path("/x", &PathRewrite::Full("/y".into()), None),
            "/y"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("x-app", "kept"),
            ("upgrade", "h2c"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-app"));
    }

    #[test]
    fn upgrades_need_both_headers() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        assert_eq!(
            upgrade_of(&h),
            None,
            "Upgrade without Connection: upgrade is not a request to upgrade"
        );
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        assert_eq!(upgrade_of(&h).unwrap(), "websocket");
    }
}
