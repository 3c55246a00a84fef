//! Secondary index maintenance in the apply loop: the keys a document gives an index,
//! adding and removing entries (with unique checks), and building an index in bounded
//! steps.
//!
//! A new index is registered as *building*: from then on every write maintains its entries
//! for the documents it touches, and [`WriteOp::BuildIndex`](super::WriteOp::BuildIndex)
//! steps, proposed by the leader one after the other, index the collection's documents in
//! `_id` order, at most [`BUILD_STEP_DOCS`] documents or [`BUILD_STEP_BYTES`] bytes each.
//! The collection stays readable and writable throughout; the planner uses the index once
//! the last step marks it ready. A unique index that meets a duplicate fails its build: it
//! is removed and the failure recorded for the client that asked for it.

use nimbus_api::ApiError;
use nimbus_api::admin::OplogOp;
use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde_json::Value;

use super::apply::{Ctx, Refusal};
use super::catalog::{FailedBuild, IndexBuild, IndexSpec, MAX_FAILED_BUILDS};
use super::command::WriteAnswer;
use super::engine::{Engine, decode};
use super::keys::{self, CF_DOCS, CF_IDX};
use crate::doc::keycode::{encode_dir_into, encode_into, prefix_end};
use crate::doc::path::{FieldPath, Key, keys as path_keys};

/// Most index keys one document may produce (arrays in indexed fields multiply them).
pub const MAX_KEYS_PER_DOC: usize = 1000;
/// Most documents one build step indexes.
pub const BUILD_STEP_DOCS: u64 = 256;
/// Most bytes of documents one build step reads.
pub const BUILD_STEP_BYTES: u64 = 1024 * 1024;

/// The index keys of a document (one per value of multikey fields, a compound index's
/// fields multiplied out) and whether any indexed path crossed an array.
pub fn index_keys(ix: &IndexSpec, doc: &Value) -> Result<(Vec<Vec<u8>>, bool), ApiError> {
    let mut out: Vec<Vec<u8>> = vec![vec![]];
    let mut multikey = false;
    for (path, desc) in &ix.fields {
        let (values, multi) = path_keys(doc, &FieldPath::new(path));
        multikey |= multi;
        if out.len() * values.len() > MAX_KEYS_PER_DOC {
            return Err(ApiError::bad_request(format!(
                "document has more than {MAX_KEYS_PER_DOC} keys in index {}",
                ix.name
            )));
        }
        let mut next = Vec::with_capacity(out.len() * values.len());
        for k in &out {
            for v in &values {
                let mut nk = k.clone();
                match v {
                    Key::Value(v) => encode_dir_into(v, *desc, &mut nk),
                    // An empty array indexes as null (the index is multikey, so never
                    // trusted for a sort where the two would differ).
                    Key::Null | Key::EmptyArray => encode_dir_into(&Value::Null, *desc, &mut nk),
                }
                next.push(nk);
            }
        }
        out = next;
    }
    out.sort();
    out.dedup();
    Ok((out, multikey))
}

impl Engine {
    pub(crate) fn remove_index_entries(
        &self,
        ctx: &mut Ctx<'_>,
        coll: &str,
        ix: &IndexSpec,
        ix_keys: &[Vec<u8>],
        id_enc: &[u8],
    ) {
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

    pub(crate) fn add_index_entries(
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
            if ix.unique && !ctx.unchecked {
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

    /// Registers a new index as building, and runs its first step (which builds the index
    /// of a small collection whole).
    pub(crate) fn create_index(&self, ctx: &mut Ctx<'_>, coll: &str, spec: &IndexSpec) -> Result<WriteAnswer, Refusal> {
        let mut meta = self.ensure_collection(ctx, coll);
        if let Some(existing) = meta.indexes.iter().find(|i| i.name == spec.name) {
            if existing.same_definition(spec) {
                return Ok(WriteAnswer::IndexCreated { name: existing.name.clone(), ready: existing.is_ready() });
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
        ix.key_version = super::catalog::KEY_VERSION;
        ix.build = Some(IndexBuild { after: None, indexed: 0 });
        meta.failed_builds.retain(|f| f.name != ix.name);
        meta.indexes.push(ix);
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog(ctx, Some(coll), OplogOp::CreateIndex { spec: serde_json::to_value(spec).unwrap_or_default() });
        match self.build_step(ctx, coll, &spec.name)? {
            WriteAnswer::IndexBuildStep { failed: Some(message), .. } => {
                let code = ctx.metas.get(coll).and_then(|m| m.failed_builds.last()).map(|f| f.code);
                Err(ApiError::new(code.unwrap_or(nimbus_api::ErrorCode::DuplicateKey), message).into())
            }
            WriteAnswer::IndexBuildStep { done, .. } => {
                Ok(WriteAnswer::IndexCreated { name: spec.name.clone(), ready: done })
            }
            other => Ok(other),
        }
    }

    /// Indexes the next documents of a building index; marks it ready after the last.
    pub(crate) fn build_step(&self, ctx: &mut Ctx<'_>, coll: &str, name: &str) -> Result<WriteAnswer, Refusal> {
        let done = WriteAnswer::IndexBuildStep { done: true, failed: None };
        let Some(mut meta) = self.meta(ctx, coll) else { return Ok(done) };
        let Some(pos) = meta.indexes.iter().position(|i| i.name == name) else { return Ok(done) };
        let Some(mut build) = meta.indexes[pos].build.clone() else { return Ok(done) };
        let prefix = keys::coll_prefix(ctx.db, coll);
        let mut start = prefix.clone();
        let after = build.after.as_deref().and_then(|h| hex::decode(h).ok());
        if let Some(a) = &after {
            start.extend_from_slice(a);
        }
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(&prefix) {
            ro.set_iterate_upper_bound(end);
        }
        // The build reads each document once: its blocks would only push the other
        // databases' hot blocks out of the cache.
        ro.fill_cache(false);
        let mut ix = meta.indexes[pos].clone();
        let (mut docs, mut bytes, mut exhausted) = (0u64, 0u64, true);
        let it = self.db.iterator_cf_opt(self.cf(CF_DOCS), ro, IteratorMode::From(&start, Direction::Forward));
        for item in it {
            let (k, v) = item?;
            let id_enc = &k[prefix.len()..];
            if after.as_deref() == Some(id_enc) {
                continue;
            }
            if docs >= BUILD_STEP_DOCS || bytes >= BUILD_STEP_BYTES {
                exhausted = false;
                break;
            }
            let doc: Value = decode("document", &v)?;
            match self.add_index_entries(ctx, coll, &mut ix, &doc, id_enc) {
                Ok(()) => {}
                Err(Refusal::Client(e)) => return Ok(self.fail_build(ctx, coll, meta, pos, e)),
                Err(store) => return Err(store),
            }
            docs += 1;
            bytes += v.len() as u64;
            build.after = Some(hex::encode(id_enc));
        }
        build.indexed += docs;
        ix.build = if exhausted { None } else { Some(build) };
        meta.indexes[pos] = ix;
        ctx.metas.insert(coll.to_owned(), meta);
        Ok(WriteAnswer::IndexBuildStep { done: exhausted, failed: None })
    }

    /// Gives up a build (a duplicate in a unique index): removes the index and its entries,
    /// and records why.
    fn fail_build(
        &self,
        ctx: &mut Ctx<'_>,
        coll: &str,
        mut meta: super::catalog::CollectionMeta,
        pos: usize,
        error: ApiError,
    ) -> WriteAnswer {
        let ix = meta.indexes.remove(pos);
        let prefix = keys::index_prefix(ctx.db, coll, &ix.name);
        ctx.batch.delete_range_cf(self.cf(CF_IDX), &prefix, &prefix_end(&prefix).unwrap_or_default());
        let message = format!("building index {} failed: {}", ix.name, error.message);
        meta.failed_builds.push(FailedBuild { name: ix.name.clone(), message: message.clone(), code: error.code });
        if meta.failed_builds.len() > MAX_FAILED_BUILDS {
            meta.failed_builds.remove(0);
        }
        ctx.metas.insert(coll.to_owned(), meta);
        self.oplog(ctx, Some(coll), OplogOp::DropIndex { name: ix.name });
        WriteAnswer::IndexBuildStep { done: true, failed: Some(message) }
    }
}

/// An encoded `_id`, as index entries and document keys end with it.
pub fn encode_id(id: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    encode_into(id, &mut out);
    out
}
