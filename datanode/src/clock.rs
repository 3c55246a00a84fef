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

/// A peer's offset older than this is not used (the peer may be gone or restarted).
const FRESH: Duration = Duration::from_secs(10);

/// This member's clock and what it last heard of its peers' clocks.
#[derive(Debug, Default)]
pub struct ReplicaClock {
    /// Added to the system clock: a fault injected by tests (`--clock-skew-ms`), 0 otherwise.
    skew_ms: i64,
    /// Peer id → (its clock minus ours when it answered, when that was).
    peers: Mutex<HashMap<u64, (i64, Instant)>>,
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
        let offset = (peer_ms as i64).saturating_sub(self.local_ms() as i64);
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, (offset, Instant::now()));
    }

    /// The time to stamp on a proposed command (see the module's documentation).
    pub fn now_ms(&self) -> u64 {
        let mut offsets = vec![0i64];
        {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            offsets.extend(peers.values().filter(|(_, at)| at.elapsed() < FRESH).map(|(o, _)| *o));
        }
        offsets.sort_unstable();
        // The median of an odd count; of an even count, the lower middle.
        let offset = offsets[(offsets.len() - 1) / 2];
        (self.local_ms() as i64).saturating_add(offset).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wrong_clock_of_three_is_outvoted() {
        let hour = 3_600_000u64;
        // This member is an hour ahead; both peers are right.
        let ahead = ReplicaClock::new(hour as i64);
        let right = ReplicaClock::new(0);
        ahead.observe(2, right.local_ms());
        ahead.observe(3, right.local_ms());
        let diff = ahead.now_ms().abs_diff(right.local_ms());
        assert!(diff < 1_000, "off by {diff} ms");
        // A peer an hour ahead is outvoted too.
        let me = ReplicaClock::new(0);
        me.observe(2, me.local_ms() + hour);
        me.observe(3, me.local_ms());
        assert!(me.now_ms().abs_diff(me.local_ms()) < 1_000);
        // Two clocks known: the earlier one.
        let two = ReplicaClock::new(0);
        two.observe(2, two.local_ms() + hour);
        assert!(two.now_ms().abs_diff(two.local_ms()) < 1_000);
        let behind = ReplicaClock::new(0);
        behind.observe(2, behind.local_ms() - hour);
        assert!(behind.now_ms().abs_diff(behind.local_ms() - hour) < 1_000);
    }
}
