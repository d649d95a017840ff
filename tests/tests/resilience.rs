//! End to end: the HTTP proxy's resilience features (retries and their budget, load
//! balancing, outlier ejection, timeouts, circuit breaking, fault injection, rate limits,
//! mirroring, gRPC trailers), on a simulated cluster with real HTTP servers in pods. Each
//! test counts what the client got (status and `x-weft-reason`) and what the backend saw.

use std::time::{Duration, Instant};

use weft_e2e::{bin, require_root, Cluster, Pod, PodSpec, ServiceSpec, Spawned};

const SECS5: Duration = Duration::from_secs(5);

/// A client on node a, and one backend pod per `(name, node)` on port 8080, each behind a
/// Service of the same name at 10.96.1.<index+1>.
fn cluster(test: &str, backends: &[(&str, &str)]) -> Cluster {
    let mut b = Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"));
    for (i, (name, node)) in backends.iter().enumerate() {
        b = b.pod(PodSpec::new(name, node).label("app", name).port(8080));
        b = b.service(
            ServiceSpec::new(name, &vip(i))
                .select("app", name)
                .tcp(80, 8080),
        );
    }
    b.build()
}

fn vip(i: usize) -> String {
    format!("10.96.1.{}", i + 1)
}

/// The address clients call the i-th backend's Service at.
fn addr(i: usize) -> String {
    format!("{}:80", vip(i))
}

/// Start `http-server` in `pod` with options (`delay=MS`, `fail=N/M`, `status=CODE`).
fn serve(c: &Cluster, pod: &str, opts: &[&str]) -> Spawned {
    c.serve_http(pod, 8080, opts)
}

/// Requests the server has received so far.
fn served(s: &Spawned) -> usize {
    s.output()
        .lines()
        .filter(|l| l.starts_with("served "))
        .count()
}

/// `http-load`: answers counted as "STATUS SERVER" or "STATUS REASON".
fn load(pod: &Pod, addr: &str, n: u32, conc: u32, opts: &[&str]) -> serde_json::Value {
    let tp = bin("weft-testpod").display().to_string();
    let (n, conc) = (n.to_string(), conc.to_string());
    let mut args = vec!["http-load", addr, "/", n.as_str(), conc.as_str()];
    args.extend(opts);
    let out = pod.run(&tp, &args, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "http-load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("http-load output")
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Start both agents with `extra` documents after the cluster's own.
fn start(c: &Cluster, extra: &str) -> (weft_e2e::Agent, weft_e2e::Agent) {
    c.write_config(&format!("{}{extra}", c.config_yaml()));
    (c.start_agent("a", &[]), c.start_agent("b", &[]))
}

#[test]
fn retries_hide_a_half_failing_backend_and_the_budget_bounds_them() {
    if !require_root("retries_hide_a_half_failing_backend_and_the_budget_bounds_them") {
        return;
    }
    let c = cluster("res-retry", &[("flaky", "b"), ("down", "b"), ("gone", "b")]);
    let route = |svc: &str| {
        format!(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {svc}}}
spec:
  parentRefs: [{{kind: Service, name: {svc}, port: 80}}]
  rules:
    - backendRefs: [{{name: {svc}, port: 80}}]
      retry: {{codes: [503], attempts: 2, backoff: 1ms}}
---
"#
        )
    };
    let policy = |svc: &str, ratio: &str, min: u32| {
        format!(
            r#"apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: {svc}}}
spec:
  targetRef: {{kind: Service, name: {svc}}}
  retryBudget: {{ratio: {ratio}, minRetriesPerSecond: {min}, ttl: 10s}}
---
"#
        )
    };
    let docs = [
        route("flaky"),
        policy("flaky", "1.0", 10),
        route("down"),
        policy("down", "0.2", 0),
        route("gone"),
        policy("gone", "10", 100),
    ]
    .concat();
    let (a, _b) = start(&c, &docs);
    let flaky = serve(&c, "flaky", &["fail=1/2"]);
    let down = serve(&c, "down", &["fail=1/1"]);
    let gone = serve(&c, "gone", &["fail=1/1"]);
    let client = c.pod("client");

    // The backend fails every other request it gets, so each client request fails once
    // and its retry succeeds: a 100% budget hides every failure.
    let got = load(client, &addr(0), 200, 1, &[]);
    assert_eq!(
        got,
        serde_json::json!({"200 flaky": 200}),
        "retries hid the failures"
    );
    assert_eq!(served(&flaky), 400, "one retry per request");
    assert_eq!(a.stat("proxy", "http_retries"), 200);

    // Always failing, with a 20% budget: failures pass through, and the backend sees at
    // most 20% more requests instead of three times as many.
    let got = load(client, &addr(1), 200, 1, &[]);
    assert_eq!(
        got,
        serde_json::json!({"503 down": 200}),
        "the app's failure passes through"
    );
    let saw = served(&down);
    assert!(
        (200..=245).contains(&saw),
        "backend saw {saw} requests for 200 (budget 20%, not 600)"
    );
    assert!(a.stat("proxy", "http_retry_budget_exhausted") >= 100);

    // Bodies are retried when buffered (up to 64 KiB, declared length); a larger one
    // streams through once.
    let got = load(client, &addr(2), 5, 1, &["post=1000"]);
    assert_eq!(got, serde_json::json!({"503 gone": 5}));
    assert_eq!(served(&gone), 15, "1 KiB bodies were sent three times each");
    let got = load(client, &addr(2), 5, 1, &["post=100000"]);
    assert_eq!(got, serde_json::json!({"503 gone": 5}));
    assert_eq!(served(&gone), 20, "100 KB bodies were sent once each");
}

#[test]
fn peak_ewma_sends_less_to_a_slow_endpoint_than_round_robin() {
    if !require_root("peak_ewma_sends_less_to_a_slow_endpoint_than_round_robin") {
        return;
    }
    let c = Cluster::builder("res-p2c")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("fast", "b").label("app", "mixed").port(8080))
        .pod(PodSpec::new("slow", "b").label("app", "mixed").port(8080))
        .service(
            ServiceSpec::new("mixed", "10.96.1.1")
                .select("app", "mixed")
                .tcp(80, 8080),
        )
        .build();
    let policy = |lb: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: mixed}}\nspec:\n  targetRef: {{kind: Service, name: mixed}}\n  loadBalancer: {lb}\n---\n"
        )
    };
    let (a, _b) = start(&c, &policy("RoundRobin"));
    let _fast = serve(&c, "fast", &[]);
    let _slow = serve(&c, "slow", &["delay=40"]);
    let client = c.pod("client");
    let rr = load(client, "10.96.1.1:80", 200, 4, &[]);
    let rr_slow = n(&rr, "200 slow");
    assert_eq!(rr_slow + n(&rr, "200 fast"), 200, "{rr}");
    assert!(
        (80..=120).contains(&rr_slow),
        "round robin: half each: {rr}"
    );

    c.write_config(&format!("{}{}", c.config_yaml(), policy("PeakEWMA")));
    assert!(a.wait_config_generation(2, SECS5));
    let p2c = load(client, "10.96.1.1:80", 200, 4, &[]);
    let p2c_slow = n(&p2c, "200 slow");
    assert_eq!(p2c_slow + n(&p2c, "200 fast"), 200, "{p2c}");
    assert!(
        p2c_slow * 3 < rr_slow,
        "P2C over peak EWMA sent {p2c_slow} to the slow endpoint, round robin {rr_slow}"
    );
}

#[test]
fn a_failing_endpoint_is_ejected_for_longer_each_time_and_readmitted() {
    if !require_root("a_failing_endpoint_is_ejected_for_longer_each_time_and_readmitted") {
        return;
    }
    let c = Cluster::builder("res-eject")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("good", "b").label("app", "pair").port(8080))
        .pod(PodSpec::new("bad", "b").label("app", "pair").port(8080))
        .service(
            ServiceSpec::new("pair", "10.96.1.1")
                .select("app", "pair")
                .tcp(80, 8080),
        )
        .build();
    let policy = r#"apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: pair}
spec:
  targetRef: {kind: Service, name: pair}
  loadBalancer: RoundRobin
  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 2s, maxEjectionTime: 10s}
---
"#;
    let (a, _b) = start(&c, policy);
    let _good = serve(&c, "good", &[]);
    let bad = serve(&c, "bad", &["fail=1/1", "status=500"]);
    let client = c.pod("client");
    let got = load(client, "10.96.1.1:80", 40, 1, &[]);
    assert_eq!(
        got,
        serde_json::json!({"200 good": 37, "500 bad": 3}),
        "ejected after three failures in a row"
    );
    assert_eq!(served(&bad), 3);
    assert_eq!(a.stat("proxy", "http_ejections"), 1);
    let status = a.admin("/services").expect("admin");
    assert!(
        status.to_string().contains("\"ejected\":true"),
        "the admin API shows the ejection: {status}"
    );

    // After the 2 s ejection it is tried again, fails again, and is out for 4 s.
    std::thread::sleep(Duration::from_millis(2500));
    let got = load(client, "10.96.1.1:80", 40, 1, &[]);
    assert_eq!(
        n(&got, "500 bad"),
        3,
        "readmitted, then ejected again: {got}"
    );
    assert_eq!(served(&bad), 6);
    assert_eq!(a.stat("proxy", "http_ejections"), 2);
    std::thread::sleep(Duration::from_millis(2500));
    let got = load(client, "10.96.1.1:80", 20, 1, &[]);
    assert_eq!(
        got,
        serde_json::json!({"200 good": 20}),
        "the second ejection lasts longer than the first"
    );
}

#[test]
fn timeouts_answer_504_with_their_reason() {
    if !require_root("timeouts_answer_504_with_their_reason") {
        return;
    }
    let c = cluster("res-timeout", &[("slow", "b")]);
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: slow}
spec:
  parentRefs: [{kind: Service, name: slow, port: 80}]
  rules:
    - matches: [{headers: [{name: x-whole, value: "1"}]}]
      backendRefs: [{name: slow, port: 80}]
      timeouts: {request: 300ms}
    - backendRefs: [{name: slow, port: 80}]
      timeouts: {backendRequest: 200ms}
---
"#;
    let _agents = start(&c, route);
    let slow = serve(&c, "slow", &["delay=1000"]);
    let client = c.pod("client");
    let got = load(client, &addr(0), 3, 1, &[]);
    assert_eq!(got, serde_json::json!({"504 backend-timeout": 3}));
    let got = load(client, &addr(0), 3, 1, &["header=x-whole: 1"]);
    assert_eq!(got, serde_json::json!({"504 request-timeout": 3}));
    assert_eq!(served(&slow), 6, "each request reached the backend once");
}

#[test]
fn the_circuit_breaker_limits_requests_and_connections() {
    if !require_root("the_circuit_breaker_limits_requests_and_connections") {
        return;
    }
    let c = cluster("res-breaker", &[("busy", "b"), ("single", "b")]);
    let policies = r#"apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: busy}
spec:
  targetRef: {kind: Service, name: busy}
  circuitBreaker: {maxActiveRequests: 2, maxPendingRequests: 1, pendingTimeout: 5s}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: single}
spec:
  targetRef: {kind: Service, name: single}
  circuitBreaker: {maxConnections: 1}
---
"#;
    let (a, _b) = start(&c, policies);
    let busy = serve(&c, "busy", &["delay=700"]);
    let single = serve(&c, "single", &["delay=300"]);
    let client = c.pod("client");
    // Six at once: two active, one waits its turn, three are refused.
    let got = load(client, &addr(0), 6, 6, &[]);
    assert_eq!(
        got,
        serde_json::json!({"200 busy": 3, "503 circuit-open-requests": 3}),
    );
    assert_eq!(
        served(&busy),
        3,
        "refused requests never reached the backend"
    );
    // Two connections at once, two requests each: one connection is served, the other
    // is refused (and closed) each time it comes back.
    let got = load(client, &addr(1), 4, 2, &[]);
    assert_eq!(
        got,
        serde_json::json!({"200 single": 2, "503 circuit-open-connections": 2}),
    );
    assert_eq!(served(&single), 2);
    assert_eq!(a.stat("proxy", "http_circuit_open"), 5);
}

#[test]
fn faults_and_rate_limits_answer_for_the_backend() {
    if !require_root("faults_and_rate_limits_answer_for_the_backend") {
        return;
    }
    let c = cluster("res-fault", &[("web", "b")]);
    let docs = r#"apiVersion: weft.dev/v1alpha1
kind: HTTPRouteFilter
metadata: {name: chaos}
spec:
  fault: {abort: {httpStatus: 418, percent: 50}}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRouteFilter
metadata: {name: slowdown}
spec:
  fault: {delay: {fixedDelay: 300ms, percent: 100}}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRouteFilter
metadata: {name: five}
spec:
  rateLimit: {requestsPerSecond: 0.1, burst: 5}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - matches: [{headers: [{name: x-test, value: abort}]}]
      filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: chaos}}]
      backendRefs: [{name: web, port: 80}]
    - matches: [{headers: [{name: x-test, value: delay}]}]
      filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: slowdown}}]
      backendRefs: [{name: web, port: 80}]
    - matches: [{headers: [{name: x-test, value: limit}]}]
      filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: five}}]
      backendRefs: [{name: web, port: 80}]
---
"#;
    let (a, _b) = start(&c, docs);
    let web = serve(&c, "web", &[]);
    let client = c.pod("client");

    let got = load(client, &addr(0), 400, 4, &["header=x-test: abort"]);
    let (aborted, passed) = (n(&got, "418 fault-injected"), n(&got, "200 web"));
    assert_eq!(aborted + passed, 400, "{got}");
    assert!((140..=260).contains(&aborted), "about half aborted: {got}");
    assert_eq!(
        served(&web) as u64,
        passed,
        "aborted requests never reached the backend"
    );

    let before = served(&web);
    let t = Instant::now();
    let got = load(client, &addr(0), 3, 1, &["header=x-test: delay"]);
    assert_eq!(got, serde_json::json!({"200 web": 3}));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "each request was held 300 ms"
    );
    assert_eq!(served(&web), before + 3);

    let before = served(&web);
    let got = load(client, &addr(0), 20, 1, &["header=x-test: limit"]);
    assert_eq!(
        got,
        serde_json::json!({"200 web": 5, "429 rate-limited": 15}),
        "a burst of five, then 429"
    );
    assert_eq!(served(&web), before + 5);
    assert_eq!(a.stat("proxy", "http_rate_limited"), 15);
}

#[test]
fn mirrored_requests_reach_the_shadow_and_never_touch_the_answer() {
    if !require_root("mirrored_requests_reach_the_shadow_and_never_touch_the_answer") {
        return;
    }
    let c = cluster("res-mirror", &[("web", "b"), ("shadow", "a")]);
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
      backendRefs: [{name: web, port: 80}]
---
"#;
    let (a, _b) = start(&c, route);
    let web = serve(&c, "web", &[]);
    // The shadow is slow and always fails: the client must not notice.
    let shadow = serve(&c, "shadow", &["fail=1/1", "status=500", "delay=200"]);
    let got = load(c.pod("client"), &addr(0), 20, 2, &["post=100"]);
    assert_eq!(got, serde_json::json!({"200 web": 20}));
    assert_eq!(served(&web), 20);
    let deadline = Instant::now() + SECS5;
    while served(&shadow) < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(served(&shadow), 20, "every request was mirrored");
    assert_eq!(a.stat("proxy", "http_mirrored"), 20);
}

#[test]
fn grpc_trailers_pass_through() {
    if !require_root("grpc_trailers_pass_through") {
        return;
    }
    let c = cluster("res-grpc", &[("grpc", "b")]);
    let (a, _b) = start(&c, "");
    let tp = bin("weft-testpod");
    let _srv = c.pod("grpc").spawn(&c.dir, &tp, &["grpc-server", "8080"]);
    c.pod("grpc").wait_listening(8080, SECS5);
    let out = c.pod("client").run(
        tp.to_str().unwrap(),
        &["grpc-call", &addr(0)],
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "grpc-call: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["status"], 200);
    assert_eq!(got["trailers"]["grpc-status"], "0", "{got}");
    assert_eq!(
        got["trailers"]["x-saw-te"], "trailers",
        "te: trailers reached the server: {got}"
    );
    assert_eq!(a.stat("proxy", "outbound_http"), 1);
}

#[test]
fn a_blackholed_endpoint_costs_a_request_at_most_the_connect_timeout() {
    if !require_root("a_blackholed_endpoint_costs_a_request_at_most_the_connect_timeout") {
        return;
    }
    let c = Cluster::builder("res-blackhole")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("dead", "b").label("app", "mixed").port(8080))
        .pod(PodSpec::new("live", "b").label("app", "mixed").port(8080))
        .service(
            ServiceSpec::new("mixed", "10.96.1.1")
                .select("app", "mixed")
                .tcp(80, 8080),
        )
        .build();
    let policy = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: mixed}\nspec:\n  targetRef: {kind: Service, name: mixed}\n  loadBalancer: RoundRobin\n---\n";
    c.write_config(&format!("{}{policy}", c.config_yaml()));
    let a = c.start_agent("a", &[]);
    // The dead pod's node applies the connect timeout: its agent delivers to the app.
    let b = c.start_agent("b", &["--connect-timeout", "500ms"]);
    let _live = serve(&c, "live", &[]);
    // Nothing listens in the dead pod, and its answers to the client (here: the RSTs to
    // the client's address) vanish: every connect to it hangs until the connect timeout.
    // Its SYNs are retransmitted meanwhile; each must reach the app's (empty) port, never
    // the agent's own inbound listener.
    let client_ip = c.pod("client").ip.clone();
    c.pod("dead").exec(
        "ip",
        &["route", "add", "blackhole", &format!("{client_ip}/32")],
    );
    let t0 = Instant::now();
    let got = load(c.pod("client"), "10.96.1.1:80", 8, 1, &[]);
    let took = t0.elapsed();
    assert_eq!(got, serde_json::json!({"200 live": 8}), "{got}");
    // Every other request meets the dead endpoint first: four connect timeouts of 0.5 s,
    // with room for a busy machine (without the timeout each would wait minutes).
    assert!(
        took < Duration::from_secs(8),
        "eight requests took {took:?}"
    );
    assert!(b.stat("proxy", "upstream_connect_timeouts") >= 1);
    assert_eq!(
        a.stat("proxy", "upstream_connect_errors"),
        b.stat("proxy", "upstream_connect_timeouts"),
        "each timeout on the dead pod's node is one failed connect on the client's"
    );
    assert_eq!(
        b.stat("proxy", "inbound_accepted"),
        0,
        "no delivery was captured"
    );
}
