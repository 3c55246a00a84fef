//! nimbus-datanode: one member of a Nimbus replica set. Documents of many tenant databases
//! in RocksDB, replicated to the other members (one per zone) with openraft before a write
//! is acknowledged; an internal data API for gateways and an admin API for the control plane.

pub mod clock;
pub mod config;
pub mod index_builder;
pub mod leader_watch;
pub mod node;
pub mod raft;
pub mod server;
pub mod shutdown;
pub mod store;

/// The query language (documents, filters, updates, the planner): the `nimbus-query` crate.
pub use nimbus_query::{doc, query};
