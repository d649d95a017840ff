//! `cargo xtask bench`: weft measured against the direct path and a sidecar mesh on the
//! simulated cluster, with every case in one run. A benchmark, not a test: it asserts
//! nothing about speed; it fails only when a case produced no numbers.

pub mod kube;
mod paths;
pub mod procstat;
pub mod report;
pub mod results;
mod services;

use std::{path::PathBuf, time::Instant};

use crate::{Cluster, PodSpec};
pub use results::Results;

pub struct Options {
    pub quick: bool,
    /// Seconds per measurement.
    pub run_secs: f64,
    /// Repetitions of every case (interleaved).
    pub reps: usize,
    /// `results.json` goes here.
    pub out: PathBuf,
    /// The markdown report (plots beside it in `bench/`).
    pub report: PathBuf,
    /// Run only these parts (`paths`, `services`, `kubernetes`, `pods`); all when empty.
    pub only: Vec<String>,
}

impl Options {
    pub fn new(quick: bool, out: PathBuf, report: PathBuf) -> Self {
        let (run_secs, reps) = if quick { (1.0, 1) } else { (4.0, 2) };
        Self {
            quick,
            run_secs,
            reps,
            out,
            report,
            only: vec![],
        }
    }
}

/// Run every case, write the results and the report, and return the results.
pub fn run(opts: &Options) -> std::io::Result<Results> {
    let t0 = Instant::now();
    let mut r = Results::new(opts.quick);
    let wanted = |part: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == part);
    if wanted("paths") {
        eprintln!("bench: request paths (HTTP/1.1, TCP, acceleration)");
        paths::run(opts, &mut r);
    }
    if wanted("services") {
        eprintln!("bench: services and the control side");
        services::run(opts, &mut r);
    }
    if wanted("kubernetes") {
        eprintln!("bench: watched changes at scale (Kubernetes mode)");
        kube::run(opts, &mut r);
    }
    if wanted("pods") {
        eprintln!("bench: agent memory with many pods");
        pods_memory(opts, &mut r);
    }
    r.seconds = t0.elapsed().as_secs_f64();
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?,
    )?;
    report::write(&r, &opts.report)?;
    Ok(r)
}

/// Agent memory with many meshed pods enrolled on its node.
fn pods_memory(opts: &Options, r: &mut Results) {
    let n = if opts.quick { 20 } else { 100 };
    let mut b = Cluster::builder("bench-pods").node("a");
    for i in 0..n {
        b = b.pod(
            PodSpec::new(&format!("p{i}"), "a")
                .label("app", "p")
                .port(8080),
        );
    }
    let c = b.build();
    let t0 = Instant::now();
    let agent = c.start_agent("a", &[]);
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while agent
        .admin("/status")
        .ok()
        .and_then(|s| s["enrolled"].as_array().map(Vec::len))
        .unwrap_or(0)
        < n
    {
        if Instant::now() > deadline {
            r.failures
                .push(format!("not all {n} pods were enrolled within 120 s"));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let case = format!("{n} meshed pods enrolled");
    r.record(
        "agent memory",
        &case,
        "time to enrol all",
        "s",
        t0.elapsed().as_secs_f64(),
    );
    r.record(
        "agent memory",
        &case,
        "agent RSS",
        "MiB",
        procstat::rss_mib(agent.proc.pid()),
    );
    r.method.push((
        "agent memory".into(),
        "one node, all pods meshed, RSS from /proc after every pod is enrolled".into(),
    ));
}

/// What went wrong: measurements that could not be taken, and series without a single
/// number.
pub fn problems(r: &Results) -> Vec<String> {
    let empty = r
        .series
        .iter()
        .filter(|s| !s.values.iter().any(|v| v.is_finite()))
        .map(|s| format!("no numbers for {} / {} / {}", s.group, s.case, s.metric));
    r.failures.iter().cloned().chain(empty).collect()
}
