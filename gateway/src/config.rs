//! Command-line and environment configuration of a gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:8081";
/// A request not answered by then gets 503 `Unavailable` (safe to retry).
pub const DEFAULT_DEADLINE_MS: u64 = 5_000;
/// One attempt at one datanode waits at most this long before the gateway tries another
/// member (a member cut off by a partition may never answer; writes carry an idempotency
/// key, so the retry is safe).
pub const DEFAULT_ATTEMPT_TIMEOUT_MS: u64 = 2_000;
/// Largest request body: a 16 MiB document plus room for the request around it.
pub const DEFAULT_MAX_BODY_BYTES: usize = 17 * 1024 * 1024;
/// How long a request over its database's QPS limit may wait for a slot.
pub const DEFAULT_QUEUE_WAIT_MS: u64 = 500;
/// A client has this long to send a request's headers, and an idle keep-alive
/// connection is closed after it.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// A client has this long to send a request's body.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 30_000;
/// etcd lease of the gateway's registration; the gateway self-fences when it lapses.
pub const DEFAULT_LEASE_TTL_SECS: i64 = 3;
/// Concurrent requests to one datanode (beyond it, requests wait: backpressure).
pub const DEFAULT_UPSTREAM_MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, Clone, Parser)]
#[command(name = "nimbus-gateway", about = "The Nimbus access layer", version)]
pub struct Config {
    /// A name unique among gateways (registered in etcd).
    #[arg(long, env = "NIMBUS_GATEWAY_ID")]
    pub id: String,
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "NIMBUS_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// The public data API. Port 0 picks a free port.
    #[arg(long, env = "NIMBUS_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Usage counters for the control plane, and metrics. Port 0 picks a free port.
    #[arg(long, env = "NIMBUS_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// PEM certificate chain: with --tls-key, serve the public API over TLS.
    #[arg(long, env = "NIMBUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "NIMBUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, env = "NIMBUS_DEADLINE_MS", default_value_t = DEFAULT_DEADLINE_MS)]
    pub deadline_ms: u64,
    /// Longest wait for one datanode's answer before trying another member.
    #[arg(long, env = "NIMBUS_ATTEMPT_TIMEOUT_MS", default_value_t = DEFAULT_ATTEMPT_TIMEOUT_MS)]
    pub attempt_timeout_ms: u64,
    #[arg(long, env = "NIMBUS_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    #[arg(long, env = "NIMBUS_QUEUE_WAIT_MS", default_value_t = DEFAULT_QUEUE_WAIT_MS)]
    pub queue_wait_ms: u64,
    #[arg(long, env = "NIMBUS_HEADER_TIMEOUT_MS", default_value_t = DEFAULT_HEADER_TIMEOUT_MS)]
    pub header_timeout_ms: u64,
    #[arg(long, env = "NIMBUS_BODY_TIMEOUT_MS", default_value_t = DEFAULT_BODY_TIMEOUT_MS)]
    pub body_timeout_ms: u64,
    #[arg(long, env = "NIMBUS_LEASE_TTL_SECS", default_value_t = DEFAULT_LEASE_TTL_SECS)]
    pub lease_ttl_secs: i64,
    #[arg(long, env = "NIMBUS_UPSTREAM_MAX_IN_FLIGHT", default_value_t = DEFAULT_UPSTREAM_MAX_IN_FLIGHT)]
    pub upstream_max_in_flight: usize,
    /// Tier whose limits apply to a database without a limits key.
    #[arg(long, env = "NIMBUS_DEFAULT_TIER", default_value = "standard")]
    pub default_tier: String,
    #[arg(long, env = "NIMBUS_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
    pub fn queue_wait(&self) -> Duration {
        Duration::from_millis(self.queue_wait_ms)
    }
}
