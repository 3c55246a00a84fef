//! Query execution: runs a plan from the planner over the `docs` and `idx` column
//! families, evaluates the whole filter on every candidate, then sorts, skips, limits and
//! projects. Used by reads and by the applier (to find the documents an update or delete
//! touches), so both see exactly the same matching rules.

use std::collections::HashSet;
use std::time::Instant;

use nimbus_api::ApiError;
use nimbus_api::data::CollectionInfo;
use nimbus_api::limits::MAX_FIND_LIMIT;
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode};
use serde_json::Value;

use super::catalog::IndexSpec;
use super::engine::{Engine, StoreError, decode};
use super::keys::{CF_DOCS, CF_IDX, coll_prefix, doc_key, index_prefix};
use super::stats::ExecStats;
use crate::doc::keycode::prefix_end;
use crate::query::planner::{IndexView, Plan, plan};
use crate::query::{Filter, Projection, SortSpec};

/// A document with its storage key.
pub(crate) type Keyed = (Vec<u8>, Value);

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

impl Engine {
    /// Runs a `find`.
    pub fn find(&self, db: &str, coll: &str, q: &FindQuery) -> Result<Vec<Value>, StoreError> {
        let started = Instant::now();
        let snap = self.db.snapshot();
        let limit = q.limit.unwrap_or(MAX_FIND_LIMIT);
        let (docs, exec) = self.matching(&View::Snapshot(&snap), db, coll, &q.filter, &q.sort, q.skip, Some(limit))?;
        let docs: Vec<Value> = match &q.projection {
            Some(p) => docs.iter().map(|(_, d)| p.apply(d)).collect(),
            None => docs.into_iter().map(|(_, d)| d).collect(),
        };
        let shape = format!("{} sort {}", q.filter.shape(), q.sort.shape());
        self.stats.record(db, coll, "find", &shape, &exec, started.elapsed());
        Ok(docs)
    }

    /// Counts matching documents (from the catalog when the filter is empty).
    pub fn count(&self, db: &str, coll: &str, filter: &Filter) -> Result<u64, StoreError> {
        if *filter == Filter::all() {
            return Ok(self.catalog_read().get(db, coll).map(|m| m.documents).unwrap_or(0));
        }
        let started = Instant::now();
        let snap = self.db.snapshot();
        let (docs, exec) = self.matching(&View::Snapshot(&snap), db, coll, filter, &SortSpec::default(), 0, None)?;
        self.stats.record(db, coll, "count", &filter.shape(), &exec, started.elapsed());
        Ok(docs.len() as u64)
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

    /// Indexes of a collection; `None` when the collection does not exist.
    pub fn list_indexes(&self, db: &str, coll: &str) -> Option<Vec<IndexSpec>> {
        self.catalog_read().get(db, coll).map(|m| m.indexes.clone())
    }

    pub(crate) fn catalog_read(&self) -> std::sync::RwLockReadGuard<'_, super::catalog::Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Documents matching `filter`, in `sort` order, after `skip`, at most `limit`; each with
    /// its storage key.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matching(
        &self,
        view: &View<'_>,
        db: &str,
        coll: &str,
        filter: &Filter,
        sort: &SortSpec,
        skip: u64,
        limit: Option<u64>,
    ) -> Result<(Vec<Keyed>, ExecStats), StoreError> {
        let indexes = match self.catalog_read().get(db, coll) {
            Some(m) => m.indexes.clone(),
            None => return Ok((vec![], ExecStats { plan: "EOF".into(), ..Default::default() })),
        };
        let views: Vec<IndexView<'_>> =
            indexes.iter().map(|i| IndexView { name: &i.name, fields: &i.fields, multikey: i.multikey }).collect();
        let chosen = plan(filter, sort, limit.is_some(), &views);
        let mut exec = ExecStats { plan: chosen.describe(), ..Default::default() };

        let needs_sort = !sort.is_empty() && !matches!(chosen, Plan::IndexScan { provides_sort: true, .. });
        let window = limit.map(|l| skip.saturating_add(l));
        let mut out: Vec<Keyed> = Vec::new();
        let mut skipped = 0u64;
        // Called for each matching document; returns false to stop the scan.
        let mut accept = |key: Vec<u8>, doc: Value| -> bool {
            if needs_sort {
                insert_bounded(&mut out, (key, doc), sort, window);
                return true;
            }
            if skipped < skip {
                skipped += 1;
                return true;
            }
            out.push((key, doc));
            limit.is_none_or(|l| (out.len() as u64) < l)
        };

        match &chosen {
            Plan::CollScan => {
                let prefix = coll_prefix(db, coll);
                let mut ro = view.read_options();
                if let Some(end) = prefix_end(&prefix) {
                    ro.set_iterate_upper_bound(end);
                }
                let it = self.db.iterator_cf_opt(self.cf(CF_DOCS), ro, IteratorMode::From(&prefix, Direction::Forward));
                for item in it {
                    let (k, v) = item?;
                    exec.docs_examined += 1;
                    let doc: Value = decode("document", &v)?;
                    if filter.matches(&doc) && !accept(k.to_vec(), doc) {
                        break;
                    }
                }
            }
            Plan::IndexScan { index, ranges, .. } => {
                let ix_prefix = index_prefix(db, coll, index);
                let cprefix = coll_prefix(db, coll);
                let multikey = indexes.iter().any(|i| &i.name == index && i.multikey);
                let mut seen: HashSet<Vec<u8>> = HashSet::new();
                'ranges: for (lo, hi) in ranges {
                    let mut start = ix_prefix.clone();
                    start.extend_from_slice(lo);
                    let mut end = ix_prefix.clone();
                    end.extend_from_slice(hi);
                    let mut ro = view.read_options();
                    ro.set_iterate_upper_bound(end);
                    let it =
                        self.db.iterator_cf_opt(self.cf(CF_IDX), ro, IteratorMode::From(&start, Direction::Forward));
                    for item in it {
                        let (_, id_enc) = item?;
                        exec.keys_examined += 1;
                        let mut key = cprefix.clone();
                        key.extend_from_slice(&id_enc);
                        if (multikey || ranges.len() > 1) && !seen.insert(key.clone()) {
                            continue;
                        }
                        let Some(bytes) = self.db.get_pinned_cf_opt(self.cf(CF_DOCS), &key, &view.read_options())?
                        else {
                            continue;
                        };
                        exec.docs_examined += 1;
                        let doc: Value = decode("document", &bytes)?;
                        if filter.matches(&doc) && !accept(key, doc) {
                            break 'ranges;
                        }
                    }
                }
            }
        }
        if needs_sort {
            out = out.into_iter().skip(skip as usize).collect();
        }
        exec.returned = out.len() as u64;
        Ok((out, exec))
    }
}

/// Inserts into a sorted buffer that keeps only the first `window` entries, so an unindexed
/// sort with a limit holds at most skip + limit documents.
fn insert_bounded(buf: &mut Vec<Keyed>, item: Keyed, sort: &SortSpec, window: Option<u64>) {
    // Ties keep scan order (by `_id` for a collection scan): insert after equal elements.
    let pos = buf.partition_point(|(_, d)| sort.compare(d, &item.1) != std::cmp::Ordering::Greater);
    if let Some(w) = window
        && pos as u64 >= w
    {
        return;
    }
    buf.insert(pos, item);
    if let Some(w) = window {
        buf.truncate(w as usize);
    }
}
