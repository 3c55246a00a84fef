//! The playground's provisioner for the replica-set driver (`controlplane::driver`): a
//! member is a datanode process and a data directory instead of a Pod and a PVC. The steps
//! themselves, and what is decided, are the operator's.

use std::path::Path;

use anyhow::Context as _;
use async_trait::async_trait;
use nimbus_api::admin::MemberInfo;
use nimbus_operator::controlplane::admin::AdminClient;
use nimbus_operator::controlplane::coord::Coordinator;
use nimbus_operator::controlplane::driver::{self, Events, Provisioner, Severity};
use nimbus_operator::controlplane::members::{Action, Desired, MemberView, RaftView};
use tracing::{info, warn};

use crate::procs::Procs;
use crate::state::{self, MemberState, State};

/// The members of one replica set of the playground's state.
pub struct LocalProvisioner<'a> {
    pub replica_set: String,
    pub st: &'a mut State,
    pub procs: &'a mut Procs,
    /// Where `state.json` is kept (a new member's ports are saved before it starts).
    pub dir: &'a Path,
    pub admin: &'a AdminClient,
    /// Zones taken down (`nimbus playground zone X down`): nothing starts there.
    pub down_zones: &'a [String],
}

impl LocalProvisioner<'_> {
    fn member(&self, id: u64) -> Option<&MemberState> {
        self.st.replica_sets.get(&self.replica_set)?.members.get(&id)
    }

    fn addr(&self, id: u64, port: impl Fn(&MemberState) -> u16) -> Option<String> {
        let m = self.member(id)?;
        Some(format!("http://{}:{}", self.st.host(&m.zone), port(m)))
    }
}

#[async_trait]
impl Provisioner for LocalProvisioner<'_> {
    type Error = anyhow::Error;

    fn replica_set(&self) -> &str {
        &self.replica_set
    }

    async fn members(&mut self) -> anyhow::Result<Vec<MemberView>> {
        let members: Vec<MemberState> = self
            .st
            .replica_sets
            .get(&self.replica_set)
            .map(|s| s.members.values().cloned().collect())
            .unwrap_or_default();
        let mut views = Vec::new();
        for m in members {
            let running = self.procs.running(&self.replica_set, m.id);
            let has_data = self.procs.member_dir(&self.replica_set, m.id).is_dir();
            // Ready as a kubelet would see it: the process answers `/readyz`.
            let ready =
                running && self.admin.ready(&format!("http://{}:{}", self.st.host(&m.zone), m.admin_port)).await;
            // Never declared lost: a stopped process is started again on its directory at
            // once, and a zone taken down comes back when told (no failure period here).
            views.push(MemberView {
                id: m.id,
                zone: m.zone,
                running,
                has_data,
                ready,
                outdated: false,
                failed: false,
                returned: false,
            });
        }
        Ok(views)
    }

    fn admin_addr(&self, id: u64) -> Option<String> {
        self.addr(id, |m| m.admin_port)
    }

    fn member_info(&self, id: u64, zone: &str) -> Option<MemberInfo> {
        Some(MemberInfo {
            id,
            admin_addr: self.addr(id, |m| m.admin_port)?,
            data_addr: self.addr(id, |m| m.data_port)?,
            raft_addr: self.addr(id, |m| m.raft_port)?,
            zone: zone.to_owned(),
            voter: true,
        })
    }

    fn data_addr(&self, id: u64, _zone: &str) -> Option<String> {
        self.addr(id, |m| m.data_port)
    }

    async fn create(&mut self, id: u64, zone: &str) -> anyhow::Result<()> {
        let m = MemberState {
            id,
            zone: zone.to_owned(),
            data_port: state::free_port()?,
            admin_port: state::free_port()?,
            raft_port: state::free_port()?,
        };
        std::fs::create_dir_all(self.procs.member_dir(&self.replica_set, id))?;
        if let Some(s) = self.st.replica_sets.get_mut(&self.replica_set) {
            s.members.insert(id, m.clone());
        }
        self.st.save(self.dir)?;
        self.procs.start_member(&self.replica_set, &m)
    }

    async fn start(&mut self, id: u64, _zone: &str) -> anyhow::Result<()> {
        let m = self.member(id).cloned().context("a member to start is unknown")?;
        self.procs.stop_member(&self.replica_set, id).await;
        self.procs.start_member(&self.replica_set, &m)
    }

    async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.procs.stop_member(&self.replica_set, id).await;
        Ok(())
    }

    async fn delete(&mut self, id: u64) -> anyhow::Result<()> {
        self.procs.stop_member(&self.replica_set, id).await;
        let _ = std::fs::remove_dir_all(self.procs.member_dir(&self.replica_set, id));
        if let Some(s) = self.st.replica_sets.get_mut(&self.replica_set) {
            s.members.remove(&id);
        }
        Ok(())
    }

    async fn bootstrapped(&mut self, _voters: &[u64]) -> anyhow::Result<()> {
        if let Some(s) = self.st.replica_sets.get_mut(&self.replica_set) {
            s.bootstrapped = true;
        }
        self.st.save(self.dir)?;
        Ok(())
    }

    fn zone_down(&self, zone: &str) -> bool {
        self.down_zones.iter().any(|z| z == zone)
    }
}

/// The driver's events in the control plane's log.
pub struct LogEvents;

#[async_trait]
impl Events for LogEvents {
    async fn record(&self, severity: Severity, reason: &str, _action: &str, note: &str) {
        match severity {
            Severity::Normal => info!(reason, "{note}"),
            Severity::Warning => warn!(reason, "{note}"),
        }
    }
}

/// The claim of a playground instance on its database name.
pub fn claim(instance: &str) -> nimbus_api::etcd::TenantClaim {
    nimbus_api::etcd::TenantClaim {
        namespace: "playground".into(),
        instance: instance.to_owned(),
        uid: format!("playground/{instance}"),
    }
}

/// One look at a replica set and at most one step (the operator's driver); then, with a
/// leader, its databases' routes, users and limits. Returns (has a leader, steady).
pub async fn tick(
    st: &mut State,
    procs: &mut Procs,
    admin: &AdminClient,
    store: &Coordinator,
    rs: &str,
    dir: &Path,
    down_zones: &[String],
) -> anyhow::Result<(bool, bool)> {
    let set = st.replica_sets.get(rs).cloned().unwrap_or_default();
    let mut members = LocalProvisioner { replica_set: rs.to_owned(), st: &mut *st, procs, dir, admin, down_zones };
    let observed = driver::observe(&mut members, admin, set.bootstrapped).await?;
    let step = driver::next_step(&members, &Desired { zones: set.zones.clone() }, &observed);
    driver::carry_out(&mut members, admin, &LogEvents, &observed, &step).await?;
    let route = driver::route_members(&members, &observed);
    let RaftView::Led(_) = &observed.view else { return Ok((false, false)) };
    if !set.bootstrapped
        && let Some(s) = st.replica_sets.get_mut(rs)
    {
        s.bootstrapped = true;
    }
    for (name, inst) in st.instances.iter().filter(|(_, i)| i.replica_set == rs) {
        // As on Kubernetes: the instance claims its database name, its route is created
        // once and then only its members follow the replica set's, a compare-and-swap
        // that never moves a route another decision (a migration) put elsewhere.
        let claim = claim(name);
        if let Err(owner) = store.claim_database(&inst.database, &claim, true).await? {
            tracing::warn!(instance = %name, owner = %owner.instance, "database name claimed by another instance");
            continue;
        }
        if !store.create_route(&inst.database, &claim, rs, route.clone()).await? {
            store.update_route_members(&inst.database, &claim, rs, route.clone()).await?;
        }
        for (user, token) in &inst.tokens {
            let record = nimbus_api::token::record_of(token, inst.role(user)).context("malformed stored token")?;
            // Written when it differs (the role one an older playground got wrong included).
            store.put_user(&inst.database, user, &record).await?;
        }
        if let Some(limits) = &inst.limits {
            store.put_limits(&inst.database, limits).await?;
        }
    }
    Ok((true, step == Action::Steady))
}
