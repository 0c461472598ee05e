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
    for s in &prev.services {
        old.insert(s.service.to_string(), s.traffic);
        for b in &s.backends {
            old.insert(format!("{} {}", s.service, b.backend.addr), b.traffic);
        }
    }
    let mut out = format!(
        "{:<28} {:>10} {:>12} {:>9} {:>8}\n",
        "service / backend", "pkt/s", "bytes/s", "new/s", "active"
    );
    let mut line = |name: String, key: String, t: &stats::Traffic| {
        let o = old.get(&key).copied().unwrap_or(*t);
        out += &format!(
            "{name:<28} {:>10.1} {:>12.1} {:>9.1} {:>8}\n",
            rate(o.packets, t.packets),
            rate(o.bytes, t.bytes),
            rate(o.new_flows, t.new_flows),
            t.active_flows
        );
    };
    for s in &cur.services {
        line(s.service.to_string(), s.service.to_string(), &s.traffic);
        for b in &s.backends {
            line(
                format!("  {}", b.backend.addr),
                format!("{} {}", s.service, b.backend.addr),
                &b.traffic,
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
