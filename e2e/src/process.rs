//! One datanode process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A Nimbus binary next to the running test or benchmark (built by `cargo build --workspace
/// --bins`), or the path in `NIMBUS_<NAME>_BIN`: the playground's own lookup.
pub use nimbus_playground::binaries::sibling_binary as binary;

/// Spawns `cmd` (its stdout piped) and reads the endpoints the process prints as its first
/// line. Stdout is drained afterwards so the process never blocks on a full pipe.
pub async fn spawn_reporting<T: DeserializeOwned>(cmd: &mut Command, what: &str) -> anyhow::Result<(Child, T)> {
    let mut child = cmd.spawn().with_context(|| format!("failed to start {what}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .with_context(|| format!("{what} did not report its endpoints within 30 s"))??
        .with_context(|| format!("{what} exited before reporting its endpoints"))?;
    let endpoints =
        serde_json::from_str(&line).with_context(|| format!("unexpected first line {line:?} from {what}"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, endpoints))
}

#[derive(Debug, Deserialize)]
struct Endpoints {
    data: String,
    admin: String,
    raft: String,
}

/// A running (or stopped) datanode. Killed on drop.
pub struct Datanode {
    pub id: u64,
    pub zone: String,
    pub replica_set: String,
    pub dir: PathBuf,
    pub data: String,
    pub admin: String,
    pub raft: String,
    /// Passed to every start (the cluster secret file among them).
    pub extra_args: Vec<String>,
    data_port: u16,
    admin_port: u16,
    raft_port: u16,
    child: Option<Child>,
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

impl Datanode {
    /// Starts a datanode on free ports, chosen outside the ephemeral range
    /// (`nimbus_net::ports`): a restart binds them again, and a port the kernel handed out
    /// could meanwhile be an outgoing connection's.
    pub async fn start(
        id: u64,
        zone: &str,
        replica_set: &str,
        dir: &Path,
        extra_args: &[String],
    ) -> anyhow::Result<Datanode> {
        let mut d = Datanode {
            id,
            zone: zone.to_owned(),
            replica_set: replica_set.to_owned(),
            dir: dir.to_owned(),
            data: String::new(),
            admin: String::new(),
            raft: String::new(),
            extra_args: extra_args.to_vec(),
            data_port: nimbus_net::ports::free_port()?,
            admin_port: nimbus_net::ports::free_port()?,
            raft_port: nimbus_net::ports::free_port()?,
            child: None,
        };
        d.spawn().await?;
        Ok(d)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = binary("nimbus-datanode")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--id")
            .arg(self.id.to_string())
            .arg("--zone")
            .arg(&self.zone)
            .arg("--replica-set")
            .arg(&self.replica_set)
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--data-listen")
            .arg(format!("127.0.0.1:{}", self.data_port))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--raft-listen")
            .arg(format!("127.0.0.1:{}", self.raft_port))
            .args(&self.extra_args)
            .env("RUST_LOG", std::env::var("NIMBUS_TEST_LOG").unwrap_or_else(|_| "warn,openraft=error".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let (child, ep): (Child, Endpoints) = spawn_reporting(&mut cmd, "nimbus-datanode").await?;
        self.data_port = port_of(&ep.data);
        self.admin_port = port_of(&ep.admin);
        self.raft_port = port_of(&ep.raft);
        self.data = ep.data;
        self.admin = ep.admin;
        self.raft = ep.raft;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// `kill -TERM` (a planned stop, as the kubelet's), then waits up to `timeout` for the
    /// process to exit: its exit status and how long it took. A process still running then
    /// is killed, and that is an error.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take().context("the datanode is not running")?;
        let pid = child.id().context("the datanode has already exited")?;
        let started = std::time::Instant::now();
        let sent = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        if !sent.success() {
            let _ = child.start_kill();
            anyhow::bail!("kill -TERM {pid} failed");
        }
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok((status?, started.elapsed())),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                anyhow::bail!("datanode {} still ran {timeout:?} after SIGTERM (killed)", self.id)
            }
        }
    }

    /// Starts the process again with the same directory and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn().await
    }

    /// The member as the admin API describes it.
    pub fn member(&self) -> nimbus_api::admin::MemberInfo {
        nimbus_api::admin::MemberInfo {
            id: self.id,
            admin_addr: self.admin.clone(),
            data_addr: self.data.clone(),
            raft_addr: self.raft.clone(),
            zone: self.zone.clone(),
            voter: true,
        }
    }
}
