//! `cargo xtask`: the project's own commands. `setup` installs what a fresh machine lacks;
//! `test` and `demo` run it first, so a new user needs nothing else.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker, Debian
    /// packages, bpffs). Idempotent.
    Setup,
    /// Build the workspace, eBPF object included.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests and the end-to-end tests on a simulated cluster (root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Show two nodes with pods talking through their agents, explained as it goes (root).
    Demo,
    /// Measure weft against the direct path and a sidecar mesh; writes docs/benchmarks.md
    /// (about 10 minutes; root).
    Bench {
        /// About 2 minutes; writes target/bench/ only (the CI smoke run).
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the parsers of untrusted bytes (cargo-fuzz, nightly): each target for a
    /// bounded time, from the seeds in fuzz/seeds/ and what earlier runs found.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build { release } => setup().and_then(|()| build(release)),
        Cmd::Test { args } => setup().and_then(|()| test(&args)),
        Cmd::Demo => setup().and_then(|()| demo()),
        Cmd::Bench { quick } => setup().and_then(|()| bench(quick)),
        Cmd::Fuzz { seconds, targets } => setup().and_then(|()| fuzz(seconds, &targets)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

fn run(mut c: Command) -> anyhow::Result<()> {
    let desc = format!("{c:?}");
    let st = c.status().with_context(|| format!("running {desc}"))?;
    if !st.success() {
        bail!("{desc} failed ({st})");
    }
    Ok(())
}

fn output(c: &mut Command) -> Option<String> {
    let o = c.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Debian packages the tests, the demo and the agent use: `ip` (iproute2), curl, dig, wrk
/// and h2load (nghttp2-client) as pod clients written by others, bpftool to look at the
/// datapath by hand.
const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "dnsutils",
    "bpftool",
    "wrk",
    "nghttp2-client",
    // A foreign HBONE client (hyper-h2 on Python's ssl) and captures of the node link.
    "python3-h2",
    "tshark",
    "openssl",
    // A real Prometheus server scrapes the agents in the observability tests.
    "prometheus",
];

/// bpf-linker's version, pinned: it must link against the same LLVM major as the nightly
/// rustc that builds ebpf/, and this one was verified with LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn setup() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    let mut step = |name: &str, r: anyhow::Result<&'static str>| match r {
        Ok(what) => println!("setup: {name}: {what}"),
        Err(e) => {
            println!("setup: {name}: FAILED: {e:#}");
            failed.push(name.to_owned());
        }
    };
    step("nightly toolchain with rust-src", nightly());
    step("bpf-linker", bpf_linker());
    step("Debian packages", debian());
    step("bpffs at /sys/fs/bpf", bpffs());
    step("PyPI packages", pypi());
    if !failed.is_empty() {
        bail!("setup could not provide: {}", failed.join(", "));
    }
    Ok(())
}

/// Python packages the tests use, installed for `python3` into target/pypi (the tests put
/// it on PYTHONPATH): the OpenTelemetry project's OTLP protobuf bindings, with which
/// tests/peers/otlp_receiver.py decodes the spans the agent exports, and
/// kubernetes-validate (with jsonschema), with which deploy/validate.py checks every
/// manifest against the Kubernetes API schemas, and grpcio, the gRPC project's own stack,
/// as GRPCRoutes' client and server (tests/peers/grpc_peer.py). Pinned: tests compare
/// exact answers, and a new release should be taken on purpose.
const PYPI_PACKAGES: &[&str] = &[
    "opentelemetry-proto==1.45.2",
    "kubernetes-validate==1.37.0",
    "grpcio==1.85.4",
];

fn pypi() -> anyhow::Result<&'static str> {
    let dir = workspace().join("target/pypi");
    let present = output(Command::new("python3").env("PYTHONPATH", &dir).args([
        "-c",
        "import opentelemetry.proto.collector.trace.v1.trace_service_pb2, kubernetes_validate, jsonschema, grpc",
    ]))
    .is_some();
    if present {
        return Ok("present");
    }
    run({
        let mut c = Command::new("python3");
        c.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--target",
        ])
        .arg(&dir)
        .args(PYPI_PACKAGES);
        c
    })?;
    Ok("installed")
}

fn nightly() -> anyhow::Result<&'static str> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok("present"),
        Some(_) => {
            run({
                let mut c = Command::new("rustup");
                c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
                c
            })?;
            Ok("installed rust-src")
        }
        None => {
            run({
                let mut c = Command::new("rustup");
                c.args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ]);
                c
            })?;
            Ok("installed the nightly toolchain")
        }
    }
}

fn bpf_linker() -> anyhow::Result<&'static str> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok("present");
    }
    // bpf-linker must use the nightly rustc's own LLVM: point LLVM_PREFIX at a directory
    // of links to rustc's libLLVM. It has to last: the binary's rpath refers to it.
    let vv =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in rustc +nightly -vV")?
        .to_owned();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("nightly sysroot")?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", libdir.display()))?;
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    let prefix = home.join("weft-llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in [
        lib.file_name().expect("file name").to_owned(),
        "libLLVM.so".into(),
    ] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    run({
        let mut c = Command::new("cargo");
        c.args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix);
        c
    })?;
    Ok("installed (about two minutes, once)")
}

fn debian() -> anyhow::Result<&'static str> {
    debian_packages(DEB_PACKAGES)
}

/// Install whichever of `packages` are missing.
fn debian_packages(packages: &[&str]) -> anyhow::Result<&'static str> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok("present");
    }
    if !is_root() {
        bail!(
            "missing {} and not root: run `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run({
        let mut c = Command::new("apt-get");
        c.args(["update", "-qq"]);
        c
    })?;
    run({
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    })?;
    Ok("installed")
}

fn bpffs() -> anyhow::Result<&'static str> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    if info
        .lines()
        .any(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf "))
    {
        return Ok("mounted");
    }
    if !is_root() {
        return Ok("not mounted (needs root; the agent mounts it itself when it starts)");
    }
    run({
        let mut c = Command::new("mount");
        c.args(["-t", "bpf", "bpf", "/sys/fs/bpf"]);
        c
    })?;
    Ok("mounted now")
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(c)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    build(false)?;
    if !is_root() {
        println!(
            "\nxtask: NOT ROOT: the end-to-end tests will print SKIPPED and not run. \
             Run `sudo -E cargo xtask test` to run them.\n"
        );
    }
    let mut c = cargo();
    c.args(["test", "--workspace"]).args(args);
    c.stdout(std::process::Stdio::piped());
    let desc = format!("{c:?}");
    let mut child = c.spawn().with_context(|| format!("running {desc}"))?;
    // Pass cargo's output through and add up its per-binary results, so the run ends with
    // one line that counts every test (cargo's last line is often a doc-test binary's 0).
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| {
                rest.split([';', '.'])
                    .find_map(|part| part.trim().strip_suffix(what)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let st = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !st.success() {
        bail!("{desc} failed ({st})");
    }
    Ok(())
}

/// Tools only the benchmark uses: the sidecar reference (HAProxy, iptables), iperf3.
const BENCH_DEB_PACKAGES: &[&str] = &["haproxy", "iptables", "iperf3"];
/// The load generator, pinned so runs stay comparable: fixed-rate mode with latency
/// correction (no coordinated omission) and JSON output.
const OHA_VERSION: &str = "1.16.0";

fn bench(quick: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF programs: run it as root");
    }
    println!(
        "setup: bench packages: {}",
        debian_packages(BENCH_DEB_PACKAGES)?
    );
    let oha = output(Command::new("oha").arg("--version"));
    if !oha.as_deref().is_some_and(|v| v.contains(OHA_VERSION)) {
        println!("setup: installing oha {OHA_VERSION} (about three minutes, once)");
        run({
            let mut c = Command::new("cargo");
            c.args(["install", "oha", "--locked", "--version", OHA_VERSION]);
            c
        })?;
    }
    build(true)?;
    let root = workspace();
    let mut c = Command::new(root.join("target/release/weft-bench"));
    c.current_dir(&root);
    if quick {
        c.arg("--quick");
    } else {
        c.args(["--report", "docs/benchmarks.md"]);
    }
    run(c)
}

/// cargo-fuzz's version, pinned so a fresh machine builds the same runner.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets (fuzz/fuzz_targets/), each with seeds in fuzz/seeds/<target>/.
const FUZZ_TARGETS: &[&str] = &[
    "http1_framing",
    "client_hello",
    "protocol_detection",
    "tunnel_identity",
    "config_loader",
];

fn fuzz(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    let installed = output(Command::new("cargo").args(["fuzz", "--version"]));
    if !installed.is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute, once)");
        run({
            let mut c = Command::new("cargo");
            c.args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ]);
            c
        })?;
    }
    for t in only {
        if !FUZZ_TARGETS.contains(&t.as_str()) {
            bail!(
                "no fuzz target {t}; the targets are {}",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    let dir = workspace().join("fuzz");
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        println!("fuzz: {target} for {seconds} s");
        // New inputs go to corpus/ (kept between runs, not committed); seeds/ is read.
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut c = Command::new("cargo");
        c.current_dir(&dir)
            // The fuzzed code never loads eBPF: skip building the object.
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes this long is a finding too (a slow parse is a stall).
            .arg("-timeout=20");
        run(c).with_context(|| {
            format!(
                "fuzz target {target} found a failure: the input is in fuzz/artifacts/{target}/"
            )
        })?;
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root (`sudo -E cargo xtask demo`)");
    }
    // The story, not the build: cargo's output (the eBPF build reports every step as a
    // warning line) is shown only if the build fails.
    println!("demo: building weft (a few minutes the first time; quiet unless it fails)");
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    let desc = format!("{c:?}");
    let out = c.output().with_context(|| format!("running {desc}"))?;
    if !out.status.success() {
        std::io::Write::write_all(&mut std::io::stderr(), &out.stderr)?;
        std::io::Write::write_all(&mut std::io::stdout(), &out.stdout)?;
        bail!("{desc} failed ({})", out.status);
    }
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "weft-e2e", "--bin", "weft-demo"]);
    run(c)
}
