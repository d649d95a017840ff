//! weft-cni: a chained CNI plugin (CNI specification 1.1, also 0.3.0-1.0.0) that hands a
//! new pod's network namespace to the node's weft agent. It runs after the network
//! plugin that gave the pod its interface and address, passes that plugin's result on
//! unchanged, and records the pod sandbox in the agent's state directory, then tells the
//! agent over its Unix socket. With no agent running, ADD still succeeds: the record
//! waits in the directory and the agent enrolls the pod when it starts.
//!
//! Invoked by the container runtime: `CNI_COMMAND` (ADD, DEL, CHECK, VERSION, GC,
//! STATUS), `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` (`K8S_POD_NAMESPACE`,
//! `K8S_POD_NAME`, `K8S_POD_UID`) in the environment; the network configuration (with
//! `prevResult`, `runtimeConfig.cgroupPath` when the runtime passes it, and weft's own
//! `stateDir`) on standard input; the result or an error on standard output.
//!
//! `weft-cni install` is the node installer (the DaemonSet's init container): it copies
//! the binary into the CNI bin directory and appends weft-cni to the node's CNI network
//! configuration, the first one in name order, which is the one runtimes use; `weft-cni
//! uninstall` takes both out again.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::{json, Value};
use weft_agent::cni::{self, Record};

const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: its well-known code, message and details.
struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: &str, details: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.to_owned(),
        details: details.into(),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `K8S_POD_NAME=x;K8S_POD_NAMESPACE=y` -> the value of `key`.
fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(verb @ ("install" | "uninstall")) = argv.first().map(String::as_str) {
        return match install::run(verb == "install", &argv[1..]) {
            Ok(said) => {
                println!("{said}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-cni {verb}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        println!(
            "{}",
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED})
        );
        return ExitCode::SUCCESS;
    }
    let mut input = String::new();
    let config: Value = match std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&input).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            return answer(
                &Value::Null,
                Err(fail(
                    6,
                    "the network configuration on standard input is not JSON",
                    e,
                )),
            )
        }
    };
    let version = config["cniVersion"].as_str().unwrap_or("1.1.0").to_owned();
    if !SUPPORTED.contains(&version.as_str()) {
        return answer(
            &config,
            Err(fail(
                1,
                "incompatible CNI version",
                format!("{version} is not one of {:?}", SUPPORTED),
            )),
        );
    }
    let dir = config["stateDir"]
        .as_str()
        .map_or_else(|| PathBuf::from(cni::DEFAULT_DIR), PathBuf::from);
    let outcome = match command.as_str() {
        "ADD" => add(&config, &dir),
        "DEL" => del(&dir),
        "CHECK" => check(&dir),
        "GC" => gc(&config, &dir),
        "STATUS" => Ok(None),
        "" => Err(fail(
            4,
            "CNI_COMMAND is not set",
            "run by a container runtime, as the CNI specification says",
        )),
        other => Err(fail(4, "unknown CNI_COMMAND", other)),
    };
    answer(&config, outcome)
}

/// Print the result (or nothing) or the error, and exit as the specification says.
fn answer(config: &Value, outcome: Result<Option<Value>, Failure>) -> ExitCode {
    let version = config["cniVersion"].as_str().unwrap_or("1.1.0");
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => {
            println!(
                "{}",
                json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details})
            );
            ExitCode::FAILURE
        }
    }
}

fn container_id() -> Result<String, Failure> {
    env("CNI_CONTAINERID").ok_or_else(|| fail(4, "CNI_CONTAINERID is not set", ""))
}

fn add(config: &Value, dir: &Path) -> Result<Option<Value>, Failure> {
    let args = env("CNI_ARGS").unwrap_or_default();
    let record = Record {
        container_id: container_id()?,
        netns: env("CNI_NETNS").map(PathBuf::from).ok_or_else(|| {
            fail(
                4,
                "CNI_NETNS is not set",
                "ADD needs the pod's network namespace",
            )
        })?,
        pod_namespace: cni_arg(&args, "K8S_POD_NAMESPACE").unwrap_or_default(),
        pod_name: cni_arg(&args, "K8S_POD_NAME").unwrap_or_default(),
        pod_uid: cni_arg(&args, "K8S_POD_UID"),
        cgroup: config["runtimeConfig"]["cgroupPath"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(PathBuf::from),
        added: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    record
        .check()
        .map_err(|e| fail(4, "the pod sandbox cannot be recorded", e))?;
    cni::write(dir, &record).map_err(|e| {
        fail(
            100,
            "cannot record the pod for the weft agent",
            format!("{}: {e}", dir.display()),
        )
    })?;
    // The record is what counts; without an agent listening the pod waits for one.
    if let Err(e) = cni::notify(dir, &format!("ADD {}", record.container_id)) {
        eprintln!(
            "weft-cni: the agent was not told ({e}); it enrolls {}/{} when it starts",
            record.pod_namespace, record.pod_name
        );
    }
    // A chained plugin passes the result of the one before it on unchanged.
    let mut result = match &config["prevResult"] {
        Value::Object(_) => config["prevResult"].clone(),
        _ => json!({"interfaces": [], "ips": [], "dns": {}}),
    };
    result["cniVersion"] = json!(config["cniVersion"].as_str().unwrap_or("1.1.0"));
    Ok(Some(result))
}

fn del(dir: &Path) -> Result<Option<Value>, Failure> {
    let id = container_id()?;
    cni::remove(dir, &id).map_err(|e| {
        fail(
            100,
            "cannot remove the pod's record",
            format!("{}: {e}", dir.display()),
        )
    })?;
    let _ = cni::notify(dir, &format!("DEL {id}"));
    Ok(None)
}

fn check(dir: &Path) -> Result<Option<Value>, Failure> {
    let id = container_id()?;
    let path = dir.join(format!("{id}.json"));
    let record: Record = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            fail(
                100,
                "the pod is not recorded for the weft agent",
                path.display().to_string(),
            )
        })?;
    if env("CNI_NETNS").is_some_and(|n| Path::new(&n) != record.netns) {
        return Err(fail(
            100,
            "the pod's record names another network namespace",
            record.netns.display().to_string(),
        ));
    }
    Ok(None)
}

/// Remove the records of sandboxes the runtime no longer has.
fn gc(config: &Value, dir: &Path) -> Result<Option<Value>, Failure> {
    let valid: Vec<&str> = config["cni.dev/valid-attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["containerID"].as_str())
        .collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".json") {
            if !valid.contains(&id) {
                let _ = cni::remove(dir, id);
            }
        }
    }
    let _ = cni::notify(dir, "GC");
    Ok(None)
}

mod install {
    use std::path::{Path, PathBuf};

    use serde_json::{json, Value};

    struct Options {
        bin_dir: PathBuf,
        conf_dir: PathBuf,
        state_dir: PathBuf,
        wait: std::time::Duration,
    }

    fn options(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            bin_dir: PathBuf::from("/opt/cni/bin"),
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            state_dir: PathBuf::from(weft_agent::cni::DEFAULT_DIR),
            wait: std::time::Duration::from_secs(300),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--cni-bin-dir" => o.bin_dir = value.into(),
                "--cni-conf-dir" => o.conf_dir = value.into(),
                "--state-dir" => o.state_dir = value.into(),
                "--wait-seconds" => {
                    o.wait = std::time::Duration::from_secs(
                        value
                            .parse()
                            .map_err(|_| format!("--wait-seconds {value:?}: not a number"))?,
                    )
                }
                other => {
                    return Err(format!(
                        "unknown option {other}; expected --cni-bin-dir, --cni-conf-dir, --state-dir, --wait-seconds"
                    ))
                }
            }
        }
        Ok(o)
    }

    /// The network configuration the runtime uses: the first `.conflist`, `.conf` or
    /// `.json` file in name order.
    fn primary(dir: &Path) -> Option<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        files.into_iter().next()
    }

    /// Write `text` to `path` through a temporary file and a rename, so a runtime reading
    /// the directory never sees half a file.
    fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = path.with_extension("weft-tmp");
        std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn run(install: bool, args: &[String]) -> Result<String, String> {
        let o = options(args)?;
        let deadline = std::time::Instant::now() + o.wait;
        // The primary network plugin may install its configuration after this runs.
        let conf = loop {
            match primary(&o.conf_dir) {
                Some(p) => break p,
                None if !install => {
                    return Ok(format!("no CNI configuration in {}", o.conf_dir.display()))
                }
                None if std::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "no CNI network configuration appeared in {} within {:?}: weft-cni chains after the cluster's network plugin",
                        o.conf_dir.display(),
                        o.wait
                    ))
                }
                None => std::thread::sleep(std::time::Duration::from_secs(1)),
            }
        };
        let text =
            std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not JSON: {e}", conf.display()))?;
        // A single-plugin `.conf` becomes a list, as chaining needs.
        let mut target = conf.clone();
        if v.get("plugins").is_none() {
            let mut plugin = v.clone();
            let m = plugin
                .as_object_mut()
                .ok_or("the configuration is not an object")?;
            m.remove("name");
            m.remove("cniVersion");
            v = json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [plugin]});
            target = conf.with_extension("conflist");
        }
        let plugins = v["plugins"]
            .as_array_mut()
            .ok_or_else(|| format!("{}: `plugins` is not a list", conf.display()))?;
        plugins.retain(|p| p["type"] != "weft-cni");
        let said = if install {
            plugins.push(json!({
                "type": "weft-cni",
                "stateDir": o.state_dir,
                "capabilities": {"cgroupPath": true}
            }));
            let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
            let bytes = std::fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
            std::fs::create_dir_all(&o.bin_dir)
                .map_err(|e| format!("{}: {e}", o.bin_dir.display()))?;
            write_atomic(&o.bin_dir.join("weft-cni"), &bytes, 0o755)?;
            format!(
                "installed {} and chained weft-cni in {}",
                o.bin_dir.join("weft-cni").display(),
                target.display()
            )
        } else {
            let _ = std::fs::remove_file(o.bin_dir.join("weft-cni"));
            format!("removed weft-cni from {}", target.display())
        };
        let mut out = serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?;
        out.push(b'\n');
        write_atomic(&target, &out, 0o644)?;
        if target != conf {
            std::fs::remove_file(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        }
        Ok(said)
    }
}
