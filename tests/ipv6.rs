//! IPv6 full NAT end to end, in the talk's topology (scripts/topo gives
//! every host fd00:200::X beside 10.200.0.X and the LB IPv6 forwarding):
//! the service [fd00:200::2]:8080 -> a, b, in native and skb mode. Every
//! request is answered, by both backends; UDP datagrams are answered too;
//! no receiver sees a bad checksum (TcpInCsumErrors, Udp6InCsumErrors);
//! `lb conntrack` lists the IPv6 connections.

mod common;

use std::process::{Child, Command, Stdio};

use common::{curl, lb, nstat, root_or_skip, run, PinDir, Topo};
use serde_json::Value;

const VIP: &str = "[fd00:200::2]:8080";
const PORT: &str = "8080";

/// An HTTP server on [::]:8080 and a UDP echo server on [::]:8053 in `ns`,
/// answering with the backend's name, under `timeout`; stopped on drop.
struct Servers(Vec<Child>);

impl Servers {
    fn start(ns: &str, name: &str) -> Self {
        let http = format!(
            "import http.server, socket\n\
             class S(http.server.ThreadingHTTPServer):\n\
             \x20   address_family = socket.AF_INET6\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       b = b'backend {name}\\n'\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(b)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b)\n\
             \x20   def log_message(self, *a):\n\
             \x20       pass\n\
             S(('::', {PORT}), H).serve_forever()\n"
        );
        let udp = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             s.bind(('::', 8053))\n\
             while True:\n\
             \x20   d, a = s.recvfrom(2048)\n\
             \x20   s.sendto(b'{name} ' + d, a)\n"
        );
        let mut children = Vec::new();
        for script in [http, udp] {
            children.push(
                Command::new("ip")
                    .args([
                        "netns", "exec", ns, "timeout", "60", "python3", "-c", &script,
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting a server"),
            );
        }
        let me = Self(children);
        assert!(common::listening(ns, PORT), "no server on :{PORT} in {ns}");
        me
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            common::stop_child(c);
        }
    }
}

/// Sends `n` UDP datagrams to the VIP from `ns`, each from its own socket
/// (a new flow), and returns the answers.
fn udp_answers(ns: &str, n: u32) -> Vec<String> {
    let script = format!(
        "import socket\n\
         for i in range({n}):\n\
         \x20   s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(2)\n\
         \x20   s.sendto(b'q%d' % i, ('fd00:200::2', 8053))\n\
         \x20   try:\n\
         \x20       print(s.recv(2048).decode())\n\
         \x20   except socket.timeout:\n\
         \x20       print('timeout')\n\
         \x20   s.close()\n"
    );
    let out = run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{ns}"),
            "timeout",
            "60",
            "python3",
            "-c",
            &script,
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn ipv6_through_lb(test: &str, mode: &str) {
    if !root_or_skip(test) {
        return;
    }
    let t = Topo::up(mode);
    let lbns = t.ns("lb");
    let servers: Vec<Servers> = ["a", "b"]
        .iter()
        .map(|h| Servers::start(&t.ns(h), h))
        .collect();
    let pins = PinDir::new("lb6");
    let p = pins.arg();
    let ok = |args: &[&str]| {
        let out = lb(args);
        assert!(
            out.status.success(),
            "lb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let at = ["--netns", lbns.as_str(), "--pin-dir", p];
    ok(&[&["attach", "eth0", "--mode", mode][..], &at].concat());
    let udp_vip = "[fd00:200::2]:8053";
    ok(&[&["service", "add", VIP][..], &at].concat());
    ok(&[&["service", "add", udp_vip, "--proto", "udp"][..], &at].concat());
    for b in ["fd00:200::11", "fd00:200::12"] {
        ok(&[&["backend", "add", VIP, &format!("[{b}]:{PORT}")][..], &at].concat());
        ok(&[
            &[
                "backend",
                "add",
                udp_vip,
                &format!("[{b}]:8053"),
                "--proto",
                "udp",
            ][..],
            &at,
        ]
        .concat());
    }

    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let body = curl(&t.ns("c"), &format!("http://{VIP}/"), "3");
        *seen.entry(body).or_insert(0) += 1;
    }
    let mut udp = std::collections::BTreeMap::new();
    for a in udp_answers(&t.ns("c"), 20) {
        *udp.entry(a.split(' ').next().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    let conns: Value =
        serde_json::from_slice(&ok(&[&["conntrack", "--json"][..], &at].concat()).stdout).unwrap();
    let st: Value =
        serde_json::from_slice(&ok(&[&["stats", "--json"][..], &at].concat()).stdout).unwrap();
    let packets = |c: &str| st["counters"][c]["packets"].as_u64().unwrap_or(0);
    eprintln!(
        "{mode}: answers {seen:?}, UDP {udp:?}; to_backend {} to_client {}",
        packets("to_backend"),
        packets("to_client")
    );
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["backend a", "backend b"],
        "every request answered, by both backends: {seen:?}"
    );
    assert_eq!(
        udp.keys().cloned().collect::<Vec<_>>(),
        ["a", "b"],
        "every datagram answered, by both backends: {udp:?}"
    );
    assert!(packets("to_client") >= 40 * 3, "{st:#}");
    for c in [
        "pass_no_route",
        "drop_nat_full",
        "pass_malformed",
        "evicted",
    ] {
        assert_eq!(packets(c), 0, "{c}: {st:#}");
    }
    let rows = conns.as_array().expect("conntrack --json is a list");
    assert!(
        rows.iter().any(|r| r["client"]
            .as_str()
            .unwrap_or("")
            .starts_with("[fd00:200::10]:")),
        "IPv6 connections listed: {conns:#}"
    );
    for h in ["c", "a", "b"] {
        for c in ["TcpInCsumErrors", "Udp6InCsumErrors"] {
            assert_eq!(nstat(&t.ns(h), c), 0, "{c} in {h}");
        }
    }
    ok(&[&["detach", "eth0"][..], &at].concat());
    drop(servers);
}

#[test]
fn ipv6_native() {
    ipv6_through_lb("ipv6_native", "native");
}

#[test]
fn ipv6_skb() {
    ipv6_through_lb("ipv6_skb", "skb");
}
