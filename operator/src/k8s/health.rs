//! What the operator's `/readyz` means, and what `/healthz` does not.
//!
//! `/healthz` answers 200 while the process serves HTTP (liveness: a restart would not help
//! otherwise). `/readyz` answers 200 only when this replica can do its work:
//!
//! - the leader-election Lease was read (the Kubernetes API answers);
//! - when leading, every watch of the controllers has listed its objects at least once
//!   (a controller acting on an empty cache would act on nothing, or on the wrong thing);
//!   a follower runs no watches and is ready to take over as soon as the first holds;
//! - etcd answered the latest check, a linearizable read made every
//!   [`ETCD_CHECK_INTERVAL`] with a [`ETCD_CHECK_TIMEOUT`] deadline, and that check is
//!   recent (a stuck checker is no evidence).
//!
//! Otherwise it answers 503 with a sentence saying what is not ready. The state is kept
//! here, apart from the I/O that feeds it, so that [`Health::readiness`] is tested as data.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Where `/metrics`, `/healthz` and `/readyz` are served unless told otherwise (the chart's
/// `metrics` port).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:8090";

/// How often etcd is asked.
pub const ETCD_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long one check may take (connecting included).
pub const ETCD_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A check older than this (three intervals and a timeout) no longer counts.
pub const ETCD_CHECK_STALE: Duration = Duration::from_secs(8);

/// The leader-election role of this replica, as far as readiness cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Election {
    /// The Lease has not been read yet.
    Starting,
    /// Another replica holds the Lease; this one stands by.
    Following,
    /// This replica holds the Lease and runs the controllers.
    Leading,
}

/// The latest etcd check.
#[derive(Debug, Clone)]
struct EtcdCheck {
    at: Instant,
    /// `None` when etcd answered, else why not.
    error: Option<String>,
}

#[derive(Debug)]
struct State {
    election: Election,
    /// The controllers' watches, by resource, and whether each has listed once.
    watches: Vec<(&'static str, bool)>,
    etcd: Option<EtcdCheck>,
}

/// The operator's readiness, shared by the probe handler and what it observes.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

impl Default for Health {
    fn default() -> Self {
        Health { state: Mutex::new(State { election: Election::Starting, watches: Vec::new(), etcd: None }) }
    }
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data, written whole by each setter: a panic elsewhere while
        // holding the lock leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Lease was read and another replica holds it.
    pub fn following(&self) {
        self.state().election = Election::Following;
    }

    /// This replica holds the Lease and starts the controllers, whose watches are `watches`.
    pub fn leading(&self, watches: &[&'static str]) {
        let mut s = self.state();
        s.election = Election::Leading;
        s.watches = watches.iter().map(|w| (*w, false)).collect();
    }

    /// The watch of `resource` listed its objects.
    pub fn watch_synced(&self, resource: &str) {
        for (w, synced) in self.state().watches.iter_mut() {
            if *w == resource {
                *synced = true;
            }
        }
    }

    /// The outcome of an etcd check made at `at`.
    pub fn etcd_checked(&self, at: Instant, result: Result<(), String>) {
        self.state().etcd = Some(EtcdCheck { at, error: result.err() });
    }

    /// Ready at `now`, or a sentence saying what is not.
    pub fn readiness(&self, now: Instant) -> Result<(), String> {
        let s = self.state();
        let mut not_ready = Vec::new();
        match s.election {
            Election::Starting => not_ready.push("the leader-election Lease has not been read yet".to_string()),
            Election::Following => {}
            Election::Leading => {
                let pending: Vec<&str> = s.watches.iter().filter(|(_, synced)| !synced).map(|(w, _)| *w).collect();
                if !pending.is_empty() {
                    not_ready.push(format!("the watches of {} have not listed their objects yet", pending.join(", ")));
                }
            }
        }
        match &s.etcd {
            None => not_ready.push("etcd has not been checked yet".to_string()),
            Some(c) if now.saturating_duration_since(c.at) > ETCD_CHECK_STALE => {
                not_ready.push(format!("etcd was last checked {} s ago", now.saturating_duration_since(c.at).as_secs()))
            }
            Some(EtcdCheck { error: Some(e), .. }) => not_ready.push(format!("etcd is unreachable ({e})")),
            Some(_) => {}
        }
        if not_ready.is_empty() { Ok(()) } else { Err(format!("not ready: {}", not_ready.join("; "))) }
    }

    /// The answer of `/readyz`: 200 with what was checked, or 503 with what is not ready.
    pub fn readyz(&self) -> Response {
        match self.readiness(Instant::now()) {
            Ok(()) => {
                let role = if self.state().election == Election::Leading { "leading" } else { "standing by" };
                (StatusCode::OK, format!("ready: {role}, watches synced, etcd reachable\n")).into_response()
            }
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
        }
    }
}

/// Checks etcd every [`ETCD_CHECK_INTERVAL`] for as long as the process runs: a
/// linearizable read of one key in the operator's own range (its rights cover it; the
/// answer needs etcd's quorum), connecting again whenever a check fails.
pub async fn check_etcd_forever(health: Arc<Health>, etcd: nimbus_net::EtcdArgs) {
    let mut client: Option<etcd_client::Client> = None;
    let mut ticks = tokio::time::interval(ETCD_CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let result = match tokio::time::timeout(ETCD_CHECK_TIMEOUT, check_etcd(&mut client, &etcd)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", ETCD_CHECK_TIMEOUT.as_millis())),
        };
        if result.is_err() {
            client = None;
        }
        if let Err(e) = &result {
            tracing::debug!(error = %e, "etcd check failed");
        }
        health.etcd_checked(started, result);
    }
}

async fn check_etcd(client: &mut Option<etcd_client::Client>, etcd: &nimbus_net::EtcdArgs) -> Result<(), String> {
    if client.is_none() {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(ETCD_CHECK_TIMEOUT)
            .with_timeout(ETCD_CHECK_TIMEOUT);
        *client = Some(etcd.connect(opts).await.map_err(|e| e.to_string())?);
    }
    let Some(c) = client.as_mut() else { return Err("no etcd client".into()) };
    c.kv_client().get(nimbus_api::etcd::PREFIX, None).await.map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_etcd(h: &Health, at: Instant) {
        h.etcd_checked(at, Ok(()));
    }

    #[test]
    fn a_replica_that_has_not_read_the_lease_is_not_ready() {
        let h = Health::default();
        let now = Instant::now();
        ready_etcd(&h, now);
        let why = h.readiness(now).unwrap_err();
        assert!(why.contains("Lease has not been read"), "{why}");
    }

    #[test]
    fn nothing_checked_yet_names_every_missing_piece() {
        let why = Health::default().readiness(Instant::now()).unwrap_err();
        assert!(why.contains("Lease") && why.contains("etcd has not been checked"), "{why}");
    }

    #[test]
    fn a_follower_with_etcd_reachable_is_ready_to_take_over() {
        let h = Health::default();
        let now = Instant::now();
        h.following();
        ready_etcd(&h, now);
        assert_eq!(h.readiness(now), Ok(()));
    }

    #[test]
    fn a_leader_is_ready_only_once_every_watch_has_listed() {
        let h = Health::default();
        let now = Instant::now();
        ready_etcd(&h, now);
        h.leading(&["databaseinstances", "resourcepools"]);
        let why = h.readiness(now).unwrap_err();
        assert!(why.contains("databaseinstances, resourcepools"), "{why}");
        h.watch_synced("resourcepools");
        let why = h.readiness(now).unwrap_err();
        assert!(why.contains("databaseinstances") && !why.contains("resourcepools"), "{why}");
        h.watch_synced("databaseinstances");
        assert_eq!(h.readiness(now), Ok(()));
    }

    #[test]
    fn etcd_failing_its_latest_check_makes_the_operator_unready_with_the_reason() {
        let h = Health::default();
        let t0 = Instant::now();
        h.following();
        ready_etcd(&h, t0);
        h.etcd_checked(t0 + ETCD_CHECK_INTERVAL, Err("connection refused".into()));
        let why = h.readiness(t0 + ETCD_CHECK_INTERVAL).unwrap_err();
        assert!(why.contains("etcd is unreachable (connection refused)"), "{why}");
        ready_etcd(&h, t0 + 2 * ETCD_CHECK_INTERVAL);
        assert_eq!(h.readiness(t0 + 2 * ETCD_CHECK_INTERVAL), Ok(()));
    }

    #[test]
    fn a_stale_etcd_check_does_not_count() {
        let h = Health::default();
        let t0 = Instant::now();
        h.following();
        ready_etcd(&h, t0);
        assert_eq!(h.readiness(t0 + ETCD_CHECK_STALE), Ok(()));
        let why = h.readiness(t0 + ETCD_CHECK_STALE + Duration::from_secs(1)).unwrap_err();
        assert!(why.contains("etcd was last checked 9 s ago"), "{why}");
    }

    #[tokio::test]
    async fn readyz_answers_503_with_the_sentence_then_200() {
        let h = Health::default();
        let resp = h.readyz();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        h.following();
        ready_etcd(&h, Instant::now());
        assert_eq!(h.readyz().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn the_etcd_check_reports_an_unreachable_etcd() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap();
        let args = nimbus_net::EtcdArgs::plain(&[format!("http://127.0.0.1:{port}")]);
        let mut client = None;
        let r = tokio::time::timeout(ETCD_CHECK_TIMEOUT * 2, check_etcd(&mut client, &args)).await;
        assert!(matches!(r, Ok(Err(_)) | Err(_)), "an etcd that is not there cannot answer: {r:?}");
    }
}
