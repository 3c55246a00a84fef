//! `nimbus playground apply|delete` as a user runs them against a running playground: a pool
//! and an instance in it provisioned, the same file again unchanged, users and limits
//! changed, bad manifests refused with nothing changed (through the command and raw to the
//! control plane), an instance deleted with its data and users, and applied again fresh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nimbus_e2e::playground::Playground;
use serde_json::{Value, json};

/// How long a change takes to reach the gateway (it watches etcd).
const PROPAGATE: Duration = Duration::from_secs(20);

const SHOP: &str = "apiVersion: nimbus.io/v1alpha1
kind: DatabaseInstance
metadata:
  name: shop
spec:
  tier: free
";

fn orders(users: &str, qps: u32) -> String {
    format!(
        "apiVersion: nimbus.io/v1alpha1
kind: ResourcePool
metadata:
  name: small
spec:
  mode: shared
  databasesPerReplicaSet: 5
  nodeSelector:
    ignored: on-one-machine
---
apiVersion: nimbus.io/v1alpha1
kind: DatabaseInstance
metadata:
  name: orders
spec:
  pool: small
  limits:
    qps: {qps}
  users: {users}
"
    )
}

const FIRST_USERS: &str = "[{name: app, role: readWrite}, {name: old, role: read}]";
const SECOND_USERS: &str = "[{name: app, role: readWrite}, {name: fresh, role: read}]";

/// The status of a request with `token` (a write when `body` is given).
async fn status(http: &reqwest::Client, url: &str, token: &str, body: Option<&Value>) -> u16 {
    let req = match body {
        Some(b) => http.post(url).json(b),
        None => http.get(url),
    };
    req.bearer_auth(token).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Polls until a request with `token` answers `want`.
async fn answers(http: &reqwest::Client, what: &str, url: &str, token: &str, want: u16) {
    nimbus_e2e::poll(what, PROPAGATE, || async { (status(http, url, token, None).await == want).then_some(()) })
        .await
        .unwrap();
}

fn state_bytes(pg: &Playground) -> Vec<u8> {
    std::fs::read(pg.dir.path().join("state.json")).unwrap()
}

/// A refused apply: non-zero, its message naming `field`, and the state unchanged.
fn refused(pg: &Playground, file: &str, yaml: &str, field: &str) {
    let before = state_bytes(pg);
    let path = pg.manifest(file, yaml).unwrap();
    let ran = pg.run(&["apply", path.to_str().unwrap()]).unwrap();
    assert!(!ran.ok, "{file} was applied: {}", ran.stdout);
    assert!(ran.stderr.contains(field), "{file}: the refusal does not name {field}: {}", ran.stderr);
    assert_eq!(state_bytes(pg), before, "{file}: the state changed although the apply was refused");
}

#[test]
fn apply_provisions_reconfigures_refuses_and_delete_removes_instances() {
    let pg = Playground::up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    let shop = pg.manifest("shop.yaml", SHOP).unwrap();
    // `up` made the example; the playground runs it like any other.
    pg.apply_wait(&shop).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let gw = pg.gateway().unwrap();
    let doc = format!("{gw}/v1/databases/orders/collections/c/documents");
    let one = format!("{doc}/one");

    // A pool and an instance in it: provisioned on a replica set of that pool, serving.
    let first = pg.manifest("orders.yaml", &orders(FIRST_USERS, 50)).unwrap();
    let out = pg.apply_wait(&first).unwrap();
    assert!(out.contains("pool small created") && out.contains("instance orders created"), "{out}");
    let v = pg.json().unwrap();
    let inst = &v["instances"]["orders"];
    assert_eq!((inst["pool"].as_str(), inst["phase"].as_str()), (Some("small"), Some("Ready")), "{inst}");
    assert!(inst["replicaSet"].as_str().unwrap().starts_with("small-rs"), "{inst}");
    assert!(inst["migration"].is_null(), "{inst}");
    assert_eq!(v["instances"]["shop"]["pool"], "default");
    assert_ne!(v["instances"]["shop"]["replicaSet"], inst["replicaSet"]);
    assert!(v["datanodes"].as_array().unwrap().iter().any(|d| d["replicaSet"] == inst["replicaSet"]));
    let token = inst["token"].as_str().unwrap().to_owned();
    let old_reader = inst["readOnlyToken"].as_str().unwrap().to_owned();
    let written = rt.block_on(status(&http, &doc, &token, Some(&json!({"documents": [{"_id": "one", "n": 1}]}))));
    assert_eq!(written, 201);
    rt.block_on(answers(&http, "the read user reads", &one, &old_reader, 200));

    // The same file again: nothing changes.
    let out = pg.apply_wait(&first).unwrap();
    assert!(out.contains("pool small unchanged") && out.contains("instance orders unchanged"), "{out}");

    // Users and limits changed: the kept user keeps its token, the new one gets one, the
    // removed one's is refused, and etcd has the new limits.
    let second = pg.manifest("orders2.yaml", &orders(SECOND_USERS, 123)).unwrap();
    let out = pg.apply_wait(&second).unwrap();
    assert!(out.contains("instance orders configured"), "{out}");
    let inst = pg.json().unwrap()["instances"]["orders"].clone();
    assert_eq!(inst["token"].as_str(), Some(token.as_str()));
    let new_reader = inst["readOnlyToken"].as_str().unwrap().to_owned();
    assert!(new_reader.starts_with("nmb_orders.fresh."), "{new_reader}");
    rt.block_on(answers(&http, "the new user reads", &one, &new_reader, 200));
    rt.block_on(answers(&http, "the removed user refused", &one, &old_reader, 401));
    assert_eq!(rt.block_on(status(&http, &one, &token, None)), 200);
    let limits = rt.block_on(pg.etcd_get(&nimbus_api::etcd::limits_key("orders"))).unwrap().unwrap();
    assert_eq!(limits["qps"], 123, "{limits}");
    assert!(rt.block_on(pg.etcd_get(&nimbus_api::etcd::user_key("orders", "old"))).unwrap().is_none());

    // Refused before anything changes, naming the field.
    refused(&pg, "bad-replicas.yaml", &SHOP.replace("tier: free", "tier: free\n  replicas: 4"), "spec.replicas");
    refused(&pg, "typo.yaml", &SHOP.replace("tier: free", "tier: free\n  limit: {qps: 1}"), "spec.limit");
    refused(&pg, "no-pool.yaml", &SHOP.replace("tier: free", "tier: free\n  pool: nowhere"), "spec.pool");
    refused(&pg, "storage.yaml", &SHOP.replace("tier: free", "tier: free\n  storage: {size: 1Gi}"), "spec.storage");
    refused(&pg, "kind.yaml", &SHOP.replace("DatabaseInstance", "Database"), "kind");
    // A changed pool moves the database there while it serves (hot migration).
    let moved = pg.manifest("move.yaml", &orders(SECOND_USERS, 123).replace("pool: small", "pool: default")).unwrap();
    pg.apply_wait(&moved).unwrap();
    let v = pg.json().unwrap();
    assert_eq!(v["instances"]["orders"]["pool"], "default", "{}", v["instances"]["orders"]);
    assert!(v["instances"]["orders"]["replicaSet"].as_str().unwrap().starts_with("default-"), "{v}");
    // A good document beside a bad one: neither is applied.
    let extra = SHOP.replace("name: shop", "name: extra");
    refused(&pg, "half.yaml", &format!("{extra}---\n{}", SHOP.replace("tier: free", "tier: gold")), "document 2");
    assert!(pg.json().unwrap()["instances"].get("extra").is_none());

    // Raw to the control plane, past the command's own checks: checked again there.
    let cp = pg.json().unwrap()["controlPlane"].as_str().unwrap().to_owned();
    let body = json!({"documents": [{"source": "raw", "document": {
        "apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
        "metadata": {"name": "raw"}, "spec": {"pool": "nowhere"}}}]});
    let before = state_bytes(&pg);
    let internal = pg.internal_client().unwrap();
    let (code, answer) = rt.block_on(internal.post(&format!("{cp}/v1/apply"), &body));
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("spec.pool"), "{answer}");
    let (anyone, _) = rt.block_on(nimbus_e2e::DataClient::new().post(&format!("{cp}/v1/apply"), &body));
    assert_eq!(anyone, 401);
    let (code, answer) = rt.block_on(internal.post(&format!("{cp}/v1/delete"), &json!({"instances": ["nobody"]})));
    assert_eq!(code, 404, "{answer}");
    assert_eq!(state_bytes(&pg), before);

    // Delete: an unknown name deletes nothing; then the instance, its data and its users.
    let ran = pg.run(&["delete", "orders", "nobody"]).unwrap();
    assert!(!ran.ok && ran.stderr.contains("nobody"), "{}", ran.stderr);
    assert_eq!(pg.json().unwrap()["instances"]["orders"]["phase"], "Ready");
    let ran = pg.run(&["delete", "orders"]).unwrap();
    assert!(ran.ok && ran.stdout.contains("instance orders deleted"), "{}\n{}", ran.stdout, ran.stderr);
    assert!(pg.json().unwrap()["instances"].get("orders").is_none());
    rt.block_on(answers(&http, "the deleted instance's token refused", &one, &token, 401));
    assert!(rt.block_on(pg.etcd_get(&nimbus_api::etcd::limits_key("orders"))).unwrap().is_none());

    // Applied again: a new instance, new tokens, none of the old data.
    let out = pg.apply_wait(&second).unwrap();
    assert!(out.contains("instance orders created"), "{out}");
    let again = pg.token("orders").unwrap();
    assert_ne!(again, token);
    rt.block_on(answers(&http, "the new instance serves, without the old document", &one, &again, 404));
    assert_eq!(pg.json().unwrap()["instances"]["shop"]["phase"], "Ready");
}
