//! Where the playground's programs are: the workspace's binaries next to `nimbus` (or
//! named by `NIMBUS_<NAME>_BIN`), and the machine's packages (etcd) on PATH.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where the processes' binaries are: next to `nimbus`, or named by these variables.
pub const DATANODE_BIN: &str = "nimbus-datanode";
pub const GATEWAY_BIN: &str = "nimbus-gateway";
/// A binary next to this one (the workspace builds them together), or `NIMBUS_<NAME>_BIN`.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let env = format!("NIMBUS_{}_BIN", name.trim_start_matches("nimbus-").to_uppercase());
    if let Ok(p) = std::env::var(&env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    bail!("{name} not found next to {}: run `cargo build --workspace --bins` (or set {env})", exe.display())
}

/// A program of the machine's packages: on PATH, or in one of `also`.
pub fn system_binary(name: &str, also: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':').chain(also.iter().copied()).map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

/// The Debian etcd, found on PATH.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    system_binary("etcd", &["/usr/bin", "/usr/local/bin"])
        .context("etcd not found on PATH: run scripts/setup.sh (it installs Debian's etcd-server)")
}
