//! In-process: a request finds its way. Routing by rule, weighted backends, delivery on
//! the same node and through the other node's agent with the client's address kept,
//! round robin and peak-EWMA balancing, plain TCP forwarding.

mod support;

use std::time::Duration;

use support::{mesh, serve, Behaviour};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
";

#[tokio::test]
async fn same_node_and_cross_node_requests_keep_the_client_address() {
    let m = mesh()
        .pod("client", "a")
        .server("near", "a", "near", 8080)
        .server("far", "b", "far", 8080)
        .docs(&support::service("near", "10.96.0.1"))
        .docs(&support::service("far", "10.96.0.2"))
        .start()
        .await;
    let _near = serve(&m, "near", 8080, Behaviour::default()).await;
    let _far = serve(&m, "far", 8080, Behaviour::default()).await;
    let client_ip = m.ip("client").to_string();
    for (vip, server) in [("10.96.0.1:80", "near"), ("10.96.0.2:80", "far")] {
        let a = m.get("client", vip, "/x").await;
        assert_eq!((a.status, a.who().as_str()), (200, server));
        let peer = a.json()["peer"].as_str().unwrap().to_owned();
        assert!(
            peer.starts_with(&format!("{client_ip}:")),
            "{server} saw {peer}"
        );
    }
    assert_eq!(
        m.metrics("b")
            .tunnel_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn rules_route_by_header_and_split_by_weight() {
    let m = mesh()
        .pod("client", "a")
        .server("v1", "a", "v1", 8080)
        .server("v2", "b", "v2", 8080)
        .docs(
            "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: v1}
spec: {clusterIP: 10.96.0.11, selector: {app: v1}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: v2}
spec: {clusterIP: 10.96.0.12, selector: {app: v2}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - matches: [{headers: [{name: x-version, value: '2'}]}]
      backendRefs: [{name: v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-rewritten, value: 'yes'}]}
      backendRefs: [{name: v1, port: 80}]
    - matches: [{path: {type: RegularExpression, value: '/items/[0-9]+'}}]
      backendRefs: [{name: v2, port: 80}]
    - backendRefs: [{name: v1, port: 80, weight: 80}, {name: v2, port: 80, weight: 20}]
",
        )
        .start()
        .await;
    let (_v1, _v2) = (
        serve(&m, "v1", 8080, Behaviour::default()).await,
        serve(&m, "v2", 8080, Behaviour::default()).await,
    );
    let mut c = m.h1("client", "10.96.0.10:80").await;
    let mut req = support::get("/");
    req.headers_mut().insert("x-version", "2".parse().unwrap());
    assert_eq!(support::send(&mut c, req).await.who(), "v2");
    let a = support::send(&mut c, support::get("/old/page?q=1")).await;
    assert_eq!(a.who(), "v1");
    assert_eq!(a.json()["path"], "/new/page");
    // A regular expression wins over the catch-all.
    for _ in 0..10 {
        assert_eq!(
            support::send(&mut c, support::get("/items/42")).await.who(),
            "v2"
        );
    }
    let mut v1 = 0;
    for _ in 0..400 {
        if support::send(&mut c, support::get("/")).await.who() == "v1" {
            v1 += 1;
        }
    }
    assert!((280..=360).contains(&v1), "80/20 split gave v1 {v1} of 400");
}

#[tokio::test]
async fn peak_ewma_sends_less_to_a_slow_endpoint() {
    let m = mesh()
        .pod("client", "a")
        .server("fast", "a", "web", 8080)
        .server("slow", "a", "web", 8080)
        .docs(WEB)
        .start()
        .await;
    let fast = serve(&m, "fast", 8080, Behaviour::default()).await;
    let slow = serve(
        &m,
        "slow",
        8080,
        Behaviour {
            delay: Duration::from_millis(30),
            ..Default::default()
        },
    )
    .await;
    let mut c = m.h1("client", "10.96.0.10:80").await;
    for _ in 0..100 {
        assert_eq!(support::send(&mut c, support::get("/")).await.status, 200);
    }
    assert!(
        slow.count() < 25 && fast.count() > 75,
        "P2C over peak-EWMA favours the fast endpoint: fast {} slow {}",
        fast.count(),
        slow.count()
    );
}

#[tokio::test]
async fn opaque_tcp_is_forwarded_both_ways_with_half_close() {
    let m = mesh()
        .pod("client", "a")
        .server("echo", "b", "web", 8080)
        .docs(WEB)
        .start()
        .await;
    let _echo = support::echo_server(&m, "echo", 8080).await;
    let mut c = m.connect("client", "10.96.0.10:80").await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    let mut back = vec![];
    c.read_to_end(&mut back).await.unwrap();
    assert!(
        back == data,
        "the echo came back intact ({} bytes)",
        back.len()
    );
}
