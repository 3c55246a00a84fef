//! nimbus-gateway: the access layer. Authenticates every request (tokens of users scoped
//! to one database, roles `readWrite` and `read`), enforces per-database limits and a
//! memory budget, routes to the leader of the replica set holding the database, and counts
//! operations per database. Routes, users and limits come from etcd and are watched.
//!
//! A data request is a pipeline of named steps (`request`): typed path, authentication,
//! authorisation, limits, body, idempotency key, forwarding (`upstream`), counting.

pub mod ack;
pub mod auth;
pub mod body;
pub mod budget;
pub mod config;
pub mod hold;
pub mod limits;
pub mod request;
pub mod server;
pub mod state;
pub mod sync;
pub mod upstream;
pub mod usage;
