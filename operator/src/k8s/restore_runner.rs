//! The operator's [`RestoreRunner`]: a `DatabaseRestore` carried out by the restore job
//! (`controlplane::backup::restore_job`) against the cluster's datanodes and the
//! operator's backup store, where the namespace's backup agent writes (`k8s::backup`: the
//! store's prefix, scope = the namespace).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::restore::{RestoreDestination, RestoreFailure, RestoreJob, RestoreReport, RestoreRunner};
use crate::controlplane::backup::Incarnation;
use crate::controlplane::backup::OpenedStorage;
use crate::controlplane::backup::restore_job::{self, RestoreMode};
use crate::controlplane::migration::LiveWorld;

/// How long one attempt retries passing failures (a leader change, a new instance not yet
/// served) before it fails retryably and the reconciler's next attempt starts over.
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(300);

pub struct LiveRestoreRunner {
    pub world: Arc<LiveWorld>,
    /// The store the backup agents write, and its prefix.
    pub storage: OpenedStorage,
}

#[async_trait]
impl RestoreRunner for LiveRestoreRunner {
    async fn run(&self, job: RestoreJob) -> Result<RestoreReport, RestoreFailure> {
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
        match restore_job::run(self.world.as_ref(), &store, &run).await {
            Ok(r) => Ok(RestoreReport { restored_to_ms: r.restored_to_ms, documents: r.documents, bytes: r.bytes }),
            Err(e) => Err(RestoreFailure { message: e.to_string(), retryable: e.is_retryable() }),
        }
    }
}
