//! The storage engine driven directly (no Raft): retention of the oplog and of
//! idempotency records, and the catalog surviving a reopen.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::{Command, Engine, WriteAnswer, WriteOp, WriteResult};
use serde_json::json;

fn apply(engine: &Engine, index: u64, ts_ms: u64, key: Option<&str>, op: WriteOp) -> WriteResult {
    let cmd = Command {
        db: "d".into(),
        op,
        idempotency_key: key.map(str::to_owned),
        ts_ms,
        route_epoch: None,
        request_hash: None,
    };
    let mut batch = rocksdb::WriteBatch::default();
    let (result, delta) = engine.apply_command(&mut batch, &cmd, index).unwrap();
    engine.commit_for_tests(batch, delta);
    result
}

fn insert(id: u64) -> WriteOp {
    WriteOp::Insert { coll: "c".into(), docs: vec![serde_json::value::to_raw_value(&json!({"_id": id})).unwrap()] }
}

#[test]
fn oplog_entries_older_than_the_retention_are_removed_but_never_the_last_ones() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions { oplog_retention: Duration::from_secs(60), ..Default::default() };
    let engine = Engine::open(dir.path(), options).unwrap();
    // Writes at t = 0 s, then at t = 120 s: the garbage collection that runs every 1024
    // entries finds the old ones past the 60 s retention, and removes those not among the
    // last 4096 log entries.
    for i in 1..5120 {
        apply(&engine, i, 0, None, insert(i)).unwrap();
    }
    assert_eq!(engine.oplog_first_index().unwrap(), Some(1));
    apply(&engine, 5120, 120_000, None, insert(5120)).unwrap();
    assert_eq!(engine.oplog_first_index().unwrap(), Some(1024));
    let entries = engine.read_oplog(0, 2).unwrap();
    assert_eq!(entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1024, 1025]);
    // The documents themselves are untouched.
    assert_eq!(engine.list_collections("d")[0].documents, 5120);
}

#[test]
fn a_clock_far_ahead_cannot_empty_the_oplog() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions { oplog_retention: Duration::from_secs(60), ..Default::default() };
    let engine = Engine::open(dir.path(), options).unwrap();
    let now = 1_800_000_000_000u64;
    for i in 1..2048 {
        apply(&engine, i, now, None, insert(i)).unwrap();
    }
    // A leader ten days ahead proposes the entry at which garbage is collected.
    apply(&engine, 2048, now + 10 * 86_400_000, None, insert(2048)).unwrap();
    assert_eq!(engine.oplog_first_index().unwrap(), Some(1), "the recent oplog was deleted");
}

#[test]
fn the_replica_sets_clock_never_goes_backwards_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ts_of = |engine: &Engine, index: u64| engine.read_oplog(index, 1).unwrap()[0].ts_ms;
    {
        let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        apply(&engine, 1, 1_000_000, None, insert(1)).unwrap();
        // A leader whose clock is ten minutes behind: its commands apply at the replica
        // set's time, so the oplog stays in order.
        apply(&engine, 2, 1_000_000 - 600_000, None, insert(2)).unwrap();
        assert_eq!(ts_of(&engine, 2), 1_000_000);
        assert_eq!(engine.clock_ms(), 1_000_000);
    }
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    assert_eq!(engine.clock_ms(), 1_000_000);
    apply(&engine, 4, 5, None, insert(4)).unwrap();
    assert_eq!(ts_of(&engine, 4), 1_000_000);
    apply(&engine, 5, 1_000_500, None, insert(5)).unwrap();
    assert_eq!(ts_of(&engine, 5), 1_000_500);
}

#[test]
fn an_idempotency_key_answers_the_same_for_ten_minutes_then_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    let first = apply(&engine, 1, 1_000, Some("k"), insert(1)).unwrap();
    assert_eq!(first, WriteAnswer::Inserted { ids: vec![json!(1)] });
    // A retry a minute later: same answer, nothing applied (no DuplicateKey).
    assert_eq!(apply(&engine, 2, 61_000, Some("k"), insert(1)).unwrap(), first);
    assert_eq!(engine.list_collections("d")[0].documents, 1);
    // After ten minutes the key is forgotten: the same insert now meets the document.
    let later = apply(&engine, 3, 1_000 + 600_000, Some("k"), insert(1));
    assert_eq!(later.unwrap_err().code, nimbus_api::ErrorCode::DuplicateKey);
}

#[test]
fn the_catalog_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        apply(&engine, 1, 0, None, insert(1)).unwrap();
        let spec = nimbus_datanode::store::catalog::IndexSpec::from_request(&json!({"x": -1}), true, None).unwrap();
        apply(&engine, 2, 0, None, WriteOp::CreateIndex { coll: "c".into(), spec }).unwrap();
    }
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    assert_eq!(engine.list_collections("d")[0].documents, 1);
    let indexes = engine.list_indexes("d", "c").unwrap();
    assert_eq!(indexes[0].name, "x_-1");
    assert!(indexes[0].unique);
}

/// One entry stamped a day ahead moves the replica set's clock for good (it never goes
/// back), but idempotency windows go by each command's own time: a retry a minute after its
/// write is still answered from the record, not applied again.
#[test]
fn one_entry_from_the_future_does_not_expire_idempotency_keys() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    let t = 1_800_000_000_000u64;
    let first = apply(&engine, 1, t, Some("k"), insert(1)).unwrap();
    apply(&engine, 2, t + 86_400_000, None, insert(2)).unwrap();
    assert_eq!(engine.clock_ms(), t + 86_400_000);
    assert_eq!(apply(&engine, 3, t + 60_000, Some("k"), insert(1)).unwrap(), first);
    assert_eq!(engine.list_collections("d")[0].documents, 2);
}
