//! The load itself: `concurrency` tasks, each looping over one operation of the scenario and keeping
//! its own histogram and error counts (no shared state on the hot path but one atomic in `--requests`
//! mode), merged when all have stopped.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use quotad::proto::{
    CheckAndReserveRequest, CommitRequest, GetBalanceRequest, ReleaseRequest, quota_client::QuotaClient,
};
use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    Connection,
    cli::{Limit, Plan, Scenario, agent_id, environment_id, ttl_until, unix_now_ms},
    windows::{WindowRecorder, WindowReport, Windows},
};

/// The histogram's range in microseconds: 1 µs to 10 minutes at 3 significant digits. Larger values
/// are clamped (a call cannot take longer than `--timeout` anyway).
pub const HISTOGRAM_MAX_US: u64 = 600_000_000;
const HISTOGRAM_DIGITS: u8 = 3;

/// What all tasks recorded, merged.
pub struct Recorded {
    pub latency_us: Histogram<u64>,
    /// Operations that succeeded (the histogram holds their latency).
    pub ok: u64,
    /// gRPC calls made by recorded operations, successful or not.
    pub calls: u64,
    /// Failed operations by the status code of the call that failed.
    pub errors: BTreeMap<String, u64>,
    /// From the end of the warmup to the last recorded completion.
    pub elapsed: Duration,
    /// With `--window`: latency per window.
    pub windows: Option<Vec<WindowReport>>,
}

/// Shared by all tasks; read-only but for the request counter.
struct Shared {
    scenario: Scenario,
    environments: Vec<String>,
    agents: Vec<String>,
    concurrency: usize,
    ttl_seconds: u32,
    /// `Some(second)`: each reservation's TTL is chosen so that its hold expires within that second.
    expire_at: Option<u64>,
    /// Recording starts here; operations that begin earlier are warmup.
    record_from: Instant,
    limit: Limit,
    /// Operations claimed in `--requests` mode.
    claimed: AtomicU64,
    windows: Option<Arc<Windows>>,
}

/// Runs the scenario over `channels` as `plan` says, and returns what was recorded.
pub async fn run(plan: &Plan, channels: &[Connection]) -> Result<Recorded, String> {
    let (now, now_unix_ms) = (Instant::now(), unix_now_ms());
    let record_from = now + plan.warmup;
    let record_from_unix_ms = now_unix_ms + u64::try_from(plan.warmup.as_millis()).unwrap_or(u64::MAX);
    let shared = Arc::new(Shared {
        scenario: plan.scenario,
        environments: (0..plan.environments).map(|i| environment_id(&plan.tenant, i)).collect(),
        agents: (0..plan.agents).map(agent_id).collect(),
        concurrency: plan.concurrency,
        ttl_seconds: plan.ttl_seconds,
        expire_at: plan.expire_at,
        record_from,
        limit: plan.limit,
        claimed: AtomicU64::new(0),
        windows: plan.window.map(|width| Windows::new(width, record_from, record_from_unix_ms)),
    });
    let tasks: Vec<_> = (0..plan.concurrency)
        .map(|index| tokio::spawn(worker(shared.clone(), index, channels[index % channels.len()].clone())))
        .collect();
    let mut recorded = Recorded::new();
    for task in tasks {
        let part = task.await.map_err(|e| format!("load task failed: {e}"))?;
        recorded.latency_us.add(&part.latency_us).expect("histograms share their bounds");
        recorded.ok += part.ok;
        recorded.calls += part.calls;
        for (code, count) in part.errors {
            *recorded.errors.entry(code).or_default() += count;
        }
        recorded.elapsed = recorded.elapsed.max(part.elapsed);
    }
    recorded.windows = shared.windows.as_ref().map(|windows| windows.report());
    Ok(recorded)
}

impl Recorded {
    fn new() -> Self {
        Self {
            latency_us: new_histogram(),
            ok: 0,
            calls: 0,
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
            windows: None,
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, HISTOGRAM_DIGITS).expect("valid histogram bounds")
}

/// One task's loop. Task `index` starts at environment and agent `index` and strides by the
/// concurrency, so tasks cover all environments without two tasks sharing one at the same step.
async fn worker(shared: Arc<Shared>, index: usize, channel: Connection) -> Recorded {
    let mut client = Client::new(shared.scenario, channel);
    let mut recorded = Recorded::new();
    let mut windows = shared.windows.clone().map(WindowRecorder::new);
    let mut slot = index;
    loop {
        let started = Instant::now();
        let recording = started >= shared.record_from;
        if recording && !claim(&shared, started) {
            if let Some(windows) = &mut windows {
                windows.flush();
            }
            return recorded;
        }
        let environment = &shared.environments[slot % shared.environments.len()];
        let agent = &shared.agents[slot % shared.agents.len()];
        slot = slot.wrapping_add(shared.concurrency);
        let ttl_seconds = match shared.expire_at {
            Some(second) => ttl_until(second, unix_now_ms()),
            None => shared.ttl_seconds,
        };
        let result = client.operation(environment, agent, ttl_seconds).await;
        if !recording {
            continue;
        }
        let finished = Instant::now();
        recorded.elapsed = finished - shared.record_from;
        let micros = u64::try_from((finished - started).as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(()) => {
                recorded.latency_us.saturating_record(micros.max(1));
                recorded.ok += 1;
                recorded.calls += shared.scenario.calls();
            }
            Err(Failure { calls, code }) => {
                recorded.calls += calls;
                *recorded.errors.entry(code_name(code)).or_default() += 1;
            }
        }
        if let Some(windows) = &mut windows {
            windows.record(started, result.is_ok().then_some(micros));
        }
    }
}

/// Whether one more operation may start: before the deadline, or within the request count.
fn claim(shared: &Shared, now: Instant) -> bool {
    match shared.limit {
        Limit::Duration(duration) => now < shared.record_from + duration,
        Limit::Requests(n) => shared.claimed.fetch_add(1, Ordering::Relaxed) < n,
    }
}

/// A failed operation: how many calls it made, and the code of the one that failed.
struct Failure {
    calls: u64,
    code: Code,
}

impl Failure {
    fn at(calls: u64) -> impl FnOnce(Status) -> Self {
        move |status| Self { calls, code: status.code() }
    }
}

enum Client {
    Quota(QuotaClient<Connection>, Scenario),
    Health(HealthClient<Connection>),
}

impl Client {
    fn new(scenario: Scenario, channel: Connection) -> Self {
        match scenario {
            Scenario::Health => Self::Health(HealthClient::new(channel)),
            _ => Self::Quota(QuotaClient::new(channel), scenario),
        }
    }

    async fn operation(&mut self, environment: &str, agent: &str, ttl_seconds: u32) -> Result<(), Failure> {
        let (client, scenario) = match self {
            Self::Health(client) => {
                client.check(HealthCheckRequest { service: String::new() }).await.map_err(Failure::at(1))?;
                return Ok(());
            }
            Self::Quota(client, scenario) => (client, *scenario),
        };
        if scenario == Scenario::Balance {
            let request = GetBalanceRequest { environment_id: environment.to_owned() };
            client.get_balance(request).await.map_err(Failure::at(1))?;
            return Ok(());
        }
        let reserve = CheckAndReserveRequest {
            environment_id: environment.to_owned(),
            agent_id: agent.to_owned(),
            messages: Some(1),
            usage: Vec::new(),
            idempotency_key: String::new(),
            ttl_seconds,
            dry_run: false,
        };
        let reservation_id =
            client.check_and_reserve(reserve).await.map_err(Failure::at(1))?.into_inner().reservation_id;
        match scenario {
            Scenario::ReserveCommit => {
                let commit = CommitRequest { reservation_id, messages: Some(1), usage: Vec::new() };
                client.commit(commit).await.map_err(Failure::at(2))?;
            }
            Scenario::ReserveRelease => {
                client.release(ReleaseRequest { reservation_id }).await.map_err(Failure::at(2))?;
            }
            Scenario::Reserve | Scenario::Balance | Scenario::Health => {}
        }
        Ok(())
    }
}

/// The canonical name of a gRPC status code, as grpcurl and ghz print it (`RESOURCE_EXHAUSTED`).
pub fn code_name(code: Code) -> String {
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }
}
