//! Applying a replicated [`Command`] to the state machine: computes the write batch
//! (documents, index entries, oplog entries, idempotency record) and the answer. Every
//! member runs this on the same entries in the same order and reaches the same state;
//! a refused command (duplicate key, invalid update, ...) changes nothing but the applied
//! index.

use std::collections::{HashMap, HashSet};

use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::{ApiError, ErrorCode};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::catalog::{CollectionMeta, IndexSpec};
use super::command::{Command, WriteAnswer, WriteOp, WriteResult};
use super::engine::{Engine, StoreError, decode, encode, stale_route};
use super::keys::{self, CF_CATALOG, CF_DOCS, CF_IDEM, CF_IDEM_TTL, CF_IDX, CF_OPLOG};
use super::read::View;
use crate::doc::keycode::{encode as encode_key, encode_dir_into, prefix_end};
use crate::doc::path::lookup;
use crate::doc::validate::{check_document, check_parsed};
use crate::query::filter::Pred;
use crate::query::{Filter, SortSpec, Update};

/// Most index keys one document may produce (arrays in indexed fields multiply them).
const MAX_KEYS_PER_DOC: usize = 1000;
/// How often (in applied entries) expired oplog and idempotency records are removed.
const GC_EVERY: u64 = 1024;

/// The remembered answer of an idempotent write.
#[derive(Debug, Serialize, Deserialize)]
struct IdemRecord {
    ts_ms: u64,
    result: WriteResult,
    /// The request's digest (see `Command::request_hash`); absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_hash: Option<String>,
}

/// Catalog changes of one command, installed in memory once its batch is written.
#[derive(Debug, Default)]
pub struct CatalogDelta {
    changes: Vec<(String, String, Option<CollectionMeta>)>,
    drop_db: Option<String>,
    route_epoch: Option<(String, u64)>,
}

/// Tracks what the command being applied has already changed, so later steps of the same
/// command see it (duplicate `_id`s within one insert, unique keys moved between documents).
#[derive(Default)]
struct Pending {
    docs: HashSet<Vec<u8>>,
    /// index entry prefix (index prefix + key values) → encoded `_id` that now owns it
    unique_added: HashMap<Vec<u8>, Vec<u8>>,
    /// full index entry keys deleted by this command
    idx_removed: HashSet<Vec<u8>>,
}

struct Ctx<'a> {
    batch: &'a mut WriteBatch,
    index: u64,
    ts_ms: u64,
    seq: u32,
    db: &'a str,
    pending: Pending,
    metas: HashMap<String, CollectionMeta>,
    delta: CatalogDelta,
}

impl Engine {
    /// Applies `cmd` (the entry at Raft `index`) into `batch`, which must be empty. The
    /// caller adds the applied log id to the batch, writes it, then calls
    /// [`Engine::install_delta`].
    pub fn apply_command(
        &self,
        batch: &mut WriteBatch,
        cmd: &Command,
        index: u64,
    ) -> Result<(WriteResult, CatalogDelta), StoreError> {
        // A sender with an outdated route is refused before anything else, the answer of an
        // earlier idempotent write included: the database has moved on.
        if let Some(epoch) = cmd.route_epoch {
            let known = self.catalog_read().route_epoch(&cmd.db);
            if epoch < known {
                return Ok((Err(stale_route(&cmd.db, epoch, known)), CatalogDelta::default()));
            }
        }
        let idem = cmd.idempotency_key.as_ref().map(|k| keys::idem_key(&cmd.db, k));
        if let Some(ik) = &idem
            && let Some(bytes) = self.db.get_pinned_cf(self.cf(CF_IDEM), ik)?
        {
            let rec: IdemRecord = decode("idempotency record", &bytes)?;
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
            ts_ms: cmd.ts_ms,
            seq: 0,
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
            let rec = IdemRecord { ts_ms: cmd.ts_ms, result: result.clone(), request_hash: cmd.request_hash.clone() };
            ctx.batch.put_cf(self.cf(CF_IDEM), &ik, encode(&rec));
            ctx.batch.put_cf(self.cf(CF_IDEM_TTL), keys::idem_ttl_key(cmd.ts_ms, &ik), b"");
        }
        if index.is_multiple_of(GC_EVERY) {
            self.collect_garbage(ctx.batch, cmd.ts_ms)?;
        }
        Ok((result, ctx.delta))
    }

    /// Makes the catalog changes of a written command visible to readers.
    pub fn install_delta(&self, delta: CatalogDelta) {
        if delta.changes.is_empty() && delta.drop_db.is_none() && delta.route_epoch.is_none() {
            return;
        }
        let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        if let Some((db, epoch)) = delta.route_epoch {
            catalog.route_epochs.insert(db, epoch);
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

    fn apply_op(&self, ctx: &mut Ctx<'_>, op: &WriteOp) -> Result<WriteAnswer, Refusal> {
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
            WriteOp::Update { coll, filter, update, multi, upsert, upsert_id } => {
                let filter = Filter::parse(Some(filter))?;
                let update = Update::parse(update)?;
                let limit = if *multi { None } else { Some(1) };
                let (docs, _) = self.matching(&View::Live, ctx.db, coll, &filter, &SortSpec::default(), 0, limit)?;
                let matched = docs.len() as u64;
                let mut modified = 0;
                for (key, old) in &docs {
                    let new = update.apply(old)?;
                    let raw = check_document(&new)?;
                    // Unchanged means the same bytes (field order matters to clients).
                    if serde_json::to_string(old).ok().as_deref() != Some(raw.get()) {
                        self.replace_doc(ctx, coll, key, old, &new, raw)?;
                        modified += 1;
                    }
                }
                let mut upserted_id = None;
                if matched == 0 && *upsert {
                    let doc = upsert_document(&filter, &update, upsert_id)?;
                    let raw = check_document(&doc)?;
                    self.insert_doc(ctx, coll, &doc, &raw)?;
                    upserted_id = Some(doc["_id"].clone());
                }
                Ok(WriteAnswer::Updated { matched, modified, upserted_id })
            }
            WriteOp::Delete { coll, filter, multi } => {
                let filter = Filter::parse(Some(filter))?;
                let limit = if *multi { None } else { Some(1) };
                let (docs, _) = self.matching(&View::Live, ctx.db, coll, &filter, &SortSpec::default(), 0, limit)?;
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
                ctx.metas.remove(coll);
                ctx.delta.changes.push((ctx.db.to_owned(), coll.clone(), None));
                self.oplog(ctx, Some(coll), OplogOp::DropCollection);
                Ok(WriteAnswer::Dropped { found: true })
            }
            WriteOp::CreateIndex { coll, spec } => self.create_index(ctx, coll, spec),
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
            WriteOp::DropDatabase => {
                let found = self.catalog_read().dbs.contains_key(ctx.db);
                let prefix = keys::db_prefix(ctx.db);
                let end = prefix_end(&prefix).unwrap_or_default();
                for cf in [CF_DOCS, CF_IDX, CF_CATALOG, CF_IDEM] {
                    ctx.batch.delete_range_cf(self.cf(cf), &prefix, &end);
                }
                ctx.metas.clear();
                ctx.delta.drop_db = Some(ctx.db.to_owned());
                self.oplog(ctx, None, OplogOp::DropDatabase);
                Ok(WriteAnswer::Dropped { found })
            }
            WriteOp::SetRouteEpoch { epoch } => {
                let known = self.catalog_read().route_epoch(ctx.db);
                if *epoch > known {
                    ctx.batch.put_cf(self.cf(keys::CF_META), keys::route_epoch_key(ctx.db), encode(epoch));
                    ctx.delta.route_epoch = Some((ctx.db.to_owned(), *epoch));
                }
                Ok(WriteAnswer::RouteEpoch { epoch: (*epoch).max(known) })
            }
        }
    }

    /// The collection's metadata as this command sees it.
    fn meta(&self, ctx: &Ctx<'_>, coll: &str) -> Option<CollectionMeta> {
        ctx.metas.get(coll).cloned().or_else(|| self.catalog_read().get(ctx.db, coll).cloned())
    }

    fn ensure_collection(&self, ctx: &mut Ctx<'_>, coll: &str) -> CollectionMeta {
        if let Some(m) = self.meta(ctx, coll) {
            return m;
        }
        let m = CollectionMeta::default();
        ctx.metas.insert(coll.to_owned(), m.clone());
        self.oplog(ctx, Some(coll), OplogOp::CreateCollection);
        m
    }

    fn oplog(&self, ctx: &mut Ctx<'_>, coll: Option<&str>, op: OplogOp) {
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
    fn oplog_put(&self, ctx: &mut Ctx<'_>, coll: &str, id: &Value, doc: &RawValue) {
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
        let id_enc = encode_key(id);
        for ix in meta.indexes.iter_mut() {
            self.add_index_entries(ctx, coll, ix, doc, &id_enc)?;
        }
        ctx.batch.put_cf(self.cf(CF_DOCS), &key, raw.get());
        ctx.pending.docs.insert(key);
        meta.documents += 1;
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog_put(ctx, coll, id, raw);
        Ok(())
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
        let id_enc = encode_key(&old["_id"]);
        for ix in meta.indexes.iter_mut() {
            let old_keys = index_keys(ix, old)?.0;
            let (new_keys, _) = index_keys(ix, new)?;
            if old_keys == new_keys {
                continue;
            }
            self.remove_index_entries(ctx, coll, ix, &old_keys, &id_enc);
            self.add_index_entries(ctx, coll, ix, new, &id_enc)?;
        }
        ctx.batch.put_cf(self.cf(CF_DOCS), key, raw.get());
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog_put(ctx, coll, &old["_id"], &raw);
        Ok(())
    }

    fn delete_doc(&self, ctx: &mut Ctx<'_>, coll: &str, key: &[u8], old: &Value) -> Result<(), Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        let id_enc = encode_key(&old["_id"]);
        for ix in &meta.indexes {
            let (old_keys, _) = index_keys(ix, old)?;
            self.remove_index_entries(ctx, coll, ix, &old_keys, &id_enc);
        }
        ctx.batch.delete_cf(self.cf(CF_DOCS), key);
        meta.documents = meta.documents.saturating_sub(1);
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog(ctx, Some(coll), OplogOp::Delete { id: old["_id"].clone() });
        Ok(())
    }

    fn remove_index_entries(&self, ctx: &mut Ctx<'_>, coll: &str, ix: &IndexSpec, ix_keys: &[Vec<u8>], id_enc: &[u8]) {
        let prefix = keys::index_prefix(ctx.db, coll, &ix.name);
        for k in ix_keys {
            let mut entry_prefix = prefix.clone();
            entry_prefix.extend_from_slice(k);
            if ctx.pending.unique_added.get(&entry_prefix).is_some_and(|owner| owner == id_enc) {
                ctx.pending.unique_added.remove(&entry_prefix);
            }
            let mut full = entry_prefix;
            full.extend_from_slice(id_enc);
            ctx.batch.delete_cf(self.cf(CF_IDX), &full);
            ctx.pending.idx_removed.insert(full);
        }
    }

    fn add_index_entries(
        &self,
        ctx: &mut Ctx<'_>,
        coll: &str,
        ix: &mut IndexSpec,
        doc: &Value,
        id_enc: &[u8],
    ) -> Result<(), Refusal> {
        let (ix_keys, multikey) = index_keys(ix, doc)?;
        ix.multikey |= multikey;
        let prefix = keys::index_prefix(ctx.db, coll, &ix.name);
        for k in ix_keys {
            let mut entry_prefix = prefix.clone();
            entry_prefix.extend_from_slice(&k);
            if ix.unique {
                self.check_unique(ctx, ix, &entry_prefix, id_enc)?;
                ctx.pending.unique_added.insert(entry_prefix.clone(), id_enc.to_vec());
            }
            let mut full = entry_prefix;
            full.extend_from_slice(id_enc);
            ctx.pending.idx_removed.remove(&full);
            ctx.batch.put_cf(self.cf(CF_IDX), &full, id_enc);
        }
        Ok(())
    }

    fn check_unique(&self, ctx: &Ctx<'_>, ix: &IndexSpec, entry_prefix: &[u8], id_enc: &[u8]) -> Result<(), Refusal> {
        let dup =
            || ApiError::duplicate_key(format!("a document with the same key in unique index {} exists", ix.name));
        if let Some(owner) = ctx.pending.unique_added.get(entry_prefix)
            && owner != id_enc
        {
            return Err(dup().into());
        }
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(entry_prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let it = self.db.iterator_cf_opt(self.cf(CF_IDX), ro, IteratorMode::From(entry_prefix, Direction::Forward));
        for item in it {
            let (k, v) = item?;
            if ctx.pending.idx_removed.contains(k.as_ref()) || v.as_ref() == id_enc {
                continue;
            }
            return Err(dup().into());
        }
        Ok(())
    }

    fn create_index(&self, ctx: &mut Ctx<'_>, coll: &str, spec: &IndexSpec) -> Result<WriteAnswer, Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        if let Some(existing) = meta.indexes.iter().find(|i| i.name == spec.name) {
            if existing.same_definition(spec) {
                return Ok(WriteAnswer::IndexCreated { name: existing.name.clone() });
            }
            return Err(
                ApiError::bad_request(format!("an index named {} with another definition exists", spec.name)).into()
            );
        }
        if let Some(existing) = meta.indexes.iter().find(|i| i.same_definition(spec)) {
            return Err(ApiError::bad_request(format!("the same index exists under the name {}", existing.name)).into());
        }
        let mut ix = spec.clone();
        ix.multikey = false;
        // Build from every document of the collection, in this same batch.
        let prefix = keys::coll_prefix(ctx.db, coll);
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(&prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let docs: Vec<Value> = self
            .db
            .iterator_cf_opt(self.cf(CF_DOCS), ro, IteratorMode::From(&prefix, Direction::Forward))
            .map(|item| -> Result<Value, StoreError> { decode("document", &item?.1) })
            .collect::<Result<_, _>>()?;
        for doc in &docs {
            let id_enc = encode_key(&doc["_id"]);
            self.add_index_entries(ctx, coll, &mut ix, doc, &id_enc)?;
        }
        meta.indexes.push(ix);
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog(ctx, Some(coll), OplogOp::CreateIndex { spec: serde_json::to_value(spec).unwrap_or_default() });
        Ok(WriteAnswer::IndexCreated { name: spec.name.clone() })
    }

    /// Removes oplog entries older than the retention and expired idempotency records.
    fn collect_garbage(&self, batch: &mut WriteBatch, now_ms: u64) -> Result<(), StoreError> {
        let oplog_cutoff = now_ms.saturating_sub(self.options.oplog_retention.as_millis() as u64);
        let mut last_old: Option<Vec<u8>> = None;
        for item in self.db.iterator_cf(self.cf(CF_OPLOG), IteratorMode::Start) {
            let (k, v) = item?;
            let e: OplogEntry = decode("oplog entry", &v)?;
            if e.ts_ms >= oplog_cutoff {
                break;
            }
            last_old = Some(k.to_vec());
        }
        if let Some(last) = last_old {
            batch.delete_range_cf(self.cf(CF_OPLOG), vec![0u8; 12], prefix_end(&last).unwrap_or(last));
        }
        let idem_cutoff = now_ms.saturating_sub(self.options.idempotency_ttl.as_millis() as u64);
        for item in self.db.iterator_cf(self.cf(CF_IDEM_TTL), IteratorMode::Start) {
            let (k, _) = item?;
            let ts = u64::from_be_bytes(k.get(..8).and_then(|s| s.try_into().ok()).unwrap_or([0; 8]));
            if ts >= idem_cutoff {
                break;
            }
            // Only delete the record if it was not rewritten later under the same key.
            let ik = &k[8..];
            if let Some(bytes) = self.db.get_pinned_cf(self.cf(CF_IDEM), ik)? {
                let rec: IdemRecord = decode("idempotency record", &bytes)?;
                if rec.ts_ms < idem_cutoff {
                    batch.delete_cf(self.cf(CF_IDEM), ik);
                }
            }
            batch.delete_cf(self.cf(CF_IDEM_TTL), &k);
        }
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
enum Refusal {
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

/// The index keys of a document (one per array element of multikey fields) and whether
/// any indexed field held an array.
pub fn index_keys(ix: &IndexSpec, doc: &Value) -> Result<(Vec<Vec<u8>>, bool), ApiError> {
    let mut keys: Vec<Vec<u8>> = vec![vec![]];
    let mut multikey = false;
    for (path, desc) in &ix.fields {
        let mut values: Vec<&Value> = Vec::new();
        for v in lookup(doc, path) {
            match v {
                Value::Array(items) => {
                    multikey = true;
                    if items.is_empty() {
                        values.push(&Value::Null);
                    }
                    values.extend(items.iter());
                }
                other => values.push(other),
            }
        }
        if values.is_empty() {
            values.push(&Value::Null);
        }
        if keys.len() * values.len() > MAX_KEYS_PER_DOC {
            return Err(ApiError::bad_request(format!(
                "document has more than {MAX_KEYS_PER_DOC} keys in index {}",
                ix.name
            )));
        }
        let mut next = Vec::with_capacity(keys.len() * values.len());
        for k in &keys {
            for v in &values {
                let mut nk = k.clone();
                encode_dir_into(v, *desc, &mut nk);
                next.push(nk);
            }
        }
        keys = next;
    }
    keys.sort();
    keys.dedup();
    Ok((keys, multikey))
}

/// The document an upsert inserts: the filter's equality fields, then the update.
fn upsert_document(filter: &Filter, update: &Update, generated_id: &Value) -> Result<Value, ApiError> {
    let mut base = Value::Object(Map::new());
    let mut eqs = Vec::new();
    collect_equalities(filter, &mut eqs);
    for (path, v) in eqs {
        let set = Update::parse(&serde_json::json!({ "$set": { path: v } }))?;
        base = set.apply(&base).map_err(|e| ApiError::new(ErrorCode::InvalidUpdate, e.message))?;
    }
    let mut doc = match update {
        Update::Replace(_) => {
            let id = base.get("_id").cloned();
            let mut d = update.apply(&Value::Object(Map::new()))?;
            if let (Some(id), Value::Object(m)) = (id, &mut d) {
                m.insert("_id".into(), id);
            }
            d
        }
        Update::Ops(_) => update.apply(&base)?,
    };
    if let Value::Object(m) = &mut doc {
        if !m.contains_key("_id") {
            m.insert("_id".into(), generated_id.clone());
        }
        *m = id_first(std::mem::take(m));
    }
    Ok(doc)
}

fn collect_equalities(filter: &Filter, out: &mut Vec<(String, Value)>) {
    match filter {
        Filter::And(fs) => fs.iter().for_each(|f| collect_equalities(f, out)),
        Filter::Field { path, pred: Pred::Eq(v) }
            if !v.is_object() || !v.as_object().is_some_and(|m| m.keys().any(|k| k.starts_with('$'))) =>
        {
            out.push((path.clone(), v.clone()));
        }
        _ => {}
    }
}

/// The same object with `_id` as its first field, as inserted documents have it.
pub fn id_first(mut map: Map<String, Value>) -> Map<String, Value> {
    let Some(id) = map.remove("_id") else { return map };
    let mut out = Map::with_capacity(map.len() + 1);
    out.insert("_id".into(), id);
    out.extend(map);
    out
}
