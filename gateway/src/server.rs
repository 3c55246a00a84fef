//! The listeners. The public one serves the data API of `API.md` section 1 (see
//! `request`), health and tenant-free metrics; the admin one serves the control plane
//! (usage, behind the cluster secret) and the per-tenant metrics.
//!
//! Connections are served by hyper directly, so that every bound applies before a request
//! is authenticated: connections at once (all clients, and per client address), the TLS
//! handshake and the request head within `--header-timeout-ms`, the head's size, HTTP/2's
//! concurrent streams and header list, and an idle connection closed after
//! `--idle-timeout-ms` (HTTP/1.1 keep-alive and HTTP/2 alike: a client that opens a
//! connection, or an HTTP/2 stream, and never completes a request holds it that long at
//! most).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use nimbus_api::{ApiError, ErrorCode};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::body::{Chunks, ChunksBody};
use crate::budget::Reservation;
use crate::limits::TenantLimiter;
use crate::state::{Gateway, now_ms};

/// An [`ApiError`] as an HTTP answer.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.0.to_body())).into_response();
        if self.0.code == ErrorCode::RateLimited {
            resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// An answer body that holds its bytes' memory budget until it has been written.
pub struct HeldBody {
    body: ChunksBody,
    _held: Reservation,
}

impl HeldBody {
    pub fn new(data: &Chunks, held: Reservation) -> HeldBody {
        HeldBody { body: data.body(), _held: held }
    }
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One client connection: the database it is counted against (its first authenticated
/// request's), and whether it is idle.
#[derive(Default)]
pub struct ConnState {
    tenant: Mutex<Option<Arc<TenantLimiter>>>,
    in_flight: AtomicUsize,
    /// When the last request started or ended (ms since the Unix epoch).
    last_activity_ms: AtomicU64,
}

impl ConnState {
    /// Counts this connection against `limiter` on its first request; false when the
    /// database has no connection left.
    pub fn attach(&self, limiter: &Arc<TenantLimiter>) -> bool {
        let mut t = self.tenant.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_some() {
            return true;
        }
        if !limiter.try_connect() {
            return false;
        }
        *t = Some(limiter.clone());
        true
    }

    /// Counts a request in flight until the returned guard is dropped: when its answer is
    /// ready (its writing is then hyper's, and a graceful close lets it finish), or when
    /// the request is abandoned (an HTTP/2 stream reset drops its future).
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| Duration::from_millis(now_ms().saturating_sub(self.last_activity_ms.load(Ordering::Relaxed))))
    }
}

/// A request in flight on a connection.
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if let Some(t) = self.tenant.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.disconnect();
        }
    }
}

/// Connections at once: all clients together and per client address. Checked at accept,
/// before TLS and before any byte of a request is read.
pub struct ConnLimits {
    max: usize,
    per_ip: usize,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A counted connection; dropping it uncounts it.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(max: usize, per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits { max, per_ip, total: AtomicUsize::new(0), by_ip: Mutex::new(HashMap::new()) })
    }

    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = by_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.per_ip || self.total.load(Ordering::Acquire) >= self.max {
            return None;
        }
        by_ip.insert(ip, from_ip + 1);
        self.total.fetch_add(1, Ordering::AcqRel);
        Some(ConnGuard { limits: self.clone(), ip })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut by_ip = self.limits.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a listener serves its connections.
#[derive(Clone)]
pub struct Listening {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub h2_max_streams: u32,
    pub limits: Arc<ConnLimits>,
}

impl Listening {
    pub fn from_config(c: &crate::config::Config, tls: Option<tokio_rustls::TlsAcceptor>) -> Listening {
        Listening {
            tls,
            header_timeout: c.header_timeout(),
            idle_timeout: c.idle_timeout(),
            max_header_bytes: c.max_header_bytes,
            h2_max_streams: c.h2_max_streams,
            limits: ConnLimits::new(c.max_connections, c.max_connections_per_ip),
        }
    }
}

/// The public listener's routes. `serve` hands the data API's requests (`/v1/databases/`) to
/// the pipeline itself, without the router; the route here is the same pipeline, for other
/// servers of this router.
pub fn public_router(gw: Arc<Gateway>, prometheus: PrometheusHandle) -> Router {
    let data = Router::new().route("/v1/databases/{*rest}", any(crate::request::axum_handle)).with_state(gw.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(public_metrics))
        .with_state(App { gw, prometheus })
        .merge(data)
        .fallback(|| async { HttpError(ApiError::not_found("no such endpoint")) })
}

pub fn admin_router(gw: Arc<Gateway>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/v1/admin/usage", get(usage))
        .route_layer(axum::middleware::from_fn_with_state(gw.secret.clone(), nimbus_net::cluster::require))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(admin_metrics))
        .with_state(App { gw, prometheus })
}

#[derive(Clone)]
struct App {
    gw: Arc<Gateway>,
    prometheus: PrometheusHandle,
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Ready while in step with etcd (its routes and users can be trusted).
async fn readyz(State(app): State<App>) -> Response {
    if app.gw.is_serving() {
        axum::Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        HttpError(ApiError::unavailable("not in sync with etcd")).into_response()
    }
}

fn gauges(gw: &Gateway) {
    for (pool, budget) in [("bodies", &gw.memory), ("answers", &gw.answers)] {
        metrics::gauge!("nimbus_gateway_memory_held_bytes", "pool" => pool).set(budget.used() as f64);
        metrics::gauge!("nimbus_gateway_memory_budget_bytes", "pool" => pool).set(budget.total() as f64);
    }
}

/// Metrics with no tenant in them.
async fn public_metrics(State(app): State<App>) -> Response {
    gauges(&app.gw);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.prometheus.render()).into_response()
}

/// The same, and the busiest databases' series.
async fn admin_metrics(State(app): State<App>) -> Response {
    gauges(&app.gw);
    let mut text = app.prometheus.render();
    text.push_str(&app.gw.usage.render_tenants());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn usage(State(app): State<App>) -> Response {
    axum::Json(serde_json::json!({ "databases": app.gw.usage.snapshot() })).into_response()
}

/// Serves `app` on `listener` until the process ends; with `data`, the data API's requests
/// go to its pipeline directly (no router, no boxed request body: the hot path).
pub async fn serve(listener: TcpListener, app: Router, data: Option<Arc<Gateway>>, how: Listening) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(how.header_timeout)
        .max_buf_size(how.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(how.h2_max_streams)
        .max_header_list_size(u32::try_from(how.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(how.header_timeout))
        .keep_alive_timeout(how.header_timeout);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, most likely: give the ones in use a moment.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(guard) = how.limits.try_open(peer.ip()) else {
            metrics::counter!("nimbus_gateway_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, how, builder, data) = (app.clone(), how.clone(), builder.clone(), data.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let conn = Arc::new(ConnState::default());
            conn.last_activity_ms.store(now_ms(), Ordering::Relaxed);
            let state = conn.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let in_flight = state.begin();
                let (app, data, conn) = (app.clone(), data.clone(), state.clone());
                async move {
                    let r = match data {
                        Some(gw) if req.uri().path().starts_with("/v1/databases/") => {
                            crate::request::handle(&gw, Some(&conn), req).await
                        }
                        _ => {
                            req.extensions_mut().insert(conn);
                            app.oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {})
                        }
                    };
                    drop(in_flight);
                    Ok::<_, Infallible>(r)
                }
            });
            match how.tls.clone() {
                Some(acceptor) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(how.header_timeout, acceptor.accept(stream)).await {
                        let c = builder.serve_connection(TokioIo::new(s), svc);
                        watch_idle(c, &conn, how.idle_timeout).await;
                    }
                }
                None => {
                    let c = builder.serve_connection(TokioIo::new(stream), svc);
                    watch_idle(c, &conn, how.idle_timeout).await;
                }
            }
        });
    }
}

/// Drives a connection, closing it gracefully once it has had no request in flight for
/// `idle` (then waits a moment for it to finish, and drops it).
async fn watch_idle<I, S>(
    conn: hyper_util::server::conn::auto::Connection<'_, I, S, TokioExecutor>,
    state: &ConnState,
    idle: Duration,
) where
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::pin!(conn);
    let check_every = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(check_every) => {
                if state.idle_for().is_some_and(|d| d >= idle) {
                    // A graceful close finishes an answer still being written (a slow reader
                    // gets as long again as the idle timeout), then the connection goes.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(idle.max(Duration::from_secs(1)), conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

/// TLS from PEM files (certificate chain and private key).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_bounded_in_all_and_per_address() {
        let limits = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.try_open(a).unwrap();
        let _a2 = limits.try_open(a).unwrap();
        assert!(limits.try_open(a).is_none(), "per address");
        let _b1 = limits.try_open(b).unwrap();
        assert!(limits.try_open(b).is_none(), "in all");
        drop(a1);
        assert_eq!(limits.open(), 2);
        assert!(limits.try_open(b).is_some());
    }
}
