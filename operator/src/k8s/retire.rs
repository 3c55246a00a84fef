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
//! here, nor are its volumes (docs/operator.md, "Uninstall").

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::info;

use super::Error;
use super::api::Objects;
use super::instance::{Context, event};
use super::objects::{ANNOTATION_REMOVING, LABEL_REPLICA_SET};
use super::provisioner::already_gone;
use crate::controlplane::migration::{MigrationRecord, Step};
use crate::crd::v1alpha1::{DatabaseInstance, DatabaseInstanceStatus};

/// The Service of replica set `rs` if the replica set is dedicated to the instance with
/// `uid`: controller-owned by it (the test placement made it with).
async fn dedicated_service(ctx: &Context, ns: &str, rs: &str, uid: &str) -> Result<Option<Service>, Error> {
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    let owned = |svc: &Service| svc.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true));
    Ok(services.get_opt(rs).await?.filter(owned))
}

/// An instance's deletion: the volumes of a replica set dedicated to it (they hold no one
/// else's data) and its record in etcd. Its Pods, PDB and Service are the instance's, and
/// garbage collection takes them with it.
pub(super) async fn delete_dedicated_volumes(ctx: &Context, ns: &str, rs: &str, uid: &str) -> Result<(), Error> {
    if dedicated_service(ctx, ns, rs, uid).await?.is_some() {
        delete_members(ctx, ns, rs, Members::Volumes).await?;
        ctx.store.forget_replica_set(ns, rs).await?;
    }
    Ok(())
}

/// What of a replica set's members [`delete_members`] deletes.
#[derive(Clone, Copy, PartialEq)]
enum Members {
    Volumes,
    PodsAndVolumes,
}

/// Deletes the replica set's member Pods (with [`Members::PodsAndVolumes`]) and volumes
/// that are not going already; whether there were any.
async fn delete_members(ctx: &Context, ns: &str, rs: &str, what: Members) -> Result<bool, Error> {
    let selector = ListParams::default().labels(&format!("{LABEL_REPLICA_SET}={rs}"));
    let mut found = false;
    if what == Members::PodsAndVolumes {
        let pods: Objects<Pod> = Objects::namespaced(ctx.client.clone(), ns);
        for pod in pods.list(&selector).await?.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            already_gone(pods.delete(&pod.name_any()).await)?;
            found = true;
        }
    }
    let pvcs: Objects<PersistentVolumeClaim> = Objects::namespaced(ctx.client.clone(), ns);
    for pvc in pvcs.list(&selector).await?.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        already_gone(pvcs.delete(&pvc.name_any()).await)?;
        found = true;
    }
    Ok(found)
}

/// What became of the replica set a completed migration moved an instance from.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Vacated {
    /// Not this instance's to remove: a shared one, one already gone, one another instance
    /// is on or moving to, or a migration not completed.
    Kept,
    /// Its members are going; a later pass removes the rest.
    Removing,
    /// Removed: its Service, members, volumes and record are gone.
    Removed,
}

/// Removes the dedicated replica set that `record`, a completed migration, moved `dbi`
/// from, once nothing needs it: `status` (this pass's) places the instance elsewhere and
/// no other instance is placed there or moving there.
///
/// In steps, each repeated harmlessly by a later pass (after a crash, or a failed call):
/// the Service is marked [`ANNOTATION_REMOVING`] (its reconciler stops stepping it); its
/// PDB, member Pods and volumes are deleted; then, in a pass that finds no member left
/// to delete (one made by a replica-set pass that began before the mark is deleted by
/// the next), its record in etcd is forgotten and its Service deleted last. The Service
/// is what later passes find the replica set by, and who it is dedicated to.
pub(super) async fn remove_vacated(
    ctx: &Context,
    dbi: &DatabaseInstance,
    ns: &str,
    record: &MigrationRecord,
    status: &DatabaseInstanceStatus,
) -> Result<Vacated, Error> {
    let rs = record.from_replica_set.as_str();
    let elsewhere = status.placement.as_ref().is_some_and(|p| p.replica_set != rs)
        && status.migration_target.as_ref().is_none_or(|t| t.replica_set != rs);
    let uid = dbi.uid().unwrap_or_default();
    if record.step != Step::Done || !elsewhere || uid.is_empty() {
        return Ok(Vacated::Kept);
    }
    let Some(svc) = dedicated_service(ctx, ns, rs, &uid).await? else { return Ok(Vacated::Kept) };
    if let Some(other) = instance_on(ctx, ns, rs, &dbi.name_any()).await? {
        info!(replica_set = rs, instance = %other, "a vacated dedicated replica set is kept: another instance is on it");
        return Ok(Vacated::Kept);
    }
    let (db, to) = (dbi.database(), &record.to_replica_set);
    let why = format!("database {db} moved to {to} (migration {}) and no other database is on it", record.id);
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    if !svc.annotations().contains_key(ANNOTATION_REMOVING) {
        services.merge(rs, &json!({"metadata": {"annotations": {ANNOTATION_REMOVING: why}}})).await?;
    }
    let pdbs: Objects<PodDisruptionBudget> = Objects::namespaced(ctx.client.clone(), ns);
    already_gone(pdbs.delete(rs).await)?;
    if delete_members(ctx, ns, rs, Members::PodsAndVolumes).await? {
        return Ok(Vacated::Removing);
    }
    ctx.store.forget_replica_set(ns, rs).await?;
    already_gone(services.delete(rs).await)?;
    ctx.reports.forget(ns, rs);
    info!(replica_set = rs, instance = %dbi.name_any(), "removed a dedicated replica set its instance moved away from");
    let note = format!("replica set {rs} removed (its members, volumes and record): {why}");
    event(ctx, dbi, EventType::Normal, "ReplicaSetRemoved", "Migrate", &note).await;
    Ok(Vacated::Removed)
}

/// Another instance of the namespace placed on replica set `rs`, or moving to it.
async fn instance_on(ctx: &Context, ns: &str, rs: &str, me: &str) -> Result<Option<String>, Error> {
    let instances: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), ns);
    let on = |i: &DatabaseInstance| {
        let s = i.status.as_ref();
        s.and_then(|s| s.placement.as_ref()).is_some_and(|p| p.replica_set == rs)
            || s.and_then(|s| s.migration_target.as_ref()).is_some_and(|t| t.replica_set == rs)
    };
    let list = instances.list(&ListParams::default()).await?;
    Ok(list.iter().filter(|i| i.name_any() != me).find(|i| on(i)).map(|i| i.name_any()))
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
