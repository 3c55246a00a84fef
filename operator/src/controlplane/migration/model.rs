//! An in-memory world for the driver's tests: two replica sets (`a` holds the database,
//! `b` is the target), the route, the gateways and the record, checking the protocol's
//! invariants as it goes.
//!
//! Deterministic: each call of the driver first lets a client write once through the
//! modelled gateway (held while the route holds, refused when its epoch is stale, acked
//! otherwise), so writes interleave with every step the same way on every run. A crash is
//! injected by number of call: the call never returns (before or after its effect) and
//! [`Model::crashed`] is notified, so the test drops the driver there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::etcd::{Route, RouteMember, RouteState};
use nimbus_api::migration::{
    DbOplogPage, ExportPage, ExportPart, ExportRequest, ExportedCollection, ExportedDoc, ExportedIdempotency,
    ImportAnswer, ImportRequest, ImportStep, OplogPosition, PinOplogRequest,
};
use serde_json::value::RawValue;

use super::io::{ChecksumMarker, DropOutcome, FenceAnswer, HoldView, MigrationWorld, ReplicaSetAccess};
use super::plan::Failure;
use super::record::MigrationRecord;

pub const DB: &str = "shop";
/// Documents per exported page (several pages per copy).
const PAGE_DOCS: usize = 7;
/// Distinct document ids the client writes (so later writes overwrite copied ones).
const IDS: u64 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The `n`th call (1-based) never happens.
    Before(usize),
    /// The `n`th call takes effect and never answers.
    After(usize),
}

#[derive(Debug, Default)]
pub struct ReplicaSet {
    pub docs: BTreeMap<u64, String>,
    pub idempotency: BTreeMap<String, String>,
    /// Each idempotency record's time: the model's clock is its applied index.
    pub idempotency_ts: BTreeMap<String, u64>,
    pub collections: Vec<ExportedCollection>,
    pub applied: u64,
    pub oplog: Vec<OplogEntry>,
    /// Positions up to this index were dropped by retention.
    pub truncated_below: u64,
    /// The database's route epoch as this replica set knows it.
    pub epoch: u64,
    pub incoming: Option<String>,
    pub serving: bool,
    pub pins: BTreeMap<String, u64>,
    pub gone: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub sets: BTreeMap<String, ReplicaSet>,
    pub route: Option<(Route, u64)>,
    pub revision: u64,
    pub gateways: BTreeSet<String>,
    pub holds: BTreeMap<String, Vec<u8>>,
    /// Gateways that never acknowledge a hold (until an abort).
    pub silent: BTreeSet<String>,
    pub record: Option<(MigrationRecord, u64)>,
    /// Every acknowledged client write: (id, value).
    pub acked: Vec<(u64, u64)>,
    pub writes: u64,
    pub held: u64,
    pub refused: u64,
    pub violations: Vec<String>,
    /// Every error the records showed, in order (a completed migration clears its own).
    pub errors: Vec<String>,
    pub calls: usize,
    pub crash: Option<Crash>,
    /// The next oplog read answers `OplogTruncated`.
    pub truncate_once: bool,
    /// The next checksum of the target differs.
    pub corrupt_once: bool,
    /// The route deleted right after the target's `Finish` (the database deleted while
    /// the migration switches).
    pub delete_route_at_finish: bool,
    /// Client writes stop (a quiet database).
    pub quiet: bool,
    /// Extra client writes per call (a tenant writing faster than the catch-up applies:
    /// each oplog read returns at most `oplog_page` changes).
    pub flood: u64,
    /// Right after the clean-up reads the route, the instance is deleted and a new one of
    /// the same name placed on `a` at a fresh epoch (its first write lands there before
    /// the clean-up's drop).
    pub new_instance_on_a_after_cleanup_read: bool,
    /// The first save of a record at this step fails, and so does every save after it
    /// until the driver changes a datanode (a fence, an import step): that call takes
    /// effect, then the driver crashes (etcd unreachable for a moment, then the control
    /// plane lost).
    pub fail_save_at: Option<super::record::Step>,
    pub etcd_down: bool,
    /// The driver crashes right after it saved a record at this step (once).
    pub crash_after_saving: Option<super::record::Step>,
}

pub struct Model {
    pub state: Mutex<State>,
    pub crashed: Arc<tokio::sync::Notify>,
}

fn doc_json(id: u64, v: u64) -> String {
    format!(r#"{{"_id":{id},"v":{v}}}"#)
}

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).unwrap()
}

impl Model {
    /// `a` holds the database with a few documents at route epoch 5; `b` is empty; two
    /// gateways are registered.
    pub fn new() -> Arc<Model> {
        let mut s = State::default();
        let mut a = ReplicaSet { epoch: 5, serving: true, ..Default::default() };
        a.collections =
            vec![ExportedCollection { name: "c".into(), indexes: vec![serde_json::json!({"key": {"v": 1}})] }];
        s.sets.insert("a".into(), a);
        s.sets.insert("b".into(), ReplicaSet::default());
        s.revision = 10;
        s.route = Some((
            Route {
                replica_set: "a".into(),
                members: vec![member("a")],
                epoch: 5,
                state: RouteState::Serving,
                hold_deadline_ms: None,
                hold_timeout_ms: None,
            },
            10,
        ));
        s.gateways = ["g1".to_string(), "g2".to_string()].into();
        let model = Arc::new(Model { state: Mutex::new(s), crashed: Arc::new(tokio::sync::Notify::new()) });
        for _ in 0..25 {
            model.lock().client_write();
        }
        model
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Counts the call, lets the client write once, and tells whether to crash (and when).
    fn enter(&self) -> Option<Crash> {
        let mut s = self.lock();
        s.calls += 1;
        s.gateways_acknowledge();
        if !s.quiet {
            for _ in 0..=s.flood {
                s.client_write();
            }
        }
        match s.crash {
            Some(Crash::Before(n)) | Some(Crash::After(n)) if n == s.calls => s.crash.take(),
            _ => None,
        }
    }

    /// With etcd down (`State::fail_save_at`), the datanode call about to be made takes
    /// effect and crashes the driver.
    fn crash_if_etcd_down(&self) {
        let mut s = self.lock();
        if s.etcd_down {
            s.etcd_down = false;
            s.crash = Some(Crash::After(s.calls + 1));
        }
    }

    /// Runs one call of the world with the crash injection around it.
    async fn call<T>(&self, effect: impl FnOnce(&mut State) -> Result<T, Failure>) -> Result<T, Failure> {
        // A datanode or etcd answers later, as a real one would: a driver that never waits
        // otherwise (a catch-up always finding changes) still lets a test's timeout fire.
        tokio::task::yield_now().await;
        let crash = self.enter();
        if crash.is_some_and(|c| matches!(c, Crash::Before(_))) {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        let result = effect(&mut self.lock());
        if crash.is_some() {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        result
    }
}

fn member(rs: &str) -> RouteMember {
    RouteMember { id: 1, data_addr: format!("http://{rs}"), zone: "a".into() }
}

impl State {
    pub fn set(&mut self, name: &str) -> &mut ReplicaSet {
        self.sets.get_mut(name).unwrap()
    }

    /// Every gateway that is not silent acknowledges a hold it sees (a gateway's writes
    /// are done at once in the model: none is ever in flight).
    pub fn gateways_acknowledge(&mut self) {
        let Some((route, _)) = &self.route else { return };
        if route.state != RouteState::Holding {
            return;
        }
        let ack =
            nimbus_api::etcd::HoldAck { epoch: route.epoch, hold_deadline_ms: route.hold_deadline_ms, acked_ms: 0 };
        let ack = serde_json::to_vec(&ack).unwrap();
        for g in self.gateways.clone() {
            if !self.silent.contains(&g) {
                self.holds.insert(g, ack.clone());
            }
        }
    }

    /// One client write through the modelled gateways.
    pub fn client_write(&mut self) {
        self.writes += 1;
        let n = self.writes;
        let Some((route, _)) = self.route.clone() else { return };
        if route.state == RouteState::Holding {
            // Held: the client waits (its write is not acknowledged here).
            self.held += 1;
            return;
        }
        let rs = self.set(&route.replica_set);
        if route.epoch < rs.epoch || !rs.serving || rs.incoming.is_some() {
            self.refused += 1;
            return;
        }
        rs.epoch = route.epoch;
        let id = n % IDS;
        let doc = doc_json(id, n);
        rs.applied += 1;
        rs.docs.insert(id, doc.clone());
        rs.idempotency.insert(format!("k{n}"), doc.clone());
        rs.idempotency_ts.insert(format!("k{n}"), rs.applied);
        let entry = OplogEntry {
            index: rs.applied,
            seq: 0,
            ts_ms: 0,
            db: DB.into(),
            coll: Some("c".into()),
            op: OplogOp::Put { id: id.into(), doc: serde_json::from_str(&doc).unwrap() },
        };
        rs.oplog.push(entry);
        self.acked.push((id, n));
    }

    fn access(&self, name: &str) -> Option<ReplicaSetAccess> {
        let rs = self.sets.get(name)?;
        (!rs.gone).then(|| ReplicaSetAccess {
            namespace: String::new(),
            name: name.into(),
            leader_admin: name.into(),
            members: vec![member(name)],
        })
    }

    fn source_name(&self) -> String {
        self.record.as_ref().map_or("a".into(), |(r, _)| r.from_replica_set.clone())
    }

    /// The acknowledged writes' last values by id: what the serving copy must hold.
    pub fn expected(&self) -> BTreeMap<u64, String> {
        let mut want = BTreeMap::new();
        for &(id, v) in &self.acked {
            want.insert(id, doc_json(id, v));
        }
        want
    }
}

fn refused(what: &str) -> Failure {
    Failure::Refused(what.into())
}

#[async_trait]
impl MigrationWorld for Model {
    async fn replica_set(&self, _namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        self.call(|s| Ok(s.access(name))).await
    }

    async fn export(&self, rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure> {
        self.call(|s| {
            let set = s.set(&rs.name);
            let mut page = ExportPage {
                index: set.applied,
                clock_ms: set.applied,
                collections: set.collections.clone(),
                docs: Vec::new(),
                idempotency: Vec::new(),
                next: None,
            };
            match req.part {
                ExportPart::Documents => {
                    let after: Option<u64> = req.after.as_deref().map(|a| a.parse().unwrap());
                    let rest: Vec<(&u64, &String)> =
                        set.docs.iter().filter(|(id, _)| after.is_none_or(|a| **id > a)).collect();
                    for (_, doc) in rest.iter().take(PAGE_DOCS) {
                        page.docs.push(ExportedDoc { coll: "c".into(), doc: raw(doc) });
                    }
                    if rest.len() > PAGE_DOCS {
                        page.next = Some(rest[PAGE_DOCS - 1].0.to_string());
                    }
                }
                ExportPart::Idempotency => {
                    let ts = |k: &String| set.idempotency_ts.get(k).copied().unwrap_or(0);
                    page.idempotency = set
                        .idempotency
                        .iter()
                        .filter(|(k, _)| req.since_ms.is_none_or(|since| ts(k) >= since))
                        .map(|(k, v)| ExportedIdempotency { key: k.clone(), ts_ms: ts(k), record: raw(v) })
                        .collect();
                }
            }
            Ok(page)
        })
        .await
    }

    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        self.crash_if_etcd_down();
        self.call(|s| {
            let source = s.source_name();
            let (source_docs, source_idem, source_epoch) = {
                let src = s.set(&source);
                (src.docs.clone(), src.idempotency.clone(), src.epoch)
            };
            let set = s.set(&rs.name);
            set.applied += 1;
            let index = set.applied;
            let ours = set.incoming.as_deref() == Some(req.migration.as_str());
            match &req.step {
                ImportStep::Begin => {
                    if set.serving {
                        return Err(refused("Begin on a replica set that serves the database"));
                    }
                    set.docs.clear();
                    set.idempotency.clear();
                    set.collections.clear();
                    set.incoming = Some(req.migration.clone());
                }
                ImportStep::Finish { .. } if set.serving && !ours => {} // repeated
                ImportStep::Abort if set.incoming.is_none() && !set.serving => {} // repeated
                _ if !ours => return Err(refused("the database is not incoming for this migration")),
                ImportStep::Publish { .. } => return Err(refused("a migration never publishes")),
                ImportStep::Collections { collections } => {
                    for c in collections {
                        if !set.collections.iter().any(|x| x.name == c.name) {
                            set.collections.push(c.clone());
                        }
                    }
                }
                ImportStep::Docs { docs } => {
                    for d in docs {
                        let v: serde_json::Value = serde_json::from_str(d.doc.get()).unwrap();
                        set.docs.insert(v["_id"].as_u64().unwrap(), d.doc.get().to_owned());
                    }
                }
                ImportStep::Ops { entries } => {
                    for e in entries {
                        match &e.op {
                            OplogOp::Put { id, doc } => {
                                set.docs.insert(id.as_u64().unwrap(), doc.to_string());
                            }
                            OplogOp::Delete { id } => {
                                set.docs.remove(&id.as_u64().unwrap());
                            }
                            _ => {}
                        }
                    }
                }
                ImportStep::Idempotency { records } => {
                    for r in records {
                        set.idempotency.insert(r.key.clone(), r.record.get().to_owned());
                    }
                }
                ImportStep::Finish { epoch } => {
                    if std::mem::take(&mut s.delete_route_at_finish) {
                        s.route = None;
                    }
                    let set = s.set(&rs.name);
                    let mut problems = Vec::new();
                    if set.docs != source_docs {
                        problems.push("the target differs from the source at Finish".to_string());
                    }
                    if !source_idem.keys().all(|k| set.idempotency.contains_key(k)) {
                        problems.push("idempotency records missing on the target at Finish".to_string());
                    }
                    if source_epoch < *epoch {
                        problems.push("Finish before the source was fenced".to_string());
                    }
                    set.serving = true;
                    set.incoming = None;
                    set.epoch = *epoch;
                    s.violations.extend(problems);
                }
                ImportStep::Abort => {
                    if set.serving {
                        return Err(refused("Abort after Finish"));
                    }
                    set.docs.clear();
                    set.idempotency.clear();
                    set.incoming = None;
                    s.silent.clear();
                }
            }
            Ok(ImportAnswer { index })
        })
        .await
    }

    async fn oplog(
        &self,
        rs: &ReplicaSetAccess,
        _db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure> {
        self.call(|s| {
            if std::mem::take(&mut s.truncate_once) {
                s.set(&rs.name).truncated_below = after.index + 1;
            }
            let set = s.set(&rs.name);
            if after.index < set.truncated_below {
                return Err(Failure::OplogTruncated);
            }
            let entries: Vec<OplogEntry> = set
                .oplog
                .iter()
                .filter(|e| OplogPosition { index: e.index, seq: e.seq } > after)
                .take(limit as usize)
                .cloned()
                .collect();
            let next = if entries.len() == limit as usize {
                entries.last().map(|e| OplogPosition { index: e.index, seq: e.seq }).unwrap_or(after)
            } else {
                OplogPosition::end_of(set.applied)
            };
            Ok(DbOplogPage { entries, next: next.max(after), applied_index: set.applied, clock_ms: 0 })
        })
        .await
    }

    async fn pin_oplog(&self, rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure> {
        self.call(|s| {
            s.set(&rs.name).pins.insert(req.name.clone(), req.from_index);
            Ok(())
        })
        .await
    }

    async fn unpin_oplog(&self, rs: &ReplicaSetAccess, name: &str) -> Result<(), Failure> {
        self.call(|s| {
            s.set(&rs.name).pins.remove(name);
            Ok(())
        })
        .await
    }

    async fn fence(&self, rs: &ReplicaSetAccess, _db: &str, epoch: u64) -> Result<FenceAnswer, Failure> {
        self.crash_if_etcd_down();
        self.call(|s| {
            let set = s.set(&rs.name);
            set.epoch = set.epoch.max(epoch);
            set.applied += 1;
            Ok(FenceAnswer { epoch: set.epoch, index: Some(set.applied) })
        })
        .await
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, _db: &str) -> Result<ChecksumMarker, Failure> {
        self.call(|s| {
            let corrupt = rs.name == "b" && std::mem::take(&mut s.corrupt_once);
            let set = s.set(&rs.name);
            set.applied += 1;
            let mut sum = format!("{:?}", set.docs);
            if corrupt {
                sum.push('!');
            }
            Ok(ChecksumMarker {
                index: set.applied,
                checksum: sum,
                documents: set.docs.len() as u64,
                catalog: Some(serde_json::to_value(&set.collections).unwrap()),
            })
        })
        .await
    }

    async fn drop_database(
        &self,
        rs: &ReplicaSetAccess,
        _db: &str,
        max_epoch: Option<u64>,
    ) -> Result<DropOutcome, Failure> {
        self.call(|s| {
            // As the datanode decides it in its log: the newest epoch a write carried there.
            let known = s.set(&rs.name).epoch;
            if max_epoch.is_some_and(|max| known > max) {
                return Ok(DropOutcome::Kept { epoch: Some(known) });
            }
            if s.route.as_ref().is_some_and(|(r, _)| r.replica_set == rs.name) {
                s.violations.push(format!("dropped the database on {}, which the route names", rs.name));
            }
            let set = s.set(&rs.name);
            set.docs.clear();
            set.idempotency.clear();
            set.collections.clear();
            set.serving = false;
            Ok(DropOutcome::Dropped)
        })
        .await
    }

    async fn route(&self, _db: &str) -> Result<Option<(Route, u64)>, Failure> {
        self.call(|s| {
            let read = s.route.clone();
            let cleaning = s.record.as_ref().is_some_and(|(r, _)| r.step == super::record::Step::CleanUp);
            if cleaning && std::mem::take(&mut s.new_instance_on_a_after_cleanup_read) {
                // A new route's epoch is the revision that writes it, above any the name had.
                s.revision += 1;
                let route = Route {
                    replica_set: "a".into(),
                    members: vec![member("a")],
                    epoch: s.revision,
                    state: RouteState::Serving,
                    hold_deadline_ms: None,
                    hold_timeout_ms: None,
                };
                s.route = Some((route, s.revision));
            }
            Ok(read)
        })
        .await
    }

    async fn swap_route(&self, _db: &str, revision: u64, route: &Route, clear_holds: bool) -> Result<bool, Failure> {
        self.call(|s| {
            let Some((current, rev)) = &s.route else { return Ok(false) };
            if *rev != revision {
                return Ok(false);
            }
            if route.epoch < current.epoch {
                s.violations.push(format!("the route's epoch went down from {} to {}", current.epoch, route.epoch));
            }
            let named = s.sets.get(&route.replica_set);
            if !named.is_some_and(|rs| rs.serving && rs.incoming.is_none()) {
                s.violations.push(format!("the route names {}, which has not finished its import", route.replica_set));
            }
            if named.is_some_and(|rs| route.state == RouteState::Serving && route.epoch < rs.epoch) {
                s.violations
                    .push(format!("the route serves {} at a stale epoch: every request is refused", route.replica_set));
            }
            s.revision += 1;
            s.route = Some((route.clone(), s.revision));
            if clear_holds {
                s.holds.clear();
            }
            Ok(true)
        })
        .await
    }

    async fn hold_view(&self, _db: &str) -> Result<HoldView, Failure> {
        self.call(|s| Ok(HoldView { gateways: s.gateways.clone(), acks: s.holds.clone() })).await
    }

    async fn record(&self, _db: &str) -> Result<Option<(MigrationRecord, u64)>, Failure> {
        self.call(|s| Ok(s.record.clone())).await
    }

    async fn records(&self) -> Result<Vec<(MigrationRecord, u64)>, Failure> {
        self.call(|s| Ok(s.record.clone().into_iter().collect())).await
    }

    async fn save_record(&self, record: &MigrationRecord, expected: Option<u64>) -> Result<Option<u64>, Failure> {
        {
            let mut s = self.lock();
            if s.fail_save_at == Some(record.step) {
                s.fail_save_at = None;
                s.etcd_down = true;
            }
            if s.etcd_down {
                return Err(Failure::Transient("etcd did not answer".into()));
            }
        }
        let saved = self
            .call(|s| {
                if s.record.as_ref().map(|(_, rev)| *rev) != expected {
                    return Ok(None);
                }
                s.revision += 1;
                if let Some(e) = &record.error
                    && s.errors.last() != Some(e)
                {
                    s.errors.push(e.clone());
                }
                s.record = Some((record.clone(), s.revision));
                Ok(Some(s.revision))
            })
            .await;
        let crash = {
            let mut s = self.lock();
            let at = s.crash_after_saving.is_some_and(|step| saved.is_ok() && step == record.step);
            if at {
                s.crash_after_saving = None;
            }
            at
        };
        if crash {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        saved
    }
}
