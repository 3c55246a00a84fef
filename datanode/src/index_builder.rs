//! The leader's driver of index builds: while an index is being built, it proposes
//! `BuildIndex` steps (see `store::index`), one index after another in turn, so that two
//! tenants building at once progress alike. After each step it waits as long as the step
//! took, so builds take at most about half of the replica set's apply loop and the other
//! databases' writes keep their latency. A new leader picks up the builds where the old
//! one left them: the progress is in the replicated catalog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::node::NodeCtx;
use crate::store::{Command, WriteAnswer, WriteOp};

/// How often a member looks for builds to drive when there are none.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long to wait after a failed step (no leader, no quorum) before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<NodeCtx>, mut stop: tokio::sync::broadcast::Receiver<()>) {
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            () = tokio::time::sleep(IDLE_POLL) => {}
        }
        while ctx.raft.is_leader() {
            let pending = ctx.sm.engine().building_indexes();
            if pending.is_empty() {
                break;
            }
            for (db, coll, name) in pending {
                let started = Instant::now();
                let cmd = Command {
                    db: db.clone(),
                    op: WriteOp::BuildIndex { coll: coll.clone(), name: name.clone() },
                    idempotency_key: None,
                    ts_ms: ctx.command_time(),
                    route_epoch: None,
                    request_hash: None,
                };
                match ctx.propose(cmd).await {
                    Ok(WriteAnswer::IndexBuildStep { done: true, failed: Some(reason) }) => {
                        tracing::warn!(%db, %coll, index = %name, %reason, "index build failed");
                    }
                    Ok(WriteAnswer::IndexBuildStep { done: true, .. }) => {
                        tracing::info!(%db, %coll, index = %name, "index built");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(%db, %coll, index = %name, error = %e.message, "index build step not applied");
                        tokio::select! {
                            _ = stop.recv() => return,
                            () = tokio::time::sleep(RETRY_AFTER) => {}
                        }
                        break;
                    }
                }
                tokio::select! {
                    _ = stop.recv() => return,
                    () = tokio::time::sleep(started.elapsed()) => {}
                }
            }
        }
    }
}
