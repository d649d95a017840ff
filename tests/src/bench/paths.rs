//! Request-path cases on one simulated cluster: HTTP/1.1 keep-alive at fixed rates and at
//! maximum throughput, bulk TCP, new connections, and same-node acceleration, for the
//! direct path, weft (same node, other node) and the sidecar reference (iptables REDIRECT
//! to a per-pod HAProxy on each side). Cases run interleaved (A B C D A B C D ...).

use std::{path::Path, time::Duration};

use serde_json::Value;

use super::{procstat, results::Results, Options};
use crate::{bin, Agent, Cluster, Pod, PodSpec, ServiceSpec, Spawned};

/// Cluster layout: weft on nodes a and b; nodes c and d run no agent and host the direct
/// baseline (c) and the sidecar pair (c -> d).
fn cluster() -> Cluster {
    let mut b = Cluster::builder("bench-paths")
        .node("a")
        .node("b")
        .node("c")
        .node("d");
    b = b
        .pod(PodSpec::new("client", "a"))
        .pod(
            PodSpec::new("srv-a", "a")
                .label("app", "srv-a")
                .port(8080)
                .port(8081)
                .port(5201)
                .port(7000),
        )
        .pod(
            PodSpec::new("srv-b", "b")
                .label("app", "srv-b")
                .port(8080)
                .port(8081)
                .port(5201)
                .port(7000),
        )
        .pod(PodSpec::new("d-client", "c").unmeshed())
        .pod(PodSpec::new("d-srv", "c").label("app", "d-srv").unmeshed())
        .pod(PodSpec::new("sc-client", "c").unmeshed())
        .pod(
            PodSpec::new("sc-srv", "d")
                .label("app", "sc-srv")
                .unmeshed(),
        );
    for (name, ip, app) in [
        ("svc-a", "10.96.1.1", "srv-a"),
        ("svc-b", "10.96.1.2", "srv-b"),
    ] {
        b = b.service(
            ServiceSpec::new(name, ip)
                .select("app", app)
                .tcp(80, 8080)
                .tcp(81, 8081)
                .tcp(5201, 5201)
                .tcp(7, 7000),
        );
    }
    b.build()
}

/// The sidecar reference: the service address the client dials, redirected by iptables.
const SIDECAR_VIP: &str = "10.96.1.3";

/// One way from a client to a server.
struct Route {
    name: &'static str,
    client: &'static str,
    /// Address of the HTTP server as the client dials it (port 80 is the HTTP port, 5201
    /// iperf3's, 7 the echo server's, on the same host).
    host: String,
    http_port: u16,
    /// The h2c server's port as the client dials it.
    h2_port: u16,
}

pub struct Fixture {
    c: Cluster,
    /// Seconds per measurement.
    secs: f64,
    agents: Vec<Agent>,
    sidecars: Vec<Spawned>,
    _servers: Vec<Spawned>,
}

impl Fixture {
    fn start(opts: &Options) -> Self {
        let c = cluster();
        for p in &c.pods {
            // Short connections leave TIME_WAIT sockets that stall reused ports (PAWS).
            p.sysctl("net/ipv4/tcp_max_tw_buckets", "0");
        }
        let tp = bin("weft-testpod");
        let mut servers = vec![];
        for s in ["srv-a", "srv-b", "d-srv", "sc-srv"] {
            let pod = c.pod(s);
            servers.push(pod.spawn(&c.dir, &tp, &["http-server", "8080", s, "1024"]));
            servers.push(pod.spawn(&c.dir, &tp, &["echo-server", "7000"]));
            servers.push(pod.spawn(&c.dir, &tp, &["h2-server", "8081", s, "1024"]));
            servers.push(pod.spawn(&c.dir, Path::new("/usr/bin/iperf3"), &["-s", "-p", "5201"]));
            pod.wait_listening(8080, Duration::from_secs(5));
            pod.wait_listening(7000, Duration::from_secs(5));
            pod.wait_listening(8081, Duration::from_secs(5));
        }
        Self {
            c,
            secs: opts.run_secs,
            agents: vec![],
            sidecars: vec![],
            _servers: servers,
        }
    }

    /// (Re)start both agents with these extra flags.
    fn agents(&mut self, extra: &[&str]) {
        self.agents.clear(); // SIGKILL; the next ones adopt the pinned datapath
        for n in ["a", "b"] {
            self.agents.push(self.c.start_agent(n, extra));
        }
    }

    /// (Re)start the HAProxy sidecars with `threads` threads each.
    fn sidecars(&mut self, threads: usize) {
        self.sidecars.clear();
        let sc_srv = self.c.pod("sc-srv").ip.clone();
        // What both sidecars share: HTTP mode with keep-alive on both sides.
        let common = format!(
            "global\n  nbthread {threads}\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n"
        );
        let out = format!(
            "{common}frontend out\n  bind 127.0.0.1:15001\n  default_backend s\nbackend s\n  server s1 {sc_srv}:8080\n\
             frontend out2\n  bind 127.0.0.1:15002 proto h2\n  default_backend s2\nbackend s2\n  server s1 {sc_srv}:8081 proto h2\n"
        );
        let inn = format!(
            "{common}frontend in\n  bind 0.0.0.0:15006\n  default_backend app\nbackend app\n  server app 127.0.0.1:8080\n\
             frontend in2\n  bind 0.0.0.0:15007 proto h2\n  default_backend app2\nbackend app2\n  server app 127.0.0.1:8081 proto h2\n"
        );
        for (pod, cfg, name) in [
            ("sc-client", out, "haproxy-out.cfg"),
            ("sc-srv", inn, "haproxy-in.cfg"),
        ] {
            let path = self.c.dir.join(name);
            std::fs::write(&path, cfg).expect("haproxy config");
            let p = self.c.pod(pod);
            self.sidecars.push(p.spawn(
                &self.c.dir,
                Path::new("/usr/sbin/haproxy"),
                &["-db", "-f", path.to_str().expect("utf-8")],
            ));
        }
        self.c
            .pod("sc-client")
            .wait_listening(15001, Duration::from_secs(5));
        self.c
            .pod("sc-srv")
            .wait_listening(15006, Duration::from_secs(5));
    }

    fn wire_sidecars(&self) {
        // As Istio wires sidecars: the client's outbound to the service address and the
        // server's inbound to its port are redirected to the local proxy.
        let cl = self.c.pod("sc-client");
        cl.exec(
            "ip",
            &[
                "route",
                "add",
                &format!("{SIDECAR_VIP}/32"),
                "via",
                "10.244.3.1",
            ],
        );
        for (port, to) in [("80", "15001"), ("81", "15002")] {
            cl.exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-d",
                    SIDECAR_VIP,
                    "--dport",
                    port,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    to,
                ],
            );
        }
        let srv = self.c.pod("sc-srv");
        for (port, to) in [("8080", "15006"), ("8081", "15007")] {
            srv.exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "--dport",
                    port,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    to,
                ],
            );
        }
    }

    fn paths(&self) -> Vec<Route> {
        vec![
            Route {
                name: "direct",
                client: "d-client",
                host: self.c.pod("d-srv").ip.clone(),
                http_port: 8080,
                h2_port: 8081,
            },
            Route {
                name: "weft same node",
                client: "client",
                host: "10.96.1.1".into(),
                http_port: 80,
                h2_port: 81,
            },
            Route {
                name: "weft other node",
                client: "client",
                host: "10.96.1.2".into(),
                http_port: 80,
                h2_port: 81,
            },
            Route {
                name: "sidecars (iptables+HAProxy)",
                client: "sc-client",
                host: SIDECAR_VIP.into(),
                http_port: 80,
                h2_port: 81,
            },
        ]
    }

    /// PIDs of the proxies a path goes through.
    fn proxies(&self, path: &str) -> Vec<i32> {
        match path {
            "weft same node" => vec![self.agents[0].proc.pid()],
            "weft other node" => self.agents.iter().map(|a| a.proc.pid()).collect(),
            p if p.starts_with("sidecars") => self.sidecars.iter().map(Spawned::pid).collect(),
            _ => vec![],
        }
    }
}

fn oha_version() -> String {
    std::process::Command::new("oha")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "oha".into())
}

/// One oha run; None if it failed outright.
fn oha(pod: &Pod, url: &str, secs: f64, conns: u32, rate: Option<u32>) -> Option<Value> {
    oha_with(pod, url, secs, conns, rate, &[])
}

/// oha with extra flags (e.g. `--http2 -p 100`).
fn oha_with(
    pod: &Pod,
    url: &str,
    secs: f64,
    conns: u32,
    rate: Option<u32>,
    extra: &[&str],
) -> Option<Value> {
    let dur = format!("{}ms", (secs * 1000.0) as u64);
    let c = conns.to_string();
    let mut args = vec![
        url,
        "-z",
        &dur,
        "-c",
        &c,
        "--no-tui",
        "--output-format",
        "json",
    ];
    let q;
    if let Some(r) = rate {
        q = r.to_string();
        args.extend(["-q", &q, "--latency-correction"]);
    }
    args.extend_from_slice(extra);
    let out = pod.run("oha", &args, Duration::from_secs_f64(secs + 30.0));
    serde_json::from_slice(&out.stdout).ok()
}

/// One oha run on a path, with the CPU its proxies used meanwhile, recorded in `group`.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per protocol; a struct would only rename them"
)]
fn measure_http(
    f: &Fixture,
    r: &mut Results,
    path: &Route,
    url: &str,
    group: &str,
    conns: u32,
    rate: Option<u32>,
    extra: &[&str],
) {
    let proxies = f.proxies(path.name);
    let cpu0 = procstat::cpu_of(&proxies);
    match oha_with(f.c.pod(path.client), url, f.secs, conns, rate, extra) {
        Some(v) => record_oha(r, group, path.name, &v, procstat::cpu_of(&proxies) - cpu0),
        None => r.failures.push(format!(
            "oha {} failed for {} at {rate:?}",
            extra.join(" "),
            path.name
        )),
    }
}

fn record_oha(r: &mut Results, group: &str, case: &str, v: &Value, cpu: f64) {
    let s = &v["summary"];
    let rps = s["requestsPerSec"].as_f64().unwrap_or(f64::NAN);
    let total = s["total"].as_f64().unwrap_or(0.0);
    r.record(group, case, "throughput", "req/s", rps);
    r.record(
        group,
        case,
        "success",
        "%",
        s["successRate"].as_f64().unwrap_or(0.0) * 100.0,
    );
    for p in ["p50", "p90", "p99", "p99.9"] {
        r.record(
            group,
            case,
            &format!("latency {p}"),
            "ms",
            v["latencyPercentiles"][p].as_f64().unwrap_or(f64::NAN) * 1000.0,
        );
    }
    let requests = rps * total;
    if requests > 0.0 && cpu > 0.0 {
        r.record(
            group,
            case,
            "proxy CPU per 1k req",
            "ms",
            cpu / (requests / 1000.0) * 1000.0,
        );
    }
}

/// What connect-echo reports, as recorded.
const CONNECT_ECHO_FIELDS: &[(&str, &str, &str)] = &[
    ("connections", "conn/s", "rate"),
    ("connect p50", "us", "connect_p50_us"),
    ("round trip p50", "us", "rtt_p50_us"),
    ("round trip p99", "us", "rtt_p99_us"),
];

fn iperf(pod: &Pod, host: &str, secs: f64, streams: u32) -> f64 {
    let t = format!("{}", secs.ceil() as u64);
    let p = streams.to_string();
    let out = pod.run(
        "iperf3",
        &["-c", host, "-p", "5201", "-t", &t, "-P", &p, "-J"],
        Duration::from_secs_f64(secs + 20.0),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map_or(f64::NAN, |b| b / 1e9)
}

fn connect_echo(pod: &Pod, addr: &str, secs: f64) -> Value {
    let tp = bin("weft-testpod").display().to_string();
    let ms = ((secs * 1000.0) as u64).to_string();
    let out = pod.run(
        &tp,
        &["connect-echo", addr, &ms],
        Duration::from_secs_f64(secs + 20.0),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

pub fn run(opts: &Options, r: &mut Results) {
    let mut f = Fixture::start(opts);
    f.wire_sidecars();
    let secs = opts.run_secs;
    let default_threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    r.method.push((
        "http1".into(),
        format!("{} -c 16 -z {secs}s, with -q RATE --latency-correction for fixed rates (no coordinated omission); 1 KiB responses; keep-alive", oha_version()),
    ));

    for threads in [1, default_threads] {
        let t = threads.to_string();
        f.agents(&["--worker-threads", &t]);
        f.sidecars(threads);
        let group_rate = |rate: u32| format!("http1 {rate} rps, {threads} thread(s)");
        let group_max = format!("http1 max throughput, 16 connections, {threads} thread(s)");
        for _rep in 0..opts.reps {
            for rate in [Some(5000), Some(20000), None] {
                for path in f.paths() {
                    let url = format!("http://{}:{}/", path.host, path.http_port);
                    let group = rate.map_or(group_max.clone(), group_rate);
                    measure_http(&f, r, &path, &url, &group, 16, rate, &[]);
                }
            }
        }
        for path in f.paths() {
            let rss: f64 = f
                .proxies(path.name)
                .iter()
                .map(|p| procstat::peak_rss_mib(*p))
                .sum();
            if rss > 0.0 {
                r.record(
                    "proxy memory",
                    &format!("{} ({threads} thread(s))", path.name),
                    "peak RSS, all proxies on the path",
                    "MiB",
                    rss,
                );
            }
        }
    }

    // HTTP/2: 100 concurrent streams on one connection (h2c with prior knowledge), with
    // the default number of threads (the proxies from the last loop iteration).
    r.method.push((
        "http2".into(),
        format!("{} --http2 -c 1 -p 100 -z {secs}s, and -q 5000 --latency-correction for the fixed rate; h2c servers (hyper); HAProxy sidecars with proto h2 on both sides", oha_version()),
    ));
    for _rep in 0..opts.reps {
        for rate in [Some(5000), None] {
            for path in f.paths() {
                let url = format!("http://{}:{}/", path.host, path.h2_port);
                let group = match rate {
                    Some(q) => format!("http2 {q} rps, 100 streams on 1 connection"),
                    None => "http2 max throughput, 100 streams on 1 connection".to_owned(),
                };
                measure_http(
                    &f,
                    r,
                    &path,
                    &url,
                    &group,
                    1,
                    rate,
                    &["--http2", "-p", "100"],
                );
            }
        }
    }

    // Bulk TCP and new connections (default threads; the sidecars are HTTP proxies, so
    // these compare the direct path and weft's L4 path).
    f.agents(&[]);
    r.method.push(("tcp".into(), format!("iperf3 -t {} -P 1|8; weft-testpod connect-echo (connect, 1-byte echo, close, back to back)", secs.ceil())));
    for _rep in 0..opts.reps {
        for path in f
            .paths()
            .into_iter()
            .filter(|p| !p.name.starts_with("sidecars"))
        {
            let pod = f.c.pod(path.client);
            for streams in [1, 8] {
                r.record(
                    &format!("tcp bulk, {streams} connection(s)"),
                    path.name,
                    "throughput",
                    "Gbit/s",
                    iperf(pod, &path.host, secs, streams),
                );
            }
            let echo_port = if path.name == "direct" { 7000 } else { 7 };
            let v = connect_echo(pod, &format!("{}:{echo_port}", path.host), secs);
            r.record_fields(
                "new connection + 1-byte echo",
                path.name,
                &v,
                CONNECT_ECHO_FIELDS,
            );
        }
    }

    // Same-node acceleration, off then on, interleaved.
    let g = "same-node acceleration (sockops/sk_msg)";
    for _rep in 0..opts.reps {
        for (label, extra) in [("off", &[][..]), ("on", &["--accelerate"][..])] {
            f.agents(extra);
            let pod = f.c.pod("client");
            same_node_http(&f, r, g, &format!("acceleration {label}"), secs);
            // iperf3 reads with blocking calls while it also writes, which is exactly what
            // the kernel's sockmap receive path mishandles (see docs/architecture.md): a
            // failure here is a finding about acceleration, reported, not a harness error.
            let gbps = iperf(pod, "10.96.1.1", secs, 1);
            if gbps.is_finite() {
                r.record(
                    g,
                    &format!("acceleration {label}"),
                    "bulk TCP, 1 connection",
                    "Gbit/s",
                    gbps,
                );
            } else {
                r.notes.push(format!(
                    "iperf3 failed through the same-node path with acceleration {label}"
                ));
            }
        }
    }

    // Request telemetry off, then on, interleaved: what recording every request
    // (Prometheus families, the tap) costs the agent, on the same-node path.
    let g = "request telemetry (metrics per workload, service and route)";
    for _rep in 0..opts.reps {
        for label in ["off", "on"] {
            f.agents(&["--request-telemetry", label]);
            same_node_http(&f, r, g, &format!("request telemetry {label}"), secs);
        }
    }
}

/// HTTP through the same-node path: latency and agent CPU at 5000 rps, then maximum
/// throughput, recorded as `case` of group `g`.
fn same_node_http(f: &Fixture, r: &mut Results, g: &str, case: &str, secs: f64) {
    let pod = f.c.pod("client");
    let cpu0 = procstat::cpu_of(&f.proxies("weft same node"));
    if let Some(v) = oha(pod, "http://10.96.1.1/", secs, 16, Some(5000)) {
        let cpu = procstat::cpu_of(&f.proxies("weft same node")) - cpu0;
        let s = &v["latencyPercentiles"];
        r.record(
            g,
            case,
            "latency p50 at 5000 rps",
            "ms",
            s["p50"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        );
        r.record(
            g,
            case,
            "latency p99 at 5000 rps",
            "ms",
            s["p99"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        );
        let req = v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0)
            * v["summary"]["total"].as_f64().unwrap_or(0.0);
        if req > 0.0 {
            r.record(
                g,
                case,
                "proxy CPU per 1k req",
                "ms",
                cpu / (req / 1000.0) * 1000.0,
            );
        }
    }
    if let Some(v) = oha(pod, "http://10.96.1.1/", secs, 16, None) {
        r.record(
            g,
            case,
            "max throughput",
            "req/s",
            v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        );
    }
}
