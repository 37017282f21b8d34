//! Configuration: command-line flags with `QUOTAD_*` environment overrides, and an optional TOML file
//! for pack size, rate card, limits and bootstrap tenants. Everything has an embedded default, so
//! `quotad` runs with no file at all.

use std::{collections::BTreeMap, ffi::OsString, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::{
    auth::AdminToken,
    durability::{
        journal::Durability,
        store::{DEFAULT_MAX_SEGMENT_BYTES, StorageConfig},
    },
    grpc::{self, Policy},
    ledger::{
        self, Command, EnvironmentId, Ledger, MILLI_PER_MESSAGE, TenantId,
        pricing::{Rate, RateCard},
    },
    metrics::MetricsConfig,
    transport::{self, TransportLimits, tls::ServerTls},
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_DATA_DIR: &str = "quotad-data";
pub const DEFAULT_FSYNC_INTERVAL: &str = "10ms";
pub const DEFAULT_SNAPSHOT_INTERVAL: &str = "30s";
/// Loopback by default: the metrics endpoint has no authentication, so exposing it is a choice.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_PACK_SIZE_MESSAGES: u64 = 25_000;
pub const DEFAULT_TTL_SECONDS: u32 = 60;
pub const DEFAULT_MAX_TTL_SECONDS: u32 = 3_600;
pub const DEFAULT_MAX_USAGE_ITEMS: usize = 64;
pub const DEFAULT_MAX_AMOUNT_MESSAGES: u64 = 1_000_000_000;
pub const DEFAULT_MAX_PACKS_PER_PURCHASE: u64 = 1_000_000;
pub const DEFAULT_MAX_BUDGET_MESSAGES: u64 = 1_000_000_000_000;
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 10;
pub const DEFAULT_RESOLVED_RETENTION_SECONDS: u64 = ledger::DEFAULT_RESOLVED_RETENTION_MS / 1_000;

/// The largest request body the transport accepts at most; a request carries ids and up to a few
/// dozen usage items, a few KiB at most.
const MAX_REQUEST_BYTES_CEILING: usize = 4 * 1024 * 1024;
const MAX_USAGE_ITEMS_CEILING: usize = 1_024;
/// Rate card versions are kept in memory and in every snapshot, each up to 256 scenarios.
const MAX_RATE_CARD_VERSIONS_CEILING: usize = 100_000;
const MAX_AGENTS_PER_ENVIRONMENT_CEILING: usize = 1_000_000;
const MAX_ALERT_WATCHES_CEILING: usize = 100_000;
// Transport ceilings: each keeps what one client can make the server hold (connections, streams,
// header bytes, time) within a bound, whatever the config says.
const MAX_CONNECTIONS_CEILING: usize = 100_000;
const MAX_CONCURRENT_STREAMS_CEILING: u32 = 10_000;
const MAX_HEADER_LIST_BYTES_FLOOR: u32 = 1_024;
const MAX_HEADER_LIST_BYTES_CEILING: u32 = 1_024 * 1_024;
const HTTP2_KEEPALIVE_INTERVAL_SECONDS_CEILING: u64 = 7_200;
const HTTP2_KEEPALIVE_TIMEOUT_SECONDS_CEILING: u64 = 600;
const TCP_KEEPALIVE_SECONDS_CEILING: u64 = 7_200;
const HANDSHAKE_TIMEOUT_SECONDS_CEILING: u64 = 300;
const REQUEST_TIMEOUT_SECONDS_CEILING: u64 = 3_600;
const MAX_CONNECTION_AGE_SECONDS_CEILING: u64 = 30 * 86_400;
/// Keys are kept in memory and in every snapshot, and listed a page at a time.
const MAX_API_KEYS_PER_TENANT_CEILING: usize = 100_000;
const MAX_WORKER_THREADS: usize = 1_024;

const _: () = assert!(DEFAULT_TTL_SECONDS <= DEFAULT_MAX_TTL_SECONDS);
const _: () = assert!(DEFAULT_MAX_USAGE_ITEMS <= MAX_USAGE_ITEMS_CEILING);
const _: () = assert!(ledger::DEFAULT_MAX_RATE_CARD_VERSIONS <= MAX_RATE_CARD_VERSIONS_CEILING);
const _: () = assert!(DEFAULT_MAX_REQUEST_BYTES <= MAX_REQUEST_BYTES_CEILING);
const _: () = assert!(DEFAULT_RESOLVED_RETENTION_SECONDS >= DEFAULT_MAX_TTL_SECONDS as u64);
const _: () = assert!(grpc::DEFAULT_MAX_ALERT_WATCHES_PER_TENANT <= grpc::DEFAULT_MAX_ALERT_WATCHES);
const _: () = assert!(transport::DEFAULT_MAX_CONNECTIONS <= MAX_CONNECTIONS_CEILING);
const _: () = assert!(transport::DEFAULT_MAX_CONCURRENT_STREAMS <= MAX_CONCURRENT_STREAMS_CEILING);
const _: () = assert!(transport::DEFAULT_MAX_HEADER_LIST_BYTES <= MAX_HEADER_LIST_BYTES_CEILING);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Transparent huge pages for quotad's own memory (`transparent_huge_pages`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransparentHugePages {
    /// Off for this process (`prctl(PR_SET_THP_DISABLE)`): memory is touched 4 KiB at a time. A huge page
    /// is zeroed whole, 2 MiB, on the first touch, inside whichever call touched it; under load that
    /// showed as latency spikes and as a sixth of the server's samples (README, "Performance").
    #[default]
    Off,
    /// As the system is configured (`/sys/kernel/mm/transparent_hugepage/enabled`).
    System,
}

/// Whether calls must carry credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Agent calls need an API key, admin calls the admin token.
    On,
    /// Every call is served without credentials: for local development only.
    Off,
}

/// quotad: the quota authority that agent runtimes call before and after each AI call.
#[derive(Debug, Parser)]
#[command(version, about, after_help = "`quotad admin --help`: the admin command line, a client of a running quotad.")]
pub struct Cli {
    /// Address to serve gRPC on.
    #[arg(long, env = "QUOTAD_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Directory for the write-ahead log and snapshots; created if missing, locked while quotad runs.
    #[arg(long, env = "QUOTAD_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// When an answer is sent: `write` after the change is written to the OS (survives a killed
    /// process), `fsync` after it is on disk (survives power loss), `none` without a log (snapshots only).
    #[arg(long, env = "QUOTAD_DURABILITY", value_enum, default_value_t = Durability::Write)]
    pub durability: Durability,
    /// How often the log is synced to disk in `write` mode (e.g. `10ms`).
    #[arg(long, env = "QUOTAD_FSYNC_INTERVAL", default_value = DEFAULT_FSYNC_INTERVAL, value_parser = humantime::parse_duration)]
    pub fsync_interval: Duration,
    /// How often a snapshot is written (e.g. `30s`); one is also written at shutdown.
    #[arg(long, env = "QUOTAD_SNAPSHOT_INTERVAL", default_value = DEFAULT_SNAPSHOT_INTERVAL, value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,
    /// Start from an older snapshot when the newest one is unreadable (its log must still be there).
    #[arg(long, env = "QUOTAD_RECOVER_FROM_OLDER_SNAPSHOT")]
    pub recover_from_older_snapshot: bool,
    /// TOML file with pack size, rate card, limits and bootstrap tenants.
    #[arg(long, env = "QUOTAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "QUOTAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve TLS with this certificate chain (PEM; the server's certificate first). Needs `--tls-key`.
    #[arg(long, env = "QUOTAD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "QUOTAD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: every client must present a certificate that chains to a CA in this PEM file.
    #[arg(long, env = "QUOTAD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// `on`: agent calls need an API key and admin calls the admin token; `off`: every call is open, for
    /// local development only.
    #[arg(long, env = "QUOTAD_AUTH", value_enum, default_value_t = AuthMode::On)]
    pub auth: AuthMode,
    /// File holding the admin token (16 to 1024 visible ASCII characters; surrounding whitespace is
    /// trimmed). The token may also come from the environment variable QUOTAD_ADMIN_TOKEN, not both.
    #[arg(long, env = "QUOTAD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// QUOTAD_ADMIN_TOKEN: the admin token itself, from the environment only (a flag would show it to
    /// every user of `ps`).
    #[arg(skip = std::env::var_os("QUOTAD_ADMIN_TOKEN").map(Hidden))]
    pub admin_token_env: Option<Hidden>,
    /// Address of the Prometheus endpoint (`GET /metrics`, plain HTTP), or `off`.
    #[arg(long, env = "QUOTAD_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: MetricsListen,
    /// Adds a `tenant` label to the business metrics: one series per tenant, so only for a bounded
    /// number of tenants.
    #[arg(long, env = "QUOTAD_METRICS_TENANT_LABELS")]
    pub metrics_tenant_labels: bool,
}

/// A secret read from the environment; its `Debug` does not show it.
#[derive(Clone)]
pub struct Hidden(pub OsString);

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hidden(..)")
    }
}

/// `--metrics-listen`: an address, or `off` for no metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self(None)),
            address => address
                .parse()
                .map(|address| Self(Some(address)))
                .map_err(|e| format!("{e}: expected an address such as 127.0.0.1:9464, or `off`")),
        }
    }
}

/// The contents of the TOML file; every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub pack_size_messages: u64,
    pub default_ttl_seconds: u32,
    pub max_ttl_seconds: u32,
    pub max_usage_items: usize,
    pub max_amount_messages: u64,
    pub max_packs_per_purchase: u64,
    pub max_budget_messages: u64,
    pub max_open_reservations_per_environment: u64,
    pub max_open_reservations_total: u64,
    pub resolved_retention_seconds: u64,
    pub max_resolved_per_environment: usize,
    pub max_request_bytes: usize,
    pub shutdown_grace_seconds: u64,
    pub max_usage_keys_per_tenant: u64,
    pub max_rate_card_versions: usize,
    pub max_agents_per_environment: usize,
    pub max_alert_watches: usize,
    pub max_alert_watches_per_tenant: usize,
    pub max_connections: usize,
    pub max_concurrent_streams_per_connection: u32,
    pub max_header_list_bytes: u32,
    pub http2_keepalive_interval_seconds: u64,
    pub http2_keepalive_timeout_seconds: u64,
    pub tcp_keepalive_seconds: u64,
    pub handshake_timeout_seconds: u64,
    pub request_timeout_seconds: u64,
    /// 0: no limit.
    pub max_connection_age_seconds: u64,
    pub max_api_keys_per_tenant: usize,
    pub max_open_reservations_per_api_key: u64,
    /// 0: one per core this process may run on.
    pub worker_threads: usize,
    pub transparent_huge_pages: TransparentHugePages,
    /// Replaces the whole default rate card when given; it is rate card version 1.
    pub rate_card: Option<BTreeMap<String, Rate>>,
    /// Tenants created at startup on empty state.
    pub bootstrap: Vec<BootstrapTenant>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pack_size_messages: DEFAULT_PACK_SIZE_MESSAGES,
            default_ttl_seconds: DEFAULT_TTL_SECONDS,
            max_ttl_seconds: DEFAULT_MAX_TTL_SECONDS,
            max_usage_items: DEFAULT_MAX_USAGE_ITEMS,
            max_amount_messages: DEFAULT_MAX_AMOUNT_MESSAGES,
            max_packs_per_purchase: DEFAULT_MAX_PACKS_PER_PURCHASE,
            max_budget_messages: DEFAULT_MAX_BUDGET_MESSAGES,
            max_open_reservations_per_environment: ledger::DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT,
            max_open_reservations_total: ledger::DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL,
            resolved_retention_seconds: DEFAULT_RESOLVED_RETENTION_SECONDS,
            max_resolved_per_environment: ledger::DEFAULT_MAX_RESOLVED_PER_ENVIRONMENT,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            shutdown_grace_seconds: DEFAULT_SHUTDOWN_GRACE_SECONDS,
            max_usage_keys_per_tenant: ledger::usage::DEFAULT_MAX_USAGE_KEYS_PER_TENANT,
            max_rate_card_versions: ledger::DEFAULT_MAX_RATE_CARD_VERSIONS,
            max_agents_per_environment: ledger::DEFAULT_MAX_AGENTS_PER_ENVIRONMENT,
            max_alert_watches: grpc::DEFAULT_MAX_ALERT_WATCHES,
            max_alert_watches_per_tenant: grpc::DEFAULT_MAX_ALERT_WATCHES_PER_TENANT,
            max_connections: transport::DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams_per_connection: transport::DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_bytes: transport::DEFAULT_MAX_HEADER_LIST_BYTES,
            http2_keepalive_interval_seconds: transport::DEFAULT_HTTP2_KEEPALIVE_INTERVAL_SECONDS,
            http2_keepalive_timeout_seconds: transport::DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECONDS,
            tcp_keepalive_seconds: transport::DEFAULT_TCP_KEEPALIVE_SECONDS,
            handshake_timeout_seconds: transport::DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
            request_timeout_seconds: transport::DEFAULT_REQUEST_TIMEOUT_SECONDS,
            max_connection_age_seconds: transport::DEFAULT_MAX_CONNECTION_AGE_SECONDS,
            max_api_keys_per_tenant: ledger::api_keys::DEFAULT_MAX_API_KEYS_PER_TENANT,
            max_open_reservations_per_api_key: ledger::api_keys::DEFAULT_MAX_OPEN_RESERVATIONS_PER_API_KEY,
            worker_threads: 0,
            transparent_huge_pages: TransparentHugePages::Off,
            rate_card: None,
            bootstrap: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapTenant {
    pub id: String,
    pub packs: u64,
    #[serde(default)]
    pub environments: Vec<BootstrapEnvironment>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapEnvironment {
    pub id: String,
    pub messages: u64,
    #[serde(default)]
    pub draw_from_tenant_pool: bool,
    #[serde(default)]
    pub payg_enabled: bool,
    #[serde(default)]
    pub payg_budget_messages: u64,
    /// App environments linked to this one.
    #[serde(default)]
    pub apps: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("{key} = {value}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
    #[error("rate_card: {0}")]
    RateCard(#[from] ledger::pricing::RateCardError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("{0}")]
    Tls(#[from] transport::tls::TlsError),
    #[error(
        "--listen {0} is not a loopback address, so admin calls need a token: set --admin-token-file or \
         QUOTAD_ADMIN_TOKEN"
    )]
    AdminTokenRequired(SocketAddr),
}

/// Who may call what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Off: every call is served without credentials.
    pub enabled: bool,
    /// Admin calls must send it. Without one (and `enabled`), admin calls are served unauthenticated,
    /// and only on a loopback address.
    pub admin_token: Option<AdminToken>,
}

impl AuthConfig {
    pub fn off() -> Self {
        Self { enabled: false, admin_token: None }
    }

    pub fn on(admin_token: Option<AdminToken>) -> Self {
        Self { enabled: true, admin_token }
    }

    /// Whether admin calls are served without credentials: allowed on a loopback address only.
    pub fn admin_open(&self) -> bool {
        self.enabled && self.admin_token.is_none()
    }
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` keeps state in memory only (for embedding and tests).
    pub storage: Option<StorageConfig>,
    pub log_format: LogFormat,
    pub policy: Policy,
    pub limits: ledger::Limits,
    /// Rate card version 1.
    pub rate_card: RateCard,
    pub max_request_bytes: usize,
    pub shutdown_grace: Duration,
    /// Applied in order to empty state at startup.
    pub bootstrap: Vec<Command>,
    pub transport: TransportLimits,
    /// `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// On by default, without an admin token.
    pub auth: AuthConfig,
    /// No endpoint unless set (the flags set one by default; embedding and tests do not).
    pub metrics: MetricsConfig,
    /// Threads of the async runtime the binary builds, at least 1.
    pub worker_threads: usize,
    /// Applied by the binary to its own process at startup.
    pub transparent_huge_pages: TransparentHugePages,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_settings(DEFAULT_LISTEN.parse().expect("valid default"), Settings::default())
            .expect("the embedded defaults are valid")
    }
}

impl Config {
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let settings = match &cli.config {
            None => Settings::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str(&text)
                    .map_err(|source| ConfigError::Parse { path: path.clone(), source: Box::new(source) })?
            }
        };
        let mut config = Self::from_settings(cli.listen, settings)?;
        config.log_format = cli.log_format;
        config.auth = auth_config(&cli)?;
        config.metrics = MetricsConfig { listen: cli.metrics_listen.0, tenant_labels: cli.metrics_tenant_labels };
        if cli.fsync_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "--fsync-interval",
                value: "0".into(),
                reason: "must be positive".into(),
            });
        }
        if cli.snapshot_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "--snapshot-interval",
                value: humantime::format_duration(cli.snapshot_interval).to_string(),
                reason: "must be at least 1s".into(),
            });
        }
        config.storage = Some(StorageConfig {
            dir: cli.data_dir,
            durability: cli.durability,
            fsync_interval: cli.fsync_interval,
            snapshot_interval: cli.snapshot_interval,
            recover_from_older_snapshot: cli.recover_from_older_snapshot,
            max_segment_bytes: DEFAULT_MAX_SEGMENT_BYTES,
        });
        config.tls =
            ServerTls::from_flags(cli.tls_cert.as_deref(), cli.tls_key.as_deref(), cli.tls_client_ca.as_deref())?;
        Ok(config)
    }

    pub fn from_settings(listen: SocketAddr, settings: Settings) -> Result<Self, ConfigError> {
        let s = &settings;
        let invalid = |key, value: &dyn std::fmt::Display, reason: &str| ConfigError::Invalid {
            key,
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        let to_milli = |key, messages: u64| {
            messages
                .checked_mul(MILLI_PER_MESSAGE)
                .ok_or_else(|| invalid(key, &messages, "too large: overflows 64 bits of milli"))
        };
        if s.pack_size_messages == 0 {
            return Err(invalid("pack_size_messages", &0, "must be at least 1"));
        }
        let pack_milli = to_milli("pack_size_messages", s.pack_size_messages)?;
        if pack_milli.checked_mul(s.max_packs_per_purchase).is_none() || s.max_packs_per_purchase == 0 {
            return Err(invalid(
                "max_packs_per_purchase",
                &s.max_packs_per_purchase,
                "must be at least 1, and times the pack size fit 64 bits of milli",
            ));
        }
        if s.max_ttl_seconds == 0 {
            return Err(invalid("max_ttl_seconds", &0, "must be at least 1"));
        }
        if !(1..=s.max_ttl_seconds).contains(&s.default_ttl_seconds) {
            return Err(invalid(
                "default_ttl_seconds",
                &s.default_ttl_seconds,
                "must be between 1 and max_ttl_seconds",
            ));
        }
        if !(1..=MAX_USAGE_ITEMS_CEILING).contains(&s.max_usage_items) {
            return Err(invalid("max_usage_items", &s.max_usage_items, "must be between 1 and 1024"));
        }
        if s.max_amount_messages == 0 {
            return Err(invalid("max_amount_messages", &0, "must be at least 1"));
        }
        let max_amount_milli = to_milli("max_amount_messages", s.max_amount_messages)?;
        let max_budget_milli = to_milli("max_budget_messages", s.max_budget_messages)?;
        if s.max_open_reservations_total == 0 {
            return Err(invalid("max_open_reservations_total", &0, "must be at least 1"));
        }
        if !(1..=s.max_open_reservations_total).contains(&s.max_open_reservations_per_environment) {
            return Err(invalid(
                "max_open_reservations_per_environment",
                &s.max_open_reservations_per_environment,
                "must be between 1 and max_open_reservations_total",
            ));
        }
        if s.resolved_retention_seconds < u64::from(s.max_ttl_seconds) {
            return Err(invalid(
                "resolved_retention_seconds",
                &s.resolved_retention_seconds,
                "must be at least max_ttl_seconds, so a commit at the end of a hold can still be retried",
            ));
        }
        if s.max_resolved_per_environment == 0 {
            return Err(invalid("max_resolved_per_environment", &0, "must be at least 1"));
        }
        if !(1_024..=MAX_REQUEST_BYTES_CEILING).contains(&s.max_request_bytes) {
            return Err(invalid("max_request_bytes", &s.max_request_bytes, "must be between 1024 and 4194304"));
        }
        let rate_card = match &s.rate_card {
            None => RateCard::default(),
            Some(rates) => RateCard::new(rates.iter().map(|(name, rate)| (name.as_str(), *rate)))?,
        };
        if s.max_usage_keys_per_tenant == 0 {
            return Err(invalid("max_usage_keys_per_tenant", &0, "must be at least 1"));
        }
        if !(1..=MAX_RATE_CARD_VERSIONS_CEILING).contains(&s.max_rate_card_versions) {
            return Err(invalid("max_rate_card_versions", &s.max_rate_card_versions, "must be between 1 and 100000"));
        }
        if !(1..=MAX_AGENTS_PER_ENVIRONMENT_CEILING).contains(&s.max_agents_per_environment) {
            return Err(invalid(
                "max_agents_per_environment",
                &s.max_agents_per_environment,
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=MAX_ALERT_WATCHES_CEILING).contains(&s.max_alert_watches) {
            return Err(invalid("max_alert_watches", &s.max_alert_watches, "must be between 1 and 100000"));
        }
        // Above max_alert_watches it leaves the server-wide cap alone, so lowering that one needs no other change.
        if !(1..=MAX_ALERT_WATCHES_CEILING).contains(&s.max_alert_watches_per_tenant) {
            return Err(invalid(
                "max_alert_watches_per_tenant",
                &s.max_alert_watches_per_tenant,
                "must be between 1 and 100000",
            ));
        }
        let transport = transport_limits(s)?;
        if !(1..=MAX_API_KEYS_PER_TENANT_CEILING).contains(&s.max_api_keys_per_tenant) {
            return Err(invalid("max_api_keys_per_tenant", &s.max_api_keys_per_tenant, "must be between 1 and 100000"));
        }
        // A cap above max_open_reservations_total never binds, which is harmless.
        if s.max_open_reservations_per_api_key == 0 {
            return Err(invalid("max_open_reservations_per_api_key", &0, "must be at least 1"));
        }
        let worker_threads = match s.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n if n <= MAX_WORKER_THREADS => n,
            n => return Err(invalid("worker_threads", &n, "must be between 0 (one per core) and 1024")),
        };
        let policy = Policy {
            pack_milli,
            default_ttl_seconds: s.default_ttl_seconds,
            max_ttl_seconds: s.max_ttl_seconds,
            max_usage_items: s.max_usage_items,
            max_amount_milli,
            max_packs_per_purchase: s.max_packs_per_purchase,
            max_budget_milli,
            max_alert_watches: s.max_alert_watches,
            max_alert_watches_per_tenant: s.max_alert_watches_per_tenant,
        };
        let limits = ledger::Limits {
            max_open_reservations_per_environment: s.max_open_reservations_per_environment,
            max_open_reservations_total: s.max_open_reservations_total,
            resolved_retention_ms: s.resolved_retention_seconds.saturating_mul(1_000),
            max_resolved_per_environment: s.max_resolved_per_environment,
            max_amount_milli,
            max_usage_keys_per_tenant: s.max_usage_keys_per_tenant,
            max_rate_card_versions: s.max_rate_card_versions,
            max_agents_per_environment: s.max_agents_per_environment,
            max_api_keys_per_tenant: s.max_api_keys_per_tenant,
            max_open_reservations_per_api_key: s.max_open_reservations_per_api_key,
            ..ledger::Limits::default()
        };
        let bootstrap = bootstrap_commands(&s.bootstrap, pack_milli)?;
        // Apply the bootstrap to a scratch ledger, so that a bad one is a config error, not a failed start.
        let scratch = Ledger::new(limits);
        for command in &bootstrap {
            scratch.apply(command, 0).map_err(|e| ConfigError::Bootstrap(e.to_string()))?;
        }
        Ok(Self {
            listen,
            storage: None,
            log_format: LogFormat::Text,
            policy,
            limits,
            rate_card,
            max_request_bytes: s.max_request_bytes,
            shutdown_grace: Duration::from_secs(s.shutdown_grace_seconds),
            bootstrap,
            transport,
            tls: None,
            auth: AuthConfig::on(None),
            metrics: MetricsConfig::default(),
            worker_threads,
            transparent_huge_pages: s.transparent_huge_pages,
        })
    }
}

/// The transport limits of `settings`, each checked against its range.
fn transport_limits(s: &Settings) -> Result<TransportLimits, ConfigError> {
    fn within<T: PartialOrd + Copy + std::fmt::Display>(
        key: &'static str,
        value: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        if (min..=max).contains(&value) {
            return Ok(value);
        }
        Err(ConfigError::Invalid { key, value: value.to_string(), reason: format!("must be between {min} and {max}") })
    }
    let seconds = |key, value, max| within(key, value, 1, max).map(Duration::from_secs);
    let http2_keepalive_interval = seconds(
        "http2_keepalive_interval_seconds",
        s.http2_keepalive_interval_seconds,
        HTTP2_KEEPALIVE_INTERVAL_SECONDS_CEILING,
    )?;
    let http2_keepalive_timeout = seconds(
        "http2_keepalive_timeout_seconds",
        s.http2_keepalive_timeout_seconds,
        HTTP2_KEEPALIVE_TIMEOUT_SECONDS_CEILING,
    )?;
    let max_connection_age = match within(
        "max_connection_age_seconds",
        s.max_connection_age_seconds,
        0,
        MAX_CONNECTION_AGE_SECONDS_CEILING,
    )? {
        0 => None,
        age => Some(Duration::from_secs(age)),
    };
    Ok(TransportLimits {
        max_connections: within("max_connections", s.max_connections, 1, MAX_CONNECTIONS_CEILING)?,
        max_concurrent_streams: within(
            "max_concurrent_streams_per_connection",
            s.max_concurrent_streams_per_connection,
            1,
            MAX_CONCURRENT_STREAMS_CEILING,
        )?,
        max_header_list_bytes: within(
            "max_header_list_bytes",
            s.max_header_list_bytes,
            MAX_HEADER_LIST_BYTES_FLOOR,
            MAX_HEADER_LIST_BYTES_CEILING,
        )?,
        http2_keepalive_interval,
        http2_keepalive_timeout,
        tcp_keepalive: seconds("tcp_keepalive_seconds", s.tcp_keepalive_seconds, TCP_KEEPALIVE_SECONDS_CEILING)?,
        handshake_timeout: seconds(
            "handshake_timeout_seconds",
            s.handshake_timeout_seconds,
            HANDSHAKE_TIMEOUT_SECONDS_CEILING,
        )?,
        request_timeout: seconds(
            "request_timeout_seconds",
            s.request_timeout_seconds,
            REQUEST_TIMEOUT_SECONDS_CEILING,
        )?,
        max_connection_age,
    })
}

/// `--auth` and the admin token, from its file or `QUOTAD_ADMIN_TOKEN`. No error shows the token.
fn auth_config(cli: &Cli) -> Result<AuthConfig, ConfigError> {
    let invalid = |key, value: String, reason: String| ConfigError::Invalid { key, value, reason };
    let admin_token = match (&cli.admin_token_file, &cli.admin_token_env) {
        (Some(path), Some(_)) => {
            return Err(invalid(
                "--admin-token-file",
                path.display().to_string(),
                "QUOTAD_ADMIN_TOKEN is set too; set only one of them".into(),
            ));
        }
        (Some(path), None) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let token = AdminToken::new(&text)
                .map_err(|e| invalid("--admin-token-file", path.display().to_string(), format!("the token {e}")))?;
            Some(token)
        }
        (None, Some(Hidden(value))) => {
            let hidden = || "(not shown)".to_owned();
            let text = value.to_str().ok_or_else(|| invalid("QUOTAD_ADMIN_TOKEN", hidden(), "is not UTF-8".into()))?;
            Some(AdminToken::new(text).map_err(|e| invalid("QUOTAD_ADMIN_TOKEN", hidden(), e.to_string()))?)
        }
        (None, None) => None,
    };
    let auth = match cli.auth {
        AuthMode::On => AuthConfig::on(admin_token),
        AuthMode::Off => {
            if admin_token.is_some() {
                // Not an error: a token kept in the environment should not stop a local run.
                tracing::warn!(
                    "--auth off: the admin token given is ignored, and every call is served without credentials"
                );
            }
            AuthConfig::off()
        }
    };
    if auth.admin_open() && !cli.listen.ip().is_loopback() {
        return Err(ConfigError::AdminTokenRequired(cli.listen));
    }
    Ok(auth)
}

fn bootstrap_commands(tenants: &[BootstrapTenant], pack_milli: u64) -> Result<Vec<Command>, ConfigError> {
    let bad = |what: &str, id: &str, e: &dyn std::fmt::Display| ConfigError::Bootstrap(format!("{what} {id:?}: {e}"));
    let mut commands = Vec::new();
    for tenant in tenants {
        let tenant_id = TenantId::new(&tenant.id).map_err(|e| bad("tenant id", &tenant.id, &e))?;
        let amount_milli = pack_milli
            .checked_mul(tenant.packs)
            .filter(|amount| *amount > 0)
            .ok_or_else(|| bad("tenant", &tenant.id, &"packs must be at least 1 and fit 64 bits of milli"))?;
        commands.push(Command::PurchaseCapacity { tenant: tenant_id.clone(), amount_milli, idempotency_key: None });
        for env in &tenant.environments {
            let environment = EnvironmentId::new(&env.id).map_err(|e| bad("environment id", &env.id, &e))?;
            let milli = |messages: u64| {
                messages
                    .checked_mul(MILLI_PER_MESSAGE)
                    .ok_or_else(|| bad("environment", &env.id, &"amount overflows 64 bits of milli"))
            };
            commands.push(Command::AllocateCapacity {
                tenant: tenant_id.clone(),
                environment: environment.clone(),
                amount_milli: milli(env.messages)?,
                draw_from_tenant_pool: env.draw_from_tenant_pool,
            });
            if env.payg_enabled {
                commands.push(Command::SetPayAsYouGo {
                    environment: environment.clone(),
                    enabled: true,
                    budget_milli: milli(env.payg_budget_messages)?,
                });
            }
            for app in &env.apps {
                let app_environment = EnvironmentId::new(app).map_err(|e| bad("app environment id", app, &e))?;
                commands.push(Command::LinkEnvironment { app_environment, environment: Some(environment.clone()) });
            }
        }
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Config, ConfigError> {
        let settings: Settings = toml::from_str(toml_text)
            .map_err(|source| ConfigError::Parse { path: "test.toml".into(), source: Box::new(source) })?;
        Config::from_settings(DEFAULT_LISTEN.parse().unwrap(), settings)
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let config = Config::default();
        assert_eq!(config.policy.pack_milli, 25_000_000);
        assert_eq!(config.limits.max_open_reservations_total, 4_000_000);
    }

    #[test]
    fn the_example_config_is_valid() {
        let config = parse(include_str!("../examples/quotad.toml")).unwrap();
        assert!(!config.bootstrap.is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = parse("pack_size = 10").unwrap_err().to_string();
        assert!(err.contains("pack_size"), "{err}");
        let err = parse("default_ttl_seconds = 7200").unwrap_err().to_string();
        assert!(err.contains("default_ttl_seconds") && err.contains("max_ttl_seconds"), "{err}");
        let err = parse("max_open_reservations_per_environment = 5\nmax_open_reservations_total = 4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_open_reservations_per_environment"), "{err}");
        let err = parse("[rate_card]\nx = { messages = 1, per = 0 }").unwrap_err().to_string();
        assert!(err.contains("per"), "{err}");
    }

    /// Parses flags as the binary does; `QUOTAD_*` variables in the test's environment would apply too.
    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(["quotad"].iter().chain(args)).expect("flags parse");
        Config::load(cli)
    }

    #[test]
    fn storage_flags_have_defaults_and_limits() {
        let storage = load(&[]).unwrap().storage.expect("a data directory by default");
        assert_eq!(storage.dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(storage.durability, Durability::Write);
        assert_eq!(storage.fsync_interval, Duration::from_millis(10));
        assert_eq!(storage.snapshot_interval, Duration::from_secs(30));
        assert!(!storage.recover_from_older_snapshot);

        assert!(load(&["--fsync-interval", "1ms"]).is_ok());
        let err = load(&["--fsync-interval", "0s"]).unwrap_err().to_string();
        assert!(err.contains("--fsync-interval"), "{err}");
        assert!(load(&["--snapshot-interval", "1s"]).is_ok());
        let err = load(&["--snapshot-interval", "999ms"]).unwrap_err().to_string();
        assert!(err.contains("--snapshot-interval") && err.contains("at least 1s"), "{err}");
        let storage = load(&["--durability", "fsync", "--recover-from-older-snapshot"]).unwrap().storage.unwrap();
        assert_eq!(storage.durability, Durability::Fsync);
        assert!(storage.recover_from_older_snapshot);
    }

    /// Parses flags as `load` does, with `QUOTAD_ADMIN_TOKEN` as given rather than from the environment.
    fn load_with_token_env(args: &[&str], token: Option<&str>) -> Result<Config, ConfigError> {
        let mut cli = Cli::try_parse_from(["quotad"].iter().chain(args)).expect("flags parse");
        cli.admin_token_env = token.map(|token| Hidden(token.into()));
        assert!(!format!("{cli:?}").contains(token.unwrap_or("(none)")), "the token is shown: {cli:?}");
        Config::load(cli)
    }

    #[test]
    fn auth_is_on_by_default_and_admin_calls_are_open_on_loopback_only() {
        let config = load_with_token_env(&[], None).unwrap();
        assert_eq!(config.auth, AuthConfig::on(None));
        assert!(config.auth.admin_open());
        let err = load_with_token_env(&["--listen", "0.0.0.0:50051"], None).unwrap_err();
        assert!(matches!(err, ConfigError::AdminTokenRequired(_)), "{err}");
        assert!(err.to_string().contains("--admin-token-file"), "{err}");
        assert!(load_with_token_env(&["--listen", "[::1]:50051"], None).is_ok());
        let off = load_with_token_env(&["--listen", "0.0.0.0:50051", "--auth", "off"], None).unwrap();
        assert_eq!(off.auth, AuthConfig::off());
        let token = "a-token-of-20-bytes!";
        let secured = load_with_token_env(&["--listen", "0.0.0.0:50051"], Some(token)).unwrap();
        assert!(secured.auth.enabled && secured.auth.admin_token.as_ref().is_some_and(|t| t.matches(token)));
    }

    #[test]
    fn the_admin_token_file_is_trimmed_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let short = file("short", "fifteen-bytes!!\n");
        let err = load_with_token_env(&["--admin-token-file", &short], None).unwrap_err().to_string();
        assert!(err.contains("--admin-token-file") && err.contains("15 bytes"), "{err}");
        assert!(!err.contains("fifteen-bytes!!"), "the token is shown: {err}");
        let exact = file("exact", "  sixteen-bytes!!!\n");
        let config = load_with_token_env(&["--admin-token-file", &exact], None).unwrap();
        assert!(config.auth.admin_token.unwrap().matches("sixteen-bytes!!!"));
        let empty = file("empty", "\n");
        let err = load_with_token_env(&["--admin-token-file", &empty], None).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let err = load_with_token_env(&["--admin-token-file", &exact], Some("sixteen-bytes!!!")).unwrap_err();
        assert!(err.to_string().contains("set only one"), "{err}");
        let err = load_with_token_env(&[], Some("too-short")).unwrap_err().to_string();
        assert!(err.contains("QUOTAD_ADMIN_TOKEN") && !err.contains("too-short"), "{err}");
        let missing = dir.path().join("missing").display().to_string();
        assert!(matches!(load_with_token_env(&["--admin-token-file", &missing], None), Err(ConfigError::Read { .. })));
    }

    #[test]
    fn api_key_limits_are_config_keys() {
        let config = parse("max_api_keys_per_tenant = 3\nmax_open_reservations_per_api_key = 7").unwrap();
        assert_eq!((config.limits.max_api_keys_per_tenant, config.limits.max_open_reservations_per_api_key), (3, 7));
        assert_eq!(Config::default().limits.max_api_keys_per_tenant, 1_000);
        assert!(parse("max_api_keys_per_tenant = 100000").is_ok());
        for bad in
            ["max_api_keys_per_tenant = 0", "max_api_keys_per_tenant = 100001", "max_open_reservations_per_api_key = 0"]
        {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad.split(' ').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn transport_limits_have_defaults_and_are_refused_outside_their_ranges() {
        assert_eq!(Config::default().transport, TransportLimits::default());
        assert_eq!(Config::default().policy.max_alert_watches_per_tenant, grpc::DEFAULT_MAX_ALERT_WATCHES_PER_TENANT);
        let ranges: [(&str, u64, u64); 11] = [
            ("max_connections", 1, 100_000),
            ("max_concurrent_streams_per_connection", 1, 10_000),
            ("max_header_list_bytes", 1_024, 1_048_576),
            ("http2_keepalive_interval_seconds", 1, 7_200),
            ("http2_keepalive_timeout_seconds", 1, 600),
            ("tcp_keepalive_seconds", 1, 7_200),
            ("handshake_timeout_seconds", 1, 300),
            ("request_timeout_seconds", 1, 3_600),
            ("max_connection_age_seconds", 0, 2_592_000),
            ("max_alert_watches_per_tenant", 1, 100_000),
            ("worker_threads", 0, 1_024),
        ];
        for (key, min, max) in ranges {
            parse(&format!("{key} = {min}")).unwrap_or_else(|e| panic!("{key} = {min}: {e}"));
            parse(&format!("{key} = {max}")).unwrap_or_else(|e| panic!("{key} = {max}: {e}"));
            for bad in [min.checked_sub(1), Some(max + 1)].into_iter().flatten() {
                let err = parse(&format!("{key} = {bad}")).expect_err(key).to_string();
                assert!(err.starts_with(&format!("{key} = {bad}: must be between")), "{err}");
            }
        }
        let limits = parse("max_connection_age_seconds = 600\nrequest_timeout_seconds = 5").unwrap().transport;
        assert_eq!(limits.max_connection_age, Some(Duration::from_secs(600)));
        assert_eq!(limits.request_timeout, Duration::from_secs(5));
        assert_eq!(parse("max_connection_age_seconds = 0").unwrap().transport.max_connection_age, None);
        assert_eq!(parse("worker_threads = 1").unwrap().worker_threads, 1);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(parse("worker_threads = 0").unwrap().worker_threads, cores);
    }

    #[test]
    fn transparent_huge_pages_are_off_unless_set_to_follow_the_system() {
        assert_eq!(Config::default().transparent_huge_pages, TransparentHugePages::Off);
        assert_eq!(
            parse("transparent_huge_pages = \"off\"").unwrap().transparent_huge_pages,
            TransparentHugePages::Off
        );
        let system = parse("transparent_huge_pages = \"system\"").unwrap();
        assert_eq!(system.transparent_huge_pages, TransparentHugePages::System);
        let err = parse("transparent_huge_pages = \"always\"").expect_err("not a setting").to_string();
        assert!(err.contains("transparent_huge_pages") && err.contains("`off` or `system`"), "{err}");
    }

    #[test]
    fn the_metrics_endpoint_is_on_loopback_by_default_and_can_be_turned_off() {
        let metrics = load(&[]).unwrap().metrics;
        assert_eq!(metrics.listen, Some(DEFAULT_METRICS_LISTEN.parse().unwrap()));
        assert!(!metrics.tenant_labels);
        let metrics = load(&["--metrics-listen", "off", "--metrics-tenant-labels"]).unwrap().metrics;
        assert_eq!(metrics.listen, None);
        assert!(metrics.tenant_labels);
        assert_eq!(load(&["--metrics-listen", "[::1]:0"]).unwrap().metrics.listen, Some("[::1]:0".parse().unwrap()));
        let error = Cli::try_parse_from(["quotad", "--metrics-listen", "localhost"]).unwrap_err().to_string();
        assert!(error.contains("--metrics-listen") && error.contains("`off`"), "{error}");
        assert_eq!(Config::default().metrics.listen, None, "embedded servers serve no metrics unless asked");
    }

    #[test]
    fn a_bootstrap_that_over_allocates_is_refused() {
        let err =
            parse("[[bootstrap]]\nid = \"t\"\npacks = 1\n[[bootstrap.environments]]\nid = \"e\"\nmessages = 25001\n")
                .unwrap_err();
        assert!(matches!(err, ConfigError::Bootstrap(_)), "{err}");
    }
}
