//! `nimbus playground up|down`: all of Nimbus on one machine (`API.md` section 3).
//!
//! Its own crate, so the operator's image carries no process-spawning or network-namespace
//! code: the playground runs the operator's decisions and replica-set driver
//! (`nimbus_operator::controlplane`) with a local provisioner ([`local`]).
//!
//! `up` starts the control plane (`nimbus playground serve`) as a background process that
//! owns etcd, the gateway and the datanodes, and returns once every instance is Ready.
//! `down` stops it; it stops everything it started. The directory keeps the data, so the
//! next `up` with it finds the databases again.
//!
//! `apply` and `delete` change a running playground as `kubectl apply|delete` change a
//! cluster: the manifests are checked here first, then sent to the control plane, which
//! checks them again against its state and carries them out (see [`requests`]).

pub mod apply;
pub mod backup;
pub mod binaries;
pub mod local;
pub mod manifest;
pub mod migrate;
pub mod netns;
pub mod procs;
pub mod requests;
pub mod restore;
pub mod secrets;
pub mod serve;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use state::{PID_FILE, PLAYGROUND_FILE, Playground};

/// How long `up` waits for every instance to be Ready (a few seconds, usually), then stops
/// the playground. Below the test harness's three minutes, so a test's playground that
/// never gets ready is stopped, not killed with its processes left running.
pub const UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `down` waits for the control plane to stop its processes.
pub const DOWN_TIMEOUT: Duration = Duration::from_secs(30);

fn running_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE)).ok()?.trim().parse().ok()?;
    procs::alive(pid).then_some(pid)
}

/// The hot-migration knobs `up` passes on to the control plane.
#[derive(Debug, Clone, Copy)]
pub struct MigrationFlags {
    /// How long a migration's source keeps its copy after the switch.
    pub cleanup_grace: Duration,
    /// The copy's ceiling, MiB read from the source per second (`Tuning::copy_bytes_per_sec`).
    pub copy_mib_per_sec: u64,
    /// How long an attempt's catch-up may take to get close enough to hold
    /// (`Tuning::catch_up_timeout`; zero: no limit).
    pub catch_up_timeout: Duration,
}

/// Starts the playground in the background (or, when it runs, applies `instances` to it) and
/// waits until every instance is Ready.
pub async fn up(
    dir: &Path,
    instances: &[PathBuf],
    zones: usize,
    isolate_zones: bool,
    migration: MigrationFlags,
) -> anyhow::Result<Playground> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    binaries::etcd_binary()?;
    binaries::sibling_binary(binaries::DATANODE_BIN)?;
    binaries::sibling_binary(binaries::GATEWAY_BIN)?;
    // A mistake in a manifest is shown here, not in the control plane's log.
    let manifests = manifest::parse(&read_documents(instances)?)?;
    if let Some(st) = state::State::load(&dir)? {
        manifest::check_against(&st, &manifests)?;
    }
    if running_pid(&dir).is_some() && !instances.is_empty() {
        // Already running: the manifests are applied to it.
        apply(&dir, instances, Some(UP_TIMEOUT)).await?;
    }
    let starting = running_pid(&dir).is_none();
    if starting {
        let _ = std::fs::remove_file(dir.join(PLAYGROUND_FILE));
        std::fs::create_dir_all(dir.join("logs"))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("logs/control-plane.log"))?;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["playground", "serve", "--dir"]).arg(&dir).args(["--zones", &zones.to_string()]);
        if isolate_zones {
            cmd.arg("--isolate-zones");
        }
        cmd.arg("--migration-cleanup-grace").arg(format!("{}s", migration.cleanup_grace.as_secs()));
        cmd.arg("--migration-copy-mib-per-sec").arg(migration.copy_mib_per_sec.to_string());
        cmd.arg("--migration-catch-up-timeout").arg(format!("{}s", migration.catch_up_timeout.as_secs()));
        for f in instances {
            cmd.arg("--instances").arg(f.canonicalize().with_context(|| format!("no file {}", f.display()))?);
        }
        // Its own process group: the control plane outlives this command and its terminal.
        use std::os::unix::process::CommandExt as _;
        let child = cmd
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start the control plane")?;
        std::fs::write(dir.join(PID_FILE), child.id().to_string())?;
    }
    let started = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(dir.join(PLAYGROUND_FILE))
            && let Ok(pg) = serde_json::from_slice::<Playground>(&bytes)
            // Written once the manifests are applied (none left is possible after `delete`).
            && pg.instances.values().all(|i| i.phase == "Ready")
        {
            return Ok(pg);
        }
        if running_pid(&dir).is_none() {
            bail!("the control plane stopped: see {}", dir.join("logs/control-plane.log").display());
        }
        if started.elapsed() > UP_TIMEOUT {
            if !starting {
                bail!("instances not Ready within {UP_TIMEOUT:?}: see {}", dir.join("logs").display());
            }
            // Nothing this command started left running with no one waiting for it: the
            // logs and data stay. A playground that ran before is left as it was.
            let stopped = down(&dir).await;
            bail!(
                "instances not Ready within {UP_TIMEOUT:?}, so the playground was stopped{}: see {}",
                stopped.err().map(|e| format!(" (failed: {e:#})")).unwrap_or_default(),
                dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the control plane, which stops every process it started.
pub async fn down(dir: &Path) -> anyhow::Result<bool> {
    let Some(pid) = running_pid(dir) else {
        let _ = std::fs::remove_file(dir.join(PID_FILE));
        return Ok(false);
    };
    procs::terminate(pid);
    let started = Instant::now();
    while procs::alive(pid) {
        if started.elapsed() > DOWN_TIMEOUT {
            let _ = std::process::Command::new("kill").args(["-KILL", &format!("-{pid}")]).status();
            bail!("the control plane (pid {pid}) did not stop within {DOWN_TIMEOUT:?}; killed its process group");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    Ok(true)
}

/// Asks the running control plane to bring `zone` to `state`, and waits until
/// `playground.json` shows it applied (for `down`: every process of the zone gone).
pub async fn set_zone(dir: &Path, zone: &str, state: netns::ZoneState) -> anyhow::Result<Playground> {
    let (dir, pg, secret) = control_plane(dir)?;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/zones/{zone}", pg.control_plane))
        .header(reqwest::header::AUTHORIZATION, secret.authorization().clone())
        .json(&serde_json::json!({ "state": state }))
        .send()
        .await
        .context("the control plane did not answer")?;
    if !resp.status().is_success() {
        bail!("{}", resp.text().await.unwrap_or_default());
    }
    let started = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(dir.join(PLAYGROUND_FILE))
            && let Ok(pg) = serde_json::from_slice::<Playground>(&bytes)
            && pg.zones.get(zone) == Some(&state)
            && (state != netns::ZoneState::Down || pg.datanodes.iter().all(|d| d.zone != zone || d.pid.is_none()))
        {
            return Ok(pg);
        }
        if started.elapsed() > DOWN_TIMEOUT {
            bail!("zone {zone} did not reach {state:?} within {DOWN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long `apply --wait` waits by default.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// Every YAML document of `files`, in order.
pub fn read_documents(files: &[PathBuf]) -> anyhow::Result<Vec<manifest::Document>> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("failed to read {}", f.display()))?;
        out.extend(manifest::split_yaml(&text, &f.display().to_string())?);
    }
    Ok(out)
}

/// The running playground's `playground.json` and cluster secret, to call its control plane.
fn control_plane(dir: &Path) -> anyhow::Result<(PathBuf, Playground, nimbus_net::ClusterSecret)> {
    let dir = dir.canonicalize().with_context(|| format!("no playground in {}", dir.display()))?;
    if running_pid(&dir).is_none() {
        bail!("no playground running in {}", dir.display());
    }
    let pg: Playground = serde_json::from_slice(&std::fs::read(dir.join(PLAYGROUND_FILE))?)?;
    let secret = secrets::Secrets::of(&dir).cluster_secret()?;
    Ok((dir, pg, secret))
}

/// POSTs `body` to the control plane's `path`; the changes it made, or its refusal.
async fn call(
    pg: &Playground,
    secret: &nimbus_net::ClusterSecret,
    path: &str,
    body: &impl serde::Serialize,
) -> anyhow::Result<Vec<String>> {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", pg.control_plane))
        .header(reqwest::header::AUTHORIZATION, secret.authorization().clone())
        .json(body)
        .send()
        .await
        .context("the control plane did not answer")?;
    let ok = resp.status().is_success();
    let body: serde_json::Value = resp.json().await.context("the control plane's answer is not JSON")?;
    if !ok {
        bail!("{}", body["error"].as_str().unwrap_or("the control plane refused without saying why"));
    }
    let changes: requests::Changes = serde_json::from_value(body).context("the control plane's answer")?;
    Ok(changes.changes)
}

/// `nimbus playground apply`: checks every document of `files` (nothing is sent if one is
/// wrong), has the control plane apply them all, and returns what changed, one line per
/// object. With `wait`, then waits until each instance of the files is Ready on the pool
/// its manifest names, with no migration running.
pub async fn apply(dir: &Path, files: &[PathBuf], wait: Option<Duration>) -> anyhow::Result<Vec<String>> {
    let documents = read_documents(files)?;
    let manifests = manifest::parse(&documents)?;
    let (dir, pg, secret) = control_plane(dir)?;
    if let Some(st) = state::State::load(&dir)? {
        manifest::check_against(&st, &manifests)?;
    }
    let lines = call(&pg, &secret, "/v1/apply", &requests::ApplyRequest { documents }).await?;
    if let Some(timeout) = wait {
        let wanted: Vec<(String, String)> = manifests
            .instances
            .iter()
            .map(|(_, i)| (i.metadata.name.clone().unwrap_or_default(), i.spec.pool.clone()))
            .collect();
        wait_applied(&dir, &wanted, timeout).await?;
    }
    Ok(lines)
}

/// Whether an instance is where its manifest wants it: `Ok(true)` Ready on `pool` with no
/// migration running, `Ok(false)` not yet, `Err` when it cannot get there by waiting.
fn settled(name: &str, pool: &str, i: &state::PlaygroundInstance) -> anyhow::Result<bool> {
    use nimbus_operator::controlplane::migration::Phase::{Aborted, CleaningUp, Completed};
    if let Some(m) = &i.migration
        && m.phase == Aborted
    {
        bail!(
            "instance {name}: the migration from {} to {} was aborted: {}",
            m.from_replica_set,
            m.to_replica_set,
            m.error.as_deref().unwrap_or("no reason given")
        );
    }
    if i.phase == "Failed" {
        bail!("instance {name} failed: see the control plane's log");
    }
    // From `CleaningUp` on the database is served by the target; only the source's copy
    // is left to drop, after a grace period.
    let migrating = i.migration.as_ref().is_some_and(|m| !matches!(m.phase, Completed | CleaningUp));
    Ok(i.phase == "Ready" && i.pool == pool && !migrating)
}

async fn wait_applied(dir: &Path, wanted: &[(String, String)], timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut waiting_for = Vec::new();
        if let Ok(bytes) = std::fs::read(dir.join(PLAYGROUND_FILE))
            && let Ok(pg) = serde_json::from_slice::<Playground>(&bytes)
        {
            for (name, pool) in wanted {
                match pg.instances.get(name) {
                    Some(i) if settled(name, pool, i)? => {}
                    Some(i) => waiting_for.push(format!("{name} ({}, pool {})", i.phase, i.pool)),
                    None => waiting_for.push(format!("{name} (not shown yet)")),
                }
            }
            if waiting_for.is_empty() {
                return Ok(());
            }
        }
        if running_pid(dir).is_none() {
            bail!("the control plane stopped: see {}", dir.join("logs/control-plane.log").display());
        }
        if started.elapsed() > timeout {
            bail!("not Ready within {timeout:?}: {}", waiting_for.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nimbus playground delete`: deletes the instances named (their data, route, users and
/// limits), all or none; an unknown name deletes nothing.
pub async fn delete(dir: &Path, names: &[String]) -> anyhow::Result<Vec<String>> {
    let (_, pg, secret) = control_plane(dir)?;
    call(&pg, &secret, "/v1/delete", &requests::DeleteRequest { instances: names.to_vec() }).await
}

/// `nimbus playground backup`: a full backup of instance `name` now; the line to print
/// (`backup: ID at RFC3339`, the time the full restores from).
pub async fn backup(dir: &Path, name: &str) -> anyhow::Result<Vec<String>> {
    let (_, pg, secret) = control_plane(dir)?;
    call(&pg, &secret, "/v1/backup", &backup::BackupRequest { instance: name.to_owned() }).await
}

/// `nimbus playground restore`: restores instance `name` (or the collections named) to
/// `to_time` (RFC 3339 or `latest`), in place or into the new instance `into`; the line to
/// print (`restored to: RFC3339`). Returns when done.
pub async fn restore(
    dir: &Path,
    name: &str,
    to_time: &str,
    collections: Option<Vec<String>>,
    into: Option<String>,
) -> anyhow::Result<Vec<String>> {
    restore::parse_time(to_time).map_err(anyhow::Error::msg)?;
    let (_, pg, secret) = control_plane(dir)?;
    let req = restore::RestoreRequest { instance: name.to_owned(), to_time: to_time.to_owned(), collections, into };
    call(&pg, &secret, "/v1/restore", &req).await
}
