//! weft-ca: the certificate authority of a weft mesh. It keeps the root keys (no agent
//! ever sees them) and signs workload certificates for a node's agent only for workloads
//! declared on that node.
//!
//! ```text
//! weft-ca init --dir D --trust-domain TD       a new CA with its first root
//! weft-ca node-cert --dir D --node N --out O   bootstrap credentials for node N's agent
//! weft-ca issue --dir D --identity ID --out O  a certificate and key for one identity
//! weft-ca rotate --dir D                       a new root, trusted beside the old ones
//! weft-ca retire --dir D                       trust only the current root
//! weft-ca serve --dir D --config C --listen A  sign requests over mutual TLS
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::KeyPair;
use rustls::{pki_types::PrivateKeyDer, sign::CertifiedKey};
use weft_agent::{
    config::{self, route::parse_duration},
    identity::{
        ca::{node_may_have, Ca, CaDir},
        tls, SpiffeId,
    },
};

#[derive(Parser)]
#[command(name = "weft-ca", version, about = "weft's certificate authority")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[derive(Subcommand)]
enum Command {
    /// Make a new CA in DIR with its first root.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Write bootstrap credentials (node-key.pem, node-cert.pem) for a node's agent.
    NodeCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the bootstrap certificate (the agent renews it like any other).
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
    },
    /// Write a certificate and key for one identity to OUT (cert.pem, key.pem,
    /// bundle.pem): for a workload outside weft's agents, or for files an agent reads
    /// with --cert-dir.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// The SPIFFE ID, e.g. spiffe://cluster.local/ns/shop/sa/web.
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
    },
    /// Make a new root: trusted beside the old ones at once, signing after --grace (so
    /// every agent trusts it before a certificate under it appears).
    Rotate {
        #[arg(long)]
        dir: PathBuf,
        /// How long agents have to pick the new bundle up (they look every second).
        #[arg(long, default_value = "30s", value_parser = duration)]
        grace: Duration,
    },
    /// Trust only the current root (after every certificate was renewed under it).
    Retire {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign certificate requests from node agents over mutual TLS.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// The mesh's configuration (file mode): which workload runs on which node.
        #[arg(
            long,
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        config: Option<PathBuf>,
        /// Read which workload runs on which node from the Kubernetes API instead (Pods,
        /// Nodes, Namespaces and the Mesh, watched as the agents do).
        #[arg(long)]
        kubernetes: bool,
        /// The kubeconfig for --kubernetes [default: KUBECONFIG, ~/.kube/config, then the
        /// pod's service account].
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Lifetime of the workload certificates it signs.
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let res = match Cli::parse().command {
        Command::Init { dir, trust_domain } => CaDir::new(&dir)
            .init(&trust_domain)
            .map(|()| format!("a CA for {trust_domain} in {}", dir.display())),
        Command::NodeCert {
            dir,
            node,
            out,
            ttl,
        } => CaDir::new(&dir)
            .issue_node(&node, ttl, &out)
            .map(|id| format!("{id}: credentials in {}", out.display())),
        Command::Issue {
            dir,
            identity,
            out,
            ttl,
        } => issue(&dir, &identity, &out, ttl)
            .map_err(|message| weft_agent::identity::ca::CaError::Bad { path: out, message }),
        Command::Rotate { dir, grace } => CaDir::new(&dir).rotate(grace).map(|n| {
            format!("root {n} is in the bundle beside the older roots, and signs in {grace:?}")
        }),
        Command::Retire { dir } => CaDir::new(&dir)
            .retire()
            .map(|old| format!("retired roots {old:?}")),
        Command::Serve {
            dir,
            config,
            kubernetes: _,
            kubeconfig,
            listen,
            ttl,
        } => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("weft-ca: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let source = match config {
                Some(path) => Source::Files(path),
                None => Source::Kubernetes(kubeconfig),
            };
            return match rt.block_on(serve(dir, source, listen, ttl)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft-ca: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match res {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-ca: {e}");
            ExitCode::FAILURE
        }
    }
}

fn issue(dir: &Path, identity: &str, out: &Path, ttl: Duration) -> Result<String, String> {
    let id = SpiffeId::parse(identity).map_err(|e| e.to_string())?;
    let dir = CaDir::new(dir);
    let ca = dir.load().map_err(|e| e.to_string())?;
    if id.trust_domain() != ca.trust_domain {
        return Err(format!(
            "{id} is not in this CA's trust domain {}",
            ca.trust_domain
        ));
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = ca.issue(&id, &key, ttl).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()));
    let write = |name: &str, text: &str, mode| {
        weft_agent::identity::ca::write_atomic(&out.join(name), text, mode)
            .map_err(|e| e.to_string())
    };
    // The key first: an agent reading the directory sees a new certificate only with its key.
    write("key.pem", &key.serialize_pem(), 0o600)?;
    write("cert.pem", &pem, 0o644)?;
    write("bundle.pem", &ca.bundle_pem(), 0o644)?;
    Ok(format!("{id}: valid for {ttl:?}, in {}", out.display()))
}

/// What the server signs with now, reloaded when the directory changes.
struct Signing {
    ca: Ca,
    tls: Arc<rustls::ServerConfig>,
    stamp: Option<Stamp>,
}

/// Where the CA learns which workload runs on which node.
enum Source {
    Files(PathBuf),
    /// The kubeconfig, if not inferred.
    Kubernetes(Option<PathBuf>),
}

/// The source, opened.
enum Feed {
    Files(PathBuf),
    Kubernetes(weft_agent::k8s::Cluster),
}

struct Server {
    dir: CaDir,
    config: Feed,
    ttl: Duration,
    signing: Mutex<Signing>,
    cfg: Mutex<(Option<u64>, Option<config::Config>)>,
}

/// What, when it changes, means reloading: the files, and which root signs now (a rotated
/// root starts signing when its grace period ends).
type Stamp = (SystemTime, SystemTime, u32);

fn stamp(dir: &CaDir) -> Option<Stamp> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((
        m(&dir.path.join("current"))?,
        m(&dir.bundle_path())?,
        dir.signing_root().ok()?,
    ))
}

/// The CA's own server certificate under the current root, and the TLS configuration
/// that presents it and checks nodes against the bundle.
fn signing(dir: &CaDir) -> Result<Signing, String> {
    let ca = dir.load().map_err(|e| e.to_string())?;
    let id = SpiffeId::ca(&ca.trust_domain).map_err(|e| e.to_string())?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = ca
        .issue(&id, &key, Duration::from_secs(10 * 365 * 24 * 3600))
        .map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    let certified = tls::certified_key(vec![cert], der).map_err(|e| e.to_string())?;
    let roots = tls::roots(&ca.bundle).map_err(|e| e.to_string())?;
    let tls =
        tls::server_config(roots, Arc::new(Fixed(certified)), &[]).map_err(|e| e.to_string())?;
    Ok(Signing {
        ca,
        tls,
        stamp: stamp(dir),
    })
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl Server {
    /// The TLS configuration, after reloading the CA if it was rotated or retired.
    fn tls(&self) -> Arc<rustls::ServerConfig> {
        let mut s = self.signing.lock().unwrap_or_else(|p| p.into_inner());
        if stamp(&self.dir) != s.stamp {
            match signing(&self.dir) {
                Ok(new) => {
                    tracing::info!(
                        root = new.ca.root,
                        roots_trusted = new.ca.bundle.len(),
                        "reloaded the CA"
                    );
                    *s = new;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reloading the CA failed; still signing as before")
                }
            }
        }
        s.tls.clone()
    }

    fn config(&self) -> Result<config::Config, String> {
        let mut c = self.cfg.lock().unwrap_or_else(|p| p.into_inner());
        let path = match &self.config {
            Feed::Files(path) => path,
            Feed::Kubernetes(cluster) => {
                let generation = Some(cluster.generation());
                if generation != c.0 || c.1.is_none() {
                    let l = config::from_api(cluster.objects(), [], c.1.as_ref());
                    for r in &l.rejected {
                        tracing::warn!(error = %r, "object refused");
                    }
                    *c = (generation, Some(l.config));
                }
                return c.1.clone().ok_or_else(|| "no configuration".to_owned());
            }
        };
        let fp = config::watch::fingerprint(path);
        if fp != c.0 || c.1.is_none() {
            // Object by object, as the agents accept it: a refused object keeps its last
            // accepted version.
            match config::load_objects([config::Source::Path(path)], c.1.as_ref()) {
                Ok(l) => {
                    for r in &l.rejected {
                        tracing::warn!(error = %r, "configuration object refused");
                    }
                    *c = (fp, Some(l.config));
                }
                Err(e) if c.1.is_some() => {
                    tracing::warn!(error = %e, "the configuration changed and cannot be read; keeping the last good one")
                }
                Err(e) => return Err(format!("no valid configuration: {e}")),
            }
        }
        c.1.clone().ok_or_else(|| "no configuration".to_owned())
    }

    fn sign(&self, node: &SpiffeId, csr: &str) -> Result<String, (StatusCode, String)> {
        let cfg = self
            .config()
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
        let s = self.signing.lock().unwrap_or_else(|p| p.into_inner());
        if cfg.trust_domain() != s.ca.trust_domain {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the configuration's trust domain is {}, this CA's is {}",
                    cfg.trust_domain(),
                    s.ca.trust_domain
                ),
            ));
        }
        let (id, pem) =
            s.ca.sign(csr, node, self.ttl, |n, w| node_may_have(&cfg, n, w))
                .map_err(|e| match e {
                    weft_agent::identity::ca::CaError::Refused(m) => (StatusCode::FORBIDDEN, m),
                    other => (StatusCode::BAD_REQUEST, other.to_string()),
                })?;
        tracing::info!(node = %node, identity = %id, ttl_s = self.ttl.as_secs(), root = s.ca.root, "signed");
        Ok(pem)
    }
}

async fn serve(
    dir: PathBuf,
    source: Source,
    listen: SocketAddr,
    ttl: Duration,
) -> Result<(), String> {
    let dir = CaDir::new(&dir);
    let config = match source {
        Source::Files(path) => Feed::Files(path),
        Source::Kubernetes(kubeconfig) => {
            let client = weft_agent::k8s::client(kubeconfig.as_deref())
                .await
                .map_err(|e| format!("{e:#}"))?;
            // Which workload runs where, and the trust domain: nothing else.
            let cluster =
                weft_agent::k8s::Cluster::watch_only(&client, Some(&weft_agent::k8s::CA_KINDS))
                    .await;
            while let Err(missing) = cluster.synced(Duration::from_secs(10)).await {
                tracing::warn!(kinds = %missing.join(", "), "still waiting for the first list from the Kubernetes API");
            }
            Feed::Kubernetes(cluster)
        }
    };
    let server = Arc::new(Server {
        signing: Mutex::new(signing(&dir)?),
        dir,
        config,
        ttl,
        cfg: Mutex::new((None, None)),
    });
    let td = server.config()?.trust_domain().to_owned();
    let ours = server
        .signing
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ca
        .trust_domain
        .clone();
    if td != ours {
        return Err(format!(
            "the configuration's trust domain is {td} (its Mesh document), this CA's is {ours}: agents would not trust what it signs"
        ));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("binding {listen}: {e}"))?;
    tracing::info!(%listen, ttl_s = ttl.as_secs(), "signing");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once; the connections held end within CONNECTION_TIMEOUT.
            tracing::debug!(%peer, "connection limit reached; refusing");
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection(server, tcp)).await {
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "connection refused"),
                Err(_) => {
                    tracing::info!(%peer, "connection closed: longer than {CONNECTION_TIMEOUT:?}")
                }
                Ok(Ok(())) => {}
            }
        });
    }
}

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 4096;
/// A client's TLS handshake, and then its request head, must each arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lasts longer (one request each: agents do not keep them).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

async fn connection(server: Arc<Server>, tcp: tokio::net::TcpStream) -> Result<(), String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server.tls());
    let tls = tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| format!("no TLS handshake within {READ_TIMEOUT:?}"))?
        .map_err(|e| format!("TLS: {e}"))?;
    let node = tls::peer_id(tls.get_ref().1)
        .filter(|id| id.node_name().is_some())
        .ok_or_else(|| "the client is not a node".to_owned())?;
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (server, node) = (server.clone(), node.clone());
        async move {
            let (status, body) = handle(&server, &node, req).await;
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(body)))
                    .expect("a response"),
            )
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), svc)
        .await
        .map_err(|e| e.to_string())
}

async fn handle(server: &Server, node: &SpiffeId, req: Request<Incoming>) -> (StatusCode, String) {
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/sign" {
        return (StatusCode::NOT_FOUND, "POST /v1/sign\n".into());
    }
    let body = Limited::new(req.into_body(), 16 * 1024).collect();
    let csr = match tokio::time::timeout(Duration::from_secs(10), body).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "no request body within 10 s (16 KiB at most)\n".into(),
            )
        }
    };
    match server.sign(node, &csr) {
        Ok(pem) => (StatusCode::OK, pem),
        Err((status, why)) => {
            tracing::warn!(node = %node, reason = %why, "refused");
            (status, format!("{why}\n"))
        }
    }
}
