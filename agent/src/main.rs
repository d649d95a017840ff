//! weft-agent's entry point: parse flags, set up logging and the runtime, call `app::run`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use weft_agent::{
    app, config,
    datapath::services::Capacity,
    proxy::{
        conn::{ConnLimits, Timeouts},
        ProxyConfig,
    },
};

/// A duration flag, written as the configuration writes them (10s, 500ms, 1h30m).
fn duration(s: &str) -> Result<Duration, String> {
    match config::route::parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
}

#[derive(Parser)]
#[command(
    name = "weft-agent",
    version,
    about = "weft's per-node agent: eBPF datapath and shared proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent for one node.
    Run(Box<RunArgs>),
    /// Check configuration without running anything: every source given, together, as
    /// one configuration.
    Validate {
        /// YAML files, directories of them, or `-` for standard input.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name, as declared by a `Node` document (or the Kubernetes Node).
    #[arg(long, env = "WEFT_NODE")]
    node: String,
    /// Configuration: a YAML file or a directory of them; reloaded on change.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Take the configuration from the Kubernetes API (watching Nodes, Namespaces, Pods,
    /// Services, EndpointSlices, Gateway API routes and weft's CRDs) instead of files.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig for --kubernetes [default: KUBECONFIG, ~/.kube/config, then the
    /// pod's service account].
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the namespace of the Lease that elects the one agent writing
    /// objects' status (the namespace weft is installed in).
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// Where the weft-cni plugin records the pods it sets up, and the agent listens for
    /// it [default with --kubernetes: /var/run/weft/cni; without: not used].
    #[arg(long)]
    cni_state_dir: Option<PathBuf>,
    /// The cgroup v2 directory the node's pods run under (absolute, or relative to the
    /// cgroup2 mount). The agent itself must run outside it.
    #[arg(long)]
    cgroup: PathBuf,
    /// bpffs mount to pin programs and maps under (mounted there if nothing is).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Directory for the admin and handoff sockets [default: /run/weft/<node>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Kernel BTF, checked at start.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    btf: PathBuf,
    /// Redirect payload between the app's and the agent's loopback sockets with sk_msg,
    /// skipping the TCP stack. Off by default: the kernel's sockmap receive path can return
    /// EAGAIN to a blocking reader that another thread's write wakes up (see
    /// docs/architecture.md, "Same-node acceleration").
    #[arg(long)]
    accelerate: bool,
    /// Tokio worker threads [default: number of CPUs].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// How often to look for configuration changes (durations: 500ms, 10s, 1h30m ...).
    #[arg(long, default_value = "500ms", value_parser = duration)]
    reload_interval: Duration,
    /// After SIGTERM, how long to keep serving while waiting for a new agent.
    #[arg(long, default_value = "5s", value_parser = duration)]
    handoff_wait: Duration,
    /// How long open connections may take to finish when stopping.
    #[arg(long, default_value = "20s", value_parser = duration)]
    drain_timeout: Duration,
    /// Connecting to an endpoint, an app or a peer agent (each attempt).
    #[arg(long, default_value = "2s", value_parser = duration)]
    connect_timeout: Duration,
    /// How long a peer agent may take to answer a tunnel request.
    #[arg(long, default_value = "5s", value_parser = duration)]
    tunnel_answer_timeout: Duration,
    /// How long a client may take to send a whole head: an HTTP/1 request head (also the
    /// longest wait for the next request on a kept-alive HTTP/1 connection), a tunnel
    /// request, an admin request, a TLS ClientHello routed by name.
    #[arg(long, default_value = "10s", value_parser = duration)]
    header_read_timeout: Duration,
    /// A forwarded TCP connection with no byte either way, or an HTTP/2 connection with no
    /// request, is closed after this.
    #[arg(long, default_value = "1h", value_parser = duration)]
    idle_timeout: Duration,
    /// How often HTTP/2 connections (clients and upstreams) are pinged.
    #[arg(long, default_value = "30s", value_parser = duration)]
    http2_keepalive_interval: Duration,
    /// How long an HTTP/2 ping may go unanswered before the connection is closed.
    #[arg(long, default_value = "10s", value_parser = duration)]
    http2_keepalive_timeout: Duration,
    /// A request body read into memory (retries, mirrors) must arrive within this; a
    /// streamed body may pause at most this long.
    #[arg(long, default_value = "10s", value_parser = duration)]
    request_body_timeout: Duration,
    /// Connections the agent holds for one pod (its outbound ones and those to it).
    #[arg(long, default_value_t = ConnLimits::DEFAULT_PER_POD)]
    max_connections_per_pod: u32,
    /// Connections the agent holds for the whole node [default: 131072, or what the
    /// open-file limit allows at two descriptors per connection, whichever is lower].
    #[arg(long)]
    max_connections: Option<u32>,
    /// Service ports (address, port, protocol) the SERVICES map holds; applies when the
    /// maps are first created.
    #[arg(long, default_value_t = Capacity::DEFAULT.services)]
    max_services: u32,
    /// Endpoints, over all services, the ENDPOINTS map holds; applies when the maps are
    /// first created.
    #[arg(long, default_value_t = Capacity::DEFAULT.endpoints)]
    max_endpoints: u32,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Workload certificates from this weft-ca (host:port), asked with the node's
    /// credentials (--node-cert, --node-key); peers are checked against --trust-bundle.
    #[arg(long, requires_all = ["node_cert", "node_key", "trust_bundle"], conflicts_with_all = ["ca_dir", "cert_dir"])]
    ca_address: Option<String>,
    /// The node's certificate for the CA (written by `weft-ca node-cert`; renewed in place).
    #[arg(long, requires = "ca_address")]
    node_cert: Option<PathBuf>,
    /// The node's private key for the CA (renewed in place).
    #[arg(long, requires = "ca_address")]
    node_key: Option<PathBuf>,
    /// The roots peers are checked against (re-read when it changes: trust rotation).
    #[arg(long, requires = "ca_address")]
    trust_bundle: Option<PathBuf>,
    /// Sign this node's workload certificates with the CA in this directory (made by
    /// `weft-ca init`). For one host and development only: the CA key is on this host.
    #[arg(long, conflicts_with = "cert_dir")]
    ca_dir: Option<PathBuf>,
    /// Lifetime of the certificates signed with --ca-dir.
    #[arg(long, default_value = "24h", value_parser = duration)]
    cert_ttl: Duration,
    /// Certificates kept current by another tool (cert-manager, SPIRE):
    /// DIR/<namespace>/<service-account>/{cert.pem,key.pem} and DIR/bundle.pem, re-read
    /// when they change.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// How long to wait at start for every local workload's certificate.
    #[arg(long, default_value = "10s", value_parser = duration)]
    identity_wait: Duration,
    /// Where Prometheus scrapes the agent (`/metrics`, `/ready`, `/live` over HTTP), or
    /// `off`. The rest of the admin API is only on the Unix socket.
    #[arg(long, default_value = "127.0.0.1:15020")]
    metrics_address: MetricsAddress,
    /// Access log: one JSON line per HTTP request and TCP connection, to `stdout` (or
    /// `-`) or appended to a file.
    #[arg(long)]
    access_log: Option<weft_agent::telemetry::access_log::Target>,
    /// The share of successful requests the access log keeps, 0 to 1 (failures are always
    /// kept).
    #[arg(long, default_value_t = 1.0)]
    access_log_sample: f64,
    /// Quarantine (on this node) an endpoint the pre-fault detector finds far gone: 5x its
    /// baseline latency, or half of its attempts failing; never one whose service would
    /// keep fewer than two other endpoints.
    #[arg(long)]
    auto_quarantine: bool,
    /// Record every request and forwarded connection (metrics per workload, service and
    /// route; access log; tap). `off` leaves only the node-wide counters: for measuring
    /// what recording costs.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    request_telemetry: String,
    /// Export spans over OTLP/HTTP (protobuf) to this collector, `http://HOST:4318`
    /// (`/v1/traces` is added when no path is given). Off when not given.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// The share of new traces recorded, 0 to 1 (a client's own decision in `traceparent`
    /// is kept).
    #[arg(long, default_value_t = 0.01)]
    trace_sample: f64,
}

/// Log lines to stderr (JSON with `--log-json`), filtered by `RUST_LOG` (default `info`);
/// the filter can be changed at run time through the admin API (`weftctl log-level`).
fn init_logging(json: bool) -> weft_agent::admin::LogLevel {
    use tracing_subscriber::{
        fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _, EnvFilter,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| fmt::layer().json().with_writer(std::io::stderr)))
        .with((!json).then(|| fmt::layer().with_writer(std::io::stderr)))
        .init();
    let reader = handle.clone();
    weft_agent::admin::LogLevel::new(
        move || {
            reader
                .with_current(ToString::to_string)
                .unwrap_or_else(|e| format!("(unreadable: {e})"))
        },
        move |spec| {
            let next = EnvFilter::try_new(spec)
                .map_err(|e| format!("{spec:?} is not a log filter: {e} (try info, debug, or weft_agent::proxy=debug,info)"))?;
            let shown = next.to_string();
            handle.reload(next).map_err(|e| e.to_string())?;
            tracing::info!(filter = %shown, "log filter changed");
            Ok(shown)
        },
    )
}

/// `--metrics-address`: where to listen, or `off`.
#[derive(Clone, Copy, Debug)]
struct MetricsAddress(Option<std::net::SocketAddr>);

impl std::str::FromStr for MetricsAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(Self(None)),
            a => a
                .parse()
                .map(|a| Self(Some(a)))
                .map_err(|e| format!("{a:?}: {e}; give ADDRESS:PORT or `off`")),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => {
            let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            match validate(&paths) {
                Ok(l) if !l.rejected.is_empty() => {
                    for r in &l.rejected {
                        eprintln!("invalid configuration: {r}");
                    }
                    ExitCode::FAILURE
                }
                Ok(config::Loaded { config: cfg, .. }) => {
                    println!(
                        "{}: valid ({} nodes, {} workloads, {} services)",
                        shown.join(" "),
                        cfg.nodes.len(),
                        cfg.workloads.len(),
                        cfg.services.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("invalid configuration: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => run(*args),
    }
}

/// Load the sources as one configuration (`-` is standard input), every invalid object
/// reported.
fn validate(paths: &[PathBuf]) -> Result<config::Loaded, config::ConfigError> {
    let stdin_name = std::path::Path::new("<stdin>");
    let mut text = String::new();
    if paths.iter().any(|p| p.as_os_str() == "-") {
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            eprintln!("reading standard input: {e}");
        }
    }
    config::load_objects(
        paths.iter().map(|p| {
            if p.as_os_str() == "-" {
                config::Source::Text(stdin_name, &text)
            } else {
                config::Source::Path(p)
            }
        }),
        None,
    )
}

fn run(args: RunArgs) -> ExitCode {
    let log_level = init_logging(args.log_json);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trace =
        args.otlp_endpoint
            .clone()
            .map(|endpoint| weft_agent::telemetry::trace::TraceOptions {
                endpoint,
                sample: args.trace_sample,
                node: args.node.clone(),
            });
    let opts = app::AgentOptions {
        run_dir: args
            .run_dir
            .unwrap_or_else(|| PathBuf::from("/run/weft").join(&args.node)),
        node: args.node,
        cni_dir: args.cni_state_dir.or_else(|| {
            args.kubernetes
                .then(|| PathBuf::from(weft_agent::cni::DEFAULT_DIR))
        }),
        config: match args.config {
            Some(path) => app::ConfigSource::Files(path),
            None => app::ConfigSource::Kubernetes {
                kubeconfig: args.kubeconfig,
                namespace: args.namespace,
            },
        },
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        btf: args.btf,
        accelerate: args.accelerate,
        reload_interval: args.reload_interval.max(Duration::from_millis(50)),
        handoff_wait: args.handoff_wait,
        drain_timeout: args.drain_timeout,
        proxy: ProxyConfig {
            timeouts: Timeouts {
                connect: args.connect_timeout,
                tunnel_answer: args.tunnel_answer_timeout,
                header_read: args.header_read_timeout,
                idle: args.idle_timeout,
                h2_keepalive_interval: args.http2_keepalive_interval,
                h2_keepalive_timeout: args.http2_keepalive_timeout,
                request_body: args.request_body_timeout,
                ..Timeouts::default()
            },
            limits: ConnLimits {
                per_pod: args.max_connections_per_pod,
                per_node: args.max_connections.unwrap_or(ConnLimits::DEFAULT_PER_NODE),
            },
            ..ProxyConfig::default()
        },
        max_connections_from_open_files: args.max_connections.is_none(),
        capacity: Capacity {
            services: args.max_services.max(1),
            endpoints: args.max_endpoints.max(1),
        },
        identity: match (args.ca_address, args.ca_dir, args.cert_dir) {
            (Some(address), _, _) => app::IdentitySource::Ca {
                address,
                node_cert: args.node_cert.unwrap_or_default(),
                node_key: args.node_key.unwrap_or_default(),
                bundle: args.trust_bundle.unwrap_or_default(),
            },
            (_, Some(dir), _) => app::IdentitySource::Local {
                dir,
                ttl: args.cert_ttl,
            },
            (_, _, Some(dir)) => app::IdentitySource::Files { dir },
            _ => app::IdentitySource::None,
        },
        identity_wait: args.identity_wait,
        metrics_address: args.metrics_address.0,
        access_log: args.access_log,
        access_log_sample: args.access_log_sample,
        request_telemetry: args.request_telemetry == "on",
        log_level,
        trace,
        prefault: weft_agent::telemetry::prefault::Thresholds {
            quarantine_factor: args.auto_quarantine.then_some(5.0),
            ..Default::default()
        },
    };
    match rt.block_on(app::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
