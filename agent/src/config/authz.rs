//! `AuthorizationPolicy` (`weft.dev/v1alpha1`): who may call a workload, in the shape of
//! Istio's policy of the same name.
//!
//! A policy selects workloads of its namespace (`selector.matchLabels`; none: all of
//! them) and has an action and rules. A rule matches when one of its `from` entries
//! matches the source (every field given in an entry must match) and one of its `to`
//! entries matches the destination and the request; a missing `from` or `to` matches
//! anything. A policy matches when one of its rules does; a policy without rules matches
//! nothing.
//!
//! For one connection or request to a workload ([`Policies::decide`]):
//! 1. a matching DENY policy denies (deny beats allow);
//! 2. if any ALLOW policy selects the workload, one must match (default deny);
//! 3. otherwise it is allowed.
//!
//! AUDIT policies never change the verdict: what they match is logged and counted. A
//! policy with `dryRun: true` is evaluated as if enforced, and when that would deny what
//! is allowed, the denial is logged and counted instead (for rolling a policy out).
//!
//! Where HTTP is not known ([`Http::Opaque`]: a TCP connection), a rule's HTTP fields
//! (methods, paths, headers) can never match for ALLOW, and are left out for DENY and
//! AUDIT (the rest of the rule decides), as Istio does. Where the sending agent already
//! judged the HTTP request ([`Http::JudgedBySender`]: a tunnel stream), rules with HTTP
//! fields are left to it.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::identity::SpiffeId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Source {
    /// SPIFFE IDs, or `*` for any authenticated workload.
    pub principals: Vec<String>,
    pub namespaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Destination {
    pub ports: Vec<u16>,
    /// Upper case, as sent.
    pub methods: Vec<String>,
    pub paths: Vec<PathMatch>,
    /// Lower-case name, exact value.
    pub headers: Vec<(String, String)>,
}

impl Destination {
    fn has_http(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Destination>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// None: every workload of the namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn selects(&self, w: &super::Workload) -> bool {
        w.namespace == self.namespace
            && self
                .selector
                .as_ref()
                .is_none_or(|s| s.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }
}

/// What is known of the HTTP request, if anything.
#[derive(Clone, Copy, Debug)]
pub enum Http<'a> {
    Known {
        method: &'a str,
        path: &'a str,
        headers: &'a hyper::HeaderMap,
    },
    /// A TCP connection: no HTTP to judge.
    Opaque,
    /// A tunnel stream: the sending agent judged the HTTP request (if it was one).
    JudgedBySender,
}

/// One connection or request, as a policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The proven identity of the source, if it has one (plaintext sources have none).
    pub source: Option<&'a SpiffeId>,
    /// The destination workload's port.
    pub port: u16,
    pub http: Http<'a>,
}

/// The outcome, and what to log and count besides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// `None`: allowed; `Some(why)`: denied, naming the policy or the default deny.
    pub denied: Option<String>,
    /// Dry-run policies that would have denied this allowed request.
    pub would_deny: Option<String>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
}

/// The policies selecting one workload.
#[derive(Clone, Debug, Default)]
pub struct Policies(pub Vec<std::sync::Arc<AuthorizationPolicy>>);

impl Policies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let actual = self.verdict(req, false);
        let with_dry_run = self.verdict(req, true);
        Decision {
            would_deny: (actual.is_none()).then_some(with_dry_run).flatten(),
            denied: actual,
            audited: self
                .0
                .iter()
                .filter(|p| p.action == Action::Audit && matches(p, req))
                .map(|p| p.id())
                .collect(),
        }
    }

    /// Denied, and why; counting dry-run policies as enforced or not.
    fn verdict(&self, req: &Request<'_>, dry_run: bool) -> Option<String> {
        let enforced = |p: &&std::sync::Arc<AuthorizationPolicy>| dry_run || !p.dry_run;
        if let Some(p) = self
            .0
            .iter()
            .filter(enforced)
            .find(|p| p.action == Action::Deny && matches(p, req))
        {
            return Some(format!("denied by {}", p.id()));
        }
        let mut allows = self
            .0
            .iter()
            .filter(enforced)
            .filter(|p| p.action == Action::Allow)
            .peekable();
        // No ALLOW policy in force: not denied.
        allows.peek()?;
        let names: Vec<String> = allows.clone().map(|p| p.id()).collect();
        if allows.any(|p| matches(p, req)) {
            None
        } else {
            Some(format!(
                "no rule of the ALLOW policies {} matches",
                names.join(", ")
            ))
        }
    }
}

fn matches(p: &AuthorizationPolicy, req: &Request<'_>) -> bool {
    p.rules.iter().any(|r| rule_matches(r, p.action, req))
}

fn rule_matches(r: &Rule, action: Action, req: &Request<'_>) -> bool {
    let from = r.from.is_empty() || r.from.iter().any(|s| source_matches(s, req.source));
    let to = r.to.is_empty() || r.to.iter().any(|d| dest_matches(d, action, req));
    from && to
}

fn source_matches(s: &Source, id: Option<&SpiffeId>) -> bool {
    let principal = s.principals.is_empty()
        || id.is_some_and(|id| {
            let text = id.to_string();
            s.principals.iter().any(|p| p == "*" || *p == text)
        });
    let namespace = s.namespaces.is_empty()
        || id
            .and_then(|id| id.workload_parts())
            .is_some_and(|(ns, _)| s.namespaces.iter().any(|n| n == ns));
    principal && namespace
}

fn dest_matches(d: &Destination, action: Action, req: &Request<'_>) -> bool {
    if !d.ports.is_empty() && !d.ports.contains(&req.port) {
        return false;
    }
    if !d.has_http() {
        return true;
    }
    match req.http {
        Http::Known {
            method,
            path,
            headers,
        } => {
            let path = path.split(['?', '#']).next().unwrap_or(path);
            (d.methods.is_empty() || d.methods.iter().any(|m| m == method))
                && (d.paths.is_empty()
                    || d.paths.iter().any(|p| match p {
                        PathMatch::Exact(x) => path == x,
                        PathMatch::Prefix(x) => path.starts_with(x.as_str()),
                    }))
                && d.headers.iter().all(|(n, v)| {
                    headers
                        .get_all(n.as_str())
                        .iter()
                        .any(|h| h.as_bytes() == v.as_bytes())
                })
        }
        // Nothing to judge the HTTP fields on: ALLOW cannot be granted by them; DENY and
        // AUDIT go by the rest of the rule.
        Http::Opaque => action != Action::Allow,
        // The sender judged them: this side neither grants nor denies by them.
        Http::JudgedBySender => action == Action::Allow,
    }
}

// ---- the document as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AuthzSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawSource>,
    #[serde(default)]
    to: Vec<RawDestination>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<RawPath>,
    #[serde(default)]
    headers: Vec<RawHeader>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

/// The document's spec as a policy, or the field that is wrong and why.
pub(super) fn convert(
    name: String,
    namespace: String,
    trust_domain: &str,
    spec: AuthzSpec,
) -> Result<AuthorizationPolicy, (String, String)> {
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some(other) => {
            return Err((
                "spec.action".into(),
                format!("{other:?} is not an action: expected ALLOW, DENY or AUDIT"),
            ))
        }
    };
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, r) in spec.rules.into_iter().enumerate() {
        let mut from = Vec::new();
        for (j, s) in r.from.into_iter().enumerate() {
            for (k, p) in s.principals.iter().enumerate() {
                if p == "*" {
                    continue;
                }
                let field = || format!("spec.rules[{i}].from[{j}].principals[{k}]");
                let id = SpiffeId::parse(p).map_err(|e| (field(), e.to_string()))?;
                if id.workload_parts().is_none() || id.trust_domain() != trust_domain {
                    return Err((
                        field(),
                        format!("{p:?} is not a workload identity of this mesh (spiffe://{trust_domain}/ns/<namespace>/sa/<service account>, or \"*\")"),
                    ));
                }
            }
            from.push(Source {
                principals: s.principals,
                namespaces: s.namespaces,
            });
        }
        let mut to = Vec::new();
        for (j, d) in r.to.into_iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].to[{j}].{f}");
            if let Some(k) = d.ports.iter().position(|p| *p == 0) {
                return Err((at(&format!("ports[{k}]")), "0 is not a port".into()));
            }
            let mut paths = Vec::new();
            for (k, p) in d.paths.into_iter().enumerate() {
                paths.push(match (p.exact, p.prefix) {
                    (Some(x), None) if x.starts_with('/') => PathMatch::Exact(x),
                    (None, Some(x)) if x.starts_with('/') => PathMatch::Prefix(x),
                    (Some(_), Some(_)) | (None, None) => {
                        return Err((
                            at(&format!("paths[{k}]")),
                            "give exactly one of exact or prefix".into(),
                        ))
                    }
                    _ => return Err((at(&format!("paths[{k}]")), "a path starts with /".into())),
                });
            }
            let mut headers = Vec::new();
            for (k, h) in d.headers.into_iter().enumerate() {
                if hyper::header::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    return Err((
                        at(&format!("headers[{k}].name")),
                        format!("{:?} is not a header name", h.name),
                    ));
                }
                headers.push((h.name.to_ascii_lowercase(), h.value));
            }
            if let Some(k) = d
                .methods
                .iter()
                .position(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err((
                    at(&format!("methods[{k}]")),
                    format!("{:?} is not an HTTP method in upper case", d.methods[k]),
                ));
            }
            to.push(Destination {
                ports: d.ports,
                methods: d.methods,
                paths,
                headers,
            });
        }
        rules.push(Rule { from, to });
    }
    Ok(AuthorizationPolicy {
        name,
        namespace,
        selector: spec.selector.map(|s| s.match_labels),
        action,
        dry_run: spec.dry_run,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload("cluster.local", ns, sa).unwrap()
    }

    fn policy(action: Action, rules: Vec<Rule>) -> Arc<AuthorizationPolicy> {
        Arc::new(AuthorizationPolicy {
            name: format!("{action:?}").to_lowercase(),
            namespace: "shop".into(),
            selector: None,
            action,
            dry_run: false,
            rules,
        })
    }

    fn from_ns(ns: &str) -> Rule {
        Rule {
            from: vec![Source {
                namespaces: vec![ns.into()],
                ..Source::default()
            }],
            to: vec![],
        }
    }

    fn get<'a>(
        source: Option<&'a SpiffeId>,
        path: &'a str,
        h: &'a hyper::HeaderMap,
    ) -> Request<'a> {
        Request {
            source,
            port: 8080,
            http: Http::Known {
                method: "GET",
                path,
                headers: h,
            },
        }
    }

    #[test]
    fn deny_beats_allow_and_allow_is_default_deny() {
        let h = hyper::HeaderMap::new();
        let (shop, other) = (id("shop", "web"), id("other", "x"));
        let admin = Rule {
            from: vec![],
            to: vec![Destination {
                paths: vec![PathMatch::Prefix("/admin".into())],
                ..Destination::default()
            }],
        };
        let p = Policies(vec![
            policy(Action::Allow, vec![from_ns("shop")]),
            policy(Action::Deny, vec![admin]),
        ]);
        assert_eq!(p.decide(&get(Some(&shop), "/x?q", &h)).denied, None);
        assert_eq!(
            p.decide(&get(Some(&shop), "/admin/users", &h))
                .denied
                .as_deref(),
            Some("denied by shop/deny")
        );
        assert!(p.decide(&get(Some(&other), "/x", &h)).denied.is_some());
        assert!(
            p.decide(&get(None, "/x", &h)).denied.is_some(),
            "plaintext has no namespace"
        );
        // No policy: allowed.
        assert_eq!(
            Policies::default().decide(&get(None, "/x", &h)).denied,
            None
        );
        // An ALLOW policy without rules allows nothing.
        let none = Policies(vec![policy(Action::Allow, vec![])]);
        assert!(none.decide(&get(Some(&shop), "/x", &h)).denied.is_some());
    }

    #[test]
    fn http_fields_where_http_is_not_known() {
        let shop = id("shop", "web");
        let get_only = Rule {
            from: vec![],
            to: vec![Destination {
                methods: vec!["GET".into()],
                ..Destination::default()
            }],
        };
        let tcp = Request {
            source: Some(&shop),
            port: 8080,
            http: Http::Opaque,
        };
        let tunnel = Request {
            http: Http::JudgedBySender,
            ..tcp
        };
        let allow = Policies(vec![policy(Action::Allow, vec![get_only.clone()])]);
        assert!(
            allow.decide(&tcp).denied.is_some(),
            "ALLOW by method cannot admit TCP"
        );
        assert_eq!(
            allow.decide(&tunnel).denied,
            None,
            "the sender judged the method"
        );
        let deny = Policies(vec![policy(Action::Deny, vec![get_only])]);
        assert!(
            deny.decide(&tcp).denied.is_some(),
            "DENY by method denies TCP"
        );
        assert_eq!(
            deny.decide(&tunnel).denied,
            None,
            "the sender judged the method"
        );
    }

    #[test]
    fn audit_and_dry_run_only_report() {
        let h = hyper::HeaderMap::new();
        let other = id("other", "x");
        let mut dry = (*policy(Action::Allow, vec![from_ns("shop")])).clone();
        dry.dry_run = true;
        let p = Policies(vec![
            Arc::new(dry),
            policy(Action::Audit, vec![from_ns("other")]),
        ]);
        let d = p.decide(&get(Some(&other), "/x", &h));
        assert_eq!(d.denied, None);
        assert_eq!(d.audited, vec!["shop/audit".to_string()]);
        assert!(d.would_deny.unwrap().contains("shop/allow"));
    }

    #[test]
    fn ports_principals_and_headers() {
        let mut h = hyper::HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        let web = id("shop", "web");
        let rule = Rule {
            from: vec![Source {
                principals: vec![web.to_string()],
                ..Source::default()
            }],
            to: vec![Destination {
                ports: vec![8080],
                headers: vec![("x-user".into(), "alice".into())],
                ..Destination::default()
            }],
        };
        let p = Policies(vec![policy(Action::Allow, vec![rule])]);
        assert_eq!(p.decide(&get(Some(&web), "/", &h)).denied, None);
        let other_port = Request {
            port: 9090,
            ..get(Some(&web), "/", &h)
        };
        assert!(p.decide(&other_port).denied.is_some());
        let empty = hyper::HeaderMap::new();
        assert!(p.decide(&get(Some(&web), "/", &empty)).denied.is_some());
        assert!(p
            .decide(&get(Some(&id("shop", "db")), "/", &h))
            .denied
            .is_some());
    }
}
