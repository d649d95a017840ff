//! Building, configuring and tearing down a simulated cluster (see the crate docs for the
//! topology and address plan).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::proc::{command_in, run_checked, Agent, Spawned};

static NEXT: AtomicU32 = AtomicU32::new(0);
const E2E_CGROUP: &str = "weft-e2e";
const RUN_ROOT: &str = "/run/weft-e2e";

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
    pub labels: Vec<(String, String)>,
    pub ports: Vec<u16>,
    pub mesh: bool,
    pub agent_down: Option<&'static str>,
    /// Its service account (its identity): `default` unless set.
    pub account: Option<String>,
    /// Its namespace: `default` unless set (Services are all in `default`).
    pub namespace: Option<String>,
    /// `spec.mtls` (`strict` or `permissive`), unless the default.
    pub mtls: Option<&'static str>,
}

impl PodSpec {
    pub fn new(name: &str, node: &str) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            labels: vec![],
            ports: vec![],
            mesh: true,
            agent_down: None,
            account: None,
            namespace: None,
            mtls: None,
        }
    }
    /// STRICT: refuses plaintext from outside the mesh.
    pub fn strict(mut self) -> Self {
        self.mtls = Some("strict");
        self
    }
    /// In namespace `ns` (a client: Services select pods of `default` only).
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.into());
        self
    }
    /// Run as service account `sa` (identity spiffe://cluster.local/ns/default/sa/<sa>).
    pub fn account(mut self, sa: &str) -> Self {
        self.account = Some(sa.into());
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
    pub fn port(mut self, p: u16) -> Self {
        self.ports.push(p);
        self
    }
    /// Not in the mesh: served by socket-level load balancing only.
    pub fn unmeshed(mut self) -> Self {
        self.mesh = false;
        self
    }
    pub fn fail_open(mut self) -> Self {
        self.agent_down = Some("fail-open");
        self
    }
}

/// A service to declare.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: String,
    pub selector: Vec<(String, String)>,
    /// (port, targetPort, protocol)
    pub ports: Vec<(u16, u16, &'static str)>,
    /// Port names, by port (a port without one is unnamed).
    pub port_names: Vec<(u16, String)>,
}

impl ServiceSpec {
    pub fn new(name: &str, cluster_ip: &str) -> Self {
        Self {
            name: name.into(),
            cluster_ip: cluster_ip.into(),
            selector: vec![],
            ports: vec![],
            port_names: vec![],
        }
    }
    /// Name the port `port` (its name in the Service and its EndpointSlice).
    pub fn name_port(mut self, port: u16, name: &str) -> Self {
        self.port_names.push((port, name.into()));
        self
    }
    /// The name of port `port`; empty when it has none.
    pub fn port_name(&self, port: u16) -> &str {
        self.port_names
            .iter()
            .find(|(p, _)| *p == port)
            .map_or("", |(_, n)| n.as_str())
    }
    pub fn select(mut self, k: &str, v: &str) -> Self {
        self.selector.push((k.into(), v.into()));
        self
    }
    pub fn tcp(mut self, port: u16, target: u16) -> Self {
        self.ports.push((port, target, "TCP"));
        self
    }
    pub fn udp(mut self, port: u16, target: u16) -> Self {
        self.ports.push((port, target, "UDP"));
        self
    }
}

pub struct ClusterBuilder {
    test: String,
    nodes: Vec<String>,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
    cert_ttl: Option<String>,
}

impl ClusterBuilder {
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.into());
        self
    }
    pub fn pod(mut self, p: PodSpec) -> Self {
        self.pods.push(p);
        self
    }
    pub fn service(mut self, s: ServiceSpec) -> Self {
        self.services.push(s);
        self
    }
    /// Lifetime of the workload certificates the cluster's CA signs (default 24h).
    pub fn cert_ttl(mut self, ttl: &str) -> Self {
        self.cert_ttl = Some(ttl.into());
        self
    }

    /// Create every namespace, link, route and cgroup, and write the configuration.
    pub fn build(self) -> Cluster {
        sweep_stale();
        let cid = format!(
            "{:x}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cg2 = cgroup2_mount();
        let dir = std::env::temp_dir().join(format!("weft-e2e-{cid}"));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let mut c = Cluster {
            cid: cid.clone(),
            test: self.test,
            dir,
            cgroup_root: cg2.join(E2E_CGROUP).join(&cid),
            cg2,
            nodes: vec![],
            pods: vec![],
            services: self.services,
            netns: vec![],
            fabric: String::new(),
            ca: std::sync::Mutex::new(None),
            cert_ttl: self.cert_ttl.unwrap_or_else(|| "24h".into()),
            ca_kubeconfig: std::sync::Mutex::new(None),
        };
        // Register everything before creating it, so a failure half-way still cleans up.
        let fab = format!("weft-{cid}-fab");
        c.netns.push(fab.clone());
        ip(&["netns", "add", &fab]);
        ip(&["-n", &fab, "link", "set", "lo", "up"]);
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &fab, "link", "set", "br0", "up"]);
        // The cluster's CA listens here (see `Cluster::ca_address`).
        ip(&[
            "-n",
            &fab,
            "addr",
            "add",
            "192.168.250.254/24",
            "dev",
            "br0",
        ]);
        c.fabric = fab.clone();
        for (i, name) in self.nodes.iter().enumerate() {
            let idx = i + 1;
            let ns = format!("weft-{cid}-{name}");
            c.netns.push(ns.clone());
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            sysctl(&ns, "net/ipv4/ip_forward", "1");
            let fab_if = format!("n{idx}");
            ip(&[
                "-n", &fab, "link", "add", &fab_if, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &fab, "link", "set", &fab_if, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("192.168.250.{idx}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.244.{idx}.1/24"),
                "dev",
                "br0",
            ]);
            ip(&["-n", &ns, "link", "set", "br0", "up"]);
            for j in 1..=self.nodes.len() {
                if j != idx {
                    ip(&[
                        "-n",
                        &ns,
                        "route",
                        "add",
                        &format!("10.244.{j}.0/24"),
                        "via",
                        &format!("192.168.250.{j}"),
                    ]);
                }
            }
            let cgroup = c.cgroup_root.join(name);
            std::fs::create_dir_all(&cgroup)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
            c.nodes.push(Node {
                name: name.clone(),
                full: format!("{cid}-{name}"),
                index: idx,
                netns: ns,
                cgroup,
            });
        }
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for p in self.pods {
            let node = c
                .nodes
                .iter()
                .find(|n| n.name == p.node)
                .unwrap_or_else(|| panic!("pod {} on unknown node {}", p.name, p.node));
            let k = per_node.entry(node.name.clone()).or_default();
            let ip_addr = format!("10.244.{}.{}", node.index, 10 + *k);
            let host_if = format!("p{k}");
            *k += 1;
            let ns = format!("weft-{cid}-{}", p.name);
            c.netns.push(ns.clone());
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &node.netns,
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ]);
            ip(&[
                "-n",
                &node.netns,
                "link",
                "set",
                &host_if,
                "master",
                "br0",
                "up",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip_addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "10.244.0.0/16",
                "via",
                &format!("10.244.{}.1", node.index),
            ]);
            let cgroup = node.cgroup.join(&p.name);
            std::fs::create_dir_all(&cgroup)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
            c.pods.push(Pod {
                spec: p,
                ip: ip_addr,
                netns: ns,
                cgroup,
                node_full: node.full.clone(),
            });
        }
        c.write_config(&c.config_yaml());
        // The CA and every node's bootstrap credentials; the CA process starts with the
        // first agent.
        let ca = c.ca_dir().display().to_string();
        run_tool(
            &crate::bin("weft-ca"),
            &["init", "--dir", &ca, "--trust-domain", "cluster.local"],
        );
        for n in &c.nodes {
            let out = c.node_credentials(&n.name).display().to_string();
            run_tool(
                &crate::bin("weft-ca"),
                &[
                    "node-cert",
                    "--dir",
                    &ca,
                    "--node",
                    &n.full,
                    "--out",
                    &out,
                    "--ttl",
                    &c.cert_ttl,
                ],
            );
        }
        c
    }
}

fn run_tool(program: &Path, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("run a tool");
    assert!(
        out.status.success(),
        "{} {}: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Node {
    /// Run a host tool inside the node's netns; panics with its stderr if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        exec_in(&self.netns, program, args)
    }

    /// Run a program inside the node's netns (outside any pod) to completion, at most
    /// `timeout`.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> std::process::Output {
        let (cmd, keep) = command_in(
            &Path::new("/var/run/netns").join(&self.netns),
            None,
            Path::new(program),
            args,
        );
        run_checked(cmd, keep, timeout)
    }

    /// Start a long-running program inside the node's netns (outside any pod).
    pub fn spawn(&self, dir: &Path, program: &Path, args: &[&str]) -> Spawned {
        let (cmd, keep) = command_in(
            &Path::new("/var/run/netns").join(&self.netns),
            None,
            program,
            args,
        );
        let log = dir.join(format!(
            "{}-{}-{}.log",
            self.name,
            program.file_name().unwrap_or_default().to_string_lossy(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Spawned::start(&self.name, cmd, keep, log)
    }
}

pub struct Node {
    pub name: String,
    /// The node's name in the configuration and for the agent (unique per cluster).
    pub full: String,
    pub index: usize,
    pub netns: String,
    pub cgroup: PathBuf,
}

pub struct Pod {
    pub spec: PodSpec,
    pub ip: String,
    pub netns: String,
    pub cgroup: PathBuf,
    node_full: String,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }

    /// Start a long-running program inside the pod (netns and cgroup).
    pub fn spawn(&self, dir: &Path, program: &Path, args: &[&str]) -> Spawned {
        let (cmd, keep) = command_in(&self.netns_path(), Some(&self.cgroup), program, args);
        let log = dir.join(format!(
            "{}-{}-{}.log",
            self.spec.name,
            program.file_name().unwrap_or_default().to_string_lossy(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Spawned::start(&self.spec.name, cmd, keep, log)
    }

    /// Run a program inside the pod to completion (at most `timeout`).
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> std::process::Output {
        let (cmd, keep) = command_in(
            &self.netns_path(),
            Some(&self.cgroup),
            Path::new(program),
            args,
        );
        run_checked(cmd, keep, timeout)
    }

    /// Set a sysctl inside the pod's netns (`key` as a /proc/sys path, e.g. net/ipv4/...).
    pub fn sysctl(&self, key: &str, value: &str) {
        sysctl(&self.netns, key, value);
    }

    /// Run a host tool (iptables, ip, ...) inside the pod's netns, outside its cgroup;
    /// panics with its stderr if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        exec_in(&self.netns, program, args)
    }

    /// Wait until something listens on TCP `port` inside the pod.
    pub fn wait_listening(&self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let needle = format!(":{port} ");
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "ss", "-Hltn"])
                .output()
                .expect("ss");
            if String::from_utf8_lossy(&out.stdout).contains(&needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in pod {} after {timeout:?}",
                self.spec.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Cluster {
    pub cid: String,
    pub test: String,
    /// Scratch directory: configuration, logs.
    pub dir: PathBuf,
    cg2: PathBuf,
    cgroup_root: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<ServiceSpec>,
    netns: Vec<String>,
    /// The fabric namespace joining the nodes (the CA runs there).
    pub fabric: String,
    ca: std::sync::Mutex<Option<Spawned>>,
    cert_ttl: String,
    /// Set: the CA reads the cluster from the Kubernetes API with this kubeconfig.
    ca_kubeconfig: std::sync::Mutex<Option<String>>,
}

impl Cluster {
    pub fn builder(test: &str) -> ClusterBuilder {
        ClusterBuilder {
            test: test.into(),
            nodes: vec![],
            pods: vec![],
            services: vec![],
            cert_ttl: None,
        }
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// The cluster CA's directory (`weft-ca init`): roots, bundle.pem.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Where `weft-ca serve` listens, in the fabric namespace.
    pub fn ca_address(&self) -> &'static str {
        "192.168.250.254:15012"
    }

    /// A node's bootstrap credentials (node-cert.pem, node-key.pem).
    pub fn node_credentials(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// Start the CA if it is not running, and wait until it listens.
    pub fn ensure_ca(&self) {
        let mut ca = self.ca.lock().unwrap_or_else(|p| p.into_inner());
        if ca.as_mut().is_some_and(|p| p.is_running()) {
            return;
        }
        let dir = self.ca_dir().display().to_string();
        let config = self.config_path().display().to_string();
        let kubeconfig = self
            .ca_kubeconfig
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut args = vec!["serve", "--dir", &dir];
        match &kubeconfig {
            Some(k) => args.extend(["--kubernetes", "--kubeconfig", k.as_str()]),
            None => args.extend(["--config", &config]),
        }
        args.extend(["--listen", self.ca_address(), "--ttl", &self.cert_ttl]);
        let (cmd, keep) = command_in(
            &Path::new("/var/run/netns").join(&self.fabric),
            None,
            &crate::bin("weft-ca"),
            &args,
        );
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.join(format!("ca-{seq}.log"));
        *ca = Some(Spawned::start("weft-ca", cmd, keep, log));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.fabric, "ss", "-Hltn"])
                .output()
                .expect("ss");
            if String::from_utf8_lossy(&out.stdout).contains(":15012 ") {
                return;
            }
            let running = ca.as_mut().is_some_and(|p| p.is_running());
            assert!(
                running && Instant::now() < deadline,
                "weft-ca did not start listening: {}",
                ca.as_ref().map(|p| p.output()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the CA has logged.
    pub fn ca_log(&self) -> String {
        self.ca
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Spawned::output)
            .unwrap_or_default()
    }

    /// From now on the CA reads the cluster from the Kubernetes API (restarted if it runs).
    pub fn ca_from_kubernetes(&self, kubeconfig: &str) {
        self.stop_ca();
        *self.ca_kubeconfig.lock().unwrap_or_else(|p| p.into_inner()) = Some(kubeconfig.to_owned());
    }

    /// Stop the CA (agents keep the certificates they have and retry renewals).
    pub fn stop_ca(&self) {
        if let Some(mut p) = self.ca.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.kill();
        }
    }

    /// The flags that point node `node`'s agent at the cluster's CA.
    pub fn identity_flags(&self, node: &str) -> Vec<String> {
        let creds = self.node_credentials(node);
        vec![
            "--ca-address".into(),
            self.ca_address().into(),
            "--node-cert".into(),
            creds.join("node-cert.pem").display().to_string(),
            "--node-key".into(),
            creds.join("node-key.pem").display().to_string(),
            "--trust-bundle".into(),
            self.ca_dir().join("bundle.pem").display().to_string(),
        ]
    }

    /// Start `weft-testpod http-server PORT POD OPTS...` in `pod` (it answers as `pod`)
    /// and wait until it listens.
    pub fn serve_http(&self, pod: &str, port: u16, opts: &[&str]) -> Spawned {
        let port_s = port.to_string();
        let mut args = vec!["http-server", port_s.as_str(), pod];
        args.extend(opts);
        let s = self
            .pod(pod)
            .spawn(&self.dir, &crate::bin("weft-testpod"), &args);
        self.pod(pod).wait_listening(port, Duration::from_secs(5));
        s
    }

    /// Start `program` in the fabric's network namespace, which reaches every node's
    /// address (192.168.250.N) and nothing outside the cluster; killed on drop.
    pub fn spawn_in_fabric(&self, name: &str, program: &Path, args: &[&str]) -> Spawned {
        let (cmd, keep) = command_in(
            &Path::new("/var/run/netns").join(&self.fabric),
            None,
            program,
            args,
        );
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        Spawned::start(name, cmd, keep, self.dir.join(format!("{name}-{seq}.log")))
    }

    /// Run `program` in the fabric's network namespace and return its output.
    pub fn run_in_fabric(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> std::process::Output {
        let (cmd, keep) = command_in(
            &Path::new("/var/run/netns").join(&self.fabric),
            None,
            Path::new(program),
            args,
        );
        run_checked(cmd, keep, timeout)
    }

    /// The configuration documents describing this cluster.
    pub fn config_yaml(&self) -> String {
        let mut y = String::new();
        for n in &self.nodes {
            let _ = write!(
                y,
                "apiVersion: weft.dev/v1alpha1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{address: 192.168.250.{}}}\n---\n",
                n.full, n.index
            );
        }
        for p in &self.pods {
            let s = &p.spec;
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let ports: Vec<String> = s.ports.iter().map(|p| format!("{{port: {p}}}")).collect();
            let _ = write!(
                y,
                "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\nspec:\n  node: {}\n  ip: {}\n  netns: {}\n  cgroup: {}\n  ports: [{}]\n  mesh: {}\n  serviceAccount: {}\n",
                s.name,
                s.namespace.as_deref().unwrap_or("default"),
                labels.join(", "),
                p.node_full,
                p.ip,
                p.netns_path().display(),
                p.cgroup.strip_prefix(&self.cg2).expect("pod cgroup under cgroup2").display(),
                ports.join(", "),
                if s.mesh { "enabled" } else { "disabled" },
                s.account.as_deref().unwrap_or("default"),
            );
            if let Some(mode) = s.agent_down {
                let _ = writeln!(y, "  agentDown: {mode}");
            }
            if let Some(mode) = s.mtls {
                let _ = writeln!(y, "  mtls: {mode}");
            }
            y.push_str("---\n");
        }
        for s in &self.services {
            let sel: Vec<String> = s
                .selector
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|(p, t, proto)| {
                    format!(
                        "{{name: \"{}\", port: {p}, targetPort: {t}, protocol: {proto}}}",
                        s.port_name(*p)
                    )
                })
                .collect();
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {}}}\nspec:\n  clusterIP: {}\n  selector: {{{}}}\n  ports: [{}]\n---\n",
                s.name,
                s.cluster_ip,
                sel.join(", "),
                ports.join(", ")
            );
        }
        y
    }

    /// The cluster as the Kubernetes API would serve it, in the JSON the API server
    /// sends: v1 Nodes (InternalIP), Pods (with the netns and cgroup annotations a CNI
    /// plugin would otherwise hand over), Services, and the EndpointSlices the endpoint
    /// controller would publish for them. The same cluster [`Self::config_yaml`] declares
    /// in weft's shorthand.
    pub fn kube_objects(&self) -> Vec<serde_json::Value> {
        self.kube_objects_with(true)
    }

    /// [`Self::kube_objects`], the Pods without the netns and cgroup annotations unless
    /// `annotated` (in a real cluster the CNI plugin hands those over).
    pub fn kube_objects_with(&self, annotated: bool) -> Vec<serde_json::Value> {
        use serde_json::json;
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.full, "labels": {"kubernetes.io/hostname": n.full, "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": format!("10.244.{}.0/24", n.index)},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": format!("192.168.250.{}", n.index)},
                        {"type": "Hostname", "address": n.full}
                    ],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
                }
            }));
        }
        out.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
        }));
        for p in &self.pods {
            let s = &p.spec;
            let ns = s.namespace.as_deref().unwrap_or("default");
            let labels: serde_json::Map<String, serde_json::Value> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            let mut annotations = json!({
                "weft.dev/mesh": if s.mesh { "enabled" } else { "disabled" },
                "weft.dev/netns": p.netns_path().display().to_string(),
                "weft.dev/cgroup": p.cgroup.strip_prefix(&self.cg2).expect("pod cgroup under cgroup2").display().to_string(),
            });
            if !annotated {
                let a = annotations.as_object_mut().unwrap();
                a.remove("weft.dev/netns");
                a.remove("weft.dev/cgroup");
            }
            if let Some(mode) = s.agent_down {
                annotations["weft.dev/agent-down"] = json!(mode);
            }
            if let Some(mode) = s.mtls {
                annotations["weft.dev/mtls"] = json!(mode);
            }
            let ports: Vec<_> = s
                .ports
                .iter()
                .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
                .collect();
            out.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": s.name, "namespace": ns, "labels": labels, "annotations": annotations,
                             "generateName": format!("{}-", s.name)},
                "spec": {
                    "containers": [{"name": "app", "image": "registry.example/weft-testpod:1", "ports": ports,
                                    "imagePullPolicy": "IfNotPresent", "resources": {},
                                    "terminationMessagePath": "/dev/termination-log"}],
                    "dnsPolicy": "ClusterFirst", "enableServiceLinks": true,
                    "nodeName": p.node_full, "restartPolicy": "Always", "schedulerName": "default-scheduler",
                    "serviceAccount": s.account.as_deref().unwrap_or("default"),
                    "serviceAccountName": s.account.as_deref().unwrap_or("default"),
                    "terminationGracePeriodSeconds": 30
                },
                "status": {
                    "phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}],
                    "hostIP": format!("192.168.250.{}", self.nodes.iter().find(|n| n.full == p.node_full).map_or(0, |n| n.index)),
                    "qosClass": "BestEffort",
                    "conditions": [{"type": "Ready", "status": "True"}]
                }
            }));
        }
        for svc in &self.services {
            let ports: Vec<_> = svc
                .ports
                .iter()
                .map(|(p, t, proto)| {
                    let mut port = json!({"port": p, "targetPort": t, "protocol": proto});
                    if !svc.port_name(*p).is_empty() {
                        port["name"] = json!(svc.port_name(*p));
                    }
                    port
                })
                .collect();
            let selector: serde_json::Map<String, serde_json::Value> = svc
                .selector
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            out.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": svc.name, "namespace": "default"},
                "spec": {
                    "clusterIP": svc.cluster_ip, "clusterIPs": [svc.cluster_ip],
                    "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                    "ports": ports, "selector": selector, "sessionAffinity": "None", "type": "ClusterIP"
                },
                "status": {"loadBalancer": {}}
            }));
            out.push(self.endpoint_slice(svc, &[]));
        }
        out
    }

    /// The EndpointSlice the endpoint controller would publish for `svc`, leaving out
    /// the pods named in `without`.
    pub fn endpoint_slice(&self, svc: &ServiceSpec, without: &[&str]) -> serde_json::Value {
        use serde_json::json;
        let endpoints: Vec<_> = self
            .pods
            .iter()
            .filter(|p| {
                p.spec.namespace.as_deref().unwrap_or("default") == "default"
                    && !svc.selector.is_empty()
                    && svc.selector.iter().all(|l| p.spec.labels.contains(l))
                    && !without.contains(&p.spec.name.as_str())
            })
            .map(|p| {
                json!({
                    "addresses": [p.ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": p.node_full,
                    "targetRef": {"kind": "Pod", "name": p.spec.name, "namespace": "default"}
                })
            })
            .collect();
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|(p, t, proto)| json!({"name": svc.port_name(*p), "port": t, "protocol": proto}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-abcde", svc.name), "namespace": "default", "generateName": format!("{}-", svc.name),
                "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                           "kubernetes.io/service-name": svc.name},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc.name, "controller": true, "blockOwnerDeletion": true}]
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports
        })
    }

    /// The Service `name` as the harness declared it.
    pub fn service_spec(&self, name: &str) -> &ServiceSpec {
        self.services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// Replace the configuration the agents read (atomically: write, then rename).
    pub fn write_config(&self, yaml: &str) {
        let dir = self.config_path();
        std::fs::create_dir_all(&dir).expect("config dir");
        let tmp = self.dir.join("cluster.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, dir.join("cluster.yaml")).expect("rename config");
    }

    /// Start the agent of `node` (inside the node's netns, outside the pods' cgroups) and
    /// wait until it is ready.
    pub fn start_agent(&self, node: &str, extra: &[&str]) -> Agent {
        let mut a = self.spawn_agent(node, extra);
        a.wait_ready(Duration::from_secs(20));
        a
    }

    /// Start the agent of `node` with at most `open_files` file descriptors (its hard
    /// RLIMIT_NOFILE, set with prlimit) and wait until it is ready.
    pub fn start_agent_with_open_files(
        &self,
        node: &str,
        extra: &[&str],
        open_files: u64,
    ) -> Agent {
        let mut a = self.spawn_agent_inner(node, extra, Some(open_files));
        a.wait_ready(Duration::from_secs(20));
        a
    }

    /// Start the agent of `node` without waiting for it.
    pub fn spawn_agent(&self, node: &str, extra: &[&str]) -> Agent {
        self.spawn_agent_inner(node, extra, None)
    }

    fn spawn_agent_inner(&self, node: &str, extra: &[&str], open_files: Option<u64>) -> Agent {
        let n = self.node(node);
        let run_dir = Path::new(RUN_ROOT).join(&self.cid).join(&n.name);
        let cgroup = n
            .cgroup
            .strip_prefix(&self.cg2)
            .expect("node cgroup under cgroup2")
            .display()
            .to_string();
        let config = self.config_path().display().to_string();
        let run = run_dir.display().to_string();
        let mut args = vec![
            "run",
            "--node",
            &n.full,
            "--cgroup",
            &cgroup,
            "--run-dir",
            &run,
        ];
        // From files unless the test takes it from the Kubernetes API; the CNI plugin's
        // records in the node's own run directory, not the host's.
        let cni = run_dir.join("cni").display().to_string();
        if !extra.contains(&"--kubernetes") {
            args.extend(["--config", &config]);
        } else if !extra.contains(&"--cni-state-dir") {
            args.extend(["--cni-state-dir", &cni]);
        }
        if !extra.contains(&"--reload-interval") {
            args.extend(["--reload-interval", "100ms"]);
        }
        // Identity from the cluster's CA unless the test chose a source.
        let identity = self.identity_flags(node);
        if !extra
            .iter()
            .any(|a| ["--ca-address", "--ca-dir", "--cert-dir"].contains(a))
        {
            self.ensure_ca();
            args.extend(identity.iter().map(String::as_str));
        }
        args.extend_from_slice(extra);
        let agent = crate::bin("weft-agent");
        let agent = agent.display().to_string();
        let nofile = open_files.map(|n| format!("--nofile={n}:{n}"));
        let (program, args) = match &nofile {
            // prlimit execs the agent in its own process: the PID stays the agent's.
            Some(limit) => {
                let mut a = vec![limit.as_str(), "--", agent.as_str()];
                a.extend(args);
                (Path::new("/usr/bin/prlimit").to_owned(), a)
            }
            None => (Path::new(&agent).to_owned(), args),
        };
        let (cmd, keep) = command_in(
            &Path::new("/var/run/netns").join(&n.netns),
            None,
            &program,
            &args,
        );
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.join(format!("agent-{}-{seq}.log", n.name));
        Agent {
            proc: Spawned::start(&format!("agent-{}", n.name), cmd, keep, log),
            node: n.full.clone(),
            admin: run_dir.join("admin.sock"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test {} failed; logs are in {}",
                self.test,
                self.dir.display()
            );
        }
        self.stop_ca();
        teardown(&self.cid, &self.cgroup_root, &self.netns);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Remove everything a cluster made: processes in its cgroups, its namespaces, cgroups,
/// pinned eBPF objects and run directories.
fn teardown(cid: &str, cgroup_root: &Path, netns: &[String]) {
    kill_cgroup_tree(cgroup_root);
    for ns in netns.iter().rev() {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    remove_cgroup_tree(cgroup_root);
    // The shared parent too, once no other cluster uses it (fails harmlessly otherwise).
    if let Some(parent) = cgroup_root.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf/weft") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{cid}-"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(Path::new(RUN_ROOT).join(cid));
}

fn kill_cgroup_tree(dir: &Path) {
    for _ in 0..50 {
        let mut any = false;
        walk(dir, &mut |d| {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    any = true;
                    // SAFETY: these processes were started by this harness in its own cgroups.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        });
        if !any {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    let mut dirs = vec![];
    walk(dir, &mut |d| dirs.push(d.to_owned()));
    // Children before parents.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(&d);
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), f);
            }
        }
    }
}

/// Clean up after clusters of test processes that died without dropping them.
fn sweep_stale() {
    let cg2 = cgroup2_mount();
    let Ok(rd) = std::fs::read_dir(cg2.join(E2E_CGROUP)) else {
        return;
    };
    for e in rd.flatten() {
        let cid = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = cid
            .split('x')
            .next()
            .and_then(|p| u32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let netns: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("weft-{cid}-")))
            .map(str::to_owned)
            .collect();
        teardown(&cid, &e.path(), &netns);
    }
}

pub(crate) fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("no cgroup2 mount (see docs/operations.md)")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exec_in(netns: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{program} {} in {netns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sysctl(netns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{key}");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ])
        .output()
        .expect("sysctl");
    assert!(
        out.status.success(),
        "sysctl {key} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
