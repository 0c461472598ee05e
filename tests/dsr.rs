//! Direct server return end to end, in the talk's topology (native mode):
//! the VIP 10.200.0.100 is on the LB's `lo` (the LB answers ARP for it)
//! and on each backend's `lo` with `arp_ignore=1`/`arp_announce=2` (they
//! do not); a DSR service VIP:8080 -> a, b. Every request is answered by a
//! backend, both backends serve, the answers never cross the LB (its
//! to_client counter stays 0) and no receiver sees a bad checksum. The
//! same over IPv6: VIP fd00:200::100 on the backends' `lo` (a host answers
//! neighbour solicitations only for the interface's own addresses, so they
//! stay silent with no sysctl) and on the LB's eth0, service [VIP]:8081.

mod common;

use common::{lb, nstat, root_or_skip, run, PinDir, Server, Topo, A_IP, B_IP, CLIENT_IP};
use serde_json::Value;

const VIP: &str = "10.200.0.100";
const PORT: &str = "8080";
const VIP6: &str = "fd00:200::100";
const PORT6: &str = "8081";

#[test]
fn dsr_answers_bypass_the_lb() {
    if !root_or_skip("dsr_answers_bypass_the_lb") {
        return;
    }
    let t = Topo::up("native");
    let lbns = t.ns("lb");
    run(
        "ip",
        &[
            "-n",
            &lbns,
            "addr",
            "add",
            &format!("{VIP}/32"),
            "dev",
            "lo",
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &lbns,
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let mut servers = Vec::new();
    for h in ["a", "b"] {
        let ns = t.ns(h);
        for a in [format!("{VIP}/32"), format!("{VIP6}/128")] {
            run("ip", &["-n", &ns, "addr", "add", &a, "dev", "lo"]);
        }
        for kv in [
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ] {
            run("ip", &["netns", "exec", &ns, "sysctl", "-qw", kv]);
        }
        servers.push(Server::start(&ns, h, "0.0.0.0", PORT));
        servers.push(Server::start(&ns, h, "::", PORT6));
    }
    let pins = PinDir::new("lbds");
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
    ok(&["attach", "eth0", "--netns", &lbns, "--pin-dir", p]);
    let svc = format!("{VIP}:{PORT}");
    ok(&[
        "service",
        "add",
        &svc,
        "--mode",
        "dsr",
        "--netns",
        &lbns,
        "--pin-dir",
        p,
    ]);
    for b in [A_IP, B_IP] {
        ok(&[
            "backend",
            "add",
            &svc,
            &format!("{b}:{PORT}"),
            "--netns",
            &lbns,
            "--pin-dir",
            p,
        ]);
    }
    let svc6 = format!("[{VIP6}]:{PORT6}");
    ok(&[
        "service",
        "add",
        &svc6,
        "--mode",
        "dsr",
        "--netns",
        &lbns,
        "--pin-dir",
        p,
    ]);
    for b in ["fd00:200::11", "fd00:200::12"] {
        ok(&[
            "backend",
            "add",
            &svc6,
            &format!("[{b}]:{PORT6}"),
            "--netns",
            &lbns,
            "--pin-dir",
            p,
        ]);
    }
    // The port rule, from the command line: one line, nothing added.
    let out = lb(&[
        "backend",
        "add",
        &svc,
        "10.200.0.13:9090",
        "--netns",
        &lbns,
        "--pin-dir",
        p,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DSR") && err.lines().count() == 1, "{err}");
    let list: Value =
        serde_json::from_slice(&ok(&["list", "--json", "--netns", &lbns, "--pin-dir", p]).stdout)
            .unwrap();
    assert_eq!(list[0]["mode"], "dsr", "{list:#}");
    assert_eq!(list[0]["backends"].as_array().unwrap().len(), 2, "{list:#}");

    assert_eq!(list[1]["mode"], "dsr", "{list:#}");

    common::both_backends_answer(
        &t.ns("c"),
        &[
            (&format!("http://{svc}/"), CLIENT_IP),
            (&format!("http://{svc6}/"), "fd00:200::10"),
        ],
        40,
    );
    let st: Value =
        serde_json::from_slice(&ok(&["stats", "--json", "--netns", &lbns, "--pin-dir", p]).stdout)
            .unwrap();
    let packets = |c: &str| st["counters"][c]["packets"].as_u64().unwrap();
    eprintln!("to_backend {}", packets("to_backend"));
    assert!(packets("to_backend") >= 2 * 40 * 3, "{st:#}");
    assert_eq!(packets("to_client"), 0, "answers crossed the LB: {st:#}");
    for c in ["drop_no_neigh", "drop_no_backend"] {
        assert_eq!(packets(c), 0, "{c}: {st:#}");
    }
    for h in ["c", "a", "b"] {
        assert_eq!(nstat(&t.ns(h), "TcpInCsumErrors"), 0, "{h}");
        assert_eq!(nstat(&t.ns(h), "Tcp6InCsumErrors"), 0, "{h}");
    }
    ok(&["detach", "eth0", "--netns", &lbns, "--pin-dir", p]);
    drop(servers);
}
