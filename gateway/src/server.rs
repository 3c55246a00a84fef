//! The public listener: the data API of `API.md` section 1, health and metrics; and the
//! admin listener (usage counters for the control plane). Connections are served by
//! hyper directly so that slow clients meet timeouts, TLS can wrap the socket, and each
//! connection can be counted against its database's connection limit.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use nimbus_api::data::IDEMPOTENCY_KEY_HEADER;
use nimbus_api::limits::{MAX_NESTING_DEPTH, validate_idempotency_key, validate_name};
use nimbus_api::{ApiError, ErrorCode};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::{authenticate, authorize, bearer};
use crate::limits::TenantLimiter;
use crate::proxy::Upstream;
use crate::state::Gateway;
use crate::usage::{Counts, Op};

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

/// The database a client connection is counted against (its first authenticated request's).
#[derive(Default)]
pub struct ConnState {
    tenant: Mutex<Option<Arc<TenantLimiter>>>,
}

impl ConnState {
    /// Counts this connection against `limiter` on its first request; false when the
    /// database has no connection left.
    fn attach(&self, limiter: &Arc<TenantLimiter>) -> bool {
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
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if let Some(t) = self.tenant.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.disconnect();
        }
    }
}

#[derive(Clone)]
struct App {
    gw: Arc<Gateway>,
    prometheus: PrometheusHandle,
}

pub fn public_router(gw: Arc<Gateway>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/v1/databases/{*rest}", any(data))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { HttpError(ApiError::not_found("no such endpoint")) })
        .with_state(App { gw, prometheus })
}

pub fn admin_router(gw: Arc<Gateway>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/v1/admin/usage", get(usage))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .with_state(App { gw, prometheus })
}

async fn readyz(State(app): State<App>) -> Response {
    if app.gw.is_serving() {
        axum::Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        HttpError(ApiError::unavailable("not in sync with etcd")).into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.prometheus.render()).into_response()
}

async fn usage(State(app): State<App>) -> Response {
    axum::Json(serde_json::json!({ "databases": app.gw.usage.snapshot() })).into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Delete,
}

/// Which operation of `API.md` a method and path are, and its database and collection.
fn classify(method: &Method, rest: &str) -> Option<(Kind, bool, String, Option<String>)> {
    let seg: Vec<&str> = rest.split('/').collect();
    let db = seg.first()?.to_string();
    let coll = seg.get(2).map(|c| c.to_string());
    let m = method.as_str();
    let (kind, body) = match (m, &seg[..]) {
        ("GET", [_, "collections"]) => (Kind::Read, false),
        ("PUT" | "DELETE", [_, "collections", _]) => (Kind::Write, false),
        ("POST", [_, "collections", _, "documents"]) => (Kind::Write, true),
        ("GET", [_, "collections", _, "documents", id]) if !id.is_empty() => (Kind::Read, false),
        ("POST", [_, "collections", _, "find" | "count"]) => (Kind::Read, true),
        ("POST", [_, "collections", _, "update"]) => (Kind::Write, true),
        ("POST", [_, "collections", _, "delete"]) => (Kind::Delete, true),
        ("POST", [_, "collections", _, "indexes"]) => (Kind::Write, true),
        ("GET", [_, "collections", _, "indexes"]) => (Kind::Read, false),
        ("DELETE", [_, "collections", _, "indexes", name]) if !name.is_empty() => (Kind::Write, false),
        _ => return None,
    };
    Some((kind, body, db, coll))
}

/// The nesting depth of a JSON text, scanned without parsing it (strings skipped).
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

async fn data(State(app): State<App>, req: Request) -> Response {
    let started = Instant::now();
    let gw = &app.gw;
    let (parts, body) = req.into_parts();
    let rest = parts.uri.path().trim_start_matches("/v1/databases/").to_owned();
    let Some((kind, needs_body, db, coll)) = classify(&parts.method, &rest) else {
        return HttpError(ApiError::not_found("no such endpoint")).into_response();
    };
    if !gw.is_serving() {
        return HttpError(ApiError::unavailable("this gateway is not in sync with the control plane; retry"))
            .into_response();
    }
    // Authenticate, then authorise: a token for another database is refused whatever it asks.
    let token = match bearer(parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        Ok(t) => t,
        Err(e) => return HttpError(e).into_response(),
    };
    let who = match authenticate(token, |d, u| gw.user(d, u)) {
        Ok(w) => w,
        Err(e) => return HttpError(e).into_response(),
    };
    if let Err(e) = authorize(&who, &db, kind != Kind::Read) {
        return HttpError(e).into_response();
    }
    if let Err(e) =
        validate_name("database", &db).and_then(|_| coll.as_deref().map_or(Ok(()), |c| validate_name("collection", c)))
    {
        return HttpError(e).into_response();
    }

    let limiter = gw.limiter(&db);
    let mut counts = Counts::default();
    if let Some(conn) = parts.extensions.get::<Arc<ConnState>>()
        && !conn.attach(&limiter)
    {
        counts.rejected = 1;
        gw.usage.record(&db, counts);
        return HttpError(ApiError::new(ErrorCode::RateLimited, "too many connections for this database"))
            .into_response();
    }
    let _admission = match limiter.admit(gw.config.queue_wait()).await {
        Ok(a) => a,
        Err(e) => {
            counts.rejected = 1;
            gw.usage.record(&db, counts);
            return HttpError(e).into_response();
        }
    };

    let body = if needs_body {
        if !is_json(&parts.headers) {
            return HttpError(ApiError::bad_request("expected Content-Type: application/json")).into_response();
        }
        let read =
            tokio::time::timeout(gw.config_body_timeout(), axum::body::to_bytes(body, gw.config.max_body_bytes)).await;
        let bytes = match read {
            Err(_) => {
                return HttpError(ApiError::bad_request("the request body did not arrive in time")).into_response();
            }
            Ok(Err(_)) => {
                return HttpError(ApiError::too_large(format!("request body over {} bytes", gw.config.max_body_bytes)))
                    .into_response();
            }
            Ok(Ok(b)) => b,
        };
        if json_depth(&bytes) > MAX_NESTING_DEPTH + 2 {
            return HttpError(ApiError::bad_request(format!("JSON nested deeper than {MAX_NESTING_DEPTH} levels")))
                .into_response();
        }
        Some(bytes)
    } else {
        None
    };
    counts.bytes_in = body.as_ref().map_or(0, |b| b.len() as u64);

    let idempotency_key = if kind == Kind::Read {
        None
    } else {
        match parts.headers.get(IDEMPOTENCY_KEY_HEADER).map(|v| v.to_str().map(str::to_owned)) {
            Some(Ok(k)) => {
                if let Err(e) = validate_idempotency_key(&k) {
                    return HttpError(e).into_response();
                }
                Some(k)
            }
            Some(Err(_)) => return HttpError(ApiError::bad_request("invalid Idempotency-Key")).into_response(),
            // The gateway's own retries must not apply a write twice: it makes a key.
            None => Some(format!("gw-{}", uuid::Uuid::new_v4().simple())),
        }
    };
    let path = match parts.uri.query() {
        Some(q) => format!("{}?{q}", parts.uri.path()),
        None => parts.uri.path().to_owned(),
    };
    let upstream = Upstream { method: parts.method.clone(), path, body, idempotency_key };
    let result = gw.forward(&db, upstream).await;
    let op = match kind {
        Kind::Read => Op::Read,
        Kind::Write => Op::Write,
        Kind::Delete => Op::Delete,
    };
    gw.usage.record_latency(&db, op, started.elapsed().as_secs_f64());
    match result {
        Ok(answer) => {
            match kind {
                Kind::Read => counts.reads = 1,
                Kind::Write => counts.writes = 1,
                Kind::Delete => counts.deletes = 1,
            }
            counts.documents_returned = answer.returned;
            counts.bytes_out = answer.body.len() as u64;
            gw.usage.record(&db, counts);
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, [(header::CONTENT_TYPE, "application/json")], answer.body).into_response()
        }
        Err(e) => {
            gw.usage.record(&db, counts);
            HttpError(e).into_response()
        }
    }
}

impl Gateway {
    fn config_body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.body_timeout_ms)
    }
}

/// Serves `app` on `listener`, with TLS when `tls` is set, until the process ends.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: std::time::Duration,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(header_timeout));
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, tls, builder) = (app.clone(), tls.clone(), builder.clone());
        tokio::spawn(async move {
            let conn = Arc::new(ConnState::default());
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(conn.clone());
                app.clone().oneshot(req.map(Body::new))
            });
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => builder.serve_connection(TokioIo::new(s), svc).await,
                    _ => return,
                },
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
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
    fn every_operation_of_the_contract_is_classified() {
        let c = |m: &str, p: &str| classify(&Method::from_bytes(m.as_bytes()).unwrap(), p);
        assert_eq!(c("GET", "shop/collections"), Some((Kind::Read, false, "shop".into(), None)));
        assert_eq!(c("PUT", "shop/collections/o"), Some((Kind::Write, false, "shop".into(), Some("o".into()))));
        assert_eq!(c("POST", "shop/collections/o/documents").unwrap().0, Kind::Write);
        assert_eq!(c("GET", "shop/collections/o/documents/7").unwrap().0, Kind::Read);
        assert_eq!(c("POST", "shop/collections/o/find").unwrap().0, Kind::Read);
        assert_eq!(c("POST", "shop/collections/o/count").unwrap().0, Kind::Read);
        assert_eq!(c("POST", "shop/collections/o/update").unwrap().0, Kind::Write);
        assert_eq!(c("POST", "shop/collections/o/delete").unwrap().0, Kind::Delete);
        assert_eq!(c("POST", "shop/collections/o/indexes").unwrap().0, Kind::Write);
        assert_eq!(c("GET", "shop/collections/o/indexes").unwrap().0, Kind::Read);
        assert_eq!(c("DELETE", "shop/collections/o/indexes/i").unwrap().0, Kind::Write);
        assert_eq!(c("DELETE", "shop"), None);
        assert_eq!(c("GET", "shop/collections/o/documents/"), None);
        assert_eq!(c("PATCH", "shop/collections/o"), None);
    }

    #[test]
    fn depth_scan_skips_strings() {
        assert_eq!(json_depth(br#"{"a": [1, {"b": "[[[{{{"}]}"#), 3);
        assert_eq!(json_depth(br#""\"[" "#), 0);
        assert_eq!(json_depth(&vec![b'['; 500]), 500);
    }
}
