//! Zero trust between pods, end to end: the node-to-node tunnel is TLS 1.3 with both
//! workload identities proven, it refuses every peer without the right certificate, the
//! CA signs only for workloads on the asking node, and certificates and the trust root
//! rotate under load without a failed request. The peers here are someone else's code:
//! Python's ssl with hyper-h2 (tests/peers/hbone_client.py), curl, openssl and tshark.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use weft_e2e::{bin, require_root, Cluster, ClusterBuilder, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

/// Nodes a and b, and `client` (identity `client`) on a: the start of most tests here.
fn client_on_a(test: &str) -> ClusterBuilder {
    Cluster::builder(test)
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a").account("client"))
}

/// `web` on b: identity `web`, label `app: web`, port 8080.
fn web_on_b() -> PodSpec {
    PodSpec::new("web", "b")
        .label("app", "web")
        .port(8080)
        .account("web")
}

fn identity(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// The name a client asks for to reach workload identity `sa` (its certificate's DNS name).
fn server_name(sa: &str) -> String {
    format!("{sa}.default.sa.cluster.local")
}

fn weft_ca(args: &[&str]) -> String {
    let out = Command::new(bin("weft-ca"))
        .args(args)
        .output()
        .expect("weft-ca");
    assert!(
        out.status.success(),
        "weft-ca {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Credentials for `id` from the CA in `ca`, in `dir/name` (cert.pem, key.pem).
fn issue(ca: &Path, id: &str, dir: &Path, name: &str, ttl: &str) -> PathBuf {
    let out = dir.join(name);
    weft_ca(&[
        "issue",
        "--dir",
        &ca.display().to_string(),
        "--identity",
        id,
        "--out",
        &out.display().to_string(),
        "--ttl",
        ttl,
    ]);
    out
}

/// The tunnel as a foreign client sees it, from node `from`'s netns.
struct Hbone<'a> {
    c: &'a Cluster,
    from: &'a str,
    connect: String,
}

impl Hbone<'_> {
    /// Ask for `target` as `source`, proving `creds` (`(cert, key)`), naming `sni`.
    fn ask(
        &self,
        creds: Option<(PathBuf, PathBuf)>,
        sni: &str,
        target: &str,
        source: &str,
    ) -> serde_json::Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/hbone_client.py");
        let bundle = self.c.ca_dir().join("bundle.pem").display().to_string();
        let mut args = vec![
            script.display().to_string(),
            "--connect".into(),
            self.connect.clone(),
            "--sni".into(),
            sni.into(),
            "--ca".into(),
            bundle,
            "--target".into(),
            target.into(),
            "--source".into(),
            source.into(),
            "--send".into(),
            "GET / HTTP/1.1\\r\\nhost: web\\r\\nconnection: close\\r\\n\\r\\n".into(),
        ];
        if let Some((cert, key)) = creds {
            args.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self
            .c
            .node(self.from)
            .run("/usr/bin/python3", &args, Duration::from_secs(15));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "hbone_client printed {text:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

fn pair(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    Some((dir.join("cert.pem"), dir.join("key.pem")))
}

#[test]
fn node_to_node_traffic_is_tls13_and_carries_no_plaintext() {
    if !require_root("node_to_node_traffic_is_tls13_and_carries_no_plaintext") {
        return;
    }
    let c = client_on_a("mtls-wire")
        .pod(web_on_b())
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let _web = c.serve_http("web", 8080, &[]);
    let _a = c.start_agent("a", &[]);
    let b = c.start_agent("b", &[]);

    // Capture node a's link to the other nodes while a request crosses it.
    let pcap = c.dir.join("link.pcapng");
    let pcap_s = pcap.display().to_string();
    let mut cap = c.node("a").spawn(
        &c.dir,
        Path::new("/usr/bin/tshark"),
        &[
            "-i",
            "eth0",
            "-f",
            "tcp port 15008",
            "-w",
            &pcap_s,
            "-a",
            "duration:30",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cap.output().contains("Capturing on") {
        assert!(
            Instant::now() < deadline,
            "tshark did not start: {}",
            cap.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It says so a moment before packets reach it.
    std::thread::sleep(Duration::from_secs(1));
    let canary = "weft-canary-5e1f09";
    let out = c.pod("client").run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-H",
            &format!("x-canary: {canary}"),
            &format!("http://10.96.0.10/{canary}"),
        ],
        Duration::from_secs(8),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"server\":\"web\""));
    std::thread::sleep(Duration::from_millis(500));
    cap.signal(libc::SIGINT);
    assert!(
        cap.wait_exit(Duration::from_secs(10)).is_some(),
        "tshark stops"
    );

    // The receiving agent knows who called: the client's identity, proven by its certificate.
    let tunnels = b.admin("/tunnels").expect("tunnels");
    let accepted = tunnels["accepted"].as_array().expect("accepted");
    assert!(
        accepted
            .iter()
            .any(|t| t["source"] == identity("client") && t["destination"] == identity("web")),
        "{tunnels}"
    );

    // On the wire: a TLS 1.3 handshake, encrypted records, and not one plaintext byte.
    let tshark = |filter: &str, field: &str| -> String {
        let out = Command::new("tshark")
            .args(["-r", &pcap_s, "-Y", filter, "-T", "fields", "-e", field])
            .output()
            .expect("tshark");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let versions = tshark(
        "tls.handshake.type == 2",
        "tls.handshake.extensions.supported_version",
    );
    assert!(
        versions.lines().any(|v| v.contains("0x0304")),
        "a TLS 1.3 ServerHello: {versions:?}"
    );
    // TLS 1.3 records all say "application data" (opaque type 23) on the wire.
    let records = tshark("tls.record.opaque_type == 23", "frame.number");
    assert!(
        records.lines().count() >= 2,
        "encrypted records: {records:?}"
    );
    let raw = std::fs::read(&pcap).expect("the capture");
    for plain in [canary.as_bytes(), b"HTTP/1.1", b"x-canary"] {
        assert!(
            !raw.windows(plain.len()).any(|w| w == plain),
            "{:?} crossed the link in plaintext",
            String::from_utf8_lossy(plain)
        );
    }
}

#[test]
fn the_tunnel_refuses_every_peer_without_the_right_certificate() {
    if !require_root("the_tunnel_refuses_every_peer_without_the_right_certificate") {
        return;
    }
    let c = client_on_a("mtls-peers")
        .pod(PodSpec::new("other", "a").account("other"))
        .pod(web_on_b())
        .build();
    let _web = c.serve_http("web", 8080, &[]);
    let _a = c.start_agent("a", &[]);
    let b = c.start_agent("b", &[]);
    let ca = c.ca_dir();
    let creds = c.dir.join("creds");
    let good = issue(&ca, &identity("client"), &creds, "good", "1h");
    let wrong = issue(&ca, &identity("other"), &creds, "wrong", "1h");
    let expired = issue(&ca, &identity("client"), &creds, "expired", "1s");
    let other_ca = c.dir.join("other-ca");
    weft_ca(&[
        "init",
        "--dir",
        &other_ca.display().to_string(),
        "--trust-domain",
        "other.example",
    ]);
    let foreign = issue(
        &other_ca,
        "spiffe://other.example/ns/default/sa/client",
        &creds,
        "foreign",
        "1h",
    );
    let node_a = c.node_credentials("a");
    let node_creds = Some((node_a.join("node-cert.pem"), node_a.join("node-key.pem")));
    std::thread::sleep(Duration::from_secs(2)); // `expired` has expired

    let client_ip = c.pod("client").ip.clone();
    let web = format!("{}:8080", c.pod("web").ip);
    let h = Hbone {
        c: &c,
        from: "a",
        connect: "192.168.250.2:15008".into(),
    };

    // The control: the right certificate, from the right node, for the right pod.
    let ok = h.ask(pair(&good), &server_name("web"), &web, &client_ip);
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(ok["tls_version"], "TLSv1.3", "{ok}");
    assert_eq!(ok["alpn"], "h2", "{ok}");
    let body = ok["body"].as_str().unwrap_or_default();
    assert!(body.contains("\"server\":\"web\""), "{ok}");
    assert!(
        body.contains(&format!("\"peer\":\"{client_ip}:")),
        "the app sees the client pod as the source: {ok}"
    );

    // No certificate, an expired one, one from another trust domain, a node's: refused
    // in the handshake.
    // (TLS 1.3 clients learn of a refused certificate only when they next read: either way
    // no HTTP/2 answer comes.)
    for (what, creds) in [
        ("no certificate", None),
        ("an expired certificate", pair(&expired)),
        ("another trust domain's certificate", pair(&foreign)),
        ("a node's certificate", node_creds),
    ] {
        let v = h.ask(creds, &server_name("web"), &web, &client_ip);
        assert!(v["status"].is_null(), "{what}: {v}");
    }
    // A valid certificate of the wrong identity: the source pod is not who it claims.
    let v = h.ask(pair(&wrong), &server_name("web"), &web, &client_ip);
    assert_eq!(v["status"], 403, "{v}");
    assert_eq!(v["reason"], "source-identity-mismatch", "{v}");
    // Asking node b for an identity it does not run: no certificate to present.
    let v = h.ask(pair(&good), &server_name("client"), &web, &client_ip);
    assert!(v["status"].is_null() && v["stage"] == "tls", "{v}");
    // The right identity, but a pod that is not that identity: refused per stream.
    let v = h.ask(
        pair(&good),
        &server_name("web"),
        &format!("{client_ip}:8080"),
        &client_ip,
    );
    assert_eq!(v["status"], 403, "{v}");
    assert_eq!(v["reason"], "destination-identity-mismatch", "{v}");

    // Plaintext to the tunnel port gets no HTTP answer.
    let out = c.node("a").run(
        "curl",
        &[
            "-sS",
            "-i",
            "--max-time",
            "5",
            "http://192.168.250.2:15008/",
        ],
        Duration::from_secs(8),
    );
    assert!(!out.status.success(), "plaintext was answered");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("HTTP/"));

    assert!(b.stat("proxy", "tunnel_handshake_failures") >= 6);
    assert!(b.stat("proxy", "tunnel_rejected") >= 2);
}

#[test]
fn the_ca_signs_only_for_workloads_on_the_asking_node() {
    if !require_root("the_ca_signs_only_for_workloads_on_the_asking_node") {
        return;
    }
    let c = client_on_a("ca-policy")
        .pod(PodSpec::new("web", "b").account("web"))
        .build();
    c.ensure_ca();
    let bundle = c.ca_dir().join("bundle.pem").display().to_string();
    let node_a = c.node_credentials("a");
    // A key and a certificate request for `uri`, made by openssl.
    let csr = |name: &str, uri: &str| -> String {
        let key = c.dir.join(format!("{name}.key")).display().to_string();
        let csr = c.dir.join(format!("{name}.csr")).display().to_string();
        let out = Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-subj",
                "/CN=weft-test",
                "-addext",
            ])
            .arg(format!("subjectAltName=URI:{uri}"))
            .args(["-out", &csr])
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        csr
    };
    // curl from node a's netns, proving node a's identity (or none).
    let ask = |csr: &str, with_node_cert: bool| -> (String, String, bool) {
        let data = format!("@{csr}");
        let cert = node_a.join("node-cert.pem").display().to_string();
        let key = node_a.join("node-key.pem").display().to_string();
        let mut args = vec![
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "--cacert",
            &bundle,
            "--resolve",
            "ca.cluster.local:15012:192.168.250.254",
            "--data-binary",
            &data,
        ];
        if with_node_cert {
            args.extend(["--cert", &cert, "--key", &key]);
        }
        args.push("https://ca.cluster.local:15012/v1/sign");
        let out = c.node("a").run("curl", &args, Duration::from_secs(8));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        (code.to_owned(), body.to_owned(), out.status.success())
    };

    // Hostile clients first: 200 connections that never start TLS, and one from node a that
    // completes TLS and never sends a request. The CA still answers a node, and closes each
    // idle connection at its read timeout (5 s).
    let idle = r#"
import socket, ssl, sys, time
cert, key, bundle = sys.argv[1:4]
socks = [socket.create_connection(("192.168.250.254", 15012), timeout=2) for _ in range(200)]
ctx = ssl.create_default_context(cafile=bundle)
ctx.load_cert_chain(cert, key)
socks.append(ctx.wrap_socket(socket.create_connection(("192.168.250.254", 15012), timeout=2), server_hostname="ca.cluster.local"))
print("open", len(socks), flush=True)
t0, closed = time.time(), 0
for s in socks:
    s.settimeout(max(0.1, 12 - (time.time() - t0)))
    try:
        closed += s.recv(1) == b""
    except OSError:
        pass
print("closed", closed, "after", round(time.time() - t0), flush=True)
"#;
    let node_cert = node_a.join("node-cert.pem").display().to_string();
    let node_key = node_a.join("node-key.pem").display().to_string();
    let hostile = c.node("a").spawn(
        &c.dir,
        Path::new("/usr/bin/python3"),
        &["-c", idle, &node_cert, &node_key, &bundle],
    );
    let deadline = Instant::now() + SECS5;
    while !hostile.output().contains("open 201") {
        assert!(
            Instant::now() < deadline,
            "idle connections: {}",
            hostile.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (code, body, _) = ask(&csr("mine", &identity("client")), true);
    assert_eq!(code, "200", "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !hostile.output().contains("closed") {
        assert!(
            Instant::now() < deadline,
            "idle connections: {}",
            hostile.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        hostile.output().contains("closed 201 after"),
        "the CA closed every idle connection: {}",
        hostile.output()
    );
    assert!(body.starts_with("-----BEGIN CERTIFICATE-----"), "{body}");
    let pem = c.dir.join("mine.pem");
    std::fs::write(&pem, &body).unwrap();
    let pem_s = pem.display().to_string();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", &bundle, &pem_s])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in", &pem_s])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&identity("client")));

    let (code, body, _) = ask(&csr("theirs", &identity("web")), true);
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("runs on"), "the refusal says why: {body}");
    let node_b = format!("spiffe://cluster.local/weft/node/{}", c.node("b").full);
    let (code, body, _) = ask(&csr("node-b", &node_b), true);
    assert_eq!(code, "403", "{body}");
    let (_, _, ok) = ask(&csr("anon", &identity("client")), false);
    assert!(!ok, "no answer without a node certificate");
}

#[test]
fn certificates_and_the_trust_root_rotate_under_load_without_a_failed_request() {
    if !require_root("certificates_and_the_trust_root_rotate_under_load_without_a_failed_request") {
        return;
    }
    let c = client_on_a("rotation")
        .cert_ttl("60s")
        .pod(web_on_b().port(9000))
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080)
                .tcp(9000, 9000),
        )
        .build();
    let tp = bin("weft-testpod");
    let _web = c.serve_http("web", 8080, &[]);
    let _echo = c.pod("web").spawn(&c.dir, &tp, &["echo-server", "9000"]);
    c.pod("web").wait_listening(9000, SECS5);
    let a = c.start_agent("a", &[]);
    let b = c.start_agent("b", &[]);
    let ca = c.ca_dir().display().to_string();

    // 100 s of requests back to back (the proxy keeps its upstream connections), of new
    // connections back to back (each a new tunnel stream), and one connection held all
    // along.
    let run_ms = "100000";
    let mut held = c.pod("client").spawn(
        &c.dir,
        &tp,
        &["hold-echo", "10.96.0.10:9000", run_ms, "200"],
    );
    let mut stream = c
        .pod("client")
        .spawn(&c.dir, &tp, &["http-loop", "10.96.0.10:80", run_ms]);
    let mut conns =
        c.pod("client")
            .spawn(&c.dir, &tp, &["connect-echo", "10.96.0.10:9000", run_ms]);
    let t0 = Instant::now();
    let at = |s: u64| {
        let until = t0 + Duration::from_secs(s);
        if let Some(d) = until.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };
    // A new root, trusted at once and signing after 3 s; certificates live 60 s and are
    // renewed at 30 s, so by 45 s everything in use was signed by the new root.
    at(5);
    weft_ca(&["rotate", "--dir", &ca, "--grace", "3s"]);
    at(50);
    weft_ca(&["retire", "--dir", &ca]);
    let held_exit = held
        .wait_exit(Duration::from_secs(80))
        .expect("hold-echo ends");
    let stream_exit = stream
        .wait_exit(Duration::from_secs(80))
        .expect("http-loop ends");
    assert!(
        stream_exit.success(),
        "the request stream: {}",
        stream.output()
    );
    let line = stream.output();
    let ok: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ok="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok > 1000, "a steady stream of requests: {line}");
    assert!(
        held_exit.success(),
        "the held connection: {}",
        held.output()
    );
    let held_out: serde_json::Value =
        serde_json::from_str(held.output().trim().lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(held_out["failed"], 0, "{held_out}");
    conns
        .wait_exit(Duration::from_secs(80))
        .expect("connect-echo ends");
    let conns_out: serde_json::Value =
        serde_json::from_str(conns.output().trim().lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(conns_out["errors"], 0, "{conns_out}");
    assert!(
        conns_out["count"].as_u64().unwrap_or(0) > 1000,
        "{conns_out}"
    );

    // It really rotated: several certificates and tunnel connections per node, and only
    // the new root is trusted now.
    for agent in [&a, &b] {
        let certs = agent.admin("/certificates").unwrap();
        assert_eq!(certs["roots"], 1, "{certs}");
        let log = agent.proc.output();
        assert!(
            log.matches("certificate issued").count() >= 3,
            "renewals: {}",
            log.matches("certificate issued").count()
        );
    }
    // Each tunnel connection retires before its certificates expire: several were made.
    let opened = a.stat("proxy", "tunnel_connections_opened");
    assert!(opened >= 2, "tunnel connections opened: {opened}");
}

/// What curl got: status, `x-weft-reason` (empty when the app answered), and the body.
fn call(c: &Cluster, pod: &str, method: &str, url: &str) -> (u16, String, String) {
    let out = c.pod(pod).run(
        "curl",
        &[
            "-sS",
            "-i",
            "--max-time",
            "5",
            "-X",
            method,
            "-H",
            // A client cannot lend itself an identity: the proxy replaces this.
            "x-forwarded-client-cert: By=me;URI=spiffe://cluster.local/ns/default/sa/admin",
            url,
        ],
        Duration::from_secs(8),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {url} from {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reason = text
        .lines()
        .find_map(|l| l.strip_prefix("x-weft-reason: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, reason, body)
}

#[test]
fn authorization_policies_allow_deny_and_audit_by_principal_namespace_port_method_and_path() {
    if !require_root(
        "authorization_policies_allow_deny_and_audit_by_principal_namespace_port_method_and_path",
    ) {
        return;
    }
    let c = client_on_a("sec-authz")
        .pod(PodSpec::new("admin", "a").account("admin"))
        .pod(
            PodSpec::new("intruder", "a")
                .namespace("other")
                .account("client"),
        )
        .pod(PodSpec::new("neighbour", "b").account("client"))
        .pod(web_on_b().port(9090))
        .service(
            ServiceSpec::new("web", "10.96.3.1")
                .select("app", "web")
                .tcp(80, 8080)
                .tcp(90, 9090),
        )
        .build();
    let policies = format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web-allow}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
    - from: [{{principals: ["{client}"]}}]
      to: [{{ports: [8080], methods: [GET], paths: [{{prefix: /api/}}]}}]
    - from: [{{namespaces: [other]}}]
      to: [{{ports: [9090]}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web-deny}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules: [{{to: [{{paths: [{{exact: /api/secret}}]}}]}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web-audit}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: AUDIT
  rules: [{{to: [{{paths: [{{prefix: /api/audited}}]}}]}}]
---
"#,
        client = identity("client")
    );
    c.write_config(&format!("{}{policies}", c.config_yaml()));
    let a = c.start_agent("a", &[]);
    let b = c.start_agent("b", &[]);
    let echo = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/header_echo.py");
    let echo = echo.display().to_string();
    let _s1 = c
        .pod("web")
        .spawn(&c.dir, Path::new("/usr/bin/python3"), &[&echo, "8080"]);
    let _s2 = c
        .pod("web")
        .spawn(&c.dir, Path::new("/usr/bin/python3"), &[&echo, "9090"]);
    c.pod("web").wait_listening(8080, SECS5);
    c.pod("web").wait_listening(9090, SECS5);

    let api = "http://10.96.3.1/api/items";
    // Principal: the client's identity is allowed, the admin's is not.
    let (status, _, body) = call(&c, "client", "GET", api);
    assert_eq!(status, 200, "{body}");
    // The app sees who called, as the proxy proved it; the client's own header is gone.
    let seen: serde_json::Value = serde_json::from_str(&body).expect("echo body");
    assert_eq!(
        seen["headers"]["x-forwarded-client-cert"],
        format!("By={};URI={}", identity("web"), identity("client")),
        "{seen}"
    );
    assert_eq!(call(&c, "admin", "GET", api).0, 403);
    assert_eq!(call(&c, "admin", "GET", api).1, "policy-denied");
    // Method and path: only GET, only under /api/.
    assert_eq!(call(&c, "client", "POST", api).1, "policy-denied");
    assert_eq!(
        call(&c, "client", "GET", "http://10.96.3.1/other").1,
        "policy-denied"
    );
    // Namespace and port: namespace `other` may use port 9090 only; `default` may not.
    assert_eq!(call(&c, "intruder", "GET", "http://10.96.3.1:90/x").0, 200);
    assert_eq!(call(&c, "intruder", "GET", api).1, "policy-denied");
    assert_eq!(
        call(&c, "client", "GET", "http://10.96.3.1:90/x").1,
        "policy-denied"
    );
    // DENY beats ALLOW: the client may GET /api/..., but not /api/secret.
    assert_eq!(
        call(&c, "client", "GET", "http://10.96.3.1/api/secret").1,
        "policy-denied"
    );
    // The same policies on the same node.
    assert_eq!(call(&c, "neighbour", "GET", api).0, 200);
    assert_eq!(
        call(&c, "neighbour", "GET", "http://10.96.3.1/api/secret").0,
        403
    );
    // AUDIT: logged and counted, not enforced.
    let audited = a.stat("proxy", "policy_audited");
    assert_eq!(audited, 0, "no request so far matched the AUDIT rule");
    assert_eq!(
        call(&c, "client", "GET", "http://10.96.3.1/api/audited/1").0,
        200
    );
    assert_eq!(a.stat("proxy", "policy_audited"), audited + 1);
    assert_eq!(
        call(&c, "admin", "GET", "http://10.96.3.1/api/audited/1").0,
        403
    );
    assert_eq!(
        a.stat("proxy", "policy_audited"),
        audited + 2,
        "audited, and denied"
    );
    // Each denial counted where it was made (the client's node, or b for its own pod).
    assert_eq!(a.stat("proxy", "policy_denied"), 8);
    assert_eq!(b.stat("proxy", "policy_denied"), 1);

    // Plain TCP (not HTTP) from the allowed principal to the port its HTTP-only rule
    // covers: there is no method or path to judge, so that rule cannot allow it.
    let out = c.pod("client").run(
        &bin("weft-testpod").display().to_string(),
        &["echo-client", "10.96.3.1:80", "1000"],
        Duration::from_secs(10),
    );
    assert!(!out.status.success(), "plain TCP was let through");
    assert_eq!(a.stat("proxy", "policy_denied"), 9);

    // The receiving agent enforces what it can judge itself: a node that skipped its own
    // check (here a foreign HBONE client on node a holding the admin pod's certificate)
    // is refused per stream; the client's identity passes (its rule's method and path
    // were its sender's to judge).
    let creds = c.dir.join("creds");
    let admin = issue(&c.ca_dir(), &identity("admin"), &creds, "admin", "1h");
    let client = issue(&c.ca_dir(), &identity("client"), &creds, "client", "1h");
    let h = Hbone {
        c: &c,
        from: "a",
        connect: "192.168.250.2:15008".into(),
    };
    let web = format!("{}:8080", c.pod("web").ip);
    let v = h.ask(pair(&admin), &server_name("web"), &web, &c.pod("admin").ip);
    assert_eq!(
        (v["status"].as_u64(), v["reason"].as_str()),
        (Some(403), Some("policy-denied")),
        "{v}"
    );
    let v = h.ask(
        pair(&client),
        &server_name("web"),
        &web,
        &c.pod("client").ip,
    );
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(b.stat("proxy", "policy_denied"), 2);
}

/// `curl http://ADDR/` from `pod`: the body when the app answered, None when not.
fn fetch(c: &Cluster, pod: &str, addr: &str) -> Option<String> {
    let out = c.pod(pod).run(
        "curl",
        &["-sS", "--max-time", "5", &format!("http://{addr}/")],
        Duration::from_secs(8),
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn strict_refuses_and_permissive_admits_clients_outside_the_mesh_on_every_port() {
    if !require_root("strict_refuses_and_permissive_admits_clients_outside_the_mesh_on_every_port")
    {
        return;
    }
    let c = Cluster::builder("sec-strict")
        .node("a")
        .node("b")
        .pod(PodSpec::new("client", "a"))
        .pod(PodSpec::new("outsider", "a").unmeshed())
        .pod(
            PodSpec::new("strict", "b")
                .label("app", "strict")
                .port(8080)
                .strict(),
        )
        .pod(PodSpec::new("lax", "b").label("app", "lax").port(8080))
        .service(
            ServiceSpec::new("strict", "10.96.4.1")
                .select("app", "strict")
                .tcp(80, 8080),
        )
        .service(
            ServiceSpec::new("lax", "10.96.4.2")
                .select("app", "lax")
                .tcp(80, 8080),
        )
        .build();
    c.write_config(&c.config_yaml());
    let _a = c.start_agent("a", &[]);
    let b = c.start_agent("b", &[]);
    let mut servers = vec![];
    for pod in ["strict", "lax"] {
        // 8080 is declared; 7070 is not.
        for port in [8080, 7070] {
            servers.push(c.serve_http(pod, port, &[]));
        }
    }
    let (strict, lax, outsider) = (&c.pod("strict").ip, &c.pod("lax").ip, &c.pod("outsider").ip);

    // Outside the mesh, straight to the pods' addresses.
    assert_eq!(
        fetch(&c, "outsider", &format!("{strict}:8080")),
        None,
        "STRICT, declared port"
    );
    assert_eq!(
        fetch(&c, "outsider", &format!("{strict}:7070")),
        None,
        "STRICT, undeclared port"
    );
    assert_eq!(b.stat("proxy", "inbound_plaintext_refused"), 2);
    for port in [8080, 7070] {
        let body = fetch(&c, "outsider", &format!("{lax}:{port}")).expect("PERMISSIVE admits");
        assert!(
            body.contains(&format!("\"peer\":\"{outsider}:")),
            "the app sees the real client: {body}"
        );
    }
    // The undeclared port went through the agent too.
    assert_eq!(b.stat("proxy", "inbound_plaintext"), 2);
    assert_eq!(b.stat("proxy", "inbound_accepted"), 4);

    // Inside the mesh, through the agents: STRICT serves it.
    let body = fetch(&c, "client", "10.96.4.1:80").expect("a meshed client reaches STRICT");
    assert!(body.contains("\"server\":\"strict\""), "{body}");
    assert_eq!(b.stat("proxy", "inbound_accepted"), 4, "came by the tunnel");
}
