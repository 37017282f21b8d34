//! Events: what applying a command did, with every decision already made (which sources a hold draws
//! on, what a commit charged). The ledger changes state only by applying events, live right after a
//! command is decided and at recovery from the log, so replay re-decides nothing and reaches the same
//! state whatever else it has already restored. What an environment event leaves the alert levels at
//! is decided too, and logged with it as its [`Levels`].

use serde::{Deserialize, Serialize};

use super::{
    AgentId, AgentLimit, ApiKeyId, BalanceState, Draws, EnvironmentId, IdempotencyKey, Milli, ReservationId,
    Settlement, TenantId, api_keys::ApiKeyRecord, pricing::RateCardVersion, usage::PricedItem,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Purchased {
        tenant: TenantId,
        amount_milli: Milli,
        idempotency_key: Option<IdempotencyKey>,
    },
    /// Creates the environment under the tenant if it is new.
    Allocated {
        tenant: TenantId,
        environment: EnvironmentId,
        amount_milli: Milli,
        draw_from_tenant_pool: bool,
    },
    PayAsYouGoSet {
        environment: EnvironmentId,
        enabled: bool,
        budget_milli: Milli,
    },
    Linked {
        app_environment: EnvironmentId,
        environment: Option<EnvironmentId>,
    },
    TenantPolicySet {
        tenant: TenantId,
        grace_percent: u32,
        time_zone: String,
    },
    EnvironmentAlertsSet {
        environment: EnvironmentId,
        low_percent: u32,
        budget_thresholds: Vec<u32>,
    },
    AgentLimitSet {
        environment: EnvironmentId,
        agent: AgentId,
        limit: Option<AgentLimit>,
    },
    Reserved {
        reservation: ReservationId,
        agent: AgentId,
        amount_milli: Milli,
        draws: Draws,
        /// The time of the grant, kept in the event so that replay restores it whatever its `now`.
        created_at_ms: u64,
        expires_at_ms: u64,
        idempotency_key: Option<IdempotencyKey>,
        /// The rate card version in force when the hold was made.
        rate_card_version: u32,
        /// The tenant had used its distinct usage keys for the month: the grant is counted under the
        /// agent `other`.
        attributed_to_other: bool,
        /// The API key the hold was made with.
        api_key: Option<ApiKeyId>,
    },
    /// Also applies to a hold that expired before the commit (`settlement.late`).
    Committed {
        reservation: ReservationId,
        actual_milli: Milli,
        settlement: Settlement,
        /// The use, item by item, priced at the hold's rate card version; the prices sum to
        /// `actual_milli`. Usage reports split the settlement across them.
        items: Vec<PricedItem>,
        /// As for `Reserved`: the charge is reported under the agent `other`.
        attributed_to_other: bool,
    },
    Released {
        reservation: ReservationId,
    },
    Expired {
        reservation: ReservationId,
    },
    RateCardSet {
        rate_card: RateCardVersion,
    },
    /// Releases every open hold of a capacity environment (of `agent` only, if set) granted at or before
    /// `through_seq`, as a Release of each would. The holds are named by that rule, not one by one, so
    /// the event stays a few bytes however many of an environment's million holds it covers; `count`
    /// and `released_milli` let replay prove that it released the same holds.
    ReleasedAll {
        environment: EnvironmentId,
        agent: Option<AgentId>,
        through_seq: u64,
        count: u64,
        released_milli: Milli,
    },
    /// Carries the hash of the key's secret, never the secret.
    ApiKeyCreated {
        key: ApiKeyRecord,
    },
    ApiKeyRevoked {
        id: ApiKeyId,
    },
    /// Expires open holds of one environment, in this order, as an `Expired` of each would: the holds
    /// the sweep found due at once. One event for them keeps a mass expiry's log a few bytes per hold.
    /// (Last, so that the logged numbers of the other kinds stay as they were.)
    ExpiredHolds {
        environment: EnvironmentId,
        seqs: Vec<u64>,
    },
}

/// The alert levels an environment event left, decided when it was applied and logged next to it.
/// Both are decided from the tenant's pool and counters, which the tenant's other environments change
/// too. A snapshot copies environments one at a time, so at replay the pool may already hold a later
/// change of a sibling copied after this environment: replay takes these levels instead of deciding
/// them again, and so keeps and alerts exactly the levels the live ledger did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Levels {
    /// The environment's level after the event (its last alerted level becomes this one).
    pub environment: BalanceState,
    /// Set when the event was applied with the tenant locked: its capacity level then.
    pub tenant: Option<TenantLevels>,
}

/// A tenant's capacity level (0, 1 or 2, see `alerts::tenant_level`) last alerted before an event, and
/// its level after it: a tenant alert fires when `after` is higher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLevels {
    pub before: u8,
    pub after: u8,
}

/// Where applied events go: called once per event, in the order events are applied to any one
/// environment or tenant, while their locks are held, with the levels an environment event left
/// (`None` for the others). Returns the event's sequence number.
pub trait EventSink: Send + Sync + 'static {
    fn record(&self, now: u64, event: &Event, levels: Option<Levels>) -> u64;
}

/// Keeps nothing: for a ledger that lives in memory only.
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl EventSink for Discard {
    fn record(&self, _now: u64, _event: &Event, _levels: Option<Levels>) -> u64 {
        0
    }
}
