//! Packet fixtures: the XDP program run through BPF_PROG_TEST_RUN on frames
//! built with etherparse, in a namespace whose FIB and neighbour table the
//! program's `bpf_fib_lookup` consults.
//!
//! Every fixture gives its input frame, the configuration it is loaded with,
//! the verdict, the output frame (or "unchanged") and the one counter that
//! must move. Output frames are compared in full with frames built by
//! etherparse, and their checksums are checked again by an independent
//! RFC 1071 implementation below.

mod common;

use std::mem::MaybeUninit;
use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpFragOffset, IpHeaders, Ipv4Header,
    Ipv4Options, PacketBuilder, TcpHeader, TcpOptionElement, VlanId,
};
use libbpf_rs::{MapCore, ProgramInput};

use lb::config::Config;
use lb::netns::NetnsGuard;
use lb::skel::lb::LbSkel;
use lb::stats;

use common::Netns;

// XDP verdicts (enum xdp_action).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const ETH_HLEN: usize = 14;

// Addresses of the test namespace: eth0 is the LB's interface.
const LB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);
/// On the link, but with no neighbour entry.
const BACKEND_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 13);
/// Outside every route of the namespace (it has no default route).
const BACKEND_UNROUTED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// Neither client nor backend.
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 50);
/// On the link, not the LB.
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 99);

// MACs, deliberately unrelated to the addresses.
const ETH0_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe0, 0x01];
const ETH1_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe1, 0x01];
/// Source MAC of incoming frames (the previous hop).
const PEER_MAC: [u8; 6] = [0x02, 0x77, 0x19, 0xa3, 0x5e, 0x08];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x1e, 0x77, 0x01, 0x9a];
const BACKEND_A_MAC: [u8; 6] = [0x02, 0xaa, 0x31, 0x5c, 0x07, 0xe4];
const BACKEND_B_MAC: [u8; 6] = [0x02, 0xbb, 0x9d, 0x42, 0x6f, 0x10];

const HTTP_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The neighbour entries the namespace holds.
fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    match ip {
        CLIENT => CLIENT_MAC,
        BACKEND_A => BACKEND_A_MAC,
        BACKEND_B => BACKEND_B_MAC,
        _ => panic!("no neighbour entry for {ip}"),
    }
}

// ---------------------------------------------------------------------------
// The namespace and the program.

/// A namespace with eth0 (veth, peer eth1) = 10.200.0.2/24, forwarding on,
/// and permanent neighbours for the client and backends a and b.
struct Lab {
    ns: Netns,
}

impl Lab {
    fn new() -> Self {
        let ns = Netns::new("lbp");
        let (eth0, eth1) = (mac_str(&ETH0_MAC), mac_str(&ETH1_MAC));
        ns.ip(&[
            "link", "add", "name", "eth0", "address", &eth0, "type", "veth", "peer", "name",
            "eth1", "address", &eth1,
        ]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "set", "eth1", "up"]);
        ns.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.exec("sysctl", &["-qw", "net.ipv4.conf.eth0.forwarding=1"]);
        for ip in [CLIENT, BACKEND_A, BACKEND_B] {
            let (ip, mac) = (ip.to_string(), mac_str(&mac_of(ip)));
            ns.ip(&[
                "neigh",
                "add",
                &ip,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        Self { ns }
    }

    /// Moves the calling thread into the namespace; returns eth0's ifindex.
    fn enter(&self) -> (NetnsGuard, u32) {
        let guard = NetnsGuard::enter(&self.ns.name).expect("entering the test namespace");
        let ifindex = lb::net::ifindex("eth0").expect("eth0 in the test namespace");
        (guard, ifindex)
    }
}

/// The configurations fixtures are loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cfg {
    /// Backends a and b, every port.
    Two,
    /// Backends a and b, port 80 only.
    Port80,
    /// One backend without a neighbour entry.
    Unresolved,
    /// One backend without a route.
    Unrouted,
}

impl Cfg {
    fn config(self) -> Config {
        let (backends, port) = match self {
            Cfg::Two => (vec![BACKEND_A, BACKEND_B], None),
            Cfg::Port80 => (vec![BACKEND_A, BACKEND_B], Some(80)),
            Cfg::Unresolved => (vec![BACKEND_UNRESOLVED], None),
            Cfg::Unrouted => (vec![BACKEND_UNROUTED], None),
        };
        let cfg = Config {
            lb: LB,
            client: CLIENT,
            backends,
            port,
        };
        cfg.validate().expect("fixture configuration");
        cfg
    }
}

/// What a fixture is loaded with.
#[derive(Debug, Clone, Copy)]
struct Setup {
    cfg: Cfg,
    skb_mode: bool,
}

const NATIVE: Setup = Setup {
    cfg: Cfg::Two,
    skb_mode: false,
};
const SKB: Setup = Setup {
    cfg: Cfg::Two,
    skb_mode: true,
};
const PORT80: Setup = Setup {
    cfg: Cfg::Port80,
    skb_mode: false,
};
const UNRESOLVED: Setup = Setup {
    cfg: Cfg::Unresolved,
    skb_mode: false,
};
const UNROUTED: Setup = Setup {
    cfg: Cfg::Unrouted,
    skb_mode: false,
};

/// Runs the program once on `frame` as if it arrived on `ifindex`; returns
/// the verdict and the frame as the program left it.
fn test_run(
    skel: &LbSkel<'_>,
    ifindex: u32,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), libbpf_rs::Error> {
    // The kernel wants at least an Ethernet header of input. A shorter frame
    // is given behind metadata (xdp_md.data = metadata length), which the
    // program's data..data_end does not cover. Kernels that count the
    // minimum after the metadata (6.18 does) refuse it with EINVAL.
    let meta = if frame.len() < ETH_HLEN {
        (ETH_HLEN - frame.len()).div_ceil(4) * 4
    } else {
        0
    };
    let mut data_in = vec![0u8; meta];
    data_in.extend_from_slice(frame);
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    //                 rx_queue_index, egress_ifindex }
    let md: [u32; 6] = [meta as u32, data_in.len() as u32, 0, ifindex, 0, 0];
    let mut ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; data_in.len() + 256];
    let input = ProgramInput {
        context_in: Some(&mut ctx),
        data_in: Some(&data_in),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let res = skel.progs.lb_xdp.test_run(input)?;
    let verdict = res.return_value;
    let len = res.data.as_ref().map_or(0, |d| d.len());
    assert!(
        len >= meta,
        "test_run returned {len} bytes, less than the metadata"
    );
    out.truncate(len);
    Ok((verdict, out.split_off(meta)))
}

fn load<'obj>(setup: Setup, storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>) -> LbSkel<'obj> {
    lb::loader::load(&setup.cfg.config(), setup.skb_mode, None, storage)
        .expect("loading the XDP program")
}

fn counters(skel: &LbSkel<'_>) -> Vec<stats::Counter> {
    stats::read(&skel.maps.stats).expect("reading the counters")
}

/// Checks that exactly `name` moved, by one packet of `bytes` bytes.
fn counter_delta(
    before: &[stats::Counter],
    after: &[stats::Counter],
    name: &str,
    bytes: usize,
) -> Result<(), String> {
    let idx = stats::index(name).ok_or_else(|| format!("unknown counter {name}"))?;
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let (dp, db) = (a.packets - b.packets, a.bytes - b.bytes);
        let want = if i == idx { (1, bytes as u64) } else { (0, 0) };
        if (dp, db) != want {
            return Err(format!(
                "counter {} moved by {dp} packets/{db} bytes, expected {}/{}",
                stats::NAMES[i],
                want.0,
                want.1
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Independent checksums (RFC 1071), not etherparse's.

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv4/TCP frame, located: offsets of the IP and TCP headers and the end
/// of the datagram. None for anything else, fragments and malformed frames.
struct Located {
    ip: usize,
    tcp: usize,
    end: usize,
}

fn locate(frame: &[u8]) -> Option<Located> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = ETH_HLEN;
    let (version, ihl) = (frame[ip] >> 4, usize::from(frame[ip] & 0x0f) * 4);
    let tot_len = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
    let frag = u16::from_be_bytes([frame[ip + 6], frame[ip + 7]]) & 0x3fff;
    if version != 4 || ihl < 20 || tot_len < ihl || ip + tot_len > frame.len() {
        return None;
    }
    if frame[ip + 9] != 6 || frag != 0 || tot_len < ihl + 20 {
        return None;
    }
    Some(Located {
        ip,
        tcp: ip + ihl,
        end: ip + tot_len,
    })
}

/// The folded pseudo-header sum: what a CHECKSUM_PARTIAL packet carries.
fn pseudo_sum(frame: &[u8], at: &Located) -> u16 {
    let ip = &frame[at.ip..];
    let tcp_len = (at.end - at.tcp) as u32;
    fold(sum16(&ip[12..20]) + 6 + tcp_len)
}

/// Checks the IP header checksum and the TCP checksum (complete, or a partial
/// one if `partial`) of an IPv4/TCP frame. Ok(false): not such a frame.
fn verify_checksums(frame: &[u8], partial: bool) -> Result<bool, String> {
    let Some(at) = locate(frame) else {
        return Ok(false);
    };
    let ip_sum = fold(sum16(&frame[at.ip..at.tcp]));
    if ip_sum != 0xffff {
        return Err(format!("bad IP header checksum (sum {ip_sum:#06x})"));
    }
    let field = u16::from_be_bytes([frame[at.tcp + 16], frame[at.tcp + 17]]);
    let pseudo = pseudo_sum(frame, &at);
    if partial {
        if field != pseudo {
            return Err(format!(
                "TCP checksum field {field:#06x} is not the partial pseudo-header sum {pseudo:#06x}"
            ));
        }
    } else {
        let sum = fold(u32::from(pseudo) + sum16(&frame[at.tcp..at.end]));
        if sum != 0xffff {
            return Err(format!("bad TCP checksum {field:#06x} (sum {sum:#06x})"));
        }
    }
    Ok(true)
}

/// Replaces the TCP checksum with the folded pseudo-header sum, as Linux
/// leaves it for CHECKSUM_PARTIAL.
fn make_partial(mut frame: Vec<u8>) -> Vec<u8> {
    let at = locate(&frame).expect("an IPv4/TCP frame");
    let pseudo = pseudo_sum(&frame, &at);
    frame[at.tcp + 16..at.tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
    frame
}

/// Recomputes the IP header checksum after a deliberate edit.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let hdr = ETH_HLEN..ETH_HLEN + ihl.max(20);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let csum = !fold(sum16(&frame[hdr]));
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&csum.to_be_bytes());
}

/// Recomputes the TCP checksum (over the datagram as its total length says)
/// after a deliberate edit, so that only the edit is wrong with the frame.
fn fix_tcp_checksum(frame: &mut [u8]) {
    let at = locate(frame).expect("an IPv4/TCP frame");
    frame[at.tcp + 16..at.tcp + 18].fill(0);
    let sum = u32::from(pseudo_sum(frame, &at)) + sum16(&frame[at.tcp..at.end]);
    let csum = !fold(sum);
    frame[at.tcp + 16..at.tcp + 18].copy_from_slice(&csum.to_be_bytes());
}

fn set_tot_len(frame: &mut [u8], len: u16) {
    frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&len.to_be_bytes());
    fix_ip_checksum(frame);
}

// ---------------------------------------------------------------------------
// Frames.

/// An Ethernet/IPv4/TCP segment, built by etherparse.
#[derive(Debug, Clone)]
struct Tcp {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// Raw IPv4 options (a multiple of 4 bytes).
    ip_options: Vec<u8>,
    id: u16,
    more_fragments: bool,
    frag_offset: u16,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    psh: bool,
    tcp_options: Vec<TcpOptionElement>,
    payload: Vec<u8>,
    /// Ethernet padding: zeros up to this frame length.
    pad_to: usize,
}

impl Tcp {
    /// A SYN from `src:sport` to `dst:dport`, arriving from the previous hop.
    fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            smac: PEER_MAC,
            dmac: ETH0_MAC,
            src,
            dst,
            ip_options: Vec::new(),
            id: 0x1c46,
            more_fragments: false,
            frag_offset: 0,
            sport,
            dport,
            seq: 0x6b8b_4567,
            ack: None,
            syn: true,
            fin: false,
            psh: false,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            pad_to: 0,
        }
    }

    /// The same segment as an established-connection data segment.
    fn data(mut self, payload: &[u8]) -> Self {
        self.syn = false;
        self.psh = true;
        self.ack = Some(0x3243_f6a8);
        self.payload = payload.to_vec();
        self
    }

    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    /// The segment as the LB forwards it: new addresses, new MACs, the rest
    /// (options, payload, padding) as it was.
    fn readdressed(&self, src: Ipv4Addr, dst: Ipv4Addr, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        Self {
            src,
            dst,
            smac,
            dmac,
            ..self.clone()
        }
    }

    fn frame(&self) -> Vec<u8> {
        let fragment = self.more_fragments || self.frag_offset != 0;
        let ip = Ipv4Header {
            source: self.src.octets(),
            destination: self.dst.octets(),
            time_to_live: 64,
            identification: self.id,
            dont_fragment: !fragment,
            more_fragments: self.more_fragments,
            fragment_offset: IpFragOffset::try_new(self.frag_offset).unwrap(),
            options: Ipv4Options::try_from(&self.ip_options[..]).unwrap(),
            ..Default::default()
        };
        let mut tcp = TcpHeader::new(self.sport, self.dport, self.seq, 64240);
        tcp.syn = self.syn;
        tcp.fin = self.fin;
        tcp.psh = self.psh;
        if let Some(ack) = self.ack {
            tcp.ack = true;
            tcp.acknowledgment_number = ack;
        }
        tcp.set_options(&self.tcp_options).unwrap();
        let mut out = Vec::new();
        PacketBuilder::ethernet2(self.smac, self.dmac)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .tcp_header(tcp)
            .write(&mut out, &self.payload)
            .unwrap();
        if out.len() < self.pad_to {
            out.resize(self.pad_to, 0);
        }
        out
    }
}

fn arp_request() -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &CLIENT.octets(),
        &[0; 6],
        &LB.octets(),
    )
    .unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut out)
        .unwrap();
    out
}

fn ipv6_syn() -> Vec<u8> {
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, ETH0_MAC)
        .ipv6(src, dst, 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn vlan_syn() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, ETH0_MAC)
        .single_vlan(VlanId::try_new(100).unwrap())
        .ipv4(CLIENT.octets(), LB.octets(), 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn icmp_echo() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, ETH0_MAC)
        .ipv4(CLIENT.octets(), LB.octets(), 64)
        .icmpv4_echo_request(0x4242, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

fn udp_to_lb() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, ETH0_MAC)
        .ipv4(CLIENT.octets(), LB.octets(), 64)
        .udp(40000, 80)
        .write(&mut out, b"not tcp")
        .unwrap();
    out
}

/// A plain client SYN to the LB, for the malformed variants.
fn client_syn() -> Tcp {
    Tcp::syn(CLIENT, 40000, LB, 80)
}

/// 8 bytes of IPv4 options: NOPs, then end of list (IHL 7).
const IP_OPTIONS: [u8; 8] = [1, 1, 1, 1, 1, 1, 1, 0];

fn tcp_options() -> Vec<TcpOptionElement> {
    vec![
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Timestamp(0x0102_0304, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ]
}

// ---------------------------------------------------------------------------
// The table.

/// Builds the expected frame for the backend the program picked.
type PerBackend = Box<dyn Fn(Ipv4Addr) -> Vec<u8>>;

enum Expect {
    /// The frame passes as it came.
    Unchanged,
    /// Exactly this frame.
    Frame(Vec<u8>),
    /// Rewritten to one of the configured backends (whichever the flow
    /// hashes to), as built by the closure for that backend.
    AnyBackend(PerBackend),
}

struct Fixture {
    name: &'static str,
    setup: Setup,
    input: Vec<u8>,
    verdict: u32,
    output: Expect,
    counter: &'static str,
    /// The TCP checksum of the output is a partial (pseudo-header) one.
    partial: bool,
}

/// Client -> LB, forwarded to a backend from eth0 to the backend's MAC.
fn to_backend(name: &'static str, setup: Setup, seg: Tcp) -> Fixture {
    let input = seg.frame();
    Fixture {
        name,
        setup,
        input,
        verdict: XDP_TX,
        output: Expect::AnyBackend(Box::new(move |b| {
            seg.readdressed(LB, b, ETH0_MAC, mac_of(b)).frame()
        })),
        counter: "to_backend",
        partial: false,
    }
}

/// Backend -> LB, forwarded to the client.
fn to_client(name: &'static str, setup: Setup, seg: Tcp) -> Fixture {
    Fixture {
        name,
        setup,
        input: seg.frame(),
        verdict: XDP_TX,
        output: Expect::Frame(seg.readdressed(LB, CLIENT, ETH0_MAC, CLIENT_MAC).frame()),
        counter: "to_client",
        partial: false,
    }
}

/// Passed untouched, counted under `counter`.
fn passes(name: &'static str, setup: Setup, input: Vec<u8>, counter: &'static str) -> Fixture {
    Fixture {
        name,
        setup,
        input,
        verdict: XDP_PASS,
        output: Expect::Unchanged,
        counter,
        partial: false,
    }
}

fn malformed(name: &'static str, input: Vec<u8>) -> Fixture {
    passes(name, NATIVE, input, "pass_malformed")
}

fn fragment(name: &'static str, seg: Tcp) -> Fixture {
    Fixture {
        name,
        setup: NATIVE,
        input: seg.frame(),
        verdict: XDP_DROP,
        output: Expect::Unchanged,
        counter: "drop_fragment",
        partial: false,
    }
}

fn fixtures() -> Vec<Fixture> {
    let mut f = vec![
        // --- balanced traffic --------------------------------------------
        to_backend(
            "client SYN -> backend",
            NATIVE,
            Tcp::syn(CLIENT, 40000, LB, 80),
        ),
        to_backend(
            "client data segment with payload -> backend",
            NATIVE,
            Tcp::syn(CLIENT, 40000, LB, 80).data(HTTP_GET),
        ),
        to_backend(
            "client FIN -> backend",
            NATIVE,
            Tcp::syn(CLIENT, 40002, LB, 443)
                .data(&[])
                .with(|t| t.fin = true),
        ),
        to_client(
            "backend a SYN-ACK -> client",
            NATIVE,
            Tcp::syn(BACKEND_A, 80, LB, 40000).with(|t| t.ack = Some(0x6b8b_4568)),
        ),
        to_client(
            "backend b reply with payload -> client",
            NATIVE,
            Tcp::syn(BACKEND_B, 80, LB, 40000).data(HTTP_OK),
        ),
        to_backend(
            "IP options (IHL 7, NOP/EOL) client -> backend",
            NATIVE,
            Tcp::syn(CLIENT, 40004, LB, 80)
                .data(HTTP_GET)
                .with(|t| t.ip_options = IP_OPTIONS.to_vec()),
        ),
        to_client(
            "IP options (IHL 7, NOP/EOL) backend -> client",
            NATIVE,
            Tcp::syn(BACKEND_A, 80, LB, 40004)
                .data(HTTP_OK)
                .with(|t| t.ip_options = IP_OPTIONS.to_vec()),
        ),
        to_backend(
            "TCP options (MSS, SACK-perm, TS, NOP, WS) client -> backend",
            NATIVE,
            Tcp::syn(CLIENT, 40006, LB, 80).with(|t| t.tcp_options = tcp_options()),
        ),
        to_client(
            "TCP options backend -> client",
            NATIVE,
            Tcp::syn(BACKEND_B, 80, LB, 40006).with(|t| {
                t.ack = Some(1);
                t.tcp_options = tcp_options();
            }),
        ),
        to_backend(
            "IP and TCP options and payload client -> backend",
            NATIVE,
            Tcp::syn(CLIENT, 40008, LB, 80).data(HTTP_GET).with(|t| {
                t.ip_options = IP_OPTIONS.to_vec();
                t.tcp_options = vec![TcpOptionElement::Timestamp(7, 9)];
            }),
        ),
        to_backend(
            "short SYN with Ethernet padding to 60 bytes: rewritten, padding kept",
            NATIVE,
            Tcp::syn(CLIENT, 40010, LB, 80).with(|t| t.pad_to = 60),
        ),
        to_client(
            "short backend ACK with Ethernet padding: rewritten, padding kept",
            NATIVE,
            Tcp::syn(BACKEND_A, 80, LB, 40010)
                .data(&[])
                .with(|t| t.pad_to = 60),
        ),
        // --- port filter ---------------------------------------------------
        to_backend(
            "port 80 set: client -> LB:80 balanced",
            PORT80,
            Tcp::syn(CLIENT, 40000, LB, 80),
        ),
        passes(
            "port 80 set: client -> LB:8080 passes",
            PORT80,
            Tcp::syn(CLIENT, 40000, LB, 8080).frame(),
            "pass_not_ours",
        ),
        to_client(
            "port 80 set: backend:80 -> client",
            PORT80,
            Tcp::syn(BACKEND_A, 80, LB, 40000).data(HTTP_OK),
        ),
        passes(
            "port 80 set: backend:8080 -> LB passes",
            PORT80,
            Tcp::syn(BACKEND_A, 8080, LB, 40000).data(HTTP_OK).frame(),
            "pass_not_ours",
        ),
        // --- not IPv4 / not TCP / not ours ----------------------------------
        passes("ARP request", NATIVE, arp_request(), "pass_not_ipv4"),
        passes("IPv6 TCP SYN", NATIVE, ipv6_syn(), "pass_not_ipv4"),
        passes(
            "VLAN-tagged client SYN to LB",
            NATIVE,
            vlan_syn(),
            "pass_not_ipv4",
        ),
        passes("ICMP echo to LB", NATIVE, icmp_echo(), "pass_not_tcp"),
        passes("UDP to LB", NATIVE, udp_to_lb(), "pass_not_tcp"),
        passes(
            "client TCP to another address",
            NATIVE,
            Tcp::syn(CLIENT, 40000, OTHER_HOST, 80).frame(),
            "pass_not_ours",
        ),
        passes(
            "TCP from a stranger to LB",
            NATIVE,
            Tcp::syn(STRANGER, 40000, LB, 80).frame(),
            "pass_not_ours",
        ),
        passes(
            "TCP from the LB to a backend",
            NATIVE,
            Tcp::syn(LB, 40000, BACKEND_A, 80).frame(),
            "pass_not_ours",
        ),
        passes(
            "fragment from a stranger to LB (not ours first)",
            NATIVE,
            Tcp::syn(STRANGER, 40000, LB, 80)
                .with(|t| t.more_fragments = true)
                .frame(),
            "pass_not_ours",
        ),
        // --- malformed -------------------------------------------------------
        malformed("truncated in the Ethernet header (10 bytes)", {
            let mut f = client_syn().frame();
            f.truncate(10);
            f
        }),
        malformed("Ethernet header only", {
            let mut f = client_syn().frame();
            f.truncate(ETH_HLEN);
            f
        }),
        malformed("truncated in the IP header", {
            let mut f = client_syn().frame();
            f.truncate(ETH_HLEN + 12);
            f
        }),
        malformed("IHL 4", {
            let mut f = client_syn().frame();
            f[ETH_HLEN] = 0x44;
            fix_ip_checksum(&mut f);
            f
        }),
        malformed("IP version 6 in an IPv4 frame", {
            let mut f = client_syn().frame();
            f[ETH_HLEN] = 0x65;
            fix_ip_checksum(&mut f);
            f
        }),
        malformed("IHL 7 but the options are cut off", {
            let mut f = client_syn()
                .with(|t| t.ip_options = IP_OPTIONS.to_vec())
                .frame();
            f.truncate(ETH_HLEN + 24);
            f
        }),
        malformed("IP total length beyond the frame", {
            let mut f = client_syn().frame();
            let tot = (f.len() - ETH_HLEN + 20) as u16;
            set_tot_len(&mut f, tot);
            f
        }),
        malformed("IP total length below the header length", {
            let mut f = client_syn().frame();
            set_tot_len(&mut f, 16);
            f
        }),
        malformed("truncated TCP header", {
            let mut f = client_syn().frame();
            set_tot_len(&mut f, 30);
            f.truncate(ETH_HLEN + 30);
            f
        }),
        malformed("TCP header beyond the IP total length (rest is padding)", {
            let mut f = client_syn().frame();
            set_tot_len(&mut f, 30);
            f
        }),
        malformed("TCP data offset 4", {
            let mut f = client_syn().frame();
            let b = &mut f[ETH_HLEN + 20 + 12];
            *b = (*b & 0x0f) | 0x40;
            fix_tcp_checksum(&mut f);
            f
        }),
        malformed("TCP data offset 15 beyond the datagram", {
            let mut f = client_syn().data(HTTP_GET).frame();
            let b = &mut f[ETH_HLEN + 20 + 12];
            *b = (*b & 0x0f) | 0xf0;
            fix_tcp_checksum(&mut f);
            f
        }),
        malformed("TCP options cut off by the frame", {
            let mut f = client_syn().with(|t| t.tcp_options = tcp_options()).frame();
            let len = f.len() - 8;
            set_tot_len(&mut f, (len - ETH_HLEN) as u16);
            f.truncate(len);
            fix_tcp_checksum(&mut f);
            f
        }),
        // --- fragments -------------------------------------------------------
        fragment(
            "first fragment (MF) client -> LB",
            client_syn()
                .data(HTTP_GET)
                .with(|t| t.more_fragments = true),
        ),
        fragment(
            "later fragment (offset 185) client -> LB",
            client_syn().data(HTTP_GET).with(|t| t.frag_offset = 185),
        ),
        fragment(
            "last fragment (offset, no MF) backend -> LB",
            Tcp::syn(BACKEND_A, 80, LB, 40000)
                .data(HTTP_OK)
                .with(|t| t.frag_offset = 3),
        ),
        // --- no neighbour / no route ----------------------------------------
        Fixture {
            name: "backend without a neighbour entry: rewritten, MACs kept, kernel forwards",
            setup: UNRESOLVED,
            input: client_syn().data(HTTP_GET).frame(),
            verdict: XDP_PASS,
            output: Expect::Frame(
                client_syn()
                    .data(HTTP_GET)
                    .readdressed(LB, BACKEND_UNRESOLVED, PEER_MAC, ETH0_MAC)
                    .frame(),
            ),
            counter: "pass_no_neigh",
            partial: false,
        },
        passes(
            "backend without a route: untouched",
            UNROUTED,
            client_syn().data(HTTP_GET).frame(),
            "pass_no_route",
        ),
        to_client(
            "backend without a route configured: its replies still reach the client",
            UNROUTED,
            Tcp::syn(BACKEND_UNROUTED, 80, LB, 40000).data(HTTP_OK),
        ),
        // --- skb mode --------------------------------------------------------
        to_backend(
            "skb mode, complete checksum client -> backend stays complete",
            SKB,
            Tcp::syn(CLIENT, 40012, LB, 80).data(HTTP_GET),
        ),
        to_client(
            "skb mode, complete checksum backend -> client stays complete",
            SKB,
            Tcp::syn(BACKEND_B, 80, LB, 40012).data(HTTP_OK),
        ),
    ];

    // CHECKSUM_PARTIAL segments: the field holds the folded pseudo-header sum
    // and must hold the one of the rewritten addresses afterwards.
    let seg = Tcp::syn(CLIENT, 40014, LB, 80).data(HTTP_GET);
    let input = make_partial(seg.frame());
    f.push(Fixture {
        name: "skb mode, partial checksum client -> backend stays partial",
        setup: SKB,
        input,
        verdict: XDP_TX,
        output: Expect::AnyBackend(Box::new(move |b| {
            make_partial(seg.readdressed(LB, b, ETH0_MAC, mac_of(b)).frame())
        })),
        counter: "to_backend",
        partial: true,
    });
    let seg = Tcp::syn(CLIENT, 40016, LB, 80)
        .data(HTTP_GET)
        .with(|t| t.ip_options = IP_OPTIONS.to_vec());
    let input = make_partial(seg.frame());
    f.push(Fixture {
        name: "skb mode, partial checksum with IP options client -> backend stays partial",
        setup: SKB,
        input,
        verdict: XDP_TX,
        output: Expect::AnyBackend(Box::new(move |b| {
            make_partial(seg.readdressed(LB, b, ETH0_MAC, mac_of(b)).frame())
        })),
        counter: "to_backend",
        partial: true,
    });
    let seg = Tcp::syn(BACKEND_A, 80, LB, 40014).data(HTTP_OK);
    f.push(Fixture {
        name: "skb mode, partial checksum backend -> client stays partial",
        setup: SKB,
        input: make_partial(seg.frame()),
        verdict: XDP_TX,
        output: Expect::Frame(make_partial(
            seg.readdressed(LB, CLIENT, ETH0_MAC, CLIENT_MAC).frame(),
        )),
        counter: "to_client",
        partial: true,
    });
    f
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs one fixture on a freshly loaded program.
fn check(fx: &Fixture, ifindex: u32) -> Result<(), String> {
    // Sanity of the fixture itself: a well-formed input has right checksums.
    verify_checksums(&fx.input, fx.partial).map_err(|e| format!("input: {e}"))?;
    if fx.partial {
        let at = locate(&fx.input).expect("partial fixtures are IPv4/TCP");
        let field = u16::from_be_bytes([fx.input[at.tcp + 16], fx.input[at.tcp + 17]]);
        assert_eq!(field, pseudo_sum(&fx.input, &at));
    } else if let (true, Some(at)) = (fx.setup.skb_mode, locate(&fx.input)) {
        // A complete checksum that happens to equal the pseudo-header sum
        // would be taken for a partial one: not what these fixtures test.
        let field = u16::from_be_bytes([fx.input[at.tcp + 16], fx.input[at.tcp + 17]]);
        assert_ne!(field, pseudo_sum(&fx.input, &at), "{}", fx.name);
    }

    let mut storage = MaybeUninit::uninit();
    let skel = load(fx.setup, &mut storage);
    let before = counters(&skel);
    let (verdict, out) = match test_run(&skel, ifindex, &fx.input) {
        Ok(r) => r,
        Err(e) if fx.input.len() < ETH_HLEN && e.kind() == libbpf_rs::ErrorKind::InvalidInput => {
            eprintln!(
                "NOTE {}: this kernel's BPF_PROG_TEST_RUN refuses frames shorter than \
                 an Ethernet header ({e}); not run",
                fx.name
            );
            return Ok(());
        }
        Err(e) => return Err(format!("BPF_PROG_TEST_RUN: {e}")),
    };
    let after = counters(&skel);

    if verdict != fx.verdict {
        return Err(format!("verdict {verdict}, expected {}", fx.verdict));
    }
    let expected = match &fx.output {
        Expect::Unchanged => fx.input.clone(),
        Expect::Frame(f) => f.clone(),
        Expect::AnyBackend(build) => {
            let at = locate(&out).ok_or("output is not an IPv4/TCP frame")?;
            let d = &out[at.ip + 16..at.ip + 20];
            let dst = Ipv4Addr::new(d[0], d[1], d[2], d[3]);
            let backends = fx.setup.cfg.config().backends;
            if !backends.contains(&dst) {
                return Err(format!("sent to {dst}, not a backend of {backends:?}"));
            }
            build(dst)
        }
    };
    if out != expected {
        return Err(format!(
            "output frame differs\n   got {}\n  want {}",
            hex(&out),
            hex(&expected)
        ));
    }
    verify_checksums(&out, fx.partial).map_err(|e| format!("output: {e}"))?;
    counter_delta(&before, &after, fx.counter, fx.input.len())
}

#[test]
fn packet_fixtures() {
    if !common::root_or_skip("packet_fixtures") {
        return;
    }
    let lab = Lab::new();
    let (_guard, ifindex) = lab.enter();
    let fixtures = fixtures();
    let mut failures = Vec::new();
    for fx in &fixtures {
        if let Err(e) = check(fx, ifindex) {
            failures.push(format!("{}: {e}", fx.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

/// The backend a client segment went to, after checking the whole frame.
fn forward(skel: &LbSkel<'_>, ifindex: u32, seg: &Tcp) -> Ipv4Addr {
    let (verdict, out) = test_run(skel, ifindex, &seg.frame()).expect("BPF_PROG_TEST_RUN");
    assert_eq!(verdict, XDP_TX, "{seg:?}");
    let at = locate(&out).expect("an IPv4/TCP output");
    let d = &out[at.ip + 16..at.ip + 20];
    let dst = Ipv4Addr::new(d[0], d[1], d[2], d[3]);
    assert!(dst == BACKEND_A || dst == BACKEND_B, "sent to {dst}");
    assert_eq!(out, seg.readdressed(LB, dst, ETH0_MAC, mac_of(dst)).frame());
    verify_checksums(&out, false).expect("output checksums");
    dst
}

#[test]
fn flow_sticks_to_one_backend() {
    if !common::root_or_skip("flow_sticks_to_one_backend") {
        return;
    }
    let lab = Lab::new();
    let (_guard, ifindex) = lab.enter();
    let mut storage = MaybeUninit::uninit();
    let skel = load(NATIVE, &mut storage);
    let before = counters(&skel);
    let mut sent = 0;
    for sport in (50000..50040).step_by(2) {
        let syn = Tcp::syn(CLIENT, sport, LB, 80);
        let ack = syn.clone().data(&[]).with(|t| t.psh = false);
        let data = syn.clone().data(HTTP_GET);
        let fin = syn.clone().data(&[]).with(|t| t.fin = true);
        let first = forward(&skel, ifindex, &syn);
        for seg in [&ack, &data, &fin, &data, &ack] {
            assert_eq!(
                forward(&skel, ifindex, seg),
                first,
                "flow {CLIENT}:{sport} changed backend"
            );
        }
        sent += 6;
    }
    let after = counters(&skel);
    let i = stats::index("to_backend").unwrap();
    assert_eq!(after[i].packets - before[i].packets, sent);
}

#[test]
fn flows_spread_over_backends() {
    if !common::root_or_skip("flows_spread_over_backends") {
        return;
    }
    let lab = Lab::new();
    let (_guard, ifindex) = lab.enter();
    let mut storage = MaybeUninit::uninit();
    let skel = load(NATIVE, &mut storage);
    let flows = 200;
    let (mut a, mut b) = (0, 0);
    // Even source ports only, as connect() picks them.
    for sport in (40000..).step_by(2).take(flows) {
        match forward(&skel, ifindex, &Tcp::syn(CLIENT, sport, LB, 80)) {
            BACKEND_A => a += 1,
            _ => b += 1,
        }
    }
    let min = flows / 4;
    eprintln!("{flows} flows: {a} to {BACKEND_A}, {b} to {BACKEND_B}");
    assert!(
        a > min && b > min,
        "{flows} flows: {a} to {BACKEND_A}, {b} to {BACKEND_B}; each should get more than {min}"
    );
    let c = counters(&skel);
    assert_eq!(c[stats::index("to_backend").unwrap()].packets, flows as u64);
}

#[test]
fn stat_names_match_the_map() {
    if !common::root_or_skip("stat_names_match_the_map") {
        return;
    }
    let mut storage = MaybeUninit::uninit();
    let skel = load(NATIVE, &mut storage);
    assert_eq!(
        stats::NAMES.len(),
        skel.maps.stats.max_entries() as usize,
        "src/stats.rs NAMES and enum lb_stat (LB_STAT_MAX) disagree"
    );
    let info = skel.maps.stats.info().expect("stats map info");
    assert_eq!(info.info.max_entries as usize, stats::NAMES.len());
    for (i, n) in stats::NAMES.iter().enumerate() {
        assert_eq!(stats::index(n), Some(i), "duplicate counter name {n}");
    }
}
