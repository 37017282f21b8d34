//! The commands that change a ledger and what applying them yields. Each command is a small, plain
//! value holding validated facts (ids, amounts, usage items, expiry already computed); what depends
//! on the ledger's state, such as the price of usage items at the hold's rate card version, is
//! decided by the ledger and recorded in the event.

use serde::{Deserialize, Serialize};

use super::{
    AgentId, AgentLimit, ApiKeyId, Balance, Draws, EnvironmentId, IdempotencyKey, Milli, ReservationId, TenantId,
    api_keys::{ApiKeyView, SecretHash},
    pricing::{RateCard, RateCardVersion},
};

/// What a reservation or a commit is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Usage {
    /// An amount given in messages, in milli; reported under the scenario `messages`.
    Milli(Milli),
    /// Usage items, priced with the rate card: at the version in force for a reservation, at the
    /// hold's version for a commit.
    Items(Vec<UsageItem>),
}

/// `quantity` units of a rate-card scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageItem {
    pub scenario: String,
    pub quantity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    PurchaseCapacity {
        tenant: TenantId,
        amount_milli: Milli,
        idempotency_key: Option<IdempotencyKey>,
    },
    AllocateCapacity {
        tenant: TenantId,
        environment: EnvironmentId,
        amount_milli: Milli,
        draw_from_tenant_pool: bool,
    },
    SetPayAsYouGo {
        environment: EnvironmentId,
        enabled: bool,
        /// 0 = no cap.
        budget_milli: Milli,
    },
    LinkEnvironment {
        app_environment: EnvironmentId,
        /// `None` unlinks.
        environment: Option<EnvironmentId>,
    },
    SetTenantPolicy {
        tenant: TenantId,
        /// 100 = no grace.
        grace_percent: u32,
        /// A checked IANA name.
        time_zone: String,
    },
    SetEnvironmentAlerts {
        /// A capacity environment.
        environment: EnvironmentId,
        low_percent: u32,
        /// Percentages, ascending.
        budget_thresholds: Vec<u32>,
    },
    SetAgentLimit {
        /// A capacity environment.
        environment: EnvironmentId,
        agent: AgentId,
        /// `None` removes the agent's limit.
        limit: Option<AgentLimit>,
    },
    Reserve {
        /// A capacity environment or a linked app environment.
        environment: EnvironmentId,
        agent: AgentId,
        usage: Usage,
        idempotency_key: Option<IdempotencyKey>,
        expires_at_ms: u64,
        /// The API key the request came with: the environment must be in its scope, and the hold
        /// counts against its cap. `None` for an operator (the admin token, or authentication off).
        api_key: Option<ApiKeyId>,
    },
    Commit {
        reservation: ReservationId,
        usage: Usage,
        /// As for `Reserve`: the reservation must be in the key's scope.
        api_key: Option<ApiKeyId>,
    },
    Release {
        reservation: ReservationId,
        api_key: Option<ApiKeyId>,
    },
    /// Releases a hold whose time has come; does nothing if it has resolved meanwhile.
    Expire {
        reservation: ReservationId,
    },
    /// Adds the next rate card version, in force from `effective_at_ms`.
    SetRateCard {
        card: RateCard,
        effective_at_ms: u64,
    },
    /// Releases every open hold of a capacity environment, named exactly, or of one agent in it.
    ReleaseAll {
        environment: EnvironmentId,
        /// `None` releases every agent's holds.
        agent: Option<AgentId>,
    },
    /// Creates an API key with an id and secret drawn at the edge; only the secret's hash gets here.
    CreateApiKey {
        id: ApiKeyId,
        tenant: TenantId,
        /// Capacity or linked app environments of the tenant, each named once; empty: all of them.
        environments: Vec<EnvironmentId>,
        description: String,
        secret_hash: SecretHash,
    },
    /// Deletes an API key.
    RevokeApiKey {
        id: ApiKeyId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Tenant(TenantCapacity),
    Balance(Balance),
    Linked(Link),
    AgentLimit(AgentLimitView),
    Reserved(Grant),
    Committed(Settled<Settlement>),
    Released(Settled<Milli>),
    /// The milli released, or `None` when the reservation had already resolved.
    Expired(Option<Milli>),
    RateCard(RateCardVersion),
    ReleasedAll(ReleaseSummary),
    ApiKey(ApiKeyView),
}

/// What a release-all released, with the balance after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSummary {
    pub count: u64,
    pub released_milli: Milli,
    pub balance: Balance,
}

/// A granted hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub reservation: ReservationId,
    pub amount_milli: Milli,
    pub draws: Draws,
    pub expires_at_ms: u64,
    pub balance: Balance,
    /// True when an idempotent retry returned an earlier grant and nothing new was held.
    pub replayed: bool,
}

/// What a commit charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// Per source; their total is what the sources covered.
    pub charged: Draws,
    pub released_milli: Milli,
    /// Use that no source could cover.
    pub overage_milli: Milli,
    /// The hold had expired before the commit.
    pub late: bool,
}

/// The result of a commit or release, with the balance after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled<T> {
    pub result: T,
    pub balance: Balance,
    /// True when a retry returned the first answer and changed nothing.
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCapacity {
    pub tenant: TenantId,
    pub purchased_milli: Milli,
    pub allocated_milli: Milli,
    pub pool_used_milli: Milli,
    pub pool_reserved_milli: Milli,
    pub grace_percent: u32,
    pub time_zone: String,
    /// `YYYY-MM` in `time_zone`.
    pub period: String,
    pub grace_used_milli: Milli,
}

/// An agent's limit and use within an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLimitView {
    pub environment: EnvironmentId,
    pub agent: AgentId,
    /// `None`: no limit.
    pub limit: Option<AgentLimit>,
    pub used_milli: Milli,
    pub held_milli: Milli,
    pub period: String,
}

impl TenantCapacity {
    pub fn unallocated_milli(&self) -> Milli {
        self.purchased_milli - self.allocated_milli
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub app_environment: EnvironmentId,
    /// The capacity environment and its tenant; `None` when unlinked.
    pub target: Option<(EnvironmentId, TenantId)>,
}
