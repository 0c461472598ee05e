//! Several lb nodes behind ECMP, announced by a real BGP daemon (issue 11):
//!
//! ```text
//!   client c: 10.200.2.2, sources 10.200.3.1-8 on lo
//!      │ veth
//!   router r: BIRD (eBGP from each node, ECMP: merge paths), L4 multipath hash
//!      │ 10.200.1.1
//!   ───┴──────── bridge lan (namespace br) ────────────────────────────
//!      │ 10.200.1.11-13                        │ 10.200.1.21-22
//!   nodes n1, n2, n3: lb run (one TOML file,   backends a, b: the VIP on lo
//!   skb XDP on eth0, [announce] lo), BIRD      (arp_ignore/arp_announce), default
//!   from contrib/bird/bird.conf                route via the router
//! ```
//!
//! The router learns the VIP from the three nodes and spreads new
//! connections over them; every node builds the same Maglev table. In DSR
//! the answers go from the backends straight to the router (each node's
//! to_client stays 0) and the backends see the clients' addresses; when a
//! node's `lb run` stops it withdraws the VIP, BIRD withdraws the route and
//! every held connection goes on (the nodes it moves to pick its backend
//! from the same table), as when the node starts again and joins. IP-in-IP
//! the same, the backends running `lb decap`. In full NAT each node has its own SNAT address
//! (`lb run --snat`) and only the connections of the stopped node fail.
//! Every wait is bounded; every process is ours, stopped by its PID.

mod common;
#[path = "common/services.rs"]
mod svc;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{lb, Netns, PinDir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use svc::{text, Proc};

const VIP: &str = "10.200.9.100";
const PORT: u16 = 8080;
const ROUTER: &str = "10.200.1.1";
const NODES: [&str; 3] = ["10.200.1.11", "10.200.1.12", "10.200.1.13"];
const BACKENDS: [(&str, &str); 2] = [("a", "10.200.1.21"), ("b", "10.200.1.22")];
/// Node i's own SNAT address (full NAT), on its lo.
fn snat(i: usize) -> String {
    format!("10.200.4.{}", i + 1)
}
/// The client's source addresses (on its lo), so that L4 hashing sees
/// varied tuples.
fn sources() -> Vec<String> {
    (1..=8).map(|i| format!("10.200.3.{i}")).collect()
}

/// Backend server: a thread per connection; answers each line with
/// `NAME PEER|line` (PEER: the address:port it sees) and an HTTP GET (curl)
/// with `NAME PEER`, then closes. Args: NAME PORT LIFETIME_S.
const SERVER: &str = r#"
import socketserver, sys, threading
name, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.request.settimeout(life)
        peer = "%s:%d" % self.client_address[:2]
        for line in self.rfile:
            if line.startswith(b"GET "):
                while line not in (b"\r\n", b"\n", b""):
                    line = self.rfile.readline()
                body = ("%s %s\n" % (name, peer)).encode()
                self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                return
            self.wfile.write(("%s %s|" % (name, peer)).encode() + line)
            self.wfile.flush()
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256
srv = S(("0.0.0.0", port), H)
threading.Timer(life, srv.shutdown).start()
print("ready", flush=True)
srv.serve_forever(0.2)
"#;

/// The held connections. One JSON argument: vip, port, sources, n,
/// interval, after, new, budget. Opens n connections (source address i %
/// len), each sending a numbered line every `interval` s and checking the
/// answer (io timeout 2 s; a connection stops at its first failure);
/// prints {"event": "ready", "conns": [{local, backend, peer}]} once each
/// has made 3 exchanges; reads "stopping" and "converged" on stdin (the
/// test stops a node in between), goes on for `after` s, prints
/// {"event": "held", "conns": [{local, backend, peer, ok_before,
/// ok_after, error, failed_after_s}]} (exchanges before "stopping", begun
/// after "converged"; failure time from "stopping"), reads "new", makes
/// `new` exchanges each on a new connection and prints {"event": "done",
/// "new": [{local, backend, peer}], "new_errors": [...]}.
const HOLDER: &str = r#"
import json, select, socket, sys, threading, time
cfg = json.loads(sys.argv[1])
vip, port, srcs, n = cfg["vip"], cfg["port"], cfg["sources"], cfg["n"]
deadline = time.monotonic() + cfg["budget"]
def left():
    return max(0.05, deadline - time.monotonic())
stop = threading.Event()
conns = [{"local": None, "backend": None, "peer": None, "ok": [], "error": None, "failed_at": None} for _ in range(n)]
def connect(i):
    s = socket.create_connection((vip, port), timeout=min(5, left()), source_address=(srcs[i % len(srcs)], 0))
    s.settimeout(2.0)
    return s, s.makefile("rb"), "%s:%d" % s.getsockname()[:2]
def exchange(s, f, seq):
    line = b"%d\n" % seq
    s.sendall(line)
    r = f.readline()
    if not r:
        raise ConnectionError("closed by the peer")
    who, _, echoed = r.partition(b"|")
    if echoed != line:
        raise ValueError("answer mismatch: %r" % r)
    name, peer = who.decode(errors="replace").split(" ")
    return name, peer
def keep(i):
    c = conns[i]
    try:
        s, f, c["local"] = connect(i)
    except Exception as e:
        c["error"], c["failed_at"] = "connect: %s: %s" % (type(e).__name__, e), time.monotonic()
        return
    seq = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            who = exchange(s, f, seq)
            if c["backend"] is None:
                c["backend"], c["peer"] = who
            elif who != (c["backend"], c["peer"]):
                raise ValueError("answered by %s, then by %s" % ((c["backend"], c["peer"]), who))
            c["ok"].append((t, time.monotonic()))
            seq += 1
            stop.wait(cfg["interval"])
    except Exception as e:
        c["error"], c["failed_at"] = "%s: %s" % (type(e).__name__, e), time.monotonic()
    finally:
        s.close()
threads = [threading.Thread(target=keep, args=(i,), daemon=True) for i in range(n)]
for t in threads:
    t.start()
while time.monotonic() < deadline and not all(c["error"] or len(c["ok"]) >= 3 for c in conns):
    time.sleep(0.05)
print(json.dumps({"event": "ready", "conns": [{k: c[k] for k in ("local", "backend", "peer", "error")} for c in conns]}), flush=True)
def mark(want):
    r, _, _ = select.select([sys.stdin], [], [], left())
    got = sys.stdin.readline().strip() if r else ""
    if got != want:
        print(json.dumps({"event": "error", "why": "expected %r, got %r" % (want, got)}), flush=True)
        sys.exit(1)
    return time.monotonic()
t0 = mark("stopping")
t1 = mark("converged")
time.sleep(min(cfg["after"], left()))
stop.set()
for t in threads:
    t.join(left())
print(json.dumps({"event": "held", "conns": [{
    "local": c["local"], "backend": c["backend"], "peer": c["peer"],
    "ok_before": sum(1 for s, e in c["ok"] if e < t0),
    "ok_after": sum(1 for s, e in c["ok"] if s >= t1),
    "error": c["error"],
    "failed_after_s": None if c["failed_at"] is None else round(c["failed_at"] - t0, 3),
} for c in conns]}), flush=True)
mark("new")
new, new_errors = [], []
for i in range(cfg["new"]):
    try:
        s, f, local = connect(i)
        with s:
            name, peer = exchange(s, f, i)
            new.append({"local": local, "backend": name, "peer": peer})
    except Exception as e:
        new_errors.append("%s: %s" % (type(e).__name__, e))
print(json.dumps({"event": "done", "new": new, "new_errors": new_errors}), flush=True)
"#;

/// A directory of our own under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(common::unique("hCso"));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// BIRD in the foreground under `timeout` in a namespace, with its own
/// config, control socket and pid file; stopped by the PID of our child
/// (SIGTERM to `timeout`, which passes it on) on drop.
struct Bird {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Bird {
    fn start(ns: &str, dir: &Path, name: &str, conf: &str) -> Self {
        let file = dir.join(format!("{name}.conf"));
        let log = dir.join(format!("{name}.log"));
        let conf = format!("log \"{}\" all;\n{conf}", log.display());
        std::fs::write(&file, &conf).unwrap();
        let sock = dir.join(format!("{name}.ctl"));
        let pid = dir.join(format!("{name}.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "300", "bird", "-f", "-c"])
            .arg(&file)
            .arg("-s")
            .arg(&sock)
            .arg("-P")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting bird (Debian: bird2, installed by scripts/lib/common.sh)");
        let mut b = Self { child, sock, log };
        let t0 = Instant::now();
        while !b.sock.exists() {
            if let Ok(Some(st)) = b.child.try_wait() {
                panic!("bird {name} exited ({st}); config:\n{conf}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "bird {name}: no control socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    /// `birdc show protocols` and the log, for failure messages.
    fn show(&self, ns: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "5", "birdc", "-s"])
            .arg(&self.sock)
            .args(["show", "protocols"])
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("{out}\nlog:\n{log}")
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        common::stop_child(&mut self.child);
    }
}

/// `lb run` as a child, logs collected; killed on drop.
struct Daemon {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(file: &Path, ns: &str, pins: &PinDir, snat: Option<&str>) -> Self {
        let mut cmd = Command::new(common::lb_bin());
        cmd.arg("run")
            .arg("-f")
            .arg(file)
            .args(["--netns", ns, "--pin-dir", pins.arg()]);
        if let Some(a) = snat {
            cmd.args(["--snat", a]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lb run");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&logs);
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for l in err.lines() {
                let Ok(l) = l else { break };
                keep.lock().unwrap().push(l);
            }
        });
        let mut d = Self { child, logs };
        let t0 = Instant::now();
        while !d.log().contains("running") {
            if !matches!(d.child.try_wait(), Ok(None)) || t0.elapsed() > Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
                panic!("lb run in {ns} did not start:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn stop(&mut self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("signal");
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "lb run exited with {st}:\n{}", self.log());
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "lb run did not stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole topology; everything stopped and removed on drop, in order:
/// the daemons, the datapaths, BIRD, the servers, then pins, namespaces
/// and files.
struct Cluster {
    daemons: Vec<Option<Daemon>>,
    birds: Vec<(String, Bird)>,
    servers: Vec<Proc>,
    pins: Vec<PinDir>,
    /// The backends' `lb decap` pins (IPIP), by backend.
    decap_pins: Vec<PinDir>,
    router: Netns,
    client: Netns,
    nodes: Vec<Netns>,
    backends: Vec<Netns>,
    br: Netns,
    dir: TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.daemons.clear();
        for (n, p) in self.nodes.iter().zip(&self.pins) {
            let _ = lb(&["detach", "eth0", "--netns", &n.name, "--pin-dir", p.arg()]);
        }
        for (n, p) in self.backends.iter().zip(&self.decap_pins) {
            let _ = lb(&[
                "decap",
                "eth0",
                "--detach",
                "--netns",
                &n.name,
                "--pin-dir",
                p.arg(),
            ]);
        }
        self.birds.clear();
        self.servers.clear();
    }
}

fn sysctl(ns: &Netns, kv: &str) {
    ns.exec("sysctl", &["-qw", kv]);
}

/// A namespace with lo up and no reverse-path filter (IPv4 settings of a
/// new namespace are inherited from the host's: the router forwards
/// answers from the VIP, which it routes elsewhere).
fn host(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    ns.ip(&["link", "set", "dev", "lo", "up"]);
    for kv in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        sysctl(&ns, kv);
    }
    ns
}

/// A veth from bridge `lan` of `br` (port `port`) to `eth0` of `ns` with
/// `addr`/24. The bridge port finishes checksums in software (TX offload
/// off), so every receiver verifies real ones.
fn on_lan(br: &Netns, port: &str, ns: &Netns, addr: &str) {
    br.ip(&[
        "link", "add", "name", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    br.ip(&["link", "set", "dev", port, "master", "lan", "up"]);
    br.exec("ethtool", &["-K", port, "tx", "off"]);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "dev", "eth0", "up"]);
}

/// The lb configuration every node runs.
fn lb_toml(mode: &str) -> String {
    let mut s = format!(
        "[settings]\nmax_flows = 65536\nmaglev_size = 1021\n\n\
         [announce]\ninterface = \"lo\"\non_stop = \"withdraw\"\n\n\
         [[interfaces]]\nname = \"eth0\"\nmode = \"skb\"\n\n\
         [[services]]\nvip = \"{VIP}\"\nport = {PORT}\nmode = \"{mode}\"\n"
    );
    for (_, ip) in BACKENDS {
        s += &format!(
            "\n[[services.backends]]\naddr = \"{ip}:{PORT}\"\n\
             check = {{ kind = \"tcp\", interval_ms = 1000, timeout_ms = 900, fall = 3 }}\n"
        );
    }
    s
}

/// BGP timers of the test: a lost session is noticed within 3 s, and a
/// session comes up within a second or two of both daemons starting.
const TIMERS: &str = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1;";

/// A shipped BIRD example (contrib/bird/FILE) with each `from` replaced:
/// each must be in the file, so the examples and the test stay one.
fn from_shipped(file: &str, shipped: &str, edits: &[(String, String)]) -> String {
    let mut conf = shipped.to_string();
    for (from, to) in edits {
        assert!(
            conf.contains(from.as_str()),
            "contrib/bird/{file} has no {from:?}: update tests/scaleout.rs with it"
        );
        conf = conf.replace(from.as_str(), to);
    }
    conf
}

/// BIRD on node `ip`: contrib/bird/bird.conf with this node's addresses
/// and the test's timers.
fn node_bird(ip: &str) -> String {
    let edits = [
        ("log syslog all;", String::new()),
        ("router id 10.200.5.2;", format!("router id {ip};")),
        (
            "local 10.200.5.2 as 65001;",
            format!("local {ip} as 65001;"),
        ),
        (
            "neighbor 10.200.5.1 as 65000;",
            format!("neighbor {ROUTER} as 65000;"),
        ),
        ("hold time 9;", TIMERS.to_string()),
    ];
    let edits: Vec<(String, String)> = edits.into_iter().map(|(f, t)| (f.into(), t)).collect();
    from_shipped(
        "bird.conf",
        include_str!("../contrib/bird/bird.conf"),
        &edits,
    )
}

/// BIRD on the router: contrib/bird/router.conf (eBGP from every node, one
/// multipath kernel route per VIP) with the test's addresses and timers.
fn router_bird() -> String {
    let mut edits: Vec<(String, String)> = vec![
        ("log syslog all;".into(), String::new()),
        (
            "router id 10.200.5.1;".into(),
            format!("router id {ROUTER};"),
        ),
        (
            "local 10.200.5.1 as 65000;".into(),
            format!("local {ROUTER} as 65000;"),
        ),
        ("hold time 9;".into(), TIMERS.to_string()),
    ];
    for (i, ip) in NODES.iter().enumerate() {
        edits.push((
            format!("neighbor 10.200.5.{} as 65001;", i + 2),
            format!("neighbor {ip} as 65001;"),
        ));
    }
    from_shipped(
        "router.conf",
        include_str!("../contrib/bird/router.conf"),
        &edits,
    )
}

impl Cluster {
    fn up(mode: &str) -> Self {
        let br = host("hCbr");
        br.ip(&["link", "add", "name", "lan", "type", "bridge"]);
        br.ip(&["link", "set", "dev", "lan", "up"]);
        let router = host("hCr");
        let client = host("hCc");
        on_lan(&br, "pr", &router, ROUTER);
        sysctl(&router, "net.ipv4.ip_forward=1");
        sysctl(&router, "net.ipv4.fib_multipath_hash_policy=1");
        router.ip(&[
            "link",
            "add",
            "name",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ]);
        router.ip(&["addr", "add", "10.200.2.1/24", "dev", "eth1"]);
        router.ip(&["link", "set", "dev", "eth1", "up"]);
        router.ip(&["route", "add", "10.200.3.0/24", "via", "10.200.2.2"]);
        client.ip(&["addr", "add", "10.200.2.2/24", "dev", "eth0"]);
        client.ip(&["link", "set", "dev", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", "10.200.2.1"]);
        for a in sources() {
            client.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        // Both ends of the client's link finish their checksums: the
        // receivers (client, backends) verify real ones.
        client.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        router.exec("ethtool", &["-K", "eth1", "tx", "off"]);

        let mut backends = Vec::new();
        for (name, ip) in BACKENDS {
            let ns = host(&format!("hC{name}"));
            on_lan(&br, &format!("p{name}"), &ns, ip);
            ns.ip(&["route", "add", "default", "via", ROUTER]);
            if mode != "nat" {
                ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                sysctl(&ns, "net.ipv4.conf.all.arp_ignore=1");
                sysctl(&ns, "net.ipv4.conf.all.arp_announce=2");
            } else {
                // Full NAT: each node's answers go back to that node.
                for (j, n) in NODES.iter().enumerate() {
                    ns.ip(&["route", "add", &format!("{}/32", snat(j)), "via", n]);
                }
            }
            backends.push(ns);
        }
        let mut nodes = Vec::new();
        for (i, ip) in NODES.iter().enumerate() {
            let ns = host(&format!("hCn{}", i + 1));
            on_lan(&br, &format!("pn{}", i + 1), &ns, ip);
            ns.ip(&["route", "add", "default", "via", ROUTER]);
            if mode == "nat" {
                ns.ip(&["addr", "add", &format!("{}/32", snat(i)), "dev", "lo"]);
            }
            nodes.push(ns);
        }
        let dir = TempDir::new();
        let mut c = Self {
            daemons: Vec::new(),
            birds: Vec::new(),
            servers: Vec::new(),
            pins: Vec::new(),
            decap_pins: Vec::new(),
            router,
            client,
            nodes,
            backends,
            br,
            dir,
        };
        for (ns, (name, _)) in c.backends.iter().zip(BACKENDS) {
            let mut p = Proc::spawn(
                &format!("server {name}"),
                &ns.name,
                SERVER,
                &[name, &PORT.to_string(), "240"],
            );
            assert_eq!(p.line(Duration::from_secs(20)), "ready", "server {name}");
            c.servers.push(p);
        }
        if mode == "ipip" {
            // Each backend unwraps what the nodes wrap (skb mode, as the
            // nodes' XDP).
            for ns in &c.backends {
                let pins = PinDir::new("hCsd");
                let out = lb(&[
                    "decap",
                    "eth0",
                    "--mode",
                    "skb",
                    "--netns",
                    &ns.name,
                    "--pin-dir",
                    pins.arg(),
                ]);
                assert!(
                    out.status.success(),
                    "lb decap: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                c.decap_pins.push(pins);
            }
        }
        let b = Bird::start(&c.router.name, &c.dir.0, "router", &router_bird());
        c.birds.push((c.router.name.clone(), b));
        let file = c.dir.0.join("lb.toml");
        std::fs::write(&file, lb_toml(mode)).unwrap();
        for (i, ip) in NODES.iter().enumerate() {
            let ns = c.nodes[i].name.clone();
            let pins = PinDir::new("hCso");
            let snat = (mode == "nat").then(|| snat(i));
            let d = Daemon::start(&file, &ns, &pins, snat.as_deref());
            c.pins.push(pins);
            c.daemons.push(Some(d));
            let b = Bird::start(&ns, &c.dir.0, &format!("n{}", i + 1), &node_bird(ip));
            c.birds.push((ns, b));
        }
        c
    }

    /// The router's next hops for the VIP, in the kernel's order.
    fn nexthops(&self) -> Vec<String> {
        let out = self
            .router
            .ip(&["-j", "route", "show", &format!("{VIP}/32")]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let Some(r) = v.as_array().and_then(|a| a.first()) else {
            return Vec::new();
        };
        match r["nexthops"].as_array() {
            Some(hops) => hops
                .iter()
                .filter_map(|h| h["gateway"].as_str().map(String::from))
                .collect(),
            None => r["gateway"]
                .as_str()
                .map(String::from)
                .into_iter()
                .collect(),
        }
    }

    /// Waits (bounded) until the router's next hops for the VIP are `n`;
    /// returns them and when they were seen.
    fn wait_nexthops(&self, n: usize, wait: Duration) -> (Vec<String>, Instant) {
        let t0 = Instant::now();
        loop {
            let hops = self.nexthops();
            if hops.len() == n {
                return (hops, Instant::now());
            }
            if t0.elapsed() > wait {
                let birds: Vec<String> = self
                    .birds
                    .iter()
                    .map(|(ns, b)| format!("== bird in {ns}:\n{}", b.show(ns)))
                    .collect();
                let route = text(&self.router.ip(&["route"]).stdout);
                panic!(
                    "the router has next hops {hops:?} for {VIP}, want {n}, after {wait:?}\nroutes:\n{route}\n{}",
                    birds.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn lb_json(&self, node: usize, what: &str) -> Value {
        let out = lb(&[
            what,
            "--json",
            "--netns",
            &self.nodes[node].name,
            "--pin-dir",
            self.pins[node].arg(),
        ]);
        assert!(out.status.success(), "lb {what} on n{}: {out:?}", node + 1);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// New flows of the VIP's service on each node.
    fn new_flows(&self) -> Vec<u64> {
        (0..NODES.len())
            .map(|i| {
                let st = self.lb_json(i, "stats");
                st["services"][0]["new_flows"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no new_flows in n{}'s stats: {st:#}", i + 1))
            })
            .collect()
    }

    /// Every node's Maglev table for the VIP, as backend addresses.
    fn maglev_tables(&self) -> Vec<Vec<String>> {
        use libbpf_rs::{MapCore, MapFlags, MapHandle};
        self.pins
            .iter()
            .map(|p| {
                let m = lb::maps::Maps::open(&lb::bpffs::PinDir::new(&p.path)).expect("maps");
                let size = m.settings().expect("settings").maglev_size;
                let list = lb::service::list(&m).expect("list");
                let s = &list[0];
                let addr: BTreeMap<u32, String> = s
                    .backends
                    .iter()
                    .map(|b| (b.id, b.addr.to_string()))
                    .collect();
                let inner = m
                    .maglev
                    .lookup(&s.id.to_ne_bytes(), MapFlags::ANY)
                    .expect("maglev lookup")
                    .expect("a table");
                let inner =
                    MapHandle::from_map_id(u32::from_ne_bytes(inner[..4].try_into().unwrap()))
                        .expect("inner table");
                (0..size)
                    .map(|i| {
                        let v = inner
                            .lookup(&i.to_ne_bytes(), MapFlags::ANY)
                            .unwrap()
                            .unwrap();
                        let id = u32::from_ne_bytes(v[..4].try_into().unwrap());
                        addr.get(&id)
                            .cloned()
                            .unwrap_or_else(|| format!("id {id}?"))
                    })
                    .collect()
            })
            .collect()
    }

    /// `n` curl requests from the client's varied sources: (source,
    /// backend, peer the backend saw) of each answer, and the failures.
    fn curls(&self, n: usize) -> (Vec<(String, String, String)>, usize) {
        let srcs = sources();
        let mut ok = Vec::new();
        let mut failed = 0;
        for i in 0..n {
            let src = &srcs[i % srcs.len()];
            let body = text(
                &Command::new("nsenter")
                    .args([
                        &format!("--net=/run/netns/{}", self.client.name),
                        "curl",
                        "-s",
                        "--max-time",
                        "3",
                        "--interface",
                        src,
                        &format!("http://{VIP}:{PORT}/"),
                    ])
                    .output()
                    .expect("curl")
                    .stdout,
            );
            match body.trim().split_once(' ') {
                Some((b, peer)) => ok.push((src.clone(), b.to_string(), peer.to_string())),
                None => failed += 1,
            }
        }
        (ok, failed)
    }

    /// No receiver dropped a segment for a bad checksum.
    fn assert_checksums(&self) {
        for ns in std::iter::once(&self.client).chain(&self.backends) {
            assert_eq!(
                svc::csum_errors(&ns.name),
                (0, 0),
                "checksum errors in {}",
                ns.name
            );
        }
    }
}

fn peer_ip(peer: &str) -> &str {
    peer.rsplit_once(':').map_or(peer, |(a, _)| a)
}

/// What every scale-out test starts with: the VIP learnt from 3 nodes, the
/// same Maglev table on each, 60 new connections spread over all 3.
fn converge_and_spread(c: &Cluster, mode: &str) {
    let (hops, _) = c.wait_nexthops(3, Duration::from_secs(30));
    eprintln!("router: {VIP} via {hops:?}");
    let mut want: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();
    let mut got = hops.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "one next hop per node");

    let tables = c.maglev_tables();
    assert!(tables[0].iter().any(|b| b.starts_with(BACKENDS[0].1)));
    assert!(tables[0].iter().any(|b| b.starts_with(BACKENDS[1].1)));
    for (i, t) in tables.iter().enumerate().skip(1) {
        assert!(
            t == &tables[0],
            "n{}'s Maglev table differs from n1's",
            i + 1
        );
    }

    let before = c.new_flows();
    let (ok, failed) = c.curls(60);
    let after = c.new_flows();
    let spread: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let mut by_backend = BTreeMap::new();
    for (_, b, _) in &ok {
        *by_backend.entry(b.clone()).or_insert(0) += 1;
    }
    eprintln!("{mode}: 60 new connections: new flows per node {spread:?}, answers per backend {by_backend:?}");
    assert_eq!(failed, 0, "every request answered");
    assert!(
        spread.iter().all(|&n| n > 0),
        "new connections on every node: {spread:?}"
    );
    assert_eq!(by_backend.len(), 2, "both backends serve: {by_backend:?}");
    for (src, b, peer) in &ok {
        match mode {
            "dsr" | "ipip" => {
                assert_eq!(peer_ip(peer), src, "backend {b} sees the client's address")
            }
            _ => assert!(
                (0..NODES.len()).any(|i| peer_ip(peer) == snat(i)),
                "backend {b} sees {peer}, not a node's SNAT address"
            ),
        }
    }
}

/// What held connections saw through a change of the cluster: the
/// holder's "held" and "done" reports, the node changed, and the new flows
/// per node while opening and through the change.
struct Loss {
    held: Vec<Value>,
    done: Value,
    stopped: usize,
    opened: Vec<u64>,
    moved: Vec<u64>,
}

/// Holds `n` connections and stops the `lb run` of the node at `position`
/// in the router's route.
fn lose_a_node(c: &mut Cluster, n: usize, position: usize) -> Loss {
    let hops = c.nexthops();
    let stopped = NODES.iter().position(|&a| a == hops[position]).unwrap();
    hold_through(c, n, stopped, |c| {
        let t0 = Instant::now();
        c.daemons[stopped].as_mut().unwrap().stop();
        let lo = text(&c.nodes[stopped].ip(&["addr", "show", "dev", "lo"]).stdout);
        assert!(
            !lo.contains(VIP),
            "the stopped node still holds the VIP:\n{lo}"
        );
        let (left, at) = c.wait_nexthops(2, Duration::from_secs(15));
        eprintln!(
            "stopped n{} ({}): the router has {left:?} after {:?} (stop to 2 next hops)",
            stopped + 1,
            NODES[stopped],
            at - t0
        );
        assert!(!left.contains(&NODES[stopped].to_string()), "{left:?}");
    })
}

/// Holds `n` connections, starts the stopped node `node`'s `lb run` again
/// (it announces the VIP once more) and returns what the holder saw, as
/// lose_a_node does (`stopped`: the node that joined).
fn join_a_node(c: &mut Cluster, node: usize, n: usize) -> Loss {
    hold_through(c, n, node, |c| {
        let t0 = Instant::now();
        let file = c.dir.0.join("lb.toml");
        let ns = c.nodes[node].name.clone();
        c.daemons[node] = Some(Daemon::start(&file, &ns, &c.pins[node], None));
        let (hops, at) = c.wait_nexthops(3, Duration::from_secs(30));
        eprintln!(
            "n{} joined ({}): the router has {hops:?} after {:?} (start to 3 next hops)",
            node + 1,
            NODES[node],
            at - t0
        );
    })
}

/// Holds `n` connections from the client while `change` changes the
/// cluster and the router converges, then opens new ones: the holder's
/// reports and the new flows per node (`node`: the one changed).
fn hold_through(c: &mut Cluster, n: usize, node: usize, change: impl FnOnce(&mut Cluster)) -> Loss {
    let cfg = json!({
        "vip": VIP, "port": PORT, "sources": sources(), "n": n,
        "interval": 0.1, "after": 4, "new": 30, "budget": 40,
    })
    .to_string();
    let f0 = c.new_flows();
    let mut holder = Proc::spawn("holder", &c.client.name, HOLDER, &[&cfg]);
    let ready = holder.event("ready", Duration::from_secs(30));
    let f1 = c.new_flows();
    let conns = ready["conns"].as_array().unwrap();
    assert!(
        conns.iter().all(|x| x["error"].is_null()),
        "every connection opened: {ready:#}"
    );
    std::thread::sleep(Duration::from_secs(1));
    holder.send("stopping");
    change(c);
    holder.send("converged");
    let held = holder.event("held", Duration::from_secs(30));
    let f2 = c.new_flows();
    holder.send("new");
    let done = holder.event("done", Duration::from_secs(30));
    Loss {
        held: held["conns"].as_array().unwrap().clone(),
        done,
        stopped: node,
        opened: f1.iter().zip(&f0).map(|(a, b)| a - b).collect(),
        moved: f2.iter().zip(&f1).map(|(a, b)| a - b).collect(),
    }
}

/// New connections after the loss: all answered, by both backends.
fn assert_new_after_loss(l: &Loss) {
    let errors = l.done["new_errors"].as_array().unwrap();
    let new = l.done["new"].as_array().unwrap();
    assert!(
        errors.is_empty(),
        "new connections after convergence failed: {errors:?}"
    );
    assert_eq!(new.len(), 30);
}

/// DSR: spread over the three nodes, answers bypass them, the backends
/// see the clients; a node stopped (the last next hop, so the router's
/// hash-threshold ECMP also moves flows between the two left) loses no
/// held connection, nor does it joining again.
#[test]
fn dsr_nodes_behind_ecmp_survive_a_node_loss() {
    if !common::root_or_skip("dsr_nodes_behind_ecmp_survive_a_node_loss") {
        return;
    }
    direct_nodes("dsr");
}

/// The same in IP-in-IP mode, the backends running `lb decap`.
#[test]
fn ipip_nodes_behind_ecmp_survive_a_node_loss() {
    if !common::root_or_skip("ipip_nodes_behind_ecmp_survive_a_node_loss") {
        return;
    }
    direct_nodes("ipip");
}

/// Direct modes (the backends answer the clients): see the tests above.
fn direct_nodes(mode: &str) {
    let mut c = Cluster::up(mode);
    converge_and_spread(&c, mode);

    let l = lose_a_node(&mut c, 30, 2);
    let failed: Vec<&Value> = l.held.iter().filter(|x| !x["error"].is_null()).collect();
    eprintln!(
        "{mode}: 30 held connections: new flows per node while opening {:?}, while stopping n{} {:?}; failed {}",
        l.opened,
        l.stopped + 1,
        l.moved,
        failed.len()
    );
    assert!(failed.is_empty(), "held connections failed: {failed:#?}");
    assert!(
        l.opened[l.stopped] > 0,
        "the stopped node held connections: {:?}",
        l.opened
    );
    // Each connection the router moved is a new flow where it lands:
    // at least the stopped node's.
    let moved: u64 = l.moved.iter().sum();
    assert!(moved >= l.opened[l.stopped], "{:?} {:?}", l.opened, l.moved);
    assert_eq!(
        l.moved[l.stopped], 0,
        "the stopped node still got new flows"
    );
    for x in &l.held {
        assert!(x["ok_after"].as_u64().unwrap() >= 10, "{x}");
        assert_eq!(
            peer_ip(x["peer"].as_str().unwrap()),
            peer_ip(x["local"].as_str().unwrap())
        );
    }
    assert_new_after_loss(&l);
    for i in 0..NODES.len() {
        let st = c.lb_json(i, "stats");
        for (cnt, want) in [
            ("to_client", 0),
            ("drop_no_neigh", 0),
            ("drop_no_backend", 0),
        ] {
            assert_eq!(
                st["counters"][cnt]["packets"].as_u64(),
                Some(want),
                "n{}: {cnt}",
                i + 1
            );
        }
    }
    c.assert_checksums();

    // The stopped node joins again: the router hashes flows over three
    // next hops once more, so some held connections move to it, and it
    // picks their backends from the same table: none fails.
    let j = join_a_node(&mut c, l.stopped, 30);
    let failed: Vec<&Value> = j.held.iter().filter(|x| !x["error"].is_null()).collect();
    eprintln!(
        "{mode}: 30 held connections: new flows per node while n{} joined {:?}; failed {}",
        j.stopped + 1,
        j.moved,
        failed.len()
    );
    assert!(failed.is_empty(), "held connections failed: {failed:#?}");
    assert!(
        j.moved[j.stopped] > 0,
        "no held connection moved to the node that joined: {:?}",
        j.moved
    );
    for x in &j.held {
        assert!(x["ok_after"].as_u64().unwrap() >= 10, "{x}");
    }
    assert_new_after_loss(&j);
    if mode == "ipip" {
        for (n, p) in c.backends.iter().zip(&c.decap_pins) {
            let out = lb(&[
                "decap",
                "--stats",
                "--json",
                "--netns",
                &n.name,
                "--pin-dir",
                p.arg(),
            ]);
            let d: Value = serde_json::from_slice(&out.stdout).unwrap();
            let k = |c: &str| d["counters"][c]["packets"].as_u64().unwrap_or(0);
            assert!(k("decapsulated") > 0, "{}: {d}", n.name);
            assert_eq!(k("pass_malformed"), 0, "{}: {d}", n.name);
        }
    }

    // A node cut off (its link down, its lb and BIRD running on): the
    // router drops it when the BGP hold time (3 s here) runs out, and new
    // connections go to the two nodes left.
    let first = c.nexthops()[0].clone();
    let cut = NODES.iter().position(|&a| a == first).unwrap();
    let t0 = Instant::now();
    c.br.ip(&["link", "set", "dev", &format!("pn{}", cut + 1), "down"]);
    let (left, at) = c.wait_nexthops(2, Duration::from_secs(15));
    eprintln!(
        "cut n{}'s link: the router has {left:?} after {:?} (BGP hold time 3 s)",
        cut + 1,
        at - t0
    );
    let (ok, failed) = c.curls(10);
    assert_eq!((ok.len(), failed), (10, 0), "after the cut: {ok:?}");
}

/// Full NAT, each node with its own SNAT address (`lb run --snat`): a
/// stopped node's connections fail (the nodes they move to have no state
/// for them and reset them), every other one goes on. The stopped node is
/// the middle next hop: Linux's hash-threshold ECMP then keeps every
/// other flow on its node (removing the first or last would move some
/// flows between the nodes left as well, and in full NAT those break too).
#[test]
fn nat_nodes_behind_ecmp_lose_only_the_lost_nodes_connections() {
    if !common::root_or_skip("nat_nodes_behind_ecmp_lose_only_the_lost_nodes_connections") {
        return;
    }
    let mut c = Cluster::up("nat");
    converge_and_spread(&c, "nat");
    // A reload reads the file again with the node's --snat: the same
    // settings, so it applies.
    let d = c.daemons[0].as_ref().unwrap();
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    let t0 = Instant::now();
    while d.log().matches("config applied").count() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10) && !d.log().contains("reload failed"),
            "n1 did not reload:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let l = lose_a_node(&mut c, 30, 1);
    let gone = snat(l.stopped);
    let (mut on_stopped, mut failed_there, mut failed_elsewhere) = (0, 0, Vec::new());
    for x in &l.held {
        let there = peer_ip(x["peer"].as_str().unwrap()) == gone;
        let failed = !x["error"].is_null();
        on_stopped += usize::from(there);
        failed_there += usize::from(there && failed);
        if failed && !there {
            failed_elsewhere.push(x);
        }
        if !there {
            assert!(x["ok_after"].as_u64().unwrap() >= 10, "{x}");
        }
    }
    eprintln!(
        "nat: 30 held connections, {on_stopped} through n{}: {failed_there} of them failed, {} of the others",
        l.stopped + 1,
        failed_elsewhere.len()
    );
    assert!(
        on_stopped > 0,
        "no held connection went through the stopped node"
    );
    assert_eq!(failed_there, on_stopped, "{:#?}", l.held);
    assert!(failed_elsewhere.is_empty(), "{failed_elsewhere:#?}");
    assert_new_after_loss(&l);
    for x in l.done["new"].as_array().unwrap() {
        assert_ne!(peer_ip(x["peer"].as_str().unwrap()), gone, "{x}");
    }
    c.assert_checksums();
}
