//! Raft RPCs between members (the server side of `raft::network`), on the admin port.
//! Answers are `Result<T, String>` as JSON: a transport failure is an HTTP error, a Raft
//! refusal is an `Err` the caller's openraft handles.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::Deserialize;

use super::parse_json;
use crate::clock::CLOCK_HEADER;
use crate::leader_watch::NO_MEMBER;
use crate::node::NodeCtx;
use crate::raft::network::{DRAINING_HEADER, InstallSnapshot};
use crate::raft::snapshot::SnapshotData;
use crate::raft::transfer::{Staging, TransferError, TransferId};
use crate::raft::{Raft, TypeConfig};

pub fn router(ctx: Arc<NodeCtx>) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/pre-vote", post(pre_vote))
        .route("/raft/transfer-leader", post(transfer_leader))
        .route("/raft/snapshot/{transfer}/install", post(install_snapshot))
        .route("/raft/snapshot/{transfer}/{file}", post(snapshot_chunk))
        .layer(axum::middleware::map_response_with_state(ctx.clone(), with_clock))
        .with_state(ctx)
}

/// Every answer carries this member's clock, from which the leader stamps commands
/// (`crate::clock`), and, once it is stopping, says so: a leader handing over never picks
/// it (`crate::shutdown`).
async fn with_clock(State(ctx): State<Arc<NodeCtx>>, mut resp: Response) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(&ctx.clock.local_ms().to_string()) {
        resp.headers_mut().insert(CLOCK_HEADER, v);
    }
    if ctx.draining.load(Ordering::SeqCst) {
        resp.headers_mut().insert(DRAINING_HEADER, axum::http::HeaderValue::from_static("1"));
    }
    resp
}

fn answer<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Response {
    let r: Result<T, String> = r.map_err(|e| e.to_string());
    axum::Json(r).into_response()
}

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, msg.into()).into_response()
}

async fn append(State(ctx): State<Arc<NodeCtx>>, body: Bytes) -> Response {
    match parse_json::<AppendEntriesRequest<TypeConfig>>(&body) {
        Ok(req) => answer(ctx.raft.append_entries(req).await),
        Err(e) => bad(e.message),
    }
}

async fn vote(State(ctx): State<Arc<NodeCtx>>, body: Bytes) -> Response {
    match parse_json::<VoteRequest<TypeConfig>>(&body) {
        Ok(req) => answer(ctx.raft.vote(req).await),
        Err(e) => bad(e.message),
    }
}

async fn pre_vote(State(ctx): State<Arc<NodeCtx>>, body: Bytes) -> Response {
    match parse_json::<VoteRequest<TypeConfig>>(&body) {
        Ok(req) => answer(ctx.raft.pre_vote(req).await),
        Err(e) => bad(e.message),
    }
}

/// A member that is stopping does not take leadership (it would exit as leader): a transfer
/// addressed to it only drops the old leader's lease here, as it does on every member but
/// the target, and the stopping leader, still leading, asks another member next.
async fn transfer_leader(State(ctx): State<Arc<NodeCtx>>, body: Bytes) -> Response {
    match parse_json::<TransferLeaderRequest<TypeConfig>>(&body) {
        Ok(req) => answer(ctx.raft.handle_transfer_leader(refuse_if_draining(&ctx, req)).await),
        Err(e) => bad(e.message),
    }
}

fn refuse_if_draining(ctx: &NodeCtx, req: TransferLeaderRequest<TypeConfig>) -> TransferLeaderRequest<TypeConfig> {
    if *req.to_node_id() != ctx.id || !ctx.draining.load(Ordering::SeqCst) {
        return req;
    }
    tracing::info!(node = ctx.id, "stopping: not taking the leadership transferred to this member");
    TransferLeaderRequest::new(*req.from_leader(), NO_MEMBER, req.last_log_id().cloned())
}

#[derive(Deserialize)]
struct ChunkQuery {
    offset: u64,
}

/// A refused chunk or transfer. The sender's openraft takes any refusal as a network error
/// and sends the snapshot again as a new transfer.
fn refused(transfer: &TransferId, e: &TransferError) -> Response {
    tracing::warn!(transfer = %transfer, reason = e.reason(), error = %e, "refused a snapshot transfer");
    metrics::counter!("nimbus_snapshot_transfers_refused_total", "reason" => e.reason()).increment(1);
    let status = match e {
        TransferError::BadName(_) => StatusCode::BAD_REQUEST,
        TransferError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::CONFLICT,
    };
    (status, e.to_string()).into_response()
}

/// Appends one chunk of one snapshot file; chunks of a file arrive in order. The first
/// chunk of a new transfer removes any other (abandoned) one. The write runs in a task of
/// its own, holding the staging area: a request dropped by its sender does not stop it
/// between the write and the file's checksum.
async fn snapshot_chunk(
    State(ctx): State<Arc<NodeCtx>>,
    Path((transfer, file)): Path<(String, String)>,
    Query(q): Query<ChunkQuery>,
    body: Bytes,
) -> Response {
    let Some(transfer) = TransferId::parse(&transfer) else { return bad("invalid snapshot transfer id") };
    let mut staging = ctx.sm.incoming().lock().await;
    let task = tokio::spawn(async move {
        match staging.write_chunk(&transfer, &file, q.offset, body).await {
            Ok(()) => StatusCode::OK.into_response(),
            Err(e) => refused(&transfer, &e),
        }
    });
    finished(task.await)
}

/// Verifies the received files against the sender's checksums, makes them durable and
/// hands the snapshot to Raft. A transfer that fails verification never reaches Raft.
///
/// The work runs in a task of its own that holds the staging area until Raft is done with
/// the files, whether or not the sender still waits for the answer: Raft's install goes on
/// when the request is dropped, so its files must stay, and a new transfer (which would
/// remove them) waits for it.
async fn install_snapshot(State(ctx): State<Arc<NodeCtx>>, Path(transfer): Path<String>, body: Bytes) -> Response {
    let Some(transfer) = TransferId::parse(&transfer) else { return bad("invalid snapshot transfer id") };
    let req: InstallSnapshot = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return bad(e.message),
    };
    let staging = ctx.sm.incoming().lock().await;
    let raft = ctx.raft.clone();
    finished(tokio::spawn(install_transfer(raft, staging, transfer, req)).await)
}

async fn install_transfer(raft: Raft, mut staging: Staging, transfer: TransferId, req: InstallSnapshot) -> Response {
    let dir = match staging.verify(&transfer, &req.files).await {
        Ok(dir) => dir,
        Err(e) => {
            staging.remove(&transfer).await;
            return refused(&transfer, &e);
        }
    };
    let snapshot = openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotData> {
        meta: req.meta,
        snapshot: SnapshotData { dir },
    };
    let result = raft.install_full_snapshot(req.vote, snapshot).await;
    // The state machine linked what it keeps; what is left here is done with.
    staging.remove(&transfer).await;
    answer(result)
}

/// The answer of a task run on a request's behalf.
fn finished(joined: Result<Response, tokio::task::JoinError>) -> Response {
    joined.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a snapshot transfer task failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "snapshot transfer task failed").into_response()
    })
}
