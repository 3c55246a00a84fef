//! Raft RPCs between members (the server side of `raft::network`), on the admin port.
//! Answers are `Result<T, String>` as JSON: a transport failure is an HTTP error, a Raft
//! refusal is an `Err` the caller's openraft handles.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::parse_json;
use crate::clock::CLOCK_HEADER;
use crate::node::NodeCtx;
use crate::raft::TypeConfig;
use crate::raft::network::InstallSnapshot;
use crate::raft::snapshot::{SnapshotData, is_safe_file_name};

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
/// (`crate::clock`).
async fn with_clock(State(ctx): State<Arc<NodeCtx>>, mut resp: Response) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(&ctx.clock.local_ms().to_string()) {
        resp.headers_mut().insert(CLOCK_HEADER, v);
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

async fn transfer_leader(State(ctx): State<Arc<NodeCtx>>, body: Bytes) -> Response {
    match parse_json::<TransferLeaderRequest<TypeConfig>>(&body) {
        Ok(req) => answer(ctx.raft.handle_transfer_leader(req).await),
        Err(e) => bad(e.message),
    }
}

fn safe_transfer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[derive(Deserialize)]
struct ChunkQuery {
    offset: u64,
}

/// Appends one chunk of one snapshot file; chunks of a file arrive in order.
async fn snapshot_chunk(
    State(ctx): State<Arc<NodeCtx>>,
    Path((transfer, file)): Path<(String, String)>,
    Query(q): Query<ChunkQuery>,
    body: Bytes,
) -> Response {
    if !safe_transfer_id(&transfer) || !is_safe_file_name(&file) {
        return bad("invalid snapshot transfer or file name");
    }
    let dir = ctx.sm.incoming_dir().join(&transfer);
    let result: std::io::Result<()> = async {
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(&file);
        let len = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if len != q.offset {
            return Err(std::io::Error::other(format!("chunk at offset {} but the file has {len} bytes", q.offset)));
        }
        let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await?;
        f.write_all(&body).await?;
        f.flush().await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => (StatusCode::CONFLICT, e.to_string()).into_response(),
    }
}

/// Checks the received files and hands the snapshot to Raft.
async fn install_snapshot(State(ctx): State<Arc<NodeCtx>>, Path(transfer): Path<String>, body: Bytes) -> Response {
    if !safe_transfer_id(&transfer) {
        return bad("invalid snapshot transfer id");
    }
    let req: InstallSnapshot = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return bad(e.message),
    };
    let dir = ctx.sm.incoming_dir().join(&transfer);
    for (name, size) in &req.files {
        let ok = is_safe_file_name(name) && tokio::fs::metadata(dir.join(name)).await.is_ok_and(|m| m.len() == *size);
        if !ok {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return (StatusCode::CONFLICT, format!("snapshot file {name} is missing or incomplete")).into_response();
        }
    }
    // The metadata travels with the checkpoint, as in a locally built snapshot.
    let meta_bytes = serde_json::to_vec(&serde_json::json!({ "meta": &req.meta })).unwrap_or_default();
    if let Err(e) = tokio::fs::write(dir.join("nimbus-snapshot-meta.json"), meta_bytes).await {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let snapshot = openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotData> {
        meta: req.meta,
        snapshot: SnapshotData { dir: dir.clone() },
    };
    let result = ctx.raft.install_full_snapshot(req.vote, snapshot).await;
    // Installed data was moved away; anything left is a refused or stale transfer.
    let _ = tokio::fs::remove_dir_all(&dir).await;
    answer(result)
}
