//! The durable Raft log and vote, in a RocksDB of their own (`DIR/raft`).
//!
//! Appends go to one writer thread, which drains every append queued behind the one it is
//! writing and persists them with a single synced write batch: group commit, so many
//! concurrent client writes share one fsync. Entries submitted but not yet written are kept
//! in memory so replication can read them at once.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::types::{Entry, LogId, TypeConfig, Vote};

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";

enum Job {
    Append { entries: Vec<(u64, u64, Vec<u8>)>, callback: IOFlushed<TypeConfig> },
    Put { key: &'static [u8], value: Vec<u8>, sync: bool, done: oneshot::Sender<io::Result<()>> },
    DeleteFrom { index: u64, done: oneshot::Sender<io::Result<()>> },
    Purge { upto: u64, log_id: Vec<u8>, done: oneshot::Sender<io::Result<()>> },
}

struct Shared {
    db: DB,
    /// index → (generation, entry): submitted to the writer, not yet in `db`.
    pending: Mutex<BTreeMap<u64, (u64, Entry)>>,
    next_gen: Mutex<u64>,
    vote: Mutex<Option<Vote>>,
}

/// The writer thread and the way to reach it. Dropping the last handle stops the thread and
/// waits for it, so the database is closed by the time the store is gone (a RocksDB still
/// closing on a detached thread when the process exits aborts it).
struct Writer {
    tx: Option<std_mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the raft log writer panicked");
        }
    }
}

/// The Raft log store. Cheap to clone: clones share the database and the writer.
#[derive(Clone)]
pub struct LogStore {
    // Before `shared`: the writer stops (and lets go of the database) first.
    writer: Arc<Writer>,
    shared: Arc<Shared>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    pub fn open(path: &Path) -> io::Result<LogStore> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        // The log's own flushes and compactions written out as they go (as the state
        // machine's: `store::engine::db_options`), so they do not stall its synced writes.
        opts.set_bytes_per_sync(1 << 20);
        let cfs = [CF_LOGS, CF_META].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(io_err)?;
        let vote = match db.get_cf(cf(&db, CF_META), KEY_VOTE).map_err(io_err)? {
            Some(b) => Some(serde_json::from_slice(&b).map_err(io_err)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            db,
            pending: Mutex::new(BTreeMap::new()),
            next_gen: Mutex::new(0),
            vote: Mutex::new(vote),
        });
        let (tx, rx) = std_mpsc::channel();
        let for_writer = shared.clone();
        let thread =
            std::thread::Builder::new().name("raft-log-writer".into()).spawn(move || write_loop(for_writer, rx))?;
        Ok(LogStore { writer: Arc::new(Writer { tx: Some(tx), thread: Some(thread) }), shared })
    }

    fn send(&self, job: Job) -> io::Result<()> {
        let stopped = || io_err("the raft log writer has stopped");
        self.writer.tx.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())
    }

    async fn call(&self, make: impl FnOnce(oneshot::Sender<io::Result<()>>) -> Job) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(make(done))?;
        wait.await.map_err(|_| io_err("the raft log writer has stopped"))?
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> io::Result<Option<T>> {
        match self.shared.db.get_cf(cf(&self.shared.db, CF_META), k).map_err(io_err)? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(io_err)?)),
            None => Ok(None),
        }
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Both column families are created by `open`.
    #[allow(clippy::expect_used)]
    db.cf_handle(name).expect("column family created at open")
}

/// A synced log write slower than this is logged.
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(100);

/// The writer thread: applies jobs in order; consecutive appends share one synced write.
fn write_loop(shared: Arc<Shared>, rx: std_mpsc::Receiver<Job>) {
    let db = &shared.db;
    let mut next: Option<Job> = None;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        match job {
            Job::Append { entries, callback } => {
                let mut batch = WriteBatch::default();
                let mut written: Vec<(u64, u64)> = Vec::new();
                let mut callbacks = vec![callback];
                for (index, generation, bytes) in &entries {
                    batch.put_cf(cf(db, CF_LOGS), key(*index), bytes);
                    written.push((*index, *generation));
                }
                // Group commit: take every append already queued into the same write.
                while let Ok(j) = rx.try_recv() {
                    match j {
                        Job::Append { entries, callback } => {
                            for (index, generation, bytes) in &entries {
                                batch.put_cf(cf(db, CF_LOGS), key(*index), bytes);
                                written.push((*index, *generation));
                            }
                            callbacks.push(callback);
                        }
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                let started = std::time::Instant::now();
                let result = db.write_opt(batch, &wo).map_err(io_err);
                let took = started.elapsed();
                metrics::histogram!("nimbus_raft_log_sync_seconds").record(took.as_secs_f64());
                if took >= SLOW_SYNC {
                    // Every write of the replica set waits on this; a disk this slow can
                    // cost the leader its lease (etcd warns alike: "slow fdatasync").
                    tracing::warn!(took_ms = took.as_millis() as u64, entries = written.len(), "slow raft log sync");
                }
                metrics::counter!("nimbus_raft_log_syncs_total").increment(1);
                metrics::histogram!("nimbus_raft_log_entries_per_sync").record(written.len() as f64);
                if result.is_ok() {
                    let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
                    for (index, generation) in written {
                        if pending.get(&index).is_some_and(|(g, _)| *g == generation) {
                            pending.remove(&index);
                        }
                    }
                }
                for cb in callbacks {
                    cb.io_completed(result.as_ref().map(|_| ()).map_err(io_err));
                }
            }
            Job::Put { key: k, value, sync, done } => {
                let mut wo = WriteOptions::default();
                wo.set_sync(sync);
                let r = db.put_cf_opt(cf(db, CF_META), k, value, &wo).map_err(io_err);
                let _ = done.send(r);
            }
            Job::DeleteFrom { index, done } => {
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(cf(db, CF_LOGS), key(index), key(u64::MAX));
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                let _ = done.send(db.write_opt(batch, &wo).map_err(io_err));
            }
            Job::Purge { upto, log_id, done } => {
                // Record the purge point first: entries at or below it are ignored from then
                // on, so deleting them need not be atomic with it.
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                let r = db
                    .put_cf_opt(cf(db, CF_META), KEY_PURGED, log_id, &wo)
                    .and_then(|_| db.delete_range_cf(cf(db, CF_LOGS), key(0), key(upto.saturating_add(1))))
                    .map_err(io_err);
                let _ = done.send(r);
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // Pending first: an entry leaves `pending` only after it is in the database.
        let pending: BTreeMap<u64, Entry> = {
            let p = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.range(start..).take_while(|(i, _)| range.contains(i)).map(|(i, (_, e))| (*i, e.clone())).collect()
        };
        let mut out = BTreeMap::new();
        let db = &self.shared.db;
        for item in db.iterator_cf(cf(db, CF_LOGS), IteratorMode::From(&key(start), Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
            if !range.contains(&index) {
                break;
            }
            if !pending.contains_key(&index) {
                out.insert(index, serde_json::from_slice::<Entry>(&v).map_err(io_err)?);
            }
        }
        out.extend(pending);
        Ok(out.into_values().collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*self.shared.vote.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = self.read_meta(KEY_PURGED)?;
        let pending_last = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_key_value()
            .map(|(_, (_, e))| e.log_id());
        let db = &self.shared.db;
        let db_last = match db.iterator_cf(cf(db, CF_LOGS), IteratorMode::End).next() {
            Some(item) => Some(serde_json::from_slice::<Entry>(&item.map_err(io_err)?.1).map_err(io_err)?.log_id()),
            None => None,
        };
        let last = match (pending_last, db_last) {
            (Some(p), Some(d)) => Some(if p.index() >= d.index() { p } else { d }),
            (p, d) => p.or(d),
        };
        Ok(LogState { last_log_id: last.or(last_purged), last_purged_log_id: last_purged })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let value = serde_json::to_vec(vote).map_err(io_err)?;
        self.call(|done| Job::Put { key: KEY_VOTE, value, sync: true, done }).await?;
        *self.shared.vote.lock().unwrap_or_else(|p| p.into_inner()) = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced: it only lets a restart re-apply sooner; losing it loses nothing.
        let value = serde_json::to_vec(&committed).map_err(io_err)?;
        self.call(|done| Job::Put { key: KEY_COMMITTED, value, sync: false, done }).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut items = Vec::new();
        {
            let mut pending = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut next_gen = self.shared.next_gen.lock().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(io_err)?;
                let generation = *next_gen;
                *next_gen += 1;
                let index = entry.index();
                pending.insert(index, (generation, entry));
                items.push((index, generation, bytes));
            }
        }
        self.send(Job::Append { entries: items, callback })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).split_off(&from);
        self.call(|done| Job::DeleteFrom { index: from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let bytes = serde_json::to_vec(&log_id).map_err(io_err)?;
        {
            let mut pending = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            let keep = pending.split_off(&(upto + 1));
            *pending = keep;
        }
        self.call(|done| Job::Purge { upto, log_id: bytes, done }).await
    }
}
