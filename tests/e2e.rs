//! End to end: the talk's topology in namespaces (scripts/topo), `lb` attached
//! to the LB's eth0, real HTTP requests from the client through the LB to the
//! backends. Each test builds its own topology, so they run in parallel.

mod common;
#[path = "common/e2e.rs"]
mod util;

use common::{root_or_skip, PinDir, Topo, A_IP, B_IP, LB_IP};
use util::*;

/// Requests per test: each a new connection, so a new flow hash.
const REQUESTS: usize = 60;

/// Checks that the status says `eth0` runs our program in `mode`, loaded with
/// `backends`, and that the kernel agrees; returns (link id, prog id).
fn check_attached(ns: &str, pins: &PinDir, mode: &str, backends: &[&str]) -> (u64, u64) {
    let st = status(ns, pins);
    let i = only_iface(&st);
    assert_eq!(i["iface"], "eth0", "{st:#}");
    assert_eq!(i["mode"], mode, "{st:#}");
    let svc = &st["services"][0];
    assert_eq!(svc["vip"], LB_IP, "{st:#}");
    assert_eq!(svc["proto"], "tcp", "{st:#}");
    let addrs: Vec<String> = backends.iter().map(|b| format!("{b}:0")).collect();
    let got: Vec<&str> = svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["addr"].as_str().expect("addr"))
        .collect();
    assert_eq!(got, addrs, "{st:#}");
    let link_id = i["link_id"].as_u64().expect("link_id");
    let prog_id = i["prog_id"].as_u64().expect("prog_id");
    assert!(link_id > 0 && prog_id > 0, "{st:#}");
    assert_eq!(
        xdp_prog(ns, "eth0"),
        Some((prog_id, "lb_xdp".to_string())),
        "the kernel reports another program on eth0 than status ({st:#})"
    );
    (link_id, prog_id)
}

/// Checks that no receiver dropped a TCP segment for a bad checksum.
fn check_checksums(topo: &Topo) {
    for h in ["c", "a", "b", "lb"] {
        assert_eq!(
            tcp_csum_errors(&topo.ns(h)),
            0,
            "TCP checksum errors in {}",
            topo.ns(h)
        );
    }
}

/// Detaches and checks that nothing is left: no XDP on eth0 (ip link and
/// bpftool), no pins, the program freed, an empty status.
fn detach_and_check(ns: &str, pins: &PinDir, prog_id: u64) {
    let out = lb_ok(&detach_args(ns, pins.arg()));
    assert!(
        text(&out.stdout).contains("detached lb from eth0"),
        "{}",
        show(&out)
    );
    assert_no_xdp(ns, "eth0");
    assert_eq!(bpftool_xdp(ns), Vec::<serde_json::Value>::new());
    assert!(
        !pins.path.exists(),
        "pin directory {} still exists",
        pins.path.display()
    );
    assert!(wait_prog_gone(prog_id), "program {prog_id} still loaded");
    assert!(!bpftool_lists_lb_xdp(prog_id));
    let st = status(ns, pins);
    assert_eq!(st["interfaces"], serde_json::json!([]), "{st:#}");
    assert_eq!(st["counters"], serde_json::json!({}), "{st:#}");
    assert!(
        !pins.path.exists(),
        "status created {}",
        pins.path.display()
    );
}

/// Attach in `mode`, balance new connections over both backends with valid
/// checksums everywhere, count them, detach without leftovers.
fn balances(test: &str, mode: &str) {
    if !root_or_skip(test) {
        return;
    }
    let topo = Topo::up(mode);
    let pins = PinDir::new("lbe");
    let ns = topo.ns("lb");

    let out = lb_ok(&attach_args(
        &ns,
        pins.arg(),
        &[A_IP, B_IP],
        &["--mode", mode, "--port", "80"],
    ));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("attached to eth0") && stdout.contains(&format!("{mode} mode")),
        "{}",
        show(&out)
    );
    let (_, prog_id) = check_attached(&ns, &pins, mode, &[A_IP, B_IP]);
    assert_eq!(status(&ns, &pins)["services"][0]["port"], 80);

    let body = curl(&topo.ns("c"));
    assert!(
        body == "backend a" || body == "backend b",
        "curl got {body:?}"
    );
    let (a, b) = tally(&requests(&topo.ns("c"), REQUESTS));
    assert!(a > 0 && b > 0, "not balanced: a {a}, b {b}");
    check_checksums(&topo);

    let st = status(&ns, &pins);
    let n = REQUESTS as u64 + 1;
    // Every connection: at least SYN, ACK, request, FIN, ACK each way.
    for c in ["to_backend", "to_client"] {
        assert!(packets(&st, c) >= 3 * n, "{c} too low: {st:#}");
    }
    for c in ["pass_malformed", "pass_fragment"] {
        assert_eq!(packets(&st, c), 0, "{c}: {st:#}");
    }

    detach_and_check(&ns, &pins, prog_id);
}

#[test]
fn native_mode_balances_and_detaches_cleanly() {
    balances("native_mode_balances_and_detaches_cleanly", "native");
}

#[test]
fn skb_mode_balances_and_detaches_cleanly() {
    balances("skb_mode_balances_and_detaches_cleanly", "skb");
}

/// A second attach on the same interface swaps the program under the same
/// link (no moment without one), keeps the counters, and the new
/// configuration takes effect.
#[test]
fn reattach_replaces_the_program_atomically() {
    if !root_or_skip("reattach_replaces_the_program_atomically") {
        return;
    }
    let topo = Topo::up("native");
    let pins = PinDir::new("lbe");
    let ns = topo.ns("lb");

    lb_ok(&attach_args(
        &ns,
        pins.arg(),
        &[A_IP, B_IP],
        &["--mode", "native"],
    ));
    let (link1, prog1) = check_attached(&ns, &pins, "native", &[A_IP, B_IP]);
    let (a, b) = tally(&requests(&topo.ns("c"), 20));
    assert!(a > 0 && b > 0, "not balanced: a {a}, b {b}");
    let before = packets(&status(&ns, &pins), "to_backend");

    let out = lb_ok(&attach_args(
        &ns,
        pins.arg(),
        &[A_IP],
        &["--mode", "native"],
    ));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("replaced the lb program on eth0") && stdout.contains("native mode"),
        "{}",
        show(&out)
    );
    let (link2, prog2) = check_attached(&ns, &pins, "native", &[A_IP]);
    assert_eq!(link1, link2, "the link changed: not an in-place update");
    assert_ne!(prog1, prog2, "the program did not change");
    assert!(
        stdout.contains(&format!("program id {prog2}")),
        "{}",
        show(&out)
    );
    assert!(wait_prog_gone(prog1), "old program {prog1} still loaded");
    assert!(
        packets(&status(&ns, &pins), "to_backend") >= before,
        "counters were reset by the replace"
    );

    let (a, b) = tally(&requests(&topo.ns("c"), 30));
    assert_eq!((a, b), (30, 0), "backend b still answers after the replace");
    check_checksums(&topo);

    detach_and_check(&ns, &pins, prog2);
}

/// `lb attach` exits and the program stays attached through its pinned
/// link; it is visible host-wide to bpftool; the default mode (auto) picks
/// native on veth.
#[test]
fn program_outlives_the_cli() {
    if !root_or_skip("program_outlives_the_cli") {
        return;
    }
    let topo = Topo::up("native");
    let pins = PinDir::new("lbe");
    let ns = topo.ns("lb");

    let out = lb_ok(&attach_args(&ns, pins.arg(), &[A_IP, B_IP], &[]));
    assert!(text(&out.stdout).contains("native mode"), "{}", show(&out));
    // The CLI has exited (output() waited for it); before any traffic:
    let (_, prog_id) = check_attached(&ns, &pins, "native", &[A_IP, B_IP]);
    assert!(
        pins.path.join("eth0/link").exists()
            && pins.path.join("config").exists()
            && pins.path.join("stats").exists(),
        "pins missing under {}",
        pins.path.display()
    );
    assert!(
        bpftool_lists_lb_xdp(prog_id),
        "bpftool prog show name lb_xdp does not list {prog_id}"
    );

    let (a, b) = tally(&requests(&topo.ns("c"), 20));
    assert!(a > 0 && b > 0, "not balanced: a {a}, b {b}");
    // Not a service (a UDP datagram to port 9): passes to the LB's own
    // stack, counted.
    let before = packets(&status(&ns, &pins), "pass_not_ours");
    let udp = format!(
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{LB_IP}', 9))"
    );
    common::run(
        "ip",
        &["netns", "exec", &topo.ns("c"), "python3", "-c", &udp],
    );
    // Delivery is asynchronous (veth NAPI): give it up to 2 s.
    let start = std::time::Instant::now();
    let mut st = status(&ns, &pins);
    while packets(&st, "pass_not_ours") <= before && start.elapsed().as_secs() < 2 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        st = status(&ns, &pins);
    }
    assert!(packets(&st, "pass_not_ours") > before, "{st:#}");
    check_checksums(&topo);

    detach_and_check(&ns, &pins, prog_id);
}
