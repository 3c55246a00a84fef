//! What the backup agent needs from the world ([`BackupWorld`]): the database's route and
//! the leader of its replica set, the datanode calls it shares with hot migration (export,
//! oplog, pins, checksum markers), and its own persisted record ([`ArchiveRecord`],
//! `/nimbus/backups/{db}/{incarnation}` in etcd; kept while the incarnation's backups are,
//! deleted when they are swept). [`LiveWorld`], the migration's real world, is the real
//! one; the tests use a model.

use async_trait::async_trait;
use nimbus_api::etcd::Route;
use nimbus_api::migration::{DbOplogPage, ExportPage, ExportRequest, OplogPosition, PinOplogRequest};
use serde::{Deserialize, Serialize};

use crate::controlplane::backup::format::Handoff;
use crate::controlplane::backup::{Incarnation, Lineage, SegmentName};
use crate::controlplane::migration::{ChecksumMarker, Failure, LiveWorld, MigrationWorld, ReplicaSetAccess, Step};

/// Where the agent's records live in etcd: one per incarnation of a database.
pub const BACKUPS: &str = "/nimbus/backups/";

/// `/nimbus/backups/{db}/{incarnation}`: a new instance with a deleted one's database name
/// starts a record of its own.
pub fn backup_key(db: &str, incarnation: &Incarnation) -> String {
    format!("{BACKUPS}{db}/{incarnation}")
}

/// The oplog archiver's progress for one database, persisted after each segment is stored
/// (never before: a crash re-archives a segment rather than skipping one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveRecord {
    pub db: String,
    /// The instance's incarnation (the record's key names it too).
    pub incarnation: Incarnation,
    /// The lineage being archived (`{replica_set}.r{incarnation}` of the replica set the
    /// route names: [`super::lineage_of`]).
    pub lineage: Lineage,
    /// Every change of the lineage at or before this is archived.
    pub position: OplogPosition,
    /// Every change with a time at or before this is at or before `position` (ms).
    pub covered_ms: u64,
    /// Bytes of oplog changes (their JSON) archived since the newest full of the lineage:
    /// what `full_due` weighs against the database's size.
    #[serde(default)]
    pub oplog_bytes_since_full: u64,
    /// The database's size as the newest full read it (bytes of documents' JSON).
    #[serde(default)]
    pub db_bytes: u64,
    /// The archive cannot go on from `position` (the oplog there was truncated): a new full
    /// must be taken and the archive restarts from its start.
    #[serde(default)]
    pub broken: bool,
    /// Idle progress kept here rather than in an empty segment: the database has no change
    /// in `(position, idle_position]`, and every change with a time at or before
    /// `idle_covered_ms` is at or before `idle_position`. The next segment stored starts at
    /// `position` and spans it; an empty one is stored only every
    /// [`super::AgentTuning::idle_segment_every`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_position: Option<OplogPosition>,
    #[serde(default)]
    pub idle_covered_ms: u64,
}

impl ArchiveRecord {
    /// The record's idle progress as a segment name without an object
    /// ([`SegmentName::record_only`]): a listing with it appended covers the time the
    /// record does (`recoverable_window`, `plan_restore`).
    pub fn idle_tip(&self) -> Option<SegmentName> {
        let through = self.idle_position?;
        (!self.broken)
            .then(|| SegmentName::record_only(self.lineage.clone(), self.position, through, self.idle_covered_ms))
    }
}

/// A handoff the migration driver recorded for a move that switched
/// (`MigrationRecord::handoff`), and the replica set the database left, where the archiver
/// archives the old lineage through the handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHandoff {
    pub handoff: Handoff,
    pub from_replica_set: String,
}

/// Everything the agent does outside itself. Errors are the migration's [`Failure`]s (the
/// same datanode calls fail the same ways).
#[async_trait]
pub trait BackupWorld: Send + Sync {
    /// `db`'s route; `None` when the database has none (deleted, not placed yet).
    async fn route(&self, db: &str) -> Result<Option<Route>, Failure>;
    /// The replica set's leader and voters; `None` when the replica set does not exist.
    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure>;
    /// The incarnation of the replica set's Raft log (on Kubernetes, the etcd revision
    /// that created its `/nimbus/replicasets/{namespace}/{name}` record): what names an oplog
    /// lineage with the replica set's name ([`super::lineage_of`]). `None` when the replica
    /// set has no record, as in the playground, whose replica-set names are never given to
    /// another Raft log while its state lives.
    async fn replica_set_incarnation(&self, _namespace: &str, _name: &str) -> Result<Option<u64>, Failure> {
        Ok(None)
    }
    async fn export(&self, rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure>;
    async fn oplog(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure>;
    async fn pin_oplog(&self, rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure>;
    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure>;
    /// The handoff of `db`'s latest hot migration, once it switched (its record at `Switch`
    /// or later); `None` when there is none (no migration, one from an older driver, one
    /// that did not switch), and the archiver then takes a full on arrival.
    async fn handoff(&self, _db: &str) -> Result<Option<RecordedHandoff>, Failure> {
        Ok(None)
    }
    /// The archiver's record of this incarnation of `db`, and its revision.
    async fn archive_record(
        &self,
        db: &str,
        incarnation: &Incarnation,
    ) -> Result<Option<(ArchiveRecord, u64)>, Failure>;
    /// Writes the record if its revision is still `expected` (`None`: if there is none);
    /// the new revision, or `None` when another writer changed it.
    async fn save_archive_record(&self, record: &ArchiveRecord, expected: Option<u64>) -> Result<Option<u64>, Failure>;
    /// Deletes the record of this incarnation of `db` (nothing when there is none): its
    /// backups are being swept ([`super::BackupAgent::sweep`]).
    async fn delete_archive_record(&self, db: &str, incarnation: &Incarnation) -> Result<(), Failure>;
    /// The import calls a scratch restore needs (`backup::verify`); `None` where the agent
    /// does not verify.
    fn restorer(&self) -> Option<&dyn crate::controlplane::backup::restore::RestoreWorld> {
        None
    }

    /// What each member of `rs` recorded at `db`'s last checksum marker, by member (its
    /// admin address): `None` where it recorded none or did not answer. Empty when the
    /// members cannot be asked one by one (then no replica check is made).
    async fn recorded_checksums(
        &self,
        _rs: &ReplicaSetAccess,
        _db: &str,
    ) -> Result<Vec<(String, Option<ChecksumMarker>)>, Failure> {
        Ok(Vec::new())
    }
}

fn from_coord(e: crate::controlplane::CoordError) -> Failure {
    use crate::controlplane::CoordError;
    match e {
        // A record this code cannot read stays so: not worth retrying.
        CoordError::Decode { .. } | CoordError::Config(_) => Failure::Refused(e.to_string()),
        CoordError::Etcd(_) => Failure::Transient(e.to_string()),
    }
}

#[async_trait]
impl BackupWorld for LiveWorld {
    async fn route(&self, db: &str) -> Result<Option<Route>, Failure> {
        Ok(MigrationWorld::route(self, db).await?.map(|(route, _)| route))
    }

    async fn replica_set(&self, namespace: &str, name: &str) -> Result<Option<ReplicaSetAccess>, Failure> {
        MigrationWorld::replica_set(self, namespace, name).await
    }

    async fn replica_set_incarnation(&self, namespace: &str, name: &str) -> Result<Option<u64>, Failure> {
        self.coord.replica_set_incarnation(namespace, name).await.map_err(from_coord)
    }

    async fn export(&self, rs: &ReplicaSetAccess, req: &ExportRequest) -> Result<ExportPage, Failure> {
        MigrationWorld::export(self, rs, req).await
    }

    async fn oplog(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
        after: OplogPosition,
        limit: u32,
    ) -> Result<DbOplogPage, Failure> {
        MigrationWorld::oplog(self, rs, db, after, limit).await
    }

    async fn pin_oplog(&self, rs: &ReplicaSetAccess, req: &PinOplogRequest) -> Result<(), Failure> {
        MigrationWorld::pin_oplog(self, rs, req).await
    }

    async fn checksum(&self, rs: &ReplicaSetAccess, db: &str) -> Result<ChecksumMarker, Failure> {
        MigrationWorld::checksum(self, rs, db).await
    }

    async fn archive_record(
        &self,
        db: &str,
        incarnation: &Incarnation,
    ) -> Result<Option<(ArchiveRecord, u64)>, Failure> {
        self.coord.get_json_revision(&backup_key(db, incarnation)).await.map_err(from_coord)
    }

    fn restorer(&self) -> Option<&dyn crate::controlplane::backup::restore::RestoreWorld> {
        Some(self)
    }

    async fn handoff(&self, db: &str) -> Result<Option<RecordedHandoff>, Failure> {
        let Some((record, _)) = MigrationWorld::record(self, db).await? else { return Ok(None) };
        let switched = matches!(record.step, Step::Switch | Step::CleanUp | Step::Done);
        Ok(record
            .handoff
            .filter(|_| switched)
            .map(|handoff| RecordedHandoff { handoff, from_replica_set: record.from_replica_set }))
    }

    async fn recorded_checksums(
        &self,
        rs: &ReplicaSetAccess,
        db: &str,
    ) -> Result<Vec<(String, Option<ChecksumMarker>)>, Failure> {
        let Some(addrs) = self.directory.admin_addrs(&rs.namespace, &rs.name).await else {
            return Err(Failure::Gone(format!("replica set {} has no members listed", rs.name)));
        };
        let mut out = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let marker = self.admin.recorded_checksum(&addr, db).await.ok().flatten();
            out.push((addr, marker));
        }
        Ok(out)
    }

    async fn save_archive_record(&self, record: &ArchiveRecord, expected: Option<u64>) -> Result<Option<u64>, Failure> {
        self.coord.put_json_if(&backup_key(&record.db, &record.incarnation), record, expected).await.map_err(from_coord)
    }

    async fn delete_archive_record(&self, db: &str, incarnation: &Incarnation) -> Result<(), Failure> {
        self.coord.delete_key(&backup_key(db, incarnation)).await.map_err(from_coord)
    }
}
