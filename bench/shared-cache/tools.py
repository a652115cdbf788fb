#!/usr/bin/env python3
"""Helpers for bench/shared_cache.sh (standard library only).

  tools.py claims TOKEN
      prints the token's tid and aud, tab-separated (no verification).
  tools.py keygen
      prints 32 random bytes, base64 (an AES-256 key for cache.shared).
  tools.py ports N
      prints N distinct free TCP ports on 127.0.0.1.
  tools.py metrics ADMIN_URL SPEC...
      one GET of ADMIN_URL/metrics; for each SPEC (NAME or NAME:LABEL=VALUE)
      prints the sum of the samples NAME{...} with that label (0 when none),
      space-separated.
  tools.py drive TOKENS_FILE CONCURRENCY URL...
      sends every token of TOKENS_FILE once to each URL, all URLs at the same
      time and in the same order (so a user reaches every replica at about
      the same moment), CONCURRENCY keep-alive connections per URL; prints
      JSON: per URL the answers by status, and the seconds it all took.
  tools.py report DIR HEADER
      the Markdown tables of DIR/throughput.tsv, latency.tsv and idp.tsv.
"""
import base64
import concurrent.futures
import http.client
import json
import os
import re
import socket
import statistics
import sys
import threading
import time
import urllib.parse


def claims(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    c = json.loads(base64.urlsafe_b64decode(payload))
    aud = c["aud"][0] if isinstance(c["aud"], list) else c["aud"]
    print(f"{c.get('tid', '')}\t{aud}")


def ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))


def metrics(admin_url, specs):
    u = urllib.parse.urlsplit(admin_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    samples = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    values = []
    for spec in specs:
        name, _, label = spec.partition(":")
        want = dict([label.split("=", 1)]) if label else {}
        total = sum(v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in want.items()))
        values.append(f"{total:.9f}".rstrip("0").rstrip("."))
    print(" ".join(values))


def drive(tokens_file, concurrency, urls):
    with open(tokens_file) as fh:
        tokens = [line.strip() for line in fh if line.strip()]
    start = threading.Barrier(len(urls) * concurrency + 1)
    results = {}

    def worker(url, todo, lock, statuses):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        start.wait()
        while True:
            with lock:
                if not todo:
                    break
                token = todo.pop()
            try:
                conn.request("GET", u.path or "/", headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                resp.read()
                status = str(resp.status)
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    threads = []
    for url in urls:
        todo = list(reversed(tokens))  # pop() takes them in file order
        lock = threading.Lock()
        statuses = {}
        results[url] = statuses
        for _ in range(concurrency):
            t = threading.Thread(target=worker, args=(url, todo, lock, statuses))
            t.start()
            threads.append(t)
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    print(json.dumps({"seconds": round(time.monotonic() - t0, 3), "statuses": results}))


# --------------------------------------------------------------------- report


def rows(path):
    with open(path) as fh:
        lines = [l.rstrip("\n").split("\t") for l in fh if l.strip()]
    head = lines[0]
    return [dict(zip(head, l)) for l in lines[1:]]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def med(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(v, digits=0):
    if v != v:
        return "–"
    return f"{v:,.{digits}f}"


def ms(us):
    return fmt(us / 1000, 3)


def report(d, header):
    out = [f"<!-- {header} -->", ""]

    # (a) L1 hit throughput, with vs without L2.
    tput = rows(os.path.join(d, "throughput.tsv"))
    by = {}
    for r in tput:
        by.setdefault(r["replica"], []).append(r)
    conns = tput[0]["connections"] if tput else "?"
    reps = len(by.get("without L2", []))
    out += [
        f"**(a) L1 hit, with vs without L2.** One user's token repeated, wrk -t1 -c{conns}, "
        f"median of {reps} runs each, with and without alternating; req/s as median (min–max, spread = "
        f"(max − min) / median). Redis commands: every command Redis processed during the with-L2 runs "
        f"(`INFO commandstats`, INFO itself excluded).",
        "",
        "| replica | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | Redis commands during its runs | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    meds, spreads, redis_total = {}, {}, 0
    for name in ("without L2", "with L2"):
        rs = by.get(name, [])
        rps = [num(r["rps"]) for r in rs]
        m = {k: med([num(r[k]) for r in rs]) for k in ("rps", "p50_us", "p99_us", "p999_us", "cpu_us_per_req")}
        meds[name] = m
        if name == "with L2":
            redis_total = sum(int(num(r["redis_commands"])) for r in rs)
        redis_cmds = sum(int(num(r["redis_commands"])) for r in rs) if rs else 0
        errors = sum(int(num(r["non2xx"]) + num(r["socket_errors"])) for r in rs)
        spread = (max(rps) - min(rps)) / m["rps"] * 100 if rps and m["rps"] else float("nan")
        spreads[name] = spread
        out.append(
            f"| {name} | {fmt(m['rps'])} ({fmt(min(rps) if rps else float('nan'))}–{fmt(max(rps) if rps else float('nan'))}, "
            f"{fmt(spread, 1)} %) "
            f"| {ms(m['p50_us'])} | {ms(m['p99_us'])} | {ms(m['p999_us'])} | {fmt(m['cpu_us_per_req'], 1)} "
            f"| {redis_cmds if name == 'with L2' else '–'} | {errors} |"
        )
    a, b = meds.get("with L2"), meds.get("without L2")
    if a and b:
        def pct(x, y):
            return "–" if not (x == x and y == y and y) else f"{(x / y - 1) * 100:+.1f} %"
        out.append(
            f"| with / without | {pct(a['rps'], b['rps'])} | {pct(a['p50_us'], b['p50_us'])} | {pct(a['p99_us'], b['p99_us'])} "
            f"| {pct(a['p999_us'], b['p999_us'])} | {pct(a['cpu_us_per_req'], b['cpu_us_per_req'])} | | |"
        )
        delta = abs(a["rps"] / b["rps"] - 1) * 100 if b["rps"] else float("nan")
        noise = max(spreads.values())
        if redis_total == 0 and delta <= noise:
            verdict = "an L1 hit costs the same with and without L2 (the difference is within the run-to-run spread)"
        elif redis_total:
            verdict = f"L1 hits touched Redis ({redis_total} commands): not the same cost"
        else:
            verdict = "the difference exceeds the run-to-run spread: rerun on a quiet machine or with a larger --repeat"
        out += ["", f"Δ req/s {delta:.1f} % against a spread of up to {fmt(noise, 1)} %, "
                    f"{redis_total} Redis commands during the L1 hits: {verdict}."]
    out.append("")

    # (b) Per-request latency of each path.
    lat = rows(os.path.join(d, "latency.tsv"))
    cases = [
        ("l1", "L1 hit (the users' tokens again)"),
        ("l2", "**L2 hit**: L1 miss → Redis GET + decrypt → L1"),
        ("verify", "context: new token on /api/ (signature check + forward, no token cache)"),
        ("miss_l2", "context: L1 + L2 miss → IdP (GET, SET NX lock, exchange, SET, unlock)"),
        ("miss", "context: L1 miss → IdP, replica without L2"),
    ]
    by = {}
    for r in lat:
        by.setdefault(r["case"], []).append(r)
    n = lat[0]["requests"] if lat else "?"
    reps = len(by.get("l2", []))
    out += [
        f"**(b) Added latency of an L2 hit.** One request at a time (wrk -t1 -c1), each of {n} users once, "
        f"on a freshly started replica with L2 whose verified-token cache was first warmed with the same tokens on "
        f"a forward route, so the rows differ only in where the downstream token comes from; "
        f"{reps} fresh starts, median of the per-start values.",
        "",
        "| path | mean ms | p50 ms | p90 ms | p99 ms | max ms | IdP token requests | L2 lookups (hit/miss) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    meds = {}
    for case, label in cases:
        rs = by.get(case, [])
        if not rs:
            continue
        m = {k: med([num(r[k]) for r in rs]) for k in ("mean_us", "p50_us", "p90_us", "p99_us", "max_us")}
        meds[case] = m
        idp = sum(int(num(r["idp_requests"])) for r in rs)
        hits = sum(int(num(r["l2_hit"])) for r in rs)
        misses = sum(int(num(r["l2_miss"])) for r in rs)
        lookups = "–" if case in ("verify", "miss") else f"{hits}/{misses}"
        out.append(
            f"| {label} | {ms(m['mean_us'])} | {ms(m['p50_us'])} | {ms(m['p90_us'])} | {ms(m['p99_us'])} "
            f"| {ms(m['max_us'])} | {idp} | {lookups} |"
        )
    if "l1" in meds and "l2" in meds:
        l1, l2 = meds["l1"], meds["l2"]
        delta = {k: ms(l2[k] - l1[k]) for k in ("mean_us", "p50_us", "p90_us", "p99_us")}
        out.append(
            f"| **added by an L2 hit** (L2 − L1) | **{delta['mean_us']}** | **{delta['p50_us']}** | {delta['p90_us']} "
            f"| {delta['p99_us']} | | | |"
        )
    rtt = [num(r["redis_rtt_us"]) for r in by.get("l2", [])]
    if rtt:
        out.append("")
        out.append(
            f"Redis round trip as oboe measures it (`oboe_shared_cache_duration_seconds`, mean over the L2-hit "
            f"passes): {ms(med(rtt))} ms per GET. Per-request totals include wrk, the upstream and a keep-alive "
            f"hop each way on loopback."
        )
    out.append("")

    # (c) IdP token requests.
    idp = rows(os.path.join(d, "idp.tsv"))
    if idp:
        out += [
            f"**(c) IdP token requests, {idp[0]['users']} users across 2 replicas.** Every user's token sent once to "
            f"each replica, both replicas at the same time in the same order ({idp[0]['concurrency']} connections "
            f"each), so each user misses on both replicas at about the same moment (the cross-replica lock's case).",
            "",
            "| setup | users | requests | 2xx | IdP token requests (dev IdP) | per user | replicas' `oboe_exchanges_total` "
            "| L2 lookups after an L1 miss (both replicas) | seconds |",
            "|---|--:|--:|--:|--:|--:|--:|---|--:|",
        ]
        for r in idp:
            users = int(num(r["users"]))
            calls = int(num(r["idp_requests"]))
            out.append(
                f"| {r['setup']} | {users} | {r['requests']} | {r['ok']} | **{calls}** | {calls / users:.2f} "
                f"| {r['oboe_exchanges']} | {r['l2_outcomes']} | {r['seconds']} |"
            )
        out.append("")
    print("\n".join(out))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "claims":
        claims(args[0])
    elif cmd == "keygen":
        print(base64.b64encode(os.urandom(32)).decode())
    elif cmd == "ports":
        ports(int(args[0]))
    elif cmd == "metrics":
        metrics(args[0], args[1:])
    elif cmd == "drive":
        drive(args[0], int(args[1]), args[2:])
    elif cmd == "report":
        report(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
