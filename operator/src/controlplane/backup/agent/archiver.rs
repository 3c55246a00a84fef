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
/// The covered time (`maxTs`) rests on one fact of the datanode, not on any clock agreeing:
/// commands apply at times that never go backwards in the log (`Engine::command_time`), so
/// every change applied after one stamped `t`, or after a snapshot whose replica-set clock
/// is `t`, is stamped `t` or later. Hence the millisecond before the newest change read,
/// and, when a read found the reader caught up with the answering member's applied index,
/// the millisecond before that snapshot's clock (`DbOplogPage::clock_ms`). A member that
/// lost its leadership without knowing, or lags, answers an older clock: the covered time
/// then stays behind, never claims a change it did not see. For a replica set nobody
/// writes to, the archiver renews its pin early once the clock is `tuning.idle_tick`
/// behind its own ([`AgentTuning::idle_tick`]): a Raft entry that moves the clock on
/// (idle segments, `after == through`).
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
            // A later change may carry the same millisecond.
            covered = covered.max(e.ts_ms.saturating_sub(1));
        }
        entries.extend(page.entries);
        pos = pos.max(page.next);
        let caught_up = page.next >= OplogPosition::end_of(page.applied_index);
        let mut ticked = false;
        if caught_up {
            covered = covered.max(page.clock_ms.saturating_sub(1));
            if sent_ms.saturating_sub(page.clock_ms) > tuning.idle_tick.as_millis() as u64 {
                // Nobody writes to the replica set: an early pin renewal moves its clock.
                state.pin_expires_ms = 0;
                renew_pin(world, rs, &archive_pin_name(&db), after.index, tuning.pin_ttl, &mut state.pin_expires_ms)
                    .await?;
                // Read again at once: the new clock covers up to now.
                ticked = true;
            }
        }
        let now = Instant::now();
        if bytes >= tuning.segment_bytes || now >= deadline {
            break;
        }
        if caught_up && !ticked {
            tokio::time::sleep(tuning.poll.min(deadline - now)).await;
        }
    }
    // The changes stamped after the covered time (the newest millisecond's: a later change
    // may still carry it) wait for the next segment, which starts before them; times never
    // go backwards in the log, so they are a suffix.
    let keep = entries.partition_point(|e| e.ts_ms <= covered);
    if keep < entries.len() {
        let held: Vec<_> = entries.split_off(keep);
        bytes =
            bytes.saturating_sub(held.iter().map(|e| serde_json::to_vec(e).map(|v| v.len() as u64).unwrap_or(0)).sum());
        pos = entries.last().map_or(after, |e| OplogPosition { index: e.index, seq: e.seq });
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
