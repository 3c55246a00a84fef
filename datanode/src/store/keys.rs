//! Key layout of the state-machine column families. Database, collection and index names
//! never contain a NUL byte (see `nimbus_api::limits`), so NUL separates them.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `docs` | db `00` coll `00` enc(_id) | document JSON |
//! | `idx` | db `00` coll `00` index `00` enc(field)... enc(_id) | enc(_id) |
//! | `catalog` | db `00` coll `00` | collection metadata JSON |
//! | `oplog` | raft index (u64 BE) seq (u32 BE) | oplog entry JSON |
//! | `idem` | db `00` key | idempotency record JSON |
//! | `idem_ttl` | ts_ms (u64 BE) db `00` key | empty |
//! | `meta` | name | JSON |

use serde_json::Value;

use crate::doc::keycode::encode_into;

pub const CF_DOCS: &str = "docs";
pub const CF_IDX: &str = "idx";
pub const CF_CATALOG: &str = "catalog";
pub const CF_OPLOG: &str = "oplog";
pub const CF_IDEM: &str = "idem";
pub const CF_IDEM_TTL: &str = "idem_ttl";
pub const CF_META: &str = "meta";
pub const ALL_CFS: [&str; 7] = [CF_DOCS, CF_IDX, CF_CATALOG, CF_OPLOG, CF_IDEM, CF_IDEM_TTL, CF_META];

pub const META_APPLIED: &[u8] = b"applied";
pub const META_MEMBERSHIP: &[u8] = b"membership";
/// The replica set's clock: the largest command time applied (see `Engine::command_time`).
pub const META_CLOCK: &[u8] = b"clock";
/// `route_epoch 00 db`: a database's route epoch (a JSON number).
pub const META_ROUTE_EPOCH: &[u8] = b"route_epoch\0";
/// `epoch_written 00 db`: the newest route epoch a write applied to the database here
/// carried (a JSON number): what a bounded drop (`WriteOp::DropDatabaseUpTo`) compares.
pub const META_EPOCH_WRITTEN: &[u8] = b"epoch_written\0";

/// `incoming 00 db`: the database is being imported by a hot migration (`store::import`):
/// `{"migration": id}`.
pub const META_INCOMING: &[u8] = b"incoming\0";
/// `migrated 00 db`: how the database's last import ended (`store::import`), so a repeated
/// `Finish` or `Abort` answers as the first one did.
pub const META_MIGRATED: &[u8] = b"migrated\0";
/// `oplog_pin 00 name`: an oplog pin (`store::gc`).
pub const META_OPLOG_PIN: &[u8] = b"oplog_pin\0";
/// The last Raft index whose oplog entries retention removed (a JSON number): a reader
/// positioned before its end has lost changes (`OplogTruncated`).
pub const META_OPLOG_GC_THROUGH: &[u8] = b"oplog_gc_through";

/// `prefix name`: a `meta` key of one of the named families above.
pub fn meta_key(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn route_epoch_key(db: &str) -> Vec<u8> {
    let mut k = META_ROUTE_EPOCH.to_vec();
    k.extend_from_slice(db.as_bytes());
    k
}

pub fn epoch_written_key(db: &str) -> Vec<u8> {
    let mut k = META_EPOCH_WRITTEN.to_vec();
    k.extend_from_slice(db.as_bytes());
    k
}

/// `db 00`: every key of one database starts with it (docs, idx, catalog).
pub fn db_prefix(db: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(db.len() + 1);
    k.extend_from_slice(db.as_bytes());
    k.push(0);
    k
}

/// `db 00 coll 00`: every key of one collection starts with it.
pub fn coll_prefix(db: &str, coll: &str) -> Vec<u8> {
    let mut k = db_prefix(db);
    k.extend_from_slice(coll.as_bytes());
    k.push(0);
    k
}

pub fn doc_key(db: &str, coll: &str, id: &Value) -> Vec<u8> {
    let mut k = coll_prefix(db, coll);
    encode_into(id, &mut k);
    k
}

/// `db 00 coll 00 index 00`: the prefix of one index's entries.
pub fn index_prefix(db: &str, coll: &str, index: &str) -> Vec<u8> {
    let mut k = coll_prefix(db, coll);
    k.extend_from_slice(index.as_bytes());
    k.push(0);
    k
}

pub fn oplog_key(index: u64, seq: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&index.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn oplog_key_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

/// The Raft index and sequence number an oplog key names.
pub fn oplog_key_position(key: &[u8]) -> Option<(u64, u32)> {
    Some((oplog_key_index(key)?, u32::from_be_bytes(key.get(8..12)?.try_into().ok()?)))
}

pub fn idem_key(db: &str, key: &str) -> Vec<u8> {
    let mut k = db_prefix(db);
    k.extend_from_slice(key.as_bytes());
    k
}

pub fn idem_ttl_key(ts_ms: u64, idem_key: &[u8]) -> Vec<u8> {
    let mut k = ts_ms.to_be_bytes().to_vec();
    k.extend_from_slice(idem_key);
    k
}

/// The time (ms) an `idem_ttl` key starts with.
pub fn idem_ttl_key_time(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}
