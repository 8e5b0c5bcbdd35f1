//! Target policy: which hosts and addresses a check may connect to at all.
//!
//! A process that connects wherever the gateway says, with privileged credentials in hand, must
//! not become a way into the networks around it. Always denied, whatever the allowlist says:
//! unspecified, multicast, broadcast, link-local and cloud metadata addresses; loopback unless
//! explicitly allowed. Checked on the resolved addresses, so a DNS name pointing at a denied
//! address is denied too. With `allow_dns_suffixes` set, an IP literal is refused unless it
//! falls in `allow_networks`: addressing a host by IP must not step around the name policy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address an IP literal (optionally in brackets) names.
pub fn is_ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// A CIDR network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `10.0.0.0/8`, `2001:db8::/32` or a single address.
    pub fn parse(s: &str) -> Result<Network, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.trim()
                .parse::<u8>()
                .map_err(|_| format!("{s:?}: bad prefix length"))?
        };
        if prefix > max {
            return Err(format!("{s:?}: prefix length above {max}"));
        }
        Ok(Network { addr, prefix })
    }

    /// True when `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The validated policy.
#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    /// Loopback targets allowed (test fleets, local tunnels).
    pub allow_loopback: bool,
    /// Allowed networks; empty = any.
    pub networks: Vec<Network>,
    /// Allowed DNS suffixes (lower case, no leading dot); empty = any.
    pub dns_suffixes: Vec<String>,
    /// Allowed ports; empty = any.
    pub ports: Vec<u16>,
}

/// Why a target is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What was refused (the host, the port or an address).
    pub subject: String,
    /// Why.
    pub reason: &'static str,
}

const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

impl TargetPolicy {
    /// Checks the host name (for non-literals) and the port before any traffic.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), Refusal> {
        if !self.ports.is_empty() && !self.ports.contains(&port) {
            return Err(Refusal {
                subject: port.to_string(),
                reason: "port not in policy.allow_ports",
            });
        }
        if self.dns_suffixes.is_empty() {
            return Ok(());
        }
        // With DNS suffixes configured, an address is not a way around them: an IP literal is
        // allowed only when it falls in policy.allow_networks (checked again, like every
        // resolved address, by `check_addr`).
        if let Some(ip) = is_ip_literal(host) {
            return if self.networks.iter().any(|n| n.contains(ip)) {
                Ok(())
            } else {
                Err(Refusal {
                    subject: host.to_owned(),
                    reason: "IP literal with policy.allow_dns_suffixes set: only addresses in policy.allow_networks are allowed",
                })
            };
        }
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        let ok = self
            .dns_suffixes
            .iter()
            .any(|s| h == *s || h.ends_with(&format!(".{s}")));
        if ok {
            Ok(())
        } else {
            Err(Refusal {
                subject: host.to_owned(),
                reason: "host name not under policy.allow_dns_suffixes",
            })
        }
    }

    /// Checks one resolved address.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        let denied = |reason| {
            Err(Refusal {
                subject: ip.to_string(),
                reason,
            })
        };
        let always = match ip {
            IpAddr::V4(v4) => {
                if v4 == METADATA_V4 {
                    Some("cloud metadata address")
                } else if v4.is_link_local() {
                    Some("link-local address")
                } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                    Some("unspecified, broadcast or multicast address")
                } else {
                    None
                }
            }
            IpAddr::V6(v6) => {
                if v6 == METADATA_V6 {
                    Some("cloud metadata address")
                } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    Some("link-local address")
                } else if v6.is_unspecified() || v6.is_multicast() {
                    Some("unspecified or multicast address")
                } else {
                    None
                }
            }
        };
        if let Some(reason) = always {
            return denied(reason);
        }
        if ip.is_loopback() {
            return if self.allow_loopback {
                Ok(())
            } else {
                denied("loopback address (set policy.allow_loopback to probe local targets)")
            };
        }
        if !self.networks.is_empty() && !self.networks.iter().any(|n| n.contains(ip)) {
            return denied("address not in policy.allow_networks");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn always_denied_set() {
        let p = TargetPolicy::default();
        for a in [
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "fd00:ec2::254",
            "fe80::1",
            "::",
            "ff02::1",
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(p.check_addr(ip(a)).is_err(), "{a}");
        }
        assert!(p.check_addr(ip("10.1.2.3")).is_ok());
        let lo = TargetPolicy {
            allow_loopback: true,
            ..TargetPolicy::default()
        };
        assert!(lo.check_addr(ip("127.0.0.5")).is_ok());
        // The metadata address stays denied even with an allowlist that covers it.
        let wide = TargetPolicy {
            networks: vec![Network::parse("0.0.0.0/0").expect("net")],
            ..TargetPolicy::default()
        };
        assert!(wide.check_addr(ip("169.254.169.254")).is_err());
    }

    #[test]
    fn allowlists() {
        let p = TargetPolicy {
            networks: vec![
                Network::parse("10.0.0.0/8").expect("net"),
                Network::parse("2001:db8::/32").expect("net"),
            ],
            dns_suffixes: vec!["corp.example".into()],
            ports: vec![3389],
            ..TargetPolicy::default()
        };
        assert!(p.check_addr(ip("10.200.0.1")).is_ok());
        assert!(p.check_addr(ip("11.0.0.1")).is_err());
        assert!(p.check_addr(ip("2001:db8::5")).is_ok());
        assert!(p.check_name("rdp1.corp.example", 3389).is_ok());
        assert!(p.check_name("corp.example.evil.test", 3389).is_err());
        assert!(p.check_name("rdp1.corp.example", 22).is_err());
        // IP literals do not step around the DNS suffixes: only those in allow_networks pass.
        assert!(p.check_name("10.1.2.3", 3389).is_ok());
        assert!(p.check_name("[2001:db8::5]", 3389).is_ok());
        assert!(p.check_name("192.0.2.7", 3389).is_err());
        assert!(p.check_name("::ffff:192.0.2.7", 3389).is_err());
        let names_only = TargetPolicy {
            dns_suffixes: vec!["corp.example".into()],
            ..TargetPolicy::default()
        };
        assert!(names_only.check_name("10.1.2.3", 3389).is_err());
        // Numeric spellings the system resolver accepts are names here, and not under a suffix.
        assert!(names_only.check_name("127.1", 3389).is_err());
        assert!(names_only.check_name("0x7f000001", 3389).is_err());
        // Without suffixes, literals are judged on their address alone.
        assert!(TargetPolicy::default().check_name("192.0.2.7", 3389).is_ok());
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("nope").is_err());
    }
}
