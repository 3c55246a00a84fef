//! A database's order-independent checksum, for comparing replicas (and, later, a migrated
//! or restored copy with its source).
//!
//! Each collection's catalog entry carries [`DocSum`]: the sum, modulo 2^128, of a SHA-256
//! based hash of each of its documents (collection name and the document's canonical
//! JSON, `_id` included). The apply loop keeps it current at O(1) per changed document
//! (add the new document's hash, subtract the old one's), so the sum needs no scan and does
//! not depend on the order documents were written or are stored in. A database's checksum
//! is the sum over its collections.
//!
//! Two checks use it:
//! - **Replicas agree** ([`WriteOp::Checksum`](super::WriteOp::Checksum)): a marker entry
//!   through Raft makes every member record its database sum at the same log index; a
//!   member whose apply diverged (non-determinism, a bug) records a different sum.
//! - **Storage agrees with the log** ([`Engine::verify_checksum`]): a scan of the stored
//!   documents under one RocksDB snapshot, against the sums stored in the same snapshot,
//!   finds bytes changed under the engine (a bad disk, a manual edit).
//!
//! The sum is a consistency check, not an authenticator: someone able to choose documents
//! freely could construct two sets with the same sum.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::catalog::CollectionMeta;
use super::engine::{Engine, StoreError, decode};
use super::keys::{self, CF_CATALOG, CF_DOCS, CF_META, META_APPLIED};
use crate::doc::keycode::prefix_end;

/// The order-independent sum of a set of documents' hashes (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DocSum(pub u128);

impl DocSum {
    /// The hash of one document of collection `coll`.
    pub fn of(coll: &str, doc: &Value) -> DocSum {
        // Canonical JSON: the parsed document serialised (field order is the document's).
        DocSum::of_canonical(coll, &serde_json::to_vec(doc).unwrap_or_default())
    }

    /// [`DocSum::of`] from the document's canonical JSON (`serde_json`'s serialisation of
    /// the parsed document), for a caller that has it already.
    pub fn of_canonical(coll: &str, json: &[u8]) -> DocSum {
        let mut h = Sha256::new();
        h.update(b"nimbus-docsum-v1\0");
        h.update((coll.len() as u64).to_be_bytes());
        h.update(coll.as_bytes());
        h.update(json);
        let d = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&d[..16]);
        DocSum(u128::from_be_bytes(first))
    }

    pub fn add(&mut self, other: DocSum) {
        self.0 = self.0.wrapping_add(other.0);
    }

    pub fn sub(&mut self, other: DocSum) {
        self.0 = self.0.wrapping_sub(other.0);
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

impl Serialize for DocSum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for DocSum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DocSum, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16).map(DocSum).map_err(serde::de::Error::custom)
    }
}

/// A database's checksum and document count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DbSum {
    pub checksum: DocSum,
    pub documents: u64,
}

/// What a member recorded for a database at a checksum marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChecksumAt {
    /// The marker's Raft log index: every member records its sum at this same point.
    pub index: u64,
    #[serde(flatten)]
    pub sum: DbSum,
    /// SHA-256 (hex) of the database's catalog: its collections' names and their indexes'
    /// names, fields, uniqueness and readiness, so a copy whose indexes differ does not compare equal
    /// ([`Engine::catalog_digest`]). Empty in markers recorded before it existed.
    #[serde(default)]
    pub catalog: String,
}

/// A scan of a database's stored documents against its recorded sums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// The applied index of the snapshot both were read from.
    pub applied_index: u64,
    /// The sums the apply loop recorded.
    pub recorded: DbSum,
    /// The sums of the documents found in storage.
    pub scanned: DbSum,
    /// Collections whose recorded and scanned sums differ.
    pub mismatched: Vec<String>,
}

/// The `meta` key under which the last checksum marker of `db` is recorded.
pub fn checksum_key(db: &str) -> Vec<u8> {
    let mut k = b"checksum\0".to_vec();
    k.extend_from_slice(db.as_bytes());
    k
}

impl Engine {
    /// The documents of one collection, scanned from storage: their sum and count.
    pub(crate) fn scan_sum(&self, ro: impl Fn() -> ReadOptions, db: &str, coll: &str) -> Result<DbSum, StoreError> {
        let prefix = keys::coll_prefix(db, coll);
        let mut opts = ro();
        if let Some(end) = prefix_end(&prefix) {
            opts.set_iterate_upper_bound(end);
        }
        let mut sum = DbSum::default();
        for item in self.db.iterator_cf_opt(self.cf(CF_DOCS), opts, IteratorMode::From(&prefix, Direction::Forward)) {
            let (_, v) = item?;
            let doc: Value = decode("document", &v)?;
            sum.checksum.add(DocSum::of(coll, &doc));
            sum.documents += 1;
        }
        Ok(sum)
    }

    /// The database's current sum, from the in-memory catalog.
    pub fn db_sum(&self, db: &str) -> DbSum {
        let catalog = self.catalog_read();
        let mut sum = DbSum::default();
        for meta in catalog.dbs.get(db).into_iter().flat_map(|c| c.values()) {
            sum.checksum.add(meta.checksum.unwrap_or_default());
            sum.documents += meta.documents;
        }
        sum
    }

    /// SHA-256 (hex) over the database's collections, sorted by name, each with its
    /// indexes sorted by name (name, fields with directions, uniqueness, and whether it is
    /// ready: a copy still building an index its source has ready cannot serve the same
    /// queries yet, so it does not compare equal). A build's progress, `multikey` and
    /// `auto` are left out: they describe how an index came about, not what it is, and a
    /// migrated copy builds its indexes anew.
    pub fn catalog_digest(&self, db: &str) -> String {
        let catalog = self.catalog_read();
        let described: Vec<Value> = catalog
            .dbs
            .get(db)
            .into_iter()
            .flat_map(|colls| colls.iter())
            .map(|(coll, meta)| {
                let mut indexes: Vec<Value> = meta
                    .indexes
                    .iter()
                    .map(|ix| serde_json::json!([ix.name, ix.fields, ix.unique, ix.is_ready()]))
                    .collect();
                indexes.sort_by(|a, b| a[0].as_str().cmp(&b[0].as_str()));
                serde_json::json!([coll, indexes])
            })
            .collect();
        hex::encode(Sha256::digest(serde_json::to_vec(&described).unwrap_or_default()))
    }

    /// The sum this member recorded at the last checksum marker of `db`.
    pub fn checksum_at(&self, db: &str) -> Result<Option<ChecksumAt>, StoreError> {
        self.get_meta(&checksum_key(db))
    }

    /// Scans `db`'s stored documents and compares them with the sums recorded by the apply
    /// loop, both read from one RocksDB snapshot. Reads every document of the database: an
    /// operator's check, run off the apply loop.
    pub fn verify_checksum(&self, db: &str) -> Result<Verification, StoreError> {
        let snap = self.db.snapshot();
        let ro = || {
            let mut o = ReadOptions::default();
            o.set_snapshot(&snap);
            o
        };
        let applied = match self.db.get_cf_opt(self.cf(CF_META), META_APPLIED, &ro())? {
            Some(v) => decode::<crate::raft::types::LogId>("applied log id", &v)?.index,
            None => 0,
        };
        let prefix = keys::db_prefix(db);
        let mut opts = ro();
        if let Some(end) = prefix_end(&prefix) {
            opts.set_iterate_upper_bound(end);
        }
        let mut metas: BTreeMap<String, CollectionMeta> = BTreeMap::new();
        for item in self.db.iterator_cf_opt(self.cf(CF_CATALOG), opts, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item?;
            let Some(coll) = k.strip_prefix(prefix.as_slice()) else { break };
            let coll = String::from_utf8_lossy(coll.strip_suffix(&[0]).unwrap_or(coll)).into_owned();
            metas.insert(coll, decode("catalog entry", &v)?);
        }
        let mut v = Verification {
            applied_index: applied,
            recorded: DbSum::default(),
            scanned: DbSum::default(),
            mismatched: Vec::new(),
        };
        for (coll, meta) in &metas {
            let recorded = DbSum { checksum: meta.checksum.unwrap_or_default(), documents: meta.documents };
            let scanned = self.scan_sum(ro, db, coll)?;
            if recorded != scanned {
                v.mismatched.push(coll.clone());
            }
            v.recorded.checksum.add(recorded.checksum);
            v.recorded.documents += recorded.documents;
            v.scanned.checksum.add(scanned.checksum);
            v.scanned.documents += scanned.documents;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_sum_ignores_order_and_follows_changes() {
        let (a, b) = (json!({"_id": 1, "x": 1}), json!({"_id": 2, "x": [1, {"y": 2}]}));
        let mut s1 = DocSum::default();
        s1.add(DocSum::of("c", &a));
        s1.add(DocSum::of("c", &b));
        let mut s2 = DocSum::default();
        s2.add(DocSum::of("c", &b));
        s2.add(DocSum::of("c", &a));
        assert_eq!(s1, s2);
        // The same document in another collection, or with another field order, differs.
        assert_ne!(DocSum::of("c", &a), DocSum::of("d", &a));
        assert_eq!(DocSum::of("c", &a), DocSum::of_canonical("c", serde_json::to_string(&a).unwrap().as_bytes()));
        assert_ne!(DocSum::of("c", &json!({"a": 1, "b": 2})), DocSum::of("c", &json!({"b": 2, "a": 1})));
        s1.sub(DocSum::of("c", &a));
        let mut only_b = DocSum::default();
        only_b.add(DocSum::of("c", &b));
        assert_eq!(s1, only_b);
        let back: DocSum = serde_json::from_value(serde_json::to_value(s1).unwrap()).unwrap();
        assert_eq!(back, s1);
    }
}
