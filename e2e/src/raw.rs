//! HTTP/1.1 requests written byte for byte on a socket: nothing between the test and the
//! server normalises the path (no `..` resolved, no backslash rewritten, no percent
//! escape decoded), as an attacker's client would send them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// An answer: status (0 when the server closed without one) and body.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `host:port` of an `http://host:port` URL.
pub fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").trim_end_matches('/').to_owned()
}

/// Sends `target` (the request-target exactly as given: path, absolute URI, anything) with
/// `method`, `headers` and `body`, on a new connection; reads the answer to the end.
pub fn send(addr: &str, method: &str, target: &[u8], headers: &[(&str, &str)], body: Option<&[u8]>) -> RawAnswer {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: nimbus\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if let Some(b) = body {
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            req.extend_from_slice(b"Content-Type: application/json\r\n");
        }
        req.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        req.extend_from_slice(b);
    }
    send_bytes(addr, &req)
}

/// Writes `request` as is and reads the answer until the server closes. Reading goes on
/// while writing: a server may answer (413, 403) before it reads a large body, and close.
pub fn send_bytes(addr: &str, request: &[u8]) -> RawAnswer {
    let closed = RawAnswer { status: 0, head: String::new(), body: Vec::new() };
    let Ok(mut s) = TcpStream::connect(addr) else { return closed };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let Ok(mut writer) = s.try_clone() else { return closed };
    let request = request.to_vec();
    let written = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = written.join();
    parse(&buf)
}

fn parse(buf: &[u8]) -> RawAnswer {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return RawAnswer { status: 0, head: String::from_utf8_lossy(buf).into_owned(), body: Vec::new() };
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = buf[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    RawAnswer { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let Some(chunk) = b.get(start..start + size) else { break };
        out.extend_from_slice(chunk);
        b = b.get(start + size + 2..).unwrap_or_default();
    }
    out
}
