//! Garbage collection in the apply loop: oplog entries past their retention and expired
//! idempotency records. Runs every [`GC_EVERY`] entries, inside an entry's write batch, so
//! every member removes the same records at the same log position.

use nimbus_api::admin::OplogEntry;
use rocksdb::{IteratorMode, WriteBatch};

use super::apply::IdemRecord;
use super::engine::{Engine, StoreError, decode};
use super::keys::{CF_IDEM, CF_IDEM_TTL, CF_OPLOG};
use crate::doc::keycode::prefix_end;

/// How often (in applied entries) expired oplog and idempotency records are removed.
pub const GC_EVERY: u64 = 1024;
/// The oplog entries of the last this many log entries are kept whatever their time: even a
/// clock far ahead, once applied, cannot empty the oplog a migration or a backup is reading.
pub const OPLOG_KEEP_ENTRIES: u64 = 4 * GC_EVERY;

impl Engine {
    /// Removes oplog entries older than the retention (but none of the last
    /// [`OPLOG_KEEP_ENTRIES`] log entries) and expired idempotency records, as of the
    /// replica set's clock `now_ms` and the entry at Raft `index`.
    pub(crate) fn collect_garbage(&self, batch: &mut WriteBatch, now_ms: u64, index: u64) -> Result<(), StoreError> {
        let oplog_cutoff = now_ms.saturating_sub(self.options.oplog_retention.as_millis() as u64);
        let keep_from = index.saturating_sub(OPLOG_KEEP_ENTRIES);
        let mut last_old: Option<Vec<u8>> = None;
        for item in self.db.iterator_cf(self.cf(CF_OPLOG), IteratorMode::Start) {
            let (k, v) = item?;
            let e: OplogEntry = decode("oplog entry", &v)?;
            if e.ts_ms >= oplog_cutoff || e.index >= keep_from {
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
