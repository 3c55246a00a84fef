//! The playground's secrets, in `DIR/secrets/` (mode 0700, files 0600): the cluster secret
//! every internal request carries, and the etcd users' passwords. Made once, on the first
//! `up` with a directory, and kept with its data.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nimbus_net::{ClusterSecret, EtcdArgs};

use nimbus_operator::controlplane::etcd_access::{GATEWAY_USER, OPERATOR_USER, ROOT_USER};

pub const DIR: &str = "secrets";
pub const CLUSTER_SECRET_FILE: &str = "cluster-secret";

pub struct Secrets {
    pub dir: PathBuf,
}

/// Writes `content` to a new file readable by its owner only; an existing file is kept.
fn create_private(path: &Path, content: &str) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut f) => {
            f.write_all(content.as_bytes())?;
            f.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Secrets {
    /// The secrets of playground directory `dir`, made if missing.
    pub fn ensure(dir: &Path) -> anyhow::Result<Secrets> {
        let sdir = dir.join(DIR);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&sdir)?;
        std::fs::set_permissions(&sdir, std::fs::Permissions::from_mode(0o700))?;
        let s = Secrets { dir: sdir };
        create_private(&s.cluster_secret_file(), &format!("{}\n", ClusterSecret::generate()))?;
        for user in [ROOT_USER, OPERATOR_USER, GATEWAY_USER] {
            create_private(&s.password_file(user), &ClusterSecret::generate())?;
        }
        Ok(s)
    }

    /// The secrets of a running playground (nothing made).
    pub fn of(dir: &Path) -> Secrets {
        Secrets { dir: dir.join(DIR) }
    }

    pub fn cluster_secret_file(&self) -> PathBuf {
        self.dir.join(CLUSTER_SECRET_FILE)
    }

    pub fn cluster_secret(&self) -> anyhow::Result<ClusterSecret> {
        ClusterSecret::from_file(&self.cluster_secret_file()).context("failed to read the playground's cluster secret")
    }

    pub fn password_file(&self, user: &str) -> PathBuf {
        self.dir.join(format!("etcd-{user}.password"))
    }

    pub fn password(&self, user: &str) -> anyhow::Result<String> {
        let p = self.password_file(user);
        Ok(std::fs::read_to_string(&p).with_context(|| format!("failed to read {}", p.display()))?.trim().to_owned())
    }

    /// How `user` connects to the playground's etcd.
    pub fn etcd(&self, endpoint: &str, user: &str) -> EtcdArgs {
        EtcdArgs::with_user(&[endpoint.to_owned()], user, self.password_file(user))
    }
}
