//! The catalog: which collections exist, how many documents each holds, and their indexes.
//! Persisted in the `catalog` column family and cached in memory.

use std::collections::BTreeMap;

use nimbus_api::ApiError;
use nimbus_api::limits::{MAX_INDEX_FIELDS, validate_index_name};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::doc::path::validate_path;
use crate::query::sort::parse_direction;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    pub name: String,
    /// (path, descending), in key order.
    pub fields: Vec<(String, bool)>,
    pub unique: bool,
    /// Created by automatic index management.
    #[serde(default)]
    pub auto: bool,
    /// Some document has an array at an indexed path.
    #[serde(default)]
    pub multikey: bool,
    /// Present while the index is being built: the queries do not use it until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<IndexBuild>,
    /// How its keys were made ([`KEY_VERSION`]); 0 for indexes of the first release.
    #[serde(default)]
    pub key_version: u32,
}

/// The version of index key generation: 1 traverses arrays of objects on dotted paths the
/// way MongoDB does (and marks such an index multikey). Indexes made before it may be
/// multikey without saying so; the catalog treats any of them with a dotted path as
/// multikey when it loads them.
pub const KEY_VERSION: u32 = 1;

/// An index build in progress: built in bounded steps, each its own replicated command, so
/// a build never holds the replica set's apply loop for long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexBuild {
    /// The storage key suffix (encoded `_id`) of the last document indexed, hex; `None`
    /// before the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Documents indexed so far.
    #[serde(default)]
    pub indexed: u64,
}

impl IndexSpec {
    /// Parses `{"keys": {"a": 1, "b": -1}, "unique": .., "name": ..}` of the data API.
    pub fn from_request(keys: &Value, unique: bool, name: Option<&str>) -> Result<IndexSpec, ApiError> {
        let Value::Object(map) = keys else {
            return Err(ApiError::bad_request("index keys must be an object such as {\"a\": 1}"));
        };
        if map.is_empty() || map.len() > MAX_INDEX_FIELDS {
            return Err(ApiError::bad_request(format!("an index has 1 to {MAX_INDEX_FIELDS} fields")));
        }
        let mut fields = Vec::with_capacity(map.len());
        for (path, dir) in map {
            validate_path(path).map_err(ApiError::bad_request)?;
            fields.push((path.clone(), parse_direction(dir).map_err(ApiError::bad_request)?));
        }
        let name = match name {
            Some(n) => n.to_owned(),
            None => {
                fields.iter().map(|(p, d)| format!("{p}_{}", if *d { -1 } else { 1 })).collect::<Vec<_>>().join("_")
            }
        };
        validate_index_name(&name)?;
        if name == "_id_" {
            return Err(ApiError::bad_request("the index name _id_ is reserved"));
        }
        Ok(IndexSpec {
            name,
            fields,
            unique,
            auto: false,
            multikey: false,
            build: Some(IndexBuild { after: None, indexed: 0 }),
            key_version: KEY_VERSION,
        })
    }

    /// Built: the planner may use it.
    pub fn is_ready(&self) -> bool {
        self.build.is_none()
    }

    /// The `keys` object as the data API shows it.
    pub fn keys_json(&self) -> Value {
        let mut m = Map::new();
        for (p, d) in &self.fields {
            m.insert(p.clone(), Value::from(if *d { -1 } else { 1 }));
        }
        Value::Object(m)
    }

    /// Same definition (fields and uniqueness), whatever the name.
    pub fn same_definition(&self, other: &IndexSpec) -> bool {
        self.fields == other.fields && self.unique == other.unique
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionMeta {
    pub documents: u64,
    pub indexes: Vec<IndexSpec>,
    /// Builds that failed (a unique index meeting a duplicate), newest last, so the client
    /// that asked for the index learns why it is not there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_builds: Vec<FailedBuild>,
    /// The sum of the documents' hashes (`store::checksum`); `None` in entries written by
    /// releases before it, until the engine computes it when it opens.
    #[serde(default)]
    pub checksum: Option<super::checksum::DocSum>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedBuild {
    pub name: String,
    pub message: String,
    /// The error the build met (a duplicate in a unique index, a document with too many keys).
    #[serde(default = "duplicate_key")]
    pub code: nimbus_api::ErrorCode,
}

fn duplicate_key() -> nimbus_api::ErrorCode {
    nimbus_api::ErrorCode::DuplicateKey
}

/// How many failed builds a collection remembers.
pub const MAX_FAILED_BUILDS: usize = 8;

impl CollectionMeta {
    /// Brings indexes of older releases up to date (see [`KEY_VERSION`]).
    pub fn upgrade(&mut self) {
        for ix in &mut self.indexes {
            if ix.key_version < KEY_VERSION && ix.fields.iter().any(|(p, _)| p.contains('.')) {
                ix.multikey = true;
            }
        }
    }
}

/// The in-memory catalog: database → collection → metadata, and the route epoch of each
/// database that has one (it outlives the database's data, so a stale sender stays
/// refused after the database was dropped here).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub dbs: BTreeMap<String, BTreeMap<String, CollectionMeta>>,
    pub route_epochs: BTreeMap<String, u64>,
    /// The newest route epoch a write applied to each database carried. Not a bound on
    /// senders (that is `route_epochs`, which only the control plane raises): it tells a
    /// bounded drop whether a newer route wrote here (`WriteOp::DropDatabaseUpTo`).
    pub epochs_written: BTreeMap<String, u64>,
    /// Databases being imported by a hot migration, with the migration's id: no client
    /// request for them is served until the import finishes (`store::import`).
    pub incoming: BTreeMap<String, String>,
}

impl Catalog {
    pub fn get(&self, db: &str, coll: &str) -> Option<&CollectionMeta> {
        self.dbs.get(db)?.get(coll)
    }

    /// The database's route epoch: 0 until the control plane sets one.
    pub fn route_epoch(&self, db: &str) -> u64 {
        self.route_epochs.get(db).copied().unwrap_or(0)
    }

    /// The newest route epoch of the database here: its route epoch, or that of a write
    /// applied with a newer one.
    pub fn newest_epoch(&self, db: &str) -> u64 {
        self.route_epoch(db).max(self.epochs_written.get(db).copied().unwrap_or(0))
    }
}
