//! Per-database limits: a QPS limit with a burst (GCRA token bucket), a bound on requests
//! in flight, a bound on client connections, and a memory budget (see `budget`). A request over the QPS limit waits in a
//! bounded queue for a bounded time, then gets 429 `RateLimited` with `Retry-After`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use nimbus_api::etcd::Limits;
use nimbus_api::{ApiError, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::budget::Budget;

/// The limiter of one database.
#[derive(Debug)]
pub struct TenantLimiter {
    pub limits: Limits,
    /// Bytes of this database's request bodies held at this gateway.
    pub memory: Budget,
    /// Bytes of this database's answers held: its share of the answers' pool, so that no
    /// database's answers (large finds read slowly, say) crowd out the others'.
    pub answers: Budget,
    rate: DefaultDirectRateLimiter,
    in_flight: Arc<Semaphore>,
    waiting: AtomicUsize,
    connections: AtomicU32,
}

/// A request's right to run; dropping it frees the in-flight slot.
///
/// A request held for a migration cutover gives its slot back ([`Admission::release`]) and
/// takes one again when the hold ends ([`Admission::reacquire`]): a held request is not at
/// a datanode, and a tenant's held requests must not block the tenant's other requests
/// from being admitted (and held in turn, or answered once the hold ends).
#[derive(Debug)]
pub struct Admission {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Semaphore>,
}

impl Admission {
    /// Whether the request holds its in-flight slot.
    pub fn holds_slot(&self) -> bool {
        self.permit.is_some()
    }

    /// Gives the in-flight slot back while the request waits.
    pub fn release(&mut self) {
        self.permit = None;
    }

    /// Takes an in-flight slot again, waiting until `deadline` at most; false if none came.
    ///
    /// The slots are handed out first come, first served (tokio's semaphore is fair): the
    /// requests released by a hold queue up behind requests already waiting and ahead of
    /// those arriving later, and never more than `max_in_flight` of the tenant's requests
    /// are at datanodes at once, however many were held. They do not pay the rate limit a
    /// second time: they were admitted by it when they arrived, so what a hold releases at
    /// once is at most what the tenant's rate admitted during it.
    pub async fn reacquire(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.permit.is_some() {
            return true;
        }
        match tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => {
                self.permit = Some(p);
                true
            }
            _ => false,
        }
    }
}

/// A place in a database's rate queue, given back on drop.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(waiting: &'a AtomicUsize) -> Queued<'a> {
        waiting.fetch_add(1, Ordering::Relaxed);
        Queued(waiting)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn rate_limited(retry_after: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        format!("over this database's request rate; retry in {} ms", retry_after.as_millis().max(1)),
    )
}

impl TenantLimiter {
    pub fn new(limits: Limits, memory_bytes: usize, answer_bytes: usize) -> TenantLimiter {
        let qps = NonZeroU32::new(limits.qps.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        TenantLimiter {
            rate: RateLimiter::direct(Quota::per_second(qps).allow_burst(burst)),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1) as usize)),
            waiting: AtomicUsize::new(0),
            connections: AtomicU32::new(0),
            memory: Budget::new(memory_bytes),
            answers: Budget::new(answer_bytes),
            limits,
        }
    }

    /// Most requests that may wait for a rate slot at once: what the rate frees in the
    /// longest wait allowed, so nobody queues for a slot that cannot come in time.
    fn max_waiting(&self, max_wait: Duration) -> usize {
        ((self.limits.qps as f64 * max_wait.as_secs_f64()).ceil() as usize).max(1)
    }

    /// Admits a request: a rate slot (waiting at most `max_wait`), then an in-flight slot.
    pub async fn admit(&self, max_wait: Duration) -> Result<Admission, ApiError> {
        if let Err(not_until) = self.rate.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            if wait > max_wait || self.waiting.load(Ordering::Relaxed) >= self.max_waiting(max_wait) {
                return Err(rate_limited(wait.max(Duration::from_millis(1))));
            }
            // Counted while waiting, and uncounted however the wait ends: a request whose
            // client goes away (its future dropped) must not hold a queue place for good.
            let _queued = Queued::enter(&self.waiting);
            let got = tokio::time::timeout(max_wait, self.rate.until_ready()).await;
            if got.is_err() {
                return Err(rate_limited(max_wait));
            }
        }
        match tokio::time::timeout(max_wait, self.in_flight.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Admission { permit: Some(permit), slots: self.in_flight.clone() }),
            _ => Err(ApiError::new(ErrorCode::RateLimited, "too many requests in flight for this database")),
        }
    }

    /// Counts a new client connection; false when the database is at its limit.
    pub fn try_connect(&self) -> bool {
        let max = self.limits.max_connections.max(1);
        self.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c < max).then_some(c + 1)).is_ok()
    }

    pub fn disconnect(&self) {
        let _ = self.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some(c.saturating_sub(1)));
    }

    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_api::etcd::Tier;

    fn limits(qps: u32, burst: u32, in_flight: u32, conns: u32) -> Limits {
        Limits { tier: Tier::Free, qps, burst, max_connections: conns, max_in_flight: in_flight }
    }

    #[tokio::test]
    async fn the_burst_passes_then_requests_wait_or_are_refused() {
        let l = TenantLimiter::new(limits(10, 3, 100, 10), 1 << 20, 1 << 20);
        for _ in 0..3 {
            l.admit(Duration::ZERO).await.unwrap();
        }
        // Over the burst with no time to wait: 429.
        assert_eq!(l.admit(Duration::ZERO).await.err().unwrap().code, ErrorCode::RateLimited);
        // With time to wait (one slot every 100 ms), the request is admitted late.
        let started = tokio::time::Instant::now();
        l.admit(Duration::from_millis(500)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn in_flight_requests_are_bounded() {
        let l = TenantLimiter::new(limits(1000, 1000, 2, 10), 1 << 20, 1 << 20);
        let a = l.admit(Duration::ZERO).await.unwrap();
        let _b = l.admit(Duration::ZERO).await.unwrap();
        assert!(l.admit(Duration::from_millis(10)).await.is_err());
        drop(a);
        assert!(l.admit(Duration::from_millis(10)).await.is_ok());
    }

    #[tokio::test]
    async fn a_released_slot_serves_another_request_and_is_taken_back_in_turn() {
        let l = TenantLimiter::new(limits(1000, 1000, 1, 10), 1 << 20, 1 << 20);
        let mut held = l.admit(Duration::ZERO).await.unwrap();
        held.release();
        assert!(!held.holds_slot());
        // While it is held, another request of the tenant is admitted.
        let other = l.admit(Duration::ZERO).await.unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(!held.reacquire(soon).await, "the only slot is taken");
        drop(other);
        assert!(held.reacquire(tokio::time::Instant::now() + Duration::from_secs(1)).await);
        assert!(held.holds_slot());
        assert!(l.admit(Duration::from_millis(10)).await.is_err());
    }

    #[tokio::test]
    async fn a_request_dropped_while_queued_gives_its_place_back() {
        let l = TenantLimiter::new(limits(1, 1, 100, 10), 1 << 20, 1 << 20);
        l.admit(Duration::ZERO).await.unwrap();
        // Waiting for the next slot (a second away), then dropped: a client that went away.
        let waiting = tokio::time::timeout(Duration::from_millis(20), l.admit(Duration::from_secs(2))).await;
        assert!(waiting.is_err());
        assert_eq!(l.waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn connections_are_bounded() {
        let l = TenantLimiter::new(limits(1, 1, 1, 2), 1 << 20, 1 << 20);
        assert!(l.try_connect());
        assert!(l.try_connect());
        assert!(!l.try_connect());
        l.disconnect();
        assert!(l.try_connect());
        assert_eq!(l.connections(), 2);
    }
}
