//! The driver against the model world ([`super::model`]): complete migrations, aborts and
//! retries, and a crash at every call and every failpoint, each checked for the protocol's
//! invariants and its outcome.

use std::sync::Arc;
use std::time::Duration;

use nimbus_api::etcd::RouteState;
use nimbus_api::migration::OplogPosition;

use super::driver::{self, MigrationError, Outcome, StartError, StartRequest};
use super::model::{Crash, DB, Model};
use super::plan::Tuning;
use super::record::{Phase, Step};

/// Quick: no throttle, no grace, retries within milliseconds.
fn tuning() -> Tuning {
    Tuning {
        retry_first: Duration::from_millis(1),
        retry_max: Duration::from_millis(5),
        step_retry: Duration::from_millis(1),
        cleanup_grace: Duration::ZERO,
        copy_bytes_per_sec: 0,
        oplog_page: 5,
        poll: Duration::from_millis(1),
        ..Tuning::default()
    }
}

fn to_b() -> StartRequest {
    StartRequest { db: DB.into(), namespace: String::new(), to_replica_set: "b".into() }
}

/// Drives until the migration completes or aborts for good, starting a new driver from the
/// persisted record whenever one crashed (or was dropped by an injected crash). Returns the
/// outcome and the failpoints that crashed it.
async fn run_to_end(model: &Arc<Model>, tuning: &Tuning) -> (Outcome, Vec<&'static str>) {
    let mut crashed_at = Vec::new();
    for _ in 0..10_000 {
        let result = tokio::select! {
            r = driver::drive(model.as_ref(), tuning, DB) => Some(r),
            () = model.crashed.notified() => None,
        };
        match result {
            // The driver was dropped in the middle of a call: a new one takes over.
            None => {}
            Some(Err(MigrationError::Crashed(at))) => {
                crashed_at.push(at);
                #[cfg(feature = "failpoints")]
                fail::remove(at);
            }
            Some(Ok(Outcome::WaitUntil(at))) => {
                tokio::time::sleep(Duration::from_millis(at.saturating_sub(driver::now_ms()))).await;
            }
            Some(Ok(Outcome::Superseded)) => panic!("superseded with a single driver"),
            Some(Ok(outcome)) => return (outcome, crashed_at),
            Some(Err(e)) => panic!("the driver failed: {e}"),
        }
    }
    panic!("the migration never ended");
}

/// The invariants after a completed migration: the route on `b` at an epoch above the
/// start, `Serving`; `b` holds every acknowledged write's last value; the source dropped;
/// nothing the model flagged.
fn assert_completed(model: &Model, first_epoch: u64) {
    let s = model.lock();
    assert_eq!(s.violations, Vec::<String>::new());
    let (route, _) = s.route.clone().unwrap();
    assert_eq!((route.replica_set.as_str(), route.state), ("b", RouteState::Serving));
    assert!(route.epoch > first_epoch, "the switch raised the epoch");
    assert_eq!(s.sets["b"].docs, s.expected(), "an acknowledged write is missing on the target");
    assert!(s.sets["a"].docs.is_empty(), "the source was not cleaned up");
    assert!(s.sets["a"].pins.is_empty(), "the source's oplog is still pinned");
    let (record, _) = s.record.clone().unwrap();
    assert_eq!((record.step, record.phase), (Step::Done, Phase::Completed));
    assert!(record.finished_at_ms.is_some() && record.hold_ms.is_some());
    assert!(s.acked.len() > 30, "the client kept writing during the migration");
}

#[tokio::test]
async fn a_migration_copies_catches_up_holds_fences_verifies_and_switches() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_completed(&model, 5);
    let s = model.lock();
    let (route, _) = s.route.clone().unwrap();
    assert_eq!(route.epoch, 6);
    let record = &s.record.as_ref().unwrap().0;
    assert_eq!(record.attempt, 1);
    assert!(record.documents_copied >= 25 && record.bytes_copied > 0);
    assert!(s.held > 0, "the client's writes were held at the cutover");
    assert!(s.sets["b"].idempotency.len() >= s.acked.len(), "the idempotency records moved");
}

#[tokio::test]
async fn a_second_migration_of_the_same_database_or_to_its_own_replica_set_is_refused() {
    let model = Model::new();
    let same = StartRequest { to_replica_set: "a".into(), ..to_b() };
    let e = driver::start(model.as_ref(), &same).await.unwrap_err();
    assert!(matches!(e, StartError::AlreadyThere { .. }), "{e}");
    assert_eq!(e.to_string(), "database shop is already on replica set a: nothing to migrate");
    let nowhere = StartRequest { to_replica_set: "z".into(), ..to_b() };
    assert!(matches!(driver::start(model.as_ref(), &nowhere).await, Err(StartError::UnknownReplicaSet(_))));

    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let e = driver::start(model.as_ref(), &to_b()).await.unwrap_err();
    assert!(matches!(e, StartError::AlreadyMigrating { .. }), "{e}");
    assert!(e.to_string().contains("already migrating from a to b"), "{e}");

    // Once finished, the database can move again (back).
    run_to_end(&model, &tuning()).await;
    let back = StartRequest { to_replica_set: "a".into(), ..to_b() };
    let again = driver::start(model.as_ref(), &back).await.unwrap();
    assert_eq!((again.from_replica_set.as_str(), again.from_epoch), ("b", 6));
}

#[tokio::test]
async fn a_gateway_that_does_not_acknowledge_aborts_the_hold_and_the_retry_succeeds() {
    let model = Model::new();
    model.lock().silent.insert("g2".into());
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let t = Tuning { hold_timeout: Duration::from_millis(100), ..tuning() };
    let (outcome, _) = run_to_end(&model, &t).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_completed(&model, 5);
    let s = model.lock();
    let record = &s.record.as_ref().unwrap().0;
    assert_eq!(record.attempt, 2);
    // The abort said why; switched, it is no longer the migration's state.
    assert!(s.errors.iter().any(|e| e.contains("g2")), "{:?}", s.errors);
    assert_eq!(record.error, None);
    // Aborted before the fence: the retry started at the same epoch.
    assert_eq!(s.route.as_ref().unwrap().0.epoch, 6);
}

#[tokio::test]
async fn a_mismatch_after_the_fence_rolls_back_at_the_next_epoch_and_the_retry_succeeds() {
    let model = Model::new();
    model.lock().corrupt_once = true;
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_completed(&model, 5);
    let s = model.lock();
    let record = &s.record.as_ref().unwrap().0;
    assert_eq!(record.attempt, 2);
    assert!(s.errors.iter().any(|e| e.contains("checksum")), "{:?}", s.errors);
    assert_eq!(record.error, None);
    // Fenced at 6, rolled back to the source at 6, switched at 7.
    assert_eq!(s.route.as_ref().unwrap().0.epoch, 7);
}

#[tokio::test]
async fn an_oplog_truncated_under_the_catch_up_restarts_the_copy_in_the_same_attempt() {
    let model = Model::new();
    model.lock().truncate_once = true;
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_completed(&model, 5);
    assert_eq!(model.lock().record.as_ref().unwrap().0.attempt, 1);
}

#[tokio::test]
async fn a_target_gone_aborts_and_with_no_attempts_left_the_source_keeps_serving() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    model.lock().set("b").gone = true;
    let t = Tuning { max_attempts: 1, ..tuning() };
    let (outcome, _) = run_to_end(&model, &t).await;
    assert_eq!(outcome, Outcome::Aborted);
    let s = model.lock();
    assert_eq!(s.violations, Vec::<String>::new());
    let (route, _) = s.route.clone().unwrap();
    assert_eq!((route.replica_set.as_str(), route.state, route.epoch), ("a", RouteState::Serving, 5));
    assert_eq!(s.sets["a"].docs, s.expected());
    let record = &s.record.as_ref().unwrap().0;
    assert_eq!((record.step, record.phase), (Step::Aborted, Phase::Aborted));
    assert!(record.error.as_deref().unwrap().contains("replica set b no longer exists"), "{:?}", record.error);
}

/// A tenant writing faster than the catch-up applies (each round reads at most
/// `oplog_page` changes while more are written): the lag never reaches 0, and with
/// `hold_under` zero only a lag of 0 would hold (in the model a round takes microseconds,
/// so any measured rate would call a large lag close). The budget spent, the attempt
/// aborts the usual way: the route still on the source, the target's copy dropped, the
/// reason in the record, the next attempt scheduled; once the tenant writes less, that
/// attempt (the second) completes.
#[tokio::test]
async fn a_catch_up_that_never_gets_close_enough_aborts_when_its_budget_is_spent_and_is_retried() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    model.lock().flood = 3;
    let budget = Duration::from_millis(50);
    let t = Tuning {
        hold_under: Duration::ZERO,
        catch_up_timeout: budget,
        // The next attempt an hour away: the driver stops at it, so the test sees it.
        retry_first: Duration::from_secs(3_600),
        retry_max: Duration::from_secs(3_600),
        ..tuning()
    };
    let began = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), driver::drive(model.as_ref(), &t, DB))
        .await
        .expect("the catch-up never gave up")
        .unwrap();
    let Outcome::WaitUntil(next) = outcome else { panic!("{outcome:?}: no retry scheduled") };
    assert!(began.elapsed() >= budget, "gave up before its budget was spent");
    {
        let s = model.lock();
        assert_eq!(s.violations, Vec::<String>::new());
        let (route, _) = s.route.clone().unwrap();
        assert_eq!((route.replica_set.as_str(), route.state, route.epoch), ("a", RouteState::Serving, 5));
        assert_eq!(s.sets["a"].docs, s.expected(), "an acknowledged write is missing on the source");
        assert!(s.sets["b"].docs.is_empty() && s.sets["b"].incoming.is_none(), "the target's copy was not dropped");
        assert!(s.sets["a"].pins.is_empty(), "the source's oplog is still pinned");
        let (record, _) = s.record.clone().unwrap();
        assert_eq!((record.step, record.phase, record.attempt), (Step::Copy, Phase::Aborted, 1));
        assert_eq!(record.next_retry_ms, Some(next));
        assert_eq!(record.catch_up_started_ms, None, "the next attempt's catch-up gets a budget of its own");
        let error = record.error.unwrap_or_default();
        assert!(
            error.starts_with("the catch-up did not get under 0 ms behind in 50 ms: ") && error.contains(" ops behind"),
            "{error}"
        );
        assert!(error.contains("the lag growing by"), "the source outpaced the catch-up: {error}");
        assert!(s.errors.iter().filter(|e| e.starts_with("the catch-up did not")).count() == 1, "{:?}", s.errors);
    }
    // The tenant writes less, and the retry's time comes: attempt 2 completes.
    {
        let mut s = model.lock();
        s.flood = 0;
        s.record.as_mut().unwrap().0.next_retry_ms = Some(0);
    }
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_completed(&model, 5);
    assert_eq!(model.lock().record.as_ref().unwrap().0.attempt, 2);
}

/// The budget is persisted: a control plane that restarts in the catch-up does not start
/// it over. A driver crashes once the record says `CatchUp`; the record's start is then
/// moved back past the budget (the restart came late): the next driver gives up at its
/// first round.
#[tokio::test]
async fn a_control_plane_restarted_in_the_catch_up_keeps_its_budget() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    model.lock().flood = 3;
    let t = Tuning {
        hold_under: Duration::ZERO,
        catch_up_timeout: Duration::from_secs(3_600),
        retry_first: Duration::from_secs(3_600),
        ..tuning()
    };
    model.lock().crash_after_saving = Some(Step::CatchUp);
    tokio::select! {
        r = driver::drive(model.as_ref(), &t, DB) => panic!("the driver ended before the catch-up: {r:?}"),
        () = model.crashed.notified() => {}
    }
    {
        let mut s = model.lock();
        let record = &mut s.record.as_mut().unwrap().0;
        let started = record.catch_up_started_ms.expect("the catch-up's start is recorded with its step");
        assert!(started > driver::now_ms() - 60_000, "{started}");
        record.catch_up_started_ms = Some(started - 3_600_000);
    }
    let outcome = tokio::time::timeout(Duration::from_secs(10), driver::drive(model.as_ref(), &t, DB))
        .await
        .expect("the resumed catch-up did not give up")
        .unwrap();
    assert!(matches!(outcome, Outcome::WaitUntil(_)), "{outcome:?}");
    let s = model.lock();
    let record = &s.record.as_ref().unwrap().0;
    assert!(record.error.as_deref().unwrap_or_default().contains("behind in 1 h: "), "{:?}", record.error);
    assert_eq!(s.route.as_ref().unwrap().0.replica_set, "a");
}

#[tokio::test]
async fn a_cancelled_migration_rolls_back_and_is_not_retried() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    assert!(driver::cancel(model.as_ref(), DB, "spec.pool changed back").await.unwrap());
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Aborted);
    let s = model.lock();
    assert_eq!(s.route.as_ref().unwrap().0.replica_set, "a");
    assert!(s.sets["b"].docs.is_empty() && s.sets["b"].incoming.is_none(), "the target's import was dropped");
}

/// A control plane dropped in the middle of each call of a migration (before or after the
/// call took effect), then started again from the persisted record: each run ends
/// completed with nothing lost, never with the route on an unfinished target.
#[tokio::test]
async fn a_crash_at_every_call_resumes_or_rolls_back_and_completes() {
    let clean = Model::new();
    clean.lock().quiet = true;
    driver::start(clean.as_ref(), &to_b()).await.unwrap();
    clean.lock().calls = 0;
    let (outcome, _) = run_to_end(&clean, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    let calls = clean.lock().calls;
    assert!(calls > 30, "{calls} calls");
    for n in 1..=calls {
        for crash in [Crash::Before(n), Crash::After(n)] {
            let model = Model::new();
            driver::start(model.as_ref(), &to_b()).await.unwrap();
            {
                let mut s = model.lock();
                s.quiet = true;
                s.calls = 0;
                s.crash = Some(crash);
            }
            let (outcome, _) = run_to_end(&model, &tuning()).await;
            assert_eq!(outcome, Outcome::Completed, "{crash:?}");
            assert!(model.lock().crash.is_none(), "{crash:?} was never reached");
            let s = model.lock();
            assert_eq!(s.violations, Vec::<String>::new(), "{crash:?}");
            assert_eq!(s.sets["b"].docs, s.expected(), "{crash:?}");
            assert_eq!(s.route.as_ref().unwrap().0.replica_set, "b", "{crash:?}");
        }
    }
}

/// The same with the client writing throughout (each call lets it write once).
#[tokio::test]
async fn a_crash_at_every_call_under_writes_loses_nothing() {
    let clean = Model::new();
    driver::start(clean.as_ref(), &to_b()).await.unwrap();
    clean.lock().calls = 0;
    run_to_end(&clean, &tuning()).await;
    let calls = clean.lock().calls;
    for n in (1..=calls).step_by(3) {
        for crash in [Crash::Before(n), Crash::After(n)] {
            let model = Model::new();
            driver::start(model.as_ref(), &to_b()).await.unwrap();
            model.lock().calls = 0;
            model.lock().crash = Some(crash);
            let (outcome, _) = run_to_end(&model, &tuning()).await;
            assert_eq!(outcome, Outcome::Completed, "{crash:?}");
            let s = model.lock();
            assert_eq!(s.violations, Vec::<String>::new(), "{crash:?}");
            let serving = &s.route.as_ref().unwrap().0.replica_set;
            assert_eq!(&s.sets[serving].docs, &s.expected(), "{crash:?}: an acknowledged write was lost");
        }
    }
}

/// Every named failpoint, configured to crash the driver there, then a new driver from the
/// persisted record (`--features failpoints`).
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_crash_at_every_failpoint_resumes_or_rolls_back_and_completes() {
    let scenario = fail::FailScenario::setup();
    for &point in driver::FAILPOINTS {
        let model = Model::new();
        // The abort's failpoints are on its path only: a mismatch after the fence takes it.
        if point.starts_with("migration-abort") {
            model.lock().corrupt_once = true;
        }
        driver::start(model.as_ref(), &to_b()).await.unwrap();
        fail::cfg(point, "return").unwrap();
        let (outcome, crashed_at) = run_to_end(&model, &tuning()).await;
        fail::remove(point);
        assert_eq!(crashed_at, [point], "{point} was not reached once");
        assert_eq!(outcome, Outcome::Completed, "{point}");
        let s = model.lock();
        assert_eq!(s.violations, Vec::<String>::new(), "{point}");
        assert_eq!(s.sets["b"].docs, s.expected(), "{point}: an acknowledged write was lost");
        assert_eq!(s.route.as_ref().unwrap().0.replica_set, "b", "{point}");
    }
    scenario.teardown();
}

#[tokio::test]
async fn the_clean_up_keeps_the_source_copy_of_a_database_served_there_again() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    // Switched, the clean-up an hour away: the driver stops at it.
    let t = Tuning { cleanup_grace: Duration::from_secs(3_600), ..tuning() };
    let outcome = driver::drive(model.as_ref(), &t, DB).await.unwrap();
    assert!(matches!(outcome, Outcome::WaitUntil(_)), "{outcome:?}");
    {
        // Meanwhile a new instance of the name is placed on the old source: the route
        // names it again, with data of its own.
        let mut s = model.lock();
        let (route, rev) = s.route.clone().unwrap();
        assert_eq!(route.replica_set, "b");
        let back = nimbus_api::etcd::Route { replica_set: "a".into(), epoch: route.epoch + 1, ..route };
        s.route = Some((back, rev + 1));
        s.sets.get_mut("a").unwrap().docs.insert(999_999, "{\"_id\":999999}".into());
        let record = &mut s.record.as_mut().unwrap().0;
        record.next_retry_ms = Some(0);
    }
    let outcome = driver::drive(model.as_ref(), &tuning(), DB).await.unwrap();
    assert_eq!(outcome, Outcome::Completed);
    let s = model.lock();
    assert_eq!(s.violations, Vec::<String>::new());
    assert!(s.sets["a"].docs.contains_key(&999_999), "the clean-up dropped the database now served by the source");
    assert!(s.sets["a"].pins.is_empty(), "the source's oplog is still pinned");
}

/// The race the route read cannot close: between the clean-up's read and its drop, the
/// instance is deleted and a new one of the name placed on the source, which writes there
/// first. The drop is bounded by the fence's epoch and the source knows the new route's,
/// so the new instance's data stays.
#[tokio::test]
async fn the_clean_up_keeps_what_a_new_instance_placed_on_the_source_after_the_route_read_wrote() {
    let model = Model::new();
    model.lock().new_instance_on_a_after_cleanup_read = true;
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    let s = model.lock();
    assert!(!s.new_instance_on_a_after_cleanup_read, "the clean-up never read the route");
    assert_eq!(s.violations, Vec::<String>::new());
    let (route, _) = s.route.clone().unwrap();
    assert_eq!(route.replica_set, "a");
    let a = &s.sets["a"];
    assert!(a.epoch == route.epoch, "the new instance's write did not reach the source");
    let &(id, v) = s.acked.last().unwrap();
    assert_eq!(a.docs.get(&id), Some(&format!(r#"{{"_id":{id},"v":{v}}}"#)), "the new instance's write was dropped");
    let record = &s.record.as_ref().unwrap().0;
    assert_eq!((record.step, record.phase), (Step::Done, Phase::Completed));
    let said = record.error.as_deref().unwrap_or_default();
    assert!(said.contains("was kept, not dropped"), "a kept copy not said in the status: {said:?}");
}

#[tokio::test]
async fn a_database_deleted_during_the_switch_ends_the_migration_and_drops_the_target_copy() {
    let model = Model::new();
    model.lock().delete_route_at_finish = true;
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Aborted);
    let s = model.lock();
    assert!(s.route.is_none());
    assert!(s.sets["b"].docs.is_empty(), "the deleted database's copy stayed on the target");
    let record = &s.record.as_ref().unwrap().0;
    assert_eq!(record.phase, Phase::Aborted);
    assert!(record.finished_at_ms.is_some());
    assert!(record.error.as_deref().unwrap().contains("deleted during the switch"), "{:?}", record.error);
}

/// A record's save that fails on the way into `Fence` or `Switch`, then a crash at the next
/// call, then a restart after the hold's deadline: the step's side effect must not have run
/// ahead of the record (the fence sent while etcd says `Hold` made the rollback serve the
/// source at an epoch it refuses; `Finish` while it says `Fence` left the target serving a
/// database no route names, and every retry's `Begin` refused). Rolled back cleanly, then
/// the retry completes.
#[tokio::test]
async fn a_failed_save_into_the_fence_or_the_switch_then_a_crash_after_the_deadline_rolls_back_cleanly() {
    for step in [Step::Fence, Step::Switch] {
        let model = Model::new();
        driver::start(model.as_ref(), &to_b()).await.unwrap();
        model.lock().fail_save_at = Some(step);
        let tuning = tuning();
        tokio::select! {
            r = driver::drive(model.as_ref(), &tuning, DB) => panic!("{step:?}: the driver ended without the crash: {r:?}"),
            () = model.crashed.notified() => {}
        }
        {
            // The restart comes after the hold's deadline.
            let mut s = model.lock();
            assert!(s.fail_save_at.is_none(), "{step:?}: the save never failed");
            let (record, _) = s.record.as_mut().unwrap();
            assert!(record.hold_deadline_ms.is_some(), "{step:?}: crashed before the hold");
            record.hold_deadline_ms = Some(1);
        }
        let (outcome, _) = run_to_end(&model, &tuning).await;
        assert_eq!(outcome, Outcome::Completed, "{step:?}");
        let s = model.lock();
        assert_eq!(s.violations, Vec::<String>::new(), "{step:?}");
        assert_eq!(s.sets["b"].docs, s.expected(), "{step:?}");
        let (record, _) = s.record.clone().unwrap();
        assert_eq!(record.attempt, 2, "{step:?}: the first attempt was rolled back");
    }
}

/// The backups' join across the move (`MigrationRecord::handoff`), recorded with the
/// switch: the source's lineage through the fence (every change of the database there is
/// at or before it), the target's from its checksum marker (every change of the database
/// there, the clients' after the switch, is after it), named as the backup agent names
/// lineages (the model's replica sets have no incarnation: their names).
#[tokio::test]
async fn a_completed_migration_records_the_backups_handoff_from_the_fence_to_the_targets_marker() {
    let model = Model::new();
    driver::start(model.as_ref(), &to_b()).await.unwrap();
    let (outcome, _) = run_to_end(&model, &tuning()).await;
    assert_eq!(outcome, Outcome::Completed);
    let s = model.lock();
    let record = &s.record.as_ref().unwrap().0;
    let h = record.handoff.clone().expect("a handoff is recorded");
    assert_eq!((h.from.as_str(), h.to.as_str()), ("a", "b"));
    assert_eq!(h.from_position, OplogPosition { index: record.fence_index.unwrap(), seq: 0 });
    let at = |e: &nimbus_api::admin::OplogEntry| OplogPosition { index: e.index, seq: e.seq };
    let source: Vec<_> = s.sets["a"].oplog.iter().filter(|e| e.db == DB).map(at).collect();
    assert!(!source.is_empty() && source.iter().all(|p| *p <= h.from_position), "a source change after the fence");
    let target: Vec<_> = s.sets["b"].oplog.iter().filter(|e| e.db == DB).map(at).collect();
    assert!(
        !target.is_empty() && target.iter().all(|p| *p > h.to_position),
        "a target change at or before its marker: {target:?} {h:?}"
    );
}
