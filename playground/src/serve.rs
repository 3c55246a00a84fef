//! The playground's control plane: etcd, the gateway and the datanodes as local processes,
//! kept healthy by the operator's replica-set driver (`controlplane::driver`) with a local
//! provisioner ([`crate::local`]): a member is a process and a data directory instead of a
//! Pod and a PVC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nimbus_operator::controlplane::admin::AdminClient;
use nimbus_operator::controlplane::coord::Coordinator;
use nimbus_operator::controlplane::etcd_access::{self, GATEWAY_USER, OPERATOR_USER, ROOT_USER, User};
use nimbus_operator::controlplane::placement::{self, PoolMode, ReplicaSetLoad};
use nimbus_operator::crd::v1alpha1::{DatabaseInstance, Tier, UserRole};
use tokio::process::Command;
use tracing::{info, warn};

use crate::binaries::{GATEWAY_BIN, etcd_binary, sibling_binary};
use crate::local::tick;
use crate::netns::{Network, ZoneState};
use crate::procs::Procs;
use crate::secrets::Secrets;
use crate::state::{self, InstanceState, Playground, PlaygroundDatanode, PlaygroundInstance, State};

/// How often the control loop looks at every replica set.
pub const TICK: Duration = Duration::from_millis(500);

pub struct Options {
    pub dir: PathBuf,
    pub instances: Vec<PathBuf>,
    pub zones: usize,
    /// Each zone in its own network namespace (see `netns`).
    pub isolate_zones: bool,
}

async fn wait_http(url: &str, deadline: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > end {
            bail!("{url} did not answer within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the playground until SIGTERM/SIGINT.
pub async fn serve(opts: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.dir)?;
    let dir = opts.dir.canonicalize()?;
    let mut st = match State::load(&dir)? {
        Some(s) => s,
        None => State {
            etcd_client_port: state::free_port()?,
            etcd_peer_port: state::free_port()?,
            gateway_port: state::free_port()?,
            gateway_admin_port: state::free_port()?,
            control_plane_port: state::free_port()?,
            zones: ["a", "b", "c", "d", "e"].iter().take(opts.zones.max(3)).map(|z| z.to_string()).collect(),
            ..Default::default()
        },
    };
    let secrets = Secrets::ensure(&dir)?;
    let mut procs = Procs {
        dir: dir.clone(),
        secrets: secrets.cluster_secret_file(),
        datanode_bin: sibling_binary(crate::binaries::DATANODE_BIN)?,
        members: BTreeMap::new(),
        others: Vec::new(),
        network: None,
    };
    if opts.isolate_zones && st.network.is_none() {
        st.network = Some(Network::choose(&st.zones)?);
    }
    if let Some(n) = &st.network {
        n.create().context("failed to create the zones' network namespaces")?;
        procs.network = Some(n.clone());
    }
    let result = run(&opts, &dir, &mut st, &mut procs, &secrets).await;
    procs.stop_all().await;
    if let Some(n) = &procs.network {
        n.remove();
    }
    let _ = std::fs::remove_file(dir.join(state::PID_FILE));
    result
}

async fn run(opts: &Options, dir: &Path, st: &mut State, procs: &mut Procs, secrets: &Secrets) -> anyhow::Result<()> {
    if st.replica_sets.values().any(|s| s.members.values().any(|m| m.raft_port == 0)) {
        bail!(
            "{} was made by an earlier Nimbus, without Raft ports or cluster secrets: its datanodes cannot be \
             upgraded in place. Remove the directory and run `nimbus playground up` again",
            dir.display()
        );
    }
    // etcd.
    let etcd_url = format!("http://127.0.0.1:{}", st.etcd_client_port);
    let peer_url = format!("http://127.0.0.1:{}", st.etcd_peer_port);
    let etcd = Command::new(etcd_binary()?)
        .args(["--name", "playground", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("playground={peer_url}")])
        .stdin(std::process::Stdio::null())
        .stdout(procs.log("etcd")?)
        .stderr(procs.log("etcd")?)
        .kill_on_drop(true)
        .spawn()
        .context("failed to start etcd")?;
    procs.others.push(etcd);
    wait_http(&format!("{etcd_url}/health"), Duration::from_secs(30)).await.context("etcd did not start")?;
    if !st.etcd_auth {
        setup_etcd_auth(&etcd_url, secrets).await.context("failed to set up etcd's users and roles")?;
        st.etcd_auth = true;
        st.save(dir)?;
    }
    let store = Coordinator::connect(&secrets.etcd(&etcd_url, OPERATOR_USER)).await?;
    let secret = secrets.cluster_secret()?;

    // The gateway.
    let gateway_url = format!("http://127.0.0.1:{}", st.gateway_port);
    let gw = Command::new(sibling_binary(GATEWAY_BIN)?)
        .args(["--id", "playground-gw", "--etcd", &etcd_url, "--etcd-user", GATEWAY_USER])
        .arg("--etcd-password-file")
        .arg(secrets.password_file(GATEWAY_USER))
        .arg("--cluster-secret-file")
        .arg(secrets.cluster_secret_file())
        .args(["--listen", &format!("127.0.0.1:{}", st.gateway_port)])
        .args(["--admin-listen", &format!("127.0.0.1:{}", st.gateway_admin_port)])
        .stdin(std::process::Stdio::null())
        .stdout(procs.log("gateway")?)
        .stderr(procs.log("gateway")?)
        .kill_on_drop(true)
        .spawn()
        .context("failed to start the gateway")?;
    procs.others.push(gw);

    // Instances: the ones given, else the example.
    let files = if opts.instances.is_empty() { vec![default_instance()?] } else { opts.instances.clone() };
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("failed to read {}", f.display()))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let dbi: DatabaseInstance = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("failed to parse a DatabaseInstance in {}", f.display()))?;
            admit(st, &dbi)?;
        }
    }
    st.save(dir)?;

    // The control plane's own endpoint: the current playground.json.
    let shown = Arc::new(Mutex::new(Playground::default()));
    let cp_listener = tokio::net::TcpListener::bind(("127.0.0.1", st.control_plane_port)).await?;
    let cp_url = format!("http://127.0.0.1:{}", st.control_plane_port);
    let shown_http = shown.clone();
    let wanted: Wanted = Arc::new(Mutex::new(st.zones.iter().map(|z| (z.clone(), ZoneState::Up)).collect()));
    let app = axum::Router::new()
        .route(
            "/v1/status",
            axum::routing::get(move || {
                let s = shown_http.lock().map(|g| g.clone()).unwrap_or_default();
                std::future::ready(axum::Json(s))
            }),
        )
        .route("/v1/zones/{zone}", axum::routing::post(set_zone))
        .with_state(ZonesApi { wanted: wanted.clone(), isolated: st.network.is_some() })
        // The state shown holds every token, and zones can be taken down: components only.
        .route_layer(axum::middleware::from_fn_with_state(secret.clone(), nimbus_net::cluster::require))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(cp_listener, app).await });

    let admin = AdminClient::new(&secret);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut phases: BTreeMap<String, String> = BTreeMap::new();
    let mut zones: BTreeMap<String, ZoneState> = st.zones.iter().map(|z| (z.clone(), ZoneState::Up)).collect();
    loop {
        let want = wanted.lock().map(|w| w.clone()).unwrap_or_default();
        for (zone, state) in want {
            if zones.get(&zone) != Some(&state) {
                apply_zone(st, procs, &zone, state).await?;
                info!(zone = %zone, ?state, "zone changed");
                zones.insert(zone, state);
            }
        }
        let down: Vec<String> = zones.iter().filter(|(_, s)| **s == ZoneState::Down).map(|(z, _)| z.clone()).collect();
        let rs_names: Vec<String> = st.replica_sets.keys().cloned().collect();
        let mut led: BTreeMap<String, bool> = BTreeMap::new();
        let mut steady: BTreeMap<String, bool> = BTreeMap::new();
        for rs in rs_names {
            match tick(st, procs, &admin, &store, &rs, dir, &down).await {
                Ok((is_led, is_steady)) => {
                    led.insert(rs.clone(), is_led);
                    steady.insert(rs, is_steady);
                }
                Err(e) => warn!(replica_set = %rs, error = %format!("{e:#}"), "control-plane step failed"),
            }
        }
        st.save(dir)?;
        for (name, inst) in &st.instances {
            let is_led = led.get(&inst.replica_set).copied().unwrap_or(false);
            let is_steady = steady.get(&inst.replica_set).copied().unwrap_or(false);
            let was = phases.get(name).cloned().unwrap_or_default();
            let phase = match (is_led, is_steady) {
                (true, true) => "Ready",
                _ if was == "Ready" || was == "Degraded" => "Degraded",
                _ => "Provisioning",
            };
            if phase != was {
                info!(instance = %name, phase, "phase");
            }
            phases.insert(name.clone(), phase.to_string());
        }
        let mut pg = playground_view(st, procs, dir, &phases, &gateway_url, &cp_url, &etcd_url);
        pg.zones = zones.clone();
        pg.cluster_secret_file = secrets.cluster_secret_file();
        if let Ok(mut g) = shown.lock() {
            *g = pg.clone();
        }
        state::write_atomically(&dir.join(state::PLAYGROUND_FILE), &serde_json::to_vec_pretty(&pg)?)?;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// The zone states asked for through the control plane's API.
type Wanted = Arc<Mutex<BTreeMap<String, ZoneState>>>;

#[derive(Clone)]
struct ZonesApi {
    wanted: Wanted,
    isolated: bool,
}

#[derive(serde::Deserialize)]
struct ZoneRequest {
    state: ZoneState,
}

/// `POST /v1/zones/{zone}` `{"state": "up"|"down"|"partitioned"|"isolated"}`: the control
/// loop applies it on its next tick, and `playground.json` shows it once applied.
async fn set_zone(
    axum::extract::State(api): axum::extract::State<ZonesApi>,
    axum::extract::Path(zone): axum::extract::Path<String>,
    axum::Json(req): axum::Json<ZoneRequest>,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    if matches!(req.state, ZoneState::Partitioned | ZoneState::Isolated) && !api.isolated {
        return (
            StatusCode::BAD_REQUEST,
            "cutting a zone's network needs zones in network namespaces: `nimbus playground up --isolate-zones`".into(),
        );
    }
    let Ok(mut wanted) = api.wanted.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "control plane state poisoned".into());
    };
    match wanted.get_mut(&zone) {
        Some(s) => {
            *s = req.state;
            (StatusCode::ACCEPTED, format!("zone {zone}: {:?}", req.state))
        }
        None => (StatusCode::NOT_FOUND, format!("no zone {zone:?}")),
    }
}

/// Brings a zone to `state`: its network (namespaces only), and for `Down` its processes
/// killed with SIGKILL, as a power loss would (the control loop keeps them down).
async fn apply_zone(st: &State, procs: &mut Procs, zone: &str, state: ZoneState) -> anyhow::Result<()> {
    if let Some(n) = &procs.network {
        n.apply(zone, state)?;
    }
    if state == ZoneState::Down {
        for (rs, set) in &st.replica_sets {
            for m in set.members.values().filter(|m| m.zone == zone) {
                procs.stop_member(rs, m.id).await;
            }
        }
    }
    Ok(())
}

/// The example instance `examples/database-instance.yaml`, found from the binary's place in
/// the workspace or the current directory.
fn default_instance() -> anyhow::Result<PathBuf> {
    let rel = Path::new("examples").join("database-instance.yaml");
    let exe = std::env::current_exe()?;
    let mut candidates: Vec<PathBuf> = vec![std::env::current_dir()?.join(&rel)];
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&rel));
    candidates.extend(exe.ancestors().map(|d| d.join(&rel)));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("examples/database-instance.yaml not found: pass --instances FILE"))
}

/// Places a new instance (or keeps an existing one's placement) and makes its tokens.
fn admit(st: &mut State, dbi: &DatabaseInstance) -> anyhow::Result<()> {
    let name = dbi.metadata.name.clone().context("an instance has no metadata.name")?;
    if st.instances.contains_key(&name) {
        return Ok(());
    }
    let db = dbi.database();
    nimbus_api::limits::validate_name("database", &db).map_err(|e| anyhow::anyhow!("{name}: {}", e.message))?;
    let dedicated = dbi.spec.tier == Tier::Dedicated;
    let mode = if dedicated { PoolMode::Dedicated } else { PoolMode::Shared { capacity: 200 } };
    let mut counts: BTreeMap<String, u32> = st.replica_sets.keys().map(|k| (k.clone(), 0)).collect();
    for i in st.instances.values() {
        *counts.entry(i.replica_set.clone()).or_default() += 1;
    }
    let loads: Vec<ReplicaSetLoad> =
        counts.into_iter().map(|(name, databases)| ReplicaSetLoad { name, databases }).collect();
    let chosen = placement::choose_replica_set(&dbi.spec.pool, mode, &loads, &name).name().to_string();
    if !st.replica_sets.contains_key(&chosen) {
        // The playground's zones are its own (a, b, c): an instance's zone names are for
        // a cluster's nodes.
        let zones = placement::member_zones(&st.zones, &[], dbi.spec.replicas.max(0) as u32)?;
        st.replica_sets.insert(chosen.clone(), state::ReplicaSetState { zones, ..Default::default() });
    }
    let mut tokens = BTreeMap::new();
    let mut roles = BTreeMap::new();
    let (mut token, mut read_only) = (String::new(), String::new());
    for u in dbi.users() {
        roles.insert(u.name.clone(), u.role.into());
        let t = nimbus_api::token::new_token(&db, &u.name, u.role.into()).0;
        match u.role {
            UserRole::ReadWrite if token.is_empty() => token = t.clone(),
            UserRole::Read if read_only.is_empty() => read_only = t.clone(),
            _ => {}
        }
        tokens.insert(u.name.clone(), t);
    }
    info!(instance = %name, replica_set = %chosen, "admitted");
    let limits = Some(dbi.spec.limits.resolve(dbi.spec.tier));
    let inst =
        InstanceState { database: db, replica_set: chosen, tokens, token, read_only_token: read_only, roles, limits };
    st.instances.insert(name, inst);
    Ok(())
}

fn playground_view(
    st: &State,
    procs: &Procs,
    dir: &Path,
    phases: &BTreeMap<String, String>,
    gateway: &str,
    control_plane: &str,
    etcd: &str,
) -> Playground {
    let instances = st
        .instances
        .iter()
        .map(|(name, i)| {
            (
                name.clone(),
                PlaygroundInstance {
                    database: i.database.clone(),
                    token: i.token.clone(),
                    read_only_token: i.read_only_token.clone(),
                    replica_set: i.replica_set.clone(),
                    phase: phases.get(name).cloned().unwrap_or_else(|| "Pending".into()),
                },
            )
        })
        .collect();
    let mut datanodes = Vec::new();
    for (rs, set) in &st.replica_sets {
        for m in set.members.values() {
            datanodes.push(PlaygroundDatanode {
                id: m.id,
                zone: m.zone.clone(),
                replica_set: rs.clone(),
                pid: procs.pid(rs, m.id),
                admin: format!("http://{}:{}", st.host(&m.zone), m.admin_port),
                data: format!("http://{}:{}", st.host(&m.zone), m.data_port),
                raft: format!("http://{}:{}", st.host(&m.zone), m.raft_port),
                data_dir: dir.join("datanodes").join(rs).join(format!("m{}", m.id)),
            });
        }
    }
    Playground {
        gateway: gateway.into(),
        control_plane: control_plane.into(),
        etcd: etcd.into(),
        instances,
        datanodes,
        zones: BTreeMap::new(),
        cluster_secret_file: PathBuf::new(),
    }
}

/// etcd's roles and users (root, the control plane, the gateway), then authentication on.
async fn setup_etcd_auth(etcd_url: &str, secrets: &Secrets) -> anyhow::Result<()> {
    let mut client = etcd_client::Client::connect([etcd_url], None).await?;
    let (root, operator, gateway) =
        (secrets.password(ROOT_USER)?, secrets.password(OPERATOR_USER)?, secrets.password(GATEWAY_USER)?);
    let users = [
        User { name: ROOT_USER, password: Some(&root) },
        User { name: OPERATOR_USER, password: Some(&operator) },
        User { name: GATEWAY_USER, password: Some(&gateway) },
    ];
    etcd_access::ensure(&mut client, &users).await?;
    info!("etcd authentication enabled: one role per component");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every `read` user is read-only and every `readWrite` user may write, not only the
    /// first of each; and the instance's limits are kept for etcd.
    #[test]
    fn each_user_keeps_its_own_role_and_the_limits_are_kept() {
        let dbi: DatabaseInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "nimbus.io/v1alpha1", "kind": "DatabaseInstance", "metadata": {"name": "shop"},
            "spec": {"tier": "free", "limits": {"qps": 7}, "users": [
                {"name": "app", "role": "readWrite"}, {"name": "reader", "role": "read"},
                {"name": "analyst", "role": "read"}, {"name": "batch", "role": "readWrite"}]}
        }))
        .unwrap();
        let mut st: State = serde_json::from_value(serde_json::json!({
            "etcdClientPort": 1, "etcdPeerPort": 2, "gatewayPort": 3, "gatewayAdminPort": 4,
            "controlPlanePort": 5, "zones": ["a", "b", "c"], "replicaSets": {}, "instances": {}
        }))
        .unwrap();
        admit(&mut st, &dbi).unwrap();
        let inst = &st.instances["shop"];
        use nimbus_api::etcd::UserRole::{Read, ReadWrite};
        let roles: Vec<_> = ["app", "reader", "analyst", "batch"].iter().map(|u| inst.role(u)).collect();
        assert_eq!(roles, vec![ReadWrite, Read, Read, ReadWrite]);
        assert_eq!(inst.limits.as_ref().unwrap().qps, 7);
        // A state written before roles were kept: least privilege but for the main token.
        let mut legacy = inst.clone();
        legacy.roles.clear();
        let roles: Vec<_> = ["app", "reader", "analyst", "batch"].iter().map(|u| legacy.role(u)).collect();
        assert_eq!(roles, vec![ReadWrite, Read, Read, Read]);
    }
}
