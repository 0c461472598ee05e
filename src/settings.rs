//! Datapath settings: NAT ports, SNAT addresses, timeouts, table sizes. They
//! become the program's load-time constants (and the tables' sizes). One
//! parser and one validation serve the CLI and the configuration file.

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use anyhow::{bail, Context, Result};

use crate::maglev;
use crate::skel::lb::types::lb_limits;

/// Most NAT port ranges (bpf/lb.h `LB_MAX_PORT_RANGES`).
pub const MAX_PORT_RANGES: usize = lb_limits::LB_MAX_PORT_RANGES.0 as usize;
/// Most SNAT addresses (bpf/lb.h `LB_MAX_SNAT`).
pub const MAX_SNAT: usize = lb_limits::LB_MAX_SNAT.0 as usize;
/// How long a half-open TCP flow waits for its answer, seconds.
pub const SYN_TIMEOUT: u32 = 10;
/// How long a backend keeps a closed connection in TIME_WAIT (Linux:
/// TCP_TIMEWAIT_LEN, 60 s), plus a second: until then its tuple goes to
/// nobody but the same client address.
pub const TIME_WAIT: u32 = 61;
/// Lowest NAT port.
pub const FIRST_PORT: u16 = 1024;

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    /// Never: a range has at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn overlaps(&self, r: &RangeInclusive<u16>) -> bool {
        self.lo <= *r.end() && *r.start() <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// NAT port ranges as written: `LO-HI[,LO-HI]`.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (lo, hi) = part
            .split_once('-')
            .with_context(|| format!("'{part}' is not LO-HI"))?;
        let p = |v: &str| {
            v.trim()
                .parse::<u16>()
                .with_context(|| format!("'{v}' is not a port"))
        };
        out.push(PortRange {
            lo: p(lo)?,
            hi: p(hi)?,
        });
    }
    Ok(out)
}

/// Ranges as `parse_ports` reads them.
pub fn ports_string(r: &[PortRange]) -> String {
    r.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// SNAT addresses as written: `ADDR[,ADDR...]`.
/// Either family parses; [`Settings::validate`] says which the datapath
/// takes.
pub fn parse_snat(s: &str) -> Result<Vec<IpAddr>> {
    s.split(',')
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .with_context(|| format!("'{}' is not an IP address", a.trim()))
        })
        .collect()
}

mod ports_serde {
    use super::{parse_ports, ports_string, PortRange};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &[PortRange], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&ports_string(r))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PortRange>, D::Error> {
        let s = String::deserialize(d)?;
        parse_ports(&s).map_err(serde::de::Error::custom)
    }
}

/// How the datapath is set up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// NAT source ports towards backends (one or two ranges), on addresses
    /// the host also uses for its own connections.
    #[serde(with = "ports_serde")]
    pub nat_ports: Vec<PortRange>,
    /// Source addresses towards backends (empty: the LB's address on the
    /// egress interface, from the FIB).
    pub snat: Vec<IpAddr>,
    /// Entries of every Maglev table (a prime).
    pub maglev_size: u32,
    /// Answered connections the connection table holds (two entries each).
    pub max_flows: u32,
    /// Half-open connections (not answered yet) the second table holds.
    pub max_half_open: u32,
    /// Idle TCP connection timeout, seconds.
    pub tcp_timeout: u32,
    /// Idle UDP flow timeout, seconds.
    pub udp_timeout: u32,
    /// How long a connection lingers after FIN or RST, seconds.
    pub fin_timeout: u32,
}

impl Default for Settings {
    /// The defaults for the current network namespace: every port from 1024
    /// the host's own connections do not use (net.ipv4.ip_local_port_range).
    fn default() -> Self {
        let eph = ephemeral_ports().unwrap_or(32768..=60999);
        Self {
            nat_ports: ports_outside(&eph),
            snat: Vec::new(),
            maglev_size: maglev::DEFAULT_SIZE,
            max_flows: 1 << 20,
            max_half_open: 1 << 18,
            tcp_timeout: 600,
            udp_timeout: 60,
            fin_timeout: 10,
        }
    }
}

/// The ports from 1024 outside `eph`: at most two ranges.
pub fn ports_outside(eph: &RangeInclusive<u16>) -> Vec<PortRange> {
    let mut out = Vec::new();
    if *eph.start() > FIRST_PORT {
        out.push(PortRange {
            lo: FIRST_PORT,
            hi: eph.start() - 1,
        });
    }
    if *eph.end() < u16::MAX {
        out.push(PortRange {
            lo: (*eph.end()).max(FIRST_PORT - 1) + 1,
            hi: u16::MAX,
        });
    }
    out
}

/// The host's ephemeral port range (current network namespace).
pub fn ephemeral_ports() -> Result<RangeInclusive<u16>> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let s = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok(lo..=hi),
        _ => bail!("cannot parse {path}: {s:?}"),
    }
}

impl Settings {
    /// Ports in all NAT ranges.
    pub fn nat_size(&self) -> u32 {
        self.nat_ports.iter().map(PortRange::len).sum()
    }

    /// Checks the settings, and that the NAT ports stay clear of the host's
    /// own ephemeral ports (current network namespace). SNAT addresses are
    /// checked against the host's addresses by [`crate::net::snat_check`].
    pub fn validate(&self) -> Result<()> {
        let ports = ports_string(&self.nat_ports);
        if self.nat_ports.is_empty() || self.nat_ports.len() > MAX_PORT_RANGES {
            bail!("NAT ports '{ports}': give one or two ranges LO-HI");
        }
        for r in &self.nat_ports {
            if r.lo < FIRST_PORT || r.lo > r.hi {
                bail!("NAT port range {r} is empty or starts below {FIRST_PORT}");
            }
        }
        if let [a, b] = self.nat_ports.as_slice() {
            if a.overlaps(&(b.lo..=b.hi)) {
                bail!("NAT port ranges {a} and {b} overlap");
            }
        }
        let eph = ephemeral_ports()?;
        if let Some(r) = self.nat_ports.iter().find(|r| r.overlaps(&eph)) {
            bail!(
                "NAT port range {r} overlaps the host's ephemeral ports {}-{} (net.ipv4.ip_local_port_range)",
                eph.start(),
                eph.end()
            );
        }
        if self.snat.len() > MAX_SNAT {
            bail!("{} SNAT addresses: at most {MAX_SNAT}", self.snat.len());
        }
        for (i, a) in self.snat.iter().enumerate() {
            if self.snat[..i].contains(a) {
                bail!("SNAT address {a} is given twice");
            }
            crate::model::check_snat(*a)?;
        }
        if !maglev::is_prime(self.maglev_size) || self.maglev_size > 1_000_003 {
            bail!(
                "Maglev table size {} must be a prime up to 1000003",
                self.maglev_size
            );
        }
        if self.max_flows < 1024 || self.max_flows > 64 << 20 {
            bail!("max flows {} out of range 1024..=67108864", self.max_flows);
        }
        if self.max_half_open < 1024 || self.max_half_open > 16 << 20 {
            bail!(
                "max half-open flows {} out of range 1024..=16777216",
                self.max_half_open
            );
        }
        for (name, v) in [
            ("tcp timeout", self.tcp_timeout),
            ("udp timeout", self.udp_timeout),
            ("fin timeout", self.fin_timeout),
        ] {
            if v == 0 || v > 86400 {
                bail!("{name} {v}s out of range 1..=86400");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_the_ephemeral_range() {
        let r = |lo, hi| PortRange { lo, hi };
        assert_eq!(
            ports_outside(&(32768..=60999)),
            vec![r(1024, 32767), r(61000, 65535)]
        );
        assert_eq!(ports_outside(&(1024..=60999)), vec![r(61000, 65535)]);
        assert_eq!(ports_outside(&(40000..=65535)), vec![r(1024, 39999)]);
    }

    #[test]
    fn port_ranges_parse_and_print() {
        let r = parse_ports("1024-32767, 61000-65535").unwrap();
        assert_eq!(ports_string(&r), "1024-32767,61000-65535");
        assert!(parse_ports("5-").is_err());
        assert!(parse_ports("x-5").is_err());
    }
}
