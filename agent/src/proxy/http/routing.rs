//! Route selection and request/response changes, as pure functions over `http` types:
//! which rule of which HTTPRoute a request matches (Gateway API precedence), which
//! backend a weighted rule sends it to, and what the filters change.

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap, Method, Uri,
};

use crate::config::route::{
    BackendRef, HeaderChanges, HttpRoute, PathMatch, PathRewrite, RouteMatch, RouteRule,
};

/// The parts of a request routing looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

fn query_value<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn matches(m: &RouteMatch, r: &RequestView<'_>) -> bool {
    if let Some(p) = &m.path {
        if !p.matches(r.uri.path()) {
            return false;
        }
    }
    if let Some(method) = &m.method {
        if r.method.as_str() != method {
            return false;
        }
    }
    let headers_ok = m.headers.iter().all(|(name, want)| {
        r.headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
    });
    headers_ok
        && m.query
            .iter()
            .all(|(name, want)| query_value(r.uri, name).is_some_and(|v| want.matches(v)))
}

/// How specific a match is, ordered as the Gateway API's precedence: path kind (exact,
/// prefix, regex), path length, a method, the number of headers, of query parameters.
type Precedence = (u8, usize, bool, usize, usize);

/// How specific a match is, for the Gateway API's precedence: exact path, then longer
/// prefix, then regex; then a method; then more headers; then more query parameters.
fn precedence(m: &RouteMatch) -> Precedence {
    let (kind, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (3, p.len()),
        Some(PathMatch::Prefix(p)) => (2, p.len()),
        Some(PathMatch::Regex(_)) => (1, 0),
        None => (2, 1), // no path match means PathPrefix "/"
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

/// The rule a request matches, over every route attached to the service. Ties go to the
/// route that sorts first by name, then the earlier rule (routes come sorted by name).
pub fn select<'a>(
    routes: &'a [std::sync::Arc<HttpRoute>],
    r: &RequestView<'_>,
) -> Option<(&'a HttpRoute, &'a RouteRule)> {
    let mut best: Option<(Precedence, &HttpRoute, &RouteRule)> = None;
    for route in routes {
        for rule in &route.rules {
            let score = if rule.matches.is_empty() {
                Some(precedence(&RouteMatch::default()))
            } else {
                rule.matches
                    .iter()
                    .filter(|m| matches(m, r))
                    .map(precedence)
                    .max()
            };
            if let Some(score) = score {
                if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
                    best = Some((score, route, rule));
                }
            }
        }
    }
    best.map(|(_, route, rule)| (route, rule))
}

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

/// Apply a header modifier (set replaces, add appends, remove deletes).
pub fn change_headers(h: &mut HeaderMap, c: &HeaderChanges) {
    for (name, value) in &c.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            h.insert(n, v);
        }
    }
    for (name, value) in &c.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            h.append(n, v);
        }
    }
    for name in &c.remove {
        h.remove(name.as_str());
    }
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

/// The PathPrefix of the rule's match that this request matched (for ReplacePrefixMatch).
pub fn matched_prefix<'a>(rule: &'a RouteRule, r: &RequestView<'_>) -> Option<&'a str> {
    rule.matches
        .iter()
        .filter(|m| matches(m, r))
        .find_map(|m| match &m.path {
            Some(PathMatch::Prefix(p)) => Some(p.as_str()),
            _ => None,
        })
}

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection and must not be
/// forwarded, nor any header the Connection header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // `te: trailers` is the one TE value that passes (gRPC needs it, RFC 9113 8.2.2).
    let trailers = h
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    let named: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
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
    use crate::config::route::{RouteRule, StringMatch};
    use std::sync::Arc;

    fn route(name: &str, rules: Vec<RouteRule>) -> Arc<HttpRoute> {
        Arc::new(HttpRoute {
            name: name.into(),
            namespace: "default".into(),
            parents: vec![],
            rules,
        })
    }

    fn rule(matches: Vec<RouteMatch>, backend: &str) -> RouteRule {
        RouteRule {
            matches,
            backends: vec![BackendRef {
                service: backend.into(),
                port: 80,
                weight: 1,
            }],
            ..Default::default()
        }
    }

    fn view<'a>(m: &'a Method, u: &'a Uri, h: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: m,
            uri: u,
            headers: h,
        }
    }

    #[test]
    fn the_most_specific_match_wins() {
        let header_v2 = RouteMatch {
            headers: vec![("x-api-version".into(), StringMatch::Exact("2".into()))],
            ..Default::default()
        };
        let api = RouteMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            ..Default::default()
        };
        let exact = RouteMatch {
            path: Some(PathMatch::Exact("/api/health".into())),
            ..Default::default()
        };
        let routes = vec![
            route(
                "a",
                vec![rule(vec![], "default"), rule(vec![header_v2], "v2")],
            ),
            route(
                "b",
                vec![rule(vec![api], "api"), rule(vec![exact], "health")],
            ),
        ];
        let (get, mut h) = (Method::GET, HeaderMap::new());
        let pick = |u: &str, h: &HeaderMap| {
            let uri: Uri = u.parse().unwrap();
            select(&routes, &view(&get, &uri, h)).map(|(_, r)| r.backends[0].service.clone())
        };
        assert_eq!(pick("/", &h).as_deref(), Some("default"));
        assert_eq!(pick("/api/x", &h).as_deref(), Some("api"));
        assert_eq!(pick("/api/health", &h).as_deref(), Some("health"));
        h.insert("x-api-version", "2".parse().unwrap());
        assert_eq!(
            pick("/", &h).as_deref(),
            Some("v2"),
            "a header match beats the catch-all"
        );
        assert_eq!(
            pick("/api/x", &h).as_deref(),
            Some("api"),
            "a longer path beats headers"
        );
    }

    #[test]
    fn query_and_method_matches() {
        let m = RouteMatch {
            method: Some("POST".into()),
            query: vec![("tier".into(), StringMatch::Exact("gold".into()))],
            ..Default::default()
        };
        let routes = vec![route("a", vec![rule(vec![m], "gold")])];
        let h = HeaderMap::new();
        let uri: Uri = "/x?a=1&tier=gold".parse().unwrap();
        assert!(select(&routes, &view(&Method::POST, &uri, &h)).is_some());
        assert!(select(&routes, &view(&Method::GET, &uri, &h)).is_none());
        let uri: Uri = "/x?tier=silver".parse().unwrap();
        assert!(select(&routes, &view(&Method::POST, &uri, &h)).is_none());
    }

    #[test]
    fn weights_partition_the_rolls() {
        let b = |s: &str, w| BackendRef {
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

    #[test]
    fn header_changes_apply_in_order() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("gone", "x".parse().unwrap());
        let c = HeaderChanges {
            set: vec![("a".into(), "2".into())],
            add: vec![("a".into(), "3".into())],
            remove: vec!["gone".into()],
        };
        change_headers(&mut h, &c);
        let a: Vec<_> = h
            .get_all("a")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(a, ["2", "3"]);
        assert!(!h.contains_key("gone"));
    }
}
