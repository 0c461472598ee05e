//! Packet fixtures for IPv6 full NAT: the XDP program run through
//! BPF_PROG_TEST_RUN on frames built with etherparse, in a namespace whose
//! FIB and neighbour table (fd00:200::/64 on eth0) `bpf_fib_lookup`
//! consults. Every output frame is checked field by field against the
//! connection the table lists, and its TCP/UDP checksum is verified by the
//! RFC 1071 code below (IPv6 pseudo-header), not by etherparse. Counters:
//! exactly the named ones move.

mod common;

use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddr};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use libbpf_rs::{MapCore, MapFlags, OpenObject, ProgramInput};

use lb::conntrack;
use lb::halfopen;
use lb::maps::bytes;
use lb::maps::Maps;
use lb::netns::NetnsGuard;
use lb::service::{self, Proto, Service};
use lb::settings::Settings;
use lb::skel::lb::LbSkel;
use lb::stats;

use common::Netns;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x2);
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x100);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const BACKEND_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x11);
const BACKEND_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x12);

const ETH0_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0xe0, 0x01];

fn mac_of(ip: Ipv6Addr) -> [u8; 6] {
    [0x02, 0x66, 0, 0, 0, ip.octets()[15]]
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A namespace with eth0 (peer eth1) = fd00:200::2/64, IPv6 forwarding on
/// (bpf_fib_lookup needs it), and permanent neighbours for the client and
/// both backends.
struct Lab {
    ns: Netns,
}

impl Lab {
    fn new() -> Self {
        let ns = Netns::new("lbp6");
        ns.ip(&[
            "link",
            "add",
            "name",
            "eth0",
            "address",
            &mac_str(&ETH0_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
        ]);
        for dev in ["lo", "eth1", "eth0"] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        ns.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:200::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        for ip in [CLIENT, BACKEND_A, BACKEND_B] {
            ns.ip(&[
                "-6",
                "neigh",
                "add",
                &ip.to_string(),
                "lladdr",
                &mac_str(&mac_of(ip)),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        Self { ns }
    }
}

struct Lb<'obj> {
    skel: LbSkel<'obj>,
    m: Maps,
    ifindex: u32,
    _pins: common::PinDir,
    _guard: NetnsGuard,
}

impl<'obj> Lb<'obj> {
    fn new(lab: &Lab, skb_mode: bool, storage: &'obj mut MaybeUninit<OpenObject>) -> Self {
        Self::with_snat(lab, skb_mode, vec![], storage)
    }

    fn with_snat(
        lab: &Lab,
        skb_mode: bool,
        snat: Vec<std::net::IpAddr>,
        storage: &'obj mut MaybeUninit<OpenObject>,
    ) -> Self {
        let settings = Settings {
            max_flows: 4096,
            max_half_open: 4096,
            snat,
            ..Default::default()
        };
        Self::with_settings(lab, skb_mode, settings, storage)
    }

    fn with_settings(
        lab: &Lab,
        skb_mode: bool,
        settings: Settings,
        storage: &'obj mut MaybeUninit<OpenObject>,
    ) -> Self {
        let guard = NetnsGuard::enter(&lab.ns.name).expect("entering the test namespace");
        let ifindex = lb::net::ifindex("eth0").expect("eth0");
        let pins = common::PinDir::new("lbp6");
        std::fs::create_dir(&pins.path).expect("creating the pin directory");
        let bp = lb::bpffs::PinDir::new(&pins.path);
        let mut skel =
            lb::loader::load(&settings, skb_mode, None, storage).expect("loading the program");
        lb::loader::pin_maps(&mut skel, &bp).expect("pinning the maps");
        let m = Maps::open(&bp).expect("opening the maps");
        assert_eq!(m.settings().expect("reading the settings back"), settings);
        Self {
            skel,
            m,
            ifindex,
            _pins: pins,
            _guard: guard,
        }
    }

    fn service(&self, port: u16, proto: Proto, backends: &[Ipv6Addr]) -> Service {
        let svc = Service::new(SocketAddr::new(VIP.into(), port), proto);
        service::service_add(&self.m, &svc).expect("adding a service");
        for b in backends {
            service::backend_add(&self.m, &svc, SocketAddr::new((*b).into(), port), 1)
                .expect("adding a backend");
        }
        svc
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let md: [u32; 6] = [0, frame.len() as u32, 0, self.ifindex, 0, 0];
        let mut ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let input = ProgramInput {
            context_in: Some(&mut ctx),
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let (verdict, len) = {
            let res = self.skel.progs.lb_xdp.test_run(input).expect("test_run");
            (res.return_value, res.data.as_ref().map_or(0, |d| d.len()))
        };
        out.truncate(len);
        (verdict, out)
    }

    fn counters(&self) -> Vec<u64> {
        stats::read(&self.m.stats)
            .expect("reading counters")
            .iter()
            .map(|c| c.packets)
            .collect()
    }

    /// Runs `frame`, checks that exactly the counters `moved` moved (by
    /// one each), and returns the verdict and output.
    fn step(&self, what: &str, frame: &[u8], moved: &[&str]) -> (u32, Vec<u8>) {
        let before = self.counters();
        let r = self.run(frame);
        let after = self.counters();
        for (i, name) in stats::NAMES.iter().enumerate() {
            let want = u64::from(moved.contains(name));
            assert_eq!(
                after[i] - before[i],
                want,
                "{what}: counter {name} moved by {}, expected {want}",
                after[i] - before[i]
            );
        }
        r
    }

    /// The one connection listed.
    fn conn(&self) -> conntrack::Conn {
        let mut c = conntrack::list(&self.m).expect("listing connections");
        assert_eq!(c.len(), 1, "one connection: {c:?}");
        c.remove(0)
    }
}

// Independent checksums (RFC 1071, RFC 8200 8.1), not etherparse's.

fn sum16(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Whether the TCP/UDP segment `seg` (upper-layer protocol `proto`) from
/// `src` to `dst` has a valid checksum.
fn l4_valid(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, seg: &[u8]) -> bool {
    let s = sum16(&src.octets())
        + sum16(&dst.octets())
        + (seg.len() as u64 >> 16)
        + (seg.len() as u64 & 0xffff)
        + u64::from(proto)
        + sum16(seg);
    fold(s) == 0xffff
}

/// The parts of an IPv6 TCP/UDP frame a fixture checks.
#[derive(Debug, PartialEq)]
struct Seen {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    hop_limit: u8,
    payload: Vec<u8>,
}

/// Parses `frame` and verifies its L4 checksum independently (after any
/// extension headers).
fn seen(frame: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(frame).expect("an Ethernet frame");
    let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6: {frame:02x?}");
    };
    let h = ip.header();
    let (src, dst) = (h.source_addr(), h.destination_addr());
    let (sport, dport, proto, seg, payload) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (
            t.source_port(),
            t.destination_port(),
            6,
            t.slice(),
            t.payload(),
        ),
        Some(TransportSlice::Udp(u)) => (
            u.source_port(),
            u.destination_port(),
            17,
            u.slice(),
            u.payload(),
        ),
        other => panic!("not TCP or UDP: {other:?}"),
    };
    assert!(
        l4_valid(src, dst, proto, seg),
        "bad L4 checksum in {frame:02x?}"
    );
    Seen {
        smac: frame[6..12].try_into().unwrap(),
        dmac: frame[0..6].try_into().unwrap(),
        src: SocketAddr::new(src.into(), sport),
        dst: SocketAddr::new(dst.into(), dport),
        hop_limit: h.hop_limit(),
        payload: payload.to_vec(),
    }
}

fn sa(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A TCP segment with `flags` set by `f`.
fn tcp(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    f: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    payload: &[u8],
) -> Vec<u8> {
    let (SocketAddr::V6(s), SocketAddr::V6(d)) = (src, dst) else {
        panic!("IPv6 only")
    };
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv6(s.ip().octets(), d.ip().octets(), 64)
        .tcp(s.port(), d.port(), 1000, 64240);
    let mut out = Vec::new();
    f(b).write(&mut out, payload).expect("building a frame");
    out
}

fn udp(smac: [u8; 6], dmac: [u8; 6], src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V6(s), SocketAddr::V6(d)) = (src, dst) else {
        panic!("IPv6 only")
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(s.ip().octets(), d.ip().octets(), 64)
        .udp(s.port(), d.port())
        .write(&mut out, payload)
        .expect("building a frame");
    out
}

/// `frame` (IPv6) with extension headers `ext` (each: next-header type,
/// bytes) put in front of its upper-layer header.
fn with_ext(frame: &[u8], ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let (eth, rest) = frame.split_at(14);
    let (ip, upper) = rest.split_at(40);
    let mut ip = ip.to_vec();
    let mut chain = Vec::new();
    let mut next = ip[6];
    for (ty, bytes) in ext.iter().rev() {
        let mut h = bytes.clone();
        h[0] = next;
        next = *ty;
        chain.splice(0..0, h);
    }
    ip[6] = next;
    let plen = (chain.len() + upper.len()) as u16;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    [eth, &ip, &chain, upper].concat()
}

/// An 8-byte options header (hop-by-hop or destination options): PadN.
fn opts8() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A type-4-like routing header of 8 bytes with `left` segments left.
fn routing8(left: u8) -> Vec<u8> {
    vec![0, 0, 4, left, 0, 0, 0, 0]
}

/// A fragment header: offset `off` (8-byte units), more fragments if
/// `more`, identification 7.
fn frag8(off: u16, more: bool) -> Vec<u8> {
    let v = (off << 3) | u16::from(more);
    let [a, b] = v.to_be_bytes();
    vec![0, 0, a, b, 0, 0, 0, 7]
}

#[test]
fn tcp_connection_both_ways() {
    if !common::root_or_skip("tcp_connection_both_ways") {
        return;
    }
    let lab = Lab::new();
    for skb in [false, true] {
        let mut st = MaybeUninit::uninit();
        let lb = Lb::new(&lab, skb, &mut st);
        lb.service(80, Proto::Tcp, &[BACKEND_A, BACKEND_B]);
        let client = sa(CLIENT, 40000);
        let vip = sa(VIP, 80);
        let cmac = mac_of(CLIENT);

        // SYN: a new flow, to one of the backends, from the LB's address.
        let syn = tcp(cmac, ETH0_MAC, client, vip, |b| b.syn(), &[]);
        let (v, out) = lb.step("SYN", &syn, &["to_backend", "new_flow"]);
        assert_eq!(v, XDP_TX, "SYN");
        let c = lb.conn();
        assert_eq!((c.client, c.vip), (client, vip));
        assert!(
            [sa(BACKEND_A, 80), sa(BACKEND_B, 80)].contains(&c.backend),
            "{c:?}"
        );
        assert_eq!(c.nat.ip(), std::net::IpAddr::V6(LB), "the LB's source");
        assert_eq!(c.state, "half-open");
        let std::net::IpAddr::V6(be) = c.backend.ip() else {
            unreachable!()
        };
        let want = Seen {
            smac: ETH0_MAC,
            dmac: mac_of(be),
            src: c.nat,
            dst: c.backend,
            hop_limit: 64,
            payload: vec![],
        };
        assert_eq!(seen(&out), want, "SYN to the backend");

        // Both entries are in the half-open table, found by key from user
        // space (the datapath's hash and layout); removed and written back
        // from there, they still serve the SYN-ACK below.
        let half: Vec<_> = conntrack::entries6(&lb.m)
            .expect("IPv6 entries")
            .into_iter()
            .filter(|(_, _, answered)| !answered)
            .collect();
        assert_eq!(half.len(), 2, "client entry and owner");
        for (k, f, _) in &half {
            let got = halfopen::get::<halfopen::V6>(&lb.m, k).expect("get");
            assert_eq!(got.map(|g| bytes(&g).to_vec()), Some(bytes(f).to_vec()));
            assert!(halfopen::delete::<halfopen::V6>(&lb.m, k).expect("delete"));
            assert!(halfopen::get::<halfopen::V6>(&lb.m, k)
                .expect("get")
                .is_none());
            halfopen::put::<halfopen::V6>(&lb.m, k, f).expect("put");
        }

        // SYN-ACK from the backend: to the client, from the VIP.
        let bmac = mac_of(be);
        let synack = tcp(bmac, ETH0_MAC, c.backend, c.nat, |b| b.syn().ack(1001), &[]);
        let (v, out) = lb.step("SYN-ACK", &synack, &["to_client"]);
        assert_eq!(v, XDP_TX);
        assert_eq!(
            seen(&out),
            Seen {
                smac: ETH0_MAC,
                dmac: cmac,
                src: vip,
                dst: client,
                hop_limit: 64,
                payload: vec![],
            },
            "SYN-ACK to the client"
        );

        // The client's ACK with a request: confirmed, promoted.
        let req = tcp(cmac, ETH0_MAC, client, vip, |b| b.ack(1).psh(), b"GET /");
        let (v, out) = lb.step("request", &req, &["to_backend", "established"]);
        assert_eq!(v, XDP_TX);
        assert_eq!(seen(&out).payload, b"GET /", "request");
        assert_eq!(seen(&out).dst, c.backend);
        assert_eq!(lb.conn().state, "open");

        // The answer, then FINs both ways: closing.
        let ans = tcp(
            bmac,
            ETH0_MAC,
            c.backend,
            c.nat,
            |b| b.ack(6).psh(),
            b"200 OK",
        );
        let (_, out) = lb.step("answer", &ans, &["to_client"]);
        assert_eq!(seen(&out).payload, b"200 OK");
        let fin = tcp(bmac, ETH0_MAC, c.backend, c.nat, |b| b.ack(6).fin(), &[]);
        lb.step("backend FIN", &fin, &["to_client"]);
        assert_eq!(lb.conn().state, "half-closed");
        let fin = tcp(cmac, ETH0_MAC, client, vip, |b| b.ack(2).fin(), &[]);
        let (_, out) = lb.step("client FIN", &fin, &["to_backend"]);
        assert_eq!(seen(&out).dst, c.backend);
        assert_eq!(lb.conn().state, "closing");

        // A second connection, reset by the backend.
        let client2 = sa(CLIENT, 40001);
        let syn = tcp(cmac, ETH0_MAC, client2, vip, |b| b.syn(), &[]);
        let (_, out) = lb.step("SYN 2", &syn, &["to_backend", "new_flow"]);
        let s = seen(&out);
        let rst = tcp(
            mac_of(be),
            ETH0_MAC,
            s.dst,
            s.src,
            |b| b.rst().ack(1001),
            &[],
        );
        let (v, out) = lb.step("backend RST", &rst, &["to_client"]);
        assert_eq!(v, XDP_TX);
        assert_eq!(seen(&out).dst, client2);
    }
}

#[test]
fn udp_and_what_passes() {
    if !common::root_or_skip("udp_and_what_passes") {
        return;
    }
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let lb = Lb::new(&lab, false, &mut st);
    lb.service(53, Proto::Udp, &[BACKEND_A]);
    lb.service(80, Proto::Tcp, &[BACKEND_A]);
    let cmac = mac_of(CLIENT);
    let client = sa(CLIENT, 5353);
    let vip = sa(VIP, 53);

    // UDP query and answer; the checksum (mandatory in IPv6) updated.
    let q = udp(cmac, ETH0_MAC, client, vip, b"query");
    let (v, out) = lb.step("UDP query", &q, &["to_backend", "new_flow"]);
    assert_eq!(v, XDP_TX);
    let s = seen(&out);
    assert_eq!(s.dst, sa(BACKEND_A, 53));
    assert_eq!(s.src.ip(), std::net::IpAddr::V6(LB));
    let a = udp(mac_of(BACKEND_A), ETH0_MAC, s.dst, s.src, b"answer");
    let (v, out) = lb.step("UDP answer", &a, &["to_client"]);
    assert_eq!(v, XDP_TX);
    let back = seen(&out);
    assert_eq!((back.src, back.dst), (vip, client));
    assert_eq!(back.payload, b"answer");

    // What passes untouched, and under which counter.
    let mut zero_csum = udp(cmac, ETH0_MAC, sa(CLIENT, 5354), vip, b"q");
    let n = zero_csum.len();
    zero_csum[n - 1 - 2..n - 1].copy_from_slice(&[0, 0]); // UDP checksum
    let syn = |dport| {
        tcp(
            cmac,
            ETH0_MAC,
            sa(CLIENT, 41000),
            sa(VIP, dport),
            |b| b.syn(),
            &[],
        )
    };
    let ack = tcp(
        cmac,
        ETH0_MAC,
        sa(CLIENT, 41001),
        sa(VIP, 80),
        |b| b.ack(1),
        &[],
    );
    let mut ns = Vec::new(); // neighbour solicitation for the LB's address
    PacketBuilder::ethernet2(cmac, [0x33, 0x33, 0xff, 0, 0, 2])
        .ipv6(
            CLIENT.octets(),
            "ff02::1:ff00:2".parse::<Ipv6Addr>().unwrap().octets(),
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut ns, &LB.octets())
        .unwrap();
    let mut arp_like = syn(80);
    arp_like[12..14].copy_from_slice(&[0x08, 0x06]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("UDP without a checksum", zero_csum, "pass_malformed"),
        ("SYN to no service", syn(81), "pass_not_ours"),
        ("ACK of no flow", ack, "pass_not_ours"),
        ("neighbour solicitation", ns, "pass_not_l4"),
        ("not IP", arp_like, "pass_not_ip"),
        (
            "routing header with segments left",
            with_ext(&syn(80), &[(43, routing8(1))]),
            "pass_not_l4",
        ),
        (
            "later fragment of no datagram lb forwarded",
            with_ext(&syn(80), &[(44, frag8(3, false))]),
            "pass_fragment",
        ),
        (
            "hop-by-hop not first",
            with_ext(&syn(80), &[(60, opts8()), (0, opts8())]),
            "pass_malformed",
        ),
        (
            "five extension headers",
            with_ext(&syn(80), &vec![(60, opts8()); 5]),
            "pass_not_l4",
        ),
    ];
    for (what, frame, counter) in cases {
        let (v, out) = lb.step(what, &frame, &[counter]);
        assert_eq!(v, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: passed untouched");
    }
    assert_eq!(
        conntrack::list(&lb.m).unwrap().len(),
        1,
        "only the UDP flow"
    );
}

#[test]
fn extension_headers_are_skipped_and_kept() {
    if !common::root_or_skip("extension_headers_are_skipped_and_kept") {
        return;
    }
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let lb = Lb::new(&lab, false, &mut st);
    lb.service(80, Proto::Tcp, &[BACKEND_A]);
    let cmac = mac_of(CLIENT);
    let ext = vec![(0, opts8()), (43, routing8(0)), (60, opts8())];
    let syn = tcp(
        cmac,
        ETH0_MAC,
        sa(CLIENT, 42000),
        sa(VIP, 80),
        |b| b.syn(),
        &[],
    );
    let frame = with_ext(&syn, &ext);
    let (v, out) = lb.step(
        "SYN with 3 extension headers",
        &frame,
        &["to_backend", "new_flow"],
    );
    assert_eq!(v, XDP_TX);
    assert_eq!(out.len(), frame.len());
    assert_eq!(
        &out[14 + 40..14 + 40 + 24],
        &frame[14 + 40..14 + 40 + 24],
        "headers kept"
    );
    let s = seen(&out);
    assert_eq!(s.dst, sa(BACKEND_A, 80));

    // Truncated anywhere: passed untouched as malformed (the frame is cut
    // and its lengths left as they were).
    for len in 14..frame.len() {
        let cut = &frame[..len];
        let (v, out) = lb.step(&format!("cut at {len}"), cut, &["pass_malformed"]);
        assert_eq!((v, out.as_slice()), (XDP_PASS, cut), "cut at {len}");
    }
}

/// An ICMPv6 error of `ty` from `src` to `dst` quoting `quoted` (an IPv6
/// packet, as sent).
fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, ty: etherparse::Icmpv6Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(mac_of(src), ETH0_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .icmpv6(ty)
        .write(&mut out, quoted)
        .expect("building an ICMPv6 error");
    out
}

/// The outer addresses and quoted packet of an ICMPv6 error, its checksum
/// verified independently.
fn icmp6_seen(frame: &[u8]) -> ([u8; 6], Ipv6Addr, Ipv6Addr, Vec<u8>) {
    let ip = &frame[14..];
    assert_eq!(ip[6], 58, "ICMPv6");
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let msg = &ip[40..];
    assert!(
        l4_valid(src, dst, 58, msg),
        "bad ICMPv6 checksum: {frame:02x?}"
    );
    (frame[0..6].try_into().unwrap(), src, dst, msg[8..].to_vec())
}

#[test]
fn icmpv6_errors_reach_the_other_end() {
    if !common::root_or_skip("icmpv6_errors_reach_the_other_end") {
        return;
    }
    use etherparse::Icmpv6Type;
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let lb = Lb::new(&lab, false, &mut st);
    lb.service(80, Proto::Tcp, &[BACKEND_A]);
    let (cmac, bmac) = (mac_of(CLIENT), mac_of(BACKEND_A));
    let client = sa(CLIENT, 40000);
    let vip = sa(VIP, 80);
    let router = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x99);

    let syn = tcp(cmac, ETH0_MAC, client, vip, |b| b.syn(), &[0u8; 100]);
    let (_, to_backend) = lb.step("SYN", &syn, &["to_backend", "new_flow"]);
    let c = lb.conn();
    let synack = tcp(bmac, ETH0_MAC, c.backend, c.nat, |b| b.syn().ack(1001), &[]);
    let (_, to_client) = lb.step("SYN-ACK", &synack, &["to_client"]);

    // Packet too big from a router on the backend's leg, about what lb
    // sent there: to the client, about what the client sent.
    let ptb = icmp6_error(
        router,
        LB,
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        &to_backend[14..],
    );
    let (v, out) = lb.step("packet too big, backend side", &ptb, &["icmp_error"]);
    assert_eq!(v, XDP_TX);
    let (dmac, src, dst, quoted) = icmp6_seen(&out);
    assert_eq!(
        (dmac, src, dst),
        (cmac, VIP, CLIENT),
        "to the client, from the VIP"
    );
    assert_eq!(quoted, syn[14..].to_vec(), "quotes the client's own SYN");
    assert_eq!(
        &out[14 + 40 + 4..14 + 40 + 8],
        &1280u32.to_be_bytes(),
        "MTU kept"
    );

    // Time exceeded from the client's side, about what lb sent the client:
    // to the backend, about what the backend sent.
    let te = icmp6_error(
        router,
        VIP,
        Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded),
        &to_client[14..],
    );
    let (v, out) = lb.step("time exceeded, client side", &te, &["icmp_error"]);
    assert_eq!(v, XDP_TX);
    let (dmac, src, dst, quoted) = icmp6_seen(&out);
    assert_eq!(
        (dmac, src, dst),
        (bmac, LB, BACKEND_A),
        "to the backend, from the LB"
    );
    assert_eq!(
        quoted,
        synack[14..].to_vec(),
        "quotes the backend's own SYN-ACK"
    );

    // Errors that match no flow pass untouched.
    let stray = tcp(cmac, ETH0_MAC, sa(CLIENT, 40009), vip, |b| b.syn(), &[]);
    let unmatched = icmp6_error(
        router,
        LB,
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        &stray[14..],
    );
    let (v, out) = lb.step("unmatched packet too big", &unmatched, &["pass_not_l4"]);
    assert_eq!((v, out), (XDP_PASS, unmatched));
}

#[test]
fn snat_pool_spreads_new_flows() {
    if !common::root_or_skip("snat_pool_spreads_new_flows") {
        return;
    }
    let lab = Lab::new();
    let pool: Vec<Ipv6Addr> = ["fd00:200::a0", "fd00:200::a1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    for a in &pool {
        lab.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    let mut st = MaybeUninit::uninit();
    let lb = Lb::with_snat(
        &lab,
        false,
        pool.iter().map(|a| (*a).into()).collect(),
        &mut st,
    );
    lb.service(80, Proto::Tcp, &[BACKEND_A]);
    let cmac = mac_of(CLIENT);
    let mut used = std::collections::BTreeSet::new();
    for port in 40000..40016 {
        let syn = tcp(
            cmac,
            ETH0_MAC,
            sa(CLIENT, port),
            sa(VIP, 80),
            |b| b.syn(),
            &[],
        );
        let (v, out) = lb.step("SYN", &syn, &["to_backend", "new_flow"]);
        assert_eq!(v, XDP_TX);
        let s = seen(&out);
        let std::net::IpAddr::V6(src) = s.src.ip() else {
            unreachable!()
        };
        assert!(pool.contains(&src), "source {src} from the pool");
        // Both are on lo, lb's alone: every port from 1024, the client's kept.
        assert_eq!(s.src.port(), port, "client port kept");
        used.insert(src);
    }
    assert_eq!(used.len(), 2, "both pool addresses used: {used:?}");
}

#[test]
fn fragments_follow_their_first() {
    if !common::root_or_skip("fragments_follow_their_first") {
        return;
    }
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let lb = Lb::new(&lab, false, &mut st);
    lb.service(53, Proto::Udp, &[BACKEND_A]);
    let cmac = mac_of(CLIENT);
    let (client, vip) = (sa(CLIENT, 5353), sa(VIP, 53));
    // A 64-byte datagram (8 UDP + 56) cut in two: the first fragment has
    // the UDP header and 24 bytes, the second the other 32 (offset 4).
    let payload: Vec<u8> = (0..56u8).collect();
    let whole = udp(cmac, ETH0_MAC, client, vip, &payload);
    let seg = &whole[14 + 40..];
    let mut first = with_ext(&whole[..14 + 40 + 32], &[(44, frag8(0, true))]);
    first[18..20].copy_from_slice(&(8u16 + 32).to_be_bytes());
    let mut later = [&whole[..14 + 40], &seg[32..]].concat();
    later = with_ext(&later, &[(44, frag8(4, false))]);
    later[14 + 40] = 17; // the fragment header's next header: UDP
    let (v, out1) = lb.step("first fragment", &first, &["to_backend", "new_flow"]);
    assert_eq!(v, XDP_TX);
    let (v, out2) = lb.step("later fragment", &later, &["to_backend", "fragment"]);
    assert_eq!(v, XDP_TX);
    let c = lb.conn();
    let std::net::IpAddr::V6(nat) = c.nat.ip() else {
        unreachable!()
    };
    for (what, out, src) in [("first", &out1, &first), ("later", &out2, &later)] {
        assert_eq!(&out[0..6], &mac_of(BACKEND_A), "{what}: to the backend");
        assert_eq!(
            &out[14 + 8..14 + 24],
            &nat.octets(),
            "{what}: from the NAT address"
        );
        assert_eq!(
            &out[14 + 24..14 + 40],
            &BACKEND_A.octets(),
            "{what}: to the backend"
        );
        assert_eq!(out.len(), src.len(), "{what}");
    }
    assert_eq!(
        &out2[14 + 40..],
        &later[14 + 40..],
        "the later fragment's rest unchanged"
    );
    // Reassembled, the datagram's checksum holds for the new addresses.
    let mut dgram = out1[14 + 48..].to_vec();
    dgram.extend_from_slice(&out2[14 + 48..]);
    assert_eq!(dgram.len(), 64);
    assert!(
        l4_valid(nat, BACKEND_A, 17, &dgram),
        "UDP checksum of the reassembled datagram"
    );
    assert_eq!(u16::from_be_bytes([dgram[0], dgram[1]]), c.nat.port());
}

/// Runs XDP program `prog` once on `frame` arriving on `ifindex`.
fn run_on(prog: &libbpf_rs::ProgramMut<'_>, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    let (verdict, len) = {
        let res = prog
            .test_run(ProgramInput {
                context_in: Some(&mut ctx),
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("test_run");
        (res.return_value, res.data.as_ref().map_or(0, |d| d.len()))
    };
    out.truncate(len);
    (verdict, out)
}

impl Lb<'_> {
    fn service_mode(&self, port: u16, mode: lb::model::FwdMode, backends: &[(Ipv6Addr, u16)]) {
        let svc = Service::new(SocketAddr::new(VIP.into(), port), Proto::Tcp);
        let conf = lb::model::SvcConf {
            mode,
            ..Default::default()
        };
        service::service_add_conf(&self.m, &svc, conf).expect("adding a service");
        for (b, p) in backends {
            service::backend_add(&self.m, &svc, SocketAddr::new((*b).into(), *p), 1)
                .expect("adding a backend");
        }
    }
}

/// The backend whose MAC `frame` is sent to.
fn backend_by_mac(frame: &[u8]) -> Ipv6Addr {
    [BACKEND_A, BACKEND_B]
        .into_iter()
        .find(|b| frame[0..6] == mac_of(*b))
        .unwrap_or_else(|| panic!("sent to no backend's MAC: {:02x?}", &frame[0..6]))
}

/// What an IPv6-in-IPv6 frame from the LB holds: the backend it is wrapped
/// to, after checking every outer field against `inner` (the client's frame
/// as it came in) and that the inner packet is unchanged.
fn unwrap6(out: &[u8], inner: &[u8]) -> Ipv6Addr {
    assert_eq!(out.len(), inner.len() + 40, "one 40-byte outer header");
    let be = backend_by_mac(out);
    assert_eq!(out[6..12], ETH0_MAC, "from the LB's MAC");
    assert_eq!(out[12..14], [0x86, 0xdd], "IPv6");
    let o = &out[14..54];
    assert_eq!(
        o[0..4],
        inner[14..18],
        "version, traffic class, flow label copied"
    );
    let plen = u16::from_be_bytes([o[4], o[5]]) as usize;
    assert_eq!(plen, inner.len() - 14, "payload: the whole inner packet");
    assert_eq!((o[6], o[7]), (41, 64), "next header IPv6, hop limit 64");
    assert_eq!(o[8..24], LB.octets(), "outer source: the LB");
    assert_eq!(o[24..40], be.octets(), "outer destination: the backend");
    assert_eq!(out[54..], inner[14..], "the client's packet, unchanged");
    be
}

/// IPv6 DSR and IPv6-in-IPv6: every packet of such a service goes to a
/// backend the Maglev table gives (cached per flow), unchanged but for its
/// MACs (DSR) or wrapped in an outer IPv6 header (IPIP); no connection
/// entries; `lb decap` unwraps what the LB wrapped.
#[test]
fn dsr_and_ipip_serve_ipv6() {
    if !common::root_or_skip("dsr_and_ipip_serve_ipv6") {
        return;
    }
    use lb::model::FwdMode;
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let lb = Lb::new(&lab, false, &mut st);
    lb.service_mode(80, FwdMode::Dsr, &[(BACKEND_A, 80), (BACKEND_B, 0)]);
    lb.service_mode(81, FwdMode::Ipip, &[(BACKEND_A, 81), (BACKEND_B, 0)]);
    let peer = mac_of(CLIENT);

    // DSR: a SYN and its flow's data go to one backend, only the MACs
    // changed; segments of flows never seen go too, over both backends.
    let syn = tcp(
        peer,
        ETH0_MAC,
        sa(CLIENT, 40000),
        sa(VIP, 80),
        |b| b.syn(),
        &[],
    );
    let (v, out) = lb.step("dsr SYN", &syn, &["to_backend", "new_flow"]);
    assert_eq!(v, XDP_TX);
    let first = backend_by_mac(&out);
    assert_eq!(out[6..12], ETH0_MAC);
    assert_eq!(out[12..], syn[12..], "DSR changes only the MACs");
    let data = tcp(
        peer,
        ETH0_MAC,
        sa(CLIENT, 40000),
        sa(VIP, 80),
        |b| b.ack(1),
        b"GET /",
    );
    let (_, out) = lb.step("dsr data", &data, &["to_backend"]);
    assert_eq!(backend_by_mac(&out), first, "the flow keeps its backend");
    assert_eq!(out[12..], data[12..]);
    let mut used = std::collections::BTreeSet::new();
    for port in 41000..41032 {
        let stray = tcp(
            peer,
            ETH0_MAC,
            sa(CLIENT, port),
            sa(VIP, 80),
            |b| b.ack(1),
            b"x",
        );
        let (v, out) = lb.step("dsr stray", &stray, &["to_backend", "new_flow"]);
        assert_eq!(v, XDP_TX);
        used.insert(backend_by_mac(&out));
    }
    assert_eq!(used.len(), 2, "32 unseen flows on one backend");
    assert!(
        conntrack::list(&lb.m).unwrap().is_empty(),
        "DSR makes no NAT entries"
    );

    // IPIP: wrapped, traffic class and flow label copied.
    let syn = tcp(
        peer,
        ETH0_MAC,
        sa(CLIENT, 40000),
        sa(VIP, 81),
        |b| b.syn(),
        &[],
    );
    let (v, out) = lb.step("ipip SYN", &syn, &["to_backend", "new_flow"]);
    assert_eq!(v, XDP_TX);
    let first = unwrap6(&out, &syn);
    let mut labelled = tcp(
        peer,
        ETH0_MAC,
        sa(CLIENT, 40000),
        sa(VIP, 81),
        |b| b.ack(1),
        b"GET /",
    );
    labelled[14..18].copy_from_slice(&[0x6b, 0x81, 0x23, 0x45]); // TC 0xb8, label 0x12345
    let (_, out) = lb.step("ipip data", &labelled, &["to_backend"]);
    assert_eq!(
        unwrap6(&out, &labelled),
        first,
        "the flow keeps its backend"
    );
    let wrapped = out;

    // The MTU (1500): 1460 bytes of IPv6 fit once wrapped, 1461 do not.
    let fits = tcp(
        peer,
        ETH0_MAC,
        sa(CLIENT, 40000),
        sa(VIP, 81),
        |b| b.ack(1),
        &[b'x'; 1460 - 60],
    );
    let (v, out) = lb.step("ipip fits", &fits, &["to_backend"]);
    assert_eq!((v, out.len()), (XDP_TX, 14 + 1500));
    let big = tcp(
        peer,
        ETH0_MAC,
        sa(CLIENT, 40000),
        sa(VIP, 81),
        |b| b.ack(1),
        &[b'x'; 1461 - 60],
    );
    let (v, _) = lb.step("ipip too big", &big, &["drop_too_big"]);
    assert_eq!(v, 1, "XDP_DROP");
    assert!(conntrack::list(&lb.m).unwrap().is_empty());

    // lb decap on the backend: the LB's output becomes the client's
    // packet again (to the backend's MAC); what is not IPv6 in IPv6, or
    // is cut short, passes untouched and is counted.
    let mut dst = MaybeUninit::uninit();
    let skel = lb::decap::load(None, &mut dst).expect("loading the decap program");
    let stats = libbpf_rs::MapHandle::try_from(&skel.maps.decap_stats).expect("decap_stats");
    let check = |name: &str, input: &[u8], want: &[u8]| {
        let before = lb::decap::read_map(&stats).unwrap();
        let (v, out) = run_on(&skel.progs.lb_decap, lb.ifindex, input);
        let after = lb::decap::read_map(&stats).unwrap();
        assert_eq!(v, XDP_PASS, "{name}");
        assert_eq!(out, want, "{name}: frame");
        for ((n, b), (_, a)) in before.iter().zip(&after) {
            let moved = u64::from(n == name);
            assert_eq!(a.packets - b.packets, moved, "{name}: counter {n}");
        }
    };
    let mut want = [&wrapped[0..12], &[0x86, 0xdd], &labelled[14..]].concat();
    want[0..6].copy_from_slice(&mac_of(first));
    check("decapsulated", &wrapped, &want);
    assert_eq!(
        seen(&want).dst,
        sa(VIP, 81),
        "the client's packet, checksum valid"
    );
    check("pass_not_ipip", &labelled, &labelled);
    let mut short = wrapped.clone();
    short.truncate(54 + 20); // an inner header cut short
    short[18..20].copy_from_slice(&20u16.to_be_bytes());
    check("pass_malformed", &short, &short);
    let mut frag = wrapped.clone();
    frag[20] = 44; // a fragment header next: not taken
    check("pass_fragment", &frag, &frag);
}

/// Client affinity with a timeout, IPv6 (map affinity6): a client's new
/// flow within the timeout goes to the backend its last one took, though
/// Maglev now picks another; past it, Maglev's choice.
#[test]
fn client_affinity_timeout_remembers_the_backend() {
    if !common::root_or_skip("client_affinity_timeout_remembers_the_backend6") {
        return;
    }
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let lb = Lb::new(&lab, false, &mut st);
    let svc = Service::new(SocketAddr::new(VIP.into(), 80), Proto::Tcp);
    let conf = lb::model::SvcConf {
        affinity: lb::model::Affinity::ClientIp,
        affinity_timeout: Some(60),
        ..Default::default()
    };
    service::service_add_conf(&lb.m, &svc, conf).expect("adding a service");
    service::backend_add(&lb.m, &svc, sa(BACKEND_A, 80), 1).expect("backend a");
    let cmac = mac_of(CLIENT);
    let backend_of = |client: Ipv6Addr, port: u16| {
        let syn = tcp(
            cmac,
            ETH0_MAC,
            sa(client, port),
            sa(VIP, 80),
            |b| b.syn(),
            &[],
        );
        let (v, out) = lb.step("SYN", &syn, &["to_backend", "new_flow"]);
        assert_eq!(v, XDP_TX);
        seen(&out).dst
    };
    assert_eq!(backend_of(CLIENT, 41000), sa(BACKEND_A, 80));
    service::backend_add(&lb.m, &svc, sa(BACKEND_B, 80), 1000).expect("backend b");
    let other: Ipv6Addr = "fd00:200::77".parse().unwrap();
    assert_eq!(backend_of(other, 41000), sa(BACKEND_B, 80), "Maglev's");
    assert_eq!(backend_of(CLIENT, 41001), sa(BACKEND_A, 80), "remembered");
    // 61 seconds later: Maglev's choice.
    let ticks = u64::from(61 * lb::clock::hz().expect("HZ"));
    let m = &lb.skel.maps.affinity6;
    for k in m.keys().collect::<Vec<_>>() {
        let mut v = m.lookup(&k, MapFlags::ANY).unwrap().expect("an entry");
        let seen = u64::from_ne_bytes(v[8..16].try_into().unwrap()) - ticks;
        v[8..16].copy_from_slice(&seen.to_ne_bytes());
        m.update(&k, &v, MapFlags::EXIST).unwrap();
    }
    assert_eq!(backend_of(CLIENT, 41002), sa(BACKEND_B, 80), "expired");
}

/// As over IPv4 (packets.rs, time_wait_tuple_is_taken_only_when_every_other_is_held):
/// with the one NAT port held by a finished connection within the
/// backend's TIME_WAIT, a new client tuple is dropped while that
/// connection's last second lasts, then takes its tuple (`nat_tw_reuse`).
#[test]
fn time_wait_tuple_is_taken_only_when_every_other_is_held_v6() {
    if !common::root_or_skip("time_wait_tuple_is_taken_only_when_every_other_is_held_v6") {
        return;
    }
    let lab = Lab::new();
    let mut st = MaybeUninit::uninit();
    let settings = Settings {
        max_flows: 4096,
        max_half_open: 4096,
        nat_ports: vec![lb::settings::PortRange {
            lo: 61000,
            hi: 61000,
        }],
        ..Default::default()
    };
    let lb = Lb::with_settings(&lab, false, settings, &mut st);
    lb.service(80, Proto::Tcp, &[BACKEND_A]);
    let (vip, cmac, bmac) = (sa(VIP, 80), mac_of(CLIENT), mac_of(BACKEND_A));
    let client = sa(CLIENT, 40000);
    let syn = tcp(cmac, ETH0_MAC, client, vip, |b| b.syn(), &[]);
    lb.step("SYN", &syn, &["to_backend", "new_flow"]);
    let c = lb.conn();
    assert_eq!(c.nat.port(), 61000);
    let from_be = |f: &dyn Fn(_) -> _| tcp(bmac, ETH0_MAC, c.backend, c.nat, f, &[]);
    let synack =
        from_be(&|b: etherparse::PacketBuilderStep<etherparse::TcpHeader>| b.syn().ack(1001));
    lb.step("SYN-ACK", &synack, &["to_client"]);
    let ack = tcp(cmac, ETH0_MAC, client, vip, |b| b.ack(1), &[]);
    lb.step("ACK", &ack, &["to_backend", "established"]);
    let fin = from_be(&|b: etherparse::PacketBuilderStep<etherparse::TcpHeader>| b.fin().ack(1001));
    lb.step("backend FIN", &fin, &["to_client"]);
    let cfin = tcp(cmac, ETH0_MAC, client, vip, |b| b.fin().ack(1), &[]);
    lb.step("client FIN", &cfin, &["to_backend"]);
    assert_eq!(lb.conn().state, "closing");

    let other = tcp(cmac, ETH0_MAC, sa(CLIENT, 40002), vip, |b| b.syn(), &[]);
    lb.step("finished just now", &other, &["drop_nat_full"]);
    // Two seconds later (the entries' clocks moved back).
    let ticks = 2 * u64::from(lb::clock::hz().expect("HZ"));
    let ct: Vec<(lb::maps::FlowKey6, lb::maps::Flow6)> =
        lb::maps::read_all(&lb.m.conntrack6).expect("reading conntrack6");
    for (k, mut f) in ct {
        f.seen -= ticks;
        f.created -= ticks;
        lb.m.conntrack6
            .update(bytes(&k), bytes(&f), libbpf_rs::MapFlags::EXIST)
            .expect("aging an entry");
    }
    let (v, out) = lb.step(
        "every tuple held",
        &other,
        &["to_backend", "new_flow", "nat_tw_reuse"],
    );
    assert_eq!(v, XDP_TX);
    assert_eq!(seen(&out).src, c.nat, "the finished connection's tuple");

    // `lb conntrack --delete` over IPv6: the new (half-open) connection's
    // two entries go, the old one's stale client entry is not listed.
    let conns = conntrack::list(&lb.m).expect("listing");
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conntrack::delete(&lb.m, &conns).expect("deleting"), 2);
    let left = conntrack::entries6(&lb.m).expect("IPv6 entries");
    assert!(
        left.len() == 1 && left[0].0.sport == 40000u16.to_be(),
        "only the old client's entry is left: {left:?}"
    );
}
