//! `lb stats --watch`: live rates per service and backend and per datapath
//! counter, from two reports taken an interval apart.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::maps::Maps;
use crate::stats::{self, Report};

/// Per-second rates between two reports, as text (one table).
pub fn render(prev: &Report, cur: &Report, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let mut old: HashMap<String, stats::Traffic> = HashMap::new();
    let mut old_be: HashMap<String, &stats::BackendStats> = HashMap::new();
    for s in &prev.services {
        old.insert(s.service.to_string(), s.traffic);
        for b in &s.backends {
            let key = format!("{} {}", s.service, b.backend.addr);
            old.insert(key.clone(), b.traffic);
            old_be.insert(key, b);
        }
    }
    let mut out = format!(
        "{:<28} {:>10} {:>12} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}\n",
        "service / backend",
        "pkt/s",
        "bytes/s",
        "new/s",
        "active",
        "hs/s",
        "p99_ms",
        "rst/s",
        "unans/s"
    );
    let line = |name: String, key: &str, t: &stats::Traffic| {
        let o = old.get(key).copied().unwrap_or(*t);
        format!(
            "{name:<28} {:>10.1} {:>12.1} {:>9.1} {:>8}",
            rate(o.packets, t.packets),
            rate(o.bytes, t.bytes),
            rate(o.new_flows, t.new_flows),
            t.active_flows
        )
    };
    for s in &cur.services {
        out += &line(s.service.to_string(), &s.service.to_string(), &s.traffic);
        out.push('\n');
        for b in &s.backends {
            let key = format!("{} {}", s.service, b.backend.addr);
            out += &line(format!("  {}", b.backend.addr), &key, &b.traffic);
            // The handshakes of the interval: the buckets' increase.
            let o = old_be.get(&key).copied().unwrap_or(b);
            let h = stats::Handshakes {
                buckets: b
                    .handshake
                    .buckets
                    .iter()
                    .zip(&o.handshake.buckets)
                    .map(|(n, p)| n.saturating_sub(*p))
                    .collect(),
                sum_ns: b.handshake.sum_ns.saturating_sub(o.handshake.sum_ns),
            };
            let p99 = h
                .quantile_s(0.99)
                .map_or("-".to_string(), |v| format!("{:.3}", v * 1e3));
            out += &format!(
                " {:>8.1} {p99:>9} {:>8.1} {:>8.1}\n",
                h.count() as f64 / secs,
                rate(o.resets, b.resets),
                rate(o.unanswered_syns, b.unanswered_syns)
            );
        }
    }
    out += &format!("{:<16} {:>12} {:>14}\n", "counter", "pkt/s", "bytes/s");
    for ((name, c), (_, o)) in cur.counters.iter().zip(&prev.counters) {
        out += &format!(
            "{name:<16} {:>12.1} {:>14.1}\n",
            rate(o.packets, c.packets),
            rate(o.bytes, c.bytes)
        );
    }
    out
}

/// Prints rates every `interval`, `count` times (forever without).
pub fn watch(m: &Maps, interval: Duration, count: Option<u32>, out: &mut impl Write) -> Result<()> {
    let mut prev = stats::report(m)?;
    let mut t = Instant::now();
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        std::thread::sleep(interval);
        let cur = stats::report(m)?;
        let now = Instant::now();
        writeln!(out, "{}", render(&prev, &cur, (now - t).as_secs_f64()))?;
        out.flush()?;
        prev = cur;
        t = now;
        n += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Proto, Service};
    use crate::stats::{BackendStats, Handshakes, ServiceStats};

    fn report(hs_bucket_10: u64, resets: u64, unanswered: u64) -> Report {
        let mut buckets = vec![0; crate::maps::HS_BUCKETS];
        buckets[10] = hs_bucket_10; // (512, 1024] us
        let backend = Backend {
            id: 0,
            addr: "10.0.0.2:80".parse().unwrap(),
            weight: 1,
            svc_id: 0,
        };
        Report {
            services: vec![ServiceStats {
                service: Service::new(
                    "10.0.0.1:80".parse::<std::net::SocketAddr>().unwrap(),
                    Proto::Tcp,
                ),
                id: 0,
                conf: Default::default(),
                traffic: Default::default(),
                backends: vec![BackendStats {
                    backend,
                    traffic: Default::default(),
                    handshake: Handshakes {
                        buckets,
                        sum_ns: hs_bucket_10 * 800_000,
                    },
                    resets,
                    unanswered_syns: unanswered,
                }],
            }],
            counters: vec![],
            tables: vec![],
        }
    }

    /// Per backend: handshakes, resets and unanswered SYNs a second over the
    /// interval, and the p99 of the interval's handshakes ("-" if none).
    #[test]
    fn backend_lines_show_handshake_rates_and_p99() {
        let text = render(&report(10, 1, 0), &report(30, 5, 2), 2.0);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("10.0.0.2:80"))
            .unwrap_or_else(|| panic!("no backend line in\n{text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        // addr pkt/s bytes/s new/s active hs/s p99_ms rst/s unans/s
        assert_eq!(cols[5..], ["10.0", "1.019", "2.0", "1.0"], "{text}");
        let idle = render(&report(30, 5, 2), &report(30, 5, 2), 1.0);
        let line = idle
            .lines()
            .find(|l| l.trim_start().starts_with("10.0.0.2:80"))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[5..], ["0.0", "-", "0.0", "0.0"], "{idle}");
    }
}
