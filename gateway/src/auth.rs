//! Authentication and authorisation: a bearer token names its database and user; the
//! secret's SHA-256 is compared in constant time with the one stored in etcd.

use std::sync::Arc;

use nimbus_api::etcd::{UserRole, parse_token};
use nimbus_api::path::{Access, DataPath};
use nimbus_api::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::state::DbState;

/// Who a request is from: a user of the database whose state came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: UserRole,
}

/// Compared with when a token names no known user: the hash of no secret anyone holds.
const UNKNOWN_USER_HASH: [u8; 32] = [0; 32];

/// Token helpers live in `nimbus-api` (the control plane makes tokens, the gateway checks them).
pub use nimbus_api::token::{new_token, secret_sha256};

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, ApiError> {
    let h = header.ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "missing Authorization: Bearer <token>"))?;
    let (scheme, token) =
        h.split_once(' ').ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::new(ErrorCode::Unauthenticated, "use Authorization: Bearer <token>"));
    }
    Ok(token.trim())
}

/// Checks a token against the users of the database it names; `lookup(db)` finds that
/// database's state. Every failure is the same 401, so a caller learns nothing of which
/// databases or users exist.
pub fn verify_token(
    token: &str,
    lookup: impl FnOnce(&str) -> Option<Arc<DbState>>,
) -> Result<(Arc<DbState>, Principal), ApiError> {
    let invalid = || ApiError::new(ErrorCode::Unauthenticated, "invalid or revoked token");
    let (db, user, secret) = parse_token(token).ok_or_else(invalid)?;
    // The secret is hashed and compared whether or not the user exists, so the time taken
    // does not tell which databases and users there are.
    let given: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let state = lookup(db);
    let record = state.as_ref().and_then(|s| s.users.get(user));
    let stored = record.map_or(&UNKNOWN_USER_HASH, |r| &r.secret_sha256);
    let matches = bool::from(given.ct_eq(stored));
    let (Some(state), Some(record), true) = (state.clone(), record, matches) else {
        return Err(invalid());
    };
    let who = Principal { user: user.to_owned(), role: record.role };
    Ok((state, who))
}

/// May `who`, a user of database `own_db`, run `path`? Another database is 403 whatever it
/// asks; a `read` user is 403 on every write.
pub fn authorize(who: &Principal, own_db: &str, path: &DataPath) -> Result<(), ApiError> {
    if path.db.as_str() != own_db {
        return Err(ApiError::new(ErrorCode::Forbidden, format!("this token is not for database {}", path.db)));
    }
    if path.access() != Access::Read && who.role == UserRole::Read {
        return Err(ApiError::new(ErrorCode::Forbidden, "this token is read-only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nimbus_api::etcd::UserRecord;

    use super::*;

    fn db_with(name: &str, user: &str, record: UserRecord) -> Arc<DbState> {
        let limits = nimbus_api::etcd::Limits::for_tier(nimbus_api::etcd::Tier::Free);
        let stored = crate::state::StoredUser::from_record(&record).unwrap();
        Arc::new(DbState {
            name: name.into(),
            users: [(user.to_owned(), stored)].into_iter().collect(),
            route: None,
            limiter: Arc::new(crate::limits::TenantLimiter::new(limits, 1 << 20, 1 << 20)),
            traffic: Arc::default(),
        })
    }

    #[test]
    fn a_new_token_authenticates_and_nothing_else_does() {
        let (token, record) = new_token("shop", "app", UserRole::ReadWrite);
        let shop = db_with("shop", "app", record.clone());
        let lookup = |db: &str| (db == "shop").then(|| shop.clone());
        let (state, who) = verify_token(&token, lookup).unwrap();
        assert_eq!(state.name, "shop");
        assert_eq!(who, Principal { user: "app".into(), role: UserRole::ReadWrite });
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push('x');
        assert_eq!(verify_token(&tampered, lookup).unwrap_err().code, ErrorCode::Unauthenticated);
        assert!(verify_token("nmb_shop.other.aaaaaaaaaaaaaaaaaaaaaaaaaaaa", lookup).is_err());
        assert!(verify_token("garbage", lookup).is_err());
        // Only the hash is stored.
        assert!(!record.secret_sha256.contains(token.rsplit('.').next().unwrap()));
    }

    #[test]
    fn tenancy_and_read_only_are_enforced() {
        let reader = Principal { user: "r".into(), role: UserRole::Read };
        let find_a = DataPath::parse("POST", "/v1/databases/a/collections/c/find").unwrap();
        let insert_a = DataPath::parse("POST", "/v1/databases/a/collections/c/documents").unwrap();
        let find_b = DataPath::parse("POST", "/v1/databases/b/collections/c/find").unwrap();
        assert!(authorize(&reader, "a", &find_a).is_ok());
        assert_eq!(authorize(&reader, "a", &insert_a).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(authorize(&reader, "a", &find_b).unwrap_err().code, ErrorCode::Forbidden);
        let writer = Principal { user: "w".into(), role: UserRole::ReadWrite };
        assert!(authorize(&writer, "a", &insert_a).is_ok());
        assert_eq!(authorize(&writer, "b", &insert_a).unwrap_err().code, ErrorCode::Forbidden);
    }

    #[test]
    fn bearer_headers_are_parsed() {
        assert_eq!(bearer(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer(Some("bearer  abc ")).unwrap(), "abc");
        assert_eq!(bearer(None).unwrap_err().code, ErrorCode::Unauthenticated);
        assert_eq!(bearer(Some("Basic abc")).unwrap_err().code, ErrorCode::Unauthenticated);
    }
}
