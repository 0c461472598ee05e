//! The forward-only ceiling of scripts/bench: loads bpf/fwd.bpf.c (a static,
//! stateless NAT between one client and one backend, XDP_TX both ways) onto
//! an interface of a namespace, through a bpf_link pinned at a path; removing
//! the pin detaches it.
//!
//! ```text
//! cargo bench --bench fwd -- attach --netns NS --iface IF --pin FILE \
//!     --vip IP --lb IP --lb-mac MAC --client IP --client-mac MAC \
//!     --backend IP --backend-mac MAC [--port P --backend-port P]
//! ```
//!
//! Without `--port`, every TCP port is forwarded as it is. As root. Without
//! `attach` (as `cargo bench` runs it) it only checks that the program
//! loads.

use std::collections::HashMap;
use std::fs::File;
use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use nix::sched::{setns, CloneFlags};

#[allow(clippy::all, missing_docs, non_camel_case_types, dead_code)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/fwd.skel.rs"));
}

use skel::FwdSkelBuilder;

fn mac(s: &str) -> Result<[u8; 6]> {
    let b: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    b.try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {s}: six bytes"))
}

fn ip(s: &str) -> Result<u32> {
    let a: Ipv4Addr = s.parse().with_context(|| format!("bad address {s}"))?;
    Ok(u32::from(a).to_be())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("attach") {
        // `cargo bench` runs every bench target: prove the program loads.
        if nix::unistd::geteuid().is_root() {
            let mut st = MaybeUninit::uninit();
            FwdSkelBuilder::default().open(&mut st)?.load()?;
            println!("fwd: the forward-only program loads (scripts/bench attaches it)");
        }
        return Ok(());
    }
    let mut opt = HashMap::new();
    let mut it = args[1..].iter();
    while let Some(k) = it.next() {
        let Some(name) = k.strip_prefix("--") else {
            bail!("unexpected argument {k}");
        };
        if name == "bench" {
            continue; // cargo bench adds it
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        opt.insert(name.to_string(), v.clone());
    }
    let get = |k: &str| {
        opt.get(k)
            .map(String::as_str)
            .with_context(|| format!("--{k} is required"))
    };
    let port = |k: &str| -> Result<u16> {
        opt.get(k)
            .map_or(Ok(0), |v| v.parse())
            .with_context(|| format!("bad --{k}"))
    };
    let (vport, bport) = (port("port")?, port("backend-port")?);
    if (vport == 0) != (bport == 0) {
        bail!("--port and --backend-port go together");
    }
    let ns = get("netns")?;
    let target = File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("no such network namespace: {ns}"))?;
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))?;
    let iface = get("iface")?;
    let ifindex = nix::net::if_::if_nametoindex(iface)
        .with_context(|| format!("no such interface: {iface}"))?;

    let mut st = MaybeUninit::uninit();
    let mut open = FwdSkelBuilder::default().open(&mut st)?;
    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .context("the forward program has no .rodata")?;
    ro.fwd_vip = ip(get("vip")?)?;
    ro.fwd_lb = ip(get("lb")?)?;
    ro.fwd_client = ip(get("client")?)?;
    ro.fwd_backend = ip(get("backend")?)?;
    ro.fwd_vport = vport.to_be();
    ro.fwd_bport = bport.to_be();
    ro.fwd_lb_mac = mac(get("lb-mac")?)?;
    ro.fwd_client_mac = mac(get("client-mac")?)?;
    ro.fwd_backend_mac = mac(get("backend-mac")?)?;
    let skel = open.load().context("loading the forward program")?;
    let pin = get("pin")?;
    let mut link = skel
        .progs
        .fwd_xdp
        .attach_xdp(ifindex as i32)
        .with_context(|| format!("attaching the forward program to {iface}"))?;
    link.pin(pin).with_context(|| format!("pinning {pin}"))?;
    println!("fwd: attached to {iface} in {ns}, link pinned at {pin}");
    Ok(())
}
