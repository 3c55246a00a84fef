//! The DatabaseRestore reconciler: gather (the source instance, the target's name) →
//! validate → wait for any other restore of the same instances → make the new instance
//! (mode `NewInstance`) → run the restore through a [`RestoreRunner`] → record its report.
//!
//! The restore itself is the runner's (`controlplane::backup`: planning from the backups,
//! the import into a replica set, the switch); this reconciler decides when one runs, keeps
//! two restores of one instance from running at once, and tells a person what happened
//! (phase, status, Events `RestoreStarted`, `RestoreSucceeded`, `RestoreFailed`).
//!
//! Runs are tasks of the leading operator, known to it only ([`Jobs`]): a restore found
//! `Restoring` with no run here (the operator restarted, or lost its lease) is started
//! again, which the runner does safely (a restore builds into a fresh import and switches
//! only at its end; a new attempt starts over) up to its switch: that step is recorded in
//! `status.commit` before it is sent ([`RecordCommit`]), and a restore found with one
//! only sends it again ([`RestoreRunner::resume`]). Started over, an in-place restore
//! would switch again, over what clients wrote since the first switch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::Error;
use super::api::Objects;
use super::backup::rfc3339;
use super::instance::set_condition;
use crate::controlplane::backup::RestoreTarget;
use crate::crd::v1alpha1::{
    DatabaseInstance, DatabaseRestore, DatabaseRestoreSpec, DatabaseRestoreStatus, Phase, RestoreCommit, RestoreMode,
    RestorePhase,
};

/// On an instance made by a restore (mode `NewInstance`): `<restore name>/<restore uid>`.
/// A restore retried finds its own instance by it, and never takes over another's.
pub const ANNOTATION_RESTORED_BY: &str = "nimbus.io/restored-by";
/// Starts of a restore whose runs failed with a passing failure, before it fails for good.
pub const MAX_ATTEMPTS: u32 = 3;
/// How often a running restore is looked at.
pub const POLL: Duration = Duration::from_secs(2);

/// Where a restore writes, resolved from the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreDestination {
    /// The source's collections are replaced by their restored state.
    InPlace,
    /// Restored in the source's database under new names: `renames` where given, else
    /// `<name><suffix>` (see [`RestoreJob::beside_name`]).
    Beside { suffix: Option<String>, renames: BTreeMap<String, String> },
    /// Into the database of a new instance, which exists (made by the reconciler with the
    /// source's spec) when the runner is called; its database is not served until the
    /// instance is placed and reconciled.
    NewInstance { instance: String, database: String },
}

/// One run of a restore, as the runner gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreJob {
    pub namespace: String,
    /// The DatabaseRestore's name and uid: the restore's identity across attempts (an
    /// import id can be made of the uid and the attempt).
    pub restore: String,
    pub restore_uid: String,
    /// 1 for the first run; a retry or an operator restart runs it again with the next.
    pub attempt: u32,
    pub source_instance: String,
    pub source_database: String,
    /// The source instance's uid (its backups' incarnation).
    pub source_uid: String,
    pub to: RestoreTarget,
    /// Only these collections; all when `None`.
    pub collections: Option<Vec<String>>,
    pub destination: RestoreDestination,
}

impl RestoreJob {
    /// Mode `Beside`: the name `collection` is restored under.
    pub fn beside_name(&self, collection: &str) -> Option<String> {
        match &self.destination {
            RestoreDestination::Beside { suffix, renames } => {
                renames.get(collection).cloned().or_else(|| suffix.as_ref().map(|s| format!("{collection}{s}")))
            }
            _ => None,
        }
    }
}

/// What a finished restore did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoreReport {
    /// The exact point restored to (ms since the Unix epoch): the last change replayed,
    /// or the full backup's end.
    pub restored_to_ms: u64,
    /// Documents in the restored data.
    pub documents: u64,
    /// Bytes restored.
    pub bytes: u64,
}

/// Why a run failed: a sentence for the status and Events, and whether running it again
/// may succeed (the store or a datanode failing for a while) or not (a time outside the
/// window, a damaged backup, an unknown collection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreFailure {
    pub message: String,
    pub retryable: bool,
}

/// Runs one restore to its end. Called once per attempt; an attempt may be a retry of one
/// that was cut off (an operator restart), so a run must start over safely until its
/// switch, which it records first.
#[async_trait]
pub trait RestoreRunner: Send + Sync {
    /// Runs an attempt: the step that makes the restore visible goes to `record` before it
    /// is sent, and is not sent when recording it failed.
    async fn run(&self, job: RestoreJob, record: Arc<dyn RecordCommit>) -> Result<RestoreReport, RestoreFailure>;
    /// Sends `commit` again, recorded by a run that was cut off (in `namespace`): `Ok` with
    /// what it records once it took effect (now, or when first sent).
    async fn resume(&self, namespace: &str, commit: &RestoreCommit) -> Result<RestoreReport, RestoreFailure>;
}

/// Where a run records its switch before sending it: the DatabaseRestore's
/// `status.commit`.
#[async_trait]
pub trait RecordCommit: Send + Sync {
    async fn record(&self, commit: &RestoreCommit) -> Result<(), String>;
}

/// [`RecordCommit`] into the status, remembered by this operator's [`Jobs`] too (its
/// cached copy of the restore may not show it yet when the run ends).
struct StatusCommit {
    api: Objects<DatabaseRestore>,
    name: String,
    recorded: Arc<Mutex<Option<RestoreCommit>>>,
}

#[async_trait]
impl RecordCommit for StatusCommit {
    async fn record(&self, commit: &RestoreCommit) -> Result<(), String> {
        // A merge patch of this field alone: the reconciler's own patches leave it out.
        let patch = json!({"status": {"commit": commit}});
        self.api.patch_status(&self.name, &patch).await.map_err(|e| e.to_string())?;
        *lock(&self.recorded) = Some(commit.clone());
        Ok(())
    }
}

/// What the restore reconciler needs.
pub struct RestoreContext {
    pub client: kube::Client,
    pub recorder: Recorder,
    /// `None` while this operator cannot restore: restores wait in `Pending`, saying so.
    pub runner: Option<Arc<dyn RestoreRunner>>,
    pub jobs: Jobs,
    pub poll: Duration,
}

type Outcome = Result<RestoreReport, RestoreFailure>;

/// The runs of this operator, by `namespace/name` of their DatabaseRestore.
#[derive(Clone, Default)]
pub struct Jobs(Arc<Mutex<BTreeMap<String, Job>>>);

struct Job {
    uid: String,
    /// `namespace/instance` of each instance the run reads or writes.
    instances: BTreeSet<String>,
    outcome: Arc<Mutex<Option<Outcome>>>,
    /// The run's switch once recorded.
    commit: Arc<Mutex<Option<RestoreCommit>>>,
}

/// A run's slots, claimed.
struct Claimed {
    outcome: Arc<Mutex<Option<Outcome>>>,
    commit: Arc<Mutex<Option<RestoreCommit>>>,
}

impl Job {
    fn finished(&self) -> bool {
        lock(&self.outcome).is_some()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic between two consistent states.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jobs {
    /// The run of `key` (of this uid): `None` when there is none, `Some(None)` while it
    /// runs.
    fn outcome(&self, key: &str, uid: &str) -> Option<Option<Outcome>> {
        let jobs = lock(&self.0);
        let job = jobs.get(key).filter(|j| j.uid == uid)?;
        Some(lock(&job.outcome).clone())
    }

    /// The switch `key`'s run recorded, if it did.
    fn commit(&self, key: &str) -> Option<RestoreCommit> {
        lock(&self.0).get(key).and_then(|j| lock(&j.commit).clone())
    }

    fn forget(&self, key: &str) {
        lock(&self.0).remove(key);
    }

    /// Claims `instances` for `key`'s run, or names the restore running on one of them.
    fn claim(
        &self,
        key: &str,
        uid: &str,
        instances: BTreeSet<String>,
        commit: Option<RestoreCommit>,
    ) -> Result<Claimed, (String, String)> {
        let mut jobs = lock(&self.0);
        for (other, job) in jobs.iter() {
            if other == key || job.finished() {
                continue;
            }
            if let Some(shared) = job.instances.intersection(&instances).next() {
                return Err((other.clone(), shared.clone()));
            }
        }
        let outcome = Arc::new(Mutex::new(None));
        let commit = Arc::new(Mutex::new(commit));
        let job = Job { uid: uid.to_owned(), instances, outcome: outcome.clone(), commit: commit.clone() };
        jobs.insert(key.to_owned(), job);
        Ok(Claimed { outcome, commit })
    }

    /// Restores running now (for tests and metrics).
    pub fn running(&self) -> usize {
        lock(&self.0).values().filter(|j| !j.finished()).count()
    }
}

/// A valid restore, ready to run.
struct Plan {
    job: RestoreJob,
    instances: BTreeSet<String>,
    /// Mode `NewInstance`: the instance to make, when it does not exist yet.
    create: Option<DatabaseInstance>,
    /// Mode `NewInstance`: why the restore cannot run yet (the new instance is not placed:
    /// until it holds its database's claim and has a replica set, the database's route may
    /// be nobody's, or another instance's).
    wait: Option<String>,
}

pub async fn reconcile(dbr: Arc<DatabaseRestore>, ctx: Arc<RestoreContext>) -> Result<Action, Error> {
    let ns = dbr.namespace().ok_or(Error::MissingNamespace)?;
    let key = format!("{ns}/{}", dbr.name_any());
    let uid = dbr.uid().unwrap_or_default();
    let status = dbr.status.clone().unwrap_or_default();
    if matches!(status.phase, Some(RestorePhase::Succeeded | RestorePhase::Failed)) {
        ctx.jobs.forget(&key);
        return Ok(Action::await_change());
    }
    // A run of this operator: still going, or finished and to be recorded.
    let mut retry_of = None;
    let mut recorded = status.commit.clone();
    match ctx.jobs.outcome(&key, &uid) {
        Some(None) => return Ok(Action::requeue(ctx.poll)),
        Some(Some(Ok(report))) => {
            succeed(&ctx, &dbr, &report).await?;
            ctx.jobs.forget(&key);
            return Ok(Action::await_change());
        }
        // With a switch recorded, only that step is ever sent again (`resume`), so a
        // passing failure goes on being retried past the attempts' limit: a restore marked
        // failed after its switch may have been applied would invite a second restore.
        Some(Some(Err(f)))
            if f.retryable
                && (status.attempts < MAX_ATTEMPTS || ctx.jobs.commit(&key).or(recorded.clone()).is_some()) =>
        {
            recorded = ctx.jobs.commit(&key).or(recorded);
            ctx.jobs.forget(&key);
            retry_of = Some(f.message);
        }
        Some(Some(Err(f))) => {
            let message = format!("restore failed: {}", f.message);
            fail(&ctx, &dbr, &message).await?;
            ctx.jobs.forget(&key);
            return Ok(Action::await_change());
        }
        None => {}
    }
    if let Some(commit) = recorded {
        // Switched, or about to: only that step is sent again, whatever became of the
        // source or the spec's time since (both were checked before the import).
        return resume(&ctx, &dbr, &ns, commit, retry_of).await;
    }

    let plan = match validate(&ctx, &dbr, &ns).await? {
        Ok(plan) => plan,
        Err(message) => {
            fail(&ctx, &dbr, &message).await?;
            return Ok(Action::await_change());
        }
    };
    if let Some(instance) = &plan.create {
        // Made first, then waited for (`Plan::wait`): the restore runs once it is placed.
        let instances: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), &ns);
        instances.create(instance).await?;
        let note = format!("created instance {} for the restore; waiting until it is placed", instance.name_any());
        event(&ctx, &dbr, EventType::Normal, "InstanceCreated", "Restore", &note).await;
        pending(&ctx, &dbr, &note).await?;
        return Ok(Action::requeue(ctx.poll));
    }
    if let Some(message) = &plan.wait {
        pending(&ctx, &dbr, message).await?;
        return Ok(Action::requeue(ctx.poll));
    }
    let (runner, claimed) = match claim(&ctx, &dbr, &key, plan.instances.clone(), None).await? {
        Ok(claimed) => claimed,
        Err(action) => return Ok(action),
    };
    let message = started_message(&plan.job, &status, retry_of);
    if let Err(e) = start(&ctx, &dbr, &status, &message).await {
        ctx.jobs.forget(&key);
        return Err(e);
    }
    let job = RestoreJob { attempt: status.attempts + 1, ..plan.job };
    info!(restore = %key, attempt = job.attempt, source = %job.source_instance, "restore started");
    let record = Arc::new(StatusCommit {
        api: Objects::namespaced(ctx.client.clone(), &ns),
        name: dbr.name_any(),
        recorded: claimed.commit,
    });
    tokio::spawn(async move {
        let result = runner.run(job, record).await;
        *lock(&claimed.outcome) = Some(result);
    });
    Ok(Action::requeue(ctx.poll))
}

/// The runner and this restore's claim on `instances`; `Err` with what to do when there
/// is no runner or another restore holds one of them (said in the status).
async fn claim(
    ctx: &RestoreContext,
    dbr: &DatabaseRestore,
    key: &str,
    instances: BTreeSet<String>,
    commit: Option<RestoreCommit>,
) -> Result<Result<(Arc<dyn RestoreRunner>, Claimed), Action>, Error> {
    let Some(runner) = ctx.runner.clone() else {
        let message = "waiting: this operator cannot run restores yet (it has no restore runner; backups need \
                       --backup-url or --backup-dir); the restore starts once it can";
        pending(ctx, dbr, message).await?;
        return Ok(Err(Action::requeue(Duration::from_secs(60))));
    };
    match ctx.jobs.claim(key, &dbr.uid().unwrap_or_default(), instances, commit) {
        Ok(claimed) => Ok(Ok((runner, claimed))),
        Err((other, instance)) => {
            let other = other.rsplit('/').next().unwrap_or_default();
            let instance = instance.rsplit('/').next().unwrap_or_default();
            let message = format!(
                "waiting for restore {other} of instance {instance} to finish: one restore of an instance at a time"
            );
            pending(ctx, dbr, &message).await?;
            Ok(Err(Action::requeue(ctx.poll)))
        }
    }
}

/// Sends the recorded switch again (the run that recorded it was cut off, or failed
/// passingly after it) as a run of its own, under the same claim a run takes.
async fn resume(
    ctx: &RestoreContext,
    dbr: &DatabaseRestore,
    ns: &str,
    commit: RestoreCommit,
    retry_of: Option<String>,
) -> Result<Action, Error> {
    let key = format!("{ns}/{}", dbr.name_any());
    // The operator writes `status.commit` with an import id of this restore (`restore_runner`:
    // `restore-{uid}-{attempt}`); one it did not write is not sent anywhere. The datanode
    // applies a step only to the import of that id, so the id bounds what a status written
    // by someone else could reach.
    let ours = format!("restore-{}-", dbr.uid().unwrap_or_default());
    if !commit.import_id.starts_with(&ours) {
        let message = format!(
            "restore failed: status.commit names import {}, not one of this restore's ({ours}N): nothing sent",
            commit.import_id
        );
        fail(ctx, dbr, &message).await?;
        return Ok(Action::await_change());
    }
    let instances = instances_of(&dbr.spec, ns);
    let (runner, claimed) = match claim(ctx, dbr, &key, instances, Some(commit.clone())).await? {
        Ok(claimed) => claimed,
        Err(action) => return Ok(action),
    };
    let status = dbr.status.clone().unwrap_or_default();
    let mut message = format!(
        "sending the restore's recorded {:?} again (import {}) instead of restoring anew",
        commit.step, commit.import_id
    );
    match retry_of {
        Some(why) => message.push_str(&format!(", after: {why}")),
        None => message.push_str(": the operator restarted after recording it"),
    }
    if let Err(e) = start(ctx, dbr, &status, &message).await {
        ctx.jobs.forget(&key);
        return Err(e);
    }
    info!(restore = %key, import = %commit.import_id, "restore resumed at its recorded switch");
    let ns = ns.to_owned();
    tokio::spawn(async move {
        let result = runner.resume(&ns, &commit).await;
        *lock(&claimed.outcome) = Some(result);
    });
    Ok(Action::requeue(ctx.poll))
}

/// `namespace/instance` of each instance a restore of `spec` reads or writes.
fn instances_of(spec: &DatabaseRestoreSpec, ns: &str) -> BTreeSet<String> {
    let mut touched = BTreeSet::from([format!("{ns}/{}", spec.source)]);
    if spec.target.mode == RestoreMode::NewInstance
        && let Some(new) = &spec.target.instance
    {
        touched.insert(format!("{ns}/{new}"));
    }
    touched
}

/// Requeue after a failed call: a conflict soon, others after 10 s.
pub fn error_policy(dbr: Arc<DatabaseRestore>, err: &Error, _ctx: Arc<RestoreContext>) -> Action {
    warn!(restore = %dbr.name_any(), error = %err, "restore reconcile failed; requeueing");
    Action::requeue(if err.is_conflict() { Duration::from_millis(500) } else { Duration::from_secs(10) })
}

/// The checks a person can act on, each failing the restore with a sentence; `Err` only
/// when the Kubernetes API could not be read.
async fn validate(ctx: &RestoreContext, dbr: &DatabaseRestore, ns: &str) -> Result<Result<Plan, String>, Error> {
    let spec = &dbr.spec;
    let instances: Objects<DatabaseInstance> = Objects::namespaced(ctx.client.clone(), ns);
    let Some(source) = instances.get_opt(&spec.source).await? else {
        return Ok(Err(format!("source instance {} does not exist in namespace {ns}", spec.source)));
    };
    if source.metadata.deletion_timestamp.is_some() {
        return Ok(Err(format!("source instance {} is being deleted", spec.source)));
    }
    // Only an instance that holds its database (placed, under its claim) has backups of
    // its own: one whose database name is another instance's must not read that one's.
    let serves = source
        .status
        .as_ref()
        .is_some_and(|s| s.placement.is_some() && s.database.as_deref() == Some(source.database().as_str()));
    if !serves {
        return Ok(Err(format!(
            "source instance {} does not serve database {} (not placed, or the name is another instance's)",
            spec.source,
            source.database()
        )));
    }
    let to = match parse_time(&spec.to_time) {
        Ok(t) => t,
        Err(message) => return Ok(Err(message)),
    };
    let mut names = BTreeSet::new();
    for c in spec.collections.iter().flatten() {
        if let Err(e) = nimbus_api::limits::validate_name("collection", c) {
            return Ok(Err(format!("spec.collections: {}", e.message)));
        }
        if !names.insert(c.clone()) {
            return Ok(Err(format!("spec.collections names {c} twice")));
        }
    }
    let mut create = None;
    let mut wait = None;
    let target = &spec.target;
    let destination = match target.mode {
        RestoreMode::InPlace => RestoreDestination::InPlace,
        RestoreMode::Beside => {
            let mut renames = BTreeMap::new();
            for r in target.renames.iter().flatten() {
                if let Err(e) = nimbus_api::limits::validate_name("collection", &r.to) {
                    return Ok(Err(format!("spec.target.renames: {}", e.message)));
                }
                if r.from == r.to {
                    return Ok(Err(format!(
                        "spec.target.renames renames {} to itself: mode Beside restores under new names (InPlace replaces)",
                        r.from
                    )));
                }
                if !names.is_empty() && !names.contains(&r.from) {
                    return Ok(Err(format!(
                        "spec.target.renames names {}, which spec.collections does not restore",
                        r.from
                    )));
                }
                renames.insert(r.from.clone(), r.to.clone());
            }
            if target.suffix.is_none() && renames.is_empty() {
                return Ok(Err("mode Beside needs spec.target.suffix or spec.target.renames".into()));
            }
            // Names the suffix makes must be names too (a suffix makes them longer).
            for c in &names {
                if let Some(new) = spec.beside_name(c)
                    && let Err(e) = nimbus_api::limits::validate_name("collection", &new)
                {
                    return Ok(Err(format!("collection {c} restored beside: {}", e.message)));
                }
            }
            RestoreDestination::Beside { suffix: target.suffix.clone(), renames }
        }
        RestoreMode::NewInstance => {
            let Some(name) = target.instance.clone() else {
                return Ok(Err("mode NewInstance needs spec.target.instance".into()));
            };
            if name == spec.source {
                return Ok(Err(format!(
                    "spec.target.instance is the source {name}: name a new instance, or use mode InPlace"
                )));
            }
            let mine = format!("{}/{}", dbr.name_any(), dbr.uid().unwrap_or_default());
            match instances.get_opt(&name).await? {
                Some(existing) if existing.annotations().get(ANNOTATION_RESTORED_BY) != Some(&mine) => {
                    return Ok(Err(format!(
                        "instance {name} already exists: a restore into a new instance needs a name no instance has"
                    )));
                }
                // Made by this restore: run into it once it is placed under its own claim.
                Some(existing) => {
                    let status = existing.status.clone().unwrap_or_default();
                    if status.phase == Some(Phase::Failed) {
                        let why = status.conditions.iter().find(|c| c.status == "False").map(|c| c.message.clone());
                        return Ok(Err(format!(
                            "new instance {name} failed: {}",
                            why.unwrap_or_else(|| "see its conditions".into())
                        )));
                    }
                    if status.placement.is_none() || status.database.as_deref() != Some(existing.database().as_str()) {
                        wait = Some(format!("waiting until new instance {name} is placed"));
                    }
                }
                None => create = Some(new_instance(&source, &name, ns, &mine)),
            }
            RestoreDestination::NewInstance { database: name.clone(), instance: name }
        }
    };
    let job = RestoreJob {
        namespace: ns.to_owned(),
        restore: dbr.name_any(),
        restore_uid: dbr.uid().unwrap_or_default(),
        attempt: 0,
        source_instance: spec.source.clone(),
        source_database: source.database(),
        source_uid: source.uid().unwrap_or_default(),
        to,
        collections: spec.collections.clone(),
        destination,
    };
    Ok(Ok(Plan { job, instances: instances_of(spec, ns), create, wait }))
}

/// `latest`, or an RFC 3339 time not in the future.
fn parse_time(text: &str) -> Result<RestoreTarget, String> {
    if text == "latest" {
        return Ok(RestoreTarget::Latest);
    }
    let t: jiff::Timestamp = text.parse().map_err(|e| {
        format!("spec.toTime {text:?} is neither an RFC 3339 time (2026-03-01T12:30:00Z) nor \"latest\": {e}")
    })?;
    if t > jiff::Timestamp::now() {
        return Err(format!("spec.toTime {text} is in the future: a restore returns to a moment that has passed"));
    }
    let ms = u64::try_from(t.as_millisecond())
        .map_err(|_| format!("spec.toTime {text} is before 1970: no backup reaches it"))?;
    Ok(RestoreTarget::Time(ms))
}

/// The instance a `NewInstance` restore makes: the source's spec under its own name and
/// database (the instance's name), marked as this restore's.
fn new_instance(source: &DatabaseInstance, name: &str, ns: &str, restored_by: &str) -> DatabaseInstance {
    let mut spec = source.spec.clone();
    // The database is the tenant's identity: the new instance's is its own name.
    spec.database = None;
    // Zones are the source's replica set's; the new one may be placed elsewhere.
    spec.zones = None;
    DatabaseInstance {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            annotations: Some(BTreeMap::from([(ANNOTATION_RESTORED_BY.to_owned(), restored_by.to_owned())])),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// What the status says when `job` starts.
fn started_message(job: &RestoreJob, old: &DatabaseRestoreStatus, retry_of: Option<String>) -> String {
    let what = match &job.collections {
        Some(c) => format!("collections {} of instance {}", c.join(", "), job.source_instance),
        None => format!("instance {}", job.source_instance),
    };
    let to = match job.to {
        RestoreTarget::Latest => "the latest restorable moment".to_owned(),
        RestoreTarget::Time(ms) => rfc3339(ms),
    };
    let into = match &job.destination {
        RestoreDestination::InPlace => "in place".to_owned(),
        RestoreDestination::Beside { .. } => "beside the originals under new names".to_owned(),
        RestoreDestination::NewInstance { instance, .. } => format!("into new instance {instance}"),
    };
    let mut message = format!("restoring {what} to {to}, {into}");
    match (&retry_of, old.phase) {
        (Some(why), _) => message.push_str(&format!(" (again, after: {why})")),
        (None, Some(RestorePhase::Restoring)) => message.push_str(" (again: the operator restarted while it ran)"),
        _ => {}
    }
    message
}

/// Records a start (a run, or a recorded switch sent again).
async fn start(
    ctx: &RestoreContext,
    dbr: &DatabaseRestore,
    old: &DatabaseRestoreStatus,
    message: &str,
) -> Result<(), Error> {
    let mut status = old.clone();
    status.phase = Some(RestorePhase::Restoring);
    status.attempts = old.attempts + 1;
    status.started_at = Some(old.started_at.clone().unwrap_or_else(now));
    status.message = Some(message.to_owned());
    let generation = dbr.metadata.generation;
    set_condition(&mut status.conditions, "Progressing", "True", "Restoring", message, generation);
    set_condition(&mut status.conditions, "Succeeded", "Unknown", "Restoring", message, generation);
    patch_status(ctx, dbr, &status).await?;
    event(ctx, dbr, EventType::Normal, "RestoreStarted", "Restore", message).await;
    Ok(())
}

async fn succeed(ctx: &RestoreContext, dbr: &DatabaseRestore, report: &RestoreReport) -> Result<(), Error> {
    let mut status = dbr.status.clone().unwrap_or_default();
    let to = rfc3339(report.restored_to_ms);
    let message = format!("restored {} documents ({} bytes) to {to}", report.documents, report.bytes);
    status.phase = Some(RestorePhase::Succeeded);
    status.restored_to = Some(to);
    status.documents = Some(report.documents);
    status.bytes = Some(report.bytes);
    status.finished_at = Some(now());
    status.message = Some(message.clone());
    let generation = dbr.metadata.generation;
    set_condition(&mut status.conditions, "Progressing", "False", "Done", &message, generation);
    set_condition(&mut status.conditions, "Succeeded", "True", "Restored", &message, generation);
    patch_status(ctx, dbr, &status).await?;
    info!(restore = %dbr.name_any(), %message, "restore succeeded");
    event(ctx, dbr, EventType::Normal, "RestoreSucceeded", "Restore", &message).await;
    Ok(())
}

async fn fail(ctx: &RestoreContext, dbr: &DatabaseRestore, message: &str) -> Result<(), Error> {
    let mut status = dbr.status.clone().unwrap_or_default();
    status.phase = Some(RestorePhase::Failed);
    status.finished_at = Some(now());
    status.message = Some(message.to_owned());
    let generation = dbr.metadata.generation;
    set_condition(&mut status.conditions, "Progressing", "False", "Done", message, generation);
    set_condition(&mut status.conditions, "Succeeded", "False", "Failed", message, generation);
    patch_status(ctx, dbr, &status).await?;
    warn!(restore = %dbr.name_any(), %message, "restore failed");
    event(ctx, dbr, EventType::Warning, "RestoreFailed", "Restore", message).await;
    Ok(())
}

async fn pending(ctx: &RestoreContext, dbr: &DatabaseRestore, message: &str) -> Result<(), Error> {
    let old = dbr.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.phase = Some(RestorePhase::Pending);
    status.message = Some(message.to_owned());
    let generation = dbr.metadata.generation;
    set_condition(&mut status.conditions, "Progressing", "True", "Waiting", message, generation);
    set_condition(&mut status.conditions, "Succeeded", "Unknown", "Waiting", message, generation);
    if status.phase == old.phase && status.message == old.message {
        return Ok(());
    }
    patch_status(ctx, dbr, &status).await
}

fn now() -> String {
    format!("{:.0}", jiff::Timestamp::now())
}

async fn patch_status(
    ctx: &RestoreContext,
    dbr: &DatabaseRestore,
    status: &DatabaseRestoreStatus,
) -> Result<(), Error> {
    let ns = dbr.namespace().ok_or(Error::MissingNamespace)?;
    let api: Objects<DatabaseRestore> = Objects::namespaced(ctx.client.clone(), &ns);
    // The schema bounds the message (2,048): a long failure (nested causes, a datanode's
    // answer) would make the API server refuse the whole patch, and the restore would stay
    // where it was.
    let mut status = status.clone();
    // Written by the run alone ([`StatusCommit`]): a copy read before it was would put an
    // older one back. Left out, a merge patch keeps it.
    status.commit = None;
    status.message = status.message.as_deref().map(|m| super::backup::truncate(m, 2048));
    for c in &mut status.conditions {
        c.message = super::backup::truncate(&c.message, 2048);
    }
    api.patch_status(&dbr.name_any(), &json!({"status": status})).await
}

async fn event(ctx: &RestoreContext, dbr: &DatabaseRestore, type_: EventType, reason: &str, action: &str, note: &str) {
    // An Event's note is at most 1 kB.
    let note = if note.len() > 1000 {
        let mut end = 997;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &note[..end])
    } else {
        note.to_owned()
    };
    let ev = KubeEvent { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &dbr.object_ref(&())).await {
        warn!(error = %e, reason, "failed to publish an event");
    }
}
