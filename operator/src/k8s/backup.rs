//! Backups on Kubernetes (`docs/backup.md`, "On Kubernetes"): the control plane's backup
//! agent (`controlplane::backup::agent`), run by the leading operator, one agent per
//! namespace with instances to back up (the namespace is the agent's `scope`: tenants
//! sharing a store stay apart), fed every DatabaseInstance with `spec.backup.enabled`; and
//! `status.backup` of each instance written from what its agent knows.
//!
//! Where the backups go is one object store for the whole operator, made from its flags by
//! [`object_store`] (the seam for other stores: S3 comes through there). Without one,
//! backups are off and each instance's `status.notYetActive` says so.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::ResourceExt;
use object_store::ObjectStore;
use serde_json::json;
use tracing::{debug, info, warn};

use super::api::Objects;
use crate::controlplane::backup::agent::{self, AgentTuning, BackupAgent, BackupTarget, BackupWorld};
use crate::controlplane::backup::{BackupLocation, Incarnation, RetentionPolicy};
use crate::crd::v1alpha1::{BackupStatus, DatabaseInstance};

/// `{prefix}` of every backup path: the store given holds Nimbus's backups only.
pub const BACKUP_PREFIX: &str = "";
/// How often the agents' targets and the instances' `status.backup` are brought up to date.
pub const STATUS_EVERY: Duration = Duration::from_secs(15);

/// Why the backup store could not be set up (the operator does not start: a person asked
/// for backups and would otherwise get none).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("failed to create the backup directory {dir}: {source}")]
    CreateDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open the backup directory {dir} as an object store: {source}")]
    Open {
        dir: String,
        #[source]
        source: object_store::Error,
    },
}

/// The object store of `--backup-dir`: the local filesystem under `dir` (a PersistentVolume
/// mounted into the operator's Pod). Made if missing.
pub fn object_store(dir: &Path) -> Result<Arc<dyn ObjectStore>, SetupError> {
    let shown = dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|source| SetupError::CreateDir { dir: shown.clone(), source })?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
        .map_err(|source| SetupError::Open { dir: shown, source })?;
    Ok(Arc::new(store))
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds), as the playground
/// shows them.
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|| format!("{ms} ms since the Unix epoch"))
}

/// An agent's view of a database as `status.backup`.
pub fn status_of(s: &agent::BackupStatus) -> BackupStatus {
    BackupStatus {
        last_full: s.last_full_ms.map(rfc3339),
        earliest_restorable: s.earliest_restorable_ms.map(rfc3339),
        latest_restorable: s.latest_restorable_ms.map(rfc3339),
        error: s.error.as_ref().map(|e| truncate(e, 1024)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// What to back up, by namespace: every instance with `spec.backup.enabled` that is not
/// being deleted, with its retention window. A database name that cannot be a backup path
/// is left out (with a warning) rather than refusing every other target with it.
pub fn targets_by_namespace<'a>(
    instances: impl IntoIterator<Item = &'a DatabaseInstance>,
) -> BTreeMap<String, Vec<BackupTarget>> {
    let mut out: BTreeMap<String, Vec<BackupTarget>> = BTreeMap::new();
    for dbi in instances {
        let Some(ns) = dbi.namespace() else { continue };
        if !dbi.spec.backup.enabled || dbi.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let db = dbi.database();
        // The instance's UID: a new instance that takes a deleted one's name (or database
        // name) never finds the deleted one's backups.
        let incarnation = match dbi.uid().ok_or_else(|| "no uid yet".to_owned()).and_then(|u| {
            let inc = Incarnation::new(&u).map_err(|e| e.to_string())?;
            BackupLocation::new(BACKUP_PREFIX, &ns, &db, &inc).map_err(|e| e.to_string())?;
            Ok(inc)
        }) {
            Ok(inc) => inc,
            Err(e) => {
                warn!(instance = %dbi.name_any(), namespace = %ns, error = %e, "not backed up");
                continue;
            }
        };
        let retention = RetentionPolicy {
            window_ms: u64::from(dbi.spec.backup.retention_days) * 24 * 3_600_000,
            ..RetentionPolicy::default()
        };
        out.entry(ns.clone()).or_default().push(BackupTarget { db, namespace: ns, retention, incarnation });
    }
    out
}

/// The backups of every namespace: off (no store), or one agent per namespace with targets.
pub struct Backups {
    running: Option<Running>,
}

struct Running {
    world: Arc<dyn BackupWorld>,
    objects: Arc<dyn ObjectStore>,
    tuning: AgentTuning,
    agents: Mutex<BTreeMap<String, NamespaceAgent>>,
}

/// A namespace's agent; its run stops when this is dropped (the sender goes).
struct NamespaceAgent {
    agent: Arc<BackupAgent>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Backups {
    /// No backups: the operator was given no store.
    pub fn off() -> Backups {
        Backups { running: None }
    }

    /// Backups into `objects`, through `world` (the operator's datanodes and etcd).
    pub fn new(world: Arc<dyn BackupWorld>, objects: Arc<dyn ObjectStore>, tuning: AgentTuning) -> Backups {
        Backups { running: Some(Running { world, objects, tuning, agents: Mutex::new(BTreeMap::new()) }) }
    }

    /// Whether this operator takes backups.
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    fn agents(r: &Running) -> MutexGuard<'_, BTreeMap<String, NamespaceAgent>> {
        // A poisoned lock only means a panic between two consistent states of the map.
        r.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the agents in line with the instances (all of them, each time): a namespace's
    /// agent starts with its first instance to back up and stops with its last (what was
    /// stored stays in the store).
    pub fn set_instances<'a>(&self, instances: impl IntoIterator<Item = &'a DatabaseInstance>) {
        let Some(r) = &self.running else { return };
        let mut targets = targets_by_namespace(instances);
        let mut agents = Self::agents(r);
        agents.retain(|ns, _| {
            let keep = targets.contains_key(ns);
            if !keep {
                info!(namespace = %ns, "no instance to back up: the namespace's backup agent stops");
            }
            keep
        });
        for (ns, wanted) in std::mem::take(&mut targets) {
            if !agents.contains_key(&ns) {
                match BackupAgent::new(r.world.clone(), r.objects.clone(), BACKUP_PREFIX, &ns, r.tuning.clone()) {
                    Ok(agent) => {
                        let agent = Arc::new(agent);
                        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                        tokio::spawn(agent.clone().run(async move {
                            let _ = stopped.await;
                        }));
                        info!(namespace = %ns, "backup agent started for the namespace");
                        agents.insert(ns.clone(), NamespaceAgent { agent, _stop: stop });
                    }
                    Err(e) => {
                        warn!(namespace = %ns, error = %e, "failed to start the namespace's backup agent");
                        continue;
                    }
                }
            }
            if let Some(a) = agents.get(&ns)
                && let Err(e) = a.agent.set_targets(wanted)
            {
                warn!(namespace = %ns, error = %e, "failed to set the databases to back up");
            }
        }
    }

    /// The instance's `status.backup` as its agent knows it; `None` when backups are off,
    /// off for the instance, or its agent has not taken it on yet.
    pub fn status(&self, dbi: &DatabaseInstance) -> Option<BackupStatus> {
        let r = self.running.as_ref()?;
        if !dbi.spec.backup.enabled {
            return None;
        }
        let ns = dbi.namespace()?;
        let agent = Self::agents(r).get(&ns)?.agent.clone();
        agent.statuses().get(&dbi.database()).map(status_of)
    }
}

/// What `status.backup` should become: `Some(Some(s))` to write `s`, `Some(None)` to
/// remove it (backups turned off for the instance), `None` to leave it.
pub fn status_change(backups: &Backups, dbi: &DatabaseInstance) -> Option<Option<BackupStatus>> {
    let current = dbi.status.as_ref().and_then(|s| s.backup.clone());
    let wanted = match backups.status(dbi) {
        Some(s) => Some(s),
        // Off for the instance: the old window means nothing any more.
        None if !dbi.spec.backup.enabled => None,
        // Not known yet (the agent just started): keep what is shown.
        None => return None,
    };
    (wanted != current).then_some(wanted)
}

/// Writes `status.backup` of each instance whose agent's view changed: a merge patch of
/// that key alone (the instance reconciler writes the rest of the status, and keeps this
/// key as the agent shows it). The instances written.
pub async fn write_statuses(backups: &Backups, client: &kube::Client, instances: &[Arc<DatabaseInstance>]) -> usize {
    let mut written = 0;
    for dbi in instances {
        let Some(change) = status_change(backups, dbi) else { continue };
        let Some(ns) = dbi.namespace() else { continue };
        let api: Objects<DatabaseInstance> = Objects::namespaced(client.clone(), &ns);
        match api.patch_status(&dbi.name_any(), &json!({"status": {"backup": change}})).await {
            Ok(()) => written += 1,
            Err(e) => warn!(instance = %dbi.name_any(), namespace = %ns, error = %e, "failed to write status.backup"),
        }
    }
    written
}

/// Keeps the agents' targets and the instances' `status.backup` current, every
/// [`STATUS_EVERY`], from the instance controller's cache. Runs until dropped.
pub async fn run(
    backups: Arc<Backups>,
    client: kube::Client,
    instances: kube::runtime::reflector::Store<DatabaseInstance>,
) {
    if instances.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        let all = instances.state();
        backups.set_instances(all.iter().map(|i| i.as_ref()));
        let written = write_statuses(&backups, &client, &all).await;
        debug!(written, "status.backup brought up to date");
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

/// Writes the instance's `status.backup` into `status` as the instance reconciler builds
/// it: the agent's view when it has one, else what was shown.
pub(super) fn reconciled_status(
    backups: &Backups,
    dbi: &DatabaseInstance,
    old: Option<BackupStatus>,
) -> Option<BackupStatus> {
    match status_change(backups, dbi) {
        Some(wanted) => wanted,
        None => old,
    }
}
