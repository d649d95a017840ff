//! weftctl: inspect a node's agent through its admin socket. Tables for people, `-o json`
//! for scripts.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Inspect a weft node agent")]
struct Cli {
    /// The node whose agent to ask (its admin socket is /run/weft/<node>/admin.sock).
    #[arg(long, global = true)]
    node: Option<String>,
    /// The admin socket, instead of --node.
    #[arg(long, global = true)]
    admin_socket: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    what: What,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Subcommand, Clone, Copy)]
enum What {
    /// Readiness, configuration generation, last refused change, enrolled pods.
    Status,
    /// Services and their endpoints, as the proxy sees them.
    Services,
    /// This node's workloads and whether they are enrolled.
    Workloads,
    /// eBPF and proxy counters.
    Stats,
    /// The service map as the kernel holds it.
    Maps,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = match (&cli.admin_socket, &cli.node) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => PathBuf::from("/run/weft").join(n).join("admin.sock"),
        (None, None) => {
            eprintln!("weftctl: say which agent: --node NAME or --admin-socket PATH");
            return ExitCode::from(2);
        }
    };
    let path = match cli.what {
        What::Status => "/status",
        What::Services => "/services",
        What::Workloads => "/workloads",
        What::Stats => "/stats",
        What::Maps => "/maps",
    };
    let v = match weft_agent::admin::request(&socket, path) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "weftctl: cannot reach the agent at {}: {e} (is weft-agent running on this node?)",
                socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Output::Table => print_table(cli.what, &v),
    }
    ExitCode::SUCCESS
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_table(what: What, v: &Value) {
    match what {
        What::Status => {
            for key in [
                "node",
                "ready",
                "draining",
                "config_generation",
                "attachment",
                "startup_ms",
                "inherited_listeners",
                "last_config_error",
            ] {
                println!("{key:<22} {}", s(&v[key]));
            }
            let enrolled: Vec<String> = v["enrolled"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            println!("{:<22} {}", "enrolled", enrolled.join(", "));
        }
        What::Services => {
            println!(
                "{:<28} {:<22} {:<5} ENDPOINTS",
                "SERVICE", "ADDRESS", "PROTO"
            );
            for svc in v["services"].as_array().into_iter().flatten() {
                let eps: Vec<String> = svc["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{}({})", s(&e["addr"]), s(&e["node"])))
                    .collect();
                println!(
                    "{:<28} {:<22} {:<5} {}",
                    s(&svc["name"]),
                    s(&svc["address"]),
                    s(&svc["protocol"]),
                    eps.join(" ")
                );
            }
        }
        What::Workloads => {
            println!(
                "{:<28} {:<16} {:<7} {:<12} ENROLLED",
                "WORKLOAD", "IP", "MESHED", "AGENT-DOWN"
            );
            for w in v["workloads"].as_array().into_iter().flatten() {
                println!(
                    "{:<28} {:<16} {:<7} {:<12} {}",
                    s(&w["name"]),
                    s(&w["ip"]),
                    s(&w["meshed"]),
                    s(&w["agent_down"]),
                    s(&w["enrolled"])
                );
            }
        }
        What::Stats => {
            for section in ["ebpf", "proxy"] {
                if let Some(m) = v[section].as_object() {
                    for (k, val) in m {
                        println!("{section:<6} {k:<26} {}", s(val));
                    }
                }
            }
        }
        What::Maps => {
            println!("pinned under {}", s(&v["pin_root"]));
            println!("{:<22} {:<5} {:<4} ENDPOINTS", "ADDRESS", "PROTO", "ID");
            for svc in v["services"].as_array().into_iter().flatten() {
                let eps: Vec<String> = svc["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "{:<22} {:<5} {:<4} {}",
                    s(&svc["address"]),
                    s(&svc["proto"]),
                    s(&svc["id"]),
                    eps.join(" ")
                );
            }
        }
    }
}
