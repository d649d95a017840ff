//! Status for the objects weft reads from the API: Gateway API route status
//! (`status.parents[]`, with `Accepted` and `ResolvedRefs` and the standard reasons) and
//! an `Accepted` condition on weft's own CRDs. Every agent reaches the same verdicts; one
//! of them writes, elected through a `coordination.k8s.io/v1` Lease so agents never fight
//! over an object's status.
//!
//! Writes are compare-then-patch: an object whose status already says what weft would
//! write (ignoring transition times) is left alone, so a steady cluster costs no writes.
//! A patch carries the object's resourceVersion: if someone changed it meanwhile the API
//! server refuses it (409), the watch brings the new version, and the next round retries.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    runtime::reflector,
    Client,
};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{route::Resolution, Loaded};

/// The Gateway API `controllerName` weft reports as.
pub const CONTROLLER: &str = "weft.dev/mesh";
/// The Lease the status writer holds.
pub const LEASE: &str = "weft-status-writer";
const LEASE_SECONDS: i64 = 15;
const ROUND: Duration = Duration::from_secs(2);

/// The kinds whose status the writer patches.
pub const WRITES_STATUS: [&str; 7] = [
    "HTTPRoute",
    "GRPCRoute",
    "TLSRoute",
    "Mesh",
    "TrafficPolicy",
    "HTTPRouteFilter",
    "AuthorizationPolicy",
];

/// Route kinds, whose status is per parent.
const ROUTES: [&str; 3] = ["HTTPRoute", "GRPCRoute", "TLSRoute"];

/// A condition as weft would write it (without its transition time).
#[derive(Clone, Debug, PartialEq)]
struct Condition {
    kind: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

/// What the configuration made of each object.
#[derive(Debug, Default)]
pub struct Verdicts {
    /// Refused objects by (kind, namespace, name): the field, why, and whether their
    /// previous version stays in force.
    refused: HashMap<(String, String, String), (String, String, bool)>,
    /// Accepted routes with backends that cannot be followed, and why.
    unresolved: HashMap<(String, String, String), Vec<(Resolution, String)>>,
}

impl Verdicts {
    pub fn of(loaded: &Loaded) -> Self {
        let mut v = Self::default();
        for r in &loaded.rejected {
            v.refused.insert(
                (
                    r.kind.clone(),
                    r.namespace.clone().unwrap_or_default(),
                    r.name.clone(),
                ),
                (r.field.clone(), r.message.clone(), r.kept_previous),
            );
        }
        let routes = loaded
            .config
            .routes
            .iter()
            .map(|r| (r.kind.as_str(), &r.namespace, &r.name, r.unresolved()));
        let tls = loaded
            .config
            .tls_routes
            .iter()
            .map(|r| ("TLSRoute", &r.namespace, &r.name, r.unresolved()));
        for (kind, ns, name, missing) in routes.chain(tls) {
            if !missing.is_empty() {
                v.unresolved
                    .insert((kind.to_owned(), ns.clone(), name.clone()), missing);
            }
        }
        v
    }

    /// The conditions of one object: `Accepted`, and `ResolvedRefs` for routes.
    fn conditions(&self, kind: &str, ns: &str, name: &str) -> Vec<Condition> {
        let key = (kind.to_owned(), ns.to_owned(), name.to_owned());
        let route = ROUTES.contains(&kind);
        let mut out = Vec::new();
        match self.refused.get(&key) {
            Some((field, message, kept)) => {
                let reason = if !route {
                    "Invalid"
                } else if field.starts_with("spec.parentRefs") {
                    "NoMatchingParent"
                } else {
                    "UnsupportedValue"
                };
                let mut message = format!("{field}: {message}");
                if *kept {
                    message.push_str(" (the last accepted version stays in force)");
                }
                out.push(Condition {
                    kind: "Accepted",
                    status: false,
                    reason,
                    message,
                });
                if route {
                    let refs = field.contains("backendRefs")
                        && [".name", ".kind", ".group", ".namespace", ".port"]
                            .iter()
                            .any(|s| field.ends_with(s));
                    let reason = match () {
                        () if !refs => "ResolvedRefs",
                        () if field.ends_with(".kind") => "InvalidKind",
                        () if field.ends_with(".namespace") => "RefNotPermitted",
                        () => "BackendNotFound",
                    };
                    out.push(Condition {
                        kind: "ResolvedRefs",
                        status: !refs,
                        reason,
                        message: if refs {
                            "a backend reference is not valid".into()
                        } else {
                            "every reference resolved".into()
                        },
                    });
                }
            }
            None => {
                out.push(Condition {
                    kind: "Accepted",
                    status: true,
                    reason: "Accepted",
                    message: "accepted by weft".into(),
                });
                if route {
                    out.push(match self.unresolved.get(&key) {
                        Some(refs) => {
                            let of = |r: Resolution| {
                                refs.iter()
                                    .filter(|(why, _)| *why == r)
                                    .map(|(_, s)| s.as_str())
                                    .collect::<Vec<_>>()
                            };
                            let (denied, missing) =
                                (of(Resolution::NotPermitted), of(Resolution::NotFound));
                            let mut message = Vec::new();
                            if !denied.is_empty() {
                                message.push(format!(
                                    "no ReferenceGrant allows {}",
                                    denied.join(", ")
                                ));
                            }
                            if !missing.is_empty() {
                                message.push(format!("no such Service: {}", missing.join(", ")));
                            }
                            Condition {
                                kind: "ResolvedRefs",
                                status: false,
                                reason: if denied.is_empty() {
                                    "BackendNotFound"
                                } else {
                                    "RefNotPermitted"
                                },
                                message: format!(
                                    "{} (requests sent there get a 500)",
                                    message.join("; ")
                                ),
                            }
                        }
                        None => Condition {
                            kind: "ResolvedRefs",
                            status: true,
                            reason: "ResolvedRefs",
                            message: "every reference resolved".into(),
                        },
                    });
                }
            }
        }
        out
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The API's MicroTime: RFC 3339 with exactly six fractional digits.
fn micro_time(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&f).unwrap_or_default()
}

/// `conditions` as the API has them: the transition time kept from `old` where the
/// status did not change.
fn render(conditions: &[Condition], generation: i64, old: &Value) -> Value {
    Value::Array(
        conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let previous = old
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|o| o["type"] == c.kind);
                let since = previous
                    .filter(|o| o["status"] == status)
                    .and_then(|o| o["lastTransitionTime"].as_str())
                    .map_or_else(now_rfc3339, str::to_owned);
                json!({
                    "type": c.kind, "status": status, "reason": c.reason, "message": c.message,
                    "observedGeneration": generation, "lastTransitionTime": since,
                })
            })
            .collect(),
    )
}

/// Conditions without their transition times, for comparing.
fn comparable(conditions: &Value) -> Value {
    let mut c = conditions.clone();
    for x in c.as_array_mut().into_iter().flatten() {
        if let Some(m) = x.as_object_mut() {
            m.remove("lastTransitionTime");
        }
    }
    c
}

/// The status patch one object needs, or `None` when its status already says it.
fn patch_for(kind: &str, obj: &Value, verdicts: &Verdicts) -> Option<Value> {
    let meta = &obj["metadata"];
    let ns = meta["namespace"].as_str().unwrap_or_default();
    let name = meta["name"].as_str()?;
    let generation = meta["generation"].as_i64().unwrap_or(0);
    let conditions = verdicts.conditions(kind, ns, name);
    let status = if ROUTES.contains(&kind) {
        let old: Vec<&Value> = obj["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let (ours, others): (Vec<&Value>, Vec<&Value>) = old
            .into_iter()
            .partition(|p| p["controllerName"] == CONTROLLER);
        let mut parents: Vec<Value> = others.into_iter().cloned().collect();
        let mut changed = false;
        let refs = obj["spec"]["parentRefs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if refs.len() != ours.len() {
            changed = true;
        }
        for (i, parent_ref) in refs.iter().enumerate() {
            let previous = ours
                .iter()
                .find(|p| p["parentRef"] == *parent_ref)
                .map_or(&Value::Null, |p| &p["conditions"]);
            let rendered = render(&conditions, generation, previous);
            if comparable(&rendered) != comparable(previous)
                || ours.get(i).is_none_or(|p| p["parentRef"] != *parent_ref)
            {
                changed = true;
            }
            parents.push(json!({
                "parentRef": parent_ref, "controllerName": CONTROLLER, "conditions": rendered,
            }));
        }
        if !changed {
            return None;
        }
        json!({"parents": parents})
    } else {
        let previous = &obj["status"]["conditions"];
        let rendered = render(&conditions, generation, previous);
        if comparable(&rendered) == comparable(previous) {
            return None;
        }
        json!({"conditions": rendered})
    };
    Some(json!({"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}))
}

/// Writes status when this agent holds the Lease.
pub struct StatusWriter {
    verdicts: watch::Sender<Arc<Verdicts>>,
    /// Whether this agent holds the Lease now.
    pub leading: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StatusWriter {
    /// Start competing for the Lease `namespace/weft-status-writer` as `identity`.
    pub fn start(
        client: Client,
        caches: Vec<(String, ApiResource, reflector::Store<DynamicObject>)>,
        identity: String,
        namespace: String,
    ) -> Self {
        let (tx, mut rx) = watch::channel(Arc::new(Verdicts::default()));
        let leading = Arc::new(AtomicBool::new(false));
        let flag = leading.clone();
        let task = tokio::spawn(async move {
            let lease_ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"),
                "leases",
            );
            let leases: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, &lease_ar);
            loop {
                let lead = match hold_lease(&leases, &identity).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, lease = %format!("{namespace}/{LEASE}"), "cannot reach the status Lease");
                        false
                    }
                };
                if lead != flag.swap(lead, Ordering::Relaxed) {
                    tracing::info!(
                        lease = %format!("{namespace}/{LEASE}"),
                        "{}",
                        if lead { "writing status: this agent holds the Lease" } else { "another agent writes status" }
                    );
                }
                if lead {
                    let verdicts = rx.borrow_and_update().clone();
                    write_all(&client, &caches, &verdicts).await;
                }
                tokio::select! {
                    _ = rx.changed() => {}
                    () = tokio::time::sleep(ROUND) => {}
                }
            }
        });
        Self {
            verdicts: tx,
            leading,
            task,
        }
    }

    /// The verdicts of the configuration just applied.
    pub fn publish(&self, loaded: &Loaded) {
        self.verdicts.send_replace(Arc::new(Verdicts::of(loaded)));
    }
}

/// Take, renew or keep away from the Lease; whether this agent holds it now.
async fn hold_lease(leases: &Api<DynamicObject>, identity: &str) -> kube::Result<bool> {
    let now = time::OffsetDateTime::now_utc();
    let spec = |transitions: i64, acquired: &Value| {
        json!({
            "holderIdentity": identity,
            "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": if acquired.is_string() { acquired.clone() } else { json!(micro_time(now)) },
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        })
    };
    let Some(mut lease) = leases.get_opt(LEASE).await? else {
        let mut obj = DynamicObject::new(LEASE, &leases_resource());
        obj.data = json!({"spec": spec(0, &Value::Null)});
        return match leases.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let held = &lease.data["spec"];
    let holder = held["holderIdentity"].as_str().unwrap_or_default();
    let renewed = held["renewTime"].as_str().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let duration = held["leaseDurationSeconds"]
        .as_i64()
        .unwrap_or(LEASE_SECONDS);
    let expired = renewed.is_none_or(|r| r + time::Duration::seconds(duration) < now);
    let transitions = held["leaseTransitions"].as_i64().unwrap_or(0);
    let next = if holder == identity {
        spec(transitions, &held["acquireTime"])
    } else if expired || holder.is_empty() {
        spec(transitions + 1, &Value::Null)
    } else {
        return Ok(false);
    };
    lease.data["spec"] = next;
    match leases.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else renewed or took it first.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn leases_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"),
        "leases",
    )
}

/// Patch every object whose status does not say what weft would write.
async fn write_all(
    client: &Client,
    caches: &[(String, ApiResource, reflector::Store<DynamicObject>)],
    verdicts: &Verdicts,
) {
    for (kind, ar, store) in caches {
        if !WRITES_STATUS.contains(&kind.as_str()) {
            continue;
        }
        for o in store.state() {
            let Ok(obj) = serde_json::to_value(&*o) else {
                continue;
            };
            let Some(patch) = patch_for(kind, &obj, verdicts) else {
                continue;
            };
            let name = o.metadata.name.clone().unwrap_or_default();
            let api: Api<DynamicObject> = match &o.metadata.namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
                None => Api::all_with(client.clone(), ar),
            };
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => tracing::debug!(kind = %kind, name = %name, "status written"),
                // Changed meanwhile: the watch brings the new version; next round.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    tracing::warn!(kind = %kind, name = %name, error = %e, "writing status failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_route_is_not_accepted_and_says_why() {
        let mut v = Verdicts::default();
        v.refused.insert(
            ("HTTPRoute".into(), "default".into(), "r".into()),
            (
                "spec.rules[0].backendRefs[0].weight".into(),
                "must be 0 to 1000000".into(),
                true,
            ),
        );
        let obj = json!({
            "metadata": {"name": "r", "namespace": "default", "generation": 3, "resourceVersion": "7"},
            "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": ""}]},
            "status": {"parents": [{"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway", "conditions": []}]}
        });
        let patch = patch_for("HTTPRoute", &obj, &v).expect("a patch");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        let parents = patch["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "another controller's entry is kept");
        let ours = &parents[1];
        assert_eq!(ours["controllerName"], CONTROLLER);
        let c = &ours["conditions"];
        assert_eq!(
            (&c[0]["type"], &c[0]["status"], &c[0]["reason"]),
            (
                &json!("Accepted"),
                &json!("False"),
                &json!("UnsupportedValue")
            )
        );
        assert_eq!(c[0]["observedGeneration"], 3);
        assert!(c[0]["message"]
            .as_str()
            .unwrap()
            .contains("weight: must be 0 to 1000000 (the last accepted version stays in force)"));
        assert_eq!(
            (&c[1]["type"], &c[1]["status"], &c[1]["reason"]),
            (
                &json!("ResolvedRefs"),
                &json!("True"),
                &json!("ResolvedRefs")
            ),
            "a weight is no reference"
        );
        // Written once: the same status again needs no patch.
        let mut written = obj.clone();
        written["status"] = patch["status"].clone();
        assert_eq!(patch_for("HTTPRoute", &written, &v), None);
    }

    #[test]
    fn a_backend_no_grant_allows_is_ref_not_permitted() {
        let mut v = Verdicts::default();
        v.unresolved.insert(
            ("GRPCRoute".into(), "web".into(), "g".into()),
            vec![
                (Resolution::NotFound, "web/gone:80".into()),
                (Resolution::NotPermitted, "shop/cart:80".into()),
            ],
        );
        let obj = json!({
            "metadata": {"name": "g", "namespace": "web", "generation": 1, "resourceVersion": "2"},
            "spec": {"parentRefs": [{"name": "cart", "namespace": "shop", "kind": "Service"}]},
        });
        let patch = patch_for("GRPCRoute", &obj, &v).expect("a patch");
        let c = &patch["status"]["parents"][0]["conditions"];
        assert_eq!(
            (&c[0]["type"], &c[0]["status"]),
            (&json!("Accepted"), &json!("True"))
        );
        assert_eq!(
            (&c[1]["type"], &c[1]["status"], &c[1]["reason"]),
            (
                &json!("ResolvedRefs"),
                &json!("False"),
                &json!("RefNotPermitted")
            )
        );
        let m = c[1]["message"].as_str().unwrap();
        assert!(
            m.contains("no ReferenceGrant allows shop/cart:80")
                && m.contains("no such Service: web/gone:80"),
            "{m}"
        );
    }
}
