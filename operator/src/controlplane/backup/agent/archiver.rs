//! The oplog archiver of one database: its changes read from the leader of its replica set
//! into segments, each closed after `segment_seconds` or `segment_bytes`, stored, and only
//! then the position persisted (`/nimbus/backups/{db}`): a crash re-archives a segment
//! (harmless, the restore applies each position once), never skips one. The source's oplog
//! is pinned from the archived position under `backup:{db}`, so retention on the datanodes
//! never removes what is not archived yet.

use std::time::Instant;

use nimbus_api::migration::OplogPosition;

use super::full::renew_pin;
use super::world::{ArchiveRecord, BackupWorld};
use super::{AgentError, AgentTuning, Source, now_ms};
use crate::controlplane::backup::{BackupStore, NewSegment, SegmentName};
use crate::controlplane::migration::Failure;

/// The archiver's pin on its source's oplog.
pub fn archive_pin_name(db: &str) -> String {
    format!("backup:{db}")
}

/// An archiver's progress between segments: its record as persisted and its pin.
#[derive(Debug, Clone)]
pub struct ArchiveState {
    pub record: ArchiveRecord,
    /// The record's revision in etcd: the guard of the next save.
    pub revision: Option<u64>,
    pub pin_expires_ms: u64,
}

/// One segment archived: what was stored and the changes' bytes it added.
#[derive(Debug, Clone)]
pub struct Archived {
    pub name: SegmentName,
    pub bytes: u64,
}

/// Reads `source`'s oplog of the database from the archived position until the segment is
/// due (its age or its size), stores it and persists the new position. `None` when there
/// was nothing to store (no change and no time newer than the archive already covers).
///
/// The covered time (`maxTs`): the newest change's time, and when a read found the reader
/// caught up with the leader's applied index, the millisecond before the read was sent,
/// minus `tuning.cover_margin` (a change applied after the read was proposed no earlier than
/// that, as long as the control plane's clock is within the margin of the leader's and a
/// proposal applies within it). That is how the covered time moves on for a database
/// nobody writes to (idle segments, `after == through`).
pub async fn archive_segment(
    world: &dyn BackupWorld,
    store: &BackupStore,
    source: &Source,
    state: &mut ArchiveState,
    tuning: &AgentTuning,
) -> Result<Option<Archived>, AgentError> {
    let db = state.record.db.clone();
    let rs = &source.rs;
    let after = state.record.position;
    renew_pin(world, rs, &archive_pin_name(&db), after.index, tuning.pin_ttl, &mut state.pin_expires_ms).await?;
    let deadline = Instant::now() + tuning.segment_time;
    let (mut pos, mut covered, mut bytes) = (after, state.record.covered_ms, 0u64);
    let mut entries = Vec::new();
    loop {
        let sent_ms = now_ms();
        let page = match world.oplog(rs, &db, pos, tuning.oplog_page).await {
            Ok(page) => page,
            Err(Failure::OplogTruncated) => {
                // Lost before it was archived (the pin lapsed, or the archive started too
                // late): the archive restarts from a new full; restores before stay possible
                // up to here.
                state.record.broken = true;
                save(world, state).await?;
                return Err(AgentError::ArchiveBroken { db, after: pos });
            }
            Err(e) => return Err(e.into()),
        };
        for e in &page.entries {
            bytes += serde_json::to_vec(e).map(|v| v.len() as u64).unwrap_or(0);
            covered = covered.max(e.ts_ms);
        }
        entries.extend(page.entries);
        pos = pos.max(page.next);
        let caught_up = page.next >= OplogPosition::end_of(page.applied_index);
        if caught_up {
            // Strictly before the read was sent: a change proposed in that very
            // millisecond may be applied after the read.
            let margin = tuning.cover_margin.as_millis() as u64 + 1;
            covered = covered.max(sent_ms.saturating_sub(margin));
        }
        let now = Instant::now();
        if bytes >= tuning.segment_bytes || now >= deadline {
            break;
        }
        if caught_up {
            tokio::time::sleep(tuning.poll.min(deadline - now)).await;
        }
    }
    if entries.is_empty() && pos == after && covered <= state.record.covered_ms {
        return Ok(None);
    }
    let segment =
        NewSegment { lineage: state.record.lineage.clone(), after, through: pos, covered_through_ms: covered, entries };
    let name = store.put_segment(&segment).await?;
    state.record.position = pos;
    state.record.covered_ms = covered;
    state.record.oplog_bytes_since_full = state.record.oplog_bytes_since_full.saturating_add(bytes);
    save(world, state).await?;
    Ok(Some(Archived { name, bytes }))
}

/// Persists the record, guarded by its revision: another archiver of the same database
/// (a second control plane) makes this one stop rather than interleave.
pub async fn save(world: &dyn BackupWorld, state: &mut ArchiveState) -> Result<(), AgentError> {
    match world.save_archive_record(&state.record, state.revision).await? {
        Some(revision) => {
            state.revision = Some(revision);
            Ok(())
        }
        None => Err(AgentError::Conflict { db: state.record.db.clone() }),
    }
}
