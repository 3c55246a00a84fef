//! Request and answer bodies of the data API (`API.md` section 1). The gateway serves
//! them to clients; datanodes serve the same bodies on their internal data port.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON document: always an object.
pub type Document = Map<String, Value>;

/// Header carrying the client's idempotency key on writes. The gateway also sets it on the
/// answer of a write it made a key for (the client sent none), so a client whose write
/// timed out can retry it with that key and have it applied at most once.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Header with which a read asks to be served by any member (possibly stale).
pub const READ_PREFERENCE_HEADER: &str = "x-nimbus-read";
/// Header with which a datanode tells how many documents a `find` returned.
pub const RETURNED_HEADER: &str = "x-nimbus-returned";
/// Header with the database's route epoch the sender used: required on every request of a
/// datanode's data API; a datanode refuses an epoch older than the one it knows
/// (`StaleRoute`), so a gateway with an outdated route cannot reach a moved database.
pub const ROUTE_EPOCH_HEADER: &str = "x-nimbus-route-epoch";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsertRequest {
    pub documents: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InsertResponse {
    pub inserted_ids: Vec<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindRequest {
    #[serde(default)]
    pub filter: Option<Value>,
    #[serde(default)]
    pub projection: Option<Value>,
    #[serde(default)]
    pub sort: Option<Value>,
    #[serde(default)]
    pub skip: Option<u64>,
    #[serde(default)]
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindResponse {
    pub documents: Vec<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountRequest {
    #[serde(default)]
    pub filter: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountResponse {
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    #[serde(default)]
    pub filter: Option<Value>,
    pub update: Value,
    #[serde(default)]
    pub multi: bool,
    #[serde(default)]
    pub upsert: bool,
    /// The filters of the update's `$[<id>]` placeholders.
    #[serde(default, rename = "arrayFilters", skip_serializing_if = "Option::is_none")]
    pub array_filters: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateResponse {
    pub matched: u64,
    pub modified: u64,
    pub upserted_id: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    #[serde(default)]
    pub filter: Option<Value>,
    #[serde(default)]
    pub multi: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub deleted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionInfo {
    pub name: String,
    pub documents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListCollectionsResponse {
    pub collections: Vec<CollectionInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateIndexRequest {
    /// `{"field": 1 | -1, ...}` in key order.
    pub keys: Value,
    #[serde(default)]
    pub unique: bool,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateIndexResponse {
    pub name: String,
    /// `ready`, or `building` when the build outlasted the request (poll the index list).
    #[serde(default = "ready")]
    pub state: IndexState,
}

/// Whether queries use an index yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum IndexState {
    #[default]
    Ready,
    /// Being built in the background; queries do not use it yet.
    Building,
}

fn ready() -> IndexState {
    IndexState::Ready
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexInfo {
    pub name: String,
    pub keys: Value,
    pub unique: bool,
    /// Created by automatic index management rather than by a user.
    pub auto: bool,
    #[serde(default = "ready")]
    pub state: IndexState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListIndexesResponse {
    pub indexes: Vec<IndexInfo>,
}
