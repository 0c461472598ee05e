//! `lb decap`: the IP-in-IP decapsulation program that the backends of an
//! IPIP service run (bpf/decap.bpf.c). Load, attach through a bpf_link
//! pinned under its own pin directory (so it stays after lb exits), replace,
//! detach, and its counters. The only user of the decap skeleton.
//!
//! Pins (`--pin-dir`, default /sys/fs/bpf/lb-decap): `decap_stats` (per-CPU
//! counters, shared by every interface of the directory) and
//! `<iface>/link`. The last interface detached takes the counters with it.

use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapHandle, OpenObject};

use crate::bpffs::PinDir;
use crate::loader::{link_is_on, PinRollback};
use crate::skel::decap::{DecapSkel, DecapSkelBuilder};
use crate::stats::Counter;
use crate::xdp::{self, Mode};
use crate::{maps, net};

/// Default pin directory of the decapsulation program (apart from lb's
/// instances: a host may be an LB and a backend).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb-decap";

/// The counters' names, by `enum decap_stat` (bpf/decap.h).
pub const NAMES: &[&str] = &[
    "decapsulated",
    "pass_not_ipip",
    "pass_fragment",
    "pass_malformed",
];

/// The pinned counters' name under the pin directory.
const STATS: &str = "decap_stats";

/// What `lb decap IFACE` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    /// Interface name.
    pub iface: String,
    /// Interface index.
    pub ifindex: u32,
    /// Program id.
    pub prog_id: u32,
    /// Mode the kernel reports as in effect.
    pub mode: String,
    /// Whether an earlier decap program on the interface was replaced.
    pub replaced: bool,
    /// Pin of the link.
    pub link_pin: String,
}

/// Loads the decapsulation program, with the counters pinned at `stats`
/// if given; nothing attached or pinned (tests run it so).
pub fn load<'obj>(
    stats: Option<&Path>,
    storage: &'obj mut MaybeUninit<OpenObject>,
) -> Result<DecapSkel<'obj>> {
    let mut open = DecapSkelBuilder::default()
        .open(storage)
        .context("opening the decap program")?;
    if let Some(p) = stats {
        open.maps.decap_stats.reuse_pinned_map(p).map_err(|e| {
            anyhow!(
                "pinned map {} does not fit this build of lb ({e}): lb decap --detach every interface of it first",
                p.display()
            )
        })?;
    }
    open.load()
        .context("loading the decap program into the kernel")
}

/// Attaches the decapsulation program to `iface` (current network
/// namespace) and pins its link and counters under `pins`; on an interface
/// it already runs on, replaces the program on the same link and counters.
/// Refuses an interface with another XDP program.
pub fn attach(iface: &str, mode: Mode, pins: &PinDir) -> Result<Attachment> {
    let ifindex = net::ifindex(iface)?;
    let link_pin = pins.link(iface);
    let existing = link_pin.exists();
    if existing {
        let info = xdp::link_info(&xdp::open_link(&link_pin)?)?;
        if !link_is_on(&info, ifindex)? {
            bail!(
                "{} is pinned for {iface}, but not for the {iface} of this network namespace (another namespace's, or stale: use another --pin-dir, or lb decap {iface} --detach)",
                link_pin.display()
            );
        }
    } else {
        let now = xdp::query(ifindex)?;
        if now.prog_id != 0 {
            bail!(
                "{iface} already has an XDP program (id {}, {} mode) that lb decap did not attach; detach it first",
                now.prog_id,
                now.mode
            );
        }
    }
    let mut rollback = PinRollback(Vec::new());
    for dir in [&pins.root, &pins.iface_dir(iface)] {
        if !dir.exists() {
            fs::create_dir(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            rollback.0.push(dir.clone());
        }
    }
    let mut storage = MaybeUninit::uninit();
    let stats_pin = pins.map(STATS);
    let mut skel = load(
        Some(stats_pin.as_path()).filter(|p| p.exists()),
        &mut storage,
    )?;
    if !stats_pin.exists() {
        skel.maps
            .decap_stats
            .pin(&stats_pin)
            .with_context(|| format!("pinning {}", stats_pin.display()))?;
        rollback.0.push(stats_pin.clone());
    }
    if existing {
        let mut link = xdp::open_link(&link_pin)?;
        link.update_prog(&skel.progs.lb_decap)
            .with_context(|| format!("replacing the decap program on {iface}"))?;
    } else {
        let link =
            xdp::link_create(skel.progs.lb_decap.as_fd(), ifindex, mode).map_err(|e| {
                match e.raw_os_error().map(nix::errno::Errno::from_raw) {
                    Some(nix::errno::Errno::EBUSY) | Some(nix::errno::Errno::EEXIST) => {
                        anyhow!("{iface} already has an XDP program attached by something else")
                    }
                    Some(nix::errno::Errno::EOPNOTSUPP) | Some(nix::errno::Errno::EINVAL) => {
                        anyhow!("{iface} does not support XDP in {mode} mode")
                    }
                    _ => anyhow!("attaching the decap program to {iface} in {mode} mode: {e}"),
                }
            })?;
        xdp::pin(link, &link_pin)?;
        rollback.0.push(link_pin.clone());
    }
    let now = xdp::query(ifindex)?;
    rollback.0.clear();
    Ok(Attachment {
        iface: iface.to_string(),
        ifindex,
        prog_id: now.prog_id,
        mode: now.mode.to_string(),
        replaced: existing,
        link_pin: link_pin.display().to_string(),
    })
}

/// Detaches the decapsulation program from `iface` and removes its pins
/// (the counters with the last interface). Returns the pins removed.
pub fn detach(iface: &str, pins: &PinDir) -> Result<Vec<String>> {
    let link_pin = pins.link(iface);
    if !link_pin.exists() {
        bail!(
            "lb decap is not attached to {iface} (no link pinned at {})",
            link_pin.display()
        );
    }
    let link = xdp::open_link(&link_pin)?;
    let info = xdp::link_info(&link)?;
    match net::ifindex(iface).ok() {
        Some(i) if link_is_on(&info, i)? => link
            .detach()
            .with_context(|| format!("detaching the decap program from {iface}"))?,
        _ if info.ifindex == 0 => {} // the interface is gone: only pins left
        _ => bail!(
            "{} belongs to another network namespace's {iface} (ifindex {}), not to this one's (use --netns)",
            link_pin.display(),
            info.ifindex
        ),
    }
    drop(link);
    let mut removed = vec![link_pin.display().to_string()];
    PinDir::remove(&link_pin)?;
    PinDir::remove_dir_if_empty(&pins.iface_dir(iface));
    if pins.interfaces()?.is_empty() {
        let stats = pins.map(STATS);
        if stats.exists() {
            PinDir::remove(&stats)?;
            removed.push(stats.display().to_string());
        }
        PinDir::remove_dir_if_empty(&pins.root);
    }
    Ok(removed)
}

/// The counters pinned under `pins`, by name, summed over CPUs.
pub fn stats(pins: &PinDir) -> Result<Vec<(String, Counter)>> {
    read(&pins.map(STATS))
}

/// The counters of the map pinned at `path`, by name.
pub fn read(path: &Path) -> Result<Vec<(String, Counter)>> {
    let map = MapHandle::from_pinned_path(path).with_context(|| {
        format!(
            "opening {} (is lb decap attached with this --pin-dir?)",
            path.display()
        )
    })?;
    read_map(&map)
}

/// The counters of an open decap_stats map, by name.
pub fn read_map(map: &MapHandle) -> Result<Vec<(String, Counter)>> {
    let sums = maps::sum_percpu_u64(map, NAMES.len(), 2).context("reading the decap counters")?;
    Ok(NAMES
        .iter()
        .zip(sums)
        .map(|(n, s)| {
            (
                n.to_string(),
                Counter {
                    packets: s[0],
                    bytes: s[1],
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skel::decap::types::decap_stat;

    #[test]
    fn names_follow_the_enum() {
        assert_eq!(NAMES.len(), decap_stat::LB_DECAP_STAT_MAX.0 as usize);
        for (v, n) in [
            (decap_stat::LB_DECAP_DONE, "decapsulated"),
            (decap_stat::LB_DECAP_PASS_NOT_IPIP, "pass_not_ipip"),
            (decap_stat::LB_DECAP_PASS_FRAGMENT, "pass_fragment"),
            (decap_stat::LB_DECAP_PASS_MALFORMED, "pass_malformed"),
        ] {
            assert_eq!(NAMES[v.0 as usize], n);
        }
    }
}
