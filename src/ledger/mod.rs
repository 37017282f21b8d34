//! The accounting core: tenants, environments, holds and the rules that move capacity between them.
//!
//! Rules only: no I/O, no async, no transport types, and no clock (every call is given `now` in Unix
//! milliseconds). Every state change is a [`Command`] applied by [`Ledger::apply`], so a log of
//! commands replays to the same state.
//!
//! Concurrency: each capacity environment has its own lock, and a tenant's lock is taken inside it
//! only when an operation may touch the tenant pool (lock order: environment, then tenant). Admin
//! commands, which change which environments exist and how they relate, are serialised on one admin
//! lock that the hot path (reserve, commit, release, expire, balance) never takes; a batch of hot-path
//! commands takes an environment's lock once for a run of its commands (see `batch`). The rate card
//! versions have a read-write lock of their own, read by the hot path inside an environment's lock
//! and written only under the admin lock. API keys are read by every request that carries one and
//! created and revoked only under the admin lock.

mod account;
pub mod alerts;
pub mod api_keys;
mod batch;
mod command;
mod error;
mod event;
mod expiry;
mod holds;
mod ids;
pub mod period;
pub mod pricing;
mod restore;
pub mod usage;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard, RwLock};

pub use account::{AgentLimit, Draws, Source};
pub use command::{
    AgentLimitView, Command, Grant, Link, Outcome, ReleaseSummary, Settled, Settlement, TenantCapacity, Usage,
    UsageItem,
};
pub use error::{LedgerError, OpenReservationScope};
pub use event::{Discard, Event, EventSink, Levels, TenantLevels};
pub use holds::{HoldPage, MAX_HOLDS_SCANNED_PER_PAGE, OpenHold};
pub use ids::{
    AgentId, ApiKeyId, EnvironmentId, IdError, IdempotencyKey, MAX_ID_BYTES, MAX_RESERVATION_ID_BYTES, ReservationId,
    ReservationIdError, TenantId,
};
pub use restore::{RestoreError, SnapshotItem};

use account::{AgentBook, Commitment, Ending, Environment, Hold, Resolution, Resolved, Tenant};
use alerts::{AlertLog, AlertSink};
use api_keys::{ApiKey, ApiKeyRecord};
use expiry::ExpiryQueue;
use pricing::{MESSAGES_SCENARIO, PricingError, RateCard, RateCardVersion, RateCards};
use serde::{Deserialize, Serialize};
use usage::{PricedItem, Report, UsageQuery, UsageRow};

/// Thousandths of a message: every amount in the core is exact in this unit.
pub type Milli = u64;
pub const MILLI_PER_MESSAGE: Milli = 1_000;

pub const DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT: u64 = 1_000_000;
pub const DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL: u64 = 4_000_000;
/// Resolved reservations are remembered this long so that retries get the first answer.
pub const DEFAULT_RESOLVED_RETENTION_MS: u64 = 24 * 60 * 60 * 1_000;
pub const DEFAULT_MAX_RESOLVED_PER_ENVIRONMENT: usize = 1_000_000;
pub const DEFAULT_MAX_PURCHASE_KEYS_PER_TENANT: usize = 10_000;
/// Agents whose use an environment tracks for agent limits; agents beyond are not tracked.
pub const DEFAULT_MAX_AGENTS_PER_ENVIRONMENT: usize = 10_000;
/// The largest priced amount of one reservation or commit given in usage items.
pub const DEFAULT_MAX_AMOUNT_MILLI: Milli = 1_000_000_000 * MILLI_PER_MESSAGE;
pub const DEFAULT_MAX_RATE_CARD_VERSIONS: usize = 1_000;

const _: () = assert!(DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT <= DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL);

/// How many of an environment's oldest open holds a refused reservation looks through for holds past
/// their expiry that the sweep has not reached yet. Bounded, since a client may keep asking a
/// depleted environment; the oldest holds are the first due when holds share a TTL.
pub const OVERDUE_HOLDS_EXAMINED: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_open_reservations_per_environment: u64,
    pub max_open_reservations_total: u64,
    pub resolved_retention_ms: u64,
    pub max_resolved_per_environment: usize,
    pub max_purchase_keys_per_tenant: usize,
    pub max_agents_per_environment: usize,
    /// The most usage items may price to, in one reservation or commit.
    pub max_amount_milli: Milli,
    /// Distinct (environment, agent, scenario) keys per tenant and month in usage reports; use of
    /// further keys is reported under the agent `other`.
    pub max_usage_keys_per_tenant: u64,
    /// Rate card versions, the configured one included.
    pub max_rate_card_versions: usize,
    pub max_api_keys_per_tenant: usize,
    pub max_open_reservations_per_api_key: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_open_reservations_per_environment: DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT,
            max_open_reservations_total: DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL,
            resolved_retention_ms: DEFAULT_RESOLVED_RETENTION_MS,
            max_resolved_per_environment: DEFAULT_MAX_RESOLVED_PER_ENVIRONMENT,
            max_purchase_keys_per_tenant: DEFAULT_MAX_PURCHASE_KEYS_PER_TENANT,
            max_agents_per_environment: DEFAULT_MAX_AGENTS_PER_ENVIRONMENT,
            max_amount_milli: DEFAULT_MAX_AMOUNT_MILLI,
            max_usage_keys_per_tenant: usage::DEFAULT_MAX_USAGE_KEYS_PER_TENANT,
            max_rate_card_versions: DEFAULT_MAX_RATE_CARD_VERSIONS,
            max_api_keys_per_tenant: api_keys::DEFAULT_MAX_API_KEYS_PER_TENANT,
            max_open_reservations_per_api_key: api_keys::DEFAULT_MAX_OPEN_RESERVATIONS_PER_API_KEY,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BalanceState {
    Ok,
    /// 20% or less of allocation plus pay-as-you-go budget is available.
    Low,
    /// Nothing is available.
    Depleted,
}

/// A capacity environment's balance at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub environment: EnvironmentId,
    pub tenant: TenantId,
    pub allocated_milli: Milli,
    pub allocation_used_milli: Milli,
    pub tenant_pool_used_milli: Milli,
    pub draw_from_tenant_pool: bool,
    pub payg_enabled: bool,
    /// 0 = no cap.
    pub payg_budget_milli: Milli,
    pub payg_used_milli: Milli,
    pub reserved_milli: Milli,
    pub overage_milli: Milli,
    /// Saturates at `Milli::MAX` with uncapped pay-as-you-go.
    pub available_milli: Milli,
    pub state: BalanceState,
    pub period: String,
    /// LOW is at or below this percentage of allocation plus budget.
    pub low_percent: u32,
}

/// LOW is at or below this percentage of allocation plus pay-as-you-go budget, unless set otherwise.
pub const DEFAULT_LOW_PERCENT: u32 = 20;

/// What a dry run would hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub amount_milli: Milli,
    pub draws: Draws,
    pub balance: Balance,
}

#[derive(Clone)]
enum Slot {
    Capacity(Arc<CapacityCell>),
    /// Behind a pointer like a capacity environment, so that a slot takes two words rather than four
    /// in a map of up to a million; an `Arc`, as slots are cloned out of the map.
    App(Arc<AppLink>),
}

/// An app environment: the capacity environment it is linked to, if any.
struct AppLink {
    target: Option<EnvironmentId>,
    applied_seq: u64,
}

impl Slot {
    fn app(target: Option<EnvironmentId>, applied_seq: u64) -> Self {
        Slot::App(Arc::new(AppLink { target, applied_seq }))
    }
}

struct CapacityCell {
    id: EnvironmentId,
    /// The tenant it belongs to, for good: readable without the lock, to check an API key's scope.
    owner: TenantId,
    tenant: Arc<Mutex<Tenant>>,
    books: Mutex<Environment>,
}

/// One environment's books, locked, with its tenant locked too when the operation may touch the pool.
struct Books<'a> {
    cell: &'a Arc<CapacityCell>,
    env: MutexGuard<'a, Environment>,
    tenant: Option<MutexGuard<'a, Tenant>>,
}

impl<'a> Books<'a> {
    /// Locks the books as of `now`: the tenant too when the operation may touch the pool, or when a
    /// new billing period starts, which happens for the tenant first.
    fn lock(cell: &'a Arc<CapacityCell>, now: u64) -> Self {
        let env = cell.books.lock();
        let tenant = Self::needs_tenant(&env, now).then(|| cell.tenant.lock());
        let mut books = Self { cell, env, tenant };
        books.roll_over(now);
        books
    }

    fn needs_tenant(env: &Environment, now: u64) -> bool {
        env.touches_pool() || now >= env.period.end_ms
    }

    /// Unlocks the tenant if the next operation at `now` would not have locked it: the books then log
    /// and alert as if locked afresh for it.
    fn release_tenant_unless_needed(&mut self, now: u64) {
        if self.tenant.is_some() && !Self::needs_tenant(&self.env, now) {
            self.tenant = None;
        }
    }

    fn lock_with_tenant(cell: &'a Arc<CapacityCell>, now: u64) -> Self {
        let env = cell.books.lock();
        let tenant = Some(cell.tenant.lock());
        let mut books = Self { cell, env, tenant };
        books.roll_over(now);
        books
    }

    /// Starts the period that contains `now` for the tenant, then for the environment. Derived from time
    /// alone, so replaying the log rolls over at the same events.
    fn roll_over(&mut self, now: u64) {
        if let Some(tenant) = self.tenant.as_deref_mut() {
            tenant.roll_over(now);
            self.env.roll_over(tenant, now);
        }
    }

    fn available(&self) -> Draws {
        self.env.available(self.tenant.as_deref())
    }

    /// The alert levels the books are at, to be logged with the event just applied to them: the
    /// environment's from what it has available (its tenant's pool included), and, with the tenant
    /// locked, the tenant's level last alerted and its level now. On the hot path: no balance is built.
    fn levels(&self) -> Levels {
        let environment = balance_state(self.available().saturating_total(), &self.env);
        let tenant = self
            .tenant
            .as_deref()
            .map(|tenant| TenantLevels { before: tenant.alerted, after: alerts::tenant_level(tenant) });
        Levels { environment, tenant }
    }

    /// Runs `f` on the tenant, locking it for the call if the books do not hold it already (lock
    /// order: environment, then tenant).
    fn with_tenant<T>(&mut self, f: impl FnOnce(&mut Tenant) -> T) -> T {
        match self.tenant.as_deref_mut() {
            Some(tenant) => f(tenant),
            None => f(&mut self.cell.tenant.lock()),
        }
    }

    fn balance(&self) -> Balance {
        let env = &*self.env;
        let available = self.available().saturating_total();
        Balance {
            environment: self.cell.id.clone(),
            tenant: env.tenant.clone(),
            allocated_milli: env.allocated,
            allocation_used_milli: env.used.get(Source::EnvironmentAllocation),
            tenant_pool_used_milli: env.used.get(Source::TenantPool),
            draw_from_tenant_pool: env.draw_from_tenant_pool,
            payg_enabled: env.payg_enabled,
            payg_budget_milli: env.payg_budget,
            payg_used_milli: env.used.get(Source::PayAsYouGo),
            reserved_milli: env.held.total(),
            overage_milli: env.overage,
            available_milli: available,
            state: balance_state(available, env),
            period: env.period.name(),
            low_percent: env.low_percent,
        }
    }
}

fn balance_state(available: Milli, env: &Environment) -> BalanceState {
    if available == 0 {
        return BalanceState::Depleted;
    }
    if env.payg_enabled && env.payg_budget == 0 {
        return BalanceState::Ok;
    }
    let budget = if env.payg_enabled { env.payg_budget } else { 0 };
    let base = u128::from(env.allocated) + u128::from(budget);
    if u128::from(available) * 100 <= base * u128::from(env.low_percent) { BalanceState::Low } else { BalanceState::Ok }
}

/// All tenants and environments, and their open and recently resolved reservations.
pub struct Ledger {
    limits: Limits,
    tenants: DashMap<TenantId, Arc<Mutex<Tenant>>>,
    environments: DashMap<EnvironmentId, Slot>,
    /// Serialises admin commands; never taken by the hot path.
    admin: Mutex<()>,
    /// Invariant: equals the number of open holds across all environments (outside a restore).
    open_total: AtomicU64,
    /// Holds by expiry, with their environment's cell: the sweep finds it without a lookup by name.
    expiries: ExpiryQueue<Arc<CapacityCell>>,
    /// Read inside environment locks; written only under `admin`.
    rate_cards: RwLock<RateCards>,
    sink: Arc<dyn EventSink>,
    /// Each tenant's recent alerts (lock order: environment, tenant, then its log).
    alert_logs: DashMap<TenantId, Arc<Mutex<AlertLog>>>,
    alert_sink: OnceLock<Arc<dyn AlertSink>>,
    /// API keys by id: read by every authenticated request, written only under `admin`.
    api_keys: DashMap<ApiKeyId, Arc<ApiKey>>,
    /// Invariant: the ids of `api_keys`, by tenant. For the per-tenant cap and listing; admin only.
    api_keys_by_tenant: DashMap<TenantId, BTreeSet<ApiKeyId>>,
}

impl Ledger {
    /// A ledger that keeps its events nowhere.
    pub fn new(limits: Limits) -> Self {
        Self::with_sink(limits, Arc::new(Discard))
    }

    /// A ledger with the default rate card that hands every applied event to `sink`.
    pub fn with_sink(limits: Limits, sink: Arc<dyn EventSink>) -> Self {
        Self::with_rate_card(limits, RateCard::default(), sink)
    }

    /// A ledger whose rate card version 1 is `configured`, handing every applied event to `sink`.
    pub fn with_rate_card(limits: Limits, configured: RateCard, sink: Arc<dyn EventSink>) -> Self {
        Self {
            limits,
            tenants: DashMap::new(),
            environments: DashMap::new(),
            admin: Mutex::new(()),
            open_total: AtomicU64::new(0),
            expiries: ExpiryQueue::new(),
            rate_cards: RwLock::new(RateCards::new(configured)),
            sink,
            alert_logs: DashMap::new(),
            alert_sink: OnceLock::new(),
            api_keys: DashMap::new(),
            api_keys_by_tenant: DashMap::new(),
        }
    }

    /// Applies one state change at time `now`. A refused command changes nothing, but for the overdue
    /// holds a reservation may expire first (see `plan_hold_now`).
    pub fn apply(&self, command: &Command, now: u64) -> Result<Outcome, LedgerError> {
        match command {
            Command::PurchaseCapacity { tenant, amount_milli, idempotency_key } => {
                self.purchase(tenant, *amount_milli, idempotency_key.as_ref(), now).map(Outcome::Tenant)
            }
            Command::AllocateCapacity { tenant, environment, amount_milli, draw_from_tenant_pool } => {
                self.allocate(tenant, environment, *amount_milli, *draw_from_tenant_pool, now).map(Outcome::Balance)
            }
            Command::SetPayAsYouGo { environment, enabled, budget_milli } => {
                self.set_pay_as_you_go(environment, *enabled, *budget_milli, now).map(Outcome::Balance)
            }
            Command::LinkEnvironment { app_environment, environment } => {
                self.link(app_environment, environment.as_ref(), now).map(Outcome::Linked)
            }
            Command::SetTenantPolicy { tenant, grace_percent, time_zone } => {
                self.set_tenant_policy(tenant, *grace_percent, time_zone, now).map(Outcome::Tenant)
            }
            Command::SetAgentLimit { environment, agent, limit } => {
                self.set_agent_limit(environment, agent, *limit, now).map(Outcome::AgentLimit)
            }
            Command::SetEnvironmentAlerts { environment, low_percent, budget_thresholds } => {
                let _admin = self.admin.lock();
                let cell = self.named_capacity_cell(environment)?;
                let mut books = Books::lock(&cell, now);
                let event = Event::EnvironmentAlertsSet {
                    environment: environment.clone(),
                    low_percent: *low_percent,
                    budget_thresholds: budget_thresholds.clone(),
                };
                self.record(&mut books, &event, now);
                Ok(Outcome::Balance(books.balance()))
            }
            Command::Reserve { .. } | Command::Commit { .. } | Command::Release { .. } => {
                let (cell, key) = self.resolve(command)?;
                let mut books = Books::lock(&cell, now);
                self.apply_locked(&mut books, key.as_deref(), command, now)
            }
            Command::Expire { reservation } => self.expire(reservation, now).map(Outcome::Expired),
            Command::SetRateCard { card, effective_at_ms } => {
                self.set_rate_card(card, *effective_at_ms, now).map(Outcome::RateCard)
            }
            Command::ReleaseAll { environment, agent } => {
                self.release_all(environment, agent.as_ref(), now).map(Outcome::ReleasedAll)
            }
            Command::CreateApiKey { id, tenant, environments, description, secret_hash } => {
                let record = ApiKeyRecord {
                    id: id.clone(),
                    tenant: tenant.clone(),
                    environments: environments.clone(),
                    description: description.clone(),
                    created_at_ms: now,
                    secret_hash: *secret_hash,
                };
                self.create_api_key(record, now).map(Outcome::ApiKey)
            }
            Command::RevokeApiKey { id } => self.revoke_api_key(id, now).map(Outcome::ApiKey),
        }
    }

    /// Whether a reservation of `amount` would be granted now, and from which sources.
    pub fn quote(&self, environment: &EnvironmentId, amount: Milli, now: u64) -> Result<Quote, LedgerError> {
        let cell = self.capacity_cell(environment)?;
        let books = Books::lock(&cell, now);
        let draws = plan_draws(&books, amount)?;
        Ok(Quote { amount_milli: amount, draws, balance: books.balance() })
    }

    /// What a dry run answers: the quote, or the refusal `reserve` would give now, scope and open-reservation
    /// caps included and checked in the same order. Usage items are priced with the rate card in force now.
    pub fn dry_run(
        &self,
        environment: &EnvironmentId,
        agent: &AgentId,
        usage: &Usage,
        api_key: Option<&ApiKeyId>,
        now: u64,
    ) -> Result<Quote, LedgerError> {
        let (cell, key) = self.scoped_cell(environment, api_key)?;
        let mut books = Books::lock(&cell, now);
        let version = self.rate_cards.read().in_force(now).version;
        let amount = priced_total(&self.price(usage, version)?);
        let draws = self.plan_hold_now(&mut books, agent, amount, now, || self.check_open_hold_caps(key.as_deref()))?;
        Ok(Quote { amount_milli: amount, draws, balance: books.balance() })
    }

    /// A rate card version: `None` for the one in force at `now`.
    pub fn rate_card(&self, version: Option<u32>, now: u64) -> Result<RateCardVersion, LedgerError> {
        let cards = self.rate_cards.read();
        match version {
            None => Ok(cards.in_force(now).clone()),
            Some(version) => cards.version(version).cloned().ok_or(LedgerError::UnknownRateCardVersion(version)),
        }
    }

    /// A tenant's usage report: its environments' rows in the query's range, filtered and grouped.
    pub fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        if !self.tenants.contains_key(&query.tenant) {
            return Err(LedgerError::UnknownTenant(query.tenant.clone()));
        }
        let cells: Vec<Arc<CapacityCell>> = match &query.environment {
            Some(environment) => vec![self.capacity_cell(environment)?],
            // Collected first: no dashmap guard is held while an environment is locked.
            None => self
                .environments
                .iter()
                .filter_map(|slot| match slot.value() {
                    Slot::Capacity(cell) => Some(cell.clone()),
                    Slot::App(_) => None,
                })
                .collect(),
        };
        let mut report = Report::new(query.group_by.clone());
        for cell in cells {
            let env = cell.books.lock();
            if env.tenant != query.tenant {
                if query.environment.is_some() {
                    return Err(LedgerError::EnvironmentOfAnotherTenant {
                        environment: cell.id.clone(),
                        owner: env.tenant.clone(),
                    });
                }
                continue;
            }
            if let Some(usage) = &env.usage {
                usage.collect(&cell.id, &query.range, query.agent.as_ref(), &mut report);
            }
        }
        Ok(report.into_rows())
    }

    /// Prices `usage` with rate card `version`: one item per usage item, or one `messages` item.
    fn price(&self, usage: &Usage, version: u32) -> Result<Vec<PricedItem>, LedgerError> {
        let items = match usage {
            Usage::Milli(amount) => {
                return Ok(vec![PricedItem { scenario: MESSAGES_SCENARIO.into(), amount_milli: *amount }]);
            }
            Usage::Items(items) => items,
        };
        let max_milli = self.limits.max_amount_milli;
        let cards = self.rate_cards.read();
        let card = &cards.version(version).ok_or(LedgerError::UnknownRateCardVersion(version))?.card;
        let mut total: Milli = 0;
        let mut priced = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let amount_milli = card.price_item(index, &item.scenario, item.quantity).map_err(|e| match e {
                PricingError::UnknownScenario { index, scenario, known } => {
                    LedgerError::UnknownScenario { index, scenario, version, known }
                }
                PricingError::ZeroQuantity { index } => LedgerError::ZeroQuantity { index },
                PricingError::Overflow => LedgerError::UsageTooLarge { max_milli },
            })?;
            total = total
                .checked_add(amount_milli)
                .filter(|t| *t <= max_milli)
                .ok_or(LedgerError::UsageTooLarge { max_milli })?;
            priced.push(PricedItem { scenario: item.scenario.clone(), amount_milli });
        }
        Ok(priced)
    }

    /// Whether use of `agent` under `scenarios` at `now` must be reported under the agent `other`,
    /// because it would take the tenant past its distinct usage keys for the month.
    fn attributed_to_other<'a>(
        &self,
        books: &mut Books<'_>,
        agent: &AgentId,
        scenarios: impl IntoIterator<Item = &'a str>,
        now: u64,
    ) -> bool {
        let new_keys = books.env.usage_mut().new_keys(now, agent, scenarios);
        if new_keys == 0 {
            return false;
        }
        let month = period::period_of(now);
        let used = books.with_tenant(|tenant| if tenant.usage_keys_month == month { tenant.usage_keys } else { 0 });
        used.saturating_add(new_keys) > self.limits.max_usage_keys_per_tenant
    }

    /// Counts a refused reservation in the environment's usage (in memory only: refusals are not
    /// logged) and returns the refusal.
    fn refuse(books: &mut Books<'_>, agent: &AgentId, error: LedgerError, max_agents: u64, now: u64) -> LedgerError {
        if matches!(error, LedgerError::QuotaDepleted { .. } | LedgerError::TooManyOpenReservations { .. }) {
            books.env.usage_mut().record_refusal(now, agent, max_agents);
        }
        error
    }

    /// The draws of a new hold of `amount` for `agent`, or why the environment refuses it: the agent is
    /// disabled or at its limit, the open-hold cap, too little capacity, or holds that could no longer
    /// be counted. The server-wide cap is the caller's.
    fn plan_hold(&self, books: &Books<'_>, agent: &AgentId, amount: Milli) -> Result<Draws, LedgerError> {
        if let Some(book) = books.env.agents.get(agent)
            && let Some(limit) = book.limit
        {
            check_agent_limit(&books.cell.id, agent, book, limit, amount)?;
        }
        let max_open = self.limits.max_open_reservations_per_environment;
        if books.env.open.len() as u64 >= max_open {
            return Err(LedgerError::TooManyOpenReservations {
                scope: OpenReservationScope::Environment,
                limit: max_open,
            });
        }
        let draws = plan_draws(books, amount)?;
        // Uncapped pay-as-you-go offers `Milli::MAX` however much is already held, so the plan alone
        // does not keep the holds countable.
        if books.env.held.total().checked_add(amount).is_none() {
            return Err(LedgerError::CounterOverflow { what: "the environment's holds" });
        }
        Ok(draws)
    }

    pub fn balance(&self, environment: &EnvironmentId, now: u64) -> Result<Balance, LedgerError> {
        self.balance_for(environment, None, now)
    }

    /// The balance, if the API key (when given) may use the environment.
    pub fn balance_for(
        &self,
        environment: &EnvironmentId,
        api_key: Option<&ApiKeyId>,
        now: u64,
    ) -> Result<Balance, LedgerError> {
        let (cell, _) = self.scoped_cell(environment, api_key)?;
        Ok(Books::lock(&cell, now).balance())
    }

    pub fn tenant(&self, tenant: &TenantId, now: u64) -> Result<TenantCapacity, LedgerError> {
        let cell =
            self.tenants.get(tenant).map(|t| t.clone()).ok_or_else(|| LedgerError::UnknownTenant(tenant.clone()))?;
        let mut books = cell.lock();
        books.roll_over(now);
        Ok(tenant_capacity(tenant, &books))
    }

    /// The agents of a capacity environment that have a limit, use this period or open holds.
    pub fn agent_limits(&self, environment: &EnvironmentId, now: u64) -> Result<Vec<AgentLimitView>, LedgerError> {
        let cell = self.named_capacity_cell(environment)?;
        let books = Books::lock(&cell, now);
        Ok(books.env.agents.iter().map(|(agent, book)| agent_limit_view(&books, agent, book)).collect())
    }

    /// Reservations whose expiry is at or before `now`, at most `max`, for the caller to `Expire`.
    /// Some may have resolved meanwhile; expiring those does nothing.
    pub fn due_expiries(&self, now: u64, max: usize) -> Vec<ReservationId> {
        let due = self.expiries.pop_due(now, max);
        due.into_iter().map(|(cell, seq)| ReservationId { environment: cell.id.clone(), seq }).collect()
    }

    /// The earliest expiry still queued (Unix ms): the sweep is that far behind when it is past.
    pub fn earliest_expiry(&self) -> Option<u64> {
        self.expiries.earliest()
    }

    /// Expires holds due at `now`, taking at most `max` from the queue; returns how many it took, so
    /// that fewer than `max` means that none is left due. The due holds of one environment expire under
    /// one lock as one event, which keeps a mass expiry's cost and log small. Some of those taken may
    /// have resolved meanwhile; they are skipped.
    pub fn expire_due(&self, now: u64, max: usize) -> usize {
        let mut due = self.expiries.pop_due(now, max);
        let taken = due.len();
        due.sort_unstable_by_key(|(cell, seq)| (Arc::as_ptr(cell), *seq));
        let mut runs: Vec<&[(Arc<CapacityCell>, u64)]> = due.chunk_by(|(a, _), (b, _)| Arc::ptr_eq(a, b)).collect();
        // Environments in the order of their ids, so that ledgers with the same holds due log alike.
        runs.sort_unstable_by(|a, b| a[0].0.id.cmp(&b[0].0.id));
        for run in runs {
            let cell = &run[0].0;
            let mut books = Books::lock(cell, now);
            let seqs: Vec<u64> = run
                .iter()
                .map(|(_, seq)| *seq)
                .filter(|seq| books.env.open.get(seq).is_some_and(|hold| hold.expires_at_ms <= now))
                .collect();
            self.expire_holds(&mut books, seqs, now);
        }
        taken
    }

    pub fn open_reservations(&self) -> u64 {
        self.open_total.load(Ordering::Relaxed)
    }

    /// The tenant an environment (or the capacity environment an app is linked to) belongs to, read without
    /// locking its books.
    pub fn tenant_of(&self, id: &EnvironmentId) -> Option<TenantId> {
        self.capacity_cell(id).ok().map(|cell| cell.owner.clone())
    }

    /// The tenant's id as its map key holds it, and its books. New environments take this id rather
    /// than the one in a command or event, so a tenant's environments share one string.
    fn tenant_entry(&self, tenant: &TenantId) -> Option<(TenantId, Arc<Mutex<Tenant>>)> {
        self.tenants.get(tenant).map(|t| (t.key().clone(), t.value().clone()))
    }

    fn capacity_cell(&self, id: &EnvironmentId) -> Result<Arc<CapacityCell>, LedgerError> {
        let slot = self.environments.get(id).map(|s| s.clone());
        match slot {
            None => Err(LedgerError::UnknownEnvironment(id.clone())),
            Some(Slot::Capacity(cell)) => Ok(cell),
            Some(Slot::App(link)) => {
                let Some(target) = &link.target else { return Err(LedgerError::AppEnvironmentNotLinked(id.clone())) };
                match self.environments.get(target).map(|s| s.clone()) {
                    Some(Slot::Capacity(cell)) => Ok(cell),
                    // Links are made only to capacity environments, which never stop being one.
                    _ => {
                        unreachable!("app environment {id} is linked to {target}, which is not a capacity environment")
                    }
                }
            }
        }
    }

    /// The capacity environment named exactly, for admin commands that must not follow links.
    fn named_capacity_cell(&self, id: &EnvironmentId) -> Result<Arc<CapacityCell>, LedgerError> {
        match self.environments.get(id).map(|s| s.clone()) {
            None => Err(LedgerError::UnknownEnvironment(id.clone())),
            Some(Slot::Capacity(cell)) => Ok(cell),
            Some(Slot::App(_)) => Err(LedgerError::NotACapacityEnvironment(id.clone())),
        }
    }

    fn reservation_cell(&self, reservation: &ReservationId) -> Result<Arc<CapacityCell>, LedgerError> {
        match self.environments.get(&reservation.environment).map(|s| s.clone()) {
            Some(Slot::Capacity(cell)) => Ok(cell),
            _ => Err(LedgerError::UnknownReservation(reservation.to_string())),
        }
    }

    fn purchase(
        &self,
        tenant: &TenantId,
        amount: Milli,
        key: Option<&IdempotencyKey>,
        now: u64,
    ) -> Result<TenantCapacity, LedgerError> {
        let _admin = self.admin.lock();
        let existing = self.tenants.get(tenant).map(|t| t.clone());
        let cell = existing.clone().unwrap_or_default();
        let mut books = cell.lock();
        books.roll_over(now);
        if let Some(key) = key
            && let Some(&first) = books.purchase_keys.get(key)
        {
            if first != amount {
                return Err(LedgerError::IdempotencyKeyReused {
                    key: key.clone(),
                    first: format!("a purchase of {first} milli"),
                });
            }
            return Ok(tenant_capacity(tenant, &books));
        }
        books
            .purchased
            .checked_add(amount)
            .ok_or(LedgerError::CounterOverflow { what: "the tenant's purchased capacity" })?;
        let event = Event::Purchased { tenant: tenant.clone(), amount_milli: amount, idempotency_key: key.cloned() };
        self.evolve_tenant(&mut books, &event, now);
        books.applied_seq = self.sink.record(now, &event, None);
        let summary = tenant_capacity(tenant, &books);
        drop(books);
        if existing.is_none() {
            self.tenants.insert(tenant.clone(), cell);
        }
        Ok(summary)
    }

    fn allocate(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        amount: Milli,
        draw_from_pool: bool,
        now: u64,
    ) -> Result<Balance, LedgerError> {
        let _admin = self.admin.lock();
        let tenant_entry = self.tenant_entry(tenant).ok_or_else(|| LedgerError::UnknownTenant(tenant.clone()))?;
        let (cell, is_new) = match self.environments.get(environment).map(|s| s.clone()) {
            None => (new_cell(environment, tenant_entry), true),
            Some(Slot::App(_)) => return Err(LedgerError::NotACapacityEnvironment(environment.clone())),
            Some(Slot::Capacity(cell)) => (cell, false),
        };
        let mut books = Books::lock_with_tenant(&cell, now);
        if books.env.tenant != *tenant {
            return Err(LedgerError::EnvironmentOfAnotherTenant {
                environment: environment.clone(),
                owner: books.env.tenant.clone(),
            });
        }
        let taken =
            books.env.used.get(Source::EnvironmentAllocation) + books.env.held.get(Source::EnvironmentAllocation);
        if amount < taken {
            return Err(LedgerError::AllocationBelowUse {
                environment: environment.clone(),
                requested_milli: amount,
                taken_milli: taken,
            });
        }
        let pool = books.tenant.as_deref().expect("locked with tenant");
        let allocated_after = (pool.allocated - books.env.allocated).checked_add(amount);
        let pool_taken = pool.pool_used + pool.pool_held;
        // Allocations never reach into the grace; pool use and holds may, up to the grace limit.
        let fits = allocated_after.is_some_and(|a| a <= pool.purchased)
            && allocated_after.and_then(|a| a.checked_add(pool_taken)).is_some_and(|total| total <= pool.pool_limit());
        if !fits {
            return Err(LedgerError::OverAllocation {
                tenant: tenant.clone(),
                environment: environment.clone(),
                requested_milli: amount,
                allocated_after_milli: allocated_after.unwrap_or(Milli::MAX),
                pool_taken_milli: pool_taken,
                purchased_milli: pool.purchased,
            });
        }
        let event = Event::Allocated {
            tenant: tenant.clone(),
            environment: environment.clone(),
            amount_milli: amount,
            draw_from_tenant_pool: draw_from_pool,
        };
        self.record(&mut books, &event, now);
        let balance = books.balance();
        drop(books);
        if is_new {
            self.environments.insert(environment.clone(), Slot::Capacity(cell));
        }
        Ok(balance)
    }

    fn set_pay_as_you_go(
        &self,
        environment: &EnvironmentId,
        enabled: bool,
        budget: Milli,
        now: u64,
    ) -> Result<Balance, LedgerError> {
        let _admin = self.admin.lock();
        let cell = self.named_capacity_cell(environment)?;
        let mut books = Books::lock(&cell, now);
        let event = Event::PayAsYouGoSet { environment: environment.clone(), enabled, budget_milli: budget };
        self.record(&mut books, &event, now);
        Ok(books.balance())
    }

    fn link(&self, app: &EnvironmentId, target: Option<&EnvironmentId>, now: u64) -> Result<Link, LedgerError> {
        let _admin = self.admin.lock();
        let app_slot = self.environments.get(app).map(|s| s.clone());
        if let Some(Slot::Capacity(_)) = app_slot {
            return Err(LedgerError::AlreadyACapacityEnvironment(app.clone()));
        }
        let target = match target {
            None if app_slot.is_none() => return Err(LedgerError::UnknownEnvironment(app.clone())),
            None => None,
            Some(target) => {
                let cell = self.named_capacity_cell(target)?;
                let tenant = cell.books.lock().tenant.clone();
                Some((target.clone(), tenant))
            }
        };
        let event =
            Event::Linked { app_environment: app.clone(), environment: target.as_ref().map(|(e, _)| e.clone()) };
        let applied_seq = self.sink.record(now, &event, None);
        self.environments.insert(app.clone(), Slot::app(target.as_ref().map(|(e, _)| e.clone()), applied_seq));
        Ok(Link { app_environment: app.clone(), target })
    }

    fn set_tenant_policy(
        &self,
        tenant: &TenantId,
        grace_percent: u32,
        time_zone: &str,
        now: u64,
    ) -> Result<TenantCapacity, LedgerError> {
        let _admin = self.admin.lock();
        let cell =
            self.tenants.get(tenant).map(|t| t.clone()).ok_or_else(|| LedgerError::UnknownTenant(tenant.clone()))?;
        let mut books = cell.lock();
        books.roll_over(now);
        let taken = books.allocated.saturating_add(books.pool_used).saturating_add(books.pool_held);
        let limit_after = Tenant { grace_percent, ..Tenant::default() };
        let limit_after = Tenant { purchased: books.purchased, ..limit_after }.pool_limit();
        if taken > limit_after {
            return Err(LedgerError::GraceBelowUse {
                tenant: tenant.clone(),
                grace_percent,
                limit_milli: limit_after,
                taken_milli: taken,
            });
        }
        let event = Event::TenantPolicySet { tenant: tenant.clone(), grace_percent, time_zone: time_zone.to_owned() };
        self.evolve_tenant(&mut books, &event, now);
        books.applied_seq = self.sink.record(now, &event, None);
        Ok(tenant_capacity(tenant, &books))
    }

    fn set_agent_limit(
        &self,
        environment: &EnvironmentId,
        agent: &AgentId,
        limit: Option<AgentLimit>,
        now: u64,
    ) -> Result<AgentLimitView, LedgerError> {
        let _admin = self.admin.lock();
        let cell = self.named_capacity_cell(environment)?;
        let mut books = Books::lock(&cell, now);
        if let Some(limit) = limit {
            if !books.env.payg_enabled && limit.limit_milli > books.env.allocated {
                return Err(LedgerError::AgentLimitAboveAllocation {
                    environment: environment.clone(),
                    limit_milli: limit.limit_milli,
                    allocated_milli: books.env.allocated,
                });
            }
            let max_agents = self.limits.max_agents_per_environment;
            if !books.env.agents.contains_key(agent) && books.env.agents.len() >= max_agents {
                return Err(LedgerError::TooManyAgents { environment: environment.clone(), limit: max_agents });
            }
        }
        let event = Event::AgentLimitSet { environment: environment.clone(), agent: agent.clone(), limit };
        self.record(&mut books, &event, now);
        let book = books.env.agents.get(agent).cloned().unwrap_or_default();
        Ok(agent_limit_view(&books, agent, &book))
    }

    fn set_rate_card(&self, card: &RateCard, effective_at_ms: u64, now: u64) -> Result<RateCardVersion, LedgerError> {
        let _admin = self.admin.lock();
        // Held while the event is recorded, so that no reservation prices with a card list that
        // disagrees with the log.
        let mut cards = self.rate_cards.write();
        let max_versions = self.limits.max_rate_card_versions;
        if cards.len() >= max_versions {
            return Err(LedgerError::TooManyRateCardVersions { limit: max_versions });
        }
        let newest = cards.newest();
        // A version never takes effect in the past: holds already made recorded the version in force
        // at their time, and reports would disagree with them.
        let earliest_ms = newest.effective_at_ms.max(now);
        if effective_at_ms < earliest_ms {
            return Err(LedgerError::RateCardEffectiveTooEarly {
                requested_ms: effective_at_ms,
                earliest_ms,
                newest_version: newest.version,
            });
        }
        let rate_card = RateCardVersion { version: newest.version + 1, effective_at_ms, card: card.clone() };
        self.sink.record(now, &Event::RateCardSet { rate_card: rate_card.clone() }, None);
        cards.push(rate_card.clone());
        Ok(rate_card)
    }

    /// A reservation on books already locked, with the API key the caller found the environment in the
    /// scope of.
    fn reserve_in(
        &self,
        books: &mut Books<'_>,
        key: Option<&ApiKey>,
        request: &ReserveRequest<'_>,
        now: u64,
    ) -> Result<Grant, LedgerError> {
        if let Some(key) = request.idempotency_key
            && let Some(seq) = books.env.reservation_of(key)
        {
            return self.replay_grant(books, seq, request);
        }
        let rate_card_version = self.rate_cards.read().in_force(now).version;
        let amount = priced_total(&self.price(request.usage, rate_card_version)?);
        let max_agents = self.limits.max_usage_keys_per_tenant;
        let draws = match self.plan_hold_now(books, request.agent, amount, now, || self.count_open_hold(key)) {
            Ok(draws) => draws,
            Err(error) => return Err(Self::refuse(books, request.agent, error, max_agents, now)),
        };
        let attributed_to_other = self.attributed_to_other(books, request.agent, [usage::COUNTS_SCENARIO], now);
        let reservation = ReservationId { environment: books.cell.id.clone(), seq: books.env.next_seq };
        let event = Event::Reserved {
            reservation: reservation.clone(),
            agent: request.agent.clone(),
            amount_milli: amount,
            draws,
            created_at_ms: now,
            expires_at_ms: *request.expires_at_ms,
            idempotency_key: request.idempotency_key.cloned(),
            rate_card_version,
            attributed_to_other,
            api_key: key.map(|key| key.id().clone()),
        };
        self.record(books, &event, now);
        Ok(Grant {
            reservation,
            amount_milli: amount,
            draws,
            expires_at_ms: *request.expires_at_ms,
            balance: books.balance(),
            replayed: false,
        })
    }

    /// The earlier grant for a retried idempotency key, if the retry asks for the same thing (its
    /// usage priced with the first grant's rate card version).
    fn replay_grant(&self, books: &Books<'_>, seq: u64, retry: &ReserveRequest<'_>) -> Result<Grant, LedgerError> {
        let first = books.env.hold_of(seq).expect("an idempotency key maps to a remembered reservation");
        let amount = priced_total(&self.price(retry.usage, first.rate_card_version)?);
        if first.agent != *retry.agent || first.amount != amount {
            return Err(LedgerError::IdempotencyKeyReused {
                key: retry.idempotency_key.cloned().expect("replays are looked up by key"),
                first: format!("agent {} reserving {} milli", first.agent, first.amount),
            });
        }
        Ok(Grant {
            reservation: ReservationId { environment: books.cell.id.clone(), seq },
            amount_milli: first.amount,
            draws: first.draws,
            expires_at_ms: first.expires_at_ms,
            balance: books.balance(),
            replayed: true,
        })
    }

    /// A commit on the reservation's books, already locked.
    fn commit_in(
        &self,
        books: &mut Books<'_>,
        reservation: &ReservationId,
        usage: &Usage,
        now: u64,
    ) -> Result<Settled<Settlement>, LedgerError> {
        self.expire_if_due(books, reservation, now);
        let seq = reservation.seq;
        let hold = books.env.hold_of(seq);
        let Some(hold) = hold else { return Err(LedgerError::UnknownReservation(reservation.to_string())) };
        let agent = hold.agent.clone();
        let items = self.price(usage, hold.rate_card_version)?;
        let actual = priced_total(&items);
        let settlement = if let Some(hold) = books.env.open.get(&seq) {
            books.env.settlement(books.tenant.as_deref(), hold.draws, actual, false)?
        } else {
            match books.env.resolved(seq).map(|r| &r.resolution) {
                None => return Err(LedgerError::UnknownReservation(reservation.to_string())),
                Some(Resolution::Committed(first)) => {
                    let Commitment { actual: first, settlement } = **first;
                    if first != actual {
                        return Err(LedgerError::AlreadyCommitted {
                            reservation: reservation.clone(),
                            committed_milli: first,
                        });
                    }
                    return Ok(Settled { result: settlement, balance: books.balance(), replayed: true });
                }
                Some(Resolution::Released { .. }) => return Err(LedgerError::AlreadyReleased(reservation.clone())),
                Some(Resolution::Expired) => {
                    books.env.settlement(books.tenant.as_deref(), Draws::default(), actual, true)?
                }
            }
        };
        let lines = usage::split(&items, settlement.charged, settlement.overage_milli);
        let attributed_to_other = self.attributed_to_other(books, &agent, lines.iter().map(|l| l.scenario), now);
        let event = Event::Committed {
            reservation: reservation.clone(),
            actual_milli: actual,
            settlement,
            items,
            attributed_to_other,
        };
        self.record(books, &event, now);
        Ok(Settled { result: settlement, balance: books.balance(), replayed: false })
    }

    /// A release on the reservation's books, already locked.
    fn release_in(
        &self,
        books: &mut Books<'_>,
        reservation: &ReservationId,
        now: u64,
    ) -> Result<Settled<Milli>, LedgerError> {
        self.expire_if_due(books, reservation, now);
        let seq = reservation.seq;
        let released = match books.env.open.get(&seq) {
            Some(hold) => hold.amount,
            None => match books.env.resolved(seq).map(|r| &r.resolution) {
                None => return Err(LedgerError::UnknownReservation(reservation.to_string())),
                Some(Resolution::Released { released }) => {
                    return Ok(Settled { result: *released, balance: books.balance(), replayed: true });
                }
                Some(Resolution::Committed(_)) => return Err(LedgerError::ReleaseAfterCommit(reservation.clone())),
                // Expiry already returned the hold; the release only settles the reservation.
                Some(Resolution::Expired) => 0,
            },
        };
        self.record(books, &Event::Released { reservation: reservation.clone() }, now);
        Ok(Settled { result: released, balance: books.balance(), replayed: false })
    }

    fn expire(&self, reservation: &ReservationId, now: u64) -> Result<Option<Milli>, LedgerError> {
        let Ok(cell) = self.reservation_cell(reservation) else {
            return Ok(None);
        };
        let mut books = Books::lock(&cell, now);
        Ok(self.expire_if_due(&mut books, reservation, now))
    }

    /// Releases the hold if it is open and its expiry has come; returns what was released.
    fn expire_if_due(&self, books: &mut Books<'_>, reservation: &ReservationId, now: u64) -> Option<Milli> {
        let hold = books.env.open.get(&reservation.seq)?;
        if hold.expires_at_ms > now {
            return None;
        }
        let released = hold.amount;
        self.record(books, &Event::Expired { reservation: reservation.clone() }, now);
        Some(released)
    }

    /// Counts a new hold against the API key's cap, then the server's; at either cap, refuses it and
    /// counts nothing.
    fn count_open_hold(&self, key: Option<&ApiKey>) -> Result<(), LedgerError> {
        if let Some(key) = key {
            self.take_key_hold(key)?;
        }
        if self.open_total.fetch_add(1, Ordering::Relaxed) >= self.limits.max_open_reservations_total {
            self.open_total.fetch_sub(1, Ordering::Relaxed);
            if let Some(key) = key {
                self.give_back_key_hold(key);
            }
            return Err(self.server_cap_reached());
        }
        Ok(())
    }

    /// Whether the API key's and the server's caps on open holds would take one more; for dry runs.
    fn check_open_hold_caps(&self, key: Option<&ApiKey>) -> Result<(), LedgerError> {
        if let Some(key) = key {
            self.check_key_cap(key)?;
        }
        if self.open_total.load(Ordering::Relaxed) >= self.limits.max_open_reservations_total {
            return Err(self.server_cap_reached());
        }
        Ok(())
    }

    fn server_cap_reached(&self) -> LedgerError {
        LedgerError::TooManyOpenReservations {
            scope: OpenReservationScope::Server,
            limit: self.limits.max_open_reservations_total,
        }
    }

    /// Plans a new hold as `plan_hold` does, then counts it against the caps that span environments
    /// (`caps`: the API key's and the server's, counted or only checked). When it is refused for what
    /// ended holds give back (capacity, the agent's limit, a cap on open holds), the overdue holds
    /// among the environment's oldest expire first, and the hold is planned and counted again. Holds
    /// past their expiry count until the sweep reaches them, which under a burst of expiries may take
    /// seconds; expired first, they make a refusal (or a dry run's answer) mean what it says.
    fn plan_hold_now(
        &self,
        books: &mut Books<'_>,
        agent: &AgentId,
        amount: Milli,
        now: u64,
        caps: impl Fn() -> Result<(), LedgerError>,
    ) -> Result<Draws, LedgerError> {
        let plan_and_count = |books: &Books<'_>| {
            let draws = self.plan_hold(books, agent, amount)?;
            caps().map(|()| draws)
        };
        match plan_and_count(books) {
            Err(error) if relieved_by_expiry(&error) && self.expire_overdue(books, now) => plan_and_count(books),
            planned => planned,
        }
    }

    /// Expires the holds past their expiry among the environment's `OVERDUE_HOLDS_EXAMINED` oldest,
    /// as the sweep would (their entries in the expiry queue are skipped later); true if any expired.
    fn expire_overdue(&self, books: &mut Books<'_>, now: u64) -> bool {
        let seqs: Vec<u64> = (books.env.open.iter().take(OVERDUE_HOLDS_EXAMINED))
            .filter(|(_, hold)| hold.expires_at_ms <= now)
            .map(|(&seq, _)| seq)
            .collect();
        self.expire_holds(books, seqs, now)
    }

    /// Expires the open, due holds `seqs` (ascending) as one `ExpiredHolds` event; false if there are none.
    fn expire_holds(&self, books: &mut Books<'_>, seqs: Vec<u64>, now: u64) -> bool {
        if seqs.is_empty() {
            return false;
        }
        self.record(books, &Event::ExpiredHolds { environment: books.cell.id.clone(), seqs }, now);
        true
    }

    /// Applies a decided event to one environment's books and hands it to the sink, under the same locks.
    /// The alert levels it leaves are decided before it is logged, and logged with it.
    fn record(&self, books: &mut Books<'_>, event: &Event, now: u64) {
        self.evolve(books, event, now).expect("a decided event applies");
        let levels = books.levels();
        let seq = self.sink.record(now, event, Some(levels));
        books.env.applied_seq = seq;
        self.raise_alerts(books, event, levels, now, seq);
    }

    /// Applies a tenant-level event.
    fn evolve_tenant(&self, tenant: &mut Tenant, event: &Event, now: u64) {
        tenant.roll_over(now);
        let (amount_milli, idempotency_key) = match event {
            Event::Purchased { amount_milli, idempotency_key, .. } => (amount_milli, idempotency_key),
            Event::TenantPolicySet { grace_percent, time_zone, .. } => {
                tenant.grace_percent = *grace_percent;
                tenant.time_zone.clone_from(time_zone);
                alerts::rearm_tenant(tenant);
                return;
            }
            _ => unreachable!("only purchases and policies apply to a tenant alone"),
        };
        tenant.purchased += amount_milli;
        alerts::rearm_tenant(tenant);
        if let Some(key) = idempotency_key {
            tenant.purchase_keys.insert(key.clone(), *amount_milli);
            tenant.purchase_key_order.push_back(key.clone());
            while tenant.purchase_key_order.len() > self.limits.max_purchase_keys_per_tenant {
                let oldest = tenant.purchase_key_order.pop_front().expect("longer than the limit");
                tenant.purchase_keys.remove(&oldest);
            }
        }
    }

    /// Applies an environment-level event to its books. Fails only for an event that does not fit the
    /// books, which a live decision never produces and a replay reports as corruption.
    fn evolve(&self, books: &mut Books<'_>, event: &Event, now: u64) -> Result<(), String> {
        let Books { cell, env, tenant } = books;
        let other = || AgentId::new(usage::OTHER_AGENT).expect("a valid id");
        let (retention, max_resolved) = (self.limits.resolved_retention_ms, self.limits.max_resolved_per_environment);
        let max_agents = self.limits.max_agents_per_environment;
        match event {
            Event::Allocated { amount_milli, draw_from_tenant_pool, .. } => {
                let tenant = tenant.as_deref_mut().ok_or("an allocation needs the tenant locked")?;
                tenant.allocated = tenant.allocated - env.allocated + amount_milli;
                env.allocated = *amount_milli;
                env.draw_from_tenant_pool = *draw_from_tenant_pool;
            }
            Event::PayAsYouGoSet { enabled, budget_milli, .. } => {
                env.payg_enabled = *enabled;
                env.payg_budget = *budget_milli;
            }
            Event::EnvironmentAlertsSet { low_percent, budget_thresholds, .. } => {
                env.low_percent = *low_percent;
                env.set_budget_thresholds(budget_thresholds);
            }
            Event::AgentLimitSet { agent, limit, .. } => {
                let book = env.agents.entry(agent.clone()).or_default();
                book.limit = *limit;
                if *book == AgentBook::default() {
                    env.agents.remove(agent);
                }
            }
            Event::Reserved {
                reservation,
                agent,
                amount_milli,
                draws,
                created_at_ms,
                expires_at_ms,
                idempotency_key,
                rate_card_version,
                attributed_to_other,
                api_key,
            } => {
                let seq = reservation.seq;
                if seq < env.next_seq || env.open.contains_key(&seq) {
                    return Err(format!("reservation {reservation} is not new"));
                }
                env.hold(tenant.as_deref_mut(), *draws);
                let agent = env.agent_held(agent, *amount_milli, max_agents);
                env.next_seq = seq + 1;
                if let Some(key) = idempotency_key {
                    env.remember_key(key.clone(), seq);
                }
                let hold = Hold {
                    agent: agent.clone(),
                    amount: *amount_milli,
                    draws: *draws,
                    created_at_ms: *created_at_ms,
                    expires_at_ms: *expires_at_ms,
                    idempotency_key: idempotency_key.clone(),
                    rate_card_version: *rate_card_version,
                    api_key: api_key.clone(),
                };
                // The key's count, like the server's, was taken when the hold was decided.
                env.open.insert(seq, Box::new(hold));
                self.expiries.push(*expires_at_ms, seq, Arc::clone(cell));
                let usage_agent = if *attributed_to_other { other() } else { agent.clone() };
                let new_keys = env.usage_mut().record_grant(now, &usage_agent);
                count_usage_keys(cell, tenant, new_keys, now);
            }
            Event::Committed { reservation, actual_milli, settlement, items, attributed_to_other } => {
                if priced_total(items) != *actual_milli
                    || settlement.charged.total().checked_add(settlement.overage_milli) != Some(*actual_milli)
                {
                    return Err(format!("the commit of {reservation} does not add up"));
                }
                let resolution =
                    Resolution::Committed(Box::new(Commitment { actual: *actual_milli, settlement: *settlement }));
                let agent = env
                    .hold_of(reservation.seq)
                    .map(|hold| hold.agent.clone())
                    .ok_or_else(|| format!("reservation {reservation} is neither open nor resolved"))?;
                if let Some(hold) = env.open.remove(&reservation.seq) {
                    self.open_total.fetch_sub(1, Ordering::Relaxed);
                    self.key_hold_resolved(hold.api_key.as_ref());
                    env.settle(tenant.as_deref_mut(), hold.draws, settlement).map_err(|e| e.to_string())?;
                    env.agent_resolved(&hold.agent, hold.amount, *actual_milli, max_agents);
                    env.remember(reservation.seq, Resolved { hold, resolution }, now, retention, max_resolved);
                } else {
                    let record = env.resolved_mut(reservation.seq).filter(|r| r.resolution == Resolution::Expired);
                    let record =
                        record.ok_or_else(|| format!("reservation {reservation} is neither open nor expired"))?;
                    record.resolution = resolution;
                    let agent = record.hold.agent.clone();
                    env.settle(tenant.as_deref_mut(), Draws::default(), settlement).map_err(|e| e.to_string())?;
                    env.agent_resolved(&agent, 0, *actual_milli, max_agents);
                }
                let usage_agent = if *attributed_to_other { other() } else { agent };
                let lines = usage::split(items, settlement.charged, settlement.overage_milli);
                let new_keys = env.usage_mut().record_charge(now, &usage_agent, &lines);
                count_usage_keys(cell, tenant, new_keys, now);
            }
            Event::Released { reservation } => {
                if !self.end_open_hold(env, tenant.as_deref_mut(), reservation.seq, Ending::Released, now) {
                    let record = env.resolved_mut(reservation.seq).filter(|r| r.resolution == Resolution::Expired);
                    let record =
                        record.ok_or_else(|| format!("reservation {reservation} is neither open nor expired"))?;
                    record.resolution = Resolution::Released { released: 0 };
                }
            }
            Event::Expired { reservation } => {
                if !self.end_open_hold(env, tenant.as_deref_mut(), reservation.seq, Ending::Expired, now) {
                    return Err(format!("reservation {reservation} is not open"));
                }
            }
            Event::ExpiredHolds { environment, seqs } => {
                // All checked before any expires, so that an event that does not fit changes nothing.
                // The sweep lists each hold once, in ascending order; a repeat would expire nothing twice.
                if seqs.windows(2).any(|pair| pair[0] >= pair[1]) {
                    return Err(format!("the expired holds of {environment} are not in ascending order"));
                }
                // Taken out first, and put back if one is missing: one search of `open` per hold.
                let mut taken = Vec::with_capacity(seqs.len());
                for &seq in seqs {
                    match env.open.remove(&seq) {
                        Some(hold) => taken.push((seq, hold)),
                        None => {
                            env.open.extend(taken);
                            return Err(format!("reservation {environment}/{seq} is not open"));
                        }
                    }
                }
                for (seq, hold) in taken {
                    self.end_taken_hold(env, tenant.as_deref_mut(), seq, hold, Ending::Expired, now);
                }
            }
            Event::ReleasedAll { agent, through_seq, count, released_milli, .. } => {
                let (seqs, milli) = holds::released_by(env, agent.as_ref(), *through_seq);
                if (seqs.len() as u64, milli) != (*count, *released_milli) {
                    return Err(format!(
                        "a release of {count} holds of {released_milli} milli finds {} holds of {milli} milli",
                        seqs.len()
                    ));
                }
                for seq in seqs {
                    let released = self.end_open_hold(env, tenant.as_deref_mut(), seq, Ending::Released, now);
                    assert!(released, "selected among the open holds");
                }
            }
            Event::Purchased { .. }
            | Event::TenantPolicySet { .. }
            | Event::Linked { .. }
            | Event::RateCardSet { .. }
            | Event::ApiKeyCreated { .. }
            | Event::ApiKeyRevoked { .. } => {
                unreachable!("tenant, link, rate card and API key events do not apply to an environment's books")
            }
        }
        Ok(())
    }

    /// Checks every invariant across the whole ledger; for tests and assertions, not the hot path.
    pub fn verify(&self) -> Result<(), String> {
        let _admin = self.admin.lock();
        let mut per_tenant: HashMap<TenantId, (Milli, Milli, Milli)> = HashMap::new();
        let mut open = 0u64;
        for slot in self.environments.iter() {
            let Slot::Capacity(cell) = slot.value() else {
                continue;
            };
            let env = cell.books.lock();
            let mut held = Draws::default();
            for hold in env.open.values() {
                held = held.plus(hold.draws);
                if hold.draws.total() != hold.amount {
                    return Err(format!("{}: a hold's draws do not add up to its amount", cell.id));
                }
            }
            if held != env.held {
                return Err(format!("{}: held {:?} != sum of open holds {:?}", cell.id, env.held, held));
            }
            let allocation_taken =
                env.used.get(Source::EnvironmentAllocation) + env.held.get(Source::EnvironmentAllocation);
            if allocation_taken > env.allocated {
                return Err(format!(
                    "{}: {allocation_taken} milli taken from an allocation of {}",
                    cell.id, env.allocated
                ));
            }
            let mut agents_held: HashMap<&AgentId, Milli> = HashMap::new();
            for hold in env.open.values() {
                *agents_held.entry(&hold.agent).or_default() += hold.amount;
            }
            for (agent, book) in &env.agents {
                if book.held > agents_held.get(agent).copied().unwrap_or(0) {
                    return Err(format!("{}: agent {agent} holds more than its open holds", cell.id));
                }
            }
            open += env.open.len() as u64;
            let tenant_period = cell.tenant.lock().period;
            if env.period > tenant_period {
                return Err(format!("{}: its period is later than its tenant's", cell.id));
            }
            let sums = per_tenant.entry(env.tenant.clone()).or_default();
            sums.0 += env.allocated;
            if env.period == tenant_period {
                sums.1 += env.used.get(Source::TenantPool);
            }
            sums.2 += env.held.get(Source::TenantPool);
        }
        let mut usage_keys = self.usage_keys_by_tenant();
        for entry in self.tenants.iter() {
            let tenant = entry.value().lock();
            let keys = usage_keys.remove(entry.key()).unwrap_or_default();
            if (&tenant.usage_keys_month, tenant.usage_keys) != (&keys.0, keys.1) {
                return Err(format!("tenant {}: usage key count differs from its environments' roll-ups", entry.key()));
            }
            let (allocated, pool_used, pool_held) = per_tenant.remove(entry.key()).unwrap_or_default();
            if (tenant.allocated, tenant.pool_used, tenant.pool_held) != (allocated, pool_used, pool_held) {
                return Err(format!("tenant {}: counters differ from the sums over its environments", entry.key()));
            }
            if tenant.allocated > tenant.purchased
                || tenant.allocated + tenant.pool_used + tenant.pool_held > tenant.pool_limit()
            {
                return Err(format!("tenant {}: more allocated or drawn than purchased plus grace", entry.key()));
            }
        }
        if open != self.open_reservations() {
            return Err(format!("{open} open holds, but the server counts {}", self.open_reservations()));
        }
        self.verify_key_holds()
    }
}

/// A new environment of the tenant given by its entry in the tenant map (see [`Ledger::tenant_entry`]).
fn new_cell(environment: &EnvironmentId, (tenant, tenant_cell): (TenantId, Arc<Mutex<Tenant>>)) -> Arc<CapacityCell> {
    let books = Mutex::new(Environment::new(tenant.clone()));
    Arc::new(CapacityCell { id: environment.clone(), owner: tenant, tenant: tenant_cell, books })
}

/// Takes `amount` from what the environment has available, in draw order, or refuses it whole.
fn plan_draws(books: &Books<'_>, amount: Milli) -> Result<Draws, LedgerError> {
    Draws::plan(amount, books.available()).map_err(|available| LedgerError::QuotaDepleted {
        environment: books.cell.id.clone(),
        requested_milli: amount,
        available_milli: available,
    })
}

fn tenant_capacity(id: &TenantId, tenant: &Tenant) -> TenantCapacity {
    TenantCapacity {
        tenant: id.clone(),
        purchased_milli: tenant.purchased,
        allocated_milli: tenant.allocated,
        pool_used_milli: tenant.pool_used,
        pool_reserved_milli: tenant.pool_held,
        grace_percent: tenant.grace_percent,
        time_zone: tenant.time_zone.clone(),
        period: tenant.period.name(),
        grace_used_milli: tenant.grace_used(),
    }
}

/// Whether ending holds could turn this refusal of a new hold into a grant.
fn relieved_by_expiry(error: &LedgerError) -> bool {
    matches!(
        error,
        LedgerError::QuotaDepleted { .. }
            | LedgerError::AgentLimitReached { .. }
            | LedgerError::TooManyOpenReservations { .. }
    )
}

/// Refuses a hold that the agent's limit forbids.
fn check_agent_limit(
    environment: &EnvironmentId,
    agent: &AgentId,
    book: &AgentBook,
    limit: AgentLimit,
    amount: Milli,
) -> Result<(), LedgerError> {
    if limit.disabled {
        return Err(LedgerError::AgentDisabled { environment: environment.clone(), agent: agent.clone() });
    }
    let after = book.used.saturating_add(book.held).saturating_add(amount);
    if limit.stop_when_exceeded && limit.limit_milli > 0 && after > limit.limit_milli {
        return Err(LedgerError::AgentLimitReached {
            environment: environment.clone(),
            agent: agent.clone(),
            limit_milli: limit.limit_milli,
            used_milli: book.used,
            held_milli: book.held,
            requested_milli: amount,
        });
    }
    Ok(())
}

fn agent_limit_view(books: &Books<'_>, agent: &AgentId, book: &AgentBook) -> AgentLimitView {
    AgentLimitView {
        environment: books.cell.id.clone(),
        agent: agent.clone(),
        limit: book.limit,
        used_milli: book.used,
        held_milli: book.held,
        period: books.env.period.name(),
    }
}

/// A reservation request, borrowed from its command.
struct ReserveRequest<'a> {
    agent: &'a AgentId,
    usage: &'a Usage,
    idempotency_key: Option<&'a IdempotencyKey>,
    expires_at_ms: &'a u64,
}

fn priced_total(items: &[PricedItem]) -> Milli {
    // Each price is checked against the limit as it is added, so the sum fits.
    items.iter().map(|item| item.amount_milli).sum()
}

/// Adds the usage keys an event created to its tenant's count for the month of `now`. The count
/// follows the newest month only: the cap applies to the current month.
fn count_usage_keys(cell: &CapacityCell, tenant: &mut Option<MutexGuard<'_, Tenant>>, new_keys: u64, now: u64) {
    if new_keys == 0 {
        return;
    }
    let month = period::period_of(now);
    let count = |tenant: &mut Tenant| {
        if tenant.usage_keys_month < month {
            tenant.usage_keys_month = month.clone();
            tenant.usage_keys = 0;
        }
        if tenant.usage_keys_month == month {
            tenant.usage_keys += new_keys;
        }
    };
    match tenant.as_deref_mut() {
        Some(tenant) => count(tenant),
        None => count(&mut cell.tenant.lock()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only refusals that ended holds could lift look for overdue holds: not a disabled agent.
    #[test]
    fn only_refusals_that_ending_holds_could_lift_expire_overdue_holds() {
        let environment = EnvironmentId::new("e").unwrap();
        let agent = AgentId::new("a").unwrap();
        let full = |scope| LedgerError::TooManyOpenReservations { scope, limit: 1 };
        let depleted =
            LedgerError::QuotaDepleted { environment: environment.clone(), requested_milli: 2, available_milli: 1 };
        let agent_limit = LedgerError::AgentLimitReached {
            environment: environment.clone(),
            agent: agent.clone(),
            limit_milli: 1,
            used_milli: 1,
            held_milli: 0,
            requested_milli: 1,
        };
        let caps = [OpenReservationScope::Environment, OpenReservationScope::ApiKey, OpenReservationScope::Server];
        for lifted in [depleted, agent_limit].into_iter().chain(caps.map(full)) {
            assert!(relieved_by_expiry(&lifted), "{lifted:?}");
        }
        assert!(!relieved_by_expiry(&LedgerError::AgentDisabled { environment, agent }));
    }

    /// Uncapped pay-as-you-go offers `Milli::MAX` whatever is already held: a hold that would take the
    /// environment's holds past the largest count is refused, where it used to wrap (or panic in debug).
    #[test]
    fn holds_past_the_largest_count_are_refused_not_wrapped() {
        let ledger = Ledger::new(Limits::default());
        let (tenant, environment) = (TenantId::new("t").unwrap(), EnvironmentId::new("e").unwrap());
        let admin = [
            Command::PurchaseCapacity { tenant: tenant.clone(), amount_milli: 5, idempotency_key: None },
            Command::AllocateCapacity {
                tenant,
                environment: environment.clone(),
                amount_milli: 5,
                draw_from_tenant_pool: false,
            },
            Command::SetPayAsYouGo { environment: environment.clone(), enabled: true, budget_milli: 0 },
        ];
        for command in &admin {
            ledger.apply(command, 0).unwrap();
        }
        let reserve = |amount_milli| Command::Reserve {
            environment: environment.clone(),
            agent: AgentId::new("a").unwrap(),
            usage: Usage::Milli(amount_milli),
            idempotency_key: None,
            expires_at_ms: 1_000,
            api_key: None,
        };
        assert!(ledger.apply(&reserve(Milli::MAX - 1), 0).is_ok());
        assert!(ledger.apply(&reserve(1), 0).is_ok());
        let before = ledger.balance(&environment, 0).unwrap();
        assert_eq!(before.reserved_milli, Milli::MAX);
        assert_eq!(ledger.apply(&reserve(1), 0), Err(LedgerError::CounterOverflow { what: "the environment's holds" }));
        assert_eq!(ledger.balance(&environment, 0).unwrap(), before);
        assert_eq!(ledger.open_reservations(), 2);
        assert_eq!(ledger.verify(), Ok(()));
    }
}
