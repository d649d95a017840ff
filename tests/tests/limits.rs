//! End to end: the HTTP proxy's safe limits. Each case sends what crosses one limit
//! (raw bytes and raw HTTP/2 frames from weft-testpod), checks the status, reset or
//! GOAWAY it gets, and that the agent goes on serving other clients.

use std::time::Duration;

use weft_e2e::{bin, require_root, Cluster, Pod, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

/// client on a; `web` (HTTP/1.1 server) and `h2` (h2c and HTTP/1.1 server) on b; `held`
/// routes to `h2` after a 3 s injected delay, so its streams stay open in the proxy.
fn cluster(test: &str) -> Cluster {
    Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("web", "b").label("app", "web").port(8080))
        .pod(PodSpec::new("h2", "b").label("app", "h2").port(8081))
        .service(
            ServiceSpec::new("web", "10.96.1.1")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("h2", "10.96.1.2")
                .select("app", "h2")
                .tcp(80, 8081),
        )
        .service(
            ServiceSpec::new("held", "10.96.1.3")
                .select("app", "h2")
                .tcp(80, 8081),
        )
        .build()
}

const HELD: &str = r#"apiVersion: weft.dev/v1alpha1
kind: HTTPRouteFilter
metadata: {name: hold}
spec:
  fault: {delay: {fixedDelay: 3s, percent: 100}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: held}
spec:
  parentRefs: [{kind: Service, name: held, port: 80}]
  rules:
    - filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: hold}}]
      backendRefs: [{name: held, port: 80}]
---
"#;

fn abuse(pod: &Pod, tool: &str, addr: &str, mode: &str) -> serde_json::Value {
    let tp = bin("weft-testpod").display().to_string();
    let out = pod.run(&tp, &[tool, addr, mode], Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{tool} {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{tool} {mode} output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The agent still serves: five plain requests to `web` and ten h2c streams to `h2`.
fn still_serving(c: &Cluster) {
    let tp = bin("weft-testpod").display().to_string();
    let client = c.pod("client");
    let out = client.run(
        &tp,
        &["http-count", "10.96.1.1:80", "/", "5"],
        Duration::from_secs(20),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"200 web":5}"#,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = client.run(
        &tp,
        &["h2-streams", "10.96.1.2:80", "10"],
        Duration::from_secs(20),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok=10",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start(c: &Cluster) -> (weft_e2e::Agent, weft_e2e::Agent, Vec<weft_e2e::Spawned>) {
    c.write_config(&format!("{}{HELD}", c.config_yaml()));
    let a = c.start_agent("a", &["--header-read-timeout", "500ms"]);
    let b = c.start_agent("b", &[]);
    let tp = bin("weft-testpod");
    let web = c
        .pod("web")
        .spawn(&c.dir, &tp, &["http-server", "8080", "web"]);
    let h2 = c
        .pod("h2")
        .spawn(&c.dir, &tp, &["h2-server", "8081", "h2", "64"]);
    c.pod("web").wait_listening(8080, SECS5);
    c.pod("h2").wait_listening(8081, SECS5);
    (a, b, vec![web, h2])
}

#[test]
fn http1_limits_answer_and_close() {
    if !require_root("http1_limits_answer_and_close") {
        return;
    }
    let c = cluster("lim-h1");
    let (a, _b, servers) = start(&c);
    let client = c.pod("client");
    let web = "10.96.1.1:80";

    let r = abuse(client, "h1-abuse", web, "many-headers");
    assert_eq!(r["status"], 431, "150 header fields (limit 100): {r}");
    let r = abuse(client, "h1-abuse", web, "big-header");
    assert_eq!(r["status"], 431, "an 80 KiB head (limit 64 KiB): {r}");

    let r = abuse(client, "h1-abuse", web, "smuggle");
    assert_eq!(
        r["status"], 400,
        "Content-Length with Transfer-Encoding: {r}"
    );
    assert_eq!(r["reason"], "conflicting-framing");
    assert_eq!(r["closed"], true, "and the connection closed: {r}");
    assert_eq!(
        r["responses"], 1,
        "the request hidden in the body was not served: {r}"
    );

    let r = abuse(client, "h1-abuse", web, "slow-head");
    assert_eq!(r["closed"], true, "a head not finished in time closes: {r}");
    assert!(r["ms"].as_u64().unwrap_or(u64::MAX) < 5000, "{r}");

    let served = servers[0]
        .output()
        .lines()
        .filter(|l| l.starts_with("served "))
        .count();
    assert_eq!(served, 0, "no refused request reached the server");
    still_serving(&c);
    assert!(a.admin("/ready").is_ok());
}

#[test]
fn http2_limits_reset_or_go_away() {
    if !require_root("http2_limits_reset_or_go_away") {
        return;
    }
    let c = cluster("lim-h2");
    let (a, _b, _servers) = start(&c);
    let client = c.pod("client");

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once.
    let r = abuse(client, "h2-abuse", "10.96.1.2:80", "rapid-reset");
    assert_eq!(r["goaway"], 11, "GOAWAY ENHANCE_YOUR_CALM: {r}");
    // (How many frames were written before the GOAWAY depends on socket buffers.)

    // CONTINUATION flood (CVE-2024-27316 family): a header block that never ends.
    let r = abuse(client, "h2-abuse", "10.96.1.2:80", "continuation");
    assert!(
        r["goaway"].is_u64() || r["closed"] == true,
        "the connection is ended: {r}"
    );
    assert!(
        r["sent"].as_u64().unwrap_or(u64::MAX) < 4097,
        "cut off early: {r}"
    );

    // More concurrent streams than SETTINGS_MAX_CONCURRENT_STREAMS (256).
    let r = abuse(client, "h2-abuse", "10.96.1.3:80", "streams");
    let refused = r["resets"]["7"].as_u64().unwrap_or(0);
    assert!(
        refused >= 100,
        "streams above 256 are refused (REFUSED_STREAM): {r}"
    );

    // DATA beyond the 1 MiB stream window.
    let r = abuse(client, "h2-abuse", "10.96.1.3:80", "window");
    assert!(
        r["resets"]["3"].as_u64().unwrap_or(0) >= 1 || r["goaway"] == 3,
        "FLOW_CONTROL_ERROR: {r}"
    );

    still_serving(&c);
    assert!(a.admin("/ready").is_ok());
}

#[test]
fn clients_breaking_their_requests_leave_every_endpoint_untouched() {
    if !require_root("clients_breaking_their_requests_leave_every_endpoint_untouched") {
        return;
    }
    let c = cluster("client-faults");
    let policy = r#"apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web}
  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 60s}
---
"#;
    c.write_config(&format!("{}{policy}", c.config_yaml()));
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let tp = bin("weft-testpod");
    let _web = c
        .pod("web")
        .spawn(&c.dir, &tp, &["http-server", "8080", "web"]);
    let _h2 = c
        .pod("h2")
        .spawn(&c.dir, &tp, &["h2-server", "8081", "h2", "64"]);
    c.pod("web").wait_listening(8080, SECS5);
    c.pod("h2").wait_listening(8081, SECS5);
    let endpoint = || {
        let v = a.admin("/services").expect("admin");
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == "10.96.1.1:80")
            .expect("the web service")["endpoints"][0]
            .clone()
    };
    still_serving(&c);
    let before = endpoint();
    assert_eq!(before["samples"], 5, "{before}");
    let client = c.pod("client");
    for (mode, want) in [("bad-chunk", 400), ("short-body", 400), ("reset-mid", 0)] {
        for _ in 0..50 {
            let got = abuse(client, "h1-abuse", "10.96.1.1:80", mode);
            assert_eq!(got["status"], want, "{mode}: {got}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = endpoint();
    for field in ["samples", "failures_in_a_row", "ejected", "ejections"] {
        assert_eq!(
            after[field], before[field],
            "{field}: before {before}, after {after}"
        );
    }
    assert_eq!(a.stat("proxy", "http_ejections"), 0);
    assert_eq!(
        a.stat("proxy", "http_client_errors") + a.stat("proxy", "http_client_cancelled"),
        150,
        "each broken request was counted as the client's"
    );
    still_serving(&c);
}
