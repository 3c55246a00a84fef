//! Ports for servers a test or the playground starts as separate processes: a port must be
//! chosen before the process binds it, and nothing else may take it in between.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// The lowest port [`free_port`] hands out: above the well-known and most registered ones.
pub const LOWEST_PORT: u16 = 10_000;

/// A port free on 127.0.0.1 when asked, for a server another process binds later.
///
/// Chosen at random below the kernel's ephemeral range (`ip_local_port_range`), never
/// from it: a port from that range, free when asked, can be taken by any outgoing
/// connection's source port before its server binds it (a playground member whose port was
/// taken so never started). Never the same port twice in one process. Falls back to a port
/// the OS picks when none is found below the range.
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let below = ephemeral_low();
    if below > LOWEST_PORT + 1_000 {
        for _ in 0..200 {
            let port = rand::random_range(LOWEST_PORT..below);
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    given.insert(port);
    Ok(port)
}

/// The first port of the kernel's ephemeral range (32768 where it cannot be read).
pub fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic is how a test fails

    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
        for p in &ports {
            assert!((LOWEST_PORT..low).contains(p), "port {p} is not below the ephemeral range ({low})");
            std::net::TcpListener::bind(("127.0.0.1", *p)).unwrap();
        }
    }
}
