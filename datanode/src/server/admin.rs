//! The admin API: `GET /v1/status` (`API.md` section 2), membership changes, leader
//! transfer, snapshots, the oplog stream, query statistics, health and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nimbus_api::admin::*;
use nimbus_api::migration::{
    DropDatabaseRequest, ExportRequest, ImportAnswer, ImportRequest, OplogPosition, PinOplogRequest, UnpinOplogRequest,
    validate_admin_db,
};
use nimbus_api::{ApiError, ErrorCode};
use openraft::ChangeMembers;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::error::RaftError;
use serde::Deserialize;

use super::{HttpError, JsonBody};
use crate::node::NodeCtx;
use crate::raft::NodeInfo;

type Ctx = State<Arc<NodeCtx>>;
type Result<T> = std::result::Result<T, HttpError>;

/// The admin API. Everything that changes or reveals data needs the cluster secret;
/// status, health, readiness and metrics answer anyone (probes and scrapers).
pub fn router(ctx: Arc<NodeCtx>, secret: nimbus_net::ClusterSecret) -> Router {
    Router::new()
        .route("/v1/admin/init", post(init))
        .route("/v1/admin/learners", post(add_learner))
        .route("/v1/admin/voters", post(change_voters))
        .route("/v1/admin/members/remove", post(remove_member))
        .route("/v1/admin/transfer-leader", post(transfer_leader))
        .route("/v1/admin/snapshot", post(snapshot))
        .route("/v1/admin/route-epoch", post(set_route_epoch))
        .route("/v1/admin/oplog", get(oplog))
        .route("/v1/admin/oplog/pin", post(pin_oplog))
        .route("/v1/admin/oplog/unpin", post(unpin_oplog))
        .route("/v1/admin/export", post(export))
        // An import page is one Raft entry of up to a whole request body.
        .route("/v1/admin/import", post(import).layer(DefaultBodyLimit::max(ctx.max_body_bytes)))
        .route("/v1/admin/drop-database", post(drop_database))
        .route("/v1/admin/checksum", post(checksum_marker).get(checksum_recorded))
        .route("/v1/admin/checksum/verify", get(checksum_verify))
        .route("/v1/admin/query-stats", get(query_stats))
        .route_layer(axum::middleware::from_fn_with_state(secret, nimbus_net::cluster::require))
        .route("/v1/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

fn node_info(m: &MemberInfo) -> NodeInfo {
    NodeInfo {
        admin_addr: m.admin_addr.clone(),
        data_addr: m.data_addr.clone(),
        zone: m.zone.clone(),
        raft_addr: m.raft_addr.clone(),
    }
}

/// The status of this member, as `GET /v1/status` answers.
pub fn status_of(ctx: &NodeCtx) -> Status {
    let m = ctx.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let role = match m.state {
        ServerState::Leader => Role::Leader,
        ServerState::Follower => Role::Follower,
        ServerState::Learner => Role::Learner,
        ServerState::Candidate | ServerState::Shutdown => Role::Candidate,
    };
    let members = membership
        .nodes()
        .map(|(id, n)| MemberInfo {
            id: *id,
            admin_addr: n.admin_addr.clone(),
            data_addr: n.data_addr.clone(),
            raft_addr: n.raft_addr.clone(),
            zone: n.zone.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let last_index = m.last_log_index.unwrap_or(0);
    let mut replication_lag = BTreeMap::new();
    if let Some(rep) = &m.replication {
        for (id, matched) in rep.iter() {
            let matched = matched.as_ref().map(|l| l.index()).unwrap_or(0);
            replication_lag.insert(*id, last_index.saturating_sub(matched));
        }
    }
    Status {
        id: ctx.id,
        zone: ctx.zone.clone(),
        replica_set: ctx.replica_set.clone(),
        role,
        term: m.current_term,
        leader_id: m.current_leader,
        commit_index: m.local_committed.as_ref().map(|l| l.index()).unwrap_or(0),
        applied_index: m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0),
        members,
        replication_lag,
        snapshot_index: m.snapshot.as_ref().map(|l| l.index()),
        purged_index: m.purged.as_ref().map(|l| l.index()),
        oplog_first_index: ctx.sm.engine().oplog_first_index().ok().flatten(),
        draining: ctx.draining.load(std::sync::atomic::Ordering::SeqCst),
    }
}

async fn status(State(ctx): Ctx) -> Response {
    axum::Json(status_of(&ctx)).into_response()
}

fn membership_error<E: std::fmt::Display + std::fmt::Debug>(e: RaftError<crate::raft::TypeConfig, E>) -> HttpError {
    match e {
        RaftError::APIError(e) => {
            let msg = e.to_string();
            if msg.contains("forward") {
                ApiError::new(ErrorCode::NotLeader, msg).into()
            } else {
                ApiError::bad_request(msg).into()
            }
        }
        RaftError::Fatal(f) => ApiError::unavailable(f.to_string()).into(),
    }
}

async fn init(State(ctx): Ctx, JsonBody(req): JsonBody<InitRequest>) -> Result<Response> {
    if req.members.is_empty() {
        return Err(ApiError::bad_request("members must not be empty").into());
    }
    if let Some(m) = req.members.iter().find(|m| m.raft_addr.is_empty()) {
        return Err(ApiError::bad_request(format!("member {} has no raftAddr", m.id)).into());
    }
    let members: BTreeMap<u64, NodeInfo> = req.members.iter().map(|m| (m.id, node_info(m))).collect();
    if !members.contains_key(&ctx.id) {
        return Err(ApiError::bad_request("the members must include this datanode").into());
    }
    if ctx.raft.is_initialized().await.map_err(|e| ApiError::unavailable(e.to_string()))? {
        // Idempotent for the control plane: initialising twice is fine.
        return Ok(axum::Json(serde_json::json!({"initialized": false})).into_response());
    }
    ctx.raft.initialize(members).await.map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(axum::Json(serde_json::json!({"initialized": true})).into_response())
}

async fn add_learner(State(ctx): Ctx, JsonBody(req): JsonBody<AddLearnerRequest>) -> Result<Response> {
    if req.member.raft_addr.is_empty() {
        return Err(ApiError::bad_request(format!("member {} has no raftAddr", req.member.id)).into());
    }
    let r =
        ctx.raft.add_learner(req.member.id, node_info(&req.member), req.blocking).await.map_err(membership_error)?;
    Ok(axum::Json(serde_json::json!({"logIndex": r.log_id.index()})).into_response())
}

async fn change_voters(State(ctx): Ctx, JsonBody(req): JsonBody<ChangeVotersRequest>) -> Result<Response> {
    let target: BTreeSet<u64> = req.voters.iter().copied().collect();
    if target.is_empty() {
        return Err(ApiError::bad_request("voters must not be empty").into());
    }
    let current: BTreeSet<u64> =
        ctx.raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect();
    if current.symmetric_difference(&target).count() > 1 {
        return Err(ApiError::bad_request("change one voter at a time").into());
    }
    // Removed voters stay as learners (`retain`); remove them with members/remove.
    let r =
        ctx.raft.change_membership(ChangeMembers::ReplaceAllVoters(target), true).await.map_err(membership_error)?;
    Ok(axum::Json(serde_json::json!({"logIndex": r.log_id.index()})).into_response())
}

async fn remove_member(State(ctx): Ctx, JsonBody(req): JsonBody<RemoveMemberRequest>) -> Result<Response> {
    let m = ctx.raft.metrics().borrow_watched().membership_config.clone();
    let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
    let is_voter = voters.contains(&req.id);
    if m.membership().get_node(&req.id).is_none() {
        return Err(ApiError::not_found(format!("no member {}", req.id)).into());
    }
    if is_voter {
        if voters.len() <= 1 {
            return Err(ApiError::bad_request("cannot remove the last voter").into());
        }
        ctx.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([req.id])), false)
            .await
            .map_err(membership_error)?;
    } else {
        ctx.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([req.id])), false)
            .await
            .map_err(membership_error)?;
    }
    Ok(axum::Json(serde_json::json!({})).into_response())
}

async fn transfer_leader(State(ctx): Ctx, JsonBody(req): JsonBody<TransferLeaderRequest>) -> Result<Response> {
    let m = ctx.raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(ctx.id) {
        return Err(ApiError::new(ErrorCode::NotLeader, "only the leader can transfer leadership").into());
    }
    if !m.membership_config.membership().voter_ids().any(|v| v == req.to) {
        return Err(ApiError::bad_request(format!("{} is not a voter", req.to)).into());
    }
    ctx.raft.trigger().transfer_leader(req.to).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    // Wait until the target leads (or time runs out), so the caller knows the outcome.
    let waited = ctx
        .raft
        .wait(Some(Duration::from_secs(5)))
        .metrics(|m| m.current_leader == Some(req.to), "leader transferred")
        .await;
    match waited {
        Ok(_) => Ok(axum::Json(serde_json::json!({"leaderId": req.to})).into_response()),
        Err(_) => Err(ApiError::unavailable("leadership did not move within 5 s").into()),
    }
}

/// Proposes a checksum marker for a database and answers the leader's sum at it.
async fn checksum_marker(State(ctx): Ctx, JsonBody(req): JsonBody<ChecksumRequest>) -> Result<Response> {
    validate_admin_db(&req.db)?;
    match ctx.propose_internal(req.db, crate::store::WriteOp::Checksum).await? {
        crate::store::WriteAnswer::Checksum(at) => Ok(axum::Json(at).into_response()),
        other => Err(ApiError::internal(format!("unexpected answer to a checksum marker: {other:?}")).into()),
    }
}

#[derive(Deserialize)]
struct DbQuery {
    db: String,
}

/// What this member recorded at the database's last checksum marker; 404 if none.
async fn checksum_recorded(State(ctx): Ctx, Query(q): Query<DbQuery>) -> Result<Response> {
    validate_admin_db(&q.db)?;
    match ctx.sm.engine().checksum_at(&q.db)? {
        Some(at) => Ok(axum::Json(at).into_response()),
        None => Err(ApiError::new(ErrorCode::NotFound, format!("no checksum marker for {:?} yet", q.db)).into()),
    }
}

/// Scans the database's stored documents against the sums the apply loop recorded.
async fn checksum_verify(State(ctx): Ctx, Query(q): Query<DbQuery>) -> Result<Response> {
    validate_admin_db(&q.db)?;
    let db = q.db;
    let engine = ctx.sm.engine();
    let v = tokio::task::spawn_blocking(move || engine.verify_checksum(&db))
        .await
        .map_err(|_| ApiError::internal("checksum verification failed"))??;
    Ok(axum::Json(v).into_response())
}

/// Raises the database's route epoch; answers the epoch in force and the entry's log index
/// (a migration's fence: every change of the old route is at or before it).
async fn set_route_epoch(State(ctx): Ctx, JsonBody(req): JsonBody<SetRouteEpochRequest>) -> Result<Response> {
    let db = nimbus_api::path::DbName::new(&req.db)?;
    let op = crate::store::WriteOp::SetRouteEpoch { epoch: req.epoch };
    match ctx.propose_internal_at(db.into_string(), op).await? {
        (crate::store::WriteAnswer::RouteEpoch { epoch }, index) => {
            Ok(axum::Json(RouteEpochAnswer { epoch, index }).into_response())
        }
        _ => Err(ApiError::internal("unexpected answer from the state machine").into()),
    }
}

/// Refuses a call only the leader answers, naming the leader it knows.
async fn require_leader(ctx: &NodeCtx) -> Result<()> {
    if !ctx.raft.is_leader() || ctx.is_draining() {
        return Err(ctx.not_leader().await.into());
    }
    Ok(())
}

/// Most bytes of documents one export page holds, whatever the caller asks: a page becomes
/// one Raft entry on the target, which must stay well below the append bound (8 MiB).
const MAX_EXPORT_PAGE_BYTES: u64 = 4 << 20;

/// One page of a database for a hot migration (`nimbus_api::migration::ExportRequest`).
async fn export(State(ctx): Ctx, JsonBody(req): JsonBody<ExportRequest>) -> Result<Response> {
    validate_admin_db(&req.db)?;
    let db = req.db.clone();
    require_leader(&ctx).await?;
    let engine = ctx.sm.engine();
    let max_bytes = req.max_bytes.clamp(1, MAX_EXPORT_PAGE_BYTES);
    let page = tokio::task::spawn_blocking(move || {
        engine.export_page(&db, req.part, req.after.as_deref(), max_bytes, req.since_ms)
    })
    .await
    .map_err(|_| ApiError::internal("export read failed"))??;
    Ok(axum::Json(page).into_response())
}

/// One step of a hot migration's import, as one Raft entry (`ImportRequest`).
async fn import(State(ctx): Ctx, JsonBody(req): JsonBody<ImportRequest>) -> Result<Response> {
    // A restore imports into its staging database (`{db}~restore`), which no client names.
    validate_admin_db(&req.db)?;
    let db = req.db;
    if req.migration.is_empty() {
        return Err(ApiError::bad_request("migration (the migration's id) must not be empty").into());
    }
    require_leader(&ctx).await?;
    let op = crate::store::WriteOp::Import { migration: req.migration, step: req.step };
    match ctx.propose_internal_at(db, op).await? {
        (crate::store::WriteAnswer::Done, index) => Ok(axum::Json(ImportAnswer { index }).into_response()),
        _ => Err(ApiError::internal("unexpected answer from the state machine").into()),
    }
}

/// Pins the oplog against retention (`PinOplogRequest`); answers `{"index"}`.
async fn pin_oplog(State(ctx): Ctx, JsonBody(req): JsonBody<PinOplogRequest>) -> Result<Response> {
    if req.name.is_empty() {
        return Err(ApiError::bad_request("name must not be empty").into());
    }
    // A pin holds the oplog against retention: one that never lapses would let the oplog
    // grow without bound after its migration died. Renewed while it is needed.
    let latest = super::data::now_ms().saturating_add(MAX_PIN_MS);
    if req.expires_ms > latest {
        return Err(ApiError::bad_request(format!(
            "expiresMs {} is more than {} hours from now: renew a pin instead",
            req.expires_ms,
            MAX_PIN_MS / 3_600_000
        ))
        .into());
    }
    let op = crate::store::WriteOp::PinOplog { name: req.name, from_index: req.from_index, expires_ms: req.expires_ms };
    let (_, index) = ctx.propose_internal_at(String::new(), op).await?;
    Ok(axum::Json(ImportAnswer { index }).into_response())
}

/// The furthest an oplog pin may expire from now (a migration renews its pin every half
/// hour; see the control plane's `pin_ttl`).
const MAX_PIN_MS: u64 = 24 * 3_600_000;

/// Removes an oplog pin (`UnpinOplogRequest`); answers `{"index"}`.
async fn unpin_oplog(State(ctx): Ctx, JsonBody(req): JsonBody<UnpinOplogRequest>) -> Result<Response> {
    if req.name.is_empty() {
        return Err(ApiError::bad_request("name must not be empty").into());
    }
    let (_, index) =
        ctx.propose_internal_at(String::new(), crate::store::WriteOp::UnpinOplog { name: req.name }).await?;
    Ok(axum::Json(ImportAnswer { index }).into_response())
}

/// Drops a database's data on this replica set, its route epoch kept (`DropDatabaseRequest`);
/// answers `{"found", "index"}`, with `"kept": true, "epoch"` when `maxEpoch` kept it.
/// Takes every name the admin API does ([`validate_admin_db`]): an instance's deletion and a
/// migration's clean-up drop the database's restore staging (`{db}~restore`) and
/// verification scratch (`{db}~verify`) copies with it, which no `Abort` may ever reach
/// (their import id is lost with the job that made them).
async fn drop_database(State(ctx): Ctx, JsonBody(req): JsonBody<DropDatabaseRequest>) -> Result<Response> {
    validate_admin_db(&req.db)?;
    let db = req.db;
    // Unbounded drops keep the entry older members decode.
    let op = match req.max_epoch {
        None => crate::store::WriteOp::DropDatabase,
        Some(max_epoch) => crate::store::WriteOp::DropDatabaseUpTo { max_epoch },
    };
    let answer = match ctx.propose_internal_at(db, op).await? {
        (crate::store::WriteAnswer::Dropped { found }, index) => {
            DroppedDatabase { found, index, kept: false, epoch: None }
        }
        (crate::store::WriteAnswer::DatabaseKept { found, epoch }, index) => {
            DroppedDatabase { found, index, kept: true, epoch: Some(epoch) }
        }
        _ => return Err(ApiError::internal("unexpected answer from the state machine").into()),
    };
    Ok(axum::Json(answer).into_response())
}

async fn snapshot(State(ctx): Ctx) -> Result<Response> {
    ctx.raft.trigger().snapshot().await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(axum::Json(serde_json::json!({})).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OplogQuery {
    #[serde(default)]
    from: u64,
    #[serde(default)]
    limit: Option<usize>,
    /// With `db`: the database's changes after (`afterIndex`, `afterSeq`).
    #[serde(default)]
    db: Option<String>,
    #[serde(default)]
    after_index: u64,
    #[serde(default)]
    after_seq: u32,
}

/// A page of the oplog. With `db`, that database's changes after a position
/// (`DbOplogPage`); without, every change from Raft index `from` (`OplogPage`).
async fn oplog(State(ctx): Ctx, Query(q): Query<OplogQuery>) -> Result<Response> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let engine = ctx.sm.engine();
    if let Some(db) = q.db {
        let db = nimbus_api::path::DbName::new(&db)?.into_string();
        let after = OplogPosition { index: q.after_index, seq: q.after_seq };
        let page = tokio::task::spawn_blocking(move || engine.read_db_oplog(&db, after, limit))
            .await
            .map_err(|_| ApiError::internal("oplog read failed"))??;
        return Ok(axum::Json(page).into_response());
    }
    let from = q.from;
    let entries = tokio::task::spawn_blocking(move || engine.read_oplog(from, limit))
        .await
        .map_err(|_| ApiError::internal("oplog read failed"))??;
    let next = entries.last().map(|e| e.index + 1).unwrap_or(from);
    Ok(axum::Json(OplogPage { entries, next }).into_response())
}

async fn query_stats(State(ctx): Ctx) -> Response {
    axum::Json(serde_json::json!({ "shapes": ctx.sm.engine().stats.snapshot() })).into_response()
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Ready once this member belongs to an initialised replica set that has a leader, and
/// until it starts stopping.
async fn readyz(State(ctx): Ctx) -> Response {
    let m = ctx.raft.metrics().borrow_watched().clone();
    if ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(ApiError::unavailable("stopping").to_body())).into_response()
    } else if m.current_leader.is_some() && m.running_state.is_ok() {
        axum::Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(ApiError::unavailable("no leader known").to_body()))
            .into_response()
    }
}

async fn metrics(State(ctx): Ctx) -> Response {
    ctx.refresh_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.prometheus.render()).into_response()
}
