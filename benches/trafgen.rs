//! Live per-packet cost on one core: a traffic generator built on
//! BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES). The
//! kernel runs lb's XDP program on `repeat` frames injected on eth0 of a
//! namespace it creates, and really transmits what the program returns
//! XDP_TX for (out of eth0, to its veth peer eth1, which runs a
//! pass-everything program so that the frames are delivered and then dropped
//! by eth1's stack: they are addressed to another MAC).
//!
//! `cargo bench --bench trafgen [-- --quick] [-- --csv FILE]`, as root.
//!
//! The frame is an established client->VIP packet; as in the datapath
//! benchmark, an extra connection entry keyed by the rewritten packet makes
//! a recycled (already rewritten) frame take the established path too. The
//! `to_backend` counter proves every frame was forwarded; eth1's received
//! packets say how many the veth delivered.

use std::mem::MaybeUninit;
use std::net::SocketAddrV4;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput};

mod common;

use common::*;
use lb::bpffs::PinDir;
use lb::maps::{self, Maps};
use lb::service::{self, Proto, Service};
use lb::settings::Settings;
use lb::skel::pass::PassSkelBuilder;
use lb::stats;
use lb::xdp::Mode;

/// Where the frames go: the backend's MAC (the veth peer takes them all).
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 2;

/// lbtrafgen<pid>: eth0 (10.200.0.2/24, forwarding) and its veth peer eth1,
/// permanent neighbours for the client and the backend.
fn namespace() -> Result<Ns> {
    let ns = Ns(format!("lbtrafgen{}", std::process::id()));
    sh(&["ip", "netns", "add", &ns.0])?;
    let n = ns.0.as_str();
    for cmd in [
        "link add name eth0 type veth peer name eth1",
        "link set dev eth0 address 02:00:00:00:00:01 up",
        "link set dev eth1 address 02:00:00:00:00:0e up",
        "addr add 10.200.0.2/24 dev eth0",
        "neigh add 10.200.0.10 lladdr 02:00:00:00:00:0a dev eth0 nud permanent",
        "neigh add 10.200.0.11 lladdr 02:00:00:00:00:0b dev eth0 nud permanent",
    ] {
        let mut args = vec!["ip", "-n", n];
        args.extend(cmd.split(' '));
        sh(&args)?;
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        n,
        "sysctl",
        "-qw",
        "net.ipv4.conf.eth0.forwarding=1",
    ])?;
    Ok(ns)
}

/// Packets `iface` (current network namespace) received, from `ip -s -j`
/// (sysfs shows the host's interfaces, not this namespace's).
fn rx_packets(iface: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args(["-s", "-j", "link", "show", "dev", iface])
        .output()
        .context("ip -s link")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j output")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packets in ip -j output")
}

/// Runs `prog` in live-frames mode on `frame`, `repeat` times; wall-clock
/// ns per packet (the kernel's duration covers the program runs only).
fn live(prog: &libbpf_rs::ProgramMut<'_>, ifindex: u32, frame: &[u8], repeat: u32) -> Result<f64> {
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let input = ProgramInput {
        context_in: Some(&mut ctx),
        data_in: Some(frame),
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        repeat,
        ..Default::default()
    };
    let t = Instant::now();
    prog.test_run(input).context("live-frames test_run")?;
    Ok(t.elapsed().as_nanos() as f64 / f64::from(repeat))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let csv = args
        .iter()
        .position(|a| a == "--csv")
        .and_then(|i| args.get(i + 1))
        .cloned();
    if !nix::unistd::geteuid().is_root() {
        bail!("the live-frames generator needs root (it runs XDP in a namespace it creates)");
    }
    let repeat: u32 = if quick { 1_000_000 } else { 10_000_000 };
    // One core: the generator's thread, and with it the softirq work of
    // transmitting and receiving on the veth pair.
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;

    lb::bpffs::ensure_mounted(std::path::Path::new(lb::bpffs::DEFAULT_PIN_DIR))?;
    let ns = namespace()?;
    let _guard = lb::netns::NetnsGuard::enter(&ns.0)?;
    let pin_root = PinRoot(format!("/sys/fs/bpf/lbtrafgen{}", std::process::id()).into());
    std::fs::create_dir(&pin_root.0).context("creating the generator's pin directory")?;
    let ifindex = lb::net::ifindex("eth0")?;
    lb::loader::pass_attach("eth1", Mode::Native)?;

    let pins = PinDir::new(&pin_root.0);
    let settings = Settings {
        max_flows: 1024,
        ..Default::default()
    };
    let mut st = MaybeUninit::uninit();
    let mut skel = lb::loader::load(&settings, false, None, &mut st)?;
    lb::loader::pin_maps(&mut skel, &pins)?;
    let m = Maps::open(&pins)?;
    let vip = Service::new(SocketAddrV4::new(VIP, 80), Proto::Tcp);
    service::service_add(&m, &vip)?;
    service::backend_add(&m, &vip, SocketAddrV4::new(BACKEND, 80), 1)?;
    for (k, f) in [
        (
            key(CLIENT, 40000, VIP, 80),
            flow(
                LB_IP,
                62000,
                BACKEND,
                80,
                maps::DIR_TO_BACKEND,
                ifindex,
                BACKEND_MAC,
            ),
        ),
        (
            key(LB_IP, 62000, BACKEND, 80),
            flow(
                CLIENT,
                40000,
                VIP,
                80,
                maps::DIR_TO_BACKEND,
                ifindex,
                BACKEND_MAC,
            ),
        ),
        // Their owners (keyed by the NAT tuples), which the client entries
        // must point back at (as in the datapath benchmark).
        (
            key(BACKEND, 80, LB_IP, 62000),
            flow(
                VIP,
                80,
                CLIENT,
                40000,
                maps::DIR_TO_CLIENT,
                ifindex,
                BACKEND_MAC,
            ),
        ),
        (
            key(VIP, 80, CLIENT, 40000),
            flow(
                BACKEND,
                80,
                LB_IP,
                62000,
                maps::DIR_TO_CLIENT,
                ifindex,
                BACKEND_MAC,
            ),
        ),
    ] {
        m.conntrack
            .update(maps::bytes(&k), maps::bytes(&f), MapFlags::ANY)
            .context("conntrack update")?;
    }
    let to_backend = || -> Result<u64> {
        Ok(stats::read(&m.stats)?[stats::index("to_backend").unwrap()].packets)
    };

    let pkt = tcp_frame(CLIENT, 40000, VIP, 80);
    let mut rows = Vec::new();

    // lb: established packets, XDP_TX.
    let (before, rx0) = (to_backend()?, rx_packets("eth1")?);
    let ns_lb = live(&skel.progs.lb_xdp, ifindex, &pkt, repeat)?;
    let (fwd, rx) = (to_backend()? - before, rx_packets("eth1")? - rx0);
    if fwd != u64::from(repeat) {
        bail!("established: {fwd} of {repeat} frames were forwarded");
    }
    rows.push(("lb established (XDP_TX)", ns_lb, fwd, rx));

    // For scale: the pass-everything program, every frame XDP_PASS into
    // eth0's stack (an skb built, IP receive, forwarding towards the VIP,
    // whose neighbour is unresolved: queued for ARP and dropped).
    let mut st = MaybeUninit::uninit();
    let pass = PassSkelBuilder::default().open(&mut st)?.load()?;
    let rx0 = rx_packets("eth1")?;
    let ns_pass = live(&pass.progs.lb_pass, ifindex, &pkt, repeat)?;
    rows.push((
        "empty program (XDP_PASS to the stack)",
        ns_pass,
        0,
        rx_packets("eth1")? - rx0,
    ));

    println!(
        "{:<38} {:>10} {:>8} {:>12} {:>12}",
        "live frames (one core)", "ns/packet", "Mpps", "forwarded", "eth1 rx"
    );
    for (name, ns, fwd, rx) in &rows {
        println!("{name:<38} {ns:>10.1} {:>8.2} {fwd:>12} {rx:>12}", 1e3 / ns);
    }
    if let Some(path) = csv {
        let mut s = String::from("case,ns,mpps,forwarded,delivered,repeat\n");
        for (name, ns, fwd, rx) in &rows {
            s += &format!("{name},{ns:.1},{:.3},{fwd},{rx},{repeat}\n", 1e3 / ns);
        }
        std::fs::write(&path, s).with_context(|| format!("writing {path}"))?;
    }
    drop(m);
    Ok(())
}
