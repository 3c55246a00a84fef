//! What a migration needs from the world ([`MigrationWorld`]): the replica sets' leaders,
//! the datanode calls of `nimbus_api::migration`, and etcd (the route, the gateways' hold
//! acknowledgements, the migration's record). [`LiveWorld`] is the real one (the admin
//! client and the coordinator); the tests drive the same driver against a model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use nimbus_api::admin::{DroppedDatabase, Role, SetRouteEpochRequest};
use nimbus_api::etcd::{self, Route, RouteMember};
use nimbus_api::migration::{
    DbOplogPage, DropDatabaseRequest, ExportPage, ExportRequest, ImportAnswer, ImportRequest, OplogPosition,
    PinOplogRequest, UnpinOplogRequest,
};
use serde::{Deserialize, Serialize};

use super::plan::Failure;
use super::record::MigrationRecord;
use crate::controlplane::admin::AdminClient;
use crate::controlplane::coord::Coordinator;
use crate::controlplane::{AdminError, CoordError};

/// A replica set as a migration reaches it now: its leader's admin address and its voters
/// (what a route to it names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSetAccess {
    pub namespace: String,
    pub name: String,
    pub leader_admin: String,
    pub members: Vec<RouteMember>,
}

/// The answer of `POST /v1/admin/route-epoch`: the epoch in force and the fence entry's
/// log index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAnswer {
    pub epoch: u64,
    /// Absent from datanodes that predate migrations: the fence cannot be used then.
    #[serde(default)]
    pub index: Option<u64>,
}

/// What `POST /v1/admin/drop-database` did with a database's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropOutcome {
    /// Dropped (or there was nothing to drop).
    Dropped,
    /// Kept: the database's newest epoch on the replica set (its route epoch, or the newest
    /// a write there carried) is `epoch`, above the drop's bound, so its data is a newer route's (a new instance of the name placed there, or
    /// the database moved back), not the migration's to drop. (`epoch` is always there in
    /// the datanode's answer; optional so a malformed one still counts as kept.)
    Kept { epoch: Option<u64> },
}

/// The answer of `POST /v1/admin/checksum`: a database's sum at a marker's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChecksumMarker {
    pub index: u64,
    pub checksum: String,
    pub documents: u64,
    /// A digest of the collections and their index specifications (absent from datanodes
    /// that predate it: compared only when both sides have one).
    #[serde(default)]
    pub catalog: Option<serde_json::Value>,
}

/// Which gateways are registered and which acknowledged holding a database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldView {
    pub gateways: BTreeSet<String>,
    /// Gateway id → the acknowledgement's value.
    pub acks: BTreeMap<String, Vec<u8>>,
}

/// Everything the migration driver does outside itself. Errors are [`Failure`]s, so the
/// driver's reaction is decided by `plan::on_failure` alone.
#[async_trait]
pub trait MigrationWorld: Send + Sync {
    /// The replica set's leader and voters; `None` when the replica set does not exist,
    /// `Transient` when it has no leader now.
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure>;
    /// The incarnation of the replica set's Raft log (the etcd revision that created its
    /// record), which names the backups' oplog lineage on it
    /// (`backup::agent::lineage_of`); `None` when it has none (the playground).
    async fn replica_set_incarnation(&self, _namespace: &str, _name: &str) -> Result<Option<u64>, Failure> {
        Ok(None)
    }
    async fn export(&self, rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure>;
    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure>;
    async fn oplog(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure>;
    async fn pin_oplog(&self, rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure>;
    async fn unpin_oplog(&self, rs: &ReplicaSetAccess, name: &str) -> Result<(), Failure>;
    /// Raises `db`'s route epoch on the replica set to `epoch` (never lowers it).
    async fn fence(&self, rs: &ReplicaSetAccess, db: &str, epoch: u64) -> Result<FenceAnswer, Failure>;
    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure>;
    /// Drops `db`'s data on the replica set, only if `db`'s newest epoch there is at most
    /// `max_epoch` when given (decided in its Raft log, where each write records its
    /// route's epoch, so a newer instance's first writes are never dropped).
    async fn drop_database(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        max_epoch: Option<u64>,
    ) -> Result<DropOutcome, Failure>;
    /// `db`'s route and its revision (the guard of [`MigrationWorld::swap_route`]).
    async fn route(&self, db: &str) -> Result<Option<(Route, u64)>, Failure>;
    /// Writes `route` if `db`'s route is still at `revision` (clearing the database's hold
    /// acknowledgements with it when asked); `false` when it changed.
    async fn swap_route(&self, db: &str, revision: u64, route: &Route, clear_holds: bool) -> Result<bool, Failure>;
    async fn hold_view(&self, db: &str) -> Result<HoldView, Failure>;
    async fn record(&self, db: &str) -> Result<Option<(MigrationRecord, u64)>, Failure>;
    async fn records(&self) -> Result<Vec<(MigrationRecord, u64)>, Failure>;
    /// Writes the record if its revision is still `expected` (`None`: if there is none);
    /// the new revision, or `None` when another writer changed it.
    async fn save_record(&self, record: &MigrationRecord, expected: Option<u64>) -> Result<Option<u64>, Failure>;
}

/// Where the members of a replica set answer: the provisioner's knowledge (Pod IPs on
/// Kubernetes, process ports in the playground).
#[async_trait]
pub trait ReplicaSetDirectory: Send + Sync {
    /// The admin addresses of the members of replica set `name` in `namespace`; `None`
    /// when there is no such replica set.
    async fn admin_addrs(&self, namespace: &str, name: &str) -> Option<Vec<String>>;
}

/// The real world: datanodes through [`AdminClient`], etcd through [`Coordinator`].
pub struct LiveWorld {
    pub admin: AdminClient,
    pub coord: Arc<Coordinator>,
    pub directory: Arc<dyn ReplicaSetDirectory>,
}

fn from_admin(e: AdminError) -> Failure {
    match &e {
        AdminError::Unreachable { .. } => Failure::Transient(e.to_string()),
        AdminError::Refused { status: 410, .. } => Failure::OplogTruncated,
        // NotLeader/StaleRoute (421), RateLimited, Internal, Unavailable.
        AdminError::Refused { status, .. } if *status == 421 || *status == 429 || *status >= 500 => {
            Failure::Transient(e.to_string())
        }
        AdminError::Refused { .. } => Failure::Refused(e.to_string()),
    }
}

fn from_coord(e: CoordError) -> Failure {
    match e {
        CoordError::Decode { .. } | CoordError::Config(_) => Failure::Refused(e.to_string()),
        CoordError::Etcd(_) => Failure::Transient(e.to_string()),
    }
}

impl LiveWorld {
    /// The admin client with the namespace's secret (the cluster's in the playground).
    fn client(&self, namespace: &str) -> Result<AdminClient, Failure> {
        if namespace.is_empty() {
            return Ok(self.admin.clone());
        }
        self.admin
            .scoped(namespace)
            .map_err(|e| Failure::Refused(format!("failed to derive the secret of {namespace}: {e}")))
    }

    async fn call<T: Serialize + Sync, R: serde::de::DeserializeOwned>(
        &self,
        rs: &ReplicaSetAccess,
        path: &str,
        what: &'static str,
        body: &T,
    ) -> Result<R, Failure> {
        self.client(&rs.namespace)?.call(&rs.leader_admin, path, what, body).await.map_err(from_admin)
    }
}

/// An answer whose content does not matter.
#[derive(Deserialize)]
struct Ignored {}

#[async_trait]
impl MigrationWorld for LiveWorld {
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        let Some(addrs) = self.directory.admin_addrs(namespace, name).await else { return Ok(None) };
        let client = self.client(namespace)?;
        for addr in addrs {
            let Ok(status) = client.status(&addr).await else { continue };
            if status.role != Role::Leader || status.leader_id != Some(status.id) {
                continue;
            }
            let members = status
                .members
                .iter()
                .filter(|m| m.voter)
                .map(|m| RouteMember { id: m.id, data_addr: m.data_addr.clone(), zone: m.zone.clone() })
                .collect();
            return Ok(Some(ReplicaSetAccess {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                leader_admin: addr,
                members,
            }));
        }
        Err(Failure::Transient(format!("no member of replica set {name} answers as its leader")))
    }

    async fn replica_set_incarnation(&self, namespace: &str, name: &str) -> Result<Option<u64>, Failure> {
        self.coord.replica_set_incarnation(namespace, name).await.map_err(from_coord)
    }

    async fn export(&self, rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure> {
        self.call(rs, "/v1/admin/export", "export", req).await
    }

    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        self.call(rs, "/v1/admin/import", "import", req).await
    }

    async fn oplog(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure> {
        self.client(&rs.namespace)?.db_oplog(&rs.leader_admin, db, after, limit).await.map_err(from_admin)
    }

    async fn pin_oplog(&self, rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure> {
        self.call::<_, Ignored>(rs, "/v1/admin/oplog/pin", "pin oplog", req).await.map(|_| ())
    }

    async fn unpin_oplog(&self, rs: &ReplicaSetAccess, name: &str) -> Result<(), Failure> {
        let req = UnpinOplogRequest { name: name.to_owned() };
        self.call::<_, Ignored>(rs, "/v1/admin/oplog/unpin", "unpin oplog", &req).await.map(|_| ())
    }

    async fn fence(&self, rs: &ReplicaSetAccess, db: &str, epoch: u64) -> Result<FenceAnswer, Failure> {
        let req = SetRouteEpochRequest { db: db.to_owned(), epoch };
        self.call(rs, "/v1/admin/route-epoch", "route epoch", &req).await
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        let req = nimbus_api::admin::ChecksumRequest { db: db.to_owned() };
        self.call(rs, "/v1/admin/checksum", "checksum marker", &req).await
    }

    async fn drop_database(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        max_epoch: Option<u64>,
    ) -> Result<DropOutcome, Failure> {
        let req = DropDatabaseRequest { db: db.to_owned(), max_epoch };
        let answer: DroppedDatabase = self.call(rs, "/v1/admin/drop-database", "drop database", &req).await?;
        Ok(if answer.kept { DropOutcome::Kept { epoch: answer.epoch } } else { DropOutcome::Dropped })
    }

    async fn route(&self, db: &str) -> Result<Option<(Route, u64)>, Failure> {
        self.coord.route_revision(db).await.map_err(from_coord)
    }

    async fn swap_route(&self, db: &str, revision: u64, route: &Route, clear_holds: bool) -> Result<bool, Failure> {
        self.coord.swap_route(db, revision, route, clear_holds).await.map_err(from_coord)
    }

    async fn hold_view(&self, db: &str) -> Result<HoldView, Failure> {
        let (gateways, acks) = self.coord.hold_view(db).await.map_err(from_coord)?;
        Ok(HoldView { gateways: gateways.into_iter().collect(), acks: acks.into_iter().collect() })
    }

    async fn record(&self, db: &str) -> Result<Option<(MigrationRecord, u64)>, Failure> {
        self.coord.get_json_revision(&etcd::migration_key(db)).await.map_err(from_coord)
    }

    async fn records(&self) -> Result<Vec<(MigrationRecord, u64)>, Failure> {
        self.coord.list_json_revision(etcd::MIGRATIONS).await.map_err(from_coord)
    }

    async fn save_record(&self, record: &MigrationRecord, expected: Option<u64>) -> Result<Option<u64>, Failure> {
        self.coord.put_json_if(&etcd::migration_key(&record.db), record, expected).await.map_err(from_coord)
    }
}
