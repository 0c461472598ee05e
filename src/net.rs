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
