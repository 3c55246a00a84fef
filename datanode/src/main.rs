//! The `nimbus-datanode` binary.

use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_datanode::config::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
