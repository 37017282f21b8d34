//! Crash safety of the real `quotad` binary: SIGKILL under concurrent traffic, again and again on one
//! data directory, and after each restart every commit and release the client saw acknowledged is
//! reflected exactly once, every hold it knows to be open is still held, and the invariants hold. Also
//! a torn log tail, a damaged log or snapshot, and the data directory lock.
//!
//! The client keeps its own ledger of every operation (acknowledged, refused, or in flight when the
//! server died) and resolves the ones in flight after each restart by retrying them with the same
//! idempotency key or reservation id, as the README tells clients to. Amounts are exact integers in
//! milli; holds live for an hour, so nothing expires during a test and the arithmetic stays exact.
//!
//! The random choices come from a seeded xorshift generator; the seed is printed, and `CRASH_SEED=N`
//! replays the same choices (the interleaving of concurrent requests is up to the scheduler).

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{connect, milli, quotad_binary};
use quotad::proto::{
    Balance, CheckAndReserveBatchRequest, CheckAndReserveRequest, CheckAndReserveResponse, CommitBatchRequest,
    CommitRequest, CommitResponse, Draw, GetBalanceRequest, GetTenantRequest, ListReservationsRequest,
    PurchaseCapacityRequest, ReleaseBatchRequest, ReleaseRequest, Source, TenantCapacity,
    quota_admin_client::QuotaAdminClient, quota_client::QuotaClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStderr, Command},
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

// The scenario: one tenant whose environments cover every source and the linked app path.

const TENANT: &str = "crash-tenant";
const PACK_MESSAGES: u64 = 100;
const BOOTSTRAP_PACKS: u64 = 80;
/// Holds outlive every test by far, so that no hold expires and every amount is known exactly.
const TTL_SECONDS: u32 = 3_600;

/// A capacity environment of the bootstrap config.
struct EnvSpec {
    id: &'static str,
    messages: u64,
    from_pool: bool,
    /// Pay-as-you-go budget in messages, if enabled.
    payg_budget: Option<u64>,
    apps: &'static [&'static str],
}

const ENVIRONMENTS: [EnvSpec; 3] = [
    EnvSpec { id: "pool-a", messages: 1_000, from_pool: true, payg_budget: None, apps: &[] },
    EnvSpec { id: "pool-b", messages: 500, from_pool: true, payg_budget: Some(1_500), apps: &[] },
    EnvSpec { id: "fixed", messages: 6_000, from_pool: false, payg_budget: None, apps: &["fixed-app"] },
];

/// Where traffic goes: (the id a request names, the capacity environment that holds the capacity).
const TARGETS: [(&str, &str); 4] =
    [("pool-a", "pool-a"), ("pool-b", "pool-b"), ("fixed", "fixed"), ("fixed-app", "fixed")];

/// Snapshots (and the log pruning that follows them) during the crash cycles.
const EVERY_SECOND: &[&str] = &["--snapshot-interval", "1s"];
/// No periodic snapshot during a test, so that the log holds every record.
const NEVER: &[&str] = &["--snapshot-interval", "1h"];

const TASKS: usize = 16;
const CHANNELS: usize = 4;
/// Acknowledged holds left open across crashes, settled in a later cycle.
const MAX_PARKED: usize = 32;
/// How long a traffic call may go unanswered. Before the kill, a stall this long fails the test; after
/// it, the call counts as in flight. Bounded because a call on a connection the kill broke has been
/// seen, rarely, not to end on its own on the client's side, which the server's death cannot explain.
const CALL_BOUND: Duration = Duration::from_secs(20);

fn config_toml() -> String {
    let mut toml = format!(
        "pack_size_messages = {PACK_MESSAGES}\nmax_ttl_seconds = {TTL_SECONDS}\n\n[[bootstrap]]\nid = \"{TENANT}\"\n\
         packs = {BOOTSTRAP_PACKS}\n"
    );
    for env in &ENVIRONMENTS {
        let apps: Vec<String> = env.apps.iter().map(|app| format!("\"{app}\"")).collect();
        toml += &format!(
            "\n[[bootstrap.environments]]\nid = \"{}\"\nmessages = {}\ndraw_from_tenant_pool = {}\n\
             payg_enabled = {}\npayg_budget_messages = {}\napps = [{}]\n",
            env.id,
            env.messages,
            env.from_pool,
            env.payg_budget.is_some(),
            env.payg_budget.unwrap_or(0),
            apps.join(", ")
        );
    }
    toml
}

fn allocated_milli() -> u64 {
    ENVIRONMENTS.iter().map(|env| milli(env.messages)).sum()
}

// A tiny deterministic generator (xorshift64*), seeded through splitmix64.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi` (the modulo bias is irrelevant here).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

/// `CRASH_SEED` if set, otherwise the clock; printed so that a failure can be replayed.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("CRASH_SEED") {
        Ok(value) => value.parse().unwrap_or_else(|e| panic!("CRASH_SEED={value:?}: {e}")),
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    println!("{test}: seed {seed} (replay with CRASH_SEED={seed})");
    seed
}

// The quotad process.

/// A data directory under the target directory, removed after a passing test and kept after a
/// failing one.
struct DataDir {
    root: Option<tempfile::TempDir>,
}

impl DataDir {
    fn new(name: &str) -> Self {
        let root = tempfile::Builder::new()
            .prefix(&format!("crash-{name}-"))
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("a temporary directory");
        std::fs::write(root.path().join("quotad.toml"), config_toml()).unwrap();
        Self { root: Some(root) }
    }

    fn data(&self) -> PathBuf {
        self.root.as_ref().unwrap().path().join("data")
    }

    fn config(&self) -> PathBuf {
        self.root.as_ref().unwrap().path().join("quotad.toml")
    }

    /// `quotad` on this directory with the crash scenario's config.
    fn quotad(&self, durability: &str, extra: &[&str]) -> Command {
        let mut command = quotad_binary();
        command
            .args(["--listen", "127.0.0.1:0", "--durability", durability, "--data-dir"])
            .arg(self.data())
            .arg("--config")
            .arg(self.config())
            .args(extra);
        command
    }

    /// The files of the data directory whose names start with `prefix` and end with `suffix`, sorted
    /// (names carry zero-padded sequence numbers, so this is sequence order).
    fn files(&self, prefix: &str, suffix: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.data())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                let name = path.file_name().unwrap().to_str().unwrap();
                name.starts_with(prefix) && name.ends_with(suffix)
            })
            .collect();
        files.sort();
        files
    }

    fn segments(&self) -> Vec<PathBuf> {
        self.files("wal-", ".log")
    }

    fn snapshots(&self) -> Vec<PathBuf> {
        self.files("snapshot-", ".snap")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = self.root.take().unwrap().keep();
            eprintln!("data directory kept for inspection: {}", kept.display());
        }
    }
}

/// What the log says as it goes: snapshots written and the log files they let go.
#[derive(Debug, Default, Clone, Copy)]
struct LogProgress {
    snapshots: u64,
    removed_files: u64,
}

/// A running `quotad`; killed if a test fails while it runs.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    /// Every stderr line so far.
    log: Arc<Mutex<Vec<String>>>,
    progress: watch::Receiver<LogProgress>,
    reader: JoinHandle<()>,
}

/// The value of `key=value` in a text log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// Starts `command` and waits for the line that says where it listens.
async fn start(mut command: Command) -> Daemon {
    let mut child = command.spawn().expect("start quotad");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (addr_tx, addr_rx) = oneshot::channel();
    let (progress_tx, progress) = watch::channel(LogProgress::default());
    let reader = tokio::spawn(read_log(child.stderr.take().unwrap(), log.clone(), addr_tx, progress_tx));
    let addr = match within(30, "the listening line", addr_rx).await {
        Ok(addr) => addr,
        Err(_) => {
            let status = within(30, "quotad's exit", child.wait()).await;
            panic!("quotad exited before listening ({status:?}); log: {:#?}", log.lock().unwrap());
        }
    };
    Daemon { child, addr, log, progress, reader }
}

/// Collects stderr until quotad exits: sends the listening address once, and counts snapshots.
async fn read_log(
    stderr: ChildStderr,
    log: Arc<Mutex<Vec<String>>>,
    addr_tx: oneshot::Sender<SocketAddr>,
    progress: watch::Sender<LogProgress>,
) {
    let mut addr_tx = Some(addr_tx);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("listening")
            && let Some(address) = field(&line, "address")
            && let Some(tx) = addr_tx.take()
        {
            let _ = tx.send(address.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")));
        }
        if line.contains("snapshot written") {
            let removed: u64 = field(&line, "removed_files").and_then(|n| n.parse().ok()).unwrap_or(0);
            progress.send_modify(|p| {
                p.snapshots += 1;
                p.removed_files += removed;
            });
        }
        log.lock().unwrap().push(line);
    }
}

/// Runs `command`, which must exit without serving, and returns its exit status and stderr. If it
/// starts serving instead, it is killed and the test fails with its log.
async fn run_to_refusal(mut command: Command, what: &str) -> (ExitStatus, String) {
    let mut child = command.spawn().expect("start quotad");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (addr_tx, addr_rx) = oneshot::channel();
    let reader = tokio::spawn(read_log(child.stderr.take().unwrap(), log.clone(), addr_tx, watch::Sender::default()));
    let outcome = within(30, "quotad's exit", async {
        tokio::select! {
            status = child.wait() => Err(status.expect("wait for quotad")),
            Ok(addr) = addr_rx => Ok(addr),
        }
    })
    .await;
    if outcome.is_ok() {
        child.start_kill().expect("send SIGKILL");
        within(30, "quotad's death", child.wait()).await.expect("wait for quotad");
    }
    within(30, "the end of quotad's log", reader).await.unwrap();
    let stderr = log.lock().unwrap().join("\n");
    match outcome {
        Ok(addr) => panic!("{what}: quotad started serving on {addr} instead of refusing; log:\n{stderr}"),
        Err(status) => (status, stderr),
    }
}

impl Daemon {
    /// SIGKILL (tokio's `start_kill` on unix), then waits for the process to be gone; returns its log.
    async fn kill(mut self) -> Vec<String> {
        self.child.start_kill().expect("send SIGKILL");
        let status = within(30, "quotad's death", self.child.wait()).await.expect("wait for quotad");
        within(30, "the end of quotad's log", self.reader).await.unwrap();
        let log = self.log.lock().unwrap().clone();
        assert_eq!(status.signal(), Some(9), "quotad ended on its own before the SIGKILL: {status:?}; log: {log:#?}");
        log
    }

    /// SIGTERM (through the `kill` command), then waits for a graceful exit; returns its log.
    async fn terminate(mut self) -> Vec<String> {
        let pid = self.child.id().expect("still running");
        let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        assert!(sent.expect("run kill").success(), "kill -TERM {pid}");
        let status = within(30, "quotad's exit", self.child.wait()).await.expect("wait for quotad");
        within(30, "the end of quotad's log", self.reader).await.unwrap();
        let log = self.log.lock().unwrap().clone();
        assert_eq!(status.code(), Some(0), "{status:?}; log: {log:#?}");
        log
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    async fn clients(&self) -> Clients {
        let channel = connect(self.addr).await;
        Clients { quota: QuotaClient::new(channel.clone()), admin: QuotaAdminClient::new(channel) }
    }
}

/// Bounds a wait on something the test depends on, so that a hang fails instead of stalling the suite.
async fn within<T>(seconds: u64, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), f).await.unwrap_or_else(|_| panic!("{what}: no end in sight"))
}

#[derive(Clone)]
struct Clients {
    quota: QuotaClient<Channel>,
    admin: QuotaAdminClient<Channel>,
}

impl Clients {
    async fn balance(&self, environment: &str) -> Balance {
        let request = GetBalanceRequest { environment_id: environment.into() };
        self.quota
            .clone()
            .get_balance(request)
            .await
            .unwrap_or_else(|e| panic!("GetBalance {environment}: {e:?}"))
            .into_inner()
    }

    async fn tenant(&self) -> TenantCapacity {
        let request = GetTenantRequest { tenant_id: TENANT.into() };
        self.admin.clone().get_tenant(request).await.expect("GetTenant").into_inner()
    }

    async fn purchase(&self, key: &str) -> TenantCapacity {
        let request = PurchaseCapacityRequest { tenant_id: TENANT.into(), packs: 1, idempotency_key: key.into() };
        self.admin.clone().purchase_capacity(request).await.expect("PurchaseCapacity").into_inner()
    }

    /// Everything GetBalance and GetTenant report, for comparing two states.
    async fn state(&self) -> (Vec<Balance>, TenantCapacity) {
        let mut balances = Vec::new();
        for (target, _) in TARGETS {
            balances.push(self.balance(target).await);
        }
        (balances, self.tenant().await)
    }
}

// The client's ledger.

/// Amounts per source, in milli.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sources {
    allocation: u64,
    pool: u64,
    payg: u64,
}

impl Sources {
    fn of(draws: &[Draw]) -> Self {
        let mut sources = Self::default();
        for draw in draws {
            let slot = match draw.source() {
                Source::EnvironmentAllocation => &mut sources.allocation,
                Source::TenantPool => &mut sources.pool,
                Source::PayAsYouGo => &mut sources.payg,
                Source::Unspecified => panic!("a draw without a source: {draws:?}"),
            };
            *slot += draw.amount_milli;
        }
        sources
    }

    fn total(&self) -> u64 {
        self.allocation + self.pool + self.payg
    }

    fn add(&mut self, other: Sources) {
        self.allocation += other.allocation;
        self.pool += other.pool;
        self.payg += other.payg;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Actual use in messages: below, equal to or above the hold.
    Commit(u64),
    Release,
}

/// One reserve-then-settle operation, as the client planned it.
#[derive(Debug, Clone)]
struct Op {
    key: String,
    agent: String,
    /// The environment the request names (a capacity environment or a linked app).
    target: &'static str,
    /// The capacity environment behind `target`.
    env: &'static str,
    hold: u64,
    settle: Settle,
}

/// An acknowledged hold.
#[derive(Debug, Clone)]
struct Held {
    op: Op,
    reservation: String,
    draws: Sources,
}

/// An operation whose last request got no answer because the server died.
#[derive(Debug)]
enum InFlight {
    Reserve(Op),
    Settle(Held),
}

/// What a settled operation was answered, kept to check retries at the end.
#[derive(Debug, Clone)]
struct Settled {
    held: Held,
    /// For a commit, what was charged per source and the overage; for a release, what was released.
    charged: Sources,
    overage_milli: u64,
    released_milli: u64,
}

/// What the client knows about one capacity environment.
#[derive(Debug, Default, Clone)]
struct EnvExpect {
    /// Sum of the actual use of every acknowledged commit.
    committed_milli: u64,
    /// What those commits' answers said each source was charged, and the overage.
    charged: Sources,
    overage_milli: u64,
}

#[derive(Debug, Default)]
struct Stats {
    reserved: u64,
    refused: u64,
    committed: u64,
    released: u64,
    in_flight_reserves: u64,
    in_flight_settles: u64,
    retried_reserves_refused: u64,
}

#[derive(Debug, Default)]
struct Model {
    purchased_milli: u64,
    envs: BTreeMap<&'static str, EnvExpect>,
    /// Acknowledged holds that no task is settling: left open on purpose, or caught by the kill.
    parked: Vec<Held>,
    in_flight: Vec<InFlight>,
    settled: Vec<Settled>,
    stats: Stats,
}

impl Model {
    fn record_reserve(&mut self, op: Op, answer: &CheckAndReserveResponse) -> Held {
        let draws = Sources::of(&answer.draws);
        assert_eq!(answer.reserved_milli, milli(op.hold), "{op:?}: {answer:?}");
        assert_eq!(draws.total(), answer.reserved_milli, "{op:?}: {answer:?}");
        assert!(answer.reservation_id.starts_with(&format!("{}/", op.env)), "{op:?}: {answer:?}");
        self.stats.reserved += 1;
        Held { op, reservation: answer.reservation_id.clone(), draws }
    }

    fn record_settled(&mut self, settled: Settled) {
        let env = self.envs.entry(settled.held.op.env).or_default();
        match settled.held.op.settle {
            Settle::Commit(actual) => {
                assert_eq!(settled.charged.total() + settled.overage_milli, milli(actual), "{settled:?}");
                env.committed_milli += milli(actual);
                env.charged.add(settled.charged);
                env.overage_milli += settled.overage_milli;
                self.stats.committed += 1;
            }
            Settle::Release => {
                assert_eq!(settled.released_milli, milli(settled.held.op.hold), "{settled:?}");
                self.stats.released += 1;
            }
        }
        self.settled.push(settled);
    }
}

/// What the traffic tasks share.
struct Shared {
    model: Mutex<Model>,
    /// Set just before the SIGKILL: from then on, a request without an answer is in flight, not a bug.
    stop: AtomicBool,
    /// Answers received (reserves, refusals, commits and releases), to pick the moment of the kill.
    answers: watch::Sender<u64>,
}

impl Shared {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap()
    }

    fn answered(&self) {
        self.answers.send_modify(|n| *n += 1);
    }
}

// Requests.

fn reserve_request(op: &Op) -> CheckAndReserveRequest {
    CheckAndReserveRequest {
        environment_id: op.target.into(),
        agent_id: op.agent.clone(),
        messages: Some(op.hold),
        idempotency_key: op.key.clone(),
        ttl_seconds: TTL_SECONDS,
        ..Default::default()
    }
}

fn is_depleted(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
        && status.get_details_error_info().is_some_and(|info| info.reason == "QUOTA_DEPLETED")
}

enum Reserved {
    Held(Held),
    Refused,
}

/// Reserves `op`; `Err` is a request that got no answer.
async fn reserve(quota: &mut QuotaClient<Channel>, shared: &Shared, op: Op) -> Result<Reserved, Status> {
    match bounded(quota.check_and_reserve(reserve_request(&op))).await {
        Ok(answer) => Ok(Reserved::Held(shared.model().record_reserve(op, &answer.into_inner()))),
        Err(status) if is_depleted(&status) => {
            shared.model().stats.refused += 1;
            Ok(Reserved::Refused)
        }
        Err(status) => Err(status),
    }
}

/// Commits or releases `held` as planned; `Err` is a request that got no answer.
async fn settle(quota: &mut QuotaClient<Channel>, shared: &Shared, held: Held) -> Result<(), (Held, Status)> {
    let settled = match held.op.settle {
        Settle::Commit(actual) => {
            let request =
                CommitRequest { reservation_id: held.reservation.clone(), messages: Some(actual), usage: Vec::new() };
            match bounded(quota.commit(request)).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    let charged = Sources::of(&answer.draws);
                    assert_eq!(charged.total(), answer.charged_milli, "{held:?}: {answer:?}");
                    assert!(!answer.late, "{held:?}: {answer:?}");
                    Settled {
                        held,
                        charged,
                        overage_milli: answer.overage_milli,
                        released_milli: answer.released_milli,
                    }
                }
                Err(status) => return Err((held, status)),
            }
        }
        Settle::Release => {
            match bounded(quota.release(ReleaseRequest { reservation_id: held.reservation.clone() })).await {
                Ok(answer) => {
                    let released_milli = answer.into_inner().released_milli;
                    Settled { held, charged: Sources::default(), overage_milli: 0, released_milli }
                }
                Err(status) => return Err((held, status)),
            }
        }
    };
    shared.model().record_settled(settled);
    Ok(())
}

/// `call`'s answer, or `DEADLINE_EXCEEDED` once [`CALL_BOUND`] has passed without one.
async fn bounded<T>(call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL_BOUND, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("no answer within {CALL_BOUND:?}"))))
}

/// A failure before the kill is a bug (a wrong answer, or quotad died on its own); after the kill
/// began, the request is in flight.
fn unanswered(shared: &Shared, what: &str, status: &Status) {
    assert!(shared.stop.load(Ordering::SeqCst), "{what}: failed before the kill: {status:?}");
}

// Traffic.

fn plan_op(rng: &mut Rng, key: String, agent: String) -> Op {
    let (target, env) = TARGETS[rng.range(0, TARGETS.len() as u64 - 1) as usize];
    let hold = rng.range(1, 6);
    let settle = match rng.range(0, 7) {
        0 | 1 => Settle::Release,
        2 | 3 => Settle::Commit(rng.range(0, hold - 1)),
        4 | 5 => Settle::Commit(hold),
        _ => Settle::Commit(hold + rng.range(1, 3)),
    };
    Op { key, agent, target, env, hold, settle }
}

/// One client: reserves and settles until the kill, settling parked holds now and then and parking
/// a few of its own.
async fn traffic(mut quota: QuotaClient<Channel>, shared: Arc<Shared>, mut rng: Rng, name: String) {
    let agent = format!("agent-{}", rng.range(0, 2));
    for n in 0.. {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let parked = if rng.percent(30) { shared.model().parked.pop() } else { None };
        let held = match parked {
            Some(held) => held,
            None => {
                let op = plan_op(&mut rng, format!("{name}-{n}"), agent.clone());
                match reserve(&mut quota, &shared, op.clone()).await {
                    Ok(Reserved::Held(held)) => {
                        shared.answered();
                        held
                    }
                    Ok(Reserved::Refused) => {
                        shared.answered();
                        continue;
                    }
                    Err(status) => {
                        unanswered(&shared, &format!("CheckAndReserve {op:?}"), &status);
                        shared.model().in_flight.push(InFlight::Reserve(op));
                        return;
                    }
                }
            }
        };
        {
            let mut model = shared.model();
            if shared.stop.load(Ordering::SeqCst) || (rng.percent(5) && model.parked.len() < MAX_PARKED) {
                model.parked.push(held);
                continue;
            }
        }
        match settle(&mut quota, &shared, held).await {
            Ok(()) => shared.answered(),
            Err((held, status)) => {
                unanswered(&shared, &format!("settling {held:?}"), &status);
                shared.model().in_flight.push(InFlight::Settle(held));
                return;
            }
        }
    }
}

/// When a cycle's SIGKILL comes.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// After this many answers.
    Answers(u64),
    /// After the first periodic snapshot of this run, and this many answers more.
    AfterSnapshot(u64),
}

/// Runs traffic against `daemon` and SIGKILLs it as `kill_at` says; returns its log.
async fn traffic_until_kill(
    daemon: Daemon,
    shared: &Arc<Shared>,
    rng: &mut Rng,
    cycle: usize,
    kill_at: KillAt,
) -> Vec<String> {
    shared.stop.store(false, Ordering::SeqCst);
    shared.answers.send_replace(0);
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(connect(daemon.addr).await);
    }
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let quota = QuotaClient::new(channels[task % CHANNELS].clone());
        let task_rng = Rng::new(rng.next());
        tasks.spawn(traffic(quota, shared.clone(), task_rng, format!("c{cycle}-t{task}")));
    }
    let mut answers = shared.answers.subscribe();
    let mut progress = daemon.progress.clone();
    let moment = async {
        let extra = match kill_at {
            KillAt::Answers(n) => n,
            KillAt::AfterSnapshot(n) => {
                progress.wait_for(|p| p.snapshots >= 1).await.expect("the log reader lives while quotad does");
                *answers.borrow() + n
            }
        };
        answers.wait_for(|n| *n >= extra).await.expect("the sender lives in `shared`");
    };
    tokio::select! {
        () = within(60, "the moment of the kill", moment) => {}
        Some(ended) = tasks.join_next() => {
            // A request failed before the kill: show quotad's log, which says whether it died on its own.
            let why = match ended {
                Ok(()) => "a traffic task stopped".to_owned(),
                Err(error) => match error.into_panic().downcast::<String>() {
                    Ok(message) => *message,
                    Err(_) => "a traffic task panicked".to_owned(),
                },
            };
            panic!("cycle {cycle}, before the kill: {why}\nquotad's log: {:#?}", daemon.log());
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    let log = daemon.kill().await;
    within(60, "the traffic tasks' end", async {
        while let Some(ended) = tasks.join_next().await {
            ended.expect("a traffic task failed");
        }
    })
    .await;
    log
}

/// Retries every operation that was in flight at the kill, with the same key, reservation id and
/// amount, until each is settled or refused.
async fn resolve_in_flight(clients: &Clients, shared: &Shared) {
    let in_flight = std::mem::take(&mut shared.model().in_flight);
    let mut quota = clients.quota.clone();
    for pending in in_flight {
        let held = match pending {
            InFlight::Reserve(op) => {
                shared.model().stats.in_flight_reserves += 1;
                match reserve(&mut quota, shared, op.clone()).await {
                    Ok(Reserved::Held(held)) => held,
                    Ok(Reserved::Refused) => {
                        shared.model().stats.retried_reserves_refused += 1;
                        continue;
                    }
                    Err(status) => panic!("retrying CheckAndReserve {op:?} after the restart: {status:?}"),
                }
            }
            InFlight::Settle(held) => {
                shared.model().stats.in_flight_settles += 1;
                held
            }
        };
        if let Err((held, status)) = settle(&mut quota, shared, held).await {
            panic!("retrying the settlement of {held:?} after the restart: {status:?}");
        }
    }
}

/// Checks the server's balances and tenant against the client's ledger, exactly.
async fn check_state(clients: &Clients, shared: &Shared, when: &str) {
    let (envs, parked, purchased) = {
        let model = shared.model();
        assert!(model.in_flight.is_empty(), "{when}: unresolved operations");
        (model.envs.clone(), model.parked.clone(), model.purchased_milli)
    };
    let mut pool_used = 0;
    let mut pool_held = 0;
    for spec in &ENVIRONMENTS {
        let balance = clients.balance(spec.id).await;
        let expect = envs.get(spec.id).cloned().unwrap_or_default();
        let open: Vec<&Held> = parked.iter().filter(|held| held.op.env == spec.id).collect();
        let mut held = Sources::default();
        for hold in &open {
            held.add(hold.draws);
        }
        let context =
            format!("{when}, environment {}: {balance:#?}\nexpected {expect:?}, open holds {open:?}", spec.id);
        let used = balance.allocation_used_milli + balance.tenant_pool_used_milli + balance.payg_used_milli;
        assert_eq!(used + balance.overage_milli, expect.committed_milli, "acknowledged use: {context}");
        assert_eq!(balance.allocation_used_milli, expect.charged.allocation, "allocation: {context}");
        assert_eq!(balance.tenant_pool_used_milli, expect.charged.pool, "tenant pool: {context}");
        assert_eq!(balance.payg_used_milli, expect.charged.payg, "pay-as-you-go: {context}");
        assert_eq!(balance.overage_milli, expect.overage_milli, "overage: {context}");
        assert_eq!(balance.reserved_milli, held.total(), "open holds: {context}");
        assert_eq!(balance.allocated_milli, milli(spec.messages), "{context}");
        assert!(balance.allocation_used_milli + held.allocation <= balance.allocated_milli, "{context}");
        match spec.payg_budget {
            Some(budget) => {
                assert!(balance.payg_enabled && balance.payg_budget_milli == milli(budget), "{context}");
                assert!(balance.payg_used_milli + held.payg <= balance.payg_budget_milli, "{context}");
            }
            None => assert!(!balance.payg_enabled && balance.payg_used_milli == 0 && held.payg == 0, "{context}"),
        }
        if !spec.from_pool {
            assert!(balance.tenant_pool_used_milli == 0 && held.pool == 0, "{context}");
        }
        for app in spec.apps {
            assert_eq!(clients.balance(app).await, balance, "{when}: app {app} reports its capacity environment");
        }
        pool_used += balance.tenant_pool_used_milli;
        pool_held += held.pool;
    }
    let tenant = clients.tenant().await;
    let context = format!("{when}: {tenant:#?}");
    assert_eq!(tenant.purchased_milli, purchased, "purchased: {context}");
    assert_eq!(tenant.allocated_milli, allocated_milli(), "allocated: {context}");
    assert_eq!(tenant.unallocated_milli, purchased - allocated_milli(), "unallocated: {context}");
    assert_eq!(tenant.tenant_pool_used_milli, pool_used, "pool used = sum over environments: {context}");
    assert_eq!(tenant.tenant_pool_reserved_milli, pool_held, "pool held = sum of open pool draws: {context}");
    assert!(tenant.allocated_milli + pool_used + pool_held <= tenant.purchased_milli, "{context}");
}

/// Buys one pack with this cycle's key after retrying the previous cycle's, which must change nothing.
async fn top_up(clients: &Clients, shared: &Shared, cycle: usize) {
    let purchased = shared.model().purchased_milli;
    if cycle > 0 {
        let retry = clients.purchase(&format!("top-up-{}", cycle - 1)).await;
        assert_eq!(retry.purchased_milli, purchased, "a retried purchase after a restart: {retry:?}");
    }
    let bought = clients.purchase(&format!("top-up-{cycle}")).await;
    assert_eq!(bought.purchased_milli, purchased + milli(PACK_MESSAGES), "{bought:?}");
    shared.model().purchased_milli = bought.purchased_milli;
}

/// Settles every parked hold.
async fn settle_parked(clients: &Clients, shared: &Shared) {
    let parked = std::mem::take(&mut shared.model().parked);
    let mut quota = clients.quota.clone();
    for held in parked {
        if let Err((held, status)) = settle(&mut quota, shared, held).await {
            panic!("settling {held:?}: {status:?}");
        }
    }
}

/// Retries every settled operation, reserve and settlement, with its key, id and amount: each retry
/// must return the first answer and change nothing.
async fn retry_everything(clients: &Clients, shared: &Shared) {
    let settled = shared.model().settled.clone();
    let chunks: Vec<Vec<Settled>> = settled.chunks(settled.len().div_ceil(TASKS).max(1)).map(<[_]>::to_vec).collect();
    let mut tasks = JoinSet::new();
    for chunk in chunks {
        let mut quota = clients.quota.clone();
        tasks.spawn(async move {
            for first in chunk {
                let held = &first.held;
                let again = quota.check_and_reserve(reserve_request(&held.op)).await;
                let again = again.unwrap_or_else(|e| panic!("retrying the reserve of {first:?}: {e:?}")).into_inner();
                assert_eq!(again.reservation_id, held.reservation, "{first:?}: {again:?}");
                assert_eq!(Sources::of(&again.draws), held.draws, "{first:?}: {again:?}");
                match held.op.settle {
                    Settle::Commit(actual) => {
                        let request = CommitRequest {
                            reservation_id: held.reservation.clone(),
                            messages: Some(actual),
                            usage: Vec::new(),
                        };
                        let again = quota.commit(request).await;
                        let again = again.unwrap_or_else(|e| panic!("retrying the commit of {first:?}: {e:?}"));
                        let again = again.into_inner();
                        assert_eq!(Sources::of(&again.draws), first.charged, "{first:?}: {again:?}");
                        assert_eq!(again.overage_milli, first.overage_milli, "{first:?}: {again:?}");
                        assert_eq!(again.released_milli, first.released_milli, "{first:?}: {again:?}");
                    }
                    Settle::Release => {
                        let request = ReleaseRequest { reservation_id: held.reservation.clone() };
                        let again = quota.release(request).await;
                        let again = again.unwrap_or_else(|e| panic!("retrying the release of {first:?}: {e:?}"));
                        assert_eq!(again.into_inner().released_milli, first.released_milli, "{first:?}");
                    }
                }
            }
        });
    }
    within(60, "the retries", async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a retry task failed");
        }
    })
    .await;
}

/// What a run of crash cycles saw, for the report.
#[derive(Debug, Default)]
struct Coverage {
    kills: usize,
    in_flight_at_kills: usize,
    snapshots: u64,
    removed_files: u64,
    recoveries_from_snapshot: usize,
    replayed_records: u64,
    torn_tails: usize,
}

impl Coverage {
    /// Takes in what the log of one run says about recovery, snapshots and pruning.
    fn add_log(&mut self, log: &[String]) {
        for line in log {
            if line.contains("state recovered") {
                let snapshot_seq: u64 = field(line, "snapshot_seq").and_then(|n| n.parse().ok()).unwrap_or(0);
                self.recoveries_from_snapshot += usize::from(snapshot_seq > 0);
                self.replayed_records += field(line, "replayed").and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            if line.contains("snapshot written") {
                self.snapshots += 1;
                self.removed_files += field(line, "removed_files").and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            self.torn_tails += usize::from(line.contains("torn by a crash"));
            assert!(!line.contains("ERROR"), "quotad logged an error: {line}\nlog: {log:#?}");
        }
    }
}

/// Starts quotad on `dir`, checks that it recovered rather than bootstrapped (after the first start),
/// resolves what was in flight, and checks the state exactly.
async fn restart_and_check(
    dir: &DataDir,
    durability: &str,
    extra: &[&str],
    shared: &Shared,
    first: bool,
    when: &str,
) -> (Daemon, Clients) {
    let daemon = start(dir.quotad(durability, extra)).await;
    let log = daemon.log();
    let recovered = log.iter().any(|line| line.contains("state recovered"));
    let bootstrapped = log.iter().any(|line| line.contains("bootstrap applied"));
    assert_eq!((recovered, bootstrapped), (!first, first), "{when}: recovery or bootstrap; log: {log:#?}");
    let clients = daemon.clients().await;
    resolve_in_flight(&clients, shared).await;
    check_state(&clients, shared, when).await;
    (daemon, clients)
}

/// The client's ledger for a freshly bootstrapped data directory.
fn new_shared() -> Arc<Shared> {
    Arc::new(Shared {
        model: Mutex::new(Model { purchased_milli: milli(BOOTSTRAP_PACKS * PACK_MESSAGES), ..Model::default() }),
        stop: AtomicBool::new(false),
        answers: watch::Sender::new(0),
    })
}

/// `cycles` crash cycles with concurrent traffic in `durability` mode, then a graceful stop and start.
async fn crash_cycles(test: &str, durability: &str, cycles: usize) -> Coverage {
    let mut rng = Rng::new(seed(test));
    let dir = DataDir::new(test);
    let shared = new_shared();
    let mut coverage = Coverage::default();
    for cycle in 0..cycles {
        let when = format!("{test}, after restart {cycle}");
        let (daemon, clients) = restart_and_check(&dir, durability, EVERY_SECOND, &shared, cycle == 0, &when).await;
        top_up(&clients, &shared, cycle).await;
        let kill_at =
            if cycle % 4 == 3 { KillAt::AfterSnapshot(rng.range(0, 40)) } else { KillAt::Answers(rng.range(0, 400)) };
        let log = traffic_until_kill(daemon, &shared, &mut rng, cycle, kill_at).await;
        let in_flight = shared.model().in_flight.len();
        println!("{test}: cycle {cycle}: killed at {kill_at:?} with {in_flight} requests in flight");
        // The newest two are kept; a kill between a snapshot's rename and the pruning leaves a third.
        let snapshots = dir.snapshots();
        assert!(snapshots.len() <= 3, "{test}, cycle {cycle}: {snapshots:?}");
        coverage.kills += 1;
        coverage.in_flight_at_kills += in_flight;
        coverage.add_log(&log);
    }
    let (daemon, clients) =
        restart_and_check(&dir, durability, EVERY_SECOND, &shared, false, &format!("{test}, last restart")).await;
    settle_parked(&clients, &shared).await;
    check_state(&clients, &shared, &format!("{test}, every hold settled")).await;
    retry_everything(&clients, &shared).await;
    check_state(&clients, &shared, &format!("{test}, after retrying every settled operation")).await;
    let before = clients.state().await;
    coverage.add_log(&daemon.terminate().await);
    let snapshots = dir.snapshots();
    assert!(snapshots.len() <= 2, "{test}: the newest two snapshots are kept, no more: {snapshots:?}");
    let daemon = start(dir.quotad(durability, &[])).await;
    let clients = daemon.clients().await;
    assert_eq!(clients.state().await, before, "{test}: the state after a graceful stop and start");
    check_state(&clients, &shared, &format!("{test}, after a graceful restart")).await;
    coverage.add_log(&daemon.terminate().await);
    let model = shared.model();
    println!("{test}: {coverage:?}\n{test}: {:?}\n{test}: expected totals {:?}", model.stats, model.envs);
    coverage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_write_mode() {
    // Proves that in `write` mode 24 SIGKILLs at random moments of concurrent traffic lose no acknowledged
    // reserve, commit, release or purchase and apply none twice, and that every invariant holds after each.
    let coverage = crash_cycles("crash_write_mode", "write", 24).await;
    assert_eq!(coverage.kills, 24);
    assert!(coverage.snapshots >= 6, "a snapshot in every fourth cycle at least: {coverage:?}");
    assert!(coverage.removed_files > 0, "snapshots let old log files go: {coverage:?}");
    assert!(coverage.recoveries_from_snapshot > 0, "some restarts start from a snapshot: {coverage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_fsync_mode() {
    // Proves the same in `fsync` mode over 4 SIGKILLs: nothing acknowledged is lost or applied twice.
    let coverage = crash_cycles("crash_fsync_mode", "fsync", 4).await;
    assert_eq!(coverage.kills, 4);
    assert!(coverage.snapshots >= 1, "{coverage:?}");
}

// Batches.

/// The answer of a batch item, or its refusal's code.
fn outcome<T>(result: Option<T>, error: Option<&tonic_types::pb::Status>) -> Result<T, i32> {
    match (result, error) {
        (Some(ok), _) => Ok(ok),
        (None, Some(error)) => Err(error.code),
        (None, None) => panic!("a result without an outcome"),
    }
}

async fn reserve_batch(
    clients: &Clients,
    items: Vec<CheckAndReserveRequest>,
) -> Vec<Result<CheckAndReserveResponse, i32>> {
    use quotad::proto::check_and_reserve_result::Outcome;
    let response = clients.quota.clone().check_and_reserve_batch(CheckAndReserveBatchRequest { items }).await;
    let results = response.expect("CheckAndReserveBatch").into_inner().results;
    results
        .into_iter()
        .map(|result| match result.outcome {
            Some(Outcome::Ok(ok)) => outcome(Some(ok), None),
            Some(Outcome::Error(error)) => outcome(None, Some(&error)),
            None => outcome(None, None),
        })
        .collect()
}

/// What a commit charged, without the balance after it (which later changes move).
async fn commit_batch(clients: &Clients, items: Vec<CommitRequest>) -> Vec<Result<(u64, Vec<Draw>, u64, u64), i32>> {
    use quotad::proto::commit_result::Outcome;
    let response = clients.quota.clone().commit_batch(CommitBatchRequest { items }).await;
    let results = response.expect("CommitBatch").into_inner().results;
    let settled = |c: CommitResponse| (c.charged_milli, c.draws, c.released_milli, c.overage_milli);
    results
        .into_iter()
        .map(|result| match result.outcome {
            Some(Outcome::Ok(ok)) => outcome(Some(settled(ok)), None),
            Some(Outcome::Error(error)) => outcome(None, Some(&error)),
            None => outcome(None, None),
        })
        .collect()
}

async fn release_batch(clients: &Clients, items: Vec<ReleaseRequest>) -> Vec<Result<u64, i32>> {
    use quotad::proto::release_result::Outcome;
    let response = clients.quota.clone().release_batch(ReleaseBatchRequest { items }).await;
    let results = response.expect("ReleaseBatch").into_inner().results;
    results
        .into_iter()
        .map(|result| match result.outcome {
            Some(Outcome::Ok(ok)) => outcome(Some(ok.released_milli), None),
            Some(Outcome::Error(error)) => outcome(None, Some(&error)),
            None => outcome(None, None),
        })
        .collect()
}

/// The ids of every open hold of the scenario's capacity environments.
async fn open_holds(clients: &Clients) -> Vec<String> {
    let mut ids = Vec::new();
    for env in &ENVIRONMENTS {
        let request = ListReservationsRequest { environment_id: env.id.into(), page_size: 1_000, ..Default::default() };
        let page = clients.admin.clone().list_reservations(request).await.expect("ListReservations").into_inner();
        assert!(page.next_page_token.is_empty(), "one page holds them all");
        ids.extend(page.reservations.into_iter().map(|hold| hold.reservation_id));
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_of_an_answered_batch_survives_a_sigkill() {
    // Proves, in write and fsync modes: once a CheckAndReserveBatch, a CommitBatch and a ReleaseBatch are
    // answered, a SIGKILL loses none of their items. After a restart on the same data directory the
    // balances and the tenant are exactly as before the kill, every granted hold still open is listed
    // and releases its amount, and retrying the three batches returns the first answers.
    for durability in ["write", "fsync"] {
        let dir = DataDir::new(&format!("batch-{durability}"));
        let daemon = start(dir.quotad(durability, NEVER)).await;
        let clients = daemon.clients().await;
        let mut items: Vec<CheckAndReserveRequest> = (0..300u64)
            .map(|i| CheckAndReserveRequest {
                environment_id: TARGETS[i as usize % TARGETS.len()].0.into(),
                agent_id: format!("agent-{}", i % 7),
                messages: Some(1 + i % 3),
                idempotency_key: format!("batch-{i}"),
                ttl_seconds: TTL_SECONDS,
                ..Default::default()
            })
            .collect();
        items[150].environment_id = "nowhere".into();
        let reserved = reserve_batch(&clients, items.clone()).await;
        assert_eq!(reserved[150], Err(Code::NotFound as i32), "{durability}");
        let granted: Vec<(String, u64)> =
            reserved.iter().flatten().map(|grant| (grant.reservation_id.clone(), grant.reserved_milli)).collect();
        assert_eq!(granted.len(), 299, "{durability}: {reserved:?}");
        let (to_commit, rest) = granted.split_at(100);
        let (to_release, left_open) = rest.split_at(100);
        let commits: Vec<CommitRequest> = to_commit
            .iter()
            .map(|(id, _)| CommitRequest { reservation_id: id.clone(), messages: Some(2), usage: Vec::new() })
            .collect();
        let releases: Vec<ReleaseRequest> =
            to_release.iter().map(|(id, _)| ReleaseRequest { reservation_id: id.clone() }).collect();
        let committed = commit_batch(&clients, commits.clone()).await;
        let released = release_batch(&clients, releases.clone()).await;
        assert!(committed.iter().all(Result::is_ok), "{durability}: {committed:?}");
        assert!(released.iter().all(Result::is_ok), "{durability}: {released:?}");
        let before = clients.state().await;
        daemon.kill().await;

        let daemon = start(dir.quotad(durability, NEVER)).await;
        let clients = daemon.clients().await;
        assert_eq!(clients.state().await, before, "{durability}: the state the batches were answered with");
        let mut open: Vec<String> = left_open.iter().map(|(id, _)| id.clone()).collect();
        open.sort();
        assert_eq!(open_holds(&clients).await, open, "{durability}: every hold left open is still held");
        let replayed = reserve_batch(&clients, items).await;
        let ids = |results: &[Result<CheckAndReserveResponse, i32>]| -> Vec<Result<String, i32>> {
            results.iter().map(|r| r.as_ref().map(|grant| grant.reservation_id.clone()).map_err(|code| *code)).collect()
        };
        assert_eq!(ids(&replayed), ids(&reserved), "{durability}: retries return the first grants");
        assert_eq!(commit_batch(&clients, commits).await, committed, "{durability}: commits are remembered");
        assert_eq!(release_batch(&clients, releases).await, released, "{durability}: releases are remembered");
        let releases: Vec<ReleaseRequest> =
            left_open.iter().map(|(id, _)| ReleaseRequest { reservation_id: id.clone() }).collect();
        let amounts: Vec<Result<u64, i32>> = left_open.iter().map(|(_, amount)| Ok(*amount)).collect();
        assert_eq!(release_batch(&clients, releases).await, amounts, "{durability}: each releases its hold");
        assert!(open_holds(&clients).await.is_empty(), "{durability}");
        daemon.terminate().await;
    }
}

// Damage to the data directory.

/// `n` operations one after another, every answer awaited; about one hold in five is left open.
async fn some_ops(clients: &Clients, shared: &Shared, rng: &mut Rng, name: &str, n: usize) {
    let mut quota = clients.quota.clone();
    for i in 0..n {
        let op = plan_op(rng, format!("{name}-{i}"), "agent-seq".into());
        let held = match reserve(&mut quota, shared, op.clone()).await {
            Ok(Reserved::Held(held)) => held,
            Ok(Reserved::Refused) => continue,
            Err(status) => panic!("CheckAndReserve {op:?}: {status:?}"),
        };
        if rng.percent(20) {
            shared.model().parked.push(held);
        } else if let Err((held, status)) = settle(&mut quota, shared, held).await {
            panic!("settling {held:?}: {status:?}");
        }
    }
}

/// The (offset, payload length) of every whole record of a log segment, read by the format that
/// ARCHITECTURE.md describes: a 24-byte header, then `[len u32][seq u64][crc u32][header crc u32][payload]`.
fn records(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut records = Vec::new();
    let mut at = 24;
    // Zeros after the records are the unused end of a segment's preallocated space.
    while at + 20 <= segment.len() && segment[at..at + 20].iter().any(|&b| b != 0) {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().unwrap()) as usize;
        if at + 20 + len > segment.len() {
            break;
        }
        records.push((at, len));
        at += 20 + len;
    }
    records
}

fn flip_bits(path: &Path, offset: usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= mask;
    std::fs::write(path, bytes).unwrap();
}

/// Writes `tail` right after the last whole record of a segment, as a write torn by a crash would leave
/// it, and returns where the records end.
fn write_after_records(path: &Path, tail: &[u8]) -> u64 {
    use std::os::unix::fs::FileExt;
    let end = records(&std::fs::read(path).unwrap()).last().map_or(24, |(at, len)| at + 20 + len) as u64;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(tail, end).unwrap();
    end
}

/// Every file of the data directory with its contents, to show that a refused start changed nothing.
fn contents(dir: &DataDir) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir.data())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().unwrap() != "LOCK")
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

/// Runs quotad on a damaged `dir` and checks that it refuses to start with an error naming `file`, and
/// that it left every file as it was; returns its stderr.
async fn expect_refusal(dir: &DataDir, extra: &[&str], file: &Path, what: &str) -> String {
    let before = contents(dir);
    let (status, stderr) = run_to_refusal(dir.quotad("write", extra), what).await;
    assert!(!status.success() && status.code().is_some(), "{what}: quotad died: {status:?}; {stderr}");
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name), "{what}: the error names {name}: {stderr}");
    assert!(contents(dir) == before, "{what}: a refused start changed the data directory");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_cut_off_with_a_warning_and_nothing_acknowledged_is_lost() {
    // Proves that bytes after the last whole record of the newest log segment, as a write torn by a crash
    // leaves them, are cut off with a warning naming the file, that the state is then exactly what was
    // acknowledged, and that the log goes on after the cut through further crashes.
    let mut rng = Rng::new(seed("torn_tail"));
    let dir = DataDir::new("torn");
    let shared = new_shared();
    // Record headers whose own checksum holds, as a crash leaves the header of the record it tore.
    let header_only = {
        let mut record = 200u32.to_le_bytes().to_vec();
        record.extend_from_slice(&[0x11; 8 + 4]);
        record.extend_from_slice(&crc32c::crc32c(&record).to_le_bytes());
        record.extend_from_slice(&[0x11; 10]);
        record
    };
    let bad_checksum = {
        let mut record = 8u32.to_le_bytes().to_vec();
        record.extend_from_slice(&[0x22; 8 + 4]);
        record.extend_from_slice(&crc32c::crc32c(&record).to_le_bytes());
        record.extend_from_slice(&[0x22; 8]);
        record
    };
    let tails = [
        ("garbage", "a few garbage bytes", vec![0xde, 0xad, 0xbe, 0xef, 0x01]),
        ("cut-short", "a record whose payload never arrived", header_only),
        ("bad-crc", "a whole last record with a bad checksum", bad_checksum),
    ];
    let (mut daemon, mut clients) = restart_and_check(&dir, "write", NEVER, &shared, true, "first start").await;
    for (key, what, tail) in tails {
        some_ops(&clients, &shared, &mut rng, key, 20).await;
        let before = clients.state().await;
        daemon.kill().await;
        let newest = dir.segments().pop().expect("a log segment");
        let len = write_after_records(&newest, &tail);

        (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, false, what).await;
        let log = daemon.log();
        let name = newest.file_name().unwrap().to_str().unwrap();
        let warned = log.iter().any(|line| line.contains("WARN") && line.contains("torn") && line.contains(name));
        assert!(warned, "{what}: a warning naming {name}; log: {log:#?}");
        assert_eq!(clients.state().await, before, "{what}");
        assert_eq!(std::fs::metadata(&newest).unwrap().len(), len, "{what}: cut back to the last whole record");
    }
    daemon.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_record_or_snapshot_stops_startup_naming_the_file_and_offset() {
    // Proves that a flipped byte in a log record with records after it, in the middle of a snapshot, or in
    // a snapshot's magic number makes quotad exit non-zero with an error naming the file and byte offset,
    // leaving every file as it was, and that it starts with every acknowledged change once repaired.
    let mut rng = Rng::new(seed("damage"));
    let dir = DataDir::new("damage");
    let shared = new_shared();
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, true, "first start").await;
    some_ops(&clients, &shared, &mut rng, "log", 30).await;
    let before = clients.state().await;
    daemon.kill().await;

    let segment = dir.segments().pop().expect("a log segment");
    let pristine = std::fs::read(&segment).unwrap();
    let records = records(&pristine);
    assert!(records.len() >= 20, "{} records", records.len());
    let (offset, len) = records[records.len() / 2];
    flip_bits(&segment, offset + 20 + len / 2, 0x40);
    let stderr = expect_refusal(&dir, &[], &segment, "a damaged log record").await;
    assert!(stderr.contains(&format!("at byte offset {offset}")), "the offset of the damaged record: {stderr}");
    std::fs::write(&segment, &pristine).unwrap();
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, false, "repaired log").await;
    assert_eq!(clients.state().await, before, "after repairing the log");
    daemon.terminate().await;

    // The graceful stop wrote a snapshot; more changes go to the log after it.
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, false, "after the snapshot").await;
    some_ops(&clients, &shared, &mut rng, "snap", 10).await;
    let before = clients.state().await;
    daemon.kill().await;
    let snapshot = dir.snapshots().pop().expect("the shutdown snapshot");
    let pristine = std::fs::read(&snapshot).unwrap();
    flip_bits(&snapshot, pristine.len() / 2, 0x40);
    let stderr = expect_refusal(&dir, &[], &snapshot, "a damaged snapshot").await;
    assert!(stderr.contains("byte offset"), "{stderr}");
    assert!(stderr.contains("--recover-from-older-snapshot"), "the error says how to fall back: {stderr}");
    std::fs::write(&snapshot, &pristine).unwrap();
    flip_bits(&snapshot, 0, 0x40);
    let stderr = expect_refusal(&dir, &[], &snapshot, "a snapshot with a damaged magic number").await;
    assert!(stderr.contains("at byte offset 0"), "{stderr}");
    std::fs::write(&snapshot, &pristine).unwrap();
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, false, "repaired snapshot").await;
    assert_eq!(clients.state().await, before, "after repairing the snapshot");
    daemon.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_quotad_on_the_same_data_directory_refuses_to_start() {
    // Proves that a second quotad on a data directory in use exits non-zero saying so, that the first
    // keeps serving unharmed, and that the directory can be used again once the first has stopped.
    let mut rng = Rng::new(seed("lock"));
    let dir = DataDir::new("lock");
    let shared = new_shared();
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, true, "first start").await;
    some_ops(&clients, &shared, &mut rng, "lock", 10).await;

    let (status, stderr) = run_to_refusal(dir.quotad("write", NEVER), "a second quotad").await;
    assert!(!status.success() && status.code().is_some(), "{status:?}; {stderr}");
    assert!(stderr.contains("in use") && stderr.contains(dir.data().to_str().unwrap()), "{stderr}");

    check_state(&clients, &shared, "the first quotad after the second gave up").await;
    some_ops(&clients, &shared, &mut rng, "lock-after", 10).await;
    daemon.terminate().await;
    let (daemon, _) = restart_and_check(&dir, "write", NEVER, &shared, false, "once the first stopped").await;
    daemon.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_length_with_records_after_it_is_not_taken_for_a_torn_tail() {
    // Proves that a flipped bit in the length field of a log record that has records after it stops
    // startup like any other damage, instead of being cut off as a torn tail with every record after it.
    let mut rng = Rng::new(seed("length"));
    let dir = DataDir::new("length");
    let shared = new_shared();
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, true, "first start").await;
    some_ops(&clients, &shared, &mut rng, "log", 30).await;
    daemon.kill().await;

    let segment = dir.segments().pop().expect("a log segment");
    let records = records(&std::fs::read(&segment).unwrap());
    assert!(records.len() >= 20, "{} records", records.len());
    let (offset, _) = records[records.len() / 2];
    // Bit 16 of the length: the record now claims 64 KiB more than it has, past the end of the file but
    // within the largest record there can be.
    flip_bits(&segment, offset + 2, 0x01);
    let stderr = expect_refusal(&dir, &[], &segment, "a damaged record length").await;
    assert!(stderr.contains(&format!("at byte offset {offset}")), "the offset of the damaged record: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovering_from_an_older_snapshot_that_does_not_exist_never_starts_empty() {
    // Proves that `--recover-from-older-snapshot`, when the only snapshot is unreadable and the log it
    // covers is gone, refuses to start instead of starting empty on a directory that has data.
    let mut rng = Rng::new(seed("no-older"));
    let dir = DataDir::new("no-older");
    let shared = new_shared();
    let (daemon, clients) = restart_and_check(&dir, "write", NEVER, &shared, true, "first start").await;
    some_ops(&clients, &shared, &mut rng, "log", 30).await;
    daemon.terminate().await;
    // The second graceful stop removes the log that the first one's snapshot covers.
    let (daemon, _) = restart_and_check(&dir, "write", NEVER, &shared, false, "second start").await;
    daemon.terminate().await;
    let snapshots = dir.snapshots();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    for segment in dir.segments() {
        assert!(records(&std::fs::read(&segment).unwrap()).is_empty(), "{} holds records", segment.display());
    }

    let snapshot = &snapshots[0];
    let pristine = std::fs::read(snapshot).unwrap();
    flip_bits(snapshot, pristine.len() / 2, 0x40);
    expect_refusal(&dir, &["--recover-from-older-snapshot"], snapshot, "the only snapshot damaged").await;
}
