#!/usr/bin/env bash
# What authentication costs: two quotad servers with their defaults (write-mode log, metrics on), one
# with authentication on (an API key per call) and one with --auth off, both pinned to core 0 and the
# load generator to core 1 (taskset). Each round runs, on each server, the `health` baseline,
# `reserve` (holds of 1 s) and `reserve+commit`, interleaved; medians over the rounds and their ratios
# are printed. About 4 minutes with the defaults.
#
# Usage: bench/auth-cost.sh            (BENCH_REPEATS=5 BENCH_DURATION=5s by default)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPEATS=${BENCH_REPEATS:-5}
DURATION=${BENCH_DURATION:-5s}
SERVER_CORE=${BENCH_SERVER_CORE:-0}
CLIENT_CORE=${BENCH_CLIENT_CORE:-1}
PORT_ON=${BENCH_PORT:-50071}
PORT_OFF=$((PORT_ON + 1))
OUT=${BENCH_OUT:-$(mktemp -d -t quotad-auth-cost.XXXXXX)}
WORK=$(mktemp -d -t quotad-auth-cost-data.XXXXXX)

die() { echo "bench/auth-cost.sh: $*" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || die "needs 2 cores to pin quotad and the load generator apart"
command -v taskset >/dev/null || die "needs taskset (util-linux)"

(cd "$ROOT" && cargo build --release --locked --bins)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
QUOTAD=$TARGET_DIR/release/quotad
BENCH=$TARGET_DIR/release/quotad-bench

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# start NAME PORT [quotad flags...]: starts quotad pinned to the server core and waits until it listens.
start() {
    local name=$1 port=$2
    shift 2
    : >"$OUT/$name.log"
    RUST_LOG=warn,quotad::server=info taskset -c "$SERVER_CORE" "$QUOTAD" --listen "127.0.0.1:$port" \
        --data-dir "$WORK/$name" --metrics-listen "127.0.0.1:$((port + 1000))" "$@" >"$OUT/$name.log" 2>&1 &
    PIDS+=($!)
    local deadline=$((SECONDS + 60))
    until grep -q listening "$OUT/$name.log"; do
        [ "$SECONDS" -lt "$deadline" ] || die "quotad $name not listening after 60 s"
        sleep 0.1
    done
}

(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin-token")
ADMIN_TOKEN=$(cat "$WORK/admin-token")
start auth-on "$PORT_ON" --admin-token-file "$WORK/admin-token"
start auth-off "$PORT_OFF" --auth off
taskset -c "$CLIENT_CORE" "$BENCH" --server "http://127.0.0.1:$PORT_ON" --token "$ADMIN_TOKEN" --setup -n 1 --warmup 0s >/dev/null
taskset -c "$CLIENT_CORE" "$BENCH" --server "http://127.0.0.1:$PORT_OFF" --setup -n 1 --warmup 0s >/dev/null
SECRET=$(QUOTAD_TOKEN=$ADMIN_TOKEN "$QUOTAD" admin --server "http://127.0.0.1:$PORT_ON" --format json \
    api-key create --tenant bench --description bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')

# run NAME ROUND [quotad-bench flags...]
run() {
    local name=$1 round=$2
    shift 2
    taskset -c "$CLIENT_CORE" "$BENCH" --no-setup -z "$DURATION" --json "$OUT/${name}_$round.json" "$@" >/dev/null
}
for round in $(seq "$REPEATS"); do
    echo "round $round of $REPEATS"
    run health_on "$round" --server "http://127.0.0.1:$PORT_ON" --scenario health
    run reserve_key "$round" --server "http://127.0.0.1:$PORT_ON" --token "$SECRET" --scenario reserve --ttl-seconds 1
    run pairs_key "$round" --server "http://127.0.0.1:$PORT_ON" --token "$SECRET" --scenario reserve+commit
    run health_off "$round" --server "http://127.0.0.1:$PORT_OFF" --scenario health
    run reserve_off "$round" --server "http://127.0.0.1:$PORT_OFF" --scenario reserve --ttl-seconds 1
    run pairs_off "$round" --server "http://127.0.0.1:$PORT_OFF" --scenario reserve+commit
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
