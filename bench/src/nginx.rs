//! nginx (Debian's) as a plain reverse proxy in front of one upstream, the way a user would
//! put one there: keep-alive connections to the upstream, HTTP/1.1, no access log (the
//! gateway keeps none per request either), one worker per core. Stopped on drop.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

pub struct Nginx {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn nginx_binary() -> anyhow::Result<std::path::PathBuf> {
    nimbus_playground::binaries::system_binary("nginx", &["/usr/sbin", "/usr/local/sbin"])
        .context("nginx not found: scripts/setup.sh installs Debian's nginx-light")
}

impl Nginx {
    /// Proxies everything to `upstream` (`host:port`), adding `headers` to each request.
    pub async fn start(upstream: &str, headers: &[(&str, &str)]) -> anyhow::Result<Nginx> {
        let dir = tempfile::Builder::new().prefix("nimbus-nginx-").tempdir()?;
        let port = nimbus_net::ports::free_port()?;
        let d = dir.path().display();
        let set: String = headers.iter().map(|(k, v)| format!("      proxy_set_header {k} \"{v}\";\n")).collect();
        let conf = format!(
            r#"worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 17m;
  keepalive_requests 100000;
  upstream datanode {{
    server {upstream};
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://datanode;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
{set}    }}
  }}
}}
"#
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let child = Command::new(nginx_binary()?)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start nginx")?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if std::time::Instant::now() > deadline {
                bail!(
                    "nginx did not listen within 10 s: {}",
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Nginx { url, child, _dir: dir })
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.id() else { return Vec::new() };
        let mut pids = vec![master];
        pids.extend(crate::children_of(master));
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The workers go with their master; SIGKILL to each makes sure.
        for pid in self.pids() {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}
