//! The verification against `restore_tests.rs`'s fake target and a `LocalFileSystem` store:
//! a good full matches, damage and a wrong checksum fail saying so, a manifest without a
//! checksum is unverifiable, the replay stops exactly at the full's end, and the scratch
//! copy is dropped whatever happened, at the replica set's leader of the moment when the
//! one it started with is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nimbus_api::migration::{OplogPosition, verify_scratch_db};
use object_store::local::LocalFileSystem;
use serde_json::json;

use super::restore::restore;
use super::restore_tests::{DB, Fake, Fixture, UnreachableAbort, change, damage, fixture, into, page, sum};
use super::verify::{ScratchCopy, Verdict, VerifyCause, drop_scratch, verify_full};
use super::*;
use crate::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};

fn rs() -> ReplicaSetAccess {
    ReplicaSetAccess { namespace: String::new(), name: "rs-2".into(), leader_admin: "x".into(), members: vec![] }
}

fn scratch_target() -> Fake {
    Fake::importing(&verify_scratch_db(DB))
}

/// The fixture's only full and every listed segment.
async fn listing(f: &Fixture) -> (FullManifest, Vec<SegmentName>) {
    let mut fulls = f.store.list_fulls().await.unwrap().complete;
    assert_eq!(fulls.len(), 1);
    (fulls.remove(0), f.store.list_segments().await.unwrap())
}

/// The scratch copy is gone and was never served: the last step an `Abort`, no `Finish`.
fn assert_dropped(world: &Fake) {
    let t = world.target.lock().unwrap();
    let steps: Vec<&str> = t.steps.iter().map(|s| s.0).collect();
    assert_eq!(steps.last(), Some(&"Abort"), "{steps:?}");
    assert!(!steps.contains(&"Finish") && !steps.contains(&"Publish"), "{steps:?}");
    assert!(t.docs.is_empty() && t.incoming.is_none() && t.serving.is_none(), "{t:?}");
}

#[tokio::test]
async fn a_good_full_restores_to_its_end_in_scratch_space_matches_and_is_dropped() {
    // The state at the full's end: the pages and the change at 11 (13 is past the end).
    let model = fixture(None).await.expected(1_012, None);
    let f = fixture(Some(sum(&model))).await;
    let (full, segments) = listing(&f).await;
    let world = scratch_target();
    let v = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap();

    assert!(v.matched(), "{v:?}");
    assert_eq!((v.full.clone(), v.end, v.end_ms), (full.id.clone(), OplogPosition::end_of(12), 1_012));
    assert_eq!((v.documents, v.checksum.as_str()), (model.len() as u64, sum(&model).as_str()));
    assert_eq!(v.changes_applied, 1, "only the change at 11");
    assert!(v.scratch_dropped);
    assert_dropped(&world);
    assert_eq!(world.steps().first(), Some(&"Begin"));
}

#[tokio::test]
async fn a_damaged_page_fails_naming_it_and_the_scratch_copy_is_dropped() {
    let f = fixture(Some("00ff".into())).await;
    let object = damage(f.dir.path(), "000001.page");
    let (full, segments) = listing(&f).await;
    let world = scratch_target();
    let err = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap_err();

    let message = err.to_string();
    assert!(matches!(err.cause, VerifyCause::Backup(BackupError::Damaged { .. })), "{message}");
    assert!(message.contains(&object) && message.contains("is damaged"), "{message}");
    assert!(message.contains(&full.id.to_string()) && message.contains("shop~verify"), "{message}");
    assert!(err.backup_is_bad() && !err.is_retryable() && err.scratch_dropped, "{err:?}");
    assert_dropped(&world);
}

#[tokio::test]
async fn a_restored_copy_that_differs_from_the_manifest_checksum_is_a_mismatch_naming_both() {
    let f = fixture(Some("00ff".into())).await;
    let (full, segments) = listing(&f).await;
    let world = scratch_target();
    let err = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap_err();

    let actual = sum(&f.expected(1_012, None));
    match &err.cause {
        VerifyCause::ChecksumMismatch { expected, actual: got } => {
            assert_eq!((expected.as_str(), got), ("00ff", &actual))
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("00ff") && message.contains(&actual), "{message}");
    assert!(err.backup_is_bad() && !err.is_retryable() && err.scratch_dropped);
    assert_dropped(&world);
}

#[tokio::test]
async fn a_manifest_without_a_checksum_restores_but_is_unverifiable() {
    let f = fixture(None).await;
    let (full, segments) = listing(&f).await;
    let world = scratch_target();
    let v = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap();

    match &v.verdict {
        Verdict::Unverifiable { reason } => assert!(reason.contains("has no checksum"), "{reason}"),
        Verdict::Matched => panic!("nothing to match: {v:?}"),
    }
    assert!(!v.matched());
    assert_eq!(v.documents, f.expected(1_012, None).len() as u64);
    assert_dropped(&world);
}

/// A full of two pages (snapshots at 10 and 12, end at `1_012` ms) whose archive goes on
/// past the end: a change at 13 stamped in the end's very millisecond (a bound by time
/// would replay it), in the segment `(8, 14]` that reaches the end, and a later segment
/// `(14, 20]`.
async fn past_the_end(checksum_of_end: bool) -> (tempfile::TempDir, BackupStore, FullManifest) {
    let dir = tempfile::tempdir().unwrap();
    let fs = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let store =
        BackupStore::new(Arc::new(fs), BackupLocation::new("b", "s", DB, &Incarnation::new("inc-1").unwrap()).unwrap());
    let lineage = Lineage::new("rs-1.e1").unwrap();
    let pages = [
        page(10, vec![json!({"coll": "orders", "doc": {"_id": 1, "total": 1}})]),
        page(12, vec![json!({"coll": "users", "doc": {"_id": 1, "name": "u1"}})]),
    ];
    let id = FullId::new(1_000, 2);
    let mut entries = Vec::new();
    for (n, p) in pages.iter().enumerate() {
        entries.push(store.put_page(&id, n as u32, p).await.unwrap());
    }
    let mut same_ms = change(13, "orders", 1, Some(json!({"total": 13})));
    same_ms.ts_ms = 1_012;
    let changes = [
        change(11, "users", 2, Some(json!({"name": "u2"}))),
        same_ms,
        change(15, "orders", 5, Some(json!({"total": 15}))),
        change(19, "users", 1, None),
    ];
    let seg = |after: u64, through: u64| NewSegment {
        lineage: lineage.clone(),
        after: OplogPosition::end_of(after),
        through: OplogPosition::end_of(through),
        covered_through_ms: 1_000 + through,
        entries: changes.iter().filter(|e| e.index > after && e.index <= through).cloned().collect(),
    };
    store.put_segment(&seg(8, 14)).await.unwrap();
    store.put_segment(&seg(14, 20)).await.unwrap();
    // The state at the end: both pages and the change at 11 only.
    let at_end = std::collections::BTreeMap::from([
        (("orders".to_string(), "1".to_string()), json!({"_id": 1, "total": 1}).to_string()),
        (("users".to_string(), "1".to_string()), json!({"_id": 1, "name": "u1"}).to_string()),
        (("users".to_string(), "2".to_string()), put_doc(&changes[0])),
    ]);
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id,
        db: DB.to_string(),
        lineage,
        start: OplogPosition::end_of(10),
        end: OplogPosition::end_of(12),
        start_ms: 1_010,
        end_ms: 1_012,
        docs: 2,
        bytes: entries.iter().map(|e| e.bytes).sum(),
        pages: entries,
        checksum: checksum_of_end.then(|| sum(&at_end)),
    };
    store.put_manifest(&manifest).await.unwrap();
    (dir, store, manifest)
}

/// A change's document as the fake target stores it.
fn put_doc(e: &nimbus_api::admin::OplogEntry) -> String {
    match &e.op {
        nimbus_api::admin::OplogOp::Put { doc, .. } => doc.to_string(),
        other => panic!("not a put: {other:?}"),
    }
}

#[tokio::test]
async fn the_replay_stops_exactly_at_the_full_end_and_reads_no_later_segment() {
    let (dir, store, full) = past_the_end(true).await;
    let segments = store.list_segments().await.unwrap();
    let plan = plan_to_full_end(&full, &segments).unwrap();
    assert_eq!(plan.until, Some(full.end));
    assert_eq!(plan.segments.iter().map(|s| s.through.index).collect::<Vec<_>>(), vec![14]);
    // A later segment is not even read: damaged, it changes nothing.
    damage(dir.path(), &format!("{}.seg", segments.iter().find(|s| s.after.index == 14).unwrap().sha256));

    let world = scratch_target();
    let v = verify_full(&world, &store, &full, &segments, rs(), "verify-1").await.unwrap();
    assert!(v.matched(), "the change at 13, in the end's millisecond, is not replayed: {v:?}");
    assert_eq!((v.changes_applied, v.documents), (1, 3));
    assert_dropped(&world);

    // A restore to the end's time does replay it (and so cannot compare): the bound is
    // the position, not the time.
    let by_time = plan_restore(std::slice::from_ref(&full), &segments, RestoreTarget::Time(1_012)).unwrap();
    assert_eq!(by_time.until, None);
    let outcome = restore(&Fake::default(), &store, &by_time, &into()).await.unwrap();
    assert_eq!(outcome.changes_applied, 2);
    assert!(!outcome.checksum_verified);
}

#[tokio::test]
async fn an_archive_that_stops_before_the_full_end_is_refused_before_anything_is_sent() {
    let (dir, store, full) = past_the_end(true).await;
    let segments = store.list_segments().await.unwrap();
    let first = segments.iter().find(|s| s.after.index == 8).unwrap().clone();
    std::fs::remove_file(dir.path().join(store.location().segment(&first).as_ref())).unwrap();
    let rest: Vec<SegmentName> = segments.into_iter().filter(|s| *s != first).collect();

    let world = scratch_target();
    let err = verify_full(&world, &store, &full, &rest, rs(), "verify-1").await.unwrap_err();
    assert!(matches!(err.cause, VerifyCause::Plan(RestoreError::Gap { .. })), "{err}");
    assert!(err.backup_is_bad() && err.scratch_dropped);
    assert!(world.steps().is_empty(), "{:?}", world.steps());
}

#[tokio::test]
async fn a_scratch_copy_that_cannot_be_dropped_is_said_so_and_the_verdict_stands() {
    let model = fixture(None).await.expected(1_012, None);
    let f = fixture(Some(sum(&model))).await;
    let (full, segments) = listing(&f).await;
    let world = UnreachableAbort(scratch_target(), AtomicUsize::new(0));
    let v = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap();
    assert!(v.matched() && !v.scratch_dropped, "{v:?}");
    assert!(world.0.target.lock().unwrap().incoming.is_some(), "left incoming: invisible, dropped by the next Begin");

    // A failure whose abort also fails: both said.
    let f = fixture(Some("00ff".into())).await;
    let (full, segments) = listing(&f).await;
    let world = UnreachableAbort(scratch_target(), AtomicUsize::new(0));
    let err = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap_err();
    assert!(!err.scratch_dropped && err.to_string().contains("could not be dropped"), "{err}");
    // The engine's own abort and the verification's retry of it.
    assert_eq!(world.1.load(Ordering::SeqCst), 2);
}

/// The scratch target after its leader changed: what is sent to the former leader (`x`,
/// where the verification started) is refused; the new one (`y`) answers.
struct LeaderMoved(Fake);

#[async_trait::async_trait]
impl super::restore::RestoreWorld for LeaderMoved {
    async fn import(
        &self,
        rs: &ReplicaSetAccess,
        req: &nimbus_api::migration::ImportRequest,
    ) -> Result<nimbus_api::migration::ImportAnswer, Failure> {
        if matches!(req.step, nimbus_api::migration::ImportStep::Abort) && rs.leader_admin == "x" {
            return Err(Failure::Transient("not the leader: member 2 leads".into()));
        }
        self.0.import(rs, req).await
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        self.0.checksum(rs, db).await
    }
}

fn copy(import_id: &str) -> ScratchCopy {
    ScratchCopy {
        namespace: String::new(),
        replica_set: "rs-2".into(),
        db: verify_scratch_db(DB),
        import_id: import_id.into(),
    }
}

#[tokio::test]
async fn a_scratch_copy_whose_abort_went_to_a_former_leader_is_dropped_at_the_new_one() {
    let model = fixture(None).await.expected(1_012, None);
    let f = fixture(Some(sum(&model))).await;
    let (full, segments) = listing(&f).await;
    let world = LeaderMoved(scratch_target());
    let v = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap();
    assert!(v.matched() && !v.scratch_dropped, "{v:?}");
    assert!(world.0.target.lock().unwrap().incoming.is_some());

    // The leader found anew: `y`. A first resolution that fails is tried again.
    let asked = AtomicUsize::new(0);
    let leader = || async {
        if asked.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(Failure::Transient("etcd went away".into()));
        }
        Ok(Some(ReplicaSetAccess { leader_admin: "y".into(), ..rs() }))
    };
    let dropped = drop_scratch(
        &world,
        &copy("verify-1"),
        leader,
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(5),
    )
    .await;
    assert!(dropped);
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_dropped(&world.0);
}

#[tokio::test]
async fn a_scratch_copy_is_dropped_again_only_until_the_deadline_and_never_another_verifications() {
    let model = fixture(None).await.expected(1_012, None);
    let f = fixture(Some(sum(&model))).await;
    let (full, segments) = listing(&f).await;
    let world = UnreachableAbort(scratch_target(), AtomicUsize::new(0));
    let v = verify_full(&world, &f.store, &full, &segments, rs(), "verify-1").await.unwrap();
    assert!(!v.scratch_dropped);
    let started = std::time::Instant::now();
    let leader = || async { Ok(Some(rs())) };
    let within = std::time::Duration::from_millis(200);
    assert!(!drop_scratch(&world, &copy("verify-1"), leader, within, std::time::Duration::from_millis(20)).await);
    assert!(started.elapsed() < within * 5, "bounded: {:?}", started.elapsed());
    assert!(world.1.load(Ordering::SeqCst) >= 3, "tried again: {}", world.1.load(Ordering::SeqCst));

    // A replica set that no longer exists took its copy with it.
    let gone = || async { Ok(None) };
    assert!(drop_scratch(&world, &copy("verify-1"), gone, within, std::time::Duration::ZERO).await);

    // A later verification's copy is not the former's to drop: its `Abort` changes nothing.
    let world = scratch_target();
    let begin = nimbus_api::migration::ImportRequest {
        db: verify_scratch_db(DB),
        migration: "verify-2".into(),
        step: nimbus_api::migration::ImportStep::Begin,
    };
    super::restore::RestoreWorld::import(&world, &rs(), &begin).await.unwrap();
    let leader = || async { Ok(Some(rs())) };
    assert!(drop_scratch(&world, &copy("verify-1"), leader, within, std::time::Duration::ZERO).await);
    assert!(world.target.lock().unwrap().incoming.is_some(), "verify-2's copy was dropped by verify-1's Abort");
}
