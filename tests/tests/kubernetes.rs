//! Kubernetes mode, against the in-test API server (`weft_e2e::kube_api`): the agent
//! takes the cluster from list/watch, reads it into the same model as file mode, and
//! follows changes, deletions and a 410 Gone re-list.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use weft_e2e::{
    bin, http_get, kube_api::ApiServer, require_root, Agent, Cluster, PodSpec, ServiceSpec,
};

const SECS5: Duration = Duration::from_secs(5);

fn cluster(test: &str) -> Cluster {
    Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").label("app", "client"))
        .pod(PodSpec::new("web-1", "a").label("app", "web").port(8080))
        .pod(PodSpec::new("web-2", "b").label("app", "web").port(8080))
        .pod(
            PodSpec::new("db", "b")
                .label("app", "db")
                .port(5432)
                .unmeshed(),
        )
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("db", "10.96.0.11")
                .select("app", "db")
                .tcp(5432, 5432),
        )
        .build()
}

/// An API server in the cluster's fabric (where every node reaches it) serving the
/// cluster's objects, and a kubeconfig naming it.
fn api_server(c: &Cluster) -> (ApiServer, String) {
    let api = ApiServer::start(
        Some(&Path::new("/var/run/netns").join(&c.fabric)),
        "192.168.250.254:6443",
    );
    for o in c.kube_objects() {
        api.apply(o);
    }
    let kubeconfig = c.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    (api, kubeconfig.display().to_string())
}

/// The effective configuration, without what says where it came from or how often it
/// changed.
fn dump(agent: &Agent) -> Value {
    let mut v = agent.admin("/config").unwrap();
    let m = v.as_object_mut().unwrap();
    for k in ["generation", "source", "last_config_error"] {
        m.remove(k);
    }
    // What each endpoint is, not what traffic has run up on it (latency estimates move
    // with time).
    for s in m["services"].as_array_mut().unwrap() {
        for e in s["endpoints"].as_array_mut().unwrap() {
            e.as_object_mut().unwrap().retain(|k, _| {
                ["addr", "app", "identity", "meshed", "node", "workload"].contains(&k.as_str())
            });
        }
    }
    v
}

/// The endpoints of the service at `vip` this agent balances over.
fn endpoints(agent: &Agent, vip: &str) -> Vec<String> {
    let services = agent.admin("/services").unwrap();
    services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"].as_str() == Some(vip))
        .map(|s| {
            s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["addr"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn kubernetes_mode_routes_as_file_mode_does() {
    if !require_root("kubernetes_mode_routes_as_file_mode_does") {
        return;
    }
    let c = cluster("k8s-same");
    let (api, kubeconfig) = api_server(&c);
    let _web1 = c.serve_http("web-1", 8080, &[]);
    let _web2 = c.serve_http("web-2", 8080, &[]);
    let _db = c.serve_http("db", 5432, &[]);

    // File mode first, then the same node from the Kubernetes API.
    let from_files = {
        let a = c.start_agent("a", &[]);
        dump(&a)
    };
    let a = c.start_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let from_api = dump(&a);
    assert_eq!(
        from_api, from_files,
        "the same cluster from files and from the API"
    );
    assert_eq!(
        a.admin("/status").unwrap()["config_source"],
        json!(format!("the Kubernetes API ({kubeconfig})"))
    );
    // A list, then a watch, for every kind: the CRDs too (this server has them all).
    let reqs = api.requests();
    for path in ["/api/v1/pods?", "/apis/discovery.k8s.io/v1/endpointslices?"] {
        let lists = reqs
            .iter()
            .filter(|r| r.contains(path) && !r.contains("watch=true"))
            .count();
        assert_eq!(lists, 1, "{path} listed once: {reqs:#?}");
        assert!(
            reqs.iter()
                .any(|r| r.contains(path) && r.contains("watch=true")),
            "{path} watched: {reqs:#?}"
        );
    }

    // Traffic goes exactly as in file mode: balanced over both web pods (web-2 through
    // node b's agent), db unmeshed.
    let _b = c.start_agent("b", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    // weft's own CRDs are watched too: round robin, so both endpoints are seen (the
    // default balancer prefers the endpoint on the client's node).
    api.apply(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "web", "namespace": "default", "generation": 1},
        "spec": {"targetRef": {"group": "", "kind": "Service", "name": "web"}, "loadBalancer": "RoundRobin"}
    }));
    wait_for("the TrafficPolicy applies", SECS5, || {
        a.admin("/services")
            .unwrap()
            .to_string()
            .contains("RoundRobin")
    });
    // weft's own kinds get an Accepted condition.
    wait_for("the TrafficPolicy's status", SECS5, || {
        api.get("weft.dev/v1alpha1", "TrafficPolicy", "default", "web")
            .is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
        seen.insert(answer["server"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "both endpoints serve"
    );
    let answer = http_get(c.pod("client"), "http://10.96.0.11:5432/").expect("db answers");
    assert_eq!(answer["server"], "db");

    // An endpoint deleted from the EndpointSlice leaves balancing within a second.
    let web = c.service_spec("web").clone();
    assert_eq!(endpoints(&a, "10.96.0.10:80").len(), 2);
    api.apply(c.endpoint_slice(&web, &["web-2"]));
    let took = wait_for(
        "web-2 leaves the service after its endpoint is deleted",
        Duration::from_secs(1),
        || endpoints(&a, "10.96.0.10:80").len() == 1,
    );
    eprintln!("endpoint removal reached the agent in {took:?}");
    for _ in 0..6 {
        let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
        assert_eq!(answer["server"], "web-1", "web-2 is out of balancing");
    }
    // The eBPF service map agrees (what unmeshed pods' connects use).
    let maps = a.admin("/maps").unwrap();
    let web_map = maps["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == "10.96.0.10:80")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        web_map["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{web_map}"
    );

    // A Service deleted goes away; one added appears.
    api.delete("v1", "Service", "default", "db");
    wait_for("db's Service is removed", Duration::from_secs(1), || {
        endpoints(&a, "10.96.0.11:5432").is_empty()
    });
    http_get(c.pod("client"), "http://10.96.0.11:5432/").expect_err("db's address is gone");
}

#[test]
fn a_410_gone_relists_once_and_watching_goes_on() {
    if !require_root("a_410_gone_relists_once_and_watching_goes_on") {
        return;
    }
    let c = cluster("k8s-gone");
    let (api, kubeconfig) = api_server(&c);
    let _web1 = c.serve_http("web-1", 8080, &[]);
    let a = c.start_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");

    // History compacted while watching: every watcher comes back to a 410 Gone and lists
    // again, once per kind; a change made after is seen.
    let lists = |reqs: &[String]| {
        reqs.iter()
            .filter(|r| r.contains("/api/v1/services?") && !r.contains("watch=true"))
            .count()
    };
    let before = lists(&api.requests());
    api.expire();
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-again", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "type": "ClusterIP",
                 "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }));
    let mut slice = c.endpoint_slice(c.service_spec("web"), &[]);
    slice["metadata"]["name"] = json!("web-again-xyz12");
    slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("web-again");
    api.apply(slice);
    wait_for(
        "the Service added after the 410 is served",
        Duration::from_secs(10),
        || endpoints(&a, "10.96.0.20:80").len() == 2,
    );
    std::thread::sleep(Duration::from_secs(2));
    let reqs = api.requests();
    assert_eq!(
        lists(&reqs) - before,
        1,
        "one clean re-list, no storm: {reqs:#?}"
    );
    assert!(
        a.proc.output().contains("410") || a.proc.output().contains("watching"),
        "the agent noticed"
    );
    http_get(c.pod("client"), "http://10.96.0.20/").expect("the new service answers");
    assert_eq!(a.admin("/status").unwrap()["rejected"], json!([]));
}

#[test]
fn an_invalid_route_from_the_api_is_refused_alone() {
    if !require_root("an_invalid_route_from_the_api_is_refused_alone") {
        return;
    }
    let c = cluster("k8s-route");
    let (api, kubeconfig) = api_server(&c);
    // The gateway API's TLSRoute CRD is not installed: the agent starts regardless.
    for v in ["v1", "v1alpha3", "v1alpha2"] {
        api.without(&format!("gateway.networking.k8s.io/{v}/tlsroutes"));
    }
    let _web1 = c.serve_http("web-1", 8080, &[]);
    let _web2 = c.serve_http("web-2", 8080, &[]);
    let a = c.start_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let _b = c.start_agent("b", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let route = |name: &str, backend: &str, weight: u32| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default", "generation": 1},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"group": "", "kind": "Service", "name": backend, "port": 80, "weight": weight}]
                }]
            }
        })
    };
    // All of web's traffic to a Service that selects web-2 only.
    let mut only2 = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-two", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.30", "type": "ClusterIP", "selector": {"app": "web", "pod": "2"},
                 "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    });
    api.apply(only2.clone());
    let mut slice = c.endpoint_slice(c.service_spec("web"), &["web-1"]);
    slice["metadata"]["name"] = json!("web-two-aaaaa");
    slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("web-two");
    api.apply(slice);
    api.apply(route("to-two", "web-two", 1));
    wait_for("the route applies", SECS5, || {
        (0..4).all(|_| {
            http_get(c.pod("client"), "http://10.96.0.10/").is_ok_and(|a| a["server"] == "web-2")
        })
    });

    // The route's status, written by the one agent holding the Lease.
    let ours = |name: &str| -> Option<Value> {
        let r = api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "default", name)?;
        r["status"]["parents"]
            .as_array()?
            .iter()
            .find(|p| p["controllerName"] == "weft.dev/mesh")
            .cloned()
    };
    let condition = |p: &Value, t: &str| -> (String, String, i64) {
        let c = p["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap_or_else(|| panic!("no {t} in {p}"));
        (
            c["status"].as_str().unwrap().to_owned(),
            c["reason"].as_str().unwrap().to_owned(),
            c["observedGeneration"].as_i64().unwrap(),
        )
    };
    wait_for("the route's status is written", SECS5, || {
        ours("to-two").is_some()
    });
    let p = ours("to-two").unwrap();
    assert_eq!(p["parentRef"]["name"], "web");
    assert_eq!(
        condition(&p, "Accepted"),
        ("True".into(), "Accepted".into(), 1)
    );
    assert_eq!(
        condition(&p, "ResolvedRefs"),
        ("True".into(), "ResolvedRefs".into(), 1)
    );
    let lease = api
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "weft-system",
            "weft-status-writer",
        )
        .expect("the status writer's Lease");
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_owned();
    assert!(holder.ends_with("-a") || holder.ends_with("-b"), "{lease}");
    // A backend that does not exist: accepted, its refs unresolved.
    api.apply(route("to-nowhere", "no-such-service", 1));
    wait_for("the dangling route's status", SECS5, || {
        ours("to-nowhere").is_some()
    });
    let p = ours("to-nowhere").unwrap();
    assert_eq!(condition(&p, "Accepted").0, "True");
    assert_eq!(
        condition(&p, "ResolvedRefs"),
        ("False".into(), "BackendNotFound".into(), 1)
    );
    api.delete(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "default",
        "to-nowhere",
    );

    // A second route, on db: its requests carry the header its filter sets.
    let to_db = |version: &str| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "to-db", "namespace": "default", "generation": 1},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "db", "port": 5432}],
                "rules": [{
                    "filters": [{"type": "RequestHeaderModifier",
                                 "requestHeaderModifier": {"set": [{"name": "x-route", "value": version}]}}],
                    "backendRefs": [{"group": "", "kind": "Service", "name": "db", "port": 5432}]
                }]
            }
        })
    };
    let _db = c.serve_http("db", 5432, &[]);
    api.apply(to_db("v1"));
    let db_route = || {
        http_get(c.pod("client"), "http://10.96.0.11:5432/")
            .ok()
            .and_then(|a| a["headers"]["x-route"].as_str().map(str::to_owned))
    };
    wait_for("the db route applies", SECS5, || {
        db_route().as_deref() == Some("v1")
    });

    // One update: the route made invalid (weight out of range), and beside it a valid
    // route changed and a Service changed.
    let status_patches = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("/httproutes/to-two/status"))
            .count()
    };
    let patches_before = status_patches();
    let mut bad = route("to-two", "web-two", 5_000_000);
    bad["metadata"]["generation"] = json!(2);
    api.apply(bad);

    api.apply(to_db("v2"));
    only2["spec"]["clusterIP"] = json!("10.96.0.31");
    api.apply(only2);
    let rejected = a.wait_rejected(SECS5);
    assert_eq!(rejected[0]["kind"], "HTTPRoute", "{rejected:?}");
    assert_eq!(rejected[0]["kept_previous"], true);
    assert!(
        rejected[0]["at"]
            .as_str()
            .unwrap()
            .starts_with("Kubernetes API (HTTPRoute default/to-two)"),
        "{rejected:?}"
    );
    wait_for("the valid changes beside it apply", SECS5, || {
        endpoints(&a, "10.96.0.31:80").len() == 1
    });
    assert_eq!(
        db_route().as_deref(),
        Some("v2"),
        "the valid route's change applied"
    );
    assert_eq!(
        a.admin("/status").unwrap()["rejected"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    for _ in 0..4 {
        let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
        assert_eq!(
            answer["server"], "web-2",
            "the route's last good version routes"
        );
    }
    wait_for("the refusal reaches the route's status", SECS5, || {
        ours("to-two").is_some_and(|p| condition(&p, "Accepted").0 == "False")
    });
    let p = ours("to-two").unwrap();
    assert_eq!(
        condition(&p, "Accepted"),
        ("False".into(), "UnsupportedValue".into(), 2)
    );
    let message = p["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[0].backendRefs[0].weight: must be 0 to 1000000")
            && message.contains("last accepted version stays in force"),
        "{message}"
    );
    // Two agents, one writer: the change is written once, not fought over.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        status_patches() - patches_before,
        1,
        "{:#?}",
        api.requests()
    );
}

/// Run `weft-cni` as a container runtime does: the CNI_* environment and nothing else,
/// the network configuration on standard input. Its exit status, standard output (JSON,
/// or null when empty) and standard error.
fn weft_cni(command: &str, env: &[(&str, &str)], stdin: &Value) -> (bool, Value, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(bin("weft-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running weft-cni");
    // VERSION answers without reading its input: a closed pipe is no failure.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("weft-cni {command}: {e}: {text}"))
    };
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The network configuration a runtime passes a chained plugin after the main one (as
/// containerd does with a bridge plugin first): its result in `prevResult`.
fn net_conf(state_dir: &Path, ip: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "weft-cni",
        "stateDir": state_dir,
        "runtimeConfig": {"cgroupPath": "/kubepods/besteffort/pod1234"},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
                {"name": "veth1a2b3c4d", "mac": "9e:2d:4f:11:22:33"},
                {"name": "eth0", "mac": "0a:58:0a:f4:01:0b", "sandbox": "/var/run/netns/cni-1234"}
            ],
            "ips": [{"interface": 2, "address": format!("{ip}/24"), "gateway": "10.244.1.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        }
    })
}

fn enrolled(a: &Agent) -> Vec<String> {
    a.admin("/status").unwrap()["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn weft_cni_hands_pods_to_the_agent_as_a_runtime_invokes_it() {
    if !require_root("weft_cni_hands_pods_to_the_agent_as_a_runtime_invokes_it") {
        return;
    }
    let c = cluster("k8s-cni");
    // Pods as a real API server has them: nothing says where their network namespace is.
    let api = ApiServer::start(
        Some(&Path::new("/var/run/netns").join(&c.fabric)),
        "192.168.250.254:6443",
    );
    for o in c.kube_objects_with(false) {
        api.apply(o);
    }
    let kubeconfig = c.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let dir = c.dir.join("cni-a");
    let dir_s = dir.display().to_string();
    let args = [
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--cni-state-dir",
        &dir_s,
    ];
    let _web1 = c.serve_http("web-1", 8080, &[]);

    let (ok, v, _) = weft_cni("VERSION", &[], &json!({"cniVersion": "1.1.0"}));
    assert!(ok);
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    // Only web-1 serves (web-2's node runs no agent).
    api.apply(c.endpoint_slice(c.service_spec("web"), &["web-2"]));
    let a = c.start_agent("a", &args);
    assert_eq!(enrolled(&a), Vec::<String>::new(), "no pod handed over yet");

    // ADD: the previous plugin's result comes back unchanged; the agent enrolls the pod.
    let web1 = c.pod("web-1");
    let netns = web1.netns_path().display().to_string();
    let cni_args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=c0ffee01;K8S_POD_UID=4f1c2d3e-0000-4000-8000-000000000001";
    let env = [
        ("CNI_CONTAINERID", "c0ffee01"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", cni_args),
    ];
    let conf = net_conf(&dir, &web1.ip.to_string());
    let (ok, result, err) = weft_cni("ADD", &env, &conf);
    assert!(ok, "ADD failed: {result} {err}");
    assert_eq!(
        result, conf["prevResult"],
        "a chained plugin passes the result on"
    );
    let took = wait_for("web-1 enrolled after ADD", Duration::from_secs(1), || {
        enrolled(&a).contains(&"default/web-1".to_owned())
    });
    eprintln!("ADD to enrolled: {took:?}");
    let (ok, v, _) = weft_cni("CHECK", &env, &conf);
    assert!(ok, "CHECK: {v}");
    // Until the client's sandbox is handed over, its agent cannot capture it: its
    // connects are balanced in the kernel, straight to web-1.
    http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
    assert_eq!(a.stat("proxy", "outbound_accepted"), 0, "not captured yet");
    let client_netns = c.pod("client").netns_path().display().to_string();
    let client_env = [
        ("CNI_CONTAINERID", "c0ffee03"),
        ("CNI_NETNS", client_netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=client"),
    ];
    let (ok, _, err) = weft_cni(
        "ADD",
        &client_env,
        &net_conf(&dir, &c.pod("client").ip.to_string()),
    );
    assert!(ok, "{err}");
    wait_for("client enrolled after ADD", Duration::from_secs(1), || {
        enrolled(&a).contains(&"default/client".to_owned())
    });
    let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
    assert_eq!(answer["server"], "web-1");
    assert!(
        a.stat("proxy", "outbound_accepted") >= 1,
        "through the agent"
    );

    // DEL: the pod is let go.
    let (ok, v, _) = weft_cni("DEL", &env, &conf);
    assert!(ok && v.is_null(), "DEL: {v}");
    wait_for("web-1 let go after DEL", Duration::from_secs(1), || {
        !enrolled(&a).contains(&"default/web-1".to_owned())
    });
    let (ok, v, _) = weft_cni("CHECK", &env, &conf);
    assert!(!ok && v["code"] == 100, "CHECK after DEL: {v}");
    let (ok, _, _) = weft_cni("DEL", &env, &conf);
    assert!(ok, "DEL is idempotent");
    let (ok, _, _) = weft_cni("DEL", &client_env, &conf);
    assert!(ok);

    // With no agent running, ADD still succeeds, and the next agent enrolls the pod.
    drop(a);
    let client = c.pod("client");
    let netns = client.netns_path().display().to_string();
    let cni_args =
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=client;K8S_POD_INFRA_CONTAINER_ID=c0ffee02";
    let env = [
        ("CNI_CONTAINERID", "c0ffee02"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", cni_args),
    ];
    let (ok, result, err) = weft_cni("ADD", &env, &net_conf(&dir, &client.ip.to_string()));
    assert!(ok, "ADD with the agent down: {result} {err}");
    assert!(
        err.contains("enrolls default/client when it starts"),
        "{err}"
    );
    let a = c.start_agent("a", &args);
    assert_eq!(enrolled(&a), ["default/client"], "enrolled at start");

    // Bad input gets a CNI error naming what is wrong.
    let (ok, v, _) = weft_cni("ADD", &[("CNI_CONTAINERID", "x")], &conf);
    assert!(
        !ok && v["code"] == 4 && v["msg"] == "CNI_NETNS is not set",
        "{v}"
    );
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.2.0");
    let (ok, v, _) = weft_cni("ADD", &env, &old);
    assert!(!ok && v["code"] == 1, "{v}");
}

#[test]
fn the_installer_chains_weft_cni_after_the_network_plugin() {
    // Files only: no root needed.
    let dir = std::env::temp_dir().join(format!("weft-cni-install-{}", std::process::id()));
    let (bin_dir, conf_dir) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    // Flannel's list, as its DaemonSet writes it, and a later file the runtime ignores.
    let flannel = json!({
        "name": "cbr0", "cniVersion": "1.0.0",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    std::fs::write(conf_dir.join("10-flannel.conflist"), flannel.to_string()).unwrap();
    std::fs::write(
        conf_dir.join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
    )
    .unwrap();
    let run = |verb: &str| {
        let out = std::process::Command::new(bin("weft-cni"))
            .args([verb, "--cni-bin-dir"])
            .arg(&bin_dir)
            .arg("--cni-conf-dir")
            .arg(&conf_dir)
            .args(["--state-dir", "/var/run/weft/cni", "--wait-seconds", "1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let read = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join(name)).unwrap()).unwrap()
    };
    let said = run("install");
    assert!(said.contains("chained weft-cni in"), "{said}");
    run("install"); // again: still one entry
    let list = read("10-flannel.conflist");
    let types: Vec<_> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        ["flannel", "portmap", "weft-cni"],
        "appended last, once"
    );
    assert_eq!(list["plugins"][2]["stateDir"], "/var/run/weft/cni");
    assert_eq!(list["plugins"][2]["capabilities"]["cgroupPath"], true);
    assert_eq!(
        read("99-loopback.conf")["type"],
        "loopback",
        "other files untouched"
    );
    let installed = bin_dir.join("weft-cni");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // The installed copy is the plugin.
    let out = std::process::Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
    run("uninstall");
    assert_eq!(read("10-flannel.conflist"), flannel, "back as it was");
    assert!(!installed.exists());

    // A single-plugin .conf becomes a list with weft-cni after the plugin.
    std::fs::remove_file(conf_dir.join("10-flannel.conflist")).unwrap();
    std::fs::write(
        conf_dir.join("10-bridge.conf"),
        r#"{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}}"#,
    )
    .unwrap();
    run("install");
    assert!(!conf_dir.join("10-bridge.conf").exists());
    let list = read("10-bridge.conflist");
    assert_eq!(
        (&list["name"], &list["cniVersion"]),
        (&json!("mynet"), &json!("0.4.0"))
    );
    assert_eq!(list["plugins"][0]["bridge"], "cni0");
    assert_eq!(list["plugins"][1]["type"], "weft-cni");

    // Nothing to chain after: a clear error once the wait is over.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = std::process::Command::new(bin("weft-cni"))
        .args(["install", "--cni-conf-dir"])
        .arg(&empty)
        .args(["--cni-bin-dir"])
        .arg(&bin_dir)
        .args(["--wait-seconds", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chains after the cluster's network plugin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn meshing_a_namespace_or_a_pod_enrolls_running_pods_within_a_second() {
    if !require_root("meshing_a_namespace_or_a_pod_enrolls_running_pods_within_a_second") {
        return;
    }
    let c = cluster("k8s-switch");
    // Pods that say nothing themselves: their namespace decides.
    let api = ApiServer::start(
        Some(&Path::new("/var/run/netns").join(&c.fabric)),
        "192.168.250.254:6443",
    );
    let mut pods = std::collections::BTreeMap::new();
    for mut o in c.kube_objects() {
        if o["kind"] == "Pod" {
            o["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove("weft.dev/mesh");
            pods.insert(
                o["metadata"]["name"].as_str().unwrap().to_owned(),
                o.clone(),
            );
        }
        api.apply(o);
    }
    let kubeconfig = c.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let _web1 = c.serve_http("web-1", 8080, &[]);
    // Only web-1 serves (web-2's node runs no agent).
    api.apply(c.endpoint_slice(c.service_spec("web"), &["web-2"]));
    let a = c.start_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    assert_eq!(enrolled(&a), Vec::<String>::new(), "nothing meshed yet");
    http_get(c.pod("client"), "http://10.96.0.10/").expect("balanced in the kernel");
    assert_eq!(a.stat("proxy", "outbound_accepted"), 0);

    let namespace = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "default", "labels": labels}, "spec": {"finalizers": ["kubernetes"]}})
    };
    api.apply(namespace(
        json!({"kubernetes.io/metadata.name": "default", "weft.dev/mesh": "enabled"}),
    ));
    let took = wait_for(
        "the namespace's pods enrolled",
        Duration::from_secs(1),
        || enrolled(&a) == ["default/client", "default/web-1"],
    );
    eprintln!("namespace label to enrolled: {took:?}");
    let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
    assert_eq!(answer["server"], "web-1");
    assert!(a.stat("proxy", "outbound_accepted") >= 1, "captured now");

    // One pod opts out by annotation; the rest of the namespace stays meshed.
    let mut web1 = pods["web-1"].clone();
    web1["metadata"]["annotations"]["weft.dev/mesh"] = json!("disabled");
    api.apply(web1);
    wait_for("web-1 let go", Duration::from_secs(1), || {
        enrolled(&a) == ["default/client"]
    });
    http_get(c.pod("client"), "http://10.96.0.10/").expect("web-1 still answers, unmeshed");

    // The label off again: nothing is meshed.
    api.apply(namespace(json!({"kubernetes.io/metadata.name": "default"})));
    wait_for(
        "the namespace's pods let go",
        Duration::from_secs(1),
        || enrolled(&a).is_empty(),
    );
}

#[test]
fn the_ca_reads_the_cluster_from_the_api_and_agents_find_it_by_its_service() {
    if !require_root("the_ca_reads_the_cluster_from_the_api_and_agents_find_it_by_its_service") {
        return;
    }
    let c = cluster("k8s-ca");
    let (api, kubeconfig) = api_server(&c);
    // The CA as a Service of weft-system; its endpoint is where it listens (the fabric).
    let (ip, port) = c.ca_address().split_once(':').unwrap();
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "weft-ca", "namespace": "weft-system"},
        "spec": {"clusterIP": "10.96.255.12", "clusterIPs": ["10.96.255.12"], "type": "ClusterIP",
                 "selector": {"app.kubernetes.io/name": "weft-ca"},
                 "ports": [{"name": "grpc", "port": 15012, "targetPort": 15012, "protocol": "TCP"}]}
    }));
    api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "weft-ca-x7k2p", "namespace": "weft-system",
                     "labels": {"kubernetes.io/service-name": "weft-ca"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "grpc", "port": port.parse::<u16>().unwrap(), "protocol": "TCP"}]
    }));
    // Round robin, so node b's web-2 is reached (the default prefers the client's node).
    api.apply(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"targetRef": {"group": "", "kind": "Service", "name": "web"}, "loadBalancer": "RoundRobin"}
    }));
    c.ca_from_kubernetes(&kubeconfig);
    c.ensure_ca();
    let _web1 = c.serve_http("web-1", 8080, &[]);
    let _web2 = c.serve_http("web-2", 8080, &[]);
    let agent = |node: &str| {
        let mut flags: Vec<String> = ["--kubernetes", "--kubeconfig", kubeconfig.as_str()]
            .map(str::to_owned)
            .to_vec();
        // The CA by its Service name, which only the cluster's objects resolve here.
        for (i, f) in c.identity_flags(node).into_iter().enumerate() {
            flags.push(if i == 1 {
                "weft-ca.weft-system.svc:15012".to_owned()
            } else {
                f
            });
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        c.start_agent(node, &flags)
    };
    let a = agent("a");
    let b = agent("b");
    // Both hold their pods' certificates, signed by the CA from what the API says runs
    // where; web-2 is reached on node b through the mutually authenticated tunnel.
    for agent in [&a, &b] {
        let certs = agent.admin("/certificates").unwrap();
        assert!(
            certs["certificates"].as_array().map(Vec::len) >= Some(1),
            "{certs}"
        );
    }
    let answer = loop_until_web2(&c);
    assert_eq!(answer["server"], "web-2");
    assert!(
        c.ca_log().contains("signed"),
        "the CA signed: {}",
        c.ca_log()
    );
}

/// Requests to web until web-2 (on node b) answers, through the tunnel.
fn loop_until_web2(c: &Cluster) -> Value {
    for _ in 0..20 {
        let a = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
        if a["server"] == "web-2" {
            return a;
        }
    }
    panic!("web-2 never answered");
}

#[test]
fn weftctl_quarantine_annotates_the_pod_for_every_node() {
    if !require_root("weftctl_quarantine_annotates_the_pod_for_every_node") {
        return;
    }
    let c = cluster("k8s-quarantine");
    let (api, kubeconfig) = api_server(&c);
    let _web1 = c.serve_http("web-1", 8080, &[]);
    let a = c.start_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let b = c.start_agent("b", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let quarantined = |agent: &Agent| -> Vec<String> {
        agent.admin("/services").unwrap()["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == "10.96.0.10:80")
            .map(|s| {
                s["quarantined"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|q| q.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(quarantined(&a), Vec::<String>::new());
    // Asked of node a's agent, applied by every node's: the annotation is the API's.
    a.weftctl(&[
        "quarantine",
        "default/web-1",
        "--reason",
        "memory grows",
        "--allow-from",
        "10.244.1.0/24",
    ]);
    let pod = api.get("v1", "Pod", "default", "web-1").unwrap();
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["weft.dev/quarantine"], "memory grows");
    assert_eq!(
        annotations["weft.dev/quarantine-allow-from"],
        "10.244.1.0/24"
    );
    assert_eq!(
        annotations["weft.dev/mesh"], "enabled",
        "the others are kept"
    );
    for agent in [&a, &b] {
        wait_for("the quarantine reaches every agent", SECS5, || {
            quarantined(agent) == ["default/web-1"]
        });
    }
    let again = a.weftctl_output(&["quarantine", "default/web-1", "--reason", "x"]);
    assert!(!again.status.success(), "quarantined already");
    a.weftctl(&["unquarantine", "default/web-1"]);
    let pod = api.get("v1", "Pod", "default", "web-1").unwrap();
    assert!(pod["metadata"]["annotations"]["weft.dev/quarantine"].is_null());
    for agent in [&a, &b] {
        wait_for("lifted on every agent", SECS5, || {
            quarantined(agent).is_empty()
        });
    }
}

/// The HTTP status `pod` gets for `url`, and the answering server when there is one.
fn answer_of(pod: &weft_e2e::Pod, url: &str) -> (String, String) {
    let out = pod.run(
        "curl",
        &["-sS", "--max-time", "5", "-w", "\n%{http_code}", url],
        Duration::from_secs(8),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    let server = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["server"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (code.to_owned(), server)
}

/// `n` calls of weft.test.Echo/`method` at `addr` with the gRPC project's own client;
/// each answer is the server's name or the gRPC status code.
fn grpc_calls(c: &Cluster, pod: &str, addr: &str, method: &str, n: usize) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = c.pod(pod).run(
        "/usr/bin/env",
        &[
            &format!("PYTHONPATH={}", root.join("target/pypi").display()),
            "python3",
            &root.join("tests/peers/grpc_peer.py").display().to_string(),
            "call",
            addr,
            method,
            &n.to_string(),
        ],
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            v["ok"]
                .as_str()
                .or(v["code"].as_str())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn gateway_api_mesh_routes_from_the_api() {
    if !require_root("gateway_api_mesh_routes_from_the_api") {
        return;
    }
    let web = |name: &str, ip: &str, k: &str, v: &str| {
        ServiceSpec::new(name, ip)
            .select(k, v)
            .tcp(80, 8080)
            .name_port(80, "http")
            .tcp(9090, 9090)
            .name_port(9090, "grpc")
    };
    let c = Cluster::builder("k8s-gamma")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").label("app", "client"))
        .pod(
            PodSpec::new("shopper", "a")
                .namespace("shop")
                .label("app", "shopper"),
        )
        .pod(
            PodSpec::new("web-1", "a")
                .label("app", "web")
                .label("version", "v1")
                .port(8080)
                .port(9090),
        )
        .pod(
            PodSpec::new("web-2", "b")
                .label("app", "web")
                .label("version", "v2")
                .port(8080)
                .port(9090),
        )
        .service(web("web", "10.96.0.10", "app", "web"))
        .service(web("web-v2", "10.96.0.30", "version", "v2"))
        .build();
    let (api, kubeconfig) = api_server(&c);
    api.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}
    }));
    // A cluster whose Gateway API CRDs predate TLSRoute v1: the agent watches the newest
    // version served.
    api.without("gateway.networking.k8s.io/v1/tlsroutes");
    let _web1 = c.serve_http("web-1", 8080, &[]);
    let _web2 = c.serve_http("web-2", 8080, &[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let grpc_server = |pod: &str| {
        let s = c.pod(pod).spawn(
            &c.dir,
            Path::new("/usr/bin/env"),
            &[
                &format!("PYTHONPATH={}", root.join("target/pypi").display()),
                "python3",
                &root.join("tests/peers/grpc_peer.py").display().to_string(),
                "serve",
                "9090",
                pod,
            ],
        );
        c.pod(pod).wait_listening(9090, SECS5);
        s
    };
    let _grpc1 = grpc_server("web-1");
    let _grpc2 = grpc_server("web-2");
    let a = c.start_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let _b = c.start_agent("b", &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let watched = |path: &str| {
        api.requests()
            .iter()
            .any(|r| r.contains(path) && r.contains("watch=true"))
    };
    wait_for("TLSRoutes watched at v1alpha3", SECS5, || {
        watched("/apis/gateway.networking.k8s.io/v1alpha3/tlsroutes")
    });
    assert!(!watched("/apis/gateway.networking.k8s.io/v1/tlsroutes"));

    // One TrafficPolicy for both Services through targetRefs: round robin, so the
    // default client's requests reach both pods.
    api.apply(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "rr", "namespace": "default", "generation": 1},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"},
                                {"group": "", "kind": "Service", "name": "web-v2"}],
                 "loadBalancer": "RoundRobin"}
    }));
    let servers = |pod: &str, n: usize| -> std::collections::BTreeSet<String> {
        (0..n)
            .map(|_| answer_of(c.pod(pod), "http://10.96.0.10/").1)
            .collect()
    };
    wait_for("round robin over both pods", SECS5, || {
        servers("client", 4).len() == 2
    });

    // A consumer route: shop's clients of default/web go to web-v2 (port "http" only).
    // Its backend is in another namespace, and no ReferenceGrant allows that yet.
    api.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shop-to-v2", "namespace": "shop", "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "namespace": "default", "sectionName": "http"}],
            "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "web-v2", "namespace": "default", "port": 80}]}]
        }
    }));
    wait_for("the ungranted backend answers 500", SECS5, || {
        answer_of(c.pod("shopper"), "http://10.96.0.10/").0 == "500"
    });
    assert_eq!(servers("client", 4).len(), 2, "other namespaces unaffected");
    let condition = |kind: &str, ns: &str, name: &str, t: &str| -> Option<(String, String)> {
        let r = api.get("gateway.networking.k8s.io/v1", kind, ns, name)?;
        let p = r["status"]["parents"]
            .as_array()?
            .iter()
            .find(|p| p["controllerName"] == "weft.dev/mesh")?
            .clone();
        let c = p["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == t)?
            .clone();
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
        ))
    };
    wait_for("RefNotPermitted in the route's status", SECS5, || {
        condition("HTTPRoute", "shop", "shop-to-v2", "ResolvedRefs")
            == Some(("False".into(), "RefNotPermitted".into()))
    });
    assert_eq!(
        condition("HTTPRoute", "shop", "shop-to-v2", "Accepted"),
        Some(("True".into(), "Accepted".into()))
    );
    // default grants shop's HTTPRoutes its web-v2 Service.
    api.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "shop-may-use-v2", "namespace": "default"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
                 "to": [{"group": "", "kind": "Service", "name": "web-v2"}]}
    }));
    wait_for("shop's clients reach web-v2 only", SECS5, || {
        (0..4).all(|_| {
            answer_of(c.pod("shopper"), "http://10.96.0.10/") == ("200".into(), "web-2".into())
        })
    });
    assert_eq!(
        servers("client", 4).len(),
        2,
        "the producer's clients still balance"
    );
    // What the operator sees: the consumer routes of the service, and explain from each
    // namespace.
    let routes = a.admin("/routes").unwrap();
    let web80 = routes["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == "10.96.0.10:80")
        .cloned()
        .unwrap_or_else(|| panic!("web:80 in {routes}"));
    assert_eq!(web80["consumers"][0]["namespace"], "shop", "{web80}");
    let explain = |from: &str| {
        let out = a.weftctl(&[
            "explain",
            from,
            "10.96.0.10:80",
            "--path",
            "/",
            "-o",
            "json",
        ]);
        serde_json::from_str::<Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    assert_eq!(explain("shop/shopper")["route"], "shop/shop-to-v2");
    assert_eq!(explain("default/client")["route"], Value::Null);
    wait_for("ResolvedRefs once granted", SECS5, || {
        condition("HTTPRoute", "shop", "shop-to-v2", "ResolvedRefs")
            == Some(("True".into(), "ResolvedRefs".into()))
    });

    // A GRPCRoute on the "grpc" port: one method to web-v2; a method no rule matches is
    // UNIMPLEMENTED to the gRPC client (HTTP 404).
    let before = grpc_calls(&c, "client", "10.96.0.10:9090", "Who", 4);
    assert_eq!(
        before
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        2,
        "before the route, gRPC balances: {before:?}"
    );
    api.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "who-to-v2", "namespace": "default", "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "sectionName": "grpc"}],
            "rules": [{"matches": [{"method": {"service": "weft.test.Echo", "method": "Who"}}],
                       "backendRefs": [{"name": "web-v2", "port": 9090}]}]
        }
    }));
    wait_for("the GRPCRoute applies", SECS5, || {
        grpc_calls(&c, "client", "10.96.0.10:9090", "Who", 4) == ["web-2"; 4]
    });
    assert_eq!(
        grpc_calls(&c, "client", "10.96.0.10:9090", "Other", 1),
        ["UNIMPLEMENTED"]
    );
    wait_for("the GRPCRoute's status", SECS5, || {
        condition("GRPCRoute", "default", "who-to-v2", "Accepted")
            == Some(("True".into(), "Accepted".into()))
    });
    // The HTTP port has no GRPCRoute: the default client still balances there.
    assert_eq!(servers("client", 4).len(), 2);
}
