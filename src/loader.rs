//! Everything that touches the skeleton: open, configure, load (reusing an
//! instance's pinned maps), attach, pin, replace, detach, and read back what
//! is attached.

use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject};

use crate::bpffs::PinDir;
use crate::maps::{self, Maps};
use crate::settings::{self, Settings};
use crate::skel::lb::{LbSkel, LbSkelBuilder};
use crate::skel::pass::PassSkelBuilder;
use crate::xdp::{self, Mode};
use crate::{halfopen, net, stats};

/// Opens the program, sets its load-time constants from `settings` and loads
/// it, reusing every map already pinned under `reuse`. `skb_mode`: the
/// program will run in skb (generic) mode, where packets may carry partial
/// checksums. Nothing is attached and nothing new is pinned.
pub fn load<'obj>(
    settings: &Settings,
    skb_mode: bool,
    reuse: Option<&PinDir>,
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
    // An unused range is empty (lo > hi).
    ro.nat_lo = [1; settings::MAX_PORT_RANGES];
    ro.nat_hi = [0; settings::MAX_PORT_RANGES];
    for (i, r) in settings
        .nat_ports
        .iter()
        .take(settings::MAX_PORT_RANGES)
        .enumerate()
    {
        ro.nat_lo[i] = r.lo;
        ro.nat_hi[i] = r.hi;
    }
    ro.nat_size = settings.nat_size();
    let full = net::snat_check(&settings.snat)?;
    // IPv4 addresses in snat_addr (full bits from 0), IPv6 ones in
    // snat_addr6 (full bits from 16); at most MAX_SNAT in all.
    ro.snat_addr = [0; settings::MAX_SNAT];
    ro.snat_addr6 = Default::default();
    ro.snat_full = 0;
    let (mut n4, mut n6) = (0usize, 0usize);
    for (a, f) in settings.snat.iter().take(settings::MAX_SNAT).zip(&full) {
        match a {
            std::net::IpAddr::V4(v4) => {
                ro.snat_addr[n4] = maps::ip_to_be(*v4);
                ro.snat_full |= u32::from(*f) << n4;
                n4 += 1;
            }
            std::net::IpAddr::V6(v6) => {
                ro.snat_addr6[n6] = maps::in6_to_be(*v6);
                ro.snat_full |= u32::from(*f) << (16 + n6);
                n6 += 1;
            }
        }
    }
    ro.snat_count = n4 as u32;
    ro.snat_count6 = n6 as u32;
    ro.maglev_size = settings.maglev_size;
    let hz = crate::clock::hz()?;
    ro.hz = hz;
    ro.tcp_timeout = settings.tcp_timeout * hz;
    ro.udp_timeout = settings.udp_timeout * hz;
    ro.syn_timeout = settings::SYN_TIMEOUT * hz;
    ro.fin_timeout = settings.fin_timeout * hz;
    ro.tw_timeout = settings::TIME_WAIT * hz;
    ro.nh_ttl = hz; // a cached next hop lives a second
    ro.hs_latency_off = u8::from(!settings.handshake_latency);
    open.maps
        .conntrack
        .set_max_entries(settings.max_flows * 2)
        .context("sizing the connection table")?;
    // The half-open tables are arrays of sets (crate::halfopen), the
    // hash's keys shared with an instance reused (each program of an
    // instance must find the same sets).
    let sets = halfopen::sets_for(settings.max_half_open * 2);
    let sets6 = halfopen::sets_for((settings.max_half_open / 4).max(1024) * 2);
    ro.ho_sets = sets;
    ro.ho_sets6 = sets6;
    ro.ho_half_open = settings.max_half_open;
    ro.ho_key = match reuse.filter(|p| p.config().exists()) {
        Some(p) => {
            let config = libbpf_rs::MapHandle::from_pinned_path(p.config())
                .context("opening the instance's settings")?;
            let theirs = maps::rodata_of(&config)?;
            if theirs.ho_hash_id != halfopen::HASH || theirs.ho_key.iter().all(|&k| k == 0) {
                bail!(
                    "the instance at {} was created by an earlier lb (another half-open table hash): detach it first",
                    p.root.display()
                );
            }
            theirs.ho_key
        }
        None => rand_keys()?,
    };
    ro.ho_hash_id = halfopen::HASH;
    open.maps
        .ct_new
        .set_max_entries(sets)
        .context("sizing the half-open table")?;
    // IPv6 connections take more memory each (40-byte keys): their tables
    // hold a quarter of the IPv4 ones' connections.
    open.maps
        .conntrack6
        .set_max_entries((settings.max_flows / 4).max(1024) * 2)
        .context("sizing the IPv6 connection table")?;
    open.maps
        .ct_new6
        .set_max_entries(sets6)
        .context("sizing the IPv6 half-open table")?;
    open.maps
        .dsr_flows
        // A cache: an evicted flow falls back to the Maglev choice, the
        // same unless the table changed meanwhile; a quarter of the
        // connection table's connections keeps its memory small.
        .set_max_entries((settings.max_flows / 4).max(1024))
        .context("sizing the DSR flow cache")?;
    open.maps
        .dsr_flows6
        // the IPv6 tables' quarter of that
        .set_max_entries((settings.max_flows / 16).max(1024))
        .context("sizing the IPv6 DSR flow cache")?;
    // Client affinity with a timeout: one entry a client of such a
    // service; an evicted client falls back to the Maglev choice.
    open.maps
        .affinity
        .set_max_entries((settings.max_flows / 16).max(1024))
        .context("sizing the client affinity map")?;
    open.maps
        .affinity6
        .set_max_entries((settings.max_flows / 64).max(1024))
        .context("sizing the IPv6 client affinity map")?;
    if let Some(pins) = reuse {
        for mut map in open.open_object_mut().maps_mut() {
            let name = map.name().to_string_lossy().into_owned();
            if !maps::PINNED.contains(&name.as_str()) {
                continue;
            }
            let path = pins.map(&name);
            if path.exists() {
                map.reuse_pinned_map(&path).map_err(|e| {
                    anyhow!(
                        "pinned map {} does not fit this build of lb ({e}); its layout changed: detach every interface of the instance (or use another --pin-dir) to start afresh",
                        path.display()
                    )
                })?;
            }
        }
    }
    open.load()
        .context("loading the XDP program into the kernel")
}

/// Random keys for the half-open tables' hash (so a flood cannot aim at
/// one set), from the kernel's random source.
fn rand_keys() -> Result<halfopen::Keys> {
    use std::io::Read;
    let mut b = [0u8; std::mem::size_of::<halfopen::Keys>()];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the half-open tables' hash keys")?;
    Ok(std::array::from_fn(|i| {
        u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
    }))
}

/// Pins what is new under `pins` (which must exist): the maps of a fresh
/// instance, and always the program's settings (.rodata). Returns the new
/// pins. With [`load`], this gives tests and benchmarks a working instance
/// without attaching anything.
pub fn pin_maps(skel: &mut LbSkel<'_>, pins: &PinDir) -> Result<Vec<PathBuf>> {
    let mut pinned = Vec::new();
    for mut map in skel.object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        let path = if maps::PINNED.contains(&name.as_str()) {
            pins.map(&name)
        } else if name.ends_with(".rodata") {
            PinDir::remove(&pins.config())?;
            pins.config()
        } else {
            continue;
        };
        if !path.exists() {
            map.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            pinned.push(path);
        }
    }
    Ok(pinned)
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
    /// Whether the instance's maps existed (connection table kept).
    pub reused_maps: bool,
    /// Sysctls attach had to change on the interface.
    pub sysctls: Vec<String>,
    /// Pin of the link.
    pub link_pin: String,
    /// The instance's pin directory.
    pub pin_dir: String,
}

/// Removes, on drop, the pins created so far unless disarmed.
pub(crate) struct PinRollback(pub(crate) Vec<PathBuf>);

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

/// The settings of the instance at `pins`, if it exists.
pub fn instance_settings(pins: &PinDir) -> Result<Option<Settings>> {
    if !pins.map("conntrack").exists() {
        return Ok(None);
    }
    Ok(Some(Maps::open(pins)?.settings()?))
}

/// Loads the datapath, attaches it to `iface` (current netns) and pins link
/// and maps under `pins`. An existing instance's maps are reused (flows
/// survive); if `lb` already has a link on the interface, its program is
/// replaced atomically. `settings`: `None` keeps the instance's (or the
/// defaults for a new one).
pub fn attach(
    iface: &str,
    mode: Mode,
    settings: Option<&Settings>,
    pins: &PinDir,
) -> Result<Attachment> {
    let ifindex = net::ifindex(iface)?;
    let current = instance_settings(pins)?;
    let settings = match (settings, &current) {
        (Some(s), Some(c)) if s != c => bail!(
            "the instance at {} runs with other settings ({c:?}); detach all its interfaces to change them",
            pins.root.display()
        ),
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => Settings::default(),
    };
    // Checked when the instance is made (the host's ephemeral ports may
    // have moved since; the instance's flows already use its range).
    if current.is_none() {
        settings.validate()?;
    }

    let link_pin = pins.link(iface);
    let mut effective = mode.effective(ifindex)?;
    let existing = if link_pin.exists() {
        let info = xdp::link_info(&xdp::open_link(&link_pin)?)?;
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
        true
    } else {
        let now = xdp::query(ifindex)?;
        if now.prog_id != 0 {
            bail!(
                "{iface} already has an XDP program (id {}, {} mode) that lb did not attach; detach it first",
                now.prog_id,
                now.mode
            );
        }
        false
    };

    let mut rollback = PinRollback(Vec::new());
    for dir in [&pins.root, &pins.iface_dir(iface)] {
        if !dir.exists() {
            fs::create_dir(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            rollback.0.push(dir.clone());
        }
    }

    let reused_maps = current.is_some();
    let mut storage = MaybeUninit::uninit();
    let mut skel = load(&settings, effective == Mode::Skb, Some(pins), &mut storage)?;
    let sysctls = net::prepare_interface(iface)?;

    rollback.0.extend(pin_maps(&mut skel, pins)?);

    if existing {
        let mut link = xdp::open_link(&link_pin)?;
        link.update_prog(&skel.progs.lb_xdp)
            .with_context(|| format!("replacing the program on {iface}"))?;
    } else {
        let link =
            xdp::link_create(skel.progs.lb_xdp.as_fd(), ifindex, mode).map_err(|e| {
                match e.raw_os_error().map(nix::errno::Errno::from_raw) {
                    Some(nix::errno::Errno::EBUSY) | Some(nix::errno::Errno::EEXIST) => {
                        anyhow!("{iface} already has an XDP program attached by something else")
                    }
                    Some(nix::errno::Errno::EOPNOTSUPP) | Some(nix::errno::Errno::EINVAL) => {
                        anyhow!("{iface} does not support XDP in {mode} mode")
                    }
                    _ => anyhow!("attaching to {iface} in {mode} mode: {e}"),
                }
            })?;
        xdp::pin(link, &link_pin)?;
        rollback.0.push(link_pin.clone());
    }
    skel.maps
        .tx_ports
        .update(
            &ifindex.to_ne_bytes(),
            &ifindex.to_ne_bytes(),
            MapFlags::ANY,
        )
        .with_context(|| format!("adding {iface} to the redirect map"))?;

    let now = xdp::query(ifindex)?;
    rollback.0.clear();
    Ok(Attachment {
        iface: iface.to_string(),
        ifindex,
        prog_id: now.prog_id,
        mode: now.mode.to_string(),
        replaced: existing,
        reused_maps,
        sysctls,
        link_pin: link_pin.display().to_string(),
        pin_dir: pins.root.display().to_string(),
    })
}

/// Whether a link is the one running on `ifindex` of the current network
/// namespace. Interface indexes repeat across namespaces and pins are shared
/// by all of them, so the index alone is not enough: the program the
/// interface runs must be the link's.
pub(crate) fn link_is_on(info: &xdp::LinkInfo, ifindex: u32) -> Result<bool> {
    Ok(info.ifindex == ifindex && xdp::query(ifindex)?.prog_id == info.prog_id)
}

/// Detaches the `lb` program from `iface` and removes its pins; the last
/// interface of an instance takes the instance's maps with it. Refuses to
/// touch a program that `lb` did not attach.
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
    let link = xdp::open_link(&link_pin)?;
    let info = xdp::link_info(&link)?;
    match ifindex {
        Some(i) if link_is_on(&info, i)? => link
            .detach()
            .with_context(|| format!("detaching from {iface}"))?,
        // The interface (or its namespace) went away: the link is defunct,
        // only the pins are left to remove.
        _ if info.ifindex == 0 => {}
        Some(_) | None => bail!(
            "{} belongs to another network namespace's {iface} (ifindex {}), not to this one's (use --netns)",
            link_pin.display(),
            info.ifindex
        ),
    }
    drop(link);
    if let (Some(i), Ok(m)) = (ifindex, Maps::open(pins)) {
        let _ = m.tx_ports.delete(&i.to_ne_bytes());
    }
    PinDir::remove(&link_pin)?;
    removed.push(link_pin.display().to_string());
    PinDir::remove_dir_if_empty(&pins.iface_dir(iface));
    if pins.interfaces()?.is_empty() {
        for p in maps::PINNED
            .iter()
            .map(|n| pins.map(n))
            .chain([pins.config()])
        {
            if p.exists() {
                PinDir::remove(&p)?;
                removed.push(p.display().to_string());
            }
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
}

/// Status of an instance: attached interfaces, settings, services, counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Pin directory.
    pub pin_dir: String,
    /// Attached interfaces.
    pub interfaces: Vec<IfaceStatus>,
    /// The datapath settings.
    pub settings: Option<Settings>,
    /// Services with their backends.
    pub services: Vec<crate::service::ServiceInfo>,
    /// Counters by name, summed over CPUs (in JSON an object keyed by name).
    #[serde(serialize_with = "crate::output::by_name")]
    pub counters: Vec<(String, stats::Counter)>,
    /// The SNAT addresses and the ports each uses.
    pub snat: Vec<SnatInfo>,
}

/// An SNAT address as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnatInfo {
    /// The address.
    pub addr: std::net::IpAddr,
    /// Its ports: the NAT ranges, or "1024-65535" if it is lb's alone.
    pub ports: String,
}

/// Reads what the instance at `pins` has attached (current netns for the
/// modes), its settings, services and counters.
pub fn status(pins: &PinDir) -> Result<Status> {
    let mut interfaces = Vec::new();
    for iface in pins.interfaces()? {
        let info = xdp::link_info(&xdp::open_link(&pins.link(&iface))?)?;
        let mode = if info.ifindex == 0 {
            "gone".to_string()
        } else {
            xdp::query(info.ifindex)
                .map(|a| a.mode.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        interfaces.push(IfaceStatus {
            iface,
            link_id: info.id,
            prog_id: info.prog_id,
            ifindex: info.ifindex,
            mode,
        });
    }
    let (settings, services, counters, snat) = match Maps::open(pins) {
        Ok(m) => {
            let st = m.settings()?;
            let full = m.snat_full()?;
            let snat = st
                .snat
                .iter()
                .zip(full)
                .map(|(a, full)| SnatInfo {
                    addr: *a,
                    ports: if full {
                        format!("{}-65535", settings::FIRST_PORT)
                    } else {
                        settings::ports_string(&st.nat_ports)
                    },
                })
                .collect();
            (
                Some(st),
                crate::service::list(&m)?,
                stats::NAMES
                    .iter()
                    .map(|n| n.to_string())
                    .zip(stats::read(&m.stats)?)
                    .collect(),
                snat,
            )
        }
        Err(_) => (None, Vec::new(), Vec::new(), Vec::new()),
    };
    Ok(Status {
        pin_dir: pins.root.display().to_string(),
        interfaces,
        settings,
        services,
        counters,
        snat,
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
    xdp::attach_legacy(&skel.progs.lb_pass, ifindex, mode)
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
