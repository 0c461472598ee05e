//! Services and backends: validated changes to the maps, and the Maglev
//! table of each service rebuilt and swapped in atomically after every change.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::maglev;
use crate::maps::{self, bytes, from_bytes, BackendEntry, Maps, SvcKey, SvcValue};
use crate::{conntrack, stats};

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

    fn from_number(n: u8) -> Option<Self> {
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
    pub vip: Ipv4Addr,
    /// Port, 0 for every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.proto)
    }
}

impl Service {
    /// The service at `addr` with `proto`.
    pub fn new(addr: SocketAddrV4, proto: Proto) -> Self {
        Self {
            vip: *addr.ip(),
            port: addr.port(),
            proto,
        }
    }

    fn key(&self) -> SvcKey {
        SvcKey {
            vip: maps::ip_to_be(self.vip),
            port: self.port.to_be(),
            proto: self.proto.number(),
            pad: 0,
        }
    }
}

/// A backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Backend {
    /// Backend id (index in the backends map and counters).
    pub id: u32,
    /// Address; port 0 means "the port the client used".
    pub addr: SocketAddrV4,
    /// Weight; 0 drains (no new flows).
    pub weight: u32,
    /// Service id.
    pub svc_id: u32,
}

/// A service with its id and backends.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceInfo {
    /// The service.
    #[serde(flatten)]
    pub service: Service,
    /// Its id.
    pub id: u32,
    /// Its backends, by address.
    pub backends: Vec<Backend>,
}

/// Every service with its backends, sorted.
pub fn list(m: &Maps) -> Result<Vec<ServiceInfo>> {
    let bes = backends(m)?;
    let mut out = Vec::new();
    for k in m.services.keys() {
        let key: SvcKey = from_bytes(&k);
        let v = m
            .services
            .lookup(&k, MapFlags::ANY)
            .context("reading services")?;
        let Some(v) = v else { continue };
        let id = from_bytes::<SvcValue>(&v).id;
        let Some(proto) = Proto::from_number(key.proto) else {
            continue;
        };
        let service = Service {
            vip: maps::ip_from_be(key.vip),
            port: u16::from_be(key.port),
            proto,
        };
        let mut b: Vec<Backend> = bes.iter().filter(|b| b.svc_id == id).cloned().collect();
        b.sort_by_key(|b| b.addr);
        out.push(ServiceInfo {
            service,
            id,
            backends: b,
        });
    }
    out.sort_by_key(|s| s.service);
    Ok(out)
}

/// Every used backend.
pub fn backends(m: &Maps) -> Result<Vec<Backend>> {
    let mut out = Vec::new();
    let all = m
        .backends
        .lookup_batch(1024, MapFlags::ANY, MapFlags::ANY)
        .context("reading backends")?;
    for (k, v) in all {
        let id = u32::from_ne_bytes(k[..4].try_into().expect("4-byte key"));
        let b: BackendEntry = from_bytes(&v);
        if b.flags & maps::BACKEND_USED != 0 {
            out.push(Backend {
                id,
                addr: SocketAddrV4::new(maps::ip_from_be(b.ip), u16::from_be(b.port)),
                weight: b.weight,
                svc_id: b.svc,
            });
        }
    }
    Ok(out)
}

fn find(m: &Maps, svc: &Service) -> Result<ServiceInfo> {
    list(m)?
        .into_iter()
        .find(|s| s.service == *svc)
        .ok_or_else(|| anyhow!("no such service: {svc}"))
}

/// Adds a service; it takes no flows until it has a backend.
pub fn service_add(m: &Maps, svc: &Service) -> Result<u32> {
    if svc.vip.is_unspecified() || svc.vip.is_broadcast() || svc.vip.is_multicast() {
        bail!("{} is not a unicast address", svc.vip);
    }
    let all = list(m)?;
    if all.iter().any(|s| s.service == *svc) {
        bail!("service {svc} already exists");
    }
    let id = (0..maps::MAX_SERVICES)
        .find(|i| all.iter().all(|s| s.id != *i))
        .ok_or_else(|| anyhow!("service table full ({} services)", maps::MAX_SERVICES))?;
    let settings = m.settings()?;
    install_table(m, id, &[], settings.maglev_size)?;
    let v = SvcValue { id };
    m.services
        .update(bytes(&svc.key()), bytes(&v), MapFlags::NO_EXIST)
        .with_context(|| format!("adding service {svc}"))?;
    Ok(id)
}

/// Removes a service, its backends and their flows.
pub fn service_del(m: &Maps, svc: &Service) -> Result<()> {
    let info = find(m, svc)?;
    m.services
        .delete(bytes(&svc.key()))
        .with_context(|| format!("removing service {svc}"))?;
    let _ = m.maglev.delete(&info.id.to_ne_bytes());
    for b in &info.backends {
        clear_backend(m, b.id)?;
    }
    conntrack::end_flows(m, |f| f.svc == info.id)?;
    Ok(())
}

fn check_weight(w: u32) -> Result<()> {
    if w > MAX_WEIGHT {
        bail!("weight {w} out of range 0..={MAX_WEIGHT}");
    }
    Ok(())
}

/// Adds a backend to a service and rebuilds the service's table.
pub fn backend_add(m: &Maps, svc: &Service, addr: SocketAddrV4, weight: u32) -> Result<u32> {
    check_weight(weight)?;
    if addr.ip().is_unspecified() || addr.ip().is_broadcast() || addr.ip().is_multicast() {
        bail!("{} is not a unicast address", addr.ip());
    }
    let info = find(m, svc)?;
    if info.backends.iter().any(|b| b.addr == addr) {
        bail!("backend {addr} already belongs to service {svc}");
    }
    let used = backends(m)?;
    let id = (0..maps::MAX_BACKENDS)
        .find(|i| used.iter().all(|b| b.id != *i))
        .ok_or_else(|| anyhow!("backend table full ({} backends)", maps::MAX_BACKENDS))?;
    let entry = BackendEntry {
        ip: maps::ip_to_be(*addr.ip()),
        port: addr.port().to_be(),
        flags: maps::BACKEND_USED,
        svc: info.id,
        weight,
    };
    stats::reset_backend(m, id)?;
    // The id may have served another backend: forget its next hop.
    m.nexthops
        .update(
            &id.to_ne_bytes(),
            &[0u8; std::mem::size_of::<maps::NextHop>()],
            MapFlags::ANY,
        )
        .with_context(|| format!("clearing the next hop of backend id {id}"))?;
    m.backends
        .update(&id.to_ne_bytes(), bytes(&entry), MapFlags::ANY)
        .with_context(|| format!("adding backend {addr}"))?;
    let mut all = info.backends.clone();
    all.push(Backend {
        id,
        addr,
        weight,
        svc_id: info.id,
    });
    if let Err(e) = install_table(m, info.id, &all, m.settings()?.maglev_size) {
        clear_backend(m, id)?;
        return Err(e);
    }
    Ok(id)
}

fn find_backend(m: &Maps, svc: &Service, addr: SocketAddrV4) -> Result<(ServiceInfo, Backend)> {
    let info = find(m, svc)?;
    let b = info
        .backends
        .iter()
        .find(|b| b.addr == addr)
        .cloned()
        .ok_or_else(|| anyhow!("service {svc} has no backend {addr}"))?;
    Ok((info, b))
}

/// Removes a backend: no new flows reach it, then its flows are ended.
/// Other backends' flows are untouched.
pub fn backend_del(m: &Maps, svc: &Service, addr: SocketAddrV4) -> Result<()> {
    let (info, b) = find_backend(m, svc, addr)?;
    let rest: Vec<Backend> = info.backends.into_iter().filter(|x| x.id != b.id).collect();
    install_table(m, info.id, &rest, m.settings()?.maglev_size)?;
    clear_backend(m, b.id)?;
    conntrack::end_flows(m, |f| f.backend == b.id)?;
    Ok(())
}

/// Changes a backend's weight; 0 drains it (existing flows continue).
pub fn backend_set(m: &Maps, svc: &Service, addr: SocketAddrV4, weight: u32) -> Result<()> {
    check_weight(weight)?;
    let (info, b) = find_backend(m, svc, addr)?;
    let all: Vec<Backend> = info
        .backends
        .into_iter()
        .map(|x| {
            if x.id == b.id {
                Backend { weight, ..x }
            } else {
                x
            }
        })
        .collect();
    let key = b.id.to_ne_bytes();
    let old: BackendEntry =
        from_bytes(&m.backends.lookup(&key, MapFlags::ANY)?.unwrap_or_default());
    let entry = BackendEntry { weight, ..old };
    m.backends
        .update(&key, bytes(&entry), MapFlags::ANY)
        .with_context(|| format!("setting the weight of {addr}"))?;
    // The table last: on failure the entry goes back, and both agree.
    if let Err(e) = install_table(m, info.id, &all, m.settings()?.maglev_size) {
        let _ = m.backends.update(&key, bytes(&old), MapFlags::ANY);
        return Err(e);
    }
    Ok(())
}

fn clear_backend(m: &Maps, id: u32) -> Result<()> {
    m.backends
        .update(
            &id.to_ne_bytes(),
            bytes(&BackendEntry::default()),
            MapFlags::ANY,
        )
        .with_context(|| format!("clearing backend id {id}"))
}

/// Builds the Maglev table of service `id` from `backends` into a new map
/// and swaps it in with one update of the outer map: a packet sees either
/// the old table or the new one, never a half-written one.
fn install_table(m: &Maps, id: u32, backends: &[Backend], size: u32) -> Result<()> {
    let input: Vec<maglev::Backend> = backends
        .iter()
        .map(|b| maglev::Backend {
            key: b.addr.to_string(),
            id: b.id,
            weight: b.weight,
        })
        .collect();
    let table = maglev::build(&input, size)?;
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        map_flags: libbpf_sys::BPF_F_INNER_MAP,
        ..Default::default()
    };
    let inner = MapHandle::create(MapType::Array, Some("lb_maglev"), 4, 4, size, &opts)
        .context("creating a Maglev table")?;
    let keys: Vec<u8> = (0..size).flat_map(|i| i.to_ne_bytes()).collect();
    let values: Vec<u8> = table.iter().flat_map(|v| v.to_ne_bytes()).collect();
    inner
        .update_batch(&keys, &values, size, MapFlags::ANY, MapFlags::ANY)
        .context("writing a Maglev table")?;
    let fd = inner.as_fd().as_raw_fd() as u32;
    m.maglev
        .update(&id.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
        .context("installing a Maglev table")
}
