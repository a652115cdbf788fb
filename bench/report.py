#!/usr/bin/env python3
"""Turns bench/out/runs.tsv (one row per wrk run) into the Markdown table of bench/run.sh.

Usage: report.py RUNS_TSV [HEADER_LINE]
"""
import csv
import math
import statistics
import sys
from collections import OrderedDict

SETUP_ORDER = {"direct": 0, "nginx": 1, "oboe": 2}


def num(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v


def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def fmt(value, spec, missing="–"):
    return missing if value is None or math.isnan(value) else format(value, spec)


def load(path):
    groups = OrderedDict()
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            groups.setdefault((row["setup"], int(row["connections"])), []).append(row)
    return groups


def summarise(rows):
    rps = [num(r["rps"]) for r in rows]
    cpu = median([num(r["cpu_us_per_req"]) for r in rows])
    rps_med = median(rps)
    return {
        "n": len(rows),
        "rps": rps_med,
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p50_ms": median([num(r["p50_us"]) for r in rows]) / 1000,
        "p99_ms": median([num(r["p99_us"]) for r in rows]) / 1000,
        "cpu_us": cpu,
        # CPU µs per request x requests per second = µs of CPU per second.
        "cpu_pct": cpu * rps_med / 1e4,
        "rss": max([num(r["peak_rss_mib"]) for r in rows], default=math.nan),
        "errors": sum(int(r["non2xx"] or 0) + int(r["socket_errors"] or 0) for r in rows),
    }


def main():
    path = sys.argv[1]
    header = sys.argv[2] if len(sys.argv) > 2 else ""
    stats = {key: summarise(rows) for key, rows in load(path).items()}
    keys = sorted(stats, key=lambda k: (k[1], SETUP_ORDER.get(k[0], 9), k[0]))

    out = []
    if header:
        out += [f"<!-- {header} -->", ""]
    out.append(
        "| setup | conns | req/s (median) | req/s min–max | p50 ms | p99 ms "
        "| proxy CPU µs/req | proxy CPU % | peak RSS MiB | errors "
        "| req/s vs direct | req/s vs nginx | p99 added vs direct |"
    )
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for setup, conns in keys:
        s = stats[(setup, conns)]
        direct = stats.get(("direct", conns))
        nginx = stats.get(("nginx", conns))
        vs_direct = vs_nginx = added_p99 = None
        if setup != "direct" and direct:
            vs_direct = f"{s['rps'] / direct['rps']:.2f}×"
            added_p99 = f"+{s['p99_ms'] - direct['p99_ms']:.3f} ms"
        if setup == "oboe" and nginx:
            vs_nginx = f"{s['rps'] / nginx['rps']:.2f}×"
        out.append(
            f"| {setup} | {conns} | {s['rps']:,.0f} | {s['rps_min']:,.0f}–{s['rps_max']:,.0f} "
            f"| {s['p50_ms']:.3f} | {s['p99_ms']:.3f} "
            f"| {fmt(s['cpu_us'], '.1f')} | {fmt(s['cpu_pct'], '.0f')} | {fmt(s['rss'], '.1f')} "
            f"| {s['errors']} | {vs_direct or '–'} | {vs_nginx or '–'} | {added_p99 or '–'} |"
        )
    out.append("")
    out.append(
        "Medians over repeats (peak RSS: max). CPU and RSS are the proxy's own "
        "(nginx: worker process; oboe: whole process); \"errors\" = non-2xx responses "
        "+ socket errors reported by wrk. See bench/README.md."
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
