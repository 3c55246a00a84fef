//! The replica-set reconciler: the one place that runs a replica set's member steps.
//!
//! Keyed by the replica set's headless Service (namespace and name: the Service exists
//! from placement on, and carries the zones), woken by its member Pods and every
//! [`REQUEUE_STEADY`] or so. One pass: observe the members → record the bootstrap →
//! apply the Service and PDB → one driver step → bring the routes' member lists up to date
//! → leave a [`Report`] for the instances on it. The instance reconcilers only place,
//! publish and report; with 200 tenants on a replica set, its members are stepped by one
//! reconciler, not 200 (kube's controller never runs two reconciles of one key at once).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use nimbus_api::etcd::{ReplicaSetRecord, RouteMember};
use tracing::warn;

use super::Error;
use super::api::Objects;
use super::instance::{Context, pool_of, replica_set_shape};
use super::objects::{self, ANNOTATION_BOOTSTRAPPED, ANNOTATION_REMOVING, ANNOTATION_ZONES, LABEL_POOL};
use super::provisioner::{ObjectEvents, PodProvisioner};
use crate::controlplane::driver::{self, Events, Provisioner, Severity};
use crate::controlplane::members::{Action as Step, Desired, MemberView, RaftView};
use crate::crd::v1alpha1::DatabaseInstance;

/// Requeue while a step is under way, and when all is steady (a health check), before jitter.
pub const REQUEUE_BUSY: Duration = Duration::from_secs(5);
pub const REQUEUE_STEADY: Duration = Duration::from_secs(60);
/// How long a pass waits for the node watch's first list before it requeues.
const NODES_WAIT: Duration = Duration::from_millis(200);

/// What a replica set's last pass saw and did, for the instances placed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub members: Vec<MemberView>,
    /// Each member's Raft role as it reported it (`leader`, `follower`, ...).
    pub roles: BTreeMap<u64, String>,
    pub leader: Option<u64>,
    /// The voters at their data addresses: a route's members.
    pub route: Vec<RouteMember>,
    pub step: Step,
    /// The step failed, and why.
    pub error: Option<String>,
    /// Bootstrapped once, and now every member starts empty: never initialised again.
    pub volumes_lost: bool,
}

/// The last report of each replica set, by (namespace, name), and the route members last
/// written for it (a pass writes routes only when these change).
#[derive(Default, Clone)]
pub struct Reports(Arc<Mutex<HashMap<ReplicaSetKey, Reported>>>);

/// A replica set: (namespace, name).
type ReplicaSetKey = (String, String);
/// Its last report, and the route members last written.
type Reported = (Report, Vec<RouteMember>);

impl Reports {
    pub fn get(&self, ns: &str, rs: &str) -> Option<Report> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(ns.to_owned(), rs.to_owned())).map(|(r, _)| r.clone())
    }

    fn published(&self, ns: &str, rs: &str) -> Option<Vec<RouteMember>> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(ns.to_owned(), rs.to_owned())).map(|(_, p)| p.clone())
    }

    fn put(&self, ns: &str, rs: &str, report: Report, published: Vec<RouteMember>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert((ns.to_owned(), rs.to_owned()), (report, published));
    }

    pub(super) fn forget(&self, ns: &str, rs: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&(ns.to_owned(), rs.to_owned()));
    }
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let key = format!("replicaset/{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    let result = drive(&svc, &ctx).await;
    ctx.metrics.reconciled("ReplicaSet", started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    result
}

/// Back-off with jitter on errors, per replica set; a conflict is retried at once.
pub fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(replica_set = %svc.name_any(), error = %err, "replica-set reconcile failed; requeueing");
    let key = format!("replicaset/{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    ctx.backoff.failed(&key, err.is_conflict())
}

async fn drive(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let ns = svc.namespace().ok_or(Error::MissingNamespace)?;
    let rs_name = svc.name_any();
    // Going: deleted, or being removed by the operator (a dedicated replica set its instance
    // moved away from, `k8s::retire`), whose members must not be replaced as they go.
    if svc.metadata.deletion_timestamp.is_some() || svc.annotations().contains_key(ANNOTATION_REMOVING) {
        ctx.reports.forget(&ns, &rs_name);
        return Ok(Action::await_change());
    }
    let Some(zones): Option<Vec<String>> =
        svc.annotations().get(ANNOTATION_ZONES).map(|z| z.split(',').map(str::to_owned).collect())
    else {
        return Ok(Action::await_change());
    };

    // What the replica set is made as: its pool's shape, or its dedicated instance's.
    let pool_name = svc.labels().get(LABEL_POOL).cloned().unwrap_or_else(|| "default".into());
    let (pool, pool_owner) = pool_of(ctx, &ns, &pool_name).await?;
    if let Some(o) = svc.owner_references().iter().find(|o| o.kind == "ResourcePool")
        && pool_owner.as_ref().is_none_or(|p| p.uid != o.uid)
    {
        // Its pool was deleted (Kubernetes is collecting its Pods and this Service), or the
        // Service names a pool it was not made by. Never start members for it; volumes stay.
        return Ok(Action::await_change());
    }
    let owner_instance = svc
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "DatabaseInstance")
        .map(|o| (o.name.clone(), o.uid.clone()));
    let dedicated = match owner_instance {
        Some((name, uid)) => match Objects::<DatabaseInstance>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await?
            .filter(|dbi| dbi.metadata.uid.as_deref() == Some(uid.as_str()))
        {
            // Being deleted: its finalizer deletes the replica set's volumes one by one, and
            // a pass in between would replace the member whose volume just went (a PVC
            // nobody deletes). Nothing is stepped any more.
            Some(dbi) if dbi.metadata.deletion_timestamp.is_some() => return Ok(Action::await_change()),
            Some(dbi) => Some(dbi),
            // Deleted (its replica set goes with it, by owner references), or not the
            // instance the Service claims to be owned by.
            None => return Ok(Action::await_change()),
        },
        None => None,
    };
    let rs = replica_set_shape(&rs_name, &ns, &pool_name, &pool, pool_owner, dedicated.as_ref());

    // Node health comes from the shared watch: until its first list is in, every node
    // would look gone (and every member unhealthy), so the pass waits for it.
    if tokio::time::timeout(NODES_WAIT, ctx.nodes.wait_until_ready()).await.map_or(true, |r| r.is_err()) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    // Observe; bootstrapped is the record in etcd (it outlives the Service), or the
    // Service's annotation (replica sets bootstrapped before the record).
    let record = ctx.store.replica_set(&ns, &rs_name).await?;
    let bootstrapped = record.is_some() || svc.annotations().contains_key(ANNOTATION_BOOTSTRAPPED);
    let datanodes = ctx.datanodes.in_namespace(&ns);
    let mut members = PodProvisioner::new(ctx, &rs, zones.clone(), bootstrapped);
    let observed = driver::observe(&mut members, datanodes.as_ref(), bootstrapped).await?;
    let previous = ctx.reports.get(&ns, &rs_name);
    let roles = observed.statuses.iter().map(|s| (s.id, format!("{:?}", s.role).to_lowercase())).collect();
    let mut report = Report {
        members: observed.members.clone(),
        roles,
        leader: observed.leader(),
        route: Vec::new(),
        step: Step::Wait("volumes lost".into()),
        error: None,
        volumes_lost: false,
    };
    let published = ctx.reports.published(&ns, &rs_name).unwrap_or_default();
    if bootstrapped && observed.volumes_lost() {
        // Every member answers, and none remembers the replica set: its volumes are gone.
        // Initialising it again would serve an empty database in place of the lost one.
        report.volumes_lost = true;
        ctx.reports.put(&ns, &rs_name, report, published);
        return Ok(Action::requeue(jittered(REQUEUE_STEADY)));
    }
    let led = matches!(observed.view, RaftView::Led(_));
    if record.is_none() && led {
        let bootstrapped_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
        let record = ReplicaSetRecord { pool: pool_name.clone(), zones: zones.clone(), bootstrapped_ms };
        ctx.store.record_replica_set(&ns, &rs_name, &record).await?;
    }
    let services: Objects<Service> = Objects::namespaced(ctx.client.clone(), &ns);
    services.apply(&rs_name, &objects::replica_set_service(&rs, &zones, bootstrapped || led)).await?;
    let pdbs: Objects<PodDisruptionBudget> = Objects::namespaced(ctx.client.clone(), &ns);
    pdbs.apply(&rs_name, &objects::replica_set_pdb(&rs, zones.len())).await?;

    // A label is for people and selectors: failing to set it never holds up a repair.
    if let Some(leader) = observed.leader()
        && let Err(e) = members.label_roles(leader).await
    {
        warn!(replica_set = %rs_name, error = %e, "failed to label the member Pods with their roles");
    }

    // One step, told on the Service; a member newly declared lost is told first.
    let step = driver::next_step(&members, &Desired { zones }, &observed);
    let events = ObjectEvents { recorder: &ctx.recorder, object: svc.object_ref(&()) };
    tell_lost(&members, &observed.members, previous.as_ref(), &events).await;
    let step_result = driver::carry_out(&mut members, datanodes.as_ref(), &events, &observed, &step).await;
    if let Err(e) = &step_result {
        warn!(replica_set = %rs_name, step = ?step, error = %e, "replica-set step failed");
    }
    report.route = driver::route_members(&members, &observed);
    report.step = step.clone();
    report.error = step_result.as_ref().err().map(|e| e.to_string());

    // The routes of the databases on it follow its members; only when they changed, and
    // never a route a migration moved elsewhere (compare-and-swap, epoch kept).
    let mut published_now = published.clone();
    if led && report.route != published {
        let instances: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), &ns);
        for dbi in instances.list(&ListParams::default()).await? {
            if dbi.status.as_ref().and_then(|s| s.placement.as_ref()).is_some_and(|p| p.replica_set == rs_name) {
                // Only for the instance holding its database's claim: a replica set of the
                // same name in another namespace never writes this tenant's route.
                let claim = super::instance::claim_of(&dbi)?;
                ctx.store.update_route_members(&dbi.database(), &claim, &rs_name, report.route.clone()).await?;
            }
        }
        published_now = report.route.clone();
    }
    ctx.reports.put(&ns, &rs_name, report, published_now);
    step_result?;
    Ok(Action::requeue(jittered(if step == Step::Steady { REQUEUE_STEADY } else { REQUEUE_BUSY })))
}

/// A Warning Event for each member declared lost since the last pass: why, and whether
/// its zone has a node for its replacement (else the replacement waits for one).
async fn tell_lost(prov: &PodProvisioner<'_>, now: &[MemberView], before: Option<&Report>, events: &ObjectEvents<'_>) {
    let was_lost = |id: u64| before.is_some_and(|r| r.members.iter().any(|m| m.id == id && m.failed));
    for m in now.iter().filter(|m| m.failed && !was_lost(m.id)) {
        let why = prov.lost().get(&m.id).map(String::as_str).unwrap_or("it is down");
        let then = if prov.zone_down(&m.zone) {
            format!("zone {} has no Ready schedulable node: it is replaced once one is", m.zone)
        } else {
            format!("it is replaced in zone {} while a majority of the members is healthy", m.zone)
        };
        let note = format!(
            "member {} of {} is declared lost ({why}, past the failure period); {then}",
            m.id,
            prov.replica_set()
        );
        events.record(Severity::Warning, "MemberLost", "Replace", &note).await;
    }
}

/// `d` plus up to a fifth more, at random: requeues of many objects made at once (an
/// operator start) spread out instead of arriving together every period.
pub fn jittered(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() / 5.0)
}

/// Consecutive failures per reconciled object: requeue after 1 s × 2^n (at most 5 min),
/// with jitter; a conflict (another writer won a race) after 1 s.
#[derive(Default, Clone)]
pub struct Backoff(Arc<Mutex<HashMap<String, u32>>>);

/// The first retry after an error other than a conflict, and the longest.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Backoff {
    pub fn failed(&self, key: &str, conflict: bool) -> Action {
        if conflict {
            return Action::requeue(Duration::from_secs(1));
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_default();
        let delay = BACKOFF_FIRST.saturating_mul(1 << (*n).min(8)).min(BACKOFF_MAX);
        *n = n.saturating_add(1);
        Action::requeue(jittered(delay).min(BACKOFF_MAX))
    }

    pub fn succeeded(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}
