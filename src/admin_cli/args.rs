//! The flags of `quotad admin`: global connection options, one subcommand per `QuotaAdmin` call (plus
//! `balance`), and the parsers of the values that have a syntax of their own (`--rate`,
//! `--effective-at`, `--server`). Flags are the proto field names in kebab case.

use std::{
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use super::render::Format;
use crate::proto;

/// The server called without `--server`, over `http://`, or `https://` with `--tls-ca`.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50051";
pub const DEFAULT_TIMEOUT: &str = "10s";
/// Longer than any admin call needs; a typo such as `10h` is refused rather than waited out.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  1   the call failed with a gRPC status (the server's refusal, or DEADLINE_EXCEEDED after
      --timeout): `quotad admin: <command>: <CODE>: <message>` on stderr, CODE a gRPC status
      name such as NOT_FOUND, INVALID_ARGUMENT or UNIMPLEMENTED
  64  usage error: unknown command or flag, missing or malformed value
  69  the server cannot be reached (refused, unknown host, timed out connecting, connection lost)
  74  the output cannot be written";

/// quotad admin: the admin command line, a gRPC client of a running quotad.
///
/// Amounts in requests are whole messages, as in the proto. Table and CSV output show amounts in
/// messages with 3 decimals and times in RFC 3339; JSON output has the proto field names and raw
/// values (`*_milli`, `*_unix_ms`).
#[derive(Debug, Parser)]
#[command(name = "quotad admin", bin_name = "quotad admin", version, after_help = EXIT_CODES_HELP)]
pub struct AdminArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// The quotad to call: `http://host:port`, `https://host:port` with `--tls-ca`, or `host:port`
    /// [default: 127.0.0.1:50051, over TLS with `--tls-ca`].
    #[arg(long, global = true, env = "QUOTAD_SERVER")]
    pub server: Option<String>,
    /// Sent as `authorization: Bearer <token>` with every call; never printed.
    #[arg(long, global = true, env = "QUOTAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline for connecting and for each call (e.g. `10s`, `500ms`), at most 1h.
    #[arg(long, global = true, default_value = DEFAULT_TIMEOUT, value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Call over TLS, trusting the CA certificates in this PEM file (the server's `https://` address).
    #[arg(long, global = true, env = "QUOTAD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate chain (PEM). Needs `--tls-key` and `--tls-ca`.
    #[arg(long, global = true, env = "QUOTAD_CLIENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: the private key of `--tls-cert` (PEM).
    #[arg(long, global = true, env = "QUOTAD_CLIENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// By hand, so that no `Debug` of the arguments prints the token.
impl std::fmt::Debug for GlobalArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalArgs")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("timeout", &self.timeout)
            .field("format", &self.format)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Adds packs to a tenant's prepaid capacity; creates the tenant if new (PurchaseCapacity).
    Purchase(PurchaseArgs),
    /// Sets (does not add to) an environment's allocation; creates the environment if new
    /// (AllocateCapacity).
    Allocate(AllocateArgs),
    /// Turns pay-as-you-go on or off with a monthly budget (SetPayAsYouGo).
    SetPayg(SetPaygArgs),
    /// Links an app environment to the capacity environment it draws on, or unlinks it
    /// (LinkEnvironment).
    Link(LinkArgs),
    /// A tenant's purchased, allocated and pool capacity (GetTenant).
    Tenant(TenantArgs),
    /// The balance of a capacity environment, or of the one an app environment is linked to
    /// (Quota/GetBalance).
    Balance(BalanceArgs),
    /// Sets a tenant's overage grace and billing time zone (SetTenantPolicy).
    SetTenantPolicy(SetTenantPolicyArgs),
    /// Sets when an environment's low-balance and budget alerts fire (SetEnvironmentAlerts).
    SetEnvironmentAlerts(SetEnvironmentAlertsArgs),
    /// Sets an agent's monthly limit in a capacity environment, or disables the agent (SetAgentLimit).
    SetAgentLimit(SetAgentLimitArgs),
    /// The agents of a capacity environment with a limit or use this period (ListAgentLimits).
    AgentLimits(AgentLimitsArgs),
    /// Charges and reservation counts, filtered and grouped (GetUsage).
    Usage(UsageArgs),
    /// A rate card version: the one in force now, or `--version` (GetRateCard).
    RateCard(RateCardArgs),
    /// Adds a rate card version, in force from `--effective-at` (SetRateCard).
    SetRateCard(SetRateCardArgs),
    /// The open holds of a capacity environment, oldest first (ListReservations).
    Reservations(ReservationsArgs),
    /// Releases every open hold of a capacity environment, or of one agent in it (ReleaseAll).
    ReleaseAll(ReleaseAllArgs),
    /// A tenant's recent alerts, oldest first (ListAlerts).
    Alerts(AlertsArgs),
    /// Prints the current alert level, then each alert as it fires, one line each, until the server
    /// ends the stream or Ctrl-C (exit 0) (WatchAlerts).
    WatchAlerts(WatchAlertsArgs),
    /// Creates, revokes and lists the API keys agent runtimes call with.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Creates an API key for one tenant, optionally limited to some of its environments, and prints
    /// its secret: this once, never again (CreateApiKey).
    Create(CreateApiKeyArgs),
    /// Revokes an API key: the next call that sends it is refused (RevokeApiKey).
    Revoke(RevokeApiKeyArgs),
    /// A tenant's API keys with their scope, creation and last use; never their secrets (ListApiKeys).
    List(ListApiKeysArgs),
}

#[derive(Debug, Args)]
pub struct CreateApiKeyArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    /// An environment the key may use (capacity or linked app environment of the tenant), e.g.
    /// `acme-prod,acme-sales-app`; none = every environment of the tenant.
    #[arg(long, visible_alias = "environment", value_delimiter = ',')]
    pub environment_id: Vec<String>,
    /// What the key is for, at most 256 bytes.
    #[arg(long, default_value = "")]
    pub description: String,
}

#[derive(Debug, Args)]
pub struct RevokeApiKeyArgs {
    pub key_id: String,
}

#[derive(Debug, Args)]
#[command(mut_arg("page_size", |arg| arg.help(page_size_help("Keys"))))]
pub struct ListApiKeysArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    #[command(flatten)]
    pub page: PageArgs,
}

/// The paging flags of a listing that can follow its pages. Each listing says what a page holds in
/// the help of `--page-size` (`page_size_help`).
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Items per page, 1 to 1,000; 0 = 100, or 1,000 with `--all`.
    #[arg(long, default_value_t = 0)]
    pub page_size: u32,
    /// The page to start from, as printed on stderr after a page that has more.
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Follow the pages to the last one and print them as one list.
    #[arg(long)]
    pub all: bool,
}

/// The help of `--page-size` for a listing of `items`.
fn page_size_help(items: &str) -> String {
    format!("{items} per page, 1 to 1,000; 0 = 100, or 1,000 with `--all`")
}

#[derive(Debug, Args)]
pub struct PurchaseArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    /// Packs to add (one pack is 25,000 messages unless the server is configured otherwise).
    #[arg(long)]
    pub packs: u64,
    /// A retry with the same key adds nothing again.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
}

#[derive(Debug, Args)]
pub struct AllocateArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
    /// The allocation in whole messages; replaces the previous one.
    #[arg(long)]
    pub messages: u64,
    /// Let the environment draw from the tenant's unallocated capacity once its allocation is used.
    #[arg(long)]
    pub draw_from_tenant_pool: bool,
}

#[derive(Debug, Args)]
pub struct SetPaygArgs {
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
    /// `true` or `false`: stated every time, so that a forgotten flag never turns pay-as-you-go off.
    #[arg(long, action = ArgAction::Set)]
    pub enabled: bool,
    /// Monthly budget in whole messages; 0 = no cap.
    #[arg(long, default_value_t = 0)]
    pub monthly_budget_messages: u64,
}

#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The app environment.
    #[arg(long, visible_alias = "app-environment")]
    pub app_environment_id: String,
    /// The capacity environment to draw on.
    #[arg(long, visible_alias = "environment", required_unless_present = "unlink", conflicts_with = "unlink")]
    pub environment_id: Option<String>,
    /// Unlink the app environment instead.
    #[arg(long)]
    pub unlink: bool,
}

#[derive(Debug, Args)]
pub struct TenantArgs {
    pub tenant_id: String,
}

#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// A capacity environment, or an app environment linked to one.
    pub environment_id: String,
}

#[derive(Debug, Args)]
pub struct SetTenantPolicyArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    /// 100 to 1,000; 0 = 100 (no grace).
    #[arg(long, default_value_t = 0)]
    pub overage_grace_percent: u32,
    /// An IANA time zone such as `Europe/Paris`; empty = UTC.
    #[arg(long, default_value = "")]
    pub time_zone: String,
}

#[derive(Debug, Args)]
pub struct SetEnvironmentAlertsArgs {
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
    /// LOW fires at this percentage of allocation plus pay-as-you-go budget, 1 to 100; 0 = 20.
    #[arg(long, default_value_t = 0)]
    pub low_percent: u32,
    /// Pay-as-you-go budget thresholds in percent, e.g. `50,80,100`; none = 80 and 100.
    #[arg(long, value_delimiter = ',')]
    pub budget_threshold_percents: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct SetAgentLimitArgs {
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
    #[arg(long, visible_alias = "agent")]
    pub agent_id: String,
    /// Monthly cap in whole messages; 0 = none.
    #[arg(long, default_value_t = 0)]
    pub monthly_limit_messages: u64,
    /// NEARING_LIMIT fires at this percentage of the limit, 1 to 100; 0 = 80.
    #[arg(long, default_value_t = 0)]
    pub notify_percent: u32,
    /// Refuse reservations that would take the agent past its limit.
    #[arg(long)]
    pub stop_when_exceeded: bool,
    /// Refuse every reservation of the agent in this environment.
    #[arg(long)]
    pub disabled: bool,
}

#[derive(Debug, Args)]
pub struct AgentLimitsArgs {
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
}

/// A dimension of `usage --group-by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupBy {
    Environment,
    Agent,
    /// The rate-card scenario, or `messages` for use given in messages.
    Scenario,
    Source,
    Day,
}

impl From<GroupBy> for proto::GroupBy {
    fn from(group_by: GroupBy) -> Self {
        match group_by {
            GroupBy::Environment => proto::GroupBy::Environment,
            GroupBy::Agent => proto::GroupBy::Agent,
            GroupBy::Scenario => proto::GroupBy::Scenario,
            GroupBy::Source => proto::GroupBy::Source,
            GroupBy::Day => proto::GroupBy::Day,
        }
    }
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    /// Only this environment.
    #[arg(long, visible_alias = "environment", default_value = "")]
    pub environment_id: String,
    /// Only this agent.
    #[arg(long, visible_alias = "agent", default_value = "")]
    pub agent_id: String,
    /// First day, `YYYY-MM-DD` in the tenant's time zone; with `--to`, empty = the current period.
    #[arg(long, default_value = "")]
    pub from: String,
    /// Last day, included.
    #[arg(long, default_value = "")]
    pub to: String,
    /// Dimensions to group by, e.g. `environment,day`; none = one total row.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub group_by: Vec<GroupBy>,
}

#[derive(Debug, Args)]
pub struct RateCardArgs {
    /// A version number; 0 = the version in force now.
    #[arg(long = "version", default_value_t = 0)]
    pub card_version: u32,
}

#[derive(Debug, Args)]
pub struct SetRateCardArgs {
    /// One scenario's price, `scenario=messages/per`, e.g. `agent_flow_actions=13/100`; repeat for
    /// each scenario: the new version holds exactly these.
    #[arg(long = "rate", required = true, value_parser = parse_rate)]
    pub rates: Vec<proto::ScenarioRate>,
    /// When it takes effect: RFC 3339 (`2026-12-01T00:00:00Z`, `2026-12-01T01:00:00+01:00`) or Unix
    /// milliseconds; default now.
    #[arg(long, value_parser = parse_effective_at)]
    pub effective_at: Option<u64>,
}

#[derive(Debug, Args)]
#[command(mut_arg("page_size", |arg| arg.help(page_size_help("Holds"))))]
pub struct ReservationsArgs {
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
    /// Only this agent's holds.
    #[arg(long, visible_alias = "agent", default_value = "")]
    pub agent_id: String,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct ReleaseAllArgs {
    #[arg(long, visible_alias = "environment")]
    pub environment_id: String,
    /// Only this agent's holds.
    #[arg(long, visible_alias = "agent", default_value = "")]
    pub agent_id: String,
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    /// Only this environment.
    #[arg(long, visible_alias = "environment", default_value = "")]
    pub environment_id: String,
    /// The newest alerts, 1 to 1,000; 0 = 100.
    #[arg(long, default_value_t = 0)]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct WatchAlertsArgs {
    #[arg(long, visible_alias = "tenant")]
    pub tenant_id: String,
    /// Only this environment.
    #[arg(long, visible_alias = "environment", default_value = "")]
    pub environment_id: String,
}

// Each subcommand's flags are its request message.

impl From<PurchaseArgs> for proto::PurchaseCapacityRequest {
    fn from(args: PurchaseArgs) -> Self {
        Self { tenant_id: args.tenant_id, packs: args.packs, idempotency_key: args.idempotency_key }
    }
}

impl From<AllocateArgs> for proto::AllocateCapacityRequest {
    fn from(args: AllocateArgs) -> Self {
        Self {
            tenant_id: args.tenant_id,
            environment_id: args.environment_id,
            messages: args.messages,
            draw_from_tenant_pool: args.draw_from_tenant_pool,
        }
    }
}

impl From<SetPaygArgs> for proto::SetPayAsYouGoRequest {
    fn from(args: SetPaygArgs) -> Self {
        Self {
            environment_id: args.environment_id,
            enabled: args.enabled,
            monthly_budget_messages: args.monthly_budget_messages,
        }
    }
}

impl From<LinkArgs> for proto::LinkEnvironmentRequest {
    /// `--unlink` is the proto's empty `environment_id`.
    fn from(args: LinkArgs) -> Self {
        Self { app_environment_id: args.app_environment_id, environment_id: args.environment_id.unwrap_or_default() }
    }
}

impl From<TenantArgs> for proto::GetTenantRequest {
    fn from(args: TenantArgs) -> Self {
        Self { tenant_id: args.tenant_id }
    }
}

impl From<BalanceArgs> for proto::GetBalanceRequest {
    fn from(args: BalanceArgs) -> Self {
        Self { environment_id: args.environment_id }
    }
}

impl From<SetTenantPolicyArgs> for proto::SetTenantPolicyRequest {
    fn from(args: SetTenantPolicyArgs) -> Self {
        Self { tenant_id: args.tenant_id, overage_grace_percent: args.overage_grace_percent, time_zone: args.time_zone }
    }
}

impl From<SetEnvironmentAlertsArgs> for proto::SetEnvironmentAlertsRequest {
    fn from(args: SetEnvironmentAlertsArgs) -> Self {
        Self {
            environment_id: args.environment_id,
            low_percent: args.low_percent,
            budget_threshold_percents: args.budget_threshold_percents,
        }
    }
}

impl From<SetAgentLimitArgs> for proto::SetAgentLimitRequest {
    fn from(args: SetAgentLimitArgs) -> Self {
        Self {
            environment_id: args.environment_id,
            agent_id: args.agent_id,
            monthly_limit_messages: args.monthly_limit_messages,
            notify_percent: args.notify_percent,
            stop_when_exceeded: args.stop_when_exceeded,
            disabled: args.disabled,
        }
    }
}

impl From<AgentLimitsArgs> for proto::ListAgentLimitsRequest {
    fn from(args: AgentLimitsArgs) -> Self {
        Self { environment_id: args.environment_id }
    }
}

impl From<UsageArgs> for proto::GetUsageRequest {
    fn from(args: UsageArgs) -> Self {
        Self {
            tenant_id: args.tenant_id,
            environment_id: args.environment_id,
            agent_id: args.agent_id,
            from: args.from,
            to: args.to,
            group_by: args.group_by.into_iter().map(|dimension| proto::GroupBy::from(dimension).into()).collect(),
        }
    }
}

impl From<RateCardArgs> for proto::GetRateCardRequest {
    fn from(args: RateCardArgs) -> Self {
        Self { version: args.card_version }
    }
}

impl From<SetRateCardArgs> for proto::SetRateCardRequest {
    /// No `--effective-at` is the proto's 0: now.
    fn from(args: SetRateCardArgs) -> Self {
        Self { rates: args.rates, effective_at_unix_ms: args.effective_at.unwrap_or(0) }
    }
}

impl From<ReleaseAllArgs> for proto::ReleaseAllRequest {
    fn from(args: ReleaseAllArgs) -> Self {
        Self { environment_id: args.environment_id, agent_id: args.agent_id }
    }
}

impl From<AlertsArgs> for proto::ListAlertsRequest {
    fn from(args: AlertsArgs) -> Self {
        Self { tenant_id: args.tenant_id, environment_id: args.environment_id, page_size: args.page_size }
    }
}

impl From<CreateApiKeyArgs> for proto::CreateApiKeyRequest {
    fn from(args: CreateApiKeyArgs) -> Self {
        Self { tenant_id: args.tenant_id, environment_ids: args.environment_id, description: args.description }
    }
}

impl From<RevokeApiKeyArgs> for proto::RevokeApiKeyRequest {
    fn from(args: RevokeApiKeyArgs) -> Self {
        Self { key_id: args.key_id }
    }
}

impl From<WatchAlertsArgs> for proto::WatchAlertsRequest {
    fn from(args: WatchAlertsArgs) -> Self {
        Self { tenant_id: args.tenant_id, environment_id: args.environment_id }
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err("must be more than 0 and at most 1h".to_owned());
    }
    Ok(timeout)
}

/// `scenario=messages/per`, e.g. `agent_flow_actions=13/100`.
pub fn parse_rate(text: &str) -> Result<proto::ScenarioRate, String> {
    let syntax = || format!("{text:?} is not scenario=messages/per (e.g. agent_flow_actions=13/100)");
    let (scenario, price) = text.split_once('=').ok_or_else(syntax)?;
    let (messages, per) = price.split_once('/').ok_or_else(syntax)?;
    let number = |part: &str| part.trim().parse::<u64>().map_err(|_| syntax());
    if scenario.trim().is_empty() {
        return Err(syntax());
    }
    Ok(proto::ScenarioRate { scenario: scenario.trim().to_owned(), messages: number(messages)?, per: number(per)? })
}

/// RFC 3339 with `Z` or a `±HH:MM` offset, or Unix milliseconds; as Unix milliseconds.
pub fn parse_effective_at(text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text}: too large for Unix milliseconds"));
    }
    let invalid = |reason: &dyn std::fmt::Display| {
        format!("{text:?}: {reason}; expected RFC 3339 (2026-12-01T00:00:00Z) or Unix milliseconds")
    };
    let (local, offset_seconds) = split_utc_offset(text).ok_or_else(|| invalid(&"no time zone offset"))?;
    let time = humantime::parse_rfc3339(&format!("{local}Z")).map_err(|e| invalid(&e))?;
    let utc_ms = i128::try_from(time.duration_since(UNIX_EPOCH).map_err(|e| invalid(&e))?.as_millis())
        .map_err(|e| invalid(&e))?
        - i128::from(offset_seconds) * 1_000;
    u64::try_from(utc_ms).map_err(|_| invalid(&"before 1970"))
}

/// `2026-12-01T01:00:00+01:00` → (`2026-12-01T01:00:00`, 3600). `Z` and `z` are offset 0.
fn split_utc_offset(text: &str) -> Option<(&str, i64)> {
    if let Some(local) = text.strip_suffix(['Z', 'z']) {
        return Some((local, 0));
    }
    let split = text.len().checked_sub("+00:00".len())?;
    let (local, offset) = (text.get(..split)?, text.get(split..)?);
    let sign = match offset.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (hours, minutes) = offset[1..].split_once(':')?;
    let (hours, minutes): (i64, i64) = (hours.parse().ok()?, minutes.parse().ok()?);
    if hours > 23 || minutes > 59 || !(local.contains('T') || local.contains(' ')) {
        return None;
    }
    Some((local, sign * (hours * 3_600 + minutes * 60)))
}

/// The address as given, or `host:port` (`DEFAULT_SERVER` without `--server`) with the scheme put in
/// front: `https://` when calling over TLS (`--tls-ca`), `http://` otherwise. A scheme given with
/// `--server` that disagrees with the TLS options is refused rather than failing later with a
/// transport error.
pub fn server_uri(server: Option<&str>, tls: bool) -> Result<String, String> {
    let server = server.unwrap_or(DEFAULT_SERVER);
    let scheme = if tls { "https://" } else { "http://" };
    if server.starts_with("https://") && !tls {
        return Err(format!(
            "--server {server}: TLS needs --tls-ca, the CA certificate (PEM) that signed the server's certificate"
        ));
    }
    if server.starts_with("http://") && tls {
        return Err(format!("--server {server}: --tls-ca calls over TLS, at an https:// address"));
    }
    let uri = if server.contains("://") { server.to_owned() } else { format!("{scheme}{server}") };
    match uri.parse::<tonic::transport::Uri>() {
        Ok(parsed) if parsed.host().is_some() => Ok(uri),
        _ => Err(format!("--server {server}: not a server address (expected http://host:port)")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<AdminArgs, clap::Error> {
        AdminArgs::try_parse_from(std::iter::once("quotad admin").chain(args.iter().copied()))
    }

    #[test]
    fn the_token_is_never_in_a_debug_of_the_arguments() {
        let args = parse(&["--token", "s3cret-admin-token", "tenant", "acme"]).unwrap();
        let printed = format!("{args:?}");
        assert!(!printed.contains("s3cret-admin-token"), "{printed}");
        assert!(printed.contains("<hidden>"), "{printed}");
    }

    #[test]
    fn rates_parse_as_scenario_messages_per() {
        let rate = parse_rate("agent_flow_actions=13/100").unwrap();
        assert_eq!((rate.scenario.as_str(), rate.messages, rate.per), ("agent_flow_actions", 13, 100));
        for bad in ["agent_flow_actions", "x=13", "x=a/100", "=1/1", "x=1/-1"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn effective_times_parse_from_rfc3339_with_offsets_or_unix_ms() {
        const DEC_1_2026_MS: u64 = 1_796_083_200_000;
        assert_eq!(parse_effective_at("2026-12-01T00:00:00Z"), Ok(DEC_1_2026_MS));
        assert_eq!(parse_effective_at("2026-12-01T01:00:00+01:00"), Ok(DEC_1_2026_MS));
        assert_eq!(parse_effective_at("2026-11-30T19:30:00-04:30"), Ok(DEC_1_2026_MS));
        assert_eq!(parse_effective_at("2026-12-01T00:00:00.250Z"), Ok(DEC_1_2026_MS + 250));
        assert_eq!(parse_effective_at("1796083200000"), Ok(DEC_1_2026_MS));
        for bad in ["2026-12-01T00:00:00", "2026-12-01", "tomorrow", "2026-13-01T00:00:00Z", "", "1e3"] {
            assert!(parse_effective_at(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn servers_get_the_scheme_that_fits_the_tls_options() {
        assert_eq!(server_uri(Some("127.0.0.1:50051"), false).unwrap(), "http://127.0.0.1:50051");
        assert_eq!(server_uri(Some("127.0.0.1:50051"), true).unwrap(), "https://127.0.0.1:50051");
        assert_eq!(server_uri(Some("http://quotad.internal:50051"), false).unwrap(), "http://quotad.internal:50051");
        assert_eq!(server_uri(Some("https://quotad.internal"), true).unwrap(), "https://quotad.internal");
        assert!(server_uri(Some("https://quotad.internal"), false).unwrap_err().contains("--tls-ca"));
        assert!(server_uri(Some("http://quotad.internal"), true).unwrap_err().contains("https://"));
        assert!(server_uri(Some("http://"), false).is_err());
    }

    #[test]
    fn the_default_server_follows_the_tls_flags_and_a_given_one_must_agree() {
        let server = |args: &[&str], tls: bool| server_uri(parse(args).unwrap().global.server.as_deref(), tls);
        assert_eq!(server(&["balance", "e"], false).unwrap(), "http://127.0.0.1:50051");
        assert_eq!(server(&["--tls-ca", "ca.pem", "balance", "e"], true).unwrap(), "https://127.0.0.1:50051");
        let explicit = server(&["--tls-ca", "ca.pem", "--server", "http://127.0.0.1:50051", "balance", "e"], true);
        assert!(explicit.unwrap_err().starts_with("--server http://127.0.0.1:50051: --tls-ca calls over TLS"));
    }

    #[test]
    fn the_paging_flags_are_the_same_in_each_listing_but_for_what_a_page_holds() {
        let args = parse(&["reservations", "--environment", "e", "--page-size", "5", "--page-token", "t"]).unwrap();
        let Command::Reservations(reservations) = args.command else { panic!("not reservations") };
        assert_eq!((reservations.page.page_size, reservations.page.page_token.as_str()), (5, "t"));
        assert!(!reservations.page.all);
        let args = parse(&["api-key", "list", "--tenant", "acme", "--all"]).unwrap();
        let Command::ApiKey(ApiKeyCommand::List(keys)) = args.command else { panic!("not api-key list") };
        assert!(keys.page.all && keys.page.page_size == 0 && keys.page.page_token.is_empty());
        let command = AdminArgs::command();
        let help = |path: &[&str]| {
            let listing = path.iter().fold(&command, |command, name| command.find_subcommand(name).unwrap());
            listing.get_arguments().find(|arg| arg.get_id() == "page_size").unwrap().get_help().unwrap().to_string()
        };
        assert_eq!(help(&["reservations"]), "Holds per page, 1 to 1,000; 0 = 100, or 1,000 with `--all`");
        assert_eq!(help(&["api-key", "list"]), "Keys per page, 1 to 1,000; 0 = 100, or 1,000 with `--all`");
    }

    #[test]
    fn global_flags_have_defaults_and_go_anywhere() {
        let args = parse(&["balance", "acme-prod"]).unwrap();
        assert_eq!(args.global.server, None);
        assert_eq!(args.global.timeout, Duration::from_secs(10));
        assert_eq!(args.global.format, Format::Table);
        assert!(args.global.token.is_none());
        let args = parse(&["balance", "acme-prod", "--format", "csv", "--timeout", "250ms"]).unwrap();
        assert_eq!((args.global.format, args.global.timeout), (Format::Csv, Duration::from_millis(250)));
        assert!(parse(&["--timeout", "0s", "balance", "x"]).is_err());
        assert!(parse(&["--timeout", "2h", "balance", "x"]).is_err());
    }

    #[test]
    fn link_needs_a_target_or_unlink_but_not_both() {
        assert!(parse(&["link", "--app-environment-id", "app"]).is_err());
        assert!(parse(&["link", "--app-environment-id", "app", "--environment-id", "e", "--unlink"]).is_err());
        assert!(parse(&["link", "--app-environment-id", "app", "--unlink"]).is_ok());
        assert!(parse(&["link", "--app-environment", "app", "--environment", "e"]).is_ok());
    }

    #[test]
    fn group_by_and_repeated_values_parse() {
        let args = parse(&["usage", "--tenant", "acme", "--group-by", "environment,day"]).unwrap();
        let Command::Usage(usage) = args.command else { panic!("not usage") };
        assert_eq!(usage.group_by, [GroupBy::Environment, GroupBy::Day]);
        assert!(parse(&["usage", "--tenant", "acme", "--group-by", "week"]).is_err());
        let args = parse(&["set-rate-card", "--rate", "a=1/1", "--rate", "b=13/100"]).unwrap();
        let Command::SetRateCard(card) = args.command else { panic!("not set-rate-card") };
        assert_eq!(card.rates.len(), 2);
        assert!(parse(&["set-payg", "--environment", "e"]).is_err(), "--enabled is required");
        let args = parse(&["rate-card", "--version", "3"]).unwrap();
        let Command::RateCard(card) = args.command else { panic!("not rate-card") };
        assert_eq!(card.card_version, 3);
    }

    #[test]
    fn api_key_commands_parse() {
        let args = parse(&["api-key", "create", "--tenant", "acme", "--environment", "acme-prod,acme-app"]).unwrap();
        let Command::ApiKey(ApiKeyCommand::Create(create)) = args.command else { panic!("not api-key create") };
        assert_eq!(create.environment_id, ["acme-prod", "acme-app"]);
        assert!(parse(&["api-key", "create"]).is_err(), "--tenant-id is required");
        let args = parse(&["api-key", "revoke", "0123456789abcdef"]).unwrap();
        assert!(matches!(args.command, Command::ApiKey(ApiKeyCommand::Revoke(r)) if r.key_id == "0123456789abcdef"));
        assert!(parse(&["api-key", "list", "--tenant-id", "acme", "--all"]).is_ok());
        assert!(parse(&["api-key", "rotate"]).is_err());
    }

    #[test]
    fn the_exit_codes_are_in_the_help() {
        let help = parse(&["--help"]).unwrap_err().to_string();
        assert!(help.contains("Exit codes") && help.contains("69"), "{help}");
    }
}
