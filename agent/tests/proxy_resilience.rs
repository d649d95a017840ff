//! In-process: the proxy under broken and hostile peers. Retries within the budget, a
//! blackholed endpoint, a silent peer agent, a silent TCP peer, clients that break their
//! requests, a pod at its connection limit, an HTTP/1.0 backend, and draining.

mod support;

use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use support::{blackhole, mesh, send, serve, silent, Behaviour};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_agent::config::Protocol;

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
";

fn round_robin(outlier: &str) -> String {
    format!(
        "{WEB}---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: web}}
spec:
  targetRef: {{kind: Service, name: web}}
  loadBalancer: RoundRobin
{outlier}"
    )
}

#[tokio::test]
async fn retries_hide_a_half_failing_backend_within_the_budget() {
    let m = mesh()
        .pod("client", "a")
        .server("web", "b", "web", 8080)
        .docs(&format!(
            "{WEB}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{kind: Service, name: web, port: 80}}]
  rules: [{{retry: {{codes: [503], attempts: 2, backoff: 1ms}}, backendRefs: [{{name: web, port: 80}}]}}]
"
        ))
        .start()
        .await;
    let web = serve(
        &m,
        "web",
        8080,
        Behaviour {
            fail: (1, 2),
            ..Default::default()
        },
    )
    .await;
    let mut c = m.h1("client", "10.96.0.10:80").await;
    for _ in 0..50 {
        assert_eq!(send(&mut c, support::get("/")).await.status, 200);
    }
    assert_eq!(
        web.count(),
        100,
        "every other answer failed and was retried"
    );
    assert_eq!(m.metrics("a").http_retries.load(Relaxed), 50);
}

#[tokio::test]
async fn a_blackholed_endpoint_costs_a_request_at_most_the_connect_timeout() {
    let connect = Duration::from_millis(400);
    let m = mesh()
        .pod("client", "a")
        .server("dead", "b", "web", 8080)
        .server("live", "b", "web", 8080)
        .docs(&round_robin(""))
        .config(|c| c.timeouts.connect = connect)
        .start()
        .await;
    let _hole = blackhole(m.ip("dead"), 8080);
    let live = serve(&m, "live", 8080, Behaviour::default()).await;
    for _ in 0..4 {
        let t0 = Instant::now();
        let a = m.get("client", "10.96.0.10:80", "/").await;
        assert_eq!((a.status, a.who().as_str()), (200, "live"));
        // The connect timeout and the rest of the request, with room for a busy machine.
        assert!(
            t0.elapsed() < connect + Duration::from_secs(2),
            "took {:?}",
            t0.elapsed()
        );
    }
    assert_eq!(live.count(), 4);
    // The endpoints are on node b: its agent timed out delivering to the dead one, and
    // told node a, which moved on.
    assert!(m.metrics("b").upstream_connect_timeouts.load(Relaxed) >= 2);
    // Plain TCP moves on to the next endpoint the same way.
    let t0 = Instant::now();
    for _ in 0..2 {
        let mut c = m.connect("client", "10.96.0.10:80").await;
        c.write_all(b"\x00\x01 not http\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("an answer from the live endpoint")
            .unwrap();
        assert!(n > 0);
    }
    assert!(t0.elapsed() < 2 * connect + Duration::from_secs(3));
}

#[tokio::test]
async fn a_silent_peer_agent_is_given_up_at_the_tunnel_answer_timeout() {
    let answer = Duration::from_millis(300);
    let m = mesh()
        .pod("client", "a")
        .server("far", "b", "web", 8080)
        .silent_node("b")
        .docs(WEB)
        .config(|c| c.timeouts.tunnel_answer = answer)
        .start()
        .await;
    // Node b's "agent" accepts tunnel connections and never answers.
    let peer = silent(m.node_ip("b"), 15008).await;
    let t0 = Instant::now();
    let a = m.get("client", "10.96.0.10:80", "/").await;
    assert_eq!(
        (a.status, a.who().as_str()),
        (503, "upstream-connect-failed")
    );
    assert!(
        t0.elapsed() < answer * 3 + Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(peer.accepted.load(Relaxed) >= 1);
    assert!(m.metrics("a").tunnel_answer_timeouts.load(Relaxed) >= 1);
}

#[tokio::test]
async fn silent_tcp_connections_are_closed_at_their_timeouts() {
    let idle = Duration::from_millis(400);
    let m = mesh()
        .pod("client", "a")
        .server("mute", "a", "web", 8080)
        .docs(WEB)
        .config(|c| {
            c.timeouts.idle = idle;
            c.timeouts.header_read = Duration::from_millis(300);
        })
        .start()
        .await;
    let _mute = silent(m.ip("mute"), 8080).await;
    // Neither side sends a byte: closed after the idle timeout.
    let mut c = m.connect("client", "10.96.0.10:80").await;
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed by the proxy")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t0.elapsed() >= idle, "closed after {:?}", t0.elapsed());
    assert_eq!(m.metrics("a").tcp_idle_timeouts.load(Relaxed), 1);
    // A tunnel client that never starts its TLS handshake is closed at the header read
    // timeout.
    let mut t = tokio::net::TcpStream::connect((m.node_ip("a"), 15008))
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
        .await
        .expect("closed by the tunnel server")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(m.metrics("a").header_read_timeouts.load(Relaxed), 1);
}

#[tokio::test]
async fn clients_breaking_their_requests_never_hurt_the_endpoint() {
    let m = mesh()
        .pod("client", "a")
        .server("web", "b", "web", 8080)
        .docs(&round_robin(
            "  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 30s}\n",
        ))
        .start()
        .await;
    let web = serve(&m, "web", 8080, Behaviour::default()).await;
    assert_eq!(m.get("client", "10.96.0.10:80", "/").await.status, 200);
    let stats = || {
        let st = m.state("a");
        let ep = st
            .service("10.96.0.10:80".parse().unwrap(), Protocol::Tcp)
            .unwrap()
            .endpoints[0]
            .stats
            .clone();
        (ep.samples(), ep.failures_in_a_row(), ep.ejections())
    };
    let before = stats();
    assert_eq!(before, (1, 0, 0));
    let kinds: [&[u8]; 3] = [
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nXYZ\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nnot a thousand bytes",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nreset before the end",
    ];
    for (k, bytes) in kinds.iter().enumerate() {
        for _ in 0..50 {
            let mut c = m.connect("client", "10.96.0.10:80").await;
            c.write_all(bytes).await.unwrap();
            if k == 2 {
                // Reset: close with unread data and SO_LINGER 0.
                tokio::time::sleep(Duration::from_millis(5)).await;
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(c);
                continue;
            }
            c.shutdown().await.unwrap();
            let mut out = vec![];
            let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
            let status = String::from_utf8_lossy(&out)
                .split(' ')
                .nth(1)
                .unwrap_or("")
                .to_owned();
            assert_eq!(status, "400", "kind {k}: {}", String::from_utf8_lossy(&out));
        }
    }
    // Let the resets' requests finish wherever they were.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats(),
        before,
        "samples, failures in a row, ejections unchanged"
    );
    assert_eq!(m.get("client", "10.96.0.10:80", "/").await.status, 200);
    assert_eq!(web.count(), 2, "only the two good requests were served");
    let mt = m.metrics("a");
    assert_eq!(mt.http_ejections.load(Relaxed), 0);
    assert_eq!(
        mt.http_client_errors.load(Relaxed) + mt.http_client_cancelled.load(Relaxed),
        150,
        "every broken request was counted as the client's"
    );
}

#[tokio::test]
async fn a_pod_at_its_connection_limit_is_refused_and_others_are_served() {
    let m = mesh()
        .pod("greedy", "a")
        .pod("polite", "a")
        .server("echo", "a", "web", 8080)
        .docs(WEB)
        .config(|c| c.limits.per_pod = 5)
        .start()
        .await;
    let _echo = support::echo_server(&m, "echo", 8080).await;
    let echo = |mut c: tokio::net::TcpStream| async move {
        c.write_all(b"\x01hello").await.ok()?;
        let mut buf = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(c)
    };
    let mut held = vec![];
    for _ in 0..5 {
        held.push(
            echo(m.connect("greedy", "10.96.0.10:80").await)
                .await
                .expect("served"),
        );
    }
    assert!(
        echo(m.connect("greedy", "10.96.0.10:80").await)
            .await
            .is_none(),
        "the sixth connection is refused"
    );
    assert_eq!(
        m.metrics("a").connections_refused_pod_limit.load(Relaxed),
        1
    );
    // The other pod, which also reaches the echo pod (whose inbound is not involved here),
    // is served.
    for _ in 0..3 {
        assert!(echo(m.connect("polite", "10.96.0.10:80").await)
            .await
            .is_some());
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        echo(m.connect("greedy", "10.96.0.10:80").await)
            .await
            .is_some(),
        "served again once under the limit"
    );
}

#[tokio::test]
async fn an_http10_backend_keeps_the_clients_connection_alive() {
    let m = mesh()
        .pod("client", "a")
        .server("old", "b", "web", 8080)
        .docs(WEB)
        .start()
        .await;
    // Answers HTTP/1.0 and closes, like a legacy server.
    let l = tokio::net::TcpListener::bind((m.ip("old"), 8080))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfrom 1.0")
                .await;
        }
    });
    let mut c = m.h1("client", "10.96.0.10:80").await;
    for _ in 0..2 {
        let a = send(&mut c, support::get("/")).await;
        assert_eq!(a.status, 200);
        assert_eq!(&a.body[..], b"from 1.0");
    }
}

#[tokio::test]
async fn draining_closes_http1_with_connection_close_and_http2_with_goaway() {
    let m = mesh()
        .pod("client", "a")
        .server("web", "b", "web", 8080)
        .docs(WEB)
        .config(|c| c.timeouts.drain_idle_grace = Duration::from_millis(300))
        .start()
        .await;
    let _web = serve(&m, "web", 8080, Behaviour::default()).await;
    let mut h1 = m.h1("client", "10.96.0.10:80").await;
    let mut h2 = m.h2("client", "10.96.0.10:80").await;
    let mut idle_h1 = m.h1("client", "10.96.0.10:80").await;
    assert_eq!(send(&mut h1, support::get("/")).await.status, 200);
    assert_eq!(send(&mut idle_h1, support::get("/")).await.status, 200);
    assert_eq!(
        support::answer(h2.send_request(support::get("/")).await.unwrap())
            .await
            .status,
        200
    );
    m.nodes["a"].drain.start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // HTTP/1.1: the next answer says Connection: close, and the connection ends.
    let a = send(&mut h1, support::get("/")).await;
    assert_eq!(
        (
            a.status,
            a.headers.get("connection").map(|v| v.to_str().unwrap())
        ),
        (200, Some("close"))
    );
    // HTTP/2: GOAWAY, so no new stream is accepted on it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(h2.ready().await.is_err() || h2.send_request(support::get("/")).await.is_err());
    // An idle HTTP/1.1 connection is closed after the grace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        idle_h1.ready().await.is_err(),
        "the idle connection was closed"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(m.metrics("a").active_connections.load(Relaxed), 0);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let m = mesh()
        .pod("client", "a")
        .server("web", "b", "web", 8080)
        .docs(WEB)
        .config(|c| c.timeouts.idle = Duration::from_millis(300))
        .start()
        .await;
    let _web = serve(&m, "web", 8080, Behaviour::default()).await;
    let mut h2 = m.h2("client", "10.96.0.10:80").await;
    assert_eq!(
        support::answer(h2.send_request(support::get("/")).await.unwrap())
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(h2.ready().await.is_err(), "closed after the idle timeout");
    assert_eq!(m.metrics("a").http_idle_timeouts.load(Relaxed), 1);
}

#[tokio::test]
async fn a_client_that_stops_mid_prefix_is_neither_stalled_nor_spun_on() {
    let m = mesh()
        .pod("client", "a")
        .server("echo", "a", "web", 8080)
        .docs(&format!(
            "{WEB}---
apiVersion: v1
kind: Service
metadata: {{name: tls}}
spec: {{clusterIP: 10.96.0.20, selector: {{app: web}}, ports: [{{port: 443, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: tls}}
spec:
  parentRefs: [{{kind: Service, name: tls, port: 443}}]
  hostnames: [a.example]
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
"
        ))
        .config(|c| c.timeouts.header_read = Duration::from_millis(300))
        .start()
        .await;
    let _echo = support::echo_server(&m, "echo", 8080).await;
    // One byte that could start "GET ": after the detection wait it is plain TCP.
    let mut c = m.connect("client", "10.96.0.10:80").await;
    c.write_all(b"G").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b))
        .await
        .expect("forwarded as bytes after the detection wait")
        .unwrap();
    assert_eq!(&b, b"G");
    // Part of a TLS ClientHello, then nothing: given up at the header read timeout.
    let mut t = m.connect("client", "10.96.0.20:443").await;
    t.write_all(&[0x16, 0x03, 0x01, 0x00, 0x50, 0x01])
        .await
        .unwrap();
    let mut out = vec![];
    tokio::time::timeout(Duration::from_secs(3), t.read_to_end(&mut out))
        .await
        .expect("closed after the header read timeout")
        .ok();
    assert!(out.is_empty());
    assert_eq!(m.metrics("a").outbound_no_route.load(Relaxed), 1);
    assert_eq!(
        m.metrics("a").active_connections.load(Relaxed),
        1,
        "only the echo connection is open"
    );
}
