//! `cargo xtask demo`: two nodes with pods talking through their agents, narrated for a
//! newcomer. Uses the end-to-end harness, so everything it creates is removed at the end.

use std::{process::Command, time::Duration};

use weft_e2e::{bin, http_get, is_root, peer_ip, Cluster, PodSpec, ServiceSpec};

fn say(s: &str) {
    println!("\n\x1b[1m==> {s}\x1b[0m");
}

fn weftctl(agent: &weft_e2e::Agent, what: &str) {
    weftctl_args(agent, &[what]);
}

fn weftctl_args(agent: &weft_e2e::Agent, args: &[&str]) {
    let out = Command::new(bin("weftctl"))
        .args(["--admin-socket"])
        .arg(&agent.admin)
        .args(args)
        .output()
        .expect("weftctl");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
}

fn main() {
    if !is_root() {
        eprintln!("the demo needs root: it creates network namespaces and loads eBPF programs");
        std::process::exit(1);
    }
    let started = std::time::Instant::now();
    say("Building a two-node cluster out of network namespaces (nothing leaves this machine)");
    let c = Cluster::builder("demo")
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
                .label("version", "v1")
                .port(8080)
                .account("web"),
        )
        .pod(
            PodSpec::new("web-2", "b")
                .label("app", "web")
                .label("version", "v2")
                .port(8080)
                .account("web"),
        )
        .pod(
            PodSpec::new("legacy", "b")
                .label("app", "legacy")
                .unmeshed(),
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
        .build();
    for p in &c.pods {
        println!(
            "    pod {:<8} on node {}  ip {:<12} {}",
            p.spec.name,
            p.spec.node,
            p.ip,
            if p.spec.mesh {
                "meshed"
            } else {
                "not meshed (plain socket-level load balancing)"
            }
        );
    }
    println!("    service web = 10.96.0.10:80 -> port 8080 of web-1 and web-2. No route to 10.96.0.10 exists anywhere:");
    println!("    only weft's eBPF programs know that address.");

    let testpod = bin("weft-testpod");
    let mut servers: Vec<_> = ["web-1", "web-2"]
        .iter()
        .map(|n| {
            let s = c
                .pod(n)
                .spawn(&c.dir, &testpod, &["http-server", "8080", n]);
            c.pod(n).wait_listening(8080, Duration::from_secs(5));
            s
        })
        .collect();

    say("Without weft, the client cannot reach the service address");
    match http_get(c.pod("client"), "http://10.96.0.10/") {
        Ok(a) => println!("    unexpected answer: {a}"),
        Err(e) => println!("    {e}"),
    }

    say("Starting one weft-agent per node (eBPF programs attached to the node's pod cgroup)");
    let access_log = c.dir.join("access-a.log");
    let access_log_s = access_log.display().to_string();
    let a = c.start_agent("a", &["--access-log", &access_log_s]);
    let b = c.start_agent("b", &[]);
    for ag in [&a, &b] {
        let st = ag.admin("/status").expect("status");
        println!(
            "    agent {:<10} ready in {} ms, serving {}",
            ag.node, st["startup_ms"], st["enrolled"]
        );
    }

    say("The client calls http://10.96.0.10/ four times");
    for _ in 0..4 {
        let ans = http_get(c.pod("client"), "http://10.96.0.10/").expect("service answers");
        let server = ans["server"].as_str().unwrap_or("?");
        let path = if server == "web-1" {
            "same node: agent a delivered it inside web-1's netns"
        } else {
            "other node: agent a -> tunnel -> agent b"
        };
        println!(
            "    answered by {server:<6} which saw the caller as {:<12} ({path})",
            peer_ip(&ans)
        );
    }
    println!(
        "    The servers see the client pod's own IP ({}), not the agent's.",
        c.pod("client").ip
    );

    say("A canary: an HTTPRoute sends 20% of web's requests to v2 (web-2), 80% to v1 (web-1)");
    let route = |v1: u32, v2: u32| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-canary}}\nspec:\n  parentRefs: [{{kind: Service, name: web, port: 80}}]\n  rules:\n    - backendRefs:\n        - {{name: web-v1, port: 80, weight: {v1}}}\n        - {{name: web-v2, port: 80, weight: {v2}}}\n---\n"
        )
    };
    let count = |label: &str| {
        let out = c.pod("client").run(
            testpod.to_str().unwrap(),
            &["http-count", "10.96.0.10:80", "/", "200"],
            Duration::from_secs(30),
        );
        println!(
            "    {label}: 200 requests -> {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    };
    for (generation, v1, v2, label) in
        [(2, 80, 20, "weights 80/20"), (3, 0, 100, "promoted: 0/100")]
    {
        c.write_config(&format!("{}{}", c.config_yaml(), route(v1, v2)));
        if !a.wait_config_generation(generation, Duration::from_secs(10)) {
            println!(
                "    (the agent did not apply the change within 10 s; see its log in {})",
                c.dir.display()
            );
        }
        count(label);
    }
    c.write_config(&c.config_yaml());
    a.wait_config_generation(4, Duration::from_secs(10));
    count("route removed");
    println!(
        "    Each step is one declarative change; rolling back is writing the old weights again."
    );

    say("Between nodes, agents speak mutual TLS 1.3 as the workloads' SPIFFE identities");
    println!("    node b's certificates (its agent made the keys; weft-ca signed for node b's workloads only):");
    weftctl(&b, "certs");
    println!("    the tunnel connections node b accepted, with the identity each side proved:");
    weftctl(&b, "tunnels");

    say("A pod outside the mesh reaches the same service with socket-level load balancing only");
    for _ in 0..3 {
        let ans = http_get(c.pod("legacy"), "http://10.96.0.10/").expect("service answers");
        println!(
            "    legacy -> {} (connect() rewritten to the pod address; that pod's agent admits it as",
            ans["server"].as_str().unwrap_or("?")
        );
        println!("              plaintext from outside the mesh, because web is PERMISSIVE)");
    }

    say("An AuthorizationPolicy: only the client's identity may call web, and only with GET");
    let policy = "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules:\n    - from: [{principals: [\"spiffe://cluster.local/ns/default/sa/client\"]}]\n      to: [{methods: [GET]}]\n---\n";
    c.write_config(&format!("{}{policy}", c.config_yaml()));
    a.wait_config_generation(5, Duration::from_secs(10));
    b.wait_config_generation(5, Duration::from_secs(10));
    for (who, method) in [("client", "GET"), ("client", "DELETE"), ("legacy", "GET")] {
        let out = c.pod(who).run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                "-X",
                method,
                "http://10.96.0.10/",
            ],
            Duration::from_secs(5),
        );
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        let what = match code.as_str() {
            "200" => "allowed".to_owned(),
            "403" => "403 policy-denied, answered by the client's own agent".to_owned(),
            _ => "connection closed: no identity, so no ALLOW rule can match".to_owned(),
        };
        println!("    {who:<6} {method:<6} -> {what}");
    }
    c.write_config(&c.config_yaml());
    a.wait_config_generation(6, Duration::from_secs(10));
    b.wait_config_generation(6, Duration::from_secs(10));

    say("A retry hides a failing pod: web-2 now answers every request with 503");
    servers[1].kill();
    servers[1] = c.pod("web-2").spawn(
        &c.dir,
        &testpod,
        &["http-server", "8080", "web-2", "fail=1/1"],
    );
    c.pod("web-2").wait_listening(8080, Duration::from_secs(5));
    // Round robin, so web-2 gets its share (by latency, web-1 on the client's node would
    // win almost every request).
    let round_robin = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec:\n  targetRef: {kind: Service, name: web}\n  loadBalancer: RoundRobin\n---\n";
    c.write_config(&format!("{}{round_robin}", c.config_yaml()));
    a.wait_config_generation(7, Duration::from_secs(10));
    count("round robin, no retry");
    let retry = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-retry}\nspec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules:\n    - backendRefs: [{name: web, port: 80}]\n      retry: {codes: [503], attempts: 2, backoff: 1ms}\n---\n";
    c.write_config(&format!("{}{round_robin}{retry}", c.config_yaml()));
    a.wait_config_generation(8, Duration::from_secs(10));
    count("round robin, retry on 503");
    println!(
        "    The route retried web-2's 503s on another endpoint: the client saw none of them. The"
    );
    println!("    mesh still knows: this is what Prometheus scrapes from agent a (127.0.0.1:15020/metrics):");
    let (_, metrics) = a.admin_text("/metrics").unwrap_or_default();
    for l in metrics.lines().filter(|l| {
        (l.starts_with("weft_requests_total{") || l.starts_with("weft_request_retries_total{"))
            && l.contains("route=\"default/web-retry\"")
    }) {
        println!("    {l}");
    }
    println!(
        "    and one line of its access log ({}), for a request that needed the retry:",
        access_log.display()
    );
    let log = std::fs::read_to_string(&access_log).unwrap_or_default();
    if let Some(l) = log.lines().rev().find(|l| l.contains("\"retries\":1")) {
        println!("    {l}");
    }

    say("`weftctl explain`: what a request would meet, computed by the agent without sending it");
    weftctl_args(&a, &["explain", "default/client", "web", "--path", "/"]);
    c.write_config(&c.config_yaml());
    a.wait_config_generation(9, Duration::from_secs(10));
    servers[1].kill();
    servers[1] = c
        .pod("web-2")
        .spawn(&c.dir, &testpod, &["http-server", "8080", "web-2"]);
    c.pod("web-2").wait_listening(8080, Duration::from_secs(5));

    say("What the operator sees: `weftctl --node <node> status`, `services` and `endpoints` on node a");
    weftctl(&a, "status");
    weftctl(&a, "services");
    weftctl(&a, "endpoints");

    say("Killing node b's agent (SIGKILL): its programs stay pinned; web-2 is fail-closed");
    drop(b);
    let mut served_by_1 = 0;
    for _ in 0..6 {
        if http_get(c.pod("client"), "http://10.96.0.10/").is_ok_and(|a| a["server"] == "web-1") {
            served_by_1 += 1;
        }
    }
    println!("    6 calls, {served_by_1} served by web-1: when agent a picked web-2 its connect failed (nothing");
    println!("    listens for web-2 on node b now), so it moved on to web-1. The client noticed nothing.");
    let legacy_to_web2 = http_get(
        c.pod("legacy"),
        &format!("http://{}:8080/", c.pod("web-2").ip),
    );
    println!(
        "    legacy -> web-2 directly: {} (fail-closed: nothing reaches web-2 around the mesh)",
        if legacy_to_web2.is_ok() {
            "served?!"
        } else {
            "refused"
        }
    );
    let b = c.start_agent("b", &[]);
    let st = b.admin("/status").expect("status");
    println!(
        "    restarted agent b: {} pinned programs, capturing again after {} ms",
        st["attachment"], st["startup_ms"]
    );

    say(&format!(
        "Done in {:.1} s; removing every namespace, cgroup and pinned object",
        started.elapsed().as_secs_f64()
    ));
}
