#!/usr/bin/env python3
"""Turns bench/run.sh's raw runs into its Markdown tables.

Usage: report.py RUNS_TSV [HEADER_LINE [OPEN_LOOP_TSV]]
       report.py --parse-oha OHA_JSON   (prints: rps p50_us p99_us p999_us ok errors)
"""
import csv
import json
import math
import os
import statistics
import sys
from collections import OrderedDict

SETUP_ORDER = {"direct": 0, "nginx": 1, "oboe": 2, "oboe-forward": 3, "oboe-obo": 4}


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


def parse_oha(path):
    with open(path) as fh:
        d = json.load(fh)
    pct = d.get("latencyPercentiles") or {}
    codes = d.get("statusCodeDistribution") or {}
    # oha cuts the requests still in flight at the deadline; those are not errors.
    errs = {k: v for k, v in (d.get("errorDistribution") or {}).items() if k != "aborted due to deadline"}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    bad = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(errs.values())

    def us(key):
        return "NaN" if pct.get(key) is None else f"{pct[key] * 1e6:.1f}"

    rps = d["summary"]["requestsPerSec"]
    print(f"{rps:.2f}\t{us('p50')}\t{us('p99')}\t{us('p99.9')}\t{ok}\t{bad}")


def open_loop_table(path):
    groups = OrderedDict()
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            groups.setdefault(row["setup"], []).append(row)
    if not groups:
        return []
    first = next(iter(groups.values()))[0]
    stats = {}
    for setup, rows in groups.items():
        stats[setup] = {
            "rps": median([num(r["rps"]) for r in rows]),
            "p50": median([num(r["p50_us"]) for r in rows]) / 1000,
            "p99": median([num(r["p99_us"]) for r in rows]) / 1000,
            "p999": median([num(r["p999_us"]) for r in rows]) / 1000,
            "cpu": median([num(r["cpu_us_per_req"]) for r in rows]),
            "rss": max([num(r["peak_rss_mib"]) for r in rows], default=math.nan),
            "errors": sum(int(r["errors"] or 0) for r in rows),
        }
    out = [
        "",
        f"Open loop: {first['rate']} req/s offered over {first['connections']} connections "
        "(oha, latency corrected for coordinated omission):",
        "",
        "| setup | req/s achieved | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | peak RSS MiB "
        "| errors | p50 added vs direct | p99 added vs direct |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    direct = stats.get("direct")
    for setup in sorted(stats, key=lambda k: (SETUP_ORDER.get(k, 9), k)):
        s = stats[setup]
        add50 = add99 = "–"
        if setup != "direct" and direct:
            add50 = f"{s['p50'] - direct['p50']:+.3f} ms"
            add99 = f"{s['p99'] - direct['p99']:+.3f} ms"
        out.append(
            f"| {setup} | {s['rps']:,.0f} | {s['p50']:.3f} | {s['p99']:.3f} | {s['p999']:.3f} "
            f"| {fmt(s['cpu'], '.1f')} | {fmt(s['rss'], '.1f')} | {s['errors']} | {add50} | {add99} |"
        )
    return out


def main():
    if sys.argv[1] == "--parse-oha":
        parse_oha(sys.argv[2])
        return
    path = sys.argv[1]
    header = sys.argv[2] if len(sys.argv) > 2 else ""
    open_loop = sys.argv[3] if len(sys.argv) > 3 else ""
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
            added_p99 = f"{s['p99_ms'] - direct['p99_ms']:+.3f} ms"
        if setup.startswith("oboe") and nginx:
            vs_nginx = f"{s['rps'] / nginx['rps']:.2f}×"
        out.append(
            f"| {setup} | {conns} | {s['rps']:,.0f} | {s['rps_min']:,.0f}–{s['rps_max']:,.0f} "
            f"| {s['p50_ms']:.3f} | {s['p99_ms']:.3f} "
            f"| {fmt(s['cpu_us'], '.1f')} | {fmt(s['cpu_pct'], '.0f')} | {fmt(s['rss'], '.1f')} "
            f"| {s['errors']} | {vs_direct or '–'} | {vs_nginx or '–'} | {added_p99 or '–'} |"
        )
    if open_loop and os.path.exists(open_loop):
        out += open_loop_table(open_loop)
    out.append("")
    out.append(
        "Medians over repeats (peak RSS: max). CPU and RSS are the proxy's own "
        "(nginx: worker process; oboe: whole process); \"errors\" = non-2xx responses "
        "+ socket errors reported by wrk. See bench/README.md."
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
