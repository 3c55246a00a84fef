//! A restore's `Publish` through the admin API of a real three-member replica set in one
//! process (openraft, RocksDB, HTTP on port 0): the admin API takes the staging database's
//! name (import, checksum, export) where the data API refuses it, and every member applies
//! the switch alike (the same checksum at the same marker, storage agreeing with it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_datanode::clock::ReplicaClock;
use nimbus_datanode::node::NodeCtx;
use nimbus_datanode::raft::log_store::LogStore;
use nimbus_datanode::raft::network::Network;
use nimbus_datanode::raft::state_machine::{SmShared, StateMachine};
use nimbus_datanode::raft::{NodeInfo, Raft};
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::{Command, WriteOp};
use openraft::Config as RaftConfig;
use openraft::async_runtime::WatchReceiver;
use serde_json::{Value, json};

const SECRET: &str = "publish-replicated-test-secret-0123456789";

/// One member: Raft RPCs, the admin API and the data API, each on a port of its own.
struct Member {
    raft: Raft,
    sm: Arc<SmShared>,
    info: NodeInfo,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    (addr, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

impl Member {
    async fn start(id: u64, dir: &std::path::Path) -> Member {
        let log = LogStore::open(&dir.join("raft")).unwrap();
        let sm = StateMachine::open(dir, EngineOptions::default()).unwrap();
        let shared = sm.shared();
        let secret = nimbus_net::ClusterSecret::parse(SECRET).unwrap();
        let clock = Arc::new(ReplicaClock::new(0));
        let network = Network::new(Duration::from_secs(1), 64 << 20, clock.clone(), &secret);
        let config = RaftConfig {
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 700,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let raft = Raft::new(id, Arc::new(config), network, log, sm).await.unwrap();
        let ctx = Arc::new(NodeCtx {
            id,
            zone: "local".into(),
            replica_set: "rs0".into(),
            raft: raft.clone(),
            sm: shared.clone(),
            prometheus: PrometheusBuilder::new().build_recorder().handle(),
            write_timeout: Duration::from_secs(5),
            quorum_lease: Duration::from_secs(2),
            max_body_bytes: 48 * 1024 * 1024,
            clock,
            data_requests: Default::default(),
            draining: Default::default(),
            peers_draining: Default::default(),
        });
        let (raft_addr, s1) = serve(nimbus_datanode::server::raft_rpc::router(ctx.clone())).await;
        let (admin_addr, s2) = serve(nimbus_datanode::server::admin::router(ctx.clone(), secret)).await;
        let (data_addr, s3) = serve(nimbus_datanode::server::data::router(ctx)).await;
        let info = NodeInfo { admin_addr, data_addr, zone: "local".into(), raft_addr };
        Member { raft, sm: shared, info, servers: vec![s1, s2, s3] }
    }

    async fn stop(self) {
        self.raft.shutdown().await.unwrap();
        for s in self.servers {
            s.abort();
        }
    }
}

/// Stops every member when dropped, so a failing test leaves nothing running.
struct ReplicaSet(Vec<Member>);

impl ReplicaSet {
    async fn stop(mut self) {
        for m in std::mem::take(&mut self.0) {
            m.stop().await;
        }
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for m in &self.0 {
            for s in &m.servers {
                s.abort();
            }
        }
    }
}

async fn poll<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Admin {
    http: reqwest::Client,
}

impl Admin {
    fn new() -> Admin {
        let secret = nimbus_net::ClusterSecret::parse(SECRET).unwrap();
        Admin { http: reqwest::Client::builder().default_headers(secret.default_headers()).build().unwrap() }
    }

    async fn post(&self, m: &Member, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", m.info.admin_addr)).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, m: &Member, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", m.info.admin_addr)).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn import(&self, m: &Member, db: &str, step: Value) -> (u16, Value) {
        self.post(m, "/v1/admin/import", json!({"db": db, "migration": "r1", "step": step})).await
    }
}

fn insert(coll: &str, docs: &[Value]) -> Command {
    Command {
        db: "shop".into(),
        op: WriteOp::Insert {
            coll: coll.into(),
            docs: docs.iter().map(|d| serde_json::value::to_raw_value(d).unwrap()).collect(),
        },
        idempotency_key: None,
        ts_ms: 1_700_000_000_000,
        route_epoch: None,
        request_hash: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_member_publishes_alike_through_the_admin_api_and_no_client_reaches_the_staging_database() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members = Vec::new();
    for id in 1..=3 {
        members.push(Member::start(id, &tmp.path().join(format!("n{id}"))).await);
    }
    let set = ReplicaSet(members);
    let all: BTreeMap<u64, NodeInfo> = set.0.iter().enumerate().map(|(i, m)| (i as u64 + 1, m.info.clone())).collect();
    set.0[0].raft.initialize(all).await.unwrap();
    set.0[0].raft.wait(Some(Duration::from_secs(10))).state(openraft::ServerState::Leader, "leader").await.unwrap();
    let leader = &set.0[0];
    let admin = Admin::new();

    // The database served now (once the new leader's lease lets it write).
    poll("a first write", async || {
        leader.raft.client_write(insert("users", &[json!({"_id": 1, "v": "now"})])).await.ok()
    })
    .await;
    leader.raft.client_write(insert("extra", &[json!({"_id": 1})])).await.unwrap();

    // The restore's import, under the staging name the admin API accepts.
    assert_eq!(admin.import(leader, "shop~restore", json!("begin")).await.0, 200);
    let collections = json!({"collections": {"collections": [
        {"name": "users", "indexes": [{"name": "by_email", "fields": [["email", false]], "unique": true}]},
    ]}});
    let (status, body) = admin.import(leader, "shop~restore", collections).await;
    assert_eq!(status, 200, "{body}");
    let docs: Vec<Value> =
        (0..50).map(|i| json!({"coll": "users", "doc": {"_id": i, "email": format!("u{i}@x")}})).collect();
    assert_eq!(admin.import(leader, "shop~restore", json!({"docs": {"docs": docs}})).await.0, 200);
    let (status, marker) = admin.post(leader, "/v1/admin/checksum", json!({"db": "shop~restore"})).await;
    assert_eq!((status, &marker["documents"]), (200, &json!(50)), "{marker}");
    assert_eq!(admin.get(leader, "/v1/admin/checksum?db=shop~restore").await.0, 200);
    assert_eq!(admin.get(leader, "/v1/admin/checksum/verify?db=shop~restore").await.0, 200);
    // Accepted as a name, refused while it is being imported (a copy of it now would be
    // partial for good).
    let export = json!({"db": "shop~restore", "part": "documents", "maxBytes": 1000});
    let (status, page) = admin.post(leader, "/v1/admin/export", export).await;
    assert_eq!(status, 503, "{page}");
    assert!(page.to_string().contains("is being imported"), "{page}");
    // A verification's scratch copy (`shop~verify`): imported and summed through the admin
    // API as a staging one is, never published, then dropped by its `Abort`.
    assert_eq!(admin.import(leader, "shop~verify", json!("begin")).await.0, 200);
    let collections = json!({"collections": {"collections": [{"name": "users", "indexes": []}]}});
    assert_eq!(admin.import(leader, "shop~verify", collections).await.0, 200);
    let docs: Vec<Value> =
        (0..50).map(|i| json!({"coll": "users", "doc": {"_id": i, "email": format!("u{i}@x")}})).collect();
    assert_eq!(admin.import(leader, "shop~verify", json!({"docs": {"docs": docs}})).await.0, 200);
    let (status, scratch) = admin.post(leader, "/v1/admin/checksum", json!({"db": "shop~verify"})).await;
    assert_eq!((status, &scratch["checksum"]), (200, &marker["checksum"]), "same documents, same sum: {scratch}");
    assert_eq!(admin.get(leader, "/v1/admin/checksum?db=shop~verify").await.0, 200);
    let export = json!({"db": "shop~verify", "part": "documents", "maxBytes": 1000});
    assert_eq!(admin.post(leader, "/v1/admin/export", export).await.0, 503, "being imported: not exported");
    for into in ["shop", "shop~verify"] {
        let publish = json!({"publish": {"into": into, "whole": true}});
        let (status, body) = admin.import(leader, "shop~verify", publish).await;
        assert_eq!(status, 400, "a Publish from a scratch copy into {into}: {body}");
    }
    assert_eq!(admin.import(leader, "shop~verify", json!("abort")).await.0, 200);
    assert!(leader.sm.engine().list_collections("shop~verify").is_empty(), "the scratch copy is dropped");
    assert!(!leader.sm.engine().list_collections("shop").is_empty(), "the served database is untouched");

    // Names that are neither a client's nor a staging or scratch one stay refused.
    for bad in ["shop~x", "shop~restore~restore", "~restore", "~verify", "shop~verify~verify", "shop~verify~restore"] {
        assert_eq!(admin.import(leader, bad, json!("begin")).await.0, 400, "{bad}");
        assert_eq!(admin.post(leader, "/v1/admin/checksum", json!({"db": bad})).await.0, 400, "{bad}");
    }

    // No client reaches the staging database through the data API, by any spelling.
    let http = reqwest::Client::new();
    for path in [
        "/v1/databases/shop~restore/collections/users/find",
        "/v1/databases/shop~verify/collections/users/find",
        "/v1/databases/shop%7Everify/collections/users/count",
        "/v1/databases/shop%7Erestore/collections/users/find",
        "/v1/databases/shop%7erestore/collections/users/count",
    ] {
        let r = http
            .post(format!("{}{path}", leader.info.data_addr))
            .header("x-nimbus-route-epoch", "0")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
    }
    let r = http
        .get(format!("{}/v1/databases/shop~restore/collections", leader.info.data_addr))
        .header("x-nimbus-route-epoch", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // The switch.
    let publish = json!({"publish": {"into": "shop", "whole": true}});
    let (status, body) = admin.import(leader, "shop~restore", publish.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin.import(leader, "shop~restore", publish).await.0, 200, "a repeated Publish");

    // Every member records the same sum at one marker, and its storage agrees with it.
    let (status, at) = admin.post(leader, "/v1/admin/checksum", json!({"db": "shop"})).await;
    assert_eq!(status, 200, "{at}");
    assert_eq!(at["documents"], json!(50));
    assert_eq!(at["checksum"], marker["checksum"], "one collection, same name: the import's sum");
    for m in &set.0 {
        let recorded = poll("the marker on every member", async || {
            let (status, got) = admin.get(m, "/v1/admin/checksum?db=shop").await;
            (status == 200 && got["index"] == at["index"]).then_some(got)
        })
        .await;
        assert_eq!(recorded, at, "member {} differs", m.info.admin_addr);
        let (status, v) = admin.get(m, "/v1/admin/checksum/verify?db=shop").await;
        assert_eq!(status, 200);
        assert_eq!(v["mismatched"], json!([]), "{v}");
        assert_eq!(v["recorded"], v["scanned"], "{v}");
        let engine = m.sm.engine();
        let names: Vec<String> = engine.list_collections("shop").into_iter().map(|c| c.name).collect();
        assert_eq!(names, vec!["users".to_owned()]);
        assert!(engine.list_collections("shop~restore").is_empty());
        assert_eq!(engine.get("shop", "users", &json!(7)).unwrap(), Some(json!({"_id": 7, "email": "u7@x"})));
    }

    // The oplog of `shop` holds the switch as ordinary changes.
    let (status, page) = admin.get(leader, "/v1/admin/oplog?db=shop").await;
    assert_eq!(status, 200);
    let kinds: Vec<(String, String)> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["coll"].as_str().unwrap_or("").to_owned(), e["op"]["kind"].as_str().unwrap().to_owned()))
        .collect();
    let puts = kinds.iter().filter(|(c, k)| c == "users" && k == "put").count();
    assert_eq!(puts, 51, "the served document and the 50 published: {kinds:?}");
    assert!(kinds.contains(&("extra".into(), "dropCollection".into())), "{kinds:?}");
    assert!(kinds.contains(&("users".into(), "createIndex".into())), "{kinds:?}");

    let applied = leader.raft.metrics().borrow_watched().last_applied.map(|l| l.index());
    assert!(applied.is_some());
    set.stop().await;
}

/// What an instance's deletion sends (`controlplane::drop_instance_data`): the route epoch
/// raised past the route's, then the database, its restore staging copy and its
/// verification scratch copy dropped. A restore that imported before the deletion and
/// publishes after it carries the old route epoch, and is refused: nothing of the deleted
/// database comes back, and no copy of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_fences_the_database_so_a_later_publish_is_refused_and_drops_its_staging_and_scratch_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let set = ReplicaSet(vec![Member::start(1, &tmp.path().join("n1")).await]);
    let leader = &set.0[0];
    leader.raft.initialize(BTreeMap::from([(1, leader.info.clone())])).await.unwrap();
    leader.raft.wait(Some(Duration::from_secs(10))).state(openraft::ServerState::Leader, "leader").await.unwrap();
    let admin = Admin::new();
    // Served at route epoch 5.
    let (status, body) = admin.post(leader, "/v1/admin/route-epoch", json!({"db": "shop", "epoch": 5})).await;
    assert_eq!(status, 200, "{body}");
    poll("a first write", async || leader.raft.client_write(insert("users", &[json!({"_id": 1})])).await.ok()).await;

    // A restore imports into the staging copy; a verification into the scratch copy.
    for db in ["shop~restore", "shop~verify"] {
        assert_eq!(admin.import(leader, db, json!("begin")).await.0, 200);
        let collections = json!({"collections": {"collections": [{"name": "users", "indexes": []}]}});
        assert_eq!(admin.import(leader, db, collections).await.0, 200);
        let docs = json!({"docs": {"docs": [{"coll": "users", "doc": {"_id": 2}}]}});
        assert_eq!(admin.import(leader, db, docs).await.0, 200);
    }

    // The deletion.
    let (status, body) = admin.post(leader, "/v1/admin/route-epoch", json!({"db": "shop", "epoch": 6})).await;
    assert_eq!((status, &body["epoch"]), (200, &json!(6)), "{body}");
    for db in ["shop", "shop~restore", "shop~verify"] {
        let (status, body) = admin.post(leader, "/v1/admin/drop-database", json!({"db": db})).await;
        assert_eq!((status, &body["found"]), (200, &json!(true)), "{db}: {body}");
    }
    // Names the admin API takes for nothing else stay refused.
    for bad in ["shop~x", "~restore", "shop~verify~restore"] {
        let (status, body) = admin.post(leader, "/v1/admin/drop-database", json!({"db": bad})).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // The restore's switch, with the route epoch it saw: refused as stale.
    let publish = json!({"publish": {"into": "shop", "whole": true, "route_epoch": 5}});
    let (status, body) = admin.import(leader, "shop~restore", publish).await;
    assert!(status == 421 && body.to_string().contains("StaleRoute"), "{status} {body}");
    let engine = leader.sm.engine();
    for db in ["shop", "shop~restore", "shop~verify"] {
        assert!(engine.list_collections(db).is_empty(), "{db} has collections after the deletion");
    }
    set.stop().await;
}
