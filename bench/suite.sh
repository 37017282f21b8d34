#!/usr/bin/env bash
# The performance suite of quotad in one run, on a 2-core machine: quotad pinned to one core, the load
# generators (quotad-bench, h2load, redis-benchmark) to the other (taskset), one server at a time. Prints
# a table of medians, ratios and their targets, and leaves every raw result in the output directory.
#
# quotad runs with its defaults: authentication on (an admin token file for setup, an API key created
# with `quotad admin api-key create` for the load), --durability write, metrics on. Scenarios
# (BENCH_SCENARIOS, in this order by default):
#
#   concurrent  reserve and reserve+commit at 64 streams over 4 connections, against `health`; balance,
#               the same answer without accounting, as reserve's ceiling
#   sequential  one call in flight on one connection: p50 of reserve (and balance) against p50 of health
#   contention  reserve+commit by 64 clients on one environment against 64 environments
#   batch       reserve in batches of 100 (quotad-bench --batch-size) against unary reserve
#   redis       what teams build instead: a Lua script checking and decrementing a balance in Redis,
#               without persistence and with appendonly everysec, unpipelined and with -P 10
#   h2load      health, balance and reserve through an independent HTTP/2 client, and the tail latency of
#               reserve with 500 calls in flight
#   memory      RSS per environment at BENCH_MEMORY_ENVS environments, per open hold at BENCH_MEMORY_HOLDS
#   expiry      p99 of live reserve+commit while BENCH_EXPIRY_HOLDS holds expire in the same second
#
# Each round runs a scenario's measurements interleaved with its `health` baseline, rotating their
# order; medians over BENCH_REPEATS rounds. The figures are not asserted: a target missed is a row
# marked `miss`, and the exit status is non-zero only when a run failed (a tool error, or most calls
# answered with errors). About 17 minutes with the defaults; BENCH_SMOKE=1 runs every scenario once
# for about a second on small states (about a minute), to check that the suite still works.
#
# Environment (defaults in brackets; BENCH_SMOKE=1 changes those marked *):
#   BENCH_SCENARIOS     scenarios to run [all, as above]
#   BENCH_REPEATS       rounds [5; *1]
#   BENCH_DURATION      seconds recorded per run [5; *1]
#   BENCH_WARMUP        seconds of unrecorded load before each run [1; *0]
#   BENCH_MEMORY_ENVS   [1000000; *2000]   BENCH_MEMORY_HOLDS [1000000; *2000]
#   BENCH_EXPIRY_HOLDS  [1000000; *2000]   BENCH_EXPIRY_CONCURRENCY [16]
#   BENCH_OUT           results directory [a new temporary directory]
#   BENCH_PROFILE       cargo profile of the binaries: release or debug [release]
#   BENCH_BUILD         0: use the binaries as they are, without `cargo build` first [1]
#   BENCH_PORT          quotad's port; metrics on +1, Redis on +2 [50261]
#   BENCH_SERVER_CORE, BENCH_CLIENT_CORE [0, 1]
#
# Results: raw/ holds each run's JSON (quotad-bench's, or what this script made of h2load's and
# redis-benchmark's output) and the cores each run used (.cpu); logs/ the servers' and tools' output;
# summary.txt and summary.json the table. All traffic goes to 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=$ROOT/bench/suite_tools.py
ALL_SCENARIOS="concurrent sequential contention batch redis h2load memory expiry"

SMOKE=${BENCH_SMOKE:-0}
smoke_or() { if [ "$SMOKE" = 1 ]; then echo "$1"; else echo "$2"; fi; }
SCENARIOS=${BENCH_SCENARIOS:-$ALL_SCENARIOS}
REPEATS=${BENCH_REPEATS:-$(smoke_or 1 5)}
DURATION=${BENCH_DURATION:-$(smoke_or 1 5)}
WARMUP=${BENCH_WARMUP:-$(smoke_or 0 1)}
MEMORY_ENVS=${BENCH_MEMORY_ENVS:-$(smoke_or 2000 1000000)}
MEMORY_HOLDS=${BENCH_MEMORY_HOLDS:-$(smoke_or 2000 1000000)}
EXPIRY_HOLDS=${BENCH_EXPIRY_HOLDS:-$(smoke_or 2000 1000000)}
EXPIRY_CONCURRENCY=${BENCH_EXPIRY_CONCURRENCY:-16}
# Seconds of live load in the expiry scenario before and after the expiry second.
EXPIRY_BEFORE=$(smoke_or 2 5)
EXPIRY_AFTER=$(smoke_or 3 10)
PROFILE=${BENCH_PROFILE:-release}
BUILD=${BENCH_BUILD:-1}
PORT=${BENCH_PORT:-50261}
METRICS_PORT=$((PORT + 1))
REDIS_PORT=$((PORT + 2))
SERVER_CORE=${BENCH_SERVER_CORE:-0}
CLIENT_CORE=${BENCH_CLIENT_CORE:-1}
# Environments set up for the load, which quotad-bench spreads over as many as its default (64, as
# many as streams), so that only the contention scenario meets on one.
ENVIRONMENTS=64
# The balance key of the Redis scenario, and a balance no run can use up.
REDIS_KEY=balance:bench
REDIS_BALANCE=1000000000000000

OUT=${BENCH_OUT:-$(mktemp -d -t quotad-suite.XXXXXX)}
if [ -n "$(ls -A "$OUT/raw" 2>/dev/null)" ]; then
    echo "bench/suite.sh: $OUT/raw holds the results of an earlier run; give another BENCH_OUT" >&2
    exit 1
fi
mkdir -p "$OUT/raw" "$OUT/logs"
WORK=$(mktemp -d -t quotad-suite-data.XXXXXX)
SERVER_PID=""
SERVER_NAME=""
FAILURES=()
declare -A SKIPPED=()

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/suite.log" >&2; }
die() {
    log "error: $*"
    exit 1
}
# A run that failed: the suite goes on with the others and exits non-zero at the end.
fail() {
    log "FAILED: $*"
    FAILURES+=("$*")
}
skip() {
    log "$1: skipped: $2"
    SKIPPED[$1]=$2
}

cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

whole_seconds() {
    local value=${2%s}
    if ! [[ $value =~ ^[0-9]+$ ]] || [ "$value" -lt "$3" ]; then
        die "$1=$2: whole seconds, at least $3 (e.g. 5 or 5s)"
    fi
    echo "$value"
}
DURATION=$(whole_seconds BENCH_DURATION "$DURATION" 1)
WARMUP=$(whole_seconds BENCH_WARMUP "$WARMUP" 0)
for count in REPEATS MEMORY_ENVS MEMORY_HOLDS EXPIRY_HOLDS EXPIRY_CONCURRENCY; do
    [[ ${!count} =~ ^[1-9][0-9]*$ ]] || die "BENCH_$count=${!count}: a positive whole number"
done
for scenario in $SCENARIOS; do
    [[ " $ALL_SCENARIOS " == *" $scenario "* ]] || die "BENCH_SCENARIOS: unknown scenario $scenario ($ALL_SCENARIOS)"
done
for tool in taskset python3 cargo; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
[ "$(nproc)" -ge 2 ] || die "needs 2 cores to pin quotad and the load generators apart (nproc = $(nproc))"
for port in "$PORT" "$METRICS_PORT" "$REDIS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "127.0.0.1:$port is already in use; set BENCH_PORT"
    fi
done

case $PROFILE in
    release) build_flags=(--release) ;;
    debug) build_flags=() ;;
    *) die "BENCH_PROFILE=$PROFILE: release or debug" ;;
esac
if [ "$BUILD" != 0 ]; then
    log "building the $PROFILE binaries"
    (cd "$ROOT" && cargo build --locked --bins "${build_flags[@]}") 2>&1 | tail -n 1 >&2
fi
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
QUOTAD=$TARGET_DIR/$PROFILE/quotad
BENCH=$TARGET_DIR/$PROFILE/quotad-bench
if [ ! -x "$QUOTAD" ] || [ ! -x "$BENCH" ]; then
    die "no $PROFILE binaries in $TARGET_DIR/$PROFILE"
fi
SERVER=http://127.0.0.1:$PORT
METRICS=http://127.0.0.1:$METRICS_PORT/metrics

(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin-token")
ADMIN_TOKEN=$(cat "$WORK/admin-token")

# The batch, memory and expiry scenarios hold more than an API key may by default (100,000 open holds):
# batches of 100 at hundreds of thousands of items a second, a million holds. This raises that cap to
# the server's own (4,000,000) and nothing else; the other scenarios run on the defaults alone.
LIMITS_CONFIG=$OUT/quotad-limits.toml
cat >"$LIMITS_CONFIG" <<'EOF'
# Written by bench/suite.sh for its batch, memory and expiry scenarios: the embedded defaults, but for
# the open holds one API key may have, raised to the server's cap.
max_open_reservations_per_api_key = 4000000
EOF
CONFIG_NOTE="batch, memory and expiry use $LIMITS_CONFIG (max_open_reservations_per_api_key = 4,000,000); \
memory and expiry also --snapshot-interval 1h, so that no snapshot runs while they measure"

now_ms() { date +%s%3N; }

# --- Servers: one at a time, on the server core ----------------------------------------------------

# start_quotad NAME [quotad flags...]: a fresh quotad (new data directory) with its defaults and the
# admin token; returns once it listens.
start_quotad() {
    local name=$1 deadline
    shift
    [ -z "$SERVER_PID" ] || die "$SERVER_NAME is still running: one server at a time"
    RUST_LOG=warn,quotad::server=info taskset -c "$SERVER_CORE" "$QUOTAD" --listen "127.0.0.1:$PORT" \
        --data-dir "$WORK/$name-data" --metrics-listen "127.0.0.1:$METRICS_PORT" \
        --admin-token-file "$WORK/admin-token" "$@" >"$OUT/logs/$name.quotad.log" 2>&1 &
    SERVER_PID=$!
    SERVER_NAME="quotad ($name)"
    deadline=$((SECONDS + 120))
    until grep -qs ' listening ' "$OUT/logs/$name.quotad.log"; do
        kill -0 "$SERVER_PID" 2>/dev/null || {
            cat "$OUT/logs/$name.quotad.log" >&2
            die "quotad exited before listening"
        }
        [ "$SECONDS" -lt "$deadline" ] || die "quotad not listening after 120 s"
        sleep 0.05
    done
}

# stop_server [SIGNAL]: SIGTERM by default (quotad drains and writes its final snapshot); SIGKILL where
# the state is thrown away anyway and its final snapshot would only cost time.
stop_server() {
    local signal=${1:-TERM} waited=0
    kill "-$signal" "$SERVER_PID" 2>/dev/null || true
    # Reaped at once after SIGKILL, so that bash's "Killed" notice goes to /dev/null with this `wait`.
    [ "$signal" != KILL ] || { wait "$SERVER_PID"; } 2>/dev/null || true
    while kill -0 "$SERVER_PID" 2>/dev/null && [ "$waited" -lt 600 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    { wait "$SERVER_PID"; } 2>/dev/null || true
    SERVER_PID=""
    SERVER_NAME=""
    rm -rf "$WORK"/*-data "$WORK"/redis
}

# setup_tenant NAME ENVIRONMENTS: the tenant `bench` and its environments, through the admin API; then
# an API key of the tenant, which the load sends (QUOTAD_TOKEN, read by quotad-bench).
setup_tenant() {
    local name=$1 environments=$2
    QUOTAD_TOKEN=$ADMIN_TOKEN taskset -c "$CLIENT_CORE" "$BENCH" --server "$SERVER" \
        --setup-environments "$environments" --json "$OUT/raw/$name-setup.json" >"$OUT/logs/$name-setup.txt" ||
        die "setup of $environments environments failed"
    QUOTAD_TOKEN=$(QUOTAD_TOKEN=$ADMIN_TOKEN taskset -c "$CLIENT_CORE" "$QUOTAD" admin --server "$SERVER" \
        --format json api-key create --tenant bench --description bench/suite.sh |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
    export QUOTAD_TOKEN
}

# --- Measured runs: on the client core, with the cores everyone used meanwhile ---------------------

busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# measured NAME STDOUT COMMAND...: runs COMMAND on the client core, its output in STDOUT and
# logs/NAME.err; raw/NAME.cpu gets the cores used meanwhile by the server, by COMMAND and by the rest of
# the machine (a shared machine shows there). Returns COMMAND's status.
measured() {
    local name=$1 stdout=$2 busy0 server0 started status=0 TIMEFORMAT='%U %S'
    shift 2
    busy0=$(busy_ticks)
    server0=$(proc_ticks "$SERVER_PID")
    started=$(now_ms)
    { time taskset -c "$CLIENT_CORE" "$@" >"$stdout" 2>"$OUT/logs/$name.err"; } 2>"$WORK/time" || status=$?
    python3 - "$(($(now_ms) - started))" "$(($(busy_ticks) - busy0))" \
        "$(($(proc_ticks "$SERVER_PID") - server0))" "$(cat "$WORK/time")" >"$OUT/raw/$name.cpu" <<'PY'
import json, sys
wall_s, busy, server = max(int(sys.argv[1]), 1) / 1000, int(sys.argv[2]) / 100, int(sys.argv[3]) / 100
client = sum(float(x) for x in sys.argv[4].split()[-2:])
print(json.dumps({k: round(v / wall_s, 2) for k, v in
                  {"server_cores": server, "client_cores": client, "other_cores": busy - server - client}.items()}))
PY
    return "$status"
}

# load NAME [quotad-bench flags...]: one recorded quotad-bench run with the API key; BENCH_WARMUP then
# BENCH_DURATION unless the flags say otherwise.
load() {
    local name=$1 arg warmup=(--warmup "${WARMUP}s") limit=(-z "${DURATION}s")
    shift
    for arg in "$@"; do
        case $arg in
            --warmup) warmup=() ;;
            -z | --duration | -n | --requests) limit=() ;;
        esac
    done
    if ! measured "$name" "$OUT/logs/$name.txt" "$BENCH" --server "$SERVER" --no-setup "${warmup[@]}" \
        "${limit[@]}" --json "$OUT/raw/$name.json" "$@"; then
        fail "$name: quotad-bench: $(tail -n 2 "$OUT/logs/$name.err" | tr '\n' ' ')"
        return 0
    fi
    log "  $name: $(grep 'latency in' "$OUT/logs/$name.txt" | tr -s ' ' | sed 's/^ //') $(cat "$OUT/raw/$name.cpu")"
}

# interleave PREFIX RUN...: BENCH_REPEATS rounds of the functions PREFIX_RUN, each round starting one
# run later than the one before, so that no run is always first (cold) or last.
interleave() {
    local prefix=$1 round i
    shift
    local runs=("$@")
    for round in $(seq 1 "$REPEATS"); do
        for i in "${!runs[@]}"; do
            "${prefix}_${runs[$(((i + round - 1) % ${#runs[@]}))]}" "$round"
        done
    done
}

json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# Waits (60 s at most) until the holds of a run of reserves alone have expired, so that the sweeper does
# not release them during the next run, and logs how long that took.
holds_expired() {
    local started deadline=$((SECONDS + 60))
    started=$(now_ms)
    until [ "$(python3 "$TOOLS" open-holds "$METRICS")" -eq 0 ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "  holds still open after 60 s: the next run pays for their expiry"
            return 0
        fi
        sleep 0.2
    done
    log "  its holds expired $(($(now_ms) - started)) ms after it ended"
}

# --- Scenarios ---------------------------------------------------------------------------------------

concurrent_health() { load "concurrent-health-r$1" --scenario health -c 64 --connections 4; }
# The same answer as a reservation's (a whole balance) without any accounting: the ceiling of `reserve`.
concurrent_balance() { load "concurrent-balance-r$1" --scenario balance -c 64 --connections 4; }
# Holds of 1 s: with quotad-bench's default of 30 s, a few seconds of reserves would pass the 100,000
# open holds an API key may have.
concurrent_reserve() {
    load "concurrent-reserve-r$1" --scenario reserve --ttl-seconds 1 -c 64 --connections 4
    holds_expired
}
concurrent_pairs() { load "concurrent-pairs-r$1" --scenario reserve+commit -c 64 --connections 4; }
scenario_concurrent() {
    start_quotad concurrent
    setup_tenant concurrent "$ENVIRONMENTS"
    interleave concurrent health balance reserve pairs
    stop_server
}

sequential_health() { load "sequential-health-r$1" --scenario health -c 1 --connections 1; }
sequential_balance() { load "sequential-balance-r$1" --scenario balance -c 1 --connections 1; }
sequential_reserve() {
    load "sequential-reserve-r$1" --scenario reserve --ttl-seconds 1 -c 1 --connections 1
    holds_expired
}
scenario_sequential() {
    start_quotad sequential
    setup_tenant sequential "$ENVIRONMENTS"
    interleave sequential health balance reserve
    stop_server
}

contention_health() { load "contention-health-r$1" --scenario health -c 64 --connections 4; }
contention_pairs1() { load "contention-pairs-1env-r$1" --scenario reserve+commit -c 64 --connections 4 -e 1; }
contention_pairs64() { load "contention-pairs-64env-r$1" --scenario reserve+commit -c 64 --connections 4; }
scenario_contention() {
    start_quotad contention
    setup_tenant contention "$ENVIRONMENTS"
    interleave contention health pairs1 pairs64
    stop_server
}

batch_unary() {
    load "batch-reserve-unary-r$1" --scenario reserve --ttl-seconds 1 -c 64 --connections 4
    holds_expired
}
batch_batched() {
    load "batch-reserve-100-r$1" --scenario reserve --batch-size 100 --ttl-seconds 1 -c 64 --connections 4
    holds_expired
}
scenario_batch() {
    start_quotad batch --config "$LIMITS_CONFIG"
    setup_tenant batch "$ENVIRONMENTS"
    interleave batch unary batched
    stop_server
}

# The Lua script teams write instead of a quota service: check a balance and decrement it in one step
# (Redis runs a script atomically). Returns what remains, or -1, refusing, when the balance is below
# the amount.
REDIS_LUA="local balance = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if balance < amount then
  return -1
end
return redis.call('DECRBY', KEYS[1], amount)"

# start_redis MODE: redis-server on the server core, without persistence (nopersist) or with an
# append-only file synced every second (everysec, the closest peer of quotad's default `write` mode);
# loads the script into REDIS_SHA.
start_redis() {
    local persistence=(--appendonly no) deadline
    [ -z "$SERVER_PID" ] || die "$SERVER_NAME is still running: one server at a time"
    [ "$1" = everysec ] && persistence=(--appendonly yes --appendfsync everysec)
    mkdir -p "$WORK/redis"
    taskset -c "$SERVER_CORE" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
        --dir "$WORK/redis" --daemonize no "${persistence[@]}" >"$OUT/logs/redis-$1.log" 2>&1 &
    SERVER_PID=$!
    SERVER_NAME="redis-server ($1)"
    deadline=$((SECONDS + 30))
    until [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; do
        kill -0 "$SERVER_PID" 2>/dev/null || die "redis-server exited: $(tail -n 3 "$OUT/logs/redis-$1.log")"
        [ "$SECONDS" -lt "$deadline" ] || die "redis-server not answering after 30 s"
        sleep 0.05
    done
    redis-cli -p "$REDIS_PORT" SET "$REDIS_KEY" "$REDIS_BALANCE" >/dev/null
    REDIS_SHA=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$REDIS_LUA")
}

# redis_run NAME REQUESTS [redis-benchmark flags...]: 64 clients calling the script REQUESTS times; the
# balance must go down by exactly REQUESTS.
redis_run() {
    local name=$1 requests=$2 before after
    shift 2
    before=$(redis-cli -p "$REDIS_PORT" GET "$REDIS_KEY")
    measured "$name" "$OUT/logs/$name.csv" redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 64 \
        -n "$requests" "$@" --csv EVALSHA "$REDIS_SHA" 1 "$REDIS_KEY" 1 ||
        { fail "$name: redis-benchmark: $(tail -n 2 "$OUT/logs/$name.err" | tr '\n' ' ')" && return 0; }
    after=$(redis-cli -p "$REDIS_PORT" GET "$REDIS_KEY")
    python3 "$TOOLS" redis-result "$OUT/logs/$name.csv" "$before" "$after" "$requests" >"$OUT/raw/$name.json" \
        2>>"$OUT/logs/$name.err" || fail "$name: $(tail -n 1 "$OUT/logs/$name.err")"
    log "  $name: $(json_field "$OUT/raw/$name.json" ops_per_s) ops/s $(cat "$OUT/raw/$name.cpu")"
}

# redis-benchmark stops after a count, not a time: a short calibration run, the first time a mode and
# pipelining run, sets the count that lasts about BENCH_DURATION.
declare -A REDIS_REQUESTS=()
redis_calibrate() {
    local key=$1-$2 pipeline=${2#P} rate
    [ -z "${REDIS_REQUESTS[$key]:-}" ] || return 0
    redis_run "redis-calibrate-$key" "$(($(smoke_or 2000 20000) * pipeline))" -P "$pipeline"
    rate=$(json_field "$OUT/raw/redis-calibrate-$key.json" ops_per_s 2>/dev/null || echo 10000)
    REDIS_REQUESTS[$key]=$(python3 -c "print(max(1000, int(round($rate * $DURATION, -3))))")
}

scenario_redis() {
    local tool round mode pipelines
    for tool in redis-server redis-cli redis-benchmark; do
        if ! command -v "$tool" >/dev/null; then
            skip redis "$tool is not installed (Debian: redis-server redis-tools)"
            return
        fi
    done
    for round in $(seq 1 "$REPEATS"); do
        for mode in nopersist everysec; do
            start_redis "$mode"
            pipelines=(P1 P10)
            [ $((round % 2)) = 0 ] && pipelines=(P10 P1)
            for pipe in "${pipelines[@]}"; do
                redis_calibrate "$mode" "$pipe"
                redis_run "redis-$mode-$pipe-r$round" "${REDIS_REQUESTS[$mode-$pipe]}" -P "${pipe#P}"
            done
            stop_server
        done
    done
}

# h2load_run NAME RPC BODY CLIENTS STREAMS: h2load for BENCH_DURATION against quotad, with the API key,
# CLIENTS connections of STREAMS concurrent calls each. h2load counts an HTTP 200 as a success whatever
# grpc-status says, so quotad's metrics before and after decide: the calls by status code go in the
# result, and a run in which most failed fails.
h2load_run() {
    local name=$1 rpc=$2 body=$3 clients=$4 streams=$5 warmup=()
    [ "$WARMUP" -gt 0 ] && warmup=(--warm-up-time "${WARMUP}s")
    python3 "$TOOLS" metrics "$METRICS" "$WORK/metrics-before"
    rm -f "$WORK/h2load.log" # h2load appends to its log
    # The key is on h2load's command line (h2load reads headers from nowhere else): it is a key of this
    # run's throw-away quotad on the loopback address.
    measured "$name" "$OUT/logs/$name.txt" h2load -D "${DURATION}s" "${warmup[@]}" -d "$body" \
        -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $QUOTAD_TOKEN" \
        --log-file "$WORK/h2load.log" -c "$clients" -m "$streams" "$SERVER/$rpc" ||
        { fail "$name: h2load: $(tail -n 2 "$OUT/logs/$name.err" | tr '\n' ' ')" && return 0; }
    python3 "$TOOLS" metrics "$METRICS" "$WORK/metrics-after"
    if ! python3 "$TOOLS" h2load-result "$OUT/logs/$name.txt" "$WORK/h2load.log" "$WORK/metrics-before" \
        "$WORK/metrics-after" "$rpc" "$((clients * streams))" >"$OUT/raw/$name.json" 2>>"$OUT/logs/$name.err"; then
        fail "$name: $(tail -n 1 "$OUT/logs/$name.err")"
    fi
    log "  $name: $(json_field "$OUT/raw/$name.json" req_per_s) req/s," \
        "calls $(json_field "$OUT/raw/$name.json" calls) $(cat "$OUT/raw/$name.cpu")"
}

h2load_health() { h2load_run "h2load-health-r$1" grpc.health.v1.Health/Check "$WORK/health.bin" 4 16; }
h2load_balance() { h2load_run "h2load-balance-r$1" quota.v1.Quota/GetBalance "$WORK/balance.bin" 4 16; }
h2load_reserve() {
    h2load_run "h2load-reserve-r$1" quota.v1.Quota/CheckAndReserve "$WORK/reserve.bin" 4 16
    holds_expired
}
# The tail: 500 calls in flight against one core, p99 against p50 from h2load's per-request log.
h2load_tail() {
    h2load_run "h2load-tail-r$1" quota.v1.Quota/CheckAndReserve "$WORK/reserve.bin" 50 10
    holds_expired
}
scenario_h2load() {
    if ! command -v h2load >/dev/null; then
        skip h2load "h2load is not installed (Debian: nghttp2-client)"
        return
    fi
    # The bodies come from quotad-bench, encoded with the same types as its own calls. One fixed body
    # reserves on one environment (environment 0), with holds of 1 s; another reads its balance.
    [ "$("$BENCH" --grpc-body "$WORK/health.bin" --scenario health)" = /grpc.health.v1.Health/Check ] ||
        die "quotad-bench --grpc-body: unexpected path for health"
    [ "$("$BENCH" --grpc-body "$WORK/balance.bin" --scenario balance)" = /quota.v1.Quota/GetBalance ] ||
        die "quotad-bench --grpc-body: unexpected path for balance"
    [ "$("$BENCH" --grpc-body "$WORK/reserve.bin" --scenario reserve --ttl-seconds 1)" = \
        /quota.v1.Quota/CheckAndReserve ] || die "quotad-bench --grpc-body: unexpected path for reserve"
    start_quotad h2load
    setup_tenant h2load "$ENVIRONMENTS"
    interleave h2load health balance reserve tail
    stop_server
}

# RSS of a quantity of environments, then of open holds, on one quotad: VmRSS as the kernel counts it,
# and RssAnon without the file pages of the memory-mapped write-ahead log, which VmRSS also counts
# (they belong to the page cache, which the kernel may drop).
scenario_memory() {
    local name=memory rss_start rss_environments rss_holds open
    start_quotad memory --config "$LIMITS_CONFIG" --snapshot-interval 1h
    rss_start=$(python3 "$TOOLS" rss "$SERVER_PID")
    log "  creating $MEMORY_ENVS environments"
    setup_tenant memory "$MEMORY_ENVS"
    rss_environments=$(python3 "$TOOLS" rss "$SERVER_PID")
    log "  opening $MEMORY_HOLDS holds (1 h) over $ENVIRONMENTS environments"
    load memory-holds-r1 --scenario reserve -n "$MEMORY_HOLDS" --ttl-seconds 3600 -c 64 --connections 4 --warmup 0s
    open=$(python3 "$TOOLS" open-holds "$METRICS")
    rss_holds=$(python3 "$TOOLS" rss "$SERVER_PID")
    python3 - "$MEMORY_ENVS" "$MEMORY_HOLDS" "$open" "$rss_start" "$rss_environments" "$rss_holds" \
        >"$OUT/raw/$name-r1.json" <<'PY'
import json, sys
envs, holds, open_holds = map(int, sys.argv[1:4])
rss = [json.loads(a) for a in sys.argv[4:7]]
print(json.dumps({"environments": envs, "holds": holds, "open_holds": open_holds, "rss_start": rss[0],
                  "rss_environments": rss[1], "rss_holds": rss[2]}, indent=2))
PY
    log "  RSS at start, with the environments, with the holds: $rss_start $rss_environments $rss_holds"
    stop_server KILL
}

# A mass expiry against live traffic. quotad expires a hold at the time it was granted plus its TTL
# (src/grpc/quota.rs), so holds made over a minute with one TTL would expire over a minute too:
# quotad-bench --expire-at gives each the TTL that ends in one second instead. The live reserve+commit
# load runs from EXPIRY_BEFORE seconds before that second to EXPIRY_AFTER after, with latency per 1 s
# window, while quotad_open_holds is read every 100 ms; the windows before the second are the baseline
# (same server, same holds, only no expiry), see expiry-result in bench/suite_tools.py.
scenario_expiry() {
    local rate create_s second start_ms wait_ms poller
    start_quotad expiry --config "$LIMITS_CONFIG" --snapshot-interval 1h
    setup_tenant expiry "$ENVIRONMENTS"
    # How fast holds are made here decides how far ahead their expiry second must be.
    load expiry-probe-r1 --scenario reserve --ttl-seconds 1 -c 64 --connections 4 --warmup 0s -z "$(smoke_or 1 2)s"
    rate=$(json_field "$OUT/raw/expiry-probe-r1.json" ops_per_s 2>/dev/null || echo 1000)
    create_s=$(python3 -c "import math; print(math.ceil($EXPIRY_HOLDS / max($rate, 1) * 1.5) + 2)")
    second=$(($(date +%s) + create_s + EXPIRY_BEFORE + WARMUP + 2))
    log "  making $EXPIRY_HOLDS holds that expire at $second (in $((second - $(date +%s))) s)"
    load expiry-create-r1 --scenario reserve -n "$EXPIRY_HOLDS" --expire-at "$second" -c 64 --connections 4 \
        --warmup 0s
    start_ms=$(((second - EXPIRY_BEFORE - WARMUP) * 1000))
    wait_ms=$((start_ms - $(now_ms)))
    if [ "$wait_ms" -lt 0 ]; then
        log "  the holds took longer to make than planned: the baseline before the expiry is shorter"
    else
        sleep "$(python3 -c "print($wait_ms / 1000)")"
    fi
    taskset -c "$CLIENT_CORE" python3 "$TOOLS" poll-open-holds "$METRICS" $(((second + EXPIRY_AFTER + 1) * 1000)) \
        "$OUT/raw/expiry-open-holds.txt" 2>>"$OUT/logs/expiry-poll.err" &
    poller=$!
    load expiry-load-r1 --scenario reserve+commit -c "$EXPIRY_CONCURRENCY" --connections 4 \
        -z "$(python3 -c "print(max(1, $second + $EXPIRY_AFTER - $(date +%s) - $WARMUP))")s" --window 1s
    wait "$poller" || true
    if [ -f "$OUT/raw/expiry-load-r1.json" ]; then
        python3 "$TOOLS" expiry-result "$OUT/raw/expiry-load-r1.json" "$OUT/raw/expiry-open-holds.txt" \
            "$second" "$EXPIRY_HOLDS" "$OUT/raw/expiry-create-r1.json" >"$OUT/raw/expiry-r1.json" ||
            fail "expiry: no result"
        log "  expiry: p99 before $(json_field "$OUT/raw/expiry-r1.json" p99_before_us) µs," \
            "during $(json_field "$OUT/raw/expiry-r1.json" p99_during_us) µs," \
            "holds gone $(json_field "$OUT/raw/expiry-r1.json" expiry_ms) ms after the second" \
            "$(json_field "$OUT/raw/expiry-r1.json" problem)"
    fi
    stop_server KILL
}

# --- Run ---------------------------------------------------------------------------------------------

STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "quotad benchmark suite: $SCENARIOS; $REPEATS rounds of ${DURATION}s after ${WARMUP}s warmup$(
    [ "$SMOKE" = 1 ] && echo ' (smoke run)'); results in $OUT"
for scenario in $SCENARIOS; do
    scenario_started=$SECONDS
    log "$scenario"
    "scenario_$scenario"
    log "$scenario done in $((SECONDS - scenario_started)) s"
done

for name in "${!SKIPPED[@]}"; do printf '%s\t%s\n' "$name" "${SKIPPED[$name]}"; done >"$WORK/skipped"
printf '%s\n' "${FAILURES[@]+"${FAILURES[@]}"}" >"$WORK/failures"
SUITE_STARTED=$STARTED SUITE_COMMIT=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown) \
    SUITE_MACHINE="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -sr)" \
    SUITE_CONFIG_NOTE=$CONFIG_NOTE SUITE_SCENARIOS=$SCENARIOS \
    python3 - "$WORK/skipped" "$WORK/failures" "$OUT/suite.json" "$SERVER_CORE" "$CLIENT_CORE" "$REPEATS" \
    "$DURATION" "$WARMUP" "$SMOKE" "$PROFILE" <<'PY'
import json, os, sys
skipped_path, failures_path, out = sys.argv[1:4]
server_core, client_core, repeats, duration, warmup = map(int, sys.argv[4:9])
json.dump({
    "started": os.environ["SUITE_STARTED"], "commit": os.environ["SUITE_COMMIT"],
    "machine": os.environ["SUITE_MACHINE"], "server_core": server_core, "client_core": client_core,
    "repeats": repeats, "duration_s": duration, "warmup_s": warmup, "smoke": sys.argv[9] == "1",
    "profile": sys.argv[10], "scenarios": os.environ["SUITE_SCENARIOS"].split(),
    "config_note": os.environ["SUITE_CONFIG_NOTE"],
    "skipped": dict(line.rstrip("\n").split("\t", 1) for line in open(skipped_path) if line.strip()),
    "failures": [line.rstrip("\n") for line in open(failures_path) if line.strip()],
}, open(out, "w"), indent=2)
PY
echo >&2
python3 "$TOOLS" summary "$OUT"
echo "results: $OUT"
[ "${#FAILURES[@]}" -eq 0 ]
