//! Typed access to an instance's pinned maps. The structs are the ones the
//! skeleton generates from the C program's BTF (bpf/lb.h).

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::bpffs::PinDir;
use crate::settings::{PortRange, Settings};
use crate::skel::lb::types;

pub use types::{
    backend as BackendEntry, flow as Flow, flow_key as FlowKey, lb_nexthop as NextHop,
};
pub use types::{svc_key as SvcKey, svc_value as SvcValue};

// SAFETY: plain old data generated from the program's BTF.
unsafe impl plain::Plain for types::svc_key {}
unsafe impl plain::Plain for types::svc_value {}
unsafe impl plain::Plain for types::backend {}
unsafe impl plain::Plain for types::flow_key {}
unsafe impl plain::Plain for types::flow {}
unsafe impl plain::Plain for types::rodata {}

/// Capacities of the fixed-size maps (bpf/lb.h).
pub const MAX_SERVICES: u32 = 1024;
/// Most backends over all services.
pub const MAX_BACKENDS: u32 = 8192;
/// `LB_BACKEND_USED`.
pub const BACKEND_USED: u16 = 1;
/// `LB_DIR_TO_BACKEND` / `LB_DIR_TO_CLIENT`.
pub const DIR_TO_BACKEND: u8 = 0;
/// See [`DIR_TO_BACKEND`].
pub const DIR_TO_CLIENT: u8 = 1;
/// `LB_CT_CLOSING` bit of an owner's state: RST, or FIN both ways.
pub const CT_CLOSING: u32 = 1;
/// `LB_CT_FIN_FWD` bit: the client sent FIN.
pub const CT_FIN_FWD: u32 = 2;
/// `LB_CT_FIN_REV` bit: the backend sent FIN.
pub const CT_FIN_REV: u32 = 4;
/// `LB_CT_REPLIED` bit: the backend answered.
pub const CT_REPLIED: u32 = 8;
/// `LB_CT_RECLAIMED` bit: the NAT tuple is being given to a new flow.
pub const CT_RECLAIMED: u32 = 16;

/// Names of the maps an instance pins, as in the C program.
pub const PINNED: &[&str] = &[
    "stats",
    "be_stats",
    "services",
    "backends",
    "maglev",
    "conntrack",
    "ct_new",
    "nat_cursor",
    "tx_ports",
    "nexthops",
];

/// The bytes of a plain struct.
pub fn bytes<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: Plain types have no invalid bit patterns or pointers.
    unsafe { plain::as_bytes(v) }
}

/// A plain struct from bytes (zero-filled if short).
pub fn from_bytes<T: plain::Plain + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let _ = plain::copy_from_bytes(&mut v, b);
    v
}

/// An address as the datapath stores it (network order in a u32).
pub fn ip_to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_to_be`].
pub fn ip_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// An instance's maps, opened from their pins.
pub struct Maps {
    /// Verdict counters.
    pub stats: MapHandle,
    /// Per-backend counters.
    pub be_stats: MapHandle,
    /// VIP:port/proto -> service id.
    pub services: MapHandle,
    /// Backend id -> backend.
    pub backends: MapHandle,
    /// Service id -> Maglev table.
    pub maglev: MapHandle,
    /// The connection table (answered connections).
    pub conntrack: MapHandle,
    /// Half-open connections.
    pub ct_new: MapHandle,
    /// Interfaces for XDP_REDIRECT.
    pub tx_ports: MapHandle,
    /// Next hops cached per backend id.
    pub nexthops: MapHandle,
    /// The program's settings (its .rodata).
    pub config: MapHandle,
}

fn open(path: &Path) -> Result<MapHandle> {
    MapHandle::from_pinned_path(path).with_context(|| format!("opening map {}", path.display()))
}

impl Maps {
    /// Opens the maps of the instance at `pins`.
    pub fn open(pins: &PinDir) -> Result<Self> {
        if !pins.map("conntrack").exists() {
            return Err(anyhow!(
                "no lb instance at {} (run lb attach first, or give --pin-dir/--netns)",
                pins.root.display()
            ));
        }
        Ok(Self {
            stats: open(&pins.map("stats"))?,
            be_stats: open(&pins.map("be_stats"))?,
            services: open(&pins.map("services"))?,
            backends: open(&pins.map("backends"))?,
            maglev: open(&pins.map("maglev"))?,
            conntrack: open(&pins.map("conntrack"))?,
            ct_new: open(&pins.map("ct_new"))?,
            tx_ports: open(&pins.map("tx_ports"))?,
            nexthops: open(&pins.map("nexthops"))?,
            config: open(&pins.config())?,
        })
    }

    /// The settings the instance's program was loaded with.
    pub fn settings(&self) -> Result<Settings> {
        settings_of(
            &self.config,
            self.conntrack.max_entries(),
            self.ct_new.max_entries(),
        )
    }

    /// Bit i: SNAT address i is lb's alone (every port from 1024).
    pub fn snat_full(&self) -> Result<u32> {
        Ok(rodata_of(&self.config)?.snat_full)
    }

    /// The program's timeouts in clock ticks, as the datapath compares them.
    pub fn timeouts(&self) -> Result<Timeouts> {
        let ro = rodata_of(&self.config)?;
        Ok(Timeouts {
            hz: ro.hz,
            tcp: ro.tcp_timeout,
            udp: ro.udp_timeout,
            fin: ro.fin_timeout,
            syn: ro.syn_timeout,
        })
    }
}

/// Timeouts in clock ticks (jiffies).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Ticks a second.
    pub hz: u32,
    /// Idle TCP.
    pub tcp: u32,
    /// Idle UDP.
    pub udp: u32,
    /// After RST or FIN both ways.
    pub fin: u32,
    /// Idle half-open TCP.
    pub syn: u32,
}

fn rodata_of(rodata: &dyn MapCore) -> Result<types::rodata> {
    let b = rodata
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context("reading the program's settings")?
        .ok_or_else(|| anyhow!("the program's settings map is empty"))?;
    let mut ro: types::rodata = unsafe { std::mem::zeroed() };
    plain::copy_from_bytes(&mut ro, &b)
        .map_err(|e| anyhow!("settings map has an unexpected layout: {e:?}"))?;
    Ok(ro)
}

/// Reads settings back from a program's .rodata map and the sizes of its
/// connection tables.
pub fn settings_of(
    rodata: &dyn MapCore,
    conntrack_entries: u32,
    ct_new_entries: u32,
) -> Result<Settings> {
    let ro = rodata_of(rodata)?;
    let secs = |t: u32| t / ro.hz.max(1);
    Ok(Settings {
        nat_ports: ro
            .nat_lo
            .iter()
            .zip(ro.nat_hi.iter())
            .filter(|(lo, hi)| lo <= hi)
            .map(|(&lo, &hi)| PortRange { lo, hi })
            .collect(),
        snat: ro.snat_addr[..(ro.snat_count as usize).min(ro.snat_addr.len())]
            .iter()
            .map(|a| ip_from_be(*a))
            .collect(),
        maglev_size: ro.maglev_size,
        max_flows: conntrack_entries / 2,
        max_half_open: ct_new_entries / 2,
        tcp_timeout: secs(ro.tcp_timeout),
        udp_timeout: secs(ro.udp_timeout),
        fin_timeout: secs(ro.fin_timeout),
    })
}
