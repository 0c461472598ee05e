//! contrib/grafana/lb.json asks Prometheus only for metrics lb serves: every
//! `lb_*` name in its queries is in what `lb run --metrics` renders for an
//! instance with a service and a checked backend.

mod common;
#[path = "common/e2e.rs"]
mod util;

use std::collections::BTreeSet;

use common::{root_or_skip, PinDir, A_IP, B_IP};
use util::*;

/// `lb_...` names in `text` (queries or the metrics' text format).
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("lb_") {
        let s = i + at;
        let start_ok = s == 0 || !(b[s - 1].is_ascii_alphanumeric() || b[s - 1] == b'_');
        let mut e = s;
        while e < b.len() && (b[e].is_ascii_alphanumeric() || b[e] == b'_') {
            e += 1;
        }
        if start_ok {
            out.insert(text[s..e].to_string());
        }
        i = e;
    }
    out
}

#[test]
fn the_dashboard_asks_only_for_metrics_lb_serves() {
    if !root_or_skip("the_dashboard_asks_only_for_metrics_lb_serves") {
        return;
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/grafana/lb.json"
        ))
        .expect("contrib/grafana/lb.json"),
    )
    .expect("the dashboard is JSON");
    let mut queries = String::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            queries += t["expr"].as_str().unwrap_or("");
            queries += "\n";
        }
    }
    for v in dash["templating"]["list"].as_array().expect("variables") {
        queries += v["definition"].as_str().unwrap_or("");
        queries += "\n";
    }
    let asked = names(&queries);
    assert!(asked.len() >= 10, "{asked:?}");

    let ns = veth_ns("lbg");
    let pins = PinDir::new("lbg");
    lb_ok(&attach_args(&ns.name, pins.arg(), &[A_IP, B_IP], &[]));
    let _guard = lb::netns::NetnsGuard::enter(&ns.name).expect("entering the namespace");
    let m = lb::maps::Maps::open(&lb::bpffs::PinDir::new(&pins.path)).expect("the maps");
    let health: lb::metrics::HealthView = Default::default();
    let svc = lb::service::list(&m).expect("services")[0].service;
    let addr: std::net::SocketAddr = format!("{A_IP}:0").parse().unwrap();
    health.lock().unwrap().insert(
        (svc, addr),
        lb::metrics::HealthInfo {
            up: true,
            latency: Some(std::time::Duration::from_millis(1)),
        },
    );
    let text = lb::metrics::render(&m, &health).expect("rendering the metrics");
    drop(_guard);
    let served = names(&text);
    let missing: Vec<&String> = asked.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for {missing:?}; lb serves {served:?}"
    );
    lb_ok(&detach_args(&ns.name, pins.arg()));
}
