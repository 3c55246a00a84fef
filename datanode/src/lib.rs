//! nimbus-datanode: one member of a Nimbus replica set. Documents of many tenant databases
//! in RocksDB, replicated to the other members (one per zone) with openraft before a write
//! is acknowledged; an internal data API for gateways and an admin API for the control plane.

pub mod config;
pub mod doc;
pub mod node;
pub mod query;
pub mod raft;
pub mod server;
pub mod store;
