//! What the benchmarks share: addresses, guards for the namespace and pins
//! they make, frames and connection-table entries.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use etherparse::PacketBuilder;

use lb::maps::{self, Flow, FlowKey};

/// The LB's address on eth0 of the benchmark namespace.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The service address (not local: routed to a permanent neighbour).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
/// The client.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// The backend.
pub const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
/// eth0's MAC.
pub const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
/// The previous hop's MAC.
pub const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// A network namespace, deleted on drop.
pub struct Ns(pub String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A pin directory, removed with its contents on drop.
pub struct PinRoot(pub std::path::PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command; its stderr is the error if it fails.
pub fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| args[0].to_string())?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A TCP segment with 64 bytes of payload from PEER to MAC: an ACK, or a SYN.
pub fn tcp_frame_flags(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(PEER, MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload = [0u8; 64];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).expect("building a frame");
    out
}

/// A TCP ACK segment with 64 bytes of payload.
pub fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp_frame_flags(src, sport, dst, dport, false)
}

/// The connection-table key of a TCP packet.
pub fn key(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        saddr: maps::ip_to_be(saddr),
        daddr: maps::ip_to_be(daddr),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: 6,
        ..Default::default()
    }
}

/// A live, resolved connection-table entry rewriting to the given addresses
/// and sending out of `ifindex` to `dmac`.
pub fn flow(
    saddr: Ipv4Addr,
    sport: u16,
    daddr: Ipv4Addr,
    dport: u16,
    dir: u8,
    ifindex: u32,
    dmac: [u8; 6],
) -> Flow {
    let now = lb::clock::now().expect("reading the clock");
    Flow {
        saddr: maps::ip_to_be(saddr),
        daddr: maps::ip_to_be(daddr),
        sport: sport.to_be(),
        dport: dport.to_be(),
        ifindex,
        smac: MAC,
        dmac,
        dir,
        nh_ok: 1,
        created: now,
        seen: now,
        ..Default::default()
    }
}
