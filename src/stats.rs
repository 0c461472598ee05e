//! The datapath's per-CPU counters: verdict reasons (`enum lb_stat` in
//! bpf/lb.h) and per-backend traffic; per-service numbers are the sums of
//! their backends'.

use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::maps::Maps;
use crate::{conntrack, service};

/// Counter names, in the order of `enum lb_stat`.
pub const NAMES: &[&str] = &[
    "to_backend",
    "to_client",
    "new_flow",
    "pass_not_ipv4",
    "pass_not_l4",
    "pass_not_ours",
    "pass_malformed",
    "pass_fragment",
    "pass_no_route",
    "pass_no_neigh",
    "drop_no_backend",
    "drop_nat_full",
    "reopen",
    "established",
    "est_full",
    "stale",
    "drop_ct_race",
    "icmp_error",
];

/// Index of a counter by name (for tests and tools).
pub fn index(name: &str) -> Option<usize> {
    NAMES.iter().position(|n| *n == name)
}

/// One counter summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (whole frames).
    pub bytes: u64,
}

fn u64_at(v: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(v[i * 8..i * 8 + 8].try_into().unwrap())
}

/// Sums the `fields` u64s of a per-CPU value over CPUs.
fn sum_percpu(map: &dyn MapCore, key: u32, fields: usize) -> Result<Vec<u64>> {
    let per_cpu = map
        .lookup_percpu(&key.to_ne_bytes(), MapFlags::ANY)
        .with_context(|| format!("reading counter {key}"))?
        .unwrap_or_default();
    let mut sum = vec![0; fields];
    for v in per_cpu {
        for (i, s) in sum.iter_mut().enumerate() {
            *s += u64_at(&v, i);
        }
    }
    Ok(sum)
}

/// Reads every verdict counter from a stats map, summed over CPUs.
pub fn read(map: &dyn MapCore) -> Result<Vec<Counter>> {
    (0..NAMES.len() as u32)
        .map(|i| {
            let s = sum_percpu(map, i, 2)?;
            Ok(Counter {
                packets: s[0],
                bytes: s[1],
            })
        })
        .collect()
}

/// Reads the verdict counters pinned at `path`.
pub fn read_pinned(path: &Path) -> Result<Vec<Counter>> {
    let map = MapHandle::from_pinned_path(path)
        .with_context(|| format!("opening stats map {}", path.display()))?;
    read(&map)
}

/// Traffic of one backend, or of a service (sum of its backends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Packets, both directions.
    pub packets: u64,
    /// Bytes, both directions.
    pub bytes: u64,
    /// Connections started.
    pub new_flows: u64,
    /// Connections open now.
    pub active_flows: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.active_flows += o.active_flows;
    }
}

/// Zeroes a backend id's counters (before the id is reused).
pub fn reset_backend(m: &Maps, id: u32) -> Result<()> {
    let ncpu = libbpf_rs::num_possible_cpus().context("counting CPUs")?;
    let zero = vec![vec![0u8; 24]; ncpu];
    m.be_stats
        .update_percpu(&id.to_ne_bytes(), &zero, MapFlags::ANY)
        .with_context(|| format!("resetting counters of backend id {id}"))
}

/// A backend's line in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStats {
    /// The backend.
    #[serde(flatten)]
    pub backend: service::Backend,
    /// Its traffic.
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// A service's lines in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceStats {
    /// The service.
    #[serde(flatten)]
    pub service: service::Service,
    /// Its id.
    pub id: u32,
    /// Sum of its backends.
    #[serde(flatten)]
    pub traffic: Traffic,
    /// Per backend.
    pub backends: Vec<BackendStats>,
}

/// Everything `lb stats` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Per service and backend.
    pub services: Vec<ServiceStats>,
    /// Verdict counters by name (in JSON an object keyed by name).
    #[serde(serialize_with = "crate::output::by_name")]
    pub counters: Vec<(String, Counter)>,
}

/// Reads the whole report from an instance's maps.
pub fn report(m: &Maps) -> Result<Report> {
    let active = conntrack::active_per_backend(m)?;
    let mut services = Vec::new();
    for s in service::list(m)? {
        let mut total = Traffic::default();
        let mut backends = Vec::new();
        for b in s.backends {
            let v = sum_percpu(&m.be_stats, b.id, 3)?;
            let t = Traffic {
                packets: v[0],
                bytes: v[1],
                new_flows: v[2],
                active_flows: active.get(&b.id).copied().unwrap_or(0),
            };
            total += t;
            backends.push(BackendStats {
                backend: b,
                traffic: t,
            });
        }
        services.push(ServiceStats {
            service: s.service,
            id: s.id,
            traffic: total,
            backends,
        });
    }
    let counters = NAMES
        .iter()
        .map(|n| n.to_string())
        .zip(read(&m.stats)?)
        .collect();
    Ok(Report { services, counters })
}
