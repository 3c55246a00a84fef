//! What to do next with the members of one replica set: bootstrap, restart, replace, roll.
//!
//! Pure: the provisioner (Kubernetes Pods and PVCs, or local processes and directories)
//! observes the members, the Raft view comes from the members' `GET /v1/status`, and
//! [`next_action`] returns the single next step. One step at a time is the whole safety
//! argument: membership changes one voter at a time, a replacement is a voter before the
//! lost member is removed (never below a majority), and planned restarts go follower by
//! follower, the leader last after its leadership has moved.

use std::collections::{BTreeMap, BTreeSet};

/// A learner counts as caught up when it is at most this many entries behind the leader.
pub const CATCH_UP_LAG: u64 = 100;

/// One member as the provisioner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub zone: String,
    /// Its Pod or process exists.
    pub running: bool,
    /// Its PVC or data directory exists: the member can come back with its data.
    pub has_data: bool,
    /// Running and answering `/readyz`.
    pub ready: bool,
    /// Runs an older spec (image, resources, flags) than the desired one.
    pub outdated: bool,
    /// Down (its Pod pending, terminating or not ready, or its node lost) for longer than
    /// the failure period: declared lost. It is replaced like a member whose data is gone,
    /// but its data is deleted only once the replacement is a voter, and it is no longer
    /// started again on its volume (a Pod on a lost node never finishes terminating).
    pub failed: bool,
    /// Declared lost, yet its Pod is gone and the node holding its volume is Ready again
    /// (the node came back after the failure period): it may start again on its data,
    /// which costs nothing, as long as its replacement has not joined Raft.
    pub returned: bool,
}

/// The replica set's Raft configuration, as its leader reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftView {
    /// Every reachable member reports that it was never initialised.
    Uninitialized,
    /// Initialised, but no leader answers now (an election, or a majority down).
    NoLeader,
    Led(Membership),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub leader: u64,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// Entries each member is behind the leader (absent: unknown).
    pub lag: BTreeMap<u64, u64>,
}

/// The next step for a replica set. The provisioner carries it out and observes again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Everything is as it should be.
    Steady,
    /// Nothing to do until the world changes (a Pod starting, an election, a catch-up).
    Wait(String),
    /// Provision a new member (Pod + PVC, or process + directory) in this zone.
    Create {
        id: u64,
        zone: String,
    },
    /// Start the member again on its existing data (its Pod or process is gone).
    Start {
        id: u64,
    },
    /// Initialise Raft with these voters (a new replica set).
    Bootstrap {
        voters: Vec<u64>,
    },
    AddLearner {
        id: u64,
    },
    /// Set the voters to exactly this set: one member more or less than now.
    ChangeVoters {
        voters: BTreeSet<u64>,
    },
    /// Remove the member from the Raft configuration.
    RemoveMember {
        id: u64,
    },
    /// Deprovision the member: its Pod/process and its PVC/directory.
    Delete {
        id: u64,
    },
    /// Planned restart: stop the member so it starts again with the new spec.
    Restart {
        id: u64,
    },
    TransferLeader {
        to: u64,
    },
}

/// The step as a sentence, for conditions and Events (`member 4 is being added as a
/// learner`), never Rust debug text.
impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = |v: &mut dyn Iterator<Item = u64>| v.map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        match self {
            Action::Steady => write!(f, "nothing to do: every member is healthy"),
            Action::Wait(why) => write!(f, "waiting: {why}"),
            Action::Create { id, zone } => write!(f, "creating member {id} in zone {zone}"),
            Action::Start { id } => write!(f, "starting member {id} again on its volume"),
            Action::Bootstrap { voters } => {
                write!(f, "initialising the replica set with members {}", ids(&mut voters.iter().copied()))
            }
            Action::AddLearner { id } => write!(f, "adding member {id} as a learner"),
            Action::ChangeVoters { voters } => {
                write!(f, "changing the voters to members {}", ids(&mut voters.iter().copied()))
            }
            Action::RemoveMember { id } => write!(f, "removing member {id} from the replica set"),
            Action::Delete { id } => write!(f, "deleting member {id} and its volume"),
            Action::Restart { id } => write!(f, "restarting member {id} for a new spec"),
            Action::TransferLeader { to } => write!(f, "moving leadership to member {to}"),
        }
    }
}

/// The desired shape of a replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// One zone per member: `zones[i]` is the zone of the i-th member slot.
    pub zones: Vec<String>,
}

/// The single next step, given what is observed.
pub fn next_action(desired: &Desired, members: &[MemberView], raft: &RaftView) -> Action {
    let by_id: BTreeMap<u64, &MemberView> = members.iter().map(|m| (m.id, m)).collect();
    let next_id = members.iter().map(|m| m.id).max().unwrap_or(0) + 1;

    // A member whose process is gone but whose data survives comes back as it was: the
    // cheapest repair, and safe at any time. Under a leader, only a member of the Raft
    // configuration: one outside it holds nothing the replica set needs (a replacement
    // that never joined, a removed member whose Pod went before its volume) and is
    // deleted instead; with no leader to say, every one.
    let member_of_raft = |id: &u64| match raft {
        RaftView::Led(ms) => ms.voters.contains(id) || ms.learners.contains(id),
        _ => true,
    };
    if let Some(m) = members.iter().find(|m| m.has_data && !m.running && !m.failed && member_of_raft(&m.id)) {
        return Action::Start { id: m.id };
    }
    // One declared lost whose node came back comes back too, while its replacement is
    // not yet in Raft (no learner, no surplus voter): its data beats a full copy. Once
    // the replacement is a learner, the replacement goes on.
    if let RaftView::Led(ms) = raft
        && ms.learners.is_empty()
        && ms.voters.len() <= desired.zones.len()
        && let Some(m) =
            members.iter().find(|m| m.has_data && !m.running && m.failed && m.returned && ms.voters.contains(&m.id))
    {
        return Action::Start { id: m.id };
    }

    match raft {
        RaftView::Uninitialized => bootstrap(desired, members, next_id),
        RaftView::NoLeader => Action::Wait("no leader: waiting for an election".into()),
        RaftView::Led(ms) => led(desired, members, &by_id, ms, next_id),
    }
}

fn bootstrap(desired: &Desired, members: &[MemberView], next_id: u64) -> Action {
    // Fill each desired zone slot with a member; then initialise once all are ready.
    let mut free: Vec<&MemberView> = members.iter().filter(|m| m.has_data).collect();
    for zone in &desired.zones {
        match free.iter().position(|m| &m.zone == zone) {
            Some(i) => {
                free.remove(i);
            }
            None => return Action::Create { id: next_id, zone: zone.clone() },
        }
    }
    if let Some(m) = members.iter().find(|m| !m.ready) {
        return Action::Wait(format!("member {} is not ready", m.id));
    }
    Action::Bootstrap { voters: members.iter().filter(|m| m.has_data).map(|m| m.id).collect() }
}

fn led(
    desired: &Desired,
    members: &[MemberView],
    by_id: &BTreeMap<u64, &MemberView>,
    ms: &Membership,
    next_id: u64,
) -> Action {
    let healthy = |id: &u64| by_id.get(id).is_some_and(|m| m.has_data && m.ready && !m.failed);
    // Voters whose data is gone (PVC or directory lost, or never seen), or declared lost
    // after the failure period: they must be replaced.
    let lost: Vec<u64> =
        ms.voters.iter().copied().filter(|id| !by_id.get(id).is_some_and(|m| m.has_data && !m.failed)).collect();

    // 1. A learner that has caught up becomes a voter (the replacement's promotion).
    for l in &ms.learners {
        if healthy(l) && ms.lag.get(l).is_some_and(|lag| *lag <= CATCH_UP_LAG) {
            let mut voters = ms.voters.clone();
            voters.insert(*l);
            return Action::ChangeVoters { voters };
        }
    }
    if let Some(l) = ms.learners.iter().find(|l| by_id.get(l).is_some_and(|m| m.has_data && !m.failed)) {
        return Action::Wait(format!("learner {l} is catching up"));
    }
    // A learner whose data is gone, or declared lost, is simply removed (a learner never
    // counts towards a majority); a new replacement follows.
    if let Some(l) = ms.learners.iter().next() {
        return Action::RemoveMember { id: *l };
    }

    // 2. More voters than desired (a replacement was promoted): remove a lost one, or the
    //    newest surplus if none is lost. Never the leader: move leadership first.
    if ms.voters.len() > desired.zones.len() {
        let victim = lost.first().copied().or_else(|| surplus_voter(desired, members, ms));
        if let Some(id) = victim {
            if id == ms.leader {
                if let Some(to) = ms.voters.iter().copied().find(|v| *v != id && healthy(v)) {
                    return Action::TransferLeader { to };
                }
                return Action::Wait("no healthy voter to take over leadership".into());
            }
            return Action::RemoveMember { id };
        }
    }

    // 3. A lost voter: bring in a replacement in its zone (created, then added as learner).
    //    One declared lost by the failure period (its data still there) only while a
    //    majority of the voters is healthy: the operator may be the one cut off, and
    //    without a majority no membership change commits anyway; nothing is forced.
    if let Some(lost_id) = lost.first() {
        let declared = by_id.get(lost_id).is_some_and(|m| m.has_data);
        let up = ms.voters.iter().filter(|v| healthy(v)).count();
        if declared && up * 2 <= ms.voters.len() {
            return Action::Wait(format!(
                "member {lost_id} is lost and only {up} of {} voters are healthy: no majority, nothing is replaced",
                ms.voters.len()
            ));
        }
        let zone = by_id.get(lost_id).map(|m| m.zone.clone()).or_else(|| missing_zone(desired, members, ms));
        let Some(zone) = zone else {
            return Action::Wait(format!("no zone known for lost member {lost_id}"));
        };
        match candidate(members, ms, &zone) {
            None => return Action::Create { id: next_id, zone },
            Some(r) if !r.ready => return Action::Wait(format!("replacement {} is not ready", r.id)),
            Some(r) => return Action::AddLearner { id: r.id },
        }
    }

    // 4. Fewer voters than desired (a zone never filled): same path as a replacement.
    if ms.voters.len() < desired.zones.len()
        && let Some(zone) = missing_zone(desired, members, ms)
    {
        return match candidate(members, ms, &zone) {
            None => Action::Create { id: next_id, zone },
            Some(r) if !r.ready => Action::Wait(format!("member {} is not ready", r.id)),
            Some(r) => Action::AddLearner { id: r.id },
        };
    }

    // 5. Members outside the Raft configuration (a replaced member's leftovers): deprovision.
    if let Some(m) = members.iter().find(|m| !ms.voters.contains(&m.id) && !ms.learners.contains(&m.id)) {
        return Action::Delete { id: m.id };
    }

    // 6. Planned restarts, only when everything is healthy: followers first, the leader
    //    last after its leadership has moved.
    if let Some(step) = rolling_step(members, ms) {
        return step;
    }
    if let Some(m) = members.iter().find(|m| !m.ready) {
        return Action::Wait(format!("member {} is not ready", m.id));
    }
    Action::Steady
}

/// A member of `zone` outside Raft that can join it: one declared lost, or whose Pod is
/// gone, is passed over (it is deleted with the other leftovers once the repair is done),
/// and another made.
fn candidate<'a>(members: &'a [MemberView], ms: &Membership, zone: &str) -> Option<&'a MemberView> {
    let in_raft = |id: &u64| ms.voters.contains(id) || ms.learners.contains(id);
    members.iter().find(|m| m.zone == zone && m.has_data && m.running && !m.failed && !in_raft(&m.id))
}

fn missing_zone(desired: &Desired, members: &[MemberView], ms: &Membership) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &ms.voters {
        if let Some(m) = members.iter().find(|m| m.id == *v && m.has_data) {
            *counts.entry(m.zone.as_str()).or_default() += 1;
        }
    }
    for zone in &desired.zones {
        match counts.get_mut(zone.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => return Some(zone.clone()),
        }
    }
    None
}

/// With more voters than desired and none lost: the newest voter in a zone that has more
/// voters than it should.
fn surplus_voter(desired: &Desired, members: &[MemberView], ms: &Membership) -> Option<u64> {
    let want = |zone: &str| desired.zones.iter().filter(|z| z.as_str() == zone).count();
    ms.voters.iter().rev().copied().find(|v| {
        members.iter().find(|m| m.id == *v).is_some_and(|m| {
            let have = ms.voters.iter().filter(|o| members.iter().any(|x| x.id == **o && x.zone == m.zone)).count();
            have > want(&m.zone)
        })
    })
}

/// The next planned-restart step, if any member is outdated and the set is healthy.
pub fn rolling_step(members: &[MemberView], ms: &Membership) -> Option<Action> {
    if !members.iter().any(|m| m.outdated) {
        return None;
    }
    let all_healthy = members.iter().all(|m| m.ready)
        && ms.voters.iter().all(|v| *v == ms.leader || ms.lag.get(v).is_some_and(|l| *l <= CATCH_UP_LAG));
    if !all_healthy {
        return Some(Action::Wait("a member is not healthy: the rolling restart waits".into()));
    }
    restart_order(members, ms.leader).into_iter().next()
}

/// The order of a planned rolling restart: outdated followers by id, then the leader's
/// leadership moved to an up-to-date follower, then the old leader.
pub fn restart_order(members: &[MemberView], leader: u64) -> Vec<Action> {
    let mut steps: Vec<Action> =
        members.iter().filter(|m| m.outdated && m.id != leader).map(|m| Action::Restart { id: m.id }).collect();
    if members.iter().any(|m| m.outdated && m.id == leader) {
        // After the followers are restarted they are current; prefer the lowest id.
        if let Some(to) = members.iter().map(|m| m.id).find(|id| *id != leader) {
            steps.push(Action::TransferLeader { to });
        }
        steps.push(Action::Restart { id: leader });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        Desired { zones: vec!["a".into(), "b".into(), "c".into()] }
    }

    fn member(id: u64, zone: &str) -> MemberView {
        MemberView {
            id,
            zone: zone.into(),
            running: true,
            has_data: true,
            ready: true,
            outdated: false,
            failed: false,
            returned: false,
        }
    }

    fn three() -> Vec<MemberView> {
        vec![member(1, "a"), member(2, "b"), member(3, "c")]
    }

    fn led_by(leader: u64, voters: &[u64], learners: &[u64]) -> RaftView {
        RaftView::Led(Membership {
            leader,
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            lag: voters.iter().chain(learners).map(|v| (*v, 0)).collect(),
        })
    }

    #[test]
    fn a_new_replica_set_creates_one_member_per_zone_then_bootstraps() {
        let d = desired();
        assert_eq!(next_action(&d, &[], &RaftView::Uninitialized), Action::Create { id: 1, zone: "a".into() });
        let one = vec![member(1, "a")];
        assert_eq!(next_action(&d, &one, &RaftView::Uninitialized), Action::Create { id: 2, zone: "b".into() });
        let mut m = three();
        m[2].ready = false;
        assert!(matches!(next_action(&d, &m, &RaftView::Uninitialized), Action::Wait(_)));
        assert_eq!(next_action(&d, &three(), &RaftView::Uninitialized), Action::Bootstrap { voters: vec![1, 2, 3] });
    }

    #[test]
    fn a_healthy_replica_set_is_steady() {
        assert_eq!(next_action(&desired(), &three(), &led_by(1, &[1, 2, 3], &[])), Action::Steady);
    }

    #[test]
    fn a_dead_process_with_its_data_is_started_again() {
        let mut m = three();
        m[1].running = false;
        m[1].ready = false;
        assert_eq!(next_action(&desired(), &m, &led_by(1, &[1, 2, 3], &[])), Action::Start { id: 2 });
        // Even with no leader (two of three down), starting members is what heals it.
        assert_eq!(next_action(&desired(), &m, &RaftView::NoLeader), Action::Start { id: 2 });
    }

    /// Walks the whole replacement of member 2 (its data gone), carrying out each action
    /// on a model of the world, and checks the order of the membership steps.
    #[test]
    fn a_member_whose_data_is_gone_is_replaced_in_its_zone_one_step_at_a_time() {
        let d = desired();
        let mut members = three();
        members[1].has_data = false;
        members[1].running = false;
        members[1].ready = false;
        let mut ms = Membership { leader: 1, voters: [1, 2, 3].into(), learners: [].into(), lag: BTreeMap::new() };
        let mut steps = Vec::new();
        for _ in 0..20 {
            let a = next_action(&d, &members, &RaftView::Led(ms.clone()));
            steps.push(a.clone());
            // Never fewer voters with data than a majority of the configuration.
            let alive = ms.voters.iter().filter(|v| members.iter().any(|m| m.id == **v && m.has_data)).count();
            assert!(alive * 2 > ms.voters.len(), "below a majority at {a:?}");
            match a {
                Action::Steady => break,
                Action::Create { id, zone } => {
                    assert_eq!(zone, "b");
                    members.push(MemberView {
                        id,
                        zone,
                        running: true,
                        has_data: true,
                        ready: true,
                        outdated: false,
                        failed: false,
                        returned: false,
                    });
                }
                Action::AddLearner { id } => {
                    ms.learners.insert(id);
                    ms.lag.insert(id, 0);
                }
                Action::ChangeVoters { voters } => {
                    assert_eq!(voters.symmetric_difference(&ms.voters).count(), 1, "one voter at a time");
                    for v in &voters {
                        ms.learners.remove(v);
                    }
                    ms.voters = voters;
                }
                Action::RemoveMember { id } => {
                    ms.voters.remove(&id);
                    ms.learners.remove(&id);
                }
                Action::Delete { id } => members.retain(|m| m.id != id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            steps,
            vec![
                Action::Create { id: 4, zone: "b".into() },
                Action::AddLearner { id: 4 },
                Action::ChangeVoters { voters: [1, 2, 3, 4].into() },
                Action::RemoveMember { id: 2 },
                Action::Delete { id: 2 },
                Action::Steady,
            ]
        );
        assert_eq!(ms.voters, [1, 3, 4].into());
    }

    /// A member down past the failure period (its node lost: its Pod stuck Terminating,
    /// so not running, but its volume there) is replaced as one whose data is gone, and is
    /// never started again on its volume meanwhile; its data goes last.
    #[test]
    fn a_member_declared_lost_is_replaced_not_started_and_deleted_only_after_its_replacement_votes() {
        let d = desired();
        let mut members = three();
        members[1].running = false;
        members[1].ready = false;
        // Within the period: it is started again (the provisioner waits for its old Pod).
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::Start { id: 2 });
        members[1].failed = true;
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::Create { id: 4, zone: "b".into() });
        members.push(member(4, "b"));
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::AddLearner { id: 4 });
        assert_eq!(
            next_action(&d, &members, &led_by(1, &[1, 2, 3], &[4])),
            Action::ChangeVoters { voters: [1, 2, 3, 4].into() }
        );
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3, 4], &[])), Action::RemoveMember { id: 2 });
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 3, 4], &[])), Action::Delete { id: 2 });
    }

    /// A replacement lost in its turn (its node lost too) never holds up the repair: as a
    /// learner it is removed from Raft, and before it joined it is passed over; either way
    /// another is made and the lost ones are deleted at the end.
    #[test]
    fn a_lost_learner_is_removed_and_a_lost_replacement_is_passed_over() {
        let d = desired();
        let mut members = three();
        members[1].running = false;
        members[1].ready = false;
        members[1].failed = true;
        let mut m4 = member(4, "b");
        m4.ready = false;
        m4.failed = true;
        members.push(m4);
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[4])), Action::RemoveMember { id: 4 });
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::Create { id: 5, zone: "b".into() });
        members.push(member(5, "b"));
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::AddLearner { id: 5 });
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3, 5], &[])), Action::RemoveMember { id: 2 });
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 3, 5], &[])), Action::Delete { id: 2 });
        members.remove(1);
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 3, 5], &[])), Action::Delete { id: 4 });
    }

    /// Its node back after the failure period (its Pod gone, its volume there): the member
    /// starts again on its data rather than be copied in full, until its replacement is a
    /// learner; from then on the replacement goes ahead.
    #[test]
    fn a_lost_member_whose_node_returns_starts_again_until_its_replacement_is_a_learner() {
        let d = desired();
        let mut members = three();
        members[1].running = false;
        members[1].ready = false;
        members[1].failed = true;
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::Create { id: 4, zone: "b".into() });
        members[1].returned = true;
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::Start { id: 2 });
        // A replacement created but not in Raft yet: still the cheaper repair.
        members.push(member(4, "b"));
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3], &[])), Action::Start { id: 2 });
        // Its replacement is a learner: no going back.
        assert_eq!(
            next_action(&d, &members, &led_by(1, &[1, 2, 3], &[4])),
            Action::ChangeVoters { voters: [1, 2, 3, 4].into() }
        );
        assert_eq!(next_action(&d, &members, &led_by(1, &[1, 2, 3, 4], &[])), Action::RemoveMember { id: 2 });
        // Without a leader nothing says where the replacement is: it stays lost.
        assert_eq!(
            next_action(&d, &members, &RaftView::NoLeader),
            Action::Wait("no leader: waiting for an election".into())
        );
    }

    #[test]
    fn nothing_is_replaced_without_a_majority_of_healthy_voters() {
        let mut members = three();
        for m in &mut members[1..] {
            m.running = true;
            m.ready = false;
            m.failed = true;
        }
        let a = next_action(&desired(), &members, &led_by(1, &[1, 2, 3], &[]));
        assert_eq!(
            a,
            Action::Wait(
                "member 2 is lost and only 1 of 3 voters are healthy: no majority, nothing is replaced".into()
            )
        );
        // One of the two healthy again: a majority, and the other is replaced.
        members[2] = member(3, "c");
        assert_eq!(
            next_action(&desired(), &members, &led_by(1, &[1, 2, 3], &[])),
            Action::Create { id: 4, zone: "b".into() }
        );
    }

    #[test]
    fn a_learner_still_behind_is_not_promoted() {
        let mut ms = Membership { leader: 1, voters: [1, 3].into(), learners: [4].into(), lag: BTreeMap::new() };
        ms.lag.insert(4, CATCH_UP_LAG + 1);
        let members = vec![member(1, "a"), member(3, "c"), member(4, "b")];
        assert!(matches!(next_action(&desired(), &members, &RaftView::Led(ms)), Action::Wait(_)));
    }

    #[test]
    fn a_lost_leader_is_removed_only_after_leadership_moves() {
        // Voters 1..4 after a promotion, and the lost member is the leader itself (its
        // disk failed under it: it still leads from memory).
        let mut members = vec![member(1, "a"), member(2, "b"), member(3, "c"), member(4, "a")];
        members[0].has_data = false;
        members[0].running = true;
        let a = next_action(&desired(), &members, &led_by(1, &[1, 2, 3, 4], &[]));
        assert_eq!(a, Action::TransferLeader { to: 2 });
        let a = next_action(&desired(), &members, &led_by(2, &[1, 2, 3, 4], &[]));
        assert_eq!(a, Action::RemoveMember { id: 1 });
    }

    #[test]
    fn a_rolling_restart_goes_follower_by_follower_and_the_leader_last() {
        let mut m = three();
        for x in &mut m {
            x.outdated = true;
        }
        assert_eq!(
            restart_order(&m, 2),
            vec![
                Action::Restart { id: 1 },
                Action::Restart { id: 3 },
                Action::TransferLeader { to: 1 },
                Action::Restart { id: 2 }
            ]
        );
        assert_eq!(next_action(&desired(), &m, &led_by(2, &[1, 2, 3], &[])), Action::Restart { id: 1 });
        // Only the leader left outdated: move leadership first.
        let mut m = three();
        m[1].outdated = true;
        assert_eq!(next_action(&desired(), &m, &led_by(2, &[1, 2, 3], &[])), Action::TransferLeader { to: 1 });
    }

    #[test]
    fn a_rolling_restart_waits_while_a_follower_lags() {
        let mut m = three();
        m[0].outdated = true;
        let mut ms = Membership { leader: 2, voters: [1, 2, 3].into(), learners: [].into(), lag: BTreeMap::new() };
        ms.lag.insert(1, 0);
        ms.lag.insert(3, CATCH_UP_LAG * 10);
        assert!(matches!(next_action(&desired(), &m, &RaftView::Led(ms)), Action::Wait(_)));
    }
}
