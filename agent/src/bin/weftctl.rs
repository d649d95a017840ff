//! weftctl: inspect a node's agent through its admin API (HTTP on the agent's Unix
//! socket). Tables for people, `-o json` or `-o yaml` for scripts.
//!
//! Exit codes: 0 done; 1 the agent answered with an error; 2 the command line is wrong;
//! 3 the agent cannot be reached.

use std::{io::BufRead as _, path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, ValueEnum};
use comfy_table::{presets, Table};
use serde_json::Value;
use weft_agent::admin::client::{self, ClientError};

#[derive(Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Inspect a weft node agent",
    after_help = "Exit codes: 0 done, 1 the agent answered with an error, 2 usage error, 3 the agent cannot be reached."
)]
struct Cli {
    /// The node whose agent to ask (its admin socket is /run/weft/<node>/admin.sock).
    #[arg(long, global = true, env = "WEFT_NODE")]
    node: Option<String>,
    /// The admin socket, instead of --node.
    #[arg(long, global = true, env = "WEFT_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    what: What,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(clap::Subcommand, Clone)]
enum What {
    /// Is the agent ready, what configuration is in force, what did it refuse.
    Status,
    /// The agent's version (and weftctl's).
    Version,
    /// This node's workloads: address, identity, whether the agent captures for them.
    Workloads,
    /// Services: address, protocol, routes, endpoints.
    Services,
    /// Every endpoint with its health as this node sees it: latency, failures, ejection.
    Endpoints,
    /// Golden signals per service over the last minute: requests per second, success
    /// rate, p50/p95/p99 latency (requests this node routed).
    Stats,
    /// The same, refreshed every two seconds (Ctrl-C ends).
    Top {
        /// Stop after this many refreshes.
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// eBPF and proxy counters since the agent started.
    Counters,
    /// Connections held now: the node's against its limit, each pod's against its own.
    Connections,
    /// The service map as the kernel holds it, and its capacity.
    Bpf,
    /// HTTPRoute rules per service: what each matches, where it sends, what it does.
    Routes,
    /// AuthorizationPolicies and the workloads of this node they select.
    Policies,
    /// The configuration in force: `weftctl config dump`.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Check configuration files (`-` for standard input) without asking any agent.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the agent's log filter, or set it (`debug`, `weft_agent::proxy=debug,info`).
    LogLevel { level: Option<String> },
    /// Workload certificates held, their expiry, and the ones still missing.
    Certs,
    /// Tunnel connections accepted from other nodes' agents, with both identities.
    Tunnels,
    /// The agent's Prometheus metrics, as Prometheus scrapes them.
    Metrics,
    /// Pre-fault warnings about endpoints (latency or errors rising against their own
    /// baseline, failing connects), recoveries and auto-quarantines, oldest first.
    Events,
    /// What a request from a pod of this node would meet, without sending it: the eBPF
    /// decision, service, route rule, backend, endpoint, policy verdict, identities.
    Explain(ExplainArgs),
    /// Requests and connections as they happen (Ctrl-C ends).
    Tap(TapArgs),
    /// Take a pod of this node's view out of every service's balancing and out of new
    /// inbound traffic, leaving it running for examination (kept across agent restarts).
    Quarantine {
        /// The pod, `namespace/name`.
        pod: String,
        /// Why (shown to whoever finds it quarantined).
        #[arg(long)]
        reason: String,
        /// A debug source that may still reach it besides its own node: an address, a
        /// CIDR or a SPIFFE ID (repeatable).
        #[arg(long = "allow-from")]
        allow_from: Vec<String>,
    },
    /// Lift a quarantine set with `weftctl quarantine`.
    Unquarantine {
        /// The pod, `namespace/name`.
        pod: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Subcommand, Clone)]
enum ConfigCmd {
    /// Everything the agent runs with: generation, source, last refused change,
    /// workloads, services, routes, policies (JSON unless -o yaml).
    Dump,
}

#[derive(clap::Args, Clone)]
struct ExplainArgs {
    /// The client pod, `namespace/name` (it must run on the node asked).
    source: String,
    /// `IP:PORT`, or a Service as `name[.namespace][:port]` (port 80 by default).
    destination: String,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header, `NAME:VALUE` (repeatable).
    #[arg(long)]
    header: Vec<String>,
}

#[derive(clap::Args, Clone)]
struct TapArgs {
    /// Only requests from or to this pod (`namespace/name`) or workload.
    #[arg(long)]
    workload: Option<String>,
    /// Only requests to this service (`namespace/name` or its name).
    #[arg(long)]
    service: Option<String>,
    /// Only requests whose path starts with this.
    #[arg(long)]
    path: Option<String>,
    /// Only responses with this status (`503`) or class (`5xx`).
    #[arg(long)]
    status: Option<String>,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Stop after this many records.
    #[arg(long)]
    count: Option<u64>,
}

const EXIT_AGENT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let What::Completions { shell } = cli.what {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "weftctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if let What::Validate { paths } = &cli.what {
        return validate(paths);
    }
    let socket = match (&cli.admin_socket, &cli.node) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => PathBuf::from("/run/weft").join(n).join("admin.sock"),
        (None, None) => {
            eprintln!(
                "weftctl: say which agent: --node NAME or --admin-socket PATH (or WEFT_NODE)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&cli, &socket) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl: {e}");
            ExitCode::from(match e {
                ClientError::Connect { .. } => EXIT_UNREACHABLE,
                _ => EXIT_AGENT_ERROR,
            })
        }
    }
}

fn run(cli: &Cli, socket: &std::path::Path) -> Result<ExitCode, ClientError> {
    let path: String = match &cli.what {
        What::Status => "/status".into(),
        What::Version => "/version".into(),
        What::Workloads => "/workloads".into(),
        What::Services | What::Endpoints => "/services".into(),
        What::Stats => "/stats/services".into(),
        What::Counters => "/stats".into(),
        What::Connections => "/connections".into(),
        What::Top { iterations } => return top(socket, *iterations),
        What::Bpf => "/maps".into(),
        What::Certs => "/certificates".into(),
        What::Events => "/events".into(),
        What::Routes => "/routes".into(),
        What::Policies => "/policies".into(),
        What::Config(ConfigCmd::Dump) => "/config".into(),
        What::LogLevel { level: None } => "/log-level".into(),
        What::LogLevel { level: Some(l) } => {
            let path = format!("/log-level?level={}", encode(l));
            let (status, v) = client::send_json(socket, "PUT", &path, None)?;
            let done = format!("log filter now {}", s(&v["level"]));
            return Ok(changed(cli.output, status, &v, &done));
        }
        What::Validate { .. } => unreachable!("answered without the agent"),
        What::Tunnels => "/tunnels".into(),
        What::Metrics => {
            let a = client::get(socket, "/metrics", Some(std::time::Duration::from_secs(10)))?;
            print!("{}", a.text()?);
            return Ok(ExitCode::SUCCESS);
        }
        What::Tap(t) => return tap(cli.output, socket, t),
        What::Explain(e) => {
            let mut q = vec![
                format!("source={}", encode(&e.source)),
                format!("destination={}", encode(&e.destination)),
                format!("method={}", encode(&e.method)),
                format!("path={}", encode(&e.path)),
            ];
            q.extend(e.header.iter().map(|h| format!("header={}", encode(h))));
            format!("/explain?{}", q.join("&"))
        }
        What::Quarantine {
            pod,
            reason,
            allow_from,
        } => {
            let ask = serde_json::json!({"pod": pod, "reason": reason, "allowFrom": allow_from});
            let (status, v) = client::send_json(socket, "POST", "/quarantine", Some(&ask))?;
            return Ok(changed(
                cli.output,
                status,
                &v,
                &format!("{pod} quarantined"),
            ));
        }
        What::Unquarantine { pod } => {
            let path = format!("/quarantine?pod={}", encode(pod));
            let (status, v) = client::send_json(socket, "DELETE", &path, None)?;
            return Ok(changed(
                cli.output,
                status,
                &v,
                &format!("{pod} is back in service"),
            ));
        }
        What::Completions { .. } => unreachable!("answered before the agent is asked"),
    };
    let (status, v) = client::get_json(socket, &path)?;
    if status >= 400 {
        eprintln!(
            "weftctl: the agent answered {status}: {}",
            v["error"].as_str().unwrap_or("(no reason given)")
        );
        return Ok(ExitCode::from(EXIT_AGENT_ERROR));
    }
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_norway::to_string(&v).unwrap_or_default()),
        Output::Table => print_table(&cli.what, &v),
    }
    Ok(ExitCode::SUCCESS)
}

/// `weftctl validate`: the same check the agent makes before it applies a change.
fn validate(paths: &[PathBuf]) -> ExitCode {
    let stdin_name = std::path::Path::new("<stdin>");
    let mut text = String::new();
    if paths.iter().any(|p| p.as_os_str() == "-") {
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            eprintln!("weftctl: reading standard input: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let sources = paths.iter().map(|p| {
        if p.as_os_str() == "-" {
            weft_agent::config::Source::Text(stdin_name, &text)
        } else {
            weft_agent::config::Source::Path(p)
        }
    });
    match weft_agent::config::load_objects(sources, None) {
        Ok(l) if !l.rejected.is_empty() => {
            for r in &l.rejected {
                eprintln!("invalid: {r}");
            }
            ExitCode::from(EXIT_AGENT_ERROR)
        }
        Ok(weft_agent::config::Loaded { config: cfg, .. }) => {
            println!(
                "valid: {} node(s), {} workload(s), {} service(s), {} HTTPRoute(s), {} AuthorizationPolicy(s)",
                cfg.nodes.len(),
                cfg.workloads.len(),
                cfg.services.len(),
                cfg.routes.len(),
                cfg.authorization.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invalid: {e}");
            ExitCode::from(EXIT_AGENT_ERROR)
        }
    }
}

/// Golden signals per service, busiest first.
fn print_signals(v: &Value) {
    let ms = |x: &Value| x.as_f64().map_or("-".into(), |m| format!("{m:.2}"));
    let rows = items(&v["services"])
        .map(|s_| {
            vec![
                s(&s_["service"]),
                format!("{:.1}", s_["rps"].as_f64().unwrap_or(0.0)),
                s_["success_rate"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
                ms(&s_["p50_ms"]),
                ms(&s_["p95_ms"]),
                ms(&s_["p99_ms"]),
                s(&s_["requests"]),
            ]
        })
        .collect();
    println!(
        "over the last {} s (requests this node routed):",
        s(&v["window_s"])
    );
    table(
        &[
            "SERVICE", "RPS", "SUCCESS", "P50-MS", "P95-MS", "P99-MS", "REQUESTS",
        ],
        rows,
    );
}

/// `weftctl top`: the golden signals, redrawn every two seconds.
fn top(socket: &std::path::Path, iterations: Option<u64>) -> Result<ExitCode, ClientError> {
    let mut n = 0;
    loop {
        let (status, v) = client::get_json(socket, "/stats/services")?;
        if status >= 400 {
            eprintln!("weftctl: the agent answered {status}");
            return Ok(ExitCode::from(EXIT_AGENT_ERROR));
        }
        // Clear the screen and go home, as top does.
        print!("\x1b[2J\x1b[H");
        print_signals(&v);
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Report a change's outcome: a sentence, or the agent's answer with -o json|yaml.
fn changed(output: Output, status: u16, v: &Value, done: &str) -> ExitCode {
    if status >= 400 {
        eprintln!(
            "weftctl: refused: {}",
            v["error"].as_str().unwrap_or("(no reason given)")
        );
        return ExitCode::from(EXIT_AGENT_ERROR);
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_norway::to_string(v).unwrap_or_default()),
        Output::Table => match v["config_generation"].as_u64() {
            Some(g) => println!("{done} (configuration generation {g})"),
            None => println!("{done}"),
        },
    }
    ExitCode::SUCCESS
}

/// Follow `/tap`: each record as a line (table), or as it came (json, yaml documents).
fn tap(output: Output, socket: &std::path::Path, t: &TapArgs) -> Result<ExitCode, ClientError> {
    let mut query = vec![format!("seconds={}", t.seconds)];
    for (k, v) in [
        ("workload", &t.workload),
        ("service", &t.service),
        ("path", &t.path),
        ("status", &t.status),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(v)));
        }
    }
    let a = client::get(socket, &format!("/tap?{}", query.join("&")), None)?;
    if a.status >= 400 {
        let v = a.json()?;
        eprintln!(
            "weftctl: the agent answered: {}",
            v["error"].as_str().unwrap_or("(no reason given)")
        );
        return Ok(ExitCode::from(EXIT_AGENT_ERROR));
    }
    let mut seen = 0;
    for line in a.body.lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match output {
            Output::Json => println!("{line}"),
            Output::Yaml => print!("---\n{}", serde_norway::to_string(&v).unwrap_or_default()),
            Output::Table => println!("{}", tap_line(&v)),
        }
        if v["kind"] != "skipped" {
            seen += 1;
            if t.count.is_some_and(|c| seen >= c) {
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One tap record as a line a person reads.
fn tap_line(v: &Value) -> String {
    let peer = |p: &Value| s(&p["pod"]);
    match v["kind"].as_str() {
        Some("http") => {
            let reason = v["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let retries = match v["retries"].as_u64() {
                Some(n) if n > 0 => format!(" retries={n}"),
                _ => String::new(),
            };
            format!(
                "{} {} -> {} {} {} {} {}{} {:.1}ms endpoint={}{}",
                s(&v["start"]),
                peer(&v["source"]),
                s(&v["service"]),
                s(&v["method"]),
                s(&v["path"]),
                s(&v["protocol"]),
                s(&v["status"]),
                reason,
                v["duration_ms"].as_f64().unwrap_or(0.0),
                s(&v["endpoint"]),
                retries,
            )
        }
        Some("tcp") => format!(
            "{} {} -> {} tcp {} sent={} received={} {:.1}ms endpoint={}",
            s(&v["start"]),
            peer(&v["source"]),
            s(&v["service"]),
            s(&v["outcome"]),
            s(&v["sent_bytes"]),
            s(&v["received_bytes"]),
            v["duration_ms"].as_f64().unwrap_or(0.0),
            s(&v["endpoint"]),
        ),
        Some("skipped") => format!(
            "... {} records skipped (this terminal fell behind)",
            s(&v["records"])
        ),
        _ => v.to_string(),
    }
}

/// Percent-encode what a query value must not hold raw.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// A table sized to its content, with a header row and no borders.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut t = Table::new();
    t.load_style(presets::NOTHING).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    // comfy-table pads every line to the table's width; trailing blanks help no one.
    for line in t.to_string().lines() {
        println!("{}", line.trim_end());
    }
}

fn yes(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => s(v),
    }
}

fn print_table(what: &What, v: &Value) {
    match what {
        What::Status => print_status(v),
        What::Version => println!(
            "weft-agent {} (datapath ABI v{}), weftctl {}",
            s(&v["version"]),
            s(&v["abi"]),
            env!("CARGO_PKG_VERSION")
        ),
        What::Services => {
            let rows = items(&v["services"])
                .map(|svc| {
                    let eps: Vec<&Value> = items(&svc["endpoints"]).collect();
                    let healthy = eps.iter().filter(|e| e["ejected"] != true).count();
                    let routes: Vec<String> = items(&svc["routes"]).map(s).collect();
                    let quarantined = items(&svc["quarantined"]).count();
                    let ready = if quarantined > 0 {
                        format!("{healthy}/{} ({quarantined} quarantined)", eps.len())
                    } else {
                        format!("{healthy}/{}", eps.len())
                    };
                    vec![
                        s(&svc["name"]),
                        s(&svc["address"]),
                        s(&svc["protocol"]),
                        ready,
                        if routes.is_empty() {
                            "-".into()
                        } else {
                            routes.join(",")
                        },
                    ]
                })
                .collect();
            table(
                &["SERVICE", "ADDRESS", "PROTO", "ENDPOINTS-READY", "ROUTES"],
                rows,
            );
        }
        What::Endpoints => {
            let mut rows = vec![];
            for svc in items(&v["services"]) {
                for e in items(&svc["endpoints"]) {
                    let ejected = if e["ejected"] == true {
                        format!("yes ({} ms left)", s(&e["ejected_for_ms"]))
                    } else {
                        "no".into()
                    };
                    rows.push(vec![
                        s(&svc["name"]),
                        s(&e["addr"]),
                        s(&e["workload"]),
                        s(&e["node"]),
                        yes(&e["meshed"]),
                        s(&e["in_flight"]),
                        e["latency_ms"]
                            .as_f64()
                            .map_or("-".into(), |l| format!("{l:.2}")),
                        s(&e["failures_in_a_row"]),
                        ejected,
                        s(&e["ejections"]),
                    ]);
                }
            }
            table(
                &[
                    "SERVICE",
                    "ENDPOINT",
                    "WORKLOAD",
                    "NODE",
                    "MESHED",
                    "IN-FLIGHT",
                    "LATENCY-MS",
                    "FAILS-IN-A-ROW",
                    "EJECTED",
                    "EJECTIONS",
                ],
                rows,
            );
        }
        What::Workloads => {
            let rows = items(&v["workloads"])
                .map(|w| {
                    vec![
                        s(&w["name"]),
                        s(&w["ip"]),
                        yes(&w["meshed"]),
                        yes(&w["enrolled"]),
                        s(&w["mtls"]),
                        s(&w["agent_down"]),
                        s(&w["identity"]),
                        match w["quarantine"]["reason"].as_str() {
                            Some(r) => format!("yes ({}): {r}", s(&w["quarantine"]["setBy"])),
                            None => "no".into(),
                        },
                    ]
                })
                .collect();
            table(
                &[
                    "WORKLOAD",
                    "IP",
                    "MESHED",
                    "ENROLLED",
                    "MTLS",
                    "AGENT-DOWN",
                    "IDENTITY",
                    "QUARANTINED",
                ],
                rows,
            );
        }
        What::Routes => {
            let mut rows = vec![];
            for svc in items(&v["services"]) {
                for r in items(&svc["rules"]) {
                    let list = |k: &str| items(&r[k]).map(s).collect::<Vec<_>>().join("; ");
                    rows.push(vec![
                        s(&svc["service"]),
                        s(&r["route"]),
                        list("matches"),
                        list("backends"),
                        match list("filters") {
                            f if f.is_empty() => "-".to_owned(),
                            f => f,
                        },
                    ]);
                }
            }
            table(
                &["SERVICE", "HTTPROUTE", "MATCHES", "BACKENDS", "FILTERS"],
                rows,
            );
        }
        What::Policies => {
            let rows = items(&v["policies"])
                .map(|p| {
                    vec![
                        s(&p["name"]),
                        s(&p["action"]),
                        yes(&p["dry_run"]),
                        s(&p["rules"]),
                        items(&p["selects"]).map(s).collect::<Vec<_>>().join(", "),
                    ]
                })
                .collect();
            table(
                &[
                    "POLICY",
                    "ACTION",
                    "DRY-RUN",
                    "RULES",
                    "SELECTS (THIS NODE)",
                ],
                rows,
            );
        }
        What::Config(_) => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        What::LogLevel { .. } => println!("{}", s(&v["level"])),
        What::Explain(_) => {
            for (i, step) in items(&v["steps"]).enumerate() {
                println!("{}. {}", i + 1, s(step));
            }
            println!("=> {}", s(&v["outcome"]));
        }
        What::Events => {
            let rows = items(&v["events"])
                .map(|e| {
                    [
                        "time", "severity", "kind", "service", "endpoint", "workload", "message",
                    ]
                    .iter()
                    .map(|k| s(&e[*k]))
                    .collect()
                })
                .collect();
            table(
                &[
                    "TIME", "SEVERITY", "KIND", "SERVICE", "ENDPOINT", "WORKLOAD", "MESSAGE",
                ],
                rows,
            );
        }
        What::Stats => print_signals(v),
        What::Connections => {
            println!(
                "{} connection(s) held of {} for the node; each pod may hold {}",
                s(&v["held"]),
                s(&v["limit"]),
                s(&v["per_pod_limit"])
            );
            let rows = items(&v["pods"])
                .map(|p| vec![s(&p["pod"]), s(&p["ip"]), s(&p["held"])])
                .collect();
            table(&["POD", "IP", "HELD"], rows);
        }
        What::Counters => {
            let mut rows = vec![];
            for section in ["ebpf", "proxy"] {
                for (k, val) in v[section].as_object().into_iter().flatten() {
                    rows.push(vec![section.to_owned(), k.clone(), s(val)]);
                }
            }
            table(&["SOURCE", "COUNTER", "VALUE"], rows);
        }
        What::Bpf => {
            println!(
                "programs ({}), pinned under {}:",
                s(&v["attachment"]),
                s(&v["pin_root"])
            );
            let rows = items(&v["programs"])
                .map(|p| {
                    ["name", "type", "id", "tag", "jitted_bytes", "run_count"]
                        .iter()
                        .map(|k| s(&p[*k]))
                        .collect()
                })
                .collect();
            table(
                &["PROGRAM", "TYPE", "ID", "TAG", "JITTED-BYTES", "RUNS"],
                rows,
            );
            println!(
                "service map: capacity {} services, {} endpoints",
                s(&v["capacity"]["services"]),
                s(&v["capacity"]["endpoints"])
            );
            let rows = items(&v["services"])
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
            table(&["ADDRESS", "PROTO", "ID", "ENDPOINTS"], rows);
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
            table(&["IDENTITY", "EXPIRES-IN"], rows);
        }
        What::Tunnels => {
            println!(
                "{} pooled connection(s) to other nodes",
                s(&v["pooled_connections"])
            );
            let rows = items(&v["accepted"])
                .map(|t| {
                    ["peer", "source", "destination", "streams"]
                        .iter()
                        .map(|k| s(&t[*k]))
                        .collect()
                })
                .collect();
            table(
                &["PEER", "SOURCE-IDENTITY", "DESTINATION-IDENTITY", "STREAMS"],
                rows,
            );
        }
        What::Metrics
        | What::Top { .. }
        | What::Validate { .. }
        | What::Tap(_)
        | What::Quarantine { .. }
        | What::Unquarantine { .. }
        | What::Completions { .. } => {}
    }
}

/// `weftctl status`: sentences, one topic per line.
fn print_status(v: &Value) {
    let ready = if v["ready"] == true {
        "ready"
    } else if v["draining"] == true {
        "draining (handing over or stopping)"
    } else {
        "NOT READY"
    };
    println!("Node {}: {ready}", s(&v["node"]));
    println!(
        "  Agent: pid {}, ready {} ms after start, {} listener(s) taken over from the previous agent",
        s(&v["pid"]),
        s(&v["startup_ms"]),
        s(&v["inherited_listeners"])
    );
    println!(
        "  Configuration: generation {} from {}",
        s(&v["config_generation"]),
        s(&v["config_source"])
    );
    match v["last_config_error"].as_str() {
        Some(e) => {
            println!("  Last change REFUSED (the previous configuration stays in force): {e}")
        }
        None => println!(
            "  Every change accepted ({} refused since start)",
            s(&v["config_reload_errors"])
        ),
    }
    let rejected: Vec<&Value> = items(&v["rejected"]).collect();
    if rejected.is_empty() {
        println!("  Every object accepted");
    } else {
        println!("  {} object(s) REFUSED:", rejected.len());
        for r in rejected {
            let ns = r["namespace"]
                .as_str()
                .map(|n| format!("{n}/"))
                .unwrap_or_default();
            println!(
                "    {} {ns}{}: {}: field `{}`: {} ({})",
                s(&r["kind"]),
                s(&r["name"]),
                s(&r["at"]),
                s(&r["field"]),
                s(&r["message"]),
                if r["kept_previous"] == true {
                    "its last accepted version stays in force"
                } else {
                    "left out"
                }
            );
        }
    }
    println!("  Datapath: {}", s(&v["attachment"]));
    for f in items(&v["foreign_programs"]) {
        println!(
            "  {}: {} program {:?} (id {}) of another owner runs {} weft's{}",
            if f["conflict"] == true {
                "CONFLICT"
            } else {
                "Beside weft"
            },
            s(&f["hook"]),
            s(&f["name"]),
            s(&f["id"]),
            if f["before_weft"] == true {
                "before"
            } else {
                "after"
            },
            if f["conflict"] == true {
                ": it can rewrite a service address first, and weft would not capture that connection"
            } else {
                ""
            }
        );
    }
    let enrolled: Vec<String> = items(&v["enrolled"]).map(s).collect();
    println!(
        "  Capturing for {} pod(s): {}",
        enrolled.len(),
        if enrolled.is_empty() {
            "-".into()
        } else {
            enrolled.join(", ")
        }
    );
    let l = &v["limits"];
    println!(
        "  Limits: {} connections per node, {} per pod, {} open files",
        s(&l["max_connections"]),
        s(&l["max_connections_per_pod"]),
        s(&l["open_files"])
    );
    let down: Vec<String> = v["while_agent_down"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k} {}", s(n)))
        .collect();
    if down.is_empty() {
        println!("  While no agent ran: nothing bypassed or refused");
    } else {
        println!("  While no agent ran: {}", down.join(", "));
    }
}
