//! Replication of one replica set with openraft: the type configuration, the durable Raft
//! log, the state machine over the storage engine, snapshots as RocksDB checkpoints, and
//! the HTTP transport between members.

pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;
pub mod transfer;
pub mod types;

pub use types::{NodeInfo, Raft, TypeConfig};
