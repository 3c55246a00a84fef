//! The agent against a model of the world (one database on a replica set whose writes are
//! the model's oplog, the route, the archiver's record) and a real `LocalFileSystem` in a
//! temporary directory: what it stores must restore, through `plan_restore`, to exactly
//! the model's state at the time asked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::etcd::{Route, RouteState};
use nimbus_api::migration::{
    DbOplogPage, ExportPage, ExportRequest, ExportedCollection, ExportedDoc, OplogPosition, PinOplogRequest,
};
use object_store::local::LocalFileSystem;
use serde_json::value::RawValue;

use super::*;
use crate::controlplane::backup::format::Handoff;
use crate::controlplane::backup::{RestorePlan, RestoreTarget, plan_restore};
use crate::controlplane::migration::ChecksumMarker;

const DB: &str = "shop";
/// Documents per exported page: several pages per full.
const PAGE_DOCS: usize = 4;

#[derive(Default)]
struct State {
    replica_set: String,
    epoch: u64,
    applied: u64,
    last_ts: u64,
    docs: BTreeMap<u64, String>,
    oplog: Vec<OplogEntry>,
    /// The archivers' records by key (`backup_key`).
    records: BTreeMap<String, (ArchiveRecord, u64)>,
    revision: u64,
    /// Exports so far; the export with this number (1-based) fails as a leader change would.
    exports: usize,
    fail_export: Option<usize>,
    /// The next save of the archiver's record fails (after the segment was stored).
    fail_save: bool,
    /// Each export writes one document first: the full is taken while the tenant writes.
    write_on_export: bool,
    pins: BTreeMap<String, u64>,
    next_id: u64,
    /// Each replica set's incarnation (its etcd record's create revision); none: no record.
    rs_incarnations: BTreeMap<String, u64>,
    /// The replica set answers checksum markers (a Raft entry at the next index).
    checksums: bool,
    /// The latest migration's handoff, as its record holds it once switched.
    handoff: Option<RecordedHandoff>,
}

#[derive(Clone, Default)]
struct Model(Arc<Mutex<State>>);

impl Model {
    fn new() -> Model {
        let m = Model::default();
        m.state().replica_set = "rs-a".into();
        m.state().epoch = 1;
        m.state().rs_incarnations = [("rs-a".to_string(), 7), ("rs-b".to_string(), 9)].into();
        m
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// One write through the leader: a new document or a change of an existing one (every
    /// third), stamped with the leader's clock (real time, strictly growing).
    fn write(&self) -> u64 {
        let mut s = self.state();
        s.next_id += 1;
        let id = if s.next_id.is_multiple_of(3) { s.next_id / 3 } else { s.next_id };
        s.applied += 1;
        let ts = now_ms().max(s.last_ts + 1);
        s.last_ts = ts;
        let doc = format!(r#"{{"_id":{id},"v":{}}}"#, s.applied);
        s.docs.insert(id, doc.clone());
        let entry = OplogEntry {
            index: s.applied,
            seq: 0,
            ts_ms: ts,
            db: DB.into(),
            coll: Some("c".into()),
            op: OplogOp::Put { id: id.into(), doc: serde_json::from_str(&doc).unwrap() },
        };
        s.oplog.push(entry);
        ts
    }

    /// `n` new documents in one entry (one command: a restore's `Publish`, a large batch):
    /// one index, one time, seqs 0..n. Returns the time.
    fn write_batch(&self, n: u64) -> u64 {
        let mut s = self.state();
        s.applied += 1;
        let ts = now_ms().max(s.last_ts + 1);
        s.last_ts = ts;
        for seq in 0..n {
            s.next_id += 1;
            let id = 1_000_000 + s.next_id;
            let doc = format!(r#"{{"_id":{id},"v":{}}}"#, s.applied);
            s.docs.insert(id, doc.clone());
            let entry = OplogEntry {
                index: s.applied,
                seq: seq as u32,
                ts_ms: ts,
                db: DB.into(),
                coll: Some("c".into()),
                op: OplogOp::Put { id: id.into(), doc: serde_json::from_str(&doc).unwrap() },
            };
            s.oplog.push(entry);
        }
        ts
    }

    /// The database replaced by an import of `docs` (a restore into it): no change of its
    /// own, one `Imported` mark. Returns its time.
    fn import(&self, docs: &[u64]) -> u64 {
        let mut s = self.state();
        s.applied += 1;
        let ts = now_ms().max(s.last_ts + 1);
        s.last_ts = ts;
        s.docs = docs.iter().map(|id| (*id, format!(r#"{{"_id":{id},"v":0}}"#))).collect();
        let entry = OplogEntry {
            index: s.applied,
            seq: 0,
            ts_ms: ts,
            db: DB.into(),
            coll: None,
            op: OplogOp::Imported { import: "restore-1".into() },
        };
        s.oplog.push(entry);
        ts
    }
    /// The documents as they were at `t`: every change stamped at or before it.
    fn state_at(&self, t: u64) -> BTreeMap<u64, String> {
        let mut docs = BTreeMap::new();
        for e in self.state().oplog.iter().filter(|e| e.ts_ms <= t) {
            if let OplogOp::Put { id, doc } = &e.op {
                docs.insert(id.as_u64().unwrap(), doc.to_string());
            }
        }
        docs
    }
}

impl Model {
    /// The one archive record the model holds.
    fn world_record(&self) -> ArchiveRecord {
        let s = self.state();
        assert_eq!(s.records.len(), 1, "one archive record");
        s.records.values().next().unwrap().0.clone()
    }
}

fn access(s: &State) -> ReplicaSetAccess {
    ReplicaSetAccess {
        namespace: String::new(),
        name: s.replica_set.clone(),
        leader_admin: "leader".into(),
        members: vec![],
    }
}

#[async_trait]
impl BackupWorld for Model {
    async fn route(&self, db: &str) -> Result<Option<Route>, Failure> {
        let s = self.state();
        Ok((db == DB).then(|| Route {
            replica_set: s.replica_set.clone(),
            members: vec![],
            epoch: s.epoch,
            state: RouteState::Serving,
            hold_deadline_ms: None,
            hold_timeout_ms: None,
        }))
    }

    async fn replica_set(&self, _namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        // The route's replica set, and one the database left by a migration with a handoff
        // (still there: the archiver reads the rest of the old lineage from it).
        let s = self.state();
        let left = s.handoff.as_ref().is_some_and(|h| h.from_replica_set == name);
        Ok((name == s.replica_set || left).then(|| ReplicaSetAccess { name: name.to_owned(), ..access(&s) }))
    }

    async fn handoff(&self, _db: &str) -> Result<Option<RecordedHandoff>, Failure> {
        Ok(self.state().handoff.clone())
    }

    async fn replica_set_incarnation(&self, _namespace: &str, name: &str) -> Result<Option<u64>, Failure> {
        Ok(self.state().rs_incarnations.get(name).copied())
    }

    async fn export(&self, _rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure> {
        let write = {
            let mut s = self.state();
            s.exports += 1;
            if s.fail_export == Some(s.exports) {
                return Err(Failure::Transient("not the leader any more".into()));
            }
            s.write_on_export
        };
        if write {
            self.write();
        }
        let s = self.state();
        let after: u64 = req.after.as_deref().map_or(0, |a| a.parse().unwrap());
        let docs: Vec<(u64, String)> =
            s.docs.range(after + 1..).take(PAGE_DOCS).map(|(id, d)| (*id, d.clone())).collect();
        let next = docs.last().map(|(id, _)| *id).filter(|id| s.docs.range(id + 1..).next().is_some());
        Ok(ExportPage {
            index: s.applied,
            clock_ms: s.last_ts,
            collections: vec![ExportedCollection { name: "c".into(), indexes: vec![] }],
            docs: docs
                .into_iter()
                .map(|(_, d)| ExportedDoc { coll: "c".into(), doc: RawValue::from_string(d).unwrap() })
                .collect(),
            idempotency: vec![],
            next: next.map(|n| n.to_string()),
        })
    }

    async fn oplog(
        &self,
        _rs: &ReplicaSetAccess,
        _db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure> {
        let s = self.state();
        let entries: Vec<OplogEntry> = s
            .oplog
            .iter()
            .filter(|e| OplogPosition { index: e.index, seq: e.seq } > after)
            .take(limit as usize)
            .cloned()
            .collect();
        let exhausted = entries.len() < limit as usize;
        let next = match entries.last() {
            Some(e) if !exhausted => OplogPosition { index: e.index, seq: e.seq },
            _ => after.max(OplogPosition::end_of(s.applied)),
        };
        Ok(DbOplogPage { entries, next, applied_index: s.applied, clock_ms: s.last_ts })
    }

    async fn pin_oplog(&self, _rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure> {
        // A pin is a Raft entry, applied at the leader's time: it moves the clock on.
        let mut s = self.state();
        s.pins.insert(req.name.clone(), req.from_index);
        s.applied += 1;
        s.last_ts = now_ms().max(s.last_ts);
        Ok(())
    }

    async fn checksum(&self, _rs: &ReplicaSetAccess, _db: &str) -> Result<ChecksumMarker, Failure> {
        let mut s = self.state();
        if !s.checksums {
            return Err(Failure::Refused("no checksums in the model".into()));
        }
        s.applied += 1;
        Ok(ChecksumMarker { index: s.applied, checksum: String::new(), documents: 0, catalog: None })
    }

    async fn archive_record(
        &self,
        db: &str,
        incarnation: &Incarnation,
    ) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
        Ok(self.state().records.get(&backup_key(db, incarnation)).cloned())
    }

    async fn save_archive_record(&self, record: &ArchiveRecord, expected: Option<u64>) -> Result<Option<u64>, Failure> {
        let mut s = self.state();
        if std::mem::take(&mut s.fail_save) {
            return Err(Failure::Transient("etcd went away".into()));
        }
        let key = backup_key(&record.db, &record.incarnation);
        if s.records.get(&key).map(|(_, r)| *r) != expected {
            return Ok(None);
        }
        s.revision += 1;
        let revision = s.revision;
        s.records.insert(key, (record.clone(), revision));
        Ok(Some(revision))
    }

    async fn delete_archive_record(&self, db: &str, incarnation: &Incarnation) -> Result<(), Failure> {
        self.state().records.remove(&backup_key(db, incarnation));
        Ok(())
    }
}

fn tuning() -> AgentTuning {
    AgentTuning {
        read_bytes_per_sec: 0,
        segment_time: Duration::from_millis(30),
        idle_tick: Duration::from_millis(10),
        poll: Duration::from_millis(5),
        retry: Duration::from_millis(20),
        ..AgentTuning::default()
    }
}

fn incarnation(id: &str) -> Incarnation {
    Incarnation::new(id).unwrap()
}

fn target(incarnation_id: &str, retention: RetentionPolicy) -> BackupTarget {
    BackupTarget { db: DB.into(), incarnation: incarnation(incarnation_id), namespace: String::new(), retention }
}

fn entry(dir: &tempfile::TempDir) -> DbBackups {
    entry_of(dir, "inc-1")
}

fn entry_of(dir: &tempfile::TempDir, incarnation_id: &str) -> DbBackups {
    let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    DbBackups {
        target: target(incarnation_id, RetentionPolicy::default()),
        store: BackupStore::new(fs, BackupLocation::new("", "test", DB, &incarnation(incarnation_id)).unwrap()),
        cache: Mutex::new(Cache::default()),
        full_lock: tokio::sync::Mutex::new(()),
    }
}

/// What a restore following `plan` builds: the full's pages, then the segments' changes
/// after the full's start (each position once) stamped at or before the plan's time.
async fn restore(store: &BackupStore, plan: &RestorePlan) -> BTreeMap<u64, String> {
    let mut docs = BTreeMap::new();
    for page in &plan.full.pages {
        for d in store.read_page(&plan.full.id, page).await.unwrap().docs {
            let v: serde_json::Value = serde_json::from_str(d.doc.get()).unwrap();
            docs.insert(v["_id"].as_u64().unwrap(), v.to_string());
        }
    }
    let mut applied = plan.full.start;
    for name in &plan.segments {
        for e in store.read_segment(name).await.unwrap() {
            let at = OplogPosition { index: e.index, seq: e.seq };
            if at <= applied || e.ts_ms > plan.to_ms {
                continue;
            }
            applied = at;
            if let OplogOp::Put { id, doc } = e.op {
                docs.insert(id.as_u64().unwrap(), doc.to_string());
            }
        }
    }
    docs
}

/// As [`plan_at`], with the handoffs stored.
async fn plan_across_at(store: &BackupStore, t: u64) -> Result<RestorePlan, crate::controlplane::backup::RestoreError> {
    let fulls = store.list_fulls().await.unwrap().complete;
    let segments = store.list_segments().await.unwrap();
    let handoffs = store.list_handoffs().await.unwrap();
    crate::controlplane::backup::plan::plan_restore_across(&fulls, &segments, &handoffs, RestoreTarget::Time(t))
}

/// Ten writes, then a full of `DB` taken while the tenant writes on (a write at each page
/// exported): the source and the full's manifest.
async fn full_under_writes(model: &Model, entry: &DbBackups, tuning: &AgentTuning) -> (Source, FullManifest) {
    for _ in 0..10 {
        model.write();
    }
    model.state().write_on_export = true;
    let src = source(model, "", DB).await.unwrap();
    let full = take_full(model, &entry.store, &src, tuning).await.unwrap().manifest;
    (src, full)
}

async fn plan_at(store: &BackupStore, t: u64) -> Result<RestorePlan, crate::controlplane::backup::RestoreError> {
    let fulls = store.list_fulls().await.unwrap().complete;
    let segments = store.list_segments().await.unwrap();
    plan_restore(&fulls, &segments, RestoreTarget::Time(t))
}

#[tokio::test]
async fn a_full_then_segments_restore_to_the_state_at_any_time_after_the_full() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    let (src, full) = full_under_writes(&model, &entry, &tuning).await;
    assert!(full.pages.len() >= 3, "several pages: {}", full.pages.len());
    assert!(full.start < full.end, "the tenant wrote during the full");
    assert_eq!(model.state().pins.get(&full_pin_name(DB)), Some(&full.start.index));
    entry.reload().await.unwrap();

    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default())
        .await
        .unwrap()
        .expect("a full of the lineage");
    assert_eq!(state.record.position, full.start, "the archive starts where the full's replay does");
    let mut times = vec![full.end_ms];
    for _ in 0..4 {
        for _ in 0..3 {
            times.push(model.write());
        }
        archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default())
            .await
            .unwrap()
            .expect("a segment");
    }
    // Pinned from an archived position (renewed, and moved on, at half its lifetime).
    let pinned = model.state().pins.get(&archive_pin_name(DB)).copied();
    assert!(pinned.is_some_and(|p| p >= full.start.index && p <= state.record.position.index), "{pinned:?}");
    for &t in &times {
        let plan = plan_at(&entry.store, t).await.unwrap_or_else(|e| panic!("no restore to {t}: {e}"));
        assert_eq!(restore(&entry.store, &plan).await, model.state_at(t), "restore to {t}");
    }
    // Before the full's end nothing restores.
    assert!(plan_at(&entry.store, full.end_ms - 1).await.is_err());
}

#[tokio::test]
async fn a_restarted_archiver_resumes_from_its_persisted_position_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    for _ in 0..6 {
        model.write();
    }
    let src = source(&model, "", DB).await.unwrap();
    let full = take_full(&model, &entry.store, &src, &tuning).await.unwrap().manifest;
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    model.write();
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
    let persisted = state.record.position;

    // Crash after a segment is stored but before its position is: the next archiver
    // archives it again from the persisted position.
    model.write();
    model.state().fail_save = true;
    assert!(archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.is_err());
    drop(state);
    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    assert_eq!(state.record.position, persisted, "resumed from the persisted position");
    let mut last = 0;
    for _ in 0..3 {
        last = model.write();
        archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
    }

    let segments = entry.store.list_segments().await.unwrap();
    let mut reached = full.start;
    for s in &segments {
        assert!(s.after <= reached, "gap before {s:?}");
        reached = reached.max(s.through);
    }
    assert_eq!(reached, OplogPosition::end_of(model.state().applied));
    let plan = plan_at(&entry.store, last).await.unwrap();
    assert_eq!(restore(&entry.store, &plan).await, model.state_at(last));
}

#[tokio::test]
async fn changes_of_the_newest_millisecond_wait_for_the_next_segment() {
    // Under steady writes the newest change read carries the replica set's clock, and a
    // later change may carry the same millisecond: it is not covered yet, so it goes into
    // the next segment (it used to make the segment invalid, and the archive stalled).
    let dir = tempfile::tempdir().unwrap();
    let (model, entry) = (Model::new(), entry(&dir));
    // No idle tick: nothing moves the clock past the newest change.
    let tuning = AgentTuning { idle_tick: Duration::from_secs(3600), ..tuning() };
    for _ in 0..6 {
        model.write();
    }
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &entry.store, &src, &tuning).await.unwrap();
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    model.write();
    let second = model.write();
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default())
        .await
        .unwrap()
        .expect("a segment");
    assert_eq!(state.record.covered_ms, second - 1);
    assert!(state.record.position < OplogPosition::end_of(model.state().applied), "the newest change held back");

    model.write();
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default())
        .await
        .unwrap()
        .expect("a segment");
    let plan = plan_at(&entry.store, second).await.unwrap();
    assert_eq!(restore(&entry.store, &plan).await, model.state_at(second));
}

#[tokio::test]
async fn changes_of_one_millisecond_larger_than_a_segment_are_stored_together() {
    // One entry's changes share a time; more of them than a segment holds must not make
    // the archiver read them again and again (it once stopped at the segment's size with
    // nothing it could store, and the archive stalled for good).
    let dir = tempfile::tempdir().unwrap();
    let (model, entry) = (Model::new(), entry(&dir));
    let tuning = AgentTuning { idle_tick: Duration::from_secs(3600), segment_bytes: 256, oplog_page: 5, ..tuning() };
    for _ in 0..3 {
        model.write();
    }
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &entry.store, &src, &tuning).await.unwrap();
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    let at = model.write_batch(20);
    model.write();
    for _ in 0..5 {
        archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
        if state.record.covered_ms >= at {
            break;
        }
    }
    assert!(state.record.covered_ms >= at, "the batch's millisecond never archived: {:?}", state.record);
    entry.reload().await.unwrap();
    let plan = plan_at(&entry.store, at).await.unwrap();
    assert_eq!(restore(&entry.store, &plan).await, model.state_at(at));
}

#[tokio::test]
async fn a_leader_change_mid_full_retries_it_under_a_new_id_and_the_broken_one_is_never_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new();
    for _ in 0..12 {
        model.write();
    }
    // The second page's export meets a leader that is no longer one.
    model.state().fail_export = Some(2);
    let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let agent = Arc::new(BackupAgent::new(Arc::new(model.clone()), fs.clone(), "", "test", tuning()).unwrap());
    agent.set_targets(vec![target("inc-1", RetentionPolicy::default())]).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.clone().run(async move {
        let _ = stopped.await;
    }));

    let store = BackupStore::new(fs, BackupLocation::new("", "test", DB, &incarnation("inc-1")).unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = agent.statuses().remove(DB).unwrap();
        if status.latest_restorable_ms.is_some() {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "no recoverable window: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let listing = store.list_fulls().await.unwrap();
    assert_eq!(listing.incomplete.len(), 1, "the interrupted full stays incomplete: {listing:?}");
    assert_eq!(listing.complete.len(), 1);
    assert_ne!(listing.complete[0].id, listing.incomplete[0]);
    assert_eq!(status.last_full_ms, Some(listing.complete[0].end_ms));
    assert!(status.earliest_restorable_ms >= Some(listing.complete[0].end_ms));

    // The archive goes on: a write is soon restorable.
    let t = model.write();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent.statuses()[DB].latest_restorable_ms < Some(t) {
        assert!(tokio::time::Instant::now() < deadline, "the write at {t} never became restorable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let plan = plan_at(&store, t).await.unwrap();
    assert_eq!(plan.full.id, listing.complete[0].id);
    assert_eq!(restore(&store, &plan).await, model.state_at(t));

    // `backup_now` takes another full at once.
    let now = agent.backup_now(DB).await.unwrap();
    assert!(now.id > listing.complete[0].id);
    assert!(agent.backup_now("other").await.is_err());

    // The spec changes (a longer retention): the database's tasks start anew on its new
    // entry, and its status follows them (not an entry no task fills).
    let longer = RetentionPolicy { window_ms: 14 * 24 * 3_600_000, ..RetentionPolicy::default() };
    agent.set_targets(vec![target("inc-1", longer)]).unwrap();
    let t = model.write();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent.statuses()[DB].latest_restorable_ms < Some(t) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after a spec change, the write at {t} never became restorable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn a_database_that_moved_starts_a_new_lineage_and_needs_a_new_full() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    model.state().checksums = true;
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    assert_eq!(src.lineage.as_str(), "rs-a.r7", "named by the replica set's incarnation, not the epoch");
    take_full(&model, &entry.store, &src, &tuning).await.unwrap();
    entry.reload().await.unwrap();
    assert!(archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().is_some());
    {
        let mut s = model.state();
        s.replica_set = "rs-b".into();
        s.epoch = 2;
    }
    let moved = source(&model, "", DB).await.unwrap();
    assert_eq!(moved.lineage.as_str(), "rs-b.r9");
    assert!(
        archive_start(&model, &entry, &moved, &self::tuning(), &IdleTicks::default()).await.unwrap().is_none(),
        "no full of rs-b.r9 yet"
    );
    let cache = entry.cache();
    assert!(cache.newest_full_of(&moved.lineage).is_none());
    assert!(full_due(None, 0, 0, now_ms(), &FullPolicy::default()));
}

/// A hot migration that recorded a handoff (the source's fence, the target's marker): the
/// archiver archives the old lineage through the fence (no further: the model's one log
/// goes on with the target's changes, which are not the old lineage's), stores the handoff
/// and starts the new lineage at the marker at once. No full is due on arrival, and every
/// time before the move, between the switch and the first write on the target, and after
/// it restores from the full taken before the move.
#[tokio::test]
async fn after_a_move_with_a_recorded_handoff_no_full_is_needed_to_restore_the_times_after_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    let (ticks, policy) = (IdleTicks::default(), FullPolicy::default());
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    let full = take_full(&model, &entry.store, &src, &tuning).await.unwrap().manifest;
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &tuning, &ticks).await.unwrap().unwrap();
    let mut times = vec![model.write(), model.write()];
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &ticks).await.unwrap();
    // Written before the hold, not archived yet when the route switches.
    times.push(model.write());
    // The migration: the fence on rs-a, the target's checksum marker, the switch.
    let (fence, marker) = {
        let mut s = model.state();
        s.applied += 2;
        (s.applied - 1, s.applied)
    };
    let handoff = Handoff {
        from: src.lineage.clone(),
        from_position: OplogPosition { index: fence, seq: 0 },
        to: lineage_of("rs-b", Some(9)).unwrap(),
        to_position: OplogPosition { index: marker, seq: 0 },
    };
    {
        let mut s = model.state();
        s.replica_set = "rs-b".into();
        s.epoch = 2;
        s.handoff = Some(RecordedHandoff { handoff: handoff.clone(), from_replica_set: "rs-a".into() });
        // The import's `Finish` on rs-b, right after the marker: its mark is the arrival the
        // handoff joins, not a replacement that would break the chain.
        s.applied += 1;
        let ts = now_ms().max(s.last_ts + 1);
        s.last_ts = ts;
        let mark = OplogEntry {
            index: s.applied,
            seq: 0,
            ts_ms: ts,
            db: DB.into(),
            coll: None,
            op: OplogOp::Imported { import: "migration-1".into() },
        };
        s.oplog.push(mark);
    }
    std::thread::sleep(Duration::from_millis(3));
    let switched = now_ms();
    std::thread::sleep(Duration::from_millis(3));
    times.extend([model.write(), model.write()]);

    let moved = source(&model, "", DB).await.unwrap();
    let mut there = archive_start(&model, &entry, &moved, &tuning, &ticks).await.unwrap().expect("no full needed");
    assert_eq!((&there.record.lineage, there.record.position), (&handoff.to, handoff.to_position));
    assert!(!there.record.broken);
    assert!(!entry.cache().full_wanted(&moved.lineage, now_ms(), &policy), "no full due on arrival");
    assert_eq!(entry.store.list_handoffs().await.unwrap(), vec![handoff.clone()]);
    let old: Vec<SegmentName> =
        entry.store.list_segments().await.unwrap().into_iter().filter(|s| s.lineage == src.lineage).collect();
    assert_eq!(
        old.iter().map(|s| s.through).max(),
        Some(handoff.from_position),
        "archived through the fence, no further"
    );
    let last = *times.last().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while there.record.covered_ms < last {
        assert!(std::time::Instant::now() < deadline, "the new lineage's archive does not cover {last}");
        archive_segment(&model, &entry.store, &moved, &mut there, &tuning, &ticks).await.unwrap();
    }
    entry.reload().await.unwrap();
    assert!(!entry.cache().full_wanted(&moved.lineage, now_ms(), &policy));
    for t in times.iter().copied().chain([switched]) {
        let plan = plan_across_at(&entry.store, t).await.unwrap();
        assert_eq!(plan.full.id, full.id, "the full taken before the move");
        assert_eq!(restore(&entry.store, &plan).await, model.state_at(t), "restore to {t}");
    }
    // Without the handoff, the times after the switch wait for a full on rs-b: the old
    // lineage, read after the switch, claims no time past its last change.
    assert!(plan_at(&entry.store, last).await.is_err());
}

/// A migration that fenced the database and was aborted raised its epoch on the same
/// replica set: the same Raft log, so the same lineage; the archive goes on from its record
/// (no new full), and a restore's chain runs across the abort.
#[tokio::test]
async fn an_aborted_migration_keeps_the_lineage_and_the_archive_goes_on_without_a_full() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    let full = take_full(&model, &entry.store, &src, &tuning).await.unwrap().manifest;
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    let mut times = vec![model.write(), model.write()];
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
    let before = model.world_record();
    model.state().epoch += 2; // fenced at epoch 2, aborted at 3
    let after = source(&model, "", DB).await.unwrap();
    assert_eq!(after.lineage, src.lineage);
    let mut resumed = archive_start(&model, &entry, &after, &self::tuning(), &IdleTicks::default())
        .await
        .unwrap()
        .expect("the record goes on");
    assert_eq!(resumed.record, before, "resumed from the persisted record");
    times.push(model.write());
    archive_segment(&model, &entry.store, &after, &mut resumed, &tuning, &IdleTicks::default()).await.unwrap();
    entry.reload().await.unwrap();
    assert_eq!(entry.cache().newest_full_of(&after.lineage).map(|f| &f.id), Some(&full.id), "no new full needed");
    for t in times {
        let plan = plan_at(&entry.store, t).await.unwrap();
        assert_eq!(plan.full.id, full.id);
        assert_eq!(restore(&entry.store, &plan).await, model.state_at(t), "restore to {t}");
    }
}

/// Moved away and back: the replica set's lineage is the one of the first stay, but its
/// fulls from then must not start the archive (the oplog in between is not the database's
/// history). On every move the archiver sets a floor (a checksum marker) before any full is
/// taken, and a full of this stay, started after it, starts the archive.
#[tokio::test]
async fn a_database_back_on_a_replica_set_it_left_needs_a_full_of_this_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    model.state().checksums = true;
    let policy = FullPolicy::default();
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    let first = take_full(&model, &entry.store, &src, &tuning).await.unwrap().manifest;
    entry.reload().await.unwrap();
    assert!(archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().is_some());
    assert!(!entry.cache().full_wanted(&src.lineage, now_ms(), &policy), "a full was just taken");
    let move_to = |rs: &str, epoch: u64| {
        let mut s = model.state();
        s.replica_set = rs.into();
        s.epoch = epoch;
    };
    // Away on rs-b: no full before the archiver took up the move, then one at once.
    move_to("rs-b", 2);
    let away = source(&model, "", DB).await.unwrap();
    assert!(!entry.cache().full_wanted(&away.lineage, now_ms(), &policy), "the archiver has not taken up the move");
    assert!(
        archive_start(&model, &entry, &away, &self::tuning(), &IdleTicks::default()).await.unwrap().is_none(),
        "no full of rs-b yet"
    );
    assert!(entry.cache().full_wanted(&away.lineage, now_ms(), &policy), "due once the floor is set");
    take_full(&model, &entry.store, &away, &tuning).await.unwrap();
    entry.reload().await.unwrap();
    assert!(archive_start(&model, &entry, &away, &self::tuning(), &IdleTicks::default()).await.unwrap().is_some());
    // Back on rs-a, whose lineage has the first stay's full.
    move_to("rs-a", 3);
    model.write();
    let back = source(&model, "", DB).await.unwrap();
    assert_eq!(back.lineage, src.lineage);
    assert!(
        archive_start(&model, &entry, &back, &self::tuning(), &IdleTicks::default()).await.unwrap().is_none(),
        "the first stay's full must not start it"
    );
    assert!(entry.cache().full_wanted(&back.lineage, now_ms(), &policy), "a full is due at once");
    let record = model.world_record();
    assert!(record.broken && record.lineage == src.lineage && record.position > first.end, "{record:?}");
    assert!(
        archive_start(&model, &entry, &back, &self::tuning(), &IdleTicks::default()).await.unwrap().is_none(),
        "still waiting for a full of this stay"
    );
    let second = take_full(&model, &entry.store, &back, &tuning).await.unwrap().manifest;
    entry.reload().await.unwrap();
    let state = archive_start(&model, &entry, &back, &self::tuning(), &IdleTicks::default())
        .await
        .unwrap()
        .expect("this stay's full starts the archive");
    assert_eq!(state.record.position, second.start);
}

#[tokio::test]
async fn a_new_instance_with_a_deleted_ones_database_name_finds_none_of_its_backups() {
    let dir = tempfile::tempdir().unwrap();
    let (model, old, tuning) = (Model::new(), entry_of(&dir, "inc-1"), tuning());
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &old.store, &src, &tuning).await.unwrap();
    old.reload().await.unwrap();
    let mut state = archive_start(&model, &old, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    model.write();
    archive_segment(&model, &old.store, &src, &mut state, &tuning, &IdleTicks::default())
        .await
        .unwrap()
        .expect("a segment");
    old.reload().await.unwrap();
    assert!(old.cache().status().latest_restorable_ms.is_some());

    // The same name, another instance: no full, no segment, no record of its own yet.
    let new = entry_of(&dir, "inc-2");
    new.reload().await.unwrap();
    assert!(new.store.list_fulls().await.unwrap().complete.is_empty());
    assert!(new.store.list_segments().await.unwrap().is_empty());
    assert_eq!(new.cache().status(), BackupStatus::default());
    assert!(
        archive_start(&model, &new, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().is_none(),
        "the old record was not inherited"
    );
    assert!(model.state().records.keys().all(|k| k.ends_with("/inc-1")), "{:?}", model.state().records.keys());
    // Its own full starts its own record; the old incarnation's stays as it was.
    take_full(&model, &new.store, &src, &tuning).await.unwrap();
    new.reload().await.unwrap();
    let fresh = archive_start(&model, &new, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    assert_eq!(fresh.record.incarnation.as_str(), "inc-2");
    assert_eq!(old.store.list_fulls().await.unwrap().complete.len(), 1);
}

#[tokio::test]
async fn a_former_incarnations_backups_are_swept_whole_once_past_their_retention_and_never_a_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (model, old, live, tuning) = (Model::new(), entry_of(&dir, "inc-1"), entry_of(&dir, "inc-2"), tuning());
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &old.store, &src, &tuning).await.unwrap();
    take_full(&model, &live.store, &src, &tuning).await.unwrap();
    let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let agent_with = |orphan_retention: Duration| {
        BackupAgent::new(
            Arc::new(model.clone()),
            fs.clone(),
            "",
            "test",
            AgentTuning { orphan_retention, ..tuning.clone() },
        )
        .unwrap()
    };

    // Before it knows its targets, the agent sweeps nothing (everything would look former).
    let agent = agent_with(Duration::ZERO);
    assert!(agent.sweep().await.unwrap().is_empty());
    // Within its retention, a former incarnation stays.
    let patient = agent_with(Duration::from_secs(3_600));
    patient.set_targets(vec![target("inc-2", RetentionPolicy::default())]).unwrap();
    assert!(patient.sweep().await.unwrap().is_empty());
    assert_eq!(old.store.list_fulls().await.unwrap().complete.len(), 1);
    // Past it: deleted whole; the live incarnation untouched.
    agent.set_targets(vec![target("inc-2", RetentionPolicy::default())]).unwrap();
    let swept = agent.sweep().await.unwrap();
    assert_eq!(swept.iter().map(|l| l.incarnation().as_str()).collect::<Vec<_>>(), vec!["inc-1"]);
    let listing = old.store.list_fulls().await.unwrap();
    assert!(listing.complete.is_empty() && listing.incomplete.is_empty() && listing.damaged.is_empty());
    assert!(!dir.path().join("test/shop/inc-1").exists() || walk_files(&dir.path().join("test/shop/inc-1")) == 0);
    assert_eq!(live.store.list_fulls().await.unwrap().complete.len(), 1);
}

fn walk_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { walk_files(&p) } else { 1 }).sum())
        .unwrap_or(0)
}

#[tokio::test]
async fn retention_keeps_in_the_cache_what_was_stored_after_its_listing() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &entry.store, &src, &tuning).await.unwrap();
    // An abandoned full long past its grace: retention has something to delete.
    let abandoned = FullId::new(1, 1);
    let req = ExportRequest {
        db: DB.into(),
        part: nimbus_api::migration::ExportPart::Documents,
        after: None,
        max_bytes: 1 << 20,
        since_ms: None,
    };
    let page = model.export(&src.rs, &req).await.unwrap();
    entry.store.put_page(&abandoned, 0, &page).await.unwrap();
    entry.reload().await.unwrap();
    // A segment the archiver stores while retention runs (after its listing): in the cache,
    // not in the listing retention read.
    let late = SegmentName {
        lineage: src.lineage.clone(),
        after: OplogPosition::end_of(1),
        through: OplogPosition::end_of(2),
        min_ts: 5,
        max_ts: 6,
        sha256: "0a".repeat(32),
    };
    entry.cache().segments.push(late.clone());

    run_retention(&entry).await.unwrap();
    assert!(entry.store.list_fulls().await.unwrap().incomplete.is_empty(), "the abandoned full was deleted");
    let cache = entry.cache();
    assert!(cache.segments.contains(&late), "a segment stored after retention's listing dropped out of the cache");
    assert_eq!(cache.fulls.len(), 1);
}

#[tokio::test]
async fn an_idle_database_moves_its_covered_time_in_its_record_not_in_new_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    let ticks = IdleTicks::default();
    model.write();
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &entry.store, &src, &tuning).await.unwrap();
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &self::tuning(), &IdleTicks::default()).await.unwrap().unwrap();
    let last = model.write();
    let stored = archive_segment(&model, &entry.store, &src, &mut state, &tuning, &ticks).await.unwrap();
    assert!(matches!(stored, Some(Archived::Stored { .. })), "{stored:?}");
    let objects = entry.store.list_segments().await.unwrap().len();

    // Nobody writes: the covered time moves on, in the record only.
    let mut tip = None;
    for _ in 0..3 {
        match archive_segment(&model, &entry.store, &src, &mut state, &tuning, &ticks).await.unwrap() {
            Some(Archived::Idle { tip: t }) => tip = Some(t),
            other => panic!("an idle round stored or did nothing: {other:?}"),
        }
    }
    let tip = tip.unwrap();
    assert!(tip.max_ts > last, "the idle time after the last write is covered: {tip:?}");
    assert_eq!(entry.store.list_segments().await.unwrap().len(), objects, "no object for an idle round");
    let (record, _) = model.state().records.values().next().cloned().unwrap();
    assert_eq!(record.idle_tip(), Some(tip.clone()));
    // A restore to a time only the record covers: planned with the record's tip, which
    // it never lists for reading.
    let fulls = entry.store.list_fulls().await.unwrap().complete;
    let mut segments = entry.store.list_segments().await.unwrap();
    let t = tip.max_ts;
    assert!(plan_restore(&fulls, &segments, RestoreTarget::Time(t)).is_err(), "the store alone does not cover {t}");
    segments.push(tip.clone());
    let plan = plan_restore(&fulls, &segments, RestoreTarget::Time(t)).unwrap();
    assert!(plan.segments.iter().all(|s| !s.is_record_only()), "{plan:?}");
    assert_eq!(restore(&entry.store, &plan).await, model.state_at(t));

    // A write: one segment from the stored position spans the idle stretch.
    let before = state.record.position;
    let t = model.write();
    let Some(Archived::Stored { name, .. }) =
        archive_segment(&model, &entry.store, &src, &mut state, &tuning, &ticks).await.unwrap()
    else {
        panic!("a write was not stored");
    };
    assert_eq!(name.after, before);
    assert_eq!(state.record.idle_position, None);
    assert!(plan_at(&entry.store, t).await.is_ok());

    // An idle stretch older than idle_segment_every is stored as an empty segment.
    let eager = AgentTuning { idle_segment_every: Duration::ZERO, ..tuning.clone() };
    let stored = archive_segment(&model, &entry.store, &src, &mut state, &eager, &ticks).await.unwrap();
    assert!(matches!(stored, Some(Archived::Stored { bytes: 0, .. })), "{stored:?}");
}

#[test]
fn one_archiver_per_replica_set_renews_its_pin_early_per_idle_tick() {
    let ticks = IdleTicks::default();
    let rs = |name: &str| ReplicaSetAccess {
        namespace: String::new(),
        name: name.into(),
        leader_admin: String::new(),
        members: vec![],
    };
    let every = Duration::from_millis(500);
    assert!(ticks.claim(&rs("a"), 10_000, every));
    assert!(!ticks.claim(&rs("a"), 10_100, every), "a second database of rs a in the same tick");
    assert!(ticks.claim(&rs("b"), 10_100, every), "another replica set ticks on its own");
    assert!(ticks.claim(&rs("a"), 10_500, every), "the next tick of rs a");
}

/// The model, with the archive records in a real etcd through the live world's calls.
struct EtcdRecords {
    model: Model,
    live: crate::controlplane::migration::LiveWorld,
}

struct NoDirectory;

#[async_trait]
impl crate::controlplane::migration::ReplicaSetDirectory for NoDirectory {
    async fn admin_addrs(&self, _namespace: &str, _name: &str) -> Option<Vec<String>> {
        None
    }
}

#[async_trait]
impl BackupWorld for EtcdRecords {
    async fn route(&self, db: &str) -> Result<Option<Route>, Failure> {
        self.model.route(db).await
    }
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        self.model.replica_set(namespace, name).await
    }
    async fn export(&self, rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure> {
        self.model.export(rs, req).await
    }
    async fn oplog(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure> {
        self.model.oplog(rs, db, after, limit).await
    }
    async fn pin_oplog(&self, rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure> {
        self.model.pin_oplog(rs, req).await
    }
    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        BackupWorld::checksum(&self.model, rs, db).await
    }
    async fn archive_record(&self, db: &str, inc: &Incarnation) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
        self.live.archive_record(db, inc).await
    }
    async fn save_archive_record(&self, record: &ArchiveRecord, expected: Option<u64>) -> Result<Option<u64>, Failure> {
        self.live.save_archive_record(record, expected).await
    }
    async fn delete_archive_record(&self, db: &str, inc: &Incarnation) -> Result<(), Failure> {
        self.live.delete_archive_record(db, inc).await
    }
}

/// A deleted instance's archive record stays in etcd while its backups do (a restore of
/// them plans with it), and goes when the sweep deletes them; the live incarnation's stays.
#[tokio::test]
async fn a_former_incarnations_archive_record_in_etcd_is_deleted_with_its_swept_backups_and_not_before() {
    let (_etcd, coord) = crate::controlplane::coord::tests::etcd().await;
    let secret = nimbus_net::ClusterSecret::parse("sweep-test-secret-0123456789abcdef").unwrap();
    let live = crate::controlplane::migration::LiveWorld {
        admin: crate::controlplane::admin::AdminClient::new(&secret),
        coord: Arc::new(coord),
        directory: Arc::new(NoDirectory),
    };
    let world = Arc::new(EtcdRecords { model: Model::new(), live });
    let dir = tempfile::tempdir().unwrap();
    let (old, current, tuning) = (entry_of(&dir, "inc-1"), entry_of(&dir, "inc-2"), tuning());
    world.model.write();
    let src = source(&world.model, "", DB).await.unwrap();
    for entry in [&old, &current] {
        take_full(&world.model, &entry.store, &src, &tuning).await.unwrap();
        let record = ArchiveRecord {
            db: DB.into(),
            incarnation: entry.target.incarnation.clone(),
            lineage: src.lineage.clone(),
            position: OplogPosition::end_of(1),
            covered_ms: 1,
            oplog_bytes_since_full: 0,
            db_bytes: 0,
            broken: false,
            idle_position: None,
            idle_covered_ms: 0,
        };
        assert!(world.save_archive_record(&record, None).await.unwrap().is_some());
    }
    let recorded = |inc: &'static str| {
        let world = world.clone();
        async move { world.archive_record(DB, &incarnation(inc)).await.unwrap().is_some() }
    };
    let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let agent_with = |orphan_retention: Duration| {
        let agent =
            BackupAgent::new(world.clone(), fs.clone(), "", "test", AgentTuning { orphan_retention, ..tuning.clone() })
                .unwrap();
        agent.set_targets(vec![target("inc-2", RetentionPolicy::default())]).unwrap();
        agent
    };

    // Within its retention: the backups and the record stay.
    assert!(agent_with(Duration::from_secs(3_600)).sweep().await.unwrap().is_empty());
    assert!(recorded("inc-1").await, "deleted while its backups are kept");
    // Past it: both go; the live incarnation's record stays.
    let swept = agent_with(Duration::ZERO).sweep().await.unwrap();
    assert_eq!(swept.iter().map(|l| l.incarnation().as_str()).collect::<Vec<_>>(), vec!["inc-1"]);
    assert!(!recorded("inc-1").await, "the swept incarnation's record is still in etcd");
    assert!(recorded("inc-2").await);
}

/// A replica set's incarnation is its etcd record's create revision: kept while the record
/// is (a second record is refused, an update would keep it), another one once the replica
/// set was forgotten and made again under its name (a new Raft log: a new lineage).
#[tokio::test]
async fn a_replica_sets_incarnation_is_its_records_create_revision_and_changes_when_it_is_made_again() {
    let (_etcd, coord) = crate::controlplane::coord::tests::etcd().await;
    let secret = nimbus_net::ClusterSecret::parse("lineage-test-secret-0123456789abcdef").unwrap();
    let live = crate::controlplane::migration::LiveWorld {
        admin: crate::controlplane::admin::AdminClient::new(&secret),
        coord: Arc::new(coord),
        directory: Arc::new(NoDirectory),
    };
    let incarnation = || BackupWorld::replica_set_incarnation(&live, "apps", "default-rs0");
    assert_eq!(incarnation().await.unwrap(), None, "no record: named by the replica set alone");
    assert_eq!(lineage_of("default-rs0", None).unwrap().as_str(), "default-rs0");
    let record =
        nimbus_api::etcd::ReplicaSetRecord { pool: "default".into(), zones: vec!["a".into()], bootstrapped_ms: 1 };
    live.coord.record_replica_set("apps", "default-rs0", &record).await.unwrap();
    let first = incarnation().await.unwrap().expect("recorded");
    // Unrelated writes move etcd's revision on, not the incarnation.
    live.coord.record_replica_set("apps", "default-rs1", &record).await.unwrap();
    live.coord.record_replica_set("apps", "default-rs0", &record).await.unwrap();
    assert_eq!(incarnation().await.unwrap(), Some(first));
    assert_eq!(lineage_of("default-rs0", Some(first)).unwrap().as_str(), format!("default-rs0.r{first}"));
    live.coord.forget_replica_set("apps", "default-rs0").await.unwrap();
    live.coord.record_replica_set("apps", "default-rs0", &record).await.unwrap();
    let second = incarnation().await.unwrap().expect("recorded again");
    assert_ne!(second, first, "made again: another Raft log, another lineage");
}

#[tokio::test]
async fn a_database_replaced_by_an_import_ends_its_chain_before_the_mark_and_goes_on_from_a_full_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    for _ in 0..5 {
        model.write();
    }
    let src = source(&model, "", DB).await.unwrap();
    take_full(&model, &entry.store, &src, &tuning).await.unwrap();
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &tuning, &IdleTicks::default())
        .await
        .unwrap()
        .expect("a full of the lineage");
    let before = model.write();
    let replaced_at = model.import(&[500, 501]);
    let mark = model.state().applied;
    model.write();

    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
    assert!(state.record.broken, "{:?}", state.record);
    assert_eq!(state.record.position, OplogPosition { index: mark, seq: 0 });
    entry.reload().await.unwrap();
    // Before the mark: restorable as it was.
    let plan = plan_at(&entry.store, before).await.unwrap();
    assert_eq!(restore(&entry.store, &plan).await, model.state_at(before));
    // From the mark on: outside the window (the archive holds nothing of what came in),
    // and the archive waits for a full taken after the mark, which the scheduler wants.
    assert!(plan_at(&entry.store, replaced_at).await.is_err());
    assert!(archive_start(&model, &entry, &src, &tuning, &IdleTicks::default()).await.unwrap().is_none());
    assert!(entry.cache().broken);
    assert!(entry.cache().full_wanted(&src.lineage, now_ms(), &tuning.full_policy));

    let full = take_full(&model, &entry.store, &src, &tuning).await.unwrap().manifest;
    assert!(full.start > state.record.position);
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &tuning, &IdleTicks::default())
        .await
        .unwrap()
        .expect("the full after the mark");
    assert!(!state.record.broken);
    let after = model.write();
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
    let plan = plan_at(&entry.store, after).await.unwrap();
    let expected = model.state().docs.clone();
    assert!(expected.contains_key(&500) && expected.contains_key(&501), "{expected:?}");
    assert_eq!(restore(&entry.store, &plan).await, expected);
}

#[tokio::test]
async fn a_full_taken_under_writes_is_verified_only_once_the_archive_holds_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (model, entry, tuning) = (Model::new(), entry(&dir), tuning());
    let (src, full) = full_under_writes(&model, &entry, &tuning).await;
    assert!(full.start < full.end, "the tenant wrote during the full");
    assert!(!archive_reaches_end(&full, &[]), "right after the full nothing of its replay is archived");
    entry.reload().await.unwrap();
    let mut state = archive_start(&model, &entry, &src, &tuning, &IdleTicks::default()).await.unwrap().unwrap();
    archive_segment(&model, &entry.store, &src, &mut state, &tuning, &IdleTicks::default()).await.unwrap();
    let segments = entry.store.list_segments().await.unwrap();
    assert!(archive_reaches_end(&full, &segments), "{segments:?}");
    // A full no change came during needs no segment.
    let idle = FullManifest { end: full.start, ..full.clone() };
    assert!(archive_reaches_end(&idle, &[]));
}
