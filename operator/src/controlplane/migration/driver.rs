//! The migration driver: carries out one migration's steps against a [`MigrationWorld`],
//! asking [`super::plan`] at each decision, persisting the record after each step.
//!
//! Every step is idempotent, so the driver may be dropped anywhere (a crash, a lost
//! leadership) and another started from the persisted record: `plan::on_resume` says what
//! it does then. The record is written with a compare-and-swap on its revision: a driver
//! whose write finds the record changed stops ([`Outcome::Superseded`]), so two control
//! planes never both carry a migration forward past one step.
//!
//! Failpoints (`fail` crate, the `failpoints` feature): `migration-<step>-before` before a
//! step's side effect and `migration-<step>-after` after it (before the record says so),
//! plus a few inside steps; [`FAILPOINTS`] lists them all. Configured to `return`, a
//! failpoint makes the driver stop as if the control plane crashed there.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_api::etcd::{Route, RouteState};
use nimbus_api::migration::{
    DbOplogPage, ExportPart, ExportRequest, ExportedCollection, ImportRequest, ImportStep, OplogPosition,
    PinOplogRequest, restore_staging_db, verify_scratch_db,
};
use thiserror::Error;

use super::io::{DropOutcome, MigrationWorld, ReplicaSetAccess};
use super::plan::{self, Failure, Reaction, Resume, Tuning};
use super::record::{MigrationRecord, MigrationStatus, Phase, Step};
use crate::controlplane::backup::Lineage;
use crate::controlplane::backup::agent::lineage_of;
use crate::controlplane::backup::format::Handoff;

/// Every failpoint of the driver, in the order a migration passes them.
pub const FAILPOINTS: &[&str] = &[
    "migration-copy-before",
    "migration-copy-begun",
    "migration-copy-page",
    "migration-copy-after",
    "migration-catchup-page",
    "migration-catchup-after",
    "migration-hold-before",
    "migration-hold-after",
    "migration-fence-before",
    "migration-fence-after",
    "migration-verify-caughtup",
    "migration-verify-idempotency",
    "migration-verify-after",
    "migration-switch-before",
    "migration-switch-finished",
    "migration-switch-after",
    "migration-cleanup-before",
    "migration-cleanup-after",
    "migration-abort-before",
    "migration-abort-routed",
    "migration-abort-after",
];

/// A named failpoint: with the `failpoints` feature, `fail::cfg(name, "return")` makes the
/// step stop there as a crash would. Without it, nothing.
macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err(StepError::Crashed($name)));
    }};
}

/// Why a driver stopped without finishing.
#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("failed to read the migration record of {db}: {failure}")]
    Record { db: String, failure: Failure },
    #[error("no migration of {0} is recorded")]
    NotFound(String),
    /// A failpoint stopped the driver (tests).
    #[error("the migration driver crashed at failpoint {0}")]
    Crashed(&'static str),
}

/// Why a migration was not started.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("database {0} has no route: it is not placed on a replica set")]
    NoRoute(String),
    #[error("database {db} is already on replica set {replica_set}: nothing to migrate")]
    AlreadyThere { db: String, replica_set: String },
    #[error(
        "database {db} is already migrating from {from} to {to} (phase {phase:?}); wait for it to complete or abort"
    )]
    AlreadyMigrating { db: String, from: String, to: String, phase: Phase },
    #[error("replica set {0} does not exist")]
    UnknownReplicaSet(String),
    #[error("failed to start the migration of {db}: {failure}")]
    World { db: String, failure: Failure },
}

/// How a driver's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Aborted for good (attempts exhausted, or cancelled).
    Aborted,
    /// Nothing to do before this time (ms): the next attempt, or the clean-up.
    WaitUntil(u64),
    /// Another driver changed the record: this one stopped.
    Superseded,
}

/// Starting a migration of `db` to replica set `to_replica_set` (of `namespace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    pub db: String,
    pub namespace: String,
    pub to_replica_set: String,
}

enum StepError {
    Failed(Failure),
    Superseded,
    /// Only failpoints make it.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    Crashed(&'static str),
}

impl From<Failure> for StepError {
    fn from(f: Failure) -> StepError {
        StepError::Failed(f)
    }
}

type StepResult = Result<(), StepError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Records a new migration of `req.db`. Refused while one runs for the database (the
/// last one, finished, is replaced), to the replica set the database is on, or to one
/// that does not exist.
pub async fn start(world: &dyn MigrationWorld, req: &StartRequest) -> Result<MigrationRecord, StartError> {
    let db = req.db.as_str();
    let failed = |failure| StartError::World { db: db.to_owned(), failure };
    let Some((route, _)) = world.route(db).await.map_err(failed)? else {
        return Err(StartError::NoRoute(db.to_owned()));
    };
    if route.replica_set == req.to_replica_set {
        return Err(StartError::AlreadyThere { db: db.to_owned(), replica_set: route.replica_set });
    }
    let existing = world.record(db).await.map_err(failed)?;
    if let Some((r, _)) = &existing
        && !r.step.is_final()
    {
        return Err(StartError::AlreadyMigrating {
            db: db.to_owned(),
            from: r.from_replica_set.clone(),
            to: r.to_replica_set.clone(),
            phase: r.phase,
        });
    }
    if world.replica_set(&req.namespace, &req.to_replica_set).await.map_err(failed)?.is_none() {
        return Err(StartError::UnknownReplicaSet(req.to_replica_set.clone()));
    }
    let now = now_ms();
    let id = format!("{db}-{now:x}-{:08x}", rand::random::<u32>());
    let record =
        MigrationRecord::new(id, db, &req.namespace, &route.replica_set, &req.to_replica_set, route.epoch, now);
    match world.save_record(&record, existing.map(|(_, rev)| rev)).await.map_err(failed)? {
        Some(_) => {
            tracing::info!(db, from = %record.from_replica_set, to = %record.to_replica_set, id = %record.id, "migration started");
            Ok(record)
        }
        // Another start won the race.
        None => Err(StartError::AlreadyMigrating {
            db: db.to_owned(),
            from: record.from_replica_set,
            to: record.to_replica_set,
            phase: Phase::Copying,
        }),
    }
}

/// Stops a migration that has not reached the switch: it rolls back (the next driver run
/// carries the abort out) and is not retried. `false` when it is too late (or finished).
pub async fn cancel(world: &dyn MigrationWorld, db: &str, reason: &str) -> Result<bool, Failure> {
    let Some((mut record, revision)) = world.record(db).await? else { return Ok(false) };
    if record.step.is_final() || record.step >= Step::Switch && record.step != Step::Abort {
        return Ok(false);
    }
    record.error = Some(format!("cancelled: {reason}"));
    if record.step == Step::Copy && record.next_retry_ms.is_some() {
        // Between attempts: already rolled back.
        record.next_retry_ms = None;
        record.finished_at_ms = Some(now_ms());
        record.set_step(Step::Aborted);
    } else {
        if record.step != Step::Abort {
            record.aborted_from = Some(record.step);
        }
        // No attempt after this one.
        record.cancelled = true;
        record.set_step(Step::Abort);
    }
    Ok(world.save_record(&record, Some(revision)).await?.is_some())
}

/// Drives the migration of `db` from its record until it completes, aborts for good, has
/// to wait, or another driver takes it over.
pub async fn drive(world: &dyn MigrationWorld, tuning: &Tuning, db: &str) -> Result<Outcome, MigrationError> {
    let loaded = world.record(db).await.map_err(|failure| MigrationError::Record { db: db.to_owned(), failure })?;
    let Some((record, revision)) = loaded else { return Err(MigrationError::NotFound(db.to_owned())) };
    Run {
        world,
        tuning,
        persisted_step: record.step,
        rec: record,
        revision,
        failing_since: None,
        rate: 0.0,
        collections: None,
        leaders: Mutex::new(BTreeMap::new()),
        hold_marks: Vec::new(),
    }
    .run()
    .await
}

/// One driver's pass over one migration.
struct Run<'a> {
    world: &'a dyn MigrationWorld,
    tuning: &'a Tuning,
    rec: MigrationRecord,
    revision: u64,
    /// When the current step started failing (a success clears it).
    failing_since: Option<u64>,
    /// Oplog positions per second the catch-up advances (a moving average).
    rate: f64,
    /// The collections the target was last sent.
    collections: Option<Vec<ExportedCollection>>,
    /// The step of the record as etcd has it (see [`Run::save`]).
    persisted_step: Step,
    /// Each replica set's leader as last found: finding it asks every member for its
    /// status, a round trip the hold should not pay at each step. Forgotten when a step
    /// fails (a leader change shows as a failure).
    leaders: Mutex<BTreeMap<String, ReplicaSetAccess>>,
    /// When each part of the hold ended (this driver's own hold only): logged at the
    /// switch, to see where a long hold went.
    hold_marks: Vec<(&'static str, Instant)>,
}

impl Run<'_> {
    async fn run(mut self) -> Result<Outcome, MigrationError> {
        loop {
            match plan::on_resume(&self.rec, now_ms()) {
                Resume::Finished => {
                    return Ok(if self.rec.step == Step::Done { Outcome::Completed } else { Outcome::Aborted });
                }
                Resume::WaitUntil(at) => return Ok(Outcome::WaitUntil(at)),
                Resume::Abort(reason) => {
                    self.begin_abort(reason);
                    match self.save().await {
                        Err(StepError::Superseded) => return Ok(Outcome::Superseded),
                        // Carried out from memory; the next save records it.
                        _ => continue,
                    }
                }
                Resume::Continue => {}
            }
            let step = self.rec.step;
            let result = match step {
                Step::Copy => self.copy().await,
                Step::CatchUp => self.catch_up().await,
                Step::Hold => self.hold().await,
                Step::Fence => self.fence().await,
                Step::Verify => self.verify().await,
                Step::Switch => self.switch().await,
                Step::CleanUp => self.clean_up().await,
                Step::Abort => self.abort().await,
                Step::Done | Step::Aborted => Ok(()),
            };
            match result {
                Ok(()) => {
                    self.failing_since = None;
                    if self.rec.step != step {
                        tracing::info!(db = %self.rec.db, from = step.name(), to = self.rec.step.name(), "migration step done");
                    }
                }
                Err(StepError::Crashed(at)) => return Err(MigrationError::Crashed(at)),
                Err(StepError::Superseded) => return Ok(Outcome::Superseded),
                Err(StepError::Failed(failure)) => {
                    self.forget_leaders();
                    if let Err(StepError::Superseded) = self.react(failure).await {
                        return Ok(Outcome::Superseded);
                    }
                }
            }
        }
    }

    /// What `plan::on_failure` says to do about a step's failure.
    async fn react(&mut self, failure: Failure) -> StepResult {
        let now = now_ms();
        let since = *self.failing_since.get_or_insert(now);
        let step = self.rec.step;
        match plan::on_failure(step, &failure, since, self.rec.hold_deadline_ms, now, self.tuning) {
            Reaction::Retry(pause) => {
                tracing::warn!(db = %self.rec.db, step = step.name(), error = %failure, "migration step failed; trying again");
                let message = format!("{}: {failure}", step.name());
                if self.rec.error.as_deref() != Some(message.as_str()) {
                    self.rec.error = Some(message);
                    self.save_or_superseded().await?;
                }
                tokio::time::sleep(pause).await;
            }
            Reaction::RestartCopy => {
                tracing::warn!(db = %self.rec.db, step = step.name(), error = %failure, "migration copy starts over");
                self.rec.error = Some(format!("{}: {failure}; the copy starts over", step.name()));
                self.rec.restart_copy();
                self.collections = None;
                self.failing_since = None;
                self.save_or_superseded().await?;
            }
            Reaction::Abort(reason) => {
                tracing::warn!(db = %self.rec.db, step = step.name(), reason = %reason, "migration aborts");
                self.begin_abort(reason);
                self.save_or_superseded().await?;
            }
        }
        Ok(())
    }

    fn begin_abort(&mut self, reason: String) {
        if self.rec.step != Step::Abort {
            self.rec.aborted_from = Some(self.rec.step);
        }
        self.rec.error = Some(reason);
        self.failing_since = None;
        self.rec.set_step(Step::Abort);
    }

    /// Persists the record if no other driver changed it since this one last did.
    async fn save(&mut self) -> StepResult {
        let saved = self.world.save_record(&self.rec, Some(self.revision)).await;
        let saved = match saved {
            Ok(saved) => saved,
            Err(failure) => {
                // `Fence` and `Switch` are entered only once etcd says so: an abort after a
                // restart reads the record to know whether the fence may be in force, and
                // nothing may abort once the target serves. Not persisted, the step is the
                // one etcd has, so its side effect does not run ahead of the record.
                if matches!(self.rec.step, Step::Fence | Step::Switch) && self.persisted_step != self.rec.step {
                    self.rec.set_step(self.persisted_step);
                }
                return Err(failure.into());
            }
        };
        match saved {
            Some(revision) => {
                self.revision = revision;
                self.persisted_step = self.rec.step;
                Ok(())
            }
            None => {
                tracing::warn!(db = %self.rec.db, "another control plane changed the migration record; stopping");
                Err(StepError::Superseded)
            }
        }
    }

    /// A save whose failure other than a takeover is left to the next one.
    async fn save_or_superseded(&mut self) -> StepResult {
        match self.save().await {
            Err(StepError::Superseded) => Err(StepError::Superseded),
            _ => Ok(()),
        }
    }

    /// Replica set `name` with its leader (as last found: see [`Run::leaders`]).
    async fn replica_set(&self, name: &str) -> Result<ReplicaSetAccess, Failure> {
        if let Some(known) = self.leaders.lock().ok().and_then(|l| l.get(name).cloned()) {
            return Ok(known);
        }
        let found = self
            .world
            .replica_set(&self.rec.namespace, name)
            .await?
            .ok_or_else(|| Failure::Gone(format!("replica set {name} no longer exists")))?;
        if let Ok(mut leaders) = self.leaders.lock() {
            leaders.insert(name.to_owned(), found.clone());
        }
        Ok(found)
    }

    fn forget_leaders(&self) {
        if let Ok(mut leaders) = self.leaders.lock() {
            leaders.clear();
        }
    }

    /// Logs how long each part of this driver's hold took (nothing after a restart in the
    /// hold: its first parts are not known).
    fn log_hold_timeline(&self) {
        let Some(first) = self.hold_marks.first() else { return };
        let mut last = first.1;
        let parts: Vec<String> = self.hold_marks[1..]
            .iter()
            .map(|(part, at)| {
                let took = at.duration_since(last);
                last = *at;
                format!("{part} +{} ms", took.as_millis())
            })
            .collect();
        tracing::info!(db = %self.rec.db, total_ms = last.duration_since(first.1).as_millis() as u64,
            "hold timeline (from the route held): {}", parts.join(", "));
    }

    /// Marks the end of a part of the hold (see [`Run::hold_marks`]).
    fn hold_mark(&mut self, part: &'static str) {
        self.hold_mark_at(part, Instant::now());
    }

    /// [`Run::hold_mark`], for a part that ended at `at`.
    fn hold_mark_at(&mut self, part: &'static str, at: Instant) {
        if self.rec.hold_started_ms.is_some() {
            self.hold_marks.push((part, at));
        }
    }

    fn import(&self, step: ImportStep) -> ImportRequest {
        ImportRequest { db: self.rec.db.clone(), migration: self.rec.id.clone(), step }
    }

    /// The route of the database, which a migration cannot go on without.
    async fn route(&self) -> Result<(Route, u64), Failure> {
        self.world
            .route(&self.rec.db)
            .await?
            .ok_or_else(|| Failure::Gone(format!("database {} has no route", self.rec.db)))
    }

    /// Renews the source's oplog pin once half its lifetime is gone.
    async fn renew_pin(&mut self, src: &ReplicaSetAccess) -> StepResult {
        let Some(expires_ms) = plan::pin_renewal(self.rec.pin_expires_ms, now_ms(), self.tuning.pin_ttl) else {
            return Ok(());
        };
        let Some(from_index) = self.rec.first_page_index else { return Ok(()) };
        let req = PinOplogRequest { name: self.rec.id.clone(), from_index, expires_ms };
        self.world.pin_oplog(src, &req).await?;
        self.rec.pin_expires_ms = Some(req.expires_ms);
        Ok(())
    }

    /// Copy: `Begin` on the target (dropping an earlier attempt), then the source's
    /// export page by page, each page's collections and documents imported. The cursor is
    /// persisted after each page; the first page's index is where the catch-up starts and
    /// what the source's oplog is pinned from. Paced by `plan::CopyPacer` on each page's
    /// export and import times: the copy yields to the tenants of both replica sets.
    async fn copy(&mut self) -> StepResult {
        if self.rec.next_retry_ms.take().is_some() {
            // The next attempt's time has come.
            self.rec.attempt = self.rec.attempt.saturating_add(1);
            self.rec.set_step(Step::Copy);
        }
        let src = self.replica_set(&self.rec.from_replica_set).await?;
        let dst = self.replica_set(&self.rec.to_replica_set).await?;
        if self.rec.first_page_index.is_none() {
            failpoint!("migration-copy-before");
            self.world.import(&dst, &self.import(ImportStep::Begin)).await?;
            failpoint!("migration-copy-begun");
        }
        let started = Instant::now();
        let mut pacer = plan::CopyPacer::new(self.tuning);
        loop {
            let req = ExportRequest {
                db: self.rec.db.clone(),
                part: ExportPart::Documents,
                after: self.rec.copy_cursor.clone(),
                max_bytes: self.tuning.page_bytes,
                since_ms: None,
            };
            let exporting = Instant::now();
            let page = self.world.export(&src, &req).await?;
            let mut took = exporting.elapsed();
            if self.rec.first_page_index.is_none() {
                self.rec.first_page_index = Some(page.index);
                self.rec.oplog_position = Some(OplogPosition::end_of(page.index));
            }
            // Renewed while the copy runs: a copy longer than the pin's lifetime keeps the
            // oplog it will read.
            self.renew_pin(&src).await?;
            if self.collections.as_ref() != Some(&page.collections) {
                let step = ImportStep::Collections { collections: page.collections.clone() };
                self.world.import(&dst, &self.import(step)).await?;
                self.collections = Some(page.collections);
            }
            let documents = page.docs.len() as u64;
            let bytes: u64 = page.docs.iter().map(|d| d.doc.get().len() as u64).sum();
            if !page.docs.is_empty() {
                let importing = Instant::now();
                self.world.import(&dst, &self.import(ImportStep::Docs { docs: page.docs })).await?;
                took += importing.elapsed();
            }
            failpoint!("migration-copy-page");
            self.rec.documents_copied += documents;
            self.rec.bytes_copied += bytes;
            self.rec.copy_cursor = page.next;
            let done = self.rec.copy_cursor.is_none();
            if done {
                failpoint!("migration-copy-after");
                // The catch-up's budget counts from here, saved with the step.
                self.rec.catch_up_started_ms = Some(now_ms());
                self.rec.set_step(Step::CatchUp);
            }
            self.save().await?;
            if done {
                return Ok(());
            }
            tokio::time::sleep(self.pace(&mut pacer, started, took, bytes)).await;
        }
    }

    /// The pause after a page of `bytes` that took `took`, from the copy's `pacer`
    /// (`started`: when the pass began); the rate it copies at now is logged (debug).
    fn pace(&self, pacer: &mut plan::CopyPacer, started: Instant, took: Duration, bytes: u64) -> Duration {
        let pause = pacer.page(started.elapsed(), took, bytes);
        tracing::debug!(
            db = %self.rec.db,
            rate_bytes_per_sec = pacer.rate(),
            page_ms = took.as_millis() as u64,
            base_ms = pacer.base().map(|b| b.as_millis() as u64),
            pause_ms = pause.as_millis() as u64,
            "migration copy paced"
        );
        pause
    }

    /// Catch-up: the source's oplog of the database from the persisted position, applied
    /// on the target, until `plan::catch_up_next` says the rest fits in the hold, or that
    /// the attempt's budget (`Tuning::catch_up_timeout`, counted from the persisted
    /// `catch_up_started_ms`: a restarted control plane does not start it over) is spent:
    /// then the attempt aborts ([`Failure::CatchUpTooSlow`]). Not paced (only its
    /// idempotency passes are): it must outpace the tenant's writes, or the hold never
    /// comes; it reads what the tenant wrote, a load the tenant itself sets.
    async fn catch_up(&mut self) -> StepResult {
        let src = self.replica_set(&self.rec.from_replica_set).await?;
        let dst = self.replica_set(&self.rec.to_replica_set).await?;
        // No position: a record from before the copy finished; start over.
        let mut pos = self.rec.oplog_position.ok_or(Failure::OplogTruncated)?;
        // A record from before the budget existed: counted from now.
        let began = *self.rec.catch_up_started_ms.get_or_insert_with(now_ms);
        // The first lag this driver saw, for the trend a give-up reports.
        let mut first_lag: Option<(u64, Instant)> = None;
        // A round was close enough, but its idempotency pass too long to hold after.
        let mut pass_too_slow = false;
        if self.rec.idempotency_since_ms.is_none() {
            // All of them once, throttled like the copy (the last ten minutes of keyed
            // writes: too many to move inside the hold).
            self.rec.idempotency_since_ms = Some(self.copy_idempotency(&src, &dst, None, None).await?);
            self.save().await?;
        }
        let (mut saved, mut passed) = (Instant::now(), Instant::now());
        // The page after the one being imported, read while it is.
        let mut ahead: Option<DbOplogPage> = None;
        loop {
            self.renew_pin(&src).await?;
            let round = Instant::now();
            let page = match ahead.take() {
                Some(page) => page,
                None => self.world.oplog(&src, &self.rec.db, pos, self.tuning.oplog_page).await?,
            };
            let changes = page.entries.len();
            let next = page.next.max(pos);
            let mut applied = page.applied_index;
            if changes > 0 {
                let ops = self.import(ImportStep::Ops { entries: page.entries });
                let (_, following) = tokio::try_join!(
                    self.world.import(&dst, &ops),
                    self.world.oplog(&src, &self.rec.db, next, self.tuning.oplog_page),
                )?;
                applied = applied.max(following.applied_index);
                ahead = Some(following);
            }
            failpoint!("migration-catchup-page");
            self.observe_rate(next.index - pos.index, round.elapsed());
            pos = next;
            self.rec.oplog_position = Some(pos);
            self.rec.lag_ops = applied.saturating_sub(pos.index);
            let first = *first_lag.get_or_insert((self.rec.lag_ops, Instant::now()));
            let view = plan::CatchUpView {
                lag: self.rec.lag_ops,
                rate_per_sec: self.rate,
                elapsed: Duration::from_millis(now_ms().saturating_sub(began)),
                first_lag: Some((first.0, first.1.elapsed())),
                pass_too_slow,
            };
            let ready = match plan::catch_up_next(&view, self.tuning) {
                plan::CatchUpNext::Hold => true,
                plan::CatchUpNext::Continue => false,
                plan::CatchUpNext::GiveUp(reason) => return Err(Failure::CatchUpTooSlow(reason).into()),
            };
            if ready || passed.elapsed() >= IDEMPOTENCY_PASS_EVERY {
                // The records written since the last pass, so the hold moves only the
                // last moments' (the fence closes the set). Passes keep coming while the
                // catch-up runs, so none is long.
                let pass = Instant::now();
                let since = self.rec.idempotency_since_ms;
                self.rec.idempotency_since_ms = Some(self.copy_idempotency(&src, &dst, since, None).await?);
                passed = Instant::now();
                // A pass long enough for the oplog to fall behind again: caught up first.
                if ready && pass.elapsed() < plan::HOLD_AFTER_A_PASS_UNDER {
                    failpoint!("migration-catchup-after");
                    self.rec.set_step(Step::Hold);
                    return self.save().await;
                }
                pass_too_slow |= ready;
            }
            if saved.elapsed() >= Duration::from_secs(1) {
                self.save().await?;
                saved = Instant::now();
            }
            if changes == 0 {
                tokio::time::sleep(self.tuning.poll).await;
            }
        }
    }

    /// Copies the source's idempotency records written from `since` (replica-set clock,
    /// ms; all of them without it) to the target, page by page. The first pass (all of
    /// them: up to the idempotency window's worth) is paced like the copy, with a pacer of
    /// its own (these pages cost otherwise than documents); the later ones move what a
    /// couple of seconds of writes left, unpaced, or the hold would wait for them. With
    /// `at_least`, every page must come from a snapshot that has applied that index (the
    /// fence: a source leader that has not applied it yet could miss the last records).
    /// Returns the first page's clock: every record written after the pass began has a
    /// time at or after it.
    async fn copy_idempotency(
        &self,
        src: &ReplicaSetAccess,
        dst: &ReplicaSetAccess,
        since: Option<u64>,
        at_least: Option<u64>,
    ) -> Result<u64, StepError> {
        let started = Instant::now();
        let mut pacer = plan::CopyPacer::new(self.tuning);
        let (mut after, mut first_clock) = (None, None);
        loop {
            let req = ExportRequest {
                db: self.rec.db.clone(),
                part: ExportPart::Idempotency,
                after: after.clone(),
                max_bytes: self.tuning.page_bytes,
                since_ms: since,
            };
            let exporting = Instant::now();
            let page = self.world.export(src, &req).await?;
            let mut took = exporting.elapsed();
            if let Some(index) = at_least
                && page.index < index
            {
                return Err(Failure::Transient(format!(
                    "the source's leader has applied up to {} only, not the fence at {index} yet",
                    page.index
                ))
                .into());
            }
            first_clock.get_or_insert(page.clock_ms);
            let bytes: u64 = page.idempotency.iter().map(|r| r.record.get().len() as u64 + r.key.len() as u64).sum();
            if !page.idempotency.is_empty() {
                let step = ImportStep::Idempotency { records: page.idempotency };
                let importing = Instant::now();
                self.world.import(dst, &self.import(step)).await?;
                took += importing.elapsed();
            }
            after = page.next;
            if after.is_none() {
                return Ok(first_clock.unwrap_or_default());
            }
            if since.is_none() {
                tokio::time::sleep(self.pace(&mut pacer, started, took, bytes)).await;
            }
        }
    }

    fn observe_rate(&mut self, advanced: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if secs <= 0.0 || advanced == 0 {
            return;
        }
        let now = advanced as f64 / secs;
        self.rate = if self.rate > 0.0 { 0.7 * self.rate + 0.3 * now } else { now };
    }

    /// Hold: the route `Holding` with a deadline (its earlier acknowledgements cleared in
    /// the same transaction), then every registered gateway's acknowledgement. The
    /// deadline is persisted before the route says it.
    async fn hold(&mut self) -> StepResult {
        // Found again for the hold: the route the switch writes names the target's members
        // as they are now, not as they were when the copy started.
        self.forget_leaders();
        self.hold_marks.clear();
        let (route, revision) = self.route().await?;
        self.check_route_is_ours(&route)?;
        // The hold as written (its deadline is what tells this attempt's acknowledgements
        // from an earlier one's at the same epoch).
        let held = match route.state {
            RouteState::Serving => {
                let now = now_ms();
                let deadline = now + self.tuning.hold_timeout.as_millis() as u64;
                self.rec.hold_started_ms = Some(now);
                self.rec.hold_deadline_ms = Some(deadline);
                self.save().await?;
                failpoint!("migration-hold-before");
                let held = Route {
                    state: RouteState::Holding,
                    hold_deadline_ms: Some(deadline),
                    hold_timeout_ms: Some(self.tuning.hold_timeout.as_millis() as u64),
                    ..route
                };
                if !self.world.swap_route(&self.rec.db, revision, &held, true).await? {
                    return Err(Failure::Transient("the route changed while the hold was written".into()).into());
                }
                failpoint!("migration-hold-after");
                // The route's swap compares the route, not the record: a cancel (or another
                // driver) that changed the record meanwhile and found the route still
                // serving would leave this hold with no one to end it. Saved again to know.
                if let Err(StepError::Superseded) = self.save().await {
                    self.release_hold(&held).await;
                    return Err(StepError::Superseded);
                }
                self.hold_mark("route held");
                held
            }
            RouteState::Holding => {
                if self.rec.hold_deadline_ms.is_none() {
                    self.rec.hold_deadline_ms = route.hold_deadline_ms;
                }
                route
            }
        };
        loop {
            let view = self.world.hold_view(&self.rec.db).await?;
            let Err(missing) = plan::hold_acknowledged(&view.gateways, &view.acks, &held) else { break };
            if !plan::within_hold(self.rec.hold_deadline_ms, now_ms()) {
                let message = format!("gateways {} did not acknowledge the hold", missing.join(", "));
                return Err(Failure::HoldTimedOut(message).into());
            }
            // Every moment here is a moment the tenant's requests wait: looked at often (an
            // etcd read of a few keys).
            tokio::time::sleep(self.tuning.poll.min(HOLD_POLL)).await;
        }
        self.hold_mark("gateways acknowledged");
        // Written before the fence is sent: an abort from here on assumes it may be in force.
        self.rec.set_step(Step::Fence);
        self.save().await
    }

    /// Puts the route back to `Serving` if it is still the hold `held` this driver wrote
    /// (best effort: the driver that superseded this one, or the gateways' bound on a
    /// hold's length, ends it otherwise).
    async fn release_hold(&self, held: &Route) {
        let Ok(Some((route, revision))) = self.world.route(&self.rec.db).await else { return };
        if &route != held {
            return;
        }
        let back = Route { state: RouteState::Serving, hold_deadline_ms: None, hold_timeout_ms: None, ..route.clone() };
        match self.world.swap_route(&self.rec.db, revision, &back, true).await {
            Ok(true) => tracing::info!(db = %self.rec.db, "superseded while holding: the hold released"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(db = %self.rec.db, error = %e, "superseded while holding; failed to release the hold")
            }
        }
    }

    fn check_route_is_ours(&self, route: &Route) -> Result<(), Failure> {
        if route.replica_set == self.rec.from_replica_set && route.epoch == self.rec.from_epoch {
            return Ok(());
        }
        Err(Failure::Refused(format!(
            "the route of {} moved under the migration (now {} at epoch {}, expected {} at epoch {})",
            self.rec.db, route.replica_set, route.epoch, self.rec.from_replica_set, self.rec.from_epoch
        )))
    }

    fn check_hold(&self, at: &str) -> Result<(), Failure> {
        if plan::within_hold(self.rec.hold_deadline_ms, now_ms()) {
            return Ok(());
        }
        Err(Failure::HoldTimedOut(format!("the deadline passed {at}")))
    }

    /// Fence: the source's route epoch raised to `from_epoch + 1` through its Raft log;
    /// the entry's index is the final index. Not persisted on its own (the hold waits on
    /// every etcd round): a driver that resumes at `Fence` fences again, which only adds an
    /// entry at a later index; the switch's record carries the index.
    async fn fence(&mut self) -> StepResult {
        self.check_hold("before the fence")?;
        let src = self.replica_set(&self.rec.from_replica_set).await?;
        failpoint!("migration-fence-before");
        let answer = self.world.fence(&src, &self.rec.db, self.rec.from_epoch + 1).await?;
        failpoint!("migration-fence-after");
        let index = answer.index.ok_or_else(|| {
            Failure::Refused(
                "the source's datanode did not answer the fence's log index (too old for migrations)".into(),
            )
        })?;
        self.hold_mark("fenced");
        self.rec.fence_index = Some(index);
        self.rec.set_step(Step::Verify);
        Ok(())
    }

    /// Verify: the oplog applied through the fence index and the idempotency records
    /// moved (at once: neither needs the other), then a checksum marker on each side:
    /// documents, checksum and catalog must agree. The source's marker is sent with the
    /// catch-up: fenced, its copy of the database no longer changes. Its last act, while
    /// the deadline has not passed, is the record saying `Switch`: from then on the
    /// migration only goes forward.
    async fn verify(&mut self) -> StepResult {
        let fence_index =
            self.rec.fence_index.ok_or_else(|| Failure::Refused("verify without a fence index".into()))?;
        let src = self.replica_set(&self.rec.from_replica_set).await?;
        let dst = self.replica_set(&self.rec.to_replica_set).await?;
        let start = self.rec.oplog_position.ok_or(Failure::OplogTruncated)?;
        let since = self.rec.idempotency_since_ms;
        let target = async {
            let (pos, _) = tokio::try_join!(
                self.catch_up_to(&src, &dst, start, fence_index),
                self.copy_idempotency(&src, &dst, since, Some(fence_index)),
            )?;
            let caught_up = Instant::now();
            self.check_hold("after the catch-up to the fence")?;
            let marker = self.world.checksum(&dst, &self.rec.db).await?;
            Ok::<_, StepError>((pos, marker, caught_up))
        };
        // The backups' lineages are read meanwhile (etcd), not after: the hold waits.
        let (checked, lineages) = tokio::join!(
            async { tokio::try_join!(async { Ok(self.world.checksum(&src, &self.rec.db).await?) }, target) },
            self.lineages()
        );
        let (source, (pos, target, caught_up)) = checked?;
        tracing::info!(db = %self.rec.db, positions = fence_index.saturating_sub(start.index),
            "oplog positions caught up to the fence in the hold");
        self.rec.oplog_position = Some(pos);
        self.rec.lag_ops = 0;
        self.hold_mark_at("caught up to the fence", caught_up);
        self.hold_mark("checksummed");
        failpoint!("migration-verify-caughtup");
        failpoint!("migration-verify-idempotency");
        let mut differences = Vec::new();
        if source.documents != target.documents {
            differences
                .push(format!("documents {} on the source, {} on the target", source.documents, target.documents));
        }
        if source.checksum != target.checksum {
            differences.push(format!("checksum {} on the source, {} on the target", source.checksum, target.checksum));
        }
        // A datanode from before catalog digests answers none (or `""`): compared only
        // when both sides have one.
        let known = |c: &Option<serde_json::Value>| c.clone().filter(|v| !v.is_null() && v.as_str() != Some(""));
        if let (Some(a), Some(b)) = (known(&source.catalog), known(&target.catalog))
            && a != b
        {
            differences.push(format!("catalog {a} on the source, {b} on the target"));
        }
        if !differences.is_empty() {
            return Err(Failure::Mismatch(differences.join("; ")).into());
        }
        // The join of the backups' oplog across the move: every change of the database on the
        // source is before the fence entry, and the target has none of it before its marker
        // (it was incoming: no command on it writes an oplog change), where the states were
        // just found equal.
        self.rec.handoff = lineages.map(|(from, to)| Handoff {
            from,
            from_position: OplogPosition { index: fence_index, seq: 0 },
            to,
            to_position: OplogPosition { index: target.index, seq: 0 },
        });
        self.check_hold("after the verification")?;
        failpoint!("migration-verify-after");
        self.rec.set_step(Step::Switch);
        self.save().await?;
        self.hold_mark("switch recorded");
        Ok(())
    }

    /// The backups' oplog lineages of the source and of the target
    /// (`backup::agent::lineage_of`), for the handoff the verification records; `None`
    /// (logged) when they cannot be read: the move goes on without one, and the backup
    /// archiver takes a full on arrival instead.
    async fn lineages(&self) -> Option<(Lineage, Lineage)> {
        let ns = &self.rec.namespace;
        let (from, to) = (&self.rec.from_replica_set, &self.rec.to_replica_set);
        let read = async {
            let (a, b) = tokio::try_join!(
                self.world.replica_set_incarnation(ns, from),
                self.world.replica_set_incarnation(ns, to)
            )
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((
                lineage_of(from, a).map_err(|e| e.to_string())?,
                lineage_of(to, b).map_err(|e| e.to_string())?,
            ))
        };
        match read.await {
            Ok(lineages) => Some(lineages),
            Err(e) => {
                tracing::warn!(db = %self.rec.db, error = %e,
                    "failed to read the replica sets' oplog lineages: the move records no backup handoff, a full is taken on arrival");
                None
            }
        }
    }

    /// The source's oplog of the database from `pos` applied on the target up to the
    /// fence at `fence_index`, within the hold's deadline; returns the position reached.
    async fn catch_up_to(
        &self,
        src: &ReplicaSetAccess,
        dst: &ReplicaSetAccess,
        mut pos: OplogPosition,
        fence_index: u64,
    ) -> Result<OplogPosition, StepError> {
        while pos.index < fence_index {
            self.check_hold("catching up to the fence")?;
            let page = self.world.oplog(src, &self.rec.db, pos, self.tuning.oplog_page).await?;
            let empty = page.entries.is_empty();
            if !empty {
                self.world.import(dst, &self.import(ImportStep::Ops { entries: page.entries })).await?;
            }
            if empty && page.next <= pos {
                tokio::time::sleep(self.tuning.poll.min(HOLD_POLL)).await;
            }
            pos = page.next.max(pos);
        }
        Ok(pos)
    }

    /// Switch: `Finish{from_epoch + 1}` on the target (it serves the database from then
    /// on), then one transaction: the route names the target at `from_epoch + 1`,
    /// `Serving`, if it is still the route this migration holds. Tried until it works.
    async fn switch(&mut self) -> StepResult {
        let epoch = self.rec.from_epoch + 1;
        let dst = self.replica_set(&self.rec.to_replica_set).await?;
        failpoint!("migration-switch-before");
        // The route read with the `Finish` (the swap compares its revision anyway).
        let finish = self.import(ImportStep::Finish { epoch });
        let (_, route) = tokio::try_join!(self.world.import(&dst, &finish), self.world.route(&self.rec.db))?;
        failpoint!("migration-switch-finished");
        self.hold_mark("target finished");
        let Some((route, revision)) = route else {
            // The database was deleted meanwhile (its instance with it): nothing to switch
            // to, and the target's copy is no one's. The deletion drops the source's. Bounded
            // by the epoch `Finish` set: a new instance of the name placed on the target
            // since then wrote there at a newer epoch, and keeps its data.
            if let DropOutcome::Kept { epoch: known } =
                self.world.drop_database(&dst, &self.rec.db, Some(epoch)).await?
            {
                tracing::info!(db = %self.rec.db, replica_set = %dst.name, epoch = ?known,
                    "the target serves a newer route of the database: its data kept");
            }
            self.rec.error = Some("the database was deleted during the switch: its copy on the target dropped".into());
            self.rec.finished_at_ms = Some(now_ms());
            self.rec.set_step(Step::Aborted);
            return self.save().await;
        };
        let switched = route.replica_set == self.rec.to_replica_set && route.epoch >= epoch;
        if !switched {
            self.check_route_is_ours(&route)
                .map_err(|e| Failure::Transient(format!("{e}; a person must look: the target serves already")))?;
            let new = Route {
                replica_set: self.rec.to_replica_set.clone(),
                members: dst.members.clone(),
                epoch,
                state: RouteState::Serving,
                hold_deadline_ms: None,
                hold_timeout_ms: None,
            };
            if !self.world.swap_route(&self.rec.db, revision, &new, true).await? {
                return Err(Failure::Transient("the route changed while it was switched".into()).into());
            }
        }
        failpoint!("migration-switch-after");
        self.hold_mark("route switched");
        self.log_hold_timeline();
        let now = now_ms();
        self.rec.hold_ms = self.rec.hold_started_ms.map(|s| now.saturating_sub(s));
        self.rec.next_retry_ms = Some(now + self.tuning.cleanup_grace.as_millis() as u64);
        // Switched: what went wrong on the way (an earlier attempt's abort, a member that
        // did not answer for a while) is no longer the migration's state.
        self.rec.error = None;
        self.rec.set_step(Step::CleanUp);
        self.save().await
    }

    /// Clean-up, after the grace period: the source's copy dropped (its route epoch stays,
    /// so a gateway with an old route is still refused), its oplog unpinned. The drop is
    /// bounded by the fence's epoch and decided in the source's Raft log: a new instance of
    /// the name placed on the source after the route was read here wrote at a newer
    /// epoch, and its data is kept.
    async fn clean_up(&mut self) -> StepResult {
        self.rec.next_retry_ms = None;
        match self.world.replica_set(&self.rec.namespace, &self.rec.from_replica_set).await? {
            // The source is gone: nothing of it to clean.
            None => {}
            Some(src) => {
                failpoint!("migration-cleanup-before");
                // A database that lives on the source again (moved back, or a new instance
                // of the name placed there) is not this migration's to drop.
                let back = self.world.route(&self.rec.db).await?.is_some_and(|(r, _)| r.replica_set == src.name);
                if back {
                    tracing::info!(db = %self.rec.db, replica_set = %src.name, "the database is served by the source again: its data kept");
                } else {
                    // The epoch the source was fenced at (`fence`): every write of this
                    // instance there was made at or below it.
                    let fence_epoch = self.rec.from_epoch + 1;
                    let outcome = self.world.drop_database(&src, &self.rec.db, Some(fence_epoch)).await?;
                    if outcome == DropOutcome::Dropped {
                        // The database's restore staging and verification scratch copies on
                        // the source: their jobs follow the route, so nothing else ever drops
                        // them there. Only once the database itself went: while a newer
                        // instance of the name lives there, they may be its own.
                        for copy in [restore_staging_db(&self.rec.db), verify_scratch_db(&self.rec.db)] {
                            self.world.drop_database(&src, &copy, Some(fence_epoch)).await?;
                        }
                    }
                    if let DropOutcome::Kept { epoch } = outcome {
                        // A new instance of the name placed there, most likely; a write made
                        // up with a far epoch otherwise: said where a person looks, since
                        // the copy then stays.
                        tracing::warn!(db = %self.rec.db, replica_set = %src.name, epoch = ?epoch, fence_epoch,
                            "a newer route of the database wrote on the source: its data there kept");
                        self.rec.error = Some(format!(
                            "the data on {} was kept, not dropped: a write of a newer route (epoch {}) applied \
                             there after the switch; drop it by hand if no instance of the name lives there",
                            src.name,
                            epoch.map(|e| e.to_string()).unwrap_or_else(|| "unknown".into())
                        ));
                    }
                }
                self.world.unpin_oplog(&src, &self.rec.id).await?;
                failpoint!("migration-cleanup-after");
            }
        }
        self.rec.finished_at_ms = Some(now_ms());
        self.rec.set_step(Step::Done);
        self.save().await
    }

    /// Abort: the route back to the source, `Serving`, at `from_epoch + 1` if the fence may
    /// have been committed (the fence is the new epoch), else as it was; then the target's
    /// import dropped (tried until the target answers) and the pin removed (best effort: a
    /// pin expires); then the next attempt is scheduled, or none.
    async fn abort(&mut self) -> StepResult {
        // The fence is sent only once the record says `Fence` (see `Run::save`).
        let fenced = self.rec.aborted_from.is_some_and(|s| s >= Step::Fence);
        let epoch = if fenced { self.rec.from_epoch + 1 } else { self.rec.from_epoch };
        if let Some((route, revision)) = self.world.route(&self.rec.db).await? {
            let ours = route.replica_set == self.rec.from_replica_set
                && (route.epoch == self.rec.from_epoch || route.epoch == epoch);
            let back = Route {
                epoch,
                state: RouteState::Serving,
                hold_deadline_ms: None,
                hold_timeout_ms: None,
                ..route.clone()
            };
            if ours && route != back {
                failpoint!("migration-abort-before");
                if !self.world.swap_route(&self.rec.db, revision, &back, true).await? {
                    return Err(Failure::Transient("the route changed while it was rolled back".into()).into());
                }
            } else if !ours {
                tracing::warn!(db = %self.rec.db, replica_set = %route.replica_set, epoch = route.epoch,
                    "the route is not the migration's: left as it is");
            }
        }
        failpoint!("migration-abort-routed");
        // The target's partial copy is dropped before the abort is over: a migration given
        // up for good has no next `Begin` to drop it. Tried again (each second, the error
        // in the status) while the target cannot be reached; the tenant is served by the
        // source meanwhile. A refusal other than unreachability is not retried (an import
        // already finished there only goes forward; nothing to drop).
        if let Some(dst) = self.world.replica_set(&self.rec.namespace, &self.rec.to_replica_set).await? {
            match self.world.import(&dst, &self.import(ImportStep::Abort)).await {
                Ok(_) => {}
                Err(e @ Failure::Transient(_)) => {
                    return Err(Failure::Transient(format!("failed to drop the target's partial copy: {e}")).into());
                }
                Err(e) => tracing::warn!(db = %self.rec.db, error = %e, "the target refused to drop its import"),
            }
        }
        if let Ok(Some(src)) = self.world.replica_set(&self.rec.namespace, &self.rec.from_replica_set).await
            && let Err(e) = self.world.unpin_oplog(&src, &self.rec.id).await
        {
            tracing::warn!(db = %self.rec.db, error = %e, "failed to unpin the source's oplog; the pin expires");
        }
        failpoint!("migration-abort-after");
        let now = now_ms();
        self.rec.from_epoch = epoch;
        self.rec.aborted_from = None;
        self.rec.restart_copy();
        self.collections = None;
        let after = if self.rec.cancelled {
            plan::AfterAbort::GiveUp
        } else {
            plan::after_abort(self.rec.attempt, now, self.tuning)
        };
        match after {
            plan::AfterAbort::RetryAt(at) => {
                self.rec.next_retry_ms = Some(at);
                self.rec.set_step(Step::Copy);
            }
            plan::AfterAbort::GiveUp => {
                self.rec.finished_at_ms = Some(now);
                self.rec.set_step(Step::Aborted);
            }
        }
        self.save().await
    }
}

/// Runs the recorded migrations, at most `tuning.max_concurrent` at once, each in its own
/// task, until `shutdown` resolves. The Kubernetes operator runs it on its elected leader;
/// the playground in its control plane.
pub struct Migrator {
    world: Arc<dyn MigrationWorld>,
    tuning: Tuning,
}

/// How often the hold looks for the gateways' acknowledgements, at most.
const HOLD_POLL: Duration = Duration::from_millis(5);

/// How often the catch-up moves the idempotency records written since its last pass (the
/// pass before the hold then holds only the last moments').
const IDEMPOTENCY_PASS_EVERY: Duration = Duration::from_secs(2);

/// How often the migrator looks for migrations to run.
pub const MIGRATOR_TICK: Duration = Duration::from_secs(1);

impl Migrator {
    pub fn new(world: Arc<dyn MigrationWorld>, tuning: Tuning) -> Migrator {
        Migrator { world, tuning }
    }

    pub async fn start(&self, req: &StartRequest) -> Result<MigrationRecord, StartError> {
        start(self.world.as_ref(), req).await
    }

    pub async fn cancel(&self, db: &str, reason: &str) -> Result<bool, Failure> {
        cancel(self.world.as_ref(), db, reason).await
    }

    /// The status of `db`'s migration (running, or the last one).
    pub async fn status(&self, db: &str) -> Result<Option<MigrationStatus>, Failure> {
        Ok(self.world.record(db).await?.map(|(r, _)| r.status()))
    }

    /// Every database's migration status.
    pub async fn statuses(&self) -> Result<BTreeMap<String, MigrationStatus>, Failure> {
        Ok(self.world.records().await?.into_iter().map(|(r, _)| (r.db.clone(), r.status())).collect())
    }

    /// Drives the migrations until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let mut running: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        tokio::pin!(shutdown);
        loop {
            running.retain(|_, task| !task.is_finished());
            match self.world.records().await {
                Ok(records) => {
                    let now = now_ms();
                    let waiting: Vec<(String, u64)> = records
                        .iter()
                        .filter(|(r, _)| !running.contains_key(&r.db))
                        .filter(|(r, _)| matches!(plan::on_resume(r, now), Resume::Continue | Resume::Abort(_)))
                        .map(|(r, _)| (r.db.clone(), r.started_at_ms))
                        .collect();
                    for db in plan::admit(&waiting, running.len(), self.tuning.max_concurrent) {
                        let me = self.clone();
                        let name = db.clone();
                        let task = tokio::spawn(async move {
                            match drive(me.world.as_ref(), &me.tuning, &name).await {
                                Ok(outcome) => tracing::info!(db = %name, ?outcome, "migration driver stopped"),
                                Err(e) => tracing::warn!(db = %name, error = %e, "migration driver failed"),
                            }
                        });
                        running.insert(db, task);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "failed to list the migrations"),
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(MIGRATOR_TICK) => {}
            }
        }
        for (_, task) in running {
            task.abort();
        }
    }
}
