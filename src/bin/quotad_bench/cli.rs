//! The load generator's flags, their defaults and limits, and their validation into a `Plan`.
//!
//! Every quantity is bounded, so a typo cannot turn a benchmark into an unbounded flood.

use std::{fmt, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use quotad::transport::tls::{ClientTls, client_tls};

/// The server loaded without `--server`, over `http://`, or `https://` with `--tls-ca`.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50051";
pub const DEFAULT_CONCURRENCY: usize = 64;
pub const DEFAULT_CONNECTIONS: usize = 4;
pub const DEFAULT_DURATION: &str = "10s";
pub const DEFAULT_WARMUP: &str = "1s";
pub const DEFAULT_ENVIRONMENTS: usize = 64;
pub const DEFAULT_AGENTS: usize = 64;
pub const DEFAULT_TENANT: &str = "bench";
pub const DEFAULT_ALLOCATION_MESSAGES: u64 = 1_000_000;
pub const DEFAULT_TTL_SECONDS: u32 = 30;
pub const DEFAULT_TIMEOUT: &str = "10s";
/// One item per call: the unary calls.
pub const DEFAULT_BATCH_SIZE: usize = 1;

pub const MAX_CONCURRENCY: usize = 10_000;
pub const MAX_CONNECTIONS: usize = 1_024;
pub const MAX_DURATION: Duration = Duration::from_secs(3_600);
pub const MAX_WARMUP: Duration = Duration::from_secs(600);
pub const MAX_REQUESTS: u64 = 1_000_000_000;
/// Environment ids are `<tenant>-env-<index>`; ten million keeps them short and setup under an hour.
pub const MAX_ENVIRONMENTS: usize = 10_000_000;
pub const MAX_AGENTS: usize = 1_000_000;
/// The longest tenant prefix that leaves room for `-env-<index>` within quotad's 128-byte ids.
pub const MAX_TENANT_BYTES: usize = 100;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// `--window` bounds: shorter windows hold too few operations for a p99, and every window keeps a
/// histogram, so a run has at most `MAX_WINDOWS` of them.
pub const MIN_WINDOW: Duration = Duration::from_millis(10);
pub const MAX_WINDOWS: u64 = 3_600;
/// How far ahead `--expire-at` may be when the run starts: at least far enough for the first request
/// to ask for a whole second, at most a day (quotad's own `max_ttl_seconds` refuses more by default).
pub const MIN_EXPIRE_AHEAD_SECONDS: u64 = 2;
pub const MAX_EXPIRE_AHEAD_SECONDS: u64 = 86_400;
/// quotad's limit on the items of one batch call.
pub const MAX_BATCH_SIZE: usize = 1_000;

const _: () = assert!(DEFAULT_CONNECTIONS <= DEFAULT_CONCURRENCY);
const _: () = assert!(DEFAULT_CONCURRENCY <= MAX_CONCURRENCY && DEFAULT_CONNECTIONS <= MAX_CONNECTIONS);
const _: () = assert!(DEFAULT_ENVIRONMENTS <= MAX_ENVIRONMENTS && DEFAULT_AGENTS <= MAX_AGENTS);

/// What one recorded operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum Scenario {
    /// `CheckAndReserve` of 1 message; holds expire after `--ttl-seconds`.
    #[value(name = "reserve")]
    #[serde(rename = "reserve")]
    Reserve,
    /// `CheckAndReserve` of 1 message then `Commit` of 1 message: one operation, two calls.
    #[value(name = "reserve+commit")]
    #[serde(rename = "reserve+commit")]
    ReserveCommit,
    /// `CheckAndReserve` of 1 message then `Release`: one operation, two calls.
    #[value(name = "reserve+release")]
    #[serde(rename = "reserve+release")]
    ReserveRelease,
    /// `GetBalance`.
    #[value(name = "balance")]
    #[serde(rename = "balance")]
    Balance,
    /// `grpc.health.v1.Health/Check` on the same server: what the transport alone costs.
    #[value(name = "health")]
    #[serde(rename = "health")]
    Health,
}

impl Scenario {
    /// gRPC calls in one operation.
    pub fn calls(self) -> u64 {
        match self {
            Self::ReserveCommit | Self::ReserveRelease => 2,
            Self::Reserve | Self::Balance | Self::Health => 1,
        }
    }

    /// Whether the scenario's calls have batch forms.
    pub fn batches(self) -> bool {
        matches!(self, Self::Reserve | Self::ReserveCommit | Self::ReserveRelease)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::ReserveCommit => "reserve+commit",
            Self::ReserveRelease => "reserve+release",
            Self::Balance => "balance",
            Self::Health => "health",
        }
    }
}

/// quotad-bench: a load generator that knows the quota flow (reserve, commit, release).
///
/// It connects only to `--server`; run it against a quotad on this machine (loopback), never at a
/// shared or production address.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// The quotad to load (`http://host:port`, or `https://host:port` with `--tls-ca`) [default:
    /// 127.0.0.1:50051, over TLS with `--tls-ca`].
    #[arg(long)]
    pub server: Option<String>,
    /// Connect over TLS, trusting the CA certificates in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: the client certificate chain (PEM). Needs `--tls-key` and `--tls-ca`.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: the private key of `--tls-cert` (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// What one operation is.
    #[arg(long, value_enum, default_value_t = Scenario::ReserveCommit)]
    pub scenario: Scenario,
    /// Operations in flight at once (one task each), 1 to 10,000.
    #[arg(long, short = 'c', default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// HTTP/2 connections the tasks are spread across (task i uses connection i mod K), 1 to 1,024.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,
    /// How long to record after the warmup (e.g. `10s`), at most 1h. The default when `--requests`
    /// is not given.
    #[arg(long, short = 'z', value_parser = humantime::parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Record exactly this many operations after the warmup instead of running for a duration.
    #[arg(long, short = 'n')]
    pub requests: Option<u64>,
    /// Load before recording starts, not recorded (e.g. `1s`; `0s` for none), at most 10m.
    #[arg(long, default_value = DEFAULT_WARMUP, value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Capacity environments the load is spread over (`<tenant>-env-<index>`).
    #[arg(long, short = 'e', default_value_t = DEFAULT_ENVIRONMENTS)]
    pub environments: usize,
    /// Agent ids the load is spread over (`agent-<index>`).
    #[arg(long, short = 'a', default_value_t = DEFAULT_AGENTS)]
    pub agents: usize,
    /// Tenant id, also the prefix of the environment ids.
    #[arg(long, default_value = DEFAULT_TENANT)]
    pub tenant: String,
    /// Create the tenant and environments through `QuotaAdmin` before the load (the default).
    #[arg(long, overrides_with = "no_setup")]
    pub setup: bool,
    /// Use the tenant and environments as they are on the server.
    #[arg(long, overrides_with = "setup")]
    pub no_setup: bool,
    /// Only create this many environments (concurrently, `--concurrency` over `--connections`), report
    /// how long it took, and exit without load. For building large states.
    #[arg(long, value_name = "N", conflicts_with_all = ["no_setup", "duration", "requests"])]
    pub setup_environments: Option<usize>,
    /// Prepaid allocation of each environment at setup, in messages; pay-as-you-go with no budget cap
    /// backs it, so reservations never run dry.
    #[arg(long, default_value_t = DEFAULT_ALLOCATION_MESSAGES)]
    pub allocation_messages: u64,
    /// `ttl_seconds` of each reservation: short, so holds the scenario leaves open expire soon.
    #[arg(long, default_value_t = DEFAULT_TTL_SECONDS)]
    pub ttl_seconds: u32,
    /// Deadline of each call; a call past it counts as DEADLINE_EXCEEDED (at most 60s).
    #[arg(long, default_value = DEFAULT_TIMEOUT, value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Items per call, 1 to 1,000. Above 1, `reserve` sends CheckAndReserveBatch of this many items, and
    /// the pairs follow it with CommitBatch or ReleaseBatch of the granted ones: one operation is then a
    /// batch (or a pair of batches), and its items are spread over environments and agents as that many
    /// unary operations would be.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>` with every call: the admin token (setup and load), or an
    /// API key's secret (load with `--no-setup`). None for a quotad with `--auth off`.
    #[arg(long, env = "QUOTAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also report latency per window of this length (e.g. `1s`), by when each operation started:
    /// printed, and in the JSON's `windows`. For following a run through a moment such as a mass
    /// expiry, which the whole run's percentiles dilute. Windows start at multiples of their length on
    /// the wall clock. Whole milliseconds, at least 10ms; at most 3,600 windows are kept (operations
    /// after them count in the totals only).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
    /// Give each reservation the `ttl_seconds` that makes its hold expire within this second (Unix
    /// time, seconds), instead of `--ttl-seconds`: holds made over a minute then all expire together.
    /// Between 2 s and a day ahead when the run starts.
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub expire_at: Option<u64>,
    /// Write the gRPC-framed request body of one `--scenario` call (`reserve`, `balance` or `health`,
    /// for environment and agent 0) to FILE, print the call's path, and exit: for HTTP/2 load tools
    /// that send a fixed body, such as h2load.
    #[arg(long, value_name = "FILE", hide = true)]
    pub grpc_body: Option<PathBuf>,
}

/// When recording stops.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Duration(Duration),
    Requests(u64),
}

/// Validated arguments.
#[derive(Clone)]
pub struct Plan {
    pub server: String,
    /// `Some` for an `https://` server.
    pub tls: Option<ClientTls>,
    pub scenario: Scenario,
    pub concurrency: usize,
    pub connections: usize,
    pub limit: Limit,
    pub warmup: Duration,
    pub environments: usize,
    pub agents: usize,
    pub tenant: String,
    pub setup: bool,
    /// `Some(n)`: create `n` environments and exit.
    pub setup_only: Option<usize>,
    pub allocation_messages: u64,
    pub ttl_seconds: u32,
    pub timeout: Duration,
    /// Items per call: 1 for the unary calls.
    pub batch_size: usize,
    pub json: Option<PathBuf>,
    pub token: Option<String>,
    /// `Some`: latency is also reported per window of this length.
    pub window: Option<Duration>,
    /// `Some(second)`: holds are made to expire within that Unix second, whatever `ttl_seconds` says.
    pub expire_at: Option<u64>,
    /// `Some`: write the scenario's framed request body there and exit.
    pub grpc_body: Option<PathBuf>,
}

/// Every field but the token, of which only whether there is one: a plan may be printed.
impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Plan {
            server,
            tls,
            scenario,
            concurrency,
            connections,
            limit,
            warmup,
            environments,
            agents,
            tenant,
            setup,
            setup_only,
            allocation_messages,
            ttl_seconds,
            timeout,
            batch_size,
            json,
            token,
            window,
            expire_at,
            grpc_body,
        } = self;
        f.debug_struct("Plan")
            .field("server", server)
            .field("tls", tls)
            .field("scenario", scenario)
            .field("concurrency", concurrency)
            .field("connections", connections)
            .field("limit", limit)
            .field("warmup", warmup)
            .field("environments", environments)
            .field("agents", agents)
            .field("tenant", tenant)
            .field("setup", setup)
            .field("setup_only", setup_only)
            .field("allocation_messages", allocation_messages)
            .field("ttl_seconds", ttl_seconds)
            .field("timeout", timeout)
            .field("batch_size", batch_size)
            .field("json", json)
            .field("token", &token.as_ref().map(|_| "<hidden>"))
            .field("window", window)
            .field("expire_at", expire_at)
            .field("grpc_body", grpc_body)
            .finish()
    }
}

impl Args {
    pub fn into_plan(self) -> Result<Plan, String> {
        self.into_plan_at(unix_now_ms())
    }

    /// Validates the arguments as at `now_unix_ms` (which `--expire-at` is checked against).
    pub fn into_plan_at(self, now_unix_ms: u64) -> Result<Plan, String> {
        let range = |name: &str, value: u128, min: u128, max: u128| {
            if (min..=max).contains(&value) { Ok(()) } else { Err(format!("--{name} {value}: must be {min} to {max}")) }
        };
        range("concurrency", self.concurrency as u128, 1, MAX_CONCURRENCY as u128)?;
        range("connections", self.connections as u128, 1, MAX_CONNECTIONS as u128)?;
        range("environments", self.environments as u128, 1, MAX_ENVIRONMENTS as u128)?;
        range("agents", self.agents as u128, 1, MAX_AGENTS as u128)?;
        if let Some(n) = self.setup_environments {
            range("setup-environments", n as u128, 1, MAX_ENVIRONMENTS as u128)?;
        }
        let limit = match (self.duration, self.requests) {
            (_, Some(n)) => {
                range("requests", u128::from(n), 1, u128::from(MAX_REQUESTS))?;
                Limit::Requests(n)
            }
            (Some(d), None) => Limit::Duration(d),
            (None, None) => Limit::Duration(humantime::parse_duration(DEFAULT_DURATION).expect("valid default")),
        };
        if let Limit::Duration(d) = limit {
            range("duration (ms)", d.as_millis(), 1, MAX_DURATION.as_millis())?;
        }
        range("warmup (ms)", self.warmup.as_millis(), 0, MAX_WARMUP.as_millis())?;
        range("timeout (ms)", self.timeout.as_millis(), 1, MAX_TIMEOUT.as_millis())?;
        range("tenant (bytes)", self.tenant.len() as u128, 1, MAX_TENANT_BYTES as u128)?;
        range("allocation-messages", u128::from(self.allocation_messages), 0, u128::from(u64::MAX / 1_000))?;
        if let Some(window) = self.window {
            range("window (ms)", window.as_millis(), MIN_WINDOW.as_millis(), MAX_DURATION.as_millis())?;
            if window.subsec_nanos() % 1_000_000 != 0 {
                return Err(format!("--window {}: must be whole milliseconds", humantime::format_duration(window)));
            }
            // Windows lie on the wall clock's grid, so a run that starts mid-window spans one more.
            if let Limit::Duration(duration) = limit
                && duration.as_nanos().div_ceil(window.as_nanos()) + 1 > u128::from(MAX_WINDOWS)
            {
                return Err(format!(
                    "--window {}: the run would have more than {MAX_WINDOWS} windows; give a longer window",
                    humantime::format_duration(window)
                ));
            }
        }
        if let Some(second) = self.expire_at {
            let now_s = now_unix_ms / 1_000;
            let (min, max) = (now_s + MIN_EXPIRE_AHEAD_SECONDS, now_s + MAX_EXPIRE_AHEAD_SECONDS);
            if !(min..=max).contains(&second) {
                return Err(format!(
                    "--expire-at {second}: must be {MIN_EXPIRE_AHEAD_SECONDS} s to {MAX_EXPIRE_AHEAD_SECONDS} s \
                     ahead, {min} to {max} now"
                ));
            }
        }
        if self.grpc_body.is_some() && self.scenario.calls() != 1 {
            return Err(format!(
                "--grpc-body: {} needs the reservation id of the reserve's answer, which one fixed body \
                 cannot carry; use reserve, balance or health",
                self.scenario.as_str()
            ));
        }
        range("batch-size", self.batch_size as u128, 1, MAX_BATCH_SIZE as u128)?;
        if self.batch_size > 1 && !self.scenario.batches() {
            return Err(format!(
                "--batch-size {}: only reserve, reserve+commit and reserve+release have batch calls",
                self.batch_size
            ));
        }
        let tls = client_tls(self.tls_ca.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref())
            .map_err(|e| e.to_string())?;
        let server = match self.server {
            None => format!("{}://{DEFAULT_SERVER}", if tls.is_some() { "https" } else { "http" }),
            Some(server) => {
                match (server.split_once("://").map(|(scheme, _)| scheme), &tls) {
                    (Some("http"), None) | (Some("https"), Some(_)) => {}
                    (Some("https"), None) => return Err(format!("--server {server}: https:// needs --tls-ca")),
                    (Some("http"), Some(_)) => return Err(format!("--server {server}: --tls-ca needs https://")),
                    _ => return Err(format!("--server {server}: must start with http:// (or https://)")),
                }
                server
            }
        };
        Ok(Plan {
            server,
            tls,
            scenario: self.scenario,
            concurrency: self.concurrency,
            connections: self.connections.min(self.concurrency),
            limit,
            warmup: self.warmup,
            environments: self.environments,
            agents: self.agents,
            tenant: self.tenant,
            setup: !self.no_setup,
            setup_only: self.setup_environments,
            allocation_messages: self.allocation_messages,
            ttl_seconds: self.ttl_seconds,
            timeout: self.timeout,
            batch_size: self.batch_size,
            json: self.json,
            token: self.token,
            window: self.window,
            expire_at: self.expire_at,
            grpc_body: self.grpc_body,
        })
    }
}

/// The wall clock in Unix milliseconds; a clock before 1970 reads as 0.
pub fn unix_now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The `ttl_seconds` that makes a hold requested at `now_unix_ms` expire within `second`: quotad
/// expires it at its own clock plus the TTL, so a request sent in second S with a TTL of
/// `second - S` expires within `second` (by as much later as the request takes to arrive). At least 1,
/// as 0 would ask for quotad's default TTL.
pub fn ttl_until(second: u64, now_unix_ms: u64) -> u32 {
    u32::try_from(second.saturating_sub(now_unix_ms / 1_000)).unwrap_or(u32::MAX).max(1)
}

/// The id of environment `index` of `tenant`; zero-padded so ids sort in creation order.
pub fn environment_id(tenant: &str, index: usize) -> String {
    format!("{tenant}-env-{index:07}")
}

pub fn agent_id(index: usize) -> String {
    format!("agent-{index:06}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let args = Args::try_parse_from(std::iter::once("quotad-bench").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        args.into_plan()
    }

    #[test]
    fn defaults_are_valid() {
        let plan = plan(&[]).unwrap();
        assert!(plan.setup);
        assert_eq!(plan.scenario, Scenario::ReserveCommit);
        assert!(matches!(plan.limit, Limit::Duration(d) if d == Duration::from_secs(10)));
    }

    #[test]
    fn limits_are_enforced_at_the_edges() {
        assert!(plan(&["--concurrency", "10000"]).is_ok());
        assert!(plan(&["--concurrency", "10001"]).is_err());
        assert!(plan(&["--concurrency", "0"]).is_err());
        assert!(plan(&["--duration", "1h"]).is_ok());
        assert!(plan(&["--duration", "61m"]).is_err());
        assert!(plan(&["--requests", "0"]).is_err());
        assert!(plan(&["--duration", "1s", "--requests", "5"]).is_err());
        assert!(plan(&["--server", "127.0.0.1:50051"]).is_err());
        assert!(plan(&["--server", "https://127.0.0.1:50051"]).unwrap_err().contains("--tls-ca"));
        assert!(plan(&["--tls-cert", "client.pem"]).unwrap_err().contains("--tls-key"));
    }

    /// A self-signed certificate for localhost and its key, as PEM files in `dir`.
    fn self_signed(dir: &std::path::Path) -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    }

    #[test]
    fn the_default_server_follows_the_tls_flags_and_a_given_one_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = self_signed(dir.path());
        assert_eq!(plan(&[]).unwrap().server, "http://127.0.0.1:50051");
        assert_eq!(plan(&["--tls-ca", &ca]).unwrap().server, "https://127.0.0.1:50051");
        let explicit = plan(&["--tls-ca", &ca, "--server", "http://127.0.0.1:50051"]).unwrap_err();
        assert_eq!(explicit, "--server http://127.0.0.1:50051: --tls-ca needs https://");
    }

    #[test]
    fn a_plan_prints_neither_the_private_key_nor_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let plan = plan(&["--tls-ca", &cert, "--tls-cert", &cert, "--tls-key", &key, "--token", "s3cret"]).unwrap();
        let printed = format!("{plan:?}");
        let key_bytes = format!("{:?}", std::fs::read(&key).unwrap());
        assert!(!printed.contains(key_bytes.trim_matches(['[', ']'])), "{printed}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("ClientTls { mutual: true, .. }") && printed.contains("<hidden>"), "{printed}");
    }

    #[test]
    fn the_batch_size_is_1_to_1000_and_only_for_the_reserve_scenarios() {
        assert_eq!(plan(&[]).unwrap().batch_size, 1);
        assert_eq!(plan(&["--batch-size", "1000"]).unwrap().batch_size, 1_000);
        assert_eq!(plan(&["--batch-size", "1001"]).unwrap_err(), "--batch-size 1001: must be 1 to 1000");
        assert!(plan(&["--batch-size", "0"]).is_err());
        assert!(plan(&["--batch-size", "100", "--scenario", "reserve"]).is_ok());
        assert!(plan(&["--batch-size", "100", "--scenario", "reserve+release"]).is_ok());
        let balance = plan(&["--batch-size", "100", "--scenario", "balance"]).unwrap_err();
        assert!(balance.contains("only reserve, reserve+commit and reserve+release"), "{balance}");
        assert!(plan(&["--batch-size", "1", "--scenario", "health"]).is_ok());
    }

    #[test]
    fn no_setup_and_scenario_names_parse() {
        let plan = plan(&["--no-setup", "--scenario", "reserve+release"]).unwrap();
        assert!(!plan.setup);
        assert_eq!(plan.scenario, Scenario::ReserveRelease);
    }

    #[test]
    fn windows_are_bounded_in_length_and_number() {
        assert!(plan(&["--window", "10ms", "--duration", "35990ms"]).is_ok());
        assert!(plan(&["--window", "9ms"]).unwrap_err().contains("--window (ms) 9: must be 10 to"));
        assert!(plan(&["--window", "10ms", "--duration", "35991ms"]).unwrap_err().contains("more than 3600 windows"));
        assert!(plan(&["--window", "1s", "--duration", "3599s"]).is_ok());
        assert!(plan(&["--window", "1s", "--duration", "1h"]).unwrap_err().contains("more than 3600 windows"));
        assert!(plan(&["--window", "10ms 500us"]).unwrap_err().contains("must be whole milliseconds"));
        // With a request count the number of windows is not known ahead: those past the limit are not kept.
        assert!(plan(&["--window", "10ms", "--requests", "1000000"]).is_ok());
    }

    #[test]
    fn expire_at_must_be_between_two_seconds_and_a_day_ahead() {
        let at = |second: u64, now_ms: u64| {
            let args = Args::try_parse_from(["quotad-bench", "--expire-at", &second.to_string()]).unwrap();
            args.into_plan_at(now_ms).map(|plan| plan.expire_at)
        };
        let now_ms = 1_800_000_000_999;
        assert_eq!(at(1_800_000_002, now_ms), Ok(Some(1_800_000_002)));
        assert!(at(1_800_000_001, now_ms).unwrap_err().starts_with("--expire-at 1800000001: must be 2 s to 86400 s"));
        assert_eq!(at(1_800_086_400, now_ms), Ok(Some(1_800_086_400)));
        assert!(at(1_800_086_401, now_ms).is_err());
    }

    #[test]
    fn a_ttl_until_a_second_expires_within_it() {
        let second = 1_800_000_060;
        for now_ms in [1_800_000_000_000, 1_800_000_000_999, 1_800_000_059_000] {
            let expires_ms = now_ms + u64::from(ttl_until(second, now_ms)) * 1_000;
            assert_eq!(expires_ms / 1_000, second, "requested at {now_ms}");
        }
        assert_eq!(ttl_until(second, second * 1_000), 1, "never 0, which would ask for the default TTL");
        assert_eq!(ttl_until(second, (second + 10) * 1_000), 1);
    }

    #[test]
    fn a_grpc_body_is_only_for_scenarios_of_one_call() {
        assert!(plan(&["--grpc-body", "body.bin", "--scenario", "reserve"]).is_ok());
        let refused = plan(&["--grpc-body", "body.bin", "--scenario", "reserve+commit"]).unwrap_err();
        assert!(refused.starts_with("--grpc-body: reserve+commit needs the reservation id"), "{refused}");
    }

    #[test]
    fn ids_fit_quotad_limits() {
        let tenant = "t".repeat(MAX_TENANT_BYTES);
        assert!(environment_id(&tenant, MAX_ENVIRONMENTS - 1).len() <= 128);
    }
}
