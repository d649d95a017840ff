//! Seeing a node, end to end: a real Prometheus server (Debian's) scrapes the agents and
//! its query API returns what the test sent; access log lines are JSON that match the
//! requests with their identities; every weftctl command answers from a running agent,
//! as a table and as JSON; `weftctl tap` shows requests as they happen, filtered.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_e2e::{bin, require_root, Agent, Cluster, PodSpec, ServiceSpec, Spawned};

const SECS5: Duration = Duration::from_secs(5);

/// Nodes a and b; `client` on a; `web-1` (a) and `web-2` (b) behind `web`; `flaky` (b)
/// behind `flaky`, failing every other request with 503; `echo` (b) behind `echo`, a
/// TCP echo server.
fn cluster(test: &str) -> Cluster {
    Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(
            PodSpec::new("client", "a")
                .label("app", "client")
                .account("client"),
        )
        .pod(
            PodSpec::new("web-1", "a")
                .label("app", "web")
                .port(8080)
                .account("web"),
        )
        .pod(
            PodSpec::new("web-2", "b")
                .label("app", "web")
                .port(8080)
                .account("web"),
        )
        .pod(PodSpec::new("flaky", "b").label("app", "flaky").port(8080))
        .pod(PodSpec::new("echo", "b").label("app", "echo").port(9000))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("flaky", "10.96.0.13")
                .select("app", "flaky")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("echo", "10.96.0.12")
                .select("app", "echo")
                .tcp(7000, 9000),
        )
        .build()
}

/// The servers of [`cluster`], started and listening.
fn servers(c: &Cluster) -> Vec<Spawned> {
    let echo = c
        .pod("echo")
        .spawn(&c.dir, &bin("weft-testpod"), &["echo-server", "9000"]);
    c.pod("echo").wait_listening(9000, SECS5);
    vec![
        c.serve_http("web-1", 8080, &[]),
        c.serve_http("web-2", 8080, &[]),
        c.serve_http("flaky", 8080, &["fail=1/2"]),
        echo,
    ]
}

/// Agents on both nodes with identities, each scraped on its node address.
fn agents(c: &Cluster, access_log: bool) -> (Agent, Agent) {
    c.ensure_ca();
    let start = |node: &str, idx: u8| {
        let mut flags = c.identity_flags(node);
        flags.push("--metrics-address".into());
        flags.push(format!("192.168.250.{idx}:15020"));
        if access_log {
            flags.push("--access-log".into());
            flags.push(
                c.dir
                    .join(format!("access-{node}.log"))
                    .display()
                    .to_string(),
            );
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        c.start_agent(node, &flags)
    };
    (start("a", 1), start("b", 2))
}

/// `n` GET requests to `url` from `client` with curl over one connection; the statuses.
fn curl_n(c: &Cluster, url: &str, n: usize) -> Vec<u16> {
    let mut args = vec!["-s", "-w", "%{http_code}\\n", "--max-time", "20"];
    for _ in 0..n {
        args.extend(["-o", "/dev/null", url]);
    }
    let out = c.pod("client").run("curl", &args, Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

/// One TCP connection to the echo service carrying `bytes` each way.
fn echo(c: &Cluster, bytes: usize) {
    let out = c.pod("client").run(
        &bin("weft-testpod").display().to_string(),
        &["echo-client", "10.96.0.12:7000", &bytes.to_string()],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "echo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The traffic mix: 40 requests to web, 20 to flaky (10 answered 503), 3 echo
/// connections of 1000 bytes.
fn traffic_mix(c: &Cluster) {
    let web = curl_n(c, "http://10.96.0.10/hello", 40);
    assert_eq!(web, vec![200; 40]);
    let flaky = curl_n(c, "http://10.96.0.13/try", 20);
    assert_eq!(flaky.iter().filter(|s| **s == 503).count(), 10, "{flaky:?}");
    for _ in 0..3 {
        echo(c, 1000);
    }
}

/// A Prometheus server in the fabric's netns scraping both agents every second.
struct Prometheus<'a> {
    c: &'a Cluster,
    _proc: Spawned,
}

impl<'a> Prometheus<'a> {
    fn start(c: &'a Cluster) -> Self {
        let dir = c.dir.join("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: weft\n    static_configs:\n\
             \x20     - targets: ['192.168.250.1:15020', '192.168.250.2:15020']\n",
        )
        .expect("write prometheus.yml");
        let proc = c.spawn_in_fabric(
            "prometheus",
            std::path::Path::new("/usr/bin/prometheus"),
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                "--web.listen-address=127.0.0.1:9090",
            ],
        );
        Self { c, _proc: proc }
    }

    /// An instant query's result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let out = self.c.run_in_fabric(
            "curl",
            &[
                "-s",
                "--max-time",
                "5",
                "--data-urlencode",
                &format!("query={q}"),
                "http://127.0.0.1:9090/api/v1/query",
            ],
            Duration::from_secs(10),
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that yields one sample (0 when none).
    fn scalar(&self, q: &str) -> f64 {
        self.query(q)
            .first()
            .and_then(|r| r["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Wait until `q` yields `want` (a scrape after the traffic), else panic with what it
    /// yields.
    fn wait_for(&self, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.scalar(q);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{q} = {got}, want {want}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn prometheus_counts_what_was_sent_and_access_logs_match() {
    if !require_root("prometheus_counts_what_was_sent_and_access_logs_match") {
        return;
    }
    let c = cluster("prometheus");
    let _servers = servers(&c);
    let (a, _b) = agents(&c, true);
    let prom = Prometheus::start(&c);
    traffic_mix(&c);

    // Both agents scraped, the traffic counted once, by the client's node.
    prom.wait_for("count(up == 1)", 2.0);
    prom.wait_for(
        "sum(weft_requests_total{destination_service=\"default/web\"})",
        40.0,
    );
    prom.wait_for(
        "sum(weft_requests_total{destination_service=\"default/flaky\"})",
        20.0,
    );
    assert_eq!(
        prom.scalar(
            "sum(weft_requests_total{destination_service=\"default/flaky\",status_class=\"5xx\"})"
        ),
        10.0
    );
    assert_eq!(
        prom.scalar("sum(weft_requests_total{source_workload=\"default/client\",destination_workload=\"default/web\",status_class=\"2xx\"})"),
        40.0
    );
    // Latency buckets add up: +Inf holds every request, each bucket holds at least the
    // one below it, and _count agrees.
    assert_eq!(
        prom.scalar("sum(weft_request_duration_seconds_bucket{le=\"+Inf\"})"),
        60.0
    );
    assert_eq!(
        prom.scalar("sum(weft_request_duration_seconds_count)"),
        60.0
    );
    let mut buckets: Vec<(f64, f64)> = prom
        .query("sum by (le) (weft_request_duration_seconds_bucket)")
        .iter()
        .map(|r| {
            let le = r["metric"]["le"].as_str().unwrap_or("+Inf");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, r["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert!(buckets.len() > 10, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative buckets: {buckets:?}"
    );
    // TCP: three connections, 1000 bytes each way.
    prom.wait_for(
        "sum(weft_tcp_connections_opened_total{destination_service=\"default/echo\"})",
        3.0,
    );
    assert_eq!(
        prom.scalar("sum(weft_tcp_sent_bytes_total{destination_service=\"default/echo\"})"),
        3000.0
    );
    assert_eq!(
        prom.scalar("sum(weft_tcp_received_bytes_total{destination_service=\"default/echo\"})"),
        3000.0
    );
    // Agent health is there too.
    assert_eq!(prom.scalar("min(weft_config_generation)"), 1.0);
    assert!(prom.scalar("min(weft_certificate_expiration_timestamp_seconds)") > 1.7e9);
    assert!(prom.scalar("sum(weft_ebpf_events_total)") > 0.0);

    // The access log of a: one JSON line per request and connection.
    let deadline = Instant::now() + SECS5;
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(c.dir.join("access-a.log")).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.len() >= 63 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let http = |svc: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["kind"] == "http" && l["service"] == svc)
            .collect()
    };
    let web = http("default/web");
    assert_eq!(web.len(), 40, "{lines:#?}");
    for l in &web {
        assert_eq!(l["status"], 200);
        assert_eq!(l["method"], "GET");
        assert_eq!(l["path"], "/hello");
        assert_eq!(l["source"]["pod"], "default/client");
        assert_eq!(
            l["source"]["identity"],
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(
            l["destination"]["identity"],
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert!(l["duration_ms"].as_f64().unwrap() > 0.0);
        assert!(l["response_bytes"].as_u64().unwrap() > 0);
        assert!(l["start"].as_str().unwrap().ends_with('Z'));
        let (pod, endpoint) = (&l["destination"]["pod"], &l["endpoint"]);
        assert!(
            (pod == "default/web-1" && endpoint == "10.244.1.11:8080")
                || (pod == "default/web-2" && endpoint == "10.244.2.10:8080"),
            "{l}"
        );
    }
    let flaky = http("default/flaky");
    assert_eq!(
        flaky.iter().filter(|l| l["status"] == 503).count(),
        10,
        "{flaky:#?}"
    );
    let tcp: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "tcp").collect();
    assert_eq!(tcp.len(), 3, "{lines:#?}");
    for l in tcp {
        assert_eq!(l["outcome"], "done");
        assert_eq!(l["sent_bytes"], 1000);
        assert_eq!(l["received_bytes"], 1000);
        assert_eq!(l["destination"]["pod"], "default/echo");
    }
    // The agent's own view agrees with Prometheus.
    let (status, text) = a.admin_text("/metrics").expect("/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE weft_requests_total counter"),
        "{text}"
    );

    // The Grafana dashboard in deploy/ uses only metrics the agent exports, in queries
    // this Prometheus accepts.
    dashboard_uses_only_exported_metrics(&prom, &text);
}

fn dashboard_uses_only_exported_metrics(prom: &Prometheus, exposition: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/weft-golden-signals.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
        .expect("the dashboard is JSON");
    let exported: std::collections::BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut checked = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("weft_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    exported.contains(name.as_str()) || exported.contains(base),
                    "panel {:?} uses {name}, which the agent does not export",
                    panel["title"]
                );
                checked += 1;
            }
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$service", ".*");
            let out = prom.c.run_in_fabric(
                "curl",
                &[
                    "-s",
                    "--max-time",
                    "5",
                    "--data-urlencode",
                    &format!("query={q}"),
                    "http://127.0.0.1:9090/api/v1/query",
                ],
                Duration::from_secs(10),
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            assert_eq!(v["status"], "success", "Prometheus refuses {q}: {v}");
        }
    }
    assert!(checked > 20, "the dashboard's queries were read");
}

fn weftctl_json(a: &Agent, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = a.weftctl(&all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("weftctl {args:?} -o json: {e}\n{text}"))
}

/// The header row of a table and the row whose first cell is `first`.
fn row<'t>(table: &'t str, first: &str) -> (&'t str, &'t str) {
    let header = table.lines().next().unwrap_or("");
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first}:\n{table}"));
    (header, row)
}

#[test]
fn every_weftctl_command_answers_as_a_table_and_as_json() {
    if !require_root("every_weftctl_command_answers_as_a_table_and_as_json") {
        return;
    }
    let c = cluster("weftctl");
    let extra = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-route}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /hello}, method: GET}]
      backendRefs: [{name: web, port: 80}]
      retry: {codes: [503], attempts: 2}
    - backendRefs: [{name: web, port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-audit}
spec:
  selector: {matchLabels: {app: web}}
  action: AUDIT
  rules: [{to: [{paths: [{prefix: /audit}]}]}]
---
"#;
    c.write_config(&format!("{}{extra}", c.config_yaml()));
    let _servers = servers(&c);
    let (a, _b) = agents(&c, false);
    traffic_mix(&c);

    // status: sentences a newcomer can read.
    let status = a.weftctl(&["status"]);
    assert!(
        status.starts_with(&format!("Node {}: ready", a.node)),
        "{status}"
    );
    for says in [
        "Configuration: generation 1 from ",
        "Every change accepted",
        "Capturing for 2 pod(s): default/client, default/web-1",
        "Limits: ",
        "While no agent ran: ",
    ] {
        assert!(status.contains(says), "status lacks {says:?}:\n{status}");
    }
    let v = weftctl_json(&a, &["status"]);
    assert_eq!(v["ready"], true);
    assert_eq!(v["config_generation"], 1);
    let yaml = a.weftctl(&["status", "-o", "yaml"]);
    assert!(yaml.contains("ready: true"), "{yaml}");

    let version = a.weftctl(&["version"]);
    assert!(version.starts_with("weft-agent 0."), "{version}");
    assert!(weftctl_json(&a, &["version"])["abi"].is_u64());

    let workloads = a.weftctl(&["workloads"]);
    let (h, r) = row(&workloads, "default/client");
    for col in ["WORKLOAD", "IP", "MESHED", "ENROLLED", "MTLS", "IDENTITY"] {
        assert!(h.contains(col), "{workloads}");
    }
    assert!(
        r.contains("10.244.1.10") && r.contains("spiffe://cluster.local/ns/default/sa/client"),
        "{r}"
    );
    let v = weftctl_json(&a, &["workloads"]);
    assert_eq!(v["workloads"].as_array().unwrap().len(), 2);

    let services = a.weftctl(&["services"]);
    let (h, r) = row(&services, "default/web");
    assert!(h.contains("ENDPOINTS-READY"), "{services}");
    assert!(r.contains("10.96.0.10:80") && r.contains("2/2"), "{r}");
    let v = weftctl_json(&a, &["services"]);
    assert_eq!(v["services"].as_array().unwrap().len(), 3);

    let endpoints = a.weftctl(&["endpoints"]);
    let header = endpoints.lines().next().unwrap();
    for col in [
        "SERVICE",
        "ENDPOINT",
        "WORKLOAD",
        "NODE",
        "LATENCY-MS",
        "EJECTED",
    ] {
        assert!(header.contains(col), "{endpoints}");
    }
    assert!(
        endpoints
            .lines()
            .any(|l| l.contains("10.244.2.10:8080") && l.contains("default/web-2")),
        "{endpoints}"
    );
    let v = weftctl_json(&a, &["endpoints"]);
    assert!(v["services"][0]["endpoints"].is_array());

    let counters = a.weftctl(&["counters"]);
    let (_, r) = row(&counters, "proxy");
    assert!(!r.is_empty());
    assert!(
        counters
            .lines()
            .any(|l| l.contains("outbound_http") && !l.trim_end().ends_with(" 0")),
        "{counters}"
    );
    assert!(weftctl_json(&a, &["counters"])["proxy"]["outbound_accepted"].as_u64() > Some(0));

    // Golden signals over the last minute (a snapshot is taken every 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let signals = loop {
        let v = weftctl_json(&a, &["stats"]);
        let found = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "default/flaky")
            .cloned();
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < deadline, "no signals for flaky: {v}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(signals["requests"], 20, "{signals}");
    assert_eq!(signals["success_rate"], 0.5, "{signals}");
    assert!(signals["rps"].as_f64().unwrap() > 0.0 && signals["p99_ms"].as_f64().unwrap() > 0.0);
    let stats = a.weftctl(&["stats"]);
    let table = stats.lines().skip(1).collect::<Vec<_>>().join("\n");
    let (h, r) = row(&table, "default/flaky");
    assert!(h.contains("SUCCESS") && h.contains("P99-MS"), "{stats}");
    assert!(r.contains("50.00%"), "{stats}");
    let top = a.weftctl(&["top", "--iterations", "1"]);
    assert!(
        top.contains("default/flaky") && top.contains("\x1b[2J"),
        "{top}"
    );

    let bpf = a.weftctl(&["bpf"]);
    assert!(bpf.contains("capacity 262144 services"), "{bpf}");
    assert!(
        bpf.lines()
            .any(|l| l.starts_with("weft_connect4") && l.contains("CGROUP_SOCK_ADDR")),
        "{bpf}"
    );
    assert!(bpf.lines().any(|l| l.starts_with("10.96.0.10:80")), "{bpf}");
    assert_eq!(
        weftctl_json(&a, &["bpf"])["services"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let certs = a.weftctl(&["certs"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/default/sa/client"),
        "{certs}"
    );
    assert!(weftctl_json(&a, &["certs"])["certificates"].is_array());

    let tunnels = a.weftctl(&["tunnels"]);
    assert!(
        tunnels.contains("pooled connection(s) to other nodes"),
        "{tunnels}"
    );
    assert!(weftctl_json(&a, &["tunnels"])["pooled_connections"].as_u64() > Some(0));

    let routes = a.weftctl(&["routes"]);
    let (h, r) = row(&routes, "default/web");
    assert!(h.contains("HTTPROUTE") && h.contains("MATCHES"), "{routes}");
    assert!(
        r.contains("default/web-route")
            && r.contains("PathPrefix /hello, GET")
            && r.contains("retry [503] x2"),
        "{routes}"
    );
    let v = weftctl_json(&a, &["routes"]);
    assert_eq!(v["services"][0]["rules"].as_array().unwrap().len(), 2);

    let policies = a.weftctl(&["policies"]);
    let (_, r) = row(&policies, "default/web-audit");
    assert!(
        r.contains("AUDIT") && r.contains("default/web-1"),
        "{policies}"
    );
    assert_eq!(
        weftctl_json(&a, &["policies"])["policies"][0]["action"],
        "AUDIT"
    );

    let dump = a.weftctl(&["config", "dump"]);
    let v: Value = serde_json::from_str(&dump).expect("config dump is JSON");
    assert_eq!(v["generation"], 1);
    assert_eq!(v["source"], c.config_path().display().to_string(), "{v}");
    assert_eq!(v["services"].as_array().unwrap().len(), 3);
    assert_eq!(v["routes"][0]["rules"].as_array().unwrap().len(), 2);
    let yaml = a.weftctl(&["config", "dump", "-o", "yaml"]);
    assert!(yaml.contains("generation: 1"), "{yaml}");

    // validate needs no agent: the configuration file as the agent would read it.
    let ok = a.weftctl(&["validate", &c.config_path().display().to_string()]);
    assert!(
        ok.starts_with("valid: 2 node(s), 5 workload(s), 3 service(s), 1 HTTPRoute(s)"),
        "{ok}"
    );
    let bad = Command::new(bin("weftctl"))
        .args(["validate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            use std::io::Write as _;
            p.stdin
                .take()
                .unwrap()
                .write_all(b"apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}\n")?;
            p.wait_with_output()
        })
        .expect("weftctl validate -");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("field `spec.clusterIP`"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // The log filter, read and changed at run time.
    assert_eq!(a.weftctl(&["log-level"]).trim(), "info");
    let said = a.weftctl(&["log-level", "weft_agent=debug,info"]);
    assert!(said.contains("log filter now"), "{said}");
    assert!(weftctl_json(&a, &["log-level"])["level"]
        .as_str()
        .unwrap()
        .contains("weft_agent=debug"));
    let refused = a.weftctl_output(&["log-level", "no such=level=x"]);
    assert_eq!(refused.status.code(), Some(1));

    let conns = a.weftctl(&["connections"]);
    assert!(conns.contains("connection(s) held of"), "{conns}");
    let pods_table = conns.lines().skip(1).collect::<Vec<_>>().join("\n");
    let (h, _) = row(&pods_table, "default/client");
    assert!(h.contains("HELD"), "{conns}");
    let v = weftctl_json(&a, &["connections"]);
    assert_eq!(v["pods"].as_array().unwrap().len(), 2, "{v}");

    let metrics = a.weftctl(&["metrics"]);
    assert!(metrics.contains("weft_requests_total{"), "{metrics}");

    // Completions need no agent.
    let bash = Command::new(bin("weftctl"))
        .args(["completions", "bash"])
        .output()
        .expect("weftctl completions");
    assert!(bash.status.success());
    assert!(String::from_utf8_lossy(&bash.stdout).contains("weftctl"));

    // Documented exit codes: 3 when the agent cannot be reached, 2 for usage.
    let gone = Command::new(bin("weftctl"))
        .args(["--admin-socket", "/nonexistent/admin.sock", "status"])
        .output()
        .expect("weftctl");
    assert_eq!(gone.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("is weft-agent running"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    let usage = Command::new(bin("weftctl"))
        .args(["status"])
        .env_remove("WEFT_NODE")
        .env_remove("WEFT_ADMIN_SOCKET")
        .output()
        .expect("weftctl");
    assert_eq!(usage.status.code(), Some(2));
    // An unknown admin path is a 404 that lists the paths (curl, someone else's client).
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\\n%{http_code}",
            "--unix-socket",
            &a.admin.display().to_string(),
            "http://weft/nope",
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n404") && text.contains("/metrics"),
        "{text}"
    );
}

#[test]
fn tap_shows_requests_as_they_happen_with_the_filter_applied() {
    if !require_root("tap_shows_requests_as_they_happen_with_the_filter_applied") {
        return;
    }
    let c = cluster("tap");
    let _servers = servers(&c);
    let (a, _b) = agents(&c, false);
    let tap = |args: &[&str]| {
        Command::new(bin("weftctl"))
            .args(["--admin-socket", &a.admin.display().to_string(), "tap"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weftctl tap")
    };
    // Only failures of flaky, as JSON; and all of web as a table.
    let mut failures = tap(&[
        "--service",
        "flaky",
        "--status",
        "5xx",
        "--count",
        "3",
        "--seconds",
        "20",
        "-o",
        "json",
    ]);
    let mut table = tap(&[
        "--service",
        "default/web",
        "--count",
        "2",
        "--seconds",
        "20",
    ]);
    let started = Instant::now();
    // Traffic until both taps have what they asked for (they listen from their start:
    // what was sent before is not shown).
    while started.elapsed() < Duration::from_secs(15)
        && (failures.try_wait().unwrap().is_none() || table.try_wait().unwrap().is_none())
    {
        curl_n(&c, "http://10.96.0.13/f", 4);
        curl_n(&c, "http://10.96.0.10/w", 2);
    }
    let failures = failures.wait_with_output().expect("tap output");
    let table = table.wait_with_output().expect("tap output");
    assert!(
        failures.status.success(),
        "{}",
        String::from_utf8_lossy(&failures.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&failures.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["service"], "default/flaky");
        assert_eq!(l["status"], 503);
        assert_eq!(l["path"], "/f");
    }
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    for l in text.lines() {
        assert!(
            l.contains("default/client -> default/web GET /w HTTP/1.1 200"),
            "{l}"
        );
    }
    // A bad filter is a clear error and exit code 1.
    let bad = a.weftctl_output(&["tap", "--status", "5x"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("status filter"));
}

#[test]
fn an_endpoint_slowing_down_is_reported_before_it_fails() {
    if !require_root("an_endpoint_slowing_down_is_reported_before_it_fails") {
        return;
    }
    let c = Cluster::builder("prefault")
        .node("a")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("slow", "a").label("app", "slow").port(8080))
        .service(
            ServiceSpec::new("slow", "10.96.0.14")
                .select("app", "slow")
                .tcp(80, 8080),
        )
        .build();
    let a = c.start_agent("a", &[]);
    // Healthy for 4 s, then 15 ms slower every second; failing from 12 s on.
    let started = Instant::now();
    let _slow = c.serve_http("slow", 8080, &["ramp=15", "ramp-after=4", "fail-after=12"]);
    let fails_at = started + Duration::from_secs(12);
    let _load = c.pod("client").spawn(
        &c.dir,
        &bin("weft-testpod"),
        &["http-loop", "10.96.0.14:80", "14000"],
    );
    let warned_at = loop {
        let v = weftctl_json(&a, &["events"]);
        let warned = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "latency-rising" && e["workload"] == "default/slow");
        if warned {
            break Instant::now();
        }
        assert!(
            Instant::now() < started + Duration::from_secs(16),
            "no latency-rising event: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        warned_at < fails_at,
        "warned {:?} after the start, it fails from 12 s",
        warned_at - started
    );
    let events = a.weftctl(&["events"]);
    let row = events
        .lines()
        .find(|l| l.contains("latency-rising"))
        .unwrap_or_else(|| panic!("{events}"));
    assert!(
        row.contains("warning") && row.contains("default/slow") && row.contains("baseline"),
        "{row}"
    );
    let (_, metrics) = a.admin_text("/metrics").unwrap();
    assert!(
        metrics.contains("weft_endpoint_warnings_total{destination_service=\"default/slow\",destination_workload=\"default/slow\",kind=\"latency-rising\"} 1"),
        "{metrics}"
    );
}

/// One request with curl from `pod`: status, x-weft-reason (or "") and the body.
fn curl_one(c: &Cluster, pod: &str, url: &str) -> (u16, String, String) {
    let out = c.pod(pod).run(
        "curl",
        &["-sS", "-i", "--max-time", "5", url],
        Duration::from_secs(8),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reason = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-weft-reason:")
                .map(|r| r.trim().to_owned())
        })
        .unwrap_or_default();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, reason, body)
}

#[test]
fn explain_agrees_with_what_happens() {
    if !require_root("explain_agrees_with_what_happens") {
        return;
    }
    let c = Cluster::builder("explain")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").account("client"))
        .pod(
            PodSpec::new("web-1", "b")
                .label("app", "web")
                .port(8080)
                .account("web"),
        )
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let extra = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-api}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: web, port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-secrets}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{paths: [{exact: /api/secret}]}]}]
---
"#;
    c.write_config(&format!("{}{extra}", c.config_yaml()));
    let _web = c.serve_http("web-1", 8080, &[]);
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let explain =
        |path: &str| weftctl_json(&a, &["explain", "default/client", "web", "--path", path]);

    // Allowed: explain names the endpoint the request then reaches.
    let v = explain("/api/items");
    assert_eq!(v["datapath"], "captured", "{v:#}");
    assert_eq!(v["route"], "default/web-api");
    assert_eq!(v["policy"]["verdict"], "allow");
    assert_eq!(v["endpoint"]["workload"], "default/web-1");
    assert!(
        v["endpoint"]["reach"]
            .as_str()
            .unwrap()
            .contains("mTLS tunnel"),
        "{v:#}"
    );
    assert_eq!(v["outcome"], "sent to 10.244.2.10:8080 (default/web-1)");
    let (status, _, body) = curl_one(&c, "client", "http://10.96.0.10/api/items");
    assert_eq!(status, 200);
    assert!(body.contains("\"server\":\"web-1\""), "{body}");

    // Denied: explain gives the policy's reason; the proxy answers 403.
    let v = explain("/api/secret");
    assert_eq!(v["policy"]["verdict"], "deny", "{v:#}");
    assert!(
        v["policy"]["denied"]
            .as_str()
            .unwrap()
            .contains("no-secrets"),
        "{v:#}"
    );
    assert_eq!(v["outcome"], "answered 403 policy-denied by the proxy");
    let (status, reason, _) = curl_one(&c, "client", "http://10.96.0.10/api/secret");
    assert_eq!((status, reason.as_str()), (403, "policy-denied"));

    // Misrouted: no rule matches; explain and the proxy agree on 404 no-route.
    let v = explain("/other");
    assert_eq!(v["outcome"], "answered 404 no-route by the proxy", "{v:#}");
    let (status, reason, _) = curl_one(&c, "client", "http://10.96.0.10/other");
    assert_eq!((status, reason.as_str()), (404, "no-route"));

    // The decisions are counted per destination workload.
    let (_, metrics) = a.admin_text("/metrics").unwrap();
    for (decision, n) in [("allow", 1), ("deny", 1)] {
        let line = format!("weft_policy_decisions_total{{destination_workload=\"default/web\",decision=\"{decision}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }

    // The table is numbered steps and the outcome.
    let text = a.weftctl(&[
        "explain",
        "default/client",
        "10.96.0.10:80",
        "--path",
        "/api/x",
    ]);
    assert!(
        text.starts_with("1. connect4 sees default/client connect to 10.96.0.10:80"),
        "{text}"
    );
    assert!(
        text.contains("the kernel's service map has 10.96.0.10:80"),
        "{text}"
    );
    assert!(
        text.contains("identities: spiffe://cluster.local/ns/default/sa/client"),
        "{text}"
    );
    assert!(
        text.trim_end()
            .ends_with("=> sent to 10.244.2.10:8080 (default/web-1)"),
        "{text}"
    );

    // A pod of another node is explained by its own agent.
    let out = a.weftctl_output(&["explain", "default/web-1", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ask that node's agent"));
}

/// Spans the OTLP receiver got, one JSON object each.
fn spans(file: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a span"))
        .collect()
}

/// Wait until the receiver holds spans of `trace` satisfying `enough`.
fn wait_spans(
    file: &std::path::Path,
    trace: &str,
    enough: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let of: Vec<Value> = spans(file)
            .into_iter()
            .filter(|s| s["trace_id"] == trace)
            .collect();
        if enough(&of) {
            return of;
        }
        assert!(Instant::now() < deadline, "spans of {trace}: {of:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn traces_follow_a_request_across_retries_and_into_the_app() {
    if !require_root("traces_follow_a_request_across_retries_and_into_the_app") {
        return;
    }
    let c = Cluster::builder("tracing")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").account("client"))
        .pod(
            PodSpec::new("echo", "b")
                .label("app", "echo")
                .port(8080)
                .account("echo"),
        )
        .pod(PodSpec::new("flaky", "b").label("app", "flaky").port(8080))
        .service(
            ServiceSpec::new("echo", "10.96.0.20")
                .select("app", "echo")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("flaky", "10.96.0.21")
                .select("app", "flaky")
                .tcp(80, 8080),
        )
        .build();
    let retry = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky-retry}
spec:
  parentRefs: [{kind: Service, name: flaky, port: 80}]
  rules:
    - backendRefs: [{name: flaky, port: 80}]
      retry: {codes: [503], attempts: 2, backoff: 1ms}
---
"#;
    c.write_config(&format!("{}{retry}", c.config_yaml()));
    // The receiver decodes with the OpenTelemetry project's protobuf bindings.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = c.dir.join("spans.jsonl");
    let receiver = root.join("tests/peers/otlp_receiver.py");
    let pythonpath = format!("PYTHONPATH={}", root.join("target/pypi").display());
    let python = which("python3");
    let _receiver = c.spawn_in_fabric(
        "otlp-receiver",
        std::path::Path::new("/usr/bin/env"),
        &[
            &pythonpath,
            &python,
            &receiver.display().to_string(),
            "192.168.250.254",
            "4318",
            &out.display().to_string(),
        ],
    );
    let echo = root
        .join("tests/peers/header_echo.py")
        .display()
        .to_string();
    let _echo = c.pod("echo").spawn(
        &c.dir,
        std::path::Path::new("/usr/bin/python3"),
        &[&echo, "8080"],
    );
    c.pod("echo").wait_listening(8080, SECS5);
    let _flaky = c.serve_http("flaky", 8080, &["fail=1/2"]);
    let flags = [
        "--otlp-endpoint",
        "http://192.168.250.254:4318",
        "--trace-sample",
        "1",
    ];
    let a = c.start_agent("a", &flags);
    let _b = c.start_agent("b", &flags);

    // A client that started a trace: the agent's spans join it, and the app receives the
    // trace with the agent's attempt as the parent.
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let out_of = c.pod("client").run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-H",
            &format!("traceparent: {incoming}"),
            "-H",
            "tracestate: vendor=1",
            "http://10.96.0.20/items",
        ],
        Duration::from_secs(8),
    );
    let seen: Value = serde_json::from_slice(&out_of.stdout).expect("the echo's JSON");
    let upstream = seen["headers"]["traceparent"]
        .as_str()
        .expect("traceparent reached the app");
    let parts: Vec<&str> = upstream.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", "0af7651916cd43dd8448eb211c80319c", "01"),
        "{upstream}"
    );
    assert_ne!(
        parts[2], "b7ad6b7169203331",
        "the agent's span is the app's parent"
    );
    assert_eq!(seen["headers"]["tracestate"], "vendor=1");
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let got = wait_spans(&out, trace, |s| s.len() >= 2);
    let request = got
        .iter()
        .find(|s| s["name"] == "GET default/echo")
        .unwrap_or_else(|| panic!("{got:#?}"));
    let attempt = got
        .iter()
        .find(|s| s["name"] == "weft attempt")
        .unwrap_or_else(|| panic!("{got:#?}"));
    assert_eq!(
        request["parent_span_id"], "b7ad6b7169203331",
        "a child of the client's span"
    );
    assert_eq!(attempt["parent_span_id"], request["span_id"]);
    assert_eq!(
        attempt["span_id"], parts[2],
        "the app's parent is the attempt"
    );
    assert_eq!(request["attributes"]["http.request.method"], "GET");
    assert_eq!(request["attributes"]["url.path"], "/items");
    assert_eq!(request["attributes"]["http.response.status_code"], 200);
    assert_eq!(request["attributes"]["weft.source.pod"], "default/client");
    assert_eq!(
        request["attributes"]["weft.destination.service"],
        "default/echo"
    );
    assert_eq!(
        attempt["attributes"]["weft.destination.pod"],
        "default/echo"
    );
    assert_eq!(request["resource"]["service.name"], "weft-agent");
    assert_eq!(request["path"], "/v1/traces");

    // No trace context: the agent starts one; a retry is a second attempt of one trace.
    let (status, _, _) = curl_one(&c, "client", "http://10.96.0.21/try");
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    let root_span = loop {
        let root = spans(&out)
            .into_iter()
            .find(|s| s["name"] == "GET default/flaky" && s["parent_span_id"] == "");
        if let Some(r) = root {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no root span for the flaky request"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let trace = root_span["trace_id"].as_str().unwrap().to_owned();
    let got = wait_spans(&out, &trace, |s| s.len() >= 3);
    let attempts: Vec<&Value> = got.iter().filter(|s| s["name"] == "weft attempt").collect();
    assert_eq!(attempts.len(), 2, "{got:#?}");
    for at in &attempts {
        assert_eq!(at["parent_span_id"], root_span["span_id"]);
    }
    let codes: Vec<i64> = attempts
        .iter()
        .map(|s| {
            s["attributes"]["http.response.status_code"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(codes.contains(&503) && codes.contains(&200), "{codes:?}");
    assert_eq!(root_span["attributes"]["weft.retries"], 1);
    assert_eq!(root_span["attributes"]["weft.route"], "default/flaky-retry");
    drop(a);
}

fn which(program: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
