//! Leaving on a planned stop (SIGTERM from the kubelet on a drain or a rolling restart,
//! SIGINT): a leader hands its leadership to another voter first, so the replica set's
//! writes pause for one transfer instead of waiting out a failover.
//!
//! The steps, bounded by `--shutdown-handoff-ms`:
//! 1. stop taking new writes and linearizable reads: they are answered `421 NotLeader`
//!    (no hint while this member still leads), which the gateway retries on another member;
//! 2. pick the successor: the most caught-up voter that acknowledged a heartbeat within the
//!    election timeout ([`successor`]);
//! 3. wait until it holds every entry of this leader's log (openraft's target refuses a
//!    transfer when its log is behind, and the writes already proposed must not be lost);
//! 4. ask openraft to transfer leadership to it, and wait until another member leads,
//!    asking again every [`RETRY_EVERY`] (the message may be lost, the successor may lag).
//!
//! A voter whose Raft port refuses connections (stopping too) is passed over.
//! A follower has nothing to hand over. If the deadline passes, the member stops anyway:
//! the others then replace it as they would a crashed leader (`leader_watch`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

use crate::node::NodeCtx;

/// How often an unanswered transfer is asked again (and the successor chosen again).
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// What the handoff came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// This member did not lead: nothing to hand over.
    NotLeader,
    /// Another member leads now.
    Transferred { to: u64, took: Duration },
    /// No voter other than this one answered heartbeats: there is no one to hand over to.
    NoSuccessor,
    /// The deadline passed with this member still leading (`to`: the last one asked).
    TimedOut { to: Option<u64> },
    /// This member stepped down for `to`, which stopped (or the deadline passed) before it
    /// led: the replica set is left to elect a leader.
    Abandoned { to: u64 },
}

impl Handoff {
    /// Logs the outcome where a person will read it.
    pub fn log(&self, node: u64) {
        match self {
            Handoff::NotLeader => tracing::info!(node, "not the leader: nothing to hand over"),
            Handoff::Transferred { to, took } => {
                tracing::info!(node, to, took_ms = took.as_millis() as u64, "leadership handed over")
            }
            Handoff::NoSuccessor => {
                tracing::warn!(node, "no healthy voter to hand leadership to: stopping as leader")
            }
            Handoff::Abandoned { to } => {
                tracing::warn!(node, to, "the successor did not take over (it stopped too?): stopping with no leader")
            }
            Handoff::TimedOut { to } => {
                tracing::warn!(node, to = ?to, "leadership did not move before the deadline: stopping as leader")
            }
        }
    }
}

/// What the leader knows of one other voter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The last log index it holds (as the leader last heard).
    pub matched: Option<u64>,
    /// How long ago it last acknowledged a heartbeat or an append; `None`: never.
    pub acked_ago: Option<Duration>,
}

/// The successor: among the voters other than `me` that acknowledged within `healthy_within`,
/// the one holding the most of the log (the lowest id among equals, so every attempt picks
/// the same one).
pub fn successor(me: u64, peers: &BTreeMap<u64, Peer>, healthy_within: Duration) -> Option<u64> {
    peers
        .iter()
        .filter(|(id, p)| **id != me && p.acked_ago.is_some_and(|a| a <= healthy_within))
        // Highest matched index first; then the lowest id (`Reverse` so `max_by_key` picks it).
        .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
        .map(|(id, _)| *id)
}

/// The other voters as the leader's metrics show them.
fn peers(m: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> BTreeMap<u64, Peer> {
    let voters = m.membership_config.membership().voter_ids();
    voters
        .filter(|v| *v != m.id)
        .map(|v| {
            let matched = m.replication.as_ref().and_then(|r| r.get(&v).cloned().flatten()).map(|l| l.index());
            let acked_ago = m
                .heartbeat
                .as_ref()
                .and_then(|h| h.get(&v).cloned().flatten())
                .map(|at| openraft::Instant::elapsed(&*at));
            (v, Peer { matched, acked_ago })
        })
        .collect()
}

fn leads(m: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> bool {
    m.state == ServerState::Leader
}

/// Stops new writes on this member and, if it leads, hands leadership over (see the module
/// documentation). Returns within `within` (plus one metrics wait of at most [`RETRY_EVERY`]).
pub async fn hand_off(ctx: &NodeCtx, within: Duration, healthy_within: Duration) -> Handoff {
    ctx.draining.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let deadline = started + within;
    let mut asked: Option<u64> = None;
    // Voters whose process is gone (stopping with this one: `helm uninstall`, `playground
    // down`): their last heartbeat still looks recent, but nobody there can take over.
    let mut gone: BTreeSet<u64> = BTreeSet::new();
    loop {
        let m = ctx.raft.metrics().borrow_watched().clone();
        let left = deadline.saturating_duration_since(Instant::now());
        if !leads(&m) {
            let Some(successor) = asked else { return Handoff::NotLeader };
            if let Some(to) = m.current_leader.filter(|l| *l != ctx.id) {
                return Handoff::Transferred { to, took: started.elapsed() };
            }
            // Stepped down for the successor, which does not lead yet.
            if let Some(to) = wait_for_other_leader(ctx, left.min(RETRY_EVERY)).await {
                return Handoff::Transferred { to, took: started.elapsed() };
            }
            if left.is_zero() || process_gone(&m, successor).await {
                return Handoff::Abandoned { to: successor };
            }
            continue;
        }
        if left.is_zero() {
            return if asked.is_some() { Handoff::TimedOut { to: asked } } else { Handoff::NoSuccessor };
        }
        let mut candidates = peers(&m);
        candidates.retain(|id, _| !gone.contains(id));
        let Some(to) = successor(ctx.id, &candidates, healthy_within) else {
            // The only voter, or none of the others answered within the election timeout:
            // they would not take over any sooner for waiting.
            return match asked {
                Some(_) => Handoff::TimedOut { to: asked },
                None => Handoff::NoSuccessor,
            };
        };
        if process_gone(&m, to).await {
            tracing::info!(node = ctx.id, to, "the successor's process is gone: choosing another");
            gone.insert(to);
            continue;
        }
        // The successor must hold this leader's whole log, or it ignores the transfer.
        let last = m.last_log_index;
        let caught_up = ctx
            .raft
            .wait(Some(left.min(RETRY_EVERY)))
            .metrics(
                move |m| {
                    !leads(m)
                        || m.replication.as_ref().and_then(|r| r.get(&to).cloned().flatten()).map(|l| l.index())
                            >= m.last_log_index.max(last)
                },
                "the successor holds the whole log",
            )
            .await;
        match caught_up {
            Ok(m) if !leads(&m) => continue,
            Ok(_) => {}
            // Not caught up in time: choose again (another voter may be ahead now).
            Err(_) => continue,
        }
        if asked != Some(to) {
            tracing::info!(node = ctx.id, to, "handing leadership over before stopping");
        }
        asked = Some(to);
        if let Err(e) = ctx.raft.trigger().transfer_leader(to).await {
            tracing::warn!(node = ctx.id, error = %e, "failed to start the leadership transfer");
            return Handoff::TimedOut { to: asked };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let moved = ctx
            .raft
            .wait(Some(left.min(RETRY_EVERY)))
            .metrics(|m| m.current_leader.is_some_and(|l| l != m.id), "another member leads")
            .await;
        if let Ok(m) = moved
            && let Some(to) = m.current_leader
        {
            return Handoff::Transferred { to, took: started.elapsed() };
        }
    }
}

/// Waits up to `within` until another member is known to lead.
async fn wait_for_other_leader(ctx: &NodeCtx, within: Duration) -> Option<u64> {
    let m = ctx.raft.wait(Some(within)).metrics(|m| m.current_leader.is_some_and(|l| l != m.id), "a new leader").await;
    m.ok().and_then(|m| m.current_leader)
}

/// Whether member `id`'s Raft port refuses connections: its process is gone.
async fn process_gone(m: &openraft::RaftMetrics<crate::raft::TypeConfig>, id: u64) -> bool {
    let addr = m.membership_config.membership().get_node(&id).map(|n| n.raft_addr.clone());
    match addr {
        Some(addr) => crate::leader_watch::refuses(&addr).await,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: Duration = Duration::from_secs(1);

    fn peer(matched: Option<u64>, acked_ms: Option<u64>) -> Peer {
        Peer { matched, acked_ago: acked_ms.map(Duration::from_millis) }
    }

    #[test]
    fn the_most_caught_up_healthy_voter_succeeds() {
        let peers = BTreeMap::from([(2, peer(Some(90), Some(50))), (3, peer(Some(100), Some(50)))]);
        assert_eq!(successor(1, &peers, HEALTHY), Some(3));
    }

    #[test]
    fn a_voter_silent_for_longer_than_the_election_timeout_is_passed_over_however_far_ahead() {
        let peers = BTreeMap::from([(2, peer(Some(90), Some(50))), (3, peer(Some(100), Some(5_000)))]);
        assert_eq!(successor(1, &peers, HEALTHY), Some(2));
        let never = BTreeMap::from([(2, peer(Some(90), Some(50))), (3, peer(Some(100), None))]);
        assert_eq!(successor(1, &never, HEALTHY), Some(2));
    }

    #[test]
    fn equals_are_ordered_by_id_and_the_leader_never_picks_itself() {
        let peers = BTreeMap::from([
            (1, peer(Some(200), Some(0))),
            (3, peer(Some(100), Some(10))),
            (2, peer(Some(100), Some(10))),
        ]);
        assert_eq!(successor(1, &peers, HEALTHY), Some(2));
    }

    #[test]
    fn no_healthy_voter_means_no_successor() {
        assert_eq!(successor(1, &BTreeMap::new(), HEALTHY), None);
        let peers = BTreeMap::from([(2, peer(Some(90), None)), (3, peer(None, Some(2_000)))]);
        assert_eq!(successor(1, &peers, HEALTHY), None);
    }

    #[test]
    fn a_voter_that_holds_nothing_yet_still_counts_when_it_answers() {
        let peers = BTreeMap::from([(2, peer(None, Some(10)))]);
        assert_eq!(successor(1, &peers, HEALTHY), Some(2));
    }
}
