//! `lb trace` end to end: the talk's topology, curl through lb while a
//! tracer runs; what it prints, its bounds, its refusals.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libbpf_rs::MapCore;

use common::{http_get, lb, root_or_skip, PinDir, Topo, A_IP, B_IP, CLIENT_IP, LB_IP};
use serde_json::Value;

/// Attaches the one-liner (TCP 80 on the LB's address, backends a and b).
fn attach(t: &Topo, pins: &PinDir) {
    let ns = t.ns("lb");
    let out = lb(&[
        "attach",
        "eth0",
        "--netns",
        &ns,
        "--pin-dir",
        pins.arg(),
        "--lb",
        LB_IP,
        "--backend",
        A_IP,
        "--backend",
        B_IP,
        "--port",
        "80",
    ]);
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn detach(t: &Topo, pins: &PinDir) {
    let _ = lb(&[
        "detach",
        "eth0",
        "--netns",
        &t.ns("lb"),
        "--pin-dir",
        pins.arg(),
    ]);
}

#[test]
fn trace_prints_new_flows_and_stops_when_told() {
    if !root_or_skip("trace_prints_new_flows_and_stops_when_told") {
        return;
    }
    let t = Topo::up("native");
    let pins = PinDir::new("lbtr");
    attach(&t, &pins);
    let ns = t.ns("lb");
    // The backends' MACs resolved, so that every new flow is sent at once
    // (not rewritten and passed to the kernel to resolve, pass_no_neigh).
    for b in [A_IP, B_IP] {
        common::curl(&ns, &format!("http://{b}/"), "2");
    }

    // A tracer for the next 3 new flows, in JSON.
    let tracer = Command::new(common::lb_bin())
        .args(["trace", "--netns", &ns, "--pin-dir", pins.arg()])
        .args([
            "--json",
            "--new-flows-only",
            "--count",
            "3",
            "--duration",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lb trace");
    // Tracing is on once the tracer wrote its state (every CPU's `on`, the
    // first 4 bytes); a second tracer is refused then.
    let cfg = libbpf_rs::MapHandle::from_pinned_path(pins.path.join("trace_cfg"))
        .expect("the pinned tracing state");
    let start = Instant::now();
    while !cfg
        .lookup_percpu(&0u32.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .expect("reading it")
        .unwrap_or_default()
        .iter()
        .all(|v| v[..4] != [0, 0, 0, 0])
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tracing never went on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = lb(&[
        "trace",
        "--netns",
        &ns,
        "--pin-dir",
        pins.arg(),
        "--duration",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a second tracer: {err}");
    assert!(err.contains("another lb trace"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(http_get(&t.ns("c")));
    }
    let out = tracer.wait_with_output().expect("lb trace output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lb trace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events.len(), 3, "answers {answers:?}, trace:\n{text}");
    for e in &events {
        assert_eq!(e["new_flow"], true, "{e}");
        assert_eq!(e["verdict"], "tx", "{e}");
        assert_eq!(e["reason"], "to_backend", "{e}");
        assert_eq!(e["in"]["proto"], "tcp", "{e}");
        assert_eq!(e["in"]["flags"], "S", "{e}");
        let src = e["in"]["src"].as_str().unwrap();
        assert!(src.starts_with(&format!("{CLIENT_IP}:")), "{e}");
        assert_eq!(e["in"]["dst"], format!("{LB_IP}:80"), "{e}");
        // Rewritten: from the LB's address to the backend it chose.
        let backend = e["backend"].as_str().unwrap();
        assert!(
            [format!("{A_IP}:80"), format!("{B_IP}:80")].contains(&backend.to_string()),
            "{e}"
        );
        assert_eq!(e["out"]["dst"], backend, "{e}");
        assert!(
            e["out"]["src"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{LB_IP}:")),
            "{e}"
        );
    }

    // Text lines, a filter that matches nothing, a bound in time: it ends.
    let t0 = Instant::now();
    let out = lb(&[
        "trace",
        "--netns",
        &ns,
        "--pin-dir",
        pins.arg(),
        "--reason",
        "drop_nat_full",
        "--duration",
        "0.5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Bad arguments: one clear line, exit 1 (2 for usage).
    let out = lb(&[
        "trace",
        "--netns",
        &ns,
        "--pin-dir",
        pins.arg(),
        "--reason",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--reason nope"), "{err}");
    let out = lb(&[
        "trace",
        "--netns",
        &ns,
        "--pin-dir",
        pins.arg(),
        "--sample",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    detach(&t, &pins);
}
