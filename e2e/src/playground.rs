//! The playground driven as a user drives it: the `nimbus` command and `playground.json`.
//! Dropping a [`Playground`] runs `nimbus playground down`, so a failing test or benchmark
//! leaves nothing running.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::binary;

pub struct Playground {
    pub dir: tempfile::TempDir,
}

impl Playground {
    /// `nimbus playground up` in a new temporary directory, with `args` added.
    pub fn up(args: &[&str]) -> anyhow::Result<Playground> {
        Self::up_with_env(args, &[])
    }

    /// `nimbus playground up` in a new temporary directory, with `args` added and `env` set
    /// for the command and so for the control plane it starts (`FAILPOINTS`, log levels).
    pub fn up_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Playground> {
        let dir = tempfile::Builder::new().prefix("nimbus-pg-").tempdir()?;
        let pg = Playground { dir };
        let out = pg.command(&[&["up"], args].concat())?.envs(env.iter().copied()).output()?;
        pg.check(&["up"], &out)?;
        Ok(pg)
    }

    /// `nimbus playground CMD... --dir DIR`, not yet run.
    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary("nimbus")?);
        cmd.arg("playground").args(args).arg("--dir").arg(self.dir.path());
        Ok(cmd)
    }

    /// Runs `nimbus playground CMD... --dir DIR` and returns what it did, success or not
    /// (for the commands whose failure a test expects, such as `apply --wait` of a
    /// migration that aborts).
    pub fn try_nimbus(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(self.command(args)?.output()?)
    }

    /// `nimbus playground apply FILE... [--wait]`: the manifests applied to the running
    /// playground; with `wait`, returns once every instance in them is Ready with no
    /// migration running (fails when one was aborted).
    pub fn apply(&self, files: &[&Path], wait: bool) -> anyhow::Result<()> {
        let mut args: Vec<&str> = vec!["apply"];
        for f in files {
            args.push(f.to_str().context("a manifest path that is not UTF-8")?);
        }
        if wait {
            args.push("--wait");
        }
        self.nimbus(&args)
    }

    /// Instance `name` as `playground.json` shows it now (`Null` if absent).
    pub fn instance(&self, name: &str) -> anyhow::Result<Value> {
        Ok(self.json()?["instances"][name].clone())
    }

    /// The pid of the control plane (`nimbus playground serve`), from its pid file.
    pub fn control_plane_pid(&self) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(self.dir.path().join(nimbus_playground::state::PID_FILE))?;
        text.trim().parse().context("a control-plane pid file that holds no pid")
    }

    /// The gateway's pid: `playground.json` does not list it, so it is the control plane's
    /// child started with `--listen` at the gateway's address.
    pub fn gateway_pid(&self) -> anyhow::Result<u32> {
        let gw = self.gateway()?;
        let addr = gw.trim_start_matches("http://");
        child_with_arg(self.control_plane_pid()?, "--listen", addr)
            .with_context(|| format!("no gateway process listening on {addr}"))
    }

    /// etcd's pid: the control plane's child started with `--listen-client-urls` at the
    /// address `playground.json` shows.
    pub fn etcd_pid(&self) -> anyhow::Result<u32> {
        let etcd = self.json()?["etcd"].as_str().context("no etcd in playground.json")?.to_owned();
        child_with_arg(self.control_plane_pid()?, "--listen-client-urls", &etcd)
            .with_context(|| format!("no etcd process listening on {etcd}"))
    }

    /// Runs `nimbus playground CMD... --dir DIR`; fails with its output and the control
    /// plane's log.
    pub fn nimbus(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.command(args)?.output()?;
        self.check(args, &out)
    }

    /// Fails with the command's output and the control plane's log unless it succeeded.
    fn check(&self, args: &[&str], out: &std::process::Output) -> anyhow::Result<()> {
        if !out.status.success() {
            bail!(
                "playground {args:?} failed: {}\n{}\ncontrol plane log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("logs/control-plane.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `nimbus playground zone ZONE STATE` (up, down, partition, isolate).
    pub fn zone(&self, zone: &str, state: &str) -> anyhow::Result<()> {
        self.nimbus(&["zone", zone, state])
    }

    pub fn json(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(&std::fs::read(self.dir.path().join("playground.json"))?)?)
    }

    /// Polls `playground.json` until `ok` holds.
    pub fn wait(&self, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            if let Ok(v) = self.json()
                && ok(&v)
            {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}: {}", self.json().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn gateway(&self) -> anyhow::Result<String> {
        Ok(self.json()?["gateway"].as_str().context("no gateway")?.to_owned())
    }

    /// The read-write token of instance `name`.
    pub fn token(&self, name: &str) -> anyhow::Result<String> {
        Ok(self.json()?["instances"][name]["token"].as_str().context("no such instance")?.to_owned())
    }

    /// A client of the parts behind the gateway (datanodes, the control plane): it sends
    /// the playground's cluster secret.
    pub fn internal_client(&self) -> anyhow::Result<crate::DataClient> {
        let file = self.json()?["clusterSecretFile"].as_str().context("no clusterSecretFile")?.to_owned();
        Ok(crate::DataClient::internal(&nimbus_net::ClusterSecret::from_file(std::path::Path::new(&file))?))
    }

    pub fn datanodes(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self.json()?["datanodes"].as_array().context("no datanodes")?.clone())
    }

    pub fn pids(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.datanodes()?.iter().filter_map(|d| d["pid"].as_u64()).map(|p| p as u32).collect())
    }

    /// The datanode (as `playground.json` shows it) whose status says it leads, with the
    /// highest term among those that do (a partitioned old leader may still say so).
    pub async fn leader(&self, http: &reqwest::Client) -> Option<(Value, Value)> {
        let mut best: Option<(Value, Value)> = None;
        for d in self.datanodes().ok()? {
            let Some(admin) = d["admin"].as_str() else { continue };
            let Ok(r) = http.get(format!("{admin}/v1/status")).timeout(Duration::from_secs(1)).send().await else {
                continue;
            };
            let Ok(s) = r.json::<Value>().await else { continue };
            if s["role"] == "leader" && best.as_ref().is_none_or(|(_, b)| b["term"].as_u64() < s["term"].as_u64()) {
                best = Some((d, s));
            }
        }
        best
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        if let Ok(bin) = binary("nimbus") {
            let _ = Command::new(bin).args(["playground", "down", "--dir"]).arg(self.dir.path()).status();
        }
        // `NIMBUS_KEEP_PLAYGROUND=1`: the directory (logs, data) kept for a look afterwards.
        if std::env::var_os("NIMBUS_KEEP_PLAYGROUND").is_some_and(|v| v == "1") {
            self.dir.disable_cleanup(true);
            eprintln!("playground directory kept: {}", self.dir.path().display());
        }
    }
}

/// Every instance in `playground.json` Ready.
pub fn ready(v: &Value) -> bool {
    v["instances"].as_object().is_some_and(|m| !m.is_empty() && m.values().all(|i| i["phase"] == "Ready"))
}

/// Every datanode in `playground.json` has a running process (a pid).
pub fn all_running(v: &Value) -> bool {
    v["datanodes"].as_array().is_some_and(|ds| ds.iter().all(|d| d["pid"].is_u64()))
}

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// `kill -9 pid`.
pub fn kill9(pid: u32) -> anyhow::Result<()> {
    let st = Command::new("kill").args(["-9", &pid.to_string()]).status()?;
    if !st.success() {
        bail!("kill -9 {pid} failed");
    }
    Ok(())
}

/// The child of `parent` whose command line has `value` right after `flag`.
pub fn child_with_arg(parent: u32, flag: &str, value: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).find(|&pid| {
        parent_of(pid) == Some(parent) && {
            let args = command_line(pid);
            args.windows(2).any(|w| w[0] == flag && w[1] == value)
        }
    })
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: the fields after it start past ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The arguments of process `pid` (empty when it is gone).
pub fn command_line(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Sends `signal` (`-STOP`, `-CONT`, `-9`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let st = Command::new("kill").args([signal, &pid.to_string()]).status()?;
    if !st.success() {
        bail!("kill {signal} {pid} failed");
    }
    Ok(())
}

/// What a `nimbus` command did: its exit status and output.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Playground {
    /// Runs `nimbus playground CMD... --dir DIR` and returns what it did, failed or not.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Ran> {
        let out =
            Command::new(binary("nimbus")?).arg("playground").args(args).arg("--dir").arg(self.dir.path()).output()?;
        Ok(Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Writes a manifest file in the playground's directory and returns its path.
    pub fn manifest(&self, name: &str, yaml: &str) -> anyhow::Result<std::path::PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml)?;
        Ok(path)
    }

    /// `nimbus playground apply FILE --wait`; its output lines, or an error with them.
    pub fn apply_wait(&self, file: &Path) -> anyhow::Result<String> {
        let file = file.to_str().context("a manifest path that is not UTF-8")?;
        let ran = self.run(&["apply", file, "--wait", "--timeout", "120s"])?;
        if !ran.ok {
            bail!("apply {file} failed: {}\n{}", ran.stdout, ran.stderr);
        }
        Ok(ran.stdout)
    }

    /// The value of `key` in the playground's etcd (read as its root user).
    pub async fn etcd_get(&self, key: &str) -> anyhow::Result<Option<Value>> {
        let endpoint = self.json()?["etcd"].as_str().context("no etcd")?.to_owned();
        let password = std::fs::read_to_string(self.dir.path().join("secrets/etcd-root.password"))?;
        let opts = etcd_client::ConnectOptions::new().with_user("root", password.trim());
        let mut client = etcd_client::Client::connect([endpoint], Some(opts)).await?;
        let resp = client.get(key, None).await?;
        Ok(match resp.kvs().first() {
            Some(kv) => Some(serde_json::from_slice(kv.value())?),
            None => None,
        })
    }
}
