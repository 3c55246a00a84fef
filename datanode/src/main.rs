//! The `nimbus-datanode` binary.

use std::time::Duration;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_datanode::config::Config;
use tracing_subscriber::EnvFilter;

/// After the stop, how long tasks still running (a Raft that did not shut down in time) may
/// hold the exit up.
const EXIT_WITHIN: Duration = Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(run());
    runtime.shutdown_timeout(EXIT_WITHIN);
    result
}

async fn run() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    if config.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    nimbus_datanode::node::run(config, prometheus).await
}
