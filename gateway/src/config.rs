//! Command-line and environment configuration of a gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nimbus_net::{ClusterArgs, EtcdArgs};

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
/// A client has this long to send a request's headers.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// A connection with no request in flight is closed after this long.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// A client has this long to send a request's body.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 30_000;
/// etcd lease of the gateway's registration; the gateway self-fences when it lapses.
pub const DEFAULT_LEASE_TTL_SECS: i64 = 3;
/// Concurrent requests to one datanode (beyond it, requests wait: backpressure).
pub const DEFAULT_UPSTREAM_MAX_IN_FLIGHT: usize = 1024;
/// Bytes of request bodies and datanode answers held at once, all databases together.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 256 * 1024 * 1024;
/// Bytes of request bodies and answers one database may hold at once.
pub const DEFAULT_TENANT_MEMORY_BUDGET_BYTES: usize = 64 * 1024 * 1024;
/// Client connections at once, all clients together (beyond it new ones are closed).
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Client connections at once from one IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// HTTP/2 streams one connection may have open at once.
pub const DEFAULT_H2_MAX_STREAMS: u32 = 128;
/// Largest request head (request line and headers), HTTP/1.1 and HTTP/2.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Requests of one database a gateway holds at once during a migration cutover; beyond
/// it 503 `Unavailable`. Two seconds of a standard tenant's full rate (2,000/s) at one
/// gateway, or 200 ms of a dedicated one's (20,000/s, spread over several gateways): the
/// cutover's hold lasts well under a second, and each held request keeps a task, a client
/// stream and its body (the body also counted in the tenant's memory budget).
pub const DEFAULT_HOLD_QUEUE_MAX: usize = 4_096;
/// Databases with their own series in the admin port's metrics (the busiest ones).
pub const DEFAULT_METRICS_TENANT_SERIES: usize = 100;

#[derive(Debug, Clone, Parser)]
#[command(name = "nimbus-gateway", about = "The Nimbus access layer", version)]
pub struct Config {
    /// A name unique among gateways (registered in etcd).
    #[arg(long, env = "NIMBUS_GATEWAY_ID")]
    pub id: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
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
    /// Time a client has to send a request's headers (HTTP/1.1).
    #[arg(long, env = "NIMBUS_HEADER_TIMEOUT_MS", default_value_t = DEFAULT_HEADER_TIMEOUT_MS)]
    pub header_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed (HTTP/1.1 and 2).
    #[arg(long, env = "NIMBUS_IDLE_TIMEOUT_MS", default_value_t = DEFAULT_IDLE_TIMEOUT_MS)]
    pub idle_timeout_ms: u64,
    #[arg(long, env = "NIMBUS_BODY_TIMEOUT_MS", default_value_t = DEFAULT_BODY_TIMEOUT_MS)]
    pub body_timeout_ms: u64,
    #[arg(long, env = "NIMBUS_LEASE_TTL_SECS", default_value_t = DEFAULT_LEASE_TTL_SECS)]
    pub lease_ttl_secs: i64,
    #[arg(long, env = "NIMBUS_UPSTREAM_MAX_IN_FLIGHT", default_value_t = DEFAULT_UPSTREAM_MAX_IN_FLIGHT)]
    pub upstream_max_in_flight: usize,
    /// Bytes of request bodies and answers held at once; beyond it 503 `Unavailable`.
    #[arg(long, env = "NIMBUS_MEMORY_BUDGET_BYTES", default_value_t = DEFAULT_MEMORY_BUDGET_BYTES)]
    pub memory_budget_bytes: usize,
    /// Bytes one database's requests may hold at once; beyond it 429 `RateLimited`.
    #[arg(long, env = "NIMBUS_TENANT_MEMORY_BUDGET_BYTES", default_value_t = DEFAULT_TENANT_MEMORY_BUDGET_BYTES)]
    pub tenant_memory_budget_bytes: usize,
    /// Client connections at once; new ones beyond it are closed before any request.
    #[arg(long, env = "NIMBUS_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Client connections at once from one IP address.
    #[arg(long, env = "NIMBUS_MAX_CONNECTIONS_PER_IP", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, env = "NIMBUS_H2_MAX_STREAMS", default_value_t = DEFAULT_H2_MAX_STREAMS)]
    pub h2_max_streams: u32,
    /// Largest request head in bytes (request line and headers).
    #[arg(long, env = "NIMBUS_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Requests of one database held at once during a migration cutover (beyond: 503).
    #[arg(long, env = "NIMBUS_HOLD_QUEUE_MAX", default_value_t = DEFAULT_HOLD_QUEUE_MAX)]
    pub hold_queue_max: usize,
    /// Databases with their own series in the admin port's `/metrics` (the busiest of the
    /// last minute; the rest are summed in `nimbus_gateway_other_tenants_last_60s`).
    #[arg(long, env = "NIMBUS_METRICS_TENANT_SERIES", default_value_t = DEFAULT_METRICS_TENANT_SERIES)]
    pub metrics_tenant_series: usize,
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
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}
