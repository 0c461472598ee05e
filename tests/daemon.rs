//! `lb run` end to end in scripts/topo topologies: health checks take a
//! stopped backend out under load and bring it back, SIGHUP reloads (a broken
//! file keeps the running config), SIGTERM leaves the datapath attached, and
//! /metrics, scraped over HTTP in the LB's namespace, matches the traffic
//! sent. Every wait is bounded; every process is killed by its own PID.

mod common;
#[path = "common/services.rs"]
mod svc;
#[path = "common/e2e.rs"]
mod util;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use svc::Proc;

/// A tiny HTTP server answering `backend NAME` on ADDR:PORT. Args: NAME ADDR
/// PORT LIFETIME_S. Prints "ready" once listening.
const HTTP: &str = r#"
import http.server, socketserver, sys, threading
name, addr, port, life = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("backend " + name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
srv = S((addr, port), H)
threading.Timer(life, srv.shutdown).start()
print("ready", flush=True)
srv.serve_forever(0.1)
"#;

fn http_server(ns: &str, name: &str, ip: &str, port: u16) -> Proc {
    let mut p = Proc::spawn(
        &format!("http server {name}:{port}"),
        ns,
        HTTP,
        &[name, ip, &port.to_string(), "120"],
    );
    assert_eq!(p.line(Duration::from_secs(20)), "ready", "{}", p.name);
    p
}

/// `lb run` as a child; its stderr (the logs) collected; killed on drop.
struct Daemon {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(
        file: &std::path::Path,
        ns: &str,
        pins: &common::PinDir,
        metrics: Option<&str>,
    ) -> Self {
        let mut args = vec![
            "run".to_string(),
            "-f".into(),
            file.to_str().unwrap().into(),
            "--netns".into(),
            ns.into(),
            "--pin-dir".into(),
            pins.arg().into(),
        ];
        if let Some(m) = metrics {
            args.extend(["--metrics".to_string(), m.to_string()]);
        }
        let mut child = Command::new(common::lb_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lb run");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&logs);
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for l in err.lines() {
                let Ok(l) = l else { break };
                keep.lock().unwrap().push(l);
            }
        });
        let d = Self { child, logs };
        d.wait_log("running", 1, Duration::from_secs(20));
        d
    }

    fn count(&self, what: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }

    /// Waits until `n` log lines contain `what`.
    fn wait_log(&self, what: &str, n: usize, wait: Duration) {
        let t0 = Instant::now();
        while self.count(what) < n {
            assert!(
                t0.elapsed() < wait,
                "no {n}x {what:?} in the daemon's log after {wait:?}:\n{}",
                self.logs.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), s).expect("signal");
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "lb run exited with {st}");
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "lb run did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Detaches the instance on drop (before the topology goes).
struct Detach<'a>(String, &'a common::PinDir);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let _ = common::lb(&[
            "detach",
            "eth0",
            "--netns",
            &self.0,
            "--pin-dir",
            self.1.arg(),
        ]);
    }
}

fn list(ns: &str, pins: &common::PinDir) -> Vec<(String, u64)> {
    let out = common::lb(&["list", "--json", "--netns", ns, "--pin-dir", pins.arg()]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["backends"].as_array().unwrap().clone())
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn temp_file(name: &str, src: &str) -> (PathBuf, TempGuard) {
    let dir = std::env::temp_dir().join(common::unique("lbd"));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(name);
    std::fs::write(&f, src).unwrap();
    (f, TempGuard(dir))
}

struct TempGuard(PathBuf);

impl Drop for TempGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;

fn config(port: u16, weights: (u32, u32), check: &str) -> String {
    format!(
        "[settings]\nmax_flows = 65536\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n\n\
         [[services]]\nvip = \"10.200.0.2\"\nport = {port}\n\n\
         [[services.backends]]\naddr = \"10.200.0.11:{port}\"\nweight = {}\ncheck = {check}\n\n\
         [[services.backends]]\naddr = \"10.200.0.12:{port}\"\nweight = {}\ncheck = {check}\n",
        weights.0, weights.1
    )
}

#[test]
fn health_failover_and_rejoin() {
    if !common::root_or_skip("health_failover_and_rejoin") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbd");
    let (c, lbns) = (topo.ns("c"), topo.ns("lb"));
    let port = 8080;
    let a = http_server(&topo.ns("a"), "a", common::A_IP, port);
    let b = http_server(&topo.ns("b"), "b", common::B_IP, port);
    let check = format!(
        "{{ kind = \"http\", path = \"/\", expect = 200, interval_ms = {INTERVAL_MS}, timeout_ms = 150, rise = 2, fall = {FALL} }}"
    );
    let (file, _tmp) = temp_file("lb.toml", &config(port, (1, 1), &check));
    let mut d = Daemon::start(&file, &lbns, &pins, None);
    let _detach = Detach(lbns.clone(), &pins);
    let url = format!("http://{}:{port}/", common::LB_IP);

    let seen: Vec<String> = (0..30).map(|_| common::curl(&c, &url, "2")).collect();
    assert!(seen.iter().any(|s| s == "backend a"), "{seen:?}");
    assert!(seen.iter().any(|s| s == "backend b"), "{seen:?}");

    // Stop a under continuous load: after interval x fall (+ margin), every
    // new request goes to b.
    drop(a);
    let killed = Instant::now();
    let deadline = Duration::from_millis(INTERVAL_MS * FALL + 1200);
    let mut late = Vec::new();
    while killed.elapsed() < deadline + Duration::from_secs(2) {
        let t = killed.elapsed();
        let r = common::curl(&c, &url, "1");
        if t > deadline {
            late.push(r);
        }
    }
    assert!(late.len() >= 10, "too few requests: {late:?}");
    assert!(
        late.iter().all(|r| r == "backend b"),
        "requests after {deadline:?} not all on b: {late:?}"
    );
    d.wait_log("backend down", 1, Duration::from_secs(1));
    d.wait_log("ended the flows", 1, Duration::from_secs(1));
    assert_eq!(
        list(&lbns, &pins),
        [
            ("10.200.0.11:8080".to_string(), 0),
            ("10.200.0.12:8080".to_string(), 1)
        ]
    );

    // Restart it: back after rise successes, with its weight.
    let a = http_server(&topo.ns("a"), "a", common::A_IP, port);
    d.wait_log("backend up", 1, Duration::from_secs(5));
    d.wait_log("weight 0 -> 1", 1, Duration::from_secs(2));
    assert_eq!(
        list(&lbns, &pins),
        [
            ("10.200.0.11:8080".to_string(), 1),
            ("10.200.0.12:8080".to_string(), 1)
        ]
    );
    let seen: Vec<String> = (0..30).map(|_| common::curl(&c, &url, "2")).collect();
    assert!(
        seen.iter().any(|s| s == "backend a"),
        "a did not rejoin: {seen:?}"
    );

    // Every backend down: never blackhole, they all stay in.
    drop((a, b));
    d.wait_log(
        "every backend of the service is down",
        1,
        Duration::from_secs(5),
    );
    let t0 = Instant::now();
    let want = [
        ("10.200.0.11:8080".to_string(), 1),
        ("10.200.0.12:8080".to_string(), 1),
    ];
    while list(&lbns, &pins) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{:?}",
            list(&lbns, &pins)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM: the daemon stops, the datapath stays.
    d.stop();
    d.wait_log("stopping", 1, Duration::from_secs(2));
    assert!(pins.path.join("eth0/link").exists());
    let out = common::lb(&["status", "--netns", &lbns, "--pin-dir", pins.arg()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("eth0: ifindex"),
        "{out:?}"
    );
    assert_eq!(list(&lbns, &pins), want);
}

/// Parses OpenMetrics text: "name{labels}" -> value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn reload_and_metrics() {
    if !common::root_or_skip("reload_and_metrics") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbd");
    let (c, lbns) = (topo.ns("c"), topo.ns("lb"));
    let check = "{ kind = \"tcp\", interval_ms = 200, timeout_ms = 100 }";
    let good = config(80, (1, 1), check);
    let (file, _tmp) = temp_file("lb.toml", &good);
    let metrics_addr = format!("{}:9100", common::LB_IP);
    let mut d = Daemon::start(&file, &lbns, &pins, Some(&metrics_addr));
    let _detach = Detach(lbns.clone(), &pins);
    let url = format!("http://{}/", common::LB_IP);
    let murl = format!("http://{metrics_addr}/metrics");

    // Traffic, then a scrape from the LB's namespace.
    let n = 20;
    let mut per: HashMap<String, u64> = HashMap::new();
    for _ in 0..n {
        let r = common::curl(&c, &url, "2");
        assert!(r.starts_with("backend "), "{r:?}");
        *per.entry(r).or_default() += 1;
    }
    let text = common::curl(&lbns, &murl, "5");
    assert!(text.ends_with("# EOF"), "{text}");
    let m = parse_metrics(&text);
    let svc = "service=\"10.200.0.2:80/tcp\"";
    let key = |name: &str, be: &str| format!("{name}{{{svc},backend=\"{be}\"}}");
    // The connection tables: the n connections (ended, their entries kept
    // for the backends' TIME_WAIT) in conntrack, two entries each (fewer if
    // the client reused a port: that reopens its flow), of twice max_flows;
    // the half-open tables' sets of 3.
    let table = |name: &str, t: &str| m[&format!("{name}{{table=\"{t}\"}}")];
    let e = table("lb_table_entries", "conntrack");
    assert!(e >= 2.0 && e <= 2.0 * n as f64 && e % 2.0 == 0.0, "{text}");
    assert_eq!(table("lb_table_capacity", "conntrack"), 131_072.0, "{text}");
    assert_eq!(table("lb_table_entries", "ct_new"), 0.0, "{text}");
    assert_eq!(
        table("lb_table_capacity", "ct_new"),
        (2u32 * 262_144).div_ceil(3) as f64 * 3.0,
        "{text}"
    );
    assert_eq!(
        m[&format!("lb_service_new_flows_total{{{svc}}}")],
        n as f64,
        "{text}"
    );
    for (h, ip) in [("a", common::A_IP), ("b", common::B_IP)] {
        let be = format!("{ip}:80");
        let want = per.get(&format!("backend {h}")).copied().unwrap_or(0) as f64;
        assert_eq!(
            m[&key("lb_backend_new_flows_total", &be)],
            want,
            "{h}: {text}"
        );
        assert_eq!(m[&key("lb_backend_up", &be)], 1.0, "{text}");
        assert_eq!(m[&key("lb_backend_weight", &be)], 1.0, "{text}");
        assert!(
            m.contains_key(&key("lb_backend_check_latency_seconds", &be)),
            "{text}"
        );
        // A request and its answer: at least SYN, request, FIN, ACKs each way.
        assert!(
            m[&key("lb_backend_packets_total", &be)] >= want * 6.0,
            "{text}"
        );
        // Each connection's handshake measured, once: a histogram.
        let hs = |suffix: &str| m[&key(&format!("lb_backend_handshake_seconds_{suffix}"), &be)];
        assert_eq!(hs("count"), want, "{h}: {text}");
        let inf =
            format!("lb_backend_handshake_seconds_bucket{{le=\"+Inf\",{svc},backend=\"{be}\"}}");
        assert_eq!(m[&inf], want, "{h}: {text}");
        assert!(want == 0.0 || hs("sum") > 0.0, "{h}: {text}");
        assert_eq!(
            m[&key("lb_backend_unanswered_syns_total", &be)],
            0.0,
            "{text}"
        );
        assert!(
            m.contains_key(&key("lb_backend_resets_total", &be)),
            "{text}"
        );
    }
    let stats: Value = {
        let out = common::lb(&["stats", "--json", "--netns", &lbns, "--pin-dir", pins.arg()]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for b in stats["services"][0]["backends"].as_array().unwrap() {
        let be = b["addr"].as_str().unwrap();
        assert_eq!(
            b["handshake"]["count"].as_f64(),
            Some(m[&key("lb_backend_handshake_seconds_count", be)]),
            "{stats:#}"
        );
        assert!(b["handshake"]["p99_ms"].is_number() || b["handshake"]["count"] == 0);
        assert_eq!(b["unanswered_syns"], 0, "{stats:#}");
    }
    let to_backend = svc::counter(&stats, "to_backend") as f64;
    let scraped = m["lb_verdict_packets_total{verdict=\"forward\",reason=\"to_backend\"}"];
    assert!(
        scraped > 0.0 && scraped <= to_backend,
        "{scraped} vs {to_backend}"
    );
    assert_eq!(
        m["lb_verdict_packets_total{verdict=\"drop\",reason=\"drop_no_backend\"}"],
        0.0
    );

    // `lb backend drain` is `backend set --weight 0`.
    let out = common::lb(&[
        "backend",
        "drain",
        "10.200.0.2:80",
        "10.200.0.12:80",
        "--netns",
        &lbns,
        "--pin-dir",
        pins.arg(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        list(&lbns, &pins),
        [
            ("10.200.0.11:80".to_string(), 1),
            ("10.200.0.12:80".to_string(), 0)
        ]
    );
    for _ in 0..5 {
        assert_eq!(common::curl(&c, &url, "2"), "backend a");
    }

    // SIGHUP with a broken file: the running config stays.
    std::fs::write(&file, good.replace("weight = 1", "weight = 99999")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("reload failed", 1, Duration::from_secs(5));
    assert!(d
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("weight 99999 out of range")));
    assert_eq!(
        list(&lbns, &pins),
        [
            ("10.200.0.11:80".to_string(), 1),
            ("10.200.0.12:80".to_string(), 0)
        ]
    );
    assert!(common::curl(&c, &url, "2").starts_with("backend "));

    // SIGHUP with a good file: applied.
    std::fs::write(&file, config(80, (1, 3), check)).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("config applied", 2, Duration::from_secs(5));
    assert_eq!(
        list(&lbns, &pins),
        [
            ("10.200.0.11:80".to_string(), 1),
            ("10.200.0.12:80".to_string(), 3)
        ]
    );
    let m = parse_metrics(&common::curl(&lbns, &murl, "5"));
    assert_eq!(m[&key("lb_backend_weight", "10.200.0.12:80")], 3.0);

    // An HTTP check expecting another status takes a out (reload re-keys
    // the checks).
    let http404 =
        "{ kind = \"http\", path = \"/\", expect = 404, interval_ms = 200, timeout_ms = 100 }";
    std::fs::write(&file, config(80, (1, 3), check).replacen(check, http404, 1)).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("config applied", 3, Duration::from_secs(5));
    d.wait_log("weight 1 -> 0", 1, Duration::from_secs(5));
    assert!(d
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("backend down") && l.contains("status 200, expected 404")));
    assert_eq!(
        list(&lbns, &pins),
        [
            ("10.200.0.11:80".to_string(), 0),
            ("10.200.0.12:80".to_string(), 3)
        ]
    );
    let m = parse_metrics(&common::curl(&lbns, &murl, "5"));
    assert_eq!(m[&key("lb_backend_up", "10.200.0.11:80")], 0.0);
    assert_eq!(m[&key("lb_backend_up", "10.200.0.12:80")], 1.0);
    d.stop();
}

/// A client that connects to the metrics port and sends nothing never
/// delays another scrape: behind 5 idle connections (still open), a scrape
/// answers within 3 s (served one at a time with a 2 s read timeout each,
/// it took 10 s).
#[test]
fn idle_metrics_clients_do_not_delay_scrapes() {
    if !common::root_or_skip("idle_metrics_clients_do_not_delay_scrapes") {
        return;
    }
    let ns = util::veth_ns("lbd");
    // The LB's own address is reached through lo.
    ns.ip(&["link", "set", "dev", "lo", "up"]);
    let pins = common::PinDir::new("lbd");
    let (file, _tmp) = temp_file(
        "lb.toml",
        "[settings]\nmax_flows = 4096\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n",
    );
    let addr: SocketAddr = format!("{}:9100", common::LB_IP).parse().unwrap();
    let mut d = Daemon::start(&file, &ns.name, &pins, Some(&addr.to_string()));
    let _detach = Detach(ns.name.clone(), &pins);
    let name = ns.name.clone();
    let (answer, took) = std::thread::spawn(move || {
        let _in = lb::netns::NetnsGuard::enter(&name).expect("entering the namespace");
        let idle: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect"))
            .collect();
        // Let the server accept them all before the scrape.
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        // Issue 9: behind idle clients a scrape answers within 1 s (the
        // old server took 2 s per idle client before it).
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        let r = s.read_to_string(&mut answer);
        let took = t0.elapsed();
        assert!(
            r.is_ok(),
            "scrape behind 5 idle clients: {r:?} after {took:?}"
        );
        for (i, mut c) in idle.into_iter().enumerate() {
            c.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            match c.read(&mut b) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("idle connection {i} was closed during the scrape: {other:?}"),
            }
        }
        (answer, took)
    })
    .join()
    .expect("scrape thread");
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
    assert!(answer.ends_with("# EOF\n"), "{answer}");
    assert!(took < Duration::from_secs(3), "scrape took {took:?}");
    d.stop();
}

/// The Maglev table installed for each service of the instance equals the
/// one built from the weights in its backends map: no writer left a table
/// of another state behind.
fn assert_tables_agree(pins: &common::PinDir) {
    use libbpf_rs::{MapCore, MapFlags, MapHandle};
    let m = lb::maps::Maps::open(&lb::bpffs::PinDir::new(&pins.path)).expect("maps");
    let size = m.settings().expect("settings").maglev_size;
    for s in lb::service::list(&m).expect("list") {
        let input: Vec<lb::maglev::Backend> = s
            .backends
            .iter()
            .map(|b| lb::maglev::Backend {
                key: b.addr.to_string(),
                id: b.id,
                weight: b.weight,
            })
            .collect();
        let want = lb::maglev::build(&input, size).expect("maglev");
        let inner = m
            .maglev
            .lookup(&s.id.to_ne_bytes(), MapFlags::ANY)
            .expect("maglev lookup")
            .expect("a table");
        let inner = MapHandle::from_map_id(u32::from_ne_bytes(inner[..4].try_into().unwrap()))
            .expect("inner table");
        let got: Vec<u32> = (0..size)
            .map(|i| {
                let v = inner
                    .lookup(&i.to_ne_bytes(), MapFlags::ANY)
                    .unwrap()
                    .unwrap();
                u32::from_ne_bytes(v[..4].try_into().unwrap())
            })
            .collect();
        assert!(
            got == want,
            "the table of {} is not the one of its backends {:?}",
            s.service,
            s.backends
        );
    }
}

/// `lb backend set` while `lb run` applies health changes: both take the
/// instance's lock, so every manual weight stays (a health change sets
/// only the checked backend's) and every installed table is the one of
/// the weights in the maps.
#[test]
fn backend_set_during_health_changes() {
    if !common::root_or_skip("backend_set_during_health_changes") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbd");
    let lbns = topo.ns("lb");
    let port = 8080;
    let src = format!(
        "[settings]\nmax_flows = 65536\nmaglev_size = 1021\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n\n\
         [[services]]\nvip = \"10.200.0.2\"\nport = {port}\n\n\
         [[services.backends]]\naddr = \"10.200.0.11:{port}\"\n\
         check = {{ kind = \"tcp\", interval_ms = 50, timeout_ms = 40, rise = 1, fall = 1 }}\n\n\
         [[services.backends]]\naddr = \"10.200.0.12:{port}\"\n"
    );
    let (file, _tmp) = temp_file("lb.toml", &src);
    let mut a = Some(http_server(&topo.ns("a"), "a", common::A_IP, port));
    let mut d = Daemon::start(&file, &lbns, &pins, None);
    let _detach = Detach(lbns.clone(), &pins);
    let b = format!("{}:{port}", common::B_IP);
    let set = |w: u32| {
        let out = common::lb(&[
            "backend",
            "set",
            &format!("10.200.0.2:{port}"),
            &b,
            "--weight",
            &w.to_string(),
            "--netns",
            &lbns,
            "--pin-dir",
            pins.arg(),
        ]);
        assert!(out.status.success(), "backend set {w}: {out:?}");
    };
    let mut weight = 1;
    for round in 0..6 {
        // Flip a's health, and set b's weight while the daemon applies it.
        let changes = d.count("weight ");
        if a.take().is_none() {
            a = Some(http_server(&topo.ns("a"), "a", common::A_IP, port));
        }
        let t0 = Instant::now();
        while d.count("weight ") == changes || t0.elapsed() < Duration::from_millis(300) {
            weight += 1;
            set(weight);
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: no health change"
            );
        }
        let got = list(&lbns, &pins);
        assert_eq!(
            got[1],
            (b.clone(), u64::from(weight)),
            "round {round}: b's weight was lost: {got:?}"
        );
        assert_tables_agree(&pins);
    }
    drop(a);
    d.stop();
    assert!(
        d.count("failed") == 0,
        "{}",
        d.logs.lock().unwrap().join("\n")
    );
}

/// lb's announced VIPs in `ns`: addresses labelled `<iface>:lb`.
fn announced(ns: &str) -> Vec<String> {
    let out = common::run("ip", &["-n", ns, "-j", "addr", "show", "dev", "lo"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().unwrap().clone())
        .filter(|a| a["label"] == "lo:lb")
        .map(|a| a["local"].as_str().unwrap().to_string())
        .collect()
}

/// Waits (bounded) until the announced VIPs are `want`.
fn wait_announced(ns: &str, want: &[&str]) {
    let t0 = Instant::now();
    while announced(ns) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "announced {:?}, want {want:?}",
            announced(ns)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `[announce] interface = "lo"`: lb run holds the VIP on lo (labelled
/// lo:lb, for a routing daemon to export) while a backend serves it, so
/// clients reach it; withdraws it when every backend is down and
/// re-announces it when one is back; withdraws it when it stops, or keeps
/// it with on_stop = "keep" until the datapath is detached.
#[test]
fn vip_announced_while_served() {
    if !common::root_or_skip("vip_announced_while_served") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbd");
    let (c, lbns) = (topo.ns("c"), topo.ns("lb"));
    let port = 8080;
    let vip = "10.200.0.100";
    let a = http_server(&topo.ns("a"), "a", common::A_IP, port);
    let check = format!(
        "{{ kind = \"tcp\", interval_ms = {INTERVAL_MS}, timeout_ms = 150, rise = 1, fall = {FALL} }}"
    );
    let src = |on_stop: &str| {
        format!(
            "[settings]\nmax_flows = 65536\n\n[announce]\ninterface = \"lo\"\non_stop = \"{on_stop}\"\n\n\
             [[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n\n\
             [[services]]\nvip = \"{vip}\"\nport = {port}\n\n\
             [[services.backends]]\naddr = \"10.200.0.11:{port}\"\ncheck = {check}\n"
        )
    };
    let (file, _tmp) = temp_file("lb.toml", &src("withdraw"));
    assert!(announced(&lbns).is_empty());
    let mut d = Daemon::start(&file, &lbns, &pins, None);
    let _detach = Detach(lbns.clone(), &pins);
    wait_announced(&lbns, &[vip]);
    let url = format!("http://{vip}:{port}/");
    assert_eq!(common::curl(&c, &url, "2"), "backend a", "the VIP reached");

    drop(a);
    d.wait_log("backend down", 1, Duration::from_secs(5));
    wait_announced(&lbns, &[]);
    let a = http_server(&topo.ns("a"), "a", common::A_IP, port);
    d.wait_log("backend up", 1, Duration::from_secs(5));
    wait_announced(&lbns, &[vip]);
    d.stop();
    d.wait_log("withdrawn (stopping)", 1, Duration::from_secs(2));
    assert!(announced(&lbns).is_empty(), "{:?}", announced(&lbns));

    // on_stop = "keep": the datapath goes on serving, the VIP stays
    // announced; detaching the datapath withdraws it.
    std::fs::write(&file, src("keep")).unwrap();
    let mut d = Daemon::start(&file, &lbns, &pins, None);
    wait_announced(&lbns, &[vip]);
    d.stop();
    assert_eq!(announced(&lbns), [vip]);
    assert_eq!(common::curl(&c, &url, "2"), "backend a");
    let out = common::lb(&["detach", "eth0", "--netns", &lbns, "--pin-dir", pins.arg()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("announced VIP {vip}")),
        "{out:?}"
    );
    assert!(announced(&lbns).is_empty());
    drop(a);
}

/// Opens N TCP connections to HOST:PORT and holds them (nothing sent)
/// until a line on stdin; prints "held N".
const HOLD: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
print("held %d" % len(socks), flush=True)
sys.stdin.readline()
"#;

/// `scheduler = "least-conn"`: backend a holds 60 open connections when b
/// comes in (undrained by a reload); lb run then weights the Maglev table
/// towards b (ramping it up from a tenth: slow start), so most new
/// connections go to b, where plain Maglev would split them evenly.
#[test]
fn least_conn_sends_new_connections_to_the_emptier_backend() {
    if !common::root_or_skip("least_conn_sends_new_connections_to_the_emptier_backend") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbd");
    let (c, lbns) = (topo.ns("c"), topo.ns("lb"));
    let port = 8080;
    let _a = http_server(&topo.ns("a"), "a", common::A_IP, port);
    let _b = http_server(&topo.ns("b"), "b", common::B_IP, port);
    let src = |wb: u32| {
        format!(
            "[settings]\nmax_flows = 65536\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n\n\
             [[services]]\nvip = \"10.200.0.2\"\nport = {port}\nscheduler = \"least-conn\"\n\n\
             [[services.backends]]\naddr = \"10.200.0.11:{port}\"\n\n\
             [[services.backends]]\naddr = \"10.200.0.12:{port}\"\nweight = {wb}\n"
        )
    };
    let (file, _tmp) = temp_file("lb.toml", &src(0));
    let d = Daemon::start(&file, &lbns, &pins, None);
    let _detach = Detach(lbns.clone(), &pins);
    let mut held = Proc::spawn("holding client", &c, HOLD, &[common::LB_IP, "8080", "60"]);
    assert_eq!(held.line(Duration::from_secs(20)), "held 60");

    std::fs::write(&file, src(1)).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("config applied", 2, Duration::from_secs(5));
    // Two adjustments after the reload: the table follows the loads.
    let n = d.count("scheduler weights");
    d.wait_log("scheduler weights", n + 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    let url = format!("http://{}:{port}/", common::LB_IP);
    let answers: Vec<String> = (0..40).map(|_| common::curl(&c, &url, "2")).collect();
    let on_b = answers.iter().filter(|a| *a == "backend b").count();
    let logs = d.logs.lock().unwrap().join("\n");
    assert_eq!(
        answers.iter().filter(|a| a.starts_with("backend ")).count(),
        40,
        "{answers:?}"
    );
    assert!(
        on_b >= 28,
        "{on_b} of 40 new connections on b (the emptier backend):\n{logs}"
    );
    held.send("done");
}

/// A slow backend: b's namespace drops every other SYN (nftables numgen),
/// so each of its handshakes waits for the client's retransmission (1 s;
/// the latency counts from a flow's first SYN). /metrics shows b's
/// handshakes far slower than a's, and `scheduler = "latency"` then sends
/// most new connections to a.
#[test]
fn slow_backend_shows_in_handshake_latency_and_loses_share() {
    if !common::root_or_skip("slow_backend_shows_in_handshake_latency_and_loses_share") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbd");
    let (c, lbns) = (topo.ns("c"), topo.ns("lb"));
    let port = 8080;
    let _a = http_server(&topo.ns("a"), "a", common::A_IP, port);
    let _b = http_server(&topo.ns("b"), "b", common::B_IP, port);
    let (rules, _rules_tmp) = temp_file(
        "slow.nft",
        &format!(
            "table inet lbslow {{\n chain in {{\n  type filter hook input priority 0;\n  \
             tcp dport {port} tcp flags & (syn | ack) == syn numgen inc mod 2 == 0 drop\n }}\n}}\n"
        ),
    );
    common::run(
        "ip",
        &[
            "netns",
            "exec",
            &topo.ns("b"),
            "nft",
            "-f",
            rules.to_str().unwrap(),
        ],
    );
    let src = format!(
        "[settings]\nmax_flows = 65536\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n\n\
         [[services]]\nvip = \"10.200.0.2\"\nport = {port}\nscheduler = \"latency\"\n\n\
         [[services.backends]]\naddr = \"10.200.0.11:{port}\"\n\n\
         [[services.backends]]\naddr = \"10.200.0.12:{port}\"\n"
    );
    let (file, _tmp) = temp_file("lb.toml", &src);
    let metrics_addr = format!("{}:9100", common::LB_IP);
    let d = Daemon::start(&file, &lbns, &pins, Some(&metrics_addr));
    let _detach = Detach(lbns.clone(), &pins);
    let url = format!("http://{}:{port}/", common::LB_IP);
    let fetch = |n: usize| -> Vec<String> { (0..n).map(|_| common::curl(&c, &url, "3")).collect() };

    let first = fetch(16);
    assert!(first.iter().all(|r| r.starts_with("backend ")), "{first:?}");
    let text = common::curl(&lbns, &format!("http://{metrics_addr}/metrics"), "5");
    let m = parse_metrics(&text);
    let mean = |be: &str| {
        let k = |s: &str| {
            format!("lb_backend_handshake_seconds_{s}{{service=\"10.200.0.2:{port}/tcp\",backend=\"{be}:{port}\"}}")
        };
        let (sum, count) = (m.get(&k("sum")), m.get(&k("count")));
        match (sum, count) {
            (Some(s), Some(n)) if *n > 0.0 => s / n,
            _ => panic!("no handshakes of {be} in /metrics:\n{text}"),
        }
    };
    let (la, lb) = (mean(common::A_IP), mean(common::B_IP));
    eprintln!("handshake mean: a {la:.4} s, b {lb:.4} s; first answers {first:?}");
    assert!(lb > 0.5 && lb > 20.0 * la, "a {la} s, b {lb} s");

    // The scheduler has seen b's latency (each second with handshakes):
    // new connections now go mostly to a.
    d.wait_log("scheduler weights", 1, Duration::from_secs(5));
    let later = fetch(30);
    let on_b = later.iter().filter(|r| *r == "backend b").count();
    let logs = d.logs.lock().unwrap().join("\n");
    assert!(on_b <= 8, "{on_b} of 30 on the slow backend b:\n{logs}");
}
