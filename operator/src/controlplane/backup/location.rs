//! Where backups go (`docs/backup.md`, "Storing backups in S3"): a directory of the local
//! filesystem or an S3 bucket (AWS or any S3-compatible server: MinIO, Ceph, moto), parsed
//! once from what a person wrote into a [`BackupStorage`], then opened as an
//! `object_store` and the prefix under which [`BackupLocation`] lays out each database.
//!
//! ```text
//! /var/lib/nimbus/backups          the local filesystem (absolute or relative path)
//! file:///var/lib/nimbus/backups   the same, as a URL
//! s3://bucket                      S3, the bucket's root
//! s3://bucket/nimbus/prod          S3, under the prefix nimbus/prod
//! ```
//!
//! An S3 location's other settings ([`S3Options`]: endpoint, region, plain HTTP,
//! credentials) come beside the URL, not in it, so a secret never travels in a URL.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;

use super::s3_client::{HyperConnector, READ_TIMEOUT};
use super::{BackupError, BackupLocation, BackupStore, Incarnation};

/// The region when none is given: AWS's default, and what S3-compatible servers accept.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The environment variables of the process's own AWS credentials ([`S3Credentials::Environment`]).
pub const ENV_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const ENV_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const ENV_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// The environment of an IAM role for the process's Kubernetes ServiceAccount (EKS sets
/// both on a Pod whose ServiceAccount has the `eks.amazonaws.com/role-arn` annotation): the
/// role is assumed with the projected token (STS `AssumeRoleWithWebIdentity`).
pub const ENV_WEB_IDENTITY_TOKEN_FILE: &str = "AWS_WEB_IDENTITY_TOKEN_FILE";
pub const ENV_ROLE_ARN: &str = "AWS_ROLE_ARN";
/// Optional beside the two above: the role session's name (default `WebIdentitySession`).
pub const ENV_ROLE_SESSION_NAME: &str = "AWS_ROLE_SESSION_NAME";
/// Optional beside the two above: the STS endpoint (HTTPS; default the region's).
pub const ENV_ENDPOINT_URL_STS: &str = "AWS_ENDPOINT_URL_STS";

/// Why a backup location could not be parsed or opened.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid backup location {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid S3 option {option} {value:?}: {reason}")]
    InvalidOption { option: &'static str, value: String, reason: String },
    #[error("incomplete S3 credentials: {0}")]
    Credentials(String),
    #[error("failed to open backup location {location}: {reason}")]
    Open { location: String, reason: String },
}

/// Where backups go, parsed and checked: nothing is touched until [`BackupStorage::open`].
#[derive(Clone, PartialEq, Eq)]
pub enum BackupStorage {
    /// A directory of the local filesystem (the playground, tests, a mounted volume).
    Local {
        root: PathBuf,
    },
    S3(S3Storage),
}

/// An S3 bucket and prefix, and how to reach and sign for it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Storage {
    pub bucket: String,
    /// `/`-separated segments, without leading or trailing `/`; empty: the bucket's root.
    pub prefix: String,
    pub options: S3Options,
}

/// How to reach an S3 bucket, beside its `s3://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Options {
    /// `http(s)://host[:port]` of an S3-compatible server; `None`: AWS's endpoint of the
    /// region. Requests to a custom endpoint are path-style (`{endpoint}/{bucket}/{key}`),
    /// which every S3-compatible server understands.
    pub endpoint: Option<String>,
    /// `None`: [`DEFAULT_REGION`].
    pub region: Option<String>,
    /// Allow an `http://` endpoint (a server inside the cluster or a test's); refused
    /// otherwise, so credentials never cross a network in the clear by mistake.
    pub allow_http: bool,
    pub credentials: S3Credentials,
    /// How long reading a response body may wait for its next bytes before the read fails
    /// (and a GET is retried): a stalled server never hangs a backup or a restore.
    /// Default [`READ_TIMEOUT`].
    pub read_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            allow_http: false,
            credentials: S3Credentials::Environment,
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// Whose credentials sign the requests.
#[derive(Clone, PartialEq, Eq)]
pub enum S3Credentials {
    /// Given explicitly (the operator reads them from a Kubernetes Secret).
    Static { access_key_id: String, secret_access_key: String, session_token: Option<String> },
    /// The process's, read at [`BackupStorage::open`]: `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) when set; else an IAM role for
    /// the ServiceAccount (`AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`, and optionally
    /// `AWS_ROLE_SESSION_NAME`, `AWS_ENDPOINT_URL_STS`); else `object_store`'s
    /// instance-metadata credentials (an EC2 instance profile).
    Environment,
}

// By hand: a secret key never reaches a log line.
impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static { access_key_id, session_token, .. } => f
                .debug_struct("Static")
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &"<redacted>")
                .field("session_token", &session_token.as_ref().map(|_| "<redacted>"))
                .finish(),
            S3Credentials::Environment => f.write_str("Environment"),
        }
    }
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("credentials", &self.credentials)
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("options", &self.options)
            .finish()
    }
}

impl fmt::Debug for BackupStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackupStorage::Local { root } => f.debug_struct("Local").field("root", root).finish(),
            BackupStorage::S3(s3) => s3.fmt(f),
        }
    }
}

/// What a person reads in a message: the URL, never a credential.
impl fmt::Display for BackupStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackupStorage::Local { root } => write!(f, "{}", root.display()),
            BackupStorage::S3(s3) if s3.prefix.is_empty() => write!(f, "s3://{}", s3.bucket),
            BackupStorage::S3(s3) => write!(f, "s3://{}/{}", s3.bucket, s3.prefix),
        }
    }
}

/// An opened location: the object store and the prefix of every backup in it (what
/// [`BackupLocation::new`] takes).
#[derive(Debug, Clone)]
pub struct OpenedStorage {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: String,
}

impl OpenedStorage {
    /// The backups of database `db` (incarnation `incarnation`) of `scope` here.
    pub fn backup_store(&self, scope: &str, db: &str, incarnation: &Incarnation) -> Result<BackupStore, BackupError> {
        let location = BackupLocation::new(&self.prefix, scope, db, incarnation)?;
        Ok(BackupStore::new(self.store.clone(), location))
    }
}

impl BackupStorage {
    /// Parses `url` (see the module's documentation); `s3` applies to an `s3://` URL only.
    pub fn parse(url: &str, s3: S3Options) -> Result<BackupStorage, StorageError> {
        let invalid = |reason: &str| StorageError::InvalidUrl { url: url.to_string(), reason: reason.to_string() };
        if url.trim().is_empty() {
            return Err(invalid("empty: expected a path, file:///path or s3://bucket/prefix"));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(BackupStorage::Local { root: PathBuf::from(url) });
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                // file:///abs/path; a host (file://server/path) is not a local path.
                if !rest.starts_with('/') {
                    return Err(invalid("a file URL names an absolute path: file:///path (three slashes)"));
                }
                Ok(BackupStorage::Local { root: PathBuf::from(rest) })
            }
            "s3" => {
                if rest.contains(['?', '#']) {
                    return Err(invalid(
                        "query strings and fragments are not read: endpoint, region and credentials are separate settings",
                    ));
                }
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(invalid("missing the bucket: expected s3://bucket or s3://bucket/prefix"));
                }
                check_bucket(bucket).map_err(|reason| invalid(&reason))?;
                let prefix = prefix.trim_matches('/');
                if prefix.split('/').any(str::is_empty) && !prefix.is_empty() {
                    return Err(invalid("the prefix has an empty segment ('//')"));
                }
                // The one rule for path segments is BackupLocation's: checked here once, with
                // placeholder names, so a bad prefix is refused when the location is read,
                // not at the first backup.
                let placeholder = Incarnation::new("incarnation").map_err(|e| invalid(&e.to_string()))?;
                BackupLocation::new(prefix, "scope", "db", &placeholder).map_err(|e| invalid(&e.to_string()))?;
                check_options(&s3)?;
                Ok(BackupStorage::S3(S3Storage { bucket: bucket.to_string(), prefix: prefix.to_string(), options: s3 }))
            }
            other => Err(invalid(&format!("unknown scheme {other:?}: expected a path, file:// or s3://"))),
        }
    }

    /// Opens the object store (a local directory is made if missing); nothing is sent to S3
    /// yet: a wrong bucket or credential shows at the first request.
    pub fn open(&self) -> Result<OpenedStorage, StorageError> {
        self.open_with(|name| std::env::var(name).ok())
    }

    /// [`BackupStorage::open`] with the environment as a function (tests).
    pub fn open_with(&self, env: impl Fn(&str) -> Option<String>) -> Result<OpenedStorage, StorageError> {
        let failed = |reason: String| StorageError::Open { location: self.to_string(), reason };
        match self {
            BackupStorage::Local { root } => {
                std::fs::create_dir_all(root).map_err(|e| failed(format!("failed to create the directory: {e}")))?;
                let fs = LocalFileSystem::new_with_prefix(root).map_err(|e| failed(e.to_string()))?;
                Ok(OpenedStorage { store: Arc::new(fs), prefix: String::new() })
            }
            BackupStorage::S3(s3) => {
                let o = &s3.options;
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(o.region.as_deref().unwrap_or(DEFAULT_REGION))
                    .with_allow_http(o.allow_http)
                    .with_http_connector(HyperConnector::with_read_timeout(o.read_timeout));
                if let Some(endpoint) = &o.endpoint {
                    builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
                }
                match signer(&o.credentials, env)? {
                    Signer::Keys { key_id, secret, token } => {
                        builder = builder.with_access_key_id(key_id).with_secret_access_key(secret);
                        if let Some(token) = token {
                            builder = builder.with_token(token);
                        }
                    }
                    Signer::WebIdentity { token_file, role_arn, session_name, sts_endpoint } => {
                        builder = builder
                            .with_config(AmazonS3ConfigKey::WebIdentityTokenFile, token_file)
                            .with_config(AmazonS3ConfigKey::RoleArn, role_arn);
                        if let Some(name) = session_name {
                            builder = builder.with_config(AmazonS3ConfigKey::RoleSessionName, name);
                        }
                        if let Some(endpoint) = sts_endpoint {
                            builder = builder.with_config(AmazonS3ConfigKey::StsEndpoint, endpoint);
                        }
                    }
                    Signer::InstanceMetadata => {}
                }
                let store = builder.build().map_err(|e| failed(e.to_string()))?;
                Ok(OpenedStorage { store: Arc::new(store), prefix: s3.prefix.clone() })
            }
        }
    }
}

/// Whose credentials sign the requests, as resolved at open.
#[derive(PartialEq, Eq)]
enum Signer {
    /// A key pair (and session token).
    Keys { key_id: String, secret: String, token: Option<String> },
    /// An IAM role assumed with a web identity token (a Kubernetes ServiceAccount's),
    /// renewed by `object_store` before it expires.
    WebIdentity { token_file: String, role_arn: String, session_name: Option<String>, sts_endpoint: Option<String> },
    /// `object_store`'s instance metadata (an EC2 instance profile).
    InstanceMetadata,
}

// By hand: a secret key never reaches a log line (or a test's failure message).
impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signer::Keys { key_id, token, .. } => f
                .debug_struct("Keys")
                .field("key_id", key_id)
                .field("secret", &"<redacted>")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
            Signer::WebIdentity { token_file, role_arn, session_name, sts_endpoint } => f
                .debug_struct("WebIdentity")
                .field("token_file", token_file)
                .field("role_arn", role_arn)
                .field("session_name", session_name)
                .field("sts_endpoint", sts_endpoint)
                .finish(),
            Signer::InstanceMetadata => f.write_str("InstanceMetadata"),
        }
    }
}

/// What signs the requests: given keys; else the environment's key pair, its web identity
/// (the order of AWS's own SDKs), or the instance metadata. Half a key pair or half a web
/// identity is an error naming what is missing, not a silent fall back to another
/// identity; so is a token file that cannot be read (the operator would otherwise start
/// and fail at its first request).
fn signer(credentials: &S3Credentials, env: impl Fn(&str) -> Option<String>) -> Result<Signer, StorageError> {
    match credentials {
        S3Credentials::Static { access_key_id, secret_access_key, session_token } => {
            if access_key_id.is_empty() || secret_access_key.is_empty() {
                return Err(StorageError::Credentials(
                    "both the access key id and the secret access key are needed".to_string(),
                ));
            }
            Ok(Signer::Keys {
                key_id: access_key_id.clone(),
                secret: secret_access_key.clone(),
                token: session_token.clone(),
            })
        }
        S3Credentials::Environment => {
            let get = |name| env(name).filter(|v| !v.is_empty());
            let half =
                |set: &str, unset: &str| Err(StorageError::Credentials(format!("{set} is set but {unset} is not")));
            match (get(ENV_ACCESS_KEY_ID), get(ENV_SECRET_ACCESS_KEY)) {
                (Some(key_id), Some(secret)) => {
                    return Ok(Signer::Keys { key_id, secret, token: get(ENV_SESSION_TOKEN) });
                }
                (None, None) => {}
                (Some(_), None) => return half(ENV_ACCESS_KEY_ID, ENV_SECRET_ACCESS_KEY),
                (None, Some(_)) => return half(ENV_SECRET_ACCESS_KEY, ENV_ACCESS_KEY_ID),
            }
            match (get(ENV_WEB_IDENTITY_TOKEN_FILE), get(ENV_ROLE_ARN)) {
                (Some(token_file), Some(role_arn)) => {
                    if let Err(e) = std::fs::metadata(&token_file) {
                        return Err(StorageError::Credentials(format!(
                            "{ENV_WEB_IDENTITY_TOKEN_FILE} names {token_file}, which cannot be read: {e}"
                        )));
                    }
                    Ok(Signer::WebIdentity {
                        token_file,
                        role_arn,
                        session_name: get(ENV_ROLE_SESSION_NAME),
                        sts_endpoint: get(ENV_ENDPOINT_URL_STS),
                    })
                }
                (None, None) => Ok(Signer::InstanceMetadata),
                (Some(_), None) => half(ENV_WEB_IDENTITY_TOKEN_FILE, ENV_ROLE_ARN),
                (None, Some(_)) => half(ENV_ROLE_ARN, ENV_WEB_IDENTITY_TOKEN_FILE),
            }
        }
    }
}

/// S3's bucket naming rules (general purpose buckets): 3 to 63 lowercase letters, digits,
/// `-` and `.`, beginning and ending with a letter or digit, no `..`.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_chars = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !ok_chars
        || !ends(bucket.as_bytes().first())
        || !ends(bucket.as_bytes().last())
        || bucket.contains("..")
    {
        return Err(format!(
            "invalid bucket name {bucket:?}: 3 to 63 lowercase letters, digits, '-' and '.', \
             beginning and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn check_options(o: &S3Options) -> Result<(), StorageError> {
    if let Some(endpoint) = &o.endpoint {
        let bad = |reason: &str| StorageError::InvalidOption {
            option: "endpoint",
            value: endpoint.clone(),
            reason: reason.to_string(),
        };
        let uri: http::Uri = endpoint.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if o.allow_http => {}
            Some("http") => return Err(bad("plain HTTP needs allow_http (credentials would cross in the clear)")),
            _ => return Err(bad("expected http(s)://host[:port]")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("missing the host"));
        }
        if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
            return Err(bad("an endpoint is a scheme, a host and a port, without a path"));
        }
    }
    if o.read_timeout.is_zero() {
        return Err(StorageError::InvalidOption {
            option: "read_timeout",
            value: format!("{:?}", o.read_timeout),
            reason: "a read must be allowed some time".to_string(),
        });
    }
    if let Some(region) = &o.region
        && (region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return Err(StorageError::InvalidOption {
            option: "region",
            value: region.clone(),
            reason: "expected a region name such as us-east-1".to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(url: &str) -> Result<BackupStorage, StorageError> {
        BackupStorage::parse(url, S3Options::default())
    }

    fn s3_parts(storage: BackupStorage) -> (String, String) {
        match storage {
            BackupStorage::S3(s) => (s.bucket, s.prefix),
            other => panic!("not S3: {other:?}"),
        }
    }

    #[test]
    fn backup_location_paths_and_file_urls_are_the_local_filesystem() {
        for (url, root) in [
            ("/var/lib/nimbus/backups", "/var/lib/nimbus/backups"),
            ("backups", "backups"),
            ("./a/b", "./a/b"),
            ("file:///var/lib/nimbus/backups", "/var/lib/nimbus/backups"),
            ("FILE:///x", "/x"),
        ] {
            assert_eq!(s3(url).unwrap(), BackupStorage::Local { root: PathBuf::from(root) }, "{url}");
        }
    }

    #[test]
    fn backup_location_s3_urls_give_the_bucket_and_the_prefix() {
        assert_eq!(s3_parts(s3("s3://backups").unwrap()), ("backups".into(), "".into()));
        assert_eq!(s3_parts(s3("s3://backups/").unwrap()), ("backups".into(), "".into()));
        assert_eq!(
            s3_parts(s3("s3://my.bucket-1/nimbus/prod/").unwrap()),
            ("my.bucket-1".into(), "nimbus/prod".into())
        );
        assert_eq!(s3("s3://b-1/p").unwrap().to_string(), "s3://b-1/p");
        assert_eq!(s3("s3://b-1").unwrap().to_string(), "s3://b-1");
    }

    #[test]
    fn backup_location_refuses_bad_urls_saying_why() {
        for (url, why) in [
            ("", "empty"),
            ("gs://bucket/x", "unknown scheme \"gs\""),
            ("http://bucket/x", "unknown scheme \"http\""),
            ("s3://", "missing the bucket"),
            ("s3:///prefix", "missing the bucket"),
            ("s3://Bucket/x", "invalid bucket name \"Bucket\""),
            ("s3://ab", "invalid bucket name"),
            ("s3://-bucket", "invalid bucket name"),
            ("s3://a..b", "invalid bucket name"),
            ("s3://bucket/a//b", "empty segment"),
            ("s3://bucket/a/../b", "invalid backup prefix segment \"..\""),
            ("s3://bucket/a b", "invalid backup prefix segment"),
            ("s3://bucket/x?region=eu-west-1", "query strings"),
            ("file://server/share", "three slashes"),
        ] {
            let err = s3(url).unwrap_err();
            assert!(matches!(err, StorageError::InvalidUrl { .. }), "{url}: {err:?}");
            let message = err.to_string();
            assert!(message.starts_with(&format!("invalid backup location {url:?}: ")), "{message}");
            assert!(message.contains(why), "{url}: {message}");
        }
    }

    #[test]
    fn backup_location_checks_the_s3_options() {
        let with = |endpoint: &str, allow_http: bool| {
            BackupStorage::parse(
                "s3://bucket",
                S3Options { endpoint: Some(endpoint.to_string()), allow_http, ..S3Options::default() },
            )
        };
        with("https://minio.storage:9000", false).unwrap();
        with("http://127.0.0.1:9000/", true).unwrap();
        for (endpoint, allow_http, why) in [
            ("http://127.0.0.1:9000", false, "needs allow_http"),
            ("ftp://host", true, "expected http(s)"),
            ("minio:9000", true, "expected http(s)"),
            ("https://host/bucket", false, "without a path"),
            ("not a url", true, "not a URL"),
        ] {
            let err = with(endpoint, allow_http).unwrap_err();
            assert!(err.to_string().contains(why), "{endpoint}: {err}");
            assert!(err.to_string().starts_with("invalid S3 option endpoint"), "{err}");
        }
        let region = |r: &str| {
            BackupStorage::parse("s3://bucket", S3Options { region: Some(r.to_string()), ..S3Options::default() })
        };
        region("eu-west-3").unwrap();
        assert!(region("EU WEST").unwrap_err().to_string().contains("region"));
        // Options of a local location are not looked at.
        BackupStorage::parse("/x", S3Options { region: Some("BAD".into()), ..S3Options::default() }).unwrap();
    }

    #[test]
    fn backup_location_credentials_come_whole_or_not_at_all() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let from_env = S3Credentials::Environment;
        let keys = |key_id: &str, secret: &str, token: Option<&str>| Signer::Keys {
            key_id: key_id.into(),
            secret: secret.into(),
            token: token.map(str::to_owned),
        };
        assert_eq!(signer(&from_env, env(&[])).unwrap(), Signer::InstanceMetadata);
        assert_eq!(
            signer(&from_env, env(&[(ENV_ACCESS_KEY_ID, "AK"), (ENV_SECRET_ACCESS_KEY, "SK")])).unwrap(),
            keys("AK", "SK", None)
        );
        assert_eq!(
            signer(
                &from_env,
                env(&[(ENV_ACCESS_KEY_ID, "AK"), (ENV_SECRET_ACCESS_KEY, "SK"), (ENV_SESSION_TOKEN, "T")])
            )
            .unwrap(),
            keys("AK", "SK", Some("T"))
        );
        let err = signer(&from_env, env(&[(ENV_ACCESS_KEY_ID, "AK")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "incomplete S3 credentials: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"
        );
        let err = signer(&from_env, env(&[(ENV_ACCESS_KEY_ID, ""), (ENV_SECRET_ACCESS_KEY, "SK")])).unwrap_err();
        assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"), "{err}");
        let half =
            S3Credentials::Static { access_key_id: "AK".into(), secret_access_key: String::new(), session_token: None };
        assert!(signer(&half, env(&[])).is_err());
    }

    #[test]
    fn backup_location_uses_the_service_accounts_web_identity_when_no_key_pair_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "eyJ...").unwrap();
        let token = token.to_str().unwrap().to_owned();
        let vars = |pairs: Vec<(&'static str, String)>| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        };
        let role = "arn:aws:iam::123456789012:role/nimbus-backups".to_string();
        let from_env = S3Credentials::Environment;
        let irsa = vars(vec![(ENV_WEB_IDENTITY_TOKEN_FILE, token.clone()), (ENV_ROLE_ARN, role.clone())]);
        assert_eq!(
            signer(&from_env, irsa).unwrap(),
            Signer::WebIdentity {
                token_file: token.clone(),
                role_arn: role.clone(),
                session_name: None,
                sts_endpoint: None
            }
        );
        // A key pair in the environment comes first, as in AWS's SDKs.
        let both = vars(vec![
            (ENV_ACCESS_KEY_ID, "AK".into()),
            (ENV_SECRET_ACCESS_KEY, "SK".into()),
            (ENV_WEB_IDENTITY_TOKEN_FILE, token.clone()),
            (ENV_ROLE_ARN, role.clone()),
        ]);
        assert!(matches!(signer(&from_env, both).unwrap(), Signer::Keys { .. }));
        // Given keys are used whatever the environment says.
        let given =
            S3Credentials::Static { access_key_id: "AK".into(), secret_access_key: "SK".into(), session_token: None };
        let irsa = vars(vec![(ENV_WEB_IDENTITY_TOKEN_FILE, token.clone()), (ENV_ROLE_ARN, role.clone())]);
        assert!(matches!(signer(&given, irsa).unwrap(), Signer::Keys { .. }));
        // Half a web identity, or a token file that is not there, says what is wrong.
        let err = signer(&from_env, vars(vec![(ENV_ROLE_ARN, role.clone())])).unwrap_err();
        assert!(err.to_string().contains("AWS_ROLE_ARN is set but AWS_WEB_IDENTITY_TOKEN_FILE is not"), "{err}");
        let err = signer(&from_env, vars(vec![(ENV_WEB_IDENTITY_TOKEN_FILE, token.clone())])).unwrap_err();
        assert!(err.to_string().contains("AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not"), "{err}");
        let missing = vars(vec![(ENV_WEB_IDENTITY_TOKEN_FILE, "/nonexistent/token".into()), (ENV_ROLE_ARN, role)]);
        let err = signer(&from_env, missing).unwrap_err();
        assert!(err.to_string().contains("names /nonexistent/token, which cannot be read"), "{err}");
    }

    #[test]
    fn backup_location_never_shows_a_secret() {
        let storage = BackupStorage::parse(
            "s3://bucket/p",
            S3Options {
                credentials: S3Credentials::Static {
                    access_key_id: "AKID".into(),
                    secret_access_key: "very-secret".into(),
                    session_token: Some("token-secret".into()),
                },
                ..S3Options::default()
            },
        )
        .unwrap();
        let shown = format!("{storage:?} {storage}");
        assert!(shown.contains("AKID") && !shown.contains("secret\"") && !shown.contains("very-secret"), "{shown}");
        assert!(!shown.contains("token-secret"), "{shown}");
    }

    #[tokio::test]
    async fn backup_location_opens_a_local_directory_and_an_s3_client_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("made/here");
        let opened = BackupStorage::parse(root.to_str().unwrap(), S3Options::default()).unwrap().open().unwrap();
        assert!(root.is_dir());
        assert_eq!(opened.prefix, "");
        let inc = Incarnation::new("i1").unwrap();
        let store = opened.backup_store("playground", "shop", &inc).unwrap();
        assert!(store.list_fulls().await.unwrap().complete.is_empty());

        let s3 = BackupStorage::parse(
            "s3://bucket/nimbus",
            S3Options {
                endpoint: Some("http://127.0.0.1:1".into()),
                allow_http: true,
                credentials: S3Credentials::Static {
                    access_key_id: "AK".into(),
                    secret_access_key: "SK".into(),
                    session_token: None,
                },
                ..S3Options::default()
            },
        )
        .unwrap();
        let opened = s3.open_with(|_| None).unwrap();
        assert_eq!(opened.prefix, "nimbus");
        assert_eq!(opened.backup_store("ns", "shop", &inc).unwrap().location().root().as_ref(), "nimbus/ns/shop/i1");
        // A bad database name is refused by the layout's rule.
        assert!(opened.backup_store("ns", "a/b", &inc).is_err());
    }
}
