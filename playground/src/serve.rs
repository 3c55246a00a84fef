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
use nimbus_operator::controlplane::backup::agent::{AgentTuning, BackupAgent};
use nimbus_operator::controlplane::coord::Coordinator;
use nimbus_operator::controlplane::etcd_access::{self, GATEWAY_USER, OPERATOR_USER, ROOT_USER, User};
use nimbus_operator::controlplane::migration::{LiveWorld, Migrator, Tuning};
use tokio::process::Command;
use tracing::{info, warn};

use crate::binaries::{GATEWAY_BIN, etcd_binary, sibling_binary};
use crate::local::tick;
use crate::netns::{Network, ZoneState};
use crate::procs::Procs;
use crate::requests;
use crate::secrets::Secrets;
use crate::state::{self, Playground, PlaygroundDatanode, PlaygroundInstance, State};

/// How often the control loop looks at every replica set.
pub const TICK: Duration = Duration::from_millis(500);

pub struct Options {
    pub dir: PathBuf,
    pub instances: Vec<PathBuf>,
    pub zones: usize,
    /// Each zone in its own network namespace (see `netns`).
    pub isolate_zones: bool,
    /// The hot-migration knobs.
    pub migration: crate::MigrationFlags,
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
    // `FAILPOINTS=name=action;...` from the environment (the migration driver's named
    // failpoints, for the end-to-end tests), for the control plane's whole life.
    let _failpoints = fail::FailScenario::setup();
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

    // Instances: the manifests given (applied as `apply` would), else the example on a
    // new playground.
    let new_playground = st.instances.is_empty() && st.replica_sets.is_empty();
    let files = match (opts.instances.is_empty(), new_playground) {
        (false, _) => opts.instances.clone(),
        (true, true) => vec![default_instance()?],
        (true, false) => Vec::new(),
    };
    let documents = crate::read_documents(&files)?;
    if !documents.is_empty() {
        requests::apply(st, dir, &store, &documents).await.map_err(|r| anyhow::anyhow!("{}", r.message))?;
    }
    st.save(dir)?;

    // The control plane's own endpoint: the current playground.json.
    let shown = Arc::new(Mutex::new(Playground::default()));
    let cp_listener = tokio::net::TcpListener::bind(("127.0.0.1", st.control_plane_port)).await?;
    let cp_url = format!("http://127.0.0.1:{}", st.control_plane_port);
    let shown_http = shown.clone();
    let (loop_tx, mut loop_rx) = tokio::sync::mpsc::channel::<requests::Request>(8);
    let backup_names: crate::backup::Names = Arc::default();
    let wanted: Wanted = Arc::new(Mutex::new(st.zones.iter().map(|z| (z.clone(), ZoneState::Up)).collect()));
    let admin = AdminClient::new(&secret);
    let directory = Arc::new(crate::migrate::Directory::default());
    directory.refresh(st);
    // Backups: the operator's agent, in the background; the loop below tells it which
    // databases to back up, and `playground.json` shows what it has (`backup`).
    let backup_world = Arc::new(LiveWorld {
        admin: admin.clone(),
        coord: Arc::new(Coordinator::connect(&secrets.etcd(&etcd_url, OPERATOR_USER)).await?),
        directory: directory.clone(),
    });
    let backup_store = crate::backup::object_store(dir)?;
    let restorer = crate::restore::Restorer {
        world: backup_world.clone(),
        store: backup_store.clone(),
        dir: dir.to_path_buf(),
        loop_tx: loop_tx.clone(),
        busy: Arc::default(),
    };
    let backups = Arc::new(
        BackupAgent::new(backup_world, backup_store, "", crate::backup::SCOPE, AgentTuning::default())
            .context("failed to start the backup agent")?,
    );
    crate::backup::refresh(&backups, &backup_names, st);
    let (_stop_backups, backups_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(backups.clone().run(async move {
        let _ = backups_stopped.await;
    }));
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
        .merge(requests::routes(loop_tx))
        .merge(crate::backup::routes(backups.clone(), backup_names.clone()))
        .merge(crate::restore::routes(restorer))
        // The state shown holds every token, and zones can be taken down: components only.
        .route_layer(axum::middleware::from_fn_with_state(secret.clone(), nimbus_net::cluster::require))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(cp_listener, app).await });

    // Hot migrations: the operator's driver, in the background; the loop below starts the
    // ones applies asked for and shows their progress (`migrate`).
    let world = LiveWorld {
        admin: admin.clone(),
        coord: Arc::new(Coordinator::connect(&secrets.etcd(&etcd_url, OPERATOR_USER)).await?),
        directory: directory.clone(),
    };
    let tuning = Tuning {
        cleanup_grace: opts.migration.cleanup_grace,
        copy_bytes_per_sec: opts.migration.copy_mib_per_sec.max(1).saturating_mul(1 << 20),
        catch_up_timeout: opts.migration.catch_up_timeout,
        ..Tuning::default()
    };
    let migrator = Arc::new(Migrator::new(Arc::new(world), tuning));
    // Dropped when this function returns: the driver stops with the control plane (a
    // migration stopped mid-step resumes from its record at the next start).
    let (_stop_migrations, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(migrator.clone().run(async move {
        let _ = stopped.await;
    }));
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
        directory.refresh(st);
        crate::migrate::start_wanted(&migrator, st, &led).await;
        crate::migrate::observe(&migrator, st).await;
        crate::backup::refresh(&backups, &backup_names, st);
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
        let view = View {
            gateway: &gateway_url,
            control_plane: &cp_url,
            etcd: &etcd_url,
            zones: &zones,
            secrets,
            backups: &backups,
        };
        publish(&view, st, procs, dir, &phases, &shown)?;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            Some(req) = loop_rx.recv() => {
                let (result, reply) = match req {
                    requests::Request::Apply(r, reply) => (requests::apply(st, dir, &store, &r.documents).await, reply),
                    requests::Request::Delete(r, reply) => {
                        (requests::delete(st, dir, &admin, &store, &r.instances).await, reply)
                    }
                };
                phases.retain(|name, _| st.instances.contains_key(name));
                // What the request changed is in playground.json before its answer.
                publish(&view, st, procs, dir, &phases, &shown)?;
                let _ = reply.send(result);
            }
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Where the playground's parts answer, for `playground.json`.
struct View<'a> {
    gateway: &'a str,
    control_plane: &'a str,
    etcd: &'a str,
    zones: &'a BTreeMap<String, ZoneState>,
    secrets: &'a Secrets,
    backups: &'a BackupAgent,
}

/// Writes `playground.json` and what `/v1/status` answers.
fn publish(
    view: &View<'_>,
    st: &State,
    procs: &Procs,
    dir: &Path,
    phases: &BTreeMap<String, String>,
    shown: &Mutex<Playground>,
) -> anyhow::Result<()> {
    let mut pg = playground_view(st, procs, dir, phases, view.gateway, view.control_plane, view.etcd);
    let backups = view.backups.statuses();
    for inst in pg.instances.values_mut() {
        // Off (or not started yet): null; on: the object, its times null until there are some.
        inst.backup = backups.get(&inst.database).map(crate::backup::PlaygroundBackup::of);
    }
    pg.zones = view.zones.clone();
    pg.cluster_secret_file = view.secrets.cluster_secret_file();
    state::write_atomically(&dir.join(state::PLAYGROUND_FILE), &serde_json::to_vec_pretty(&pg)?)?;
    if let Ok(mut g) = shown.lock() {
        *g = pg;
    }
    Ok(())
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
                    pool: i.pool.clone(),
                    migration: i.migration.clone(),
                    backup: None,
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
