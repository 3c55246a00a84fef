//! The control plane's backup work (`docs/design/0004-backup.md`): for every database with
//! backups on, an oplog archiver that never stops ([`archiver`]), full backups when
//! [`full_due`](super::full_due) says so ([`full`]), retention every few minutes, and the
//! status the instance shows (`status.backup`, `playground.json`'s `backup`).
//!
//! [`BackupAgent`] runs it with bounded concurrency of fulls; the playground's control
//! plane (and later the operator) tells it which databases to back up
//! ([`BackupAgent::set_targets`]) and asks for a full now ([`BackupAgent::backup_now`]).
//! Everything outside goes through [`BackupWorld`], implemented for the migration's
//! `LiveWorld`; the tests run the same code on a model (`agent/tests.rs`).

pub mod archiver;
pub mod full;
pub mod world;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nimbus_api::migration::OplogPosition;
use object_store::ObjectStore;
use tokio::task::JoinHandle;

pub use archiver::{ArchiveState, Archived, IdleTicks, archive_pin_name, archive_segment, archive_through};
pub use full::{ReplicaCheck, TakenFull, full_pin_name, replica_check, take_full};
pub use world::{ArchiveRecord, BACKUPS, BackupWorld, RecordedHandoff, backup_key};

use super::format::Handoff;
use super::plan::{lineages_into, recoverable_window_across, retention_across};
use super::verify::{ScratchCopy, drop_scratch, verify_full};
use super::{
    BackupError, BackupLocation, BackupStore, FullId, FullManifest, FullPolicy, Incarnation, Lineage, RetentionPolicy,
    SegmentName, full_due,
};
use crate::controlplane::migration::{Failure, ReplicaSetAccess};

/// The agent's knobs (`docs/backup.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentTuning {
    /// Bytes of documents per exported page.
    pub page_bytes: u64,
    /// A full reads at most this many bytes per second from its source (0: unpaced); below
    /// it, it slows down by itself when its pages queue behind the tenant's requests (the
    /// migration's `CopyPacer`).
    pub read_bytes_per_sec: u64,
    /// ...and at least this fast, so it ends.
    pub read_min_bytes_per_sec: u64,
    /// A segment is closed this long after it started...
    pub segment_time: Duration,
    /// ...but one without a change is stored only this often: in between, an idle
    /// database's covered time is kept in its archive record (one etcd write per
    /// `segment_time`), not in an object (about 2,000 per 7-day window instead of 300,000).
    pub idle_segment_every: Duration,
    /// ...or once it holds this many bytes of changes, whichever comes first.
    pub segment_bytes: u64,
    /// Oplog changes per read.
    pub oplog_page: u32,
    /// A caught-up archiver whose replica set's clock is this far behind the control
    /// plane's renews its oplog pin at once: a Raft entry, applied at the leader's time,
    /// which moves the replica set's clock, and so the covered time (see
    /// [`archive_segment`]), on while nobody writes. One archiver per replica set per
    /// `idle_tick` does ([`IdleTicks`]).
    pub idle_tick: Duration,
    /// Pins on the source's oplog lapse this long after their last renewal.
    pub pin_ttl: Duration,
    /// How often a caught-up archiver reads again, and the scheduler looks at its targets.
    pub poll: Duration,
    /// The pause after a failure before trying again.
    pub retry: Duration,
    /// How often retention runs for each database.
    pub retention_every: Duration,
    /// Fulls taken at once over all databases.
    pub max_concurrent_fulls: usize,
    pub full_policy: FullPolicy,
    /// How long the backups of an incarnation that is no longer a target (a deleted
    /// instance, or one whose backups were turned off) are kept after the newest time they
    /// hold; then [`BackupAgent::sweep`] deletes them whole. The instance's own window is
    /// gone with its spec, so this is the agent's (7 days, the default window).
    pub orphan_retention: Duration,
    /// How often the newest full is verified by restoring it to scratch space on its
    /// replica set and comparing checksums (`backup::verify`): right after the first full,
    /// then at most this often (a verification costs a restore's load). Zero: never.
    pub verify_every: Duration,
}

impl Default for AgentTuning {
    fn default() -> AgentTuning {
        AgentTuning {
            page_bytes: 1 << 20,
            read_bytes_per_sec: 32 << 20,
            read_min_bytes_per_sec: 1 << 20,
            segment_time: Duration::from_secs(2),
            idle_segment_every: Duration::from_secs(300),
            segment_bytes: 4 << 20,
            oplog_page: 1_000,
            idle_tick: Duration::from_millis(500),
            pin_ttl: Duration::from_secs(600),
            poll: Duration::from_millis(250),
            retry: Duration::from_secs(2),
            retention_every: Duration::from_secs(300),
            max_concurrent_fulls: 2,
            full_policy: FullPolicy::default(),
            orphan_retention: Duration::from_millis(RetentionPolicy::default().window_ms),
            verify_every: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a backup step failed. Every one is retried by the agent; [`backup_now`] returns it.
///
/// [`backup_now`]: BackupAgent::backup_now
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to back up database {db}: it has no route (deleted, or not placed yet)")]
    NoRoute { db: String },
    #[error("failed to back up database {db}: replica set {replica_set} does not exist")]
    NoReplicaSet { db: String, replica_set: String },
    #[error("failed to back up database {db}: backups are not enabled for it")]
    NotBackedUp { db: String },
    #[error("failed to back up database {db}: it has more pages than a full can number")]
    TooLarge { db: String },
    #[error(
        "failed to archive the oplog of database {db}: the source no longer holds it after index {} seq {}; a new full backup restarts the archive",
        .after.index, .after.seq
    )]
    ArchiveBroken { db: String, after: OplogPosition },
    #[error("failed to archive the oplog of database {db}: another archiver changed its record")]
    Conflict { db: String },
    #[error("failed to back up: {0}")]
    World(Failure),
    #[error(transparent)]
    Store(#[from] BackupError),
}

/// How long [`BackupAgent::backup_now`] starts a failed full again.
pub const BACKUP_NOW_RETRY_FOR: Duration = Duration::from_secs(60);

impl AgentError {
    /// A failure that trying again may cure: the datanodes' or the store's passing ones.
    pub fn is_passing(&self) -> bool {
        match self {
            AgentError::World(f) => matches!(f, Failure::Transient(_)),
            AgentError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<Failure> for AgentError {
    fn from(f: Failure) -> AgentError {
        AgentError::World(f)
    }
}

pub use crate::controlplane::migration::now_ms;

/// Where a database's backups are read from now: the leader of the replica set its route
/// names, and the lineage of its oplog there.
#[derive(Debug, Clone)]
pub struct Source {
    pub rs: ReplicaSetAccess,
    pub lineage: Lineage,
}

/// The lineage of a database's oplog on replica set `replica_set` whose Raft log is
/// incarnation `incarnation` ([`BackupWorld::replica_set_incarnation`]):
/// `{replica_set}.r{incarnation}`, or `{replica_set}` when the replica set has none (the
/// playground). Not the route's epoch: positions are Raft positions of that one log, which
/// an epoch raised on the same replica set (an aborted migration, a deletion's fence) does
/// not reset, so the archive and its fulls go on; a move to another replica set, or a
/// replica set made again under its old name (a new log), is another lineage. Lineages
/// named `{replica_set}.e{epoch}` by earlier versions stay readable: a plan never reads
/// meaning into a lineage's name.
pub fn lineage_of(replica_set: &str, incarnation: Option<u64>) -> Result<Lineage, BackupError> {
    match incarnation {
        Some(i) => Lineage::new(&format!("{replica_set}.r{i}")),
        None => Lineage::new(replica_set),
    }
}

/// The lineage `db`'s route names now, and the route.
pub async fn route_lineage(
    world: &dyn BackupWorld,
    namespace: &str,
    db: &str,
) -> Result<(nimbus_api::etcd::Route, Lineage), AgentError> {
    let route = world.route(db).await?.ok_or_else(|| AgentError::NoRoute { db: db.to_owned() })?;
    let incarnation = world.replica_set_incarnation(namespace, &route.replica_set).await?;
    let lineage = lineage_of(&route.replica_set, incarnation)?;
    Ok((route, lineage))
}

/// `db`'s source now.
pub async fn source(world: &dyn BackupWorld, namespace: &str, db: &str) -> Result<Source, AgentError> {
    let (route, lineage) = route_lineage(world, namespace, db).await?;
    let rs = world
        .replica_set(namespace, &route.replica_set)
        .await?
        .ok_or_else(|| AgentError::NoReplicaSet { db: db.to_owned(), replica_set: route.replica_set.clone() })?;
    Ok(Source { rs, lineage })
}

/// A database to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupTarget {
    pub db: String,
    /// The instance's incarnation (its Kubernetes UID; the playground's id): its backups
    /// and archive record are its own, never those of a deleted instance of the same name.
    pub incarnation: Incarnation,
    /// Its replica sets' namespace (the secret the admin calls carry); empty in the
    /// playground.
    pub namespace: String,
    pub retention: RetentionPolicy,
}

/// What an instance shows of its backups (times in ms since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupStatus {
    /// When the newest complete full ended (its consistent point).
    pub last_full_ms: Option<u64>,
    pub earliest_restorable_ms: Option<u64>,
    pub latest_restorable_ms: Option<u64>,
    /// The latest failure, until the next success.
    pub error: Option<String>,
    /// The replica consistency check of the newest full: members whose checksum differed
    /// from the leader's at the same index (kept until a full finds them agreeing).
    pub replica_mismatch: Option<String>,
    /// The end of the newest full verified by a scratch restore (its checksum equal to the
    /// manifest's), and the latest verification's failure until the next success.
    pub last_verified_ms: Option<u64>,
    pub verify_error: Option<String>,
}

/// What the agent knows of one database's backups: the store's listing, kept current by its
/// own writes (the store is listed again at start and after retention).
#[derive(Debug, Default)]
struct Cache {
    loaded: bool,
    fulls: Vec<FullManifest>,
    segments: Vec<SegmentName>,
    /// The hot migrations' handoffs stored: a full's chain goes on across them.
    handoffs: Vec<Handoff>,
    /// The archive record's idle progress past the stored segments
    /// ([`ArchiveRecord::idle_tip`]): the window's end for an idle database.
    tip: Option<SegmentName>,
    /// From the archiver's record: for `full_due`.
    oplog_bytes_since_full: u64,
    db_bytes: u64,
    /// The archive cannot go on without a new full.
    broken: bool,
    /// The lineage of the archiver's record, once read: while the route names another one
    /// (the database moved, and the archiver has not set its floor yet: `moved_in`), no
    /// full is taken, for one taken before that floor could not start the archive.
    archive_lineage: Option<Lineage>,
    /// A full completed: the archiver resets its byte count and takes this size.
    full_taken: Option<u64>,
    archive_error: Option<String>,
    full_error: Option<String>,
    replica_mismatch: Option<String>,
    /// The newest full verified and when; the last verification's failure.
    verified: Option<VerifiedFull>,
    verify_error: Option<String>,
    verify_tried: Option<(FullId, Instant)>,
    /// After a passing failure: not before this.
    verify_after: Option<Instant>,
    /// A verification's scratch copy whose drop did not get through yet: tried again at
    /// each pass until it does.
    scratch_left: Option<ScratchCopy>,
}

#[derive(Debug, Clone)]
struct VerifiedFull {
    end_ms: u64,
}

impl Cache {
    fn status(&self) -> BackupStatus {
        let window = match &self.tip {
            Some(tip) => {
                let mut segments = self.segments.clone();
                segments.push(tip.clone());
                recoverable_window_across(&self.fulls, &segments, &self.handoffs)
            }
            None => recoverable_window_across(&self.fulls, &self.segments, &self.handoffs),
        };
        BackupStatus {
            last_full_ms: self.fulls.iter().map(|f| f.end_ms).max(),
            earliest_restorable_ms: window.earliest_ms(),
            latest_restorable_ms: window.latest_ms(),
            error: self.full_error.clone().or_else(|| self.archive_error.clone()),
            replica_mismatch: self.replica_mismatch.clone(),
            last_verified_ms: self.verified.as_ref().map(|v| v.end_ms),
            verify_error: self.verify_error.clone(),
        }
    }

    /// Whether the scheduler takes a full of `lineage` (the route's) now: the archive
    /// waits for one (`broken`), or `full_due` says so; never while the archiver's record is
    /// of another lineage (a move the archiver has not taken up yet: a full taken before
    /// it sets the new lineage's floor could not start the archive there).
    fn full_wanted(&self, lineage: &Lineage, now_ms: u64, policy: &FullPolicy) -> bool {
        let switching = self.archive_lineage.as_ref().is_some_and(|l| l != lineage);
        self.loaded
            && !switching
            && (self.broken
                || full_due(
                    self.newest_full_of(lineage).map(|f| f.end_ms),
                    self.oplog_bytes_since_full,
                    self.db_bytes,
                    now_ms,
                    policy,
                ))
    }

    /// The newest full whose chain can reach `lineage`: of it, or of a lineage the database
    /// left for it with a handoff (so a move with one needs no full on arrival).
    fn newest_full_of(&self, lineage: &Lineage) -> Option<&FullManifest> {
        let reaching = lineages_into(lineage, &self.handoffs);
        self.fulls.iter().filter(|f| reaching.contains(&f.lineage)).max_by_key(|f| (f.end_ms, f.id.clone()))
    }
}

/// One database's backups: its store, what is known of it, and its tasks.
struct DbBackups {
    target: BackupTarget,
    store: BackupStore,
    cache: Mutex<Cache>,
    /// One full at a time per database (the scheduler's and `backup_now`'s).
    full_lock: tokio::sync::Mutex<()>,
}

impl DbBackups {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        // A poisoned lock only means a task panicked between two consistent states.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn load(&self) -> Result<(), BackupError> {
        if self.cache().loaded {
            return Ok(());
        }
        self.reload().await
    }

    async fn reload(&self) -> Result<(), BackupError> {
        let listing = self.store.list_fulls().await?;
        let segments = self.store.list_segments().await?;
        let handoffs = self.store.list_handoffs().await?;
        let mut cache = self.cache();
        cache.fulls = listing.complete;
        cache.segments = segments;
        cache.handoffs = handoffs;
        cache.loaded = true;
        Ok(())
    }
}

/// A database's running tasks; aborted when dropped.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The backup agent: the archivers, fulls and retention of every database it is given.
pub struct BackupAgent {
    world: Arc<dyn BackupWorld>,
    objects: Arc<dyn ObjectStore>,
    /// `{prefix}` and `{scope}` of every database's location.
    prefix: String,
    scope: String,
    tuning: AgentTuning,
    fulls: Arc<tokio::sync::Semaphore>,
    /// The archivers' early pin renewals, per replica set.
    ticks: Arc<IdleTicks>,
    dbs: Mutex<BTreeMap<String, Arc<DbBackups>>>,
    /// Each database's tasks, with the entry they run on: a changed target (its retention,
    /// say) is a new entry, and its tasks are started anew on it.
    tasks: Mutex<BTreeMap<String, (Arc<DbBackups>, Tasks)>>,
    /// `set_targets` was called: before, every incarnation would look like a former one.
    targets_known: std::sync::atomic::AtomicBool,
}

impl BackupAgent {
    pub fn new(
        world: Arc<dyn BackupWorld>,
        objects: Arc<dyn ObjectStore>,
        prefix: &str,
        scope: &str,
        tuning: AgentTuning,
    ) -> Result<BackupAgent, BackupError> {
        // Checked once here: every database's location is built from them.
        super::scope_root(prefix, scope)?;
        Ok(BackupAgent {
            world,
            objects,
            prefix: prefix.to_owned(),
            scope: scope.to_owned(),
            fulls: Arc::new(tokio::sync::Semaphore::new(tuning.max_concurrent_fulls.max(1))),
            ticks: Arc::new(IdleTicks::default()),
            tuning,
            dbs: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(BTreeMap::new()),
            targets_known: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn dbs(&self) -> MutexGuard<'_, BTreeMap<String, Arc<DbBackups>>> {
        self.dbs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The databases to back up, all of them each time: new ones start (their archiver
    /// waits for their first full, which is due at once), removed ones stop (what was
    /// stored stays). A database whose name is not a valid backup path is refused.
    pub fn set_targets(&self, targets: Vec<BackupTarget>) -> Result<(), BackupError> {
        let mut dbs = self.dbs();
        let mut next = BTreeMap::new();
        for target in targets {
            let entry = match dbs.remove(&target.db) {
                Some(existing) if existing.target == target => existing,
                _ => Arc::new(DbBackups {
                    store: BackupStore::new(
                        self.objects.clone(),
                        BackupLocation::new(&self.prefix, &self.scope, &target.db, &target.incarnation)?,
                    ),
                    target,
                    cache: Mutex::new(Cache::default()),
                    full_lock: tokio::sync::Mutex::new(()),
                }),
            };
            next.insert(entry.target.db.clone(), entry);
        }
        *dbs = next;
        self.targets_known.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Each backed-up database's status.
    pub fn statuses(&self) -> BTreeMap<String, BackupStatus> {
        self.dbs().iter().map(|(db, b)| (db.clone(), b.cache().status())).collect()
    }

    /// Takes a full backup of `db` now (after any full of it already running). A passing
    /// failure (a leader change mid-full, the store briefly unreachable) starts the full
    /// again under a new id, for up to [`BACKUP_NOW_RETRY_FOR`]; an abandoned attempt's
    /// pages have no manifest, so no restore ever uses them (retention deletes them).
    pub async fn backup_now(&self, db: &str) -> Result<FullManifest, AgentError> {
        let entry = self.dbs().get(db).cloned().ok_or_else(|| AgentError::NotBackedUp { db: db.to_owned() })?;
        let began = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match full_now(&*self.world, &entry, &self.fulls, &self.tuning).await {
                Err(e) if e.is_passing() && began.elapsed() < BACKUP_NOW_RETRY_FOR => {
                    tracing::warn!(db, attempt, error = %e, "full backup failed; taking it again");
                    tokio::time::sleep(Duration::from_millis(250u64 << attempt.min(4))).await;
                }
                other => return other,
            }
        }
    }

    /// Deletes whole the backups of every incarnation in the agent's scope that is not a
    /// target (a deleted instance, an older instance of a reused name, backups turned off)
    /// once the newest time they hold is more than `orphan_retention` old: they stay
    /// restorable by their own incarnation for that long, and are never found by another.
    /// The incarnation's archive record in etcd goes with them, first: a restore plans with
    /// it (the time an idle database's record covers past its last segment), so it is kept
    /// as long as the backups are, and a sweep that fails after it finds the objects again.
    /// Returns the locations deleted.
    pub async fn sweep(&self) -> Result<Vec<BackupLocation>, BackupError> {
        if !self.targets_known.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(Vec::new());
        }
        let live: BTreeSet<(String, Incarnation)> =
            self.dbs().values().map(|b| (b.target.db.clone(), b.target.incarnation.clone())).collect();
        let expired_before = now_ms().saturating_sub(self.tuning.orphan_retention.as_millis() as u64);
        let mut deleted = Vec::new();
        for location in super::store::list_incarnations(&*self.objects, &self.prefix, &self.scope).await? {
            if live.contains(&(location.db().to_owned(), location.incarnation().clone())) {
                continue;
            }
            let store = BackupStore::new(self.objects.clone(), location.clone());
            if store.newest_ms().await?.is_some_and(|newest| newest >= expired_before) {
                continue;
            }
            tracing::info!(
                db = %location.db(), incarnation = %location.incarnation(),
                "deleting the backups of an instance no longer backed up, past its retention"
            );
            if let Err(e) = self.world.delete_archive_record(location.db(), location.incarnation()).await {
                // Its objects stay, so the next sweep finds the incarnation and tries again.
                tracing::warn!(
                    db = %location.db(), incarnation = %location.incarnation(), error = %e,
                    "failed to delete the archive record of a former incarnation; its backups are swept later"
                );
                continue;
            }
            store.delete_all().await?;
            deleted.push(location);
        }
        Ok(deleted)
    }

    /// Runs until `shutdown` completes: keeps one archiver and one scheduler of fulls and
    /// retention going for every target, stops those of databases no longer targets, and
    /// sweeps the backups of former incarnations every `retention_every`.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_sweep: Option<Instant> = None;
        loop {
            self.reconcile();
            let sweep_due = last_sweep.is_none_or(|t| t.elapsed() >= self.tuning.retention_every);
            if sweep_due && self.targets_known.load(std::sync::atomic::Ordering::Acquire) {
                last_sweep = Some(Instant::now());
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "failed to sweep the backups of former instances");
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.tuning.poll) => {}
            }
        }
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn reconcile(&self) {
        let dbs = self.dbs().clone();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Dropped (their tasks aborted): databases no longer targets, and those whose
        // entry was replaced, whose tasks would go on with the old policy, cache and lock.
        tasks.retain(|db, (running, _)| dbs.get(db).is_some_and(|entry| Arc::ptr_eq(entry, running)));
        for (db, entry) in dbs {
            if tasks.contains_key(&db) {
                continue;
            }
            let archive =
                tokio::spawn(archive_loop(self.world.clone(), entry.clone(), self.tuning.clone(), self.ticks.clone()));
            let entry_for_tasks = entry.clone();
            let schedule =
                tokio::spawn(schedule_loop(self.world.clone(), entry, self.fulls.clone(), self.tuning.clone()));
            tasks.insert(db, (entry_for_tasks, Tasks(vec![archive, schedule])));
        }
    }
}

/// One full of `entry`'s database, through the agent's concurrency bound; the cache and
/// the archiver learn of it.
async fn full_now(
    world: &dyn BackupWorld,
    entry: &DbBackups,
    fulls: &tokio::sync::Semaphore,
    tuning: &AgentTuning,
) -> Result<FullManifest, AgentError> {
    let _one = entry.full_lock.lock().await;
    let _permit = fulls.acquire().await.map_err(|_| Failure::Transient("the backup agent is stopping".into()))?;
    let result = async {
        entry.load().await?;
        let src = source(world, &entry.target.namespace, &entry.target.db).await?;
        take_full(world, &entry.store, &src, tuning).await
    }
    .await;
    let mut cache = entry.cache();
    match result {
        Ok(taken) => {
            match &taken.replicas {
                Some(check @ ReplicaCheck::Mismatch { .. }) => {
                    tracing::error!(db = %entry.target.db, "replica consistency check failed: {check}");
                    metrics::counter!("nimbus_backup_replica_mismatches_total").increment(1);
                    cache.replica_mismatch = Some(check.to_string());
                }
                Some(check @ ReplicaCheck::Agree { .. }) => {
                    tracing::info!(db = %entry.target.db, "replica consistency check: {check}");
                    cache.replica_mismatch = None;
                }
                None => {}
            }
            metrics::counter!("nimbus_backup_fulls_total", "result" => "ok").increment(1);
            metrics::counter!("nimbus_backup_full_bytes_total").increment(taken.manifest.bytes);
            cache.fulls.push(taken.manifest.clone());
            cache.full_taken = Some(taken.doc_bytes);
            cache.full_error = None;
            // The archiver restarts from this full (`archive_start`).
            cache.broken = false;
            Ok(taken.manifest)
        }
        Err(e) => {
            metrics::counter!("nimbus_backup_fulls_total", "result" => "error").increment(1);
            cache.full_error = Some(e.to_string());
            Err(e)
        }
    }
}

/// Fulls when due (retried under a new id when one fails) and retention, for ever.
async fn schedule_loop(
    world: Arc<dyn BackupWorld>,
    entry: Arc<DbBackups>,
    fulls: Arc<tokio::sync::Semaphore>,
    tuning: AgentTuning,
) {
    let db = entry.target.db.clone();
    let mut last_retention: Option<Instant> = None;
    loop {
        if let Err(e) = entry.load().await {
            tracing::warn!(db = %db, error = %e, "failed to list the backups");
        }
        let due = match route_lineage(&*world, &entry.target.namespace, &db).await {
            Ok((_, lineage)) => entry.cache().full_wanted(&lineage, now_ms(), &tuning.full_policy),
            Err(e) => {
                tracing::debug!(db = %db, error = %e, "no full backup now");
                false
            }
        };
        if due && let Err(e) = full_now(&*world, &entry, &fulls, &tuning).await {
            tracing::warn!(db = %db, error = %e, "full backup failed; retried under a new id");
            tokio::time::sleep(tuning.retry).await;
            continue;
        }
        verify_when_due(&*world, &entry, &fulls, &tuning).await;
        if last_retention.is_none_or(|t| t.elapsed() >= tuning.retention_every) && entry.cache().loaded {
            match run_retention(&entry).await {
                Ok(()) => last_retention = Some(Instant::now()),
                Err(e) => tracing::warn!(db = %db, error = %e, "backup retention failed"),
            }
        }
        tokio::time::sleep(tuning.poll.max(Duration::from_millis(100)) * 4).await;
    }
}

/// How long a verification's scratch copy whose `Abort` was lost is dropped again at once
/// (at the replica set's leader of the moment), before it is left to the agent's next passes.
const SCRATCH_DROP_WITHIN: Duration = Duration::from_secs(30);

/// Drops a scratch copy a former verification left (tried once per pass), then verifies
/// the newest full (`backup::verify`) when none was tried yet, or when
/// `verify_every` has passed since the last try and a newer full exists; through the
/// agent's bound on concurrent fulls (a verification is a restore's load).
/// Whether the archive holds what replaying `full` to its end needs: nothing when no
/// change came during the full, else a segment of its lineage through its end.
fn archive_reaches_end(full: &FullManifest, segments: &[SegmentName]) -> bool {
    full.end <= full.start || segments.iter().any(|s| s.lineage == full.lineage && s.through >= full.end)
}

async fn verify_when_due(
    world: &dyn BackupWorld,
    entry: &DbBackups,
    fulls: &tokio::sync::Semaphore,
    tuning: &AgentTuning,
) {
    let Some(restorer) = world.restorer() else { return };
    let left = entry.cache().scratch_left.clone();
    if let Some(copy) = left {
        let leader = || world.replica_set(&copy.namespace, &copy.replica_set);
        if drop_scratch(restorer, &copy, leader, Duration::ZERO, Duration::ZERO).await {
            entry.cache().scratch_left = None;
        }
    }
    if tuning.verify_every.is_zero() {
        return;
    }
    let (newest, segments) = {
        let cache = entry.cache();
        // Only a full whose manifest has a checksum can be verified: restoring one without
        // (its marker was not taken) would load the replica set to say nothing.
        let Some(newest) =
            cache.fulls.iter().filter(|f| f.checksum.is_some()).max_by_key(|f| (f.end_ms, f.id.clone())).cloned()
        else {
            return;
        };
        let due = match &cache.verify_tried {
            None => true,
            Some((id, at)) => id != &newest.id && at.elapsed() >= tuning.verify_every,
        } && cache.verify_after.is_none_or(|t| Instant::now() >= t);
        if !due {
            return;
        }
        let mut segments = cache.segments.clone();
        segments.extend(cache.tip.clone());
        // A full written while the database changed is replayed to its end from the
        // archive: not before the archive holds that end (right after a first full taken
        // under writes it does not yet), or the verification would report a sound backup
        // as bad.
        if !archive_reaches_end(&newest, &segments) {
            return;
        }
        (newest, segments)
    };
    let Ok(_permit) = fulls.acquire().await else { return };
    let db = &entry.target.db;
    let rs = match source(world, &entry.target.namespace, db).await {
        Ok(src) => src.rs,
        Err(e) => {
            tracing::debug!(db = %db, error = %e, "no verification now");
            return;
        }
    };
    let import_id = format!("verify-{}-{:08x}", newest.id, rand::random::<u32>());
    let copy = ScratchCopy {
        namespace: entry.target.namespace.clone(),
        replica_set: rs.name.clone(),
        db: nimbus_api::migration::verify_scratch_db(db),
        import_id: import_id.clone(),
    };
    let result = verify_full(restorer, &entry.store, &newest, &segments, rs, &import_id).await;
    let dropped = match &result {
        Ok(v) => v.scratch_dropped,
        Err(e) => e.scratch_dropped,
    };
    // The verification's own `Abort` went to the leader it started with.
    let left = !dropped && {
        let leader = || world.replica_set(&copy.namespace, &copy.replica_set);
        !drop_scratch(restorer, &copy, leader, SCRATCH_DROP_WITHIN, tuning.retry).await
    };
    let mut cache = entry.cache();
    if left {
        cache.scratch_left = Some(copy);
    }
    cache.verify_tried = Some((newest.id.clone(), Instant::now()));
    match result {
        Ok(v) if v.matched() => {
            tracing::info!(db = %db, full = %newest.id, documents = v.documents, "backup verified: a scratch restore matches its checksum");
            metrics::counter!("nimbus_backup_verifications_total", "result" => "matched").increment(1);
            cache.verified = Some(VerifiedFull { end_ms: newest.end_ms });
            cache.verify_error = None;
        }
        Ok(v) => {
            tracing::info!(db = %db, full = %newest.id, verdict = ?v.verdict, "backup restored to scratch space, not comparable");
            metrics::counter!("nimbus_backup_verifications_total", "result" => "unverifiable").increment(1);
        }
        Err(e) if e.backup_is_bad() => {
            tracing::error!(db = %db, full = %newest.id, error = %e, "backup verification failed");
            metrics::counter!("nimbus_backup_verifications_total", "result" => "bad").increment(1);
            cache.verify_error = Some(e.to_string());
        }
        Err(e) => {
            // A passing failure: tried again at the next due time, not reported as a bad backup.
            tracing::warn!(db = %db, full = %newest.id, error = %e, "backup verification did not complete");
            metrics::counter!("nimbus_backup_verifications_total", "result" => "error").increment(1);
            if e.is_retryable() {
                cache.verify_tried = None;
                cache.verify_after = Some(Instant::now() + tuning.retry * 15);
            }
        }
    }
}

/// Deletes what the retention policy no longer needs, and takes exactly that out of the
/// cache. Not a new listing put in the cache's place: a segment or full stored by this
/// agent between that listing and the replacement would drop out of the cache (the
/// window's end stalling, a full taken again) until the next listing.
async fn run_retention(entry: &DbBackups) -> Result<(), BackupError> {
    let listing = entry.store.list_fulls().await?;
    let segments = entry.store.list_segments().await?;
    let handoffs = entry.store.list_handoffs().await?;
    let deletions = retention_across(&listing, &segments, &handoffs, now_ms(), &entry.target.retention);
    if deletions.fulls.is_empty() && deletions.segments.is_empty() {
        return Ok(());
    }
    tracing::info!(
        db = %entry.target.db, fulls = deletions.fulls.len(), segments = deletions.segments.len(),
        "backup retention deletes"
    );
    let applied = entry.store.apply(&deletions).await;
    // Also after a partial failure: what is gone from the cache is at worst re-listed later,
    // never restored from.
    let fulls: BTreeSet<&FullId> = deletions.fulls.iter().collect();
    let segments: std::collections::HashSet<&SegmentName> = deletions.segments.iter().collect();
    let mut cache = entry.cache();
    cache.fulls.retain(|f| !fulls.contains(&f.id));
    cache.segments.retain(|s| !segments.contains(s));
    applied
}

/// The archiver of one database, for ever: a failure waits `retry` and starts a new round
/// (the record read again, the leader found again).
async fn archive_loop(world: Arc<dyn BackupWorld>, entry: Arc<DbBackups>, tuning: AgentTuning, ticks: Arc<IdleTicks>) {
    loop {
        match archive_round(&*world, &entry, &tuning, &ticks).await {
            Ok(()) => entry.cache().archive_error = None,
            Err(e) => {
                tracing::warn!(db = %entry.target.db, error = %e, "oplog archive interrupted");
                entry.cache().archive_error = Some(e.to_string());
                tokio::time::sleep(tuning.retry).await;
            }
        }
    }
}

/// Archives segments while the database stays on its lineage; returns when it moved (the
/// next round starts the new lineage) or when it waits for a first full.
async fn archive_round(
    world: &dyn BackupWorld,
    entry: &DbBackups,
    tuning: &AgentTuning,
    ticks: &IdleTicks,
) -> Result<(), AgentError> {
    let db = &entry.target.db;
    entry.load().await?;
    let src = source(world, &entry.target.namespace, db).await?;
    let Some(mut state) = archive_start(world, entry, &src, tuning, ticks).await? else {
        // No full of this lineage yet: the scheduler takes one at once.
        tokio::time::sleep(tuning.poll).await;
        return Ok(());
    };
    {
        let mut cache = entry.cache();
        if state.arrival.is_none() {
            // After a restart, too: a record still at its handoff's position has not read
            // the arriving import's mark yet.
            let (lineage, at) = (&state.record.lineage, state.record.position);
            state.arrival =
                cache.handoffs.iter().find(|h| &h.to == lineage && h.to_position == at).map(|h| h.to_position);
        }
        cache.broken = state.record.broken;
        cache.archive_lineage = Some(state.record.lineage.clone());
        cache.tip = state.record.idle_tip();
        cache.oplog_bytes_since_full = state.record.oplog_bytes_since_full;
        cache.db_bytes = state.record.db_bytes;
    }
    loop {
        if let Some(db_bytes) = entry.cache().full_taken.take() {
            state.record.db_bytes = db_bytes;
            state.record.oplog_bytes_since_full = 0;
        }
        if let Some(archived) = archive_segment(world, &entry.store, &src, &mut state, tuning, ticks).await? {
            let mut cache = entry.cache();
            match archived {
                Archived::Stored { name, .. } => {
                    cache.segments.push(name);
                    cache.tip = None;
                }
                Archived::Idle { tip } => cache.tip = Some(tip),
                Archived::Replaced => {}
            }
            cache.oplog_bytes_since_full = state.record.oplog_bytes_since_full;
            cache.db_bytes = state.record.db_bytes;
            cache.archive_error = None;
        }
        if state.record.broken {
            // Replaced by an import: the next round waits for a full taken after it.
            entry.cache().broken = true;
            return Ok(());
        }
        if route_lineage(world, &entry.target.namespace, db).await?.1 != src.lineage {
            tracing::info!(db = %db, from = %src.lineage, "database moved: a new oplog lineage starts");
            return Ok(());
        }
    }
}

/// The archiver's state on `src`'s lineage: its record when it is of this lineage and
/// whole; else a new record from the newest full of the lineage taken after the break (its
/// start: everything after it is what the chain needs), or `None` when there is none yet.
async fn archive_start(
    world: &dyn BackupWorld,
    entry: &DbBackups,
    src: &Source,
    tuning: &AgentTuning,
    ticks: &IdleTicks,
) -> Result<Option<ArchiveState>, AgentError> {
    let db = &entry.target.db;
    let existing = world.archive_record(db, &entry.target.incarnation).await?;
    if let Some((record, revision)) = &existing
        && record.lineage == src.lineage
        && !record.broken
    {
        entry.cache().archive_lineage = Some(src.lineage.clone());
        return Ok(Some(ArchiveState {
            record: record.clone(),
            revision: Some(*revision),
            pin_expires_ms: 0,
            last_stored_ms: 0,
            stop_at: None,
            arrival: None,
        }));
    }
    if existing.as_ref().is_some_and(|(r, _)| r.lineage != src.lineage) {
        return match handed_off(world, entry, src, &existing, tuning, ticks).await? {
            Some(state) => Ok(Some(state)),
            None => moved_in(world, entry, src, existing).await,
        };
    }
    let broken_at = existing.as_ref().filter(|(r, _)| r.lineage == src.lineage).map(|(r, _)| r.position);
    let start = {
        let cache = entry.cache();
        cache
            .fulls
            .iter()
            .filter(|f| f.lineage == src.lineage && broken_at.is_none_or(|p| f.start > p))
            .max_by_key(|f| (f.end_ms, f.id.clone()))
            .map(|f| f.start)
    };
    let Some(position) = start else {
        let mut cache = entry.cache();
        cache.broken = broken_at.is_some();
        if broken_at.is_some() {
            cache.archive_lineage = Some(src.lineage.clone());
        }
        return Ok(None);
    };
    let mut state = new_record(entry, src, position, false, existing);
    archiver::save(world, &mut state).await?;
    entry.cache().archive_lineage = Some(src.lineage.clone());
    tracing::info!(db = %db, lineage = %src.lineage, index = position.index, "oplog archive starts");
    Ok(Some(state))
}

/// The database moved to another replica set (its record, `existing`, is of another lineage)
/// and the migration recorded a handoff from that lineage to this one
/// ([`BackupWorld::handoff`]): the old lineage is archived through the handoff's
/// `from_position` (from the replica set the database left, which keeps its oplog pinned
/// under the migration's and the archiver's pins), the handoff stored
/// (`oplog/{to}/handoff_{to_position}.json`), and the new lineage's record starts at its
/// `to_position` at once: a full of the old lineage restores to times after the move
/// through it, so no full is due on arrival. `None` (and the caller takes a full on
/// arrival, [`moved_in`]) when there is no such handoff, when the old archive was broken, or when the replica set left is gone or no longer holds the oplog.
async fn handed_off(
    world: &dyn BackupWorld,
    entry: &DbBackups,
    src: &Source,
    existing: &Option<(ArchiveRecord, u64)>,
    tuning: &AgentTuning,
    ticks: &IdleTicks,
) -> Result<Option<ArchiveState>, AgentError> {
    let db = &entry.target.db;
    let Some((old, revision)) = existing else { return Ok(None) };
    let Some(RecordedHandoff { handoff, from_replica_set }) = world.handoff(db).await? else { return Ok(None) };
    let fits = handoff.from == old.lineage && handoff.to == src.lineage && !old.broken;
    if !fits {
        tracing::info!(db = %db, from = %old.lineage, to = %src.lineage, handoff = ?handoff,
            "no usable oplog handoff for this move: a full is taken on arrival");
        return Ok(None);
    }
    let mut state = ArchiveState {
        record: old.clone(),
        revision: Some(*revision),
        pin_expires_ms: 0,
        last_stored_ms: 0,
        stop_at: None,
        arrival: None,
    };
    if state.record.position < handoff.from_position {
        let left = match world.replica_set(&entry.target.namespace, &from_replica_set).await? {
            Some(rs) => Source { rs, lineage: old.lineage.clone() },
            None => {
                tracing::warn!(db = %db, replica_set = %from_replica_set,
                    "the replica set the database left is gone before its oplog was archived through the handoff: a full is taken on arrival");
                return Ok(None);
            }
        };
        match archive_through(world, &entry.store, &left, &mut state, handoff.from_position, tuning, ticks).await {
            Ok(stored) => entry.cache().segments.extend(stored),
            // Lost before it was archived: nothing joins the two lineages.
            Err(AgentError::ArchiveBroken { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    entry.store.put_handoff(&handoff).await?;
    state.record = ArchiveRecord {
        lineage: src.lineage.clone(),
        position: handoff.to_position,
        covered_ms: 0,
        broken: false,
        idle_position: None,
        idle_covered_ms: 0,
        ..state.record
    };
    state.stop_at = None;
    state.arrival = Some(handoff.to_position);
    state.pin_expires_ms = 0;
    archiver::save(world, &mut state).await?;
    {
        let mut cache = entry.cache();
        if !cache.handoffs.contains(&handoff) {
            cache.handoffs.push(handoff.clone());
        }
        cache.archive_lineage = Some(src.lineage.clone());
        cache.broken = false;
    }
    tracing::info!(db = %db, from = %handoff.from, to = %handoff.to, index = handoff.to_position.index,
        "database moved: its oplog archive goes on in the new lineage from the migration's handoff, without a full");
    Ok(Some(state))
}

/// A new archive record of `src`'s lineage at `position` (`broken`: a floor only a full
/// started after it passes), replacing `existing` (its revision guards the save; its
/// database size carries over).
fn new_record(
    entry: &DbBackups,
    src: &Source,
    position: OplogPosition,
    broken: bool,
    existing: Option<(ArchiveRecord, u64)>,
) -> ArchiveState {
    let record = ArchiveRecord {
        db: entry.target.db.clone(),
        incarnation: entry.target.incarnation.clone(),
        lineage: src.lineage.clone(),
        position,
        covered_ms: 0,
        oplog_bytes_since_full: 0,
        db_bytes: existing.as_ref().map(|(r, _)| r.db_bytes).unwrap_or(0),
        broken,
        idle_position: None,
        idle_covered_ms: 0,
    };
    ArchiveState {
        record,
        revision: existing.map(|(_, rev)| rev),
        pin_expires_ms: 0,
        last_stored_ms: 0,
        stop_at: None,
        arrival: None,
    }
}

/// The database moved to another replica set (its record is of another lineage). A
/// lineage is named by the replica set's Raft log, so a database that comes back to a
/// replica set it left finds the fulls of its earlier stay there: they must never start the
/// archive, for the log between the two stays is not the database's history (its copy was
/// dropped, and this stay began with a migration's import, which is no oplog change). A
/// checksum marker, one Raft entry on the new replica set, gives a position `p` after every
/// change of any earlier stay and before the start of any full taken from now on; the
/// record is saved for the new lineage, broken at `p`, so only a full started after it (due
/// at once: the scheduler waits for this record before taking one, see
/// [`Cache::archive_lineage`]) starts the archive ([`archive_start`]'s `broken_at`).
async fn moved_in(
    world: &dyn BackupWorld,
    entry: &DbBackups,
    src: &Source,
    existing: Option<(ArchiveRecord, u64)>,
) -> Result<Option<ArchiveState>, AgentError> {
    let db = &entry.target.db;
    let marker = world.checksum(&src.rs, db).await?;
    let floor = OplogPosition { index: marker.index, seq: 0 };
    let mut state = new_record(entry, src, floor, true, existing);
    archiver::save(world, &mut state).await?;
    {
        let mut cache = entry.cache();
        cache.broken = true;
        cache.archive_lineage = Some(src.lineage.clone());
    }
    tracing::info!(db = %db, lineage = %src.lineage, index = marker.index, "database moved: a new oplog lineage starts with its first full");
    Ok(None)
}
