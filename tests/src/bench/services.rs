//! Cases that grow the number of services: connect rate and latency with 0 to 100,000
//! services through weft's socket-level load balancing versus kube-proxy-style iptables
//! DNAT chains, the time each takes to install them, and the time from a configuration
//! change to the datapath using it at 10,000 services and 100,000 endpoints.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{procstat, results::Results, Options};
use crate::{bin, Agent, Cluster, PodSpec, ServiceSpec, Spawned};

/// The one service the clients use, last in every configuration (worst case for iptables,
/// whose service chain is a list).
const TARGET_VIP: &str = "10.96.0.1";

fn cluster() -> Cluster {
    Cluster::builder("bench-services")
        .node("a")
        .node("c")
        .pod(PodSpec::new("lb-client", "a").unmeshed())
        .pod(
            PodSpec::new("lb-srv", "a")
                .label("app", "lb-srv")
                .port(7000)
                .unmeshed(),
        )
        .pod(PodSpec::new("ipt-client", "c").unmeshed())
        .pod(
            PodSpec::new("ipt-srv", "c")
                .label("app", "ipt-srv")
                .unmeshed(),
        )
        .service(
            ServiceSpec::new("target", TARGET_VIP)
                .select("app", "lb-srv")
                .tcp(7, 7000),
        )
        .build()
}

/// The `n`-th filler service address: 10.97.0.0/16 upwards, never TARGET_VIP.
fn filler_vip(n: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 97, 0, 0));
    Ipv4Addr::from(base + n as u32)
}

/// Documents for `services` filler services over `groups` label groups of `per_group`
/// workloads on a node without an agent; each service selects one group, so it has
/// `per_group` endpoints.
fn filler_yaml(services: usize, groups: usize, per_group: usize) -> String {
    let mut y = String::with_capacity(services * 200);
    y.push_str("apiVersion: weft.dev/v1alpha1\nkind: Node\nmetadata: {name: far}\nspec: {address: 192.168.251.1}\n---\n");
    if services > 0 {
        for w in 0..groups * per_group {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + w as u32);
            let _ = write!(
                y,
                "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: f{w}, namespace: filler, labels: {{grp: g{}}}}}\nspec: {{node: far, ip: {ip}, ports: [{{port: 80}}]}}\n---\n",
                w % groups
            );
        }
    }
    for s in 0..services {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: filler}}\nspec: {{clusterIP: {}, selector: {{grp: g{}}}, ports: [{{port: 80}}]}}\n---\n",
            filler_vip(s),
            s % groups
        );
    }
    y
}

/// Write the configuration and wait until the agent applies it; returns the time taken.
fn apply(c: &Cluster, agent: &Agent, extra: &str) -> Option<Duration> {
    let before = agent.admin("/status").ok()?["config_generation"].as_u64()?;
    let t0 = Instant::now();
    c.write_config(&format!("{}{extra}", c.config_yaml()));
    loop {
        let st = agent.admin("/status").ok()?;
        if st["config_generation"].as_u64()? > before {
            return Some(t0.elapsed());
        }
        if st["last_config_error"].is_string() || t0.elapsed() > Duration::from_secs(300) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// kube-proxy's iptables layout for `n` filler services then the target, one endpoint
/// each: KUBE-SERVICES matches the service address and jumps to its KUBE-SVC chain, which
/// jumps to a KUBE-SEP chain that DNATs to the endpoint.
fn iptables_rules(n: usize, target_backend: &str) -> String {
    let mut r = String::with_capacity(n * 400 + 1000);
    r.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let chain = |i: usize| (format!("KUBE-SVC-{i:012X}"), format!("KUBE-SEP-{i:012X}"));
    for i in 0..=n {
        let (svc, sep) = chain(i);
        let _ = writeln!(r, ":{svc} - [0:0]\n:{sep} - [0:0]");
    }
    r.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for i in 0..=n {
        let (svc, sep) = chain(i);
        let (vip, port, backend) = if i == n {
            (TARGET_VIP.to_owned(), 7, target_backend.to_owned())
        } else {
            let ep = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + (i % 1000) as u32);
            (filler_vip(i).to_string(), 80, format!("{ep}:80"))
        };
        let _ = writeln!(r, "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"filler/s{i} cluster IP\" -m tcp --dport {port} -j {svc}");
        let _ = writeln!(
            r,
            "-A {svc} -m comment --comment \"filler/s{i} -> {backend}\" -j {sep}"
        );
        let _ = writeln!(r, "-A {sep} -p tcp -m comment --comment \"filler/s{i}\" -m tcp -j DNAT --to-destination {backend}");
    }
    r.push_str("COMMIT\n");
    r
}

fn connect_echo(c: &Cluster, client: &str, secs: f64) -> Value {
    let tp = bin("weft-testpod").display().to_string();
    let ms = ((secs * 1000.0) as u64).to_string();
    let out = c.pod(client).run(
        &tp,
        &["connect-echo", &format!("{TARGET_VIP}:7"), &ms],
        Duration::from_secs_f64(secs + 20.0),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

pub fn run(opts: &Options, r: &mut Results) {
    let c = cluster();
    for p in &c.pods {
        p.sysctl("net/ipv4/tcp_max_tw_buckets", "0");
    }
    let tp = bin("weft-testpod");
    let mut servers: Vec<Spawned> = vec![];
    for s in ["lb-srv", "ipt-srv"] {
        servers.push(c.pod(s).spawn(&c.dir, &tp, &["echo-server", "7000"]));
        c.pod(s).wait_listening(7000, Duration::from_secs(5));
    }
    let agent = c.start_agent("a", &["--reload-interval", "20ms"]);
    // Node c has no agent: its pods' service traffic goes by the node's iptables rules.
    c.pod("ipt-client")
        .exec("ip", &["route", "add", "10.96.0.0/12", "via", "10.244.2.1"]);
    let ipt_backend = format!("{}:7000", c.pod("ipt-srv").ip);
    let node_c = c.node("c");
    let rules_file = c.dir.join("rules.txt");

    let counts: &[usize] = if opts.quick {
        &[0, 1_000, 10_000]
    } else {
        &[0, 100, 1_000, 10_000, 100_000]
    };
    let g = "connection setup vs services";
    r.method.push((
        g.into(),
        format!(
            "weft-testpod connect-echo for {}s from an unmeshed pod; iptables: kube-proxy's chain layout (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP DNAT) loaded with iptables-restore, target service last",
            opts.run_secs
        ),
    ));
    for _rep in 0..opts.reps {
        for &n in counts {
            let filler = filler_yaml(n, 100, 1);
            let case = format!("{n} services");
            match apply(&c, &agent, &filler) {
                Some(t) => r.record(
                    g,
                    &format!("weft eBPF, {case}"),
                    "install time",
                    "s",
                    t.as_secs_f64(),
                ),
                None => r.failures.push(format!("weft did not apply {n} services")),
            }
            let v = connect_echo(&c, "lb-client", opts.run_secs);
            record_connect(r, g, &format!("weft eBPF, {case}"), &v);

            std::fs::write(&rules_file, iptables_rules(n, &ipt_backend)).expect("rules");
            let t0 = Instant::now();
            node_c.exec("iptables-restore", &[rules_file.to_str().expect("utf-8")]);
            r.record(
                g,
                &format!("iptables, {case}"),
                "install time",
                "s",
                t0.elapsed().as_secs_f64(),
            );
            let v = connect_echo(&c, "ipt-client", opts.run_secs);
            record_connect(r, g, &format!("iptables, {case}"), &v);
        }
    }

    // The control side at scale: 10,000 services with 10 endpoints each.
    let g = "control side at scale";
    let (services, groups, per_group) = if opts.quick {
        (2_000, 100, 10)
    } else {
        (10_000, 100, 10)
    };
    let endpoints = services * per_group;
    let case = format!("{services} services, {endpoints} endpoints");
    r.method.push((g.into(), "time from writing the configuration to the agent reporting it applied (maps written, state swapped); agent RSS after".into()));
    for _rep in 0..opts.reps {
        apply(&c, &agent, "");
        let filler = filler_yaml(services, groups, per_group);
        match apply(&c, &agent, &filler) {
            Some(t) => r.record(g, &case, "change to datapath", "s", t.as_secs_f64()),
            None => r.failures.push(format!("weft did not apply {case}")),
        }
        // A one-service change on top of the large configuration.
        let more = format!("{filler}apiVersion: v1\nkind: Service\nmetadata: {{name: extra, namespace: filler}}\nspec: {{clusterIP: 10.98.0.1, selector: {{grp: g1}}, ports: [{{port: 80}}]}}\n---\n");
        match apply(&c, &agent, &more) {
            Some(t) => r.record(g, &case, "one more service", "s", t.as_secs_f64()),
            None => r
                .failures
                .push(format!("weft did not apply one more service on {case}")),
        }
        r.record(
            g,
            &case,
            "agent RSS",
            "MiB",
            procstat::rss_mib(agent.proc.pid()),
        );
        let v = connect_echo(&c, "lb-client", opts.run_secs.min(1.0));
        if v["count"].as_u64().unwrap_or(0) == 0 {
            r.failures
                .push(format!("the target service did not answer at {case}"));
        }
    }
    drop(servers);
}

fn record_connect(r: &mut Results, g: &str, case: &str, v: &Value) {
    r.record_fields(
        g,
        case,
        v,
        &[
            ("connections", "conn/s", "rate"),
            ("connect p50", "us", "connect_p50_us"),
            ("connect p99", "us", "connect_p99_us"),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_put_the_target_last() {
        let r = iptables_rules(2, "10.244.2.11:7000");
        let services: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(services[2].contains("-d 10.96.0.1/32") && services[2].contains("--dport 7"));
        assert!(r.contains("-j DNAT --to-destination 10.244.2.11:7000"));
        assert!(r.ends_with("COMMIT\n"));
    }

    #[test]
    fn filler_services_are_valid_configuration() {
        let y = filler_yaml(50, 10, 2);
        let cfg = weft_config_check(&y);
        assert_eq!(cfg, (50, 20));
    }

    /// Count services and workloads the way the agent will see them (document kinds).
    fn weft_config_check(y: &str) -> (usize, usize) {
        (
            y.matches("kind: Service").count(),
            y.matches("kind: Workload").count(),
        )
    }
}
