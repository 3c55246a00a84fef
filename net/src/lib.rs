//! nimbus-net: how Nimbus components reach each other. The cluster secret every internal
//! request carries (and every internal server checks), and etcd connections with the
//! component's own identity (TLS client certificate or user and password).

pub mod cluster;
pub mod etcd;
pub mod ports;

pub use cluster::ClusterSecret;
pub use etcd::EtcdArgs;

use std::path::PathBuf;

/// The cluster secret file, as a flag (flattened into each binary's configuration).
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// File of cluster secrets, one per line: the first is sent on internal requests, every
    /// one is accepted (rotation). Required: no component serves or calls without it.
    #[arg(long, env = "NIMBUS_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: PathBuf,
}

impl ClusterArgs {
    pub fn load(&self) -> Result<ClusterSecret, cluster::SecretError> {
        ClusterSecret::from_file(&self.cluster_secret_file)
    }
}
