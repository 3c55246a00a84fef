//! Backup's decisions, pure: what a restore to a time reads ([`plan_restore`]), which times
//! can be restored ([`recoverable_window`]), what retention deletes ([`retention`]), when to
//! take the next full ([`full_due`]). No clock is read and nothing is fetched: callers list
//! the store ([`super::BackupStore`]), pass the time, and act on the answer; the tests feed
//! these functions data (`plan_tests.rs`).
//!
//! The model (`docs/design/0004-backup.md`): a full `F` holds the database at some state
//! between its `start` and `end` oplog positions; replaying the changes after `F.start`
//! through `F.end` makes it consistent, and replaying on through time `T` gives the
//! database at `T`. A chain of segments of `F`'s lineage, each starting at or before where
//! the previous ones reached, supplies those changes; a segment also says up to which time
//! the changes it reached are complete. So `F` restores to `T` exactly when
//! `F.end_ms <= T` and `F`'s chain reaches `F.end` and covers `T`.
//!
//! Across a hot migration ([`Handoff`]): the chain walks `F`'s lineage up to the handoff's
//! `from_position` (every change of the database there), then the new lineage from its
//! `to_position`, where the state is the same: one chain across the move, no full needed
//! on arrival. The `*_across` functions take the handoffs; the others plan as if there
//! were none.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use nimbus_api::migration::OplogPosition;

use super::format::{FullManifest, Handoff};
use super::layout::{FullId, Lineage, SegmentName};
use super::store::FullListing;

/// The point a restore brings the database to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The database as it was at this time (ms since the Unix epoch, the leader's clock
    /// recorded in the oplog): every change at or before it, none after it.
    Time(u64),
    /// The latest time the backups cover.
    Latest,
}

/// What a restore reads and replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// The full to load, page by page.
    pub full: FullManifest,
    /// The segments to replay, in order. They may overlap: the restore applies only the
    /// changes after `full.start` and after the last position it already applied...
    pub segments: Vec<SegmentName>,
    /// ...and only those at or before this time: the point restored to (for
    /// [`RestoreTarget::Latest`], the latest time covered)...
    pub to_ms: u64,
    /// ...and, when set, only those at or before this position: a verification stops
    /// exactly at the full's `end` ([`plan_to_full_end`]), where the manifest's checksum
    /// holds, even when later changes share `end_ms`. `None` for a restore to a time.
    pub until: Option<OplogPosition>,
    /// The hot migrations the plan crosses, in order: `segments` are those of the full's
    /// lineage through the first one's `from_position`, then those of its `to` lineage
    /// after its `to_position`, and so on. Empty for a plan within one lineage. Positions
    /// of two lineages are of two replica sets' logs, unrelated: the restore (`restore.rs`)
    /// restarts its order at each handoff.
    pub handoffs: Vec<Handoff>,
}

/// A span of restorable times, both ends included (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub from_ms: u64,
    pub to_ms: u64,
}

/// Every time a restore can reach: disjoint ranges, oldest first. More than one range only
/// when the archive has a hole (a lost segment, a lineage whose first full was not yet
/// taken when the database moved).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoverableWindow {
    pub ranges: Vec<TimeRange>,
}

impl RecoverableWindow {
    /// `earliestRestorable` of the status (`API.md` section 3).
    pub fn earliest_ms(&self) -> Option<u64> {
        self.ranges.first().map(|r| r.from_ms)
    }

    /// `latestRestorable` of the status.
    pub fn latest_ms(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.to_ms)
    }

    pub fn contains(&self, t: u64) -> bool {
        self.ranges.iter().any(|r| r.from_ms <= t && t <= r.to_ms)
    }
}

impl fmt::Display for RecoverableWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("empty");
        }
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} to {}", rfc3339(r.from_ms), rfc3339(r.to_ms))?;
        }
        Ok(())
    }
}

pub(super) fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Why no restore can be planned. Nothing is changed by a refused restore: the messages
/// are for the person who asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("failed to plan the restore: the database has no complete full backup yet")]
    NoFull,
    #[error("failed to plan the restore to {}: outside the recoverable window ({window})", rfc3339(*.requested_ms))]
    OutsideWindow { requested_ms: u64, window: RecoverableWindow },
    #[error("failed to plan the restore to {}: the oplog archive of lineage {lineage} has a gap after index {} seq {} (full {full} cannot be brought to that time; the recoverable window is {window})", rfc3339(*.requested_ms), .after.index, .after.seq)]
    Gap {
        requested_ms: u64,
        full: FullId,
        lineage: Lineage,
        /// Where the contiguous segments after the full end.
        after: OplogPosition,
        window: RecoverableWindow,
    },
}

/// How far a full's chain of segments goes.
struct Chain<'a> {
    /// The segments holding changes after the full's start, in the order absorbed.
    segments: Vec<&'a SegmentName>,
    /// The lineage the chain is in now: the full's, or the last crossed handoff's `to`.
    lineage: Lineage,
    /// Every change of `lineage` at or before this is in the full or in `segments`.
    reached: OplogPosition,
    /// Every change with a time at or before this is at or before `reached` (0: nothing
    /// known).
    covered_ms: u64,
    /// The handoffs crossed, in order.
    crossed: Vec<Handoff>,
}

impl Chain<'_> {
    /// The full is consistent once the replay passed its end; a crossed handoff means every
    /// change of the full's lineage was replayed.
    fn consistent(&self, full: &FullManifest) -> bool {
        !self.crossed.is_empty() || self.reached >= full.end
    }
}

/// Segments of one lineage, sorted by `after` (the chain walks them in that order).
type ByLineage<'a> = BTreeMap<&'a Lineage, Vec<&'a SegmentName>>;

fn by_lineage(segments: &[SegmentName]) -> ByLineage<'_> {
    let mut map: ByLineage<'_> = BTreeMap::new();
    for s in segments {
        map.entry(&s.lineage).or_default().push(s);
    }
    for list in map.values_mut() {
        list.sort_by_key(|s| (s.after, s.through, s.max_ts));
    }
    map
}

/// What a chain walks: the segments by lineage and the handoffs between lineages.
struct Archive<'a> {
    lineages: ByLineage<'a>,
    handoffs: &'a [Handoff],
}

impl<'a> Archive<'a> {
    fn new(segments: &'a [SegmentName], handoffs: &'a [Handoff]) -> Archive<'a> {
        Archive { lineages: by_lineage(segments), handoffs }
    }

    fn of(&self, lineage: &Lineage) -> &[&'a SegmentName] {
        self.lineages.get(lineage).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The move out of `lineage` that a stay beginning at `from` ended with: the handoff
    /// from it with the lowest `from_position` at or after `from` (a database can leave a
    /// replica set, come back and leave again: each stay ends with its own).
    fn exit(&self, lineage: &Lineage, from: OplogPosition) -> Option<&'a Handoff> {
        self.handoffs
            .iter()
            .filter(|h| &h.from == lineage && h.from_position >= from)
            .min_by_key(|h| (h.from_position, h.to_position))
    }
}

/// Walks `full`'s chain: segments are absorbed in `after` order while each starts at or
/// before what is reached; with `until_ms`, it stops at the first segment after which the
/// full is consistent and `until_ms` is covered. Segments ending at or before the start of
/// the walk in their lineage hold nothing to replay but their covered time counts; they are
/// not listed, nor are record-only ones ([`SegmentName::record_only`]: no change, no
/// object).
///
/// A lineage the database left by a handoff is walked up to the handoff's `from_position`:
/// the time a segment reaching it covers is not counted (it was read after the fence, and
/// the database's changes since are on the new lineage), and once it is reached the walk
/// goes on in the new lineage from `to_position`, where its covered times count again.
fn chain<'a>(full: &FullManifest, archive: &Archive<'a>, until_ms: Option<u64>) -> Chain<'a> {
    let mut c = Chain {
        segments: Vec::new(),
        lineage: full.lineage.clone(),
        reached: full.start,
        covered_ms: 0,
        crossed: Vec::new(),
    };
    let done = |c: &Chain<'_>| until_ms.is_some_and(|t| c.consistent(full) && c.covered_ms >= t);
    let mut leg_start = full.start;
    loop {
        let exit = archive.exit(&c.lineage, leg_start);
        for s in archive.of(&c.lineage) {
            if done(&c) || s.after > c.reached || exit.is_some_and(|h| c.reached >= h.from_position) {
                break;
            }
            if s.through > leg_start && !s.is_record_only() {
                c.segments.push(s);
            }
            c.reached = c.reached.max(s.through);
            if exit.is_none_or(|h| s.through < h.from_position) {
                c.covered_ms = c.covered_ms.max(s.max_ts);
            }
        }
        match exit {
            Some(h) if !done(&c) && c.reached >= h.from_position => {
                c.crossed.push(h.clone());
                c.lineage = h.to.clone();
                c.reached = h.to_position;
                leg_start = h.to_position;
            }
            _ => return c,
        }
    }
}

/// The times `full` restores to: from its end to what its chain covers.
fn range_of(full: &FullManifest, archive: &Archive<'_>) -> Option<TimeRange> {
    let c = chain(full, archive, None);
    (c.consistent(full) && c.covered_ms >= full.end_ms)
        .then_some(TimeRange { from_ms: full.end_ms, to_ms: c.covered_ms })
}

fn window_of(fulls: &[FullManifest], archive: &Archive<'_>) -> RecoverableWindow {
    let mut ranges: Vec<TimeRange> = fulls.iter().filter_map(|f| range_of(f, archive)).collect();
    ranges.sort_by_key(|r| (r.from_ms, r.to_ms));
    let mut merged: Vec<TimeRange> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            // Adjacent milliseconds join: every time between is restorable.
            Some(last) if r.from_ms <= last.to_ms.saturating_add(1) => last.to_ms = last.to_ms.max(r.to_ms),
            _ => merged.push(r),
        }
    }
    RecoverableWindow { ranges: merged }
}

/// Every time the complete fulls and the archived segments can restore to.
pub fn recoverable_window(fulls: &[FullManifest], segments: &[SegmentName]) -> RecoverableWindow {
    recoverable_window_across(fulls, segments, &[])
}

/// [`recoverable_window`] with the handoffs of the database's moves: a full's chain goes on
/// across them.
pub fn recoverable_window_across(
    fulls: &[FullManifest],
    segments: &[SegmentName],
    handoffs: &[Handoff],
) -> RecoverableWindow {
    window_of(fulls, &Archive::new(segments, handoffs))
}

/// What a restore to `to` reads: the newest full ending at or before the time whose chain
/// of segments covers it (an older full when a newer one's chain is broken), and the
/// segments from the full's start through the time. `fulls` are complete fulls (manifests).
pub fn plan_restore(
    fulls: &[FullManifest],
    segments: &[SegmentName],
    to: RestoreTarget,
) -> Result<RestorePlan, RestoreError> {
    plan_restore_across(fulls, segments, &[], to)
}

/// [`plan_restore`] with the handoffs of the database's moves (`BackupStore::list_handoffs`):
/// a full of one lineage restores to times after the move through the new lineage's
/// segments ([`RestorePlan::handoffs`]).
pub fn plan_restore_across(
    fulls: &[FullManifest],
    segments: &[SegmentName],
    handoffs: &[Handoff],
    to: RestoreTarget,
) -> Result<RestorePlan, RestoreError> {
    if fulls.is_empty() {
        return Err(RestoreError::NoFull);
    }
    let lineages = Archive::new(segments, handoffs);
    let window = window_of(fulls, &lineages);
    let t = match to {
        RestoreTarget::Time(t) => t,
        RestoreTarget::Latest => match window.latest_ms() {
            Some(t) => t,
            None => {
                // No full has a chain reaching its end: the newest full's gap says why.
                let newest = fulls.iter().max_by_key(|f| (f.end_ms, &f.id)).ok_or(RestoreError::NoFull)?;
                return Err(gap_error(newest, &lineages, newest.end_ms, window));
            }
        },
    };
    let mut candidates: Vec<&FullManifest> = fulls.iter().filter(|f| f.end_ms <= t).collect();
    candidates.sort_by(|a, b| (b.end_ms, &b.id).cmp(&(a.end_ms, &a.id)));
    for full in &candidates {
        let c = chain(full, &lineages, Some(t));
        if c.consistent(full) && c.covered_ms >= t {
            return Ok(RestorePlan {
                full: (*full).clone(),
                segments: c.segments.into_iter().cloned().collect(),
                to_ms: t,
                until: None,
                handoffs: c.crossed,
            });
        }
    }
    let inside = window.earliest_ms().is_some_and(|e| e <= t) && window.latest_ms().is_some_and(|l| t <= l);
    match candidates.first() {
        Some(newest) if inside => Err(gap_error(newest, &lineages, t, window)),
        _ => Err(RestoreError::OutsideWindow { requested_ms: t, window }),
    }
}

/// What restores `full` to exactly its consistent point, its `end` (the state the
/// manifest's checksum is of): its pages and the segments of its chain up to the first one
/// reaching `end`, replayed through `end` and no further. Later segments are not read. Used
/// by the background verification (`super::verify`); a gap before `end` is refused as
/// [`plan_restore`] refuses one (`requested_ms` is the full's `end_ms`).
pub fn plan_to_full_end(full: &FullManifest, segments: &[SegmentName]) -> Result<RestorePlan, RestoreError> {
    let lineages = Archive::new(segments, &[]);
    // Any covered time will do (0): the walk stops at the first segment reaching the end.
    let c = chain(full, &lineages, Some(0));
    if c.reached < full.end {
        let window = window_of(std::slice::from_ref(full), &lineages);
        return Err(gap_error(full, &lineages, full.end_ms, window));
    }
    Ok(RestorePlan {
        full: full.clone(),
        segments: c.segments.into_iter().cloned().collect(),
        to_ms: full.end_ms,
        until: Some(full.end),
        handoffs: Vec::new(),
    })
}

fn gap_error(full: &FullManifest, archive: &Archive<'_>, t: u64, window: RecoverableWindow) -> RestoreError {
    let c = chain(full, archive, None);
    RestoreError::Gap { requested_ms: t, full: full.id.clone(), lineage: c.lineage, after: c.reached, window }
}

/// How long backups are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Every time this far back from now stays restorable (7 days by default).
    pub window_ms: u64,
    /// A full without a manifest this long after it started is abandoned (its writer died)
    /// and deleted. Longer than the longest full backup takes.
    pub incomplete_grace_ms: u64,
}

impl Default for RetentionPolicy {
    fn default() -> RetentionPolicy {
        RetentionPolicy { window_ms: 7 * 24 * 3_600_000, incomplete_grace_ms: 24 * 3_600_000 }
    }
}

/// What retention deletes ([`super::BackupStore::apply`] carries it out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deletions {
    pub fulls: Vec<FullId>,
    pub segments: Vec<SegmentName>,
}

/// What to delete at `now_ms` so that every time from `now_ms - window` on stays restorable
/// as it is now, and nothing older is kept for nothing.
///
/// Kept: every full ending inside the window; of the fulls ending at or before the window's
/// start, the newest one (whatever its chain) and each one a restore to some time in the
/// window could pick (its chain covers a time no newer such full's covers); every segment of
/// a kept full's lineage after the oldest kept start, and every segment covering a time in
/// the window. Incomplete fulls are deleted once their grace period is over, damaged ones
/// once they started before the window.
pub fn retention(listing: &FullListing, segments: &[SegmentName], now_ms: u64, policy: &RetentionPolicy) -> Deletions {
    retention_across(listing, segments, &[], now_ms, policy)
}

/// [`retention`] with the handoffs of the database's moves: a kept full's chain keeps the
/// segments of every lineage it crosses into, from the handoff's `to_position` on. The
/// handoffs themselves are kept (one small object per move) until the incarnation is swept.
pub fn retention_across(
    listing: &FullListing,
    segments: &[SegmentName],
    handoffs: &[Handoff],
    now_ms: u64,
    policy: &RetentionPolicy,
) -> Deletions {
    let window_start = now_ms.saturating_sub(policy.window_ms);
    let lineages = Archive::new(segments, handoffs);

    let mut old: Vec<&FullManifest> = listing.complete.iter().filter(|f| f.end_ms <= window_start).collect();
    old.sort_by(|a, b| (b.end_ms, &b.id).cmp(&(a.end_ms, &a.id)));
    let mut kept: BTreeSet<&FullId> =
        listing.complete.iter().filter(|f| f.end_ms > window_start).map(|f| &f.id).collect();
    // Newest first: a restore to T >= window start picks the newest old full covering T,
    // so an older one is needed only where it covers past every newer one.
    let mut newer_reach: Option<u64> = None;
    for (i, full) in old.iter().enumerate() {
        let reach = range_of(full, &lineages).map(|r| r.to_ms);
        let covers_more = reach.is_some_and(|r| r >= window_start && newer_reach.is_none_or(|n| r > n));
        if i == 0 || covers_more {
            kept.insert(&full.id);
        }
        newer_reach = newer_reach.max(reach);
    }

    let mut deletions = Deletions::default();
    for full in &listing.complete {
        if !kept.contains(&full.id) {
            deletions.fulls.push(full.id.clone());
        }
    }
    for id in &listing.incomplete {
        if id.started_ms().saturating_add(policy.incomplete_grace_ms) < now_ms {
            deletions.fulls.push(id.clone());
        }
    }
    // Damaged fulls restore nothing; kept for a person to look at until they would have
    // aged out of the window anyway.
    for (id, _) in &listing.damaged {
        if id.started_ms() < window_start {
            deletions.fulls.push(id.clone());
        }
    }

    // The oldest start of a kept full's chain, per lineage (the full's own start, or where
    // its chain crossed into the lineage): the segments after it are replayed.
    let mut oldest_start: BTreeMap<Lineage, OplogPosition> = BTreeMap::new();
    let mut keep_from = |lineage: &Lineage, from: OplogPosition| {
        let start = oldest_start.entry(lineage.clone()).or_insert(from);
        *start = (*start).min(from);
    };
    for full in listing.complete.iter().filter(|f| kept.contains(&f.id)) {
        keep_from(&full.lineage, full.start);
        for h in chain(full, &lineages, None).crossed {
            keep_from(&h.to, h.to_position);
        }
    }
    for s in segments {
        let needed_by_a_full = oldest_start.get(&s.lineage).is_some_and(|start| s.through > *start);
        if s.max_ts < window_start && !needed_by_a_full {
            deletions.segments.push(s.clone());
        }
    }
    deletions
}

/// When to take full backups: adaptive, so that a restore replays little whatever the
/// write rate, and an idle database is not copied again and again.
#[derive(Debug, Clone, PartialEq)]
pub struct FullPolicy {
    /// A full at least this often, however little was written (24 h: a restore never reads
    /// more than a day of oplog, and a damaged full costs at most a day).
    pub max_interval_ms: u64,
    /// Never more often than this, however much is written (a full reads the whole
    /// database: bounded cost on the tenant).
    pub min_interval_ms: u64,
    /// A full once the oplog written since the last one exceeds this fraction of the
    /// database's size: a restore then replays at most that much more than it loads.
    pub oplog_fraction: f64,
    /// ...but not before this many oplog bytes (a small database's fulls are cheap, but
    /// one every `min_interval` for a few KiB of changes is pointless).
    pub min_oplog_bytes: u64,
}

impl Default for FullPolicy {
    fn default() -> FullPolicy {
        FullPolicy {
            max_interval_ms: 24 * 3_600_000,
            min_interval_ms: 10 * 60_000,
            oplog_fraction: 0.5,
            min_oplog_bytes: 64 << 20,
        }
    }
}

/// Whether a full backup is due now. `last_full_end_ms` is the end of the newest complete
/// full of the database's current lineage (`None`: there is none, as after a move to
/// another replica set, and one is due at once; an aborted migration keeps the lineage); `oplog_bytes_since` the bytes of the
/// database's oplog changes archived since that full's start; `db_bytes` the database's
/// size.
pub fn full_due(
    last_full_end_ms: Option<u64>,
    oplog_bytes_since: u64,
    db_bytes: u64,
    now_ms: u64,
    policy: &FullPolicy,
) -> bool {
    let Some(last) = last_full_end_ms else {
        return true;
    };
    let elapsed = now_ms.saturating_sub(last);
    if elapsed >= policy.max_interval_ms {
        return true;
    }
    if elapsed < policy.min_interval_ms {
        return false;
    }
    // f64 for the fraction: exact for sizes below 2^53 bytes, and a rounding error of a
    // byte changes nothing here.
    let threshold = (db_bytes as f64 * policy.oplog_fraction).max(policy.min_oplog_bytes as f64);
    oplog_bytes_since as f64 >= threshold
}

/// The lineages whose fulls' chains go on into `lineage`: itself and every lineage the
/// database left for it, directly or through others, by a handoff. What the agent counts
/// the newest full of for [`full_due`]: after a move with a handoff, the full taken before
/// it still restores the times after it, so no full is due on arrival.
pub fn lineages_into(lineage: &Lineage, handoffs: &[Handoff]) -> BTreeSet<Lineage> {
    let mut found = BTreeSet::from([lineage.clone()]);
    loop {
        let more: Vec<Lineage> = handoffs
            .iter()
            .filter(|h| found.contains(&h.to) && !found.contains(&h.from))
            .map(|h| h.from.clone())
            .collect();
        if more.is_empty() {
            return found;
        }
        found.extend(more);
    }
}
