//! Query execution: runs a plan from the planner over the `docs` and `idx` column
//! families, evaluates the whole filter on every candidate, then sorts, skips, limits and
//! projects. Used by reads and by the applier (to find the documents an update or delete
//! touches), so both see exactly the same matching rules.
//!
//! A read sees one moment: its RocksDB snapshot and the catalog (which indexes exist) are
//! taken together, under the catalog lock the applier holds while it writes a batch and
//! installs its catalog change. Every query's work is bounded ([`Budget`]): past it the
//! query is refused with a message saying what to change, rather than holding a core (or,
//! for writes, the replica set's apply loop).

use std::collections::HashSet;
use std::time::Instant;

use nimbus_api::ApiError;
use nimbus_api::data::CollectionInfo;
use nimbus_api::limits::{
    MAX_FIND_ANSWER_BYTES, MAX_FIND_LIMIT, MAX_READ_EXAMINED_BYTES, MAX_READ_EXAMINED_DOCS, MAX_SKIP, MAX_SORT_BYTES,
    MAX_WRITE_EXAMINED_BYTES, MAX_WRITE_EXAMINED_DOCS,
};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode};
use serde_json::Value;

use super::catalog::IndexSpec;
use super::engine::{Engine, StoreError, decode};
use super::keys::{CF_DOCS, CF_IDX, coll_prefix, doc_key, index_prefix};
use super::stats::ExecStats;
use crate::doc::keycode::prefix_end;
use crate::query::planner::{ID_INDEX, IndexView, Plan, plan};
use crate::query::sort::SortKey;
use crate::query::{Filter, Projection, SortSpec};

/// A document with its storage key.
pub(crate) type Keyed = (Vec<u8>, Value);

/// Why a query gave no answer: the client asked for too much, or storage failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{}", .0.message)]
    Refused(ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rocksdb::Error> for QueryError {
    fn from(e: rocksdb::Error) -> Self {
        QueryError::Store(e.into())
    }
}

/// How much one query may examine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    docs: u64,
    bytes: u64,
    what: &'static str,
}

impl Budget {
    pub(crate) const READ: Budget =
        Budget { docs: MAX_READ_EXAMINED_DOCS, bytes: MAX_READ_EXAMINED_BYTES, what: "query" };
    pub(crate) const WRITE: Budget =
        Budget { docs: MAX_WRITE_EXAMINED_DOCS, bytes: MAX_WRITE_EXAMINED_BYTES, what: "update or delete" };

    fn check(&self, exec: &ExecStats, bytes: u64) -> Result<(), QueryError> {
        let entries = exec.docs_examined.max(exec.keys_examined);
        if entries > self.docs || bytes > self.bytes {
            return Err(QueryError::Refused(ApiError::bad_request(format!(
                "the {} examines more than {} documents ({} MiB): narrow the filter, or add an index on its fields{}",
                self.what,
                self.docs,
                self.bytes >> 20,
                if self.what == "query" { "" } else { "; or write in batches of _id ($in)" }
            ))));
        }
        Ok(())
    }
}

/// A parsed `find`.
#[derive(Debug, Clone)]
pub struct FindQuery {
    pub filter: Filter,
    pub sort: SortSpec,
    pub projection: Option<Projection>,
    pub skip: u64,
    pub limit: Option<u64>,
}

impl FindQuery {
    pub fn parse(req: &nimbus_api::data::FindRequest) -> Result<FindQuery, ApiError> {
        if let Some(l) = req.limit
            && l > MAX_FIND_LIMIT
        {
            return Err(ApiError::bad_request(format!("limit is at most {MAX_FIND_LIMIT}")));
        }
        if let Some(s) = req.skip
            && s > MAX_SKIP
        {
            return Err(ApiError::bad_request(format!(
                "skip is at most {MAX_SKIP}: read deeper pages with a range on the sort field (such as {{\"_id\": {{\"$gt\": <last>}}}})"
            )));
        }
        Ok(FindQuery {
            filter: Filter::parse(req.filter.as_ref())?,
            sort: SortSpec::parse(req.sort.as_ref())?,
            projection: Projection::parse(req.projection.as_ref())?,
            skip: req.skip.unwrap_or(0),
            limit: req.limit.filter(|l| *l > 0),
        })
    }
}

/// Either a consistent snapshot (reads) or the live database (the single applier).
pub(crate) enum View<'a> {
    Live,
    Snapshot(&'a SnapshotWithThreadMode<'a, DB>),
}

impl View<'_> {
    fn read_options(&self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        if let View::Snapshot(s) = self {
            ro.set_snapshot(s);
        }
        ro
    }
}

/// Which documents of the matching ones a caller wants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want<'p> {
    pub skip: u64,
    pub limit: Option<u64>,
    /// Only the matching document with the smallest `_id` (a single update or delete: the
    /// same document on every member, whatever the plan).
    pub first_by_id: bool,
    /// Only how many match (`count`): no document is kept.
    pub count_only: bool,
    /// Applied to each document as it is kept (after its sort keys are taken).
    pub projection: Option<&'p Projection>,
}

impl Want<'_> {
    pub(crate) const ALL: Want<'static> =
        Want { skip: 0, limit: None, first_by_id: false, count_only: false, projection: None };
    pub(crate) const FIRST_BY_ID: Want<'static> =
        Want { skip: 0, limit: Some(1), first_by_id: true, count_only: false, projection: None };
    const COUNT: Want<'static> = Want { skip: 0, limit: None, first_by_id: false, count_only: true, projection: None };
}

/// Most bytes of parsed documents one query holds at once (the answer being built, or an
/// unindexed sort's buffer): parsed JSON takes several times the room of its text.
const MAX_HELD_BYTES: u64 = 512 * 1024 * 1024;

fn answer_too_large() -> QueryError {
    QueryError::Refused(ApiError::bad_request(format!(
        "the answer would be over {} MiB: lower the limit or project fewer fields",
        MAX_FIND_ANSWER_BYTES >> 20
    )))
}

/// The memory a parsed document takes, about: a `Value` per node, plus its text.
fn held_size(v: &Value) -> u64 {
    const NODE: u64 = std::mem::size_of::<Value>() as u64;
    NODE + match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items.iter().map(held_size).sum::<u64>(),
        Value::Object(m) => m.iter().map(|(k, v)| k.len() as u64 + 2 * NODE + held_size(v)).sum::<u64>(),
    }
}

impl Engine {
    /// A RocksDB snapshot and the collection's indexes at one moment; `None` for a
    /// collection that does not exist.
    fn consistent_view(&self, db: &str, coll: &str) -> (SnapshotWithThreadMode<'_, DB>, Option<Vec<IndexSpec>>) {
        let catalog = self.catalog_read();
        let snap = self.db.snapshot();
        (snap, catalog.get(db, coll).map(|m| m.indexes.clone()))
    }

    /// Runs a `find`.
    pub fn find(&self, db: &str, coll: &str, q: &FindQuery) -> Result<Vec<Value>, QueryError> {
        let started = Instant::now();
        let (snap, indexes) = self.consistent_view(db, coll);
        let Some(indexes) = indexes else { return Ok(vec![]) };
        let want = Want {
            skip: q.skip,
            limit: Some(q.limit.unwrap_or(MAX_FIND_LIMIT)),
            first_by_id: false,
            count_only: false,
            projection: q.projection.as_ref(),
        };
        let (docs, exec) =
            self.matching(&View::Snapshot(&snap), db, coll, &indexes, &q.filter, &q.sort, want, Budget::READ)?;
        let mut bytes = 0u64;
        let mut out = Vec::with_capacity(docs.len());
        for (_, d) in docs {
            bytes += approx_size(&d);
            if bytes > MAX_FIND_ANSWER_BYTES {
                return Err(answer_too_large());
            }
            out.push(d);
        }
        let shape = format!("{} sort {}", q.filter.shape(), q.sort.shape());
        self.stats.record(db, coll, "find", &shape, &exec, started.elapsed());
        Ok(out)
    }

    /// Counts matching documents (from the catalog when the filter is empty).
    pub fn count(&self, db: &str, coll: &str, filter: &Filter) -> Result<u64, QueryError> {
        if *filter == Filter::all() {
            return Ok(self.catalog_read().get(db, coll).map(|m| m.documents).unwrap_or(0));
        }
        let started = Instant::now();
        let (snap, indexes) = self.consistent_view(db, coll);
        let Some(indexes) = indexes else { return Ok(0) };
        let sort = SortSpec::default();
        let (_, exec) =
            self.matching(&View::Snapshot(&snap), db, coll, &indexes, filter, &sort, Want::COUNT, Budget::READ)?;
        self.stats.record(db, coll, "count", &filter.shape(), &exec, started.elapsed());
        Ok(exec.returned)
    }

    /// The document with this `_id`.
    pub fn get(&self, db: &str, coll: &str, id: &Value) -> Result<Option<Value>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_DOCS), doc_key(db, coll, id))? {
            Some(bytes) => Ok(Some(decode("document", &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn collection_exists(&self, db: &str, coll: &str) -> bool {
        self.catalog_read().get(db, coll).is_some()
    }

    pub fn list_collections(&self, db: &str) -> Vec<CollectionInfo> {
        let catalog = self.catalog_read();
        catalog
            .dbs
            .get(db)
            .map(|colls| {
                colls.iter().map(|(name, m)| CollectionInfo { name: name.clone(), documents: m.documents }).collect()
            })
            .unwrap_or_default()
    }

    /// A collection's catalog entry; `None` when the collection does not exist.
    pub fn catalog_meta(&self, db: &str, coll: &str) -> Option<super::catalog::CollectionMeta> {
        self.catalog_read().get(db, coll).cloned()
    }

    /// Every index being built, as (database, collection, index).
    pub fn building_indexes(&self) -> Vec<(String, String, String)> {
        let catalog = self.catalog_read();
        let mut out = Vec::new();
        for (db, colls) in &catalog.dbs {
            for (coll, meta) in colls {
                for ix in meta.indexes.iter().filter(|i| !i.is_ready()) {
                    out.push((db.clone(), coll.clone(), ix.name.clone()));
                }
            }
        }
        out
    }

    /// Indexes of a collection; `None` when the collection does not exist.
    pub fn list_indexes(&self, db: &str, coll: &str) -> Option<Vec<IndexSpec>> {
        self.catalog_read().get(db, coll).map(|m| m.indexes.clone())
    }

    pub(crate) fn catalog_read(&self) -> std::sync::RwLockReadGuard<'_, super::catalog::Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Documents matching `filter`, in `sort` order, as `want` asks; each with its storage
    /// key. `indexes` are the collection's, as of `view`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matching(
        &self,
        view: &View<'_>,
        db: &str,
        coll: &str,
        indexes: &[IndexSpec],
        filter: &Filter,
        sort: &SortSpec,
        want: Want<'_>,
        budget: Budget,
    ) -> Result<(Vec<Keyed>, ExecStats), QueryError> {
        let id_fields = [("_id".to_owned(), false)];
        let views: Vec<IndexView<'_>> =
            std::iter::once(IndexView { name: ID_INDEX, fields: &id_fields, multikey: false })
                .chain(indexes.iter().filter(|i| i.is_ready()).map(|i| IndexView {
                    name: &i.name,
                    fields: &i.fields,
                    multikey: i.multikey,
                }))
                .collect();
        let chosen = plan(filter, sort, want.limit.is_some(), &views);
        let mut exec = ExecStats { plan: chosen.describe(), ..Default::default() };
        let in_id_order = match &chosen {
            Plan::CollScan => true,
            Plan::IndexScan { index, .. } => index == ID_INDEX,
        };
        let limit = if want.first_by_id && !in_id_order { None } else { want.limit };
        let needs_sort = !sort.is_empty() && !matches!(chosen, Plan::IndexScan { provides_sort: true, .. });
        let window = limit.map(|l| want.skip.saturating_add(l));

        let mut out: Vec<Keyed> = Vec::new();
        let mut sorted: Vec<(Vec<SortKey>, u64, Keyed)> = Vec::new();
        let mut sorted_bytes = 0u64;
        let mut held_bytes = 0u64;
        let mut examined_bytes = 0u64;
        let mut skipped = 0u64;
        let mut matched = 0u64;
        // Called for each matching document; returns false to stop the scan.
        let mut accept = |key: Vec<u8>, doc: Value| -> Result<bool, QueryError> {
            matched += 1;
            if want.count_only {
                return Ok(true);
            }
            let keys = needs_sort.then(|| sort.keys_of(&doc));
            let doc = match want.projection {
                Some(p) => p.apply(&doc),
                None => doc,
            };
            let size = held_size(&doc);
            if let Some(keys) = keys {
                sorted_bytes += size;
                insert_bounded(&mut sorted, (keys, size, (key, doc)), sort, window, &mut sorted_bytes);
                if sorted_bytes > MAX_SORT_BYTES {
                    return Err(QueryError::Refused(ApiError::bad_request(format!(
                        "the sort needs more than {} MiB: add an index on the sort fields, or lower skip and limit",
                        MAX_SORT_BYTES >> 20
                    ))));
                }
                return Ok(true);
            }
            if skipped < want.skip {
                skipped += 1;
                return Ok(true);
            }
            held_bytes += size;
            if held_bytes > MAX_HELD_BYTES {
                return Err(answer_too_large());
            }
            out.push((key, doc));
            Ok(limit.is_none_or(|l| (out.len() as u64) < l))
        };

        let cprefix = coll_prefix(db, coll);
        // The documents themselves, keyed by `_id` (a collection scan is one range over them,
        // the `_id_` index is the documents): ranges are disjoint and ascending.
        let doc_ranges: Option<Vec<KeyRange>> = match &chosen {
            Plan::CollScan => Some(vec![(cprefix.clone(), prefix_end(&cprefix))]),
            Plan::IndexScan { index, ranges, .. } if index == ID_INDEX => Some(
                ranges
                    .iter()
                    .map(|(lo, hi)| {
                        let mut start = cprefix.clone();
                        start.extend_from_slice(lo);
                        let mut end = cprefix.clone();
                        end.extend_from_slice(hi);
                        (start, Some(end))
                    })
                    .collect(),
            ),
            Plan::IndexScan { .. } => None,
        };
        if let Some(doc_ranges) = doc_ranges {
            'id_ranges: for (start, end) in doc_ranges {
                let mut ro = view.read_options();
                if let Some(end) = end {
                    ro.set_iterate_upper_bound(end);
                }
                let it = self.db.iterator_cf_opt(self.cf(CF_DOCS), ro, IteratorMode::From(&start, Direction::Forward));
                for item in it {
                    let (k, v) = item?;
                    exec.docs_examined += 1;
                    examined_bytes += v.len() as u64;
                    budget.check(&exec, examined_bytes)?;
                    let doc: Value = decode("document", &v)?;
                    if filter.matches(&doc) && !accept(k.to_vec(), doc)? {
                        break 'id_ranges;
                    }
                }
            }
        } else if let Plan::IndexScan { index, ranges, exact, .. } = &chosen {
            // The smallest `_id` is the first match of some range when each range's entries
            // come in `_id` order: the rest of a range after its first match is skipped.
            let first_per_range = want.first_by_id && *exact;
            let ix_prefix = index_prefix(db, coll, index);
            // A document reached by several keys (an array's elements, `$in` values) is
            // examined once.
            let mut seen: HashSet<Vec<u8>> = HashSet::new();
            'ranges: for (lo, hi) in ranges {
                let mut start = ix_prefix.clone();
                start.extend_from_slice(lo);
                let mut end = ix_prefix.clone();
                end.extend_from_slice(hi);
                let mut ro = view.read_options();
                ro.set_iterate_upper_bound(end);
                let it = self.db.iterator_cf_opt(self.cf(CF_IDX), ro, IteratorMode::From(&start, Direction::Forward));
                for item in it {
                    let (_, id_enc) = item?;
                    exec.keys_examined += 1;
                    budget.check(&exec, examined_bytes)?;
                    let mut key = cprefix.clone();
                    key.extend_from_slice(&id_enc);
                    if !seen.insert(key.clone()) {
                        continue;
                    }
                    let Some(bytes) = self.db.get_pinned_cf_opt(self.cf(CF_DOCS), &key, &view.read_options())? else {
                        continue;
                    };
                    exec.docs_examined += 1;
                    examined_bytes += bytes.len() as u64;
                    budget.check(&exec, examined_bytes)?;
                    let doc: Value = decode("document", &bytes)?;
                    if filter.matches(&doc) {
                        if !accept(key, doc)? {
                            break 'ranges;
                        }
                        if first_per_range {
                            continue 'ranges;
                        }
                    }
                }
            }
        }
        if needs_sort {
            out = sorted.into_iter().skip(want.skip as usize).map(|(_, _, kd)| kd).collect();
        }
        if want.first_by_id && !in_id_order {
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out.truncate(1);
        }
        exec.returned = if want.count_only { matched } else { out.len() as u64 };
        Ok((out, exec))
    }
}

/// A document's size as JSON, without serialising it (close enough for a budget).
fn approx_size(v: &Value) -> u64 {
    match v {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 12,
        Value::String(s) => s.len() as u64 + 2,
        Value::Array(items) => 2 + items.iter().map(|i| approx_size(i) + 1).sum::<u64>(),
        Value::Object(m) => 2 + m.iter().map(|(k, v)| k.len() as u64 + 4 + approx_size(v)).sum::<u64>(),
    }
}

/// A scan's start key and exclusive end (none: to the end of the column family).
type KeyRange = (Vec<u8>, Option<Vec<u8>>);

type SortEntry = (Vec<SortKey>, u64, Keyed);

/// Inserts into a sorted buffer that keeps only the first `window` entries, so an unindexed
/// sort with a limit holds at most skip + limit documents; `bytes` follows what it holds.
fn insert_bounded(buf: &mut Vec<SortEntry>, item: SortEntry, sort: &SortSpec, window: Option<u64>, bytes: &mut u64) {
    // Ties keep scan order (by `_id` for a collection scan): insert after equal elements.
    let pos = buf.partition_point(|(k, _, _)| sort.compare_keys(k, &item.0) != std::cmp::Ordering::Greater);
    if let Some(w) = window
        && pos as u64 >= w
    {
        *bytes -= item.1;
        return;
    }
    buf.insert(pos, item);
    if let Some(w) = window {
        while buf.len() as u64 > w {
            if let Some((_, size, _)) = buf.pop() {
                *bytes -= size;
            }
        }
    }
}
