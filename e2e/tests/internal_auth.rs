//! Nothing behind the gateway trusts the network: a caller without the cluster secret gets
//! 401 on every datanode port (data, admin, Raft) and changes nothing; and a request with a
//! route epoch older than the one the replica set knows for its database is refused, by
//! the datanode directly and through a gateway whose route is stale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_api::etcd::{RouteState, UserRole};
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::{Cluster, DataClient, poll};
use reqwest::Method;
use serde_json::{Value, json};

/// The state a refused caller must not change: leader, term, membership, applied index,
/// and the documents of `d.c`.
async fn state(c: &Cluster) -> Value {
    let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
    let s = c.status(leader).await.unwrap();
    let docs = c.local_docs(leader, "d", "c").await.unwrap();
    json!({"leader": s.id, "term": s.term, "members": s.members, "applied": s.applied_index, "docs": docs})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datanode_port_refuses_a_caller_without_the_cluster_secret() {
    let c = Cluster::start(3, &[]).await.unwrap();
    let (leader, st, body) = c
        .leader_post(
            |i| format!("{}/documents", c.coll_url(i, "d", "c")),
            &json!({"documents": [{"_id": 1}]}),
            Some("d1"),
        )
        .await
        .unwrap();
    assert_eq!(st, 201, "{body}");
    let before = state(&c).await;
    let strangers = [
        ("no secret", DataClient::new()),
        (
            "a wrong secret",
            DataClient::internal(&nimbus_net::ClusterSecret::parse(&nimbus_net::ClusterSecret::generate()).unwrap()),
        ),
    ];
    let n = &c.nodes[leader];
    let other = &c.nodes[(leader + 1) % 3];
    let data = format!("{}/v1/databases/d", n.data);
    let member = json!({"member": other.member(), "blocking": false});
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        // Data port: every operation.
        (Method::GET, format!("{data}/collections"), None),
        (Method::PUT, format!("{data}/collections/c2"), None),
        (Method::DELETE, format!("{data}/collections/c"), None),
        (Method::DELETE, data.clone(), None),
        (Method::POST, format!("{data}/collections/c/documents"), Some(json!({"documents": [{"_id": 2}]}))),
        (Method::GET, format!("{data}/collections/c/documents/1"), None),
        (Method::POST, format!("{data}/collections/c/find"), Some(json!({}))),
        (Method::POST, format!("{data}/collections/c/count"), Some(json!({}))),
        (
            Method::POST,
            format!("{data}/collections/c/update"),
            Some(json!({"filter": {}, "update": {"$set": {"x": 1}}})),
        ),
        (Method::POST, format!("{data}/collections/c/delete"), Some(json!({"filter": {}}))),
        (Method::POST, format!("{data}/collections/c/indexes"), Some(json!({"keys": {"x": 1}}))),
        (Method::GET, format!("{data}/collections/c/indexes"), None),
        (Method::DELETE, format!("{data}/collections/c/indexes/x_1"), None),
        // Admin port: everything that changes the replica set or shows its data.
        (Method::POST, format!("{}/v1/admin/init", n.admin), Some(json!({"members": [n.member()]}))),
        (Method::POST, format!("{}/v1/admin/learners", n.admin), Some(member)),
        (Method::POST, format!("{}/v1/admin/voters", n.admin), Some(json!({"voters": [n.id]}))),
        (Method::POST, format!("{}/v1/admin/members/remove", n.admin), Some(json!({"id": other.id}))),
        (Method::POST, format!("{}/v1/admin/transfer-leader", n.admin), Some(json!({"to": other.id}))),
        (Method::POST, format!("{}/v1/admin/snapshot", n.admin), None),
        (Method::POST, format!("{}/v1/admin/route-epoch", n.admin), Some(json!({"db": "d", "epoch": 9}))),
        (Method::GET, format!("{}/v1/admin/oplog?from=0", n.admin), None),
        (Method::GET, format!("{}/v1/admin/query-stats", n.admin), None),
        // Raft port: a vote in a far future term would depose the leader if it counted.
        (
            Method::POST,
            format!("{}/raft/vote", other.raft),
            Some(json!({"vote": {"leader_id": {"term": 1000, "node_id": 9}, "committed": false}, "last_log_id": null})),
        ),
        (Method::POST, format!("{}/raft/pre-vote", other.raft), Some(json!({}))),
        (Method::POST, format!("{}/raft/append", other.raft), Some(json!({}))),
        (Method::POST, format!("{}/raft/transfer-leader", other.raft), Some(json!({}))),
        (Method::POST, format!("{}/raft/snapshot/abc/data?offset=0", other.raft), Some(json!({}))),
        (Method::POST, format!("{}/raft/snapshot/abc/install", other.raft), Some(json!({}))),
    ];
    for (who, client) in &strangers {
        for (method, url, body) in &calls {
            let (st, resp) = client.call(method.clone(), url, body.as_ref(), &[("x-nimbus-route-epoch", "0")]).await;
            assert_eq!(
                (st, resp["error"]["code"].as_str()),
                (401, Some("Unauthenticated")),
                "{who}: {method} {url}: {resp}"
            );
        }
    }
    // Probes and scrapers hold no secret: health, readiness, status and metrics answer.
    for path in ["/healthz", "/readyz", "/v1/status", "/metrics"] {
        assert_eq!(DataClient::new().get(&format!("{}{path}", n.admin)).await.0, 200, "{path}");
    }
    assert_eq!(DataClient::new().get(&format!("{}/healthz", n.data)).await.0, 200);
    assert_eq!(state(&c).await, before, "a refused call changed the replica set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_epochs_never_start_over() {
    use nimbus_api::etcd::RouteMember;
    use nimbus_operator::controlplane::coord::Coordinator;
    let dir = tempfile::tempdir().unwrap();
    let etcd = nimbus_e2e::etcd::EtcdCluster::start(1, dir.path()).await.unwrap();
    let store = Coordinator::connect(&nimbus_net::EtcdArgs::plain(&etcd.client_urls)).await.unwrap();
    let member = |rs: &str| vec![RouteMember { id: 1, data_addr: format!("http://{rs}:7000"), zone: "a".into() }];
    store.put_route("shop", "rs0", member("rs0")).await.unwrap();
    let first = store.route("shop").await.unwrap().unwrap().epoch;
    // A member change is not a move: the epoch stays.
    store.put_route("shop", "rs0", member("rs0b")).await.unwrap();
    assert_eq!(store.route("shop").await.unwrap().unwrap().epoch, first);
    // A move to another replica set: a higher epoch.
    store.put_route("shop", "rs1", member("rs1")).await.unwrap();
    let moved = store.route("shop").await.unwrap().unwrap().epoch;
    assert!(moved > first, "{moved} after {first}");
    // The database dropped and created again: higher still, never 1 again.
    let claim =
        nimbus_api::etcd::TenantClaim { namespace: "apps".into(), instance: "shop".into(), uid: "uid-shop".into() };
    assert!(store.delete_database("shop", &claim, true).await.unwrap(), "unclaimed, placed: claimed then deleted");
    store.put_route("shop", "rs0", member("rs0")).await.unwrap();
    let again = store.route("shop").await.unwrap().unwrap().epoch;
    assert!(again > moved, "{again} after {moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_route_epoch_is_refused_and_a_stale_gateway_waits_for_the_new_route() {
    let mut stack = Stack::start(1, &["shop"]).await.unwrap();
    let tok = stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let gw =
        GatewayProc::start("gw-epoch", &stack.etcd.client_urls, &stack.cluster.secret_file, &["--deadline-ms", "3000"])
            .await
            .unwrap();
    let client = DataClient::new();
    let auth = format!("Bearer {tok}");
    let via_gw = format!("{}/v1/databases/shop/collections/c", gw.public);
    let insert = |id: &str| json!({"documents": [{"_id": id}]});
    poll("the gateway to serve", Duration::from_secs(15), || async {
        let (st, _) = client.call(Method::PUT, &via_gw, None, &[("authorization", &auth)]).await;
        (st == 201 || st == 200).then_some(())
    })
    .await
    .unwrap();

    // The replica set moves to epoch 2 (as a migration's switch would).
    let c = &stack.cluster;
    let node = &c.nodes[0];
    let (st, body) =
        c.client.post(&format!("{}/v1/admin/route-epoch", node.admin), &json!({"db": "shop", "epoch": 2})).await;
    assert_eq!((st, body["epoch"].as_u64()), (200, Some(2)), "{body}");
    // An epoch only rises.
    let (_, body) =
        c.client.post(&format!("{}/v1/admin/route-epoch", node.admin), &json!({"db": "shop", "epoch": 1})).await;
    assert_eq!(body["epoch"], 2);

    // Straight to the datanode: epoch 1 is refused for writes and reads, epoch 2 served.
    let direct = format!("{}/v1/databases/shop/collections/c", node.data);
    let with_epoch = |e: &'static str| [("x-nimbus-route-epoch", e)];
    let (st, body) =
        c.client.call(Method::POST, &format!("{direct}/documents"), Some(&insert("stale")), &with_epoch("1")).await;
    assert_eq!((st, body["error"]["code"].as_str()), (421, Some("StaleRoute")), "{body}");
    let (st, body) = c.client.call(Method::POST, &format!("{direct}/find"), Some(&json!({})), &with_epoch("1")).await;
    assert_eq!((st, body["error"]["code"].as_str()), (421, Some("StaleRoute")), "{body}");
    let (st, _) = c.client.call(Method::POST, &format!("{direct}/find"), Some(&json!({})), &with_epoch("2")).await;
    assert_eq!(st, 200);
    // Other databases keep their own epoch (none set: 0 is current).
    let (st, _) = c
        .client
        .call(Method::PUT, &format!("{}/v1/databases/blog/collections/c", node.data), None, &with_epoch("0"))
        .await;
    assert_eq!(st, 201);
    // An epoch is required and must be a number.
    let (st, body) = DataClient::internal(&c.secret)
        .call(Method::POST, &format!("{direct}/find"), Some(&json!({})), &[("x-nimbus-route-epoch", "soon")])
        .await;
    assert_eq!((st, body["error"]["code"].as_str()), (400, Some("BadRequest")), "{body}");

    // The gateway still has epoch 1: it is refused, waits for a newer route, and answers
    // 503 (nothing applied) when none comes within its deadline.
    let started = std::time::Instant::now();
    let (st, body) = client
        .call(Method::POST, &format!("{via_gw}/documents"), Some(&insert("w1")), &[("authorization", &auth)])
        .await;
    assert_eq!((st, body["error"]["code"].as_str()), (503, Some("Unavailable")), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(2500), "gave up before its deadline: {:?}", started.elapsed());
    let (_, found) = c.client.call(Method::GET, &format!("{direct}/documents/w1"), None, &with_epoch("2")).await;
    assert_eq!(found["error"]["code"], "NotFound", "a refused write was applied: {found}");

    // The control plane publishes epoch 2: a request sent meanwhile (waiting for the new
    // route, or sent after it: the same answer either way) is served.
    let pending = {
        let (client, url, auth) = (client.clone(), via_gw.clone(), auth.clone());
        tokio::spawn(async move {
            client
                .call(
                    Method::POST,
                    &format!("{url}/documents"),
                    Some(&json!({"documents": [{"_id": "w2"}]})),
                    &[("authorization", &auth)],
                )
                .await
        })
    };
    stack.control.route("shop", &stack.cluster, 2, RouteState::Serving).await.unwrap();
    let (st, body) = pending.await.unwrap();
    assert_eq!(st, 201, "the request waiting for the new route: {body}");
}
