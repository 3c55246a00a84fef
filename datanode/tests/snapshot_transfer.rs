//! Snapshot transfers between real members in one process: openraft, RocksDB, and the Raft
//! RPCs over HTTP on port 0. A learner joining after the leader purged its log can only
//! catch up through a snapshot, so every test here makes one travel.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_datanode::clock::ReplicaClock;
use nimbus_datanode::node::NodeCtx;
use nimbus_datanode::raft::log_store::LogStore;
use nimbus_datanode::raft::network::{ChunkHook, Network};
use nimbus_datanode::raft::state_machine::{InstallHook, InstallStep, SmShared, StateMachine};
use nimbus_datanode::raft::{NodeInfo, Raft};
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::{Command, WriteOp};
use openraft::async_runtime::WatchReceiver;
use openraft::{Config as RaftConfig, SnapshotPolicy};
use serde_json::{Value, json};

const SECRET: &str = "snapshot-transfer-test-secret-0123456789";

/// What a test does to a member: its chunks in transit, its installs, how long it waits
/// for an install call.
#[derive(Default)]
struct Hooks {
    chunk: Option<ChunkHook>,
    install: Option<InstallHook>,
    install_timeout: Option<Duration>,
}

/// One member: its Raft, its state machine, and its Raft RPCs served on a port of its own.
struct Member {
    id: u64,
    raft: Raft,
    sm: Arc<SmShared>,
    info: NodeInfo,
    dir: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

impl Member {
    async fn start(id: u64, dir: &Path, hooks: Hooks) -> Member {
        let log = LogStore::open(&dir.join("raft")).unwrap();
        let mut sm = StateMachine::open(dir, EngineOptions::default()).unwrap();
        if let Some(hook) = hooks.install {
            sm = sm.with_install_hook(hook);
        }
        let shared = sm.shared();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let secret = nimbus_net::ClusterSecret::parse(SECRET).unwrap();
        let clock = Arc::new(ReplicaClock::new(0));
        let mut network = Network::new(Duration::from_secs(1), 64 << 20, clock.clone(), &secret);
        if let Some(hook) = hooks.chunk {
            network = network.with_chunk_hook(hook);
        }
        if let Some(t) = hooks.install_timeout {
            network = network.with_install_timeout(t);
        }
        let config = RaftConfig {
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 700,
            // Snapshots and purges only when a test asks for them.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let raft = Raft::new(id, Arc::new(config), network, log, sm).await.unwrap();
        let ctx = Arc::new(NodeCtx {
            id,
            zone: "local".into(),
            replica_set: "rs0".into(),
            raft: raft.clone(),
            sm: shared.clone(),
            prometheus: PrometheusBuilder::new().build_recorder().handle(),
            write_timeout: Duration::from_secs(5),
            quorum_lease: Duration::from_secs(2),
            max_body_bytes: 48 * 1024 * 1024,
            clock,
            data_requests: Default::default(),
            draining: Default::default(),
            peers_draining: Default::default(),
        });
        let app = nimbus_datanode::server::raft_rpc::router(ctx);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let info =
            NodeInfo { admin_addr: addr.clone(), data_addr: addr.clone(), zone: "local".into(), raft_addr: addr };
        Member { id, raft, sm: shared, info, dir: dir.to_owned(), server }
    }

    async fn stop(self) {
        self.raft.shutdown().await.unwrap();
        self.server.abort();
    }

    /// Every document of `app.items`, read one by one (each read checks RocksDB's block
    /// checksums), and the oplog.
    fn contents(&self, ids: &[u64]) -> (Vec<Option<Value>>, Vec<Value>) {
        let engine = self.sm.engine();
        let docs = ids.iter().map(|id| engine.get("app", "items", &json!(id)).unwrap()).collect();
        let oplog = engine.read_oplog(0, 100_000).unwrap().iter().map(|e| serde_json::to_value(e).unwrap()).collect();
        (docs, oplog)
    }

    fn leftover_transfers(&self) -> Vec<String> {
        match std::fs::read_dir(self.dir.join("incoming")) {
            Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

async fn poll<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn insert(id: u64) -> Command {
    let doc = json!({"_id": id, "payload": format!("{id:>8}-").repeat(40)});
    Command {
        db: "app".into(),
        op: WriteOp::Insert { coll: "items".into(), docs: vec![serde_json::value::to_raw_value(&doc).unwrap()] },
        idempotency_key: None,
        ts_ms: 1_700_000_000_000,
        route_epoch: None,
        request_hash: None,
    }
}

/// A one-member replica set holding documents `0..n`, its log purged behind a snapshot.
async fn leader_with_purged_log(dir: &Path, n: u64, hooks: Hooks) -> Member {
    let leader = Member::start(1, dir, hooks).await;
    leader.raft.initialize(BTreeMap::from([(1, leader.info.clone())])).await.unwrap();
    leader.raft.wait(Some(Duration::from_secs(10))).state(openraft::ServerState::Leader, "leader").await.unwrap();
    for id in 0..n {
        leader.raft.client_write(insert(id)).await.unwrap();
    }
    let applied = leader.raft.metrics().borrow_watched().last_applied.unwrap().index();
    leader.raft.trigger().snapshot().await.unwrap();
    leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index() >= applied), "a snapshot of every write")
        .await
        .unwrap();
    leader.raft.trigger().purge_log(applied).await.unwrap();
    leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index() >= applied), "the log purged")
        .await
        .unwrap();
    leader
}

/// Flips one byte in the middle of the first chunk of the first `.sst` file the leader
/// sends, once; counts how often that file is sent from its start.
#[derive(Default)]
struct Corruptor {
    target: Mutex<Option<String>>,
    corrupted: AtomicUsize,
    sends: AtomicUsize,
}

impl Corruptor {
    fn hook(self: &Arc<Self>) -> ChunkHook {
        let me = self.clone();
        Arc::new(move |file: &str, offset: u64, bytes: &mut [u8]| {
            if !file.ends_with(".sst") || offset != 0 || bytes.is_empty() {
                return;
            }
            let mut target = me.target.lock().unwrap();
            match target.as_deref() {
                None => {
                    *target = Some(file.to_owned());
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0x5a;
                    me.corrupted.fetch_add(1, Ordering::SeqCst);
                    me.sends.fetch_add(1, Ordering::SeqCst);
                }
                Some(t) if t == file => {
                    me.sends.fetch_add(1, Ordering::SeqCst);
                }
                Some(_) => {}
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_corrupted_in_transit_is_refused_and_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let corruptor = Arc::new(Corruptor::default());
    let n = 300;
    let leader = leader_with_purged_log(
        &tmp.path().join("n1"),
        n,
        Hooks { chunk: Some(corruptor.hook()), ..Default::default() },
    )
    .await;
    let learner = Member::start(2, &tmp.path().join("n2"), Hooks::default()).await;
    leader.raft.add_learner(learner.id, learner.info.clone(), false).await.unwrap();

    let target = leader.raft.metrics().borrow_watched().last_log_index;
    poll("the learner to catch up through a snapshot", Duration::from_secs(60), || {
        let m = learner.raft.metrics().borrow_watched().clone();
        assert!(m.running_state.is_ok(), "the learner stopped: {:?}", m.running_state);
        (m.last_applied.map(|l| l.index()) >= target).then_some(())
    })
    .await;
    assert_eq!(corruptor.corrupted.load(Ordering::SeqCst), 1, "no chunk was corrupted");
    assert!(corruptor.sends.load(Ordering::SeqCst) >= 2, "the corrupted snapshot was not sent again");
    assert!(learner.raft.metrics().borrow_watched().snapshot.is_some(), "the learner caught up without a snapshot");

    let ids: Vec<u64> = (0..n).collect();
    let (docs, oplog) = learner.contents(&ids);
    assert_eq!((docs.clone(), oplog.clone()), leader.contents(&ids), "the learner differs from the leader");
    assert!(docs.iter().all(Option::is_some));

    // The learner still follows: a write after the snapshot reaches it.
    leader.raft.client_write(insert(n)).await.unwrap();
    poll("the write after the snapshot on the learner", Duration::from_secs(10), || {
        learner.sm.engine().get("app", "items", &json!(n)).unwrap()
    })
    .await;
    assert_eq!(learner.leftover_transfers(), Vec::<String>::new(), "a transfer was left behind");
    learner.stop().await;
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_transfer_removes_an_abandoned_one() {
    let tmp = tempfile::tempdir().unwrap();
    let member = Member::start(1, &tmp.path().join("n1"), Hooks::default()).await;
    let client = reqwest::Client::new();
    let chunk = |transfer: &str, offset: u64| {
        let url = format!("{}/raft/snapshot/{transfer}/000009.sst?offset={offset}", member.info.raft_addr);
        client.post(url).body(vec![7u8; 1000]).send()
    };
    // A transfer that stops after two chunks: its sender crashed or gave up.
    assert!(chunk("aaaa", 0).await.unwrap().status().is_success());
    assert!(chunk("aaaa", 1000).await.unwrap().status().is_success());
    assert_eq!(member.leftover_transfers(), vec!["aaaa".to_owned()]);
    // The next transfer removes it.
    assert!(chunk("bbbb", 0).await.unwrap().status().is_success());
    assert_eq!(member.leftover_transfers(), vec!["bbbb".to_owned()]);
    // The abandoned one cannot be resumed into a half-written file: its sender starts over.
    assert!(!chunk("aaaa", 2000).await.unwrap().status().is_success());
    assert_eq!(member.leftover_transfers(), vec!["bbbb".to_owned()]);
    member.stop().await;
}

/// Counts the transfers a leader starts: the sends of the first chunk of the first file.
#[derive(Default)]
struct TransferCounter {
    first_file: Mutex<Option<String>>,
    started: AtomicUsize,
}

impl TransferCounter {
    fn hook(self: &Arc<Self>) -> ChunkHook {
        let me = self.clone();
        Arc::new(move |file: &str, offset: u64, _: &mut [u8]| {
            let mut first = me.first_file.lock().unwrap();
            if offset == 0 && first.get_or_insert_with(|| file.to_owned()) == file {
                me.started.fetch_add(1, Ordering::SeqCst);
            }
        })
    }
}

/// The leader stops waiting for its install call (a short timeout: a slow receiver, a
/// dropped connection) while the learner is still installing, and sends the snapshot
/// again. The install its sender gave up on must finish undisturbed: the new transfer may
/// not remove the files it is installing from, and the learner must not stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_install_its_sender_gave_up_on_finishes_before_a_new_transfer_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let transfers = Arc::new(TransferCounter::default());
    let n = 300;
    let leader_hooks = Hooks {
        chunk: Some(transfers.hook()),
        install_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let leader = leader_with_purged_log(&tmp.path().join("n1"), n, leader_hooks).await;
    // The learner's first install stalls after staging the new generation, long after the
    // leader stopped waiting for it.
    let stalled = Arc::new(AtomicUsize::new(0));
    let stall = stalled.clone();
    let install: InstallHook = Arc::new(move |step: InstallStep| {
        if step == InstallStep::Staged && stall.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let learner =
        Member::start(2, &tmp.path().join("n2"), Hooks { install: Some(install), ..Default::default() }).await;
    leader.raft.add_learner(learner.id, learner.info.clone(), false).await.unwrap();

    let target = leader.raft.metrics().borrow_watched().last_log_index;
    poll("the learner to catch up through a snapshot", Duration::from_secs(60), || {
        let m = learner.raft.metrics().borrow_watched().clone();
        assert!(m.running_state.is_ok(), "the learner stopped: {:?}", m.running_state);
        (m.last_applied.map(|l| l.index()) >= target).then_some(())
    })
    .await;
    // A new transfer started while the first install was stalled (the leader's call had
    // timed out), and was kept waiting until that install was done.
    poll("the leader to send the snapshot again", Duration::from_secs(10), || {
        (transfers.started.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    assert!(stalled.load(Ordering::SeqCst) >= 1, "no install was stalled");

    let ids: Vec<u64> = (0..n).collect();
    let (docs, oplog) = learner.contents(&ids);
    assert_eq!((docs.clone(), oplog.clone()), leader.contents(&ids), "the learner differs from the leader");
    assert!(docs.iter().all(Option::is_some));
    leader.raft.client_write(insert(n)).await.unwrap();
    poll("the write after the snapshot on the learner", Duration::from_secs(10), || {
        learner.sm.engine().get("app", "items", &json!(n)).unwrap()
    })
    .await;
    let m = learner.raft.metrics().borrow_watched().clone();
    assert!(m.running_state.is_ok(), "the learner stopped: {:?}", m.running_state);
    poll("no transfer left behind", Duration::from_secs(10), || learner.leftover_transfers().is_empty().then_some(()))
        .await;
    learner.stop().await;
    leader.stop().await;
}
