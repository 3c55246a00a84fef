//! One data API request at the gateway, as a pipeline of named steps:
//!
//! 1. [`parse`]: the method and path become a typed [`DataPath`];
//! 2. [`check_serving`]: the gateway is in step with etcd (503 otherwise);
//! 3. [`authenticate`]: the bearer token names a user of some database (401 otherwise);
//! 4. [`authorize`](crate::auth::authorize): that database is the one addressed, and a
//!    `read` user only reads (403 otherwise); a path that did not parse is 400 or 404 to
//!    its own database's users and 403 to anyone else's;
//! 5. [`admit`]: the database's connection, rate and in-flight limits (429 otherwise);
//! 6. [`read_body`]: the JSON body, within the size limit and the memory budgets;
//! 7. [`idempotency_key`]: the client's key, or one the gateway makes for a write;
//! 8. [`Gateway::forward`]: to the replica set's leader, built from the typed request;
//! 9. [`count`] and [`respond`].
//!
//! Each step is a plain function tested on its own; [`handle`] runs them in order.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use nimbus_api::data::IDEMPOTENCY_KEY_HEADER;
use nimbus_api::limits::{DepthScan, MAX_NESTING_DEPTH, validate_idempotency_key};
use nimbus_api::path::{Access, DataPath, addressed_database};
use nimbus_api::{ApiError, ErrorCode};

use crate::auth::{Principal, authorize, bearer, verify_token};
use crate::body::{self, BodyError, Chunks};
use crate::budget::Reservation;
use crate::limits::Admission;
use crate::server::{ConnState, HttpError};
use crate::state::{DbState, Gateway};
use crate::upstream::{Answer, Failure, Outgoing};
use crate::usage::Counts;

/// The gateway's answer to one request, before it is counted and written.
type Outcome = Result<Answer, Failure>;

/// What the steps learn that counting and answering need, whatever step the request
/// ended at.
#[derive(Default)]
struct Trace {
    /// The authorised database and what the request does (counted from step 4 on).
    counted_as: Option<(Arc<DbState>, Access)>,
    bytes_in: u64,
    /// The idempotency key the gateway made for a write.
    made_key: Option<HeaderValue>,
}

/// Runs the pipeline for one data API request, straight from the connection (`conn`: the
/// client connection it came on, for its database's connection limit).
pub async fn handle<B>(gw: &Gateway, conn: Option<&Arc<ConnState>>, req: http::Request<B>) -> Response
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut trace = Trace::default();
    let outcome = pipeline(gw, conn, &parts, body, &mut trace).await;
    if let Some((db, access)) = &trace.counted_as {
        count(gw, db, *access, trace.bytes_in, &outcome, started);
    }
    respond(outcome, trace.made_key)
}

/// The same, as an axum handler (the data route of [`crate::server::public_router`]).
pub async fn axum_handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let conn = req.extensions().get::<Arc<ConnState>>().cloned();
    handle(&gw, conn.as_ref(), req).await
}

async fn pipeline<B>(gw: &Gateway, conn: Option<&Arc<ConnState>>, parts: &Parts, body: B, trace: &mut Trace) -> Outcome
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let parsed = parse(parts);
    check_serving(gw)?;
    let (db, who) = authenticate(gw, &parts.headers)?;
    let path = parsed.map_err(|e| refuse_unparsed(&db, parts, e))?;
    authorize(&who, &db.name, &path)?;
    trace.counted_as = Some((db.clone(), path.access()));
    let mut admission = admit(gw, &db, conn).await?;
    let (body, _held) = read_body(gw, &db, &path, &parts.headers, body).await?;
    trace.bytes_in = body.as_ref().map_or(0, |b| b.len() as u64);
    let (key, made) = idempotency_key(&path, &parts.headers)?;
    if made {
        trace.made_key.clone_from(&key);
    }
    gw.forward(&db, &Outgoing::new(&path, body, key), &mut admission).await
}

/// Step 1: the request's method and path as a typed request. The query string is ignored
/// and never forwarded.
pub fn parse(parts: &Parts) -> Result<DataPath, ApiError> {
    Ok(DataPath::parse(parts.method.as_str(), parts.uri.path())?)
}

/// Step 4, for a path that does not parse: its own database's users learn what is wrong
/// with it (400 or 404); for anyone else it is another database, 403 whatever it asks.
fn refuse_unparsed(db: &DbState, parts: &Parts, e: ApiError) -> ApiError {
    match addressed_database(parts.uri.path()) {
        Some(addressed) if addressed == db.name => e,
        _ => ApiError::new(ErrorCode::Forbidden, "this token is not for the database this path names"),
    }
}

/// Step 2: a gateway out of step with etcd cannot trust its routes or users.
pub fn check_serving(gw: &Gateway) -> Result<(), ApiError> {
    if gw.is_serving() {
        Ok(())
    } else {
        Err(ApiError::unavailable("this gateway is not in sync with the control plane; retry"))
    }
}

/// Step 3: who sends the request, and their database's state.
pub fn authenticate(gw: &Gateway, headers: &HeaderMap) -> Result<(Arc<DbState>, Principal), ApiError> {
    let token = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    verify_token(token, |db| gw.db(db))
}

/// Step 5: the database's connection limit (on a connection's first request), then a rate
/// slot (waiting at most `--queue-wait-ms`), then an in-flight slot.
pub async fn admit(gw: &Gateway, db: &DbState, conn: Option<&Arc<ConnState>>) -> Result<Admission, ApiError> {
    if let Some(conn) = conn
        && !conn.attach(&db.limiter)
    {
        return Err(ApiError::new(ErrorCode::RateLimited, "too many connections for this database"));
    }
    db.limiter.admit(gw.config.queue_wait()).await
}

/// Step 6: the JSON body of an operation that takes one: `Content-Type:
/// application/json`, at most `--max-body-bytes` within `--body-timeout-ms`, held against
/// the memory budgets as it arrives, nested at most [`MAX_NESTING_DEPTH`] levels (scanned as
/// it arrives, without parsing). The datanode parses and validates it.
pub async fn read_body<B>(
    gw: &Gateway,
    db: &DbState,
    path: &DataPath,
    headers: &HeaderMap,
    body: B,
) -> Result<(Option<Chunks>, Reservation), ApiError>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut held = Reservation::default();
    if !path.has_body() {
        return Ok((None, held));
    }
    if !is_json(headers) {
        return Err(ApiError::bad_request("expected Content-Type: application/json"));
    }
    let limit = gw.config.max_body_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let mut depth = DepthScan::default();
    // Nested too deep is refused as soon as it shows, not after the whole body.
    let read = body::read(body, declared, limit, &mut held, &db.limiter.memory, &gw.memory, |f| {
        depth.feed(f);
        depth.max() <= MAX_NESTING_DEPTH + 2
    });
    let bytes = match tokio::time::timeout(gw.config.body_timeout(), read).await {
        Err(_) => return Err(ApiError::bad_request("the request body did not arrive in time")),
        Ok(Err(BodyError::TooLarge)) => return Err(ApiError::too_large(format!("request body over {limit} bytes"))),
        Ok(Err(BodyError::Budget(e))) => return Err(e),
        Ok(Err(BodyError::Read(_))) => return Err(ApiError::bad_request("failed to read the request body")),
        Ok(Err(BodyError::Refused)) => {
            return Err(ApiError::bad_request(format!("JSON nested deeper than {MAX_NESTING_DEPTH} levels")));
        }
        Ok(Ok(b)) => b,
    };
    Ok((Some(bytes), held))
}

/// Step 7: the idempotency key a write is sent with: the client's, or one the gateway
/// makes (its own retries must never apply a write twice). Returns whether it was made.
pub fn idempotency_key(path: &DataPath, headers: &HeaderMap) -> Result<(Option<HeaderValue>, bool), ApiError> {
    if path.access() == Access::Read {
        return Ok((None, false));
    }
    match headers.get(IDEMPOTENCY_KEY_HEADER) {
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::bad_request("invalid Idempotency-Key"))?;
            validate_idempotency_key(k)?;
            Ok((Some(v.clone()), false))
        }
        None => {
            let made = format!("gw-{}", uuid::Uuid::new_v4().simple());
            Ok((HeaderValue::from_str(&made).ok(), true))
        }
    }
}

/// Step 9a: what the request did, in the database's counters.
pub fn count(gw: &Gateway, db: &DbState, access: Access, bytes_in: u64, outcome: &Outcome, started: Instant) {
    let mut c = Counts { bytes_in, ..Counts::default() };
    match outcome {
        Ok(answer) => {
            match access {
                Access::Read => c.reads = 1,
                Access::Write => c.writes = 1,
                Access::Delete => c.deletes = 1,
            }
            c.documents_returned = answer.returned;
            c.bytes_out = answer.body.len() as u64;
        }
        Err(f) if f.error.code == ErrorCode::RateLimited => c.rejected = 1,
        Err(_) => {}
    }
    gw.usage.record(&db.name, access, &c, started.elapsed());
}

/// Step 9b: the answer, with the idempotency key the gateway made for a write (so a client
/// whose write timed out can retry it under that key).
pub fn respond(outcome: Outcome, made_key: Option<HeaderValue>) -> Response {
    let mut resp = match outcome {
        Ok(answer) => {
            let mut r = Response::new(Body::new(crate::server::HeldBody::new(&answer.body, answer.held)));
            *r.status_mut() = answer.status;
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(f) => HttpError(f.error).into_response(),
    };
    if let Some(k) = made_key {
        resp.headers_mut().insert(IDEMPOTENCY_KEY_HEADER, k);
    }
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = axum::http::Request::builder().method(Method::from_bytes(method.as_bytes()).unwrap()).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn parse_takes_the_path_and_ignores_the_query() {
        let p = parse(&parts("GET", "/v1/databases/a/collections/c/documents/x%2Fy?db=b", &[])).unwrap();
        assert_eq!(p.db.as_str(), "a");
        assert_eq!(p.encode(), "/v1/databases/a/collections/c/documents/x%2Fy");
        let err = parse(&parts("GET", "/v1/databases/a/collections/c/documents/..%5C..%5Cb", &[]));
        assert!(err.is_ok(), "an encoded backslash is part of the id");
        assert_eq!(
            parse(&parts("GET", "/v1/databases/a/collections/c/documents/%2e%2e", &[])).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(parse(&parts("DELETE", "/v1/databases/a", &[])).unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn writes_get_a_key_reads_none_and_a_bad_key_is_refused() {
        let write = DataPath::parse("POST", "/v1/databases/a/collections/c/update").unwrap();
        let read = DataPath::parse("POST", "/v1/databases/a/collections/c/find").unwrap();
        let (k, made) = idempotency_key(&write, &HeaderMap::new()).unwrap();
        assert!(made && k.unwrap().to_str().unwrap().starts_with("gw-"));
        assert_eq!(idempotency_key(&read, &HeaderMap::new()).unwrap(), (None, false));
        let h = parts("POST", "/", &[("idempotency-key", "k-1")]).headers;
        assert_eq!(idempotency_key(&write, &h).unwrap(), (Some(HeaderValue::from_static("k-1")), false));
        let h = parts("POST", "/", &[("idempotency-key", &"x".repeat(200))]).headers;
        assert_eq!(idempotency_key(&write, &h).unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn an_unknown_outcome_carries_the_made_key() {
        let failure = Failure { error: ApiError::unavailable("lost"), outcome_unknown: true };
        let resp = respond(Err(failure), Some(HeaderValue::from_static("gw-1")));
        assert_eq!(resp.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[IDEMPOTENCY_KEY_HEADER], "gw-1");
    }
}
