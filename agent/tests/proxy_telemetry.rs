//! In-process: every request and forwarded connection leaves one record, with what the
//! proxy knew of it: both ends, the route, the endpoint, the status and the proxy's
//! reason, bytes and retries; the tap shows it as it happens and the Prometheus families
//! count it.

mod support;

use std::time::Duration;

use support::{mesh, serve, Behaviour};
use weft_agent::telemetry::Record;

const ROUTED: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-route}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: far, port: 80}]
";

/// The next record the tap shows within a second.
async fn next(
    rx: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<Record>>,
) -> std::sync::Arc<Record> {
    tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .expect("a record within a second")
        .expect("the tap is open")
}

#[tokio::test]
async fn a_request_leaves_one_record_with_both_ends_and_its_route() {
    let m = mesh()
        .pod("client", "a")
        .server("far", "b", "far", 8080)
        .docs(&support::service("far", "10.96.0.2"))
        .docs(ROUTED)
        .start()
        .await;
    let _far = serve(&m, "far", 8080, Behaviour::default()).await;
    let telemetry = m.nodes["a"].inputs.telemetry.clone();
    let mut rx = telemetry.tap.subscribe().expect("a tap place");

    let a = m.get("client", "10.96.0.10:80", "/api/x?q=1").await;
    assert_eq!(a.status, 200);
    let rec = next(&mut rx).await;
    let Record::Http(r) = &*rec else {
        panic!("{rec:?}")
    };
    assert_eq!(r.service.as_deref(), Some("default/far"));
    assert_eq!(r.route.as_deref(), Some("default/web-route"));
    assert_eq!(r.source.pod.as_deref(), Some("default/client"));
    assert_eq!(r.destination.pod.as_deref(), Some("default/far"));
    assert_eq!(r.destination.workload.as_deref(), Some("default/far"));
    assert_eq!(r.endpoint.map(|e| *e.ip()), Some(m.ip("far")));
    assert_eq!((r.status, r.reason), (200, None));
    assert_eq!(
        (r.request.method.as_str(), r.request.path()),
        ("GET", "/api/x?q=1")
    );
    assert!(r.response_bytes > 0 && !r.incomplete);
    assert!(r.upstream_ms.is_some() && r.duration_ms >= r.upstream_ms.unwrap());

    // An answer of the proxy's own carries its reason, and no endpoint.
    let a = m.get("client", "10.96.0.10:80", "/elsewhere").await;
    assert_eq!(a.status, 404);
    let Record::Http(r) = &*next(&mut rx).await else {
        panic!()
    };
    assert_eq!((r.status, r.reason), (404, Some("no-route")));
    assert_eq!(r.service.as_deref(), Some("default/web"));
    assert!(r.endpoint.is_none());

    let text = telemetry.families.encode(vec![]);
    assert!(
        text.contains("weft_requests_total{source_workload=\"default/client\",destination_service=\"default/far\",destination_workload=\"default/far\",route=\"default/web-route\",status_class=\"2xx\",reason=\"\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("weft_requests_total{source_workload=\"default/client\",destination_service=\"default/web\",destination_workload=\"unknown\",route=\"\",status_class=\"4xx\",reason=\"no-route\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn retries_are_counted_on_the_request_that_needed_them() {
    let m = mesh()
        .pod("client", "a")
        .server("flaky", "b", "flaky", 8080)
        .docs(&support::service("flaky", "10.96.0.2"))
        .docs(
            "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retry}
spec:
  parentRefs: [{kind: Service, name: flaky, port: 80}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {codes: [503], attempts: 2, backoff: 1ms}
",
        )
        .start()
        .await;
    let _flaky = serve(
        &m,
        "flaky",
        8080,
        Behaviour {
            fail: (1, 2),
            ..Behaviour::default()
        },
    )
    .await;
    let mut rx = m.nodes["a"].inputs.telemetry.tap.subscribe().unwrap();
    let a = m.get("client", "10.96.0.2:80", "/").await;
    assert_eq!(a.status, 200);
    let Record::Http(r) = &*next(&mut rx).await else {
        panic!()
    };
    assert_eq!((r.status, r.retries), (200, 1));
}
