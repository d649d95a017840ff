//! HTTPRoute (`gateway.networking.k8s.io/v1`), the Gateway API's mesh (GAMMA) profile: a
//! route attaches to a Service through `parentRefs` and says how requests to it are
//! matched, changed and spread over backend Services. Parsed and checked here; the proxy
//! uses the model.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::policy::{Fault, RateLimit, RouteFilter};

/// A request or header value pattern.
#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    Regex(regex::Regex),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    Exact(String),
    /// Matches whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(StringMatch),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || path == p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            Self::Regex(r) => r.matches(path),
        }
    }
}

/// One way a request can match a rule: every condition given must hold.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    /// Header names are lowercase.
    pub headers: Vec<(String, StringMatch)>,
    pub query: Vec<(String, StringMatch)>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct HeaderChanges {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathRewrite {
    Full(String),
    /// Replace the part the rule's PathPrefix matched.
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    RequestHeaders(HeaderChanges),
    ResponseHeaders(HeaderChanges),
    Rewrite {
        hostname: Option<String>,
        path: Option<PathRewrite>,
    },
    Redirect {
        scheme: Option<String>,
        hostname: Option<String>,
        path: Option<PathRewrite>,
        port: Option<u16>,
        status: u16,
    },
    Mirror {
        namespace: String,
        service: String,
        port: u16,
        percent: u32,
    },
    /// An `ExtensionRef` to a weft `HTTPRouteFilter`: fault injection, a rate limit, the
    /// rule's access logging.
    Extension {
        fault: Option<Fault>,
        rate_limit: Option<RateLimit>,
        access_log: Option<super::policy::AccessLogRule>,
        /// Names this rule's token bucket, which outlives reloads:
        /// `namespace/route#rule/filter`.
        bucket: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendRef {
    /// The Service's namespace: the route's own unless the reference names another (and
    /// a ReferenceGrant there allows it).
    pub namespace: String,
    pub service: String,
    pub port: u16,
    pub weight: u32,
    /// Whether requests can be sent there. A route whose backend is not declared, or
    /// lives in a namespace that grants the route no access, is still accepted (with
    /// ResolvedRefs false, as the Gateway API has it): requests its rule sends there get
    /// a 500.
    pub resolution: Resolution,
}

/// Whether a backend reference can be followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Resolved,
    /// No such Service: `BackendNotFound` (a Service without the port is refused).
    NotFound,
    /// A Service of another namespace with no ReferenceGrant allowing it:
    /// `RefNotPermitted`.
    NotPermitted,
}

impl BackendRef {
    pub fn resolved(&self) -> bool {
        self.resolution == Resolution::Resolved
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Retry {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct RouteRule {
    /// `rules[].name`, when given (the Gateway API's section name of the rule).
    pub name: Option<String>,
    /// Empty: every request matches.
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backends: Vec<BackendRef>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

/// Backends that cannot be followed, as `namespace/name:port`, with why.
fn unresolved<'a>(refs: impl Iterator<Item = &'a BackendRef>) -> Vec<(Resolution, String)> {
    refs.filter(|b| !b.resolved())
        .map(|b| {
            (
                b.resolution,
                format!("{}/{}:{}", b.namespace, b.service, b.port),
            )
        })
        .collect()
}

impl HttpRoute {
    /// Backends that cannot be followed, and why.
    pub fn unresolved(&self) -> Vec<(Resolution, String)> {
        unresolved(self.rules.iter().flat_map(|r| &r.backends))
    }
}

impl TlsRoute {
    /// Backends that cannot be followed, and why.
    pub fn unresolved(&self) -> Vec<(Resolution, String)> {
        unresolved(self.backends.iter())
    }
}

/// TLSRoute (`gateway.networking.k8s.io/v1alpha2`) attached to a Service: TLS
/// connections to it are sent, by the server name of their ClientHello, to backend
/// Services, still encrypted end to end.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsRoute {
    pub name: String,
    pub namespace: String,
    pub parents: Vec<Parent>,
    /// Lowercase names, or `*.` and a suffix.
    pub hostnames: Vec<String>,
    pub backends: Vec<BackendRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TlsRouteSpec {
    pub parent_refs: Vec<RawParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub rules: Vec<RawTlsRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTlsRule {
    /// v1 names rules; nothing routes by it.
    #[serde(default)]
    pub name: Option<String>,
    pub backend_refs: Vec<RawBackendRef>,
}

/// Convert a parsed TLSRoute; errors are `(field, message)`.
pub(super) fn convert_tls(
    name: String,
    namespace: String,
    spec: TlsRouteSpec,
    refs: &Refs<'_>,
) -> Result<TlsRoute, (String, String)> {
    let parents = convert_parents(spec.parent_refs, &namespace, refs.services)?;
    if spec.hostnames.is_empty() {
        return Err((
            "spec.hostnames".into(),
            "a TLSRoute routes by server name: give at least one".into(),
        ));
    }
    let mut hostnames = vec![];
    for (i, h) in spec.hostnames.into_iter().enumerate() {
        let h = h.to_ascii_lowercase();
        let bare = h.strip_prefix("*.").unwrap_or(&h);
        let ok = !bare.is_empty()
            && bare.len() <= 253
            && bare.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err((
                format!("spec.hostnames[{i}]"),
                format!("{h:?} is not a DNS name (or *. and one)"),
            ));
        }
        hostnames.push(h);
    }
    let [rule] = <[RawTlsRule; 1]>::try_from(spec.rules).map_err(|_| {
        (
            "spec.rules".into(),
            "a TLSRoute has exactly one rule".to_owned(),
        )
    })?;
    // A rule's name labels it; nothing routes by it.
    let _ = &rule.name;
    let mut backends = vec![];
    for (b, rb) in rule.backend_refs.into_iter().enumerate() {
        backends.push(
            convert_backend(rb, &namespace, "TLSRoute", refs)
                .map_err(|(x, m)| (format!("spec.rules[0].backendRefs[{b}]{x}"), m))?,
        );
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err((
            "spec.rules[0].backendRefs".into(),
            "needs a backend with a weight above 0".into(),
        ));
    }
    Ok(TlsRoute {
        name,
        namespace,
        parents,
        hostnames,
        backends,
    })
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    /// Which kind declared it: a GRPCRoute is read into the same model, its method
    /// matches made path matches.
    pub kind: RouteKind,
    pub name: String,
    pub namespace: String,
    /// The Service ports this route applies to.
    pub parents: Vec<Parent>,
    pub rules: Vec<RouteRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RouteKind {
    #[default]
    Http,
    Grpc,
}

impl RouteKind {
    /// The Gateway API kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "HTTPRoute",
            Self::Grpc => "GRPCRoute",
        }
    }
}

// ---- the documents as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RouteSpec {
    pub parent_refs: Vec<RawParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// For a Service: the name of one of its ports.
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<RawMatch>,
    #[serde(default)]
    pub filters: Vec<RawFilter>,
    #[serde(default)]
    pub backend_refs: Vec<RawBackendRef>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub retry: Option<RawRetry>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMatch {
    #[serde(default)]
    pub path: Option<RawPath>,
    #[serde(default)]
    pub headers: Vec<RawNameValue>,
    #[serde(default)]
    pub query_params: Vec<RawNameValue>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPath {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNameValue {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<RawHeaderChanges>,
    #[serde(default)]
    pub response_header_modifier: Option<RawHeaderChanges>,
    #[serde(default)]
    pub url_rewrite: Option<RawRewrite>,
    #[serde(default)]
    pub request_redirect: Option<RawRedirect>,
    #[serde(default)]
    pub request_mirror: Option<RawMirror>,
    #[serde(default)]
    pub extension_ref: Option<RawExtensionRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExtensionRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderChanges {
    #[serde(default)]
    pub set: Vec<RawHeader>,
    #[serde(default)]
    pub add: Vec<RawHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeader {
    pub name: String,
    pub value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<RawPathModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<RawPathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMirror {
    pub backend_ref: RawBackendRef,
    #[serde(default)]
    pub percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// A Gateway API duration (GEP-2257): one to four `<number><unit>` parts, units h, m, s,
/// ms, e.g. `1h30m`, `500ms`, `10s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 || digits > 5 {
            return Err(format!("{s:?} is not a duration like 10s, 500ms or 1h30m"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: bad number"))?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(format!("{s:?}: units are h, m, s and ms"));
        };
        total += unit * n as u32;
        rest = &rest[len..];
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(format!("{s:?} is not a duration like 10s, 500ms or 1h30m"));
    }
    Ok(total)
}

/// The Services of the configuration and their TCP ports (with the ports' names), by
/// namespace and name.
pub(super) type ServicePorts<'a> = BTreeMap<(&'a str, &'a str), Vec<(u16, Option<&'a str>)>>;

/// The `HTTPRouteFilter`s of the route's namespace, by name.
pub(super) type RouteFilters<'a> = BTreeMap<&'a str, &'a RouteFilter>;

/// A ReferenceGrant (`gateway.networking.k8s.io/v1beta1`): the owner of a namespace lets
/// routes of other namespaces send traffic to its Services.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceGrant {
    pub name: String,
    pub namespace: String,
    /// (route kind, namespace) allowed to refer.
    pub from: Vec<(String, String)>,
    /// The Services they may refer to: `None` is every Service of the namespace.
    pub to: Vec<Option<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GrantSpec {
    from: Vec<RawGrantFrom>,
    to: Vec<RawGrantTo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrantFrom {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrantTo {
    group: String,
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

/// Convert a parsed ReferenceGrant. Entries for kinds weft does not route with (a Secret,
/// a Gateway) are kept out of the model, not refused: the grant may serve another
/// implementation too.
pub(super) fn convert_grant(
    name: String,
    namespace: String,
    spec: GrantSpec,
) -> Result<ReferenceGrant, (String, String)> {
    if spec.from.is_empty() || spec.to.is_empty() {
        return Err((
            "spec".into(),
            "a ReferenceGrant needs at least one entry in from and in to".into(),
        ));
    }
    let from = spec
        .from
        .into_iter()
        .filter(|f| f.group == GATEWAY_GROUP)
        .map(|f| (f.kind, f.namespace))
        .collect();
    let to = spec
        .to
        .into_iter()
        .filter(|t| t.group.is_empty() && t.kind == "Service")
        .map(|t| t.name)
        .collect();
    Ok(ReferenceGrant {
        name,
        namespace,
        from,
        to,
    })
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What converting a route needs from the other documents.
pub(super) struct Refs<'a> {
    pub services: &'a ServicePorts<'a>,
    pub grants: &'a [ReferenceGrant],
}

impl Refs<'_> {
    /// Whether a route of `kind` in `from` may send traffic to Service `to`/`service`.
    fn permits(&self, kind: &str, from: &str, to: &str, service: &str) -> bool {
        from == to
            || self.grants.iter().any(|g| {
                g.namespace == to
                    && g.from.iter().any(|(k, n)| k == kind && n == from)
                    && g.to
                        .iter()
                        .any(|n| n.as_deref().is_none_or(|n| n == service))
            })
    }
}

/// Convert a parsed route; errors are `(field, message)` for the caller to locate.
pub(super) fn convert(
    name: String,
    namespace: String,
    spec: RouteSpec,
    refs: &Refs<'_>,
    extensions: &RouteFilters<'_>,
) -> Result<HttpRoute, (String, String)> {
    let err = |f: String, m: String| (f, m);
    // Mesh routes attach to Services and match by address: the Gateway API's mesh
    // profile ignores their hostnames, and so does weft.
    let _ = &spec.hostnames;
    let parents = convert_parents(spec.parent_refs, &namespace, refs.services)?;
    let mut rules = vec![];
    for (r, raw) in spec.rules.into_iter().enumerate() {
        let at = |x: &str| format!("spec.rules[{r}]{x}");
        let mut rule = RouteRule {
            name: raw.name.clone(),
            ..RouteRule::default()
        };
        for (m, rm) in raw.matches.into_iter().enumerate() {
            rule.matches.push(
                convert_match(rm).map_err(|(x, msg)| (at(&format!(".matches[{m}]{x}")), msg))?,
            );
        }
        let ctx = RuleCtx {
            kind: RouteKind::Http,
            namespace: &namespace,
            refs,
            extensions,
            bucket_prefix: format!("{namespace}/{name}#{r}"),
        };
        rule.backends = ctx.backends(raw.backend_refs, &at)?;
        rule.filters = ctx.filters(raw.filters, &rule.matches, &at)?;
        // A rule with neither backends nor a redirect forwards nothing: its requests are
        // answered 503 (no-backend), as the Gateway API says.
        if let Some(t) = raw.timeouts {
            let d = |v: Option<String>, f: &str| -> Result<Option<Duration>, (String, String)> {
                v.map(|s| parse_duration(&s).map_err(|m| (at(&format!(".timeouts.{f}")), m)))
                    .transpose()
            };
            rule.request_timeout = d(t.request, "request")?.filter(|d| !d.is_zero());
            rule.backend_timeout = d(t.backend_request, "backendRequest")?.filter(|d| !d.is_zero());
            if let (Some(req), Some(be)) = (rule.request_timeout, rule.backend_timeout) {
                if be > req {
                    return Err(err(
                        at(".timeouts.backendRequest"),
                        "must not exceed timeouts.request".into(),
                    ));
                }
            }
        }
        if let Some(rt) = raw.retry {
            if let Some(c) = rt.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(err(
                    at(".retry.codes"),
                    format!("{c} is not a 4xx or 5xx status"),
                ));
            }
            let backoff = rt
                .backoff
                .map(|s| parse_duration(&s).map_err(|m| (at(".retry.backoff"), m)))
                .transpose()?;
            // No codes: retry the gateway errors, the failures a retry most often cures.
            let codes = if rt.codes.is_empty() {
                vec![502, 503, 504]
            } else {
                rt.codes
            };
            rule.retry = Some(Retry {
                codes,
                attempts: rt.attempts.unwrap_or(1).min(10),
                backoff,
            });
        }
        rules.push(rule);
    }
    Ok(HttpRoute {
        kind: RouteKind::Http,
        name,
        namespace,
        parents,
        rules,
    })
}

// ---- GRPCRoute ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct GrpcRouteSpec {
    pub parent_refs: Vec<RawParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RawGrpcRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawGrpcRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<RawGrpcMatch>,
    #[serde(default)]
    pub filters: Vec<RawFilter>,
    #[serde(default)]
    pub backend_refs: Vec<RawBackendRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrpcMatch {
    #[serde(default)]
    pub method: Option<RawGrpcMethod>,
    #[serde(default)]
    pub headers: Vec<RawNameValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrpcMethod {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

/// A gRPC method match as the path match it is on the wire (`/package.Service/Method`):
/// service and method exact is an exact path, a service alone is a path prefix (whole
/// segments), a method alone or regular expressions a path expression.
fn grpc_method(m: RawGrpcMethod) -> Result<PathMatch, (String, String)> {
    let (service, method) = (
        m.service.filter(|s| !s.is_empty()),
        m.method.filter(|s| !s.is_empty()),
    );
    if service.is_none() && method.is_none() {
        return Err((".method".into(), "give a service, a method or both".into()));
    }
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            let service_ok = |s: &str| {
                let s = s.strip_prefix('.').unwrap_or(s);
                !s.is_empty()
                    && s.split('.').all(|p| {
                        p.bytes()
                            .next()
                            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    })
            };
            let method_ok = |m: &str| {
                m.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            };
            if let Some(s) = service.as_deref().filter(|s| !service_ok(s)) {
                return Err((
                    ".method.service".into(),
                    format!("{s:?} is not a gRPC service name (package.Service)"),
                ));
            }
            if let Some(m) = method.as_deref().filter(|m| !method_ok(m)) {
                return Err((
                    ".method.method".into(),
                    format!("{m:?} is not a gRPC method name"),
                ));
            }
            Ok(match (service, method) {
                (Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
                (Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                (None, Some(m)) => PathMatch::Regex(
                    string_match(
                        Some("RegularExpression"),
                        format!("/[^/]+/{}", regex::escape(&m)),
                    )
                    .map_err(|(_, e)| (".method.method".to_owned(), e))?,
                ),
                (None, None) => unreachable!("checked above"),
            })
        }
        "RegularExpression" => {
            for (field, v) in [("service", &service), ("method", &method)] {
                if let Some(v) = v {
                    regex::Regex::new(v).map_err(|e| {
                        (
                            format!(".method.{field}"),
                            format!("invalid regular expression: {e}"),
                        )
                    })?;
                }
            }
            let s = service.map_or_else(|| "[^/]+".to_owned(), |s| format!("(?:{s})"));
            let m = method.map_or_else(|| "[^/]+".to_owned(), |m| format!("(?:{m})"));
            Ok(PathMatch::Regex(
                string_match(Some("RegularExpression"), format!("/{s}/{m}"))
                    .map_err(|(_, e)| (".method".to_owned(), e))?,
            ))
        }
        other => Err((
            ".method.type".into(),
            format!("{other:?}: expected Exact or RegularExpression"),
        )),
    }
}

/// Convert a parsed GRPCRoute into the route model: its rules are HTTP rules over gRPC's
/// paths. Errors are `(field, message)`.
pub(super) fn convert_grpc(
    name: String,
    namespace: String,
    spec: GrpcRouteSpec,
    refs: &Refs<'_>,
    extensions: &RouteFilters<'_>,
) -> Result<HttpRoute, (String, String)> {
    // As for HTTPRoutes: mesh routes match by address, hostnames are ignored.
    let _ = &spec.hostnames;
    let parents = convert_parents(spec.parent_refs, &namespace, refs.services)?;
    let mut rules = vec![];
    for (r, raw) in spec.rules.into_iter().enumerate() {
        let at = |x: &str| format!("spec.rules[{r}]{x}");
        let mut rule = RouteRule {
            name: raw.name,
            ..RouteRule::default()
        };
        for (m, gm) in raw.matches.into_iter().enumerate() {
            let at_m = |x: &str| at(&format!(".matches[{m}]{x}"));
            let path = gm
                .method
                .map(grpc_method)
                .transpose()
                .map_err(|(x, e)| (at_m(&x), e))?;
            let headers = RawMatch {
                headers: gm.headers,
                ..RawMatch::default()
            };
            let mut converted = convert_match(headers).map_err(|(x, e)| (at_m(&x), e))?;
            converted.path = path;
            rule.matches.push(converted);
        }
        let ctx = RuleCtx {
            kind: RouteKind::Grpc,
            namespace: &namespace,
            refs,
            extensions,
            bucket_prefix: format!("grpc:{namespace}/{name}#{r}"),
        };
        rule.backends = ctx.backends(raw.backend_refs, &at)?;
        rule.filters = ctx.filters(raw.filters, &rule.matches, &at)?;
        rules.push(rule);
    }
    Ok(HttpRoute {
        kind: RouteKind::Grpc,
        name,
        namespace,
        parents,
        rules,
    })
}

/// What converting one rule's backends and filters needs to know.
struct RuleCtx<'a> {
    kind: RouteKind,
    namespace: &'a str,
    refs: &'a Refs<'a>,
    extensions: &'a RouteFilters<'a>,
    bucket_prefix: String,
}

impl RuleCtx<'_> {
    fn backends(
        &self,
        raw: Vec<RawBackendRef>,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Vec<BackendRef>, (String, String)> {
        let mut out = vec![];
        for (b, rb) in raw.into_iter().enumerate() {
            out.push(
                convert_backend(rb, self.namespace, self.kind.as_str(), self.refs)
                    .map_err(|(x, msg)| (at(&format!(".backendRefs[{b}]{x}")), msg))?,
            );
        }
        if out.iter().all(|b| b.weight == 0) && !out.is_empty() {
            return Err((
                at(".backendRefs"),
                "all weights are 0: no request could be sent anywhere".into(),
            ));
        }
        Ok(out)
    }

    fn filters(
        &self,
        raw: Vec<RawFilter>,
        matches: &[RouteMatch],
        at: &dyn Fn(&str) -> String,
    ) -> Result<Vec<Filter>, (String, String)> {
        let mut out = vec![];
        for (i, rf) in raw.into_iter().enumerate() {
            let f = convert_filter(rf, self, matches)
                .map_err(|(x, msg)| (at(&format!(".filters[{i}]{x}")), msg))?;
            out.push(f);
        }
        Ok(out)
    }
}

/// A route's parent: a port of a Service (every port when `port` is `None`). A parent in
/// another namespace than the route's makes it a consumer route: it applies to that
/// Service's clients in the route's namespace only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub namespace: String,
    pub service: String,
    pub port: Option<u16>,
}

/// `parentRefs` -> the Service ports they name.
fn convert_parents(
    refs: Vec<RawParentRef>,
    namespace: &str,
    services: &ServicePorts<'_>,
) -> Result<Vec<Parent>, (String, String)> {
    let err = |f: String, m: String| (f, m);
    if refs.is_empty() {
        return Err(err(
            "spec.parentRefs".into(),
            "a mesh route needs at least one Service parent".into(),
        ));
    }
    let mut parents = vec![];
    for (i, p) in refs.into_iter().enumerate() {
        let f = |x: &str| format!("spec.parentRefs[{i}]{x}");
        if p.kind.as_deref().is_some_and(|k| k != "Service")
            || p.group
                .as_deref()
                .is_some_and(|g| !g.is_empty() && g != "core")
        {
            return Err(err(
                f(".kind"),
                "weft routes attach to Services (kind: Service, group: \"\")".into(),
            ));
        }
        let ns = p.namespace.as_deref().unwrap_or(namespace);
        let Some(ports) = services.get(&(ns, p.name.as_str())) else {
            return Err(err(
                f(".name"),
                format!("no Service {ns}/{} is declared", p.name),
            ));
        };
        let mut port = p.port;
        if let Some(section) = &p.section_name {
            let Some(&(number, _)) = ports.iter().find(|(_, n)| *n == Some(section.as_str()))
            else {
                return Err(err(
                    f(".sectionName"),
                    format!("Service {ns}/{} has no TCP port named {section:?}", p.name),
                ));
            };
            if port.is_some_and(|p| p != number) {
                return Err(err(
                    f(".port"),
                    format!("port {number} is the one named {section:?}: name one port"),
                ));
            }
            port = Some(number);
        }
        if let Some(port) = port {
            if !ports.iter().any(|(p, _)| *p == port) {
                return Err(err(
                    f(".port"),
                    format!("Service {ns}/{} has no TCP port {port}", p.name),
                ));
            }
        }
        parents.push(Parent {
            namespace: ns.to_owned(),
            service: p.name,
            port,
        });
    }
    Ok(parents)
}

fn string_match(kind: Option<&str>, value: String) -> Result<StringMatch, (String, String)> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(StringMatch::Exact(value)),
        "RegularExpression" => regex::Regex::new(&format!("^(?:{value})$"))
            .map(StringMatch::Regex)
            .map_err(|e| (".value".into(), format!("invalid regular expression: {e}"))),
        other => Err((
            ".type".into(),
            format!("{other:?}: expected Exact or RegularExpression"),
        )),
    }
}

fn convert_match(m: RawMatch) -> Result<RouteMatch, (String, String)> {
    let path = match m.path {
        None => None,
        Some(p) => {
            let v = p.value.unwrap_or_else(|| "/".into());
            if !v.starts_with('/') && p.kind.as_deref() != Some("RegularExpression") {
                return Err((".path.value".into(), format!("{v:?} must start with /")));
            }
            Some(match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathMatch::Exact(v),
                "PathPrefix" => PathMatch::Prefix(v),
                "RegularExpression" => PathMatch::Regex(
                    string_match(Some("RegularExpression"), v)
                        .map_err(|(x, e)| (format!(".path{x}"), e))?,
                ),
                other => {
                    return Err((
                        ".path.type".into(),
                        format!("{other:?}: expected Exact, PathPrefix or RegularExpression"),
                    ))
                }
            })
        }
    };
    let mut headers = vec![];
    for (i, h) in m.headers.into_iter().enumerate() {
        let name = header_name(&h.name).map_err(|e| (format!(".headers[{i}].name"), e))?;
        let sm = string_match(h.kind.as_deref(), h.value)
            .map_err(|(x, e)| (format!(".headers[{i}]{x}"), e))?;
        headers.push((name, sm));
    }
    let mut query = vec![];
    for (i, q) in m.query_params.into_iter().enumerate() {
        let sm = string_match(q.kind.as_deref(), q.value)
            .map_err(|(x, e)| (format!(".queryParams[{i}]{x}"), e))?;
        query.push((q.name, sm));
    }
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if let Some(method) = &m.method {
        if !METHODS.contains(&method.as_str()) {
            return Err((
                ".method".into(),
                format!("{method:?} is not an HTTP method ({})", METHODS.join(", ")),
            ));
        }
    }
    Ok(RouteMatch {
        path,
        headers,
        query,
        method: m.method,
    })
}

fn convert_backend(
    b: RawBackendRef,
    namespace: &str,
    kind: &str,
    refs: &Refs<'_>,
) -> Result<BackendRef, (String, String)> {
    if b.kind.as_deref().is_some_and(|k| k != "Service")
        || b.group
            .as_deref()
            .is_some_and(|g| !g.is_empty() && g != "core")
    {
        return Err((".kind".into(), "backends are Services".into()));
    }
    let Some(port) = b.port else {
        return Err((".port".into(), "is required for a Service backend".into()));
    };
    let ns = b.namespace.as_deref().unwrap_or(namespace);
    let resolution = match refs.services.get(&(ns, b.name.as_str())) {
        _ if !refs.permits(kind, namespace, ns, &b.name) => Resolution::NotPermitted,
        None => Resolution::NotFound,
        Some(ports) if ports.iter().any(|(p, _)| *p == port) => Resolution::Resolved,
        Some(_) => {
            return Err((
                ".port".into(),
                format!("Service {ns}/{} has no TCP port {port}", b.name),
            ))
        }
    };
    let weight = b.weight.unwrap_or(1);
    if weight > 1_000_000 {
        return Err((".weight".into(), "must be 0 to 1000000".into()));
    }
    Ok(BackendRef {
        namespace: ns.to_owned(),
        service: b.name,
        port,
        resolution,
        weight,
    })
}

/// A header name as HTTP allows it, lowercased.
fn header_name(name: &str) -> Result<String, String> {
    hyper::header::HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_owned())
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

/// A header value as HTTP allows it (visible ASCII and spaces, no line breaks).
fn header_value(value: &str) -> Result<(), String> {
    hyper::header::HeaderValue::from_str(value)
        .map(drop)
        .map_err(|_| format!("{value:?} is not a valid HTTP header value"))
}

fn header_changes(h: RawHeaderChanges) -> Result<HeaderChanges, (String, String)> {
    let pairs = |what: &str,
                 v: Vec<RawHeader>|
     -> Result<Vec<(String, String)>, (String, String)> {
        v.into_iter()
            .enumerate()
            .map(|(i, h)| {
                let name = header_name(&h.name).map_err(|e| (format!(".{what}[{i}].name"), e))?;
                header_value(&h.value).map_err(|e| (format!(".{what}[{i}].value"), e))?;
                Ok((name, h.value))
            })
            .collect()
    };
    Ok(HeaderChanges {
        set: pairs("set", h.set)?,
        add: pairs("add", h.add)?,
        remove: h
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| header_name(n).map_err(|e| (format!(".remove[{i}]"), e)))
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(
    p: RawPathModifier,
    matches: &[RouteMatch],
) -> Result<PathRewrite, (String, String)> {
    let path_ok = |field: &str, v: &str| -> Result<(), (String, String)> {
        let ok = v.starts_with('/')
            && !v.contains(['?', '#'])
            && hyper::http::uri::PathAndQuery::try_from(v).is_ok();
        if ok {
            Ok(())
        } else {
            Err((
                format!(".path.{field}"),
                format!("{v:?} is not a URI path (it starts with / and has no spaces, ? or #)"),
            ))
        }
    };
    match (p.kind.as_str(), p.replace_full_path, p.replace_prefix_match) {
        ("ReplaceFullPath", Some(v), None) => {
            path_ok("replaceFullPath", &v)?;
            Ok(PathRewrite::Full(v))
        }
        ("ReplacePrefixMatch", None, Some(v)) => {
            path_ok("replacePrefixMatch", &v)?;
            let prefix_only = !matches.is_empty()
                && matches
                    .iter()
                    .all(|m| matches!(m.path, Some(PathMatch::Prefix(_))));
            if !prefix_only {
                return Err((
                    ".path".into(),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
                ));
            }
            Ok(PathRewrite::Prefix(v))
        }
        ("ReplaceFullPath" | "ReplacePrefixMatch", _, _) => Err((
            ".path".into(),
            "set exactly the field its type names (replaceFullPath or replacePrefixMatch)".into(),
        )),
        (other, _, _) => Err((
            ".path.type".into(),
            format!("{other:?}: expected ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn convert_filter(
    f: RawFilter,
    ctx: &RuleCtx<'_>,
    matches: &[RouteMatch],
) -> Result<Filter, (String, String)> {
    let namespace = ctx.namespace;
    let missing = |field: &str| {
        (
            format!(".{field}"),
            format!("is required for type {}", f.kind),
        )
    };
    // GRPCRoute has no rewrites or redirects: gRPC clients follow neither.
    if ctx.kind == RouteKind::Grpc && ["URLRewrite", "RequestRedirect"].contains(&f.kind.as_str()) {
        return Err((".type".into(), format!("{:?}: a GRPCRoute's filters are RequestHeaderModifier, ResponseHeaderModifier, RequestMirror and ExtensionRef", f.kind)));
    }
    match f.kind.as_str() {
        "RequestHeaderModifier" => Ok(Filter::RequestHeaders(header_changes(f.request_header_modifier.ok_or_else(|| missing("requestHeaderModifier"))?).map_err(|(x, e)| (format!(".requestHeaderModifier{x}"), e))?)),
        "ResponseHeaderModifier" => Ok(Filter::ResponseHeaders(header_changes(f.response_header_modifier.ok_or_else(|| missing("responseHeaderModifier"))?).map_err(|(x, e)| (format!(".responseHeaderModifier{x}"), e))?)),
        "URLRewrite" => {
            let r = f.url_rewrite.ok_or_else(|| missing("urlRewrite"))?;
            if let Some(h) = &r.hostname {
                header_value(h).map_err(|e| (".urlRewrite.hostname".to_owned(), e))?;
            }
            let path = r.path.map(|p| path_modifier(p, matches)).transpose().map_err(|(x, e)| (format!(".urlRewrite{x}"), e))?;
            Ok(Filter::Rewrite { hostname: r.hostname, path })
        }
        "RequestRedirect" => {
            let r = f.request_redirect.ok_or_else(|| missing("requestRedirect"))?;
            let status = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err((".requestRedirect.statusCode".into(), format!("{status}: expected 301, 302, 303, 307 or 308")));
            }
            if r.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                return Err((".requestRedirect.scheme".into(), "expected http or https".into()));
            }
            if let Some(h) = &r.hostname {
                header_value(h).map_err(|e| (".requestRedirect.hostname".to_owned(), e))?;
            }
            let path = r.path.map(|p| path_modifier(p, matches)).transpose().map_err(|(x, e)| (format!(".requestRedirect{x}"), e))?;
            Ok(Filter::Redirect { scheme: r.scheme, hostname: r.hostname, path, port: r.port, status })
        }
        "RequestMirror" => {
            let m = f.request_mirror.ok_or_else(|| missing("requestMirror"))?;
            let b = convert_backend(m.backend_ref, namespace, ctx.kind.as_str(), ctx.refs).map_err(|(x, e)| (format!(".requestMirror.backendRef{x}"), e))?;
            match b.resolution {
                Resolution::Resolved => {}
                Resolution::NotFound => return Err((".requestMirror.backendRef.name".into(), format!("no Service {}/{} is declared", b.namespace, b.service))),
                Resolution::NotPermitted => return Err((".requestMirror.backendRef.namespace".into(), format!("no ReferenceGrant in {} lets {} of {namespace} refer to Service {}", b.namespace, ctx.kind.as_str(), b.service))),
            }
            let percent = m.percent.unwrap_or(100);
            if percent > 100 {
                return Err((".requestMirror.percent".into(), "must be 0 to 100".into()));
            }
            Ok(Filter::Mirror { namespace: b.namespace, service: b.service, port: b.port, percent })
        }
        "ExtensionRef" => {
            let e = f.extension_ref.ok_or_else(|| missing("extensionRef"))?;
            if e.group != "weft.dev" || e.kind != "HTTPRouteFilter" {
                return Err((".extensionRef".into(), "weft knows extensions of group weft.dev, kind HTTPRouteFilter".into()));
            }
            let Some(ext) = ctx.extensions.get(e.name.as_str()) else {
                return Err((".extensionRef.name".into(), format!("no HTTPRouteFilter {namespace}/{} is declared", e.name)));
            };
            Ok(Filter::Extension { fault: ext.fault.clone(), rate_limit: ext.rate_limit, access_log: ext.access_log, bucket: format!("{}/{}", ctx.bucket_prefix, e.name) })
        }
        other => Err((".type".into(), format!("{other:?}: supported filters are RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect, RequestMirror and ExtensionRef"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_gep_2257() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "10", "1.5s", "10d", "1h1m1s1ms1h", "123456s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_prefix_matches_whole_segments() {
        let p = PathMatch::Prefix("/api".into());
        assert!(p.matches("/api") && p.matches("/api/v1") && !p.matches("/apix"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        assert!(PathMatch::Prefix("/api/".into()).matches("/api/v1"));
    }
}
