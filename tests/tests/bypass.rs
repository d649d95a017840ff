//! No bypass windows: a fail-closed meshed pod is never left unmeshed, so no connection of
//! it or to it goes around the agent. Each window is tried here with real connections:
//! a pod declared whose enrolment fails, a restart in which a pod's enrolment fails,
//! changes to a pod's Workload, and an upgrade that changes the pin layout.

use std::time::{Duration, Instant};

use weft_e2e::{bin, require_root, Agent, Cluster, PodSpec, ServiceSpec, Spawned};

const SECS5: Duration = Duration::from_secs(5);

/// Cluster: `web` (serving 8080: HTTP and, on 9000, echo), `outsider` (unmeshed), and the
/// given meshed pods; Service `web` 10.96.6.1:80 -> 8080 and :90 -> 9000.
fn cluster(test: &str, meshed: &[&str]) -> Cluster {
    let mut b = Cluster::builder(test)
        .node("a")
        .pod(
            PodSpec::new("web", "a")
                .label("app", "web")
                .port(8080)
                .port(9000),
        )
        .pod(PodSpec::new("outsider", "a").unmeshed());
    for p in meshed {
        b = b.pod(PodSpec::new(p, "a").port(8080));
    }
    b.service(
        ServiceSpec::new("web", "10.96.6.1")
            .select("app", "web")
            .tcp(80, 8080)
            .tcp(90, 9000),
    )
    .build()
}

/// Something else holding the agent's inbound port inside `pod`: the agent's enrolment of
/// it fails (it cannot bind 127.0.0.1:15006) until it is gone.
fn squat(c: &Cluster, pod: &str) -> Spawned {
    let s = c
        .pod(pod)
        .spawn(&c.dir, &bin("weft-testpod"), &["echo-server", "15006"]);
    c.pod(pod).wait_listening(15006, SECS5);
    s
}

fn reaches(c: &Cluster, from: &str, url: &str) -> bool {
    weft_e2e::http_get(c.pod(from), url).is_ok()
}

fn enrolled(agent: &Agent, workload: &str) -> bool {
    agent.admin("/status").ok().is_some_and(|s| {
        s["enrolled"]
            .as_array()
            .is_some_and(|a| a.iter().any(|w| w == workload))
    })
}

fn wait_enrolled(agent: &Agent, workload: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !enrolled(agent, workload) {
        assert!(Instant::now() < deadline, "{workload} was never enrolled");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pod is fenced: its connects to a service and connections to it are refused, and
/// the app behind it gets nothing.
fn assert_fenced(c: &Cluster, agent: &Agent, pod: &str, app: &Spawned) {
    let refused = agent.stat("ebpf", "fail_closed_refused");
    let served = app
        .output()
        .lines()
        .filter(|l| l.starts_with("served "))
        .count();
    assert!(
        !reaches(c, pod, "http://10.96.6.1/"),
        "{pod} reached a service around the agent"
    );
    assert!(
        agent.stat("ebpf", "fail_closed_refused") > refused,
        "refused by connect4"
    );
    let ip = &c.pod(pod).ip;
    assert!(
        !reaches(c, "outsider", &format!("http://{ip}:8080/")),
        "a connection reached {pod} around the agent"
    );
    assert_eq!(
        app.output()
            .lines()
            .filter(|l| l.starts_with("served "))
            .count(),
        served,
        "nothing reached {pod}'s app"
    );
    assert_eq!(
        agent.stat("ebpf", "sock_lb"),
        0,
        "no meshed connect was load-balanced directly"
    );
}

#[test]
fn a_pod_whose_enrolment_fails_is_fenced_from_declaration_and_across_restarts() {
    if !require_root("a_pod_whose_enrolment_fails_is_fenced_from_declaration_and_across_restarts") {
        return;
    }
    let c = cluster("bypass-fence", &["victim", "late"]);
    let _web = c.serve_http("web", 8080, &[]);
    let victim_app = c.serve_http("victim", 8080, &[]);
    let late_app = c.serve_http("late", 8080, &[]);
    // At first `late` is not declared at all.
    let all = c.config_yaml();
    let without_late: String = all
        .split("---\n")
        .filter(|d| !d.trim().is_empty() && !d.contains("name: late,"))
        .map(|d| format!("{d}---\n"))
        .collect();
    c.write_config(&without_late);
    let mut a1 = c.start_agent("a", &[]);
    assert!(reaches(&c, "victim", "http://10.96.6.1/"), "the control");

    // A restart in which the pod's enrolment fails: the first agent dies, something takes
    // the agent's inbound port in the pod, the next agent cannot enrol it.
    a1.proc.kill();
    let squatter = squat(&c, "victim");
    let a2 = c.start_agent("a", &[]);
    assert!(!enrolled(&a2, "default/victim"));
    assert_fenced(&c, &a2, "victim", &victim_app);

    // Declared, but its first enrolment fails.
    let _late_squatter = squat(&c, "late");
    c.write_config(&all);
    assert!(a2.wait_config_generation(2, SECS5));
    std::thread::sleep(Duration::from_millis(600)); // a reconcile tick
    assert!(!enrolled(&a2, "default/late"));
    assert_fenced(&c, &a2, "late", &late_app);

    // Once the port is free the pod is enrolled and served.
    drop(squatter);
    wait_enrolled(&a2, "default/victim");
    assert!(reaches(&c, "victim", "http://10.96.6.1/"));
    let ip = &c.pod("victim").ip;
    assert!(reaches(&c, "outsider", &format!("http://{ip}:8080/")));
}

/// The listening socket of `127.0.0.1:PORT` inside `pod` (its inode).
fn listener_inode(c: &Cluster, pod: &str, port: u16) -> String {
    let out = c
        .pod(pod)
        .exec("ss", &["-Hltne", &format!("sport = :{port}")]);
    out.split_whitespace()
        .find_map(|f| f.strip_prefix("ino:"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn workload_changes_are_applied_in_place_and_never_unmesh_the_pod() {
    if !require_root("workload_changes_are_applied_in_place_and_never_unmesh_the_pod") {
        return;
    }
    let c = cluster("bypass-change", &["client"]);
    let _echo = c
        .pod("web")
        .spawn(&c.dir, &bin("weft-testpod"), &["echo-server", "9000"]);
    c.pod("web").wait_listening(9000, SECS5);
    let a = c.start_agent("a", &[]);
    let before = listener_inode(&c, "client", 15001);
    assert!(!before.is_empty());
    // Connections from the client, back to back, while its Workload changes ten times
    // (a label, a declared port, its posture).
    let tp = bin("weft-testpod").display().to_string();
    let base = c.config_yaml();
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| {
            c.pod("client").run(
                &tp,
                &["connect-echo", "10.96.6.1:90", "4000"],
                Duration::from_secs(15),
            )
        });
        for i in 0..10u32 {
            let changed: String = base
                .split("---\n")
                .filter(|d| !d.trim().is_empty())
                .map(|d| {
                    let d = if d.contains("name: client,") {
                        let d = d.replace("labels: {}", &format!("labels: {{round: r{i}}}"));
                        if i % 2 == 0 {
                            d.replace(
                                "  ports: [{port: 8080}]",
                                "  ports: [{port: 8080}, {port: 8081}]",
                            ) + "  agentDown: fail-closed\n"
                        } else {
                            d
                        }
                    } else {
                        d.to_owned()
                    };
                    format!("{d}---\n")
                })
                .collect();
            assert_ne!(changed, base, "the change applies to the client");
            c.write_config(&changed);
            assert!(a.wait_config_generation(u64::from(i) + 2, SECS5));
            std::thread::sleep(Duration::from_millis(300));
        }
        load.join().expect("load thread")
    });
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("connect-echo output");
    assert!(got["count"].as_u64().unwrap_or(0) > 0, "{got}");
    assert_eq!(got["errors"], 0, "no connection failed: {got}");
    assert_eq!(
        a.stat("ebpf", "sock_lb"),
        0,
        "nothing was load-balanced around the agent"
    );
    assert_eq!(
        a.stat("ebpf", "captured"),
        got["count"].as_u64().unwrap(),
        "every connection was captured"
    );
    assert_eq!(
        listener_inode(&c, "client", 15001),
        before,
        "the pod kept its listener"
    );
}

#[test]
fn an_upgrade_that_changes_the_pin_layout_never_unmeshes_a_pod() {
    if !require_root("an_upgrade_that_changes_the_pin_layout_never_unmeshes_a_pod") {
        return;
    }
    let c = cluster("bypass-upgrade", &["client"]);
    let _echo = c
        .pod("web")
        .spawn(&c.dir, &bin("weft-testpod"), &["echo-server", "9000"]);
    c.pod("web").wait_listening(9000, SECS5);
    let mut old = c.start_agent("a", &[]);
    old.proc.kill();
    // What an older weft left: its pins under another version's directory, its programs
    // still attached and its maps full.
    let node_dir = std::path::Path::new("/sys/fs/bpf/weft").join(&c.node("a").full);
    let current = std::fs::read_dir(&node_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .expect("the current version's pins");
    std::fs::rename(&current, node_dir.join("v1")).expect("rename on bpffs");

    // Connections from the client, back to back, while the new version starts.
    let tp = bin("weft-testpod").display().to_string();
    let (new, out) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            c.pod("client").run(
                &tp,
                &["connect-echo", "10.96.6.1:90", "3000"],
                Duration::from_secs(15),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let new = c.start_agent("a", &[]);
        (new, load.join().expect("load thread"))
    });
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("connect-echo output");
    assert!(!node_dir.join("v1").exists(), "the old version is removed");
    assert_eq!(new.admin("/status").unwrap()["attachment"], "attached");
    // Every connection that worked went through the new agent: none around it.
    assert!(got["count"].as_u64().unwrap_or(0) > 0, "{got}");
    assert_eq!(
        new.stat("ebpf", "sock_lb"),
        0,
        "nothing load-balanced around the agent"
    );
    assert!(
        got["count"].as_u64().unwrap() <= new.stat("proxy", "outbound_accepted"),
        "more connections worked than the new agent accepted: {got}"
    );
}
