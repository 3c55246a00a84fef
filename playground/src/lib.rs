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

pub mod binaries;
pub mod local;
pub mod netns;
pub mod procs;
pub mod secrets;
pub mod serve;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use state::{PID_FILE, PLAYGROUND_FILE, Playground};

/// How long `up` waits for every instance to be Ready.
pub const UP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `down` waits for the control plane to stop its processes.
pub const DOWN_TIMEOUT: Duration = Duration::from_secs(30);

fn running_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE)).ok()?.trim().parse().ok()?;
    procs::alive(pid).then_some(pid)
}

/// Starts the playground in the background and waits until every instance is Ready.
pub async fn up(dir: &Path, instances: &[PathBuf], zones: usize, isolate_zones: bool) -> anyhow::Result<Playground> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    binaries::etcd_binary()?;
    binaries::sibling_binary(binaries::DATANODE_BIN)?;
    binaries::sibling_binary(binaries::GATEWAY_BIN)?;
    if running_pid(&dir).is_none() {
        let _ = std::fs::remove_file(dir.join(PLAYGROUND_FILE));
        std::fs::create_dir_all(dir.join("logs"))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("logs/control-plane.log"))?;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["playground", "serve", "--dir"]).arg(&dir).args(["--zones", &zones.to_string()]);
        if isolate_zones {
            cmd.arg("--isolate-zones");
        }
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
            && !pg.instances.is_empty()
            && pg.instances.values().all(|i| i.phase == "Ready")
        {
            return Ok(pg);
        }
        if running_pid(&dir).is_none() {
            bail!("the control plane stopped: see {}", dir.join("logs/control-plane.log").display());
        }
        if started.elapsed() > UP_TIMEOUT {
            bail!("instances not Ready within {UP_TIMEOUT:?}: see {}", dir.join("logs").display());
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
    let dir = dir.canonicalize().with_context(|| format!("no playground in {}", dir.display()))?;
    if running_pid(&dir).is_none() {
        bail!("no playground running in {}", dir.display());
    }
    let pg: Playground = serde_json::from_slice(&std::fs::read(dir.join(PLAYGROUND_FILE))?)?;
    let secret = secrets::Secrets::of(&dir).cluster_secret()?;
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
