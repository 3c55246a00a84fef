//! Applying a replicated [`Command`] to the state machine: computes the write batch
//! (documents, index entries, oplog entries, idempotency record) and the answer. Every
//! member runs this on the same entries in the same order and reaches the same state;
//! a refused command (duplicate key, invalid update, ...) changes nothing but the applied
//! index.

use std::collections::{HashMap, HashSet};

use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::limits::MAX_WRITE_PRODUCED_BYTES;
use nimbus_api::{ApiError, ErrorCode};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::catalog::CollectionMeta;
use super::checksum::{ChecksumAt, DocSum, checksum_key};
use super::command::{Command, WriteAnswer, WriteOp, WriteResult};
use super::engine::{Engine, StoreError, decode, encode, importing, stale_route};
use super::gc::GC_EVERY;
use super::index::{encode_id, index_keys};
use super::keys::{self, CF_CATALOG, CF_DOCS, CF_IDEM, CF_IDEM_TTL, CF_IDX, CF_OPLOG};
use super::read::{Budget, QueryError, View, Want};
use crate::doc::keycode::prefix_end;
use crate::doc::validate::{check_document, check_parsed};
use crate::query::update::ApplyCtx;
use crate::query::{Filter, SortSpec, Update};

/// The remembered answer of an idempotent write.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct IdemRecord {
    /// The command's own time: the record's lifetime counts from it.
    pub(crate) ts_ms: u64,
    /// The time the command applied at (`Engine::command_time`: never earlier than a
    /// command applied before it), the time of its `idem_ttl` entry: every record applied
    /// after a snapshot is there at or after the snapshot's clock, which a migration reads
    /// the last records by (`ExportRequest::since_ms`). Absent in older records (their
    /// entry has `ts_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) applied_ms: Option<u64>,
    result: WriteResult,
    /// The request's digest (see `Command::request_hash`); absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_hash: Option<String>,
}

impl IdemRecord {
    /// The time of the record's `idem_ttl` entry.
    pub(crate) fn entry_ms(&self) -> u64 {
        self.applied_ms.unwrap_or(self.ts_ms)
    }
}

/// Catalog changes of one command, installed in memory once its batch is written.
#[derive(Debug, Default)]
pub struct CatalogDelta {
    changes: Vec<(String, String, Option<CollectionMeta>)>,
    pub(crate) drop_db: Option<String>,
    pub(crate) route_epoch: Option<(String, u64)>,
    pub(crate) epoch_written: Option<(String, u64)>,
    /// The database's incoming mark set (`Some(migration)`) or cleared (`None`).
    pub(crate) incoming: Option<(String, Option<String>)>,
}

/// Tracks what the command being applied has already changed, so later steps of the same
/// command see it (duplicate `_id`s within one insert, unique keys moved between documents).
#[derive(Default)]
pub(crate) struct Pending {
    docs: HashSet<Vec<u8>>,
    /// index entry prefix (index prefix + key values) → encoded `_id` that now owns it
    pub(crate) unique_added: HashMap<Vec<u8>, Vec<u8>>,
    /// full index entry keys deleted by this command
    pub(crate) idx_removed: HashSet<Vec<u8>>,
    /// Documents an import step wrote or removed so far (storage key → the document now,
    /// `None` when removed): a step applies many changes in one batch, and a change must
    /// see the ones before it, which RocksDB shows only once the batch is written.
    pub(crate) overlay: HashMap<Vec<u8>, Option<Value>>,
    /// Collections dropped by this command: what storage still holds of them is gone.
    pub(crate) cleared: HashSet<String>,
    /// The whole database was dropped by this command.
    pub(crate) db_cleared: bool,
}

impl Pending {
    /// Forgets what this command wrote in collection `coll` (all of the database when
    /// `None`) and records it as dropped.
    pub(crate) fn clear(&mut self, coll: Option<&str>, coll_prefix: &[u8]) {
        match coll {
            Some(c) => {
                self.overlay.retain(|k, _| !k.starts_with(coll_prefix));
                self.cleared.insert(c.to_owned());
            }
            None => {
                self.overlay.clear();
                self.db_cleared = true;
            }
        }
    }
}

/// The command being applied: its batch, and what it changed so far.
pub(crate) struct Ctx<'a> {
    pub(crate) batch: &'a mut WriteBatch,
    pub(crate) index: u64,
    pub(crate) ts_ms: u64,
    seq: u32,
    /// Writes no oplog entries: an import step, or any command on a database being
    /// imported (its changes are the source's, not this replica set's).
    pub(crate) quiet: bool,
    /// Checks no unique index: an import holds the source's documents, possibly two
    /// versions of them while the copy is in progress (see `store::import`).
    pub(crate) unchecked: bool,
    pub(crate) db: &'a str,
    pub(crate) pending: Pending,
    pub(crate) metas: HashMap<String, CollectionMeta>,
    pub(crate) delta: CatalogDelta,
}

impl Ctx<'_> {
    /// Runs `f` on database `db` within this command's batch, as an ordinary write of
    /// `db` would apply: with oplog entries (stamped with this entry's index and time, after
    /// those it wrote so far) and its own view of `db`'s catalog, which is written and
    /// installed with the batch. Unique indexes are not checked (what `f` writes comes
    /// from a database that kept them). A restore's `Publish` writes its target this way
    /// while the entry is the staging database's.
    pub(crate) fn in_database<T>(
        &mut self,
        engine: &Engine,
        db: &str,
        f: impl FnOnce(&mut Ctx<'_>) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let mut other = Ctx {
            batch: &mut *self.batch,
            index: self.index,
            ts_ms: self.ts_ms,
            seq: self.seq,
            quiet: false,
            unchecked: true,
            db,
            pending: Pending::default(),
            metas: HashMap::new(),
            delta: CatalogDelta::default(),
        };
        let out = f(&mut other)?;
        let (seq, metas, changes) = (other.seq, other.metas, other.delta.changes);
        self.seq = seq;
        self.delta.changes.extend(changes);
        for (coll, meta) in metas {
            batch_catalog(engine, self.batch, db, &coll, Some(&meta));
            self.delta.changes.push((db.to_owned(), coll, Some(meta)));
        }
        Ok(out)
    }
}

impl Engine {
    /// Applies `cmd` (the entry at Raft `index`) into `batch`, which must be empty. The
    /// caller adds the applied log id to the batch, writes it, then calls
    /// [`Engine::commit`].
    pub fn apply_command(
        &self,
        batch: &mut WriteBatch,
        cmd: &Command,
        index: u64,
    ) -> Result<(WriteResult, CatalogDelta), StoreError> {
        // A sender with an outdated route is refused before anything else, the answer of an
        // earlier idempotent write included: the database has moved on.
        let incoming = self.catalog_read().incoming.contains_key(&cmd.db);
        if let Some(epoch) = cmd.route_epoch {
            let known = self.catalog_read().route_epoch(&cmd.db);
            if epoch < known {
                return Ok((Err(stale_route(&cmd.db, epoch, known)), CatalogDelta::default()));
            }
            // A client's write (it carries a route epoch) reached a database being imported
            // here: checked when it was proposed, but the import began in between.
            if incoming {
                return Ok((Err(importing(&cmd.db, epoch, known)), CatalogDelta::default()));
            }
        }
        let ts_ms = self.command_time(cmd.ts_ms);
        let idem = cmd.idempotency_key.as_ref().map(|k| keys::idem_key(&cmd.db, k));
        if let Some(ik) = &idem
            && let Some(bytes) = self.db.get_pinned_cf(self.cf(CF_IDEM), ik)?
        {
            let rec: IdemRecord = decode("idempotency record", &bytes)?;
            // The window is measured with the commands' own times, not the replica set's
            // clock: one entry stamped far ahead (clocks of a majority wrong at once) moves
            // the clock for good, and would otherwise expire every key at once.
            if cmd.ts_ms < rec.ts_ms.saturating_add(self.options.idempotency_ttl.as_millis() as u64) {
                if rec.request_hash.is_some() && cmd.request_hash.is_some() && rec.request_hash != cmd.request_hash {
                    let key = cmd.idempotency_key.as_deref().unwrap_or_default();
                    return Ok((
                        Err(ApiError::new(
                            ErrorCode::IdempotencyKeyReused,
                            format!(
                                "Idempotency-Key {key:?} was used for a different request; use a new key for a new request"
                            ),
                        )),
                        CatalogDelta::default(),
                    ));
                }
                return Ok((rec.result, CatalogDelta::default()));
            }
        }
        let mut ctx = Ctx {
            batch,
            index,
            ts_ms,
            seq: 0,
            quiet: incoming || matches!(cmd.op, WriteOp::Import { .. }),
            unchecked: incoming || matches!(cmd.op, WriteOp::Import { .. }),
            db: &cmd.db,
            pending: Pending::default(),
            metas: HashMap::new(),
            delta: CatalogDelta::default(),
        };
        let result = match self.apply_op(&mut ctx, &cmd.op) {
            Ok(answer) => {
                for (coll, meta) in std::mem::take(&mut ctx.metas) {
                    batch_catalog(self, ctx.batch, &cmd.db, &coll, Some(&meta));
                    ctx.delta.changes.push((cmd.db.clone(), coll, Some(meta)));
                }
                // A write with a newer route than any that wrote here before: recorded,
                // decided in the log like the data, so a drop bounded by an older route (a
                // migration's late clean-up) keeps what it wrote. Senders are not bounded
                // by it (only the control plane's `SetRouteEpoch` does that). A refused
                // command wrote nothing and records nothing.
                // `u64::MAX` is no route's: the control plane's own drop sent it through the
                // data API before it used the admin API, and such an entry may be replayed.
                if let Some(epoch) = cmd.route_epoch.filter(|e| *e != u64::MAX) {
                    let written = self.catalog_read().epochs_written.get(&cmd.db).copied().unwrap_or(0);
                    if epoch > written {
                        ctx.batch.put_cf(self.cf(keys::CF_META), keys::epoch_written_key(&cmd.db), encode(&epoch));
                        ctx.delta.epoch_written = Some((cmd.db.clone(), epoch));
                    }
                }
                Ok(answer)
            }
            Err(Refusal::Client(e)) => {
                // Refused: nothing of it is written.
                ctx.batch.clear();
                ctx.delta = CatalogDelta::default();
                Err(e)
            }
            Err(Refusal::Store(e)) => return Err(e),
        };
        if let Some(ik) = idem {
            let rec = IdemRecord {
                ts_ms: cmd.ts_ms,
                applied_ms: Some(ts_ms),
                result: result.clone(),
                request_hash: cmd.request_hash.clone(),
            };
            ctx.batch.put_cf(self.cf(CF_IDEM), &ik, encode(&rec));
            // At the applied time, never earlier than the entries before it (the window
            // itself goes by `ts_ms`; collection checks the record before removing it).
            ctx.batch.put_cf(self.cf(CF_IDEM_TTL), keys::idem_ttl_key(ts_ms, &ik), b"");
        }
        if index.is_multiple_of(GC_EVERY) {
            // Retention too goes by the command's own time (see above), so a time far ahead
            // removes what is past retention once, not on every later collection.
            self.collect_garbage(ctx.batch, cmd.ts_ms, index)?;
        }
        self.advance_clock(ctx.batch, ts_ms);
        Ok((result, ctx.delta))
    }

    /// Writes the batch of an applied command and makes its catalog changes visible, as
    /// one step for readers: they take their snapshot and the catalog under the catalog
    /// lock, so no read sees the one without the other (a new index's entries without the
    /// index, or an index without its entries).
    pub fn commit(&self, batch: WriteBatch, delta: Option<CatalogDelta>) -> Result<(), StoreError> {
        let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        self.write(batch)?;
        if let Some(delta) = delta {
            Self::install(&mut catalog, delta);
        }
        Ok(())
    }

    fn install(catalog: &mut super::catalog::Catalog, delta: CatalogDelta) {
        if let Some((db, epoch)) = delta.route_epoch {
            catalog.route_epochs.insert(db, epoch);
        }
        if let Some((db, epoch)) = delta.epoch_written {
            catalog.epochs_written.insert(db, epoch);
        }
        match delta.incoming {
            Some((db, Some(migration))) => {
                catalog.incoming.insert(db, migration);
            }
            Some((db, None)) => {
                catalog.incoming.remove(&db);
            }
            None => {}
        }
        if let Some(db) = delta.drop_db {
            catalog.dbs.remove(&db);
        }
        for (db, coll, meta) in delta.changes {
            match meta {
                Some(m) => {
                    catalog.dbs.entry(db).or_default().insert(coll, m);
                }
                None => {
                    if let Some(colls) = catalog.dbs.get_mut(&db) {
                        colls.remove(&coll);
                        if colls.is_empty() {
                            catalog.dbs.remove(&db);
                        }
                    }
                }
            }
        }
    }

    /// Applies one operation into the command's batch (import steps apply the source's
    /// oplog changes through it too).
    pub(crate) fn apply_op(&self, ctx: &mut Ctx<'_>, op: &WriteOp) -> Result<WriteAnswer, Refusal> {
        match op {
            WriteOp::Insert { coll, docs } => {
                let mut ids = Vec::with_capacity(docs.len());
                for raw in docs {
                    let doc: Value =
                        serde_json::from_str(raw.get()).map_err(|e| ApiError::bad_request(e.to_string()))?;
                    check_parsed(&doc, raw.get().len())?;
                    self.insert_doc(ctx, coll, &doc, raw)?;
                    ids.push(doc["_id"].clone());
                }
                Ok(WriteAnswer::Inserted { ids })
            }
            WriteOp::Update { coll, filter, update, multi, upsert, upsert_id, array_filters } => {
                let filter = Filter::parse(Some(filter))?;
                let update = Update::parse_with_array_filters(update, array_filters.as_ref())?;
                if update.is_replacement() && *multi {
                    return Err(ApiError::invalid_update(
                        "a replacement document updates one document: multi must be false",
                    )
                    .into());
                }
                let docs = self.write_targets(ctx, coll, &filter, *multi)?;
                let matched = docs.len() as u64;
                let mut modified = 0;
                for (key, old) in &docs {
                    let positional = filter.eval(old).flatten();
                    let apply = ApplyCtx { now_ms: ctx.ts_ms as i64, inserting: false, positional };
                    let new = update.apply(old, &apply)?;
                    let raw = check_document(&new)?;
                    // Unchanged means the same bytes (field order matters to clients).
                    if serde_json::to_string(old).ok().as_deref() != Some(raw.get()) {
                        self.replace_doc(ctx, coll, key, old, &new, raw)?;
                        modified += 1;
                    }
                }
                let mut upserted_id = None;
                if matched == 0 && *upsert {
                    let apply = ApplyCtx { now_ms: ctx.ts_ms as i64, inserting: true, positional: None };
                    let doc = update.upsert_document(&filter, upsert_id, &apply)?;
                    let raw = check_document(&doc)?;
                    self.insert_doc(ctx, coll, &doc, &raw)?;
                    upserted_id = Some(doc["_id"].clone());
                }
                Ok(WriteAnswer::Updated { matched, modified, upserted_id })
            }
            WriteOp::Delete { coll, filter, multi } => {
                let filter = Filter::parse(Some(filter))?;
                let docs = self.write_targets(ctx, coll, &filter, *multi)?;
                for (key, old) in &docs {
                    self.delete_doc(ctx, coll, key, old)?;
                }
                Ok(WriteAnswer::Deleted { deleted: docs.len() as u64 })
            }
            WriteOp::CreateCollection { coll } => {
                let created = self.meta(ctx, coll).is_none();
                self.ensure_collection(ctx, coll);
                Ok(WriteAnswer::CollectionCreated { created })
            }
            WriteOp::DropCollection { coll } => {
                if self.meta(ctx, coll).is_none() {
                    return Ok(WriteAnswer::Dropped { found: false });
                }
                let prefix = keys::coll_prefix(ctx.db, coll);
                let end = prefix_end(&prefix).unwrap_or_default();
                ctx.batch.delete_range_cf(self.cf(CF_DOCS), &prefix, &end);
                ctx.batch.delete_range_cf(self.cf(CF_IDX), &prefix, &end);
                ctx.batch.delete_cf(self.cf(CF_CATALOG), &prefix);
                ctx.pending.clear(Some(coll), &prefix);
                ctx.metas.remove(coll);
                ctx.delta.changes.push((ctx.db.to_owned(), coll.clone(), None));
                self.oplog(ctx, Some(coll), OplogOp::DropCollection);
                Ok(WriteAnswer::Dropped { found: true })
            }
            WriteOp::CreateIndex { coll, spec } => self.create_index(ctx, coll, spec),
            WriteOp::BuildIndex { coll, name } => self.build_step(ctx, coll, name),
            WriteOp::DropIndex { coll, name } => {
                let Some(mut meta) = self.meta(ctx, coll) else {
                    return Ok(WriteAnswer::Dropped { found: false });
                };
                let before = meta.indexes.len();
                meta.indexes.retain(|i| &i.name != name);
                if meta.indexes.len() == before {
                    return Ok(WriteAnswer::Dropped { found: false });
                }
                let prefix = keys::index_prefix(ctx.db, coll, name);
                ctx.batch.delete_range_cf(self.cf(CF_IDX), &prefix, &prefix_end(&prefix).unwrap_or_default());
                ctx.metas.insert(coll.clone(), meta);
                self.oplog(ctx, Some(coll), OplogOp::DropIndex { name: name.clone() });
                Ok(WriteAnswer::Dropped { found: true })
            }
            WriteOp::DropDatabaseUpTo { max_epoch } => {
                let known = self.catalog_read().newest_epoch(ctx.db);
                if known > *max_epoch {
                    let found = self.catalog_read().dbs.contains_key(ctx.db);
                    return Ok(WriteAnswer::DatabaseKept { found, epoch: known });
                }
                self.apply_op(ctx, &WriteOp::DropDatabase)
            }
            WriteOp::DropDatabase => {
                let found = self.catalog_read().dbs.contains_key(ctx.db);
                let prefix = keys::db_prefix(ctx.db);
                let end = prefix_end(&prefix).unwrap_or_default();
                // Replayed by a migration's import (`unchecked`), the idempotency records
                // stay: the migration's passes own them, and one may already have moved
                // records the source wrote after the drop.
                let cfs: &[&str] = if ctx.unchecked {
                    &[CF_DOCS, CF_IDX, CF_CATALOG]
                } else {
                    &[CF_DOCS, CF_IDX, CF_CATALOG, CF_IDEM]
                };
                for cf in cfs {
                    ctx.batch.delete_range_cf(self.cf(cf), &prefix, &end);
                }
                ctx.metas.clear();
                ctx.pending.clear(None, &prefix);
                ctx.delta.drop_db = Some(ctx.db.to_owned());
                self.oplog(ctx, None, OplogOp::DropDatabase);
                Ok(WriteAnswer::Dropped { found })
            }
            WriteOp::SetRouteEpoch { epoch } => {
                self.raise_route_epoch(ctx, *epoch);
                Ok(WriteAnswer::RouteEpoch { epoch: self.known_route_epoch(ctx) })
            }
            WriteOp::Import { migration, step } => self.apply_import(ctx, migration, step),
            WriteOp::PinOplog { name, from_index, expires_ms } => self.pin_oplog(ctx, name, *from_index, *expires_ms),
            WriteOp::UnpinOplog { name } => {
                ctx.batch.delete_cf(self.cf(keys::CF_META), keys::meta_key(keys::META_OPLOG_PIN, name));
                Ok(WriteAnswer::Done)
            }
            WriteOp::Checksum => {
                let at =
                    ChecksumAt { index: ctx.index, sum: self.db_sum(ctx.db), catalog: self.catalog_digest(ctx.db) };
                ctx.batch.put_cf(self.cf(keys::CF_META), checksum_key(ctx.db), encode(&at));
                Ok(WriteAnswer::Checksum(at))
            }
        }
    }

    /// The database's route epoch as this command sees it (raised by it, or as applied).
    fn known_route_epoch(&self, ctx: &Ctx<'_>) -> u64 {
        let known = self.catalog_read().route_epoch(ctx.db);
        match &ctx.delta.route_epoch {
            Some((_, raised)) => known.max(*raised),
            None => known,
        }
    }

    /// Makes `epoch` the database's route epoch if it is above the one known (epochs only
    /// rise), in CF_META and, once the batch is written, in the catalog.
    pub(super) fn raise_route_epoch(&self, ctx: &mut Ctx<'_>, epoch: u64) {
        if epoch > self.known_route_epoch(ctx) {
            ctx.batch.put_cf(self.cf(keys::CF_META), keys::route_epoch_key(ctx.db), encode(&epoch));
            ctx.delta.route_epoch = Some((ctx.db.to_owned(), epoch));
        }
    }

    /// The documents an update or delete changes: every match (`multi`), or the match with
    /// the smallest `_id`, so every member picks the same one whatever the plan. Bounded by
    /// [`Budget::WRITE`]: this runs in the apply loop every database of the replica set shares.
    fn write_targets(
        &self,
        ctx: &Ctx<'_>,
        coll: &str,
        filter: &Filter,
        multi: bool,
    ) -> Result<Vec<super::read::Keyed>, Refusal> {
        let Some(meta) = self.meta(ctx, coll) else { return Ok(vec![]) };
        let want = if multi { Want::ALL } else { Want::FIRST_BY_ID };
        let sort = SortSpec::default();
        match self.matching(&View::Live, ctx.db, coll, &meta.indexes, filter, &sort, want, Budget::WRITE) {
            Ok((docs, _)) => Ok(docs),
            Err(QueryError::Refused(e)) => Err(Refusal::Client(e)),
            Err(QueryError::Store(e)) => Err(Refusal::Store(e)),
        }
    }

    /// The collection's metadata as this command sees it.
    pub(crate) fn meta(&self, ctx: &Ctx<'_>, coll: &str) -> Option<CollectionMeta> {
        if let Some(m) = ctx.metas.get(coll) {
            return Some(m.clone());
        }
        if ctx.pending.db_cleared || ctx.pending.cleared.contains(coll) {
            return None;
        }
        self.catalog_read().get(ctx.db, coll).cloned()
    }

    pub(crate) fn ensure_collection(&self, ctx: &mut Ctx<'_>, coll: &str) -> CollectionMeta {
        if let Some(m) = self.meta(ctx, coll) {
            return m;
        }
        let m = CollectionMeta { checksum: Some(DocSum::default()), ..CollectionMeta::default() };
        ctx.metas.insert(coll.to_owned(), m.clone());
        self.oplog(ctx, Some(coll), OplogOp::CreateCollection);
        m
    }

    pub(crate) fn oplog(&self, ctx: &mut Ctx<'_>, coll: Option<&str>, op: OplogOp) {
        if ctx.quiet {
            return;
        }
        let entry = OplogEntry {
            index: ctx.index,
            seq: ctx.seq,
            ts_ms: ctx.ts_ms,
            db: ctx.db.to_owned(),
            coll: coll.map(str::to_owned),
            op,
        };
        ctx.batch.put_cf(self.cf(CF_OPLOG), keys::oplog_key(ctx.index, ctx.seq), encode(&entry));
        ctx.seq += 1;
    }

    /// An oplog `put` with the document's JSON text copied as is (it reads back as
    /// [`OplogOp::Put`]).
    pub(crate) fn oplog_put(&self, ctx: &mut Ctx<'_>, coll: &str, id: &Value, doc: &RawValue) {
        if ctx.quiet {
            return;
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry<'a> {
            index: u64,
            seq: u32,
            ts_ms: u64,
            db: &'a str,
            coll: &'a str,
            op: Put<'a>,
        }
        #[derive(Serialize)]
        #[serde(tag = "kind", rename = "put")]
        struct Put<'a> {
            id: &'a Value,
            doc: &'a RawValue,
        }
        let entry = Entry { index: ctx.index, seq: ctx.seq, ts_ms: ctx.ts_ms, db: ctx.db, coll, op: Put { id, doc } };
        ctx.batch.put_cf(self.cf(CF_OPLOG), keys::oplog_key(ctx.index, ctx.seq), encode(&entry));
        ctx.seq += 1;
    }

    fn insert_doc(&self, ctx: &mut Ctx<'_>, coll: &str, doc: &Value, raw: &RawValue) -> Result<(), Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        let id = &doc["_id"];
        let key = keys::doc_key(ctx.db, coll, id);
        if ctx.pending.docs.contains(&key) || self.db.get_pinned_cf(self.cf(CF_DOCS), &key)?.is_some() {
            return Err(ApiError::duplicate_key(format!("a document with _id {id} already exists")).into());
        }
        let id_enc = encode_id(id);
        for ix in meta.indexes.iter_mut() {
            self.add_index_entries(ctx, coll, ix, doc, &id_enc)?;
        }
        ctx.batch.put_cf(self.cf(CF_DOCS), &key, raw.get());
        ctx.pending.docs.insert(key);
        meta.documents += 1;
        if let Some(sum) = &mut meta.checksum {
            sum.add(DocSum::of(coll, doc));
        }
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog_put(ctx, coll, id, raw);
        check_produced(ctx)
    }

    fn replace_doc(
        &self,
        ctx: &mut Ctx<'_>,
        coll: &str,
        key: &[u8],
        old: &Value,
        new: &Value,
        raw: Box<RawValue>,
    ) -> Result<(), Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        let id_enc = encode_id(&old["_id"]);
        for ix in meta.indexes.iter_mut() {
            let old_keys = index_keys(ix, old)?.0;
            let (new_keys, multikey) = index_keys(ix, new)?;
            if old_keys == new_keys {
                // Same entries (`null` and `[]` share a key), but `[]` still makes the index
                // multikey: it no longer gives sorts (an empty array sorts before null).
                ix.multikey |= multikey;
                continue;
            }
            self.remove_index_entries(ctx, coll, ix, &old_keys, &id_enc);
            self.add_index_entries(ctx, coll, ix, new, &id_enc)?;
        }
        ctx.batch.put_cf(self.cf(CF_DOCS), key, raw.get());
        if let Some(sum) = &mut meta.checksum {
            sum.sub(DocSum::of(coll, old));
            sum.add(DocSum::of(coll, new));
        }
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog_put(ctx, coll, &old["_id"], &raw);
        check_produced(ctx)
    }

    fn delete_doc(&self, ctx: &mut Ctx<'_>, coll: &str, key: &[u8], old: &Value) -> Result<(), Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        let id_enc = encode_id(&old["_id"]);
        for ix in &meta.indexes {
            let (old_keys, _) = index_keys(ix, old)?;
            self.remove_index_entries(ctx, coll, ix, &old_keys, &id_enc);
        }
        ctx.batch.delete_cf(self.cf(CF_DOCS), key);
        meta.documents = meta.documents.saturating_sub(1);
        if let Some(sum) = &mut meta.checksum {
            sum.sub(DocSum::of(coll, old));
        }
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog(ctx, Some(coll), OplogOp::Delete { id: old["_id"].clone() });
        Ok(())
    }
}

fn batch_catalog(engine: &Engine, batch: &mut WriteBatch, db: &str, coll: &str, meta: Option<&CollectionMeta>) {
    let key = keys::coll_prefix(db, coll);
    match meta {
        Some(m) => batch.put_cf(engine.cf(CF_CATALOG), key, encode(m)),
        None => batch.delete_cf(engine.cf(CF_CATALOG), key),
    }
}

/// Why a command was not applied: the client's mistake (answered, nothing changed) or a
/// storage failure (the member cannot go on).
/// Refuses a write whose batch outgrew [`MAX_WRITE_PRODUCED_BYTES`] (nothing of it is
/// written: the caller clears the batch).
pub(crate) fn check_produced(ctx: &Ctx<'_>) -> Result<(), Refusal> {
    if ctx.batch.size_in_bytes() > MAX_WRITE_PRODUCED_BYTES {
        return Err(ApiError::bad_request(format!(
            "the write would produce more than {} MiB of documents and oplog: change fewer or smaller documents at once",
            MAX_WRITE_PRODUCED_BYTES >> 20
        ))
        .into());
    }
    Ok(())
}

pub(crate) enum Refusal {
    Client(ApiError),
    Store(StoreError),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Client(e)
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

impl From<rocksdb::Error> for Refusal {
    fn from(e: rocksdb::Error) -> Self {
        Refusal::Store(e.into())
    }
}
