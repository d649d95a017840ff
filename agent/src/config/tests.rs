//! Parsing and validation: every refusal names the file, the document and the field.

use std::{net::Ipv4Addr, path::Path};

use super::*;

const NODE: &str = "apiVersion: weft.dev/v1alpha1\nkind: Node\nmetadata: {name: a}\nspec: {address: 192.168.0.1}\n";

fn parse(extra: &str) -> Result<Config, ConfigError> {
    load_str(Path::new("mesh.yaml"), &format!("{NODE}---\n{extra}"))
}

fn err(extra: &str) -> String {
    parse(extra).expect_err("should be refused").to_string()
}

#[test]
fn a_complete_document_set_parses() {
    let cfg = parse(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/agent-down: fail-open}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {node: a, ip: 10.0.0.5, serviceAccount: cart, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.1.1
  selector: {app: cart}
  ports: [{port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP}]
"#,
    )
    .unwrap();
    let w = &cfg.workloads[0];
    assert_eq!(
        (w.id().as_str(), w.meshed, w.agent_down),
        ("shop/cart-1", true, AgentDown::FailOpen)
    );
    assert_eq!(
        cfg.services[0].ports[0].target,
        TargetPort::Name("http".into())
    );
    assert_eq!(cfg.services[0].ports[1].protocol, Protocol::Udp);
}

#[test]
fn a_bad_address_names_file_document_object_and_field() {
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}\n");
    assert!(
        e.starts_with("mesh.yaml: document 2 (Service default/web): field `spec.clusterIP`"),
        "{e}"
    );
}

#[test]
fn a_nested_field_error_has_its_full_path() {
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 70000}]}\n");
    assert!(e.contains("field `spec.ports[1].port`"), "{e}");
}

#[test]
fn unknown_fields_and_kinds_are_refused() {
    assert!(err("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIp: 10.96.0.1, ports: []}\n").contains("field `spec.clusterIp`: unknown field of a Service spec"));
    assert!(
        err("apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n")
            .contains("field `kind`: unknown kind \"Deployment\"")
    );
    assert!(err("apiVersion: v2\nkind: Service\nmetadata: {name: x}\n")
        .contains("field `apiVersion`: must be v1"));
}

#[test]
fn references_and_duplicates_are_checked() {
    let e = err("apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec: {node: zz, ip: 10.0.0.1}\n");
    assert!(e.contains("field `spec.node`: no Node named \"zz\""), "{e}");
    let two = "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec: {node: a, ip: 10.0.0.1}\n";
    assert!(err(&format!("{two}---\n{two}")).contains("duplicate Workload default/w"));
    let other = "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: v}\nspec: {node: a, ip: 10.0.0.1}\n";
    assert!(err(&format!("{two}---\n{other}"))
        .contains("10.0.0.1 is already the address of workload default/w"));
    let svc = |n: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n")
    };
    assert!(err(&format!("{}---\n{}", svc("a"), svc("b")))
        .contains("10.96.0.1:80/Tcp is already served by Service default/a"));
}

#[test]
fn the_agents_own_ports_cannot_be_declared() {
    let e = err("apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec: {node: a, ip: 10.0.0.1, ports: [{port: 15001}]}\n");
    assert!(
        e.contains("field `spec.ports[0].port`: 15001 is not usable"),
        "{e}"
    );
}

#[test]
fn namespace_labels_are_validated() {
    let e = err(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {weft.dev/mesh: maybe}}\n",
    );
    assert!(
        e.contains("metadata.labels.weft.dev/mesh") && e.contains("expected enabled or disabled"),
        "{e}"
    );
}

#[test]
fn yaml_syntax_errors_name_the_file() {
    let e = load_str(Path::new("broken.yaml"), "kind: [unclosed")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("broken.yaml: not valid YAML"), "{e}");
}

#[test]
fn every_documented_example_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue; // traffic/: checked below, one feature at a time
        }
        if let Err(e) = load_path(&path) {
            panic!("{} is invalid: {e}", path.display());
        }
        n += 1;
    }
    assert!(n >= 3, "examples missing from {}", dir.display());
    let cfg = load_path(&dir.join("postures.yaml")).unwrap();
    let by_name = |n: &str| cfg.workloads.iter().find(|w| w.name == n).unwrap().clone();
    assert_eq!(by_name("report").agent_down, AgentDown::FailOpen);
    assert_eq!(by_name("payments").agent_down, AgentDown::FailClosed);
    assert!(!by_name("old-app").meshed);
}

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-v2}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80, appProtocol: http}]}\n---\n";

fn route(rules: &str) -> String {
    format!("{WEB}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{kind: Service, name: web, port: 80}}]\n  rules:\n{rules}")
}

#[test]
fn a_canary_route_parses() {
    let cfg = parse(&route(
        r#"    - matches:
        - path: {type: PathPrefix, value: /api}
          headers: [{name: X-Api-Version, value: "2"}]
          method: GET
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-canary, value: "yes"}], remove: [x-debug]}
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs:
        - {name: web, port: 80, weight: 90}
        - {name: web-v2, port: 80, weight: 10}
      timeouts: {request: 2s, backendRequest: 500ms}
      retry: {codes: [503], attempts: 2, backoff: 100ms}
"#,
    ))
    .unwrap();
    let r = &cfg.routes[0];
    assert_eq!((r.name.as_str(), r.namespace.as_str()), ("r", "default"));
    assert_eq!(
        r.parents,
        [route::Parent {
            namespace: "default".into(),
            service: "web".into(),
            port: Some(80)
        }]
    );
    let rule = &r.rules[0];
    assert_eq!(
        rule.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        [90, 10]
    );
    assert_eq!(
        rule.matches[0].headers[0].0, "x-api-version",
        "header names are lowercased"
    );
    assert_eq!(
        rule.backend_timeout,
        Some(std::time::Duration::from_millis(500))
    );
    assert_eq!(rule.retry.as_ref().unwrap().attempts, 2);
    assert_eq!(rule.filters.len(), 2);
    assert_eq!(
        cfg.services[1].ports[0].app_protocol,
        Some(AppProtocol::Http)
    );
}

#[test]
fn route_errors_name_the_field() {
    // A backend Service that is not declared leaves the route accepted, its refs
    // unresolved (the Gateway API's ResolvedRefs=False, BackendNotFound).
    let cfg = parse(&route("    - backendRefs: [{name: nope, port: 80}]\n")).unwrap();
    assert_eq!(
        cfg.routes[0].unresolved(),
        [(route::Resolution::NotFound, "default/nope:80".to_owned())]
    );
    let e = err(&route("    - backendRefs: [{name: web, port: 81}]\n"));
    assert!(
        e.contains("spec.rules[0].backendRefs[0].port`: Service default/web has no TCP port 81"),
        "{e}"
    );
    let e = err(&route("    - matches: [{headers: [{name: \"bad name\", value: x}]}]\n      backendRefs: [{name: web, port: 80}]\n"));
    assert!(
        e.contains("spec.rules[0].matches[0].headers[0].name`: \"bad name\" is not a valid HTTP header name"),
        "{e}"
    );
    let e = err(&route("    - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: \"x\\ny\"}]}}]\n      backendRefs: [{name: web, port: 80}]\n"));
    assert!(
        e.contains("spec.rules[0].filters[0].requestHeaderModifier.set[0].value`"),
        "{e}"
    );
    let e = err(&route("    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: \"/a b\"}}}]\n      backendRefs: [{name: web, port: 80}]\n"));
    assert!(
        e.contains(
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath`: \"/a b\" is not a URI path"
        ),
        "{e}"
    );
    let e = err(&route("    - matches: [{headers: [{type: RegularExpression, name: a, value: \"(\"}]}]\n      backendRefs: [{name: web, port: 80}]\n"));
    assert!(
        e.contains("spec.rules[0].matches[0].headers[0].value`: invalid regular expression"),
        "{e}"
    );
    let e = err(&route("    - backendRefs: [{name: web, port: 80}]\n      timeouts: {request: 1s, backendRequest: 2s}\n"));
    assert!(
        e.contains("timeouts.backendRequest`: must not exceed timeouts.request"),
        "{e}"
    );
    let e = err(&route(
        "    - backendRefs: [{name: web, port: 80, weight: 0}]\n",
    ));
    assert!(e.contains("all weights are 0"), "{e}");
    let e = err(&route("    - matches: [{path: {type: Exact, value: /a}}]\n      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n      backendRefs: [{name: web, port: 80}]\n"));
    assert!(
        e.contains("ReplacePrefixMatch needs every match of the rule to be a PathPrefix"),
        "{e}"
    );
    let e = err(&format!("{WEB}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{parentRefs: [{{name: gone}}]}}\n"));
    assert!(
        e.contains("spec.parentRefs[0].name`: no Service default/gone"),
        "{e}"
    );
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80, appProtocol: quic}]}\n");
    assert!(e.contains("spec.ports[0].appProtocol`: \"quic\""), "{e}");
}

/// docs/examples/traffic: each feature file, with the cluster it runs against.
#[test]
fn every_traffic_example_is_valid_with_its_cluster() {
    use crate::config::{policy::Balancer, route::Filter};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/traffic");
    let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let example = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        load_str(Path::new(name), &format!("{cluster}\n---\n{text}"))
            .unwrap_or_else(|e| panic!("{name} is invalid: {e}"))
    };
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "cluster.yaml" {
            example(&name);
            n += 1;
        }
    }
    assert!(n >= 10, "examples missing from {}", dir.display());
    let consumer = example("consumer-route.yaml");
    assert_eq!(consumer.routes[0].parents[0].namespace, "shop");
    assert!(consumer.routes[0].unresolved().is_empty(), "granted");
    assert_eq!(
        example("grpc-route.yaml").routes[0].kind,
        route::RouteKind::Grpc
    );
    let weights: Vec<u32> = example("canary.yaml").routes[0].rules[0]
        .backends
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(weights, [90, 10]);
    let p = &example("balancing-and-outliers.yaml").policies[0].policy;
    assert_eq!(p.balancer, Balancer::LeastRequest);
    assert_eq!(p.outlier.as_ref().unwrap().max_ejection.as_secs(), 120);
    let cb = &example("circuit-breaker.yaml").policies[0].policy.breaker;
    assert_eq!(
        (
            cb.max_active_requests,
            cb.max_pending_requests,
            cb.max_connections
        ),
        (100, 50, Some(200))
    );
    let logging = example("access-log.yaml");
    let rule = |i: usize| match &logging.routes[0].rules[i].filters[0] {
        Filter::Extension { access_log, .. } => *access_log,
        other => panic!("{other:?}"),
    };
    assert_eq!(rule(0).map(|a| a.enabled), Some(false));
    assert_eq!(rule(1).and_then(|a| a.sample), Some(0.1));
    let f = &example("fault-injection.yaml").routes[0].rules[0].filters[0];
    assert!(matches!(f, Filter::Extension { fault: Some(x), .. } if x.abort == Some((503, 10))));
    let rl = example("rate-limit.yaml");
    assert_eq!(
        rl.policies[0].policy.rate_limit.unwrap().burst,
        100,
        "burst defaults to the rate"
    );
    let retry = example("timeouts-and-retries.yaml").routes[0].rules[0]
        .retry
        .clone()
        .unwrap();
    assert_eq!((retry.codes, retry.attempts), (vec![502, 503], 2));
}

const POLICY_BASE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n";

fn policy_error(doc: &str) -> String {
    load_str(Path::new("p.yaml"), &format!("{POLICY_BASE}{doc}"))
        .unwrap_err()
        .to_string()
}

#[test]
fn policy_errors_name_the_field() {
    let e = policy_error("apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {kind: Service, name: nope}}\n");
    assert!(
        e.contains("field `spec.targetRef.name`: no Service default/nope"),
        "{e}"
    );
    let e = policy_error("apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {kind: Service, name: web}, loadBalancer: Random}\n");
    assert!(
        e.contains("spec.loadBalancer") && e.contains("PeakEWMA, RoundRobin or LeastRequest"),
        "{e}"
    );
    let two = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {kind: Service, name: web}}\n---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: q}\nspec: {targetRef: {kind: Service, name: web}}\n";
    let e = policy_error(two);
    assert!(
        e.contains("(TrafficPolicy default/q)") && e.contains("already has a TrafficPolicy"),
        "{e}"
    );
    let e = policy_error("apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {kind: Service, name: web}, outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 10s}}\n");
    assert!(e.contains("spec.outlierDetection.maxEjectionTime"), "{e}");
    let e = policy_error("apiVersion: weft.dev/v1alpha1\nkind: HTTPRouteFilter\nmetadata: {name: f}\nspec: {fault: {abort: {httpStatus: 700}}}\n");
    assert!(e.contains("spec.fault.abort.httpStatus"), "{e}");
    let e = policy_error("apiVersion: weft.dev/v1alpha1\nkind: HTTPRouteFilter\nmetadata: {name: f}\nspec: {rateLimit: {requestsPerSecond: 0}}\n");
    assert!(e.contains("spec.rateLimit.requestsPerSecond"), "{e}");
    let e = policy_error("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n    - filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: nope}}]\n      backendRefs: [{name: web, port: 80}]\n");
    assert!(
        e.contains("spec.rules[0].filters[0].extensionRef.name")
            && e.contains("no HTTPRouteFilter default/nope"),
        "{e}"
    );
    let e = policy_error("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: t}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  hostnames: [\"bad name\"]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n");
    assert!(
        e.contains("spec.hostnames[0]") && e.contains("not a DNS name"),
        "{e}"
    );
}

const MESH: &str = "apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\n";

#[test]
fn the_mesh_names_the_trust_domain_once() {
    assert_eq!(parse("").unwrap().trust_domain(), "cluster.local");
    let cfg = parse(&format!("{MESH}spec: {{trustDomain: prod.example.com}}\n")).unwrap();
    assert_eq!(cfg.trust_domain(), "prod.example.com");

    let e = err(&format!("{MESH}spec: {{trustDomain: Prod_Example}}\n"));
    assert!(
        e.contains("Mesh mesh") && e.contains("field `spec.trustDomain`"),
        "{e}"
    );
    let other = MESH.replace("{name: mesh}", "{name: other}");
    let e = err(&format!("{MESH}spec: {{}}\n---\n{other}spec: {{}}\n"));
    assert!(e.contains("only one Mesh document"), "{e}");
}

#[test]
fn a_workload_must_name_a_valid_identity() {
    let e = err("apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec: {node: a, ip: 10.0.0.1, serviceAccount: \"bad/name\", ports: [{port: 80}]}\n");
    assert!(
        e.contains("Workload default/w") && e.contains("field `spec.serviceAccount`"),
        "{e}"
    );
}

#[test]
fn authorization_policy_errors_name_the_field() {
    let doc = |spec: &str| {
        format!("apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n")
    };
    let e = err(&doc("{action: PERMIT}"));
    assert!(
        e.contains("AuthorizationPolicy shop/p") && e.contains("field `spec.action`"),
        "{e}"
    );
    let e = err(&doc(
        "{rules: [{from: [{principals: [\"spiffe://other.domain/ns/a/sa/b\"]}]}]}",
    ));
    assert!(
        e.contains("field `spec.rules[0].from[0].principals[0]`"),
        "{e}"
    );
    let e = err(&doc("{rules: [{to: [{paths: [{exact: x}]}]}]}"));
    assert!(e.contains("field `spec.rules[0].to[0].paths[0]`"), "{e}");
    let e = err(&doc("{rules: [{to: [{methods: [get]}]}]}"));
    assert!(e.contains("field `spec.rules[0].to[0].methods[0]`"), "{e}");
    let e = err(&doc("{rules: [{to: [{verbs: [GET]}]}]}"));
    assert!(e.contains("unknown field `verbs`"), "{e}");
    let ok = parse(&doc(
        "{selector: {matchLabels: {app: web}}, action: DENY, dryRun: true, rules: [{from: [{namespaces: [shop], principals: [\"*\"]}], to: [{ports: [8080], methods: [GET], paths: [{prefix: /api/}], headers: [{name: X-User, value: alice}]}]}]}",
    ))
    .unwrap();
    let p = &ok.authorization[0];
    assert_eq!((p.action, p.dry_run), (authz::Action::Deny, true));
    assert_eq!(
        p.rules[0].to[0].headers,
        vec![("x-user".into(), "alice".into())]
    );
}

#[test]
fn mtls_comes_from_the_workload_then_its_namespace() {
    let cfg = parse(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: pay, labels: {weft.dev/mtls: strict}}\n---\napiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: a, namespace: pay}\nspec: {node: a, ip: 10.0.0.1}\n---\napiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: b, namespace: pay}\nspec: {node: a, ip: 10.0.0.2, mtls: permissive}\n---\napiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: c}\nspec: {node: a, ip: 10.0.0.3}\n",
    )
    .unwrap();
    let by_name = |n: &str| cfg.workloads.iter().find(|w| w.name == n).unwrap().mtls;
    assert_eq!(
        (by_name("a"), by_name("b"), by_name("c")),
        (Mtls::Strict, Mtls::Permissive, Mtls::Permissive)
    );
    let e =
        err("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {weft.dev/mtls: on}}\n");
    assert!(e.contains("metadata.labels.weft.dev/mtls"), "{e}");
}

#[test]
fn a_declared_quarantine_is_checked_and_kept_apart_from_run_time_ones() {
    let doc = |q: &str| {
        format!("apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: web-2}}\nspec: {{node: a, ip: 10.0.0.6, quarantine: {q}}}\n")
    };
    let cfg = parse(&doc(
        "{reason: leaking, allowFrom: [10.0.0.0/24, 'spiffe://cluster.local/ns/ops/sa/debug'], setBy: weftctl}",
    ))
    .unwrap();
    let q = cfg.workloads[0].quarantine.as_ref().unwrap();
    assert_eq!(q.reason, "leaking");
    assert_eq!(
        q.set_by,
        quarantine::SetBy::Configuration,
        "a document cannot claim weftctl set it"
    );
    let e = err(&doc("{reason: leaking, allowFrom: [10.0.0.0/24, web]}"));
    assert!(
        e.contains("field `spec.quarantine.allowFrom[1]`") && e.contains("SPIFFE ID"),
        "{e}"
    );
    let e = err(&doc("{reason: ''}"));
    assert!(e.contains("field `spec.quarantine.reason`"), "{e}");
    let e = err(&doc("{reason: x, allowFrm: []}"));
    assert!(e.contains("allowFrm"), "{e}");

    // A run-time quarantine goes on a workload the configuration does not quarantine.
    let dir = std::env::temp_dir().join(format!("weft-quarantine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("quarantine.json");
    let mut o = quarantine::Overrides::load(path.clone());
    let q = quarantine::Quarantine {
        reason: "slow".into(),
        allow_from: vec![],
        set_by: quarantine::SetBy::Weftctl,
    };
    o.set("default/web-2", q).unwrap();
    let mut cfg = parse("apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: web-2}\nspec: {node: a, ip: 10.0.0.6}\n").unwrap();
    quarantine::Overrides::load(path.clone()).apply(&mut cfg);
    let q = cfg.workloads[0]
        .quarantine
        .as_ref()
        .expect("kept in the file");
    assert_eq!(
        (q.reason.as_str(), q.set_by),
        ("slow", quarantine::SetBy::Weftctl)
    );
    assert!(o.lift("default/web-2").unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_access_log_share_is_checked() {
    let e = err("apiVersion: weft.dev/v1alpha1\nkind: HTTPRouteFilter\nmetadata: {name: f}\nspec: {accessLog: {sample: 2}}\n");
    assert!(
        e.contains("spec.accessLog.sample") && e.contains("0 to 1"),
        "{e}"
    );
}

/// The same app as `docs/examples/cluster-snapshot.yaml`, in weft's shorthand kinds.
const SHORTHAND: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: node-a}
spec: {address: 192.168.60.1}
---
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: node-b}
spec: {address: 192.168.60.2}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: cart-7d9f8c6b5-x2k8p, namespace: shop, labels: {app: cart, pod-template-hash: 7d9f8c6b5}}
spec: {node: node-a, ip: 10.244.1.5, serviceAccount: cart, ports: [{name: http, port: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: cart-7d9f8c6b5-q7m4t, namespace: shop, labels: {app: cart, pod-template-hash: 7d9f8c6b5}}
spec: {node: node-b, ip: 10.244.2.7, serviceAccount: cart, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.20.10
  selector: {app: cart}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

fn snapshot() -> Config {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    load_path(&dir.join("cluster-snapshot.yaml")).unwrap()
}

fn endpoints_of(cfg: &Config, node: &str, vip: &str) -> Vec<(String, String, Option<String>)> {
    let st = crate::state::NodeState::build(node, cfg, 1, None);
    st.service(vip.parse().unwrap(), Protocol::Tcp)
        .unwrap()
        .endpoints
        .iter()
        .map(|e| {
            (
                e.addr.to_string(),
                e.workload.to_string(),
                e.identity.as_deref().map(str::to_owned),
            )
        })
        .collect()
}

#[test]
fn a_kubectl_snapshot_reads_as_the_cluster_it_came_from() {
    let cfg = snapshot();
    assert_eq!(cfg.nodes["node-b"].address, Ipv4Addr::new(192, 168, 60, 2));
    // The pending pod (no address) and the host-network pod are not workloads.
    let names: Vec<_> = cfg.workloads.iter().map(|w| w.id()).collect();
    assert_eq!(
        names,
        ["shop/cart-7d9f8c6b5-x2k8p", "shop/cart-7d9f8c6b5-q7m4t"]
    );
    assert!(cfg.workloads.iter().all(|w| w.meshed));
    let shorthand = load_str(Path::new("shorthand.yaml"), SHORTHAND).unwrap();
    assert_eq!(cfg.nodes, shorthand.nodes);
    assert_eq!(cfg.workloads, shorthand.workloads);
    assert_eq!(cfg.services, shorthand.services);
    // Endpoints from the EndpointSlice are the ones the selector finds.
    let from_slice = endpoints_of(&cfg, "node-a", "10.96.20.10:80");
    assert_eq!(
        from_slice,
        endpoints_of(&shorthand, "node-a", "10.96.20.10:80")
    );
    assert_eq!(
        from_slice[1],
        (
            "10.244.2.7:8080".into(),
            "shop/cart-7d9f8c6b5-q7m4t".into(),
            Some("spiffe://cluster.local/ns/shop/sa/cart".into())
        )
    );
}

#[test]
fn pods_are_meshed_by_their_namespace_or_their_annotation() {
    let pod = |name: &str, ns: &str, ip: &str, annotations: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{{annotations}}}}}\nspec: {{nodeName: a, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n---\n")
    };
    let cfg = parse(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: on, labels: {{weft.dev/mesh: enabled}}}}\n---\n{}{}{}{}",
        pod("plain", "default", "10.0.0.1", ""),
        pod("opted-in", "default", "10.0.0.2", "weft.dev/mesh: enabled"),
        pod("by-namespace", "on", "10.0.0.3", ""),
        pod("opted-out", "on", "10.0.0.4", "weft.dev/mesh: disabled"),
    ))
    .unwrap();
    let meshed: Vec<_> = cfg
        .workloads
        .iter()
        .map(|w| (w.name.as_str(), w.meshed))
        .collect();
    assert_eq!(
        meshed,
        [
            ("plain", false),
            ("opted-in", true),
            ("by-namespace", true),
            ("opted-out", false)
        ]
    );
    let e = err(&pod("bad", "default", "10.0.0.5", "weft.dev/mesh: yes"));
    assert!(
        e.contains(
            "field `metadata.annotations.weft.dev/mesh`: \"yes\": expected enabled or disabled"
        ),
        "{e}"
    );
}

#[test]
fn endpoint_slices_give_ready_endpoints_or_the_terminating_ones_still_serving() {
    let slice = |conditions: [&str; 2]| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.0.0.1], conditions: {}}}
- {{addresses: [10.0.0.2], conditions: {}}}
"#,
            conditions[0], conditions[1]
        )
    };
    let addrs = |conditions| {
        endpoints_of(&parse(&slice(conditions)).unwrap(), "a", "10.96.0.1:80")
            .into_iter()
            .map(|(a, w, id)| {
                // Pods weft does not know: named by address, outside the mesh.
                assert_eq!((a.split(':').next().unwrap(), id), (w.as_str(), None));
                a
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        addrs(["{ready: true}", "{ready: false}"]),
        ["10.0.0.1:8080"]
    );
    assert_eq!(addrs(["{}", "{}"]), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert_eq!(
        addrs([
            "{ready: false, serving: true, terminating: true}",
            "{ready: false, serving: false, terminating: true}"
        ]),
        ["10.0.0.1:8080"],
        "none ready: the terminating endpoints that still serve"
    );
}

#[test]
fn an_invalid_object_is_left_out_and_the_rest_applies() {
    let svc = |name: &str, ip: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n")
    };
    let route = |name: &str, parent: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec: {{parentRefs: [{{name: {parent}, kind: Service, group: \"\"}}], rules: [{{backendRefs: [{{name: {parent}, port: 80}}]}}]}}\n---\n")
    };
    let load = |text: &str, prev: Option<&Config>| {
        load_objects(
            [Source::Text(
                Path::new("mesh.yaml"),
                &format!("{NODE}---\n{text}"),
            )],
            prev,
        )
        .unwrap()
    };
    let first = load(
        &format!(
            "{}{}{}",
            svc("web", "10.96.0.1"),
            svc("api", "10.96.0.2"),
            route("to-web", "web")
        ),
        None,
    );
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);

    // web's new address is invalid, and a new route names a Service that does not exist;
    // api's change and the new valid route apply.
    let second = load(
        &format!(
            "{}{}{}{}",
            svc("web", "10.96.0.999"),
            svc("api", "10.96.0.3"),
            route("to-web", "web"),
            route("to-nowhere", "nothing")
        ),
        Some(&first.config),
    );
    let why: Vec<_> = second
        .rejected
        .iter()
        .map(|r| (r.kind.as_str(), r.name.as_str(), r.kept_previous))
        .collect();
    assert_eq!(
        why,
        [("Service", "web", true), ("HTTPRoute", "to-nowhere", false)]
    );
    assert!(
        second.rejected[0]
            .to_string()
            .starts_with("mesh.yaml: document 2 (Service default/web): field `spec.clusterIP`"),
        "{}",
        second.rejected[0]
    );
    let ips: Vec<_> = second
        .config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.cluster_ip.to_string()))
        .collect();
    assert_eq!(
        ips,
        [("web", "10.96.0.1".into()), ("api", "10.96.0.3".into())],
        "web keeps its last accepted version; api's change applies"
    );
    let routes: Vec<_> = second
        .config
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(routes, ["to-web"]);
    // Without an earlier version, the invalid object is simply left out; strict loading
    // (validate) refuses the whole.
    let fresh = load(&svc("web", "10.96.0.999"), None);
    assert!(fresh.config.services.is_empty() && !fresh.rejected[0].kept_previous);
    assert!(fresh.strict().is_err());
}

#[test]
fn a_list_item_is_located_by_document_and_item() {
    let e = err("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: ok}}\n- {apiVersion: v1, kind: Service, metadata: {name: web}, spec: {clusterIP: nope, ports: [{port: 80}]}}\n");
    assert!(
        e.starts_with("mesh.yaml: document 2 item 2 (Service default/web): field `spec.clusterIP`"),
        "{e}"
    );
}

#[test]
fn a_pod_is_quarantined_by_its_annotations() {
    let pod = |annotations: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, annotations: {{{annotations}}}}}\nspec: {{nodeName: a, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.0.0.1}}\n")
    };
    let cfg = parse(&pod(
        "weft.dev/quarantine: leaking memory, weft.dev/quarantine-allow-from: \"10.0.9.0/24, spiffe://cluster.local/ns/ops/sa/debug\"",
    ))
    .unwrap();
    let q = cfg.workloads[0].quarantine.as_deref().unwrap();
    assert_eq!(q.reason, "leaking memory");
    assert_eq!(
        q.allow_from,
        ["10.0.9.0/24", "spiffe://cluster.local/ns/ops/sa/debug"]
    );
    let e = err(&pod(
        "weft.dev/quarantine: x, weft.dev/quarantine-allow-from: nonsense",
    ));
    assert!(
        e.contains("field `metadata.annotations.weft.dev/quarantine-allow-from[0]`"),
        "{e}"
    );
}

#[test]
fn every_deploy_example_is_accepted() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "examples missing from {}", dir.display());
    let cfg = load_sources(files.iter().map(|p| Source::Path(p))).unwrap();
    assert_eq!(cfg.routes.len(), 1);
    assert!(cfg.routes[0].unresolved().is_empty());
    assert_eq!(cfg.namespaces["shop"].mtls, Some(Mtls::Strict));
    assert_eq!((cfg.policies.len(), cfg.authorization.len()), (1, 1));
}

/// Two namespaces: `shop` serves `cart` (and `cart-v2`), `web` has clients of it.
const TWO_NAMESPACES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: front-1, namespace: web, labels: {app: front}}
spec: {node: a, ip: 10.0.0.5, ports: [{port: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {node: a, ip: 10.0.0.6, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 81, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart-v2, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
"#;

fn consumer_route(backend_ns: &str, section: &str) -> String {
    format!(
        "{TWO_NAMESPACES}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: to-v2, namespace: web}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: cart, namespace: shop, sectionName: {section}}}]\n  rules:\n  - backendRefs: [{{name: cart-v2, namespace: {backend_ns}, port: 80}}]\n"
    )
}

#[test]
fn a_parent_ref_names_a_port_by_its_section_name() {
    let cfg = parse(&consumer_route("shop", "http")).unwrap();
    assert_eq!(
        cfg.routes[0].parents,
        [route::Parent {
            namespace: "shop".into(),
            service: "cart".into(),
            port: Some(80)
        }]
    );
    let e = err(&consumer_route("shop", "grpc"));
    assert!(
        e.contains("field `spec.parentRefs[0].sectionName`: Service shop/cart has no TCP port named \"grpc\""),
        "{e}"
    );
}

#[test]
fn a_consumer_route_applies_to_its_namespace_clients_only() {
    let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: web-may-send, namespace: shop}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}]\n  to: [{group: \"\", kind: Service, name: cart-v2}]\n";
    // Without a grant the backend in another namespace is not permitted: the route is
    // accepted, its backend unresolved (requests get a 500).
    let cfg = parse(&consumer_route("shop", "http")).unwrap();
    assert_eq!(
        cfg.routes[0].unresolved(),
        [(
            route::Resolution::NotPermitted,
            "shop/cart-v2:80".to_owned()
        )]
    );
    let cfg = parse(&format!("{}{grant}", consumer_route("shop", "http"))).unwrap();
    assert!(cfg.routes[0].unresolved().is_empty());
    let st = crate::state::NodeState::build("a", &cfg, 1, None);
    let svc = st
        .service("10.96.0.1:80".parse().unwrap(), Protocol::Tcp)
        .unwrap();
    // The producer (shop) has no routes; web's clients get the consumer route.
    assert!(svc.routes_for(Some("shop")).is_empty());
    assert!(svc.routes_for(None).is_empty());
    assert_eq!(svc.routes_for(Some("web")).route_names(), ["web/to-v2"]);
    let admin = st
        .service("10.96.0.1:81".parse().unwrap(), Protocol::Tcp)
        .unwrap();
    assert!(
        admin.routes_for(Some("web")).is_empty(),
        "the route's sectionName took port 80 only"
    );
    // A grant for another Service, or from another kind, permits nothing.
    let other = grant.replace("name: cart-v2}", "name: cart}");
    let cfg = parse(&format!("{}{other}", consumer_route("shop", "http"))).unwrap();
    assert_eq!(cfg.routes[0].unresolved().len(), 1);
    let grpc_only = grant.replace("kind: HTTPRoute", "kind: GRPCRoute");
    let cfg = parse(&format!("{}{grpc_only}", consumer_route("shop", "http"))).unwrap();
    assert_eq!(cfg.routes[0].unresolved().len(), 1);
}

#[test]
fn a_grpc_route_matches_methods_as_paths() {
    let cfg = parse(&format!(
        "{TWO_NAMESPACES}{}",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart-rpc, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: cart, port: 80}]
  rules:
  - name: checkout
    matches: [{method: {service: shop.Cart, method: Checkout}, headers: [{name: x-tier, value: gold}]}]
    backendRefs: [{name: cart-v2, port: 80}]
  - matches: [{method: {service: shop.Cart}}]
    backendRefs: [{name: cart, port: 80}]
  - matches: [{method: {method: Health}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-probe, value: "1"}]}}]
    backendRefs: [{name: cart, port: 80}]
"#
    ))
    .unwrap();
    let r = &cfg.routes[0];
    assert_eq!(r.kind, route::RouteKind::Grpc);
    let st = crate::state::NodeState::build("a", &cfg, 1, None);
    let svc = st
        .service("10.96.0.1:80".parse().unwrap(), Protocol::Tcp)
        .unwrap();
    let plan = svc.routes_for(None);
    let pick = |path: &str, tier: Option<&str>| {
        let mut h = hyper::HeaderMap::new();
        if let Some(t) = tier {
            h.insert("x-tier", t.parse().unwrap());
        }
        let uri: hyper::Uri = path.parse().unwrap();
        plan.select(&hyper::Method::POST, &uri, &h)
            .map(|s| s.rule.backends[0].0.unwrap().vip.to_string())
    };
    assert_eq!(
        pick("/shop.Cart/Checkout", Some("gold")).as_deref(),
        Some("10.96.0.2:80")
    );
    assert_eq!(
        pick("/shop.Cart/Checkout", None).as_deref(),
        Some("10.96.0.1:80")
    );
    assert_eq!(
        pick("/other.Svc/Health", None).as_deref(),
        Some("10.96.0.1:80")
    );
    assert_eq!(pick("/other.Svc/Get", None), None, "no rule matches");
    // gRPC has no redirects or rewrites; bad names are named.
    let bad = |rule: &str| {
        err(&format!("{TWO_NAMESPACES}apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, name: cart}}]\n  rules:\n  - {rule}\n"))
    };
    let e = bad("filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]");
    assert!(e.contains("field `spec.rules[0].filters[0].type`"), "{e}");
    let e = bad("matches: [{method: {service: \"shop/Cart\"}}]");
    assert!(
        e.contains("field `spec.rules[0].matches[0].method.service`"),
        "{e}"
    );
    let e = bad("matches: [{method: {type: Exact}}]");
    assert!(e.contains("give a service, a method or both"), "{e}");
}

#[test]
fn tls_routes_read_at_every_served_version() {
    for v in ["v1", "v1alpha3", "v1alpha2"] {
        let cfg = parse(&format!("{TWO_NAMESPACES}apiVersion: gateway.networking.k8s.io/{v}\nkind: TLSRoute\nmetadata: {{name: t, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, name: cart, port: 80}}]\n  hostnames: [cart.example]\n  rules: [{{name: only, backendRefs: [{{name: cart-v2, port: 80}}]}}]\n")).unwrap();
        assert_eq!(cfg.tls_routes.len(), 1, "{v}");
    }
}

#[test]
fn a_traffic_policy_attaches_through_target_refs() {
    let policy = |targets: &str| {
        format!("{TWO_NAMESPACES}apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {{targetRefs: {targets}, loadBalancer: RoundRobin}}\n")
    };
    let cfg = parse(&policy(
        "[{kind: Service, name: cart}, {kind: Service, name: cart-v2}]",
    ))
    .unwrap();
    assert_eq!(cfg.policies[0].services, ["cart", "cart-v2"]);
    let st = crate::state::NodeState::build("a", &cfg, 1, None);
    for vip in ["10.96.0.1:80", "10.96.0.2:80"] {
        let svc = st.service(vip.parse().unwrap(), Protocol::Tcp).unwrap();
        assert_eq!(svc.policy.balancer, policy::Balancer::RoundRobin, "{vip}");
    }
    let e = err(&policy("[{kind: Service, name: cart, sectionName: http}]"));
    assert!(e.contains("field `spec.targetRefs[0].sectionName`"), "{e}");
    let e = err(&policy("[{kind: Service, name: nope}]"));
    assert!(
        e.contains("field `spec.targetRefs[0].name`: no Service shop/nope"),
        "{e}"
    );
    let e = err(&format!("{TWO_NAMESPACES}apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {{loadBalancer: RoundRobin}}\n"));
    assert!(e.contains("field `spec.targetRefs`"), "{e}");
}

#[test]
fn an_endpoint_slice_read_ahead_is_refused_alone_and_keeps_its_last_version() {
    let slice = |ip: &str| {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abcde", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
        })
    };
    let service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80, "targetPort": 8080}]}
    });
    let good = [endpoint_slice_from_api(slice("10.0.0.7"))];
    let first = from_api([service.clone()], &good, None);
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);
    assert_eq!(
        first.config.endpoint_slices[0].endpoints[0].ip,
        Ipv4Addr::new(10, 0, 0, 7)
    );
    let bad = [endpoint_slice_from_api(slice("10.0.0.999"))];
    let next = from_api([service], &bad, Some(&first.config));
    let r = &next.rejected[0];
    assert_eq!(
        (
            r.kind.as_str(),
            r.namespace.as_deref(),
            r.name.as_str(),
            r.field.as_str()
        ),
        (
            "EndpointSlice",
            Some("shop"),
            "web-abcde",
            "endpoints[0].addresses[0]"
        )
    );
    assert!(r.kept_previous);
    assert_eq!(next.config.endpoint_slices, first.config.endpoint_slices);
}
