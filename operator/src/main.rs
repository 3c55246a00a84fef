//! The `nimbus-operator` binary: `run` (the controllers) and `crd` (print the CRDs).

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_operator::crd;
use nimbus_operator::k8s::objects::Settings;
use nimbus_operator::k8s::{RunConfig, run};
use tracing_subscriber::EnvFilter;

pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:8090";

#[derive(Parser)]
#[command(name = "nimbus-operator", version, about = "The Nimbus operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd,
    /// Run the controllers (with leader election).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// etcd endpoints of the control plane, comma-separated.
    #[arg(long, env = "NIMBUS_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Image of the datanode Pods.
    #[arg(long, env = "NIMBUS_DATANODE_IMAGE")]
    datanode_image: String,
    /// Image of the gateway Pods.
    #[arg(long, env = "NIMBUS_GATEWAY_IMAGE")]
    gateway_image: String,
    #[arg(long, env = "NIMBUS_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// Gateway replicas per namespace with instances.
    #[arg(long, env = "NIMBUS_GATEWAY_REPLICAS", default_value_t = 2)]
    gateway_replicas: i32,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "nimbus-system")]
    lease_namespace: String,
    /// This replica's identity in the leader election.
    #[arg(long, env = "POD_NAME")]
    identity: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "NIMBUS_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "NIMBUS_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            for (_, yaml) in crd::crd_files()? {
                print!("{yaml}");
            }
            Ok(())
        }
        Command::Run(args) => {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            if args.log_json {
                tracing_subscriber::fmt().with_env_filter(filter).json().with_writer(std::io::stderr).init();
            } else {
                tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
            }
            let prometheus = PrometheusBuilder::new().install_recorder()?;
            let listener = tokio::net::TcpListener::bind(args.metrics_listen)
                .await
                .with_context(|| format!("failed to bind {}", args.metrics_listen))?;
            let app = Router::new()
                .route("/metrics", get(move || std::future::ready(prometheus.render())))
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(|| async { "ok" }));
            tokio::spawn(async move { axum::serve(listener, app).await });
            let settings = Settings {
                datanode_image: args.datanode_image,
                gateway_image: args.gateway_image,
                image_pull_policy: args.image_pull_policy,
                etcd_endpoints: args.etcd,
                gateway_replicas: args.gateway_replicas,
                gateway_service_account: None,
            };
            run(RunConfig { settings, lease_namespace: args.lease_namespace, identity: args.identity }).await?;
            Ok(())
        }
    }
}
