//! Backups on Kubernetes (`docs/backup.md`, "On Kubernetes"): the control plane's backup
//! agent (`controlplane::backup::agent`), run by the leading operator, one agent per
//! namespace with instances to back up (the namespace is the agent's `scope`: tenants
//! sharing a store stay apart), fed every DatabaseInstance with `spec.backup.enabled`; and
//! `status.backup` of each instance written from what its agent knows.
//!
//! Where the backups go is one store for the whole operator, made from its flags
//! ([`BackupArgs`]: a directory or a URL, `s3://bucket/prefix` included) and opened once
//! at start ([`OpenedStorage`]: the object store and the prefix of every backup in it).
//! Without one, backups are off and each instance's `status.notYetActive` says so.
//!
//! A namespace's agent sweeps the backups of its former instances (deleted, or with
//! backups turned off) once past `orphan_retention`; it stops with the namespace's last
//! instance to back up, so the namespaces of the store with no agent are swept here instead
//! ([`Backups::sweep_namespaces_without_agent`], every `retention_every`): after an
//! operator restart too, since the namespaces are found in the store, not remembered.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::api::Objects;
use crate::controlplane::backup::agent::{self, AgentTuning, BackupAgent, BackupTarget, BackupWorld};
use crate::controlplane::backup::{
    BackupError, BackupLocation, BackupStorage, Incarnation, OpenedStorage, RetentionPolicy, S3Options, StorageError,
};
use crate::crd::v1alpha1::{BackupStatus, DatabaseInstance};

/// How often the agents' targets and the instances' `status.backup` are brought up to date.
pub const STATUS_EVERY: Duration = Duration::from_secs(15);

/// Where backups go, as `nimbus-operator run` is told (flags or their environment
/// variables); nothing given: backups are off. S3 credentials are not flags: they come
/// from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// the chart's `backup.s3.credentialsSecret`), so they never show in a Pod's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackupArgs {
    /// Backups: the directory they are written to (a PersistentVolume mounted into the
    /// operator's Pod; one store for every namespace, each under its own path). Neither
    /// this nor --backup-url: backups are off, and every instance's
    /// `status.notYetActive` lists `backup`.
    #[arg(long, env = "NIMBUS_BACKUP_DIR", conflicts_with = "backup_url")]
    pub backup_dir: Option<PathBuf>,
    /// Backups: where they are written, `s3://bucket/prefix` (the bucket must exist),
    /// `file:///path` or a path (docs/backup.md, "Storing backups in S3").
    #[arg(long, env = "NIMBUS_BACKUP_URL")]
    pub backup_url: Option<String>,
    /// An S3-compatible server's `https://host[:port]` (MinIO, Ceph): for an s3://
    /// --backup-url only; unset: AWS.
    #[arg(long, env = "NIMBUS_BACKUP_S3_ENDPOINT")]
    pub backup_s3_endpoint: Option<String>,
    /// The bucket's region (default us-east-1): for an s3:// --backup-url only.
    #[arg(long, env = "NIMBUS_BACKUP_S3_REGION")]
    pub backup_s3_region: Option<String>,
    /// Allow an `http://` --backup-s3-endpoint (a server inside the cluster): refused
    /// otherwise, so credentials never cross a network in the clear by mistake.
    #[arg(long, env = "NIMBUS_BACKUP_S3_ALLOW_HTTP")]
    pub backup_s3_allow_http: bool,
}

/// Why the backup store could not be set up (the operator does not start: a person asked
/// for backups and would otherwise get none).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--backup-dir (NIMBUS_BACKUP_DIR) and --backup-url (NIMBUS_BACKUP_URL) are exclusive: give one")]
    Both,
    #[error("{flag} applies to an s3:// --backup-url (NIMBUS_BACKUP_URL) only{given}")]
    S3OptionWithoutS3 { flag: &'static str, given: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl BackupArgs {
    /// Where backups go, parsed and checked (nothing opened yet); `None`: backups are off.
    /// An S3 setting without an `s3://` URL is an error rather than silently unused.
    pub fn storage(&self) -> Result<Option<BackupStorage>, SetupError> {
        let options = S3Options {
            endpoint: self.backup_s3_endpoint.clone(),
            region: self.backup_s3_region.clone(),
            allow_http: self.backup_s3_allow_http,
            ..S3Options::default()
        };
        let storage = match (&self.backup_dir, &self.backup_url) {
            // clap refuses both already; checked here too for flags built by hand.
            (Some(_), Some(_)) => return Err(SetupError::Both),
            (Some(dir), None) => Some(BackupStorage::Local { root: dir.clone() }),
            (None, Some(url)) => Some(BackupStorage::parse(url, options.clone())?),
            (None, None) => None,
        };
        if !matches!(storage, Some(BackupStorage::S3(_))) {
            let given = match &storage {
                Some(s) => format!(" (backups go to {s})"),
                None => " (no --backup-url given)".to_string(),
            };
            let stray = [
                ("--backup-s3-endpoint (NIMBUS_BACKUP_S3_ENDPOINT)", options.endpoint.is_some()),
                ("--backup-s3-region (NIMBUS_BACKUP_S3_REGION)", options.region.is_some()),
                ("--backup-s3-allow-http (NIMBUS_BACKUP_S3_ALLOW_HTTP)", options.allow_http),
            ];
            if let Some((flag, _)) = stray.into_iter().find(|(_, set)| *set) {
                return Err(SetupError::S3OptionWithoutS3 { flag, given });
            }
        }
        Ok(storage)
    }

    /// [`BackupArgs::storage`], opened with the process's environment (its S3 credentials;
    /// half a key pair is an error); `None`: backups are off.
    pub fn open(&self) -> Result<Option<(BackupStorage, OpenedStorage)>, SetupError> {
        self.open_with(|name| std::env::var(name).ok())
    }

    /// [`BackupArgs::open`] with the environment as a function (tests).
    pub fn open_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(BackupStorage, OpenedStorage)>, SetupError> {
        let Some(storage) = self.storage()? else { return Ok(None) };
        let opened = storage.open_with(env)?;
        Ok(Some((storage, opened)))
    }
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
        replica_mismatch: s.replica_mismatch.as_ref().map(|e| truncate(e, 2048)),
        last_verified: s.last_verified_ms.map(rfc3339),
        verify_error: s.verify_error.as_ref().map(|e| truncate(e, 1024)),
    }
}

/// `s` cut to at most `max` bytes (on a character boundary, marked with `...`).
pub(super) fn truncate(s: &str, max: usize) -> String {
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
/// (under `prefix`, the store's) is left out (with a warning) rather than refusing every
/// other target with it.
pub fn targets_by_namespace<'a>(
    prefix: &str,
    instances: impl IntoIterator<Item = &'a DatabaseInstance>,
) -> BTreeMap<String, Vec<BackupTarget>> {
    let mut out: BTreeMap<String, Vec<BackupTarget>> = BTreeMap::new();
    for dbi in instances {
        let Some(ns) = dbi.namespace() else { continue };
        if !dbi.spec.backup.enabled || dbi.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let db = dbi.database();
        // Only the instance that holds its database (placed under its claim): one whose
        // database name is another instance's must not take over that one's backups.
        let serves =
            dbi.status.as_ref().is_some_and(|s| s.placement.is_some() && s.database.as_deref() == Some(db.as_str()));
        if !serves {
            debug!(instance = %dbi.name_any(), namespace = %ns, "not backed up yet: not placed under its database's claim");
            continue;
        }
        // The instance's UID: a new instance that takes a deleted one's name (or database
        // name) never finds the deleted one's backups.
        let incarnation = match dbi.uid().ok_or_else(|| "no uid yet".to_owned()).and_then(|u| {
            let inc = Incarnation::new(&u).map_err(|e| e.to_string())?;
            BackupLocation::new(prefix, &ns, &db, &inc).map_err(|e| e.to_string())?;
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
    /// The store and the prefix every agent writes under.
    storage: OpenedStorage,
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

    /// Backups into `storage` (under its prefix), through `world` (the operator's
    /// datanodes and etcd).
    pub fn new(world: Arc<dyn BackupWorld>, storage: OpenedStorage, tuning: AgentTuning) -> Backups {
        Backups { running: Some(Running { world, storage, tuning, agents: Mutex::new(BTreeMap::new()) }) }
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
    /// stored stays in the store, swept by [`Backups::sweep_namespaces_without_agent`]).
    pub fn set_instances<'a>(&self, instances: impl IntoIterator<Item = &'a DatabaseInstance>) {
        let Some(r) = &self.running else { return };
        let mut targets = targets_by_namespace(&r.storage.prefix, instances);
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
                match BackupAgent::new(
                    r.world.clone(),
                    r.storage.store.clone(),
                    &r.storage.prefix,
                    &ns,
                    r.tuning.clone(),
                ) {
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

    /// How often [`Backups::sweep_namespaces_without_agent`] is due: as often as an agent
    /// sweeps its own namespace (`retention_every`); `None` when backups are off.
    pub fn sweep_every(&self) -> Option<Duration> {
        self.running.as_ref().map(|r| r.tuning.retention_every)
    }

    /// Sweeps the backups of former instances in each namespace of the store that has no
    /// agent (its last instance to back up was deleted, or had its backups turned off, or
    /// the operator restarted since): whole incarnations past `orphan_retention`, with
    /// their archive records, by the rule a namespace's agent applies
    /// ([`BackupAgent::sweep`], run by a short-lived agent with no target). Each directory
    /// under the store's prefix named like a namespace is a namespace's (the prefix is
    /// Nimbus's own). Returns what was deleted; a namespace that fails is logged and left
    /// to the next sweep.
    pub async fn sweep_namespaces_without_agent(&self) -> Result<Vec<BackupLocation>, BackupError> {
        let Some(r) = &self.running else { return Ok(Vec::new()) };
        let mut deleted = Vec::new();
        for ns in namespaces_in_store(&r.storage).await? {
            if Self::agents(r).contains_key(&ns) {
                continue;
            }
            let sweeper =
                BackupAgent::new(r.world.clone(), r.storage.store.clone(), &r.storage.prefix, &ns, r.tuning.clone())
                    .and_then(|agent| agent.set_targets(Vec::new()).map(|()| agent));
            let swept = match sweeper {
                Ok(agent) => agent.sweep().await,
                Err(e) => Err(e),
            };
            match swept {
                Ok(gone) => {
                    if !gone.is_empty() {
                        info!(namespace = %ns, incarnations = gone.len(), "swept the backups of former instances of a namespace with no backup agent");
                    }
                    deleted.extend(gone);
                }
                Err(e) => {
                    warn!(namespace = %ns, error = %e, "failed to sweep the backups of former instances; tried again later")
                }
            }
        }
        Ok(deleted)
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

/// The namespaces holding backups in `storage`: the directories under its prefix named as
/// a Kubernetes namespace can be (a DNS-1123 label).
async fn namespaces_in_store(storage: &OpenedStorage) -> Result<Vec<String>, BackupError> {
    let root: object_store::path::Path = storage.prefix.split('/').filter(|p| !p.is_empty()).collect();
    let listed = storage.store.list_with_delimiter(Some(&root)).await.map_err(|source| BackupError::Store {
        op: "list",
        object: root.to_string(),
        source,
    })?;
    Ok(listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename())
        .filter(|name| is_namespace_name(name))
        .map(str::to_owned)
        .collect())
}

/// A DNS-1123 label, as Kubernetes namespace names are: 1 to 63 lowercase letters, digits
/// and `-`, beginning and ending with a letter or digit.
fn is_namespace_name(name: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
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
/// key as the agent shows it). A replica mismatch newly found is also a Warning Event
/// `ReplicaChecksumMismatch` on the instance (with `recorder`). The instances written.
pub async fn write_statuses(
    backups: &Backups,
    client: &kube::Client,
    recorder: Option<&Recorder>,
    instances: &[Arc<DatabaseInstance>],
) -> usize {
    let mut written = 0;
    for dbi in instances {
        let Some(change) = status_change(backups, dbi) else { continue };
        let Some(ns) = dbi.namespace() else { continue };
        let shown = dbi.status.as_ref().and_then(|s| s.backup.as_ref()).and_then(|b| b.replica_mismatch.clone());
        if let (Some(recorder), Some(found)) = (recorder, change.as_ref().and_then(|c| c.replica_mismatch.clone()))
            && shown.as_ref() != Some(&found)
        {
            warn!(instance = %dbi.name_any(), namespace = %ns, "replica consistency check failed: {found}");
            let ev = Event {
                type_: EventType::Warning,
                reason: "ReplicaChecksumMismatch".into(),
                note: Some(truncate(&found, 1000)),
                action: "Backup".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &dbi.object_ref(&())).await {
                warn!(error = %e, "failed to publish an event");
            }
        }
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
    let reporter = Reporter { controller: "nimbus-operator".into(), instance: None };
    let recorder = Recorder::new(client.clone(), reporter);
    let mut last_sweep: Option<tokio::time::Instant> = None;
    loop {
        let all = instances.state();
        backups.set_instances(all.iter().map(|i| i.as_ref()));
        let written = write_statuses(&backups, &client, Some(&recorder), &all).await;
        debug!(written, "status.backup brought up to date");
        if let Some(every) = backups.sweep_every()
            && last_sweep.is_none_or(|t| t.elapsed() >= every)
        {
            last_sweep = Some(tokio::time::Instant::now());
            if let Err(e) = backups.sweep_namespaces_without_agent().await {
                warn!(error = %e, "failed to list the namespaces of the backup store to sweep former instances' backups");
            }
        }
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
