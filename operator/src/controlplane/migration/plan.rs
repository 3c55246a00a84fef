//! The migration's decisions, pure: when to hold, what a failure leads to (retry the
//! step, restart the copy, abort), how long to wait before the next attempt, what a
//! control plane that restarted does at each step, how fast to copy, which migrations
//! run. The driver observes, asks here, and acts; these are tested as data.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::record::{MigrationRecord, Phase, Step};

/// The knobs of hot migration (`docs/operator.md`, "Hot migration").
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Hold only when the estimated catch-up is shorter than this.
    pub hold_under: Duration,
    /// The route's hold deadline: gateways hold the database's requests at most this long,
    /// and the migration aborts when it has not reached the switch by then.
    pub hold_timeout: Duration,
    /// The first retry after an abort; each further one waits twice as long...
    pub retry_first: Duration,
    /// ...up to this.
    pub retry_max: Duration,
    /// Attempts before a migration is left aborted for good.
    pub max_attempts: u32,
    /// Before the hold, a step failing this long without a success aborts the attempt
    /// (a datanode error that does not go away).
    pub step_timeout: Duration,
    /// Pause between two tries of a failing step before the hold.
    pub step_retry: Duration,
    /// The copy reads at most this many bytes per second from the source (its other
    /// tenants keep their latency).
    pub copy_bytes_per_sec: u64,
    /// Bytes of documents per exported page (below the Raft entry bound).
    pub page_bytes: u64,
    /// Oplog changes per catch-up read.
    pub oplog_page: u32,
    /// Migrations run at once.
    pub max_concurrent: usize,
    /// The source's copy is dropped this long after the switch.
    pub cleanup_grace: Duration,
    /// The source's oplog pin lapses this long after it was last renewed.
    pub pin_ttl: Duration,
    /// How often a waiting step looks again (gateway acknowledgements, a caught-up oplog).
    pub poll: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            hold_under: Duration::from_millis(500),
            hold_timeout: Duration::from_secs(5),
            retry_first: Duration::from_secs(10),
            retry_max: Duration::from_secs(300),
            max_attempts: 10,
            step_timeout: Duration::from_secs(120),
            step_retry: Duration::from_secs(1),
            copy_bytes_per_sec: 64 << 20,
            page_bytes: 1 << 20,
            oplog_page: 1_000,
            max_concurrent: 2,
            cleanup_grace: Duration::from_secs(300),
            pin_ttl: Duration::from_secs(3_600),
            poll: Duration::from_millis(20),
        }
    }
}

/// The public phase of a step. A migration waiting for its next attempt shows `Aborted`
/// (with the attempt count and the error) until that attempt starts.
pub fn phase_of(step: Step, retry_pending: bool) -> Phase {
    match step {
        Step::Copy if retry_pending => Phase::Aborted,
        Step::Copy => Phase::Copying,
        Step::CatchUp => Phase::CatchingUp,
        Step::Hold | Step::Fence | Step::Verify => Phase::Holding,
        Step::Switch => Phase::Switching,
        Step::CleanUp => Phase::CleaningUp,
        Step::Done => Phase::Completed,
        Step::Abort | Step::Aborted => Phase::Aborted,
    }
}

/// Whether to hold now: the estimated catch-up (`lag` oplog positions at `rate` per
/// second, as measured while catching up) is under `under`. Caught up (no lag) always
/// holds; a lag with no measured rate never does.
pub fn should_hold(lag: u64, rate_per_sec: f64, under: Duration) -> bool {
    if lag == 0 {
        return true;
    }
    // NaN, zero or negative: no rate measured.
    if rate_per_sec.is_nan() || rate_per_sec <= 0.0 {
        return false;
    }
    (lag as f64 / rate_per_sec) < under.as_secs_f64()
}

/// What went wrong with a step, as the driver classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Might work if tried again: a datanode unreachable or not the leader, etcd busy, a
    /// route changed under a compare-and-swap.
    Transient(String),
    /// The source or the target replica set no longer exists (or the database's route).
    Gone(String),
    /// The source's oplog no longer holds the position the catch-up needs.
    OplogTruncated,
    /// Source and target differ at the fence.
    Mismatch(String),
    /// Not every gateway acknowledged the hold before its deadline.
    HoldTimedOut(String),
    /// A datanode refused the call for good (a bad request, a conflict).
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transient(m) | Failure::Gone(m) | Failure::Refused(m) => f.write_str(m),
            Failure::OplogTruncated => f.write_str("the source's oplog no longer holds what the catch-up needs"),
            Failure::Mismatch(m) => write!(f, "source and target differ at the fence: {m}"),
            Failure::HoldTimedOut(m) => write!(f, "the hold's deadline passed: {m}"),
        }
    }
}

/// What the driver does about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reaction {
    /// Try the same step again after this pause (every step is idempotent).
    Retry(Duration),
    /// Start the copy over (`Begin` again), in the same attempt.
    RestartCopy,
    /// Roll back ([`Step::Abort`]) with this reason.
    Abort(String),
}

/// Pause between tries of a step after the hold started (its deadline is near).
const HOLD_RETRY: Duration = Duration::from_millis(50);
/// Pause between tries of a step that only goes forward.
const FORWARD_RETRY: Duration = Duration::from_secs(1);

/// The reaction to `failure` at `step`, which has been failing since `failing_since_ms`.
/// Once `Switch` was reached nothing aborts: the step is tried again until it works.
/// During the hold, anything but a transient failure before the deadline aborts.
pub fn on_failure(
    step: Step,
    failure: &Failure,
    failing_since_ms: u64,
    hold_deadline_ms: Option<u64>,
    now_ms: u64,
    tuning: &Tuning,
) -> Reaction {
    match step {
        Step::Switch | Step::CleanUp | Step::Abort => Reaction::Retry(FORWARD_RETRY),
        Step::Done | Step::Aborted => Reaction::Retry(FORWARD_RETRY),
        Step::Copy | Step::CatchUp => match failure {
            Failure::OplogTruncated => Reaction::RestartCopy,
            Failure::Transient(m) => {
                if now_ms.saturating_sub(failing_since_ms) >= tuning.step_timeout.as_millis() as u64 {
                    Reaction::Abort(format!("{} kept failing for {:?}: {m}", step.name(), tuning.step_timeout))
                } else {
                    Reaction::Retry(tuning.step_retry)
                }
            }
            other => Reaction::Abort(other.to_string()),
        },
        Step::Hold | Step::Fence | Step::Verify => match failure {
            Failure::Transient(m) if hold_deadline_ms.is_some_and(|d| now_ms >= d) => {
                Reaction::Abort(format!("the hold's deadline passed at the {} step: {m}", step.name()))
            }
            Failure::Transient(_) => Reaction::Retry(HOLD_RETRY),
            other => Reaction::Abort(other.to_string()),
        },
    }
}

/// What a driver does with a record it picks up (after a control-plane restart, or a
/// retry's time come).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Carry out the record's step (every step is idempotent).
    Continue,
    /// Nothing until then (the next attempt, or the clean-up's grace period).
    WaitUntil(u64),
    /// Roll back first: the hold's deadline passed before the switch.
    Abort(String),
    /// Finished: nothing to do.
    Finished,
}

/// The resume rule: a migration before the hold continues where its record stopped; one
/// in the hold (`Hold`, `Fence`, `Verify`) continues while its deadline has not passed and
/// aborts after it; `Switch` and `CleanUp` only go forward; `Abort` finishes rolling back.
pub fn on_resume(record: &MigrationRecord, now_ms: u64) -> Resume {
    if record.step.is_final() {
        return Resume::Finished;
    }
    if let Some(at) = record.next_retry_ms
        && now_ms < at
    {
        return Resume::WaitUntil(at);
    }
    match record.step {
        Step::Hold | Step::Fence | Step::Verify => match record.hold_deadline_ms {
            Some(d) if now_ms >= d => {
                Resume::Abort(format!("the hold's deadline passed at the {} step", record.step.name()))
            }
            _ => Resume::Continue,
        },
        _ => Resume::Continue,
    }
}

/// Whether the hold may go on before `step`'s side effect: `false` once the deadline passed.
pub fn within_hold(hold_deadline_ms: Option<u64>, now_ms: u64) -> bool {
    hold_deadline_ms.is_none_or(|d| now_ms < d)
}

/// The pause before the attempt after attempt `attempt` (1-based) aborted: `first`,
/// doubling each attempt, at most `max`.
pub fn retry_delay(attempt: u32, first: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    first.saturating_mul(1 << doublings).min(max)
}

/// After an abort finished rolling back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAbort {
    /// The next attempt, not before this time (ms).
    RetryAt(u64),
    /// Attempts exhausted: the migration stays aborted until it is started again.
    GiveUp,
}

pub fn after_abort(attempt: u32, now_ms: u64, tuning: &Tuning) -> AfterAbort {
    if attempt >= tuning.max_attempts {
        return AfterAbort::GiveUp;
    }
    AfterAbort::RetryAt(now_ms + retry_delay(attempt, tuning.retry_first, tuning.retry_max).as_millis() as u64)
}

/// The pause the copy takes after sending `bytes` in `elapsed` so that it stays at `rate`
/// bytes per second on average (0: unthrottled).
pub fn copy_pause(bytes: u64, elapsed: Duration, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    due.saturating_sub(elapsed)
}

/// Whether every registered gateway acknowledged the hold `held` (the route as the
/// migration wrote it: `Holding`, its epoch and deadline), and which did not. An
/// acknowledgement counts only if it is a gateway's `HoldAck` for exactly that hold (same
/// epoch and deadline): a late write of an earlier attempt's, at the same epoch, does not.
/// Acknowledgements of gateways no longer registered do not matter.
pub fn hold_acknowledged(
    gateways: &BTreeSet<String>,
    acks: &BTreeMap<String, Vec<u8>>,
    held: &nimbus_api::etcd::Route,
) -> Result<(), Vec<String>> {
    let missing: Vec<String> = gateways
        .iter()
        .filter(|g| {
            !acks
                .get(*g)
                .and_then(|v| serde_json::from_slice::<nimbus_api::etcd::HoldAck>(v).ok())
                .is_some_and(|ack| ack.acknowledges(held))
        })
        .cloned()
        .collect();
    if missing.is_empty() { Ok(()) } else { Err(missing) }
}

/// Which of the migrations waiting to run start now, so that at most `max` run at once:
/// the oldest first (`(db, started_at_ms)` of each waiting one; `running` already run).
pub fn admit(waiting: &[(String, u64)], running: usize, max: usize) -> Vec<String> {
    let mut waiting: Vec<&(String, u64)> = waiting.iter().collect();
    waiting.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    waiting.into_iter().take(max.saturating_sub(running)).map(|(db, _)| db.clone()).collect()
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
