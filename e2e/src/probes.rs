//! The HTTP probes of Kubernetes objects, read as the kubelet reads them: each resolved to
//! the container port it names, then to the listener of the real binary that serves that
//! port (from the container's environment, or the binary's default), so a test can start
//! the binary and call the probe where the kubelet would.

use std::collections::BTreeMap;
use std::process::Stdio;

use anyhow::Context as _;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::process::spawn_reporting;

pub const PROBE_KINDS: [&str; 3] = ["readinessProbe", "livenessProbe", "startupProbe"];

/// One `httpGet` probe of one container.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `Deployment nimbus-operator, container operator, readinessProbe`.
    pub origin: String,
    pub kind: String,
    pub path: String,
    /// `HTTP` or `HTTPS`, as the kubelet reads it (HTTP when absent).
    pub scheme: String,
    /// The container port the probe names, resolved.
    pub port: u16,
    /// The container it probes.
    pub container: Value,
}

/// The Pod spec of a Pod or of a workload's template, and what to call it.
pub fn pod_spec(obj: &Value) -> Option<(String, &Value)> {
    let kind = obj["kind"].as_str()?;
    let name = obj["metadata"]["name"].as_str().unwrap_or("?");
    let spec = match kind {
        "Pod" => &obj["spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &obj["spec"]["template"]["spec"],
        _ => return None,
    };
    Some((format!("{kind} {name}"), spec))
}

/// Every probe of the containers of `spec`. A probe that is not `httpGet`, names a port its
/// container does not declare or sets a host is a failure (a sentence in `failures`).
pub fn probes(origin: &str, spec: &Value, failures: &mut Vec<String>) -> Vec<Probe> {
    let mut out = Vec::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        let cname = c["name"].as_str().unwrap_or("?");
        for kind in PROBE_KINDS {
            let Some(p) = c.get(kind) else { continue };
            let origin = format!("{origin}, container {cname}, {kind}");
            let Some(get) = p.get("httpGet") else {
                failures.push(format!("{origin}: not an httpGet probe (this check calls httpGet probes only): {p}"));
                continue;
            };
            if get.get("host").is_some() {
                failures.push(format!("{origin}: sets a host; the kubelet would not call the Pod"));
            }
            let port = match &get["port"] {
                Value::String(name) => {
                    let declared = c["ports"].as_array().into_iter().flatten().find(|p| p["name"] == name.as_str());
                    match declared.and_then(|p| p["containerPort"].as_u64()) {
                        Some(n) => n as u16,
                        None => {
                            failures
                                .push(format!("{origin}: names port {name:?}, which the container does not declare"));
                            continue;
                        }
                    }
                }
                Value::Number(n) => n.as_u64().unwrap_or(0) as u16,
                other => {
                    failures.push(format!("{origin}: port {other} is neither a name nor a number"));
                    continue;
                }
            };
            out.push(Probe {
                origin,
                kind: kind.to_owned(),
                path: get["path"].as_str().unwrap_or("/").to_owned(),
                scheme: get["scheme"].as_str().unwrap_or("HTTP").to_owned(),
                port,
                container: c.clone(),
            });
        }
    }
    out
}

/// A listener of a binary: what it is called in the binary's report (its first line on
/// stdout), its scheme and the address it binds in the container.
#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// The environment variable that sets it (Nimbus binaries).
    pub env: Option<&'static str>,
}

/// One listener of a Nimbus binary: the variable that sets it, its default, its report key.
pub struct ListenerFlag {
    pub env: &'static str,
    pub default: &'static str,
    pub report: &'static str,
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
}

/// The environment of `container` as the kubelet sets it: literal values, and the Pod's
/// name and namespace where it asks for them (`pod` and `namespace` here).
pub fn container_env(container: &Value, pod: &str, namespace: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else { continue };
        if let Some(v) = e["value"].as_str() {
            env.insert(name.to_owned(), v.to_owned());
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => {
                    env.insert(name.to_owned(), pod.to_owned());
                }
                Some("metadata.namespace") => {
                    env.insert(name.to_owned(), namespace.to_owned());
                }
                _ => {}
            }
        }
    }
    env
}

/// The listeners a Nimbus binary opens in `container`: each from its variable, else its default.
pub fn nimbus_listeners(container: &Value, flags: &[ListenerFlag]) -> Vec<Listener> {
    let env = container_env(container, "pod", "ns");
    flags
        .iter()
        .filter_map(|f| {
            let addr = env.get(f.env).map(String::as_str).unwrap_or(f.default);
            let (host, port) = split_host_port(addr)?;
            Some(Listener { name: f.report.to_owned(), scheme: "http".into(), host, port, env: Some(f.env) })
        })
        .collect()
}

/// The listeners behind URLs such as etcd's `listen-*-urls` (comma-separated).
pub fn url_listeners(name: &str, urls: &str) -> Vec<Listener> {
    urls.split(',')
        .filter_map(|u| {
            let (scheme, rest) = u.trim().split_once("://")?;
            let (host, port) = split_host_port(rest.trim_end_matches('/'))?;
            Some(Listener { name: name.to_owned(), scheme: scheme.to_owned(), host, port, env: None })
        })
        .collect()
}

/// The listener that serves `probe`: on its port, with its scheme, reachable at the Pod's
/// IP. A failure names the probe and what is wrong.
pub fn listener_for<'a>(probe: &Probe, listeners: &'a [Listener]) -> Result<&'a Listener, String> {
    let l = listeners.iter().find(|l| l.port == probe.port).ok_or_else(|| {
        let open: Vec<String> = listeners.iter().map(|l| format!("{} on {}", l.name, l.port)).collect();
        format!("{}: port {} is not a port the binary listens on ({})", probe.origin, probe.port, open.join(", "))
    })?;
    if !l.scheme.eq_ignore_ascii_case(&probe.scheme) {
        return Err(format!(
            "{}: calls {} but the {} listener speaks {}",
            probe.origin, probe.scheme, l.name, l.scheme
        ));
    }
    if !matches!(l.host.as_str(), "0.0.0.0" | "::" | "") {
        return Err(format!(
            "{}: the {} listener binds {}, which the kubelet cannot reach",
            probe.origin, l.name, l.host
        ));
    }
    Ok(l)
}

/// Starts a Nimbus binary as `container` would run (its args and environment), with every
/// listener in `listeners` moved to 127.0.0.1 port 0 and `overrides` applied (`None`
/// removes a variable). Returns the process (killed on drop) and its report, after
/// checking that each listener is where it was told to be (so the variable is the one the
/// binary reads).
pub async fn start_nimbus(
    binary: &std::path::Path,
    container: &Value,
    listeners: &[Listener],
    overrides: &[(&str, Option<String>)],
) -> anyhow::Result<(Child, BTreeMap<String, String>)> {
    let mut env = container_env(container, "probe-test-0", "nimbus-system");
    for l in listeners {
        if let Some(var) = l.env {
            env.insert(var.to_owned(), "127.0.0.1:0".into());
        }
    }
    for (k, v) in overrides {
        match v {
            Some(v) => env.insert((*k).to_owned(), v.clone()),
            None => env.remove(*k),
        };
    }
    let args: Vec<String> =
        container["args"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect();
    let mut cmd = Command::new(binary);
    cmd.args(&args)
        .envs(&env)
        .env("RUST_LOG", std::env::var("NIMBUS_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let what = binary.display().to_string();
    let (child, report): (Child, BTreeMap<String, Value>) = spawn_reporting(&mut cmd, &what).await?;
    let report: BTreeMap<String, String> =
        report.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned()))).collect();
    for l in listeners {
        let url = report.get(&l.name).with_context(|| format!("{what} did not report its {} listener", l.name))?;
        let port = url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(0);
        anyhow::ensure!(
            port != l.port,
            "{what} listens on {url} for {}: not where {} told it (is that the variable it reads?)",
            l.name,
            l.env.unwrap_or("?")
        );
    }
    Ok((child, report))
}

/// The status of `GET url` (None when nothing answers).
pub async fn status_of(http: &reqwest::Client, url: &str) -> Option<u16> {
    http.get(url).timeout(std::time::Duration::from_secs(2)).send().await.ok().map(|r| r.status().as_u16())
}
