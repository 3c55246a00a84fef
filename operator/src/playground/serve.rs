//! The playground's control plane: etcd, the gateway and the datanodes as local processes,
//! kept healthy by the same decisions the operator makes (`controlplane::members`), with a
//! local provisioner: a member is a process and a data directory instead of a Pod and a PVC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nimbus_api::admin::MemberInfo;
use nimbus_api::etcd::{RouteMember, UserRecord};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::netns::{Network, ZoneState};
use super::secrets::Secrets;
use super::state::{self, InstanceState, MemberState, Playground, PlaygroundDatanode, PlaygroundInstance, State};
use crate::controlplane::admin::{AdminClient, raft_view};
use crate::controlplane::coord::Coordinator;
use crate::controlplane::etcd_access::{self, GATEWAY_USER, OPERATOR_USER, ROOT_USER, User};
use crate::controlplane::members::{self, Action, Desired, MemberView, RaftView};
use crate::controlplane::placement::{self, PoolMode, ReplicaSetLoad};
use crate::crd::v1alpha1::{DatabaseInstance, Tier, UserRole};

/// How often the control loop looks at every replica set.
pub const TICK: Duration = Duration::from_millis(500);
/// Where the processes' binaries are: next to `nimbus`, or named by these variables.
pub const DATANODE_BIN: &str = "nimbus-datanode";
pub const GATEWAY_BIN: &str = "nimbus-gateway";

pub struct Options {
    pub dir: PathBuf,
    pub instances: Vec<PathBuf>,
    pub zones: usize,
    /// Each zone in its own network namespace (see `netns`).
    pub isolate_zones: bool,
}

/// A binary next to this one (the workspace builds them together), or `NIMBUS_<NAME>_BIN`.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let env = format!("NIMBUS_{}_BIN", name.trim_start_matches("nimbus-").to_uppercase());
    if let Ok(p) = std::env::var(&env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    bail!("{name} not found next to {}: run `cargo build --workspace --bins` (or set {env})", exe.display())
}

/// A program of the machine's packages: on PATH, or in one of `also`.
pub fn system_binary(name: &str, also: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':').chain(also.iter().copied()).map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

/// The Debian etcd, found on PATH.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    system_binary("etcd", &["/usr/bin", "/usr/local/bin"])
        .context("etcd not found on PATH: run scripts/setup.sh (it installs Debian's etcd-server)")
}

struct Procs {
    dir: PathBuf,
    secrets: PathBuf,
    datanode_bin: PathBuf,
    /// Member processes by (replica set, id).
    members: BTreeMap<(String, u64), Child>,
    others: Vec<Child>,
    network: Option<Network>,
}

impl Procs {
    fn log(&self, name: &str) -> anyhow::Result<std::process::Stdio> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{name}.log")))?;
        Ok(f.into())
    }

    fn member_dir(&self, rs: &str, id: u64) -> PathBuf {
        self.dir.join("datanodes").join(rs).join(format!("m{id}"))
    }

    fn start_member(&mut self, rs: &str, m: &MemberState) -> anyhow::Result<()> {
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

    fn running(&mut self, rs: &str, id: u64) -> bool {
        match self.members.get_mut(&(rs.to_string(), id)) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn pid(&self, rs: &str, id: u64) -> Option<u32> {
        self.members.get(&(rs.to_string(), id)).and_then(|c| c.id())
    }

    async fn stop_member(&mut self, rs: &str, id: u64) {
        if let Some(mut c) = self.members.remove(&(rs.to_string(), id)) {
            let _ = c.kill().await;
        }
    }

    async fn stop_all(&mut self) {
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
        datanode_bin: sibling_binary(DATANODE_BIN)?,
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
        st.replica_sets.insert(chosen.clone(), super::state::ReplicaSetState { zones, ..Default::default() });
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

fn member_info(st: &State, m: &MemberState) -> MemberInfo {
    let host = st.host(&m.zone);
    MemberInfo {
        id: m.id,
        admin_addr: format!("http://{host}:{}", m.admin_port),
        data_addr: format!("http://{host}:{}", m.data_port),
        raft_addr: format!("http://{host}:{}", m.raft_port),
        zone: m.zone.clone(),
        voter: true,
    }
}

/// One look at a replica set and at most one step; then, with a leader, its databases'
/// routes, users and limits. Returns (has a leader, steady).
async fn tick(
    st: &mut State,
    procs: &mut Procs,
    admin: &AdminClient,
    store: &Coordinator,
    rs: &str,
    dir: &Path,
    down_zones: &[String],
) -> anyhow::Result<(bool, bool)> {
    let set = st.replica_sets.get(rs).cloned().unwrap_or_default();
    let mut views = Vec::new();
    let mut statuses = Vec::new();
    for m in set.members.values() {
        let running = procs.running(rs, m.id);
        let has_data = procs.member_dir(rs, m.id).is_dir();
        let addr = format!("http://{}:{}", st.host(&m.zone), m.admin_port);
        let status = if running { admin.status(&addr).await.ok() } else { None };
        // Ready: serving, or alive and waiting to be initialised (a member reports no
        // leader, so never `/readyz`, before the replica set is bootstrapped).
        let uninitialised = status.as_ref().is_some_and(|s| s.members.is_empty());
        let ready = status.is_some() && (uninitialised || admin.ready(&addr).await);
        if let Some(s) = status {
            statuses.push(s);
        }
        views.push(MemberView { id: m.id, zone: m.zone.clone(), running, has_data, ready, outdated: false });
    }
    let view = raft_view(&statuses, set.bootstrapped);
    let mut step = members::next_action(&Desired { zones: set.zones.clone() }, &views, &view);
    // A zone that is down stays down: nothing is started or created in it.
    let in_down_zone = |id: &u64| set.members.get(id).is_some_and(|m| down_zones.contains(&m.zone));
    let blocked = match &step {
        Action::Start { id } | Action::Restart { id } | Action::AddLearner { id } => in_down_zone(id),
        Action::Create { zone, .. } => down_zones.contains(zone),
        _ => false,
    };
    if blocked {
        step = Action::Wait("a zone is down".into());
    }
    let leader_admin = |view: &RaftView| -> anyhow::Result<String> {
        let RaftView::Led(ms) = view else { bail!("no leader") };
        let m = set.members.get(&ms.leader).context("leader unknown")?;
        Ok(format!("http://{}:{}", st.host(&m.zone), m.admin_port))
    };
    match &step {
        Action::Steady | Action::Wait(_) => {}
        Action::Create { id, zone } => {
            let m = MemberState {
                id: *id,
                zone: zone.clone(),
                data_port: state::free_port()?,
                admin_port: state::free_port()?,
                raft_port: state::free_port()?,
            };
            std::fs::create_dir_all(procs.member_dir(rs, *id))?;
            if let Some(s) = st.replica_sets.get_mut(rs) {
                s.members.insert(*id, m.clone());
            }
            st.save(dir)?;
            procs.start_member(rs, &m)?;
        }
        Action::Start { id } => {
            if let Some(m) = set.members.get(id) {
                info!(replica_set = rs, member = id, "restarting a datanode that stopped");
                procs.stop_member(rs, *id).await;
                procs.start_member(rs, m)?;
            }
        }
        Action::Bootstrap { voters } => {
            let members: Vec<MemberInfo> =
                voters.iter().filter_map(|id| set.members.get(id)).map(|m| member_info(st, m)).collect();
            let first = set.members.get(&voters[0]).context("bootstrap member unknown")?;
            admin.init(&format!("http://{}:{}", st.host(&first.zone), first.admin_port), members).await?;
            if let Some(s) = st.replica_sets.get_mut(rs) {
                s.bootstrapped = true;
            }
            info!(replica_set = rs, ?voters, "replica set initialised");
        }
        Action::AddLearner { id } => {
            let m = set.members.get(id).context("learner unknown")?;
            info!(replica_set = rs, member = id, "adding a learner (replacement)");
            admin.add_learner(&leader_admin(&view)?, member_info(st, m)).await?;
        }
        Action::ChangeVoters { voters } => {
            info!(replica_set = rs, ?voters, "changing voters");
            admin.change_voters(&leader_admin(&view)?, voters).await?;
        }
        Action::RemoveMember { id } => {
            info!(replica_set = rs, member = id, "removing a lost member");
            admin.remove_member(&leader_admin(&view)?, *id).await?;
        }
        Action::Delete { id } => {
            info!(replica_set = rs, member = id, "deprovisioning a removed member");
            procs.stop_member(rs, *id).await;
            let _ = std::fs::remove_dir_all(procs.member_dir(rs, *id));
            if let Some(s) = st.replica_sets.get_mut(rs) {
                s.members.remove(id);
            }
        }
        Action::Restart { id } => procs.stop_member(rs, *id).await,
        Action::TransferLeader { to } => admin.transfer_leader(&leader_admin(&view)?, *to).await?,
    }
    if matches!(view, RaftView::Led(_))
        && !set.bootstrapped
        && let Some(s) = st.replica_sets.get_mut(rs)
    {
        s.bootstrapped = true;
    }
    let RaftView::Led(ms) = &view else { return Ok((false, false)) };
    let route: Vec<RouteMember> = ms
        .voters
        .iter()
        .filter_map(|id| set.members.get(id))
        .map(|m| RouteMember {
            id: m.id,
            data_addr: format!("http://{}:{}", st.host(&m.zone), m.data_port),
            zone: m.zone.clone(),
        })
        .collect();
    for inst in st.instances.values().filter(|i| i.replica_set == rs) {
        store.put_route(&inst.database, rs, route.clone()).await?;
        for (user, token) in &inst.tokens {
            let (_, _, secret) = nimbus_api::etcd::parse_token(token).context("malformed stored token")?;
            let record = UserRecord { role: inst.role(user), secret_sha256: nimbus_api::token::secret_sha256(secret) };
            store.create_user(&inst.database, user, &record).await?;
        }
        if let Some(limits) = &inst.limits {
            store.put_limits(&inst.database, limits).await?;
        }
    }
    Ok((true, step == Action::Steady))
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
