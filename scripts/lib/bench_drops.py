#!/usr/bin/env python3
"""Packets the kernel dropped on the path, for telling a SYN retransmission
that lb caused from one lost on the way.

    bench_drops.py NS [NS ...]   (names under /run/netns: our namespaces)

Prints one line, "total rx_dropped xdp_tx_errors backlog": over every
interface of those namespaces, the received packets dropped (`ip -s link`
rx_dropped: for a veth, a full queue at either end, its peer's failed
transmits included) and the frames an XDP program sent back (XDP_TX) that
did not go out (ethtool's `xdp_tx_errors`); and the packets dropped by a
full per-CPU backlog (/proc/net/softnet_stat, second column: global, not
per namespace). XDP_DROP verdicts (lb's own drops, which it counts) are not
among them. Counters only: it sends nothing."""

import json
import os
import subprocess
import sys


def in_ns(ns, *cmd):
    path = f"/run/netns/{ns}"
    if not os.path.exists(path):
        sys.exit(f"bench_drops.py: no namespace {ns} of ours")
    return subprocess.run(["nsenter", f"--net={path}", *cmd], capture_output=True, text=True).stdout


def main():
    rx = tx_err = 0
    for ns in sys.argv[1:]:
        try:
            links = json.loads(in_ns(ns, "ip", "-s", "-j", "link", "show") or "[]")
        except ValueError:
            links = []
        for link in links:
            rx += link.get("stats64", {}).get("rx", {}).get("dropped", 0)
            if link.get("ifname", "lo") == "lo":
                continue
            for line in in_ns(ns, "ethtool", "-S", link["ifname"]).splitlines():
                name, _, value = line.strip().partition(":")
                if name.endswith("xdp_tx_errors") and value.strip().isdigit():
                    tx_err += int(value)
    backlog = 0
    with open("/proc/net/softnet_stat") as f:
        for line in f:
            cols = line.split()
            if len(cols) > 1:
                backlog += int(cols[1], 16)
    print(rx + tx_err + backlog, rx, tx_err, backlog)


if __name__ == "__main__":
    main()
