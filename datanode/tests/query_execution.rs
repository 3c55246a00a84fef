//! The engine's execution of queries and writes, driven directly (no Raft): index builds in
//! bounded steps, `_id` as an access path, the bounds on a query's work, and reads that see
//! one moment while indexes come and go.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nimbus_api::ErrorCode;
use nimbus_api::data::FindRequest;
use nimbus_datanode::store::catalog::IndexSpec;
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::index::BUILD_STEP_DOCS;
use nimbus_datanode::store::read::{FindQuery, QueryError};
use nimbus_datanode::store::{Command, Engine, WriteAnswer, WriteOp, WriteResult};
use serde_json::{Value, json};

static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);

fn apply(engine: &Engine, op: WriteOp) -> WriteResult {
    let cmd = Command { db: "d".into(), op, idempotency_key: None, ts_ms: 1, route_epoch: None, request_hash: None };
    let mut batch = rocksdb::WriteBatch::default();
    let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
    let (result, delta) = engine.apply_command(&mut batch, &cmd, index).expect("apply");
    engine.commit_for_tests(batch, delta);
    result
}

fn insert(engine: &Engine, docs: impl IntoIterator<Item = Value>) {
    let docs: Vec<_> = docs.into_iter().map(|d| serde_json::value::to_raw_value(&d).unwrap()).collect();
    for chunk in docs.chunks(500) {
        apply(engine, WriteOp::Insert { coll: "c".into(), docs: chunk.to_vec() }).expect("insert");
    }
}

/// A find without sort (so the plan is the filter's), its answer in `_id` order.
fn find(engine: &Engine, filter: Value) -> Result<Vec<Value>, QueryError> {
    let req = FindRequest { filter: Some(filter), ..Default::default() };
    let mut docs = engine.find("d", "c", &FindQuery::parse(&req).unwrap())?;
    docs.sort_by_key(|d| d["_id"].as_i64());
    Ok(docs)
}

fn ids(docs: &[Value]) -> Vec<i64> {
    docs.iter().map(|d| d["_id"].as_i64().unwrap()).collect()
}

/// The plan the last query of this shape ran with, and what it examined.
fn last_plan(engine: &Engine, shape_contains: &str) -> (String, u64) {
    let s = engine.stats.snapshot().into_iter().find(|s| s.shape.contains(shape_contains)).expect("shape recorded");
    (s.plan, s.docs_examined / s.count)
}

fn spec(keys: Value, unique: bool) -> IndexSpec {
    IndexSpec::from_request(&keys, unique, None).unwrap()
}

fn open() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    (dir, engine)
}

#[test]
fn an_index_is_built_in_bounded_steps_while_the_collection_serves() {
    let (_dir, engine) = open();
    let n = 3 * BUILD_STEP_DOCS as i64 + 10;
    insert(&engine, (0..n).map(|i| json!({"_id": i, "k": i % 7})));
    let created = apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"k": 1}), false) });
    assert_eq!(created, Ok(WriteAnswer::IndexCreated { name: "k_1".into(), ready: false }));
    let want: Vec<i64> = (0..n).filter(|i| i % 7 == 3).collect();
    // Queries do not use the half-built index, and get every answer.
    assert_eq!(ids(&find(&engine, json!({"k": 3})).unwrap()), want);
    assert_eq!(last_plan(&engine, "k:?").0, "COLLSCAN");
    // The collection takes writes meanwhile: one ahead of the build, one behind it.
    insert(&engine, [json!({"_id": n + 1, "k": 3})]);
    apply(&engine, update(json!({"_id": 3}), json!({"$set": {"k": 4}}), false)).unwrap();
    let mut steps = 0;
    loop {
        steps += 1;
        match apply(&engine, WriteOp::BuildIndex { coll: "c".into(), name: "k_1".into() }).unwrap() {
            WriteAnswer::IndexBuildStep { done: true, failed: None } => break,
            WriteAnswer::IndexBuildStep { done: false, failed: None } => assert!(steps < 10, "the build does not end"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Each step indexes at most BUILD_STEP_DOCS documents.
    assert_eq!(steps, 3);
    assert!(engine.list_indexes("d", "c").unwrap()[0].is_ready());
    let mut want: Vec<i64> = want.into_iter().filter(|i| *i != 3).collect();
    want.push(n + 1);
    assert_eq!(ids(&find(&engine, json!({"k": 3})).unwrap()), want);
    assert_eq!(last_plan(&engine, "k:?").0, "IXSCAN k_1");
    // A step for a ready index does nothing.
    assert_eq!(
        apply(&engine, WriteOp::BuildIndex { coll: "c".into(), name: "k_1".into() }),
        Ok(WriteAnswer::IndexBuildStep { done: true, failed: None })
    );
}

#[test]
fn a_unique_build_meeting_a_duplicate_fails_and_leaves_no_index() {
    let (_dir, engine) = open();
    let n = 2 * BUILD_STEP_DOCS as i64;
    // `u` is unique but for the last document.
    insert(&engine, (0..n).map(|i| json!({"_id": i, "u": if i == n - 1 { 0 } else { i }})));
    let created = apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"u": 1}), true) });
    assert_eq!(created, Ok(WriteAnswer::IndexCreated { name: "u_1".into(), ready: false }));
    let step = apply(&engine, WriteOp::BuildIndex { coll: "c".into(), name: "u_1".into() }).unwrap();
    let WriteAnswer::IndexBuildStep { done: true, failed: Some(why) } = step else { panic!("{step:?}") };
    assert!(why.contains("u_1"), "{why}");
    assert!(engine.list_indexes("d", "c").unwrap().is_empty());
    assert_eq!(engine.catalog_meta("d", "c").unwrap().failed_builds[0].name, "u_1");
    assert_eq!(ids(&find(&engine, json!({"u": 0})).unwrap()), vec![0, n - 1]);
    // On a small collection the build is the create itself, and the duplicate its answer.
    let (_dir2, small) = open();
    insert(&small, [json!({"_id": 1, "u": 1}), json!({"_id": 2, "u": 1})]);
    let refused = apply(&small, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"u": 1}), true) });
    assert_eq!(refused.unwrap_err().code, ErrorCode::DuplicateKey);
    assert!(small.list_indexes("d", "c").unwrap().is_empty());
}

#[test]
fn reads_and_writes_by_id_are_point_lookups() {
    let (_dir, engine) = open();
    insert(&engine, (0..2000).map(|i| json!({"_id": i, "k": i})));
    assert_eq!(ids(&find(&engine, json!({"_id": 1500})).unwrap()), vec![1500]);
    assert_eq!(last_plan(&engine, "_id:?"), ("IXSCAN _id_".into(), 1));
    assert_eq!(ids(&find(&engine, json!({"_id": {"$in": [7, 1999, 5000]}})).unwrap()), vec![7, 1999]);
    assert_eq!(last_plan(&engine, "_id:$in"), ("IXSCAN _id_".into(), 2));
    // Over the write budget as a scan, fine as point lookups: 1,000 ids.
    let batch: Vec<i64> = (0..1000).collect();
    let op = |filter: Value| update(filter, json!({"$inc": {"k": 1}}), true);
    assert_eq!(
        apply(&engine, op(json!({"_id": {"$in": batch}}))),
        Ok(WriteAnswer::Updated { matched: 1000, modified: 1000, upserted_id: None })
    );
    let range = apply(&engine, op(json!({"_id": {"$gte": 1000, "$lt": 1100}})));
    assert_eq!(range, Ok(WriteAnswer::Updated { matched: 100, modified: 100, upserted_id: None }));
}

#[test]
fn work_past_the_bounds_is_refused_and_changes_nothing() {
    let (_dir, engine) = open();
    insert(&engine, (0..1500).map(|i| json!({"_id": i, "k": i % 3})));
    let before = find(&engine, json!({})).unwrap();
    // Writes that would scan 1,500 documents in the apply loop: every match, or a single one
    // that no document holds.
    for op in [
        WriteOp::Delete { coll: "c".into(), filter: json!({"k": 1}), multi: true },
        update(json!({"k": 5}), json!({"$set": {"x": 1}}), false),
    ] {
        let e = apply(&engine, op).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("examines more than 1000 documents"), "{}", e.message);
    }
    assert_eq!(find(&engine, json!({})).unwrap(), before);
    // With an index the same delete examines a third of the collection: within bounds.
    let created =
        apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"k": 1}), false) }).unwrap();
    if let WriteAnswer::IndexCreated { ready: false, .. } = created {
        build(&engine, "k_1");
    }
    assert_eq!(
        apply(&engine, WriteOp::Delete { coll: "c".into(), filter: json!({"k": 1}), multi: true }),
        Ok(WriteAnswer::Deleted { deleted: 500 })
    );
    // Deep skips are refused before anything runs.
    let deep = FindRequest { skip: Some(10_001), ..Default::default() };
    assert_eq!(FindQuery::parse(&deep).unwrap_err().code, ErrorCode::BadRequest);
}

#[test]
fn a_single_update_picks_the_smallest_id_whatever_the_plan() {
    let (_dir, engine) = open();
    apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"k": -1}), false) }).unwrap();
    // In the index's order (k descending) the first match is _id 1; in _id order it is 0.
    insert(&engine, [json!({"_id": 1, "k": 9}), json!({"_id": 0, "k": 5}), json!({"_id": 2, "k": 7})]);
    let op = update(json!({"k": {"$gt": 0}}), json!({"$set": {"hit": true}}), false);
    apply(&engine, op).unwrap();
    assert_eq!(ids(&find(&engine, json!({"hit": true})).unwrap()), vec![0]);
    // The same filter runs on the index, in its order.
    find(&engine, json!({"k": {"$gt": 0}})).unwrap();
    assert_eq!(last_plan(&engine, "k:gt").0, "IXSCAN k_-1");
}

#[test]
fn a_query_racing_index_changes_sees_one_moment() {
    let (_dir, engine) = open();
    let engine = Arc::new(engine);
    // Small enough for an index to be built by its create command.
    insert(&engine, (0..200).map(|i| json!({"_id": i, "k": i % 4})));
    let want: Vec<i64> = (0..200).filter(|i| i % 4 == 1).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (engine, stop, want) = (engine.clone(), stop.clone(), want.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(ids(&find(&engine, json!({"k": 1})).unwrap()), want, "after {reads} reads");
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..300 {
        let created = apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"k": 1}), false) });
        assert_eq!(created, Ok(WriteAnswer::IndexCreated { name: "k_1".into(), ready: true }));
        apply(&engine, WriteOp::DropIndex { coll: "c".into(), name: "k_1".into() }).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("every read saw the whole answer");
    assert!(reads > 0);
}

fn update(filter: Value, update: Value, multi: bool) -> WriteOp {
    WriteOp::Update { coll: "c".into(), filter, update, multi, upsert: false, upsert_id: json!(0), array_filters: None }
}

fn build(engine: &Engine, name: &str) -> WriteAnswer {
    loop {
        let step = apply(engine, WriteOp::BuildIndex { coll: "c".into(), name: name.into() }).unwrap();
        if let WriteAnswer::IndexBuildStep { done: true, .. } = step {
            return step;
        }
    }
}

/// `null` and `[]` make the same index key, but only `[]` makes the index multikey; an index
/// that missed it would give a sort that puts `[]` after `null`.
#[test]
fn an_update_to_an_empty_array_marks_the_index_multikey() {
    let (_dir, engine) = open();
    insert(&engine, [json!({"_id": 1, "a": null}), json!({"_id": 2, "a": null}), json!({"_id": 3, "a": 0})]);
    apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"a": 1}), false) }).unwrap();
    apply(&engine, update(json!({"_id": 2}), json!({"$set": {"a": []}}), false)).unwrap();
    assert!(engine.list_indexes("d", "c").unwrap()[0].multikey);
    let req = FindRequest { sort: Some(json!({"a": 1})), limit: Some(10), ..Default::default() };
    let docs = engine.find("d", "c", &FindQuery::parse(&req).unwrap()).unwrap();
    assert_eq!(ids(&docs), vec![2, 1, 3]);
}

/// A single update through an index on an equality examines each key's first match only
/// (entries of one key come in `_id` order), so an index never makes it exceed the write bound.
#[test]
fn a_single_update_through_an_index_stops_at_the_first_match_of_each_key() {
    let (_dir, engine) = open();
    // 1,200 documents without a match, then 1,500 with one.
    insert(&engine, (0..2700).map(|i| json!({"_id": i, "k": i64::from(i >= 1200)})));
    let single = || update(json!({"k": 1}), json!({"$set": {"hit": true}}), false);
    // Without an index, the scan in `_id` order meets 1,200 non-matches first: refused.
    assert!(apply(&engine, single()).unwrap_err().message.contains("examines more than 1000 documents"));
    apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"k": 1}), false) }).unwrap();
    build(&engine, "k_1");
    // Through the index: 1,500 matches, but the first is the smallest `_id`.
    assert_eq!(apply(&engine, single()), Ok(WriteAnswer::Updated { matched: 1, modified: 1, upserted_id: None }));
    assert_eq!(ids(&find(&engine, json!({"hit": true})).unwrap()), vec![1200]);
}

/// A write's batch is bounded by what it produces, not only by what it examines: setting a
/// large field on many documents is refused, and nothing changes.
#[test]
fn a_write_producing_too_many_bytes_is_refused_and_changes_nothing() {
    let (_dir, engine) = open();
    insert(&engine, (0..200).map(|i| json!({"_id": i})));
    let big = "x".repeat(700 << 10);
    let e = apply(&engine, update(json!({}), json!({"$set": {"s": big}}), true)).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("would produce more than 128 MiB"), "{}", e.message);
    assert_eq!(find(&engine, json!({"s": {"$exists": true}})).unwrap().len(), 0);
    // Half as many documents fit.
    let ok = apply(&engine, update(json!({"_id": {"$lt": 50}}), json!({"$set": {"s": "x".repeat(700 << 10)}}), true));
    assert_eq!(ok, Ok(WriteAnswer::Updated { matched: 50, modified: 50, upserted_id: None }));
}

#[test]
fn count_answers_without_holding_the_documents() {
    let (_dir, engine) = open();
    insert(&engine, (0..3000).map(|i| json!({"_id": i, "k": i % 3})));
    let filter = nimbus_datanode::query::Filter::parse(Some(&json!({"k": 2}))).unwrap();
    assert_eq!(engine.count("d", "c", &filter).unwrap(), 1000);
}

/// A build that fails on something other than a duplicate answers with that error's code.
#[test]
fn a_build_failing_on_too_many_keys_answers_bad_request() {
    let (_dir, engine) = open();
    insert(&engine, [json!({"_id": 1, "a": (0..1001).collect::<Vec<i64>>()})]);
    let e = apply(&engine, WriteOp::CreateIndex { coll: "c".into(), spec: spec(json!({"a": 1}), false) }).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
    assert!(engine.list_indexes("d", "c").unwrap().is_empty());
}
