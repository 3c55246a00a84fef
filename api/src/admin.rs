//! The datanode admin API: `GET /v1/status` (`API.md` section 2) and the operations the
//! control plane drives (membership, leader transfer, snapshots, the oplog stream).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Role of a replica-set member as `GET /v1/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Learner,
    /// Starting, or not yet part of an initialised replica set.
    Candidate,
}

/// Answer of `GET /v1/status`. The first eight fields are the contract of `API.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub id: u64,
    pub zone: String,
    pub replica_set: String,
    pub role: Role,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Members by id with their addresses; voters and learners.
    pub members: Vec<MemberInfo>,
    /// On the leader: how many log entries each follower is behind.
    #[serde(default)]
    pub replication_lag: std::collections::BTreeMap<u64, u64>,
    /// Index of the last entry covered by the newest snapshot.
    pub snapshot_index: Option<u64>,
    /// Index of the last purged Raft log entry.
    pub purged_index: Option<u64>,
    /// Oldest Raft index still in the oplog (None when it is empty).
    pub oplog_first_index: Option<u64>,
    /// The member is stopping (SIGTERM): it takes no writes, never stands for election and
    /// is never handed the leadership. Absent (false) from members that predate it.
    #[serde(default)]
    pub draining: bool,
}

/// A member of a replica set, with what the others need to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    pub id: u64,
    /// Base URL of the member's admin port.
    pub admin_addr: String,
    /// Base URL of the member's data port.
    pub data_addr: String,
    /// Base URL of the member's Raft port (other members only).
    #[serde(default)]
    pub raft_addr: String,
    pub zone: String,
    #[serde(default)]
    pub voter: bool,
}

/// `POST /v1/admin/init`: bootstrap a new replica set with these voters (the caller first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRequest {
    pub members: Vec<MemberInfo>,
}

/// `POST /v1/admin/learners`: add a learner (non-voting member); returns once it is added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddLearnerRequest {
    pub member: MemberInfo,
    /// Wait until the learner has caught up with the leader's log before answering.
    #[serde(default)]
    pub blocking: bool,
}

/// `POST /v1/admin/voters`: set the voters to exactly these ids (one change at a time:
/// the set may differ from the current one by at most one member).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeVotersRequest {
    pub voters: Vec<u64>,
}

/// `POST /v1/admin/members/remove`: remove a member (voter or learner) entirely.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveMemberRequest {
    pub id: u64,
}

/// `POST /v1/admin/transfer-leader`: move leadership to `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferLeaderRequest {
    pub to: u64,
}

/// `POST /v1/admin/route-epoch`: raise a database's route epoch on this replica set
/// (through Raft). Requests carrying an older epoch are refused from then on. Answers
/// [`RouteEpochAnswer`]: the epoch now in force (never lower than before) and its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetRouteEpochRequest {
    pub db: String,
    pub epoch: u64,
}

/// Answer of `POST /v1/admin/route-epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEpochAnswer {
    /// The epoch now in force.
    pub epoch: u64,
    /// Log index of the epoch's entry: every change made under an older epoch is at or
    /// before it (a hot migration's fence, its final index). Absent from older datanodes.
    #[serde(default)]
    pub index: u64,
}

/// Answer of `POST /v1/admin/drop-database` (`nimbus_api::migration::DropDatabaseRequest`):
/// `{"found", "index"}`, and `"kept": true, "epoch": E` when the request's `maxEpoch` was
/// below the newest epoch `E` of the database on the replica set, so nothing was dropped.
/// Answers without `kept` (older datanodes, drops without `maxEpoch`) dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedDatabase {
    /// False when the replica set held nothing of the database (with `kept`: holds
    /// nothing of it now).
    pub found: bool,
    /// Log index of the drop's entry.
    pub index: u64,
    /// Nothing was dropped: the database's newest epoch here (its route epoch, or that of
    /// a write applied with a newer one) is above `maxEpoch`: its data belongs to a newer
    /// route (a new instance of the name, or the database moved back).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
    /// With `kept`: the database's newest epoch on the replica set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// `POST /v1/admin/checksum` (leader only): a checksum marker through Raft. Every member
/// records the database's order-independent checksum at the marker's log index; the leader
/// answers its own `{"index", "checksum", "documents", "catalog"}`, and `GET
/// /v1/admin/checksum?db=` on each member answers what it recorded. `catalog` is a SHA-256
/// (hex) of the collections' names and their indexes' names, fields and uniqueness (empty
/// in markers recorded by older datanodes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChecksumRequest {
    pub db: String,
}

/// One change of the replica set's oplog: idempotent, the full after-image of an insert or
/// replace, the `_id` of a delete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OplogEntry {
    /// Raft log index of the write that made this change.
    pub index: u64,
    /// Position of this change among the changes of that write.
    pub seq: u32,
    /// Leader's wall-clock time of the write, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub db: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coll: Option<String>,
    pub op: OplogOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum OplogOp {
    /// The document now is exactly `doc` (insert, update or replace).
    Put {
        id: Value,
        doc: Value,
    },
    /// The document with this `_id` is gone.
    Delete {
        id: Value,
    },
    CreateCollection,
    DropCollection,
    CreateIndex {
        spec: Value,
    },
    DropIndex {
        name: String,
    },
    DropDatabase,
    /// The database was replaced by an import (`ImportStep::Finish`: a restore into a new
    /// instance, or a hot migration's copy arriving): what it holds from here on came in
    /// whole, not through the changes before this one. A replay of the oplog (a backup's
    /// archive) cannot cross it: a point after it is restored from a full taken after it
    /// (or, for a migration, from the source's history up to its fence).
    Imported {
        /// The import's id (`ImportRequest::migration`).
        import: String,
    },
}

/// `GET /v1/admin/oplog?from=I&limit=N` answers a page; `next` is where to continue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OplogPage {
    pub entries: Vec<OplogEntry>,
    pub next: u64,
}
