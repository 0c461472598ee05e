//! The connection tables as the CLI sees them: listing connections and
//! ending them. A connection is two entries in one table (bpf/lb.h, struct
//! flow): the client's, and the owner keyed by the NAT tuple, which holds
//! the state and the clock; `conntrack` has the answered connections,
//! `ct_new` the half-open ones.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};

use crate::maps::Timeouts;
use crate::maps::{self, Flow, FlowKey, Maps};

/// One tracked connection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conn {
    /// Protocol ("tcp"/"udp").
    pub proto: &'static str,
    /// The client.
    pub client: SocketAddr,
    /// The service address the client used.
    pub vip: SocketAddr,
    /// The backend.
    pub backend: SocketAddr,
    /// The LB's source address and NAT port towards the backend.
    pub nat: SocketAddr,
    /// "half-open" (not answered yet), "replied" (answered, not confirmed
    /// by the client yet: the UDP query whose answer ended it, or a TCP
    /// handshake without its last ACK), "open", "half-closed" (one side
    /// sent FIN), "closing" or "expired".
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

fn secs(ticks: u64, t: &Timeouts) -> u64 {
    ticks / u64::from(t.hz.max(1))
}

/// Every entry of one table, raw, read in batches.
pub fn table_entries(map: &MapHandle) -> Result<Vec<(FlowKey, Flow)>> {
    maps::read_all(map).context("reading the connection table")
}

/// Every entry of both tables, raw: (key, entry, answered).
pub fn entries(m: &Maps) -> Result<Vec<(FlowKey, Flow, bool)>> {
    let mut out: Vec<_> = table_entries(&m.conntrack)?
        .into_iter()
        .map(|(k, f)| (k, f, true))
        .collect();
    out.extend(
        table_entries(&m.ct_new)?
            .into_iter()
            .map(|(k, f)| (k, f, false)),
    );
    Ok(out)
}

/// Whether owner `o` is past its timeout (as the datapath judges it).
pub fn expired(o: &Flow, proto: u8, answered: bool, t: &Timeouts, now: u64) -> bool {
    let timeout = if o.state & maps::CT_CLOSING != 0 {
        t.fin
    } else if proto == 17 {
        t.udp
    } else if answered {
        t.tcp
    } else {
        t.syn
    };
    now.saturating_sub(o.seen) > u64::from(timeout)
}

/// The key of the owner of client entry `f`.
pub fn owner_key(f: &Flow, proto: u8) -> FlowKey {
    FlowKey {
        saddr: f.daddr,
        daddr: f.saddr,
        sport: f.dport,
        dport: f.sport,
        proto,
        ..Default::default()
    }
}

/// Whether owner `o` points back at the client entry keyed `k`.
fn owner_of(o: &Flow, k: &FlowKey) -> bool {
    o.daddr == k.saddr && o.dport == k.sport && o.saddr == k.daddr && o.sport == k.dport
}

const KEY: usize = std::mem::size_of::<FlowKey>();

/// Client entries with their owners: the live connections' halves.
fn connections(m: &Maps) -> Result<Vec<(FlowKey, Flow, Flow, bool)>> {
    let all = entries(m)?;
    let key = |k: &FlowKey| -> [u8; KEY] { maps::bytes(k).try_into().expect("flow key size") };
    let owners: HashMap<([u8; KEY], bool), Flow> = all
        .iter()
        .filter(|(_, f, _)| f.dir == maps::DIR_TO_CLIENT)
        .map(|(k, f, a)| ((key(k), *a), *f))
        .collect();
    Ok(all
        .into_iter()
        .filter(|(_, f, _)| f.dir == maps::DIR_TO_BACKEND)
        .filter_map(|(k, f, a)| {
            let o = owners.get(&(key(&owner_key(&f, k.proto)), a))?;
            (owner_of(o, &k) && o.state & maps::CT_RECLAIMED == 0).then_some((k, f, *o, a))
        })
        .collect())
}

/// The connections, oldest first.
pub fn list(m: &Maps) -> Result<Vec<Conn>> {
    let s = m.timeouts()?;
    let now = crate::clock::now()?;
    let sa = maps::sockaddr_from_be;
    let mut out: Vec<Conn> = connections(m)?
        .into_iter()
        .map(|(k, f, o, answered)| Conn {
            proto: proto_name(k.proto),
            client: sa(k.saddr, k.sport),
            vip: sa(k.daddr, k.dport),
            backend: sa(f.daddr, f.dport),
            nat: sa(f.saddr, f.sport),
            state: if expired(&o, k.proto, answered, &s, now) {
                "expired"
            } else if o.state & maps::CT_CLOSING != 0 {
                "closing"
            } else if o.state & (maps::CT_FIN_FWD | maps::CT_FIN_REV) != 0 {
                "half-closed"
            } else if !answered && o.state & maps::CT_REPLIED != 0 {
                "replied"
            } else if !answered {
                "half-open"
            } else {
                "open"
            },
            age_s: secs(now.saturating_sub(o.created), &s),
            idle_s: secs(now.saturating_sub(o.seen), &s),
            backend_id: f.backend,
            svc_id: f.svc,
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.age_s));
    Ok(out)
}

/// Deletes both entries of every connection `which` selects (by either
/// entry); returns how many entries went.
pub fn end_flows(m: &Maps, which: impl Fn(&Flow) -> bool) -> Result<usize> {
    let mut n = 0;
    for (k, f, answered) in entries(m)? {
        let map = if answered { &m.conntrack } else { &m.ct_new };
        if which(&f) && map.delete(maps::bytes(&k)).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Active (not expired, not closing) connections per backend id.
pub fn active_per_backend(m: &Maps) -> Result<HashMap<u32, u64>> {
    let s = m.timeouts()?;
    let now = crate::clock::now()?;
    let mut out = HashMap::new();
    for (k, _, o, answered) in connections(m)? {
        if o.state & maps::CT_CLOSING == 0 && !expired(&o, k.proto, answered, &s, now) {
            *out.entry(o.backend).or_insert(0) += 1;
        }
    }
    Ok(out)
}
