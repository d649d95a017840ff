//! What the `weft-cni` plugin hands the agent: for each pod sandbox the container runtime
//! set up on this node, its network namespace (and cgroup, when the runtime passes it).
//!
//! The plugin writes one record per sandbox into the state directory
//! (`<dir>/<container id>.json`, written atomically) and then tells the agent over the
//! Unix socket `<dir>/agent.sock`; DEL removes the record. The directory is the durable
//! part: records written while no agent ran are read when it starts, so a pod created
//! then is enrolled as soon as there is an agent. The socket only makes it prompt.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::config::Config;

/// The agent's socket in the state directory.
pub const SOCKET: &str = "agent.sock";
/// The default state directory (the installer writes it into the CNI configuration).
pub const DEFAULT_DIR: &str = "/var/run/weft/cni";

/// One pod sandbox, as the plugin saw it at ADD.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub container_id: String,
    pub netns: PathBuf,
    pub pod_namespace: String,
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's cgroup, when the runtime passed `runtimeConfig.cgroupPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Seconds since the epoch at ADD: the newest sandbox of a pod wins.
    pub added: u64,
}

impl Record {
    /// Whether the record can be trusted to name a network namespace: an absolute path,
    /// the shapes container runtimes use.
    pub fn check(&self) -> Result<(), String> {
        let ok_id = !self.container_id.is_empty()
            && self
                .container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok_id {
            return Err(format!(
                "container id {:?} is not usable",
                self.container_id
            ));
        }
        if !self.netns.is_absolute() {
            return Err(format!(
                "netns {} is not an absolute path",
                self.netns.display()
            ));
        }
        if self.pod_namespace.is_empty() || self.pod_name.is_empty() {
            return Err("the pod's namespace and name are required (K8S_POD_NAMESPACE, K8S_POD_NAME in CNI_ARGS)".into());
        }
        Ok(())
    }
}

/// Write a record where the agent will find it (atomically: a temporary file, renamed).
pub fn write(dir: &Path, r: &Record) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(format!("{}.json", r.container_id));
    let tmp = dir.join(format!(".{}.tmp", r.container_id));
    std::fs::write(&tmp, serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, path)
}

/// Remove a sandbox's record; a record that is not there is no error (DEL is idempotent).
pub fn remove(dir: &Path, container_id: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(format!("{container_id}.json"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every record in the directory, by pod (`namespace/name`), the newest sandbox of each.
/// Unreadable or invalid records are skipped and logged once by the caller's choice.
pub fn load(dir: &Path) -> HashMap<String, Record> {
    let mut out: HashMap<String, Record> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Some(r) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| r.check().is_ok())
        else {
            tracing::warn!(path = %p.display(), "skipping an unreadable CNI record");
            continue;
        };
        let key = format!("{}/{}", r.pod_namespace, r.pod_name);
        if out.get(&key).is_none_or(|o| o.added <= r.added) {
            out.insert(key, r);
        }
    }
    out
}

/// Give this node's workloads the network namespaces the plugin recorded, where the
/// configuration names none itself.
pub fn apply(records: &HashMap<String, Record>, cfg: &mut Config, node: &str) {
    for w in cfg.workloads.iter_mut().filter(|w| w.node == node) {
        if w.netns.is_some() {
            continue;
        }
        if let Some(r) = records.get(&w.id()) {
            w.netns = Some(r.netns.clone());
            w.cgroup = w.cgroup.take().or_else(|| r.cgroup.clone());
        }
    }
}

/// Tell the agent a record changed (best effort, one second at most): it answers `ok`.
pub fn notify(dir: &Path, what: &str) -> std::io::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(dir.join(SOCKET))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    writeln!(s, "{what}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    if answer.trim() == "ok" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the agent answered {answer:?}"
        )))
    }
}

/// Listen for the plugin's notices; each wakes `changed`. Every read has a deadline and
/// a size bound, and the socket is the root-only state directory's.
pub fn serve(dir: &Path, changed: std::sync::Arc<tokio::sync::Notify>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let changed = changed.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let read = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::io::BufReader::new(r.take(4096)).read_line(&mut line),
                )
                .await;
                if matches!(read, Ok(Ok(n)) if n > 0) {
                    tracing::debug!(notice = line.trim(), "CNI plugin notice");
                    changed.notify_one();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), w.write_all(b"ok\n")).await;
                }
            });
        }
    });
    Ok(())
}
