//! Test harness for black-box tests and benchmarks: starts real `nimbus-datanode`
//! processes on 127.0.0.1 (ports picked by the OS), drives them over HTTP, kills and
//! restarts them. Every process is killed when its handle is dropped, so a failing test
//! leaves nothing running.

pub mod client;
pub mod cluster;
pub mod etcd;
pub mod fake_kube;
pub mod gateway;
pub mod linearizability;
pub mod migration;
pub mod pki;
pub mod playground;
pub mod probes;
pub mod process;
pub mod raw;
pub mod secret;
pub mod workload;

pub use client::DataClient;
pub use cluster::Cluster;
pub use process::{Datanode, binary};

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a client of the gateway keeps an idle pooled connection: below the gateway's
/// `--idle-timeout-ms` (60 s), so a request never goes out on a connection the gateway is
/// closing (docs/gateway.md).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
