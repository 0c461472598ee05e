//! Shared test fixtures: unique names, namespaces, pin directories and the
//! talk's topology, each removed by a guard even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// True when the test may run: root. Without root, a local run skips (with a
/// message); under CI (CI=true) a missing root is a failure, never a skip.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test} needs root and CI must run it");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// A name unique to this process and call, short enough for interfaces.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a uniquely named namespace.
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a command inside the namespace (network only).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let net = format!("--net=/run/netns/{}", self.name);
        let mut a = vec![net.as_str(), cmd];
        a.extend_from_slice(args);
        run("nsenter", &a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A unique pin directory under /sys/fs/bpf, removed (with anything left
/// in it) on drop.
pub struct PinDir {
    /// The directory (not created).
    pub path: PathBuf,
}

impl PinDir {
    /// A fresh path; bpffs is mounted if needed.
    pub fn new(prefix: &str) -> Self {
        lb::bpffs::ensure_mounted(Path::new(lb::bpffs::DEFAULT_PIN_DIR)).expect("bpffs");
        Self {
            path: PathBuf::from(lb::bpffs::BPFFS_ROOT).join(unique(prefix)),
        }
    }

    /// The path as a string, for command lines.
    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The `lb` binary built for these tests.
pub fn lb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

/// Runs `lb args...` and returns its output, whatever the exit status.
pub fn lb(args: &[&str]) -> Output {
    Command::new(lb_bin())
        .args(args)
        .output()
        .expect("running lb")
}

/// Addresses of scripts/topo.
pub const LB_IP: &str = "10.200.0.2";
/// The client.
pub const CLIENT_IP: &str = "10.200.0.10";
/// Backend a.
pub const A_IP: &str = "10.200.0.11";
/// Backend b.
pub const B_IP: &str = "10.200.0.12";

/// The talk's topology (scripts/topo): namespaces `<prefix>-{c,lb,a,b,br}`,
/// HTTP servers on the backends; torn down on drop.
pub struct Topo {
    /// Namespace prefix.
    pub prefix: String,
}

impl Topo {
    /// Builds it; `mode` is "native" or "skb".
    pub fn up(mode: &str) -> Self {
        let prefix = unique("lbt");
        let topo = Self { prefix };
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topo");
        let out = Command::new(script)
            .args(["up", &topo.prefix, mode])
            .env("LB", lb_bin())
            .output()
            .expect("scripts/topo");
        assert!(
            out.status.success(),
            "topo up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        topo
    }

    /// Namespace name of host `h` (c, lb, a, b, br).
    pub fn ns(&self, h: &str) -> String {
        format!("{}-{h}", self.prefix)
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topo");
        let _ = Command::new(script).args(["down", &self.prefix]).status();
    }
}

/// `GET http://10.200.0.2/` from namespace `ns` (curl, 2 s): the body,
/// trimmed, or "" on failure.
pub fn http_get(ns: &str) -> String {
    curl(ns, &format!("http://{LB_IP}/"), "2")
}

/// GET `url` from namespace `ns` with curl, at most `max_time` seconds: the
/// body, trimmed, or "" on failure.
pub fn curl(ns: &str, url: &str, max_time: &str) -> String {
    let out = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "curl",
            "-s",
            "--max-time",
            max_time,
            url,
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stops our child `ip netns exec NS timeout .. CMD` (`ip` execs
/// `timeout`): SIGTERM, which `timeout` passes on to CMD (a SIGKILL would
/// leave CMD running without its timeout, holding its namespace), then
/// waits up to 5 s before a SIGKILL.
pub fn stop_child(child: &mut std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// An HTTP server answering "backend NAME client ADDR" on `bind`:`port`
/// (IPv6 if `bind` is "::") in `ns`, under `timeout`; killed by PID on drop.
pub struct Server(Child);

impl Server {
    pub fn start(ns: &str, name: &str, bind: &str, port: &str) -> Self {
        let family = if bind.contains(':') {
            "AF_INET6"
        } else {
            "AF_INET"
        };
        let script = format!(
            "import http.server, socket\n\
             class S(http.server.ThreadingHTTPServer):\n\
             \x20   address_family = socket.{family}\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       b = ('backend {name} client %s\\n' % self.client_address[0]).encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(b)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b)\n\
             \x20   def log_message(self, *a):\n\
             \x20       pass\n\
             S(('{bind}', {port}), H).serve_forever()\n"
        );
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "timeout", "60", "python3", "-c", &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a server");
        if !listening(ns, port) {
            stop_child(&mut child);
            panic!("no server on :{port} in {ns}");
        }
        Self(child)
    }
}

/// Whether something listens on TCP `port` in namespace `ns` within 10 s.
pub fn listening(ns: &str, port: &str) -> bool {
    let net = format!("--net=/run/netns/{ns}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let out = run(
            "nsenter",
            &[&net, "ss", "-Htln", &format!("sport = :{port}")],
        );
        if !out.stdout.is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `n` GETs of each URL from namespace `ns` (3 s each), and the check that
/// both backends a and b answered every one of them, each seeing the
/// client at the address given with its URL (Server's answers).
pub fn both_backends_answer(ns: &str, urls: &[(&str, &str)], n: usize) {
    for (url, client) in urls {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            *seen.entry(curl(ns, url, "3")).or_insert(0) += 1;
        }
        eprintln!("{url}: answers {seen:?}");
        assert_eq!(
            seen.keys().cloned().collect::<Vec<_>>(),
            [
                format!("backend a client {client}"),
                format!("backend b client {client}")
            ],
            "{url}: every request answered, by both backends, which see the client: {seen:?}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}

/// Counter `name` of `nstat -az` in namespace `ns` (0 if absent).
pub fn nstat(ns: &str, name: &str) -> u64 {
    let out = run("ip", &["netns", "exec", ns, "nstat", "-az", name]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or(0)
}
