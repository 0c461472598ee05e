//! The datapath's per-CPU counters: verdict reasons (`enum lb_stat` in
//! bpf/lb.h) and per-backend traffic; per-service numbers are the sums of
//! their backends'. Reads only: the services it reports on come from
//! crate::service, which does not depend on this module (a backend's
//! counters are reset by crate::maps).

use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::MapHandle;

use crate::maps::{self, Maps};
use crate::{conntrack, service};

/// Counter names, by `enum lb_stat` value: each variant's name without
/// `LB_`, in lower case (`LB_DROP_NAT_FULL`: `drop_nat_full`), as build.rs
/// reads them from the program's BTF.
pub const NAMES: &[&str] = crate::skel::lb_stat::LB_STAT_NAMES;

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

/// Reads every verdict counter from a stats map, summed over CPUs (one
/// batch lookup).
pub fn read(map: &MapHandle) -> Result<Vec<Counter>> {
    Ok(maps::sum_percpu_u64(map, NAMES.len(), 2)
        .context("reading the verdict counters")?
        .into_iter()
        .map(|s| Counter {
            packets: s[0],
            bytes: s[1],
        })
        .collect())
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
    /// Its forwarding mode and scheduler.
    #[serde(flatten)]
    pub conf: service::SvcConf,
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
    let list = service::list(m)?;
    // Backend ids are handed out from 0: one batch up to the highest.
    let top = list
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id as usize + 1))
        .max()
        .unwrap_or(0);
    let be = maps::sum_percpu_u64(&m.be_stats, top, 3).context("reading backend counters")?;
    let mut services = Vec::new();
    for s in list {
        let mut total = Traffic::default();
        let mut backends = Vec::new();
        for b in s.backends {
            let v = be.get(b.id as usize).map_or(&[0, 0, 0][..], Vec::as_slice);
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
            conf: s.conf,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skel::lb::types::lb_stat;
    use crate::skel::lb_stat::LB_STAT_VARIANTS;

    /// The counter names users see (`lb stats`, `lb status`, metrics).
    const TODAY: &[&str] = &[
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
        "fragment",
        "evicted",
        "drop_no_neigh",
    ];

    #[test]
    fn every_variant_has_its_counter_name() {
        assert_eq!(
            NAMES.len(),
            lb_stat::LB_STAT_MAX.0 as usize,
            "one name per variant below LB_STAT_MAX"
        );
        assert_eq!(LB_STAT_VARIANTS.len(), NAMES.len());
        for (v, n) in LB_STAT_VARIANTS.iter().zip(NAMES) {
            let want = v.strip_prefix("LB_").expect("LB_ prefix").to_lowercase();
            assert_eq!(*n, want, "{v}");
        }
        // Each name sits at its variant's value in the generated types.
        for (v, n) in [
            (lb_stat::LB_TO_BACKEND, "to_backend"),
            (lb_stat::LB_PASS_NO_NEIGH, "pass_no_neigh"),
            (lb_stat::LB_DROP_NAT_FULL, "drop_nat_full"),
            (lb_stat::LB_EST_FULL, "est_full"),
            (lb_stat::LB_DROP_CT_RACE, "drop_ct_race"),
        ] {
            assert_eq!(NAMES[v.0 as usize], n);
            assert_eq!(index(n), Some(v.0 as usize));
        }
        // Renaming a variant renames what users see: not by accident.
        assert_eq!(NAMES, TODAY);
    }

    /// The stats map has one slot per name (opening reads the object only).
    #[test]
    fn stats_map_has_a_slot_per_name() {
        use libbpf_rs::skel::SkelBuilder;
        let mut storage = std::mem::MaybeUninit::uninit();
        let open = crate::skel::lb::LbSkelBuilder::default()
            .open(&mut storage)
            .expect("opening the program");
        assert_eq!(open.maps.stats.max_entries() as usize, NAMES.len());
        assert_eq!(open.maps.backends.max_entries(), crate::maps::MAX_BACKENDS);
        assert_eq!(open.maps.services.max_entries(), crate::maps::MAX_SERVICES);
    }
}
