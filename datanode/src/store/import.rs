//! Hot migration's target side: applying the steps of an import (`WriteOp::Import`,
//! `nimbus_api::migration::ImportStep`), each one Raft entry, identically on every member.
//!
//! `Begin` drops what an earlier attempt imported of the database and marks it *incoming*
//! for the migration (`META_INCOMING`, persisted with the data, so a restart or a snapshot
//! keeps it); while it is, no client request for the database is served (`StaleRoute`) and
//! every command on it writes no oplog entries and checks no unique index. A database served
//! here (collections and no incoming mark) is never dropped: its `Begin` is refused. The
//! other steps need the mark of the same migration. Documents are put as they are
//! (replacing the one with the same `_id`), with their index entries, collection counts and
//! checksum sums; oplog changes are after-images applied idempotently, so applying a change
//! twice, or to a document the copy already brought to that state, changes nothing.
//! `Finish` clears the mark and raises the route epoch (refused as a stale route when the
//! database's route epoch here is newer: a deletion fenced it); `Abort` drops the import; a
//! restore's `Publish` switches its staging database into the database it restores
//! (`store::publish`) and drops it. Each is recorded (`META_MIGRATED`), so a repeated one
//! answers as the first did.

use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::{ExportedCollection, ExportedDoc, ExportedIdempotency, ImportStep};
use nimbus_api::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::apply::{Ctx, IdemRecord, Refusal, check_produced};
use super::catalog::{IndexBuild, IndexSpec, KEY_VERSION};
use super::checksum::{DocSum, checksum_key};
use super::command::{WriteAnswer, WriteOp};
use super::engine::{Engine, decode, encode};
use super::index::{encode_id, index_keys};
use super::keys::{self, CF_DOCS, CF_IDEM, CF_IDEM_TTL, CF_META, META_INCOMING, META_MIGRATED};
use super::publish::check_staging;
use crate::doc::validate::check_parsed;

/// `META_INCOMING`'s value: the migration importing the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingMark {
    pub migration: String,
}

/// `META_MIGRATED`'s value: how the database's last import ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Outcome {
    migration: String,
    finished: bool,
    /// The database a restore's staging database was published into (`Publish`), so a
    /// repeated `Publish` answers `Done`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    published: Option<String>,
}

impl Engine {
    pub(crate) fn apply_import(
        &self,
        ctx: &mut Ctx<'_>,
        migration: &str,
        step: &ImportStep,
    ) -> Result<WriteAnswer, Refusal> {
        if migration.is_empty() {
            return Err(ApiError::bad_request("an import needs the migration's id").into());
        }
        let incoming = self.catalog_read().incoming.get(ctx.db).cloned();
        let ours = incoming.as_deref() == Some(migration);
        match step {
            ImportStep::Begin => {
                // Only what an earlier attempt imported may be dropped: a database served
                // here (its collections, no incoming mark) is not this migration's to take,
                // whatever sent the `Begin` (a stale driver, a wrong replica set). Decided
                // from replicated state, so every member refuses alike.
                if incoming.is_none() && self.catalog_read().dbs.get(ctx.db).is_some_and(|c| !c.is_empty()) {
                    return Err(ApiError::bad_request(format!(
                        "database {} is served by this replica set (it has collections and no migration is importing it): Begin of migration {migration} would drop it; check the migration's target",
                        ctx.db
                    ))
                    .into());
                }
                self.drop_imported(ctx)?;
                let mark = IncomingMark { migration: migration.to_owned() };
                ctx.batch.put_cf(self.cf(CF_META), keys::meta_key(META_INCOMING, ctx.db), encode(&mark));
                ctx.delta.incoming = Some((ctx.db.to_owned(), Some(migration.to_owned())));
                Ok(WriteAnswer::Done)
            }
            ImportStep::Finish { epoch } => {
                if !ours {
                    return match self.outcome(ctx.db)? {
                        Some(o) if o.migration == migration && o.finished => Ok(WriteAnswer::Done),
                        _ => Err(not_incoming(ctx.db, migration, incoming.as_deref()).into()),
                    };
                }
                // A newer route epoch known here than the one this `Finish` serves at: the
                // database was fenced meanwhile (its instance deleted, or a newer route made
                // elsewhere), so serving this copy would serve it with no route. A
                // migration's `Finish` carries its new route's epoch, above the fences it
                // knows of; a repeat of a finished one answered `Done` above.
                let known = self.catalog_read().route_epoch(ctx.db);
                if known > *epoch {
                    return Err(super::engine::stale_route(ctx.db, *epoch, known).into());
                }
                self.end_import(ctx, migration, true, None);
                self.raise_route_epoch(ctx, *epoch);
                // The one change an import leaves in the database's oplog (its other steps
                // write none): the database's history starts again here, and a replay of
                // its archive (a backup) must not run across it as if it had not.
                let quiet = std::mem::replace(&mut ctx.quiet, false);
                self.oplog(ctx, None, OplogOp::Imported { import: migration.to_owned() });
                ctx.quiet = quiet;
                Ok(WriteAnswer::Done)
            }
            ImportStep::Abort => {
                if !ours {
                    // Nothing of this migration here (its `Begin` never applied, or it was
                    // aborted already): nothing to drop. A finished one only goes forward.
                    return match self.outcome(ctx.db)? {
                        Some(o) if o.migration == migration && o.finished => Err(ApiError::bad_request(format!(
                            "migration {migration} of database {} finished here: it cannot be aborted",
                            ctx.db
                        ))
                        .into()),
                        _ => Ok(WriteAnswer::Done),
                    };
                }
                self.drop_imported(ctx)?;
                self.end_import(ctx, migration, false, None);
                Ok(WriteAnswer::Done)
            }
            ImportStep::Publish { into, whole, collections, replace, route_epoch } => {
                check_staging(ctx.db, into)?;
                if !ours {
                    // Published already (a retry of the same step): answered as the first,
                    // whatever the route epoch is since (a retry after a migration's fence
                    // must learn it took effect, not start the restore over).
                    return match self.outcome(ctx.db)? {
                        Some(o) if o.migration == migration && o.published.as_deref() == Some(into.as_str()) => {
                            Ok(WriteAnswer::Done)
                        }
                        _ => Err(not_incoming(ctx.db, migration, incoming.as_deref()).into()),
                    };
                }
                let known = self.catalog_read().route_epoch(into);
                if let Some(seen) = route_epoch
                    && known > *seen
                {
                    return Err(super::engine::stale_route(into, *seen, known).into());
                }
                self.publish(ctx, into, *whole, collections, *replace)?;
                self.drop_imported(ctx)?;
                self.end_import(ctx, migration, true, Some(into));
                Ok(WriteAnswer::Done)
            }
            _ if !ours => Err(not_incoming(ctx.db, migration, incoming.as_deref()).into()),
            ImportStep::Collections { collections } => {
                for c in collections {
                    self.import_collection(ctx, c)?;
                }
                Ok(WriteAnswer::Done)
            }
            ImportStep::Docs { docs } => {
                for d in docs {
                    self.import_doc(ctx, d)?;
                }
                Ok(WriteAnswer::Done)
            }
            ImportStep::Ops { entries } => {
                for e in entries {
                    self.import_change(ctx, e)?;
                }
                Ok(WriteAnswer::Done)
            }
            ImportStep::Idempotency { records } => {
                for r in records {
                    self.import_idempotency(ctx, r)?;
                }
                Ok(WriteAnswer::Done)
            }
        }
    }

    fn outcome(&self, db: &str) -> Result<Option<Outcome>, Refusal> {
        Ok(self.get_meta(&keys::meta_key(META_MIGRATED, db))?)
    }

    /// Clears the incoming mark and records how the import ended.
    fn end_import(&self, ctx: &mut Ctx<'_>, migration: &str, finished: bool, published: Option<&str>) {
        ctx.batch.delete_cf(self.cf(CF_META), keys::meta_key(META_INCOMING, ctx.db));
        let outcome = Outcome { migration: migration.to_owned(), finished, published: published.map(str::to_owned) };
        ctx.batch.put_cf(self.cf(CF_META), keys::meta_key(META_MIGRATED, ctx.db), encode(&outcome));
        ctx.delta.incoming = Some((ctx.db.to_owned(), None));
    }

    /// Drops the database's documents, indexes, catalog, idempotency records and its last
    /// checksum marker; its route epoch stays.
    fn drop_imported(&self, ctx: &mut Ctx<'_>) -> Result<(), Refusal> {
        self.apply_op(ctx, &WriteOp::DropDatabase)?;
        ctx.batch.delete_cf(self.cf(CF_META), checksum_key(ctx.db));
        Ok(())
    }

    /// Creates the collection and those of its indexes not there yet.
    fn import_collection(&self, ctx: &mut Ctx<'_>, c: &ExportedCollection) -> Result<(), Refusal> {
        let coll = checked_coll(&c.name)?;
        self.ensure_collection(ctx, coll);
        for spec in &c.indexes {
            let spec: IndexSpec = serde_json::from_value(spec.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid index specification in {coll}: {e}")))?;
            self.import_index(ctx, coll, spec)?;
        }
        Ok(())
    }

    /// Registers an index not there yet as building. Its first build step runs here only
    /// when this entry wrote nothing to the collection (the step reads stored documents,
    /// which do not show this entry's writes yet); the leader's builder does the rest.
    fn import_index(&self, ctx: &mut Ctx<'_>, coll: &str, spec: IndexSpec) -> Result<(), Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        if meta.indexes.iter().any(|i| i.name == spec.name) {
            return Ok(());
        }
        let name = spec.name.clone();
        let ix = IndexSpec {
            multikey: false,
            key_version: KEY_VERSION,
            build: Some(IndexBuild { after: None, indexed: 0 }),
            ..spec
        };
        meta.failed_builds.retain(|f| f.name != ix.name);
        meta.indexes.push(ix);
        ctx.metas.insert(coll.to_owned(), meta);
        let prefix = keys::coll_prefix(ctx.db, coll);
        let touched = ctx.pending.cleared.contains(coll)
            || ctx.pending.db_cleared
            || ctx.pending.overlay.keys().any(|k| k.starts_with(&prefix));
        if !touched {
            self.build_step(ctx, coll, &name)?;
        }
        Ok(())
    }

    fn import_doc(&self, ctx: &mut Ctx<'_>, d: &ExportedDoc) -> Result<(), Refusal> {
        let coll = checked_coll(&d.coll)?;
        let doc: Value = serde_json::from_str(d.doc.get())
            .map_err(|e| ApiError::bad_request(format!("invalid document in {coll}: {e}")))?;
        self.import_put(ctx, coll, doc)
    }

    /// The document now is exactly `doc`: replaces the one with its `_id`, or adds it.
    fn import_put(&self, ctx: &mut Ctx<'_>, coll: &str, doc: Value) -> Result<(), Refusal> {
        if !doc.is_object() || doc.get("_id").is_none() {
            return Err(ApiError::bad_request(format!("a document of {coll} without an _id")).into());
        }
        let raw = serde_json::to_string(&doc).map_err(|e| ApiError::bad_request(e.to_string()))?;
        check_parsed(&doc, raw.len())?;
        let mut meta = self.ensure_collection(ctx, coll);
        let id = doc["_id"].clone();
        let key = keys::doc_key(ctx.db, coll, &id);
        let old = self.current(ctx, coll, &key)?;
        let id_enc = encode_id(&id);
        for ix in meta.indexes.iter_mut() {
            if let Some(old) = &old {
                let (old_keys, _) = index_keys(ix, old)?;
                self.remove_index_entries(ctx, coll, ix, &old_keys, &id_enc);
            }
            self.add_index_entries(ctx, coll, ix, &doc, &id_enc)?;
        }
        ctx.batch.put_cf(self.cf(CF_DOCS), &key, raw.as_bytes());
        if let Some(sum) = &mut meta.checksum {
            if let Some(old) = &old {
                sum.sub(DocSum::of(coll, old));
            }
            sum.add(DocSum::of_canonical(coll, raw.as_bytes()));
        }
        if old.is_none() {
            meta.documents += 1;
        }
        ctx.metas.insert(coll.to_owned(), meta);
        ctx.pending.overlay.insert(key, Some(doc));
        check_produced(ctx)
    }

    /// The document with `_id` `id` is gone (nothing when it is not there).
    fn import_delete(&self, ctx: &mut Ctx<'_>, coll: &str, id: &Value) -> Result<(), Refusal> {
        if self.meta(ctx, coll).is_none() {
            return Ok(());
        }
        let key = keys::doc_key(ctx.db, coll, id);
        let Some(old) = self.current(ctx, coll, &key)? else { return Ok(()) };
        let mut meta = self.ensure_collection(ctx, coll);
        let id_enc = encode_id(id);
        for ix in &meta.indexes {
            let (old_keys, _) = index_keys(ix, &old)?;
            self.remove_index_entries(ctx, coll, ix, &old_keys, &id_enc);
        }
        ctx.batch.delete_cf(self.cf(CF_DOCS), &key);
        meta.documents = meta.documents.saturating_sub(1);
        if let Some(sum) = &mut meta.checksum {
            sum.sub(DocSum::of(coll, &old));
        }
        ctx.metas.insert(coll.to_owned(), meta);
        ctx.pending.overlay.insert(key, None);
        Ok(())
    }

    /// The document stored under `key` as this entry sees it (its own writes included).
    fn current(&self, ctx: &Ctx<'_>, coll: &str, key: &[u8]) -> Result<Option<Value>, Refusal> {
        if let Some(v) = ctx.pending.overlay.get(key) {
            return Ok(v.clone());
        }
        if ctx.pending.db_cleared || ctx.pending.cleared.contains(coll) {
            return Ok(None);
        }
        match self.db.get_pinned_cf(self.cf(CF_DOCS), key)? {
            Some(bytes) => Ok(Some(decode("document", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Applies one of the source's oplog changes, idempotently.
    fn import_change(&self, ctx: &mut Ctx<'_>, e: &OplogEntry) -> Result<(), Refusal> {
        if e.db != ctx.db {
            return Err(ApiError::bad_request(format!(
                "oplog change {}:{} is of database {}, not {}",
                e.index, e.seq, e.db, ctx.db
            ))
            .into());
        }
        let coll = || {
            e.coll.as_deref().ok_or_else(|| {
                Refusal::from(ApiError::bad_request(format!("oplog change {}:{} names no collection", e.index, e.seq)))
            })
        };
        match &e.op {
            OplogOp::Put { id, doc } => {
                let coll = checked_coll(coll()?)?;
                if doc.get("_id") != Some(id) {
                    return Err(ApiError::bad_request(format!(
                        "oplog change {}:{}: the document's _id is not {id}",
                        e.index, e.seq
                    ))
                    .into());
                }
                self.import_put(ctx, coll, doc.clone())
            }
            OplogOp::Delete { id } => self.import_delete(ctx, checked_coll(coll()?)?, id),
            OplogOp::CreateCollection => {
                self.ensure_collection(ctx, checked_coll(coll()?)?);
                Ok(())
            }
            OplogOp::DropCollection => {
                self.apply_op(ctx, &WriteOp::DropCollection { coll: checked_coll(coll()?)?.to_owned() })?;
                Ok(())
            }
            OplogOp::CreateIndex { spec } => {
                let coll = checked_coll(coll()?)?;
                let spec: IndexSpec = serde_json::from_value(spec.clone()).map_err(|err| {
                    ApiError::bad_request(format!(
                        "oplog change {}:{}: invalid index specification: {err}",
                        e.index, e.seq
                    ))
                })?;
                self.import_index(ctx, coll, spec)
            }
            OplogOp::DropIndex { name } => {
                let op = WriteOp::DropIndex { coll: checked_coll(coll()?)?.to_owned(), name: name.clone() };
                self.apply_op(ctx, &op)?;
                Ok(())
            }
            OplogOp::DropDatabase => {
                self.apply_op(ctx, &WriteOp::DropDatabase)?;
                Ok(())
            }
            // What came in with that import is not in the changes: replaying past it would
            // build a database that never was.
            OplogOp::Imported { import } => Err(ApiError::bad_request(format!(
                "oplog change {}:{} marks import {import}, which replaced the database: changes cannot be replayed across it",
                e.index, e.seq
            ))
            .into()),
        }
    }

    /// Writes an idempotency record (and its expiry key) as the source kept it.
    fn import_idempotency(&self, ctx: &mut Ctx<'_>, r: &ExportedIdempotency) -> Result<(), Refusal> {
        nimbus_api::limits::validate_idempotency_key(&r.key)?;
        let rec: IdemRecord = serde_json::from_str(r.record.get())
            .map_err(|e| ApiError::bad_request(format!("invalid idempotency record {:?}: {e}", r.key)))?;
        let ik = keys::idem_key(ctx.db, &r.key);
        ctx.batch.put_cf(self.cf(CF_IDEM), &ik, encode(&rec));
        ctx.batch.put_cf(self.cf(CF_IDEM_TTL), keys::idem_ttl_key(r.ts_ms, &ik), b"");
        Ok(())
    }
}

/// A collection name of an import, checked as the data API checks it.
fn checked_coll(name: &str) -> Result<&str, ApiError> {
    nimbus_api::path::CollName::new(name)?;
    Ok(name)
}

fn not_incoming(db: &str, migration: &str, incoming: Option<&str>) -> ApiError {
    let now = match incoming {
        Some(other) => format!("it is incoming for migration {other}"),
        None => "it is not being imported".to_owned(),
    };
    ApiError::new(
        ErrorCode::BadRequest,
        format!("database {db} is not being imported by migration {migration} here ({now}): send Begin first"),
    )
}
