//! Test fixtures: the in-memory Kubernetes API server ([`super::fake`], which enforces the
//! chart's RBAC) with its stand-in kubelet, and recording datanodes and etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use nimbus_api::admin::{MemberInfo, Role, Status};
use nimbus_api::etcd::{Limits, ReplicaSetRecord, RouteMember, TenantClaim, UserRecord};
use serde_json::{Value, json};

use super::failure::{Clock, Failover};
pub use super::fake::rbac::Rbac;
pub use super::fake::{DELETION_TIME, FakeApi};
use super::instance::Context;
use super::metrics::Metrics;
use super::migration::Migrations;
use super::objects::Settings;
use crate::controlplane::{AdminError, ControlStore, CoordError, Datanodes};

/// A replica set's Raft state as the recording datanodes model it.
#[derive(Debug, Default)]
pub struct RaftModel {
    pub initialized: bool,
    pub leader: u64,
    pub members: BTreeMap<u64, MemberInfo>,
    pub voters: BTreeSet<u64>,
    /// Every call, in order, as text: `init [1, 2, 3]`, `add_learner 4`, ...
    pub log: Vec<String>,
    /// `GET /v1/status` calls answered.
    pub status_calls: u64,
    /// The namespaces whose datanodes were called (with that namespace's secret).
    pub namespaces: BTreeSet<String>,
    /// No member knows a leader (an election that does not conclude: a majority down).
    pub leaderless: bool,
}

/// Datanodes as the reconciler sees them. The root one (the context's) refuses every call:
/// only its [`Datanodes::in_namespace`] views answer, so a call made without the
/// namespace's secret fails the test.
#[derive(Clone, Default)]
pub struct FakeDatanodes(pub Arc<Mutex<RaftModel>>, pub Option<String>);

impl FakeDatanodes {
    fn model(&self) -> std::sync::MutexGuard<'_, RaftModel> {
        assert!(self.1.is_some(), "a datanode call without the namespace's secret (no in_namespace)");
        self.0.lock().unwrap()
    }
}

fn id_of(addr: &str) -> u64 {
    // http://10.1.0.<id>:port
    addr.rsplit('.').next().and_then(|s| s.split(':').next()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[async_trait]
impl Datanodes for FakeDatanodes {
    fn in_namespace(&self, namespace: &str) -> Arc<dyn Datanodes> {
        self.0.lock().unwrap().namespaces.insert(namespace.to_owned());
        Arc::new(FakeDatanodes(self.0.clone(), Some(namespace.to_owned())))
    }
    async fn status(&self, admin: &str) -> Option<Status> {
        let mut m = self.model();
        m.status_calls += 1;
        let id = id_of(admin);
        let members: Vec<MemberInfo> =
            m.members.values().map(|x| MemberInfo { voter: m.voters.contains(&x.id), ..x.clone() }).collect();
        let role = if !m.initialized || !m.members.contains_key(&id) || m.leaderless {
            Role::Candidate
        } else if id == m.leader {
            Role::Leader
        } else if m.voters.contains(&id) {
            Role::Follower
        } else {
            Role::Learner
        };
        Some(Status {
            id,
            zone: String::new(),
            replica_set: String::new(),
            role,
            term: 1,
            leader_id: (m.initialized && !m.leaderless).then_some(m.leader),
            commit_index: 10,
            applied_index: 10,
            members: if m.initialized && m.members.contains_key(&id) { members } else { vec![] },
            replication_lag: m.members.keys().map(|k| (*k, 0)).collect(),
            snapshot_index: None,
            purged_index: None,
            oplog_first_index: None,
            draining: false,
        })
    }
    async fn init(&self, admin: &str, members: Vec<MemberInfo>) -> Result<(), AdminError> {
        let mut m = self.model();
        m.initialized = true;
        m.leader = id_of(admin);
        m.voters = members.iter().map(|x| x.id).collect();
        m.members = members.iter().map(|x| (x.id, x.clone())).collect();
        let ids: Vec<u64> = members.iter().map(|x| x.id).collect();
        m.log.push(format!("init {ids:?}"));
        Ok(())
    }
    async fn add_learner(&self, _leader: &str, member: MemberInfo) -> Result<(), AdminError> {
        let mut m = self.model();
        m.log.push(format!("add_learner {}", member.id));
        m.members.insert(member.id, member);
        Ok(())
    }
    async fn change_voters(&self, _leader: &str, voters: &BTreeSet<u64>) -> Result<(), AdminError> {
        let mut m = self.model();
        m.log.push(format!("change_voters {:?}", voters.iter().collect::<Vec<_>>()));
        m.voters = voters.clone();
        Ok(())
    }
    async fn remove_member(&self, _leader: &str, id: u64) -> Result<(), AdminError> {
        let mut m = self.model();
        m.log.push(format!("remove_member {id}"));
        m.voters.remove(&id);
        m.members.remove(&id);
        Ok(())
    }
    async fn transfer_leader(&self, _leader: &str, to: u64) -> Result<(), AdminError> {
        let mut m = self.model();
        m.log.push(format!("transfer_leader {to}"));
        m.leader = to;
        Ok(())
    }
    async fn drop_database(&self, leader: &str, db: &str) -> Result<(), AdminError> {
        self.model().log.push(format!("drop_database {db} via {leader}"));
        Ok(())
    }
    async fn fence(&self, leader: &str, db: &str, epoch: u64) -> Result<(), AdminError> {
        self.model().log.push(format!("fence {db} at {epoch} via {leader}"));
        Ok(())
    }
}

/// etcd as the operator writes it: key → JSON, and the number of writes that changed
/// something (etcd keeps a revision of each until compaction); a write of the value a key
/// holds is skipped, as `Coordinator::put_json` skips it.
#[derive(Clone, Default)]
pub struct FakeStore(pub Arc<Mutex<BTreeMap<String, Value>>>, pub Arc<AtomicU64>);

impl FakeStore {
    fn put(&self, key: String, value: Value) -> bool {
        let old = self.0.lock().unwrap().insert(key, value.clone());
        let changed = old.as_ref() != Some(&value);
        if changed {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    /// Writes that changed a key since the store was made.
    /// Whether `claim`'s instance holds `db`'s claim.
    fn holds(&self, db: &str, claim: &TenantClaim) -> bool {
        self.0
            .lock()
            .unwrap()
            .get(&nimbus_api::etcd::tenant_key(db))
            .is_some_and(|c| c["uid"] == claim.uid.as_str() && c["namespace"] == claim.namespace.as_str())
    }

    pub fn writes(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl ControlStore for FakeStore {
    async fn create_route(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError> {
        let key = nimbus_api::etcd::route_key(db);
        if self.0.lock().unwrap().contains_key(&key) || !self.holds(db, claim) {
            return Ok(false);
        }
        let route = nimbus_api::etcd::Route {
            replica_set: replica_set.to_owned(),
            members,
            epoch: self.writes() + 1,
            state: nimbus_api::etcd::RouteState::Serving,
            hold_deadline_ms: None,
            hold_timeout_ms: None,
        };
        Ok(self.put(key, serde_json::to_value(route).unwrap()))
    }
    async fn update_route_members(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError> {
        let key = nimbus_api::etcd::route_key(db);
        let Some(mut route) = self.0.lock().unwrap().get(&key).cloned() else { return Ok(false) };
        if route["replicaSet"] != replica_set || !self.holds(db, claim) {
            return Ok(false);
        }
        route["members"] = serde_json::to_value(members).unwrap();
        Ok(self.put(key, route))
    }
    async fn put_user(&self, db: &str, user: &str, record: &UserRecord) -> Result<(), CoordError> {
        self.put(nimbus_api::etcd::user_key(db, user), serde_json::to_value(record).unwrap());
        Ok(())
    }
    async fn put_limits(&self, db: &str, limits: &Limits) -> Result<(), CoordError> {
        self.put(nimbus_api::etcd::limits_key(db), serde_json::to_value(limits).unwrap());
        Ok(())
    }
    async fn delete_database(&self, db: &str, claim: &TenantClaim, placed: bool) -> Result<bool, CoordError> {
        if self.claim_database(db, claim, placed).await?.is_err() {
            return Ok(false);
        }
        let mut kv = self.0.lock().unwrap();
        kv.retain(|k, _| {
            !(k == &nimbus_api::etcd::route_key(db)
                || k == &nimbus_api::etcd::limits_key(db)
                || k == &nimbus_api::etcd::tenant_key(db)
                || k.starts_with(&format!("{}{db}/", nimbus_api::etcd::USERS))
                || k.starts_with(&format!("{}{db}/", nimbus_api::etcd::HOLDS)))
        });
        Ok(true)
    }
    async fn retain_users(&self, db: &str, keep: &[String]) -> Result<Vec<String>, CoordError> {
        let prefix = format!("{}{db}/", nimbus_api::etcd::USERS);
        let mut kv = self.0.lock().unwrap();
        let removed: Vec<String> = kv
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|name| !keep.iter().any(|n| n == name))
            .map(str::to_string)
            .collect();
        for name in &removed {
            kv.remove(&format!("{prefix}{name}"));
        }
        Ok(removed)
    }
    async fn claim_database(
        &self,
        db: &str,
        claim: &TenantClaim,
        placed: bool,
    ) -> Result<Result<(), TenantClaim>, CoordError> {
        let mut kv = self.0.lock().unwrap();
        let key = nimbus_api::etcd::tenant_key(db);
        if !kv.contains_key(&key) {
            if !placed && kv.contains_key(&nimbus_api::etcd::route_key(db)) {
                return Ok(Err(TenantClaim { namespace: String::new(), instance: String::new(), uid: String::new() }));
            }
            self.1.fetch_add(1, Ordering::Relaxed);
        }
        let current: TenantClaim =
            serde_json::from_value(kv.entry(key).or_insert_with(|| serde_json::to_value(claim).unwrap()).clone())
                .unwrap();
        Ok(if current.uid == claim.uid { Ok(()) } else { Err(current) })
    }
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetRecord>, CoordError> {
        let kv = self.0.lock().unwrap();
        Ok(kv
            .get(&nimbus_api::etcd::replica_set_key(namespace, name))
            .map(|v| serde_json::from_value(v.clone()).unwrap()))
    }
    async fn record_replica_set(
        &self,
        namespace: &str,
        name: &str,
        record: &ReplicaSetRecord,
    ) -> Result<(), CoordError> {
        let mut kv = self.0.lock().unwrap();
        let key = nimbus_api::etcd::replica_set_key(namespace, name);
        if !kv.contains_key(&key) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
        kv.entry(key).or_insert_with(|| serde_json::to_value(record).unwrap());
        Ok(())
    }
    async fn forget_replica_set(&self, namespace: &str, name: &str) -> Result<(), CoordError> {
        self.0.lock().unwrap().remove(&nimbus_api::etcd::replica_set_key(namespace, name));
        Ok(())
    }
    async fn databases_on(&self, namespace: &str, replica_set: &str) -> Result<Vec<String>, CoordError> {
        let kv = self.0.lock().unwrap();
        let claimed_here =
            |db: &str| kv.get(&nimbus_api::etcd::tenant_key(db)).is_none_or(|c| c["namespace"] == namespace);
        Ok(kv
            .iter()
            .filter_map(|(k, route)| Some((k.strip_prefix(nimbus_api::etcd::ROUTES)?, route)))
            .filter(|(db, route)| route["replicaSet"] == replica_set && claimed_here(db))
            .map(|(db, _)| db.to_owned())
            .collect())
    }
}

/// Everything a reconciler scenario needs.
pub struct World {
    pub api: FakeApi,
    /// The node watch's stand-in: refreshed from the fake API before each pass.
    pub nodes: Arc<Mutex<Writer<Node>>>,
    pub datanodes: FakeDatanodes,
    pub store: FakeStore,
    pub ctx: Arc<Context>,
    /// The migrations' world: routes and records in [`FakeStore`], replica sets from the
    /// fake API's Services, the datanode calls modelled.
    pub migration: FakeMigrationWorld,
}

pub const NS: &str = "apps";
pub const NODES: &str = "/api/v1/nodes";
/// The operator's failure period in the scenarios; its clock is fixed at [`start`] and
/// moved by the scenario (`w.ctx.failover.clock.advance`).
pub const FAILURE_PERIOD: Duration = Duration::from_secs(300);

pub fn start() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

/// A Ready node in `zone`.
pub fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
}
pub const INSTANCES: &str = "/apis/nimbus.io/v1alpha1/namespaces/apps/databaseinstances";
pub const PODS: &str = "/api/v1/namespaces/apps/pods";
pub const PVCS: &str = "/api/v1/namespaces/apps/persistentvolumeclaims";
pub const SERVICES: &str = "/api/v1/namespaces/apps/services";
pub const SECRETS: &str = "/api/v1/namespaces/apps/secrets";

impl World {
    /// Three nodes in zones a, b, c and nothing else.
    pub fn new() -> World {
        let api = FakeApi::default();
        for (i, z) in ["zone-a", "zone-b", "zone-c"].iter().enumerate() {
            api.put(NODES, node(&format!("node-{i}"), z));
        }
        let client = api.client();
        let datanodes = FakeDatanodes::default();
        let store = FakeStore::default();
        let migration_world = FakeMigrationWorld::new(store.clone(), api.clone());
        let reporter = Reporter { controller: "nimbus-operator".into(), instance: Some("test".into()) };
        let writer = Writer::<Node>::default();
        let reader = writer.as_reader();
        let ctx = Arc::new(Context {
            client: client.clone(),
            settings: Settings::default(),
            datanodes: Arc::new(datanodes.clone()),
            store: Arc::new(store.clone()),
            recorder: Recorder::new(client, reporter),
            metrics: Metrics,
            reports: Default::default(),
            backoff: Default::default(),
            failover: Failover { period: FAILURE_PERIOD, clock: Clock::fixed(start()) },
            nodes: reader,
            migrations: Migrations::new(Arc::new(migration_world.clone()), migration_tuning()),
            backups: Arc::new(super::backup::Backups::off()),
        });
        let w = World { api, nodes: Arc::new(Mutex::new(writer)), datanodes, store, ctx, migration: migration_world };
        w.sync_nodes();
        w
    }

    /// The node watch catches up with the API (a relist): what a reconcile reads.
    pub fn sync_nodes(&self) {
        let mut writer = self.nodes.lock().unwrap();
        writer.apply_watcher_event(&watcher::Event::Init);
        for n in self.api.list(NODES) {
            writer.apply_watcher_event(&watcher::Event::InitApply(serde_json::from_value(n).unwrap()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }

    pub fn add_instance(&self, name: &str, spec: Value, finalized: bool) {
        let mut obj = json!({"apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
            "spec": spec});
        if finalized {
            obj["metadata"]["finalizers"] = json!([super::instance::FINALIZER]);
        }
        self.api.put(INSTANCES, obj);
    }

    pub fn instance(&self, name: &str) -> crate::crd::v1alpha1::DatabaseInstance {
        serde_json::from_value(self.api.get(INSTANCES, name).expect("instance exists")).unwrap()
    }

    /// One reconcile of the instance's replica set once it is placed (as its controller
    /// would, woken by the Pods the kubelet last changed), then one of `name` as its
    /// controller would run it (reading what the replica set reported), then the kubelet.
    /// The first error, if any. (One replica set: the recording datanodes model one Raft
    /// group.)
    pub async fn reconcile(&self, name: &str) -> Result<kube::runtime::controller::Action, super::Error> {
        let placed = self
            .api
            .get(INSTANCES, name)
            .and_then(|i| i["status"]["placement"]["replicaSet"].as_str().map(str::to_owned));
        let rs = match placed {
            Some(rs) => self.reconcile_replica_set(&rs).await,
            None => Ok(()),
        };
        let r = super::instance::reconcile(Arc::new(self.instance(name)), self.ctx.clone()).await;
        self.api.kubelet(NS);
        rs?;
        r
    }

    /// One reconcile of a replica set (its Service), if it exists.
    pub async fn reconcile_replica_set(&self, rs: &str) -> Result<(), super::Error> {
        let Some(svc) = self.api.get(SERVICES, rs) else { return Ok(()) };
        self.sync_nodes();
        let mut svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(svc).unwrap();
        svc.metadata.namespace.get_or_insert_with(|| NS.to_owned());
        super::replicaset::reconcile(Arc::new(svc), self.ctx.clone()).await.map(|_| ())
    }

    /// Reconciles until the instance reports `phase`, at most `max` times.
    pub async fn reconcile_until_phase(&self, name: &str, phase: &str, max: usize) {
        for _ in 0..max {
            self.reconcile(name).await.unwrap();
            if self.api.get(INSTANCES, name).unwrap()["status"]["phase"] == phase {
                return;
            }
        }
        panic!("{name} never reached {phase}: {:#}", self.api.get(INSTANCES, name).unwrap()["status"]);
    }

    /// The same world, reconciled by an operator with other settings (an upgrade).
    pub fn with_settings(self, settings: Settings) -> World {
        let ctx = Arc::new(Context {
            client: self.ctx.client.clone(),
            settings,
            datanodes: self.ctx.datanodes.clone(),
            store: self.ctx.store.clone(),
            recorder: self.ctx.recorder.clone(),
            metrics: Metrics,
            reports: self.ctx.reports.clone(),
            backoff: self.ctx.backoff.clone(),
            failover: self.ctx.failover.clone(),
            nodes: self.ctx.nodes.clone(),
            migrations: self.ctx.migrations.clone(),
            backups: self.ctx.backups.clone(),
        });
        World { ctx, ..self }
    }

    /// A node stops answering: the node controller marks it NotReady (Ready `Unknown`) and
    /// its Pods not Ready, and with `evict` deletes them (taint-based eviction), so they
    /// stay Terminating: no kubelet is left to stop them.
    pub fn lose_node(&self, name: &str, evict: bool) {
        let mut n = self.api.get(NODES, name).expect("the node exists");
        n["status"]["conditions"] = json!([{"type": "Ready", "status": "Unknown"}]);
        self.api.put(NODES, n);
        for mut pod in self.api.list(PODS).into_iter().filter(|p| p["spec"]["nodeName"] == name) {
            pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
            let pod_name = pod["metadata"]["name"].as_str().unwrap().to_owned();
            self.api.put(PODS, pod);
            if evict {
                self.api.delete(PODS, &pod_name);
            }
        }
    }

    /// Garbage collection, which the fake API does not model: a Service, Pod or PDB whose
    /// owners (instances, pools) are all gone is deleted; then the kubelet, so its Pods go
    /// and the volumes they held are released (pvc-protection).
    pub fn collect_garbage(&self) {
        let pools = format!("/apis/nimbus.io/v1alpha1/namespaces/{NS}/resourcepools");
        let pdbs = format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets");
        let uid = |o: &Value| o["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        let alive: BTreeSet<String> =
            [INSTANCES, pools.as_str()].iter().flat_map(|c| self.api.list(c)).map(|o| uid(&o)).collect();
        for collection in [SERVICES, PODS, pdbs.as_str()] {
            for o in self.api.list(collection) {
                let owners = o["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
                if !owners.is_empty() && owners.iter().all(|r| r["uid"].as_str().is_none_or(|u| !alive.contains(u))) {
                    self.api.delete(collection, o["metadata"]["name"].as_str().unwrap());
                }
            }
        }
        self.api.kubelet(NS);
    }

    /// How long the scenario's clock has moved on.
    pub fn wait(&self, d: Duration) {
        self.ctx.failover.clock.advance(d);
    }

    pub fn raft_log(&self) -> Vec<String> {
        self.datanodes.0.lock().unwrap().log.clone()
    }
}

/// The tuning of the scenarios' migrations: no pause between steps, a retry only when the
/// scenario moves the record's time (`next_retry_ms`), clean-up at once.
pub fn migration_tuning() -> crate::controlplane::migration::Tuning {
    crate::controlplane::migration::Tuning {
        retry_first: Duration::from_secs(3_600),
        retry_max: Duration::from_secs(3_600),
        step_retry: Duration::from_millis(1),
        cleanup_grace: Duration::ZERO,
        poll: Duration::from_millis(1),
        copy_bytes_per_sec: u64::MAX,
        ..Default::default()
    }
}

/// What the modelled datanodes of a migration hold and did.
#[derive(Debug, Default)]
pub struct MigrationModel {
    /// Documents the source exports, two per page.
    pub documents: u64,
    /// Attempts whose checksums differ (the first ones): each aborts.
    pub mismatches: u32,
    /// Every datanode call, in order: `export default-rs0`, `import big-rs0 Begin`, ...
    pub calls: Vec<String>,
    /// Record revisions, by database.
    pub revisions: BTreeMap<String, u64>,
    /// After this many more record writes, every write is refused (as if another control
    /// plane took the record over): the driver stops there, as a crashed one would.
    pub saves_left: Option<u32>,
}

/// The migration's world for the scenarios: routes and migration records in the
/// [`FakeStore`] (the keys the real coordinator uses), a replica set exists while its
/// Service does in the fake API, and the datanode calls answer from [`MigrationModel`].
#[derive(Clone)]
pub struct FakeMigrationWorld {
    pub store: FakeStore,
    pub api: FakeApi,
    pub model: Arc<Mutex<MigrationModel>>,
}

fn revision_of(v: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

impl FakeMigrationWorld {
    pub fn new(store: FakeStore, api: FakeApi) -> FakeMigrationWorld {
        FakeMigrationWorld { store, api, model: Default::default() }
    }

    fn call(&self, what: String) {
        self.model.lock().unwrap().calls.push(what);
    }

    pub fn calls(&self) -> Vec<String> {
        self.model.lock().unwrap().calls.clone()
    }

    /// The record of `db`'s migration, as persisted.
    pub fn record_of(&self, db: &str) -> Option<crate::controlplane::migration::MigrationRecord> {
        let v = self.store.0.lock().unwrap().get(&nimbus_api::etcd::migration_key(db)).cloned()?;
        Some(serde_json::from_value(v).unwrap())
    }

    /// Writes `db`'s record as a driver would (a step the scenario sets up).
    pub fn put_record(&self, record: &crate::controlplane::migration::MigrationRecord) {
        let mut m = self.model.lock().unwrap();
        *m.revisions.entry(record.db.clone()).or_default() += 1;
        self.store
            .0
            .lock()
            .unwrap()
            .insert(nimbus_api::etcd::migration_key(&record.db), serde_json::to_value(record).unwrap());
    }
}

type MigrationResult<T> = Result<T, crate::controlplane::migration::Failure>;

#[async_trait]
impl crate::controlplane::migration::MigrationWorld for FakeMigrationWorld {
    async fn replica_set(
        &self,
        namespace: &str,
        name: &str,
    ) -> MigrationResult<Option<crate::controlplane::migration::ReplicaSetAccess>> {
        if self.api.get(&format!("/api/v1/namespaces/{namespace}/services"), name).is_none() {
            return Ok(None);
        }
        let members = (1..=3)
            .map(|id| RouteMember { id, data_addr: format!("http://{name}-m{id}:8080"), zone: format!("zone-{id}") })
            .collect();
        Ok(Some(crate::controlplane::migration::ReplicaSetAccess {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            leader_admin: format!("http://{name}-m1:8081"),
            members,
        }))
    }
    async fn export(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        req: &nimbus_api::migration::ExportRequest,
    ) -> MigrationResult<nimbus_api::migration::ExportPage> {
        use nimbus_api::migration::{ExportPage, ExportPart, ExportedCollection, ExportedDoc};
        self.call(format!("export {} {:?}", rs.name, req.part));
        let total = self.model.lock().unwrap().documents;
        let from: u64 = req.after.as_deref().and_then(|a| a.parse().ok()).unwrap_or(0);
        let (docs, next) = match req.part {
            ExportPart::Documents => {
                let to = (from + 2).min(total);
                let docs = (from..to)
                    .map(|i| ExportedDoc {
                        coll: "orders".into(),
                        doc: serde_json::value::RawValue::from_string(format!(
                            "{{\"_id\":{i},\"pad\":\"{}\"}}",
                            "x".repeat(480)
                        ))
                        .unwrap(),
                    })
                    .collect();
                (docs, (to < total).then(|| to.to_string()))
            }
            ExportPart::Idempotency => (Vec::new(), None),
        };
        Ok(ExportPage {
            clock_ms: 0,
            index: 100,
            collections: vec![ExportedCollection { name: "orders".into(), indexes: Vec::new() }],
            docs,
            idempotency: Vec::new(),
            next,
        })
    }
    async fn import(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        req: &nimbus_api::migration::ImportRequest,
    ) -> MigrationResult<nimbus_api::migration::ImportAnswer> {
        let step = serde_json::to_value(&req.step).unwrap();
        let name = match &step {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
            _ => String::new(),
        };
        self.call(format!("import {} {name}", rs.name));
        Ok(nimbus_api::migration::ImportAnswer { index: 1 })
    }
    async fn oplog(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        _db: &str,
        after: nimbus_api::migration::OplogPosition,
        _limit: u32,
    ) -> MigrationResult<nimbus_api::migration::DbOplogPage> {
        self.call(format!("oplog {}", rs.name));
        Ok(nimbus_api::migration::DbOplogPage {
            entries: Vec::new(),
            next: after,
            applied_index: after.index,
            clock_ms: 0,
        })
    }
    async fn pin_oplog(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        _req: &nimbus_api::migration::PinOplogRequest,
    ) -> MigrationResult<()> {
        self.call(format!("pin {}", rs.name));
        Ok(())
    }
    async fn unpin_oplog(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        _name: &str,
    ) -> MigrationResult<()> {
        self.call(format!("unpin {}", rs.name));
        Ok(())
    }
    async fn fence(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        _db: &str,
        epoch: u64,
    ) -> MigrationResult<crate::controlplane::migration::FenceAnswer> {
        self.call(format!("fence {} {epoch}", rs.name));
        Ok(crate::controlplane::migration::FenceAnswer { epoch, index: Some(100) })
    }
    async fn checksum(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        _db: &str,
    ) -> MigrationResult<crate::controlplane::migration::ChecksumMarker> {
        self.call(format!("checksum {}", rs.name));
        let mut m = self.model.lock().unwrap();
        let differs = m.mismatches > 0 && !rs.name.starts_with("default");
        if differs {
            m.mismatches -= 1;
        }
        Ok(crate::controlplane::migration::ChecksumMarker {
            index: 100,
            checksum: if differs { "bad".into() } else { "sum".into() },
            documents: m.documents,
            catalog: None,
        })
    }
    async fn drop_database(
        &self,
        rs: &crate::controlplane::migration::ReplicaSetAccess,
        db: &str,
        _max_epoch: Option<u64>,
    ) -> MigrationResult<crate::controlplane::migration::DropOutcome> {
        self.call(format!("drop {} {db}", rs.name));
        Ok(crate::controlplane::migration::DropOutcome::Dropped)
    }
    async fn route(&self, db: &str) -> MigrationResult<Option<(nimbus_api::etcd::Route, u64)>> {
        let v = self.store.0.lock().unwrap().get(&nimbus_api::etcd::route_key(db)).cloned();
        Ok(v.map(|v| (serde_json::from_value(v.clone()).unwrap(), revision_of(&v))))
    }
    async fn swap_route(
        &self,
        db: &str,
        revision: u64,
        route: &nimbus_api::etcd::Route,
        _clear_holds: bool,
    ) -> MigrationResult<bool> {
        let key = nimbus_api::etcd::route_key(db);
        let current = self.store.0.lock().unwrap().get(&key).cloned();
        if current.as_ref().map(revision_of) != Some(revision) {
            return Ok(false);
        }
        self.store.put(key, serde_json::to_value(route).unwrap());
        Ok(true)
    }
    async fn hold_view(&self, _db: &str) -> MigrationResult<crate::controlplane::migration::HoldView> {
        Ok(Default::default())
    }
    async fn record(
        &self,
        db: &str,
    ) -> MigrationResult<Option<(crate::controlplane::migration::MigrationRecord, u64)>> {
        let revision = self.model.lock().unwrap().revisions.get(db).copied().unwrap_or(0);
        Ok(self.record_of(db).map(|r| (r, revision)))
    }
    async fn records(&self) -> MigrationResult<Vec<(crate::controlplane::migration::MigrationRecord, u64)>> {
        let keys: Vec<String> = self
            .store
            .0
            .lock()
            .unwrap()
            .keys()
            .filter_map(|k| k.strip_prefix(nimbus_api::etcd::MIGRATIONS).map(str::to_owned))
            .collect();
        let mut out = Vec::new();
        for db in keys {
            if let Some(r) = self.record(&db).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
    async fn save_record(
        &self,
        record: &crate::controlplane::migration::MigrationRecord,
        expected: Option<u64>,
    ) -> MigrationResult<Option<u64>> {
        let mut m = self.model.lock().unwrap();
        let exists = self.store.0.lock().unwrap().contains_key(&nimbus_api::etcd::migration_key(&record.db));
        let current = exists.then(|| m.revisions.get(&record.db).copied().unwrap_or(0));
        if current != expected {
            return Ok(None);
        }
        if let Some(left) = m.saves_left.as_mut() {
            if *left == 0 {
                return Ok(None);
            }
            *left -= 1;
        }
        let revision = m.revisions.entry(record.db.clone()).or_default();
        *revision += 1;
        let revision = *revision;
        drop(m);
        self.store
            .0
            .lock()
            .unwrap()
            .insert(nimbus_api::etcd::migration_key(&record.db), serde_json::to_value(record).unwrap());
        Ok(Some(revision))
    }
}
