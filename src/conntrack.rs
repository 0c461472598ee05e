//! The connection tables as the CLI sees them: listing connections and
//! ending them. A connection is two entries in one table (bpf/lb.h, struct
//! flow): the client's, and the owner keyed by the NAT tuple, which holds
//! the state and the clock; `conntrack` has the answered connections,
//! `ct_new` the half-open ones (a table of sets, crate::halfopen; IPv6:
//! `conntrack6`, `ct_new6`, the same but for their keys; here both
//! families become [`Entry`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};

use crate::halfopen;
use crate::maps::Timeouts;
use crate::maps::{self, Flow, Flow6, FlowKey, FlowKey6, Maps};

/// A connection's states, as [`Conn::state`] names them.
pub const STATES: [&str; 6] = [
    "half-open",
    "replied",
    "open",
    "half-closed",
    "closing",
    "expired",
];

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
        halfopen::entries::<halfopen::V4>(m)?
            .into_iter()
            .map(|(k, f)| (k, f, false)),
    );
    Ok(out)
}

/// Every entry of both IPv6 tables, raw: (key, entry, answered).
pub fn entries6(m: &Maps) -> Result<Vec<(FlowKey6, Flow6, bool)>> {
    let read = |map| -> Result<Vec<(FlowKey6, Flow6)>> {
        maps::read_all(map).context("reading the IPv6 connection table")
    };
    let mut out: Vec<_> = read(&m.conntrack6)?
        .into_iter()
        .map(|(k, f)| (k, f, true))
        .collect();
    out.extend(
        halfopen::entries::<halfopen::V6>(m)?
            .into_iter()
            .map(|(k, f)| (k, f, false)),
    );
    Ok(out)
}

/// What a flow entry's `which` (see [`end_flows`]) is asked about.
pub struct FlowIds {
    /// Backend id.
    pub backend: u32,
    /// Service id.
    pub svc: u32,
}

/// An entry of either family's tables: its key (source, destination,
/// protocol) and what it rewrites a packet to.
#[derive(Debug, Clone, Copy)]
struct Entry {
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    /// New source and destination.
    to_src: SocketAddr,
    to_dst: SocketAddr,
    backend: u32,
    svc: u32,
    state: u32,
    dir: u8,
    created: u64,
    seen: u64,
    /// In conntrack(6), not ct_new(6).
    answered: bool,
}

fn all_entries(m: &Maps) -> Result<Vec<Entry>> {
    let sa = maps::sockaddr_from_be;
    let sa6 = maps::sockaddr6_from_be;
    let mut out: Vec<Entry> = entries(m)?
        .into_iter()
        .map(|(k, f, answered)| Entry {
            src: sa(k.saddr, k.sport),
            dst: sa(k.daddr, k.dport),
            proto: k.proto,
            to_src: sa(f.saddr, f.sport),
            to_dst: sa(f.daddr, f.dport),
            backend: f.backend,
            svc: f.svc,
            state: f.state,
            dir: f.dir,
            created: f.created,
            seen: f.seen,
            answered,
        })
        .collect();
    out.extend(entries6(m)?.into_iter().map(|(k, f, answered)| Entry {
        src: sa6(&k.saddr, k.sport),
        dst: sa6(&k.daddr, k.dport),
        proto: k.proto,
        to_src: sa6(&f.saddr, f.sport),
        to_dst: sa6(&f.daddr, f.dport),
        backend: f.backend,
        svc: f.svc,
        state: f.state,
        dir: f.dir,
        created: f.created,
        seen: f.seen,
        answered,
    }));
    Ok(out)
}

/// Whether owner `o` is past its timeout (as the datapath judges it).
pub fn expired(o: &Flow, proto: u8, answered: bool, t: &Timeouts, now: u64) -> bool {
    expired_at(o.state, o.seen, proto, answered, t, now)
}

fn expired_at(state: u32, seen: u64, proto: u8, answered: bool, t: &Timeouts, now: u64) -> bool {
    let timeout = if state & maps::CT_CLOSING != 0 {
        t.fin
    } else if proto == 17 {
        t.udp
    } else if answered {
        t.tcp
    } else {
        t.syn
    };
    now.saturating_sub(seen) > u64::from(timeout)
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

/// Client entries with their owners: the live connections' halves
/// (client entry, owner).
fn connections(m: &Maps) -> Result<Vec<(Entry, Entry)>> {
    Ok(connections_of(all_entries(m)?))
}

/// [`connections`] among entries already read.
fn connections_of(all: Vec<Entry>) -> Vec<(Entry, Entry)> {
    let owners: HashMap<(SocketAddr, SocketAddr, u8, bool), Entry> = all
        .iter()
        .filter(|e| e.dir == maps::DIR_TO_CLIENT)
        .map(|e| ((e.src, e.dst, e.proto, e.answered), *e))
        .collect();
    all.into_iter()
        .filter(|e| e.dir == maps::DIR_TO_BACKEND)
        .filter_map(|c| {
            let o = owners.get(&(c.to_dst, c.to_src, c.proto, c.answered))?;
            let points_back = o.to_dst == c.src && o.to_src == c.dst;
            (points_back && o.state & maps::CT_RECLAIMED == 0).then_some((c, *o))
        })
        .collect()
}

/// The connections, oldest first.
pub fn list(m: &Maps) -> Result<Vec<Conn>> {
    let s = m.timeouts()?;
    let now = crate::clock::now()?;
    let mut out: Vec<Conn> = connections(m)?
        .into_iter()
        .map(|(c, o)| (c, o, c.answered))
        .map(|(c, o, answered)| Conn {
            proto: proto_name(c.proto),
            client: c.src,
            vip: c.dst,
            backend: c.to_dst,
            nat: c.to_src,
            state: if expired_at(o.state, o.seen, c.proto, answered, &s, now) {
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
            backend_id: c.backend,
            svc_id: c.svc,
        })
        .collect();
    debug_assert!(out.iter().all(|c| STATES.contains(&c.state)));
    out.sort_by_key(|c| std::cmp::Reverse(c.age_s));
    Ok(out)
}

/// Deletes both entries of every connection `which` selects (by either
/// entry); returns how many entries went. An entry is deleted only if it
/// is still selected when it goes (see [`maps::delete_if`]): one given to
/// another connection since it was read stays.
pub fn end_flows(m: &Maps, which: impl Fn(&FlowIds) -> bool) -> Result<usize> {
    let ids = |backend, svc| FlowIds { backend, svc };
    let mut n = 0;
    let mut half = Vec::new();
    for (k, f, answered) in entries(m)? {
        if !which(&ids(f.backend, f.svc)) {
            continue;
        }
        if !answered {
            half.push(k);
        } else if maps::delete_if(&m.conntrack, maps::bytes(&k), |f: &Flow| {
            which(&ids(f.backend, f.svc))
        })? {
            n += 1;
        }
    }
    n += halfopen::delete_all::<halfopen::V4>(m, &half, |_, f| which(&ids(f.backend, f.svc)))?;
    let mut half6 = Vec::new();
    for (k, f, answered) in entries6(m)? {
        if !which(&ids(f.backend, f.svc)) {
            continue;
        }
        if !answered {
            half6.push(k);
        } else if maps::delete_if(&m.conntrack6, maps::bytes(&k), |f: &Flow6| {
            which(&ids(f.backend, f.svc))
        })? {
            n += 1;
        }
    }
    n += halfopen::delete_all::<halfopen::V6>(m, &half6, |_, f| which(&ids(f.backend, f.svc)))?;
    Ok(n)
}

/// Deletes both entries of each of `conns` (as [`list`] gave them, from
/// whichever table holds them now); returns how many entries went. A
/// connection deleted while it lives breaks: its next packet finds no flow
/// and goes to the kernel, which answers a TCP segment with a RST. An
/// entry goes only if it still rewrites as the connection listed did (the
/// client's towards its NAT tuple and backend, the owner's back to the
/// client): a tuple or client port given to another connection since the
/// listing keeps that connection.
pub fn delete(m: &Maps, conns: &[Conn]) -> Result<usize> {
    // Each entry's key, and what it must still rewrite to: (source, dest).
    let (mut keys, mut to) = (Vec::new(), Vec::new());
    let (mut keys6, mut to6) = (Vec::new(), Vec::new());
    for c in conns {
        let proto = if c.proto == "udp" { 17 } else { 6 };
        // The client's entry, and the owner's (backend -> NAT address).
        for (src, dst, rewrite) in [
            (c.client, c.vip, (c.nat, c.backend)),
            (c.backend, c.nat, (c.vip, c.client)),
        ] {
            match (src, dst) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    keys.push(FlowKey {
                        saddr: maps::ip_to_be(*s.ip()),
                        daddr: maps::ip_to_be(*d.ip()),
                        sport: s.port().to_be(),
                        dport: d.port().to_be(),
                        proto,
                        ..Default::default()
                    });
                    to.push(rewrite);
                }
                (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                    keys6.push(FlowKey6 {
                        saddr: maps::in6_to_be(*s.ip()),
                        daddr: maps::in6_to_be(*d.ip()),
                        sport: s.port().to_be(),
                        dport: d.port().to_be(),
                        proto,
                        ..Default::default()
                    });
                    to6.push(rewrite);
                }
                _ => {}
            }
        }
    }
    let sa = maps::sockaddr_from_be;
    let sa6 = maps::sockaddr6_from_be;
    let ok = |i: usize, f: &Flow| (sa(f.saddr, f.sport), sa(f.daddr, f.dport)) == to[i];
    let ok6 = |i: usize, f: &Flow6| (sa6(&f.saddr, f.sport), sa6(&f.daddr, f.dport)) == to6[i];
    let mut n = 0;
    for (i, k) in keys.iter().enumerate() {
        n += usize::from(maps::delete_if(&m.conntrack, maps::bytes(k), |f| ok(i, f))?);
    }
    for (i, k) in keys6.iter().enumerate() {
        n += usize::from(maps::delete_if(&m.conntrack6, maps::bytes(k), |f| {
            ok6(i, f)
        })?);
    }
    n += halfopen::delete_all::<halfopen::V4>(m, &keys, ok)?;
    n += halfopen::delete_all::<halfopen::V6>(m, &keys6, ok6)?;
    Ok(n)
}

/// Active (not expired, not closing) connections per backend id.
pub fn active_per_backend(m: &Maps) -> Result<HashMap<u32, u64>> {
    Ok(census(m)?.0)
}

/// How full one connection table is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableUse {
    /// The map: `conntrack`, `ct_new` (half-open), `conntrack6`, `ct_new6`.
    pub table: &'static str,
    /// Entries in it now, two a connection (entries of ended connections
    /// stay until reused or evicted).
    pub entries: u64,
    /// The most it holds.
    pub capacity: u64,
}

/// [`active_per_backend`], and how full each connection table is: one
/// read of the tables.
pub fn census(m: &Maps) -> Result<(HashMap<u32, u64>, Vec<TableUse>)> {
    let all = all_entries(m)?;
    let ways = halfopen::WAYS as u64;
    let tables = [
        (
            "conntrack",
            true,
            true,
            u64::from(m.conntrack.max_entries()),
        ),
        (
            "ct_new",
            true,
            false,
            u64::from(m.ct_new.max_entries()) * ways,
        ),
        (
            "conntrack6",
            false,
            true,
            u64::from(m.conntrack6.max_entries()),
        ),
        (
            "ct_new6",
            false,
            false,
            u64::from(m.ct_new6.max_entries()) * ways,
        ),
    ]
    .map(|(table, v4, answered, capacity)| {
        let entries = all
            .iter()
            .filter(|e| e.src.is_ipv4() == v4 && e.answered == answered)
            .count() as u64;
        TableUse {
            table,
            entries,
            capacity,
        }
    })
    .to_vec();
    let s = m.timeouts()?;
    let now = crate::clock::now()?;
    let mut out = HashMap::new();
    for (c, o) in connections_of(all) {
        if o.state & maps::CT_CLOSING == 0
            && !expired_at(o.state, o.seen, c.proto, c.answered, &s, now)
        {
            *out.entry(o.backend).or_insert(0) += 1;
        }
    }
    Ok((out, tables))
}
