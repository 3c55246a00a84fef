//! A restore from request to result (`docs/design/0004-backup.md`, "Restore in place"):
//! plan from the store, import into the target database's staging database on the replica
//! set serving it (`nimbus_api::migration::restore_staging_db`), then one `Publish` entry
//! switches the collections in. Clients see the collections as they were, then as
//! restored; never half restored, and nothing at all when the restore fails before
//! `Publish` (a staging database is invisible to clients and dropped by the next `Begin`).
//!
//! The playground's `restore` verb and the operator's `DatabaseRestore` both run
//! [`run`]. One restore per target database at a time is the caller's to ensure: a second
//! one's `Begin` would drop the first's staging database (which then fails, having changed
//! nothing).
//!
//! Retries: a passing failure (a leader change, a datanode restarting, the object store
//! briefly unreachable) restarts the attempt from `Begin` with the leader looked up again,
//! until [`RestoreJob::deadline`]; a failure of the step that makes the restore visible
//! (`Publish`, or `Finish` into a new database) is retried with the same import id first,
//! since one that took effect answers the same again.
//!
//! A run cut off after that step was sent (its process ended) must not start over: an
//! in-place restore would publish again, over what clients wrote since. So the step is
//! handed to the caller's [`CommitLog`] before it is sent, and a caller that finds one
//! recorded sends it again with [`resume`] (answered `Done` when it took effect) instead
//! of running the job.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nimbus_api::etcd::RouteState;
use nimbus_api::migration::{ImportRequest, ImportStep, PublishedCollection, restore_staging_db};

use super::agent::BackupWorld;
use super::layout::FullId;
use super::plan::{RestoreError, RestorePlan, RestoreTarget};
use super::restore::{RestoreFailure, RestoreInto, RestoreOutcome, RestoreWorld, restore};
use super::{BackupError, BackupStore};
use crate::controlplane::migration::{Failure, ReplicaSetAccess};

/// Where the restored collections go in the target database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreMode {
    /// In place: the whole database becomes the backup's at the time (its collections
    /// created since dropped), or, with collections named, each of them replaces its
    /// current self.
    Replace,
    /// Beside: each restored collection (all, or those named) is created under the name
    /// `renames` gives it, else `{name}{suffix}`; a name that exists is refused and nothing
    /// changes.
    Beside { suffix: Option<String>, renames: BTreeMap<String, String> },
    /// Into a database that holds nothing yet (a new instance's): imported into it directly
    /// (every client request refused until it is whole, then served at its route's epoch),
    /// with no staging database and no `Publish`, so with no size bound. Refused, changing
    /// nothing, when the database has collections.
    IntoNew,
}

/// One restore.
#[derive(Debug, Clone)]
pub struct RestoreJob {
    /// The database whose backups are restored (`store` is its location).
    pub source_db: String,
    /// The namespace of the replica sets (the secret of the admin calls; empty in the
    /// playground).
    pub namespace: String,
    pub to: RestoreTarget,
    /// Only these collections (names in the backup); `None`: the whole database.
    pub collections: Option<BTreeSet<String>>,
    /// The database restored into: `source_db` itself (in place) or another instance's.
    pub into_db: String,
    pub mode: RestoreMode,
    /// Unique per job: the import ids of its attempts are `{id}-{attempt}`.
    pub id: String,
    /// How long passing failures are retried (from the start).
    pub deadline: Duration,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// The time restored to (ms since the Unix epoch): every change at or before it is in,
    /// none after it.
    pub restored_to_ms: u64,
    pub full: FullId,
    /// The collections published (their names in the target).
    pub collections: Vec<String>,
    /// Documents of the restored collections.
    pub documents: u64,
    /// JSON bytes of documents and changes imported.
    pub bytes: u64,
    pub changes_applied: u64,
    pub checksum_verified: bool,
    pub attempts: u32,
}

/// The step that makes an attempt's restore visible, with what its report needs: `Publish`
/// of the staging database, or (mode [`RestoreMode::IntoNew`]) `Finish` of the import.
/// Sent again, it answers as the first time once it took effect (the datanode keeps the
/// last import's outcome), and, not sent yet, does what the first would have.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The replica set the import was made on: the step goes to its leader.
    pub replica_set: String,
    /// The step, the database it goes to and the attempt's import id.
    pub request: ImportRequest,
    /// What the restore restored (the report's fields of the same names).
    pub restored_to_ms: u64,
    pub documents: u64,
    pub bytes: u64,
}

/// Where a run records its [`Commit`] before sending it.
#[async_trait]
pub trait CommitLog: Send + Sync {
    /// Records `commit` durably; the step is sent only once this returned `Ok` (an error
    /// fails the attempt retryably, with nothing published).
    async fn record(&self, commit: &Commit) -> Result<(), String>;
}

/// No record: for a restore that nothing runs again once its process ended (the
/// playground's, whose client is told it failed).
pub struct Unrecorded;

#[async_trait]
impl CommitLog for Unrecorded {
    async fn record(&self, _commit: &Commit) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Refused before anything was done: the time is outside the window, there is no
    /// backup, the request is invalid.
    #[error(transparent)]
    Plan(#[from] RestoreError),
    #[error("invalid restore request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The import into the staging database failed (nothing was published).
    #[error(transparent)]
    Restore(Box<RestoreFailure>),
    /// The database cannot be restored into now (no route, a migration running, no leader).
    #[error("cannot restore into database {db} now: {why}")]
    Target { db: String, why: String },
    /// The switch (`Publish`, or `Finish` into a new database) did not get through.
    /// Refused: nothing was published (a step that took effect is answered `Done` when
    /// sent again, before anything else is checked). Left unanswered after it was sent
    /// (`maybe_applied`): it may have taken effect, and only sending it again to the
    /// replica set it was made for can tell ([`resume`]); never a new attempt, which would
    /// publish a second time over what clients wrote since.
    #[error("the restore into database {db} was not published: {failure}{}",
        if *.maybe_applied { " (its switch was sent and left unanswered: it may have been applied; send it again, do not restore again)" } else { "" })]
    Publish { db: String, failure: Failure, maybe_applied: bool },
    #[error("the restore into database {db} gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp { db: String, attempts: u32, elapsed: Duration, last: String },
    /// The [`CommitLog`] failed: nothing was published.
    #[error("failed to record the restore's {step} of database {db} before sending it (nothing was published): {why}")]
    Record { db: String, step: &'static str, why: String },
    /// A recorded step sent again ([`resume`]) was refused: it had not taken effect (unless
    /// another import into the same database ended since, which no restore of it does
    /// while this one is unfinished).
    #[error(
        "the restore's {step} (import {import_id}), recorded before the run that sent it was cut off, was refused when sent again: {failure}"
    )]
    Resumed { step: &'static str, import_id: String, failure: Failure },
}

impl JobError {
    /// Whether running the job again may succeed (passing failures only).
    pub fn is_retryable(&self) -> bool {
        match self {
            JobError::Restore(f) => f.is_retryable(),
            JobError::Backup(e) => e.is_retryable(),
            JobError::Target { .. } => true,
            JobError::Publish { failure: Failure::Transient(_), maybe_applied: false, .. } => true,
            // Its last failure was a passing one: a later run may get through.
            JobError::GaveUp { .. } => true,
            JobError::Record { .. } => true,
            JobError::Resumed { failure: Failure::Transient(_), .. } => true,
            _ => false,
        }
    }
}

/// The plan for a restore to `to` from what `store` holds now, and the time the archiver's
/// record covers beyond it (an idle database's newest time: `ArchiveRecord::idle_tip`):
/// refused (nothing done) when the time is outside the recoverable window or there is no
/// full backup.
pub async fn plan<W: BackupWorld + ?Sized>(
    world: &W,
    store: &BackupStore,
    to: RestoreTarget,
) -> Result<RestorePlan, JobError> {
    let fulls = store.list_fulls().await?.complete;
    let mut segments = store.list_segments().await?;
    let location = store.location();
    match world.archive_record(location.db(), location.incarnation()).await {
        Ok(Some((record, _))) => segments.extend(record.idle_tip()),
        Ok(None) => {}
        // Without the record the window ends at the newest segment stored: still a plan.
        Err(e) => {
            tracing::warn!(db = %location.db(), error = %e, "failed to read the archive record; planning from the store alone")
        }
    }
    // The moves' handoffs: a full's chain goes on across them.
    let handoffs = store.list_handoffs().await?;
    Ok(super::plan::plan_restore_across(&fulls, &segments, &handoffs, to)?)
}

/// Runs `job` from `store`: plans once, then imports and publishes, retrying passing
/// failures until the job's deadline. Each attempt's [`Commit`] goes to `log` before it
/// is sent.
pub async fn run<W: BackupWorld + RestoreWorld + ?Sized>(
    world: &W,
    store: &BackupStore,
    job: &RestoreJob,
    log: &dyn CommitLog,
) -> Result<RestoreReport, JobError> {
    check(job)?;
    let started = Instant::now();
    let plan = plan(world, store, job.to).await?;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let last = match attempt_once(world, store, job, &plan, attempt, log).await {
            Ok(outcome) => {
                return Ok(RestoreReport {
                    restored_to_ms: plan.to_ms,
                    full: outcome.0.full.clone(),
                    collections: outcome.1,
                    documents: outcome.0.documents,
                    bytes: outcome.0.bytes,
                    changes_applied: outcome.0.changes_applied,
                    checksum_verified: outcome.0.checksum_verified,
                    attempts: attempt,
                });
            }
            Err(e) if e.is_retryable() => e,
            Err(e) => return Err(e),
        };
        if started.elapsed() >= job.deadline {
            return Err(JobError::GaveUp {
                db: job.into_db.clone(),
                attempts: attempt,
                elapsed: started.elapsed(),
                last: last.to_string(),
            });
        }
        tracing::warn!(db = %job.into_db, attempt, error = %last, "restore attempt failed; retrying");
        tokio::time::sleep(backoff(attempt)).await;
    }
}

fn check(job: &RestoreJob) -> Result<(), JobError> {
    let invalid = |e: nimbus_api::ApiError| JobError::Invalid(e.message);
    nimbus_api::limits::validate_name("database", &job.into_db).map_err(invalid)?;
    if let Some(names) = &job.collections {
        if names.is_empty() {
            return Err(JobError::Invalid("name at least one collection, or none for the whole database".into()));
        }
        for c in names {
            nimbus_api::limits::validate_name("collection", c).map_err(invalid)?;
        }
    }
    if let RestoreMode::Beside { suffix, renames } = &job.mode {
        if suffix.as_deref().is_none_or(str::is_empty) && renames.is_empty() {
            return Err(JobError::Invalid(
                "a restore beside the collections needs a suffix or renames for their names".into(),
            ));
        }
        for to in renames.values() {
            nimbus_api::limits::validate_name("collection", to).map_err(invalid)?;
        }
        for c in job.collections.iter().flatten() {
            let to = beside_name(c, suffix.as_deref(), renames).ok_or_else(|| {
                JobError::Invalid(format!("collection {c} has no new name: give a suffix or rename it"))
            })?;
            nimbus_api::limits::validate_name("collection", &to).map_err(invalid)?;
        }
    }
    Ok(())
}

/// 0.2 s, doubling, at most 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5)).min(5_000))
}

/// The leader of the replica set serving `db`, refused while a migration holds or moves
/// it (a `Publish` on the source after the fence would be left behind by the move).
async fn target<W: BackupWorld + ?Sized>(
    world: &W,
    namespace: &str,
    db: &str,
) -> Result<(ReplicaSetAccess, u64), JobError> {
    let why = |why: String| JobError::Target { db: db.to_owned(), why };
    let route = world.route(db).await.map_err(|f| why(f.to_string()))?.ok_or_else(|| why("it has no route".into()))?;
    if route.state != RouteState::Serving {
        return Err(why(format!("its route is {:?} (a migration is switching it)", route.state)));
    }
    let rs = world
        .replica_set(namespace, &route.replica_set)
        .await
        .map_err(|f| why(f.to_string()))?
        .ok_or_else(|| why(format!("replica set {} does not exist", route.replica_set)))?;
    Ok((rs, route.epoch))
}

async fn attempt_once<W: BackupWorld + RestoreWorld + ?Sized>(
    world: &W,
    store: &BackupStore,
    job: &RestoreJob,
    plan: &RestorePlan,
    attempt: u32,
    log: &dyn CommitLog,
) -> Result<(RestoreOutcome, Vec<String>), JobError> {
    let (rs, epoch) = target(world, &job.namespace, &job.into_db).await?;
    let import_id = format!("{}-{attempt}", job.id);
    let imported_on = rs.name.clone();
    // Into a new database the import is the database itself, finished (served) at the
    // route's epoch; else a staging database, published into the target.
    let into_new = job.mode == RestoreMode::IntoNew;
    let import_db = if into_new { job.into_db.clone() } else { restore_staging_db(&job.into_db) };
    // Finished here rather than by the engine, so that `Finish` is recorded before it is
    // sent, as `Publish` is.
    let mut into = RestoreInto::new(rs, &import_db, &import_id, None);
    into.collections = job.collections.clone();
    let mut outcome = restore(world, store, plan, &into).await.map_err(|f| JobError::Restore(Box::new(f)))?;
    tracing::info!(db = %job.into_db, attempt, documents = outcome.documents, "restore imported into {import_db}; committing");
    pause_at_failpoint().await;
    let (step, published) = if into_new {
        (ImportStep::Finish { epoch }, outcome.collections.clone())
    } else {
        publish_step(job, &outcome, epoch)
    };
    let commit = Commit {
        replica_set: imported_on,
        request: ImportRequest { db: import_db, migration: import_id, step },
        restored_to_ms: plan.to_ms,
        documents: outcome.documents,
        bytes: outcome.bytes,
    };
    let step_name = commit.request.step.kind();
    log.record(&commit).await.map_err(|why| JobError::Record { db: job.into_db.clone(), step: step_name, why })?;
    send_commit(world, job, &commit, Some(epoch)).await?;
    outcome.finished = into_new;
    Ok((outcome, published))
}

/// Sends `commit` again, recorded by a run of `job` that was cut off before it learnt the
/// answer: `Ok` once it took effect (now, or when first sent). Only the datanode can
/// tell, so it goes to the recorded replica set whatever the route says now (a step not
/// yet applied is refused there after a migration's fence: it carries the route epoch it
/// was made for). Passing failures are retried until the job's deadline.
pub async fn resume<W: BackupWorld + RestoreWorld + ?Sized>(
    world: &W,
    job: &RestoreJob,
    commit: &Commit,
) -> Result<(), JobError> {
    let step = commit.request.step.kind();
    tracing::info!(db = %job.into_db, import = %commit.request.migration, step, "sending a recorded restore step again");
    send_commit(world, job, commit, None).await.map_err(|e| match e {
        JobError::Publish { failure, .. } => {
            JobError::Resumed { step, import_id: commit.request.migration.clone(), failure }
        }
        other => other,
    })
}

/// The failpoint `restore-before-publish`: `return(MS)` pauses the restore that long
/// between its import and its `Publish` (or `Finish`) (tests kill the leader there). Nothing without the
/// `failpoints` feature.
async fn pause_at_failpoint() {
    #[cfg(feature = "failpoints")]
    {
        let pause = (|| {
            fail::fail_point!("restore-before-publish", |ms| ms.and_then(|ms| ms.parse::<u64>().ok()));
            None
        })();
        if let Some(ms) = pause {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// A collection's name beside its original: its rename, else the name with the suffix.
fn beside_name(coll: &str, suffix: Option<&str>, renames: &BTreeMap<String, String>) -> Option<String> {
    renames.get(coll).cloned().or_else(|| suffix.filter(|s| !s.is_empty()).map(|s| format!("{coll}{s}")))
}

/// The `Publish` of `outcome` for `job`, and the collections it publishes (target names).
/// Beside, a restored collection with no new name (the whole database restored with
/// renames only) is not published.
fn publish_step(job: &RestoreJob, outcome: &RestoreOutcome, route_epoch: u64) -> (ImportStep, Vec<String>) {
    let (whole, collections, replace) = match (&job.mode, &job.collections) {
        (RestoreMode::Replace | RestoreMode::IntoNew, None) => (true, Vec::new(), true),
        (RestoreMode::Replace | RestoreMode::IntoNew, Some(_)) => {
            let same = outcome.collections.iter().map(|c| PublishedCollection { from: c.clone(), to: c.clone() });
            (false, same.collect(), true)
        }
        (RestoreMode::Beside { suffix, renames }, _) => {
            let pairs = outcome.collections.iter().filter_map(|c| {
                Some(PublishedCollection { from: c.clone(), to: beside_name(c, suffix.as_deref(), renames)? })
            });
            (false, pairs.collect(), false)
        }
    };
    let published =
        if whole { outcome.collections.clone() } else { collections.iter().map(|p| p.to.clone()).collect() };
    let step =
        ImportStep::Publish { into: job.into_db.clone(), whole, collections, replace, route_epoch: Some(route_epoch) };
    (step, published)
}

/// Sends `commit`'s step, retrying passing failures with the same import id (one that
/// took effect answers alike) against the leader looked up again; a refusal drops the
/// import (`Abort`) and fails the job.
///
/// With `route_epoch` (a run), the step goes to the replica set serving the database, and
/// a route changed meanwhile (another replica set or epoch than the import's: a migration
/// moved the database or aborted; the datanode refuses a `Publish` with an older epoch
/// than its own, so one sent before the change is not applied after a fence) fails the
/// attempt retryably: the next one imports where the database is now. Without (a resumed
/// step), it goes to the recorded replica set.
async fn send_commit<W: BackupWorld + RestoreWorld + ?Sized>(
    world: &W,
    job: &RestoreJob,
    commit: &Commit,
    route_epoch: Option<u64>,
) -> Result<(), JobError> {
    let req = &commit.request;
    let imported_on = commit.replica_set.as_str();
    let started = Instant::now();
    let (mut tries, mut sent) = (0u32, false);
    loop {
        tries += 1;
        // The route is checked before the first send only: once sent, its answer may have
        // been lost after it took effect, so it goes again to the replica set it was made
        // for, whatever the route says now (there it is answered `Done` if it took effect,
        // and refused, untouched, if a migration fenced the database first).
        let leader = match route_epoch.filter(|_| !sent) {
            Some(imported_at) => match target(world, &job.namespace, &job.into_db).await {
                Ok((rs, epoch)) if rs.name != imported_on || epoch != imported_at => {
                    return Err(JobError::Target {
                        db: job.into_db.clone(),
                        why: format!(
                            "its route changed during the restore (replica set {imported_on} at epoch {imported_at}, now {} at epoch {epoch})",
                            rs.name
                        ),
                    });
                }
                Ok((rs, _)) => Ok(rs),
                Err(e) => Err(e.to_string()),
            },
            None => match world.replica_set(&job.namespace, imported_on).await {
                Ok(Some(rs)) => Ok(rs),
                Ok(None) => Err(format!("replica set {imported_on} of the restore's import does not exist")),
                Err(f) => Err(f.to_string()),
            },
        };
        let (failure, rs) = match leader {
            Ok(rs) => {
                sent = true;
                match RestoreWorld::import(world, &rs, req).await {
                    Ok(_) => return Ok(()),
                    Err(f) => (f, Some(rs)),
                }
            }
            Err(why) => (Failure::Transient(why), None),
        };
        let passing = matches!(failure, Failure::Transient(_));
        if !passing || started.elapsed() >= job.deadline {
            if !passing && let Some(rs) = rs {
                let abort =
                    ImportRequest { db: req.db.clone(), migration: req.migration.clone(), step: ImportStep::Abort };
                if let Err(e) = RestoreWorld::import(world, &rs, &abort).await {
                    tracing::warn!(db = %req.db, error = %e, "failed to drop a restore's import; the next restore drops it");
                }
            }
            // A refusal is an answer: nothing was applied. A passing failure after a send
            // leaves the outcome unknown.
            return Err(JobError::Publish { db: job.into_db.clone(), maybe_applied: sent && passing, failure });
        }
        tokio::time::sleep(backoff(tries)).await;
    }
}

#[cfg(test)]
mod tests {
    use nimbus_api::migration::OplogPosition;

    use super::*;
    use crate::controlplane::migration::ChecksumMarker;

    fn job(mode: RestoreMode, collections: Option<&[&str]>) -> RestoreJob {
        RestoreJob {
            source_db: "shop".into(),
            namespace: String::new(),
            to: RestoreTarget::Latest,
            collections: collections.map(|c| c.iter().map(|s| (*s).to_owned()).collect()),
            into_db: "shop".into(),
            mode,
            id: "r".into(),
            deadline: Duration::from_secs(1),
        }
    }

    fn outcome(collections: &[&str]) -> RestoreOutcome {
        RestoreOutcome {
            db: "shop~restore".into(),
            full: FullId::new(1, 2),
            collections: collections.iter().map(|s| (*s).to_owned()).collect(),
            documents: 0,
            documents_loaded: 0,
            changes_applied: 0,
            bytes: 0,
            reached: OplogPosition { index: 1, seq: 0 },
            reached_ms: 0,
            checksum: ChecksumMarker { index: 1, checksum: String::new(), documents: 0, catalog: None },
            checksum_verified: false,
            finished: false,
        }
    }

    fn pairs(step: &ImportStep) -> (bool, Vec<(String, String)>, bool) {
        let ImportStep::Publish { whole, collections, replace, .. } = step else { panic!("not a Publish: {step:?}") };
        (*whole, collections.iter().map(|p| (p.from.clone(), p.to.clone())).collect(), *replace)
    }

    #[test]
    fn the_whole_database_in_place_is_published_whole() {
        let (step, published) = publish_step(&job(RestoreMode::Replace, None), &outcome(&["a", "b"]), 3);
        assert_eq!(pairs(&step), (true, vec![], true));
        assert_eq!(published, ["a", "b"]);
    }

    #[test]
    fn named_collections_in_place_replace_only_themselves() {
        let (step, published) = publish_step(&job(RestoreMode::Replace, Some(&["a"])), &outcome(&["a"]), 3);
        assert_eq!(pairs(&step), (false, vec![("a".into(), "a".into())], true));
        assert_eq!(published, ["a"]);
    }

    #[test]
    fn beside_never_replaces() {
        let mode = RestoreMode::Beside { suffix: Some("_restored".into()), renames: BTreeMap::new() };
        let (step, published) = publish_step(&job(mode, None), &outcome(&["a", "b"]), 3);
        assert_eq!(
            pairs(&step),
            (false, vec![("a".into(), "a_restored".into()), ("b".into(), "b_restored".into())], false)
        );
        assert_eq!(published, ["a_restored", "b_restored"]);
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_done() {
        assert!(check(&job(RestoreMode::Replace, Some(&[]))).is_err());
        assert!(check(&job(RestoreMode::Replace, Some(&["a/b"]))).is_err());
        assert!(check(&job(RestoreMode::Beside { suffix: None, renames: BTreeMap::new() }, None)).is_err());
        let beside = |suffix: &str| RestoreMode::Beside { suffix: Some(suffix.into()), renames: BTreeMap::new() };
        assert!(check(&job(beside("~x"), Some(&["a"]))).is_err());
        let only_b = RestoreMode::Beside { suffix: None, renames: [("b".to_owned(), "b2".to_owned())].into() };
        assert!(check(&job(only_b.clone(), Some(&["a"]))).is_err(), "a has no new name");
        assert!(check(&job(only_b, Some(&["b"]))).is_ok());
        let mut j = job(RestoreMode::Replace, None);
        j.into_db = "shop~restore".into();
        assert!(check(&j).is_err(), "a staging database is no target");
        assert!(check(&job(RestoreMode::Replace, Some(&["a"]))).is_ok());
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) < backoff(2));
        assert_eq!(backoff(30), Duration::from_millis(5_000).min(backoff(30)));
        assert!(backoff(30) <= Duration::from_secs(5));
    }
}
