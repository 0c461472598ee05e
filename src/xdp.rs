//! Thin, safe wrappers over the libbpf calls libbpf-rs does not expose:
//! XDP links with an explicit mode, what is attached to an interface, and
//! what a pinned link points at.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{anyhow, bail, Result};

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
    fn flags(self) -> u32 {
        match self {
            Mode::Auto => 0,
            Mode::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
            Mode::Skb => libbpf_sys::XDP_FLAGS_SKB_MODE,
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
/// as long as the returned fd or a pin of it.
pub fn link_create(prog: BorrowedFd<'_>, ifindex: u32, mode: Mode) -> std::io::Result<OwnedFd> {
    let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of_val(&opts) as _;
    opts.flags = mode.flags();
    let fd = unsafe {
        libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, libbpf_sys::BPF_XDP, &opts)
    };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins any BPF object fd at `path`.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let rc = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    if rc < 0 {
        bail!(
            "pinning {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(-rc)
        );
    }
    Ok(())
}

/// Opens a pinned object.
pub fn open_pinned(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    if fd < 0 {
        bail!(
            "opening pin {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(-fd)
        );
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
pub fn link_info(fd: BorrowedFd<'_>) -> Result<LinkInfo> {
    let mut info: libbpf_sys::bpf_link_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&info) as u32;
    let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if rc < 0 {
        return Err(anyhow!(
            "reading link info: {}",
            std::io::Error::from_raw_os_error(-rc)
        ));
    }
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        ifindex: unsafe { info.__bindgen_anon_1.xdp.ifindex },
    })
}

/// Detaches a link (the program leaves the interface; the link fd stays
/// valid but defunct).
pub fn link_detach(fd: BorrowedFd<'_>) -> Result<()> {
    let rc = unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) };
    if rc < 0 {
        bail!("detaching link: {}", std::io::Error::from_raw_os_error(-rc));
    }
    Ok(())
}

/// Attaches `prog` to `ifindex` the legacy way (netlink, no link): it stays
/// until replaced or the interface goes. Used for helper programs only.
pub fn attach_legacy(prog: impl AsFd, ifindex: u32, mode: Mode) -> Result<()> {
    let rc = unsafe {
        libbpf_sys::bpf_xdp_attach(
            ifindex as i32,
            prog.as_fd().as_raw_fd(),
            mode.flags(),
            std::ptr::null(),
        )
    };
    if rc < 0 {
        bail!(
            "attaching XDP to ifindex {ifindex}: {}",
            std::io::Error::from_raw_os_error(-rc)
        );
    }
    Ok(())
}

/// Removes a legacy-attached program.
pub fn detach_legacy(ifindex: u32, mode: Mode) -> Result<()> {
    let rc = unsafe { libbpf_sys::bpf_xdp_detach(ifindex as i32, mode.flags(), std::ptr::null()) };
    if rc < 0 {
        bail!(
            "detaching XDP from ifindex {ifindex}: {}",
            std::io::Error::from_raw_os_error(-rc)
        );
    }
    Ok(())
}
