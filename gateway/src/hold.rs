//! A database's requests at this gateway during a migration cutover: which are in flight
//! to a datanode, which are held, and what a request does next with the route it sees.
//!
//! The cutover needs one fact from every gateway: "none of this database's requests is at
//! a datanode, and none will go there until the route changes". A request is counted in
//! flight *before* it reads the route and stays counted until its attempt has ended, so
//! there is no moment where it has decided to send but is not counted yet: once the
//! `Holding` route is in the table, a count of zero is final (see [`Traffic::begin`]).
//!
//! A held request is not in flight and gives its database's in-flight permit back while
//! it waits (`limits::Admission::release`); it takes a place in the database's bounded
//! hold queue instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use nimbus_api::etcd::{Route, RouteState};
use tokio::sync::Notify;

use crate::state::RouteEntry;

/// Held requests at this gateway, all databases together (gauge).
pub const HELD_GAUGE: &str = "nimbus_gateway_held_requests";
/// How long each held request was held, in seconds (histogram).
pub const HOLD_SECONDS: &str = "nimbus_gateway_hold_seconds";
/// Held requests whose own deadline passed before the hold ended: 503 (counter).
pub const HOLD_TIMEOUTS: &str = "nimbus_gateway_hold_timeouts_total";
/// Requests refused because their database's hold queue was full: 503 (counter).
pub const HOLD_QUEUE_FULL: &str = "nimbus_gateway_hold_queue_full_total";

/// One database's requests in flight to datanodes and held at this gateway. It lives as
/// long as the database is known, across rebuilds of its state (a limits change makes a
/// new limiter, never a new count).
#[derive(Debug, Default)]
pub struct Traffic {
    in_flight: AtomicUsize,
    /// Woken when `in_flight` falls to zero while someone waits for it (`watchers`): the
    /// requests of a database nobody holds never touch its lock.
    idle: Notify,
    watchers: AtomicUsize,
    held: AtomicUsize,
}

impl Traffic {
    /// Counts a request in flight until the guard is dropped. Called *before* the request
    /// reads its route: a request that then sees `Serving` (the route table not updated
    /// yet) was counted before the update, so whoever reads the count after the update
    /// (the acknowledgement) sees it; a request that sees `Holding` drops the guard and
    /// never sends.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Returns once no request is in flight (at once when none is).
    pub async fn wait_idle(&self) {
        // Counted before the count is read: a request that then brings it to zero sees a
        // watcher, and wakes it.
        self.watchers.fetch_add(1, Ordering::SeqCst);
        let _watching = Watching(&self.watchers);
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a fall to zero after the read wakes it.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// A place in the hold queue, unless `max` requests are held already.
    pub fn hold(self: &Arc<Self>, max: usize) -> Option<Held> {
        self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (h < max).then_some(h + 1)).ok()?;
        metrics::gauge!(HELD_GAUGE).increment(1.0);
        Some(Held { traffic: self.clone(), since: Instant::now() })
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// A request counted in flight to a datanode.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Traffic);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.watchers.load(Ordering::SeqCst) > 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A waiter for idleness, uncounted however the wait ends.
struct Watching<'a>(&'a AtomicUsize);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A held request's place in the hold queue; dropping it ends the hold and records how
/// long it lasted.
#[derive(Debug)]
pub struct Held {
    traffic: Arc<Traffic>,
    since: Instant,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.traffic.held.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(HELD_GAUGE).decrement(1.0);
        metrics::histogram!(HOLD_SECONDS).record(self.since.elapsed().as_secs_f64());
    }
}

/// What a request does with the route it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send it there.
    Send,
    /// The database is held for a cutover: wait for the route to change, at most until
    /// `until_ms` (the hold's own deadline, when it has one).
    Hold { until_ms: Option<u64> },
    /// Wait for a route this gateway can trust.
    Await(Await),
    /// The database has no route at all.
    NoRoute,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Await {
    /// The gateway lost etcd (its lease may have lapsed): its routes may be out of date.
    NotServing,
    /// A datanode refused the route's epoch (`StaleRoute`): a newer route is coming.
    NewerRoute,
}

/// When this gateway stops holding `route` by its own clock (ms since the Unix epoch), for
/// a route first seen now (`now_ms`) or, as `earlier`, before: `None` when it is not
/// `Holding`, or when its hold has no end (it lasts until the route changes).
///
/// The hold lasts its length (`hold_timeout_ms`) from when this gateway first saw it: a
/// hold is named by its epoch and deadline, so a rebuilt route entry of the same hold keeps
/// its end, and another hold (the same epoch held again after an abort has another
/// deadline) starts anew. The deadline itself is the control plane's clock and is compared
/// with this gateway's only for a route that gives no length (written before there was
/// one): clocks differ, and a gateway ahead by more than the length would never hold, one
/// behind would hold too long.
pub fn hold_until(route: &Route, earlier: Option<&RouteEntry>, now_ms: u64) -> Option<u64> {
    if route.state != RouteState::Holding {
        return None;
    }
    let Some(length) = route.hold_timeout_ms else { return route.hold_deadline_ms };
    let same_hold = earlier.filter(|e| {
        e.state == RouteState::Holding && e.epoch == route.epoch && e.hold_deadline_ms == route.hold_deadline_ms
    });
    match same_hold {
        Some(e) => e.hold_until_ms,
        None => Some(now_ms.saturating_add(length)),
    }
}

/// The next step of a request that needs a route of epoch `min_epoch` at least. A hold
/// whose end has passed ([`hold_until`]) no longer holds: the control plane aborts at its
/// deadline, and should it not, the fenced source answers `StaleRoute` and nothing is lost.
pub fn next_step(serving: bool, route: Option<&RouteEntry>, min_epoch: u64, now_ms: u64) -> Step {
    if !serving {
        return Step::Await(Await::NotServing);
    }
    let Some(route) = route else { return Step::NoRoute };
    if route.state == RouteState::Holding && route.hold_until_ms.is_none_or(|until| now_ms < until) {
        return Step::Hold { until_ms: route.hold_until_ms };
    }
    if route.epoch < min_epoch {
        return Step::Await(Await::NewerRoute);
    }
    Step::Send
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(epoch: u64, state: RouteState, hold_until_ms: Option<u64>) -> RouteEntry {
        RouteEntry {
            replica_set: "rs0".into(),
            epoch,
            epoch_header: http::HeaderValue::from(epoch),
            state,
            hold_deadline_ms: hold_until_ms,
            hold_until_ms,
            members: vec![],
            leader: Arc::default(),
        }
    }

    /// A route as the control plane writes it, held with `deadline` (its clock) and `length`.
    fn written(epoch: u64, deadline: Option<u64>, length: Option<u64>) -> Route {
        Route {
            replica_set: "rs0".into(),
            members: vec![],
            epoch,
            state: RouteState::Holding,
            hold_deadline_ms: deadline,
            hold_timeout_ms: length,
        }
    }

    /// The entry this gateway makes of `r` at `now` (its clock), after `earlier`.
    fn seen(r: &Route, earlier: Option<&RouteEntry>, now: u64) -> RouteEntry {
        RouteEntry { hold_deadline_ms: r.hold_deadline_ms, ..route(r.epoch, r.state, hold_until(r, earlier, now)) }
    }

    #[test]
    fn a_hold_lasts_its_length_from_when_this_gateway_saw_it_whatever_the_clocks_say() {
        // The control plane's clock at 100 s writes a 5 s hold (deadline 105 s).
        let held = written(3, Some(105_000), Some(5_000));
        // This gateway's clock a minute ahead (160 s): the deadline is long past by it.
        let ahead = seen(&held, None, 160_000);
        assert_eq!(next_step(true, Some(&ahead), 0, 160_000), Step::Hold { until_ms: Some(165_000) });
        assert_eq!(next_step(true, Some(&ahead), 0, 164_999), Step::Hold { until_ms: Some(165_000) });
        assert_eq!(next_step(true, Some(&ahead), 0, 165_000), Step::Send);
        // A minute behind (40 s): the deadline is 65 s away by it; held 5 s, not 65.
        let behind = seen(&held, None, 40_000);
        assert_eq!(next_step(true, Some(&behind), 0, 40_000), Step::Hold { until_ms: Some(45_000) });
        assert_eq!(next_step(true, Some(&behind), 0, 45_000), Step::Send);
    }

    #[test]
    fn a_hold_is_timed_from_its_first_sight_and_another_hold_anew() {
        let held = written(3, Some(105_000), Some(5_000));
        let first = seen(&held, None, 200_000);
        // The same hold seen again later (the entry rebuilt): the same end.
        let again = seen(&held, Some(&first), 203_000);
        assert_eq!(again.hold_until_ms, Some(205_000));
        // The same epoch held again after an abort: another deadline, another hold.
        let retry = written(3, Some(120_000), Some(5_000));
        assert_eq!(seen(&retry, Some(&first), 203_000).hold_until_ms, Some(208_000));
        // A new epoch, or a route that was serving before: timed from now.
        assert_eq!(seen(&written(4, Some(105_000), Some(5_000)), Some(&first), 203_000).hold_until_ms, Some(208_000));
        let serving = route(3, RouteState::Serving, None);
        assert_eq!(seen(&held, Some(&serving), 203_000).hold_until_ms, Some(208_000));
    }

    #[test]
    fn a_route_without_the_holds_length_is_held_until_its_deadline_and_one_without_either_until_it_changes() {
        // Written by a control plane older than the length: the deadline, as before.
        let old = seen(&written(3, Some(105_000), None), None, 100_000);
        assert_eq!(next_step(true, Some(&old), 0, 104_999), Step::Hold { until_ms: Some(105_000) });
        assert_eq!(next_step(true, Some(&old), 0, 105_000), Step::Send);
        let endless = seen(&written(3, None, None), None, 100_000);
        assert_eq!(next_step(true, Some(&endless), 0, u64::MAX), Step::Hold { until_ms: None });
        // Serving: nothing to hold, whatever the route still carries.
        let mut serving = written(3, None, Some(5_000));
        serving.state = RouteState::Serving;
        assert_eq!(hold_until(&serving, None, 100_000), None);
    }

    #[test]
    fn a_request_sends_waits_or_is_held_by_what_it_sees() {
        let serving = route(2, RouteState::Serving, None);
        let holding = route(2, RouteState::Holding, Some(1_000));
        assert_eq!(next_step(true, Some(&serving), 0, 500), Step::Send);
        assert_eq!(next_step(true, Some(&serving), 3, 500), Step::Await(Await::NewerRoute));
        assert_eq!(next_step(true, Some(&holding), 0, 500), Step::Hold { until_ms: Some(1_000) });
        // A hold past its deadline holds no more.
        assert_eq!(next_step(true, Some(&holding), 0, 1_000), Step::Send);
        let forever = route(2, RouteState::Holding, None);
        assert_eq!(next_step(true, Some(&forever), 0, u64::MAX), Step::Hold { until_ms: None });
        // A gateway cut off from etcd trusts no route, held or not.
        assert_eq!(next_step(false, Some(&serving), 0, 500), Step::Await(Await::NotServing));
        assert_eq!(next_step(false, Some(&holding), 0, 500), Step::Await(Await::NotServing));
        assert_eq!(next_step(true, None, 0, 500), Step::NoRoute);
    }

    #[test]
    fn the_hold_queue_is_bounded_and_gives_places_back() {
        let t = Arc::new(Traffic::default());
        let a = t.hold(2).unwrap();
        let _b = t.hold(2).unwrap();
        assert!(t.hold(2).is_none());
        drop(a);
        assert_eq!(t.held(), 1);
        assert!(t.hold(2).is_some());
    }

    #[tokio::test]
    async fn idle_is_reached_only_when_the_last_request_in_flight_ends() {
        let t = Arc::new(Traffic::default());
        t.wait_idle().await;
        let a = t.begin();
        let b = t.begin();
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one request is still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(t.in_flight(), 0);
    }
}
