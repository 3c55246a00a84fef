//! The replicated command: what the leader proposes through Raft and every member applies
//! identically. Everything non-deterministic (generated `_id`s, the leader's clock) is
//! decided by the leader and carried in the command.

use nimbus_api::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// One write, as a Raft log entry carries it.
///
/// The envelope has room for what hot migration needs: a per-database route epoch that a
/// member checks against the epoch it knows, and a per-database write fence. Both are
/// optional fields, so adding their enforcement changes no entry already in a log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    pub db: String,
    pub op: WriteOp,
    /// The client's (or the gateway's) idempotency key: the first answer is kept for ten
    /// minutes and a retry with the same key gets it back without applying twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The leader's wall clock when it proposed the command, ms since the Unix epoch.
    pub ts_ms: u64,
    /// The database's route epoch the sender used: a member refuses the command when it
    /// knows a newer one for the database (the database moved; see `SetRouteEpoch`). A
    /// write that applies records it when it is the newest a write carried, so a
    /// `DropDatabaseUpTo` of an older route keeps what a newer route wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_epoch: Option<u64>,
    /// With an idempotency key: a digest of the client's request, so the key reused for a
    /// different request is refused rather than answered with the first one's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
}

/// Externally tagged (`{"insert": {...}}`): serde cannot deserialize the raw documents
/// inside an internally tagged enum.
// One per command, moved rather than copied: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WriteOp {
    /// Documents with their `_id`s already assigned, as the JSON text the leader checked:
    /// log, RPCs, storage and oplog copy it instead of serialising it again.
    Insert {
        coll: String,
        docs: Vec<Box<RawValue>>,
    },
    Update {
        coll: String,
        filter: Value,
        update: Value,
        multi: bool,
        upsert: bool,
        /// The `_id` an upsert gives a new document when the filter does not name one.
        upsert_id: Value,
        /// The filters of `$[<id>]` placeholders.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        array_filters: Option<Value>,
    },
    Delete {
        coll: String,
        filter: Value,
        multi: bool,
    },
    CreateCollection {
        coll: String,
    },
    DropCollection {
        coll: String,
    },
    CreateIndex {
        coll: String,
        spec: super::catalog::IndexSpec,
    },
    DropIndex {
        coll: String,
        name: String,
    },
    /// One bounded step of an index build (see `IndexBuild`): the leader proposes them
    /// until the index is ready.
    BuildIndex {
        coll: String,
        name: String,
    },
    /// Drops every document, index and idempotency record of the database (its route
    /// epoch stays). A client's `DELETE` of its database, and a drop without a bound.
    DropDatabase,
    /// `DropDatabase`, applied only while the database's newest epoch here (its route
    /// epoch, or the newest a write carried) is at most `max_epoch` (a hot migration's
    /// clean-up of its source, bounded by the fence's epoch); otherwise nothing changes and the answer is
    /// [`WriteAnswer::DatabaseKept`]. A variant of its own rather than a field of
    /// `DropDatabase`: that one is serialised as the bare string `"dropDatabase"`, which
    /// entries already in Raft logs hold and a struct variant would not decode.
    DropDatabaseUpTo {
        max_epoch: u64,
    },
    /// The database's route epoch is now `epoch` (it only ever rises): from this entry on,
    /// commands and reads with an older epoch are refused with `StaleRoute`. The control
    /// plane sets it when a database's route changes (hot migration's switch and fence).
    SetRouteEpoch {
        epoch: u64,
    },
    /// A checksum marker: every member records the database's sum as of this entry (see
    /// `store::checksum`), so replicas are compared at the same log index.
    Checksum,
    /// One step of importing the database as hot migration `migration` (see
    /// `store::import`): copied documents and oplog changes written as they are, with no
    /// uniqueness check and no oplog entries of their own.
    Import {
        migration: String,
        step: nimbus_api::migration::ImportStep,
    },
    /// Keeps the oplog from Raft index `from_index` on against retention until the replica
    /// set's clock passes `expires_ms` (or an unpin), under `name`; pinning a name again
    /// moves its pin. The command's database is not used.
    PinOplog {
        name: String,
        from_index: u64,
        expires_ms: u64,
    },
    /// Removes the pin `name` (nothing when there is none).
    UnpinOplog {
        name: String,
    },
}

impl WriteOp {
    /// Metric label of the operation.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteOp::Insert { .. } => "insert",
            WriteOp::Update { .. } => "update",
            WriteOp::Delete { .. } => "delete",
            WriteOp::CreateCollection { .. } => "create_collection",
            WriteOp::DropCollection { .. } => "drop_collection",
            WriteOp::CreateIndex { .. } => "create_index",
            WriteOp::DropIndex { .. } => "drop_index",
            WriteOp::BuildIndex { .. } => "build_index",
            WriteOp::DropDatabase | WriteOp::DropDatabaseUpTo { .. } => "drop_database",
            WriteOp::SetRouteEpoch { .. } => "set_route_epoch",
            WriteOp::Checksum => "checksum",
            WriteOp::Import { .. } => "import",
            WriteOp::PinOplog { .. } => "pin_oplog",
            WriteOp::UnpinOplog { .. } => "unpin_oplog",
        }
    }
}

/// What a successful write answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum WriteAnswer {
    Inserted {
        ids: Vec<Value>,
    },
    Updated {
        matched: u64,
        modified: u64,
        upserted_id: Option<Value>,
    },
    Deleted {
        deleted: u64,
    },
    /// `created` is false when the collection already existed.
    CollectionCreated {
        created: bool,
    },
    /// `ready` is false while the index is still being built.
    IndexCreated {
        name: String,
        #[serde(default)]
        ready: bool,
    },
    /// One step of an index build: `done` once the index is ready or its build failed
    /// (`failed` says why).
    IndexBuildStep {
        done: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failed: Option<String>,
    },
    /// `found` is false when there was nothing to drop.
    Dropped {
        found: bool,
    },
    /// A `DropDatabaseUpTo` that dropped nothing: the replica set knows route epoch
    /// `epoch` for the database, above the drop's bound (a newer instance of the name, or
    /// the database moved back, writes here now).
    DatabaseKept {
        found: bool,
        epoch: u64,
    },
    /// The database's route epoch after a `SetRouteEpoch`.
    RouteEpoch {
        epoch: u64,
    },
    /// The database's sum at a checksum marker.
    Checksum(super::checksum::ChecksumAt),
    /// An import step, an oplog pin or unpin took effect (or had already).
    Done,
    /// A membership change or blank entry: no answer for a client.
    None,
}

/// The state machine's answer to one entry: applied, or refused with nothing changed.
pub type WriteResult = Result<WriteAnswer, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_round_trip_and_omit_empty_options() {
        let c = Command {
            db: "d".into(),
            op: WriteOp::Insert { coll: "c".into(), docs: vec![RawValue::from_string(r#"{"_id":1}"#.into()).unwrap()] },
            idempotency_key: None,
            ts_ms: 5,
            route_epoch: None,
            request_hash: None,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v, json!({"db": "d", "op": {"insert": {"coll": "c", "docs": [{"_id": 1}]}}, "tsMs": 5}));
        let back: Command = serde_json::from_str(&v.to_string()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
    }

    #[test]
    fn a_drop_of_an_older_log_still_decodes_and_a_bounded_drop_has_its_own_variant() {
        // As the releases before the bound wrote it.
        let old: Command = serde_json::from_str(r#"{"db":"d","op":"dropDatabase","tsMs":5}"#).unwrap();
        assert!(matches!(old.op, WriteOp::DropDatabase));
        let v = serde_json::to_value(WriteOp::DropDatabase).unwrap();
        assert_eq!(v, json!("dropDatabase"));
        let v = serde_json::to_value(WriteOp::DropDatabaseUpTo { max_epoch: 7 }).unwrap();
        assert_eq!(v, json!({"dropDatabaseUpTo": {"max_epoch": 7}}));
        let back: WriteOp = serde_json::from_value(v).unwrap();
        assert!(matches!(back, WriteOp::DropDatabaseUpTo { max_epoch: 7 }));
    }
}
