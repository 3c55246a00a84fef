//! The coordinator's compare-and-swap writes against a real etcd (Debian's `etcd` from
//! PATH, on 127.0.0.1, stopped when the test ends).

use std::time::{Duration, Instant};

use nimbus_api::etcd::{self, Route, RouteMember, RouteState, TenantClaim};

use super::Coordinator;

/// One etcd server on free ports in a temporary directory, killed on drop.
pub(crate) struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    nimbus_net::ports::free_port().unwrap()
}

/// A real etcd for a test (the backup agent's records use it too), and a coordinator on it.
pub(crate) async fn etcd() -> (Etcd, Coordinator) {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (format!("http://127.0.0.1:{}", free_port()), format!("http://127.0.0.1:{}", free_port()));
    let child = std::process::Command::new("etcd")
        .args(["--data-dir", &dir.path().join("etcd").display().to_string()])
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("default={peer}"), "--log-level", "error"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("failed to start etcd (Debian's etcd package puts it on PATH)");
    let server = Etcd { child, url: client.clone(), _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let args = nimbus_net::EtcdArgs::plain(std::slice::from_ref(&server.url));
        if let Ok(coord) = Coordinator::connect(&args).await
            && coord.route("probe").await.is_ok()
        {
            return (server, coord);
        }
        assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn members(rs: &str, n: u64) -> Vec<RouteMember> {
    (1..=n).map(|id| RouteMember { id, data_addr: format!("http://{rs}-{id}"), zone: format!("z{id}") }).collect()
}

fn claim() -> TenantClaim {
    TenantClaim { namespace: "ns".into(), instance: "shop".into(), uid: "u1".into() }
}

/// A route for `db` on replica set `a` with its claim, as placement leaves it.
async fn placed(coord: &Coordinator, db: &str) -> (Route, u64) {
    assert_eq!(coord.claim_database(db, &claim(), false).await.unwrap(), Ok(()));
    assert!(coord.create_route(db, &claim(), "a", members("a", 3)).await.unwrap());
    coord.route_revision(db).await.unwrap().unwrap()
}

#[tokio::test]
async fn the_replica_set_reconciler_never_writes_its_members_into_a_route_a_migration_moved() {
    let (_etcd, coord) = etcd().await;
    let (route, rev) = placed(&coord, "shop").await;
    // The migration's switch.
    let switched = Route { replica_set: "b".into(), members: members("b", 3), epoch: route.epoch + 1, ..route };
    assert!(coord.swap_route("shop", rev, &switched, true).await.unwrap());
    // Replica set a's reconciler, with a view from before the switch.
    assert!(!coord.update_route_members("shop", &claim(), "a", members("a", 2)).await.unwrap());
    assert_eq!(coord.route("shop").await.unwrap().unwrap(), switched);
    // Replica set b's own reconciler may, keeping the epoch.
    assert!(coord.update_route_members("shop", &claim(), "b", members("b", 2)).await.unwrap());
    let now = coord.route("shop").await.unwrap().unwrap();
    assert_eq!((now.replica_set.as_str(), now.epoch, now.members.len()), ("b", switched.epoch, 2));
}

#[tokio::test]
async fn a_member_update_keeps_a_hold_and_makes_the_migrations_next_swap_read_again() {
    let (_etcd, coord) = etcd().await;
    let (route, rev) = placed(&coord, "shop").await;
    let held = Route { state: RouteState::Holding, hold_deadline_ms: Some(123), ..route };
    assert!(coord.swap_route("shop", rev, &held, true).await.unwrap());
    let (_, held_rev) = coord.route_revision("shop").await.unwrap().unwrap();
    assert!(coord.update_route_members("shop", &claim(), "a", members("a", 2)).await.unwrap());
    let now = coord.route("shop").await.unwrap().unwrap();
    assert_eq!((now.state, now.hold_deadline_ms, now.epoch), (RouteState::Holding, Some(123), held.epoch));
    assert_eq!(now.members, members("a", 2));
    // The migration's switch guarded by what it read before the member update: refused.
    let switched = Route { replica_set: "b".into(), state: RouteState::Serving, hold_deadline_ms: None, ..now.clone() };
    assert!(!coord.swap_route("shop", held_rev, &switched, true).await.unwrap());
    assert_eq!(coord.route("shop").await.unwrap().unwrap(), now);
}

#[tokio::test]
async fn a_route_swap_clears_the_hold_acknowledgements_in_the_same_transaction() {
    let (_etcd, coord) = etcd().await;
    let (route, rev) = placed(&coord, "shop").await;
    let mut kv = coord.client.kv_client();
    kv.put(etcd::gateway_key("g1"), r#"{"id":"g1","addr":"x","startedMs":1}"#, None).await.unwrap();
    kv.put(etcd::gateway_key("g2"), r#"{"id":"g2","addr":"y","startedMs":1}"#, None).await.unwrap();
    kv.put(etcd::hold_key("shop", "g1"), r#"{"epoch":4}"#, None).await.unwrap();
    kv.put(etcd::hold_key("other", "g1"), "1", None).await.unwrap();
    let (gateways, acks) = coord.hold_view("shop").await.unwrap();
    assert_eq!(gateways, ["g1", "g2"]);
    assert_eq!(acks, [("g1".to_string(), br#"{"epoch":4}"#.to_vec())]);

    let held = Route { state: RouteState::Holding, hold_deadline_ms: Some(9), ..route };
    assert!(coord.swap_route("shop", rev, &held, true).await.unwrap());
    let (_, acks) = coord.hold_view("shop").await.unwrap();
    assert!(acks.is_empty(), "an acknowledgement of an earlier hold survived");
    assert_eq!(kv.get(etcd::hold_key("other", "g1"), None).await.unwrap().kvs().len(), 1, "another database's");
    // A stale revision writes nothing.
    assert!(!coord.swap_route("shop", rev, &Route { epoch: 99, ..held.clone() }, false).await.unwrap());
    assert_eq!(coord.route("shop").await.unwrap().unwrap(), held);
}

#[tokio::test]
async fn a_record_is_written_only_at_the_revision_its_writer_read() {
    let (_etcd, coord) = etcd().await;
    let key = etcd::migration_key("shop");
    let first = coord.put_json_if(&key, &serde_json::json!({"step": "Copy"}), None).await.unwrap().unwrap();
    assert_eq!(coord.put_json_if(&key, &serde_json::json!({"step": "Other"}), None).await.unwrap(), None);
    let second = coord.put_json_if(&key, &serde_json::json!({"step": "CatchUp"}), Some(first)).await.unwrap();
    let second = second.unwrap();
    assert!(second > first);
    assert_eq!(coord.put_json_if(&key, &serde_json::json!({"step": "Late"}), Some(first)).await.unwrap(), None);
    let (value, rev) = coord.get_json_revision::<serde_json::Value>(&key).await.unwrap().unwrap();
    assert_eq!((value["step"].as_str(), rev), (Some("CatchUp"), second));
    let all = coord.list_json_revision::<serde_json::Value>(etcd::MIGRATIONS).await.unwrap();
    assert_eq!(all, [(value, second)]);
}

/// Who is on a replica set, as the removal of a dedicated one asks etcd: the databases
/// whose routes name it, of this namespace (by their claims), whatever other namespaces
/// route to a replica set of the same name.
#[tokio::test]
async fn the_databases_on_a_replica_set_are_those_its_namespaces_routes_name() {
    let (_etcd, coord) = etcd().await;
    assert_eq!(coord.databases_on("ns", "a").await.unwrap(), Vec::<String>::new());
    placed(&coord, "shop").await;
    let other = TenantClaim { namespace: "elsewhere".into(), instance: "blog".into(), uid: "u2".into() };
    assert_eq!(coord.claim_database("blog", &other, false).await.unwrap(), Ok(()));
    assert!(coord.create_route("blog", &other, "a", members("a", 3)).await.unwrap());
    let third = TenantClaim { namespace: "ns".into(), instance: "wiki".into(), uid: "u3".into() };
    assert_eq!(coord.claim_database("wiki", &third, false).await.unwrap(), Ok(()));
    assert!(coord.create_route("wiki", &third, "b", members("b", 3)).await.unwrap());

    assert_eq!(coord.databases_on("ns", "a").await.unwrap(), vec!["shop".to_owned()]);
    assert_eq!(coord.databases_on("elsewhere", "a").await.unwrap(), vec!["blog".to_owned()]);
    assert_eq!(coord.databases_on("ns", "b").await.unwrap(), vec!["wiki".to_owned()]);
    assert_eq!(coord.databases_on("ns", "c").await.unwrap(), Vec::<String>::new());
}
