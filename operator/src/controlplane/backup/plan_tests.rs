//! Backup's decisions as data: restore plans, the recoverable window, retention and the
//! adaptive full schedule; then properties over random archives (gaps, overlaps, idle
//! segments, a database that moved to another lineage).

use nimbus_api::migration::OplogPosition;
use proptest::prelude::*;

use super::format::Handoff;
use super::plan::{lineages_into, plan_restore_across, recoverable_window_across, retention_across};
use super::*;
use std::collections::BTreeMap;

const HOUR: u64 = 3_600_000;

fn lin(name: &str) -> Lineage {
    Lineage::new(name).unwrap()
}

fn full(n: u32, lineage: &str, start: u64, end: u64, start_ms: u64, end_ms: u64) -> FullManifest {
    FullManifest {
        format: FORMAT_VERSION,
        id: FullId::new(start_ms, n),
        db: "shop".to_string(),
        lineage: lin(lineage),
        start: OplogPosition::end_of(start),
        end: OplogPosition::end_of(end),
        start_ms,
        end_ms,
        docs: 1,
        bytes: 1,
        pages: vec![PageEntry { n: 0, bytes: 1, sha256: "0".repeat(64), docs: 1, index: start }],
        checksum: None,
    }
}

fn seg(lineage: &str, after: u64, through: u64, min_ts: u64, max_ts: u64) -> SegmentName {
    SegmentName {
        lineage: lin(lineage),
        after: OplogPosition::end_of(after),
        through: OplogPosition::end_of(through),
        min_ts,
        max_ts,
        sha256: "0".repeat(64),
    }
}

fn spans(plan: &RestorePlan) -> Vec<(u64, u64)> {
    plan.segments.iter().map(|s| (s.after.index, s.through.index)).collect()
}

/// Full A (replay after 10, consistent at 12, time 112) and B (30, 35, 135); three
/// segments covering positions (0, 60] and times through 160.
fn archive() -> (Vec<FullManifest>, Vec<SegmentName>) {
    let fulls = vec![full(1, "l", 10, 12, 110, 112), full(2, "l", 30, 35, 130, 135)];
    let segments = vec![seg("l", 0, 20, 100, 120), seg("l", 20, 40, 121, 140), seg("l", 40, 60, 141, 160)];
    (fulls, segments)
}

#[test]
fn restore_uses_the_newest_full_ending_at_or_before_the_time_and_the_segments_through_it() {
    let (fulls, segments) = archive();
    let at = |t| plan_restore(&fulls, &segments, RestoreTarget::Time(t)).unwrap();
    let p = at(150);
    assert_eq!((p.full.id.clone(), spans(&p), p.to_ms), (fulls[1].id.clone(), vec![(20, 40), (40, 60)], 150));
    // The segment ending before B's start holds nothing B needs, and the time is covered by
    // the second segment: the third is not read.
    assert_eq!(spans(&at(140)), vec![(20, 40)]);
    // Before B's end, A.
    let p = at(130);
    assert_eq!((p.full.id.clone(), spans(&p)), (fulls[0].id.clone(), vec![(0, 20), (20, 40)]));
    assert_eq!(spans(&at(112)), vec![(0, 20)]);
    let latest = plan_restore(&fulls, &segments, RestoreTarget::Latest).unwrap();
    assert_eq!((latest.full.id, latest.to_ms), (fulls[1].id.clone(), 160));
}

#[test]
fn restore_outside_the_window_is_refused_saying_the_window() {
    let (fulls, segments) = archive();
    let window = recoverable_window(&fulls, &segments);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 112, to_ms: 160 }]);
    for t in [111, 161, 0] {
        let err = plan_restore(&fulls, &segments, RestoreTarget::Time(t)).unwrap_err();
        assert_eq!(err, RestoreError::OutsideWindow { requested_ms: t, window: window.clone() });
    }
    let message = plan_restore(&fulls, &segments, RestoreTarget::Time(161)).unwrap_err().to_string();
    assert_eq!(
        message,
        "failed to plan the restore to 1970-01-01T00:00:00.161Z: outside the recoverable window \
         (1970-01-01T00:00:00.112Z to 1970-01-01T00:00:00.16Z)"
    );
}

#[test]
fn restore_across_a_gap_in_the_segments_is_refused_naming_where_it_is() {
    let fulls = vec![full(1, "l", 10, 12, 110, 112), full(2, "l", 30, 35, 130, 135)];
    // Positions (20, 25] were never archived.
    let segments = vec![seg("l", 0, 20, 100, 120), seg("l", 25, 40, 126, 140), seg("l", 40, 60, 141, 160)];
    let window = recoverable_window(&fulls, &segments);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 112, to_ms: 120 }, TimeRange { from_ms: 135, to_ms: 160 }]);
    assert!(plan_restore(&fulls, &segments, RestoreTarget::Time(120)).is_ok());
    assert!(plan_restore(&fulls, &segments, RestoreTarget::Time(135)).is_ok());
    let err = plan_restore(&fulls, &segments, RestoreTarget::Time(125)).unwrap_err();
    let RestoreError::Gap { full, after, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!((full, after.index), (&fulls[0].id, 20));
    assert!(err.to_string().contains("has a gap after index 20"), "{err}");
}

#[test]
fn restore_without_a_full_or_with_only_another_lineages_segments_is_refused() {
    let (_, segments) = archive();
    assert_eq!(plan_restore(&[], &segments, RestoreTarget::Latest), Err(RestoreError::NoFull));
    // The database moved: the new lineage's full has no segment yet.
    let fulls = vec![full(1, "moved", 10, 12, 110, 112)];
    assert!(recoverable_window(&fulls, &segments).ranges.is_empty());
    assert!(matches!(plan_restore(&fulls, &segments, RestoreTarget::Latest), Err(RestoreError::Gap { .. })));
    assert!(matches!(
        plan_restore(&fulls, &segments, RestoreTarget::Time(150)),
        Err(RestoreError::OutsideWindow { .. })
    ));
}

/// Backups written before lineages were named by the replica set's Raft log
/// (`{replica_set}.e{epoch}`) plan as they did: a plan reads no meaning into a lineage's
/// name. After the upgrade the archiver starts the new lineage (`{replica_set}.r{n}`) with a
/// new full; the times between the old archive's end and that full's end are not
/// restorable (one hole, once), every other time is.
#[test]
fn restore_of_backups_under_the_former_epoch_lineage_names_plans_as_before_the_upgrade() {
    let fulls = vec![full(1, "rs-a.e3", 10, 12, 110, 112), full(2, "rs-a.r7", 70, 72, 170, 172)];
    let segments =
        vec![seg("rs-a.e3", 0, 40, 100, 140), seg("rs-a.e3", 40, 60, 141, 160), seg("rs-a.r7", 60, 90, 161, 190)];
    let at = |t| plan_restore(&fulls, &segments, RestoreTarget::Time(t));
    let old = at(150).unwrap();
    assert_eq!((old.full.lineage.as_str(), spans(&old)), ("rs-a.e3", vec![(0, 40), (40, 60)]));
    let new = at(180).unwrap();
    assert_eq!((new.full.lineage.as_str(), spans(&new)), ("rs-a.r7", vec![(60, 90)]));
    assert!(matches!(at(165), Err(RestoreError::Gap { .. })), "{:?}", at(165));
    let window = recoverable_window(&fulls, &segments);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 112, to_ms: 160 }, TimeRange { from_ms: 172, to_ms: 190 }]);
}

#[test]
fn restore_falls_back_to_an_older_full_when_the_newer_ones_chain_is_broken() {
    // Lineage "a" ran until 200 with its archive intact; the database moved to "b" at 150,
    // whose full ended at 160 but whose archive lost (5, 8].
    let fulls = vec![full(1, "a", 10, 12, 110, 112), full(2, "b", 3, 4, 155, 160)];
    let segments = vec![seg("a", 0, 50, 100, 200), seg("b", 0, 5, 150, 170), seg("b", 8, 9, 180, 190)];
    let p = plan_restore(&fulls, &segments, RestoreTarget::Time(180)).unwrap();
    assert_eq!(p.full.id, fulls[0].id);
    assert_eq!(spans(&p), vec![(0, 50)]);
}

#[test]
fn restore_of_an_idle_database_needs_only_the_time_an_idle_segment_covers() {
    // One page (start = end) and no change since: an empty segment moved the covered time.
    let fulls = vec![full(1, "l", 10, 10, 110, 110)];
    let segments = vec![seg("l", 10, 10, 500, 500)];
    let p = plan_restore(&fulls, &segments, RestoreTarget::Time(400)).unwrap();
    assert!(p.segments.is_empty());
    assert_eq!(recoverable_window(&fulls, &segments).latest_ms(), Some(500));
    assert!(plan_restore(&fulls, &segments, RestoreTarget::Time(501)).is_err());
}

#[test]
fn retention_keeps_the_newest_full_before_the_window_and_the_segments_after_its_start() {
    // A full a day (each 1 h long), segments every hour, for ten days; a seven-day window.
    let day = 24 * HOUR;
    let fulls: Vec<FullManifest> =
        (0..10u64).map(|d| full(d as u32, "l", d * 24, d * 24 + 1, d * day, d * day + HOUR)).collect();
    let segments: Vec<SegmentName> = (0..240u64).map(|h| seg("l", h, h + 1, h * HOUR, (h + 1) * HOUR)).collect();
    let listing = FullListing {
        complete: fulls.clone(),
        incomplete: vec![FullId::new(8 * day, 99), FullId::new(9 * day + 23 * HOUR, 98)],
        damaged: vec![(FullId::new(day, 97), "bad".to_string()), (FullId::new(9 * day, 96), "bad".to_string())],
    };
    let now = 10 * day;
    let d = retention(&listing, &segments, now, &RetentionPolicy::default());
    // Window start: day 3. The full ending at day 2 + 1 h is the newest before it.
    let deleted: Vec<FullId> =
        fulls[..2].iter().map(|f| f.id.clone()).chain([FullId::new(8 * day, 99), FullId::new(day, 97)]).collect();
    assert_eq!(d.fulls, deleted);
    // Segments wholly before that full's start (48) are deleted, the rest kept.
    assert_eq!(d.segments, segments[..48].to_vec());
    let kept_fulls: Vec<FullManifest> = fulls[2..].to_vec();
    let kept_segments = segments[48..].to_vec();
    let window = recoverable_window(&kept_fulls, &kept_segments);
    assert_eq!(window.earliest_ms(), Some(2 * day + HOUR));
    assert!(plan_restore(&kept_fulls, &kept_segments, RestoreTarget::Time(now - 7 * day)).is_ok());
}

#[test]
fn retention_never_deletes_the_only_full_even_when_its_archive_is_broken() {
    let fulls = vec![full(1, "l", 10, 12, 110, 112)];
    let segments = vec![seg("l", 50, 60, 150, 160)];
    let listing = FullListing { complete: fulls, incomplete: vec![], damaged: vec![] };
    let d = retention(&listing, &segments, 100 * HOUR, &RetentionPolicy::default());
    assert!(d.fulls.is_empty());
    assert!(d.segments.is_empty(), "segments after the kept full's start are kept: {d:?}");
}

#[test]
fn full_backups_are_due_more_often_when_more_is_written() {
    let policy = FullPolicy::default();
    let gib = 1u64 << 30;
    let t0 = 1_000 * HOUR;
    // No full of this lineage yet: due at once.
    assert!(full_due(None, 0, gib, t0, &policy));
    // Quiet: only after the max interval.
    assert!(!full_due(Some(t0), 0, gib, t0 + 23 * HOUR, &policy));
    assert!(full_due(Some(t0), 0, gib, t0 + 24 * HOUR, &policy));
    // Busy: once the oplog since the last full reaches half the database...
    assert!(!full_due(Some(t0), gib / 2 - 1, gib, t0 + HOUR, &policy));
    assert!(full_due(Some(t0), gib / 2, gib, t0 + HOUR, &policy));
    // ...but never within the minimum interval...
    assert!(!full_due(Some(t0), 10 * gib, gib, t0 + 60_000, &policy));
    // ...and a small database needs at least the minimum oplog.
    assert!(!full_due(Some(t0), 1 << 20, 1 << 20, t0 + HOUR, &policy));
    assert!(full_due(Some(t0), 64 << 20, 1 << 20, t0 + HOUR, &policy));
}

// Properties over random archives.
//
// Model: lineage `k` has Raft indexes 1..=n; index `i` was written at `base_k + 10 i` ms. Its
// archive is cut at boundaries `b_0 < ... < b_m`; segment `j` holds `(b_j, b_{j+1}]` and
// covers up to `time(b_{j+1}) + slack` (slack < 10: before the next write). Some segments
// are lost (gaps), some repeated as a larger overlapping one. Fulls start and end at random
// indexes of the archived range.

#[derive(Debug, Clone)]
struct LineageModel {
    name: String,
    base: u64,
    segments: Vec<SegmentName>,
    fulls: Vec<FullManifest>,
}

impl LineageModel {
    fn time(&self, index: u64) -> u64 {
        self.base + 10 * index
    }
}

fn lineage_model(k: usize, base: u64) -> impl Strategy<Value = LineageModel> {
    let cuts = proptest::collection::btree_set(0u64..200, 2..30);
    let extras = proptest::collection::vec((any::<bool>(), any::<bool>(), 0u64..10), 30);
    let fulls = proptest::collection::vec((0u64..200, 0u64..20), 0..6);
    (cuts, extras, fulls).prop_map(move |(cuts, extras, fulls)| {
        let name = format!("l{k}");
        let cuts: Vec<u64> = cuts.into_iter().collect();
        let mut m = LineageModel { name: name.clone(), base, segments: Vec::new(), fulls: Vec::new() };
        for (j, w) in cuts.windows(2).enumerate() {
            let (lost, overlap, slack) = extras[j % extras.len()];
            let (after, through) = (w[0], w[1]);
            let time = |i: u64| base + 10 * i;
            if !(lost && j % 4 == 1) {
                m.segments.push(seg(&name, after, through, time(after + 1), time(through) + slack));
            }
            if overlap && j + 2 < cuts.len() {
                let further = cuts[j + 2];
                m.segments.push(seg(&name, after, further, time(after + 1), time(further) + slack));
            }
        }
        let (lo, hi) = (cuts[0], cuts[cuts.len() - 1]);
        for (n, (start, len)) in fulls.into_iter().enumerate() {
            let start = lo + start % (hi - lo + 1);
            let end = (start + len).min(hi);
            let f = full(n as u32 + 100 * k as u32, &name, start, end, m.time(start), m.time(end));
            m.fulls.push(f);
        }
        m
    })
}

/// One or two lineages (the second after a move, later in time).
fn archive_model() -> impl Strategy<Value = Vec<LineageModel>> {
    (lineage_model(0, 0), lineage_model(1, 2_100), any::<bool>())
        .prop_map(|(a, b, moved)| if moved { vec![a, b] } else { vec![a] })
}

fn flatten(models: &[LineageModel]) -> (Vec<FullManifest>, Vec<SegmentName>) {
    let fulls = models.iter().flat_map(|m| m.fulls.clone()).collect();
    let segments = models.iter().flat_map(|m| m.segments.clone()).collect();
    (fulls, segments)
}

/// Every index of `(from, through]` is inside one of the spans.
fn covers(spans: &[(u64, u64)], from: u64, through: u64) -> bool {
    (from + 1..=through).all(|i| spans.iter().any(|&(a, b)| a < i && i <= b))
}

/// The plan, checked against the model: it replays exactly what the state at `t` needs.
fn check_plan(models: &[LineageModel], plan: &RestorePlan, t: u64) -> Result<(), TestCaseError> {
    let m =
        models.iter().find(|m| m.name == plan.full.lineage.as_str()).ok_or_else(|| TestCaseError::fail("lineage"))?;
    prop_assert!(plan.full.end_ms <= t, "a full is restorable only from its end on");
    prop_assert!(plan.segments.iter().all(|s| s.lineage == plan.full.lineage));
    let start = plan.full.start.index;
    // The last index written at or before `t` (the model's lineage may have ended before).
    let at_t = (t.saturating_sub(m.base) / 10).min(200);
    let needed = at_t.max(plan.full.end.index);
    let spans = spans(plan);
    prop_assert!(covers(&spans, start, needed), "plan {spans:?} misses changes in ({start}, {needed}]");
    // Contiguous from the start: each segment begins where the ones before reached.
    let mut reached = start;
    for &(a, b) in &spans {
        prop_assert!(a <= reached, "segment ({a}, {b}] after a hole at {reached}");
        reached = reached.max(b);
    }
    // Nothing read past what is needed: without the last segment, not enough.
    if let Some((_, rest)) = spans.split_last() {
        let short = rest.iter().map(|&(_, b)| b).max().unwrap_or(start).max(start);
        let (_, rest_segments) = plan.segments.split_last().ok_or_else(|| TestCaseError::fail("no last"))?;
        let rest_covered = rest_segments.iter().map(|s| s.max_ts).max().unwrap_or(0);
        prop_assert!(short < needed || rest_covered < t, "the last segment was not needed");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn restore_plans_replay_exactly_from_the_full_to_the_time(models in archive_model(), ts in proptest::collection::vec(0u64..4_200, 20)) {
        let (fulls, segments) = flatten(&models);
        let window = recoverable_window(&fulls, &segments);
        for t in ts.into_iter().chain(window.ranges.iter().flat_map(|r| [r.from_ms, r.to_ms, r.to_ms + 1])) {
            match plan_restore(&fulls, &segments, RestoreTarget::Time(t)) {
                Ok(plan) => {
                    prop_assert!(window.contains(t), "planned {t} outside {window:?}");
                    check_plan(&models, &plan, t)?;
                }
                Err(e) => prop_assert!(!window.contains(t), "{t} in {window:?} refused: {e}"),
            }
        }
        if let Ok(plan) = plan_restore(&fulls, &segments, RestoreTarget::Latest) {
            prop_assert_eq!(Some(plan.to_ms), window.latest_ms());
            check_plan(&models, &plan, plan.to_ms)?;
        }
    }

    #[test]
    fn retention_never_deletes_what_a_restore_in_the_window_needs(
        models in archive_model(),
        now in 0u64..4_200,
        window_ms in 0u64..3_000,
        ts in proptest::collection::vec(0u64..4_200, 20),
    ) {
        let (fulls, segments) = flatten(&models);
        let listing = FullListing { complete: fulls.clone(), incomplete: vec![], damaged: vec![] };
        let policy = RetentionPolicy { window_ms, incomplete_grace_ms: 0 };
        let d = retention(&listing, &segments, now, &policy);
        let kept_fulls: Vec<FullManifest> = fulls.iter().filter(|f| !d.fulls.contains(&f.id)).cloned().collect();
        let kept_segments: Vec<SegmentName> = segments.iter().filter(|s| !d.segments.contains(s)).cloned().collect();
        prop_assert!(fulls.is_empty() || !kept_fulls.is_empty(), "every full deleted");
        let window_start = now.saturating_sub(window_ms);
        let before = recoverable_window(&fulls, &segments);
        let times = ts.into_iter().map(|t| window_start + t % (window_ms + 1))
            .chain([window_start, now])
            .chain(before.ranges.iter().flat_map(|r| [r.from_ms, r.to_ms]))
            .filter(|t| *t >= window_start);
        for t in times {
            let a = plan_restore(&fulls, &segments, RestoreTarget::Time(t));
            let b = plan_restore(&kept_fulls, &kept_segments, RestoreTarget::Time(t));
            match (a, b) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "at {}: before {:?}, after {:?}", t, a.map(|p| p.full.id), b.map(|p| p.full.id)),
            }
        }
        if before.latest_ms().is_some_and(|l| l >= window_start) {
            let after = recoverable_window(&kept_fulls, &kept_segments);
            prop_assert_eq!(before.latest_ms(), after.latest_ms());
        }
    }
}

/// A database that moved from lineage `a` to `b`: writes at `a` 11..=20 (time
/// `1000 + 10 i`), fenced at 25; the handoff joins `a` at 25 to `b` at 100 (the target's
/// marker), where writes go on at 101..=110 (time `2000 + 10 (i - 100)`). Each write sets
/// key `i % 4` to `i`. One full of `a` (start 10, end 12); `a`'s last segment was read
/// after the switch (its time, 3000, is `a`'s clock, not the database's); no full of `b`.
struct Moved {
    fulls: Vec<FullManifest>,
    segments: Vec<SegmentName>,
    handoff: Handoff,
    /// (lineage, index, time): every change of the database, in the order it happened.
    changes: Vec<(&'static str, u64, u64)>,
}

fn moved() -> Moved {
    let mut changes: Vec<(&'static str, u64, u64)> = (11..=20).map(|i| ("a", i, 1_000 + 10 * i)).collect();
    changes.extend((101..=110).map(|i| ("b", i, 2_000 + 10 * (i - 100))));
    Moved {
        fulls: vec![full(1, "a", 10, 12, 1_090, 1_120)],
        segments: vec![
            seg("a", 0, 15, 1_110, 1_155),
            seg("a", 15, 25, 1_160, 3_000),
            seg("b", 100, 105, 2_010, 2_055),
            seg("b", 105, 110, 2_060, 2_105),
        ],
        handoff: Handoff {
            from: lin("a"),
            from_position: OplogPosition::end_of(25),
            to: lin("b"),
            to_position: OplogPosition::end_of(100),
        },
        changes,
    }
}

impl Moved {
    /// The database at `t`: every change stamped at or before it.
    fn state_at(&self, t: u64) -> BTreeMap<u64, u64> {
        let mut state = BTreeMap::new();
        for &(_, i, ts) in &self.changes {
            if ts <= t {
                state.insert(i % 4, i);
            }
        }
        state
    }

    /// What a restore following `plan` builds, as `restore.rs` replays: the full's state at
    /// its start (the test's full holds no document written after it), then the segments'
    /// changes after the full's start, each position once in one order (a change at or
    /// before the last applied is skipped), ending at the first change past the full's end
    /// stamped after the plan's time. At a handoff the order restarts after its
    /// `to_position`, and every change from there on is past the full's end; a lineage's
    /// changes past its handoff's `from_position` are not the database's.
    fn restore(&self, plan: &RestorePlan) -> BTreeMap<u64, u64> {
        let mut state: BTreeMap<u64, u64> = BTreeMap::new();
        let (mut applied, mut lineage, mut crossed) = (plan.full.start, plan.full.lineage.clone(), false);
        let mut handoffs = plan.handoffs.iter();
        let mut exit = handoffs.next();
        'segments: for s in &plan.segments {
            if s.lineage != lineage {
                let h = exit.filter(|h| h.from == lineage && h.to == s.lineage).expect("a handoff between lineages");
                (applied, lineage, crossed) = (h.to_position, h.to.clone(), true);
                exit = handoffs.next();
            }
            for &(l, i, ts) in &self.changes {
                let at = OplogPosition::end_of(i);
                if l != s.lineage.as_str() || at <= s.after || at > s.through || at <= applied {
                    continue;
                }
                if exit.is_some_and(|h| h.from == lineage && at > h.from_position) {
                    continue;
                }
                if (crossed || at > plan.full.end) && ts > plan.to_ms {
                    break 'segments;
                }
                applied = at;
                state.insert(i % 4, i);
            }
        }
        state
    }
}

#[test]
fn a_plan_across_a_handoff_restores_the_state_before_the_move_between_the_switch_and_a_full_and_after() {
    let m = moved();
    let handoffs = [m.handoff.clone()];
    let window = recoverable_window_across(&m.fulls, &m.segments, &handoffs);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 1_120, to_ms: 2_105 }], "one window across the move");
    // (a) before the move, (b) after the last write on `a` and before the first on `b` (the
    // hold, the switch; no full of `b` exists), (c) after.
    for t in [1_120, 1_150, 1_175, 1_200, 1_500, 2_000, 2_009, 2_010, 2_055, 2_077, 2_105] {
        let plan = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(t)).unwrap();
        assert_eq!(m.restore(&plan), m.state_at(t), "restore to {t}: {plan:?}");
        let crossed = !plan.handoffs.is_empty();
        assert_eq!(crossed, t > 1_155, "only a time past what `a` covers before its handoff crosses ({t})");
    }
    let plan = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Latest).unwrap();
    assert_eq!(
        (plan.to_ms, plan.handoffs.clone(), spans(&plan)),
        (2_105, vec![m.handoff.clone()], vec![(0, 15), (15, 25), (100, 105), (105, 110)])
    );
    assert_eq!(m.restore(&plan), m.state_at(2_105));
    for t in [1_119, 2_106] {
        let err = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(t)).unwrap_err();
        assert!(matches!(err, RestoreError::OutsideWindow { .. }), "{t}: {err}");
    }
}

#[test]
fn without_its_handoff_the_old_lineage_read_after_the_switch_would_claim_times_it_does_not_hold() {
    // What the handoff corrects: `a`'s last segment covers 3000 by `a`'s clock, yet none of
    // `b`'s changes are in it. Planned without the handoff, a restore to 2077 is wrong.
    let m = moved();
    let plan = plan_restore(&m.fulls, &m.segments, RestoreTarget::Time(2_077)).unwrap();
    assert_ne!(m.restore(&plan), m.state_at(2_077));
    // A stored handoff keeps `a`'s own time to before its handoff.
    let handoffs = [m.handoff.clone()];
    let plan = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(2_077)).unwrap();
    assert_eq!(m.restore(&plan), m.state_at(2_077));
}

#[test]
fn a_handoff_into_a_log_whose_positions_are_below_the_old_ones_is_crossed_all_the_same() {
    // `b`'s log positions below `a`'s (and below the full's): positions of two replica
    // sets' logs are unrelated, and the replay restarts its order at the handoff.
    let mut m = moved();
    m.handoff.to_position = OplogPosition::end_of(5);
    m.changes.retain(|c| c.0 == "a");
    m.changes.extend((6..=10).map(|i| ("b", i, 2_000 + 10 * (i - 5))));
    m.segments[2] = seg("b", 5, 8, 2_010, 2_030);
    m.segments[3] = seg("b", 8, 10, 2_040, 2_050);
    let handoffs = [m.handoff.clone()];
    let window = recoverable_window_across(&m.fulls, &m.segments, &handoffs);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 1_120, to_ms: 2_050 }]);
    for t in [1_150, 1_500, 2_009, 2_010, 2_025, 2_050] {
        let plan = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(t)).unwrap();
        assert_eq!(m.restore(&plan), m.state_at(t), "restore to {t}: {plan:?}");
    }
}

#[test]
fn a_gap_in_the_new_lineage_after_a_handoff_is_named_in_that_lineage() {
    let mut m = moved();
    m.segments.remove(2); // b (100, 105]
    let handoffs = [m.handoff.clone()];
    let window = recoverable_window_across(&m.fulls, &m.segments, &handoffs);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 1_120, to_ms: 1_155 }]);
    // A full of `b` later: a restore to a time in the hole names where `a`'s full's chain
    // stops, in `b`.
    m.fulls.push(full(2, "b", 106, 107, 2_070, 2_075));
    let err = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(2_000)).unwrap_err();
    match err {
        RestoreError::Gap { lineage, after, .. } => {
            assert_eq!((lineage, after), (lin("b"), OplogPosition::end_of(100)))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn retention_keeps_the_segments_of_every_lineage_a_kept_fulls_chain_crosses_into() {
    let m = moved();
    let handoffs = [m.handoff.clone()];
    let listing = FullListing { complete: m.fulls.clone(), ..FullListing::default() };
    let policy = RetentionPolicy { window_ms: 1_000, incomplete_grace_ms: HOUR };
    // The window starts at 2070: `a`'s full (the only one, ending before it) is kept, and
    // with it `a`'s segments from its start and `b`'s from the handoff, though `b`'s first
    // segment ends before the window and `b` has no full.
    let now = 3_070;
    let deletions = retention_across(&listing, &m.segments, &handoffs, now, &policy);
    assert_eq!(deletions, Deletions::default(), "the chain across the move is kept whole");
    for t in [2_070, 2_077, 2_105] {
        let plan = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(t)).unwrap();
        assert_eq!(m.restore(&plan), m.state_at(t));
    }
    // Without the handoff, `b`'s first segment would go (no full of `b` keeps it).
    let blind = retention(&listing, &m.segments, now, &policy);
    assert_eq!(blind.segments, vec![m.segments[2].clone()]);
    // Once a full of `b` ends inside the window and a newer one before it... the old full
    // of `a` stays the newest before the window: still kept with its chain.
    let mut later = m.segments.clone();
    later.push(seg("b", 110, 130, 2_110, 5_000));
    let mut fulls = m.fulls.clone();
    fulls.push(full(2, "b", 120, 125, 4_000, 4_100));
    let listing = FullListing { complete: fulls, ..FullListing::default() };
    let deletions = retention_across(&listing, &later, &handoffs, 4_500, &policy);
    assert!(deletions.fulls.is_empty(), "a's full is the newest ending before the window: {deletions:?}");
    assert!(deletions.segments.is_empty(), "{deletions:?}");
    // Far later, a full of `b` ending before the window replaces it: `a` and its segments go.
    let deletions = retention_across(&listing, &later, &handoffs, 6_000, &policy);
    assert_eq!(deletions.fulls, vec![m.fulls[0].id.clone()]);
    assert!(deletions.segments.iter().any(|s| s.lineage == lin("a")), "{deletions:?}");
}

#[test]
fn after_a_move_with_a_handoff_the_full_before_it_counts_for_the_schedule() {
    let m = moved();
    let into_b = lineages_into(&lin("b"), std::slice::from_ref(&m.handoff));
    assert_eq!(into_b, [lin("a"), lin("b")].into());
    assert_eq!(lineages_into(&lin("a"), std::slice::from_ref(&m.handoff)), [lin("a")].into());
    // Chained moves: a -> b -> c.
    let second = Handoff {
        from: lin("b"),
        from_position: OplogPosition::end_of(120),
        to: lin("c"),
        to_position: OplogPosition::end_of(300),
    };
    assert_eq!(lineages_into(&lin("c"), &[m.handoff.clone(), second]), [lin("a"), lin("b"), lin("c")].into());
}

/// Two lineages joined by a handoff from the first's last archived position to a random
/// position of the second (crossable or not, as positions of two logs fall).
fn moved_archive_model() -> impl Strategy<Value = (Vec<LineageModel>, Handoff)> {
    (lineage_model(0, 0), lineage_model(1, 2_100), any::<bool>(), proptest::option::of(0u64..200)).prop_map(
        |(a, mut b, above, to)| {
            // The second log's positions above the first's, or as they fall (a restore
            // restarts its order at the handoff either way).
            if above {
                let up = |p: OplogPosition| OplogPosition { index: p.index + 300, ..p };
                for s in &mut b.segments {
                    (s.after, s.through) = (up(s.after), up(s.through));
                }
                for f in &mut b.fulls {
                    (f.start, f.end) = (up(f.start), up(f.end));
                }
            }
            let from = a.segments.iter().map(|s| s.through).max().unwrap_or_default();
            // Where the second lineage's archive starts, or anywhere.
            let first = b.segments.iter().map(|s| s.after).min().unwrap_or_default();
            let to_position = to.map_or(first, OplogPosition::end_of);
            let handoff = Handoff { from: lin(&a.name), from_position: from, to: lin(&b.name), to_position };
            (vec![a, b], handoff)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn across_a_handoff_the_window_is_exactly_the_times_planned_and_retention_keeps_every_plan(
        (models, handoff) in moved_archive_model(),
        now in 0u64..4_200,
        window_ms in 0u64..3_000,
        ts in proptest::collection::vec(0u64..4_200, 20),
    ) {
        let (fulls, segments) = flatten(&models);
        let handoffs = [handoff];
        let window = recoverable_window_across(&fulls, &segments, &handoffs);
        let edges: Vec<u64> = window.ranges.iter().flat_map(|r| [r.from_ms, r.to_ms, r.to_ms + 1]).collect();
        for &t in ts.iter().chain(&edges) {
            match plan_restore_across(&fulls, &segments, &handoffs, RestoreTarget::Time(t)) {
                Ok(plan) => {
                    prop_assert!(window.contains(t), "planned {t} outside {window:?}");
                    prop_assert!(plan.full.end_ms <= t);
                    let lineages: Vec<&Lineage> = std::iter::once(&plan.full.lineage).chain(plan.handoffs.iter().map(|h| &h.to)).collect();
                    prop_assert!(plan.segments.iter().all(|s| lineages.contains(&&s.lineage)));
                }
                Err(e) => prop_assert!(!window.contains(t), "{t} in {window:?} refused: {e}"),
            }
        }
        let listing = FullListing { complete: fulls.clone(), incomplete: vec![], damaged: vec![] };
        let policy = RetentionPolicy { window_ms, incomplete_grace_ms: 0 };
        let d = retention_across(&listing, &segments, &handoffs, now, &policy);
        let kept_fulls: Vec<FullManifest> = fulls.iter().filter(|f| !d.fulls.contains(&f.id)).cloned().collect();
        let kept_segments: Vec<SegmentName> = segments.iter().filter(|s| !d.segments.contains(s)).cloned().collect();
        let window_start = now.saturating_sub(window_ms);
        for t in ts.iter().map(|t| window_start + t % (window_ms + 1)).chain([window_start, now]).chain(edges) {
            if t < window_start {
                continue;
            }
            let a = plan_restore_across(&fulls, &segments, &handoffs, RestoreTarget::Time(t));
            let b = plan_restore_across(&kept_fulls, &kept_segments, &handoffs, RestoreTarget::Time(t));
            match (a, b) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "at {}: before {:?}, after {:?}", t, a.map(|p| p.full.id), b.map(|p| p.full.id)),
            }
        }
    }
}

#[test]
fn a_move_whose_old_lineage_was_archived_past_the_fence_is_crossed_at_the_fence() {
    // The segment stored while the database moved ends at the source's applied end, past
    // the fence (25): the walk still crosses at the handoff, and nothing past the fence
    // is replayed.
    let mut m = moved();
    m.segments[1] = seg("a", 15, 40, 1_160, 3_000);
    m.changes.push(("a", 30, 3_000)); // the source's own later write to the key, never the database's
    let handoffs = [m.handoff.clone()];
    let window = recoverable_window_across(&m.fulls, &m.segments, &handoffs);
    assert_eq!(window.ranges, vec![TimeRange { from_ms: 1_120, to_ms: 2_105 }]);
    let database = Moved { changes: m.changes.iter().copied().filter(|c| c.1 != 30).collect(), ..moved() };
    for t in [1_150, 2_009, 2_077, 2_105] {
        let plan = plan_restore_across(&m.fulls, &m.segments, &handoffs, RestoreTarget::Time(t)).unwrap();
        assert_eq!(m.restore(&plan), database.state_at(t), "restore to {t}: {plan:?}");
    }
}
