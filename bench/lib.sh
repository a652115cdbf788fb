# bench/lib.sh — helpers shared by bench/run.sh and bench/shared_cache.sh.
# Sourced, not run: each script defines its own `log` and `die` (with its own
# prefix) and, where used, READY_TIMEOUT and IDP_URL.

# Prints the last lines of a log file, indented, to stderr.
show_log() {
    [[ -f $1 ]] || return 0
    log "--- last lines of $1:"
    tail -n 20 "$1" | sed 's/^/    /' >&2
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

machine_line() {
    local cpu
    cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    echo "$(nproc --all) × ${cpu:-unknown CPU}, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
}

# Converts a wrk duration (e.g. 812.00us, 1.20ms, 2.01s) to microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") f = 1; else if (u == "ms") f = 1000; else if (u == "s") f = 1000000;
        else if (u == "m") f = 60000000; else { print "NaN"; exit }
        printf "%.1f", n * f }'
}

# Token requests the dev IdP has answered so far.
idp_token_requests() {
    curl --noproxy '*' -sf --max-time 2 "$IDP_URL/.dev/counters" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])' ||
        die "could not read the dev IdP's counters"
}
