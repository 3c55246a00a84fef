//! The control plane's tenant records against a real etcd: a database name claimed by one
//! instance is refused to any other, deleting a refused instance's records deletes nothing
//! of the owner's, a record written again unchanged costs no etcd write, and a replica
//! set's bootstrap record is written once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use nimbus_api::etcd::{Limits, ReplicaSetRecord, RouteMember, TenantClaim, Tier, UserRecord, UserRole};
use nimbus_e2e::etcd::EtcdCluster;
use nimbus_net::EtcdArgs;
use nimbus_operator::controlplane::coord::Coordinator;

fn claim(ns: &str, instance: &str) -> TenantClaim {
    TenantClaim { namespace: ns.into(), instance: instance.into(), uid: format!("uid-{ns}-{instance}") }
}

#[tokio::test]
async fn a_database_name_belongs_to_one_instance_and_only_its_owner_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(1, dir.path()).await.unwrap();
    let store = Coordinator::connect(&EtcdArgs::plain(&etcd.client_urls)).await.unwrap();

    let (owner, other) = (claim("team-a", "shop"), claim("team-b", "shop"));
    assert!(store.claim_database("shop", &owner, false).await.unwrap().is_ok());
    assert!(store.claim_database("shop", &owner, true).await.unwrap().is_ok(), "claiming again is idempotent");
    assert_eq!(store.claim_database("shop", &other, false).await.unwrap(), Err(owner.clone()));

    let member = RouteMember { id: 1, data_addr: "http://m1:7000".into(), zone: "a".into() };
    store.put_route("shop", "default-rs0", vec![member]).await.unwrap();
    let user = UserRecord { role: UserRole::ReadWrite, secret_sha256: "00".repeat(32) };
    store.put_user("shop", "app", &user).await.unwrap();
    store.put_limits("shop", &Limits::for_tier(Tier::Standard)).await.unwrap();
    // Publishing the same records again writes nothing (each write is a revision etcd keeps).
    let mut raw = etcd_client::Client::connect(&etcd.client_urls, None).await.unwrap();
    let revision = |r: etcd_client::GetResponse| r.kvs()[0].mod_revision();
    let before = revision(raw.get("/nimbus/limits/shop", None).await.unwrap());
    store.put_limits("shop", &Limits::for_tier(Tier::Standard)).await.unwrap();
    store.put_user("shop", "app", &user).await.unwrap();
    assert_eq!(revision(raw.get("/nimbus/limits/shop", None).await.unwrap()), before);
    store.put_limits("shop", &Limits::for_tier(Tier::Free)).await.unwrap();
    assert!(revision(raw.get("/nimbus/limits/shop", None).await.unwrap()) > before, "a change is written");

    // Route writes on behalf of an instance that does not hold the claim (a same-named
    // replica set in another namespace, say) are refused; the holder's go through.
    let moved = vec![RouteMember { id: 9, data_addr: "http://evil:7000".into(), zone: "a".into() }];
    assert!(!store.update_route_members("shop", &other, "default-rs0", moved.clone()).await.unwrap());
    assert_eq!(store.route("shop").await.unwrap().unwrap().members[0].id, 1);
    assert!(store.update_route_members("shop", &owner, "default-rs0", moved).await.unwrap());
    assert!(!store.create_route("cart", &other, "default-rs0", vec![]).await.unwrap(), "no claim on cart");

    // The refused instance's deletion: nothing of the owner's goes.
    assert!(!store.delete_database("shop", &other, false).await.unwrap());
    assert!(store.route("shop").await.unwrap().is_some());
    // The owner's: everything, the claim included, so the name is free again.
    assert!(store.delete_database("shop", &owner, true).await.unwrap());
    assert!(store.route("shop").await.unwrap().is_none());
    assert!(store.claim_database("shop", &other, false).await.unwrap().is_ok());

    // A name in use by an instance from before claims (a route, no claim): an instance not
    // yet placed can neither claim it nor, deleted, delete its records; the placed owner can.
    let legacy = claim("team-c", "orders");
    let newcomer = claim("team-d", "orders");
    store.put_route("orders", "default-rs1", vec![]).await.unwrap();
    let refused = store.claim_database("orders", &newcomer, false).await.unwrap().unwrap_err();
    assert!(refused.uid.is_empty(), "{refused:?}");
    assert!(!store.delete_database("orders", &newcomer, false).await.unwrap());
    assert!(store.route("orders").await.unwrap().is_some());
    assert!(store.claim_database("orders", &legacy, true).await.unwrap().is_ok());
    assert_eq!(store.claim_database("orders", &newcomer, false).await.unwrap(), Err(legacy.clone()));

    // A bootstrap record is written once: the first stays.
    let first = ReplicaSetRecord { pool: "default".into(), zones: vec!["a".into()], bootstrapped_ms: 1 };
    let second = ReplicaSetRecord { bootstrapped_ms: 2, ..first.clone() };
    store.record_replica_set("apps", "default-rs0", &first).await.unwrap();
    store.record_replica_set("apps", "default-rs0", &second).await.unwrap();
    assert_eq!(store.replica_set("apps", "default-rs0").await.unwrap(), Some(first));
    assert_eq!(store.replica_set("other", "default-rs0").await.unwrap(), None, "records are per namespace");
    store.forget_replica_set("apps", "default-rs0").await.unwrap();
    assert_eq!(store.replica_set("apps", "default-rs0").await.unwrap(), None);
    etcd.stop().await;
}
