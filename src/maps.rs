//! Typed access to an instance's pinned maps. The structs are the ones the
//! skeleton generates from the C program's BTF (bpf/lb.h), and so are the
//! constants shared with it (the enums of bpf/lb.h). The model's addresses
//! (`IpAddr`, `SocketAddr`) become the maps' network-order fields here and
//! nowhere else. IPv4 and IPv6 services, and connections, have maps of
//! their own (`services`/`services6`, `conntrack`/`conntrack6`, ...);
//! backends and Maglev tables are shared.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use nix::errno::Errno;

use crate::bpffs::PinDir;
use crate::model::{Backend, Proto, Service};
use crate::settings::{PortRange, Settings};
use crate::skel::lb::types::{self, backend_flags, flow_dir, flow_state, lb_limits};

pub use types::{
    backend as BackendEntry, flow as Flow, flow_key as FlowKey, lb_nexthop as NextHop,
};
pub use types::{flow6 as Flow6, flow6_key as FlowKey6, lb_in6 as In6, svc6_key as Svc6Key};
pub use types::{svc_key as SvcKey, svc_value as SvcValue};

// SAFETY: plain old data generated from the program's BTF.
unsafe impl plain::Plain for types::svc_key {}
unsafe impl plain::Plain for types::svc_value {}
unsafe impl plain::Plain for types::backend {}
unsafe impl plain::Plain for types::flow_key {}
unsafe impl plain::Plain for types::flow {}
unsafe impl plain::Plain for types::rodata {}
unsafe impl plain::Plain for types::svc6_key {}
unsafe impl plain::Plain for types::flow6_key {}
unsafe impl plain::Plain for types::flow6 {}

// The constants shared with the datapath: the enums of bpf/lb.h, from the
// skeleton's generated types.

/// Capacities of the fixed-size maps: most services.
pub const MAX_SERVICES: u32 = lb_limits::LB_MAX_SERVICES.0;
/// Most backends over all services.
pub const MAX_BACKENDS: u32 = lb_limits::LB_MAX_BACKENDS.0;
/// Buckets of a backend's handshake latency histogram (map `be_hs`):
/// bucket i counts handshakes of at most 2^i µs, the last the longer ones.
pub const HS_BUCKETS: usize = lb_limits::LB_HS_BUCKETS.0 as usize;
/// The u64 fields of a `be_hs` value (`struct lb_be_hs`): the buckets, the
/// sum (ns), resets, unanswered SYNs.
pub const HS_FIELDS: usize = HS_BUCKETS + 3;
/// `LB_BACKEND_USED` bit of a backend's flags.
pub const BACKEND_USED: u16 = narrow16(backend_flags::LB_BACKEND_USED.0);
/// `LB_DIR_TO_BACKEND`: a client's entry.
pub const DIR_TO_BACKEND: u8 = narrow8(flow_dir::LB_DIR_TO_BACKEND.0);
/// `LB_DIR_TO_CLIENT`: an owner entry.
pub const DIR_TO_CLIENT: u8 = narrow8(flow_dir::LB_DIR_TO_CLIENT.0);
/// `LB_CT_CLOSING` bit of an owner's state: RST, or FIN both ways.
pub const CT_CLOSING: u32 = flow_state::LB_CT_CLOSING.0;
/// `LB_CT_FIN_FWD` bit: the client sent FIN.
pub const CT_FIN_FWD: u32 = flow_state::LB_CT_FIN_FWD.0;
/// `LB_CT_FIN_REV` bit: the backend sent FIN.
pub const CT_FIN_REV: u32 = flow_state::LB_CT_FIN_REV.0;
/// `LB_CT_REPLIED` bit: the backend answered.
pub const CT_REPLIED: u32 = flow_state::LB_CT_REPLIED.0;
/// `LB_CT_RECLAIMED` bit: the NAT tuple is being given to a new flow.
pub const CT_RECLAIMED: u32 = flow_state::LB_CT_RECLAIMED.0;

/// `v` as a u8 field holds it; a constant that does not fit fails the build.
const fn narrow8(v: u32) -> u8 {
    assert!(
        v <= u8::MAX as u32,
        "a shared constant does not fit its field"
    );
    v as u8
}

/// `v` as a u16 field holds it; see [`narrow8`].
const fn narrow16(v: u32) -> u16 {
    assert!(
        v <= u16::MAX as u32,
        "a shared constant does not fit its field"
    );
    v as u16
}

/// A service's flags (`enum svc_flags`) for its forwarding mode.
pub fn svc_flags(conf: &crate::model::SvcConf) -> u32 {
    let mode = match conf.mode {
        crate::model::FwdMode::Nat => 0,
        crate::model::FwdMode::Dsr => types::svc_flags::LB_SVC_DSR.0,
        crate::model::FwdMode::Ipip => types::svc_flags::LB_SVC_IPIP.0,
    };
    let affinity = match conf.affinity {
        crate::model::Affinity::None => 0,
        crate::model::Affinity::ClientIp => types::svc_flags::LB_SVC_CLIENT_IP.0,
    };
    let scheduler = match conf.scheduler {
        crate::model::Scheduler::Maglev => 0,
        crate::model::Scheduler::LeastConn => types::svc_flags::LB_SVC_LEAST_CONN.0,
        crate::model::Scheduler::Latency => types::svc_flags::LB_SVC_LATENCY.0,
    };
    let timeout = conf
        .affinity_timeout
        .unwrap_or(0)
        .min(crate::model::MAX_AFFINITY_TIMEOUT)
        << types::svc_flags::LB_SVC_AFFINITY_SHIFT.0;
    mode | affinity | scheduler | timeout
}

/// A service's mode, affinity and scheduler, as its map value says.
pub fn svc_conf(v: &SvcValue) -> crate::model::SvcConf {
    crate::model::SvcConf {
        mode: if v.flags & types::svc_flags::LB_SVC_DSR.0 != 0 {
            crate::model::FwdMode::Dsr
        } else if v.flags & types::svc_flags::LB_SVC_IPIP.0 != 0 {
            crate::model::FwdMode::Ipip
        } else {
            crate::model::FwdMode::Nat
        },
        affinity: if v.flags & types::svc_flags::LB_SVC_CLIENT_IP.0 != 0 {
            crate::model::Affinity::ClientIp
        } else {
            crate::model::Affinity::None
        },
        affinity_timeout: Some(v.flags >> types::svc_flags::LB_SVC_AFFINITY_SHIFT.0)
            .filter(|&t| t != 0),
        scheduler: if v.flags & types::svc_flags::LB_SVC_LEAST_CONN.0 != 0 {
            crate::model::Scheduler::LeastConn
        } else if v.flags & types::svc_flags::LB_SVC_LATENCY.0 != 0 {
            crate::model::Scheduler::Latency
        } else {
            crate::model::Scheduler::Maglev
        },
    }
}

/// Tells the datapath how many DSR and IPIP services there are (it looks a
/// stray TCP segment's service up only while there are).
pub fn set_dsr_services(m: &Maps, n: u32) -> Result<()> {
    m.dsr_services
        .update(&0u32.to_ne_bytes(), &n.to_ne_bytes(), MapFlags::ANY)
        .context("writing the DSR service count")
}

/// Names of the maps an instance pins, as in the C program.
pub const PINNED: &[&str] = &[
    "stats",
    "be_stats",
    "be_hs",
    "services",
    "services6",
    "backends",
    "maglev",
    "conntrack",
    "ct_new",
    "conntrack6",
    "ct_new6",
    "nat_cursor",
    "tx_ports",
    "nexthops",
    "frags",
    "frags6",
    "dsr_flows",
    "dsr_flows6",
    "dsr_services",
    "affinity",
    "affinity6",
    "trace_rb",
    "trace_cfg",
];

/// The bytes of a plain struct.
pub fn bytes<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: Plain types have no invalid bit patterns or pointers.
    unsafe { plain::as_bytes(v) }
}

/// A plain struct from bytes (zero-filled if short).
pub fn from_bytes<T: plain::Plain + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let _ = plain::copy_from_bytes(&mut v, b);
    v
}

/// An address as the datapath stores it (network order in a u32).
pub fn ip_to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_to_be`].
pub fn ip_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// An IPv4 address as the datapath stores it ([`ip_to_be`]); an IPv6
/// address where only IPv4 fits (SNAT pool) is an error naming it.
pub fn be32_of(ip: IpAddr) -> Result<u32> {
    match ip {
        IpAddr::V4(v4) => Ok(ip_to_be(v4)),
        IpAddr::V6(_) => bail!("{ip}: only IPv4 fits here"),
    }
}

/// An IPv6 address as the datapath stores it (four network-order words).
pub fn in6_to_be(ip: Ipv6Addr) -> In6 {
    let o = ip.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    In6 {
        w: [w(0), w(4), w(8), w(12)],
    }
}

/// The inverse of [`in6_to_be`].
pub fn in6_from_be(a: &In6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in a.w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// An address and port as the datapath stores them (network order).
pub fn sockaddr_from_be(ip: u32, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip_from_be(ip)), u16::from_be(port))
}

/// The same for IPv6.
pub fn sockaddr6_from_be(ip: &In6, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(in6_from_be(ip)), u16::from_be(port))
}

/// The key of an IPv4 service in the services map.
pub fn svc_key(svc: &Service) -> Result<SvcKey> {
    Ok(SvcKey {
        vip: be32_of(svc.vip)?,
        port: svc.port.to_be(),
        proto: svc.proto.number(),
        pad: 0,
    })
}

/// The services map of `svc`'s family, and `svc`'s key in it.
pub fn svc_map_key<'a>(m: &'a Maps, svc: &Service) -> Result<(&'a MapHandle, Vec<u8>)> {
    Ok(match svc.vip {
        IpAddr::V4(_) => (&m.services, bytes(&svc_key(svc)?).to_vec()),
        IpAddr::V6(v6) => {
            let k = Svc6Key {
                vip: in6_to_be(v6),
                port: svc.port.to_be(),
                proto: svc.proto.number(),
                pad: 0,
            };
            (&m.services6, bytes(&k).to_vec())
        }
    })
}

/// The service of a key of the services map (`None`: not a protocol a
/// service has).
pub fn service_of_key(k: &SvcKey) -> Option<Service> {
    Some(Service::new(
        sockaddr_from_be(k.vip, k.port),
        Proto::from_number(k.proto)?,
    ))
}

/// The same for the services6 map.
pub fn service_of_key6(k: &Svc6Key) -> Option<Service> {
    Some(Service::new(
        sockaddr6_from_be(&k.vip, k.port),
        Proto::from_number(k.proto)?,
    ))
}

/// The entry of a used backend in the backends map (the address in `ip`
/// or `ip6`, by family).
pub fn backend_entry(b: &Backend) -> Result<BackendEntry> {
    let (ip, ip6) = match b.addr.ip() {
        IpAddr::V4(v4) => (ip_to_be(v4), In6::default()),
        IpAddr::V6(v6) => (0, in6_to_be(v6)),
    };
    Ok(BackendEntry {
        ip,
        port: b.addr.port().to_be(),
        flags: BACKEND_USED,
        svc: b.svc_id,
        weight: b.weight,
        ip6,
    })
}

/// The backend of entry `id` of the backends map, if the entry is used.
pub fn backend_of(id: u32, e: &BackendEntry) -> Option<Backend> {
    let v6 = e.ip6.w != [0; 4];
    (e.flags & BACKEND_USED != 0).then(|| Backend {
        id,
        addr: if v6 {
            sockaddr6_from_be(&e.ip6, e.port)
        } else {
            sockaddr_from_be(e.ip, e.port)
        },
        weight: e.weight,
        svc_id: e.svc,
    })
}

/// Entries asked for in one `BPF_MAP_LOOKUP_BATCH` (grown when a hash
/// bucket holds more).
const BATCH: usize = 4096;

/// How [`read_raw`] reads a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `BPF_MAP_LOOKUP_BATCH`, falling back to [`ReadMode::ByKey`] if the
    /// kernel refuses it for this map.
    Batch,
    /// Two syscalls an entry: next key, lookup.
    ByKey,
}

/// Entries of a map as the kernel copies them out: keys and values packed
/// one after another (a per-CPU map's value is one 8-byte aligned slot per
/// possible CPU).
#[derive(Debug, Default)]
pub struct RawEntries {
    /// Bytes of one key.
    pub key_size: usize,
    /// Bytes of one value (all CPUs' slots for a per-CPU map).
    pub value_size: usize,
    /// The keys.
    pub keys: Vec<u8>,
    /// The values, in the keys' order.
    pub values: Vec<u8>,
}

impl RawEntries {
    /// Entries read.
    pub fn len(&self) -> usize {
        self.keys.len() / self.key_size.max(1)
    }

    /// Whether none was read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (key, value) byte slices.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .chunks_exact(self.key_size.max(1))
            .zip(self.values.chunks_exact(self.value_size.max(1)))
    }
}

fn is_percpu(t: MapType) -> bool {
    matches!(
        t,
        MapType::PercpuArray | MapType::PercpuHash | MapType::LruPercpuHash
    )
}

/// Bytes of one value as lookups copy it out: a per-CPU map has one slot
/// per possible CPU, each rounded up to 8 bytes.
fn copied_value_size(map: &MapHandle) -> Result<usize> {
    let v = map.value_size() as usize;
    if is_percpu(map.map_type()) {
        let ncpu = libbpf_rs::num_possible_cpus().context("counting CPUs")?;
        Ok(v.next_multiple_of(8) * ncpu)
    } else {
        Ok(v)
    }
}

/// Reads up to `limit` entries of a hash or array map (every entry if
/// `None`; an array's first `limit` indices; of a hash, whose batches come
/// in whole buckets, the first `limit` read), the way `mode` says.
pub fn read_raw(map: &MapHandle, limit: Option<usize>, mode: ReadMode) -> Result<RawEntries> {
    let key_size = map.key_size() as usize;
    let value_size = copied_value_size(map)?;
    let limit = limit.unwrap_or(map.max_entries() as usize);
    let mut out = RawEntries {
        key_size,
        value_size,
        ..Default::default()
    };
    if mode == ReadMode::Batch {
        match read_batch(map, limit, &mut out) {
            Ok(()) => return Ok(out),
            Err(Refused) => {
                tracing::debug!(
                    "batch lookup refused on map {}: reading by key",
                    map.name().to_string_lossy()
                );
                out.keys.clear();
                out.values.clear();
            }
        }
    }
    read_by_key(map, limit, &mut out)?;
    Ok(out)
}

/// The kernel has no batch lookup for this map (or none at all).
struct Refused;

/// Reads with `BPF_MAP_LOOKUP_BATCH` into `out`; `Err` if the kernel
/// refuses it (then nothing read counts).
fn read_batch(map: &MapHandle, limit: usize, out: &mut RawEntries) -> Result<(), Refused> {
    let fd = map.as_fd().as_raw_fd();
    let (ks, vs) = (out.key_size, out.value_size);
    // The position token: a bucket index for hashes, a key for arrays.
    let tok_size = ks.max(8);
    let mut in_tok = vec![0u8; tok_size];
    let mut out_tok = vec![0u8; tok_size];
    let mut first = true;
    let mut chunk = BATCH.min(limit.max(1));
    // A hash bucket comes whole: one that does not fit in what is left of
    // the limit is read whole and the extra entries dropped.
    let mut bucket = 0;
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    loop {
        let left = limit.saturating_sub(out.len());
        if left == 0 {
            break;
        }
        let want = chunk.min(left.max(bucket));
        let n = out.len();
        out.keys.reserve(want * ks);
        out.values.reserve(want * vs);
        let mut count = want as u32;
        // SAFETY: the spare capacity holds `want` keys and values and the
        // tokens `tok_size` bytes, as the kernel writes them; the lengths
        // then cover the `count` entries it wrote (at most `want`).
        let ret = unsafe {
            let ret = libbpf_sys::bpf_map_lookup_batch(
                fd,
                if first {
                    std::ptr::null_mut()
                } else {
                    in_tok.as_mut_ptr().cast()
                },
                out_tok.as_mut_ptr().cast(),
                out.keys.spare_capacity_mut().as_mut_ptr().cast(),
                out.values.spare_capacity_mut().as_mut_ptr().cast(),
                &mut count,
                &opts,
            );
            let got = (count as usize).min(want);
            out.keys.set_len((n + got) * ks);
            out.values.set_len((n + got) * vs);
            ret
        };
        if ret == 0 {
            std::mem::swap(&mut in_tok, &mut out_tok);
            first = false;
            continue;
        }
        match Errno::from_raw(-ret) {
            Errno::ENOENT => break,
            Errno::EINTR | Errno::EAGAIN => continue,
            // The next hash bucket holds more entries than asked for: ask
            // for more.
            Errno::ENOSPC if out.len() == n => {
                bucket = want * 2;
                chunk = chunk.max(bucket);
            }
            e => {
                // First call: no batch lookup here (old kernel, map type).
                // Later: read it all again by key rather than give up.
                tracing::debug!("batch lookup: {e}");
                return Err(Refused);
            }
        }
    }
    out.keys.truncate(limit * ks);
    out.values.truncate(limit * vs);
    Ok(())
}

/// Reads by key into `out`: the next key, then its value.
fn read_by_key(map: &MapHandle, limit: usize, out: &mut RawEntries) -> Result<()> {
    let percpu = is_percpu(map.map_type());
    let slot = map.value_size() as usize;
    for k in map.keys() {
        if out.len() >= limit {
            break;
        }
        if percpu {
            let Some(v) = map
                .lookup_percpu(&k, MapFlags::ANY)
                .with_context(|| format!("reading map {}", map.name().to_string_lossy()))?
            else {
                continue;
            };
            out.keys.extend_from_slice(&k);
            for cpu in v {
                let mut b = cpu;
                b.resize(slot.next_multiple_of(8), 0);
                out.values.extend_from_slice(&b);
            }
        } else {
            let Some(v) = map
                .lookup(&k, MapFlags::ANY)
                .with_context(|| format!("reading map {}", map.name().to_string_lossy()))?
            else {
                continue;
            };
            out.keys.extend_from_slice(&k);
            out.values.extend_from_slice(&v);
        }
    }
    Ok(())
}

/// Deletes `key`'s entry from hash `map` if its value passes `ok`, and only
/// then; returns whether an entry went. The datapath may give the key to
/// another connection between the look and the delete (the kernel has no
/// compare-and-delete): a value taken that fails `ok` is put back
/// (BPF_NOEXIST: unless the datapath made a newer one meanwhile).
pub fn delete_if<V: plain::Plain + Default>(
    map: &MapHandle,
    key: &[u8],
    ok: impl Fn(&V) -> bool,
) -> Result<bool> {
    let name = || map.name().to_string_lossy().into_owned();
    let Some(v) = map
        .lookup(key, MapFlags::ANY)
        .with_context(|| format!("reading map {}", name()))?
    else {
        return Ok(false);
    };
    if !ok(&from_bytes::<V>(&v)) {
        return Ok(false);
    }
    let taken = match map.lookup_and_delete(key) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(false),
        // ENOENT: gone meanwhile
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("deleting from map {}", name())),
    };
    if ok(&from_bytes::<V>(&taken)) {
        return Ok(true);
    }
    let _ = map.update(key, &taken, MapFlags::NO_EXIST);
    Ok(false)
}

/// Every entry of a hash or array map as (key, value), read a batch of
/// entries a syscall ([`ReadMode::Batch`]).
pub fn read_all<K, V>(map: &MapHandle) -> Result<Vec<(K, V)>>
where
    K: plain::Plain + Default,
    V: plain::Plain + Default,
{
    read_typed(map, ReadMode::Batch)
}

/// [`read_all`], the way `mode` says.
pub fn read_typed<K, V>(map: &MapHandle, mode: ReadMode) -> Result<Vec<(K, V)>>
where
    K: plain::Plain + Default,
    V: plain::Plain + Default,
{
    if map.key_size() as usize != std::mem::size_of::<K>()
        || map.value_size() as usize != std::mem::size_of::<V>()
        || is_percpu(map.map_type())
    {
        bail!(
            "map {} has an unexpected layout ({}-byte keys, {}-byte values)",
            map.name().to_string_lossy(),
            map.key_size(),
            map.value_size()
        );
    }
    let raw = read_raw(map, None, mode)?;
    Ok(raw
        .iter()
        .map(|(k, v)| (from_bytes(k), from_bytes(v)))
        .collect())
}

/// The first `n` entries of a per-CPU array of `fields` u64 counters,
/// each summed over CPUs: index i of the result is entry i.
pub fn sum_percpu_u64(map: &MapHandle, n: usize, fields: usize) -> Result<Vec<Vec<u64>>> {
    if map.map_type() != MapType::PercpuArray || map.value_size() as usize != fields * 8 {
        bail!(
            "map {} is not a per-CPU array of {fields} counters",
            map.name().to_string_lossy()
        );
    }
    let n = n.min(map.max_entries() as usize);
    let raw = read_raw(map, Some(n), ReadMode::Batch)?;
    let mut sums = vec![vec![0u64; fields]; n];
    for (k, v) in raw.iter() {
        let i = u32::from_ne_bytes(k.try_into().expect("4-byte key")) as usize;
        let Some(s) = sums.get_mut(i) else { continue };
        for cpu in v.chunks_exact(fields * 8) {
            for (f, b) in s.iter_mut().zip(cpu.chunks_exact(8)) {
                *f += u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            }
        }
    }
    Ok(sums)
}

/// Zeroes the counters (traffic, handshakes) of backend id `id` on every
/// CPU (before the id is reused).
pub fn reset_backend_counters(m: &Maps, id: u32) -> Result<()> {
    let ncpu = libbpf_rs::num_possible_cpus().context("counting CPUs")?;
    for map in [&m.be_stats, &m.be_hs] {
        let zero = vec![vec![0u8; map.value_size() as usize]; ncpu];
        map.update_percpu(&id.to_ne_bytes(), &zero, MapFlags::ANY)
            .with_context(|| format!("resetting counters of backend id {id}"))?;
    }
    Ok(())
}

/// The handshake numbers of backend ids 0..n (map `be_hs`), summed over
/// CPUs (one batch lookup): [`HS_FIELDS`] u64 each.
pub fn read_handshakes(m: &Maps, n: usize) -> Result<Vec<Vec<u64>>> {
    sum_percpu_u64(&m.be_hs, n, HS_FIELDS).context("reading backend handshake counters")
}

/// An instance's maps, opened from their pins.
pub struct Maps {
    /// Verdict counters.
    pub stats: MapHandle,
    /// Per-backend counters.
    pub be_stats: MapHandle,
    /// Per-backend handshake latency, resets, unanswered SYNs.
    pub be_hs: MapHandle,
    /// VIP:port/proto -> service id.
    pub services: MapHandle,
    /// The same for IPv6 services.
    pub services6: MapHandle,
    /// Backend id -> backend.
    pub backends: MapHandle,
    /// Service id -> Maglev table.
    pub maglev: MapHandle,
    /// The connection table (answered connections).
    pub conntrack: MapHandle,
    /// Half-open connections.
    pub ct_new: MapHandle,
    /// The connection table of IPv6.
    pub conntrack6: MapHandle,
    /// Half-open IPv6 connections.
    pub ct_new6: MapHandle,
    /// Interfaces for XDP_REDIRECT.
    pub tx_ports: MapHandle,
    /// Next hops cached per backend id.
    pub nexthops: MapHandle,
    /// How many services are DSR (one entry).
    pub dsr_services: MapHandle,
    /// The program's settings (its .rodata).
    pub config: MapHandle,
}

fn open(path: &Path) -> Result<MapHandle> {
    MapHandle::from_pinned_path(path).with_context(|| format!("opening map {}", path.display()))
}

impl Maps {
    /// Opens the maps of the instance at `pins`.
    pub fn open(pins: &PinDir) -> Result<Self> {
        if !pins.map("conntrack").exists() {
            return Err(anyhow!(
                "no lb instance at {} (run lb attach first, or give --pin-dir/--netns)",
                pins.root.display()
            ));
        }
        Ok(Self {
            stats: open(&pins.map("stats"))?,
            be_stats: open(&pins.map("be_stats"))?,
            be_hs: open(&pins.map("be_hs"))?,
            services: open(&pins.map("services"))?,
            services6: open(&pins.map("services6"))?,
            backends: open(&pins.map("backends"))?,
            maglev: open(&pins.map("maglev"))?,
            conntrack: open(&pins.map("conntrack"))?,
            ct_new: open(&pins.map("ct_new"))?,
            conntrack6: open(&pins.map("conntrack6"))?,
            ct_new6: open(&pins.map("ct_new6"))?,
            tx_ports: open(&pins.map("tx_ports"))?,
            nexthops: open(&pins.map("nexthops"))?,
            dsr_services: open(&pins.map("dsr_services"))?,
            config: open(&pins.config())?,
        })
    }

    /// The settings the instance's program was loaded with.
    pub fn settings(&self) -> Result<Settings> {
        settings_of(&self.config, self.conntrack.max_entries())
    }

    /// For each SNAT address, in the order of `settings().snat` (IPv4 ones,
    /// then IPv6 ones): whether it is lb's alone (every port from 1024).
    pub fn snat_full(&self) -> Result<Vec<bool>> {
        let ro = rodata_of(&self.config)?;
        let bit = |i: u32| ro.snat_full >> i & 1 == 1;
        Ok((0..ro.snat_count.min(16))
            .map(bit)
            .chain((0..ro.snat_count6.min(16)).map(|j| bit(16 + j)))
            .collect())
    }

    /// The program's settings as it holds them (its .rodata).
    pub fn rodata(&self) -> Result<types::rodata> {
        rodata_of(&self.config)
    }

    /// The program's timeouts in clock ticks, as the datapath compares them.
    pub fn timeouts(&self) -> Result<Timeouts> {
        let ro = rodata_of(&self.config)?;
        Ok(Timeouts {
            hz: ro.hz,
            tcp: ro.tcp_timeout,
            udp: ro.udp_timeout,
            fin: ro.fin_timeout,
            syn: ro.syn_timeout,
        })
    }
}

/// Timeouts in clock ticks (jiffies).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Ticks a second.
    pub hz: u32,
    /// Idle TCP.
    pub tcp: u32,
    /// Idle UDP.
    pub udp: u32,
    /// After RST or FIN both ways.
    pub fin: u32,
    /// Idle half-open TCP.
    pub syn: u32,
}

pub(crate) fn rodata_of(rodata: &dyn MapCore) -> Result<types::rodata> {
    let b = rodata
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context("reading the program's settings")?
        .ok_or_else(|| anyhow!("the program's settings map is empty"))?;
    // The shared enums' anchor comes last and holds no setting: an
    // instance loaded by a build without it has every setting in front.
    let settings = std::mem::offset_of!(types::rodata, lb_shared);
    if b.len() < settings {
        bail!(
            "settings map has an unexpected layout ({} bytes, not {})",
            b.len(),
            std::mem::size_of::<types::rodata>()
        );
    }
    let mut ro: types::rodata = unsafe { std::mem::zeroed() };
    // SAFETY: rodata is plain data: any bytes are a valid value.
    let dst = unsafe { plain::as_mut_bytes(&mut ro) };
    let n = b.len().min(dst.len());
    dst[..n].copy_from_slice(&b[..n]);
    Ok(ro)
}

/// Reads settings back from a program's .rodata map and the size of its
/// connection table.
pub fn settings_of(rodata: &dyn MapCore, conntrack_entries: u32) -> Result<Settings> {
    let ro = rodata_of(rodata)?;
    let secs = |t: u32| t / ro.hz.max(1);
    Ok(Settings {
        nat_ports: ro
            .nat_lo
            .iter()
            .zip(ro.nat_hi.iter())
            .filter(|(lo, hi)| lo <= hi)
            .map(|(&lo, &hi)| PortRange { lo, hi })
            .collect(),
        // IPv4 addresses first, then IPv6 ones.
        snat: ro.snat_addr[..(ro.snat_count as usize).min(ro.snat_addr.len())]
            .iter()
            .map(|a| IpAddr::V4(ip_from_be(*a)))
            .chain(
                ro.snat_addr6[..(ro.snat_count6 as usize).min(ro.snat_addr6.len())]
                    .iter()
                    .map(|a| IpAddr::V6(in6_from_be(a))),
            )
            .collect(),
        maglev_size: ro.maglev_size,
        max_flows: conntrack_entries / 2,
        max_half_open: ro.ho_half_open,
        tcp_timeout: secs(ro.tcp_timeout),
        udp_timeout: secs(ro.udp_timeout),
        fin_timeout: secs(ro.fin_timeout),
        handshake_latency: ro.hs_latency_off == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Creating maps needs root: a local run without it skips, CI fails.
    fn root_or_skip(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var("CI").is_err(), "{test} needs root under CI");
        eprintln!("SKIPPED {test}: needs root");
        false
    }

    fn create(t: MapType, key: u32, value: u32, max: u32) -> MapHandle {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        MapHandle::create(t, Some("lb_test"), key, value, max, &opts).expect("creating a map")
    }

    #[test]
    fn hash_read_in_batches_is_every_entry() {
        if !root_or_skip("hash_read_in_batches_is_every_entry") {
            return;
        }
        let map = create(MapType::Hash, 4, 8, 3 * BATCH as u32);
        let none: Vec<(u32, u64)> = read_all(&map).unwrap();
        assert!(none.is_empty());
        // More than two batches' worth.
        let n = 2 * BATCH as u32 + 123;
        let put: Vec<(u32, u64)> = (0..n)
            .map(|i| (i * 7 + 1, u64::from(i) << 33 | 5))
            .collect();
        let keys: Vec<u8> = put.iter().flat_map(|(k, _)| k.to_ne_bytes()).collect();
        let values: Vec<u8> = put.iter().flat_map(|(_, v)| v.to_ne_bytes()).collect();
        map.update_batch(&keys, &values, n, MapFlags::ANY, MapFlags::ANY)
            .unwrap();
        for mode in [ReadMode::Batch, ReadMode::ByKey] {
            let mut got: Vec<(u32, u64)> = read_typed(&map, mode).unwrap();
            got.sort();
            assert_eq!(got, put, "{mode:?}");
        }
        // A hash comes in whole buckets: the one that straddles the limit
        // is read whole and cut.
        let raw = read_raw(&map, Some(10), ReadMode::Batch).unwrap();
        assert_eq!(raw.len(), 10, "a limit is kept");
        let err = read_typed::<u32, u32>(&map, ReadMode::Batch).unwrap_err();
        assert!(format!("{err}").contains("unexpected layout"), "{err}");
    }

    #[test]
    fn percpu_counters_are_summed_over_cpus() {
        if !root_or_skip("percpu_counters_are_summed_over_cpus") {
            return;
        }
        let ncpu = libbpf_rs::num_possible_cpus().unwrap() as u64;
        let map = create(MapType::PercpuArray, 4, 16, 8);
        let val = |i: u64, cpu: u64| [i * 1000 + cpu + 1, (i + 1) << 20 | cpu];
        for i in 0..8u32 {
            let per_cpu: Vec<Vec<u8>> = (0..ncpu)
                .map(|c| {
                    val(u64::from(i), c)
                        .iter()
                        .flat_map(|x| x.to_ne_bytes())
                        .collect()
                })
                .collect();
            map.update_percpu(&i.to_ne_bytes(), &per_cpu, MapFlags::ANY)
                .unwrap();
        }
        let sums = sum_percpu_u64(&map, 5, 2).unwrap();
        assert_eq!(sums.len(), 5);
        for (i, s) in sums.iter().enumerate() {
            let want: Vec<u64> = (0..2)
                .map(|f| (0..ncpu).map(|c| val(i as u64, c)[f]).sum())
                .collect();
            assert_eq!(*s, want, "entry {i}");
        }
        let batch = read_raw(&map, Some(5), ReadMode::Batch).unwrap();
        let by_key = read_raw(&map, Some(5), ReadMode::ByKey).unwrap();
        assert_eq!(batch.len(), 5);
        assert_eq!(batch.value_size, 16 * ncpu as usize);
        assert_eq!(
            (batch.keys, batch.values),
            (by_key.keys, by_key.values),
            "both ways read the same"
        );
        assert!(
            sum_percpu_u64(&map, 5, 3).is_err(),
            "a wrong layout is refused"
        );
    }
}
