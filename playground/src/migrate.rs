//! The playground's hot migrations: the operator's migration driver
//! (`nimbus_operator::controlplane::migration`) with the playground's processes as its
//! replica sets.
//!
//! An apply that changes an instance's `spec.pool` records the goal in the state
//! (`InstanceState::wanted_pool` and the target replica set placement chose,
//! `wanted_replica_set`; `apply::plan`). The control loop then, on every tick:
//! - starts the migration once the target replica set has a leader ([`start_wanted`]);
//! - mirrors the driver's status into the instance ([`observe`]): `playground.json` shows
//!   it, and from the switch on the instance is on the target replica set and pool.
//!
//! The driver itself ([`Migrator`]) runs in the background of the control plane.

use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;
use nimbus_operator::controlplane::migration::{Migrator, Phase, ReplicaSetDirectory, StartError, StartRequest};
use tracing::{info, warn};

use crate::state::State;

/// The namespace the playground's migrations name: none. The playground's datanodes hold
/// the cluster secret itself, not a namespace's derived one (`LiveWorld` uses the cluster
/// secret for the empty namespace).
pub const NAMESPACE: &str = "";

/// A database to move: from its replica set to one of another pool, while it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRequest {
    pub instance: String,
    pub database: String,
    pub from_pool: String,
    pub from_replica_set: String,
    pub to_pool: String,
    /// Chosen by placement in `to_pool` (made in the state when new).
    pub to_replica_set: String,
}

/// The members' admin addresses of each replica set, as the control loop last saw them.
#[derive(Debug, Default)]
pub struct Directory(RwLock<BTreeMap<String, Vec<String>>>);

impl Directory {
    /// Takes the replica sets and members of `st` (a replaced member's new port included).
    pub fn refresh(&self, st: &State) {
        let sets = st
            .replica_sets
            .iter()
            .map(|(name, set)| {
                let addrs = set
                    .members
                    .values()
                    .map(|m| format!("http://{}:{}", st.host(&m.zone), m.admin_port))
                    .collect::<Vec<_>>();
                (name.clone(), addrs)
            })
            .collect();
        // A poisoned lock only means a reader panicked: the map is whole.
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = sets;
    }
}

#[async_trait]
impl ReplicaSetDirectory for Directory {
    async fn admin_addrs(&self, namespace: &str, name: &str) -> Option<Vec<String>> {
        if namespace != NAMESPACE {
            return None;
        }
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }
}

/// Starts the migrations applies asked for whose target replica set is led (`led`), unless
/// one is already recorded for the database. A refusal that waiting cannot cure (the
/// database already there) clears the goal.
pub async fn start_wanted(migrator: &Migrator, st: &mut State, led: &BTreeMap<String, bool>) {
    for (name, inst) in st.instances.iter_mut() {
        let Some(to) = inst.wanted_replica_set.clone() else { continue };
        if !led.get(&to).copied().unwrap_or(false) {
            continue;
        }
        let running = inst.migration.as_ref().is_some_and(|m| {
            m.to_replica_set == to && !matches!(m.phase, Phase::Completed) && m.from_replica_set == inst.replica_set
        });
        if running {
            continue;
        }
        let req = StartRequest { db: inst.database.clone(), namespace: NAMESPACE.into(), to_replica_set: to.clone() };
        match migrator.start(&req).await {
            Ok(record) => {
                info!(instance = %name, from = %record.from_replica_set, to = %to, "migration started");
                inst.migration = Some(record.status());
            }
            Err(StartError::AlreadyThere { .. }) => {
                // The switch happened (a control plane restarted after it): nothing to move.
                inst.wanted_replica_set = None;
            }
            Err(e) => warn!(instance = %name, error = %e, "migration not started yet"),
        }
    }
}

/// Mirrors the driver's migrations into the instances. From the switch on (the route names
/// the target) the instance is on the target replica set and its pool.
pub async fn observe(migrator: &Migrator, st: &mut State) {
    let statuses = match migrator.statuses().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "failed to read the migrations");
            return;
        }
    };
    for (name, inst) in st.instances.iter_mut() {
        let Some(status) = statuses.get(&inst.database) else { continue };
        let switched = matches!(status.phase, Phase::CleaningUp | Phase::Completed);
        if switched
            && inst.replica_set == status.from_replica_set
            && inst.wanted_replica_set.as_deref() == Some(status.to_replica_set.as_str())
        {
            info!(instance = %name, to = %status.to_replica_set, "database moved");
            inst.replica_set = status.to_replica_set.clone();
            if let Some(pool) = inst.wanted_pool.take() {
                inst.pool = pool;
            }
            inst.wanted_replica_set = None;
        }
        let given_up = status.phase == Phase::Aborted && status.finished_at.is_some();
        if given_up && inst.wanted_replica_set.as_deref() == Some(status.to_replica_set.as_str()) {
            // No attempt left: the database stays where it is, and a later apply may ask again.
            warn!(instance = %name, error = ?status.error, "migration given up");
            inst.wanted_replica_set = None;
            inst.wanted_pool = None;
        }
        inst.migration = Some(status.clone());
    }
}
