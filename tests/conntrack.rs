//! The connection table under load, end to end: scripts/topo in namespaces
//! (prefix "lbk"), `lb` attached with the talk's one-liner, nginx on both
//! backends. Short connections from three clients must never stall (no SYN
//! retransmission, no PAWS rejection at the backends' TIME_WAIT), and a SYN
//! flood must not cost established connections or new real ones.
//!
//! The tests take turns (a lock): each loads the 2 CPUs of a CI
//! machine on its own.

mod common;
#[path = "common/conntrack.rs"]
mod ct;
#[path = "common/services.rs"]
mod svc;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use ct::*;
use svc::Proc;

/// One test at a time.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// wrk per client: threads, connections, seconds.
const WRK_THREADS: u32 = 2;
const WRK_CONNS: u32 = 50;
const WRK_SECS: u32 = 20;
/// Requests (= connections) each client must at least have made for the
/// test to prove anything.
const MIN_REQUESTS: u64 = 1000;

/// Three clients, 50 concurrent connections each, a new connection per
/// request (`Connection: close`; nginx answers and closes first, so the
/// backends hold the TIME_WAITs) for 20 s through lb with default settings.
/// Every request is answered, no client retransmits a SYN, no backend
/// rejects a SYN on PAWS grounds in TIME_WAIT, no receiver sees a bad
/// checksum.
#[test]
fn short_connections_through_defaults_never_stall() {
    if !common::root_or_skip("short_connections_through_defaults_never_stall") {
        return;
    }
    let _turn = turn();
    let net = KNet::up(3);
    let _nginx = net.nginx_backends(75);
    let lb = OneLiner::attach(&net.ns("lb"), &[]);
    // What a client does by default (fresh namespaces keep the kernel's
    // default, 2: reuse for loopback only): nothing is tuned.
    for h in net.client_hosts() {
        let out = common::run(
            "ip",
            &[
                "netns",
                "exec",
                &net.ns(&h),
                "sysctl",
                "-n",
                "net.ipv4.tcp_tw_reuse",
            ],
        );
        eprintln!(
            "{h}: net.ipv4.tcp_tw_reuse = {}",
            svc::text(&out.stdout).trim()
        );
    }

    let runs: Vec<(String, Wrk)> = std::thread::scope(|s| {
        let hs: Vec<_> = net
            .client_hosts()
            .into_iter()
            .map(|h| {
                let ns = net.ns(&h);
                s.spawn(move || {
                    (
                        h,
                        wrk_close(&ns, common::LB_IP, WRK_THREADS, WRK_CONNS, WRK_SECS),
                    )
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("wrk thread"))
            .collect()
    });

    // Everything first, for diagnosis; the assertions after.
    let mut hosts: Vec<String> = net.client_hosts();
    hosts.extend(["a", "b", "lb"].map(String::from));
    let counters: BTreeMap<String, BTreeMap<String, u64>> = hosts
        .iter()
        .map(|h| (h.clone(), nstat(&net.ns(h), NSTAT)))
        .collect();
    let tw: BTreeMap<String, usize> = hosts
        .iter()
        .map(|h| (h.clone(), time_wait(&net.ns(h))))
        .collect();
    for (h, w) in &runs {
        eprintln!("client {h}: wrk {}", w.summary);
    }
    for h in &hosts {
        eprintln!("{h}: nstat {:?} time-wait sockets {}", counters[h], tw[h]);
    }
    lb.report();

    for (h, w) in &runs {
        for k in ["connect", "read", "write", "timeout", "status", "non2xx"] {
            assert_eq!(w.get(k), 0, "client {h}: wrk {k} errors: {}", w.output);
        }
        assert_eq!(
            w.get("responses"),
            w.get("requests"),
            "client {h}: {}",
            w.output
        );
        assert!(
            w.get("requests") > MIN_REQUESTS,
            "client {h}: only {} requests in {WRK_SECS} s: {}",
            w.get("requests"),
            w.output
        );
    }
    for h in net.client_hosts() {
        assert_eq!(
            counters[&h]["TcpExtTCPSynRetrans"], 0,
            "client {h} retransmitted SYNs (connections stalled): {:?}",
            counters[&h]
        );
    }
    // No backend rejected a segment in TIME_WAIT: no SYN landed on a tuple
    // the backend still held for another client connection. (The
    // topology keeps flows in order, see KNet::up: on veths without it
    // the clients' own reordered segments count here too.)
    for h in ["a", "b"] {
        assert_eq!(
            counters[h]["TcpExtPAWSTimewait"], 0,
            "backend {h} rejected segments in TIME_WAIT (PAWS): {:?}",
            counters[h]
        );
    }
    for h in &hosts {
        assert_eq!(
            counters[h]["TcpInCsumErrors"], 0,
            "{h}: TCP checksum errors: {:?}",
            counters[h]
        );
    }
    // The backends closed first: the TIME_WAITs are theirs.
    let backend_tw = tw["a"] + tw["b"];
    let client_tw: usize = net.client_hosts().iter().map(|h| tw[h]).sum();
    assert!(
        backend_tw > client_tw,
        "the clients, not the backends, hold the TIME_WAITs: backends {backend_tw}, clients {client_tw}"
    );
}

/// Held keep-alive connections.
const HELD: usize = 200;
/// Spoofed SYNs of the flood.
const FLOOD_FRAMES: u64 = 2_000_000;
/// New connections the second client makes at most (it stops when the
/// flood ends), and at least for the test to prove anything.
const NEW_MAX: usize = 200_000;
const NEW_MIN: u64 = 20;

/// 200 keep-alive connections are open and idle when 2,000,000 SYNs from
/// spoofed sources hit the VIP (through BPF_PROG_TEST_RUN of the attached
/// program, with the LB's eth0 as ingress), with `--max-flows 65536`.
/// Meanwhile a second client's new connections all succeed; afterwards
/// every held connection still answers.
#[test]
fn syn_flood_keeps_established_connections() {
    if !common::root_or_skip("syn_flood_keeps_established_connections") {
        return;
    }
    let _turn = turn();
    let net = KNet::up(2);
    let _nginx = net.nginx_backends(300);
    let lb_ns = net.ns("lb");
    let lb = OneLiner::attach(&lb_ns, &["--max-flows", "65536"]);
    let host = common::LB_IP;

    let mut held = Proc::spawn(
        "holding client",
        &net.ns("c"),
        HOLD_CLIENT,
        &[host, &HELD.to_string(), "120"],
    );
    let v = held.event("connected", Duration::from_secs(60));
    eprintln!("held connections: {v}");
    assert_eq!(v["ok"], HELD, "holding client: {v:#}");
    let tracked = lb
        .json("conntrack")
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| {
                    c["client"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("10.200.0.10:"))
                })
                .count()
        })
        .unwrap_or(0);
    eprintln!("lb conntrack: {tracked} connections of the holding client");

    let mut fresh = Proc::spawn(
        "new-connection client",
        &net.ns("c2"),
        NEW_CONN_CLIENT,
        &[host, &NEW_MAX.to_string(), "80"],
    );
    fresh.event("started", Duration::from_secs(20));

    let flood = Flood {
        lb_ns: lb_ns.clone(),
        prog_id: lb.prog_id(),
        ifindex: ifindex(&lb_ns, "eth0"),
        dst_mac: mac(&lb_ns, "eth0"),
        vip: host.parse::<Ipv4Addr>().unwrap(),
        port: 80,
        frames: FLOOD_FRAMES,
        max_threads: 2,
        budget: Duration::from_secs(60),
    };
    let r = syn_flood(&flood);
    eprintln!(
        "flood: {} frames run in {:?} on {} threads, {} test_run errors ({:?}), verdicts \
         [aborted, drop, pass, tx, redirect, other] {:?}",
        r.runs, r.elapsed, r.threads, r.errors, r.first_error, r.verdicts
    );
    fresh.send("stop");
    let new = fresh.event("done", Duration::from_secs(20));
    eprintln!("new connections during the flood: {new}");

    held.send("go");
    let done = held.event("done", Duration::from_secs(60));
    eprintln!("held connections after the flood: {done}");
    let stats = lb.report();
    for h in ["c", "c2", "a", "b", "lb"] {
        eprintln!("{h}: nstat {:?}", nstat(&net.ns(h), NSTAT));
    }

    assert_eq!(r.errors, 0, "test_run failed: {:?}", r.first_error);
    assert_eq!(r.runs, FLOOD_FRAMES, "the flood did not run to the end");
    // The frames reached the program's TCP path, not a pass-through.
    assert_eq!(svc::counter(&stats, "pass_malformed"), 0, "{stats}");
    assert!(
        r.verdicts[2] < FLOOD_FRAMES / 100,
        "{} of the SYNs passed to the kernel",
        r.verdicts[2]
    );
    assert_eq!(
        done["ok"], HELD,
        "held connections lost to the flood: {done:#}"
    );
    assert_eq!(done["n_errors"], 0, "{done:#}");
    // Every real new connection during the flood succeeded. How many
    // flood SYNs found no free NAT tuple depends on the flood's rate
    // against the 100 ms an unanswered tuple is held (this machine: 0 to
    // ~1,400 of 2M from run to run, before and after the IPv6 pipeline):
    // reported, not asserted.
    assert_eq!(
        new["n_errors"], 0,
        "new connections during the flood: {new:#}"
    );
    eprintln!(
        "drop_nat_full during the flood: {}",
        svc::counter(&stats, "drop_nat_full")
    );
    assert!(
        new["ok"].as_u64().unwrap_or(0) >= NEW_MIN,
        "too few new connections during the flood to prove anything: {new:#}"
    );
    for h in ["c", "c2", "a", "b", "lb"] {
        assert_eq!(
            nstat(&net.ns(h), &["TcpInCsumErrors"])["TcpInCsumErrors"],
            0,
            "{h}: TCP checksum errors"
        );
    }
}

/// One GET with `Connection: close` (nginx closes first: the TIME_WAIT is
/// the backend's) from namespace `ns`: whether it was answered in 5 s.
fn get_close(ns: &str) -> bool {
    let url = format!("http://{}/", common::LB_IP);
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--max-time", "5", "-H", "Connection: close", &url])
        .output()
        .expect("curl");
    svc::text(&out.stdout).trim() == "200"
}

/// NAT ports far fewer than the connections made (4 per backend), each
/// connection from a new client port: once every tuple is a finished
/// connection's still in the backend's TIME_WAIT, new flows take those
/// (`nat_tw_reuse`) instead of being dropped. The backends' TIME_WAITs
/// accept such a SYN when its timestamps happen to be newer (Linux offsets
/// them per connection), and refuse the others (PAWS) with an ACK, which
/// the client answers with a RST that ends the TIME_WAIT and a SYN again
/// at once: every request is answered.
#[test]
fn finished_tuples_serve_when_nat_ports_run_out() {
    if !common::root_or_skip("finished_tuples_serve_when_nat_ports_run_out") {
        return;
    }
    let _turn = turn();
    let net = KNet::up(1);
    let _nginx = net.nginx_backends(75);
    let lb = OneLiner::attach(&net.ns("lb"), &["--nat-ports", "61000-61003"]);
    let counter = |name: &str| {
        lb.json("status")["counters"][name]["packets"]
            .as_u64()
            .unwrap()
    };
    // A finished tuple is taken again once quiet for a second: at 5
    // connections a second over 8 tuples, after about 1.6 s.
    const N: u64 = 40;
    let mut failed = 0;
    let mut slow = 0;
    for _ in 0..N {
        let t = std::time::Instant::now();
        failed += u64::from(!get_close(&net.ns("c")));
        slow += u64::from(t.elapsed() > Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (reused, dropped) = (counter("nat_tw_reuse"), counter("drop_nat_full"));
    let c = nstat(
        &net.ns("c"),
        &["TcpExtTCPSynRetrans", "TcpOutRsts", "TcpInCsumErrors"],
    );
    let backends: Vec<_> = ["a", "b"]
        .iter()
        .map(|h| nstat(&net.ns(h), &["TcpExtPAWSTimewait", "TcpInCsumErrors"]))
        .collect();
    eprintln!(
        "{failed} of {N} failed, {slow} took over 0.5 s; nat_tw_reuse {reused}, drop_nat_full \
         {dropped}; client {c:?}; backends {backends:?}"
    );
    lb.report();
    assert_eq!(failed, 0, "requests failed");
    assert!(reused >= N / 2, "finished tuples taken: {reused} of {N}");
    assert_eq!(c["TcpInCsumErrors"], 0);
    for b in &backends {
        assert_eq!(b["TcpInCsumErrors"], 0);
    }
}
