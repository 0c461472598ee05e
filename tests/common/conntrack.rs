//! Helpers of tests/conntrack.rs (included with `#[path]`, next to
//! common/e2e.rs as `util` and common/services.rs as `svc`; tests/common/mod.rs
//! does not declare it): the talk's topology with several clients and nginx
//! on the backends, an lb instance made with the one-liner, wrk runs, nstat
//! counters, held keep-alive connections, a loop of new connections, and a
//! SYN flood through BPF_PROG_TEST_RUN of the attached program. Every guard
//! cleans up on drop, also when a test fails; every loop is bounded in time
//! and count; all traffic stays in the topology's namespaces.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use serde_json::Value;

use crate::common::{self, PinDir};
use crate::svc::text;

/// Namespace prefix of these tests' topologies (no other test uses it).
pub const PREFIX: &str = "lbk";

/// scripts/topo (native mode) with `clients` client namespaces, `<p>-c`
/// (10.200.0.10), `<p>-c2` (10.200.0.20), ...; its python HTTP servers are
/// stopped by `nginx_backends`. Torn down on drop.
pub struct KNet {
    /// Namespace prefix.
    pub prefix: String,
    /// Client namespaces.
    pub clients: usize,
}

impl KNet {
    /// Builds it.
    pub fn up(clients: usize) -> Self {
        let net = Self {
            prefix: common::unique(PREFIX),
            clients,
        };
        let n = clients.to_string();
        // --rps: flows stay in order on the veths, as with a NIC's RSS
        // (see scripts/topo), so a backend's PAWS rejections in TIME_WAIT
        // mean what they would on a real network.
        let args = [
            "up",
            net.prefix.as_str(),
            "native",
            "--clients",
            &n,
            "--rps",
        ];
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topo"))
            .args(args)
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

    /// Stops scripts/topo's python server on backend `h` (the PID it
    /// recorded, after checking it is that server) and waits until it is
    /// gone, so that another server can listen on port 80.
    fn stop_topo_server(&self, h: &str) {
        let pidfile = PathBuf::from(format!("/tmp/lb-topo-{}/{h}.pid", self.prefix));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
            .trim()
            .parse()
            .expect("a PID");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            text(&cmdline).contains("http.server"),
            "PID {pid} of {} is not topo's server: {:?}",
            pidfile.display(),
            text(&cmdline)
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        // Not our child (topo's shell started it): poll until it is gone.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            if stat.is_empty() || state == Some('Z') {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&pidfile);
        assert!(
            wait_listening(&self.ns(h), false),
            "topo's server on {h} still listens on port 80"
        );
    }

    /// Replaces both backends' servers by nginx answering "backend NAME"
    /// on IP:80 (HTTP/1.1, keep-alive for up to `keepalive_s` idle seconds;
    /// `Connection: close` requests are answered and closed by nginx first,
    /// so the backend holds the TIME_WAIT).
    pub fn nginx_backends(&self, keepalive_s: u32) -> Vec<Nginx> {
        [("a", common::A_IP), ("b", common::B_IP)]
            .iter()
            .map(|(h, ip)| {
                self.stop_topo_server(h);
                Nginx::start(&self.ns(h), h, ip, keepalive_s)
            })
            .collect()
    }
}

impl Drop for KNet {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topo"))
            .args(["down", &self.prefix])
            .status();
    }
}

/// Whether (`want` true) or not something listens on TCP port 80 in `ns`,
/// waiting up to 5 s for it to be so.
pub fn wait_listening(ns: &str, want: bool) -> bool {
    let net = format!("--net=/run/netns/{ns}");
    let start = Instant::now();
    loop {
        let out = common::run("nsenter", &[&net, "ss", "-Htln", "sport = :80"]);
        if out.stdout.is_empty() != want {
            return true;
        }
        if start.elapsed() > Duration::from_secs(5) {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

/// Seconds an nginx lives at most (`timeout` stops it), even if the test
/// process dies without dropping its guard.
pub const NGINX_LIFE_S: u64 = 180;

/// An nginx in a backend namespace (one worker), under `timeout`; stopped
/// (SIGTERM to our child `timeout`, which passes it on) and its directory
/// removed on drop.
pub struct Nginx {
    /// Its namespace.
    pub ns: String,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Starts it and waits until it listens.
    pub fn start(ns: &str, name: &str, ip: &str, keepalive_s: u32) -> Self {
        let dir = std::env::temp_dir().join(common::unique("lbk-nginx-"));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx directory");
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx directory");
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20   keepalive_timeout {keepalive_s}s;\n\
             \x20   client_body_temp_path {d}/tmp;\n\
             \x20   proxy_temp_path {d}/tmp;\n\
             \x20   fastcgi_temp_path {d}/tmp;\n\
             \x20   uwsgi_temp_path {d}/tmp;\n\
             \x20   scgi_temp_path {d}/tmp;\n\
             \x20   server {{\n\
             \x20       listen {ip}:80 backlog=4096;\n\
             \x20       location / {{ default_type text/plain; return 200 \"backend {name}\\n\"; }}\n\
             \x20   }}\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
        let log = std::fs::File::create(dir.join("logs/stderr")).expect("nginx log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "-k", "5"])
            .arg(NGINX_LIFE_S.to_string())
            .args(["nginx", "-p"])
            .arg(&dir)
            .args(["-c", "nginx.conf", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nginx");
        let n = Self {
            ns: ns.to_string(),
            dir,
            child,
        };
        if !wait_listening(ns, true) {
            let err = std::fs::read_to_string(n.dir.join("logs/stderr")).unwrap_or_default();
            let log = std::fs::read_to_string(n.dir.join("logs/error.log")).unwrap_or_default();
            panic!("nginx in {ns} does not listen:\n{err}\n{log}");
        }
        n
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(8) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An lb instance made with the talk's one-liner on the LB's eth0
/// (`lb attach eth0 --netns NS --pin-dir DIR --lb 10.200.0.2 --backend A
/// --backend B --port 80` and `extra`); detached on drop, its pins removed.
pub struct OneLiner {
    /// The LB's namespace.
    pub ns: String,
    /// The instance's pins.
    pub pins: PinDir,
}

impl OneLiner {
    /// Attaches it.
    pub fn attach(ns: &str, extra: &[&str]) -> Self {
        let lb = Self {
            ns: ns.to_string(),
            pins: PinDir::new("lbk"),
        };
        let mut a = vec![
            "attach",
            "eth0",
            "--netns",
            ns,
            "--pin-dir",
            lb.pins.arg(),
            "--lb",
            common::LB_IP,
            "--backend",
            common::A_IP,
            "--backend",
            common::B_IP,
            "--port",
            "80",
        ];
        a.extend_from_slice(extra);
        let out = common::lb(&a);
        assert!(
            out.status.success(),
            "lb {a:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        eprintln!("lb {}: {}", a.join(" "), text(&out.stdout).trim());
        lb
    }

    /// `lb CMD --json --netns NS --pin-dir DIR`, parsed.
    pub fn json(&self, cmd: &str) -> Value {
        let a = [
            cmd,
            "--json",
            "--netns",
            &self.ns,
            "--pin-dir",
            self.pins.arg(),
        ];
        let out = common::lb(&a);
        assert!(
            out.status.success(),
            "lb {a:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("lb {a:?}: not JSON ({e}): {}", text(&out.stdout)))
    }

    /// The id of the program on eth0 (`lb status --json`).
    pub fn prog_id(&self) -> u32 {
        let st = self.json("status");
        let i = st["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["iface"] == "eth0"))
            .unwrap_or_else(|| panic!("no eth0 in {st:#}"));
        i["prog_id"].as_u64().expect("prog_id") as u32
    }

    /// Prints `lb stats --json` and `lb status --json` (counters, settings,
    /// interfaces) for diagnosis; returns the stats.
    pub fn report(&self) -> Value {
        let stats = self.json("stats");
        let st = self.json("status");
        eprintln!("lb stats --json: {stats}");
        eprintln!(
            "lb status --json: interfaces {} settings {} counters {}",
            st["interfaces"], st["settings"], st["counters"]
        );
        stats
    }
}

impl Drop for OneLiner {
    fn drop(&mut self) {
        let _ = common::lb(&[
            "detach",
            "eth0",
            "--netns",
            &self.ns,
            "--pin-dir",
            self.pins.arg(),
        ]);
    }
}

/// Counters read in every namespace.
pub const NSTAT: &[&str] = &[
    "TcpActiveOpens",
    "TcpPassiveOpens",
    "TcpRetransSegs",
    "TcpOutRsts",
    "TcpInCsumErrors",
    "TcpExtTCPSynRetrans",
    "TcpExtPAWSTimewait",
    "TcpExtTW",
    "TcpExtTCPTimeouts",
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtTCPChallengeACK",
];

/// Absolute values of `names` in namespace `ns` since it was made (`nstat
/// -azs`: absolute, zeros shown, no history file).
pub fn nstat(ns: &str, names: &[&str]) -> BTreeMap<String, u64> {
    let mut a = vec!["netns", "exec", ns, "nstat", "-azs"];
    a.extend_from_slice(names);
    let out = common::run("ip", &a);
    let s = text(&out.stdout);
    names
        .iter()
        .map(|name| {
            let v = s
                .lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some(*name)).then(|| w.next()?.parse::<u64>().ok())?
                })
                .unwrap_or_else(|| panic!("no {name} in nstat output of {ns}:\n{s}"));
            (name.to_string(), v)
        })
        .collect()
}

/// TCP sockets in TIME_WAIT in namespace `ns`.
pub fn time_wait(ns: &str) -> usize {
    let net = format!("--net=/run/netns/{ns}");
    let out = common::run("nsenter", &[&net, "ss", "-Htan", "state", "time-wait"]);
    text(&out.stdout).lines().count()
}

/// wrk's script: counts responses that are not 2xx (per thread, summed in
/// `done`) and prints one JSON line with the summary's counts.
const WRK_LUA: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0; responses = 0 end
function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
function done(summary, latency, requests)
  local n, r = 0, 0
  for _, t in ipairs(threads) do n = n + t:get("non2xx"); r = r + t:get("responses") end
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"responses":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d,"duration_us":%d}\n',
    summary.requests, r, n, e.connect, e.read, e.write, e.timeout, e.status, summary.duration))
end
"#;

/// One wrk run's counts (see WRK_LUA) and its full output.
#[derive(Debug)]
pub struct Wrk {
    /// The JSON line of WRK_LUA's `done`.
    pub summary: Value,
    /// Everything wrk printed.
    pub output: String,
}

impl Wrk {
    /// A count of the summary.
    pub fn get(&self, k: &str) -> u64 {
        self.summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {}\n{}", self.summary, self.output))
    }
}

/// Runs `wrk -t THREADS -c CONNS -d SECSs --timeout 2s -H 'Connection:
/// close'` against http://HOST/ in namespace `ns` (under `timeout`, its
/// duration and 20 s). Panics if wrk fails or prints no summary.
pub fn wrk_close(ns: &str, host: &str, threads: u32, conns: u32, secs: u32) -> Wrk {
    let dir = std::env::temp_dir().join(common::unique("lbk-wrk-"));
    std::fs::create_dir_all(&dir).expect("wrk directory");
    let script = dir.join("count.lua");
    std::fs::write(&script, WRK_LUA).expect("wrk script");
    let out = Command::new("timeout")
        .args(["-k", "5", &(secs + 20).to_string()])
        .args(["ip", "netns", "exec", ns, "wrk"])
        .args(["-t", &threads.to_string(), "-c", &conns.to_string()])
        .args(["-d", &format!("{secs}s"), "--timeout", "2s"])
        .args(["-H", "Connection: close", "-s"])
        .arg(&script)
        .arg(format!("http://{host}/"))
        .output()
        .expect("running wrk");
    let _ = std::fs::remove_dir_all(&dir);
    let output = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "wrk in {ns} failed: {output}");
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix("WRK "))
        .unwrap_or_else(|| panic!("no summary from wrk in {ns}: {output}"));
    let summary = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    Wrk { summary, output }
}

/// The holding client. Args: HOST N BUDGET_S. Opens N HTTP/1.1 keep-alive
/// connections to HOST:80 at once (a thread each), sends GET / on each and
/// reads the answer (Content-Length), prints {"event": "connected", "ok",
/// "backends": {name: n}, "errors": [first 20], "n_errors"}; keeps them open
/// until a line on stdin (or EOF, or the budget); then sends one more GET on
/// every connection at once and prints {"event": "done", "ok", "errors",
/// "n_errors"}: "ok" counts answers on the same connection, from the same
/// backend. Every socket operation times out after at most 5 s, everything
/// by the budget.
pub const HOLD_CLIENT: &str = r#"
import json, select, socket, sys, threading, time
host, n, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + budget
lock = threading.Lock()
def left():
    return max(0.05, deadline - time.monotonic())
class Conn:
    def __init__(self):
        self.s, self.buf, self.name, self.port = None, b"", None, None
conns = [Conn() for _ in range(n)]
errors = []
def err(c, what, e):
    with lock:
        errors.append("%s from port %s: %s: %s" % (what, c.port, type(e).__name__, e))
def recv(c):
    d = c.s.recv(65536)
    if not d:
        raise ConnectionError("closed by the peer")
    c.buf += d
def get(c):
    c.s.settimeout(min(5.0, left()))
    c.s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    while b"\r\n\r\n" not in c.buf:
        recv(c)
    head, _, c.buf = c.buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].decode(errors="replace")
    length = None
    for l in lines[1:]:
        k, _, v = l.partition(b":")
        k, v = k.strip().lower(), v.strip().lower()
        if k == b"content-length":
            length = int(v)
        if k == b"connection" and v == b"close":
            raise ValueError("the server closes the connection")
    if status.split(" ")[1:2] != ["200"]:
        raise ValueError("status %r" % status)
    if length is None:
        raise ValueError("no Content-Length: %r" % head)
    while len(c.buf) < length:
        recv(c)
    body, c.buf = c.buf[:length], c.buf[length:]
    return body.decode(errors="replace").strip()
def run_all(fn):
    ts = [threading.Thread(target=fn, args=(c,), daemon=True) for c in conns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(left())
def first(c):
    try:
        c.s = socket.create_connection((host, 80), timeout=min(5.0, left()))
        c.port = c.s.getsockname()[1]
        c.name = get(c)
    except Exception as e:
        err(c, "first request", e)
        if c.s:
            c.s.close()
        c.s = None
run_all(first)
backends = {}
for c in conns:
    if c.s:
        backends[c.name] = backends.get(c.name, 0) + 1
print(json.dumps({"event": "connected", "ok": sum(backends.values()), "backends": backends,
                  "errors": errors[:20], "n_errors": len(errors)}), flush=True)
r, _, _ = select.select([sys.stdin], [], [], left())
if r:
    sys.stdin.readline()
errors.clear()
ok = [0]
def again(c):
    if not c.s:
        return
    try:
        name = get(c)
        if name != c.name:
            raise ValueError("answered by %s, then by %s" % (c.name, name))
        with lock:
            ok[0] += 1
    except Exception as e:
        err(c, "second request", e)
    finally:
        c.s.close()
run_all(again)
print(json.dumps({"event": "done", "ok": ok[0], "errors": errors[:20],
                  "n_errors": len(errors)}), flush=True)
"#;

/// The new-connection client. Args: HOST MAX BUDGET_S. Prints {"event":
/// "started"}, then makes requests one after the other, each on a new
/// connection (connect and every read within 2 s; GET / HTTP/1.0 read to
/// EOF, status 200), until a line on stdin (or EOF), MAX requests or the
/// budget; prints {"event": "done", "ok", "n_errors", "errors": [first 20],
/// "backends": {name: n}}.
pub const NEW_CONN_CLIENT: &str = r#"
import json, select, socket, sys, time
host, most, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + budget
print(json.dumps({"event": "started"}), flush=True)
ok, errors, n_errors, backends = 0, [], 0, {}
for i in range(most):
    if time.monotonic() > deadline or select.select([sys.stdin], [], [], 0)[0]:
        break
    try:
        with socket.create_connection((host, 80), timeout=2) as s:
            s.settimeout(2)
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
        backends[name] = backends.get(name, 0) + 1
        ok += 1
    except Exception as e:
        n_errors += 1
        if len(errors) < 20:
            errors.append("request %d: %s: %s" % (i, type(e).__name__, e))
print(json.dumps({"event": "done", "ok": ok, "n_errors": n_errors, "errors": errors,
                  "backends": backends}), flush=True)
"#;

/// A SYN flood run through BPF_PROG_TEST_RUN.
pub struct Flood {
    /// The LB's namespace: the flooding threads enter it (only it), so that
    /// the ingress ifindex exists for test_run.
    pub lb_ns: String,
    /// The program to run (attached to the LB's eth0).
    pub prog_id: u32,
    /// The LB's eth0: ingress of every frame.
    pub ifindex: u32,
    /// The LB's eth0 MAC: destination of every frame.
    pub dst_mac: [u8; 6],
    /// Destination of every SYN.
    pub vip: Ipv4Addr,
    /// Destination port of every SYN.
    pub port: u16,
    /// Frames in all, each a distinct (spoofed source, source port).
    pub frames: u64,
    /// One thread per CPU of the process's affinity, at most this many.
    pub max_threads: usize,
    /// Stop (with fewer frames run) after this long.
    pub budget: Duration,
}

/// What a flood did.
#[derive(Debug, Default)]
pub struct FloodResult {
    /// test_run calls that succeeded.
    pub runs: u64,
    /// test_run calls that failed, and the first error.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Verdicts: XDP_ABORTED, DROP, PASS, TX, REDIRECT, other.
    pub verdicts: [u64; 6],
    /// Threads used.
    pub threads: usize,
    /// Wall time of the flood.
    pub elapsed: Duration,
}

/// Sources of the spoofed SYNs: 10.200.128.0/17 times ports 1024..=65535.
const SPOOF_NET: u32 = u32::from_be_bytes([10, 200, 128, 0]);
const SPOOF_HOSTS: u64 = 1 << 15;
const SPOOF_PORTS: u64 = 65536 - 1024;
/// Odd, and prime to 3 and 7: a permutation of 0..SPOOF_HOSTS*SPOOF_PORTS
/// (2^25 * 63), so that frame i and frame j != i differ.
const SPOOF_STEP: u64 = 2_654_435_761;

/// Source address, source port and sequence number of frame `i`.
fn syn_fields(i: u64) -> (Ipv4Addr, u16, u32) {
    let x = (i.wrapping_mul(SPOOF_STEP)) % (SPOOF_HOSTS * SPOOF_PORTS);
    let src = Ipv4Addr::from(SPOOF_NET + (x / SPOOF_PORTS) as u32);
    let sport = 1024 + (x % SPOOF_PORTS) as u16;
    let seq = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
    (src, sport, seq)
}

/// Source MAC of the flood's frames.
const FLOOD_SMAC: [u8; 6] = [0x02, 0x5f, 0x10, 0x0d, 0x00, 0x01];

/// Frame `i` of a flood, built by etherparse: a SYN from a spoofed source
/// to `vip:port`.
fn syn_frame(f: &Flood, i: u64) -> Vec<u8> {
    let (src, sport, seq) = syn_fields(i);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(FLOOD_SMAC, f.dst_mac)
        .ipv4(src.octets(), f.vip.octets(), 64)
        .tcp(sport, f.port, seq, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("building a SYN");
    out
}

/// Offsets in a SYN frame (Ethernet, IPv4 without options, TCP without
/// options).
const IP: usize = 14;
const TCP: usize = IP + 20;

/// The ones' complement sum of `b` (even length) folded to 16 bits.
fn ones_sum(b: &[u8], mut sum: u32) -> u16 {
    for w in b.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Turns `frame` (a flood SYN) into frame `i`: source address, port and
/// sequence number, and both checksums. etherparse takes microseconds a
/// frame in a debug build; this, a fraction of one.
fn patch_syn(frame: &mut [u8], i: u64) {
    let (src, sport, seq) = syn_fields(i);
    frame[IP + 12..IP + 16].copy_from_slice(&src.octets());
    frame[TCP..TCP + 2].copy_from_slice(&sport.to_be_bytes());
    frame[TCP + 4..TCP + 8].copy_from_slice(&seq.to_be_bytes());
    frame[IP + 10..IP + 12].fill(0);
    let c = !ones_sum(&frame[IP..TCP], 0);
    frame[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
    frame[TCP + 16..TCP + 18].fill(0);
    let tcp_len = (frame.len() - TCP) as u32;
    let pseudo = ones_sum(&frame[IP + 12..IP + 20], 6 + tcp_len);
    let c = !ones_sum(&frame[TCP..], u32::from(pseudo));
    frame[TCP + 16..TCP + 18].copy_from_slice(&c.to_be_bytes());
}

/// Runs the flood: `frames` distinct SYNs through the attached program with
/// BPF_PROG_TEST_RUN (repeat 1, ingress `ifindex`), split over one thread
/// per CPU (each pinned to its CPU, so that every CPU's share of the
/// connection table sees the flood), each thread in the LB's namespace.
pub fn syn_flood(f: &Flood) -> FloodResult {
    // SAFETY: a plain syscall wrapper; the fd it returns is ours.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(f.prog_id) };
    assert!(
        fd >= 0,
        "bpf_prog_get_fd_by_id({}): {}",
        f.prog_id,
        std::io::Error::from_raw_os_error(-fd)
    );
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let prog = unsafe { OwnedFd::from_raw_fd(fd) };
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| cpus.is_set(c).unwrap_or(false))
        .collect();
    let n = allowed.len().clamp(1, f.max_threads.max(1));
    // The patched frames are the frames etherparse builds.
    let mut t = syn_frame(f, 0);
    assert_eq!(t.len(), TCP + 20, "a SYN without options");
    for i in [1, 2, 999_999, f.frames.saturating_sub(1)] {
        patch_syn(&mut t, i);
        assert_eq!(t, syn_frame(f, i), "patched SYN {i}");
    }
    let start = Instant::now();
    let deadline = start + f.budget;
    let raw = prog.as_raw_fd();
    let results: Vec<FloodResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|t| {
                let cpu = allowed[t % allowed.len()];
                let (lo, hi) = (
                    f.frames * t as u64 / n as u64,
                    f.frames * (t as u64 + 1) / n as u64,
                );
                s.spawn(move || flood_thread(f, raw, cpu, lo..hi, deadline))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("flood thread"))
            .collect()
    });
    let mut r = FloodResult {
        threads: n,
        elapsed: start.elapsed(),
        ..Default::default()
    };
    for x in results {
        r.runs += x.runs;
        r.errors += x.errors;
        r.first_error = r.first_error.or(x.first_error);
        for (a, b) in r.verdicts.iter_mut().zip(x.verdicts) {
            *a += b;
        }
    }
    drop(prog);
    r
}

fn flood_thread(
    f: &Flood,
    prog: i32,
    cpu: usize,
    frames: std::ops::Range<u64>,
    deadline: Instant,
) -> FloodResult {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinning");
    let _ns = lb::netns::NetnsGuard::enter(&f.lb_ns).expect("entering the LB's namespace");
    let mut r = FloodResult::default();
    let mut frame = syn_frame(f, 0);
    let mut out = vec![0u8; 256];
    for i in frames {
        if i % 4096 == 0 && Instant::now() > deadline {
            break;
        }
        patch_syn(&mut frame, i);
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
        //                 rx_queue_index, egress_ifindex }
        let md: [u32; 6] = [0, frame.len() as u32, 0, f.ifindex, 0, 0];
        let mut opts = libbpf_sys::bpf_test_run_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
            data_in: frame.as_ptr().cast(),
            data_size_in: frame.len() as u32,
            data_out: out.as_mut_ptr().cast(),
            data_size_out: out.len() as u32,
            ctx_in: md.as_ptr().cast(),
            ctx_size_in: std::mem::size_of_val(&md) as u32,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: every pointer in opts is valid for its size for the call.
        let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog, &mut opts) };
        if rc != 0 {
            r.errors += 1;
            if r.first_error.is_none() {
                r.first_error = Some(std::io::Error::from_raw_os_error(-rc).to_string());
            }
            continue;
        }
        r.runs += 1;
        r.verdicts[(opts.retval as usize).min(5)] += 1;
    }
    r
}

/// The MAC address of `iface` in namespace `ns`.
pub fn mac(ns: &str, iface: &str) -> [u8; 6] {
    let out = common::run("ip", &["-n", ns, "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link show");
    let s = v[0]["address"].as_str().expect("address");
    let b: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("hex"))
        .collect();
    b.try_into().expect("6 bytes")
}

/// The index of `iface` in namespace `ns`.
pub fn ifindex(ns: &str, iface: &str) -> u32 {
    let out = common::run("ip", &["-n", ns, "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link show");
    v[0]["ifindex"].as_u64().expect("ifindex") as u32
}
