//! Command-line and environment configuration of a datanode.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub const DEFAULT_DATA_LISTEN: &str = "0.0.0.0:7000";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:7100";
pub const DEFAULT_RAFT_LISTEN: &str = "0.0.0.0:7200";
/// A write or read barrier not done by then answers 503 `Unavailable`.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Largest request body: a 16 MiB document plus room for the request around it.
pub const DEFAULT_MAX_BODY_BYTES: usize = 48 * 1024 * 1024;
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100_000;
pub const DEFAULT_KEEP_LOGS: u64 = 1_000;
pub const DEFAULT_OPLOG_RETENTION_SECS: u64 = 7 * 24 * 3600;
/// How long a leader stopping on SIGTERM tries to hand its leadership over. Well inside a
/// Pod's termination grace period (30 s by default), with room for the servers to finish
/// their requests afterwards ([`SHUTDOWN_DRAIN`]).
pub const DEFAULT_SHUTDOWN_HANDOFF_MS: u64 = 5_000;
/// How long the servers get to finish the requests in flight once the handoff is done.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Parser)]
#[command(name = "nimbus-datanode", about = "A member of a Nimbus replica set", version)]
pub struct Config {
    /// This member's id, unique within its replica set and never reused.
    #[arg(long, env = "NIMBUS_NODE_ID")]
    pub id: u64,
    /// The availability zone this member runs in.
    #[arg(long, env = "NIMBUS_ZONE", default_value = "local")]
    pub zone: String,
    /// The replica set this member belongs to.
    #[arg(long, env = "NIMBUS_REPLICA_SET", default_value = "rs0")]
    pub replica_set: String,
    /// Where the Raft log, the state machine and snapshots live.
    #[arg(long, env = "NIMBUS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the data API (gateways connect here). Port 0 picks a free port.
    #[arg(long, env = "NIMBUS_DATA_LISTEN", default_value = DEFAULT_DATA_LISTEN)]
    pub data_listen: SocketAddr,
    /// Address of the admin API (the control plane, probes, metrics). Port 0 picks a free port.
    #[arg(long, env = "NIMBUS_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// Address of the Raft RPCs (other members only). Port 0 picks a free port.
    #[arg(long, env = "NIMBUS_RAFT_LISTEN", default_value = DEFAULT_RAFT_LISTEN)]
    pub raft_listen: SocketAddr,
    #[command(flatten)]
    pub cluster: nimbus_net::ClusterArgs,
    /// Host name or IP other members and gateways use to reach this one (default: the
    /// listen IP, or 127.0.0.1 when listening on all addresses).
    #[arg(long, env = "NIMBUS_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Deadline of a write or of a linearizable read's leadership check, in milliseconds.
    #[arg(long, env = "NIMBUS_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: u64,
    /// Largest request body on the data API, in bytes.
    #[arg(long, env = "NIMBUS_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Raft heartbeat interval, in milliseconds.
    #[arg(long, env = "NIMBUS_HEARTBEAT_MS", default_value_t = DEFAULT_HEARTBEAT_MS)]
    pub heartbeat_ms: u64,
    /// Minimum Raft election timeout, in milliseconds (the maximum is a third more).
    #[arg(long, env = "NIMBUS_ELECTION_TIMEOUT_MS", default_value_t = DEFAULT_ELECTION_TIMEOUT_MS)]
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    #[arg(long, env = "NIMBUS_SNAPSHOT_EVERY", default_value_t = DEFAULT_SNAPSHOT_EVERY)]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot before they are purged.
    #[arg(long, env = "NIMBUS_KEEP_LOGS", default_value_t = DEFAULT_KEEP_LOGS)]
    pub keep_logs: u64,
    /// How long oplog entries are kept, in seconds (default 7 days).
    #[arg(long, env = "NIMBUS_OPLOG_RETENTION_SECS", default_value_t = DEFAULT_OPLOG_RETENTION_SECS)]
    pub oplog_retention_secs: u64,
    /// The most bytes of documents a restore's `Publish` (one Raft entry, one write batch)
    /// moves into a database; a larger restore is refused and goes into a new instance.
    /// Every member of a replica set must have the same value: the apply loop decides.
    #[arg(long, env = "NIMBUS_MAX_PUBLISH_BYTES", default_value_t = nimbus_api::migration::MAX_PUBLISH_BYTES)]
    pub max_publish_bytes: u64,
    /// On SIGTERM or SIGINT, how long a leader tries to hand its leadership to another
    /// voter before it stops anyway, in milliseconds (see `docs/datanode.md`, Shutdown).
    #[arg(long, env = "NIMBUS_SHUTDOWN_HANDOFF_MS", default_value_t = DEFAULT_SHUTDOWN_HANDOFF_MS)]
    pub shutdown_handoff_ms: u64,
    /// Added to this member's wall clock, in milliseconds: a fault injected by tests of the
    /// replica set's clock (see `clock.rs`). Never set it in production.
    #[arg(long, env = "NIMBUS_CLOCK_SKEW_MS", default_value_t = 0, allow_hyphen_values = true, hide = true)]
    pub clock_skew_ms: i64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "NIMBUS_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
