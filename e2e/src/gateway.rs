//! A gateway process and the control-plane writes it reads (routes, users, limits in etcd).

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use etcd_client::Client;
use nimbus_api::etcd::{self as keys, Limits, Route, RouteMember, RouteState, UserRole};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cluster::Cluster;
use crate::process::binary;

#[derive(Deserialize)]
struct Endpoints {
    public: String,
    admin: String,
}

/// A running gateway. Killed on drop.
pub struct GatewayProc {
    pub public: String,
    pub admin: String,
    child: Child,
}

impl GatewayProc {
    pub async fn start(id: &str, etcd: &[String], extra_args: &[&str]) -> anyhow::Result<GatewayProc> {
        let mut child = Command::new(binary("nimbus-gateway")?)
            .arg("--id")
            .arg(id)
            .arg("--etcd")
            .arg(etcd.join(","))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(extra_args)
            .env("RUST_LOG", std::env::var("NIMBUS_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start nimbus-gateway")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("gateway did not report its endpoints")??
            .context("gateway exited early")?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ep: Endpoints = serde_json::from_str(&line)?;
        Ok(GatewayProc { public: ep.public, admin: ep.admin, child })
    }

    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Writes the control plane's keys, as the operator would.
pub struct Control {
    pub etcd: Client,
}

impl Control {
    pub async fn connect(endpoints: &[String]) -> anyhow::Result<Control> {
        Ok(Control { etcd: Client::connect(endpoints, None).await? })
    }

    /// Routes `db` to the replica set of `cluster`.
    pub async fn route(&mut self, db: &str, cluster: &Cluster, epoch: u64, state: RouteState) -> anyhow::Result<()> {
        let route = Route {
            replica_set: cluster.replica_set.clone(),
            members: cluster
                .nodes
                .iter()
                .map(|d| RouteMember { id: d.id, data_addr: d.data.clone(), zone: d.zone.clone() })
                .collect(),
            epoch,
            state,
            hold_deadline_ms: None,
        };
        self.etcd.put(keys::route_key(db), serde_json::to_vec(&route)?, None).await?;
        Ok(())
    }

    /// Creates a user and returns its token.
    pub async fn user(&mut self, db: &str, user: &str, role: UserRole) -> anyhow::Result<String> {
        let (token, record) = nimbus_gateway::auth::new_token(db, user, role);
        self.etcd.put(keys::user_key(db, user), serde_json::to_vec(&record)?, None).await?;
        Ok(token)
    }

    pub async fn revoke(&mut self, db: &str, user: &str) -> anyhow::Result<()> {
        self.etcd.delete(keys::user_key(db, user), None).await?;
        Ok(())
    }

    pub async fn limits(&mut self, db: &str, limits: &Limits) -> anyhow::Result<()> {
        self.etcd.put(keys::limits_key(db), serde_json::to_vec(limits)?, None).await?;
        Ok(())
    }
}

/// What a gateway needs to serve: etcd (one member), a replica set, and routes for some
/// databases. Everything it started stops when it is dropped.
pub struct Stack {
    pub etcd: crate::etcd::EtcdCluster,
    pub cluster: Cluster,
    pub control: Control,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(datanodes: usize, dbs: &[&str]) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new().prefix("nimbus-stack-").tempdir()?;
        let etcd = crate::etcd::EtcdCluster::start(1, dir.path()).await?;
        let cluster = Cluster::start(datanodes, &[]).await?;
        let mut control = Control::connect(&etcd.client_urls).await?;
        for db in dbs {
            control.route(db, &cluster, 1, RouteState::Serving).await?;
        }
        Ok(Stack { etcd, cluster, control, _dir: dir })
    }
}
