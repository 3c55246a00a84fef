//! The time a leader stamps on the commands it proposes: the median of the members' wall
//! clocks, not its own alone.
//!
//! A command's time becomes the oplog's timestamps, the start of an idempotency record's
//! window and the reference of time-based retention. One member whose clock is wrong,
//! ahead by days say, must not be able to expire every idempotency key or let the oplog's
//! retention delete the window a backup or a migration reads. Every Raft response carries
//! the answering member's clock ([`CLOCK_HEADER`]); the leader keeps each peer's offset from
//! its own clock and proposes `own clock + median(0, fresh offsets)`. With three members
//! the median of three clocks is right when any two are, the leader's own included. With
//! two clocks known it takes the earlier one: a clock behind only holds the replica set's
//! time still (the apply loop never lets it go back, `Engine::command_time`), a clock ahead
//! would expire records early.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Response header of every Raft RPC: the answering member's clock, ms since the epoch.
pub const CLOCK_HEADER: &str = "x-nimbus-clock-ms";

/// A peer's reading older than this is not used (the peer may be gone or restarted).
const FRESH: Duration = Duration::from_secs(10);

/// This member's clock and what it last heard of its peers' clocks.
#[derive(Debug, Default)]
pub struct ReplicaClock {
    /// Added to the system clock: a fault injected by tests (`--clock-skew-ms`), 0 otherwise.
    skew_ms: i64,
    /// Peer id → (its clock when it answered, when that was on our monotonic clock). A
    /// peer's time now is its reading plus the time elapsed since: independent of our own
    /// wall clock, so a step of ours moves only our own vote.
    peers: Mutex<HashMap<u64, (u64, Instant)>>,
}

impl ReplicaClock {
    pub fn new(skew_ms: i64) -> ReplicaClock {
        ReplicaClock { skew_ms, peers: Mutex::default() }
    }

    /// This member's own wall clock, ms since the Unix epoch.
    pub fn local_ms(&self) -> u64 {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        system.saturating_add(self.skew_ms).max(0) as u64
    }

    /// Records a peer's clock, read from its answer.
    pub fn observe(&self, peer: u64, peer_ms: u64) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, (peer_ms, Instant::now()));
    }

    /// The time to stamp on a command proposed by `me`: the median of the clocks of the
    /// `voters` (this member's own, if it is one, and those heard from recently).
    pub fn now_ms(&self, me: u64, voters: &[u64]) -> u64 {
        let own = self.local_ms();
        let mut clocks = Vec::with_capacity(voters.len());
        if voters.contains(&me) || voters.is_empty() {
            clocks.push(own);
        }
        {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            for v in voters.iter().filter(|v| **v != me) {
                if let Some((ms, at)) = peers.get(v) {
                    let age = at.elapsed();
                    if age < FRESH {
                        clocks.push(ms.saturating_add(age.as_millis() as u64));
                    }
                }
            }
        }
        if clocks.is_empty() {
            return own;
        }
        clocks.sort_unstable();
        // The median of an odd count; of an even count, the lower middle.
        clocks[(clocks.len() - 1) / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn one_wrong_clock_of_three_is_outvoted() {
        let voters = [1, 2, 3];
        // This member is an hour ahead; both peers are right.
        let ahead = ReplicaClock::new(HOUR as i64);
        let right = ReplicaClock::new(0);
        ahead.observe(2, right.local_ms());
        ahead.observe(3, right.local_ms());
        let diff = ahead.now_ms(1, &voters).abs_diff(right.local_ms());
        assert!(diff < 1_000, "off by {diff} ms");
        // A peer an hour ahead is outvoted too.
        let me = ReplicaClock::new(0);
        me.observe(2, me.local_ms() + HOUR);
        me.observe(3, me.local_ms());
        assert!(me.now_ms(1, &voters).abs_diff(me.local_ms()) < 1_000);
        // Two clocks known: the earlier one.
        let two = ReplicaClock::new(0);
        two.observe(2, two.local_ms() + HOUR);
        assert!(two.now_ms(1, &voters).abs_diff(two.local_ms()) < 1_000);
        let behind = ReplicaClock::new(0);
        behind.observe(2, behind.local_ms() - HOUR);
        assert!(behind.now_ms(1, &voters).abs_diff(behind.local_ms() - HOUR) < 1_000);
    }

    #[test]
    fn only_voters_count() {
        // Two learners an hour ahead do not move a three-voter median.
        let me = ReplicaClock::new(0);
        me.observe(2, me.local_ms());
        me.observe(3, me.local_ms());
        me.observe(4, me.local_ms() + HOUR);
        me.observe(5, me.local_ms() + HOUR);
        assert!(me.now_ms(1, &[1, 2, 3]).abs_diff(me.local_ms()) < 1_000);
        // With them as voters, they would.
        assert!(me.now_ms(1, &[1, 2, 3, 4, 5]).abs_diff(me.local_ms()) < 1_000);
        assert!(me.now_ms(1, &[1, 4, 5]).abs_diff(me.local_ms() + HOUR) < 1_000);
    }
}
