//! Fast failover when the leader's process is gone.
//!
//! The election timeout is long (1 s by default), so that a leader whose disk stalls for a
//! few hundred milliseconds keeps its leadership: an election without a fault is an outage
//! for every database on the replica set. A follower waiting that long after a leader that
//! crashed would make failover slow, so every follower also checks the leader's Raft port
//! each heartbeat interval. A port that refuses connections twice in a row means the process
//! is gone (a machine or network that is gone times out instead, and is left to the
//! election timeout). Then the follower drops the dead leader's lease (openraft's
//! leadership-transfer message, as the dead leader would have sent, addressed to no one), so
//! it grants a vote without waiting for the timeout, and the voters other than the dead
//! leader stand in turn, by id, each for a few intervals, with a pre-vote first: the term
//! rises once, when a majority (the others having dropped the lease too) would elect the
//! candidate, whose log must be as complete as theirs. A successor whose log is behind gives
//! way to the next; the ordinary election timeout remains the last resort.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::TransferLeaderRequest;

use crate::node::NodeCtx;

/// Refusals in a row before the leader is taken for dead.
const REFUSALS: u32 = 2;
/// A connection attempt taking longer is not a refusal (the machine may be overloaded).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Intervals each successor in turn stands for election.
const STAND_TICKS: u64 = 3;
/// After this many intervals without a new leader, the ordinary election timeout takes over.
const GIVE_UP_TICKS: u64 = 30;
/// The target of the lease-dropping message: no member, so no one is told to stand.
pub(crate) const NO_MEMBER: u64 = u64::MAX;

pub async fn run(ctx: Arc<NodeCtx>, every: Duration, mut stop: tokio::sync::broadcast::Receiver<()>) {
    let mut refused = 0u32;
    let mut watched: Option<u64> = None;
    // The leader found dead, and the intervals since: until another leader is known (or
    // this gives up).
    let mut dead: Option<(u64, u64)> = None;
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            () = tokio::time::sleep(every) => {}
        }
        let m = ctx.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        if let Some((leader, ticks)) = dead.as_mut() {
            let replaced = m.current_leader.is_some_and(|l| l != *leader);
            if replaced || m.state == ServerState::Leader || *ticks > GIVE_UP_TICKS {
                dead = None;
                continue;
            }
            // One candidate at a time; a member already campaigning is left to finish; a
            // member that is stopping never stands (it would exit as leader).
            if !ctx.draining.load(std::sync::atomic::Ordering::SeqCst)
                && rank(&voters, *leader, ctx.id).is_some_and(|r| *ticks / STAND_TICKS == r)
                && m.state == ServerState::Follower
            {
                stand(&ctx).await;
            }
            *ticks += 1;
            continue;
        }
        let Some(leader) = m.current_leader.filter(|l| *l != ctx.id && voters.contains(&ctx.id)) else {
            refused = 0;
            continue;
        };
        if watched != Some(leader) {
            watched = Some(leader);
            refused = 0;
        }
        let Some(addr) = membership.get_node(&leader).map(|n| n.raft_addr.clone()) else { continue };
        if refuses(&addr).await {
            refused += 1;
        } else {
            refused = 0;
        }
        if refused < REFUSALS {
            continue;
        }
        refused = 0;
        tracing::warn!(leader, "the leader's Raft port refuses connections: electing its successor");
        metrics::counter!("nimbus_raft_dead_leader_detected_total").increment(1);
        // Drop the dead leader's lease (the message the leader would have sent, addressed to
        // no one), so that this member takes part in an election now rather than after the
        // election timeout. The vote must still be the dead leader's: a member that heard
        // of a newer leader meanwhile keeps its lease.
        let req = TransferLeaderRequest::new(m.vote, NO_MEMBER, None);
        if let Err(e) = ctx.raft.handle_transfer_leader(req).await {
            tracing::warn!(error = %e, "dropping the dead leader's lease failed");
        }
        dead = Some((leader, 0));
    }
}

/// Stands for election with a pre-vote first: the term rises only if a majority would vote
/// for this member, so a member with a stale view of the leader cannot depose a live one (its
/// followers, still hearing from it, keep their lease and refuse), and a failed attempt
/// costs nothing.
async fn stand(ctx: &NodeCtx) {
    if let Err(e) = ctx.raft.trigger().elect(true).await {
        tracing::warn!(error = %e, "election after the leader's death failed to start");
    }
}

/// This member's place in the order in which the voters other than `leader` stand: by id
/// (every member computes the same). Each stands for [`STAND_TICKS`] intervals, then the
/// next: one candidate at a time, so that a successor whose log is behind (which the others
/// refuse) gives way without splitting the vote.
fn rank(voters: &[u64], leader: u64, me: u64) -> Option<u64> {
    let mut others: Vec<u64> = voters.iter().copied().filter(|v| *v != leader).collect();
    others.sort_unstable();
    others.iter().position(|v| *v == me).map(|p| p as u64)
}

/// Whether the Raft port at base URL `raft_addr` refuses connections: its process is gone
/// (a connection that times out is not a refusal: the machine may be overloaded).
pub(crate) async fn refuses(raft_addr: &str) -> bool {
    let addr = host_port(raft_addr);
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// `host:port` of a base URL such as `http://127.0.0.1:7001/`.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_port_of_a_base_url() {
        assert_eq!(super::host_port("http://127.0.0.1:7001/"), "127.0.0.1:7001");
        assert_eq!(super::host_port("https://dn-0.dn:7001"), "dn-0.dn:7001");
        assert_eq!(super::host_port("10.0.0.1:1"), "10.0.0.1:1");
    }
}
