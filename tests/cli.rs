//! The command line's failures: each exits with the right code, prints one
//! line naming the problem on stderr, and leaves nothing behind (no pins, no
//! XDP program). Every attach happens in a namespace of the test's own, on a
//! veth pair that leads nowhere.

mod common;
#[path = "common/e2e.rs"]
mod util;

use std::process::Command;

use common::{lb_bin, root_or_skip, PinDir, A_IP, B_IP, LB_IP};
use util::*;

#[test]
fn attach_to_a_missing_interface() {
    if !root_or_skip("attach_to_a_missing_interface") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let mut args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--mode", "native"]);
    args[1] = "nosuch0".into();
    assert_error(&lb_s(&args), 1, &["no such interface", "nosuch0"]);
    assert_no_pins(&pins);
    assert_no_xdp(&ns.name, "eth0");
    assert_no_xdp(&ns.name, "eth1");
}

#[test]
fn missing_network_namespace() {
    if !root_or_skip("missing_network_namespace") {
        return;
    }
    let name = common::unique("lbnone");
    let pins = PinDir::new("lbc");
    let out = lb_s(&attach_args(&name, pins.arg(), &[A_IP, B_IP], &[]));
    assert_error(&out, 1, &["no such network namespace", &name]);
    assert_no_pins(&pins);
    let out = lb_s(&detach_args(&name, pins.arg()));
    assert_error(&out, 1, &["no such network namespace", &name]);
    assert_no_pins(&pins);
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}

#[test]
fn malformed_address_is_a_usage_error() {
    if !root_or_skip("malformed_address_is_a_usage_error") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let mut args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &[]);
    let i = args.iter().position(|a| a == "--lb").unwrap();
    args[i + 1] = "10.200.0.300".into();
    assert_usage_error(&lb_s(&args), &["10.200.0.300", "--lb"]);

    let args = attach_args(&ns.name, pins.arg(), &[A_IP, "10.200.0"], &[]);
    assert_usage_error(&lb_s(&args), &["10.200.0", "--backend"]);

    // No backend at all.
    let args = attach_args(&ns.name, pins.arg(), &[], &[]);
    assert_usage_error(&lb_s(&args), &["--backend"]);

    assert_no_pins(&pins);
    assert_no_xdp(&ns.name, "eth0");
}

#[test]
fn inconsistent_configuration_is_refused() {
    if !root_or_skip("inconsistent_configuration_is_refused") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            attach_args(&ns.name, pins.arg(), &[A_IP, B_IP, A_IP], &[]),
            vec![A_IP, "twice"],
        ),
        (
            attach_args(&ns.name, pins.arg(), &[A_IP, LB_IP], &[]),
            vec![LB_IP, "also the LB"],
        ),
        // A service and its backends are of one family.
        (
            attach_args(&ns.name, pins.arg(), &[A_IP, "fd00::11"], &[]),
            vec!["backend [fd00::11]:0 is IPv6", LB_IP, "one family"],
        ),
        (
            {
                let mut a = attach_args(&ns.name, pins.arg(), &[A_IP], &[]);
                let i = a.iter().position(|x| x == "--lb").unwrap();
                a[i + 1] = "fd00::2".into();
                let i = a.iter().position(|x| x == "--client").unwrap();
                a.drain(i..i + 2);
                a
            },
            vec![
                "backend",
                "is IPv4, service [fd00::2]:0/tcp is IPv6",
                "one family",
            ],
        ),
        (
            {
                let mut a = attach_args(&ns.name, pins.arg(), &[A_IP], &[]);
                let i = a.iter().position(|x| x == "--client").unwrap();
                a[i + 1] = "fd00::10".into();
                a
            },
            vec!["--client fd00::10 and --lb 10.200.0.2 are of two families"],
        ),
    ];
    for (args, needles) in cases {
        let line = assert_error(&lb_s(&args), 1, &needles);
        eprintln!("{line}");
        assert_no_pins(&pins);
        assert_no_xdp(&ns.name, "eth0");
    }
}

/// An XDP program lb did not attach (the pass program, attached without a
/// link as other tools do) is neither replaced by attach nor removed by
/// detach, whatever the modes.
#[test]
fn foreign_xdp_program_is_left_alone() {
    if !root_or_skip("foreign_xdp_program_is_left_alone") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    for pass_mode in ["native", "skb"] {
        let out = lb_ok(&strings(&[
            "peer-pass",
            "eth0",
            "--mode",
            pass_mode,
            "--netns",
            &ns.name,
        ]));
        let (pass_id, name) = xdp_prog(&ns.name, "eth0").expect("pass program attached");
        assert_eq!(name, "lb_pass");
        assert!(
            text(&out.stdout).contains(&format!("program id {pass_id}")),
            "{}",
            show(&out)
        );

        for mode in ["native", "skb", "auto"] {
            let args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--mode", mode]);
            assert_error(
                &lb_s(&args),
                1,
                &[
                    "eth0 already has an XDP program",
                    &format!("id {pass_id}"),
                    "lb did not attach",
                ],
            );
            assert_no_pins(&pins);
            assert_eq!(
                xdp_prog(&ns.name, "eth0"),
                Some((pass_id, "lb_pass".into()))
            );
        }

        let out = lb_s(&detach_args(&ns.name, pins.arg()));
        assert_error(&out, 1, &["did not attach", &format!("id {pass_id}")]);
        assert_no_pins(&pins);
        assert_eq!(
            xdp_prog(&ns.name, "eth0"),
            Some((pass_id, "lb_pass".into())),
            "detach touched a program lb did not attach"
        );

        lb_ok(&strings(&[
            "peer-pass",
            "eth0",
            "--remove",
            "--mode",
            pass_mode,
            "--netns",
            &ns.name,
        ]));
        assert_no_xdp(&ns.name, "eth0");
    }
}

#[test]
fn detach_when_nothing_is_attached() {
    if !root_or_skip("detach_when_nothing_is_attached") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let out = lb_s(&detach_args(&ns.name, pins.arg()));
    assert_error(&out, 1, &["nothing attached by lb on eth0"]);
    assert_no_pins(&pins);
    assert_no_xdp(&ns.name, "eth0");

    // Nor on an interface that does not exist.
    let mut args = detach_args(&ns.name, pins.arg());
    args[1] = "nosuch0".into();
    assert_error(&lb_s(&args), 1, &["nosuch0"]);
    assert_no_pins(&pins);
}

/// `bin args...` as nobody (uid 65534): setpriv, or runuser if setpriv is
/// missing.
fn as_nobody(bin: &str, args: &[String]) -> Command {
    let has_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut c;
    if has_setpriv {
        c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    } else {
        c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]);
    }
    c.arg(bin).args(args);
    c
}

#[test]
fn refuses_to_run_unprivileged() {
    if !root_or_skip("refuses_to_run_unprivileged") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    // A copy nobody can run whatever the permissions of the build tree.
    let dir = TempDir::new("lbc");
    let bin = dir.path.join("lb");
    // Copied by cp, not by this process: a write fd of ours could leak
    // into a child another test thread forks at that moment, and exec of
    // the copy would fail with ETXTBSY.
    common::run("cp", &[lb_bin(), bin.to_str().unwrap()]);
    let bin = bin.to_str().unwrap();

    for args in [
        attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--mode", "native"]),
        detach_args(&ns.name, pins.arg()),
        strings(&["status", "--netns", &ns.name, "--pin-dir", pins.arg()]),
    ] {
        let out = as_nobody(bin, &args)
            .output()
            .expect("running lb as nobody");
        assert_error(&out, 1, &["must run as root"]);
        assert_no_pins(&pins);
        assert_no_xdp(&ns.name, "eth0");
    }
}

#[test]
fn pin_dir_outside_bpffs() {
    if !root_or_skip("pin_dir_outside_bpffs") {
        return;
    }
    let ns = veth_ns("lbc");
    let dir = TempDir::new("lbc");
    // Parent exists (tmpfs or whatever /tmp is), and parent missing.
    for pin_dir in [dir.path.join("x"), dir.path.join("missing/x")] {
        let p = pin_dir.to_str().unwrap();
        let out = lb_s(&attach_args(&ns.name, p, &[A_IP, B_IP], &[]));
        assert_error(&out, 1, &[p, "not on a bpf filesystem"]);
        assert!(!pin_dir.exists(), "{p} was created");
        assert!(!dir.path.join("missing").exists());
        assert_no_xdp(&ns.name, "eth0");
        let out = lb_s(&detach_args(&ns.name, p));
        assert_error(&out, 1, &[p, "not on a bpf filesystem"]);
    }
    assert_eq!(std::fs::read_dir(&dir.path).unwrap().count(), 0);
}

/// bpffs is not mounted and cannot be: in a private mount namespace of our
/// own, /sys/fs/bpf unmounted and CAP_SYS_ADMIN dropped (still uid 0).
#[test]
fn bpffs_not_mountable() {
    if !root_or_skip("bpffs_not_mountable") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--mode", "native"]);
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "umount -l /sys/fs/bpf && \
             exec setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin \"$0\" \"$@\"",
        )
        .arg(lb_bin())
        .args(&args)
        .output()
        .expect("unshare");
    assert_error(
        &out,
        1,
        &["bpffs is not mounted at /sys/fs/bpf", "mounting it failed"],
    );
    assert_no_pins(&pins);
    assert_no_xdp(&ns.name, "eth0");
    let fs = nix::sys::statfs::statfs("/sys/fs/bpf").expect("statfs /sys/fs/bpf");
    assert_eq!(
        fs.filesystem_type(),
        nix::sys::statfs::BPF_FS_MAGIC,
        "the host's bpffs is gone"
    );
}

/// Pins live in the host's bpffs, shared by every namespace, and ifindexes
/// repeat across namespaces: a pin of namespace x used with `--netns y` must
/// be refused, not act on x.
#[test]
fn pins_of_another_namespace_are_refused() {
    if !root_or_skip("pins_of_another_namespace_are_refused") {
        return;
    }
    let x = veth_ns("lbc");
    let y = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    // The trap: the same ifindex on both sides.
    assert_eq!(ifindex(&x.name, "eth0"), ifindex(&y.name, "eth0"));
    lb_ok(&attach_args(
        &x.name,
        pins.arg(),
        &[A_IP, B_IP],
        &["--mode", "native"],
    ));
    let (prog, _) = xdp_prog(&x.name, "eth0").expect("attached in x");

    let out = lb_s(&attach_args(
        &y.name,
        pins.arg(),
        &[A_IP],
        &["--mode", "native"],
    ));
    assert_eq!(out.status.code(), Some(1), "attach in y:\n{}", show(&out));
    assert_eq!(xdp_prog(&x.name, "eth0"), Some((prog, "lb_xdp".into())));
    assert_no_xdp(&y.name, "eth0");

    let out = lb_s(&detach_args(&y.name, pins.arg()));
    assert_eq!(out.status.code(), Some(1), "detach in y:\n{}", show(&out));
    assert_eq!(xdp_prog(&x.name, "eth0"), Some((prog, "lb_xdp".into())));

    lb_ok(&detach_args(&x.name, pins.arg()));
    assert_no_xdp(&x.name, "eth0");
}

/// Services and backends: every bad input gives one line, a non-zero exit,
/// and changes nothing (the service list is the same before and after).
#[test]
fn service_errors_change_nothing() {
    if !root_or_skip("service_errors_change_nothing") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let place = |mut a: Vec<String>| {
        a.extend(strings(&["--netns", &ns.name, "--pin-dir", pins.arg()]));
        a
    };
    // Before any instance exists.
    assert_error(
        &lb_s(&place(strings(&["service", "add", "10.200.0.2:80"]))),
        1,
        &["no lb instance"],
    );
    lb_ok(&place(strings(&["attach", "eth0", "--max-flows", "4096"])));
    lb_ok(&place(strings(&["service", "add", "10.200.0.2:80"])));
    lb_ok(&place(strings(&[
        "backend",
        "add",
        "10.200.0.2:80",
        "10.200.0.11:80",
    ])));
    for (port, mode) in [("85", "dsr"), ("86", "ipip")] {
        lb_ok(&place(strings(&[
            "service",
            "add",
            &format!("10.200.0.2:{port}"),
            "--mode",
            mode,
        ])));
    }
    let list = |_: ()| text(&lb_ok(&place(strings(&["list", "--json"]))).stdout);
    let before = list(());

    let errors: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["service", "add", "10.200.0.2:80"],
            1,
            vec!["already exists"],
        ),
        (
            vec!["service", "del", "10.200.0.2:81"],
            1,
            vec!["no such service", "10.200.0.2:81/tcp"],
        ),
        (
            vec![
                "attach",
                "eth0",
                "--lb",
                "10.200.0.2",
                "--backend",
                "10.200.0.11",
                "--port",
                "0",
            ],
            2,
            vec!["0"],
        ),
        (
            vec!["service", "add", "10.200.0.256:80"],
            2,
            vec!["10.200.0.256:80"],
        ),
        (
            vec!["service", "add", "255.255.255.255:80"],
            1,
            vec!["not a unicast address"],
        ),
        (
            vec!["service", "add", "10.200.0.2:82", "--mode", "gue"],
            2,
            vec!["'gue'", "--mode", "possible values: nat, dsr, ipip"],
        ),
        // A direct-mode backend the LB cannot send to the mode's way: off
        // its links (DSR), or with no route (IPIP; the namespace has none
        // beyond its /24).
        (
            vec!["backend", "add", "10.200.0.2:85", "10.201.5.5:85"],
            1,
            vec!["backend 10.201.5.5 of a DSR service is on none of this host's links"],
        ),
        (
            vec!["backend", "add", "10.200.0.2:86", "10.201.5.5:86"],
            1,
            vec!["backend 10.201.5.5 of an IPIP service is unreachable"],
        ),
        (
            vec!["service", "add", "10.200.0.2:82", "--scheduler", "rr"],
            2,
            vec!["'rr'", "--scheduler", "possible values: maglev"],
        ),
        (
            vec![
                "service",
                "add",
                "10.200.0.2:83",
                "--affinity-timeout",
                "60",
            ],
            1,
            vec!["service 10.200.0.2:83/tcp: an affinity timeout needs affinity client-ip"],
        ),
        (
            vec![
                "service",
                "add",
                "10.200.0.2:83",
                "--affinity",
                "client-ip",
                "--affinity-timeout",
                "70000",
            ],
            1,
            vec!["affinity timeout 70000s out of range 1..=65535"],
        ),
        (
            vec![
                "service",
                "add",
                "10.200.0.2:83",
                "--affinity-timeout",
                "5m",
            ],
            2,
            vec!["'5m'", "--affinity-timeout"],
        ),
        (
            vec!["attach", "eth0", "--handshake-latency", "maybe"],
            2,
            vec!["'maybe' is not on or off", "--handshake-latency"],
        ),
        (
            vec!["backend", "add", "[fd00::2]:80", "10.200.0.11:80"],
            1,
            vec!["backend 10.200.0.11:80 is IPv4, service [fd00::2]:80/tcp is IPv6"],
        ),
        (
            vec!["backend", "add", "10.200.0.2:80", "[fd00::11]:80"],
            1,
            vec![
                "backend [fd00::11]:80 is IPv6, service 10.200.0.2:80/tcp is IPv4",
                "one family",
            ],
        ),
        (
            vec![
                "backend",
                "set",
                "10.200.0.2:80",
                "[fd00::11]:80",
                "--weight",
                "2",
            ],
            1,
            vec!["[fd00::11]:80", "one family"],
        ),
        (
            vec!["backend", "add", "10.200.0.2:81", "10.200.0.12:80"],
            1,
            vec!["no such service"],
        ),
        (
            vec!["backend", "add", "10.200.0.2:80", "10.200.0.11:80"],
            1,
            vec!["already belongs"],
        ),
        (
            vec![
                "backend",
                "add",
                "10.200.0.2:80",
                "10.200.0.12:80",
                "--weight",
                "10001",
            ],
            1,
            vec!["weight 10001 out of range"],
        ),
        (
            vec!["backend", "add", "10.200.0.2:80", "10.200.0.12"],
            2,
            vec!["10.200.0.12"],
        ),
        (
            vec![
                "backend",
                "set",
                "10.200.0.2:80",
                "10.200.0.12:80",
                "--weight",
                "2",
            ],
            1,
            vec!["no backend 10.200.0.12:80"],
        ),
        (
            vec!["backend", "del", "10.200.0.2:80", "10.200.0.12:80"],
            1,
            vec!["no backend"],
        ),
        (
            vec![
                "backend",
                "add",
                "10.200.0.2:80",
                "10.200.0.12:80",
                "--proto",
                "udp",
            ],
            1,
            vec!["no such service", "udp"],
        ),
    ];
    for (args, code, needles) in errors {
        let out = lb_s(&place(strings(&args)));
        if code == 2 {
            assert_usage_error(&out, &needles);
        } else {
            assert_error(&out, code, &needles);
        }
        assert_eq!(list(()), before, "{args:?} changed the services");
    }

    // A NAT port range inside the host's ephemeral ports is refused when
    // the instance is created.
    lb_ok(&place(strings(&["detach", "eth0"])));
    assert_error(
        &lb_s(&place(strings(&[
            "attach",
            "eth0",
            "--nat-ports",
            "40000-41000",
        ]))),
        1,
        &["overlaps the host's ephemeral ports"],
    );
    assert_no_pins(&pins);
    assert_no_xdp(&ns.name, "eth0");
}

/// `--snat`: an address that is not the LB's, one given twice, one that is
/// no source address, IPv6 or not an address: one clear line, nothing
/// attached or pinned. The LB's own addresses are taken, and `lb status`
/// shows their ports: the NAT ranges on eth0 (the kernel may pick it for
/// the host's own connections), every port from 1024 on `lo`.
#[test]
fn snat_addresses_are_checked() {
    if !root_or_skip("snat_addresses_are_checked") {
        return;
    }
    let ns = veth_ns("lbc");
    ns.ip(&["addr", "add", "10.200.7.1/32", "dev", "lo"]);
    let pins = PinDir::new("lbc");
    for (snat, needles) in [
        (
            "10.200.9.9",
            &["10.200.9.9", "not an address of this host"][..],
        ),
        ("10.200.0.2,10.200.0.2", &["10.200.0.2", "twice"][..]),
        ("0.0.0.0", &["0.0.0.0", "cannot be a source address"][..]),
    ] {
        let args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--snat", snat]);
        assert_error(&lb_s(&args), 1, needles);
        assert_no_pins(&pins);
        assert_no_xdp(&ns.name, "eth0");
    }
    let args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--snat", "fd00::1"]);
    assert_error(
        &lb_s(&args),
        1,
        &["SNAT address fd00::1 is not an address of this host"],
    );
    assert_no_pins(&pins);
    assert_no_xdp(&ns.name, "eth0");
    let args = attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &["--snat", "10.200.0"]);
    assert_usage_error(&lb_s(&args), &["10.200.0", "--snat", "not an IP address"]);
    assert_no_pins(&pins);

    let args = attach_args(
        &ns.name,
        pins.arg(),
        &[A_IP, B_IP],
        &["--snat", &format!("{LB_IP},10.200.7.1")],
    );
    lb_ok(&args);
    let st = status(&ns.name, &pins);
    let snat = st["snat"].as_array().expect("snat in lb status --json");
    assert_eq!(snat.len(), 2, "{st:#}");
    assert_eq!(snat[0]["addr"], LB_IP, "{st:#}");
    assert_eq!(snat[0]["ports"], "1024-32767,61000-65535", "{st:#}");
    assert_eq!(snat[1]["addr"], "10.200.7.1", "{st:#}");
    assert_eq!(snat[1]["ports"], "1024-65535", "{st:#}");
    lb_ok(&detach_args(&ns.name, pins.arg()));
}

/// A writer finding the instance's lock held says it waits (one line
/// naming the holder), then gives up after LB_LOCK_WAIT with one error line
/// and changes nothing; one that gets the lock within the wait goes on.
/// Readers never wait.
#[test]
fn second_writer_waits_then_gives_up() {
    if !root_or_skip("second_writer_waits_then_gives_up") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let place = |a: &[&str]| {
        let mut a = strings(a);
        a.extend(strings(&["--netns", &ns.name, "--pin-dir", pins.arg()]));
        a
    };
    lb_ok(&place(&["attach", "eth0", "--max-flows", "4096"]));
    lb_ok(&place(&["service", "add", "10.200.0.2:80"]));
    let list = || text(&lb_ok(&place(&["list", "--json"])).stdout);
    let before = list();

    let held = lb::lock::InstanceLock::acquire(
        &lb::bpffs::PinDir::new(&pins.path),
        std::time::Duration::from_secs(1),
        |l| panic!("the lock is not free: {l}"),
    )
    .expect("taking the lock");
    let add = place(&["backend", "add", "10.200.0.2:80", "10.200.0.11:80"]);
    let t0 = std::time::Instant::now();
    let out = Command::new(lb_bin())
        .args(&add)
        .env("LB_LOCK_WAIT", "0.5")
        .output()
        .expect("lb");
    assert!(t0.elapsed() >= std::time::Duration::from_millis(500));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(out.stdout.is_empty(), "{}", show(&out));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    let me = format!("pid {}", std::process::id());
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("lb: waiting for another lb command")
            && lines[0].contains(&me)
            && lines[0].contains(pins.arg()),
        "{err}"
    );
    assert!(
        lines[1].starts_with("lb: error: ")
            && lines[1].contains(&me)
            && lines[1].contains("gave up, nothing changed"),
        "{err}"
    );
    // Readers do not take the lock.
    assert_eq!(list(), before, "a writer that gave up changed the services");

    // Within the wait: it goes on once the lock is released.
    let mut child = Command::new(lb_bin())
        .args(&add)
        .env("LB_LOCK_WAIT", "20")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lb");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("lb: waiting for"), "{first}");
    drop(held);
    let out = child.wait_with_output().expect("lb");
    assert!(out.status.success(), "{}", show(&out));
    assert!(list().contains("10.200.0.11:80"), "{}", list());
    lb_ok(&place(&["detach", "eth0"]));
    assert_no_pins(&pins);
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", show(out)))
}

/// The service part of a JSON object: the same `vip`, `port`, `proto` (and
/// `id`) keys wherever a service appears.
fn svc_of(v: &serde_json::Value) -> (String, u64, String, u64) {
    (
        v["vip"].as_str().expect("vip").to_string(),
        v["port"].as_u64().expect("port"),
        v["proto"].as_str().expect("proto").to_string(),
        v["id"].as_u64().expect("id"),
    )
}

/// `--json` shapes scripts rely on (README, "JSON output"), and
/// `--netns`/`--pin-dir`/`--json` accepted before or after the subcommand.
#[test]
fn json_shapes() {
    if !root_or_skip("json_shapes") {
        return;
    }
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let global = strings(&["--netns", &ns.name, "--pin-dir", pins.arg(), "--json"]);
    let before = |a: &[&str]| {
        let mut v = global.clone();
        v.extend(strings(a));
        v
    };
    let after = |a: &[&str]| {
        let mut v = strings(a);
        v.extend(global.clone());
        v
    };

    // attach: what it did, the one-liner's service and backends with ids.
    let a = json_of(&lb_ok(&before(&[
        "attach",
        "eth0",
        "--max-flows",
        "4096",
        "--lb",
        LB_IP,
        "--backend",
        A_IP,
        "--backend",
        B_IP,
    ])));
    assert_eq!(a["iface"], "eth0", "{a:#}");
    assert!(a["prog_id"].as_u64().unwrap() > 0, "{a:#}");
    assert_eq!(a["replaced"], false, "{a:#}");
    let ch = a["changes"].as_array().expect("changes");
    let ops: Vec<&str> = ch.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["add_service", "add_backend", "add_backend"], "{a:#}");
    let svc = serde_json::json!({"vip": LB_IP, "port": 0, "proto": "tcp"});
    assert_eq!(ch[0]["service"], svc, "{a:#}");
    assert_eq!(ch[1]["service"], svc, "{a:#}");
    assert_eq!(ch[1]["backend"], format!("{A_IP}:0"), "{a:#}");
    assert!(ch[0]["id"].is_u64() && ch[1]["id"].is_u64(), "{a:#}");

    // One service shape in list, stats, status.
    let list = json_of(&lb_ok(&after(&["list"])));
    let stats = json_of(&lb_ok(&after(&["stats"])));
    let status = json_of(&lb_ok(&before(&["status"])));
    let s = svc_of(&list[0]);
    assert_eq!(
        s,
        (
            LB_IP.to_string(),
            0,
            "tcp".to_string(),
            ch[0]["id"].as_u64().unwrap()
        )
    );
    assert_eq!(svc_of(&stats["services"][0]), s, "{stats:#}");
    assert_eq!(svc_of(&status["services"][0]), s, "{status:#}");
    // Each carries its forwarding mode and scheduler.
    for v in [&list[0], &stats["services"][0], &status["services"][0]] {
        assert_eq!(
            (&v["mode"], &v["scheduler"], &v["affinity"]),
            (&"nat".into(), &"maglev".into(), &"none".into()),
            "{v:#}"
        );
    }
    let text_list = lb_ok(&strings(&[
        "list",
        "--netns",
        &ns.name,
        "--pin-dir",
        pins.arg(),
    ]));
    assert!(
        text(&text_list.stdout).contains(&format!(
            "{LB_IP}:0/tcp (id {}, mode nat, scheduler maglev, affinity none)",
            s.3
        )),
        "{}",
        show(&text_list)
    );
    assert_eq!(
        list[0]["backends"][0]["addr"],
        stats["services"][0]["backends"][0]["addr"]
    );
    assert!(stats["services"][0]["new_flows"].is_u64(), "{stats:#}");

    // Counters: an object keyed by name, every counter present.
    for v in [&stats, &status] {
        let c = v["counters"].as_object().expect("counters object");
        assert_eq!(c.len(), lb::stats::NAMES.len(), "{v:#}");
        for n in lb::stats::NAMES {
            assert!(
                c[*n]["packets"].is_u64() && c[*n]["bytes"].is_u64(),
                "{n}: {v:#}"
            );
        }
        assert_eq!(v["counters"]["drop_nat_full"]["packets"], 0, "{v:#}");
    }

    // backend set / service add: the changes made.
    let set = json_of(&lb_ok(&after(&[
        "backend",
        "set",
        &format!("{LB_IP}:0"),
        &format!("{B_IP}:0"),
        "--weight",
        "3",
    ])));
    assert_eq!(
        set["changes"],
        serde_json::json!([{"op": "set_weight", "service": svc, "backend": format!("{B_IP}:0"), "from": 1, "to": 3}]),
        "{set:#}"
    );
    let add = json_of(&lb_ok(&before(&[
        "service",
        "add",
        "10.200.0.3:53",
        "--proto",
        "udp",
        "--mode",
        "nat",
        "--scheduler",
        "maglev",
    ])));
    // Client affinity with a timeout: in list, text and JSON.
    lb_ok(&before(&[
        "service",
        "add",
        "10.200.0.3:443",
        "--affinity",
        "client-ip",
        "--affinity-timeout",
        "120",
    ]));
    let list = json_of(&lb_ok(&after(&["list"])));
    let aff = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["port"] == 443)
        .expect("the affinity service listed");
    assert_eq!(
        (&aff["affinity"], &aff["affinity_timeout"]),
        (&"client-ip".into(), &120.into()),
        "{list:#}"
    );
    assert!(list[0].get("affinity_timeout").is_none(), "{list:#}");
    let text_list = lb_ok(&strings(&[
        "list",
        "--netns",
        &ns.name,
        "--pin-dir",
        pins.arg(),
    ]));
    assert!(
        text(&text_list.stdout).contains("affinity client-ip timeout 120s)"),
        "{}",
        show(&text_list)
    );
    let status = lb_ok(&strings(&[
        "status",
        "--netns",
        &ns.name,
        "--pin-dir",
        pins.arg(),
    ]));
    assert!(
        text(&status.stdout).contains(", handshake latency on"),
        "{}",
        show(&status)
    );
    let status = json_of(&lb_ok(&before(&["status"])));
    assert_eq!(status["settings"]["handshake_latency"], true, "{status:#}");
    lb_ok(&before(&["service", "del", "10.200.0.3:443"]));
    assert_eq!(add["changes"][0]["op"], "add_service", "{add:#}");
    assert_eq!(add["changes"][0]["service"]["proto"], "udp", "{add:#}");
    assert!(add["changes"][0]["id"].is_u64(), "{add:#}");
    let list = json_of(&lb_ok(&after(&["list"])));
    let udp = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["proto"] == "udp")
        .expect("the UDP service listed");
    assert_eq!(
        (&udp["vip"], &udp["mode"], &udp["scheduler"]),
        (&"10.200.0.3".into(), &"nat".into(), &"maglev".into()),
        "{list:#}"
    );

    // apply: dry run and the real one.
    let dir = TempDir::new("lbc");
    let f = dir.path.join("lb.toml");
    std::fs::write(
        &f,
        format!(
            "[[services]]\nvip = \"{LB_IP}\"\nport = 80\nmode = \"nat\"\nscheduler = \"maglev\"\nbackends = [{{ addr = \"{A_IP}:80\" }}]\n"
        ),
    )
    .unwrap();
    let f = f.to_str().unwrap();
    let dry = json_of(&lb_ok(&after(&["apply", "-f", f, "--dry-run"])));
    assert_eq!(dry["dry_run"], true, "{dry:#}");
    assert_eq!(dry["applied"], false, "{dry:#}");
    let ops: Vec<&str> = dry["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        ["add_service", "add_backend", "del_service", "del_service"],
        "{dry:#}"
    );
    assert!(
        dry["changes"][0].get("id").is_none(),
        "a dry run gives no ids: {dry:#}"
    );
    let done = json_of(&lb_ok(&before(&["apply", "-f", f])));
    assert_eq!(done["applied"], true, "{done:#}");
    assert_eq!(done["file"], f, "{done:#}");
    assert!(done["changes"][1]["id"].is_u64(), "{done:#}");
    let again = json_of(&lb_ok(&before(&["apply", "-f", f])));
    assert_eq!(again["applied"], false, "{again:#}");
    assert_eq!(again["changes"], serde_json::json!([]), "{again:#}");

    // lb run has no JSON output: refused, nothing started.
    let out = lb_s(&after(&["run", "-f", f]));
    assert_error(&out, 1, &["no JSON output"]);

    // detach: what it removed.
    let d = json_of(&lb_ok(&after(&["detach", "eth0"])));
    assert_eq!(d["iface"], "eth0", "{d:#}");
    assert!(
        d["removed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().ends_with("/eth0/link")),
        "{d:#}"
    );
    assert_no_pins(&pins);
}

/// 100k entries (50k connections, each a client entry and its owner) put
/// straight into a test instance's pinned conntrack map: `lb conntrack`
/// lists exactly those connections, the library reads back exactly those
/// entries, and `lb stats` counts them as active on their backends.
#[test]
fn conntrack_lists_every_entry() {
    use lb::maps::{bytes, ip_to_be, Flow, FlowKey};
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    if !root_or_skip("conntrack_lists_every_entry") {
        return;
    }
    const CONNS: u32 = 50_000;
    let ns = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let place = strings(&["--netns", &ns.name, "--pin-dir", pins.arg()]);
    let with = |a: &[&str]| {
        let mut v = strings(a);
        v.extend(place.clone());
        v
    };
    lb_ok(&attach_args(
        &ns.name,
        pins.arg(),
        &[A_IP, B_IP],
        &["--max-flows", "100000"],
    ));
    let backends: Vec<(u32, Ipv4Addr)> = json_of(&lb_ok(&with(&["list", "--json"])))[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let a: std::net::SocketAddrV4 = b["addr"].as_str().unwrap().parse().unwrap();
            (b["id"].as_u64().unwrap() as u32, *a.ip())
        })
        .collect();
    assert_eq!(backends.len(), 2);

    let vip: Ipv4Addr = LB_IP.parse().unwrap();
    let now = lb::clock::now().unwrap();
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..CONNS {
        let client = Ipv4Addr::from(0x0a64_0000 + (i >> 8));
        let cport = 1024 + (i & 0xff) as u16;
        let nport = 1024 + (i % 60_000) as u16;
        let nat = Ipv4Addr::from(0x0a65_0000 + i / 60_000);
        let (be_id, be_ip) = backends[(i % 2) as usize];
        let key = FlowKey {
            saddr: ip_to_be(client),
            daddr: ip_to_be(vip),
            sport: cport.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        let to_backend = Flow {
            saddr: ip_to_be(nat),
            daddr: ip_to_be(be_ip),
            sport: nport.to_be(),
            dport: 80u16.to_be(),
            backend: be_id,
            svc: 0,
            dir: 0,
            created: now,
            seen: now,
            ..Default::default()
        };
        let owner_key = FlowKey {
            saddr: to_backend.daddr,
            daddr: to_backend.saddr,
            sport: to_backend.dport,
            dport: to_backend.sport,
            proto: 6,
            ..Default::default()
        };
        let owner = Flow {
            saddr: key.daddr,
            daddr: key.saddr,
            sport: key.dport,
            dport: key.sport,
            backend: be_id,
            svc: 0,
            dir: 1,
            created: now,
            seen: now,
            ..Default::default()
        };
        for (k, v) in [(key, to_backend), (owner_key, owner)] {
            keys.extend_from_slice(bytes(&k));
            values.extend_from_slice(bytes(&v));
        }
        expected.insert((
            format!("{client}:{cport}"),
            format!("{be_ip}:80"),
            format!("{nat}:{nport}"),
        ));
    }
    let ct = libbpf_rs::MapHandle::from_pinned_path(pins.path.join("conntrack")).unwrap();
    libbpf_rs::MapCore::update_batch(
        &ct,
        &keys,
        &values,
        2 * CONNS,
        libbpf_rs::MapFlags::ANY,
        libbpf_rs::MapFlags::ANY,
    )
    .unwrap();

    // The library: exactly the entries put.
    let m = lb::maps::Maps::open(&lb::bpffs::PinDir::new(&pins.path)).unwrap();
    let t = std::time::Instant::now();
    let got = lb::conntrack::entries(&m).unwrap();
    eprintln!("conntrack::entries of {}: {:?}", 2 * CONNS, t.elapsed());
    let put: BTreeSet<(Vec<u8>, Vec<u8>)> = keys
        .chunks(std::mem::size_of::<FlowKey>())
        .zip(values.chunks(std::mem::size_of::<Flow>()))
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(got.len(), put.len());
    let read: BTreeSet<(Vec<u8>, Vec<u8>)> = got
        .iter()
        .map(|(k, v, answered)| {
            assert!(answered);
            (bytes(k).to_vec(), bytes(v).to_vec())
        })
        .collect();
    assert!(read == put, "the entries read are not the entries put");
    // The fallback where the kernel refuses batches: the same entries.
    let t = std::time::Instant::now();
    let by_key: Vec<(FlowKey, Flow)> =
        lb::maps::read_typed(&m.conntrack, lb::maps::ReadMode::ByKey).unwrap();
    eprintln!("read by key of {}: {:?}", 2 * CONNS, t.elapsed());
    let by_key: BTreeSet<(Vec<u8>, Vec<u8>)> = by_key
        .iter()
        .map(|(k, v)| (bytes(k).to_vec(), bytes(v).to_vec()))
        .collect();
    assert!(
        by_key == put,
        "the entries read by key are not the entries put"
    );

    // The command: every connection once, as put.
    let t = std::time::Instant::now();
    let out = lb_ok(&with(&["conntrack", "--json"]));
    eprintln!(
        "lb conntrack --json of {CONNS} connections: {:?}",
        t.elapsed()
    );
    let conns = json_of(&out);
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), CONNS as usize);
    let listed: BTreeSet<(String, String, String)> = conns
        .iter()
        .map(|c| {
            assert_eq!(c["state"], "open", "{c}");
            assert_eq!(c["vip"], format!("{LB_IP}:80"), "{c}");
            let s = |f: &str| c[f].as_str().unwrap().to_string();
            (s("client"), s("backend"), s("nat"))
        })
        .collect();
    assert!(
        listed == expected,
        "the connections listed are not those put"
    );

    // Filters: one client port, one client's 256, a backend's half, by
    // state; --count counts what the filters keep.
    let count = |f: &[&str]| -> u64 {
        let mut a = vec!["conntrack", "--count", "--json"];
        a.extend_from_slice(f);
        json_of(&lb_ok(&with(&a)))["count"].as_u64().unwrap()
    };
    assert_eq!(count(&[]), u64::from(CONNS));
    assert_eq!(count(&["--client", "10.100.0.1:1030"]), 1);
    assert_eq!(count(&["--client", "10.100.0.1"]), 256);
    assert_eq!(
        count(&["--client", "10.100.0.1", "--vip", &format!("{LB_IP}:80")]),
        256
    );
    assert_eq!(count(&["--vip", &format!("{LB_IP}:81")]), 0);
    let (a_ip, b_ip) = (backends[0].1.to_string(), backends[1].1.to_string());
    assert_eq!(count(&["--backend", &a_ip]), u64::from(CONNS / 2));
    assert_eq!(
        count(&["--backend", &format!("{b_ip}:80"), "--client", "10.100.0.1"]),
        128
    );
    assert_eq!(count(&["--state", "open"]), u64::from(CONNS));
    assert_eq!(count(&["--state", "half-open"]), 0);
    let one = json_of(&lb_ok(&with(&[
        "conntrack",
        "--json",
        "--client",
        "10.100.0.1:1030",
    ])));
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one:#}");
    assert_eq!(one[0]["client"], "10.100.0.1:1030", "{one:#}");
    let text = String::from_utf8(lb_ok(&with(&["conntrack", "--count", "--state", "open"])).stdout)
        .unwrap();
    assert_eq!(text, format!("{CONNS}\n"));
    assert_usage_error(
        &lb_s(&with(&["conntrack", "--state", "opened"])),
        &["opened", "--state"],
    );
    assert_usage_error(
        &lb_s(&with(&["conntrack", "--client", "10.100.0"])),
        &["10.100.0", "--client"],
    );

    // Stats: each backend has its half as active connections.
    let t = std::time::Instant::now();
    let stats = json_of(&lb_ok(&with(&["stats", "--json"])));
    eprintln!(
        "lb stats --json with {CONNS} connections: {:?}",
        t.elapsed()
    );
    assert_eq!(stats["services"][0]["active_flows"], CONNS, "{stats:#}");
    for b in stats["services"][0]["backends"].as_array().unwrap() {
        assert_eq!(b["active_flows"], CONNS / 2, "{stats:#}");
    }
    // ... and the tables how full: two entries a connection, of twice
    // --max-flows; the half-open tables (sets of 3) and IPv6 ones empty.
    let sets = |n: u64| n.div_ceil(3) * 3;
    let want = serde_json::json!([
        {"table": "conntrack", "entries": 2 * CONNS, "capacity": 200_000},
        {"table": "ct_new", "entries": 0, "capacity": sets(2 * 262_144)},
        {"table": "conntrack6", "entries": 0, "capacity": 50_000},
        {"table": "ct_new6", "entries": 0, "capacity": sets(2 * 65_536)},
    ]);
    assert_eq!(stats["tables"], want, "{stats:#}");
    let text = String::from_utf8(lb_ok(&with(&["stats"])).stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "tables: conntrack 100000/200000 (50.0%), ct_new 0/524289 (0.0%)"),
        "{text}"
    );

    // Deleting one client's connections: both entries of each, the rest
    // left; without a filter, refused.
    let del = json_of(&lb_ok(&with(&[
        "conntrack",
        "--delete",
        "--json",
        "--client",
        "10.100.0.1",
    ])));
    assert_eq!(del, serde_json::json!({"deleted": 256, "entries": 512}));
    assert_eq!(count(&["--client", "10.100.0.1"]), 0);
    assert_eq!(count(&[]), u64::from(CONNS) - 256);
    assert_eq!(
        lb::conntrack::entries(&m).unwrap().len(),
        2 * CONNS as usize - 512
    );
    let out = lb_s(&with(&["conntrack", "--delete"]));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "{}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--delete needs a filter"),
        "{}",
        show(&out)
    );
    assert_eq!(count(&[]), u64::from(CONNS) - 256);

    lb_ok(&detach_args(&ns.name, pins.arg()));
    assert_no_pins(&pins);
}

/// An instance made by an earlier build, whose half-open sets are of
/// another hash (loader.rs): one whose settings hold no keys for it (seeded
/// murmur3), and one whose settings name no hash (pair-multiply-shift
/// without the finaliser). Attaching to either again is refused in one
/// line, and the running program is left as it was. The earlier settings
/// map is made from the instance's own, its keys or its hash's name zeroed.
#[test]
fn instance_of_an_earlier_build_is_refused() {
    use lb::skel::lb::types::rodata;
    use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

    if !root_or_skip("instance_of_an_earlier_build_is_refused") {
        return;
    }
    let x = veth_ns("lbc");
    let pins = PinDir::new("lbc");
    let attach = attach_args(&x.name, pins.arg(), &[A_IP, B_IP], &["--mode", "native"]);
    lb_ok(&attach);
    let (prog, _) = xdp_prog(&x.name, "eth0").expect("attached");

    let cfg = pins.path.join("config");
    let mut mine = MapHandle::from_pinned_path(&cfg).expect("the settings pin");
    let v = mine
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .expect("reading the settings")
        .expect("settings");
    let fields = [
        (
            std::mem::offset_of!(rodata, ho_key),
            std::mem::size_of::<[u64; 11]>(),
        ),
        (std::mem::offset_of!(rodata, ho_hash_id), 4),
    ];
    for (at, len) in fields {
        let mut earlier = v.clone();
        let field = &mut earlier[at..at + len];
        assert!(
            field.iter().any(|&b| b != 0),
            "this build sets {at}..+{len}"
        );
        field.fill(0);
        let mut old = MapHandle::create(
            MapType::Array,
            Some("config"),
            4,
            v.len() as u32,
            1,
            &libbpf_sys::bpf_map_create_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            },
        )
        .expect("a settings map");
        old.update(&0u32.to_ne_bytes(), &earlier, MapFlags::ANY)
            .expect("writing it");
        std::fs::remove_file(&cfg).expect("unpinning the settings");
        old.pin(&cfg).expect("pinning the earlier settings");

        let out = lb_s(&attach);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {}", show(&out));
        assert!(
            err.contains("created by an earlier lb") && err.contains("detach it first"),
            "{}",
            show(&out)
        );
        assert_eq!(xdp_prog(&x.name, "eth0"), Some((prog, "lb_xdp".into())));
        old.unpin(&cfg).expect("unpinning the earlier settings");
        mine.pin(&cfg).expect("pinning the settings back");
    }

    lb_ok(&detach_args(&x.name, pins.arg()));
    assert_no_xdp(&x.name, "eth0");
}
