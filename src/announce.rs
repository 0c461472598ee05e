//! VIP announcement for a routing daemon (BIRD, FRR): `lb run` holds each
//! VIP it should receive traffic for as a /32 (/128) address on an
//! interface of the LB's network namespace (`[announce] interface`,
//! e.g. `lo`), labelled `<interface>:lb` so that only lb's are touched,
//! and removes it when the VIP should stop receiving traffic: every
//! backend of its services down, the daemon stopping (unless
//! `on_stop = "keep"`), or the datapath detached. The routing daemon
//! exports those addresses (contrib/bird/bird.conf: `protocol direct`),
//! so the router's ECMP sends a VIP's traffic only to lb nodes that serve
//! it. lb itself speaks no BGP.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The label of lb's addresses on `iface` (at most 15 bytes).
pub fn label(iface: &str) -> String {
    format!("{iface}:lb")
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Addresses labelled `<iface>:lb` (all interfaces' when `iface` is None),
/// with their interface.
pub fn announced(iface: Option<&str>) -> Result<Vec<(String, IpAddr)>> {
    let mut args = vec!["-j", "addr", "show"];
    if let Some(i) = iface {
        args.extend(["dev", i]);
    }
    let text = ip(&args)?;
    let v: serde_json::Value = serde_json::from_str(&text).context("reading ip -j addr")?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let ours = a["label"].as_str() == Some(&label(name));
            if let (true, Some(Ok(addr))) = (ours, a["local"].as_str().map(str::parse)) {
                out.push((name.to_string(), addr));
            }
        }
    }
    Ok(out)
}

fn prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Makes lb's addresses on `iface` exactly `want`; returns (added,
/// removed).
pub fn sync(iface: &str, want: &BTreeSet<IpAddr>) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let have: BTreeSet<IpAddr> = announced(Some(iface))?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for a in want.difference(&have) {
        ip(&[
            "addr",
            "add",
            &prefix(*a),
            "dev",
            iface,
            "label",
            &label(iface),
        ])
        .with_context(|| format!("announcing {a} on {iface}"))?;
        added.push(*a);
    }
    for a in have.difference(want) {
        ip(&["addr", "del", &prefix(*a), "dev", iface])
            .with_context(|| format!("withdrawing {a} from {iface}"))?;
        removed.push(*a);
    }
    Ok((added, removed))
}

/// Removes every address lb announced, on any interface (the datapath is
/// gone); returns them.
pub fn withdraw_all() -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for (iface, a) in announced(None)? {
        ip(&["addr", "del", &prefix(a), "dev", &iface])
            .with_context(|| format!("withdrawing {a} from {iface}"))?;
        out.push(a);
    }
    Ok(out)
}
