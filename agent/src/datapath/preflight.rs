//! Start-up checks: privileges and kernel features the datapath needs. Run before anything
//! is loaded, so a missing piece is reported at once, named, with how to fix it.

use std::path::{Path, PathBuf};

use super::mounts;

/// One missing requirement and how to provide it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: String,
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
#[error("weft-agent cannot start its datapath:\n{}", list(.0))]
pub struct PreflightError(pub Vec<Missing>);

fn list(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(|m| format!("  - {}\n    fix: {}", m.what, m.fix))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the checks found: where cgroup2 and bpffs are.
#[derive(Debug, Clone)]
pub struct Mounts {
    pub cgroup2: PathBuf,
    pub bpffs: PathBuf,
}

/// Check everything, collecting every problem rather than stopping at the first.
pub fn check(bpffs_wanted: &Path, btf_path: &Path) -> Result<Mounts, PreflightError> {
    let mut missing = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    if !root {
        missing.push(Missing {
            what:
                "not running as root: loading eBPF programs, entering pod network namespaces and \
                   binding transparent sockets need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
                    .into(),
            fix:
                "run weft-agent as root (in Kubernetes: the DaemonSet's privileged securityContext)"
                    .into(),
        });
    }
    if !btf_path.exists() {
        missing.push(Missing {
            what: format!("kernel BTF not found at {}", btf_path.display()),
            fix: "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.8)".into(),
        });
    }
    let cgroup2 = match mounts::cgroup2_mount() {
        Ok(Some(p)) => Some(p),
        Ok(None) => {
            missing.push(Missing {
                what: "no cgroup2 filesystem is mounted; cgroup eBPF programs attach to cgroup v2 directories".into(),
                fix: "mount it: `mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with systemd's unified hierarchy)".into(),
            });
            None
        }
        Err(e) => {
            missing.push(Missing {
                what: format!("cannot read /proc/self/mountinfo: {e}"),
                fix: "run the agent with /proc mounted".into(),
            });
            None
        }
    };
    let bpffs = if root {
        match mounts::ensure_bpffs(bpffs_wanted) {
            Ok(p) => Some(p),
            Err(e) => {
                missing.push(Missing {
                    what: format!("bpffs is not mounted at {} and mounting it failed: {e}", bpffs_wanted.display()),
                    fix: format!("mount it: `mount -t bpf bpf {}` (in Kubernetes: a hostPath volume for /sys/fs/bpf)", bpffs_wanted.display()),
                });
                None
            }
        }
    } else {
        None
    };
    match (cgroup2, bpffs) {
        (Some(cgroup2), Some(bpffs)) if missing.is_empty() => Ok(Mounts { cgroup2, bpffs }),
        _ => Err(PreflightError(missing)),
    }
}
