//! Katran's XDP balancer (github.com/facebookincubator/katran,
//! katran/lib/bpf/balancer.bpf.c, built by `scripts/bench --katran DIR`)
//! timed the way the datapath benchmark times lb, in the same run and the
//! same columns: a new flow on distinct SYN frames and an established packet
//! on copies of one frame, one BPF_PROG_TEST_RUN call each (Katran wraps
//! its output in an outer IPv4 header, which a rerun would wrap again).
//!
//! Set up as Katran's own control plane would for one VIP: the VIP in
//! `vip_map`, `nb` reals, the VIP's consistent-hash ring (65,537 slots)
//! spread over them, the next hop's MAC in `ctl_array`, and per-CPU
//! connection tables (`lru_mapping`, LRU hashes of `max_flows` entries, each
//! holding `nf` flows before the timing). The counters prove every run took
//! the path timed.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType, Object, ObjectBuilder, ProgramInput};

/// Katran's constants (balancer_consts.h).
const RING_SIZE: u32 = 65_537;
const MAX_REALS: u32 = 4096;
const MAX_VIPS: u32 = 512;
const LRU_MISS_CNTR: u32 = 1;
const XDP_TX_CNTR: u32 = 17;
const XDP_TX: u32 = 3;

pub struct Katran {
    obj: Object,
    lrus: Vec<MapHandle>,
}

/// `struct flow_key`: src (16), dst (16), sport, dport (network order), proto.
pub fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[0..4].copy_from_slice(&src.octets());
    k[16..20].copy_from_slice(&dst.octets());
    k[32..34].copy_from_slice(&sport.to_be_bytes());
    k[34..36].copy_from_slice(&dport.to_be_bytes());
    k[36] = 6; // TCP
    k
}

/// The address of real `i` (1..): 10.201.x.y, real 1 being `first`.
fn real_addr(first: Ipv4Addr, i: u32) -> Ipv4Addr {
    if i == 1 {
        return first;
    }
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 0)) + i)
}

impl Katran {
    /// Loads `obj_path` with VIP `vip`:80/TCP over `nb` reals (the first
    /// `real`) and per-CPU tables of `max_flows`, each holding `nf` flows,
    /// one of them `client`:40000's (the established one).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        obj_path: &Path,
        client: Ipv4Addr,
        vip: Ipv4Addr,
        real: Ipv4Addr,
        nb: u32,
        nf: u32,
        max_flows: u32,
        peer_mac: [u8; 6],
    ) -> Result<Katran> {
        let open = ObjectBuilder::default()
            .open_file(obj_path)
            .with_context(|| format!("opening Katran's object {}", obj_path.display()))?;
        let obj = open.load().context("loading Katran's balancer")?;
        let map = |name: &str| -> Result<_> {
            obj.maps()
                .find(|m| m.name() == name)
                .with_context(|| format!("Katran's object has no map {name}"))
        };
        let nb = nb.clamp(1, MAX_REALS - 1);
        // The VIP: vip_definition (address, port, proto) -> vip_meta
        // (flags 0, vip_num 0).
        let mut vk = [0u8; 20];
        vk[0..4].copy_from_slice(&vip.octets());
        vk[16..18].copy_from_slice(&80u16.to_be_bytes());
        vk[18] = 6;
        map("vip_map")?.update(&vk, &[0u8; 8], MapFlags::ANY)?;
        // Reals 1..=nb (index 0 means none).
        let reals = map("reals")?;
        for i in 1..=nb {
            let mut v = [0u8; 20];
            v[0..4].copy_from_slice(&real_addr(real, i).octets());
            reals.update(&i.to_ne_bytes(), &v, MapFlags::ANY)?;
        }
        // The ring: slot s -> real 1 + s % nb (vip_num 0: slots 0..RING_SIZE).
        let keys: Vec<u8> = (0..RING_SIZE).flat_map(|s| s.to_ne_bytes()).collect();
        let vals: Vec<u8> = (0..RING_SIZE)
            .flat_map(|s| (1 + s % nb).to_ne_bytes())
            .collect();
        map("ch_rings")?.update_batch(&keys, &vals, RING_SIZE, MapFlags::ANY, MapFlags::ANY)?;
        // The default router's MAC (ctl_array[0]).
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&peer_mac);
        map("ctl_array")?.update(&0u32.to_ne_bytes(), &mac, MapFlags::ANY)?;
        // A connection table per CPU, as Katran's control plane makes them
        // (LRU hashes, no flags), each holding nf flows of other clients.
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        let lru_mapping = map("lru_mapping")?;
        let cpus = libbpf_rs::num_possible_cpus()? as u32;
        let mut lrus = Vec::new();
        for cpu in 0..cpus {
            let lru = MapHandle::create(
                MapType::LruHash,
                Some("katran_lru"),
                40,
                16,
                max_flows,
                &opts,
            )
            .context("creating a Katran connection table")?;
            fill(&lru, nf.saturating_sub(1), vip)?;
            // Established: client 10.200.0.1:40000 -> VIP:80, on real 1.
            let mut v = [0u8; 16];
            v[0..4].copy_from_slice(&1u32.to_ne_bytes());
            lru.update(&flow_key(client, 40000, vip, 80), &v, MapFlags::ANY)?;
            let fd = lru.as_fd().as_raw_fd() as u32;
            lru_mapping.update(&cpu.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)?;
            lrus.push(lru);
        }
        Ok(Katran { obj, lrus })
    }

    /// Counter `i` of Katran's `stats` (its v1, summed over CPUs).
    fn stat(&self, i: u32) -> Result<u64> {
        let stats = self
            .obj
            .maps()
            .find(|m| m.name() == "stats")
            .context("no stats map")?;
        let per_cpu = stats
            .lookup_percpu(&(MAX_VIPS + i).to_ne_bytes(), MapFlags::ANY)?
            .context("no such Katran counter")?;
        Ok(per_cpu
            .iter()
            .map(|v| u64::from_ne_bytes(v[0..8].try_into().unwrap()))
            .sum())
    }

    /// Mean ns of one run a call over `n` frames (`frame(round, k)`), best
    /// of 3 rounds; every run must have been sent on (XDP_TX, counted) and,
    /// for `new`, have missed the table (its SYN counted as a new
    /// connection) and left its flow there (Katran skips the insert past
    /// 125,000 new connections a second on a CPU: a run that did would not
    /// be the path timed). `key(round, k)`: the flow of frame k.
    pub fn time(
        &mut self,
        frame: impl Fn(u16, u32) -> Vec<u8>,
        n: u32,
        new: Option<&dyn Fn(u16, u32) -> [u8; 40]>,
    ) -> Result<f64> {
        let (tx0, miss0) = (self.stat(XDP_TX_CNTR)?, self.stat(LRU_MISS_CNTR)?);
        let prog = self
            .obj
            .progs_mut()
            .find(|p| p.name() == "balancer_ingress")
            .context("Katran's object has no balancer_ingress")?;
        let mut best = f64::MAX;
        for i in 0..3 {
            let mut sum = 0.0;
            for k in 0..n {
                let f = frame(i, k);
                let mut out = vec![0u8; f.len() + 256];
                let r = prog.test_run(ProgramInput {
                    data_in: Some(&f),
                    data_out: Some(&mut out),
                    repeat: 1,
                    ..Default::default()
                })?;
                if r.return_value != XDP_TX {
                    bail!("Katran: verdict {} instead of XDP_TX", r.return_value);
                }
                sum += r.duration.as_nanos() as f64;
            }
            best = best.min(sum / f64::from(n.max(1)));
        }
        let (tx, miss) = (
            self.stat(XDP_TX_CNTR)? - tx0,
            self.stat(LRU_MISS_CNTR)? - miss0,
        );
        let want = 3 * u64::from(n);
        if tx != want || miss != if new.is_some() { want } else { 0 } {
            bail!("Katran: {tx} of {want} runs sent, {miss} new connections");
        }
        if let Some(key) = new {
            for i in 0..3 {
                for k in 0..n {
                    let kb = key(i, k);
                    let found = self
                        .lrus
                        .iter()
                        .any(|m| matches!(m.lookup(&kb, MapFlags::ANY), Ok(Some(_))));
                    if !found {
                        bail!("Katran: a new flow was not inserted (its flood guard skipped it)");
                    }
                }
            }
        }
        Ok(best)
    }
}

/// `n` flows of other clients (10.202.0.0/16, all ports) in `lru`.
fn fill(lru: &MapHandle, n: u32, vip: Ipv4Addr) -> Result<()> {
    const BATCH: u32 = 10_000;
    let mut done = 0;
    while done < n {
        let c = BATCH.min(n - done);
        let mut keys = Vec::with_capacity(40 * c as usize);
        let mut vals = Vec::with_capacity(16 * c as usize);
        for i in done..done + c {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 202, 0, 0)) + (i >> 14));
            keys.extend_from_slice(&flow_key(src, 1024 + (i & 0x3fff) as u16, vip, 80));
            let mut v = [0u8; 16];
            v[0..4].copy_from_slice(&1u32.to_ne_bytes());
            vals.extend_from_slice(&v);
        }
        lru.update_batch(&keys, &vals, c, MapFlags::ANY, MapFlags::ANY)?;
        done += c;
    }
    Ok(())
}
