//! The operator's [`RestoreRunner`]: a `DatabaseRestore` carried out by the restore job
//! (`controlplane::backup::restore_job`) against the cluster's datanodes and the
//! operator's backup store, where the namespace's backup agent writes (`k8s::backup`: the
//! store's prefix, scope = the namespace).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_api::migration::{ImportRequest, ImportStep, PublishedCollection, restore_staging_db};

use super::backup::rfc3339;
use super::restore::{RecordCommit, RestoreDestination, RestoreFailure, RestoreJob, RestoreReport, RestoreRunner};
use crate::controlplane::backup::agent::BackupWorld;
use crate::controlplane::backup::restore::RestoreWorld;
use crate::controlplane::backup::restore_job::{self, Commit, CommitLog, RestoreMode};
use crate::controlplane::backup::{Incarnation, OpenedStorage, RestoreTarget};
use crate::controlplane::migration::LiveWorld;
use crate::crd::v1alpha1::{CollectionRename, CommitStep, RestoreCommit};

/// How long one attempt retries passing failures (a leader change, a new instance not yet
/// served) before it fails retryably and the reconciler's next attempt starts over.
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(300);

/// The runner over a world: the live one ([`LiveWorld`]) in the operator, a model in tests.
pub struct LiveRestoreRunner<W: ?Sized = LiveWorld> {
    pub world: Arc<W>,
    /// The store the backup agents write, and its prefix.
    pub storage: OpenedStorage,
}

#[async_trait]
impl<W: BackupWorld + RestoreWorld + ?Sized + 'static> RestoreRunner for LiveRestoreRunner<W> {
    async fn run(&self, job: RestoreJob, record: Arc<dyn RecordCommit>) -> Result<RestoreReport, RestoreFailure> {
        // The source's backups: its incarnation is its UID, as the agent writes them.
        let store = Incarnation::new(&job.source_uid)
            .and_then(|inc| self.storage.backup_store(&job.namespace, &job.source_database, &inc))
            .map_err(|e| RestoreFailure { message: e.to_string(), retryable: false })?;
        let run = restore_job::RestoreJob {
            source_db: job.source_database.clone(),
            namespace: job.namespace.clone(),
            to: job.to,
            collections: job.collections.as_ref().map(|c| c.iter().cloned().collect()),
            into_db: match &job.destination {
                RestoreDestination::NewInstance { database, .. } => database.clone(),
                _ => job.source_database.clone(),
            },
            mode: match &job.destination {
                RestoreDestination::Beside { suffix, renames } => {
                    RestoreMode::Beside { suffix: suffix.clone(), renames: renames.clone() }
                }
                RestoreDestination::InPlace => RestoreMode::Replace,
                // Its own new database: imported directly (no staging, no size bound).
                RestoreDestination::NewInstance { .. } => RestoreMode::IntoNew,
            },
            // One import id per attempt of this DatabaseRestore.
            id: format!("restore-{}-{}", job.restore_uid, job.attempt),
            deadline: ATTEMPT_DEADLINE,
        };
        let log = StatusLog { record, db: run.into_db.clone() };
        match restore_job::run(self.world.as_ref(), &store, &run, &log).await {
            Ok(r) => Ok(RestoreReport { restored_to_ms: r.restored_to_ms, documents: r.documents, bytes: r.bytes }),
            Err(e) => Err(RestoreFailure { message: e.to_string(), retryable: e.is_retryable() }),
        }
    }

    async fn resume(&self, namespace: &str, recorded: &RestoreCommit) -> Result<RestoreReport, RestoreFailure> {
        let refused = |message: String| RestoreFailure { message, retryable: false };
        let (commit, report) = from_status(recorded).map_err(refused)?;
        // What `resume` reads of a job: where, and how long to retry.
        let job = restore_job::RestoreJob {
            source_db: recorded.database.clone(),
            namespace: namespace.to_owned(),
            to: RestoreTarget::Time(report.restored_to_ms),
            collections: None,
            into_db: recorded.database.clone(),
            mode: RestoreMode::Replace,
            id: recorded.import_id.clone(),
            deadline: ATTEMPT_DEADLINE,
        };
        match restore_job::resume(self.world.as_ref(), &job, &commit).await {
            Ok(()) => Ok(report),
            Err(e) => Err(RestoreFailure { message: e.to_string(), retryable: e.is_retryable() }),
        }
    }
}

/// The job's [`CommitLog`] as the reconciler's [`RecordCommit`].
struct StatusLog {
    record: Arc<dyn RecordCommit>,
    /// The database restored into.
    db: String,
}

#[async_trait]
impl CommitLog for StatusLog {
    async fn record(&self, commit: &Commit) -> Result<(), String> {
        self.record.record(&to_status(&self.db, commit)?).await
    }
}

/// `commit` as `status.commit` (of a restore into `db`).
fn to_status(db: &str, commit: &Commit) -> Result<RestoreCommit, String> {
    let mut recorded = RestoreCommit {
        step: CommitStep::Finish,
        import_id: commit.request.migration.clone(),
        replica_set: commit.replica_set.clone(),
        database: db.to_owned(),
        route_epoch: 0,
        whole: false,
        replace: false,
        collections: Vec::new(),
        restored_to: rfc3339(commit.restored_to_ms),
        documents: commit.documents,
        bytes: commit.bytes,
    };
    match &commit.request.step {
        ImportStep::Finish { epoch } => recorded.route_epoch = *epoch,
        ImportStep::Publish { into, whole, collections, replace, route_epoch } => {
            if into != db {
                return Err(format!("a restore into database {db} publishes into {into}"));
            }
            recorded.step = CommitStep::Publish;
            // A restore's `Publish` always carries the epoch it was made for.
            recorded.route_epoch = route_epoch.ok_or_else(|| "a restore's Publish without a route epoch".to_owned())?;
            recorded.whole = *whole;
            recorded.replace = *replace;
            recorded.collections =
                collections.iter().map(|c| CollectionRename { from: c.from.clone(), to: c.to.clone() }).collect();
        }
        other => return Err(format!("a restore switches with Publish or Finish, not {}", other.kind())),
    }
    Ok(recorded)
}

/// The job's [`Commit`] and the report it records, from `status.commit`.
fn from_status(recorded: &RestoreCommit) -> Result<(Commit, RestoreReport), String> {
    let restored_to_ms = recorded
        .restored_to
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|t| u64::try_from(t.as_millisecond()).ok())
        .ok_or_else(|| format!("status.commit.restoredTo {:?} is not an RFC 3339 time", recorded.restored_to))?;
    let db = recorded.database.clone();
    let (db, step) = match recorded.step {
        CommitStep::Finish => (db, ImportStep::Finish { epoch: recorded.route_epoch }),
        CommitStep::Publish => (
            restore_staging_db(&db),
            ImportStep::Publish {
                into: db,
                whole: recorded.whole,
                collections: recorded
                    .collections
                    .iter()
                    .map(|c| PublishedCollection { from: c.from.clone(), to: c.to.clone() })
                    .collect(),
                replace: recorded.replace,
                route_epoch: Some(recorded.route_epoch),
            },
        ),
    };
    let commit = Commit {
        replica_set: recorded.replica_set.clone(),
        request: ImportRequest { db, migration: recorded.import_id.clone(), step },
        restored_to_ms,
        documents: recorded.documents,
        bytes: recorded.bytes,
    };
    let report = RestoreReport { restored_to_ms, documents: recorded.documents, bytes: recorded.bytes };
    Ok((commit, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_publish_reads_back_as_the_same_request() {
        let commit = Commit {
            replica_set: "default-rs0".into(),
            request: ImportRequest {
                db: restore_staging_db("shop"),
                migration: "restore-uid-1".into(),
                step: ImportStep::Publish {
                    into: "shop".into(),
                    whole: false,
                    collections: vec![PublishedCollection { from: "a".into(), to: "a_old".into() }],
                    replace: false,
                    route_epoch: Some(4),
                },
            },
            restored_to_ms: 1_767_225_600_123,
            documents: 5,
            bytes: 77,
        };
        let recorded = to_status("shop", &commit).unwrap();
        assert_eq!(recorded.restored_to, "2026-01-01T00:00:00.123Z");
        let (back, report) = from_status(&recorded).unwrap();
        assert_eq!(serde_json::to_value(&back.request).unwrap(), serde_json::to_value(&commit.request).unwrap());
        assert_eq!((back.replica_set.as_str(), back.restored_to_ms), ("default-rs0", commit.restored_to_ms));
        assert_eq!(report, RestoreReport { restored_to_ms: 1_767_225_600_123, documents: 5, bytes: 77 });

        let finish = Commit {
            request: ImportRequest { db: "copy".into(), migration: "m".into(), step: ImportStep::Finish { epoch: 2 } },
            ..commit
        };
        let recorded = to_status("copy", &finish).unwrap();
        assert_eq!((recorded.step, recorded.route_epoch), (CommitStep::Finish, 2));
        let (back, _) = from_status(&recorded).unwrap();
        assert_eq!(serde_json::to_value(&back.request).unwrap(), serde_json::to_value(&finish.request).unwrap());
    }
}
