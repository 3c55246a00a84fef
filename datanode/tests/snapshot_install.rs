//! Installing a snapshot into the state machine, with crashes: a child process (this test
//! binary, running the ignored `child_…` test) installs a received snapshot and aborts right
//! after one step of the install; the parent then restarts the member from what is on disk,
//! through openraft's own startup, and finds the old state or the new one, never a mix, and
//! nothing left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream;
use nimbus_datanode::clock::ReplicaClock;
use nimbus_datanode::raft::log_store::LogStore;
use nimbus_datanode::raft::network::Network;
use nimbus_datanode::raft::snapshot::{META_FILE, SnapshotData, data_files};
use nimbus_datanode::raft::state_machine::{InstallStep, SmShared, StateMachine};
use nimbus_datanode::raft::types::Entry;
use nimbus_datanode::raft::{Raft, TypeConfig};
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::{Command, WriteOp};
use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use serde_json::json;

/// The member's state before the install: documents 0..10, applied up to index 10.
const OLD: u64 = 10;
/// The snapshot it receives: documents 0..20, applied up to index 20.
const NEW: u64 = 20;

const DIR_ENV: &str = "NIMBUS_TEST_INSTALL_DIR";
const CRASH_ENV: &str = "NIMBUS_TEST_CRASH_AFTER";

fn insert(id: u64) -> Command {
    let doc = json!({"_id": id, "v": "x".repeat(200)});
    Command {
        db: "app".into(),
        op: WriteOp::Insert { coll: "items".into(), docs: vec![serde_json::value::to_raw_value(&doc).unwrap()] },
        idempotency_key: None,
        ts_ms: 1_700_000_000_000,
        route_epoch: None,
        request_hash: None,
    }
}

/// Applies the entries at indexes `from..=to` (entry `i` inserts document `i - 1`).
async fn apply(sm: &mut StateMachine, from: u64, to: u64) {
    let entries: Vec<Entry> = (from..=to)
        .map(|i| Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, i), insert(i - 1)))
        .collect();
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await.unwrap();
}

/// The documents of `app.items` and the applied index, as the member serves them.
fn state(sm: &SmShared) -> (Vec<u64>, Option<u64>) {
    let engine = sm.engine();
    let ids = (0..NEW).filter(|id| engine.get("app", "items", &json!(id)).unwrap().is_some()).collect();
    let applied: Option<openraft::type_config::alias::LogIdOf<TypeConfig>> =
        engine.get_meta(nimbus_datanode::store::keys::META_APPLIED).unwrap();
    (ids, applied.map(|l| l.index()))
}

fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// In the child: builds the old state in `dir`, receives a snapshot of the new state into
/// `dir/incoming` as a transfer leaves it, and installs it, aborting after `crash_after`.
async fn install_and_crash(dir: &Path, crash_after: Option<InstallStep>) {
    // The leader's state machine, elsewhere, with its snapshot of the new state.
    let mut leader = StateMachine::open(&dir.with_extension("leader"), EngineOptions::default()).unwrap();
    apply(&mut leader, 1, NEW).await;
    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

    let hook = Arc::new(move |step: InstallStep| {
        if Some(step) == crash_after {
            // No destructors, no flushes: as abrupt as SIGKILL.
            std::process::abort();
        }
    });
    let mut member = StateMachine::open(dir, EngineOptions::default()).unwrap().with_install_hook(hook);
    apply(&mut member, 1, OLD).await;
    member.get_snapshot_builder().await.build_snapshot().await.unwrap();

    // The received transfer: the leader's checkpoint files, verified and synced.
    let transfer = dir.join("incoming").join("t1");
    std::fs::create_dir(&transfer).unwrap();
    for (name, _) in data_files(&snapshot.snapshot.dir).unwrap() {
        std::fs::copy(snapshot.snapshot.dir.join(&name), transfer.join(&name)).unwrap();
    }
    member.install_snapshot(&snapshot.meta, SnapshotData { dir: transfer }).await.unwrap();
}

#[tokio::test]
#[ignore = "a child process of a_crash_after_any_step_of_an_install_leaves_the_old_state_or_the_new_one"]
async fn child_installs_a_snapshot_then_crashes() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let crash_after = std::env::var(CRASH_ENV)
        .ok()
        .map(|s| *InstallStep::ALL.iter().find(|step| format!("{step:?}") == s).expect("a known step"));
    install_and_crash(Path::new(&dir), crash_after).await;
}

fn run_child(dir: &Path, crash_after: Option<InstallStep>) -> std::process::ExitStatus {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_installs_a_snapshot_then_crashes", "--exact", "--ignored", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .stdout(std::process::Stdio::null());
    if let Some(step) = crash_after {
        cmd.env(CRASH_ENV, format!("{step:?}"));
    }
    cmd.status().unwrap()
}

/// Restarts the member in `dir` as the datanode does: the state machine, then openraft's
/// startup on it (which installs the newest snapshot if it is ahead of the state machine).
async fn restart(dir: &Path) -> (Raft, Arc<SmShared>) {
    let sm = StateMachine::open(dir, EngineOptions::default()).unwrap();
    let shared = sm.shared();
    let log = LogStore::open(&dir.join("raft")).unwrap();
    let secret = nimbus_net::ClusterSecret::parse("snapshot-install-test-secret-0123456789").unwrap();
    let config = Arc::new(openraft::Config::default().validate().unwrap());
    let raft = Raft::new(
        1,
        config,
        Network::new(Duration::from_secs(1), 64 << 20, Arc::new(ReplicaClock::new(0)), &secret),
        log,
        sm,
    )
    .await
    .unwrap();
    (raft, shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_step_of_an_install_leaves_the_old_state_or_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let old = ((0..OLD).collect::<Vec<_>>(), Some(OLD));
    let new = ((0..NEW).collect::<Vec<_>>(), Some(NEW));
    let cases: Vec<Option<InstallStep>> = InstallStep::ALL.iter().copied().map(Some).chain([None]).collect();
    for crash_after in cases {
        let dir: PathBuf = tmp.path().join(format!("{crash_after:?}"));
        let status = run_child(&dir, crash_after);
        match crash_after {
            Some(step) => assert_eq!(status.signal(), Some(6), "the child did not abort after {step:?}: {status}"),
            None => assert!(status.success(), "the child failed: {status}"),
        }

        // What is on disk, before Raft looks at it: one whole state, nothing half-made.
        {
            let sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
            let on_disk = state(&sm.shared());
            let expected = match crash_after {
                Some(InstallStep::Staged | InstallStep::Opened | InstallStep::Published) => &old,
                Some(InstallStep::Switched) | None => &new,
            };
            assert_eq!(&on_disk, expected, "after a crash after {crash_after:?}");
            let sm_dir = names(&dir.join("sm"));
            assert_eq!(sm_dir.iter().filter(|n| !n.starts_with("CURRENT")).count(), 1, "generations: {sm_dir:?}");
            assert_eq!(names(&dir.join("incoming")), Vec::<String>::new(), "a transfer was left behind");
            let snapshots = names(&dir.join("snapshots"));
            assert!(!snapshots.iter().any(|n| n.starts_with("tmp-")), "a half-made snapshot: {snapshots:?}");
        }

        // The member restarted: once the new snapshot is its own (published), openraft
        // brings the state machine up to it; before that, it keeps the old state and its
        // log, and the leader sends the snapshot again.
        let (raft, sm) = restart(&dir).await;
        let expected = match crash_after {
            Some(InstallStep::Staged | InstallStep::Opened) => &old,
            _ => &new,
        };
        assert_eq!(&state(&sm), expected, "after a restart from a crash after {crash_after:?}");
        let current = sm.snapshots().current().unwrap().expect("a snapshot").0;
        assert_eq!(current.last_log_id.map(|l| l.index()), expected.1, "the member's newest snapshot");
        raft.shutdown().await.unwrap();
    }
}

#[test]
fn leftovers_of_an_interrupted_transfer_and_install_are_removed_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    drop(StateMachine::open(dir, EngineOptions::default()).unwrap());
    // A transfer cut off mid-file, a generation staged but never switched to, a snapshot
    // never published, and the temporary file of a switch.
    std::fs::create_dir_all(dir.join("incoming/abc")).unwrap();
    std::fs::write(dir.join("incoming/abc/000012.sst"), vec![1u8; 4096]).unwrap();
    std::fs::create_dir_all(dir.join("sm/1")).unwrap();
    std::fs::write(dir.join("sm/1/000012.sst"), vec![1u8; 4096]).unwrap();
    std::fs::write(dir.join("sm/CURRENT.tmp"), "1").unwrap();
    std::fs::create_dir_all(dir.join("snapshots/tmp-abc")).unwrap();

    let sm = StateMachine::open(dir, EngineOptions::default()).unwrap();
    assert_eq!(names(&dir.join("incoming")), Vec::<String>::new());
    assert_eq!(names(&dir.join("sm")), vec!["0".to_owned()]);
    assert_eq!(names(&dir.join("snapshots")), Vec::<String>::new());
    assert_eq!(state(&sm.shared()), (vec![], None));
}

/// A snapshot is built beside the applying (its memtable flush no longer pauses every write
/// of the replica set): whatever entries are applied meanwhile, the checkpoint holds exactly
/// the entries up to the index its metadata names, no fewer, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_while_entries_are_applied_holds_exactly_the_entries_up_to_its_index() {
    const BEFORE: u64 = 2_000;
    const DURING: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(&dir.path().join("member"), EngineOptions::default()).unwrap();
    apply(&mut sm, 1, BEFORE).await;
    let mut builder = sm.get_snapshot_builder().await;
    let building = tokio::spawn(async move { builder.build_snapshot().await });
    // One entry at a time, as a busy leader applies them, until the snapshot is done.
    let mut next = BEFORE + 1;
    while !building.is_finished() && next <= BEFORE + DURING {
        apply(&mut sm, next, next).await;
        next += 1;
    }
    let snapshot = building.await.unwrap().unwrap();
    let at = snapshot.meta.last_log_id.expect("a snapshot of applied entries").index();
    assert!((BEFORE..next).contains(&at), "snapshot at {at}, entries applied up to {}", next - 1);

    // The checkpoint, opened as a member restoring it would: documents 0..at, applied at.
    let restored = dir.path().join("restored");
    nimbus_datanode::raft::snapshot::materialize(&snapshot.snapshot.dir, &restored).unwrap();
    let engine = nimbus_datanode::store::Engine::open(&restored, EngineOptions::default()).unwrap();
    let applied: Option<openraft::type_config::alias::LogIdOf<TypeConfig>> =
        engine.get_meta(nimbus_datanode::store::keys::META_APPLIED).unwrap();
    assert_eq!(applied.map(|l| l.index()), Some(at), "the checkpoint's applied index");
    let present: Vec<u64> = (0..next).filter(|id| engine.get("app", "items", &json!(id)).unwrap().is_some()).collect();
    assert_eq!(present, (0..at).collect::<Vec<u64>>(), "the checkpoint's documents");
}

/// A build that fails (a full disk, say) is not openraft's failure, which would stop Raft
/// on the member for good: the newest snapshot there is stands; with none at all, the
/// failure is reported.
#[tokio::test]
async fn a_failed_snapshot_build_answers_the_newest_snapshot_there_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(&dir.path().join("member"), EngineOptions::default()).unwrap();
    apply(&mut sm, 1, OLD).await;
    let shared = sm.shared();
    shared.fail_builds_for_tests(true);
    assert!(sm.get_snapshot_builder().await.build_snapshot().await.is_err(), "no snapshot to fall back on");

    shared.fail_builds_for_tests(false);
    let first = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    apply(&mut sm, OLD + 1, NEW).await;
    shared.fail_builds_for_tests(true);
    let answered = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(answered.meta, first.meta, "the newest snapshot, as it was");
    assert_eq!(answered.snapshot, first.snapshot);
}

/// How many names each table file of the live state has: 1 when no snapshot holds it.
fn table_file_links(sm: &SmShared, dir: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    sm.engine().flush().unwrap();
    let live = dir.join("sm").join("0");
    let tables: Vec<u64> = std::fs::read_dir(&live)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sst"))
        .map(|e| e.metadata().unwrap().nlink())
        .collect();
    assert!(!tables.is_empty(), "no table files in {}", live.display());
    tables
}

/// A build that fails once its checkpoint is made (the disk filling up as the metadata is
/// written, say) removes that checkpoint: its hard links would otherwise keep table files,
/// compacted away since, on a disk that is full already, one more at each failed build.
#[tokio::test]
async fn a_failed_snapshot_build_leaves_no_checkpoint_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("member");
    let mut sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
    apply(&mut sm, 1, OLD).await;
    let shared = sm.shared();
    shared.fail_builds_for_tests(true);
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap_err();
    assert_eq!(names(&dir.join("snapshots")), Vec::<String>::new(), "what the failed build left");
    assert!(table_file_links(&shared, &dir).iter().all(|&n| n == 1), "a table file still linked elsewhere");

    // With a snapshot to fall back on: only that one stays.
    shared.fail_builds_for_tests(false);
    let first = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let first_name = first.snapshot.dir.file_name().unwrap().to_string_lossy().into_owned();
    apply(&mut sm, OLD + 1, NEW).await;
    shared.fail_builds_for_tests(true);
    let answered = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(answered.snapshot, first.snapshot);
    assert_eq!(names(&dir.join("snapshots")), vec![first_name], "what the failed build left");
}

/// Makes a checkpoint of the live state where a build would, as a build that has not been
/// published yet leaves it: with metadata (`meta_from`'s) when `meta_from` is given.
fn unfinished_build(sm: &SmShared, meta_from: Option<&Path>) -> PathBuf {
    let tmp = sm.snapshots().temp_dir();
    sm.engine().checkpoint(&tmp).unwrap();
    if let Some(from) = meta_from {
        std::fs::copy(from.join(META_FILE), tmp.join(META_FILE)).unwrap();
    }
    tmp
}

/// A process killed mid-build leaves the build's checkpoint under its temporary name; the
/// next start removes it (with or without its metadata) and keeps the published snapshot.
#[tokio::test]
async fn a_snapshot_build_cut_off_by_a_crash_is_removed_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("member");
    let mut sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
    apply(&mut sm, 1, OLD).await;
    let published = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let published_name = published.snapshot.dir.file_name().unwrap().to_string_lossy().into_owned();
    apply(&mut sm, OLD + 1, NEW).await;
    let shared = sm.shared();
    let cut_off = [unfinished_build(&shared, None), unfinished_build(&shared, Some(&published.snapshot.dir))];
    drop((sm, shared));
    assert!(cut_off.iter().all(|d| d.is_dir()));

    let sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
    assert_eq!(names(&dir.join("snapshots")), vec![published_name], "after the restart");
    let shared = sm.shared();
    assert_eq!(shared.snapshots().current().unwrap().map(|(meta, _)| meta), Some(published.meta));
    assert!(table_file_links(&shared, &dir).iter().all(|&n| n <= 2), "a table file linked by a leftover checkpoint");
    assert_eq!(state(&shared), ((0..NEW).collect(), Some(NEW)));
}

/// A build or an adoption in progress (here, one whose metadata is written and which is
/// about to be renamed) is not a snapshot yet: the newest snapshot is not it, and pruning
/// the old ones leaves it be.
#[tokio::test]
async fn a_snapshot_in_the_making_is_neither_answered_nor_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("member");
    let mut sm = StateMachine::open(&dir, EngineOptions::default()).unwrap();
    apply(&mut sm, 1, 1).await;
    let first = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let shared = sm.shared();
    let in_making = unfinished_build(&shared, Some(&first.snapshot.dir));
    let mut built = Vec::new();
    for i in 2..=4 {
        apply(&mut sm, i, i).await;
        built.push(sm.get_snapshot_builder().await.build_snapshot().await.unwrap());
    }
    let newest = built.last().unwrap();
    assert_eq!(shared.snapshots().current().unwrap().map(|(meta, _)| meta), Some(newest.meta.clone()));
    let mut expected: Vec<String> = built[1..]
        .iter()
        .map(|s| &s.snapshot.dir)
        .chain([&in_making])
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    expected.sort();
    assert_eq!(names(&dir.join("snapshots")), expected, "the two newest, and the one in the making");
}
