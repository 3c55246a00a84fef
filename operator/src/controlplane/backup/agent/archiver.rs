//! The oplog archiver of one database: its changes read from the leader of its replica set
//! into segments, each closed after `segment_seconds` or `segment_bytes`, stored, and only
//! then the position persisted (`/nimbus/backups/{db}/{incarnation}`): a crash re-archives
//! a segment (harmless, the restore applies each position once), never skips one. A read
//! without a change of the database stores nothing: its covered time goes into the record
//! (`idle_position`, `idle_covered_ms`), and an empty segment is stored only every
//! `idle_segment_every`, so the store alone proves the window up to that age. The source's oplog
//! is pinned from the archived position under `backup:{db}`, so retention on the datanodes
//! never removes what is not archived yet.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use nimbus_api::admin::{OplogEntry, OplogOp};
use nimbus_api::migration::OplogPosition;

use super::full::renew_pin;
use super::world::{ArchiveRecord, BackupWorld};
use super::{AgentError, AgentTuning, Source, now_ms};
use crate::controlplane::backup::{BackupStore, NewSegment, SegmentName};
use crate::controlplane::migration::{Failure, ReplicaSetAccess};

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
    /// When this archiver last stored a segment (0: not yet): an idle database gets an
    /// empty one once this is `idle_segment_every` old.
    pub last_stored_ms: u64,
    /// Archive no further than this: the old lineage of a database that moved, through its
    /// handoff's `from_position` ([`archive_through`]). Changes after it (the source's drop
    /// of its copy at the migration's clean-up) are not the database's history.
    pub stop_at: Option<OplogPosition>,
    /// Where this lineage's archive started from a migration's handoff (its
    /// `to_position`): the arriving import's own mark, the database's first change after
    /// it, is the move the handoff joins, not a replacement (see [`archive_segment`]).
    pub arrival: Option<OplogPosition>,
}

/// What one call of [`archive_segment`] moved on.
#[derive(Debug, Clone)]
pub enum Archived {
    /// A segment was stored: its name and the changes' bytes it added.
    Stored { name: SegmentName, bytes: u64 },
    /// No change of the database: the covered time moved on in the record only, as this
    /// record-only name says ([`SegmentName::record_only`]).
    Idle { tip: SegmentName },
    /// The database was replaced by an import with nothing left to store before it: the
    /// record is broken at its mark (see `end_before_import`).
    Replaced,
}

/// The last early pin renewal per replica set: one Raft entry moves the clock of every
/// database on it, so the archivers of one replica set's idle databases take turns rather
/// than each writing one every `idle_tick`.
#[derive(Debug, Default)]
pub struct IdleTicks(Mutex<HashMap<(String, String), u64>>);

impl IdleTicks {
    /// Whether this archiver renews now: no archiver of the replica set did in the last
    /// `every` (then it is marked as done now).
    pub fn claim(&self, rs: &ReplicaSetAccess, now_ms: u64, every: std::time::Duration) -> bool {
        let mut ticks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let last = ticks.entry((rs.namespace.clone(), rs.name.clone())).or_insert(0);
        if last.saturating_add(every.as_millis() as u64) > now_ms {
            return false;
        }
        *last = now_ms;
        true
    }
}

/// Reads `source`'s oplog of the database from the archived position until the segment is
/// due (its age or its size); stores it when it holds changes (or when the last stored
/// segment is `idle_segment_every` old), else keeps the covered time in the record only;
/// then persists the record. `None` when nothing moved on (no change and no time newer than
/// the archive already covers).
///
/// The covered time (`maxTs`) rests on one fact of the datanode, not on any clock agreeing:
/// commands apply at times that never go backwards in the log (`Engine::command_time`), so
/// every change applied after one stamped `t`, or after a snapshot whose replica-set clock
/// is `t`, is stamped `t` or later. Hence the millisecond before the newest change read,
/// and, when a read found the reader caught up with the answering member's applied index,
/// the millisecond before that snapshot's clock (`DbOplogPage::clock_ms`). A member that
/// lost its leadership without knowing, or lags, answers an older clock: the covered time
/// then stays behind, never claims a change it did not see. For a replica set nobody
/// writes to, an archiver renews its pin early once the clock is `tuning.idle_tick` behind
/// its own ([`AgentTuning::idle_tick`]), at most one archiver per replica set per
/// `idle_tick` (`ticks`): a Raft entry that moves the clock on.
pub async fn archive_segment(
    world: &dyn BackupWorld,
    store: &BackupStore,
    source: &Source,
    state: &mut ArchiveState,
    tuning: &AgentTuning,
    ticks: &IdleTicks,
) -> Result<Option<Archived>, AgentError> {
    let db = state.record.db.clone();
    let rs = &source.rs;
    // Stored through `after`; read (idle, no change since) through `from`.
    let after = state.record.position;
    let from = state.record.idle_position.unwrap_or(after).max(after);
    let covered_before = state.record.covered_ms.max(state.record.idle_covered_ms);
    renew_pin(world, rs, &archive_pin_name(&db), after.index, tuning.pin_ttl, &mut state.pin_expires_ms).await?;
    let deadline = Instant::now() + tuning.segment_time;
    let (mut pos, mut covered, mut bytes) = (from, covered_before, 0u64);
    let mut entries = Vec::new();
    // An import's mark (`OplogOp::Imported`) met: the archive of this chain ends before it.
    let mut replaced: Option<OplogEntry> = None;
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
        let mut page = page;
        if let Some(stop) = state.stop_at {
            page.entries.retain(|e| OplogPosition { index: e.index, seq: e.seq } <= stop);
            page.next = page.next.min(stop);
        }
        let mut page_entries = std::mem::take(&mut page.entries);
        if state.arrival == Some(state.record.position)
            && entries.is_empty()
            && page_entries.first().is_some_and(|e| matches!(e.op, OplogOp::Imported { .. }))
        {
            // The migration's `Finish` on this replica set, right after its handoff's
            // position: the state there is the old lineage's at the fence (nothing else of
            // the database was written between), so the chain goes on across it.
            page_entries.remove(0);
            state.arrival = None;
        }
        if let Some(at) = page_entries.iter().position(|e| matches!(e.op, OplogOp::Imported { .. })) {
            // The database was replaced here (a restore into it): its changes from here on
            // are of what came in whole, which no segment holds. The chain ends before
            // the mark, and the archive goes on from a full taken after it.
            replaced = page_entries.drain(at..).next();
        }
        for e in &page_entries {
            bytes += serde_json::to_vec(e).map(|v| v.len() as u64).unwrap_or(0);
            // A later change may carry the same millisecond.
            covered = covered.max(e.ts_ms.saturating_sub(1));
        }
        entries.extend(page_entries);
        if let Some(mark) = &replaced {
            // Every change before the mark is read: covered to the millisecond before it.
            covered = mark.ts_ms.saturating_sub(1).max(covered_before);
            pos = pos.max(OplogPosition::end_of(mark.index.saturating_sub(1)));
            break;
        }
        pos = pos.max(page.next);
        let reached_stop = state.stop_at.is_some_and(|stop| page.next >= stop);
        let caught_up = page.next >= OplogPosition::end_of(page.applied_index) || reached_stop;
        let mut ticked = false;
        if reached_stop {
            // An old lineage read through its handoff: no change of the database comes after
            // it here, so its last change's time is covered; the clock's is not claimed (the
            // database's changes since then are on the new lineage).
            covered = covered.max(entries.last().map_or(0, |e| e.ts_ms));
        } else if caught_up {
            covered = covered.max(page.clock_ms.saturating_sub(1));
            let behind = sent_ms.saturating_sub(page.clock_ms) > tuning.idle_tick.as_millis() as u64;
            if behind && ticks.claim(rs, sent_ms, tuning.idle_tick) {
                // Nobody writes to the replica set: an early pin renewal moves its clock.
                state.pin_expires_ms = 0;
                renew_pin(world, rs, &archive_pin_name(&db), after.index, tuning.pin_ttl, &mut state.pin_expires_ms)
                    .await?;
                // Read again at once: the new clock covers up to now.
                ticked = true;
            }
        }
        let now = Instant::now();
        // Ends the segment only with something to store: the changes of one millisecond
        // (one Raft entry: a restore's `Publish`, a large batch) can exceed the segment's
        // size, and all of them wait while a later change may share their millisecond, so
        // stopping there would read the same changes again for ever.
        let storable = entries.first().is_none_or(|e| e.ts_ms <= covered);
        if (bytes >= tuning.segment_bytes || now >= deadline) && storable {
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
        pos = entries.last().map_or(from, |e| OplogPosition { index: e.index, seq: e.seq });
    }
    if let Some(mark) = replaced {
        return end_before_import(world, store, state, after, pos, covered, entries, bytes, &mark).await;
    }
    if entries.is_empty() && pos == from && covered <= covered_before {
        return Ok(None);
    }
    let now = now_ms();
    let idle_segment_due = now.saturating_sub(state.last_stored_ms) >= tuning.idle_segment_every.as_millis() as u64;
    if entries.is_empty() && !idle_segment_due {
        // Idle: the record alone says how far the archive covers.
        state.record.idle_position = Some(pos);
        state.record.idle_covered_ms = covered;
        save(world, state).await?;
        let tip = SegmentName::record_only(state.record.lineage.clone(), after, pos, covered);
        return Ok(Some(Archived::Idle { tip }));
    }
    // One segment from the stored position: it spans the idle stretch (no change there).
    let segment =
        NewSegment { lineage: state.record.lineage.clone(), after, through: pos, covered_through_ms: covered, entries };
    let name = store.put_segment(&segment).await?;
    state.last_stored_ms = now;
    state.record.position = pos;
    state.record.covered_ms = covered;
    state.record.idle_position = None;
    state.record.idle_covered_ms = 0;
    state.record.oplog_bytes_since_full = state.record.oplog_bytes_since_full.saturating_add(bytes);
    save(world, state).await?;
    Ok(Some(Archived::Stored { name, bytes }))
}

/// The chain's last segment, through the change before an import's `mark` (what it covers
/// stays restorable), then the record broken at the mark: only a full started after it
/// starts the archive again (`agent::archive_start`), and the scheduler takes one at once.
#[allow(clippy::too_many_arguments)]
async fn end_before_import(
    world: &dyn BackupWorld,
    store: &BackupStore,
    state: &mut ArchiveState,
    after: OplogPosition,
    through: OplogPosition,
    covered: u64,
    entries: Vec<OplogEntry>,
    bytes: u64,
    mark: &OplogEntry,
) -> Result<Option<Archived>, AgentError> {
    let stored = if !entries.is_empty() || covered > state.record.covered_ms {
        let segment =
            NewSegment { lineage: state.record.lineage.clone(), after, through, covered_through_ms: covered, entries };
        let name = store.put_segment(&segment).await?;
        state.last_stored_ms = now_ms();
        state.record.oplog_bytes_since_full = state.record.oplog_bytes_since_full.saturating_add(bytes);
        Some(Archived::Stored { name, bytes })
    } else {
        None
    };
    let OplogOp::Imported { import } = &mark.op else { return Ok(stored) };
    tracing::info!(
        db = %state.record.db, import = %import, index = mark.index,
        "the database was replaced by an import: the oplog archive goes on from a full taken after it"
    );
    state.record.position = OplogPosition { index: mark.index, seq: mark.seq };
    state.record.covered_ms = covered;
    state.record.idle_position = None;
    state.record.idle_covered_ms = 0;
    state.record.broken = true;
    save(world, state).await?;
    Ok(Some(stored.unwrap_or(Archived::Replaced)))
}

/// Archives the old lineage of a database that moved through `stop` (its handoff's
/// `from_position`) and no further, so that the stored segments reach it: a restore's
/// chain goes on into the new lineage from there. Returns once the record's stored
/// position is at `stop`, with the segments it stored.
pub async fn archive_through(
    world: &dyn BackupWorld,
    store: &BackupStore,
    source: &Source,
    state: &mut ArchiveState,
    stop: OplogPosition,
    tuning: &AgentTuning,
    ticks: &IdleTicks,
) -> Result<Vec<SegmentName>, AgentError> {
    state.stop_at = Some(stop);
    let mut stored = Vec::new();
    while state.record.position < stop {
        if state.record.idle_position.is_some_and(|p| p >= stop) {
            // Read through it already, without a change: one empty segment stores that.
            let covered = state.record.covered_ms.max(state.record.idle_covered_ms);
            let segment = NewSegment {
                lineage: state.record.lineage.clone(),
                after: state.record.position,
                through: stop,
                covered_through_ms: covered,
                entries: Vec::new(),
            };
            stored.push(store.put_segment(&segment).await?);
            state.last_stored_ms = now_ms();
            state.record.position = stop;
            state.record.covered_ms = covered;
            state.record.idle_position = None;
            state.record.idle_covered_ms = 0;
            save(world, state).await?;
            break;
        }
        // What is read is stored, even without a change: the record of this lineage is
        // about to be replaced by the new one's.
        state.last_stored_ms = 0;
        if let Some(Archived::Stored { name, .. }) = archive_segment(world, store, source, state, tuning, ticks).await?
        {
            stored.push(name);
        }
    }
    Ok(stored)
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
