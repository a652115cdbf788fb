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

SETUP_ORDER = {
    "direct": 0,
    "nginx": 1,
    "envoy-jwt": 2,
    "hyper-floor": 3,
    "hyper-same-task": 4,
    "oboe": 5,
    "oboe-forward": 6,
    "oboe-obo": 7,
    "oboe-obo-miss": 8,
}
# The setups issue 6 holds to nginx's throughput, CPU and added latency.
GOAL_SETUPS = ("oboe-forward", "oboe-obo")


def num(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v


def count(value):
    """An integer column that other setups leave NaN: 0 for them."""
    v = num(value)
    return 0 if math.isnan(v) else int(v)


def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def fmt(value, spec, missing="–"):
    return missing if value is None or math.isnan(value) else format(value, spec)


def ratio(a, b):
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def order(setup):
    return (SETUP_ORDER.get(setup, 9), setup)


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
        "p999_ms": median([num(r.get("p999_us")) for r in rows]) / 1000,
        "cpu_us": cpu,
        # CPU µs per request x requests per second = µs of CPU per second.
        "cpu_pct": cpu * rps_med / 1e4,
        "rss": max([num(r["peak_rss_mib"]) for r in rows], default=math.nan),
        "errors": sum(int(r["non2xx"] or 0) + int(r["socket_errors"] or 0) for r in rows),
        "requests": sum(int(r["requests"]) for r in rows),
        "non2xx": sum(int(r["non2xx"] or 0) for r in rows),
        "users": sum(count(r.get("users")) for r in rows),
        "idp": sum(count(r.get("idp_token_requests")) for r in rows),
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


def closed_loop_table(stats):
    keys = sorted(stats, key=lambda k: (k[1], order(k[0])))
    out = [
        "Closed loop (wrk, keep-alive; req/s = saturation throughput):",
        "",
        "| setup | conns | req/s (median) | req/s min–max | p50 ms | p99 ms | p99.9 ms "
        "| proxy CPU µs/req | proxy CPU % | peak RSS MiB | errors "
        "| req/s vs direct | vs nginx | vs envoy-jwt | CPU/req vs nginx | p99 added vs direct |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for setup, conns in keys:
        s = stats[(setup, conns)]
        direct = stats.get(("direct", conns))
        nginx = stats.get(("nginx", conns))
        envoy = stats.get(("envoy-jwt", conns))
        base = setup == "direct"
        spread = (s["rps_max"] - s["rps_min"]) / s["rps"] * 100 if s["rps"] else math.nan
        added = "–"
        if not base and direct:
            added = f"{s['p99_ms'] - direct['p99_ms']:+.3f} ms"
        out.append(
            f"| {setup} | {conns} | {s['rps']:,.0f} | {s['rps_min']:,.0f}–{s['rps_max']:,.0f} ({fmt(spread, '.0f')} %) "
            f"| {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {fmt(s['p999_ms'], '.3f')} "
            f"| {fmt(s['cpu_us'], '.1f')} | {fmt(s['cpu_pct'], '.0f')} | {fmt(s['rss'], '.1f')} | {s['errors']} "
            f"| {'–' if base else ratio(s['rps'], direct and direct['rps'])} "
            f"| {'–' if setup in ('direct', 'nginx') else ratio(s['rps'], nginx and nginx['rps'])} "
            f"| {'–' if setup in ('direct', 'envoy-jwt') else ratio(s['rps'], envoy and envoy['rps'])} "
            f"| {'–' if setup in ('direct', 'nginx') else ratio(s['cpu_us'], nginx and nginx['cpu_us'])} "
            f"| {added} |"
        )
    return out


def miss_table(stats):
    rows = sorted(k for k in stats if k[0] == "oboe-obo-miss")
    if not rows:
        return []
    out = [
        "",
        "Cache misses (oboe-obo-miss: every request a user oboe has not seen; the dev IdP "
        "counts the token requests it answers), summed over the repeats:",
        "",
        "| conns | users sent | 2xx answers | IdP token requests | IdP requests per user |",
        "|--:|--:|--:|--:|--:|",
    ]
    for key in rows:
        s = stats[key]
        per_user = s["idp"] / s["users"] if s["users"] else math.nan
        out.append(
            f"| {key[1]} | {s['users']:,} | {s['requests'] - s['non2xx']:,} | {s['idp']:,} | {fmt(per_user, '.3f')} |"
        )
    return out


def load_open_loop(path):
    groups = OrderedDict()
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            groups.setdefault(row["setup"], []).append(row)
    stats = {}
    for setup, rows in groups.items():
        stats[setup] = {
            "rate": rows[0]["rate"],
            "connections": rows[0]["connections"],
            "rps": median([num(r["rps"]) for r in rows]),
            "p50": median([num(r["p50_us"]) for r in rows]) / 1000,
            "p99": median([num(r["p99_us"]) for r in rows]) / 1000,
            "p99_min": min(num(r["p99_us"]) for r in rows) / 1000,
            "p99_max": max(num(r["p99_us"]) for r in rows) / 1000,
            "p999": median([num(r["p999_us"]) for r in rows]) / 1000,
            "cpu": median([num(r["cpu_us_per_req"]) for r in rows]),
            "rss": max([num(r["peak_rss_mib"]) for r in rows], default=math.nan),
            "errors": sum(int(r["errors"] or 0) for r in rows),
        }
    return stats


def open_loop_table(stats):
    if not stats:
        return []
    first = next(iter(stats.values()))
    out = [
        "",
        f"Open loop: {first['rate']} req/s offered over {first['connections']} connections "
        "(oha, latency corrected for coordinated omission):",
        "",
        "| setup | req/s achieved | p50 ms | p99 ms (min–max) | p99.9 ms | proxy CPU µs/req | peak RSS MiB "
        "| errors | p50 added vs direct | p99 added vs direct |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    direct = stats.get("direct")
    for setup in sorted(stats, key=order):
        s = stats[setup]
        add50 = add99 = "–"
        if setup != "direct" and direct:
            add50 = f"{s['p50'] - direct['p50']:+.3f} ms"
            add99 = f"{s['p99'] - direct['p99']:+.3f} ms"
        out.append(
            f"| {setup} | {s['rps']:,.0f} | {s['p50']:.3f} | {s['p99']:.3f} ({s['p99_min']:.3f}–{s['p99_max']:.3f}) "
            f"| {s['p999']:.3f} | {fmt(s['cpu'], '.1f')} | {fmt(s['rss'], '.1f')} | {s['errors']} | {add50} | {add99} |"
        )
    return out


def goals(stats, open_stats):
    """The load goals of issue 6, judged on this run's medians."""
    out = ["", "Goals of issue 6 judged on this run (medians):", ""]
    conns = sorted({k[1] for k in stats})
    for setup in GOAL_SETUPS:
        for c in conns:
            s, n = stats.get((setup, c)), stats.get(("nginx", c))
            if not s or not n:
                continue
            ok = s["rps"] >= n["rps"]
            out.append(
                f"- {'met' if ok else 'NOT met'}: {setup} throughput ≥ nginx at {c} connections "
                f"({s['rps']:,.0f} vs {n['rps']:,.0f} req/s, {s['rps'] / n['rps']:.2f}×)"
            )
            ok = s["cpu_us"] <= n["cpu_us"]
            out.append(
                f"- {'met' if ok else 'NOT met'}: {setup} proxy CPU per request ≤ nginx at {c} connections "
                f"({s['cpu_us']:.1f} vs {n['cpu_us']:.1f} µs)"
            )
    d, n = open_stats.get("direct"), open_stats.get("nginx")
    if d and n:
        n_added = n["p99"] - d["p99"]
        for setup in GOAL_SETUPS:
            s = open_stats.get(setup)
            if not s:
                continue
            added = s["p99"] - d["p99"]
            ok = added <= n_added
            out.append(
                f"- {'met' if ok else 'NOT met'}: {setup} adds no more p99 over direct than nginx at "
                f"{s['rate']} req/s ({added * 1000:+.0f} µs vs nginx {n_added * 1000:+.0f} µs)"
            )
    for key in sorted(k for k in stats if k[0] == "oboe-obo-miss"):
        s = stats[key]
        ok = s["idp"] <= s["users"]
        out.append(
            f"- {'met' if ok else 'NOT met'}: cache misses make at most one IdP request per user and scope "
            f"at {key[1]} connections ({s['idp']:,} IdP requests for {s['users']:,} users)"
        )
    return out if len(out) > 3 else []


def main():
    if sys.argv[1] == "--parse-oha":
        parse_oha(sys.argv[2])
        return
    path = sys.argv[1]
    header = sys.argv[2] if len(sys.argv) > 2 else ""
    open_loop = sys.argv[3] if len(sys.argv) > 3 else ""
    stats = {key: summarise(rows) for key, rows in load(path).items()}
    open_stats = load_open_loop(open_loop) if open_loop and os.path.exists(open_loop) else {}

    out = []
    if header:
        out += [f"<!-- {header} -->", ""]
    out += closed_loop_table(stats)
    out += miss_table(stats)
    out += open_loop_table(open_stats)
    out += goals(stats, open_stats)
    out.append("")
    out.append(
        "Medians over repeats (peak RSS: max; spread = (max − min) / median). CPU and RSS are the "
        "proxy's own (nginx: worker process; Envoy and oboe: whole process); \"errors\" = non-2xx "
        "responses + socket errors. See bench/README.md."
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
