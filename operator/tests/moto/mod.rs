//! moto's S3-compatible server for the tests that need a bucket (`mod moto;` in each):
//! started on 127.0.0.1, port 0, with [`BUCKET`] made, and killed when its guard drops.
//! moto comes from `scripts/setup.sh`; without it the tests fail saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BUCKET: &str = "nimbus-backups";
/// How long moto may take to start (a cold Python import of moto is a few seconds).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// moto's server, killed and reaped when dropped (a failing test included).
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:{port}`.
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moto_server` from `scripts/setup.sh`'s virtualenv, else from `PATH`.
fn moto_binary() -> PathBuf {
    let tools = std::env::var_os("NIMBUS_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nimbus/tools")));
    if let Some(bin) = tools.map(|t| t.join("moto/bin/moto_server")).filter(|b| b.is_file()) {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("moto_server"))
        .find(|b| b.is_file());
    on_path.unwrap_or_else(|| {
        panic!("moto_server not found (in ~/.cache/nimbus/tools/moto or on PATH): run scripts/setup.sh")
    })
}

/// Starts moto on port 0, learns the port from its "Running on" line, waits until it
/// answers and creates [`BUCKET`].
pub fn start_moto() -> Moto {
    let bin = moto_binary();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {} ({e}): run scripts/setup.sh", bin.display()));
    let mut moto = Moto { child, endpoint: String::new() };
    let stderr = moto.child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Reads moto's log to its end (a full pipe would block the server), sending the port
    // once and every line before it (shown when it never comes).
    std::thread::spawn(move || {
        let prefix = "Running on http://127.0.0.1:";
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let port = line.split_once(prefix).and_then(|(_, rest)| rest.trim().parse::<u16>().ok());
            let _ = tx.send((line, port));
        }
    });
    let deadline = Instant::now() + START_DEADLINE;
    let mut seen = Vec::new();
    let port = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, Some(port))) => break port,
            Ok((line, None)) => seen.push(line),
            Err(e) => panic!("moto did not say its port ({e}); its output: {seen:#?}"),
        }
    };
    moto.endpoint = format!("http://127.0.0.1:{port}");
    // Creating the bucket is the readiness probe (moto does not check signatures).
    loop {
        match raw_request(port, &format!("PUT /{BUCKET} HTTP/1.1")) {
            Ok(200) => break,
            Ok(status) => panic!("moto answered {status} to creating the bucket"),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("moto did not answer on port {port}: {e}"),
        }
    }
    moto
}

/// One HTTP/1.1 request without a body; the status code of the answer.
fn raw_request(port: u16, request_line: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{request_line}\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok());
    status.ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:?}")))
}
