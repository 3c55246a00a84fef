//! Zones as Linux network namespaces (`nimbus playground up --isolate-zones`), so that a
//! zone can be cut off from the others for real: each zone's datanodes run in their own
//! namespace, joined to a bridge in the host's namespace by a veth pair; etcd, the gateway
//! and the control plane stay on the host and reach every zone through the bridge.
//!
//! ```text
//!   host: bridge <p>br 10.S.0.1/24 ── veth <p><z>h ═ <p><z>n 10.S.0.(10+i)  namespace <p>-<z>
//! ```
//!
//! A zone is *partitioned* by iptables rules inside its own namespace that drop traffic
//! to and from the other zones (the gateway still reaches it, as a gateway in that zone
//! would), and *isolated* by taking its host-side link down (nothing reaches it). Only
//! the namespaces and links made here are touched; the host's tables are not.
//! Needs root (CAP_NET_ADMIN), `ip` (iproute2) and `iptables`.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The playground's network, remembered in `state.json` so that `up` again uses the same
/// addresses (members know each other by address).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Prefix of every namespace and link name (short: Linux allows 15 characters).
    pub prefix: String,
    /// Second octet of the 10.S.0.0/24 subnet.
    pub subnet: u8,
    /// The address of each zone's namespace.
    pub hosts: BTreeMap<String, String>,
}

/// What a zone is going through, set with `nimbus playground zone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum ZoneState {
    #[default]
    Up,
    /// Every process in the zone killed and kept down (a zone outage).
    Down,
    /// Cut off from the other zones; the host (gateway, control plane) still reaches it.
    Partitioned,
    /// Cut off from everything.
    Isolated,
}

impl std::str::FromStr for ZoneState {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<ZoneState> {
        Ok(match s {
            "up" => ZoneState::Up,
            "down" => ZoneState::Down,
            "partitioned" | "partition" => ZoneState::Partitioned,
            "isolated" | "isolate" => ZoneState::Isolated,
            other => bail!("unknown zone state {other:?}: use up, down, partition or isolate"),
        })
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| {
        format!("failed to run {}: --isolate-zones needs iproute2 and iptables (scripts/setup.sh)", args[0])
    })?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {} (--isolate-zones needs root or CAP_NET_ADMIN)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Network {
    /// A new network for `zones`, on a subnet and prefix no existing link uses.
    pub fn choose(zones: &[String]) -> anyhow::Result<Network> {
        let links = String::from_utf8_lossy(&Command::new("ip").args(["-o", "addr"]).output()?.stdout).into_owned();
        let seed = std::process::id() as usize;
        let subnet = (0..50)
            .map(|i| 200 + ((seed + i) % 50) as u8)
            .find(|s| !links.contains(&format!(" 10.{s}.")))
            .context("no free 10.x.0.0/24 subnet for the playground's zones")?;
        let prefix = format!("nb{:04x}", rand::random::<u16>());
        let hosts = zones.iter().enumerate().map(|(i, z)| (z.clone(), format!("10.{subnet}.0.{}", 10 + i))).collect();
        Ok(Network { prefix, subnet, hosts })
    }

    pub fn namespace(&self, zone: &str) -> String {
        format!("{}-{zone}", self.prefix)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    fn host_link(&self, zone: &str) -> String {
        format!("{}{zone}h", self.prefix)
    }

    fn gateway_ip(&self) -> String {
        format!("10.{}.0.1", self.subnet)
    }

    /// Creates the bridge, the namespaces and their links (after removing any left over).
    pub fn create(&self) -> anyhow::Result<()> {
        self.remove();
        let (br, gw) = (self.bridge(), self.gateway_ip());
        run(&["ip", "link", "add", &br, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{gw}/24"), "dev", &br])?;
        run(&["ip", "link", "set", &br, "up"])?;
        for (zone, ip) in &self.hosts {
            let (ns, host, inner) = (self.namespace(zone), self.host_link(zone), format!("{}{zone}n", self.prefix));
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            run(&["ip", "link", "set", &host, "master", &br, "up"])?;
            run(&["ip", "link", "set", &inner, "netns", &ns])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner])?;
            run(&["ip", "-n", &ns, "link", "set", &inner, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Removes what `create` made (deleting a namespace deletes its veth pair).
    pub fn remove(&self) {
        for zone in self.hosts.keys() {
            let _ = run(&["ip", "netns", "del", &self.namespace(zone)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge()]);
    }

    /// Applies a zone's network state: cut off from the other zones, from everything, or
    /// neither (`Up` and `Down` heal the network; `Down` is about processes).
    pub fn apply(&self, zone: &str, state: ZoneState) -> anyhow::Result<()> {
        let ns = self.namespace(zone);
        let host_link = self.host_link(zone);
        // Heal first, then cut: the rules and the link always end as `state` says.
        run(&["ip", "netns", "exec", &ns, "iptables", "-F", "INPUT"])?;
        run(&["ip", "netns", "exec", &ns, "iptables", "-F", "OUTPUT"])?;
        run(&["ip", "link", "set", &host_link, "up"])?;
        match state {
            ZoneState::Up | ZoneState::Down => {}
            ZoneState::Isolated => run(&["ip", "link", "set", &host_link, "down"])?,
            ZoneState::Partitioned => {
                for (other, ip) in &self.hosts {
                    if other == zone {
                        continue;
                    }
                    run(&["ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", ip, "-j", "DROP"])?;
                    run(&["ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", ip, "-j", "DROP"])?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_limits_and_addresses_are_per_zone() {
        let zones: Vec<String> = ["a", "b", "c"].iter().map(|z| z.to_string()).collect();
        let n = Network::choose(&zones).unwrap();
        for z in &zones {
            assert!(n.host_link(z).len() <= 15 && format!("{}{z}n", n.prefix).len() <= 15);
        }
        assert!(n.bridge().len() <= 15);
        let ips: std::collections::BTreeSet<&String> = n.hosts.values().collect();
        assert_eq!(ips.len(), 3);
        assert!(n.hosts["a"].starts_with(&format!("10.{}.0.", n.subnet)));
    }

    #[test]
    fn zone_states_parse_from_the_command_line() {
        assert_eq!("partition".parse::<ZoneState>().unwrap(), ZoneState::Partitioned);
        assert_eq!("down".parse::<ZoneState>().unwrap(), ZoneState::Down);
        assert!("sideways".parse::<ZoneState>().is_err());
    }
}
