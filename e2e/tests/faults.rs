//! Real failures through the playground, driven as a user would: `nimbus playground` for
//! the system and its zones, the gateway for the data, `kill -9` for crashes, network
//! namespaces and iptables for partitions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nimbus_e2e::linearizability::{self, Event, Op};
use nimbus_e2e::playground::{Playground, alive, all_running, kill9, ready};
use nimbus_e2e::workload::{self, Writers};
use nimbus_e2e::{DataClient, poll};
use reqwest::Method;
use serde_json::{Value, json};

const FAILOVER: Duration = Duration::from_secs(30);

/// `nimbus playground ...` off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn up(args: &'static [&'static str]) -> Arc<Playground> {
    Arc::new(blocking(move || Playground::up(args)).await.unwrap())
}

/// The leader with the highest term, once one other than `not` (a datanode id) leads.
async fn new_leader(pg: &Playground, http: &reqwest::Client, not: &Value) -> (Value, Value) {
    poll("a new leader", FAILOVER, || async {
        pg.leader(http).await.filter(|(d, s)| d["id"] != *not && s["role"] == "leader")
    })
    .await
    .unwrap()
}

/// The example playground with 8 writers going (100 writes answered).
async fn writing() -> (Arc<Playground>, DataClient, String, String, Writers) {
    let pg = up(&[]).await;
    let client = pg.internal_client().unwrap();
    let (gw, tok) = (pg.gateway().unwrap(), pg.token("shop").unwrap());
    workload::prepare(&client, &gw, "shop", &tok).await.unwrap();
    let writers = Writers::start(&client, &gw, "shop", &tok, 8);
    writers.wait_for(100, FAILOVER).await.unwrap();
    (pg, client, gw, tok, writers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_under_idempotent_writes_shows_no_error_and_applies_each_write_once() {
    let (pg, client, gw, tok, writers) = writing().await;
    for _ in 0..2 {
        let (leader, _) = pg.leader(&client.http).await.expect("a leader");
        let pid = leader["pid"].as_u64().unwrap() as u32;
        kill9(pid).unwrap();
        // A leader again: another member, or the killed one restarted in time to take its
        // (persisted, still current) leadership back.
        poll("a leader after the kill", FAILOVER, || async {
            pg.leader(&client.http).await.filter(|(d, _)| d["pid"].as_u64().is_some_and(|p| p as u32 != pid))
        })
        .await
        .unwrap();
        // The control plane restarts the killed member; the writes go on meanwhile.
        writers.wait_for(100, FAILOVER).await.unwrap();
        let pg2 = pg.clone();
        blocking(move || pg2.wait("every member running and Ready", FAILOVER, |v| ready(v) && all_running(v)))
            .await
            .unwrap();
    }
    let report = writers.stop().await.unwrap();
    assert!(report.errors.is_empty(), "client-visible errors: {:?}", &report.errors[..report.errors.len().min(10)]);
    assert!(report.inserted.len() > 100, "too few writes to mean anything: {}", report.inserted.len());
    workload::verify(&client, &gw, "shop", &tok, &report).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_a_zone_keeps_writes_going_and_its_members_catch_up_when_it_returns() {
    let (pg, client, gw, tok, writers) = writing().await;

    // The leader's zone goes down: every process in it killed and kept down.
    let (leader, _) = pg.leader(&client.http).await.expect("a leader");
    let zone = leader["zone"].as_str().unwrap().to_owned();
    let in_zone: Vec<u32> = pg
        .datanodes()
        .unwrap()
        .iter()
        .filter(|d| d["zone"] == zone.as_str())
        .filter_map(|d| d["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    let (pg2, z) = (pg.clone(), zone.clone());
    blocking(move || pg2.zone(&z, "down")).await.unwrap();
    for pid in &in_zone {
        assert!(!alive(*pid), "datanode {pid} in zone {zone} still runs");
    }
    // Writes continue on the other two zones, led from one of them.
    let (l2, _) = new_leader(&pg, &client.http, &leader["id"]).await;
    assert_ne!(l2["zone"], zone.as_str());
    writers.wait_for(300, FAILOVER).await.unwrap();
    assert!(pg.datanodes().unwrap().iter().filter(|d| d["zone"] == zone.as_str()).all(|d| d["pid"].is_null()));

    // The zone comes back: its member restarts and catches up with everything written.
    let (pg2, z) = (pg.clone(), zone.clone());
    blocking(move || pg2.zone(&z, "up")).await.unwrap();
    writers.wait_for(100, FAILOVER).await.unwrap();
    let report = writers.stop().await.unwrap();
    assert!(report.errors.is_empty(), "client-visible errors: {:?}", &report.errors[..report.errors.len().min(10)]);
    workload::verify(&client, &gw, "shop", &tok, &report).await.unwrap();
    let returned = pg.datanodes().unwrap().into_iter().find(|d| d["zone"] == zone.as_str()).unwrap();
    let (_, leader_status) = pg.leader(&client.http).await.unwrap();
    let commit = leader_status["commitIndex"].as_u64().unwrap();
    let count_url =
        format!("{}/v1/databases/shop/collections/{}/count", returned["data"].as_str().unwrap(), workload::COLLECTION);
    poll("the returned member to catch up", FAILOVER, || async {
        let (_, s) = client.get(&format!("{}/v1/status", returned["admin"].as_str().unwrap())).await;
        if s["appliedIndex"].as_u64().is_none_or(|a| a < commit) {
            return None;
        }
        // Its own copy, read locally: every acknowledged insert and the counter.
        let (st, c) = client
            .call(
                Method::POST,
                &count_url,
                Some(&json!({"filter": {}})),
                &[(nimbus_api::data::READ_PREFERENCE_HEADER, "any")],
            )
            .await;
        (st == 200 && c["count"] == json!(report.inserted.len() + 1)).then_some(())
    })
    .await
    .unwrap();
}

/// One register's recorded operations.
type History = Arc<std::sync::Mutex<BTreeMap<String, Vec<Event>>>>;

struct Clients {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    unknown: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    history: History,
}

/// `per_key` clients on each register, reading and writing (`$set` of a value no one else
/// writes, with an idempotency key) through the gateway, recording every operation.
fn start_clients(client: &DataClient, gw: &str, tok: &str, keys: &[String], per_key: usize) -> Clients {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let history: History = Arc::new(std::sync::Mutex::new(keys.iter().map(|k| (k.clone(), Vec::new())).collect()));
    let epoch = Instant::now();
    let base = format!("{gw}/v1/databases/shop/collections/registers");
    let mut tasks = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        for c in 0..per_key {
            let (client, base, key, stop, ok, unknown, history) =
                (client.clone(), base.clone(), key.clone(), stop.clone(), ok.clone(), unknown.clone(), history.clone());
            let auth = format!("Bearer {tok}");
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let write = (n + c as u64).is_multiple_of(2);
                    let value = ((k * per_key + c) as u64) * 1_000_000 + n;
                    let call = epoch.elapsed().as_nanos() as u64;
                    let event = if write {
                        let idem = format!("{key}-{c}-{n}");
                        let (st, body) = client
                            .call(
                                Method::POST,
                                &format!("{base}/update"),
                                Some(&json!({"filter": {"_id": key}, "update": {"$set": {"v": value}}})),
                                &[("authorization", &auth), ("idempotency-key", &idem)],
                            )
                            .await;
                        let ret = epoch.elapsed().as_nanos() as u64;
                        match st {
                            200 => {
                                assert_eq!(body["matched"], 1, "{body}");
                                Some(Event { op: Op::Write(value), call, ret: Some(ret) })
                            }
                            // No answer, or no leader in time: it may or may not have applied.
                            0 | 503 => {
                                unknown.fetch_add(1, Ordering::Relaxed);
                                Some(Event { op: Op::Write(value), call, ret: None })
                            }
                            other => panic!("write refused: {other} {body}"),
                        }
                    } else {
                        let (st, body) = client
                            .call(Method::GET, &format!("{base}/documents/{key}"), None, &[("authorization", &auth)])
                            .await;
                        let ret = epoch.elapsed().as_nanos() as u64;
                        match st {
                            200 => Some(Event { op: Op::Read(body["v"].as_u64()), call, ret: Some(ret) }),
                            0 | 503 => None,
                            other => panic!("read refused: {other} {body}"),
                        }
                    };
                    if let Some(e) = event {
                        if e.ret.is_some() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        history.lock().unwrap().get_mut(&key).unwrap().push(e);
                    }
                }
            }));
        }
    }
    Clients { stop, ok, unknown, tasks, history }
}

impl Clients {
    async fn wait_for(&self, more: u64) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        poll(&format!("{more} more completed operations"), FAILOVER, || async {
            (self.ok.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_leader_stops_accepting_writes_and_the_history_stays_linearizable() {
    let pg = up(&["--isolate-zones"]).await;
    let client = pg.internal_client().unwrap();
    let (gw, tok) = (pg.gateway().unwrap(), pg.token("shop").unwrap());
    let keys: Vec<String> = (0..3).map(|k| format!("r{k}")).collect();
    for key in &keys {
        let (st, body) = client
            .call(
                Method::POST,
                &format!("{gw}/v1/databases/shop/collections/registers/documents"),
                Some(&json!({"documents": [{"_id": key, "v": 0}]})),
                &[("authorization", &format!("Bearer {tok}"))],
            )
            .await;
        assert_eq!(st, 201, "{body}");
    }
    let clients = start_clients(&client, &gw, &tok, &keys, 3);
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>8.2?} {what}", t0.elapsed());
    clients.wait_for(200).await;
    phase("partitioning the leader's zone");

    // Cut the leader's zone off from the other two (the gateway still reaches it).
    let (old, old_status) = pg.leader(&client.http).await.expect("a leader");
    let zone = old["zone"].as_str().unwrap().to_owned();
    let (pg2, z) = (pg.clone(), zone.clone());
    blocking(move || pg2.zone(&z, "partition")).await.unwrap();
    let (new, new_status) = new_leader(&pg, &client.http, &old["id"]).await;
    assert_ne!(new["zone"], zone.as_str());
    assert!(new_status["term"].as_u64() > old_status["term"].as_u64());

    // The old leader, cut off from the majority, accepts no write and serves no
    // linearizable read, however it is asked.
    let old_data = old["data"].as_str().unwrap();
    let (st, body) = client
        .post(
            &format!("{old_data}/v1/databases/shop/collections/registers/update"),
            &json!({"filter": {"_id": "r0"}, "update": {"$set": {"v": 999_999_999}}}),
        )
        .await;
    assert!(st == 503 || st == 421, "the cut-off leader answered a write with {st} {body}");
    let (st, body) = client.get(&format!("{old_data}/v1/databases/shop/collections/registers/documents/r0")).await;
    assert!(st == 503 || st == 421, "the cut-off leader answered a read with {st} {body}");
    // Meanwhile the majority serves.
    clients.wait_for(200).await;

    phase("healing");
    // Heal: the old leader steps down.
    let (pg2, z) = (pg.clone(), zone.clone());
    blocking(move || pg2.zone(&z, "up")).await.unwrap();
    poll("the old leader to follow", FAILOVER, || async {
        let (_, s) = client.get(&format!("{}/v1/status", old["admin"].as_str().unwrap())).await;
        (s["role"] == "follower" && s["term"].as_u64() >= new_status["term"].as_u64()).then_some(())
    })
    .await
    .unwrap();
    clients.wait_for(200).await;

    // Now the new leader's zone loses its network altogether (the gateway cannot reach it
    // either: its requests there time out and go to the others).
    let zone2 = new["zone"].as_str().unwrap().to_owned();
    let (pg2, z) = (pg.clone(), zone2.clone());
    phase("isolating the new leader's zone");
    blocking(move || pg2.zone(&z, "isolate")).await.unwrap();
    let (third, _) = new_leader(&pg, &client.http, &new["id"]).await;
    assert_ne!(third["zone"], zone2.as_str());
    phase("a third leader");
    clients.wait_for(200).await;
    phase("healing");
    let (pg2, z) = (pg.clone(), zone2.clone());
    blocking(move || pg2.zone(&z, "up")).await.unwrap();
    clients.wait_for(100).await;
    phase("done");

    clients.stop.store(true, Ordering::Relaxed);
    for t in clients.tasks {
        t.await.unwrap();
    }
    let history = clients.history.lock().unwrap().clone();
    let (st, body) = client
        .call(
            Method::GET,
            &format!("{gw}/v1/databases/shop/collections/registers/documents/r0"),
            None,
            &[("authorization", &format!("Bearer {tok}"))],
        )
        .await;
    assert_eq!(st, 200);
    assert_ne!(body["v"], 999_999_999, "the refused write appeared");
    for (key, events) in &history {
        let started = Instant::now();
        let verdict = linearizability::check(Some(0), events);
        eprintln!(
            "{key}: {} operations ({} writes of unknown outcome) checked in {:?}",
            events.len(),
            events.iter().filter(|e| e.ret.is_none()).count(),
            started.elapsed()
        );
        assert!(verdict.is_ok(), "register {key}: {}", verdict.unwrap_err());
    }
    eprintln!("writes of unknown outcome: {}", clients.unknown.load(Ordering::Relaxed));
}
