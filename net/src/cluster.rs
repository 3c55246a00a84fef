//! The cluster secret: how Nimbus components recognise each other.
//!
//! Every request to a datanode's data, admin and Raft ports, to a gateway's internal admin
//! API and to the playground's control plane carries `Authorization: Bearer <secret>`, and
//! every such server refuses a request without one of the secrets it accepts (401
//! `Unauthenticated`, nothing changed). Health, readiness, status and metrics answer
//! anyone: probes and scrapers hold no secret, and they change nothing.
//!
//! The secret file holds one secret per line (blank lines and `#` comments ignored). The
//! first is the one this process sends; all are accepted. Rotation is therefore two
//! rollouts with no refused request: add the new secret as a second line everywhere, then
//! make it the first line (and, once every component sends it, drop the old one). See
//! `docs/security.md`.
//!
//! Secrets are compared as SHA-256 digests in constant time, so neither their content nor
//! their length leaks through timing.
//!
//! **Scoped secrets.** On Kubernetes, datanodes and gateways run in the namespaces of the
//! instances they serve, where the namespace's users may read Secrets. Each namespace gets
//! its own secret, derived from the cluster's ([`ClusterSecret::scoped`]: HMAC-SHA256 of
//! the namespace under each cluster secret): its datanodes accept it and its gateways send
//! it, and only the operator, which holds the cluster's, can derive another namespace's.
//! A namespace's secret read by its users opens only that namespace's datanodes.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use nimbus_api::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest secret accepted: 32 characters (the generated ones have 43, 256 bits).
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("failed to read the cluster secret file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the cluster secret file has no secret")]
    Empty,
    #[error("a cluster secret must have at least {MIN_SECRET_LEN} visible ASCII characters and no spaces")]
    Weak,
}

/// The secrets a process accepts, and the one it sends.
#[derive(Clone)]
pub struct ClusterSecret {
    authorization: HeaderValue,
    accepted: Arc<Vec<[u8; 32]>>,
    /// The secrets themselves, in order (the first is sent): to derive scoped ones.
    secrets: Arc<Vec<String>>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSecret").field("accepted", &self.accepted.len()).finish_non_exhaustive()
    }
}

impl ClusterSecret {
    pub fn from_file(path: &Path) -> Result<ClusterSecret, SecretError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SecretError::Read { path: path.display().to_string(), source })?;
        ClusterSecret::parse(&text)
    }

    /// Parses the file's text: one secret per line, the first one sent.
    pub fn parse(text: &str) -> Result<ClusterSecret, SecretError> {
        let secrets: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        let first = secrets.first().ok_or(SecretError::Empty)?;
        if secrets.iter().any(|s| s.len() < MIN_SECRET_LEN || !s.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(SecretError::Weak);
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {first}")).map_err(|_| SecretError::Weak)?;
        authorization.set_sensitive(true);
        let accepted = secrets.iter().map(|s| digest(s.as_bytes())).collect();
        let secrets = secrets.iter().map(|s| s.to_string()).collect();
        Ok(ClusterSecret { authorization, accepted: Arc::new(accepted), secrets: Arc::new(secrets) })
    }

    /// The secret file of scope `scope` (a namespace): one derived secret per line, derived
    /// from each of these secrets in order, so a rotation in progress carries over.
    pub fn scoped_file(&self, scope: &str) -> String {
        use hmac::Mac as _;
        let mut out = String::new();
        for s in self.secrets.iter() {
            // HMAC takes keys of any length: this cannot fail.
            let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(s.as_bytes()) else { continue };
            mac.update(b"nimbus/scope/");
            mac.update(scope.as_bytes());
            out.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
            out.push('\n');
        }
        out
    }

    /// The secret of scope `scope`, as the components of that scope hold it. (Derived
    /// secrets are 43 characters of base64url, so this fails only if there is none.)
    pub fn scoped(&self, scope: &str) -> Result<ClusterSecret, SecretError> {
        ClusterSecret::parse(&self.scoped_file(scope))
    }

    /// A new random secret: 32 bytes, base64url.
    pub fn generate() -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    }

    /// The `Authorization` header value this process sends (marked sensitive).
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// Headers every internal client sends: for `reqwest::ClientBuilder::default_headers`.
    pub fn default_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, self.authorization.clone());
        h
    }

    /// Whether `headers` carry one of the accepted secrets.
    pub fn verify(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")) else {
            return false;
        };
        let given = digest(token);
        // Every accepted digest is compared, so the time taken does not tell which matched.
        self.accepted.iter().fold(subtle::Choice::from(0), |ok, d| ok | d.ct_eq(&given)).into()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The answer to a request without the cluster secret.
pub fn unauthenticated() -> Response {
    let body = ApiError::new(
        ErrorCode::Unauthenticated,
        "this port serves Nimbus components only: missing or wrong cluster credentials",
    )
    .to_body();
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

/// axum middleware refusing requests without the cluster secret:
/// `router.route_layer(axum::middleware::from_fn_with_state(secret, require))` protects the
/// routes added before it.
pub async fn require(State(secret): State<ClusterSecret>, req: Request, next: Next) -> Response {
    if secret.verify(req.headers()) { next.run(req).await } else { unauthenticated() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn the_first_secret_is_sent_and_every_one_is_accepted() {
        let s = ClusterSecret::parse(&format!("# rotation in progress\n{A}\n\n{B}\n")).unwrap();
        assert_eq!(s.authorization().to_str().unwrap(), format!("Bearer {A}"));
        assert!(s.authorization().is_sensitive());
        assert!(s.verify(&headers(&format!("Bearer {A}"))));
        assert!(s.verify(&headers(&format!("Bearer {B}"))));
        assert!(!s.verify(&headers(&format!("Bearer {A}x"))));
        assert!(!s.verify(&headers(&format!("bearer {A}"))));
        assert!(!s.verify(&headers(A)));
        assert!(!s.verify(&HeaderMap::new()));
    }

    #[test]
    fn scoped_secrets_differ_by_scope_and_carry_a_rotation_over() {
        let cluster = ClusterSecret::parse(&format!("{A}\n{B}")).unwrap();
        let apps = cluster.scoped("apps").unwrap();
        let other = cluster.scoped("other").unwrap();
        // A scope's secret opens that scope only, and is not the cluster's.
        assert!(apps.verify(&headers(apps.authorization().to_str().unwrap())));
        assert!(!apps.verify(&headers(other.authorization().to_str().unwrap())));
        assert!(!apps.verify(&headers(cluster.authorization().to_str().unwrap())));
        // The same cluster secrets always derive the same scoped ones.
        assert_eq!(
            cluster.scoped_file("apps"),
            ClusterSecret::parse(&format!("{A}\n{B}")).unwrap().scoped_file("apps")
        );
        // Derived from both: the one derived from the second cluster secret is accepted too.
        let second = ClusterSecret::parse(B).unwrap().scoped("apps").unwrap();
        assert!(apps.verify(&headers(second.authorization().to_str().unwrap())));
        assert_eq!(cluster.scoped_file("apps").lines().count(), 2);
    }

    #[test]
    fn weak_or_missing_secrets_are_refused() {
        assert!(matches!(ClusterSecret::parse(""), Err(SecretError::Empty)));
        assert!(matches!(ClusterSecret::parse("# only a comment\n"), Err(SecretError::Empty)));
        assert!(matches!(ClusterSecret::parse("short"), Err(SecretError::Weak)));
        assert!(matches!(ClusterSecret::parse(&format!("{A}\nshort")), Err(SecretError::Weak)));
        assert!(ClusterSecret::parse(&ClusterSecret::generate()).is_ok());
    }

    #[tokio::test]
    async fn the_middleware_refuses_without_the_secret_and_passes_with_it() {
        let secret = ClusterSecret::parse(A).unwrap();
        let app = axum::Router::new()
            .route("/private", axum::routing::get(|| async { "private" }))
            .route_layer(axum::middleware::from_fn_with_state(secret.clone(), require))
            .route("/healthz", axum::routing::get(|| async { "ok" }));
        let call = |path: &str, auth: Option<&HeaderValue>| {
            let mut req = http::Request::builder().uri(path);
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            app.clone().oneshot(req.body(axum::body::Body::empty()).unwrap())
        };
        assert_eq!(call("/private", None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        let wrong = HeaderValue::from_str(&format!("Bearer {B}")).unwrap();
        assert_eq!(call("/private", Some(&wrong)).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(call("/private", Some(secret.authorization())).await.unwrap().status(), StatusCode::OK);
        assert_eq!(call("/healthz", None).await.unwrap().status(), StatusCode::OK);
    }
}
