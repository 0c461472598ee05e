//! Services and backends: the model, reading them from the maps, and the
//! map writes the reconciler (crate::reconcile) makes, each by id; the
//! Maglev table of a service is rebuilt and swapped in atomically after
//! every change.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::conntrack;
use crate::maglev;
use crate::maps::{self, bytes, from_bytes, BackendEntry, Maps, Svc6Key, SvcKey, SvcValue};
use crate::reconcile::{self, Edit};

pub use crate::model::{
    check_backend, check_service, check_unicast, check_weight, weight_of, Backend, FwdMode, Proto,
    Scheduler, Service, SvcConf, MAX_WEIGHT,
};

/// A service with its id and backends.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceInfo {
    /// The service.
    #[serde(flatten)]
    pub service: Service,
    /// Its id.
    pub id: u32,
    /// Its forwarding mode and scheduler.
    #[serde(flatten)]
    pub conf: SvcConf,
    /// Its backends, by address.
    pub backends: Vec<Backend>,
}

/// Every service with its backends, sorted.
pub fn list(m: &Maps) -> Result<Vec<ServiceInfo>> {
    services_of(m, &backends(m)?)
}

/// Every service with its backends among `bes`, sorted.
pub(crate) fn services_of(m: &Maps, bes: &[Backend]) -> Result<Vec<ServiceInfo>> {
    let mut out = Vec::new();
    let v4: Vec<(SvcKey, SvcValue)> = maps::read_all(&m.services).context("reading services")?;
    let v6: Vec<(Svc6Key, SvcValue)> =
        maps::read_all(&m.services6).context("reading IPv6 services")?;
    let all = v4
        .iter()
        .map(|(k, v)| (maps::service_of_key(k), v))
        .chain(v6.iter().map(|(k, v)| (maps::service_of_key6(k), v)));
    for (service, v) in all {
        let id = v.id;
        let Some(service) = service else {
            continue;
        };
        let mut b: Vec<Backend> = bes.iter().filter(|b| b.svc_id == id).cloned().collect();
        b.sort_by_key(|b| b.addr);
        out.push(ServiceInfo {
            service,
            id,
            conf: maps::svc_conf(v),
            backends: b,
        });
    }
    out.sort_by_key(|s| s.service);
    Ok(out)
}

/// Every used backend.
pub fn backends(m: &Maps) -> Result<Vec<Backend>> {
    let all: Vec<(u32, BackendEntry)> = maps::read_all(&m.backends).context("reading backends")?;
    Ok(all
        .into_iter()
        .filter_map(|(id, b)| maps::backend_of(id, &b))
        .collect())
}

// The changes below go through the reconciler (crate::reconcile), like
// every command's: kept for tests and benchmarks that drive the maps
// directly. They take no lock: a caller sharing the instance with other
// writers takes crate::lock::InstanceLock first.

/// Adds a service; it takes no flows until it has a backend. Returns its id.
pub fn service_add(m: &Maps, svc: &Service) -> Result<u32> {
    service_add_conf(m, svc, SvcConf::default())
}

/// Adds a service with a forwarding mode and scheduler; returns its id.
pub fn service_add_conf(m: &Maps, svc: &Service, conf: SvcConf) -> Result<u32> {
    let after = reconcile::edit_maps(m, &[Edit::AddService(*svc, conf)])?;
    Ok(after.services[svc].id)
}

/// Removes a service, its backends and their flows.
pub fn service_del(m: &Maps, svc: &Service) -> Result<()> {
    reconcile::edit_maps(m, &[Edit::DelService(*svc)]).map(drop)
}

/// Adds a backend to a service and rebuilds the service's table. Returns
/// the backend's id.
pub fn backend_add(
    m: &Maps,
    svc: &Service,
    addr: impl Into<SocketAddr>,
    weight: u32,
) -> Result<u32> {
    let addr = addr.into();
    let after = reconcile::edit_maps(m, &[Edit::AddBackend(*svc, addr, weight)])?;
    Ok(after.services[svc].backends[&addr].id)
}

/// Removes a backend: no new flows reach it, then its flows are ended.
/// Other backends' flows are untouched.
pub fn backend_del(m: &Maps, svc: &Service, addr: impl Into<SocketAddr>) -> Result<()> {
    reconcile::edit_maps(m, &[Edit::DelBackend(*svc, addr.into())]).map(drop)
}

/// Changes a backend's weight; 0 drains it (existing flows continue).
pub fn backend_set(
    m: &Maps,
    svc: &Service,
    addr: impl Into<SocketAddr>,
    weight: u32,
) -> Result<()> {
    reconcile::edit_maps(m, &[Edit::SetWeight(*svc, addr.into(), weight)]).map(drop)
}

// ------------------------------------------------------------ map writes
//
// The only writers of the services, backends and maglev maps; called by
// the reconciler with ids it allocated from the state it read, so none of
// them reads the service list.

/// Creates service `id` with an empty table.
pub(crate) fn create_service(
    m: &Maps,
    svc: &Service,
    conf: &SvcConf,
    id: u32,
    size: u32,
) -> Result<()> {
    install_table(m, id, &[], size)?;
    let v = SvcValue {
        id,
        flags: maps::svc_flags(conf),
    };
    let (map, key) = maps::svc_map_key(m, svc)?;
    if let Err(e) = map.update(&key, bytes(&v), MapFlags::NO_EXIST) {
        let _ = m.maglev.delete(&id.to_ne_bytes());
        return Err(e).with_context(|| format!("adding service {svc}"));
    }
    Ok(())
}

/// Removes service `id`, its backends `backend_ids` and their flows.
pub(crate) fn remove_service(m: &Maps, svc: &Service, id: u32, backend_ids: &[u32]) -> Result<()> {
    let (map, key) = maps::svc_map_key(m, svc)?;
    map.delete(&key)
        .with_context(|| format!("removing service {svc}"))?;
    let _ = m.maglev.delete(&id.to_ne_bytes());
    for b in backend_ids {
        clear_backend(m, *b)?;
    }
    conntrack::end_flows(m, |f| f.svc == id)?;
    Ok(())
}

/// Writes backend `b` (a new id) and installs `table` (the service's
/// backends, `b` included).
pub(crate) fn create_backend(m: &Maps, b: &Backend, table: &[Backend], size: u32) -> Result<()> {
    check_weight(b.weight)?;
    let (id, addr) = (b.id, b.addr);
    let entry = maps::backend_entry(b)?;
    maps::reset_backend_counters(m, id)?;
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
    if let Err(e) = install_table(m, b.svc_id, table, size) {
        clear_backend(m, id)?;
        return Err(e);
    }
    Ok(())
}

/// Removes backend `b` of service `svc_id`: `rest` (its other backends)
/// get the table first, then `b`'s entry and flows go.
pub(crate) fn remove_backend(m: &Maps, b: &Backend, rest: &[Backend], size: u32) -> Result<()> {
    install_table(m, b.svc_id, rest, size)?;
    clear_backend(m, b.id)?;
    conntrack::end_flows(m, |f| f.backend == b.id)?;
    Ok(())
}

/// Sets the weight of backend `b` (its new weight in `b`) and installs
/// `table` (the service's backends with that weight).
pub(crate) fn set_weight(m: &Maps, b: &Backend, table: &[Backend], size: u32) -> Result<()> {
    check_weight(b.weight)?;
    let key = b.id.to_ne_bytes();
    let old: BackendEntry =
        from_bytes(&m.backends.lookup(&key, MapFlags::ANY)?.unwrap_or_default());
    let entry = BackendEntry {
        weight: b.weight,
        ..old
    };
    m.backends
        .update(&key, bytes(&entry), MapFlags::ANY)
        .with_context(|| format!("setting the weight of {}", b.addr))?;
    // The table last: on failure the entry goes back, and both agree.
    if let Err(e) = install_table(m, b.svc_id, table, size) {
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
/// Installs a Maglev table for service `id` from `backends` with the
/// weights given (a dynamic scheduler's, see crate::sched), leaving the
/// configured weights in the backends map as they are.
pub(crate) fn install_weights(m: &Maps, id: u32, backends: &[Backend], size: u32) -> Result<()> {
    install_table(m, id, backends, size)
}

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
