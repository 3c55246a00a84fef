//! A cluster secret for the processes a test starts: a file in a directory the test owns.

use std::path::{Path, PathBuf};

use nimbus_net::ClusterSecret;

pub const FILE: &str = "cluster-secret";

/// Writes a new cluster secret to `dir/cluster-secret` and returns it with its path.
pub fn write_new(dir: &Path) -> anyhow::Result<(ClusterSecret, PathBuf)> {
    let text = ClusterSecret::generate();
    let path = dir.join(FILE);
    std::fs::write(&path, &text)?;
    Ok((ClusterSecret::parse(&text)?, path))
}

/// A cluster secret in a temporary directory of its own, for a gateway started without a
/// replica set.
pub struct TestSecret {
    pub secret: ClusterSecret,
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestSecret {
    pub fn new() -> anyhow::Result<TestSecret> {
        let dir = tempfile::Builder::new().prefix("nimbus-secret-").tempdir()?;
        let (secret, file) = write_new(dir.path())?;
        Ok(TestSecret { secret, file, _dir: dir })
    }
}
