//! A simulated cluster on one machine, for weft's end-to-end tests and its demo.
//!
//! Every node is a network namespace running its own `weft-agent`; every pod is a network
//! namespace wired to its node's bridge with a veth pair, and a cgroup under its node's
//! cgroup. Nodes are joined by a fabric namespace. Nothing has a default route: the only
//! addresses that exist are the ones this harness made, so traffic that escapes capture
//! fails inside the namespaces instead of leaving the machine. Everything created is
//! removed when the [`Cluster`] is dropped, also when a test panics.
//!
//! Address plan: node `i` (1-based) is 192.168.250.i on the fabric and has pod CIDR
//! 10.244.i.0/24 (bridge 10.244.i.1); its pods get 10.244.i.10, .11, ...; services live in
//! 10.96.0.0/16, which no namespace routes.

pub mod bench;
mod cluster;
pub mod kube_api;
mod proc;

pub use cluster::{Cluster, ClusterBuilder, Node, Pod, PodSpec, ServiceSpec};
pub use proc::{run_checked, Agent, Spawned};

/// True when running as root. End-to-end tests need it; see [`require_root`].
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns false (after saying so loudly) when the test cannot run because this is not
/// root. With `WEFT_E2E_REQUIRED=1` (set by CI) a skip is a failure instead.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let msg = format!(
        "SKIPPED: end-to-end test `{test}` needs root (network namespaces, cgroups, eBPF). \
         Run `cargo xtask test` as root to run it."
    );
    if std::env::var_os("WEFT_E2E_REQUIRED").is_some_and(|v| v == "1") {
        panic!("{msg} (WEFT_E2E_REQUIRED=1 makes this a failure)");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n{msg}\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    false
}

/// Directory holding the workspace's built binaries (next to the test executable's `deps/`),
/// or `WEFT_BIN_DIR`.
pub fn bin_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("WEFT_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Path of a workspace binary, with a clear message if it was not built.
pub fn bin(name: &str) -> std::path::PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        p.display()
    );
    p
}

/// `curl` a URL from inside a pod and parse the test server's JSON answer
/// (`{"server": NAME, "peer": "IP:PORT"}`). Err carries curl's exit status and stderr.
pub fn http_get(pod: &Pod, url: &str) -> Result<serde_json::Value, String> {
    let out = pod.run(
        "curl",
        &["-sS", "--max-time", "5", url],
        std::time::Duration::from_secs(8),
    );
    if !out.status.success() {
        return Err(format!(
            "curl {url} from {}: {} {}",
            pod.spec.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("bad answer {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

/// The IP part of the test server's `peer` field.
pub fn peer_ip(answer: &serde_json::Value) -> String {
    answer["peer"]
        .as_str()
        .unwrap_or_default()
        .rsplit_once(':')
        .map(|(ip, _)| ip.to_owned())
        .unwrap_or_default()
}
