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
    async fn drop_database(&self, leader_data: &str, db: &str) -> Result<(), AdminError> {
        self.model().log.push(format!("drop_database {db} via {leader_data}"));
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
        let epoch = self.writes() + 1;
        Ok(self.put(key, json!({"replicaSet": replica_set, "members": members, "epoch": epoch, "state": "serving"})))
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
}

/// Everything a reconciler scenario needs.
pub struct World {
    pub api: FakeApi,
    /// The node watch's stand-in: refreshed from the fake API before each pass.
    pub nodes: Arc<Mutex<Writer<Node>>>,
    pub datanodes: FakeDatanodes,
    pub store: FakeStore,
    pub ctx: Arc<Context>,
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
        });
        let w = World { api, nodes: Arc::new(Mutex::new(writer)), datanodes, store, ctx };
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

    /// How long the scenario's clock has moved on.
    pub fn wait(&self, d: Duration) {
        self.ctx.failover.clock.advance(d);
    }

    pub fn raft_log(&self) -> Vec<String> {
        self.datanodes.0.lock().unwrap().log.clone()
    }
}
