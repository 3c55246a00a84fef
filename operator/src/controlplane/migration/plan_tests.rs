//! The migration's decisions as data.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;

const MS: u64 = 1;
const S: u64 = 1_000;

#[test]
fn the_hold_starts_only_when_the_estimated_catch_up_is_under_half_a_second() {
    let under = Duration::from_millis(500);
    // (lag, measured rate per second, hold?)
    let cases: &[(u64, f64, bool)] = &[
        (0, 0.0, true),        // caught up: hold, whatever the rate
        (0, 1_000.0, true),    //
        (1, 0.0, false),       // behind with no measured rate: never
        (1, f64::NAN, false),  //
        (1, -5.0, false),      //
        (499, 1_000.0, true),  // 0.499 s
        (500, 1_000.0, false), // 0.5 s exactly is not under
        (1_240, 1_000.0, false),
        (10, 100.0, true),   // 0.1 s
        (100, 100.0, false), // 1 s
        (u64::MAX, 1e6, false),
    ];
    for &(lag, rate, hold) in cases {
        assert_eq!(should_hold(lag, rate, under), hold, "lag {lag} at {rate}/s");
    }
}

fn view(lag: u64, rate_per_sec: f64, elapsed_secs: u64) -> CatchUpView {
    CatchUpView { lag, rate_per_sec, elapsed: Duration::from_secs(elapsed_secs), first_lag: None, pass_too_slow: false }
}

#[test]
fn the_catch_up_continues_within_its_budget_holds_when_close_and_gives_up_once_spent() {
    let t = Tuning::default();
    assert_eq!(t.catch_up_timeout, Duration::from_secs(600));
    assert_eq!(t.hold_under, Duration::from_millis(200));
    let give_up = |v: &CatchUpView| matches!(catch_up_next(v, &t), CatchUpNext::GiveUp(_));
    // (view, what to do), with 0.2 s to hold under and 10 min of budget.
    let cases: &[(CatchUpView, &str)] = &[
        (view(41_200, 5_000.0, 0), "continue"),   // 8 s behind, just started
        (view(41_200, 5_000.0, 599), "continue"), // a second of budget left
        (view(41_200, 5_000.0, 600), "give up"),  // spent exactly
        (view(41_200, 5_000.0, 10_000), "give up"),
        (view(999, 5_000.0, 0), "hold"),        // 0.1998 s
        (view(999, 5_000.0, 600), "hold"),      // close enough at the budget's edge: holds
        (view(1_000, 5_000.0, 600), "give up"), // 0.2 s exactly is not under
        // Caught up holds even with the budget long spent and no rate measured.
        (view(0, 0.0, 600), "hold"),
        (view(0, f64::NAN, 100_000), "hold"),
        // Behind with no rate measured (NaN, zero, negative): never a hold; continues
        // within the budget, gives up after it.
        (view(1, f64::NAN, 0), "continue"),
        (view(1, 0.0, 599), "continue"),
        (view(1, -3.0, 599), "continue"),
        (view(1, f64::NAN, 600), "give up"),
        (view(1, 0.0, 600), "give up"),
        (view(u64::MAX, f64::INFINITY, 600), "hold"), // an infinite rate: any lag is 0 s away
        (view(u64::MAX, 1e-300, 600), "give up"),
    ];
    for (v, want) in cases {
        let got = match catch_up_next(v, &t) {
            CatchUpNext::Hold => "hold",
            CatchUpNext::Continue => "continue",
            CatchUpNext::GiveUp(_) => "give up",
        };
        assert_eq!(got, *want, "{v:?}");
    }
    // Close enough before, but each idempotency pass too long to hold after: still a hold
    // within the budget, a give-up (saying why) once it is spent.
    let slow_passes = |elapsed| CatchUpView { pass_too_slow: true, ..view(999, 5_000.0, elapsed) };
    assert_eq!(catch_up_next(&slow_passes(599), &t), CatchUpNext::Hold);
    match catch_up_next(&slow_passes(600), &t) {
        CatchUpNext::GiveUp(reason) => assert_eq!(
            reason,
            "the catch-up got under 0.2 s behind, but the idempotency records' pass before the hold never took \
             under 125 ms in 10 min: the target applies them too slowly"
        ),
        other => panic!("{other:?}"),
    }
    // A lag of 0 is no exception: the pass must still be short.
    assert!(give_up(&CatchUpView { pass_too_slow: true, ..view(0, 0.0, 600) }));
    // No budget (zero): never gives up.
    let unbounded = Tuning { catch_up_timeout: Duration::ZERO, ..Tuning::default() };
    assert_eq!(catch_up_next(&view(41_200, 5_000.0, 1_000_000), &unbounded), CatchUpNext::Continue);
    assert!(!give_up(&view(41_200, 5_000.0, 1)));
}

#[test]
fn a_spent_catch_up_budget_says_how_far_behind_at_what_rate_and_which_way_the_lag_goes() {
    let t = Tuning::default();
    let reason = |v: CatchUpView| match catch_up_next(&v, &t) {
        CatchUpNext::GiveUp(reason) => reason,
        other => panic!("{v:?}: {other:?}"),
    };
    let growing = CatchUpView { first_lag: Some((5_200, Duration::from_secs(300))), ..view(41_200, 5_000.4, 600) };
    assert_eq!(
        reason(growing),
        "the catch-up did not get under 0.2 s behind in 10 min: 41,200 ops behind, applying 5,000 ops/s, \
         the lag growing by 120 ops/s: the tenant writes faster than the target applies"
    );
    let shrinking = CatchUpView { first_lag: Some((50_200, Duration::from_secs(300))), ..view(41_200, 5_000.0, 600) };
    assert!(reason(shrinking).ends_with("41,200 ops behind, applying 5,000 ops/s, the lag shrinking by only 30 ops/s"));
    let flat = CatchUpView { first_lag: Some((41_200, Duration::from_secs(300))), ..view(41_200, 5_000.0, 600) };
    assert!(reason(flat).ends_with(", the lag not shrinking"));
    // No trend known (first seen just now, or not at all), no rate measured: said as such.
    let unknown = CatchUpView { first_lag: Some((41_200, Duration::ZERO)), ..view(41_200, f64::NAN, 600) };
    assert!(reason(unknown).ends_with("41,200 ops behind, no applying rate measured"));
    let quick = Tuning { catch_up_timeout: Duration::from_millis(50), hold_under: Duration::ZERO, ..t.clone() };
    let CatchUpNext::GiveUp(r) = catch_up_next(&view(7, 1.0, 1), &quick) else { panic!() };
    assert!(r.starts_with("the catch-up did not get under 0 ms behind in 50 ms: 7 ops behind"), "{r}");
}

#[test]
fn a_spent_catch_up_budget_aborts_the_attempt() {
    let t = Tuning::default();
    let f = Failure::CatchUpTooSlow("the catch-up did not get under 0.2 s behind in 10 min".into());
    assert_eq!(on_failure(Step::CatchUp, &f, 0, None, 0, &t), Reaction::Abort(f.to_string()));
    assert_eq!(f.to_string(), "the catch-up did not get under 0.2 s behind in 10 min");
}

#[test]
fn durations_and_counts_read_as_a_person_writes_them() {
    let cases: &[(Duration, &str)] = &[
        (Duration::from_secs(600), "10 min"),
        (Duration::from_secs(5_400), "1 h 30 min"),
        (Duration::from_secs(7_200), "2 h"),
        (Duration::from_secs(90), "1 min 30 s"),
        (Duration::from_millis(412_700), "6 min 52 s"),
        (Duration::from_secs(3_601), "1 h 1 s"),
        (Duration::from_millis(59_960), "60 s"),
        (Duration::from_millis(200), "0.2 s"),
        (Duration::from_millis(1_500), "1.5 s"),
        (Duration::from_secs(5), "5 s"),
        (Duration::from_millis(40), "40 ms"),
        (Duration::ZERO, "0 ms"),
    ];
    for (d, want) in cases {
        assert_eq!(human(*d), *want, "{d:?}");
    }
    assert_eq!(thousands(1_240), "1,240");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1_000_000), "1,000,000");
}

#[test]
fn retries_wait_ten_seconds_doubling_up_to_five_minutes() {
    let (first, max) = (Duration::from_secs(10), Duration::from_secs(300));
    let waits: Vec<u64> = (1..=8).map(|a| retry_delay(a, first, max).as_secs()).collect();
    assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(retry_delay(0, first, max), first);
    assert_eq!(retry_delay(u32::MAX, first, max), max);
}

#[test]
fn an_abort_schedules_the_next_attempt_until_attempts_run_out() {
    let t = Tuning { max_attempts: 3, ..Tuning::default() };
    assert_eq!(after_abort(1, 1_000, &t), AfterAbort::RetryAt(11_000));
    assert_eq!(after_abort(2, 1_000, &t), AfterAbort::RetryAt(21_000));
    assert_eq!(after_abort(3, 1_000, &t), AfterAbort::GiveUp);
    assert_eq!(after_abort(9, 1_000, &t), AfterAbort::GiveUp);
}

fn transient() -> Failure {
    Failure::Transient("datanode unreachable".into())
}

#[test]
fn failures_before_the_hold_retry_until_the_step_timeout_then_abort() {
    let t = Tuning::default();
    let since = 1_000 * S;
    for step in [Step::Copy, Step::CatchUp] {
        assert_eq!(on_failure(step, &transient(), since, None, since, &t), Reaction::Retry(t.step_retry));
        assert_eq!(on_failure(step, &transient(), since, None, since + 119 * S, &t), Reaction::Retry(t.step_retry));
        assert!(matches!(on_failure(step, &transient(), since, None, since + 120 * S, &t), Reaction::Abort(_)));
        assert_eq!(on_failure(step, &Failure::OplogTruncated, since, None, since, &t), Reaction::RestartCopy);
        for f in [Failure::Gone("target rs-b is gone".into()), Failure::Refused("409".into())] {
            assert_eq!(on_failure(step, &f, since, None, since, &t), Reaction::Abort(f.to_string()), "{step:?} {f:?}");
        }
    }
}

#[test]
fn failures_in_the_hold_retry_quickly_until_the_deadline_and_anything_else_aborts() {
    let t = Tuning::default();
    let deadline = Some(5 * S);
    for step in [Step::Hold, Step::Fence, Step::Verify] {
        assert_eq!(on_failure(step, &transient(), 0, deadline, 4_999 * MS, &t), Reaction::Retry(HOLD_RETRY));
        let at_deadline = on_failure(step, &transient(), 0, deadline, 5 * S, &t);
        assert!(matches!(&at_deadline, Reaction::Abort(m) if m.contains("deadline")), "{at_deadline:?}");
        for f in [
            Failure::OplogTruncated,
            Failure::Mismatch("documents 10 != 9".into()),
            Failure::HoldTimedOut("gateway g2 did not acknowledge".into()),
            Failure::Gone("source".into()),
            Failure::Refused("400".into()),
        ] {
            assert!(matches!(on_failure(step, &f, 0, deadline, 0, &t), Reaction::Abort(_)), "{step:?} {f:?}");
        }
    }
}

#[test]
fn after_the_switch_started_nothing_aborts() {
    let t = Tuning::default();
    let all = [
        transient(),
        Failure::OplogTruncated,
        Failure::Mismatch("x".into()),
        Failure::HoldTimedOut("x".into()),
        Failure::Gone("x".into()),
        Failure::Refused("x".into()),
    ];
    for step in [Step::Switch, Step::CleanUp, Step::Abort] {
        for f in &all {
            // Long past the deadline and the step timeout.
            let r = on_failure(step, f, 0, Some(1), 10_000 * S, &t);
            assert!(matches!(r, Reaction::Retry(_)), "{step:?} {f:?}: {r:?}");
        }
    }
}

fn record_at(step: Step, deadline: Option<u64>, retry: Option<u64>) -> MigrationRecord {
    let mut r = MigrationRecord::new("m".into(), "shop", "", "a", "b", 3, 0);
    r.hold_deadline_ms = deadline;
    r.next_retry_ms = retry;
    r.set_step(step);
    r
}

#[test]
fn a_restarted_control_plane_resumes_rolls_back_or_goes_forward_by_step() {
    let now = 100 * S;
    let (past, future) = (Some(now - 1), Some(now + 1));
    // (step, hold deadline, next retry, what to do)
    let cases: Vec<(Step, Option<u64>, Option<u64>, Resume)> = vec![
        (Step::Copy, None, None, Resume::Continue),
        (Step::Copy, None, Some(now + 5), Resume::WaitUntil(now + 5)),
        (Step::Copy, None, Some(now), Resume::Continue),
        (Step::CatchUp, None, None, Resume::Continue),
        (Step::Hold, future, None, Resume::Continue),
        (Step::Hold, None, None, Resume::Continue),
        (Step::Fence, future, None, Resume::Continue),
        (Step::Verify, future, None, Resume::Continue),
        (Step::Switch, past, None, Resume::Continue),
        (Step::CleanUp, past, Some(now + 9), Resume::WaitUntil(now + 9)),
        (Step::CleanUp, past, Some(now - 9), Resume::Continue),
        (Step::Abort, past, None, Resume::Continue),
        (Step::Done, None, None, Resume::Finished),
        (Step::Aborted, None, None, Resume::Finished),
    ];
    for (step, deadline, retry, want) in cases {
        assert_eq!(on_resume(&record_at(step, deadline, retry), now), want, "{step:?} {deadline:?} {retry:?}");
    }
    for step in [Step::Hold, Step::Fence, Step::Verify] {
        let r = on_resume(&record_at(step, past, None), now);
        assert!(matches!(r, Resume::Abort(_)), "{step:?} past its deadline: {r:?}");
    }
}

#[test]
fn the_phase_follows_the_step() {
    let cases = [
        (Step::Copy, false, Phase::Copying),
        (Step::Copy, true, Phase::Aborted),
        (Step::CatchUp, false, Phase::CatchingUp),
        (Step::Hold, false, Phase::Holding),
        (Step::Fence, false, Phase::Holding),
        (Step::Verify, false, Phase::Holding),
        (Step::Switch, false, Phase::Switching),
        (Step::CleanUp, true, Phase::CleaningUp),
        (Step::Done, false, Phase::Completed),
        (Step::Abort, false, Phase::Aborted),
        (Step::Aborted, false, Phase::Aborted),
    ];
    for (step, retry, phase) in cases {
        assert_eq!(phase_of(step, retry), phase, "{step:?}");
    }
}

const MIB: u64 = 1 << 20;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Feeds full pages (1 MiB) that each take `took`, `now` moving on by each page and its
/// pause; returns the rates after each page (MiB/s).
fn pace(pacer: &mut CopyPacer, now: &mut Duration, took: &[u64]) -> Vec<f64> {
    took.iter()
        .map(|&t| {
            let pause = pacer.page(*now + ms(t), ms(t), MIB);
            *now += ms(t) + pause;
            pacer.rate() as f64 / MIB as f64
        })
        .collect()
}

#[test]
fn a_quiet_copy_starts_at_the_floor_and_doubles_up_to_the_ceiling() {
    let t = Tuning::default();
    let mut pacer = CopyPacer::new(&t);
    assert_eq!(pacer.rate(), MIB, "starts at the floor");
    assert_eq!(pacer.base(), None);
    let mut now = Duration::ZERO;
    // The first page (10 ms) at 1 MiB/s: a pause of the rest of the second at the next rate.
    assert_eq!(pacer.page(ms(10), ms(10), MIB), ms(500 - 10));
    now += Duration::from_secs(1);
    assert_eq!(pace(&mut pacer, &mut now, &[10; 7]), [4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0]);
    assert_eq!(pacer.base(), Some(ms(10)));
    // At the ceiling (64 MiB/s: 15.625 ms a page), a 10 ms page waits the rest.
    assert_eq!(pacer.page(now, ms(10), MIB), Duration::from_micros(5_625));
    assert_eq!(pacer.page(now, ms(14), MIB), Duration::from_micros(1_625));
    // A page slower than the ceiling's share (but not slow): no pause.
    assert_eq!(pacer.page(now, ms(20), MIB), Duration::ZERO);
}

#[test]
fn pages_slower_than_half_again_the_base_halve_the_rate_and_quiet_ones_add_to_it() {
    let t = Tuning::default();
    let mut pacer = CopyPacer::new(&t);
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[10; 7]);
    assert_eq!(pacer.rate(), 64 * MIB);
    // One slow page is not enough (a compaction, an fsync); two are.
    assert_eq!(pace(&mut pacer, &mut now, &[20]), [64.0]);
    assert_eq!(pace(&mut pacer, &mut now, &[20, 20, 20]), [32.0, 16.0, 8.0]);
    // Quiet again: 4 MiB/s more per second of copying (a page at 8 MiB/s takes 1/8 s).
    assert_eq!(pace(&mut pacer, &mut now, &[10]), [8.5]);
    let rates = pace(&mut pacer, &mut now, &[10; 40]);
    assert!(rates.windows(2).all(|w| w[1] > w[0]), "grows additively: {rates:?}");
    assert!(rates[39] < 64.0, "no slow start after the first slow page: {rates:?}");
    // Within the queuing allowance (10 ms base: slow past 15 ms): not slow.
    let before = pacer.rate();
    pace(&mut pacer, &mut now, &[15, 15, 15]);
    assert!(pacer.rate() > before);
}

#[test]
fn the_allowance_is_a_fraction_of_the_base_but_never_under_the_minimum() {
    // A 2 ms page: 5 ms of jitter is not queuing.
    let mut pacer = CopyPacer::new(&Tuning::default());
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[2, 7, 7]);
    assert_eq!(pacer.rate(), 8 * MIB, "still in slow start");
    assert_eq!(pace(&mut pacer, &mut now, &[8, 8]), [16.0, 8.0], "8 ms is past 2 + 5 ms: halved at the second");
    // A 100 ms page: slow past 150 ms.
    let mut pacer = CopyPacer::new(&Tuning::default());
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[100, 150, 150]);
    assert_eq!(pacer.rate(), 8 * MIB);
    assert_eq!(pace(&mut pacer, &mut now, &[151, 151]), [16.0, 8.0], "halved at the second");
}

#[test]
fn the_floor_holds_however_slow_the_pages() {
    let t = Tuning::default();
    let mut pacer = CopyPacer::new(&t);
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[10; 7]);
    let rates = pace(&mut pacer, &mut now, &[500; 20]);
    assert!(rates.iter().all(|&r| r >= 1.0), "{rates:?}");
    assert_eq!(pacer.rate(), MIB);
    // At the floor a 1 MiB page takes its second: 500 ms of work, 500 ms of pause.
    assert_eq!(pacer.page(now, ms(500), MIB), ms(500));
    // A page slower than the floor's share is not paused further: the copy goes on.
    assert_eq!(pacer.page(now, Duration::from_secs(3), MIB), Duration::ZERO);
}

#[test]
fn the_window_forgets_an_old_minimum() {
    let t = Tuning::default();
    let mut pacer = CopyPacer::new(&t);
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[10; 7]);
    assert_eq!(pacer.base(), Some(ms(10)));
    // The baseline moves to 40 ms (another leader): slow at first, down to the floor...
    pace(&mut pacer, &mut now, &[40; 10]);
    assert_eq!(pacer.rate(), MIB);
    assert_eq!(pacer.base(), Some(ms(10)));
    // ...until the 10 ms pages are out of the window (30 s); then the copy speeds up again.
    let started = now;
    while now < started + t.copy_base_window {
        pace(&mut pacer, &mut now, &[40]);
    }
    assert_eq!(pacer.base(), Some(ms(40)));
    let rates = pace(&mut pacer, &mut now, &[40; 10]);
    assert!(rates.windows(2).all(|w| w[1] > w[0]), "{rates:?}");
    // Pages far apart: the window is time, not a number of pages.
    let mut pacer = CopyPacer::new(&t);
    pacer.page(Duration::ZERO, ms(10), MIB);
    pacer.page(Duration::from_secs(29), ms(40), MIB);
    assert_eq!(pacer.base(), Some(ms(10)));
    pacer.page(Duration::from_secs(31), ms(40), MIB);
    assert_eq!(pacer.base(), Some(ms(40)));
    // The window bounds its memory: a bucket per sixth of it.
    for _ in 0..10_000 {
        pacer.page(now, ms(40), MIB);
        now += ms(1);
    }
    assert!(pacer.buckets.len() <= 7, "{}", pacer.buckets.len());
}

#[test]
fn a_page_over_a_full_one_is_judged_per_full_page_and_a_smaller_one_as_it_is() {
    let t = Tuning::default();
    let mut pacer = CopyPacer::new(&t);
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[10; 7]);
    assert_eq!(pacer.rate(), 64 * MIB);
    // One 4 MiB document in 36 ms: 9 ms per full page, a new base and not slow.
    pacer.page(now, ms(36), 4 * MIB);
    assert_eq!(pacer.base(), Some(ms(9)));
    assert_eq!(pacer.rate(), 64 * MIB);
    // Pages of tiny documents (their keys, which the source counts, as long as they are):
    // the source cut them at a full page, so they are judged as such, and paced by their
    // bytes at the rate.
    assert_eq!(pacer.page(now, ms(10), 64 << 10), Duration::ZERO);
    assert_eq!(pacer.page(now, ms(30), 64 << 10), Duration::ZERO);
    assert_eq!(pacer.rate(), 64 * MIB);
    assert_eq!(pacer.page(now, ms(30), 64 << 10), Duration::ZERO);
    assert_eq!(pacer.rate(), 32 * MIB, "slow twice: halved");
}

#[test]
fn the_pacer_survives_zero_and_huge_values() {
    let mut pacer = CopyPacer::new(&Tuning::default());
    assert_eq!(pacer.page(Duration::ZERO, Duration::ZERO, 0), Duration::ZERO);
    assert_eq!(pacer.page(Duration::ZERO, Duration::ZERO, MIB), Duration::from_secs(1) / 4);
    assert_eq!(pacer.page(Duration::ZERO, Duration::ZERO, MIB), Duration::from_secs(1) / 8);
    pacer.page(Duration::MAX, Duration::MAX, u64::MAX);
    pacer.page(Duration::MAX, Duration::MAX, u64::MAX);
    assert!(pacer.rate() >= MIB);
    pacer.page(Duration::ZERO, Duration::MAX, MIB);
    assert!(pacer.page(Duration::ZERO, Duration::ZERO, u64::MAX) > Duration::from_secs(1_000_000));
    // 0 is unthrottled: never a pause.
    let mut off = CopyPacer::new(&Tuning { copy_bytes_per_sec: 0, ..Tuning::default() });
    assert_eq!(off.page(Duration::ZERO, Duration::ZERO, u64::MAX), Duration::ZERO);
    assert_eq!(off.rate(), 0);
    // Knobs out of range: a floor over the ceiling is the ceiling, a floor of 0 is 1 byte/s,
    // no page size, NaN fractions.
    let odd = Tuning {
        copy_bytes_per_sec: MIB,
        copy_min_bytes_per_sec: 8 * MIB,
        copy_queuing_ratio: f64::NAN,
        copy_backoff: f64::NAN,
        page_bytes: 0,
        copy_base_window: Duration::ZERO,
        ..Tuning::default()
    };
    let mut pacer = CopyPacer::new(&odd);
    assert_eq!(pacer.rate(), MIB);
    assert_eq!(pacer.page(Duration::ZERO, Duration::ZERO, MIB), Duration::from_secs(1));
    let mut pacer = CopyPacer::new(&Tuning { copy_min_bytes_per_sec: 0, ..Tuning::default() });
    assert_eq!(pacer.rate(), 1);
    assert_eq!(pacer.page(Duration::ZERO, Duration::ZERO, 1), ms(500));
    // A backoff out of 0..=1 is brought into it: a slow page cuts to the floor, no lower.
    let mut pacer = CopyPacer::new(&Tuning { copy_backoff: -3.0, ..Tuning::default() });
    let mut now = Duration::ZERO;
    pace(&mut pacer, &mut now, &[10, 10, 10]);
    assert_eq!(pace(&mut pacer, &mut now, &[50, 50]), [16.0, 1.0]);
}

fn gateways(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn acks(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs.iter().map(|(g, v)| (g.to_string(), v.as_bytes().to_vec())).collect()
}

#[test]
fn the_hold_counts_every_registered_gateway_acknowledging_exactly_this_hold() {
    let held = nimbus_api::etcd::Route {
        replica_set: "rs-a".into(),
        members: Vec::new(),
        epoch: 7,
        state: nimbus_api::etcd::RouteState::Holding,
        hold_deadline_ms: Some(5_000),
        hold_timeout_ms: Some(5_000),
    };
    let ack = |epoch: u64, deadline: Option<u64>| {
        serde_json::to_string(&nimbus_api::etcd::HoldAck { epoch, hold_deadline_ms: deadline, acked_ms: 1 }).unwrap()
    };
    let two = gateways(&["g1", "g2"]);
    let (a, b) = (ack(7, Some(5_000)), ack(7, Some(5_000)));
    assert_eq!(hold_acknowledged(&two, &acks(&[("g1", &a), ("g2", &b)]), &held), Ok(()));
    assert_eq!(hold_acknowledged(&two, &acks(&[("g1", &a)]), &held), Err(vec!["g2".into()]));
    assert_eq!(hold_acknowledged(&two, &acks(&[]), &held), Err(vec!["g1".into(), "g2".into()]));
    // Another epoch, or an earlier attempt's hold at this epoch (another deadline): no.
    let (old_epoch, old_attempt) = (ack(6, Some(5_000)), ack(7, Some(4_000)));
    assert_eq!(
        hold_acknowledged(&two, &acks(&[("g1", &old_epoch), ("g2", &old_attempt)]), &held),
        Err(vec!["g1".into(), "g2".into()])
    );
    // Anything that is not a gateway's acknowledgement: no.
    assert_eq!(
        hold_acknowledged(&two, &acks(&[("g1", r#"{"epoch":7}"#), ("g2", "7")]), &held),
        Err(vec!["g1".into(), "g2".into()])
    );
    // A route no longer holding is acknowledged by nobody.
    let serving = nimbus_api::etcd::Route { state: nimbus_api::etcd::RouteState::Serving, ..held.clone() };
    assert_eq!(hold_acknowledged(&gateways(&["g1"]), &acks(&[("g1", &a)]), &serving), Err(vec!["g1".into()]));
    // Unregistered gateways' acknowledgements do not matter; no gateway: nothing to wait for.
    assert_eq!(hold_acknowledged(&gateways(&["g1"]), &acks(&[("g1", &a), ("gone", "x")]), &held), Ok(()));
    assert_eq!(hold_acknowledged(&gateways(&[]), &acks(&[]), &held), Ok(()));
}

#[test]
fn at_most_max_migrations_run_the_oldest_first() {
    let waiting = vec![("c".to_string(), 30), ("a".to_string(), 10), ("b".to_string(), 20), ("a2".to_string(), 10)];
    assert_eq!(admit(&waiting, 0, 2), ["a", "a2"]);
    assert_eq!(admit(&waiting, 1, 2), ["a"]);
    assert_eq!(admit(&waiting, 2, 2), Vec::<String>::new());
    assert_eq!(admit(&waiting, 5, 2), Vec::<String>::new());
    assert_eq!(admit(&waiting, 0, 10), ["a", "a2", "b", "c"]);
    assert_eq!(admit(&[], 0, 2), Vec::<String>::new());
}

#[test]
fn a_pin_is_renewed_once_half_its_lifetime_is_gone() {
    let ttl = Duration::from_secs(600);
    assert_eq!(pin_renewal(None, 1_000, ttl), Some(601_000), "not pinned yet");
    assert_eq!(pin_renewal(Some(0), 1_000, ttl), Some(601_000), "lapsed");
    assert_eq!(pin_renewal(Some(301_001), 1_000, ttl), None, "more than half left");
    assert_eq!(pin_renewal(Some(301_000), 1_000, ttl), Some(601_000), "half left");
}
