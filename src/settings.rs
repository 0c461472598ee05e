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

/// An on/off setting as written: `on` or `off` (also `true`/`false`).
pub fn parse_on_off(s: &str) -> Result<bool> {
    match s.trim() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        v => bail!("'{v}' is not on or off"),
    }
}

/// An on/off setting as [`parse_on_off`] reads it.
pub fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
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
    /// Whether the datapath measures each backend's handshake latency (SYN
    /// to SYN-ACK, a clock read on each new TCP flow): what `lb stats`
    /// shows and the latency scheduler weighs.
    #[serde(default = "yes")]
    pub handshake_latency: bool,
}

fn yes() -> bool {
    true
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
            handshake_latency: true,
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

    /// The one validation of settings, for the command line and the file
    /// (which names the field's place from [`Invalid::field`]): the rules
    /// of each setting, that the NAT ports stay clear of the host's own
    /// ephemeral ports and that the SNAT addresses are the host's
    /// (current network namespace).
    pub fn validate(&self) -> Result<(), Invalid> {
        self.check_nat_ports()
            .map_err(Invalid::of(Field::NatPorts))?;
        self.check_snat().map_err(Invalid::of(Field::Snat))?;
        if !maglev::is_prime(self.maglev_size) || self.maglev_size > 1_000_003 {
            return Err(Invalid::new(
                Field::MaglevSize,
                format!(
                    "Maglev table size {} must be a prime up to 1000003",
                    self.maglev_size
                ),
            ));
        }
        if self.max_flows < 1024 || self.max_flows > 64 << 20 {
            return Err(Invalid::new(
                Field::MaxFlows,
                format!("max flows {} out of range 1024..=67108864", self.max_flows),
            ));
        }
        if self.max_half_open < 1024 || self.max_half_open > 16 << 20 {
            return Err(Invalid::new(
                Field::MaxHalfOpen,
                format!(
                    "max half-open flows {} out of range 1024..=16777216",
                    self.max_half_open
                ),
            ));
        }
        for (field, name, v) in [
            (Field::TcpTimeout, "tcp timeout", self.tcp_timeout),
            (Field::UdpTimeout, "udp timeout", self.udp_timeout),
            (Field::FinTimeout, "fin timeout", self.fin_timeout),
        ] {
            if v == 0 || v > 86400 {
                return Err(Invalid::new(
                    field,
                    format!("{name} {v}s out of range 1..=86400"),
                ));
            }
        }
        Ok(())
    }

    fn check_nat_ports(&self) -> Result<()> {
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
        Ok(())
    }

    fn check_snat(&self) -> Result<()> {
        if self.snat.len() > MAX_SNAT {
            bail!("{} SNAT addresses: at most {MAX_SNAT}", self.snat.len());
        }
        for (i, a) in self.snat.iter().enumerate() {
            if self.snat[..i].contains(a) {
                bail!("SNAT address {a} is given twice");
            }
            crate::model::check_snat(*a)?;
        }
        crate::net::snat_check(&self.snat).map(drop)
    }
}

/// A setting, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `nat_ports`, `--nat-ports`.
    NatPorts,
    /// `snat`, `--snat`.
    Snat,
    /// `maglev_size`, `--maglev-size`.
    MaglevSize,
    /// `max_flows`, `--max-flows`.
    MaxFlows,
    /// `max_half_open`, `--max-half-open`.
    MaxHalfOpen,
    /// `tcp_timeout`, `--tcp-timeout`.
    TcpTimeout,
    /// `udp_timeout`, `--udp-timeout`.
    UdpTimeout,
    /// `fin_timeout`, `--fin-timeout`.
    FinTimeout,
    /// `handshake_latency`, `--handshake-latency`.
    HandshakeLatency,
}

impl Field {
    /// Its name in the configuration file's `[settings]`.
    pub fn name(self) -> &'static str {
        match self {
            Field::NatPorts => "nat_ports",
            Field::Snat => "snat",
            Field::MaglevSize => "maglev_size",
            Field::MaxFlows => "max_flows",
            Field::MaxHalfOpen => "max_half_open",
            Field::TcpTimeout => "tcp_timeout",
            Field::UdpTimeout => "udp_timeout",
            Field::FinTimeout => "fin_timeout",
            Field::HandshakeLatency => "handshake_latency",
        }
    }
}

/// Settings refused: the setting that breaks a rule, and which rule.
#[derive(Debug)]
pub struct Invalid {
    /// The setting.
    pub field: Field,
    /// Why (one line, without the setting's place).
    pub msg: String,
}

impl Invalid {
    fn new(field: Field, msg: String) -> Self {
        Self { field, msg }
    }

    fn of(field: Field) -> impl FnOnce(anyhow::Error) -> Self {
        move |e| Self::new(field, format!("{e:#}"))
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Invalid {}

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
    fn validation_names_the_field_that_breaks_a_rule() {
        let ok = Settings::default();
        ok.validate().expect("the defaults are valid");
        let field = |f: fn(&mut Settings)| {
            let mut s = ok.clone();
            f(&mut s);
            let e = s.validate().unwrap_err();
            (e.field, e.to_string())
        };
        assert_eq!(
            field(|s| s.nat_ports = vec![PortRange { lo: 80, hi: 90 }]),
            (
                Field::NatPorts,
                "NAT port range 80-90 is empty or starts below 1024".into()
            )
        );
        assert_eq!(
            field(|s| s.snat = vec!["::1".parse().unwrap()]),
            (
                Field::Snat,
                "SNAT address ::1 cannot be a source address".into()
            )
        );
        assert_eq!(field(|s| s.max_flows = 5).0, Field::MaxFlows,);
        assert_eq!(
            field(|s| s.fin_timeout = 86401),
            (
                Field::FinTimeout,
                "fin timeout 86401s out of range 1..=86400".into()
            )
        );
        assert_eq!(Field::MaxHalfOpen.name(), "max_half_open");
    }

    #[test]
    fn port_ranges_parse_and_print() {
        let r = parse_ports("1024-32767, 61000-65535").unwrap();
        assert_eq!(ports_string(&r), "1024-32767,61000-65535");
        assert!(parse_ports("5-").is_err());
        assert!(parse_ports("x-5").is_err());
    }
}
