//! Quarantine, end to end: one of three endpoints taken out under load fails no client
//! request, gets no new request, keeps running and answers a debug source directly; the
//! quarantine shows in weftctl and the metrics, survives the agent's restart, and lifts.

use std::time::Duration;

use weft_e2e::{bin, require_root, Cluster, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

/// Requests a server logged (`served PEER` lines).
fn served(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("served ")).count()
}

/// One direct HTTP request from `from` to web-2's address; curl's status (000: refused).
fn direct(c: &Cluster, from: &str) -> String {
    let out = c.pod(from).run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            &format!("http://{}:8080/debug", c.pod("web-2").ip),
        ],
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_quarantined_endpoint_leaves_balancing_under_load_and_stays_reachable_for_debugging() {
    if !require_root(
        "a_quarantined_endpoint_leaves_balancing_under_load_and_stays_reachable_for_debugging",
    ) {
        return;
    }
    let c = Cluster::builder("quarantine")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").account("client"))
        .pod(
            PodSpec::new("web-1", "a")
                .label("app", "web")
                .port(8080)
                .account("web"),
        )
        .pod(
            PodSpec::new("web-2", "a")
                .label("app", "web")
                .port(8080)
                .account("web"),
        )
        .pod(
            PodSpec::new("web-3", "b")
                .label("app", "web")
                .port(8080)
                .account("web"),
        )
        .pod(PodSpec::new("debug", "b").unmeshed())
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let servers: Vec<_> = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|p| c.serve_http(p, 8080, &[]))
        .collect();
    c.ensure_ca();
    let flags_a = c.identity_flags("a");
    let flags_a: Vec<&str> = flags_a.iter().map(String::as_str).collect();
    let a = c.start_agent("a", &flags_a);
    let flags_b = c.identity_flags("b");
    let flags_b: Vec<&str> = flags_b.iter().map(String::as_str).collect();
    let _b = c.start_agent("b", &flags_b);
    let tp = bin("weft-testpod");

    // New connections back to back for 5 s; web-2 is quarantined 1.5 s in.
    let mut load = c
        .pod("client")
        .spawn(&c.dir, &tp, &["http-loop", "10.96.0.10:80", "5000"]);
    std::thread::sleep(Duration::from_millis(1500));
    let before = served(&servers[1].output());
    assert!(before > 0, "web-2 served before its quarantine");
    let said = a.weftctl(&[
        "quarantine",
        "default/web-2",
        "--reason",
        "memory grows; keep for a heap dump",
        "--allow-from",
        "10.244.2.0/24",
    ]);
    assert!(said.contains("default/web-2 quarantined"), "{said}");
    // The command returns once the new state is in force: at most the requests already
    // in flight still reach web-2.
    let at_quarantine = served(&servers[1].output());
    let result = load.wait_exit(Duration::from_secs(20)).expect("load ends");
    let out = load.output();
    assert!(result.success(), "a client request failed: {out}");
    let after = served(&servers[1].output());
    assert!(
        after <= at_quarantine + 1,
        "web-2 got new requests after its quarantine: {at_quarantine} -> {after}"
    );
    assert!(
        served(&servers[0].output()) + served(&servers[2].output()) > 0,
        "the others took the load"
    );

    // It keeps running, and answers a debug source directly: a pod of the allowed
    // network, and its own node (kubelet probes); anyone else is refused.
    let mut web2 = servers.into_iter().nth(1).unwrap();
    assert!(web2.is_running(), "web-2 keeps running");
    assert_eq!(
        direct(&c, "debug"),
        "200",
        "the allowed debug source gets through"
    );
    let from_node = c.node("a").run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            &format!("http://{}:8080/probe", c.pod("web-2").ip),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(String::from_utf8_lossy(&from_node.stdout), "200");
    assert_eq!(direct(&c, "client"), "000", "others are refused");
    assert!(a.stat("proxy", "quarantine_refused") >= 1);

    // Shown in weftctl and the metrics.
    let workloads = a.weftctl(&["workloads"]);
    let row = workloads
        .lines()
        .find(|l| l.starts_with("default/web-2"))
        .unwrap_or_else(|| panic!("{workloads}"));
    assert!(
        row.contains("yes (weftctl): memory grows; keep for a heap dump"),
        "{row}"
    );
    let services = a.weftctl(&["services"]);
    assert!(services.contains("2/2 (1 quarantined)"), "{services}");
    let (_, metrics) = a.admin_text("/metrics").expect("/metrics");
    assert!(
        metrics.contains("weft_workload_quarantined{workload=\"default/web-2\"} 1"),
        "{metrics}"
    );

    // Refused with a reason: an unknown pod, lifting what is not quarantined.
    let unknown = a.weftctl_output(&["quarantine", "default/nope", "--reason", "x"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no workload default/nope"));

    // A restarted agent keeps it (graceful handoff).
    let mut old = a;
    old.proc.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let a = c.start_agent("a", &flags_a);
    old.proc
        .wait_exit(Duration::from_secs(20))
        .expect("the old agent exits");
    let services = a.weftctl(&["services"]);
    assert!(
        services.contains("2/2 (1 quarantined)"),
        "after the restart: {services}"
    );
    assert_eq!(
        direct(&c, "client"),
        "000",
        "still refused after the restart"
    );

    // Lifted: back in balancing (-o json: the agent's answer).
    let said = a.weftctl(&["unquarantine", "default/web-2", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&said).expect("JSON");
    assert!(v["config_generation"].as_u64() > Some(1), "{said}");
    let services = a.weftctl(&["services"]);
    assert!(
        services
            .lines()
            .any(|l| l.starts_with("default/web") && l.contains("3/3")),
        "{services}"
    );
    let again = a.weftctl_output(&["unquarantine", "default/web-2"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not quarantined"));
    c.pod("web-2").wait_listening(8080, SECS5);
}
