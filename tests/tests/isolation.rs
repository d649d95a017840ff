//! End to end: one pod cannot spoil the node's shared kernel state for another. Pods
//! churning TCP connections (captured and socket-load-balanced) and UDP sockets as fast as
//! they can for 30 s, while a neighbour keeps a captured connection and an unconnected DNS
//! socket going: the neighbour's connection keeps working with getpeername still naming
//! the service, and every DNS answer still comes from the service address.

use std::time::Duration;

use weft_e2e::{bin, require_root, Cluster, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);
const CHURN_MS: &str = "30000";

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn a_pod_churning_sockets_never_disturbs_another_pods_connections_or_dns() {
    if !require_root("a_pod_churning_sockets_never_disturbs_another_pods_connections_or_dns") {
        return;
    }
    let c = Cluster::builder("isolation")
        .node("a")
        .node("b")
        .pod(PodSpec::new("victim", "a"))
        .pod(PodSpec::new("churner", "a"))
        .pod(PodSpec::new("loner", "a").unmeshed())
        .pod(PodSpec::new("echo", "b").label("app", "echo").port(7000))
        .pod(PodSpec::new("dns", "b").label("app", "dns").unmeshed())
        .service(
            ServiceSpec::new("echo", "10.96.5.1")
                .select("app", "echo")
                .tcp(7, 7000),
        )
        .service(
            ServiceSpec::new("dns", "10.96.5.2")
                .select("app", "dns")
                .udp(53, 5353),
        )
        // The UDP churn goes to a service of its own (nothing listens behind it), so it
        // fills no server's queue the neighbour depends on: only the node's datapath is
        // shared.
        .service(
            ServiceSpec::new("sink", "10.96.5.3")
                .select("app", "dns")
                .udp(53, 5354),
        )
        .build();
    let _a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let tp = bin("weft-testpod");
    let _echo = c.pod("echo").spawn(&c.dir, &tp, &["echo-server", "7000"]);
    let _dns = c
        .pod("dns")
        .spawn(&c.dir, &tp, &["dns-server", "5353", "10.1.2.3"]);
    c.pod("echo").wait_listening(7000, SECS5);
    let tps = tp.display().to_string();
    let run = |pod: &str, args: &[&str]| {
        let pod = c.pod(pod);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let tps = tps.clone();
        let limit = Duration::from_secs(60);
        move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            pod.run(&tps, &a, limit)
        }
    };
    let (held, dns, churn_tcp, churn_udp, churn_lb) = std::thread::scope(|s| {
        let held = s.spawn(run(
            "victim",
            &["hold-echo", "10.96.5.1:7", CHURN_MS, "200"],
        ));
        let dns = s.spawn(run(
            "victim",
            &["udp-watch", "10.96.5.2:53", CHURN_MS, "200"],
        ));
        let churn_tcp = s.spawn(run("churner", &["connect-echo", "10.96.5.1:7", CHURN_MS]));
        let churn_udp = s.spawn(run("churner", &["udp-churn", "10.96.5.3:53", CHURN_MS]));
        let churn_lb = s.spawn(run("loner", &["connect-echo", "10.96.5.1:7", CHURN_MS]));
        (
            json(&held.join().unwrap()),
            json(&dns.join().unwrap()),
            json(&churn_tcp.join().unwrap()),
            json(&churn_udp.join().unwrap()),
            json(&churn_lb.join().unwrap()),
        )
    });
    eprintln!(
        "held {held}\ndns {dns}\nchurn tcp {churn_tcp}\nchurn udp {churn_udp}\nchurn lb {churn_lb}"
    );
    // The churners really churned.
    assert!(churn_tcp["count"].as_u64().unwrap() > 1_000, "{churn_tcp}");
    assert!(churn_lb["count"].as_u64().unwrap() > 1_000, "{churn_lb}");
    assert!(churn_udp["sent"].as_u64().unwrap() > 10_000, "{churn_udp}");
    // The neighbour did not notice.
    assert!(held["rounds"].as_u64().unwrap() >= 50, "{held}");
    assert_eq!(held["failed"], 0, "{held}");
    assert_eq!(
        held["peer_ok"], true,
        "getpeername kept the service address: {held}"
    );
    assert!(dns["answered"].as_u64().unwrap() >= 50, "{dns}");
    assert_eq!(
        dns["wrong_source"], 0,
        "every answer came from the service address: {dns}"
    );
    assert_eq!(dns["lost"], 0, "{dns}");
    // And getpeername names the service for a new captured and a new balanced socket.
    for pod in ["victim", "loner"] {
        let out = c.pod(pod).run(&tps, &["connect", "10.96.5.1:7"], SECS5);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok 10.96.5.1:7",
            "{pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
