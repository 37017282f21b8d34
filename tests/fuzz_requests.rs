//! Fuzz targets for request validation and pricing, through the real gRPC layer: every case starts a
//! server (in-process, on a loopback port) and sends it a sequence of calls.
//!
//! - Arbitrary request messages for every method: ids empty, at and over their length limit, huge,
//!   non-ASCII or with control characters; numbers at 0, 1, their limits and `u64::MAX`; lists at and
//!   over their limits; enum values out of range; batches of such reservations, commits and releases,
//!   empty, of a few items, and around the limit of 1,000.
//! - Arbitrary bytes as the protobuf body of every unary method, and valid bodies damaged.
//! - Rate cards with arbitrary scenarios and rates, then reservations and commits priced with them.
//!
//! After every call the server must still answer a health check, and after every case a known-good
//! reservation; every refusal, a batch item's included, must carry a client-error code with a
//! `BadRequest` naming the field or an `ErrorInfo` giving a reason (never INTERNAL or UNKNOWN), and change
//! nothing the admin and quota calls show (a batch: when every item is refused); and a price must be
//! exactly what the rate card says, or a refusal when it is too large.

mod common;
mod fuzzing;

use std::{collections::BTreeMap, fmt::Debug};

use bytes::{Buf, BufMut};
use common::{ItemError, START_MS, TestServer, spawn_server_with};
use fuzzing::{At, Mutation, at};
use http::uri::PathAndQuery;
use proptest::{prelude::*, test_runner::TestCaseError};
use prost::Message;
use quotad::{
    clock::Clock,
    config::{BootstrapEnvironment, BootstrapTenant, Settings},
    proto::{
        AllocateCapacityRequest, Balance, CheckAndReserveBatchRequest, CheckAndReserveRequest, CommitBatchRequest,
        CommitRequest, GetBalanceRequest, GetRateCardRequest, GetTenantRequest, GetUsageRequest,
        LinkEnvironmentRequest, ListAgentLimitsRequest, ListAgentLimitsResponse, ListAlertsRequest,
        ListReservationsRequest, ListReservationsResponse, PurchaseCapacityRequest, RateCard, ReleaseAllRequest,
        ReleaseBatchRequest, ReleaseRequest, ScenarioRate, SetAgentLimitRequest, SetEnvironmentAlertsRequest,
        SetPayAsYouGoRequest, SetRateCardRequest, SetTenantPolicyRequest, TenantCapacity, UsageItem,
        WatchAlertsRequest,
    },
};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_types::StatusExt;

/// Every code a refusal of bad input may carry: the client's mistake or the state it asked about.
const CLIENT_ERRORS: [Code; 7] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::OutOfRange,
    Code::PermissionDenied,
    Code::AlreadyExists,
];

/// The request size limit of the servers the cases run (the default).
const MAX_REQUEST_BYTES: usize = quotad::config::DEFAULT_MAX_REQUEST_BYTES;
/// Open holds one environment may have, small so that cases reach it.
const MAX_OPEN_PER_ENVIRONMENT: u64 = 8;

fn long_id(first: char, len: usize) -> String {
    std::iter::once(first).chain(std::iter::repeat_n('x', len - 1)).collect()
}

/// Tenants the bootstrap creates, one at the id length limit, and one it does not.
fn tenant_ids() -> Vec<String> {
    vec!["t0".into(), "t1".into(), long_id('t', 128), "nobody".into()]
}

/// Capacity environments the bootstrap creates (one at the id length limit), its app environment, an
/// environment no tenant has, and the probe the fuzzed calls never name.
fn env_ids() -> Vec<String> {
    vec!["e0".into(), "e1".into(), long_id('e', 128), "app0".into(), "ghost".into()]
}

const PROBE_ENV: &str = "probe";

fn agent_ids() -> Vec<String> {
    vec!["a0".into(), "a1".into(), long_id('a', 128)]
}

/// Two tenants: `t0` with `e0` (allocation only), `e1` (allocation, pool, uncapped pay-as-you-go, and
/// the app environment `app0`) and the probe; the long tenant with the long environment.
fn settings() -> Settings {
    let env = |id: &str, messages, pool, payg, apps: &[&str]| BootstrapEnvironment {
        id: id.into(),
        messages,
        draw_from_tenant_pool: pool,
        payg_enabled: payg,
        payg_budget_messages: 0,
        apps: apps.iter().map(|app| (*app).into()).collect(),
    };
    let ids = tenant_ids();
    let envs = env_ids();
    Settings {
        max_open_reservations_per_environment: MAX_OPEN_PER_ENVIRONMENT,
        max_agents_per_environment: 2,
        max_alert_watches: 2,
        max_rate_card_versions: 4,
        bootstrap: vec![
            BootstrapTenant {
                id: ids[0].clone(),
                packs: 4,
                environments: vec![
                    env(&envs[0], 50_000, false, false, &[]),
                    env(&envs[1], 10_000, true, true, &["app0"]),
                    env(PROBE_ENV, 0, false, true, &[]),
                ],
            },
            BootstrapTenant {
                id: ids[2].clone(),
                packs: 1,
                environments: vec![env(&envs[2], 1_000, false, false, &[])],
            },
        ],
        ..Settings::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Field strategies.

/// Any string a client could send in an id field: a known id most often, else empty, at and past the
/// length limit, printable ASCII with spaces, arbitrary Unicode with control characters, or huge.
fn text(known: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(known),
        1 => Just(String::new()),
        1 => Just(long_id('x', 128)),
        1 => Just(long_id('x', 129)),
        1 => "[ -~]{0,140}",
        2 => any::<String>(),
        1 => proptest::collection::vec(prop_oneof![Just('\0'), Just('\n'), Just('\u{7f}'), Just('é'), Just('/')], 1..8)
            .prop_map(|chars| chars.into_iter().collect()),
        1 => (1_000..80_000usize).prop_map(|len| long_id('h', len)),
    ]
}

fn tenant() -> impl Strategy<Value = String> {
    text(tenant_ids())
}
fn environment() -> impl Strategy<Value = String> {
    text(env_ids())
}
fn agent() -> impl Strategy<Value = String> {
    text(agent_ids())
}
/// Optional ids (idempotency keys, filters): empty as often as set.
fn optional(strategy: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), strategy]
}

/// A reservation id: one the case was granted, picked when it is sent, or a string that looks like one.
#[derive(Debug, Clone)]
enum ReservationPick {
    Granted(At),
    Text(String),
}

fn reservation() -> impl Strategy<Value = ReservationPick> {
    let looks_like = prop_oneof![
        Just("e0/0".to_owned()),
        Just("e0/007".to_owned()),
        Just(format!("e0/{}", u64::MAX)),
        Just("e0/18446744073709551616".to_owned()),
        Just(format!("{}/1", long_id('e', 128))),
        Just(format!("{}/{}", long_id('e', 128), u64::MAX)),
        Just(format!("{}/1", long_id('e', 129))),
        (proptest::sample::select(env_ids()), any::<u64>()).prop_map(|(env, seq)| format!("{env}/{seq}")),
        text(Vec::from(["app0/1".to_owned()])),
    ];
    prop_oneof![3 => at().prop_map(ReservationPick::Granted), 1 => looks_like.prop_map(ReservationPick::Text)]
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0u64),
        2 => Just(1u64),
        4 => 2..=1_000u64,
        1 => Just(999_999_999u64),
        1 => Just(1_000_000_000u64),
        1 => Just(1_000_000_001u64),
        1 => Just(1_000_000u64),
        1 => Just(1_000_001u64),
        1 => Just(1_000_000_000_000u64),
        1 => Just(1_000_000_000_001u64),
        1 => Just(u64::MAX / 1_000),
        1 => Just(u64::MAX / 1_000 + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(0u32),
        2 => Just(1u32),
        2 => 2..=200u32,
        1 => Just(100u32),
        1 => Just(101u32),
        1 => Just(1_000u32),
        1 => Just(1_001u32),
        1 => Just(3_600u32),
        1 => Just(3_601u32),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

/// Enum values: each defined one, and values out of range.
fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0..=6i32, 1 => Just(-1), 1 => Just(i32::MIN), 1 => Just(i32::MAX), 1 => any::<i32>()]
}

fn scenario() -> impl Strategy<Value = String> {
    let known = ["classic_answer", "agent_flow_actions", "messages", "nope"].map(String::from).to_vec();
    text(known)
}

/// Usage item lists: none, a few, and at and over the limit of 64.
fn usage() -> impl Strategy<Value = Vec<UsageItem>> {
    let item = (scenario(), edge_u64()).prop_map(|(scenario, quantity)| UsageItem { scenario, quantity });
    prop_oneof![
        3 => Just(Vec::new()),
        3 => proptest::collection::vec(item, 1..=3),
        1 => (63..=65usize).prop_map(|n| vec![UsageItem { scenario: "classic_answer".into(), quantity: 1 }; n]),
    ]
}

fn scenario_rates() -> impl Strategy<Value = Vec<ScenarioRate>> {
    let rate = (scenario(), edge_u64(), edge_u64()).prop_map(|(scenario, messages, per)| ScenarioRate {
        scenario,
        messages,
        per,
    });
    let full = (255..=257usize)
        .prop_map(|n| (0..n).map(|i| ScenarioRate { scenario: format!("s{i}"), messages: 1, per: 1 }).collect());
    prop_oneof![1 => Just(Vec::new()), 6 => proptest::collection::vec(rate, 1..=4), 1 => full]
}

// ---------------------------------------------------------------------------------------------------
// Calls.

/// One call of the contract, with every field as generated.
#[derive(Debug, Clone)]
enum Call {
    Reserve(CheckAndReserveRequest),
    Commit { reservation: ReservationPick, messages: Option<u64>, usage: Vec<UsageItem> },
    Release(ReservationPick),
    Balance(GetBalanceRequest),
    Purchase(PurchaseCapacityRequest),
    Allocate(AllocateCapacityRequest),
    PayAsYouGo(SetPayAsYouGoRequest),
    Link(LinkEnvironmentRequest),
    Tenant(GetTenantRequest),
    TenantPolicy(SetTenantPolicyRequest),
    EnvironmentAlerts(SetEnvironmentAlertsRequest),
    AgentLimit(SetAgentLimitRequest),
    AgentLimits(ListAgentLimitsRequest),
    Usage(GetUsageRequest),
    GetRateCard(GetRateCardRequest),
    SetRateCard(SetRateCardRequest),
    ListReservations(ListReservationsRequest),
    ReleaseAll(ReleaseAllRequest),
    Alerts(ListAlertsRequest),
    WatchAlerts(WatchAlertsRequest),
    ReserveBatch(Vec<CheckAndReserveRequest>),
    CommitBatch(Vec<CommitItem>),
    ReleaseBatch(Vec<ReservationPick>),
}

/// A commit as generated: the reservation it names, and its use.
#[derive(Debug, Clone)]
struct CommitItem {
    reservation: ReservationPick,
    messages: Option<u64>,
    usage: Vec<UsageItem>,
}

/// Reservation requests: any field anything, or well-formed (so that cases reach holds, caps and
/// settled reservations).
fn reserve_request() -> BoxedStrategy<CheckAndReserveRequest> {
    let arbitrary = (
        (environment(), agent(), proptest::option::of(edge_u64()), usage()),
        (optional(text(vec!["k0".into(), long_id('k', 128)])), edge_u32(), any::<bool>()),
    )
        .prop_map(|((environment_id, agent_id, messages, usage), (idempotency_key, ttl_seconds, dry_run))| {
            CheckAndReserveRequest { environment_id, agent_id, messages, usage, idempotency_key, ttl_seconds, dry_run }
        });
    prop_oneof![4 => arbitrary, 3 => plausible_reserve_request()].boxed()
}

fn plausible_usage() -> impl Strategy<Value = (Option<u64>, Vec<UsageItem>)> {
    prop_oneof![
        (1..=200u64).prop_map(|m| (Some(m), Vec::new())),
        (proptest::sample::select(&["classic_answer", "agent_flow_actions"][..]), 1..=50u64)
            .prop_map(|(scenario, quantity)| (None, vec![UsageItem { scenario: scenario.into(), quantity }])),
    ]
}

fn plausible_reserve_request() -> BoxedStrategy<CheckAndReserveRequest> {
    (
        proptest::sample::select(env_ids()),
        proptest::sample::select(agent_ids()),
        plausible_usage(),
        prop_oneof![Just(String::new()), Just("k0".to_owned())],
        prop_oneof![Just(0u32), Just(1), Just(3_600)],
    )
        .prop_map(|(environment_id, agent_id, (messages, usage), idempotency_key, ttl_seconds)| {
            CheckAndReserveRequest {
                environment_id,
                agent_id,
                messages,
                usage,
                idempotency_key,
                ttl_seconds,
                dry_run: false,
            }
        })
        .boxed()
}

/// Commits: of a granted reservation with plausible use, or of anything with any use.
fn commit_item() -> BoxedStrategy<CommitItem> {
    let plausible = (at(), plausible_usage()).prop_map(|(pick, (messages, usage))| CommitItem {
        reservation: ReservationPick::Granted(pick),
        messages,
        usage,
    });
    let arbitrary = (reservation(), proptest::option::of(edge_u64()), usage())
        .prop_map(|(reservation, messages, usage)| CommitItem { reservation, messages, usage });
    prop_oneof![2 => plausible, 3 => arbitrary].boxed()
}

/// The items of a batch call: a few most often, else none, or around the limit of 1,000 (copies of one
/// small item, so that the request stays within the size limit and the case within memory).
fn batch<T: Clone + Debug + 'static>(
    item: BoxedStrategy<T>,
    small_item: BoxedStrategy<T>,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        8 => proptest::collection::vec(item, 1..=6),
        1 => Just(Vec::new()),
        1 => (small_item, 999..=1_001usize).prop_map(|(item, n)| vec![item; n]),
    ]
}

fn quota_call() -> BoxedStrategy<Call> {
    let granted_commit = (at(), plausible_usage()).prop_map(|(pick, (messages, usage))| CommitItem {
        reservation: ReservationPick::Granted(pick),
        messages,
        usage,
    });
    let granted_release = at().prop_map(ReservationPick::Granted).boxed();
    prop_oneof![
        4 => reserve_request().prop_map(Call::Reserve),
        3 => plausible_reserve_request().prop_map(Call::Reserve),
        5 => commit_item().prop_map(|CommitItem { reservation, messages, usage }| Call::Commit { reservation, messages, usage }),
        2 => reservation().prop_map(Call::Release),
        1 => environment().prop_map(|environment_id| Call::Balance(GetBalanceRequest { environment_id })),
        2 => batch(reserve_request(), plausible_reserve_request()).prop_map(Call::ReserveBatch),
        1 => batch(commit_item(), granted_commit.boxed()).prop_map(Call::CommitBatch),
        1 => batch(reservation().boxed(), granted_release).prop_map(Call::ReleaseBatch),
    ]
    .boxed()
}

fn admin_call() -> BoxedStrategy<Call> {
    prop_oneof![
        (tenant(), edge_u64(), optional(text(vec!["k0".into()]))).prop_map(|(tenant_id, packs, idempotency_key)| {
            Call::Purchase(PurchaseCapacityRequest { tenant_id, packs, idempotency_key })
        }),
        (tenant(), environment(), edge_u64(), any::<bool>()).prop_map(
            |(tenant_id, environment_id, messages, draw_from_tenant_pool)| {
                Call::Allocate(AllocateCapacityRequest { tenant_id, environment_id, messages, draw_from_tenant_pool })
            }
        ),
        (environment(), any::<bool>(), edge_u64()).prop_map(|(environment_id, enabled, monthly_budget_messages)| {
            Call::PayAsYouGo(SetPayAsYouGoRequest { environment_id, enabled, monthly_budget_messages })
        }),
        (environment(), optional(environment())).prop_map(|(app_environment_id, environment_id)| {
            Call::Link(LinkEnvironmentRequest { app_environment_id, environment_id })
        }),
        tenant().prop_map(|tenant_id| Call::Tenant(GetTenantRequest { tenant_id })),
        (tenant(), edge_u32(), optional(text(["Europe/Paris", "UTC", "Mars/Base", "utc"].map(String::from).to_vec())))
            .prop_map(|(tenant_id, overage_grace_percent, time_zone)| {
                Call::TenantPolicy(SetTenantPolicyRequest { tenant_id, overage_grace_percent, time_zone })
            }),
        (environment(), edge_u32(), proptest::collection::vec(edge_u32(), 0..=5)).prop_map(
            |(environment_id, low_percent, budget_threshold_percents)| {
                Call::EnvironmentAlerts(SetEnvironmentAlertsRequest {
                    environment_id,
                    low_percent,
                    budget_threshold_percents,
                })
            }
        ),
        ((environment(), agent(), edge_u64()), (edge_u32(), any::<bool>(), any::<bool>())).prop_map(
            |((environment_id, agent_id, monthly_limit_messages), (notify_percent, stop_when_exceeded, disabled))| {
                Call::AgentLimit(SetAgentLimitRequest {
                    environment_id,
                    agent_id,
                    monthly_limit_messages,
                    notify_percent,
                    stop_when_exceeded,
                    disabled,
                })
            }
        ),
        environment().prop_map(|environment_id| Call::AgentLimits(ListAgentLimitsRequest { environment_id })),
        (
            (tenant(), optional(environment()), optional(agent())),
            (
                optional(text(vec!["2026-11-01".into(), "2026-13-01".into(), "2025-01-01".into()])),
                optional(text(vec!["2026-11-15".into(), "2026-11-14".into()])),
                proptest::collection::vec(enum_value(), 0..=7)
            ),
        )
            .prop_map(|((tenant_id, environment_id, agent_id), (from, to, group_by))| {
                Call::Usage(GetUsageRequest { tenant_id, environment_id, agent_id, from, to, group_by })
            }),
        edge_u32().prop_map(|version| Call::GetRateCard(GetRateCardRequest { version })),
        (scenario_rates(), prop_oneof![Just(0u64), Just(START_MS), Just(START_MS - 1), edge_u64()]).prop_map(
            |(rates, effective_at_unix_ms)| Call::SetRateCard(SetRateCardRequest { rates, effective_at_unix_ms })
        ),
        (environment(), optional(agent()), edge_u32(), optional(text(vec!["1".into(), "18446744073709551616".into()])))
            .prop_map(|(environment_id, agent_id, page_size, page_token)| {
                Call::ListReservations(ListReservationsRequest { environment_id, agent_id, page_size, page_token })
            }),
        (environment(), optional(agent()))
            .prop_map(|(environment_id, agent_id)| Call::ReleaseAll(ReleaseAllRequest { environment_id, agent_id })),
        (tenant(), optional(environment()), edge_u32()).prop_map(|(tenant_id, environment_id, page_size)| {
            Call::Alerts(ListAlertsRequest { tenant_id, environment_id, page_size })
        }),
        (tenant(), optional(environment())).prop_map(|(tenant_id, environment_id)| Call::WatchAlerts(
            WatchAlertsRequest { tenant_id, environment_id }
        )),
    ]
    .boxed()
}

/// Boxed, as its parts are: the unboxed strategy types are large enough to overflow a test thread's
/// stack in debug builds.
fn call() -> BoxedStrategy<Call> {
    prop_oneof![3 => quota_call(), 2 => admin_call()].boxed()
}

/// A case's calls, with the reservations it was granted, for the calls that name one.
struct Session<'a> {
    server: &'a TestServer,
    granted: Vec<String>,
    /// What the server shows now. Only the case's calls change it: the clock stands still, so no hold
    /// expires.
    current: Visible,
}

impl<'a> Session<'a> {
    async fn new(server: &'a TestServer) -> Self {
        Self { server, granted: Vec::new(), current: visible(server).await }
    }

    fn reservation(&self, pick: &ReservationPick) -> String {
        match pick {
            ReservationPick::Granted(at) if !self.granted.is_empty() => at.get(&self.granted).clone(),
            ReservationPick::Granted(_) => "e0/1".into(),
            ReservationPick::Text(text) => text.clone(),
        }
    }

    fn commit_request(&self, item: &CommitItem) -> CommitRequest {
        CommitRequest {
            reservation_id: self.reservation(&item.reservation),
            messages: item.messages,
            usage: item.usage.clone(),
        }
    }

    fn commit_batch(&self, items: &[CommitItem]) -> CommitBatchRequest {
        CommitBatchRequest { items: items.iter().map(|item| self.commit_request(item)).collect() }
    }

    fn release_batch(&self, picks: &[ReservationPick]) -> ReleaseBatchRequest {
        let release = |pick| ReleaseRequest { reservation_id: self.reservation(pick) };
        ReleaseBatchRequest { items: picks.iter().map(release).collect() }
    }

    /// The request as sent, and its protobuf size (what the server's size limit applies to).
    fn encoded_len(&self, call: &Call) -> usize {
        match call {
            Call::Reserve(r) => r.encoded_len(),
            Call::Commit { reservation, messages, usage } => CommitRequest {
                reservation_id: self.reservation(reservation),
                messages: *messages,
                usage: usage.clone(),
            }
            .encoded_len(),
            Call::Release(pick) => ReleaseRequest { reservation_id: self.reservation(pick) }.encoded_len(),
            Call::Balance(r) => r.encoded_len(),
            Call::Purchase(r) => r.encoded_len(),
            Call::Allocate(r) => r.encoded_len(),
            Call::PayAsYouGo(r) => r.encoded_len(),
            Call::Link(r) => r.encoded_len(),
            Call::Tenant(r) => r.encoded_len(),
            Call::TenantPolicy(r) => r.encoded_len(),
            Call::EnvironmentAlerts(r) => r.encoded_len(),
            Call::AgentLimit(r) => r.encoded_len(),
            Call::AgentLimits(r) => r.encoded_len(),
            Call::Usage(r) => r.encoded_len(),
            Call::GetRateCard(r) => r.encoded_len(),
            Call::SetRateCard(r) => r.encoded_len(),
            Call::ListReservations(r) => r.encoded_len(),
            Call::ReleaseAll(r) => r.encoded_len(),
            Call::Alerts(r) => r.encoded_len(),
            Call::WatchAlerts(r) => r.encoded_len(),
            Call::ReserveBatch(items) => CheckAndReserveBatchRequest { items: items.clone() }.encoded_len(),
            Call::CommitBatch(items) => self.commit_batch(items).encoded_len(),
            Call::ReleaseBatch(picks) => self.release_batch(picks).encoded_len(),
        }
    }

    /// Sends `call`; notes the reservations it was granted, if any. A batch call answers the items it
    /// refused.
    async fn send(&mut self, call: &Call) -> Result<Vec<ItemError>, Status> {
        let mut quota = self.server.quota.clone();
        let mut admin = self.server.admin.clone();
        fn ok<T>(_: T) -> Vec<ItemError> {
            Vec::new()
        }
        match call.clone() {
            Call::Reserve(r) => {
                let granted = quota.check_and_reserve(r).await?.into_inner();
                if !granted.reservation_id.is_empty() {
                    self.granted.push(granted.reservation_id);
                }
                Ok(Vec::new())
            }
            Call::ReserveBatch(items) => {
                use quotad::proto::check_and_reserve_result::Outcome;
                let results = quota.check_and_reserve_batch(CheckAndReserveBatchRequest { items }).await?;
                let mut refused = Vec::new();
                for result in results.into_inner().results {
                    match result.outcome {
                        Some(Outcome::Ok(granted)) if !granted.reservation_id.is_empty() => {
                            self.granted.push(granted.reservation_id)
                        }
                        Some(Outcome::Ok(_)) => {}
                        Some(Outcome::Error(error)) => refused.push(error),
                        None => panic!("a result without an outcome"),
                    }
                }
                Ok(refused)
            }
            Call::CommitBatch(items) => {
                use quotad::proto::commit_result::Outcome;
                let results = quota.commit_batch(self.commit_batch(&items)).await?.into_inner().results;
                let refused = results.into_iter().filter_map(|result| match result.outcome {
                    Some(Outcome::Ok(_)) => None,
                    Some(Outcome::Error(error)) => Some(error),
                    None => panic!("a result without an outcome"),
                });
                Ok(refused.collect())
            }
            Call::ReleaseBatch(picks) => {
                use quotad::proto::release_result::Outcome;
                let results = quota.release_batch(self.release_batch(&picks)).await?.into_inner().results;
                let refused = results.into_iter().filter_map(|result| match result.outcome {
                    Some(Outcome::Ok(_)) => None,
                    Some(Outcome::Error(error)) => Some(error),
                    None => panic!("a result without an outcome"),
                });
                Ok(refused.collect())
            }
            Call::Commit { reservation, messages, usage } => {
                let request = CommitRequest { reservation_id: self.reservation(&reservation), messages, usage };
                quota.commit(request).await.map(ok)
            }
            Call::Release(pick) => {
                quota.release(ReleaseRequest { reservation_id: self.reservation(&pick) }).await.map(ok)
            }
            Call::Balance(r) => quota.get_balance(r).await.map(ok),
            Call::Purchase(r) => admin.purchase_capacity(r).await.map(ok),
            Call::Allocate(r) => admin.allocate_capacity(r).await.map(ok),
            Call::PayAsYouGo(r) => admin.set_pay_as_you_go(r).await.map(ok),
            Call::Link(r) => admin.link_environment(r).await.map(ok),
            Call::Tenant(r) => admin.get_tenant(r).await.map(ok),
            Call::TenantPolicy(r) => admin.set_tenant_policy(r).await.map(ok),
            Call::EnvironmentAlerts(r) => admin.set_environment_alerts(r).await.map(ok),
            Call::AgentLimit(r) => admin.set_agent_limit(r).await.map(ok),
            Call::AgentLimits(r) => admin.list_agent_limits(r).await.map(ok),
            Call::Usage(r) => admin.get_usage(r).await.map(ok),
            Call::GetRateCard(r) => admin.get_rate_card(r).await.map(ok),
            Call::SetRateCard(r) => admin.set_rate_card(r).await.map(ok),
            Call::ListReservations(r) => admin.list_reservations(r).await.map(ok),
            Call::ReleaseAll(r) => admin.release_all(r).await.map(ok),
            Call::Alerts(r) => admin.list_alerts(r).await.map(ok),
            // The stream ends when it is dropped; its first answer is what validation decided.
            Call::WatchAlerts(r) => admin.watch_alerts(r).await.map(ok),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// What every case checks.

/// What the quota and admin calls show of every known tenant and environment: a refused call must
/// leave all of it as it was.
#[derive(Debug, PartialEq)]
struct Visible {
    tenants: Vec<Result<TenantCapacity, Code>>,
    balances: Vec<Result<Balance, Code>>,
    holds: Vec<Result<ListReservationsResponse, Code>>,
    agents: Vec<Result<ListAgentLimitsResponse, Code>>,
    rate_card: Result<RateCard, Code>,
}

async fn visible(server: &TestServer) -> Visible {
    let mut admin = server.admin.clone();
    let mut tenants = Vec::new();
    for tenant_id in tenant_ids() {
        tenants.push(server.try_tenant(&tenant_id).await.map_err(|s| s.code()));
    }
    let (mut balances, mut holds, mut agents) = (Vec::new(), Vec::new(), Vec::new());
    for environment_id in env_ids().into_iter().chain([PROBE_ENV.to_owned()]) {
        balances.push(server.try_balance(&environment_id).await.map_err(|s| s.code()));
        let request =
            ListReservationsRequest { environment_id: environment_id.clone(), page_size: 1_000, ..Default::default() };
        holds.push(admin.list_reservations(request).await.map(|r| r.into_inner()).map_err(|s| s.code()));
        let request = ListAgentLimitsRequest { environment_id };
        agents.push(admin.list_agent_limits(request).await.map(|r| r.into_inner()).map_err(|s| s.code()));
    }
    let rate_card = admin.get_rate_card(GetRateCardRequest { version: 0 }).await;
    Visible { tenants, balances, holds, agents, rate_card: rate_card.map(|r| r.into_inner()).map_err(|s| s.code()) }
}

/// A refusal of a request of `encoded_len` bytes is a client error that says why.
fn check_refusal(status: &Status, encoded_len: usize) -> Result<(), TestCaseError> {
    if encoded_len > MAX_REQUEST_BYTES {
        prop_assert_eq!(status.code(), Code::OutOfRange, "a request over the size limit: {:?}", status);
        prop_assert!(status.message().contains("too large"), "{:?}", status);
        return Ok(());
    }
    prop_assert!(CLIENT_ERRORS.contains(&status.code()), "not a client error: {:?}", status);
    if let Some(info) = status.get_details_error_info() {
        prop_assert_eq!(info.domain.as_str(), "quotad", "{:?}", status);
        prop_assert!(!info.reason.is_empty(), "{:?}", status);
        return Ok(());
    }
    let bad_request = status.get_details_bad_request();
    prop_assert!(bad_request.is_some(), "neither an ErrorInfo nor a BadRequest: {:?}", status);
    let field = &bad_request.unwrap().field_violations[0].field;
    prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
    prop_assert!(status.message().starts_with(&format!("{field}: ")), "the message names {}: {:?}", field, status);
    Ok(())
}

/// The server's health is SERVING.
async fn healthy(server: &TestServer) -> Result<(), TestCaseError> {
    let health = server.health.clone().check(HealthCheckRequest { service: String::new() }).await;
    prop_assert_eq!(health.map(|h| h.into_inner().status).map_err(|s| s.code()), Ok(ServingStatus::Serving as i32));
    Ok(())
}

/// The server still serves: health SERVING, and a reservation on the probe environment is granted and
/// released.
async fn still_serving(server: &TestServer) -> Result<(), TestCaseError> {
    healthy(server).await?;
    let reserved = server.try_reserve(common::reserve_request(PROBE_ENV, 1)).await;
    prop_assert!(reserved.is_ok(), "the known-good reservation was refused: {:?}", reserved);
    server.release(&reserved.unwrap().reservation_id).await;
    Ok(())
}

/// Fuzzes `case` with inputs from `strategy`, each case against a new server with `settings`, so that
/// every case starts from the same state and a failing one replays exactly; after each case the server
/// must still serve.
fn fuzz_on_new_servers<S>(
    strategy: S,
    settings: fn() -> Settings,
    case: impl AsyncFn(&TestServer, S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    fuzzing::fuzz(strategy, 8, |value| {
        runtime.block_on(async {
            let server = spawn_server_with(settings()).await;
            case(&server, value).await?;
            still_serving(&server).await
        })
    });
}

/// Sends `call` and checks its answer, and that the server is still healthy. A batch whose every item is
/// refused must change nothing either, and each refused item must say why as a refused call does.
async fn check_call(session: &mut Session<'_>, call: &Call) -> Result<(), TestCaseError> {
    let encoded_len = session.encoded_len(call);
    let result = session.send(call).await;
    let after = visible(session.server).await;
    match result {
        Err(status) => {
            check_refusal(&status, encoded_len)?;
            prop_assert_eq!(&session.current, &after, "{:?} was refused ({:?}) and changed the state", call, status);
        }
        Ok(refused_items) => {
            for item in &refused_items {
                check_refusal(&item_status(item), 0)?;
            }
            if !refused_items.is_empty() && refused_items.len() == call.items() {
                prop_assert_eq!(
                    &session.current,
                    &after,
                    "every item of {:?} was refused, yet the state changed",
                    call
                );
            }
        }
    }
    session.current = after;
    healthy(session.server).await
}

/// A batch item's refusal as the status a unary call carries it in.
fn item_status(item: &ItemError) -> Status {
    Status::with_details(Code::from(item.code), item.message.clone(), item.encode_to_vec().into())
}

impl Call {
    /// The items of a batch call; 0 for any other.
    fn items(&self) -> usize {
        match self {
            Call::ReserveBatch(items) => items.len(),
            Call::CommitBatch(items) => items.len(),
            Call::ReleaseBatch(picks) => picks.len(),
            _ => 0,
        }
    }
}

#[test]
fn arbitrary_requests_are_answered_or_refused_with_a_client_error_that_changes_nothing() {
    // Proves that any sequence of requests, each field anything a client could send, is answered or
    // refused with a client-error code and a BadRequest or ErrorInfo saying why, that a refusal changes
    // nothing the quota and admin calls show, and that the server keeps serving.
    fuzz_on_new_servers(proptest::collection::vec(call(), 1..=12), settings, async |server, calls| {
        let mut session = Session::new(server).await;
        for call in &calls {
            check_call(&mut session, call).await?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// Arbitrary bytes as request bodies.

/// Sends and receives message bodies as they are, so that a test can send any bytes as a request.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Whether `bytes` decode as the request message `M`.
fn decodes<M: Message + Default>(bytes: &[u8]) -> bool {
    M::decode(bytes).is_ok()
}

/// Every unary method: its path, its request message's name, and whether bytes decode as that message.
type Method = (&'static str, &'static str, fn(&[u8]) -> bool);

const METHODS: [Method; 22] = [
    ("/quota.v1.Quota/CheckAndReserve", "CheckAndReserveRequest", decodes::<CheckAndReserveRequest>),
    ("/quota.v1.Quota/Commit", "CommitRequest", decodes::<CommitRequest>),
    ("/quota.v1.Quota/Release", "ReleaseRequest", decodes::<ReleaseRequest>),
    ("/quota.v1.Quota/GetBalance", "GetBalanceRequest", decodes::<GetBalanceRequest>),
    ("/quota.v1.Quota/CheckAndReserveBatch", "CheckAndReserveBatchRequest", decodes::<CheckAndReserveBatchRequest>),
    ("/quota.v1.Quota/CommitBatch", "CommitBatchRequest", decodes::<CommitBatchRequest>),
    ("/quota.v1.Quota/ReleaseBatch", "ReleaseBatchRequest", decodes::<ReleaseBatchRequest>),
    ("/quota.v1.QuotaAdmin/PurchaseCapacity", "PurchaseCapacityRequest", decodes::<PurchaseCapacityRequest>),
    ("/quota.v1.QuotaAdmin/AllocateCapacity", "AllocateCapacityRequest", decodes::<AllocateCapacityRequest>),
    ("/quota.v1.QuotaAdmin/SetPayAsYouGo", "SetPayAsYouGoRequest", decodes::<SetPayAsYouGoRequest>),
    ("/quota.v1.QuotaAdmin/LinkEnvironment", "LinkEnvironmentRequest", decodes::<LinkEnvironmentRequest>),
    ("/quota.v1.QuotaAdmin/GetTenant", "GetTenantRequest", decodes::<GetTenantRequest>),
    ("/quota.v1.QuotaAdmin/SetTenantPolicy", "SetTenantPolicyRequest", decodes::<SetTenantPolicyRequest>),
    (
        "/quota.v1.QuotaAdmin/SetEnvironmentAlerts",
        "SetEnvironmentAlertsRequest",
        decodes::<SetEnvironmentAlertsRequest>,
    ),
    ("/quota.v1.QuotaAdmin/SetAgentLimit", "SetAgentLimitRequest", decodes::<SetAgentLimitRequest>),
    ("/quota.v1.QuotaAdmin/ListAgentLimits", "ListAgentLimitsRequest", decodes::<ListAgentLimitsRequest>),
    ("/quota.v1.QuotaAdmin/GetUsage", "GetUsageRequest", decodes::<GetUsageRequest>),
    ("/quota.v1.QuotaAdmin/GetRateCard", "GetRateCardRequest", decodes::<GetRateCardRequest>),
    ("/quota.v1.QuotaAdmin/SetRateCard", "SetRateCardRequest", decodes::<SetRateCardRequest>),
    ("/quota.v1.QuotaAdmin/ListReservations", "ListReservationsRequest", decodes::<ListReservationsRequest>),
    ("/quota.v1.QuotaAdmin/ReleaseAll", "ReleaseAllRequest", decodes::<ReleaseAllRequest>),
    ("/quota.v1.QuotaAdmin/ListAlerts", "ListAlertsRequest", decodes::<ListAlertsRequest>),
];

/// A request body: arbitrary bytes, a generated request's encoding damaged, or a body of nested
/// groups as deep as the bytes allow.
#[derive(Debug, Clone)]
enum Body {
    Arbitrary { method: At, bytes: Vec<u8> },
    Damaged { call: Call, mutations: Vec<Mutation> },
    NestedGroups { method: At, depth: usize },
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        2 => (at(), proptest::collection::vec(any::<u8>(), 0..256)).prop_map(|(method, bytes)| Body::Arbitrary { method, bytes }),
        4 => (call().prop_filter("a unary call", |c| !matches!(c, Call::WatchAlerts(_))), fuzzing::mutations())
            .prop_map(|(call, mutations)| Body::Damaged { call, mutations }),
        1 => (at(), prop_oneof![1..200usize, 1_000..70_000usize]).prop_map(|(method, depth)| Body::NestedGroups { method, depth }),
    ]
}

impl Session<'_> {
    /// A call's method and encoded request.
    fn wire(&self, call: &Call) -> (Method, Vec<u8>) {
        let method = |name: &str| *METHODS.iter().find(|m| m.1 == name).expect("a unary method");
        match call {
            Call::Reserve(r) => (method("CheckAndReserveRequest"), r.encode_to_vec()),
            Call::Commit { reservation, messages, usage } => {
                let r = CommitRequest {
                    reservation_id: self.reservation(reservation),
                    messages: *messages,
                    usage: usage.clone(),
                };
                (method("CommitRequest"), r.encode_to_vec())
            }
            Call::Release(pick) => {
                (method("ReleaseRequest"), ReleaseRequest { reservation_id: self.reservation(pick) }.encode_to_vec())
            }
            Call::Balance(r) => (method("GetBalanceRequest"), r.encode_to_vec()),
            Call::Purchase(r) => (method("PurchaseCapacityRequest"), r.encode_to_vec()),
            Call::Allocate(r) => (method("AllocateCapacityRequest"), r.encode_to_vec()),
            Call::PayAsYouGo(r) => (method("SetPayAsYouGoRequest"), r.encode_to_vec()),
            Call::Link(r) => (method("LinkEnvironmentRequest"), r.encode_to_vec()),
            Call::Tenant(r) => (method("GetTenantRequest"), r.encode_to_vec()),
            Call::TenantPolicy(r) => (method("SetTenantPolicyRequest"), r.encode_to_vec()),
            Call::EnvironmentAlerts(r) => (method("SetEnvironmentAlertsRequest"), r.encode_to_vec()),
            Call::AgentLimit(r) => (method("SetAgentLimitRequest"), r.encode_to_vec()),
            Call::AgentLimits(r) => (method("ListAgentLimitsRequest"), r.encode_to_vec()),
            Call::Usage(r) => (method("GetUsageRequest"), r.encode_to_vec()),
            Call::GetRateCard(r) => (method("GetRateCardRequest"), r.encode_to_vec()),
            Call::SetRateCard(r) => (method("SetRateCardRequest"), r.encode_to_vec()),
            Call::ListReservations(r) => (method("ListReservationsRequest"), r.encode_to_vec()),
            Call::ReleaseAll(r) => (method("ReleaseAllRequest"), r.encode_to_vec()),
            Call::Alerts(r) => (method("ListAlertsRequest"), r.encode_to_vec()),
            Call::WatchAlerts(_) => unreachable!("only unary calls are sent as raw bodies"),
            Call::ReserveBatch(items) => {
                let request = CheckAndReserveBatchRequest { items: items.clone() };
                (method("CheckAndReserveBatchRequest"), request.encode_to_vec())
            }
            Call::CommitBatch(items) => (method("CommitBatchRequest"), self.commit_batch(items).encode_to_vec()),
            Call::ReleaseBatch(picks) => (method("ReleaseBatchRequest"), self.release_batch(picks).encode_to_vec()),
        }
    }

    fn raw(&self, body: &Body) -> (Method, Vec<u8>) {
        match body {
            Body::Arbitrary { method, bytes } => (*method.get(&METHODS), bytes.clone()),
            Body::Damaged { call, mutations } => {
                let (method, bytes) = self.wire(call);
                (method, fuzzing::damaged(&bytes, mutations))
            }
            // Field 1, wire type 3: a group starts, again and again.
            Body::NestedGroups { method, depth } => (*method.get(&METHODS), vec![0x0B; *depth]),
        }
    }
}

async fn send_raw(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(tonic::Request::new(body), PathAndQuery::from_static(path), RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// Sends `body` and checks the answer: a body over the size limit is OUT_OF_RANGE, one that does not
/// decode as the method's request is INVALID_ARGUMENT `MALFORMED_REQUEST` naming the message, and one
/// that does is answered as any request is.
async fn check_body(session: &mut Session<'_>, channel: &Channel, body: &Body) -> Result<(), TestCaseError> {
    let ((path, message, decodes), bytes) = session.raw(body);
    let well_formed = decodes(&bytes);
    let len = bytes.len();
    let result = send_raw(channel.clone(), path, bytes).await;
    let after = visible(session.server).await;
    if let Err(status) = &result {
        if len <= MAX_REQUEST_BYTES && !well_formed {
            prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
            let info = status.get_details_error_info();
            prop_assert_eq!(info.as_ref().map(|i| i.reason.as_str()), Some("MALFORMED_REQUEST"), "{:?}", status);
            let message_type = format!("quota.v1.{message}");
            prop_assert_eq!(info.unwrap().metadata.get("message_type").cloned(), Some(message_type.clone()));
            let expected = format!("the request is not a valid {message_type}: ");
            prop_assert!(status.message().starts_with(&expected), "{:?}", status);
        } else {
            check_refusal(status, len)?;
        }
        prop_assert_eq!(&session.current, &after, "a refused body changed the state: {:?}", status);
    } else {
        prop_assert!(well_formed, "a body that is not a {} was accepted", message);
    }
    session.current = after;
    healthy(session.server).await
}

#[test]
fn arbitrary_bodies_are_malformed_requests_or_answered_as_requests() {
    // Proves that any bytes sent as the body of any unary method are refused as INVALID_ARGUMENT
    // MALFORMED_REQUEST naming the message type when they do not decode as it (never INTERNAL), are
    // answered like any request when they do, change nothing when refused, and leave the server serving.
    fuzz_on_new_servers(proptest::collection::vec(body(), 1..=8), settings, async |server, bodies| {
        let channel = common::connect(server.addr).await;
        let mut session = Session::new(server).await;
        for body in &bodies {
            check_body(&mut session, &channel, body).await?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// Pricing.

/// Scenario names for rate cards: known ones, new ones, and names a card may not have.
fn scenario_name() -> impl Strategy<Value = String> {
    let names = ["classic_answer", "p0", "p1", "messages", "Bad", "", "a b"].map(String::from).to_vec();
    prop_oneof![8 => proptest::sample::select(names), 1 => Just("a".repeat(64)), 1 => Just("a".repeat(65))]
}

/// Rates at their edges: zero, one, the most per unit, just past it, and `u64::MAX`.
fn rate_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1u64),
        1..=1_000u64,
        Just(1_000_000u64),
        Just(1_000_001u64),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>()
    ]
}

/// When a new card takes effect: now (0), some milliseconds from now (negative is in the past), or any
/// time at all.
#[derive(Debug, Clone)]
enum Effective {
    Now,
    FromNow(i64),
    At(u64),
}

#[derive(Debug, Clone)]
enum PricingStep {
    SetRateCard { rates: Vec<(String, u64, u64)>, effective: Effective },
    Reserve { items: Vec<(String, u64)>, dry_run: bool },
    Commit { pick: At, items: Vec<(String, u64)> },
    Advance { ms: u64 },
}

fn items() -> impl Strategy<Value = Vec<(String, u64)>> {
    let quantity = prop_oneof![4 => 1..=1_000u64, 1 => Just(0u64), 1 => Just(u64::MAX), 1 => Just(u64::MAX / 1_000), 1 => any::<u64>()];
    proptest::collection::vec((scenario_name(), quantity), 1..=4)
}

fn pricing_step() -> impl Strategy<Value = PricingStep> {
    let rates = proptest::collection::vec((scenario_name(), rate_number(), rate_number()), 0..=4);
    let effective = prop_oneof![
        4 => Just(Effective::Now),
        2 => (-1_000..=30_000i64).prop_map(Effective::FromNow),
        1 => any::<u64>().prop_map(Effective::At),
    ];
    prop_oneof![
        2 => (rates, effective).prop_map(|(rates, effective)| PricingStep::SetRateCard { rates, effective }),
        4 => (items(), any::<bool>()).prop_map(|(items, dry_run)| PricingStep::Reserve { items, dry_run }),
        3 => (at(), items()).prop_map(|(pick, items)| PricingStep::Commit { pick, items }),
        1 => (0..=60_000u64).prop_map(|ms| PricingStep::Advance { ms }),
    ]
}

/// Rates by scenario: (messages, per).
type Card = BTreeMap<String, (u64, u64)>;

/// The rate card versions as the test expects them, and the holds with the version each was priced at.
struct PricingModel {
    versions: Vec<(u64, Card)>,
    max_versions: usize,
    /// (reservation id, its rate card version, what a first commit charged).
    holds: Vec<(String, usize, Option<u64>)>,
}

const PRICING_ENV: &str = "pricing";
const PRICING_MAX_RATE_CARD_VERSIONS: usize = 4;

/// One tenant with an environment of uncapped pay-as-you-go, so that capacity never refuses a price.
fn pricing_settings() -> Settings {
    Settings {
        max_rate_card_versions: PRICING_MAX_RATE_CARD_VERSIONS,
        bootstrap: vec![BootstrapTenant {
            id: "pricing-tenant".into(),
            packs: 1,
            environments: [PRICING_ENV, PROBE_ENV]
                .map(|id| BootstrapEnvironment {
                    id: id.into(),
                    messages: 0,
                    draw_from_tenant_pool: false,
                    payg_enabled: true,
                    payg_budget_messages: 0,
                    apps: Vec::new(),
                })
                .to_vec(),
        }],
        ..Settings::default()
    }
}

/// The exact price of `items` on `card`, or the field a refusal names, checked in the order the server
/// checks: the quantities at the edge, then each item's scenario and price, and the running total.
fn expected_price(card: &Card, items: &[(String, u64)]) -> Result<u64, String> {
    if let Some(index) = items.iter().position(|(_, quantity)| *quantity == 0) {
        return Err(format!("usage[{index}].quantity"));
    }
    let mut total: u64 = 0;
    for (index, (scenario, quantity)) in items.iter().enumerate() {
        let Some((messages, per)) = card.get(scenario) else { return Err(format!("usage[{index}].scenario")) };
        let milli = (u128::from(*quantity) * u128::from(*messages))
            .checked_mul(1_000)
            .map(|milli| milli.div_ceil(u128::from(*per)))
            .and_then(|milli| u64::try_from(milli).ok());
        total = milli
            .and_then(|milli| total.checked_add(milli))
            .filter(|total| *total <= MAX_AMOUNT_MILLI)
            .ok_or_else(|| "usage".to_owned())?;
    }
    Ok(total)
}

/// The largest amount a request may carry, in milli, with the default settings.
const MAX_AMOUNT_MILLI: u64 = quotad::config::DEFAULT_MAX_AMOUNT_MESSAGES * 1_000;

/// Whether a SetRateCard request is valid, or the field its refusal names, in the server's order.
fn expected_card(rates: &[(String, u64, u64)]) -> Result<Card, String> {
    if rates.is_empty() || rates.len() > 256 {
        return Err("rates".into());
    }
    let mut card = Card::new();
    for (index, (name, messages, per)) in rates.iter().enumerate() {
        let field = |part: &str| format!("rates[{index}].{part}");
        let good_name = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && name != "messages";
        if card.contains_key(name) || !good_name {
            return Err(field("scenario"));
        }
        if *per == 0 {
            return Err(field("per"));
        }
        if messages / per > 1_000_000 {
            return Err(field("messages"));
        }
        card.insert(name.clone(), (*messages, *per));
    }
    Ok(card)
}

impl PricingModel {
    async fn new(server: &TestServer) -> Self {
        let configured =
            server.admin.clone().get_rate_card(GetRateCardRequest { version: 1 }).await.unwrap().into_inner();
        let card = configured.rates.into_iter().map(|r| (r.scenario, (r.messages, r.per))).collect();
        Self { versions: vec![(0, card)], max_versions: PRICING_MAX_RATE_CARD_VERSIONS, holds: Vec::new() }
    }

    /// The version in force at `now`: the newest whose time has come, 0-based.
    fn in_force(&self, now: u64) -> usize {
        self.versions.iter().rposition(|(effective, _)| *effective <= now).expect("version 1 is in force from 0")
    }
}

fn usage_items(items: &[(String, u64)]) -> Vec<UsageItem> {
    items.iter().map(|(scenario, quantity)| UsageItem { scenario: scenario.clone(), quantity: *quantity }).collect()
}

/// A refusal that must name `field`.
fn expect_field(result: Result<impl Debug, Status>, field: &str) -> Result<(), TestCaseError> {
    let status = match result {
        Ok(answer) => return Err(TestCaseError::fail(format!("expected a refusal naming {field}, got {answer:?}"))),
        Err(status) => status,
    };
    let bad_request = status.get_details_bad_request();
    let named = bad_request.as_ref().map(|b| b.field_violations[0].field.as_str());
    prop_assert_eq!((status.code(), named), (Code::InvalidArgument, Some(field)), "{:?}", status);
    Ok(())
}

async fn set_rate_card(
    server: &TestServer,
    model: &mut PricingModel,
    rates: &[(String, u64, u64)],
    effective: &Effective,
) -> Result<(), TestCaseError> {
    let now = server.clock.now_ms();
    let effective_at_unix_ms = match effective {
        Effective::Now => 0,
        Effective::FromNow(ms) => now.saturating_add_signed(*ms),
        Effective::At(ms) => *ms,
    };
    let request = SetRateCardRequest {
        rates: rates
            .iter()
            .map(|(scenario, messages, per)| ScenarioRate {
                scenario: scenario.clone(),
                messages: *messages,
                per: *per,
            })
            .collect(),
        effective_at_unix_ms,
    };
    let result = server.admin.clone().set_rate_card(request).await.map(tonic::Response::into_inner);
    let card = match expected_card(rates) {
        Err(field) => return expect_field(result, &field),
        Ok(card) => card,
    };
    if model.versions.len() >= model.max_versions {
        let status = result.err().unwrap_or_else(|| Status::ok("granted past the limit"));
        prop_assert_eq!(status.code(), Code::ResourceExhausted, "{:?}", status);
        return Ok(());
    }
    let effective_at = if effective_at_unix_ms == 0 { now } else { effective_at_unix_ms };
    if effective_at < now || effective_at < model.versions.last().unwrap().0 {
        return expect_field(result, "effective_at_unix_ms");
    }
    let added = result.map_err(|status| TestCaseError::fail(format!("a valid card was refused: {status:?}")))?;
    let got: Card = added.rates.into_iter().map(|r| (r.scenario, (r.messages, r.per))).collect();
    prop_assert_eq!(
        (added.version as usize, added.effective_at_unix_ms, &got),
        (model.versions.len() + 1, effective_at, &card)
    );
    model.versions.push((effective_at, card));
    Ok(())
}

async fn reserve_priced(
    server: &TestServer,
    model: &mut PricingModel,
    items: &[(String, u64)],
    dry_run: bool,
) -> Result<(), TestCaseError> {
    let version = model.in_force(server.clock.now_ms());
    let request = CheckAndReserveRequest {
        environment_id: PRICING_ENV.into(),
        agent_id: "pricer".into(),
        usage: usage_items(items),
        ttl_seconds: 3_600,
        dry_run,
        ..Default::default()
    };
    let result = server.try_reserve(request).await;
    match expected_price(&model.versions[version].1, items) {
        Err(field) => expect_field(result, &field),
        Ok(price) => {
            let granted = result.map_err(|status| TestCaseError::fail(format!("price {price} refused: {status:?}")))?;
            prop_assert_eq!(granted.reserved_milli, price, "priced at version {}", version + 1);
            if !dry_run {
                model.holds.push((granted.reservation_id, version, None));
            }
            Ok(())
        }
    }
}

async fn commit_priced(
    server: &TestServer,
    model: &mut PricingModel,
    pick: At,
    items: &[(String, u64)],
) -> Result<(), TestCaseError> {
    if model.holds.is_empty() {
        return Ok(());
    }
    let index = pick.of(model.holds.len());
    let (reservation_id, version, first) = model.holds[index].clone();
    let request = CommitRequest { reservation_id, messages: None, usage: usage_items(items) };
    let result = server.try_commit(request).await;
    match (expected_price(&model.versions[version].1, items), first) {
        (Err(field), _) => expect_field(result, &field),
        (Ok(price), Some(charged)) if price != charged => {
            let status = result.err().unwrap_or_else(|| Status::ok("a different second commit was accepted"));
            prop_assert_eq!(status.code(), Code::FailedPrecondition, "{:?}", status);
            Ok(())
        }
        (Ok(price), _) => {
            let settled =
                result.map_err(|status| TestCaseError::fail(format!("commit of {price} refused: {status:?}")))?;
            prop_assert_eq!(settled.charged_milli + settled.overage_milli, price, "charged at version {}", version + 1);
            model.holds[index].2 = Some(price);
            Ok(())
        }
    }
}

#[test]
fn prices_are_exact_at_the_version_in_force_or_refused_as_too_large() {
    // Proves that rate cards with arbitrary scenarios and rates are accepted exactly when valid, that
    // a reservation's price is exactly what the version in force says and its commit's what the hold's
    // version says (rounded up per item), and that a price past the largest amount, even one
    // overflowing 128 bits, is refused naming `usage`, never a panic or a wrapped price.
    fuzz_on_new_servers(proptest::collection::vec(pricing_step(), 1..=20), pricing_settings, async |server, steps| {
        let mut model = PricingModel::new(server).await;
        for step in &steps {
            match step {
                PricingStep::SetRateCard { rates, effective } => {
                    set_rate_card(server, &mut model, rates, effective).await?
                }
                PricingStep::Reserve { items, dry_run } => reserve_priced(server, &mut model, items, *dry_run).await?,
                PricingStep::Commit { pick, items } => commit_priced(server, &mut model, *pick, items).await?,
                PricingStep::Advance { ms } => server.clock.advance_ms(*ms),
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// Inputs fuzzing found, kept as named tests.

#[tokio::test]
async fn the_largest_quantity_at_a_rate_of_almost_u64_max_per_almost_u64_max_is_too_large() {
    // Proves that a price overflowing even 128 bits (u64::MAX units at a valid rate of u64::MAX − 1
    // messages per u64::MAX − 1 units, times 1000 milli) is INVALID_ARGUMENT naming `usage`, and the server
    // goes on serving; the handler used to panic on the overflow, which the client saw as a cancelled
    // stream (and a release build would have priced the reservation at a wrapped amount).
    let server = spawn_server_with(pricing_settings()).await;
    let rate = ScenarioRate { scenario: "p1".into(), messages: u64::MAX - 1, per: u64::MAX - 1 };
    let request = SetRateCardRequest { rates: vec![rate], effective_at_unix_ms: 0 };
    server.admin.clone().set_rate_card(request).await.expect("a rate of one message per unit");
    let reserve = CheckAndReserveRequest {
        environment_id: PRICING_ENV.into(),
        agent_id: "pricer".into(),
        usage: usage_items(&[("p1".into(), u64::MAX), ("Bad".into(), 272)]),
        ..Default::default()
    };
    expect_field(server.try_reserve(reserve).await, "usage").unwrap();
    still_serving(&server).await.unwrap();
}

#[tokio::test]
async fn a_huge_day_in_a_usage_query_is_refused_with_a_bounded_message() {
    // Proves that a usage query whose `from` is 4,312 bytes is INVALID_ARGUMENT naming `from`, with the
    // quoted value cut so that the status fits in the HTTP/2 headers the client accepts; the whole value
    // used to be quoted twice (message and BadRequest), past the client's header list limit, and the
    // client saw INTERNAL "h2 protocol error".
    let server = spawn_server_with(settings()).await;
    let request = GetUsageRequest { tenant_id: "t0".into(), from: long_id('h', 4_312), ..Default::default() };
    let status = server.admin.clone().get_usage(request).await.unwrap_err();
    check_refusal(&status, 4_400).unwrap();
    assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "from");
    assert!(status.message().len() <= 1_024, "{}", status.message().len());
    assert!(status.message().ends_with("(4379 bytes in all)"), "{}", status.message());
}

#[tokio::test]
async fn an_unknown_scenario_on_a_full_rate_card_is_refused_with_a_bounded_message() {
    // Proves that naming an unknown scenario while the rate card holds its most scenarios, each with the
    // longest name, is INVALID_ARGUMENT naming the item, delivered: the message lists the known scenarios
    // (17 KiB of them here) and is cut to fit in the HTTP/2 headers the client accepts.
    let server = spawn_server_with(pricing_settings()).await;
    let rates = (0..256).map(|i| ScenarioRate { scenario: format!("{i:064}"), messages: 1, per: 1 }).collect();
    server.admin.clone().set_rate_card(SetRateCardRequest { rates, effective_at_unix_ms: 0 }).await.unwrap();
    let reserve = CheckAndReserveRequest {
        environment_id: PRICING_ENV.into(),
        agent_id: "pricer".into(),
        usage: usage_items(&[("unknown".into(), 1)]),
        ..Default::default()
    };
    let status = server.try_reserve(reserve).await.unwrap_err();
    check_refusal(&status, 100).unwrap();
    assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "usage[0].scenario");
    assert!(status.message().starts_with("usage[0].scenario: unknown scenario \"unknown\""), "{}", status.message());
}
