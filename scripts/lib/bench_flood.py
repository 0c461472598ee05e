#!/usr/bin/env python3
"""The SYN-flood scenario of scripts/bench: three tools, each bounded in
time and count, each run by scripts/bench inside a client namespace (in_ns).

    bench_flood.py hold  --target IP:PORT --conns N --signal FILE --out FILE [--max-wait S]
        opens N keep-alive HTTP connections, asks once on each, writes
        {"held", "ok_before"} to FILE and waits (at most S seconds) for the
        file SIGNAL to appear; then asks once more on every connection (3 s
        for all of them) and rewrites FILE with "ok_after" too.
    bench_flood.py probe --target IP:PORT --rate R --duration S --timeout T --out FILE
        R new connections a second for S seconds (a GET with Connection:
        close each, at most T seconds); writes attempts, answered, the
        latencies and how many took longer than 1 s (a SYN retransmitted).
    bench_flood.py flood --iface IF --dst-mac MAC --dst IP --dport P --src-net NET/LEN
                         --duration S --count N --out FILE
        sends TCP SYNs from random addresses of NET/LEN and random ports to
        IP:P through an AF_PACKET socket on IF (Ethernet frames to MAC),
        until S seconds or N frames; writes frames sent and the rate.
"""

import argparse
import ipaddress
import json
import os
import random
import socket
import struct
import threading
import time

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
REQ_CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def read_response(s):
    """One HTTP/1.1 response (Content-Length framed); its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed")
        body += chunk
    return int(head.split(b" ", 2)[1])


def write(path, d):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f)
    os.replace(tmp, path)


def hold(a):
    target = addr(a.target)
    socks = []
    for _ in range(a.conns):
        try:
            s = socket.create_connection(target, timeout=3)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        except OSError:
            pass
    ok = []
    for s in socks:
        try:
            s.sendall(REQ)
            if read_response(s) == 200:
                ok.append(s)
        except OSError:
            pass
    res = {"wanted": a.conns, "held": len(ok), "ok_before": len(ok)}
    write(a.out, res)
    deadline = time.monotonic() + a.max_wait
    while not os.path.exists(a.signal) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Ask on all at once, then collect: 3 s for all of them.
    sent = []
    for s in ok:
        try:
            s.sendall(REQ)
            sent.append(s)
        except OSError:
            pass
    deadline = time.monotonic() + 3
    after = 0
    for s in sent:
        try:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            if read_response(s) == 200:
                after += 1
        except OSError:
            pass
    res["ok_after"] = after
    res["signalled"] = os.path.exists(a.signal)
    write(a.out, res)
    for s in socks:
        s.close()


def probe(a):
    target = addr(a.target)
    lat, lock = [], threading.Lock()

    def one():
        t = time.monotonic()
        try:
            with socket.create_connection(target, timeout=a.timeout) as s:
                s.settimeout(max(0.01, a.timeout - (time.monotonic() - t)))
                s.sendall(REQ_CLOSE)
                if read_response(s) != 200:
                    return
        except (OSError, ValueError, IndexError):
            return
        with lock:
            lat.append(time.monotonic() - t)

    threads = []
    start = time.monotonic()
    n = int(a.rate * a.duration)
    for i in range(n):
        delay = start + i / a.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(max(0.0, start + a.duration + a.timeout + 1 - time.monotonic()))
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0
    write(a.out, {"attempts": n, "ok": len(lat), "slow": sum(1 for x in lat if x > 1.0),
                  "p50": q(0.5), "p99": q(0.99), "max": lat[-1] if lat else 0})


def csum_fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def flood(a):
    dst = ipaddress.IPv4Address(a.dst)
    net = ipaddress.IPv4Network(a.src_net)
    dmac = bytes.fromhex(a.dst_mac.replace(":", ""))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a.iface, 0))
    smac = s.getsockname()[4][:6]
    # A SYN without options from 0.0.0.0:0; per frame only the source
    # address and port change, and both checksums follow from sums taken
    # once (the one's-complement sum is linear).
    eth = dmac + smac + b"\x08\x00"
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, b"\0" * 4, dst.packed))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 0, a.dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0))
    ip_base = sum(struct.unpack("!10H", bytes(ip)))
    dst_w = sum(struct.unpack("!2H", dst.packed))
    tcp_base = sum(struct.unpack("!10H", bytes(tcp))) + dst_w + 6 + 20
    frame = bytearray(eth + ip + tcp)
    base = int(net.network_address)
    size = net.num_addresses
    rnd = random.Random(os.getpid()).getrandbits
    pack = struct.pack_into
    send = s.send
    sent = 0
    start = time.monotonic()
    end = start + a.duration
    while sent < a.count:
        if (sent & 1023) == 0 and time.monotonic() >= end:
            break
        r = rnd(32)
        src = base + (r % size)
        port = 1024 + (r >> 16) % 64512
        sw = (src >> 16) + (src & 0xFFFF)
        pack("!H", frame, 24, 0xFFFF - csum_fold(ip_base + sw))  # IP checksum
        pack("!I", frame, 26, src)
        pack("!H", frame, 34, port)
        pack("!H", frame, 50, 0xFFFF - csum_fold(tcp_base + sw + port))
        try:
            send(frame)
            sent += 1
        except BlockingIOError:
            pass
        except OSError:  # ENOBUFS: the queue is full, try again
            pass
    secs = time.monotonic() - start
    write(a.out, {"sent": sent, "seconds": secs, "pps": sent / secs if secs else 0})


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--target", required=True)
    h.add_argument("--conns", type=int, required=True)
    h.add_argument("--signal", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--max-wait", type=float, default=120)
    p = sub.add_parser("probe")
    p.add_argument("--target", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--timeout", type=float, default=3)
    p.add_argument("--out", required=True)
    f = sub.add_parser("flood")
    f.add_argument("--iface", required=True)
    f.add_argument("--dst-mac", required=True)
    f.add_argument("--dst", required=True)
    f.add_argument("--dport", type=int, required=True)
    f.add_argument("--src-net", required=True)
    f.add_argument("--duration", type=float, required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cmd == "flood":
        net = ipaddress.IPv4Network(a.src_net)
        if not net.subnet_of(ipaddress.IPv4Network("10.200.0.0/16")):
            ap.error("--src-net must lie in 10.200.0.0/16")
        if a.duration > 600 or a.count > 100_000_000:
            ap.error("flood bounded to 600 s and 100,000,000 frames")
    {"hold": hold, "probe": probe, "flood": flood}[a.cmd](a)


if __name__ == "__main__":
    main()
