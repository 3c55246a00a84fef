//! Garbage collection in the apply loop: oplog entries past their retention and expired
//! idempotency records. Runs every [`GC_EVERY`] entries, inside an entry's write batch, so
//! every member removes the same records at the same log position.
//!
//! Oplog pins (`WriteOp::PinOplog`, a hot migration reading the source's oplog) hold the
//! retention back: no entry at or after the lowest unexpired pin's index is removed. A pin
//! expires by the replica set's clock, so an abandoned migration cannot keep the oplog
//! forever. The last index removed is recorded (`META_OPLOG_GC_THROUGH`): a reader
//! positioned before it has lost changes and is told so (`OplogTruncated`).

use nimbus_api::admin::OplogEntry;
use nimbus_api::{ApiError, ErrorCode};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use super::apply::{Ctx, IdemRecord, Refusal};
use super::command::WriteAnswer;
use super::engine::{Engine, StoreError, decode, encode};
use super::keys::{self, CF_IDEM, CF_IDEM_TTL, CF_META, CF_OPLOG, META_OPLOG_GC_THROUGH, META_OPLOG_PIN};
use crate::doc::keycode::prefix_end;

/// An oplog pin as the `meta` column family stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OplogPin {
    pub name: String,
    pub from_index: u64,
    pub expires_ms: u64,
}

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
        let mut keep_from = index.saturating_sub(OPLOG_KEEP_ENTRIES);
        for pin in self.oplog_pins()? {
            if pin.expires_ms <= now_ms {
                batch.delete_cf(self.cf(CF_META), keys::meta_key(META_OPLOG_PIN, &pin.name));
            } else {
                keep_from = keep_from.min(pin.from_index);
            }
        }
        let mut last_old: Option<(Vec<u8>, u64)> = None;
        for item in self.db.iterator_cf(self.cf(CF_OPLOG), IteratorMode::Start) {
            let (k, v) = item?;
            let e: OplogEntry = decode("oplog entry", &v)?;
            if e.ts_ms >= oplog_cutoff || e.index >= keep_from {
                break;
            }
            last_old = Some((k.to_vec(), e.index));
        }
        // The changes of one Raft entry share its time and index, so they go together.
        if let Some((last, last_index)) = last_old {
            batch.delete_range_cf(self.cf(CF_OPLOG), vec![0u8; 12], prefix_end(&last).unwrap_or(last));
            batch.put_cf(self.cf(CF_META), META_OPLOG_GC_THROUGH, encode(&last_index));
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

impl Engine {
    /// Every oplog pin, expired ones included (the next collection removes those).
    pub fn oplog_pins(&self) -> Result<Vec<OplogPin>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(META_OPLOG_PIN, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(META_OPLOG_PIN) {
                break;
            }
            out.push(decode("oplog pin", &v)?);
        }
        Ok(out)
    }

    /// The last Raft index whose oplog entries retention removed (0: none yet).
    pub fn oplog_gc_through(&self) -> Result<u64, StoreError> {
        Ok(self.get_meta(META_OPLOG_GC_THROUGH)?.unwrap_or(0))
    }

    /// Applies `WriteOp::PinOplog`. Refused when changes after `from_index` are gone
    /// already: the pin could not keep what it promises.
    pub(crate) fn pin_oplog(
        &self,
        ctx: &mut Ctx<'_>,
        name: &str,
        from_index: u64,
        expires_ms: u64,
    ) -> Result<WriteAnswer, Refusal> {
        if name.is_empty() {
            return Err(ApiError::bad_request("an oplog pin needs a name").into());
        }
        let gc_through = self.oplog_gc_through()?;
        if from_index < gc_through {
            return Err(ApiError::new(
                ErrorCode::OplogTruncated,
                format!(
                    "cannot pin the oplog from index {from_index}: retention removed it through index {gc_through}; start again from an export"
                ),
            )
            .into());
        }
        let pin = OplogPin { name: name.to_owned(), from_index, expires_ms };
        ctx.batch.put_cf(self.cf(CF_META), keys::meta_key(META_OPLOG_PIN, name), encode(&pin));
        Ok(WriteAnswer::Done)
    }
}
