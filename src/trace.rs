//! `lb trace`: what the datapath did with each packet, live. lb forwards
//! with XDP_TX and XDP_REDIRECT, so tcpdump on the LB never sees those
//! packets; while a tracer runs the program itself reports them
//! (bpf/trace.h) into a ring buffer: the frame's first bytes as it came and
//! as lb left it, the verdict and the counter it went under. This module
//! turns tracing on for every CPU (renewing it each half second, so that a
//! tracer killed without a word stops it within 2 s), decodes and filters
//! the events and prints one line (or JSON object) a packet.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBufferBuilder};
use nix::sys::signal::{SigSet, Signal};
use serde::Serialize;

use crate::bpffs::PinDir;
use crate::maps;
use crate::skel::lb::types::{lb_trace_cfg, lb_trace_event};
use crate::stats;

// SAFETY: plain C structs of integers and byte arrays.
unsafe impl plain::Plain for lb_trace_event {}
unsafe impl plain::Plain for lb_trace_cfg {}

/// How long tracing stays on unless the tracer renews it.
const LEASE: Duration = Duration::from_secs(2);

/// Which packets to print (all of them by default).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// To or from this VIP (and port, if given): the client's side.
    pub vip: Option<(IpAddr, Option<u16>)>,
    /// From or to this client address.
    pub client: Option<IpAddr>,
    /// To or from this backend address.
    pub backend: Option<IpAddr>,
    /// Counted under this counter (a name of `lb stats`).
    pub reason: Option<String>,
    /// With this verdict: pass, drop, tx, redirect, aborted.
    pub verdict: Option<String>,
    /// Only packets that made (or reopened) a flow.
    pub new_flows_only: bool,
}

/// Verdict names, by XDP action value.
const VERDICTS: &[&str] = &["aborted", "drop", "pass", "tx", "redirect"];

impl Filter {
    /// Checks the names it holds (one clear error otherwise).
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = &self.reason {
            if stats::index(r).is_none() {
                bail!(
                    "--reason {r}: not a counter (one of {})",
                    stats::NAMES.join(", ")
                );
            }
        }
        if let Some(v) = &self.verdict {
            if !VERDICTS.contains(&v.as_str()) {
                bail!("--verdict {v}: one of {}", VERDICTS.join(", "));
            }
        }
        Ok(())
    }

    fn takes(&self, e: &Event) -> bool {
        let ends = |t: &Option<Tuple>| -> Vec<IpAddr> {
            t.iter().flat_map(|t| [t.src.ip(), t.dst.ip()]).collect()
        };
        if self.new_flows_only && !e.new_flow {
            return false;
        }
        if self.reason.as_deref().is_some_and(|r| r != e.reason) {
            return false;
        }
        if self.verdict.as_deref().is_some_and(|v| v != e.verdict) {
            return false;
        }
        if let Some((ip, port)) = self.vip {
            // The VIP is on the client's side: the destination as it came
            // (client -> VIP) or the source as it left (VIP -> client).
            let side = [e.inp.as_ref().map(|t| t.dst), e.out.as_ref().map(|t| t.src)];
            if !side
                .iter()
                .flatten()
                .any(|a| a.ip() == ip && port.is_none_or(|p| a.port() == p))
            {
                return false;
            }
        }
        if let Some(c) = self.client {
            if !ends(&e.inp).contains(&c) && !ends(&e.out).contains(&c) {
                return false;
            }
        }
        if let Some(b) = self.backend {
            if e.backend.map(|a| a.ip()) != Some(b) {
                return false;
            }
        }
        true
    }
}

/// A packet's IP header fields and ports (0 when it has none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tuple {
    /// tcp, udp, icmp or the protocol number.
    pub proto: String,
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// TCP flags (FSRPAU...), empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub flags: String,
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.proto, self.src, self.dst)?;
        if !self.flags.is_empty() {
            write!(f, " [{}]", self.flags)?;
        }
        Ok(())
    }
}

/// Decodes an Ethernet frame's first bytes: IPv4 or IPv6 with its ports,
/// or None (another ethertype, or cut too short).
pub fn tuple_of(frame: &[u8]) -> Option<Tuple> {
    let ip = frame.get(14..)?;
    let (proto, src, dst, l4): (u8, IpAddr, IpAddr, Option<&[u8]>) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
            (
                ip[9],
                Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).into(),
                Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).into(),
                ip.get(ihl..).filter(|_| !later_fragment),
            )
        }
        [0x86, 0xdd] => {
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return None;
            }
            let addr = |at: usize| -> IpAddr {
                let o: [u8; 16] = ip[at..at + 16].try_into().expect("16 bytes");
                Ipv6Addr::from(o).into()
            };
            // (the next header: ports only right after the fixed header)
            (ip[6], addr(8), addr(24), ip.get(40..))
        }
        _ => return None,
    };
    let ports = l4
        .filter(|_| proto == 6 || proto == 17)
        .and_then(|l| Some((l.get(0..2)?, l.get(2..4)?)))
        .map(|(s, d)| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u16::from_be_bytes([d[0], d[1]]),
            )
        })
        .unwrap_or((0, 0));
    let flags = match (proto, l4.and_then(|l| l.get(13))) {
        (6, Some(&b)) => "FSRPAU"
            .chars()
            .enumerate()
            .filter(|(i, _)| b & (1 << i) != 0)
            .map(|(_, c)| c)
            .collect(),
        _ => String::new(),
    };
    Some(Tuple {
        proto: match proto {
            6 => "tcp".into(),
            17 => "udp".into(),
            1 => "icmp".into(),
            58 => "icmpv6".into(),
            p => p.to_string(),
        },
        src: SocketAddr::new(src, ports.0),
        dst: SocketAddr::new(dst, ports.1),
        flags,
    })
}

/// One traced packet, decoded.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ns: u64,
    /// The interface it came in on.
    pub iface: String,
    /// Its length.
    pub len: u32,
    /// As it came (None: not IP, or cut short).
    #[serde(rename = "in")]
    pub inp: Option<Tuple>,
    /// As lb left it (the same as `in` if untouched).
    pub out: Option<Tuple>,
    /// XDP verdict: pass, drop, tx, redirect, aborted.
    pub verdict: String,
    /// The counter it was counted under (see `lb stats`).
    pub reason: String,
    /// It made (or reopened) a flow.
    pub new_flow: bool,
    /// The backend it went to or came from, if any.
    pub backend: Option<SocketAddr>,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |t: &Option<Tuple>| t.as_ref().map_or("-".to_string(), |t| t.to_string());
        write!(
            f,
            "{}.{:06} {} {} => {} {} {}",
            self.ns / 1_000_000_000,
            self.ns % 1_000_000_000 / 1000,
            self.iface,
            t(&self.inp),
            t(&self.out),
            self.verdict,
            self.reason
        )?;
        if self.new_flow {
            write!(f, " new-flow")?;
        }
        if let Some(b) = self.backend {
            write!(f, " backend {b}")?;
        }
        Ok(())
    }
}

/// Decodes one ring-buffer record.
pub fn decode(raw: &[u8], iface: impl Fn(u32) -> String) -> Option<Event> {
    let mut e = lb_trace_event::default();
    plain::copy_from_bytes(&mut e, raw).ok()?;
    let inp = tuple_of(&e.r#in[..usize::from(e.in_len).min(e.r#in.len())]);
    let out = tuple_of(&e.out[..usize::from(e.in_len).min(e.out.len())]);
    let reason = stats::NAMES
        .get(usize::from(e.reason))
        .map_or_else(|| e.reason.to_string(), |n| n.to_string());
    let backend = match reason.as_str() {
        // (pass_no_neigh: rewritten, the kernel forwards it)
        "to_backend" | "pass_no_neigh" => out.as_ref().map(|t| t.dst),
        "to_client" => inp.as_ref().map(|t| t.src),
        _ => None,
    };
    Some(Event {
        ns: e.ns,
        iface: iface(e.ifindex),
        len: e.len,
        inp,
        out,
        verdict: VERDICTS
            .get(usize::from(e.verdict))
            .map_or_else(|| e.verdict.to_string(), |v| v.to_string()),
        reason,
        new_flow: e.new_flow != 0,
        backend,
    })
}

/// How long and how much to trace.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Trace 1 packet in this many (1: all).
    pub sample: u32,
    /// Stop after printing this many.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// The per-CPU tracing state of the instance at `pins`.
struct TraceCfg {
    map: MapHandle,
}

/// Turns tracing of every packet on (until `until`, jiffies) or off in
/// the `trace_cfg` map pinned at `path`, with no reader (for the datapath
/// benchmark: what tracing costs the program).
pub fn set_pinned(path: &Path, on: bool, until: u64) -> Result<()> {
    let map =
        MapHandle::from_pinned_path(path).with_context(|| format!("opening {}", path.display()))?;
    TraceCfg { map }.set(on, 1, until)
}

impl TraceCfg {
    fn read(&self) -> Result<Vec<lb_trace_cfg>> {
        let key = 0u32.to_ne_bytes();
        let vals = self
            .map
            .lookup_percpu(&key, MapFlags::ANY)
            .context("reading the tracing state")?
            .unwrap_or_default();
        Ok(vals
            .iter()
            .map(|v| {
                let mut c = lb_trace_cfg::default();
                let _ = plain::copy_from_bytes(&mut c, v);
                c
            })
            .collect())
    }

    /// Sets on/sample/until on every CPU (the rest as it is).
    fn set(&self, on: bool, sample: u32, until: u64) -> Result<()> {
        let vals: Vec<Vec<u8>> = self
            .read()?
            .into_iter()
            .map(|mut c| {
                c.on = u32::from(on);
                c.sample = sample;
                c.until = until;
                maps::bytes(&c).to_vec()
            })
            .collect();
        self.map
            .update_percpu(&0u32.to_ne_bytes(), &vals, MapFlags::ANY)
            .context("writing the tracing state")
    }

    fn lost(&self) -> Result<u64> {
        Ok(self.read()?.iter().map(|c| c.lost).sum())
    }
}

/// Turns tracing off when dropped (an error or a signal included).
struct Off<'a>(&'a TraceCfg);

impl Drop for Off<'_> {
    fn drop(&mut self) {
        let _ = self.0.set(false, 0, 0);
    }
}

/// SIGINT and SIGTERM set the returned flag (a thread waits for them).
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block().context("blocking signals")?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if sigs.wait().is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

/// Traces the instance at `pins` (the current network namespace is its),
/// printing each event `filter` takes to `out` until `bounds` or a signal.
/// Returns the events printed and those the ring buffer lost.
pub fn run(
    pins: &PinDir,
    filter: &Filter,
    bounds: Bounds,
    json: bool,
    out: &mut dyn Write,
) -> Result<(u64, u64)> {
    filter.validate()?;
    let open = |name: &str| {
        let path = pins.map(name);
        MapHandle::from_pinned_path(&path).with_context(|| {
            format!(
                "opening {} (an instance attached by an lb without tracing? detach and attach again)",
                path.display()
            )
        })
    };
    let cfg = TraceCfg {
        map: open("trace_cfg")?,
    };
    let rb_map = open("trace_rb")?;
    let hz = u64::from(crate::clock::hz()?);
    let lease = |now: u64| now + LEASE.as_secs() * hz;
    let now = crate::clock::now()?;
    if cfg.read()?.iter().any(|c| c.on != 0 && c.until >= now) {
        bail!("another lb trace is tracing this instance (one at a time)");
    }
    let stop = stop_on_signals()?;
    let lost0 = cfg.lost()?;
    let names = Mutex::new(std::collections::HashMap::<u32, String>::new());
    let iface = |i: u32| {
        names
            .lock()
            .unwrap()
            .entry(i)
            .or_insert_with(|| {
                nix::net::if_::if_indextoname(i)
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| format!("if{i}"))
            })
            .clone()
    };
    let printed = std::cell::Cell::new(0u64);
    let failed = std::cell::RefCell::new(None::<std::io::Error>);
    let out = std::cell::RefCell::new(out);
    let limit = bounds.count.unwrap_or(u64::MAX);
    let mut builder = RingBufferBuilder::new();
    builder
        .add(&rb_map, |raw: &[u8]| {
            if printed.get() >= limit {
                return 0;
            }
            let Some(e) = decode(raw, iface) else {
                return 0;
            };
            if !filter.takes(&e) {
                return 0;
            }
            let line = if json {
                serde_json::to_string(&e).unwrap_or_default()
            } else {
                e.to_string()
            };
            if let Err(err) = writeln!(out.borrow_mut(), "{line}") {
                *failed.borrow_mut() = Some(err);
                return -1;
            }
            printed.set(printed.get() + 1);
            0
        })
        .context("reading the trace ring buffer")?;
    let rb = builder.build().context("reading the trace ring buffer")?;
    // What an earlier tracer left unread goes first (nothing is printed
    // twice: a record is consumed once).
    cfg.set(true, bounds.sample.max(1), lease(now))?;
    let _off = Off(&cfg);
    let start = Instant::now();
    let mut renewed = Instant::now();
    while printed.get() < limit
        && !stop.load(Ordering::SeqCst)
        && bounds.duration.is_none_or(|d| start.elapsed() < d)
    {
        rb.poll(Duration::from_millis(100)).ok();
        if let Some(e) = failed.borrow_mut().take() {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break; // `lb trace | head`
            }
            return Err(e).context("writing the trace");
        }
        if renewed.elapsed() > LEASE / 4 {
            cfg.set(true, bounds.sample.max(1), lease(crate::clock::now()?))?;
            renewed = Instant::now();
        }
    }
    drop(_off);
    let _ = rb.consume();
    let lost = cfg.lost()?.saturating_sub(lost0);
    out.borrow_mut().flush().ok();
    Ok((printed.get(), lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0];
        ip.extend(frag.to_be_bytes());
        ip.extend([64, proto, 0, 0, 10, 200, 0, 10, 10, 200, 0, 2]);
        f.extend(ip);
        f.extend(l4);
        f
    }

    #[test]
    fn tuples_of_frames_whole_cut_and_fragmented() {
        let mut tcp = vec![0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x12];
        tcp.extend([0; 6]);
        let t = tuple_of(&frame(6, 0, &tcp)).unwrap();
        assert_eq!(t.to_string(), "tcp 10.200.0.10:40000 -> 10.200.0.2:80 [SA]");
        // Cut before the flags: ports, no flags.
        let t = tuple_of(&frame(6, 0, &tcp[..4])).unwrap();
        assert_eq!(t.to_string(), "tcp 10.200.0.10:40000 -> 10.200.0.2:80");
        // A later fragment has no ports, whatever its bytes look like.
        let t = tuple_of(&frame(17, 185, &tcp)).unwrap();
        assert_eq!(t.to_string(), "udp 10.200.0.10:0 -> 10.200.0.2:0");
        assert_eq!(tuple_of(&frame(1, 0, &[8, 0])).unwrap().proto, "icmp");
        // Not IP, or cut inside the IP header.
        let mut arp = frame(6, 0, &tcp);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(tuple_of(&arp).is_none());
        assert!(tuple_of(&frame(6, 0, &tcp)[..30]).is_none());
        // IPv6.
        let mut v6 = vec![0u8; 14];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6.extend([0x60, 0, 0, 0, 0, 20, 6, 64]);
        v6.extend("fd00:200::10".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend("fd00:200::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend(&tcp);
        let t = tuple_of(&v6).unwrap();
        assert_eq!(
            t.to_string(),
            "tcp [fd00:200::10]:40000 -> [fd00:200::2]:80 [SA]"
        );
        assert!(tuple_of(&v6[..14 + 39]).is_none());
    }

    #[test]
    fn filters_check_their_names() {
        let f = Filter {
            reason: Some("to_backend".into()),
            verdict: Some("tx".into()),
            ..Default::default()
        };
        assert!(f.validate().is_ok());
        for bad in [
            Filter {
                reason: Some("nope".into()),
                ..Default::default()
            },
            Filter {
                verdict: Some("accept".into()),
                ..Default::default()
            },
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
