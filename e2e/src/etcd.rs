//! A real etcd cluster (Debian's `etcd` binary from PATH) on 127.0.0.1, for tests and
//! benchmarks. Killed on drop.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::poll;

pub struct EtcdCluster {
    pub client_urls: Vec<String>,
    children: Vec<Child>,
    commands: Vec<Vec<String>>,
}

/// A port free now, outside the ephemeral range (etcd cannot be told to pick its own).
fn free_port() -> anyhow::Result<u16> {
    Ok(nimbus_net::ports::free_port()?)
}

/// The etcd server binary (Debian installs it as `etcd`, 3.4), as the playground finds it.
pub use nimbus_playground::binaries::etcd_binary;

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster answers.
    pub async fn start(n: usize, dir: &Path) -> anyhow::Result<EtcdCluster> {
        let bin = etcd_binary()?;
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..n {
            peers.push(format!("http://127.0.0.1:{}", free_port()?));
            clients.push(format!("http://127.0.0.1:{}", free_port()?));
        }
        let initial: Vec<String> = (0..n).map(|i| format!("e{i}={}", peers[i])).collect();
        let mut commands = Vec::new();
        for i in 0..n {
            let args: Vec<String> = vec![
                "--name".into(),
                format!("e{i}"),
                "--data-dir".into(),
                dir.join(format!("e{i}")).display().to_string(),
                "--listen-client-urls".into(),
                clients[i].clone(),
                "--advertise-client-urls".into(),
                clients[i].clone(),
                "--listen-peer-urls".into(),
                peers[i].clone(),
                "--initial-advertise-peer-urls".into(),
                peers[i].clone(),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                "nimbus-test".into(),
                "--log-level".into(),
                "error".into(),
            ];
            commands.push(args);
        }
        let mut children = Vec::new();
        for args in &commands {
            children.push(spawn(&bin, args)?);
        }
        let cluster = EtcdCluster { client_urls: clients, children, commands };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        poll("etcd to be healthy", Duration::from_secs(30), || {
            let http = http.clone();
            let urls = self.client_urls.clone();
            async move {
                for u in &urls {
                    let ok = http.get(format!("{u}/health")).send().await.ok()?.text().await.ok()?;
                    if !ok.contains("true") {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// Starts every member again (same data, same ports) and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let bin = etcd_binary()?;
        self.children = self.commands.iter().map(|a| spawn(&bin, a)).collect::<anyhow::Result<_>>()?;
        self.wait_healthy().await
    }

    /// Kills every member.
    pub async fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

fn spawn(bin: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start etcd")
}
