#!/usr/bin/env python3
"""What bench/suite.sh needs beyond the shell: reading quotad's metrics and a process's memory, checking
h2load's calls, following the open holds through a mass expiry, and the summary of a results directory.

Standard library only, so that the suite needs nothing installed beyond python3.

    suite_tools.py metrics URL FILE                   save a scrape of quotad's /metrics
    suite_tools.py open-holds URL                     print quotad_open_holds
    suite_tools.py poll-open-holds URL UNTIL_MS FILE  "unix_ms open_holds" lines every 100 ms until then
    suite_tools.py rss PID                            VmRSS, RssAnon and RssFile of a process, in bytes
    suite_tools.py h2load-result OUTPUT LOG BEFORE AFTER RPC IN_FLIGHT
                                                      one h2load run of IN_FLIGHT concurrent calls as
                                                      JSON: its rate, the latency of its log, and
                                                      quotad's count of its calls by code (exits 1 when
                                                      most calls failed)
    suite_tools.py redis-result CSV BEFORE AFTER N    one redis-benchmark run as JSON (exits 1 unless the
                                                      balance went down by exactly N)
    suite_tools.py expiry-result LOAD POLL SECOND HOLDS CREATION
                                                      the expiry scenario as JSON
    suite_tools.py summary OUT                        the table of medians, ratios and targets
"""

import glob
import json
import math
import os
import re
import statistics
import sys
import time
import urllib.request

SERIES = re.compile(r'^(\w+)(?:\{([^}]*)\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def parse_metrics(text):
    """(name, {label: value}, value) for every sample of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        match = SERIES.match(line)
        if match and not line.startswith("#"):
            labels = dict(LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def open_holds(text):
    return int(sum(v for name, _, v in parse_metrics(text) if name == "quotad_open_holds"))


def calls_by_code(text, rpc):
    codes = {}
    for name, labels, value in parse_metrics(text):
        if name == "quotad_rpc_requests_total" and labels.get("rpc") == rpc:
            codes[labels["code"]] = codes.get(labels["code"], 0) + int(value)
    return codes


def percentile(sorted_values, q):
    """Nearest rank, as HdrHistogram and quotad-bench report it."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values), max(1, math.ceil(q * len(sorted_values)))) - 1]


def cmd_metrics(url, path):
    text = scrape(url)
    with open(path, "w") as f:
        f.write(text)


def cmd_poll_open_holds(url, until_ms, path):
    # A scrape every 100 ms costs quotad well under 1% of its core; the load generator's core runs this.
    with open(path, "w") as f:
        while time.time() * 1000 < int(until_ms):
            try:
                f.write(f"{int(time.time() * 1000)} {open_holds(scrape(url))}\n")
                f.flush()
            except OSError as error:
                print(f"open holds: {error}", file=sys.stderr)
            time.sleep(0.1)


def cmd_rss(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[name] = int(value.split()[0]) * 1024
    print(json.dumps(fields))


def cmd_h2load_result(output_path, log_path, before_path, after_path, rpc, in_flight):
    output = open(output_path).read()
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored, (\d+) timeout", output)
    if not rate or not requests:
        sys.exit(f"{output_path}: not h2load's report")
    before = calls_by_code(open(before_path).read(), rpc)
    after = calls_by_code(open(after_path).read(), rpc)
    calls = {code: after[code] - before.get(code, 0) for code in after if after[code] != before.get(code, 0)}
    # When its time is up h2load closes its connections with calls still in flight, which quotad may
    # count as UNKNOWN or CANCELLED: those are the end of the run, not errors. h2load cancels no call
    # otherwise, and its report need not count those calls as started, so as many as it keeps in flight
    # are taken for the stop.
    cut_off = int(in_flight)
    for code in ("UNKNOWN", "CANCELLED"):
        taken = min(cut_off, calls.get(code, 0))
        if taken:
            calls[code] -= taken
            calls["cut_off_at_stop"] = calls.get("cut_off_at_stop", 0) + taken
            cut_off -= taken
            if calls[code] == 0:
                del calls[code]
    result = {"req_per_s": float(rate.group(1)), "requests": int(requests.group(1)),
              "succeeded": int(requests.group(4)), "failed": int(requests.group(5)),
              "errored": int(requests.group(6)), "timeout": int(requests.group(7)),
              "calls": calls, "log": h2load_log(log_path)}
    print(json.dumps(result, indent=2))
    # h2load counts an HTTP 200 as a success whatever its grpc-status says: quotad's own count decides.
    total = sum(n for code, n in calls.items() if code != "cut_off_at_stop")
    if total == 0 or calls.get("OK", 0) * 2 < total:
        print(f"most {rpc} calls failed: {calls}", file=sys.stderr)
        sys.exit(1)


def h2load_log(path):
    # Columns: start (µs since the epoch), HTTP status (-1 for a failed stream), µs to the end of the
    # response. h2load logs its measured period only, not its warm-up.
    latencies, failed = [], 0
    with open(path) as f:
        for line in f:
            columns = line.split("\t")
            if len(columns) >= 3 and columns[1] == "200":
                latencies.append(int(columns[2]))
            else:
                failed += 1
    latencies.sort()
    return {"count": len(latencies), "failed": failed, "p50_us": percentile(latencies, 0.50),
            "p99_us": percentile(latencies, 0.99), "max_us": latencies[-1] if latencies else 0}


def cmd_redis_result(csv_path, before, after, requests):
    rows = [line for line in open(csv_path).read().splitlines() if line and not line.startswith('"test"')]
    if len(rows) != 1:
        sys.exit(f"{csv_path}: expected one result row, found {len(rows)}")
    columns = [c.strip('"') for c in rows[0].split('","')]
    result = {"ops_per_s": float(columns[1]), "requests": int(requests), "p50_ms": float(columns[4]),
              "p99_ms": float(columns[6]), "decremented": int(before) - int(after)}
    print(json.dumps(result, indent=2))
    # redis-benchmark does not look at the replies: the balance shows whether every call ran the script.
    if result["decremented"] != result["requests"]:
        print(f"{csv_path}: the balance went down by {result['decremented']}, not {requests}", file=sys.stderr)
        sys.exit(1)


def cmd_expiry_result(load_path, poll_path, second, holds, creation_path):
    """Compares the live load's latency while the holds expire with its latency just before.

    Both come from the same run on the same server, holding the same million holds: the windows before
    the expiry second are the baseline, so the only difference is the expiry. Windows (1 s, by when
    each operation started) that overlap the span from the expiry second until quotad_open_holds shows
    the holds gone are the expiry's; the worst p99 among them is compared with the median p99 of the
    windows wholly before. A whole-run p99 would dilute a few seconds of expiry into the rest."""
    load = json.load(open(load_path))
    creation = json.load(open(creation_path))
    second_ms, holds = int(second) * 1000, int(holds)
    polls = [tuple(map(int, line.split())) for line in open(poll_path) if line.strip()]
    # Gone: what is left is the live load's own holds, a handful at a time.
    gone = next((ms for ms, n in polls if ms >= second_ms and n <= max(2 * load["concurrency"], holds // 1000)),
                None)
    width_ms = load["window_s"] * 1000
    windows = load["windows"]
    before = [w for w in windows if w["start_unix_ms"] + width_ms <= second_ms and w["ok"] > 0]
    end_ms = gone if gone is not None else windows[-1]["start_unix_ms"] + width_ms
    during = [w for w in windows if w["start_unix_ms"] < end_ms and w["start_unix_ms"] + width_ms > second_ms]
    problems = []
    if creation["ok"] < holds:
        problems.append(f"only {creation['ok']} of {holds} holds were made")
    peak = max((n for ms, n in polls if ms < second_ms), default=0)
    if peak < holds:
        problems.append(f"at most {peak} holds were open before the expiry second, not {holds}: "
                        "some expired during their creation")
    if gone is None:
        problems.append("the holds were not all gone by the end of the run: the p99 covers the run's end")
    if not before or not during:
        problems.append("no window before or during the expiry")
    result = {
        "holds": holds, "concurrency": load["concurrency"], "expire_at": int(second),
        "p99_before_us": statistics.median(w["p99"] for w in before) if before else None,
        "p99_during_us": max(w["p99"] for w in during) if during else None,
        "ok_per_window_before": statistics.median(w["ok"] for w in before) if before else None,
        "ok_per_window_during_min": min(w["ok"] for w in during) if during else None,
        "expiry_ms": gone - second_ms if gone is not None else None,
        "windows_before": len(before), "windows_during": len(during),
        "creation_s": creation["elapsed_s"], "problem": "; ".join(problems),
    }
    print(json.dumps(result, indent=2))


# The summary ----------------------------------------------------------------------------------------


def load_runs(out):
    """Raw results by run name without its round: {"concurrent-health": [json, ...], ...}."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "raw", "*.json"))):
        base = os.path.basename(path)[:-len(".json")]
        name, _, round_ = base.rpartition("-r")
        if not round_.isdigit():
            continue
        result = json.load(open(path))
        cpu = os.path.join(out, "raw", base + ".cpu")
        result["_cpu"] = json.load(open(cpu)) if os.path.exists(cpu) else {}
        runs.setdefault(name, []).append(result)
    return runs


def med(results, get):
    values = [v for v in (get(r) for r in results) if v is not None]
    return statistics.median(values) if values else None


class Table:
    MEASURE_WIDTH = 60

    def __init__(self, smoke):
        self.rows, self.smoke = [], smoke

    def add(self, scenario, measure, value, unit, ratio=None, target=None, note="", on_value=False):
        """target: (">=" or "<=", bound), met by the ratio, or by the value itself with on_value."""
        checked = value if on_value else ratio
        if target is None:
            verdict = ""
        elif checked is None:
            verdict = "n/a"
        elif self.smoke:
            verdict = "smoke"
        else:
            op, bound = target
            verdict = "pass" if (checked >= bound if op == ">=" else checked <= bound) else "miss"
        target_text = ""
        if target:
            target_text = f"{target[0]} {target[1]:g}" + (f" {unit}" if on_value else "×")
        # Three decimals where two would show the bound itself (a miss at 0.897 is not 0.90).
        ratio_text = ""
        if ratio is not None:
            near = target and not on_value and round(ratio, 2) == target[1]
            ratio_text = f"{ratio:.3f}×" if near else f"{ratio:.2f}×"
        self.rows.append({"scenario": scenario, "measure": measure, "value": value, "unit": unit,
                          "ratio": ratio, "ratio_text": ratio_text, "target": target_text, "verdict": verdict,
                          "note": note})

    def text(self):
        def num(v):
            if v is None:
                return "n/a"
            return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.2f}"
        w = self.MEASURE_WIDTH
        lines = [f"{'scenario':<11} {'measure':<{w}} {'median':>10} {'unit':<8} {'ratio':>7} {'target':>10} verdict",
                 "-" * (w + 58)]
        for r in self.rows:
            ratio = r["ratio_text"]
            lines.append(f"{r['scenario']:<11} {r['measure']:<{w}} {num(r['value']):>10} {r['unit']:<8} "
                         f"{ratio:>7} {r['target']:>10} {r['verdict']}".rstrip())
            if r["note"]:
                lines.append(f"{'':<11}   {r['note']}")
        return "\n".join(lines)


def ratio(a, b):
    return a / b if a is not None and b else None


def server_us(result, rate_field):
    """Microseconds of quotad's CPU per operation during a run, from the cores it used."""
    cores, rate = result["_cpu"].get("server_cores"), result.get(rate_field)
    return cores * 1e6 / rate if cores and rate else None


def summarize_concurrent(t, runs):
    health = med(runs.get("concurrent-health", []), lambda r: r["calls_per_s"])
    balance = med(runs.get("concurrent-balance", []), lambda r: r["calls_per_s"])
    reserve = med(runs.get("concurrent-reserve", []), lambda r: r["calls_per_s"])
    pairs = med(runs.get("concurrent-pairs", []), lambda r: r["ops_per_s"])
    if health is None:
        return
    t.add("concurrent", "health calls/s, 64 streams over 4 connections", health, "calls/s")
    t.add("concurrent", "balance calls/s ÷ health calls/s (reserve's ceiling)", balance, "calls/s",
          ratio(balance, health))
    t.add("concurrent", "reserve calls/s ÷ health calls/s", reserve, "calls/s", ratio(reserve, health), (">=", 0.90))
    t.add("concurrent", "reserve+commit pairs/s ÷ health calls/s", pairs, "pairs/s", ratio(pairs, health),
          (">=", 0.45))
    # What each call costs quotad's core, whichever side bounds the throughput: quotad-bench's health
    # checks leave quotad's core partly idle, so the throughput ratios above understate this one. The
    # cores are over quotad-bench's whole run (warmup and connecting too), the calls/s over its
    # measured seconds, so the figures are slightly low, alike for every scenario.
    health_cpu = med(runs.get("concurrent-health", []), lambda r: server_us(r, "calls_per_s"))
    balance_cpu = med(runs.get("concurrent-balance", []), lambda r: server_us(r, "calls_per_s"))
    reserve_cpu = med(runs.get("concurrent-reserve", []), lambda r: server_us(r, "calls_per_s"))
    pairs_cpu = med(runs.get("concurrent-pairs", []), lambda r: server_us(r, "ops_per_s"))
    t.add("concurrent", "quotad CPU per health call", health_cpu, "µs")
    t.add("concurrent", "quotad CPU per balance call ÷ per health", balance_cpu, "µs", ratio(balance_cpu, health_cpu))
    t.add("concurrent", "quotad CPU per reserve call (its expiry too) ÷ per health", reserve_cpu, "µs",
          ratio(reserve_cpu, health_cpu))
    t.add("concurrent", "quotad CPU per reserve call ÷ per balance call", reserve_cpu, "µs",
          ratio(reserve_cpu, balance_cpu))
    t.add("concurrent", "quotad CPU per reserve+commit pair ÷ per health call", pairs_cpu, "µs",
          ratio(pairs_cpu, health_cpu))


def summarize_sequential(t, runs):
    health = med(runs.get("sequential-health", []), lambda r: r["latency_us"]["p50"])
    balance = med(runs.get("sequential-balance", []), lambda r: r["latency_us"]["p50"])
    reserve = med(runs.get("sequential-reserve", []), lambda r: r["latency_us"]["p50"])
    if health is None:
        return
    t.add("sequential", "health p50, 1 call in flight on 1 connection", health, "µs")
    t.add("sequential", "balance p50 ÷ health p50 (reserve's ceiling)", balance, "µs", ratio(balance, health))
    t.add("sequential", "reserve p50 ÷ health p50", reserve, "µs", ratio(reserve, health), ("<=", 1.15))


def summarize_contention(t, runs):
    one = med(runs.get("contention-pairs-1env", []), lambda r: r["ops_per_s"])
    spread = med(runs.get("contention-pairs-64env", []), lambda r: r["ops_per_s"])
    health = med(runs.get("contention-health", []), lambda r: r["calls_per_s"])
    if one is None and spread is None:
        return
    t.add("contention", "health calls/s (reference)", health, "calls/s")
    t.add("contention", "reserve+commit pairs/s, 64 clients over 64 environments", spread, "pairs/s")
    t.add("contention", "reserve+commit pairs/s, 64 clients on 1 environment ÷ 64", one, "pairs/s",
          ratio(one, spread), (">=", 0.8))


def summarize_batch(t, runs, skipped):
    unary = med(runs.get("batch-reserve-unary", []), lambda r: r["calls_per_s"])
    items = med(runs.get("batch-reserve-100", []), lambda r: r["items_per_second"])
    if unary is None and items is None:
        return
    t.add("batch", "unary reserve calls/s", unary, "calls/s")
    t.add("batch", "reserve items/s in batches of 100 ÷ unary calls/s", items, "items/s", ratio(items, unary),
          (">=", 10))


def summarize_redis(t, runs, skipped):
    if "redis" in skipped:
        t.add("redis", "skipped", None, "", note=skipped["redis"])
        return
    rps = {}
    for mode in ("nopersist", "everysec"):
        for pipe in ("P1", "P10"):
            rps[mode, pipe] = med(runs.get(f"redis-{mode}-{pipe}", []), lambda r: r["ops_per_s"])
    if all(v is None for v in rps.values()):
        return
    label = {"nopersist": "no persistence", "everysec": "AOF everysec"}
    for mode in ("nopersist", "everysec"):
        t.add("redis", f"Lua check-and-decrement ops/s, {label[mode]}, -c 64", rps[mode, "P1"], "ops/s")
        t.add("redis", f"Lua check-and-decrement ops/s, {label[mode]}, -P 10", rps[mode, "P10"], "ops/s")
    batch = med(runs.get("batch-reserve-100", []), lambda r: r["items_per_second"])
    unary = med(runs.get("concurrent-reserve", []), lambda r: r["calls_per_s"]) or \
        med(runs.get("batch-reserve-unary", []), lambda r: r["calls_per_s"])
    for mode in ("nopersist", "everysec"):
        t.add("redis", f"quotad batch items/s ÷ Redis -P 10, {label[mode]}", batch, "items/s",
              ratio(batch, rps[mode, "P10"]), (">=", 1))
        t.add("redis", f"quotad reserve calls/s ÷ Redis unpipelined, {label[mode]}", unary, "calls/s",
              ratio(unary, rps[mode, "P1"]))


def summarize_h2load(t, runs, skipped):
    if "h2load" in skipped:
        t.add("h2load", "skipped", None, "", note=skipped["h2load"])
        return
    health = med(runs.get("h2load-health", []), lambda r: r["req_per_s"])
    balance = med(runs.get("h2load-balance", []), lambda r: r["req_per_s"])
    reserve = med(runs.get("h2load-reserve", []), lambda r: r["req_per_s"])
    tail = runs.get("h2load-tail", [])
    if health is None and not tail:
        return
    t.add("h2load", "health req/s, h2load -c 4 -m 16", health, "req/s")
    t.add("h2load", "balance req/s ÷ health req/s (reserve's ceiling)", balance, "req/s", ratio(balance, health))
    t.add("h2load", "reserve req/s ÷ health req/s", reserve, "req/s", ratio(reserve, health), (">=", 0.90))
    p50 = med(tail, lambda r: r["log"]["p50_us"])
    p99 = med(tail, lambda r: r["log"]["p99_us"])
    t.add("h2load", "reserve p50, 500 in flight (h2load -c 50 -m 10)", p50, "µs")
    t.add("h2load", "reserve p99 ÷ p50, 500 in flight", p99, "µs", ratio(p99, p50), ("<=", 3))
    errors, cut_off = {}, 0
    for name in ("h2load-health", "h2load-balance", "h2load-reserve", "h2load-tail"):
        for r in runs.get(name, []):
            cut_off += r["calls"].get("cut_off_at_stop", 0)
            for code, n in r["calls"].items():
                if code not in ("OK", "cut_off_at_stop"):
                    errors[f"{name} {code}"] = errors.get(f"{name} {code}", 0) + n
    t.add("h2load", "calls answered with an error (quotad's metrics)", sum(errors.values()), "calls",
          note=", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) +
          f"{'; ' if errors else ''}{cut_off} calls cut off in flight when h2load stopped are not counted")


def summarize_memory(t, runs):
    mem = runs.get("memory", [])
    if not mem:
        return
    m = mem[0]
    envs, holds = m["environments"], m["holds"]
    for field, what in (("VmRSS", ""), ("RssAnon", " (no log pages)")):
        per_env = ratio(m["rss_environments"][field] - m["rss_start"][field], envs)
        t.add("memory", f"{field} per environment, {envs:,} of them{what}", per_env, "B", target=("<=", 512),
              on_value=True)
    for field, what in (("VmRSS", ""), ("RssAnon", " (no log pages)")):
        per_hold = ratio(m["rss_holds"][field] - m["rss_environments"][field], holds)
        t.add("memory", f"{field} per open hold, {holds:,} of them{what}", per_hold, "B", target=("<=", 256),
              on_value=True)
    if m["open_holds"] != holds:
        t.add("memory", "open holds counted by quotad_open_holds", m["open_holds"], "holds",
              note=f"expected {holds:,}: some reservations failed, see memory-holds-r1.json")


def summarize_expiry(t, runs):
    exp = runs.get("expiry", [])
    if not exp:
        return
    e = exp[0]
    t.add("expiry", f"reserve+commit p99 before the expiry second, c={e['concurrency']}", e["p99_before_us"], "µs")
    t.add("expiry", f"p99 while {e['holds']:,} holds expire ÷ before", e["p99_during_us"], "µs",
          ratio(e["p99_during_us"], e["p99_before_us"]), ("<=", 2), note=e.get("problem", ""))
    t.add("expiry", "from the expiry second until the holds were gone", e["expiry_ms"], "ms")


def errors_note(runs):
    """Failed operations of the quotad-bench runs, by run and status code."""
    failed = {}
    for name, results in runs.items():
        for r in results:
            for code, n in r.get("errors", {}).items():
                failed[f"{name} {code}"] = failed.get(f"{name} {code}", 0) + n
    if not failed:
        return "quotad-bench runs: no operation failed"
    return "quotad-bench runs, failed operations: " + ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))


def cpu_note(runs):
    """Runs during which the rest of the machine used more than a quarter of a core."""
    disturbed = [name for name, rs in runs.items() for r in rs if r["_cpu"].get("other_cores", 0) > 0.25]
    total = sum(1 for rs in runs.values() for r in rs if r["_cpu"])
    return f"{len(disturbed)} of {total} measured runs shared the machine with other work (> 0.25 cores)" + \
        (f": {', '.join(sorted(set(disturbed)))}" if disturbed else "")


def cmd_summary(out):
    info = json.load(open(os.path.join(out, "suite.json")))
    skipped = info.get("skipped", {})
    runs = load_runs(out)
    t = Table(info["smoke"])
    summarize_concurrent(t, runs)
    summarize_sequential(t, runs)
    summarize_contention(t, runs)
    summarize_batch(t, runs, skipped)
    summarize_redis(t, runs, skipped)
    summarize_h2load(t, runs, skipped)
    summarize_memory(t, runs)
    summarize_expiry(t, runs)
    head = [f"quotad benchmark suite, {info['started']}, commit {info['commit']}",
            f"machine: {info['machine']}",
            f"quotad on core {info['server_core']}, load generators on core {info['client_core']}; "
            f"{info['repeats']} rounds of {info['duration_s']} s after {info['warmup_s']} s warmup; medians",
            "quotad: default settings (authentication on with an API key, --durability write, metrics on); "
            + info["config_note"]]
    if info["smoke"]:
        head.append("SMOKE RUN (BENCH_SMOKE=1): proves the suite runs; its figures measure nothing")
    lines = head + ["", t.text(), "", errors_note(runs), cpu_note(runs)]
    for failure in info.get("failures", []):
        lines.append(f"FAILED: {failure}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({**info, "rows": t.rows, "errors": errors_note(runs), "cpu": cpu_note(runs)}, f, indent=2)
        f.write("\n")


COMMANDS = {
    "metrics": cmd_metrics,
    "open-holds": lambda url: print(open_holds(scrape(url))),
    "poll-open-holds": cmd_poll_open_holds,
    "rss": cmd_rss,
    "h2load-result": cmd_h2load_result,
    "redis-result": cmd_redis_result,
    "expiry-result": cmd_expiry_result,
    "summary": cmd_summary,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
