//! nimbus-gateway: the access layer. Authenticates every request (tokens of users scoped
//! to one database, roles `readWrite` and `read`), enforces per-database limits, routes to
//! the leader of the replica set holding the database, and counts operations per database.
//! Routes, users and limits come from etcd and are watched.

pub mod auth;
pub mod config;
pub mod limits;
pub mod proxy;
pub mod server;
pub mod state;
pub mod sync;
pub mod usage;
