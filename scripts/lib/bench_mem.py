#!/usr/bin/env python3
"""Memory of an attached lb instance, from bpftool: every map of its program
(pinned or not) plus the Maglev tables hanging off the maglev map-of-maps.

    bench_mem.py PIN_DIR STATUS_JSON   (STATUS_JSON: `lb status --json`)

Prints JSON: the maps (id, name, type, max_entries, key/value size,
bytes_memlock) and totals; bytes per tracked connection is the connection
table's memlock divided by max_flows (two entries per connection)."""

import json
import subprocess
import sys


def bpftool(*args):
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    pins, status_file = sys.argv[1], sys.argv[2]
    status = json.load(open(status_file))
    prog_id = status["interfaces"][0]["prog_id"]
    settings = status["settings"]
    ids = list(bpftool("prog", "show", "id", str(prog_id)).get("map_ids", []))
    # Maglev tables: inner maps of the maglev map-of-maps.
    inner = []
    try:
        for e in bpftool("map", "dump", "pinned", f"{pins}/maglev"):
            v = e.get("inner_map_id", e.get("value"))
            if isinstance(v, list):  # the inner map's id, as bytes
                v = int.from_bytes(bytes(int(b, 16) for b in v), sys.byteorder)
            if isinstance(v, int) and v:
                inner.append(v)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        pass
    maps = []
    for i in ids + [v for v in inner if v not in ids]:
        m = bpftool("map", "show", "id", str(i))
        maps.append(
            {
                "id": m["id"],
                "name": m.get("name", ""),
                "type": m.get("type", ""),
                "max_entries": m.get("max_entries", 0),
                "key": m.get("bytes_key", 0),
                "value": m.get("bytes_value", 0),
                "memlock": int(m.get("bytes_memlock", 0)),
                "inner": i in inner and i not in ids,
            }
        )
    ct = next(m for m in maps if m["name"] == "conntrack")
    total = sum(m["memlock"] for m in maps)
    json.dump(
        {
            "settings": settings,
            "maps": maps,
            "total_memlock": total,
            "conntrack_memlock": ct["memlock"],
            "max_flows": settings["max_flows"],
            "bytes_per_flow": ct["memlock"] / settings["max_flows"],
            "bytes_per_entry": ct["memlock"] / ct["max_entries"],
        },
        sys.stdout,
        indent=1,
    )


if __name__ == "__main__":
    main()
