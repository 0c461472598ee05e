//! The datapath's per-CPU counters (`enum lb_stat` in bpf/lb.h).

use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

/// Counter names, in the order of `enum lb_stat`.
pub const NAMES: &[&str] = &[
    "to_backend",
    "to_client",
    "pass_not_ipv4",
    "pass_not_tcp",
    "pass_not_ours",
    "pass_malformed",
    "pass_no_route",
    "pass_no_neigh",
    "drop_fragment",
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

/// Reads every counter from a stats map, summed over CPUs.
pub fn read(map: &dyn MapCore) -> Result<Vec<Counter>> {
    let mut out = Vec::with_capacity(NAMES.len());
    for i in 0..NAMES.len() as u32 {
        let per_cpu = map
            .lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY)
            .with_context(|| format!("reading counter {}", NAMES[i as usize]))?
            .unwrap_or_default();
        let mut sum = Counter::default();
        for v in per_cpu {
            // struct lb_counter { u64 packets; u64 bytes; }
            sum.packets += u64::from_ne_bytes(v[0..8].try_into().unwrap());
            sum.bytes += u64::from_ne_bytes(v[8..16].try_into().unwrap());
        }
        out.push(sum);
    }
    Ok(out)
}

/// Reads the counters pinned at `path`.
pub fn read_pinned(path: &Path) -> Result<Vec<Counter>> {
    let map = MapHandle::from_pinned_path(path)
        .with_context(|| format!("opening stats map {}", path.display()))?;
    read(&map)
}
