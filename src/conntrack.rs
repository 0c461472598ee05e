//! The connection table as the CLI sees it: listing flows and ending them.

use std::net::SocketAddrV4;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags};

use crate::maps::Timeouts;
use crate::maps::{self, from_bytes, Flow, FlowKey, Maps};

/// One tracked connection (its client->VIP entry).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conn {
    /// Protocol ("tcp"/"udp").
    pub proto: &'static str,
    /// The client.
    pub client: SocketAddrV4,
    /// The service address the client used.
    pub vip: SocketAddrV4,
    /// The backend.
    pub backend: SocketAddrV4,
    /// The LB's source address and NAT port towards the backend.
    pub nat: SocketAddrV4,
    /// "open", "half-closed" (one side sent FIN), "closing" or "expired".
    pub state: &'static str,
    /// Seconds since the first packet.
    pub age_s: u64,
    /// Seconds since the last packet.
    pub idle_s: u64,
    /// Backend id.
    pub backend_id: u32,
    /// Service id.
    pub svc_id: u32,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "tcp",
        17 => "udp",
        _ => "?",
    }
}

fn secs(ticks: u32, t: &Timeouts) -> u64 {
    u64::from(ticks) / u64::from(t.hz.max(1))
}

/// Every entry of the table, raw.
pub fn entries(m: &Maps) -> Result<Vec<(FlowKey, Flow)>> {
    let mut out = Vec::new();
    for k in m.conntrack.keys() {
        if let Some(v) = m
            .conntrack
            .lookup(&k, MapFlags::ANY)
            .context("reading conntrack")?
        {
            out.push((from_bytes(&k), from_bytes(&v)));
        }
    }
    Ok(out)
}

/// Whether an entry is past its timeout (as the datapath judges it).
pub fn expired(f: &Flow, proto: u8, t: &Timeouts, now: u32) -> bool {
    let timeout = if f.state & maps::CT_CLOSING != 0 {
        t.fin
    } else if proto == 6 {
        t.tcp
    } else {
        t.udp
    };
    now.wrapping_sub(f.seen) > timeout
}

/// The connections (client->VIP entries), oldest first.
pub fn list(m: &Maps) -> Result<Vec<Conn>> {
    let s = m.timeouts()?;
    let now = crate::clock::now()?;
    let sa = |ip: u32, port: u16| SocketAddrV4::new(maps::ip_from_be(ip), u16::from_be(port));
    let mut out: Vec<Conn> = entries(m)?
        .into_iter()
        .filter(|(_, f)| f.dir == maps::DIR_TO_BACKEND)
        .map(|(k, f)| Conn {
            proto: proto_name(k.proto),
            client: sa(k.saddr, k.sport),
            vip: sa(k.daddr, k.dport),
            backend: sa(f.daddr, f.dport),
            nat: sa(f.saddr, f.sport),
            state: if expired(&f, k.proto, &s, now) {
                "expired"
            } else if f.state & maps::CT_CLOSING != 0 {
                "closing"
            } else if f.state & maps::CT_FIN != 0 || peer_fin(m, &f, k.proto) {
                "half-closed"
            } else {
                "open"
            },
            age_s: secs(now.wrapping_sub(f.created), &s),
            idle_s: secs(now.wrapping_sub(f.seen), &s),
            backend_id: f.backend,
            svc_id: f.svc,
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.age_s));
    Ok(out)
}

/// Whether the other direction of `f`'s connection sent FIN.
fn peer_fin(m: &Maps, f: &Flow, proto: u8) -> bool {
    let peer = FlowKey {
        saddr: f.daddr,
        daddr: f.saddr,
        sport: f.dport,
        dport: f.sport,
        proto,
        ..Default::default()
    };
    m.conntrack
        .lookup(maps::bytes(&peer), MapFlags::ANY)
        .ok()
        .flatten()
        .is_some_and(|v| from_bytes::<Flow>(&v).state & maps::CT_FIN != 0)
}

/// Deletes both entries of every flow `which` selects; returns how many
/// entries went.
pub fn end_flows(m: &Maps, which: impl Fn(&Flow) -> bool) -> Result<usize> {
    let mut n = 0;
    for (k, f) in entries(m)? {
        if which(&f) && m.conntrack.delete(maps::bytes(&k)).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Active (not expired, not closing) connections per backend id.
pub fn active_per_backend(m: &Maps) -> Result<std::collections::HashMap<u32, u64>> {
    let s = m.timeouts()?;
    let now = crate::clock::now()?;
    let mut out = std::collections::HashMap::new();
    for (k, f) in entries(m)? {
        if f.dir == maps::DIR_TO_BACKEND
            && f.state & maps::CT_CLOSING == 0
            && !expired(&f, k.proto, &s, now)
        {
            *out.entry(f.backend).or_insert(0) += 1;
        }
    }
    Ok(out)
}
