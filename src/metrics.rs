//! Prometheus metrics, read from the maps at scrape time, served over a
//! minimal HTTP server (`GET /metrics`), a thread per connection.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::bpffs::PinDir;
use crate::maps::Maps;
use crate::service::Service;
use crate::stats;

/// Health of a checked backend as the metrics show it.
#[derive(Debug, Clone, Copy, Default)]
pub struct HealthInfo {
    /// 1: up.
    pub up: bool,
    /// Latency of the last successful check.
    pub latency: Option<Duration>,
}

/// Health of every checked backend, shared with the daemon.
pub type HealthView = Arc<Mutex<BTreeMap<(Service, SocketAddr), HealthInfo>>>;

type Labels = Vec<(String, String)>;

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// A histogram whose buckets were counted elsewhere (the datapath's, read
/// at the scrape): the sum, the count and the buckets (upper bound, count
/// in that bucket alone; the encoder makes them cumulative).
#[derive(Debug, Default)]
struct ReadHistogram(Mutex<HistogramValue>);

/// Sum, count, and (upper bound, count) per bucket.
type HistogramValue = (f64, u64, Vec<(f64, u64)>);

impl ReadHistogram {
    fn set(&self, h: &stats::Handshakes) {
        let buckets = h
            .buckets
            .iter()
            .enumerate()
            .map(|(i, &n)| (stats::Handshakes::bound_s(i), n))
            .collect();
        *self.0.lock().expect("histogram lock") = (h.sum_ns as f64 * 1e-9, h.count(), buckets);
    }
}

impl TypedMetric for ReadHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ReadHistogram {
    fn encode(&self, mut e: MetricEncoder) -> Result<(), std::fmt::Error> {
        let g = self.0.lock().expect("histogram lock");
        e.encode_histogram::<NoLabelSet>(g.0, g.1, &g.2, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The metrics of the instance in `m` in the OpenMetrics text format.
pub fn render(m: &Maps, health: &HealthView) -> Result<String> {
    let r = stats::report(m)?;
    let mut reg = Registry::with_prefix("lb");
    let sp = counter_family(
        &mut reg,
        "service_packets",
        "Packets of a service, both directions",
    );
    let sb = counter_family(
        &mut reg,
        "service_bytes",
        "Bytes of a service, both directions",
    );
    let sn = counter_family(
        &mut reg,
        "service_new_flows",
        "Connections started to a service",
    );
    let sa = gauge_family(
        &mut reg,
        "service_active_flows",
        "Connections open to a service",
    );
    let bp = counter_family(
        &mut reg,
        "backend_packets",
        "Packets of a backend, both directions",
    );
    let bb = counter_family(
        &mut reg,
        "backend_bytes",
        "Bytes of a backend, both directions",
    );
    let bn = counter_family(
        &mut reg,
        "backend_new_flows",
        "Connections started to a backend",
    );
    let ba = gauge_family(
        &mut reg,
        "backend_active_flows",
        "Connections open to a backend",
    );
    let bw = gauge_family(
        &mut reg,
        "backend_weight",
        "Weight of a backend in the maps (0: out)",
    );
    let hs = Family::<Labels, ReadHistogram>::default();
    reg.register(
        "backend_handshake_seconds",
        "TCP handshake latency of a backend: a new flow's first SYN to the backend's SYN-ACK, as lb forwards them",
        hs.clone(),
    );
    let br = counter_family(
        &mut reg,
        "backend_resets",
        "RSTs a backend sent to clients, resetting a connection",
    );
    let bu = counter_family(
        &mut reg,
        "backend_unanswered_syns",
        "New TCP flows whose SYN a backend never answered",
    );
    let up = gauge_family(
        &mut reg,
        "backend_up",
        "Health of a checked backend (1 up, 0 down)",
    );
    let lat = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "backend_check_latency_seconds",
        "Latency of the last successful health check",
        lat.clone(),
    );
    let vp = counter_family(
        &mut reg,
        "verdict_packets",
        "Packets by datapath verdict and reason",
    );
    let vb = counter_family(
        &mut reg,
        "verdict_bytes",
        "Bytes by datapath verdict and reason",
    );

    for s in &r.services {
        let l = vec![("service".to_string(), s.service.to_string())];
        sp.get_or_create(&l).inc_by(s.traffic.packets);
        sb.get_or_create(&l).inc_by(s.traffic.bytes);
        sn.get_or_create(&l).inc_by(s.traffic.new_flows);
        sa.get_or_create(&l).set(s.traffic.active_flows as i64);
        for b in &s.backends {
            let l = vec![
                ("service".to_string(), s.service.to_string()),
                ("backend".to_string(), b.backend.addr.to_string()),
            ];
            bp.get_or_create(&l).inc_by(b.traffic.packets);
            bb.get_or_create(&l).inc_by(b.traffic.bytes);
            bn.get_or_create(&l).inc_by(b.traffic.new_flows);
            ba.get_or_create(&l).set(b.traffic.active_flows as i64);
            bw.get_or_create(&l).set(i64::from(b.backend.weight));
            hs.get_or_create(&l).set(&b.handshake);
            br.get_or_create(&l).inc_by(b.resets);
            bu.get_or_create(&l).inc_by(b.unanswered_syns);
        }
    }
    for ((svc, addr), h) in health.lock().expect("health lock").iter() {
        let l = vec![
            ("service".to_string(), svc.to_string()),
            ("backend".to_string(), addr.to_string()),
        ];
        up.get_or_create(&l).set(i64::from(h.up));
        if let Some(d) = h.latency {
            lat.get_or_create(&l).set(d.as_secs_f64());
        }
    }
    for (name, c) in &r.counters {
        let verdict = match name.split('_').next().unwrap_or("") {
            "to" => "forward",
            "new" => "flow",
            v => v,
        }
        .to_string();
        let l = vec![
            ("verdict".to_string(), verdict),
            ("reason".to_string(), name.clone()),
        ];
        vp.get_or_create(&l).inc_by(c.packets);
        vb.get_or_create(&l).inc_by(c.bytes);
    }
    let te = gauge_family(
        &mut reg,
        "table_entries",
        "Entries in a connection table (two a connection)",
    );
    let tc = gauge_family(
        &mut reg,
        "table_capacity",
        "Entries a connection table holds at most",
    );
    for t in &r.tables {
        let l = vec![("table".to_string(), t.table.to_string())];
        te.get_or_create(&l).set(t.entries as i64);
        tc.get_or_create(&l).set(t.capacity as i64);
    }
    let mut out = String::new();
    encode(&mut out, &reg).context("encoding metrics")?;
    Ok(out)
}

/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request (all of it) and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the request head (up to 8 KiB) before `deadline`.
fn read_request(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(ErrorKind::TimedOut, "request timed out"))?;
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    Ok(req)
}

fn reply(s: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

fn answer(mut s: TcpStream, pins: &PinDir, health: &HealthView) -> std::io::Result<()> {
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let req = read_request(&mut s, Instant::now() + CLIENT_TIMEOUT)?;
    let line = String::from_utf8_lossy(&req);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (status, ctype, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            match Maps::open(pins).and_then(|m| render(&m, health)) {
                Ok(b) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    b,
                ),
                Err(e) => (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("{e:#}\n"),
                ),
            }
        }
        _ => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
    };
    reply(&mut s, status, ctype, &body)
}

/// Takes one of the [`MAX_CONNECTIONS`] slots until dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Option<Self> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(active)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Binds `addr` (in the calling thread's network namespace) and serves
/// `/metrics` for the instance at `pin_dir`: a thread accepts, each
/// connection is answered by a thread of its own (at most
/// [`MAX_CONNECTIONS`] at once, each given [`CLIENT_TIMEOUT`] to send its
/// request), so a slow or idle client never delays another scrape. Returns
/// the address bound.
pub fn serve(addr: SocketAddr, pin_dir: PathBuf, health: HealthView) -> Result<SocketAddr> {
    let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr} for metrics"))?;
    let bound = l.local_addr().context("reading the metrics address")?;
    let pins = Arc::new(PinDir::new(pin_dir));
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for s in l.incoming() {
                let mut s = match s {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a metrics connection");
                        continue;
                    }
                };
                let Some(slot) = Slot::take(&active) else {
                    let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = reply(&mut s, "503 Service Unavailable", "text/plain", "busy\n");
                    continue;
                };
                let (pins, health) = (Arc::clone(&pins), Arc::clone(&health));
                let spawned = std::thread::Builder::new()
                    .name("metrics conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = answer(s, &pins, &health) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "starting a metrics connection thread");
                }
            }
        })
        .context("starting the metrics thread")?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend's handshakes render as an OpenMetrics histogram: cumulative
    /// buckets in seconds up to +Inf, the count and the sum.
    #[test]
    fn handshake_histogram_renders_cumulative_buckets() {
        let mut h = stats::Handshakes {
            buckets: vec![0; crate::maps::HS_BUCKETS],
            sum_ns: 3_500_000_000,
        };
        h.buckets[0] = 1; // <= 1 us
        h.buckets[10] = 2; // (512, 1024] us
        h.buckets[24] = 1; // > 8.4 s
        let mut reg = Registry::with_prefix("lb");
        let f = Family::<Labels, ReadHistogram>::default();
        reg.register("backend_handshake_seconds", "test", f.clone());
        let l = vec![
            ("service".to_string(), "10.0.0.1:80/tcp".to_string()),
            ("backend".to_string(), "10.0.0.2:80".to_string()),
        ];
        f.get_or_create(&l).set(&h);
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        let labels = "service=\"10.0.0.1:80/tcp\",backend=\"10.0.0.2:80\"";
        assert!(
            out.contains("# TYPE lb_backend_handshake_seconds histogram"),
            "{out}"
        );
        for want in [
            format!("lb_backend_handshake_seconds_sum{{{labels}}} 3.5\n"),
            format!("lb_backend_handshake_seconds_count{{{labels}}} 4\n"),
            format!("lb_backend_handshake_seconds_bucket{{le=\"0.000001\",{labels}}} 1\n"),
            format!("lb_backend_handshake_seconds_bucket{{le=\"0.000512\",{labels}}} 1\n"),
            format!("lb_backend_handshake_seconds_bucket{{le=\"0.001024\",{labels}}} 3\n"),
            format!("lb_backend_handshake_seconds_bucket{{le=\"8.388608\",{labels}}} 3\n"),
            format!("lb_backend_handshake_seconds_bucket{{le=\"+Inf\",{labels}}} 4\n"),
        ] {
            assert!(out.contains(&want), "no {want:?} in\n{out}");
        }
        let buckets = out.matches("lb_backend_handshake_seconds_bucket{").count();
        assert_eq!(buckets, crate::maps::HS_BUCKETS, "{out}");
    }

    #[test]
    fn connections_are_bounded() {
        let active = Arc::new(AtomicUsize::new(0));
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| Slot::take(&active).expect("a free slot"))
            .collect();
        assert!(Slot::take(&active).is_none(), "more than the bound");
        held.pop();
        assert!(Slot::take(&active).is_some(), "a freed slot is reused");
        drop(held);
        assert_eq!(active.load(Ordering::Acquire), 0);
    }
}
