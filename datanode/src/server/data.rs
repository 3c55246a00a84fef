//! The internal data API: the operations of `API.md` section 1, without authentication
//! (the gateway authenticates). Writes go through Raft on the leader; reads are
//! linearizable on the leader (read index) unless the request accepts a follower read.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use nimbus_api::data::*;
use nimbus_api::limits::{validate_idempotency_key, validate_name};
use nimbus_api::{ApiError, ErrorCode, LeaderHint};
use openraft::ReadPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use serde_json::{Map, Value};

use super::{HttpError, JsonBody};
use crate::node::NodeCtx;
use crate::query::{Filter, Update};
use crate::store::catalog::IndexSpec;
use crate::store::read::FindQuery;
use crate::store::validate::check_document;
use crate::store::{Command, Engine, WriteAnswer, WriteOp};

type Ctx = State<Arc<NodeCtx>>;
type Result<T> = std::result::Result<T, HttpError>;

pub fn router(ctx: Arc<NodeCtx>) -> Router {
    Router::new()
        .route("/v1/databases/{db}", axum::routing::delete(drop_database))
        .route("/v1/databases/{db}/collections", get(list_collections))
        .route("/v1/databases/{db}/collections/{coll}", put(create_collection).delete(drop_collection))
        .route("/v1/databases/{db}/collections/{coll}/documents", post(insert))
        .route("/v1/databases/{db}/collections/{coll}/documents/{id}", get(get_document))
        .route("/v1/databases/{db}/collections/{coll}/find", post(find))
        .route("/v1/databases/{db}/collections/{coll}/count", post(count))
        .route("/v1/databases/{db}/collections/{coll}/update", post(update))
        .route("/v1/databases/{db}/collections/{coll}/delete", post(delete))
        .route("/v1/databases/{db}/collections/{coll}/indexes", post(create_index).get(list_indexes))
        .route("/v1/databases/{db}/collections/{coll}/indexes/{name}", axum::routing::delete(drop_index))
        .with_state(ctx)
}

fn names(db: &str, coll: Option<&str>) -> std::result::Result<(), ApiError> {
    validate_name("database", db)?;
    if let Some(c) = coll {
        validate_name("collection", c)?;
    }
    Ok(())
}

fn idempotency_key(headers: &HeaderMap) -> std::result::Result<Option<String>, ApiError> {
    match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => Ok(None),
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::bad_request("invalid Idempotency-Key"))?;
            validate_idempotency_key(k)?;
            Ok(Some(k.to_owned()))
        }
    }
}

/// Replicates a write carrying the request's idempotency key.
async fn write(ctx: &NodeCtx, db: &str, headers: &HeaderMap, op: WriteOp) -> Result<WriteAnswer> {
    let idem = idempotency_key(headers)?;
    Ok(ctx.propose(db, op, idem).await?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new `_id`: 24 hex digits, the seconds since the epoch then 8 random bytes, so ids
/// made later sort later (like MongoDB's ObjectId).
pub fn generate_id() -> Value {
    let secs = (now_ms() / 1000) as u32;
    let rnd: [u8; 8] = rand::random();
    Value::String(format!("{}{}", hex::encode(secs.to_be_bytes()), hex::encode(rnd)))
}

impl NodeCtx {
    pub(crate) async fn leader_hint(&self, leader: Option<u64>) -> Option<LeaderHint> {
        let id = leader?;
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        let node = m.membership().get_node(&id)?;
        Some(LeaderHint { id, data_addr: node.data_addr.clone() })
    }

    async fn not_leader(&self) -> ApiError {
        let leader = self.raft.metrics().borrow_watched().current_leader;
        ApiError::not_leader(self.leader_hint(leader.filter(|l| *l != self.id)).await)
    }

    /// Whether this member, as leader, heard from a majority of voters within the quorum
    /// lease. A leader cut off from the majority keeps its role until it hears of a newer
    /// term; it must not keep clients waiting on writes it cannot commit meanwhile.
    pub(crate) fn in_contact_with_majority(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.membership_config.membership().voter_ids().count() <= 1 {
            return true;
        }
        match &m.last_quorum_acked {
            Some(at) => openraft::Instant::elapsed(&**at) <= self.quorum_lease,
            // Not acknowledged yet: a leader just elected (by a majority).
            None => true,
        }
    }

    /// Returns once this member stops being a leader in contact with a majority.
    async fn lose_majority(&self) {
        loop {
            tokio::time::sleep(QUORUM_CHECK_EVERY).await;
            if !self.raft.is_leader() || !self.in_contact_with_majority() {
                return;
            }
        }
    }

    /// Replicates a write and answers once a majority has it and it is applied here.
    pub(crate) async fn propose(
        &self,
        db: &str,
        op: WriteOp,
        idempotency_key: Option<String>,
    ) -> std::result::Result<WriteAnswer, ApiError> {
        if !self.raft.is_leader() {
            return Err(self.not_leader().await);
        }
        if !self.in_contact_with_majority() {
            return Err(lost_majority());
        }
        let kind = op.kind();
        let cmd = Command { db: db.to_owned(), op, idempotency_key, ts_ms: now_ms(), route_epoch: None };
        let started = Instant::now();
        let result = tokio::select! {
            r = tokio::time::timeout(self.write_timeout, self.raft.client_write(cmd)) => r,
            // Cut off from the majority: the write cannot commit here (it may still commit
            // through the next leader, which is why the answer asks for the same key).
            () = self.lose_majority() => return Err(lost_majority()),
        };
        metrics::histogram!("nimbus_write_seconds", "op" => kind).record(started.elapsed().as_secs_f64());
        match result {
            Err(_) => Err(ApiError::unavailable(
                "the write was not committed within the deadline; retry with the same Idempotency-Key",
            )),
            Ok(Ok(resp)) => resp.data,
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ApiError::not_leader(self.leader_hint(f.leader_id.filter(|l| *l != self.id)).await))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => Err(ApiError::unavailable(
                "leadership changed before the write committed; retry with the same Idempotency-Key",
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "write failed");
                Err(ApiError::unavailable("the replica set could not commit the write"))
            }
        }
    }

    /// The engine to read from: after a read-index barrier on the leader, or at once when
    /// the request accepts a possibly stale follower read.
    pub(crate) async fn read_view(&self, headers: &HeaderMap) -> std::result::Result<Arc<Engine>, ApiError> {
        let any = headers
            .get(READ_PREFERENCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("any"));
        if any {
            return Ok(self.sm.engine());
        }
        if !self.raft.is_leader() {
            return Err(self.not_leader().await);
        }
        if !self.in_contact_with_majority() {
            return Err(lost_majority());
        }
        let barrier = tokio::select! {
            r = tokio::time::timeout(self.write_timeout, self.raft.ensure_linearizable(ReadPolicy::ReadIndex)) => r,
            () = self.lose_majority() => return Err(lost_majority()),
        };
        match barrier {
            Err(_) => Err(ApiError::unavailable("could not confirm leadership within the deadline")),
            Ok(Ok(_)) => Ok(self.sm.engine()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(ApiError::not_leader(self.leader_hint(f.leader_id.filter(|l| *l != self.id)).await))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "read barrier failed");
                Err(ApiError::unavailable("could not confirm leadership with a majority"))
            }
        }
    }
}

/// How often a waiting write or read barrier checks that its leader still reaches a majority.
const QUORUM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

fn lost_majority() -> ApiError {
    ApiError::unavailable(
        "this member lost contact with the majority of its replica set; retry (with the same Idempotency-Key)",
    )
}

fn count_read(op: &'static str, started: Instant) {
    metrics::histogram!("nimbus_read_seconds", "op" => op).record(started.elapsed().as_secs_f64());
}

/// Runs a blocking storage read off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(HttpError::from),
        Err(_) => Err(ApiError::internal("read task failed").into()),
    }
}

async fn insert(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<InsertRequest>,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    if req.documents.is_empty() {
        return Err(ApiError::bad_request("documents must not be empty").into());
    }
    let mut docs = Vec::with_capacity(req.documents.len());
    for d in req.documents {
        let Value::Object(map) = d else {
            return Err(ApiError::bad_request("each document must be a JSON object").into());
        };
        docs.push(check_document(&with_id(map))?);
    }
    match write(&ctx, &db, &headers, WriteOp::Insert { coll, docs }).await? {
        WriteAnswer::Inserted { ids } => {
            Ok((StatusCode::CREATED, axum::Json(InsertResponse { inserted_ids: ids })).into_response())
        }
        other => Err(unexpected(other)),
    }
}

/// The document with its `_id` first, generated when absent.
fn with_id(mut map: Map<String, Value>) -> Value {
    let id = map.remove("_id").unwrap_or_else(generate_id);
    let mut out = Map::with_capacity(map.len() + 1);
    out.insert("_id".into(), id);
    out.extend(map);
    Value::Object(out)
}

fn unexpected(a: WriteAnswer) -> HttpError {
    tracing::error!(answer = ?a, "unexpected answer from the state machine");
    ApiError::internal("unexpected answer from the state machine").into()
}

async fn get_document(
    State(ctx): Ctx,
    Path((db, coll, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let started = Instant::now();
    let engine = ctx.read_view(&headers).await?;
    // A path segment is a string `_id`; when none matches and it reads as a number, the
    // numeric `_id` is tried too.
    let mut found = engine.get(&db, &coll, &Value::String(id.clone()))?;
    if found.is_none()
        && let Ok(Value::Number(n)) = serde_json::from_str::<Value>(&id)
    {
        found = engine.get(&db, &coll, &Value::Number(n))?;
    }
    count_read("get", started);
    match found {
        Some(doc) => Ok(axum::Json(doc).into_response()),
        None => Err(ApiError::not_found(format!("no document with _id {id:?}")).into()),
    }
}

async fn find(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<FindRequest>,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let q = FindQuery::parse(&req)?;
    let started = Instant::now();
    let engine = ctx.read_view(&headers).await?;
    let documents = blocking(move || engine.find(&db, &coll, &q)).await?;
    count_read("find", started);
    metrics::counter!("nimbus_documents_returned_total").increment(documents.len() as u64);
    let returned = documents.len().to_string();
    // The gateway counts documents returned per database from this header.
    Ok(([(RETURNED_HEADER, returned)], axum::Json(FindResponse { documents })).into_response())
}

async fn count(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CountRequest>,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let filter = Filter::parse(req.filter.as_ref())?;
    let started = Instant::now();
    let engine = ctx.read_view(&headers).await?;
    let count = blocking(move || engine.count(&db, &coll, &filter)).await?;
    count_read("count", started);
    Ok(axum::Json(CountResponse { count }).into_response())
}

async fn update(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<UpdateRequest>,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let filter = req.filter.unwrap_or(Value::Object(Map::new()));
    Filter::parse(Some(&filter))?;
    Update::parse(&req.update)?;
    let op = WriteOp::Update {
        coll,
        filter,
        update: req.update,
        multi: req.multi,
        upsert: req.upsert,
        upsert_id: generate_id(),
    };
    match write(&ctx, &db, &headers, op).await? {
        WriteAnswer::Updated { matched, modified, upserted_id } => {
            Ok(axum::Json(UpdateResponse { matched, modified, upserted_id }).into_response())
        }
        other => Err(unexpected(other)),
    }
}

async fn delete(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<DeleteRequest>,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let filter = req.filter.unwrap_or(Value::Object(Map::new()));
    Filter::parse(Some(&filter))?;
    match write(&ctx, &db, &headers, WriteOp::Delete { coll, filter, multi: req.multi }).await? {
        WriteAnswer::Deleted { deleted } => Ok(axum::Json(DeleteResponse { deleted }).into_response()),
        other => Err(unexpected(other)),
    }
}

async fn list_collections(State(ctx): Ctx, Path(db): Path<String>, headers: HeaderMap) -> Result<Response> {
    names(&db, None)?;
    let engine = ctx.read_view(&headers).await?;
    Ok(axum::Json(ListCollectionsResponse { collections: engine.list_collections(&db) }).into_response())
}

async fn create_collection(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    match write(&ctx, &db, &headers, WriteOp::CreateCollection { coll: coll.clone() }).await? {
        WriteAnswer::CollectionCreated { created } => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok((status, axum::Json(serde_json::json!({ "name": coll }))).into_response())
        }
        other => Err(unexpected(other)),
    }
}

async fn drop_collection(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    dropped(
        write(&ctx, &db, &headers, WriteOp::DropCollection { coll: coll.clone() }).await?,
        &format!("collection {coll}"),
    )
}

async fn drop_database(State(ctx): Ctx, Path(db): Path<String>, headers: HeaderMap) -> Result<Response> {
    names(&db, None)?;
    dropped(write(&ctx, &db, &headers, WriteOp::DropDatabase).await?, &format!("database {db}"))
}

fn dropped(answer: WriteAnswer, what: &str) -> Result<Response> {
    match answer {
        WriteAnswer::Dropped { found: true } => Ok(axum::Json(serde_json::json!({})).into_response()),
        WriteAnswer::Dropped { found: false } => Err(ApiError::not_found(format!("no {what}")).into()),
        other => Err(unexpected(other)),
    }
}

async fn create_index(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateIndexRequest>,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let spec = IndexSpec::from_request(&req.keys, req.unique, req.name.as_deref())?;
    match write(&ctx, &db, &headers, WriteOp::CreateIndex { coll, spec }).await? {
        WriteAnswer::IndexCreated { name } => Ok(axum::Json(CreateIndexResponse { name }).into_response()),
        other => Err(unexpected(other)),
    }
}

async fn list_indexes(
    State(ctx): Ctx,
    Path((db, coll)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    let engine = ctx.read_view(&headers).await?;
    let Some(specs) = engine.list_indexes(&db, &coll) else {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no collection {coll}")).into());
    };
    let indexes = specs
        .iter()
        .map(|s| IndexInfo { name: s.name.clone(), keys: s.keys_json(), unique: s.unique, auto: s.auto })
        .collect();
    Ok(axum::Json(ListIndexesResponse { indexes }).into_response())
}

async fn drop_index(
    State(ctx): Ctx,
    Path((db, coll, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    names(&db, Some(&coll))?;
    dropped(
        write(&ctx, &db, &headers, WriteOp::DropIndex { coll, name: name.clone() }).await?,
        &format!("index {name}"),
    )
}
