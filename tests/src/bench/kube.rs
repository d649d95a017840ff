//! Kubernetes mode at scale: an agent watching the in-test API server (crate::kube_api)
//! with 1,000 or 10,000 Services of 10 endpoints each (EndpointSlices over 1,000 pods on
//! another node). What one watched change costs, from the API server's event to the
//! agent having applied it (eBPF maps written, proxy state swapped), and what the agent
//! holds in memory.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{procstat, results::Results, Options};
use crate::{kube_api::ApiServer, Agent, Cluster, PodSpec, ServiceSpec};

const GROUPS: usize = 100;
const PER_GROUP: usize = 10;

fn pod_ip(w: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + w as u32)
}

fn vip(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + n as u32)
}

/// Service `s`'s EndpointSlice: its group's pods, but `without` (an index in the group).
fn slice(s: usize, without: Option<usize>) -> Value {
    let g = s % GROUPS;
    let endpoints: Vec<Value> = (0..PER_GROUP)
        .filter(|&i| Some(i) != without)
        .map(|i| {
            let w = i * GROUPS + g;
            json!({"addresses": [pod_ip(w).to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "far", "targetRef": {"kind": "Pod", "name": format!("f{w}"), "namespace": "filler"}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{s}-abcde"), "namespace": "filler",
                     "labels": {"kubernetes.io/service-name": format!("s{s}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "", "port": 80, "protocol": "TCP"}]
    })
}

fn generation(agent: &Agent) -> Option<u64> {
    agent.admin("/status").ok()?["config_generation"].as_u64()
}

/// Apply `obj` and wait until the agent has applied a new configuration.
fn timed_change(api: &ApiServer, agent: &Agent, obj: Value) -> Option<Duration> {
    let before = generation(agent)?;
    let t0 = Instant::now();
    api.apply(obj);
    loop {
        if generation(agent)? > before {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(opts: &Options, r: &mut Results) {
    let g = "watched changes at scale";
    r.method.push((
        g.into(),
        "Kubernetes mode against the in-test API server; one EndpointSlice changed (an endpoint removed, then added back): time from the API server's event to the agent reporting the change applied (maps written, state swapped), median of 6; agent RSS after; start: from launch to ready (first list of every kind)".into(),
    ));
    let sizes: &[usize] = if opts.quick {
        &[200, 1_000]
    } else {
        &[1_000, 10_000]
    };
    for &services in sizes {
        let case = format!("{services} services, {} endpoints", services * PER_GROUP);
        let c = Cluster::builder("bench-kube")
            .node("a")
            .pod(PodSpec::new("client", "a").unmeshed())
            .pod(
                PodSpec::new("srv", "a")
                    .label("app", "srv")
                    .port(7000)
                    .unmeshed(),
            )
            .service(
                ServiceSpec::new("target", "10.96.0.1")
                    .select("app", "srv")
                    .tcp(7, 7000),
            )
            .build();
        let api = ApiServer::start(
            Some(&Path::new("/var/run/netns").join(&c.fabric)),
            "192.168.250.254:6443",
        );
        for o in c.kube_objects() {
            api.apply(o);
        }
        api.apply(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "far"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.251.1"}]}}),
        );
        for w in 0..GROUPS * PER_GROUP {
            api.apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("f{w}"), "namespace": "filler", "labels": {"grp": format!("g{}", w % GROUPS)}},
                "spec": {"nodeName": "far", "containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 80}]}]},
                "status": {"phase": "Running", "podIP": pod_ip(w).to_string(), "podIPs": [{"ip": pod_ip(w).to_string()}]}
            }));
        }
        for s in 0..services {
            api.apply(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("s{s}"), "namespace": "filler"},
                "spec": {"clusterIP": vip(s).to_string(), "clusterIPs": [vip(s).to_string()], "type": "ClusterIP",
                         "selector": {"grp": format!("g{}", s % GROUPS)},
                         "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}
            }));
            api.apply(slice(s, None));
        }
        let kubeconfig = c.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
        let kubeconfig = kubeconfig.display().to_string();
        let t0 = Instant::now();
        let agent = c.spawn_agent("a", &["--kubernetes", "--kubeconfig", &kubeconfig]);
        let deadline = Instant::now() + Duration::from_secs(300);
        let ready = || agent.admin("/status").is_ok_and(|s| s["ready"] == true);
        while !ready() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !ready() {
            r.failures
                .push(format!("the agent did not get ready at {case}"));
            continue;
        }
        r.record(g, &case, "start", "s", t0.elapsed().as_secs_f64());
        r.record(
            g,
            &case,
            "RSS at start",
            "MiB",
            procstat::rss_mib(agent.proc.pid()),
        );
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for i in 0..6 {
            let s = (i * 7919) % services;
            match timed_change(&api, &agent, slice(s, Some(i % PER_GROUP))) {
                Some(t) => removed.push(t.as_secs_f64() * 1000.0),
                None => r
                    .failures
                    .push(format!("an endpoint removal was not applied at {case}")),
            }
            match timed_change(&api, &agent, slice(s, None)) {
                Some(t) => added.push(t.as_secs_f64() * 1000.0),
                None => r
                    .failures
                    .push(format!("an endpoint addition was not applied at {case}")),
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        if let Some(m) = median(&mut removed) {
            r.record(g, &case, "one endpoint removed", "ms", m);
        }
        if let Some(m) = median(&mut added) {
            r.record(g, &case, "one endpoint added", "ms", m);
        }
        r.record(
            g,
            &case,
            "RSS after changes",
            "MiB",
            procstat::rss_mib(agent.proc.pid()),
        );
    }
}
