//! When a member is declared lost: the failure period.
//!
//! A member whose Pod is not Ready (Pending, Terminating, failed, gone, or running on a
//! node that is NotReady or gone) for longer than [`Failover::period`] is declared lost,
//! and the replica set replaces it like a member whose volume is gone (a new member in its
//! zone, added as a learner, made a voter, then the lost one removed and deleted). Its
//! volume is kept until then: a node that comes back within the period brings the member
//! back with its data, which costs nothing, while a replacement copies the whole data set.
//!
//! The time a member was first seen unhealthy is kept on its PVC (annotation
//! [`ANNOTATION_UNHEALTHY_SINCE`]): the PVC is the member (it outlives its Pods, which a
//! lost node's Pod garbage collection or an eviction replaces), and an annotation outlives
//! the operator, so neither a restart nor a change of leader among its replicas starts
//! the period again, and none can shorten it either: the time is set when absent, and
//! cleared when the member is healthy again.
//!
//! Time counts only while the replica set has a leader (a majority healthy): a pass that
//! sees no leader clears every time not yet past the period, so after a leaderless outage
//! the members that come back last are not declared lost the moment the others form a
//! majority (a datanode is Ready only once it has a leader). And the period starts again
//! when the member gets a new Pod (its uid, kept in [`ANNOTATION_UNHEALTHY_POD`]): a
//! restarted member (a rolling restart, or one started again once its node came back)
//! gets a whole period to recover its storage and rejoin. A member already declared lost
//! stays lost through a leaderless pass: an election during its replacement never undoes
//! the replacement.
//!
//! Pure, apart from the clock ([`Clock`], fixed in tests).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};

use super::objects::ZONE_LABEL;

/// On a member's PVC: when the operator first saw the member unhealthy (RFC 3339).
pub const ANNOTATION_UNHEALTHY_SINCE: &str = "nimbus.io/unhealthy-since";

/// On a member's PVC, with the time: the uid of its Pod when the period started (empty
/// when it had none). Another Pod since (a new one started) starts the period again.
pub const ANNOTATION_UNHEALTHY_POD: &str = "nimbus.io/unhealthy-pod";

/// The annotation the scheduler sets on a PVC it binds with its first Pod (storage classes
/// with `WaitForFirstConsumer`, local volumes always): the node the volume is on.
pub const ANNOTATION_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// How long past its deletion time (the request plus its grace period) a terminating Pod
/// is given before it is force-deleted: its kubelet kills it at the end of the grace
/// period, and confirms soon after unless it is gone with its node.
pub const TERMINATION_SLACK: Duration = Duration::from_secs(30);

/// What a pass does with a member's failure record (the time and Pod on its PVC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to write: healthy with no record, unhealthy within the period, or unhealthy
    /// with no leader to count against.
    Keep,
    /// The record goes: healthy again, or no leader before the period was over.
    Clear,
    /// The period starts now, with the member's current Pod.
    Start,
    /// Unhealthy for longer than the period, since then: declared lost.
    Lost(Timestamp),
}

/// A member's failure record as its PVC keeps it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Record<'a> {
    pub since: Option<&'a str>,
    pub pod: Option<&'a str>,
}

/// The failure period by default: the TiDB operator's (`--pd-failover-period`,
/// `--tikv-failover-period`: 5 minutes). Longer than a node's reboot, so a routine restart
/// never costs a full copy of the data; and it adds to the node controller's 40 s before
/// a lost node is marked NotReady.
pub const DEFAULT_FAILURE_PERIOD: Duration = Duration::from_secs(5 * 60);
/// The same, as `--member-failure-period` takes it.
pub const DEFAULT_FAILURE_PERIOD_FLAG: &str = "5m";

/// The operator's clock: the system's, or a fixed one that tests move.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<Mutex<Timestamp>>>);

impl Clock {
    pub fn fixed(at: Timestamp) -> Clock {
        Clock(Some(Arc::new(Mutex::new(at))))
    }

    pub fn now(&self) -> Timestamp {
        match &self.0 {
            Some(t) => *t.lock().unwrap_or_else(|p| p.into_inner()),
            None => Timestamp::now(),
        }
    }

    /// Moves a fixed clock on (the system clock moves by itself).
    pub fn advance(&self, by: Duration) {
        if let Some(t) = &self.0 {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            *t =
                t.saturating_add(jiff::SignedDuration::try_from(by).unwrap_or(jiff::SignedDuration::MAX)).unwrap_or(*t);
        }
    }
}

/// How long a member may be unhealthy before it is declared lost, and the clock that says.
#[derive(Clone)]
pub struct Failover {
    pub period: Duration,
    pub clock: Clock,
}

impl Default for Failover {
    fn default() -> Self {
        Failover { period: DEFAULT_FAILURE_PERIOD, clock: Clock::default() }
    }
}

impl Failover {
    /// Whether a member unhealthy since `since` is lost by now.
    pub fn lost(&self, since: Timestamp, now: Timestamp) -> bool {
        now.duration_since(since) >= jiff::SignedDuration::try_from(self.period).unwrap_or(jiff::SignedDuration::MAX)
    }

    /// This pass's verdict on one member: `unhealthy` as [`unhealthy`] says, `leaderless`
    /// when the replica set has no leader now, `pod` the uid of its current Pod.
    pub fn judge(
        &self,
        unhealthy: bool,
        leaderless: bool,
        record: Record<'_>,
        pod: Option<&str>,
        now: Timestamp,
    ) -> Verdict {
        let recorded = record.since.is_some() || record.pod.is_some();
        if !unhealthy {
            return if recorded { Verdict::Clear } else { Verdict::Keep };
        }
        // A Pod other than the one the period started with: a new attempt (a Pod that
        // merely went away is not one: its node may be lost with it).
        let new_pod = pod.is_some_and(|uid| Some(uid) != record.pod.filter(|p| !p.is_empty()));
        // An unreadable time (edited by hand) counts from now: never shorter.
        let since = record.since.and_then(|s| s.parse::<Timestamp>().ok());
        match since {
            Some(t) if self.lost(t, now) && !new_pod => Verdict::Lost(t),
            _ if leaderless => {
                if recorded {
                    Verdict::Clear
                } else {
                    Verdict::Keep
                }
            }
            Some(_) if !new_pod => Verdict::Keep,
            _ => Verdict::Start,
        }
    }
}

/// Whether a Pod must be deleted without waiting for its kubelet: its node is NotReady or
/// gone (no kubelet will confirm), or it is terminating past its grace period.
pub fn force_delete(pod: &Pod, nodes: &BTreeMap<String, Node>, now: Timestamp) -> bool {
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
        && !nodes.get(node).is_some_and(node_ready)
    {
        return true;
    }
    let slack = jiff::SignedDuration::try_from(TERMINATION_SLACK).unwrap_or(jiff::SignedDuration::ZERO);
    pod.metadata.deletion_timestamp.as_ref().is_some_and(|t| now.duration_since(t.0) > slack)
}

/// Whether the node a member's volume is on is Ready: the node the scheduler chose for it
/// ([`ANNOTATION_SELECTED_NODE`]); a volume not tied to a node (no such annotation) can
/// be used anywhere in its zone, so then whether the zone has a node to take it.
pub fn volume_node_ready(selected: Option<&str>, nodes: &BTreeMap<String, Node>, zone: &str) -> bool {
    match selected {
        Some(node) => nodes.get(node).is_some_and(node_schedulable),
        None => zone_schedulable(nodes.values(), zone),
    }
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A node new Pods can go to: Ready and not cordoned.
pub fn node_schedulable(node: &Node) -> bool {
    node_ready(node) && !node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
}

/// Whether any node of `zone` can take a new member.
pub fn zone_schedulable<'a>(nodes: impl IntoIterator<Item = &'a Node>, zone: &str) -> bool {
    nodes.into_iter().any(|n| {
        n.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).is_some_and(|z| z == zone) && node_schedulable(n)
    })
}

/// Why a member with a volume is unhealthy, if it is: its Pod (absent, Pending,
/// Terminating, failed, not Ready) and the node the Pod is bound to (NotReady, gone).
pub fn unhealthy(pod: Option<&Pod>, nodes: &BTreeMap<String, Node>) -> Option<String> {
    let Some(pod) = pod else { return Some("it has no Pod".into()) };
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("its Pod is terminating".into());
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase != "Running" {
        return Some(format!("its Pod is {phase}"));
    }
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        match nodes.get(node) {
            None => return Some(format!("its node {node} is gone")),
            Some(n) if !node_ready(n) => return Some(format!("its node {node} is not Ready")),
            Some(_) => {}
        }
    }
    if !super::provisioner::pod_ready(pod) {
        return Some("its Pod is not Ready".into());
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn node(name: &str, zone: &str, ready: bool, cordoned: bool) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {ZONE_LABEL: zone}},
            "spec": {"unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "Unknown" }}]}}))
        .unwrap()
    }

    fn pod(node: &str, phase: &str, ready: bool, terminating: bool) -> Pod {
        let mut p = json!({"metadata": {"name": "m"}, "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        if terminating {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn a_member_is_unhealthy_when_its_pod_or_its_node_is() {
        let nodes: BTreeMap<String, Node> = [node("n1", "a", true, false), node("n2", "a", false, false)]
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap(), n))
            .collect();
        assert_eq!(unhealthy(Some(&pod("n1", "Running", true, false)), &nodes), None);
        assert_eq!(unhealthy(None, &nodes).unwrap(), "it has no Pod");
        assert_eq!(unhealthy(Some(&pod("n1", "Pending", false, false)), &nodes).unwrap(), "its Pod is Pending");
        assert_eq!(unhealthy(Some(&pod("n1", "Running", true, true)), &nodes).unwrap(), "its Pod is terminating");
        assert_eq!(unhealthy(Some(&pod("n1", "Running", false, false)), &nodes).unwrap(), "its Pod is not Ready");
        // A NotReady node: the node controller marks its Pods not Ready only after 40 s.
        assert_eq!(unhealthy(Some(&pod("n2", "Running", true, false)), &nodes).unwrap(), "its node n2 is not Ready");
        assert_eq!(unhealthy(Some(&pod("n3", "Running", true, false)), &nodes).unwrap(), "its node n3 is gone");
    }

    #[test]
    fn a_zone_takes_new_members_only_on_a_ready_uncordoned_node() {
        assert!(zone_schedulable(&[node("n1", "a", true, false)], "a"));
        assert!(!zone_schedulable(&[node("n1", "a", true, false)], "b"));
        assert!(!zone_schedulable(&[node("n1", "a", false, false), node("n2", "a", true, true)], "a"));
    }

    #[test]
    fn the_flags_default_is_the_default_period() {
        let d: jiff::SignedDuration = DEFAULT_FAILURE_PERIOD_FLAG.parse().unwrap();
        assert_eq!(Duration::try_from(d).unwrap(), DEFAULT_FAILURE_PERIOD);
    }

    /// Item 4 of the review: after a leaderless outage, no member is lost the moment the
    /// others form a majority; a new Pod starts the period again; lost stays lost.
    #[test]
    fn time_counts_only_with_a_leader_and_from_the_members_latest_pod() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let f = Failover { period: Duration::from_secs(300), clock: Clock::fixed(t0) };
        let old = "2026-01-01T00:00:00Z";
        let at = |secs: i64| t0.checked_add(jiff::SignedDuration::from_secs(secs)).unwrap();
        let rec = |pod| Record { since: Some(old), pod: Some(pod) };
        // Healthy: the record goes (and nothing is written without one).
        assert_eq!(f.judge(false, false, rec("a"), Some("a"), at(10)), Verdict::Clear);
        assert_eq!(f.judge(false, false, Record::default(), Some("a"), at(10)), Verdict::Keep);
        // First seen unhealthy: the period starts, unless there is no leader to count against.
        assert_eq!(f.judge(true, false, Record::default(), Some("a"), at(10)), Verdict::Start);
        assert_eq!(f.judge(true, true, Record::default(), Some("a"), at(10)), Verdict::Keep);
        // Within the period; and no leader within it clears the time.
        assert_eq!(f.judge(true, false, rec("a"), Some("a"), at(299)), Verdict::Keep);
        assert_eq!(f.judge(true, true, rec("a"), Some("a"), at(299)), Verdict::Clear);
        // Past it: lost, and a leaderless pass does not undo it.
        assert_eq!(f.judge(true, false, rec("a"), Some("a"), at(300)), Verdict::Lost(t0));
        assert_eq!(f.judge(true, true, rec("a"), Some("a"), at(300)), Verdict::Lost(t0));
        // Its Pod gone (evicted, then removed): still lost. A new Pod: the period restarts.
        assert_eq!(f.judge(true, false, rec("a"), None, at(400)), Verdict::Lost(t0));
        assert_eq!(f.judge(true, false, rec("a"), Some("b"), at(400)), Verdict::Start);
        assert_eq!(f.judge(true, false, rec(""), Some("b"), at(100)), Verdict::Start);
        // An unreadable time counts from now.
        assert_eq!(
            f.judge(true, false, Record { since: Some("x"), pod: Some("a") }, Some("a"), at(999)),
            Verdict::Start
        );
    }

    #[test]
    fn a_pod_is_force_deleted_when_its_node_is_lost_or_it_overruns_its_grace_period() {
        let nodes: BTreeMap<String, Node> = [node("n1", "a", true, false), node("n2", "a", false, false)]
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap(), n))
            .collect();
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert!(!force_delete(&pod("n1", "Running", true, false), &nodes, t0));
        assert!(force_delete(&pod("n2", "Running", true, false), &nodes, t0));
        assert!(force_delete(&pod("n3", "Running", true, false), &nodes, t0));
        // Terminating on a Ready node (deletion time t0): waited for, then forced.
        assert!(!force_delete(&pod("n1", "Running", true, true), &nodes, t0));
        let late = t0.checked_add(jiff::SignedDuration::try_from(TERMINATION_SLACK).unwrap() * 2).unwrap();
        assert!(force_delete(&pod("n1", "Running", true, true), &nodes, late));
    }

    #[test]
    fn a_lost_volumes_node_is_its_selected_node_else_its_zone() {
        let nodes: BTreeMap<String, Node> = [node("n1", "a", true, false), node("n2", "a", false, false)]
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap(), n))
            .collect();
        assert!(volume_node_ready(Some("n1"), &nodes, "a"));
        assert!(!volume_node_ready(Some("n2"), &nodes, "a"));
        assert!(!volume_node_ready(Some("n3"), &nodes, "a"));
        assert!(volume_node_ready(None, &nodes, "a"));
        assert!(!volume_node_ready(None, &nodes, "b"));
    }

    #[test]
    fn a_member_is_lost_once_the_period_has_passed_and_not_before() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let clock = Clock::fixed(t0);
        let f = Failover { period: Duration::from_secs(300), clock: clock.clone() };
        clock.advance(Duration::from_secs(299));
        assert!(!f.lost(t0, f.clock.now()));
        clock.advance(Duration::from_secs(1));
        assert!(f.lost(t0, f.clock.now()));
    }
}
