//! Dynamic schedulers (`scheduler = "least-conn"` or `"latency"`): the
//! datapath still picks new flows' backends from a service's Maglev table;
//! `lb run` rebuilds that table each second from weights it computes out of
//! the datapath's own numbers, instead of the configured weights:
//!
//! - least-conn: weight × (mean open connections + 1) / (its open + 1);
//! - latency: weight × mean handshake latency / its latency (SYN to
//!   SYN-ACK over the last second; a backend with no sample counts as the
//!   mean);
//! - slow start: a backend that comes in (added, back up, undrained) ramps
//!   from a tenth to its full share over [`SLOW_START`].
//!
//! Each factor is bounded to [1/10, 10] of the configured weight, and a
//! table is rebuilt only when a weight moved by more than a tenth: at most
//! once a second. A rebuilt table moves some new flows, never established
//! ones (they are in the connection table). The configured weights stay in
//! the maps (`lb list`); any change the reconciler makes installs a table
//! from them, and the next second's adjustment follows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::maps::{self, Maps};
use crate::model::{Scheduler, Service};
use crate::reconcile::Loaded;
use crate::stats::Handshakes;
use crate::{conntrack, service};

/// How long a backend that comes in takes to reach its full share.
pub const SLOW_START: Duration = Duration::from_secs(10);
/// Integer resolution of the weights given to Maglev.
const SCALE: f64 = 100.0;

/// What the weight of one backend is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Input {
    /// Its configured weight as loaded (0: drained or out).
    pub weight: u32,
    /// Its open connections.
    pub active: u64,
    /// Its handshake latency over the last interval, if it had handshakes.
    pub latency_s: Option<f64>,
    /// Since when it has been in (weight > 0).
    pub in_for: Duration,
}

/// The Maglev weights of a service's backends under `sched` (the same
/// order as `xs`; 0 stays 0).
pub fn weights(sched: Scheduler, xs: &[Input]) -> Vec<u32> {
    let live: Vec<&Input> = xs.iter().filter(|x| x.weight > 0).collect();
    let n = live.len().max(1) as f64;
    let mean_active = live.iter().map(|x| x.active as f64).sum::<f64>() / n;
    let lat: Vec<f64> = live.iter().filter_map(|x| x.latency_s).collect();
    let mean_lat = (!lat.is_empty()).then(|| lat.iter().sum::<f64>() / lat.len() as f64);
    xs.iter()
        .map(|x| {
            if x.weight == 0 {
                return 0;
            }
            let f = match sched {
                Scheduler::Maglev => 1.0,
                Scheduler::LeastConn => (mean_active + 1.0) / (x.active as f64 + 1.0),
                Scheduler::Latency => match (mean_lat, x.latency_s) {
                    (Some(m), Some(l)) if l > 0.0 => m / l,
                    _ => 1.0,
                },
            };
            let ramp = if sched == Scheduler::Maglev {
                1.0
            } else {
                (x.in_for.as_secs_f64() / SLOW_START.as_secs_f64()).clamp(0.1, 1.0)
            };
            let w = f64::from(x.weight) * f.clamp(0.1, 10.0) * ramp * SCALE;
            w.round().max(1.0) as u32
        })
        .collect()
}

/// Whether `new` differs enough from `old` to rebuild a table.
fn moved(old: &[u32], new: &[u32]) -> bool {
    old.len() != new.len()
        || old
            .iter()
            .zip(new)
            .any(|(&o, &n)| (f64::from(o) - f64::from(n)).abs() > f64::from(o.max(n)) / 10.0)
}

/// A service whose table was rebuilt, with its backends' new weights.
pub type Rebuilt = (Service, Vec<(SocketAddr, u32)>);

/// What the weights are computed from, read without the instance lock (a
/// scan of the connection table can take a while; the lock is held only to
/// read the services and install tables).
pub struct Measured {
    /// Open connections per backend id.
    pub active: std::collections::HashMap<u32, u64>,
    /// `be_hs` per backend id, summed over CPUs.
    pub handshakes: Vec<Vec<u64>>,
}

impl Measured {
    /// Reads them from the instance in `m`.
    pub fn read(m: &Maps) -> Result<Self> {
        Ok(Self {
            active: conntrack::active_per_backend(m)?,
            handshakes: maps::read_handshakes(m, maps::MAX_BACKENDS as usize)?,
        })
    }
}

/// The state the adjustments keep between seconds.
#[derive(Debug, Default)]
pub struct Dynamic {
    /// Per backend: when it came in, and its handshake buckets last time.
    seen: BTreeMap<(Service, SocketAddr), (Instant, Vec<u64>)>,
    /// The weights last installed per service.
    installed: BTreeMap<Service, Vec<u32>>,
}

impl Dynamic {
    /// Adjusts the tables of the services `scheds` names (the others are
    /// left alone); returns the services whose table was rebuilt, with
    /// their weights. Call under the instance's lock.
    pub fn adjust(
        &mut self,
        m: &Maps,
        scheds: &BTreeMap<Service, Scheduler>,
        measured: &Measured,
    ) -> Result<Vec<Rebuilt>> {
        let dynamic: Vec<(&Service, &Scheduler)> = scheds
            .iter()
            .filter(|(_, s)| **s != Scheduler::Maglev)
            .collect();
        if dynamic.is_empty() {
            return Ok(Vec::new());
        }
        let (active, hs) = (&measured.active, &measured.handshakes);
        let loaded = Loaded::read(m)?;
        let size = m.settings()?.maglev_size;
        let now = Instant::now();
        let mut done = Vec::new();
        for (svc, sched) in dynamic {
            let Some(ls) = loaded.services.get(svc) else {
                continue;
            };
            let mut inputs = Vec::new();
            let mut table = Vec::new();
            for (addr, b) in &ls.backends {
                let buckets = hs.get(b.id as usize).cloned().unwrap_or_default();
                let entry = self
                    .seen
                    .entry((*svc, *addr))
                    .or_insert_with(|| (now, buckets.clone()));
                if b.weight == 0 {
                    entry.0 = now; // out: comes in afresh
                }
                let delta: Vec<u64> = buckets
                    .iter()
                    .zip(entry.1.iter().chain(std::iter::repeat(&0)))
                    .map(|(n, o)| n.saturating_sub(*o))
                    .collect();
                let latency_s = (delta.len() > maps::HS_BUCKETS)
                    .then(|| Handshakes::from_fields(&delta))
                    .and_then(|h| h.quantile_s(0.5));
                entry.1 = buckets;
                inputs.push(Input {
                    weight: b.weight,
                    active: active.get(&b.id).copied().unwrap_or(0),
                    latency_s,
                    in_for: now - entry.0,
                });
                table.push(service::Backend {
                    id: b.id,
                    addr: *addr,
                    weight: b.weight,
                    svc_id: ls.id,
                });
            }
            let w = weights(*sched, &inputs);
            if self.installed.get(svc).is_some_and(|old| !moved(old, &w)) {
                continue;
            }
            for (b, w) in table.iter_mut().zip(&w) {
                b.weight = *w;
            }
            service::install_weights(m, ls.id, &table, size)?;
            self.installed.insert(*svc, w.clone());
            done.push((*svc, table.iter().map(|b| (b.addr, b.weight)).collect()));
        }
        self.seen.retain(|(s, _), _| scheds.contains_key(s));
        Ok(done)
    }

    /// Forgets what was installed: the reconciler rebuilt the tables from
    /// the configured weights, so the next adjustment installs again.
    pub fn reset_installed(&mut self) {
        self.installed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(weight: u32, active: u64, latency_s: Option<f64>, in_for_s: u64) -> Input {
        Input {
            weight,
            active,
            latency_s,
            in_for: Duration::from_secs(in_for_s),
        }
    }

    #[test]
    fn least_conn_favours_the_emptier_backend() {
        let w = weights(
            Scheduler::LeastConn,
            &[input(1, 60, None, 100), input(1, 0, None, 100)],
        );
        // mean 30: a gets 31/61 of its weight, b 31 (capped at 10x).
        assert_eq!(w, [51, 1000]);
        // Equal loads, equal weights: the configured proportions.
        let w = weights(
            Scheduler::LeastConn,
            &[input(3, 10, None, 100), input(1, 10, None, 100)],
        );
        assert_eq!(w, [300, 100]);
        // Drained stays out.
        let w = weights(
            Scheduler::LeastConn,
            &[input(0, 0, None, 100), input(1, 5, None, 100)],
        );
        assert_eq!(w[0], 0);
    }

    #[test]
    fn latency_favours_the_faster_backend() {
        let w = weights(
            Scheduler::Latency,
            &[input(1, 0, Some(0.001), 100), input(1, 0, Some(0.003), 100)],
        );
        // mean 2 ms: a 2x, b 2/3.
        assert_eq!(w, [200, 67]);
        // No sample: as the mean.
        let w = weights(
            Scheduler::Latency,
            &[input(1, 0, None, 100), input(1, 0, Some(0.002), 100)],
        );
        assert_eq!(w, [100, 100]);
    }

    #[test]
    fn slow_start_ramps_a_backend_that_comes_in() {
        let at = |s| {
            weights(
                Scheduler::LeastConn,
                &[input(1, 0, None, s), input(1, 0, None, 100)],
            )[0]
        };
        assert_eq!(at(0), 10, "a tenth at first");
        assert_eq!(at(5), 50);
        assert_eq!(at(10), 100);
        // Static Maglev has no slow start.
        assert_eq!(weights(Scheduler::Maglev, &[input(2, 0, None, 0)]), [200]);
    }

    #[test]
    fn small_moves_do_not_rebuild() {
        assert!(!moved(&[100, 100], &[105, 95]));
        assert!(moved(&[100, 100], &[120, 100]));
        assert!(moved(&[100], &[100, 100]));
    }
}
