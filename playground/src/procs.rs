//! The processes the playground runs: each replica-set member's datanode (by replica set
//! and id, in its zone's network namespace when zones are isolated), and the others (etcd,
//! the gateway), all stopped with the control plane.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};
use tracing::info;

use crate::netns::Network;
use crate::state::MemberState;

pub struct Procs {
    pub dir: PathBuf,
    pub secrets: PathBuf,
    pub datanode_bin: PathBuf,
    /// Member processes by (replica set, id).
    pub members: BTreeMap<(String, u64), Child>,
    pub others: Vec<Child>,
    pub network: Option<Network>,
}

impl Procs {
    pub fn log(&self, name: &str) -> anyhow::Result<std::process::Stdio> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{name}.log")))?;
        Ok(f.into())
    }

    pub fn member_dir(&self, rs: &str, id: u64) -> PathBuf {
        self.dir.join("datanodes").join(rs).join(format!("m{id}"))
    }

    pub fn start_member(&mut self, rs: &str, m: &MemberState) -> anyhow::Result<()> {
        let log = self.log(&format!("{rs}-m{}", m.id))?;
        let err = self.log(&format!("{rs}-m{}", m.id))?;
        // In its zone's namespace when zones are isolated (`ip netns exec` execs the
        // datanode: the pid is the datanode's).
        let (mut cmd, host) = match &self.network {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.namespace(&m.zone)]).arg(&self.datanode_bin);
                (c, n.hosts.get(&m.zone).cloned().context("a member's zone has no address")?)
            }
            None => (Command::new(&self.datanode_bin), "127.0.0.1".to_owned()),
        };
        let child = cmd
            .args(["--id", &m.id.to_string(), "--zone", &m.zone, "--replica-set", rs])
            .arg("--data-dir")
            .arg(self.member_dir(rs, m.id))
            .args(["--data-listen", &format!("{host}:{}", m.data_port)])
            .args(["--admin-listen", &format!("{host}:{}", m.admin_port)])
            .args(["--raft-listen", &format!("{host}:{}", m.raft_port)])
            .arg("--cluster-secret-file")
            .arg(&self.secrets)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", self.datanode_bin.display()))?;
        info!(replica_set = rs, member = m.id, pid = child.id(), "datanode started");
        self.members.insert((rs.to_string(), m.id), child);
        Ok(())
    }

    pub fn running(&mut self, rs: &str, id: u64) -> bool {
        match self.members.get_mut(&(rs.to_string(), id)) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self, rs: &str, id: u64) -> Option<u32> {
        self.members.get(&(rs.to_string(), id)).and_then(|c| c.id())
    }

    pub async fn stop_member(&mut self, rs: &str, id: u64) {
        if let Some(mut c) = self.members.remove(&(rs.to_string(), id)) {
            let _ = c.kill().await;
        }
    }

    pub async fn stop_all(&mut self) {
        // SIGTERM first, so datanodes flush; then make sure.
        let mut all: Vec<Child> = std::mem::take(&mut self.members).into_values().collect();
        all.append(&mut self.others);
        for c in &all {
            if let Some(pid) = c.id() {
                terminate(pid);
            }
        }
        for mut c in all {
            if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// SIGTERM to a process (through `kill`, keeping this crate free of unsafe code).
pub fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

pub fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
