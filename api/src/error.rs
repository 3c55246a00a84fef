//! The error model of `API.md` section 1: `{"error": {"code", "message"}}` with a fixed
//! status per code. Internal-only codes (`NotLeader`, `Internal`) never reach a client of
//! the gateway.

use serde::{Deserialize, Serialize};

/// Every error code a Nimbus HTTP API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    InvalidFilter,
    InvalidUpdate,
    Unauthenticated,
    Forbidden,
    NotFound,
    DuplicateKey,
    TooLarge,
    RateLimited,
    Unavailable,
    /// An `Idempotency-Key` already used, within its lifetime, for a different request.
    IdempotencyKeyReused,
    /// Internal API only: this datanode is not the leader; `leader` names the one it knows.
    NotLeader,
    /// Internal API only: the request carried a route epoch older than the one this replica
    /// set knows for the database (it moved, or is moving): the gateway re-reads the route.
    StaleRoute,
    /// Internal API only: an oplog read from a position older than the retained oplog (a
    /// migration's tail must start again from an export).
    OplogTruncated,
    /// A bug or an I/O failure; the message says which without leaking internals.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidFilter | ErrorCode::InvalidUpdate => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::DuplicateKey => 409,
            ErrorCode::TooLarge => 413,
            // 421 Misdirected Request: the request is fine, this server is the wrong one.
            ErrorCode::NotLeader | ErrorCode::StaleRoute => 421,
            // 422 Unprocessable Content, as the IETF's Idempotency-Key draft answers a key
            // reused with a different payload.
            ErrorCode::IdempotencyKeyReused => 422,
            // 410 Gone: what was asked for existed and was removed for good.
            ErrorCode::OplogTruncated => 410,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }

    /// True when the same request may succeed if sent again (elsewhere or later).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::NotLeader | ErrorCode::StaleRoute | ErrorCode::Unavailable | ErrorCode::RateLimited)
    }
}

/// Where the leader of a replica set can be reached, as far as the answering node knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderHint {
    pub id: u64,
    /// Base URL of the leader's data API, e.g. `http://127.0.0.1:7001`.
    pub data_addr: String,
}

/// An error as it travels on the wire and inside the services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Set with `NotLeader` when the answering node knows the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderHint>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), leader: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn invalid_filter(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidFilter, message)
    }
    pub fn invalid_update(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidUpdate, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn duplicate_key(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::DuplicateKey, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn stale_route(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::StaleRoute, message)
    }
    pub fn not_leader(leader: Option<LeaderHint>) -> Self {
        ApiError { code: ErrorCode::NotLeader, message: "this datanode is not the leader".into(), leader }
    }

    /// The JSON body of `API.md`: `{"error": {...}}`.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody { error: self.clone() }
    }
}

/// The envelope every error answer has on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_shape_api_md_promises() {
        let body = serde_json::to_value(ApiError::duplicate_key("_id 1 exists").to_body()).unwrap();
        assert_eq!(body, serde_json::json!({"error": {"code": "DuplicateKey", "message": "_id 1 exists"}}));
    }

    #[test]
    fn statuses_follow_api_md() {
        assert_eq!(ErrorCode::InvalidFilter.status(), 400);
        assert_eq!(ErrorCode::TooLarge.status(), 413);
        assert_eq!(ErrorCode::RateLimited.status(), 429);
        assert_eq!(ErrorCode::Unavailable.status(), 503);
        assert!(ErrorCode::NotLeader.is_retryable());
        assert!(!ErrorCode::DuplicateKey.is_retryable());
    }
}
