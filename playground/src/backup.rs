//! Backups in the playground (`API.md` section 3): the operator's backup agent
//! (`controlplane::backup::agent`) runs in the control plane, its object store the local
//! filesystem under `{dir}/backups` (`playground/{db}/{incarnation}/...`, the incarnation a
//! random id the instance got at its first apply). Every instance whose spec has `backup.enabled` (the
//! default) is backed up; `nimbus playground backup NAME` takes a full now, and each
//! instance in `playground.json` shows its `backup` (last full, recoverable window).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use axum::http::StatusCode;
use nimbus_operator::controlplane::backup::agent::{BackupAgent, BackupStatus, BackupTarget};
use nimbus_operator::controlplane::backup::{Incarnation, RetentionPolicy};
use serde::{Deserialize, Serialize};

use crate::requests::{Changes, Refusal};
use crate::state::State;

/// The object store's directory under the playground's.
pub const BACKUPS_DIR: &str = "backups";
/// The scope of every backup path: one playground per directory.
pub const SCOPE: &str = "playground";

/// `POST /v1/backup` `{"instance": NAME}` → `{"changes": ["backup: ID at RFC3339"]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRequest {
    pub instance: String,
}

/// An instance's backups as `playground.json` shows them; times in RFC 3339, null when
/// there is none yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaygroundBackup {
    pub last_full: Option<String>,
    pub earliest_restorable: Option<String>,
    pub latest_restorable: Option<String>,
    /// The newest full's replica consistency check found members differing (absent when
    /// they agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_mismatch: Option<String>,
    /// The end of the newest full a scratch restore verified, and the last verification's
    /// failure (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_error: Option<String>,
}

impl PlaygroundBackup {
    pub fn of(status: &BackupStatus) -> PlaygroundBackup {
        PlaygroundBackup {
            last_full: status.last_full_ms.map(rfc3339),
            earliest_restorable: status.earliest_restorable_ms.map(rfc3339),
            latest_restorable: status.latest_restorable_ms.map(rfc3339),
            replica_mismatch: status.replica_mismatch.clone(),
            last_verified: status.last_verified_ms.map(rfc3339),
            verify_error: status.verify_error.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|| format!("{ms} ms since the Unix epoch"))
}

/// Instance name → its database, `None` when its backups are off: what the `backup`
/// handler looks names up in, refreshed by the control loop.
pub type Names = Arc<RwLock<BTreeMap<String, Option<String>>>>;

/// The object store of `dir`'s backups (made on first use).
pub fn object_store(dir: &Path) -> anyhow::Result<Arc<dyn object_store::ObjectStore>> {
    let root = dir.join(BACKUPS_DIR);
    std::fs::create_dir_all(&root)?;
    Ok(Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root)?))
}

/// The databases to back up (instances with `spec.backup.enabled`; an instance applied
/// before specs were kept counts as enabled, the CRD's default) and the names the handler
/// knows.
pub fn refresh(agent: &BackupAgent, names: &Names, st: &State) {
    let mut targets = Vec::new();
    let mut known = BTreeMap::new();
    for (name, inst) in &st.instances {
        let spec = inst.spec.as_ref().map(|s| s.backup.clone()).unwrap_or_default();
        let db = spec.enabled.then(|| inst.database.clone());
        let incarnation = match Incarnation::new(&inst.incarnation) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "instance not backed up");
                known.insert(name.clone(), None);
                continue;
            }
        };
        if spec.enabled {
            targets.push(BackupTarget {
                db: inst.database.clone(),
                incarnation,
                namespace: crate::migrate::NAMESPACE.into(),
                retention: RetentionPolicy {
                    window_ms: u64::from(spec.retention_days) * 24 * 3_600_000,
                    ..RetentionPolicy::default()
                },
            });
        }
        known.insert(name.clone(), db);
    }
    if let Err(e) = agent.set_targets(targets) {
        tracing::warn!(error = %e, "failed to set the databases to back up");
    }
    *names.write().unwrap_or_else(|p| p.into_inner()) = known;
}

/// The `backup` route, to be put behind the cluster-secret check. Served outside the
/// control loop: a full takes as long as the database is large, and the loop keeps the
/// replica sets going meanwhile.
pub fn routes(agent: Arc<BackupAgent>, names: Names) -> axum::Router {
    axum::Router::new().route(
        "/v1/backup",
        axum::routing::post(move |axum::Json(req): axum::Json<BackupRequest>| {
            let (agent, names) = (agent.clone(), names.clone());
            async move { backup_now(&agent, &names, &req.instance).await }
        }),
    )
}

async fn backup_now(agent: &BackupAgent, names: &Names, instance: &str) -> Result<axum::Json<Changes>, Refusal> {
    let db = names.read().unwrap_or_else(|p| p.into_inner()).get(instance).cloned();
    let db = match db {
        None => {
            return Err(Refusal::new(StatusCode::NOT_FOUND, format!("no instance {instance:?}: nothing backed up")));
        }
        Some(None) => {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                format!("instance {instance} has backups off (spec.backup.enabled: false): nothing backed up"),
            ));
        }
        Some(Some(db)) => db,
    };
    let full = agent.backup_now(&db).await.map_err(|e| {
        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, format!("failed to back up instance {instance}: {e}"))
    })?;
    tracing::info!(instance, full = %full.id, "full backup taken on request");
    Ok(axum::Json(Changes { changes: vec![format!("backup: {} at {}", full.id, rfc3339(full.end_ms))] }))
}
