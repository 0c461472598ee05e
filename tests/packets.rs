//! Packet fixtures for the full-NAT datapath: the XDP program run through
//! BPF_PROG_TEST_RUN on frames built with etherparse, in a namespace whose
//! FIB and neighbour table the program's `bpf_fib_lookup` consults, with
//! services, backends and the connection table in pinned maps managed
//! through `lb::service` and `lb::conntrack`, as the CLI does.
//!
//! Every packet a test sends is checked in full: the verdict, the output
//! frame (compared byte for byte with one built by etherparse), its IP and
//! L4 checksums (again, with the independent RFC 1071 code below) and the
//! counters: exactly the named ones move, by one packet of the frame's size.
//! A new flow also has both of its connection-table entries checked field by
//! field.

mod common;

use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    icmpv4, ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, Icmpv4Type,
    IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, PacketBuilder, TcpHeader,
    TcpOptionElement, VlanId,
};
use libbpf_rs::{MapCore, MapFlags, OpenObject, ProgramInput};

use lb::conntrack;
use lb::halfopen;
use lb::maps::{self, bytes, Flow, FlowKey, Maps};
use lb::netns::NetnsGuard;
use lb::service::{self, Proto, Service};
use lb::settings::Settings;
use lb::skel::lb::LbSkel;
use lb::stats;

use common::Netns;

// XDP verdicts (enum xdp_action).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const ETH_HLEN: usize = 14;
const TCP: u8 = 6;
const UDP: u8 = 17;

// Addresses of the test namespace: eth0 (10.200.0.2/24) and eth2
// (10.200.1.2/24) are the LB's interfaces.
const LB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const LB2: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// The services' addresses: nobody's interface address, so that a rewritten
/// source (VIP) and the SNAT source (LB) cannot be confused.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 101);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);
/// Behind eth2.
const BACKEND_C: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
/// On the link, but with no neighbour entry (until a test adds one).
const BACKEND_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 13);
/// Outside every route of the namespace (it has no default route).
const BACKEND_UNROUTED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// Neither client nor backend.
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 50);
/// On the link, not a VIP.
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 99);

// MACs, deliberately unrelated to the addresses.
const ETH0_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe0, 0x01];
const ETH1_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe1, 0x01];
const ETH2_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe2, 0x01];
const ETH3_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe3, 0x01];
/// Source MAC of the clients' frames (the previous hop, not the client's
/// neighbour entry: the way back must come from the frame).
const PEER_MAC: [u8; 6] = [0x02, 0x77, 0x19, 0xa3, 0x5e, 0x08];
/// Previous hop of the second client.
const PEER2_MAC: [u8; 6] = [0x02, 0x78, 0x2a, 0xb4, 0x6f, 0x19];
/// A MAC the LB answers to besides eth0's (a VRRP-style virtual MAC).
const ALIAS_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x2a];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x1e, 0x77, 0x01, 0x9a];
const CLIENT2_MAC: [u8; 6] = [0x02, 0xc2, 0x2e, 0x88, 0x02, 0xab];
const BACKEND_A_MAC: [u8; 6] = [0x02, 0xaa, 0x31, 0x5c, 0x07, 0xe4];
const BACKEND_B_MAC: [u8; 6] = [0x02, 0xbb, 0x9d, 0x42, 0x6f, 0x10];
const BACKEND_C_MAC: [u8; 6] = [0x02, 0xcc, 0x04, 0x17, 0x8e, 0x21];
const UNRESOLVED_MAC: [u8; 6] = [0x02, 0xdd, 0x55, 0x90, 0x13, 0x3c];

const HTTP_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const DNS_QUERY: &[u8] =
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02lb\x00\x00\x01\x00\x01";
const DNS_ANSWER: &[u8] =
    b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x02lb\x00\x00\x01\x00\x01";

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The neighbour entries the namespace holds (or, for the unresolved
/// backend, will hold once a test adds it).
fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    match ip {
        CLIENT => CLIENT_MAC,
        CLIENT2 => CLIENT2_MAC,
        BACKEND_A => BACKEND_A_MAC,
        BACKEND_B => BACKEND_B_MAC,
        BACKEND_C => BACKEND_C_MAC,
        BACKEND_UNRESOLVED => UNRESOLVED_MAC,
        _ => panic!("no neighbour entry for {ip}"),
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn must<T>(r: Result<T, String>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

// ---------------------------------------------------------------------------
// The namespace.

/// A namespace with two veth pairs: eth0 (peer eth1) = 10.200.0.2/24 and
/// eth2 (peer eth3) = 10.200.1.2/24, forwarding on, and permanent neighbours
/// for the clients and backends a and b on eth0, c on eth2.
struct Lab {
    ns: Netns,
}

/// Interface indexes of the LB's interfaces.
#[derive(Debug, Clone, Copy)]
struct Ifaces {
    eth0: u32,
    eth2: u32,
}

impl Lab {
    fn new() -> Self {
        let ns = Netns::new("lbp");
        for (a, b, amac, bmac) in [
            ("eth0", "eth1", ETH0_MAC, ETH1_MAC),
            ("eth2", "eth3", ETH2_MAC, ETH3_MAC),
        ] {
            let (amac, bmac) = (mac_str(&amac), mac_str(&bmac));
            ns.ip(&[
                "link", "add", "name", a, "address", &amac, "type", "veth", "peer", "name", b,
                "address", &bmac,
            ]);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "set", "eth1", "up"]);
        ns.ip(&["link", "set", "eth3", "up"]);
        ns.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
        ns.ip(&["addr", "add", "10.200.1.2/24", "dev", "eth2"]);
        for dev in ["eth0", "eth2"] {
            ns.ip(&["link", "set", dev, "up"]);
            ns.exec(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{dev}.forwarding=1")],
            );
        }
        let lab = Self { ns };
        for ip in [CLIENT, CLIENT2, BACKEND_A, BACKEND_B] {
            lab.neigh_add(ip, "eth0");
        }
        lab.neigh_add(BACKEND_C, "eth2");
        lab
    }

    fn neigh_add(&self, ip: Ipv4Addr, dev: &str) {
        let (ip_s, mac) = (ip.to_string(), mac_str(&mac_of(ip)));
        self.ns.ip(&[
            "neigh",
            "add",
            &ip_s,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) -> (NetnsGuard, Ifaces) {
        let guard = NetnsGuard::enter(&self.ns.name).expect("entering the test namespace");
        let ifs = Ifaces {
            eth0: lb::net::ifindex("eth0").expect("eth0 in the test namespace"),
            eth2: lb::net::ifindex("eth2").expect("eth2 in the test namespace"),
        };
        (guard, ifs)
    }
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

/// How the L4 checksum field of a frame is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Csum {
    /// A complete checksum (or, for UDP, 0: none).
    Complete,
    /// CHECKSUM_PARTIAL: the folded pseudo-header sum.
    Partial,
}

/// An IPv4 TCP or UDP frame, located: offsets of the IP and L4 headers and
/// the end of the datagram. None for anything else, fragments and malformed
/// frames.
struct Located {
    ip: usize,
    l4: usize,
    end: usize,
    proto: u8,
}

impl Located {
    /// Offset of the L4 checksum field.
    fn check(&self) -> usize {
        self.l4 + if self.proto == TCP { 16 } else { 6 }
    }
}

fn locate(frame: &[u8]) -> Option<Located> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = ETH_HLEN;
    let (version, ihl) = (frame[ip] >> 4, usize::from(frame[ip] & 0x0f) * 4);
    let tot_len = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
    let frag = u16::from_be_bytes([frame[ip + 6], frame[ip + 7]]) & 0x3fff;
    if version != 4 || ihl < 20 || tot_len < ihl || ip + tot_len > frame.len() || frag != 0 {
        return None;
    }
    let proto = frame[ip + 9];
    let min = match proto {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    if tot_len < ihl + min {
        return None;
    }
    Some(Located {
        ip,
        l4: ip + ihl,
        end: ip + tot_len,
        proto,
    })
}

/// The folded pseudo-header sum: what a CHECKSUM_PARTIAL packet carries.
fn pseudo_sum(frame: &[u8], at: &Located) -> u16 {
    let ip = &frame[at.ip..];
    let l4_len = (at.end - at.l4) as u32;
    fold(sum16(&ip[12..20]) + u32::from(at.proto) + l4_len)
}

fn l4_field(frame: &[u8], at: &Located) -> u16 {
    u16::from_be_bytes([frame[at.check()], frame[at.check() + 1]])
}

fn set_l4_field(frame: &mut [u8], at: &Located, v: u16) {
    frame[at.check()..at.check() + 2].copy_from_slice(&v.to_be_bytes());
}

/// The one's complement of the sum over pseudo-header and segment with the
/// checksum field taken as 0: the checksum before UDP's "0 is sent as
/// 0xffff" rule.
fn raw_l4_checksum(frame: &[u8], at: &Located) -> u16 {
    let mut seg = frame[at.l4..at.end].to_vec();
    let c = at.check() - at.l4;
    seg[c..c + 2].fill(0);
    !fold(u32::from(pseudo_sum(frame, at)) + sum16(&seg))
}

/// The complete checksum the frame's L4 header should carry.
fn l4_checksum(frame: &[u8], at: &Located) -> u16 {
    match raw_l4_checksum(frame, at) {
        0 if at.proto == UDP => 0xffff,
        c => c,
    }
}

/// Checks the IP header checksum and the L4 checksum (complete, or a partial
/// one) of an IPv4 TCP/UDP frame. Ok(false): not such a frame.
fn verify_checksums(frame: &[u8], csum: Csum) -> Result<bool, String> {
    let Some(at) = locate(frame) else {
        return Ok(false);
    };
    let ip_sum = fold(sum16(&frame[at.ip..at.l4]));
    if ip_sum != 0xffff {
        return Err(format!("bad IP header checksum (sum {ip_sum:#06x})"));
    }
    let field = l4_field(frame, &at);
    let pseudo = pseudo_sum(frame, &at);
    if at.proto == UDP && field == 0 {
        return Ok(true); // no checksum
    }
    match csum {
        Csum::Partial if field != pseudo => Err(format!(
            "L4 checksum field {field:#06x} is not the partial pseudo-header sum {pseudo:#06x}"
        )),
        Csum::Partial => Ok(true),
        Csum::Complete => {
            let sum = fold(u32::from(pseudo) + sum16(&frame[at.l4..at.end]));
            if sum != 0xffff {
                return Err(format!("bad L4 checksum {field:#06x} (sum {sum:#06x})"));
            }
            if at.proto == UDP && field != l4_checksum(frame, &at) {
                return Err(format!("UDP checksum {field:#06x} where 0xffff is due"));
            }
            Ok(true)
        }
    }
}

/// Replaces the L4 checksum with the folded pseudo-header sum, as Linux
/// leaves it for CHECKSUM_PARTIAL.
fn make_partial(mut frame: Vec<u8>) -> Vec<u8> {
    let at = locate(&frame).expect("an IPv4 TCP/UDP frame");
    let pseudo = pseudo_sum(&frame, &at);
    set_l4_field(&mut frame, &at, pseudo);
    frame
}

fn with_csum(frame: Vec<u8>, csum: Csum) -> Vec<u8> {
    match csum {
        Csum::Complete => frame,
        Csum::Partial => make_partial(frame),
    }
}

/// Recomputes the IP header checksum after a deliberate edit.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let hdr = ETH_HLEN..ETH_HLEN + ihl.max(20);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let csum = !fold(sum16(&frame[hdr]));
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&csum.to_be_bytes());
}

/// Recomputes the L4 checksum (over the datagram as its total length says)
/// after a deliberate edit, so that only the edit is wrong with the frame.
fn fix_l4_checksum(frame: &mut [u8]) {
    let at = locate(frame).expect("an IPv4 TCP/UDP frame");
    let c = l4_checksum(frame, &at);
    set_l4_field(frame, &at, c);
}

fn set_tot_len(frame: &mut [u8], len: u16) {
    frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&len.to_be_bytes());
    fix_ip_checksum(frame);
}

/// Source and destination of a located frame.
fn endpoints(frame: &[u8], at: &Located) -> (SocketAddrV4, SocketAddrV4) {
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (
        sa(ip(at.ip + 12), port(at.l4)),
        sa(ip(at.ip + 16), port(at.l4 + 2)),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn same_frame(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "output frame differs from byte {at} on ({} vs {} bytes)\n   got {}\n  want {}",
        got.len(),
        want.len(),
        hex(got),
        hex(want)
    ))
}

// ---------------------------------------------------------------------------
// Frames.

/// An Ethernet/IPv4/TCP or UDP packet, built by etherparse.
#[derive(Debug, Clone)]
struct Seg {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// Raw IPv4 options (a multiple of 4 bytes).
    ip_options: Vec<u8>,
    id: u16,
    more_fragments: bool,
    frag_offset: u16,
    udp: bool,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    psh: bool,
    tcp_options: Vec<TcpOptionElement>,
    /// UDP sent without a checksum (field 0).
    no_checksum: bool,
    payload: Vec<u8>,
    /// Ethernet padding: zeros up to this frame length.
    pad_to: usize,
}

impl Seg {
    /// A TCP segment without flags from `src:sport` to `dst:dport`, arriving
    /// on eth0 from the previous hop.
    fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            smac: PEER_MAC,
            dmac: ETH0_MAC,
            src,
            dst,
            ip_options: Vec::new(),
            id: 0x1c46,
            more_fragments: false,
            frag_offset: 0,
            udp: false,
            sport,
            dport,
            seq: 0x6b8b_4567,
            ack: None,
            syn: false,
            fin: false,
            rst: false,
            psh: false,
            tcp_options: Vec::new(),
            no_checksum: false,
            payload: Vec::new(),
            pad_to: 0,
        }
    }

    /// A SYN.
    fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            syn: true,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// A UDP datagram.
    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Self {
        Self {
            udp: true,
            payload: payload.to_vec(),
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// The same connection's SYN-ACK.
    fn synack(mut self) -> Self {
        self.syn = true;
        self.ack = Some(0x6b8b_4568);
        self
    }

    /// The same connection's pure ACK.
    fn ack(mut self) -> Self {
        self.syn = false;
        self.psh = false;
        self.ack = Some(0x3243_f6a8);
        self.payload.clear();
        self
    }

    /// The same connection's data segment.
    fn data(mut self, payload: &[u8]) -> Self {
        self = self.ack();
        self.psh = true;
        self.payload = payload.to_vec();
        self
    }

    /// The same connection's FIN-ACK.
    fn fin(self) -> Self {
        Self {
            fin: true,
            ..self.ack()
        }
    }

    /// The same connection's RST-ACK.
    fn rst(self) -> Self {
        Self {
            rst: true,
            ..self.ack()
        }
    }

    fn macs(mut self, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        self.smac = smac;
        self.dmac = dmac;
        self
    }

    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    /// The packet as the LB sends it on: new addresses, ports and MACs, the
    /// rest (options, payload, padding) as it was.
    fn nat(&self, src: SocketAddrV4, dst: SocketAddrV4, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        Self {
            src: *src.ip(),
            sport: src.port(),
            dst: *dst.ip(),
            dport: dst.port(),
            smac,
            dmac,
            ..self.clone()
        }
    }

    fn proto(&self) -> u8 {
        if self.udp {
            UDP
        } else {
            TCP
        }
    }

    /// Its connection-table key.
    fn key(&self) -> FlowKey {
        flow_key(
            sa(self.src, self.sport),
            sa(self.dst, self.dport),
            self.proto(),
        )
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
        let builder = PacketBuilder::ethernet2(self.smac, self.dmac)
            .ip(IpHeaders::Ipv4(ip, Default::default()));
        let mut out = Vec::new();
        if self.udp {
            builder
                .udp(self.sport, self.dport)
                .write(&mut out, &self.payload)
                .unwrap();
            if self.no_checksum {
                let at = ETH_HLEN + 20 + self.ip_options.len() + 6;
                out[at..at + 2].fill(0);
            }
        } else {
            let mut tcp = TcpHeader::new(self.sport, self.dport, self.seq, 64240);
            tcp.syn = self.syn;
            tcp.fin = self.fin;
            tcp.rst = self.rst;
            tcp.psh = self.psh;
            if let Some(ack) = self.ack {
                tcp.ack = true;
                tcp.acknowledgment_number = ack;
            }
            tcp.set_options(&self.tcp_options).unwrap();
            builder
                .tcp_header(tcp)
                .write(&mut out, &self.payload)
                .unwrap();
        }
        if out.len() < self.pad_to {
            out.resize(self.pad_to, 0);
        }
        out
    }
}

fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        saddr: maps::ip_to_be(*src.ip()),
        daddr: maps::ip_to_be(*dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        pad: [0; 3],
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
        &VIP.octets(),
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
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];
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
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn icmp_echo() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, ETH0_MAC)
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .icmpv4_echo_request(0x4242, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

/// An IPv4 packet of another protocol (SCTP, GRE, ...) to the VIP.
fn other_proto(proto: u8, payload: &[u8]) -> Vec<u8> {
    let ip = Ipv4Header::new(
        payload.len() as u16,
        64,
        IpNumber(proto),
        CLIENT.octets(),
        VIP.octets(),
    )
    .unwrap();
    let mut out = Vec::new();
    Ethernet2Header {
        source: PEER_MAC,
        destination: ETH0_MAC,
        ether_type: EtherType::IPV4,
    }
    .write(&mut out)
    .unwrap();
    ip.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    fix_ip_checksum(&mut out);
    out
}

/// A plain client SYN to the VIP, for the malformed variants.
fn client_syn() -> Seg {
    Seg::syn(CLIENT, 40000, VIP, 80)
}

/// A plain client DNS query to the VIP.
fn client_udp() -> Seg {
    Seg::udp(CLIENT, 40000, VIP, 53, DNS_QUERY)
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

/// The two-byte word that, appended to `base`, makes `out(payload)`'s
/// complete L4 checksum compute to 0 (before UDP's 0 -> 0xffff rule).
/// Searched, and checked with the code above, not solved.
fn payload_for_zero_checksum(base: &[u8], out: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    (0..=u16::MAX)
        .map(|w| [base, &w.to_be_bytes()].concat())
        .find(|p| {
            let f = out(p);
            let at = locate(&f).expect("an IPv4 TCP/UDP frame");
            raw_l4_checksum(&f, &at) == 0
        })
        .expect("some payload gives a zero checksum")
}

// ---------------------------------------------------------------------------
// An lb instance: the program loaded with its maps pinned, not attached.

/// Small settings for fixtures.
fn settings() -> Settings {
    Settings {
        max_flows: 4096,
        ..Default::default()
    }
}

/// Settings with a NAT range of one port.
fn one_nat_port() -> Settings {
    Settings {
        nat_ports: vec![lb::settings::PortRange {
            lo: 61000,
            hi: 61000,
        }],
        ..settings()
    }
}

fn two_nat_ports() -> Settings {
    Settings {
        nat_ports: vec![lb::settings::PortRange {
            lo: 61000,
            hi: 61001,
        }],
        ..settings()
    }
}

fn verdict_name(v: u32) -> String {
    match v {
        0 => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        v => format!("verdict {v}"),
    }
}

/// A connection as the tests follow it.
#[derive(Debug, Clone)]
struct Conn {
    /// The client's first packet: its MACs are the way back.
    client: Seg,
    /// The backend (its real port).
    backend: SocketAddrV4,
    /// The LB's source address and NAT port towards the backend.
    nat: SocketAddrV4,
    /// The interface towards the backend.
    egress: u32,
    /// Its MAC.
    lb_mac: [u8; 6],
}

impl Conn {
    fn client_addr(&self) -> SocketAddrV4 {
        sa(self.client.src, self.client.sport)
    }

    fn vip(&self) -> SocketAddrV4 {
        sa(self.client.dst, self.client.dport)
    }

    /// A packet from the backend to the LB's NAT port, as it arrives.
    fn reply(&self) -> Seg {
        let (b, n) = (self.backend, self.nat);
        let seg = if self.client.udp {
            Seg::udp(*b.ip(), b.port(), *n.ip(), n.port(), b"")
        } else {
            Seg::tcp(*b.ip(), b.port(), *n.ip(), n.port())
        };
        seg.macs(mac_of(*b.ip()), self.lb_mac)
    }

    /// The key of the way back.
    fn reverse_key(&self) -> FlowKey {
        flow_key(self.backend, self.nat, self.client.proto())
    }
}

struct Lb<'obj> {
    skel: LbSkel<'obj>,
    m: Maps,
    settings: Settings,
    ifs: Ifaces,
    _pins: common::PinDir,
}

impl<'obj> Lb<'obj> {
    fn new(
        ifs: Ifaces,
        settings: Settings,
        skb_mode: bool,
        storage: &'obj mut MaybeUninit<OpenObject>,
    ) -> Self {
        let pins = common::PinDir::new("lbp");
        std::fs::create_dir(&pins.path).expect("creating the pin directory");
        let bp = lb::bpffs::PinDir::new(&pins.path);
        let mut skel =
            lb::loader::load(&settings, skb_mode, None, storage).expect("loading the XDP program");
        lb::loader::pin_maps(&mut skel, &bp).expect("pinning the maps");
        let m = Maps::open(&bp).expect("opening the pinned maps");
        assert_eq!(m.settings().expect("reading the settings back"), settings);
        Self {
            skel,
            m,
            settings,
            ifs,
            _pins: pins,
        }
    }

    fn service(&self, vip: Ipv4Addr, port: u16, proto: Proto) -> Service {
        self.service_conf(vip, port, proto, Default::default())
    }

    /// A service with a forwarding mode, scheduler and affinity.
    fn service_conf(
        &self,
        vip: Ipv4Addr,
        port: u16,
        proto: Proto,
        conf: lb::model::SvcConf,
    ) -> Service {
        let svc = Service::new(sa(vip, port), proto);
        service::service_add_conf(&self.m, &svc, conf).expect("adding a service");
        svc
    }

    fn backend(&self, svc: &Service, ip: Ipv4Addr, port: u16, weight: u32) -> u32 {
        service::backend_add(&self.m, svc, sa(ip, port), weight).expect("adding a backend")
    }

    /// Runs the program once on `frame` as if it arrived on `ifindex`;
    /// returns the verdict and the frame as the program left it.
    fn run(&self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>), libbpf_rs::Error> {
        run_prog(&self.skel.progs.lb_xdp, ifindex, frame)
    }

    fn counters(&self) -> Vec<stats::Counter> {
        stats::read(&self.m.stats).expect("reading the counters")
    }

    /// Packets counted under `name` so far.
    fn counter(&self, name: &str) -> u64 {
        self.counters()[stats::index(name).expect("a counter name")].packets
    }

    fn conns(&self) -> Vec<conntrack::Conn> {
        conntrack::list(&self.m).expect("listing connections")
    }

    /// Every entry of both tables.
    fn entries(&self) -> Vec<(FlowKey, Flow)> {
        conntrack::entries(&self.m)
            .expect("reading the connection tables")
            .into_iter()
            .map(|(k, f, _)| (k, f))
            .collect()
    }

    /// Entries in each connection table (conntrack, ct_new, conntrack6,
    /// ct_new6), as `lb stats` counts them.
    fn table_use(&self) -> Vec<(&'static str, u64)> {
        conntrack::census(&self.m)
            .expect("counting the connection tables")
            .1
            .into_iter()
            .map(|t| (t.table, t.entries))
            .collect()
    }

    /// The table holding `key`: true for conntrack (answered), false for
    /// ct_new (half-open).
    fn table_of(&self, key: &FlowKey) -> Option<bool> {
        if self.answered(key).is_some() {
            return Some(true);
        }
        self.half_open(key).map(|_| false)
    }

    fn answered(&self, key: &FlowKey) -> Option<Flow> {
        self.m
            .conntrack
            .lookup(bytes(key), MapFlags::ANY)
            .expect("conntrack lookup")
            .map(|v| maps::from_bytes(&v))
    }

    fn half_open(&self, key: &FlowKey) -> Option<Flow> {
        halfopen::get::<halfopen::V4>(&self.m, key).expect("half-open lookup")
    }

    fn entry(&self, key: &FlowKey) -> Option<Flow> {
        self.answered(key).or_else(|| self.half_open(key))
    }

    /// Rewrites an entry where it is.
    fn put_entry(&self, key: &FlowKey, f: &Flow) {
        if self.table_of(key).expect("the entry to rewrite") {
            self.m
                .conntrack
                .update(bytes(key), bytes(f), MapFlags::EXIST)
                .expect("rewriting an entry");
        } else {
            halfopen::put::<halfopen::V4>(&self.m, key, f).expect("rewriting an entry");
        }
    }

    /// Makes a connection look idle for longer than its timeout: its owner
    /// (which holds the clock) was last seen that long ago.
    fn age_out(&self, key: &FlowKey) {
        let mut f = self.entry(key).expect("the entry to age");
        let owner = if f.dir == maps::DIR_TO_CLIENT {
            *key
        } else {
            conntrack::owner_key(&f, key.proto)
        };
        let owner = &owner;
        f = self.entry(owner).expect("the owner to age");
        let answered = self.table_of(owner).unwrap();
        let timeout = if f.state & maps::CT_CLOSING != 0 {
            self.settings.fin_timeout
        } else if owner.proto == UDP {
            self.settings.udp_timeout
        } else if answered {
            self.settings.tcp_timeout
        } else {
            lb::settings::SYN_TIMEOUT
        };
        let ticks = u64::from(timeout * lb::clock::hz().expect("HZ"));
        f.seen = lb::clock::now().expect("clock") - ticks - 1;
        f.created = f.seen;
        self.put_entry(owner, &f);
    }

    /// Lets `secs` seconds pass for the connection tables: every entry's
    /// timestamps move that far into the past (the datapath only compares
    /// them with its clock).
    fn time_passes(&self, secs: u32) {
        let ticks = u64::from(secs * lb::clock::hz().expect("HZ"));
        for (k, mut f) in self.entries() {
            f.seen -= ticks;
            f.created -= ticks;
            self.put_entry(&k, &f);
        }
    }

    /// The owner of `conn` (the entry keyed by its NAT tuple).
    fn owner(&self, conn: &Conn) -> Flow {
        self.entry(&conn.reverse_key())
            .expect("the connection's owner")
    }

    fn traffic(&self, id: u32) -> stats::Traffic {
        stats::report(&self.m)
            .expect("reading the report")
            .services
            .iter()
            .flat_map(|s| s.backends.iter())
            .find(|b| b.backend.id == id)
            .unwrap_or_else(|| panic!("no backend id {id} in the report"))
            .traffic
    }

    /// Backend id `id`'s line of the report (traffic, handshakes, errors).
    fn backend_stats(&self, id: u32) -> stats::BackendStats {
        stats::report(&self.m)
            .expect("reading the report")
            .services
            .into_iter()
            .flat_map(|s| s.backends)
            .find(|b| b.backend.id == id)
            .unwrap_or_else(|| panic!("no backend id {id} in the report"))
    }

    /// Makes `conn`'s first SYN `ms` milliseconds old for the handshake
    /// latency: its owner's SYN time (bpf_ktime_get_ns, CLOCK_MONOTONIC,
    /// >> 10) moved that far into the past.
    fn syn_ago(&self, conn: &Conn, ms: u64) {
        let t =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
        let ns = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
        let mut o = self.owner(conn);
        assert_ne!(o.syn_t, 0, "the owner has its SYN time: {o:?}");
        o.syn_t = ((ns - ms * 1_000_000) >> 10) as u32;
        self.put_entry(&conn.reverse_key(), &o);
    }

    /// The interface, source address and MAC the LB reaches `ip` by.
    fn path(&self, ip: Ipv4Addr) -> (u32, Ipv4Addr, [u8; 6]) {
        if ip.octets()[..3] == [10, 200, 1] {
            (self.ifs.eth2, LB2, ETH2_MAC)
        } else {
            (self.ifs.eth0, LB, ETH0_MAC)
        }
    }

    /// The input frame of `seg`, checked for sanity.
    fn input(&self, seg: &Seg, csum: Csum) -> Result<Vec<u8>, String> {
        let f = with_csum(seg.frame(), csum);
        verify_checksums(&f, csum).map_err(|e| format!("input: {e}"))?;
        Ok(f)
    }

    /// Runs `input` arriving on `ingress` and checks the verdict, the whole
    /// output frame, its checksums and that exactly `moved` counters moved.
    fn expect(
        &self,
        ingress: u32,
        input: &[u8],
        verdict: u32,
        want: &[u8],
        csum: Csum,
        moved: &[&str],
    ) -> Result<(), String> {
        let before = self.counters();
        let (v, out) = self
            .run(ingress, input)
            .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        let after = self.counters();
        if v != verdict {
            return Err(format!(
                "{}, expected {}; counters: {}",
                verdict_name(v),
                verdict_name(verdict),
                moved_counters(&before, &after)
            ));
        }
        same_frame(&out, want)
            .map_err(|e| format!("{e}\n  counters: {}", moved_counters(&before, &after)))?;
        verify_checksums(&out, csum).map_err(|e| format!("output: {e}"))?;
        counter_delta(&before, &after, moved, input.len())
    }

    /// `input` passes untouched, counted under `counter`.
    fn passes(&self, input: &[u8], counter: &str) -> Result<(), String> {
        self.expect(
            self.ifs.eth0,
            input,
            XDP_PASS,
            input,
            Csum::Complete,
            &[counter],
        )
    }

    /// `input` is dropped untouched, counted under `counter`.
    fn drops(&self, input: &[u8], counter: &str) -> Result<(), String> {
        self.expect(
            self.ifs.eth0,
            input,
            XDP_DROP,
            input,
            Csum::Complete,
            &[counter],
        )
    }

    /// The first packet of a connection from a client on eth0: rewritten to
    /// LB:natport -> one of `backends` (port 0: the client's port), sent to
    /// the backend's MAC; both connection-table entries written.
    fn open(&self, seg: &Seg, backends: &[SocketAddrV4], csum: Csum) -> Result<Conn, String> {
        let input = self.input(seg, csum)?;
        // A client entry left by a finished flow on the same 4-tuple: the
        // SYN reopens it (see `reopen` fixtures for when it must not).
        let old = self.entry(&seg.key());
        let before = self.counters();
        let (verdict, out) = self
            .run(self.ifs.eth0, &input)
            .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        let after = self.counters();
        let at = locate(&out).ok_or_else(|| {
            format!(
                "{}: output is not an IPv4 TCP/UDP frame; counters: {}",
                verdict_name(verdict),
                moved_counters(&before, &after)
            )
        })?;
        let (src, dst) = endpoints(&out, &at);
        let backend = backends
            .iter()
            .map(|b| {
                if b.port() == 0 {
                    sa(*b.ip(), seg.dport)
                } else {
                    *b
                }
            })
            .find(|b| *b == dst)
            .ok_or_else(|| {
                format!(
                    "{}: sent to {dst}, not to one of {backends:?}; counters: {}",
                    verdict_name(verdict),
                    moved_counters(&before, &after)
                )
            })?;
        let (egress, lb_ip, lb_mac) = self.path(*backend.ip());
        if self.settings.snat.is_empty() && *src.ip() != lb_ip {
            return Err(format!("source {src}, expected the LB's address {lb_ip}"));
        }
        if !self.settings.snat.is_empty() && !self.settings.snat.contains(&(*src.ip()).into()) {
            return Err(format!(
                "source {src}, expected one of the SNAT addresses {:?}",
                self.settings.snat
            ));
        }
        if !self.nat_port_ok(src.port()) {
            return Err(format!(
                "NAT port {} outside {}",
                src.port(),
                lb::settings::ports_string(&self.settings.nat_ports)
            ));
        }
        let want_verdict = if egress == self.ifs.eth0 {
            XDP_TX
        } else {
            XDP_REDIRECT
        };
        if verdict != want_verdict {
            return Err(format!(
                "{}, expected {}",
                verdict_name(verdict),
                verdict_name(want_verdict)
            ));
        }
        let want = with_csum(
            seg.nat(src, backend, lb_mac, mac_of(*backend.ip())).frame(),
            csum,
        );
        same_frame(&out, &want)?;
        verify_checksums(&out, csum).map_err(|e| format!("output: {e}"))?;
        // Reopened: back on the old entry's backend and NAT tuple (a
        // drained or deleted backend's flow starts over elsewhere).
        let reopens = old.is_some_and(|f| {
            (f.daddr, f.dport, f.saddr, f.sport)
                == (
                    lb::maps::ip_to_be(*backend.ip()),
                    backend.port().to_be(),
                    lb::maps::ip_to_be(*src.ip()),
                    src.port().to_be(),
                )
        });
        let moved: &[&str] = if reopens {
            &["to_backend", "new_flow", "reopen"]
        } else {
            &["to_backend", "new_flow"]
        };
        counter_delta(&before, &after, moved, input.len())?;
        let conn = Conn {
            client: seg.clone(),
            backend,
            nat: src,
            egress,
            lb_mac,
        };
        self.check_entries(&conn, true)?;
        Ok(conn)
    }

    /// Whether `port` is one of the instance's NAT ports.
    fn nat_port_ok(&self, port: u16) -> bool {
        self.settings
            .nat_ports
            .iter()
            .any(|r| (r.lo..=r.hi).contains(&port))
    }

    /// Both entries of `conn`, field by field (state: open, if `open`).
    fn check_entries(&self, conn: &Conn, open: bool) -> Result<(), String> {
        let f = self
            .entry(&conn.client.key())
            .ok_or("no client->VIP entry")?;
        let be = |a: SocketAddrV4| (maps::ip_to_be(*a.ip()), a.port().to_be());
        let (nat, backend, vip, client) = (
            be(conn.nat),
            be(conn.backend),
            be(conn.vip()),
            be(conn.client_addr()),
        );
        let want = Flow {
            saddr: nat.0,
            daddr: backend.0,
            sport: nat.1,
            dport: backend.1,
            ifindex: conn.egress,
            smac: conn.lb_mac,
            dmac: mac_of(*conn.backend.ip()),
            dir: maps::DIR_TO_BACKEND,
            nh_ok: 1,
            ..f
        };
        if bytes(&f) != bytes(&want) {
            return Err(format!("client entry {f:?}, expected {want:?}"));
        }
        let r = self
            .entry(&conn.reverse_key())
            .ok_or("no backend->LB entry")?;
        let want = Flow {
            saddr: vip.0,
            daddr: client.0,
            sport: vip.1,
            dport: client.1,
            ifindex: self.ifs.eth0,
            smac: conn.client.dmac,
            dmac: conn.client.smac,
            backend: f.backend,
            svc: f.svc,
            dir: maps::DIR_TO_CLIENT,
            nh_ok: 1,
            ..r
        };
        if bytes(&r) != bytes(&want) {
            return Err(format!("reverse entry {r:?}, expected {want:?}"));
        }
        let ended = maps::CT_CLOSING | maps::CT_FIN_FWD | maps::CT_FIN_REV | maps::CT_RECLAIMED;
        if f.state != 0 || (open && r.state & ended != 0) {
            return Err(format!(
                "states {} (client entry) and {} (owner), expected open",
                f.state, r.state
            ));
        }
        if self.table_of(&conn.client.key()) != self.table_of(&conn.reverse_key()) {
            return Err("the two entries are in different tables".into());
        }
        let b = service::backends(&self.m)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|b| b.id == f.backend)
            .ok_or_else(|| format!("entry names backend id {}, which is unused", f.backend))?;
        if b.addr.ip() != *conn.backend.ip()
            || (b.addr.port() != 0 && b.addr != conn.backend.into())
        {
            return Err(format!(
                "entry names backend {}, packet went to {}",
                b.addr, conn.backend
            ));
        }
        Ok(())
    }

    /// Whether a packet `seg` of `conn` from the client moves it to the
    /// connection table: it is half-open, the backend answered, and `seg`
    /// confirms (TCP: the handshake's ACK or later; UDP: any).
    fn promotes(&self, conn: &Conn, seg: &Seg) -> bool {
        self.table_of(&conn.reverse_key()) == Some(false)
            && self.owner(conn).state & maps::CT_REPLIED != 0
            && (seg.udp || (seg.ack.is_some() && !seg.syn && !seg.rst))
    }

    /// A later packet of `conn` from the client: same backend, same NAT port.
    fn cont(&self, conn: &Conn, seg: &Seg, csum: Csum) -> Result<(), String> {
        let input = self.input(seg, csum)?;
        let want = seg.nat(
            conn.nat,
            conn.backend,
            conn.lb_mac,
            mac_of(*conn.backend.ip()),
        );
        let verdict = if conn.egress == self.ifs.eth0 {
            XDP_TX
        } else {
            XDP_REDIRECT
        };
        let promotes = self.promotes(conn, seg);
        let moved: &[&str] = if promotes {
            &["to_backend", "established"]
        } else {
            &["to_backend"]
        };
        self.expect(
            self.ifs.eth0,
            &input,
            verdict,
            &with_csum(want.frame(), csum),
            csum,
            moved,
        )?;
        if promotes && self.table_of(&conn.reverse_key()) != Some(true) {
            return Err("answered and confirmed, but not moved to conntrack".into());
        }
        Ok(())
    }

    /// A packet of `conn` from the backend: rewritten to VIP -> client, to
    /// the MAC the client's first packet came from, from the one it went to.
    /// A whole handshake for client SYN `seg` ([`Lb::open`], the backend's
    /// SYN-ACK, the client's ACK): the connection, answered and confirmed.
    fn connect(&self, seg: &Seg, backends: &[SocketAddrV4], csum: Csum) -> Result<Conn, String> {
        let conn = self.open(seg, backends, csum)?;
        self.back(&conn, &conn.reply().synack(), csum)
            .map_err(|e| format!("SYN-ACK: {e}"))?;
        self.cont(&conn, &seg.clone().ack(), csum)
            .map_err(|e| format!("ACK: {e}"))?;
        Ok(conn)
    }

    /// Ends `conn` (opened by `seg`) the way nginx does: the backend's FIN
    /// first, then the client's.
    fn finish(&self, conn: &Conn, seg: &Seg, csum: Csum) -> Result<(), String> {
        self.back(conn, &conn.reply().fin(), csum)
            .map_err(|e| format!("backend FIN first: {e}"))?;
        self.cont(conn, &seg.clone().fin(), csum)
            .map_err(|e| format!("client FIN: {e}"))
    }

    /// SYN `seg` of another client takes finished connection `conn`'s NAT
    /// tuple while the backend's TIME_WAIT still holds it (every other tuple
    /// held: counted nat_tw_reuse); its connection, on that tuple.
    fn takes_finished_tuple(&self, seg: &Seg, conn: &Conn, csum: Csum) -> Result<Conn, String> {
        let input = self.input(seg, csum)?;
        let want = seg.nat(
            conn.nat,
            conn.backend,
            conn.lb_mac,
            mac_of(*conn.backend.ip()),
        );
        self.expect(
            self.ifs.eth0,
            &input,
            XDP_TX,
            &want.frame(),
            csum,
            &["to_backend", "new_flow", "nat_tw_reuse"],
        )?;
        Ok(Conn {
            client: seg.clone(),
            ..conn.clone()
        })
    }

    fn back(&self, conn: &Conn, reply: &Seg, csum: Csum) -> Result<(), String> {
        let input = self.input(reply, csum)?;
        let want = reply.nat(
            conn.vip(),
            conn.client_addr(),
            conn.client.dmac,
            conn.client.smac,
        );
        let verdict = if conn.egress == self.ifs.eth0 {
            XDP_TX
        } else {
            XDP_REDIRECT
        };
        self.expect(
            conn.egress,
            &input,
            verdict,
            &with_csum(want.frame(), csum),
            csum,
            &["to_client"],
        )
    }
}

/// Runs `prog` once on `frame` as if it arrived on `ifindex`; returns the
/// verdict and the frame as the program left it.
fn run_prog(
    prog: &libbpf_rs::ProgramMut<'_>,
    ifindex: u32,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), libbpf_rs::Error> {
    // The kernel wants at least an Ethernet header of input. A shorter
    // frame is given behind metadata (xdp_md.data = metadata length),
    // which the program's data..data_end does not cover. Kernels that
    // count the minimum after the metadata (6.18 does) refuse it with
    // EINVAL.
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
    let res = prog.test_run(input)?;
    let verdict = res.return_value;
    let len = res.data.as_ref().map_or(0, |d| d.len());
    assert!(
        len >= meta,
        "test_run returned {len} bytes, less than the metadata"
    );
    out.truncate(len);
    Ok((verdict, out.split_off(meta)))
}

/// The counters that moved, for messages.
fn moved_counters(before: &[stats::Counter], after: &[stats::Counter]) -> String {
    let moved: Vec<String> = before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a.packets != b.packets)
        .map(|(i, (b, a))| format!("{}+{}", stats::NAMES[i], a.packets - b.packets))
        .collect();
    if moved.is_empty() {
        "none moved".into()
    } else {
        moved.join(" ")
    }
}

/// Checks that exactly the `moved` counters moved, by one packet of `bytes`
/// bytes each.
fn counter_delta(
    before: &[stats::Counter],
    after: &[stats::Counter],
    moved: &[&str],
    bytes: usize,
) -> Result<(), String> {
    for name in moved {
        stats::index(name).ok_or_else(|| format!("unknown counter {name}"))?;
    }
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if stats::NAMES[i] == "half_open_evicted" {
            // An event, not a packet's counter (no bytes): a full
            // half-open set moves it on any new flow; the flood fixture
            // checks it.
            continue;
        }
        let (dp, db) = (a.packets - b.packets, a.bytes - b.bytes);
        let want = if moved.contains(&stats::NAMES[i]) {
            (1, bytes as u64)
        } else {
            (0, 0)
        };
        if (dp, db) != want {
            return Err(format!(
                "counter {} moved by {dp} packets/{db} bytes, expected {}/{} ({})",
                stats::NAMES[i],
                want.0,
                want.1,
                moved_counters(before, after)
            ));
        }
    }
    Ok(())
}

/// Sets up a lab, enters it and loads an instance: `$lb` in scope.
macro_rules! instance {
    ($name:expr, $lb:ident, $settings:expr, $skb:expr) => {
        if !common::root_or_skip($name) {
            return;
        }
        let lab = Lab::new();
        let (_guard, ifs) = lab.enter();
        let mut storage = MaybeUninit::uninit();
        let $lb = Lb::new(ifs, $settings, $skb, &mut storage);
    };
}

// ---------------------------------------------------------------------------
// Everything that passes (or is refused) without creating state.

struct PassFixture {
    name: &'static str,
    input: Vec<u8>,
    counter: &'static str,
}

fn pass(name: &'static str, input: Vec<u8>, counter: &'static str) -> PassFixture {
    PassFixture {
        name,
        input,
        counter,
    }
}

fn malformed(name: &'static str, input: Vec<u8>) -> PassFixture {
    pass(name, input, "pass_malformed")
}

fn fragment(name: &'static str, seg: Seg) -> PassFixture {
    pass(name, seg.frame(), "pass_fragment")
}

fn pass_fixtures() -> Vec<PassFixture> {
    vec![
        // --- not IPv4 ----------------------------------------------------
        pass("ARP request for the VIP", arp_request(), "pass_not_ip"),
        pass("IPv6 TCP SYN to no service", ipv6_syn(), "pass_not_ours"),
        pass(
            "VLAN-tagged client SYN to the VIP",
            vlan_syn(),
            "pass_not_ip",
        ),
        // --- not TCP or UDP ----------------------------------------------
        pass("ICMP echo to the VIP", icmp_echo(), "pass_not_l4"),
        pass(
            "ICMP fragment to the VIP (protocol before fragment)",
            {
                let mut f = icmp_echo();
                f[ETH_HLEN + 6] |= 0x20; // MF
                fix_ip_checksum(&mut f);
                f
            },
            "pass_not_l4",
        ),
        pass("SCTP to the VIP", other_proto(132, &[0; 16]), "pass_not_l4"),
        pass(
            "GRE to the VIP",
            other_proto(47, &[0, 0, 0x08, 0]),
            "pass_not_l4",
        ),
        // --- not ours: no flow, no service --------------------------------
        pass(
            "TCP to another address (unknown VIP)",
            Seg::syn(CLIENT, 40000, OTHER_HOST, 80).frame(),
            "pass_not_ours",
        ),
        pass(
            "UDP to another address (unknown VIP)",
            Seg::udp(CLIENT, 40000, OTHER_HOST, 53, DNS_QUERY).frame(),
            "pass_not_ours",
        ),
        pass(
            "TCP to the VIP on an unknown port",
            Seg::syn(CLIENT, 40000, VIP, 8080).frame(),
            "pass_not_ours",
        ),
        pass(
            "UDP to the VIP on an unknown port",
            Seg::udp(CLIENT, 40000, VIP, 5353, DNS_QUERY).frame(),
            "pass_not_ours",
        ),
        pass(
            "UDP to a TCP-only service port",
            Seg::udp(CLIENT, 40000, VIP, 80, b"not tcp").frame(),
            "pass_not_ours",
        ),
        pass(
            "TCP to a UDP-only service port",
            Seg::syn(CLIENT, 40000, VIP, 53).frame(),
            "pass_not_ours",
        ),
        pass(
            "TCP to the LB's own address (the host's traffic)",
            Seg::syn(STRANGER, 40000, LB, 22).frame(),
            "pass_not_ours",
        ),
        pass(
            "backend to the LB on a NAT port without a flow",
            Seg::tcp(BACKEND_A, 80, LB, 61000)
                .data(HTTP_OK)
                .macs(BACKEND_A_MAC, ETH0_MAC)
                .frame(),
            "pass_not_ours",
        ),
        pass(
            "TCP from the LB to a backend",
            Seg::syn(LB, 40000, BACKEND_A, 80).frame(),
            "pass_not_ours",
        ),
        // --- malformed ----------------------------------------------------
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
            fix_l4_checksum(&mut f);
            f
        }),
        malformed("TCP data offset 15 beyond the datagram", {
            let mut f = client_syn().data(HTTP_GET).frame();
            let b = &mut f[ETH_HLEN + 20 + 12];
            *b = (*b & 0x0f) | 0xf0;
            fix_l4_checksum(&mut f);
            f
        }),
        malformed("TCP options cut off by the frame", {
            let mut f = client_syn().with(|t| t.tcp_options = tcp_options()).frame();
            let len = f.len() - 8;
            set_tot_len(&mut f, (len - ETH_HLEN) as u16);
            f.truncate(len);
            fix_l4_checksum(&mut f);
            f
        }),
        malformed("truncated UDP header", {
            let mut f = client_udp().frame();
            set_tot_len(&mut f, 24);
            f.truncate(ETH_HLEN + 24);
            f
        }),
        malformed("UDP header beyond the IP total length (rest is padding)", {
            let mut f = client_udp().frame();
            set_tot_len(&mut f, 24);
            f
        }),
        malformed("fragment with IHL 4 (malformed before fragment)", {
            let mut f = client_syn().with(|t| t.more_fragments = true).frame();
            f[ETH_HLEN] = 0x44;
            fix_ip_checksum(&mut f);
            f
        }),
        // --- fragments ----------------------------------------------------
        pass(
            "first fragment (MF) of a segment of no flow, client -> VIP:80",
            client_syn()
                .data(HTTP_GET)
                .with(|t| t.more_fragments = true)
                .frame(),
            "pass_not_ours",
        ),
        fragment(
            "later fragment (offset 185) client -> VIP:80",
            client_syn().data(HTTP_GET).with(|t| t.frag_offset = 185),
        ),
        fragment(
            "last fragment (offset, no MF) backend -> LB NAT port",
            Seg::tcp(BACKEND_A, 80, LB, 61000)
                .data(HTTP_OK)
                .macs(BACKEND_A_MAC, ETH0_MAC)
                .with(|t| t.frag_offset = 3),
        ),
        fragment(
            "later UDP fragment of no datagram seen, client -> VIP:53",
            client_udp().with(|t| t.frag_offset = 185),
        ),
        pass(
            "first fragment from a stranger to an unknown address",
            Seg::syn(STRANGER, 40000, OTHER_HOST, 80)
                .with(|t| t.more_fragments = true)
                .frame(),
            "pass_not_ours",
        ),
    ]
}

#[test]
fn pass_fixtures_leave_packets_and_table_alone() {
    instance!(
        "pass_fixtures_leave_packets_and_table_alone",
        lb,
        settings(),
        false
    );
    let tcp = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&tcp, BACKEND_A, 80, 1);
    lb.backend(&tcp, BACKEND_B, 80, 1);
    let udp = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&udp, BACKEND_A, 53, 1);

    let fixtures = pass_fixtures();
    let mut failures = Vec::new();
    for fx in &fixtures {
        // Sanity of the fixture itself: a locatable input has right checksums.
        if let Err(e) = verify_checksums(&fx.input, Csum::Complete) {
            failures.push(format!("{}: input: {e}", fx.name));
            continue;
        }
        let r = match lb.run(lb.ifs.eth0, &fx.input) {
            Err(e)
                if fx.input.len() < ETH_HLEN && e.kind() == libbpf_rs::ErrorKind::InvalidInput =>
            {
                eprintln!(
                    "NOTE {}: this kernel's BPF_PROG_TEST_RUN refuses frames shorter than \
                     an Ethernet header ({e}); not run",
                    fx.name
                );
                continue;
            }
            _ => lb.passes(&fx.input, fx.counter),
        };
        let r = r.and_then(|()| match lb.entries().len() {
            0 => Ok(()),
            n => Err(format!("{n} connection-table entries appeared")),
        });
        if let Err(e) = r {
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

// ---------------------------------------------------------------------------
// TCP.

#[test]
fn tcp_new_flow_established_and_return() {
    instance!("tcp_new_flow_established_and_return", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let b = lb.backend(&svc, BACKEND_B, 80, 1);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &backends, c), "client SYN opens a flow");
    let conns = lb.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let k = &conns[0];
    assert_eq!(
        (k.proto, k.client, k.vip, k.backend, k.nat, k.state),
        (
            "tcp",
            sa(CLIENT, 40000).into(),
            sa(VIP, 80).into(),
            conn.backend.into(),
            conn.nat.into(),
            "half-open"
        )
    );
    let tables = |ct, ho| {
        vec![
            ("conntrack", ct),
            ("ct_new", ho),
            ("conntrack6", 0),
            ("ct_new6", 0),
        ]
    };
    assert_eq!(
        lb.table_use(),
        tables(0, 2),
        "half-open: both entries in ct_new"
    );

    must(
        lb.cont(&conn, &syn, c),
        "retransmitted SYN stays on the flow",
    );
    must(
        lb.cont(&conn, &syn.clone().ack(), c),
        "client ACK (established)",
    );
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), c),
        "client data",
    );
    must(
        lb.back(&conn, &conn.reply().synack(), c),
        "backend SYN-ACK -> client",
    );
    must(
        lb.back(&conn, &conn.reply().data(HTTP_OK), c),
        "backend data -> client",
    );
    must(
        lb.cont(&conn, &syn.clone().ack(), c),
        "client ACK of the data",
    );
    assert_eq!(lb.entries().len(), 2, "two entries per connection");
    assert_eq!(lb.table_use(), tables(2, 0), "confirmed: both in conntrack");

    // Per-backend counters: both directions, one new flow, one open.
    let (mine, other) = if *conn.backend.ip() == BACKEND_A {
        (a, b)
    } else {
        (b, a)
    };
    let t = lb.traffic(mine);
    assert_eq!((t.packets, t.new_flows, t.active_flows), (7, 1, 1), "{t:?}");
    assert_eq!(lb.traffic(other), stats::Traffic::default());

    // The backend's reply from another port, or to another NAT port, is not
    // this flow's.
    let wrong_port = conn.reply().data(HTTP_OK).with(|s| s.sport = 81).frame();
    must(
        lb.passes(&wrong_port, "pass_not_ours"),
        "reply from another backend port",
    );
    let other_nat = conn
        .reply()
        .data(HTTP_OK)
        .with(|s| s.dport = if s.dport == 65535 { 61000 } else { s.dport + 1 })
        .frame();
    must(
        lb.passes(&other_nat, "pass_not_ours"),
        "reply to another NAT port",
    );
    let other_backend = conn
        .reply()
        .data(HTTP_OK)
        .with(|s| {
            s.src = if s.src == BACKEND_A {
                BACKEND_B
            } else {
                BACKEND_A
            }
        })
        .frame();
    must(
        lb.passes(&other_backend, "pass_not_ours"),
        "reply from the other backend",
    );

    // `lb conntrack --delete`: both entries go; the client's next segment
    // is nobody's.
    let conns = conntrack::list(&lb.m).expect("listing");
    assert_eq!(conntrack::delete(&lb.m, &conns).expect("deleting"), 2);
    assert_eq!(lb.table_use(), tables(0, 0), "deleted");
    must(
        lb.passes(&syn.clone().ack().frame(), "pass_not_ours"),
        "a deleted connection's segment",
    );
}

/// `lb conntrack --delete` of a half-open connection: both its entries
/// leave ct_new, and the client's retransmitted SYN makes a new flow.
#[test]
fn deleting_a_half_open_connection() {
    instance!("deleting_a_half_open_connection", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let backends = [sa(BACKEND_A, 80)];
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    must(
        lb.open(&syn, &backends, Csum::Complete),
        "client SYN opens a flow",
    );
    let conns = conntrack::list(&lb.m).expect("listing");
    assert_eq!(conns.len(), 1);
    assert_eq!(conntrack::delete(&lb.m, &conns).expect("deleting"), 2);
    assert!(lb.entries().is_empty(), "{:?}", lb.entries());
    must(
        lb.open(&syn, &backends, Csum::Complete),
        "the SYN again: a new flow",
    );
}

#[test]
fn flows_stick_to_their_backend_and_nat_port() {
    instance!(
        "flows_stick_to_their_backend_and_nat_port",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    lb.backend(&svc, BACKEND_B, 80, 1);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;
    let mut nats = std::collections::HashSet::new();
    for sport in (50000..50040).step_by(2) {
        let syn = Seg::syn(CLIENT, sport, VIP, 80);
        let conn = must(lb.open(&syn, &backends, c), "SYN");
        assert!(
            nats.insert((conn.nat, conn.backend)),
            "NAT {} given twice towards {}",
            conn.nat,
            conn.backend
        );
        for seg in [
            syn.clone().ack(),
            syn.clone().data(HTTP_GET),
            syn.clone().data(HTTP_GET),
        ] {
            must(lb.cont(&conn, &seg, c), &format!("flow {CLIENT}:{sport}"));
        }
        must(lb.back(&conn, &conn.reply().data(HTTP_OK), c), "reply");
    }
    assert_eq!(lb.conns().len(), 20);
}

#[test]
fn ip_and_tcp_options_and_padding() {
    instance!("ip_and_tcp_options_and_padding", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    lb.backend(&svc, BACKEND_B, 80, 1);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40004, VIP, 80).with(|t| {
        t.ip_options = IP_OPTIONS.to_vec();
        t.tcp_options = tcp_options();
    });
    let conn = must(lb.open(&syn, &backends, c), "SYN with IP and TCP options");
    let synack = conn.reply().synack().with(|t| {
        t.ip_options = IP_OPTIONS.to_vec();
        t.tcp_options = tcp_options();
    });
    must(
        lb.back(&conn, &synack, c),
        "SYN-ACK with IP and TCP options",
    );
    let data = Seg::syn(CLIENT, 40004, VIP, 80).data(HTTP_GET).with(|t| {
        t.ip_options = IP_OPTIONS.to_vec();
        t.tcp_options = vec![TcpOptionElement::Timestamp(7, 9)];
    });
    must(lb.cont(&conn, &data, c), "data with IP and TCP options");

    // Short segments with Ethernet padding: rewritten, padding kept.
    let short = Seg::syn(CLIENT, 40010, VIP, 80).with(|t| t.pad_to = 60);
    let conn = must(
        lb.open(&short, &backends, c),
        "short SYN padded to 60 bytes",
    );
    must(
        lb.back(&conn, &conn.reply().ack().with(|t| t.pad_to = 60), c),
        "short padded ACK back",
    );
    must(
        lb.cont(&conn, &short.clone().ack().with(|t| t.pad_to = 60), c),
        "short padded ACK",
    );
}

#[test]
fn backend_port_differs_from_service_port() {
    instance!(
        "backend_port_differs_from_service_port",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 8080, 1);
    let c = Csum::Complete;
    let syn = Seg::syn(CLIENT, 40000, VIP, 80).with(|t| t.tcp_options = tcp_options());
    let conn = must(lb.open(&syn, &[sa(BACKEND_A, 8080)], c), "VIP:80 -> A:8080");
    assert_eq!(conn.backend, sa(BACKEND_A, 8080));
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), c),
        "data to :8080",
    );
    must(
        lb.back(&conn, &conn.reply().synack(), c),
        "A:8080 SYN-ACK -> VIP:80",
    );
    must(
        lb.back(&conn, &conn.reply().data(HTTP_OK), c),
        "A:8080 data -> VIP:80",
    );
    let from_80 = conn.reply().data(HTTP_OK).with(|t| t.sport = 80).frame();
    must(
        lb.passes(&from_80, "pass_not_ours"),
        "A:80 is not the flow's backend port",
    );
}

#[test]
fn clients_with_the_same_source_port_get_distinct_nat_ports() {
    instance!(
        "clients_with_the_same_source_port_get_distinct_nat_ports",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let c = Csum::Complete;
    let backends = [sa(BACKEND_A, 80)];
    let syn1 = Seg::syn(CLIENT, 40000, VIP, 80);
    // The second client's frames come from another hop, to another MAC of
    // the LB: the way back must use exactly those.
    let syn2 = Seg::syn(CLIENT2, 40000, VIP, 80).macs(PEER2_MAC, ALIAS_MAC);
    let c1 = must(lb.open(&syn1, &backends, c), "client 1");
    let c2 = must(lb.open(&syn2, &backends, c), "client 2");
    assert_ne!(c1.nat, c2.nat, "two clients share a NAT port");
    assert_eq!(c1.nat.ip(), c2.nat.ip());

    must(lb.back(&c2, &c2.reply().synack(), c), "reply to client 2");
    must(lb.back(&c1, &c1.reply().synack(), c), "reply to client 1");
    must(
        lb.cont(&c1, &syn1.clone().data(HTTP_GET), c),
        "client 1 data",
    );
    must(
        lb.cont(&c2, &syn2.clone().data(HTTP_GET), c),
        "client 2 data",
    );
    must(
        lb.back(&c1, &c1.reply().data(HTTP_OK), c),
        "data to client 1",
    );
    must(
        lb.back(&c2, &c2.reply().data(HTTP_OK), c),
        "data to client 2",
    );
    assert_eq!(lb.conns().len(), 2);
    let t = lb.traffic(a);
    assert_eq!((t.packets, t.new_flows, t.active_flows), (8, 2, 2), "{t:?}");
}

#[test]
fn fin_and_rst_close_and_a_new_syn_starts_over() {
    instance!(
        "fin_and_rst_close_and_a_new_syn_starts_over",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let backends = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;
    let closing = |lb: &Lb, conn: &Conn, what: &str| {
        let f = lb.entry(&conn.client.key()).expect("client entry");
        let o = lb.owner(conn);
        assert_eq!(f.state, 0, "{what}: state lives in the owner only");
        assert_ne!(o.state & maps::CT_CLOSING, 0, "{what}: owner {o:?}");
        let k = lb
            .conns()
            .into_iter()
            .find(|k| k.nat == conn.nat.into())
            .expect("listed");
        assert_eq!(k.state, "closing", "{what}");
    };

    // FIN from the client.
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &backends, c), "SYN");
    must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK");
    must(lb.cont(&conn, &syn.clone().data(HTTP_GET), c), "data");
    must(
        lb.cont(&conn, &syn.clone().fin(), c),
        "client FIN is forwarded",
    );
    // Half-closed: the backend may still send; nothing lingers yet.
    assert_eq!(
        lb.owner(&conn).state & !maps::CT_REPLIED,
        maps::CT_FIN_FWD,
        "after the client's FIN"
    );
    let k = lb
        .conns()
        .into_iter()
        .find(|k| k.nat == conn.nat.into())
        .expect("listed");
    assert_eq!(k.state, "half-closed");
    must(
        lb.back(&conn, &conn.reply().data(HTTP_OK), c),
        "backend data after the client's FIN",
    );
    // The rest of the close still flows, without reopening anything.
    must(
        lb.back(&conn, &conn.reply().fin(), c),
        "backend FIN-ACK while closing",
    );
    must(
        lb.cont(&conn, &syn.clone().ack(), c),
        "last ACK while closing",
    );
    closing(&lb, &conn, "after the last ACK");
    // A bare SYN from the backend side is no way to reopen.
    let bare = conn.reply().with(|t| t.syn = true).frame();
    must(
        lb.passes(&bare, "pass_not_ours"),
        "backend SYN on a closing flow",
    );

    // A new SYN on the same 4-tuple reopens the flow on the same backend
    // and the same NAT tuple: the backend holds that tuple in TIME_WAIT and
    // accepts this client's new SYN on it.
    let input = lb.input(&syn, c).unwrap();
    let want = syn.nat(
        conn.nat,
        conn.backend,
        conn.lb_mac,
        mac_of(*conn.backend.ip()),
    );
    must(
        lb.expect(
            lb.ifs.eth0,
            &input,
            XDP_TX,
            &want.frame(),
            c,
            &["to_backend", "new_flow", "reopen"],
        ),
        "new SYN on the closed 4-tuple reopens it",
    );
    must(lb.check_entries(&conn, true), "reopened entries");
    must(
        lb.back(&conn, &conn.reply().synack(), c),
        "reopened flow's SYN-ACK",
    );
    must(lb.cont(&conn, &syn.clone().ack(), c), "reopened flow's ACK");
    assert_eq!(lb.conns().len(), 1);
    assert_eq!(lb.conns()[0].state, "open");

    // RST from the backend closes the connection too.
    let syn3 = Seg::syn(CLIENT, 40002, VIP, 80);
    let conn3 = must(lb.open(&syn3, &backends, c), "SYN 3");
    must(
        lb.back(&conn3, &conn3.reply().rst(), c),
        "backend RST is forwarded",
    );
    closing(&lb, &conn3, "after the backend's RST");
    must(
        lb.cont(&conn3, &syn3.clone().ack(), c),
        "a non-SYN after RST stays on the flow",
    );
    // RST from the client.
    let syn4 = Seg::syn(CLIENT, 40004, VIP, 80);
    let conn4 = must(lb.open(&syn4, &backends, c), "SYN 4");
    must(
        lb.cont(&conn4, &syn4.clone().rst(), c),
        "client RST is forwarded",
    );
    closing(&lb, &conn4, "after the client's RST");
    let i = stats::index("new_flow").unwrap();
    assert_eq!(lb.counters()[i].packets, 4);
}

/// A finished connection's NAT tuple is held for the backend's TIME_WAIT:
/// only the same client 4-tuple may reopen it at once (its new SYN carries
/// timestamps and a sequence the backend's TIME_WAIT accepts); another
/// client tuple (whose timestamps Linux offsets per connection) waits until
/// the TIME_WAIT is over, or the backend might reject its SYN (PAWS),
/// unless every tuple is held (see
/// time_wait_tuple_is_taken_only_when_every_other_is_held).
#[test]
fn finished_tuple_waits_out_the_backends_time_wait() {
    instance!(
        "finished_tuple_waits_out_the_backends_time_wait",
        lb,
        two_nat_ports(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.connect(&syn, &a80, c), "a connection");
    must(lb.finish(&conn, &syn, c), "the connection's end");
    assert_ne!(lb.owner(&conn).state & maps::CT_CLOSING, 0);

    // Within TIME_WAIT (past the flow's own linger, fin_timeout), new
    // client tuples get the other port, the finished one left alone.
    lb.time_passes(lb.settings.fin_timeout + 1);
    let other_port = Seg::syn(CLIENT, 40002, VIP, 80);
    let other_client = Seg::syn(CLIENT2, 40000, VIP, 80);
    for (seg, what) in [
        (&other_port, "same client address, other port"),
        (&other_client, "other client, same port"),
    ] {
        let o = must(lb.open(seg, &a80, c), what);
        assert_ne!(o.nat, conn.nat, "{what}: took the finished tuple");
        must(lb.back(&o, &o.reply().rst(), c), "the backend refuses it");
        // (closed at once by the RST: the other port is free again)
        lb.time_passes(lb.settings.fin_timeout + 1);
    }
    assert_eq!(lb.counter("nat_tw_reuse"), 0);
    // The same 4-tuple reopens it at any time.
    let input = lb.input(&syn, c).unwrap();
    let want = syn.nat(conn.nat, conn.backend, conn.lb_mac, mac_of(BACKEND_A));
    must(
        lb.expect(
            lb.ifs.eth0,
            &input,
            XDP_TX,
            &want.frame(),
            c,
            &["to_backend", "new_flow", "reopen"],
        ),
        "the same 4-tuple reopens the tuple",
    );
    must(
        lb.back(&conn, &conn.reply().rst(), c),
        "backend RST ends it",
    );

    // Once the backend's TIME_WAIT is over, anyone may take it (new client
    // tuples: the ones above would find their own stale entries): two new
    // flows take both ports, the finished one's among them.
    lb.time_passes(lb::settings::TIME_WAIT + 1);
    let mut nats = Vec::new();
    for seg in [
        Seg::syn(CLIENT2, 40002, VIP, 80),
        Seg::syn(CLIENT, 40004, VIP, 80),
    ] {
        let f = must(lb.open(&seg, &a80, c), "after TIME_WAIT");
        must(lb.back(&f, &f.reply().synack(), c), "answered: held");
        nats.push(f.nat);
    }
    assert_ne!(nats[0], nats[1]);
    assert!(nats.contains(&conn.nat), "{nats:?}");
    assert_eq!(lb.counter("nat_tw_reuse"), 0);
}

/// Every NAT tuple held: a new flow takes the finished connection's whose
/// TIME_WAIT at the backend is not over (the first the search meets),
/// counted `nat_tw_reuse`, rather than be dropped; never a live one, nor
/// one finished less than a second ago. The finished connection's client
/// entry is stale from then on.
#[test]
fn time_wait_tuple_is_taken_only_when_every_other_is_held() {
    instance!(
        "time_wait_tuple_is_taken_only_when_every_other_is_held",
        lb,
        one_nat_port(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.connect(&syn, &a80, c), "a connection");
    let other = Seg::syn(CLIENT2, 40000, VIP, 80);
    must(
        lb.drops(&other.frame(), "drop_nat_full"),
        "a live connection's",
    );
    must(lb.finish(&conn, &syn, c), "the connection's end");
    must(
        lb.drops(&other.frame(), "drop_nat_full"),
        "finished just now: its last segments may be on their way",
    );
    assert!(lb.entry(&other.key()).is_none());

    lb.time_passes(2);
    must(
        lb.takes_finished_tuple(&other, &conn, c),
        "every tuple held: the finished one, within TIME_WAIT",
    );
    // The old connection's client entry no longer has its owner: stale
    // (not evicted: its tuple is another connection's), and gone.
    let late = syn.clone().ack();
    let input = lb.input(&late, c).unwrap();
    must(
        lb.expect(
            lb.ifs.eth0,
            &input,
            XDP_PASS,
            &late.frame(),
            c,
            &["pass_not_ours", "stale"],
        ),
        "the finished connection's late segment",
    );
    assert!(lb.entry(&syn.key()).is_none(), "the stale entry stays");
}

/// `lb conntrack --delete` acts on a listing that may be old: a connection
/// listed, then finished, its NAT tuple given to another client's (the
/// TIME_WAIT fallback), is deleted by its own entries only. The other
/// connection's owner, on the listed connection's key, stays, half-open
/// and then answered (conntrack::delete checks what an entry rewrites to).
#[test]
fn deleting_a_listed_connection_spares_the_one_on_its_tuple_since() {
    instance!(
        "deleting_a_listed_connection_spares_the_one_on_its_tuple_since",
        lb,
        one_nat_port(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.connect(&syn, &a80, c), "a connection");
    let listed = conntrack::list(&lb.m).expect("listing");
    assert_eq!(listed.len(), 1);
    must(lb.finish(&conn, &syn, c), "the connection's end");
    lb.time_passes(2);
    let other = Seg::syn(CLIENT2, 40000, VIP, 80);
    let took = must(
        lb.takes_finished_tuple(&other, &conn, c),
        "another client on the finished connection's tuple",
    );

    // Only the listed connection's client entry goes (stale now).
    assert_eq!(conntrack::delete(&lb.m, &listed).expect("deleting"), 1);
    assert!(lb.entry(&syn.key()).is_none());
    must(
        lb.back(&took, &took.reply().synack(), c),
        "the other connection's SYN-ACK, after the delete",
    );
    must(lb.cont(&took, &other.clone().ack(), c), "its ACK");
    // Answered now (conntrack): the same again.
    assert_eq!(conntrack::delete(&lb.m, &listed).expect("deleting"), 0);
    must(
        lb.cont(&took, &other.clone().data(HTTP_GET), c),
        "a request",
    );
    must(
        lb.back(&took, &took.reply().data(HTTP_OK), c),
        "its answer, after the second delete",
    );
    assert_eq!(lb.conns().len(), 1);
}

/// maps::delete_if when the entry changes between its look and its delete
/// (as if the datapath gave the key to another connection meanwhile): the
/// check passes the first time and fails on what the delete took, which is
/// put back; the connection carries on.
#[test]
fn delete_if_puts_back_an_entry_that_changed_meanwhile() {
    instance!(
        "delete_if_puts_back_an_entry_that_changed_meanwhile",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.connect(&syn, &a80, c), "a connection");
    let key = syn.key();
    let was = lb.m.conntrack.lookup(bytes(&key), MapFlags::ANY).unwrap();
    assert!(was.is_some(), "answered: in conntrack");
    let looks = std::cell::Cell::new(0);
    let gone = maps::delete_if(&lb.m.conntrack, bytes(&key), |_: &Flow| {
        looks.set(looks.get() + 1);
        looks.get() == 1
    })
    .expect("delete_if");
    assert!(!gone);
    assert_eq!(looks.get(), 2, "looked at before and at what it took");
    assert_eq!(
        lb.m.conntrack.lookup(bytes(&key), MapFlags::ANY).unwrap(),
        was,
        "put back as it was"
    );
    must(lb.cont(&conn, &syn.clone().data(HTTP_GET), c), "a request");
    assert!(maps::delete_if(&lb.m.conntrack, bytes(&key), |_: &Flow| true).unwrap());
    assert!(!maps::delete_if(&lb.m.conntrack, bytes(&key), |_: &Flow| true).unwrap());
}

/// Connections opened in a burst hold consecutive NAT ports: a search that
/// meets a run of live tuples longer than it tries in order still finds a
/// free one past it (at doubling distances), and the next search starts
/// past that one.
#[test]
fn a_run_of_live_tuples_does_not_block_new_flows() {
    let mut set = settings();
    set.nat_ports = vec![lb::settings::PortRange {
        lo: 61000,
        hi: 61999,
    }];
    instance!(
        "a_run_of_live_tuples_does_not_block_new_flows",
        lb,
        set,
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;
    const RUN: u16 = 100;
    for i in 0..RUN {
        let syn = Seg::syn(CLIENT, 40000 + i, VIP, 80);
        let conn = must(lb.open(&syn, &a80, c), "a held connection");
        assert_eq!(conn.nat, sa(LB, 61000 + i), "ports in order");
        must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK");
        must(lb.cont(&conn, &syn.clone().ack(), c), "ACK");
    }
    // The cursor back at the start of the run, as after a wrap.
    lb.skel
        .maps
        .nat_cursor
        .update(&a.to_ne_bytes(), &0u32.to_ne_bytes(), MapFlags::ANY)
        .expect("setting the cursor");
    let next = must(
        lb.open(&Seg::syn(CLIENT2, 40000, VIP, 80), &a80, c),
        "a new flow past the run",
    );
    let port = next.nat.port();
    assert!(
        (61000 + RUN..62000).contains(&port),
        "NAT port {port} inside the live run"
    );
    let after = must(
        lb.open(&Seg::syn(CLIENT2, 40001, VIP, 80), &a80, c),
        "the next new flow",
    );
    assert_eq!(after.nat.port(), port + 1, "the cursor moved past it");
}

/// A SNAT pool: new flows take (address, port) tuples over every address
/// of the pool in turn, so a backend takes as many concurrent connections
/// as addresses times ports; each flow's replies find their way back.
#[test]
fn snat_pool_spreads_flows_over_its_addresses() {
    let mut set = settings();
    set.nat_ports = vec![lb::settings::PortRange {
        lo: 61000,
        hi: 61001,
    }];
    set.snat = vec![LB.into(), LB2.into()];
    instance!("snat_pool_spreads_flows_over_its_addresses", lb, set, false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;
    let mut got = Vec::new();
    for i in 0..4 {
        let syn = Seg::syn(CLIENT, 40000 + i, VIP, 80);
        let conn = must(lb.open(&syn, &a80, c), "a flow within the pool");
        must(lb.back(&conn, &conn.reply().synack(), c), "its SYN-ACK");
        got.push(conn);
    }
    let nats: Vec<SocketAddrV4> = got.iter().map(|c| c.nat).collect();
    assert_eq!(
        nats,
        [sa(LB, 61000), sa(LB2, 61000), sa(LB, 61001), sa(LB2, 61001)],
        "tuples over the pool's addresses in turn"
    );
    for conn in &got {
        must(
            lb.back(conn, &conn.reply().data(HTTP_OK), c),
            "replies to each address reach their client",
        );
    }
    must(
        lb.drops(&Seg::syn(CLIENT, 40004, VIP, 80).frame(), "drop_nat_full"),
        "two addresses times two ports: four flows",
    );
}

/// A SYN on a closed flow's 4-tuple reopens it on its backend and NAT tuple
/// only while that backend takes new flows: drained (weight 0) or deleted,
/// the SYN is a new flow on another backend.
#[test]
fn closed_flow_of_a_drained_or_deleted_backend_is_not_reopened() {
    instance!(
        "closed_flow_of_a_drained_or_deleted_backend_is_not_reopened",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let c = Csum::Complete;
    let close = |lb: &Lb, conn: &Conn, syn: &Seg| {
        must(lb.back(conn, &conn.reply().synack(), c), "SYN-ACK");
        must(lb.cont(conn, &syn.clone().ack(), c), "ACK");
        must(lb.back(conn, &conn.reply().fin(), c), "backend FIN");
        must(lb.cont(conn, &syn.clone().fin(), c), "client FIN");
    };

    // Drained.
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &[sa(BACKEND_A, 80)], c), "flow to A");
    close(&lb, &conn, &syn);
    lb.backend(&svc, BACKEND_B, 80, 1);
    service::backend_set(&lb.m, &svc, sa(BACKEND_A, 80), 0).expect("drain A");
    let again = must(
        lb.open(&syn, &[sa(BACKEND_B, 80)], c),
        "the same 4-tuple after A was drained",
    );
    assert_eq!(again.backend, sa(BACKEND_B, 80));

    // Deleted.
    let syn2 = Seg::syn(CLIENT, 40002, VIP, 80);
    let conn2 = must(lb.open(&syn2, &[sa(BACKEND_B, 80)], c), "flow to B");
    close(&lb, &conn2, &syn2);
    service::backend_set(&lb.m, &svc, sa(BACKEND_A, 80), 1).expect("A back");
    service::backend_del(&lb.m, &svc, sa(BACKEND_B, 80)).expect("delete B");
    let again2 = must(
        lb.open(&syn2, &[sa(BACKEND_A, 80)], c),
        "the same 4-tuple after B was deleted",
    );
    assert_eq!(again2.backend, sa(BACKEND_A, 80));
}

// ---------------------------------------------------------------------------
// ICMP errors about tracked flows.

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP packet, as
/// much of it as the sender quotes), built by etherparse.
fn icmp_error(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.octets(), dst.octets(), 61)
        .icmpv4(kind)
        .write(&mut out, quoted)
        .expect("building an ICMP error");
    out
}

fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: mtu,
    })
}

/// The first `n` bytes of `seg`'s IP packet (what an ICMP error quotes).
fn quote(seg: &Seg, n: usize) -> Vec<u8> {
    let f = seg.frame();
    f[ETH_HLEN..(ETH_HLEN + n).min(f.len())].to_vec()
}

/// Checks an ICMP error frame's checksums with the RFC 1071 code above:
/// outer IP header, ICMP message, the quoted IP header, and the quoted TCP
/// or UDP checksum when the whole quoted datagram is there.
fn verify_icmp_error(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    if fold(sum16(&ip[..ihl])) != 0xffff {
        return Err("outer IP header checksum".into());
    }
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let icmp = &ip[ihl..tot];
    if fold(sum16(icmp)) != 0xffff {
        return Err("ICMP checksum".into());
    }
    let inner = &icmp[8..];
    let iihl = usize::from(inner[0] & 0xf) * 4;
    if fold(sum16(&inner[..iihl])) != 0xffff {
        return Err("quoted IP header checksum".into());
    }
    let itot = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
    if itot == inner.len() {
        let l4 = &inner[iihl..];
        let proto = inner[9];
        let zero_udp = proto == UDP && l4[6..8] == [0, 0];
        let pseudo = sum16(&inner[12..20]) + u32::from(proto) + l4.len() as u32;
        if !zero_udp && fold(pseudo + sum16(l4)) != 0xffff {
            return Err("quoted L4 checksum".into());
        }
    }
    Ok(())
}

/// A router on the backend's path cannot forward the LB's packet towards
/// the backend (fragmentation needed, the path MTU message) or its TTL ran
/// out: the client gets the error as if about its own packet to the VIP
/// (addresses, ports and every checksum translated, the MTU kept). A router
/// on the client's path reports about the LB's packet to the client: the
/// backend gets it as about its own packet to the LB. Errors about no
/// tracked flow, or quoting too little, pass untouched.
#[test]
fn icmp_errors_reach_the_flows_other_end() {
    instance!(
        "icmp_errors_reach_the_flows_other_end",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let c = Csum::Complete;
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &[sa(BACKEND_A, 80)], c), "SYN");
    must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK");
    let router = OTHER_HOST;
    let tx = |egress: u32| {
        if egress == lb.ifs.eth0 {
            XDP_TX
        } else {
            XDP_REDIRECT
        }
    };

    // The client's big segment, as lb sent it to the backend, bounced by a
    // router on the way: quoted whole, and quoted with only 8 bytes of TCP.
    let big = syn.clone().data(&[0x5a; 1200]);
    let sent = big.nat(conn.nat, conn.backend, conn.lb_mac, mac_of(BACKEND_A));
    for n in [sent.frame().len() - ETH_HLEN, 28] {
        let input = icmp_error(
            PEER2_MAC,
            conn.lb_mac,
            router,
            *conn.nat.ip(),
            frag_needed(1000),
            &quote(&sent, n),
        );
        let want = icmp_error(
            conn.client.dmac,
            conn.client.smac,
            VIP,
            CLIENT,
            frag_needed(1000),
            &quote(&big, n),
        );
        verify_icmp_error(&want).expect("the expected frame's checksums");
        must(
            lb.expect(
                conn.egress,
                &input,
                tx(ifindex_to_client(&lb)),
                &want,
                c,
                &["icmp_error"],
            ),
            &format!("frag needed from the backend's path, {n} bytes quoted"),
        );
    }

    // The backend's answer, as lb sent it to the client, bounced on the
    // client's path (TTL exceeded).
    let answer = conn.reply().data(HTTP_OK);
    let delivered = answer.nat(
        conn.vip(),
        conn.client_addr(),
        conn.client.dmac,
        conn.client.smac,
    );
    let exceeded = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
    let input = icmp_error(
        PEER_MAC,
        ETH0_MAC,
        STRANGER,
        VIP,
        exceeded.clone(),
        &quote(&delivered, delivered.frame().len() - ETH_HLEN),
    );
    let want = icmp_error(
        conn.lb_mac,
        mac_of(BACKEND_A),
        *conn.nat.ip(),
        BACKEND_A,
        exceeded.clone(),
        &quote(&answer, answer.frame().len() - ETH_HLEN),
    );
    verify_icmp_error(&want).expect("the expected frame's checksums");
    must(
        lb.expect(
            lb.ifs.eth0,
            &input,
            tx(conn.egress),
            &want,
            c,
            &["icmp_error"],
        ),
        "time exceeded from the client's path",
    );

    // About no tracked flow (a NAT port nobody holds), or quoting less than
    // 8 bytes past the IP header: passed untouched.
    let free = sa(*conn.nat.ip(), conn.nat.port() + 1);
    let stray = syn
        .clone()
        .data(HTTP_GET)
        .nat(free, conn.backend, conn.lb_mac, mac_of(BACKEND_A));
    for (what, quoted) in [
        ("unknown flow", quote(&stray, 48)),
        ("short quote", quote(&sent, 24)),
    ] {
        let input = icmp_error(
            PEER2_MAC,
            conn.lb_mac,
            router,
            *conn.nat.ip(),
            frag_needed(1000),
            &quoted,
        );
        must(
            lb.expect(conn.egress, &input, XDP_PASS, &input, c, &["pass_not_l4"]),
            what,
        );
    }
    assert_eq!(lb.conns().len(), 1, "errors create no flows");
}

/// A UDP flow's backend has no socket on the port: its port unreachable
/// reaches the client with the quoted UDP checksum translated.
#[test]
fn icmp_port_unreachable_for_udp() {
    instance!("icmp_port_unreachable_for_udp", lb, settings(), false);
    let svc = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&svc, BACKEND_A, 53, 1);
    let c = Csum::Complete;
    let q = Seg::udp(CLIENT, 40000, VIP, 53, b"query");
    let conn = must(lb.open(&q, &[sa(BACKEND_A, 53)], c), "UDP query");
    let sent = q.nat(conn.nat, conn.backend, conn.lb_mac, mac_of(BACKEND_A));
    let unreachable = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
    let len = sent.frame().len() - ETH_HLEN;
    let input = icmp_error(
        mac_of(BACKEND_A),
        conn.lb_mac,
        BACKEND_A,
        *conn.nat.ip(),
        unreachable.clone(),
        &quote(&sent, len),
    );
    let want = icmp_error(
        conn.client.dmac,
        conn.client.smac,
        VIP,
        CLIENT,
        unreachable,
        &quote(&q, len),
    );
    verify_icmp_error(&want).expect("the expected frame's checksums");
    must(
        lb.expect(conn.egress, &input, XDP_TX, &want, c, &["icmp_error"]),
        "port unreachable from the backend",
    );
}

/// The interface lb sends a client's packets out of: the one its frames
/// came in on (eth0 in these fixtures).
fn ifindex_to_client(lb: &Lb) -> u32 {
    lb.ifs.eth0
}

// ---------------------------------------------------------------------------
// Fragments of tracked flows.

/// `frame` (a later fragment) as lb forwards it: new addresses and MACs,
/// the IP checksum recomputed, everything else as it was.
fn refragment(frame: &[u8], src: Ipv4Addr, dst: Ipv4Addr, smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dmac);
    f[6..12].copy_from_slice(&smac);
    f[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&src.octets());
    f[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&dst.octets());
    fix_ip_checksum(&mut f);
    f
}

fn ip_header_ok(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    fold(sum16(&frame[ETH_HLEN..ETH_HLEN + ihl])) == 0xffff
}

/// A datagram of a tracked UDP flow sent in fragments, both ways: the
/// first fragment (it carries the ports) is translated as any packet of the
/// flow, and the later ones (same source, destination, protocol and IP id,
/// no ports) follow it: addresses, IP checksum and MACs rewritten, the rest
/// untouched. A later fragment of a datagram whose first was not seen passes.
#[test]
fn fragments_of_a_tracked_flow_follow_their_first() {
    instance!(
        "fragments_of_a_tracked_flow_follow_their_first",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&svc, BACKEND_A, 53, 1);
    let c = Csum::Complete;
    let q = Seg::udp(CLIENT, 40000, VIP, 53, b"query");
    let conn = must(lb.open(&q, &[sa(BACKEND_A, 53)], c), "the flow");
    must(
        lb.back(&conn, &conn.reply().data(b"answer"), c),
        "its reply",
    );

    // Client -> backend: first fragment, then the last.
    let first = q.clone().with(|t| {
        t.id = 0x7a01;
        t.more_fragments = true;
        t.payload = vec![0x11; 1472];
    });
    let want = first.nat(conn.nat, conn.backend, conn.lb_mac, mac_of(BACKEND_A));
    must(
        lb.expect(
            lb.ifs.eth0,
            &first.frame(),
            XDP_TX,
            &want.frame(),
            c,
            // The client's packet after the reply confirms the flow.
            &["to_backend", "established"],
        ),
        "first fragment to the backend",
    );
    let last = q.clone().with(|t| {
        t.id = 0x7a01;
        t.frag_offset = 185;
        t.payload = vec![0x22; 300];
    });
    let want = refragment(
        &last.frame(),
        *conn.nat.ip(),
        BACKEND_A,
        conn.lb_mac,
        mac_of(BACKEND_A),
    );
    assert!(ip_header_ok(&want));
    must(
        lb.expect(
            lb.ifs.eth0,
            &last.frame(),
            XDP_TX,
            &want,
            c,
            &["to_backend", "fragment"],
        ),
        "later fragment follows its first",
    );

    // Backend -> client, the same way.
    let rfirst = conn.reply().data(&[0x33; 1472]).with(|t| {
        t.id = 0x0b0b;
        t.more_fragments = true;
    });
    let want = rfirst.nat(
        conn.vip(),
        conn.client_addr(),
        conn.client.dmac,
        conn.client.smac,
    );
    must(
        lb.expect(
            conn.egress,
            &rfirst.frame(),
            XDP_TX,
            &want.frame(),
            c,
            &["to_client"],
        ),
        "first fragment to the client",
    );
    let rlast = conn.reply().data(&[0x44; 100]).with(|t| {
        t.id = 0x0b0b;
        t.frag_offset = 185;
    });
    let want = refragment(
        &rlast.frame(),
        VIP,
        CLIENT,
        conn.client.dmac,
        conn.client.smac,
    );
    must(
        lb.expect(
            conn.egress,
            &rlast.frame(),
            XDP_TX,
            &want,
            c,
            &["to_client", "fragment"],
        ),
        "later fragment to the client",
    );

    // Another datagram's later fragment (its first never came): passed.
    let orphan = last.clone().with(|t| t.id = 0x7a02);
    must(
        lb.passes(&orphan.frame(), "pass_fragment"),
        "later fragment without its first",
    );
    assert_eq!(lb.conns().len(), 1, "fragments make no flows");
}

/// An owner evicted from a full table (its connection is lost): the client
/// entry left behind is dropped at its next packet and counted `evicted`,
/// unlike one whose tuple another connection took (`stale`); the packet
/// goes to the kernel, which resets the connection.
#[test]
fn an_evicted_owner_is_counted() {
    instance!("an_evicted_owner_is_counted", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let c = Csum::Complete;
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.connect(&syn, &[sa(BACKEND_A, 80)], c), "a connection");
    lb.m.conntrack
        .delete(bytes(&conn.reverse_key()))
        .expect("evicting the owner");
    let data = syn.clone().data(HTTP_GET).frame();
    must(
        lb.expect(
            lb.ifs.eth0,
            &data,
            XDP_PASS,
            &data,
            c,
            &["evicted", "pass_not_ours"],
        ),
        "the client's next segment",
    );
    assert!(lb.entry(&syn.key()).is_none(), "the orphan is gone");
}

// ---------------------------------------------------------------------------
// Direct server return.

/// A DSR service: every packet of a flow (a SYN or not: one another lb node
/// saw first) goes to the backend the Maglev table gives, unchanged but
/// for its MACs; the flow stays there (a cache) while the backend serves
/// the service, drained included; no connection-table entry is made; a
/// backend port other than the service's is refused.
#[test]
fn dsr_changes_only_the_macs_and_keeps_flows_on_their_backend() {
    instance!(
        "dsr_changes_only_the_macs_and_keeps_flows_on_their_backend",
        lb,
        settings(),
        false
    );
    let dsr = lb::model::SvcConf {
        mode: lb::model::FwdMode::Dsr,
        ..Default::default()
    };
    let svc = lb.service_conf(VIP, 80, Proto::Tcp, dsr);
    lb.backend(&svc, BACKEND_A, 80, 1);
    lb.backend(&svc, BACKEND_B, 0, 1);
    let c = Csum::Complete;
    let listed = service::list(&lb.m).expect("list");
    assert_eq!(listed[0].conf.mode, lb::model::FwdMode::Dsr);

    // Which backend a packet went to, by its destination MAC (run once;
    // only the MACs change; exactly `moved` counted).
    let sent_to = |seg: &Seg, moved: &[&str]| -> Ipv4Addr {
        let before = lb.counters();
        let (v, out) = lb.run(lb.ifs.eth0, &seg.frame()).expect("test run");
        let after = lb.counters();
        assert_eq!(v, XDP_TX, "{seg:?}: {}", moved_counters(&before, &after));
        let to = [BACKEND_A, BACKEND_B]
            .into_iter()
            .find(|b| out == seg.clone().macs(ETH0_MAC, mac_of(*b)).frame())
            .unwrap_or_else(|| panic!("{seg:?}: not sent unchanged to a backend"));
        verify_checksums(&out, c).expect("checksums");
        counter_delta(&before, &after, moved, seg.frame().len()).expect("counters");
        to
    };
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let first = sent_to(&syn, &["to_backend", "new_flow"]);
    let other = if first == BACKEND_A {
        BACKEND_B
    } else {
        BACKEND_A
    };
    let data = syn.clone().data(HTTP_GET);
    assert_eq!(sent_to(&data, &["to_backend"]), first, "the flow stays");
    // A segment of a flow this node never saw: forwarded, not passed.
    let stray = Seg::tcp(CLIENT, 40001, VIP, 80).data(HTTP_GET);
    let b1 = sent_to(&stray, &["to_backend", "new_flow"]);
    assert_eq!(sent_to(&stray, &["to_backend"]), b1);
    assert!(lb.entries().is_empty(), "DSR makes no NAT entries");

    // Drained, the first backend keeps its flow.
    service::backend_set(
        &lb.m,
        &svc,
        sa(first, if first == BACKEND_A { 80 } else { 0 }),
        0,
    )
    .expect("drain");
    assert_eq!(
        sent_to(&data, &["to_backend"]),
        first,
        "drained: the flow stays"
    );
    // Removed, its flow goes to the other.
    service::backend_del(
        &lb.m,
        &svc,
        sa(first, if first == BACKEND_A { 80 } else { 0 }),
    )
    .expect("delete");
    assert_eq!(sent_to(&data, &["to_backend", "new_flow"]), other);

    // In DSR the backend's port is the service's.
    let e = service::backend_add(&lb.m, &svc, sa(BACKEND_C, 8080), 1).unwrap_err();
    assert!(format!("{e:#}").contains("DSR"), "{e:#}");
}

/// Client affinity (`affinity = "client-ip"`): every connection of one
/// client address goes to one backend, whatever its port; many client
/// addresses still spread over the backends.
#[test]
fn client_affinity_keeps_a_client_on_one_backend() {
    instance!(
        "client_affinity_keeps_a_client_on_one_backend",
        lb,
        settings(),
        false
    );
    let affinity = lb::model::SvcConf {
        affinity: lb::model::Affinity::ClientIp,
        ..Default::default()
    };
    let svc = lb.service_conf(VIP, 80, Proto::Tcp, affinity);
    lb.backend(&svc, BACKEND_A, 80, 1);
    lb.backend(&svc, BACKEND_B, 80, 1);
    assert_eq!(
        service::list(&lb.m).unwrap()[0].conf.affinity,
        lb::model::Affinity::ClientIp
    );
    let both = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;
    let one: std::collections::BTreeSet<SocketAddrV4> = (0..40)
        .map(|i| {
            must(
                lb.open(&Seg::syn(CLIENT, 41000 + i, VIP, 80), &both, c),
                "a port",
            )
            .backend
        })
        .collect();
    assert_eq!(one.len(), 1, "one client's connections: {one:?}");
    let many: std::collections::BTreeSet<SocketAddrV4> = (0..32u8)
        .map(|i| {
            let client = Ipv4Addr::new(10, 200, 3, 10 + i);
            must(
                lb.open(&Seg::syn(client, 40000, VIP, 80), &both, c),
                "a client",
            )
            .backend
        })
        .collect();
    assert_eq!(many.len(), 2, "32 clients on one backend");
}

/// Lets `secs` seconds pass for the client affinity map (of IPv4): every
/// remembered client's last new flow moves that far into the past.
fn affinity_ages(lb: &Lb<'_>, secs: u32) {
    let ticks = u64::from(secs * lb::clock::hz().expect("HZ"));
    let m = &lb.skel.maps.affinity;
    for k in m.keys().collect::<Vec<_>>() {
        let mut v = m.lookup(&k, MapFlags::ANY).unwrap().expect("an entry");
        let seen = u64::from_ne_bytes(v[8..16].try_into().unwrap()) - ticks;
        v[8..16].copy_from_slice(&seen.to_ne_bytes());
        m.update(&k, &v, MapFlags::EXIST).unwrap();
    }
}

/// Client affinity with a timeout (`affinity_timeout`, IPVS `-p`): a
/// client's new flow within the timeout of its last one goes to the backend
/// that one took, even after the backends changed so that Maglev picks
/// another; past the timeout, Maglev's choice; never a drained backend.
#[test]
fn client_affinity_timeout_remembers_the_backend() {
    instance!(
        "client_affinity_timeout_remembers_the_backend",
        lb,
        settings(),
        false
    );
    let conf = lb::model::SvcConf {
        affinity: lb::model::Affinity::ClientIp,
        affinity_timeout: Some(300),
        ..Default::default()
    };
    let svc = lb.service_conf(VIP, 80, Proto::Tcp, conf);
    assert_eq!(service::list(&lb.m).unwrap()[0].conf, conf);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let (a, b) = (sa(BACKEND_A, 80), sa(BACKEND_B, 80));
    let c = Csum::Complete;
    let flow = |port: u16| Seg::syn(CLIENT, port, VIP, 80);

    let first = must(lb.open(&flow(41000), &[a], c), "the only backend");
    assert_eq!(first.backend, a);
    // B takes nearly all of the Maglev table: a new client goes there...
    lb.backend(&svc, BACKEND_B, 80, 1000);
    let other = must(
        lb.open(&Seg::syn(CLIENT2, 41000, VIP, 80), &[a, b], c),
        "a new client",
    );
    assert_eq!(other.backend, b, "Maglev's choice");
    // ... this one stays on A, whatever its port.
    for port in [41001, 41002] {
        let again = must(lb.open(&flow(port), &[a, b], c), "same client");
        assert_eq!(again.backend, a, "port {port}: the remembered backend");
    }
    // Within the timeout of its last new flow: still A.
    affinity_ages(&lb, 299);
    let kept = must(lb.open(&flow(41003), &[a, b], c), "within the timeout");
    assert_eq!(kept.backend, a);
    // Past it: Maglev's choice, remembered from then on.
    affinity_ages(&lb, 301);
    let expired = must(lb.open(&flow(41004), &[a, b], c), "past the timeout");
    assert_eq!(expired.backend, b, "Maglev's choice after expiry");
    service::backend_set(&lb.m, &svc, a, 1000).unwrap();
    let stays = must(lb.open(&flow(41005), &[a, b], c), "B remembered");
    assert_eq!(stays.backend, b);
    // The remembered backend drained (weight 0): not used.
    service::backend_set(&lb.m, &svc, b, 0).unwrap();
    let drained = must(lb.open(&flow(41006), &[a, b], c), "B drained");
    assert_eq!(drained.backend, a, "not the drained backend");
    // Its established connections stay on it.
    must(
        lb.cont(&stays, &flow(41005).ack(), c),
        "B's connection goes on",
    );
}

/// Client affinity without a timeout keeps no state: the Maglev choice of
/// the client address, which follows the backend set.
#[test]
fn client_affinity_without_timeout_follows_maglev() {
    instance!(
        "client_affinity_without_timeout_follows_maglev",
        lb,
        settings(),
        false
    );
    let conf = lb::model::SvcConf {
        affinity: lb::model::Affinity::ClientIp,
        ..Default::default()
    };
    let svc = lb.service_conf(VIP, 80, Proto::Tcp, conf);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let (a, b) = (sa(BACKEND_A, 80), sa(BACKEND_B, 80));
    let c = Csum::Complete;
    let first = must(lb.open(&Seg::syn(CLIENT, 41000, VIP, 80), &[a], c), "A");
    assert_eq!(first.backend, a);
    lb.backend(&svc, BACKEND_B, 80, 1000);
    let next = must(lb.open(&Seg::syn(CLIENT, 41001, VIP, 80), &[a, b], c), "B");
    assert_eq!(next.backend, b, "Maglev's choice: no memory");
    assert_eq!(lb.skel.maps.affinity.keys().count(), 0);
}

// ---------------------------------------------------------------------------
// UDP.

#[test]
fn udp_flow_and_return() {
    instance!("udp_flow_and_return", lb, settings(), false);
    let svc = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&svc, BACKEND_A, 53, 1);
    lb.backend(&svc, BACKEND_B, 53, 1);
    let backends = [sa(BACKEND_A, 53), sa(BACKEND_B, 53)];
    let c = Csum::Complete;
    let q = Seg::udp(CLIENT, 40000, VIP, 53, DNS_QUERY);
    let conn = must(lb.open(&q, &backends, c), "UDP query opens a flow");
    let conns = lb.conns();
    assert_eq!((conns.len(), conns[0].proto), (1, "udp"));
    must(
        lb.back(
            &conn,
            &conn.reply().with(|t| t.payload = DNS_ANSWER.to_vec()),
            c,
        ),
        "answer",
    );
    must(
        lb.cont(
            &conn,
            &q.clone().with(|t| t.payload = b"second".to_vec()),
            c,
        ),
        "second query",
    );
    let opts = q.clone().with(|t| t.ip_options = IP_OPTIONS.to_vec());
    must(lb.cont(&conn, &opts, c), "query with IP options");
    // A FIN bit means nothing to UDP: no closing.
    assert_eq!(lb.entry(&q.key()).unwrap().state, 0);
}

#[test]
fn udp_without_checksum_stays_without() {
    instance!("udp_without_checksum_stays_without", lb, settings(), false);
    let svc = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&svc, BACKEND_A, 5353, 1);
    let c = Csum::Complete;
    let q = Seg::udp(CLIENT, 40000, VIP, 53, DNS_QUERY).with(|t| t.no_checksum = true);
    let f = q.frame();
    let at = locate(&f).unwrap();
    assert_eq!(l4_field(&f, &at), 0, "fixture: no checksum");
    let conn = must(
        lb.open(&q, &[sa(BACKEND_A, 5353)], c),
        "query without checksum",
    );
    must(lb.cont(&conn, &q, c), "again");
    let a = conn.reply().with(|t| {
        t.payload = DNS_ANSWER.to_vec();
        t.no_checksum = true;
    });
    must(lb.back(&conn, &a, c), "answer without checksum");
}

#[test]
fn checksums_that_compute_to_zero() {
    instance!("checksums_that_compute_to_zero", lb, one_nat_port(), false);
    let udp = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&udp, BACKEND_A, 53, 1);
    let tcp = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&tcp, BACKEND_A, 8080, 1);
    let c = Csum::Complete;
    let nat = sa(LB, 61000); // the only NAT port

    // UDP, client -> backend: the rewritten checksum computes to 0 and must
    // be sent as 0xffff (0 would mean "no checksum").
    let client = sa(CLIENT, 40000);
    let payload = payload_for_zero_checksum(b"zero", |p| {
        Seg::udp(CLIENT, 40000, VIP, 53, p)
            .nat(nat, sa(BACKEND_A, 53), ETH0_MAC, BACKEND_A_MAC)
            .frame()
    });
    let q = Seg::udp(*client.ip(), client.port(), VIP, 53, &payload);
    let input = q.frame();
    let at = locate(&input).unwrap();
    assert!(
        !matches!(l4_field(&input, &at), 0 | 0xffff),
        "fixture: an ordinary input checksum"
    );
    let want = q
        .nat(nat, sa(BACKEND_A, 53), ETH0_MAC, BACKEND_A_MAC)
        .frame();
    assert_eq!(
        l4_field(&want, &locate(&want).unwrap()),
        0xffff,
        "fixture: etherparse's 0xffff"
    );
    let conn = must(
        lb.open(&q, &[sa(BACKEND_A, 53)], c),
        "UDP whose new checksum is 0",
    );
    assert_eq!(conn.nat, nat);

    // UDP, backend -> client.
    let payload = payload_for_zero_checksum(b"back", |p| {
        conn.reply()
            .with(|t| t.payload = p.to_vec())
            .nat(sa(VIP, 53), client, ETH0_MAC, PEER_MAC)
            .frame()
    });
    let a = conn.reply().with(|t| t.payload = payload);
    must(lb.back(&conn, &a, c), "UDP reply whose new checksum is 0");

    // TCP has no such rule: a checksum computing to 0 is sent as 0.
    let payload = payload_for_zero_checksum(b"tcp0", |p| {
        Seg::syn(CLIENT, 40000, VIP, 80)
            .with(|t| t.payload = p.to_vec())
            .nat(nat, sa(BACKEND_A, 8080), ETH0_MAC, BACKEND_A_MAC)
            .frame()
    });
    let s = Seg::syn(CLIENT, 40000, VIP, 80).with(|t| t.payload = payload.clone());
    let want = s
        .nat(nat, sa(BACKEND_A, 8080), ETH0_MAC, BACKEND_A_MAC)
        .frame();
    assert_eq!(l4_field(&want, &locate(&want).unwrap()), 0);
    must(
        lb.open(&s, &[sa(BACKEND_A, 8080)], c).map(drop),
        "TCP whose new checksum is 0",
    );
}

// ---------------------------------------------------------------------------
// Services.

#[test]
fn wildcard_service_and_backend_port_zero() {
    instance!(
        "wildcard_service_and_backend_port_zero",
        lb,
        settings(),
        false
    );
    let any = lb.service(VIP2, 0, Proto::Tcp);
    lb.backend(&any, BACKEND_A, 0, 1);
    let http = lb.service(VIP2, 80, Proto::Tcp);
    lb.backend(&http, BACKEND_B, 8080, 1);
    let dns = lb.service(VIP2, 0, Proto::Udp);
    lb.backend(&dns, BACKEND_B, 0, 1);
    let tls = lb.service(VIP, 443, Proto::Tcp);
    lb.backend(&tls, BACKEND_A, 0, 1);
    let c = Csum::Complete;

    for port in [22, 5000, 65535, 1] {
        let syn = Seg::syn(CLIENT, 40000, VIP2, port);
        let conn = must(
            lb.open(&syn, &[sa(BACKEND_A, 0)], c),
            &format!("VIP2:{port}"),
        );
        assert_eq!(
            conn.backend,
            sa(BACKEND_A, port),
            "the client's port is kept"
        );
        must(
            lb.back(&conn, &conn.reply().synack(), c),
            &format!("reply from A:{port}"),
        );
    }
    // The service on the exact port wins over the wildcard.
    let syn = Seg::syn(CLIENT, 40000, VIP2, 80);
    let conn = must(
        lb.open(&syn, &[sa(BACKEND_B, 8080)], c),
        "VIP2:80 exact service",
    );
    must(
        lb.back(&conn, &conn.reply().synack(), c),
        "reply from B:8080",
    );
    // A wildcard is per protocol.
    let q = Seg::udp(CLIENT, 40000, VIP2, 5353, DNS_QUERY);
    let conn = must(lb.open(&q, &[sa(BACKEND_B, 0)], c), "UDP VIP2:5353");
    assert_eq!(conn.backend, sa(BACKEND_B, 5353));
    // Backend port 0 on a one-port service.
    let conn = must(
        lb.open(&Seg::syn(CLIENT, 40002, VIP, 443), &[sa(BACKEND_A, 0)], c),
        "VIP:443",
    );
    assert_eq!(conn.backend, sa(BACKEND_A, 443));
    // No wildcard on VIP: other ports of VIP are not ours.
    must(
        lb.passes(&Seg::syn(CLIENT, 40000, VIP, 444).frame(), "pass_not_ours"),
        "VIP:444",
    );
}

#[test]
fn weight_zero_drains() {
    instance!("weight_zero_drains", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let backends = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &backends, c), "flow before the drain");

    service::backend_set(&lb.m, &svc, sa(BACKEND_A, 80), 0).expect("weight 0");
    let new = Seg::syn(CLIENT, 40002, VIP, 80);
    must(
        lb.drops(&new.frame(), "drop_no_backend"),
        "new flow while draining",
    );
    assert!(
        lb.entry(&new.key()).is_none(),
        "a refused flow left an entry"
    );
    assert_eq!(lb.entries().len(), 2);
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), c),
        "established flow continues",
    );
    must(
        lb.back(&conn, &conn.reply().data(HTTP_OK), c),
        "and its replies",
    );

    service::backend_set(&lb.m, &svc, sa(BACKEND_A, 80), 1).expect("weight 1");
    must(
        lb.open(&new, &backends, c).map(drop),
        "new flow after the drain",
    );

    // A service without any backend refuses new flows the same way.
    lb.service(VIP, 81, Proto::Tcp);
    must(
        lb.drops(&Seg::syn(CLIENT, 40000, VIP, 81).frame(), "drop_no_backend"),
        "service without backends",
    );
}

#[test]
fn nat_port_range_exhausted_per_backend() {
    instance!(
        "nat_port_range_exhausted_per_backend",
        lb,
        one_nat_port(),
        false
    );
    let s1 = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&s1, BACKEND_A, 80, 1);
    let s2 = lb.service(VIP2, 80, Proto::Tcp);
    lb.backend(&s2, BACKEND_B, 80, 1);
    let s3 = lb.service(VIP, 8080, Proto::Tcp);
    lb.backend(&s3, BACKEND_A, 8080, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    let first = Seg::syn(CLIENT, 40000, VIP, 80);
    let c1 = must(lb.open(&first, &a80, c), "first flow takes the only port");
    assert_eq!(c1.nat, sa(LB, 61000));
    // Answered: from now on the tuple is the first flow's (an unanswered
    // SYN's tuple goes to the next new flow, see
    // syn_flood_cannot_hold_nat_ports).
    must(lb.back(&c1, &c1.reply().synack(), c), "first flow answered");
    let second = Seg::syn(CLIENT2, 40000, VIP, 80);
    must(
        lb.drops(&second.frame(), "drop_nat_full"),
        "second flow to A:80",
    );
    assert!(lb.entry(&second.key()).is_none());
    let third = Seg::syn(CLIENT, 40002, VIP, 80);
    must(
        lb.drops(&third.frame(), "drop_nat_full"),
        "same client, other port, to A:80",
    );
    must(
        lb.cont(&c1, &first.clone().data(HTTP_GET), c),
        "the first flow goes on",
    );
    must(lb.back(&c1, &c1.reply().data(HTTP_OK), c), "and back");

    // Ports are per backend address and port.
    let cb = must(
        lb.open(&Seg::syn(CLIENT2, 40000, VIP2, 80), &[sa(BACKEND_B, 80)], c),
        "to B:80",
    );
    assert_eq!(cb.nat, sa(LB, 61000));
    let ca = must(
        lb.open(
            &Seg::syn(CLIENT2, 40000, VIP, 8080),
            &[sa(BACKEND_A, 8080)],
            c,
        ),
        "A:8080",
    );
    assert_eq!(ca.nat, sa(LB, 61000));

    // The first flow's entries deleted: the port is free again.
    let a1 = lb.entry(&first.key()).unwrap().backend;
    let gone = conntrack::end_flows(&lb.m, |f| f.backend == a1).expect("ending the first flow");
    assert_eq!(gone, 2);
    let c2 = must(
        lb.open(&second, &a80, c),
        "second flow once the port is free",
    );
    must(lb.back(&c2, &c2.reply().synack(), c), "second flow's reply");
    must(
        lb.drops(&first.frame(), "drop_nat_full"),
        "the ended flow cannot come back",
    );

    // Removing and re-adding the backend ends its flows: free again.
    service::backend_del(&lb.m, &s1, sa(BACKEND_A, 80)).expect("backend del");
    lb.backend(&s1, BACKEND_A, 80, 1);
    let c3 = must(lb.open(&third, &a80, c), "flow after backend del + add");
    assert_eq!(c3.nat, sa(LB, 61000));

    // An expired way back frees the port too (its flow idle as long).
    lb.age_out(&third.key());
    lb.age_out(&c3.reverse_key());
    assert_eq!(
        lb.conns()
            .iter()
            .find(|k| k.nat == c3.nat.into() && k.client == sa(CLIENT, 40002).into())
            .unwrap()
            .state,
        "expired"
    );
    let c4 = must(lb.open(&second, &a80, c), "flow over an expired one");
    assert_eq!(c4.nat, sa(LB, 61000));
}

#[test]
fn backend_del_ends_its_flows_only() {
    instance!("backend_del_ends_its_flows_only", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let b = lb.backend(&svc, BACKEND_B, 80, 1);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;
    let mut conns: Vec<Conn> = Vec::new();
    for sport in (40000..).step_by(2) {
        let n = |ip| conns.iter().filter(|k| *k.backend.ip() == ip).count();
        if n(BACKEND_A) >= 2 && n(BACKEND_B) >= 2 {
            break;
        }
        conns.push(must(
            lb.open(&Seg::syn(CLIENT, sport, VIP, 80), &backends, c),
            "SYN",
        ));
    }
    service::backend_del(&lb.m, &svc, sa(BACKEND_A, 80)).expect("backend del");

    for (k, f) in lb.entries() {
        assert_ne!(
            f.backend, a,
            "entry of the removed backend left: {k:?} {f:?}"
        );
        assert!(f.daddr != maps::ip_to_be(BACKEND_A) && k.saddr != maps::ip_to_be(BACKEND_A));
    }
    let listed = lb.conns();
    assert!(
        listed
            .iter()
            .all(|k| k.backend_id == b && k.backend.ip() == BACKEND_B),
        "{listed:?}"
    );
    assert_eq!(
        listed.len(),
        conns
            .iter()
            .filter(|k| *k.backend.ip() == BACKEND_B)
            .count()
    );
    assert!(service::list(&lb.m).unwrap()[0]
        .backends
        .iter()
        .all(|x| x.id == b));

    for conn in &conns {
        let ack = conn.client.clone().ack();
        if *conn.backend.ip() == BACKEND_B {
            must(lb.cont(conn, &ack, c), "B's flow goes on");
            must(lb.back(conn, &conn.reply().ack(), c), "B's flow's replies");
        } else {
            let r = conn.reply().data(HTTP_OK).frame();
            must(lb.passes(&r, "pass_not_ours"), "A's replies are nobody's");
            // A stray segment of the ended flow goes to the kernel (which
            // resets it); the client starts over, on B.
            must(
                lb.passes(&ack.frame(), "pass_not_ours"),
                "A's client's ACK after the end",
            );
            let syn = ack.clone().with(|t| {
                t.syn = true;
                t.ack = None;
            });
            let moved = must(
                lb.open(&syn, &[sa(BACKEND_B, 80)], c),
                "A's client moves to B",
            );
            assert_eq!(lb.entry(&syn.key()).unwrap().backend, b);
            must(lb.back(&moved, &moved.reply().ack(), c), "from B");
        }
    }
}

#[test]
fn redirect_to_another_interface() {
    instance!("redirect_to_another_interface", lb, settings(), false);
    for i in [lb.ifs.eth0, lb.ifs.eth2] {
        lb.m.tx_ports
            .update(&i.to_ne_bytes(), &i.to_ne_bytes(), MapFlags::ANY)
            .expect("adding to the redirect map");
    }
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_C, 80, 1);
    let c = Csum::Complete;
    let syn = Seg::syn(CLIENT, 40000, VIP, 80).with(|t| t.tcp_options = tcp_options());
    let conn = must(
        lb.open(&syn, &[sa(BACKEND_C, 80)], c),
        "SYN redirected to eth2",
    );
    assert_eq!(
        (conn.egress, *conn.nat.ip(), conn.lb_mac),
        (lb.ifs.eth2, LB2, ETH2_MAC)
    );
    must(
        lb.back(&conn, &conn.reply().synack(), c),
        "SYN-ACK from eth2 redirected to eth0",
    );
    must(lb.cont(&conn, &syn.clone().data(HTTP_GET), c), "data");
    must(lb.back(&conn, &conn.reply().data(HTTP_OK), c), "reply");

    // Without the devmap entry the program falls back to bpf_redirect.
    lb.m.tx_ports
        .delete(&lb.ifs.eth2.to_ne_bytes())
        .expect("removing eth2");
    must(
        lb.cont(&conn, &syn.clone().ack(), c),
        "redirect without the devmap entry",
    );
}

// ---------------------------------------------------------------------------
// Neighbour and route.

#[test]
fn unresolved_backend_is_rewritten_and_passed_until_resolved() {
    if !common::root_or_skip("unresolved_backend_is_rewritten_and_passed_until_resolved") {
        return;
    }
    let lab = Lab::new();
    let (_guard, ifs) = lab.enter();
    let mut storage = MaybeUninit::uninit();
    let lb = Lb::new(ifs, settings(), false, &mut storage);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_UNRESOLVED, 80, 1);
    let c = Csum::Complete;
    let backend = sa(BACKEND_UNRESOLVED, 80);

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let input = syn.frame();
    let before = lb.counters();
    let (verdict, out) = lb.run(ifs.eth0, &input).expect("BPF_PROG_TEST_RUN");
    let after = lb.counters();
    assert_eq!(verdict, XDP_PASS, "{}", verdict_name(verdict));
    let at = locate(&out).expect("an IPv4/TCP output");
    let (nat, _) = endpoints(&out, &at);
    assert_eq!(*nat.ip(), LB);
    let r = lb.settings.nat_ports[0];
    let (lo, hi) = (r.lo, r.hi);
    assert!((lo..=hi).contains(&nat.port()), "NAT port {}", nat.port());
    // Rewritten (L3/L4), MACs as they came: the kernel forwards it.
    let want = syn.nat(nat, backend, PEER_MAC, ETH0_MAC).frame();
    must(same_frame(&out, &want), "first packet, unresolved");
    verify_checksums(&out, c).expect("output checksums");
    must(
        counter_delta(&before, &after, &["new_flow", "pass_no_neigh"], input.len()),
        "first packet's counters",
    );
    // The flow is recorded, its next hop not resolved.
    let f = lb.entry(&syn.key()).expect("the flow is recorded");
    assert_eq!((f.nh_ok, f.ifindex), (0, ifs.eth0));
    assert_eq!(
        lb.entry(&flow_key(backend, nat, TCP))
            .expect("the way back")
            .nh_ok,
        1
    );
    let conn = Conn {
        client: syn.clone(),
        backend,
        nat,
        egress: ifs.eth0,
        lb_mac: ETH0_MAC,
    };
    let ack = syn.clone().ack();
    let want = ack.nat(nat, backend, PEER_MAC, ETH0_MAC).frame();
    must(
        lb.expect(
            ifs.eth0,
            &ack.frame(),
            XDP_PASS,
            &want,
            c,
            &["pass_no_neigh"],
        ),
        "second packet, still unresolved",
    );

    // Resolved: the next packet goes out with MACs, XDP_TX.
    lab.neigh_add(BACKEND_UNRESOLVED, "eth0");
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), c),
        "resolved: forwarded",
    );
    let f = lb.entry(&syn.key()).unwrap();
    assert_eq!((f.nh_ok, f.dmac, f.smac), (1, UNRESOLVED_MAC, ETH0_MAC));
    must(lb.check_entries(&conn, true), "entries once resolved");
    must(lb.back(&conn, &conn.reply().synack(), c), "reply");
}

#[test]
fn unrouted_backend_passes_untouched() {
    instance!("unrouted_backend_passes_untouched", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_UNROUTED, 80, 1);
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    must(
        lb.passes(&syn.frame(), "pass_no_route"),
        "SYN to an unrouted backend",
    );
    must(
        lb.passes(&syn.clone().data(HTTP_GET).frame(), "pass_not_ours"),
        "data without a flow",
    );
    assert!(lb.entries().is_empty(), "no route, no flow");
}

// ---------------------------------------------------------------------------
// skb mode: partial checksums.

#[test]
fn skb_mode_partial_checksums() {
    instance!("skb_mode_partial_checksums", lb, settings(), true);
    let tcp = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&tcp, BACKEND_A, 8080, 1);
    let udp = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&udp, BACKEND_A, 5353, 1);
    let (p, c) = (Csum::Partial, Csum::Complete);

    let syn = Seg::syn(CLIENT, 40000, VIP, 80).with(|t| t.tcp_options = tcp_options());
    let conn = must(
        lb.open(&syn, &[sa(BACKEND_A, 8080)], p),
        "partial SYN -> :8080",
    );
    must(
        lb.back(&conn, &conn.reply().synack(), p),
        "partial SYN-ACK from :8080",
    );
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), p),
        "partial data",
    );
    let opts = syn
        .clone()
        .data(HTTP_GET)
        .with(|t| t.ip_options = IP_OPTIONS.to_vec());
    must(lb.cont(&conn, &opts, p), "partial data with IP options");
    must(
        lb.back(&conn, &conn.reply().data(HTTP_OK), p),
        "partial data back",
    );
    // Complete checksums stay complete in skb mode.
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), c),
        "complete data",
    );
    must(
        lb.back(&conn, &conn.reply().data(HTTP_OK), c),
        "complete data back",
    );
    let syn2 = Seg::syn(CLIENT, 40002, VIP, 80).with(|t| t.payload = HTTP_GET.to_vec());
    let conn2 = must(
        lb.open(&syn2, &[sa(BACKEND_A, 8080)], c),
        "complete first packet",
    );
    must(
        lb.back(&conn2, &conn2.reply().data(HTTP_OK), c),
        "complete back",
    );

    let q = Seg::udp(CLIENT, 40000, VIP, 53, DNS_QUERY);
    let conn = must(
        lb.open(&q, &[sa(BACKEND_A, 5353)], p),
        "partial UDP -> :5353",
    );
    must(
        lb.back(
            &conn,
            &conn.reply().with(|t| t.payload = DNS_ANSWER.to_vec()),
            p,
        ),
        "UDP back",
    );
    must(lb.cont(&conn, &q, c), "complete UDP");
    must(
        lb.back(
            &conn,
            &conn.reply().with(|t| t.payload = DNS_ANSWER.to_vec()),
            c,
        ),
        "complete back",
    );
    let none = q.clone().with(|t| t.no_checksum = true);
    must(lb.cont(&conn, &none, c), "UDP without checksum in skb mode");
}

/// A complete checksum that happens to equal the pseudo-header sum (once in
/// 65536 packets) must be updated as the complete checksum it is: in native
/// mode no guess is made, in skb mode the segment is summed to tell.
fn ambiguous_complete_checksum(name: &str, skb: bool) {
    instance!(name, lb, settings(), skb);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 8080, 1);
    // A complete checksum that happens to equal the pseudo-header sum.
    let seg = |p: &[u8]| Seg::syn(CLIENT, 40000, VIP, 80).with(|t| t.payload = p.to_vec());
    let payload = (0..=u16::MAX)
        .map(|w| [b"same".as_slice(), &w.to_be_bytes()].concat())
        .find(|p| {
            let f = seg(p).frame();
            let at = locate(&f).unwrap();
            l4_field(&f, &at) == pseudo_sum(&f, &at)
        })
        .expect("a payload whose checksum is the pseudo-header sum");
    let conn = lb.open(&seg(&payload), &[sa(BACKEND_A, 8080)], Csum::Complete);
    must(
        conn.map(drop),
        "native mode updates it as the complete checksum it is",
    );
}

#[test]
fn native_mode_never_guesses_partial() {
    ambiguous_complete_checksum("native_mode_never_guesses_partial", false);
}

#[test]
fn skb_mode_tells_a_complete_checksum_that_looks_partial() {
    ambiguous_complete_checksum(
        "skb_mode_tells_a_complete_checksum_that_looks_partial",
        true,
    );
}

// ---------------------------------------------------------------------------
// Connection-table timeouts.

#[test]
fn expired_entries() {
    instance!("expired_entries", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let udp = lb.service(VIP, 53, Proto::Udp);
    lb.backend(&udp, BACKEND_A, 53, 1);
    let backends = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    // An expired connection: the client's next packet is a new flow.
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &backends, c), "SYN");
    lb.age_out(&syn.key());
    lb.age_out(&conn.reverse_key());
    assert_eq!(lb.conns()[0].state, "expired");
    must(
        lb.passes(&conn.reply().data(HTTP_OK).frame(), "pass_not_ours"),
        "expired way back",
    );
    must(
        lb.passes(&syn.clone().ack().frame(), "pass_not_ours"),
        "a stray ACK after expiry goes to the kernel",
    );
    let again = must(lb.open(&syn, &backends, c), "client's new SYN after expiry");
    must(lb.back(&again, &again.reply().ack(), c), "new way back");

    // Closing entries expire after fin_timeout.
    let syn2 = Seg::syn(CLIENT, 40002, VIP, 80);
    let conn2 = must(lb.open(&syn2, &backends, c), "SYN 2");
    must(lb.cont(&conn2, &syn2.clone().fin(), c), "FIN");
    must(lb.back(&conn2, &conn2.reply().fin(), c), "FIN back");
    assert_ne!(lb.owner(&conn2).state & maps::CT_CLOSING, 0);
    lb.age_out(&syn2.key());
    lb.age_out(&conn2.reverse_key());
    must(
        lb.passes(&conn2.reply().fin().frame(), "pass_not_ours"),
        "closed way back",
    );
    must(
        lb.open(&syn2, &backends, c).map(drop),
        "closed flow's client again",
    );

    // UDP, with its own timeout.
    let q = Seg::udp(CLIENT, 40000, VIP, 53, DNS_QUERY);
    let conn3 = must(lb.open(&q, &[sa(BACKEND_A, 53)], c), "UDP");
    lb.age_out(&q.key());
    lb.age_out(&conn3.reverse_key());
    must(
        lb.passes(&conn3.reply().frame(), "pass_not_ours"),
        "expired UDP way back",
    );
    must(
        lb.open(&q, &[sa(BACKEND_A, 53)], c).map(drop),
        "UDP client again",
    );
}

/// A connection lives as long as packets flow in either direction: while a
/// client keeps sending (one-way UDP: syslog, metrics, media) and the backend
/// stays silent, the backend's eventual reply must reach the client, and no
/// other flow may take the connection's NAT port.
#[test]
fn one_way_client_flow_keeps_its_way_back() {
    instance!(
        "one_way_client_flow_keeps_its_way_back",
        lb,
        one_nat_port(),
        false
    );
    let svc = lb.service(VIP, 514, Proto::Udp);
    lb.backend(&svc, BACKEND_A, 514, 1);
    let c = Csum::Complete;
    let log = Seg::udp(CLIENT, 40000, VIP, 514, b"<14>one-way");
    let conn = must(lb.open(&log, &[sa(BACKEND_A, 514)], c), "first datagram");
    // 80 s (udp_timeout: 60 s) of datagrams from the client, none back.
    for _ in 0..2 {
        lb.time_passes(40);
        must(lb.cont(&conn, &log, c), "the client keeps sending");
    }
    let mut failures = Vec::new();
    let reply = conn.reply().with(|t| t.payload = b"ack".to_vec());
    if let Err(e) = lb.back(&conn, &reply, c) {
        failures.push(format!("the backend's reply to the live flow: {e}"));
    }
    let other = Seg::udp(CLIENT2, 40000, VIP, 514, b"<14>other");
    if let Err(e) = lb.drops(&other.frame(), "drop_nat_full") {
        failures.push(format!(
            "another client took the live flow's only NAT port: {e}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The other way round: a backend streams to a silent client for longer
/// than udp_timeout; the client's next datagram belongs to the same flow.
#[test]
fn one_way_backend_flow_keeps_its_nat_port() {
    instance!(
        "one_way_backend_flow_keeps_its_nat_port",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 5004, Proto::Udp);
    lb.backend(&svc, BACKEND_A, 5004, 1);
    let c = Csum::Complete;
    let hello = Seg::udp(CLIENT, 40000, VIP, 5004, b"PLAY");
    let conn = must(
        lb.open(&hello, &[sa(BACKEND_A, 5004)], c),
        "the client's request",
    );
    // 80 s of stream from the backend, nothing from the client.
    for _ in 0..2 {
        lb.time_passes(40);
        let frame = conn.reply().with(|t| t.payload = b"frame".to_vec());
        must(lb.back(&conn, &frame, c), "the backend keeps streaming");
    }
    let stop = hello.clone().with(|t| t.payload = b"STOP".to_vec());
    must(
        lb.cont(&conn, &stop, c),
        "the client's next datagram, same flow",
    );
}

// ---------------------------------------------------------------------------
// Maglev.

/// New flows from `flows` even source ports over backends a and b with
/// `weights`; returns how many went to each.
fn spread(lb: &Lb, weights: [u32; 2], flows: usize) -> (usize, usize) {
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, weights[0]);
    let b = lb.backend(&svc, BACKEND_B, 80, weights[1]);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let (mut na, mut nb) = (0, 0);
    // Even source ports only, as connect() picks them.
    for sport in (40000..).step_by(2).take(flows) {
        let conn = must(
            lb.open(&Seg::syn(CLIENT, sport, VIP, 80), &backends, Csum::Complete),
            "SYN",
        );
        if *conn.backend.ip() == BACKEND_A {
            na += 1;
        } else {
            nb += 1;
        }
    }
    assert_eq!(lb.traffic(a).new_flows, na as u64);
    assert_eq!(lb.traffic(b).new_flows, nb as u64);
    let i = stats::index("new_flow").unwrap();
    assert_eq!(lb.counters()[i].packets, flows as u64);
    eprintln!("{flows} flows, weights {weights:?}: {na} to {BACKEND_A}, {nb} to {BACKEND_B}");
    (na, nb)
}

#[test]
fn maglev_spreads_flows_over_equal_backends() {
    instance!(
        "maglev_spreads_flows_over_equal_backends",
        lb,
        settings(),
        false
    );
    let flows = 200;
    let (a, b) = spread(&lb, [1, 1], flows);
    let min = flows / 4;
    assert!(
        a > min && b > min,
        "{flows} flows: {a} and {b}; each should get more than {min}"
    );
}

#[test]
fn maglev_follows_weights() {
    instance!("maglev_follows_weights", lb, settings(), false);
    let flows = 400;
    let (a, _) = spread(&lb, [3, 1], flows);
    let share = a * 100 / flows;
    assert!(
        (60..=90).contains(&share),
        "weight 3 of 4 got {share}% of {flows} flows"
    );
}

// ---------------------------------------------------------------------------

#[test]
fn stat_names_match_the_map() {
    instance!("stat_names_match_the_map", lb, settings(), false);
    assert_eq!(
        stats::NAMES.len(),
        lb.skel.maps.stats.max_entries() as usize,
        "src/stats.rs NAMES and enum lb_stat (LB_STAT_MAX) disagree"
    );
    assert_eq!(lb.m.stats.max_entries() as usize, stats::NAMES.len());
    for (i, n) in stats::NAMES.iter().enumerate() {
        assert_eq!(stats::index(n), Some(i), "duplicate counter name {n}");
    }
}

/// A SYN flood cannot hold the NAT ports: a tuple whose SYN the backend has
/// not answered goes to the next new flow, and the flow it leaves behind is
/// stale (its packets are not forwarded on the tuple any more).
#[test]
fn syn_flood_cannot_hold_nat_ports() {
    instance!("syn_flood_cannot_hold_nat_ports", lb, one_nat_port(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;
    let spoofed = Seg::syn(STRANGER, 40000, VIP, 80);
    let s1 = must(lb.open(&spoofed, &a80, c), "unanswered SYN takes the port");
    let real = Seg::syn(CLIENT, 40000, VIP, 80);
    // For a tenth of a second the tuple waits for its answer (a real
    // handshake's SYN-ACK is on its way), then anyone may take it.
    must(
        lb.drops(&real.frame(), "drop_nat_full"),
        "a fresh unanswered SYN's tuple is not taken over",
    );
    lb.time_passes(1);
    let c2 = must(lb.open(&real, &a80, c), "a real client's SYN takes it over");
    assert_eq!(c2.nat, s1.nat);
    must(
        lb.back(&c2, &c2.reply().synack(), c),
        "answer to the real client",
    );
    must(lb.cont(&c2, &real.clone().ack(), c), "real client's ACK");
    // The spoofed flow's retransmitted SYN finds its entry stale and is
    // a new flow, which finds the only port answered: dropped.
    must(
        lb.expect(
            lb.ifs.eth0,
            &spoofed.frame(),
            XDP_DROP,
            &spoofed.frame(),
            c,
            &["stale", "drop_nat_full"],
        ),
        "the spoofed SYN again",
    );
    must(
        lb.back(&c2, &c2.reply().data(HTTP_OK), c),
        "real flow goes on",
    );
}

/// Half-open flows cannot evict answered ones: after far more unanswered
/// SYNs than the half-open table holds, every answered connection still
/// translates both ways; the flood's inserts replaced older half-open
/// entries (counted), and a new connection right after it is served.
#[test]
fn half_open_flood_cannot_evict_answered_flows() {
    let small = Settings {
        max_half_open: 1024,
        ..settings()
    };
    instance!(
        "half_open_flood_cannot_evict_answered_flows",
        lb,
        small,
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    lb.backend(&svc, BACKEND_A, 80, 1);
    lb.backend(&svc, BACKEND_B, 80, 1);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;
    let mut held = Vec::new();
    for port in 0..50u16 {
        let syn = Seg::syn(CLIENT, 30000 + port, VIP, 80);
        let conn = must(lb.connect(&syn, &backends, c), "a held connection");
        held.push((syn, conn));
    }
    // 16x the half-open table (2 x 1024 entries), distinct spoofed sources.
    let before = lb.counters();
    for i in 0..16 * 1024u32 {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 128, 0)) + i);
        let f = Seg::syn(src, 1024 + (i % 60000) as u16, VIP, 80).frame();
        let (v, _) = lb.run(lb.ifs.eth0, &f).expect("flood SYN");
        assert_eq!(v, XDP_TX, "flood SYN {i}");
    }
    let after = lb.counters();
    let made = after[stats::index("new_flow").unwrap()].packets
        - before[stats::index("new_flow").unwrap()].packets;
    assert_eq!(made, 16 * 1024, "every flood SYN made a half-open flow");
    // Two entries a flood SYN, into a table of 2 x 1024 (in sets of
    // WAYS): every insert past its size replaced an older half-open entry,
    // and was counted.
    let size = halfopen::sets_for(2 * 1024) as u64 * halfopen::WAYS as u64;
    let evicted = after[stats::index("half_open_evicted").unwrap()].packets
        - before[stats::index("half_open_evicted").unwrap()].packets;
    assert!(
        evicted >= 2 * 16 * 1024 - size,
        "half_open_evicted {evicted} after 32768 inserts into {size} entries"
    );
    // A real connection made right after the flood is served.
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(
        lb.open(&syn, &backends, c),
        "new connection after the flood",
    );
    must(lb.back(&conn, &conn.reply().synack(), c), "its SYN-ACK");
    must(lb.cont(&conn, &syn.clone().ack(), c), "its ACK");
    must(
        lb.cont(&conn, &syn.clone().data(HTTP_GET), c),
        "its request",
    );
    for (syn, conn) in &held {
        must(
            lb.cont(conn, &syn.clone().data(HTTP_GET), c),
            "held connection, client side, after the flood",
        );
        must(
            lb.back(conn, &conn.reply().data(HTTP_OK), c),
            "held connection, backend side, after the flood",
        );
    }
}

// ---------------------------------------------------------------------------
// Per-backend handshake latency, resets and unanswered SYNs (map be_hs).

/// The histogram bucket of a handshake of `ms` milliseconds plus at most
/// 30 ms of test overhead: bucket i holds (2^(i-1), 2^i] us.
fn bucket_of_ms(ms: u64) -> usize {
    let us = ms * 1000;
    let i = (64 - (us - 1).leading_zeros()) as usize;
    assert_eq!(
        i,
        (64 - ((us + 30_000) - 1).leading_zeros()) as usize,
        "{ms} ms: too near a bound"
    );
    i
}

/// A SYN, then the backend's SYN-ACK: one latency sample, in the bucket of
/// the time since the SYN; a retransmitted SYN-ACK adds none; a flow
/// reopened by its client's SYN gets a sample of its own.
#[test]
fn syn_then_synack_records_one_handshake() {
    instance!(
        "syn_then_synack_records_one_handshake",
        lb,
        settings(),
        false
    );
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let b = lb.backend(&svc, BACKEND_B, 80, 1);
    let backends = [sa(BACKEND_A, 80), sa(BACKEND_B, 80)];
    let c = Csum::Complete;
    let empty = stats::Handshakes {
        buckets: vec![0; maps::HS_BUCKETS],
        sum_ns: 0,
    };
    assert_eq!(lb.backend_stats(a).handshake, empty);

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &backends, c), "SYN");
    let (mine, other) = if *conn.backend.ip() == BACKEND_A {
        (a, b)
    } else {
        (b, a)
    };
    must(lb.cont(&conn, &syn, c), "retransmitted SYN");
    assert_eq!(lb.backend_stats(mine).handshake.count(), 0, "no answer yet");

    // Its SYN 100 ms ago: 100000 us, in (65536, 131072] us.
    lb.syn_ago(&conn, 100);
    let want = bucket_of_ms(100);
    assert_eq!(want, 17);
    must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK");
    let h = lb.backend_stats(mine).handshake;
    assert_eq!(h.count(), 1, "{h:?}");
    assert_eq!(h.buckets[want], 1, "{h:?}");
    assert!((100_000_000..130_000_000).contains(&h.sum_ns), "{h:?}");
    assert_eq!(lb.backend_stats(other).handshake, empty);

    // A retransmitted SYN-ACK, then the rest of the connection: nothing.
    must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK again");
    must(lb.cont(&conn, &syn.clone().ack(), c), "ACK: established");
    must(
        lb.back(&conn, &conn.reply().synack(), c),
        "SYN-ACK once more",
    );
    must(lb.back(&conn, &conn.reply().data(HTTP_OK), c), "data");
    assert_eq!(lb.backend_stats(mine).handshake, h);

    // The client resets it and starts over on the same ports: reopened,
    // a handshake of its own (2 s: in (2^20, 2^21] us).
    must(lb.cont(&conn, &syn.clone().rst(), c), "client RST");
    let again = must(lb.open(&syn, &backends, c), "SYN reopens");
    assert_eq!((again.backend, again.nat), (conn.backend, conn.nat));
    lb.syn_ago(&again, 2000);
    must(
        lb.back(&again, &again.reply().synack(), c),
        "SYN-ACK of the reopened flow",
    );
    let h2 = lb.backend_stats(mine).handshake;
    assert_eq!(h2.count(), 2, "{h2:?}");
    assert_eq!(h2.buckets[want], 1);
    assert_eq!(h2.buckets[bucket_of_ms(2000)], 1, "{h2:?}");
    must(
        lb.back(&again, &again.reply().synack(), c),
        "its retransmission",
    );
    assert_eq!(lb.backend_stats(mine).handshake.count(), 2);

    // UDP answers are no handshakes.
    let usvc = lb.service(VIP, 53, Proto::Udp);
    let u = lb.backend(&usvc, BACKEND_A, 53, 1);
    let q = Seg::udp(CLIENT, 40001, VIP, 53, DNS_QUERY);
    let uc = must(lb.open(&q, &[sa(BACKEND_A, 53)], c), "UDP query");
    must(
        lb.back(
            &uc,
            &uc.reply().with(|s| s.payload = DNS_ANSWER.to_vec()),
            c,
        ),
        "answer",
    );
    assert_eq!(lb.backend_stats(u).handshake, empty);
}

/// Handshake latency off (`handshake_latency = false`): a SYN keeps no
/// SYN time and its SYN-ACK records no sample, on a new flow and on a
/// reopened one; resets and unanswered SYNs are still counted.
#[test]
fn handshake_latency_off_records_no_sample() {
    instance!(
        "handshake_latency_off_records_no_sample",
        lb,
        Settings {
            handshake_latency: false,
            ..settings()
        },
        false
    );
    assert!(!lb.m.settings().unwrap().handshake_latency);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &a80, c), "SYN");
    assert_eq!(lb.owner(&conn).syn_t, 0, "no SYN time");
    must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK");
    must(lb.cont(&conn, &syn.clone().ack(), c), "ACK");
    let st = lb.backend_stats(a);
    assert_eq!(
        (st.handshake.count(), st.handshake.sum_ns),
        (0, 0),
        "{st:?}"
    );
    must(lb.back(&conn, &conn.reply().rst(), c), "backend RST");
    assert_eq!(lb.backend_stats(a).resets, 1);

    // Unanswered, expired, and its client starts over on the same ports.
    let syn2 = Seg::syn(CLIENT, 40001, VIP, 80);
    let c2 = must(lb.open(&syn2, &a80, c), "unanswered SYN");
    lb.age_out(&c2.reverse_key());
    let again = must(lb.open(&syn2, &a80, c), "the client's SYN reopens it");
    assert_eq!(lb.backend_stats(a).unanswered_syns, 1);
    assert_eq!(lb.owner(&again).syn_t, 0, "reopened: no SYN time");
    must(lb.back(&again, &again.reply().synack(), c), "its SYN-ACK");
    let st = lb.backend_stats(a);
    assert_eq!(
        (st.handshake.count(), st.resets, st.unanswered_syns),
        (0, 1, 1),
        "{st:?}"
    );
}

/// A RST from a backend to its client is counted for that backend, once a
/// connection; a client's RST is not.
#[test]
fn backend_resets_are_counted() {
    instance!("backend_resets_are_counted", lb, settings(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let conn = must(lb.open(&syn, &a80, c), "SYN");
    must(lb.back(&conn, &conn.reply().synack(), c), "SYN-ACK");
    must(lb.cont(&conn, &syn.clone().data(HTTP_GET), c), "request");
    must(
        lb.back(&conn, &conn.reply().fin(), c),
        "a backend FIN is no reset",
    );
    assert_eq!(lb.backend_stats(a).resets, 0);
    must(lb.back(&conn, &conn.reply().rst(), c), "backend RST");
    assert_eq!(lb.backend_stats(a).resets, 1);
    must(lb.back(&conn, &conn.reply().rst(), c), "its RST again");
    assert_eq!(lb.backend_stats(a).resets, 1, "one reset a connection");

    // Refused: a RST answers the SYN (port closed). A reset, no handshake.
    let syn2 = Seg::syn(CLIENT, 40001, VIP, 80);
    let refused = must(lb.open(&syn2, &a80, c), "SYN to a closed port");
    must(
        lb.back(&refused, &refused.reply().rst(), c),
        "RST-ACK to the SYN",
    );
    let st = lb.backend_stats(a);
    assert_eq!((st.resets, st.handshake.count()), (2, 1), "{st:?}");

    // The client resetting its connection is not the backend's error.
    let syn3 = Seg::syn(CLIENT, 40002, VIP, 80);
    let c3 = must(lb.open(&syn3, &a80, c), "SYN");
    must(lb.back(&c3, &c3.reply().synack(), c), "SYN-ACK");
    must(lb.cont(&c3, &syn3.clone().rst(), c), "client RST");
    must(
        lb.back(&c3, &c3.reply().rst(), c),
        "backend RST after the client's",
    );
    assert_eq!(lb.backend_stats(a).resets, 2);
    assert_eq!(lb.backend_stats(a).unanswered_syns, 0);
}

/// A new flow whose SYN the backend never answered counts as unanswered
/// when its tuple goes to another flow, or when its client starts over on
/// it; an answered one does not.
#[test]
fn unanswered_syns_are_counted() {
    instance!("unanswered_syns_are_counted", lb, one_nat_port(), false);
    let svc = lb.service(VIP, 80, Proto::Tcp);
    let a = lb.backend(&svc, BACKEND_A, 80, 1);
    let a80 = [sa(BACKEND_A, 80)];
    let c = Csum::Complete;

    // Unanswered, then reclaimed by another client's SYN.
    let spoofed = Seg::syn(STRANGER, 40000, VIP, 80);
    let s1 = must(lb.open(&spoofed, &a80, c), "unanswered SYN takes the port");
    assert_eq!(
        lb.backend_stats(a).unanswered_syns,
        0,
        "not yet: it may be answered"
    );
    lb.time_passes(1);
    let real = Seg::syn(CLIENT, 40000, VIP, 80);
    let c2 = must(lb.open(&real, &a80, c), "a real client's SYN takes it over");
    assert_eq!(c2.nat, s1.nat);
    assert_eq!(lb.backend_stats(a).unanswered_syns, 1);

    // Unanswered, expired, and its client starts over on the same ports.
    lb.age_out(&c2.reverse_key());
    let again = must(lb.open(&real, &a80, c), "the client's SYN reopens it");
    assert_eq!(again.nat, c2.nat);
    assert_eq!(lb.backend_stats(a).unanswered_syns, 2);

    // Answered this time, closed, and reopened: not unanswered.
    must(lb.back(&again, &again.reply().synack(), c), "SYN-ACK");
    must(lb.cont(&again, &real.clone().ack(), c), "ACK");
    must(lb.back(&again, &again.reply().rst(), c), "backend RST");
    must(lb.open(&real, &a80, c), "SYN on the closed tuple");
    let st = lb.backend_stats(a);
    assert_eq!(
        (st.unanswered_syns, st.resets, st.handshake.count()),
        (2, 1, 1),
        "{st:?}"
    );
}

// ---------------------------------------------------------------------------
// IP-in-IP: the LB's encapsulation and the backends' decapsulation.

const IPIP: u8 = 4;

/// `inner` (an Ethernet frame) as an IPIP service sends it, built with
/// etherparse: the IP packet unchanged (padding included) after an outer
/// header `src` -> `dst` (protocol 4, TTL 64, TOS and DF of the inner, id 0
/// with DF, else the inner's), between the MACs given.
fn encapsulated(
    inner: &[u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    smac: [u8; 6],
    dmac: [u8; 6],
) -> Vec<u8> {
    let ip = &inner[ETH_HLEN..];
    let tot = u16::from_be_bytes([ip[2], ip[3]]);
    let df = ip[6] & 0x40 != 0;
    let mut outer = Ipv4Header::new(tot, 64, IpNumber(IPIP), src.octets(), dst.octets()).unwrap();
    outer.dscp = etherparse::IpDscp::try_new(ip[1] >> 2).unwrap();
    outer.ecn = etherparse::IpEcn::try_new(ip[1] & 3).unwrap();
    outer.dont_fragment = df;
    outer.identification = if df {
        0
    } else {
        u16::from_be_bytes([ip[4], ip[5]])
    };
    outer.header_checksum = outer.calc_header_checksum();
    let mut out = Vec::new();
    Ethernet2Header {
        source: smac,
        destination: dmac,
        ether_type: EtherType::IPV4,
    }
    .write(&mut out)
    .unwrap();
    outer.write_raw(&mut out).unwrap();
    out.extend_from_slice(ip);
    out
}

/// Runs `frame` through lb on eth0; checks that exactly `moved` counters
/// moved by one packet (of the frame as sent; a drop: as it came) and, for
/// an encapsulated output, its outer header checksum (RFC 1071, the code
/// above) and the inner packet's checksums.
fn ipip_run(lb: &Lb, frame: &[u8], moved: &[&str]) -> (u32, Vec<u8>) {
    let before = lb.counters();
    let (v, out) = lb.run(lb.ifs.eth0, frame).expect("BPF_PROG_TEST_RUN");
    let after = lb.counters();
    let bytes = if v == XDP_DROP {
        frame.len()
    } else {
        out.len()
    };
    must(counter_delta(&before, &after, moved, bytes), "counters");
    if out.len() == frame.len() + 20 {
        assert_eq!(out[ETH_HLEN + 9], IPIP, "outer protocol");
        assert_eq!(
            fold(sum16(&out[ETH_HLEN..ETH_HLEN + 20])),
            0xffff,
            "outer header checksum"
        );
        let mut inner = out[..ETH_HLEN].to_vec();
        inner.extend_from_slice(&out[ETH_HLEN + 20..]);
        assert_eq!(verify_checksums(&inner, Csum::Complete), Ok(true));
    }
    (v, out)
}

/// Which of `backends` (on eth0) `out` is `frame` sent to, in IPIP.
fn ipip_backend(frame: &[u8], out: &[u8], backends: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    backends
        .iter()
        .copied()
        .find(|b| out == encapsulated(frame, LB, *b, ETH0_MAC, mac_of(*b)))
}

fn ipip_conf() -> lb::model::SvcConf {
    lb::model::SvcConf {
        mode: lb::model::FwdMode::Ipip,
        ..Default::default()
    }
}

/// An IPIP service: every packet (a SYN or not) goes, unchanged, in an
/// outer header LB -> backend to the backend's next hop; the backend the
/// Maglev table gives (another lb node picks the same), kept by the flow;
/// DF and TOS copied; a packet too big for the MTU once wrapped is dropped
/// and counted; a backend behind a router gets the router's MAC and the
/// LB's address on that side; an unresolved one goes to the kernel wrapped.
#[test]
fn ipip_wraps_the_unchanged_packet_towards_its_backend() {
    if !common::root_or_skip("ipip_wraps_the_unchanged_packet_towards_its_backend") {
        return;
    }
    let lab = Lab::new();
    let (_guard, ifs) = lab.enter();
    let mut storage = MaybeUninit::uninit();
    let lb = Lb::new(ifs, settings(), false, &mut storage);
    // Another lb node with the same configuration (ECMP may move a flow).
    let mut storage2 = MaybeUninit::uninit();
    let lb2 = Lb::new(ifs, settings(), false, &mut storage2);
    let both = [BACKEND_A, BACKEND_B];
    let mut svcs = Vec::new();
    for l in [&lb, &lb2] {
        let svc = l.service_conf(VIP, 80, Proto::Tcp, ipip_conf());
        l.backend(&svc, BACKEND_A, 80, 1);
        l.backend(&svc, BACKEND_B, 0, 1);
        svcs.push(svc);
    }
    let svc = svcs[0];
    assert_eq!(
        service::list(&lb.m).unwrap()[0].conf.mode,
        lb::model::FwdMode::Ipip
    );

    // A SYN, then its flow's data: the same backend; DF set, so id 0.
    let syn = Seg::syn(CLIENT, 40000, VIP, 80);
    let (v, out) = ipip_run(&lb, &syn.frame(), &["to_backend", "new_flow"]);
    assert_eq!(v, XDP_TX, "{}", verdict_name(v));
    let first = ipip_backend(&syn.frame(), &out, &both).expect("wrapped to a backend");
    assert_eq!(out[ETH_HLEN + 6] & 0x40, 0x40, "DF copied");
    assert_eq!(out[ETH_HLEN + 4..ETH_HLEN + 6], [0, 0], "id 0 with DF");
    assert_eq!(out[ETH_HLEN + 8], 64, "TTL");
    assert_eq!(
        out[ETH_HLEN + 12..ETH_HLEN + 16],
        LB.octets(),
        "outer source"
    );
    let data = syn.clone().data(HTTP_GET);
    let (_, out) = ipip_run(&lb, &data.frame(), &["to_backend"]);
    assert_eq!(ipip_backend(&data.frame(), &out, &both), Some(first));
    assert!(lb.entries().is_empty(), "IPIP makes no NAT entries");

    // Segments of flows this node never saw: forwarded to the Maglev
    // choice, which the other node makes alike; both backends used.
    let mut used = std::collections::BTreeSet::new();
    for port in 41000..41032 {
        let stray = Seg::tcp(CLIENT, port, VIP, 80).data(HTTP_GET);
        let (v, out) = ipip_run(&lb, &stray.frame(), &["to_backend", "new_flow"]);
        assert_eq!(v, XDP_TX);
        let b = ipip_backend(&stray.frame(), &out, &both).expect("wrapped to a backend");
        let (_, out2) = ipip_run(&lb2, &stray.frame(), &["to_backend", "new_flow"]);
        assert_eq!(
            ipip_backend(&stray.frame(), &out2, &both),
            Some(b),
            "the other node picks the same backend for port {port}"
        );
        used.insert(b);
    }
    assert_eq!(used.len(), 2, "32 flows on one backend");

    // No DF, a TOS: both copied, the id taken from the inner header.
    let mut frame = data.frame();
    frame[ETH_HLEN + 1] = 0xb8;
    frame[ETH_HLEN + 6] &= !0x40;
    fix_ip_checksum(&mut frame);
    let (_, out) = ipip_run(&lb, &frame, &["to_backend"]);
    assert_eq!(ipip_backend(&frame, &out, &both), Some(first));
    assert_eq!(out[ETH_HLEN + 1], 0xb8, "TOS copied");
    assert_eq!(out[ETH_HLEN + 6] & 0x40, 0, "no DF");
    assert_eq!(
        out[ETH_HLEN + 4..ETH_HLEN + 6],
        [0x1c, 0x46],
        "the inner id"
    );

    // Not a VIP: passes untouched, SYN or not.
    for seg in [
        Seg::syn(CLIENT, 40000, OTHER_HOST, 80),
        Seg::tcp(CLIENT, 40000, OTHER_HOST, 80).data(HTTP_GET),
    ] {
        must(lb.passes(&seg.frame(), "pass_not_ours"), "not a VIP");
    }

    // The MTU (1500): 1480 bytes of IP fit once wrapped, 1481 do not.
    let fits = syn.clone().data(&vec![b'x'; 1480 - 40]);
    let (v, out) = ipip_run(&lb, &fits.frame(), &["to_backend"]);
    assert_eq!((v, out.len()), (XDP_TX, ETH_HLEN + 1500));
    let big = syn.clone().data(&vec![b'x'; 1481 - 40]);
    must(
        lb.drops(&big.frame(), "drop_too_big"),
        "too big once wrapped",
    );
    // A new flow's too-big first packet makes no flow.
    let big_new = Seg::tcp(CLIENT, 42000, VIP, 80).data(&vec![b'x'; 1460]);
    must(lb.drops(&big_new.frame(), "drop_too_big"), "too big, new");

    // In IPIP the backend's port is the service's.
    let e = service::backend_add(&lb.m, &svc, sa(BACKEND_C, 8080), 1).unwrap_err();
    assert!(format!("{e:#}").contains("IPIP"), "{e:#}");

    // Behind a router (backend c routes 10.200.9.0/24): the router's MAC,
    // out of eth2, from the LB's address there.
    lab.ns
        .ip(&["route", "add", "10.200.9.0/24", "via", "10.200.1.11"]);
    let far = Ipv4Addr::new(10, 200, 9, 5);
    let svc2 = lb.service_conf(VIP2, 80, Proto::Tcp, ipip_conf());
    lb.backend(&svc2, far, 80, 1);
    let syn2 = Seg::syn(CLIENT, 40000, VIP2, 80);
    let (v, out) = ipip_run(&lb, &syn2.frame(), &["to_backend", "new_flow"]);
    assert_eq!(v, XDP_REDIRECT, "{}", verdict_name(v));
    must(
        same_frame(
            &out,
            &encapsulated(&syn2.frame(), LB2, far, ETH2_MAC, BACKEND_C_MAC),
        ),
        "routed backend",
    );

    // Unresolved: wrapped, MACs as they came, to the kernel (which
    // forwards it to the backend and resolves it); then with its MAC.
    let vip3 = Ipv4Addr::new(10, 200, 0, 102);
    let svc3 = lb.service_conf(vip3, 80, Proto::Tcp, ipip_conf());
    lb.backend(&svc3, BACKEND_UNRESOLVED, 80, 1);
    let syn3 = Seg::syn(CLIENT, 40000, vip3, 80);
    let (v, out) = ipip_run(&lb, &syn3.frame(), &["pass_no_neigh", "new_flow"]);
    assert_eq!(v, XDP_PASS, "{}", verdict_name(v));
    must(
        same_frame(
            &out,
            &encapsulated(&syn3.frame(), LB, BACKEND_UNRESOLVED, PEER_MAC, ETH0_MAC),
        ),
        "unresolved backend",
    );
    // (lb asked the kernel to resolve it when it was added: an
    // incomplete entry is there.)
    let mac = mac_str(&UNRESOLVED_MAC);
    lab.ns.ip(&[
        "neigh",
        "replace",
        &BACKEND_UNRESOLVED.to_string(),
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let data3 = syn3.clone().data(HTTP_GET);
    let (v, out) = ipip_run(&lb, &data3.frame(), &["to_backend"]);
    assert_eq!(v, XDP_TX);
    assert_eq!(
        ipip_backend(&data3.frame(), &out, &[BACKEND_UNRESOLVED]),
        Some(BACKEND_UNRESOLVED)
    );
}

/// The decapsulation program (lb decap): an IPIP packet loses its outer
/// header (options too) and passes as the inner packet, MACs kept; what is
/// not IPIP, fragments and malformed outer headers pass untouched; each is
/// counted. The LB's own output comes out as the client's packet.
#[test]
fn decap_removes_the_outer_header_and_passes_the_rest() {
    if !common::root_or_skip("decap_removes_the_outer_header_and_passes_the_rest") {
        return;
    }
    let lab = Lab::new();
    let (_guard, ifs) = lab.enter();
    let mut st = MaybeUninit::uninit();
    let skel = lb::decap::load(None, &mut st).expect("loading the decap program");
    let stats = libbpf_rs::MapHandle::try_from(&skel.maps.decap_stats).expect("decap_stats");
    let prog = &skel.progs.lb_decap;
    let read = || lb::decap::read_map(&stats).expect("decap counters");
    let check = |name: &str, input: &[u8], want: &[u8]| {
        let before = read();
        let (v, out) = run_prog(prog, ifs.eth0, input).expect("BPF_PROG_TEST_RUN");
        let after = read();
        assert_eq!(v, XDP_PASS, "{name}: {}", verdict_name(v));
        must(same_frame(&out, want), name);
        for ((n, b), (_, a)) in before.iter().zip(&after) {
            let want = if n == name {
                (1, input.len() as u64)
            } else {
                (0, 0)
            };
            assert_eq!(
                (a.packets - b.packets, a.bytes - b.bytes),
                want,
                "counter {n} for {name}"
            );
        }
    };
    let (lb_mac, be_mac) = (ETH1_MAC, ETH0_MAC);
    for inner in [
        Seg::syn(CLIENT, 40000, VIP, 80),
        Seg::udp(CLIENT, 40000, VIP, 53, DNS_QUERY),
    ] {
        let enc = encapsulated(&inner.frame(), LB, BACKEND_A, lb_mac, be_mac);
        let want = inner.clone().macs(lb_mac, be_mac).frame();
        check("decapsulated", &enc, &want);
        assert_eq!(verify_checksums(&want, Csum::Complete), Ok(true));
        // Outer options (IHL 6) go with the outer header.
        let mut opt = enc[..ETH_HLEN].to_vec();
        let mut h = Ipv4Header::from_slice(&enc[ETH_HLEN..]).unwrap().0;
        h.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
        h.total_len += 4;
        h.header_checksum = h.calc_header_checksum();
        h.write_raw(&mut opt).unwrap();
        opt.extend_from_slice(&enc[ETH_HLEN + 20..]);
        check("decapsulated", &opt, &want);
    }
    // The LB's own output, decapsulated: the client's packet, to the
    // backend's MAC.
    let mut st2 = MaybeUninit::uninit();
    let lb = Lb::new(ifs, settings(), false, &mut st2);
    let svc = lb.service_conf(VIP, 80, Proto::Tcp, ipip_conf());
    lb.backend(&svc, BACKEND_A, 80, 1);
    let seg = Seg::syn(CLIENT, 40000, VIP, 80).data(HTTP_GET);
    let (_, out) = ipip_run(&lb, &seg.frame(), &["to_backend", "new_flow"]);
    check(
        "decapsulated",
        &out,
        &seg.clone().macs(ETH0_MAC, BACKEND_A_MAC).frame(),
    );

    // Untouched.
    let enc = encapsulated(&seg.frame(), LB, BACKEND_A, lb_mac, be_mac);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut e = enc.clone();
        f(&mut e);
        e
    };
    let outer_csum = |e: &mut Vec<u8>| {
        e[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
        let c = !fold(sum16(&e[ETH_HLEN..ETH_HLEN + 20]));
        e[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
    };
    for (name, input) in [
        ("pass_not_ipip", seg.frame()),
        ("pass_not_ipip", arp_request()),
        ("pass_not_ipip", ipv6_syn()),
        ("pass_not_ipip", other_proto(47, b"gre!")),
        ("pass_malformed", enc[..ETH_HLEN + 12].to_vec()),
        ("pass_malformed", enc[..ETH_HLEN + 30].to_vec()),
        (
            "pass_malformed",
            edit(&|e| e[ETH_HLEN + 10] ^= 0x55), // bad outer checksum
        ),
        (
            "pass_malformed",
            edit(&|e| {
                e[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&30u16.to_be_bytes());
                outer_csum(e);
            }), // no room for an inner header
        ),
        (
            "pass_malformed",
            edit(&|e| e[ETH_HLEN + 20] = 0x65), // IPv6 inside protocol 4
        ),
        (
            "pass_fragment",
            edit(&|e| {
                e[ETH_HLEN + 6] |= 0x20; // more fragments
                outer_csum(e);
            }),
        ),
    ] {
        check(name, &input, &input);
    }
}
