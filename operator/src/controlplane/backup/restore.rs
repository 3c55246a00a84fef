//! The restore engine (`docs/design/0004-backup.md`, "Restore"): a [`RestorePlan`] carried
//! out as a hot migration's import into a **new** database on a replica set, so nothing
//! half-restored is ever served.
//!
//! The steps, each one Raft entry on the target (`nimbus_api::migration::ImportStep`):
//!
//! 1. `Begin` under the restore's import id: from then on the target refuses every client
//!    request for the database until `Finish` (and refuses `Begin` on a database it serves,
//!    so a restore never drops a live one).
//! 2. The full's pages, read and verified one by one ([`BackupStore::read_page`]): their
//!    collections (`Collections`, whenever the list changes) and documents (`Docs`), only
//!    the named collections when the restore names some, under their new names.
//! 3. The plan's segments ([`BackupStore::read_segment`]): every change after the full's
//!    start, each position once (segments may overlap), in oplog order, up to the first
//!    change past the full's end whose time is after the plan's `to_ms` (times only grow in
//!    a replica set's oplog: the point in time is a prefix of it), or past the plan's
//!    `until` position when it has one, sent as `Ops` in batches
//!    of at most [`BATCH_BYTES`] (one import entry stays far below the Raft append bound of
//!    8 MiB, as an oplog page of `GET /v1/admin/oplog` does).
//!    A plan that crosses a hot migration (`RestorePlan::handoffs`) replays the old
//!    replica set's changes through the handoff's `from_position`, then the new one's
//!    after its `to_position`: positions of the two logs are unrelated, so the order
//!    restarts there, and every change after the crossing is held to the plan's time.
//! 4. A checksum marker on the target ([`RestoreWorld::checksum`]), compared with the
//!    manifest's checksum when the whole database was restored to exactly the full's end.
//! 5. `Finish { epoch }` when the caller asked for it ([`RestoreInto::finish_epoch`]).
//!
//! On any failure the import is aborted (`Abort`: the target drops what was imported) and
//! the failure says whether that worked; an import left behind (the target unreachable) is
//! still invisible, and the next `Begin` of the same database drops it.
//!
//! The caller's contract: the database's route. With `finish_epoch: Some(e)`, the target
//! serves the database at route epoch `e` once this returns, and the caller then writes a
//! route naming the replica set at epoch `e` (a new database: no gateway holds an older
//! one). With `None` the database stays incoming: the caller switches to it as a migration
//! does (hold, fence, `Finish`, route swap), or sends `Abort`. Idempotency records are not
//! restored: the restored database is a new point in time, not the writer's retry target.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::{ExportedCollection, ExportedDoc, ImportAnswer, ImportRequest, ImportStep, OplogPosition};

use super::layout::FullId;
use super::plan::RestorePlan;
use super::{BackupError, BackupStore};
use crate::controlplane::migration::{ChecksumMarker, Failure, MigrationWorld, ReplicaSetAccess};

/// About the most bytes (documents' or changes' JSON) one `Docs` or `Ops` step carries: the
/// size of a datanode's oplog page (`OPLOG_PAGE_BYTES`), so one import entry stays well
/// below the 8 MiB Raft append bound whatever the backup's page size. A single larger
/// document or change is still sent, alone.
pub const BATCH_BYTES: usize = 1 << 20;

/// `Docs` steps sent at once: while one is applied on the target, the next is on its way
/// (the HTTP request, the leader's log append and fsync, the followers' copies), and the
/// next page is read and checked. Each is one Raft entry of up to [`BATCH_BYTES`] that the
/// replica set's other tenants wait behind, so a few, not many.
pub const DOCS_IN_FLIGHT: usize = 2;

/// At most this many changes per `Ops` step (many tiny changes: a bounded entry to apply).
pub const BATCH_CHANGES: usize = 10_000;

/// What a restore needs from the world: the target's import and checksum. Every
/// [`MigrationWorld`] is one ([`crate::controlplane::migration::LiveWorld`] in the
/// operator and the playground); the tests use fakes.
#[async_trait]
pub trait RestoreWorld: Send + Sync {
    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure>;
    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure>;
}

#[async_trait]
impl<W: MigrationWorld + ?Sized> RestoreWorld for W {
    async fn import(&self, rs: &ReplicaSetAccess, req: &ImportRequest) -> Result<ImportAnswer, Failure> {
        MigrationWorld::import(self, rs, req).await
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        MigrationWorld::checksum(self, rs, db).await
    }
}

/// Where and how a plan is restored.
#[derive(Debug, Clone)]
pub struct RestoreInto {
    /// The replica set that builds the database (its leader now).
    pub replica_set: ReplicaSetAccess,
    /// The database to build: must not be served by the replica set (its `Begin` is
    /// refused then).
    pub db: String,
    /// The import's id (`ImportRequest::migration`): unique per restore attempt, so that a
    /// stale attempt's steps are refused. A retry may reuse it (its `Begin` starts over).
    pub import_id: String,
    /// Only these collections (their names in the backup); `None`: all of them.
    pub collections: Option<BTreeSet<String>>,
    /// Backup name → restored name, for collections restored under new names.
    pub renames: BTreeMap<String, String>,
    /// `Some(epoch)`: the target serves the database at this route epoch once restored;
    /// `None`: left incoming for the caller's switch (see the module's contract).
    pub finish_epoch: Option<u64>,
    /// See [`BATCH_BYTES`]; smaller in tests.
    pub batch_bytes: usize,
    /// See [`DOCS_IN_FLIGHT`]; at least 1.
    pub docs_in_flight: usize,
    /// At most this many bytes of documents and changes sent per second, on average since
    /// the restore began; 0: as fast as the target applies them. A restore a person asked
    /// for goes at full speed; a background one (a verification's scratch copy) is paced,
    /// for it loads the replica set its tenants are served by.
    pub pace_bytes_per_sec: u64,
}

impl RestoreInto {
    /// A whole-database restore into `db`, finished at `finish_epoch`.
    pub fn new(replica_set: ReplicaSetAccess, db: &str, import_id: &str, finish_epoch: Option<u64>) -> RestoreInto {
        RestoreInto {
            replica_set,
            db: db.to_owned(),
            import_id: import_id.to_owned(),
            collections: None,
            renames: BTreeMap::new(),
            finish_epoch,
            batch_bytes: BATCH_BYTES,
            docs_in_flight: DOCS_IN_FLIGHT,
            pace_bytes_per_sec: 0,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreOutcome {
    /// The restored database.
    pub db: String,
    /// The full it was loaded from.
    pub full: FullId,
    /// Its collections at the point restored to (restored names), sorted.
    pub collections: Vec<String>,
    /// Documents in the restored database (the target's count at its checksum marker).
    pub documents: u64,
    /// Documents loaded from the full's pages (a document two pages copied counts twice).
    pub documents_loaded: u64,
    /// Changes of the archive applied (after the filter).
    pub changes_applied: u64,
    /// JSON bytes of the documents and changes sent to the target.
    pub bytes: u64,
    /// The point restored to: the last change replayed (filtered out or not), or the full's
    /// end when none was past it. Every change at or before it is in, none after it.
    pub reached: OplogPosition,
    /// That change's time (the full's `end_ms` without one): the database is as it was
    /// at every time from this to the plan's `to_ms`.
    pub reached_ms: u64,
    /// The target's checksum marker, taken before `Finish`: a caller compares it with the
    /// source's at `reached` when it has one.
    pub checksum: ChecksumMarker,
    /// Whether the checksum was found equal to the manifest's (a whole-database restore to
    /// exactly the full's end, with a manifest that has one); a difference fails the
    /// restore.
    pub checksum_verified: bool,
    /// Whether `Finish` was sent (the target serves the database).
    pub finished: bool,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreCause {
    #[error("invalid restore request: {0}")]
    Invalid(String),
    /// A backup object damaged, missing or unreadable (the error names it).
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("the target replica set {replica_set} failed the import's {step} step: {failure}")]
    Target { replica_set: String, step: &'static str, failure: Failure },
    #[error("the backup has no collection {} at the time restored to", .0.join(", "))]
    MissingCollections(Vec<String>),
    #[error("the restored database's checksum {actual} differs from full {full}'s {expected}")]
    ChecksumMismatch { full: FullId, expected: String, actual: String },
    /// The archive after the full holds an import's mark (`OplogOp::Imported`): the
    /// database was replaced there (restored into, or copied in by a migration), and its
    /// changes cannot bring the full past that point.
    #[error(
        "database {db} was replaced by import {import} at {at} (index {index}): full {full} cannot be brought past it; a point after it needs a full taken after it"
    )]
    Imported { db: String, import: String, index: u64, at: String, full: FullId },
}

/// A restore that did not complete: why, and whether the target dropped what it had
/// imported (`false`: the import is left incoming, invisible to clients, and dropped by the
/// next attempt's `Begin` or an `Abort`).
#[derive(Debug, thiserror::Error)]
#[error("failed to restore database {from_db} into {db} on {replica_set}: {cause}{}",
    if *.import_dropped { "" } else { " (the partial import could not be dropped: it stays invisible until a retry drops it)" })]
pub struct RestoreFailure {
    pub from_db: String,
    pub db: String,
    pub replica_set: String,
    pub cause: RestoreCause,
    pub import_dropped: bool,
}

impl RestoreFailure {
    /// Whether the same restore tried again may succeed: the object store's or the target's
    /// passing failures. A damaged backup, a refused import or a wrong request stay so.
    pub fn is_retryable(&self) -> bool {
        match &self.cause {
            RestoreCause::Backup(e) => e.is_retryable(),
            RestoreCause::Target { failure: Failure::Transient(_), .. } => true,
            _ => false,
        }
    }
}

/// Restores `plan` (from `store`) into `into.db` on `into.replica_set` through the import
/// protocol; see the module's documentation for the steps and the caller's contract.
pub async fn restore<W: RestoreWorld + ?Sized>(
    world: &W,
    store: &BackupStore,
    plan: &RestorePlan,
    into: &RestoreInto,
) -> Result<RestoreOutcome, RestoreFailure> {
    let fail = |cause: RestoreCause, import_dropped: bool| RestoreFailure {
        from_db: store.location().db().to_owned(),
        db: into.db.clone(),
        replica_set: into.replica_set.name.clone(),
        cause,
        import_dropped,
    };
    // Refused before anything is sent: nothing to drop.
    let names = Names::new(into).map_err(|c| fail(c, true))?;
    tracing::info!(db = %into.db, replica_set = %into.replica_set.name, full = %plan.full.id, to_ms = plan.to_ms,
        "restore started");
    let mut run =
        Run { world, store, plan, into, names, outcome: Tally::default(), started: tokio::time::Instant::now() };
    match run.build().await {
        Ok(outcome) => {
            tracing::info!(db = %into.db, replica_set = %into.replica_set.name, documents = outcome.documents,
                reached_ms = outcome.reached_ms, "restore done");
            Ok(outcome)
        }
        Err(cause) => {
            let abort = run.request(ImportStep::Abort);
            let import_dropped = match world.import(&into.replica_set, &abort).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(db = %into.db, replica_set = %into.replica_set.name, error = %e,
                        "failed to drop a failed restore's import");
                    false
                }
            };
            tracing::warn!(db = %into.db, replica_set = %into.replica_set.name, error = %cause, "restore failed");
            Err(fail(cause, import_dropped))
        }
    }
}

/// Which collections are restored, under which names.
struct Names {
    only: Option<BTreeSet<String>>,
    renames: BTreeMap<String, String>,
    /// Restored name → backup name, as met: two collections must not land on one name.
    claimed: BTreeMap<String, String>,
}

impl Names {
    fn new(into: &RestoreInto) -> Result<Names, RestoreCause> {
        let invalid = |m: String| RestoreCause::Invalid(m);
        nimbus_api::migration::validate_admin_db(&into.db)
            .map_err(|e| invalid(format!("database name: {}", e.message)))?;
        if into.import_id.is_empty() {
            return Err(invalid("the import id is empty".into()));
        }
        if let Some(only) = &into.collections {
            if only.is_empty() {
                return Err(invalid("an empty list of collections restores nothing".into()));
            }
            if let Some(c) = into.renames.keys().find(|c| !only.contains(*c)) {
                return Err(invalid(format!("collection {c} is renamed but not among those restored")));
            }
        }
        for new in into.renames.values() {
            nimbus_api::path::CollName::new(new)
                .map_err(|e| invalid(format!("collection name {new:?}: {}", e.message)))?;
        }
        let mut names =
            Names { only: into.collections.clone(), renames: into.renames.clone(), claimed: BTreeMap::new() };
        // Collisions among the names known now; the others when met.
        let known: Vec<String> = names.only.iter().flatten().chain(names.renames.keys()).cloned().collect();
        for c in known {
            names.map(&c)?;
        }
        Ok(names)
    }

    /// The restored name of backup collection `coll`; `None` when it is not restored.
    fn map(&mut self, coll: &str) -> Result<Option<String>, RestoreCause> {
        if self.only.as_ref().is_some_and(|only| !only.contains(coll)) {
            return Ok(None);
        }
        let new = self.renames.get(coll).cloned().unwrap_or_else(|| coll.to_owned());
        match self.claimed.get(&new) {
            Some(other) if other != coll => {
                Err(RestoreCause::Invalid(format!("collections {other} and {coll} would both be restored as {new}")))
            }
            Some(_) => Ok(Some(new)),
            None => {
                self.claimed.insert(new.clone(), coll.to_owned());
                Ok(Some(new))
            }
        }
    }

    fn whole(&self) -> bool {
        self.only.is_none() && self.renames.iter().all(|(a, b)| a == b)
    }
}

#[derive(Debug, Default)]
struct Tally {
    documents_loaded: u64,
    changes_applied: u64,
    bytes: u64,
}

/// One import step to the target's leader.
async fn send<W: RestoreWorld + ?Sized>(world: &W, into: &RestoreInto, req: ImportRequest) -> Result<(), RestoreCause> {
    let name = req.step.kind();
    world.import(&into.replica_set, &req).await.map(|_| ()).map_err(|failure| RestoreCause::Target {
        replica_set: into.replica_set.name.clone(),
        step: name,
        failure,
    })
}

struct Run<'a, W: ?Sized> {
    world: &'a W,
    store: &'a BackupStore,
    plan: &'a RestorePlan,
    into: &'a RestoreInto,
    names: Names,
    outcome: Tally,
    /// When the restore began: the start of [`RestoreInto::pace_bytes_per_sec`]'s budget.
    started: tokio::time::Instant,
}

impl<'a, W: RestoreWorld + ?Sized> Run<'a, W> {
    fn request(&self, step: ImportStep) -> ImportRequest {
        ImportRequest { db: self.into.db.clone(), migration: self.into.import_id.clone(), step }
    }

    async fn import(&self, step: ImportStep) -> Result<(), RestoreCause> {
        send(self.world, self.into, self.request(step)).await
    }

    async fn build(&mut self) -> Result<RestoreOutcome, RestoreCause> {
        self.import(ImportStep::Begin).await?;
        // Backup collection names present at the point reached so far.
        let mut present: BTreeSet<String> = BTreeSet::new();
        self.load_pages(&mut present).await?;
        let (reached, reached_ms, past_end) = self.replay(&mut present).await?;

        if let Some(only) = &self.names.only {
            let missing: Vec<String> = only.difference(&present).cloned().collect();
            if !missing.is_empty() {
                return Err(RestoreCause::MissingCollections(missing));
            }
        }
        let checksum = self.world.checksum(&self.into.replica_set, &self.into.db).await.map_err(|failure| {
            RestoreCause::Target { replica_set: self.into.replica_set.name.clone(), step: "checksum", failure }
        })?;
        let full = &self.plan.full;
        let comparable = self.names.whole() && !past_end;
        let checksum_verified = match (&full.checksum, comparable) {
            (Some(expected), true) if *expected != checksum.checksum => {
                return Err(RestoreCause::ChecksumMismatch {
                    full: full.id.clone(),
                    expected: expected.clone(),
                    actual: checksum.checksum.clone(),
                });
            }
            (Some(_), true) => true,
            _ => false,
        };
        if let Some(epoch) = self.into.finish_epoch {
            self.import(ImportStep::Finish { epoch }).await?;
        }
        let mut collections = Vec::new();
        for c in &present {
            if let Some(name) = self.names.map(c)? {
                collections.push(name);
            }
        }
        collections.sort();
        Ok(RestoreOutcome {
            db: self.into.db.clone(),
            full: full.id.clone(),
            collections,
            documents: checksum.documents,
            documents_loaded: self.outcome.documents_loaded,
            changes_applied: self.outcome.changes_applied,
            bytes: self.outcome.bytes,
            reached,
            reached_ms,
            checksum,
            checksum_verified,
            finished: self.into.finish_epoch.is_some(),
        })
    }

    /// Step 2: the full's collections and documents, page by page, with up to
    /// [`RestoreInto::docs_in_flight`] `Docs` steps sent at once (see [`DOCS_IN_FLIGHT`]).
    /// Whatever happens, no step is left in flight when this returns: a step still on its
    /// way could otherwise reach the target after this attempt's `Abort` and the next
    /// attempt's `Begin` under the same import id.
    async fn load_pages(&mut self, present: &mut BTreeSet<String>) -> Result<(), RestoreCause> {
        let mut in_flight = FuturesUnordered::new();
        let mut loaded = self.load_pages_into(present, &mut in_flight).await;
        while let Some(sent) = in_flight.next().await {
            if loaded.is_ok() {
                loaded = sent;
            }
        }
        loaded
    }

    async fn load_pages_into(
        &mut self,
        present: &mut BTreeSet<String>,
        in_flight: &mut FuturesUnordered<BoxFuture<'a, Result<(), RestoreCause>>>,
    ) -> Result<(), RestoreCause> {
        let plan = self.plan;
        let full = &plan.full;
        let mut sent: Option<Vec<ExportedCollection>> = None;
        for entry in &full.pages {
            // The next page is read while the steps sent are applied.
            let page = {
                let read = self.store.read_page(&full.id, entry);
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        page = &mut read => break page?,
                        Some(done) = in_flight.next() => done?,
                    }
                }
            };
            let mut collections = Vec::new();
            for c in page.collections {
                present.insert(c.name.clone());
                if let Some(name) = self.names.map(&c.name)? {
                    collections.push(ExportedCollection { name, indexes: c.indexes });
                }
            }
            if sent.as_ref() != Some(&collections) && !collections.is_empty() {
                // Collections and their indexes before any later document, as sent.
                while let Some(done) = in_flight.next().await {
                    done?;
                }
                self.import(ImportStep::Collections { collections: collections.clone() }).await?;
                sent = Some(collections);
            }
            let mut batch: Vec<ExportedDoc> = Vec::new();
            let mut bytes = 0;
            for d in page.docs {
                let Some(coll) = self.names.map(&d.coll)? else { continue };
                let size = d.doc.get().len();
                if !batch.is_empty() && bytes + size > self.into.batch_bytes {
                    self.send_docs(std::mem::take(&mut batch), in_flight).await?;
                    bytes = 0;
                }
                bytes += size;
                self.outcome.bytes += size as u64;
                batch.push(ExportedDoc { coll, doc: d.doc });
            }
            self.send_docs(batch, in_flight).await?;
        }
        Ok(())
    }

    /// Sends one `Docs` step once fewer than the allowed number are in flight. `Docs` steps
    /// commute: each puts whole documents by `_id`, and the replay that follows (every
    /// change since the full's start, as after-images) settles any document two pages
    /// copied at different moments, whichever of their steps was applied last.
    async fn send_docs(
        &mut self,
        docs: Vec<ExportedDoc>,
        in_flight: &mut FuturesUnordered<BoxFuture<'a, Result<(), RestoreCause>>>,
    ) -> Result<(), RestoreCause> {
        if docs.is_empty() {
            return Ok(());
        }
        while in_flight.len() >= self.into.docs_in_flight.max(1) {
            if let Some(done) = in_flight.next().await {
                done?;
            }
        }
        self.pace().await;
        self.outcome.documents_loaded += docs.len() as u64;
        let (world, into) = (self.world, self.into);
        let req =
            ImportRequest { db: into.db.clone(), migration: into.import_id.clone(), step: ImportStep::Docs { docs } };
        in_flight.push(Box::pin(async move { send(world, into, req).await }));
        Ok(())
    }

    /// Step 3: the archived changes after the full's start up to the plan's time. Returns
    /// the point reached, its time, and whether a change past the full's end was replayed.
    async fn replay(&mut self, present: &mut BTreeSet<String>) -> Result<(OplogPosition, u64, bool), RestoreCause> {
        let plan = self.plan;
        let full = &plan.full;
        let (mut applied, mut reached_ms, mut past_end) = (full.start, full.end_ms, false);
        // The lineage replayed, and whether the plan crossed into another one (a hot
        // migration's handoff): positions are then of the new replica set's log, unrelated
        // to the full's, and the full is consistent (every change of the old one replayed).
        // Its changes end at the next handoff's `from_position` (the source's fence: what
        // the old replica set wrote after it, its drop of the copy, is not the database's).
        let (mut lineage, mut crossed) = (&full.lineage, false);
        let mut handoffs = plan.handoffs.iter();
        let mut exit = handoffs.next();
        let mut batch: Vec<OplogEntry> = Vec::new();
        let mut bytes = 0;
        'segments: for segment in &plan.segments {
            if &segment.lineage != lineage {
                let Some(h) = exit.filter(|h| &h.from == lineage && h.to == segment.lineage) else {
                    return Err(RestoreCause::Invalid(format!(
                        "the plan goes from lineage {lineage} to {} with no handoff between them",
                        segment.lineage
                    )));
                };
                // The new replica set's changes of the database come after its position.
                (applied, lineage, crossed, past_end) = (h.to_position, &h.to, true, true);
                exit = handoffs.next();
            }
            for mut e in self.store.read_segment(segment).await? {
                let at = OplogPosition { index: e.index, seq: e.seq };
                if at <= applied || exit.is_some_and(|h| &h.from == lineage && at > h.from_position) {
                    continue;
                }
                // A plan bounded by position (a verification: exactly the full's end).
                if !crossed && plan.until.is_some_and(|until| at > until) {
                    break 'segments;
                }
                // Past the end the full is consistent, and the first change after the time
                // ends the replay: times only grow along the oplog.
                let past = crossed || at > full.end;
                if past && e.ts_ms > plan.to_ms {
                    break 'segments;
                }
                applied = at;
                if past {
                    past_end = true;
                    reached_ms = reached_ms.max(e.ts_ms);
                }
                match (&e.op, e.coll.as_deref()) {
                    (OplogOp::Imported { import }, _) => {
                        return Err(RestoreCause::Imported {
                            db: e.db.clone(),
                            import: import.clone(),
                            index: e.index,
                            at: super::plan::rfc3339(e.ts_ms),
                            full: full.id.clone(),
                        });
                    }
                    (OplogOp::DropDatabase, _) => present.clear(),
                    (OplogOp::DropCollection, Some(c)) => {
                        present.remove(c);
                    }
                    (OplogOp::Put { .. } | OplogOp::CreateCollection | OplogOp::CreateIndex { .. }, Some(c)) => {
                        present.insert(c.to_owned());
                    }
                    _ => {}
                }
                if let Some(c) = e.coll.take() {
                    match self.names.map(&c)? {
                        Some(name) => e.coll = Some(name),
                        None => continue,
                    }
                }
                e.db = self.into.db.clone();
                let size = serde_json::to_vec(&e).map(|v| v.len()).unwrap_or(0);
                if !batch.is_empty() && (bytes + size > self.into.batch_bytes || batch.len() >= BATCH_CHANGES) {
                    self.send_ops(std::mem::take(&mut batch)).await?;
                    bytes = 0;
                }
                bytes += size;
                self.outcome.bytes += size as u64;
                batch.push(e);
            }
        }
        self.send_ops(batch).await?;
        Ok((if crossed { applied } else { applied.max(full.end) }, reached_ms, past_end))
    }

    /// Waits until the bytes sent so far (this step's included) fit the pace, if any.
    async fn pace(&self) {
        if self.into.pace_bytes_per_sec > 0 {
            let due = self.outcome.bytes as f64 / self.into.pace_bytes_per_sec as f64;
            tokio::time::sleep_until(self.started + Duration::from_secs_f64(due)).await;
        }
    }

    async fn send_ops(&mut self, entries: Vec<OplogEntry>) -> Result<(), RestoreCause> {
        if entries.is_empty() {
            return Ok(());
        }
        self.pace().await;
        self.outcome.changes_applied += entries.len() as u64;
        self.import(ImportStep::Ops { entries }).await
    }
}
