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

/// A backend's TCP handshakes as the datapath measured them: the time from
/// a new flow's first SYN to the backend's first SYN-ACK, in log2 buckets
/// of microseconds (map `be_hs`, see `struct lb_be_hs` in bpf/lb.h).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handshakes {
    /// Handshakes per bucket (not cumulative): bucket i holds those of at
    /// most [`Handshakes::bound_s`]`(i)`, the last the longer ones.
    pub buckets: Vec<u64>,
    /// Sum of their latencies, nanoseconds.
    pub sum_ns: u64,
}

impl Handshakes {
    /// From a `be_hs` value summed over CPUs ([`maps::HS_FIELDS`] u64).
    pub fn from_fields(v: &[u64]) -> Self {
        Self {
            buckets: v[..maps::HS_BUCKETS].to_vec(),
            sum_ns: v[maps::HS_BUCKETS],
        }
    }

    /// Upper bound of bucket `i` in seconds: 2^i µs; infinite for the last.
    pub fn bound_s(i: usize) -> f64 {
        if i + 1 >= maps::HS_BUCKETS {
            f64::INFINITY
        } else {
            (1u64 << i) as f64 * 1e-6
        }
    }

    /// Handshakes measured.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Mean latency in seconds (None without handshakes).
    pub fn mean_s(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns as f64 * 1e-9 / n as f64)
    }

    /// Latency quantile `q` (0..=1) in seconds, interpolated linearly within
    /// its bucket as Prometheus' histogram_quantile does (the last bucket,
    /// unbounded, gives its lower bound). None without handshakes.
    pub fn quantile_s(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * n as f64;
        let mut below = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { Self::bound_s(i - 1) };
                let hi = Self::bound_s(i);
                if hi.is_infinite() {
                    return Some(lo);
                }
                return Some(lo + (hi - lo) * ((rank - below as f64) / c as f64).max(0.0));
            }
            below += c;
        }
        None
    }
}

/// JSON: `{"count", "mean_ms", "p50_ms", "p99_ms", "sum_ns", "buckets"}`
/// (the latencies null without handshakes; `buckets` not cumulative).
impl serde::Serialize for Handshakes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let ms = |v: Option<f64>| v.map(|v| v * 1e3);
        let mut st = s.serialize_struct("Handshakes", 6)?;
        st.serialize_field("count", &self.count())?;
        st.serialize_field("mean_ms", &ms(self.mean_s()))?;
        st.serialize_field("p50_ms", &ms(self.quantile_s(0.5)))?;
        st.serialize_field("p99_ms", &ms(self.quantile_s(0.99)))?;
        st.serialize_field("sum_ns", &self.sum_ns)?;
        st.serialize_field("buckets", &self.buckets)?;
        st.end()
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
    /// Its TCP handshake latency.
    pub handshake: Handshakes,
    /// RSTs it sent to clients, each resetting a connection not already
    /// closing.
    pub resets: u64,
    /// New TCP flows whose SYN it never answered (counted when their NAT
    /// tuple is taken over or their client starts over on it).
    pub unanswered_syns: u64,
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
    /// How full the connection tables are.
    pub tables: Vec<conntrack::TableUse>,
}

/// Reads the whole report from an instance's maps.
pub fn report(m: &Maps) -> Result<Report> {
    let (active, tables) = conntrack::census(m)?;
    let list = service::list(m)?;
    // Backend ids are handed out from 0: one batch up to the highest.
    let top = list
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id as usize + 1))
        .max()
        .unwrap_or(0);
    let be = maps::sum_percpu_u64(&m.be_stats, top, 3).context("reading backend counters")?;
    let hs = maps::read_handshakes(m, top)?;
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
            let h = hs
                .get(b.id as usize)
                .cloned()
                .unwrap_or_else(|| vec![0; maps::HS_FIELDS]);
            backends.push(BackendStats {
                backend: b,
                traffic: t,
                handshake: Handshakes::from_fields(&h),
                resets: h[maps::HS_BUCKETS + 1],
                unanswered_syns: h[maps::HS_BUCKETS + 2],
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
    Ok(Report {
        services,
        counters,
        tables,
    })
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
        "pass_not_ip",
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
        "drop_too_big",
        "half_open_evicted",
        "nat_tw_reuse",
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

    fn hs(buckets: &[(usize, u64)], sum_ns: u64) -> Handshakes {
        let mut h = Handshakes {
            buckets: vec![0; maps::HS_BUCKETS],
            sum_ns,
        };
        for &(i, n) in buckets {
            h.buckets[i] = n;
        }
        h
    }

    #[test]
    fn handshake_buckets_bounds_and_quantiles() {
        assert_eq!(maps::HS_BUCKETS, 25, "1 us .. 2^23 us, then +Inf");
        assert_eq!(Handshakes::bound_s(0), 1e-6);
        assert_eq!(Handshakes::bound_s(10), 1024e-6);
        assert!((Handshakes::bound_s(23) - 8.388608).abs() < 1e-12);
        assert!(Handshakes::bound_s(24).is_infinite());

        let none = hs(&[], 0);
        assert_eq!(
            (none.count(), none.mean_s(), none.quantile_s(0.5)),
            (0, None, None)
        );

        // 99 handshakes in (512, 1024] us, one in (2^19, 2^20] us.
        let h = hs(&[(10, 99), (20, 1)], 99 * 800_000 + 1_000_000_000);
        assert_eq!(h.count(), 100);
        let mean = h.mean_s().unwrap();
        assert!(
            (mean - (99.0 * 800e-6 + 1.0) / 100.0).abs() < 1e-12,
            "{mean}"
        );
        // p50: rank 50 of 99 in bucket 10: 512 us + 512 us * 50/99.
        let p50 = h.quantile_s(0.5).unwrap();
        assert!(
            (p50 - (512e-6 + 512e-6 * 50.0 / 99.0)).abs() < 1e-12,
            "{p50}"
        );
        // p99: rank 99, the bucket's top.
        assert!((h.quantile_s(0.99).unwrap() - 1024e-6).abs() < 1e-12);
        // p100: the slow one's bucket top.
        assert!((h.quantile_s(1.0).unwrap() - 1.048576).abs() < 1e-9);
        // Only overflow: its lower bound.
        let slow = hs(&[(24, 3)], 30_000_000_000);
        assert!((slow.quantile_s(0.99).unwrap() - 8.388608).abs() < 1e-9);

        let j = serde_json::to_value(&h).unwrap();
        assert_eq!(j["count"], 100);
        assert_eq!(j["buckets"].as_array().unwrap().len(), maps::HS_BUCKETS);
        assert!((j["p99_ms"].as_f64().unwrap() - 1.024).abs() < 1e-9);
        assert!(serde_json::to_value(&none).unwrap()["p50_ms"].is_null());
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
        assert_eq!(open.maps.be_hs.max_entries(), crate::maps::MAX_BACKENDS);
        assert_eq!(
            open.maps.be_hs.value_size() as usize,
            crate::maps::HS_FIELDS * 8
        );
    }
}
