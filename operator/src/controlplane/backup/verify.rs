//! Verification of a full backup (`docs/design/0004-backup.md`, "Verification"): the
//! background job restores the latest full to scratch space and compares checksums, so a
//! backup that would not restore is found before anyone needs it.
//!
//! [`verify_full`] restores the full to exactly its consistent point, its `end`
//! ([`plan_to_full_end`]: the pages, then the archived changes after its start up to and
//! including `end`, none after), through the restore engine ([`restore::restore`]: every
//! page and segment read verified against its SHA-256) into the database's scratch copy
//! `{db}~verify` ([`verify_scratch_db`]) on a replica set, never finished. The engine
//! compares the copy's order-independent checksum with the manifest's (a whole-database
//! restore to exactly `end`). Then the scratch copy is dropped (`Abort`), whatever
//! happened: it never serves. A copy whose `Abort` did not get through (most often: the
//! leader changed while the verification ran, and the `Abort` went to the former one) is
//! dropped by [`drop_scratch`], which sends the `Abort` again to the replica set's leader
//! of the moment until a deadline; the agent keeps one still left and tries again at its
//! next passes. An instance's deletion and a migration's clean-up drop it too.
//!
//! The caller (the backup agent's loop) picks the full (the newest complete one), the
//! replica set (any with room: the scratch copy costs a full restore's space while it
//! runs) and a fresh import id per attempt, and reports the answer in status and metrics.

use std::future::Future;
use std::time::{Duration, Instant};

use nimbus_api::migration::{ImportRequest, ImportStep, OplogPosition, verify_scratch_db};

use super::format::FullManifest;
use super::layout::{FullId, SegmentName};
use super::plan::{RestoreError, plan_to_full_end};
use super::restore::{RestoreCause, RestoreFailure, RestoreInto, RestoreWorld, restore};
use super::{BackupError, BackupStore};
use crate::controlplane::migration::{Failure, ReplicaSetAccess};

/// A verification that restored the full and compared (or could not compare) checksums.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The full verified.
    pub full: FullId,
    /// Its consistent point, the state restored: its `end` and the time there (`end_ms`).
    pub end: OplogPosition,
    pub end_ms: u64,
    /// Documents in the restored copy (the target's count at its checksum marker).
    pub documents: u64,
    /// The restored copy's checksum (hex).
    pub checksum: String,
    /// Archived changes replayed on the pages (from the full's start to its end).
    pub changes_applied: u64,
    /// JSON bytes of documents and changes sent to the scratch copy.
    pub bytes: u64,
    pub verdict: Verdict,
    /// Whether the scratch copy's `Abort` was acknowledged (`false`: it stays invisible
    /// until [`drop_scratch`] gets it through).
    pub scratch_dropped: bool,
}

impl Verified {
    /// Whether the restored copy's checksum equals the manifest's.
    pub fn matched(&self) -> bool {
        self.verdict == Verdict::Matched
    }
}

/// What the comparison found (a difference is a [`VerifyCause::ChecksumMismatch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The restored copy's checksum equals the manifest's.
    Matched,
    /// The full restored (every object read and verified) but there was nothing to compare
    /// with: why (a manifest without a checksum).
    Unverifiable { reason: String },
}

/// A verification that failed: the backup would not restore, or restored to something else
/// than its manifest says, or the scratch replica set failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to verify full {full} of database {db} (restored into {scratch}): {cause}{}",
    if *.scratch_dropped { "" } else { " (the scratch copy could not be dropped yet: it stays invisible, and its drop is sent again to the replica set's leader)" })]
pub struct VerifyError {
    pub db: String,
    pub full: FullId,
    /// The scratch database restored into (`{db}~verify`).
    pub scratch: String,
    pub cause: VerifyCause,
    /// Whether nothing of the scratch copy is left (dropped, or never begun).
    pub scratch_dropped: bool,
}

/// Why a verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyCause {
    /// The archive does not reach the full's end (a lost or missing segment): the full
    /// cannot be made consistent, so it restores to no time at all.
    #[error(transparent)]
    Plan(#[from] RestoreError),
    /// A page or segment damaged, missing or unreadable (the message names the object).
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The backup restored, but not to what its manifest recorded.
    #[error("the restored copy's checksum {actual} differs from the manifest's {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    /// The scratch replica set failed or refused a step.
    #[error("the scratch replica set {replica_set} failed the import's {step} step: {failure}")]
    Target { replica_set: String, step: &'static str, failure: Failure },
    #[error("invalid verification request: {0}")]
    Invalid(String),
    /// The database was replaced by an import while the full was written: its changes
    /// cannot make the full consistent (`RestoreCause::Imported`).
    #[error("{0}")]
    Replaced(String),
}

impl VerifyError {
    /// Whether the backup itself is at fault (damaged, missing, inconsistent with its
    /// manifest, or its archive broken): what a person must be told. The others (the store
    /// or the scratch replica set failing, a bad request) say nothing about the backup.
    pub fn backup_is_bad(&self) -> bool {
        match &self.cause {
            VerifyCause::Plan(_) | VerifyCause::ChecksumMismatch { .. } | VerifyCause::Replaced(_) => true,
            VerifyCause::Backup(e) => !e.is_retryable(),
            VerifyCause::Target { .. } | VerifyCause::Invalid(_) => false,
        }
    }

    /// Whether the same verification tried again may succeed: the object store's or the
    /// scratch replica set's passing failures.
    pub fn is_retryable(&self) -> bool {
        match &self.cause {
            VerifyCause::Backup(e) => e.is_retryable(),
            VerifyCause::Target { failure: Failure::Transient(_), .. } => true,
            _ => false,
        }
    }
}

/// The pace of a verification's scratch restore (bytes of documents and changes sent per
/// second): 8 MiB/s, a 1 GiB database verified in about two minutes. Unpaced, the scratch
/// restore took the whole of a two-core machine's three members and multiplied the
/// tenant's p99 by more than ten (`bench/backup-restore`).
pub const VERIFY_BYTES_PER_SEC: u64 = 8 << 20;

/// Verifies `full` (a complete full of `store`'s database): restores it with `segments`
/// (the store's listing of the database's segments; only those of the full's lineage up to
/// its end are read) to exactly its end into `{db}~verify` on `rs` under import id
/// `import_id` (fresh per attempt), compares the copy's checksum with the manifest's, and
/// drops the copy. See the module's documentation.
pub async fn verify_full<W: RestoreWorld + ?Sized>(
    world: &W,
    store: &BackupStore,
    full: &FullManifest,
    segments: &[SegmentName],
    rs: ReplicaSetAccess,
    import_id: &str,
) -> Result<Verified, VerifyError> {
    let db = store.location().db().to_owned();
    let scratch = verify_scratch_db(&db);
    let fail = |cause: VerifyCause, scratch_dropped: bool| VerifyError {
        db: db.clone(),
        full: full.id.clone(),
        scratch: scratch.clone(),
        cause,
        scratch_dropped,
    };
    // Refused before anything is sent: nothing to drop.
    if full.db != db {
        return Err(fail(
            VerifyCause::Invalid(format!("full {} is of database {}, the store's is {db}", full.id, full.db)),
            true,
        ));
    }
    let plan = plan_to_full_end(full, segments).map_err(|e| fail(e.into(), true))?;
    let mut into = RestoreInto::new(rs, &scratch, import_id, None);
    // A background job on the replica set that serves the database: one step at a time,
    // paced, so its tenants barely notice (a full's reads are paced alike).
    into.docs_in_flight = 1;
    into.pace_bytes_per_sec = VERIFY_BYTES_PER_SEC;
    tracing::info!(db = %db, full = %full.id, replica_set = %into.replica_set.name, segments = plan.segments.len(),
        "verification started");
    let restored = restore(world, store, &plan, &into).await;
    // The scratch copy goes whatever happened; a failed restore has sent its own `Abort`
    // and says whether it was acknowledged (or nothing was begun).
    let scratch_dropped = match &restored {
        Err(f) if f.import_dropped => true,
        _ => abort(world, &into).await,
    };
    let outcome = match restored {
        Ok(outcome) => outcome,
        Err(RestoreFailure { cause, .. }) => {
            let cause = match cause {
                RestoreCause::Backup(e) => VerifyCause::Backup(e),
                RestoreCause::ChecksumMismatch { expected, actual, .. } => {
                    VerifyCause::ChecksumMismatch { expected, actual }
                }
                RestoreCause::Target { replica_set, step, failure } => {
                    VerifyCause::Target { replica_set, step, failure }
                }
                RestoreCause::Invalid(m) => VerifyCause::Invalid(m),
                // A whole-database restore names no collection.
                e @ RestoreCause::MissingCollections(_) => VerifyCause::Invalid(e.to_string()),
                e @ RestoreCause::Imported { .. } => VerifyCause::Replaced(e.to_string()),
            };
            let e = fail(cause, scratch_dropped);
            tracing::warn!(db = %db, full = %full.id, error = %e, backup_is_bad = e.backup_is_bad(),
                "verification failed");
            return Err(e);
        }
    };
    let verdict = match (&full.checksum, outcome.checksum_verified) {
        (Some(_), true) => Verdict::Matched,
        (None, _) => Verdict::Unverifiable { reason: format!("the manifest of full {} has no checksum", full.id) },
        // The plan stops at the full's end, so the engine compared: a bug if not.
        (Some(_), false) => Verdict::Unverifiable {
            reason: format!(
                "the restore reached index {} seq {}, not the full's end: no comparison made",
                outcome.reached.index, outcome.reached.seq
            ),
        },
    };
    let verified = Verified {
        full: full.id.clone(),
        end: full.end,
        end_ms: full.end_ms,
        documents: outcome.documents,
        checksum: outcome.checksum.checksum,
        changes_applied: outcome.changes_applied,
        bytes: outcome.bytes,
        verdict,
        scratch_dropped,
    };
    tracing::info!(db = %db, full = %full.id, documents = verified.documents, matched = verified.matched(),
        scratch_dropped, "verification done");
    Ok(verified)
}

/// Drops the scratch copy; whether the target acknowledged it.
async fn abort<W: RestoreWorld + ?Sized>(world: &W, into: &RestoreInto) -> bool {
    let req = ImportRequest { db: into.db.clone(), migration: into.import_id.clone(), step: ImportStep::Abort };
    match world.import(&into.replica_set, &req).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(db = %into.db, replica_set = %into.replica_set.name, error = %e,
                "failed to drop a verification's scratch copy");
            false
        }
    }
}

/// A verification's scratch copy: where it is and the import that made it (its `Abort`
/// names the import, so it never drops a later verification's copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchCopy {
    pub namespace: String,
    pub replica_set: String,
    /// `{db}~verify`.
    pub db: String,
    pub import_id: String,
}

/// Drops a scratch copy whose `Abort` did not get through: sends it again, each time to the
/// leader `leader` finds then (a leader change is why the first is usually lost, and the
/// leader seen when the verification started is then the wrong one to ask), until it is
/// acknowledged or `within` has passed since the first try, `pause` apart. `leader` answers
/// `None` when the replica set no longer exists: its copy went with it. Whether the copy is
/// gone.
pub async fn drop_scratch<W, L, F>(world: &W, copy: &ScratchCopy, leader: L, within: Duration, pause: Duration) -> bool
where
    W: RestoreWorld + ?Sized,
    L: Fn() -> F,
    F: Future<Output = Result<Option<ReplicaSetAccess>, Failure>>,
{
    let started = Instant::now();
    let req = ImportRequest { db: copy.db.clone(), migration: copy.import_id.clone(), step: ImportStep::Abort };
    loop {
        let failure = match leader().await {
            Ok(None) => return true,
            Ok(Some(rs)) => match world.import(&rs, &req).await {
                Ok(_) => {
                    tracing::info!(db = %copy.db, replica_set = %copy.replica_set, import = %copy.import_id,
                        "a verification's scratch copy dropped");
                    return true;
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        if started.elapsed() + pause > within {
            tracing::warn!(db = %copy.db, replica_set = %copy.replica_set, import = %copy.import_id, error = %failure,
                "failed to drop a verification's scratch copy; tried again later");
            return false;
        }
        tokio::time::sleep(pause).await;
    }
}
