#!/usr/bin/env bash
# What authentication costs: quotad with its defaults (write-mode log, metrics on) with authentication
# on (an API key per call) and with --auth off, pinned to core 0 and the load generator to core 1
# (taskset). One server runs at a time (two on one core would share it): each round starts a fresh
# server in each mode in turn (the first mode alternates), runs the `health` baseline, `reserve` (holds
# of 1 s) and `reserve+commit` on it, and stops it; medians over the rounds and their ratios are
# printed. About 4 minutes with the defaults.
#
# Usage: bench/auth-cost.sh            (BENCH_REPEATS=5 BENCH_DURATION=5s by default)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPEATS=${BENCH_REPEATS:-5}
DURATION=${BENCH_DURATION:-5s}
SERVER_CORE=${BENCH_SERVER_CORE:-0}
CLIENT_CORE=${BENCH_CLIENT_CORE:-1}
PORT=${BENCH_PORT:-50071}
OUT=${BENCH_OUT:-$(mktemp -d -t quotad-auth-cost.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t quotad-auth-cost-data.XXXXXX)

die() { echo "bench/auth-cost.sh: $*" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || die "needs 2 cores to pin quotad and the load generator apart"
command -v taskset >/dev/null || die "needs taskset (util-linux)"

(cd "$ROOT" && cargo build --release --locked --bins)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
QUOTAD=$TARGET_DIR/release/quotad
BENCH=$TARGET_DIR/release/quotad-bench

SERVER=http://127.0.0.1:$PORT
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin-token")
ADMIN_TOKEN=$(cat "$WORK/admin-token")

# start NAME [quotad flags...]: a fresh quotad (new data directory) pinned to the server core, once no
# other runs; returns once it listens.
start() {
    local name=$1 deadline=$((SECONDS + 60)) started_before
    shift
    [ -z "$SERVER_PID" ] || die "a quotad is still running: one server at a time"
    touch "$OUT/$name.log"
    started_before=$(grep -c ' listening ' "$OUT/$name.log" || true)
    RUST_LOG=warn,quotad::server=info taskset -c "$SERVER_CORE" "$QUOTAD" --listen "127.0.0.1:$PORT" \
        --data-dir "$WORK/$name" --metrics-listen "127.0.0.1:$((PORT + 1000))" "$@" >>"$OUT/$name.log" 2>&1 &
    SERVER_PID=$!
    until [ "$(grep -c ' listening ' "$OUT/$name.log" || true)" -gt "$started_before" ]; do
        kill -0 "$SERVER_PID" 2>/dev/null || die "quotad $name exited: $(tail -n 3 "$OUT/$name.log")"
        [ "$SECONDS" -lt "$deadline" ] || die "quotad $name not listening after 60 s"
        sleep 0.1
    done
}

# stop: SIGTERM, and waits until quotad has exited (drained, final snapshot written).
stop() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
    rm -rf "${WORK:?}"/auth-*
}

# run NAME [quotad-bench flags...]
run() {
    local name=$1
    shift
    taskset -c "$CLIENT_CORE" "$BENCH" --server "$SERVER" --no-setup -z "$DURATION" --json "$OUT/${name}_$round.json" \
        "$@" >/dev/null
}

# Each mode: the tenant, its environments and (authentication on) an API key on the fresh server, then
# the three runs.
mode_on() {
    start auth-on --admin-token-file "$WORK/admin-token"
    taskset -c "$CLIENT_CORE" "$BENCH" --server "$SERVER" --token "$ADMIN_TOKEN" --setup -n 1 --warmup 0s >/dev/null
    local secret
    secret=$(QUOTAD_TOKEN=$ADMIN_TOKEN "$QUOTAD" admin --server "$SERVER" --format json api-key create \
        --tenant bench --description bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
    run health_on --scenario health
    run reserve_key --token "$secret" --scenario reserve --ttl-seconds 1
    run pairs_key --token "$secret" --scenario reserve+commit
    stop
}
mode_off() {
    start auth-off --auth off
    taskset -c "$CLIENT_CORE" "$BENCH" --server "$SERVER" --setup -n 1 --warmup 0s >/dev/null
    run health_off --scenario health
    run reserve_off --scenario reserve --ttl-seconds 1
    run pairs_off --scenario reserve+commit
    stop
}

for round in $(seq "$REPEATS"); do
    echo "round $round of $REPEATS"
    if [ $((round % 2)) = 1 ]; then
        mode_on
        mode_off
    else
        mode_off
        mode_on
    fi
done

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import collections, glob, json, os, statistics, sys
runs = collections.defaultdict(list)
for path in glob.glob(os.path.join(sys.argv[1], "*_[0-9]*.json")):
    runs[os.path.basename(path).rsplit("_", 1)[0]].append(json.load(open(path)))
def median(name, key):
    return statistics.median(r[key] if key != "p50" and key != "p99" else r["latency_us"][key] for r in runs[name])
print(f"{'run':<12} {'ops/s':>8} {'calls/s':>8} {'p50 µs':>7} {'p99 µs':>7}  (medians of {len(runs['health_on'])} rounds)")
for name in ["health_on", "reserve_key", "pairs_key", "health_off", "reserve_off", "pairs_off"]:
    print(f"{name:<12} {median(name, 'ops_per_s'):>8.0f} {median(name, 'calls_per_s'):>8.0f} {median(name, 'p50'):>7.0f} {median(name, 'p99'):>7.0f}")
for mode, health in (("key", "health_on"), ("off", "health_off")):
    print(f"auth {mode:>3}: reserve / health {median('reserve_' + mode, 'ops_per_s') / median(health, 'ops_per_s'):.2f}, "
          f"pairs / health {median('pairs_' + mode, 'ops_per_s') / median(health, 'ops_per_s'):.2f}")
print(f"API key / auth off: reserve {median('reserve_key', 'ops_per_s') / median('reserve_off', 'ops_per_s'):.2f}, "
      f"pairs {median('pairs_key', 'ops_per_s') / median('pairs_off', 'ops_per_s'):.2f}, "
      f"pairs p99 {median('pairs_key', 'p99') / median('pairs_off', 'p99'):.2f}")
PY
echo "results: $OUT"
