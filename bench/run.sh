#!/usr/bin/env bash
# bench/run.sh — HTTP/1.1 reverse-proxy benchmark on loopback: direct vs nginx vs
# Envoy (JWT validation) vs oboe (pass-through, validated forward, OBO cache hit,
# OBO cache miss with a new user every request).
#
#   bash bench/run.sh [--duration 10s] [--repeat 3] [--connections "32 256"]
#                     [--setups "direct nginx envoy-jwt oboe oboe-forward oboe-obo oboe-obo-miss"]
#                     [--warmup 2s] [--skip-build] [--rate 1000] [--rate-connections 32]
#                     [--users N]
#   bash bench/run.sh --memory [--users 100000] [--skip-build]
#
# Closed loop (the main table): wrk, each connection sends its next request as soon as
# the previous answer arrives, so req/s is the saturation throughput. Open loop (the
# second table, skipped with --rate 0): oha at a fixed rate below saturation with
# coordinated-omission correction, i.e. the latency an app sees at a normal load.
# --memory instead measures oboe's idle RSS, start-to-ready time and RSS growth per
# cached downstream token (--users distinct users, one request each).
#
# Everything listens on 127.0.0.1 only, on free ports, in a throw-away work dir,
# and is killed on exit. Results: Markdown on stdout and bench/out/results.md
# (raw per-run numbers in bench/out/runs.tsv and open-loop.tsv; --memory:
# bench/out/memory.md). See bench/README.md.
#
# CPU pinning (2-core machine; same for every setup so the comparison is fair):
#   core 0 (LOAD_CPU):  wrk/oha, the upstream nginx in the proxied setups, and the
#                       dev IdP (`oboe dev`: key set, user tokens, OBO answers)
#   core 1 (PROXY_CPU): the proxy under test (nginx worker, Envoy with one worker,
#                       or every thread of an `oboe run`)
#   direct:             wrk on core 0, the upstream alone on core 1
# The proxy gets a core to itself, so its CPU time per request and its req/s are not
# disturbed by the generator. The upstream shares core 0 with wrk because it is the
# cheapest piece (a `return 200`); in "direct" it moves to core 1 so that "direct" is
# the ceiling of this generator+upstream pair, not a setup handicapped by sharing a
# core. Consequence: ratios to direct include the cost of moving the upstream onto
# the generator's core; ratios between proxies compare like with like.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
OUT_DIR="$SCRIPT_DIR/out"
OBOE_BIN="$REPO_DIR/target/release/oboe"

ALL_SETUPS="direct nginx envoy-jwt oboe oboe-forward oboe-obo oboe-obo-miss"
DURATION=10s
REPEAT=3
CONNECTIONS="32 256"
SETUPS=$ALL_SETUPS
WARMUP=2s
SKIP_BUILD=0
RATE=1000 # open-loop requests/s (0: no open-loop runs, oha not needed)
RATE_CONNECTIONS=32
USERS=""  # user tokens minted for oboe-obo-miss / --memory (default: sized from the plan)
MEMORY=0
LOAD_CPU=${BENCH_LOAD_CPU:-0}
PROXY_CPU=${BENCH_PROXY_CPU:-1}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-30} # seconds a server gets to come up
# Envoy's jwt_authn verifies every token by default; 1 turns on its verified-JWT
# cache (jwt_cache_config), the counterpart of oboe's verified-token cache.
ENVOY_JWT_CACHE=${BENCH_ENVOY_JWT_CACHE:-0}

WORK_DIR=""
PIDS=()          # every process we started (nginx masters, envoy, oboe), killed on exit
UPSTREAM_PID=""  # nginx master of the upstream
NGINX_PID=""     # nginx master of the reverse proxy
ENVOY_PID="" ENVOY_BIN="" ENVOY_NOTE=""
OBOE_PID=""      # oboe run, pass-through route
OBOE_ID_PID=""   # oboe run, dev IdP identity: /api/ forward, /graph/ On-Behalf-Of
DEV_PID=""       # oboe dev: the development IdP
UPSTREAM_PORT="" NGINX_PORT="" OBOE_PORT="" OBOE_ADMIN_PORT=""
ENVOY_PORT="" ENVOY_ADMIN_PORT="" OBOE_ID_PORT="" OBOE_ID_ADMIN_PORT="" DEV_PORT=""
TOKEN="" IDP_URL="" ISSUER="" AUDIENCE="" TENANT="" CLIENT_ID=""
USERS_FILE="" USERS_STATE="" SECRET_FILE=""
MISS_NOTE=""

# ---------------------------------------------------------------------------- utils

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

parse_args() {
    while (($#)); do
        case "$1" in
            --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
            --repeat) REPEAT=${2:?--repeat needs a value}; shift 2 ;;
            --connections) CONNECTIONS=${2:?--connections needs a value}; shift 2 ;;
            --setups) SETUPS=${2:?--setups needs a value}; shift 2 ;;
            --warmup) WARMUP=${2:?--warmup needs a value}; shift 2 ;;
            --skip-build) SKIP_BUILD=1; shift ;;
            --rate) RATE=${2:?--rate needs a value}; shift 2 ;;
            --rate-connections) RATE_CONNECTIONS=${2:?--rate-connections needs a value}; shift 2 ;;
            --users) USERS=${2:?--users needs a value}; shift 2 ;;
            --memory) MEMORY=1; shift ;;
            -h | --help) usage 0 ;;
            *) log "unknown argument: $1"; usage 2 ;;
        esac
    done
    [[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive integer, got '$REPEAT'"
    [[ $DURATION =~ ^[1-9][0-9]*[smh]?$ ]] || die "--duration must look like 10s, got '$DURATION'"
    [[ $RATE =~ ^[0-9]+$ ]] || die "--rate must be a non-negative integer, got '$RATE'"
    [[ $RATE_CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "--rate-connections must be a positive integer"
    [[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "--warmup must look like 2s, got '$WARMUP'"
    [[ -z $USERS || $USERS =~ ^[1-9][0-9]*$ ]] || die "--users must be a positive integer, got '$USERS'"
    SETUPS=${SETUPS//,/ }
    CONNECTIONS=${CONNECTIONS//,/ }
    local s
    for s in $SETUPS; do
        [[ " $ALL_SETUPS " == *" $s "* ]] || die "unknown setup '$s' (${ALL_SETUPS// /|})"
    done
}

# True if SETUP is in $SETUPS.
has_setup() { [[ " $SETUPS " == *" $1 "* ]]; }

# Seconds in a wrk-style duration (10s, 2m, 1h, or plain seconds).
seconds_of() {
    local v=$1
    case "$v" in
        *h) echo $((${v%h} * 3600)) ;;
        *m) echo $((${v%m} * 60)) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}

# Prints the last lines of a log file, indented, to stderr.
show_log() {
    [[ -f $1 ]] || return 0
    log "--- last lines of $1:"
    tail -n 20 "$1" | sed 's/^/    /' >&2
}

# Prints N distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Polls URL until it answers 200; dies if PID exits or TIMEOUT seconds pass.
wait_http_200() {
    local name=$1 url=$2 pid=$3 logfile=$4 timeout=${5:-$READY_TIMEOUT}
    local deadline=$((SECONDS + timeout)) code
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log "$logfile"
            die "$name (pid $pid) exited during startup"
        fi
        code=$(curl --noproxy '*' -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    show_log "$logfile"
    die "$name did not answer 200 on $url within ${timeout}s (last status: ${code:-none})"
}

# Checks that URL answers 200 with body "ok".
check_ok_body() {
    local name=$1 url=$2 body
    shift 2
    body=$(curl --noproxy '*' -sf --max-time 2 "$@" "$url") || die "$name: GET $url failed"
    [[ $body == ok ]] || die "$name: GET $url answered '$body', expected 'ok'"
}

# Direct children of PID (nginx workers of a master).
children_of() { pgrep -P "$1" || true; }

# Moves every thread of PID and of its children onto CPU.
pin_tree() {
    local pid=$1 cpu=$2 p
    for p in "$pid" $(children_of "$pid"); do
        taskset -a -p -c "$cpu" "$p" >/dev/null
    done
}

# Prints how busy the machine's CPUs are (percent over one second) before we start.
# Anything else running (a cargo build, tests) skews every number in the table.
background_cpu_pct() {
    local a b
    read -r -a a < <(head -n1 /proc/stat)
    sleep 1
    read -r -a b < <(head -n1 /proc/stat)
    # cpu user nice system idle iowait irq softirq steal
    local busy=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8])))
    local idle=$(((b[4] + b[5]) - (a[4] + a[5])))
    echo $((100 * busy / (busy + idle > 0 ? busy + idle : 1)))
}

# ----------------------------------------------------------------- install & build

install_tools() {
    local missing=()
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    command -v pgrep >/dev/null || missing+=(procps)
    if ((${#missing[@]})); then
        local sudo=()
        ((EUID == 0)) || sudo=(sudo)
        log "installing ${missing[*]} with apt-get"
        "${sudo[@]}" apt-get update -qq
        if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null; then
            # nginx-light is gone in newer Debian releases: fall back to nginx.
            missing=("${missing[@]/nginx-light/nginx}")
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null ||
                die "apt-get install ${missing[*]} failed"
        fi
    fi
    export PATH="$PATH:/usr/sbin"
    command -v nginx >/dev/null || die "nginx is not installed"
    command -v wrk >/dev/null || die "wrk is not installed"
    if ((RATE > 0)); then
        export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
        if ! command -v oha >/dev/null; then
            # About 5 minutes on 2 cores, once per machine.
            log "installing oha (cargo install oha --locked) for the open-loop runs; --rate 0 skips them"
            cargo install oha --locked || die "cargo install oha --locked failed (use --rate 0 to skip oha)"
        fi
        command -v oha >/dev/null || die "oha is not on PATH after cargo install"
    fi
}

build_oboe() {
    if ((SKIP_BUILD)); then
        log "--skip-build: using existing $OBOE_BIN"
    else
        log "building oboe (cargo build --release --locked)"
        (cd "$REPO_DIR" && cargo build --release --locked) ||
            die "cargo build --release --locked failed"
    fi
    [[ -x $OBOE_BIN ]] || die "$OBOE_BIN does not exist"
}

# ------------------------------------------------------------------------- servers

# Writes the parts of an nginx.conf common to both instances.
nginx_conf_head() {
    local dir=$1
    cat <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 16384;
events {
    worker_connections 8192;
}
EOF
}

nginx_conf_http_common() {
    local dir=$1
    cat <<EOF
    access_log off;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
EOF
}

# Starts nginx with DIR/nginx.conf pinned to CPU; sets LAST_PID to the master.
start_nginx() {
    local name=$1 dir=$2 cpu=$3
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/configtest.log" || {
        show_log "$dir/configtest.log"
        die "$name: nginx config test failed"
    }
    taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" \
        >"$dir/stdout.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

start_upstream() {
    local dir="$WORK_DIR/upstream"
    mkdir -p "$dir/tmp"
    {
        nginx_conf_head "$dir"
        echo "http {"
        nginx_conf_http_common "$dir"
        cat <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    start_nginx upstream "$dir" "$LOAD_CPU"
    UPSTREAM_PID=$LAST_PID
    wait_http_200 "upstream nginx" "http://127.0.0.1:$UPSTREAM_PORT/" "$UPSTREAM_PID" "$dir/error.log"
    check_ok_body "upstream nginx" "http://127.0.0.1:$UPSTREAM_PORT/"
    log "upstream nginx: pid $UPSTREAM_PID, port $UPSTREAM_PORT"
}

# nginx as a plain keep-alive reverse proxy. It also sets the X-Forwarded-* headers
# that oboe always sends, so both proxies do comparable header work.
start_nginx_proxy() {
    local dir="$WORK_DIR/nginx-proxy"
    mkdir -p "$dir/tmp"
    {
        nginx_conf_head "$dir"
        echo "http {"
        nginx_conf_http_common "$dir"
        cat <<EOF
    upstream bench_upstream {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    start_nginx "nginx proxy" "$dir" "$PROXY_CPU"
    NGINX_PID=$LAST_PID
    wait_http_200 "nginx proxy" "http://127.0.0.1:$NGINX_PORT/" "$NGINX_PID" "$dir/error.log"
    check_ok_body "nginx proxy" "http://127.0.0.1:$NGINX_PORT/"
    log "nginx proxy: pid $NGINX_PID, port $NGINX_PORT"
}

# oboe with one pass-through route (no caller token, no exchange). Pinned to one core,
# so its runtime sees one CPU (std::thread::available_parallelism honours affinity).
start_oboe() {
    local dir="$WORK_DIR/oboe"
    mkdir -p "$dir"
    cat >"$dir/oboe.yaml" <<EOF
listen: 127.0.0.1:$OBOE_PORT
admin: { listen: 127.0.0.1:$OBOE_ADMIN_PORT }
routes:
  - name: bench
    path_prefix: /
    upstream: http://127.0.0.1:$UPSTREAM_PORT/
    caller: { required: false }
    token: { grant: none }
EOF
    (cd "$dir" && OBOE_LOG=warn exec taskset -c "$PROXY_CPU" "$OBOE_BIN" run --config "$dir/oboe.yaml") \
        >"$dir/oboe.log" 2>&1 &
    OBOE_PID=$!
    PIDS+=("$OBOE_PID")
    wait_http_200 oboe "http://127.0.0.1:$OBOE_ADMIN_PORT/readyz" "$OBOE_PID" "$dir/oboe.log"
    [[ $(cat "/proc/$OBOE_PID/comm" 2>/dev/null) == oboe ]] ||
        die "pid $OBOE_PID is not the oboe process (CPU/RSS would be measured on the wrong process)"
    check_ok_body oboe "http://127.0.0.1:$OBOE_PORT/"
    log "oboe: pid $OBOE_PID, port $OBOE_PORT, admin $OBOE_ADMIN_PORT"
}

# `oboe dev` with its routes sent to the bench upstream: the development IdP,
# a validated `forward` route (/api/) and an On-Behalf-Of route (/graph/), in
# one process pinned like the others. The banner's minted user token is the
# caller token; after the first request the OBO route is served from the cache
# (the IdP in the same process is then idle).
start_oboe_dev() {
    local dir="$WORK_DIR/oboe-dev" i
    mkdir -p "$dir"
    (cd "$dir" && OBOE_LOG=warn exec taskset -c "$PROXY_CPU" "$OBOE_BIN" dev \
        --listen "127.0.0.1:$OBOE_DEV_PORT" --upstream "http://127.0.0.1:$UPSTREAM_PORT") \
        >"$dir/dev.out" 2>"$dir/dev.log" &
    OBOE_DEV_PID=$!
    PIDS+=("$OBOE_DEV_PID")
    for ((i = 0; i < 100; i++)); do
        TOKEN=$(sed -n 's/.*export TOKEN=//p' "$dir/dev.out" 2>/dev/null)
        [[ -n $TOKEN ]] && break
        sleep 0.1
    done
    [[ -n $TOKEN ]] || { show_log "$dir/dev.log"; die "oboe dev printed no token"; }
    for ((i = 0; i < 100; i++)); do
        curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$OBOE_DEV_PORT/graph/x" 2>/dev/null && break
        sleep 0.1
    done
    check_ok_body "oboe forward" "http://127.0.0.1:$OBOE_DEV_PORT/api/" -H "Authorization: Bearer $TOKEN"
    check_ok_body "oboe obo" "http://127.0.0.1:$OBOE_DEV_PORT/graph/" -H "Authorization: Bearer $TOKEN"
    log "oboe dev: pid $OBOE_DEV_PID, port $OBOE_DEV_PORT"
}

# wrk/oha header arguments for SETUP.
auth_args() {
    case "$1" in
        oboe-forward | oboe-obo) printf '%s\n' -H "Authorization: Bearer $TOKEN" ;;
    esac
}

stop_all() {
    local pid kids=() more=() i
    for pid in "${PIDS[@]}"; do
        mapfile -t more < <(children_of "$pid")
        kids+=("${more[@]}")
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}" "${kids[@]}"; do
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    if [[ -n $WORK_DIR && -d $WORK_DIR ]]; then
        if ((rc != 0)) || [[ ${BENCH_KEEP_WORKDIR:-0} == 1 ]]; then
            log "work dir kept for inspection: $WORK_DIR"
        else
            rm -rf "$WORK_DIR"
        fi
    fi
    exit "$rc"
}

# --------------------------------------------------------------------- measurement

# Prints the pids whose CPU time and RSS are charged to SETUP's proxy.
proxy_pids() {
    case "$1" in
        direct) ;;                            # no proxy
        nginx) children_of "$NGINX_PID" ;;    # the worker(s); the master is idle
        oboe) echo "$OBOE_PID" ;;             # all threads are in the process totals
        oboe-forward | oboe-obo) echo "$OBOE_DEV_PID" ;;
    esac
}

# Sum of utime+stime (clock ticks) over PIDS; /proc/PID/stat fields 14 and 15.
cpu_ticks() {
    local pid total=0 stat rest f
    for pid in "$@"; do
        stat=$(<"/proc/$pid/stat") || die "pid $pid vanished"
        rest=${stat##*) }         # the command name may contain spaces or ')'
        read -r -a f <<<"$rest"   # f[0] is field 3 (state)
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Sum of VmHWM (KiB) over PIDS.
peak_rss_kib() {
    local pid total=0 kb
    for pid in "$@"; do
        kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# Resets VmHWM to the current RSS (Linux >= 4.0), so each run reports its own peak.
reset_peak_rss() {
    local pid
    for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done
}

# Converts a wrk duration (e.g. 812.00us, 1.20ms, 2.01s) to microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") f = 1; else if (u == "ms") f = 1000; else if (u == "s") f = 1000000;
        else if (u == "m") f = 60000000; else { print "NaN"; exit }
        printf "%.1f", n * f }'
}

url_for() {
    case "$1" in
        direct) echo "http://127.0.0.1:$UPSTREAM_PORT/" ;;
        nginx) echo "http://127.0.0.1:$NGINX_PORT/" ;;
        oboe) echo "http://127.0.0.1:$OBOE_PORT/" ;;
        oboe-forward) echo "http://127.0.0.1:$OBOE_DEV_PORT/api/" ;;
        oboe-obo) echo "http://127.0.0.1:$OBOE_DEV_PORT/graph/" ;;
    esac
}

# Puts the upstream where SETUP wants it (see the pinning note at the top).
place_upstream() {
    if [[ $1 == direct ]]; then
        pin_tree "$UPSTREAM_PID" "$PROXY_CPU"
    else
        pin_tree "$UPSTREAM_PID" "$LOAD_CPU"
    fi
}

# One measured wrk run; appends a row to $RUNS_TSV.
measure() {
    local setup=$1 conns=$2 rep=$3 url out pid pids=() t0=0 t1=0
    url=$(url_for "$setup")
    out="$WORK_DIR/wrk-$setup-c$conns-r$rep.txt"
    mapfile -t pids < <(proxy_pids "$setup")
    if [[ $setup != direct ]]; then
        ((${#pids[@]})) || die "$setup: no proxy process found"
        reset_peak_rss "${pids[@]}"
        t0=$(cpu_ticks "${pids[@]}")
    fi

    local auth=()
    mapfile -t auth < <(auth_args "$setup")
    taskset -c "$LOAD_CPU" wrk -t1 -c "$conns" -d "$DURATION" --timeout 5s --latency "${auth[@]}" "$url" >"$out" 2>&1 ||
        { show_log "$out"; die "wrk failed against $setup ($url)"; }

    local cpu_us=NaN rss_mib=NaN
    if [[ $setup != direct ]]; then
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "$setup: proxy pid $pid died during the run"
        done
        t1=$(cpu_ticks "${pids[@]}")
        rss_mib=$(awk -v k="$(peak_rss_kib "${pids[@]}")" 'BEGIN { printf "%.1f", k / 1024 }')
    fi

    local requests rps p50 p99 non2xx sockerr
    requests=$(awk '/ requests in / {print $1}' "$out")
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(awk '$1 == "50%" {print $2}' "$out")
    p99=$(awk '$1 == "99%" {print $2}' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    sockerr=$(awk -F'[ ,]+' '/Socket errors:/ {print $4 + $6 + $8 + $10}' "$out")
    [[ -n $requests && -n $rps && -n $p50 && -n $p99 ]] || { show_log "$out"; die "could not parse wrk output ($out)"; }
    ((requests > 0)) || { show_log "$out"; die "$setup: wrk completed no request"; }
    p50=$(to_us "$p50")
    p99=$(to_us "$p99")
    if [[ $setup != direct ]]; then
        cpu_us=$(awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$setup" "$conns" "$rep" "$rps" "$requests" "$p50" "$p99" "$cpu_us" \
        "$rss_mib" "${non2xx:-0}" "${sockerr:-0}" >>"$RUNS_TSV"
    log "$(printf '%-6s c=%-4s #%s %10s req/s  p50 %8s us  p99 %8s us  cpu %6s us/req  rss %5s MiB  non2xx %s  sockerr %s' \
        "$setup" "$conns" "$rep" "$rps" "$p50" "$p99" "$cpu_us" "$rss_mib" "${non2xx:-0}" "${sockerr:-0}")"
}

# One open-loop oha run at $RATE req/s; appends a row to $RATE_TSV.
measure_open_loop() {
    local setup=$1 rep=$2 url out pid pids=() t0=0 t1=0 row ok cpu_us=NaN rss_mib=NaN
    url=$(url_for "$setup")
    out="$WORK_DIR/oha-$setup-r$rep.json"
    mapfile -t pids < <(proxy_pids "$setup")
    if [[ $setup != direct ]]; then
        reset_peak_rss "${pids[@]}"
        t0=$(cpu_ticks "${pids[@]}")
    fi
    # One runtime thread: oha is pinned to one core like wrk.
    local auth=()
    mapfile -t auth < <(auth_args "$setup")
    taskset -c "$LOAD_CPU" oha --no-tui --worker-threads 1 "${auth[@]}" -z "$DURATION" -c "$RATE_CONNECTIONS" \
        -q "$RATE" --latency-correction -t 5s --output-format json "$url" >"$out" 2>"$out.err" ||
        { show_log "$out.err"; die "oha failed against $setup ($url)"; }
    if [[ $setup != direct ]]; then
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "$setup: proxy pid $pid died during the run"
        done
        t1=$(cpu_ticks "${pids[@]}")
        rss_mib=$(awk -v k="$(peak_rss_kib "${pids[@]}")" 'BEGIN { printf "%.1f", k / 1024 }')
    fi
    # rps, p50_us, p99_us, p999_us, ok, errors (tab-separated)
    row=$(python3 "$SCRIPT_DIR/report.py" --parse-oha "$out") || die "could not parse oha output ($out)"
    ok=$(cut -f5 <<<"$row")
    ((ok > 0)) || die "$setup: oha completed no successful request"
    if [[ $setup != direct ]]; then
        cpu_us=$(awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$ok" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$setup" "$RATE" "$RATE_CONNECTIONS" "$rep" "$row" "$cpu_us" "$rss_mib" >>"$RATE_TSV"
    log "$(printf '%-6s open loop %s req/s c=%s #%s: rps p50 p99 p99.9 ok err = %s  cpu %s us/req  rss %s MiB' \
        "$setup" "$RATE" "$RATE_CONNECTIONS" "$rep" "$(tr '\t' ' ' <<<"$row")" "$cpu_us" "$rss_mib")"
}

run_matrix() {
    local setup conns rep auth=()
    for setup in $SETUPS; do
        place_upstream "$setup"
        for conns in $CONNECTIONS; do
            if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
                mapfile -t auth < <(auth_args "$setup")
                taskset -c "$LOAD_CPU" wrk -t1 -c "$conns" -d "$WARMUP" --timeout 5s "${auth[@]}" "$(url_for "$setup")" >/dev/null 2>&1 ||
                    die "warm-up wrk failed against $setup"
            fi
            for ((rep = 1; rep <= REPEAT; rep++)); do
                measure "$setup" "$conns" "$rep"
            done
        done
        if ((RATE > 0)); then
            for ((rep = 1; rep <= REPEAT; rep++)); do
                measure_open_loop "$setup" "$rep"
            done
        fi
    done
}

# ---------------------------------------------------------------------------- main

main() {
    parse_args "$@"
    (($(nproc --all) >= 2)) || die "needs at least 2 CPUs (found $(nproc --all))"
    install_tools
    case " $SETUPS " in *" oboe"*) build_oboe ;; esac

    BACKGROUND_CPU=$(background_cpu_pct)
    if ((BACKGROUND_CPU > 10)); then
        log "WARNING: the machine is already ${BACKGROUND_CPU}% busy before the benchmark; results will be noisy"
    fi

    WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/oboe-bench.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)"

    read -r UPSTREAM_PORT NGINX_PORT OBOE_PORT OBOE_ADMIN_PORT OBOE_DEV_PORT < <(free_ports 5)
    start_upstream
    case " $SETUPS " in *" nginx "*) start_nginx_proxy ;; esac
    case " $SETUPS " in *" oboe "*) start_oboe ;; esac
    case " $SETUPS " in *" oboe-forward "* | *" oboe-obo "*) start_oboe_dev ;; esac

    CLK_TCK=$(getconf CLK_TCK)
    mkdir -p "$OUT_DIR"
    RUNS_TSV="$OUT_DIR/runs.tsv"
    printf 'setup\tconnections\trepeat\trps\trequests\tp50_us\tp99_us\tcpu_us_per_req\tpeak_rss_mib\tnon2xx\tsocket_errors\n' >"$RUNS_TSV"
    RATE_TSV="$OUT_DIR/open-loop.tsv"
    rm -f "$RATE_TSV"
    ((RATE == 0)) ||
        printf 'setup\trate\tconnections\trepeat\trps\tp50_us\tp99_us\tp999_us\tok\terrors\tcpu_us_per_req\tpeak_rss_mib\n' >"$RATE_TSV"
    log "plan: setups [$SETUPS] x connections [$CONNECTIONS] x $REPEAT repeat(s) x $DURATION (+ $WARMUP warm-up each)"
    run_matrix

    local header
    header="oboe bench — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc --all) CPUs, wrk -t1 -d $DURATION, $REPEAT repeat(s); "
    header+="wrk on CPU $LOAD_CPU, proxy on CPU $PROXY_CPU, upstream on CPU $LOAD_CPU (direct: $PROXY_CPU); "
    header+="background CPU before start ${BACKGROUND_CPU}%; "
    header+="oboe $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '(no commit)'), $(nginx -v 2>&1 | sed 's/.*: //')"
    python3 "$SCRIPT_DIR/report.py" "$RUNS_TSV" "$header" "$RATE_TSV" | tee "$OUT_DIR/results.md"
    log "table written to $OUT_DIR/results.md, raw runs in $RUNS_TSV"
}

main "$@"
