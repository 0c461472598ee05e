//! Helpers of tests/e2e.rs and tests/cli.rs (included by them with
//! `#[path]`; tests/common/mod.rs does not declare it): what is attached
//! where, the instance's status, requests through the LB, checksum counters
//! and the shape of error output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, Netns, PinDir};

/// Lossy UTF-8 of a command's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Both streams of `out`, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs `lb args...`.
pub fn lb_s(args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    common::lb(&a)
}

/// Runs `lb args...` and panics unless it succeeds.
pub fn lb_ok(args: &[String]) -> Output {
    let out = lb_s(args);
    assert!(out.status.success(), "lb {args:?} failed:\n{}", show(&out));
    out
}

/// Owned strings from string slices.
pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `lb attach eth0 --netns NS --pin-dir PINS --lb LB --client CLIENT
/// --backend B...` followed by `extra`.
pub fn attach_args(ns: &str, pins: &str, backends: &[&str], extra: &[&str]) -> Vec<String> {
    let mut a = strings(&[
        "attach",
        "eth0",
        "--netns",
        ns,
        "--pin-dir",
        pins,
        "--lb",
        common::LB_IP,
        "--client",
        common::CLIENT_IP,
    ]);
    for b in backends {
        a.push("--backend".into());
        a.push(b.to_string());
    }
    a.extend(strings(extra));
    a
}

/// `lb detach eth0 --netns NS --pin-dir PINS`.
pub fn detach_args(ns: &str, pins: &str) -> Vec<String> {
    strings(&["detach", "eth0", "--netns", ns, "--pin-dir", pins])
}

/// `lb status --json` of the instance, parsed.
pub fn status(ns: &str, pins: &PinDir) -> Value {
    let out = lb_ok(&strings(&[
        "status",
        "--json",
        "--netns",
        ns,
        "--pin-dir",
        pins.arg(),
    ]));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", show(&out)))
}

/// The only interface of a status.
pub fn only_iface(st: &Value) -> &Value {
    let ifaces = st["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 1, "expected one interface in {st:#}");
    &ifaces[0]
}

/// Packets of counter `name` in a status.
pub fn packets(st: &Value, name: &str) -> u64 {
    st["counters"][name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {st:#}"))
}

/// The XDP program on `iface` of namespace `ns` as (id, name), from
/// `ip -j link show`; `None` when nothing is attached.
pub fn xdp_prog(ns: &str, iface: &str) -> Option<(u64, String)> {
    let out = common::run("ip", &["-n", ns, "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link show");
    let xdp = v.get(0)?.get("xdp")?;
    let prog = if xdp.get("prog").is_some() {
        &xdp["prog"]
    } else {
        &xdp["attached"][0]["prog"]
    };
    Some((
        prog["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no program id in {xdp}")),
        prog["name"].as_str().unwrap_or("").to_string(),
    ))
}

/// The index of `iface` in namespace `ns`.
pub fn ifindex(ns: &str, iface: &str) -> u64 {
    let out = common::run("ip", &["-n", ns, "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link show");
    v[0]["ifindex"].as_u64().expect("ifindex")
}

/// The XDP attachments `bpftool net show` lists inside namespace `ns`.
pub fn bpftool_xdp(ns: &str) -> Vec<Value> {
    let net = format!("--net=/run/netns/{ns}");
    let out = common::run("nsenter", &[&net, "bpftool", "-j", "net", "show"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool -j net show");
    v[0]["xdp"].as_array().cloned().unwrap_or_default()
}

/// Whether a BPF program with this id exists (host-wide).
pub fn prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool")
        .status
        .success()
}

/// Waits (up to 5 s) for program `id` to be freed: the kernel releases
/// programs after an RCU grace period.
pub fn wait_prog_gone(id: u64) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if !prog_exists(id) {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    false
}

/// `bpftool prog show name lb_xdp` (host) lists program `id`. bpftool exits
/// 255 without a word when no program has the name; it also fails, with a
/// message, when a program goes away while it walks them (other tests load
/// and free programs all the time): retried then, up to 20 times.
pub fn bpftool_lists_lb_xdp(id: u64) -> bool {
    let mut last = None;
    for _ in 0..20 {
        let out = Command::new("bpftool")
            .args(["prog", "show", "name", "lb_xdp"])
            .output()
            .expect("bpftool");
        if !out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() {
            return false;
        }
        if out.status.success() {
            return text(&out.stdout).lines().any(|l| {
                l.starts_with(&format!("{id}: xdp")) && l.split_whitespace().any(|w| w == "lb_xdp")
            });
        }
        last = Some(out);
        sleep(Duration::from_millis(50));
    }
    panic!(
        "bpftool prog show name lb_xdp keeps failing:\n{}",
        show(&last.unwrap())
    );
}

/// The client program: opens `n` TCP connections to HOST:80 one after the
/// other, sends GET / on each and prints one line per connection, `OK <body>`
/// or `ERR <why>`. Every socket operation times out after 2 s and the whole
/// run after DEADLINE seconds.
const CLIENT: &str = r#"
import socket, sys, time
host, n, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
for i in range(n):
    if time.monotonic() > deadline:
        print("ERR deadline passed", flush=True)
        continue
    try:
        with socket.create_connection((host, 80), timeout=2) as s:
            s.settimeout(2)
            s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if status.split(" ")[1:2] != ["200"]:
            print("ERR status %r" % status, flush=True)
        else:
            print("OK " + body.decode(errors="replace").strip(), flush=True)
    except Exception as e:
        print("ERR %s: %s" % (type(e).__name__, e), flush=True)
"#;

/// Makes `n` requests, each on a new TCP connection, from namespace `ns` to
/// the LB's address; returns one line per request (see `CLIENT`).
pub fn requests(ns: &str, n: usize) -> Vec<String> {
    let deadline = 10 + n / 2;
    let out = Command::new("timeout")
        .args(["-k", "5", &(deadline + 10).to_string()])
        .args(["ip", "netns", "exec", ns, "python3", "-c", CLIENT])
        .args([common::LB_IP, &n.to_string(), &deadline.to_string()])
        .output()
        .expect("running the client");
    assert!(out.status.success(), "client failed:\n{}", show(&out));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), n, "client output:\n{}", show(&out));
    lines
}

/// Asserts every request succeeded; returns how many each backend answered
/// (a, b).
pub fn tally(lines: &[String]) -> (usize, usize) {
    let failed: Vec<&String> = lines.iter().filter(|l| !l.starts_with("OK ")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        lines.len()
    );
    let a = lines.iter().filter(|l| *l == "OK backend a").count();
    let b = lines.iter().filter(|l| *l == "OK backend b").count();
    assert_eq!(a + b, lines.len(), "unexpected answers: {lines:?}");
    (a, b)
}

/// One request with curl from namespace `ns` (`curl -s -m 2`); its body.
pub fn curl(ns: &str) -> String {
    let url = format!("http://{}/", common::LB_IP);
    let out = common::run("ip", &["netns", "exec", ns, "curl", "-s", "-m", "2", &url]);
    text(&out.stdout).trim().to_string()
}

/// TCP segments namespace `ns` dropped for a bad checksum since it was made
/// (`nstat -azs TcpInCsumErrors`: absolute, zeros shown, no history file).
pub fn tcp_csum_errors(ns: &str) -> u64 {
    let out = common::run(
        "ip",
        &["netns", "exec", ns, "nstat", "-azs", "TcpInCsumErrors"],
    );
    let s = text(&out.stdout);
    s.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("TcpInCsumErrors")).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no TcpInCsumErrors in nstat output:\n{s}"))
}

/// A network namespace with a veth pair eth0/eth1, both up, and the LB's
/// address on eth0: somewhere to attach that sends nothing anywhere else.
pub fn veth_ns(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    ns.ip(&[
        "link", "add", "name", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "dev", "eth0", "up"]);
    ns.ip(&["link", "set", "dev", "eth1", "up"]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", common::LB_IP),
        "dev",
        "eth0",
    ]);
    ns
}

/// Asserts `lb` failed with `code`, printed nothing on stdout and exactly one
/// line `lb: error: ...` on stderr containing every needle; returns the line.
pub fn assert_error(out: &Output, code: i32, needles: &[&str]) -> String {
    assert_eq!(out.status.code(), Some(code), "{}", show(out));
    assert!(out.stdout.is_empty(), "stdout not empty:\n{}", show(out));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line:\n{}", show(out));
    assert!(lines[0].starts_with("lb: error: "), "{}", show(out));
    for n in needles {
        assert!(lines[0].contains(n), "stderr does not name {n:?}:\n{err}");
    }
    lines[0].to_string()
}

/// Asserts a clap usage error: exit 2, nothing on stdout, one error on
/// stderr (its first paragraph, `error: ...` and maybe indented details)
/// naming every needle; after it clap prints only a usage line and a hint
/// to try --help. Returns the error paragraph.
pub fn assert_usage_error(out: &Output, needles: &[&str]) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", show(out));
    assert!(out.stdout.is_empty(), "stdout not empty:\n{}", show(out));
    let err = text(&out.stderr);
    let (first, rest) = err.split_once("\n\n").unwrap_or((err.as_str(), ""));
    assert!(first.starts_with("error: "), "{err}");
    assert_eq!(
        err.matches("error:").count(),
        1,
        "more than one error:\n{err}"
    );
    let other: Vec<&str> = rest
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with("Usage: ") && !l.contains("--help"))
        .collect();
    assert!(
        other.is_empty(),
        "unexpected stderr lines {other:?}:\n{err}"
    );
    for n in needles {
        assert!(first.contains(n), "the error does not name {n:?}:\n{err}");
    }
    first.to_string()
}

/// Asserts the instance left nothing in bpffs: its directory does not exist.
pub fn assert_no_pins(pins: &PinDir) {
    if pins.path.exists() {
        let entries: Vec<PathBuf> = walk(&pins.path);
        panic!(
            "{} exists after a failed command: {entries:?}",
            pins.path.display()
        );
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// Asserts nothing is attached to `iface` in namespace `ns`.
pub fn assert_no_xdp(ns: &str, iface: &str) {
    assert_eq!(xdp_prog(ns, iface), None, "XDP left on {iface} in {ns}");
}

/// A directory outside bpffs, removed with its contents on drop.
pub struct TempDir {
    /// The directory.
    pub path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/<unique>` (mode 0755).
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(common::unique(prefix));
        std::fs::create_dir(&path).expect("creating a temporary directory");
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
