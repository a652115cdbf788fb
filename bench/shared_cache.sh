#!/usr/bin/env bash
# bench/shared_cache.sh — the shared (Redis L2) token cache of issue 7 under load,
# on loopback, side by side in one run:
#   (a) L1 hit with vs without L2: one user's token repeated through a replica with
#       `cache.shared` and one without (wrk closed loop, with/without alternating);
#   (b) the added latency of an L2 hit: a freshly started replica serving users
#       another replica already exchanged (Redis GET + decrypt), against the L1
#       hit of the same users on the same replica (wrk -c1, each user once);
#   (c) IdP token requests for --users users across 2 replicas, with vs without L2.
#
#   bash bench/shared_cache.sh [--duration 5s] [--repeat 3] [--connections 32]
#                              [--warmup 2s] [--users 1000] [--concurrency 16]
#                              [--skip-build]
#
# --duration/--connections/--warmup: each wrk run of (a); --repeat: wrk runs per
# replica in (a) and fresh replica starts in (b); --users: users in (b) and (c);
# --concurrency: connections per replica in (c). Takes about 1.5 minutes with the
# defaults (after the build).
#
# It installs what is missing (redis-server, wrk, nginx from Debian), builds
# `cargo build --release --locked` (unless --skip-build), and starts on 127.0.0.1,
# each on a free port, in a temp dir, all stopped on exit: redis-server (no
# persistence), an nginx upstream (`return 200 "ok\n"`), `oboe dev` as the IdP
# (it mints the user tokens, ES256, one user each, and counts the token requests
# it answers: GET /.dev/counters), and four `oboe run` replicas of one app
# registration (the dev IdP's oboe client): A and B with `cache.shared` (same
# Redis, same prefix, one AES-256 key generated here), C and D without.
#
# Pinning (2 cores): wrk, the Python driver, nginx, redis-server and the dev IdP
# on core 0 (BENCH_LOAD_CPU); every oboe replica on core 1 (BENCH_PROXY_CPU), so
# its runtime sizes itself to one CPU, as in bench/run.sh.
#
# Output: Markdown on stdout and in bench/out/shared-cache.md; raw rows in
# bench/out/shared-cache-{throughput,latency,idp}.tsv. BENCH_KEEP_WORKDIR=1 keeps
# the temp dir (configs, logs, raw wrk output); it is always kept on failure.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
HELP_DIR="$SCRIPT_DIR/shared-cache"
TOOLS="$HELP_DIR/tools.py"
OUT_DIR="$SCRIPT_DIR/out"
OBOE_BIN="$REPO_DIR/target/release/oboe"

DURATION=5s
REPEAT=3
CONNECTIONS=32
WARMUP=2s
USERS=1000
CONCURRENCY=16
SKIP_BUILD=0
LOAD_CPU=${BENCH_LOAD_CPU:-0}
PROXY_CPU=${BENCH_PROXY_CPU:-1}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-30}

WORK_DIR=""
PIDS=()
declare -A PORT=() ADMIN=() PID=() SHARED=()
REDIS_PORT="" UPSTREAM_PORT="" DEV_PORT=""
TOKEN="" IDP_URL="" TENANT="" CLIENT_ID="" SECRET_FILE="" KEY_FILE="" USERS_FILE=""
CLK_TCK=100

# ---------------------------------------------------------------------------- utils

log() { printf '[shared-cache %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

# Helpers shared with the other bench script.
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

parse_args() {
    while (($#)); do
        case "$1" in
            --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
            --repeat) REPEAT=${2:?--repeat needs a value}; shift 2 ;;
            --connections) CONNECTIONS=${2:?--connections needs a value}; shift 2 ;;
            --warmup) WARMUP=${2:?--warmup needs a value}; shift 2 ;;
            --users) USERS=${2:?--users needs a value}; shift 2 ;;
            --concurrency) CONCURRENCY=${2:?--concurrency needs a value}; shift 2 ;;
            --skip-build) SKIP_BUILD=1; shift ;;
            -h | --help) usage 0 ;;
            *) log "unknown argument: $1"; usage 2 ;;
        esac
    done
    [[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive integer, got '$REPEAT'"
    [[ $DURATION =~ ^[1-9][0-9]*[smh]?$ ]] || die "--duration must look like 5s, got '$DURATION'"
    [[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "--warmup must look like 2s, got '$WARMUP'"
    [[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "--connections must be a positive integer"
    [[ $USERS =~ ^[1-9][0-9]*$ ]] || die "--users must be a positive integer, got '$USERS'"
    [[ $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || die "--concurrency must be a positive integer"
}

curl_q() { curl --noproxy '*' -s --max-time 5 "$@"; }

# GET URL with the user token TOK must answer 200 "ok".
check_ok() {
    local name=$1 url=$2 tok=$3 body
    body=$(curl_q -f -H "Authorization: Bearer $tok" "$url") || die "$name: GET $url failed"
    [[ $body == ok ]] || die "$name: GET $url answered '$body', expected 'ok'"
}

# ----------------------------------------------------------------- install & build

install_tools() {
    local missing=()
    export PATH="$PATH:/usr/sbin"
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    if ((${#missing[@]})); then
        local sudo=()
        ((EUID == 0)) || sudo=(sudo)
        log "installing ${missing[*]} with apt-get"
        "${sudo[@]}" apt-get update -qq
        if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null; then
            # nginx-light is gone in newer Debian releases.
            missing=("${missing[@]/nginx-light/nginx}")
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null ||
                die "apt-get install ${missing[*]} failed"
        fi
    fi
    local tool
    for tool in redis-server redis-cli wrk nginx taskset curl python3; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
}

build_oboe() {
    if ((SKIP_BUILD)); then
        log "--skip-build: using existing $OBOE_BIN"
    else
        log "building oboe (cargo build --release --locked)"
        (cd "$REPO_DIR" && cargo build --release --locked) || die "cargo build --release --locked failed"
    fi
    [[ -x $OBOE_BIN ]] || die "$OBOE_BIN does not exist"
}

# ------------------------------------------------------------------------- servers

start_redis() {
    local dir="$WORK_DIR/redis" i
    mkdir -p "$dir"
    taskset -c "$LOAD_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$dir" --logfile "$dir/redis.log" --daemonize no >"$dir/stdout.log" 2>&1 &
    PID[redis]=$!
    PIDS+=("${PID[redis]}")
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
        kill -0 "${PID[redis]}" 2>/dev/null || { show_log "$dir/redis.log"; die "redis-server exited"; }
        sleep 0.1
    done
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] || die "redis-server does not answer PING"
    log "redis-server: pid ${PID[redis]}, port $REDIS_PORT, $(redis-server --version | awk '{print $3}')"
}

start_upstream() {
    local dir="$WORK_DIR/upstream"
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/configtest.log" ||
        { show_log "$dir/configtest.log"; die "upstream nginx: config test failed"; }
    taskset -c "$LOAD_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    PID[upstream]=$!
    PIDS+=("${PID[upstream]}")
    wait_http_200 "upstream nginx" "http://127.0.0.1:$UPSTREAM_PORT/" "${PID[upstream]}" "$dir/error.log"
    log "upstream nginx: pid ${PID[upstream]}, port $UPSTREAM_PORT"
}

# `oboe dev` as the IdP: mints TOTAL user tokens (ES256, one user each) into
# USERS_FILE, and registers oboe's client with the secret we write.
start_dev_idp() {
    local total=$1 dir="$WORK_DIR/oboe-dev" i
    mkdir -p "$dir"
    SECRET_FILE="$dir/client-secret"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$SECRET_FILE")
    USERS_FILE="$dir/users.txt"
    (cd "$dir" && OBOE_LOG=info exec taskset -c "$LOAD_CPU" "$OBOE_BIN" dev \
        --listen "127.0.0.1:$DEV_PORT" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
        --client-secret-file "$SECRET_FILE" --mint-users "$total" --mint-file "$USERS_FILE") \
        >"$dir/dev.out" 2>"$dir/dev.log" &
    PID[dev]=$!
    PIDS+=("${PID[dev]}")
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        TOKEN=$(sed -n 's/.*export TOKEN=//p' "$dir/dev.out" 2>/dev/null || true)
        [[ -n $TOKEN ]] && break
        kill -0 "${PID[dev]}" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $TOKEN ]] || { show_log "$dir/dev.log"; die "oboe dev printed no token"; }
    IDP_URL=$(sed -n 's/^ *idp *\(http[^ ]*\).*/\1/p' "$dir/dev.out")
    [[ -n $IDP_URL ]] || die "oboe dev printed no idp URL"
    # The dev tenant (DEV_TENANT) and oboe's client id (DEV_OBOE_CLIENT_ID, the
    # audience api://<id> of its user tokens), as the tokens carry them.
    IFS=$'\t' read -r TENANT CLIENT_ID < <(python3 "$TOOLS" claims "$TOKEN")
    CLIENT_ID=${CLIENT_ID#api://}
    [[ -n $TENANT && -n $CLIENT_ID ]] || die "could not read tid/aud from the dev token"
    wait_http_200 "dev IdP" "$IDP_URL/.dev/counters" "${PID[dev]}" "$dir/dev.log"
    [[ $(wc -l <"$USERS_FILE") -eq $total ]] || die "oboe dev wrote $(wc -l <"$USERS_FILE") user tokens, expected $total"
    log "dev IdP: pid ${PID[dev]}, $IDP_URL, tenant $TENANT, client $CLIENT_ID, $total user tokens"
}

# The route file of one replica: the dev IdP's oboe client, a validated forward
# route (/api/, used to warm the verified-token cache) and an OBO route
# (/graph/); with SHARED=1 also `cache.shared` on our Redis.
replica_yaml() {
    local name=$1
    cat <<EOF
listen: 127.0.0.1:${PORT[$name]}
admin: { listen: 127.0.0.1:${ADMIN[$name]} }
identity:
  provider: entra
  instance: $IDP_URL
  tenant_id: $TENANT
  client_id: $CLIENT_ID
  credential:
    client_secret: { file: $SECRET_FILE }
inbound:
  algorithms: [RS256, ES256]
EOF
    if [[ ${SHARED[$name]} == 1 ]]; then
        cat <<EOF
cache:
  shared:
    url: redis://127.0.0.1:$REDIS_PORT
    key_prefix: "bench:"
    encryption_keys:
      - { id: bench, key: { file: $KEY_FILE } }
EOF
    fi
    cat <<EOF
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:$UPSTREAM_PORT/api/
    caller: { required: true }
    token: { grant: forward }
  - name: graph
    path_prefix: /graph/
    upstream: http://127.0.0.1:$UPSTREAM_PORT/v1.0/
    caller: { required: true, kinds: [user] }
    token: { grant: on_behalf_of, scopes: [https://graph.microsoft.com/User.Read] }
EOF
}

# Starts replica NAME (pinned to the proxy core) and waits for /readyz.
start_replica() {
    local name=$1 dir="$WORK_DIR/replica-$1"
    mkdir -p "$dir"
    replica_yaml "$name" >"$dir/oboe.yaml"
    (cd "$dir" && OBOE_LOG=warn exec taskset -c "$PROXY_CPU" "$OBOE_BIN" run --config "$dir/oboe.yaml") \
        >>"$dir/oboe.log" 2>&1 &
    PID[$name]=$!
    PIDS+=("${PID[$name]}")
    wait_http_200 "replica $name" "http://127.0.0.1:${ADMIN[$name]}/readyz" "${PID[$name]}" "$dir/oboe.log"
    [[ $(cat "/proc/${PID[$name]}/comm" 2>/dev/null) == oboe ]] ||
        die "pid ${PID[$name]} is not the oboe process"
    log "replica $name ($([[ ${SHARED[$name]} == 1 ]] && echo "with L2" || echo "without L2")): pid ${PID[$name]}, port ${PORT[$name]}, admin ${ADMIN[$name]}"
}

# Stops PID (one we started) and waits for it.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

restart_replica() {
    local name=$1 old=${PID[$1]} p keep=()
    stop_pid "$old"
    for p in "${PIDS[@]}"; do [[ $p == "$old" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    start_replica "$name"
}

stop_all() {
    local pid kids=() more=()
    for pid in "${PIDS[@]}"; do
        mapfile -t more < <(pgrep -P "$pid" || true)
        kids+=("${more[@]}")
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}" "${kids[@]}"; do
        stop_pid "$pid"
    done
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

# One read of replica NAME's /metrics: for each SPEC (METRIC or METRIC:LABEL=VALUE)
# the sum of its samples, space-separated.
metrics() {
    local name=$1
    shift
    python3 "$TOOLS" metrics "http://127.0.0.1:${ADMIN[$name]}" "$@" || die "could not read metrics of replica $name"
}

# The L2 lookups of replica NAME by outcome, then its IdP exchanges (integers).
L2_SPECS=(oboe_shared_cache_total:outcome=hit oboe_shared_cache_total:outcome=miss
    oboe_shared_cache_total:outcome=waited oboe_shared_cache_total:outcome=wait_timeout
    oboe_shared_cache_total:outcome=skipped oboe_exchanges_total
    oboe_shared_cache_errors_total:reason=timeout oboe_shared_cache_errors_total)

# Calls of every Redis command but INFO since the server started.
redis_calls() {
    redis-cli -p "$REDIS_PORT" info commandstats |
        awk -F'[:=,]' '/^cmdstat_/ && $1 != "cmdstat_info" { n += $3 } END { print n + 0 }'
}

# Users SLICE (0-based) of USERS_FILE, USERS tokens, into a file; prints its path.
slice() {
    local k=$1 path="$WORK_DIR/users-$1.txt"
    [[ -f $path ]] || sed -n "$((k * USERS + 1)),$(((k + 1) * USERS))p" "$USERS_FILE" >"$path"
    [[ $(wc -l <"$path") -eq $USERS ]] || die "user slice $k has $(wc -l <"$path") tokens, expected $USERS"
    echo "$path"
}

# (a) One closed-loop wrk run against replica NAME's OBO route with the banner
# token (an L1 hit after the first request); appends a row to throughput.tsv.
measure_throughput() {
    local name=$1 label=$2 rep=$3 out="$WORK_DIR/wrk-a-$1-r$3.txt" t0 t1 r0 r1 l0 l1
    r0=$(redis_calls)
    l0=$(metrics "$name" oboe_shared_cache_total)
    t0=$(cpu_ticks "${PID[$name]}")
    taskset -c "$LOAD_CPU" wrk -t1 -c "$CONNECTIONS" -d "$DURATION" --timeout 5s --latency \
        -H "Authorization: Bearer $TOKEN" -s "$HELP_DIR/p999.lua" "http://127.0.0.1:${PORT[$name]}/graph/" \
        >"$out" 2>&1 || { show_log "$out"; die "wrk failed against replica $name"; }
    t1=$(cpu_ticks "${PID[$name]}")
    r1=$(redis_calls)
    l1=$(metrics "$name" oboe_shared_cache_total)
    kill -0 "${PID[$name]}" 2>/dev/null || die "replica $name died during the run"
    local requests rps p50 p99 p999 non2xx sockerr cpu_us
    requests=$(awk '/ requests in / {print $1}' "$out")
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
    p999=$(awk '$1 == "p99.9_us:" {print $2}' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    sockerr=$(awk -F'[ ,]+' '/Socket errors:/ {print $4 + $6 + $8 + $10}' "$out")
    if [[ -z $requests || -z $rps ]] || ((requests == 0)); then
        show_log "$out"
        die "could not parse wrk output ($out)"
    fi
    cpu_us=$(awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$name" "$CONNECTIONS" "$rep" "$rps" \
        "$requests" "$p50" "$p99" "${p999:-NaN}" "$cpu_us" "$((r1 - r0))" "${non2xx:-0}" "${sockerr:-0}" \
        >>"$WORK_DIR/throughput.tsv"
    log "$(printf '(a) %-10s #%s %10s req/s  p50 %7s us  p99 %7s us  p99.9 %7s us  cpu %6s us/req  redis cmds %s  L2 lookups %s  non2xx %s' \
        "$label" "$rep" "$rps" "$p50" "$p99" "${p999:-NaN}" "$cpu_us" "$((r1 - r0))" \
        "$(awk -v a="$l0" -v b="$l1" 'BEGIN { print b - a }')" "${non2xx:-0}")"
}

# (b) Sends each token of FILE once, one request at a time (wrk -t1 -c1 with
# once.lua), to replica NAME at PATH; records the latency row CASE (unless
# CASE is "-") with the IdP requests and L2 lookups it caused.
pass_once() {
    local case=$1 rep=$2 name=$3 path=$4 file=$5
    local out="$WORK_DIR/wrk-b-$case-$name-r$rep.txt" done_file="$WORK_DIR/once.done" wrk_pid i
    local idp0 idp1 h0 h1 m0 m1 s0 s1 c0 c1 e0 e1
    rm -f "$done_file"
    idp0=$(idp_token_requests)
    read -r h0 m0 s0 c0 e0 < <(metrics "$name" oboe_shared_cache_total:outcome=hit oboe_shared_cache_total:outcome=miss \
        oboe_shared_cache_duration_seconds_sum oboe_shared_cache_duration_seconds_count oboe_shared_cache_errors_total)
    [[ -n $e0 ]] || die "could not read the metrics of replica $name"
    taskset -c "$LOAD_CPU" wrk -t1 -c1 -d 600s --timeout 10s -s "$HELP_DIR/once.lua" \
        "http://127.0.0.1:${PORT[$name]}$path" -- "$file" "$done_file" >"$out" 2>&1 &
    wrk_pid=$!
    for ((i = 0; i < 6000; i++)); do
        [[ -f $done_file ]] && break
        kill -0 "$wrk_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" || true
    [[ -f $done_file ]] || { show_log "$out"; die "($case) wrk did not get through $file"; }
    sleep 0.2
    idp1=$(idp_token_requests)
    read -r h1 m1 s1 c1 e1 < <(metrics "$name" oboe_shared_cache_total:outcome=hit oboe_shared_cache_total:outcome=miss \
        oboe_shared_cache_duration_seconds_sum oboe_shared_cache_duration_seconds_count oboe_shared_cache_errors_total)
    [[ -n $e1 ]] || die "could not read the metrics of replica $name"
    local answered non200 mean p50 p90 p99 max
    answered=$(awk '$1 == "answered:" {print $2}' "$out")
    non200=$(awk '$1 == "non200:" {print $2}' "$out")
    mean=$(awk '$1 == "mean_us:" {print $2}' "$out")
    p50=$(awk '$1 == "p50_us:" {print $2}' "$out")
    p90=$(awk '$1 == "p90_us:" {print $2}' "$out")
    p99=$(awk '$1 == "p99_us:" {print $2}' "$out")
    max=$(awk '$1 == "max_us:" {print $2}' "$out")
    [[ $answered == "$USERS" ]] || { show_log "$out"; die "($case) $answered answers, expected $USERS"; }
    [[ $non200 == 0 ]] || { show_log "$out"; die "($case) $non200 answers were not 200"; }
    local idp=$((idp1 - idp0)) hits misses rtt errors
    hits=$(awk -v a="$h0" -v b="$h1" 'BEGIN { print b - a }')
    misses=$(awk -v a="$m0" -v b="$m1" 'BEGIN { print b - a }')
    errors=$(awk -v a="$e0" -v b="$e1" 'BEGIN { print b - a }')
    rtt=$(awk -v s0="$s0" -v s1="$s1" -v c0="$c0" -v c1="$c1" \
        'BEGIN { if (c1 > c0) printf "%.1f", (s1 - s0) * 1e6 / (c1 - c0); else print "NaN" }')
    log "$(printf '(b) %-8s #%s replica %s %-7s mean %8s us  p50 %8s us  p90 %8s us  p99 %8s us  max %9s us  IdP %4s  L2 hit/miss %s/%s  redis rtt %s us  redis errors %s' \
        "$case" "$rep" "$name" "$path" "$mean" "$p50" "$p90" "$p99" "$max" "$idp" "$hits" "$misses" "$rtt" "$errors")"
    # Each path must be what its row says it is.
    case "$case" in
        l2) [[ $idp == 0 && $hits == "$USERS" ]] || die "(l2) expected $USERS L2 hits and no IdP request, got $hits and $idp" ;;
        l1) [[ $idp == 0 && $hits == 0 && $misses == 0 ]] || die "(l1) expected no L2 lookup and no IdP request, got $hits/$misses and $idp" ;;
        miss_l2) [[ $idp == "$USERS" && $misses == "$USERS" ]] || die "(miss_l2) expected $USERS L2 misses and IdP requests, got $misses and $idp" ;;
        miss) [[ $idp == "$USERS" ]] || die "(miss) expected $USERS IdP requests, got $idp" ;;
        verify | -) [[ $idp == 0 ]] || die "($case) expected no IdP request, got $idp" ;;
    esac
    [[ $case == - ]] && return 0
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$rep" "$name" "$USERS" "$mean" "$p50" \
        "$p90" "$p99" "$max" "$idp" "$hits" "$misses" "$rtt" "$errors" >>"$WORK_DIR/latency.tsv"
}

# (c) Every token of FILE once to each of the two replicas, at the same time;
# appends a row to idp.tsv.
measure_idp() {
    local label=$1 file=$2 r1=$3 r2=$4 out="$WORK_DIR/drive-$3$4.json" idp0 idp1 x0 x1
    local a0 b0 a1 b1 i
    idp0=$(idp_token_requests)
    read -r -a a0 < <(metrics "$r1" "${L2_SPECS[@]}")
    read -r -a b0 < <(metrics "$r2" "${L2_SPECS[@]}")
    taskset -c "$LOAD_CPU" python3 "$TOOLS" drive "$file" "$CONCURRENCY" \
        "http://127.0.0.1:${PORT[$r1]}/graph/" "http://127.0.0.1:${PORT[$r2]}/graph/" >"$out" ||
        die "($label) the driver failed"
    sleep 0.3
    idp1=$(idp_token_requests)
    read -r -a a1 < <(metrics "$r1" "${L2_SPECS[@]}")
    read -r -a b1 < <(metrics "$r2" "${L2_SPECS[@]}")
    ((${#a0[@]} == 8 && ${#b0[@]} == 8 && ${#a1[@]} == 8 && ${#b1[@]} == 8)) ||
        die "($label) could not read the replicas' metrics"
    local d=()
    for ((i = 0; i < 5; i++)); do
        d+=("$((a1[i] + b1[i] - a0[i] - b0[i]))")
    done
    x0=$((a0[5] + b0[5])) x1=$((a1[5] + b1[5]))
    local requests ok seconds outcome_text
    read -r requests ok seconds < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
n = sum(sum(s.values()) for s in d["statuses"].values())
ok = sum(s.get("200", 0) for s in d["statuses"].values())
print(n, ok, d["seconds"])' "$out")
    if [[ ${SHARED[$r1]} == 1 ]]; then
        # waited and wait_timeout are misses that then waited for the other replica.
        outcome_text="hit ${d[0]}, miss ${d[1]} (of which waited ${d[2]}, wait_timeout ${d[3]}), skipped ${d[4]}"
        outcome_text+="; Redis errors $((a1[7] + b1[7] - a0[7] - b0[7])) (timeouts $((a1[6] + b1[6] - a0[6] - b0[6])))"
    else
        outcome_text="(no L2)"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$r1+$r2" "$USERS" "$CONCURRENCY" "$requests" "$ok" \
        "$((idp1 - idp0))" "$((x1 - x0))" "$outcome_text" "$seconds" >>"$WORK_DIR/idp.tsv"
    log "(c) $label: $USERS users, $requests requests ($ok answered 200) in ${seconds}s, IdP token requests $((idp1 - idp0)) (replicas' oboe_exchanges_total: $((x1 - x0))); L2: $outcome_text"
    ((ok == requests)) || die "($label) $((requests - ok)) requests were not answered 200: $(cat "$out")"
}

# ---------------------------------------------------------------------------- main

main() {
    parse_args "$@"
    (($(nproc --all) >= 2)) || die "needs at least 2 CPUs (found $(nproc --all))"
    install_tools
    build_oboe

    local background
    background=$(background_cpu_pct)
    ((background <= 10)) || log "WARNING: the machine is already ${background}% busy before the benchmark; results will be noisy"

    WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/oboe-shared-cache.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    mkdir -p "$OUT_DIR"
    CLK_TCK=$(getconf CLK_TCK)

    local ports
    read -r -a ports < <(python3 "$TOOLS" ports 11)
    REDIS_PORT=${ports[0]} UPSTREAM_PORT=${ports[1]} DEV_PORT=${ports[2]}
    PORT=([A]=${ports[3]} [B]=${ports[4]} [C]=${ports[5]} [D]=${ports[6]})
    ADMIN=([A]=${ports[7]} [B]=${ports[8]} [C]=${ports[9]} [D]=${ports[10]})
    SHARED=([A]=1 [B]=1 [C]=0 [D]=0)

    # User slices: 0 for (c) with L2 and the L2/L1 passes of (b), 1 for (c)
    # without L2, then per repeat of (b) one for the miss with L2 and one for the
    # miss without.
    local total=$(((2 + 2 * REPEAT) * USERS))
    KEY_FILE="$WORK_DIR/cache-key"
    (umask 077 && python3 "$TOOLS" keygen >"$KEY_FILE")
    start_redis
    start_upstream
    start_dev_idp "$total"
    local k
    for ((k = 0; k < 2 + 2 * REPEAT; k++)); do slice "$k" >/dev/null; done
    local r
    for r in A B C D; do start_replica "$r"; done
    for r in A B C D; do
        check_ok "replica $r forward" "http://127.0.0.1:${PORT[$r]}/api/" "$TOKEN"
    done

    printf 'replica\tname\tconnections\trepeat\trps\trequests\tp50_us\tp99_us\tp999_us\tcpu_us_per_req\tredis_commands\tnon2xx\tsocket_errors\n' \
        >"$WORK_DIR/throughput.tsv"
    printf 'case\trepeat\treplica\trequests\tmean_us\tp50_us\tp90_us\tp99_us\tmax_us\tidp_requests\tl2_hit\tl2_miss\tredis_rtt_us\tredis_errors\n' \
        >"$WORK_DIR/latency.tsv"
    printf 'setup\treplicas\tusers\tconcurrency\trequests\tok\tidp_requests\toboe_exchanges\tl2_outcomes\tseconds\n' \
        >"$WORK_DIR/idp.tsv"

    # (a) L1 hit, with (A) vs without (C) L2, alternating.
    log "(a) L1 hit: banner user on A (with L2) and C (without), wrk -c$CONNECTIONS -d $DURATION, $REPEAT repeat(s)"
    for r in A C; do
        check_ok "replica $r obo" "http://127.0.0.1:${PORT[$r]}/graph/" "$TOKEN"
        if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
            taskset -c "$LOAD_CPU" wrk -t1 -c "$CONNECTIONS" -d "$WARMUP" -H "Authorization: Bearer $TOKEN" \
                "http://127.0.0.1:${PORT[$r]}/graph/" >"$WORK_DIR/warmup-$r.txt" 2>&1 || die "warm-up wrk failed on $r"
        fi
    done
    local rep
    for ((rep = 1; rep <= REPEAT; rep++)); do
        if ((rep % 2)); then
            measure_throughput C "without L2" "$rep"
            measure_throughput A "with L2" "$rep"
        else
            measure_throughput A "with L2" "$rep"
            measure_throughput C "without L2" "$rep"
        fi
    done

    # (c) IdP token requests: users to both replicas at once. Each replica has
    # answered the banner user first (A and C in (a); B from L2, D from the IdP),
    # so its connections to the upstream, the IdP and Redis (opened lazily) are up.
    for r in B D; do
        check_ok "replica $r obo" "http://127.0.0.1:${PORT[$r]}/graph/" "$TOKEN"
    done
    log "(c) $USERS users, each to both replicas at once ($CONCURRENCY connections each)"
    measure_idp "2 replicas with L2 (A+B)" "$(slice 0)" A B
    measure_idp "2 replicas without L2 (C+D)" "$(slice 1)" C D

    # (b) L2 hit vs L1 hit on a fresh replica; IdP misses for context.
    log "(b) per-request latency, one at a time: $USERS users, $REPEAT fresh start(s) of B"
    for ((rep = 1; rep <= REPEAT; rep++)); do
        restart_replica B
        # Connections to the upstream and Redis: the banner user is in L2 (A wrote it).
        check_ok "replica B obo" "http://127.0.0.1:${PORT[B]}/graph/" "$TOKEN"
        pass_once verify "$rep" B /api/ "$(slice 0)"
        pass_once l2 "$rep" B /graph/ "$(slice 0)"
        pass_once l1 "$rep" B /graph/ "$(slice 0)"
        pass_once - "$rep" B /api/ "$(slice $((1 + rep)))"
        pass_once miss_l2 "$rep" B /graph/ "$(slice $((1 + rep)))"
        pass_once - "$rep" C /api/ "$(slice $((1 + REPEAT + rep)))"
        pass_once miss "$rep" C /graph/ "$(slice $((1 + REPEAT + rep)))"
    done

    # For inspection (BENCH_KEEP_WORKDIR=1): every replica's metrics, Redis's command stats.
    for r in A B C D; do
        curl_q "http://127.0.0.1:${ADMIN[$r]}/metrics" >"$WORK_DIR/metrics-$r.txt" || true
    done
    redis-cli -p "$REDIS_PORT" info commandstats >"$WORK_DIR/redis-commandstats.txt" || true

    local header versions
    versions="oboe $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '(no commit)')"
    [[ -n $(git -C "$REPO_DIR" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && versions+=" (+ uncommitted changes)"
    versions+=", redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
    versions+=", $(nginx -v 2>&1 | sed 's/.*: //'), wrk $(wrk --version 2>&1 | awk 'NR == 1 {print $2}' || true)"
    header="oboe bench/shared_cache.sh — $(date -u +%Y-%m-%dT%H:%MZ), $(machine_line); "
    header+="wrk, driver, nginx upstream, redis-server and dev IdP on CPU $LOAD_CPU, oboe replicas on CPU $PROXY_CPU; "
    header+="background CPU before start ${background}%; $versions"
    local name
    for name in throughput latency idp; do
        cp "$WORK_DIR/$name.tsv" "$OUT_DIR/shared-cache-$name.tsv"
    done
    python3 "$TOOLS" report "$WORK_DIR" "$header" | tee "$OUT_DIR/shared-cache.md"
    log "table written to $OUT_DIR/shared-cache.md, raw rows in $OUT_DIR/shared-cache-*.tsv"
}

# Sourcing the script (for experiments) defines the functions without running.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
