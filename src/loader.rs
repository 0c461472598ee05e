//! Everything that touches the skeleton: open, configure, load, attach, pin,
//! replace, detach, and read back what is attached.

use std::fs;
use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject};

use crate::bpffs::PinDir;
use crate::config::Config;
use crate::skel::lb::{types, LbSkel, LbSkelBuilder};
use crate::skel::pass::PassSkelBuilder;
use crate::xdp::{self, Mode};
use crate::{net, stats};

// SAFETY: plain old data generated from the program's BTF.
unsafe impl plain::Plain for types::rodata {}

/// Opens the program, sets its load-time constants from `cfg` and loads it
/// into the kernel, reusing the stats map pinned at `reuse_stats` if given.
/// `skb_mode`: the program will run in skb (generic) mode, where packets may
/// carry partial checksums. Nothing is attached.
pub fn load<'obj>(
    cfg: &Config,
    skb_mode: bool,
    reuse_stats: Option<&Path>,
    storage: &'obj mut MaybeUninit<OpenObject>,
) -> Result<LbSkel<'obj>> {
    let mut open = LbSkelBuilder::default()
        .open(storage)
        .context("opening the XDP program")?;
    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or_else(|| anyhow!("the XDP program has no .rodata section"))?;
    ro.skb_mode = u8::from(skb_mode);
    ro.lb_ip = u32::from_ne_bytes(cfg.lb.octets());
    ro.client_ip = u32::from_ne_bytes(cfg.client.octets());
    ro.lb_port = cfg.port.unwrap_or(0).to_be();
    ro.n_backends = cfg.backends.len() as u32;
    for (slot, b) in ro.backend_ip.iter_mut().zip(&cfg.backends) {
        *slot = u32::from_ne_bytes(b.octets());
    }
    if let Some(path) = reuse_stats {
        open.maps
            .stats
            .reuse_pinned_map(path)
            .with_context(|| format!("reusing stats map {}", path.display()))?;
    }
    open.load()
        .context("loading the XDP program into the kernel")
}

/// Reads back the configuration from a loaded program's .rodata map.
pub fn config_of(rodata: &dyn MapCore) -> Result<Config> {
    let bytes = rodata
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context("reading the program's configuration")?
        .ok_or_else(|| anyhow!("the program's configuration map is empty"))?;
    let mut ro: types::rodata = unsafe { std::mem::zeroed() };
    plain::copy_from_bytes(&mut ro, &bytes)
        .map_err(|e| anyhow!("configuration map has an unexpected layout: {e:?}"))?;
    let n = (ro.n_backends as usize).min(ro.backend_ip.len());
    Ok(Config {
        lb: Ipv4Addr::from(ro.lb_ip.to_ne_bytes()),
        client: Ipv4Addr::from(ro.client_ip.to_ne_bytes()),
        port: match u16::from_be(ro.lb_port) {
            0 => None,
            p => Some(p),
        },
        backends: ro.backend_ip[..n]
            .iter()
            .map(|b| Ipv4Addr::from(b.to_ne_bytes()))
            .collect(),
    })
}

/// What `attach` did.
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
    /// Whether an earlier `lb` program on the interface was replaced.
    pub replaced: bool,
    /// Whether attach had to enable IPv4 forwarding on the interface.
    pub enabled_forwarding: bool,
    /// Addresses whose MAC the kernel could not resolve yet.
    pub unresolved: Vec<Ipv4Addr>,
    /// Pin of the link.
    pub link_pin: String,
    /// Pin of the counters.
    pub stats_pin: String,
    /// Pin of the configuration.
    pub config_pin: String,
}

/// Removes, on drop, the pins created so far unless disarmed.
struct PinRollback(Vec<std::path::PathBuf>);

impl Drop for PinRollback {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            if p.is_dir() {
                PinDir::remove_dir_if_empty(p);
            } else {
                let _ = PinDir::remove(p);
            }
        }
    }
}

/// Loads the program for `cfg`, attaches it to `iface` (current netns) and
/// pins link, counters and configuration under `pins`. If an `lb` link is
/// already pinned for the interface, its program is replaced atomically.
pub fn attach(iface: &str, cfg: &Config, mode: Mode, pins: &PinDir) -> Result<Attachment> {
    cfg.validate()?;
    let ifindex = net::ifindex(iface)?;
    let link_pin = pins.link(iface);
    let mut effective = mode.effective(ifindex)?;
    let existing = if link_pin.exists() {
        let fd = xdp::open_pinned(&link_pin)?;
        let info = xdp::link_info(fd.as_fd())?;
        if !link_is_on(&info, ifindex)? {
            bail!(
                "{} is pinned for {iface}, but not for the {iface} of this network namespace (another namespace's, or stale: use --netns, or lb detach {iface})",
                link_pin.display()
            );
        }
        // The link keeps the mode it was created with.
        if xdp::query(ifindex)?.mode == "skb" {
            effective = Mode::Skb;
        }
        Some(fd)
    } else {
        let now = xdp::query(ifindex)?;
        if now.prog_id != 0 {
            bail!(
                "{iface} already has an XDP program (id {}, {} mode) that lb did not attach; detach it first",
                now.prog_id,
                now.mode
            );
        }
        None
    };

    let mut rollback = PinRollback(Vec::new());
    for dir in [&pins.root, &pins.iface_dir(iface)] {
        if !dir.exists() {
            fs::create_dir(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            rollback.0.push(dir.clone());
        }
    }

    let stats_pin = pins.stats();
    let reuse = stats_pin.exists().then_some(stats_pin.as_path());
    let mut storage = MaybeUninit::uninit();
    let mut skel = load(cfg, effective == Mode::Skb, reuse, &mut storage)?;

    let enabled_forwarding = !net::forwarding(iface)?;
    if enabled_forwarding {
        net::enable_forwarding(iface)?;
    }

    let config_pin = pins.config(iface);
    let replaced = existing.is_some();
    if let Some(link_fd) = existing {
        let mut link = libbpf_rs::Link::open(&link_pin)
            .with_context(|| format!("opening link {}", link_pin.display()))?;
        drop(link_fd);
        link.update_prog(&skel.progs.lb_xdp)
            .with_context(|| format!("replacing the program on {iface}"))?;
        PinDir::remove(&config_pin)?;
        skel.maps
            .rodata
            .pin(&config_pin)
            .with_context(|| format!("pinning {}", config_pin.display()))?;
    } else {
        let link =
            xdp::link_create(skel.progs.lb_xdp.as_fd(), ifindex, mode).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc_ebusy) if libc_ebusy == nix::errno::Errno::EBUSY as i32 => {
                        anyhow!("{iface} already has an XDP program attached by something else")
                    }
                    Some(e)
                        if e == nix::errno::Errno::EOPNOTSUPP as i32
                            || e == nix::errno::Errno::EINVAL as i32 =>
                    {
                        anyhow!("{iface} does not support XDP in {mode} mode")
                    }
                    _ => anyhow!("attaching to {iface} in {mode} mode: {e}"),
                }
            })?;
        if reuse.is_none() {
            skel.maps
                .stats
                .pin(&stats_pin)
                .with_context(|| format!("pinning {}", stats_pin.display()))?;
            rollback.0.push(stats_pin.clone());
        }
        skel.maps
            .rodata
            .pin(&config_pin)
            .with_context(|| format!("pinning {}", config_pin.display()))?;
        rollback.0.push(config_pin.clone());
        xdp::pin(link.as_fd(), &link_pin)?;
        rollback.0.push(link_pin.clone());
    }

    let missing = net::resolve_neighbours(&cfg.neighbours(), Duration::from_secs(1))?;
    let now = xdp::query(ifindex)?;
    rollback.0.clear();
    Ok(Attachment {
        iface: iface.to_string(),
        ifindex,
        prog_id: now.prog_id,
        mode: now.mode.to_string(),
        replaced,
        enabled_forwarding,
        unresolved: missing,
        link_pin: link_pin.display().to_string(),
        stats_pin: stats_pin.display().to_string(),
        config_pin: config_pin.display().to_string(),
    })
}

/// Whether a link is the one running on `ifindex` of the current network
/// namespace. Interface indexes repeat across namespaces and pins are shared
/// by all of them, so the index alone is not enough: the program the
/// interface runs must be the link's.
fn link_is_on(info: &xdp::LinkInfo, ifindex: u32) -> Result<bool> {
    Ok(info.ifindex == ifindex && xdp::query(ifindex)?.prog_id == info.prog_id)
}

/// Detaches the `lb` program from `iface` and removes its pins (and the
/// shared ones once no interface is left). Refuses to touch a program that
/// `lb` did not attach.
pub fn detach(iface: &str, pins: &PinDir) -> Result<Vec<String>> {
    let link_pin = pins.link(iface);
    let ifindex = net::ifindex(iface).ok();
    let mut removed = Vec::new();
    if !link_pin.exists() {
        if let Some(ifindex) = ifindex {
            let now = xdp::query(ifindex)?;
            if now.prog_id != 0 {
                bail!(
                    "{iface} has an XDP program (id {}) that lb did not attach (no link pinned at {}); not touching it",
                    now.prog_id,
                    link_pin.display()
                );
            }
        }
        bail!(
            "nothing attached by lb on {iface} (no link pinned at {})",
            link_pin.display()
        );
    }
    let fd = xdp::open_pinned(&link_pin)?;
    let info = xdp::link_info(fd.as_fd())?;
    match ifindex {
        Some(i) if link_is_on(&info, i)? => {
            xdp::link_detach(fd.as_fd()).with_context(|| format!("detaching from {iface}"))?
        }
        // The interface (or its namespace) went away: the link is defunct,
        // only the pins are left to remove.
        _ if info.ifindex == 0 => {}
        Some(_) | None => bail!(
            "{} belongs to another network namespace's {iface} (ifindex {}), not to this one's (use --netns)",
            link_pin.display(),
            info.ifindex
        ),
    }
    drop(fd);
    for p in [link_pin, pins.config(iface)] {
        if p.exists() {
            PinDir::remove(&p)?;
            removed.push(p.display().to_string());
        }
    }
    PinDir::remove_dir_if_empty(&pins.iface_dir(iface));
    if pins.interfaces()?.is_empty() {
        let s = pins.stats();
        if s.exists() {
            PinDir::remove(&s)?;
            removed.push(s.display().to_string());
        }
        PinDir::remove_dir_if_empty(&pins.root);
    }
    Ok(removed)
}

/// One attached interface as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IfaceStatus {
    /// Interface name (as pinned).
    pub iface: String,
    /// Link id.
    pub link_id: u32,
    /// Program id behind the link.
    pub prog_id: u32,
    /// Interface index, 0 if the interface is gone.
    pub ifindex: u32,
    /// Mode in effect ("native", "skb", ...; "gone" if the interface is gone).
    pub mode: String,
    /// The configuration the program was loaded with.
    pub config: Config,
}

/// Status of an instance: attached interfaces and counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Pin directory.
    pub pin_dir: String,
    /// Attached interfaces.
    pub interfaces: Vec<IfaceStatus>,
    /// Counters by name, summed over CPUs.
    pub counters: Vec<(String, stats::Counter)>,
}

/// Reads what the instance at `pins` has attached (current netns for the
/// modes) and its counters.
pub fn status(pins: &PinDir) -> Result<Status> {
    let mut interfaces = Vec::new();
    for iface in pins.interfaces()? {
        let fd = xdp::open_pinned(&pins.link(&iface))?;
        let info = xdp::link_info(fd.as_fd())?;
        let mode = if info.ifindex == 0 {
            "gone".to_string()
        } else {
            xdp::query(info.ifindex)
                .map(|a| a.mode.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let cfg_pin = pins.config(&iface);
        let map = MapHandle::from_pinned_path(&cfg_pin)
            .with_context(|| format!("opening {}", cfg_pin.display()))?;
        interfaces.push(IfaceStatus {
            iface,
            link_id: info.id,
            prog_id: info.prog_id,
            ifindex: info.ifindex,
            mode,
            config: config_of(&map)?,
        });
    }
    let counters = if pins.stats().exists() {
        let c = stats::read_pinned(&pins.stats())?;
        stats::NAMES.iter().map(|n| n.to_string()).zip(c).collect()
    } else {
        Vec::new()
    };
    Ok(Status {
        pin_dir: pins.root.display().to_string(),
        interfaces,
        counters,
    })
}

/// Attaches the pass-everything program to `iface` without a link (it stays
/// until the interface goes or `pass_detach`). Needed on the peer of a veth
/// whose other end sends with XDP_TX in native mode.
pub fn pass_attach(iface: &str, mode: Mode) -> Result<u32> {
    let ifindex = net::ifindex(iface)?;
    let mut storage = MaybeUninit::uninit();
    let skel = PassSkelBuilder::default()
        .open(&mut storage)
        .context("opening the pass program")?
        .load()
        .context("loading the pass program")?;
    xdp::attach_legacy(skel.progs.lb_pass.as_fd(), ifindex, mode)
        .with_context(|| format!("attaching the pass program to {iface}"))?;
    Ok(xdp::query(ifindex)?.prog_id)
}

/// Removes the pass program from `iface`.
pub fn pass_detach(iface: &str, mode: Mode) -> Result<()> {
    let ifindex = net::ifindex(iface)?;
    xdp::detach_legacy(ifindex, mode)?;
    let left = xdp::query(ifindex)?;
    if left.prog_id != 0 {
        bail!(
            "{iface} still runs XDP program {} in {} mode (try --mode {})",
            left.prog_id,
            left.mode,
            left.mode
        );
    }
    Ok(())
}
