//! The gateway bounded under abuse: a tenant flooding 16 MiB bodies meets its memory
//! budget while the others keep serving; connections are bounded before any request;
//! idle, slow-header and slow-body clients are cut off, over HTTP/1.1 and HTTP/2; a reused
//! idempotency key is refused; a keyless write of unknown outcome hands back the key the
//! gateway made, and a retry with it applies the write once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nimbus_api::etcd::{Limits, Tier, UserRole};
use nimbus_e2e::gateway::{GatewayProc, Stack};
use nimbus_e2e::raw::{self, addr_of};
use nimbus_e2e::{DataClient, poll};
use reqwest::Method;
use serde_json::{Value, json};

struct Env {
    stack: Stack,
    gw: GatewayProc,
    tokens: Vec<String>,
}

/// A replica set of `datanodes`, databases `dbs` (a read-write token each, limits far
/// above the test's load) and a gateway started with `args`, serving.
async fn env(datanodes: usize, dbs: &[&str], args: &[&str]) -> Env {
    let mut stack = Stack::start(datanodes, dbs).await.unwrap();
    let mut tokens = Vec::new();
    for db in dbs {
        tokens.push(stack.control.user(db, "app", UserRole::ReadWrite).await.unwrap());
        let unlimited = Limits {
            tier: Tier::Dedicated,
            qps: 100_000,
            burst: 100_000,
            max_connections: 10_000,
            max_in_flight: 10_000,
        };
        stack.control.limits(db, &unlimited).await.unwrap();
    }
    let gw = GatewayProc::start("gw-abuse", &stack.etcd.client_urls, &stack.cluster.secret_file, args).await.unwrap();
    let client = DataClient::new();
    let url = format!("{}/v1/databases/{}/collections", gw.public, dbs[0]);
    let auth = format!("Bearer {}", tokens[0]);
    poll("the gateway to serve", Duration::from_secs(15), || async {
        (client.call(Method::GET, &url, None, &[("authorization", &auth)]).await.0 == 200).then_some(())
    })
    .await
    .unwrap();
    Env { stack, gw, tokens }
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

const MIB: usize = 1024 * 1024;

/// Sends one 16 MiB `find` body slowly (1 MiB every 50 ms); returns the status.
fn slow_big_body(addr: &str, token: &str) -> u16 {
    let filler = "x".repeat(16 * MIB);
    let body = format!(r#"{{"filter": {{"s": "{filler}"}}}}"#);
    let head = format!(
        "POST /v1/databases/flood/collections/c/find HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut writer = s.try_clone().unwrap();
    // The body goes out slowly while the answer is read: a refused request is answered
    // (and its connection closed) before its body is through.
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        for chunk in body.as_bytes().chunks(MIB) {
            if writer.write_all(chunk).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    while let Ok(n) = s.read(&mut piece) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&piece[..n]);
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = sending.join();
    String::from_utf8_lossy(&buf).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_big_bodies_meets_its_budget_and_the_others_keep_serving() {
    let budget = 40 * MIB;
    let e = env(
        1,
        &["flood", "calm"],
        &["--memory-budget-bytes", &(96 * MIB).to_string(), "--tenant-memory-budget-bytes", &budget.to_string()],
    )
    .await;
    let pid = e.gw.pid().unwrap();
    let baseline = peak_rss(pid);
    let addr = addr_of(&e.gw.public);
    // 24 bodies of 16 MiB at once: 384 MiB if the gateway held them all.
    let flood: Vec<_> = (0..24)
        .map(|_| {
            let (addr, tok) = (addr.clone(), e.tokens[0].clone());
            std::thread::spawn(move || slow_big_body(&addr, &tok))
        })
        .collect();
    // Meanwhile the calm tenant is served, every time.
    let client = DataClient::new();
    let calm = format!("{}/v1/databases/calm/collections/c/find", e.gw.public);
    let auth = format!("Bearer {}", e.tokens[1]);
    let started = Instant::now();
    let mut calm_ok = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let (st, body) =
            client.call(Method::POST, &calm, Some(&json!({"filter": {}})), &[("authorization", &auth)]).await;
        assert_eq!(st, 200, "the calm tenant was refused during the flood: {body}");
        calm_ok += 1;
    }
    let statuses: Vec<u16> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let served = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(served + refused, statuses.len(), "every flood request is served or refused with 429: {statuses:?}");
    assert!(served >= 1 && refused >= 16, "{statuses:?}");
    assert!(calm_ok > 10, "{calm_ok} calm requests");
    // The gateway held at most its budget: its memory grew by far less than the flood.
    let grown = peak_rss(pid).saturating_sub(baseline);
    assert!(grown < (budget + 64 * MIB) as u64, "the gateway grew by {} MiB", grown / MIB as u64);
    // And it still serves the flooding tenant once the flood is over.
    let (st, _) = client
        .call(
            Method::POST,
            &format!("{}/v1/databases/flood/collections/c/find", e.gw.public),
            Some(&json!({})),
            &[("authorization", &format!("Bearer {}", e.tokens[0]))],
        )
        .await;
    assert_eq!(st, 200);
    drop(e.stack);
}

/// The source address of the per-address bound's test: a loopback address no other
/// client of the test uses.
const OWN_ADDRESS: &str = "127.0.0.2";

/// A blocking connection to `addr` from `from` (any port).
async fn connect_from(addr: &str, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Whether the server closes `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_per_address_and_in_all_before_any_request() {
    let e = env(1, &["a"], &["--max-connections-per-ip", "8", "--max-connections", "1000"]).await;
    let addr = addr_of(&e.gw.public);
    // Eight idle connections from one address: the ninth is closed at once.
    // From an address of its own (127.0.0.2): the harness's clients keep pooled
    // connections from 127.0.0.1, which count against that address's eight.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(&addr, OWN_ADDRESS).await);
    }
    // The eight are counted once the gateway accepted them, which a finished TCP handshake
    // does not say (the kernel completes it before `accept`): each is answered a request
    // first, so the ninth is the ninth the gateway counts.
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "held connection {i} not served");
    }
    let mut ninth = connect_from(&addr, OWN_ADDRESS).await;
    assert!(closed_within(&mut ninth, Duration::from_secs(2)), "a ninth connection from one address stayed open");
    // One closes: a new one is served.
    drop(held.pop());
    poll("a freed slot", Duration::from_secs(5), || async {
        let mut s = connect_from(&addr, OWN_ADDRESS).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200").then_some(())
    })
    .await
    .unwrap();
    drop(held);

    // In all: a gateway taking five connections.
    let secret = &e.stack.cluster.secret_file;
    let small =
        GatewayProc::start("gw-five", &e.stack.etcd.client_urls, secret, &["--max-connections", "5"]).await.unwrap();
    let addr = addr_of(&small.public);
    let _five: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let mut sixth = TcpStream::connect(&addr).unwrap();
    assert!(closed_within(&mut sixth, Duration::from_secs(2)), "a sixth connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_header_and_slow_body_clients_are_cut_off() {
    let e = env(
        1,
        &["a"],
        &[
            "--idle-timeout-ms",
            "600",
            "--header-timeout-ms",
            "600",
            "--body-timeout-ms",
            "600",
            "--max-header-bytes",
            "8192",
        ],
    )
    .await;
    let addr = addr_of(&e.gw.public);
    // An idle keep-alive connection, after one request.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(5)), "an idle keep-alive connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(500), "closed before it was idle: {:?}", started.elapsed());
    // Headers that never end.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(5)), "a slow-header connection stayed open");
    // A body that stops coming: 400 within the body timeout, and the connection closed.
    let auth = format!("Authorization: Bearer {}\r\n", e.tokens[0]);
    let mut stalled = TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /v1/databases/a/collections/c/find HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"filter\""
    );
    stalled.write_all(head.as_bytes()).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = stalled.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("did not arrive in time"), "{text}");
    // A head over the limit: refused, never buffered without bound.
    let big = "x".repeat(64 * 1024);
    let a = raw::send(&addr, "GET", b"/healthz", &[("X-Big", &big)], None);
    assert!(a.status == 431 || a.status == 0, "{} {}", a.status, a.head);

    // A real HTTP/2 client is served.
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = client.get(format!("{}/healthz", e.gw.public)).send().await.unwrap();
    assert_eq!((r.version(), r.status().as_u16()), (reqwest::Version::HTTP_2, 200));
}

/// A raw HTTP/2 connection: the preface and an empty SETTINGS sent, the server's SETTINGS
/// read and acknowledged.
struct H2 {
    s: TcpStream,
    settings: std::collections::BTreeMap<u16, u32>,
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header as HPACK's "literal without indexing, new name" (no Huffman; short strings).
fn hpack(name: &str, value: &str) -> Vec<u8> {
    assert!(name.len() < 127 && value.len() < 127);
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
    b
}

impl H2 {
    fn connect(addr: &str) -> H2 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        s.write_all(&h2_frame(0x4, 0, 0, &[])).unwrap();
        let mut h = H2 { s, settings: Default::default() };
        let (kind, _, _, payload) = h.read_frame().expect("the server's SETTINGS");
        assert_eq!(kind, 0x4, "the first frame is SETTINGS");
        h.settings = payload
            .chunks(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
            .collect();
        h.s.write_all(&h2_frame(0x4, 0x1, 0, &[])).unwrap();
        h
    }

    /// The next frame (kind, flags, stream, payload); `None` once the server closed.
    /// Panics if nothing comes within the read timeout (a timeout is not a close).
    fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        self.read_exact(&mut head)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload)?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some((head[3], head[4], stream, payload))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Option<()> {
        match self.s.read_exact(buf) {
            Ok(()) => Some(()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the server neither answered nor closed the connection in time")
            }
            Err(_) => None,
        }
    }

    /// Request headers on `stream`: `end_headers` and `end_stream` as asked.
    fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end_headers: bool, end_stream: bool) {
        let block: Vec<u8> = fields.iter().flat_map(|(n, v)| hpack(n, v)).collect();
        let flags = (if end_headers { 0x4 } else { 0 }) | (if end_stream { 0x1 } else { 0 });
        self.s.write_all(&h2_frame(0x1, flags, stream, &block)).unwrap();
    }

    /// The frames (kind, stream) the server sends until it closes the connection, if it
    /// does within `within`.
    fn frames_until_closed(&mut self, within: Duration) -> Option<Vec<(u8, u32)>> {
        self.s.set_read_timeout(Some(within)).unwrap();
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        let mut head = [0u8; 9];
        while Instant::now() < deadline {
            match self.s.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None;
                }
                Err(_) => return Some(seen),
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if self.s.read_exact(&mut payload).is_err() {
                return Some(seen);
            }
            seen.push((head[3], u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff));
        }
        None
    }

    /// Whether the server closes the connection (GOAWAY, then EOF) within `within`.
    fn closed_within(&mut self, within: Duration) -> bool {
        self.s.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + within;
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) if Instant::now() < deadline => continue,
                Ok(_) => return false,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_meet_the_same_limits_and_timeouts() {
    // Pings every 10 s: what closes a connection below is the idle and body timeouts.
    let mut e = env(
        1,
        &["a"],
        &[
            "--idle-timeout-ms",
            "600",
            "--body-timeout-ms",
            "600",
            "--max-header-bytes",
            "8192",
            "--h2-max-streams",
            "16",
            "--queue-wait-ms",
            "3000",
        ],
    )
    .await;
    let addr = addr_of(&e.gw.public);
    // The limits are announced; a connection that never sends a request is closed.
    let mut idle = H2::connect(&addr);
    assert_eq!(idle.settings.get(&0x3), Some(&16), "SETTINGS_MAX_CONCURRENT_STREAMS: {:?}", idle.settings);
    assert_eq!(idle.settings.get(&0x6), Some(&8192), "SETTINGS_MAX_HEADER_LIST_SIZE: {:?}", idle.settings);
    assert!(idle.closed_within(Duration::from_secs(5)), "an idle HTTP/2 connection stayed open");
    // Headers that never end (no END_HEADERS, no CONTINUATION): no request ever starts,
    // and the connection is closed as idle.
    let mut slow = H2::connect(&addr);
    let started = Instant::now();
    slow.headers(1, &[(":method", "GET"), (":scheme", "http")], false, true);
    assert!(slow.closed_within(Duration::from_secs(5)), "a never-ending header block kept its connection");
    assert!(started.elapsed() >= Duration::from_millis(500), "closed at once, not as idle: {:?}", started.elapsed());
    // A body that never comes: 400 on the stream once the body timeout passes.
    let auth = format!("Bearer {}", e.tokens[0]);
    let post = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "nimbus"),
        (":path", "/v1/databases/a/collections/c/find"),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("content-length", "100"),
    ];
    let mut stalled = H2::connect(&addr);
    let started = Instant::now();
    stalled.headers(1, &post, true, false);
    let answer = loop {
        let (kind, _, stream, payload) = stalled.read_frame().expect("an answer before the connection closed");
        if kind == 0x1 && stream == 1 {
            break payload;
        }
    };
    // HPACK's static entry 12 is `:status 400`.
    assert_eq!(answer.first(), Some(&0x8c), "the stalled body's answer: {answer:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "answered before the body timeout: {:?}",
        started.elapsed()
    );
    // A request reset by the client while it waits (here in its database's rate queue: hyper
    // drops its future) leaves nothing in flight: the connection is idle, and closed, as if
    // the request never was.
    let slow = Limits { tier: Tier::Free, qps: 1, burst: 1, max_connections: 1000, max_in_flight: 1000 };
    e.stack.control.limits("a", &slow).await.unwrap();
    let client = DataClient::new();
    let url = format!("{}/v1/databases/a/collections", e.gw.public);
    // Requests once a second, and the bucket empty: a request waits for its slot.
    poll("the rate limit to apply", Duration::from_secs(15), || async {
        let started = Instant::now();
        client.call(Method::GET, &url, None, &[("authorization", &auth)]).await;
        (started.elapsed() > Duration::from_millis(400)).then_some(())
    })
    .await
    .unwrap();
    let mut reset = H2::connect(&addr);
    let get = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "nimbus"),
        (":path", "/v1/databases/a/collections"),
        ("authorization", auth.as_str()),
    ];
    reset.headers(1, &get, true, true);
    reset.s.write_all(&h2_frame(0x3, 0, 1, &0x8u32.to_be_bytes())).unwrap();
    let frames = reset.frames_until_closed(Duration::from_secs(5)).expect("a reset request kept its connection busy");
    // It was still waiting when reset: no answer ever came on its stream.
    assert!(!frames.iter().any(|(kind, stream)| *kind == 0x1 && *stream == 1), "answered before the reset: {frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_one_byte_chunks_arrives_whole_and_costs_what_it_holds() {
    let e = env(1, &["a"], &[]).await;
    let pid = e.gw.pid().unwrap();
    let baseline = peak_rss(pid);
    // A 1 MiB document sent as a million one-byte chunks (HTTP/1.1 chunked encoding).
    let body = format!(r#"{{"documents": [{{"_id": "chunky", "s": "{}"}}]}}"#, "x".repeat(MIB));
    let mut wire = format!(
        "POST /v1/databases/a/collections/c/documents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        e.tokens[0]
    )
    .into_bytes();
    for b in body.bytes() {
        wire.extend_from_slice(b"1\r\n");
        wire.push(b);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let addr = addr_of(&e.gw.public);
    let a = tokio::task::spawn_blocking(move || raw::send_bytes(&addr, &wire)).await.unwrap();
    assert_eq!(a.status, 201, "{}", a.text());
    let (st, doc) = DataClient::new()
        .call(
            Method::GET,
            &format!("{}/v1/databases/a/collections/c/documents/chunky", e.gw.public),
            None,
            &[("authorization", &format!("Bearer {}", e.tokens[0]))],
        )
        .await;
    assert_eq!((st, doc["s"].as_str().map(str::len)), (200, Some(MIB)));
    // A million frames held as sixteen 64 KiB blocks: the gateway grew by megabytes, not
    // by a list entry and a pinned read buffer per byte (hundreds of megabytes).
    let grown = peak_rss(pid).saturating_sub(baseline);
    assert!(grown < (16 * MIB) as u64, "the gateway grew by {} MiB", grown / MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_request_is_refused() {
    let e = env(1, &["a"], &[]).await;
    let client = DataClient::new();
    let auth = format!("Bearer {}", e.tokens[0]);
    let docs = format!("{}/v1/databases/a/collections/c/documents", e.gw.public);
    let call = |url: String, body: Value, key: &'static str| {
        let (client, auth) = (client.clone(), auth.clone());
        async move {
            client.call(Method::POST, &url, Some(&body), &[("authorization", &auth), ("idempotency-key", key)]).await
        }
    };
    let first = call(docs.clone(), json!({"documents": [{"_id": 1}]}), "k1").await;
    assert_eq!(first.0, 201);
    // The same request again: the first answer, not applied twice.
    assert_eq!(call(docs.clone(), json!({"documents": [{"_id": 1}]}), "k1").await, first);
    // Another request with the key: refused, naming the problem, and nothing applied.
    let (st, body) = call(docs.clone(), json!({"documents": [{"_id": 2}]}), "k1").await;
    assert_eq!((st, body["error"]["code"].as_str()), (422, Some("IdempotencyKeyReused")), "{body}");
    let update = format!("{}/v1/databases/a/collections/other/update", e.gw.public);
    let (st, _) = call(update, json!({"filter": {}, "update": {"$set": {"x": 1}}}), "k1").await;
    assert_eq!(st, 422);
    let (_, count) = client
        .call(
            Method::POST,
            &format!("{}/v1/databases/a/collections/c/count", e.gw.public),
            Some(&json!({})),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(count["count"], 1, "{count}");
}

fn signal(pid: u32, sig: &str) {
    assert!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_write_of_unknown_outcome_hands_back_its_key_and_a_retry_applies_it_once() {
    // The gateway's deadline well past the leader's quorum lease (twice the 1 s election
    // timeout), so the leader's own 503 is what comes back even on a busy machine.
    let e = env(3, &["a"], &["--deadline-ms", "5000"]).await;
    let c = &e.stack.cluster;
    let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();
    let followers: Vec<u32> = (0..3).filter(|i| *i != leader).map(|i| c.nodes[i].pid().unwrap()).collect();
    // Both followers stop answering (frozen, not dead): the leader cannot commit.
    for pid in &followers {
        signal(*pid, "-STOP");
    }
    let client = DataClient::new();
    let auth = format!("Bearer {}", e.tokens[0]);
    let docs = format!("{}/v1/databases/a/collections/c/documents", e.gw.public);
    let resp = client
        .http
        .post(&docs)
        .header("authorization", &auth)
        .json(&json!({"documents": [{"_id": "maybe"}]}))
        .send()
        .await
        .unwrap();
    for pid in &followers {
        signal(*pid, "-CONT");
    }
    assert_eq!(resp.status().as_u16(), 503);
    let key = resp.headers().get("idempotency-key").expect("the key the gateway made").to_str().unwrap().to_owned();
    assert!(key.starts_with("gw-"), "{key}");
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("outcome is unknown") && message.contains("Idempotency-Key"), "{message}");
    // The retry with the key the gateway handed back applies the write at most once.
    let retried = poll("the retry to succeed", Duration::from_secs(20), || async {
        let (st, body) = client
            .call(
                Method::POST,
                &docs,
                Some(&json!({"documents": [{"_id": "maybe"}]})),
                &[("authorization", &auth), ("idempotency-key", &key)],
            )
            .await;
        (st == 201).then_some(body)
    })
    .await
    .unwrap();
    assert_eq!(retried["insertedIds"], json!(["maybe"]));
    let (_, count) = client
        .call(
            Method::POST,
            &format!("{}/v1/databases/a/collections/c/count", e.gw.public),
            Some(&json!({})),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(count["count"], 1);
}
