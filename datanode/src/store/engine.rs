//! The RocksDB instance of a state machine and its in-memory catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::catalog::{Catalog, CollectionMeta};
use super::keys::{self, ALL_CFS, CF_CATALOG, CF_META, CF_OPLOG, META_CLOCK, META_INCOMING, META_ROUTE_EPOCH};
use super::stats::QueryStats;

/// Failures of the storage layer. All are I/O or corruption: not the client's fault, and
/// not retryable on the same member.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to access RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("failed to decode stored {what}: {source}")]
    Decode { what: &'static str, source: serde_json::Error },
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

/// Tunables of the state machine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How long oplog entries are kept (point-in-time recovery and migration read them).
    pub oplog_retention: Duration,
    /// How long an idempotency key's answer is remembered.
    pub idempotency_ttl: Duration,
    /// The most bytes of documents a restore's `Publish` moves in its one entry
    /// (`nimbus_api::migration::MAX_PUBLISH_BYTES` by default). Decided in the apply loop:
    /// every member of a replica set must have the same value, or they would disagree on
    /// whether a `Publish` applies.
    pub max_publish_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            oplog_retention: Duration::from_secs(7 * 24 * 3600),
            idempotency_ttl: Duration::from_secs(600),
            max_publish_bytes: nimbus_api::migration::MAX_PUBLISH_BYTES,
        }
    }
}

/// One state-machine database. Reads take `&self` and may run concurrently with the
/// (single) applier.
pub struct Engine {
    pub(crate) db: DB,
    pub(crate) path: PathBuf,
    pub(crate) catalog: RwLock<Catalog>,
    pub(crate) options: EngineOptions,
    pub stats: QueryStats,
    /// The replica set's clock, ms since the Unix epoch: the largest command time applied,
    /// persisted with each command (`META_CLOCK`), so every member and every restart
    /// continues from the same value.
    pub(crate) clock_ms: AtomicU64,
}

/// A state machine's files opened read-only, to read what a checkpoint holds: nothing is
/// written into them.
pub struct CheckpointReader {
    db: DB,
}

impl CheckpointReader {
    /// Opens the `meta` column family alone, with few table files open at once: what the
    /// other column families hold (the documents) is neither opened nor read.
    pub fn open(path: &Path) -> Result<CheckpointReader, StoreError> {
        let mut options = db_options();
        options.set_max_open_files(16);
        let cfs = [ColumnFamilyDescriptor::new(CF_META, cf_options())];
        Ok(CheckpointReader { db: DB::open_cf_descriptors_read_only(&options, path, cfs, false)? })
    }

    /// Reads a JSON value from the `meta` column family.
    pub fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        // Every column family in ALL_CFS is in a checkpoint of an engine; a missing one is
        // a checkpoint of something else.
        let cf = self.db.cf_handle(CF_META).ok_or_else(|| StoreError::Io {
            action: "find the meta column family in",
            path: self.db.path().to_owned(),
            source: std::io::Error::other("not a state machine's checkpoint"),
        })?;
        match self.db.get_pinned_cf(cf, key)? {
            Some(bytes) => Ok(Some(decode("meta", &bytes)?)),
            None => Ok(None),
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("path", &self.path).finish()
    }
}

pub(crate) fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_max_background_jobs(2);
    o.set_keep_log_file_num(4);
    // All column families flush together, so the table files always hold one consistent
    // state: the documents, index entries, oplog and applied index of the same entries.
    // The state machine writes no WAL (see `Engine::write`): these table files are all a
    // crash leaves of it, and a restart applies the Raft log again from their applied index.
    o.set_atomic_flush(true);
    // Table files written out 1 MiB at a time as they are built, not all at their end: a
    // flush (a snapshot flushes every column family at once) or a compaction then never
    // leaves tens of MiB of dirty pages for one writeback, which the Raft log's fsyncs on
    // the same disk would wait behind (RocksDB's tuning guide suggests 1 MiB).
    o.set_bytes_per_sync(1 << 20);
    o
}

/// Column-family options: bloom filters, since every insert looks up its `_id` (a miss,
/// usually) and every idempotent write its key.
fn cf_options() -> Options {
    let mut o = db_options();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    o.set_block_based_table_factory(&table);
    o.set_memtable_prefix_bloom_ratio(0.1);
    o.set_memtable_whole_key_filtering(true);
    o
}

impl Engine {
    pub fn open(path: &Path, options: EngineOptions) -> Result<Engine, StoreError> {
        let cfs = ALL_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options()));
        let db = DB::open_cf_descriptors(&db_options(), path, cfs)?;
        let engine = Engine {
            db,
            path: path.to_owned(),
            catalog: RwLock::new(Catalog::default()),
            options,
            stats: QueryStats::default(),
            clock_ms: AtomicU64::new(0),
        };
        engine.load_catalog()?;
        engine.clock_ms.store(engine.get_meta::<u64>(META_CLOCK)?.unwrap_or(0), Ordering::Release);
        Ok(engine)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cf(&self, name: &'static str) -> &ColumnFamily {
        // Every column family in ALL_CFS is created by `open`; a missing one is a bug.
        #[allow(clippy::expect_used)]
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn load_catalog(&self) -> Result<(), StoreError> {
        let mut catalog = Catalog::default();
        for item in self.db.iterator_cf(self.cf(CF_CATALOG), IteratorMode::Start) {
            let (k, v) = item?;
            let mut parts = k.split(|b| *b == 0);
            let (Some(db), Some(coll)) = (parts.next(), parts.next()) else { continue };
            let mut meta: CollectionMeta = decode("catalog entry", &v)?;
            meta.upgrade();
            let (db_name, coll_name) = (String::from_utf8_lossy(db), String::from_utf8_lossy(coll));
            if meta.checksum.is_none() {
                // Written before collections carried their checksum: computed once from the
                // documents and stored (every member computes the same from the same data,
                // so this write outside the log changes no answer).
                meta.checksum = Some(self.scan_sum(ReadOptions::default, &db_name, &coll_name)?.checksum);
                self.db.put_cf(self.cf(CF_CATALOG), &k, encode(&meta))?;
            }
            catalog
                .dbs
                .entry(String::from_utf8_lossy(db).into_owned())
                .or_default()
                .insert(String::from_utf8_lossy(coll).into_owned(), meta);
        }
        catalog.route_epochs = self.meta_by_db(META_ROUTE_EPOCH, "route epoch")?;
        catalog.epochs_written = self.meta_by_db(keys::META_EPOCH_WRITTEN, "written epoch")?;
        let marks = self.meta_by_db::<super::import::IncomingMark>(META_INCOMING, "incoming mark")?;
        catalog.incoming = marks.into_iter().map(|(db, mark)| (db, mark.migration)).collect();
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = catalog;
        Ok(())
    }

    /// The CF_META records under `prefix` (`prefix` then a database name), by database.
    fn meta_by_db<T: DeserializeOwned>(
        &self,
        prefix: &[u8],
        what: &'static str,
    ) -> Result<BTreeMap<String, T>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(prefix, Direction::Forward)) {
            let (k, v) = item?;
            let Some(db) = k.strip_prefix(prefix) else { break };
            out.insert(String::from_utf8_lossy(db).into_owned(), decode(what, &v)?);
        }
        Ok(out)
    }

    /// Refuses a client request whose route epoch is older than the database's, or for a
    /// database this replica set is still importing (`StaleRoute` both: the route the
    /// sender used does not name this replica set, or no longer does).
    pub fn check_route_epoch(&self, db: &str, epoch: u64) -> Result<(), nimbus_api::ApiError> {
        let catalog = self.catalog.read().unwrap_or_else(|p| p.into_inner());
        let known = catalog.route_epoch(db);
        if epoch < known {
            return Err(stale_route(db, epoch, known));
        }
        if catalog.incoming.contains_key(db) {
            return Err(importing(db, epoch, known));
        }
        Ok(())
    }

    /// The hot migration importing `db` here, if one is.
    pub fn incoming_migration(&self, db: &str) -> Option<String> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner()).incoming.get(db).cloned()
    }

    /// The time a command applies at: its leader's time, but never earlier than a command
    /// applied before it. A leader whose clock is behind (or a new leader after a failover)
    /// cannot move the oplog's timestamps or the idempotency window backwards. Every member
    /// computes the same value, since it depends only on the log.
    pub(crate) fn command_time(&self, proposed_ms: u64) -> u64 {
        proposed_ms.max(self.clock_ms.load(Ordering::Acquire))
    }

    /// Records `ts_ms` as the replica set's clock in `batch` (and in memory: the caller
    /// writes the batch or the member stops).
    pub(crate) fn advance_clock(&self, batch: &mut WriteBatch, ts_ms: u64) {
        if ts_ms > self.clock_ms.load(Ordering::Acquire) {
            batch.put_cf(self.cf(CF_META), META_CLOCK, encode(&ts_ms));
            self.clock_ms.store(ts_ms, Ordering::Release);
        }
    }

    /// The replica set's clock (see [`Engine::command_time`]).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms.load(Ordering::Acquire)
    }

    /// Reads a JSON value from the `meta` column family.
    pub fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_META), key)? {
            Some(bytes) => Ok(Some(decode("meta", &bytes)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn put_meta<T: Serialize>(&self, batch: &mut WriteBatch, key: &[u8], value: &T) {
        batch.put_cf(self.cf(CF_META), key, encode(value));
    }

    /// Writes a batch into the memtables, with no WAL record. The Raft log is the durable
    /// record of every entry, so the state machine's WAL would be a second copy of it,
    /// written and checksummed on every member (a restore's import wrote each byte twice
    /// that way). What survives a crash is the last flush, whole (`atomic_flush`: every
    /// column family flushed together, with the applied index of the same entries), and a
    /// restart applies the Raft log again from there. The log keeps those entries: Raft
    /// purges it only behind a snapshot, and a snapshot is made of flushed table files
    /// ([`Engine::checkpoint`]), so the live state is flushed at least that far.
    pub(crate) fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Flushes every column family's memtables to table files (together: `atomic_flush`),
    /// waiting for the flush. Writes go on into fresh memtables meanwhile. On a clean stop,
    /// it leaves the next start nothing to apply again from the Raft log.
    pub fn flush(&self) -> Result<(), StoreError> {
        let cfs: Vec<&ColumnFamily> = ALL_CFS.iter().map(|n| self.cf(n)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }

    /// Makes a RocksDB checkpoint of the whole state machine: its memtables flushed
    /// ([`Engine::flush`], with writes going on meanwhile), then its table files
    /// hard-linked. It holds the state of the last flush, whole (`atomic_flush`): this one
    /// or a later one, never the entries applied since, which are in no table file (see
    /// [`Engine::write`]). So the applied index it holds is read from the checkpoint
    /// itself ([`CheckpointReader`]). Nothing applied waits for it.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        self.flush()?;
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db)?;
        cp.create_checkpoint_with_log_size(dir, u64::MAX)?;
        Ok(())
    }

    /// The first Raft index still in the oplog.
    pub fn oplog_first_index(&self) -> Result<Option<u64>, StoreError> {
        let mut it = self.db.iterator_cf(self.cf(CF_OPLOG), IteratorMode::Start);
        match it.next() {
            Some(item) => Ok(keys::oplog_key_index(&item?.0)),
            None => Ok(None),
        }
    }

    /// Reads up to `limit` oplog entries from Raft index `from` on.
    pub fn read_oplog(&self, from: u64, limit: usize) -> Result<Vec<nimbus_api::admin::OplogEntry>, StoreError> {
        let start = keys::oplog_key(from, 0);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_OPLOG), IteratorMode::From(&start, Direction::Forward)) {
            let (_, v) = item?;
            out.push(decode("oplog entry", &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Approximate on-disk size of each column family, for metrics.
    pub fn sizes(&self) -> Vec<(&'static str, u64)> {
        ALL_CFS
            .iter()
            .map(|n| {
                let size = self
                    .db
                    .property_int_value_cf(self.cf(n), "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                (*n, size)
            })
            .collect()
    }
}

pub(crate) fn stale_route(db: &str, epoch: u64, known: u64) -> nimbus_api::ApiError {
    nimbus_api::ApiError::stale_route(format!(
        "route epoch {epoch} of database {db} is stale: this replica set is at epoch {known}; re-read the route"
    ))
}

/// A client request (route epoch `epoch`) for database `db`, which this member still
/// imports (its newest route epoch applied here: `known`).
///
/// - An epoch newer than any applied here: the route already names this replica set (the
///   migration switched), and this member has not applied the `Finish` yet (a follower a
///   heartbeat behind, or a new leader still applying). `NotLeader` without a hint: the
///   gateway tries the members again shortly; nothing was applied, and no client sees it.
/// - Else the sender's route does not name this replica set: `StaleRoute`.
pub(crate) fn importing(db: &str, epoch: u64, known: u64) -> nimbus_api::ApiError {
    if epoch > known {
        return nimbus_api::ApiError {
            message: format!(
                "database {db} is switching to this replica set and this member has not applied the switch yet"
            ),
            ..nimbus_api::ApiError::not_leader(None)
        };
    }
    nimbus_api::ApiError::stale_route(format!(
        "database {db} is being migrated to this replica set and is not served here yet; re-read the route"
    ))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own types to JSON cannot fail (no non-string map keys, no NaN).
    serde_json::to_vec(value).unwrap_or_default()
}

pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}

impl Engine {
    /// Writes a batch built by [`Engine::apply_command`] and installs its catalog change
    /// (for tests that drive the engine without Raft).
    #[doc(hidden)]
    pub fn commit_for_tests(&self, batch: WriteBatch, delta: super::apply::CatalogDelta) {
        #[allow(clippy::expect_used)]
        self.commit(batch, Some(delta)).expect("write batch");
    }

    /// [`Engine::commit_for_tests`], recording `index` as the applied index as the state
    /// machine does.
    #[doc(hidden)]
    pub fn commit_applied_for_tests(&self, mut batch: WriteBatch, delta: super::apply::CatalogDelta, index: u64) {
        let log_id =
            crate::raft::types::LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 }, index);
        self.put_meta(&mut batch, keys::META_APPLIED, &Some(log_id));
        self.commit_for_tests(batch, delta);
    }
}
