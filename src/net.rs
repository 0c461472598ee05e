//! Facts about the (current) network namespace: interfaces, sysctls and
//! neighbour resolution.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|_| anyhow::anyhow!("no such interface: {name}"))
}

fn forwarding_path(iface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/forwarding")
}

/// Whether IPv4 forwarding is enabled on `iface`.
pub fn forwarding(iface: &str) -> Result<bool> {
    let path = forwarding_path(iface);
    let v = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(v.trim() == "1")
}

/// Enables IPv4 forwarding on `iface`: `bpf_fib_lookup` refuses to route
/// packets that arrive on an interface that does not forward.
pub fn enable_forwarding(iface: &str) -> Result<()> {
    let path = forwarding_path(iface);
    fs::write(&path, "1").with_context(|| format!("enabling IPv4 forwarding ({path})"))
}

/// Whether the kernel has a usable (not failed/incomplete) neighbour entry.
fn neighbour_known(addr: Ipv4Addr) -> bool {
    let out = Command::new("ip")
        .args(["-4", "neigh", "show", "to", &addr.to_string()])
        .output();
    match out {
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout);
            s.contains("lladdr") && !s.contains("FAILED") && !s.contains("INCOMPLETE")
        }
        Err(_) => false,
    }
}

/// Asks the kernel to resolve the link-layer address of each on-link
/// address (one UDP datagram to the discard port triggers ARP), and waits up
/// to `timeout` for all of them. Returns those still unresolved.
///
/// The XDP program gets MACs from the kernel's neighbour table through
/// `bpf_fib_lookup`; a neighbour nobody has talked to yet is not in it.
pub fn resolve_neighbours(addrs: &[Ipv4Addr], timeout: Duration) -> Result<Vec<Ipv4Addr>> {
    let sock =
        UdpSocket::bind("0.0.0.0:0").context("opening a UDP socket to resolve neighbours")?;
    for a in addrs {
        if !neighbour_known(*a) {
            // An unreachable destination is reported by the wait below.
            let _ = sock.send_to(&[], SocketAddrV4::new(*a, 9));
        }
    }
    let start = Instant::now();
    loop {
        let missing: Vec<_> = addrs
            .iter()
            .copied()
            .filter(|a| !neighbour_known(*a))
            .collect();
        if missing.is_empty() || start.elapsed() >= timeout {
            return Ok(missing);
        }
        sleep(Duration::from_millis(20));
    }
}

/// Fails unless the process runs as root (CAP_BPF and CAP_NET_ADMIN).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lb must run as root: it needs CAP_BPF and CAP_NET_ADMIN to load and attach XDP programs");
    }
    Ok(())
}
