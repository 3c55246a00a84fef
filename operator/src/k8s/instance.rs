//! The DatabaseInstance reconciler: gather → validate → place → build desired objects →
//! apply → drive the replica set one step → publish route and users → status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Resource, ResourceExt};
use nimbus_api::etcd::{TenantClaim, UserRecord};
use serde_json::json;
use tracing::{info, warn};

use super::Error;
pub use super::api::FIELD_MANAGER;
use super::api::Objects;
use super::objects::{self, Credentials, ReplicaSetShape, Settings};
use super::provisioner::pod_admin;
use super::replicaset::{self, Backoff, Report, Reports};
use super::retire::delete_dedicated_volumes;
use crate::controlplane::members::Action as Step;
use crate::controlplane::placement::{self, Placement, PoolMode, ReplicaSetLoad};
use crate::controlplane::{ControlStore, Datanodes};
use crate::crd::v1alpha1::{
    DatabaseInstance, DatabaseInstanceStatus, DatabaseRestore, LimitsStatus, MemberStatus, Phase, PlacementStatus,
    PoolMode as CrdPoolMode, ResourcePool, ResourcePoolSpec, RestoreMode, RestorePhase, Tier,
};

pub const FINALIZER: &str = "nimbus.io/cleanup";
pub use super::replicaset::{REQUEUE_BUSY, REQUEUE_STEADY};

/// What every reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    pub datanodes: Arc<dyn Datanodes>,
    pub store: Arc<dyn ControlStore>,
    pub recorder: Recorder,
    pub metrics: super::metrics::Metrics,
    /// What each replica set's reconciler last saw and did (read by its instances).
    pub reports: Reports,
    /// Consecutive failures of each reconciled object.
    pub backoff: Backoff,
    /// When an unhealthy member is declared lost (`k8s::failure`).
    pub failover: super::failure::Failover,
    /// The cluster's nodes, from one shared watch (`run`): a replica-set pass reads their
    /// health here rather than listing them.
    pub nodes: kube::runtime::reflector::Store<Node>,
    /// Hot migrations: started when `spec.pool` changes, mirrored into the status
    /// ([`super::migration`]).
    pub migrations: super::migration::Migrations,
    /// Backups (`k8s::backup`): whether they run, and what each instance's agent knows
    /// (`status.backup`).
    pub backups: Arc<super::backup::Backups>,
}

pub async fn reconcile(dbi: Arc<DatabaseInstance>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = dbi.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<DatabaseInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, dbi.clone(), |event| async {
        match event {
            Event::Apply(dbi) => apply(&dbi, &ctx).await,
            Event::Cleanup(dbi) => match cleanup(&dbi, &ctx).await {
                Err(e) => Err(report_api_failure(&ctx, &dbi, e).await),
                done => done,
            },
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    // The finalizer's own patches fail outside `apply` and `cleanup`: report them here.
    let result = match result {
        Err(Error::Finalizer(e))
            if matches!(
                e.as_ref(),
                kube::runtime::finalizer::Error::AddFinalizer(_) | kube::runtime::finalizer::Error::RemoveFinalizer(_)
            ) =>
        {
            Err(report_api_failure(&ctx, &dbi, Error::Finalizer(e)).await)
        }
        other => other,
    };
    ctx.metrics.reconciled("DatabaseInstance", started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.backoff.succeeded(&backoff_key(&dbi));
    }
    result
}

/// A failed Kubernetes API call, told to whoever looks at the instance: a `Degraded`
/// condition (and `Ready=False` unless the database is served all the same) with reason
/// `KubernetesApiError`, and a Warning Event; both say which call failed and why.
async fn report_api_failure(ctx: &Context, dbi: &DatabaseInstance, err: Error) -> Error {
    let Some(message) = err.api_failure() else { return err };
    warn!(instance = %dbi.name_any(), error = %message, "a Kubernetes API call failed");
    let mut status = dbi.status.clone().unwrap_or_default();
    let generation = dbi.metadata.generation;
    let serving = matches!(status.phase, Some(Phase::Ready | Phase::Degraded));
    if serving {
        status.phase = Some(Phase::Degraded);
    } else {
        status.phase = Some(status.phase.unwrap_or(Phase::Provisioning));
        set_condition(&mut status.conditions, "Ready", "False", API_ERROR, &message, generation);
    }
    set_condition(&mut status.conditions, "Degraded", "True", API_ERROR, &message, generation);
    if let Err(e) = patch_status(ctx, dbi, status).await {
        warn!(instance = %dbi.name_any(), error = %e, "failed to report a Kubernetes API failure in the status");
    }
    event(ctx, dbi, EventType::Warning, API_ERROR, "Reconcile", &message).await;
    err
}

/// The reason of conditions and Events that report a failed Kubernetes API call.
pub const API_ERROR: &str = "KubernetesApiError";

/// Requeue with back-off and jitter on errors: a conflict at once, other errors after
/// 10 s, doubling while they last (see [`replicaset::Backoff`]).
pub fn error_policy(dbi: Arc<DatabaseInstance>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(instance = %dbi.name_any(), error = %err, "reconcile failed; requeueing");
    ctx.backoff.failed(&backoff_key(&dbi), err.is_conflict())
}

fn backoff_key(dbi: &DatabaseInstance) -> String {
    format!("instance/{}/{}", dbi.namespace().unwrap_or_default(), dbi.name_any())
}

/// The pool an instance names, or the implicit default pool (shared, 3 per set).
pub(super) async fn pool_of(
    ctx: &Context,
    ns: &str,
    name: &str,
) -> Result<(ResourcePoolSpec, Option<OwnerReference>), Error> {
    let pools: Objects<ResourcePool> = Objects::namespaced(ctx.client.clone(), ns);
    match pools.get_opt(name).await? {
        Some(p) => Ok((p.spec.clone(), p.controller_owner_ref(&()))),
        None if name == "default" => Ok((ResourcePoolSpec::default_shared(), None)),
        None => Err(Error::PoolNotFound(name.to_string())),
    }
}

impl ResourcePoolSpec {
    fn default_shared() -> Self {
        ResourcePoolSpec {
            mode: CrdPoolMode::Shared,
            replicas_per_set: 3,
            databases_per_replica_set: 200,
            ..Default::default()
        }
    }
}

/// What one pass of [`provision`] came to.
enum Provisioned {
    /// Nothing more to do this time (the status, if any, is written).
    Done(Action),
    /// The instance's new status, and the replica-set step's error if the step failed.
    Reconciled { status: Box<DatabaseInstanceStatus>, step_error: Option<Error>, requeue: Action },
}

/// The instance pipeline, then its status; a failed Kubernetes API call is reported.
async fn apply(dbi: &DatabaseInstance, ctx: &Context) -> Result<Action, Error> {
    let (status, step_error, requeue) = match provision(dbi, ctx).await {
        Ok(Provisioned::Done(action)) => return Ok(action),
        Ok(Provisioned::Reconciled { status, step_error, requeue }) => (*status, step_error, requeue),
        Err(e) => return Err(report_api_failure(ctx, dbi, e).await),
    };
    let was_ready = dbi.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready);
    if status.phase == Some(Phase::Ready) && !was_ready {
        let (db, rs) = (dbi.database(), status.placement.as_ref().map(|p| p.replica_set.clone()).unwrap_or_default());
        event(ctx, dbi, EventType::Normal, "Ready", "Ready", &format!("serving database {db} from {rs}")).await;
    }
    if let Err(e) = patch_status(ctx, dbi, status).await {
        return Err(report_api_failure(ctx, dbi, e).await);
    }
    match step_error {
        // Already in the status (Degraded or Progressing): the Event only.
        Some(e) => {
            if let Some(message) = e.api_failure() {
                event(ctx, dbi, EventType::Warning, API_ERROR, "Reconcile", &message).await;
            }
            Err(e)
        }
        None => Ok(requeue),
    }
}

/// gather → validate → place → apply the desired objects → one replica-set step → publish.
async fn provision(dbi: &DatabaseInstance, ctx: &Context) -> Result<Provisioned, Error> {
    let ns = dbi.namespace().ok_or(Error::MissingNamespace)?;
    let name = dbi.name_any();
    let db = dbi.database();
    if let Err(e) = nimbus_api::limits::validate_name("database", &db) {
        let msg = e.message.clone();
        patch_status(ctx, dbi, failed_status(dbi, "InvalidSpec", &msg)).await?;
        return Ok(Provisioned::Done(Action::await_change()));
    }

    // The database name is the tenant's identity across the cluster: claim it first.
    let claim = claim_of(dbi)?;
    let placed = dbi.status.as_ref().is_some_and(|s| s.placement.is_some());
    if let Err(owner) = ctx.store.claim_database(&db, &claim, placed).await? {
        let msg = if owner.uid.is_empty() {
            format!(
                "database name {db} is in use by an instance created before names were claimed; it claims the \
                 name at its next reconcile: set spec.database to another name"
            )
        } else {
            format!(
                "database name {db} belongs to instance {}/{}; set spec.database to a name no other instance uses",
                owner.namespace, owner.instance
            )
        };
        if dbi.status.as_ref().and_then(|s| s.phase) != Some(Phase::Failed) {
            event(ctx, dbi, EventType::Warning, "DatabaseNameTaken", "Place", &msg).await;
        }
        patch_status(ctx, dbi, failed_status(dbi, "DatabaseNameTaken", &msg)).await?;
        return Ok(Provisioned::Done(Action::requeue(Duration::from_secs(60))));
    }
    // A user removed from the spec loses access now, whatever else this pass meets (no
    // leader, a failed API call, a lost pool): revoking needs only etcd.
    revoke_removed_users(ctx, dbi, &db).await?;

    // Placement: sticky once recorded in the status. The pool is the one of the replica set
    // the database is on: spec.pool until placed; a changed spec.pool is a migration's
    // (`k8s::migration`), which moves the placement at its switch.
    let pool_name = match dbi.status.as_ref().and_then(|s| s.placement.as_ref()) {
        Some(p) => p.pool.clone(),
        None => dbi.spec.pool.clone(),
    };
    let (pool, pool_owner) = match pool_of(ctx, &ns, &pool_name).await {
        Ok(p) => p,
        Err(Error::PoolNotFound(p)) => {
            patch_status(ctx, dbi, failed_status(dbi, "PoolNotFound", &format!("no ResourcePool {p:?}"))).await?;
            return Ok(Provisioned::Done(Action::requeue(Duration::from_secs(30))));
        }
        Err(e) => return Err(e),
    };
    let dedicated = pool.mode == CrdPoolMode::Dedicated || dbi.spec.tier == Tier::Dedicated;
    let rs_name = match dbi.status.as_ref().and_then(|s| s.placement.as_ref()) {
        Some(p) => p.replica_set.clone(),
        None => {
            let mode = if dedicated {
                PoolMode::Dedicated
            } else {
                PoolMode::Shared { capacity: pool.databases_per_replica_set }
            };
            let loads = replica_set_loads(ctx, &ns, &pool_name).await?;
            let chosen = placement::choose_replica_set(&pool_name, mode, &loads, &name);
            info!(instance = %name, replica_set = chosen.name(), new = matches!(chosen, Placement::New(_)), "placed");
            chosen.name().to_string()
        }
    };
    // A replica set that exists keeps what it was made as: a spec changed under an older
    // CRD (without its immutability rules) never re-owns a shared replica set to one tenant.
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), &ns);
    let existing = services.get_opt(&rs_name).await?;
    // Another instance's dedicated replica set of the same name: never joined, whatever
    // placement chose.
    if let Some(owner) =
        existing.as_ref().and_then(|svc| objects::dedicated_to_another(svc, dbi.metadata.uid.as_deref()))
    {
        let msg = format!(
            "replica set {rs_name} is dedicated to instance {}, and its name is this instance's replica set's too; \
             give this instance (or its pool) another name",
            owner.name
        );
        patch_status(ctx, dbi, failed_status(dbi, "PlacementConflict", &msg)).await?;
        return Ok(Provisioned::Done(Action::requeue(Duration::from_secs(30))));
    }
    let dedicated = match &existing {
        Some(svc) => objects::dedicated_owner(svc).is_some(),
        None => dedicated,
    };
    // The implicit `default` pool serves only replica sets made without a pool object. A
    // placed instance whose pool object is gone (deleted, or `helm uninstall`) is reported,
    // never re-provisioned without an owner: its Pods went with the pool, its volumes stay.
    let owned_by_pool = |svc: &Service| svc.owner_references().iter().any(|o| o.kind == "ResourcePool");
    if pool_owner.is_none() && !dedicated && placed && existing.as_ref().is_none_or(owned_by_pool) {
        let msg = format!(
            "ResourcePool {pool_name} was deleted: its replica sets' Pods went with it and their volumes are kept; \
             apply the pool again to bring the members back on their data"
        );
        patch_status(ctx, dbi, failed_status(dbi, "PoolNotFound", &msg)).await?;
        return Ok(Provisioned::Done(Action::requeue(Duration::from_secs(30))));
    }
    let replicas = if dedicated { dbi.spec.replicas } else { pool.replicas_per_set };
    let rs = replica_set_shape(&rs_name, &ns, &pool_name, &pool, pool_owner, dedicated.then_some(dbi));

    // The replica set's zones: recorded on its Service at creation, never changed.
    let zones = match existing.as_ref().and_then(zones_of) {
        Some(z) => z,
        None => {
            let available = node_zones(ctx).await?;
            let requested = dbi.spec.zones.clone().unwrap_or_default();
            match placement::member_zones(&available, &requested, replicas.max(0) as u32) {
                Ok(z) => z,
                Err(e) => {
                    patch_status(ctx, dbi, failed_status(dbi, "PlacementFailed", &e.to_string())).await?;
                    return Ok(Provisioned::Done(Action::requeue(Duration::from_secs(30))));
                }
            }
        }
    };

    // Desired shared objects: first what the Pods mount and who may reach them, then the
    // replica set's Service (placement's record: from then on the replica-set reconciler
    // drives its members), the gateways.
    let secrets: Objects<Secret> = Objects::namespaced(ctx.client.clone(), &ns);
    secrets.apply(objects::INTERNAL_SECRET, &objects::internal_secret(&ctx.settings, &ns)).await?;
    if ctx.settings.network_policies {
        let policies: Objects<NetworkPolicy> = Objects::namespaced(ctx.client.clone(), &ns);
        for p in
            [objects::datanode_network_policy(&ctx.settings, &ns), objects::gateway_network_policy(&ctx.settings, &ns)]
        {
            policies.apply(&p.name_any(), &p).await?;
        }
    }
    if existing.is_none() {
        // Made again after its Service went (with the pool, say): bootstrapped all the same.
        let bootstrapped = ctx.store.replica_set(&ns, &rs_name).await?.is_some();
        services.apply(&rs_name, &objects::replica_set_service(&rs, &zones, bootstrapped)).await?;
    }
    let deployments: Objects<Deployment> = Objects::namespaced(ctx.client.clone(), &ns);
    // The namespace's gateways serve its instances: owned by every one of them (none the
    // controller), they are garbage-collected with the last. Each instance adds itself to
    // the owners it finds (no list of the namespace's instances at every pass); a deleted
    // instance's reference dangles until the last owner goes, which garbage collection
    // allows for.
    let me = dbi.owner_ref(&()).map(|o| OwnerReference { controller: Some(false), block_owner_deletion: None, ..o });
    let current = deployments.get_opt(objects::GATEWAY_NAME).await?;
    let gateway =
        with_owners(objects::gateway_deployment(&ctx.settings, &ns, None), &owners_with(current.as_ref(), &me));
    deployments.apply(objects::GATEWAY_NAME, &gateway).await?;
    let current = services.get_opt(objects::GATEWAY_NAME).await?;
    let service = with_owners(objects::gateway_service(&ns, None), &owners_with(current.as_ref(), &me));
    services.apply(objects::GATEWAY_NAME, &service).await?;

    // What the replica set's reconciler last saw and did.
    let Some(report) = ctx.reports.get(&ns, &rs_name) else {
        let status = waiting_status(dbi, &rs, &zones);
        return Ok(Provisioned::Reconciled { status: Box::new(status), step_error: None, requeue: busy() });
    };
    if report.volumes_lost {
        let msg = format!(
            "replica set {rs_name} was bootstrapped, but every member now starts empty: its volumes were lost. \
             The operator will not initialise it again empty; restore its volumes, or see docs/operator.md"
        );
        if dbi.status.as_ref().and_then(|s| s.phase) != Some(Phase::Failed) {
            event(ctx, dbi, EventType::Warning, "VolumesLost", "Bootstrap", &msg).await;
        }
        patch_status(ctx, dbi, failed_status(dbi, "VolumesLost", &msg)).await?;
        return Ok(Provisioned::Done(Action::requeue(replicaset::jittered(REQUEUE_STEADY))));
    }

    // Once the replica set has a leader: route (created once, by placement), limits,
    // users, credentials; each written to etcd only when it changed.
    let mut published = false;
    if report.leader.is_some() {
        ctx.store.create_route(&db, &claim, &rs_name, report.route.clone()).await?;
        ctx.store.put_limits(&db, &dbi.spec.limits.resolve(dbi.spec.tier)).await?;
        publish_credentials(ctx, dbi, &ns, &db).await?;
        published = true;
    }

    let mut status = status_of(&ctx.backups, dbi, &rs, &zones, &report, published);
    let moving = super::migration::reconcile(ctx, dbi, &ns, published, &mut status).await?;
    let steady = report.step == Step::Steady && report.error.is_none() && published;
    let requeue = match super::migration::requeue(&moving) {
        Some(soon) => soon,
        None if steady => Action::requeue(replicaset::jittered(REQUEUE_STEADY)),
        None => busy(),
    };
    Ok(Provisioned::Reconciled { status: Box::new(status), step_error: None, requeue })
}

fn busy() -> Action {
    Action::requeue(replicaset::jittered(REQUEUE_BUSY))
}

/// The requeue of a pass with something under way.
pub(super) fn busy_requeue() -> Action {
    busy()
}

/// The shape of a replica set: a dedicated instance's own, or its pool's.
pub(super) fn replica_set_shape(
    name: &str,
    ns: &str,
    pool_name: &str,
    pool: &ResourcePoolSpec,
    pool_owner: Option<OwnerReference>,
    dedicated: Option<&DatabaseInstance>,
) -> ReplicaSetShape {
    match dedicated {
        Some(dbi) => ReplicaSetShape {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            pool: pool_name.to_owned(),
            storage_size: dbi.spec.storage.size.clone(),
            storage_class: dbi.spec.storage.storage_class_name.clone(),
            resources: dbi.spec.resources.clone(),
            node_selector: pool.node_selector.clone(),
            tolerations: pool.tolerations.clone(),
            owner: dbi.controller_owner_ref(&()),
        },
        None => ReplicaSetShape {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            pool: pool_name.to_owned(),
            storage_size: pool.storage.size.clone(),
            storage_class: pool.storage.storage_class_name.clone(),
            resources: pool.resources.clone(),
            node_selector: pool.node_selector.clone(),
            tolerations: pool.tolerations.clone(),
            owner: pool_owner,
        },
    }
}

/// The instance's claim on its database name.
pub(super) fn claim_of(dbi: &DatabaseInstance) -> Result<TenantClaim, Error> {
    let namespace = dbi.namespace().ok_or(Error::MissingNamespace)?;
    Ok(TenantClaim { namespace, instance: dbi.name_any(), uid: dbi.uid().unwrap_or_default() })
}

/// Deletes from etcd the users no longer in the spec: their tokens stop working at once.
async fn revoke_removed_users(ctx: &Context, dbi: &DatabaseInstance, db: &str) -> Result<(), Error> {
    let keep: Vec<String> = dbi.users().into_iter().map(|u| u.name).collect();
    let removed = ctx.store.retain_users(db, &keep).await?;
    if !removed.is_empty() {
        let msg = format!("users {} removed: their tokens no longer work", removed.join(", "));
        event(ctx, dbi, EventType::Normal, "UsersRevoked", "Revoke", &msg).await;
    }
    Ok(())
}

/// Tokens are made once and kept in `<instance>-credentials`; etcd gets their hashes.
async fn publish_credentials(ctx: &Context, dbi: &DatabaseInstance, ns: &str, db: &str) -> Result<(), Error> {
    let name = dbi.name_any();
    let secrets: Objects<Secret> = Objects::namespaced(ctx.client.clone(), ns);
    let existing = secrets.get_opt(&objects::credentials_secret_name(&name)).await?;
    let stored = |key: &str| -> Option<String> {
        let data = existing.as_ref()?.data.as_ref()?;
        String::from_utf8(data.get(key)?.0.clone()).ok()
    };
    let mut creds = Credentials {
        endpoint: objects::gateway_endpoint(ns),
        database: db.to_string(),
        tokens: BTreeMap::new(),
        token: None,
        read_only_token: None,
    };
    for user in dbi.users() {
        let token = match &user.secret_ref {
            Some(r) => {
                let s = secrets.get(&r.name).await?;
                let secret = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .ok_or_else(|| Error::BadSecret(format!("{}/{} has no key {}", ns, r.name, r.key)))?;
                format!("nmb_{db}.{}.{}", user.name, secret.trim())
            }
            None => match stored(&format!("token-{}", user.name)) {
                Some(t) => t,
                None => nimbus_api::token::new_token(db, &user.name, user.role.into()).0,
            },
        };
        let (_, _, secret) = nimbus_api::etcd::parse_token(&token).ok_or_else(|| {
            Error::BadSecret(format!("the token of user {} is malformed (secret too short?)", user.name))
        })?;
        let record = UserRecord { role: user.role.into(), secret_sha256: nimbus_api::token::secret_sha256(secret) };
        match user.role {
            crate::crd::v1alpha1::UserRole::ReadWrite if creds.token.is_none() => creds.token = Some(token.clone()),
            crate::crd::v1alpha1::UserRole::Read if creds.read_only_token.is_none() => {
                creds.read_only_token = Some(token.clone())
            }
            _ => {}
        }
        creds.tokens.insert(user.name.clone(), token);
        // The Secret first: a token in etcd that no one can read would be useless.
        ctx.store.put_user(db, &user.name, &record).await?;
    }
    let owner = dbi.controller_owner_ref(&()).ok_or(Error::MissingNamespace)?;
    let secret = objects::credentials_secret(&name, ns, &owner, &creds);
    secrets.apply(&objects::credentials_secret_name(&name), &secret).await?;
    Ok(())
}

async fn cleanup(dbi: &DatabaseInstance, ctx: &Context) -> Result<Action, Error> {
    let db = dbi.database();
    let ns = dbi.namespace().ok_or(Error::MissingNamespace)?;
    let claim = claim_of(dbi)?;
    let placement = dbi.status.as_ref().and_then(|s| s.placement.clone());
    // First whose the name is: an instance refused for a name another owns never had
    // data, route or users, and must not touch the owner's.
    if ctx.store.claim_database(&db, &claim, placement.is_some()).await?.is_err() {
        return Ok(Action::await_change());
    }
    if let Some(restore) = running_restore(ctx, &ns, &dbi.name_any()).await? {
        let err = Error::RestoreRunning { database: db.clone(), restore };
        report_deletion_blocked(ctx, dbi, &err.to_string()).await?;
        // An error keeps the finalizer (an `Ok` would release it) and retries.
        return Err(err);
    }
    super::migration::cancel_for_deletion(ctx, &db).await;
    // The fence: every replica set holding a copy refuses, from before the drop on, what
    // carries the route epoch a restore saw (`controlplane::drop_instance_data`).
    let fence_epoch = match ctx.migrations.world.route(&db).await {
        Ok(route) => route.map(|(r, _)| r.epoch + 1),
        Err(e) => {
            return Err(Error::Locate {
                database: db.clone(),
                reason: format!("failed to read its route from etcd: {e}"),
            });
        }
    };
    let abandon = dbi.annotations().get(ANNOTATION_ABANDON_DATA).is_some_and(|v| v == "true");
    // Dropped wherever a copy is, if the database was ever placed: where its route says it
    // lives (a migration's switch moves it before the placement follows), and the source
    // of a switch not yet cleaned up.
    let holders = match &placement {
        Some(p) => super::migration::replica_sets_to_drop(ctx, &ns, &db, Some(&p.replica_set)).await?,
        None => Vec::new(),
    };
    let mut abandoned = Vec::new();
    for rs in &holders {
        match drop_data(ctx, &ns, rs, &db, fence_epoch).await? {
            Dropped::Done => {}
            // The way out when the replica set cannot get a leader back: the data stays on
            // its volumes, the instance and its records go (docs/operator.md).
            Dropped::NoLeader if abandon => {
                let msg = format!(
                    "replica set {rs} has no leader: database {db} is NOT dropped (its data stays on the replica \
                     set's volumes, which are kept), as {ANNOTATION_ABANDON_DATA} asks"
                );
                event(ctx, dbi, EventType::Warning, "DataAbandoned", "Delete", &msg).await;
                abandoned.push(rs);
            }
            Dropped::NoLeader => {
                let err = Error::NoLeaderToDrop { database: db.clone(), replica_set: rs.clone() };
                report_deletion_blocked(ctx, dbi, &err.to_string()).await?;
                // An error keeps the finalizer (an `Ok` would release it) and retries.
                return Err(err);
            }
        }
    }
    // Volumes before records: a cleanup retried after this point still holds the claim.
    for rs in holders.iter().filter(|rs| !abandoned.contains(rs)) {
        delete_dedicated_volumes(ctx, dbi, &ns, rs).await?;
    }
    // A dedicated replica set a completed migration emptied, not removed yet (the instance
    // was deleted before its pass did it): its volumes go as well.
    if let Some(rs) = super::retire::vacated_source(ctx, &ns, &db).await? {
        delete_dedicated_volumes(ctx, dbi, &ns, &rs).await?;
    }
    if !ctx.store.delete_database(&db, &claim, placement.is_some()).await? {
        return Ok(Action::await_change());
    }
    event(ctx, dbi, EventType::Normal, "Deleted", "Delete", &format!("database {db}: data, route and users removed"))
        .await;
    Ok(Action::await_change())
}

/// What became of a database's data on its replica set.
enum Dropped {
    /// Dropped through the leader, or there is nothing to drop (no member left).
    Done,
    /// Members are there but none leads: the data cannot be dropped now.
    NoLeader,
}

/// The restore writing into the instance `name` of `ns` now, if one does: a DatabaseRestore
/// `Restoring` in place or beside (its source is the instance) or into it as a new instance.
/// A restore that only reads the instance's backups (into another, new instance) does not
/// hold its deletion, nor does one `Pending` (it fails when it finds its source deleted).
async fn running_restore(ctx: &Context, ns: &str, name: &str) -> Result<Option<String>, Error> {
    let restores: Objects<DatabaseRestore> = Objects::namespaced(ctx.client.clone(), ns);
    let writing = |r: &DatabaseRestore| match r.spec.target.mode {
        RestoreMode::InPlace | RestoreMode::Beside => r.spec.source == name,
        RestoreMode::NewInstance => r.spec.target.instance.as_deref() == Some(name),
    };
    Ok(restores
        .list(&ListParams::default())
        .await?
        .into_iter()
        .find(|r| writing(r) && r.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Restoring))
        .map(|r| r.name_any()))
}

/// Drops the database and its restore and verification copies on `rs`, fenced at
/// `fence_epoch` first (`controlplane::drop_instance_data`).
async fn drop_data(ctx: &Context, ns: &str, rs: &str, db: &str, fence_epoch: Option<u64>) -> Result<Dropped, Error> {
    let pods: Objects<Pod> = Objects::namespaced(ctx.client.clone(), ns);
    let selector = ListParams::default().labels(&format!("{}={rs}", objects::LABEL_REPLICA_SET));
    let mut statuses = Vec::new();
    for pod in pods.list(&selector).await? {
        if let Some(addr) = pod_admin(&pod)
            && let Some(s) = ctx.datanodes.in_namespace(ns).status(&addr).await
        {
            statuses.push((s, pod));
        }
    }
    match statuses.iter().find(|(s, _)| s.leader_id == Some(s.id)) {
        Some((_, pod)) => {
            let admin = pod_admin(pod).unwrap_or_default();
            let datanodes = ctx.datanodes.in_namespace(ns);
            crate::controlplane::drop_instance_data(datanodes.as_ref(), &admin, db, fence_epoch).await?;
            Ok(Dropped::Done)
        }
        // A replica set with no Pods left (a dedicated one being deleted with the instance)
        // has no data to drop; one with Pods but no leader must wait.
        None if statuses.is_empty() && pods.list(&selector).await?.is_empty() => Ok(Dropped::Done),
        None => Ok(Dropped::NoLeader),
    }
}

/// The deletion waits: say so where a person looks (phase `Deleting`, the `Ready`
/// condition, a Warning Event once).
async fn report_deletion_blocked(ctx: &Context, dbi: &DatabaseInstance, msg: &str) -> Result<(), Error> {
    let mut status = dbi.status.clone().unwrap_or_default();
    let generation = dbi.metadata.generation;
    let first = status.phase != Some(Phase::Deleting);
    status.phase = Some(Phase::Deleting);
    set_condition(&mut status.conditions, "Ready", "False", "DeletionBlocked", msg, generation);
    set_condition(&mut status.conditions, "Degraded", "True", "DeletionBlocked", msg, generation);
    if first {
        event(ctx, dbi, EventType::Warning, "DeletionBlocked", "Delete", msg).await;
    }
    patch_status(ctx, dbi, status).await
}

/// Set to `"true"` on an instance being deleted whose replica set has no leader: the
/// deletion goes on without dropping the database's data.
pub const ANNOTATION_ABANDON_DATA: &str = "nimbus.io/abandon-data";

/// The owners `object` has, with `me` among them (sorted by uid: a stable apply).
fn owners_with<K: Resource>(object: Option<&K>, me: &Option<OwnerReference>) -> Vec<OwnerReference> {
    let mut owners: Vec<OwnerReference> = object.map(|o| o.owner_references().to_vec()).unwrap_or_default();
    if let Some(me) = me
        && !owners.iter().any(|o| o.uid == me.uid)
    {
        owners.push(me.clone());
    }
    owners.sort_by(|a, b| a.uid.cmp(&b.uid));
    owners
}

fn with_owners<K: Resource>(mut object: K, owners: &[OwnerReference]) -> K {
    object.meta_mut().owner_references = Some(owners.to_vec());
    object
}

/// The databases on each replica set of `pool`: the instances placed there, and those a
/// migration is moving there (they will be). A replica set dedicated to an instance (the
/// `dedicated` tier in a shared pool has one) counts as full: shared placement never puts
/// another tenant there, and never reuses its name. It is known by its Service's owner,
/// and before that Service exists by the dedicated-tier instance placed or moving there.
pub(super) async fn replica_set_loads(ctx: &Context, ns: &str, pool: &str) -> Result<Vec<ReplicaSetLoad>, Error> {
    let api: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), ns);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for i in api.list(&ListParams::default()).await? {
        let status = i.status.as_ref();
        let placed = status.and_then(|s| s.placement.as_ref()).map(|p| (&p.pool, &p.replica_set));
        let moving = status.and_then(|s| s.migration_target.as_ref()).map(|t| (&t.pool, &t.replica_set));
        for (_, rs) in [placed, moving].into_iter().flatten().filter(|(p, _)| *p == pool) {
            let count = counts.entry(rs.clone()).or_default();
            *count = if i.spec.tier == Tier::Dedicated { u32::MAX } else { count.saturating_add(1) };
        }
    }
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    let of_pool = ListParams::default().labels(&format!("{}={pool}", objects::LABEL_POOL));
    for svc in services.list(&of_pool).await? {
        if objects::dedicated_owner(&svc).is_some() {
            counts.insert(svc.name_any(), u32::MAX);
        }
    }
    Ok(counts.into_iter().map(|(name, databases)| ReplicaSetLoad { name, databases }).collect())
}

pub(super) async fn node_zones(ctx: &Context) -> Result<Vec<String>, Error> {
    let nodes: Objects<Node> = Objects::all(ctx.client.clone());
    let mut zones: BTreeSet<String> = BTreeSet::new();
    for n in nodes.list(&ListParams::default()).await? {
        if let Some(z) = n.labels().get(objects::ZONE_LABEL) {
            zones.insert(z.clone());
        }
    }
    Ok(zones.into_iter().collect())
}

fn zones_of(svc: &Service) -> Option<Vec<String>> {
    let z = svc.annotations().get(objects::ANNOTATION_ZONES)?;
    Some(z.split(',').map(str::to_string).collect())
}

#[allow(clippy::too_many_arguments)]
fn status_of(
    backups: &super::backup::Backups,
    dbi: &DatabaseInstance,
    rs: &ReplicaSetShape,
    zones: &[String],
    report: &Report,
    published: bool,
) -> DatabaseInstanceStatus {
    let old = dbi.status.clone().unwrap_or_default();
    let (step, error) = (&report.step, report.error.as_ref());
    let leader = report.leader;
    let role_of = |id: u64| -> String { report.roles.get(&id).cloned().unwrap_or_else(|| "unknown".into()) };
    let members: Vec<MemberStatus> = report
        .members
        .iter()
        .map(|m| MemberStatus {
            id: m.id,
            name: objects::member_pod_name(&rs.name, m.id),
            zone: m.zone.clone(),
            role: role_of(m.id),
        })
        .collect();
    let steady = *step == Step::Steady;
    let was_ready = old.phase == Some(Phase::Ready) || old.phase == Some(Phase::Degraded);
    let (phase, ready, progressing, degraded) = match (published, steady, error) {
        (true, true, None) => (Phase::Ready, ("True", "Serving", "the database is served".to_string()), None, None),
        (true, _, _) => (
            Phase::Degraded,
            ("True", "Serving", "the database is served".to_string()),
            Some(step_reason(step)),
            Some(error.cloned().unwrap_or_else(|| format!("served while repairing: {step}"))),
        ),
        (false, _, _) if was_ready => (
            Phase::Degraded,
            ("False", "NoLeader", "the replica set has no leader".to_string()),
            Some(step_reason(step)),
            Some("the replica set has no leader".to_string()),
        ),
        (false, _, _) => (
            Phase::Provisioning,
            ("False", "Provisioning", format!("provisioning: {step}")),
            Some(step_reason(step)),
            error.cloned(),
        ),
    };
    let generation = dbi.metadata.generation;
    let mut conditions = old.conditions.clone();
    set_condition(&mut conditions, "Ready", ready.0, ready.1, &ready.2, generation);
    match &progressing {
        Some(reason) => set_condition(&mut conditions, "Progressing", "True", reason, &step.to_string(), generation),
        None => set_condition(&mut conditions, "Progressing", "False", "Steady", "nothing to do", generation),
    }
    match &degraded {
        Some(msg) => set_condition(&mut conditions, "Degraded", "True", "ReplicaSetUnhealthy", msg, generation),
        None => set_condition(&mut conditions, "Degraded", "False", "Healthy", "all members healthy", generation),
    }
    let limits = dbi.spec.limits.resolve(dbi.spec.tier);
    DatabaseInstanceStatus {
        phase: Some(phase),
        conditions,
        observed_generation: generation,
        endpoint: Some(objects::gateway_endpoint(&rs.namespace)),
        database: Some(dbi.database()),
        credentials_secret: published.then(|| objects::credentials_secret_name(&dbi.name_any())),
        placement: Some(PlacementStatus {
            replica_set: rs.name.clone(),
            pool: rs.pool.clone(),
            leader: leader.map(|id| objects::member_pod_name(&rs.name, id)),
            members,
        }),
        zones_summary: Some(zones.join(",")),
        limits: Some(LimitsStatus {
            qps: limits.qps,
            burst: limits.burst,
            max_connections: limits.max_connections,
            max_in_flight: limits.max_in_flight,
        }),
        migration: old.migration,
        migration_summary: old.migration_summary,
        migration_target: old.migration_target,
        backup: super::backup::reconciled_status(backups, dbi, old.backup),
        not_yet_active: dbi.not_yet_active(backups.running()),
        ready_members: Some(format!("{}/{}", report.members.iter().filter(|m| m.ready).count(), report.members.len())),
    }
}

/// Placed, and its replica set not yet reported on (just made, or the operator just
/// started): the placement is recorded (it is sticky), the rest of the status kept.
fn waiting_status(dbi: &DatabaseInstance, rs: &ReplicaSetShape, zones: &[String]) -> DatabaseInstanceStatus {
    let mut s = dbi.status.clone().unwrap_or_default();
    if s.placement.is_none() {
        s.placement = Some(PlacementStatus {
            replica_set: rs.name.clone(),
            pool: rs.pool.clone(),
            leader: None,
            members: Vec::new(),
        });
        s.zones_summary = Some(zones.join(","));
        s.endpoint = Some(objects::gateway_endpoint(&rs.namespace));
        s.database = Some(dbi.database());
    }
    if s.phase.is_none() {
        s.phase = Some(Phase::Provisioning);
        let generation = dbi.metadata.generation;
        let msg = format!("waiting for replica set {}", rs.name);
        set_condition(&mut s.conditions, "Ready", "False", "Provisioning", &msg, generation);
    }
    s
}

fn step_reason(step: &Step) -> String {
    match step {
        Step::Steady => "Steady",
        Step::Wait(_) => "Waiting",
        Step::Create { .. } => "CreatingMember",
        Step::Start { .. } => "StartingMember",
        Step::Bootstrap { .. } => "Bootstrapping",
        Step::AddLearner { .. } | Step::ChangeVoters { .. } | Step::RemoveMember { .. } => "ReplacingMember",
        Step::Delete { .. } => "DeletingMember",
        Step::Restart { .. } | Step::TransferLeader { .. } => "RollingRestart",
    }
    .into()
}

fn failed_status(dbi: &DatabaseInstance, reason: &str, message: &str) -> DatabaseInstanceStatus {
    let mut s = dbi.status.clone().unwrap_or_default();
    let generation = dbi.metadata.generation;
    s.phase = Some(Phase::Failed);
    s.observed_generation = generation;
    set_condition(&mut s.conditions, "Ready", "False", reason, message, generation);
    set_condition(&mut s.conditions, "Degraded", "True", reason, message, generation);
    s
}

/// Sets a condition, keeping `lastTransitionTime` unless the status flips.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let now = Time(jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

async fn patch_status(ctx: &Context, dbi: &DatabaseInstance, status: DatabaseInstanceStatus) -> Result<(), Error> {
    if dbi.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = dbi.namespace().ok_or(Error::MissingNamespace)?;
    let api: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), &ns);
    api.patch_status(&dbi.name_any(), &json!({"status": status})).await
}

pub(super) async fn event(
    ctx: &Context,
    dbi: &DatabaseInstance,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev =
        KubeEvent { type_, reason: reason.into(), note: Some(note.into()), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &dbi.object_ref(&())).await {
        warn!(error = %e, reason, "failed to publish an event");
    }
}
