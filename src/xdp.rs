//! XDP attachment: libbpf-rs's own `Link` (pinned links: open, pin,
//! inspect, detach) and `Xdp` (netlink attachment of helper programs),
//! and thin wrappers over the two libbpf calls it does not cover: creating
//! an XDP link in an explicit mode (`Program::attach_xdp` takes no flags)
//! and asking what an interface runs without holding a program
//! (`Xdp::query` needs a program's fd it does not use).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::{Link, Program, Xdp, XdpFlags};

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native if the driver supports it, else skb (generic).
    Auto,
    /// In the driver (XDP_FLAGS_DRV_MODE).
    Native,
    /// Generic XDP on the skb (XDP_FLAGS_SKB_MODE).
    Skb,
}

impl Mode {
    fn flags(self) -> XdpFlags {
        match self {
            Mode::Auto => XdpFlags::NONE,
            Mode::Native => XdpFlags::DRV_MODE,
            Mode::Skb => XdpFlags::SKB_MODE,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Native => "native",
            Mode::Skb => "skb",
        })
    }
}

/// What the kernel reports as attached to an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attached {
    /// Program id, 0 when nothing is attached.
    pub prog_id: u32,
    /// "native", "skb", "hw", "multi" or "none".
    pub mode: &'static str,
}

fn query_opts(ifindex: u32) -> Result<libbpf_sys::bpf_xdp_query_opts> {
    let mut opts: libbpf_sys::bpf_xdp_query_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of_val(&opts) as _;
    let rc = unsafe { libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut opts) };
    if rc < 0 {
        bail!(
            "querying XDP on ifindex {ifindex}: {}",
            std::io::Error::from_raw_os_error(-rc)
        );
    }
    Ok(opts)
}

/// `NETDEV_XDP_ACT_BASIC` of include/uapi/linux/netdev.h: XDP_PASS/DROP/ABORTED in the driver.
const NETDEV_XDP_ACT_BASIC: u64 = 1;

/// Whether the driver of `ifindex` runs XDP natively.
pub fn native_supported(ifindex: u32) -> Result<bool> {
    Ok(query_opts(ifindex)?.feature_flags & NETDEV_XDP_ACT_BASIC != 0)
}

impl Mode {
    /// The mode `self` ends up in on `ifindex`: `Auto` is native where the
    /// driver supports it.
    pub fn effective(self, ifindex: u32) -> Result<Mode> {
        Ok(match self {
            Mode::Auto if native_supported(ifindex)? => Mode::Native,
            Mode::Auto => Mode::Skb,
            m => m,
        })
    }
}

/// Queries the XDP program attached to `ifindex` (current netns).
pub fn query(ifindex: u32) -> Result<Attached> {
    let opts = query_opts(ifindex)?;
    let mode = match opts.attach_mode as u32 {
        libbpf_sys::XDP_ATTACHED_DRV => "native",
        libbpf_sys::XDP_ATTACHED_SKB => "skb",
        libbpf_sys::XDP_ATTACHED_HW => "hw",
        libbpf_sys::XDP_ATTACHED_MULTI => "multi",
        _ => "none",
    };
    Ok(Attached {
        prog_id: opts.prog_id,
        mode,
    })
}

/// Creates an XDP bpf_link for `prog` on `ifindex` in `mode`. The link lives
/// as long as the returned fd or a pin of it ([`pin`]).
pub fn link_create(prog: BorrowedFd<'_>, ifindex: u32, mode: Mode) -> std::io::Result<OwnedFd> {
    let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of_val(&opts) as _;
    opts.flags = mode.flags().bits();
    let fd = unsafe {
        libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, libbpf_sys::BPF_XDP, &opts)
    };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the link made by [`link_create`] at `path` (a libbpf-rs `Link`
/// cannot be made from an fd; [`open_link`] opens it from there).
pub fn pin(link: OwnedFd, path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let rc = unsafe { libbpf_sys::bpf_obj_pin(link.as_raw_fd(), c.as_ptr()) };
    if rc < 0 {
        bail!(
            "pinning {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(-rc)
        );
    }
    Ok(())
}

/// Opens a pinned link.
pub fn open_link(path: &Path) -> Result<Link> {
    Link::open(path).with_context(|| format!("opening pin {}", path.display()))
}

/// What an XDP link points at.
#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    /// Link id.
    pub id: u32,
    /// Program id behind the link.
    pub prog_id: u32,
    /// Interface, 0 once the interface is gone (the link is defunct).
    pub ifindex: u32,
}

/// Reads the id, program and interface of an XDP link.
pub fn link_info(link: &Link) -> Result<LinkInfo> {
    let info = link.info().context("reading link info")?;
    let LinkTypeInfo::Xdp(x) = info.info else {
        bail!("link {} is not an XDP link", info.id);
    };
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        ifindex: x.ifindex,
    })
}

/// Attaches `prog` to `ifindex` the legacy way (netlink, no link): it stays
/// until replaced or the interface goes. Used for helper programs only.
pub fn attach_legacy(prog: &Program<'_>, ifindex: u32, mode: Mode) -> Result<()> {
    Xdp::new(prog.as_fd())
        .attach(ifindex as i32, mode.flags())
        .with_context(|| format!("attaching XDP to ifindex {ifindex}"))
}

/// Removes the program attached to `ifindex` the legacy way in `mode`, if
/// any.
pub fn detach_legacy(ifindex: u32, mode: Mode) -> Result<()> {
    let id = query(ifindex)?.prog_id;
    if id == 0 {
        return Ok(());
    }
    let prog = Program::fd_from_id(id).with_context(|| format!("opening XDP program {id}"))?;
    Xdp::new(prog.as_fd())
        .detach(ifindex as i32, mode.flags())
        .with_context(|| format!("detaching XDP from ifindex {ifindex}"))
}
