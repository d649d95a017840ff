//! Turning results into docs/benchmarks.md: tables of medians with ranges, ratios to the
//! direct path and to the sidecar reference, where weft stands against its targets, and
//! SVG plots.

use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;

use super::results::{Results, Series};

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: Option<&Series>) -> String {
    match s {
        None => "".into(),
        Some(s) if s.values.len() > 1 => {
            format!("{} [{}–{}]", fmt(s.median()), fmt(s.min()), fmt(s.max()))
        }
        Some(s) => fmt(s.median()),
    }
}

/// One table per group: a row per case, a column per metric.
fn table(r: &Results, group: &str) -> String {
    let metrics = r.metrics(group);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| case | {} |",
        metrics
            .iter()
            .map(|(m, u)| format!("{m} ({u})"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(t, "|---|{}", "---|".repeat(metrics.len()));
    for case in r.cases(group) {
        let cells: Vec<String> = metrics
            .iter()
            .map(|(m, _)| cell(r.get(group, &case, m)))
            .collect();
        let _ = writeln!(t, "| {case} | {} |", cells.join(" | "));
    }
    t
}

/// Each case's medians as a ratio to the direct path's and the sidecar pair's, for every
/// metric both have (only for groups that contain a direct case).
fn ratios(r: &Results, group: &str) -> Option<String> {
    let cases = r.cases(group);
    if !cases.iter().any(|c| c == "direct") {
        return None;
    }
    let sc = cases.iter().find(|c| c.starts_with("sidecars")).cloned();
    let units: Vec<(String, String)> = r
        .metrics(group)
        .into_iter()
        .filter(|(m, _)| {
            m != "success"
                && r.get(group, "direct", m)
                    .is_some_and(|s| s.median().is_finite())
        })
        .collect();
    let metrics: Vec<String> = units.iter().map(|(m, _)| m.clone()).collect();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| case | {} |",
        metrics
            .iter()
            .map(|m| format!(
                "{m}: vs direct{}",
                if sc.is_some() { " / vs sidecars" } else { "" }
            ))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(t, "|---|{}", "---|".repeat(metrics.len()));
    for case in cases.iter().filter(|c| *c != "direct") {
        let cells: Vec<String> = metrics
            .iter()
            .map(|m| {
                let v = median(r, group, case, m);
                let direct = median(r, group, "direct", m);
                let mut d = times(v, direct);
                // For times, also what the path adds in absolute terms.
                let unit = units
                    .iter()
                    .find(|(n, _)| n == m)
                    .map_or("", |(_, u)| u.as_str());
                if (unit == "us" || unit == "ms") && v.is_finite() && direct.is_finite() {
                    d = format!("{d} ({:+.3} {unit})", v - direct);
                }
                match &sc {
                    Some(sc) => format!("{d} / {}", times(v, median(r, group, sc, m))),
                    None => d,
                }
            })
            .collect();
        let _ = writeln!(t, "| {case} | {} |", cells.join(" | "));
    }
    Some(t)
}

fn times(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}

fn median(r: &Results, group: &str, case: &str, metric: &str) -> f64 {
    r.get(group, case, metric).map_or(f64::NAN, Series::median)
}

/// Latency each proxied path adds over the direct path, and as a share of what the
/// sidecar pair adds.
fn added_latency(r: &Results, group: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| path | added p50 (ms) | added p99 (ms) | p50 vs sidecars | p99 vs sidecars |\n|---|---|---|---|---|");
    let add = |case: &str, p: &str| {
        median(r, group, case, &format!("latency {p}"))
            - median(r, group, "direct", &format!("latency {p}"))
    };
    let sc = r
        .cases(group)
        .into_iter()
        .find(|c| c.starts_with("sidecars"));
    for case in r.cases(group).into_iter().filter(|c| c != "direct") {
        let (a50, a99) = (add(&case, "p50"), add(&case, "p99"));
        let (s50, s99) = sc
            .as_deref()
            .map_or((f64::NAN, f64::NAN), |s| (add(s, "p50"), add(s, "p99")));
        let _ = writeln!(
            t,
            "| {case} | {} | {} | {} | {} |",
            fmt(a50),
            fmt(a99),
            ratio(a50, s50),
            ratio(a99, s99)
        );
    }
    t
}

fn ratio(a: f64, b: f64) -> String {
    if a < 0.0 || b <= 0.0 {
        "n/a (within noise of direct)".into()
    } else if a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}

/// Where weft stands against the targets of the benchmark issue.
fn targets(r: &Results) -> String {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let g5 = format!("http1 5000 rps, {threads} thread(s)");
    let add = |case: &str, p: &str| {
        median(r, &g5, case, &format!("latency {p}"))
            - median(r, &g5, "direct", &format!("latency {p}"))
    };
    let sc = "sidecars (iptables+HAProxy)";
    let g1 = "http1 max throughput, 16 connections, 1 thread(s)";
    let gs = "connection setup vs services";
    let counts = r.cases(gs);
    let largest = counts
        .iter()
        .rfind(|c| c.starts_with("weft"))
        .cloned()
        .unwrap_or_default();
    let conn0 = median(r, gs, "weft eBPF, 0 services", "connections");
    let conn_n = median(r, gs, &largest, "connections");
    let cpu = |case: &str| median(r, &g5, case, "proxy CPU per 1k req");
    let mut t = String::new();
    let _ = writeln!(t, "| target | measured | met |\n|---|---|---|");
    let mut row = |name: &str, measured: String, met: Option<bool>| {
        let m = match met {
            Some(true) => "yes",
            Some(false) => "not yet",
            None => "inconclusive",
        };
        let _ = writeln!(t, "| {name} | {measured} | {m} |");
    };
    let check = |a: f64, b: f64| (a.is_finite() && b.is_finite()).then_some(a < b);
    // An added latency below zero means the direct path was noisier than the proxied one
    // in this run: no conclusion can be drawn from it either way.
    let check_added = |a: f64, b: f64| {
        if a < 0.0 || b < 0.0 {
            None
        } else {
            check(a, b)
        }
    };
    for p in ["p50", "p99"] {
        let (w, s) = (add("weft other node", p), add(sc, p));
        row(
            &format!("cross-node added {p} at 5,000 rps < half the sidecar pair's"),
            format!("{} ms vs {} ms", fmt(w), fmt(s / 2.0)),
            check_added(w, s / 2.0),
        );
    }
    // The security issue's: the cross-node path with mTLS (both agents) against the
    // sidecar pair without TLS.
    for p in ["p50", "p99"] {
        let (w, s) = (add("weft other node", p), add(sc, p));
        row(
            &format!("cross-node with mTLS added {p} at 5,000 rps < the sidecar pair's (no TLS)"),
            format!("{} ms vs {} ms", fmt(w), fmt(s)),
            check_added(w, s),
        );
    }
    let (w, pair) = (cpu("weft other node"), cpu(sc));
    row(
        "agent CPU per request, cross-node with mTLS <= the sidecar pair's (no TLS)",
        format!("{} vs {} ms per 1k ({})", fmt(w), fmt(pair), times(w, pair)),
        check(w, pair + 1e-9),
    );
    let (w, s) = (add("weft same node", "p50"), add(sc, "p50") / 2.0);
    row(
        "same-node added p50 < one HAProxy hop's (half the pair)",
        format!("{} ms vs {} ms", fmt(w), fmt(s)),
        check_added(w, s),
    );
    let (w, h) = (
        median(r, g1, "weft other node", "throughput"),
        median(r, g1, sc, "throughput"),
    );
    row(
        "max throughput, one thread per proxy: weft other node (two agents) >= the sidecar pair (two HAProxies)",
        format!("{} vs {} req/s", fmt(w), fmt(h)),
        check(h, w + 1e-9),
    );
    let (w, h) = (cpu("weft other node"), cpu(sc) / 2.0);
    row(
        "agent CPU per request, whole path < one HAProxy hop's",
        format!("{} vs {} ms per 1k", fmt(w), fmt(h)),
        check(w, h),
    );
    // The pipeline issue's targets, as ratios measured in this run.
    let (w, pair) = (cpu("weft other node"), cpu(sc));
    row(
        "agent CPU per request, whole cross-node path <= 0.6x the sidecar pair's",
        format!("{} vs {} ms per 1k ({})", fmt(w), fmt(pair), times(w, pair)),
        check(w, pair * 0.6 + 1e-9),
    );
    let g2 = "http2 5000 rps, 100 streams on 1 connection";
    let (w, h) = (
        median(r, g2, "weft other node", "latency p99"),
        median(r, g2, sc, "latency p99"),
    );
    row(
        "HTTP/2 cross-node p99 at 5,000 rps <= the sidecar pair's",
        format!("{} ms vs {} ms ({})", fmt(w), fmt(h), times(w, h)),
        check(w, h + 1e-9),
    );
    // The observability issue's: recording every request costs at most 5% more agent CPU.
    let gt = "request telemetry (metrics per workload, service and route)";
    let (on, off) = (
        median(r, gt, "request telemetry on", "proxy CPU per 1k req"),
        median(r, gt, "request telemetry off", "proxy CPU per 1k req"),
    );
    row(
        "request telemetry (families, tap) costs <= 5% of agent CPU per request (on vs off, same node, 5,000 rps)",
        format!("{} vs {} ms per 1k ({})", fmt(on), fmt(off), times(on, off)),
        check(on, off * 1.05 + 1e-9),
    );
    let bulk = "tcp bulk, 1 connection(s)";
    for (case, want) in [("weft other node", 0.35), ("weft same node", 0.6)] {
        let (w, d) = (
            median(r, bulk, case, "throughput"),
            median(r, bulk, "direct", "throughput"),
        );
        let agents = if case == "weft other node" {
            "two agents"
        } else {
            "one agent"
        };
        row(
            &format!("bulk TCP through {agents} >= {want}x direct"),
            format!("{} vs {} Gbit/s ({})", fmt(w), fmt(d), times(w, d)),
            check(d * want, w + 1e-9),
        );
    }
    let ge = "new connection + 1-byte echo";
    let (w, d) = (
        median(r, ge, "weft other node", "connections"),
        median(r, ge, "direct", "connections"),
    );
    row(
        "new connections per second, cross-node >= 0.5x direct",
        format!("{} vs {} conn/s ({})", fmt(w), fmt(d), times(w, d)),
        check(d * 0.5, w + 1e-9),
    );
    let drop = (conn0 - conn_n) / conn0 * 100.0;
    let change = if drop >= 0.0 {
        format!("{}% lower", fmt(drop))
    } else {
        format!("{}% higher", fmt(-drop))
    };
    row(
        &format!(
            "connect rate at {} within 5% of 0 services",
            largest.trim_start_matches("weft eBPF, ")
        ),
        change,
        drop.is_finite().then_some(drop <= 5.0),
    );
    match r.cases("agent memory").into_iter().next() {
        Some(case) => {
            let rss = median(r, "agent memory", &case, "agent RSS");
            row(
                &format!("agent RSS < 20 MiB with 100 pods enrolled (measured: {case})"),
                format!("{} MiB", fmt(rss)),
                rss.is_finite().then_some(rss < 20.0),
            );
        }
        None => row(
            "agent RSS < 20 MiB with 100 pods enrolled",
            "not measured".into(),
            None,
        ),
    }
    // The Kubernetes issue's: a watched change costs in proportion to what changed.
    let gk = "watched changes at scale";
    let cases = r.cases(gk);
    if let (Some(small), Some(large)) = (cases.first(), cases.last()) {
        let change = |case: &str| {
            median(r, gk, case, "one endpoint removed").max(median(
                r,
                gk,
                case,
                "one endpoint added",
            ))
        };
        let (c_small, c_large) = (change(small), change(large));
        row(
            &format!(
                "one watched endpoint change reaches the maps and the proxy < 10 ms ({large})"
            ),
            format!("{} ms", fmt(c_large)),
            check(c_large, 10.0),
        );
        row(
            &format!("the cost of one change is flat from {small} to {large} (within 1.5x)"),
            format!(
                "{} ms vs {} ms ({})",
                fmt(c_small),
                fmt(c_large),
                times(c_large, c_small)
            ),
            check(c_large, c_small * 1.5 + 1e-9),
        );
        let rss = median(r, gk, large, "RSS after changes");
        row(
            &format!("agent RSS < 40 MiB in Kubernetes mode ({large})"),
            format!("{} MiB", fmt(rss)),
            check(rss, 40.0),
        );
    }
    t
}

fn plot_latency(r: &Results, group: &str, file: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let ps = ["p50", "p90", "p99", "p99.9"];
    let cases = r.cases(group);
    let ymax = cases
        .iter()
        .flat_map(|c| {
            ps.iter()
                .map(move |p| median(r, group, c, &format!("latency {p}")))
        })
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(file, (820, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency by percentile, {group}"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.2f64..3.2f64, 0f64..ymax.max(0.01))?;
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&|x| ps.get(x.round() as usize).copied().unwrap_or("").to_owned())
        .y_desc("ms")
        .draw()?;
    for (i, case) in cases.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = ps
            .iter()
            .enumerate()
            .map(|(x, p)| (x as f64, median(r, group, case, &format!("latency {p}"))))
            .filter(|(_, y)| y.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(case.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_services(r: &Results, file: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let g = "connection setup vs services";
    let series = |prefix: &str| -> Vec<(f64, f64)> {
        r.cases(g)
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .filter_map(|c| {
                let n: f64 = c
                    .trim_start_matches(prefix)
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()?;
                Some((n.max(1.0).log10(), median(r, g, &c, "connections")))
            })
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let (w, i) = (series("weft eBPF, "), series("iptables, "));
    let ymax = w.iter().chain(&i).map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let xmax = w.iter().chain(&i).map(|p| p.0).fold(1.0, f64::max) + 0.3;
    let root = SVGBackend::new(file, (820, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "New connections per second vs number of services",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.2f64..xmax, 0f64..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("services")
        .x_labels(((xmax + 0.2).floor() as usize) + 1)
        .x_label_formatter(&|x| {
            if *x < 0.5 {
                "0".into()
            } else {
                format!("{:.0}", 10f64.powf(x.round()))
            }
        })
        .y_desc("connections/s")
        .draw()?;
    for (idx, (name, pts)) in [
        ("weft eBPF socket LB", w),
        ("iptables (kube-proxy layout)", i),
    ]
    .into_iter()
    .enumerate()
    {
        let color = Palette99::pick(idx).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Write the report (and its plots, next to it in `bench/`); returns the markdown.
pub fn write(r: &Results, md_path: &Path) -> std::io::Result<String> {
    let dir = md_path.parent().unwrap_or(Path::new(".")).join("bench");
    std::fs::create_dir_all(&dir)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let lat_group = format!("http1 5000 rps, {threads} thread(s)");
    let mut plots = vec![];
    if plot_latency(r, &lat_group, &dir.join("latency-5000rps.svg")).is_ok() {
        plots.push((
            "latency-5000rps.svg",
            "Latency by percentile at 5,000 requests/s",
        ));
    }
    if plot_services(r, &dir.join("connect-vs-services.svg")).is_ok() {
        plots.push((
            "connect-vs-services.svg",
            "Connection rate against the number of services",
        ));
    }

    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}` in {:.0} s on {} ({} CPUs, {} GiB, kernel {}). \
         Every case ran in the same run, interleaved (A B C D A B C D ...), so the ratios hold \
         even on a noisy machine; each cell is the median over repetitions with the range in \
         brackets. Nothing here is asserted: numbers are reported as measured.\n",
        if r.quick { " --quick" } else { "" },
        r.seconds,
        m.cpu,
        m.cpus,
        m.memory_gib,
        m.kernel
    );
    md.push_str(INTRO);
    let _ = writeln!(
        md,
        "\n## Where weft stands against its targets\n\n{}",
        targets(r)
    );
    let _ = writeln!(md, "## Request path, HTTP/1.1\n");
    let _ = writeln!(md, "Latency each path adds to the direct path at 5,000 requests/s ({threads} thread(s)), and as a ratio to what the sidecar pair adds:\n\n{}", added_latency(r, &lat_group));
    for (file, title) in &plots {
        let _ = writeln!(md, "![{title}](bench/{file})\n");
    }
    let groups: Vec<String> = {
        let mut g: Vec<String> = vec![];
        for s in &r.series {
            if !g.contains(&s.group) {
                g.push(s.group.clone());
            }
        }
        g
    };
    let _ = writeln!(md, "## All results\n");
    for g in &groups {
        let _ = writeln!(md, "### {g}\n\n{}", table(r, g));
        if let Some(t) = ratios(r, g) {
            let _ = writeln!(md, "Ratios of the medians:\n\n{t}");
        }
    }
    let _ = writeln!(md, "## Method\n");
    for (g, how) in &r.method {
        let _ = writeln!(md, "- **{g}**: {how}");
    }
    if !r.failures.is_empty() {
        let _ = writeln!(md, "\n## Measurements that failed in this run\n");
        for n in &r.failures {
            let _ = writeln!(md, "- {n}");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "\n## Notes from this run\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md.push_str(OUTRO);
    std::fs::write(md_path, &md)?;
    Ok(md)
}

const INTRO: &str = "\
## What is measured

- **direct**: two pods on one node talking by pod IP, no mesh: the limit of this machine.
- **weft same node**: a meshed client dials a service address; connect4 sends it to the
  node's agent, which connects to the server pod on the same node.
- **weft other node**: the same, with the server on another node: through both nodes'
  agents, which carry it as an HTTP/2 CONNECT stream in mutual TLS 1.3 (pooled per pair
  of workload identities), with certificates from the cluster's `weft-ca`.
- **sidecars (iptables+HAProxy)**: what a sidecar mesh does, as Istio wires it: iptables
  REDIRECT in the client pod sends its connection to a per-pod HAProxy (HTTP mode,
  keep-alive), which connects to the server pod, where iptables REDIRECT sends it to that
  pod's HAProxy, which connects to the app over loopback. Two proxies, like weft other
  node. Both parse HTTP: weft's client-side agent routes each request (HTTPRoute
  matching, pooled upstream connections); the server-side agent forwards the tunnelled
  connection as bytes. The sidecar pair speaks plain HTTP between the pods (no TLS): weft
  pays for encryption and the sidecars do not.

The proxies get the same number of worker threads in each comparison: one, and the
default (one per CPU). CPU per 1,000 requests counts the proxies' processes only (agents
or HAProxies, from /proc), not the load generator or the servers.
";

const OUTRO: &str = "
## What the numbers mean for you

- **Replacing kube-proxy.** weft resolves a service address once per `connect()` with a
  hash lookup, so the cost of a new connection does not grow with the number of services;
  kube-proxy's iptables chains are walked rule by rule, and at tens of thousands of
  services connection setup slows by an order of magnitude and a full resync takes tens
  of seconds. See the table «connection setup vs services».
- **One proxy per node instead of two per request.** The same-node path goes through one
  agent; the cross-node path through two, like a sidecar pair, and both parse HTTP. Per
  request, most of each hop's CPU is the kernel's (sockets, the veth path, wake-ups: about
  60% of the client-side agent's samples and 85% of the server side's in a `perf` profile),
  so two userspace hops cost about what two HAProxies cost; across nodes weft also pays
  for TLS, which the sidecar pair here does not. New connections across nodes share pooled
  TLS connections (one HTTP/2 stream each), so they pay for no handshake. The targets
  table shows where it stands.
- **Memory.** The agent is one process per node: its memory grows with the configuration
  (services, endpoints) and the number of open connections, not with the number of pods.
  In Kubernetes mode it is still far more than it should be at 10,000 services: the
  EndpointSlices are cached compactly, but Services and Pods stay in the watch caches as
  the API's JSON, the configuration is kept in more than one form, and a full rebuild
  holds the old and the new state at once (see the targets table; open work).
- **Changes in a cluster.** An EndpointSlice change (pods coming and going, the common
  case) is applied to the services it touches only: its cost hardly grows with the
  cluster. Any other change (a Service, a Pod, a route) still rebuilds the node's whole
  state, as «control side at scale» measures for files.
- **Same-node acceleration.** sk_msg redirection raises same-node throughput, but it is
  off by default: blocking programs that read and write one socket from two threads can
  get spurious errors (iperf3 is one; see the notes of the run and docs/architecture.md).

## Reproducing

```sh
cargo xtask bench           # about 10 minutes; rewrites this page and its plots
cargo xtask bench --quick   # about 2 minutes; writes target/bench/ only
```

Raw numbers, with the machine's description, are in `target/bench/results.json` (a copy
of this page's run is in `docs/bench/results.json`; `weft-bench --from FILE --report
FILE` writes a report again from one).
";
