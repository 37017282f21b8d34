//! Every way a command can be refused. Each variant carries what a person needs to act on it; the
//! transport maps each one to a status code in one place (`grpc::status`).

use super::{AgentId, ApiKeyId, EnvironmentId, IdempotencyKey, Milli, ReservationId, TenantId};

/// Which open-reservation cap was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenReservationScope {
    Environment,
    /// The API key the request came with.
    ApiKey,
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("tenant {0} does not exist; PurchaseCapacity creates it")]
    UnknownTenant(TenantId),
    #[error("environment {0} does not exist")]
    UnknownEnvironment(EnvironmentId),
    #[error("reservation {0} does not exist (ids are remembered for the retention period after they resolve)")]
    UnknownReservation(String),
    #[error("app environment {0} is not linked: link it to a capacity environment with LinkEnvironment")]
    AppEnvironmentNotLinked(EnvironmentId),
    #[error("environment {0} is an app environment; name the capacity environment it is linked to")]
    NotACapacityEnvironment(EnvironmentId),
    #[error("environment {0} is a capacity environment and cannot be linked as an app environment")]
    AlreadyACapacityEnvironment(EnvironmentId),
    #[error("environment {environment} belongs to tenant {owner}; an environment belongs to one tenant for good")]
    EnvironmentOfAnotherTenant { environment: EnvironmentId, owner: TenantId },
    #[error(
        "allocating {requested_milli} milli to environment {environment} would bring tenant {tenant}'s \
         allocations to {allocated_after_milli} milli plus {pool_taken_milli} milli drawn or held from its pool, \
         over its purchased capacity of {purchased_milli} milli"
    )]
    OverAllocation {
        tenant: TenantId,
        environment: EnvironmentId,
        requested_milli: Milli,
        allocated_after_milli: Milli,
        pool_taken_milli: Milli,
        purchased_milli: Milli,
    },
    #[error(
        "environment {environment} has already used and holds {taken_milli} milli of its allocation this \
         period; the allocation cannot drop to {requested_milli} milli"
    )]
    AllocationBelowUse { environment: EnvironmentId, requested_milli: Milli, taken_milli: Milli },
    #[error(
        "environment {environment} has {available_milli} milli available, less than the {requested_milli} \
         milli requested: add capacity (purchase and allocate packs, or raise the pay-as-you-go budget)"
    )]
    QuotaDepleted { environment: EnvironmentId, requested_milli: Milli, available_milli: Milli },
    #[error("{} has {limit} open reservations, its limit: commit or release some first", match scope {
        OpenReservationScope::Environment => "the environment",
        OpenReservationScope::ApiKey => "this API key",
        OpenReservationScope::Server => "the server",
    })]
    TooManyOpenReservations { scope: OpenReservationScope, limit: u64 },
    #[error(
        "reservation {reservation} was already committed with {committed_milli} milli; a retry must carry the same amount"
    )]
    AlreadyCommitted { reservation: ReservationId, committed_milli: Milli },
    #[error("reservation {0} was released; it cannot be committed")]
    AlreadyReleased(ReservationId),
    #[error("reservation {0} was committed; it cannot be released")]
    ReleaseAfterCommit(ReservationId),
    #[error("idempotency key {key:?} was already used for a different request ({first})")]
    IdempotencyKeyReused { key: IdempotencyKey, first: String },
    #[error("{what} would exceed the largest amount this server can count (2^64-1 milli)")]
    CounterOverflow { what: &'static str },
    #[error(
        "tenant {tenant} has {taken_milli} milli allocated, drawn or held from its pool this period, over the \
         {limit_milli} milli that an overage grace of {grace_percent}% allows"
    )]
    GraceBelowUse { tenant: TenantId, grace_percent: u32, limit_milli: Milli, taken_milli: Milli },
    #[error("agent {agent} is disabled in environment {environment}")]
    AgentDisabled { environment: EnvironmentId, agent: AgentId },
    #[error(
        "agent {agent} has used {used_milli} milli and holds {held_milli} milli in environment {environment} \
         this period; {requested_milli} milli more would pass its limit of {limit_milli} milli"
    )]
    AgentLimitReached {
        environment: EnvironmentId,
        agent: AgentId,
        limit_milli: Milli,
        used_milli: Milli,
        held_milli: Milli,
        requested_milli: Milli,
    },
    #[error(
        "environment {environment} has no pay-as-you-go, so an agent limit cannot exceed its allocation of \
         {allocated_milli} milli (asked for {limit_milli} milli)"
    )]
    AgentLimitAboveAllocation { environment: EnvironmentId, limit_milli: Milli, allocated_milli: Milli },
    #[error("environment {environment} already tracks {limit} agents, its limit")]
    TooManyAgents { environment: EnvironmentId, limit: usize },
    // The usage and rate card errors below are worded to follow the name of the request field they
    // are about (`usage[1].scenario: unknown scenario …`).
    #[error("unknown scenario {scenario:?} in rate card version {version}; known scenarios: {}", known.join(", "))]
    UnknownScenario { index: usize, scenario: String, version: u32, known: Vec<String> },
    #[error("must be at least 1")]
    ZeroQuantity { index: usize },
    #[error("prices above the limit of {} messages", max_milli / super::MILLI_PER_MESSAGE)]
    UsageTooLarge { max_milli: Milli },
    #[error("rate card version {0} does not exist")]
    UnknownRateCardVersion(u32),
    #[error(
        "is {requested_ms}; it must be 0 (now) or at least {earliest_ms}: not in the past, and not before \
         version {newest_version}, the newest, takes effect"
    )]
    RateCardEffectiveTooEarly { requested_ms: u64, earliest_ms: u64, newest_version: u32 },
    #[error("the rate card has {limit} versions, its limit")]
    TooManyRateCardVersions { limit: usize },
    #[error("API key {0} does not exist (a revoked key is deleted)")]
    UnknownApiKey(ApiKeyId),
    /// The key a request was authenticated with was revoked before the request was applied; answered
    /// as a wrong secret is.
    #[error("the API key is not valid")]
    ApiKeyNoLongerValid,
    #[error("tenant {tenant} has {limit} API keys, its limit: revoke one first")]
    TooManyApiKeys { tenant: TenantId, limit: usize },
    /// A newly drawn key id that an existing key has. The server draws again when it sees the id taken
    /// before creating; two creations racing for one id (64 random bits: never in practice) get this.
    #[error("API key id {0} is already taken")]
    ApiKeyIdTaken(ApiKeyId),
    // The two refusals below are the same whether the environment exists or not, so that a key learns
    // nothing about other tenants.
    #[error("environment {0} does not exist or is outside this API key's scope")]
    EnvironmentOutsideKeyScope(EnvironmentId),
    #[error("reservation {0} does not exist or is outside this API key's scope")]
    ReservationOutsideKeyScope(ReservationId),
}
