//! A linearizability checker for one register (Wing & Gong's search, with Lowe's memo of
//! visited configurations): is there an order of the operations, each taking effect at
//! one instant between its call and its return, in which every read returns the value of
//! the write before it?
//!
//! A write whose outcome the client never learned (a timeout, a 503) may have taken effect
//! or not: it is given no return, so it may be placed anywhere after its call, or nowhere.
//! Reads that failed say nothing and are left out by the caller.

use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write(u64),
    /// The value read; `None` when the register had never been written.
    Read(Option<u64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub op: Op,
    /// When the client sent it (any monotonic clock, the same for every event).
    pub call: u64,
    /// When the client got the answer; `None` for a write of unknown outcome.
    pub ret: Option<u64>,
}

/// Configurations visited before the search gives up (a history this checker cannot
/// decide in reasonable time is reported, not passed).
const BUDGET: usize = 5_000_000;

/// `Ok` when the history is linearizable from `initial`; else why not.
pub fn check(initial: Option<u64>, history: &[Event]) -> Result<(), String> {
    // A write of unknown outcome whose value no read returned is left out: placing it can
    // only change the value to one nobody saw until the next write, so an order with it
    // is still one without it. Kept in, each such write stays a candidate at every later
    // step, and a few of them make the search exponential.
    let read: HashSet<u64> = history
        .iter()
        .filter(|e| e.ret.is_some())
        .filter_map(|e| match e.op {
            Op::Read(v) => v,
            Op::Write(_) => None,
        })
        .collect();
    let mut ops: Vec<Event> = history
        .iter()
        .filter(|e| match e.op {
            Op::Write(v) => e.ret.is_some() || read.contains(&v),
            Op::Read(_) => e.ret.is_some(),
        })
        .copied()
        .collect();
    ops.sort_by_key(|e| e.call);
    let n = ops.len();
    let completed = ops.iter().filter(|e| e.ret.is_some()).count();
    let words = n.div_ceil(64);
    let is_set = |bits: &[u64], i: usize| bits[i / 64] & (1 << (i % 64)) != 0;

    // Ops that may take effect next: not yet placed, called before every unplaced
    // completed op returned.
    let candidates = |bits: &[u64]| -> Vec<usize> {
        let min_ret = (0..n).filter(|&i| !is_set(bits, i)).filter_map(|i| ops[i].ret).min().unwrap_or(u64::MAX);
        (0..n).take_while(|&i| ops[i].call < min_ret).filter(|&i| !is_set(bits, i)).collect()
    };

    struct Frame {
        bits: Vec<u64>,
        value: Option<u64>,
        placed: usize,
        next: Vec<usize>,
    }
    let start = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack = vec![Frame { next: candidates(&start), bits: start, value: initial, placed: 0 }];
    let mut best = 0usize;
    let mut steps = 0usize;
    while let Some(top) = stack.last_mut() {
        if top.placed == completed {
            return Ok(());
        }
        let Some(i) = top.next.pop() else {
            stack.pop();
            continue;
        };
        steps += 1;
        if steps > BUDGET {
            return Err(format!("undecided after {BUDGET} steps ({n} operations)"));
        }
        let value = match ops[i].op {
            Op::Write(v) => Some(v),
            Op::Read(r) if r == top.value => top.value,
            Op::Read(_) => continue,
        };
        let mut bits = top.bits.clone();
        bits[i / 64] |= 1 << (i % 64);
        let placed = top.placed + usize::from(ops[i].ret.is_some());
        if !seen.insert((bits.clone(), value)) {
            continue;
        }
        best = best.max(placed);
        let next = candidates(&bits);
        stack.push(Frame { bits, value, placed, next });
    }
    // Where the longest attempt got stuck helps to read the failure.
    let stuck: Vec<&Event> = ops.iter().filter(|e| e.ret.is_some()).skip(best.saturating_sub(2)).take(4).collect();
    Err(format!("not linearizable: at most {best} of {completed} completed operations can be ordered; near {stuck:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(v: u64, call: u64, ret: u64) -> Event {
        Event { op: Op::Write(v), call, ret: Some(ret) }
    }
    fn r(v: Option<u64>, call: u64, ret: u64) -> Event {
        Event { op: Op::Read(v), call, ret: Some(ret) }
    }
    fn unknown_write(v: u64, call: u64) -> Event {
        Event { op: Op::Write(v), call, ret: None }
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        assert!(check(None, &[w(1, 0, 1), r(Some(1), 2, 3), w(2, 4, 5), r(Some(2), 6, 7)]).is_ok());
        // A read overlapping a write may see either value.
        assert!(check(Some(0), &[w(1, 0, 10), r(Some(0), 1, 2), r(Some(1), 3, 4)]).is_ok());
        assert!(check(None, &[r(None, 0, 1)]).is_ok());
    }

    #[test]
    fn a_stale_read_after_a_completed_write_fails() {
        assert!(check(Some(0), &[w(1, 0, 1), r(Some(0), 2, 3)]).is_err());
    }

    #[test]
    fn a_read_of_a_value_never_written_fails() {
        assert!(check(Some(0), &[w(1, 0, 1), r(Some(7), 2, 3)]).is_err());
    }

    #[test]
    fn reads_that_go_back_in_time_fail() {
        // Both writes done before either read: the reads must agree.
        let h = [w(1, 0, 10), w(2, 0, 10), r(Some(2), 11, 12), r(Some(1), 13, 14)];
        assert!(check(Some(0), &h).is_err());
        // While the writes are still running, the same reads are fine.
        let h = [w(1, 0, 20), w(2, 0, 20), r(Some(2), 11, 12), r(Some(1), 13, 14)];
        assert!(check(Some(0), &h).is_ok());
    }

    #[test]
    fn a_lost_acknowledged_write_fails() {
        // Acknowledged, then a later read sees the value before it.
        let h = [w(1, 0, 1), w(2, 2, 3), r(Some(1), 4, 5)];
        assert!(check(None, &h).is_err());
    }

    #[test]
    fn writes_of_unknown_outcome_may_apply_late_or_never() {
        assert!(check(Some(0), &[unknown_write(5, 0), r(Some(0), 1, 2), r(Some(5), 3, 4)]).is_ok());
        assert!(check(Some(0), &[unknown_write(5, 0), r(Some(0), 1, 2)]).is_ok());
        // ...but not before they were sent.
        assert!(check(Some(0), &[r(Some(5), 0, 1), unknown_write(5, 2)]).is_err());
        // ...and once, not twice: 5, then 6, then 5 again is impossible.
        let h = [unknown_write(5, 0), r(Some(5), 1, 2), w(6, 3, 4), r(Some(5), 5, 6)];
        assert!(check(Some(0), &h).is_err());
    }

    proptest! {
        /// Histories of a real atomic register, each operation taking effect at a random
        /// instant inside a random interval, always pass.
        #[test]
        fn histories_of_an_atomic_register_pass(
            ops in prop::collection::vec((any::<bool>(), 0u64..1_000, 1u64..50, 0u64..50, any::<bool>()), 1..60)
        ) {
            // (is write, call, effect delay, return delay, outcome known)
            let mut effects: Vec<(u64, usize)> =
                ops.iter().enumerate().map(|(i, (_, call, d, _, _))| (call + d, i)).collect();
            effects.sort();
            let mut value = None;
            let mut history = vec![Event { op: Op::Read(None), call: 0, ret: None }; ops.len()];
            for (at, i) in effects {
                let (write, call, _, back, known) = ops[i];
                let ret = Some(at + back + 1);
                history[i] = if write {
                    value = Some(i as u64);
                    Event { op: Op::Write(i as u64), call, ret: if known { ret } else { None } }
                } else {
                    Event { op: Op::Read(value), call, ret }
                };
            }
            prop_assert!(check(None, &history).is_ok(), "{history:?}");
        }
    }
}
