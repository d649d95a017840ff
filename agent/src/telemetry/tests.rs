use std::{sync::Arc, time::SystemTime};

use super::{tap::Filter, *};

impl Telemetry {
    fn http_plain(&self, r: HttpRecord) {
        self.http(r, None);
    }
}

fn record(status: u16, path: &str) -> HttpRecord {
    HttpRecord {
        start: SystemTime::UNIX_EPOCH,
        source: Peer {
            pod: Some(Arc::from("default/client-0")),
            workload: Some(Arc::from("default/client")),
            identity: None,
        },
        destination: Peer {
            pod: Some(Arc::from("default/web-1")),
            workload: Some(Arc::from("default/web")),
            identity: None,
        },
        service: Some(Arc::from("default/web")),
        route: None,
        endpoint: None,
        request: RequestLine {
            method: hyper::Method::GET,
            uri: path.parse().unwrap(),
            host: Some(hyper::header::HeaderValue::from_static("web")),
        },
        protocol: "HTTP/1.1",
        status,
        reason: None,
        duration_ms: 12.0,
        upstream_ms: Some(10.0),
        request_bytes: 0,
        response_bytes: 5,
        retries: 1,
        incomplete: false,
        trace_id: None,
        access_log: None,
    }
}

#[test]
fn requests_become_labelled_series_with_a_histogram_that_adds_up() {
    let t = Telemetry::new(Arc::new(Metrics::default()));
    t.http_plain(record(200, "/a"));
    t.http_plain(record(200, "/b"));
    t.http_plain(record(503, "/a"));
    let text = t.families.encode(vec![]);
    let find =
        |prefix: &str| -> Vec<&str> { text.lines().filter(|l| l.starts_with(prefix)).collect() };
    let ok = find("weft_requests_total{source_workload=\"default/client\",destination_service=\"default/web\",destination_workload=\"default/web\",route=\"\",status_class=\"2xx\",reason=\"\"}");
    assert_eq!(ok.len(), 1, "{text}");
    assert!(ok[0].ends_with(" 2"), "{}", ok[0]);
    let count = find("weft_request_duration_seconds_count{");
    assert!(count[0].ends_with(" 3"), "{text}");
    let inf = find("weft_request_duration_seconds_bucket{")
        .into_iter()
        .find(|l| l.contains("le=\"+Inf\""))
        .unwrap();
    assert!(inf.ends_with(" 3"), "{inf}");
    assert!(find("weft_request_retries_total{")[0].ends_with(" 3"));
    assert!(find("weft_response_bytes_total{")[0].ends_with(" 15"));
    assert!(!text.contains("/a"), "paths never become labels");
    assert!(
        text.contains("# TYPE weft_proxy_active_connections gauge"),
        "{text}"
    );
    assert!(
        text.contains("weft_proxy_outbound_accepted_total 0"),
        "{text}"
    );
}

#[test]
fn scrape_time_samples_are_encoded_with_their_labels() {
    let t = Telemetry::new(Arc::new(Metrics::default()));
    let s = |labels: Vec<(&'static str, String)>, v| families::Sample {
        name: "ebpf_connects",
        help: "Connects seen.",
        kind: crate::metrics::Kind::Counter,
        labels,
        value: v,
    };
    let text = t.families.encode(vec![
        s(vec![("verdict", "captured".into())], 4.0),
        s(vec![("verdict", "bypass".into())], 1.0),
        families::Sample {
            name: "config_generation",
            help: "Generation.",
            kind: crate::metrics::Kind::Gauge,
            labels: vec![],
            value: 7.0,
        },
    ]);
    assert!(
        text.contains("weft_ebpf_connects_total{verdict=\"captured\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("weft_ebpf_connects_total{verdict=\"bypass\"} 1"),
        "{text}"
    );
    assert!(text.contains("\nweft_config_generation 7\n"), "{text}");
}

#[test]
fn a_family_past_its_bound_counts_the_rest_as_other() {
    let t = Telemetry::new(Arc::new(Metrics::default()));
    for i in 0..families::MAX_SERIES + 5 {
        let mut r = record(200, "/");
        r.source.workload = Some(Arc::from(format!("default/c{i}")));
        t.http_plain(r);
    }
    let text = t.families.encode(vec![]);
    assert!(
        text.contains("weft_telemetry_series_overflow_total "),
        "{text}"
    );
    let other = text
        .lines()
        .find(|l| l.starts_with("weft_requests_total{source_workload=\"other\""))
        .unwrap();
    assert!(other.ends_with(" 5"), "{other}");
}

#[test]
fn records_serialize_as_one_json_object_with_their_kind() {
    let v = serde_json::to_value(Record::Http(record(200, "/x"))).unwrap();
    assert_eq!(v["kind"], "http");
    assert_eq!(v["start"], "1970-01-01T00:00:00.000Z");
    assert_eq!(v["source"]["pod"], "default/client-0");
    assert!(v["source"].get("workload").is_none());
    assert_eq!(v["status"], 200);
    assert_eq!(
        (&v["method"], &v["authority"], &v["path"]),
        (&"GET".into(), &"web".into(), &"/x".into())
    );
}

#[test]
fn a_connection_reuses_its_series_and_notices_when_labels_change() {
    let t = Telemetry::new(Arc::new(Metrics::default()));
    let cache = families::SeriesCache::default();
    t.http(record(200, "/"), Some(&cache));
    t.http(record(200, "/"), Some(&cache));
    t.http(record(503, "/"), Some(&cache));
    let mut other = record(200, "/");
    other.route = Some(Arc::from("default/r"));
    t.http(other, Some(&cache));
    let text = t.families.encode(vec![]);
    let count = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with("weft_requests_total{") && l.contains(needle))
            .unwrap_or_else(|| panic!("{needle}: {text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(count("route=\"\",status_class=\"2xx\""), "2");
    assert_eq!(count("route=\"\",status_class=\"5xx\""), "1");
    assert_eq!(count("route=\"default/r\""), "1");
}

#[test]
fn tap_filters_match_either_end_and_status_classes() {
    let rec = Record::Http(record(503, "/api/v1"));
    let f = |q: &str| Filter::from_query(q).unwrap().matches(&rec);
    assert!(f(""));
    assert!(f("workload=default/web-1"));
    assert!(f("workload=default/client"));
    assert!(!f("workload=default/other"));
    assert!(f("service=web") && f("service=default%2Fweb"));
    assert!(f("status=5xx") && f("status=503") && !f("status=2xx"));
    assert!(f("path=/api") && !f("path=/other"));
    assert!(Filter::from_query("colour=red").is_err());
    assert!(Filter::from_query("status=5x").is_err());
}

#[test]
fn canonical_names_prefer_the_app_labels() {
    let mut w = crate::config::Workload {
        name: "web-7f9".into(),
        namespace: "shop".into(),
        node: "n1".into(),
        ip: std::net::Ipv4Addr::LOCALHOST,
        labels: Default::default(),
        service_account: "default".into(),
        ports: vec![],
        netns: None,
        cgroup: None,
        meshed: true,
        agent_down: Default::default(),
        mtls: Default::default(),
        quarantine: None,
    };
    assert_eq!(canonical_name(&w), "shop/web-7f9");
    w.labels.insert("app".into(), "web".into());
    assert_eq!(canonical_name(&w), "shop/web");
    w.labels
        .insert("app.kubernetes.io/name".into(), "storefront".into());
    assert_eq!(canonical_name(&w), "shop/storefront");
}

#[test]
fn a_route_rule_turns_its_access_log_off_or_samples_it() {
    use crate::config::policy::AccessLogRule;
    let path = std::env::temp_dir().join(format!("weft-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let m = Arc::new(Metrics::default());
    let log = access_log::AccessLog::start(&access_log::Target::File(path.clone()), 1.0, m.clone())
        .unwrap();
    let t = Telemetry::new(m).with_access_log(log);
    let with = |status: u16, p: &str, rule: Option<AccessLogRule>| {
        let mut r = record(status, p);
        r.access_log = rule;
        r
    };
    let off = Some(AccessLogRule {
        enabled: false,
        sample: None,
    });
    let none_ok = Some(AccessLogRule {
        enabled: true,
        sample: Some(0.0),
    });
    t.http_plain(with(200, "/healthz", off));
    t.http_plain(with(503, "/healthz-failing", off));
    t.http_plain(with(200, "/api/sampled-out", none_ok));
    t.http_plain(with(503, "/api/failed", none_ok));
    t.http_plain(with(200, "/default", None));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let paths: Vec<String> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let paths: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["path"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        if paths.len() >= 2 || std::time::Instant::now() > deadline {
            break paths;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = std::fs::remove_file(&path);
    assert_eq!(paths, ["/api/failed", "/default"]);
}
