//! An in-test stand-in for the Kubernetes API server: no real one can run on these
//! machines, so agents in Kubernetes mode are tested against this. It speaks the parts of
//! the real protocol a client's list/watch depends on, over plain HTTP/1.1:
//!
//! - list (`GET /api/v1/pods`, `/apis/GROUP/VERSION/PLURAL`, also per namespace) answers
//!   with the collection's `resourceVersion`, paged by `limit` and `continue`; the items
//!   carry no apiVersion/kind for Kubernetes' own types, as the real server sends them;
//! - watch (`?watch=true&resourceVersion=N`) streams `ADDED`/`MODIFIED`/`DELETED` events
//!   after N as chunked JSON lines, `BOOKMARK`s when asked for, and ends after
//!   `timeoutSeconds`;
//! - a resourceVersion older than the server keeps history for gets an `ERROR` event with
//!   a 410 Gone `Status`, as after etcd compaction; [`ApiServer::expire`] does that to every
//!   open watch;
//! - an unknown resource is a 404 `Status` (a CRD that is not installed);
//! - GET, POST and PUT of one object (409 on a stale resourceVersion), and merge patches
//!   of an object or of its `status`.
//!
//! Objects are kept as JSON exactly as given (tests write them as the API server prints
//! them); the server fills in `resourceVersion`, `uid` and `creationTimestamp`. As the
//! real server does for a CRD that serves several versions, one object is served at every
//! version of its resource, its `apiVersion` set to the one asked for. Every request line
//! is logged, so tests can see list and watch traffic.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// A resource: the path segment after the group version, and the kind it holds. Two
/// versions of one group's resource are the same resource.
#[derive(Clone, Debug)]
struct Resource {
    /// `v1` or `GROUP/VERSION`.
    api_version: String,
    plural: String,
}

impl Resource {
    fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(g, _)| g)
    }

    /// `obj` as served at this resource's version.
    fn serve(&self, mut obj: Value) -> Value {
        if obj.get("apiVersion").is_some() && !builtin(&self.api_version) {
            obj["apiVersion"] = json!(self.api_version);
        }
        obj
    }
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Resource {}

impl PartialOrd for Resource {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Resource {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.group(), &self.plural).cmp(&(other.group(), &other.plural))
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Objects by resource, namespace and name.
    objects: BTreeMap<(Resource, String, String), Value>,
    /// Every change: resourceVersion, resource, event type, object.
    events: Vec<(u64, Resource, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    requests: Vec<String>,
    /// Resources that answer 404 (CRDs not installed).
    missing: Vec<String>,
}

/// The server; stopped when dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Kinds Kubernetes itself defines: their list items carry no apiVersion/kind.
fn builtin(api_version: &str) -> bool {
    api_version == "v1" || api_version.ends_with(".k8s.io/v1") && !api_version.contains("gateway")
}

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with('s') {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    }
}

impl ApiServer {
    /// Listen on `addr` inside the network namespace at `netns` (a path under
    /// /var/run/netns), or in the caller's when `None`.
    pub fn start(netns: Option<&Path>, addr: &str) -> Self {
        let listener = match netns {
            None => TcpListener::bind(addr).expect("binding the API server"),
            Some(ns) => {
                let ns = std::fs::File::open(ns).expect("opening the netns");
                let addr = addr.to_owned();
                // A thread of its own enters the namespace; the socket stays bound there.
                thread::spawn(move || {
                    // SAFETY: setns on this thread only, with a valid namespace descriptor.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    TcpListener::bind(&addr).expect("binding the API server")
                })
                .join()
                .expect("binding thread")
            }
        };
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let shared = shared.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    let stop = stop.clone();
                    thread::spawn(move || serve(conn, &shared, &stop));
                }
            });
        }
        Self { addr, shared, stop }
    }

    /// A kubeconfig naming this server (no authentication).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"http://{}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.addr
        )
    }

    /// Make `resource` (`GROUP/VERSION/PLURAL`) answer 404, as a CRD that is not installed.
    pub fn without(&self, resource: &str) {
        self.shared
            .0
            .lock()
            .unwrap()
            .missing
            .push(resource.to_owned());
    }

    /// Create or replace an object (`apiVersion`, `kind`, `metadata.name`, and
    /// `metadata.namespace` for namespaced kinds, as the API server prints it).
    pub fn apply(&self, mut obj: Value) {
        let (lock, cond) = &*self.shared;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let (res, ns, name) = key(&obj);
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("uid")
            .or_insert_with(|| json!(format!("00000000-0000-4000-8000-{rv:012}")));
        meta.entry("creationTimestamp")
            .or_insert_with(|| json!("2026-12-06T10:00:00Z"));
        let kind = if st
            .objects
            .insert((res.clone(), ns, name), obj.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.events.push((rv, res, kind, obj));
        cond.notify_all();
    }

    /// Delete an object; watchers get a `DELETED` event with its last state.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let (lock, cond) = &*self.shared;
        let mut st = lock.lock().unwrap();
        let res = Resource {
            api_version: api_version.to_owned(),
            plural: plural(kind),
        };
        let Some(mut obj) =
            st.objects
                .remove(&(res.clone(), namespace.to_owned(), name.to_owned()))
        else {
            panic!("no {kind} {namespace}/{name} to delete");
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let rv = st.rv;
        st.events.push((rv, res, "DELETED", obj));
        cond.notify_all();
    }

    /// Forget the history (as etcd compaction does) and end every open watch: watchers
    /// coming back with an older resourceVersion get 410 Gone and must list again.
    pub fn expire(&self) {
        let (lock, cond) = &*self.shared;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        st.oldest = st.rv;
        st.epoch += 1;
        st.events.clear();
        cond.notify_all();
    }

    /// An object as the server holds it now.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Resource {
            api_version: api_version.to_owned(),
            plural: plural(kind),
        };
        self.shared
            .0
            .lock()
            .unwrap()
            .objects
            .get(&(res, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every request line served so far (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.1.notify_all();
        // Wake the accept loop so it sees the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Where an object lives: its resource, namespace ("" for cluster-scoped) and name.
fn key(obj: &Value) -> (Resource, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        Resource {
            api_version: s(&obj["apiVersion"]),
            plural: plural(obj["kind"].as_str().expect("kind")),
        },
        s(&obj["metadata"]["namespace"]),
        s(&obj["metadata"]["name"]),
    )
}

/// A request's target: the resource, the namespace, and the object's name and
/// subresource when it names one.
struct Target {
    res: Resource,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

/// `/api/v1[/namespaces/NS]/PLURAL[/NAME[/status]]`, or `/apis/G/V/...` likewise.
fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, p, rest @ ..] if !p.is_empty() => (
            Some((*ns).to_owned()),
            std::iter::once(*p)
                .chain(rest.iter().copied())
                .collect::<Vec<_>>(),
        ),
        r => (None, r.to_vec()),
    };
    let (plural, name, status) = match rest.as_slice() {
        [p] => (*p, None, false),
        [p, n] => (*p, Some((*n).to_owned()), false),
        [p, n, "status"] => (*p, Some((*n).to_owned()), true),
        _ => return None,
    };
    Some(Target {
        res: Resource {
            api_version,
            plural: plural.to_owned(),
        },
        ns,
        name,
        status,
    })
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        v => *target = v.clone(),
    }
}

impl State {
    /// Store `obj` as a new version (bumping resourceVersion) and tell watchers.
    fn put(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .insert((res.clone(), ns.to_owned(), name.to_owned()), obj.clone());
        self.events.push((self.rv, res.clone(), kind, obj.clone()));
        obj
    }
}

/// GET, POST, PUT of one object and PATCH of its status, as the API server answers them.
fn object(
    conn: &mut TcpStream,
    shared: &(Mutex<State>, Condvar),
    method: &str,
    t: &Target,
    body: &[u8],
) -> std::io::Result<()> {
    let (lock, cond) = shared;
    let mut st = lock.lock().unwrap();
    let ns = t.ns.clone().unwrap_or_default();
    let not_found = |name: &str| {
        status(
            404,
            "NotFound",
            &format!("{} {name:?} not found", t.res.plural),
        )
    };
    let conflict = || {
        status(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
        )
    };
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (code, answer) = match (method, &t.name) {
        ("GET", Some(name)) => match st.objects.get(&(t.res.clone(), ns.clone(), name.clone())) {
            Some(o) => (200, o.clone()),
            None => (404, not_found(name)),
        },
        ("POST", None) => {
            let name = parsed["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if st
                .objects
                .contains_key(&(t.res.clone(), ns.clone(), name.clone()))
            {
                (
                    409,
                    status(
                        409,
                        "AlreadyExists",
                        &format!("{} {name:?} already exists", t.res.plural),
                    ),
                )
            } else {
                let mut o = parsed.clone();
                o["metadata"]["uid"] = json!(format!("00000000-0000-4000-9000-{:012}", st.rv + 1));
                (201, st.put(&t.res, &ns, &name, o, "ADDED"))
            }
        }
        ("PUT", Some(name)) => match st.objects.get(&(t.res.clone(), ns.clone(), name.clone())) {
            None => (404, not_found(name)),
            Some(o)
                if o["metadata"]["resourceVersion"] != parsed["metadata"]["resourceVersion"] =>
            {
                (409, conflict())
            }
            Some(o) => {
                let mut n = parsed.clone();
                n["metadata"]["uid"] = o["metadata"]["uid"].clone();
                (200, st.put(&t.res, &ns, name, n, "MODIFIED"))
            }
        },
        ("PATCH", Some(name)) if t.status => {
            match st
                .objects
                .get(&(t.res.clone(), ns.clone(), name.clone()))
                .cloned()
            {
                None => (404, not_found(name)),
                Some(o)
                    if parsed["metadata"]["resourceVersion"].is_string()
                        && o["metadata"]["resourceVersion"]
                            != parsed["metadata"]["resourceVersion"] =>
                {
                    (409, conflict())
                }
                Some(mut o) => {
                    // The status subresource changes the status only.
                    merge(&mut o["status"], &parsed["status"]);
                    (200, st.put(&t.res, &ns, name, o, "MODIFIED"))
                }
            }
        }
        ("PATCH", Some(name)) => {
            match st
                .objects
                .get(&(t.res.clone(), ns.clone(), name.clone()))
                .cloned()
            {
                None => (404, not_found(name)),
                Some(mut o) => {
                    // A merge patch of the object; its status is the subresource's.
                    let mut patch = parsed.clone();
                    if let Some(m) = patch.as_object_mut() {
                        m.remove("status");
                    }
                    merge(&mut o, &patch);
                    (200, st.put(&t.res, &ns, name, o, "MODIFIED"))
                }
            }
        }
        _ => (
            405,
            status(
                405,
                "MethodNotAllowed",
                "not supported by this test API server",
            ),
        ),
    };
    cond.notify_all();
    drop(st);
    let answer = if code < 300 {
        t.res.serve(answer)
    } else {
        answer
    };
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Method Not Allowed",
    };
    respond(conn, code, reason, &answer)
}

fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%2C", ",")))
        .collect()
}

fn respond(conn: &mut TcpStream, code: u16, reason: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn chunk(conn: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut data = line.to_string();
    data.push('\n');
    write!(conn, "{:x}\r\n{data}\r\n", data.len())?;
    conn.flush()
}

fn serve(conn: TcpStream, shared: &(Mutex<State>, Condvar), stop: &std::sync::atomic::AtomicBool) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end().to_owned();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        shared.0.lock().unwrap().requests.push(line.clone());
        let mut words = line.split(' ');
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let (path, q) = target.split_once('?').unwrap_or((target, ""));
        let q = query(q);
        let Some(t) = parse_path(path) else {
            let _ = respond(
                &mut conn,
                404,
                "Not Found",
                &status(404, "NotFound", "no such path on this test API server"),
            );
            continue;
        };
        if t.name.is_some() || method != "GET" {
            if object(&mut conn, shared, method, &t, &body).is_err() {
                return;
            }
            continue;
        }
        let (res, ns) = (t.res, t.ns);
        let missing = {
            let st = shared.0.lock().unwrap();
            st.missing
                .contains(&format!("{}/{}", res.api_version, res.plural))
        };
        if missing {
            let msg = format!(
                "the server could not find the requested resource ({})",
                res.plural
            );
            if respond(&mut conn, 404, "Not Found", &status(404, "NotFound", &msg)).is_err() {
                return;
            }
            continue;
        }
        if q.get("watch").map(String::as_str) == Some("true")
            || q.get("watch").map(String::as_str) == Some("1")
        {
            watch(conn, shared, stop, &res, ns.as_deref(), &q);
            return;
        }
        if list(&mut conn, shared, &res, ns.as_deref(), &q).is_err() {
            return;
        }
    }
}

/// The kind a resource holds (the inverse of [`plural`] for the kinds weft watches).
fn kind_of(res: &Resource) -> String {
    const KINDS: [(&str, &str); 13] = [
        ("nodes", "Node"),
        ("namespaces", "Namespace"),
        ("pods", "Pod"),
        ("services", "Service"),
        ("endpointslices", "EndpointSlice"),
        ("httproutes", "HTTPRoute"),
        ("tlsroutes", "TLSRoute"),
        ("grpcroutes", "GRPCRoute"),
        ("referencegrants", "ReferenceGrant"),
        ("meshes", "Mesh"),
        ("trafficpolicies", "TrafficPolicy"),
        ("httproutefilters", "HTTPRouteFilter"),
        ("authorizationpolicies", "AuthorizationPolicy"),
    ];
    KINDS
        .iter()
        .find(|(p, _)| *p == res.plural)
        .map(|(_, k)| (*k).to_owned())
        .unwrap_or_else(|| res.plural.clone())
}

fn list(
    conn: &mut TcpStream,
    shared: &(Mutex<State>, Condvar),
    res: &Resource,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let st = shared.0.lock().unwrap();
    let all: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((r, n, _), _)| r == res && ns.is_none_or(|ns| ns == n))
        .map(|(_, v)| v)
        .collect();
    let start: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|v| {
            let mut v = res.serve((*v).clone());
            if builtin(&res.api_version) {
                let m = v.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
            }
            v
        })
        .collect();
    let mut meta = json!({"resourceVersion": st.rv.to_string()});
    let next = start + page.len();
    if next < all.len() {
        meta["continue"] = json!(next.to_string());
        meta["remainingItemCount"] = json!(all.len() - next);
    }
    let body = json!({
        "apiVersion": res.api_version,
        "kind": format!("{}List", kind_of(res)),
        "metadata": meta,
        "items": page,
    });
    drop(st);
    respond(conn, 200, "OK", &body)
}

fn watch(
    mut conn: TcpStream,
    shared: &(Mutex<State>, Condvar),
    stop: &std::sync::atomic::AtomicBool,
    res: &Resource,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) {
    let (lock, cond) = shared;
    let mut cursor: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300),
    );
    let started = Instant::now();
    if write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let mut st = lock.lock().unwrap();
    let epoch = st.epoch;
    let mut last_bookmark = Instant::now();
    let kind = kind_of(res);
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || st.epoch != epoch {
            break;
        }
        if cursor < st.oldest {
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {cursor} ({})", st.oldest),
            );
            let _ = chunk(&mut conn, &json!({"type": "ERROR", "object": gone}));
            break;
        }
        let events: Vec<(u64, &'static str, Value)> = st
            .events
            .iter()
            .filter(|(rv, r, _, o)| {
                *rv > cursor
                    && r == res
                    && ns.is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            })
            .map(|(rv, _, t, o)| (*rv, *t, res.serve(o.clone())))
            .collect();
        let now_rv = st.rv;
        drop(st);
        for (rv, t, o) in events {
            if chunk(&mut conn, &json!({"type": t, "object": o})).is_err() {
                return;
            }
            cursor = rv;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let b = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": res.api_version,
                "metadata": {"resourceVersion": now_rv.to_string()}}});
            if chunk(&mut conn, &b).is_err() {
                return;
            }
            cursor = cursor.max(now_rv);
            last_bookmark = Instant::now();
        }
        if started.elapsed() >= timeout {
            break;
        }
        st = lock.lock().unwrap();
        st = cond.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
    }
    let _ = write!(conn, "0\r\n\r\n");
    let _ = conn.flush();
}
