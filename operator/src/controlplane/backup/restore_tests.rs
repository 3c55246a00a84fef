//! The restore engine against a fake target (the import protocol's rules as the datanode
//! applies them) and a real `LocalFileSystem` store in a temporary directory: what is
//! restored is the model's state at the time, only the collections named, in bounded
//! steps; damage, refusals and bad requests abort with nothing served.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::{ExportPage, ImportAnswer, ImportRequest, ImportStep, OplogPosition};
use object_store::local::LocalFileSystem;
use serde_json::{Value, json};

use super::restore::{RestoreCause, RestoreInto, RestoreWorld, restore};
use super::*;
use crate::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};

pub(super) const DB: &str = "shop";
const INTO: &str = "shop-restored";

/// The target replica set as the import protocol leaves it.
#[derive(Debug, Default)]
pub(super) struct Target {
    pub(super) incoming: Option<String>,
    pub(super) serving: Option<u64>,
    pub(super) collections: BTreeSet<String>,
    /// (collection, `_id` as JSON) → document JSON.
    pub(super) docs: BTreeMap<(String, String), String>,
    /// Every step received: its name and its JSON size.
    pub(super) steps: Vec<(&'static str, usize)>,
    /// The first step of this name fails so.
    pub(super) fail: Option<(&'static str, Failure)>,
}

/// A target importing the database `db` ([`INTO`] when empty).
#[derive(Default)]
pub(super) struct Fake {
    pub(super) target: Mutex<Target>,
    pub(super) db: String,
}

/// The order-independent sum the fake reports (any function of the contents will do).
pub(super) fn sum(docs: &BTreeMap<(String, String), String>) -> String {
    sha256_hex(format!("{docs:?}").as_bytes())
}

fn refused(m: &str) -> Failure {
    Failure::Refused(m.to_string())
}

#[async_trait]
impl RestoreWorld for Fake {
    async fn import(&self, _rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        let mut t = self.target.lock().unwrap();
        let step = req.step.kind();
        t.steps.push((step, serde_json::to_vec(&req.step).unwrap().len()));
        if t.fail.as_ref().is_some_and(|(s, _)| *s == step) {
            return Err(t.fail.take().unwrap().1);
        }
        assert_eq!(req.db, self.db());
        let ours = t.incoming.as_deref() == Some(req.migration.as_str());
        match &req.step {
            ImportStep::Begin => {
                if t.serving.is_some() {
                    return Err(refused("database served here: Begin would drop it"));
                }
                let (steps, fail) = (std::mem::take(&mut t.steps), t.fail.take());
                *t = Target { incoming: Some(req.migration.clone()), steps, fail, ..Target::default() };
            }
            ImportStep::Abort if !ours => {}
            _ if !ours => return Err(refused("not being imported: send Begin first")),
            ImportStep::Abort => {
                let steps = std::mem::take(&mut t.steps);
                *t = Target { steps, ..Target::default() };
            }
            ImportStep::Finish { epoch } => {
                t.incoming = None;
                t.serving = Some(*epoch);
            }
            ImportStep::Publish { .. } => return Err(refused("a restore engine never publishes")),
            ImportStep::Collections { collections } => {
                t.collections.extend(collections.iter().map(|c| c.name.clone()));
            }
            ImportStep::Docs { docs } => {
                for d in docs {
                    let v: Value = serde_json::from_str(d.doc.get()).unwrap();
                    t.collections.insert(d.coll.clone());
                    t.docs.insert((d.coll.clone(), v["_id"].to_string()), v.to_string());
                }
            }
            ImportStep::Ops { entries } => {
                for e in entries {
                    if e.db != req.db {
                        return Err(refused(&format!("change of database {}", e.db)));
                    }
                    let coll = e.coll.clone().unwrap_or_default();
                    match &e.op {
                        OplogOp::Put { id, doc } => {
                            t.collections.insert(coll.clone());
                            t.docs.insert((coll, id.to_string()), doc.to_string());
                        }
                        OplogOp::Delete { id } => {
                            t.docs.remove(&(coll, id.to_string()));
                        }
                        other => panic!("unexpected change {other:?}"),
                    }
                }
            }
            ImportStep::Idempotency { .. } => panic!("a restore moves no idempotency record"),
        }
        Ok(ImportAnswer { index: t.steps.len() as u64 })
    }

    async fn checksum(&self, _rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        assert_eq!(db, self.db());
        let t = self.target.lock().unwrap();
        Ok(ChecksumMarker { index: 0, checksum: sum(&t.docs), documents: t.docs.len() as u64, catalog: None })
    }
}

impl Fake {
    /// A target importing `db`.
    pub(super) fn importing(db: &str) -> Fake {
        Fake { db: db.to_owned(), ..Fake::default() }
    }

    fn db(&self) -> &str {
        if self.db.is_empty() { INTO } else { &self.db }
    }

    pub(super) fn steps(&self) -> Vec<&'static str> {
        self.target.lock().unwrap().steps.iter().map(|s| s.0).collect()
    }
}

pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    pub(super) store: BackupStore,
    pub(super) pages: Vec<ExportPage>,
    pub(super) entries: Vec<OplogEntry>,
}

pub(super) fn page(index: u64, docs: Vec<Value>) -> ExportPage {
    serde_json::from_value(json!({
        "index": index, "clockMs": 1_000 + index,
        "collections": [{"name": "orders", "indexes": [{"name": "by_total", "key": {"total": 1}}]}, {"name": "users", "indexes": []}],
        "docs": docs, "idempotency": []
    }))
    .unwrap()
}

pub(super) fn change(index: u64, coll: &str, id: u64, doc: Option<Value>) -> OplogEntry {
    let op = match doc {
        Some(mut d) => {
            d["_id"] = json!(id);
            OplogOp::Put { id: json!(id), doc: d }
        }
        None => OplogOp::Delete { id: json!(id) },
    };
    OplogEntry { index, seq: 0, ts_ms: 1_000 + index, db: DB.to_string(), coll: Some(coll.to_string()), op }
}

/// A full of two pages (snapshots at 10 and 12, so the replay from 10 on makes them one),
/// and two overlapping segments: changes at 9..=19, times `1000 + index`.
pub(super) async fn fixture(checksum: Option<String>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let fs = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let store =
        BackupStore::new(Arc::new(fs), BackupLocation::new("b", "s", DB, &Incarnation::new("inc-1").unwrap()).unwrap());
    let lineage = Lineage::new("rs-1.e1").unwrap();
    let pages = vec![
        page(
            10,
            (0..6).map(|i| json!({"coll": "orders", "doc": {"_id": i, "total": i, "pad": "x".repeat(40)}})).collect(),
        ),
        page(12, (0..3).map(|i| json!({"coll": "users", "doc": {"_id": i, "name": format!("u{i}")}})).collect()),
    ];
    let id = FullId::new(1_000, 1);
    let mut entries = Vec::new();
    for (n, p) in pages.iter().enumerate() {
        entries.push(store.put_page(&id, n as u32, p).await.unwrap());
    }
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id,
        db: DB.to_string(),
        lineage: lineage.clone(),
        start: OplogPosition::end_of(10),
        end: OplogPosition::end_of(12),
        start_ms: 1_010,
        end_ms: 1_012,
        docs: 9,
        bytes: entries.iter().map(|e| e.bytes).sum(),
        pages: entries,
        checksum,
    };
    store.put_manifest(&manifest).await.unwrap();
    let changes = vec![
        change(9, "orders", 0, Some(json!({"total": -9}))), // before the full's start: in it already
        change(11, "orders", 1, None),
        change(13, "users", 7, Some(json!({"name": "new"}))),
        change(15, "orders", 2, Some(json!({"total": 200}))),
        change(17, "users", 0, None),
        change(19, "orders", 3, Some(json!({"total": 300}))),
    ];
    let seg = |after: u64, through: u64| NewSegment {
        lineage: lineage.clone(),
        after: OplogPosition::end_of(after),
        through: OplogPosition::end_of(through),
        covered_through_ms: 1_000 + through,
        entries: changes.iter().filter(|e| e.index > after && e.index <= through).cloned().collect(),
    };
    store.put_segment(&seg(8, 14)).await.unwrap();
    store.put_segment(&seg(12, 20)).await.unwrap();
    Fixture { dir, store, pages, entries: changes }
}

impl Fixture {
    pub(super) async fn plan(&self, t: u64) -> RestorePlan {
        let fulls = self.store.list_fulls().await.unwrap().complete;
        plan_restore(&fulls, &self.store.list_segments().await.unwrap(), RestoreTarget::Time(t)).unwrap()
    }

    /// The model: the pages, then every change after the full's start up to `t`.
    pub(super) fn expected(&self, t: u64, only: Option<&str>) -> BTreeMap<(String, String), String> {
        let mut docs = BTreeMap::new();
        for p in &self.pages {
            for d in &p.docs {
                let v: Value = serde_json::from_str(d.doc.get()).unwrap();
                docs.insert((d.coll.clone(), v["_id"].to_string()), v.to_string());
            }
        }
        for e in self.entries.iter().filter(|e| e.index > 10 && e.ts_ms <= t) {
            let key = |id: &Value| (e.coll.clone().unwrap(), id.to_string());
            match &e.op {
                OplogOp::Put { id, doc } => docs.insert(key(id), doc.to_string()),
                OplogOp::Delete { id } => docs.remove(&key(id)),
                _ => unreachable!(),
            };
        }
        docs.retain(|(c, _), _| only.is_none_or(|o| o == c));
        docs
    }
}

pub(super) fn into() -> RestoreInto {
    let rs =
        ReplicaSetAccess { namespace: String::new(), name: "rs-2".into(), leader_admin: "x".into(), members: vec![] };
    RestoreInto::new(rs, INTO, "restore-1", Some(7))
}

#[tokio::test]
async fn a_whole_database_restored_to_a_time_holds_every_change_up_to_it_and_none_after() {
    let f = fixture(None).await;
    let world = Fake::default();
    let mut into = into();
    into.batch_bytes = 150;
    let outcome = restore(&world, &f.store, &f.plan(1_017).await, &into).await.unwrap();

    let t = world.target.lock().unwrap();
    assert_eq!(t.docs, f.expected(1_017, None));
    assert_eq!((t.serving, t.incoming.as_deref()), (Some(7), None), "finished at the epoch asked");
    let steps: Vec<&str> = t.steps.iter().map(|s| s.0).collect();
    assert_eq!((steps.first(), steps.last()), (Some(&"Begin"), Some(&"Finish")), "{steps:?}");
    // Bounded steps: the pages' documents and the changes went in several batches, none
    // much past the bound (one document or change more at most).
    assert!(steps.iter().filter(|s| **s == "Docs").count() >= 3, "{steps:?}");
    assert!(steps.iter().filter(|s| **s == "Ops").count() >= 2, "{steps:?}");
    for (s, bytes) in &t.steps {
        assert!(*bytes < 150 + 250, "{s} step of {bytes} bytes");
    }
    // 11, 13 (in both segments, applied once), 15, 17; not 19 (after the time), not 9.
    assert_eq!(outcome.changes_applied, 4);
    assert_eq!((outcome.reached, outcome.reached_ms), (OplogPosition { index: 17, seq: 0 }, 1_017));
    assert_eq!(outcome.documents, t.docs.len() as u64);
    assert_eq!(outcome.documents_loaded, 9);
    assert_eq!(outcome.collections, vec!["orders".to_string(), "users".to_string()]);
    assert!(outcome.finished && !outcome.checksum_verified);
}

#[tokio::test]
async fn a_per_collection_restore_under_a_new_name_holds_only_that_collection() {
    let f = fixture(None).await;
    let world = Fake::default();
    let mut into = into();
    into.collections = Some(BTreeSet::from(["users".to_string()]));
    into.renames = BTreeMap::from([("users".to_string(), "users_back".to_string())]);
    let outcome = restore(&world, &f.store, &f.plan(1_019).await, &into).await.unwrap();

    let t = world.target.lock().unwrap();
    let expected: BTreeMap<_, _> =
        f.expected(1_019, Some("users")).into_iter().map(|((_, id), d)| (("users_back".to_string(), id), d)).collect();
    assert_eq!(t.docs, expected);
    assert_eq!(t.collections, BTreeSet::from(["users_back".to_string()]));
    assert_eq!(outcome.collections, vec!["users_back".to_string()]);
    // 13 and 17 are of users; 19, of orders, is passed over but still the point reached.
    assert_eq!((outcome.changes_applied, outcome.reached.index), (2, 19));
}

#[tokio::test]
async fn a_restore_to_the_full_end_is_checked_against_the_manifest_checksum() {
    // The state at the full's end (the change at 11 replayed on the pages).
    let model = fixture(None).await.expected(1_012, None);
    let f = fixture(Some(sum(&model))).await;
    let world = Fake::default();
    let outcome = restore(&world, &f.store, &f.plan(1_012).await, &into()).await.unwrap();
    assert!(outcome.checksum_verified);
    assert_eq!((outcome.reached, outcome.reached_ms), (OplogPosition::end_of(12), 1_012));

    let f = fixture(Some("00ff".into())).await;
    let world = Fake::default();
    let err = restore(&world, &f.store, &f.plan(1_012).await, &into()).await.unwrap_err();
    assert!(matches!(err.cause, RestoreCause::ChecksumMismatch { .. }), "{err}");
    assert!(err.import_dropped && !err.is_retryable());
    let t = world.target.lock().unwrap();
    assert!(t.docs.is_empty() && t.incoming.is_none() && t.serving.is_none(), "{t:?}");
    assert!(!t.steps.iter().any(|s| s.0 == "Finish"));
}

/// Flips a byte in the middle of the one stored file whose name ends with `suffix`.
pub(super) fn damage(dir: &std::path::Path, suffix: &str) -> String {
    let path = super::store_tests::file_ending(dir, suffix);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn a_damaged_page_or_segment_aborts_the_restore_naming_the_object() {
    for suffix in ["000001.page", ".seg"] {
        let f = fixture(None).await;
        let plan = f.plan(1_019).await;
        let object = if suffix == ".seg" {
            // The second segment (the one after the full's end).
            let file = f.store.location().segment(&plan.segments[1]).filename().unwrap().to_string();
            let path = f.dir.path().join(f.store.location().segment(&plan.segments[1]).as_ref());
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[10] ^= 0x01;
            std::fs::write(&path, bytes).unwrap();
            file
        } else {
            damage(f.dir.path(), suffix)
        };
        let world = Fake::default();
        let err = restore(&world, &f.store, &plan, &into()).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&object) && message.contains("is damaged"), "{message}");
        assert!(message.contains(INTO), "{message}");
        assert!(err.import_dropped && !err.is_retryable());
        assert_eq!(world.steps().last(), Some(&"Abort"));
        let t = world.target.lock().unwrap();
        assert!(t.docs.is_empty() && t.incoming.is_none() && t.serving.is_none(), "{t:?}");
    }
}

#[tokio::test]
async fn a_target_failure_aborts_and_says_whether_a_retry_may_work() {
    for (failure, retryable) in [(Failure::Transient("leader lost".into()), true), (refused("bad change"), false)] {
        let f = fixture(None).await;
        let world = Fake::default();
        world.target.lock().unwrap().fail = Some(("Ops", failure));
        let err = restore(&world, &f.store, &f.plan(1_019).await, &into()).await.unwrap_err();
        assert!(matches!(err.cause, RestoreCause::Target { step: "Ops", .. }), "{err}");
        assert_eq!(err.is_retryable(), retryable, "{err}");
        assert!(err.import_dropped);
        assert_eq!(world.steps().last(), Some(&"Abort"));
        assert!(world.target.lock().unwrap().docs.is_empty());
    }
    // The abort itself fails: said, and the import stays invisible (incoming).
    let f = fixture(None).await;
    let world = Fake::default();
    world.target.lock().unwrap().fail = Some(("Ops", refused("bad change")));
    let plan = f.plan(1_019).await;
    let world2 = UnreachableAbort(world, AtomicUsize::new(0));
    let err = restore(&world2, &f.store, &plan, &into()).await.unwrap_err();
    assert!(!err.import_dropped && err.to_string().contains("could not be dropped"), "{err}");
    assert!(world2.0.target.lock().unwrap().incoming.is_some());
}

/// A target whose `Abort` does not get through (counted); the verification tests use it
/// too.
pub(super) struct UnreachableAbort(pub(super) Fake, pub(super) AtomicUsize);

#[async_trait]
impl RestoreWorld for UnreachableAbort {
    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        if matches!(req.step, ImportStep::Abort) {
            self.1.fetch_add(1, Ordering::SeqCst);
            return Err(Failure::Transient("unreachable".into()));
        }
        self.0.import(rs, req).await
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        self.0.checksum(rs, db).await
    }
}

#[tokio::test]
async fn a_restore_of_a_database_the_target_serves_is_refused_and_leaves_it_alone() {
    let f = fixture(None).await;
    let world = Fake::default();
    {
        let mut t = world.target.lock().unwrap();
        t.serving = Some(3);
        t.docs.insert(("live".into(), "1".into()), "{}".into());
    }
    let err = restore(&world, &f.store, &f.plan(1_019).await, &into()).await.unwrap_err();
    assert!(matches!(err.cause, RestoreCause::Target { step: "Begin", .. }), "{err}");
    let t = world.target.lock().unwrap();
    assert_eq!((t.serving, t.docs.len()), (Some(3), 1));
}

#[tokio::test]
async fn a_named_collection_missing_at_the_time_or_a_bad_request_restores_nothing() {
    let f = fixture(None).await;
    let plan = f.plan(1_019).await;
    let world = Fake::default();
    let mut missing = into();
    missing.collections = Some(BTreeSet::from(["users".to_string(), "nope".to_string()]));
    let err = restore(&world, &f.store, &plan, &missing).await.unwrap_err();
    assert!(err.to_string().contains("has no collection nope"), "{err}");
    assert_eq!(world.steps().last(), Some(&"Abort"));
    assert!(world.target.lock().unwrap().docs.is_empty());

    let mut collide = into();
    collide.renames = BTreeMap::from([("users".to_string(), "orders".to_string())]);
    let mut empty = into();
    empty.collections = Some(BTreeSet::new());
    let mut outside = into();
    outside.collections = Some(BTreeSet::from(["users".to_string()]));
    outside.renames = BTreeMap::from([("orders".to_string(), "o2".to_string())]);
    let mut bad_db = into();
    bad_db.db = "no/slash".into();
    for (bad, says) in [
        (collide, "would both be restored as orders"),
        (empty, "restores nothing"),
        (outside, "renamed but not among"),
        (bad_db, "database name"),
    ] {
        let world = Fake::default();
        let err = restore(&world, &f.store, &plan, &bad).await.unwrap_err();
        assert!(matches!(err.cause, RestoreCause::Invalid(_)) && err.to_string().contains(says), "{err}");
        // `collide` is only found when the pages name both: after Begin, then aborted.
        let steps = world.steps();
        assert!(steps.is_empty() || steps.last() == Some(&"Abort"), "{steps:?}");
        assert!(world.target.lock().unwrap().docs.is_empty());
    }
}

/// A target that holds the first `Docs` step until a second one arrives (so two must be in
/// flight at once), then fails that second one when `fail_second`; every step's start and
/// end is logged.
struct Pipelined {
    inner: Fake,
    fail_second: bool,
    docs: AtomicUsize,
    second: tokio::sync::Notify,
    log: Mutex<Vec<String>>,
}

#[async_trait]
impl RestoreWorld for Pipelined {
    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        let step = req.step.kind();
        if !matches!(req.step, ImportStep::Docs { .. }) {
            self.log.lock().unwrap().push(step.to_string());
            return self.inner.import(rs, req).await;
        }
        let n = self.docs.fetch_add(1, Ordering::SeqCst) + 1;
        self.log.lock().unwrap().push(format!("start Docs {n}"));
        match n {
            1 => {
                let second = self.second.notified();
                if self.docs.load(Ordering::SeqCst) < 2 {
                    tokio::time::timeout(Duration::from_secs(10), second)
                        .await
                        .expect("a second Docs step sent while the first was in flight");
                }
            }
            2 => {
                self.second.notify_waiters();
                if self.fail_second {
                    self.log.lock().unwrap().push("fail Docs 2".into());
                    return Err(Failure::Transient("leader lost".into()));
                }
            }
            _ => {}
        }
        let answer = self.inner.import(rs, req).await;
        self.log.lock().unwrap().push(format!("end Docs {n}"));
        answer
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        self.inner.checksum(rs, db).await
    }
}

fn pipelined(fail_second: bool) -> Pipelined {
    Pipelined {
        inner: Fake::default(),
        fail_second,
        docs: AtomicUsize::new(0),
        second: tokio::sync::Notify::new(),
        log: Mutex::new(Vec::new()),
    }
}

#[tokio::test]
async fn documents_go_two_steps_at_a_time_and_restore_the_same_state() {
    let f = fixture(None).await;
    let world = pipelined(false);
    let mut into = into();
    into.batch_bytes = 150;
    assert_eq!(into.docs_in_flight, 2);
    restore(&world, &f.store, &f.plan(1_017).await, &into).await.unwrap();
    // The first step ended only after the second started: both were in flight.
    let log = world.log.lock().unwrap().clone();
    let at = |s: &str| log.iter().position(|l| l == s).unwrap_or_else(|| panic!("{s} missing: {log:?}"));
    assert!(at("start Docs 2") < at("end Docs 1"), "{log:?}");
    // Every document step before the first change.
    let last_docs_end = log.iter().rposition(|l| l.starts_with("end Docs")).unwrap();
    assert!(last_docs_end < at("Ops"), "{log:?}");
    assert_eq!(world.inner.target.lock().unwrap().docs, f.expected(1_017, None));
}

#[tokio::test]
async fn a_failed_document_step_aborts_only_once_no_other_step_is_in_flight() {
    let f = fixture(None).await;
    let world = pipelined(true);
    let mut into = into();
    into.batch_bytes = 150;
    let err = restore(&world, &f.store, &f.plan(1_017).await, &into).await.unwrap_err();
    assert!(matches!(err.cause, RestoreCause::Target { step: "Docs", .. }) && err.import_dropped, "{err}");
    // The first step, in flight when the second failed, was answered before the abort: no
    // step of this attempt can reach the target after it.
    let log = world.log.lock().unwrap().clone();
    let at = |s: &str| log.iter().position(|l| l == s).unwrap_or_else(|| panic!("{s} missing: {log:?}"));
    assert!(at("fail Docs 2") < at("end Docs 1") && at("end Docs 1") < at("Abort"), "{log:?}");
    assert_eq!(log.last().map(String::as_str), Some("Abort"), "{log:?}");
    assert!(world.inner.target.lock().unwrap().docs.is_empty());
}

#[tokio::test]
async fn a_replay_never_crosses_the_mark_of_an_import_that_replaced_the_database() {
    let f = fixture(None).await;
    // The database was replaced at 21 (a restore into it): its later changes are of what
    // came in then, which the archive does not hold.
    let imported = OplogEntry {
        op: OplogOp::Imported { import: "restore-9".into() },
        coll: None,
        ..change(21, "orders", 0, None)
    };
    let segment = NewSegment {
        lineage: Lineage::new("rs-1.e1").unwrap(),
        after: OplogPosition::end_of(20),
        through: OplogPosition::end_of(24),
        covered_through_ms: 1_024,
        entries: vec![imported, change(23, "orders", 4, Some(json!({"total": 400})))],
    };
    f.store.put_segment(&segment).await.unwrap();

    // Before the mark: restored as before.
    let world = Fake::default();
    restore(&world, &f.store, &f.plan(1_020).await, &into()).await.unwrap();
    assert_eq!(world.target.lock().unwrap().docs, f.expected(1_020, None));

    // Past it: refused, naming the import, and nothing is left served or importing.
    let world = Fake::default();
    let err = restore(&world, &f.store, &f.plan(1_023).await, &into()).await.unwrap_err();
    assert!(matches!(&err.cause, RestoreCause::Imported { import, index: 21, .. } if import == "restore-9"), "{err}");
    assert!(err.to_string().contains("needs a full taken after it"), "{err}");
    assert!(!err.is_retryable() && err.import_dropped, "{err}");
    let t = world.target.lock().unwrap();
    assert!(t.docs.is_empty() && t.incoming.is_none() && t.serving.is_none(), "{t:?}");
    assert!(!t.steps.iter().any(|(s, _)| *s == "Finish"), "{:?}", t.steps);
}

#[tokio::test]
async fn a_restore_across_a_hot_migration_replays_the_new_replica_sets_changes_whatever_their_positions() {
    use super::format::Handoff;
    use super::plan::plan_restore_across;
    let f = fixture(None).await;
    // The database moved at `a`'s 20 to another replica set whose log is at 3: positions of
    // the two logs are unrelated (here the new one's are below every one replayed before).
    let to = Lineage::new("rs-2.r9").unwrap();
    let handoff = Handoff {
        from: Lineage::new("rs-1.e1").unwrap(),
        from_position: OplogPosition::end_of(20),
        to: to.clone(),
        to_position: OplogPosition::end_of(3),
    };
    f.store.put_handoff(&handoff).await.unwrap();
    let later =
        |index: u64, id: u64, doc: Option<Value>, ts_ms: u64| OplogEntry { ts_ms, ..change(index, "orders", id, doc) };
    let changes = vec![
        later(4, 1, Some(json!({"total": 41})), 1_030),
        later(5, 2, None, 1_031),
        later(6, 5, Some(json!({"total": 6})), 1_040),
    ];
    let segment = NewSegment {
        lineage: to,
        after: OplogPosition::end_of(3),
        through: OplogPosition::end_of(6),
        covered_through_ms: 1_040,
        entries: changes.clone(),
    };
    f.store.put_segment(&segment).await.unwrap();
    let fulls = f.store.list_fulls().await.unwrap().complete;
    let segments = f.store.list_segments().await.unwrap();
    let handoffs = f.store.list_handoffs().await.unwrap();
    for t in [1_019, 1_031, 1_040] {
        let plan = plan_restore_across(&fulls, &segments, &handoffs, RestoreTarget::Time(t)).unwrap();
        assert_eq!(plan.handoffs.len(), 1, "the old lineage's time ends at its fence: {t}: {plan:?}");
        let world = Fake::default();
        let outcome = restore(&world, &f.store, &plan, &into()).await.unwrap();
        // The model: everything of `a`, then `b`'s changes up to `t`.
        let mut expected = f.expected(1_020, None);
        for e in changes.iter().filter(|e| e.ts_ms <= t) {
            let key = |id: &Value| ("orders".to_string(), id.to_string());
            match &e.op {
                OplogOp::Put { id, doc } => expected.insert(key(id), doc.to_string()),
                OplogOp::Delete { id } => expected.remove(&key(id)),
                _ => unreachable!(),
            };
        }
        assert_eq!(world.target.lock().unwrap().docs, expected, "restore to {t}");
        if t >= 1_030 {
            assert!(!outcome.checksum_verified, "past the full's end, in another log: nothing to compare");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_paced_restore_sends_no_faster_than_its_pace() {
    let f = fixture(None).await;
    let mut into = into();
    into.batch_bytes = 150;
    let unpaced = tokio::time::Instant::now();
    let outcome = restore(&Fake::default(), &f.store, &f.plan(1_017).await, &into).await.unwrap();
    assert!(unpaced.elapsed() < Duration::from_secs(1), "{:?}", unpaced.elapsed());

    into.pace_bytes_per_sec = 100;
    let world = Fake::default();
    let paced = tokio::time::Instant::now();
    let again = restore(&world, &f.store, &f.plan(1_017).await, &into).await.unwrap();
    assert_eq!((again.bytes, world.target.lock().unwrap().docs.clone()), (outcome.bytes, f.expected(1_017, None)));
    // Each step waits until the bytes sent with it fit the pace: all of them, at the end.
    let floor = Duration::from_secs_f64(outcome.bytes as f64 / 100.0);
    assert!(paced.elapsed() >= floor, "{:?} for {} bytes", paced.elapsed(), outcome.bytes);
}
