//! Every probe Kubernetes would call, called on the real binaries where the kubelet would
//! call it: the probes of the objects the operator builds (datanode Pods, gateway
//! Deployments) and of the rendered chart (the operator, etcd). Each probe's port is
//! resolved to the container port it names, then to the listener of the binary that binds
//! it (from the container's environment or the binary's default, or etcd's configuration
//! file as the chart's init container writes it); the binary is started as the container
//! would run it (listeners moved to 127.0.0.1) and the probe must answer 200 once the
//! component is ready, and readiness must answer otherwise before (where that can be
//! arranged: a datanode before its replica set exists, a gateway or an operator before
//! etcd answers, an operator before its watches have listed).
//!
//! The operator needs a Kubernetes API: a fake one ([`nimbus_e2e::fake_kube`]) answers its
//! Lease and its lists, which is all it asks when there is nothing to reconcile.
//!
//! The chart is rendered with helm (`scripts/setup.sh` puts it in
//! `~/.cache/nimbus/tools`); without it the chart's test says SKIPPED and passes, and
//! `scripts/check-chart.sh` (which refuses to run without helm) is what fails CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use nimbus_e2e::fake_kube::FakeKube;
use nimbus_e2e::probes::{
    Listener, ListenerFlag, Probe, listener_for, nimbus_listeners, pod_spec, probes, start_nimbus, status_of,
    url_listeners,
};
use nimbus_e2e::{DataClient, binary, poll};
use nimbus_operator::etcd_member::{self, MemberArgs, Peer, Plan};
use nimbus_operator::k8s::objects::{self, ReplicaSetShape, Settings};
use serde::Deserialize as _;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const DATANODE: [ListenerFlag; 3] = [
    ListenerFlag { env: "NIMBUS_DATA_LISTEN", default: nimbus_datanode::config::DEFAULT_DATA_LISTEN, report: "data" },
    ListenerFlag {
        env: "NIMBUS_ADMIN_LISTEN",
        default: nimbus_datanode::config::DEFAULT_ADMIN_LISTEN,
        report: "admin",
    },
    ListenerFlag { env: "NIMBUS_RAFT_LISTEN", default: nimbus_datanode::config::DEFAULT_RAFT_LISTEN, report: "raft" },
];
const GATEWAY: [ListenerFlag; 2] = [
    ListenerFlag { env: "NIMBUS_LISTEN", default: nimbus_gateway::config::DEFAULT_LISTEN, report: "public" },
    ListenerFlag { env: "NIMBUS_ADMIN_LISTEN", default: nimbus_gateway::config::DEFAULT_ADMIN_LISTEN, report: "admin" },
];
const OPERATOR: [ListenerFlag; 1] = [ListenerFlag {
    env: "NIMBUS_METRICS_LISTEN",
    default: nimbus_operator::k8s::health::DEFAULT_METRICS_LISTEN,
    report: "metrics",
}];

/// How long a component may take to become ready, or unready.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn is_readiness(p: &Probe) -> bool {
    p.kind == "readinessProbe"
}

fn free_port() -> anyhow::Result<u16> {
    Ok(nimbus_net::ports::free_port()?)
}

/// The probes of `objects`, with the failures found reading them.
fn collect(objects: &[Value]) -> (Vec<Probe>, Vec<String>) {
    let mut failures = Vec::new();
    let mut out = Vec::new();
    for o in objects {
        if let Some((origin, spec)) = pod_spec(o) {
            out.extend(probes(&origin, spec, &mut failures));
        }
    }
    (out, failures)
}

fn of_container(all: &[Probe], name: &str) -> Vec<Probe> {
    all.iter().filter(|p| p.container["name"] == name).cloned().collect()
}

/// The probes with their listeners; a probe on no listener is a failure.
fn resolve<'a>(probes: &[Probe], listeners: &'a [Listener], failures: &mut Vec<String>) -> Vec<(Probe, &'a Listener)> {
    probes
        .iter()
        .filter_map(|p| match listener_for(p, listeners) {
            Ok(l) => Some((p.clone(), l)),
            Err(e) => {
                failures.push(e);
                None
            }
        })
        .collect()
}

fn probe_url(report: &BTreeMap<String, String>, p: &Probe, l: &Listener) -> String {
    format!("{}{}", report.get(&l.name).map(String::as_str).unwrap_or("http://unreported"), p.path)
}

/// Polls `url` until `want` holds for its status; a failure sentence otherwise.
async fn expect(http: &reqwest::Client, url: &str, want: fn(Option<u16>) -> bool, what: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + READY_WITHIN;
    loop {
        let last = status_of(http, url).await;
        if want(last) {
            return None;
        }
        if std::time::Instant::now() >= deadline {
            let body = match http.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            return Some(format!("{what}: GET {url} answered {last:?} for {READY_WITHIN:?} ({})", body.trim()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ok(s: Option<u16>) -> bool {
    s == Some(200)
}

fn not_ok(s: Option<u16>) -> bool {
    s.is_some_and(|s| s != 200)
}

/// A single-member etcd from a configuration file, killed on drop.
struct Etcd {
    child: Child,
}

impl Etcd {
    async fn start(config: &Value, dir: &Path) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("etcd.yaml");
        std::fs::write(&file, serde_yaml_ng::to_string(config)?)?;
        let child = Command::new(nimbus_e2e::etcd::etcd_binary()?)
            .arg(format!("--config-file={}", file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Etcd { child })
    }

    /// A plain etcd whose client URL is `http://127.0.0.1:client_port`.
    async fn plain(client_port: u16, dir: &Path) -> anyhow::Result<Etcd> {
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let client = format!("http://127.0.0.1:{client_port}");
        let config = json!({
            "name": "e0", "data-dir": dir.join("data").display().to_string(),
            "listen-client-urls": client, "advertise-client-urls": client,
            "listen-peer-urls": peer, "initial-advertise-peer-urls": peer,
            "initial-cluster": format!("e0={peer}"), "initial-cluster-state": "new", "log-level": "error"
        });
        let etcd = Etcd::start(&config, dir).await?;
        let http = reqwest::Client::new();
        poll("etcd to be healthy", READY_WITHIN, || {
            let http = http.clone();
            let health = format!("{client}/health");
            async move { (status_of(&http, &health).await == Some(200)).then_some(()) }
        })
        .await?;
        Ok(etcd)
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The replica set shape of `nimbus-operator preview`.
fn shape() -> ReplicaSetShape {
    ReplicaSetShape {
        name: "default-rs0".into(),
        namespace: "apps".into(),
        pool: "default".into(),
        storage_size: "1Gi".into(),
        storage_class: None,
        resources: None,
        node_selector: Default::default(),
        tolerations: vec![],
        owner: None,
    }
}

fn operator_built_objects() -> anyhow::Result<Vec<Value>> {
    let settings = Settings::default();
    Ok(vec![
        serde_json::to_value(objects::member_pod(&settings, &shape(), 1, "a"))?,
        serde_json::to_value(objects::gateway_deployment(&settings, "apps", None))?,
    ])
}

/// A datanode as its Pod runs it: readiness refuses until its replica set exists and has a
/// leader, then every probe answers 200.
async fn check_datanode(probes: &[Probe]) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let container = &probes[0].container;
    let listeners = nimbus_listeners(container, &DATANODE);
    let resolved = resolve(probes, &listeners, &mut failures);
    let tmp = tempfile::Builder::new().prefix("nimbus-probes-").tempdir()?;
    let (secret, secret_file) = nimbus_e2e::secret::write_new(tmp.path())?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let (_child, report) = start_nimbus(
        &binary("nimbus-datanode")?,
        container,
        &listeners,
        &[
            ("NIMBUS_DATA_DIR", Some(data.display().to_string())),
            ("NIMBUS_CLUSTER_SECRET_FILE", Some(secret_file.display().to_string())),
            ("NIMBUS_ADVERTISE_HOST", Some("127.0.0.1".into())),
        ],
    )
    .await?;
    let http = reqwest::Client::new();
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        let (want, state): (fn(Option<u16>) -> bool, _) =
            if is_readiness(p) { (not_ok, "not ready before its replica set exists") } else { (ok, "alive") };
        failures.extend(expect(&http, &url, want, &format!("datanode {}: {state}", p.origin)).await);
    }
    let env = nimbus_e2e::probes::container_env(container, "pod", "ns");
    let member = nimbus_api::admin::MemberInfo {
        id: env.get("NIMBUS_NODE_ID").and_then(|v| v.parse().ok()).unwrap_or(1),
        admin_addr: report["admin"].clone(),
        data_addr: report["data"].clone(),
        raft_addr: report["raft"].clone(),
        zone: env.get("NIMBUS_ZONE").cloned().unwrap_or_default(),
        voter: true,
    };
    let (st, body) = DataClient::internal(&secret)
        .post(&format!("{}/v1/admin/init", report["admin"]), &json!({ "members": [member] }))
        .await;
    anyhow::ensure!(st == 200, "init of the datanode failed: {st} {body}");
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        failures.extend(expect(&http, &url, ok, &format!("datanode {}: ready once it leads", p.origin)).await);
    }
    Ok(failures)
}

/// A gateway as its Deployment runs it: readiness refuses until it is in step with etcd,
/// answers 200 then, and refuses again once etcd is gone.
async fn check_gateway(probes: &[Probe]) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let container = &probes[0].container;
    let listeners = nimbus_listeners(container, &GATEWAY);
    let resolved = resolve(probes, &listeners, &mut failures);
    let tmp = tempfile::Builder::new().prefix("nimbus-probes-").tempdir()?;
    let (_secret, secret_file) = nimbus_e2e::secret::write_new(tmp.path())?;
    let etcd_port = free_port()?;
    let (_child, report) = start_nimbus(
        &binary("nimbus-gateway")?,
        container,
        &listeners,
        &[
            ("NIMBUS_ETCD", Some(format!("http://127.0.0.1:{etcd_port}"))),
            ("NIMBUS_CLUSTER_SECRET_FILE", Some(secret_file.display().to_string())),
        ],
    )
    .await?;
    let http = reqwest::Client::new();
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        let (want, state): (fn(Option<u16>) -> bool, _) =
            if is_readiness(p) { (not_ok, "not ready before etcd answers") } else { (ok, "alive without etcd") };
        failures.extend(expect(&http, &url, want, &format!("gateway {}: {state}", p.origin)).await);
    }
    let mut etcd = Etcd::plain(etcd_port, &tmp.path().join("etcd")).await?;
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        failures.extend(expect(&http, &url, ok, &format!("gateway {}: ready in step with etcd", p.origin)).await);
    }
    etcd.kill().await;
    for (p, l) in resolved.iter().filter(|(p, _)| is_readiness(p)) {
        let url = probe_url(&report, p, l);
        failures.extend(expect(&http, &url, not_ok, &format!("gateway {}: unready once etcd is gone", p.origin)).await);
    }
    Ok(failures)
}

/// The operator as `container` runs it, against the fake API server `kube` and the etcd at
/// `etcd_port`, with its internal files in `dir`.
async fn start_operator(
    container: &Value,
    listeners: &[Listener],
    kube: &FakeKube,
    etcd_port: u16,
    dir: &Path,
) -> anyhow::Result<(Child, BTreeMap<String, String>)> {
    let internal = dir.join("internal");
    std::fs::create_dir_all(&internal)?;
    nimbus_e2e::secret::write_new(&internal)?;
    start_nimbus(
        &binary("nimbus-operator")?,
        container,
        listeners,
        &[
            ("KUBECONFIG", Some(kube.kubeconfig.display().to_string())),
            ("NIMBUS_ETCD", Some(format!("http://127.0.0.1:{etcd_port}"))),
            ("NIMBUS_INTERNAL_DIR", Some(internal.display().to_string())),
            // The test's etcd is plain: no client certificate.
            ("NIMBUS_ETCD_CA_FILE", None),
            ("NIMBUS_ETCD_CERT_FILE", None),
            ("NIMBUS_ETCD_KEY_FILE", None),
        ],
    )
    .await
}

/// The operator as the chart runs it: alive at once; ready only with its watches listed and
/// etcd answering.
async fn check_operator(probes: &[Probe]) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let container = &probes[0].container;
    let listeners = nimbus_listeners(container, &OPERATOR);
    let resolved = resolve(probes, &listeners, &mut failures);
    let tmp = tempfile::Builder::new().prefix("nimbus-probes-").tempdir()?;
    let kube = FakeKube::start(tmp.path()).await?;
    let etcd_port = free_port()?;
    let (_child, report) = start_operator(container, &listeners, &kube, etcd_port, tmp.path()).await?;
    let http = reqwest::Client::new();
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        let (want, state): (fn(Option<u16>) -> bool, _) = if is_readiness(p) {
            (not_ok, "not ready before its watches list and etcd answers")
        } else {
            (ok, "alive")
        };
        failures.extend(expect(&http, &url, want, &format!("operator {}: {state}", p.origin)).await);
    }
    kube.open_lists();
    let _etcd = Etcd::plain(etcd_port, &tmp.path().join("etcd")).await?;
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        failures.extend(expect(&http, &url, ok, &format!("operator {}: ready", p.origin)).await);
    }
    Ok(failures)
}

/// `etcd-member`'s flags, parsed as the init container's command line parses them.
#[derive(Parser)]
struct MemberCommand {
    #[command(flatten)]
    args: MemberArgs,
}

/// An etcd member of the chart's StatefulSet `sts`: its listeners are those of the file its
/// init container writes (`etcd-member`'s configuration for these flags). Run with that
/// file, moved to 127.0.0.1 and without TLS on the client and peer listeners (the
/// certificates are the chart's Secrets; the probes' listener has none either way), every
/// probe answers 200 once the member serves.
async fn check_etcd(probes: &[Probe], sts: &Value) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let spec = &sts["spec"]["template"]["spec"];
    let init = spec["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["args"][0] == "etcd-member"))
        .ok_or_else(|| anyhow::anyhow!("etcd's StatefulSet has no etcd-member init container"))?;
    // The first member: the Pod name is what `--name` (POD_NAME) would be.
    let name = format!("{}-0", sts["metadata"]["name"].as_str().unwrap_or("etcd"));
    let mut argv: Vec<String> = vec!["etcd-member".into(), "--name".into(), name];
    argv.extend(init["args"].as_array().into_iter().flatten().skip(1).filter_map(|a| a.as_str().map(str::to_owned)));
    let args = MemberCommand::try_parse_from(&argv)?.args;
    let peers: Vec<Peer> = args
        .peers
        .iter()
        .filter_map(|p| p.split_once('=').map(|(n, u)| Peer { name: n.into(), peer_url: u.into() }))
        .collect();
    let me = peers.iter().find(|p| p.name == args.name).cloned().unwrap_or_else(|| peers[0].clone());
    let config = etcd_member::config(&args, &me, &args.etcd.endpoints[0], &peers, &Plan::Bootstrap);
    let command: Vec<&str> =
        probes[0].container["command"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
    let reads_file = format!("--config-file={}", args.config_file.display());
    if command != ["etcd", reads_file.as_str()] {
        failures.push(format!("etcd runs {command:?}, not etcd {reads_file}: its listeners are not the file's"));
    }
    let mut listeners = url_listeners("client", &config.listen_client_urls);
    listeners.extend(url_listeners("peer", &config.listen_peer_urls));
    listeners.extend(url_listeners("metrics", &config.listen_metrics_urls));
    let resolved = resolve(probes, &listeners, &mut failures);

    let tmp = tempfile::Builder::new().prefix("nimbus-probes-").tempdir()?;
    let mut report = BTreeMap::new();
    let mut file = serde_json::to_value(&config)?;
    let local = |scheme: &str| -> anyhow::Result<String> { Ok(format!("{scheme}://127.0.0.1:{}", free_port()?)) };
    let client = local("http")?;
    let peer = local("http")?;
    // The metrics listener keeps its scheme: the probe must speak it.
    let metrics_scheme = listeners.iter().find(|l| l.name == "metrics").map_or("http", |l| l.scheme.as_str());
    let metrics = local(metrics_scheme)?;
    report.insert("client".to_string(), client.clone());
    report.insert("peer".to_string(), peer.clone());
    report.insert("metrics".to_string(), metrics.clone());
    file["data-dir"] = json!(tmp.path().join("data").display().to_string());
    file["listen-client-urls"] = json!(client);
    file["advertise-client-urls"] = json!(client);
    file["listen-peer-urls"] = json!(peer);
    file["initial-advertise-peer-urls"] = json!(peer);
    file["initial-cluster"] = json!(format!("{}={peer}", me.name));
    file["listen-metrics-urls"] = json!(metrics);
    file["log-level"] = json!("error");
    if let Some(m) = file.as_object_mut() {
        m.remove("client-transport-security");
        m.remove("peer-transport-security");
    }
    let _etcd = Etcd::start(&file, tmp.path()).await?;
    let http = reqwest::Client::new();
    for (p, l) in &resolved {
        let url = probe_url(&report, p, l);
        failures.extend(expect(&http, &url, ok, &format!("etcd {}: healthy", p.origin)).await);
    }
    Ok(failures)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// helm, where `scripts/setup.sh` puts it.
fn helm() -> Option<PathBuf> {
    let tools = std::env::var_os("NIMBUS_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/nimbus/tools")))?;
    let helm = tools.join("layer/helm/helm");
    helm.is_file().then_some(helm)
}

fn render_chart(helm: &Path) -> anyhow::Result<Vec<Value>> {
    let out = std::process::Command::new(helm)
        .args(["template", "nimbus"])
        .arg(repo_root().join("charts/nimbus"))
        .args(["-n", "nimbus-system"])
        .output()?;
    anyhow::ensure!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

#[tokio::test]
async fn operator_built_probes_answer_on_the_real_binaries() -> anyhow::Result<()> {
    let (all, mut failures) = collect(&operator_built_objects()?);
    let datanode = of_container(&all, "datanode");
    let gateway = of_container(&all, "gateway");
    for (what, p) in [("datanode", &datanode), ("gateway", &gateway)] {
        for kind in ["readinessProbe", "livenessProbe"] {
            assert!(p.iter().any(|p| p.kind == kind), "the {what} has a {kind}");
        }
    }
    assert_eq!(datanode.len() + gateway.len(), all.len(), "every probe is a datanode's or a gateway's");
    failures.extend(check_datanode(&datanode).await?);
    failures.extend(check_gateway(&gateway).await?);
    assert!(failures.is_empty(), "probes that would fail on Kubernetes:\n{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn chart_probes_answer_on_the_real_binaries() -> anyhow::Result<()> {
    let Some(helm) = helm() else {
        eprintln!(
            "SKIPPED chart_probes_answer_on_the_real_binaries: helm not found in $NIMBUS_TOOLS or \
             ~/.cache/nimbus/tools (run scripts/setup.sh); the chart's probes were NOT checked"
        );
        return Ok(());
    };
    let docs = render_chart(&helm)?;
    let (all, mut failures) = collect(&docs);
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-etcd")))
        .cloned();
    let mut checked = 0;
    let operator = of_container(&all, "operator");
    if !operator.is_empty() {
        assert_eq!(operator[0].container["args"], json!(["run"]), "the operator container runs `run`");
        failures.extend(check_operator(&operator).await?);
        checked += operator.len();
    }
    let etcd = of_container(&all, "etcd");
    if !etcd.is_empty() {
        let sts = sts.ok_or_else(|| anyhow::anyhow!("etcd probes outside etcd's StatefulSet"))?;
        failures.extend(check_etcd(&etcd, &sts).await?);
        checked += etcd.len();
    }
    assert!(operator.len() >= 2 && etcd.len() >= 2, "the chart probes the operator and etcd: {all:#?}");
    for p in &all[..] {
        if !["operator", "etcd"].contains(&p.container["name"].as_str().unwrap_or("")) {
            failures.push(format!("{}: no binary this test knows how to start", p.origin));
        }
    }
    assert_eq!(checked + failures.iter().filter(|f| f.contains("no binary")).count(), all.len());
    assert!(failures.is_empty(), "probes that would fail on Kubernetes:\n{}", failures.join("\n"));
    Ok(())
}

/// The operator's `/readyz` says what it waits for: its watches (the API's lists held back),
/// then etcd (killed), and answers 200 only with both.
#[tokio::test]
async fn operator_readyz_answers_200_only_with_watches_synced_and_etcd_reachable() -> anyhow::Result<()> {
    let container = json!({
        "name": "operator",
        "args": ["run"],
        "env": [
            {"name": "POD_NAME", "value": "nimbus-operator-0"},
            {"name": "POD_NAMESPACE", "value": "nimbus-system"},
            {"name": "NIMBUS_DATANODE_IMAGE", "value": "datanode:test"},
            {"name": "NIMBUS_GATEWAY_IMAGE", "value": "gateway:test"}
        ]
    });
    let listeners = nimbus_listeners(&container, &OPERATOR);
    let tmp = tempfile::Builder::new().prefix("nimbus-probes-").tempdir()?;
    let kube = FakeKube::start(tmp.path()).await?;
    let etcd_port = free_port()?;
    let mut etcd = Etcd::plain(etcd_port, &tmp.path().join("etcd")).await?;
    let (_child, report) = start_operator(&container, &listeners, &kube, etcd_port, tmp.path()).await?;
    let http = reqwest::Client::new();
    let readyz = format!("{}/readyz", report["metrics"]);
    let answer = |want: u16, says: &'static str| {
        let http = http.clone();
        let readyz = readyz.clone();
        async move {
            let r = http.get(&readyz).send().await.ok()?;
            let status = r.status().as_u16();
            let body = r.text().await.ok()?;
            (status == want && body.contains(says)).then_some(body)
        }
    };
    assert_eq!(status_of(&http, &format!("{}/healthz", report["metrics"])).await, Some(200), "alive at once");
    // Leading, etcd answering: only the watches are missing (the lists are held back).
    let body = poll("the operator to lead with its watches unlisted", READY_WITHIN, || {
        let reply = answer(503, "not ready: the watches of ");
        async move { reply.await.filter(|body| !body.contains("etcd")) }
    })
    .await?;
    assert!(!body.contains("Lease"), "{body}");
    for watch in nimbus_operator::k8s::WATCHES {
        assert!(body.contains(watch), "{watch} not named among the watches waited for: {body}");
    }
    kube.open_lists();
    let body = poll("the operator to be ready", READY_WITHIN, || answer(200, "ready: leading")).await?;
    assert!(body.contains("etcd reachable"), "{body}");
    etcd.kill().await;
    let body = poll("the operator to be unready without etcd", READY_WITHIN, || answer(503, "etcd")).await?;
    assert!(body.contains("etcd is unreachable") || body.contains("etcd was last checked"), "{body}");
    Ok(())
}

/// The check itself: a probe on a route the binary does not serve, on a port name the
/// container does not declare, or on a port no listener binds is reported.
#[tokio::test]
async fn a_probe_on_a_missing_route_or_port_fails_the_check() -> anyhow::Result<()> {
    let mut pod = operator_built_objects()?.remove(0);
    let c = &mut pod["spec"]["containers"][0];
    c["readinessProbe"]["httpGet"]["path"] = json!("/ready");
    c["livenessProbe"]["httpGet"]["port"] = json!("health");
    c["startupProbe"] = json!({"httpGet": {"path": "/healthz", "port": 7999}});
    let (all, mut failures) = collect(&[pod]);
    failures.extend(check_datanode(&all).await?);
    let text = failures.join("\n");
    assert!(text.contains("names port \"health\", which the container does not declare"), "{text}");
    assert!(text.contains("port 7999 is not a port the binary listens on"), "{text}");
    assert!(
        text.contains("readinessProbe: ready once it leads: GET") && text.contains("/ready answered Some(404)"),
        "{text}"
    );
    Ok(())
}
