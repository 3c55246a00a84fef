//! Hot migration's storage side driven directly (no Raft): exports and imports converging
//! on the same checksum, the oplog of one database by position, oplog pins against
//! retention, and the incoming mark.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_api::ErrorCode;
use nimbus_api::admin::OplogEntry;
use nimbus_api::migration::{ExportPart, ExportedDoc, ImportStep, OplogPosition};
use nimbus_datanode::store::catalog::IndexSpec;
use nimbus_datanode::store::engine::EngineOptions;
use nimbus_datanode::store::export::OPLOG_PAGE_BYTES;
use nimbus_datanode::store::read::QueryError;
use nimbus_datanode::store::{Command, Engine, WriteAnswer, WriteOp, WriteResult};
use serde_json::{Value, json};

struct Node {
    engine: Engine,
    index: u64,
    _dir: tempfile::TempDir,
}

impl Node {
    fn new(options: EngineOptions) -> Node {
        let dir = tempfile::tempdir().unwrap();
        Node { engine: Engine::open(dir.path(), options).unwrap(), index: 0, _dir: dir }
    }

    fn apply_at(&mut self, index: u64, ts_ms: u64, db: &str, key: Option<&str>, op: WriteOp) -> WriteResult {
        self.index = index;
        let cmd = Command {
            db: db.into(),
            op,
            idempotency_key: key.map(str::to_owned),
            ts_ms,
            route_epoch: None,
            request_hash: key.map(|_| "h".to_owned()),
        };
        let mut batch = rocksdb::WriteBatch::default();
        let (result, delta) = self.engine.apply_command(&mut batch, &cmd, index).unwrap();
        self.engine.commit_applied_for_tests(batch, delta, index);
        result
    }

    fn apply(&mut self, db: &str, op: WriteOp) -> WriteResult {
        self.apply_at(self.index + 1, 1_000, db, None, op)
    }

    fn import(&mut self, migration: &str, step: ImportStep) -> WriteResult {
        self.apply("d", WriteOp::Import { migration: migration.into(), step })
    }

    fn checksum(&mut self, db: &str) -> Value {
        match self.apply(db, WriteOp::Checksum).unwrap() {
            WriteAnswer::Checksum(at) => {
                let mut v = serde_json::to_value(at).unwrap();
                v.as_object_mut().unwrap().remove("index");
                v
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn insert(coll: &str, docs: Vec<Value>) -> WriteOp {
    WriteOp::Insert {
        coll: coll.into(),
        docs: docs.iter().map(|d| serde_json::value::to_raw_value(d).unwrap()).collect(),
    }
}

fn index(keys: Value, unique: bool) -> IndexSpec {
    IndexSpec::from_request(&keys, unique, None).unwrap()
}

fn update_all(coll: &str, filter: Value, update: Value) -> WriteOp {
    WriteOp::Update {
        coll: coll.into(),
        filter,
        update,
        multi: true,
        upsert: false,
        upsert_id: json!("unused"),
        array_filters: None,
    }
}

/// A source with several collections, nested documents, a unique and a compound index.
fn source() -> Node {
    let mut s = Node::new(EngineOptions::default());
    s.apply("d", WriteOp::CreateIndex { coll: "users".into(), spec: index(json!({"email": 1}), true) }).unwrap();
    s.apply("d", WriteOp::CreateIndex { coll: "users".into(), spec: index(json!({"a.b": 1, "n": -1}), false) })
        .unwrap();
    for i in 0..40 {
        let doc = json!({"_id": i, "email": format!("u{i}@x"), "n": i % 7, "a": {"b": [i, {"c": "deep"}]}});
        s.apply("d", insert("users", vec![doc])).unwrap();
    }
    s.apply("d", insert("orders", vec![json!({"_id": "o1", "items": [{"sku": 1}]}), json!({"_id": "o2"})])).unwrap();
    s.apply("d", WriteOp::CreateCollection { coll: "empty".into() }).unwrap();
    // Another database, whose changes the oplog of `d` leaves out.
    s.apply("other", insert("x", vec![json!({"_id": 1})])).unwrap();
    s
}

/// Exports every page of `d` from `s` into `t` (after `Begin`), `between` running between
/// pages; answers the first page's index.
fn copy(s: &mut Node, t: &mut Node, migration: &str, mut between: impl FnMut(&mut Node)) -> u64 {
    t.import(migration, ImportStep::Begin).unwrap();
    let mut after: Option<String> = None;
    let mut first = None;
    loop {
        let page = s.engine.export_page("d", ExportPart::Documents, after.as_deref(), 300, None).unwrap();
        first.get_or_insert(page.index);
        assert!(!page.docs.is_empty());
        t.import(migration, ImportStep::Collections { collections: page.collections.clone() }).unwrap();
        t.import(migration, ImportStep::Docs { docs: page.docs.clone() }).unwrap();
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
        between(s);
    }
    first.unwrap()
}

/// Replays `d`'s oplog from `s` after `from` into `t`, in pages of `limit`.
fn replay(s: &Node, t: &mut Node, migration: &str, from: OplogPosition, limit: usize) -> Vec<OplogEntry> {
    let mut pos = from;
    let mut all = Vec::new();
    loop {
        let page = s.engine.read_db_oplog("d", pos, limit).unwrap();
        assert!(page.next >= pos);
        if !page.entries.is_empty() {
            t.import(migration, ImportStep::Ops { entries: page.entries.clone() }).unwrap();
        }
        all.extend(page.entries);
        if page.next.index >= page.applied_index {
            return all;
        }
        pos = page.next;
    }
}

#[test]
fn an_export_imported_elsewhere_has_the_same_documents_checksum_and_catalog() {
    let mut s = source();
    let mut t = Node::new(EngineOptions::default());
    copy(&mut s, &mut t, "m1", |_| {});
    t.import("m1", ImportStep::Finish { epoch: 3 }).unwrap();
    assert_eq!(s.checksum("d"), t.checksum("d"));
    assert_ne!(s.checksum("d"), t.checksum("other"), "the other database was not copied");
    // The indexes work on the target: the unique one refuses a duplicate once it serves.
    let dup = t.apply("d", insert("users", vec![json!({"_id": 99, "email": "u1@x"})])).unwrap_err();
    assert_eq!(dup.code, ErrorCode::DuplicateKey);
    assert_eq!(t.engine.list_indexes("d", "users").unwrap().len(), 2);
    assert!(t.engine.incoming_migration("d").is_none());
    // The import wrote no oplog entries on the target but its `Finish`'s mark.
    let oplog = t.engine.read_oplog(0, 10).unwrap();
    assert_eq!(oplog.len(), 1, "{oplog:?}");
    assert!(matches!(&oplog[0].op, nimbus_api::admin::OplogOp::Imported { import } if import == "m1"), "{oplog:?}");
}

#[test]
fn pages_copied_while_the_source_changes_converge_once_the_oplog_is_replayed_even_twice() {
    let mut s = source();
    let mut t = Node::new(EngineOptions::default());
    let mut round = 0;
    let first = copy(&mut s, &mut t, "m1", |s| {
        round += 1;
        // Changes between pages: before and after the cursor, a delete, a new index, a
        // dropped and re-created collection, a multi-update.
        s.apply("d", update_all("users", json!({"n": round % 7}), json!({"$inc": {"v": 1}}))).unwrap();
        s.apply("d", WriteOp::Delete { coll: "users".into(), filter: json!({"_id": 39 - round}), multi: false })
            .unwrap();
        s.apply("d", insert("users", vec![json!({"_id": 100 + round, "email": format!("new{round}")})])).unwrap();
        if round == 2 {
            s.apply("d", WriteOp::DropCollection { coll: "orders".into() }).unwrap();
            s.apply("d", insert("orders", vec![json!({"_id": "o9"})])).unwrap();
            s.apply("d", WriteOp::CreateIndex { coll: "orders".into(), spec: index(json!({"sku": 1}), false) })
                .unwrap();
            s.apply("d", WriteOp::DropIndex { coll: "users".into(), name: "a.b_1_n_-1".into() }).unwrap();
        }
    });
    assert!(round >= 3, "the copy took {round} pages");
    let ops = replay(&s, &mut t, "m1", OplogPosition::end_of(first), 7);
    assert!(!ops.is_empty());
    // Replayed again: the same state (every change is an idempotent after-image).
    t.import("m1", ImportStep::Ops { entries: ops.clone() }).unwrap();
    // Builds the target's new indexes (the leader's builder does this on a replica set).
    for (db, coll, name) in t.engine.building_indexes() {
        loop {
            match t.apply(&db, WriteOp::BuildIndex { coll: coll.clone(), name: name.clone() }).unwrap() {
                WriteAnswer::IndexBuildStep { done: true, failed: None } => break,
                WriteAnswer::IndexBuildStep { done: false, .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(s.checksum("d"), t.checksum("d"));
    let verified = t.engine.verify_checksum("d").unwrap();
    assert!(verified.mismatched.is_empty() && verified.recorded == verified.scanned, "{verified:?}");
}

#[test]
fn a_page_of_the_oplog_stops_inside_a_multi_update_and_the_next_continues_there() {
    let mut s = Node::new(EngineOptions::default());
    s.apply("d", insert("c", (0..25).map(|i| json!({"_id": i, "v": 0})).collect())).unwrap();
    s.apply("other", insert("c", vec![json!({"_id": 1})])).unwrap();
    let before = s.index;
    s.apply("d", update_all("c", json!({}), json!({"$set": {"v": 1}}))).unwrap();
    let multi = s.index;
    let mut pos = OplogPosition::end_of(before);
    let mut seen = Vec::new();
    loop {
        let page = s.engine.read_db_oplog("d", pos, 10).unwrap();
        assert!(page.entries.len() <= 10);
        seen.extend(page.entries.iter().map(|e| (e.index, e.seq)));
        if page.next == pos {
            break;
        }
        pos = page.next;
    }
    let expected: Vec<(u64, u32)> = (0..25).map(|s| (multi, s)).collect();
    assert_eq!(seen, expected, "every change of the multi-update exactly once, in order");
    assert_eq!(pos, OplogPosition::end_of(multi));
}

#[test]
fn a_page_of_a_quiet_database_among_busy_ones_still_moves_on() {
    let mut s = Node::new(EngineOptions::default());
    for i in 0..100 {
        s.apply("busy", insert("c", vec![json!({"_id": i})])).unwrap();
    }
    let page = s.engine.read_db_oplog("quiet", OplogPosition::default(), 2).unwrap();
    assert!(page.entries.is_empty());
    // The first insert made two changes (the collection, the document): 20 entries scanned.
    assert_eq!(page.next, OplogPosition { index: 19, seq: 0 }, "a page scans ten entries per change asked for");
    let page = s.engine.read_db_oplog("quiet", OplogPosition::end_of(95), 2).unwrap();
    assert_eq!(page.next, OplogPosition::end_of(page.applied_index), "the end reached: caught up");
}

/// Writes at time 0 up to index 5119, then one at 120 s: the garbage collection at 5120
/// finds the old entries past a 60 s retention.
fn aged(pin: Option<(u64, u64)>) -> Node {
    let options = EngineOptions { oplog_retention: Duration::from_secs(60), ..Default::default() };
    let mut s = Node::new(options);
    for i in 1..5120 {
        if i == 2
            && let Some((from, expires)) = pin
        {
            s.apply_at(i, 0, "", None, WriteOp::PinOplog { name: "m1".into(), from_index: from, expires_ms: expires })
                .unwrap();
            continue;
        }
        s.apply_at(i, 0, "d", None, insert("c", vec![json!({"_id": i})])).unwrap();
    }
    s.apply_at(5120, 120_000, "d", None, insert("c", vec![json!({"_id": 5120})])).unwrap();
    s
}

#[test]
fn a_position_retention_removed_is_refused_as_truncated() {
    let s = aged(None);
    assert_eq!(s.engine.oplog_first_index().unwrap(), Some(1024));
    match s.engine.read_db_oplog("d", OplogPosition { index: 500, seq: 0 }, 10) {
        Err(QueryError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::OplogTruncated);
            assert_eq!(e.code.status(), 410);
            assert!(e.message.contains("start again from an export"), "{}", e.message);
        }
        other => panic!("expected OplogTruncated, got {other:?}"),
    }
    let page = s.engine.read_db_oplog("d", OplogPosition::end_of(1023), 10).unwrap();
    assert_eq!(page.entries[0].index, 1024);
}

#[test]
fn a_pin_holds_the_oplog_against_retention_until_it_expires_or_is_removed() {
    let s = aged(Some((100, u64::MAX)));
    assert_eq!(s.engine.oplog_first_index().unwrap(), Some(100), "the pin kept the oplog from its index");
    let page = s.engine.read_db_oplog("d", OplogPosition::end_of(99), 10).unwrap();
    assert_eq!(page.entries[0].index, 100);
    // An expired pin holds nothing, and the collection removes it.
    let s = aged(Some((100, 60_000)));
    assert_eq!(s.engine.oplog_first_index().unwrap(), Some(1024));
    assert!(s.engine.oplog_pins().unwrap().is_empty());
    // Unpinned, the next collection removes what the pin held.
    let mut s = aged(Some((100, u64::MAX)));
    s.apply_at(5121, 120_000, "", None, WriteOp::UnpinOplog { name: "m1".into() }).unwrap();
    for i in 5122..=6144 {
        s.apply_at(i, 120_000, "d", None, insert("c", vec![json!({"_id": i})])).unwrap();
    }
    assert_eq!(s.engine.oplog_first_index().unwrap(), Some(2048));
    // A pin from a position retention already removed cannot be kept.
    let e = s
        .apply_at(6145, 120_000, "", None, WriteOp::PinOplog { name: "m2".into(), from_index: 5, expires_ms: u64::MAX })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OplogTruncated);
}

#[test]
fn only_the_migration_that_began_may_import_and_finish_and_abort_answer_again() {
    let mut t = Node::new(EngineOptions::default());
    let docs = ImportStep::Docs {
        docs: vec![nimbus_api::migration::ExportedDoc {
            coll: "c".into(),
            doc: serde_json::value::to_raw_value(&json!({"_id": 1})).unwrap(),
        }],
    };
    let e = t.import("m1", docs.clone()).unwrap_err();
    assert!(e.message.contains("send Begin first"), "{}", e.message);
    assert!(t.engine.list_collections("d").is_empty());
    t.import("m1", ImportStep::Begin).unwrap();
    assert_eq!(t.engine.check_route_epoch("d", 0).unwrap_err().code, ErrorCode::StaleRoute);
    // A route newer than any epoch applied here names this replica set already (switched,
    // `Finish` not applied on this member yet): try the members again, not a newer route.
    assert_eq!(t.engine.check_route_epoch("d", 4).unwrap_err().code, ErrorCode::NotLeader);
    assert!(t.import("m2", docs.clone()).unwrap_err().message.contains("incoming for migration m1"));
    t.import("m1", docs.clone()).unwrap();
    t.import("m1", ImportStep::Finish { epoch: 4 }).unwrap();
    t.import("m1", ImportStep::Finish { epoch: 4 }).unwrap();
    t.engine.check_route_epoch("d", 4).unwrap();
    assert_eq!(t.engine.check_route_epoch("d", 3).unwrap_err().code, ErrorCode::StaleRoute);
    assert!(t.import("m1", ImportStep::Abort).unwrap_err().message.contains("cannot be aborted"));
    assert_eq!(t.engine.list_collections("d")[0].documents, 1);
    // The database is served here now: a second migration's Begin may not drop it.
    let e = t.import("m2", ImportStep::Begin).unwrap_err();
    assert!(e.message.contains("database d is served by this replica set"), "{}", e.message);
    // Once it is dropped (a migration away from here cleaned it up), a second migration
    // begins, then aborts: its data and mark are gone, twice over.
    t.apply("d", WriteOp::DropDatabase).unwrap();
    t.import("m2", ImportStep::Begin).unwrap();
    t.import("m2", docs).unwrap();
    t.import("m2", ImportStep::Abort).unwrap();
    t.import("m2", ImportStep::Abort).unwrap();
    assert!(t.engine.list_collections("d").is_empty());
    assert!(t.engine.incoming_migration("d").is_none());
    t.engine.check_route_epoch("d", 4).unwrap();
}

#[test]
fn an_incoming_mark_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut n = Node {
            engine: Engine::open(dir.path(), EngineOptions::default()).unwrap(),
            index: 0,
            _dir: tempfile::tempdir().unwrap(),
        };
        n.import("m1", ImportStep::Begin).unwrap();
    }
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    assert_eq!(engine.incoming_migration("d").as_deref(), Some("m1"));
}

#[test]
fn an_idempotency_record_moved_answers_the_retry_without_applying_it_twice() {
    let mut s = Node::new(EngineOptions::default());
    s.apply("d", insert("c", vec![json!({"_id": 1, "v": 0})])).unwrap();
    let inc = || update_all("c", json!({"_id": 1}), json!({"$inc": {"v": 1}}));
    let first = s.apply_at(2, 1_000, "d", Some("k1"), inc()).unwrap();
    let mut t = Node::new(EngineOptions::default());
    copy(&mut s, &mut t, "m1", |_| {});
    let page = s.engine.export_page("d", ExportPart::Idempotency, None, 1 << 20, None).unwrap();
    assert_eq!(page.idempotency.len(), 1);
    t.import("m1", ImportStep::Idempotency { records: page.idempotency }).unwrap();
    t.import("m1", ImportStep::Finish { epoch: 1 }).unwrap();
    let retry = t.apply_at(t.index + 1, 2_000, "d", Some("k1"), inc()).unwrap();
    assert_eq!(retry, first);
    assert_eq!(t.engine.get("d", "c", &json!(1)).unwrap().unwrap()["v"], 1);
}

#[test]
fn every_page_carries_the_clock_and_since_ms_reads_only_the_records_written_after_a_copy() {
    let mut s = Node::new(EngineOptions::default());
    s.apply_at(1, 1_000, "d", None, insert("c", vec![json!({"_id": 0, "v": 0})])).unwrap();
    let inc = || update_all("c", json!({"_id": 0}), json!({"$inc": {"v": 1}}));
    for (i, key) in ["k1", "k2", "k3"].iter().enumerate() {
        s.apply_at(2 + i as u64, 2_000 + 1_000 * i as u64, "d", Some(key), inc()).unwrap();
    }
    s.apply_at(5, 4_500, "d", None, inc()).unwrap();
    let docs = s.engine.export_page("d", ExportPart::Documents, None, 1 << 20, None).unwrap();
    assert_eq!(docs.clock_ms, 4_500, "the replica set's clock of the page's snapshot");
    // The full copy before the hold: the three records, and the clock to continue from.
    let full = s.engine.export_page("d", ExportPart::Idempotency, None, 1 << 20, None).unwrap();
    assert_eq!(full.idempotency.len(), 3);
    assert_eq!(full.clock_ms, 4_500);
    // Written after it: two records of `d` (one at the clock's very time), one of another
    // database.
    s.apply_at(6, 4_500, "d", Some("k4"), inc()).unwrap();
    s.apply_at(7, 6_000, "other", Some("k5"), insert("c", vec![json!({"_id": 1})])).unwrap();
    s.apply_at(8, 7_000, "d", Some("k6"), inc()).unwrap();
    // Read one record per page: time order, each once, only these, the older ones unread.
    let mut after: Option<String> = None;
    let mut found = Vec::new();
    loop {
        let page =
            s.engine.export_page("d", ExportPart::Idempotency, after.as_deref(), 1, Some(full.clock_ms)).unwrap();
        assert_eq!(page.clock_ms, 7_000);
        assert!(page.idempotency.len() <= 1, "one record per page at max_bytes 1");
        found.extend(page.idempotency.iter().map(|r| (r.key.clone(), r.ts_ms)));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(found, vec![("k4".to_owned(), 4_500), ("k6".to_owned(), 7_000)]);
    // Nothing written since the last record: nothing to read.
    let page = s.engine.export_page("d", ExportPart::Idempotency, None, 1 << 20, Some(7_001)).unwrap();
    assert!(page.idempotency.is_empty() && page.next.is_none());
    // A cursor of another database is refused.
    let other = s.engine.export_page("other", ExportPart::Idempotency, None, 1, Some(0)).unwrap();
    assert_eq!(other.idempotency.len(), 1);
    match s.engine.export_page("d", ExportPart::Idempotency, Some(&hex_key(7_000, "other\0k5")), 1, Some(0)) {
        Err(QueryError::Refused(e)) => assert!(e.message.contains("cursor"), "{}", e.message),
        other => panic!("expected a refused cursor, got {other:?}"),
    }
}

#[test]
fn a_record_stamped_before_the_clock_by_a_slow_leader_is_still_read_from_the_clock_on() {
    let mut s = Node::new(EngineOptions::default());
    s.apply_at(1, 5_000, "d", None, insert("c", vec![json!({"_id": 0, "v": 0})])).unwrap();
    let full = s.engine.export_page("d", ExportPart::Idempotency, None, 1 << 20, None).unwrap();
    assert_eq!(full.clock_ms, 5_000);
    // A new leader whose clock is behind proposes at 3,000: applied at the replica set's
    // clock, so a pass from the clock on finds it (and the copy never misses it).
    let inc = || update_all("c", json!({"_id": 0}), json!({"$inc": {"v": 1}}));
    s.apply_at(2, 3_000, "d", Some("late"), inc()).unwrap();
    let page = s.engine.export_page("d", ExportPart::Idempotency, None, 1 << 20, Some(full.clock_ms)).unwrap();
    let found: Vec<(String, u64)> = page.idempotency.iter().map(|r| (r.key.clone(), r.ts_ms)).collect();
    assert_eq!(found, vec![("late".to_owned(), 5_000)]);
    // Its window still counts from its own time: the record says 3,000.
    let record: serde_json::Value = serde_json::from_str(page.idempotency[0].record.get()).unwrap();
    assert_eq!(record["ts_ms"].as_u64(), Some(3_000), "{record}");
}

/// An `idem_ttl` key, hex: the time then the record's key.
fn hex_key(ts_ms: u64, idem_key: &str) -> String {
    let mut k = ts_ms.to_be_bytes().to_vec();
    k.extend_from_slice(idem_key.as_bytes());
    k.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_multi_update_of_large_documents_is_split_across_oplog_pages_by_bytes() {
    let mut s = Node::new(EngineOptions::default());
    let big = "x".repeat(200_000);
    for i in 0..12 {
        s.apply("d", insert("c", vec![json!({"_id": i, "big": big})])).unwrap();
    }
    let before = s.index;
    s.apply("d", update_all("c", json!({}), json!({"$set": {"v": 1}}))).unwrap();
    let multi = s.index;
    let mut pos = OplogPosition::end_of(before);
    let (mut seen, mut pages) = (Vec::new(), 0);
    loop {
        let page = s.engine.read_db_oplog("d", pos, 1000).unwrap();
        if page.entries.is_empty() {
            break;
        }
        pages += 1;
        let bytes: usize = page.entries.iter().map(|e| serde_json::to_vec(e).unwrap().len()).sum();
        assert!(bytes <= OPLOG_PAGE_BYTES, "a page of {bytes} bytes");
        let last = page.entries.last().unwrap();
        if page.next != OplogPosition::end_of(page.applied_index) {
            assert_eq!(page.next, OplogPosition { index: last.index, seq: last.seq }, "next is the last change");
        }
        seen.extend(page.entries.iter().map(|e| (e.index, e.seq)));
        pos = page.next;
    }
    assert!(pages >= 3, "12 changes of 200 kB in {pages} pages");
    let expected: Vec<(u64, u32)> = (0..12).map(|s| (multi, s)).collect();
    assert_eq!(seen, expected, "every change of the multi-update exactly once, in order");
}

#[test]
fn a_copy_still_building_an_index_its_source_has_ready_does_not_verify_equal() {
    let mut s = Node::new(EngineOptions::default());
    // More documents than one build step indexes: the target's build takes two steps.
    s.apply("d", insert("c", (0..300).map(|i| json!({"_id": i, "v": [i, i + 1]})).collect())).unwrap();
    s.apply("d", WriteOp::CreateIndex { coll: "c".into(), spec: index(json!({"v": 1}), false) }).unwrap();
    build_all(&mut s);
    let mut t = Node::new(EngineOptions::default());
    t.import("m1", ImportStep::Begin).unwrap();
    let mut after: Option<String> = None;
    let mut collections = vec![];
    loop {
        let page = s.engine.export_page("d", ExportPart::Documents, after.as_deref(), 1 << 20, None).unwrap();
        t.import("m1", ImportStep::Docs { docs: page.docs }).unwrap();
        collections = page.collections;
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    // The index comes after the documents: its first build step indexes only some.
    t.import("m1", ImportStep::Collections { collections }).unwrap();
    assert_eq!(t.engine.building_indexes().len(), 1);
    let (sc, tc) = (s.checksum("d"), t.checksum("d"));
    assert_eq!((sc["checksum"].clone(), sc["documents"].clone()), (tc["checksum"].clone(), tc["documents"].clone()));
    assert_ne!(sc["catalog"], tc["catalog"], "an index still building is not the source's ready one");
    build_all(&mut t);
    // Built, the catalogs agree (whether the index is multikey is left out).
    assert_eq!(s.checksum("d"), t.checksum("d"));
}

/// Runs the build steps of every index still building (the leader's builder on a replica set).
fn build_all(n: &mut Node) {
    for (db, coll, name) in n.engine.building_indexes() {
        loop {
            match n.apply(&db, WriteOp::BuildIndex { coll: coll.clone(), name: name.clone() }).unwrap() {
                WriteAnswer::IndexBuildStep { done: true, failed: None } => break,
                WriteAnswer::IndexBuildStep { done: false, .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn begin_never_drops_a_served_database_but_restarts_an_earlier_attempt() {
    let doc = |id: i64| ImportStep::Docs {
        docs: vec![ExportedDoc {
            coll: "c".into(),
            doc: serde_json::value::to_raw_value(&json!({"_id": id})).unwrap(),
        }],
    };
    // Served here: its collections and no incoming mark. Begin is refused and drops nothing.
    let mut t = Node::new(EngineOptions::default());
    t.apply("d", insert("c", vec![json!({"_id": 1}), json!({"_id": 2})])).unwrap();
    let e = t.import("m1", ImportStep::Begin).unwrap_err();
    assert_eq!((e.code, e.code.status()), (ErrorCode::BadRequest, 400));
    assert!(e.message.contains("database d is served by this replica set"), "{}", e.message);
    assert_eq!(t.engine.list_collections("d")[0].documents, 2);
    assert!(t.engine.incoming_migration("d").is_none());
    t.engine.check_route_epoch("d", 0).unwrap();
    // An empty database (nothing of it here) may be imported.
    t.apply("e", WriteOp::Import { migration: "m1".into(), step: ImportStep::Begin }).unwrap();
    // An earlier attempt's import, of this migration or another, is dropped and restarted.
    let mut u = Node::new(EngineOptions::default());
    u.import("m1", ImportStep::Begin).unwrap();
    u.import("m1", doc(1)).unwrap();
    u.import("m1", ImportStep::Begin).unwrap();
    assert!(u.engine.list_collections("d").is_empty(), "Begin again restarts the same migration");
    u.import("m1", doc(1)).unwrap();
    u.import("m2", ImportStep::Begin).unwrap();
    assert!(u.engine.list_collections("d").is_empty(), "another migration's Begin drops the earlier attempt");
    assert_eq!(u.engine.incoming_migration("d").as_deref(), Some("m2"));
    u.import("m2", doc(2)).unwrap();
    u.import("m2", ImportStep::Finish { epoch: 1 }).unwrap();
    assert!(u.import("m3", ImportStep::Begin).unwrap_err().message.contains("served"));
    assert_eq!(u.engine.list_collections("d")[0].documents, 1);
}

/// A client's drop of the database, replayed on the target after an idempotency pass moved
/// records written after it: the records stay (the passes own them), so a retry after the
/// switch is answered from its record, not applied twice.
#[test]
fn a_replayed_drop_of_the_database_keeps_the_idempotency_records_a_pass_moved() {
    let mut s = Node::new(EngineOptions::default());
    s.apply("d", insert("c", vec![json!({"_id": 1, "v": 0})])).unwrap();
    let mut t = Node::new(EngineOptions::default());
    let first_index = copy(&mut s, &mut t, "m1", |_| {});
    // After the copy: the tenant drops its database, then writes with a key.
    s.apply("d", WriteOp::DropDatabase).unwrap();
    let first = s.apply_at(s.index + 1, 2_000, "d", Some("k2"), insert("c", vec![json!({"_id": 2})])).unwrap();
    // A pass runs ahead of the oplog's replay: it moves k2's record first.
    let page = s.engine.export_page("d", ExportPart::Idempotency, None, 1 << 20, None).unwrap();
    assert_eq!(page.idempotency.len(), 1);
    t.import("m1", ImportStep::Idempotency { records: page.idempotency }).unwrap();
    replay(&s, &mut t, "m1", OplogPosition::end_of(first_index), 100);
    t.import("m1", ImportStep::Finish { epoch: 1 }).unwrap();
    assert_eq!(t.checksum("d"), s.checksum("d"));
    let retry = t.apply_at(t.index + 1, 3_000, "d", Some("k2"), insert("c", vec![json!({"_id": 2})])).unwrap();
    assert_eq!(retry, first, "the retry was applied again instead of answered from its record");
}
