//! The commands that change a ledger and what applying them yields. Each command is a small, plain
//! value holding facts only (amounts already priced, expiry already computed), so replaying the same
//! commands at the same times rebuilds the same state whatever the configuration is then.

use serde::{Deserialize, Serialize};

use super::{AgentId, Balance, Draws, EnvironmentId, IdempotencyKey, Milli, ReservationId, TenantId};

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
    Reserve {
        /// A capacity environment or a linked app environment.
        environment: EnvironmentId,
        agent: AgentId,
        amount_milli: Milli,
        idempotency_key: Option<IdempotencyKey>,
        expires_at_ms: u64,
    },
    Commit {
        reservation: ReservationId,
        actual_milli: Milli,
    },
    Release {
        reservation: ReservationId,
    },
    /// Releases a hold whose time has come; does nothing if it has resolved meanwhile.
    Expire {
        reservation: ReservationId,
    },
    /// Releases every open hold of a capacity environment, named exactly, or of one agent in it.
    ReleaseAll {
        environment: EnvironmentId,
        /// `None` releases every agent's holds.
        agent: Option<AgentId>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Tenant(TenantCapacity),
    Balance(Balance),
    Linked(Link),
    Reserved(Grant),
    Committed(Settled<Settlement>),
    Released(Settled<Milli>),
    /// The milli released, or `None` when the reservation had already resolved.
    Expired(Option<Milli>),
    ReleasedAll(ReleaseSummary),
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
