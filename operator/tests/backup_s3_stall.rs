//! A stalled S3 response body: a raw TCP server here (127.0.0.1, port 0) answers a GET's
//! head and the first bytes of its body, then sends nothing more while keeping the
//! connection open. The read fails within the S3 client's read timeout saying why, rather
//! than hanging the backup or restore task; through the operator's own configuration
//! (`BackupStorage`, `object_store`'s retries) the read resumes where it stalled.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nimbus_operator::controlplane::backup::s3_client::HyperConnector;
use nimbus_operator::controlplane::backup::{BackupStorage, S3Credentials, S3Options};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const BODY_LEN: usize = 1000;
/// What the server sends of the body before it stalls.
const SENT_BEFORE_STALL: usize = 10;
const READ_TIMEOUT: Duration = Duration::from_millis(300);
/// Far above the read timeout, far below forever: a read still waiting then hung.
const HUNG: Duration = Duration::from_secs(20);

fn body() -> Vec<u8> {
    (0..BODY_LEN).map(|i| (i % 251) as u8).collect()
}

/// The server: a GET without `Range` gets the whole head and [`SENT_BEFORE_STALL`] bytes,
/// then nothing (the connection stays open until the server is dropped); a GET with
/// `Range: bytes=N-` gets the rest at once. Counts the GETs. Every connection's task ends
/// with the server (its `JoinSet` aborts them when dropped).
struct StallingServer {
    endpoint: String,
    gets: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

async fn start_server() -> StallingServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let gets = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let counted = gets.clone();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((conn, _)) = listener.accept().await else { return };
            conns.spawn(serve(conn, counted.clone()));
        }
    });
    StallingServer { endpoint, gets, _tasks: tasks }
}

async fn serve(mut conn: TcpStream, gets: Arc<AtomicUsize>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    gets.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let from = head
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.trim().parse::<usize>().ok());
    let body = body();
    let common =
        "ETag: \"v1\"\r\nLast-Modified: Tue, 01 Jul 2025 00:00:00 GMT\r\nContent-Type: application/octet-stream\r\n";
    let (status, extra, bytes) = match from {
        Some(n) => (
            "206 Partial Content",
            format!("Content-Range: bytes {n}-{}/{BODY_LEN}\r\n", BODY_LEN - 1),
            body[n..].to_vec(),
        ),
        None => ("200 OK", String::new(), body.clone()),
    };
    let answer = format!("HTTP/1.1 {status}\r\n{common}{extra}Content-Length: {}\r\n\r\n", bytes.len());
    if conn.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    if from.is_some() {
        let _ = conn.write_all(&bytes).await;
        let _ = conn.flush().await;
        // Stays open (keep-alive) until the client closes it.
        let _ = conn.read(&mut buf).await;
        return;
    }
    let _ = conn.write_all(&bytes[..SENT_BEFORE_STALL]).await;
    let _ = conn.flush().await;
    // The stall: the connection stays open and silent until the client gives up.
    let _ = conn.read(&mut buf).await;
}

#[tokio::test]
async fn a_stalled_s3_response_body_fails_the_read_within_the_read_timeout() {
    let server = start_server().await;
    let store = AmazonS3Builder::new()
        .with_bucket_name("nimbus-backups")
        .with_region("us-east-1")
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_access_key_id("AK")
        .with_secret_access_key("SK")
        .with_retry(RetryConfig { max_retries: 0, ..RetryConfig::default() })
        .with_http_connector(HyperConnector::with_read_timeout(READ_TIMEOUT))
        .build()
        .unwrap();
    let started = Instant::now();
    let read = async { store.get(&Path::from("shop/full.json")).await?.bytes().await };
    let err = tokio::time::timeout(HUNG, read)
        .await
        .unwrap_or_else(|_| panic!("the read of a stalled body still waits after {HUNG:?}"))
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= READ_TIMEOUT, "failed before the read timeout ({took:?}): {err}");
    assert!(took < READ_TIMEOUT * 10, "failed too late ({took:?}): {err}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("no data from the S3 server for 0.3 s"), "{shown}");
    assert_eq!(server.gets.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_operators_s3_store_resumes_a_stalled_read_instead_of_hanging() {
    let server = start_server().await;
    let options = S3Options {
        endpoint: Some(server.endpoint.clone()),
        allow_http: true,
        credentials: S3Credentials::Static {
            access_key_id: "AK".to_string(),
            secret_access_key: "SK".to_string(),
            session_token: None,
        },
        read_timeout: READ_TIMEOUT,
        ..S3Options::default()
    };
    let opened = BackupStorage::parse("s3://nimbus-backups/nimbus", options).unwrap().open().unwrap();
    let store: Arc<dyn ObjectStore> = opened.store;
    let read = async { store.get(&Path::from("nimbus/shop/full.json")).await?.bytes().await };
    let got = tokio::time::timeout(HUNG, read)
        .await
        .unwrap_or_else(|_| panic!("the read of a stalled body still waits after {HUNG:?}"))
        .unwrap();
    assert_eq!(got.as_ref(), body().as_slice());
    assert_eq!(server.gets.load(Ordering::SeqCst), 2, "the stalled GET, then the rest by range");
}
