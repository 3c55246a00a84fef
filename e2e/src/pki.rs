//! A throw-away certificate authority for tests, made with the `openssl` command
//! (`scripts/setup.sh` installs it): a CA, server certificates for 127.0.0.1, and client
//! certificates whose common name is an etcd user.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

pub struct Pki {
    pub dir: PathBuf,
}

/// A certificate and its key.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("openssl (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Pki {
    /// A new CA in `dir` (`ca.crt`, `ca.key`).
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        openssl(
            &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
                .into_iter()
                .chain(["-subj", "/CN=nimbus-test-ca", "-keyout", "ca.key", "-out", "ca.crt"])
                .collect::<Vec<_>>(),
            dir,
        )?;
        Ok(Pki { dir: dir.to_owned() })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A certificate named `name` with common name `cn`, for server and client use, valid
    /// for 127.0.0.1 and localhost.
    pub fn issue(&self, name: &str, cn: &str) -> anyhow::Result<Issued> {
        let (key, csr, cert, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        std::fs::write(
            self.dir.join(&ext),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        let subj = format!("/CN={cn}");
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &subj,
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            &self.dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            &self.dir,
        )?;
        Ok(Issued { cert: self.dir.join(cert), key: self.dir.join(key) })
    }
}
