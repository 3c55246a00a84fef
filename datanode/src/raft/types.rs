//! The openraft type configuration of a Nimbus replica set.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::state_machine::StateMachine;
use crate::store::{Command, WriteResult};

/// What members know of each other: where to reach a member and which zone it is in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Base URL of the admin port (admin API).
    pub admin_addr: String,
    /// Base URL of the data port.
    pub data_addr: String,
    pub zone: String,
    /// Base URL of the Raft port (Raft RPCs between members).
    pub raft_addr: String,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No document contents in logs: the database and the operation only.
        write!(f, "{}:{}", self.db, self.op.kind())
    }
}

openraft::declare_raft_types!(
    /// Types of a Nimbus replica set's Raft group.
    pub TypeConfig:
        D = Command,
        R = WriteResult,
        NodeId = u64,
        Node = NodeInfo,
);

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
