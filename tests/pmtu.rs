//! Path MTU discovery through lb (ICMP errors about tracked flows, issue
//! 10): a router between the client and lb forwards at most 1000 bytes
//! towards the client, while both ends negotiated a 1460-byte MSS. The
//! backend's full-size segments reach the router, which answers with
//! "fragmentation needed" addressed to the VIP (their source after lb).
//! Only if lb hands that error to the backend, as about the backend's own
//! packet to the LB, does the backend lower its path MTU and resend
//! smaller; otherwise a large response hangs (a PMTU black hole).
//!
//!   C (10.200.9.10, MTU 1500) ── c0 (MTU 1000) R br0 (10.200.8.1) ─┬─ L: lb (10.200.8.2)
//!                                                                  └─ B: backend (10.200.8.11)
//!
//! The same over IPv6 (fd00:209::/64 and fd00:208::/64, the router's
//! client side at 1280 bytes, IPv6's minimum): "packet too big".
//!
//! All traffic stays inside the test's namespaces (prefix lbm).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{lb, root_or_skip, run, Netns, PinDir};

/// The addresses and limits of one family's run.
struct Fam {
    client: &'static str,
    router_c: &'static str,
    router_l: &'static str,
    lb: &'static str,
    backend: &'static str,
    /// Prefix length of both subnets.
    len: u8,
    /// MTU of the router's port towards the client.
    mtu: &'static str,
    /// The forwarding sysctl (the router's; for IPv6 the LB's too, which
    /// bpf_fib_lookup needs).
    forward: &'static str,
    /// Extra `ip addr add` flags.
    addr_flags: &'static [&'static str],
    /// ICMP checksum error counter.
    icmp_csum: &'static str,
}

const V4: Fam = Fam {
    client: "10.200.9.10",
    router_c: "10.200.9.1",
    router_l: "10.200.8.1",
    lb: "10.200.8.2",
    backend: "10.200.8.11",
    len: 24,
    mtu: "1000",
    forward: "net.ipv4.ip_forward=1",
    addr_flags: &[],
    icmp_csum: "IcmpInCsumErrors",
};

const V6: Fam = Fam {
    client: "fd00:209::10",
    router_c: "fd00:209::1",
    router_l: "fd00:208::1",
    lb: "fd00:208::2",
    backend: "fd00:208::11",
    len: 64,
    mtu: "1280",
    forward: "net.ipv6.conf.all.forwarding=1",
    addr_flags: &["nodad"],
    icmp_csum: "Icmp6InCsumErrors",
};

impl Fam {
    /// Host `h` in URLs and service addresses.
    fn host(h: &str) -> String {
        if h.contains(':') {
            format!("[{h}]")
        } else {
            h.to_string()
        }
    }

    fn addr(&self, ns: &Netns, ip: &str, dev: &str) {
        let cidr = format!("{ip}/{}", self.len);
        let mut a = vec!["addr", "add", cidr.as_str(), "dev", dev];
        a.extend_from_slice(self.addr_flags);
        ns.ip(&a);
    }
}
/// Bytes of the response: many full-size segments.
const BIG: usize = 300_000;

/// A veth from `a` (named `an`) to `b` (named `bn`).
fn veth(a: &Netns, an: &str, b: &Netns, bn: &str) {
    a.ip(&[
        "link", "add", "name", an, "type", "veth", "peer", "name", bn, "netns", &b.name,
    ]);
    a.ip(&["link", "set", "dev", an, "up"]);
    b.ip(&["link", "set", "dev", bn, "up"]);
}

fn sysctl(ns: &Netns, kv: &str) {
    run("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", kv]);
}

/// `nstat -az` counters of `ns` by name.
fn nstat(ns: &Netns, names: &[&str]) -> Vec<(String, u64)> {
    let out = run("ip", &["netns", "exec", &ns.name, "nstat", "-az"]);
    let text = String::from_utf8_lossy(&out.stdout);
    names
        .iter()
        .map(|n| {
            let v = text
                .lines()
                .find_map(|l| {
                    let mut f = l.split_whitespace();
                    (f.next() == Some(n)).then(|| f.next().unwrap_or("0").parse().unwrap_or(0))
                })
                .unwrap_or(0);
            (n.to_string(), v)
        })
        .collect()
}

/// A python HTTP server in the backend namespace serving `big` (BIG bytes),
/// under `timeout`; killed by PID and its directory removed on drop.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Server {
    fn start(ns: &Netns, bind: &str) -> Self {
        let dir = std::env::temp_dir().join(common::unique("lbm-www-"));
        std::fs::create_dir_all(&dir).expect("server directory");
        std::fs::write(dir.join("big"), vec![b'x'; BIG]).expect("big file");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "timeout", "120"])
            .args(["python3", "-m", "http.server", "80", "--bind", bind])
            .arg("--directory")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the HTTP server");
        let start = Instant::now();
        let net = format!("--net=/run/netns/{}", ns.name);
        while start.elapsed() < Duration::from_secs(10) {
            let out = run("nsenter", &[&net, "ss", "-Htln", "sport = :80"]);
            if !out.stdout.is_empty() {
                return Self { child, dir };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        common::stop_child(&mut child);
        panic!("the HTTP server in {} does not listen", ns.name);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        common::stop_child(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Detaches lb on drop (the namespaces go with their own guards).
struct Attached<'a> {
    ns: &'a Netns,
    pins: &'a PinDir,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let _ = lb(&[
            "detach",
            "eth0",
            "--netns",
            &self.ns.name,
            "--pin-dir",
            self.pins.arg(),
        ]);
    }
}

/// Runs curl in the client namespace for the big file: (bytes received,
/// curl's exit code).
fn fetch(c: &Netns, lb_ip: &str) -> (usize, i32) {
    let out = Command::new("ip")
        .args(["netns", "exec", &c.name, "curl", "-s", "-o", "-"])
        .args(["--max-time", "8", "--connect-timeout", "3"])
        .arg(format!("http://{}/big", Fam::host(lb_ip)))
        .output()
        .expect("running curl");
    (out.stdout.len(), out.status.code().unwrap_or(-1))
}

#[test]
fn large_responses_cross_a_smaller_mtu_on_the_clients_path() {
    if !root_or_skip("large_responses_cross_a_smaller_mtu_on_the_clients_path") {
        return;
    }
    through_a_smaller_mtu(&V4);
}

#[test]
fn large_ipv6_responses_cross_a_smaller_mtu_on_the_clients_path() {
    if !root_or_skip("large_ipv6_responses_cross_a_smaller_mtu_on_the_clients_path") {
        return;
    }
    through_a_smaller_mtu(&V6);
}

fn through_a_smaller_mtu(f: &Fam) {
    let c = Netns::new("lbm");
    let r = Netns::new("lbm");
    let l = Netns::new("lbm");
    let b = Netns::new("lbm");
    for ns in [&c, &r, &l, &b] {
        ns.ip(&["link", "set", "dev", "lo", "up"]);
    }
    veth(&r, "c0", &c, "eth0");
    r.ip(&["link", "add", "name", "br0", "type", "bridge"]);
    r.ip(&["link", "set", "dev", "br0", "up"]);
    veth(&r, "l0", &l, "eth0");
    veth(&r, "b0", &b, "eth0");
    for p in ["l0", "b0"] {
        r.ip(&["link", "set", "dev", p, "master", "br0"]);
    }
    // The router forwards at most 1000 bytes towards the client; the
    // client itself (MTU 1500) advertises a 1460-byte MSS.
    r.ip(&["link", "set", "dev", "c0", "mtu", f.mtu]);
    f.addr(&r, f.router_c, "c0");
    f.addr(&r, f.router_l, "br0");
    sysctl(&r, f.forward);
    sysctl(&l, f.forward);
    f.addr(&c, f.client, "eth0");
    c.ip(&["route", "add", "default", "via", f.router_c]);
    f.addr(&l, f.lb, "eth0");
    l.ip(&["route", "add", "default", "via", f.router_l]);
    f.addr(&b, f.backend, "eth0");
    b.ip(&["route", "add", "default", "via", f.router_l]);
    let _server = Server::start(&b, f.backend);

    let pins = PinDir::new("lbm");
    let out = lb(&[
        "attach",
        "eth0",
        "--netns",
        &l.name,
        "--pin-dir",
        pins.arg(),
        "--lb",
        f.lb,
        "--backend",
        f.backend,
        "--port",
        "80",
        "--mode",
        "skb",
    ]);
    assert!(
        out.status.success(),
        "lb attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _attached = Attached {
        ns: &l,
        pins: &pins,
    };

    let (got, code) = fetch(&c, f.lb);
    let stats = lb(&[
        "stats",
        "--json",
        "--netns",
        &l.name,
        "--pin-dir",
        pins.arg(),
    ]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("lb stats --json");
    let icmp = stats["counters"]["icmp_error"]["packets"]
        .as_u64()
        .expect("icmp_error counter");
    let csum: Vec<_> = [&c, &b]
        .iter()
        .flat_map(|ns| nstat(ns, &["TcpInCsumErrors", f.icmp_csum]))
        .collect();
    eprintln!(
        "curl: {got} of {BIG} bytes (exit {code}); lb icmp_error {icmp}; \
         checksum errors at client and backend {csum:?}"
    );
    assert_eq!(code, 0, "curl failed: the response hung ({got} bytes)");
    assert_eq!(got, BIG, "{got} of {BIG} bytes arrived");
    assert!(
        icmp > 0,
        "no ICMP error was translated (the router sent none?)"
    );
    for (n, v) in csum {
        assert_eq!(v, 0, "{n}");
    }
}
