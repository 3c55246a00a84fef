//! Planned stops (SIGTERM, as the kubelet sends on a drain or a rolling restart) of real
//! datanode processes under a steady stream of writes through a real gateway: a leader hands
//! its leadership over before it exits, a follower just exits, and clients see neither.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::{Duration, Instant};

use nimbus_api::etcd::UserRole;
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::workload::{self, Writers};
use nimbus_e2e::{DataClient, poll, raw};
use reqwest::Method;

/// Long enough that an ordinary election (what a leader stopping without a handoff would
/// cost, were its death not detected) cannot pass for a handoff.
const ELECTION_MS: u64 = 2_000;
/// The exit is a handoff (a few heartbeats) and the servers' drain: far below this.
const EXIT_WITHIN: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(20);

struct Env {
    stack: Stack,
    _gw: GatewayProc,
    client: DataClient,
    gw: String,
    token: String,
}

/// Three datanodes, etcd and a gateway, with the database `shop` served and its counter made.
async fn env() -> Env {
    let election = ELECTION_MS.to_string();
    let mut stack = Stack::start_with(3, &["shop"], &["--election-timeout-ms", &election]).await.unwrap();
    let gw = GatewayProc::start("gw1", &stack.etcd.client_urls, &stack.cluster.secret_file, &[]).await.unwrap();
    let token = stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let client = DataClient::new();
    let url = format!("{}/v1/databases/shop/collections", gw.public);
    let auth = format!("Bearer {token}");
    poll("the gateway to serve shop", WAIT, || async {
        (client.call(Method::GET, &url, None, &[("authorization", &auth)]).await.0 == 200).then_some(())
    })
    .await
    .unwrap();
    let gw_url = gw.public.clone();
    workload::prepare(&client, &gw_url, "shop", &token).await.unwrap();
    Env { stack, _gw: gw, client, gw: gw_url, token }
}

/// Times member `i` took a leader for dead (`leader_watch`): what a stop without a
/// handoff would show on the followers.
async fn dead_leader_detections(e: &Env, i: usize) -> u64 {
    let (st, body) = e.client.get(&format!("{}/metrics", e.stack.cluster.nodes[i].admin)).await;
    assert_eq!(st, 200, "{body}");
    body.as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("nimbus_raft_dead_leader_detected_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Keeps a request in flight on the admin port at `admin` (a body announced and never
/// sent): a member sent SIGTERM then stays in its drain, its Raft core still running, until
/// the stream is dropped or the drain's bound passes.
fn hold_drain_open(admin: &str, secret: &nimbus_net::ClusterSecret) -> std::net::TcpStream {
    use std::io::Write;
    let headers = secret.default_headers();
    let auth = headers.get("authorization").unwrap().to_str().unwrap();
    let mut s = std::net::TcpStream::connect(raw::addr_of(admin)).unwrap();
    let head = format!(
        "POST /v1/admin/route-epoch HTTP/1.1\r\nHost: nimbus\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{{\"db\":"
    );
    s.write_all(head.as_bytes()).unwrap();
    s
}

/// Waits until the port at base URL `url` refuses connections (its server stopped).
async fn refused(url: &str) {
    let addr = raw::addr_of(url);
    poll("the port to close", WAIT, || async {
        matches!(tokio::net::TcpStream::connect(&addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
            .then_some(())
    })
    .await
    .unwrap();
}

/// The leader member `admin` knows of, as its status says.
async fn leader_seen_by(client: &DataClient, admin: &str) -> Option<u64> {
    let (st, body) = client.get(&format!("{admin}/v1/status")).await;
    (st == 200).then(|| body["leaderId"].as_u64()).flatten()
}

/// Two members of `v` at once, mutably.
fn two<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

/// Waits until member `i` has applied everything the leader `leader` had committed.
async fn caught_up(e: &Env, i: usize, leader: usize) {
    let commit = e.stack.cluster.status(leader).await.unwrap().commit_index;
    e.stack.cluster.wait_applied(i, commit, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_the_leader_hands_leadership_over_then_exits_0_and_no_write_fails_or_is_lost() {
    let mut e = env().await;
    let writers = Writers::start(&e.client, &e.gw, "shop", &e.token, 4);
    writers.wait_for(100, WAIT).await.unwrap();
    let cluster = &e.stack.cluster;
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let old = cluster.status(leader).await.unwrap();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let detections_before: u64 = {
        let mut n = 0;
        for f in &followers {
            n += dead_leader_detections(&e, *f).await;
        }
        n
    };
    writers.take_max_latency_us();

    let sent = Instant::now();
    let (exit, took) = e.stack.cluster.nodes[leader].terminate(EXIT_WITHIN).await.unwrap();
    assert_eq!(exit.code(), Some(0), "the leader exited with {exit}");
    let cluster = &e.stack.cluster;
    let new = cluster.wait_leader(WAIT).await.unwrap();
    let led_after = sent.elapsed();
    assert_ne!(new, leader);
    assert!(cluster.status(new).await.unwrap().term > old.term);
    writers.wait_for(100, WAIT).await.unwrap();
    let stall = Duration::from_micros(writers.take_max_latency_us());
    eprintln!(
        "leader sigterm: exited 0 after {} ms, new leader seen after {} ms, longest write {} ms",
        took.as_millis(),
        led_after.as_millis(),
        stall.as_millis()
    );
    // The writes paused for a handoff, not for an election...
    assert!(stall < Duration::from_millis(ELECTION_MS), "writes stalled {stall:?}: as long as an election");
    // ...and not for a failover either: no follower ever took the leader for dead.
    let mut detections = 0;
    for f in &followers {
        detections += dead_leader_detections(&e, *f).await;
    }
    assert_eq!(detections, detections_before, "a follower took the stopping leader for dead: no handoff happened");

    // The stopped member comes back on its storage and catches up.
    e.stack.cluster.nodes[leader].restart().await.unwrap();
    writers.wait_for(50, WAIT).await.unwrap();
    let report = writers.stop().await.unwrap();
    assert!(report.errors.is_empty(), "client-visible errors: {:?}", &report.errors[..report.errors.len().min(10)]);
    workload::verify(&e.client, &e.gw, "shop", &e.token, &report).await.unwrap();
    let new = e.stack.cluster.wait_leader(WAIT).await.unwrap();
    caught_up(&e, leader, new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_a_follower_exits_0_at_once_and_the_replica_set_keeps_serving() {
    let mut e = env().await;
    let writers = Writers::start(&e.client, &e.gw, "shop", &e.token, 4);
    writers.wait_for(100, WAIT).await.unwrap();
    let leader = e.stack.cluster.wait_leader(WAIT).await.unwrap();
    let term = e.stack.cluster.status(leader).await.unwrap().term;
    let follower = (leader + 1) % 3;

    let (exit, took) = e.stack.cluster.nodes[follower].terminate(EXIT_WITHIN).await.unwrap();
    assert_eq!(exit.code(), Some(0), "the follower exited with {exit}");
    eprintln!("follower sigterm: exited 0 after {} ms", took.as_millis());
    // Nothing to hand over: no waiting for anything.
    assert!(took < Duration::from_secs(2), "the follower took {took:?} to stop");
    writers.wait_for(100, WAIT).await.unwrap();
    assert_eq!(e.stack.cluster.wait_leader(WAIT).await.unwrap(), leader, "the leader changed");
    assert_eq!(e.stack.cluster.status(leader).await.unwrap().term, term, "an election happened");

    e.stack.cluster.nodes[follower].restart().await.unwrap();
    writers.wait_for(50, WAIT).await.unwrap();
    let report = writers.stop().await.unwrap();
    assert!(report.errors.is_empty(), "client-visible errors: {:?}", &report.errors[..report.errors.len().min(10)]);
    workload::verify(&e.client, &e.gw, "shop", &e.token, &report).await.unwrap();
    caught_up(&e, follower, leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_every_member_at_once_stops_them_all_with_0_before_the_handoff_deadline() {
    // `helm uninstall`, `nimbus playground down`: nobody is left to take over.
    let mut e = env().await;
    let writers = Writers::start(&e.client, &e.gw, "shop", &e.token, 4);
    writers.wait_for(100, WAIT).await.unwrap();
    let stops = e.stack.cluster.nodes.iter_mut().map(|d| d.terminate(EXIT_WITHIN));
    let exits = futures::future::join_all(stops).await;
    writers.stop().await.unwrap();
    let took: Vec<u128> = exits.iter().map(|r| r.as_ref().unwrap().1.as_millis()).collect();
    eprintln!("every member sigterm: exited after {took:?} ms");
    for r in exits {
        let (exit, took) = r.unwrap();
        assert_eq!(exit.code(), Some(0), "a member exited with {exit}");
        // The leader gives up once its followers stop answering (an election timeout at most).
        assert!(took < Duration::from_millis(ELECTION_MS + 2_000), "a member took {took:?} to stop");
    }
}

/// The followers of `leader`, the one with the lower id first: the one a leader handing over
/// picks among equals.
fn followers_by_id(e: &Env, leader: usize) -> (usize, usize) {
    let mut f: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    f.sort_by_key(|i| e.stack.cluster.nodes[*i].id);
    (f[0], f[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_stopping_never_takes_over_even_when_the_leader_dies_during_its_drain() {
    let mut e = env().await;
    let leader = e.stack.cluster.wait_leader(WAIT).await.unwrap();
    let (stopping, other) = followers_by_id(&e, leader);
    let stopping_id = e.stack.cluster.nodes[stopping].id;
    let other_id = e.stack.cluster.nodes[other].id;
    let other_admin = e.stack.cluster.nodes[other].admin.clone();
    let held = hold_drain_open(&e.stack.cluster.nodes[stopping].admin, &e.stack.cluster.secret);
    let stopping_admin = e.stack.cluster.nodes[stopping].admin.clone();
    let client = &e.client;
    let (f, l) = two(&mut e.stack.cluster.nodes, stopping, leader);

    let (exit, new_leader) = tokio::join!(f.terminate(EXIT_WITHIN), async {
        // The follower is in its drain (its admin port closed, a request still in flight)
        // when the leader dies: a new leader must be elected without it.
        refused(&stopping_admin).await;
        l.kill().await;
        let new = poll("a new leader", WAIT, || async {
            leader_seen_by(client, &other_admin).await.filter(|id| *id != l.id)
        })
        .await
        .unwrap();
        drop(held);
        new
    });
    let (exit, took) = exit.unwrap();
    eprintln!(
        "follower stopping while the leader died: {new_leader} led; the follower exited after {} ms",
        took.as_millis()
    );
    assert_ne!(new_leader, stopping_id, "the stopping follower was elected: it would exit as leader, with no handoff");
    assert_eq!(new_leader, other_id);
    assert_eq!(exit.code(), Some(0), "the follower exited with {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_stopping_while_a_follower_drains_hands_over_to_the_other_follower() {
    let mut e = env().await;
    let leader = e.stack.cluster.wait_leader(WAIT).await.unwrap();
    let (stopping, other) = followers_by_id(&e, leader);
    let other_id = e.stack.cluster.nodes[other].id;
    let detections_before = dead_leader_detections(&e, other).await;
    // The lower id: the successor among equals, were stopping members not passed over.
    let held = hold_drain_open(&e.stack.cluster.nodes[stopping].admin, &e.stack.cluster.secret);
    let stopping_admin = e.stack.cluster.nodes[stopping].admin.clone();
    let (f, l) = two(&mut e.stack.cluster.nodes, stopping, leader);

    let (follower_exit, leader_exit) = tokio::join!(f.terminate(EXIT_WITHIN), async {
        refused(&stopping_admin).await;
        let r = l.terminate(EXIT_WITHIN).await;
        drop(held);
        r
    });
    let (exit, took) = leader_exit.unwrap();
    assert_eq!(exit.code(), Some(0), "the leader exited with {exit}");
    assert_eq!(follower_exit.unwrap().0.code(), Some(0));
    let new = leader_seen_by(&e.client, &e.stack.cluster.nodes[other].admin).await;
    eprintln!("leader sigterm while a follower drains: {new:?} leads, the leader exited after {} ms", took.as_millis());
    assert_eq!(new, Some(other_id), "leadership went to {new:?}");
    // A handoff, not a failover: the leader found its successor at once.
    assert_eq!(dead_leader_detections(&e, other).await, detections_before, "the leader stopped without a handoff");
    assert!(
        took < Duration::from_millis(ELECTION_MS),
        "the leader took {took:?}: it tried the stopping follower first"
    );
}
