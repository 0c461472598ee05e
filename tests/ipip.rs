//! IP-in-IP end to end, in the talk's topology, native and skb mode: the
//! VIP 10.200.0.100 is on the LB's `lo` and on each backend's `lo` (with
//! the ARP sysctls of DSR); an IPIP service VIP:8080 -> a, b; each backend
//! runs `lb decap eth0`. Every request is answered by a backend, both
//! backends serve, each sees the real client address (it answers with
//! it), the answers never cross the LB (to_client stays 0), the backends'
//! decap counters show the packets, and no receiver sees a bad checksum.
//! The same over IPv6 (IPv6 in IPv6): VIP fd00:200::100 on the backends'
//! `lo` and the LB's eth0, service [VIP]:8081 -> a, b.

mod common;

use common::{lb, nstat, root_or_skip, run, PinDir, Server, Topo, A_IP, B_IP, CLIENT_IP};
use serde_json::Value;

const VIP: &str = "10.200.0.100";
const PORT: &str = "8080";
const VIP6: &str = "fd00:200::100";
const PORT6: &str = "8081";

fn ipip_through(test: &str, mode: &str) {
    if !root_or_skip(test) {
        return;
    }
    let t = Topo::up(mode);
    let lbns = t.ns("lb");
    // The LB answers ARP for an address on its lo, but neighbour
    // solicitations only for addresses of the interface asked: VIP6 on eth0.
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
    let pins = PinDir::new("lbip");
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
    let mut servers = Vec::new();
    let mut decap_pins = Vec::new();
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
        let dp = PinDir::new("lbid");
        ok(&[
            "decap",
            "eth0",
            "--mode",
            mode,
            "--netns",
            &ns,
            "--pin-dir",
            dp.arg(),
        ]);
        decap_pins.push((ns.clone(), dp));
        servers.push(Server::start(&ns, h, "0.0.0.0", PORT));
        servers.push(Server::start(&ns, h, "::", PORT6));
    }
    ok(&[
        "attach",
        "eth0",
        "--mode",
        mode,
        "--netns",
        &lbns,
        "--pin-dir",
        p,
    ]);
    let svc = format!("{VIP}:{PORT}");
    let svc6 = format!("[{VIP6}]:{PORT6}");
    for (s, backends) in [
        (&svc, [format!("{A_IP}:{PORT}"), format!("{B_IP}:{PORT}")]),
        (
            &svc6,
            [
                format!("[fd00:200::11]:{PORT6}"),
                format!("[fd00:200::12]:{PORT6}"),
            ],
        ),
    ] {
        ok(&[
            "service",
            "add",
            s,
            "--mode",
            "ipip",
            "--netns",
            &lbns,
            "--pin-dir",
            p,
        ]);
        for b in &backends {
            ok(&["backend", "add", s, b, "--netns", &lbns, "--pin-dir", p]);
        }
    }
    let list: Value =
        serde_json::from_slice(&ok(&["list", "--json", "--netns", &lbns, "--pin-dir", p]).stdout)
            .unwrap();
    assert_eq!(list[0]["mode"], "ipip", "{list:#}");
    assert_eq!(list[1]["mode"], "ipip", "{list:#}");

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
    let packets = |c: &str| st["counters"][c]["packets"].as_u64().unwrap_or(0);
    eprintln!(
        "{mode}: to_backend {}, to_client {}",
        packets("to_backend"),
        packets("to_client")
    );
    assert!(packets("to_backend") >= 2 * 40 * 3, "{st:#}");
    assert_eq!(packets("to_client"), 0, "answers crossed the LB: {st:#}");
    for c in ["drop_too_big", "drop_no_backend", "pass_no_neigh"] {
        assert_eq!(packets(c), 0, "{c}: {st:#}");
    }
    for (ns, dp) in &decap_pins {
        let out = ok(&[
            "decap",
            "--stats",
            "--json",
            "--netns",
            ns,
            "--pin-dir",
            dp.arg(),
        ]);
        let d: Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("{ns}: decap {d}");
        let n = d["counters"]["decapsulated"]["packets"]
            .as_u64()
            .unwrap_or(0);
        assert!(n >= 2 * 3 * 15, "{ns} decapsulated {n}: {d}");
    }
    for h in ["c", "a", "b"] {
        assert_eq!(nstat(&t.ns(h), "TcpInCsumErrors"), 0, "{h}");
        assert_eq!(nstat(&t.ns(h), "Tcp6InCsumErrors"), 0, "{h}");
    }
    ok(&["detach", "eth0", "--netns", &lbns, "--pin-dir", p]);
    for (ns, dp) in &decap_pins {
        ok(&[
            "decap",
            "eth0",
            "--detach",
            "--netns",
            ns,
            "--pin-dir",
            dp.arg(),
        ]);
    }
    drop(servers);
}

#[test]
fn ipip_native() {
    ipip_through("ipip_native", "native");
}

#[test]
fn ipip_skb() {
    ipip_through("ipip_skb", "skb");
}
