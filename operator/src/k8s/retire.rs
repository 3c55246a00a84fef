//! A dedicated replica set holds one instance's database and no one else's, so it goes
//! when its instance no longer needs it:
//!
//! - The instance is deleted: garbage collection takes what the instance owns (the
//!   replica set's Service, member Pods and PodDisruptionBudget), and its finalizer deletes
//!   what no one owns, the volumes, and forgets the replica set in etcd
//!   ([`delete_dedicated_volumes`]).
//! - A migration moved the instance to another pool and completed (the source's copy
//!   dropped after the grace period): the instance lives on, so nothing is collected, and
//!   the operator removes the emptied replica set itself ([`remove_vacated`]). Never
//!   before the migration is `Done`: until its clean-up the source holds the copy an abort
//!   routes the database back to.
//!
//! A shared replica set (its Service owned by its pool, or by no one) is never removed
//! here, nor are its volumes (docs/operator.md, "Uninstall"). Nor is a dedicated one that
//! another tenant is on after all ([`other_tenant_on`]): placement never puts one there,
//! and the removal checks again rather than trust that.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::{info, warn};

use super::Error;
use super::api::Objects;
use super::instance::{Context, event};
use super::objects::{ANNOTATION_REMOVING, LABEL_REPLICA_SET, dedicated_owner};
use super::provisioner::already_gone;
use crate::controlplane::migration::{MigrationRecord, Step};
use crate::crd::v1alpha1::{DatabaseInstance, DatabaseInstanceStatus};

/// The Service of replica set `rs` if the replica set is dedicated to the instance with
/// `uid` ([`dedicated_owner`]).
async fn dedicated_service(ctx: &Context, ns: &str, rs: &str, uid: &str) -> Result<Option<Service>, Error> {
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    Ok(services.get_opt(rs).await?.filter(|svc| dedicated_owner(svc).is_some_and(|o| o.uid == uid)))
}

/// Another tenant with data on replica set `rs` of `ns`, or about to have some, than
/// `dbi`: a database whose route names it (etcd, the control plane's own record, written
/// as soon as a database is served, before its instance's status), one a migration still
/// running moves from or to it, or an instance whose status places it there or moves it
/// there. Its name: a dedicated replica set with another tenant on it keeps its volumes.
pub(super) async fn other_tenant_on(
    ctx: &Context,
    ns: &str,
    rs: &str,
    dbi: &DatabaseInstance,
) -> Result<Option<String>, Error> {
    let (db, me) = (dbi.database(), dbi.name_any());
    if let Some(other) = ctx.store.databases_on(ns, rs).await?.into_iter().find(|d| *d != db) {
        return Ok(Some(format!("database {other}")));
    }
    let records = ctx.migrations.world.records().await.map_err(|e| Error::Locate {
        database: db.clone(),
        reason: format!("failed to read the migration records from etcd: {e}"),
    })?;
    let running = |r: &MigrationRecord| !matches!(r.step, Step::Done | Step::Aborted);
    let moving = records.into_iter().map(|(r, _)| r).find(|r| {
        r.db != db && r.namespace == ns && running(r) && (r.from_replica_set == rs || r.to_replica_set == rs)
    });
    if let Some(r) = moving {
        return Ok(Some(format!("database {} (migration {})", r.db, r.id)));
    }
    let instances: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), ns);
    let on = |i: &DatabaseInstance| {
        let s = i.status.as_ref();
        s.and_then(|s| s.placement.as_ref()).is_some_and(|p| p.replica_set == rs)
            || s.and_then(|s| s.migration_target.as_ref()).is_some_and(|t| t.replica_set == rs)
    };
    let list = instances.list(&ListParams::default()).await?;
    Ok(list.iter().filter(|i| i.name_any() != me).find(|i| on(i)).map(|i| format!("instance {}", i.name_any())))
}

/// An instance's deletion: the volumes of a replica set dedicated to it and its record in
/// etcd, unless another tenant is on it after all ([`other_tenant_on`]: then its data is
/// there). Its Pods, PDB and Service are the instance's, and garbage collection takes them
/// with it.
pub(super) async fn delete_dedicated_volumes(
    ctx: &Context,
    dbi: &DatabaseInstance,
    ns: &str,
    rs: &str,
) -> Result<(), Error> {
    let uid = dbi.uid().unwrap_or_default();
    if uid.is_empty() || dedicated_service(ctx, ns, rs, &uid).await?.is_none() {
        return Ok(());
    }
    if let Some(other) = other_tenant_on(ctx, ns, rs, dbi).await? {
        let note = format!("the volumes of replica set {rs} are kept: {other} is on it");
        warn!(replica_set = rs, instance = %dbi.name_any(), tenant = %other, "{note}");
        event(ctx, dbi, EventType::Warning, "VolumesKept", "Delete", &note).await;
        return Ok(());
    }
    delete_members(ctx, ns, rs, Members::Volumes).await?;
    ctx.store.forget_replica_set(ns, rs).await?;
    Ok(())
}

/// What of a replica set's members [`delete_members`] deletes.
#[derive(Clone, Copy, PartialEq)]
enum Members {
    Volumes,
    PodsAndVolumes,
}

/// Deletes the replica set's member Pods (with [`Members::PodsAndVolumes`]) and volumes
/// that are not going already; whether any was listed, Terminating ones included: a Pod
/// within its grace period, a volume the `kubernetes.io/pvc-protection` finalizer holds
/// until no Pod uses it. Until none is, the names are taken, and the replica set made anew
/// by a move back would meet them.
///
/// A Pod whose machine is known to be off ([`machine_off`]) is deleted at once, without a
/// grace period; else it would hold the removal, and its volume, for as long as its Node
/// object stays. Nothing on it is needed: the database it held was verified on the target
/// and dropped here by the clean-up before the migration was `Done`.
async fn delete_members(ctx: &Context, ns: &str, rs: &str, what: Members) -> Result<Left, Error> {
    let selector = ListParams::default().labels(&format!("{LABEL_REPLICA_SET}={rs}"));
    let mut left = Left::default();
    if what == Members::PodsAndVolumes {
        let pods: Objects<Pod> = Objects::namespaced(ctx.client.clone(), ns);
        let listed = pods.list(&selector).await?;
        let nodes: BTreeMap<String, Node> = ctx.nodes.state().iter().map(|n| (n.name_any(), Node::clone(n))).collect();
        for pod in &listed {
            if machine_off(pod, &nodes) {
                info!(replica_set = rs, pod = %pod.name_any(), "deleting a member Pod no kubelet will stop, without a grace period");
                already_gone(pods.delete_now(&pod.name_any()).await)?;
            } else if pod.metadata.deletion_timestamp.is_none() {
                already_gone(pods.delete(&pod.name_any()).await)?;
            }
        }
        left.pods = listed.len();
    }
    let pvcs: Objects<PersistentVolumeClaim> = Objects::namespaced(ctx.client.clone(), ns);
    let listed = pvcs.list(&selector).await?;
    for pvc in listed.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        already_gone(pvcs.delete(&pvc.name_any()).await)?;
    }
    left.volumes = listed.len();
    Ok(left)
}

/// The taint of Kubernetes' non-graceful node shutdown: a person (or a controller that
/// knows) says the node's machine is off.
const TAINT_OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// Whether `pod`'s machine is known to be off, so that no process of it can still run: its
/// Node is gone from a node list that has loaded (a cloud's node controller deletes the
/// Node of a deleted machine), or tainted [`TAINT_OUT_OF_SERVICE`]. Not merely NotReady,
/// as the members' rule has it ([`super::failure::force_delete`]): a kubelet that stopped
/// reporting may leave its datanode running, and a move back remakes this replica set
/// under the same member names, whose Raft group an old process must never reach.
fn machine_off(pod: &Pod, nodes: &BTreeMap<String, Node>) -> bool {
    let Some(name) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else { return false };
    if nodes.is_empty() {
        // The watch has not listed the nodes yet (an operator just started): no verdict.
        return false;
    }
    match nodes.get(name) {
        None => true,
        Some(node) => node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_OUT_OF_SERVICE)),
    }
}

/// The member Pods and volumes a replica set still lists (Terminating ones included).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Left {
    pub pods: usize,
    pub volumes: usize,
}

impl Left {
    fn any(self) -> bool {
        self.pods + self.volumes > 0
    }
}

/// What became of the replica set a completed migration moved an instance from.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Vacated {
    /// Not this instance's to remove: a shared one, one already gone, one another tenant
    /// is on or moving to, or a migration not completed. Unmarked if a pass had marked it.
    Kept,
    /// Its members are going (or still Terminating: `Left` lists them); a later pass
    /// removes the rest.
    Removing(Left),
    /// Removed: its Service, members, volumes and record are gone.
    Removed,
}

/// Removes the dedicated replica set that `record`, a completed migration, moved `dbi`
/// from, once nothing needs it: `status` (this pass's) places the instance elsewhere and
/// no other tenant is on it or moving to it ([`other_tenant_on`]).
///
/// In steps, each repeated harmlessly by a later pass (after a crash, or a failed call):
/// the Service is marked [`ANNOTATION_REMOVING`] (its reconciler stops stepping it); its
/// PDB, member Pods and volumes are deleted; then, in a pass that lists no member Pod or
/// volume at all, Terminating ones included (one made by a replica-set pass that began
/// before the mark is deleted by the next), its record in etcd is forgotten and its
/// Service deleted last. The Service is what later passes find the replica set by, and
/// who it is dedicated to. A pass that keeps it after all removes the mark.
pub(super) async fn remove_vacated(
    ctx: &Context,
    dbi: &DatabaseInstance,
    ns: &str,
    record: &MigrationRecord,
    status: &DatabaseInstanceStatus,
) -> Result<Vacated, Error> {
    let rs = record.from_replica_set.as_str();
    let uid = dbi.uid().unwrap_or_default();
    if record.step != Step::Done || uid.is_empty() {
        return Ok(Vacated::Kept);
    }
    let Some(svc) = dedicated_service(ctx, ns, rs, &uid).await? else { return Ok(Vacated::Kept) };
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    let marked = svc.annotations().contains_key(ANNOTATION_REMOVING);
    let elsewhere = status.placement.as_ref().is_some_and(|p| p.replica_set != rs)
        && status.migration_target.as_ref().is_none_or(|t| t.replica_set != rs);
    let other = if elsewhere { other_tenant_on(ctx, ns, rs, dbi).await? } else { None };
    if !elsewhere || other.is_some() {
        if let Some(other) = &other {
            info!(replica_set = rs, tenant = %other, "a vacated dedicated replica set is kept: another tenant is on it");
        }
        // Kept after all: its reconciler steps it again (the mark would stop it for good).
        // Some of its members or volumes may be gone already: said where a person looks.
        if marked {
            services.merge(rs, &json!({"metadata": {"annotations": {ANNOTATION_REMOVING: null}}})).await?;
            let note = format!(
                "replica set {rs} was being removed, emptied by a move, when {} was found on it: the removal \
                 stopped, but members or volumes deleted by then are gone; check its databases",
                other.as_deref().unwrap_or("a database")
            );
            event(ctx, dbi, EventType::Warning, "ReplicaSetRemovalStopped", "Migrate", &note).await;
        }
        return Ok(Vacated::Kept);
    }
    let (db, to) = (dbi.database(), &record.to_replica_set);
    let why = format!("database {db} moved to {to} (migration {}) and no other database is on it", record.id);
    if !marked {
        services.merge(rs, &json!({"metadata": {"annotations": {ANNOTATION_REMOVING: why}}})).await?;
    }
    let pdbs: Objects<PodDisruptionBudget> = Objects::namespaced(ctx.client.clone(), ns);
    already_gone(pdbs.delete(rs).await)?;
    let left = delete_members(ctx, ns, rs, Members::PodsAndVolumes).await?;
    if left.any() {
        return Ok(Vacated::Removing(left));
    }
    ctx.store.forget_replica_set(ns, rs).await?;
    already_gone(services.delete(rs).await)?;
    ctx.reports.forget(ns, rs);
    info!(replica_set = rs, instance = %dbi.name_any(), "removed a dedicated replica set its instance moved away from");
    let note = format!("replica set {rs} removed (its members, volumes and record): {why}");
    event(ctx, dbi, EventType::Normal, "ReplicaSetRemoved", "Migrate", &note).await;
    Ok(Vacated::Removed)
}

/// The dedicated replica set a completed migration of `db` moved it from, if the record
/// says one (this namespace's): an instance deleted before its pass removed that replica
/// set deletes its volumes too ([`delete_dedicated_volumes`] checks it is dedicated).
pub(super) async fn vacated_source(ctx: &Context, ns: &str, db: &str) -> Result<Option<String>, Error> {
    let record = ctx.migrations.world.record(db).await.map_err(|e| Error::Locate {
        database: db.to_owned(),
        reason: format!("failed to read its migration record from etcd: {e}"),
    })?;
    Ok(record.map(|(r, _)| r).filter(|r| r.namespace == ns && r.step == Step::Done).map(|r| r.from_replica_set))
}
