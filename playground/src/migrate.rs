//! Where the playground hands a changed `spec.pool` to the hot-migration driver
//! (`nimbus_operator::controlplane::migration`, being written).
//!
//! NOT WIRED YET: [`start_migration`] refuses every migration, so an apply that changes an
//! instance's pool is refused before anything changes. When the driver lands, this
//! function is replaced by one that records the migration for the driver (which then runs
//! it from the control loop and reports it in `InstanceState::migration`, shown in
//! `playground.json`); `apply::plan` already chooses the target replica set and
//! `InstanceState::wanted_pool` records the goal.

use crate::state::State;

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    #[error("hot migration is not wired into the playground yet")]
    NotWired,
}

/// Starts moving `req.database` to `req.to_replica_set`. Called by an apply before it
/// commits anything (`requests::apply`): an error refuses the whole apply.
pub fn start_migration(_st: &State, _req: &MigrationRequest) -> Result<(), MigrationError> {
    Err(MigrationError::NotWired)
}
