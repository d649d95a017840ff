//! Processes of the simulated cluster: programs started inside a pod or node (its netns,
//! and for pods its cgroup), and the agents. Each is ended by its PID when dropped.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A command that will run inside `netns`, and inside `cgroup` if given (moved there before
/// exec, so even its first socket is subject to the cgroup's eBPF programs).
pub(crate) fn command_in(
    netns: &Path,
    cgroup: Option<&Path>,
    program: &Path,
    args: &[&str],
) -> (Command, Vec<File>) {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    let mut keep = vec![];
    let cg = cgroup.map(|c| {
        OpenOptions::new()
            .write(true)
            .open(c.join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", c.display()))
    });
    let ns_fd = ns.as_raw_fd();
    let cg_fd = cg.as_ref().map(|f| f.as_raw_fd());
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cg_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    keep.push(ns);
    keep.extend(cg);
    (cmd, keep)
}

/// A long-running process the harness started; killed (SIGKILL) and reaped on drop.
pub struct Spawned {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Spawned {
    pub(crate) fn start(name: &str, mut cmd: Command, keep: Vec<File>, log: PathBuf) -> Self {
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        drop(keep);
        Self {
            child: Some(child),
            name: name.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Send `sig` to the process (by its PID, which this harness started).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run a command to completion with a time limit; the process is killed at the limit.
pub fn run_checked(mut cmd: Command, keep: Vec<File>, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    drop(keep);
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    child.wait_with_output().expect("wait_with_output")
}

/// A running weft-agent of one node.
pub struct Agent {
    pub proc: Spawned,
    pub node: String,
    pub admin: PathBuf,
}

impl Agent {
    /// `weftctl ARGS` against this agent, whatever its outcome.
    pub fn weftctl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(crate::bin("weftctl"))
            .args(["--admin-socket", &self.admin.display().to_string()])
            .args(args)
            .output()
            .expect("running weftctl")
    }

    /// `weftctl ARGS` against this agent: its standard output; panics if it fails.
    pub fn weftctl(&self, args: &[&str]) -> String {
        let out = self.weftctl_output(args);
        assert!(
            out.status.success(),
            "weftctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One admin API request (`/status`, `/stats`, ...), as JSON.
    pub fn admin(&self, path: &str) -> std::io::Result<serde_json::Value> {
        admin_request(&self.admin, path)
    }

    /// One admin API request as text (`/metrics`), with its status.
    pub fn admin_text(&self, path: &str) -> std::io::Result<(u16, String)> {
        admin_get(&self.admin, path)
    }

    /// Wait until the agent reports ready; panics with its log otherwise.
    pub fn wait_ready(&mut self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.admin("/status") {
                // During a handoff the old agent answers on the same path until the new
                // one takes it over.
                if v["ready"] == true && v["pid"] == self.proc.pid() {
                    return v;
                }
            }
            if !self.proc.is_running() {
                panic!(
                    "agent of {} exited before it was ready:\n{}",
                    self.node,
                    self.proc.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "agent of {} not ready after {timeout:?}:\n{}",
                    self.node,
                    self.proc.output()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Wait until the agent has applied configuration generation `generation`; false if it
    /// has not within `timeout`.
    pub fn wait_config_generation(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let current = self
                .admin("/status")
                .ok()
                .and_then(|s| s["config_generation"].as_u64())
                .unwrap_or(0);
            if current >= generation {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the agent reports a refused configuration change, and return the error;
    /// panics if none comes within `timeout`.
    pub fn wait_config_error(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .admin("/status")
                .ok()
                .and_then(|s| s["last_config_error"].as_str().map(str::to_owned))
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "the agent of {} never reported a refused change",
                self.node
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the agent reports configuration objects it refused, and return them
    /// (`/status` `rejected`); panics if none comes within `timeout`.
    pub fn wait_rejected(&self, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self
                .admin("/status")
                .ok()
                .and_then(|s| s["rejected"].as_array().cloned())
                .filter(|r| !r.is_empty())
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "the agent of {} never reported a refused object",
                self.node
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One counter from `/stats` (`ebpf` or `proxy` section).
    pub fn stat(&self, section: &str, name: &str) -> u64 {
        self.admin("/stats")
            .ok()
            .and_then(|v| v[section][name].as_u64())
            .unwrap_or(0)
    }
}

/// `GET path` on an agent's admin socket (HTTP/1.0, so the answer ends when the agent
/// closes): the status and the body.
pub(crate) fn admin_get(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: weft-agent\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

pub(crate) fn admin_request(socket: &Path, path: &str) -> std::io::Result<serde_json::Value> {
    let (_, body) = admin_get(socket, path)?;
    serde_json::from_str(&body).map_err(std::io::Error::other)
}
