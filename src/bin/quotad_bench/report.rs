//! Results: the JSON document written with `--json`, and the compact table printed to stdout.

use std::{collections::BTreeMap, io::Write, path::Path};

use serde::Serialize;

use crate::{
    cli::{Limit, Plan},
    load::Recorded,
    setup::SetupReport,
    windows::WindowReport,
};

/// Latency of successful operations, in microseconds (a pair is timed from the reserve's start to the
/// commit's or release's end).
#[derive(Debug, Serialize)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub server: String,
    pub concurrency: usize,
    pub connections: usize,
    pub environments: usize,
    pub agents: usize,
    pub warmup_s: f64,
    /// `--requests` when given.
    pub requests: Option<u64>,
    /// Measured: from the end of the warmup to the last recorded completion.
    pub elapsed_s: f64,
    /// Successful operations (pairs for `reserve+commit` and `reserve+release`).
    pub ok: u64,
    pub failed: u64,
    /// Successful operations per second.
    pub ops_per_s: f64,
    /// gRPC calls per second, successful or not (two per pair).
    pub calls_per_s: f64,
    pub calls: u64,
    pub calls_per_op: u64,
    pub latency_us: Latency,
    /// Failed operations by the status code of the failing call.
    pub errors: BTreeMap<String, u64>,
    /// Items per call (`--batch-size`); 1 for the unary calls.
    pub batch_size: usize,
    /// Items sent (reservations), successful or not.
    pub items: u64,
    /// Items that succeeded: a reservation, with its commit or release in the pairs.
    pub items_ok: u64,
    /// Successful items per second: the messages a batch carries, comparable with `ops_per_s` of the
    /// unary calls (equal to it with a batch size of 1).
    pub items_per_second: f64,
    /// Failed items by status code: refused on their own within a batch, or in a call that failed whole.
    pub item_errors: BTreeMap<String, u64>,
    pub setup: Option<SetupReport>,
    /// `--expire-at`: the Unix second in which the holds were made to expire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<u64>,
    /// `--window`: the length of each window, and latency per window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<WindowReport>>,
}

impl Report {
    pub fn new(plan: &Plan, recorded: Recorded, setup: Option<SetupReport>) -> Self {
        let h = &recorded.latency_us;
        let secs = recorded.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let empty = h.is_empty();
        let at = |q: f64| if empty { 0 } else { h.value_at_quantile(q) };
        Self {
            scenario: plan.scenario.as_str(),
            server: plan.server.clone(),
            concurrency: plan.concurrency,
            connections: plan.connections,
            environments: plan.environments,
            agents: plan.agents,
            warmup_s: plan.warmup.as_secs_f64(),
            requests: match plan.limit {
                Limit::Requests(n) => Some(n),
                Limit::Duration(_) => None,
            },
            elapsed_s: recorded.elapsed.as_secs_f64(),
            ok: recorded.ok,
            failed: recorded.errors.values().sum(),
            ops_per_s: recorded.ok as f64 / secs,
            calls_per_s: recorded.calls as f64 / secs,
            calls: recorded.calls,
            calls_per_op: plan.scenario.calls(),
            latency_us: Latency {
                min: if empty { 0 } else { h.min() },
                mean: if empty { 0.0 } else { h.mean() },
                p50: at(0.50),
                p90: at(0.90),
                p99: at(0.99),
                p999: at(0.999),
                max: if empty { 0 } else { h.max() },
            },
            errors: recorded.errors,
            batch_size: plan.batch_size,
            items: recorded.items,
            items_ok: recorded.items_ok,
            items_per_second: recorded.items_ok as f64 / secs,
            item_errors: recorded.item_errors.by_code(),
            setup,
            expire_at: plan.expire_at,
            window_s: plan.window.map(|w| w.as_secs_f64()),
            windows: recorded.windows,
        }
    }

    /// A few lines for a person; the JSON has everything.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let l = &self.latency_us;
        writeln!(
            out,
            "{}  c={} connections={} environments={} agents={} batch={}  {:.2}s recorded after {:.1}s warmup",
            self.scenario,
            self.concurrency,
            self.connections,
            self.environments,
            self.agents,
            self.batch_size,
            self.elapsed_s,
            self.warmup_s
        )?;
        writeln!(
            out,
            "{:>12} {:>12} {:>12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "ops/s", "calls/s", "items/s", "ok", "failed", "p50", "p90", "p99", "p99.9", "max"
        )?;
        writeln!(
            out,
            "{:>12.1} {:>12.1} {:>12.1} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}   (latency in µs)",
            self.ops_per_s,
            self.calls_per_s,
            self.items_per_second,
            self.ok,
            self.failed,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        )?;
        for (code, count) in &self.errors {
            writeln!(out, "  error {code}: {count}")?;
        }
        if let Some(windows) = &self.windows {
            writeln!(
                out,
                "{:>10} {:>10} {:>8} {:>8} {:>8} {:>8}   (per window)",
                "start s", "ok", "failed", "p50", "p99", "max"
            )?;
            for w in windows {
                writeln!(
                    out,
                    "{:>10.3} {:>10} {:>8} {:>8} {:>8} {:>8}",
                    w.start_s, w.ok, w.failed, w.p50, w.p99, w.max
                )?;
            }
        }
        // Without batches every failed item is a failed operation, listed above.
        if self.batch_size > 1 {
            for (code, count) in &self.item_errors {
                writeln!(out, "  item error {code}: {count}")?;
            }
        }
        Ok(())
    }
}

pub fn print_setup(setup: &SetupReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "setup: tenant {} with {} environments ({} packs bought), {} admin calls in {:.2}s ({:.0}/s)",
        setup.tenant,
        setup.environments,
        setup.packs_bought,
        setup.admin_calls,
        setup.elapsed_s,
        setup.admin_calls_per_s
    )
}

/// Writes `value` as pretty JSON, whole or not at all (through a temporary file and a rename), so a
/// script never reads half a result.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
