//! The gateway against a real etcd and real datanode processes: the data API through it,
//! tenant isolation, revocation, rate limits, leader failover and self-fencing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_e2e::etcd::EtcdCluster;
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::secret::TestSecret;
use nimbus_e2e::{DataClient, poll, workload};
use reqwest::Method;
use serde_json::{Value, json};

struct Env {
    stack: Stack,
    gw: GatewayProc,
    client: DataClient,
}

async fn env(datanodes: usize, gateway_args: &[&str]) -> Env {
    let stack = Stack::start(datanodes, &["shop", "blog"]).await.unwrap();
    let gw =
        GatewayProc::start("gw1", &stack.etcd.client_urls, &stack.cluster.secret_file, gateway_args).await.unwrap();
    let client = DataClient::new();
    let url = format!("{}/readyz", gw.public);
    poll("the gateway to be ready", Duration::from_secs(15), || async {
        (client.get(&url).await.0 == 200).then_some(())
    })
    .await
    .unwrap();
    Env { stack, gw, client }
}

impl Env {
    fn url(&self, db: &str, rest: &str) -> String {
        format!("{}/v1/databases/{db}{rest}", self.gw.public)
    }

    /// Polls a body-less request until it answers `status`, failing after `timeout`.
    async fn wait_status(&self, what: &str, timeout: Duration, method: Method, url: &str, token: &str, status: u16) {
        poll(what, timeout, || async { (self.call(method.clone(), url, None, token).await.0 == status).then_some(()) })
            .await
            .unwrap();
    }

    async fn call(&self, method: Method, url: &str, body: Option<&Value>, token: &str) -> (u16, Value) {
        let auth = format!("Bearer {token}");
        self.client.call(method, url, body, &[("authorization", auth.as_str())]).await
    }
}

/// Every endpoint of `API.md` section 1: (method, path under the database, body, is a write).
fn endpoints() -> Vec<(Method, &'static str, Option<Value>, bool)> {
    vec![
        (Method::GET, "/collections", None, false),
        (Method::PUT, "/collections/c", None, true),
        (Method::POST, "/collections/c/documents", Some(json!({"documents": [{"x": 1}]})), true),
        (Method::GET, "/collections/c/documents/1", None, false),
        (Method::POST, "/collections/c/find", Some(json!({"filter": {}})), false),
        (Method::POST, "/collections/c/count", Some(json!({"filter": {}})), false),
        (Method::POST, "/collections/c/update", Some(json!({"filter": {}, "update": {"$set": {"y": 1}}})), true),
        (Method::POST, "/collections/c/delete", Some(json!({"filter": {"x": 2}})), true),
        (Method::POST, "/collections/c/indexes", Some(json!({"keys": {"x": 1}})), true),
        (Method::GET, "/collections/c/indexes", None, false),
        (Method::DELETE, "/collections/c/indexes/x_1", None, true),
        (Method::DELETE, "/collections/c", None, true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_confined_to_their_database_and_role() {
    let mut e = env(1, &[]).await;
    let shop_rw = e.stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let shop_ro = e.stack.control.user("shop", "viewer", UserRole::Read).await.unwrap();
    let blog_rw = e.stack.control.user("blog", "app", UserRole::ReadWrite).await.unwrap();
    e.wait_status(
        "users to reach the gateway",
        Duration::from_secs(5),
        Method::GET,
        &e.url("shop", "/collections"),
        &shop_rw,
        200,
    )
    .await;
    let before = e.call(Method::POST, &e.url("shop", "/collections/c/find"), Some(&json!({})), &shop_rw).await;
    for (method, path, body, write) in endpoints() {
        let url = e.url("shop", path);
        // Another database's token: 403 whatever it asks.
        let (st, resp) = e.call(method.clone(), &url, body.as_ref(), &blog_rw).await;
        assert_eq!((st, resp["error"]["code"].clone()), (403, json!("Forbidden")), "{method} {path}");
        // A read-only token: 403 on every write; reads pass authorisation.
        let (st, resp) = e.call(method.clone(), &url, body.as_ref(), &shop_ro).await;
        if write {
            assert_eq!((st, resp["error"]["code"].clone()), (403, json!("Forbidden")), "{method} {path}");
        } else {
            assert_ne!(st, 403, "{method} {path}: {resp}");
            assert_ne!(st, 401, "{method} {path}: {resp}");
        }
        // No token, a malformed one, a wrong secret: 401.
        for bad in ["", "nope", &format!("{}x", &shop_rw[..shop_rw.len() - 1])] {
            let (st, resp) = if bad.is_empty() {
                e.client.call(method.clone(), &url, body.as_ref(), &[]).await
            } else {
                e.call(method.clone(), &url, body.as_ref(), bad).await
            };
            assert_eq!(
                (st, resp["error"]["code"].clone()),
                (401, json!("Unauthenticated")),
                "{method} {path} token {bad:?}"
            );
        }
    }
    // None of the refused requests changed anything.
    let after = e.call(Method::POST, &e.url("shop", "/collections/c/find"), Some(&json!({})), &shop_rw).await;
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_api_works_end_to_end_through_the_gateway() {
    let mut e = env(3, &[]).await;
    let tok = e.stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let base = e.url("shop", "/collections/orders");
    e.wait_status("the user to reach the gateway", Duration::from_secs(5), Method::PUT, &base, &tok, 201).await;
    assert_eq!(e.call(Method::PUT, &base, None, &tok).await.0, 200);
    let (st, body) = e
        .call(
            Method::POST,
            &format!("{base}/documents"),
            Some(&json!({"documents": [{"_id": "a", "n": 1}, {"n": 2}]})),
            &tok,
        )
        .await;
    assert!(st == 200 || st == 201, "{st} {body}");
    assert_eq!(body["insertedIds"][0], json!("a"));
    let (st, body) =
        e.call(Method::POST, &format!("{base}/documents"), Some(&json!({"documents": [{"_id": "a"}]})), &tok).await;
    assert_eq!((st, body["error"]["code"].clone()), (409, json!("DuplicateKey")));
    let (st, body) = e.call(Method::GET, &format!("{base}/documents/a"), None, &tok).await;
    assert_eq!((st, body), (200, json!({"_id": "a", "n": 1})));
    let (st, body) = e
        .call(
            Method::POST,
            &format!("{base}/find"),
            Some(&json!({"filter": {"n": {"$gte": 1}}, "sort": {"n": -1}})),
            &tok,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        body["documents"].as_array().unwrap().iter().map(|d| d["n"].clone()).collect::<Vec<_>>(),
        vec![json!(2), json!(1)]
    );
    let (_, body) = e.call(Method::POST, &format!("{base}/count"), Some(&json!({})), &tok).await;
    assert_eq!(body, json!({"count": 2}));
    let (_, body) = e
        .call(
            Method::POST,
            &format!("{base}/update"),
            Some(&json!({"filter": {"_id": "u"}, "update": {"$set": {"n": 9}}, "upsert": true})),
            &tok,
        )
        .await;
    assert_eq!(body["upsertedId"], json!("u"));
    let (_, body) = e.call(Method::POST, &format!("{base}/delete"), Some(&json!({"filter": {"_id": "u"}})), &tok).await;
    assert_eq!(body, json!({"deleted": 1}));
    let (st, body) =
        e.call(Method::POST, &format!("{base}/find"), Some(&json!({"filter": {"n": {"$nope": 1}}})), &tok).await;
    assert_eq!((st, body["error"]["code"].clone()), (400, json!("InvalidFilter")));
    // Bad input stopped at the gateway: wrong content type, hostile nesting, unknown path.
    let auth = format!("Bearer {tok}");
    let r = e
        .client
        .http
        .post(format!("{base}/find"))
        .header("authorization", &auth)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = e
        .client
        .http
        .post(format!("{base}/find"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body("[".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (st, _) = e.call(Method::GET, &e.url("shop", "/whatever"), None, &tok).await;
    assert_eq!(st, 404);
    // A path that does not parse: another database's is 403 whatever it asks; on its own
    // database, 400 naming the problem.
    let (st, body) = e.call(Method::POST, &e.url("bad.name", "/collections/x/find"), Some(&json!({})), &tok).await;
    assert_eq!((st, body["error"]["code"].as_str()), (403, Some("Forbidden")), "{body}");
    let (st, body) = e.call(Method::POST, &e.url("shop", "/collections/bad.name/find"), Some(&json!({})), &tok).await;
    assert_eq!((st, body["error"]["code"].as_str()), (400, Some("BadRequest")), "{body}");
    // Counters per database, for the control plane.
    // The usage API is the control plane's: a client gets 401, a component its counters.
    let (st, _) = e.client.get(&format!("{}/v1/admin/usage", e.gw.admin)).await;
    assert_eq!(st, 401);
    let internal = DataClient::internal(&e.stack.cluster.secret);
    let (st, usage) = internal.get(&format!("{}/v1/admin/usage", e.gw.admin)).await;
    assert_eq!(st, 200);
    let shop = &usage["databases"]["shop"]["last60s"];
    assert!(shop["reads"].as_u64().unwrap() >= 4, "{usage}");
    assert!(shop["writes"].as_u64().unwrap() >= 3, "{usage}");
    assert_eq!(shop["deletes"], json!(1));
    assert!(shop["documentsReturned"].as_u64().unwrap() >= 2, "{usage}");
    // The public port's metrics name no tenant; the admin port's name the busiest ones.
    let public = e.client.http.get(format!("{}/metrics", e.gw.public)).send().await.unwrap().text().await.unwrap();
    assert!(public.contains("nimbus_gateway_requests_total{access=\"read\"}"), "{public}");
    assert!(!public.contains("shop") && !public.contains("db="), "{public}");
    let admin = e.client.http.get(format!("{}/metrics", e.gw.admin)).send().await.unwrap().text().await.unwrap();
    assert!(admin.contains("nimbus_gateway_tenant_last_60s{db=\"shop\",kind=\"reads\"}"), "{admin}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_works_and_a_revoked_token_stops_within_a_second() {
    let mut e = env(1, &[]).await;
    let url = e.url("shop", "/collections");
    let tok = e.stack.control.user("shop", "late", UserRole::ReadWrite).await.unwrap();
    let created = Instant::now();
    e.wait_status("the new user to work", Duration::from_secs(1), Method::GET, &url, &tok, 200).await;
    assert!(created.elapsed() < Duration::from_secs(1));
    e.stack.control.revoke("shop", "late").await.unwrap();
    let revoked = Instant::now();
    e.wait_status("the revoked token to fail", Duration::from_secs(1), Method::GET, &url, &tok, 401).await;
    assert!(revoked.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_qps_limit_requests_are_refused_with_retry_after_and_other_tenants_are_unaffected() {
    let mut e = env(1, &["--queue-wait-ms", "100"]).await;
    let flood_tok = e.stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let calm_tok = e.stack.control.user("blog", "app", UserRole::ReadWrite).await.unwrap();
    let limits = Limits { tier: Tier::Free, qps: 20, burst: 5, max_connections: 100, max_in_flight: 50 };
    e.stack.control.limits("shop", &limits).await.unwrap();
    let url = e.url("shop", "/collections");
    poll("the limits to apply", Duration::from_secs(5), || async {
        // 30 requests at once against a burst of 5 and 20/s with 100 ms of queueing:
        // some must be refused.
        let calls = (0..30).map(|_| e.call(Method::GET, &url, None, &flood_tok));
        let statuses: Vec<u16> = futures::future::join_all(calls).await.into_iter().map(|(st, _)| st).collect();
        statuses.contains(&429).then_some(())
    })
    .await
    .unwrap();
    let auth = format!("Bearer {flood_tok}");
    let refused = poll("a refused request to inspect", Duration::from_secs(5), || async {
        let calls = (0..30).map(|_| e.client.http.get(&url).header("authorization", &auth).send());
        futures::future::join_all(calls).await.into_iter().filter_map(Result::ok).find(|r| r.status().as_u16() == 429)
    })
    .await
    .unwrap();
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], json!("RateLimited"));

    // A flood of 16 clients on shop; blog's requests all succeed meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (client, url, auth, stop, served) =
            (e.client.clone(), url.clone(), auth.clone(), stop.clone(), served.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (st, _) = client.call(Method::GET, &url, None, &[("authorization", auth.as_str())]).await;
                if st == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    let calm_url = e.url("blog", "/collections");
    for _ in 0..50 {
        let (st, body) = e.call(Method::GET, &calm_url, None, &calm_tok).await;
        assert_eq!(st, 200, "the calm tenant was refused: {body}");
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    // The flood was held to its limit: at most the burst plus qps × elapsed (with slack
    // for the measurement window).
    let allowed = 5.0 + 20.0 * (elapsed.as_secs_f64() + 0.5);
    assert!(
        (served.load(Ordering::Relaxed) as f64) <= allowed,
        "served {} > {allowed}",
        served.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_during_a_stream_of_writes_shows_the_client_no_error() {
    let mut e = env(3, &[]).await;
    let tok = e.stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    e.wait_status(
        "the user to reach the gateway",
        Duration::from_secs(5),
        Method::GET,
        &e.url("shop", "/collections"),
        &tok,
        200,
    )
    .await;
    let gw = e.gw.public.clone();
    workload::prepare(&e.client, &gw, "shop", &tok).await.unwrap();
    // Keyless writes, sent once: the gateway must hide the failover, and the key it makes
    // must keep its own retries from applying a write twice.
    let writers = workload::Writers::start_without_keys(&e.client, &gw, "shop", &tok, 4);
    writers.wait_for(50, Duration::from_secs(10)).await.unwrap();
    let leader = e.stack.cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    e.stack.cluster.nodes[leader].kill().await;
    e.stack.cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
    writers.wait_for(50, Duration::from_secs(10)).await.unwrap();
    let report = writers.stop().await.unwrap();
    assert!(report.errors.is_empty(), "client-visible errors: {:?}", &report.errors[..report.errors.len().min(5)]);
    workload::verify(&e.client, &gw, "shop", &tok, &report).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_loses_its_etcd_lease_stops_serving_and_resyncs() {
    let mut e = env(1, &["--lease-ttl-secs", "2"]).await;
    let tok = e.stack.control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let url = e.url("shop", "/collections");
    e.wait_status("the user to reach the gateway", Duration::from_secs(5), Method::GET, &url, &tok, 200).await;
    e.stack.etcd.stop().await;
    let (st, body) = poll("the gateway to fence itself", Duration::from_secs(5), || async {
        let r = e.call(Method::GET, &url, None, &tok).await;
        (r.0 == 503).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!((st, body["error"]["code"].clone()), (503, json!("Unavailable")));
    e.stack.etcd.restart().await.unwrap();
    e.wait_status("the gateway to serve again", Duration::from_secs(15), Method::GET, &url, &tok, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_listener_serves_tls_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(status.success());
    let etcd = EtcdCluster::start(1, dir.path()).await.unwrap();
    let args = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let secret = TestSecret::new().unwrap();
    let gw = GatewayProc::start("gw-tls", &etcd.client_urls, &secret.file, &args).await.unwrap();
    assert!(gw.public.starts_with("https://"), "{}", gw.public);
    // curl checks the server's certificate against the one we made.
    let url = format!("{}/healthz", gw.public.replace("127.0.0.1", "localhost"));
    let port = gw.public.rsplit(':').next().unwrap().to_owned();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert", cert.to_str().unwrap(), "--resolve", &format!("localhost:{port}:127.0.0.1"), &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"status": "ok"}));
    // Plain HTTP on the TLS port gets nowhere.
    let plain = e2e_plain(&gw.public.replace("https://", "http://")).await;
    assert!(plain.is_none());
}

async fn e2e_plain(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    client.get(format!("{url}/healthz")).send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_disconnected_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(1, dir.path()).await.unwrap();
    let secret = TestSecret::new().unwrap();
    let gw =
        GatewayProc::start("gw-slow", &etcd.client_urls, &secret.file, &["--header-timeout-ms", "300"]).await.unwrap();
    let addr = gw.public.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // The headers never end: the gateway closes the connection instead of waiting forever.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the stalled connection was still open after 5 s");
    // Well-behaved clients are still served.
    assert_eq!(DataClient::new().get(&format!("{}/healthz", gw.public)).await.0, 200);
}
