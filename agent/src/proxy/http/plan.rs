//! Routes compiled when the configuration is built, so a request does no parsing and no
//! string-keyed lookups: header names and values are `http` types, methods are parsed,
//! each match's precedence is known, token buckets are resolved, and backends are service
//! addresses. [`RoutePlan::select`] picks the rule a request matches (Gateway API
//! precedence, across every HTTPRoute attached to the service port).

use std::{collections::HashMap, sync::Arc, time::Duration};

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap, Method, Uri,
};

use super::routing::rewrite_path;
use crate::{
    config::{
        policy::{Fault, RateLimit},
        route::{Filter, HeaderChanges, HttpRoute, PathMatch, PathRewrite, Retry, StringMatch},
    },
    state::ServiceAddr,
    traffic::TokenBucket,
};

/// Every rule of every HTTPRoute attached to one service port, compiled.
#[derive(Debug, Default)]
pub struct RoutePlan {
    pub rules: Vec<Rule>,
}

/// How specific a match is, ordered as the Gateway API's precedence: path kind, path
/// length, a method, the number of headers, of query parameters. Path kinds rank exact,
/// then prefix (longer first), then regular expression, then the catch-all prefix `/` (or
/// no path at all): the Gateway API leaves regular expressions' place to implementations,
/// and below every prefix they could never win against a catch-all rule.
type Precedence = (u8, usize, bool, usize, usize);

#[derive(Debug)]
pub struct Match {
    path: Option<PathMatch>,
    headers: Vec<(HeaderName, StringMatch)>,
    query: Vec<(String, StringMatch)>,
    method: Option<Method>,
    precedence: Precedence,
}

impl Match {
    /// `PathPrefix /api, GET, 1 header(s)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match &self.path {
            Some(PathMatch::Exact(p)) => parts.push(format!("Exact {p}")),
            Some(PathMatch::Prefix(p)) => parts.push(format!("PathPrefix {p}")),
            Some(PathMatch::Regex(_)) => parts.push("RegularExpression path".to_owned()),
            None => parts.push("any path".to_owned()),
        }
        if let Some(m) = &self.method {
            parts.push(m.to_string());
        }
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
            parts.push(format!("headers {}", names.join(",")));
        }
        if !self.query.is_empty() {
            let names: Vec<&str> = self.query.iter().map(|(n, _)| n.as_str()).collect();
            parts.push(format!("query {}", names.join(",")));
        }
        parts.join(", ")
    }
}

/// Header changes with names and values parsed.
#[derive(Debug, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

#[derive(Debug)]
pub struct Redirect {
    scheme: &'static str,
    hostname: Option<String>,
    path: Option<PathRewrite>,
    port: Option<u16>,
    pub status: hyper::StatusCode,
}

#[derive(Debug)]
pub struct Mirror {
    /// `None`: the mirror's service has no such TCP port any more (skipped).
    pub target: Option<ServiceAddr>,
    pub percent: u32,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the HTTPRoute it belongs to.
    pub route: Arc<str>,
    /// Empty: every request matches.
    pub matches: Vec<Match>,
    pub redirect: Option<Redirect>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite_host: Option<HeaderValue>,
    pub rewrite_path: Option<PathRewrite>,
    pub mirrors: Vec<Mirror>,
    pub faults: Vec<Fault>,
    pub rate_limits: Vec<(RateLimit, Arc<TokenBucket>)>,
    /// Backend services with weights; `None` where the service no longer exists.
    pub backends: Vec<(Option<ServiceAddr>, u32)>,
    pub total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// Whether its requests are access-logged, and at which sample (the agent's default
    /// when `None`).
    pub access_log: Option<crate::config::policy::AccessLogRule>,
}

/// The rule a request matched, and the PathPrefix it matched by (for ReplacePrefixMatch).
pub struct Selected<'a> {
    pub rule: &'a Rule,
    pub prefix: Option<&'a str>,
}

fn precedence(path: Option<&PathMatch>, method: bool, headers: usize, query: usize) -> Precedence {
    let (kind, len) = match path {
        Some(PathMatch::Exact(p)) => (4, p.len()),
        Some(PathMatch::Prefix(p)) if p.trim_end_matches('/').is_empty() => (1, 1),
        Some(PathMatch::Prefix(p)) => (3, p.len()),
        Some(PathMatch::Regex(_)) => (2, 0),
        None => (1, 1), // no path match means PathPrefix "/"
    };
    (kind, len, method, headers, query)
}

/// A rule without matches ranks as a match of PathPrefix "/".
const CATCH_ALL: Precedence = (1, 1, false, 0, 0);

fn query_value<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

impl Match {
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(uri.path()))
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, want)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
            })
            && self
                .query
                .iter()
                .all(|(name, want)| query_value(uri, name).is_some_and(|v| want.matches(v)))
    }

    fn prefix(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }
}

impl HeaderOps {
    fn compile(c: &HeaderChanges) -> Self {
        // Names and values were validated with the configuration.
        let pairs = |v: &[(String, String)]| {
            v.iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::try_from(n).ok()?,
                        HeaderValue::try_from(v).ok()?,
                    ))
                })
                .collect()
        };
        Self {
            set: pairs(&c.set),
            add: pairs(&c.add),
            remove: c
                .remove
                .iter()
                .filter_map(|n| HeaderName::try_from(n).ok())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Set replaces, add appends, remove deletes, in that order.
    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

impl Redirect {
    /// Where this redirect sends a request for `uri` (host from `host`), as a Location.
    pub fn location(&self, uri: &Uri, host: &str, prefix: Option<&str>) -> Option<HeaderValue> {
        let host = self
            .hostname
            .as_deref()
            .unwrap_or_else(|| host.split(':').next().unwrap_or(""));
        let path = match &self.path {
            Some(rw) => rewrite_path(uri.path(), rw, prefix),
            None => uri.path().to_owned(),
        };
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        HeaderValue::try_from(format!("{}://{host}{port}{path}{query}", self.scheme)).ok()
    }
}

impl Rule {
    /// A backend by weight; `roll` is uniform in `0..total_weight`.
    pub fn backend_at(&self, roll: u64) -> Option<ServiceAddr> {
        let mut left = roll;
        for (addr, w) in &self.backends {
            if left < u64::from(*w) {
                return *addr;
            }
            left -= u64::from(*w);
        }
        None
    }

    /// A backend picked at random by weight.
    pub fn choose_backend(&self) -> Option<ServiceAddr> {
        self.backend_at(fastrand::u64(0..self.total_weight.max(1)))
    }
}

/// What compiling needs from the rest of the configuration.
pub struct Resolve<'a> {
    /// A TCP service port by namespace, name and port.
    pub service: &'a dyn Fn(&str, &str, u16) -> Option<ServiceAddr>,
    /// Route rules' token buckets by name.
    pub buckets: &'a HashMap<String, Arc<TokenBucket>>,
}

impl RoutePlan {
    /// Compile the routes attached to one service port (in name order).
    pub fn compile(routes: &[Arc<HttpRoute>], r: &Resolve<'_>) -> Self {
        let mut rules = vec![];
        for route in routes {
            let name: Arc<str> = format!("{}/{}", route.namespace, route.name).into();
            for rule in &route.rules {
                let mut c = Rule {
                    route: name.clone(),
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| Match {
                            precedence: precedence(
                                m.path.as_ref(),
                                m.method.is_some(),
                                m.headers.len(),
                                m.query.len(),
                            ),
                            path: m.path.clone(),
                            headers: m
                                .headers
                                .iter()
                                .filter_map(|(n, v)| {
                                    Some((HeaderName::try_from(n).ok()?, v.clone()))
                                })
                                .collect(),
                            query: m.query.clone(),
                            method: m
                                .method
                                .as_deref()
                                .and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
                        })
                        .collect(),
                    redirect: None,
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                    rewrite_host: None,
                    rewrite_path: None,
                    mirrors: vec![],
                    faults: vec![],
                    rate_limits: vec![],
                    access_log: None,
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| {
                            let addr = b
                                .resolved()
                                .then(|| (r.service)(&b.namespace, &b.service, b.port))
                                .flatten();
                            (addr, b.weight)
                        })
                        .collect(),
                    total_weight: rule.backends.iter().map(|b| u64::from(b.weight)).sum(),
                    request_timeout: rule.request_timeout,
                    backend_timeout: rule.backend_timeout,
                    retry: rule.retry.clone(),
                };
                for f in &rule.filters {
                    match f {
                        Filter::RequestHeaders(h) => c.request_headers = HeaderOps::compile(h),
                        Filter::ResponseHeaders(h) => c.response_headers = HeaderOps::compile(h),
                        Filter::Rewrite { hostname, path } => {
                            c.rewrite_host = hostname
                                .as_deref()
                                .and_then(|h| HeaderValue::try_from(h).ok());
                            c.rewrite_path.clone_from(path);
                        }
                        Filter::Redirect {
                            scheme,
                            hostname,
                            path,
                            port,
                            status,
                        } => {
                            c.redirect = Some(Redirect {
                                scheme: if scheme.as_deref() == Some("https") {
                                    "https"
                                } else {
                                    "http"
                                },
                                hostname: hostname.clone(),
                                path: path.clone(),
                                port: *port,
                                status: hyper::StatusCode::from_u16(*status)
                                    .unwrap_or(hyper::StatusCode::FOUND),
                            })
                        }
                        Filter::Mirror {
                            namespace,
                            service,
                            port,
                            percent,
                        } => c.mirrors.push(Mirror {
                            target: (r.service)(namespace, service, *port),
                            percent: *percent,
                        }),
                        Filter::Extension {
                            fault,
                            rate_limit,
                            access_log,
                            bucket,
                        } => {
                            c.faults.extend(fault.clone());
                            if access_log.is_some() {
                                c.access_log = *access_log;
                            }
                            if let (Some(l), Some(b)) = (rate_limit, r.buckets.get(bucket)) {
                                c.rate_limits.push((*l, b.clone()));
                            }
                        }
                    }
                }
                rules.push(c);
            }
        }
        Self { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule for people (`/routes`, `weftctl routes`): its HTTPRoute, what it
    /// matches, where it sends, and what it does on the way; `name` names a service.
    pub fn describe(&self, name: impl Fn(ServiceAddr) -> String) -> Vec<serde_json::Value> {
        self.rules
            .iter()
            .map(|r| {
                let backends: Vec<String> = r
                    .backends
                    .iter()
                    .map(|(a, w)| {
                        let svc = a.map_or_else(|| "(missing Service)".to_owned(), &name);
                        format!("{svc} weight {w}")
                    })
                    .collect();
                let mut does = Vec::new();
                if let Some(rd) = &r.redirect {
                    does.push(format!("redirect {}", rd.status.as_u16()));
                }
                if r.rewrite_path.is_some() || r.rewrite_host.is_some() {
                    does.push("rewrite".to_owned());
                }
                if !r.request_headers.is_empty() || !r.response_headers.is_empty() {
                    does.push("header changes".to_owned());
                }
                if let Some(rt) = &r.retry {
                    does.push(format!("retry {:?} x{}", rt.codes, rt.attempts));
                }
                if let Some(t) = r.request_timeout {
                    does.push(format!("timeout {t:?}"));
                }
                if let Some(t) = r.backend_timeout {
                    does.push(format!("per-try timeout {t:?}"));
                }
                if !r.mirrors.is_empty() {
                    does.push(format!("{} mirror(s)", r.mirrors.len()));
                }
                if !r.faults.is_empty() {
                    does.push("fault injection".to_owned());
                }
                if !r.rate_limits.is_empty() {
                    does.push("rate limit".to_owned());
                }
                let matches: Vec<String> = if r.matches.is_empty() {
                    vec!["every request".to_owned()]
                } else {
                    r.matches.iter().map(Match::describe).collect()
                };
                serde_json::json!({
                    "route": &*r.route,
                    "matches": matches,
                    "backends": backends,
                    "filters": does,
                })
            })
            .collect()
    }

    /// The HTTPRoutes the rules come from, each once, in order.
    pub fn route_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.rules.iter().map(|r| &*r.route).collect();
        names.dedup();
        names
    }

    /// The rule a request matches: the most specific match wins; ties go to the route
    /// that sorts first by name, then the earlier rule.
    pub fn select(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Selected<'_>> {
        let mut best: Option<(Precedence, Selected<'_>)> = None;
        for rule in &self.rules {
            let found = if rule.matches.is_empty() {
                Some((CATCH_ALL, None))
            } else {
                rule.matches
                    .iter()
                    .filter(|m| m.matches(method, uri, headers))
                    .map(|m| (m.precedence, m.prefix()))
                    .max_by_key(|(p, _)| *p)
            };
            if let Some((score, prefix)) = found {
                if best.as_ref().is_none_or(|(b, _)| score > *b) {
                    best = Some((score, Selected { rule, prefix }));
                }
            }
        }
        best.map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::{BackendRef, RouteMatch, RouteRule};
    use std::net::SocketAddrV4;

    fn route(name: &str, rules: Vec<RouteRule>) -> Arc<HttpRoute> {
        Arc::new(HttpRoute {
            kind: Default::default(),
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
                namespace: "default".into(),
                resolution: crate::config::route::Resolution::Resolved,
            }],
            ..Default::default()
        }
    }

    /// Services resolve to an address whose port number encodes the name's length, and
    /// whose last octet its first letter, enough to tell them apart in tests.
    fn addr_of(name: &str) -> ServiceAddr {
        ServiceAddr {
            vip: SocketAddrV4::new([10, 96, 0, name.as_bytes()[0]].into(), name.len() as u16),
            protocol: crate::config::Protocol::Tcp,
        }
    }

    fn plan(routes: &[Arc<HttpRoute>]) -> RoutePlan {
        let buckets = HashMap::new();
        RoutePlan::compile(
            routes,
            &Resolve {
                service: &|_, name, _| Some(addr_of(name)),
                buckets: &buckets,
            },
        )
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
        let p = plan(&[
            route(
                "a",
                vec![rule(vec![], "default"), rule(vec![header_v2], "v2")],
            ),
            route(
                "b",
                vec![rule(vec![api], "api"), rule(vec![exact], "health")],
            ),
        ]);
        let mut h = HeaderMap::new();
        let pick = |u: &str, h: &HeaderMap| {
            let uri: Uri = u.parse().unwrap();
            p.select(&Method::GET, &uri, h)
                .map(|s| s.rule.backends[0].0.unwrap())
        };
        assert_eq!(pick("/", &h), Some(addr_of("default")));
        assert_eq!(pick("/api/x", &h), Some(addr_of("api")));
        assert_eq!(pick("/api/health", &h), Some(addr_of("health")));
        h.insert("x-api-version", "2".parse().unwrap());
        assert_eq!(
            pick("/", &h),
            Some(addr_of("v2")),
            "a header match beats the catch-all"
        );
        assert_eq!(
            pick("/api/x", &h),
            Some(addr_of("api")),
            "a longer path beats headers"
        );
    }

    #[test]
    fn a_regular_expression_beats_the_catch_all_but_not_a_prefix() {
        let regex = RouteMatch {
            path: Some(PathMatch::Regex(crate::config::route::StringMatch::Regex(
                regex::Regex::new("^(?:/items/[0-9]+)$").unwrap(),
            ))),
            ..Default::default()
        };
        let items = RouteMatch {
            path: Some(PathMatch::Prefix("/items/special".into())),
            ..Default::default()
        };
        let p = plan(&[route(
            "a",
            vec![
                rule(vec![], "all"),
                rule(vec![regex], "re"),
                rule(vec![items], "pre"),
            ],
        )]);
        let h = HeaderMap::new();
        let pick = |u: &str| {
            let uri: Uri = u.parse().unwrap();
            p.select(&Method::GET, &uri, &h)
                .map(|s| s.rule.backends[0].0.unwrap())
        };
        assert_eq!(pick("/items/42"), Some(addr_of("re")));
        assert_eq!(pick("/items/x"), Some(addr_of("all")));
        assert_eq!(pick("/items/special"), Some(addr_of("pre")));
    }

    #[test]
    fn query_and_method_matches() {
        let m = RouteMatch {
            method: Some("POST".into()),
            query: vec![("tier".into(), StringMatch::Exact("gold".into()))],
            ..Default::default()
        };
        let p = plan(&[route("a", vec![rule(vec![m], "gold")])]);
        let h = HeaderMap::new();
        let uri: Uri = "/x?a=1&tier=gold".parse().unwrap();
        assert!(p.select(&Method::POST, &uri, &h).is_some());
        assert!(p.select(&Method::GET, &uri, &h).is_none());
        let uri: Uri = "/x?tier=silver".parse().unwrap();
        assert!(p.select(&Method::POST, &uri, &h).is_none());
    }

    #[test]
    fn weights_partition_the_rolls() {
        let b = |s: &str, w| BackendRef {
            namespace: "default".into(),
            resolution: crate::config::route::Resolution::Resolved,
            service: s.into(),
            port: 80,
            weight: w,
        };
        let r = RouteRule {
            backends: vec![b("v1", 90), b("v22", 10), b("off", 0)],
            ..Default::default()
        };
        let p = plan(&[route("a", vec![r])]);
        let rule = &p.rules[0];
        assert_eq!(rule.total_weight, 100);
        let v1 = (0..100)
            .filter(|&roll| rule.backend_at(roll) == Some(addr_of("v1")))
            .count();
        assert_eq!(v1, 90);
    }

    #[test]
    fn header_changes_apply_in_order() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("gone", "x".parse().unwrap());
        let ops = HeaderOps::compile(&HeaderChanges {
            set: vec![("a".into(), "2".into())],
            add: vec![("a".into(), "3".into())],
            remove: vec!["gone".into()],
        });
        ops.apply(&mut h);
        let a: Vec<_> = h
            .get_all("a")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(a, ["2", "3"]);
        assert!(!h.contains_key("gone"));
    }

    #[test]
    fn a_redirect_keeps_what_it_does_not_change() {
        let r = Redirect {
            scheme: "https",
            hostname: None,
            path: Some(PathRewrite::Prefix("/new".into())),
            port: Some(8443),
            status: hyper::StatusCode::MOVED_PERMANENTLY,
        };
        let uri: Uri = "/old/x?q=1".parse().unwrap();
        assert_eq!(
            r.location(&uri, "web.shop:80", Some("/old")).unwrap(),
            "https://web.shop:8443/new/x?q=1"
        );
    }
}
