#!/usr/bin/env python3
"""Writes BENCHMARKS.md and the plots from the results of scripts/bench.

    bench_report.py --results DIR --out FILE --plots DIR --command CMD
                    --rounds N --duration S --sustained N,WIN
                    --flood DUR,MAX,HOLD,RATE,TIMEOUT,MAX_FLOWS,NET [--elapsed S]

DIR holds what the parts that ran left there (a part that did not run is
reported as not measured):
  datapath.csv   cargo bench --bench datapath --csv
  trafgen.csv    cargo bench --bench trafgen --csv
  e2e.csv        round,scenario,test,value,errors
  nstat.csv      part,round,scenario,test,side,counter,delta (nstat around each test)
  sustained.csv  scenario,window,seconds,rps,syn_retrans,paws,time_wait,drops,listen_drops (per window)
  sustained-wrk.csv scenario,rps,errors,seconds (wrk's own figures for the whole run)
  flood.csv      scenario,held,ok_after,syns,flood_s,pps,attempts,ok,slow,p50,p99
  memory.json    bench_mem.py
  lbstats-*.json `lb status --json` after each lb scenario (its counters)
  decapstats-*.json `lb decap --stats --json` of each backend after each lbipip scenario

Every statement of a target met or not met is computed here from the same
run's numbers."""

import argparse
import csv
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess

PATHS = ["established", "return", "new flow", "SYN-ACK (half-open)", "handshake ACK", "new flow UDP", "UDP, unanswered flow", "passed (not ours)", "passed (not IP)", "dsr", "established IPv6", "return IPv6", "new flow IPv6", "established, traced", "new flow, traced", "established, no latency", "new flow, no latency", "ipip (1 run a call)"]
SCENARIOS = [("lb", "lb (XDP, native), defaults"), ("nft", "nftables DNAT + masquerade"),
             ("haproxy", "haproxy (mode tcp)"), ("direct", "direct to one backend"),
             ("fwd", "XDP forward-only (ceiling)"),
             ("lbdsr", "lb, direct server return (`--mode dsr`)"),
             ("lbipip", "lb, IP-in-IP (`--mode ipip`, `lb decap` on the backends)"),
             ("lb6", "IPv6: lb, defaults"), ("nft6", "IPv6: nftables ip6 DNAT + masquerade"),
             ("direct6", "IPv6: direct to one backend")]
TESTS = [("keepalive", "wrk keep-alive, req/s"), ("close", "new connection per request, req/s"),
         ("close3", "new connection per request, 3 clients, req/s"), ("iperf3", "iperf3 one stream, Gbit/s")]
SYN = "TcpExtTCPSynRetrans"
PAWS = "TcpExtPAWSTimewait"
DROPS = "KernelDrops"  # scripts/bench's path_drops (side "path")
TARGET_NFT, TARGET_HAPROXY = 1.2, 1.5


def machine():
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "model": model}


def plot(path, title, xlabel, series, logx=True, ylabel="ns / packet (BPF_PROG_TEST_RUN)"):
    """series: {label: [(x, y), ...]}; PNG with matplotlib, else hand-written SVG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.6))
        # past the 10 colours, another marker and line: no two series alike
        styles = [("o", "-"), ("s", "--"), ("^", ":")]
        for i, (label, pts) in enumerate(series.items()):
            m, ls = styles[(i // 10) % len(styles)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=m, linestyle=ls, label=label)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(path + ".png", dpi=110)
        plt.close(fig)
        return path + ".png"
    except ImportError:
        return svg(path + ".svg", title, xlabel, series, logx, ylabel)


def svg(path, title, xlabel, series, logx, ylabel):
    import math
    w, h, m = 640, 380, 60
    tx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    xs = [tx(p[0]) for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y1 = max(ys) * 1.1 or 1
    sx = lambda x: m + (tx(x) - x0) / (x1 - x0) * (w - 2 * m)
    sy = lambda y: h - m - y / y1 * (h - 2 * m)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w/2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{m}" y1="{h-m}" x2="{w-m}" y2="{h-m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h-m}" stroke="black"/>',
           f'<text x="{w/2}" y="{h-15}" text-anchor="middle">{xlabel}{" (log)" if logx else ""}</text>',
           f'<text x="15" y="{h/2}" transform="rotate(-90 15 {h/2})" text-anchor="middle">{ylabel}</text>']
    for i in range(5):
        y = y1 * i / 4
        out.append(f'<text x="{m-5}" y="{sy(y)+4}" text-anchor="end">{y:.0f}</text>')
    for x in sorted({p[0] for pts in series.values() for p in pts}):
        out.append(f'<text x="{sx(x)}" y="{h-m+15}" text-anchor="middle">{x}</text>')
    for i, (label, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{w-m-150}" y="{m+15*i}" fill="{c}">{label}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))
    return path


def fmt(v, unit=""):
    if v >= 1000:
        return f"{v:,.0f}{unit}"
    return f"{v:.2f}{unit}" if v < 10 else f"{v:.0f}{unit}"


def rows_of(results, name):
    """The rows of a CSV result file; [] if the part did not run."""
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return []
    return list(csv.DictReader(open(path)))


def counters(path):
    """{name: packets} from `lb status --json` (or `lb stats --json`)."""
    try:
        c = json.load(open(path)).get("counters", {})
        # An object keyed by name (a list of [name, {...}] pairs before).
        pairs = c.items() if isinstance(c, dict) else c
        return {name: v.get("packets", 0) for name, v in pairs}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def drops(paths):
    """The drop_* counters summed over the files, nonzero only."""
    d = {}
    for f in paths:
        for k, v in counters(f).items():
            if v and k.startswith("drop"):
                d[k] = d.get(k, 0) + v
    return d


def spread(rs):
    return f"{statistics.median(rs):.2f} [{min(rs):.2f}, {max(rs):.2f}]"


def katran_section(L, R, rows, cfgs, empty1):
    """Katran's balancer beside lb, column by column (scripts/bench --katran)."""
    if empty1 is None or not any(r["path"] == "Katran: new flow" for r in rows):
        return
    ver = open(os.path.join(R, "katran.txt")).read().strip() if os.path.exists(os.path.join(R, "katran.txt")) else "unknown"
    L.append("### Katran, in the same run\n")
    L.append(f"Katran's XDP balancer (github.com/facebookincubator/katran at {ver}, "
             "`katran/lib/bpf/balancer.bpf.c` with its default build options: IP-in-IP to the real, no NAT), "
             "loaded in every column beside lb and set up as its control plane would for one VIP: the VIP, "
             "as many reals as lb has backends (at most 4,095), the VIP's 65,537-slot ring over them, the next hop's MAC, "
             "and a connection table per CPU (an LRU hash as large as lb's `conntrack` in that column, holding as many flows). "
             "Both timed one run a call, as lb's new flows: *new flow* on distinct SYNs (Katran: a SYN takes no lookup, "
             "one LRU insert; lb: the lookups, a NAT tuple, two half-open entries), *established* on copies of one frame "
             "of a flow in the table. Katran's counters prove every run was sent on and every SYN inserted "
             f"(its flood guard, which skips inserts past 125,000 new connections a second, never fired). "
             f"x: of the empty program timed the same way ({empty1:.0f} ns).\n")
    L.append("| path | " + " | ".join(f"{b} backends, {f:,} flows" for b, f in cfgs) + " |")
    L.append("| --- |" + " ---: |" * len(cfgs))

    def at(p, c):
        return next((r["ns"] for r in rows if r["path"] == p and (r["backends"], r["flows"]) == c), None)
    for label, p in [("lb: new flow", "new flow"), ("Katran: new flow", "Katran: new flow"),
                     ("lb: established (1 run a call)", "established (1 run a call)"),
                     ("Katran: established (1 run a call)", "Katran: established (1 run a call)")]:
        cells = [("" if at(p, c) is None else f"{at(p, c):.0f} ({at(p, c) / empty1:.1f}x)") for c in cfgs]
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, a, b in [("new flow, lb / Katran", "new flow", "Katran: new flow"),
                        ("established, lb / Katran", "established (1 run a call)", "Katran: established (1 run a call)")]:
        cells = [("" if at(a, c) is None or at(b, c) is None else f"{at(a, c) / at(b, c):.2f}") for c in cfgs]
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    L.append("")


def met(ok):
    return "**met**" if ok else "**not met**"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plots", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--duration", type=int, required=True)
    ap.add_argument("--sustained", default="6,10")
    ap.add_argument("--flood", default="20,2000000,200,20,3,65536,10.200.128.0/17")
    ap.add_argument("--elapsed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.plots, exist_ok=True)
    mc = machine()
    quick = "--quick" in a.command
    R = a.results
    rel = lambda p: os.path.relpath(p, os.path.dirname(a.out) or ".")
    sust_n, sust_win = (int(x) for x in a.sustained.split(","))
    fl = a.flood.split(",")
    fl_dur, fl_max, fl_hold, fl_rate, fl_timeout, fl_flows, fl_net = int(fl[0]), int(fl[1]), int(fl[2]), \
        float(fl[3]), float(fl[4]), int(fl[5]), fl[6]

    # nstat deltas: {(part, round, scenario, test, counter): delta}
    nst = {}
    for r in rows_of(R, "nstat.csv"):
        k = (r["part"], r["round"], r["scenario"], r["test"], r["counter"])
        nst[k] = nst.get(k, 0) + int(float(r["delta"]))

    def nsum(part, sc, test, counter):
        return sum(v for (p, _, s, t, c), v in nst.items() if (p, s, t, c) == (part, sc, test, counter))

    # End to end.
    val, errs = {}, {}
    for r in rows_of(R, "e2e.csv"):
        k = (r["scenario"], r["test"])
        val.setdefault(k, {})[int(r["round"])] = float(r["value"])
        errs[k] = errs.get(k, 0) + int(r["errors"])

    def ratios(sc, base, t):
        """Same-round ratios sc/base for test t."""
        d, v = val.get((base, t), {}), val.get((sc, t), {})
        return [v[rd] / d[rd] for rd in v if d.get(rd)]

    sust = rows_of(R, "sustained.csv")
    flood = {r["scenario"]: r for r in rows_of(R, "flood.csv")}

    L = []
    L.append("# Benchmarks\n")
    L.append(("**Quick-mode results** (`--quick`: short runs, fewer rounds and sizes; indicative only). " if quick else "")
             + f"Produced by `{a.command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
             + (f" in {a.elapsed / 60:.1f} minutes" if a.elapsed else "")
             + "; every number below comes from that run, and every *met* / *not met* is computed from those "
               "numbers (the tests never assert numbers).\n")
    L.append(f"Machine: {mc['cpus']} CPUs, `{mc['model']}` (lscpu model name), Linux {mc['kernel']}. "
             "Client, load balancer, backends and traffic tools all share these CPUs, "
             "so the end-to-end figures compare load balancers on one box; they are not line-rate figures. "
             "The machine is not isolated (other jobs may run at the same time): read the [min, max] spreads "
             "before the medians.\n")

    # ------------------------------------------------------------ targets
    L.append("## Targets\n")
    L.append("From issue 8 (the connection table), checked against this run. Ratios are medians of the "
             "same round's ratios, [min, max] over rounds:\n")
    L.append("| target | measured in this run | |")
    L.append("| --- | --- | --- |")
    for t, clients in (("close", "1 client"), ("close3", "3 clients")):
        for base, want, name in (("nft", TARGET_NFT, "nftables"), ("haproxy", TARGET_HAPROXY, "haproxy")):
            rs = ratios("lb", base, t)
            label = f"new connection per request ({clients}), lb defaults >= {want}x {name}"
            if rs:
                L.append(f"| {label} | {spread(rs)} | "
                         f"{met(statistics.median(rs) >= want)} |")
            else:
                L.append(f"| {label} | not measured | |")
    parts = {f"section 2, {dict(TESTS)[t].rsplit(',', 1)[0]}": nsum("e2e", "lb", t, SYN)
             for t, _ in TESTS if ("lb", t) in val and t != "iperf3"}
    if any(r["scenario"] == "lb" for r in sust):
        parts["section 3"] = sum(int(r["syn_retrans"]) for r in sust if r["scenario"] == "lb")
    if parts:
        total = sum(parts.values())
        # the kernel's drops on the path over the same tests, if recorded
        lost = sum(nsum("e2e", "lb", t, DROPS) for t, _ in TESTS if ("lb", t) in val and t != "iperf3")
        lost += sum(int(r.get("drops") or 0) for r in sust if r["scenario"] == "lb")
        seen = any(c == DROPS for (_, _, _, _, c) in nst) or any(r.get("drops") for r in sust)
        L.append("| 0 SYN retransmissions (lb: client `TcpExtTCPSynRetrans`, every test of sections 2 and 3) | "
                 f"{total:,} ({'; '.join(f'{k}: {v:,}' for k, v in parts.items())})"
                 + (f"; packets the kernel dropped on the path in those tests: {lost:,}" if seen else "")
                 + f" | {met(total == 0)} |")
    else:
        L.append("| 0 SYN retransmissions (lb) | not measured | |")
    if "lbflood" in flood:
        f = flood["lbflood"]
        held, after = int(f["held"]), int(f["ok_after"])
        ok = held == fl_hold and after == held
        L.append(f"| 0 held connections lost in the SYN flood (lb) | {held - after} of {held} lost"
                 + (f" ({fl_hold - held} of {fl_hold} could not even be opened before it)" if held != fl_hold else "")
                 + f" | {met(ok)} |")
    else:
        L.append("| 0 held connections lost in the SYN flood (lb) | not measured | |")
    if "lbflood" in flood:
        f = flood["lbflood"]
        tried, ok = int(f["attempts"]), int(f["ok"])
        L.append(f"| real new connections during the SYN flood succeed (lb) | {ok} of {tried} within "
                 f"{fl_timeout:g} s, {int(f['slow'])} of them after a SYN retransmission | {met(ok == tried)} |")
    dp = rows_of(R, "datapath.csv")
    e1 = [float(r["ns"]) for r in dp if r["path"] == "empty (1 run a call)"]
    nf = [float(r["ns"]) for r in dp if r["path"] == "new flow"]
    if e1 and nf:
        worst = max(nf) / e1[0]
        kn = [float(r["ns"]) for r in dp if r["path"] == "Katran: new flow"]
        kt = (f"; Katran timed the same way in this run: {min(kn) / e1[0]:.1f}-{max(kn) / e1[0]:.1f}x, "
              f"{min(kn):.0f}-{max(kn):.0f} ns (section 1)") if kn else ""
        L.append(f"| new flow <= 13x the empty program, timed the same way (one run a call; aim 6x) | "
                 f"{min(nf) / e1[0]:.0f}-{worst:.0f}x ({min(nf):.0f}-{max(nf):.0f} ns vs {e1[0]:.0f} ns{kt}) | "
                 f"{met(worst <= 13)} |")
    # Issue 10: IPv6 established within 1.3x of IPv4, config by config.
    pairs = [(float(a["ns"]), float(b["ns"])) for a in dp if a["path"] == "established"
             for b in dp if b["path"] == "established IPv6"
             and (b["backends"], b["flows"]) == (a["backends"], a["flows"])]
    if pairs:
        r6 = [v6 / v4 for v4, v6 in pairs]
        L.append(f"| IPv6 established <= 1.3x IPv4 established (issue 10) | "
                 f"{min(r6):.2f}-{max(r6):.2f}x | {met(max(r6) <= 1.3)} |")
    L.append("")

    # ------------------------------------------------------------ datapath
    L.append("## 1. Datapath: ns per packet (BPF_PROG_TEST_RUN)\n")
    dp = rows_of(R, "datapath.csv")
    if dp:
        for r in dp:
            r["backends"], r["flows"], r["ns"] = int(r["backends"]), int(r["flows"]), float(r["ns"])
        empty = next(r["ns"] for r in dp if r["path"] == "empty XDP program")
        # The empty program timed as the new flows are (one run a call).
        empty1 = next((r["ns"] for r in dp if r["path"] == "empty (1 run a call)"), None)
        rows = [r for r in dp if r["path"] not in ("empty XDP program", "empty (1 run a call)")]
        bmin = min(r["backends"] for r in rows)
        fmin = min(r["flows"] for r in rows)
        by_b = {p: [(r["backends"], r["ns"]) for r in rows if r["path"] == p and r["flows"] == fmin] for p in PATHS}
        by_f = {p: [(max(r["flows"], 1), r["ns"]) for r in rows if r["path"] == p and r["backends"] == bmin] for p in PATHS}
        by_b["empty XDP program"] = [(x, empty) for x, _ in by_b[PATHS[0]]]
        by_f["empty XDP program"] = [(x, empty) for x, _ in by_f[PATHS[0]]]
        pb = plot(os.path.join(a.plots, "ns_vs_backends"), f"ns/packet vs backends ({fmin} tracked flow)", "backends", by_b)
        pf = plot(os.path.join(a.plots, "ns_vs_flows"), f"ns/packet vs tracked flows ({bmin} backends)", "tracked flows", by_f)
        L.append("`cargo bench --bench datapath` runs the XDP program on one frame with `repeat` "
                 "(best of 3 runs), proving from the counters that every repetition took the path measured. "
                 f"The empty XDP program costs **{empty:.0f} ns** in the same run (the harness' own cost).\n")
        cfgs = sorted({(r["backends"], r["flows"]) for r in rows}, key=lambda c: (c[0] != bmin, c))
        L.append("| path | " + " | ".join(f"{b} backends, {f:,} flows" for b, f in cfgs) + " |")
        L.append("| --- |" + " ---: |" * len(cfgs))
        for p in PATHS:
            cells = []
            for c in cfgs:
                v = next((r["ns"] for r in rows if r["path"] == p and (r["backends"], r["flows"]) == c), None)
                cells.append("" if v is None else f"{v:.0f} ({v / empty:.1f}x)")
            L.append(f"| {p} | " + " | ".join(cells) + " |")
        L.append("\nns/packet (x the empty program). *established*: client to VIP, flow in the table; "
                 "*return*: backend to client; *new flow*: a SYN creating a connection; "
                 "*SYN-ACK (half-open)*: the backend's answer to that SYN, back to the client; *handshake ACK*: the client's ACK that confirms it, "
                 "moving both entries of the connection from the half-open table to conntrack (two LRU inserts); "
                 "*new flow UDP*: a datagram from a new client port making a flow; *UDP, unanswered flow*: the next datagram of such a flow, "
                 "its backend silent so far (a one-way stream: found in the half-open table); "
                 "*passed*: not the LB's traffic; *dsr*: a packet of a direct-server-return service (only its MACs change); "
                 "*IPv6*: the same paths of an IPv6 connection; *traced*: with `lb trace` on for every packet (no filter, sample 1; the untraced rows are tracing off, which costs one per-CPU lookup and two tests); "
                 "*no latency*: handshake latency not measured (`handshake_latency = false`: no clock read on a new flow's SYN, "
                 "no sample on its SYN-ACK; every other row measures it, the default).\n")
        if empty1 is not None:
            new = [r["ns"] for r in rows if r["path"] == "new flow"]
            text = ("A new flow cannot be repeated on its own rewritten frame, so it is timed on distinct "
                    "frames, one BPF_PROG_TEST_RUN call each; timed that way the empty program costs "
                    f"**{empty1:.0f} ns** (the single-run timing itself), and a new flow "
                    f"{min(new):.0f}-{max(new):.0f} ns is {min(new) / empty1:.0f}-{max(new) / empty1:.0f}x that.")
            sa = [r["ns"] for r in rows if r["path"] == "SYN-ACK (half-open)"]
            ack = [r["ns"] for r in rows if r["path"] == "handshake ACK"]
            if sa and len(sa) == len(ack) == len(new):
                whole = [a + b + c for a, b, c in zip(new, sa, ack)]  # per column, in run order
                text += (f" The SYN-ACK and the handshake's ACK are timed the same way: {min(sa):.0f}-{max(sa):.0f} ns "
                         f"and {min(ack):.0f}-{max(ack):.0f} ns, so the LB's whole share of a handshake is "
                         f"{min(whole):.0f}-{max(whole):.0f} ns.")
            L.append(text + "\n")
        L.append(f"![ns vs backends]({rel(pb)}) ![ns vs flows]({rel(pf)})\n")
        katran_section(L, R, rows, cfgs, empty1)
    else:
        L.append("Not measured in this run.\n")

    # ------------------------------------------------------------ end to end
    L.append("## 2. End to end: lb vs nftables vs haproxy vs direct vs forward-only (and DSR, IP-in-IP, IPv6)\n")
    if val:
        L.append("The talk's topology (`scripts/topo up P native --clients 3`: three clients, the LB and two "
                 "backends on one bridge, veth, native XDP), rebuilt for every scenario. Backends run nginx "
                 "(one worker, a fixed 200 answer, keep-alive unlimited); iperf3 -s on backend a, port 5201. "
                 "Scenarios:\n")
        L.append("- **lb**: `lb attach eth0 --netns P-lb --pin-dir DIR --lb 10.200.0.2 --backend 10.200.0.11 "
                 "--backend 10.200.0.12 --port 80`, default settings, plus service "
                 "10.200.0.2:5201 -> 10.200.0.11:5201 for iperf3;")
        L.append("- **nftables**: kube-proxy style in the LB namespace, `dnat to numgen random mod 2 map "
                 "{ 0 : .11, 1 : .12 }`, `ct status dnat masquerade`, ip_forward=1 (5201 -> .11);")
        L.append("- **haproxy**: mode tcp, one thread, roundrobin, on 10.200.0.2:80 (and :5201 -> .11);")
        L.append("- **direct**: the clients talk to backend 10.200.0.11 themselves;")
        L.append("- **lb, DSR** and **lb, IP-in-IP**: `lb attach eth0` (defaults) and the services "
                 "10.200.0.100:80 -> .11:80, .12:80 and 10.200.0.100:5201 -> .11:5201 with `--mode dsr` "
                 "(only the MACs change) or `--mode ipip` (wrapped in an outer header from the LB to the "
                 "backend; `lb decap eth0` on both backends takes it off). The VIP 10.200.0.100 is on the "
                 "LB's lo (the LB answers ARP for it) and on both backends' lo with `arp_ignore=1`, "
                 "`arp_announce=2`; nginx and iperf3 -s also listen on it there, and the answers go from the "
                 "backends straight to the clients. It is not the LB's own address (10.200.0.2) as in the "
                 "other scenarios: a backend holding that one takes every packet from the LB, its ARP "
                 "requests included, for a martian with a local source, so lb could resolve no backend. "
                 "IP-in-IP: the backends' route to the clients has `advmss 1440`, so that a full-size "
                 "segment from a client still fits the 1500-byte MTU once wrapped (lb drops a larger one, "
                 "`drop_too_big`);")
        L.append("- **IPv6** (keep-alive and new connection per request, one client; ratios to IPv6 direct): "
                 "the same topology's fd00:200::/64 addresses; lb with the service [fd00:200::2]:80 -> "
                 "[fd00:200::11]:80, [fd00:200::12]:80 (defaults), nftables `table ip6` with the same DNAT "
                 "and masquerade, direct to [fd00:200::11];")
        L.append("- **XDP forward-only (ceiling)**: `bpf/fwd.bpf.c` on the LB's eth0 (loaded by "
                 "`cargo bench --bench fwd -- attach ...`): the same hop as lb (client -> VIP becomes "
                 "LB -> backend, and back, XDP_TX, full NAT) done by the cheapest program there is: one client "
                 "and one backend (10.200.0.11) as load-time constants, client port kept, checksums updated "
                 "incrementally, no table, no Maglev, no FIB lookup, no counter. It knows one client, so it has "
                 "no 3-client figure. lb's distance to it is what lb's own work (connection table, Maglev, "
                 "next hops, counters) costs.\n")
        L.append(f"From the client namespace: `wrk -t2 -c32 -d{a.duration}s` keep-alive, the same with "
                 f"`-H 'Connection: close'` (a new connection per request), the same from three client "
                 f"namespaces at once (`wrk -t1 -c32` each, req/s summed), and `iperf3 -t {a.duration}` "
                 f"(one stream). {a.rounds} rounds, scenario order rotated each round; tcp_tw_reuse=1 in every "
                 "namespace. Every scenario and round gets a fresh topology for keep-alive, one client's new "
                 "connections and iperf3 (in that order), and another fresh one for the 3-client test, so "
                 "the two new-connection tests inherit no TIME_WAIT sockets or tracked flows from each other "
                 "or from another scenario.\n")
        L.append("Ratio to direct (median over rounds of the same round's ratio; [min, max]), then the median "
                 "absolute value:\n")
        L.append("| scenario | " + " | ".join(n for _, n in TESTS) + " |")
        L.append("| --- |" + " ---: |" * len(TESTS))
        for sc, name in SCENARIOS:
            cells = []
            for t, _ in TESTS:
                # IPv6 scenarios against IPv6 direct
                rs = ratios(sc, "direct6" if sc.endswith("6") else "direct", t)
                vs = list(val.get((sc, t), {}).values())
                if not vs:
                    cells.append("-")
                    continue
                e = errs.get((sc, t), 0)
                cells.append(f"{spread(rs) if rs else '-'}; {fmt(statistics.median(vs))}"
                             + (f" ({e:,} errors)" if e else ""))
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append("\nErrors are wrk socket errors (connect, read, write, timeout) and non-2xx answers summed "
                 "over rounds.\n")
        fw = [(t, ratios("lb", "fwd", t)) for t, _ in TESTS]
        fw = [(t, rs) for t, rs in fw if rs]
        if fw:
            L.append("lb against the forward-only ceiling (same-round ratio lb / forward-only, median [min, max]): "
                     + "; ".join(f"{dict(TESTS)[t].rsplit(',', 1)[0]} {spread(rs)}" for t, rs in fw)
                     + ". lb runs two backends and the ceiling one: with keep-alive and iperf3 the LB's "
                       "per-packet work is what differs; with a new connection per request, also the backends.\n")
        L.append("Handshakes, from nstat in the fresh namespaces (deltas over each test, summed over rounds): "
                 f"SYNs the clients retransmitted (`{SYN}`) / segments the backends' TIME_WAIT sockets rejected "
                 f"as older than the last one seen (`{PAWS}`, any segment, summed over both backends): a "
                 f"rejected SYN is sent again (after the client's RST, at once) and also counts on the left; rejected "
                 f"segments without a SYN retransmission are late ones of the connection that just ended, "
                 f"typically its ACK of the answer overtaken on the veth bridge by its FIN (the "
                 f"clients' segments leave from two CPUs' backlogs; scripts/topo --rps keeps them in "
                 f"order) / packets the kernel dropped on the path, in every namespace of the test (`ip -s link` "
                 f"rx_dropped of every interface, a veth's full queues among them; XDP_TX frames that did not go "
                 f"out, ethtool's `xdp_tx_errors`; full per-CPU backlogs, `/proc/net/softnet_stat`; not lb's "
                 f"own drops, which it counts): a SYN retransmission with no drop on the path was not a packet lost "
                 f"on the way:\n")
        L.append("| scenario | " + " | ".join(n.rsplit(",", 1)[0] for t, n in TESTS if t != "iperf3") + " |")
        L.append("| --- |" + " ---: |" * (len(TESTS) - 1))
        for sc, name in SCENARIOS:
            cells = []
            for t, _ in TESTS:
                if t == "iperf3":
                    continue
                if (sc, t) not in val:
                    cells.append("-")
                else:
                    cells.append(f"{nsum('e2e', sc, t, SYN):,} / {nsum('e2e', sc, t, PAWS):,} / "
                                 f"{nsum('e2e', sc, t, DROPS):,}")
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        d = drops(sorted(glob.glob(os.path.join(R, "lbstats-lb-*.json"))))
        L.append("\nlb's drop counters (`lb status --json`, summed over rounds): "
                 + (", ".join(f"`{k}` {v:,}" for k, v in sorted(d.items())) if d else "none") + ".\n")
        bypass = []
        for sc, name in (("lbdsr", "DSR"), ("lbipip", "IP-in-IP")):
            files = sorted(glob.glob(os.path.join(R, f"lbstats-{sc}-*.json")))
            if not files:
                continue
            tot = {}
            for f in files:
                for k, v in counters(f).items():
                    tot[k] = tot.get(k, 0) + v
            d = drops(files)
            t = (f"{name}: `to_backend` {tot.get('to_backend', 0):,}, `to_client` {tot.get('to_client', 0):,}"
                 + (" (the answers bypassed the LB)" if tot.get("to_backend") and not tot.get("to_client") else
                    " (**answers crossed the LB**)" if tot.get("to_client") else " (**nothing forwarded**)")
                 + ", drops " + (", ".join(f"`{k}` {v:,}" for k, v in sorted(d.items())) if d else "none"))
            if sc == "lbipip":
                dec = {}
                for f in sorted(glob.glob(os.path.join(R, f"decapstats-{sc}-*.json"))):
                    for k, v in counters(f).items():
                        dec[k] = dec.get(k, 0) + v
                t += (f"; the backends' `lb decap` decapsulated {dec.get('decapsulated', 0):,}"
                      + "".join(f", `{k}` {v:,}" for k, v in sorted(dec.items()) if k != "decapsulated" and v))
            bypass.append(t)
        if bypass:
            L.append("lb's counters in the DSR and IP-in-IP scenarios (packets, every test, summed over rounds): "
                     + "; ".join(bypass) + ". There lb forwards only the clients' half of each connection: the "
                       "requests, and with iperf3 (the client sends) every data segment, so iperf3's data "
                       "crosses the LB as in full NAT and only the backend's ACKs bypass it; IP-in-IP adds "
                       "the outer header and the backends' `lb decap`.\n")
        L.append("Reading it: with keep-alive and iperf3 a packet through lb costs one XDP program run and "
                 "XDP_TX, no socket and no kernel conntrack. With a new connection per request every request "
                 "is a handshake: a SYN dropped on the way is retransmitted by the client a second later; one "
                 "the backend refuses (a TIME_WAIT socket there still holds the LB-side tuple the SYN reuses, "
                 "with newer timestamps) is answered with an ACK, the client's RST ends that TIME_WAIT and it "
                 "sends the SYN again within milliseconds (Linux, for an unacceptable ACK in SYN-SENT). Both "
                 "show as SYN retransmissions, the first also as lost req/s.\n")
    else:
        L.append("Not measured in this run.\n")

    # ------------------------------------------------------------ sustained
    L.append(f"## 3. Sustained new connections: {sust_n * sust_win} s\n")
    if sust:
        scs = [s for s in ("lb", "nft") if any(r["scenario"] == s for r in sust)]
        names = dict(SCENARIOS)
        whole = {r["scenario"]: r for r in rows_of(R, "sustained-wrk.csv")}
        L.append(f"One client, a new connection per request: one `wrk -t2 -c32 -d{sust_n * sust_win}s "
                 "-H 'Connection: close'` on a fresh topology, so the backends' TIME_WAIT sockets accumulate "
                 "over the whole run (nginx closes first, so they sit at the backends, 60 s each); lb with "
                 f"default settings and nftables. Every {sust_win} s a sample: the requests both backends "
                 f"served (nginx `stub_status`), client `{SYN}`, backend `{PAWS}` and the backends' TIME_WAIT "
                 "sockets (`ss state time-wait`), and the packets the kernel dropped on the path (as in section 2: "
                 "every namespace's interfaces, XDP_TX errors, backlogs) and the SYNs the backends' listeners dropped "
                 "(`TcpExtListenDrops`); a window's req/s is the requests served "
                 "between two samples over the time between them.\n")
        L.append("| window | " + " | ".join(f"{names[s]}: req/s, SYN retrans, PAWS, TIME_WAIT at the end, "
                                         "kernel drops, listen drops"
                                         for s in scs) + " |")
        L.append("| --- |" + " ---: |" * len(scs))
        series = {}
        for w in range(1, sust_n + 1):
            cells = []
            for s in scs:
                r = next((r for r in sust if r["scenario"] == s and int(r["window"]) == w), None)
                if r is None:
                    cells.append("-")
                    continue
                cells.append(f"{fmt(float(r['rps']))}, {int(r['syn_retrans']):,}, {int(r['paws']):,}, "
                             f"{int(r['time_wait']):,}, "
                             + ", ".join(f"{int(r[k]):,}" if r.get(k) not in (None, "") else "-"
                                         for k in ("drops", "listen_drops")))
                series.setdefault(names[s], []).append((w * sust_win, float(r["rps"])))
            L.append(f"| {(w - 1) * sust_win}-{w * sust_win} s | " + " | ".join(cells) + " |")
        summary = []
        for s in scs:
            v = [float(r["rps"]) for r in sust if r["scenario"] == s]
            t = f"{names[s]}: "
            if s in whole:
                t += (f"wrk {fmt(float(whole[s]['rps']))} req/s over the run, {int(whole[s]['errors']):,} "
                      "errors; ")
            if v and v[0] and max(v):
                t += f"last window / first {v[-1] / v[0]:.2f}, lowest / highest {min(v) / max(v):.2f}"
            summary.append(t)
        if summary:
            L.append("\n" + "; ".join(summary) + ".\n")
        if series:
            ps = plot(os.path.join(a.plots, "sustained"), "new connection per request, sustained",
                      "seconds (end of window)", series, logx=False, ylabel="req/s")
            L.append(f"![sustained]({rel(ps)})\n")
        d = drops([os.path.join(R, "lbstats-sustained-lb.json")])
        if "lb" in scs:
            L.append("lb's drop counters over the run: "
                     + (", ".join(f"`{k}` {v:,}" for k, v in sorted(d.items())) if d else "none") + ".\n")
    else:
        L.append("Not measured in this run.\n")

    # ------------------------------------------------------------ flood
    L.append("## 4. SYN flood\n")
    if flood:
        L.append(f"A fresh topology; client c opens {fl_hold} keep-alive connections to the VIP and asks once "
                 f"on each. Then client c2 sends TCP SYNs to 10.200.0.2:80 from random sources of {fl_net} "
                 f"(addresses no host has) and random ports, through an AF_PACKET socket "
                 f"(`scripts/lib/bench_flood.py flood`, as fast as one Python process sends, for {fl_dur} s or "
                 f"{fl_max:,} frames), while client c3 makes {fl_rate:g} real new connections a second (a GET "
                 f"with `Connection: close`, answered within {fl_timeout:g} s or failed). After the flood every "
                 f"held connection is asked once more (3 s for all). lb: default settings with "
                 f"`--max-flows {fl_flows}`; nftables as in section 2 (kernel conntrack, "
                 "nf_conntrack_max of the machine). The backends' SYN-ACKs to spoofed sources go nowhere.\n")
        L.append("| scenario | SYNs sent (per s) | held connections answering after the flood | new connections "
                 f"during the flood answered within {fl_timeout:g} s | of those, > 1 s (SYN retransmitted) | "
                 "latency p50 / p99 | client SYN retrans | backend SYN cookies sent | drop counters |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for sc, name in (("lbflood", f"lb, `--max-flows {fl_flows}`"), ("nft", "nftables DNAT + masquerade")):
            f = flood.get(sc)
            if f is None:
                L.append(f"| {name} | not measured | | | | | | | |")
                continue
            att, ok = int(f["attempts"]), int(f["ok"])
            d = drops([os.path.join(R, f"lbstats-flood-{sc}.json")]) if sc == "lbflood" else None
            dc = "-" if d is None else (", ".join(f"`{k}` {v:,}" for k, v in sorted(d.items())) or "none")
            L.append(f"| {name} | {int(f['syns']):,} ({fmt(float(f['pps']))}) | {f['ok_after']} of {f['held']} | "
                     f"{ok} of {att} ({100 * ok / att if att else 0:.0f}%) | {f['slow']} | "
                     f"{float(f['p50']) * 1e3:.1f} / {float(f['p99']) * 1e3:.0f} ms | "
                     f"{nsum('flood', sc, 'probe', SYN):,} | {nsum('flood', sc, 'probe', 'TcpExtSyncookiesSent'):,} "
                     f"| {dc} |")
        if "lbflood" in flood:
            dropped = sum(drops([os.path.join(R, "lbstats-flood-lbflood.json")]).values())
            syns = int(flood["lbflood"]["syns"])
            L.append(f"\nlb dropped {dropped:,} packets in this scenario (its `drop_*` counters) against "
                     f"{syns:,} flood SYNs: a dropped SYN never entered the connection table, so at most "
                     f"{max(0, syns - dropped):,} of them competed with the held connections for its "
                     f"{fl_flows:,} connections ({'more' if syns - dropped > fl_flows else 'not more'} than "
                     "the table holds).")
        fc = counters(os.path.join(R, "lbstats-flood-lbflood.json"))
        table = ["new_flow", "established", "half_open_evicted", "stale", "evicted", "est_full", "reopen"]
        if fc:
            L.append("\nlb's connection table over the flood scenario (`lb status --json` counters): "
                     + ", ".join(f"`{k}` {fc.get(k, 0):,}" for k in table)
                     + ". *new_flow*: flows made (flood SYNs and real ones); *established*: connections confirmed "
                     "and moved to conntrack; *half_open_evicted*: half-open flows pushed out of their set by newer ones; "
                     "*stale*: packets of a flow whose NAT tuple had been given to another (a half-open flow's, once "
                     "its SYN waited unanswered); *evicted*: packets of a flow whose owner entry was gone.")
            seen = sum(v for k, v in fc.items()
                       if k in ("to_backend", "to_client", "icmp_error") or k.startswith(("pass_", "drop_")))
            if "lbflood" in flood:
                sent = int(flood["lbflood"]["syns"])
                inward = seen - fc.get("to_client", 0) - fc.get("icmp_error", 0)
                L.append(f" Over the scenario lb's program saw {inward:,} packets from clients (every verdict but "
                         f"the answers to them) while {sent:,} flood SYNs were sent: {max(0, sent - inward):,} "
                         "or more never reached XDP, "
                         "dropped on the way (the veth and bridge queues of a box whose 2 vCPUs also run the "
                         "generator and the backends), and real SYNs sent meanwhile meet the same drops. The "
                         f"backends answered with {nsum('flood', 'lbflood', 'probe', 'TcpExtSyncookiesSent'):,} "
                         f"SYN cookies, of which at most {fc.get('to_client', 0):,} (every packet lb sent to "
                         "clients) reached lb.")
        L.append("\nA held connection that does not answer lost its state at the LB during the flood (its "
                 "entry evicted, or its NAT mapping given away). New connections are counted answered if the "
                 "whole request took at most the timeout, so one that needed a SYN retransmission (1 s) still "
                 "counts, and is also counted in the > 1 s column.\n")
    else:
        L.append("Not measured in this run.\n")

    # ------------------------------------------------------------ memory
    L.append("## 5. Memory of a default instance\n")
    mpath = os.path.join(R, "memory.json")
    if os.path.exists(mpath):
        mem = json.load(open(mpath))
        s = mem["settings"]
        L.append(f"`lb attach` with default settings (max_flows {s['max_flows']:,}, Maglev table "
                 f"{s['maglev_size']:,} entries), two backends; `bytes_memlock` of every map of the program plus "
                 "the service's Maglev table (inner map), from `bpftool map show`:\n")
        L.append("| map | type | max entries | key+value bytes | memlock |")
        L.append("| --- | --- | ---: | ---: | ---: |")
        for m in sorted(mem["maps"], key=lambda m: -m["memlock"]):
            L.append(f"| {m['name']}{' (inner)' if m['inner'] else ''} | {m['type']} | {m['max_entries']:,} | "
                     f"{m['key']}+{m['value']} | {m['memlock'] / 2**20:.2f} MiB |")
        L.append(f"| **total** | | | | **{mem['total_memlock'] / 2**20:.1f} MiB** |\n")
        L.append(f"Per tracked connection: **{mem['bytes_per_flow']:.0f} bytes** (the connection table's "
                 f"{mem['conntrack_memlock'] / 2**20:.1f} MiB / {mem['max_flows']:,} connections; entries of "
                 f"{mem['bytes_per_entry']:.0f} bytes each, preallocated).\n")
    else:
        L.append("Not measured in this run.\n")

    # ------------------------------------------------------------ live frames
    L.append("## 6. Live per-packet cost on one core\n")
    rows_tg = rows_of(R, "trafgen.csv")
    if rows_tg:
        rep = int(rows_tg[0]["repeat"])
        L.append("`cargo bench --bench trafgen`: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES injects "
                 f"{rep:,} copies of an established client->VIP frame on eth0 of a namespace, the generator "
                 "pinned to CPU 0. lb's program rewrites each one and the kernel really transmits it (XDP_TX) "
                 "to the veth peer eth1, whose pass-everything program hands it to eth1's stack, which drops "
                 "it (another host's MAC). So the figure is the program plus veth transmit and receive on one "
                 "core, wall-clock; the counters prove every frame was forwarded.\n")
        L.append("| case | ns/packet | Mpps | forwarded (counter) | received by eth1 |")
        L.append("| --- | ---: | ---: | ---: | ---: |")
        for r in rows_tg:
            L.append(f"| {r['case']} | {float(r['ns']):.0f} | {float(r['mpps']):.2f} | "
                     f"{int(r['forwarded']):,} | {int(r['delivered']):,} |")
        L.append("\nThe second row is the kernel's own path for the same frames, for scale: an XDP program "
                 "that passes everything, each frame becoming an skb that IP forwarding then drops (no "
                 "neighbour for the VIP).\n")
    else:
        L.append("Not measured in this run.\n")

    L.append("## 7. Not measured\n")
    L.append("- Multi-queue NICs, line rate, clients on other machines: one 2-CPU machine with veth runs "
             "everything here.\n")
    L.append("## Reproduce\n")
    L.append("```sh\nscripts/bench                    # as root; writes BENCHMARKS.md and docs/bench/\n"
             "scripts/bench --quick            # short runs, 2 rounds, fewer sizes (CI runs this)\n"
             "scripts/bench --quick --only e2e # one part: datapath, e2e, sustained, flood, memory\n"
             "scripts/bench --katran DIR       # Katran's balancer too, from a checkout of facebookincubator/katran\n```\n")
    if a.elapsed:
        L.append(f"This run (`{a.command}`) took {a.elapsed / 60:.1f} minutes.\n")
    open(a.out, "w").write("\n".join(L))

    # Headline for the README.
    def base(sc):
        return "direct6" if sc.endswith("6") else "direct"

    h = {(sc, t): statistics.median(ratios(sc, base(sc), t)) for sc, _ in SCENARIOS for t, _ in TESTS
         if ratios(sc, base(sc), t)}
    print("headline: " + "; ".join(f"{sc} {t} {v:.2f}" for (sc, t), v in h.items()))


if __name__ == "__main__":
    main()
