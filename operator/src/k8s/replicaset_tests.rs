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

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";

fn condition(w: &World, name: &str, type_: &str) -> serde_json::Value {
    let status = w.api.get(INSTANCES, name).unwrap()["status"].clone();
    status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).unwrap().clone()
}

fn event_notes(w: &World, reason: &str) -> Vec<String> {
    w.api
        .list(EVENTS)
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap().to_owned())
        .collect()
}

/// The scenario of issue 13, item 8: member 2's node (zone-b) stops answering, its Pod is
/// stuck Terminating (evicted) or left not Ready on a NotReady node. Nothing happens within
/// the failure period (the node may come back with the data); after it, the member is
/// replaced on the other node of zone-b, one membership step at a time, and its volume is
/// deleted only once the replacement votes.
#[tokio::test]
async fn a_member_on_a_lost_node_is_replaced_in_its_zone_after_the_failure_period_and_not_before() {
    for evict in [true, false] {
        let w = World::new();
        w.api.put(NODES, node("node-3", "zone-b"));
        w.add_instance("shop", json!({}), true);
        w.reconcile_until_phase("shop", "Ready", 12).await;
        assert_eq!(w.api.get(PODS, "default-rs0-m2").unwrap()["spec"]["nodeName"], "node-1");
        let before = w.raft_log();
        w.lose_node("node-1", evict);

        // Within the period: nothing but waiting (and the time kept on the volume).
        for _ in 0..10 {
            w.wait(FAILURE_PERIOD / 20);
            w.reconcile("shop").await.unwrap();
        }
        assert_eq!(w.raft_log(), before, "a membership change within the failure period (evict: {evict})");
        assert!(w.api.get(PODS, "default-rs0-m4").is_none(), "a replacement within the failure period");
        let pvc = w.api.get(PVCS, "default-rs0-m2-data").expect("the lost member's volume is kept");
        let since = (start() + FAILURE_PERIOD / 20).to_string();
        assert_eq!(pvc["metadata"]["annotations"][super::failure::ANNOTATION_UNHEALTHY_SINCE], since.as_str());
        assert_eq!(w.api.get(INSTANCES, "shop").unwrap()["status"]["phase"], "Degraded");

        // Past it: replaced, and the lost member's volume goes only after its replacement votes.
        w.wait(FAILURE_PERIOD);
        let mut voted = false;
        for _ in 0..12 {
            w.reconcile("shop").await.unwrap();
            voted |= w.raft_log().iter().any(|l| l == "change_voters [1, 2, 3, 4]");
            if w.api.get(PVCS, "default-rs0-m2-data").is_none() {
                assert!(voted, "the lost member's volume was deleted before its replacement was a voter");
            }
        }
        assert_eq!(
            w.raft_log()[before.len()..],
            ["add_learner 4", "change_voters [1, 2, 3, 4]", "remove_member 2"].map(String::from),
            "evict: {evict}"
        );
        let m4 = w.api.get(PODS, "default-rs0-m4").expect("a replacement");
        assert_eq!(m4["metadata"]["labels"]["nimbus.io/zone"], "zone-b");
        assert_eq!(m4["spec"]["nodeName"], "node-3", "on the healthy node of its zone");
        assert!(w.api.get(PODS, "default-rs0-m2").is_none(), "the lost Pod is force-deleted");
        assert!(w.api.get(PVCS, "default-rs0-m2-data").is_none());
        assert_eq!(w.api.get(INSTANCES, "shop").unwrap()["status"]["phase"], "Ready");
        let lost = event_notes(&w, "MemberLost");
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("member 2 of default-rs0 is declared lost"), "{}", lost[0]);
    }
}

/// The node comes back within the period: the member is back with its data, nothing is
/// replaced, and the time kept on its volume is cleared (a later failure starts afresh).
#[tokio::test]
async fn a_node_back_within_the_failure_period_brings_its_member_back_and_clears_the_time() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    let before = w.raft_log();
    w.lose_node("node-1", true);
    w.wait(FAILURE_PERIOD / 2);
    w.reconcile("shop").await.unwrap();
    w.api.put(NODES, node("node-1", "zone-b"));
    w.reconcile_until_phase("shop", "Ready", 6).await;
    w.wait(FAILURE_PERIOD);
    w.reconcile_until_phase("shop", "Ready", 6).await;
    assert_eq!(w.raft_log(), before);
    let pvc = w.api.get(PVCS, "default-rs0-m2-data").unwrap();
    assert!(pvc["metadata"]["annotations"][super::failure::ANNOTATION_UNHEALTHY_SINCE].is_null(), "{pvc}");
}

/// Zone b's only node is lost: past the period the member is declared lost, and that is
/// reported (the instance's conditions, a Warning Event), but nothing is created where no
/// node can run it. A node joining the zone gets the replacement.
#[tokio::test]
async fn a_lost_member_whose_zone_has_no_healthy_node_is_reported_not_replaced() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    let before = w.raft_log();
    w.lose_node("node-1", true);
    w.reconcile("shop").await.unwrap();
    w.wait(FAILURE_PERIOD * 2);
    for _ in 0..5 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(w.raft_log(), before);
    assert!(w.api.get(PODS, "default-rs0-m4").is_none());
    assert!(w.api.get(PVCS, "default-rs0-m4-data").is_none());
    assert!(w.api.get(PVCS, "default-rs0-m2-data").is_some());
    let degraded = condition(&w, "shop", "Degraded");
    assert_eq!(degraded["status"], "True");
    let message = degraded["message"].as_str().unwrap();
    assert!(message.contains("zone zone-b has no node to take member 4"), "{message}");
    let lost = event_notes(&w, "MemberLost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].contains("zone zone-b has no Ready schedulable node"), "{}", lost[0]);

    w.api.put(NODES, node("node-3", "zone-b"));
    w.reconcile_until_phase("shop", "Ready", 12).await;
    assert_eq!(w.api.get(PODS, "default-rs0-m4").unwrap()["spec"]["nodeName"], "node-3");
    assert_eq!(w.raft_log()[before.len()..], ["add_learner 4", "change_voters [1, 2, 3, 4]", "remove_member 2"]);
}

/// Two of three members lost (zones b and c): past the period nothing is replaced, created
/// or deleted: without a majority no step is safe, and none is forced.
#[tokio::test]
async fn without_a_majority_no_lost_member_is_replaced() {
    let w = World::new();
    w.api.put(NODES, node("node-3", "zone-b"));
    w.api.put(NODES, node("node-4", "zone-c"));
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    let before = w.raft_log();
    let pods_before = w.api.list(PODS).len();
    w.lose_node("node-1", true);
    w.lose_node("node-2", true);
    w.reconcile("shop").await.unwrap();
    w.wait(FAILURE_PERIOD * 2);
    for _ in 0..5 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(w.raft_log(), before);
    assert_eq!(w.api.list(PODS).len(), pods_before, "a Pod was created or deleted without a majority");
    for m in ["default-rs0-m2-data", "default-rs0-m3-data"] {
        assert!(w.api.get(PVCS, m).is_some(), "{m} deleted without a majority");
    }
    let progressing = condition(&w, "shop", "Progressing");
    let message = progressing["message"].as_str().unwrap();
    assert!(message.contains("no majority, nothing is replaced"), "{message}");
}

/// Pods carry their member's role, as CNPG's do: `kubectl get pods -l nimbus.io/role=leader`
/// finds the leader, and the label follows leadership.
#[tokio::test]
async fn member_pods_carry_their_role_and_it_follows_the_leader() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    w.reconcile_replica_set("default-rs0").await.unwrap();
    let roles = || -> Vec<(String, String)> {
        w.api
            .list(PODS)
            .iter()
            .map(|p| {
                let name = p["metadata"]["name"].as_str().unwrap().to_owned();
                (name, p["metadata"]["labels"]["nimbus.io/role"].as_str().unwrap_or("-").to_owned())
            })
            .collect()
    };
    let expect = |roles: [&str; 3]| -> Vec<(String, String)> {
        roles.iter().enumerate().map(|(i, r)| (format!("default-rs0-m{}", i + 1), r.to_string())).collect()
    };
    assert_eq!(roles(), expect(["leader", "follower", "follower"]));
    let patches = w.api.calls().iter().filter(|c| c.method == "PATCH" && c.path.contains("/pods/")).count();
    w.reconcile_replica_set("default-rs0").await.unwrap();
    let again = w.api.calls().iter().filter(|c| c.method == "PATCH" && c.path.contains("/pods/")).count();
    assert_eq!(again, patches, "a label already right is patched again");
    w.datanodes.0.lock().unwrap().leader = 3;
    w.reconcile_replica_set("default-rs0").await.unwrap();
    assert_eq!(roles(), expect(["follower", "follower", "leader"]));
}

/// The node of a lost member comes back after the failure period, before its replacement
/// joined Raft (its zone had no other node): the kubelet removes the evicted Pod, and the
/// member starts again on its volume, with its data, instead of a full copy; the volume
/// is kept and nothing changes in Raft.
#[tokio::test]
async fn a_node_back_after_the_failure_period_brings_its_member_back_before_a_replacement_joins() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    let before = w.raft_log();
    w.lose_node("node-1", true);
    w.reconcile("shop").await.unwrap();
    w.wait(FAILURE_PERIOD * 2);
    for _ in 0..3 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(event_notes(&w, "MemberLost").len(), 1, "declared lost");
    w.api.put(NODES, node("node-1", "zone-b"));
    for _ in 0..8 {
        w.reconcile("shop").await.unwrap();
    }
    assert_eq!(w.raft_log(), before, "the member was replaced though its node came back");
    assert!(w.api.get(PVCS, "default-rs0-m2-data").is_some(), "its volume was deleted");
    assert_eq!(w.api.get(PODS, "default-rs0-m2").unwrap()["status"]["phase"], "Running");
    assert!(w.api.get(PVCS, "default-rs0-m4-data").is_none(), "a replacement left behind");
    assert_eq!(w.api.get(INSTANCES, "shop").unwrap()["status"]["phase"], "Ready");
}

/// The force delete of a lost member's Pod fails once: its volume is not deleted under it,
/// and the next pass, deciding from the Pod (its node is NotReady), force-deletes it
/// again and then the volume, rather than fall back to a graceful delete that a lost node
/// never completes.
#[tokio::test]
async fn a_failed_force_delete_is_retried_and_the_volume_goes_only_after_the_pod() {
    let w = World::new();
    w.api.put(NODES, node("node-3", "zone-b"));
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    w.lose_node("node-1", true);
    w.reconcile("shop").await.unwrap();
    w.wait(FAILURE_PERIOD * 2);
    for _ in 0..12 {
        if w.raft_log().iter().any(|l| l == "remove_member 2") {
            break;
        }
        w.reconcile("shop").await.unwrap();
    }
    assert!(w.raft_log().iter().any(|l| l == "remove_member 2"), "{:?}", w.raft_log());
    w.api.fail_next("DELETE", "/pods/default-rs0-m2", 500);
    let _ = w.reconcile("shop").await;
    assert!(w.api.get(PODS, "default-rs0-m2").is_some());
    assert!(w.api.get(PVCS, "default-rs0-m2-data").is_some(), "the volume was deleted under its Pod");
    for _ in 0..4 {
        w.reconcile("shop").await.unwrap();
    }
    assert!(w.api.get(PODS, "default-rs0-m2").is_none(), "the lost Pod is never force-deleted");
    assert!(w.api.get(PVCS, "default-rs0-m2-data").is_none());
    let deletes = w.api.calls().iter().filter(|c| c.method == "DELETE" && c.path.ends_with("/default-rs0-m2")).count();
    assert_eq!(deletes, 2, "the failed force delete and its retry");
    let deleted = event_notes(&w, "MemberDeleted");
    assert!(deleted.len() <= 2, "{deleted:?}");
}

/// After a leaderless outage longer than the failure period (every member not Ready: a
/// datanode is Ready only with a leader), two members come back and elect a leader while
/// the third is one probe behind: it is not declared lost there and then, but given a
/// whole period; time counts only while the replica set has a leader.
#[tokio::test]
async fn no_member_is_declared_lost_the_moment_a_leaderless_outage_ends() {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 12).await;
    let set_ready = |pod: &str, ready: bool| {
        let mut p = w.api.get(PODS, pod).unwrap();
        p["status"]["conditions"] = json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
        w.api.put(PODS, p);
    };
    w.datanodes.0.lock().unwrap().leaderless = true;
    for m in 1..=3 {
        set_ready(&format!("default-rs0-m{m}"), false);
    }
    for _ in 0..8 {
        w.reconcile_replica_set("default-rs0").await.unwrap();
        w.wait(FAILURE_PERIOD / 4);
    }
    w.datanodes.0.lock().unwrap().leaderless = false;
    set_ready("default-rs0-m1", true);
    set_ready("default-rs0-m2", true);
    for _ in 0..3 {
        w.reconcile_replica_set("default-rs0").await.unwrap();
    }
    assert!(event_notes(&w, "MemberLost").is_empty(), "{:?}", event_notes(&w, "MemberLost"));
    assert!(w.api.get(PODS, "default-rs0-m4").is_none(), "a replacement at the end of the outage");
    // Still down a whole period later: now it is lost.
    w.wait(FAILURE_PERIOD);
    w.reconcile_replica_set("default-rs0").await.unwrap();
    assert_eq!(event_notes(&w, "MemberLost").len(), 1);
}

/// A dedicated instance being deleted: its finalizer deletes the volumes one by one, and
/// a replica-set pass in between must not replace the member whose volume just went (its
/// new volume would never be deleted).
#[tokio::test]
async fn a_dedicated_replica_set_is_not_stepped_while_its_instance_is_deleted() {
    let w = World::new();
    w.add_instance("orders", json!({"tier": "dedicated"}), true);
    w.reconcile_until_phase("orders", "Ready", 12).await;
    let rs = w.api.get(INSTANCES, "orders").unwrap()["status"]["placement"]["replicaSet"].as_str().unwrap().to_owned();
    w.api.delete(INSTANCES, "orders");
    // Mid-cleanup: one volume deleted, its Pod still there.
    let first = w.api.list(PVCS)[0]["metadata"]["name"].as_str().unwrap().to_owned();
    w.api.remove(PVCS, &first);
    let (pvcs, pods) = (w.api.list(PVCS).len(), w.api.list(PODS).len());
    for _ in 0..3 {
        w.reconcile_replica_set(&rs).await.unwrap();
        w.api.kubelet(NS);
    }
    assert_eq!(w.api.list(PVCS).len(), pvcs, "a volume was created while the instance is deleted");
    assert_eq!(w.api.list(PODS).len(), pods, "a Pod was created while the instance is deleted");
}

/// A Service made to look like a dedicated replica set's, owned by an instance that is not
/// the one named (another uid), is not driven: no member is made for it.
#[tokio::test]
async fn a_service_claiming_an_owner_it_was_not_made_by_is_not_driven() {
    let w = World::new();
    w.add_instance("orders", json!({"tier": "dedicated"}), true);
    w.api.put(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "default-forged", "namespace": NS,
                "labels": {"nimbus.io/replica-set": "default-forged", "nimbus.io/pool": "default"},
                "annotations": {"nimbus.io/zones": "zone-a,zone-b,zone-c"},
                "ownerReferences": [{"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
                    "name": "orders", "uid": "not-the-uid-of-orders", "controller": true}]},
            "spec": {"clusterIP": "None"}}),
    );
    for _ in 0..3 {
        w.reconcile_replica_set("default-forged").await.unwrap();
    }
    let made: Vec<_> = w
        .api
        .list(PODS)
        .into_iter()
        .filter(|p| p["metadata"]["name"].as_str().unwrap().starts_with("default-forged"))
        .collect();
    assert!(made.is_empty(), "{made:?}");
    assert!(w.api.list(PVCS).iter().all(|p| !p["metadata"]["name"].as_str().unwrap().starts_with("default-forged")));
}
