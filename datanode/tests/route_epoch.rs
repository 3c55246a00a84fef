//! The newest route epoch a write to a database carried, driven directly (no Raft):
//! recorded by the first write of a newer route, never by a refused one, and the bound of a
//! drop (`DropDatabaseUpTo`), so a migration's late clean-up of its source never drops what
//! a newer instance of the same name wrote there. Unlike the route epoch the control plane
//! sets, it refuses no sender.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use nimbus_api::ErrorCode;
use nimbus_api::migration::ImportStep;
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::{Command, Engine, WriteAnswer, WriteOp, WriteResult};
use serde_json::{Value, json};

struct Node {
    engine: Engine,
    index: u64,
}

impl Node {
    fn open(dir: &std::path::Path) -> Node {
        Node { engine: Engine::open(dir, EngineOptions::default()).unwrap(), index: 0 }
    }

    /// Applies `op` on database `d` as the next entry; `epoch` is the sender's route epoch
    /// (a client's command has one, the control plane's none).
    fn apply(&mut self, epoch: Option<u64>, op: WriteOp) -> WriteResult {
        self.index += 1;
        let cmd =
            Command { db: "d".into(), op, idempotency_key: None, ts_ms: 1_000, route_epoch: epoch, request_hash: None };
        let mut batch = rocksdb::WriteBatch::default();
        let (result, delta) = self.engine.apply_command(&mut batch, &cmd, self.index).unwrap();
        self.engine.commit_applied_for_tests(batch, delta, self.index);
        result
    }

    /// The route epoch senders are held to, probed: the lowest epoch not refused as stale.
    fn known_epoch(&self) -> u64 {
        (0..100).find(|e| self.engine.check_route_epoch("d", *e).is_ok()).unwrap()
    }

    /// Whether a drop bounded by `max_epoch` would keep the database, without dropping it:
    /// probed on a copy of the state (a checkpoint), so the node is left as it was.
    fn kept_by(&self, max_epoch: u64) -> Option<u64> {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        self.engine.checkpoint(&copy).unwrap();
        let mut c = Node { engine: Engine::open(&copy, EngineOptions::default()).unwrap(), index: self.index };
        match c.apply(None, WriteOp::DropDatabaseUpTo { max_epoch }).unwrap() {
            WriteAnswer::DatabaseKept { epoch, .. } => Some(epoch),
            WriteAnswer::Dropped { .. } => None,
            other => panic!("a drop answered {other:?}"),
        }
    }

    fn get(&self, id: u64) -> Option<Value> {
        self.engine.get("d", "c", &json!(id)).unwrap()
    }
}

fn insert(id: u64) -> WriteOp {
    WriteOp::Insert { coll: "c".into(), docs: vec![serde_json::value::to_raw_value(&json!({"_id": id})).unwrap()] }
}

#[test]
fn a_write_with_a_newer_route_bounds_a_drop_even_after_a_reopen_and_refuses_no_sender() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut n = Node::open(dir.path());
        n.apply(None, WriteOp::SetRouteEpoch { epoch: 3 }).unwrap();
        n.apply(Some(3), insert(1)).unwrap();
        assert_eq!(n.kept_by(3), None, "a write at the route's epoch is no newer route");
        n.apply(Some(8), insert(2)).unwrap();
        assert_eq!(n.kept_by(7), Some(8));
        assert_eq!(n.kept_by(8), None);
        // Senders are still held to the route epoch the control plane set, not to it.
        assert_eq!(n.known_epoch(), 3);
        n.apply(Some(3), insert(3)).unwrap();
        assert_eq!(n.kept_by(7), Some(8), "an older write lowers nothing");
    }
    let n = Node::open(dir.path());
    assert_eq!(n.kept_by(7), Some(8), "the written epoch was not persisted");
    assert_eq!(n.known_epoch(), 3);
}

#[test]
fn a_refused_command_records_no_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::open(dir.path());
    n.apply(Some(2), insert(1)).unwrap();
    // Refused by the data (a duplicate `_id`): nothing written, nothing recorded.
    let e = n.apply(Some(9), insert(1)).unwrap_err();
    assert_eq!(e.code, ErrorCode::DuplicateKey, "{e:?}");
    assert_eq!(n.kept_by(2), None);
    // Refused because the database is being imported here: the import's `Finish` sets it.
    let dir2 = tempfile::tempdir().unwrap();
    let mut t = Node::open(dir2.path());
    let begin = WriteOp::Import { migration: "m1".into(), step: ImportStep::Begin };
    t.apply(None, begin).unwrap();
    // (A newer route names this replica set already: retry on the members, `NotLeader`.)
    let e = t.apply(Some(9), insert(1)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotLeader, "{e:?}");
    t.apply(None, WriteOp::Import { migration: "m1".into(), step: ImportStep::Finish { epoch: 4 } }).unwrap();
    assert_eq!(t.known_epoch(), 4);
    assert_eq!(t.kept_by(4), None, "the refused write was recorded");
    assert_eq!(t.get(1), None);
}

#[test]
fn a_drop_bounded_below_a_newer_write_keeps_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::open(dir.path());
    // The source fenced at 3 by a migration; then a new instance of the name, placed here
    // at epoch 8, writes; then the migration's clean-up arrives, bounded by its fence.
    n.apply(None, WriteOp::SetRouteEpoch { epoch: 3 }).unwrap();
    n.apply(Some(8), insert(1)).unwrap();
    let answer = n.apply(None, WriteOp::DropDatabaseUpTo { max_epoch: 3 }).unwrap();
    assert_eq!(answer, WriteAnswer::DatabaseKept { found: true, epoch: 8 });
    assert_eq!(n.get(1), Some(json!({"_id": 1})));
    assert_eq!(n.engine.list_collections("d")[0].documents, 1);
}

#[test]
fn a_drop_bounded_at_or_above_the_newest_epoch_drops_and_one_without_a_bound_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::open(dir.path());
    n.apply(None, WriteOp::SetRouteEpoch { epoch: 3 }).unwrap();
    n.apply(Some(3), insert(1)).unwrap();
    assert_eq!(
        n.apply(None, WriteOp::DropDatabaseUpTo { max_epoch: 3 }).unwrap(),
        WriteAnswer::Dropped { found: true }
    );
    assert_eq!(n.get(1), None);
    assert!(n.engine.list_collections("d").is_empty());
    // The route epoch stays: a sender with an older route is still refused.
    assert_eq!(n.known_epoch(), 3);
    // A drop bounded below the route epoch keeps the database too.
    assert_eq!(
        n.apply(None, WriteOp::DropDatabaseUpTo { max_epoch: 2 }).unwrap(),
        WriteAnswer::DatabaseKept { found: false, epoch: 3 }
    );

    n.apply(Some(5), insert(2)).unwrap();
    assert_eq!(
        n.apply(None, WriteOp::DropDatabaseUpTo { max_epoch: 9 }).unwrap(),
        WriteAnswer::Dropped { found: true }
    );
    assert_eq!(n.get(2), None);

    // Without a bound (a client's own `DELETE`, an instance's deletion): whatever the epoch.
    n.apply(Some(7), insert(3)).unwrap();
    assert_eq!(n.apply(None, WriteOp::DropDatabase).unwrap(), WriteAnswer::Dropped { found: true });
    assert_eq!(n.get(3), None);
    // Nothing left: a bounded drop answers not found either way.
    assert_eq!(
        n.apply(None, WriteOp::DropDatabaseUpTo { max_epoch: 7 }).unwrap(),
        WriteAnswer::Dropped { found: false }
    );
    assert_eq!(
        n.apply(None, WriteOp::DropDatabaseUpTo { max_epoch: 1 }).unwrap(),
        WriteAnswer::DatabaseKept { found: false, epoch: 7 }
    );
}

#[test]
fn the_control_planes_old_made_up_epoch_is_not_a_route_and_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::open(dir.path());
    n.apply(Some(3), insert(1)).unwrap();
    // As entries of the control plane's old drop through the data API carried it.
    n.apply(Some(u64::MAX), insert(2)).unwrap();
    assert_eq!(n.kept_by(3), None, "a made-up epoch would keep every later bounded drop");
}
