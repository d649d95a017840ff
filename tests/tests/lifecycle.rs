//! End to end: the agent's life cycle. What pods experience when it is killed, how a
//! restarted agent adopts the pinned datapath, restarts that refuse no connection, and
//! refusing to start without what it needs.

use std::{
    os::unix::process::CommandExt as _,
    process::Command,
    time::{Duration, Instant},
};

use weft_e2e::{bin, http_get, peer_ip, require_root, Cluster, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

fn served(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("served ")).count()
}

#[test]
fn killed_agent_fails_closed_or_open_and_a_new_one_adopts_the_datapath() {
    if !require_root("killed_agent_fails_closed_or_open_and_a_new_one_adopts_the_datapath") {
        return;
    }
    let c = Cluster::builder("sigkill")
        .node("a")
        .pod(PodSpec::new("closed", "a"))
        .pod(PodSpec::new("open", "a").fail_open())
        .pod(PodSpec::new("plain", "a").unmeshed())
        .pod(PodSpec::new("web", "a").label("app", "web").port(8080))
        .pod(
            PodSpec::new("web-open", "a")
                .label("app", "web-open")
                .port(8080)
                .fail_open(),
        )
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("web-open", "10.96.0.11")
                .select("app", "web-open")
                .tcp(80, 8080),
        )
        .build();
    let tp = bin("weft-testpod");
    let srv = c
        .pod("web")
        .spawn(&c.dir, &tp, &["http-server", "8080", "web"]);
    let srv_open = c
        .pod("web-open")
        .spawn(&c.dir, &tp, &["http-server", "8080", "web-open"]);
    c.pod("web").wait_listening(8080, SECS5);
    c.pod("web-open").wait_listening(8080, SECS5);
    let mut agent = c.start_agent("a", &[]);
    for (client, url) in [
        ("closed", "http://10.96.0.10/"),
        ("open", "http://10.96.0.11/"),
    ] {
        let a = http_get(c.pod(client), url).expect("works with the agent");
        assert_eq!(peer_ip(&a), c.pod(client).ip);
    }

    agent.proc.kill(); // SIGKILL: no cleanup of any kind runs.
    let before = served(&srv.output());

    // Fail-closed (the default): the connect is refused, nothing reaches the server.
    let err = http_get(c.pod("closed"), "http://10.96.0.10/").expect_err("fail-closed refuses");
    assert!(err.contains("curl"), "{err}");
    // Inbound likewise: a direct connection to the fail-closed server pod is refused
    // rather than handed to the app unproxied.
    let web_ip = &c.pod("web").ip;
    http_get(c.pod("plain"), &format!("http://{web_ip}:8080/"))
        .expect_err("inbound fail-closed refuses");
    assert_eq!(
        served(&srv.output()),
        before,
        "nothing reached the server while the agent was down"
    );

    // Fail-open (each pod's posture covers its own direction: the client's outbound, the
    // server's inbound): the connect goes straight to an endpoint and is let in.
    let open_before = served(&srv_open.output());
    let a =
        http_get(c.pod("open"), "http://10.96.0.11/").expect("fail-open falls back to socket LB");
    assert_eq!(
        (a["server"].as_str(), peer_ip(&a)),
        (Some("web-open"), c.pod("open").ip.clone())
    );
    let open_ip = &c.pod("web-open").ip;
    http_get(c.pod("plain"), &format!("http://{open_ip}:8080/"))
        .expect("inbound fail-open lets it in");
    assert_eq!(served(&srv_open.output()), open_before + 2);

    // A new agent adopts the pinned programs and maps and captures again.
    let t0 = Instant::now();
    let mut agent = c.spawn_agent("a", &[]);
    let status = agent.wait_ready(Duration::from_secs(10));
    let ready = t0.elapsed();
    let a = loop {
        match http_get(c.pod("closed"), "http://10.96.0.10/") {
            Ok(a) => break a,
            Err(e) => assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no capture after restart: {e}"
            ),
        }
    };
    let capturing = t0.elapsed();
    eprintln!(
        "restart: agent ready after {ready:?} (it reports {} ms from exec to capturing); first captured request served after {capturing:?}",
        status["startup_ms"]
    );
    assert_eq!(
        status["attachment"], "adopted",
        "the pinned links were kept, not re-attached"
    );
    assert!(
        status["startup_ms"].as_u64().unwrap() < 2000,
        "capturing within 2 s: {status}"
    );
    assert_eq!(peer_ip(&a), c.pod("closed").ip);
    assert!(
        agent.stat("proxy", "outbound_accepted") >= 1,
        "the request went through the new agent"
    );

    // What happened while no agent ran is counted and reported.
    let down = &status["while_agent_down"];
    assert!(down["fail_closed_refused"].as_u64().unwrap() >= 1, "{down}");
    assert!(down["fail_open_bypass"].as_u64().unwrap() >= 1, "{down}");
    assert!(down["inbound_refused"].as_u64().unwrap() >= 1, "{down}");
    assert!(down["inbound_bypass"].as_u64().unwrap() >= 1, "{down}");
    assert!(agent
        .proc
        .output()
        .contains("bypassed the mesh while no agent ran"));
}

#[test]
fn graceful_restart_refuses_no_connection() {
    if !require_root("graceful_restart_refuses_no_connection") {
        return;
    }
    let c = Cluster::builder("handoff")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("web", "a").label("app", "web").port(8080))
        .pod(PodSpec::new("web2", "b").label("app", "web").port(8080))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let tp = bin("weft-testpod");
    let _s1 = c
        .pod("web")
        .spawn(&c.dir, &tp, &["http-server", "8080", "web"]);
    let _s2 = c
        .pod("web2")
        .spawn(&c.dir, &tp, &["http-server", "8080", "web2"]);
    c.pod("web").wait_listening(8080, SECS5);
    c.pod("web2").wait_listening(8080, SECS5);
    let mut old = c.start_agent("a", &[]);
    let _b = c.start_agent("b", &[]);

    // Back-to-back new connections for 4 s while node a's agent is replaced.
    let mut load = c
        .pod("client")
        .spawn(&c.dir, &tp, &["http-loop", "10.96.0.10:80", "4000"]);
    std::thread::sleep(Duration::from_millis(800));
    old.proc.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let new = c.start_agent("a", &[]);
    let status = new.admin("/status").expect("status");
    assert!(
        status["inherited_listeners"].as_u64().unwrap() == 5,
        "took over the pods' listeners (two per pod) and the node's tunnel listener: {status}"
    );
    let exit = old
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("the old agent drains and exits");
    assert!(exit.success(), "old agent: {exit}");

    let result = load
        .wait_exit(Duration::from_secs(20))
        .expect("load finishes");
    let out = load.output();
    assert!(
        result.success(),
        "connections failed during the restart: {out}"
    );
    let ok: u64 = out
        .trim()
        .strip_prefix("ok=")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok >= 50, "too little load to mean anything: {out}");
    assert!(
        new.stat("proxy", "outbound_accepted") > 0,
        "the new agent served after taking over"
    );
    eprintln!("graceful restart: {out}");
}

#[test]
fn graceful_restart_drains_keepalive_http1_and_http2_without_a_failed_request() {
    if !require_root("graceful_restart_drains_keepalive_http1_and_http2_without_a_failed_request") {
        return;
    }
    let c = Cluster::builder("handoff-keepalive")
        .node("a")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("web", "a").label("app", "web").port(8080))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let tp = bin("weft-testpod");
    let _srv = c
        .pod("web")
        .spawn(&c.dir, &tp, &["h2-server", "8080", "web", "64"]);
    c.pod("web").wait_listening(8080, SECS5);
    let mut old = c.start_agent("a", &[]);
    let client = c.pod("client");
    // Keep-alive HTTP/1.1 from wrk, HTTP/2 from h2load and from a pooled hyper client,
    // for 6 s.
    let mut wrk = client.spawn(
        &c.dir,
        std::path::Path::new("/usr/bin/wrk"),
        &["-t1", "-c4", "-d6s", "http://10.96.0.10/"],
    );
    let mut h2 = client.spawn(&c.dir, &tp, &["h2-load", "10.96.0.10:80", "6000", "4"]);
    let mut h2load = client.spawn(
        &c.dir,
        std::path::Path::new("/usr/bin/h2load"),
        &["-c2", "-m4", "-D", "6", "http://10.96.0.10/"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    old.proc.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let new = c.start_agent("a", &[]);
    let exit = old
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("the old agent drains and exits");
    let drained_in = t0.elapsed();
    assert!(exit.success(), "old agent: {exit}");
    // The drain timeout is 20 s: keep-alive clients were told to go, not cut off.
    assert!(
        drained_in < Duration::from_secs(8),
        "the old agent took {drained_in:?} to drain:\n{}",
        old.proc.output()
    );
    wrk.wait_exit(Duration::from_secs(20))
        .expect("wrk finishes");
    h2.wait_exit(Duration::from_secs(20))
        .expect("h2-load finishes");
    h2load
        .wait_exit(Duration::from_secs(20))
        .expect("h2load finishes");
    let h2load_out = h2load.output();
    let summary = h2load_out
        .lines()
        .find(|l| l.starts_with("requests: "))
        .unwrap_or_default();
    let count = |line: &str, what: &str| -> u64 {
        line.split(", ")
            .find_map(|p| p.trim_start_matches("requests: ").strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(u64::MAX)
    };
    let (succeeded, failed, errored) = (
        count(summary, " succeeded"),
        count(summary, " failed"),
        count(summary, " errored"),
    );
    // Every answer h2load got was a success, and nothing timed out. h2load counts as
    // failed the requests it had queued and could no longer start once GOAWAY arrived
    // (nghttp2 refuses new streams after it; h2load does not retry them elsewhere), at
    // most its streams per connection (-m4) for each of its two connections. The pooled
    // hyper client above retries those on a new connection and shows no failure at all.
    let codes = h2load_out
        .lines()
        .find(|l| l.starts_with("status codes: "))
        .unwrap_or_default();
    assert!(
        codes.contains(" 0 4xx, 0 5xx") && summary.ends_with(" 0 timeout"),
        "h2load got failing answers during the restart:\n{h2load_out}"
    );
    assert!(
        failed == errored && failed <= 2 * 4,
        "h2load lost more than the requests it could not start after GOAWAY:\n{h2load_out}"
    );
    assert!(
        succeeded > 500 && succeeded != u64::MAX,
        "too little HTTP/2 load from h2load:\n{h2load_out}"
    );
    let wrk_out = wrk.output();
    eprintln!("wrk:\n{wrk_out}\nh2-load: {}", h2.output());
    assert!(
        !wrk_out.contains("Socket errors") && !wrk_out.contains("Non-2xx"),
        "HTTP/1.1 requests failed during the restart:\n{wrk_out}"
    );
    let requests: u64 = wrk_out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        requests > 500,
        "too little HTTP/1.1 load to mean anything:\n{wrk_out}"
    );
    let h2: serde_json::Value = serde_json::from_str(h2.output().trim()).expect("h2-load JSON");
    assert_eq!(
        (h2["failed"].as_u64(), h2["non_200"].as_u64()),
        (Some(0), Some(0)),
        "HTTP/2 requests failed during the restart: {h2}"
    );
    assert!(h2["ok"].as_u64().unwrap() > 500, "{h2}");
    assert!(
        new.stat("proxy", "outbound_accepted") > 0,
        "the new agent took over"
    );
}

#[test]
fn an_agent_out_of_file_descriptors_recovers_and_still_hands_over() {
    if !require_root("an_agent_out_of_file_descriptors_recovers_and_still_hands_over") {
        return;
    }
    let c = Cluster::builder("nofile")
        .node("a")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("echo", "a").label("app", "echo").port(7000))
        .service(
            ServiceSpec::new("echo", "10.96.6.1")
                .select("app", "echo")
                .tcp(7, 7000),
        )
        .build();
    let tp = bin("weft-testpod");
    let _echo = c.pod("echo").spawn(&c.dir, &tp, &["echo-server", "7000"]);
    c.pod("echo").wait_listening(7000, SECS5);
    // A connection limit above what the descriptors allow, so they run out first.
    let mut old = c.start_agent_with_open_files("a", &["--max-connections", "100000"], 150);
    let status = old.admin("/status").unwrap();
    assert_eq!(status["limits"]["open_files"], 150, "{status}");
    // Far more connections than 150 descriptors allow, held for a while.
    let mut holder =
        c.pod("client")
            .spawn(&c.dir, &tp, &["hold-many", "10.96.6.1:7", "300", "1500"]);
    holder
        .wait_exit(Duration::from_secs(60))
        .expect("the holder finishes");
    let held: serde_json::Value = serde_json::from_str(holder.output().trim()).unwrap();
    assert!(
        held["echoed"].as_u64().unwrap() < 150,
        "the descriptors ran out: {held}"
    );
    // Once the connections are gone, everything answers again: the admin API ...
    let deadline = Instant::now() + Duration::from_secs(10);
    let errors = loop {
        if let Ok(v) = old.admin("/stats") {
            break v["proxy"]["accept_errors"].as_u64().unwrap_or(0);
        }
        assert!(Instant::now() < deadline, "the admin API never came back");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(errors > 0, "accepting failed while out of descriptors");
    // ... the proxy ...
    let out = c.pod("client").run(
        &tp.display().to_string(),
        &["echo-client", "10.96.6.1:7", "1000"],
        SECS5,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the handoff socket: a new agent takes the listeners over.
    old.proc.signal(libc::SIGTERM);
    let new = c.start_agent("a", &[]);
    assert!(
        new.admin("/status").unwrap()["inherited_listeners"]
            .as_u64()
            .unwrap()
            >= 3,
        "took over the listeners"
    );
    // Nothing was left hanging: the old agent drains well within its 20 s.
    assert!(old.proc.wait_exit(Duration::from_secs(10)).is_some());
}

/// Run the agent with `setup` applied in the child; expect a quick failure naming `what`.
fn refuses(args: &[&str], what: &str, setup: impl Fn(&mut Command)) {
    refuses_with(&bin("weft-agent"), args, what, setup);
}

fn refuses_with(agent: &std::path::Path, args: &[&str], what: &str, setup: impl Fn(&mut Command)) {
    let mut cmd = Command::new(agent);
    cmd.args([
        "run",
        "--node",
        "n",
        "--config",
        "/nonexistent/config.yaml",
        "--cgroup",
        "weft-none",
    ])
    .args(args);
    setup(&mut cmd);
    let t0 = Instant::now();
    // A binary copied just now can be briefly busy: another test thread may fork while
    // the copy's descriptor is open, and its child holds it until it execs.
    let mut tries = 0;
    let out = loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            r => break r.expect("run weft-agent"),
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway: {stderr}");
    assert!(t0.elapsed() < SECS5, "took {:?} to give up", t0.elapsed());
    assert!(stderr.contains(what), "expected {what:?} in:\n{stderr}");
    assert!(stderr.contains("fix:"), "says how to fix it:\n{stderr}");
}

#[test]
fn agent_refuses_to_start_without_what_it_needs() {
    if !require_root("agent_refuses_to_start_without_what_it_needs") {
        return;
    }
    // The unprivileged run needs a copy of the binary it can reach: the checkout may live
    // under a directory other users cannot enter (a fresh clone under `mktemp -d`).
    let unpriv = std::env::temp_dir().join(format!("weft-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&unpriv).unwrap();
    let agent = unpriv.join("weft-agent");
    std::fs::copy(bin("weft-agent"), &agent).unwrap();
    for p in [&unpriv, &agent] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    refuses_with(&agent, &[], "not running as root", |c| {
        c.uid(65534).gid(65534);
    });
    let _ = std::fs::remove_dir_all(&unpriv);
    refuses(
        &["--btf", "/nonexistent/vmlinux"],
        "kernel BTF not found at /nonexistent/vmlinux",
        |_| {},
    );
    refuses(
        &["--bpffs", "/proc/weft-no-bpffs"],
        "bpffs is not mounted at /proc/weft-no-bpffs",
        |_| {},
    );
    // No cgroup2: a private mount namespace in which it is unmounted.
    let cg2 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?.to_owned();
            post.starts_with("cgroup2 ").then_some(mp)
        })
        .expect("cgroup2 mount");
    refuses(&[], "no cgroup2 filesystem is mounted", move |c| {
        let cg2 = std::ffi::CString::new(cg2.clone()).unwrap();
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let root = c"/";
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::umount2(cg2.as_ptr(), libc::MNT_DETACH) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
}

#[test]
fn pins_of_other_versions_are_removed_once_attached() {
    if !require_root("pins_of_other_versions_are_removed_once_attached") {
        return;
    }
    let c = Cluster::builder("versions")
        .node("a")
        .pod(PodSpec::new("client", "a"))
        .build();
    let node_dir = std::path::Path::new("/sys/fs/bpf/weft").join(&c.node("a").full);
    let old = node_dir.join("v0").join("links");
    std::fs::create_dir_all(&old).expect("mkdir on bpffs");
    let agent = c.start_agent("a", &[]);
    assert!(!node_dir.join("v0").exists(), "the v0 directory is gone");
    let versions: Vec<_> = std::fs::read_dir(&node_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(versions.len(), 1, "one version left: {versions:?}");
    assert!(
        versions[0].join("links/weft_connect4").exists(),
        "this version is pinned"
    );
    assert_eq!(agent.admin("/status").unwrap()["attachment"], "attached");
}

#[test]
fn only_the_agent_itself_can_take_over_the_listeners() {
    if !require_root("only_the_agent_itself_can_take_over_the_listeners") {
        return;
    }
    let c = Cluster::builder("handoff-peer")
        .node("a")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("web", "a").label("app", "web").port(8080))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let _srv = c.serve_http("web", 8080, &[]);
    let agent = c.start_agent("a", &[]);
    let run_dir = agent.admin.parent().unwrap().to_owned();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&run_dir).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "the run directory is private");
    // Root, but another program: it asks for the listeners and gets nothing.
    let handoff = run_dir.join("handoff.sock").display().to_string();
    let ask = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(b"TAKEOVER\n")
    msg, fds, _, _ = socket.recv_fds(s, 64, 4)
    print(len(msg), len(fds))
except (ConnectionResetError, BrokenPipeError):
    print(0, 0)
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", ask, &handoff])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0 0",
        "no listener handed to another program: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not root: not even a connection (the directory is 0700).
    let out = Command::new("/usr/bin/python3")
        .args(["-c", ask, &handoff])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent goes on serving, and says what it refused.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.admin("/status").unwrap()["draining"], false);
    weft_e2e::http_get(c.pod("client"), "http://10.96.0.10/").expect("still serving");
    assert!(
        agent.proc.output().contains("not this agent's executable"),
        "{}",
        agent.proc.output()
    );
}
