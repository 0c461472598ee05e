//! Helpers of tests/services.rs (included with `#[path]`; tests/common/mod.rs
//! does not declare it): scripts/topo with options, an lb instance with
//! services, servers and clients as Python processes inside the topology's
//! namespaces, and the receivers' checksum counters. Every guard cleans up on
//! drop, also when a test fails; every wait is bounded.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{self, PinDir};

/// The LB's client-side address: every service's VIP.
pub const VIP: &str = common::LB_IP;
/// The LB's backend-side address in the two-arm topology.
pub const LB1_IP: &str = "10.200.1.2";
/// Budget of a client run (seconds), inside the script: everything it does
/// ends by then. A healthy run needs a few seconds.
pub const BUDGET_S: u64 = 40;
/// How long the test waits for a line from a client: its budget and slack.
pub const CLIENT_WAIT: Duration = Duration::from_secs(BUDGET_S + 20);
/// How long a server may take to say it listens.
pub const SERVER_WAIT: Duration = Duration::from_secs(20);
/// Lifetime of a server (seconds): it exits by itself even if a test
/// process dies without killing it.
pub const SERVER_LIFE_S: u64 = 180;

/// Lossy UTF-8.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A scripts/topo topology with options (`--clients N`, `--two-arm`); torn
/// down on drop (its namespaces and HTTP servers).
pub struct Net {
    /// Namespace prefix.
    pub prefix: String,
    /// "native" or "skb".
    pub mode: String,
    /// Client namespaces: c, c2, c3, ...
    pub clients: usize,
    /// Clients and backends on separate bridges and LB interfaces.
    pub two_arm: bool,
}

impl Net {
    /// Builds it.
    pub fn up(mode: &str, clients: usize, two_arm: bool) -> Self {
        let net = Self {
            prefix: common::unique("svt"),
            mode: mode.to_string(),
            clients,
            two_arm,
        };
        let n = clients.to_string();
        // Hundreds of connections at once: python's default backlog of 5
        // would drop handshakes (see scripts/topo --http-backlog).
        let mut args = vec![
            "up",
            net.prefix.as_str(),
            mode,
            "--clients",
            n.as_str(),
            "--http-backlog",
            "1024",
        ];
        if two_arm {
            args.push("--two-arm");
        }
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topo"))
            .args(&args)
            .env("LB", common::lb_bin())
            .output()
            .expect("scripts/topo");
        assert!(
            out.status.success(),
            "topo {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        net
    }

    /// Namespace of host `h` (c, c2, lb, a, b, br).
    pub fn ns(&self, h: &str) -> String {
        format!("{}-{h}", self.prefix)
    }

    /// Host names of the clients: c, c2, c3, ...
    pub fn client_hosts(&self) -> Vec<String> {
        (1..=self.clients)
            .map(|i| if i == 1 { "c".into() } else { format!("c{i}") })
            .collect()
    }

    /// Address of client `i` (1-based): 10.200.0.10, .20, ...
    pub fn client_ip(i: usize) -> String {
        format!("10.200.0.{}", 10 * i)
    }

    /// Address of backend `h` ("a" or "b").
    pub fn backend_ip(&self, h: &str) -> &'static str {
        match (h, self.two_arm) {
            ("a", false) => common::A_IP,
            ("b", false) => common::B_IP,
            ("a", true) => "10.200.1.11",
            ("b", true) => "10.200.1.12",
            _ => panic!("no backend {h}"),
        }
    }

    /// The LB's source address towards the backends.
    pub fn nat_ip(&self) -> &'static str {
        if self.two_arm {
            LB1_IP
        } else {
            common::LB_IP
        }
    }

    /// The LB's interfaces: eth0, and eth1 in two-arm.
    pub fn lb_ifaces(&self) -> Vec<&'static str> {
        if self.two_arm {
            vec!["eth0", "eth1"]
        } else {
            vec!["eth0"]
        }
    }

    /// Every end host: clients, backends and the LB.
    pub fn hosts(&self) -> Vec<String> {
        let mut h = self.client_hosts();
        h.extend(["a", "b", "lb"].map(String::from));
        h
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topo"))
            .args(["down", &self.prefix])
            .status();
    }
}

/// An lb instance on the LB namespace of a topology: attached to all its
/// LB interfaces with one pin directory; detached, pins removed on drop.
pub struct Lb {
    /// The LB's namespace.
    pub ns: String,
    /// Interfaces attached.
    pub ifaces: Vec<String>,
    /// The instance's pins (removed after the detach).
    pub pins: PinDir,
}

impl Lb {
    /// `lb attach IFACE --mode MODE --max-flows 65536` on every LB interface.
    pub fn attach(net: &Net) -> Self {
        let mut lb = Self {
            ns: net.ns("lb"),
            ifaces: Vec::new(),
            pins: PinDir::new("svp"),
        };
        for iface in net.lb_ifaces() {
            let out = lb.run(&["attach", iface, "--mode", &net.mode, "--max-flows", "65536"]);
            let s = text(&out.stdout);
            assert!(
                s.contains(&format!("{} mode", net.mode)),
                "attach {iface}: {s}"
            );
            lb.ifaces.push(iface.to_string());
        }
        lb
    }

    /// `lb args... --netns NS --pin-dir DIR`, which must succeed.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut a = args.to_vec();
        a.extend(["--netns", &self.ns, "--pin-dir", self.pins.arg()]);
        let out = common::lb(&a);
        assert!(
            out.status.success(),
            "lb {a:?} failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    /// `lb args... --json`, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("lb {a:?}: not JSON ({e}): {}", text(&out.stdout)))
    }

    /// Adds service `vip` (VIP:PORT) with `backends` (IP:PORT, weight).
    pub fn service(&self, vip: &str, proto: &str, backends: &[(&str, u32)]) {
        self.run(&["service", "add", vip, "--proto", proto]);
        for (b, w) in backends {
            let w = w.to_string();
            self.run(&["backend", "add", vip, b, "--proto", proto, "--weight", &w]);
        }
    }

    /// `lb conntrack --json`: the connections.
    pub fn conntrack(&self) -> Vec<Value> {
        self.json(&["conntrack"])
            .as_array()
            .expect("conntrack --json is an array")
            .clone()
    }

    /// `lb stats --json`.
    pub fn stats(&self) -> Value {
        self.json(&["stats"])
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        for iface in &self.ifaces {
            let _ = common::lb(&[
                "detach",
                iface,
                "--netns",
                &self.ns,
                "--pin-dir",
                self.pins.arg(),
            ]);
        }
    }
}

/// Connections of `proto` to `vip` (VIP:PORT) in a conntrack listing.
pub fn flows<'a>(ct: &'a [Value], proto: &str, vip: &str) -> Vec<&'a Value> {
    ct.iter()
        .filter(|c| c["proto"] == proto && c["vip"] == vip)
        .collect()
}

/// The traffic of `service` ("VIP:PORT/proto") in `lb stats --json`.
pub fn service_stats<'a>(stats: &'a Value, service: &str) -> &'a Value {
    stats["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| {
            format!(
                "{}:{}/{}",
                s["vip"].as_str().unwrap_or(""),
                s["port"],
                s["proto"].as_str().unwrap_or("")
            ) == service
        })
        .unwrap_or_else(|| panic!("no service {service} in {stats:#}"))
}

/// New flows per backend address of `service` in `lb stats --json`.
pub fn new_flows(stats: &Value, service: &str) -> Vec<(String, u64)> {
    service_stats(stats, service)["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().expect("addr").to_string(),
                b["new_flows"].as_u64().expect("new_flows"),
            )
        })
        .collect()
}

/// Packets of verdict counter `name` in `lb stats --json`.
pub fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {stats:#}"))
}

/// A Python script running in a namespace: its stdout as lines, its stderr
/// kept for messages; killed (by its own PID) on drop.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// `ip netns exec NS python3 -c SCRIPT ARGS...` (`ip netns exec` execs,
    /// so the child's PID is Python's).
    pub fn spawn(name: &str, ns: &str, script: &str, args: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let (tx, lines) = channel();
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let keep = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                keep.lock().unwrap().push_str(&text(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        Self {
            name: name.to_string(),
            child,
            stdin,
            lines,
            stderr,
        }
    }

    /// The next line of output, waiting up to `wait`; panics (with what
    /// the process wrote on stderr) on timeout or exit.
    pub fn line(&mut self, wait: Duration) -> String {
        match self.lines.recv_timeout(wait) {
            Ok(l) => l,
            Err(e) => {
                let why = match e {
                    RecvTimeoutError::Timeout => format!("no output for {wait:?}"),
                    RecvTimeoutError::Disconnected => {
                        // Give the stderr reader a moment to collect the end.
                        std::thread::sleep(Duration::from_millis(200));
                        format!("exited ({:?})", self.child.try_wait())
                    }
                };
                panic!(
                    "{}: {why}; stderr:\n{}",
                    self.name,
                    self.stderr.lock().unwrap()
                )
            }
        }
    }

    /// The next line, parsed as JSON; its "event" must be `event`.
    pub fn event(&mut self, event: &str, wait: Duration) -> Value {
        let l = self.line(wait);
        let v: Value = serde_json::from_str(&l)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", self.name));
        assert_eq!(v["event"], event, "{}: {v:#}", self.name);
        v
    }

    /// Writes a line to its stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: writing {line:?}: {e}", self.name));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// UDP echo server: answers every datagram with `NAME|payload`. Args: NAME
/// ADDR PORT LIFETIME_S. Prints "ready" once bound.
pub const UDP_ECHO: &str = r#"
import socket, sys, time
name, addr, port, life = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + life
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((addr, port))
print("ready", flush=True)
while time.monotonic() < end:
    s.settimeout(max(0.05, end - time.monotonic()))
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        break
    s.sendto(name.encode() + b"|" + data, peer)
"#;

/// TCP line echo server: answers every line with `NAME|line`, a thread per
/// connection, connections kept as long as the client likes. Args: NAME ADDR
/// PORT LIFETIME_S. Prints "ready" once listening.
pub const TCP_ECHO: &str = r#"
import socketserver, sys, threading
name, addr, port, life = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.request.settimeout(life)
        for line in self.rfile:
            self.wfile.write(name.encode() + b"|" + line)
            self.wfile.flush()
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
srv = Server((addr, port), Handler)
threading.Timer(life, srv.shutdown).start()
print("ready", flush=True)
srv.serve_forever(0.2)
"#;

/// Starts `script` (UDP_ECHO or TCP_ECHO) on `port` in both backends and
/// waits until both listen.
pub fn servers(net: &Net, script: &str, port: u16) -> Vec<Proc> {
    let life = SERVER_LIFE_S.to_string();
    let port = port.to_string();
    ["a", "b"]
        .iter()
        .map(|h| {
            let name = format!("backend {h}");
            let mut p = Proc::spawn(
                &format!("{name} server on port {port}"),
                &net.ns(h),
                script,
                &[&name, net.backend_ip(h), &port, &life],
            );
            assert_eq!(p.line(SERVER_WAIT), "ready", "{}", p.name);
            p
        })
        .collect()
}

/// The concurrent client. One JSON argument: host, budget (s), name, and
/// tcp_port/tcp_n (HTTP), udp_port/udp_n (UDP echo), bind_port (source port
/// of every socket, SO_REUSEADDR), hold. It
///  1. opens tcp_n TCP connections at once (a thread each);
///  2. with those open, makes udp_n UDP exchanges at once (a socket and a
///     thread each, every socket open until all are done, so each exchange
///     is a flow of its own; a datagram unanswered for 1 s is sent again, up
///     to 5 times, counted in udp_retries);
///  3. prints {"event": "connected", "tcp_ok": ..., "local_ports": [...]};
///  4. with hold, waits for a line on stdin (or EOF, or the budget);
///  5. sends GET / on every connection at once and reads each answer to EOF;
///  6. prints {"event": "done", "tcp": {backend: answers}, "udp": {backend:
///     answers}, "errors": [first 20], "n_errors": ...}.
pub const CLIENT: &str = r#"
import json, select, socket, sys, threading, time
cfg = json.loads(sys.argv[1])
host = cfg["host"]
t0 = time.monotonic()
deadline = t0 + cfg["budget"]
lock = threading.Lock()
errors = []
def left():
    return max(0.05, deadline - time.monotonic())
def err(what, e):
    with lock:
        errors.append("%s: %s: %s" % (what, type(e).__name__, e))
def run_all(fn, n):
    ts = [threading.Thread(target=fn, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(left())
def bind(s):
    if cfg.get("bind_port"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", cfg["bind_port"]))
tcp_n, udp_n = cfg.get("tcp_n", 0), cfg.get("udp_n", 0)
socks = [None] * tcp_n
def connect(i):
    s = socket.socket()
    try:
        bind(s)
        s.settimeout(left())
        s.connect((host, cfg["tcp_port"]))
        socks[i] = s
    except Exception as e:
        s.close()
        err("tcp connect %d" % i, e)
run_all(connect, tcp_n)
t_connect = time.monotonic() - t0
udp = {}
udp_retries = [0]
udp_socks = []
def udp_one(i):
    # Kept open until every exchange is done: no two exchanges of a client
    # share a source port, so each is a flow of its own.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with lock:
        udp_socks.append(s)
    try:
        bind(s)
        payload = ("ping %d from %s" % (i, cfg["name"])).encode()
        for _ in range(5):
            s.settimeout(min(1.0, left()))
            s.sendto(payload, (host, cfg["udp_port"]))
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                with lock:
                    udp_retries[0] += 1
                if time.monotonic() >= deadline:
                    raise
                continue
            name, _, echoed = data.partition(b"|")
            if echoed != payload:
                raise ValueError("echo mismatch: %r" % data)
            name = name.decode(errors="replace")
            with lock:
                udp[name] = udp.get(name, 0) + 1
            return
        raise TimeoutError("no answer to 5 datagrams")
    except Exception as e:
        err("udp %d" % i, e)
run_all(udp_one, udp_n)
for s in udp_socks:
    s.close()
ports = sorted(s.getsockname()[1] for s in socks if s)
print(json.dumps({"event": "connected", "tcp_ok": len(ports), "local_ports": ports,
                  "errors": errors[:20]}), flush=True)
if cfg.get("hold"):
    r, _, _ = select.select([sys.stdin], [], [], left())
    if r:
        sys.stdin.readline()
tcp = {}
def request(i):
    s = socks[i]
    if s is None:
        return
    try:
        s.settimeout(left())
        s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if status.split(" ")[1:2] != ["200"]:
            raise ValueError("status %r" % status)
        name = body.decode(errors="replace").strip()
        with lock:
            tcp[name] = tcp.get(name, 0) + 1
    except Exception as e:
        err("tcp request %d from %s:%d" % ((i,) + s.getsockname()), e)
    finally:
        s.close()
run_all(request, tcp_n)
print(json.dumps({"event": "done", "tcp": tcp, "udp": udp, "udp_retries": udp_retries[0],
                  "errors": errors[:20], "n_errors": len(errors),
                  "t_connect": round(t_connect, 3),
                  "t_total": round(time.monotonic() - t0, 3)}), flush=True)
"#;

/// A CLIENT run's configuration.
pub struct ClientCfg {
    /// TCP (HTTP) connections, to VIP:80.
    pub tcp_n: usize,
    /// UDP exchanges, to VIP:5353.
    pub udp_n: usize,
    /// Source port of every socket (0: any).
    pub bind_port: u16,
    /// Wait for a line on stdin between connecting and requesting.
    pub hold: bool,
}

/// Starts CLIENT in every client namespace of `net` with `cfg`, all at once.
pub fn clients(net: &Net, cfg: &ClientCfg) -> Vec<Proc> {
    net.client_hosts()
        .iter()
        .map(|h| {
            let arg = json!({
                "host": VIP,
                "budget": BUDGET_S,
                "name": h,
                "tcp_port": 80,
                "tcp_n": cfg.tcp_n,
                "udp_port": 5353,
                "udp_n": cfg.udp_n,
                "bind_port": cfg.bind_port,
                "hold": cfg.hold,
            })
            .to_string();
            Proc::spawn(&format!("client {h}"), &net.ns(h), CLIENT, &[&arg])
        })
        .collect()
}

/// Answers per backend name in a CLIENT summary's "tcp" or "udp" map.
pub fn answers(done: &Value, what: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = done[what]
        .as_object()
        .unwrap_or_else(|| panic!("no {what} in {done:#}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().expect("count")))
        .collect();
    v.sort();
    v
}

/// Sum of answers per backend over several CLIENT summaries: (a, b, total).
pub fn tally(dones: &[Value], what: &str) -> (u64, u64, u64) {
    let (mut a, mut b, mut total) = (0, 0, 0);
    for d in dones {
        for (name, n) in answers(d, what) {
            match name.as_str() {
                "backend a" => a += n,
                "backend b" => b += n,
                _ => panic!("unexpected answer {name:?} in {d:#}"),
            }
            total += n;
        }
    }
    (a, b, total)
}

/// Waits for every client's "done" summary and asserts none had an error;
/// on errors, the message shows what the LB and the backends knew.
pub fn all_done(clients: &mut [Proc], net: &Net, lb: &Lb) -> Vec<Value> {
    let dones: Vec<Value> = clients
        .iter_mut()
        .map(|c| c.event("done", CLIENT_WAIT))
        .collect();
    for (c, d) in clients.iter().zip(&dones) {
        if d["n_errors"] != 0 {
            panic!("{}: {d:#}\n{}", c.name, diagnose(d, net, lb));
        }
    }
    dones
}

/// What the LB and the backends say about the connections a CLIENT summary
/// names in its errors ("... from IP:PORT: ..."): their conntrack entries,
/// the LB's verdict counters, the backends' listen queue counters.
pub fn diagnose(done: &Value, net: &Net, lb: &Lb) -> String {
    let ct = lb.conntrack();
    let mut out = String::new();
    for e in done["errors"].as_array().into_iter().flatten() {
        let e = e.as_str().unwrap_or("");
        let Some(addr) = e
            .split(" from ")
            .nth(1)
            .map(|r| r.split(':').take(2).collect::<Vec<_>>().join(":"))
        else {
            continue;
        };
        let fl: Vec<&Value> = ct.iter().filter(|c| c["client"] == addr.as_str()).collect();
        out.push_str(&format!(
            "{e}\n  conntrack: {}\n",
            Value::from(fl.into_iter().cloned().collect::<Vec<_>>())
        ));
    }
    out.push_str(&format!("LB counters: {}\n", lb.stats()["counters"]));
    for h in ["a", "b"] {
        let o = common::run(
            "ip",
            &[
                "netns",
                "exec",
                &net.ns(h),
                "nstat",
                "-azs",
                "TcpExtListen*",
                "TcpExtSyncookies*",
                "TcpExtTCPReqQFullDrop",
                "TcpRetransSegs",
                "TcpOutRsts",
                "TcpExtTCPTimeouts",
            ],
        );
        out.push_str(&format!(
            "backend {h}: {}\n",
            text(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    out
}

/// The long-lived echo client. One JSON argument: host, port, n, interval,
/// after, new, budget. It opens n connections, each sending a numbered line
/// every `interval` s and checking the echo (io timeout 2 s; a connection
/// stops at its first failure); prints {"event": "ready", "backends": [...]}
/// once each has made 3 exchanges; reads "deleting" and "deleted" on stdin
/// (the test runs `lb backend del` in between), keeps going for `after` s,
/// stops, then makes `new` exchanges each on a new connection, and prints
/// {"event": "done", "conns": [{backend, ok_before, ok_during, ok_after,
/// error, failed_after_s}], "new": {backend: n}, "new_errors": [...]}:
/// exchanges finished before "deleting", overlapping the delete, begun
/// after "deleted"; failure time from "deleted".
pub const ECHO_CLIENT: &str = r#"
import json, select, socket, sys, threading, time
cfg = json.loads(sys.argv[1])
host, port, n, interval = cfg["host"], cfg["port"], cfg["n"], cfg["interval"]
deadline = time.monotonic() + cfg["budget"]
def left():
    return max(0.05, deadline - time.monotonic())
stop = threading.Event()
conns = [{"backend": None, "ok": [], "error": None, "failed_at": None} for _ in range(n)]
def exchange(s, f, seq):
    line = b"%d\n" % seq
    s.sendall(line)
    r = f.readline()
    if not r:
        raise ConnectionError("closed by the peer")
    name, _, echoed = r.partition(b"|")
    if echoed != line:
        raise ValueError("echo mismatch: %r" % r)
    return name.decode(errors="replace")
def keep(i):
    c = conns[i]
    try:
        s = socket.create_connection((host, port), timeout=min(5, left()))
    except Exception as e:
        c["error"], c["failed_at"] = "connect: %s: %s" % (type(e).__name__, e), time.monotonic()
        return
    s.settimeout(2.0)
    f = s.makefile("rb")
    seq = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            name = exchange(s, f, seq)
            if c["backend"] is None:
                c["backend"] = name
            elif name != c["backend"]:
                raise ValueError("answered by %s, then by %s" % (c["backend"], name))
            c["ok"].append((t, time.monotonic()))
            seq += 1
            stop.wait(interval)
    except Exception as e:
        c["error"], c["failed_at"] = "%s: %s" % (type(e).__name__, e), time.monotonic()
    finally:
        s.close()
threads = [threading.Thread(target=keep, args=(i,), daemon=True) for i in range(n)]
for t in threads:
    t.start()
while time.monotonic() < deadline and not all(c["error"] or len(c["ok"]) >= 3 for c in conns):
    time.sleep(0.05)
print(json.dumps({"event": "ready", "backends": [c["backend"] for c in conns],
                  "errors": [c["error"] for c in conns if c["error"]]}), flush=True)
marks = {}
for mark in ("deleting", "deleted"):
    r, _, _ = select.select([sys.stdin], [], [], left())
    got = sys.stdin.readline().strip() if r else ""
    marks[mark] = time.monotonic()
    if got != mark:
        print(json.dumps({"event": "error", "why": "expected %r, got %r" % (mark, got)}), flush=True)
        sys.exit(1)
time.sleep(min(cfg["after"], left()))
stop.set()
for t in threads:
    t.join(left())
new, new_errors = {}, []
for i in range(cfg["new"]):
    try:
        with socket.create_connection((host, port), timeout=min(5, left())) as s:
            s.settimeout(min(5, left()))
            name = exchange(s, s.makefile("rb"), i)
            new[name] = new.get(name, 0) + 1
    except Exception as e:
        new_errors.append("%s: %s" % (type(e).__name__, e))
t0, t1 = marks["deleting"], marks["deleted"]
print(json.dumps({"event": "done", "new": new, "new_errors": new_errors, "conns": [{
    "backend": c["backend"],
    "ok_before": sum(1 for s, e in c["ok"] if e < t0),
    "ok_during": sum(1 for s, e in c["ok"] if e >= t0 and s < t1),
    "ok_after": sum(1 for s, e in c["ok"] if s >= t1),
    "error": c["error"],
    "failed_after_s": None if c["failed_at"] is None else round(c["failed_at"] - t1, 3),
} for c in conns]}), flush=True)
"#;

/// TCP and UDP segments dropped for a bad checksum by the receivers of
/// namespace `ns` (`nstat -azs`: absolute, zeros shown, no history).
pub fn csum_errors(ns: &str) -> (u64, u64) {
    let out = common::run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "nstat",
            "-azs",
            "TcpInCsumErrors",
            "UdpInCsumErrors",
        ],
    );
    let s = text(&out.stdout);
    let get = |name: &str| {
        s.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(name)).then(|| w.next()?.parse::<u64>().ok())?
            })
            .unwrap_or_else(|| panic!("no {name} in nstat output of {ns}:\n{s}"))
    };
    (get("TcpInCsumErrors"), get("UdpInCsumErrors"))
}

/// Asserts that no client, backend or the LB dropped a TCP segment or UDP
/// datagram for a bad checksum, in either mode. (skb mode once lost 1 in
/// 65536 packets here, when a complete checksum equal to the pseudo-header
/// sum was taken for a partial one; the datapath now sums the segment in
/// that case.)
pub fn check_checksums(net: &Net) {
    let errors: Vec<(String, (u64, u64))> = net
        .hosts()
        .iter()
        .map(|h| (net.ns(h), csum_errors(&net.ns(h))))
        .filter(|(_, e)| *e != (0, 0))
        .collect();
    assert!(
        errors.is_empty(),
        "checksum errors in {} mode, (TcpInCsumErrors, UdpInCsumErrors) by namespace: {errors:?}",
        net.mode
    );
}
