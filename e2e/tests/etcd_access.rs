//! etcd as the chart runs it, with the real etcd binary: TLS on both listeners with client
//! certificates required, members started by `nimbus-operator etcd-member`, roles and
//! users made by `nimbus-operator etcd-setup` (one per component, least rights); a gateway
//! that connects with its certificate and serves; its certificate refused where its role
//! does not reach; and a member that lost its volume rejoining the cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use nimbus_api::etcd::{RouteMember, UserRole};
use nimbus_e2e::gateway::GatewayProc;
use nimbus_e2e::pki::{Issued, Pki};
use nimbus_e2e::{Cluster, DataClient, binary, poll};
use nimbus_net::EtcdArgs;
use reqwest::Method;
use serde_json::json;
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    nimbus_net::ports::free_port().unwrap()
}

struct Member {
    name: String,
    peer: String,
    client: String,
    metrics: String,
    dir: PathBuf,
    child: Option<Child>,
}

struct Etcd {
    members: Vec<Member>,
    tls: PathBuf,
    root: EtcdArgs,
}

impl Etcd {
    fn peers(&self) -> String {
        self.members.iter().map(|m| format!("{}={}", m.name, m.peer)).collect::<Vec<_>>().join(",")
    }

    fn clients(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// `nimbus-operator etcd-member` for member `i` (its init container): whether it
    /// succeeded, and its log (the plan).
    async fn prepare(&self, i: usize, bootstrapped: bool) -> (bool, String) {
        let config = self.members[i].dir.join("etcd.yaml");
        let root = &self.root;
        let out = Command::new(binary("nimbus-operator").unwrap())
            .arg("etcd-member")
            .args(["--cluster-bootstrapped", if bootstrapped { "true" } else { "false" }])
            .args(["--name", &self.members[i].name, "--peers", &self.peers(), "--etcd", &self.clients().join(",")])
            .arg("--data-dir")
            .arg(self.members[i].dir.join("data"))
            .arg("--config-file")
            .arg(&config)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["--listen-host", "127.0.0.1", "--listen-metrics-url", &self.members[i].metrics])
            .arg("--etcd-ca-file")
            .arg(root.etcd_ca_file.as_ref().unwrap())
            .arg("--etcd-cert-file")
            .arg(root.etcd_cert_file.as_ref().unwrap())
            .arg("--etcd-key-file")
            .arg(root.etcd_key_file.as_ref().unwrap())
            .output()
            .await
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// etcd for member `i`, with the file `prepare` wrote.
    fn spawn(&mut self, i: usize) {
        let config = self.members[i].dir.join("etcd.yaml");
        let child = Command::new(nimbus_e2e::etcd::etcd_binary().unwrap())
            .arg("--config-file")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.members[i].child = Some(child);
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    async fn wait_healthy(&self, i: usize) {
        let url = format!("{}/health", self.members[i].metrics);
        poll(&format!("etcd member {i} healthy"), Duration::from_secs(30), || async {
            let r = reqwest::get(&url).await.ok()?.text().await.ok()?;
            r.contains("true").then_some(())
        })
        .await
        .unwrap();
    }
}

fn cert_args(endpoints: &[String], ca: &Path, id: &Issued) -> EtcdArgs {
    EtcdArgs {
        endpoints: endpoints.to_vec(),
        etcd_ca_file: Some(ca.to_owned()),
        etcd_cert_file: Some(id.cert.clone()),
        etcd_key_file: Some(id.key.clone()),
        ..Default::default()
    }
}

async fn connect(args: &EtcdArgs) -> anyhow::Result<Client> {
    Ok(args
        .connect(
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(5)),
        )
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_tls_and_least_rights_serves_the_gateway_and_a_member_that_lost_its_volume_rejoins() {
    let dir = tempfile::Builder::new().prefix("nimbus-etcd-tls-").tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki")).unwrap();
    let server = pki.issue("server", "etcd").unwrap();
    let root_id = pki.issue("root", "root").unwrap();
    let operator_id = pki.issue("operator", "nimbus-operator").unwrap();
    let gateway_id = pki.issue("gateway", "nimbus-gateway").unwrap();
    let stranger_id = Pki::new(&dir.path().join("other-ca")).unwrap().issue("stranger", "root").unwrap();
    // The layout the chart mounts: tls.crt, tls.key, ca.crt.
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::copy(&server.cert, tls.join("tls.crt")).unwrap();
    std::fs::copy(&server.key, tls.join("tls.key")).unwrap();
    std::fs::copy(pki.ca(), tls.join("ca.crt")).unwrap();
    let members: Vec<Member> = (0..3)
        .map(|i| Member {
            name: format!("e{i}"),
            peer: format!("https://127.0.0.1:{}", free_port()),
            client: format!("https://127.0.0.1:{}", free_port()),
            metrics: format!("http://127.0.0.1:{}", free_port()),
            dir: dir.path().join(format!("e{i}")),
            child: None,
        })
        .collect();
    let clients: Vec<String> = members.iter().map(|m| m.client.clone()).collect();
    let mut etcd = Etcd { members, tls, root: cert_args(&clients, &pki.ca(), &root_id) };
    // First install: every init container runs before any etcd (as Pods start together).
    for i in 0..3 {
        let (ok, log) = etcd.prepare(i, false).await;
        assert!(ok && log.contains("Bootstrap"), "{log}");
    }
    for i in 0..3 {
        etcd.spawn(i);
    }
    for i in 0..3 {
        etcd.wait_healthy(i).await;
    }

    // Roles and users, twice (the init container runs at every operator start).
    for _ in 0..2 {
        let out = Command::new(binary("nimbus-operator").unwrap())
            .arg("etcd-setup")
            .args(["--etcd", &clients.join(",")])
            .arg("--etcd-ca-file")
            .arg(pki.ca())
            .arg("--etcd-cert-file")
            .arg(&root_id.cert)
            .arg("--etcd-key-file")
            .arg(&root_id.key)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "etcd-setup: {}", String::from_utf8_lossy(&out.stderr));
    }

    // The operator's identity writes the control plane's records.
    let datanode = Cluster::start(1, &[]).await.unwrap();
    let operator = cert_args(&clients, &pki.ca(), &operator_id);
    let store = nimbus_operator::controlplane::coord::Coordinator::connect(&operator).await.unwrap();
    let members =
        vec![RouteMember { id: datanode.nodes[0].id, data_addr: datanode.nodes[0].data.clone(), zone: "a".into() }];
    store.put_route("shop", "rs0", members).await.unwrap();
    let (token, record) = nimbus_gateway::auth::new_token("shop", "app", UserRole::ReadWrite);
    store.put_user("shop", "app", &record).await.unwrap();

    // The gateway's identity: it serves, with TLS to etcd and its certificate.
    let ca = pki.ca();
    let gw_args = [
        "--etcd-ca-file",
        ca.to_str().unwrap(),
        "--etcd-cert-file",
        gateway_id.cert.to_str().unwrap(),
        "--etcd-key-file",
        gateway_id.key.to_str().unwrap(),
    ];
    let gw = GatewayProc::start("gw-tls-etcd", &clients, &datanode.secret_file, &gw_args).await.unwrap();
    let client = DataClient::new();
    let auth = format!("Bearer {token}");
    let url = format!("{}/v1/databases/shop/collections/c/documents", gw.public);
    poll("the gateway to serve through etcd with TLS", Duration::from_secs(15), || async {
        let (st, _) =
            client.call(Method::POST, &url, Some(&json!({"documents": [{"x": 1}]})), &[("authorization", &auth)]).await;
        (st == 201).then_some(())
    })
    .await
    .unwrap();

    // Least rights: the gateway's certificate reads, registers, acknowledges holds, and
    // nothing more.
    let mut as_gateway = connect(&cert_args(&clients, &pki.ca(), &gateway_id)).await.unwrap();
    assert!(as_gateway.get("/nimbus/", Some(GetOptions::new().with_prefix())).await.is_ok());
    as_gateway.put("/nimbus/gateways/probe", "x", None).await.unwrap();
    as_gateway.put("/nimbus/holds/shop/probe", "x", None).await.unwrap();
    for key in ["/nimbus/routes/shop", "/nimbus/users/shop/evil", "/nimbus/limits/shop", "/other"] {
        let e = as_gateway.put(key, "x", None).await.expect_err(key);
        assert!(e.to_string().contains("permission denied"), "{key}: {e}");
    }
    assert!(as_gateway.delete("/nimbus/routes/shop", None).await.is_err());
    // The operator's reaches /nimbus/ only; certificates of another CA, or none, nothing.
    let mut as_operator = connect(&operator).await.unwrap();
    assert!(as_operator.put("/elsewhere", "x", None).await.is_err());
    let stranger = cert_args(&clients, &pki.ca(), &stranger_id);
    let denied = match connect(&stranger).await {
        Err(_) => true,
        Ok(mut c) => c.get("/nimbus/", None).await.is_err(),
    };
    assert!(denied, "a certificate of another CA was let in");
    let plain =
        EtcdArgs { endpoints: clients.iter().map(|u| u.replace("https", "http")).collect(), ..Default::default() };
    let refused = match connect(&plain).await {
        Err(_) => true,
        Ok(mut c) => c.get("/nimbus/", None).await.is_err(),
    };
    assert!(refused, "plain HTTP reached etcd");

    // The whole cluster goes down, and a member comes back without its volume. While no
    // other member answers, it waits (its init container fails and is run again) instead
    // of starting an empty cluster beside the real one; once they answer, it is removed and
    // added anew, rejoins and catches up.
    for i in 0..3 {
        etcd.kill(i).await;
    }
    std::fs::remove_dir_all(etcd.members[2].dir.join("data")).unwrap();
    let (ok, log) = etcd.prepare(2, true).await;
    assert!(!ok && log.contains("waiting for another member"), "{log}");
    for i in 0..2 {
        let (ok, log) = etcd.prepare(i, true).await;
        assert!(ok && log.contains("Restart"), "{log}");
        etcd.spawn(i);
    }
    for i in 0..2 {
        etcd.wait_healthy(i).await;
    }
    let (ok, log) = etcd.prepare(2, true).await;
    assert!(ok && log.contains("Replace"), "{log}");
    etcd.spawn(2);
    etcd.wait_healthy(2).await;
    let only_e2 = cert_args(&[etcd.members[2].client.clone()], &pki.ca(), &root_id);
    let mut on_e2 = connect(&only_e2).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = on_e2.member_list().await
            && m.members().len() == 3
            && m.members().iter().all(|m| !m.name().is_empty())
        {
            assert!(m.members().iter().any(|m| m.name() == "e2"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cluster never listed three started members");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It has the data written before it lost its own (read from it alone).
    let route = on_e2.get("/nimbus/routes/shop", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert_eq!(route.kvs().len(), 1);
    drop(gw);
}
