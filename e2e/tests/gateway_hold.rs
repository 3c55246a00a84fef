//! The gateway's migration hold, against a real etcd and the real gateway binary, with
//! stub datanodes in this process (a stub answers every data request, records the route
//! epoch it came with, and holds the requests a test says to until it lets them go).
//!
//! What the control plane relies on: the acknowledgement (`/nimbus/holds/{db}/{gateway}`)
//! appears only once no request of the database is in flight, names the hold it
//! acknowledges, and the gateway's lease keeps being renewed meanwhile; held requests go
//! to the route written after the hold, target or source, with its epoch.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::IntoResponse;
use etcd_client::Client;
use nimbus_api::data::ROUTE_EPOCH_HEADER;
use nimbus_api::etcd::{self as keys, HoldAck, Limits, Route, RouteMember, RouteState, Tier, UserRole};
use nimbus_e2e::etcd::EtcdCluster;
use nimbus_e2e::gateway::{Control, GatewayProc};
use nimbus_e2e::poll;
use nimbus_e2e::secret::TestSecret;
use serde_json::{Value, json};
use tokio::sync::watch;

const GW: &str = "gw1";

/// A stub datanode: answers 200 to every data request, after `delay_ms`; a request for a
/// document whose id starts with `slow` waits until [`Stub::let_go`].
struct Stub {
    addr: String,
    seen: Arc<Mutex<Vec<(String, u64)>>>,
    delay_ms: Arc<AtomicU64>,
    max_concurrent: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stub {
    async fn start() -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let concurrent = Arc::new(AtomicUsize::new(0));
        let max_concurrent = Arc::new(AtomicUsize::new(0));
        let (gate, open) = watch::channel(false);
        let handler = {
            let (seen, delay_ms, max_concurrent) = (seen.clone(), delay_ms.clone(), max_concurrent.clone());
            move |method: Method, uri: Uri, headers: HeaderMap| {
                let (seen, delay_ms, concurrent, max_concurrent, mut open) =
                    (seen.clone(), delay_ms.clone(), concurrent.clone(), max_concurrent.clone(), open.clone());
                async move {
                    let now = concurrent.fetch_add(1, Ordering::SeqCst) + 1;
                    max_concurrent.fetch_max(now, Ordering::SeqCst);
                    let epoch = headers
                        .get(ROUTE_EPOCH_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    let path = uri.path().to_owned();
                    seen.lock().unwrap().push((format!("{method} {path}"), epoch));
                    if path.contains("/documents/slow") {
                        let _ = open.wait_for(|o| *o).await;
                    }
                    tokio::time::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst))).await;
                    concurrent.fetch_sub(1, Ordering::SeqCst);
                    axum::Json(json!({"document": {"_id": path}})).into_response()
                }
            }
        };
        let app = Router::new().fallback(handler);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Stub { addr: format!("http://{addr}"), seen, delay_ms, max_concurrent, gate, task }
    }

    /// Lets the `slow` requests go.
    fn let_go(&self) {
        self.gate.send_replace(true);
    }

    /// The requests seen (`METHOD path`) that contain `part`, with their route epochs.
    fn seen(&self, part: &str) -> Vec<(String, u64)> {
        self.seen.lock().unwrap().iter().filter(|(p, _)| p.contains(part)).cloned().collect()
    }
}

/// etcd, a gateway, database `shop` (and `blog`) routed to a source stub, and a target stub.
struct Env {
    etcd_cluster: EtcdCluster,
    gw: GatewayProc,
    etcd: Client,
    source: Stub,
    target: Stub,
    token: String,
    blog_token: String,
    http: reqwest::Client,
    _secret: TestSecret,
    _dir: tempfile::TempDir,
}

fn route(stub: &Stub, replica_set: &str, epoch: u64, state: RouteState, hold_deadline_ms: Option<u64>) -> Route {
    Route {
        replica_set: replica_set.into(),
        members: vec![RouteMember { id: 1, data_addr: stub.addr.clone(), zone: "a".into() }],
        epoch,
        state,
        hold_deadline_ms,
        // As the control plane writes it: the hold's length with its deadline.
        hold_timeout_ms: hold_deadline_ms.map(|d| d.saturating_sub(now_ms())),
    }
}

fn now_ms() -> u64 {
    nimbus_gateway::state::now_ms()
}

async fn env(gateway_args: &[&str], limits: Option<Limits>) -> Env {
    let dir = tempfile::Builder::new().prefix("nimbus-hold-").tempdir().unwrap();
    let etcd_cluster = EtcdCluster::start(1, dir.path()).await.unwrap();
    let secret = TestSecret::new().unwrap();
    let (source, target) = (Stub::start().await, Stub::start().await);
    let mut control = Control::connect(&etcd_cluster.client_urls).await.unwrap();
    let token = control.user("shop", "app", UserRole::ReadWrite).await.unwrap();
    let blog_token = control.user("blog", "app", UserRole::ReadWrite).await.unwrap();
    if let Some(l) = limits {
        control.limits("shop", &l).await.unwrap();
    }
    let mut e = Env {
        gw: GatewayProc::start(GW, &etcd_cluster.client_urls, &secret.file, gateway_args).await.unwrap(),
        etcd_cluster,
        etcd: control.etcd,
        source,
        target,
        token,
        blog_token,
        http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap(),
        _secret: secret,
        _dir: dir,
    };
    e.put_route("blog", &route(&e.source, "rs-src", 1, RouteState::Serving, None)).await;
    e.put_route("shop", &route(&e.source, "rs-src", 1, RouteState::Serving, None)).await;
    poll("the gateway to serve shop", Duration::from_secs(15), || async {
        (e.get("shop", "warmup").await.0 == 200).then_some(())
    })
    .await
    .unwrap();
    e
}

impl Env {
    async fn put_route(&mut self, db: &str, r: &Route) {
        self.etcd.put(keys::route_key(db), serde_json::to_vec(r).unwrap(), None).await.unwrap();
    }

    /// Puts `shop`'s route `Holding` and waits until the gateway holds it: a request sent
    /// before its watch delivered the change would go to the source (on a busy machine the
    /// watch can lag behind a request sent right after the write).
    async fn hold(&mut self, epoch: u64, deadline_ms: u64) -> Route {
        let r = route(&self.source, "rs-src", epoch, RouteState::Holding, Some(deadline_ms));
        self.put_route("shop", &r).await;
        poll("the gateway to see the hold", Duration::from_secs(10), || async {
            (self.metric("nimbus_gateway_routes_holding").await >= 1.0).then_some(())
        })
        .await
        .unwrap();
        r
    }

    async fn call(&self, db: &str, method: reqwest::Method, rest: &str, body: Option<Value>) -> (u16, Value) {
        let token = if db == "shop" { &self.token } else { &self.blog_token };
        let mut req = self
            .http
            .request(method, format!("{}/v1/databases/{db}/collections/c/{rest}", self.gw.public))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, db: &str, id: &str) -> (u16, Value) {
        self.call(db, reqwest::Method::GET, &format!("documents/{id}"), None).await
    }

    /// A request for `shop` in the background: a read of document `id`, or an insert.
    fn spawn(&self, id: &str, write: bool) -> tokio::task::JoinHandle<(u16, Value)> {
        let (http, url, token) = (self.http.clone(), self.gw.public.clone(), self.token.clone());
        let id = id.to_owned();
        tokio::spawn(async move {
            let req = if write {
                http.post(format!("{url}/v1/databases/shop/collections/c/documents"))
                    .header("idempotency-key", format!("k-{id}"))
                    .json(&json!({"documents": [{"_id": id}]}))
            } else {
                http.get(format!("{url}/v1/databases/shop/collections/c/documents/{id}"))
            };
            let resp = req.bearer_auth(token).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        })
    }

    /// A series of the gateway's public `/metrics` (0 when it has none yet).
    async fn metric(&self, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.gw.public)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    async fn wait_held(&self, n: f64) {
        poll(&format!("{n} requests held"), Duration::from_secs(10), || async {
            (self.metric("nimbus_gateway_held_requests").await == n).then_some(())
        })
        .await
        .unwrap();
    }

    async fn ack(&self) -> Option<HoldAck> {
        let resp = self.etcd.kv_client().get(keys::hold_key("shop", GW), None).await.unwrap();
        resp.kvs().first().map(|kv| serde_json::from_slice(kv.value()).expect("the acknowledgement is a HoldAck"))
    }

    async fn wait_ack_of(&self, r: &Route) -> HoldAck {
        poll("the acknowledgement of the hold", Duration::from_secs(10), || async {
            self.ack().await.filter(|a| a.acknowledges(r))
        })
        .await
        .unwrap()
    }

    async fn registered(&self) -> bool {
        let resp = self.etcd.kv_client().get(keys::gateway_key(GW), None).await.unwrap();
        !resp.kvs().is_empty()
    }

    async fn ready(&self) -> bool {
        let r = self.http.get(format!("{}/readyz", self.gw.public)).send().await;
        r.is_ok_and(|r| r.status() == 200)
    }
}

/// The request the stub is slow on reached it (it is in flight at the datanode).
async fn in_flight_at(stub: &Stub, id: &str) {
    poll("the slow request to reach the datanode", Duration::from_secs(10), || async {
        (!stub.seen(&format!("/documents/{id}")).is_empty()).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_is_acknowledged_once_the_request_in_flight_ends_and_names_its_hold() {
    let mut e = env(&["--attempt-timeout-ms", "20000", "--deadline-ms", "30000"], None).await;
    let slow = e.spawn("slow-1", false);
    in_flight_at(&e.source, "slow-1").await;

    let first = e.hold(1, now_ms() + 30_000).await;
    let held = e.spawn("held-1", true);
    // The gateway has seen the hold: it holds a new request.
    e.wait_held(1.0).await;
    for _ in 0..10 {
        assert!(e.ack().await.is_none(), "acknowledged with a request in flight");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    e.source.let_go();
    assert_eq!(slow.await.unwrap().0, 200);
    let ack = e.wait_ack_of(&first).await;
    assert_eq!((ack.epoch, ack.hold_deadline_ms), (1, first.hold_deadline_ms));
    assert!(e.source.seen("POST").is_empty(), "the held write was sent");

    // Aborted before the fence: the source again, same epoch. The held write goes there,
    // and the acknowledgement of the hold that ended is withdrawn.
    e.put_route("shop", &route(&e.source, "rs-src", 1, RouteState::Serving, None)).await;
    assert_eq!(held.await.unwrap().0, 200);
    assert_eq!(e.source.seen("POST").iter().map(|(_, epoch)| *epoch).collect::<Vec<_>>(), vec![1]);
    poll("the acknowledgement to be withdrawn", Duration::from_secs(10), || async {
        e.ack().await.is_none().then_some(())
    })
    .await
    .unwrap();

    // Held again at the same epoch (the retry): the old acknowledgement would not pass for
    // this hold, and the new one names it.
    assert!(!ack.acknowledges(&Route { hold_deadline_ms: Some(now_ms() + 30_000), ..first.clone() }));
    let second = e.hold(1, now_ms() + 30_000).await;
    let ack = e.wait_ack_of(&second).await;
    assert_eq!(ack.hold_deadline_ms, second.hold_deadline_ms);
    assert!(!ack.acknowledges(&first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_wait_then_go_to_the_target_with_the_new_epoch() {
    let mut e = env(&[], None).await;
    let holding = e.hold(1, now_ms() + 30_000).await;
    let requests: Vec<_> = (0..6).map(|i| e.spawn(&format!("h{i}"), i % 2 == 0)).collect();
    e.wait_held(6.0).await;
    e.wait_ack_of(&holding).await;
    assert!(e.source.seen("/h").is_empty() && e.target.seen("/h").is_empty(), "a held request was sent");
    let before = e.source.seen("").len();

    e.put_route("shop", &route(&e.target, "rs-dst", 2, RouteState::Serving, None)).await;
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let at_target = e.target.seen("");
    assert_eq!(at_target.len(), 6, "{at_target:?}");
    assert!(at_target.iter().all(|(_, epoch)| *epoch == 2), "{at_target:?}");
    assert_eq!(e.source.seen("").len(), before, "a held request went to the source");
    e.wait_held(0.0).await;
    assert!(e.metric("nimbus_gateway_hold_seconds_count").await >= 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_go_back_to_the_source_when_the_migration_aborts() {
    let mut e = env(&[], None).await;
    let holding = e.hold(1, now_ms() + 30_000).await;
    let requests: Vec<_> = (0..3).map(|i| e.spawn(&format!("h{i}"), i == 0)).collect();
    e.wait_held(3.0).await;
    e.wait_ack_of(&holding).await;
    // Aborted after the fence: the source again, at the fence's epoch.
    e.put_route("shop", &route(&e.source, "rs-src", 2, RouteState::Serving, None)).await;
    for r in requests {
        assert_eq!(r.await.unwrap().0, 200);
    }
    let held: Vec<_> = e.source.seen("").into_iter().filter(|(_, epoch)| *epoch == 2).collect();
    assert_eq!(held.len(), 3, "{:?}", e.source.seen(""));
    assert!(e.target.seen("").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_past_its_deadline_and_one_over_a_full_queue_get_503() {
    let mut e = env(&["--deadline-ms", "1500", "--hold-queue-max", "2"], None).await;
    e.hold(1, now_ms() + 30_000).await;
    let a = e.spawn("a", true);
    let b = e.spawn("b", false);
    e.wait_held(2.0).await;

    // The queue is full: refused at once, as a raw request sees it.
    let (status, body) = e.get("shop", "c").await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "Unavailable", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("holds 2 of its requests"), "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");

    // The held ones: 503 at their deadline, safe to retry (the write was never sent).
    for r in [a, b] {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "Unavailable", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("nothing was sent") && message.contains("safe to retry"), "{message}");
    }
    assert!(e.source.seen("POST").is_empty() && e.source.seen("/documents/b").is_empty());
    assert_eq!(e.metric("nimbus_gateway_hold_timeouts_total").await, 2.0);
    assert_eq!(e.metric("nimbus_gateway_hold_queue_full_total").await, 1.0);
    e.wait_held(0.0).await;
}

/// An acknowledgement that waits longer than the lease's TTL (a request in flight for 3 s,
/// TTL 1 s) must not hold up the lease's renewal: the gateway stays registered and keeps
/// serving its other tenants. (When the acknowledgement ran in the session loop, the lease
/// lapsed: the registration vanished and every tenant got 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_an_acknowledgement_waits() {
    let mut e = env(&["--lease-ttl-secs", "1", "--attempt-timeout-ms", "20000", "--deadline-ms", "30000"], None).await;
    let slow = e.spawn("slow-1", false);
    in_flight_at(&e.source, "slow-1").await;
    let holding = e.hold(1, now_ms() + 60_000).await;
    let held = e.spawn("held-1", false);

    // Three TTLs from the hold on (the gateway sees it within milliseconds).
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert!(e.registered().await, "the gateway's lease lapsed while a hold was pending");
        assert!(e.ready().await, "the gateway stopped serving while a hold was pending");
        assert_eq!(e.get("blog", "x").await.0, 200, "another tenant was not served");
        assert!(e.ack().await.is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(e.metric("nimbus_gateway_held_requests").await, 1.0);
    e.source.let_go();
    assert_eq!(slow.await.unwrap().0, 200);
    e.wait_ack_of(&holding).await;
    e.put_route("shop", &route(&e.target, "rs-dst", 2, RouteState::Serving, None)).await;
    assert_eq!(held.await.unwrap().0, 200);
    assert_eq!(
        e.target.seen("/documents/held-1"),
        vec![("GET /v1/databases/shop/collections/c/documents/held-1".into(), 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_take_no_in_flight_slot_and_all_complete_within_the_limit() {
    let limits = Limits { tier: Tier::Standard, qps: 1_000, burst: 1_000, max_connections: 100, max_in_flight: 2 };
    let mut e = env(&[], Some(limits)).await;
    e.target.delay_ms.store(100, Ordering::SeqCst);
    let holding = e.hold(1, now_ms() + 30_000).await;
    // Four times the tenant's in-flight limit, all held at once.
    let requests: Vec<_> = (0..8).map(|i| e.spawn(&format!("h{i}"), i % 2 == 1)).collect();
    e.wait_held(8.0).await;
    e.wait_ack_of(&holding).await;

    e.put_route("shop", &route(&e.target, "rs-dst", 2, RouteState::Serving, None)).await;
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(e.target.seen("").len(), 8);
    // Released together, they still reached the datanode at most two at a time.
    let most = e.target.max_concurrent.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "{most} at once");
}

/// A gateway cut off from etcd cannot know whether the hold ended in a switch: when the
/// hold's deadline passes, it must not send the held request to the source it can no
/// longer verify, and answers 503 at the request's deadline instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_etcd_never_sends_a_held_request() {
    let mut e = env(&["--lease-ttl-secs", "1", "--deadline-ms", "6000"], None).await;
    let holding = e.hold(1, now_ms() + 3_000).await;
    let held = e.spawn("held-1", true);
    e.wait_held(1.0).await;
    e.wait_ack_of(&holding).await;
    e.etcd_cluster.stop().await;
    // The lease (1 s) lapses before the hold's deadline: the gateway is then not serving.
    assert!(now_ms() + 1_000 < holding.hold_deadline_ms.unwrap(), "the test took too long to stop etcd");

    let (status, body) = held.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not in sync"), "{body}");
    assert!(e.source.seen("POST").is_empty(), "{:?}", e.source.seen(""));
}
