//! Control-plane decisions (pure) and the clients that carry them out.
//!
//! Both provisioners (Kubernetes, and the playground's local processes) drive datanodes and
//! etcd through [`Datanodes`] and [`ControlStore`]; the real implementations are
//! [`admin::AdminClient`] and [`coord::Coordinator`].

pub mod admin;
pub mod backup;
pub mod coord;
pub mod driver;
pub mod etcd_access;
pub mod members;
pub mod migration;
pub mod placement;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use nimbus_api::admin::{MemberInfo, Status};
use nimbus_api::etcd::{Limits, ReplicaSetRecord, RouteMember, TenantClaim, UserRecord};

pub use admin::AdminError;
pub use coord::CoordError;

/// The datanode admin (and data) API, as the control plane uses it.
#[async_trait]
pub trait Datanodes: Send + Sync {
    /// The same API for the datanodes of `namespace`: their calls carry that namespace's
    /// secret (`nimbus_net::ClusterSecret::scoped`), the only one they accept.
    fn in_namespace(&self, namespace: &str) -> Arc<dyn Datanodes>;
    /// `GET /v1/status` of one member; `None` when it does not answer.
    async fn status(&self, admin: &str) -> Option<Status>;
    async fn init(&self, admin: &str, members: Vec<MemberInfo>) -> Result<(), AdminError>;
    async fn add_learner(&self, leader: &str, member: MemberInfo) -> Result<(), AdminError>;
    async fn change_voters(&self, leader: &str, voters: &BTreeSet<u64>) -> Result<(), AdminError>;
    async fn remove_member(&self, leader: &str, id: u64) -> Result<(), AdminError>;
    async fn transfer_leader(&self, leader: &str, to: u64) -> Result<(), AdminError>;
    /// Drops every collection of `db`, whatever its route epoch, through the leader's admin API.
    /// `db` may be a client's database or its restore staging or verification scratch copy
    /// (`nimbus_api::migration::validate_admin_db`).
    async fn drop_database(&self, leader: &str, db: &str) -> Result<(), AdminError>;
    /// Raises `db`'s route epoch on the replica set to `epoch` (through Raft; it never
    /// lowers): from that entry on, anything carrying an older route epoch is refused.
    async fn fence(&self, leader: &str, db: &str, epoch: u64) -> Result<(), AdminError>;
}

/// Removes an instance's data from one replica set, through its leader: `db` fenced first at
/// `fence_epoch` (its route's epoch + 1, when it has a route), then dropped with its restore
/// staging copy (`{db}~restore`) and its verification scratch copy (`{db}~verify`).
///
/// The fence is what makes the drop final. A restore that read the route before the
/// deletion may still `Publish` its staging copy into `db` after the drop (the deletion
/// drops the data, then the route); its `Publish` carries the route epoch it saw, and the
/// replica set refuses it as stale once its own epoch is newer. The fence is entered in the
/// Raft log before the drop, so every such `Publish` is either dropped or refused. A new
/// instance of the name gets a route epoch above the fence (etcd's revision, which the
/// deletion itself raises: `Coordinator::put_route`), so it is not refused. The copies have
/// no route and no client: only this drop (or their job's own `Abort`) removes them.
pub async fn drop_instance_data(
    datanodes: &dyn Datanodes,
    leader: &str,
    db: &str,
    fence_epoch: Option<u64>,
) -> Result<(), AdminError> {
    if let Some(epoch) = fence_epoch {
        datanodes.fence(leader, db, epoch).await?;
    }
    datanodes.drop_database(leader, db).await?;
    datanodes.drop_database(leader, &nimbus_api::migration::restore_staging_db(db)).await?;
    datanodes.drop_database(leader, &nimbus_api::migration::verify_scratch_db(db)).await
}

/// The control plane's records in etcd.
#[async_trait]
pub trait ControlStore: Send + Sync {
    /// Creates `db`'s route on `replica_set` unless it has one (placement's decision, once),
    /// if `claim`'s instance holds `db`'s claim; `true` when created.
    async fn create_route(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError>;
    /// Sets the members of `db`'s route if it is still on `replica_set` and `claim`'s
    /// instance holds `db`'s claim, keeping its epoch (a compare-and-swap: never undoes a
    /// migration's switch, never writes another namespace's tenant); `true` when written.
    async fn update_route_members(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError>;
    async fn put_user(&self, db: &str, user: &str, record: &UserRecord) -> Result<(), CoordError>;
    async fn put_limits(&self, db: &str, limits: &Limits) -> Result<(), CoordError>;
    /// Deletes the users of `db` not in `keep`; returns the names removed.
    async fn retain_users(&self, db: &str, keep: &[String]) -> Result<Vec<String>, CoordError>;
    /// Deletes the database's records unless another instance than `owner` (a uid)
    /// claims it; `false` when it does (nothing deleted).
    async fn delete_database(&self, db: &str, claim: &TenantClaim, placed: bool) -> Result<bool, CoordError>;
    /// Claims the database name for an instance: `Err(owner)` when another holds it.
    async fn claim_database(
        &self,
        db: &str,
        claim: &TenantClaim,
        placed: bool,
    ) -> Result<Result<(), TenantClaim>, CoordError>;
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetRecord>, CoordError>;
    async fn record_replica_set(
        &self,
        namespace: &str,
        name: &str,
        record: &ReplicaSetRecord,
    ) -> Result<(), CoordError>;
    async fn forget_replica_set(&self, namespace: &str, name: &str) -> Result<(), CoordError>;
    /// The databases of `namespace` whose route names `replica_set` (the control plane's
    /// own record of where each is served).
    async fn databases_on(&self, namespace: &str, replica_set: &str) -> Result<Vec<String>, CoordError>;
}

#[async_trait]
impl Datanodes for admin::AdminClient {
    fn in_namespace(&self, namespace: &str) -> Arc<dyn Datanodes> {
        match self.scoped(namespace) {
            Ok(scoped) => Arc::new(scoped),
            // Fail closed: a client whose every call is refused, never the cluster's secret.
            Err(e) => Arc::new(Refusing(e.to_string())),
        }
    }
    async fn status(&self, admin: &str) -> Option<Status> {
        admin::AdminClient::status(self, admin).await.ok()
    }
    async fn init(&self, admin: &str, members: Vec<MemberInfo>) -> Result<(), AdminError> {
        admin::AdminClient::init(self, admin, members).await
    }
    async fn add_learner(&self, leader: &str, member: MemberInfo) -> Result<(), AdminError> {
        admin::AdminClient::add_learner(self, leader, member).await
    }
    async fn change_voters(&self, leader: &str, voters: &BTreeSet<u64>) -> Result<(), AdminError> {
        admin::AdminClient::change_voters(self, leader, voters).await
    }
    async fn remove_member(&self, leader: &str, id: u64) -> Result<(), AdminError> {
        admin::AdminClient::remove_member(self, leader, id).await
    }
    async fn transfer_leader(&self, leader: &str, to: u64) -> Result<(), AdminError> {
        admin::AdminClient::transfer_leader(self, leader, to).await
    }
    async fn drop_database(&self, leader: &str, db: &str) -> Result<(), AdminError> {
        admin::AdminClient::drop_database(self, leader, db).await
    }
    async fn fence(&self, leader: &str, db: &str, epoch: u64) -> Result<(), AdminError> {
        admin::AdminClient::fence(self, leader, db, epoch).await
    }
}

/// Datanodes that cannot be called (no secret for their namespace): every call fails.
struct Refusing(String);

#[async_trait]
impl Datanodes for Refusing {
    fn in_namespace(&self, _namespace: &str) -> Arc<dyn Datanodes> {
        Arc::new(Refusing(self.0.clone()))
    }
    async fn status(&self, _admin: &str) -> Option<Status> {
        None
    }
    async fn init(&self, admin: &str, _members: Vec<MemberInfo>) -> Result<(), AdminError> {
        Err(self.refused(admin))
    }
    async fn add_learner(&self, leader: &str, _member: MemberInfo) -> Result<(), AdminError> {
        Err(self.refused(leader))
    }
    async fn change_voters(&self, leader: &str, _voters: &BTreeSet<u64>) -> Result<(), AdminError> {
        Err(self.refused(leader))
    }
    async fn remove_member(&self, leader: &str, _id: u64) -> Result<(), AdminError> {
        Err(self.refused(leader))
    }
    async fn transfer_leader(&self, leader: &str, _to: u64) -> Result<(), AdminError> {
        Err(self.refused(leader))
    }
    async fn drop_database(&self, leader: &str, _db: &str) -> Result<(), AdminError> {
        Err(self.refused(leader))
    }
    async fn fence(&self, leader: &str, _db: &str, _epoch: u64) -> Result<(), AdminError> {
        Err(self.refused(leader))
    }
}

impl Refusing {
    fn refused(&self, addr: &str) -> AdminError {
        AdminError::Refused { addr: addr.to_owned(), what: "any call", status: 0, body: self.0.clone() }
    }
}

#[async_trait]
impl ControlStore for coord::Coordinator {
    async fn create_route(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError> {
        coord::Coordinator::create_route(self, db, claim, replica_set, members).await
    }
    async fn update_route_members(
        &self,
        db: &str,
        claim: &TenantClaim,
        replica_set: &str,
        members: Vec<RouteMember>,
    ) -> Result<bool, CoordError> {
        coord::Coordinator::update_route_members(self, db, claim, replica_set, members).await
    }
    async fn put_user(&self, db: &str, user: &str, record: &UserRecord) -> Result<(), CoordError> {
        coord::Coordinator::put_user(self, db, user, record).await
    }
    async fn put_limits(&self, db: &str, limits: &Limits) -> Result<(), CoordError> {
        coord::Coordinator::put_limits(self, db, limits).await
    }
    async fn delete_database(&self, db: &str, claim: &TenantClaim, placed: bool) -> Result<bool, CoordError> {
        coord::Coordinator::delete_database(self, db, claim, placed).await
    }
    async fn claim_database(
        &self,
        db: &str,
        claim: &TenantClaim,
        placed: bool,
    ) -> Result<Result<(), TenantClaim>, CoordError> {
        coord::Coordinator::claim_database(self, db, claim, placed).await
    }
    async fn retain_users(&self, db: &str, keep: &[String]) -> Result<Vec<String>, CoordError> {
        coord::Coordinator::retain_users(self, db, keep).await
    }
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetRecord>, CoordError> {
        coord::Coordinator::replica_set(self, namespace, name).await
    }
    async fn record_replica_set(
        &self,
        namespace: &str,
        name: &str,
        record: &ReplicaSetRecord,
    ) -> Result<(), CoordError> {
        coord::Coordinator::record_replica_set(self, namespace, name, record).await
    }
    async fn forget_replica_set(&self, namespace: &str, name: &str) -> Result<(), CoordError> {
        coord::Coordinator::forget_replica_set(self, namespace, name).await
    }
    async fn databases_on(&self, namespace: &str, replica_set: &str) -> Result<Vec<String>, CoordError> {
        coord::Coordinator::databases_on(self, namespace, replica_set).await
    }
}
