//! End to end: the eBPF datapath and the L4 proxy on a simulated cluster, as a user sees
//! them. Each test builds its own cluster (namespaces, cgroups, agents) and tears it down.

use std::time::{Duration, Instant};

use serde_json::json;

use weft_e2e::{bin, http_get, peer_ip, require_root, Cluster, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

fn testpod() -> std::path::PathBuf {
    bin("weft-testpod")
}

/// client and web on node a, web2 on node b; service `web` selects web only, `web-b`
/// selects web2 only.
fn two_nodes(test: &str) -> Cluster {
    Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").label("app", "client"))
        .pod(PodSpec::new("web", "a").label("app", "web").port(8080))
        .pod(PodSpec::new("web2", "b").label("app", "web2").port(8080))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("web-b", "10.96.0.11")
                .select("app", "web2")
                .tcp(80, 8080),
        )
        .build()
}

#[test]
fn same_node_service_is_served_with_the_client_pod_as_source() {
    if !require_root("same_node_service_is_served_with_the_client_pod_as_source") {
        return;
    }
    let c = two_nodes("same-node");
    let _agent = c.start_agent("a", &[]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("service answers");
    assert_eq!(answer["server"], "web");
    assert_eq!(
        peer_ip(&answer),
        c.pod("client").ip,
        "the server must see the client pod's IP"
    );
    assert!(
        _agent.stat("ebpf", "captured") >= 1,
        "the connect was captured by connect4"
    );
    assert!(
        _agent.stat("proxy", "outbound_accepted") >= 1,
        "and proxied by the agent"
    );
}

#[test]
fn cross_node_service_goes_through_both_agents() {
    if !require_root("cross_node_service_goes_through_both_agents") {
        return;
    }
    let c = two_nodes("cross-node");
    let a = c.start_agent("a", &[]);
    let b = c.start_agent("b", &[]);
    let _srv = c
        .pod("web2")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web2"]);
    c.pod("web2").wait_listening(8080, SECS5);
    let answer =
        http_get(c.pod("client"), "http://10.96.0.11/").expect("service answers across nodes");
    assert_eq!(answer["server"], "web2");
    assert_eq!(
        peer_ip(&answer),
        c.pod("client").ip,
        "the server must see the client pod's IP"
    );
    assert!(
        a.stat("proxy", "outbound_accepted") >= 1,
        "node a's agent proxied the connection"
    );
    assert!(
        b.stat("proxy", "tunnel_accepted") >= 1,
        "node b's agent received it through the tunnel"
    );
}

#[test]
fn without_weft_the_service_address_is_unreachable() {
    if !require_root("without_weft_the_service_address_is_unreachable") {
        return;
    }
    let c = two_nodes("no-weft");
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    // The server is up and reachable by its pod IP...
    let direct = http_get(
        c.pod("client"),
        &format!("http://{}:8080/", c.pod("web").ip),
    )
    .expect("pod IP reachable");
    assert_eq!(direct["server"], "web");
    // ...but the service address exists only in weft's maps: no route, no answer.
    let err = http_get(c.pod("client"), "http://10.96.0.10/").expect_err("no capture, no service");
    assert!(err.contains("curl"), "{err}");
}

#[test]
fn unmeshed_pod_is_load_balanced_over_all_endpoints_by_the_socket_layer() {
    if !require_root("unmeshed_pod_is_load_balanced_over_all_endpoints_by_the_socket_layer") {
        return;
    }
    let c = Cluster::builder("sock-lb")
        .node("a")
        .node("b")
        .pod(PodSpec::new("plain", "a").unmeshed())
        .pod(
            PodSpec::new("s1", "a")
                .label("app", "s")
                .port(8080)
                .unmeshed(),
        )
        .pod(
            PodSpec::new("s2", "a")
                .label("app", "s")
                .port(8080)
                .unmeshed(),
        )
        .pod(
            PodSpec::new("s3", "b")
                .label("app", "s")
                .port(8080)
                .unmeshed(),
        )
        .service(
            ServiceSpec::new("s", "10.96.0.20")
                .select("app", "s")
                .tcp(80, 8080),
        )
        .build();
    let agent = c.start_agent("a", &[]);
    let _servers: Vec<_> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| {
            let s = c
                .pod(n)
                .spawn(&c.dir, &testpod(), &["http-server", "8080", n]);
            c.pod(n).wait_listening(8080, SECS5);
            s
        })
        .collect();
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..30 {
        let a = http_get(c.pod("plain"), "http://10.96.0.20/").expect("socket LB answers");
        assert_eq!(peer_ip(&a), c.pod("plain").ip);
        *seen
            .entry(a["server"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "all three endpoints served: {seen:?}");
    assert_eq!(
        agent.stat("proxy", "outbound_accepted"),
        0,
        "no proxy involved for an unmeshed pod"
    );
    assert!(agent.stat("ebpf", "sock_lb") >= 30);
}

#[test]
fn dns_over_udp_to_a_service_address_is_answered() {
    if !require_root("dns_over_udp_to_a_service_address_is_answered") {
        return;
    }
    let c = Cluster::builder("dns")
        .node("a")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("dns", "a").label("app", "dns").unmeshed())
        .service(
            ServiceSpec::new("dns", "10.96.0.53")
                .select("app", "dns")
                .udp(53, 5353),
        )
        .build();
    let agent = c.start_agent("a", &[]);
    let _dns = c
        .pod("dns")
        .spawn(&c.dir, &testpod(), &["dns-server", "5353", "10.1.2.3"]);
    std::thread::sleep(Duration::from_millis(200));
    let out = c.pod("client").run(
        "dig",
        &[
            "+short",
            "+time=2",
            "+tries=2",
            "@10.96.0.53",
            "web.default.svc.cluster.local",
        ],
        Duration::from_secs(10),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "10.1.2.3",
        "dig: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // dig connects its UDP socket: connect4 picked the backend.
    assert!(agent.stat("ebpf", "sock_lb") >= 1);
    // An unconnected socket goes through sendmsg4, and recvmsg4 makes the reply come from
    // the service address (the query fails otherwise).
    let tp = testpod().display().to_string();
    let out = c.pod("client").run(
        &tp,
        &[
            "udp-query",
            "10.96.0.53:53",
            "web.default.svc.cluster.local",
        ],
        Duration::from_secs(5),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "10.1.2.3",
        "udp-query: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.stat("ebpf", "udp_sendmsg") >= 1);
}

#[test]
fn one_mib_echoes_back_intact_with_half_close() {
    if !require_root("one_mib_echoes_back_intact_with_half_close") {
        return;
    }
    let c = Cluster::builder("echo")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("echo", "a").label("app", "echo").port(7000))
        .pod(PodSpec::new("echo2", "b").label("app", "echo2").port(7000))
        .service(
            ServiceSpec::new("echo", "10.96.0.30")
                .select("app", "echo")
                .tcp(7, 7000),
        )
        .service(
            ServiceSpec::new("echo2", "10.96.0.31")
                .select("app", "echo2")
                .tcp(7, 7000),
        )
        .build();
    let a = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);
    let _e1 = c
        .pod("echo")
        .spawn(&c.dir, &testpod(), &["echo-server", "7000"]);
    let _e2 = c
        .pod("echo2")
        .spawn(&c.dir, &testpod(), &["echo-server", "7000"]);
    c.pod("echo").wait_listening(7000, SECS5);
    c.pod("echo2").wait_listening(7000, SECS5);
    let tp = testpod().display().to_string();
    for target in ["10.96.0.30:7", "10.96.0.31:7"] {
        let out = c.pod("client").run(
            &tp,
            &["echo-client", target, "1048576"],
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "echo through {target}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        a.stat("ebpf", "msg_redirect"),
        0,
        "acceleration is off unless asked for"
    );
}

#[test]
fn accelerated_loopback_carries_requests_through_sk_msg() {
    if !require_root("accelerated_loopback_carries_requests_through_sk_msg") {
        return;
    }
    let c = two_nodes("accel");
    let a = c.start_agent("a", &["--accelerate"]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    for _ in 0..5 {
        let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("service answers");
        assert_eq!(answer["server"], "web");
        assert_eq!(peer_ip(&answer), c.pod("client").ip);
    }
    // At least every request's bytes went from curl's socket to the agent's through sk_msg.
    assert!(
        a.stat("ebpf", "msg_redirect") >= 5,
        "msg_redirect = {}",
        a.stat("ebpf", "msg_redirect")
    );
}

#[test]
fn an_invalid_object_keeps_its_last_good_version_while_the_rest_applies() {
    if !require_root("an_invalid_object_keeps_its_last_good_version_while_the_rest_applies") {
        return;
    }
    let c = two_nodes("bad-config");
    let agent = c.start_agent("a", &[]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    http_get(c.pod("client"), "http://10.96.0.10/").expect("works before the change");

    // One change: web's address made invalid, and a valid new Service beside it.
    let good = c.config_yaml();
    let mut bad = good.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.999");
    assert_ne!(good, bad);
    bad.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: extra}\nspec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n---\n");
    c.write_config(&bad);
    let rejected = agent.wait_rejected(SECS5);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let r = &rejected[0];
    assert_eq!(
        (&r["kind"], &r["name"], &r["field"], &r["kept_previous"]),
        (
            &json!("Service"),
            &json!("web"),
            &json!("spec.clusterIP"),
            &json!(true)
        )
    );
    assert!(r["at"].as_str().unwrap().contains("cluster.yaml"), "{r}");
    assert!(
        agent.proc.output().contains("spec.clusterIP"),
        "the log names the field"
    );
    let status = agent.admin("/status").unwrap();
    assert_eq!(
        status["config_generation"], 2,
        "the rest of the change applied"
    );
    assert!(status["last_config_error"].is_null());
    let still = http_get(c.pod("client"), "http://10.96.0.10/")
        .expect("the refused Service keeps its last good version");
    assert_eq!(still["server"], "web");
    http_get(c.pod("client"), "http://10.96.0.20/").expect("the valid new Service applied");
    let text = agent.weftctl(&["status"]);
    assert!(
        text.contains("1 object(s) REFUSED") && text.contains("Service default/web"),
        "{text}"
    );

    // A valid change clears the report.
    c.write_config(&good.replace("10.96.0.10", "10.96.0.12"));
    assert!(
        agent.wait_config_generation(3, SECS5),
        "the valid change was not applied"
    );
    let status = agent.admin("/status").unwrap();
    assert_eq!(status["rejected"], json!([]));
    http_get(c.pod("client"), "http://10.96.0.12/").expect("the new service address works");
    http_get(c.pod("client"), "http://10.96.0.10/").expect_err("the old one is gone");
}

#[test]
fn a_reload_that_would_overflow_a_map_is_refused_and_nothing_changes() {
    if !require_root("a_reload_that_would_overflow_a_map_is_refused_and_nothing_changes") {
        return;
    }
    let c = two_nodes("map-full");
    // Room for four service ports: the cluster declares two.
    let agent = c.start_agent("a", &["--max-services", "4"]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    http_get(c.pod("client"), "http://10.96.0.10/").expect("works before the change");
    let maps_before = agent.admin("/maps").unwrap()["services"].clone();
    assert_eq!(maps_before.as_array().unwrap().len(), 2);

    // Three more service ports: five do not fit.
    let mut big = c.config_yaml();
    for i in 1..=3 {
        big.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: extra-{i}}}\nspec: {{clusterIP: 10.96.9.{i}, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n"
        ));
    }
    c.write_config(&big);
    let err = agent.wait_config_error(SECS5);
    assert!(
        err.contains("eBPF map SERVICES holds at most 4 entries and this configuration needs 5")
            && err.contains("--max-services"),
        "{err}"
    );
    assert_eq!(agent.admin("/status").unwrap()["config_generation"], 1);
    assert_eq!(
        agent.admin("/maps").unwrap()["services"],
        maps_before,
        "the kernel's service map is unchanged"
    );
    http_get(c.pod("client"), "http://10.96.0.10/").expect("the old configuration still serves");
    http_get(c.pod("client"), "http://10.96.9.1/").expect_err("the refused service is not there");
}

#[test]
fn dual_stack_sockets_reach_ipv4_services_through_connect6() {
    if !require_root("dual_stack_sockets_reach_ipv4_services_through_connect6") {
        return;
    }
    let c = two_nodes("connect6");
    let agent = c.start_agent("a", &[]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    // An AF_INET6 socket dialling the IPv4-mapped service address.
    let answer = http_get(c.pod("client"), "http://[::ffff:10.96.0.10]/")
        .expect("connect6 captures mapped addresses");
    assert_eq!(answer["server"], "web");
    assert_eq!(peer_ip(&answer), c.pod("client").ip);
    assert!(agent.stat("proxy", "outbound_accepted") >= 1);
}

#[test]
fn workload_changes_apply_on_reload() {
    if !require_root("workload_changes_apply_on_reload") {
        return;
    }
    let c = two_nodes("reload-workloads");
    let agent = c.start_agent("a", &[]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    http_get(c.pod("client"), "http://10.96.0.10/").expect("captured");
    let captured = agent.stat("ebpf", "captured");
    assert_eq!(captured, 1);

    // Take the client out of the mesh: it is unenrolled and falls back to socket LB.
    let yaml = c.config_yaml();
    let marker = "metadata: {name: client,";
    let at = yaml.find(marker).expect("client document");
    let end = at + yaml[at..].find("mesh: enabled").expect("mesh line");
    let changed = format!(
        "{}mesh: disabled{}",
        &yaml[..end],
        &yaml[end + "mesh: enabled".len()..]
    );
    c.write_config(&changed);
    let deadline = Instant::now() + SECS5;
    loop {
        let st = agent.admin("/status").unwrap();
        if st["config_generation"] == 2
            && !st["enrolled"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == "default/client")
        {
            break;
        }
        assert!(Instant::now() < deadline, "client still enrolled: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let lb = agent.stat("ebpf", "sock_lb");
    let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("served by socket LB now");
    assert_eq!(answer["server"], "web");
    assert_eq!(
        agent.stat("ebpf", "captured"),
        captured,
        "no longer captured"
    );
    assert_eq!(agent.stat("ebpf", "sock_lb"), lb + 1);
}

#[test]
fn an_unreachable_endpoint_is_skipped_for_the_next_one() {
    if !require_root("an_unreachable_endpoint_is_skipped_for_the_next_one") {
        return;
    }
    let c = Cluster::builder("connect-retry")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("web", "a").label("tier", "web").port(8080))
        .pod(PodSpec::new("web2", "b").label("tier", "web").port(8080))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("tier", "web")
                .tcp(80, 8080),
        )
        .build();
    // Node b has no agent: its meshed pod cannot be reached through the tunnel. Round
    // robin, so web2 is certain to be tried (P2C would soon prefer the endpoint that works).
    c.write_config(&format!(
        "{}apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web}}\nspec: {{targetRef: {{kind: Service, name: web}}, loadBalancer: RoundRobin}}\n",
        c.config_yaml()
    ));
    let agent = c.start_agent("a", &[]);
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &testpod(), &["http-server", "8080", "web"]);
    c.pod("web").wait_listening(8080, SECS5);
    for _ in 0..6 {
        let a = http_get(c.pod("client"), "http://10.96.0.10/").expect("every request is served");
        assert_eq!(a["server"], "web");
    }
    assert!(
        agent.stat("proxy", "upstream_connect_errors") >= 1,
        "web2 was tried and skipped"
    );
}
