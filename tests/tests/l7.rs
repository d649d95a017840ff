//! End to end: HTTP routing in the shared proxy (HTTPRoute), on a simulated cluster with
//! real HTTP servers in pods.

use std::time::Duration;

use weft_e2e::{bin, require_root, Cluster, Pod, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

/// web-1 (v1, node a) and web-2 (v2, node b) behind `web`; `web-v1` and `web-v2` select
/// one version each; `empty` selects nothing.
fn cluster(test: &str) -> Cluster {
    Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(
            PodSpec::new("web-1", "a")
                .label("app", "web")
                .label("version", "v1")
                .port(8080),
        )
        .pod(
            PodSpec::new("web-2", "b")
                .label("app", "web")
                .label("version", "v2")
                .port(8080),
        )
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("web-v1", "10.96.0.11")
                .select("app", "web")
                .select("version", "v1")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("web-v2", "10.96.0.12")
                .select("app", "web")
                .select("version", "v2")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("empty", "10.96.0.20")
                .select("app", "nobody")
                .tcp(80, 8080),
        )
        .build()
}

fn route(weight_v1: u32, weight_v2: u32) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{kind: Service, name: web, port: 80}}]
  rules:
    - matches: [{{headers: [{{name: x-api-version, value: "2"}}]}}]
      backendRefs: [{{name: web-v2, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
      filters:
        - type: URLRewrite
          urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}
        - type: RequestHeaderModifier
          requestHeaderModifier: {{set: [{{name: x-routed-by, value: weft}}], remove: [x-internal]}}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{add: [{{name: x-served-via, value: old-path}}]}}
      backendRefs: [{{name: web-v1, port: 80}}]
    - backendRefs:
        - {{name: web-v1, port: 80, weight: {weight_v1}}}
        - {{name: web-v2, port: 80, weight: {weight_v2}}}
---
"#
    )
}

fn start(c: &Cluster) -> Vec<weft_e2e::Spawned> {
    let tp = bin("weft-testpod");
    ["web-1", "web-2"]
        .iter()
        .map(|n| {
            let s = c.pod(n).spawn(&c.dir, &tp, &["http-server", "8080", n]);
            c.pod(n).wait_listening(8080, SECS5);
            s
        })
        .collect()
}

/// Counts of answers by "STATUS SERVER" for `n` keep-alive requests.
fn count(pod: &Pod, path: &str, n: u32, header: Option<&str>) -> serde_json::Value {
    let tp = bin("weft-testpod").display().to_string();
    let n = n.to_string();
    let mut args = vec!["http-count", "10.96.0.10:80", path, n.as_str()];
    args.extend(header);
    let out = pod.run(&tp, &args, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "http-count: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("http-count output")
}

fn wait_generation(agent: &weft_e2e::Agent, generation: u64) {
    assert!(
        agent.wait_config_generation(generation, SECS5),
        "configuration {generation} not applied: {}",
        agent.admin("/status").unwrap()
    );
}

#[test]
fn weighted_split_lands_within_three_points() {
    if !require_root("weighted_split_lands_within_three_points") {
        return;
    }
    let c = cluster("l7-split");
    c.write_config(&format!("{}{}", c.config_yaml(), route(90, 10)));
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let _s = start(&c);
    let counts = count(c.pod("client"), "/", 2000, None);
    let v1 = counts["200 web-1"].as_u64().unwrap_or(0);
    let v2 = counts["200 web-2"].as_u64().unwrap_or(0);
    assert_eq!(
        v1 + v2,
        2000,
        "every request answered by a version: {counts}"
    );
    let share = v2 as f64 / 2000.0 * 100.0;
    assert!(
        (7.0..=13.0).contains(&share),
        "v2 got {share:.1}% (want 10 ± 3): {counts}"
    );
    assert!(
        a.stat("proxy", "outbound_http") >= 1,
        "served by the HTTP proxy"
    );
}

#[test]
fn header_and_path_rules_route_and_rewrite() {
    if !require_root("header_and_path_rules_route_and_rewrite") {
        return;
    }
    let c = cluster("l7-match");
    c.write_config(&format!("{}{}", c.config_yaml(), route(100, 0)));
    let _a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let _s = start(&c);
    let client = c.pod("client");
    // x-api-version: 2 goes to v2, anything else to v1 (weight 100/0).
    assert_eq!(
        count(client, "/", 20, Some("x-api-version: 2")),
        serde_json::json!({"200 web-2": 20})
    );
    assert_eq!(
        count(client, "/", 20, None),
        serde_json::json!({"200 web-1": 20})
    );

    // /old/... is rewritten to /new/..., with header changes both ways.
    let out = client.run(
        "curl",
        &[
            "-sS",
            "-i",
            "--max-time",
            "5",
            "-H",
            "x-internal: secret",
            "http://10.96.0.10/old/items?id=7",
        ],
        Duration::from_secs(8),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or("")).expect("json body");
    assert_eq!(body["server"], "web-1");
    assert_eq!(
        body["path"], "/new/items?id=7",
        "the server saw the rewritten path"
    );
    assert_eq!(body["headers"]["x-routed-by"], "weft");
    assert!(
        body["headers"]["x-internal"].is_null(),
        "removed header did not reach the server: {body}"
    );
    assert!(
        text.to_ascii_lowercase().contains("x-served-via: old-path"),
        "response header added: {text}"
    );
}

#[test]
fn weight_change_on_reload_fails_no_request() {
    if !require_root("weight_change_on_reload_fails_no_request") {
        return;
    }
    let c = cluster("l7-reload");
    c.write_config(&format!("{}{}", c.config_yaml(), route(100, 0)));
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let _s = start(&c);
    let tp = bin("weft-testpod");
    let mut load = c
        .pod("client")
        .spawn(&c.dir, &tp, &["http-loop", "10.96.0.10:80", "3000"]);
    std::thread::sleep(Duration::from_millis(1000));
    c.write_config(&format!("{}{}", c.config_yaml(), route(0, 100)));
    wait_generation(&a, 2);
    let st = load.wait_exit(Duration::from_secs(20)).expect("load ends");
    assert!(
        st.success(),
        "requests failed during the change: {}",
        load.output()
    );
    assert_eq!(
        count(c.pod("client"), "/", 20, None),
        serde_json::json!({"200 web-2": 20}),
        "the new weights apply"
    );
}

#[test]
fn the_proxys_own_answers_say_why() {
    if !require_root("the_proxys_own_answers_say_why") {
        return;
    }
    let c = cluster("l7-reasons");
    let _a = c.start_agent("a", &[]);
    let out = c.pod("client").run(
        "curl",
        &["-sS", "-i", "--max-time", "5", "http://10.96.0.20/"],
        Duration::from_secs(8),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 503"), "{text}");
    assert!(
        text.contains("x-weft-reason: no-healthy-endpoint"),
        "{text}"
    );
}

#[test]
fn upgrades_pass_through_the_http_proxy() {
    if !require_root("upgrades_pass_through_the_http_proxy") {
        return;
    }
    let c = Cluster::builder("l7-upgrade")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("ws", "b").label("app", "ws").port(9000))
        .service(
            ServiceSpec::new("ws", "10.96.0.30")
                .select("app", "ws")
                .tcp(80, 9000),
        )
        .build();
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let tp = bin("weft-testpod");
    let _srv = c.pod("ws").spawn(&c.dir, &tp, &["upgrade-server", "9000"]);
    c.pod("ws").wait_listening(9000, SECS5);
    let out = c.pod("client").run(
        tp.to_str().unwrap(),
        &["upgrade-client", "10.96.0.30:80"],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "upgrade through weft: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        a.stat("proxy", "outbound_http") >= 1,
        "the request went through the HTTP proxy"
    );
}

#[test]
fn a_hundred_concurrent_http2_streams_on_one_connection() {
    if !require_root("a_hundred_concurrent_http2_streams_on_one_connection") {
        return;
    }
    let c = Cluster::builder("l7-h2")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("h2", "b").label("app", "h2").port(8081))
        .service(
            ServiceSpec::new("h2", "10.96.0.40")
                .select("app", "h2")
                .tcp(80, 8081),
        )
        .build();
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let tp = bin("weft-testpod");
    let _srv = c
        .pod("h2")
        .spawn(&c.dir, &tp, &["h2-server", "8081", "h2", "512"]);
    c.pod("h2").wait_listening(8081, SECS5);
    let out = c.pod("client").run(
        tp.to_str().unwrap(),
        &["h2-streams", "10.96.0.40:80", "100"],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "100 streams through weft: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok=100");
    assert_eq!(
        a.stat("proxy", "outbound_accepted"),
        1,
        "all streams came on one client connection"
    );
    assert_eq!(a.stat("proxy", "outbound_http"), 1);
}

#[test]
fn tls_is_routed_by_server_name() {
    if !require_root("tls_is_routed_by_server_name") {
        return;
    }
    let c = Cluster::builder("l7-sni")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("api", "b").label("app", "api").port(8443))
        .pod(PodSpec::new("shop", "b").label("app", "shop").port(8443))
        .service(
            ServiceSpec::new("edge", "10.96.0.50")
                .select("app", "api")
                .tcp(443, 8443),
        )
        .service(
            ServiceSpec::new("api", "10.96.0.51")
                .select("app", "api")
                .tcp(443, 8443),
        )
        .service(
            ServiceSpec::new("shop", "10.96.0.52")
                .select("app", "shop")
                .tcp(443, 8443),
        )
        .build();
    let routes = r#"apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: api}
spec:
  parentRefs: [{kind: Service, name: edge, port: 443}]
  hostnames: [api.example.com]
  rules: [{backendRefs: [{name: api, port: 443}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: shops}
spec:
  parentRefs: [{kind: Service, name: edge, port: 443}]
  hostnames: ["*.shop.example.com"]
  rules: [{backendRefs: [{name: shop, port: 443}]}]
---
"#;
    c.write_config(&format!("{}{routes}", c.config_yaml()));
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let tp = bin("weft-testpod");
    let _api = c
        .pod("api")
        .spawn(&c.dir, &tp, &["name-server", "8443", "api"]);
    let _shop = c
        .pod("shop")
        .spawn(&c.dir, &tp, &["name-server", "8443", "shop"]);
    c.pod("api").wait_listening(8443, SECS5);
    c.pod("shop").wait_listening(8443, SECS5);
    let hello = |name: &str| {
        let out = c.pod("client").run(
            tp.to_str().unwrap(),
            &["tls-hello", "10.96.0.50:443", name],
            Duration::from_secs(15),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(hello("api.example.com"), "api");
    assert_eq!(hello("eu.shop.example.com"), "shop", "wildcard hostname");
    assert_eq!(hello("other.example.com"), "closed", "no matching hostname");
    assert_eq!(a.stat("proxy", "outbound_no_route"), 1);
    assert_eq!(a.stat("proxy", "outbound_http"), 0, "TLS stays opaque");
}

#[test]
fn an_http10_backend_serves_two_requests_on_one_client_connection() {
    if !require_root("an_http10_backend_serves_two_requests_on_one_client_connection") {
        return;
    }
    let c = cluster("http10");
    let _a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    // Python's http.server answers HTTP/1.0 and closes after every answer.
    let www = c.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "from python\n").unwrap();
    let www = www.display().to_string();
    let _py = c.pod("web-2").spawn(
        &c.dir,
        std::path::Path::new("/usr/bin/python3"),
        &[
            "-m",
            "http.server",
            "8080",
            "--bind",
            "0.0.0.0",
            "--directory",
            &www,
        ],
    );
    c.pod("web-2").wait_listening(8080, SECS5);
    // curl asks twice; the proxy keeps its HTTP/1.1 connection open between them.
    let out = c.pod("client").run(
        "curl",
        &[
            "-sS",
            "-v",
            "--http1.1",
            "--max-time",
            "5",
            "http://10.96.0.12/",
            "http://10.96.0.12/",
        ],
        Duration::from_secs(10),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.matches("from python").count(), 2, "{stdout}");
    assert_eq!(
        stderr.matches("< HTTP/1.1 200").count(),
        2,
        "answered in HTTP/1.1:\n{stderr}"
    );
    assert!(
        stderr.contains("Re-using existing connection")
            || stderr.contains("Reusing existing connection"),
        "one client connection for both requests:\n{stderr}"
    );
}
