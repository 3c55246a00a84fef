//! An in-memory Kubernetes API server behind kube's `tower-test` mock service, strict where
//! a real one is strict, so that a reconciler passing here does not meet its first refusal
//! on a cluster.
//!
//! It answers what the reconcilers send (GET, LIST with label selectors, POST, server-side
//! apply, merge and JSON patches, DELETE) from a map of objects, records every request, and
//! can fail chosen requests, so a scenario checks what the operator *did* rather than the
//! exact order of its calls. Like a real API server, it:
//!
//! - authorizes every request against the chart's RBAC ([`rbac`]): a verb not granted on
//!   the resource gets 403 with the API server's message, and a server-side apply of an
//!   absent object needs `create` as well as `patch`. Setting an owner reference with
//!   `blockOwnerDeletion` needs `update` on the owner's `finalizers`, as it does where
//!   the OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, hardened
//!   clusters).
//! - applies server-side apply with field ownership per manager ([`apply`]), not a JSON merge.
//! - deletes with a grace period: an object with finalizers gets `deletionTimestamp` and
//!   stays (Terminating) until its last finalizer is removed, and then goes; no finalizer
//!   may be added to it meanwhile. A Pod stays Terminating until the kubelet
//!   ([`FakeApi::kubelet`]) has stopped it.
//! - protects volumes in use: a PersistentVolumeClaim is created with the finalizer
//!   [`PVC_PROTECTION`] (admission plugin `StorageObjectInUseProtection`), and a deleted one
//!   stays Terminating while a Pod, Terminating or not, still uses it (the pvc-protection
//!   controller, modelled at each deletion and kubelet step).
//!
//! Not modelled: owner-reference garbage collection, admission defaults, immutable fields,
//! watches, resource-version preconditions.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// A refusal is the HTTP response itself, returned early with `?`; test code, one per request.
#![allow(clippy::result_large_err)]

pub mod apply;
pub mod rbac;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use self::apply::Managed;
use self::rbac::{Attributes, Rbac};

type Objects = BTreeMap<String, BTreeMap<String, Value>>;

/// The time the fake stamps on deletions.
pub const DELETION_TIME: &str = "2026-01-01T00:00:00Z";

/// The finalizer the API server puts on every PersistentVolumeClaim; the pvc-protection
/// controller removes it from a deleted claim once no Pod uses the claim.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";

/// The claims' collection of the namespace of a Pod or claim collection.
fn claims_beside(collection: &str) -> Option<String> {
    if collection.ends_with("/persistentvolumeclaims") {
        return Some(collection.to_owned());
    }
    collection.strip_suffix("/pods").map(|ns| format!("{ns}/persistentvolumeclaims"))
}

/// A request the fake API answered: method, path, and query.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
}

pub struct ApiState {
    /// Objects by collection path (`/api/v1/namespaces/ns/pods`), then name.
    pub objects: Objects,
    /// Field ownership by collection path and name.
    pub managed: BTreeMap<(String, String), Managed>,
    pub calls: Vec<Call>,
    /// Answer the next request whose method and path match with this status code.
    pub failures: VecDeque<(String, String, u16)>,
    /// What the operator may do; `None` lets everything through.
    pub rbac: Option<Rbac>,
    /// Every (group, resource, verb) a request was authorized for.
    pub used: BTreeSet<(String, String, String)>,
    next_uid: u64,
}

impl Default for ApiState {
    fn default() -> Self {
        ApiState {
            objects: Objects::new(),
            managed: BTreeMap::new(),
            calls: Vec::new(),
            failures: VecDeque::new(),
            rbac: Some(Rbac::chart()),
            used: BTreeSet::new(),
            next_uid: 0,
        }
    }
}

/// The fake API server; by default it enforces the chart's RBAC.
#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<ApiState>>);

/// Where a request goes: `/api/v1/namespaces/apps/pods/m1/status` and the like.
struct Target {
    collection: String,
    group: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Target {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, mut at) = if parts[0] == "api" { ("", 2) } else { (parts[1], 3) };
        let namespace = if parts.get(at) == Some(&"namespaces") && parts.len() > at + 2 {
            at += 2;
            Some(parts[at - 1].to_string())
        } else {
            None
        };
        Target {
            collection: format!("/{}", parts[..=at].join("/")),
            group: group.to_string(),
            namespace,
            resource: parts[at].to_string(),
            name: parts.get(at + 1).map(|s| s.to_string()),
            subresource: parts.get(at + 2).map(|s| s.to_string()),
        }
    }

    fn attributes(&self, verb: &str) -> Attributes {
        let resource = match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        };
        Attributes {
            verb: verb.into(),
            group: self.group.clone(),
            resource,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap()
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder().status(200).body(Body::from(serde_json::to_vec(v).unwrap())).unwrap()
}

fn matches_selector(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let labels = &obj["metadata"]["labels"];
        match term.split_once('=') {
            Some((k, v)) => labels[k] == v,
            None => !labels[term].is_null(),
        }
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|s| s.replace("%3D", "=").replace("%2F", "/").replace("%2C", ",").replace("%3A", ":"))
}

fn finalizers(obj: &Value) -> BTreeSet<String> {
    obj["metadata"]["finalizers"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).map(Into::into).collect()
}

/// Owner references with `blockOwnerDeletion` that `after` has and `before` had not, as
/// the `update` on `<owner>/finalizers` they need.
fn blocking_owners(before: Option<&Value>, after: &Value, namespace: &Option<String>) -> Vec<Attributes> {
    let refs = |v: Option<&Value>| -> Vec<Value> {
        v.and_then(|v| v["metadata"]["ownerReferences"].as_array().cloned()).unwrap_or_default()
    };
    let old = refs(before);
    refs(Some(after))
        .into_iter()
        .filter(|r| r["blockOwnerDeletion"] == true && !old.contains(r))
        .map(|r| {
            let group = r["apiVersion"].as_str().unwrap_or_default().rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            let plural = format!("{}s", r["kind"].as_str().unwrap_or_default().to_lowercase());
            Attributes {
                verb: "update".into(),
                group: group.into(),
                resource: format!("{plural}/finalizers"),
                namespace: namespace.clone(),
                name: r["name"].as_str().map(Into::into),
            }
        })
        .collect()
}

impl ApiState {
    /// Authorizes `a` (recording it as used), or the API server's 403.
    fn authorize(&mut self, a: &Attributes, create_on_apply: bool) -> Result<(), Response<Body>> {
        let Some(rbac) = &self.rbac else { return Ok(()) };
        if rbac.allows(a) {
            self.used.insert((a.group.clone(), a.resource.clone(), a.verb.clone()));
            return Ok(());
        }
        Err(status_body(403, "Forbidden", &rbac::forbidden_message(a, create_on_apply)))
    }

    fn authorize_owners(&mut self, before: Option<&Value>, after: &Value, t: &Target) -> Result<(), Response<Body>> {
        for a in blocking_owners(before, after, &t.namespace) {
            if self.authorize(&a, false).is_err() {
                let message = format!(
                    "{} \"{}\" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a \
                     resource you can't set finalizers on: {}",
                    t.resource,
                    t.name.clone().unwrap_or_default(),
                    rbac::forbidden_message(&a, false)
                );
                return Err(status_body(403, "Forbidden", &message));
            }
        }
        Ok(())
    }

    /// Deletes as the API server does: at once, or Terminating while finalizers (or, for a
    /// Pod, the kubelet) hold it; then the pvc-protection controller looks again.
    fn delete(&mut self, collection: &str, name: &str, grace: Option<i64>) -> Option<Value> {
        let deleted = self.delete_object(collection, name, grace);
        if let Some(claims) = claims_beside(collection) {
            self.release_unused_claims(&claims);
        }
        deleted
    }

    /// Admission: a new claim is protected while in use ([`PVC_PROTECTION`]).
    fn admit(collection: &str, obj: &mut Value) {
        if collection.ends_with("/persistentvolumeclaims") && !finalizers(obj).contains(PVC_PROTECTION) {
            let mut f: Vec<Value> = obj["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
            f.push(json!(PVC_PROTECTION));
            obj["metadata"]["finalizers"] = json!(f);
        }
    }

    /// The pvc-protection controller: a Terminating claim of `claims` that no Pod of its
    /// namespace uses any more (a Terminating Pod still does) loses [`PVC_PROTECTION`], and
    /// goes with its last finalizer.
    fn release_unused_claims(&mut self, claims: &str) {
        let pods = claims.replace("/persistentvolumeclaims", "/pods");
        let used: BTreeSet<String> = self
            .objects
            .get(&pods)
            .into_iter()
            .flat_map(|c| c.values())
            .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
            .flat_map(|p| p["spec"]["volumes"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str().map(str::to_owned))
            .collect();
        let Some(objects) = self.objects.get_mut(claims) else { return };
        let released: Vec<String> = objects
            .iter_mut()
            .filter(|(n, c)| !c["metadata"]["deletionTimestamp"].is_null() && !used.contains(*n))
            .filter(|(_, c)| finalizers(c).contains(PVC_PROTECTION))
            .map(|(n, c)| {
                let rest: Vec<String> = finalizers(c).into_iter().filter(|f| f != PVC_PROTECTION).collect();
                c["metadata"]["finalizers"] = json!(rest);
                n.clone()
            })
            .collect();
        for n in released {
            self.finish_deletion(claims, &n);
        }
    }

    fn delete_object(&mut self, collection: &str, name: &str, grace: Option<i64>) -> Option<Value> {
        let objects = self.objects.get_mut(collection)?;
        let obj = objects.get_mut(name)?;
        let is_pod = obj["kind"] == "Pod" || collection.ends_with("/pods");
        // A Pod deleted with no grace period (`--force --grace-period=0`) is forgotten at
        // once, Terminating or not: nobody waits for its kubelet.
        if is_pod && grace == Some(0) && finalizers(obj).is_empty() {
            self.managed.remove(&(collection.to_string(), name.to_string()));
            return objects.remove(name);
        }
        if !obj["metadata"]["deletionTimestamp"].is_null() {
            return Some(obj.clone());
        }
        if finalizers(obj).is_empty() && !is_pod {
            self.managed.remove(&(collection.to_string(), name.to_string()));
            return objects.remove(name);
        }
        let grace = if is_pod {
            grace.or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64()).unwrap_or(30)
        } else {
            0
        };
        obj["metadata"]["deletionTimestamp"] = json!(DELETION_TIME);
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        Some(obj.clone())
    }

    /// After a write: a Terminating object whose last finalizer went is gone (a Pod waits
    /// for the kubelet as well).
    fn finish_deletion(&mut self, collection: &str, name: &str) -> bool {
        let Some(obj) = self.objects.get(collection).and_then(|c| c.get(name)) else { return false };
        let is_pod = obj["kind"] == "Pod" || collection.ends_with("/pods");
        if obj["metadata"]["deletionTimestamp"].is_null() || !finalizers(obj).is_empty() || is_pod {
            return false;
        }
        self.objects.get_mut(collection).unwrap().remove(name);
        self.managed.remove(&(collection.to_string(), name.to_string()));
        true
    }
}

impl FakeApi {
    /// A fake API server that lets the operator do anything.
    pub fn unrestricted() -> FakeApi {
        let api = FakeApi::default();
        api.0.lock().unwrap().rbac = None;
        api
    }

    pub fn set_rbac(&self, rbac: Option<Rbac>) {
        self.0.lock().unwrap().rbac = rbac;
    }

    pub fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let resp = api.answer(req).await;
                send.send_response(resp);
            }
        });
        kube::Client::new(service, "default")
    }

    /// Stores an object as an administrator would, bypassing RBAC.
    pub fn put(&self, collection: &str, obj: Value) {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        self.0.lock().unwrap().objects.entry(collection.to_string()).or_default().insert(name, obj);
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(collection).and_then(|c| c.get(name)).cloned()
    }

    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.0.lock().unwrap().objects.get(collection).map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// An object vanishes at once (a lost node's Pod, a lost volume), finalizers or not.
    pub fn remove(&self, collection: &str, name: &str) {
        let mut st = self.0.lock().unwrap();
        if let Some(c) = st.objects.get_mut(collection) {
            c.remove(name);
        }
        st.managed.remove(&(collection.to_string(), name.to_string()));
        if let Some(claims) = claims_beside(collection) {
            st.release_unused_claims(&claims);
        }
    }

    /// `kubectl delete` by an administrator: the API server's deletion, bypassing RBAC.
    pub fn delete(&self, collection: &str, name: &str) {
        self.0.lock().unwrap().delete(collection, name, None);
    }

    /// The fields each manager owns in one object, dotted.
    pub fn managed_fields(&self, collection: &str, name: &str, manager: &str) -> Vec<String> {
        let st = self.0.lock().unwrap();
        st.managed.get(&(collection.to_string(), name.to_string())).map(|m| m.fields_of(manager)).unwrap_or_default()
    }

    /// Every (group, resource, verb) the API authorized so far.
    pub fn used(&self) -> BTreeSet<(String, String, String)> {
        self.0.lock().unwrap().used.clone()
    }

    pub fn fail_next(&self, method: &str, path_contains: &str, code: u16) {
        self.0.lock().unwrap().failures.push_back((method.into(), path_contains.into(), code));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    async fn answer(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = req.into_body().collect_bytes().await.unwrap();
        let mut st = self.0.lock().unwrap();
        st.calls.push(Call { method: method.clone(), path: path.clone() });
        if let Some(i) = st.failures.iter().position(|(m, p, _)| *m == method && path.contains(p.as_str())) {
            let (_, _, code) = st.failures.remove(i).unwrap();
            let reason = if code == 409 { "Conflict" } else { "InternalError" };
            return status_body(code, reason, "injected failure");
        }
        let t = Target::parse(&path);
        let watch = matches!(query_param(&query, "watch").as_deref(), Some("true" | "1"));
        let verb = match (method.as_str(), &t.name) {
            ("GET", Some(_)) => "get",
            ("GET", None) if watch => "watch",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", Some(_)) => "delete",
            ("DELETE", None) => "deletecollection",
            _ => return status_body(405, "MethodNotAllowed", "not supported by the fake"),
        };
        if let Err(refused) = st.authorize(&t.attributes(verb), false) {
            return refused;
        }
        match st.handle(&t, verb, &query, &content_type, &body) {
            Ok(r) | Err(r) => r,
        }
    }

    /// The scheduler and the kubelets: a Pod bound to a node marks its volume's claim with
    /// the node (`volume.kubernetes.io/selected-node`), as the scheduler does; every Terminating Pod with no finalizers left stops
    /// and goes, unless its node is NotReady or gone (no kubelet there to stop it); every
    /// Pod not yet started is bound to the first Ready, schedulable node of its zone
    /// (label `nimbus.io/zone`) and starts, gets an IP (10.1.0.<member id>) and turns
    /// Ready, or stays Pending when its zone has no such node. With no nodes at all, Pods
    /// start unbound.
    pub fn kubelet(&self, ns: &str) {
        let coll = format!("/api/v1/namespaces/{ns}/pods");
        let mut st = self.0.lock().unwrap();
        let nodes = st.objects.get("/api/v1/nodes").cloned().unwrap_or_default();
        let node_ready = |n: &Value| {
            n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        };
        let kubelet_up = |p: &Value| match p["spec"]["nodeName"].as_str() {
            None => true,
            Some(node) => nodes.get(node).is_some_and(node_ready),
        };
        let gone: Vec<String> = st
            .objects
            .entry(coll.clone())
            .or_default()
            .iter()
            .filter(|(_, p)| !p["metadata"]["deletionTimestamp"].is_null() && finalizers(p).is_empty() && kubelet_up(p))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            st.objects.get_mut(&coll).unwrap().remove(&n);
            st.managed.remove(&(coll.clone(), n));
        }
        st.release_unused_claims(&format!("/api/v1/namespaces/{ns}/persistentvolumeclaims"));
        let mut bound: Vec<(String, String)> = Vec::new();
        for pod in st.objects.entry(coll).or_default().values_mut() {
            let unstarted = pod["status"]["phase"].is_null() || pod["status"]["phase"] == "Pending";
            if !unstarted || !pod["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            if !nodes.is_empty() && pod["spec"]["nodeName"].is_null() {
                let zone = pod["metadata"]["labels"]["nimbus.io/zone"].as_str().map(str::to_owned);
                let fits = |n: &Value| {
                    node_ready(n)
                        && n["spec"]["unschedulable"] != true
                        && zone.as_deref().is_none_or(|z| n["metadata"]["labels"]["topology.kubernetes.io/zone"] == z)
                };
                match nodes.iter().find(|(_, n)| fits(n)) {
                    Some((name, _)) => {
                        pod["spec"]["nodeName"] = json!(name);
                        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
                            if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                                bound.push((claim.to_owned(), name.clone()));
                            }
                        }
                    }
                    None => {
                        pod["status"] = json!({"phase": "Pending",
                            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]});
                        continue;
                    }
                }
            }
            if !kubelet_up(pod) {
                continue;
            }
            let id = pod["metadata"]["labels"]["nimbus.io/member-id"].as_str().unwrap_or("0").to_string();
            pod["status"] = json!({"phase": "Running", "podIP": format!("10.1.0.{id}"),
                "conditions": [{"type": "Ready", "status": "True"}]});
        }
        // The scheduler records the node a volume is bound to on its claim, the first time
        // (WaitForFirstConsumer: local volumes always).
        let claims = format!("/api/v1/namespaces/{ns}/persistentvolumeclaims");
        for (claim, node) in bound {
            if let Some(pvc) = st.objects.get_mut(&claims).and_then(|c| c.get_mut(&claim))
                && pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"].is_null()
            {
                pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] = json!(node);
            }
        }
    }
}

impl ApiState {
    fn handle(
        &mut self,
        t: &Target,
        verb: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Response<Body>, Response<Body>> {
        let manager = query_param(query, "fieldManager").unwrap_or_else(|| "unknown".into());
        self.next_uid += 1;
        let uid = self.next_uid;
        let existing = t.name.as_ref().and_then(|n| self.objects.get(&t.collection)?.get(n)).cloned();
        match (verb, &t.name) {
            ("list", _) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let objects = self.objects.get(&t.collection).cloned().unwrap_or_default();
                let items: Vec<Value> = objects.values().filter(|o| matches_selector(o, &selector)).cloned().collect();
                Ok(ok(
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                ))
            }
            ("get", Some(n)) => match existing {
                Some(o) => Ok(ok(&o)),
                None => Err(status_body(404, "NotFound", &format!("{} \"{n}\" not found", t.resource))),
            },
            ("create", _) => {
                let mut obj: Value = serde_json::from_slice(body).unwrap();
                let n = match obj["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => format!("{}{uid}", obj["metadata"]["generateName"].as_str().unwrap_or("obj-")),
                };
                if self.objects.get(&t.collection).is_some_and(|c| c.contains_key(&n)) {
                    return Err(status_body(409, "AlreadyExists", &format!("{} \"{n}\" already exists", t.resource)));
                }
                self.authorize_owners(None, &obj, t)?;
                obj["metadata"]["name"] = json!(n);
                obj["metadata"]["uid"] = json!(format!("uid-{uid}"));
                obj["metadata"]["resourceVersion"] = json!(uid.to_string());
                Self::admit(&t.collection, &mut obj);
                let managed = self.managed.entry((t.collection.clone(), n.clone())).or_default();
                managed.update(&json!({}), &obj, &manager);
                self.objects.entry(t.collection.clone()).or_default().insert(n, obj.clone());
                Ok(ok(&obj))
            }
            ("patch", Some(n)) => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                let is_apply = content_type.contains("apply-patch");
                let mut obj = match (existing.clone(), is_apply) {
                    (Some(o), _) => o,
                    (None, false) => {
                        return Err(status_body(404, "NotFound", &format!("{} \"{n}\" not found", t.resource)));
                    }
                    // Server-side apply creates the object: that needs `create` too.
                    (None, true) => {
                        self.authorize(&t.attributes("create"), true)?;
                        json!({"metadata": {"name": n, "uid": format!("uid-{uid}")}})
                    }
                };
                let key = (t.collection.clone(), n.clone());
                let mut managed = self.managed.get(&key).cloned().unwrap_or_default();
                if is_apply {
                    let force = query_param(query, "force").as_deref() == Some("true");
                    if let Err(c) = managed.apply(&mut obj, &manager, &patch, force) {
                        return Err(status_body(409, "Conflict", &c.message()));
                    }
                } else if content_type.contains("json-patch") {
                    let mut p: json_patch::Patch = serde_json::from_value(patch).unwrap();
                    // As the API server does: `test` for null passes on a missing path.
                    let current = obj.clone();
                    p.0.retain(|op| match op {
                        json_patch::PatchOperation::Test(t) => {
                            !(t.value.is_null() && current.pointer(t.path.as_str()).is_none())
                        }
                        _ => true,
                    });
                    if let Err(e) = json_patch::patch(&mut obj, &p) {
                        return Err(status_body(422, "Invalid", &e.to_string()));
                    }
                } else if t.subresource.as_deref() == Some("status") {
                    json_patch::merge(&mut obj, &json!({"status": patch["status"]}));
                } else {
                    json_patch::merge(&mut obj, &patch);
                }
                let before = existing.clone().unwrap_or_else(|| json!({}));
                if !is_apply {
                    managed.update(&before, &obj, &manager);
                }
                if !before["metadata"]["deletionTimestamp"].is_null()
                    && !finalizers(&obj).is_subset(&finalizers(&before))
                {
                    let msg = format!(
                        "{} \"{n}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the \
                         object is being deleted",
                        t.resource
                    );
                    return Err(status_body(422, "Invalid", &msg));
                }
                self.authorize_owners(existing.as_ref(), &obj, t)?;
                if existing.is_none() {
                    Self::admit(&t.collection, &mut obj);
                }
                obj["metadata"]["resourceVersion"] = json!(uid.to_string());
                self.objects.entry(t.collection.clone()).or_default().insert(n.clone(), obj.clone());
                self.managed.insert(key, managed);
                self.finish_deletion(&t.collection, n);
                Ok(ok(&obj))
            }
            ("delete", Some(n)) => {
                let grace = serde_json::from_slice::<Value>(body).ok().and_then(|b| b["gracePeriodSeconds"].as_i64());
                match self.delete(&t.collection, n, grace) {
                    Some(o) => Ok(ok(&o)),
                    None => Err(status_body(404, "NotFound", &format!("{} \"{n}\" not found", t.resource))),
                }
            }
            _ => Err(status_body(405, "MethodNotAllowed", "not supported by the fake")),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use kube::api::{Api, DeleteParams, Patch, PatchParams};

    use super::*;

    const CMS: &str = "/api/v1/namespaces/apps/configmaps";
    const PODS: &str = "/api/v1/namespaces/apps/pods";

    fn cm(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "apps"}, "data": data})
    }

    fn status_of(e: kube::Error) -> kube::core::Status {
        match e {
            kube::Error::Api(s) => *s,
            other => panic!("not an API answer: {other}"),
        }
    }

    #[tokio::test]
    async fn a_verb_the_chart_does_not_grant_is_refused_as_the_api_server_does() {
        let api = FakeApi::default();
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(api.client());
        let s = status_of(nodes.get("node-0").await.unwrap_err());
        assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
        assert_eq!(
            s.message,
            "nodes \"node-0\" is forbidden: User \"system:serviceaccount:nimbus-system:nimbus-operator\" cannot get \
             resource \"nodes\" in API group \"\" at the cluster scope"
        );
        assert!(nodes.list(&Default::default()).await.is_ok(), "list is granted");
    }

    #[tokio::test]
    async fn an_apply_that_creates_needs_create_and_one_that_updates_does_not() {
        let api = FakeApi::default();
        api.set_rbac(Some(Rbac::chart().without("", "services", "create")));
        let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(api.client(), "apps");
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "apps"},
            "spec": {"ports": [{"port": 80}]}});
        let ssa = PatchParams::apply("nimbus-operator").force();
        let s = status_of(services.patch("s", &ssa, &Patch::Apply(&svc)).await.unwrap_err());
        assert_eq!((s.code, s.message.as_str()), (403, "services \"s\" is forbidden: "));
        assert!(api.get("/api/v1/namespaces/apps/services", "s").is_none());
        api.put("/api/v1/namespaces/apps/services", svc.clone());
        services.patch("s", &ssa, &Patch::Apply(&svc)).await.unwrap();
    }

    #[tokio::test]
    async fn apply_over_the_api_removes_omitted_fields_keeps_others_and_conflicts_unless_forced() {
        let api = FakeApi::unrestricted();
        let cms: Api<ConfigMap> = Api::namespaced(api.client(), "apps");
        let as_op = PatchParams::apply("nimbus-operator");
        let as_user = PatchParams::apply("kubectl");
        cms.patch("c", &as_op, &Patch::Apply(cm(json!({"a": "1", "b": "2"})))).await.unwrap();
        cms.patch("c", &as_user, &Patch::Apply(cm(json!({"mine": "x"})))).await.unwrap();
        cms.patch("c", &as_op, &Patch::Apply(cm(json!({"a": "1"})))).await.unwrap();
        assert_eq!(api.get(CMS, "c").unwrap()["data"], json!({"a": "1", "mine": "x"}));
        assert_eq!(api.managed_fields(CMS, "c", "kubectl"), vec!["data.mine"]);
        let s = status_of(cms.patch("c", &as_op, &Patch::Apply(cm(json!({"mine": "y"})))).await.unwrap_err());
        assert_eq!(
            (s.code, s.message.as_str()),
            (409, "Apply failed with 1 conflict: conflict with \"kubectl\": .data.mine")
        );
        cms.patch("c", &as_op.force(), &Patch::Apply(cm(json!({"mine": "y"})))).await.unwrap();
        // Forced: the operator owns `mine` now, and `a`, which it omitted, is gone.
        assert_eq!(api.get(CMS, "c").unwrap()["data"], json!({"mine": "y"}));
        assert!(api.managed_fields(CMS, "c", "kubectl").is_empty());
    }

    #[tokio::test]
    async fn a_deleted_volume_stays_terminating_while_a_pod_uses_it() {
        const PVCS: &str = "/api/v1/namespaces/apps/persistentvolumeclaims";
        let api = FakeApi::unrestricted();
        let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = Api::namespaced(api.client(), "apps");
        let pvc = |name: &str| {
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "apps"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        };
        let ssa = PatchParams::apply("nimbus-operator");
        for name in ["used", "unused"] {
            pvcs.patch(name, &ssa, &Patch::Apply(pvc(name))).await.unwrap();
            assert_eq!(api.get(PVCS, name).unwrap()["metadata"]["finalizers"], json!([PVC_PROTECTION]));
        }
        api.put(
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "apps"},
            "spec": {"containers": [], "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "used"}}]}}),
        );
        pvcs.delete("unused", &DeleteParams::default()).await.unwrap();
        assert!(api.get(PVCS, "unused").is_none(), "no Pod uses it: gone at once");
        pvcs.delete("used", &DeleteParams::default()).await.unwrap();
        assert_eq!(api.get(PVCS, "used").unwrap()["metadata"]["deletionTimestamp"], DELETION_TIME);
        // Its Pod deleted is Terminating, and still uses it; stopped by the kubelet, it does not.
        api.delete(PODS, "p");
        assert!(api.get(PVCS, "used").is_some());
        api.kubelet("apps");
        assert!(api.get(PODS, "p").is_none() && api.get(PVCS, "used").is_none());
    }

    #[tokio::test]
    async fn a_deleted_pod_is_terminating_until_the_kubelet_stops_it() {
        let api = FakeApi::default();
        api.put(
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "apps"},
            "spec": {"terminationGracePeriodSeconds": 45, "containers": []}}),
        );
        let pods: Api<Pod> = Api::namespaced(api.client(), "apps");
        pods.delete("p", &DeleteParams::default()).await.unwrap();
        let p = api.get(PODS, "p").expect("still there");
        assert_eq!(p["metadata"]["deletionTimestamp"], DELETION_TIME);
        assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 45);
        // Its name is taken until it is gone.
        let s = status_of(pods.create(&Default::default(), &serde_json::from_value(p).unwrap()).await.unwrap_err());
        assert_eq!(s.reason, "AlreadyExists");
        api.kubelet("apps");
        assert!(api.get(PODS, "p").is_none());
    }

    #[tokio::test]
    async fn an_object_with_finalizers_is_terminating_until_the_last_is_removed() {
        let api = FakeApi::unrestricted();
        let mut c = cm(json!({}));
        c["metadata"]["finalizers"] = json!(["a/x", "a/y"]);
        api.put(CMS, c);
        let cms: Api<ConfigMap> = Api::namespaced(api.client(), "apps");
        cms.delete("c", &DeleteParams::default()).await.unwrap();
        assert_eq!(api.get(CMS, "c").unwrap()["metadata"]["deletionTimestamp"], DELETION_TIME);
        let merge = |f: Value| Patch::Merge(json!({"metadata": {"finalizers": f}}));
        let s =
            status_of(cms.patch("c", &PatchParams::default(), &merge(json!(["a/x", "a/y", "a/z"]))).await.unwrap_err());
        assert_eq!(s.code, 422, "no new finalizer on a Terminating object: {}", s.message);
        cms.patch("c", &PatchParams::default(), &merge(json!(["a/y"]))).await.unwrap();
        assert!(api.get(CMS, "c").is_some(), "one finalizer left");
        cms.patch("c", &PatchParams::default(), &merge(json!([]))).await.unwrap();
        assert!(api.get(CMS, "c").is_none(), "gone with its last finalizer");
        // Without finalizers a deletion is immediate.
        api.put(CMS, cm(json!({})));
        cms.delete("c", &DeleteParams::default()).await.unwrap();
        assert!(api.get(CMS, "c").is_none());
    }
}
