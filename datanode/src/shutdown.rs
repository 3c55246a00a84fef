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
//! From the signal on, the member takes no part in elections ([`start_draining`]): it does
//! not campaign when its leader's lease runs out, does not stand after a leader's death
//! (`leader_watch`), and does not take a leadership transferred to it (`server::raft_rpc`);
//! it still votes. Its Raft answers say it is stopping, so a leader handing over passes it
//! by ([`DrainingPeers`](crate::raft::network::DrainingPeers)), as it does a voter whose Raft
//! port refuses connections (stopping too).
//!
//! A follower has nothing to hand over. If the deadline passes, the member stops anyway:
//! the others then replace it as they would a crashed leader (`leader_watch`).
//!
//! Every step is bounded so that the whole stop fits in a Pod's termination grace period
//! ([`StopBudget`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

use crate::config::SHUTDOWN_DRAIN;
use crate::node::NodeCtx;
use crate::raft::network::DrainingPeers;

/// How often an unanswered transfer is asked again (and the successor chosen again).
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// The whole stop, from the signal to the exit, stays within this. The kubelet kills a
/// member's process 30 s after SIGTERM (`MEMBER_TERMINATION_GRACE_SECONDS` in
/// `operator/src/k8s/objects.rs`); the rest is for RocksDB's close and the exit.
pub const STOP_WITHIN: Duration = Duration::from_secs(25);
/// How long Raft gets to shut down (its tasks stop; it writes nothing).
pub const RAFT_SHUTDOWN_WITHIN: Duration = Duration::from_secs(3);

/// How long each step of the stop may take, given how long the stop has taken so far: each
/// step's own bound, cut so that the steps after it still get theirs within [`STOP_WITHIN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopBudget {
    pub total: Duration,
    /// `--shutdown-handoff-ms`: for the handoff, and again for a second one if this member
    /// led again after it.
    pub handoff: Duration,
    /// The servers' drain.
    pub drain: Duration,
    pub raft: Duration,
}

impl StopBudget {
    pub fn new(handoff: Duration) -> StopBudget {
        StopBudget { total: STOP_WITHIN, handoff, drain: SHUTDOWN_DRAIN, raft: RAFT_SHUTDOWN_WITHIN }
    }

    /// What is left of the whole after `elapsed`, keeping `reserve` for the later steps.
    fn left(&self, elapsed: Duration, reserve: Duration) -> Duration {
        self.total.saturating_sub(elapsed).saturating_sub(reserve)
    }

    /// The handoff's bound ([`hand_off`] may overrun it by one [`RETRY_EVERY`]).
    pub fn handoff_within(&self, elapsed: Duration) -> Duration {
        self.handoff.min(self.left(elapsed, RETRY_EVERY + self.drain + self.raft))
    }

    /// The servers' drain's bound.
    pub fn drain_within(&self, elapsed: Duration) -> Duration {
        self.drain.min(self.left(elapsed, self.raft))
    }

    /// The bound of a second handoff, after the drain (this member led again).
    pub fn handoff_again_within(&self, elapsed: Duration) -> Duration {
        self.handoff.min(self.left(elapsed, RETRY_EVERY + self.raft))
    }

    /// Raft's shutdown's bound.
    pub fn raft_within(&self, elapsed: Duration) -> Duration {
        self.raft.min(self.left(elapsed, Duration::ZERO))
    }
}

/// The first step on a signal: no new writes or linearizable reads on this member, no
/// campaigning (the election timer's elections are off; `leader_watch` and the Raft RPC
/// server check the flag), and every Raft answer says it is stopping.
pub fn start_draining(ctx: &NodeCtx) {
    ctx.draining.store(true, Ordering::SeqCst);
    ctx.raft.runtime_config().elect(false);
}

/// What the handoff came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// This member did not lead: nothing to hand over.
    NotLeader,
    /// Another member leads now.
    Transferred { to: u64, took: Duration },
    /// No voter other than this one answered heartbeats, or all that did are stopping too:
    /// there is no one to hand over to.
    NoSuccessor,
    /// The deadline passed with this member still leading (`to`: the last one asked).
    TimedOut { to: Option<u64> },
    /// This member stepped down for `to`, which stopped (or the deadline passed) before it
    /// led: the replica set is left to elect a leader.
    Abandoned { to: u64 },
}

impl Handoff {
    /// Whether this member knowingly still leads (no one to hand over to, or out of time):
    /// asking again after the drain would come to the same.
    pub fn still_leading(&self) -> bool {
        matches!(self, Handoff::NoSuccessor | Handoff::TimedOut { .. })
    }

    /// Logs the outcome where a person will read it.
    pub fn log(&self, node: u64) {
        match self {
            Handoff::NotLeader => tracing::info!(node, "not the leader: nothing to hand over"),
            Handoff::Transferred { to, took } => {
                tracing::info!(node, to, took_ms = took.as_millis() as u64, "leadership handed over")
            }
            Handoff::NoSuccessor => {
                tracing::warn!(node, "no healthy voter that stays to hand leadership to: stopping as leader")
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
    /// Its last Raft answer said it is stopping too.
    pub draining: bool,
}

/// The successor: among the voters other than `me` that acknowledged within `healthy_within`
/// and are not stopping, the one holding the most of the log (the lowest id among equals, so
/// every attempt picks the same one).
pub fn successor(me: u64, peers: &BTreeMap<u64, Peer>, healthy_within: Duration) -> Option<u64> {
    peers
        .iter()
        .filter(|(id, p)| **id != me && !p.draining && p.acked_ago.is_some_and(|a| a <= healthy_within))
        // Highest matched index first; then the lowest id (`Reverse` so `max_by_key` picks it).
        .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
        .map(|(id, _)| *id)
}

/// The other voters as the leader's metrics show them.
fn peers(m: &openraft::RaftMetrics<crate::raft::TypeConfig>, draining: &DrainingPeers) -> BTreeMap<u64, Peer> {
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
            (v, Peer { matched, acked_ago, draining: draining.contains(v) })
        })
        .collect()
}

fn leads(m: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> bool {
    m.state == ServerState::Leader
}

/// If this member leads, hands leadership over (see the module documentation); call
/// [`start_draining`] first. Returns within `within` (plus one metrics wait of at most
/// [`RETRY_EVERY`]).
pub async fn hand_off(ctx: &NodeCtx, within: Duration, healthy_within: Duration) -> Handoff {
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
        let mut candidates = peers(&m, &ctx.peers_draining);
        candidates.retain(|id, _| !gone.contains(id));
        let Some(to) = successor(ctx.id, &candidates, healthy_within) else {
            // The only voter, or none of the others answered within the election timeout
            // or is staying: they would not take over any sooner for waiting.
            return Handoff::NoSuccessor;
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
        if let Some(to) = wait_for_successor(ctx, to, left.min(RETRY_EVERY)).await {
            return Handoff::Transferred { to, took: started.elapsed() };
        }
    }
}

/// Waits up to `within` until another member leads, or until `to`, asked to take over, says
/// it is stopping too (it refused: choose again at once rather than at the next retry).
async fn wait_for_successor(ctx: &NodeCtx, to: u64, within: Duration) -> Option<u64> {
    const STEP: Duration = Duration::from_millis(20);
    let until = Instant::now() + within;
    loop {
        let step = until.saturating_duration_since(Instant::now()).min(STEP);
        let moved = ctx
            .raft
            .wait(Some(step))
            .metrics(|m| m.current_leader.is_some_and(|l| l != m.id), "another member leads")
            .await;
        if let Ok(m) = moved {
            return m.current_leader;
        }
        if ctx.peers_draining.contains(to) || step.is_zero() {
            return None;
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
        Peer { matched, acked_ago: acked_ms.map(Duration::from_millis), draining: false }
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

    #[test]
    fn a_voter_that_is_stopping_too_is_never_the_successor_however_far_ahead() {
        let stopping = Peer { draining: true, ..peer(Some(100), Some(10)) };
        let peers = BTreeMap::from([(2, stopping), (3, peer(Some(90), Some(50)))]);
        assert_eq!(successor(1, &peers, HEALTHY), Some(3));
        let all = BTreeMap::from([(2, stopping), (3, Peer { draining: true, ..peer(Some(90), Some(50)) })]);
        assert_eq!(successor(1, &all, HEALTHY), None);
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn every_step_gets_its_own_bound_when_the_stop_is_on_time() {
        let b = StopBudget::new(S(5));
        assert_eq!(b.handoff_within(S(0)), S(5));
        assert_eq!(b.drain_within(S(5)), SHUTDOWN_DRAIN);
        assert_eq!(b.handoff_again_within(S(10)), S(5));
        assert_eq!(b.raft_within(S(15)), RAFT_SHUTDOWN_WITHIN);
    }

    #[test]
    fn a_handoff_bound_longer_than_the_grace_period_is_cut_so_the_later_steps_still_fit() {
        let b = StopBudget::new(S(600));
        let handoff = b.handoff_within(S(0));
        assert_eq!(handoff + RETRY_EVERY + SHUTDOWN_DRAIN + RAFT_SHUTDOWN_WITHIN, STOP_WITHIN);
        let at = handoff + RETRY_EVERY;
        assert_eq!(b.drain_within(at), SHUTDOWN_DRAIN);
        assert_eq!(b.raft_within(at + SHUTDOWN_DRAIN), RAFT_SHUTDOWN_WITHIN);
    }

    #[test]
    fn however_long_each_step_takes_the_steps_together_stay_within_the_whole() {
        for handoff_s in [0, 1, 5, 12, 30, 600] {
            let b = StopBudget::new(S(handoff_s));
            // Each step takes all it is given; a handoff overruns by one retry.
            let mut t = Duration::ZERO;
            t += b.handoff_within(t) + RETRY_EVERY;
            t += b.drain_within(t);
            let again = b.handoff_again_within(t);
            if !again.is_zero() {
                t += again + RETRY_EVERY;
            }
            t += b.raft_within(t);
            assert!(t <= STOP_WITHIN, "handoff {handoff_s} s: the stop took {t:?}");
        }
    }

    #[test]
    fn the_whole_stop_fits_in_a_member_pods_grace_period() {
        // `MEMBER_TERMINATION_GRACE_SECONDS` (operator/src/k8s/objects.rs), with room for
        // RocksDB's close.
        assert!(STOP_WITHIN + Duration::from_secs(5) <= S(30));
    }
}
