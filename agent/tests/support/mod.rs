//! The in-process test harness: weft's real proxy (the outbound, inbound and tunnel
//! listeners, the HTTP proxy, dialing, limits and timeouts) running in the test process
//! over loopback addresses, with no root, no namespaces and no eBPF.
//!
//! Every pod gets its own address in a 127.0.0.0/8 subnet of its own per mesh, so tests
//! run side by side: its proxy listens there on the real ports (15001 outbound, 15006
//! inbound, 15008 tunnel) and its apps on theirs. Capture is a table: a test client binds
//! to its pod's address, records where it "wanted to go" and connects to the pod's
//! outbound listener, which is what connect4 and sockops arrange in the real datapath.
//! The namespaced end-to-end tests (tests/) prove that path; these prove the proxy.

#![allow(dead_code)] // each test binary uses a part of the harness

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use weft_agent::{
    config,
    identity::{
        ca::CaDir,
        certs::{Identities, Source},
        SpiffeId,
    },
    metrics::Metrics,
    proxy::{
        capture::Capture,
        conn::{Drain, DrainTrigger, Pod, PodConns},
        inbound::Inbound,
        listener::PodListener,
        outbound::Outbound,
        socket::PodSockets,
        tunnel::server::TunnelServer,
        ProxyConfig, ProxyInputs,
    },
    state::NodeState,
};

static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);

/// A /24 of its own for each mesh: 127.(100 + n / 250).(n % 250).0
fn subnet() -> [u8; 2] {
    let n = NEXT_SUBNET.fetch_add(1, Relaxed) + std::process::id() % 97 * 300;
    [100 + (n / 250 % 150) as u8, (n % 250) as u8]
}

/// A pod's sockets: bound to its loopback address, or to the client's for a delivery.
pub struct TestPod {
    pub ip: Ipv4Addr,
    cookie: u64,
}

impl PodSockets for TestPod {
    fn netns_cookie(&self) -> u64 {
        self.cookie
    }

    fn tcp_socket(&self, transparent_src: Option<Ipv4Addr>) -> std::io::Result<TcpSocket> {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddrV4::new(transparent_src.unwrap_or(self.ip), 0).into())?;
        Ok(s)
    }
}

/// Capture as a table: (pod cookie, client address) -> original destination.
#[derive(Default)]
pub struct TableCapture {
    table: Mutex<HashMap<(u64, SocketAddrV4), SocketAddrV4>>,
    pub deliveries: AtomicU64,
}

impl Capture for TableCapture {
    fn orig_dst(&self, netns_cookie: u64, client: SocketAddrV4) -> Option<SocketAddrV4> {
        self.table.lock().unwrap().remove(&(netns_cookie, client))
    }

    fn announce_delivery(&self, _src: SocketAddrV4, _dst: SocketAddrV4) -> std::io::Result<()> {
        self.deliveries.fetch_add(1, Relaxed);
        Ok(())
    }

    fn withdraw_delivery(&self, _src: SocketAddrV4, _dst: SocketAddrV4) {}

    fn accelerate(&self, _: u64, _: &TcpStream) -> std::io::Result<()> {
        Ok(())
    }
}

/// A pod to create.
#[derive(Clone)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
    pub labels: Vec<(String, String)>,
    pub ports: Vec<u16>,
    pub meshed: bool,
}

pub struct MeshBuilder {
    nodes: Vec<String>,
    pods: Vec<PodSpec>,
    docs: String,
    config: ProxyConfig,
    tamper: Option<fn(&mut config::Config)>,
    silent: Vec<String>,
}

impl MeshBuilder {
    /// A meshed pod without ports (a client).
    pub fn pod(mut self, name: &str, node: &str) -> Self {
        self.add_node(node);
        self.pods.push(PodSpec {
            name: name.into(),
            node: node.into(),
            labels: vec![],
            ports: vec![],
            meshed: true,
        });
        self
    }

    /// A meshed pod labelled `app: <app>` serving `port`.
    pub fn server(mut self, name: &str, node: &str, app: &str, port: u16) -> Self {
        self.add_node(node);
        self.pods.push(PodSpec {
            name: name.into(),
            node: node.into(),
            labels: vec![("app".into(), app.into())],
            ports: vec![port],
            meshed: true,
        });
        self
    }

    /// A pod outside the mesh labelled `app: <app>` serving `port`.
    pub fn unmeshed_server(mut self, name: &str, node: &str, app: &str, port: u16) -> Self {
        self = self.server(name, node, app, port);
        self.pods.last_mut().unwrap().meshed = false;
        self
    }

    /// More documents (Services, routes, policies). `{ip:POD}` becomes the pod's address.
    pub fn docs(mut self, yaml: &str) -> Self {
        self.docs.push_str("---\n");
        self.docs.push_str(yaml);
        self.docs.push('\n');
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut ProxyConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Change the validated configuration behind validation's back (a state a reload
    /// could leave, such as a route outliving its backend).
    pub fn tamper(mut self, f: fn(&mut config::Config)) -> Self {
        self.tamper = Some(f);
        self
    }

    /// Declare `node` but run no proxy for it: the test plays its agent.
    pub fn silent_node(mut self, node: &str) -> Self {
        self.silent.push(node.into());
        self
    }

    fn add_node(&mut self, node: &str) {
        if !self.nodes.iter().any(|n| n == node) {
            self.nodes.push(node.into());
        }
    }

    pub async fn start(self) -> Mesh {
        let net = subnet();
        let ip = |i: usize| Ipv4Addr::new(127, net[0], net[1], i as u8);
        let mut yaml = String::new();
        let mut node_ips = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            node_ips.insert(n.clone(), ip(1 + i));
            yaml.push_str(&format!(
                "apiVersion: weft.dev/v1alpha1\nkind: Node\nmetadata: {{name: {n}}}\nspec: {{address: {}}}\n---\n",
                ip(1 + i)
            ));
        }
        let mut pods = HashMap::new();
        for (i, p) in self.pods.iter().enumerate() {
            let addr = ip(10 + i);
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let ports: Vec<String> = p.ports.iter().map(|p| format!("{{port: {p}}}")).collect();
            yaml.push_str(&format!(
                "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {}, labels: {{{}}}}}\nspec: {{node: {}, ip: {addr}, ports: [{}], mesh: {}}}\n---\n",
                p.name,
                labels.join(", "),
                p.node,
                ports.join(", "),
                if p.meshed { "enabled" } else { "disabled" },
            ));
            pods.insert(
                p.name.clone(),
                Arc::new(TestPod {
                    ip: addr,
                    cookie: 1000 + i as u64,
                }),
            );
        }
        let mut docs = self.docs.clone();
        for (name, p) in &pods {
            docs = docs.replace(&format!("{{ip:{name}}}"), &p.ip.to_string());
        }
        yaml.push_str(&docs);
        let mut cfg = config::load_str(Path::new("mesh.yaml"), &yaml)
            .unwrap_or_else(|e| panic!("the test's configuration is invalid: {e}\n{yaml}"));
        if let Some(f) = self.tamper {
            f(&mut cfg);
        }
        let capture = Arc::new(TableCapture::default());
        // The mesh's CA: each node's "agent" signs its own workloads' certificates.
        let ca = std::env::temp_dir().join(format!(
            "weft-mesh-ca-{}-{}-{}",
            std::process::id(),
            net[0],
            net[1]
        ));
        let _ = std::fs::remove_dir_all(&ca);
        CaDir::new(&ca)
            .init("cluster.local")
            .expect("making the mesh's CA");
        let mut mesh = Mesh {
            capture,
            ca,
            node_ips,
            pods,
            specs: self.pods.clone(),
            nodes: HashMap::new(),
            tasks: vec![],
            yaml_head: yaml.clone(),
        };
        for node in self.nodes.iter().filter(|n| !self.silent.contains(n)) {
            mesh.start_node(node, &cfg, self.config).await;
        }
        mesh
    }
}

/// One node's proxy.
pub struct NodeProxy {
    pub inputs: ProxyInputs,
    pub drain: DrainTrigger,
    pub pods: HashMap<String, Arc<Pod>>,
    pub identities: Arc<Identities>,
}

pub struct Mesh {
    pub capture: Arc<TableCapture>,
    /// The mesh's CA directory (removed with the mesh).
    pub ca: std::path::PathBuf,
    node_ips: HashMap<String, Ipv4Addr>,
    pub pods: HashMap<String, Arc<TestPod>>,
    specs: Vec<PodSpec>,
    pub nodes: HashMap<String, NodeProxy>,
    tasks: Vec<JoinHandle<()>>,
    yaml_head: String,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.ca);
    }
}

/// A Service `name` at `vip`:80 selecting the pods labelled `app: <name>` on port 8080.
pub fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    )
}

pub fn mesh() -> MeshBuilder {
    MeshBuilder {
        nodes: vec![],
        pods: vec![],
        docs: String::new(),
        config: ProxyConfig::default(),
        tamper: None,
        silent: vec![],
    }
}

impl Mesh {
    async fn start_node(&mut self, node: &str, cfg: &config::Config, pc: ProxyConfig) {
        let state = Arc::new(ArcSwap::from_pointee(NodeState::build(node, cfg, 1, None)));
        let (trigger, drain) = Drain::new();
        let identities = Arc::new(Identities::new(
            Source::Local {
                dir: self.ca.clone(),
                node: SpiffeId::node("cluster.local", node).expect("a node identity"),
                ttl: Duration::from_secs(3600),
            },
            None,
        ));
        identities.want(state.load().local_identities());
        identities.refresh().await;
        assert!(
            identities.complete(),
            "certificates for node {node}: {:?}",
            identities.pending()
        );
        let inputs = ProxyInputs::new(
            state,
            self.capture.clone(),
            pc,
            drain,
            identities.store.clone(),
        );
        let tunnel = TcpListener::bind(SocketAddrV4::new(self.node_ips[node], 15008))
            .await
            .unwrap_or_else(|e| panic!("binding node {node}'s tunnel listener: {e}"));
        self.tasks.push(tokio::spawn(
            TunnelServer::new(tunnel, inputs.clone()).run(),
        ));
        let mut local: HashMap<Ipv4Addr, Arc<Pod>> = HashMap::new();
        let mut pods = HashMap::new();
        for spec in self.specs.iter().filter(|p| p.node == node && p.meshed) {
            let tp = self.pods[&spec.name].clone();
            let pod = Arc::new(Pod {
                sockets: tp.clone(),
                ip: tp.ip,
                inputs: inputs.clone(),
                conns: Arc::new(PodConns::default()),
            });
            let listen = |port: u16| {
                let ip = tp.ip;
                async move {
                    TcpListener::bind(SocketAddrV4::new(ip, port))
                        .await
                        .unwrap_or_else(|e| panic!("binding {ip}:{port}: {e}"))
                }
            };
            let l = |listener| PodListener {
                listener,
                pod: pod.clone(),
            };
            self.tasks
                .push(tokio::spawn(Outbound::new(l(listen(15001).await)).run()));
            self.tasks
                .push(tokio::spawn(Inbound::new(l(listen(15006).await)).run()));
            local.insert(tp.ip, pod.clone());
            pods.insert(spec.name.clone(), pod);
        }
        inputs.pods.store(Arc::new(local));
        self.nodes.insert(
            node.to_owned(),
            NodeProxy {
                inputs,
                drain: trigger,
                pods,
                identities,
            },
        );
    }

    pub fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pods[pod].ip
    }

    /// A node's address (its tunnel listens on port 15008 there).
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.node_ips[node]
    }

    pub fn metrics(&self, node: &str) -> &Metrics {
        &self.nodes[node].inputs.metrics
    }

    pub fn state(&self, node: &str) -> Arc<NodeState> {
        self.nodes[node].inputs.state.load_full()
    }

    /// Replace the documents after the nodes and workloads, as a reload would.
    pub fn reload(&self, docs: &str) {
        let mut d = docs.to_owned();
        for (name, p) in &self.pods {
            d = d.replace(&format!("{{ip:{name}}}"), &p.ip.to_string());
        }
        // The head holds the nodes and workloads (and the first documents); keep only
        // the generated part.
        let head: String = self
            .yaml_head
            .split("---\n")
            .filter(|d| d.contains("kind: Node") || d.contains("kind: Workload"))
            .map(|d| format!("{d}---\n"))
            .collect();
        let cfg = config::load_str(Path::new("mesh.yaml"), &format!("{head}{d}"))
            .unwrap_or_else(|e| panic!("invalid reload: {e}"));
        for (name, n) in &self.nodes {
            let prev = n.inputs.state.load();
            let gen = prev.generation + 1;
            n.inputs
                .state
                .store(Arc::new(NodeState::build(name, &cfg, gen, Some(&prev))));
        }
    }

    /// A connection from `pod` to `dst` (a service address), captured to the pod's proxy.
    pub async fn connect(&self, pod: &str, dst: &str) -> TcpStream {
        let p = &self.pods[pod];
        let dst: SocketAddrV4 = dst.parse().expect("a service address");
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddrV4::new(p.ip, 0).into()).unwrap();
        let SocketAddr::V4(local) = s.local_addr().unwrap() else {
            unreachable!()
        };
        self.capture
            .table
            .lock()
            .unwrap()
            .insert((p.cookie, local), dst);
        let c = s
            .connect(SocketAddrV4::new(p.ip, 15001).into())
            .await
            .expect("connecting to the pod's outbound listener");
        c.set_nodelay(true).unwrap();
        c
    }

    /// An HTTP/1.1 client connection from `pod` to `dst`.
    pub async fn h1(
        &self,
        pod: &str,
        dst: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let c = self.connect(pod, dst).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(c))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        send
    }

    /// An HTTP/2 (h2c) client connection from `pod` to `dst`.
    pub async fn h2(
        &self,
        pod: &str,
        dst: &str,
    ) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let c = self.connect(pod, dst).await;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(c))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    /// One GET on a new connection: status, `x-weft-reason` or the server's name, body.
    pub async fn get(&self, pod: &str, dst: &str, path: &str) -> Answer {
        let mut s = self.h1(pod, dst).await;
        send(&mut s, get(path)).await
    }
}

/// What a client got.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// `x-weft-reason` for the proxy's answers, else the server's name.
    pub fn who(&self) -> String {
        let h = |n: &str| {
            self.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        h("x-weft-reason")
            .or_else(|| h("x-server"))
            .unwrap_or_else(|| "?".into())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "svc")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub async fn send<B>(s: &mut hyper::client::conn::http1::SendRequest<B>, req: Request<B>) -> Answer
where
    B: hyper::body::Body + 'static,
{
    s.ready().await.expect("connection ready");
    let resp = s.send_request(req).await.expect("an answer");
    answer(resp).await
}

pub async fn answer(resp: Response<Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A listener at `ip:port` that takes one connection and then accepts nothing more, so
/// every later connect hangs unanswered (its SYNs are dropped while the accept queue is
/// full): an endpoint that is blackholed, without root. Keep it alive while needed.
pub struct Blackhole {
    _listener: std::net::TcpListener,
    _filler: std::net::TcpStream,
}

pub fn blackhole(ip: Ipv4Addr, port: u16) -> Blackhole {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::V4(SocketAddrV4::new(ip, port)).into())
        .unwrap();
    s.listen(0).unwrap();
    let listener: std::net::TcpListener = s.into();
    let filler = std::net::TcpStream::connect((ip, port)).unwrap();
    Blackhole {
        _listener: listener,
        _filler: filler,
    }
}

/// A listener at `ip:port` that accepts every connection and never sends a byte (a peer
/// that went silent). The connections stay open while it lives.
pub struct Silent {
    pub accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn silent(ip: Ipv4Addr, port: u16) -> Silent {
    let l = TcpListener::bind((ip, port)).await.unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let n = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((c, _)) = l.accept().await {
            n.fetch_add(1, Relaxed);
            held.push(c);
        }
    });
    Silent { accepted, task }
}

/// A TCP echo server in a pod: every connection gets back what it sends, as it arrives.
pub async fn echo_server(mesh: &Mesh, pod: &str, port: u16) -> JoinHandle<()> {
    let l = TcpListener::bind((mesh.ip(pod), port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                    if n == 0
                        || tokio::io::AsyncWriteExt::write_all(&mut s, &buf[..n])
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
            });
        }
    })
}

/// How a test server answers.
#[derive(Clone, Default)]
pub struct Behaviour {
    pub delay: Duration,
    /// Answer `fail.0` of every `fail.1` requests with `status` (default 503).
    pub fail: (u64, u64),
    pub status: u16,
}

/// An HTTP server (HTTP/1.1 and h2c) in a pod, answering `{"server","peer","path"}` with
/// an `x-server` header, counting the requests it read whole.
pub struct Server {
    pub served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub fn count(&self) -> u64 {
        self.served.load(Relaxed)
    }
}

pub async fn serve(mesh: &Mesh, pod: &str, port: u16, b: Behaviour) -> Server {
    let ip = mesh.ip(pod);
    let name = pod.to_owned();
    let l = TcpListener::bind(SocketAddrV4::new(ip, port))
        .await
        .unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((c, peer)) = l.accept().await else {
                continue;
            };
            let (name, count, b) = (name.clone(), count.clone(), b.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (name, count, b) = (name.clone(), count.clone(), b.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        // Served means read whole: a request whose body broke off is not.
                        if req.into_body().collect().await.is_err() {
                            return Err("the request body broke off");
                        }
                        let n = count.fetch_add(1, Relaxed);
                        tokio::time::sleep(b.delay).await;
                        let fail = b.fail.1 > 0 && n % b.fail.1 < b.fail.0;
                        let status = if fail {
                            if b.status == 0 {
                                503
                            } else {
                                b.status
                            }
                        } else {
                            200
                        };
                        let body = serde_json::json!({"server": name, "peer": peer.to_string(), "path": path});
                        Ok::<_, &str>(
                            Response::builder()
                                .status(status)
                                .header("x-server", name)
                                .body(Full::new(Bytes::from(body.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(c), svc)
                    .await;
            });
        }
    });
    Server { served, task }
}
