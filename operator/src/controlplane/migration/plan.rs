//! The migration's decisions, pure: when to hold, what a failure leads to (retry the
//! step, restart the copy, abort), how long to wait before the next attempt, what a
//! control plane that restarted does at each step, how fast to copy ([`CopyPacer`]), which
//! migrations run. The driver observes, asks here, and acts; these are tested as data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::record::{MigrationRecord, Phase, Step};

/// The knobs of hot migration (`docs/operator.md`, "Hot migration").
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Hold only when the estimated catch-up is shorter than this.
    pub hold_under: Duration,
    /// The catch-up of one attempt (from the end of its copy) gives up after this long
    /// without getting under `hold_under`: the attempt aborts (nothing lost, the source
    /// keeps serving) and is retried after the back-off, when the tenant may write less.
    /// Without it a tenant writing faster than the target applies keeps the migration in
    /// `CatchingUp` for ever, its source's oplog pinned. 10 min: a catch-up that can
    /// succeed drains the lag a copy left (copy time × write rate) at the apply rate minus
    /// the write rate, so after a one-minute copy it needs 10 min only when the target
    /// applies barely 10% faster than the tenant writes; slower than that, a retry at a
    /// quieter moment is the better bet. Persisted with the record (`catchUpStartedMs`):
    /// a control plane that restarts does not start it over. Zero: no budget (waits as
    /// long as it takes).
    pub catch_up_timeout: Duration,
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
    /// The copy's ceiling: it reads at most this many bytes per second from the source,
    /// however idle the machines are (0: no pacing at all, for tests). Below it the copy is
    /// paced by the latency of its own pages ([`CopyPacer`]).
    pub copy_bytes_per_sec: u64,
    /// The copy's floor: however busy the source and the target, the copy goes on at least
    /// this fast, so that it ends (and the oplog it pins is released). 1 MiB/s: one full page
    /// a second, a small share of one core.
    pub copy_min_bytes_per_sec: u64,
    /// A page is slow, a sign that the copy competes with the tenants' requests, when its
    /// round trip exceeds the base latency (the fastest page of the window) by more than
    /// this fraction of the base... (0.5: slow past 1.5 times the base, the bound the
    /// source's other tenants' p99 must keep; a ratio rather than a fixed delay because a
    /// page's cost depends on the machine, its disks and the page size, which a fixed
    /// target cannot know.)
    pub copy_queuing_ratio: f64,
    /// ...and by more than this (a page of a few milliseconds jitters by that much on an
    /// idle machine: scheduling, an fsync).
    pub copy_queuing_min: Duration,
    /// A slow page multiplies the copy's rate by this (0.5: halved, as TCP does on a loss).
    pub copy_backoff: f64,
    /// Otherwise the rate grows by this many bytes per second for each second the copy
    /// runs (after its slow start: doubled each page until the first slow one).
    pub copy_rate_step: u64,
    /// The base latency is the fastest page of this window: long enough to span the
    /// copy's pauses after a cut (the pages that show the source without the copy's load),
    /// short enough to follow a change of the baseline (another leader, collections whose
    /// documents cost more to import, a tenant's lasting load).
    pub copy_base_window: Duration,
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
            hold_under: Duration::from_millis(200),
            catch_up_timeout: Duration::from_secs(600),
            hold_timeout: Duration::from_secs(5),
            retry_first: Duration::from_secs(10),
            retry_max: Duration::from_secs(300),
            max_attempts: 10,
            step_timeout: Duration::from_secs(120),
            step_retry: Duration::from_secs(1),
            copy_bytes_per_sec: 64 << 20,
            copy_min_bytes_per_sec: 1 << 20,
            copy_queuing_ratio: 0.5,
            copy_queuing_min: Duration::from_millis(5),
            copy_backoff: 0.5,
            copy_rate_step: 4 << 20,
            copy_base_window: Duration::from_secs(30),
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

/// When an oplog pin (`PinOplogRequest`) expiring at `expires_ms` (none: not pinned yet)
/// is renewed, at `now_ms`, for `ttl`: the new expiry once half its lifetime is gone, so a
/// holder renews well before it lapses without a Raft entry per call; `None` while it
/// need not be.
pub fn pin_renewal(expires_ms: Option<u64>, now_ms: u64, ttl: Duration) -> Option<u64> {
    let ttl = ttl.as_millis() as u64;
    match expires_ms {
        Some(e) if e > now_ms.saturating_add(ttl / 2) => None,
        _ => Some(now_ms.saturating_add(ttl)),
    }
}

/// The hold starts after an idempotency pass shorter than this (the hold's own pass moves
/// what was written since, so about as much). Not tied to `hold_under`: a busy target's
/// pass takes tens of milliseconds whatever the lag.
pub const HOLD_AFTER_A_PASS_UNDER: Duration = Duration::from_millis(125);

/// Where the catch-up stands after a round, as [`catch_up_next`] reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CatchUpView {
    /// Oplog positions the target is behind the source.
    pub lag: u64,
    /// Positions per second the catch-up advances (measured; 0 or NaN: not yet).
    pub rate_per_sec: f64,
    /// Since the catch-up of this attempt began.
    pub elapsed: Duration,
    /// The lag this driver first saw in the catch-up, and how long ago: the trend the
    /// give-up's message reports (the source gaining or losing). `None`: not known.
    pub first_lag: Option<(u64, Duration)>,
    /// A round before this one was close enough to hold, but the idempotency pass that
    /// must precede the hold took too long (the driver then goes round again): once the
    /// budget is spent, that is a give-up too, or a target whose passes are always slow
    /// would keep the source's oplog pinned for ever.
    pub pass_too_slow: bool,
}

/// What the catch-up does after a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUpNext {
    /// Close enough: hold (after a last idempotency pass, see the driver).
    Hold,
    /// Keep applying the source's oplog.
    Continue,
    /// The budget is spent without getting close enough: abort the attempt, for this
    /// reason.
    GiveUp(String),
}

/// The catch-up's decision after a round: hold when [`should_hold`] says so (checked
/// first, so a caught-up target holds even at the budget's edge), give up once
/// `tuning.catch_up_timeout` has been spent (never with a zero timeout), continue
/// otherwise. The reason names the lag, the applying rate and the lag's trend.
///
/// No give-up on a lag that merely stops shrinking: the lag counts the source replica
/// set's log entries (every tenant's) and moves with its other tenants' writes and the
/// catch-up's page rhythm, so a flat but noisy lag can still dip under the bound; the
/// budget alone bounds the hopeless case.
pub fn catch_up_next(view: &CatchUpView, tuning: &Tuning) -> CatchUpNext {
    let budget = tuning.catch_up_timeout;
    let spent = !budget.is_zero() && view.elapsed >= budget;
    let close = should_hold(view.lag, view.rate_per_sec, tuning.hold_under);
    if close && !(spent && view.pass_too_slow) {
        return CatchUpNext::Hold;
    }
    if !spent {
        return CatchUpNext::Continue;
    }
    if close {
        return CatchUpNext::GiveUp(format!(
            "the catch-up got under {} behind, but the idempotency records' pass before the hold never took \
             under {} ms in {}: the target applies them too slowly",
            human(tuning.hold_under),
            HOLD_AFTER_A_PASS_UNDER.as_millis(),
            human(budget),
        ));
    }
    let applying = if view.rate_per_sec.is_nan() || view.rate_per_sec <= 0.0 {
        "no applying rate measured".to_owned()
    } else {
        format!("applying {} ops/s", thousands(view.rate_per_sec.round() as u64))
    };
    let trend = match view.first_lag {
        Some((first, ago)) if ago.as_secs_f64() > 0.0 => {
            let per_sec = (view.lag as f64 - first as f64) / ago.as_secs_f64();
            let by = thousands(per_sec.abs().round() as u64);
            if per_sec >= 0.5 {
                format!(", the lag growing by {by} ops/s: the tenant writes faster than the target applies")
            } else if per_sec <= -0.5 {
                format!(", the lag shrinking by only {by} ops/s")
            } else {
                ", the lag not shrinking".to_owned()
            }
        }
        _ => String::new(),
    };
    CatchUpNext::GiveUp(format!(
        "the catch-up did not get under {} behind in {}: {} ops behind, {applying}{trend}",
        human(tuning.hold_under),
        human(budget),
        thousands(view.lag),
    ))
}

/// `1240` as `1,240`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration as a person writes it: `10 min`, `6 min 52 s`, `1 h 30 min`, `0.2 s`, `40 ms`
/// (from a minute on, whole seconds are shown as hours, minutes and seconds).
pub fn human(d: Duration) -> String {
    if d >= Duration::from_secs(60) {
        let secs = d.as_secs();
        let parts = [(secs / 3600, "h"), (secs % 3600 / 60, "min"), (secs % 60, "s")];
        let shown: Vec<String> = parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n} {unit}")).collect();
        return shown.join(" ");
    }
    if d >= Duration::from_millis(100) {
        // At most one decimal, none when whole.
        let tenths = (d.as_millis() + 50) / 100;
        return if tenths.is_multiple_of(10) {
            format!("{} s", tenths / 10)
        } else {
            format!("{}.{} s", tenths / 10, tenths % 10)
        };
    }
    format!("{} ms", d.as_millis())
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
    /// The catch-up's budget was spent before it got close enough to hold
    /// ([`catch_up_next`]'s reason).
    CatchUpTooSlow(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transient(m) | Failure::Gone(m) | Failure::Refused(m) | Failure::CatchUpTooSlow(m) => {
                f.write_str(m)
            }
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

/// How many of the latest pages the slowness test looks at: the copy is slowed only when
/// all of them were slow (LEDBAT filters its current delay the same way), so that one slow
/// fsync or compaction does not halve the rate.
const PACER_FILTER: usize = 2;
/// The base latency's window is kept as this many buckets, each with its fastest page:
/// memory stays bounded, and an old minimum is forgotten a bucket at a time.
const PACER_BUCKETS: u32 = 6;

/// The copy's pace, a scavenger (like LEDBAT or TCP Vegas under background transfers): it
/// takes what the source and the target leave idle and yields to their tenants' requests.
///
/// Fed with each page's round trip (the export read on the source plus the import on the
/// target) and size, it keeps a base latency (the fastest full page of a sliding window)
/// and a rate, and answers the pause before the next page:
///
/// - Starts at the floor and doubles the rate at each page (a slow start) until the first
///   slow one.
/// - A page is slow when it (and the one before it) took longer than the base plus the
///   larger of `copy_queuing_ratio` × base and `copy_queuing_min`: the pages then wait
///   behind other work, and so do the tenants' requests (a core, a disk, a Raft log
///   shared with the copy). The rate is multiplied by `copy_backoff`.
/// - Otherwise it grows by `copy_rate_step` per second of copying.
/// - Always within [`copy_min_bytes_per_sec`, `copy_bytes_per_sec`].
///
/// Fed only pages the source cut at `page_bytes` (every page of a pass but its last, which
/// no pause follows): each was about the same work, whatever the bytes the driver counts
/// of it (documents without their keys, idempotency records not expired). A page over
/// `page_bytes` (one large document) is judged per full page. No clock is read here: `now`
/// is any monotonic time (the driver's: since the pass began).
#[derive(Debug, Clone)]
pub struct CopyPacer {
    /// Bytes per second; 0 when unthrottled.
    rate: f64,
    floor: f64,
    ceiling: f64,
    full_page: u64,
    ratio: f64,
    queuing_min: Duration,
    backoff: f64,
    step: f64,
    window: Duration,
    /// `(start, fastest page)` of each bucket of the window, oldest first.
    buckets: VecDeque<(Duration, Duration)>,
    /// The latest judged pages' latencies, at most [`PACER_FILTER`].
    recent: VecDeque<Duration>,
    slow_start: bool,
}

impl CopyPacer {
    /// A pacer at its floor, in slow start. Knobs out of range are brought into it (a
    /// floor of at least 1 byte/s and at most the ceiling, fractions within 0..=1).
    pub fn new(tuning: &Tuning) -> CopyPacer {
        let ceiling = tuning.copy_bytes_per_sec as f64;
        let floor = (tuning.copy_min_bytes_per_sec.max(1) as f64).min(ceiling);
        let fraction = |x: f64, default: f64| if x.is_nan() { default } else { x.clamp(0.0, 1.0) };
        CopyPacer {
            rate: floor,
            floor,
            ceiling,
            full_page: tuning.page_bytes.max(1),
            ratio: if tuning.copy_queuing_ratio.is_nan() { 0.0 } else { tuning.copy_queuing_ratio.max(0.0) },
            queuing_min: tuning.copy_queuing_min,
            backoff: fraction(tuning.copy_backoff, 0.5),
            step: tuning.copy_rate_step as f64,
            window: tuning.copy_base_window,
            buckets: VecDeque::new(),
            recent: VecDeque::new(),
            slow_start: true,
        }
    }

    /// A page of `bytes` (cut by the source at `page_bytes`) took `took` (export plus
    /// import), seen at `now`: the pause before the next page, so that this one's share of
    /// time is `bytes` at the new rate.
    pub fn page(&mut self, now: Duration, took: Duration, bytes: u64) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let before = self.rate;
        let latency = self.per_full_page(took, bytes);
        self.learn_base(now, latency);
        self.recent.push_back(latency);
        while self.recent.len() > PACER_FILTER {
            self.recent.pop_front();
        }
        if self.slow() {
            self.rate = (self.rate * self.backoff).max(self.floor);
            self.slow_start = false;
        } else if self.slow_start {
            self.rate = (self.rate * 2.0).min(self.ceiling);
        } else {
            // The time this page occupied at the rate it was sent at.
            let slot = took.as_secs_f64().max(bytes as f64 / before);
            self.rate = (self.rate + self.step * slot).min(self.ceiling);
        }
        secs(bytes as f64 / self.rate).saturating_sub(took)
    }

    /// Bytes per second now (0: unthrottled), for the logs.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// The fastest full page of the window, if any was seen.
    pub fn base(&self) -> Option<Duration> {
        self.buckets.iter().map(|&(_, fastest)| fastest).min()
    }

    /// The latency a page is judged by: as it is, or per full page for a larger one.
    fn per_full_page(&self, took: Duration, bytes: u64) -> Duration {
        if bytes <= self.full_page {
            return took;
        }
        let nanos = took.as_nanos().saturating_mul(u128::from(self.full_page)) / u128::from(bytes);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).min(took)
    }

    fn learn_base(&mut self, now: Duration, latency: Duration) {
        let bucket = self.window / PACER_BUCKETS;
        while let Some(&(start, _)) = self.buckets.front()
            && (now.saturating_sub(start) >= self.window || self.buckets.len() > PACER_BUCKETS as usize)
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((start, fastest)) if now.saturating_sub(*start) < bucket => *fastest = (*fastest).min(latency),
            _ => self.buckets.push_back((now, latency)),
        }
    }

    /// Whether the latest pages were all slow.
    fn slow(&self) -> bool {
        let (Some(base), Some(&current)) = (self.base(), self.recent.iter().min()) else { return false };
        let queuing = secs(base.as_secs_f64() * self.ratio).max(self.queuing_min);
        current > base.saturating_add(queuing)
    }
}

/// Seconds as a duration: `Duration::MAX` past its range, zero for NaN or negative ones.
fn secs(s: f64) -> Duration {
    if s.is_nan() || s <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
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
