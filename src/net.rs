//! Facts about the (current) network namespace: interfaces and sysctls.

use std::fs;

use anyhow::{bail, Context, Result};

/// The index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|_| anyhow::anyhow!("no such interface: {name}"))
}

/// Sets what the datapath needs on `iface` and returns what it changed:
/// IPv4 forwarding (`bpf_fib_lookup` refuses interfaces that do not forward)
/// and `accept_local`, so that a first packet towards a neighbour not yet
/// resolved, which the program hands to the kernel already rewritten to the
/// LB's own source address, is forwarded (resolving the neighbour) rather
/// than dropped as a martian.
pub fn prepare_interface(iface: &str) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for knob in ["forwarding", "accept_local"] {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/{knob}");
        let v = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        if v.trim() != "1" {
            fs::write(&path, "1").with_context(|| format!("setting {path}"))?;
            changed.push(format!("net.ipv4.conf.{iface}.{knob}=1"));
        }
    }
    Ok(changed)
}

/// Fails unless the process runs as root (CAP_BPF and CAP_NET_ADMIN).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lb must run as root: it needs CAP_BPF and CAP_NET_ADMIN to load and attach XDP programs");
    }
    Ok(())
}

/// For each SNAT address, whether it is lb's alone and may use every port
/// from 1024: an address on the loopback interface `lo` is one the kernel
/// never picks as the source of the host's own connections to other hosts,
/// so no connection of the host can hold one of its ports towards a
/// backend. An address on another interface may be the source the kernel
/// picks, and gets the NAT port ranges, clear of the host's ephemeral ports.
/// Fails with one line if an address is not the host's (current network
/// namespace).
pub fn snat_check(addrs: &[std::net::IpAddr]) -> Result<Vec<bool>> {
    let mut on = std::collections::HashMap::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing the host's addresses")? {
        let Some(a) = ifa.address.as_ref() else {
            continue;
        };
        let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => std::net::IpAddr::V4(v4.ip()),
            (_, Some(v6)) => std::net::IpAddr::V6(v6.ip()),
            _ => continue,
        };
        on.entry(ip)
            .or_insert_with(Vec::new)
            .push(ifa.interface_name.clone());
    }
    addrs
        .iter()
        .map(|a| match on.get(a) {
            None => bail!("SNAT address {a} is not an address of this host (add it, e.g. on lo)"),
            Some(ifs) => Ok(ifs.iter().all(|i| i == "lo")),
        })
        .collect()
}

/// Has the kernel resolve `ip`'s MAC (when it is on a link of this network
/// namespace): a datagram to its discard port makes it ask (ARP). Best
/// effort; nothing waits for the answer.
pub fn resolve_neighbour(ip: std::net::IpAddr) {
    let any: std::net::SocketAddr = if ip.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    if let Ok(s) = std::net::UdpSocket::bind(any) {
        let _ = s.send_to(&[0], (ip, 9));
    }
}

/// Checks that this network namespace can send to backend `ip` of a
/// direct-mode service the way the datapath will: DSR changes only the
/// destination MAC, so the backend must be on one of this host's links (in
/// the subnet of an address of an interface other than `lo`); IP-in-IP
/// needs a route to it. One line naming the backend if not.
pub fn check_direct_backend(mode: crate::model::FwdMode, ip: std::net::IpAddr) -> Result<()> {
    use crate::model::FwdMode;
    match mode {
        FwdMode::Nat => Ok(()),
        FwdMode::Ipip => {
            let any: std::net::SocketAddr = if ip.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = std::net::UdpSocket::bind(any).context("opening a socket")?;
            // connect() looks the route up and fails without one
            s.connect((ip, 9)).map(|_| ()).map_err(|e| {
                anyhow::anyhow!(
                    "backend {ip} of an IPIP service is unreachable from this host ({e})"
                )
            })
        }
        FwdMode::Dsr => {
            for ifa in nix::ifaddrs::getifaddrs().context("listing the host's addresses")? {
                if ifa.interface_name == "lo" {
                    continue;
                }
                let (Some(a), Some(m)) = (ifa.address.as_ref(), ifa.netmask.as_ref()) else {
                    continue;
                };
                let on_link = match (
                    ip,
                    a.as_sockaddr_in(),
                    m.as_sockaddr_in(),
                    a.as_sockaddr_in6(),
                    m.as_sockaddr_in6(),
                ) {
                    (std::net::IpAddr::V4(b), Some(a), Some(m), _, _) => {
                        let m = u32::from(m.ip());
                        u32::from(b) & m == u32::from(a.ip()) & m
                    }
                    (std::net::IpAddr::V6(b), _, _, Some(a), Some(m)) => {
                        let m = u128::from(m.ip());
                        u128::from(b) & m == u128::from(a.ip()) & m
                    }
                    _ => false,
                };
                if on_link {
                    return Ok(());
                }
            }
            bail!("backend {ip} of a DSR service is on none of this host's links (DSR changes only the MAC: use --mode ipip for a routed backend)")
        }
    }
}
