//! A real etcd cluster (Debian's `etcd` binary from PATH) on 127.0.0.1, for tests and
//! benchmarks. Killed on drop.

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::poll;

pub struct EtcdCluster {
    pub client_urls: Vec<String>,
    children: Vec<Child>,
}

/// A port that was free a moment ago (etcd cannot be told to pick its own).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The etcd server binary: Debian installs it as `etcd` (3.4).
pub fn etcd_binary() -> anyhow::Result<std::path::PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/local/bin"]) {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("etcd not found on PATH; run scripts/setup.sh (it installs Debian's etcd-server)")
}

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
        let mut children = Vec::new();
        for i in 0..n {
            let child = Command::new(&bin)
                .arg("--name")
                .arg(format!("e{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("e{i}")))
                .arg("--listen-client-urls")
                .arg(&clients[i])
                .arg("--advertise-client-urls")
                .arg(&clients[i])
                .arg("--listen-peer-urls")
                .arg(&peers[i])
                .arg("--initial-advertise-peer-urls")
                .arg(&peers[i])
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg("nimbus-test")
                .arg("--log-level")
                .arg("error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("failed to start etcd")?;
            children.push(child);
        }
        let cluster = EtcdCluster { client_urls: clients, children };
        let http = reqwest::Client::new();
        poll("etcd to be healthy", Duration::from_secs(30), || {
            let http = http.clone();
            let urls = cluster.client_urls.clone();
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
        .await?;
        Ok(cluster)
    }

    /// Kills every member.
    pub async fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}
