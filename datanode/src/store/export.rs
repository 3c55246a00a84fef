//! Hot migration's source side: a database exported page by page, each page from one
//! RocksDB snapshot, and the oplog of one database read by position. Both run off the
//! apply loop (the admin handlers call them in `spawn_blocking`).

use nimbus_api::admin::OplogEntry;
use nimbus_api::migration::{
    DbOplogPage, ExportPage, ExportPart, ExportedCollection, ExportedDoc, ExportedIdempotency, OplogPosition,
};
use nimbus_api::{ApiError, ErrorCode};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode};
use serde_json::value::RawValue;

use super::apply::IdemRecord;
use super::catalog::CollectionMeta;
use super::engine::{Engine, StoreError, decode};
use super::keys::{self, CF_CATALOG, CF_DOCS, CF_IDEM, CF_IDEM_TTL, CF_META, CF_OPLOG, META_APPLIED, META_CLOCK};
use super::read::QueryError;
use crate::doc::keycode::prefix_end;

/// Most oplog entries (of any database) one page of a database's oplog scans, per change
/// it may return: a page of a quiet database among busy ones ends early, with `next`
/// moved on, rather than reading the whole oplog.
pub const OPLOG_SCAN_PER_CHANGE: usize = 10;

/// About the most bytes of changes (their stored JSON) one page of a database's oplog
/// holds: a page is proposed on the target as one import entry, which must stay well below
/// the append bound (8 MiB) whatever the changes' sizes. A single larger change is still
/// sent, alone.
pub const OPLOG_PAGE_BYTES: usize = 1 << 20;

fn snapshot_options(snap: &SnapshotWithThreadMode<'_, DB>) -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_snapshot(snap);
    // An export reads each block once: it would only push hot blocks out of the cache.
    ro.fill_cache(false);
    ro
}

fn bad_cursor(why: &str) -> QueryError {
    QueryError::Refused(ApiError::bad_request(format!("invalid export cursor `after`: {why}")))
}

impl Engine {
    fn snapshot_meta<T: serde::de::DeserializeOwned>(
        &self,
        snap: &SnapshotWithThreadMode<'_, DB>,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.db.get_cf_opt(self.cf(CF_META), key, &snapshot_options(snap))? {
            Some(v) => Ok(Some(decode("meta", &v)?)),
            None => Ok(None),
        }
    }

    fn snapshot_applied(&self, snap: &SnapshotWithThreadMode<'_, DB>) -> Result<u64, StoreError> {
        let applied: Option<Option<crate::raft::types::LogId>> = self.snapshot_meta(snap, META_APPLIED)?;
        Ok(applied.flatten().map(|l| l.index).unwrap_or(0))
    }

    /// One page of database `db` (see `nimbus_api::migration::ExportRequest`), from one
    /// snapshot. `after` is the previous page's `next`: the storage key of the last item it
    /// held, hex (with `since_ms`, the key of its `idem_ttl` entry).
    pub fn export_page(
        &self,
        db: &str,
        part: ExportPart,
        after: Option<&str>,
        max_bytes: u64,
        since_ms: Option<u64>,
    ) -> Result<ExportPage, QueryError> {
        let snap = self.db.snapshot();
        let index = self.snapshot_applied(&snap)?;
        // The clock of the same snapshot: a record written after it has a time at or after
        // this (the caller's `since_ms` for the records written after this copy).
        let clock_ms: u64 = self.snapshot_meta(&snap, META_CLOCK)?.unwrap_or(0);
        // A database being imported (a restore into a new instance, a migration's target)
        // is not a state of its own yet, and imports write no oplog a replay could mend
        // a copy with: a full backup of it now would be partial for good.
        let incoming: Option<super::import::IncomingMark> =
            self.snapshot_meta(&snap, &keys::meta_key(keys::META_INCOMING, db))?;
        if let Some(mark) = incoming {
            return Err(QueryError::Refused(nimbus_api::ApiError::new(
                nimbus_api::ErrorCode::Unavailable,
                format!(
                    "database {db} is being imported ({}): it cannot be exported until it is served; retry then",
                    mark.migration
                ),
            )));
        }
        let prefix = keys::db_prefix(db);
        let since_ms = since_ms.filter(|_| part == ExportPart::Idempotency);
        let after = match after {
            None => None,
            Some(h) => {
                let key = hex::decode(h).map_err(|_| bad_cursor("not hex"))?;
                // With `since_ms` the cursor is an `idem_ttl` key: a time, then the record's key.
                let own = if since_ms.is_some() { key.get(8..).unwrap_or_default() } else { &key[..] };
                if !own.starts_with(&prefix) {
                    return Err(bad_cursor("not a position in this database"));
                }
                Some(key)
            }
        };
        let mut page =
            ExportPage { index, clock_ms, collections: vec![], docs: vec![], idempotency: vec![], next: None };
        match part {
            ExportPart::Documents => {
                page.collections = self.export_collections(&snap, &prefix)?;
                page.next = self.scan_page(&snap, CF_DOCS, &prefix, after, max_bytes, |key, value| {
                    let rest = &key[prefix.len()..];
                    let coll_len = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
                    let coll = String::from_utf8_lossy(&rest[..coll_len]).into_owned();
                    let text = String::from_utf8(value.to_vec()).map_err(|_| StoreError::Decode {
                        what: "document",
                        source: serde::de::Error::custom("not UTF-8"),
                    })?;
                    let doc = RawValue::from_string(text)
                        .map_err(|source| StoreError::Decode { what: "document", source })?;
                    page.docs.push(ExportedDoc { coll, doc });
                    Ok(())
                })?;
            }
            ExportPart::Idempotency => {
                let ttl = self.options.idempotency_ttl.as_millis() as u64;
                let mut take = |key: &[u8], value: &[u8]| -> Result<bool, StoreError> {
                    let rec: IdemRecord = decode("idempotency record", value)?;
                    if rec.ts_ms.saturating_add(ttl) <= clock_ms {
                        return Ok(false);
                    }
                    let text = String::from_utf8_lossy(value).into_owned();
                    let record = RawValue::from_string(text)
                        .map_err(|source| StoreError::Decode { what: "idempotency record", source })?;
                    let key = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                    // The time of its `idem_ttl` entry, which the target keeps.
                    page.idempotency.push(ExportedIdempotency { key, ts_ms: rec.entry_ms(), record });
                    Ok(true)
                };
                page.next = match since_ms {
                    None => self.scan_page(&snap, CF_IDEM, &prefix, after, max_bytes, |k, v| take(k, v).map(|_| ()))?,
                    Some(since) => self.scan_idem_since(&snap, &prefix, since, after, max_bytes, take)?,
                };
            }
        }
        Ok(page)
    }

    /// Feeds `take` the database's idempotency records written at or after `since_ms`, in
    /// time order, through the `idem_ttl` column family (time first), so the records of the
    /// last seconds are found without reading the older ones. Stops once `max_bytes` of
    /// records were taken (at least one); answers the cursor of the next page (the last
    /// `idem_ttl` key taken, hex), `None` when none is left. `take` answers whether it kept
    /// the record (an expired one it leaves out).
    fn scan_idem_since(
        &self,
        snap: &SnapshotWithThreadMode<'_, DB>,
        prefix: &[u8],
        since_ms: u64,
        after: Option<Vec<u8>>,
        max_bytes: u64,
        mut take: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<Option<String>, StoreError> {
        let start = after.clone().unwrap_or_else(|| since_ms.to_be_bytes().to_vec());
        let (mut bytes, mut taken) = (0u64, 0u64);
        let mut last: Option<Vec<u8>> = None;
        let ttl_keys = self.db.iterator_cf_opt(
            self.cf(CF_IDEM_TTL),
            snapshot_options(snap),
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in ttl_keys {
            let (k, _) = item?;
            if after.as_deref() == Some(&k[..]) {
                continue;
            }
            let (Some(ts), Some(idem_key)) = (keys::idem_ttl_key_time(&k), k.get(8..)) else { continue };
            if ts < since_ms || !idem_key.starts_with(prefix) {
                continue;
            }
            if taken > 0 && bytes >= max_bytes {
                return Ok(last.map(hex::encode));
            }
            // Gone (expired and collected), or rewritten later: then its own, later
            // `idem_ttl` entry brings it, once.
            let Some(value) = self.db.get_cf_opt(self.cf(CF_IDEM), idem_key, &snapshot_options(snap))? else {
                continue;
            };
            let rec: IdemRecord = decode("idempotency record", &value)?;
            if rec.entry_ms() != ts {
                continue;
            }
            if take(idem_key, &value)? {
                bytes += (idem_key.len() + value.len()) as u64;
                taken += 1;
                last = Some(k.to_vec());
            }
        }
        Ok(None)
    }

    /// Every collection of the database (under `prefix`) with its index specifications.
    fn export_collections(
        &self,
        snap: &SnapshotWithThreadMode<'_, DB>,
        prefix: &[u8],
    ) -> Result<Vec<ExportedCollection>, StoreError> {
        let mut ro = snapshot_options(snap);
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(self.cf(CF_CATALOG), ro, IteratorMode::From(prefix, Direction::Forward)) {
            let (k, v) = item?;
            let name = &k[prefix.len()..];
            let name = name.strip_suffix(&[0]).unwrap_or(name);
            let meta: CollectionMeta = decode("catalog entry", &v)?;
            let indexes = meta.indexes.iter().map(|ix| serde_json::to_value(ix).unwrap_or_default()).collect();
            out.push(ExportedCollection { name: String::from_utf8_lossy(name).into_owned(), indexes });
        }
        Ok(out)
    }

    /// Feeds `take` the entries of `cf` under `prefix` after `after`, in key order, until
    /// `max_bytes` of them were read (at least one); answers the cursor of the next page,
    /// `None` when none is left.
    fn scan_page(
        &self,
        snap: &SnapshotWithThreadMode<'_, DB>,
        cf: &'static str,
        prefix: &[u8],
        after: Option<Vec<u8>>,
        max_bytes: u64,
        mut take: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<Option<String>, StoreError> {
        let mut ro = snapshot_options(snap);
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let start = after.clone().unwrap_or_else(|| prefix.to_vec());
        let (mut bytes, mut read) = (0u64, 0u64);
        let mut last: Option<Vec<u8>> = None;
        for item in self.db.iterator_cf_opt(self.cf(cf), ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if after.as_deref() == Some(&k[..]) {
                continue;
            }
            if read > 0 && bytes >= max_bytes {
                return Ok(last.map(hex::encode));
            }
            take(&k, &v)?;
            bytes += (k.len() + v.len()) as u64;
            read += 1;
            last = Some(k.to_vec());
        }
        Ok(None)
    }

    /// The changes of database `db` after `after`, oldest first, at most `limit` and about
    /// [`OPLOG_PAGE_BYTES`] of them (at least one); scans at most [`OPLOG_SCAN_PER_CHANGE`] ×
    /// `limit` entries. Refused with `OplogTruncated` when retention removed changes after
    /// `after`.
    pub fn read_db_oplog(&self, db: &str, after: OplogPosition, limit: usize) -> Result<DbOplogPage, QueryError> {
        let snap = self.db.snapshot();
        let applied_index = self.snapshot_applied(&snap)?;
        let gc_through: u64 = self.snapshot_meta(&snap, keys::META_OPLOG_GC_THROUGH)?.unwrap_or(0);
        if gc_through > 0 && after < OplogPosition::end_of(gc_through) {
            return Err(QueryError::Refused(ApiError::new(
                ErrorCode::OplogTruncated,
                format!(
                    "the oplog after index {} seq {} is no longer retained (retention removed it through index {gc_through}): start again from an export",
                    after.index, after.seq
                ),
            )));
        }
        let start = if after.seq == u32::MAX {
            keys::oplog_key(after.index.saturating_add(1), 0)
        } else {
            keys::oplog_key(after.index, after.seq + 1)
        };
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut next = after;
        let mut exhausted = true;
        let scan_limit = limit.saturating_mul(OPLOG_SCAN_PER_CHANGE);
        let ro = snapshot_options(&snap);
        let it = self.db.iterator_cf_opt(self.cf(CF_OPLOG), ro, IteratorMode::From(&start, Direction::Forward));
        for (scanned, item) in it.enumerate() {
            if entries.len() >= limit || scanned >= scan_limit {
                exhausted = false;
                break;
            }
            let (k, v) = item?;
            let e: OplogEntry = decode("oplog entry", &v)?;
            if e.db == db {
                // Full: this change starts the next page (`next` stays on the last one
                // returned, possibly in the middle of an entry's changes).
                if !entries.is_empty() && bytes + v.len() > OPLOG_PAGE_BYTES {
                    exhausted = false;
                    break;
                }
                bytes += v.len();
                entries.push(e);
            }
            if let Some((index, seq)) = keys::oplog_key_position(&k) {
                next = OplogPosition { index, seq };
            }
        }
        if exhausted {
            // Everything this member applied was read: later entries without changes
            // (markers, route epochs) are behind the reader too.
            next = next.max(OplogPosition::end_of(applied_index));
        }
        let clock_ms: u64 = self.snapshot_meta(&snap, META_CLOCK)?.unwrap_or(0);
        Ok(DbOplogPage { entries, next, applied_index, clock_ms })
    }
}
