//! A pool change on Kubernetes, scenario by scenario: the instance reconciler against the
//! fake API, the migration driven by the control plane's driver against a modelled world
//! whose routes and records live in the same fake etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::fixtures::*;
use super::instance::Context;
use super::migration::Migrations;
use crate::controlplane::migration::{self, MigrationRecord, Outcome, Step, Tuning};

const POOLS: &str = "/apis/nimbus.io/v1alpha1/namespaces/apps/resourcepools";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";

fn add_pool(w: &World, name: &str) {
    add_pool_of_mode(w, name, "shared");
}

/// A pool whose mode is `shared` or `dedicated`.
pub(super) fn add_pool_of_mode(w: &World, name: &str, mode: &str) {
    w.api.put(
        POOLS,
        json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "ResourcePool",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-pool-{name}"), "generation": 1},
        "spec": {"mode": mode, "replicasPerSet": 3, "databasesPerReplicaSet": 10}}),
    );
}

/// `kubectl patch dbi shop --type merge -p '{"spec":{"pool":"..."}}'`.
pub(super) fn change_pool(w: &World, name: &str, pool: &str) {
    let mut dbi = w.api.get(INSTANCES, name).unwrap();
    dbi["spec"]["pool"] = json!(pool);
    let generation = dbi["metadata"]["generation"].as_i64().unwrap_or(1);
    dbi["metadata"]["generation"] = json!(generation + 1);
    w.api.put(INSTANCES, dbi);
}

pub(super) fn status(w: &World) -> Value {
    w.api.get(INSTANCES, "shop").unwrap()["status"].clone()
}

pub(super) fn condition(w: &World, type_: &str) -> Value {
    status(w)["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).cloned().unwrap_or(Value::Null)
}

pub(super) fn events(w: &World) -> Vec<(String, String)> {
    w.api
        .list(EVENTS)
        .iter()
        .map(|e| (e["reason"].as_str().unwrap().to_owned(), e["note"].as_str().unwrap_or("").to_owned()))
        .collect()
}

pub(super) fn reasons(w: &World) -> Vec<String> {
    events(w).into_iter().map(|(r, _)| r).collect()
}

pub(super) fn route(w: &World) -> Value {
    w.store.0.lock().unwrap()["/nimbus/routes/shop"].clone()
}

/// `shop` Ready on `default-rs0` (the implicit default pool), and a pool `big`.
async fn ready_with_pool() -> World {
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 10).await;
    add_pool(&w, "big");
    w.migration.model.lock().unwrap().documents = 5;
    w
}

/// Reconciles the replica set `rs` (and runs the kubelet) until it reports a leader.
pub(super) async fn until_led(w: &World, rs: &str) {
    for _ in 0..20 {
        w.reconcile_replica_set(rs).await.unwrap();
        w.api.kubelet(NS);
        if w.ctx.reports.get(NS, rs).is_some_and(|r| r.leader.is_some()) {
            return;
        }
    }
    panic!("replica set {rs} never got a leader");
}

/// The pool changed to `big`, its replica set made and led, and the migration started.
async fn started() -> World {
    let w = ready_with_pool().await;
    change_pool(&w, "shop", "big");
    w.reconcile("shop").await.unwrap();
    until_led(&w, "big-rs0").await;
    w.reconcile("shop").await.unwrap();
    w
}

pub(super) async fn drive(w: &World) -> Outcome {
    migration::drive(&w.migration, &migration_tuning(), "shop").await.unwrap()
}

#[tokio::test]
async fn a_pool_change_makes_a_replica_set_in_the_new_pool_then_starts_the_migration() {
    let w = ready_with_pool().await;
    change_pool(&w, "shop", "big");
    w.reconcile("shop").await.unwrap();
    // The target is chosen in the new pool and its Service made; nothing starts before it leads.
    let svc = w.api.get(SERVICES, "big-rs0").expect("the target replica set's Service is made");
    assert_eq!(svc["metadata"]["labels"]["nimbus.io/pool"], "big");
    assert_eq!(status(&w)["migrationTarget"], json!({"replicaSet": "big-rs0", "pool": "big"}));
    let c = condition(&w, "Migrating");
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("True"), Some("Preparing")));
    assert!(c["message"].as_str().unwrap().contains("waiting for replica set big-rs0"), "{c}");
    assert!(w.migration.record_of("shop").is_none(), "nothing started before the target leads");
    assert_eq!(status(&w)["phase"], "Ready", "the database is served all along");

    until_led(&w, "big-rs0").await;
    w.reconcile("shop").await.unwrap();
    let record = w.migration.record_of("shop").expect("the migration is recorded");
    assert_eq!((record.from_replica_set.as_str(), record.to_replica_set.as_str()), ("default-rs0", "big-rs0"));
    let s = status(&w);
    assert_eq!(s["migration"]["phase"], "Copying");
    assert_eq!(s["migration"]["fromReplicaSet"], "default-rs0");
    assert_eq!(s["migration"]["toReplicaSet"], "big-rs0");
    assert_eq!(s["migration"]["attempt"], 1);
    assert!(s["migration"]["startedAt"].as_str().unwrap().ends_with('Z'));
    assert!(s["migration"].get("finishedAt").is_none(), "a merge patch's null removes it while it runs");
    assert_eq!(s["migrationSummary"], "Copying 0 B");
    assert_eq!(s["migrationTarget"]["migration"], json!(record.id));
    assert_eq!(s["placement"]["replicaSet"], "default-rs0", "the placement moves only at the switch");
    assert!(reasons(&w).contains(&"MigrationStarted".to_owned()), "{:?}", reasons(&w));

    // Started once: another pass starts nothing new.
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.migration.record_of("shop").unwrap().id, record.id);
}

#[tokio::test]
async fn the_status_mirrors_each_phase_and_explains_each_wait() {
    let w = started().await;
    let mut r = w.migration.record_of("shop").unwrap();
    r.documents_copied = 80_000;
    r.bytes_copied = 41_000_000;
    w.migration.put_record(&r);
    w.reconcile("shop").await.unwrap();
    assert_eq!(status(&w)["migrationSummary"], "Copying 41 MB");
    assert!(condition(&w, "Migrating")["message"].as_str().unwrap().contains("80,000 documents, 41 MB so far"));

    r.set_step(Step::CatchUp);
    r.lag_ops = 1240;
    w.migration.put_record(&r);
    w.reconcile("shop").await.unwrap();
    let s = status(&w);
    assert_eq!(s["migration"]["phase"], "CatchingUp");
    assert_eq!(s["migration"]["lagOps"], 1240);
    assert_eq!(s["migrationSummary"], "CatchingUp 1,240 ops behind");
    let c = condition(&w, "Migrating");
    assert_eq!(c["reason"], "CatchingUp");
    assert!(c["message"].as_str().unwrap().contains("waiting for lag under 0.2 s: 1,240 ops behind"), "{c}");

    r.set_step(Step::Hold);
    r.hold_deadline_ms = Some(migration::now_ms() + 5_000);
    w.migration.put_record(&r);
    w.reconcile("shop").await.unwrap();
    assert_eq!(status(&w)["migration"]["phase"], "Holding");
    assert!(condition(&w, "Migrating")["message"].as_str().unwrap().contains("every gateway to acknowledge"));

    let seen = reasons(&w);
    for phase in ["MigrationCatchingUp", "MigrationHolding"] {
        assert!(seen.contains(&phase.to_owned()), "an Event for {phase}: {seen:?}");
    }
    assert_eq!(status(&w)["phase"], "Ready");
}

#[tokio::test]
async fn a_completed_migration_moves_the_placement_to_the_target() {
    let w = started().await;
    let epoch = route(&w)["epoch"].as_u64().unwrap();
    assert_eq!(drive(&w).await, Outcome::Completed);
    let calls = w.migration.calls();
    assert!(calls.contains(&"import big-rs0 finish".to_owned()), "{calls:?}");
    assert!(calls.contains(&"drop default-rs0 shop".to_owned()), "the source's copy is cleaned up: {calls:?}");
    for copy in ["shop~restore", "shop~verify"] {
        assert!(calls.contains(&format!("drop default-rs0 {copy}")), "the source's {copy} is cleaned up: {calls:?}");
    }
    assert_eq!(route(&w)["replicaSet"], "big-rs0");
    assert_eq!(route(&w)["epoch"], epoch + 1);

    w.reconcile("shop").await.unwrap();
    let s = status(&w);
    assert_eq!(s["placement"]["replicaSet"], "big-rs0");
    assert_eq!(s["placement"]["pool"], "big");
    assert_eq!(s["migration"]["phase"], "Completed");
    assert_eq!(s["migration"]["documentsCopied"], 5);
    assert!(s["migration"]["finishedAt"].as_str().unwrap().ends_with('Z'));
    assert!(s["migration"]["holdMs"].is_u64());
    assert!(s["migrationSummary"].as_str().unwrap().starts_with("Completed"));
    assert_eq!(s["migrationTarget"], Value::Null);
    let c = condition(&w, "Migrating");
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("Completed")));
    assert!(reasons(&w).contains(&"Moved".to_owned()) && reasons(&w).contains(&"MigrationCompleted".to_owned()));

    // From then on the instance is the target's: its replica set reports it, and the source
    // no longer counts it.
    w.reconcile_until_phase("shop", "Ready", 5).await;
    let s = status(&w);
    assert_eq!(s["placement"]["replicaSet"], "big-rs0");
    assert_eq!(s["placement"]["leader"], "big-rs0-m1");
    let loads = super::instance::replica_set_loads(&w.ctx, NS, "default").await.unwrap();
    assert!(loads.iter().all(|l| l.name != "default-rs0"), "{loads:?}");
    // Nothing more starts: spec.pool is the pool it is on.
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.migration.record_of("shop").unwrap().step, Step::Done);
}

#[tokio::test]
async fn an_aborted_attempt_is_shown_then_the_retry_as_attempt_two() {
    let w = started().await;
    w.migration.model.lock().unwrap().mismatches = 1;
    // The first attempt's checksums differ: it aborts (nothing lost), and waits to retry.
    assert!(matches!(drive(&w).await, Outcome::WaitUntil(_)));
    assert_eq!(route(&w)["replicaSet"], "default-rs0", "the route went back to the source");
    w.reconcile("shop").await.unwrap();
    let s = status(&w);
    assert_eq!(s["migration"]["phase"], "Aborted");
    assert_eq!(s["migration"]["attempt"], 1);
    assert!(s["migration"]["error"].as_str().unwrap().contains("checksum"), "{s}");
    assert!(s["migration"].get("finishedAt").is_none(), "a retry is coming: not finished");
    assert_eq!(s["migrationSummary"], "Aborted, retrying");
    let c = condition(&w, "Migrating");
    assert_eq!(c["reason"], "Aborted");
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("attempt 1 aborted") && message.contains("attempt 2 starts in"), "{message}");
    let aborted = events(&w).into_iter().find(|(r, _)| r == "MigrationAborted").expect("a Warning Event");
    assert!(aborted.1.contains("checksum"), "{aborted:?}");
    assert_eq!(s["placement"]["replicaSet"], "default-rs0");

    // The retry's time comes; the driver gets through one page of attempt 2 and stops there.
    let mut r = w.migration.record_of("shop").unwrap();
    r.next_retry_ms = Some(migration::now_ms().saturating_sub(1));
    w.migration.put_record(&r);
    w.migration.model.lock().unwrap().saves_left = Some(1);
    assert_eq!(drive(&w).await, Outcome::Superseded);
    w.reconcile("shop").await.unwrap();
    let s = status(&w);
    assert_eq!(s["migration"]["phase"], "Copying");
    assert_eq!(s["migration"]["attempt"], 2);
    assert!(s["migrationSummary"].as_str().unwrap().ends_with("(attempt 2)"), "{}", s["migrationSummary"]);
    assert!(condition(&w, "Migrating")["message"].as_str().unwrap().contains("(attempt 2)"));
    assert!(reasons(&w).contains(&"MigrationRetrying".to_owned()), "{:?}", reasons(&w));

    w.migration.model.lock().unwrap().saves_left = None;
    assert_eq!(drive(&w).await, Outcome::Completed);
    w.reconcile("shop").await.unwrap();
    let s = status(&w);
    assert_eq!((s["migration"]["phase"].as_str(), s["migration"]["attempt"].as_u64()), (Some("Completed"), Some(2)));
    assert_eq!(s["placement"]["replicaSet"], "big-rs0");
}

/// A new operator (its own reconciler state and Migrator) over the same API and etcd.
pub(super) fn restarted(w: World) -> World {
    let world = FakeMigrationWorld { model: w.migration.model.clone(), ..w.migration.clone() };
    let old = &w.ctx;
    let ctx = Arc::new(Context {
        client: old.client.clone(),
        settings: old.settings.clone(),
        datanodes: old.datanodes.clone(),
        store: old.store.clone(),
        recorder: old.recorder.clone(),
        metrics: super::metrics::Metrics,
        reports: Default::default(),
        backoff: Default::default(),
        failover: old.failover.clone(),
        nodes: old.nodes.clone(),
        migrations: Migrations::new(Arc::new(world.clone()), migration_tuning()),
        backups: old.backups.clone(),
    });
    World { ctx, migration: world, ..w }
}

#[tokio::test]
async fn an_operator_restarted_mid_way_continues_the_migration_from_its_record() {
    let w = started().await;
    // The first operator's driver gets through the copy and stops (its process gone).
    w.migration.model.lock().unwrap().saves_left = Some(3);
    assert_eq!(drive(&w).await, Outcome::Superseded);
    let mid = w.migration.record_of("shop").unwrap();
    assert!(mid.step > Step::Copy && mid.step < Step::Done, "stopped mid-way: {:?}", mid.step);
    w.migration.model.lock().unwrap().saves_left = None;

    let w = restarted(w);
    w.reconcile("shop").await.unwrap();
    assert_eq!(status(&w)["migration"]["attempt"], 1);
    // The new operator's Migrator picks the record up and finishes it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(w.ctx.migrations.migrator.clone().run(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.migration.record_of("shop").unwrap().step != Step::Done {
        assert!(Instant::now() < deadline, "the migration never completed: {:?}", w.migration.record_of("shop"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    run.await.unwrap();
    let done: MigrationRecord = w.migration.record_of("shop").unwrap();
    assert_eq!((done.id, done.attempt), (mid.id, 1), "the same migration continued, not a new one");
    w.reconcile("shop").await.unwrap();
    let s = status(&w);
    assert_eq!(s["placement"]["replicaSet"], "big-rs0");
    assert_eq!(s["migration"]["phase"], "Completed");
    // Copied once: the restarted driver went on from the persisted cursor.
    let begins = w.migration.calls().iter().filter(|c| *c == "import big-rs0 begin").count();
    assert_eq!(begins, 1, "{:?}", w.migration.calls());
}

#[tokio::test]
async fn a_second_pool_change_while_one_runs_is_queued_until_it_finishes() {
    let w = started().await;
    add_pool(&w, "other");
    let first = w.migration.record_of("shop").unwrap();
    // The CRD refuses this once status.migration is written (tests/crds.rs); a change made
    // before the operator wrote it reaches the reconciler, which queues it.
    change_pool(&w, "shop", "other");
    w.reconcile("shop").await.unwrap();
    assert_eq!(w.migration.record_of("shop").unwrap().id, first.id, "no second migration starts");
    let c = condition(&w, "Migrating");
    assert!(c["message"].as_str().unwrap().contains("spec.pool now names pool other: that move is queued"), "{c}");
    assert!(w.api.get(SERVICES, "other-rs0").is_none());

    assert_eq!(drive(&w).await, Outcome::Completed);
    w.reconcile("shop").await.unwrap();
    assert_eq!(status(&w)["placement"]["pool"], "big");
    // The queued move starts from where the first one put the database.
    w.reconcile("shop").await.unwrap();
    assert!(w.api.get(SERVICES, "other-rs0").is_some());
    assert_eq!(status(&w)["migrationTarget"]["pool"], "other");
    until_led(&w, "other-rs0").await;
    w.reconcile("shop").await.unwrap();
    let second = w.migration.record_of("shop").unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!((second.from_replica_set.as_str(), second.to_replica_set.as_str()), ("big-rs0", "other-rs0"));
}

#[tokio::test]
async fn an_unknown_pool_is_refused_before_anything_starts() {
    let w = ready_with_pool().await;
    let services = w.api.list(SERVICES).len();
    change_pool(&w, "shop", "nope");
    w.reconcile("shop").await.unwrap();
    let c = condition(&w, "Migrating");
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("PoolNotFound")));
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("no ResourcePool \"nope\"") && message.contains("set spec.pool back to default"));
    assert!(w.migration.record_of("shop").is_none());
    assert_eq!(w.api.list(SERVICES).len(), services, "no replica set made");
    let s = status(&w);
    assert_eq!(s["phase"], "Ready", "the database is still served where it is");
    assert_eq!(s["placement"]["replicaSet"], "default-rs0");
    assert_eq!(reasons(&w).iter().filter(|r| *r == "PoolNotFound").count(), 1);
    // Told once, not at every pass.
    w.reconcile("shop").await.unwrap();
    assert_eq!(reasons(&w).iter().filter(|r| *r == "PoolNotFound").count(), 1);

    // The pool set back: nothing to do, and the condition says so.
    change_pool(&w, "shop", "default");
    w.reconcile("shop").await.unwrap();
    assert_eq!(condition(&w, "Migrating")["reason"], "PoolNotFound", "it was not True: left as the last word");
    assert!(w.migration.record_of("shop").is_none());
}

#[tokio::test]
async fn deleting_an_instance_mid_migration_cancels_it() {
    let w = started().await;
    let mut dbi = w.api.get(INSTANCES, "shop").unwrap();
    dbi["metadata"]["deletionTimestamp"] = json!(DELETION_TIME);
    w.api.put(INSTANCES, dbi);
    let _ = w.reconcile("shop").await;
    let r = w.migration.record_of("shop").unwrap();
    assert!(r.cancelled || r.step == Step::Aborted, "{r:?}");
    assert_eq!(drive(&w).await, Outcome::Aborted);
    assert!(w.migration.calls().contains(&"import big-rs0 abort".to_owned()), "{:?}", w.migration.calls());
}

/// The target's members at addresses of their own (the fake kubelet gives every replica
/// set's member `id` the same one), so a call to them is told from a call to the source's.
fn readdress_target(w: &World) {
    let target = w.api.list(PODS).into_iter().filter(|p| p["metadata"]["labels"]["nimbus.io/replica-set"] == "big-rs0");
    let mut readdressed = 0;
    for mut pod in target {
        let ip = pod["status"]["podIP"].as_str().unwrap().replace("10.1.", "10.2.");
        pod["status"]["podIP"] = json!(ip);
        w.api.put(PODS, pod);
        readdressed += 1;
    }
    assert!(readdressed > 0, "the target has members");
}

/// The replica sets the deletion dropped `shop` through (their leader's data address).
fn drops(w: &World) -> Vec<String> {
    w.raft_log().into_iter().filter_map(|l| l.strip_prefix("drop_database shop via ").map(str::to_owned)).collect()
}

#[tokio::test]
async fn an_instance_deleted_after_the_switch_before_its_placement_follows_is_dropped_on_the_target_and_the_source() {
    let w = started().await;
    // Switched, the source's clean-up waiting for its grace period; the instance not
    // reconciled since, so its placement still names the source.
    let tuning = Tuning { cleanup_grace: Duration::from_secs(3_600), ..migration_tuning() };
    assert!(matches!(migration::drive(&w.migration, &tuning, "shop").await.unwrap(), Outcome::WaitUntil(_)));
    assert_eq!(w.migration.record_of("shop").unwrap().step, Step::CleanUp);
    assert_eq!(route(&w)["replicaSet"], "big-rs0");
    assert_eq!(status(&w)["placement"]["replicaSet"], "default-rs0");
    readdress_target(&w);

    w.api.delete(INSTANCES, "shop");
    w.reconcile("shop").await.unwrap();
    let port = super::objects::ADMIN_PORT;
    let target = format!("http://10.2.0.1:{port}");
    let source = format!("http://10.1.0.1:{port}");
    assert_eq!(drops(&w), [target, source], "where it lives first, then the source's copy");
    assert!(w.api.get(INSTANCES, "shop").is_none(), "gone once its data is dropped");
    assert!(!w.store.0.lock().unwrap().contains_key("/nimbus/routes/shop"), "its route removed");
}

#[tokio::test]
async fn an_instance_deleted_after_a_completed_migration_before_its_placement_follows_is_dropped_on_the_target() {
    let w = started().await;
    assert_eq!(drive(&w).await, Outcome::Completed);
    assert!(
        w.migration.calls().contains(&"drop default-rs0 shop".to_owned()),
        "the clean-up dropped the source's copy"
    );
    assert_eq!(status(&w)["placement"]["replicaSet"], "default-rs0", "not reconciled since");
    readdress_target(&w);

    w.api.delete(INSTANCES, "shop");
    w.reconcile("shop").await.unwrap();
    assert_eq!(drops(&w), [format!("http://10.2.0.1:{}", super::objects::ADMIN_PORT)]);
    assert!(w.api.get(INSTANCES, "shop").is_none());
}

#[tokio::test]
async fn the_pod_directory_finds_a_replica_sets_member_admin_addresses() {
    use crate::controlplane::migration::ReplicaSetDirectory;
    let w = World::new();
    w.add_instance("shop", json!({}), true);
    w.reconcile_until_phase("shop", "Ready", 10).await;
    let dir = super::migration::PodDirectory { client: w.ctx.client.clone() };
    let mut addrs = dir.admin_addrs(NS, "default-rs0").await.unwrap();
    addrs.sort();
    let port = super::objects::ADMIN_PORT;
    assert_eq!(addrs, (1..=3).map(|i| format!("http://10.1.0.{i}:{port}")).collect::<Vec<_>>());
    assert_eq!(dir.admin_addrs(NS, "nope-rs0").await, None);
}
