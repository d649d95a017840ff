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
    /// Workload certificates held, their expiry, and the ones still missing.
    Certs,
    /// Tunnel connections accepted from other nodes' agents, with both identities.
    Tunnels,
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
        What::Certs => "/certificates",
        What::Tunnels => "/tunnels",
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

/// Print rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn print_table(what: What, v: &Value) {
    match what {
        What::Status => {
            let mut rows: Vec<Vec<String>> = [
                "node",
                "pid",
                "ready",
                "draining",
                "config_generation",
                "last_config_error",
                "attachment",
                "startup_ms",
                "inherited_listeners",
            ]
            .iter()
            .map(|k| vec![(*k).to_owned(), s(&v[*k])])
            .collect();
            let enrolled: Vec<String> = items(&v["enrolled"]).map(s).collect();
            rows.push(vec!["enrolled".into(), enrolled.join(", ")]);
            for (k, n) in v["while_agent_down"].as_object().into_iter().flatten() {
                rows.push(vec![format!("while_agent_down.{k}"), s(n)]);
            }
            for (k, n) in v["limits"].as_object().into_iter().flatten() {
                rows.push(vec![format!("limits.{k}"), s(n)]);
            }
            table(&["FIELD", "VALUE"], &rows);
        }
        What::Services => {
            let mut rows = vec![];
            for svc in items(&v["services"]) {
                let eps: Vec<&Value> = items(&svc["endpoints"]).collect();
                let head = |i: usize| -> [String; 3] {
                    if i == 0 {
                        [s(&svc["name"]), s(&svc["address"]), s(&svc["protocol"])]
                    } else {
                        Default::default()
                    }
                };
                if eps.is_empty() {
                    let [n, a, p] = head(0);
                    rows.push(vec![n, a, p, "(no endpoint)".into()]);
                }
                for (i, e) in eps.iter().enumerate() {
                    let [n, a, p] = head(i);
                    let ejected = if e["ejected"] == true {
                        format!("yes ({} ms)", s(&e["ejected_for_ms"]))
                    } else {
                        "no".into()
                    };
                    rows.push(vec![
                        n,
                        a,
                        p,
                        s(&e["addr"]),
                        s(&e["node"]),
                        s(&e["workload"]),
                        s(&e["in_flight"]),
                        e["latency_ms"]
                            .as_f64()
                            .map_or("-".into(), |l| format!("{l:.2}")),
                        s(&e["samples"]),
                        s(&e["failures_in_a_row"]),
                        ejected,
                        s(&e["ejections"]),
                    ]);
                }
            }
            table(
                &[
                    "SERVICE",
                    "ADDRESS",
                    "PROTO",
                    "ENDPOINT",
                    "NODE",
                    "WORKLOAD",
                    "IN-FLIGHT",
                    "LATENCY-MS",
                    "SAMPLES",
                    "FAILS",
                    "EJECTED",
                    "EJECTIONS",
                ],
                &rows,
            );
        }
        What::Workloads => {
            let rows: Vec<Vec<String>> = items(&v["workloads"])
                .map(|w| {
                    [
                        "name",
                        "ip",
                        "meshed",
                        "agent_down",
                        "enrolled",
                        "service_account",
                    ]
                    .iter()
                    .map(|k| s(&w[*k]))
                    .collect()
                })
                .collect();
            table(
                &[
                    "WORKLOAD",
                    "IP",
                    "MESHED",
                    "AGENT-DOWN",
                    "ENROLLED",
                    "SERVICE-ACCOUNT",
                ],
                &rows,
            );
        }
        What::Stats => {
            let mut rows = vec![];
            for section in ["ebpf", "proxy"] {
                for (k, val) in v[section].as_object().into_iter().flatten() {
                    rows.push(vec![section.to_owned(), k.clone(), s(val)]);
                }
            }
            table(&["SOURCE", "COUNTER", "VALUE"], &rows);
        }
        What::Maps => {
            println!("pinned under {}", s(&v["pin_root"]));
            let rows: Vec<Vec<String>> = items(&v["services"])
                .map(|svc| {
                    let eps: Vec<String> = items(&svc["endpoints"]).map(s).collect();
                    vec![
                        s(&svc["address"]),
                        s(&svc["proto"]),
                        s(&svc["id"]),
                        eps.join(" "),
                    ]
                })
                .collect();
            table(&["ADDRESS", "PROTO", "ID", "ENDPOINTS"], &rows);
        }
        What::Certs => {
            println!(
                "trust domain {}, {} root(s) trusted, certificates from {}",
                s(&v["trust_domain"]),
                s(&v["roots"]),
                s(&v["source"])
            );
            let mut rows: Vec<Vec<String>> = items(&v["certificates"])
                .map(|c| vec![s(&c["identity"]), format!("{}s", s(&c["expires_in_s"]))])
                .collect();
            rows.extend(items(&v["pending"]).map(|p| vec![s(p), "(none yet)".into()]));
            table(&["IDENTITY", "EXPIRES-IN"], &rows);
        }
        What::Tunnels => {
            println!(
                "{} pooled connection(s) to other nodes",
                s(&v["pooled_connections"])
            );
            let rows: Vec<Vec<String>> = items(&v["accepted"])
                .map(|t| {
                    ["peer", "source", "destination", "streams"]
                        .iter()
                        .map(|k| s(&t[*k]))
                        .collect()
                })
                .collect();
            table(
                &["PEER", "SOURCE-IDENTITY", "DESTINATION-IDENTITY", "STREAMS"],
                &rows,
            );
        }
    }
}
