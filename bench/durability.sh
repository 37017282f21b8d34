#!/usr/bin/env bash
# Durability benchmark of quotad (issue 4): what the write-ahead log costs, what snapshots cost, and how
# long recovery takes. Runs from any directory; builds the release binaries first.
#
#   1. modes:    reserve+commit at concurrency 64 for each --durability mode (none, write, fsync), the
#                modes interleaved and repeated; medians and the ratios against `none`. A `health` run
#                (the transport's own cost) is interleaved as a reference.
#   2. snapshot: p99 of reserve+commit on a state of 100,000 environments with --snapshot-interval 1s
#                (snapshots all the time) against 1h (none during the run).
#   3. recovery: 100,000 environments and about 1,000,000 log records, SIGKILL, restart on the same data
#                directory; quotad's own recovery time and the wall time until it listens.
#
# quotad is pinned to core 0 and the load generator to core 1 (taskset), so they do not compete. All
# traffic goes to 127.0.0.1 only. Sizes and times are environment variables, so a smoke run is quick:
#
#   BENCH_DURATION=2 BENCH_REPEATS=1 BENCH_BIG_ENVIRONMENTS=5000 BENCH_RECOVERY_PAIRS=20000 bench/durability.sh
#
# About 9 minutes with the defaults on a quiet machine. Each run records the cores used by quotad, by
# the load generator and by everything else; a run that other work disturbed is run again (bounded).
# Results (JSON of every run, quotad logs, summary.txt) stay in $BENCH_OUT (default: a new temp dir).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10}          # seconds recorded per run
WARMUP=${BENCH_WARMUP:-1}               # seconds of unrecorded load before each run
REPEATS=${BENCH_REPEATS:-5}             # rounds of the interleaved modes and snapshot runs (medians)
CONCURRENCY=${BENCH_CONCURRENCY:-64}
CONNECTIONS=${BENCH_CONNECTIONS:-4}
ENVIRONMENTS=${BENCH_ENVIRONMENTS:-64}  # environments the mode runs spread their load over
BIG_ENVIRONMENTS=${BENCH_BIG_ENVIRONMENTS:-100000}  # state size of the snapshot and recovery runs
RECOVERY_PAIRS=${BENCH_RECOVERY_PAIRS:-400000}      # two log records each, on top of 2 per environment
PHASES=${BENCH_PHASES:-"modes snapshot recovery"}
PORT=${BENCH_PORT:-50151}
SERVER_CORE=${BENCH_SERVER_CORE:-0}
CLIENT_CORE=${BENCH_CLIENT_CORE:-1}
STARTUP_TIMEOUT=${BENCH_STARTUP_TIMEOUT:-300}  # seconds to wait for `listening`, recovery included
# This machine may be shared: a measured run during which other processes used more than this many
# cores is run again, at most BENCH_RETRIES times (the summary counts the disturbed runs it kept).
MAX_OTHER_CORES=${BENCH_MAX_OTHER_CORES:-0.25}
RETRIES=${BENCH_RETRIES:-2}
QUIET_WAIT=${BENCH_QUIET_WAIT:-60}  # seconds to wait at most for the machine to be quiet before a run
# quotad logs every admin call at info; keep only warnings, plus the lines this script reads
# (`listening`, `state recovered`, `snapshot written`).
QUOTAD_LOG_FILTER=${BENCH_RUST_LOG:-warn,quotad::server=info,quotad::durability=info}

OUT=${BENCH_OUT:-$(mktemp -d -t quotad-bench-results.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t quotad-bench-data.XXXXXX)
QUOTAD_PID=""

cleanup() {
    if [ -n "$QUOTAD_PID" ] && kill -0 "$QUOTAD_PID" 2>/dev/null; then
        kill -KILL "$QUOTAD_PID" 2>/dev/null || true
        wait "$QUOTAD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in taskset python3 cargo; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
if [ "$(nproc)" -lt 2 ]; then
    die "needs 2 cores to pin quotad and the load generator apart (nproc = $(nproc))"
fi

log "building release binaries"
(cd "$ROOT" && cargo build --release --locked --bins)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
QUOTAD=$TARGET_DIR/release/quotad
BENCH=$TARGET_DIR/release/quotad-bench
SERVER=http://127.0.0.1:$PORT

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "127.0.0.1:$PORT is already in use; set BENCH_PORT"
fi

now_ms() { date +%s%3N; }

# start_quotad DATA_DIR LOG_FILE [quotad flags...]: starts quotad pinned to the server core and waits for
# its `listening` line. Sets QUOTAD_PID, and LISTEN_WALL_MS to the time from spawn to that line.
# Authentication is off: these runs measure the log, and stay comparable with the figures in README.md
# (quotad-bench --token drives a quotad with authentication on).
start_quotad() {
    local data_dir=$1 log_file=$2
    shift 2
    local started deadline
    started=$(now_ms)
    # No metrics endpoint: its default port could be taken by another quotad on this machine.
    RUST_LOG=$QUOTAD_LOG_FILTER taskset -c "$SERVER_CORE" "$QUOTAD" \
        --listen "127.0.0.1:$PORT" --data-dir "$data_dir" --auth off --metrics-listen off "$@" >"$log_file" 2>&1 &
    QUOTAD_PID=$!
    deadline=$((SECONDS + STARTUP_TIMEOUT))
    # -s: the log file may not exist yet in the first few milliseconds.
    until grep -qs ' listening ' "$log_file"; do
        kill -0 "$QUOTAD_PID" 2>/dev/null || { cat "$log_file" >&2; die "quotad exited before listening"; }
        [ "$SECONDS" -lt "$deadline" ] || die "quotad not listening after ${STARTUP_TIMEOUT}s"
        sleep 0.01
    done
    LISTEN_WALL_MS=$(($(now_ms) - started))
}

# stop_quotad [SIGNAL]: SIGTERM (graceful: drain, final snapshot) by default, SIGKILL for a crash.
stop_quotad() {
    local signal=${1:-TERM} waited=0
    kill "-$signal" "$QUOTAD_PID"
    if [ "$signal" = KILL ]; then
        # Reaped by this very `wait`, so bash's "Killed" notice goes to /dev/null with it.
        { wait "$QUOTAD_PID"; } 2>/dev/null || true
        QUOTAD_PID=""
        return
    fi
    # The final snapshot of a large state takes a moment; a hung quotad is killed after 60 s.
    while kill -0 "$QUOTAD_PID" 2>/dev/null && [ "$waited" -lt 6000 ]; do
        sleep 0.01
        waited=$((waited + 1))
    done
    if kill -0 "$QUOTAD_PID" 2>/dev/null; then
        log "quotad did not stop after SIG$signal within 60s; killing it"
        kill -KILL "$QUOTAD_PID"
    fi
    wait "$QUOTAD_PID" 2>/dev/null || true
    QUOTAD_PID=""
}

# bench [quotad-bench flags...]: the load generator pinned to the client core, against this quotad only.
bench() {
    taskset -c "$CLIENT_CORE" "$BENCH" --server "$SERVER" --concurrency "$CONCURRENCY" \
        --connections "$CONNECTIONS" "$@"
}

# CPU accounting, so that a run disturbed by other work on the machine shows it: ticks (1/100 s) busy
# on all cores, and used by one process.
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# measured_bench NAME [quotad-bench flags...]: one recorded run, its JSON in NAME.json, its table in
# NAME.txt, and in NAME.cpu the cores used by quotad, by quotad-bench and by anything else meanwhile.
measured_bench() {
    local name=$1 busy0 server0 started wall_ms
    shift
    busy0=$(busy_ticks)
    server0=$(proc_ticks "$QUOTAD_PID")
    started=$(now_ms)
    local TIMEFORMAT='%U %S'
    if ! { time bench "$@" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.err"; } 2>"$OUT/$name.time"; then
        cat "$OUT/$name.err" >&2
        die "quotad-bench failed in $name"
    fi
    wall_ms=$(($(now_ms) - started))
    python3 - "$wall_ms" "$(($(busy_ticks) - busy0))" "$(($(proc_ticks "$QUOTAD_PID") - server0))" \
        "$(cat "$OUT/$name.time")" >"$OUT/$name.cpu" <<'PY'
import json, sys
wall_s, busy, server = int(sys.argv[1]) / 1000, int(sys.argv[2]) / 100, int(sys.argv[3]) / 100
client = sum(float(x) for x in sys.argv[4].split())
print(json.dumps({k: round(v / wall_s, 2) for k, v in
                  {"server_cores": server, "client_cores": client, "other_cores": busy - server - client}.items()}))
PY
}

# The numbers line of a quotad-bench table: ops/s, calls/s, ok, failed, p50, p90, p99, p99.9, max.
result_line() { grep 'latency in' "$1" | tr -s ' ' | sed 's/^ //'; }

# Waits until the machine has been quiet for a second (other processes below MAX_OTHER_CORES), at most
# QUIET_WAIT seconds: retrying at once while someone else's job runs would only measure it again.
wait_for_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) busy0 other
    while :; do
        busy0=$(busy_ticks)
        sleep 1
        other=$(awk -v b="$(($(busy_ticks) - busy0))" 'BEGIN { printf "%.2f", b / 100 }')
        if awk -v o="$other" -v m="$MAX_OTHER_CORES" 'BEGIN { exit !(o <= m) }'; then
            return
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "  the machine is still busy (other processes use $other cores); measuring anyway"
            return
        fi
    done
}

# with_retries NAME COMMAND...: runs COMMAND (which writes NAME.cpu) again while other work disturbed it.
with_retries() {
    local name=$1 attempt=0 other
    shift
    while :; do
        wait_for_quiet
        "$@"
        other=$(sed 's/.*"other_cores": \([-0-9.]*\).*/\1/' "$OUT/$name.cpu")
        if ! awk -v o="$other" -v m="$MAX_OTHER_CORES" 'BEGIN { exit !(o > m) }' || [ "$attempt" -ge "$RETRIES" ]; then
            return
        fi
        attempt=$((attempt + 1))
        log "  $name disturbed: other processes used $other cores; running it again ($attempt/$RETRIES)"
    done
}

# One measured reserve+commit run (or `health`) against a fresh quotad in the given durability mode.
run_mode_once() {
    local name=$1 mode=$2 scenario=reserve+commit durability=$2
    if [ "$mode" = health ]; then
        scenario=health
        durability=none
    fi
    start_quotad "$WORK/$name" "$OUT/$name.log" --durability "$durability"
    measured_bench "$name" --scenario "$scenario" --environments "$ENVIRONMENTS" --warmup "${WARMUP}s" \
        --duration "${DURATION}s"
    stop_quotad
    rm -rf "${WORK:?}/$name"
}

run_mode() {
    local round=$1 mode=$2 name=modes-$2-$1
    with_retries "$name" run_mode_once "$name" "$mode"
    log "  round $round $mode: $(result_line "$OUT/$name.txt") $(cat "$OUT/$name.cpu")"
}

phase_modes() {
    log "modes: reserve+commit at concurrency $CONCURRENCY for ${DURATION}s, $REPEATS rounds"
    for round in $(seq 1 "$REPEATS"); do
        # The order rotates each round, so no mode always runs first (cold caches) or last.
        local modes=(none write fsync health)
        local shift_by=$(((round - 1) % ${#modes[@]}))
        for i in "${!modes[@]}"; do
            run_mode "$round" "${modes[$(((i + shift_by) % ${#modes[@]}))]}"
        done
    done
}

# A data directory with BIG_ENVIRONMENTS environments and a snapshot of them (graceful stop), for the
# snapshot runs to start from.
build_big_state() {
    local dir=$1 log_file=$2
    start_quotad "$dir" "$log_file" --durability write --snapshot-interval 1h
    bench --setup-environments "$BIG_ENVIRONMENTS" --json "$OUT/${3}-setup.json" | sed 's/^/  /' >&2
    stop_quotad
}

# One measured run on a copy of the big state, with the given snapshot interval.
run_snapshot_once() {
    local name=$1 interval=$2
    cp -a "$WORK/snapshot-base" "$WORK/$name"
    start_quotad "$WORK/$name" "$OUT/$name.log" --durability write --snapshot-interval "$interval"
    measured_bench "$name" --scenario reserve+commit --no-setup --environments "$BIG_ENVIRONMENTS" \
        --warmup "${WARMUP}s" --duration "${DURATION}s"
    # The snapshots written during the load; more follow while quotad stops.
    grep 'snapshot written' "$OUT/$name.log" >"$OUT/$name.snapshots" || true
    stop_quotad
    rm -rf "${WORK:?}/$name"
}

phase_snapshot() {
    log "snapshot: state of $BIG_ENVIRONMENTS environments, --snapshot-interval 1s against 1h"
    build_big_state "$WORK/snapshot-base" "$OUT/snapshot-base.log" snapshot
    for round in $(seq 1 "$REPEATS"); do
        for interval in 1h 1s; do
            local name=snapshot-$interval-$round
            with_retries "$name" run_snapshot_once "$name" "$interval"
            log "  round $round interval $interval: $(result_line "$OUT/$name.txt") $(cat "$OUT/$name.cpu")" \
                "snapshots during the run: $(wc -l <"$OUT/$name.snapshots")"
        done
    done
    rm -rf "$WORK/snapshot-base"
}

phase_recovery() {
    local dir=$WORK/recovery
    log "recovery: $BIG_ENVIRONMENTS environments and $RECOVERY_PAIRS reserve+commit pairs, then SIGKILL"
    # A long snapshot interval, so the log is not truncated and recovery replays all of it.
    start_quotad "$dir" "$OUT/recovery-build.log" --durability write --snapshot-interval 1h
    bench --setup-environments "$BIG_ENVIRONMENTS" --json "$OUT/recovery-setup.json" | sed 's/^/  /' >&2
    bench --scenario reserve+commit --no-setup --environments "$BIG_ENVIRONMENTS" --warmup 0s \
        --requests "$RECOVERY_PAIRS" --json "$OUT/recovery-load.json" | sed 's/^/  /' >&2
    stop_quotad KILL
    du -sb "$dir" | cut -f1 >"$OUT/recovery-bytes"
    start_quotad "$dir" "$OUT/recovery.log" --durability write --snapshot-interval 1h
    echo "$LISTEN_WALL_MS" >"$OUT/recovery-wall-ms"
    log "  $(grep 'state recovered' "$OUT/recovery.log" | sed 's/.*state recovered/state recovered/')," \
        "listening after ${LISTEN_WALL_MS} ms"
    stop_quotad
    rm -rf "$dir"
}

for phase in $PHASES; do
    case $phase in
        modes | snapshot | recovery) "phase_$phase" ;;
        *) die "unknown phase $phase (modes, snapshot, recovery)" ;;
    esac
done

{
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -sr)"
    echo "quotad on core $SERVER_CORE, quotad-bench on core $CLIENT_CORE; concurrency $CONCURRENCY over" \
        "$CONNECTIONS connections; ${DURATION}s recorded after ${WARMUP}s warmup; $REPEATS rounds"
} | tee "$OUT/summary.txt"
python3 - "$OUT" "$MAX_OTHER_CORES" <<'PY' | tee -a "$OUT/summary.txt"
"""Prints the medians and ratios of the runs in the results directory."""
import glob, json, os, re, statistics, sys

out = sys.argv[1]


def runs(prefix):
    found = []
    for p in sorted(glob.glob(os.path.join(out, prefix + "-*.json"))):
        if p.endswith("-setup.json"):
            continue
        r = json.load(open(p))
        cpu = p[:-len(".json")] + ".cpu"
        r["cpu"] = json.load(open(cpu)) if os.path.exists(cpu) else {}
        found.append(r)
    return found


MAX_OTHER = float(sys.argv[2])


def disturbed(rs):
    return sum(1 for r in rs if r["cpu"].get("other_cores", 0) > MAX_OTHER)


def cores(rs):
    """Median cores used by quotad, quotad-bench and everything else during the runs."""
    get = lambda k: med(rs, lambda r: r["cpu"].get(k, float("nan")))
    return f"{get('server_cores'):>6.2f} {get('client_cores'):>6.2f} {get('other_cores'):>6.2f} {disturbed(rs):>9}"


def med(rs, f):
    return statistics.median(f(r) for r in rs) if rs else float("nan")


def ratio(a, b):
    return a / b if b else float("nan")


print()
modes = {m: runs("modes-" + m) for m in ("none", "write", "fsync", "health")}
if any(modes.values()):
    print("reserve+commit by durability mode (medians; ops = pairs of calls; latency of the pair in µs)")
    print(f"{'mode':<8} {'runs':>4} {'pairs/s':>10} {'calls/s':>10} {'p50':>8} {'p99':>8} {'p99.9':>8} {'errors':>7}"
          f" {'server':>6} {'client':>6} {'other':>6} {'disturbed':>9}")
    for m, rs in modes.items():
        if rs:
            label = "health*" if m == "health" else m
            print(f"{label:<8} {len(rs):>4} {med(rs, lambda r: r['ops_per_s']):>10.0f} "
                  f"{med(rs, lambda r: r['calls_per_s']):>10.0f} {med(rs, lambda r: r['latency_us']['p50']):>8.0f} "
                  f"{med(rs, lambda r: r['latency_us']['p99']):>8.0f} {med(rs, lambda r: r['latency_us']['p999']):>8.0f} "
                  f"{sum(r['failed'] for r in rs):>7} {cores(rs)}")
    if modes["health"]:
        print("  * health = grpc.health.v1.Health/Check on quotad --durability none: the transport alone, one call")
    print("  server, client, other: cores used by quotad, quotad-bench and the rest of the machine (of 2);")
    print(f"  disturbed: runs kept although other processes used more than {MAX_OTHER} cores")
    n, w, f = modes["none"], modes["write"], modes["fsync"]
    tput = lambda rs: med(rs, lambda r: r["ops_per_s"])
    p99 = lambda rs: med(rs, lambda r: r["latency_us"]["p99"])
    if n and w:
        print(f"write/none throughput {ratio(tput(w), tput(n)):.2f} (target >= 0.90)   "
              f"write/none p99 {ratio(p99(w), p99(n)):.2f} (target <= 1.5)")
    if n and f:
        print(f"fsync/none throughput {ratio(tput(f), tput(n)):.2f} (target >= 0.50)")
    print()

snap = {i: runs("snapshot-" + i) for i in ("1h", "1s")}
if snap["1h"] and snap["1s"]:
    during = [open(p).read().splitlines() for p in sorted(glob.glob(os.path.join(out, "snapshot-1s-*.snapshots")))]
    counts = [len(lines) for lines in during]
    env = snap["1s"][0]["environments"]
    print(f"snapshot impact: reserve+commit, --durability write, state of {env} environments (medians)")
    print(f"{'interval':<9} {'runs':>4} {'pairs/s':>10} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8}"
          f" {'server':>6} {'client':>6} {'other':>6} {'disturbed':>9}")
    for i, rs in snap.items():
        print(f"{i:<9} {len(rs):>4} {med(rs, lambda r: r['ops_per_s']):>10.0f} "
              f"{med(rs, lambda r: r['latency_us']['p50']):>8.0f} {med(rs, lambda r: r['latency_us']['p99']):>8.0f} "
              f"{med(rs, lambda r: r['latency_us']['p999']):>8.0f} {med(rs, lambda r: r['latency_us']['max']):>8.0f}"
              f" {cores(rs)}")
    elapsed = [int(x) for lines in during for line in lines for x in re.findall(r"elapsed_ms=(\d+)", line)]
    p99r = ratio(med(snap["1s"], lambda r: r["latency_us"]["p99"]), med(snap["1h"], lambda r: r["latency_us"]["p99"]))
    print(f"p99 with/without snapshots {p99r:.2f} (target <= 2.0); snapshots per 1s run: {counts}; "
          f"snapshot time median {statistics.median(elapsed) if elapsed else float('nan'):.0f} ms, max {max(elapsed, default=0)} ms")
    print()

rec_log = os.path.join(out, "recovery.log")
if os.path.exists(rec_log):
    m = re.search(r"state recovered.*", open(rec_log).read())
    fields = dict(re.findall(r"(\w+)=(\S+)", m.group(0))) if m else {}
    setup = json.load(open(os.path.join(out, "recovery-setup.json")))
    load = json.load(open(os.path.join(out, "recovery-load.json")))
    wall = open(os.path.join(out, "recovery-wall-ms")).read().strip()
    size = int(open(os.path.join(out, "recovery-bytes")).read().strip())
    print(f"recovery after SIGKILL: {setup['environments']} environments, {load['ok']} reserve+commit pairs, "
          f"data dir {size / 1e6:.0f} MB")
    print(f"  log records replayed {fields.get('replayed', '?')} (last_seq {fields.get('last_seq', '?')}, "
          f"snapshot_seq {fields.get('snapshot_seq', '?')})")
    print(f"  recovery (quotad's elapsed_ms) {fields.get('elapsed_ms', '?')} ms; spawn to `listening` {wall} ms")
    print(f"  (the state was built at {setup['admin_calls_per_s']:.0f} admin calls/s and {load['ops_per_s']:.0f} pairs/s)")
print(f"results: {out}")
PY
