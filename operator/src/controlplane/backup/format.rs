//! What a backup's objects hold (`docs/design/0004-backup.md`, "Formats"): a full's
//! manifest (plain JSON, small, read when listing), its pages and the oplog segments (zstd
//! frames of JSON), and the SHA-256 digests that make damage visible.

use std::io::Read;

use nimbus_api::admin::OplogEntry;
use nimbus_api::migration::{ExportPage, OplogPosition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;
use super::layout::{FullId, Lineage};

/// The manifest and segment formats this code writes; a reader refuses a newer one rather
/// than restoring from what it does not understand.
pub const FORMAT_VERSION: u32 = 1;

/// zstd level 3 (zstd's default): most of the ratio of the higher levels at several
/// hundred MB/s, so compressing never slows a backup that reads ~1 MiB pages.
const ZSTD_LEVEL: i32 = 3;

/// A page or segment decompresses to at most this: the writer's pages and segments are a
/// few MiB, so more is damage (or a decompression bomb), refused before it fills memory.
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

/// A full backup's manifest, `full/{id}/manifest_{sha256}.json`, written after every page: its
/// presence is what makes the full exist.
///
/// Consistency: page `n` was read from a snapshot at oplog index `i_n`, `i_1 <= ... <= i_k`.
/// Loading the pages and replaying the database's oplog changes after `start` (the end of
/// `i_1`) reaches a consistent state once the replay has passed `end` (the end of `i_k`):
/// every change is an idempotent after-image, so a document a later page copied is only
/// rewritten with what it already was. The full is therefore restorable to a time `T` only
/// when `T >= end_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FullManifest {
    pub format: u32,
    pub id: FullId,
    pub db: String,
    /// The replica set's oplog this full's positions belong to.
    pub lineage: Lineage,
    /// The end of the first page's snapshot index: the replay starts after it.
    pub start: OplogPosition,
    /// The end of the last page's snapshot index: the state is consistent once the replay
    /// has passed it.
    pub end: OplogPosition,
    /// The replica set's clock (ms) in the first page's snapshot.
    pub start_ms: u64,
    /// The replica set's clock (ms) in the last page's snapshot: the earliest time this full
    /// restores to.
    pub end_ms: u64,
    /// Documents over all pages (a document copied twice, by two pages, counts twice).
    pub docs: u64,
    /// Stored (compressed) bytes over all pages.
    pub bytes: u64,
    pub pages: Vec<PageEntry>,
    /// The database's order-independent checksum at `end` (hex, as the datanode reports
    /// it), when the backup asked for it: a restore to exactly `end` must reproduce it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// One page as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PageEntry {
    /// The page's number: its object is `{n:06}.page`.
    pub n: u32,
    /// Stored (compressed) size of the object.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the stored object.
    pub sha256: String,
    pub docs: u64,
    /// The snapshot index the page was read from.
    pub index: u64,
}

/// An oplog segment's content: the changes its name announces, in oplog order. The name's
/// fields are repeated so that a segment read back is checked against the name it was
/// found under.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentBody {
    pub format: u32,
    pub db: String,
    pub lineage: Lineage,
    pub after: OplogPosition,
    pub through: OplogPosition,
    pub min_ts: u64,
    pub max_ts: u64,
    pub entries: Vec<OplogEntry>,
}

/// A hot migration's handoff of a database's oplog from one lineage to another
/// (`docs/design/0004-backup.md`, "Across a hot migration"): every change of the database on
/// `from` is at or before `from_position` (the source's fence: it refuses the database's
/// writes after it), the database has no change on `to` at or before `to_position` (the
/// target's checksum marker, taken while the database was still incoming there, when no
/// command on it writes an oplog change), and the state at `to_position` on `to` is the
/// state at `from_position` on `from` (the migration compared both checksums there). So a
/// full of `from` and the changes of `from` through `from_position`, then those of `to`
/// after `to_position`, are one chain: no full is needed on arrival.
///
/// Recorded by the migration driver in its record at the switch (`MigrationRecord::handoff`,
/// in etcd: the driver has no backup store), and stored by the archiver, once it archived
/// `from` through `from_position`, as `oplog/{to}/handoff_{to_position}.json` in the
/// incarnation's backups, where a restore finds it with the segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handoff {
    pub from: Lineage,
    pub from_position: OplogPosition,
    pub to: Lineage,
    pub to_position: OplogPosition,
}

/// The stored form of a [`Handoff`] (plain JSON, small).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoffBody {
    pub format: u32,
    pub db: String,
    #[serde(flatten)]
    pub handoff: Handoff,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// JSON, then one zstd frame.
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, BackupError> {
    let json = serde_json::to_vec(value).map_err(|e| BackupError::Encode { what, message: e.to_string() })?;
    zstd::bulk::compress(&json, ZSTD_LEVEL).map_err(|e| BackupError::Encode { what, message: e.to_string() })
}

/// The inverse of [`encode`], bounded by [`MAX_DECODED_BYTES`]. `object` names the object
/// in the error.
pub(crate) fn decode<T: DeserializeOwned>(object: &str, bytes: &[u8]) -> Result<T, BackupError> {
    let damaged = |message: String| BackupError::Undecodable { object: object.to_string(), message };
    let decoder = zstd::stream::read::Decoder::new(bytes).map_err(|e| damaged(e.to_string()))?;
    let mut json = Vec::new();
    decoder
        .take(MAX_DECODED_BYTES + 1)
        .read_to_end(&mut json)
        .map_err(|e| damaged(format!("not a zstd frame: {e}")))?;
    if json.len() as u64 > MAX_DECODED_BYTES {
        return Err(damaged(format!("it decompresses to more than {MAX_DECODED_BYTES} bytes")));
    }
    serde_json::from_slice(&json).map_err(|e| damaged(e.to_string()))
}

/// A page's document count, for the manifest.
pub(crate) fn page_docs(page: &ExportPage) -> u64 {
    page.docs.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_objects_decode_to_what_was_written_and_garbage_is_refused() {
        let page: ExportPage = serde_json::from_value(serde_json::json!({
            "index": 7, "clockMs": 9,
            "collections": [{"name": "c", "indexes": []}],
            "docs": [{"coll": "c", "doc": {"_id": 1, "x": "y"}}],
            "idempotency": []
        }))
        .unwrap();
        let bytes = encode("page", &page).unwrap();
        let back: ExportPage = decode("p", &bytes).unwrap();
        assert_eq!(back.index, 7);
        assert_eq!(back.docs[0].doc.get(), r#"{"_id":1,"x":"y"}"#);
        let err = decode::<ExportPage>("the/object", b"not zstd").unwrap_err();
        assert!(err.to_string().contains("the/object"), "{err}");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
