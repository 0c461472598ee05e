//! The configuration file: validation messages (file:line:column and the
//! field), and `lb apply` end to end in a scripts/topo topology: apply,
//! change weights and backends, apply again; every error changes nothing;
//! a failure midway is rolled back.

mod common;

use std::path::Path;
use std::process::Output;

use serde_json::Value;

fn err_of(src: &str) -> String {
    match lb::config::parse(src, Path::new("f.toml")) {
        Ok(c) => panic!("accepted: {src}\n{c:?}"),
        Err(e) => format!("{e:#}"),
    }
}

const BASE: &str = r#"[[interfaces]]
name = "eth0"

[[services]]
vip = "10.200.0.2"
port = 80
"#;

#[test]
fn example_parses() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/lb.toml"))
        .expect("examples/lb.toml");
    // The NAT range of the example may overlap a host with an unusual
    // ephemeral range; strip it for this check.
    let src = src.replace("nat_ports = \"61000-65535\"", "");
    let c = lb::config::parse(&src, Path::new("examples/lb.toml")).expect("example");
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.services[0].backends[1].weight, 2);
    assert!(c.services[0].backends[0].check.is_some());
}

#[test]
fn validation_messages() {
    let eph = lb::settings::ephemeral_ports().unwrap();
    let overlap = format!("{}-{}", eph.start(), *eph.start() + 10);
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{BASE}colour = \"red\"\n"),
            "f.toml:7:1: unknown field `colour`",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.300:80\"\n"),
            "f.toml:8:8: services.backends.addr: '10.200.0.300:80' is not IP:PORT",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11\"\n"),
            "f.toml:8:8: services.backends.addr: '10.200.0.11' is not IP:PORT",
        ),
        (
            BASE.replace("10.200.0.2\"", "10.200.0.x\""),
            "f.toml:5:7: services.vip: '10.200.0.x' is not an IP address",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\n[[services.backends]]\naddr = \"10.200.0.11:80\"\n"),
            "f.toml:10:8: services.backends.addr: duplicate backend 10.200.0.11:80 in service 10.200.0.2:80/tcp",
        ),
        (
            format!("{BASE}\n[[services]]\nvip = \"10.200.0.2\"\nport = 80\nproto = \"tcp\"\n"),
            "f.toml:8:1: services: duplicate service 10.200.0.2:80/tcp",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\nweight = 10001\n"),
            "f.toml:9:10: services.backends.weight: weight 10001 out of range 0..=10000",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\nweight = -1\n"),
            "f.toml:9:10: services.backends.weight: weight -1 out of range 0..=10000",
        ),
        (
            format!("[settings]\nnat_ports = \"{overlap}\"\n{BASE}"),
            "f.toml:2:13: settings.nat_ports: NAT port range",
        ),
        (
            "[settings]\nmaglev_size = 100\n".to_string(),
            "f.toml:2:15: settings.maglev_size: Maglev table size 100 must be a prime",
        ),
        // One validation (Settings::validate, as for the command line);
        // its error names the field that broke a rule, at its place.
        (
            "[settings]\nmaglev_size = 65537\nudp_timeout = 0\n".to_string(),
            "f.toml:3:15: settings.udp_timeout: udp timeout 0s out of range 1..=86400",
        ),
        (
            "[settings]\nfin_timeout = 0\nmax_half_open = 10\n".to_string(),
            "f.toml:3:17: settings.max_half_open: max half-open flows 10 out of range 1024..=16777216",
        ),
        (
            "[settings]\nhandshake_latency = \"maybe\"\n".to_string(),
            "f.toml:2:21: invalid type: string \"maybe\", expected a boolean",
        ),
        (
            format!("{BASE}affinity_timeout = 60\n"),
            "f.toml:7:20: services.affinity_timeout: an affinity timeout needs affinity client-ip (this service's is none)",
        ),
        (
            format!("{BASE}affinity = \"client-ip\"\naffinity_timeout = 0\n"),
            "f.toml:8:20: services.affinity_timeout: affinity timeout 0s out of range 1..=65535",
        ),
        (
            format!("{BASE}affinity = \"client-ip\"\naffinity_timeout = -5\n"),
            "f.toml:8:20: ",
        ),
        (
            "[settings]\nsnat = [\"192.0.2.99\"]\n".to_string(),
            "f.toml:2:8: settings.snat: SNAT address 192.0.2.99 is not an address of this host",
        ),
        (
            "[settings]\nsnat = [\"10.200.0.2\", \"10.200.0.2\"]\n".to_string(),
            "f.toml:2:8: settings.snat: SNAT address 10.200.0.2 is given twice",
        ),
        (
            "[settings]\nsnat = [\"10.200.0\"]\n".to_string(),
            "f.toml:2:8: settings.snat: '10.200.0' is not an IP address",
        ),
        (
            "[[interfaces]]\nname = \"eth0\"\nmode = \"fast\"\n".to_string(),
            "f.toml:3:8: interfaces.mode: 'fast' is not one of auto, native, skb",
        ),
        (
            format!("{BASE}proto = \"sctp\"\n"),
            "f.toml:7:9: services.proto: 'sctp' is not tcp or udp",
        ),
        (
            format!("{BASE}mode = \"gre\"\n"),
            "f.toml:7:8: services.mode: 'gre' is not one of nat, dsr, ipip",
        ),
        (
            format!("{BASE}mode = \"dsr\"\n[[services.backends]]\naddr = \"10.200.0.11:8080\"\n"),
            "f.toml:9:8: services.backends.addr: backend 10.200.0.11:8080 of DSR service 10.200.0.2:80/tcp: in DSR the backend's port must be the service's (80) or 0",
        ),
        (
            "[announce]\ninterface = \"lo\"\non_stop = \"drop\"\n".to_string(),
            "f.toml:3:11: announce.on_stop: 'drop' is not one of withdraw, keep",
        ),
        (
            "[announce]\ninterface = \"a/b\"\n".to_string(),
            "f.toml:2:13: announce.interface: 'a/b' is not an interface name (at most 12 characters: lb labels its addresses <name>:lb)",
        ),
        (
            format!("{BASE}scheduler = \"rr\"\n"),
            "f.toml:7:13: services.scheduler: 'rr' is not one of maglev, least-conn, latency",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:0\"\ncheck = {{ kind = \"tcp\" }}\n"),
            "f.toml:9:9: services.backends.check: backend 10.200.0.11:0 has port 0",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\ncheck = {{ kind = \"http\", expect = 999 }}\n"),
            "services.backends.check.expect: 999 is not an HTTP status",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\ncheck = {{ kind = \"tcp\", interval_ms = 100, timeout_ms = 200 }}\n"),
            "services.backends.check.timeout_ms: longer than interval_ms",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\ncheck = {{ kind = \"icmp\" }}\n"),
            "f.toml:9:18: services.backends.check.kind: 'icmp' is not tcp or http",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\ncheck = {{ kind = \"tcp\", rise = 0 }}\n"),
            "services.backends.check.rise: 0 out of range 1..=100",
        ),
        (
            format!("{BASE}port = 81\n"),
            "f.toml:7:1: duplicate key",
        ),
        // An IPv6 DSR service takes what an IPv4 one does (here a
        // backend port it refuses); a service with backends of the other
        // family is refused by name.
        (
            format!("{}[[services.backends]]\naddr = \"[fd00::11]:8080\"\n",
                BASE.replace("\"10.200.0.2\"", "\"fd00::2\"")
                    .replace("port = 80\n", "port = 80\nmode = \"ipip\"\n")),
            "f.toml:9:8: services.backends.addr: backend [fd00::11]:8080 of IPIP service [fd00::2]:80/tcp: in IPIP the backend's port must be the service's (80) or 0",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"10.200.0.11:80\"\n[[services.backends]]\naddr = \"[fd00::11]:80\"\n"),
            "f.toml:10:8: services.backends.addr: backend [fd00::11]:80 is IPv6, service 10.200.0.2:80/tcp is IPv4: a service and its backends must be of one family",
        ),
        (
            format!("{BASE}[[services.backends]]\naddr = \"fd00::11:80\"\n"),
            "f.toml:8:8: services.backends.addr: 'fd00::11:80' is not IP:PORT (e.g. 10.0.0.1:80, [fd00::1]:80)",
        ),
        (
            "[settings]\nsnat = [\"fd00::1\"]\n".to_string(),
            "f.toml:2:8: settings.snat: SNAT address fd00::1 is not an address of this host (add it, e.g. on lo)",
        ),
    ];
    for (src, want) in cases {
        let e = err_of(&src);
        assert!(e.contains(want), "for\n{src}\nwant {want:?}\ngot  {e:?}");
    }
}

#[test]
fn mode_and_scheduler_are_read() {
    use lb::service::{FwdMode, Scheduler, SvcConf};
    let c = lb::config::parse(BASE, Path::new("f.toml")).expect("no mode, no scheduler");
    assert_eq!(c.services[0].conf, SvcConf::default());
    let src = format!("{BASE}mode = \"nat\"\nscheduler = \"maglev\"\naffinity = \"client-ip\"\n");
    let c = lb::config::parse(&src, Path::new("f.toml")).expect("all given");
    assert_eq!(
        c.services[0].conf,
        SvcConf {
            mode: FwdMode::Nat,
            scheduler: Scheduler::Maglev,
            affinity: lb::model::Affinity::ClientIp,
            affinity_timeout: None,
        }
    );
    let src = format!("{BASE}affinity = \"client-ip\"\naffinity_timeout = 300\n");
    let c2 = lb::config::parse(&src, Path::new("f.toml")).expect("a timeout");
    assert_eq!(c2.services[0].conf.affinity_timeout, Some(300));
    for (src, want) in [
        ("", true),
        ("[settings]\nhandshake_latency = false\n", false),
        ("[settings]\nhandshake_latency = true\n", true),
    ] {
        let c = lb::config::parse(src, Path::new("f.toml")).expect("settings");
        assert_eq!(
            c.settings.is_none_or(|s| s.handshake_latency),
            want,
            "{src}"
        );
    }
    let bad = format!("{BASE}affinity = \"source\"\n");
    let e = lb::config::parse(&bad, Path::new("f.toml")).unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "f.toml:7:12: services.affinity: 'source' is not one of none, client-ip"
    );
    let st = c.state(&Default::default());
    assert_eq!(st[&c.services[0].service].conf, c.services[0].conf);
}

#[test]
fn diff_orders_and_names_changes() {
    use lb::reconcile::{diff, Change, State};
    use lb::service::{Proto, Service};
    let s = |p: u16| {
        Service::new(
            format!("10.200.0.2:{p}")
                .parse::<std::net::SocketAddr>()
                .unwrap(),
            Proto::Tcp,
        )
    };
    let a = |x: &str| x.parse().unwrap();
    let mut have = State::new();
    have.insert(
        s(80),
        [(a("10.200.0.11:80"), 1), (a("10.200.0.12:80"), 1)].into(),
    );
    have.insert(s(81), [(a("10.200.0.11:81"), 1)].into());
    let mut want = State::new();
    want.insert(
        s(80),
        [(a("10.200.0.11:80"), 3), (a("10.200.0.13:80"), 1)].into(),
    );
    want.insert(s(82), [].into());
    let d = diff(&have, &want);
    let text: Vec<String> = d.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        text,
        [
            "+ backend 10.200.0.13:80 weight 1 (service 10.200.0.2:80/tcp)",
            "+ service 10.200.0.2:82/tcp",
            "~ backend 10.200.0.11:80 weight 1 -> 3 (service 10.200.0.2:80/tcp)",
            "- backend 10.200.0.12:80 (service 10.200.0.2:80/tcp)",
            "- service 10.200.0.2:81/tcp",
        ]
    );
    assert!(matches!(d[4], Change::DelService(_, ref b) if b.backends.len() == 1));
    assert!(diff(&want, &want).is_empty());
}

/// Services with their backends and weights, as `lb list --json` has them.
type Summary = Vec<(String, Vec<(String, u64)>)>;

/// An lb instance made by `lb apply` in a topology's LB namespace; detached
/// on drop.
struct Inst<'a> {
    ns: String,
    pins: &'a common::PinDir,
    dir: tempdir::Dir,
}

mod tempdir {
    /// A unique directory under /tmp, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(crate::common::unique("lbcfg"));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Inst<'_> {
    fn lb(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut a = args.to_vec();
        a.extend(["--netns", &self.ns, "--pin-dir", self.pins.arg()]);
        std::process::Command::new(common::lb_bin())
            .args(&a)
            .envs(env.iter().copied())
            .output()
            .expect("running lb")
    }

    fn apply(&self, name: &str, src: &str, env: &[(&str, &str)]) -> (bool, String, String) {
        let f = self.dir.0.join(name);
        std::fs::write(&f, src).unwrap();
        let out = self.lb(&["apply", "-f", f.to_str().unwrap()], env);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn list(&self) -> Value {
        let out = self.lb(&["list", "--json"], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// (service, [(backend, weight)]) from `lb list --json`.
    fn summary(&self) -> Summary {
        self.list()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    format!(
                        "{}:{}/{}",
                        s["vip"].as_str().unwrap(),
                        s["port"],
                        s["proto"].as_str().unwrap()
                    ),
                    s["backends"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| {
                            (
                                b["addr"].as_str().unwrap().to_string(),
                                b["weight"].as_u64().unwrap(),
                            )
                        })
                        .collect(),
                )
            })
            .collect()
    }
}

impl Drop for Inst<'_> {
    fn drop(&mut self) {
        let _ = self.lb(&["detach", "eth0"], &[]);
    }
}

fn file(backends: &[(&str, u32)], extra: &str) -> String {
    let mut s = String::from(
        "[settings]\nmax_flows = 65536\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n\n[[services]]\nvip = \"10.200.0.2\"\nport = 80\n",
    );
    for (a, w) in backends {
        s += &format!("\n[[services.backends]]\naddr = \"{a}\"\nweight = {w}\n");
    }
    s + extra
}

#[test]
fn apply_end_to_end() {
    if !common::root_or_skip("apply_end_to_end") {
        return;
    }
    let topo = common::Topo::up("native");
    let pins = common::PinDir::new("lbcfg");
    let inst = Inst {
        ns: topo.ns("lb"),
        pins: &pins,
        dir: tempdir::Dir::new(),
    };
    let (a, b) = ("10.200.0.11:80", "10.200.0.12:80");

    // Dry run of a fresh instance: the plan, nothing attached.
    let f1 = file(&[(a, 1), (b, 1)], "");
    let p = inst.dir.0.join("dry.toml");
    std::fs::write(&p, &f1).unwrap();
    let out = inst.lb(&["apply", "-f", p.to_str().unwrap(), "--dry-run"], &[]);
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && so.contains("+ interface eth0 (native mode)"),
        "{so}"
    );
    assert!(
        !pins.path.join("conntrack").exists(),
        "dry run created an instance"
    );

    // A fresh instance failing midway (after the attach and the service):
    // detached again, nothing left.
    let (ok, so, se) = inst.apply("0.toml", &f1, &[("LB_TEST_FAIL_AFTER", "2")]);
    assert!(!ok && se.contains("rolled back"), "{so}{se}");
    assert!(!pins.path.join("conntrack").exists(), "maps left behind");
    assert!(!pins.path.join("eth0/link").exists(), "link left behind");
    let link = topo_ip(&topo.ns("lb"), &["link", "show", "eth0"]);
    assert!(!link.contains("xdp"), "{link}");

    // First apply: attaches and creates everything.
    let (ok, so, se) = inst.apply("1.toml", &f1, &[]);
    assert!(ok, "{so}{se}");
    for l in [
        "+ interface eth0 (native mode)",
        "+ service 10.200.0.2:80/tcp",
        "+ backend 10.200.0.11:80 weight 1 (service 10.200.0.2:80/tcp)",
        "+ backend 10.200.0.12:80 weight 1 (service 10.200.0.2:80/tcp)",
    ] {
        assert!(so.contains(l), "missing {l:?} in {so}");
    }
    let s1 = vec![(
        "10.200.0.2:80/tcp".to_string(),
        vec![(a.to_string(), 1), (b.to_string(), 1)],
    )];
    assert_eq!(inst.summary(), s1);
    let answers: Vec<String> = (0..6).map(|_| common::http_get(&topo.ns("c"))).collect();
    assert!(
        answers.iter().all(|x| x.starts_with("backend ")),
        "{answers:?}"
    );

    // Same file again: nothing to do.
    let (ok, so, _) = inst.apply("1.toml", &f1, &[]);
    assert!(ok && so.contains("no changes"), "{so}");

    // Weights and backends change; a UDP service appears.
    let f2 = file(
        &[(a, 3)],
        "\n[[services]]\nvip = \"10.200.0.2\"\nport = 53\nproto = \"udp\"\nbackends = [{ addr = \"10.200.0.12:53\", weight = 2 }]\n",
    );
    let (ok, so, se) = inst.apply("2.toml", &f2, &[]);
    assert!(ok, "{so}{se}");
    for l in [
        "~ backend 10.200.0.11:80 weight 1 -> 3 (service 10.200.0.2:80/tcp)",
        "- backend 10.200.0.12:80 (service 10.200.0.2:80/tcp)",
        "+ service 10.200.0.2:53/udp",
        "+ backend 10.200.0.12:53 weight 2 (service 10.200.0.2:53/udp)",
    ] {
        assert!(so.contains(l), "missing {l:?} in {so}");
    }
    let s2 = vec![
        (
            "10.200.0.2:53/udp".to_string(),
            vec![("10.200.0.12:53".to_string(), 2)],
        ),
        ("10.200.0.2:80/tcp".to_string(), vec![(a.to_string(), 3)]),
    ];
    assert_eq!(inst.summary(), s2);
    for _ in 0..4 {
        assert_eq!(common::http_get(&topo.ns("c")), "backend a");
    }

    // Every error kind: the right message, and nothing changes.
    let ns_eph = common::run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{}", topo.ns("lb")),
            "cat",
            "/proc/sys/net/ipv4/ip_local_port_range",
        ],
    );
    let eph: Vec<u16> = String::from_utf8_lossy(&ns_eph.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let bad = [
        (file(&[(a, 1)], "typo = 1\n"), "unknown field `typo`"),
        (
            file(&[("10.200.0.11:99999", 1)], ""),
            "services.backends.addr: '10.200.0.11:99999' is not IP:PORT",
        ),
        (
            file(&[(a, 1), (a, 2)], ""),
            "services.backends.addr: duplicate backend 10.200.0.11:80",
        ),
        (
            file(&[(a, 20000)], ""),
            "services.backends.weight: weight 20000 out of range 0..=10000",
        ),
        (
            file(&[(a, 1)], "").replace(
                "max_flows = 65536",
                &format!(
                    "max_flows = 65536\nnat_ports = \"{}-{}\"",
                    eph[0] + 1,
                    eph[0] + 100
                ),
            ),
            "settings.nat_ports: NAT port range",
        ),
        (
            file(&[(a, 1)], "").replace("max_flows = 65536", "max_flows = 131072"),
            "bad5.toml:1:1: settings: [settings] differ",
        ),
        (
            file(&[(a, 1)], "").replace("\"eth0\"", "\"nosuch0\""),
            "bad6.toml:5:8: interfaces.name: interface nosuch0",
        ),
        (
            file(&[(a, 1), ("[fd00::11]:80", 1)], ""),
            "bad7.toml:17:8: services.backends.addr: backend [fd00::11]:80 is IPv6, service 10.200.0.2:80/tcp is IPv4: a service and its backends must be of one family",
        ),
        (
            file(&[(a, 1)], "\n[[services]]\nvip = \"fd00::2\"\nport = 80\nmode = \"dsr\"\n[[services.backends]]\naddr = \"[fd00::11]:81\"\n"),
            "bad8.toml:21:8: services.backends.addr: backend [fd00::11]:81 of DSR service [fd00::2]:80/tcp: in DSR the backend's port must be the service's (80) or 0",
        ),
        (
            file(&[(a, 1)], "").replace("port = 80\n", "port = 80\nmode = \"gre\"\n"),
            "bad9.toml:11:8: services.mode: 'gre' is not one of nat, dsr, ipip",
        ),
    ];
    for (i, (src, want)) in bad.iter().enumerate() {
        let (ok, so, se) = inst.apply(&format!("bad{i}.toml"), src, &[]);
        assert!(!ok, "bad{i} accepted: {so}");
        assert!(se.contains(want), "bad{i}: want {want:?}, got {se}");
        assert_eq!(
            se.trim_end().lines().count(),
            1,
            "bad{i}: not one line: {se}"
        );
        assert!(
            se.contains(&format!("bad{i}.toml")),
            "bad{i}: no file name in {se}"
        );
        assert_eq!(inst.summary(), s2, "bad{i} changed the maps");
    }

    // A failure midway (after two of the changes) is rolled back.
    let (ok, so, se) = inst.apply("3.toml", &f1, &[("LB_TEST_FAIL_AFTER", "2")]);
    assert!(!ok, "{so}");
    assert!(se.contains("rolled back"), "{se}");
    assert_eq!(inst.summary(), s2, "rollback left changes");

    // lb stats --watch: bounded by --count, a table per interval.
    let out = inst.lb(
        &["stats", "--watch", "--interval", "0.2", "--count", "2"],
        &[],
    );
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(so.matches("10.200.0.2:80/tcp").count(), 2, "{so}");
    assert_eq!(so.matches("to_backend").count(), 2, "{so}");

    // And the same file without the failure applies.
    let (ok, so, se) = inst.apply("3.toml", &f1, &[]);
    assert!(ok, "{so}{se}");
    assert_eq!(inst.summary(), s1);
}

fn topo_ip(ns: &str, args: &[&str]) -> String {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&common::run("ip", &a).stdout).into_owned()
}

/// File `i` of the concurrency test: services on one VIP, ports and
/// backends shifted by `i`, so that any two files share some services and
/// backends and differ in others.
fn racing_file(i: u16) -> (String, Summary) {
    let mut src = String::from(
        "[settings]\nmax_flows = 4096\nmaglev_size = 1021\n\n[[interfaces]]\nname = \"eth0\"\nmode = \"native\"\n",
    );
    let mut want = Vec::new();
    for port in 8080 + i..8083 + i {
        src += &format!("\n[[services]]\nvip = \"10.204.0.100\"\nport = {port}\n");
        let mut bes = Vec::new();
        for b in 1 + i..3 + i + port % 2 {
            let w = u64::from((b + port) % 3 + 1);
            src += &format!("[[services.backends]]\naddr = \"10.204.0.{b}:80\"\nweight = {w}\n");
            bes.push((format!("10.204.0.{b}:80"), w));
        }
        bes.sort();
        want.push((format!("10.204.0.100:{port}/tcp"), bes));
    }
    (src, want)
}

/// Two, then five `lb apply` of different files started at the same moment,
/// 20 rounds each: every one succeeds (they take turns), the instance ends
/// exactly as one of the files says, and no two services or backends share
/// an id. (Without the instance lock they planned against the same state
/// and left a mix of files with shared ids.)
#[test]
fn concurrent_applies_take_turns() {
    if !common::root_or_skip("concurrent_applies_take_turns") {
        return;
    }
    let ns = common::Netns::new("lbcfg");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "eth1", "up"]);
    let pins = common::PinDir::new("lbcfg");
    let inst = Inst {
        ns: ns.name.clone(),
        pins: &pins,
        dir: tempdir::Dir::new(),
    };
    let files: Vec<_> = (0..5u16)
        .map(|i| {
            let (src, want) = racing_file(i);
            let p = inst.dir.0.join(format!("race{i}.toml"));
            std::fs::write(&p, src).unwrap();
            (p, want)
        })
        .collect();
    for n in [2, 5] {
        for round in 0..20 {
            // Each round starts from another file's state.
            let order: Vec<usize> = (0..n).map(|k| (k + round) % n).collect();
            let children: Vec<_> = order
                .iter()
                .map(|&i| {
                    let mut a = vec![
                        "apply".to_string(),
                        "-f".into(),
                        files[i].0.to_str().unwrap().into(),
                    ];
                    a.extend(["--netns".into(), inst.ns.clone()]);
                    a.extend(["--pin-dir".into(), pins.arg().to_string()]);
                    std::process::Command::new(common::lb_bin())
                        .args(&a)
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .expect("lb apply")
                })
                .collect();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{n} at once, round {round}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let got = inst.summary();
            assert!(
                files[..n].iter().any(|(_, want)| *want == got),
                "{n} at once, round {round}: the instance matches no file: {got:?}"
            );
            let list = inst.list();
            let svc_ids: Vec<u64> = list
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_u64().unwrap())
                .collect();
            let be_ids: Vec<u64> = list
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["backends"].as_array().unwrap().clone())
                .map(|b| b["id"].as_u64().unwrap())
                .collect();
            for (what, ids) in [("service", svc_ids), ("backend", be_ids)] {
                let uniq: std::collections::BTreeSet<_> = ids.iter().collect();
                assert_eq!(
                    uniq.len(),
                    ids.len(),
                    "{n} at once, round {round}: two {what}s share an id: {list:#}"
                );
            }
        }
    }
}

/// `--snat` (lb apply, lb run) puts this node's SNAT addresses in place of
/// the file's `settings.snat` and keeps the file's other settings, so that
/// the nodes of a scale-out run one file; an address that is not the
/// node's is one error line naming `--snat`, and nothing is made.
#[test]
fn snat_flag_overrides_the_files() {
    if !common::root_or_skip("snat_flag_overrides_the_files") {
        return;
    }
    let ns = common::Netns::new("lbcfg");
    ns.ip(&[
        "link", "add", "name", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    for i in ["eth0", "eth1", "lo"] {
        ns.ip(&["link", "set", "dev", i, "up"]);
    }
    ns.ip(&["addr", "add", "10.200.77.2/24", "dev", "eth0"]);
    ns.ip(&["addr", "add", "10.200.78.1/32", "dev", "lo"]);
    let pins = common::PinDir::new("lbcfg");
    let inst = Inst {
        ns: ns.name.clone(),
        pins: &pins,
        dir: tempdir::Dir::new(),
    };
    let src = "[settings]\nmax_flows = 65536\nmaglev_size = 1021\nsnat = [\"10.200.77.2\"]\n\n\
               [[interfaces]]\nname = \"eth0\"\nmode = \"skb\"\n";
    let f = inst.dir.0.join("lb.toml");
    std::fs::write(&f, src).unwrap();
    let f = f.to_str().unwrap();

    let out = inst.lb(&["apply", "-f", f, "--snat", "10.200.78.9"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().count() == 1 && err.contains("--snat") && err.contains("10.200.78.9"),
        "{err}"
    );
    assert!(
        !pins.path.join("conntrack").exists(),
        "an instance was made"
    );

    let out = inst.lb(&["apply", "-f", f, "--snat", "10.200.78.1"], &[]);
    assert!(out.status.success(), "{out:?}");
    let st: Value =
        serde_json::from_slice(&inst.lb(&["status", "--json"], &[]).stdout).expect("status");
    assert_eq!(st["snat"][0]["addr"], "10.200.78.1", "{st:#}");
    assert_eq!(st["snat"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(st["settings"]["maglev_size"], 1021, "{st:#}");
    // The same file and node again: the same settings, nothing to do; the
    // file's own SNAT address is now another instance's settings.
    let out = inst.lb(&["apply", "-f", f, "--snat", "10.200.78.1"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no changes"),
        "{out:?}"
    );
    let out = inst.lb(&["apply", "-f", f], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = inst.lb(&["detach", "eth0"], &[]);
    assert!(out.status.success(), "{out:?}");
}
