//! Moving a database to another pool (a hot migration) from the DatabaseInstance
//! reconciler. The migration itself is `controlplane::migration` (its [`Migrator`] runs on
//! the elected operator, `run`); this part decides when one starts and tells the user:
//!
//! 1. `spec.pool` differs from the pool of the replica set the database is on
//!    (`status.placement.pool`): the new pool must exist (else the condition `Migrating`
//!    says `PoolNotFound` and nothing starts), a replica set of it is chosen once by
//!    placement (`status.migrationTarget`), its Service made if new (the replica-set
//!    reconciler then makes and bootstraps its members), and once it has a leader
//!    [`Migrator::start`] records the migration.
//! 2. While it runs, its record (etcd) is mirrored into `status.migration`,
//!    `status.migrationSummary` (the MIGRATION column) and the condition `Migrating`
//!    (reason: the phase; message: the step and what it waits for); an Event for each
//!    phase change seen, each abort and each retry.
//! 3. Once the route names the target (the switch), the placement moves to it: from then
//!    on the instance's replica set is the target, and the source no longer counts it.
//!
//! The route is the migration's while it runs: the reconcilers only ever update its
//! members on the replica set it names (a compare-and-swap), and never create it again.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::Error;
use super::api::Objects;
use super::instance::{
    Context, busy_requeue, claim_of, event, node_zones, pool_of, replica_set_loads, replica_set_shape, set_condition,
};
use super::objects::{self, LABEL_POOL, LABEL_REPLICA_SET};
use super::provisioner::pod_admin;
use super::retire::Vacated;
use crate::controlplane::migration::{
    MigrationRecord, MigrationStatus, MigrationWorld, Migrator, Phase as MigrationPhase, ReplicaSetDirectory,
    StartError, StartRequest, Step, Tuning, now_ms,
};
use crate::controlplane::placement::{self, PoolMode};
use crate::crd::v1alpha1::{
    DatabaseInstance, DatabaseInstanceStatus, MigrationTarget, PlacementStatus, PoolMode as CrdPoolMode, Tier,
};

/// The condition that explains a migration.
pub const CONDITION: &str = "Migrating";

/// The migrations as the reconcilers reach them: the [`Migrator`] (start, cancel) and its
/// world (the records, the route), with the tuning it runs with (its hold threshold is
/// what the `Migrating` condition says it waits for).
#[derive(Clone)]
pub struct Migrations {
    pub migrator: Arc<Migrator>,
    pub world: Arc<dyn MigrationWorld>,
    pub tuning: Tuning,
}

impl Migrations {
    pub fn new(world: Arc<dyn MigrationWorld>, tuning: Tuning) -> Migrations {
        Migrations { migrator: Arc::new(Migrator::new(world.clone(), tuning.clone())), world, tuning }
    }
}

/// Where a replica set's members answer on Kubernetes: the admin port of its member Pods
/// (the ones the replica-set reconciler made, labelled with its name), as the reconcilers
/// reach them ([`pod_admin`]).
pub struct PodDirectory {
    pub client: kube::Client,
}

#[async_trait]
impl ReplicaSetDirectory for PodDirectory {
    async fn admin_addrs(&self, namespace: &str, name: &str) -> Option<Vec<String>> {
        let services: Objects<Service> = Objects::namespaced(self.client.clone(), namespace);
        match services.get_opt(name).await {
            // No Service: no such replica set (placement makes it first, and it goes last).
            Ok(None) => return None,
            Ok(Some(svc)) if !svc.labels().contains_key(LABEL_REPLICA_SET) => return None,
            Ok(Some(_)) => {}
            // Not known now: no member to reach (a transient failure for the migration),
            // never "no such replica set" (which would abort it).
            Err(e) => {
                warn!(replica_set = name, error = %e, "failed to read a replica set's Service for a migration");
                return Some(Vec::new());
            }
        }
        let pods: Objects<Pod> = Objects::namespaced(self.client.clone(), namespace);
        let selector = ListParams::default().labels(&format!("{LABEL_REPLICA_SET}={name}"));
        match pods.list(&selector).await {
            Ok(pods) => {
                Some(pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).filter_map(pod_admin).collect())
            }
            Err(e) => {
                warn!(replica_set = name, error = %e, "failed to list a replica set's members for a migration");
                Some(Vec::new())
            }
        }
    }
}

/// `1240` as `1,240` (the migration's own messages use it too).
pub use crate::controlplane::migration::plan::thousands;

/// Bytes in the unit a person reads them in: `812 B`, `41 MB`, `1.2 GB` (powers of 1000).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if value < 10.0 { format!("{value:.1} {}", UNITS[unit]) } else { format!("{value:.0} {}", UNITS[unit]) }
}

/// The MIGRATION column: the phase and its progress in a few words.
pub fn summary(s: &MigrationStatus) -> String {
    let running = s.finished_at.is_none();
    let text = match s.phase {
        MigrationPhase::Copying => format!("Copying {}", size(s.bytes_copied)),
        MigrationPhase::CatchingUp => format!("CatchingUp {} ops behind", thousands(s.lag_ops)),
        MigrationPhase::Aborted if running => "Aborted, retrying".to_owned(),
        MigrationPhase::Completed => match s.hold_ms {
            Some(ms) => format!("Completed (held {ms} ms)"),
            None => "Completed".to_owned(),
        },
        other => other.to_string(),
    };
    if s.attempt > 1 { format!("{text} (attempt {})", s.attempt) } else { text }
}

/// The `Migrating` condition for a recorded migration: status, reason (the phase) and a
/// message saying what it does now and what it waits for.
pub fn condition(record: &MigrationRecord, tuning: &Tuning, now: u64) -> (&'static str, String, String) {
    let (from, to) = (&record.from_replica_set, &record.to_replica_set);
    let reason = record.phase.to_string();
    let attempt = if record.attempt > 1 { format!(" (attempt {})", record.attempt) } else { String::new() };
    let in_secs = |at: u64| at.saturating_sub(now).div_ceil(1000);
    let mut message = match record.step {
        Step::Copy => match record.next_retry_ms {
            Some(at) => format!(
                "attempt {} aborted: {}; the database is served from {from}, and attempt {} starts in {} s",
                record.attempt,
                record.error.as_deref().unwrap_or("no reason recorded"),
                record.attempt + 1,
                in_secs(at)
            ),
            None => format!(
                "copying the database from {from} to {to}{attempt}: {} documents, {} so far",
                thousands(record.documents_copied),
                size(record.bytes_copied)
            ),
        },
        Step::CatchUp => format!(
            "applying the source's changes on {to}{attempt}; waiting for lag under {} s: {} ops behind{}",
            tuning.hold_under.as_secs_f64(),
            thousands(record.lag_ops),
            catch_up_budget(record.catch_up_started_ms, tuning.catch_up_timeout, now)
        ),
        Step::Hold => format!(
            "holding the database's requests{attempt}: waiting for every gateway to acknowledge{}",
            deadline(record.hold_deadline_ms, now)
        ),
        Step::Fence => {
            format!("holding{attempt}: fencing the database on {from}{}", deadline(record.hold_deadline_ms, now))
        }
        Step::Verify => format!(
            "holding{attempt}: applying the last changes on {to} and comparing checksums{}",
            deadline(record.hold_deadline_ms, now)
        ),
        Step::Switch => format!("switching the route to {to}{attempt}"),
        Step::CleanUp => format!(
            "served from {to}; the copy on {from} is dropped after the grace period{}",
            record.next_retry_ms.map(|at| format!(", in {} s", in_secs(at))).unwrap_or_default()
        ),
        Step::Done => format!(
            "completed: the database moved from {from} to {to}{}",
            record.hold_ms.map(|ms| format!(", its requests held {ms} ms at the switch")).unwrap_or_default()
        ),
        Step::Abort => format!(
            "aborting attempt {}: {}; the route goes back to {from}",
            record.attempt,
            record.error.as_deref().unwrap_or("no reason recorded")
        ),
        Step::Aborted => format!(
            "given up after {} attempts: {}; the database is served from {from}. Set spec.pool back to the pool \
             it is on, or to another pool to try again",
            record.attempt,
            record.error.as_deref().unwrap_or("no reason recorded")
        ),
    };
    // A step that keeps failing says on what (an abort's reason is already said); a
    // completed one, what its clean-up left.
    if let Some(error) = &record.error
        && record.step == Step::Done
    {
        message.push_str(&format!("; {error}"));
    } else if let Some(error) = &record.error
        && !matches!(record.step, Step::Abort | Step::Aborted | Step::Done)
        && !(record.step == Step::Copy && record.next_retry_ms.is_some())
    {
        message.push_str(&format!("; last error: {error}"));
    }
    let status = if record.step.is_final() { "False" } else { "True" };
    (status, reason, message)
}

/// What is left of the catch-up's budget (`Tuning::catch_up_timeout`), in whole seconds
/// rounded up: ` (gives up in 6 min 52 s)`; nothing without a budget or a recorded start.
/// The driver gives up at its next round once it is spent.
fn catch_up_budget(started_ms: Option<u64>, budget: std::time::Duration, now: u64) -> String {
    let Some(started) = started_ms.filter(|_| !budget.is_zero()) else { return String::new() };
    let end = started.saturating_add(budget.as_millis() as u64);
    match end.saturating_sub(now).div_ceil(1000) {
        0 => " (its budget spent: giving up)".to_owned(),
        left => {
            format!(
                " (gives up in {})",
                crate::controlplane::migration::plan::human(std::time::Duration::from_secs(left))
            )
        }
    }
}

fn deadline(at: Option<u64>, now: u64) -> String {
    at.map(|d| format!(" (deadline in {} ms)", d.saturating_sub(now))).unwrap_or_default()
}

/// The Events a person should see for the change from `old` to `new`: one per phase
/// change, abort and retry (as this reconciler sees them: a phase shorter than its
/// requeue may pass unseen; the status keeps the last).
pub fn events(old: Option<&MigrationStatus>, new: &MigrationStatus) -> Vec<(EventType, String, String)> {
    let same_migration = old.is_some_and(|o| o.started_at == new.started_at && o.to_replica_set == new.to_replica_set);
    let old = old.filter(|_| same_migration);
    let mut out = Vec::new();
    if let Some(o) = old
        && new.attempt > o.attempt
    {
        out.push((
            EventType::Normal,
            "MigrationRetrying".to_owned(),
            format!(
                "attempt {} of the move from {} to {} started",
                new.attempt, new.from_replica_set, new.to_replica_set
            ),
        ));
    }
    let changed = old.is_none_or(|o| o.phase != new.phase || o.finished_at.is_some() != new.finished_at.is_some());
    if !changed {
        return out;
    }
    let (from, to) = (&new.from_replica_set, &new.to_replica_set);
    let error = new.error.as_deref().unwrap_or("no reason recorded");
    let (type_, note) = match new.phase {
        MigrationPhase::Copying => (EventType::Normal, format!("copying the database from {from} to {to}")),
        MigrationPhase::CatchingUp => (
            EventType::Normal,
            format!("copy done ({}): applying the source's changes on {to}", size(new.bytes_copied)),
        ),
        MigrationPhase::Holding => (EventType::Normal, format!("holding the database's requests to switch to {to}")),
        MigrationPhase::Switching => (EventType::Normal, format!("switching the route to {to}")),
        MigrationPhase::CleaningUp => (EventType::Normal, format!("served from {to}; {from}'s copy is dropped later")),
        MigrationPhase::Completed => (EventType::Normal, format!("moved from {from} to {to}")),
        MigrationPhase::Aborted if new.finished_at.is_none() => (
            EventType::Warning,
            format!("attempt {} aborted, nothing lost, served from {from}; retried later: {error}", new.attempt),
        ),
        MigrationPhase::Aborted => {
            (EventType::Warning, format!("given up after {} attempts, served from {from}: {error}", new.attempt))
        }
    };
    out.push((type_, format!("Migration{}", new.phase), note));
    out
}

/// What a pass found about moving the database.
pub(super) enum Move {
    /// Nothing runs or waits: the usual requeue.
    Idle,
    /// A migration runs or is being prepared: look again soon.
    Active,
}

/// The migration part of an instance's pass (the instance is placed): mirrors the
/// migration into `status`, moves the placement at the switch, and starts a migration when
/// `spec.pool` names another pool. Failures to reach etcd are told in the condition, not
/// returned: the rest of the status is still written.
pub(super) async fn reconcile(
    ctx: &Context,
    dbi: &DatabaseInstance,
    ns: &str,
    published: bool,
    status: &mut DatabaseInstanceStatus,
) -> Result<Move, Error> {
    let db = dbi.database();
    let generation = dbi.metadata.generation;
    let Some(placement) = status.placement.clone() else { return Ok(Move::Idle) };
    let migrations = &ctx.migrations;
    let record = match migrations.world.record(&db).await {
        Ok(r) => r.map(|(r, _)| r).filter(|r| r.namespace == ns),
        Err(e) => {
            let msg = format!("failed to read the migration record of {db} from etcd: {e}");
            set_condition(&mut status.conditions, CONDITION, "Unknown", "EtcdUnavailable", &msg, generation);
            return Ok(Move::Active);
        }
    };

    // The switch happened: the route names the target; the placement follows it.
    if let Some(r) = &record
        && r.to_replica_set != placement.replica_set
        && r.step >= Step::Switch
        && r.step <= Step::Done
        && let Ok(Some((route, _))) = migrations.world.route(&db).await
        && route.replica_set == r.to_replica_set
    {
        move_placement(ctx, dbi, ns, r, status).await?;
    }

    let placement = status.placement.clone().unwrap_or(placement);
    if let Some(r) = &record {
        mirror(ctx, dbi, r, status).await;
    }
    // Completed: a dedicated replica set it emptied goes (`k8s::retire`), before any next
    // move (which may choose a replica set of that name again).
    if let Some(r) = record.as_ref().filter(|r| r.step == Step::Done) {
        match super::retire::remove_vacated(ctx, dbi, ns, r, status).await {
            Ok(Vacated::Kept | Vacated::Removed) => {}
            // Said in the condition: a Pod on a lost node stays Terminating until its Node is
            // deleted or tainted out-of-service (`retire::machine_off`), and the next move
            // waits for this one.
            Ok(Vacated::Removing(left)) => {
                if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == CONDITION) {
                    c.message.push_str(&format!(
                        "; removing replica set {}, emptied by the move: waiting for {} member Pods and {} volumes \
                         to go (a Pod on a lost node goes once its Node is deleted, or tainted \
                         node.kubernetes.io/out-of-service when its machine is known to be off)",
                        r.from_replica_set, left.pods, left.volumes
                    ));
                }
                return Ok(Move::Active);
            }
            // The database is served all the same: said in the condition, retried soon.
            Err(e) => {
                let from = &r.from_replica_set;
                warn!(instance = %dbi.name_any(), replica_set = %from, error = %e, "failed to remove the replica set the instance moved from");
                if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == CONDITION) {
                    c.message.push_str(&format!(
                        "; removing replica set {from}, emptied by the move, failed (retried): {e}"
                    ));
                }
                return Ok(Move::Active);
            }
        }
    }
    let running = record.as_ref().is_some_and(|r| !r.step.is_final());
    if running {
        let r = record.as_ref().map(|r| r.to_replica_set.clone()).unwrap_or_default();
        // The race the CRD's rule cannot see: a second pool change before the operator
        // wrote the first one's status. It waits for this one.
        let target_pool = status.migration_target.as_ref().filter(|t| t.replica_set == r).map(|t| t.pool.clone());
        if target_pool.is_some_and(|p| p != dbi.spec.pool)
            && dbi.spec.pool != placement.pool
            && let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == CONDITION)
            && !c.message.contains("queued")
        {
            c.message.push_str(&format!(
                "; spec.pool now names pool {}: that move is queued, it starts once this one finishes",
                dbi.spec.pool
            ));
        }
        return Ok(Move::Active);
    }

    if dbi.spec.pool == placement.pool {
        // Nothing to move (again): a target chosen for a pool change undone is forgotten.
        status.migration_target = None;
        if record.is_none()
            && let Some(c) = status.conditions.iter().find(|c| c.type_ == CONDITION)
            && c.status == "True"
        {
            let msg = format!("the database is on pool {}, as spec.pool says", placement.pool);
            set_condition(&mut status.conditions, CONDITION, "False", "NotMigrating", &msg, generation);
        }
        return Ok(Move::Idle);
    }
    start_move(ctx, dbi, ns, &placement, record.as_ref(), published, status).await
}

/// `spec.pool` names another pool and no migration runs: choose the target, make sure it
/// exists and leads, then start.
async fn start_move(
    ctx: &Context,
    dbi: &DatabaseInstance,
    ns: &str,
    placement: &PlacementStatus,
    last: Option<&MigrationRecord>,
    published: bool,
    status: &mut DatabaseInstanceStatus,
) -> Result<Move, Error> {
    let db = dbi.database();
    let generation = dbi.metadata.generation;
    let pool_name = dbi.spec.pool.clone();
    let (pool, pool_owner) = match pool_of(ctx, ns, &pool_name).await {
        Ok(p) => p,
        Err(Error::PoolNotFound(p)) => {
            let msg = format!(
                "no ResourcePool {p:?} in namespace {ns}: nothing was started, the database stays on {} (pool {}). \
                 Create the pool, or set spec.pool back to {}",
                placement.replica_set, placement.pool, placement.pool
            );
            tell_once(ctx, dbi, status, EventType::Warning, "PoolNotFound", &msg).await;
            set_condition(&mut status.conditions, CONDITION, "False", "PoolNotFound", &msg, generation);
            status.migration_target = None;
            return Ok(Move::Idle);
        }
        Err(e) => return Err(e),
    };
    let dedicated = pool.mode == CrdPoolMode::Dedicated || dbi.spec.tier == Tier::Dedicated;

    // The target: chosen once for this pool change.
    let target = match status.migration_target.clone().filter(|t| t.pool == pool_name) {
        Some(t) => t,
        None => {
            let mode = if dedicated {
                PoolMode::Dedicated
            } else {
                PoolMode::Shared { capacity: pool.databases_per_replica_set }
            };
            let loads = replica_set_loads(ctx, ns, &pool_name).await?;
            let chosen = placement::choose_replica_set(&pool_name, mode, &loads, &dbi.name_any());
            info!(instance = %dbi.name_any(), replica_set = chosen.name(), pool = %pool_name, "migration target chosen");
            MigrationTarget { replica_set: chosen.name().to_owned(), pool: pool_name.clone(), migration: None }
        }
    };
    status.migration_target = Some(target.clone());

    // Started for this target before, and given up: not again by itself.
    if let (Some(id), Some(r)) = (&target.migration, last)
        && &r.id == id
    {
        return Ok(Move::Idle);
    }

    // The target replica set: its Service (placement's record) made here, its members by
    // the replica-set reconciler; started from once it leads.
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    let existing = services.get_opt(&target.replica_set).await?;
    // Another instance's dedicated replica set of the same name: never moved onto.
    if let Some(owner) =
        existing.as_ref().and_then(|svc| objects::dedicated_to_another(svc, dbi.metadata.uid.as_deref()))
    {
        let msg = format!(
            "cannot move to pool {pool_name}: replica set {} is dedicated to instance {}, and its name is this \
             instance's replica set's too; give this instance (or the pool) another name",
            target.replica_set, owner.name
        );
        set_condition(&mut status.conditions, CONDITION, "False", "PlacementConflict", &msg, generation);
        return Ok(Move::Active);
    }
    if existing.is_none() {
        let replicas = if dedicated { dbi.spec.replicas } else { pool.replicas_per_set };
        let requested = dbi.spec.zones.clone().unwrap_or_default();
        let zones = match placement::member_zones(&node_zones(ctx).await?, &requested, replicas.max(0) as u32) {
            Ok(z) => z,
            Err(e) => {
                let msg = format!("cannot place replica set {} of pool {pool_name}: {e}", target.replica_set);
                set_condition(&mut status.conditions, CONDITION, "False", "PlacementFailed", &msg, generation);
                return Ok(Move::Active);
            }
        };
        let shape = replica_set_shape(&target.replica_set, ns, &pool_name, &pool, pool_owner, dedicated.then_some(dbi));
        let bootstrapped = ctx.store.replica_set(ns, &target.replica_set).await?.is_some();
        services.apply(&target.replica_set, &objects::replica_set_service(&shape, &zones, bootstrapped)).await?;
        let note = format!(
            "moving database {db} to pool {pool_name}: replica set {} is made for it; the migration starts once it \
             has a leader",
            target.replica_set
        );
        event(ctx, dbi, EventType::Normal, "MigrationPreparing", "Migrate", &note).await;
    }
    let leads = ctx.reports.get(ns, &target.replica_set).is_some_and(|r| r.leader.is_some());
    if !leads || !published {
        let msg = if published {
            format!(
                "moving to pool {pool_name}: waiting for replica set {} to start its members and elect a leader",
                target.replica_set
            )
        } else {
            format!("moving to pool {pool_name}: waiting for {} to serve the database first", placement.replica_set)
        };
        set_condition(&mut status.conditions, CONDITION, "True", "Preparing", &msg, generation);
        return Ok(Move::Active);
    }

    let req = StartRequest { db: db.clone(), namespace: ns.to_owned(), to_replica_set: target.replica_set.clone() };
    match ctx.migrations.migrator.start(&req).await {
        Ok(record) => {
            let note = format!(
                "moving database {db} from {} (pool {}) to {} (pool {pool_name}) while it serves",
                record.from_replica_set, placement.pool, record.to_replica_set
            );
            event(ctx, dbi, EventType::Normal, "MigrationStarted", "Migrate", &note).await;
            status.migration_target = Some(MigrationTarget { migration: Some(record.id.clone()), ..target });
            mirror(ctx, dbi, &record, status).await;
            Ok(Move::Active)
        }
        // Another pass (or operator) started it: the next pass mirrors it.
        Err(StartError::AlreadyMigrating { .. }) => Ok(Move::Active),
        Err(e) => {
            let msg = format!("moving to pool {pool_name}: not started yet: {e}");
            set_condition(&mut status.conditions, CONDITION, "True", "Preparing", &msg, generation);
            Ok(Move::Active)
        }
    }
}

/// `status.migration`, its summary and the condition from the record; an Event for each
/// change a person should see.
async fn mirror(ctx: &Context, dbi: &DatabaseInstance, record: &MigrationRecord, status: &mut DatabaseInstanceStatus) {
    let new = record.status();
    let old = dbi.status.as_ref().and_then(|s| s.migration.as_ref());
    for (type_, reason, note) in events(old, &new) {
        event(ctx, dbi, type_, &reason, "Migrate", &note).await;
    }
    let (cond, reason, message) = condition(record, &ctx.migrations.tuning, now_ms());
    set_condition(&mut status.conditions, CONDITION, cond, &reason, &message, dbi.metadata.generation);
    status.migration_summary = Some(summary(&new));
    status.migration = Some(new);
}

/// The placement follows the route to the target: its pool is the one the target was
/// chosen in (else its Service's label); members and leader as its replica set last
/// reported them. The route's members are brought up to date on the target (a
/// compare-and-swap on the replica set it names: never a move).
async fn move_placement(
    ctx: &Context,
    dbi: &DatabaseInstance,
    ns: &str,
    record: &MigrationRecord,
    status: &mut DatabaseInstanceStatus,
) -> Result<(), Error> {
    let to = record.to_replica_set.clone();
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), ns);
    let svc = services.get_opt(&to).await?;
    let pool = match status.migration_target.as_ref().filter(|t| t.replica_set == to) {
        Some(t) => t.pool.clone(),
        None => svc.as_ref().and_then(|s| s.labels().get(LABEL_POOL).cloned()).unwrap_or_else(|| dbi.spec.pool.clone()),
    };
    let report = ctx.reports.get(ns, &to);
    status.placement = Some(PlacementStatus {
        replica_set: to.clone(),
        pool: pool.clone(),
        leader: report.as_ref().and_then(|r| r.leader).map(|id| objects::member_pod_name(&to, id)),
        members: Vec::new(),
    });
    if let Some(zones) = svc.as_ref().and_then(|s| s.annotations().get(objects::ANNOTATION_ZONES)) {
        status.zones_summary = Some(zones.clone());
    }
    status.migration_target = None;
    if let Some(report) = report.filter(|r| r.leader.is_some()) {
        let claim = claim_of(dbi)?;
        ctx.store.update_route_members(&dbi.database(), &claim, &to, report.route).await?;
    }
    let note = format!("database {} is served from {to} (pool {pool}) now", dbi.database());
    event(ctx, dbi, EventType::Normal, "Moved", "Migrate", &note).await;
    Ok(())
}

/// An Event once per reason: only when the condition does not already say it.
async fn tell_once(
    ctx: &Context,
    dbi: &DatabaseInstance,
    status: &DatabaseInstanceStatus,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let told = status.conditions.iter().any(|c| c.type_ == CONDITION && c.reason == reason && c.message == note);
    if !told {
        event(ctx, dbi, type_, reason, "Migrate", note).await;
    }
}

/// Deleting an instance stops its migration if it has not switched (it rolls back: the
/// target's import is dropped); after the switch it finishes on its own.
pub(super) async fn cancel_for_deletion(ctx: &Context, db: &str) {
    match ctx.migrations.migrator.cancel(db, "the instance is being deleted").await {
        Ok(true) => info!(db, "migration cancelled: the instance is being deleted"),
        Ok(false) => {}
        Err(e) => warn!(db, error = %e, "failed to cancel the migration of an instance being deleted"),
    }
}

/// The replica sets that hold a copy of `db` as its deletion must find them, the one it
/// lives on first: where the route says it lives (or, without a route, where a switched
/// migration moved it, else the instance's placement), then the source of a switched
/// migration whose clean-up has not dropped its copy yet, then the placement. The placement
/// alone is not enough: it follows the route only at the instance's next pass after the
/// switch, so until then it names the source while the database lives on the target.
///
/// A migration not switched holds no copy of its own to drop here: its cancellation rolls
/// it back, and the rollback drops the target's import.
pub(super) fn replica_sets_holding(
    placement: Option<&str>,
    route: Option<&str>,
    record: Option<&MigrationRecord>,
) -> Vec<String> {
    let switched = record.filter(|r| (Step::Switch..=Step::Done).contains(&r.step));
    let lives = route.or(switched.map(|r| r.to_replica_set.as_str())).or(placement);
    // A completed migration's clean-up dropped the source's copy: the placement still
    // naming it is only behind.
    let cleaned = switched.filter(|r| r.step == Step::Done).map(|r| r.from_replica_set.as_str());
    let source = switched.filter(|r| r.step < Step::Done).map(|r| r.from_replica_set.as_str());
    let mut out: Vec<String> = Vec::new();
    for rs in [lives, source, placement.filter(|p| Some(*p) != cleaned)].into_iter().flatten() {
        if !out.iter().any(|o| o == rs) {
            out.push(rs.to_owned());
        }
    }
    out
}

/// [`replica_sets_holding`] for an instance being deleted in `ns`, from etcd's route and
/// migration record of `db` (a record of another namespace's database of that name is
/// not this one's).
pub(super) async fn replica_sets_to_drop(
    ctx: &Context,
    ns: &str,
    db: &str,
    placement: Option<&str>,
) -> Result<Vec<String>, Error> {
    let unreadable = |what: &str, e: crate::controlplane::migration::Failure| Error::Locate {
        database: db.to_owned(),
        reason: format!("failed to read its {what} from etcd: {e}"),
    };
    let world = &ctx.migrations.world;
    let route = world.route(db).await.map_err(|e| unreadable("route", e))?.map(|(r, _)| r.replica_set);
    let record = world.record(db).await.map_err(|e| unreadable("migration record", e))?.map(|(r, _)| r);
    let record = record.filter(|r| r.namespace == ns);
    Ok(replica_sets_holding(placement, route.as_deref(), record.as_ref()))
}

/// Requeue for an active migration.
pub(super) fn requeue(m: &Move) -> Option<kube::runtime::controller::Action> {
    matches!(m, Move::Active).then(busy_requeue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_as_a_person_writes_them() {
        assert_eq!(thousands(1240), "1,240");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(size(812), "812 B");
        assert_eq!(size(41_000_000), "41 MB");
        assert_eq!(size(1_200_000_000), "1.2 GB");
    }

    fn record(step: Step) -> MigrationRecord {
        let mut r = MigrationRecord::new("m".into(), "shop", "apps", "default-rs0", "big-rs0", 3, 1_000);
        r.set_step(step);
        r
    }

    #[test]
    fn the_summary_shows_the_phase_and_its_progress() {
        let mut r = record(Step::Copy);
        r.bytes_copied = 41_000_000;
        assert_eq!(summary(&r.status()), "Copying 41 MB");
        let mut r = record(Step::CatchUp);
        r.lag_ops = 1240;
        assert_eq!(summary(&r.status()), "CatchingUp 1,240 ops behind");
        r.attempt = 2;
        assert_eq!(summary(&r.status()), "CatchingUp 1,240 ops behind (attempt 2)");
        let mut r = record(Step::Done);
        r.finished_at_ms = Some(2_000);
        assert_eq!(summary(&r.status()), "Completed");
    }

    #[test]
    fn the_condition_says_what_the_catch_up_waits_for() {
        let mut r = record(Step::CatchUp);
        r.lag_ops = 1240;
        let (status, reason, message) = condition(&r, &Tuning::default(), 0);
        assert_eq!((status, reason.as_str()), ("True", "CatchingUp"));
        assert!(message.contains("waiting for lag under 0.2 s: 1,240 ops behind"), "{message}");
        assert!(!message.contains("gives up"), "no recorded start, no time left shown: {message}");
        // With the start recorded: what is left of the 10 min budget, in whole seconds.
        r.catch_up_started_ms = Some(1_000);
        let (_, _, message) = condition(&r, &Tuning::default(), 1_000 + 187_300);
        assert!(
            message.ends_with("waiting for lag under 0.2 s: 1,240 ops behind (gives up in 6 min 53 s)"),
            "{message}"
        );
        let (_, _, message) = condition(&r, &Tuning::default(), 1_000 + 600_000);
        assert!(message.ends_with("1,240 ops behind (its budget spent: giving up)"), "{message}");
        let unbounded = Tuning { catch_up_timeout: std::time::Duration::ZERO, ..Tuning::default() };
        let (_, _, message) = condition(&r, &unbounded, 5_000);
        assert!(message.ends_with("1,240 ops behind"), "no budget, none shown: {message}");
    }

    #[test]
    fn a_deletion_drops_the_database_where_it_lives_and_wherever_a_copy_remains() {
        let holding = |placement, route, step: Option<Step>| {
            let r = step.map(record);
            replica_sets_holding(placement, route, r.as_ref())
        };
        // No migration: the route's replica set (the placement's, normally).
        assert_eq!(holding(Some("default-rs0"), Some("default-rs0"), None), ["default-rs0"]);
        assert_eq!(holding(Some("default-rs0"), None, None), ["default-rs0"]);
        assert_eq!(holding(None, None, None), Vec::<String>::new());
        // Not switched: the database lives on the source; the rollback drops the import.
        for step in [Step::Copy, Step::CatchUp, Step::Hold, Step::Fence, Step::Verify, Step::Abort, Step::Aborted] {
            assert_eq!(holding(Some("default-rs0"), Some("default-rs0"), Some(step)), ["default-rs0"], "{step:?}");
        }
        // Switched, the placement not yet following: the target first, and the source's
        // copy until the clean-up dropped it.
        for step in [Step::Switch, Step::CleanUp] {
            assert_eq!(holding(Some("default-rs0"), Some("big-rs0"), Some(step)), ["big-rs0", "default-rs0"]);
            assert_eq!(holding(Some("default-rs0"), None, Some(step)), ["big-rs0", "default-rs0"], "route gone");
        }
        assert_eq!(holding(Some("default-rs0"), Some("big-rs0"), Some(Step::Done)), ["big-rs0"]);
        // The placement followed: the same.
        assert_eq!(holding(Some("big-rs0"), Some("big-rs0"), Some(Step::CleanUp)), ["big-rs0", "default-rs0"]);
        assert_eq!(holding(Some("big-rs0"), Some("big-rs0"), Some(Step::Done)), ["big-rs0"]);
    }

    #[test]
    fn an_abort_then_a_retry_are_each_an_event() {
        let mut r = record(Step::Verify);
        let before = r.status();
        r.error = Some("checksum differs".into());
        r.next_retry_ms = Some(50_000);
        r.set_step(Step::Copy);
        let aborted = r.status();
        let ev = events(Some(&before), &aborted);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].1, "MigrationAborted");
        assert!(ev[0].2.contains("checksum differs"), "{}", ev[0].2);
        r.next_retry_ms = None;
        r.attempt = 2;
        r.set_step(Step::Copy);
        let retried = events(Some(&aborted), &r.status());
        let reasons: Vec<&str> = retried.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(reasons, ["MigrationRetrying", "MigrationCopying"]);
        assert!(events(Some(&r.status()), &r.status()).is_empty(), "no change, no Event");
    }
}
