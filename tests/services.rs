//! Services end to end: scripts/topo topologies (several clients, two arms)
//! with `lb attach` and `lb service`/`lb backend`, real TCP and UDP traffic
//! from Python clients in the client namespaces through the LB's full NAT to
//! servers in the backend namespaces. Each test builds its own topology and
//! lb instance, so they run in parallel; each ends by checking that no
//! receiver dropped a segment for a bad checksum.

mod common;
#[path = "common/services.rs"]
mod svc;

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;
use svc::*;

/// TCP (HTTP) connections and UDP exchanges per client in `many_clients`.
const PER_CLIENT: usize = 100;

/// Three clients, each with 100 TCP connections open at once to the HTTP
/// service VIP:80 and, while those are open, 100 UDP exchanges at once with
/// the echo service VIP:5353/udp; both services on both backends. Every
/// connection and exchange succeeds, both backends serve both services, the
/// connection table holds all 300 TCP connections at the same time (with a
/// NAT port per backend used once), and the LB's per-backend new-flow
/// counts are what the clients saw.
fn many_clients(test: &str, mode: &str) {
    if !common::root_or_skip(test) {
        return;
    }
    let net = Net::up(mode, 3, false);
    let _udp = servers(&net, UDP_ECHO, 7);
    let lb = Lb::attach(&net);
    let (a, b) = (net.backend_ip("a"), net.backend_ip("b"));
    let http = format!("{VIP}:80");
    let echo = format!("{VIP}:5353");
    lb.service(
        &http,
        "tcp",
        &[(&format!("{a}:80"), 1), (&format!("{b}:80"), 1)],
    );
    lb.service(
        &echo,
        "udp",
        &[(&format!("{a}:7"), 1), (&format!("{b}:7"), 1)],
    );

    let mut cs = clients(
        &net,
        &ClientCfg {
            tcp_n: PER_CLIENT,
            udp_n: PER_CLIENT,
            bind_port: 0,
            hold: true,
        },
    );
    for c in &mut cs {
        let v = c.event("connected", CLIENT_WAIT);
        assert_eq!(v["tcp_ok"], PER_CLIENT, "{}: {v:#}", c.name);
    }

    // Every client holds its connections open: all are tracked at once.
    let n = 3 * PER_CLIENT;
    let ct = lb.conntrack();
    let tcp = flows(&ct, "tcp", &http);
    let open: Vec<&&Value> = tcp.iter().filter(|c| c["state"] == "open").collect();
    assert_eq!(open.len(), n, "open TCP connections to {http}");
    let clients: HashSet<&str> = open.iter().map(|c| c["client"].as_str().unwrap()).collect();
    assert_eq!(clients.len(), n, "distinct clients");
    let nat: HashSet<(&str, &str)> = open
        .iter()
        .map(|c| (c["backend"].as_str().unwrap(), c["nat"].as_str().unwrap()))
        .collect();
    assert_eq!(
        nat.len(),
        n,
        "a NAT address and port used twice towards a backend"
    );
    assert!(
        open.iter().all(|c| c["nat"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", net.nat_ip()))),
        "NAT address is not the LB's"
    );
    assert_eq!(flows(&ct, "udp", &echo).len(), n, "UDP flows to {echo}");

    for c in &mut cs {
        c.send("go");
    }
    let dones = all_done(&mut cs, &net, &lb);
    let (ta, tb, tn) = tally(&dones, "tcp");
    let (ua, ub, un) = tally(&dones, "udp");
    assert_eq!((tn, un), (n as u64, n as u64), "answers: {dones:#?}");
    assert!(ta > 0 && tb > 0, "TCP not balanced: a {ta}, b {tb}");
    assert!(ua > 0 && ub > 0, "UDP not balanced: a {ua}, b {ub}");

    // The LB counted one new flow per connection, for the backend that
    // answered it.
    let st = lb.stats();
    assert_eq!(
        new_flows(&st, &format!("{http}/tcp")),
        vec![(format!("{a}:80"), ta), (format!("{b}:80"), tb)],
        "{st:#}"
    );
    assert_eq!(
        new_flows(&st, &format!("{echo}/udp")),
        vec![(format!("{a}:7"), ua), (format!("{b}:7"), ub)],
        "{st:#}"
    );
    for name in ["drop_no_backend", "drop_nat_full", "pass_no_route"] {
        assert_eq!(counter(&st, name), 0, "{name}: {st:#}");
    }
    check_checksums(&net);
}

#[test]
fn many_clients_tcp_and_udp_native() {
    many_clients("many_clients_tcp_and_udp_native", "native");
}

#[test]
fn many_clients_tcp_and_udp_skb() {
    many_clients("many_clients_tcp_and_udp_skb", "skb");
}

/// Three clients use the same source port, 40000, at the same moment, for
/// TCP (VIP:80) and UDP (VIP:5353). Both services have one backend, so that
/// all three flows of each go to the same backend: only distinct NAT ports
/// tell them apart there. Each client holds its TCP connection open while
/// the connection table shows three open flows with distinct NAT ports, then
/// sends its request and gets its answer.
#[test]
fn same_source_port_from_several_clients() {
    if !common::root_or_skip("same_source_port_from_several_clients") {
        return;
    }
    let net = Net::up("native", 3, false);
    let _udp = servers(&net, UDP_ECHO, 7);
    let lb = Lb::attach(&net);
    let a = net.backend_ip("a");
    let http = format!("{VIP}:80");
    let echo = format!("{VIP}:5353");
    lb.service(&http, "tcp", &[(&format!("{a}:80"), 1)]);
    lb.service(&echo, "udp", &[(&format!("{a}:7"), 1)]);

    let mut cs = clients(
        &net,
        &ClientCfg {
            tcp_n: 1,
            udp_n: 1,
            bind_port: 40000,
            hold: true,
        },
    );
    for c in &mut cs {
        let v = c.event("connected", CLIENT_WAIT);
        assert_eq!(
            v["local_ports"],
            serde_json::json!([40000]),
            "{}: {v:#}",
            c.name
        );
        assert_eq!(v["errors"], serde_json::json!([]), "{}: {v:#}", c.name);
    }

    let ct = lb.conntrack();
    let want: BTreeSet<String> = (1..=3)
        .map(|i| format!("{}:40000", Net::client_ip(i)))
        .collect();
    for (proto, vip, backend) in [
        ("tcp", &http, format!("{a}:80")),
        ("udp", &echo, format!("{a}:7")),
    ] {
        let fl = flows(&ct, proto, vip);
        let got: BTreeSet<String> = fl
            .iter()
            .map(|c| c["client"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "{proto} clients: {fl:#?}");
        assert!(
            fl.iter().all(|c| {
                // A UDP flow the client has not sent to since the reply
                // is answered, not confirmed.
                let state = if proto == "udp" { "replied" } else { "open" };
                c["state"] == state && c["backend"] == backend.as_str()
            }),
            "{proto}: {fl:#?}"
        );
        let nat: HashSet<&str> = fl.iter().map(|c| c["nat"].as_str().unwrap()).collect();
        assert_eq!(nat.len(), 3, "{proto}: NAT ports not distinct: {fl:#?}");
    }

    for c in &mut cs {
        c.send("go");
    }
    for d in all_done(&mut cs, &net, &lb) {
        assert_eq!(
            answers(&d, "tcp"),
            vec![("backend a".to_string(), 1)],
            "{d:#}"
        );
        assert_eq!(
            answers(&d, "udp"),
            vec![("backend a".to_string(), 1)],
            "{d:#}"
        );
    }
    check_checksums(&net);
}

/// Backend a has weight 3, b weight 1: of 400 new connections (from three
/// clients at once) a takes between 65 % and 85 %, and the LB's counters
/// agree with what the clients saw.
#[test]
fn spread_follows_weights() {
    if !common::root_or_skip("spread_follows_weights") {
        return;
    }
    let net = Net::up("native", 3, false);
    let lb = Lb::attach(&net);
    let (a, b) = (net.backend_ip("a"), net.backend_ip("b"));
    let http = format!("{VIP}:80");
    lb.service(
        &http,
        "tcp",
        &[(&format!("{a}:80"), 3), (&format!("{b}:80"), 1)],
    );
    let list = lb.json(&["list"]);
    let weights: Vec<(&str, u64)> = list[0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["addr"].as_str().unwrap(), b["weight"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        weights,
        vec![(&*format!("{a}:80"), 3), (&*format!("{b}:80"), 1)],
        "{list:#}"
    );

    // 134 + 133 + 133 = 400 connections.
    let mut cs: Vec<Proc> = net
        .client_hosts()
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let n = if i == 0 { 134 } else { 133 };
            clients_one(&net, i, n)
        })
        .collect();
    for c in &mut cs {
        c.event("connected", CLIENT_WAIT);
    }
    let dones = all_done(&mut cs, &net, &lb);
    let (na, nb, n) = tally(&dones, "tcp");
    assert_eq!(n, 400, "{dones:#?}");
    let share = na as f64 / n as f64;
    assert!(
        (0.65..=0.85).contains(&share),
        "a's share {share:.3} (a {na}, b {nb}) is not within 0.65..0.85 of weights 3:1"
    );
    let st = lb.stats();
    assert_eq!(
        new_flows(&st, &format!("{http}/tcp")),
        vec![(format!("{a}:80"), na), (format!("{b}:80"), nb)],
        "{st:#}"
    );
    check_checksums(&net);
}

/// CLIENT in client namespace number `i` (0-based) with `n` TCP connections,
/// not held.
fn clients_one(net: &Net, i: usize, n: usize) -> Proc {
    let h = &net.client_hosts()[i];
    let arg = serde_json::json!({
        "host": VIP, "budget": BUDGET_S, "name": h, "tcp_port": 80, "tcp_n": n,
    })
    .to_string();
    Proc::spawn(&format!("client {h}"), &net.ns(h), CLIENT, &[&arg])
}

/// Long-lived connections to both backends of an echo service (VIP:9000),
/// each exchanging a line every 100 ms; `lb backend del` removes b under
/// that load. Every exchange of a's connections succeeds, before, during and
/// after; each of b's connections fails (reset or timeout) soon after and
/// has no exchange after the delete; every new connection goes to a; the
/// connection table has no flow to b left.
#[test]
fn deleting_a_backend_under_load() {
    if !common::root_or_skip("deleting_a_backend_under_load") {
        return;
    }
    let net = Net::up("native", 1, false);
    let _echo = servers(&net, TCP_ECHO, 9000);
    let lb = Lb::attach(&net);
    let (a, b) = (net.backend_ip("a"), net.backend_ip("b"));
    let svc = format!("{VIP}:9000");
    let (a_be, b_be) = (format!("{a}:9000"), format!("{b}:9000"));
    lb.service(&svc, "tcp", &[(&a_be, 1), (&b_be, 1)]);

    // 16 connections: both backends get some but once in 2^15 runs.
    let conns = 16;
    let arg = serde_json::json!({
        "host": VIP, "port": 9000, "n": conns, "interval": 0.1, "after": 1.5,
        "new": 40, "budget": BUDGET_S,
    })
    .to_string();
    let mut c = Proc::spawn("echo client", &net.ns("c"), ECHO_CLIENT, &[&arg]);
    let ready = c.event("ready", CLIENT_WAIT);
    assert_eq!(ready["errors"], serde_json::json!([]), "{ready:#}");
    let names: Vec<&str> = ready["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap_or("none"))
        .collect();
    let on_b = names.iter().filter(|n| **n == "backend b").count();
    assert!(
        on_b > 0 && names.iter().filter(|n| **n == "backend a").count() + on_b == conns,
        "connections not on both backends: {names:?}"
    );
    let before = lb.conntrack();
    let open_b = flows(&before, "tcp", &svc)
        .iter()
        .filter(|f| f["backend"] == b_be.as_str() && f["state"] == "open")
        .count();
    assert_eq!(open_b, on_b, "open flows to b: {before:#?}");

    c.send("deleting");
    lb.run(&["backend", "del", &svc, &b_be]);
    c.send("deleted");
    let done = c.event("done", CLIENT_WAIT);

    for (i, conn) in done["conns"].as_array().unwrap().iter().enumerate() {
        let ok_after = conn["ok_after"].as_u64().unwrap();
        assert!(
            conn["ok_before"].as_u64().unwrap() >= 3,
            "connection {i}: {conn}"
        );
        if conn["backend"] == "backend a" {
            assert_eq!(
                conn["error"],
                Value::Null,
                "a's connection {i} failed: {conn}"
            );
            // 1.5 s at one exchange per 100 ms: about 15; allow a slow host.
            assert!(ok_after >= 3, "a's connection {i} stalled: {conn}");
        } else {
            assert_eq!(ok_after, 0, "b's connection {i} still answered: {conn}");
            let err = conn["error"]
                .as_str()
                .unwrap_or_else(|| panic!("b's connection {i} lives: {conn}"));
            assert!(
                err.contains("ConnectionResetError")
                    || err.contains("timed out")
                    || err.contains("closed"),
                "b's connection {i}: {conn}"
            );
            // The next exchange (<= 100 ms later) fails: a reset comes back
            // at once, a timeout after 2 s.
            let t = conn["failed_after_s"].as_f64().unwrap();
            assert!(
                t < 3.0,
                "b's connection {i} failed only {t} s after the delete: {conn}"
            );
        }
    }
    assert_eq!(done["new_errors"], serde_json::json!([]), "{done:#}");
    assert_eq!(
        done["new"],
        serde_json::json!({"backend a": 40}),
        "{done:#}"
    );

    let list = lb.json(&["list"]);
    assert_eq!(list[0]["backends"].as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list[0]["backends"][0]["addr"], a_be.as_str(), "{list:#}");
    let after = lb.conntrack();
    let to_b: Vec<&Value> = after
        .iter()
        .filter(|f| f["backend"] == b_be.as_str())
        .collect();
    assert!(to_b.is_empty(), "flows to the deleted backend: {to_b:#?}");
    check_checksums(&net);
}

/// Two-arm: clients on the LB's eth0 (10.200.0.0/24), backends on its eth1
/// (10.200.1.0/24), one lb instance attached to both. Packets cross between
/// the interfaces (XDP_REDIRECT); the backends see the LB's eth1 address.
/// HTTP and UDP from two clients succeed and both backends answer.
#[test]
fn two_arm_topology() {
    if !common::root_or_skip("two_arm_topology") {
        return;
    }
    let net = Net::up("native", 2, true);
    let _udp = servers(&net, UDP_ECHO, 7);
    let lb = Lb::attach(&net);
    let (a, b) = (net.backend_ip("a"), net.backend_ip("b"));
    let http = format!("{VIP}:80");
    let echo = format!("{VIP}:5353");
    lb.service(
        &http,
        "tcp",
        &[(&format!("{a}:80"), 1), (&format!("{b}:80"), 1)],
    );
    lb.service(
        &echo,
        "udp",
        &[(&format!("{a}:7"), 1), (&format!("{b}:7"), 1)],
    );
    let st = lb.json(&["status"]);
    let modes: Vec<(&str, &str)> = st["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["iface"].as_str().unwrap(), i["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        vec![("eth0", "native"), ("eth1", "native")],
        "{st:#}"
    );

    let per = 50;
    let mut cs = clients(
        &net,
        &ClientCfg {
            tcp_n: per,
            udp_n: per,
            bind_port: 0,
            hold: true,
        },
    );
    for c in &mut cs {
        let v = c.event("connected", CLIENT_WAIT);
        assert_eq!(v["tcp_ok"], per, "{}: {v:#}", c.name);
    }
    let ct = lb.conntrack();
    let n = 2 * per;
    for (proto, vip) in [("tcp", &http), ("udp", &echo)] {
        let fl = flows(&ct, proto, vip);
        assert_eq!(fl.len(), n, "{proto} flows");
        for f in fl {
            assert!(
                f["nat"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{LB1_IP}:")),
                "{f}"
            );
            let be = f["backend"].as_str().unwrap();
            assert!(be.starts_with("10.200.1.1"), "{f}");
        }
    }
    for c in &mut cs {
        c.send("go");
    }
    let dones = all_done(&mut cs, &net, &lb);
    let (ta, tb, tn) = tally(&dones, "tcp");
    let (ua, ub, un) = tally(&dones, "udp");
    assert_eq!((tn, un), (n as u64, n as u64), "{dones:#?}");
    assert!(ta > 0 && tb > 0, "TCP not balanced: a {ta}, b {tb}");
    assert!(ua > 0 && ub > 0, "UDP not balanced: a {ua}, b {ub}");
    // The datapath moved the traffic between the arms itself (XDP_REDIRECT),
    // not the LB's kernel: at least 3 packets per TCP connection each way
    // (one makes 4 or more; the UDP exchanges add one each).
    let st = lb.stats();
    for name in ["to_backend", "to_client"] {
        assert!(counter(&st, name) >= 3 * n as u64, "{name}: {st:#}");
    }
    for name in ["pass_no_route", "drop_no_backend", "drop_nat_full"] {
        assert_eq!(counter(&st, name), 0, "{name}: {st:#}");
    }
    check_checksums(&net);
}

/// Hitless re-attach: connections held open through the LB keep working
/// while `lb attach` loads a new program and swaps it in on the same maps
/// (twice), and the connection table keeps their flows.
#[test]
fn connections_survive_reattach() {
    if !common::root_or_skip("connections_survive_reattach") {
        return;
    }
    let net = Net::up("native", 1, false);
    let _echo = servers(&net, TCP_ECHO, 9000);
    let lb = Lb::attach(&net);
    let (a, b) = (net.backend_ip("a"), net.backend_ip("b"));
    let svc = format!("{VIP}:9000");
    lb.service(
        &svc,
        "tcp",
        &[(&format!("{a}:9000"), 1), (&format!("{b}:9000"), 1)],
    );

    let conns = 8;
    let arg = serde_json::json!({
        "host": VIP, "port": 9000, "n": conns, "interval": 0.1, "after": 1.5,
        "new": 10, "budget": BUDGET_S,
    })
    .to_string();
    let mut c = Proc::spawn("echo client", &net.ns("c"), ECHO_CLIENT, &[&arg]);
    let ready = c.event("ready", CLIENT_WAIT);
    assert_eq!(ready["errors"], serde_json::json!([]), "{ready:#}");
    let before: Vec<Value> = flows(&lb.conntrack(), "tcp", &svc)
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(before.len(), conns, "{before:#?}");

    c.send("deleting");
    let prog = |lb: &Lb| lb.json(&["status"])["interfaces"][0]["prog_id"].clone();
    let first = prog(&lb);
    for _ in 0..2 {
        let out = lb.run(&["attach", "eth0"]);
        let s = text(&out.stdout);
        assert!(s.contains("replaced") && s.contains("flows kept"), "{s}");
    }
    assert_ne!(prog(&lb), first, "the program was not replaced");
    c.send("deleted");
    let done = c.event("done", CLIENT_WAIT);

    for (i, conn) in done["conns"].as_array().unwrap().iter().enumerate() {
        assert_eq!(conn["error"], Value::Null, "connection {i} broke: {conn}");
        assert!(
            conn["ok_after"].as_u64().unwrap() >= 3,
            "connection {i} stalled after the re-attach: {conn}"
        );
    }
    // The same flows, on the same NAT ports, are still in the table.
    let after = lb.conntrack();
    for f in &before {
        assert!(
            after
                .iter()
                .any(|g| g["client"] == f["client"] && g["nat"] == f["nat"]),
            "flow {f} lost across the re-attach"
        );
    }
    check_checksums(&net);
}
