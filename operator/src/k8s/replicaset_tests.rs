//! The replica-set reconciler against the fake API: it alone steps members, routes are
//! written only by whoever owns the decision, and etcd is written only when something
//! changed. Then the load of 1,000 tenants on 5 replica sets, as a figure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kube::runtime::controller::Action;
use serde_json::json;

use super::fixtures::*;

/// One reconcile of the instance alone, as its controller runs it (no replica-set pass).
async fn instance_only(w: &World, name: &str) -> Action {
    let r = super::instance::reconcile(Arc::new(w.instance(name)), w.ctx.clone()).await.unwrap();
    w.api.kubelet(NS);
    r
}

fn writes_to_members(w: &World) -> usize {
    w.api
        .calls()
        .iter()
        .filter(|c| c.method != "GET" && (c.path.contains("/pods") || c.path.contains("/persistentvolumeclaims")))
        .count()
}

#[tokio::test]
async fn instance_reconciles_never_step_members_or_call_datanodes() {
    let w = World::new();
    for name in ["shop", "blog", "wiki"] {
        w.add_instance(name, json!({}), true);
        w.reconcile_until_phase(name, "Ready", 12).await;
    }
    // A member's Pod is lost: the instances report, only the replica set repairs.
    w.api.remove(PODS, "default-rs0-m3");
    let (pod_writes, raft, statuses) =
        (writes_to_members(&w), w.raft_log(), w.datanodes.0.lock().unwrap().status_calls);
    for name in ["shop", "blog", "wiki"] {
        instance_only(&w, name).await;
    }
    assert_eq!(writes_to_members(&w), pod_writes, "an instance reconcile wrote a Pod or PVC");
    assert_eq!(w.raft_log(), raft);
    assert_eq!(w.datanodes.0.lock().unwrap().status_calls, statuses, "an instance reconcile called a datanode");
    assert!(w.api.get(PODS, "default-rs0-m3").is_none());
    w.reconcile_replica_set("default-rs0").await.unwrap();
    assert!(w.api.get(PODS, "default-rs0-m3").is_some(), "the replica set's reconciler starts it again");
}

#[tokio::test]
async fn a_route_moved_by_a_migration_is_never_rewritten_and_members_follow_on_the_same_epoch() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.add_instance("blog", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    w.reconcile_until_phase("blog", "Ready", 12).await;
    let route = |db: &str| w.store.0.lock().unwrap()[&format!("/nimbus/routes/{db}")].clone();
    let epoch = route("blog")["epoch"].clone();
    // A migration's switch moved shop elsewhere, at a higher epoch.
    let moved = json!({"replicaSet": "default-rs9", "members": [], "epoch": 99, "state": "serving"});
    w.store.0.lock().unwrap().insert("/nimbus/routes/shop".into(), moved.clone());
    // Member 2 loses its volume: replaced, and the routes on default-rs0 follow.
    w.api.remove(PODS, "default-rs0-m2");
    w.api.remove(PVCS, "default-rs0-m2-data");
    for _ in 0..10 {
        w.reconcile("shop").await.unwrap();
        w.reconcile("blog").await.unwrap();
    }
    assert_eq!(route("shop"), moved, "a reconcile rewrote the route a migration switched");
    let ids: Vec<u64> =
        route("blog")["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 3, 4]);
    assert_eq!(route("blog")["epoch"], epoch, "a member change is not a move: same epoch");
}

#[tokio::test]
async fn steady_reconciles_write_nothing_to_etcd_and_requeue_with_jitter() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    let writes = w.store.writes();
    let mut after = Vec::new();
    for _ in 0..5 {
        w.reconcile_replica_set("default-rs0").await.unwrap();
        after.push(instance_only(&w, "shop").await);
    }
    assert_eq!(w.store.writes(), writes, "a steady reconcile wrote to etcd");
    for a in &after {
        let d = requeue_of(a);
        assert!((60.0..=72.0).contains(&d), "{d} s");
    }
    assert!(after.windows(2).any(|p| p[0] != p[1]), "no jitter: {after:?}");
}

fn requeue_of(a: &Action) -> f64 {
    let text = format!("{a:?}");
    text.split("Some(").nth(1).and_then(|d| d.strip_suffix("s) }")).and_then(|d| d.parse().ok()).unwrap_or(0.0)
}

/// The figure of issue 13, item 7: 1,000 tenants on 5 shared replica sets, steady, in the
/// fake API. Prints `name: value unit` lines. `NIMBUS_LOAD_TENANTS` sets the tenants.
/// `cargo nextest run -p nimbus-operator --run-ignored only load_of --no-capture`
#[tokio::test]
#[ignore = "a figure, not a check: about a minute"]
async fn load_of_a_thousand_tenants_on_five_replica_sets() {
    let tenants: usize = std::env::var("NIMBUS_LOAD_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let w = World::new();
    let names: Vec<String> = (0..tenants).map(|i| format!("t{i:04}")).collect();
    for n in &names {
        w.add_instance(n, json!({"users": [{"name": "app", "role": "readWrite"}]}), true);
        w.reconcile_until_phase(n, "Ready", 12).await;
    }
    let services = w.api.list(SERVICES);
    let sets: Vec<String> = services
        .iter()
        .filter(|s| !s["metadata"]["labels"][super::objects::LABEL_REPLICA_SET].is_null())
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();

    // One steady minute: every object reconciled as often as its requeue asks.
    let (writes, calls, statuses) = (w.store.writes(), w.api.calls().len(), w.datanodes.0.lock().unwrap().status_calls);
    let (mut instance_rate, mut rs_rate) = (0.0, 0.0);
    for rs in &sets {
        let svc = w.api.get(SERVICES, rs).unwrap();
        let mut svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(svc).unwrap();
        svc.metadata.namespace.get_or_insert_with(|| NS.to_owned());
        let a = super::replicaset::reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
        rs_rate += 60.0 / requeue_of(&a);
    }
    for n in &names {
        instance_rate += 60.0 / requeue_of(&instance_only(&w, n).await);
    }
    println!("tenants: {} instances", names.len());
    println!("replica_sets: {} sets", sets.len());
    println!("instance_reconciles: {instance_rate:.0} per minute");
    println!("replica_set_reconciles: {rs_rate:.0} per minute");
    println!("member_step_passes: {rs_rate:.0} per minute");
    println!("etcd_writes: {} per minute", w.store.writes() - writes);
    println!("datanode_status_calls: {:.0} per minute", (w.datanodes.0.lock().unwrap().status_calls - statuses) as f64);
    println!("kubernetes_api_calls: {} per minute", w.api.calls().len() - calls);
}
