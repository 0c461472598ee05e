//! The model of what an instance serves: services and their backends, with
//! addresses of either family (`IpAddr`, `SocketAddr`), and the checks that
//! say what the datapath can serve today. Nothing here knows how the maps
//! store it: that is crate::maps, the datapath-access layer.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// Transport protocol of a service.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    /// The protocol of an IP protocol number, if a service can have it.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A service: VIP:port/proto (port 0: every port of the VIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Service {
    /// Virtual IP.
    pub vip: IpAddr,
    /// Port, 0 for every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl fmt::Display for Service {
    /// `10.0.0.1:80/tcp`, `[fd00::1]:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.proto)
    }
}

impl Service {
    /// The service at `addr` with `proto`.
    pub fn new(addr: impl Into<SocketAddr>, proto: Proto) -> Self {
        let addr = addr.into();
        Self {
            vip: addr.ip(),
            port: addr.port(),
            proto,
        }
    }

    /// VIP:port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }
}

/// A backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Backend {
    /// Backend id (index in the backends map and counters).
    pub id: u32,
    /// Address; port 0 means "the port the client used".
    pub addr: SocketAddr,
    /// Weight; 0 drains (no new flows).
    pub weight: u32,
    /// Service id.
    pub svc_id: u32,
}

impl Backend {
    /// The address as text output shows it: without a port when the port
    /// is the client's (0), as it was given.
    pub fn shown(&self) -> String {
        if self.addr.port() == 0 {
            self.addr.ip().to_string()
        } else {
            self.addr.to_string()
        }
    }
}

/// How a service forwards packets to its backends.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FwdMode {
    /// Full NAT: the destination becomes the backend, the source an SNAT
    /// address and port, both ways.
    #[default]
    Nat,
    /// Direct server return (L2): only the destination MAC changes; the
    /// backend holds the VIP on its loopback and answers the client itself.
    Dsr,
    /// IP-in-IP: the packet, unchanged, in an outer IPv4 header to the
    /// backend (on any routed subnet), which decapsulates it (`lb decap`),
    /// holds the VIP on its loopback and answers the client itself.
    Ipip,
}

impl FwdMode {
    /// Whether the backend answers the client itself (DSR, IPIP): the
    /// packet keeps its destination, and the answers bypass the LB.
    pub fn is_direct(self) -> bool {
        matches!(self, FwdMode::Dsr | FwdMode::Ipip)
    }
}

/// How a service picks a backend for a new flow.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Maglev consistent hashing of the flow, by the configured weights.
    #[default]
    Maglev,
    /// Maglev with weights that `lb run` adjusts each second to the
    /// backends' open connections: fewer open, a larger share of new ones.
    LeastConn,
    /// Maglev with weights that `lb run` adjusts each second to the
    /// backends' handshake latency (SYN to SYN-ACK): faster, a larger share.
    Latency,
}

/// Which connections of a client go to one backend.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    /// Each connection on its own (the hash of its 5-tuple).
    #[default]
    None,
    /// Every connection of a client address to one backend (the hash of
    /// the client address only; as IPVS persistence, Cilium's ClientIP).
    ClientIp,
}

/// What a service is besides its address: how it forwards and how it picks
/// backends. In JSON `"mode": "nat", "scheduler": "maglev", "affinity":
/// "none"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SvcConf {
    /// Forwarding mode.
    pub mode: FwdMode,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Client affinity.
    pub affinity: Affinity,
    /// With `client-ip` affinity: seconds a client keeps the backend of its
    /// last new connection (`"affinity_timeout": 300` in JSON, absent
    /// without): its next one within them goes there too while that backend
    /// takes flows, even if the backend set changed (IPVS `-p`). Without, the
    /// Maglev choice of the client address alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
}

/// The longest affinity timeout, seconds (the service's flags hold it in
/// 16 bits, bpf/lb.h `LB_SVC_AFFINITY_SHIFT`).
pub const MAX_AFFINITY_TIMEOUT: u32 = 65535;

/// Checks a service's affinity timeout: only with `client-ip` affinity,
/// 1..=65535 seconds.
pub fn check_affinity(conf: &SvcConf) -> Result<()> {
    let Some(t) = conf.affinity_timeout else {
        return Ok(());
    };
    if conf.affinity != Affinity::ClientIp {
        bail!(
            "an affinity timeout needs affinity client-ip (this service's is {})",
            conf.affinity
        );
    }
    if t == 0 || t > MAX_AFFINITY_TIMEOUT {
        bail!("affinity timeout {t}s out of range 1..={MAX_AFFINITY_TIMEOUT}");
    }
    Ok(())
}

/// Names of the values of a `clap::ValueEnum`, as they are written.
fn names<T: clap::ValueEnum>() -> Vec<String> {
    T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|p| p.get_name().to_string())
        .collect()
}

/// The value of a `clap::ValueEnum` named `s`, or an error naming the
/// allowed values: `'dsr' is not one of nat`.
fn by_name<T: clap::ValueEnum>(s: &str) -> Result<T> {
    T::from_str(s, false)
        .map_err(|_| anyhow::anyhow!("'{s}' is not one of {}", names::<T>().join(", ")))
}

macro_rules! named {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                use clap::ValueEnum;
                let v = self.to_possible_value().expect("no skipped values");
                f.write_str(v.get_name())
            }
        }

        impl std::str::FromStr for $t {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> Result<Self> {
                by_name(s)
            }
        }
    };
}
named!(FwdMode);
named!(Scheduler);
named!(Affinity);

// ------------------------------------------------------------ validation
//
// The one validation of services and backends: the configuration file
// (crate::config, which adds the place in the file), the commands
// (crate::reconcile::Edit) and the one-liner of `lb attach` call these.

/// Checks a weight.
pub fn check_weight(w: u32) -> Result<()> {
    weight_of(i64::from(w)).map(drop)
}

/// A weight as written (the file's integers may be negative), checked.
pub fn weight_of(w: i64) -> Result<u32> {
    match u32::try_from(w) {
        Ok(v) if v <= MAX_WEIGHT => Ok(v),
        _ => bail!("weight {w} out of range 0..={MAX_WEIGHT}"),
    }
}

/// Whether `ip` is a unicast address (not unspecified, multicast or the
/// IPv4 broadcast address).
pub fn is_unicast(ip: IpAddr) -> bool {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !(ip.is_unspecified() || ip.is_multicast() || broadcast)
}

/// Checks that a service's or backend's address is unicast.
pub fn check_unicast(ip: IpAddr) -> Result<()> {
    if !is_unicast(ip) {
        bail!("{ip} is not a unicast address");
    }
    Ok(())
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Checks that the datapath can serve `svc`: a unicast VIP, of either
/// family.
pub fn check_service(svc: &Service) -> Result<()> {
    check_unicast(svc.vip)
}

/// Checks that the datapath can serve `svc` the way `conf` says (an
/// affinity timeout needs client-ip affinity).
pub fn check_conf(svc: &Service, conf: &SvcConf) -> Result<()> {
    check_affinity(conf).map_err(|e| anyhow::anyhow!("service {svc}: {e}"))
}

/// Checks that `addr` can be a backend of `svc`: unicast, of the service's
/// family (the datapath translates addresses, not families).
pub fn check_backend(svc: &Service, addr: SocketAddr) -> Result<()> {
    check_unicast(addr.ip())?;
    if addr.is_ipv4() != svc.vip.is_ipv4() {
        bail!(
            "backend {addr} is {}, service {svc} is {}: a service and its backends must be of one family",
            family(addr.ip()),
            family(svc.vip)
        );
    }
    Ok(())
}

/// Checks what a service's forwarding mode asks of its backend `addr`: in
/// DSR and IPIP the packet keeps its destination, so the backend's port is
/// the service's (or 0, the port the client used).
pub fn check_mode_backend(conf: &SvcConf, svc: &Service, addr: SocketAddr) -> Result<()> {
    if conf.mode.is_direct() && addr.port() != 0 && addr.port() != svc.port {
        let m = conf.mode.to_string().to_uppercase();
        bail!(
            "backend {addr} of {m} service {svc}: in {m} the backend's port must be the service's ({}) or 0",
            svc.port
        );
    }
    Ok(())
}

/// Checks that `ip` can be a source address towards backends (SNAT):
/// unicast, not loopback (either family: IPv6 services use the IPv6 ones).
pub fn check_snat(ip: IpAddr) -> Result<()> {
    if !is_unicast(ip) || ip.is_loopback() {
        bail!("SNAT address {ip} cannot be a source address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> Service {
        Service::new(s.parse::<SocketAddr>().unwrap(), Proto::Tcp)
    }

    fn err(r: Result<()>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn modes_and_schedulers_name_the_allowed_values() {
        assert_eq!("nat".parse::<FwdMode>().unwrap(), FwdMode::Nat);
        assert_eq!("maglev".parse::<Scheduler>().unwrap(), Scheduler::Maglev);
        assert_eq!(FwdMode::Nat.to_string(), "nat");
        assert_eq!(Scheduler::Maglev.to_string(), "maglev");
        assert_eq!(
            format!("{:#}", "gre".parse::<FwdMode>().unwrap_err()),
            "'gre' is not one of nat, dsr, ipip"
        );
        assert_eq!("dsr".parse::<FwdMode>().unwrap(), FwdMode::Dsr);
        assert_eq!("ipip".parse::<FwdMode>().unwrap(), FwdMode::Ipip);
        assert_eq!(FwdMode::Ipip.to_string(), "ipip");
        assert_eq!(
            format!("{:#}", "NAT".parse::<FwdMode>().unwrap_err()),
            "'NAT' is not one of nat, dsr, ipip"
        );
        assert_eq!(
            format!("{:#}", "rr".parse::<Scheduler>().unwrap_err()),
            "'rr' is not one of maglev, least-conn, latency"
        );
        assert_eq!(
            format!("{:#}", "src".parse::<Affinity>().unwrap_err()),
            "'src' is not one of none, client-ip"
        );
        assert_eq!(Affinity::ClientIp.to_string(), "client-ip");
        assert_eq!(
            serde_json::to_value(SvcConf::default()).unwrap(),
            serde_json::json!({"mode": "nat", "scheduler": "maglev", "affinity": "none"})
        );
        let sticky = SvcConf {
            affinity: Affinity::ClientIp,
            affinity_timeout: Some(300),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(sticky).unwrap(),
            serde_json::json!({"mode": "nat", "scheduler": "maglev", "affinity": "client-ip", "affinity_timeout": 300})
        );
        assert!(check_affinity(&sticky).is_ok());
        assert_eq!(
            check_affinity(&SvcConf {
                affinity_timeout: Some(300),
                ..Default::default()
            })
            .unwrap_err()
            .to_string(),
            "an affinity timeout needs affinity client-ip (this service's is none)"
        );
        let flags = crate::maps::svc_flags(&sticky);
        let v = crate::maps::SvcValue { id: 1, flags };
        assert_eq!(crate::maps::svc_conf(&v), sticky);
    }

    #[test]
    fn services_print_either_family() {
        assert_eq!(svc("10.0.0.1:80").to_string(), "10.0.0.1:80/tcp");
        assert_eq!(svc("[fd00::1]:80").to_string(), "[fd00::1]:80/tcp");
    }

    #[test]
    fn mixed_families_are_refused_by_name() {
        assert!(check_service(&svc("10.0.0.1:80")).is_ok());
        assert!(check_service(&svc("[fd00::1]:80")).is_ok());
        assert!(check_backend(&svc("[fd00::1]:80"), "[fd00::2]:80".parse().unwrap()).is_ok());
        assert_eq!(
            err(check_service(&svc("[ff02::1]:80"))),
            "ff02::1 is not a unicast address"
        );
        let v4 = svc("10.0.0.1:80");
        assert!(check_backend(&v4, "10.0.1.1:80".parse().unwrap()).is_ok());
        assert_eq!(
            err(check_backend(&v4, "[fd00::2]:80".parse().unwrap())),
            "backend [fd00::2]:80 is IPv6, service 10.0.0.1:80/tcp is IPv4: a service and its backends must be of one family"
        );
        assert_eq!(
            err(check_backend(&svc("[fd00::1]:80"), "10.0.1.1:80".parse().unwrap())),
            "backend 10.0.1.1:80 is IPv4, service [fd00::1]:80/tcp is IPv6: a service and its backends must be of one family"
        );
        assert_eq!(
            err(check_backend(&v4, "255.255.255.255:80".parse().unwrap())),
            "255.255.255.255 is not a unicast address"
        );
        assert!(check_snat("fd00::1".parse().unwrap()).is_ok());
        assert_eq!(
            err(check_snat("::1".parse().unwrap())),
            "SNAT address ::1 cannot be a source address"
        );
        assert_eq!(
            err(check_snat("127.0.0.1".parse().unwrap())),
            "SNAT address 127.0.0.1 cannot be a source address"
        );
    }
}
