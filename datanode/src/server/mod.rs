//! The HTTP servers of a datanode: the internal data API (the gateway's upstream) and the
//! admin API (status, membership, oplog, snapshots, Raft RPCs, health and metrics).

pub mod admin;
pub mod data;
pub mod raft_rpc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use nimbus_api::ApiError;
use serde::de::DeserializeOwned;

/// An [`ApiError`] as an HTTP answer: the status of its code and the JSON body of `API.md`.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl From<crate::store::StoreError> for HttpError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        HttpError(ApiError::internal("storage failure on this datanode"))
    }
}

impl From<crate::store::read::QueryError> for HttpError {
    fn from(e: crate::store::read::QueryError) -> Self {
        match e {
            crate::store::read::QueryError::Refused(e) => HttpError(e),
            crate::store::read::QueryError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.0.to_body())).into_response();
        if self.0.code == nimbus_api::ErrorCode::RateLimited {
            resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A JSON body parsed by our rules: `Content-Type: application/json`, the configured size
/// limit (413 `TooLarge`), well-formed JSON and the expected shape (400 `BadRequest`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::bad_request("expected Content-Type: application/json").into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large("request body is over the size limit")
            } else {
                ApiError::bad_request("failed to read the request body")
            }
        })?;
        parse_json(&bytes).map(JsonBody).map_err(HttpError)
    }
}

/// Whether a request says its body is JSON.
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

/// Parses a JSON body into `T`, with messages a client can act on. A body is a JSON
/// object: serde would also read a struct from an array of its fields in order, so `[]`
/// would pass for `{}` (a `delete` with an empty filter); anything else is refused here.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::bad_request(format!("unexpected request shape: {e}")),
            _ => ApiError::bad_request(format!("malformed JSON: {e}")),
        }
    })
}
