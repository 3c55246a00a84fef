//! Authentication and authorisation: a bearer token names its database and user; the
//! secret's SHA-256 is compared in constant time with the one stored in etcd.

use base64::Engine as _;
use nimbus_api::etcd::{UserRecord, UserRole, parse_token};
use nimbus_api::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub db: String,
    pub user: String,
    pub role: UserRole,
}

/// Lower-case hex SHA-256 of a token secret.
pub fn secret_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new token for `db`/`user`: 32 random bytes (256 bits) of secret. Returns the token
/// (shown once to its owner) and the record to store.
pub fn new_token(db: &str, user: &str, role: UserRole) -> (String, UserRecord) {
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let token = format!("nmb_{db}.{user}.{secret}");
    (token, UserRecord { role, secret_sha256: secret_sha256(&secret) })
}

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

/// Checks a token against the users known; `lookup(db, user)` finds a stored record.
pub fn authenticate(token: &str, lookup: impl Fn(&str, &str) -> Option<UserRecord>) -> Result<Principal, ApiError> {
    let invalid = || ApiError::new(ErrorCode::Unauthenticated, "invalid or revoked token");
    let (db, user, secret) = parse_token(token).ok_or_else(invalid)?;
    let record = lookup(db, user).ok_or_else(invalid)?;
    let given = secret_sha256(secret);
    if given.as_bytes().ct_eq(record.secret_sha256.as_bytes()).into() {
        Ok(Principal { db: db.to_owned(), user: user.to_owned(), role: record.role })
    } else {
        Err(invalid())
    }
}

/// May `who` run an operation on `db`? Another database is 403 whatever it asks; a `read`
/// user is 403 on every write.
pub fn authorize(who: &Principal, db: &str, write: bool) -> Result<(), ApiError> {
    if who.db != db {
        return Err(ApiError::new(ErrorCode::Forbidden, format!("this token is not for database {db}")));
    }
    if write && who.role == UserRole::Read {
        return Err(ApiError::new(ErrorCode::Forbidden, "this token is read-only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_authenticates_and_nothing_else_does() {
        let (token, record) = new_token("shop", "app", UserRole::ReadWrite);
        let lookup = |db: &str, user: &str| (db == "shop" && user == "app").then(|| record.clone());
        assert_eq!(
            authenticate(&token, lookup).unwrap(),
            Principal { db: "shop".into(), user: "app".into(), role: UserRole::ReadWrite }
        );
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push('x');
        assert_eq!(authenticate(&tampered, lookup).unwrap_err().code, ErrorCode::Unauthenticated);
        assert!(authenticate("nmb_shop.other.aaaaaaaaaaaaaaaaaaaaaaaaaaaa", lookup).is_err());
        assert!(authenticate("garbage", lookup).is_err());
        // Only the hash is stored.
        assert!(!record.secret_sha256.contains(token.rsplit('.').next().unwrap()));
    }

    #[test]
    fn tenancy_and_read_only_are_enforced() {
        let reader = Principal { db: "a".into(), user: "r".into(), role: UserRole::Read };
        assert!(authorize(&reader, "a", false).is_ok());
        assert_eq!(authorize(&reader, "a", true).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(authorize(&reader, "b", false).unwrap_err().code, ErrorCode::Forbidden);
    }

    #[test]
    fn bearer_headers_are_parsed() {
        assert_eq!(bearer(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer(Some("bearer  abc ")).unwrap(), "abc");
        assert_eq!(bearer(None).unwrap_err().code, ErrorCode::Unauthenticated);
        assert_eq!(bearer(Some("Basic abc")).unwrap_err().code, ErrorCode::Unauthenticated);
    }
}
