//! The migration's persisted record (`/nimbus/migrations/{db}`) and the status view of it
//! that `playground.json` and `status.migration` show (`API.md` section 3).

use nimbus_api::migration::OplogPosition;

use crate::controlplane::backup::format::Handoff;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a migration is. The order is the protocol's: a step is only ever followed by a
/// later one, or by [`Step::Abort`] (never once [`Step::Switch`] was reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Step {
    /// `Begin` on the target, then the source's export page by page into the target.
    Copy,
    /// The source's oplog from the first page's index applied on the target until the
    /// estimated catch-up is short enough to hold.
    CatchUp,
    /// The route is `Holding`; waiting for every registered gateway's acknowledgement.
    Hold,
    /// The source's route epoch raised to `from_epoch + 1` (persisted *before* the call: an
    /// abort from here on assumes the fence may be in force).
    Fence,
    /// The oplog applied through the fence index, the idempotency records moved, checksum
    /// markers compared on both sides.
    Verify,
    /// `Finish` on the target, then the route switched in one transaction. Persisted before
    /// `Finish` is sent: from here on the migration only goes forward.
    Switch,
    /// After the grace period: the source's copy dropped, its oplog unpinned.
    CleanUp,
    /// Completed.
    Done,
    /// Rolling back: the route back to the source (`Serving`), the target's import dropped,
    /// the oplog unpinned; then a retry is scheduled, or [`Step::Aborted`].
    Abort,
    /// Aborted for good (attempts exhausted): the database serves from the source.
    Aborted,
}

impl Step {
    /// The step's name in failpoints and logs.
    pub fn name(self) -> &'static str {
        match self {
            Step::Copy => "copy",
            Step::CatchUp => "catchup",
            Step::Hold => "hold",
            Step::Fence => "fence",
            Step::Verify => "verify",
            Step::Switch => "switch",
            Step::CleanUp => "cleanup",
            Step::Done => "done",
            Step::Abort => "abort",
            Step::Aborted => "aborted",
        }
    }

    /// Nothing more will happen to the migration.
    pub fn is_final(self) -> bool {
        matches!(self, Step::Done | Step::Aborted)
    }
}

/// The public phase of a migration (`API.md` section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Copying,
    CatchingUp,
    Holding,
    Switching,
    CleaningUp,
    Completed,
    Aborted,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One database's migration as persisted in etcd. Every step is idempotent and the record
/// is written (a compare-and-swap on its revision) after each, so a control plane that
/// restarts resumes from it (see `plan::on_resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    /// Names this migration on the target (`ImportRequest::migration`) and the source's
    /// oplog pin; the same for every attempt (`Begin` drops an earlier attempt's import).
    pub id: String,
    pub db: String,
    /// Namespace of both replica sets (empty in the playground).
    #[serde(default)]
    pub namespace: String,
    pub from_replica_set: String,
    pub to_replica_set: String,
    /// The route's epoch on the source when this attempt started.
    pub from_epoch: u64,
    pub step: Step,
    pub phase: Phase,
    /// Starts at 1; an abort followed by a retry adds one.
    pub attempt: u32,
    pub started_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub documents_copied: u64,
    #[serde(default)]
    pub bytes_copied: u64,
    #[serde(default)]
    pub lag_ops: u64,
    /// How long the route was held, set at the switch.
    #[serde(default)]
    pub hold_ms: Option<u64>,
    /// Why the last attempt aborted, or what the current step keeps failing on.
    #[serde(default)]
    pub error: Option<String>,
    /// The export's resume point (the previous page's `next`).
    #[serde(default)]
    pub copy_cursor: Option<String>,
    /// The applied index of the first page's snapshot: the oplog is applied after it.
    #[serde(default)]
    pub first_page_index: Option<u64>,
    /// How far the target has applied the source's oplog.
    #[serde(default)]
    pub oplog_position: Option<OplogPosition>,
    /// When this attempt's catch-up began (the control plane's clock, ms): its budget
    /// (`Tuning::catch_up_timeout`) counts from here, across control-plane restarts. A
    /// record from before the budget has none: its catch-up counts from its next round.
    #[serde(default)]
    pub catch_up_started_ms: Option<u64>,
    /// When the source's oplog pin lapses unless renewed (the source's clock).
    #[serde(default)]
    pub pin_expires_ms: Option<u64>,
    /// The fence entry's index on the source: the final index.
    #[serde(default)]
    pub fence_index: Option<u64>,
    /// Idempotency records: every one written before this replica-set clock time (ms) is
    /// on the target already; the ones from it on are copied again at the next pass (and
    /// last after the fence). `None` before the first pass.
    #[serde(default)]
    pub idempotency_since_ms: Option<u64>,
    #[serde(default)]
    pub hold_started_ms: Option<u64>,
    /// The route's hold deadline: past it, the migration aborts unless it reached `Switch`.
    #[serde(default)]
    pub hold_deadline_ms: Option<u64>,
    /// The step an abort came from (decides the epoch the route goes back with).
    #[serde(default)]
    pub aborted_from: Option<Step>,
    /// Not before this time: the next attempt after an abort, or the clean-up after the
    /// grace period.
    #[serde(default)]
    pub next_retry_ms: Option<u64>,
    /// Cancelled: rolls back and is not retried.
    #[serde(default)]
    pub cancelled: bool,
    /// The backups' join across this move, set by the verification (persisted with
    /// `Switch`): the source's lineage through the fence, the target's from its checksum
    /// marker, where the migration found both states equal. The backup archiver reads it
    /// once the route names the target, archives the source's lineage through it and goes
    /// on in the target's without a full (`backup::agent`, `docs/design/0004-backup.md`).
    /// `None` from an older driver, or when the replica sets' lineages could not be read:
    /// the archiver then takes a full on arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
}

impl MigrationRecord {
    /// A new migration of `db` from `from` (at route epoch `from_epoch`) to `to`.
    pub fn new(
        id: String,
        db: &str,
        namespace: &str,
        from: &str,
        to: &str,
        from_epoch: u64,
        now_ms: u64,
    ) -> MigrationRecord {
        MigrationRecord {
            id,
            db: db.to_owned(),
            namespace: namespace.to_owned(),
            from_replica_set: from.to_owned(),
            to_replica_set: to.to_owned(),
            from_epoch,
            step: Step::Copy,
            phase: Phase::Copying,
            attempt: 1,
            started_at_ms: now_ms,
            finished_at_ms: None,
            documents_copied: 0,
            bytes_copied: 0,
            lag_ops: 0,
            hold_ms: None,
            error: None,
            copy_cursor: None,
            first_page_index: None,
            oplog_position: None,
            catch_up_started_ms: None,
            pin_expires_ms: None,
            fence_index: None,
            idempotency_since_ms: None,
            hold_started_ms: None,
            hold_deadline_ms: None,
            aborted_from: None,
            next_retry_ms: None,
            cancelled: false,
            handoff: None,
        }
    }

    /// Moves to `step`, keeping the public phase in line.
    pub fn set_step(&mut self, step: Step) {
        self.step = step;
        self.phase = super::plan::phase_of(step, self.next_retry_ms.is_some());
    }

    /// The attempt's progress forgotten: the next copy starts from `Begin` (an oplog
    /// truncated under the catch-up, or a retry after an abort).
    pub fn restart_copy(&mut self) {
        self.copy_cursor = None;
        self.first_page_index = None;
        self.oplog_position = None;
        self.catch_up_started_ms = None;
        self.fence_index = None;
        self.idempotency_since_ms = None;
        self.hold_started_ms = None;
        self.hold_deadline_ms = None;
        self.documents_copied = 0;
        self.bytes_copied = 0;
        self.lag_ops = 0;
        self.set_step(Step::Copy);
    }

    /// The view `playground.json` and `status.migration` show, its strings held to the
    /// bounds its schema declares (the CRD's CEL cost estimate relies on them, so the API
    /// server must never be sent a longer one).
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus {
            phase: self.phase,
            from_replica_set: bounded(&self.from_replica_set, MAX_REPLICA_SET_NAME),
            to_replica_set: bounded(&self.to_replica_set, MAX_REPLICA_SET_NAME),
            started_at: bounded(&rfc3339(self.started_at_ms), MAX_TIMESTAMP),
            finished_at: self.finished_at_ms.map(|ms| bounded(&rfc3339(ms), MAX_TIMESTAMP)),
            documents_copied: self.documents_copied,
            bytes_copied: self.bytes_copied,
            lag_ops: self.lag_ops,
            hold_ms: self.hold_ms,
            attempt: self.attempt,
            error: self.error.as_deref().map(|e| bounded(e, MAX_ERROR)),
        }
    }
}

/// Longest replica-set name a status shows (a DNS label).
pub const MAX_REPLICA_SET_NAME: u32 = 63;
/// Longest RFC 3339 time a status shows.
pub const MAX_TIMESTAMP: u32 = 40;
/// Longest error a status shows (a longer one is cut, ending in `…`).
pub const MAX_ERROR: u32 = 1024;

/// A migration as `API.md` section 3 shows it: `playground.json`'s `migration` of an
/// instance, and `status.migration` of a `DatabaseInstance` (its schema, bounds included,
/// is the CRD's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// `Copying`, `CatchingUp`, `Holding`, `Switching`, `CleaningUp`, `Completed` or
    /// `Aborted` (also while the next attempt waits: `finishedAt` is unset then).
    pub phase: Phase,
    /// The replica set the database moves from.
    #[schemars(length(max = MAX_REPLICA_SET_NAME))]
    pub from_replica_set: String,
    /// The replica set the database moves to.
    #[schemars(length(max = MAX_REPLICA_SET_NAME))]
    pub to_replica_set: String,
    /// When the migration started (RFC 3339).
    #[schemars(length(max = MAX_TIMESTAMP))]
    pub started_at: String,
    /// When it completed or was given up (RFC 3339); null while it runs.
    // Written as `null` (a merge patch then removes the key): the CRD's rule refusing a
    // pool change while a migration runs reads its absence.
    #[schemars(length(max = MAX_TIMESTAMP))]
    pub finished_at: Option<String>,
    /// Documents copied by this attempt.
    pub documents_copied: u64,
    /// Bytes of documents copied by this attempt.
    pub bytes_copied: u64,
    /// Oplog changes the target is behind the source (an estimate).
    pub lag_ops: u64,
    /// How long gateways held the database's requests at the cutover; null before.
    pub hold_ms: Option<u64>,
    /// Starts at 1; each retry after an abort adds one.
    pub attempt: u32,
    /// Why the last attempt aborted, or what the current step keeps failing on.
    #[schemars(length(max = MAX_ERROR))]
    pub error: Option<String>,
}

/// At most `max` bytes of `s`, cut at a character boundary (ending in `…` when cut).
fn bounded(s: &str, max: u32) -> String {
    let max = max as usize;
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64).map(|t| t.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_has_exactly_the_fields_of_the_api() {
        let mut r = MigrationRecord::new("m1".into(), "shop", "", "rs-a", "rs-b", 7, 1_700_000_000_000);
        r.documents_copied = 3;
        let v = serde_json::to_value(r.status()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attempt",
                "bytesCopied",
                "documentsCopied",
                "error",
                "finishedAt",
                "fromReplicaSet",
                "holdMs",
                "lagOps",
                "phase",
                "startedAt",
                "toReplicaSet"
            ]
        );
        assert_eq!(v["phase"], "Copying");
        assert_eq!(v["startedAt"], "2023-11-14T22:13:20Z");
        assert_eq!(v["finishedAt"], serde_json::Value::Null);
        assert_eq!(v["holdMs"], serde_json::Value::Null);
    }

    #[test]
    fn the_status_holds_its_strings_to_the_schema_bounds() {
        let long = "r".repeat(100);
        let mut r = MigrationRecord::new("m1".into(), "shop", "", &long, "rs-b", 7, 5);
        r.error = Some("é".repeat(2000));
        let s = r.status();
        assert_eq!(s.from_replica_set.len(), MAX_REPLICA_SET_NAME as usize, "60 bytes kept, then `…`");
        assert!(s.from_replica_set.ends_with('…'));
        assert_eq!(s.to_replica_set, "rs-b", "a short one is kept whole");
        let error = s.error.unwrap();
        assert!(error.len() <= MAX_ERROR as usize && error.ends_with('…'), "{}", error.len());
        assert_eq!(bounded("abcdef", 4), "a…");
        assert_eq!(bounded("abc", 4), "abc");
    }

    #[test]
    fn records_round_trip_and_tolerate_missing_progress_fields() {
        let r = MigrationRecord::new("m1".into(), "shop", "ns", "rs-a", "rs-b", 7, 5);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<MigrationRecord>(&text).unwrap(), r);
        let minimal = r#"{"id":"m","db":"d","fromReplicaSet":"a","toReplicaSet":"b","fromEpoch":1,
            "step":"Hold","phase":"Holding","attempt":2,"startedAtMs":9}"#;
        let m: MigrationRecord = serde_json::from_str(minimal).unwrap();
        assert_eq!((m.step, m.attempt, m.hold_deadline_ms), (Step::Hold, 2, None));
        // A catch-up recorded before its budget existed: no start, counted from now on.
        let older = r#"{"id":"m","db":"d","fromReplicaSet":"a","toReplicaSet":"b","fromEpoch":1,
            "step":"CatchUp","phase":"CatchingUp","attempt":1,"startedAtMs":9,"lagOps":12}"#;
        let m: MigrationRecord = serde_json::from_str(older).unwrap();
        assert_eq!((m.step, m.lag_ops, m.catch_up_started_ms), (Step::CatchUp, 12, None));
        let mut started = r.clone();
        started.catch_up_started_ms = Some(42);
        let v = serde_json::to_value(&started).unwrap();
        assert_eq!(v["catchUpStartedMs"], 42);
        started.restart_copy();
        assert_eq!(started.catch_up_started_ms, None, "a new copy gets a new catch-up budget");
    }
}
