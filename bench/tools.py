#!/usr/bin/env python3
"""Small helpers for bench/run.sh (standard library only).

  tools.py claims TOKEN
      prints the token's iss, aud and tid, tab-separated (no verification).
  tools.py fill TEMPLATE OUT NAME=VALUE...
      writes TEMPLATE with every @NAME@ replaced by VALUE.
  tools.py startup READY_URL LOG -- COMMAND...
      starts COMMAND, polls READY_URL every millisecond until it answers 200,
      waits one more second with no traffic, then prints (tab-separated)
      milliseconds from start to ready, VmRSS KiB, VmHWM KiB; and stops it.
  tools.py fetch URL...
      GETs each URL in turn on a fresh connection; prints the total milliseconds.
  tools.py metric ADMIN_URL NAME [LABEL=VALUE...]
      prints the sum of the Prometheus samples NAME{...} matching the labels.
"""
import http.client
import json
import base64
import re
import signal
import subprocess
import sys
import time
import urllib.parse


def claims(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    c = json.loads(base64.urlsafe_b64decode(payload))
    aud = c["aud"][0] if isinstance(c["aud"], list) else c["aud"]
    print(f"{c['iss']}\t{aud}\t{c.get('tid', '')}")


def fill(template, out, pairs):
    with open(template) as fh:
        text = fh.read()
    for pair in pairs:
        name, _, value = pair.partition("=")
        text = text.replace(f"@{name}@", value)
    left = re.search(r"@[A-Z_]+@", text)
    if left:
        sys.exit(f"fill {template}: no value for {left.group(0)}")
    with open(out, "w") as fh:
        fh.write(text)


def get_status(url, timeout=0.5):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", u.path or "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def proc_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def startup(url, log, command):
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=out)
        try:
            deadline = t0 + 30
            while True:
                if proc.poll() is not None:
                    sys.exit(f"startup: {command[0]} exited with {proc.returncode} before ready (see {log})")
                try:
                    if get_status(url) == 200:
                        break
                except OSError:
                    pass
                if time.perf_counter() > deadline:
                    sys.exit(f"startup: {url} not ready within 30 s (see {log})")
                time.sleep(0.001)
            ready_ms = (time.perf_counter() - t0) * 1000
            time.sleep(1.0)
            rss = proc_status_kib(proc.pid, "VmRSS")
            hwm = proc_status_kib(proc.pid, "VmHWM")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(f"{ready_ms:.1f}\t{rss}\t{hwm}")


def fetch(urls):
    t0 = time.perf_counter()
    for url in urls:
        status = get_status(url, timeout=5)
        if status != 200:
            sys.exit(f"fetch {url}: status {status}")
    print(f"{(time.perf_counter() - t0) * 1000:.2f}")


def metric(admin_url, name, labels):
    u = urllib.parse.urlsplit(admin_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    want = [f'{k}="{v}"' for k, v in (l.split("=", 1) for l in labels)]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        base = series.split("{", 1)[0]
        if base != name:
            continue
        if all(w in series for w in want):
            total += float(value)
    print(f"{total:.0f}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "claims":
        claims(args[0])
    elif cmd == "fill":
        fill(args[0], args[1], args[2:])
    elif cmd == "startup":
        sep = args.index("--")
        startup(args[0], args[1], args[sep + 1 :])
    elif cmd == "fetch":
        fetch(args)
    elif cmd == "metric":
        metric(args[0], args[1], args[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
