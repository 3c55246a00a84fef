//! A DatabaseRestore cut off by an operator restart after its switch was recorded: the
//! real restore job ([`LiveRestoreRunner`] over a model of the datanodes' import
//! protocol, a filesystem store holding one full) through the in-memory API server with
//! the chart's RBAC. The restarted operator sends the recorded step again and imports
//! nothing; before `status.commit` existed it ran the whole job again, publishing a second
//! time over what clients had written since.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kube::runtime::events::{Recorder, Reporter};
use nimbus_api::etcd::{Route, RouteState};
use nimbus_api::migration::{
    DbOplogPage, ExportPage, ExportRequest, ImportAnswer, ImportRequest, ImportStep, OplogPosition, PinOplogRequest,
};
use serde_json::{Value, json};

use super::backup::BackupArgs;
use super::fixtures::{FakeApi, INSTANCES, NS};
use super::restore::{self, RestoreContext, RestoreRunner};
use super::restore_runner::LiveRestoreRunner;
use crate::controlplane::backup::agent::{ArchiveRecord, BackupWorld};
use crate::controlplane::backup::restore::RestoreWorld;
use crate::controlplane::backup::{
    FORMAT_VERSION, FullId, FullManifest, Incarnation, Lineage, NewSegment, OpenedStorage,
};
use crate::controlplane::migration::{ChecksumMarker, Failure, ReplicaSetAccess};

const RESTORES: &str = "/apis/nimbus.io/v1alpha1/namespaces/apps/databaserestores";
const RS: &str = "default-rs0";
const EPOCH: u64 = 3;
/// The full's end: what a restore to `latest` (no archived change after it) reaches.
const FULL_END_MS: u64 = 1_767_225_600_000;

/// Where a model's switch (`Publish` or `Finish`) stops, like an operator whose process
/// ends there: never answered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// Before it reaches the datanode.
    Before,
    /// Once it took effect.
    After,
}

/// One replica set, `RS`, serving every database at `EPOCH`, with the import protocol's
/// rules for the steps a restore sends (`datanode/src/store/import.rs`).
#[derive(Default)]
struct Model {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Every import step received: (database, step, import id).
    steps: Vec<(String, &'static str, String)>,
    /// The import each database is incoming for.
    incoming: std::collections::BTreeMap<String, String>,
    /// How each database's last import ended: (import id, published into / finished).
    outcome: std::collections::BTreeMap<String, (String, String)>,
    /// Switches that took effect: (import id, database switched).
    applied: Vec<(String, String)>,
    /// The first switch is cut so.
    cut: Option<Cut>,
}

impl Model {
    fn cut(at: Cut) -> Arc<Model> {
        let m = Model::default();
        m.inner.lock().unwrap().cut = Some(at);
        Arc::new(m)
    }
    fn steps(&self) -> Vec<(String, &'static str, String)> {
        self.inner.lock().unwrap().steps.clone()
    }
    fn applied(&self) -> Vec<(String, String)> {
        self.inner.lock().unwrap().applied.clone()
    }
}

fn refused(m: String) -> Failure {
    Failure::Refused(m)
}

impl Inner {
    /// `req` as the datanode applies it; `switch`: the database a `Publish` or `Finish`
    /// switches.
    fn apply(&mut self, req: &ImportRequest, switch: Option<String>) -> Result<(), Failure> {
        let db = req.db.clone();
        let ours = self.incoming.get(&db) == Some(&req.migration);
        match (&req.step, switch) {
            (ImportStep::Begin, _) => {
                self.incoming.insert(db, req.migration.clone());
            }
            (_, Some(into)) if ours => {
                self.incoming.remove(&db);
                self.outcome.insert(db, (req.migration.clone(), into.clone()));
                self.applied.push((req.migration.clone(), into));
            }
            // Repeated after it took effect: answered as the first time.
            (_, Some(into)) if self.outcome.get(&db) == Some(&(req.migration.clone(), into.clone())) => {}
            (ImportStep::Abort, _) if !ours => {}
            (ImportStep::Abort, _) => {
                self.incoming.remove(&db);
            }
            _ if !ours => return Err(refused(format!("database {db} is not being imported by {}", req.migration))),
            _ => {}
        }
        Ok(())
    }
}

#[async_trait]
impl RestoreWorld for Model {
    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        assert_eq!(rs.name, RS);
        let cut = {
            let mut m = self.inner.lock().unwrap();
            m.steps.push((req.db.clone(), req.step.kind(), req.migration.clone()));
            let switch = match &req.step {
                ImportStep::Publish { into, .. } => Some(into.clone()),
                ImportStep::Finish { .. } => Some(req.db.clone()),
                _ => None,
            };
            let cut = if switch.is_some() { m.cut.take() } else { None };
            if cut != Some(Cut::Before) {
                m.apply(req, switch)?;
            }
            cut
        };
        if cut.is_some() {
            // The operator's process ends here: the answer never comes.
            std::future::pending::<()>().await;
        }
        Ok(ImportAnswer { index: 1 })
    }

    async fn checksum(&self, _rs: &ReplicaSetAccess, _db: &str) -> Result<ChecksumMarker, Failure> {
        Ok(ChecksumMarker { index: 1, checksum: "sum".into(), documents: 3, catalog: None })
    }
}

#[async_trait]
impl BackupWorld for Model {
    async fn route(&self, _db: &str) -> Result<Option<Route>, Failure> {
        Ok(Some(Route {
            replica_set: RS.into(),
            members: vec![],
            epoch: EPOCH,
            state: RouteState::Serving,
            hold_deadline_ms: None,
            hold_timeout_ms: None,
        }))
    }
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        Ok((name == RS).then(|| ReplicaSetAccess {
            namespace: namespace.into(),
            name: name.into(),
            leader_admin: "http://leader".into(),
            members: vec![],
        }))
    }
    async fn export(&self, _rs: &ReplicaSetAccess, _req: &ExportRequest) -> Result<ExportPage, Failure> {
        Err(Failure::Gone("a restore exports nothing".into()))
    }
    async fn oplog(&self, _: &ReplicaSetAccess, _: &str, _: OplogPosition, _: u32) -> Result<DbOplogPage, Failure> {
        Err(Failure::Gone("a restore reads no oplog".into()))
    }
    async fn pin_oplog(&self, _rs: &ReplicaSetAccess, _req: &PinOplogRequest) -> Result<(), Failure> {
        Err(Failure::Gone("a restore pins no oplog".into()))
    }
    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        RestoreWorld::checksum(self, rs, db).await
    }
    async fn archive_record(&self, _: &str, _: &Incarnation) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
        Ok(None)
    }
    async fn save_archive_record(&self, _: &ArchiveRecord, _: Option<u64>) -> Result<Option<u64>, Failure> {
        Ok(Some(1))
    }
    async fn delete_archive_record(&self, _: &str, _: &Incarnation) -> Result<(), Failure> {
        Ok(())
    }
}

/// A store holding one full of `shopdb` (the source's database, incarnation `uid-shop`)
/// ending at [`FULL_END_MS`].
async fn storage(dir: &std::path::Path) -> OpenedStorage {
    let args = BackupArgs { backup_dir: Some(dir.join("backups")), ..BackupArgs::default() };
    let (_, storage) = args.open_with(|_| None).unwrap().unwrap();
    let store = storage.backup_store(NS, "shopdb", &Incarnation::new("uid-shop").unwrap()).unwrap();
    let page: ExportPage = serde_json::from_value(json!({
        "index": 10, "clockMs": FULL_END_MS,
        "collections": [{"name": "orders", "indexes": []}],
        "docs": (0..3).map(|i| json!({"coll": "orders", "doc": {"_id": i, "total": i}})).collect::<Vec<_>>(),
        "idempotency": []
    }))
    .unwrap();
    let id = FullId::new(FULL_END_MS - 1_000, 1);
    let entry = store.put_page(&id, 0, &page).await.unwrap();
    let manifest = FullManifest {
        format: FORMAT_VERSION,
        id,
        db: "shopdb".into(),
        lineage: Lineage::new(&format!("{RS}.e1")).unwrap(),
        start: OplogPosition::end_of(10),
        end: OplogPosition::end_of(10),
        start_ms: FULL_END_MS - 1_000,
        end_ms: FULL_END_MS,
        docs: 3,
        bytes: entry.bytes,
        pages: vec![entry],
        checksum: None,
    };
    store.put_manifest(&manifest).await.unwrap();
    // The archive through the full's end (no change since): the window reaches it.
    let segment = NewSegment {
        lineage: Lineage::new(&format!("{RS}.e1")).unwrap(),
        after: OplogPosition::end_of(8),
        through: OplogPosition::end_of(10),
        covered_through_ms: FULL_END_MS,
        entries: vec![],
    };
    store.put_segment(&segment).await.unwrap();
    storage
}

/// An operator: its own context (no run known), the real runner over `world`.
fn operator(api: &FakeApi, world: &Arc<Model>, storage: &OpenedStorage) -> Arc<RestoreContext> {
    let client = api.client();
    let reporter = Reporter { controller: "nimbus-operator".into(), instance: Some("test".into()) };
    let runner = LiveRestoreRunner { world: world.clone(), storage: storage.clone() };
    Arc::new(RestoreContext {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        runner: Some(Arc::new(runner) as Arc<dyn RestoreRunner>),
        jobs: Default::default(),
        poll: Duration::from_millis(10),
    })
}

fn cluster(restore: Value) -> FakeApi {
    let api = FakeApi::default();
    for (name, db) in [("shop", "shopdb"), ("shop-copy", "shop-copy")] {
        api.put(
            INSTANCES,
            json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
                "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1,
                             "annotations": {restore::ANNOTATION_RESTORED_BY: "undo/uid-undo"}},
                "spec": {"database": db},
                "status": {"phase": "Ready", "database": db, "placement": {"replicaSet": RS, "pool": "default"}}}),
        );
    }
    api.put(
        RESTORES,
        json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseRestore",
            "metadata": {"name": "undo", "namespace": NS, "uid": "uid-undo", "generation": 1},
            "spec": restore}),
    );
    api
}

fn status(api: &FakeApi) -> Value {
    api.get(RESTORES, "undo").unwrap()["status"].clone()
}

/// Reconciles with `ctx` until `done` holds of the status (or of the model).
async fn until(api: &FakeApi, ctx: &Arc<RestoreContext>, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dbr = serde_json::from_value(api.get(RESTORES, "undo").unwrap()).unwrap();
        restore::reconcile(Arc::new(dbr), ctx.clone()).await.unwrap();
        let status = status(api);
        if done(&status) {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {what}: {status:#}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs restore `undo` of `spec` until its switch is recorded and reached the datanode
/// (cut there as `cut` says), restarts the operator, and reconciles until the restore
/// ended: the model, the steps before the restart, the recorded commit, the final status.
async fn restart_at_the_switch(spec: Value, cut: Cut) -> (Arc<Model>, usize, Value, Value) {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path()).await;
    let api = cluster(spec);
    let world = Model::cut(cut);
    let first = operator(&api, &world, &storage);
    let recorded = until(&api, &first, "recorded its switch", |s| {
        s["commit"].is_object() && world.steps().iter().any(|(_, step, _)| matches!(*step, "Publish" | "Finish"))
    })
    .await["commit"]
        .clone();
    let before = world.steps().len();
    // The operator restarts: its run (stuck at the switch) and what it knew are gone.
    drop(first);
    let second = operator(&api, &world, &storage);
    let status = until(&api, &second, "ended", |s| matches!(s["phase"].as_str(), Some("Succeeded" | "Failed"))).await;
    (world, before, recorded, status)
}

fn in_place() -> Value {
    json!({"source": "shop", "toTime": "latest", "target": {"mode": "InPlace"}})
}

#[tokio::test]
async fn a_restart_after_the_publish_sends_the_same_publish_again_and_imports_nothing() {
    let (world, before, recorded, status) = restart_at_the_switch(in_place(), Cut::After).await;
    // `restore-{uid}-{run}`, then the job's attempt.
    let import = "restore-uid-undo-1-1";
    assert_eq!(recorded["importId"], import, "{recorded:#}");
    assert_eq!((recorded["step"].as_str(), recorded["database"].as_str()), (Some("Publish"), Some("shopdb")));
    assert_eq!((recorded["replicaSet"].as_str(), recorded["routeEpoch"].as_u64()), (Some(RS), Some(EPOCH)));
    assert_eq!(recorded["whole"], true);
    // After the restart: the same Publish, nothing imported again (before the fix: a second
    // attempt, `Begin` of `restore-uid-undo-2`, its documents, and a second Publish).
    let after: Vec<_> = world.steps()[before..].iter().map(|(db, s, id)| (db.clone(), *s, id.clone())).collect();
    assert_eq!(after, [("shopdb~restore".to_owned(), "Publish", import.to_owned())]);
    assert_eq!(world.applied(), [(import.to_owned(), "shopdb".to_owned())], "published once");
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    assert_eq!(status["restoredTo"], recorded["restoredTo"]);
    assert_eq!(status["restoredTo"], "2026-01-01T00:00:00.000Z");
    assert_eq!((status["documents"].as_u64(), status["documents"].as_u64()), (Some(3), recorded["documents"].as_u64()));
    assert_eq!(status["bytes"], recorded["bytes"]);
    assert_eq!(status["attempts"], 2);
    assert_eq!(status["commit"], recorded, "the record stays, naming what was published");
}

#[tokio::test]
async fn a_restart_between_the_record_and_the_publish_publishes_the_recorded_import() {
    let (world, before, recorded, status) = restart_at_the_switch(in_place(), Cut::Before).await;
    let import = recorded["importId"].as_str().unwrap().to_owned();
    let after: Vec<&'static str> = world.steps()[before..].iter().map(|(_, s, _)| *s).collect();
    assert_eq!(after, ["Publish"]);
    assert_eq!(world.applied(), [(import, "shopdb".to_owned())]);
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
}

#[tokio::test]
async fn a_restart_after_a_new_instances_finish_sends_the_same_finish_again() {
    // Before the fix, the restarted operator imported again (`Begin` on the database the
    // first run finished: a datanode refuses it, so the restore failed though it had
    // succeeded; this model does not refuse it, the steps show it).
    let spec =
        json!({"source": "shop", "toTime": "latest", "target": {"mode": "NewInstance", "instance": "shop-copy"}});
    let (world, before, recorded, status) = restart_at_the_switch(spec, Cut::After).await;
    assert_eq!((recorded["step"].as_str(), recorded["database"].as_str()), (Some("Finish"), Some("shop-copy")));
    let after: Vec<_> = world.steps()[before..].iter().map(|(db, s, _)| (db.clone(), *s)).collect();
    assert_eq!(after, [("shop-copy".to_owned(), "Finish")]);
    assert_eq!(world.applied().len(), 1);
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    assert_eq!(status["restoredTo"], recorded["restoredTo"]);
}

#[tokio::test]
async fn a_recorded_publish_refused_when_sent_again_fails_the_restore_and_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage(dir.path()).await;
    let api = cluster(in_place());
    let world = Model::cut(Cut::Before);
    let first = operator(&api, &world, &storage);
    until(&api, &first, "recorded its switch", |s| s["commit"].is_object()).await;
    drop(first);
    // Meanwhile the import went away (dropped by another import of the staging database).
    world.inner.lock().unwrap().incoming.clear();
    let before = world.steps().len();
    let second = operator(&api, &world, &storage);
    let status = until(&api, &second, "ended", |s| matches!(s["phase"].as_str(), Some("Succeeded" | "Failed"))).await;
    assert_eq!(status["phase"], "Failed", "{status:#}");
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("was refused when sent again"), "{message}");
    let after: Vec<&'static str> = world.steps()[before..].iter().map(|(_, s, _)| *s).collect();
    assert_eq!(after, ["Publish", "Abort"], "nothing imported again");
    assert!(world.applied().is_empty());
}
