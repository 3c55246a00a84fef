//! The dedicated replica set a completed migration emptied, scenario by scenario
//! (`k8s::retire`): removed once the move is done and nothing else needs it; never a shared
//! one, never before the migration is `Done`, finished by an operator restarted half-way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};

use super::fixtures::*;
use super::migration_tests::{
    add_pool_of_mode, change_pool, condition, drive, events, reasons, restarted, route, status, until_led,
};
use crate::controlplane::migration::{self, Outcome, Step, Tuning};

const PDBS: &str = "/apis/policy/v1/namespaces/apps/poddisruptionbudgets";
/// `shop`'s replica set in the dedicated pool `solo`.
const SOLO: &str = "solo-shop";

/// The objects of replica set `rs` by kind: (Service, Pods, PVCs, PDB, etcd record).
fn left_of(w: &World, rs: &str) -> (bool, usize, usize, bool, bool) {
    let of_rs = |objects: Vec<Value>| {
        objects.into_iter().filter(|o| o["metadata"]["labels"]["nimbus.io/replica-set"] == rs).count()
    };
    let record = w.store.0.lock().unwrap().contains_key(&format!("/nimbus/replicasets/{NS}/{rs}"));
    (
        w.api.get(SERVICES, rs).is_some(),
        of_rs(w.api.list(PODS)),
        of_rs(w.api.list(PVCS)),
        w.api.get(PDBS, rs).is_some(),
        record,
    )
}

const WHOLE: (bool, usize, usize, bool, bool) = (true, 3, 3, true, true);
const GONE: (bool, usize, usize, bool, bool) = (false, 0, 0, false, false);

/// Pools `solo` (dedicated) and `big` (shared); `shop` Ready in `pool`.
async fn shop_in(pool: &str) -> World {
    let w = World::new();
    add_pool_of_mode(&w, "solo", "dedicated");
    add_pool_of_mode(&w, "big", "shared");
    w.add_instance("shop", json!({"pool": pool}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    w.migration.model.lock().unwrap().documents = 5;
    w
}

/// `spec.pool` changed to `pool`, its replica set `rs` led, the migration started.
async fn start_move(w: &World, pool: &str, rs: &str) {
    change_pool(w, "shop", pool);
    w.reconcile("shop").await.unwrap();
    until_led(w, rs).await;
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.migration.record_of("shop").unwrap().to_replica_set, rs, "the migration started");
}

/// Reconciles `shop` until `rs` is gone, at most `max` times.
async fn reconcile_until_removed(w: &World, rs: &str, max: usize) {
    for _ in 0..max {
        w.reconcile("shop").await.unwrap();
        if left_of(w, rs) == GONE {
            return;
        }
    }
    panic!("replica set {rs} was not removed: {:?}", left_of(w, rs));
}

fn removed_events(w: &World) -> Vec<String> {
    events(w).into_iter().filter(|(r, _)| r == "ReplicaSetRemoved").map(|(_, n)| n).collect()
}

/// A dedicated → shared move, completed and reconciled until the emptied replica set is
/// gone (the chart's RBAC test counts what it calls).
pub(super) async fn moved_out_of_a_dedicated_pool() -> World {
    let w = shop_in("solo").await;
    assert_eq!(status(&w)["placement"]["replicaSet"], SOLO);
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    reconcile_until_removed(&w, SOLO, 4).await;
    w
}

#[tokio::test]
async fn a_completed_move_out_of_a_dedicated_pool_removes_the_emptied_replica_set() {
    let w = moved_out_of_a_dedicated_pool().await;
    assert_eq!(left_of(&w, SOLO), GONE, "Service, members, volumes, PDB and etcd record");
    assert_eq!(left_of(&w, "big-rs0").1, 3, "the replica set it moved to keeps its members");
    let notes = removed_events(&w);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("replica set solo-shop removed") && notes[0].contains("moved to big-rs0"), "{notes:?}");
    let s = status(&w);
    assert_eq!(
        (s["placement"]["replicaSet"].as_str(), s["migration"]["phase"].as_str()),
        (Some("big-rs0"), Some("Completed"))
    );
    w.reconcile_until_phase("shop", "Ready", 5).await;
    // Nothing more happens at later passes.
    let calls = w.api.calls().len();
    w.reconcile("shop").await.unwrap();
    let deletes = w.api.calls()[calls..].iter().filter(|c| c.method == "DELETE").count();
    assert_eq!(deletes, 0, "{:?}", &w.api.calls()[calls..]);
    assert_eq!(removed_events(&w).len(), 1);
}

#[tokio::test]
async fn a_move_back_into_the_dedicated_pool_makes_its_replica_set_anew_and_keeps_it() {
    let w = moved_out_of_a_dedicated_pool().await;
    start_move(&w, "solo", SOLO).await;
    let svc = w.api.get(SERVICES, SOLO).unwrap();
    assert!(svc["metadata"]["annotations"].get("nimbus.io/removing").is_none(), "made anew: {svc}");
    assert_eq!(drive(&w).await, Outcome::Completed);
    for _ in 0..3 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(status(&w)["placement"]["replicaSet"], SOLO);
    assert_eq!(left_of(&w, SOLO), WHOLE, "the instance lives there");
    assert!(left_of(&w, "big-rs0").0, "a shared replica set stays");
    assert_eq!(removed_events(&w).len(), 1, "only the first move removed one");
}

#[tokio::test]
async fn a_shared_replica_set_emptied_by_a_move_is_kept() {
    let w = shop_in("big").await;
    start_move(&w, "solo", SOLO).await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    for _ in 0..4 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(status(&w)["placement"]["replicaSet"], SOLO);
    assert_eq!(left_of(&w, "big-rs0"), WHOLE, "no one is on it any more, and it stays with its volumes");
    assert!(removed_events(&w).is_empty());
    // Moved on again, the dedicated one it leaves goes.
    add_pool_of_mode(&w, "other", "shared");
    start_move(&w, "other", "other-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    reconcile_until_removed(&w, SOLO, 4).await;
    assert_eq!(left_of(&w, "big-rs0"), WHOLE);
}

#[tokio::test]
async fn a_dedicated_replica_set_stays_until_its_migration_is_done() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    // Aborted (the checksums differ): rolled back, the database served there again.
    w.migration.model.lock().unwrap().mismatches = 1;
    assert!(matches!(drive(&w).await, Outcome::WaitUntil(_)));
    assert_eq!(route(&w)["replicaSet"], SOLO);
    for _ in 0..3 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(status(&w)["migration"]["phase"], "Aborted");
    assert_eq!(left_of(&w, SOLO), WHOLE);

    // Retried and switched; the source's copy waits for the grace period (CleanUp).
    let mut r = w.migration.record_of("shop").unwrap();
    r.next_retry_ms = Some(migration::now_ms().saturating_sub(1));
    w.migration.put_record(&r);
    let tuning = Tuning { cleanup_grace: Duration::from_secs(3_600), ..migration_tuning() };
    assert!(matches!(migration::drive(&w.migration, &tuning, "shop").await.unwrap(), Outcome::WaitUntil(_)));
    assert_eq!(w.migration.record_of("shop").unwrap().step, Step::CleanUp);
    for _ in 0..3 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(status(&w)["placement"]["replicaSet"], "big-rs0", "served from the target");
    assert_eq!(left_of(&w, SOLO), WHOLE, "the source holds the copy until its clean-up");
    let svc = w.api.get(SERVICES, SOLO).unwrap();
    assert!(svc["metadata"]["annotations"].get("nimbus.io/removing").is_none(), "{svc}");
    assert!(removed_events(&w).is_empty());

    // The clean-up done: now it goes.
    let mut r = w.migration.record_of("shop").unwrap();
    r.next_retry_ms = Some(migration::now_ms().saturating_sub(1));
    w.migration.put_record(&r);
    assert_eq!(drive(&w).await, Outcome::Completed);
    reconcile_until_removed(&w, SOLO, 4).await;
}

#[tokio::test]
async fn an_operator_restarted_mid_removal_finishes_it() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    // The removal begins; a volume's deletion fails half-way, and the operator stops.
    w.api.fail_next("DELETE", "persistentvolumeclaims/solo-shop-m2-data", 500);
    w.reconcile("shop").await.unwrap();
    let (service, _, volumes, _, record) = left_of(&w, SOLO);
    assert!(service && record && volumes > 0, "{:?}", left_of(&w, SOLO));
    let svc = w.api.get(SERVICES, SOLO).unwrap();
    assert!(svc["metadata"]["annotations"]["nimbus.io/removing"].as_str().unwrap().contains("moved to big-rs0"));
    let c = condition(&w, "Migrating");
    assert!(c["message"].as_str().unwrap().contains("removing replica set solo-shop"), "{c}");
    assert_eq!(status(&w)["phase"], "Ready", "served all the same");

    // The marked replica set is not stepped: its deleted members are not replaced.
    for _ in 0..3 {
        w.reconcile_replica_set(SOLO).await.unwrap();
        w.api.kubelet(NS);
    }
    assert_eq!(left_of(&w, SOLO).1, 0, "a member was made again");

    let w = restarted(w);
    reconcile_until_removed(&w, SOLO, 4).await;
    assert_eq!(reasons(&w).iter().filter(|r| *r == "ReplicaSetRemoved").count(), 1);
}

#[tokio::test]
async fn an_instance_deleted_before_its_emptied_replica_set_was_removed_deletes_its_volumes() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    // Deleted before a pass saw the migration completed.
    w.api.delete(INSTANCES, "shop");
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(INSTANCES, "shop").is_none());
    w.collect_garbage();
    let (_, _, volumes, _, record) = left_of(&w, SOLO);
    assert_eq!((volumes, record), (0, false), "its Pods, PDB and Service go with the instance (garbage collection)");
}

/// `shop`'s replica set in the shared pool `big`, of tier `dedicated`.
const BIG_SHOP: &str = "big-shop";

/// `shop` of tier `dedicated` Ready in the shared pool `big`, on a replica set of its own.
async fn dedicated_shop_in_a_shared_pool() -> World {
    let w = World::new();
    add_pool_of_mode(&w, "solo", "dedicated");
    add_pool_of_mode(&w, "big", "shared");
    add_pool_of_mode(&w, "other", "shared");
    w.add_instance("shop", json!({"pool": "big", "tier": "dedicated"}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    w.migration.model.lock().unwrap().documents = 5;
    assert_eq!(status(&w)["placement"]["replicaSet"], BIG_SHOP);
    w
}

/// Database `db` of another instance served from `rs` as etcd says (its route and claim),
/// whatever placement would have done; no status says so.
fn route_another_database_to(w: &World, db: &str, rs: &str) {
    let route = nimbus_api::etcd::Route {
        replica_set: rs.into(),
        members: Vec::new(),
        epoch: 1,
        state: nimbus_api::etcd::RouteState::Serving,
        hold_deadline_ms: None,
        hold_timeout_ms: None,
    };
    let claim = json!({"namespace": NS, "instance": db, "uid": format!("uid-{db}")});
    let mut kv = w.store.0.lock().unwrap();
    kv.insert(nimbus_api::etcd::route_key(db), serde_json::to_value(route).unwrap());
    kv.insert(nimbus_api::etcd::tenant_key(db), claim);
}

/// Volumes of `rs` not being deleted.
fn live_volumes(w: &World, rs: &str) -> usize {
    w.api
        .list(PVCS)
        .iter()
        .filter(|v| {
            v["metadata"]["labels"]["nimbus.io/replica-set"] == rs && v["metadata"]["deletionTimestamp"].is_null()
        })
        .count()
}

#[tokio::test]
async fn a_standard_instance_is_never_placed_on_a_dedicated_tiers_replica_set_of_a_shared_pool() {
    let w = dedicated_shop_in_a_shared_pool().await;
    w.add_instance("cart", json!({"pool": "big"}), true);
    w.reconcile("cart").await.unwrap();
    let placed = w.api.get(INSTANCES, "cart").unwrap()["status"]["placement"]["replicaSet"].clone();
    assert_eq!(placed, "big-rs0", "a shared replica set of its own pool");
    let svc = w.api.get(SERVICES, "big-rs0").unwrap();
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "ResourcePool", "{svc}");
}

/// A dedicated-tier instance's replica set is full from the moment placement names it,
/// before its Service (the owner reference) exists: a move's target recorded while its
/// members' zones could not be chosen yet, say.
#[tokio::test]
async fn a_dedicated_tiers_replica_set_named_before_its_service_exists_is_never_shared() {
    let w = dedicated_shop_in_a_shared_pool().await;
    w.add_instance("solo2", json!({"pool": "other", "tier": "dedicated"}), true);
    let mut solo2 = w.api.get(INSTANCES, "solo2").unwrap();
    solo2["status"] = json!({"migrationTarget": {"replicaSet": "big-solo2", "pool": "big"}});
    w.api.put(INSTANCES, solo2);
    assert!(w.api.get(SERVICES, "big-solo2").is_none());
    w.add_instance("cart", json!({"pool": "big"}), true);
    w.reconcile("cart").await.unwrap();
    let placed = w.api.get(INSTANCES, "cart").unwrap()["status"]["placement"]["replicaSet"].clone();
    assert_eq!(placed, "big-rs0", "a shared replica set, not solo2's dedicated target");
}

/// Two dedicated replica sets whose names meet (pool `a` with instance `b-c`, pool `a-b`
/// with instance `c`: both `a-b-c`): the second instance never joins the first's.
#[tokio::test]
async fn an_instance_never_joins_another_instances_dedicated_replica_set_of_the_same_name() {
    let w = World::new();
    add_pool_of_mode(&w, "a", "dedicated");
    add_pool_of_mode(&w, "a-b", "dedicated");
    w.add_instance("b-c", json!({"pool": "a"}), true);
    w.reconcile_until_phase("b-c", "Ready", 12).await;
    assert_eq!(w.api.get(INSTANCES, "b-c").unwrap()["status"]["placement"]["replicaSet"], "a-b-c");
    w.add_instance("c", json!({"pool": "a-b"}), true);
    w.reconcile("c").await.unwrap();
    let c = w.api.get(INSTANCES, "c").unwrap();
    assert_eq!(c["status"]["phase"], "Failed", "{c}");
    let ready = c["status"]["conditions"].as_array().unwrap().iter().find(|x| x["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["reason"], "PlacementConflict", "{ready}");
    assert!(ready["message"].as_str().unwrap().contains("dedicated to instance b-c"), "{ready}");
    let svc = w.api.get(SERVICES, "a-b-c").unwrap();
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "uid-b-c", "the Service is still b-c's: {svc}");
}

/// Nor moves onto it: `c`, placed in another pool, asks for pool `a-b`.
#[tokio::test]
async fn an_instance_never_moves_onto_another_instances_dedicated_replica_set_of_the_same_name() {
    let w = World::new();
    add_pool_of_mode(&w, "a", "dedicated");
    add_pool_of_mode(&w, "a-b", "dedicated");
    add_pool_of_mode(&w, "other", "shared");
    w.add_instance("b-c", json!({"pool": "a"}), true);
    w.reconcile_until_phase("b-c", "Ready", 12).await;
    w.add_instance("c", json!({"pool": "other"}), true);
    w.reconcile_until_phase("c", "Ready", 12).await;
    change_pool(&w, "c", "a-b");
    for _ in 0..3 {
        w.reconcile("c").await.unwrap();
    }
    let c = w.api.get(INSTANCES, "c").unwrap();
    let m = c["status"]["conditions"].as_array().unwrap().iter().find(|x| x["type"] == "Migrating").unwrap().clone();
    assert_eq!(m["reason"], "PlacementConflict", "{m}");
    assert!(w.migration.record_of("c").is_none(), "no migration started onto b-c's replica set");
    assert_eq!(w.api.get(SERVICES, "a-b-c").unwrap()["metadata"]["ownerReferences"][0]["uid"], "uid-b-c");
}

#[tokio::test]
async fn deleting_a_dedicated_instance_keeps_its_replica_sets_volumes_while_another_database_is_routed_there() {
    let w = dedicated_shop_in_a_shared_pool().await;
    route_another_database_to(&w, "cart", BIG_SHOP);
    w.api.delete(INSTANCES, "shop");
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(INSTANCES, "shop").is_none(), "the deletion goes on");
    assert_eq!(live_volumes(&w, BIG_SHOP), 3, "cart's data is on them");
    assert!(left_of(&w, BIG_SHOP).4, "the replica set's record stays");
    let kept = events(&w).into_iter().find(|(r, _)| r == "VolumesKept").expect("a Warning Event says why");
    assert!(kept.1.contains("database cart"), "{kept:?}");
}

#[tokio::test]
async fn a_completed_move_away_keeps_a_dedicated_replica_set_another_database_is_routed_to() {
    let w = dedicated_shop_in_a_shared_pool().await;
    start_move(&w, "other", "other-shop").await;
    route_another_database_to(&w, "cart", BIG_SHOP);
    assert_eq!(drive(&w).await, Outcome::Completed);
    for _ in 0..4 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(status(&w)["placement"]["replicaSet"], "other-shop");
    assert_eq!(left_of(&w, BIG_SHOP), WHOLE, "cart's data is there");
    let svc = w.api.get(SERVICES, BIG_SHOP).unwrap();
    assert!(svc["metadata"]["annotations"].get("nimbus.io/removing").is_none(), "{svc}");
    assert!(removed_events(&w).is_empty());
}

#[tokio::test]
async fn a_replica_set_kept_after_its_removal_began_is_unmarked_and_stepped_again() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    // The removal begins (a volume's deletion fails, so it stops half-way).
    w.api.fail_next("DELETE", "persistentvolumeclaims/solo-shop-m2-data", 500);
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(SERVICES, SOLO).unwrap()["metadata"]["annotations"]["nimbus.io/removing"].is_string());
    // Then another database turns out to be there: the replica set is kept.
    route_another_database_to(&w, "cart", SOLO);
    w.reconcile("shop").await.unwrap();
    let svc = w.api.get(SERVICES, SOLO).unwrap();
    assert!(svc["metadata"]["annotations"].get("nimbus.io/removing").is_none(), "{svc}");
    assert!(left_of(&w, SOLO).4, "its record stays");
    let stopped: Vec<String> =
        events(&w).into_iter().filter(|(r, _)| r == "ReplicaSetRemovalStopped").map(|(_, n)| n).collect();
    assert_eq!(stopped.len(), 1, "a removal stopped half-way is said once: {stopped:?}");
    assert!(stopped[0].contains("cart") && stopped[0].contains("gone"), "{stopped:?}");
    // Its reconciler steps it again: the members deleted are made anew.
    for _ in 0..6 {
        w.reconcile_replica_set(SOLO).await.unwrap();
        w.api.kubelet(NS);
    }
    assert!(left_of(&w, SOLO).1 > 0, "no member was made again: {:?}", left_of(&w, SOLO));
}

#[tokio::test]
async fn the_service_and_record_go_only_once_no_member_pod_or_volume_is_listed_terminating_or_not() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    // A member's Pod that takes its time to stop (a finalizer of someone else's holds it):
    // its volume stays too, held by pvc-protection while the Pod uses it.
    let mut pod = w.api.get(PODS, "solo-shop-m1").unwrap();
    pod["metadata"]["finalizers"] = json!(["example.com/hold"]);
    w.api.put(PODS, pod);
    for _ in 0..4 {
        w.reconcile("shop").await.unwrap();
    }
    let pod = w.api.get(PODS, "solo-shop-m1").expect("still Terminating");
    assert!(!pod["metadata"]["deletionTimestamp"].is_null());
    let volume = w.api.get(PVCS, "solo-shop-m1-data").expect("held by pvc-protection");
    assert!(!volume["metadata"]["deletionTimestamp"].is_null());
    let (service, pods, volumes, _, record) = left_of(&w, SOLO);
    assert_eq!((service, pods, volumes, record), (true, 1, 1, true), "nothing forgotten while members terminate");
    assert!(removed_events(&w).is_empty());
    let said = condition(&w, "Migrating")["message"].as_str().unwrap_or_default().to_owned();
    assert!(said.contains("waiting for 1 member Pods and 1 volumes to go"), "the wait not said: {said}");

    // The Pod stops: its volume is released, and the next pass removes the rest.
    let mut pod = w.api.get(PODS, "solo-shop-m1").unwrap();
    pod["metadata"]["finalizers"] = json!([]);
    w.api.put(PODS, pod);
    w.api.kubelet(NS);
    reconcile_until_removed(&w, SOLO, 2).await;
}

#[tokio::test]
async fn a_member_pod_on_a_lost_node_goes_once_its_machine_is_known_to_be_off() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    // The node of one of `solo-shop`'s members stops answering, its Pods evicted: they stay
    // Terminating, no kubelet is left to stop them (nor `big-rs0`'s member there).
    let node = w.api.get(PODS, "solo-shop-m1").unwrap()["spec"]["nodeName"].as_str().unwrap().to_owned();
    w.lose_node(&node, true);
    w.sync_nodes();
    let on_node = |w: &World| -> Vec<String> {
        let pods = w.api.list(PODS).into_iter().filter(|p| p["spec"]["nodeName"] == node.as_str());
        pods.map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()).collect()
    };
    let big_member: Vec<String> = on_node(&w).into_iter().filter(|n| n.starts_with("big-rs0-")).collect();
    assert_eq!(big_member.len(), 1, "{:?}", on_node(&w));
    // NotReady is not enough: a kubelet that stopped reporting may leave the datanode
    // running, and a move back would remake the replica set under the same member names.
    for _ in 0..4 {
        w.reconcile("shop").await.unwrap();
        w.api.kubelet(NS);
    }
    assert!(w.api.get(PODS, "solo-shop-m1").is_some(), "deleted while its machine may still run");
    let said = condition(&w, "Migrating")["message"].as_str().unwrap_or_default().to_owned();
    assert!(said.contains("node.kubernetes.io/out-of-service"), "what to do is not said: {said}");
    // A person taints the node out-of-service (the machine is off): the removal finishes.
    let mut n = w.api.get(NODES, &node).unwrap();
    n["spec"]["taints"] =
        json!([{"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}]);
    w.api.put(NODES, n);
    w.sync_nodes();
    reconcile_until_removed_with_kubelet(&w, SOLO, 6).await;
    assert_eq!(removed_events(&w).len(), 1);
    // Only the emptied replica set's Pods: `big-rs0`'s member on that node is its own
    // replica set's business (the members' rule), untouched here.
    for name in &big_member {
        assert!(w.api.get(PODS, name).is_some(), "{name} was deleted by the removal of another replica set");
    }
}

#[tokio::test]
async fn a_member_pod_whose_node_is_deleted_does_not_hold_the_removal() {
    let w = shop_in("solo").await;
    start_move(&w, "big", "big-rs0").await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    let node = w.api.get(PODS, "solo-shop-m2").unwrap()["spec"]["nodeName"].as_str().unwrap().to_owned();
    w.lose_node(&node, true);
    // The cloud's node controller deletes the Node of a deleted machine.
    w.api.delete(NODES, &node);
    w.sync_nodes();
    reconcile_until_removed_with_kubelet(&w, SOLO, 6).await;
}

/// Reconciles `shop`, the kubelets running after each pass, until `rs` is gone.
async fn reconcile_until_removed_with_kubelet(w: &World, rs: &str, max: usize) {
    for _ in 0..max {
        w.reconcile("shop").await.unwrap();
        w.api.kubelet(NS);
        if left_of(w, rs) == GONE {
            return;
        }
    }
    panic!("replica set {rs} was not removed: {:?}", left_of(w, rs));
}
