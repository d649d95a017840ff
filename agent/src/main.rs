//! weft-agent's entry point: parse flags, set up logging and the runtime, call `app::run`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use weft_agent::{app, config};

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
    Run(RunArgs),
    /// Check a configuration file or directory without running anything.
    Validate {
        /// A YAML file or a directory of them.
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name, as declared by a `Node` document.
    #[arg(long)]
    node: String,
    /// Configuration: a YAML file or a directory of them; reloaded on change.
    #[arg(long)]
    config: PathBuf,
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
    /// How often to look for configuration changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// After SIGTERM, how long to keep serving while waiting for a new agent, in seconds.
    #[arg(long, default_value_t = 5)]
    handoff_wait_secs: u64,
    /// How long open connections may take to finish when stopping, in seconds.
    #[arg(long, default_value_t = 20)]
    drain_timeout_secs: u64,
    /// How long an HTTP/1.1 client may take to send a request head, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    header_read_timeout_ms: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { path } => match config::load_path(&path) {
            Ok(cfg) => {
                println!(
                    "{}: valid ({} nodes, {} workloads, {} services)",
                    path.display(),
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
        },
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
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
    let opts = app::AgentOptions {
        run_dir: args
            .run_dir
            .unwrap_or_else(|| PathBuf::from("/run/weft").join(&args.node)),
        node: args.node,
        config: args.config,
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        btf: args.btf,
        accelerate: args.accelerate,
        reload_interval: Duration::from_millis(args.reload_interval_ms.max(50)),
        handoff_wait: Duration::from_secs(args.handoff_wait_secs),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        http_limits: weft_agent::proxy::http::Limits {
            header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(100)),
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
