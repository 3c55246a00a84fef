//! Forwarding a request to the leader of the replica set holding its database: follows
//! `NotLeader` hints, moves on from members that do not answer, waits out a migration hold
//! or a route change (`StaleRoute`), and retries until the request's deadline. Writes
//! always carry an idempotency key, so a retry never applies a write twice.
//!
//! What goes to a datanode is built from the typed request only: the member's scheme and
//! authority, parsed once when the route was loaded, and [`DataPath::encode`]'s path. No
//! URL is parsed or joined here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use nimbus_api::data::{IDEMPOTENCY_KEY_HEADER, RETURNED_HEADER, ROUTE_EPOCH_HEADER};
use nimbus_api::path::DataPath;
use nimbus_api::{ApiError, ErrorCode};
use nimbus_net::ClusterSecret;

use crate::body::{self, BodyError, Chunks, ChunksBody};
use crate::budget::Reservation;
use crate::hold::{Await, HOLD_QUEUE_FULL, HOLD_TIMEOUTS, Held, InFlight, Step, next_step};
use crate::limits::Admission;
use crate::state::{DbState, Gateway, Member, RouteEntry, now_ms};

/// The pooled HTTP client to datanodes.
pub struct UpstreamClient {
    http: Client<HttpConnector, ChunksBody>,
    secret: ClusterSecret,
}

impl UpstreamClient {
    pub fn new(max_idle_per_host: usize, secret: ClusterSecret) -> UpstreamClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(500)));
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(max_idle_per_host)
            .build(connector);
        UpstreamClient { http, secret }
    }
}

/// A request as it goes to datanodes: built once, sent as often as retries need.
pub struct Outgoing {
    pub method: Method,
    pub path: PathAndQuery,
    pub body: Option<Chunks>,
    pub idempotency_key: Option<HeaderValue>,
}

impl Outgoing {
    pub fn new(path: &DataPath, body: Option<Chunks>, idempotency_key: Option<HeaderValue>) -> Outgoing {
        let method = match path.method() {
            "GET" => Method::GET,
            "PUT" => Method::PUT,
            "DELETE" => Method::DELETE,
            _ => Method::POST,
        };
        // `encode` percent-encodes every segment: only unreserved characters, `%` and `/`,
        // all valid in a path, so this cannot fail; an empty path would be refused upstream.
        let path = PathAndQuery::from_maybe_shared(Bytes::from(path.encode()))
            .unwrap_or_else(|_| PathAndQuery::from_static("/"));
        Outgoing { method, path, body, idempotency_key }
    }
}

/// A datanode's answer, passed to the client as is.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Chunks,
    /// Documents a `find` returned (the datanode's `x-nimbus-returned` header).
    pub returned: u64,
    /// The memory budget the body holds, until it is written to the client.
    pub held: Reservation,
}

/// Why forwarding failed, and whether the request may have been applied anyway.
#[derive(Debug)]
pub struct Failure {
    pub error: ApiError,
    /// A write was sent and its outcome is unknown (it may commit).
    pub outcome_unknown: bool,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Failure {
        Failure { error, outcome_unknown: false }
    }
}

/// How one attempt at one member ended.
enum Attempt {
    Answered(Answer),
    /// Never reached the member (connection refused or timed out): nothing was applied.
    NotSent(String),
    /// Sent, but no complete answer: it may have been applied.
    Lost(String),
}

/// How often a request waiting for this gateway to regain etcd looks again.
const NOT_SERVING_POLL: Duration = Duration::from_millis(50);

fn unavailable(why: &str) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{why}; safe to retry"))
}

impl Gateway {
    /// Waits until the database's route may be sent to (not held for a cutover, of epoch
    /// `min_epoch` at least, this gateway in step with etcd) and returns it, with the
    /// request counted in flight for the database. While the database is held, the request
    /// waits in its hold queue without its in-flight slot, and takes a slot again before it
    /// is sent. `Err` says why not (nothing was sent).
    async fn route_to_send<'a>(
        &self,
        db: &'a DbState,
        min_epoch: u64,
        deadline: Instant,
        admission: &mut Admission,
    ) -> Result<(Arc<RouteEntry>, InFlight<'a>), String> {
        let mut held: Option<Held> = None;
        let mut changes: Option<tokio::sync::watch::Receiver<u64>> = None;
        loop {
            // Counted before the route is read (see `Traffic::begin`); the database's state
            // is rebuilt on every change, so it is looked up anew each time.
            let in_flight = db.traffic.begin();
            let route = self.db(&db.name).and_then(|d| d.route.clone());
            let now = now_ms();
            let step = next_step(self.is_serving(), route.as_deref(), min_epoch, now);
            match (step, route) {
                (Step::Send, Some(route)) if admission.holds_slot() => return Ok((route, in_flight)),
                (Step::Send, _) => {
                    // The hold is over: its place in the queue goes back, then a slot.
                    drop(in_flight);
                    held = None;
                    if !admission.reacquire(deadline.into()).await {
                        return Err("no in-flight slot of the database came free before the request's deadline \
                                    after a migration cutover held it"
                            .into());
                    }
                    continue;
                }
                (Step::NoRoute, _) => return Err(format!("database {} has no route", db.name)),
                _ => drop(in_flight),
            }
            if !matches!(step, Step::Hold { .. }) {
                held = None;
            } else if held.is_none() {
                let Some(place) = db.traffic.hold(self.config.hold_queue_max) else {
                    metrics::counter!(HOLD_QUEUE_FULL).increment(1);
                    return Err(format!(
                        "the database is being moved to another replica set and this gateway already holds {} \
                         of its requests",
                        self.config.hold_queue_max
                    ));
                };
                held = Some(place);
                admission.release();
            }
            // Subscribed before the route is read again: no change can slip between.
            let Some(changes) = changes.as_mut() else {
                changes = Some(self.routes_version.subscribe());
                continue;
            };
            let ours_left = deadline.saturating_duration_since(Instant::now());
            if ours_left.is_zero() {
                return Err(match step {
                    Step::Hold { .. } => {
                        metrics::counter!(HOLD_TIMEOUTS).increment(1);
                        "the database is being moved to another replica set and the cutover outlasted the request's \
                         deadline; nothing was sent"
                            .into()
                    }
                    Step::Await(Await::NotServing) => "this gateway is not in sync with the control plane".into(),
                    _ => "the database's route changed and this gateway has not seen the new one yet".into(),
                });
            }
            let wait = match step {
                Step::Hold { until_ms: Some(until) } => ours_left.min(Duration::from_millis(until.saturating_sub(now))),
                // Regaining etcd is no route change: look again now and then.
                Step::Await(Await::NotServing) => ours_left.min(NOT_SERVING_POLL),
                _ => ours_left,
            };
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }

    /// Sends `req` for database `db` until some member answers it or the deadline passes.
    ///
    /// `admission` is the request's in-flight slot: given back while the request is held
    /// for a migration cutover, taken again before it is sent.
    pub async fn forward(&self, db: &DbState, req: &Outgoing, admission: &mut Admission) -> Result<Answer, Failure> {
        let deadline = Instant::now() + self.config.deadline();
        let mut backoff = Duration::from_millis(5);
        let mut rotation = 0usize;
        let mut hinted: Option<String> = None;
        let mut min_epoch = 0;
        let mut sent = false;
        let is_write = req.idempotency_key.is_some();
        let give_up = |sent: bool, why: &str| -> Failure {
            if is_write && sent {
                Failure {
                    error: ApiError::unavailable(format!(
                        "{why}; the write's outcome is unknown (it may have been applied): retry it with the same Idempotency-Key, and it applies at most once"
                    )),
                    outcome_unknown: true,
                }
            } else {
                Failure::from(unavailable(why))
            }
        };
        loop {
            let (route, in_flight) = match self.route_to_send(db, min_epoch, deadline, admission).await {
                Ok(r) => r,
                Err(why) => return Err(give_up(sent, &why)),
            };
            if route.members.is_empty() {
                return Err(give_up(sent, "the database's replica set has no members"));
            }
            let member = hinted
                .take()
                .and_then(|h| route.member_at(&h))
                .or_else(|| route.leader.get().and_then(|id| route.member(id)))
                .unwrap_or_else(|| &route.members[rotation % route.members.len()]);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(give_up(sent, "no leader answered within the request deadline"));
            }
            let attempt = left.min(self.config.attempt_timeout());
            let result = self.send(member, req, &route.epoch_header, attempt, db).await;
            // The attempt is over: whatever it sent has been answered or given up on.
            drop(in_flight);
            match result {
                Ok(Attempt::Answered(a)) if a.status == StatusCode::MISDIRECTED_REQUEST => {
                    let err = serde_json::from_slice::<serde_json::Value>(&a.body.to_bytes()).unwrap_or_default();
                    if err["error"]["code"] == "StaleRoute" {
                        // The database moved: wait for the new route (nothing was applied).
                        min_epoch = route.epoch + 1;
                        continue;
                    }
                    // Not the leader: follow the hint if there is one, else try the next member.
                    route.leader.forget(member.id);
                    match err["error"]["leader"]["dataAddr"].as_str() {
                        Some(h) if h != member.addr => hinted = Some(h.to_owned()),
                        _ => {
                            rotation += 1;
                            pause(&mut backoff, deadline).await;
                        }
                    }
                }
                Ok(Attempt::Answered(a)) if a.status == StatusCode::SERVICE_UNAVAILABLE => {
                    // No leader, or it could not commit in time: the write may still commit.
                    sent = true;
                    route.leader.forget(member.id);
                    rotation += 1;
                    pause(&mut backoff, deadline).await;
                }
                Ok(Attempt::Answered(a)) if a.status == StatusCode::UNAUTHORIZED => {
                    // The datanode refused *this gateway*: its secret is not accepted there
                    // (another namespace's replica set, or a secret out of step). Logged at
                    // most every ten seconds: tokens of such databases must not flood the log.
                    if self.should_log_refusal() {
                        tracing::error!(member = %member.addr, "a datanode refused this gateway's cluster secret");
                    }
                    return Err(give_up(sent, "this gateway cannot authenticate to the database's replica set"));
                }
                Ok(Attempt::Answered(a)) => {
                    route.leader.set(member.id);
                    return Ok(a);
                }
                Ok(Attempt::NotSent(e)) => {
                    tracing::debug!(target = %member.addr, error = %e, "datanode not reached");
                    route.leader.forget(member.id);
                    rotation += 1;
                    pause(&mut backoff, deadline).await;
                }
                Ok(Attempt::Lost(e)) => {
                    tracing::debug!(target = %member.addr, error = %e, "datanode did not answer");
                    sent = true;
                    route.leader.forget(member.id);
                    rotation += 1;
                    pause(&mut backoff, deadline).await;
                }
                // The answer came but cannot be held. A write has been through the replica
                // set by now: its outcome is unknown to the client, never "not applied".
                Err(e) if is_write => {
                    tracing::warn!(error = %e.message, "a write's answer could not be held");
                    return Err(give_up(true, "the datanode's answer could not be held (memory budget)"));
                }
                Err(e) => return Err(Failure { error: e, outcome_unknown: false }),
            }
        }
    }

    /// One attempt; `Err` only when the answer cannot be held (memory budget, size).
    async fn send(
        &self,
        member: &Member,
        req: &Outgoing,
        epoch: &HeaderValue,
        timeout: Duration,
        db: &DbState,
    ) -> Result<Attempt, ApiError> {
        let started = Instant::now();
        // Backpressure: at most `upstream_max_in_flight` requests per datanode.
        let Ok(Ok(_permit)) = tokio::time::timeout(timeout, member.slots.acquire()).await else {
            return Ok(Attempt::NotSent("no free slot to the datanode in time".into()));
        };
        let uri = Uri::builder()
            .scheme(member.scheme.clone())
            .authority(member.authority.clone())
            .path_and_query(req.path.clone())
            .build()
            .map_err(|_| ApiError::internal("failed to build an upstream request"))?;
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(uri)
            .header(AUTHORIZATION, self.upstream.secret.authorization().clone())
            .header(ROUTE_EPOCH_HEADER, epoch.clone());
        if let Some(k) = &req.idempotency_key {
            builder = builder.header(IDEMPOTENCY_KEY_HEADER, k.clone());
        }
        let body = match &req.body {
            Some(b) => {
                builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                b.body()
            }
            None => Chunks::default().body(),
        };
        let request = builder.body(body).map_err(|_| ApiError::internal("failed to build an upstream request"))?;
        let left = timeout.saturating_sub(started.elapsed());
        let resp = match tokio::time::timeout(left, self.upstream.http.request(request)).await {
            Err(_) => return Ok(Attempt::Lost("no answer in time".into())),
            Ok(Err(e)) if e.is_connect() => return Ok(Attempt::NotSent(e.to_string())),
            Ok(Err(e)) => return Ok(Attempt::Lost(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let returned =
            resp.headers().get(RETURNED_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        let declared = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let limit = db.limiter.answers.total().min(self.answers.total());
        let left = timeout.saturating_sub(started.elapsed());
        let mut held = Reservation::default();
        let read =
            body::read(resp.into_body(), declared, limit, &mut held, &db.limiter.answers, &self.answers, |_| true);
        match tokio::time::timeout(left, read).await {
            Err(_) => Ok(Attempt::Lost("the answer did not arrive in time".into())),
            Ok(Ok(body)) => Ok(Attempt::Answered(Answer { status, body, returned, held })),
            Ok(Err(BodyError::Read(e))) => Ok(Attempt::Lost(e)),
            Ok(Err(BodyError::Refused)) => Ok(Attempt::Lost("the answer was refused".into())),
            Ok(Err(BodyError::Budget(e))) => Err(e),
            Ok(Err(BodyError::TooLarge)) => Err(ApiError::too_large(format!(
                "the answer is over {limit} bytes: ask for fewer documents (limit) or fields (projection)"
            ))),
        }
    }
}

async fn pause(backoff: &mut Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep((*backoff).min(left)).await;
    *backoff = (*backoff * 2).min(Duration::from_millis(100));
}
