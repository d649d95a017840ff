//! In-process: every answer the proxy makes itself, each provoked for real, with its status,
//! its `x-weft-reason` and its counter. `every_reason_is_provoked_here` keeps this file
//! in step with the list of reasons.

mod support;

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use support::{mesh, serve, Behaviour, Mesh};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_agent::proxy::error::Reason;

/// Services `web` (10.96.0.10, endpoint `web` on node b) and `empty` (no endpoint), and a
/// route on `web` per case, selected by path.
const DOCS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: slow}
spec: {clusterIP: 10.96.0.11, selector: {app: slow}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec: {clusterIP: 10.96.0.12, selector: {app: nobody}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: gone}
spec: {clusterIP: 10.96.0.13, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRouteFilter
metadata: {name: once}
spec: {rateLimit: {requestsPerSecond: 0.001, burst: 1}}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRouteFilter
metadata: {name: teapot}
spec: {fault: {abort: {httpStatus: 418}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /ok}}]
      backendRefs: [{name: web, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /gone}}]
      backendRefs: [{name: gone, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /empty}}]
      backendRefs: [{name: empty, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /nothing}}]
    - matches: [{path: {type: PathPrefix, value: /slow-backend}}]
      timeouts: {backendRequest: 200ms}
      backendRefs: [{name: slow, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /slow-request}}]
      timeouts: {request: 200ms}
      backendRefs: [{name: slow, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /limited}}]
      filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: once}}]
      backendRefs: [{name: web, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /teapot}}]
      filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: HTTPRouteFilter, name: teapot}}]
      backendRefs: [{name: web, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /moved}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /retry}}]
      retry: {codes: [503], attempts: 1}
      backendRefs: [{name: web, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /forbidden}}]
      backendRefs: [{name: web, port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-forbidden}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{paths: [{prefix: /forbidden}]}]}]
"#;

async fn start() -> (Mesh, support::Server, support::Server) {
    let m = mesh()
        .pod("client", "a")
        .server("web", "b", "web", 8080)
        .server("slow", "b", "slow", 8080)
        .docs(DOCS)
        .config(|c| c.timeouts.request_body = Duration::from_millis(300))
        // The `gone` backend Service disappears behind the route's back, as a route
        // outliving its backend would leave it.
        .tamper(|cfg| cfg.services.retain(|s| s.name != "gone"))
        .start()
        .await;
    let web = serve(&m, "web", 8080, Behaviour::default()).await;
    let slow = serve(
        &m,
        "slow",
        8080,
        Behaviour {
            delay: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    (m, web, slow)
}

fn count(
    m: &Mesh,
    f: impl Fn(&weft_agent::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    f(m.metrics("a")).load(Relaxed)
}

#[tokio::test]
async fn routes_policies_and_faults_answer_with_their_reason() {
    let (m, web, _slow) = start().await;
    let get = |path: &'static str| {
        let m = &m;
        async move { m.get("client", "10.96.0.10:80", path).await }
    };
    let a = get("/ok").await;
    assert_eq!((a.status, a.who().as_str()), (200, "web"));
    for (path, status, reason) in [
        ("/nowhere", 404, Reason::NoRoute),
        // A backend reference to a Service that is not there: 500, as the Gateway API
        // says; a rule with no backend at all: 503.
        ("/gone", 500, Reason::BackendNotFound),
        ("/nothing", 503, Reason::NoBackend),
        ("/empty", 503, Reason::NoHealthyEndpoint),
        ("/slow-backend", 504, Reason::BackendTimeout),
        ("/slow-request", 504, Reason::RequestTimeout),
        ("/teapot", 418, Reason::FaultInjected),
        ("/moved/x?y=1", 301, Reason::Redirect),
        ("/forbidden/x", 403, Reason::PolicyDenied),
    ] {
        let a = get(path).await;
        assert_eq!(
            (a.status, a.who()),
            (status, reason.as_str().to_owned()),
            "{path}"
        );
    }
    let a = get("/moved/x?y=1").await;
    assert_eq!(a.headers["location"], "https://svc/moved/x?y=1");
    assert_eq!(get("/limited").await.status, 200);
    let a = get("/limited").await;
    assert_eq!(
        (a.status, a.who().as_str()),
        (429, Reason::RateLimited.as_str())
    );
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(count(&m, |x| &x.http_rate_limited), 1);
    assert_eq!(count(&m, |x| &x.http_faults), 1);
    assert_eq!(count(&m, |x| &x.policy_denied), 1);
    assert_eq!(
        web.count(),
        2,
        "only /ok and the first /limited reached the backend"
    );
}

#[tokio::test]
async fn failing_upstreams_answer_with_their_reason() {
    let m = mesh()
        .pod("client", "a")
        .server("closed", "b", "closed", 8080)
        .server("hangup", "b", "hangup", 8080)
        .docs(&support::service("closed", "10.96.0.20"))
        .docs(&support::service("hangup", "10.96.0.21"))
        .start()
        .await;
    // Nothing listens in `closed`; `hangup` reads the request and closes without a word.
    let l = tokio::net::TcpListener::bind((m.ip("hangup"), 8080))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).await;
        }
    });
    let a = m.get("client", "10.96.0.20:80", "/").await;
    assert_eq!(
        (a.status, a.who().as_str()),
        (503, Reason::UpstreamConnectFailed.as_str())
    );
    let a = m.get("client", "10.96.0.21:80", "/").await;
    assert_eq!(
        (a.status, a.who().as_str()),
        (502, Reason::UpstreamError.as_str())
    );
    assert!(count(&m, |x| &x.upstream_connect_errors) >= 1);
}

#[tokio::test]
async fn the_circuit_breaker_answers_for_requests_and_connections() {
    let m = mesh()
        .pod("client", "a")
        .server("web", "b", "web", 8080)
        .docs(
            "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web}
  circuitBreaker: {maxConnections: 1, maxActiveRequests: 1, maxPendingRequests: 1, pendingTimeout: 100ms}
",
        )
        .start()
        .await;
    let _web = serve(
        &m,
        "web",
        8080,
        Behaviour {
            delay: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await;
    // One connection is allowed: its first request is served, the second waits in line
    // past the pending timeout.
    let mut first = m.h2("client", "10.96.0.10:80").await;
    let (a, b) = tokio::join!(
        first.send_request(support::get("/")),
        first.clone().send_request(support::get("/"))
    );
    let (a, b) = (
        support::answer(a.unwrap()).await,
        support::answer(b.unwrap()).await,
    );
    let mut whos = [a.who(), b.who()];
    whos.sort();
    assert_eq!(whos, [Reason::CircuitOpenRequests.as_str(), "web"]);
    // A second connection while the first is open.
    let a = m.get("client", "10.96.0.10:80", "/").await;
    assert_eq!(
        (a.status, a.who().as_str()),
        (503, Reason::CircuitOpenConnections.as_str())
    );
    assert_eq!(count(&m, |x| &x.http_circuit_open), 2);
}

/// Raw HTTP/1.1 from the client: the answer's status line and `x-weft-reason`.
async fn raw(m: &Mesh, bytes: &[u8], then_wait: Option<Duration>) -> (u16, String) {
    let mut c = m.connect("client", "10.96.0.10:80").await;
    c.write_all(bytes).await.unwrap();
    match then_wait {
        Some(d) => tokio::time::sleep(d).await,
        None => c.shutdown().await.unwrap(),
    }
    let mut out = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reason = text
        .lines()
        .find_map(|l| l.strip_prefix("x-weft-reason: "))
        .unwrap_or("")
        .to_owned();
    (status, reason)
}

#[tokio::test]
async fn broken_requests_are_the_clients_fault() {
    let (m, web, _slow) = start().await;
    // Both framings: refused before anything is sent.
    let smuggle = b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(
        raw(&m, smuggle, None).await,
        (400, Reason::ConflictingFraming.as_str().into())
    );
    // A body shorter than its Content-Length, read into memory for a retry.
    let short = b"POST /retry HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly this";
    assert_eq!(
        raw(&m, short, None).await,
        (400, Reason::BadRequestBody.as_str().into())
    );
    // The same, streamed to the backend: aborted there, answered 400 here.
    let short = b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly this";
    assert_eq!(
        raw(&m, short, None).await,
        (400, Reason::BadRequestBody.as_str().into())
    );
    // A malformed chunk.
    let chunked = b"POST /ok HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    assert_eq!(
        raw(&m, chunked, None).await,
        (400, Reason::BadRequestBody.as_str().into())
    );
    // A body that stops coming, buffered and streamed.
    for path in ["/retry", "/ok"] {
        let stalled = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\npart");
        assert_eq!(
            raw(&m, stalled.as_bytes(), Some(Duration::from_millis(800))).await,
            (408, Reason::RequestBodyTimeout.as_str().into()),
            "{path}"
        );
    }
    assert_eq!(count(&m, |x| &x.http_client_errors), 6);
    // None of it counted against the endpoint.
    let st = m.state("a");
    let svc = st
        .service(
            "10.96.0.10:80".parse().unwrap(),
            weft_agent::config::Protocol::Tcp,
        )
        .unwrap();
    let ep = &svc.endpoints[0].stats;
    assert_eq!((ep.samples(), ep.failures_in_a_row()), (0, 0));
    assert_eq!(web.count(), 0, "nothing broken was served");
}

/// Every reason is provoked by a test in this file.
#[test]
fn every_reason_is_provoked_here() {
    let src = include_str!("proxy_answers.rs");
    for r in Reason::ALL {
        let name = format!("Reason::{r:?}");
        let uses = src.matches(&name).count();
        assert!(
            uses >= 1,
            "{name} ({}) is not provoked by any test here",
            r.as_str()
        );
    }
}
