//! The `nimbus-gateway` binary.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_gateway::config::Config;
use nimbus_gateway::server::{self, Listening};
use nimbus_gateway::state::Gateway;
use nimbus_gateway::sync;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if config.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    if config.tenant_memory_budget_bytes < config.max_body_bytes
        || config.memory_budget_bytes / 4 < config.max_body_bytes
    {
        anyhow::bail!(
            "--tenant-memory-budget-bytes and a quarter of --memory-budget-bytes (the answers' share; the bodies have \
             the rest) must be at least --max-body-bytes, or no largest body or answer could be held"
        );
    }
    let secret = config.cluster.load().context("failed to load the cluster secret")?;
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(server::tls_acceptor(c, k).context("failed to load the TLS certificate and key")?),
        _ => None,
    };
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("failed to bind {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("failed to bind {}", config.admin_listen))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = format!("{scheme}://{}", listener.local_addr()?);
    let admin_url = format!("http://{}", admin.local_addr()?);
    let public_how = Listening::from_config(&config, tls);
    let admin_how = Listening::from_config(&config, None);
    let gw = Arc::new(Gateway::new(config, secret)?);
    println!(
        "{}",
        serde_json::json!({"id": gw.config.id, "public": public_url, "admin": admin_url, "pid": std::process::id()})
    );
    tracing::info!(public = %public_url, admin = %admin_url, "gateway started");
    tokio::spawn(sync::run(gw.clone(), public_url));
    let public = server::public_router(gw.clone(), prometheus.clone());
    let admin_app = server::admin_router(gw.clone(), prometheus);
    tokio::spawn(server::serve(admin, admin_app, None, admin_how));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = server::serve(listener, public, Some(gw.clone()), public_how) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
