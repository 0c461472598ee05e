//! Datapath settings: NAT port range, timeouts, table sizes. They become the
//! program's load-time constants (and the connection table's size).

use std::fs;
use std::ops::RangeInclusive;

use anyhow::{bail, Context, Result};

use crate::maglev;

/// How the datapath is set up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// First NAT source port towards backends.
    pub nat_port_lo: u16,
    /// Last NAT source port (inclusive).
    pub nat_port_hi: u16,
    /// Entries of every Maglev table (a prime).
    pub maglev_size: u32,
    /// Connections the connection table holds (two entries each).
    pub max_flows: u32,
    /// Idle TCP connection timeout, seconds.
    pub tcp_timeout: u32,
    /// Idle UDP flow timeout, seconds.
    pub udp_timeout: u32,
    /// How long a connection lingers after FIN or RST, seconds.
    pub fin_timeout: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nat_port_lo: 61000,
            nat_port_hi: 65535,
            maglev_size: maglev::DEFAULT_SIZE,
            max_flows: 1 << 20,
            tcp_timeout: 600,
            udp_timeout: 60,
            fin_timeout: 10,
        }
    }
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
    /// Checks the settings, and that the NAT ports stay clear of the host's
    /// own ephemeral ports (current network namespace).
    pub fn validate(&self) -> Result<()> {
        if self.nat_port_lo == 0 || self.nat_port_lo > self.nat_port_hi {
            bail!(
                "NAT port range {}-{} is empty or starts at 0",
                self.nat_port_lo,
                self.nat_port_hi
            );
        }
        let eph = ephemeral_ports()?;
        if self.nat_port_lo <= *eph.end() && *eph.start() <= self.nat_port_hi {
            bail!(
                "NAT port range {}-{} overlaps the host's ephemeral ports {}-{} (net.ipv4.ip_local_port_range)",
                self.nat_port_lo,
                self.nat_port_hi,
                eph.start(),
                eph.end()
            );
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
