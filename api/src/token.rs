//! User tokens: `nmb_{db}.{user}.{secret}`, of which etcd keeps only the secret's SHA-256.
//!
//! Made by the control plane (the operator, the playground) and checked by the gateway: one
//! definition for both, so the hash the gateway compares is the one the control plane wrote.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::etcd::{UserRecord, UserRole};

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

/// The record etcd keeps for an existing token, or `None` when the token is malformed.
pub fn record_of(token: &str, role: UserRole) -> Option<UserRecord> {
    let (_, _, secret) = crate::etcd::parse_token(token)?;
    Some(UserRecord { role, secret_sha256: secret_sha256(secret) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_parses_and_its_record_is_the_hash_of_its_secret() {
        let (token, record) = new_token("shop", "app", UserRole::Read);
        let (db, user, secret) = crate::etcd::parse_token(&token).unwrap_or_default();
        assert_eq!((db, user), ("shop", "app"));
        assert_eq!(secret.len(), 43, "32 bytes in unpadded base64");
        assert_eq!(record.secret_sha256, secret_sha256(secret));
        assert!(!record.secret_sha256.contains(secret));
        assert_eq!(record_of(&token, UserRole::Read), Some(record));
        assert_eq!(record_of("nmb_shop.app.short", UserRole::Read), None);
    }
}
