//! Connecting to etcd as a component with its own identity: TLS with a client certificate
//! (the chart's etcd: the certificate's common name is the etcd user), or a user and
//! password (the playground's etcd). Either way the user has a role with only the key
//! ranges that component needs (see `docs/security.md`).

use std::path::PathBuf;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    #[error("failed to read {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("failed to connect to etcd: {0}")]
    Connect(#[from] etcd_client::Error),
}

/// etcd endpoints and credentials, as flags (flattened into each binary's configuration).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (`https://...` with --etcd-ca-file).
    #[arg(long = "etcd", env = "NIMBUS_ETCD", value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// PEM CA certificate that signed etcd's server certificate: connect with TLS.
    #[arg(long, env = "NIMBUS_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate (its common name is the etcd user), with --etcd-key-file.
    #[arg(long, env = "NIMBUS_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(long, env = "NIMBUS_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user to authenticate as with a password (--etcd-password-file).
    #[arg(long, env = "NIMBUS_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "NIMBUS_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

fn read(what: &'static str, path: &PathBuf) -> Result<String, EtcdConfigError> {
    std::fs::read_to_string(path).map_err(|source| EtcdConfigError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl EtcdArgs {
    /// Plain endpoints, no credentials (tests of etcd without authentication).
    pub fn plain(endpoints: &[String]) -> EtcdArgs {
        EtcdArgs { endpoints: endpoints.to_vec(), ..Default::default() }
    }

    /// With a user and its password file.
    pub fn with_user(endpoints: &[String], user: &str, password_file: PathBuf) -> EtcdArgs {
        EtcdArgs {
            endpoints: endpoints.to_vec(),
            etcd_user: Some(user.to_owned()),
            etcd_password_file: Some(password_file),
            ..Default::default()
        }
    }

    /// `base` with this configuration's TLS and credentials added.
    pub fn options(&self, mut base: ConnectOptions) -> Result<ConnectOptions, EtcdConfigError> {
        if let Some(ca) = &self.etcd_ca_file {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("the etcd CA", ca)?));
            if let (Some(cert), Some(key)) = (&self.etcd_cert_file, &self.etcd_key_file) {
                tls = tls.identity(Identity::from_pem(
                    read("the etcd client certificate", cert)?,
                    read("the etcd client key", key)?,
                ));
            }
            base = base.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.etcd_user, &self.etcd_password_file) {
            let password = read("the etcd password", file)?;
            // A revoked or expired auth token is refreshed transparently.
            base = base.with_user(user.clone(), password.trim_end().to_owned()).with_auto_token_refresh(true);
        }
        Ok(base)
    }

    /// Connects with `base` options plus this configuration's TLS and credentials.
    pub async fn connect(&self, base: ConnectOptions) -> Result<Client, EtcdConfigError> {
        Ok(Client::connect(self.endpoints.clone(), Some(self.options(base)?)).await?)
    }
}
