//! A gateway process and the control-plane writes it reads (routes, users, limits in etcd).

use std::process::Stdio;

use etcd_client::Client;
use nimbus_api::etcd::{self as keys, Limits, Route, RouteMember, RouteState, UserRole};
use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::cluster::Cluster;
use crate::process::{binary, spawn_reporting};

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
    /// Starts a gateway on free ports, with the cluster secret in `secret_file`.
    pub async fn start(
        id: &str,
        etcd: &[String],
        secret_file: &std::path::Path,
        extra_args: &[&str],
    ) -> anyhow::Result<GatewayProc> {
        let mut cmd = Command::new(binary("nimbus-gateway")?);
        cmd.arg("--id")
            .arg(id)
            .arg("--etcd")
            .arg(etcd.join(","))
            .arg("--cluster-secret-file")
            .arg(secret_file)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(extra_args)
            .env("RUST_LOG", std::env::var("NIMBUS_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let (child, ep): (Child, Endpoints) = spawn_reporting(&mut cmd, "nimbus-gateway").await?;
        Ok(GatewayProc { public: ep.public, admin: ep.admin, child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
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
            hold_timeout_ms: None,
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
        Self::start_with(datanodes, dbs, &[]).await
    }

    /// The same, the datanodes started with `datanode_args`.
    pub async fn start_with(datanodes: usize, dbs: &[&str], datanode_args: &[&str]) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new().prefix("nimbus-stack-").tempdir()?;
        let etcd = crate::etcd::EtcdCluster::start(1, dir.path()).await?;
        let cluster = Cluster::start(datanodes, datanode_args).await?;
        let mut control = Control::connect(&etcd.client_urls).await?;
        for db in dbs {
            control.route(db, &cluster, 1, RouteState::Serving).await?;
        }
        Ok(Stack { etcd, cluster, control, _dir: dir })
    }
}
