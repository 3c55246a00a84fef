//! Hot migration through the playground, as a user drives it (`API.md` section 3): an
//! instance's `spec.pool` changed with `nimbus playground apply`, its database moved to a
//! replica set of the other pool while clients use it, the migration watched in
//! `playground.json`. Checked: no client-visible error, every acknowledged write present
//! once, reads that find what was acknowledged, the same data and indexes before and
//! after, a neighbour on the source replica set undisturbed; the same with faults at each
//! step (then a retry or completion with nothing lost); a register that stays
//! linearizable across the cutover.
//!
//! The hold is short (well under a second): the tests that act during it make it last with
//! a failpoint of the control plane (`FAILPOINTS`, the `fail` crate; the playground is
//! always built with the migration driver's failpoints).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_e2e::DataClient;
use nimbus_e2e::linearizability;
use nimbus_e2e::migration::{
    ANCHOR, Contents, PRELOAD, RETRY_FOR, Reader, Registers, SOURCE_POOL, SWITCHED, Stopped, TARGET_POOL, Tenant,
    TwoPools, in_phase, kill_gateway, leader_of, migration_of, preload, settled_in, wait_instance,
};
use nimbus_e2e::playground::kill9;
use nimbus_e2e::workload::{self, Delivery, Writers};
use serde_json::Value;

const TENANT: &str = "shop";
const NEIGHBOUR: &str = "neighbour";
/// A whole migration of the tests' few MiB, debug build, two cores shared.
const MIGRATION: Duration = Duration::from_secs(120);
const WRITES: Duration = Duration::from_secs(30);
/// Documents of 1 KiB: the copy moves many of them.
const DOC_BYTES: usize = 1024;
/// Enough that the copy takes seconds (killing the source leader "during the copy"
/// needs the copy to be seen running).
const COPY_BYTES: u64 = 24 * 1024 * 1024;
/// The other tests: enough to have a copy at all, little enough to be quick.
const SMALL_BYTES: u64 = 2 * 1024 * 1024;

/// The first ten catch-up pages each 400 ms late.
const SLOW_CATCH_UP: &str = "migration-catchup-page=10*sleep(400)";
/// A failpoint that makes every hold last 2.5 s (under its 5 s deadline), so a test can act
/// while it lasts.
const LONG_HOLD: &str = "migration-hold-after=sleep(2500)";
/// A failpoint that makes the first hold outlast its 5 s deadline, and no other.
const HOLD_PAST_DEADLINE: &str = "migration-hold-after=1*sleep(6000)";

/// `f` off the async workers (the `nimbus` command and `playground.json` are blocking).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn two_pools(others: &'static [&'static str], env: &'static [(&'static str, &'static str)]) -> Arc<TwoPools> {
    Arc::new(blocking(move || TwoPools::up(TENANT, others, env)).await.unwrap())
}

/// `nimbus playground apply` of the manifest moving the tenant to the target pool (or back).
async fn apply(two: &Arc<TwoPools>, to_target: bool, wait: bool) {
    let two = two.clone();
    blocking(move || {
        let file = if to_target { &two.to_target } else { &two.to_source };
        two.pg.apply(&[file], wait)
    })
    .await
    .unwrap();
}

/// Waits until the tenant's route in etcd is `Holding`: the hold itself, seen at once (what
/// `playground.json` shows follows it by a control-loop tick, which a busy machine can
/// stretch past a short hold).
async fn route_holding(pg: &nimbus_e2e::playground::Playground) {
    let deadline = Instant::now() + MIGRATION;
    loop {
        if let Ok(Some(route)) = pg.etcd_get(&nimbus_api::etcd::route_key(TENANT)).await
            && route["state"] == "Holding"
        {
            return;
        }
        assert!(Instant::now() < deadline, "the tenant's route was never Holding within {MIGRATION:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The replica set instance `name` is on now.
fn replica_set(v: &Value, name: &str) -> String {
    v["instances"][name]["replicaSet"].as_str().unwrap().to_owned()
}

/// Asserts the migration shown for the tenant completed from `from` to `to`.
fn assert_completed(v: &Value, pool: &str, from: &str, to: &str) -> Value {
    assert_completed_within(v, pool, from, to, 5_000)
}

/// [`assert_completed`], the hold shorter than `max_hold_ms`: the 5 s deadline, plus the
/// length of a fault that stopped the control plane's etcd in the middle of the switch
/// (the switch, once begun, only goes forward and needs etcd for its last write).
fn assert_completed_within(v: &Value, pool: &str, from: &str, to: &str, max_hold_ms: u64) -> Value {
    let i = &v["instances"][TENANT];
    assert!(settled_in(i, pool), "the tenant is not settled in pool {pool}: {i}");
    assert_eq!(i["replicaSet"], to, "the route did not move: {i}");
    let m = migration_of(v, TENANT);
    assert!(in_phase(i, SWITCHED), "migration not completed: {m}");
    assert_eq!((m["fromReplicaSet"].as_str(), m["toReplicaSet"].as_str()), (Some(from), Some(to)), "{m}");
    assert!(m["error"].is_null(), "a completed migration with an error: {m}");
    assert!(m["startedAt"].is_string(), "{m}");
    let hold = m["holdMs"].as_u64().unwrap_or_else(|| panic!("no holdMs after the switch: {m}"));
    assert!(hold < max_hold_ms, "a hold of {hold} ms, longer than {max_hold_ms} ms: {m}");
    m
}

/// What a fault test starts from: a playground with both pools, started with the
/// failpoints `failpoints`; the tenant preloaded with `bytes` of documents (its contents
/// read as they are before any move) and written to by writers that retry what a fault
/// makes fail, with their idempotency key, as a client does.
struct UnderFaults {
    two: Arc<TwoPools>,
    client: DataClient,
    shop: Tenant,
    source: String,
    target: String,
    /// Documents preloaded.
    docs: u64,
    before: Contents,
    writers: Writers,
}

async fn under_faults(failpoints: &'static str, bytes: u64) -> UnderFaults {
    let env = [("FAILPOINTS", failpoints)];
    let two = Arc::new(blocking(move || TwoPools::up(TENANT, &[], &env)).await.unwrap());
    let client = DataClient::new();
    let shop = Tenant::of(&two.pg, &client, TENANT).unwrap();
    let v = two.pg.json().unwrap();
    let (source, target) = (replica_set(&v, TENANT), replica_set(&v, ANCHOR));
    let docs = preload(&shop, bytes, DOC_BYTES, 8).await.unwrap();
    let before = Contents::read(&shop, &[PRELOAD]).await.unwrap();
    workload::prepare(&client, &shop.gateway, &shop.db, &shop.token).await.unwrap();
    let writers = Writers::start_with(&client, &shop.gateway, &shop.db, &shop.token, 8, Delivery::Retried(RETRY_FOR));
    writers.wait_for(100, WRITES).await.unwrap();
    UnderFaults { two, client, shop, source, target, docs, before, writers }
}

impl UnderFaults {
    /// The writes go on (100 more), then stop: none failed for good (a retry through the
    /// fault got its answer), every acknowledged one is there once, and the preloaded
    /// data and indexes are as they were.
    async fn verify(self) {
        let UnderFaults { client, shop, before, writers, .. } = self;
        writers.wait_for(100, WRITES).await.unwrap();
        let retries = writers.retries();
        let report = writers.stop().await.unwrap();
        eprintln!("{} inserts, {} increments, {retries} requests retried", report.inserted.len(), report.increments);
        assert!(
            report.errors.is_empty(),
            "writes failed for good: {:?}",
            &report.errors[..report.errors.len().min(10)]
        );
        workload::verify(&client, &shop.gateway, &shop.db, &shop.token, &report).await.unwrap();
        assert_eq!(Contents::read(&shop, &[PRELOAD]).await.unwrap(), before, "the data or indexes changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_moved_under_writers_and_a_reader_loses_nothing_and_its_neighbour_sees_no_error() {
    let two = two_pools(&[NEIGHBOUR], &[]).await;
    let pg = &two.pg;
    let client = DataClient::new();
    let (shop, neighbour) = (Tenant::of(pg, &client, TENANT).unwrap(), Tenant::of(pg, &client, NEIGHBOUR).unwrap());
    let v = pg.json().unwrap();
    let (source, target) = (replica_set(&v, TENANT), replica_set(&v, ANCHOR));
    assert_eq!(v["instances"][TENANT]["pool"], SOURCE_POOL, "{}", v["instances"][TENANT]);
    assert_eq!(replica_set(&v, NEIGHBOUR), source, "the neighbour shares the tenant's replica set");
    assert_ne!(source, target, "each pool has its own replica sets");
    assert!(migration_of(&v, TENANT).is_null(), "a migration before any was asked for");

    let docs = preload(&shop, SMALL_BYTES, DOC_BYTES, 4).await.unwrap();
    let before = Contents::read(&shop, &[PRELOAD]).await.unwrap();
    workload::prepare(&client, &shop.gateway, &shop.db, &shop.token).await.unwrap();
    workload::prepare(&client, &neighbour.gateway, &neighbour.db, &neighbour.token).await.unwrap();
    let writers = Writers::start(&client, &shop.gateway, &shop.db, &shop.token, 8);
    let reader = Reader::start(&shop);
    let neighbours = Writers::start(&client, &neighbour.gateway, &neighbour.db, &neighbour.token, 2);
    writers.wait_for(200, WRITES).await.unwrap();

    let started = Instant::now();
    apply(&two, true, true).await;
    eprintln!("migrated in {:?}", started.elapsed());
    let v = pg.json().unwrap();
    let m = assert_completed(&v, TARGET_POOL, &source, &target);
    assert_eq!(m["attempt"], 1, "no fault, yet a retry: {m}");
    assert!(m["documentsCopied"].as_u64().unwrap() >= docs, "fewer documents copied than preloaded: {m}");
    assert!(m["bytesCopied"].as_u64().unwrap() > 0, "{m}");
    eprintln!("migration: {m}");

    // The writes and reads go on, now served by the target.
    writers.wait_for(200, WRITES).await.unwrap();
    let reads = reader.reads();
    nimbus_e2e::poll("the reader to go on", WRITES, || async { (reader.reads() >= reads + 20).then_some(()) })
        .await
        .unwrap();
    let report = writers.stop().await.unwrap();
    let read_report = reader.stop().await.unwrap();
    let neighbour_report = neighbours.stop().await.unwrap();
    let first = |e: &[String]| e.iter().take(10).cloned().collect::<Vec<_>>();
    assert!(report.errors.is_empty(), "client-visible write errors: {:?}", first(&report.errors));
    assert!(read_report.errors.is_empty(), "reader errors: {:?}", first(&read_report.errors));
    assert!(neighbour_report.errors.is_empty(), "the neighbour saw errors: {:?}", first(&neighbour_report.errors));
    eprintln!(
        "{} inserts, {} increments, {} reads; longest write {} ms",
        report.inserted.len(),
        report.increments,
        read_report.reads,
        workload::quantile(&report.latencies_us, 1.0) / 1000
    );
    workload::verify(&client, &shop.gateway, &shop.db, &shop.token, &report).await.unwrap();
    workload::verify(&client, &neighbour.gateway, &neighbour.db, &neighbour.token, &neighbour_report).await.unwrap();
    assert_eq!(Contents::read(&shop, &[PRELOAD]).await.unwrap(), before, "the data or indexes changed in the move");
    let v = pg.json().unwrap();
    assert_eq!(replica_set(&v, NEIGHBOUR), source, "the neighbour moved too");
    assert!(migration_of(&v, NEIGHBOUR).is_null(), "{}", v["instances"][NEIGHBOUR]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_leader_killed_during_the_copy_and_the_target_leader_during_catch_up_lose_nothing() {
    // The catch-up made to last a few seconds (its first pages slowed), so that it is seen
    // and its target leader killed in it.
    let f = under_faults(SLOW_CATCH_UP, COPY_BYTES).await;
    let (two, pg, client) = (&f.two, &f.two.pg, &f.client);
    let (source, target, docs) = (&f.source, &f.target, f.docs);

    apply(two, true, false).await;
    let v = wait_instance(pg, TENANT, "copying", MIGRATION, |i| {
        in_phase(i, &["Copying"]) && i["migration"]["documentsCopied"].as_u64().is_some_and(|n| n > 0)
    })
    .await
    .unwrap();
    let copied = migration_of(&v, TENANT)["documentsCopied"].as_u64().unwrap();
    assert!(copied < docs, "the copy was over before it was seen running: make COPY_BYTES larger");
    let (leader, _) = leader_of(pg, &client.http, source).await.expect("a source leader");
    eprintln!("killing the source leader {} after {copied} of {docs} documents copied", leader["id"]);
    kill9(leader["pid"].as_u64().unwrap() as u32).unwrap();

    let v = wait_instance(pg, TENANT, "catching up", MIGRATION, |i| !in_phase(i, &["Copying"])).await.unwrap();
    let i = &v["instances"][TENANT];
    assert!(
        in_phase(i, &["CatchingUp"]),
        "the migration left Copying for {}, not CatchingUp (or went through CatchingUp between two polls)",
        i["migration"]
    );
    let (leader, _) = leader_of(pg, &client.http, target).await.expect("a target leader");
    eprintln!("killing the target leader {} during catch-up: {}", leader["id"], i["migration"]);
    kill9(leader["pid"].as_u64().unwrap() as u32).unwrap();

    let v =
        wait_instance(pg, TENANT, "the migration completed", MIGRATION, |i| settled_in(i, TARGET_POOL)).await.unwrap();
    let m = assert_completed(&v, TARGET_POOL, source, target);
    eprintln!("migration: {m}");
    f.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_killed_and_etcd_stopped_during_the_hold_lose_nothing() {
    let f = under_faults(LONG_HOLD, SMALL_BYTES).await;
    let (two, pg, source, target) = (&f.two, &f.two.pg, &f.source, &f.target);

    // The gateway killed while it holds the database's requests: clients retry, the
    // gateway comes back (the playground's, or started again here as a supervisor would).
    apply(two, true, false).await;
    route_holding(pg).await;
    let _restarted = kill_gateway(pg).await.unwrap();
    let v = wait_instance(pg, TENANT, "moved to the target", MIGRATION, |i| settled_in(i, TARGET_POOL)).await.unwrap();
    eprintln!("after the gateway was killed: {}", migration_of(&v, TENANT));
    assert_completed(&v, TARGET_POOL, source, target);
    f.writers.wait_for(100, WRITES).await.unwrap();

    // etcd stopped while the way back holds, for longer than a gateway's lease (3 s).
    apply(two, false, false).await;
    route_holding(pg).await;
    let etcd = Stopped::stop(pg.etcd_pid().unwrap()).unwrap();
    // The fault's length, not a decision: etcd unreachable for 4 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.resume().unwrap();
    let v = wait_instance(pg, TENANT, "moved back", MIGRATION, |i| settled_in(i, SOURCE_POOL)).await.unwrap();
    eprintln!("after etcd was stopped: {}", migration_of(&v, TENANT));
    assert_completed_within(&v, SOURCE_POOL, target, source, 5_000 + 4_000 + 2_000);
    f.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_past_its_deadline_aborts_with_nothing_lost_and_the_retry_completes() {
    // Requests held past their own deadline get 503, which a client retries.
    let f = under_faults(HOLD_PAST_DEADLINE, SMALL_BYTES).await;
    let (two, pg, source, target) = (&f.two, &f.two.pg, &f.source, &f.target);

    apply(two, true, false).await;
    let v = wait_instance(pg, TENANT, "aborted", MIGRATION, |i| {
        in_phase(i, &["Aborted"]) || i["migration"]["attempt"].as_u64().is_some_and(|a| a >= 2)
    })
    .await
    .unwrap();
    let i = &v["instances"][TENANT];
    assert!(in_phase(i, &["Aborted"]), "the abort of attempt 1 was never shown: {}", i["migration"]);
    assert_eq!(i["migration"]["attempt"], 1, "{}", i["migration"]);
    assert!(i["migration"]["error"].is_string(), "an abort that does not say why: {}", i["migration"]);
    assert_eq!(i["replicaSet"], source.as_str(), "an aborted migration left the route on the target: {i}");
    eprintln!("aborted: {}", i["migration"]);
    // Writes go on, served by the source.
    f.writers.wait_for(100, WRITES).await.unwrap();

    let v = wait_instance(pg, TENANT, "the retry completed", MIGRATION, |i| settled_in(i, TARGET_POOL)).await.unwrap();
    let m = assert_completed(&v, TARGET_POOL, source, target);
    assert_eq!(m["attempt"], 2, "{m}");
    f.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_read_and_written_across_two_cutovers_stay_linearizable() {
    let two = two_pools(&[], &[]).await;
    let pg = &two.pg;
    let client = DataClient::new();
    let shop = Tenant::of(pg, &client, TENANT).unwrap();
    let v = pg.json().unwrap();
    let (source, target) = (replica_set(&v, TENANT), replica_set(&v, ANCHOR));
    let keys: Vec<String> = (0..3).map(|k| format!("r{k}")).collect();
    let registers = Registers::start(&shop, &keys, 3).await.unwrap();
    registers.wait_for(200, WRITES).await.unwrap();
    apply(&two, true, true).await;
    assert_completed(&pg.json().unwrap(), TARGET_POOL, &source, &target);
    registers.wait_for(200, WRITES).await.unwrap();
    apply(&two, false, true).await;
    assert_completed(&pg.json().unwrap(), SOURCE_POOL, &target, &source);
    registers.wait_for(200, WRITES).await.unwrap();

    let h = registers.stop().await.unwrap();
    assert!(h.errors.is_empty(), "unexpected answers: {:?}", &h.errors[..h.errors.len().min(10)]);
    for (key, events) in &h.history {
        let verdict = linearizability::check(Some(0), events);
        eprintln!("{key}: {} operations", events.len());
        assert!(verdict.is_ok(), "register {key}: {}", verdict.unwrap_err());
    }
    eprintln!("writes of unknown outcome: {}", h.unknown);
}
