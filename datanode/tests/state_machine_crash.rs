//! The state machine writes no WAL (`Engine::write`): a crash keeps its last flush, whole,
//! and a restart applies the Raft log again from there. A child process (this test binary,
//! running the ignored `child_…` test) appends entries to the Raft log, applies them, and
//! aborts with part of them only in the memtables; the parent finds on disk a state that is
//! exactly a prefix of the log (documents and applied index of the same entries), then
//! restarts the member through openraft's own startup and finds every committed entry
//! applied.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream;
use nimbus_datanode::clock::ReplicaClock;
use nimbus_datanode::raft::log_store::LogStore;
use nimbus_datanode::raft::network::Network;
use nimbus_datanode::raft::state_machine::{SmShared, StateMachine};
use nimbus_datanode::raft::types::Entry;
use nimbus_datanode::raft::{Raft, TypeConfig};
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::{Command, WriteOp};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use serde_json::json;

/// Entries applied and flushed (by a snapshot) before the crash, when the case has one.
const FLUSHED: u64 = 10;
/// Entries committed and applied before the crash.
const APPLIED: u64 = 30;

const DIR_ENV: &str = "NIMBUS_TEST_CRASH_DIR";
const SNAPSHOT_ENV: &str = "NIMBUS_TEST_CRASH_SNAPSHOT";

/// Entry 0 is blank (where a replica set's log starts); entry `i` inserts document `i - 1`.
fn entry(index: u64) -> Entry {
    let log_id = openraft::testing::log_id::<TypeConfig>(1, 1, index);
    if index == 0 {
        return Entry::new_blank(log_id);
    }
    let doc = json!({"_id": index - 1, "v": "x".repeat(200)});
    let cmd = Command {
        db: "app".into(),
        op: WriteOp::Insert { coll: "items".into(), docs: vec![serde_json::value::to_raw_value(&doc).unwrap()] },
        idempotency_key: None,
        ts_ms: 1_700_000_000_000 + index,
        route_epoch: None,
        request_hash: None,
    };
    Entry::new_normal(log_id, cmd)
}

async fn apply(sm: &mut StateMachine, from: u64, to: u64) {
    let entries: Vec<Entry> = (from..=to).map(entry).collect();
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await.unwrap();
}

/// The documents of `app.items` and the applied index, as the member serves them.
fn state(sm: &SmShared) -> (Vec<u64>, Option<u64>) {
    let engine = sm.engine();
    let ids = (0..APPLIED).filter(|id| engine.get("app", "items", &json!(id)).unwrap().is_some()).collect();
    let applied: Option<openraft::type_config::alias::LogIdOf<TypeConfig>> =
        engine.get_meta(nimbus_datanode::store::keys::META_APPLIED).unwrap();
    (ids, applied.map(|l| l.index()))
}

#[tokio::test]
#[ignore = "a child process of a_crash_loses_no_committed_entry_and_leaves_a_whole_prefix"]
async fn child_applies_then_crashes() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let dir = Path::new(&dir);
    let mut log = LogStore::open(&dir.join("raft")).unwrap();
    log.append((0..=APPLIED).map(entry), IOFlushed::noop()).await.unwrap();
    // The log's writer takes jobs in order: once this is written, so are the entries.
    log.save_committed(Some(openraft::testing::log_id::<TypeConfig>(1, 1, APPLIED))).await.unwrap();

    let mut sm = StateMachine::open(dir, EngineOptions::default()).unwrap();
    let mut from = 0;
    if std::env::var(SNAPSHOT_ENV).is_ok() {
        apply(&mut sm, 0, FLUSHED).await;
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id.map(|l| l.index()), Some(FLUSHED));
        // As openraft does behind a snapshot (with no entries kept): the entries the
        // snapshot holds are gone from the log, so the state machine must never need them.
        log.purge(built.meta.last_log_id.unwrap()).await.unwrap();
        from = FLUSHED + 1;
    }
    apply(&mut sm, from, APPLIED).await;
    assert_eq!(state(&sm.shared()), ((0..APPLIED).collect(), Some(APPLIED)), "served before the crash");
    // No destructors, no flushes: as abrupt as SIGKILL.
    std::process::abort();
}

fn run_child(dir: &Path, snapshot: bool) -> std::process::ExitStatus {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_applies_then_crashes", "--exact", "--ignored", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .stdout(std::process::Stdio::null());
    if snapshot {
        cmd.env(SNAPSHOT_ENV, "1");
    }
    cmd.status().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_no_committed_entry_and_leaves_a_whole_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    for snapshot in [false, true] {
        let dir = tmp.path().join(format!("snapshot-{snapshot}"));
        std::fs::create_dir_all(&dir).unwrap();
        let status = run_child(&dir, snapshot);
        assert_eq!(status.signal(), Some(6), "the child did not abort (snapshot: {snapshot}): {status}");

        // On disk: the last flush, whole (documents and applied index of the same entries).
        {
            let sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
            let flushed = if snapshot { FLUSHED } else { 0 };
            let expected = ((0..flushed).collect::<Vec<_>>(), Some(flushed).filter(|f| *f > 0));
            assert_eq!(state(&sm.shared()), expected, "on disk after the crash (snapshot: {snapshot})");
        }

        // Restarted through openraft: the committed entries past it are applied again.
        let sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
        let shared = sm.shared();
        let log = LogStore::open(&dir.join("raft")).unwrap();
        let secret = nimbus_net::ClusterSecret::parse("state-machine-crash-test-secret-0123456789").unwrap();
        let config = Arc::new(openraft::Config::default().validate().unwrap());
        let network = Network::new(Duration::from_secs(1), 64 << 20, Arc::new(ReplicaClock::new(0)), &secret);
        let raft = Raft::new(1, config, network, log, sm).await.unwrap();
        assert_eq!(
            state(&shared),
            ((0..APPLIED).collect(), Some(APPLIED)),
            "after a restart from the crash (snapshot: {snapshot})"
        );
        raft.shutdown().await.unwrap();
    }
}
