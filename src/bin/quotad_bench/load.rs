//! The load itself: `concurrency` tasks, each looping over one operation of the scenario and keeping
//! its own histogram and error counts (no shared state on the hot path but one atomic in `--requests`
//! mode), merged when all have stopped. With `--batch-size` above 1 an operation is a batch call (or a
//! pair of them) of that many items, and items are counted besides calls.

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
    CheckAndReserveBatchRequest, CheckAndReserveRequest, CommitBatchRequest, CommitRequest, GetBalanceRequest,
    ReleaseBatchRequest, ReleaseRequest, check_and_reserve_result, commit_result, quota_client::QuotaClient,
    release_result,
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
    /// Operations whose every call succeeded (the histogram holds their latency).
    pub ok: u64,
    /// gRPC calls made by recorded operations, successful or not.
    pub calls: u64,
    /// Failed operations by the status code of the call that failed.
    pub errors: BTreeMap<String, u64>,
    /// Items sent by recorded operations (one per operation without batches).
    pub items: u64,
    /// Items that succeeded: a reservation, with its commit or release in the pairs.
    pub items_ok: u64,
    /// Items that failed, by status code: refused on their own, or in a call that failed whole.
    pub item_errors: ItemErrors,
    /// From the end of the warmup to the last recorded completion.
    pub elapsed: Duration,
    /// With `--window`: latency per window.
    pub windows: Option<Vec<WindowReport>>,
}

impl Recorded {
    fn new() -> Self {
        Self {
            latency_us: new_histogram(),
            ok: 0,
            calls: 0,
            errors: BTreeMap::new(),
            items: 0,
            items_ok: 0,
            item_errors: ItemErrors::default(),
            elapsed: Duration::ZERO,
            windows: None,
        }
    }

    fn add(&mut self, part: Recorded) {
        self.latency_us.add(&part.latency_us).expect("histograms share their bounds");
        self.ok += part.ok;
        self.calls += part.calls;
        for (code, count) in part.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.items += part.items;
        self.items_ok += part.items_ok;
        self.item_errors.add(&part.item_errors);
        self.elapsed = self.elapsed.max(part.elapsed);
    }
}

/// Failed items by status code, counted without a map lookup per item: one counter per code.
#[derive(Debug, Default, Clone)]
pub struct ItemErrors([u64; 17]);

impl ItemErrors {
    fn count(&mut self, code: i32, items: u64) {
        // Codes are 0 to 16; anything else is counted as UNKNOWN, as tonic reads it.
        let slot = usize::try_from(code).ok().filter(|slot| *slot < self.0.len()).unwrap_or(Code::Unknown as usize);
        self.0[slot] += items;
    }

    fn add(&mut self, other: &ItemErrors) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    /// The counts by code name, for the report.
    pub fn by_code(&self) -> BTreeMap<String, u64> {
        let counted = self.0.iter().enumerate().filter(|(_, count)| **count > 0);
        counted.map(|(code, count)| (code_name(Code::from(code as i32)), *count)).collect()
    }
}

/// Shared by all tasks; read-only but for the request counter.
struct Shared {
    scenario: Scenario,
    batch_size: usize,
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
        batch_size: plan.batch_size,
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
        recorded.add(task.await.map_err(|e| format!("load task failed: {e}"))?);
    }
    recorded.windows = shared.windows.as_ref().map(|windows| windows.report());
    Ok(recorded)
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, HISTOGRAM_DIGITS).expect("valid histogram bounds")
}

/// One task's loop. Task `index` starts at environment and agent `index` and strides by the
/// concurrency, so tasks cover all environments without two tasks sharing one at the same step; the
/// items of a batch take the steps one after another, as that many operations would.
async fn worker(shared: Arc<Shared>, index: usize, channel: Connection) -> Recorded {
    let mut client = Client::new(shared.scenario, channel);
    let mut recorded = Recorded::new();
    let mut windows = shared.windows.clone().map(WindowRecorder::new);
    let mut targets = Vec::with_capacity(shared.batch_size);
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
        let ttl_seconds = match shared.expire_at {
            Some(second) => ttl_until(second, unix_now_ms()),
            None => shared.ttl_seconds,
        };
        targets.clear();
        for _ in 0..shared.batch_size {
            let environment = shared.environments[slot % shared.environments.len()].as_str();
            targets.push((environment, shared.agents[slot % shared.agents.len()].as_str()));
            slot = slot.wrapping_add(shared.concurrency);
        }
        let done = if shared.batch_size == 1 {
            let (environment, agent) = targets[0];
            client.operation(environment, agent, ttl_seconds).await.into()
        } else {
            client.batch_operation(&targets, ttl_seconds).await
        };
        if !recording {
            continue;
        }
        let finished = Instant::now();
        recorded.elapsed = finished - shared.record_from;
        let micros = u64::try_from((finished - started).as_micros()).unwrap_or(u64::MAX);
        recorded.calls += done.calls;
        recorded.items += targets.len() as u64;
        recorded.items_ok += done.items_ok;
        recorded.item_errors.add(&done.item_errors);
        let succeeded = done.failed.is_none();
        match done.failed {
            None => {
                recorded.latency_us.saturating_record(micros.max(1));
                recorded.ok += 1;
            }
            Some(code) => *recorded.errors.entry(code_name(code)).or_default() += 1,
        }
        if let Some(windows) = &mut windows {
            windows.record(started, succeeded.then_some(micros));
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

/// What one operation did.
#[derive(Default)]
struct Done {
    /// gRPC calls made.
    calls: u64,
    /// The code of the call that failed, if one did.
    failed: Option<Code>,
    items_ok: u64,
    item_errors: ItemErrors,
}

impl Done {
    /// A call failed whole: its items failed with it.
    fn failed(mut self, status: &Status, items: usize) -> Self {
        self.failed = Some(status.code());
        self.item_errors.count(status.code() as i32, items as u64);
        self
    }
}

/// A unary operation: one item.
impl From<Result<u64, Failure>> for Done {
    fn from(result: Result<u64, Failure>) -> Self {
        match result {
            Ok(calls) => Done { calls, items_ok: 1, ..Done::default() },
            Err(Failure { calls, code }) => {
                let mut item_errors = ItemErrors::default();
                item_errors.count(code as i32, 1);
                Done { calls, failed: Some(code), items_ok: 0, item_errors }
            }
        }
    }
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

    /// One unary operation; returns the calls it made.
    async fn operation(&mut self, environment: &str, agent: &str, ttl_seconds: u32) -> Result<u64, Failure> {
        let (client, scenario) = match self {
            Self::Health(client) => {
                client.check(HealthCheckRequest { service: String::new() }).await.map_err(Failure::at(1))?;
                return Ok(1);
            }
            Self::Quota(client, scenario) => (client, *scenario),
        };
        if scenario == Scenario::Balance {
            let request = GetBalanceRequest { environment_id: environment.to_owned() };
            client.get_balance(request).await.map_err(Failure::at(1))?;
            return Ok(1);
        }
        let reserve = reserve_request(environment, agent, ttl_seconds);
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
        Ok(scenario.calls())
    }

    /// One operation of batch calls: CheckAndReserveBatch of an item per target, then, in the pairs,
    /// CommitBatch or ReleaseBatch of the reservations it granted.
    async fn batch_operation(&mut self, targets: &[(&str, &str)], ttl_seconds: u32) -> Done {
        let Self::Quota(client, scenario) = self else { unreachable!("only the reserve scenarios have batches") };
        let items = targets.iter().map(|(environment, agent)| reserve_request(environment, agent, ttl_seconds));
        let request = CheckAndReserveBatchRequest { items: items.collect() };
        let mut done = Done { calls: 1, ..Done::default() };
        let results = match client.check_and_reserve_batch(request).await {
            Ok(response) => response.into_inner().results,
            Err(status) => return done.failed(&status, targets.len()),
        };
        let mut granted = Vec::with_capacity(results.len());
        for result in results {
            match result.outcome {
                Some(check_and_reserve_result::Outcome::Ok(grant)) => granted.push(grant.reservation_id),
                Some(check_and_reserve_result::Outcome::Error(error)) => done.item_errors.count(error.code, 1),
                None => done.item_errors.count(Code::Unknown as i32, 1),
            }
        }
        if *scenario == Scenario::Reserve {
            done.items_ok = granted.len() as u64;
            return done;
        }
        if granted.is_empty() {
            return done;
        }
        done.calls = 2;
        let count = granted.len();
        let settled = match scenario {
            Scenario::ReserveCommit => commit_all(client, granted).await,
            _ => release_all(client, granted).await,
        };
        match settled {
            Err(status) => done.failed(&status, count),
            Ok(codes) => {
                for code in codes {
                    match code {
                        None => done.items_ok += 1,
                        Some(code) => done.item_errors.count(code, 1),
                    }
                }
                done
            }
        }
    }
}

/// Commits 1 message of each reservation in one CommitBatch; returns each item's refusal code, if any.
async fn commit_all(client: &mut QuotaClient<Connection>, ids: Vec<String>) -> Result<Vec<Option<i32>>, Status> {
    let items =
        ids.into_iter().map(|reservation_id| CommitRequest { reservation_id, messages: Some(1), usage: Vec::new() });
    let response = client.commit_batch(CommitBatchRequest { items: items.collect() }).await?;
    let codes = response.into_inner().results.into_iter().map(|result| match result.outcome {
        Some(commit_result::Outcome::Ok(_)) => None,
        Some(commit_result::Outcome::Error(error)) => Some(error.code),
        None => Some(Code::Unknown as i32),
    });
    Ok(codes.collect())
}

/// Releases each reservation in one ReleaseBatch; returns each item's refusal code, if any.
async fn release_all(client: &mut QuotaClient<Connection>, ids: Vec<String>) -> Result<Vec<Option<i32>>, Status> {
    let items = ids.into_iter().map(|reservation_id| ReleaseRequest { reservation_id });
    let response = client.release_batch(ReleaseBatchRequest { items: items.collect() }).await?;
    let codes = response.into_inner().results.into_iter().map(|result| match result.outcome {
        Some(release_result::Outcome::Ok(_)) => None,
        Some(release_result::Outcome::Error(error)) => Some(error.code),
        None => Some(Code::Unknown as i32),
    });
    Ok(codes.collect())
}

/// A reservation of 1 message, as every operation makes.
fn reserve_request(environment: &str, agent: &str, ttl_seconds: u32) -> CheckAndReserveRequest {
    CheckAndReserveRequest {
        environment_id: environment.to_owned(),
        agent_id: agent.to_owned(),
        messages: Some(1),
        usage: Vec::new(),
        idempotency_key: String::new(),
        ttl_seconds,
        dry_run: false,
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
