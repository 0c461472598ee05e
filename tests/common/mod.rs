//! Shared test fixtures: unique names, namespaces, pin directories and the
//! talk's topology, each removed by a guard even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

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
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
