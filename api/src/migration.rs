//! Hot migration's datanode calls (`docs/design/0003-hot-migration.md`): the source exports a
//! database and its oplog, the target imports them through its own Raft log, and neither
//! serves the database's clients while it is not the one the route names.
//!
//! Every call here is on the admin port, needs the cluster secret, and (except `GET
//! /v1/admin/oplog`, which any member answers from its own applied state) is answered by
//! the replica set's leader only (`NotLeader` otherwise, with the leader's hint).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::admin::OplogEntry;

/// A place in the oplog: every change at `(index, seq)` or before it is behind it. Changes
/// of one Raft entry (a multi-update) share the index and differ by `seq`, so a reader
/// that stopped in the middle of an entry continues with the rest of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OplogPosition {
    pub index: u64,
    pub seq: u32,
}

impl OplogPosition {
    /// Everything of Raft entry `index` and before it.
    pub fn end_of(index: u64) -> OplogPosition {
        OplogPosition { index, seq: u32::MAX }
    }
}

/// `GET /v1/admin/oplog?db=DB&afterIndex=I&afterSeq=S&limit=N`: the database's oplog
/// changes after the position, oldest first, at most `limit` (default 1,000, at most
/// 10,000) and about 1 MiB of changes (at least one), so a page always fits one import
/// entry. A page scans a bounded number of entries of other databases too, so it can be
/// empty with `next` moved on. A position older than the retained oplog is refused with
/// `OplogTruncated` (HTTP 410): the reader must start again from an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DbOplogPage {
    pub entries: Vec<OplogEntry>,
    /// Where the next page starts: after the last change returned or scanned.
    pub next: OplogPosition,
    /// This member's applied index when it read the page: `next.index` reaching it means
    /// the reader is caught up with this member.
    pub applied_index: u64,
    /// The replica set's clock (the largest command time applied, ms) in the snapshot the
    /// page was read from: every change applied after it has a time at or after it, so a
    /// reader caught up has every change stamped before it (the covered time of a backup's
    /// oplog archive). 0 from a datanode that predates it.
    #[serde(default)]
    pub clock_ms: u64,
}

/// `POST /v1/admin/export` (leader): one page of a database, read from one RocksDB
/// snapshot. Pages continue from `after` (the previous page's `next`), each from a new
/// snapshot, so a copy that lost its leader continues on the new one. The target reaches
/// the source's state by applying the oplog from the *first* page's `index` on: every
/// oplog change is an idempotent after-image, so documents copied later are only rewritten
/// with what they already were.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportRequest {
    pub db: String,
    pub part: ExportPart,
    /// The previous page's `next`; absent for the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Stop adding documents once the page holds this many bytes of them (at least one
    /// document is always sent).
    pub max_bytes: u64,
    /// `Idempotency` only: just the records written at or after this replica-set clock
    /// time (ms), read in time order (the records of the last seconds, found without
    /// reading the older ones). A copy made before the hold, from the first page's
    /// `clock_ms` on, is completed after the fence with the records written since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExportPart {
    /// Collections (names and index specifications) and documents.
    Documents,
    /// Idempotency records still within their lifetime (read after the fence, when no
    /// write can add one).
    Idempotency,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportPage {
    /// The applied index of the snapshot the page was read from.
    pub index: u64,
    /// The replica set's clock (the largest command time applied, ms) in that snapshot:
    /// every record written after the snapshot has a time at or after it.
    #[serde(default)]
    pub clock_ms: u64,
    /// Every collection of the database with its index specifications (JSON as the
    /// catalog stores them), on every page of `Documents`.
    pub collections: Vec<ExportedCollection>,
    pub docs: Vec<ExportedDoc>,
    pub idempotency: Vec<ExportedIdempotency>,
    /// Where the next page starts; absent when this page was the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedCollection {
    pub name: String,
    /// Index specifications other than `_id`'s.
    pub indexes: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedDoc {
    pub coll: String,
    pub doc: Box<RawValue>,
}

/// An idempotency record as stored (its JSON) with the time its lifetime counts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedIdempotency {
    pub key: String,
    pub ts_ms: u64,
    pub record: Box<RawValue>,
}

/// `POST /v1/admin/import` (leader): one step of importing database `db` as migration
/// `migration`, each one Raft entry on the target. Answers [`ImportAnswer`].
///
/// `Begin` drops whatever the replica set holds of `db` (an earlier aborted attempt) and
/// marks it incoming for `migration`; it is refused (400) when the replica set serves
/// `db` (collections of it here and no incoming mark), so a stale or misdirected `Begin`
/// can never drop a live database: from then on, and until `Finish`, every client
/// request for `db` is refused with `StaleRoute` (the gateway re-reads the route, which
/// does not name this replica set yet). Every other step is refused (409 `BadRequest`)
/// unless `db` is incoming for the same `migration`; `Finish` and `Abort` repeated after
/// they took effect answer as the first time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportRequest {
    pub db: String,
    pub migration: String,
    pub step: ImportStep,
}

// One per request, moved: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImportStep {
    Begin,
    /// Creates the collections and indexes not there yet (unique ones included: imports
    /// do not check uniqueness, since a copy in progress can hold two versions of the
    /// source; the state the target serves is verified equal to the source's, whose
    /// indexes held).
    Collections {
        collections: Vec<ExportedCollection>,
    },
    /// Puts each document (replacing one with the same `_id`), with its index entries.
    Docs {
        docs: Vec<ExportedDoc>,
    },
    /// Applies the source's oplog changes of `db` in order, idempotently (a change already
    /// applied, a collection already created, an index already gone change nothing).
    Ops {
        entries: Vec<OplogEntry>,
    },
    Idempotency {
        records: Vec<ExportedIdempotency>,
    },
    /// The database is served here from now on, at route epoch `epoch`.
    Finish {
        epoch: u64,
    },
    /// Drops what was imported and the incoming mark.
    Abort,
    /// A restore's switch (`docs/design/0004-backup.md`, "Restore in place"): the import,
    /// a staging database ([`restore_staging_db`]), is published into the database `into`
    /// served by the same replica set, in this one entry, so a client sees the collections
    /// before or after, never half restored. With `whole`, `into` becomes exactly the
    /// import (its other collections dropped; `collections` empty); otherwise each
    /// `from → to` of `collections` replaces collection `to` of `into` (or creates it)
    /// with the import's `from`, and `into`'s other collections are untouched. Unless
    /// `replace`, a `to` that exists in `into` is refused and nothing changes. The changes
    /// are written to `into`'s oplog as ordinary changes (drops, collections, indexes,
    /// documents), so migrations and the backup archive see them; the staging database is
    /// dropped and the outcome recorded, so a repeated `Publish` answers as the first did.
    /// `whole` replaces whatever `replace` says. Sent to the staging database
    /// (`ImportRequest::db` = `restore_staging_db(into)`, else refused). Refused when the
    /// import holds more than [`MAX_PUBLISH_BYTES`] of documents (the datanode's
    /// `--max-publish-bytes`), when `into` is itself incoming, and, with `Unavailable`
    /// (retryable: send it again later), while an index of the import is still building.
    Publish {
        into: String,
        #[serde(default)]
        whole: bool,
        #[serde(default)]
        collections: Vec<PublishedCollection>,
        #[serde(default)]
        replace: bool,
        /// The route epoch of `into` the restore saw: refused (`StaleRoute`) when the
        /// replica set's is newer (a migration fenced the database here: what is published
        /// would be left behind by the move). `None`: not checked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route_epoch: Option<u64>,
    },
}

/// One collection of a [`ImportStep::Publish`]: the import's `from` becomes `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedCollection {
    pub from: String,
    pub to: String,
}

/// The most documents' bytes one [`ImportStep::Publish`] moves: it is one Raft entry,
/// applied in one write batch on every member (its documents, index entries and oplog
/// changes in memory at once), which stalls the replica set's other tenants while it
/// applies. Larger restores go into a new instance.
pub const MAX_PUBLISH_BYTES: u64 = 256 << 20;

/// The suffix of a restore's staging database: `~` is in no client's database name
/// ([`crate::limits::validate_name`]), so no client can address one, and no tenant's
/// database can be one.
pub const STAGING_SUFFIX: &str = "~restore";

/// The staging database a restore into `into` imports into before it publishes: one per
/// database, so a new restore's `Begin` drops what an abandoned one left.
pub fn restore_staging_db(into: &str) -> String {
    format!("{into}{STAGING_SUFFIX}")
}

/// The suffix of a verification's scratch database: the background job that verifies the
/// latest backup imports it there, compares the checksum and drops it (`Abort`); never
/// finished, never published, never addressable by a client (`~`, as [`STAGING_SUFFIX`]).
pub const VERIFY_SUFFIX: &str = "~verify";

/// The scratch database a verification of `db`'s backup imports into: one per database, so
/// a new verification's `Begin` drops what an abandoned one left.
pub fn verify_scratch_db(db: &str) -> String {
    format!("{db}{VERIFY_SUFFIX}")
}

/// A database name the admin API's import, checksum and export accept: a client's
/// ([`crate::path::DbName`]), a restore's staging database of one ([`restore_staging_db`])
/// or a verification's scratch database of one ([`verify_scratch_db`]). Nothing else with
/// a `~`: the client's name under the suffix must itself be valid.
pub fn validate_admin_db(db: &str) -> Result<(), crate::ApiError> {
    let name = db.strip_suffix(STAGING_SUFFIX).or_else(|| db.strip_suffix(VERIFY_SUFFIX)).unwrap_or(db);
    crate::limits::validate_name("database", name)
}

impl ImportStep {
    /// The step's name, for messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ImportStep::Begin => "Begin",
            ImportStep::Collections { .. } => "Collections",
            ImportStep::Docs { .. } => "Docs",
            ImportStep::Ops { .. } => "Ops",
            ImportStep::Idempotency { .. } => "Idempotency",
            ImportStep::Finish { .. } => "Finish",
            ImportStep::Abort => "Abort",
            ImportStep::Publish { .. } => "Publish",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportAnswer {
    /// Log index of the step's entry on the target.
    pub index: u64,
}

/// `POST /v1/admin/oplog/pin` (leader, through Raft): keep the oplog from `from_index` on
/// against retention until `expires_ms` (replica-set clock) or an unpin, under `name` (a
/// migration's id; pinning the same name again moves it). `POST /v1/admin/oplog/unpin`
/// takes `{"name"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinOplogRequest {
    pub name: String,
    pub from_index: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnpinOplogRequest {
    pub name: String,
}

/// `POST /v1/admin/drop-database` (leader, through Raft): drops every document, index and
/// idempotency record of `db` on this replica set (a migration's clean-up of its source).
/// The database's route epoch stays, so a sender with an old route is still refused.
/// Answers [`crate::admin::DroppedDatabase`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DropDatabaseRequest {
    pub db: String,
    /// `maxEpoch`: drop only if `db`'s newest epoch on this replica set (its route epoch,
    /// or the newest a write applied here carried) is at most this, decided where the drop
    /// applies in the Raft log. A new instance of the name placed here (its route has a
    /// newer epoch than any the name had) thus keeps its first writes against a
    /// migration's clean-up bounded by the fence's epoch: the answer then says `"kept":
    /// true` and nothing is dropped. Absent: dropped whatever the epoch (an instance's
    /// deletion). A datanode older than this field ignores it and drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epoch: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_api_takes_a_client_name_its_staging_and_its_scratch_database_and_nothing_else_with_a_tilde() {
        for ok in ["shop", "shop~restore", "shop~verify", &restore_staging_db("a-b"), &verify_scratch_db("a_b")] {
            assert!(validate_admin_db(ok).is_ok(), "{ok}");
        }
        for bad in [
            "~restore",
            "~verify",
            "shop~x",
            "shop~restore~restore",
            "shop~verify~verify",
            "shop~restore~verify",
            "shop~verify~restore",
            "shop~",
            "sh~op",
        ] {
            assert!(validate_admin_db(bad).is_err(), "{bad}");
        }
    }
}
