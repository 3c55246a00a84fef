//! Forwarding a request to the leader of the replica set holding its database: follows
//! `NotLeader` hints, moves on from members that do not answer, waits out a migration hold,
//! and retries until the request's deadline. Writes always carry an idempotency key, so a
//! retry never applies a write twice.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nimbus_api::data::{IDEMPOTENCY_KEY_HEADER, ROUTE_EPOCH_HEADER};
use nimbus_api::etcd::{Route, RouteState};
use nimbus_api::{ApiError, ErrorCode};
use reqwest::Method;

use crate::state::{Gateway, now_ms};

/// A request as it goes to a datanode.
pub struct Upstream {
    pub method: Method,
    /// Path and query, identical on the datanode's data API.
    pub path: String,
    pub body: Option<Bytes>,
    pub idempotency_key: Option<String>,
}

/// The datanode's answer, passed to the client as is.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    /// Documents a `find` returned (the datanode's `x-nimbus-returned` header).
    pub returned: u64,
}

fn unavailable(why: &str) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{why}; safe to retry"))
}

impl Gateway {
    /// Waits while the database is held for a cutover (until the route changes or the hold's
    /// deadline or ours passes) and returns the route to use.
    async fn serving_route(&self, db: &str, deadline: Instant) -> Result<Route, ApiError> {
        let mut changes = self.routes_version.subscribe();
        loop {
            let route = self.route(db).ok_or_else(|| unavailable(&format!("database {db} has no route")))?;
            let held = route.state == RouteState::Holding && route.hold_deadline_ms.is_none_or(|d| now_ms() < d);
            if !held {
                return Ok(route);
            }
            let hold_left = route.hold_deadline_ms.map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            let ours_left = deadline.saturating_duration_since(Instant::now());
            if ours_left.is_zero() {
                return Err(unavailable("the database is being moved"));
            }
            let wait = hold_left.map_or(ours_left, |h| h.min(ours_left));
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }

    /// Sends `req` for database `db` until some member answers it or the deadline passes.
    pub async fn forward(&self, db: &str, req: Upstream) -> Result<Answer, ApiError> {
        let deadline = Instant::now() + self.config.deadline();
        let mut backoff = Duration::from_millis(5);
        let mut rotation = 0usize;
        let mut hinted: Option<String> = None;
        loop {
            let route = self.serving_route(db, deadline).await?;
            if route.members.is_empty() {
                return Err(unavailable("the database's replica set has no members"));
            }
            let target = hinted
                .take()
                .filter(|h| route.members.iter().any(|m| &m.data_addr == h))
                .or_else(|| {
                    self.cached_leader(&route.replica_set).filter(|l| route.members.iter().any(|m| &m.data_addr == l))
                })
                .unwrap_or_else(|| route.members[rotation % route.members.len()].data_addr.clone());
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable("no leader answered within the request deadline"));
            }
            let attempt = left.min(Duration::from_millis(self.config.attempt_timeout_ms));
            match self.send(&target, &req, route.epoch, attempt).await {
                Ok(a) if a.status == 421 => {
                    // Not the leader: follow the hint if there is one, else try the next member.
                    let hint = serde_json::from_slice::<serde_json::Value>(&a.body)
                        .ok()
                        .and_then(|v| v["error"]["leader"]["dataAddr"].as_str().map(str::to_owned));
                    self.forget_leader(&route.replica_set, &target);
                    match hint {
                        Some(h) if h != target => hinted = Some(h),
                        _ => {
                            rotation += 1;
                            self.pause(&mut backoff, deadline).await;
                        }
                    }
                }
                Ok(a) if a.status == 503 => {
                    // The member has no leader or could not commit in time: retry (the
                    // idempotency key makes a repeated write safe).
                    self.forget_leader(&route.replica_set, &target);
                    rotation += 1;
                    self.pause(&mut backoff, deadline).await;
                }
                Ok(a) => {
                    self.set_leader(&route.replica_set, target);
                    return Ok(a);
                }
                Err(e) => {
                    tracing::debug!(target = %target, error = %e, "datanode did not answer");
                    self.forget_leader(&route.replica_set, &target);
                    rotation += 1;
                    self.pause(&mut backoff, deadline).await;
                }
            }
        }
    }

    async fn pause(&self, backoff: &mut Duration, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep((*backoff).min(left)).await;
        *backoff = (*backoff * 2).min(Duration::from_millis(100));
    }

    async fn send(&self, addr: &str, req: &Upstream, epoch: u64, left: Duration) -> Result<Answer, reqwest::Error> {
        let slots = self.upstream_slots(addr);
        // Backpressure: at most `upstream_max_in_flight` requests per datanode.
        let _permit = slots.acquire_owned().await;
        let mut r = self
            .upstream
            .request(req.method.clone(), format!("{addr}{}", req.path))
            .timeout(left)
            .header(ROUTE_EPOCH_HEADER, epoch.to_string());
        if let Some(k) = &req.idempotency_key {
            r = r.header(IDEMPOTENCY_KEY_HEADER, k);
        }
        if let Some(b) = &req.body {
            r = r.header(reqwest::header::CONTENT_TYPE, "application/json").body(b.clone());
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let returned = resp
            .headers()
            .get(nimbus_api::data::RETURNED_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = resp.bytes().await?;
        Ok(Answer { status, body, returned })
    }
}
