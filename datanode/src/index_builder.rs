//! The leader's driver of index builds: while an index is being built, it proposes
//! `BuildIndex` steps (see `store::index`), one index after another in turn, so that two
//! tenants building at once progress alike. A new leader picks up the builds where the old
//! one left them: the progress is in the replicated catalog.
//!
//! After each step the builder pauses, in proportion to how long the step took: while the
//! replica set serves other requests, [`BUSY_PAUSE`] times as long, so that a build takes
//! about a tenth of the replica set's time. Every step is a Raft entry that each member
//! syncs and applies, and a request arriving meanwhile waits behind it; the fewer steps per
//! second, the fewer requests meet one, and the other databases keep their tail latency
//! (`bench/index-build`: their p99 during a build of 1,000,000 documents against before
//! it). With no request since the last step, the build goes at [`IDLE_PAUSE`]: half of
//! the replica set's time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::node::NodeCtx;
use crate::store::{WriteAnswer, WriteOp};

/// How many times a step's duration the builder waits after it while other requests are
/// being served.
const BUSY_PAUSE: u32 = 9;
/// How many times a step's duration the builder waits after it when no request came since
/// the step before.
const IDLE_PAUSE: u32 = 1;
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
        let mut requests_seen = ctx.data_requests.load(Ordering::Relaxed);
        while ctx.raft.is_leader() {
            let pending = ctx.sm.engine().building_indexes();
            if pending.is_empty() {
                break;
            }
            for (db, coll, name) in pending {
                let started = Instant::now();
                let step = WriteOp::BuildIndex { coll: coll.clone(), name: name.clone() };
                match ctx.propose_internal(db.clone(), step).await {
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
                let requests = ctx.data_requests.load(Ordering::Relaxed);
                let busy = requests != requests_seen;
                requests_seen = requests;
                tokio::select! {
                    _ = stop.recv() => return,
                    () = tokio::time::sleep(pause_after(started.elapsed(), busy)) => {}
                }
            }
        }
    }
}

/// How long to wait after a step that took `step`, with or without other requests since the
/// step before (`busy`).
fn pause_after(step: Duration, busy: bool) -> Duration {
    let busy_pause: u32 =
        std::env::var("NIMBUS_EXP_BUSY_PAUSE").ok().and_then(|v| v.parse().ok()).unwrap_or(BUSY_PAUSE);
    step * if busy { busy_pause } else { IDLE_PAUSE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_takes_a_tenth_of_a_busy_replica_set_and_half_of_an_idle_one() {
        let step = Duration::from_millis(3);
        let share = |pause: Duration| step.as_secs_f64() / (step + pause).as_secs_f64();
        assert!((share(pause_after(step, true)) - 0.1).abs() < 1e-9);
        assert!((share(pause_after(step, false)) - 0.5).abs() < 1e-9);
    }
}
