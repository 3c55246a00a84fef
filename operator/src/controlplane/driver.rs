//! The replica-set driver: observe the members, decide the next step
//! ([`members::next_action`]), carry it out. One driver for both provisioners: Kubernetes
//! (a member is a Pod and a PVC, `k8s::provisioner`) and the playground (a process and a
//! directory); each implements [`Provisioner`], and a fix to how a step is carried out
//! lands once.
//!
//! A pass is [`observe`] → [`next_step`] → [`carry_out`]; callers check what they must
//! between the three (the Kubernetes reconciler refuses to go on with lost volumes, and
//! applies the replica set's Service before any member exists).

use async_trait::async_trait;
use nimbus_api::admin::{MemberInfo, Status};
use nimbus_api::etcd::RouteMember;
use thiserror::Error;

use super::members::{self, Action, Desired, MemberView, RaftView};
use super::{AdminError, Datanodes};

/// What the driver cannot do without.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error("failed to reach the replica set's leader")]
    NoLeader,
    #[error("failed to find member {0} of the replica set")]
    UnknownMember(u64),
}

/// How one provisioner makes, starts and removes the members of one replica set.
#[async_trait]
pub trait Provisioner: Send {
    /// The provisioner's own errors; the driver's datanode calls and its own failures
    /// become them, so a caller sees one type (and can tell a conflict from a refusal).
    type Error: From<AdminError> + From<DriverError> + Send;

    /// The replica set's name, for events and logs.
    fn replica_set(&self) -> &str;
    /// The members as they are now: what exists, runs and is ready by the provisioner's
    /// own signal (a Pod's Ready condition, a process answering `/readyz`). Remembers what
    /// it needs to reach them until the next call.
    async fn members(&mut self) -> Result<Vec<MemberView>, Self::Error>;
    /// Once the Raft view is known: declares members lost ([`MemberView::failed`]) and
    /// says which of those could come back ([`MemberView::returned`]). The Kubernetes
    /// provisioner counts the failure period only while the replica set has a leader.
    async fn judge(&mut self, _members: &mut [MemberView], _view: &RaftView) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Where a running member's admin API answers now (a Pod's IP, a process's port).
    fn admin_addr(&self, id: u64) -> Option<String>;
    /// The member as the Raft configuration knows it (stable addresses).
    fn member_info(&self, id: u64, zone: &str) -> Option<MemberInfo>;
    /// Where gateways send a member's data requests (for the route).
    fn data_addr(&self, id: u64, zone: &str) -> Option<String>;
    /// A new member in `zone`: its volume (or directory), then its Pod (or process).
    async fn create(&mut self, id: u64, zone: &str) -> Result<(), Self::Error>;
    /// The member again on its existing data (its Pod or process is gone or failed).
    async fn start(&mut self, id: u64, zone: &str) -> Result<(), Self::Error>;
    /// Stops the member so that it starts again with the current spec (a rolling restart).
    async fn restart(&mut self, id: u64) -> Result<(), Self::Error>;
    /// Deprovisions a member removed from Raft: its Pod or process, and its data.
    async fn delete(&mut self, id: u64) -> Result<(), Self::Error>;
    /// Raft was initialised with these voters: record it so it never happens again.
    async fn bootstrapped(&mut self, voters: &[u64]) -> Result<(), Self::Error>;
    /// Nothing may be started or created in this zone now (the playground's `zone down`; on
    /// Kubernetes, no node of the zone is Ready and schedulable).
    fn zone_down(&self, _zone: &str) -> bool {
        false
    }
    /// Why member `id` cannot be started yet (its old Pod still terminating), if so. A
    /// member declared lost ([`MemberView::failed`]) is not started at all, so a Pod that
    /// never finishes terminating (its node lost) holds it up for the failure period only.
    fn start_blocked(&self, _id: u64) -> Option<String> {
        None
    }
    /// Why member `id` cannot be deleted further now (its Pod terminating within its grace
    /// period: its volume goes once the Pod is gone), if so.
    fn delete_blocked(&self, _id: u64) -> Option<String> {
        None
    }
}

/// Whether a person should look: Kubernetes Event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// Where the driver tells what it did (Kubernetes Events, the playground's log).
#[async_trait]
pub trait Events: Send + Sync {
    async fn record(&self, severity: Severity, reason: &str, action: &str, note: &str);
}

/// A replica set as one pass of the driver sees it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub members: Vec<MemberView>,
    /// `GET /v1/status` of each running member that answered.
    pub statuses: Vec<Status>,
    pub view: RaftView,
}

impl Observed {
    fn zone_of(&self, id: u64) -> Option<&str> {
        self.members.iter().find(|m| m.id == id).map(|m| m.zone.as_str())
    }

    /// The leader's id, when one leads.
    pub fn leader(&self) -> Option<u64> {
        match &self.view {
            RaftView::Led(ms) => Some(ms.leader),
            _ => None,
        }
    }

    /// No member has its data left, or every member answers and none was ever initialised.
    pub fn volumes_lost(&self) -> bool {
        let no_volume = self.members.iter().all(|m| !m.has_data);
        let all_empty = !self.statuses.is_empty()
            && self.statuses.len() == self.members.len()
            && self.statuses.iter().all(|s| s.members.is_empty());
        no_volume || all_empty
    }
}

/// Looks at the members and asks each running one for its Raft status. `bootstrapped` is
/// the provisioner's durable record that Raft was initialised (see [`super::admin::raft_view`]).
pub async fn observe<P: Provisioner + ?Sized>(
    prov: &mut P,
    datanodes: &dyn Datanodes,
    bootstrapped: bool,
) -> Result<Observed, P::Error> {
    let mut members = prov.members().await?;
    let mut statuses = Vec::new();
    for m in &mut members {
        if !m.running {
            continue;
        }
        let Some(addr) = prov.admin_addr(m.id) else { continue };
        if let Some(s) = datanodes.status(&addr).await {
            // Alive and waiting to be initialised counts as ready: a member reports no
            // leader (so is never Ready by `/readyz`) until the replica set is bootstrapped.
            if s.members.is_empty() {
                m.ready = true;
            }
            statuses.push(s);
        }
    }
    let view = super::admin::raft_view(&statuses, bootstrapped);
    prov.judge(&mut members, &view).await?;
    Ok(Observed { members, statuses, view })
}

/// The next step, unless it would start or create a member in a zone that is down.
pub fn next_step<P: Provisioner + ?Sized>(prov: &P, desired: &Desired, observed: &Observed) -> Action {
    let step = members::next_action(desired, &observed.members, &observed.view);
    let down = |id: &u64| observed.zone_of(*id).filter(|z| prov.zone_down(z));
    let blocked = match &step {
        Action::Start { id } | Action::Restart { id } | Action::AddLearner { id } => {
            down(id).map(|zone| format!("zone {zone} is down: member {id} waits for it"))
        }
        Action::Create { id, zone } if prov.zone_down(zone) => {
            Some(format!("zone {zone} has no node to take member {id}: it is created once one can"))
        }
        _ => None,
    };
    if let Some(why) = blocked {
        return Action::Wait(why);
    }
    match &step {
        Action::Start { id } => prov.start_blocked(*id).map(Action::Wait).unwrap_or(step),
        Action::Delete { id } => prov.delete_blocked(*id).map(Action::Wait).unwrap_or(step),
        _ => step,
    }
}

/// Carries out one step, and tells it.
pub async fn carry_out<P: Provisioner + ?Sized>(
    prov: &mut P,
    datanodes: &dyn Datanodes,
    events: &dyn Events,
    observed: &Observed,
    step: &Action,
) -> Result<(), P::Error> {
    let rs = prov.replica_set().to_owned();
    let zone_of = |id: u64| observed.zone_of(id).map(str::to_owned).ok_or(DriverError::UnknownMember(id));
    let info = |prov: &P, id: u64| -> Result<MemberInfo, DriverError> {
        let zone = observed.zone_of(id).ok_or(DriverError::UnknownMember(id))?;
        prov.member_info(id, zone).ok_or(DriverError::UnknownMember(id))
    };
    let leader = || -> Result<String, DriverError> {
        observed.leader().and_then(|id| prov.admin_addr(id)).ok_or(DriverError::NoLeader)
    };
    use Severity::{Normal, Warning};
    match step {
        Action::Steady | Action::Wait(_) => {}
        Action::Create { id, zone } => {
            prov.create(*id, zone).await?;
            let note = format!("member {id} of {rs} created in zone {zone}");
            events.record(Normal, "MemberCreated", "Create", &note).await;
        }
        Action::Start { id } => {
            prov.start(*id, &zone_of(*id)?).await?;
            let note = format!("member {id} of {rs} started again on its volume");
            events.record(Normal, "MemberRestarted", "Start", &note).await;
        }
        Action::Bootstrap { voters } => {
            let members = voters.iter().map(|id| info(prov, *id)).collect::<Result<Vec<_>, _>>()?;
            let first = voters.first().and_then(|id| prov.admin_addr(*id)).ok_or(DriverError::NoLeader)?;
            datanodes.init(&first, members).await?;
            prov.bootstrapped(voters).await?;
            let note = format!("replica set {rs} initialised with members {voters:?}");
            events.record(Normal, "Bootstrapped", "Bootstrap", &note).await;
        }
        Action::AddLearner { id } => {
            datanodes.add_learner(&leader()?, info(prov, *id)?).await?;
            let note = format!("member {id} added to {rs} as a learner and caught up");
            events.record(Normal, "LearnerAdded", "Replace", &note).await;
        }
        Action::ChangeVoters { voters } => {
            datanodes.change_voters(&leader()?, voters).await?;
            let note = format!("voters of {rs} are now {voters:?}");
            events.record(Normal, "VotersChanged", "Replace", &note).await;
        }
        Action::RemoveMember { id } => {
            datanodes.remove_member(&leader()?, *id).await?;
            let note = format!("member {id} removed from {rs}");
            events.record(Warning, "MemberRemoved", "Replace", &note).await;
        }
        Action::Delete { id } => {
            prov.delete(*id).await?;
            let note = format!("member {id} of {rs} deprovisioned");
            events.record(Normal, "MemberDeleted", "Delete", &note).await;
        }
        Action::Restart { id } => {
            prov.restart(*id).await?;
            let note = format!("member {id} of {rs} restarted for a new spec");
            events.record(Normal, "MemberRolled", "Restart", &note).await;
        }
        Action::TransferLeader { to } => {
            datanodes.transfer_leader(&leader()?, *to).await?;
            let note = format!("leadership of {rs} moved to member {to}");
            events.record(Normal, "LeaderTransferred", "Restart", &note).await;
        }
    }
    Ok(())
}

/// The route's members: the voters, at the addresses gateways send data requests to.
pub fn route_members<P: Provisioner + ?Sized>(prov: &P, observed: &Observed) -> Vec<RouteMember> {
    let RaftView::Led(ms) = &observed.view else { return Vec::new() };
    ms.voters
        .iter()
        .filter_map(|id| observed.members.iter().find(|m| m.id == *id))
        .filter_map(|m| Some(RouteMember { id: m.id, data_addr: prov.data_addr(m.id, &m.zone)?, zone: m.zone.clone() }))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    //! The driver against a provisioner and datanodes in memory: the steps a replica set
    //! goes through from nothing to Ready, and a replacement, as the calls they make.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use nimbus_api::admin::Role;

    use super::*;

    #[derive(Default)]
    struct Local {
        /// id → (zone, running, has data)
        members: BTreeMap<u64, (String, bool, bool)>,
        down: Vec<String>,
        log: Vec<String>,
        bootstrapped: bool,
    }

    #[derive(Debug, Error)]
    enum E {
        #[error(transparent)]
        Admin(#[from] AdminError),
        #[error(transparent)]
        Driver(#[from] DriverError),
    }

    #[async_trait]
    impl Provisioner for Local {
        type Error = E;
        fn replica_set(&self) -> &str {
            "rs0"
        }
        async fn members(&mut self) -> Result<Vec<MemberView>, E> {
            Ok(self
                .members
                .iter()
                .map(|(id, (zone, running, has_data))| MemberView {
                    id: *id,
                    zone: zone.clone(),
                    running: *running,
                    has_data: *has_data,
                    ready: *running,
                    outdated: false,
                    failed: false,
                    returned: false,
                })
                .collect())
        }
        fn admin_addr(&self, id: u64) -> Option<String> {
            self.members.get(&id).filter(|m| m.1).map(|_| format!("m{id}"))
        }
        fn member_info(&self, id: u64, zone: &str) -> Option<MemberInfo> {
            Some(MemberInfo {
                id,
                admin_addr: format!("m{id}"),
                data_addr: format!("d{id}"),
                raft_addr: format!("r{id}"),
                zone: zone.into(),
                voter: true,
            })
        }
        fn data_addr(&self, id: u64, _zone: &str) -> Option<String> {
            Some(format!("d{id}"))
        }
        async fn create(&mut self, id: u64, zone: &str) -> Result<(), E> {
            self.log.push(format!("create {id} {zone}"));
            self.members.insert(id, (zone.into(), true, true));
            Ok(())
        }
        async fn start(&mut self, id: u64, _zone: &str) -> Result<(), E> {
            self.log.push(format!("start {id}"));
            self.members.get_mut(&id).unwrap().1 = true;
            Ok(())
        }
        async fn restart(&mut self, id: u64) -> Result<(), E> {
            self.log.push(format!("restart {id}"));
            Ok(())
        }
        async fn delete(&mut self, id: u64) -> Result<(), E> {
            self.log.push(format!("delete {id}"));
            self.members.remove(&id);
            Ok(())
        }
        async fn bootstrapped(&mut self, voters: &[u64]) -> Result<(), E> {
            self.log.push(format!("bootstrapped {voters:?}"));
            self.bootstrapped = true;
            Ok(())
        }
        fn zone_down(&self, zone: &str) -> bool {
            self.down.iter().any(|z| z == zone)
        }
    }

    /// (leader, voters, learners, calls)
    type Group = (Option<u64>, BTreeSet<u64>, BTreeSet<u64>, Vec<String>);

    /// One Raft group: members answer their status from it.
    #[derive(Default, Clone)]
    struct Raft(Arc<Mutex<Group>>);

    #[async_trait]
    impl Datanodes for Raft {
        fn in_namespace(&self, _namespace: &str) -> Arc<dyn Datanodes> {
            Arc::new(self.clone())
        }
        async fn status(&self, admin: &str) -> Option<Status> {
            let id: u64 = admin.trim_start_matches('m').parse().ok()?;
            let g = self.0.lock().unwrap();
            let (leader, voters, learners) = (g.0, &g.1, &g.2);
            let members: Vec<MemberInfo> = voters
                .iter()
                .chain(learners)
                .map(|m| MemberInfo { voter: voters.contains(m), ..Local::default().member_info(*m, "").unwrap() })
                .collect();
            let known = voters.contains(&id) || learners.contains(&id);
            Some(Status {
                id,
                zone: String::new(),
                replica_set: "rs0".into(),
                role: if leader == Some(id) { Role::Leader } else { Role::Follower },
                term: 1,
                leader_id: leader.filter(|_| known),
                commit_index: 1,
                applied_index: 1,
                members: if known { members } else { vec![] },
                replication_lag: voters.iter().chain(learners).map(|m| (*m, 0)).collect(),
                snapshot_index: None,
                purged_index: None,
                oplog_first_index: None,
                draining: false,
            })
        }
        async fn init(&self, admin: &str, members: Vec<MemberInfo>) -> Result<(), AdminError> {
            let mut g = self.0.lock().unwrap();
            g.0 = admin.trim_start_matches('m').parse().ok();
            g.1 = members.iter().map(|m| m.id).collect();
            let line = format!("init {:?}", g.1);
            g.3.push(line);
            Ok(())
        }
        async fn add_learner(&self, _leader: &str, member: MemberInfo) -> Result<(), AdminError> {
            let mut g = self.0.lock().unwrap();
            g.2.insert(member.id);
            g.3.push(format!("add_learner {}", member.id));
            Ok(())
        }
        async fn change_voters(&self, _leader: &str, voters: &BTreeSet<u64>) -> Result<(), AdminError> {
            let mut g = self.0.lock().unwrap();
            g.2.retain(|l| !voters.contains(l));
            g.1 = voters.clone();
            g.3.push(format!("change_voters {voters:?}"));
            Ok(())
        }
        async fn remove_member(&self, _leader: &str, id: u64) -> Result<(), AdminError> {
            let mut g = self.0.lock().unwrap();
            g.1.remove(&id);
            g.3.push(format!("remove_member {id}"));
            Ok(())
        }
        async fn transfer_leader(&self, _leader: &str, to: u64) -> Result<(), AdminError> {
            self.0.lock().unwrap().0 = Some(to);
            Ok(())
        }
        async fn drop_database(&self, _leader_data: &str, _db: &str) -> Result<(), AdminError> {
            Ok(())
        }
        async fn fence(&self, _leader: &str, _db: &str, _epoch: u64) -> Result<(), AdminError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Told(Mutex<Vec<String>>);

    #[async_trait]
    impl Events for Told {
        async fn record(&self, _severity: Severity, reason: &str, _action: &str, _note: &str) {
            self.0.lock().unwrap().push(reason.into());
        }
    }

    async fn until_steady(p: &mut Local, raft: &Raft, told: &Told) -> Observed {
        let desired = Desired { zones: vec!["a".into(), "b".into(), "c".into()] };
        for _ in 0..20 {
            let o = observe(p, raft, p.bootstrapped).await.unwrap();
            let step = next_step(p, &desired, &o);
            if step == Action::Steady {
                return o;
            }
            carry_out(p, raft, told, &o, &step).await.unwrap();
        }
        panic!("never steady: {:?}", p.log);
    }

    #[tokio::test]
    async fn a_replica_set_is_created_bootstrapped_once_and_routed_to_its_voters() {
        let (mut p, raft, told) = (Local::default(), Raft::default(), Told::default());
        let o = until_steady(&mut p, &raft, &told).await;
        assert_eq!(p.log, ["create 1 a", "create 2 b", "create 3 c", "bootstrapped [1, 2, 3]"]);
        assert_eq!(raft.0.lock().unwrap().3, ["init {1, 2, 3}"]);
        assert_eq!(*told.0.lock().unwrap(), ["MemberCreated", "MemberCreated", "MemberCreated", "Bootstrapped"]);
        let route: Vec<String> = route_members(&p, &o).into_iter().map(|m| m.data_addr).collect();
        assert_eq!(route, ["d1", "d2", "d3"]);
    }

    #[tokio::test]
    async fn a_lost_member_is_replaced_in_its_zone_but_nothing_starts_in_a_zone_that_is_down() {
        let (mut p, raft, told) = (Local::default(), Raft::default(), Told::default());
        until_steady(&mut p, &raft, &told).await;
        // Member 2 (zone b) loses its data (its process still runs) while zone b is down.
        p.members.get_mut(&2).unwrap().2 = false;
        p.down = vec!["b".into()];
        let desired = Desired { zones: vec!["a".into(), "b".into(), "c".into()] };
        let o = observe(&mut p, &raft, true).await.unwrap();
        assert_eq!(
            next_step(&p, &desired, &o),
            Action::Wait("zone b has no node to take member 4: it is created once one can".into())
        );
        p.down.clear();
        p.log.clear();
        until_steady(&mut p, &raft, &told).await;
        assert_eq!(p.log, ["create 4 b", "delete 2"]);
        assert_eq!(
            raft.0.lock().unwrap().3[1..],
            ["add_learner 4", "change_voters {1, 2, 3, 4}", "remove_member 2"].map(String::from)
        );
    }
}
