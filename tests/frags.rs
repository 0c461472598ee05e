//! Fragmented datagrams through lb end to end: UDP exchanges whose
//! datagrams (3,000 bytes) exceed the 1,500-byte MTU both ways, so the
//! client's IP layer sends each query in two fragments and the backend's
//! each answer. Only the first fragment of each carries the ports; lb
//! forwards the later one after it (bpf/frag.h). Native and skb mode; the
//! receivers verify checksums.

mod common;
#[path = "common/services.rs"]
mod svc;

use std::time::Duration;

use svc::*;

/// Exchanges, each on its own socket (a flow of its own).
const EXCHANGES: usize = 100;
/// Bytes of each query; the answer is the backend's name, "|" and the query.
const SIZE: usize = 3000;

/// The client: EXCHANGES sockets, one query each (resent after 1 s, up to
/// 3 times), the answer checked; prints {"event": "done", "ok", "retries",
/// "errors": [first 10]}. Args: HOST PORT.
const BIG_UDP: &str = r#"
import json, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
n, size = int(sys.argv[3]), int(sys.argv[4])
ok, retries, errors, lock = [0], [0], [], threading.Lock()
def one(i):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = (b"%06d" % i) * (size // 6)
    try:
        for _ in range(3):
            s.settimeout(1.0)
            s.sendto(payload, (host, port))
            try:
                data, _ = s.recvfrom(65535)
            except socket.timeout:
                with lock:
                    retries[0] += 1
                continue
            if data.partition(b"|")[2] != payload:
                raise ValueError("answer mismatch (%d bytes)" % len(data))
            with lock:
                ok[0] += 1
            return
        raise TimeoutError("no answer to 3 queries")
    except Exception as e:
        with lock:
            errors.append("%d: %s" % (i, e))
    finally:
        s.close()
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in ts:
    t.start()
for t in ts:
    t.join(20)
print(json.dumps({"event": "done", "ok": ok[0], "retries": retries[0], "errors": errors[:10]}), flush=True)
"#;

fn big_udp(test: &str, mode: &str) {
    if !common::root_or_skip(test) {
        return;
    }
    let net = Net::up(mode, 1, false);
    let _udp = servers(&net, UDP_ECHO, 7);
    let lb = Lb::attach(&net);
    let (a, b) = (net.backend_ip("a"), net.backend_ip("b"));
    let echo = format!("{VIP}:5353");
    lb.service(
        &echo,
        "udp",
        &[(&format!("{a}:7"), 1), (&format!("{b}:7"), 1)],
    );
    let mut c = Proc::spawn(
        "big-datagram client",
        &net.ns("c"),
        BIG_UDP,
        &[VIP, "5353", &EXCHANGES.to_string(), &SIZE.to_string()],
    );
    let done = c.event("done", Duration::from_secs(60));
    let st = lb.stats();
    eprintln!(
        "{mode}: {done}; lb fragment {} pass_fragment {}",
        counter(&st, "fragment"),
        counter(&st, "pass_fragment")
    );
    assert_eq!(done["ok"], EXCHANGES, "{done:#}");
    // Every query and every answer had a later fragment, forwarded by lb.
    assert!(counter(&st, "fragment") >= 2 * EXCHANGES as u64, "{st:#}");
    check_checksums(&net);
}

#[test]
fn fragmented_datagrams_both_ways_native() {
    big_udp("fragmented_datagrams_both_ways_native", "native");
}

#[test]
fn fragmented_datagrams_both_ways_skb() {
    big_udp("fragmented_datagrams_both_ways_skb", "skb");
}
