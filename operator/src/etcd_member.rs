//! `nimbus-operator etcd-member`: the init container of each member of the chart's etcd.
//! It decides how the member starts and writes etcd's configuration file:
//!
//! - with data: as it was (etcd ignores the initial-cluster settings then);
//! - no data, and no other member answers: the first start of a new cluster, unless the
//!   cluster is known to have been bootstrapped already (`--cluster-bootstrapped`: the
//!   operator records it once etcd is set up); then the member waits (exits non-zero, and
//!   the kubelet runs it again) until another member answers, rather than starting an empty
//!   cluster of its own beside the real one;
//! - no data, and the cluster lists this member but it never started: join it;
//! - no data, and the cluster lists this member as one that ran: the member lost its
//!   volume. It is removed from the cluster and added again as a new member, then joins and
//!   catches up from the others (without this, etcd refuses to start with an empty data
//!   directory under an id the others know, and the member stays down for good);
//! - no data, and the cluster does not list it: added, then joins.
//!
//! [`plan`] decides (pure, tested as data); [`run`] observes, acts and writes the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

/// One member of the etcd cluster, as the StatefulSet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub peer_url: String,
}

/// A member as the running cluster lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: u64,
    /// Empty for a member added but never started.
    pub name: String,
    pub peer_urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The data directory has a member: start it as it is.
    Restart,
    /// Nobody answers, there is no data, and no cluster was ever bootstrapped: the first
    /// start of the whole cluster.
    Bootstrap,
    /// Nobody answers and there is no data, but the cluster exists: wait for a member.
    Wait,
    /// Listed but never started: join with the cluster as it lists its members.
    Join,
    /// Listed as a member that ran, but its data is gone: remove it, add it anew, join.
    Replace { id: u64 },
    /// Not listed: add it, join.
    Add,
}

/// How member `me` starts, from its data directory, whether the cluster was ever
/// bootstrapped, and what the cluster says (`None`: no other member answered).
pub fn plan(me: &Peer, has_data: bool, bootstrapped: bool, cluster: Option<&[Listed]>) -> Plan {
    if has_data {
        return Plan::Restart;
    }
    let Some(members) = cluster else { return if bootstrapped { Plan::Wait } else { Plan::Bootstrap } };
    match members.iter().find(|m| m.peer_urls.contains(&me.peer_url) || (!m.name.is_empty() && m.name == me.name)) {
        Some(m) if m.name.is_empty() => Plan::Join,
        Some(m) => Plan::Replace { id: m.id },
        None => Plan::Add,
    }
}

/// etcd's configuration file (`--config-file`; etcd then ignores its other flags).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdConfig {
    pub name: String,
    pub data_dir: String,
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub listen_peer_urls: String,
    pub initial_advertise_peer_urls: String,
    pub listen_metrics_urls: String,
    pub initial_cluster: String,
    pub initial_cluster_state: String,
    pub initial_cluster_token: String,
    /// Keep an hour of history, then compact: the key space stays small.
    pub auto_compaction_mode: String,
    pub auto_compaction_retention: String,
    /// A full backend refuses writes (an alarm) instead of filling the disk.
    pub quota_backend_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_transport_security: Option<Transport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_transport_security: Option<Transport>,
    pub logger: String,
    pub log_level: String,
}

/// TLS of etcd's client or peer listener: client certificates required, signed by the CA.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Transport {
    pub cert_file: String,
    pub key_file: String,
    pub trusted_ca_file: String,
    pub client_cert_auth: bool,
}

/// What `etcd-member` is told (the flags of the command).
#[derive(Debug, Clone, clap::Args)]
pub struct MemberArgs {
    /// This member's name (the Pod's name).
    #[arg(long, env = "POD_NAME")]
    pub name: String,
    /// Every member: `name=peer-url`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Where to write etcd's configuration file.
    #[arg(long)]
    pub config_file: PathBuf,
    /// The cluster was bootstrapped once (the operator's record of it): a member with no
    /// data never starts a new cluster, it waits for another member.
    #[arg(long, env = "NIMBUS_ETCD_BOOTSTRAPPED", default_value_t = false, action = clap::ArgAction::Set)]
    pub cluster_bootstrapped: bool,
    #[arg(long, default_value = "nimbus-etcd")]
    pub cluster_token: String,
    #[arg(long, default_value_t = 1024 * 1024 * 1024)]
    pub quota_backend_bytes: u64,
    /// The address etcd's client and peer listeners bind (the advertised URLs' ports).
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_host: String,
    /// Address for `/health` and `/metrics` without TLS (probes).
    #[arg(long, default_value = "http://0.0.0.0:2381")]
    pub listen_metrics_url: String,
    /// Directory with `tls.crt`, `tls.key` and `ca.crt`: TLS on both listeners, client
    /// certificates required.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Every member's client URL (`--etcd`, in the order of `--peers`) and how this command
    /// reaches them (root's client certificate with TLS).
    #[command(flatten)]
    pub etcd: nimbus_net::EtcdArgs,
}

impl MemberArgs {
    fn peers(&self) -> anyhow::Result<Vec<Peer>> {
        self.peers
            .iter()
            .map(|p| {
                let (name, url) = p.split_once('=').with_context(|| format!("peer {p:?} is not name=url"))?;
                Ok(Peer { name: name.to_owned(), peer_url: url.to_owned() })
            })
            .collect()
    }
}

fn listen_url(host: &str, advertised: &str) -> String {
    let scheme = advertised.split("://").next().unwrap_or("http");
    let port = advertised.rsplit(':').next().unwrap_or("2380");
    format!("{scheme}://{host}:{port}")
}

/// The configuration of `me` for `plan`, the cluster's members being `initial`.
pub fn config(args: &MemberArgs, me: &Peer, client_url: &str, initial: &[Peer], plan: &Plan) -> EtcdConfig {
    let transport = args.tls_dir.as_ref().map(|d| Transport {
        cert_file: d.join("tls.crt").display().to_string(),
        key_file: d.join("tls.key").display().to_string(),
        trusted_ca_file: d.join("ca.crt").display().to_string(),
        client_cert_auth: true,
    });
    EtcdConfig {
        name: me.name.clone(),
        data_dir: args.data_dir.display().to_string(),
        listen_client_urls: listen_url(&args.listen_host, client_url),
        advertise_client_urls: client_url.to_owned(),
        listen_peer_urls: listen_url(&args.listen_host, &me.peer_url),
        initial_advertise_peer_urls: me.peer_url.clone(),
        listen_metrics_urls: args.listen_metrics_url.clone(),
        initial_cluster: initial.iter().map(|p| format!("{}={}", p.name, p.peer_url)).collect::<Vec<_>>().join(","),
        initial_cluster_state: if matches!(plan, Plan::Restart | Plan::Bootstrap) { "new" } else { "existing" }.into(),
        initial_cluster_token: args.cluster_token.clone(),
        auto_compaction_mode: "periodic".into(),
        auto_compaction_retention: "1h".into(),
        quota_backend_bytes: args.quota_backend_bytes,
        client_transport_security: transport.clone(),
        peer_transport_security: transport,
        logger: "zap".into(),
        log_level: "info".into(),
    }
}

/// How long a member add waits for the cluster to be ready for one.
const ADD_PATIENCE: Duration = Duration::from_secs(60);

/// Adds a member, waiting while etcd says the cluster is not ready for one: with its strict
/// reconfiguration check, etcd adds a member only once every voter has been connected for
/// five seconds (just after a restart or a removal it answers "unhealthy cluster").
async fn add_when_healthy(c: &mut etcd_client::Client, peer_url: &str) -> anyhow::Result<Vec<etcd_client::Member>> {
    let deadline = std::time::Instant::now() + ADD_PATIENCE;
    loop {
        match c.member_add([peer_url], None).await {
            Ok(r) => return Ok(r.member_list().to_vec()),
            Err(e) if e.to_string().contains("unhealthy cluster") && std::time::Instant::now() < deadline => {
                tracing::info!("the cluster is not ready to add a member yet; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("failed to add this member"),
        }
    }
}

fn has_member_data(dir: &Path) -> bool {
    dir.join("member").join("wal").is_dir()
}

/// Observes, acts (removes and adds members) and writes the configuration file.
pub async fn run(args: &MemberArgs) -> anyhow::Result<Plan> {
    let peers = args.peers()?;
    let i = peers
        .iter()
        .position(|p| p.name == args.name)
        .with_context(|| format!("{} is not among --peers", args.name))?;
    let me = peers[i].clone();
    let client_url = args.etcd.endpoints.get(i).context("--etcd has fewer entries than --peers")?.clone();
    let has_data = has_member_data(&args.data_dir);
    let others: Vec<String> =
        args.etcd.endpoints.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, u)| u.clone()).collect();
    let mut client = None;
    let mut listed = None;
    if !has_data {
        let ask = nimbus_net::EtcdArgs { endpoints: others, ..args.etcd.clone() };
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        if let Ok(mut c) = ask.connect(opts).await
            && let Ok(resp) = c.member_list().await
        {
            listed = Some(
                resp.members()
                    .iter()
                    .map(|m| Listed { id: m.id(), name: m.name().to_owned(), peer_urls: m.peer_urls().to_vec() })
                    .collect::<Vec<_>>(),
            );
            client = Some(c);
        }
    }
    let decision = plan(&me, has_data, args.cluster_bootstrapped, listed.as_deref());
    if decision == Plan::Wait {
        anyhow::bail!(
            "this member has no data and no other member answers, but the cluster was bootstrapped before: \
             waiting for another member (run again)"
        );
    }
    let mut initial = peers.clone();
    if let (Some(c), Plan::Replace { .. } | Plan::Add | Plan::Join) = (client.as_mut(), &decision) {
        if let Plan::Replace { id } = decision {
            c.member_remove(id).await.context("failed to remove the member that lost its data")?;
        }
        let members = if matches!(decision, Plan::Join) {
            c.member_list().await?.members().to_vec()
        } else {
            add_when_healthy(c, &me.peer_url).await?
        };
        // The cluster as it now lists itself, this member (not started yet, no name) included.
        initial = members
            .iter()
            .filter_map(|m| {
                let url = m.peer_urls().first()?.clone();
                let name = if m.peer_urls().contains(&me.peer_url) { me.name.clone() } else { m.name().to_owned() };
                (!name.is_empty()).then_some(Peer { name, peer_url: url })
            })
            .collect();
    }
    let cfg = config(args, &me, &client_url, &initial, &decision);
    let yaml = serde_yaml_ng::to_string(&cfg)?;
    if let Some(parent) = args.config_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.config_file, yaml)
        .with_context(|| format!("failed to write {}", args.config_file.display()))?;
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Peer {
        Peer { name: "etcd-1".into(), peer_url: "https://etcd-1.etcd:2380".into() }
    }

    fn listed(id: u64, name: &str, url: &str) -> Listed {
        Listed { id, name: name.into(), peer_urls: vec![url.into()] }
    }

    #[test]
    fn a_member_with_data_restarts_as_it_was() {
        assert_eq!(plan(&me(), true, true, None), Plan::Restart);
        assert_eq!(plan(&me(), true, false, Some(&[listed(7, "etcd-1", "https://etcd-1.etcd:2380")])), Plan::Restart);
    }

    #[test]
    fn with_no_data_and_no_cluster_the_cluster_is_born_only_once() {
        assert_eq!(plan(&me(), false, false, None), Plan::Bootstrap);
        // Bootstrapped before, nobody answering yet (a whole-cluster restart): wait, never
        // start an empty cluster beside the real one.
        assert_eq!(plan(&me(), false, true, None), Plan::Wait);
    }

    #[test]
    fn a_member_that_lost_its_volume_is_replaced() {
        let cluster =
            [listed(5, "etcd-0", "https://etcd-0.etcd:2380"), listed(7, "etcd-1", "https://etcd-1.etcd:2380")];
        assert_eq!(plan(&me(), false, true, Some(&cluster)), Plan::Replace { id: 7 });
    }

    #[test]
    fn a_member_listed_but_never_started_joins() {
        let cluster = [listed(5, "etcd-0", "https://etcd-0.etcd:2380"), listed(7, "", "https://etcd-1.etcd:2380")];
        assert_eq!(plan(&me(), false, false, Some(&cluster)), Plan::Join);
    }

    #[test]
    fn a_member_the_cluster_does_not_know_is_added() {
        let cluster = [listed(5, "etcd-0", "https://etcd-0.etcd:2380")];
        assert_eq!(plan(&me(), false, true, Some(&cluster)), Plan::Add);
    }
}
