//! The internal data API: the operations of `API.md` section 1, without authentication
//! (the gateway authenticates). Writes go through Raft on the leader; reads are
//! linearizable on the leader (read index) unless the request accepts a follower read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use nimbus_api::data::*;
use nimbus_api::limits::validate_idempotency_key;
use nimbus_api::path::{Access, CollName, DataPath, DbName, DocId, IndexName, Op};
use nimbus_api::{ApiError, ErrorCode, LeaderHint};
use openraft::ReadPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use serde_json::{Map, Value};

use sha2::{Digest, Sha256};

use super::{HttpError, is_json, parse_json};
use crate::doc::ejson;
use crate::doc::validate::check_document;
use crate::node::NodeCtx;
use crate::query::{Filter, Update};
use crate::store::catalog::IndexSpec;
use crate::store::read::FindQuery;
use crate::store::{Command, Engine, WriteAnswer, WriteOp};

type Ctx = State<Arc<NodeCtx>>;
type Result<T> = std::result::Result<T, HttpError>;

pub fn router(ctx: Arc<NodeCtx>) -> Router {
    // Every data path goes through one parser, the gateway's: `DataPath::parse_internal`.
    Router::new().fallback(serve).with_state(ctx)
}

/// What every data request carries besides its operation and body.
struct Envelope {
    db: DbName,
    /// The route epoch the sender used (`x-nimbus-route-epoch`).
    epoch: u64,
    headers: HeaderMap,
    /// For writes with an idempotency key: a digest of the request (method, canonical path,
    /// body), so a key reused for a different request is refused, not answered.
    request_hash: Option<String>,
}

async fn serve(State(ctx): Ctx, req: axum::extract::Request) -> Response {
    ctx.data_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match handle(&ctx, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(ctx: &NodeCtx, req: axum::extract::Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let path = DataPath::parse_internal(parts.method.as_str(), parts.uri.path()).map_err(ApiError::from)?;
    let epoch = route_epoch(&parts.headers)?;
    let body = if path.has_body() { read_body(&parts.headers, body, ctx.max_body_bytes).await? } else { Bytes::new() };
    let request_hash = (path.access() != Access::Read && parts.headers.contains_key(IDEMPOTENCY_KEY_HEADER))
        .then(|| request_digest(&path, &body));
    let DataPath { db, op } = path;
    // Refused before anything else: an outdated route, or a database this replica set is
    // still importing (every operation, reads included; checked again where it is served).
    ctx.sm.engine().check_route_epoch(&db, epoch)?;
    let env = Envelope { db, epoch, headers: parts.headers, request_hash };
    match op {
        Op::Insert(coll) => insert(ctx, &env, coll, parse_json(&body)?).await,
        Op::Get(coll, id) => get_document(ctx, &env, coll, id).await,
        Op::Find(coll) => find(ctx, &env, coll, parse_json(&body)?).await,
        Op::Count(coll) => count(ctx, &env, coll, parse_json(&body)?).await,
        Op::Update(coll) => update(ctx, &env, coll, parse_json(&body)?).await,
        Op::Delete(coll) => delete(ctx, &env, coll, parse_json(&body)?).await,
        Op::ListCollections => list_collections(ctx, &env).await,
        Op::CreateCollection(coll) => create_collection(ctx, &env, coll).await,
        Op::DropCollection(coll) => drop_collection(ctx, &env, coll).await,
        Op::DropDatabase => drop_database(ctx, &env).await,
        Op::CreateIndex(coll) => create_index(ctx, &env, coll, parse_json(&body)?).await,
        Op::ListIndexes(coll) => list_indexes(ctx, &env, coll).await,
        Op::DropIndex(coll, name) => drop_index(ctx, &env, coll, name).await,
    }
}

/// The route epoch of a request: required, a decimal `u64`.
fn route_epoch(headers: &HeaderMap) -> std::result::Result<u64, ApiError> {
    let v = headers
        .get(ROUTE_EPOCH_HEADER)
        .ok_or_else(|| ApiError::bad_request(format!("missing {ROUTE_EPOCH_HEADER}")))?;
    v.to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::bad_request(format!("{ROUTE_EPOCH_HEADER} is not a number")))
}

/// Reads a JSON body: `Content-Type: application/json` and at most `limit` bytes.
async fn read_body(headers: &HeaderMap, body: axum::body::Body, limit: usize) -> std::result::Result<Bytes, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::bad_request("expected Content-Type: application/json"));
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::too_large(format!("request body over {limit} bytes")))
}

/// A digest of what a write asked for: method, canonical path and body.
fn request_digest(path: &DataPath, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(path.method().as_bytes());
    h.update(b" ");
    h.update(path.encode().as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(&h.finalize()[..16])
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

/// Replicates a write of `env`'s database, with its idempotency key and route epoch.
async fn write(ctx: &NodeCtx, env: &Envelope, op: WriteOp) -> Result<WriteAnswer> {
    let cmd = Command {
        db: env.db.to_string(),
        op,
        idempotency_key: idempotency_key(&env.headers)?,
        ts_ms: ctx.command_time(),
        route_epoch: Some(env.epoch),
        request_hash: env.request_hash.clone(),
    };
    Ok(ctx.propose(cmd).await?)
}

/// A linearizable (or, if asked, follower) view of the engine, for a request whose route
/// epoch is still current.
async fn read(ctx: &NodeCtx, env: &Envelope) -> std::result::Result<Arc<Engine>, ApiError> {
    let engine = ctx.read_view(&env.headers).await?;
    engine.check_route_epoch(&env.db, env.epoch)?;
    Ok(engine)
}

pub(crate) fn now_ms() -> u64 {
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

    /// Stopping (`crate::shutdown`): new writes and linearizable reads go elsewhere. While
    /// this member still leads the answer has no hint, so the gateway tries the others
    /// (with its back-off) rather than coming back here; once another member leads, the
    /// hint names it.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) async fn not_leader(&self) -> ApiError {
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

    /// Replicates an operation of the control plane or of the datanode itself (no client
    /// idempotency key, no route epoch), stamped with the replica set's time.
    pub(crate) async fn propose_internal(&self, db: String, op: WriteOp) -> std::result::Result<WriteAnswer, ApiError> {
        Ok(self.propose_internal_at(db, op).await?.0)
    }

    /// [`NodeCtx::propose_internal`], answering also the entry's log index.
    pub(crate) async fn propose_internal_at(
        &self,
        db: String,
        op: WriteOp,
    ) -> std::result::Result<(WriteAnswer, u64), ApiError> {
        let cmd = Command {
            db,
            op,
            idempotency_key: None,
            ts_ms: self.command_time(),
            route_epoch: None,
            request_hash: None,
        };
        self.propose_at(cmd).await
    }

    /// Replicates a write and answers once a majority has it and it is applied here.
    pub(crate) async fn propose(&self, cmd: Command) -> std::result::Result<WriteAnswer, ApiError> {
        Ok(self.propose_at(cmd).await?.0)
    }

    /// [`NodeCtx::propose`], answering also the entry's log index.
    async fn propose_at(&self, cmd: Command) -> std::result::Result<(WriteAnswer, u64), ApiError> {
        if !self.raft.is_leader() || self.is_draining() {
            return Err(self.not_leader().await);
        }
        if !self.in_contact_with_majority() {
            return Err(lost_majority());
        }
        let kind = cmd.op.kind();
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
            Ok(Ok(resp)) => resp.data.map(|answer| (answer, resp.log_id.index())),
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
        if !self.raft.is_leader() || self.is_draining() {
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
async fn blocking<T: Send + 'static, E: Into<HttpError> + Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, E> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ApiError::internal("read task failed").into()),
    }
}

async fn insert(ctx: &NodeCtx, env: &Envelope, coll: CollName, req: InsertRequest) -> Result<Response> {
    if req.documents.is_empty() {
        return Err(ApiError::bad_request("documents must not be empty").into());
    }
    let mut docs = Vec::with_capacity(req.documents.len());
    for mut d in req.documents {
        // Extended JSON (dates, ObjectIds, 64-bit integers) in its one stored form.
        ejson::normalize(&mut d).map_err(ApiError::bad_request)?;
        let Value::Object(map) = d else {
            return Err(ApiError::bad_request("each document must be a JSON object").into());
        };
        docs.push(check_document(&with_id(map))?);
    }
    match write(ctx, env, WriteOp::Insert { coll: coll.into_string(), docs }).await? {
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

async fn get_document(ctx: &NodeCtx, env: &Envelope, coll: CollName, id: DocId) -> Result<Response> {
    let started = Instant::now();
    let engine = read(ctx, env).await?;
    // A path segment is a string `_id`; when none matches and it reads as a number, the
    // numeric `_id` is tried too.
    let mut found = engine.get(&env.db, &coll, &Value::String(id.to_string()))?;
    if found.is_none()
        && let Ok(Value::Number(n)) = serde_json::from_str::<Value>(&id)
    {
        found = engine.get(&env.db, &coll, &Value::Number(n))?;
    }
    // Then as an ObjectId, for 24 hex digits.
    if found.is_none()
        && let Ok(oid) = ejson::normalized(&serde_json::json!({ "$oid": id.as_str() }))
    {
        found = engine.get(&env.db, &coll, &oid)?;
    }
    count_read("get", started);
    match found {
        Some(doc) => Ok(axum::Json(doc).into_response()),
        None => Err(ApiError::not_found(format!("no document with _id {:?}", id.as_str())).into()),
    }
}

async fn find(ctx: &NodeCtx, env: &Envelope, coll: CollName, req: FindRequest) -> Result<Response> {
    let q = FindQuery::parse(&req)?;
    let started = Instant::now();
    let engine = read(ctx, env).await?;
    let db = env.db.clone();
    let documents = blocking(move || engine.find(&db, &coll, &q)).await?;
    count_read("find", started);
    metrics::counter!("nimbus_documents_returned_total").increment(documents.len() as u64);
    let returned = documents.len().to_string();
    // The gateway counts documents returned per database from this header.
    Ok(([(RETURNED_HEADER, returned)], axum::Json(FindResponse { documents })).into_response())
}

async fn count(ctx: &NodeCtx, env: &Envelope, coll: CollName, req: CountRequest) -> Result<Response> {
    let filter = Filter::parse(req.filter.as_ref())?;
    let started = Instant::now();
    let engine = read(ctx, env).await?;
    let db = env.db.clone();
    let count = blocking(move || engine.count(&db, &coll, &filter)).await?;
    count_read("count", started);
    Ok(axum::Json(CountResponse { count }).into_response())
}

async fn update(ctx: &NodeCtx, env: &Envelope, coll: CollName, req: UpdateRequest) -> Result<Response> {
    let filter = req.filter.unwrap_or(Value::Object(Map::new()));
    Filter::parse(Some(&filter))?;
    let parsed = Update::parse_with_array_filters(&req.update, req.array_filters.as_ref())?;
    if parsed.is_replacement() && req.multi {
        return Err(ApiError::invalid_update("a replacement document updates one document: multi must be false").into());
    }
    let op = WriteOp::Update {
        coll: coll.into_string(),
        filter,
        update: req.update,
        multi: req.multi,
        upsert: req.upsert,
        upsert_id: generate_id(),
        array_filters: req.array_filters,
    };
    match write(ctx, env, op).await? {
        WriteAnswer::Updated { matched, modified, upserted_id } => {
            Ok(axum::Json(UpdateResponse { matched, modified, upserted_id }).into_response())
        }
        other => Err(unexpected(other)),
    }
}

async fn delete(ctx: &NodeCtx, env: &Envelope, coll: CollName, req: DeleteRequest) -> Result<Response> {
    let filter = req.filter.unwrap_or(Value::Object(Map::new()));
    Filter::parse(Some(&filter))?;
    match write(ctx, env, WriteOp::Delete { coll: coll.into_string(), filter, multi: req.multi }).await? {
        WriteAnswer::Deleted { deleted } => Ok(axum::Json(DeleteResponse { deleted }).into_response()),
        other => Err(unexpected(other)),
    }
}

async fn list_collections(ctx: &NodeCtx, env: &Envelope) -> Result<Response> {
    let engine = read(ctx, env).await?;
    Ok(axum::Json(ListCollectionsResponse { collections: engine.list_collections(&env.db) }).into_response())
}

async fn create_collection(ctx: &NodeCtx, env: &Envelope, coll: CollName) -> Result<Response> {
    match write(ctx, env, WriteOp::CreateCollection { coll: coll.to_string() }).await? {
        WriteAnswer::CollectionCreated { created } => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok((status, axum::Json(serde_json::json!({ "name": coll.as_str() }))).into_response())
        }
        other => Err(unexpected(other)),
    }
}

async fn drop_collection(ctx: &NodeCtx, env: &Envelope, coll: CollName) -> Result<Response> {
    let what = format!("collection {coll}");
    dropped(write(ctx, env, WriteOp::DropCollection { coll: coll.into_string() }).await?, &what)
}

async fn drop_database(ctx: &NodeCtx, env: &Envelope) -> Result<Response> {
    dropped(write(ctx, env, WriteOp::DropDatabase).await?, &format!("database {}", env.db))
}

fn dropped(answer: WriteAnswer, what: &str) -> Result<Response> {
    match answer {
        WriteAnswer::Dropped { found: true } => Ok(axum::Json(serde_json::json!({})).into_response()),
        WriteAnswer::Dropped { found: false } => Err(ApiError::not_found(format!("no {what}")).into()),
        other => Err(unexpected(other)),
    }
}

async fn create_index(ctx: &NodeCtx, env: &Envelope, coll: CollName, req: CreateIndexRequest) -> Result<Response> {
    let spec = IndexSpec::from_request(&req.keys, req.unique, req.name.as_deref())?;
    let (name, ready) = match write(ctx, env, WriteOp::CreateIndex { coll: coll.to_string(), spec }).await? {
        WriteAnswer::IndexCreated { name, ready } => (name, ready),
        other => return Err(unexpected(other)),
    };
    let state = if ready { IndexState::Ready } else { wait_for_build(ctx, env, &coll, &name).await? };
    let status = if state == IndexState::Ready { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, axum::Json(CreateIndexResponse { name, state })).into_response())
}

/// Waits, up to the request deadline, for the leader's build steps to finish an index.
async fn wait_for_build(ctx: &NodeCtx, env: &Envelope, coll: &str, name: &str) -> Result<IndexState> {
    let deadline = tokio::time::Instant::now() + ctx.write_timeout;
    loop {
        let engine = ctx.sm.engine();
        let meta = engine.catalog_meta(&env.db, coll);
        match meta.as_ref().and_then(|m| m.indexes.iter().find(|i| i.name == name)) {
            Some(ix) if ix.is_ready() => return Ok(IndexState::Ready),
            Some(_) => {}
            None => {
                let failed = meta.and_then(|m| m.failed_builds.into_iter().rev().find(|f| f.name == name));
                return Err(match failed {
                    Some(f) => ApiError::new(f.code, f.message),
                    None => ApiError::not_found(format!("index {name} was dropped while it was being built")),
                }
                .into());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(IndexState::Building);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn list_indexes(ctx: &NodeCtx, env: &Envelope, coll: CollName) -> Result<Response> {
    let engine = read(ctx, env).await?;
    let Some(specs) = engine.list_indexes(&env.db, &coll) else {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no collection {coll}")).into());
    };
    let indexes = specs
        .iter()
        .map(|s| IndexInfo {
            name: s.name.clone(),
            keys: s.keys_json(),
            unique: s.unique,
            auto: s.auto,
            state: if s.is_ready() { IndexState::Ready } else { IndexState::Building },
        })
        .collect();
    Ok(axum::Json(ListIndexesResponse { indexes }).into_response())
}

async fn drop_index(ctx: &NodeCtx, env: &Envelope, coll: CollName, name: IndexName) -> Result<Response> {
    let what = format!("index {name}");
    dropped(write(ctx, env, WriteOp::DropIndex { coll: coll.into_string(), name: name.into_string() }).await?, &what)
}
