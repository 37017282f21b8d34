//! The accounting core: tenants, environments, holds and the rules that move capacity between them.
//!
//! Rules only: no I/O, no async, no transport types, and no clock (every call is given `now` in Unix
//! milliseconds). Every state change is a [`Command`] applied by [`Ledger::apply`], so a log of
//! commands replays to the same state.
//!
//! Concurrency: each capacity environment has its own lock, and a tenant's lock is taken inside it
//! only when an operation may touch the tenant pool (lock order: environment, then tenant). Admin
//! commands, which change which environments exist and how they relate, are serialised on one admin
//! lock that the hot path (reserve, commit, release, expire, balance) never takes.

mod account;
mod command;
mod error;
mod event;
mod expiry;
mod holds;
mod ids;
pub mod period;
pub mod pricing;
mod restore;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};

pub use account::{Draws, Source};
pub use command::{Command, Grant, Link, Outcome, ReleaseSummary, Settled, Settlement, TenantCapacity};
pub use error::{LedgerError, OpenReservationScope};
pub use event::{Discard, Event, EventSink};
pub use holds::{HoldPage, MAX_HOLDS_SCANNED_PER_PAGE, OpenHold};
pub use ids::{
    AgentId, EnvironmentId, IdError, IdempotencyKey, MAX_ID_BYTES, MAX_RESERVATION_ID_BYTES, ReservationId,
    ReservationIdError, TenantId,
};
pub use restore::{RestoreError, SnapshotItem};

use account::{Environment, Hold, Resolution, Resolved, Tenant};
use expiry::ExpiryQueue;

/// Thousandths of a message: every amount in the core is exact in this unit.
pub type Milli = u64;
pub const MILLI_PER_MESSAGE: Milli = 1_000;

pub const DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT: u64 = 1_000_000;
pub const DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL: u64 = 4_000_000;
/// Resolved reservations are remembered this long so that retries get the first answer.
pub const DEFAULT_RESOLVED_RETENTION_MS: u64 = 24 * 60 * 60 * 1_000;
pub const DEFAULT_MAX_RESOLVED_PER_ENVIRONMENT: usize = 1_000_000;
pub const DEFAULT_MAX_PURCHASE_KEYS_PER_TENANT: usize = 10_000;

const _: () = assert!(DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT <= DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_open_reservations_per_environment: u64,
    pub max_open_reservations_total: u64,
    pub resolved_retention_ms: u64,
    pub max_resolved_per_environment: usize,
    pub max_purchase_keys_per_tenant: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_open_reservations_per_environment: DEFAULT_MAX_OPEN_RESERVATIONS_PER_ENVIRONMENT,
            max_open_reservations_total: DEFAULT_MAX_OPEN_RESERVATIONS_TOTAL,
            resolved_retention_ms: DEFAULT_RESOLVED_RETENTION_MS,
            max_resolved_per_environment: DEFAULT_MAX_RESOLVED_PER_ENVIRONMENT,
            max_purchase_keys_per_tenant: DEFAULT_MAX_PURCHASE_KEYS_PER_TENANT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceState {
    Ok,
    /// 20% or less of allocation plus pay-as-you-go budget is available.
    Low,
    /// Nothing is available.
    Depleted,
}

/// A capacity environment's balance at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// What a dry run would hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub draws: Draws,
    pub balance: Balance,
}

#[derive(Clone)]
enum Slot {
    Capacity(Arc<CapacityCell>),
    /// An app environment and the capacity environment it is linked to, if any.
    App {
        target: Option<EnvironmentId>,
        applied_seq: u64,
    },
}

struct CapacityCell {
    id: EnvironmentId,
    tenant: Arc<Mutex<Tenant>>,
    books: Mutex<Environment>,
}

/// One environment's books, locked, with its tenant locked too when the operation may touch the pool.
struct Books<'a> {
    cell: &'a CapacityCell,
    env: MutexGuard<'a, Environment>,
    tenant: Option<MutexGuard<'a, Tenant>>,
}

impl<'a> Books<'a> {
    fn lock(cell: &'a CapacityCell) -> Self {
        let env = cell.books.lock();
        let tenant = env.touches_pool().then(|| cell.tenant.lock());
        Self { cell, env, tenant }
    }

    fn lock_with_tenant(cell: &'a CapacityCell) -> Self {
        let env = cell.books.lock();
        let tenant = Some(cell.tenant.lock());
        Self { cell, env, tenant }
    }

    fn available(&self) -> Draws {
        self.env.available(self.tenant.as_deref())
    }

    fn balance(&self, now: u64) -> Balance {
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
            period: period::period_of(now),
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
    if u128::from(available) * 5 <= base { BalanceState::Low } else { BalanceState::Ok }
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
    expiries: ExpiryQueue,
    sink: Arc<dyn EventSink>,
}

impl Ledger {
    /// A ledger that keeps its events nowhere.
    pub fn new(limits: Limits) -> Self {
        Self::with_sink(limits, Arc::new(Discard))
    }

    /// A ledger that hands every applied event to `sink`.
    pub fn with_sink(limits: Limits, sink: Arc<dyn EventSink>) -> Self {
        Self {
            limits,
            tenants: DashMap::new(),
            environments: DashMap::new(),
            admin: Mutex::new(()),
            open_total: AtomicU64::new(0),
            expiries: ExpiryQueue::new(),
            sink,
        }
    }

    /// Applies one state change at time `now`. A refused command changes nothing.
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
            Command::Reserve { environment, agent, amount_milli, idempotency_key, expires_at_ms } => {
                let hold = Hold {
                    agent: agent.clone(),
                    amount: *amount_milli,
                    draws: Draws::default(),
                    created_at_ms: now,
                    expires_at_ms: *expires_at_ms,
                    idempotency_key: idempotency_key.clone(),
                    rate_card_version: pricing::RATE_CARD_VERSION,
                };
                self.reserve(environment, &hold, now).map(Outcome::Reserved)
            }
            Command::Commit { reservation, actual_milli } => {
                self.commit(reservation, *actual_milli, now).map(Outcome::Committed)
            }
            Command::Release { reservation } => self.release(reservation, now).map(Outcome::Released),
            Command::Expire { reservation } => self.expire(reservation, now).map(Outcome::Expired),
            Command::ReleaseAll { environment, agent } => {
                self.release_all(environment, agent.as_ref(), now).map(Outcome::ReleasedAll)
            }
        }
    }

    /// Whether a reservation of `amount` would be granted now, and from which sources.
    pub fn quote(&self, environment: &EnvironmentId, amount: Milli, now: u64) -> Result<Quote, LedgerError> {
        let cell = self.capacity_cell(environment)?;
        let books = Books::lock(&cell);
        let draws = plan_draws(&books, amount)?;
        Ok(Quote { draws, balance: books.balance(now) })
    }

    /// What a dry run answers: the quote, or the refusal `reserve` would give now, open-reservation caps
    /// included and checked in the same order.
    pub fn dry_run(&self, environment: &EnvironmentId, amount: Milli, now: u64) -> Result<Quote, LedgerError> {
        let cell = self.capacity_cell(environment)?;
        let books = Books::lock(&cell);
        let draws = self.plan_hold(&books, amount)?;
        let max_total = self.limits.max_open_reservations_total;
        if self.open_total.load(Ordering::Relaxed) >= max_total {
            return Err(LedgerError::TooManyOpenReservations { scope: OpenReservationScope::Server, limit: max_total });
        }
        Ok(Quote { draws, balance: books.balance(now) })
    }

    /// The draws of a new hold of `amount`, or why the environment refuses it: its open-hold cap, too
    /// little capacity, or holds that could no longer be counted. The server-wide cap is the caller's.
    fn plan_hold(&self, books: &Books<'_>, amount: Milli) -> Result<Draws, LedgerError> {
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
        let cell = self.capacity_cell(environment)?;
        Ok(Books::lock(&cell).balance(now))
    }

    pub fn tenant(&self, tenant: &TenantId) -> Result<TenantCapacity, LedgerError> {
        let cell =
            self.tenants.get(tenant).map(|t| t.clone()).ok_or_else(|| LedgerError::UnknownTenant(tenant.clone()))?;
        let summary = tenant_capacity(tenant, &cell.lock());
        Ok(summary)
    }

    /// Reservations whose expiry is at or before `now`, at most `max`, for the caller to `Expire`.
    /// Some may have resolved meanwhile; expiring those does nothing.
    pub fn due_expiries(&self, now: u64, max: usize) -> Vec<ReservationId> {
        self.expiries.pop_due(now, max)
    }

    pub fn open_reservations(&self) -> u64 {
        self.open_total.load(Ordering::Relaxed)
    }

    fn capacity_cell(&self, id: &EnvironmentId) -> Result<Arc<CapacityCell>, LedgerError> {
        let slot = self.environments.get(id).map(|s| s.clone());
        match slot {
            None => Err(LedgerError::UnknownEnvironment(id.clone())),
            Some(Slot::Capacity(cell)) => Ok(cell),
            Some(Slot::App { target: None, .. }) => Err(LedgerError::AppEnvironmentNotLinked(id.clone())),
            Some(Slot::App { target: Some(target), .. }) => {
                match self.environments.get(&target).map(|s| s.clone()) {
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
            Some(Slot::App { .. }) => Err(LedgerError::NotACapacityEnvironment(id.clone())),
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
        self.evolve_tenant(&mut books, &event);
        books.applied_seq = self.sink.record(now, &event);
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
        let tenant_cell =
            self.tenants.get(tenant).map(|t| t.clone()).ok_or_else(|| LedgerError::UnknownTenant(tenant.clone()))?;
        let (cell, is_new) = match self.environments.get(environment).map(|s| s.clone()) {
            None => (new_cell(environment, tenant, tenant_cell), true),
            Some(Slot::App { .. }) => return Err(LedgerError::NotACapacityEnvironment(environment.clone())),
            Some(Slot::Capacity(cell)) => (cell, false),
        };
        let mut books = Books::lock_with_tenant(&cell);
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
        let fits = allocated_after.and_then(|a| a.checked_add(pool_taken)).is_some_and(|total| total <= pool.purchased);
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
        let balance = books.balance(now);
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
        let mut books = Books::lock(&cell);
        let event = Event::PayAsYouGoSet { environment: environment.clone(), enabled, budget_milli: budget };
        self.record(&mut books, &event, now);
        Ok(books.balance(now))
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
        let applied_seq = self.sink.record(now, &event);
        self.environments
            .insert(app.clone(), Slot::App { target: target.as_ref().map(|(e, _)| e.clone()), applied_seq });
        Ok(Link { app_environment: app.clone(), target })
    }

    fn reserve(&self, environment: &EnvironmentId, request: &Hold, now: u64) -> Result<Grant, LedgerError> {
        let cell = self.capacity_cell(environment)?;
        let mut books = Books::lock(&cell);
        if let Some(key) = &request.idempotency_key
            && let Some(&seq) = books.env.idempotency.get(key)
        {
            return replay_grant(&books, seq, request, now);
        }
        let amount = request.amount;
        let draws = self.plan_hold(&books, amount)?;
        // The server-wide count is taken last, so that every refusal above leaves it untouched.
        let max_total = self.limits.max_open_reservations_total;
        if self.open_total.fetch_add(1, Ordering::Relaxed) >= max_total {
            self.open_total.fetch_sub(1, Ordering::Relaxed);
            return Err(LedgerError::TooManyOpenReservations { scope: OpenReservationScope::Server, limit: max_total });
        }
        let reservation = ReservationId { environment: cell.id.clone(), seq: books.env.next_seq };
        let event = Event::Reserved {
            reservation: reservation.clone(),
            agent: request.agent.clone(),
            amount_milli: amount,
            draws,
            created_at_ms: request.created_at_ms,
            expires_at_ms: request.expires_at_ms,
            idempotency_key: request.idempotency_key.clone(),
            rate_card_version: request.rate_card_version,
        };
        self.record(&mut books, &event, now);
        Ok(Grant {
            reservation,
            amount_milli: amount,
            draws,
            expires_at_ms: request.expires_at_ms,
            balance: books.balance(now),
            replayed: false,
        })
    }

    fn commit(&self, reservation: &ReservationId, actual: Milli, now: u64) -> Result<Settled<Settlement>, LedgerError> {
        let cell = self.reservation_cell(reservation)?;
        let mut books = Books::lock(&cell);
        self.expire_if_due(&mut books, reservation, now);
        let seq = reservation.seq;
        let settlement = if let Some(hold) = books.env.open.get(&seq) {
            books.env.settlement(books.tenant.as_deref(), hold.draws, actual, false)?
        } else {
            match books.env.resolved.get(&seq).map(|r| r.resolution) {
                None => return Err(LedgerError::UnknownReservation(reservation.to_string())),
                Some(Resolution::Committed { actual: first, settlement }) => {
                    if first != actual {
                        return Err(LedgerError::AlreadyCommitted {
                            reservation: reservation.clone(),
                            committed_milli: first,
                        });
                    }
                    return Ok(Settled { result: settlement, balance: books.balance(now), replayed: true });
                }
                Some(Resolution::Released { .. }) => return Err(LedgerError::AlreadyReleased(reservation.clone())),
                Some(Resolution::Expired) => {
                    books.env.settlement(books.tenant.as_deref(), Draws::default(), actual, true)?
                }
            }
        };
        let event = Event::Committed { reservation: reservation.clone(), actual_milli: actual, settlement };
        self.record(&mut books, &event, now);
        Ok(Settled { result: settlement, balance: books.balance(now), replayed: false })
    }

    fn release(&self, reservation: &ReservationId, now: u64) -> Result<Settled<Milli>, LedgerError> {
        let cell = self.reservation_cell(reservation)?;
        let mut books = Books::lock(&cell);
        self.expire_if_due(&mut books, reservation, now);
        let seq = reservation.seq;
        let released = match books.env.open.get(&seq) {
            Some(hold) => hold.amount,
            None => match books.env.resolved.get(&seq).map(|r| r.resolution) {
                None => return Err(LedgerError::UnknownReservation(reservation.to_string())),
                Some(Resolution::Released { released }) => {
                    return Ok(Settled { result: released, balance: books.balance(now), replayed: true });
                }
                Some(Resolution::Committed { .. }) => return Err(LedgerError::ReleaseAfterCommit(reservation.clone())),
                // Expiry already returned the hold; the release only settles the reservation.
                Some(Resolution::Expired) => 0,
            },
        };
        self.record(&mut books, &Event::Released { reservation: reservation.clone() }, now);
        Ok(Settled { result: released, balance: books.balance(now), replayed: false })
    }

    fn expire(&self, reservation: &ReservationId, now: u64) -> Result<Option<Milli>, LedgerError> {
        let Ok(cell) = self.reservation_cell(reservation) else {
            return Ok(None);
        };
        let mut books = Books::lock(&cell);
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

    /// Applies a decided event to one environment's books and hands it to the sink, under the same locks.
    fn record(&self, books: &mut Books<'_>, event: &Event, now: u64) {
        self.evolve(books, event, now).expect("a decided event applies");
        books.env.applied_seq = self.sink.record(now, event);
    }

    /// Applies a tenant-level event.
    fn evolve_tenant(&self, tenant: &mut Tenant, event: &Event) {
        let Event::Purchased { amount_milli, idempotency_key, .. } = event else {
            unreachable!("only purchases apply to a tenant alone")
        };
        tenant.purchased += amount_milli;
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
        let Books { env, tenant, .. } = books;
        let (retention, max_resolved) = (self.limits.resolved_retention_ms, self.limits.max_resolved_per_environment);
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
            Event::Reserved {
                reservation,
                agent,
                amount_milli,
                draws,
                created_at_ms,
                expires_at_ms,
                idempotency_key,
                rate_card_version,
            } => {
                let seq = reservation.seq;
                if seq < env.next_seq || env.open.contains_key(&seq) {
                    return Err(format!("reservation {reservation} is not new"));
                }
                env.hold(tenant.as_deref_mut(), *draws);
                env.next_seq = seq + 1;
                if let Some(key) = idempotency_key {
                    env.idempotency.insert(key.clone(), seq);
                }
                let hold = Hold {
                    agent: agent.clone(),
                    amount: *amount_milli,
                    draws: *draws,
                    created_at_ms: *created_at_ms,
                    expires_at_ms: *expires_at_ms,
                    idempotency_key: idempotency_key.clone(),
                    rate_card_version: *rate_card_version,
                };
                env.open.insert(seq, hold);
                self.expiries.push(*expires_at_ms, reservation.clone());
            }
            Event::Committed { reservation, actual_milli, settlement } => {
                let resolution = Resolution::Committed { actual: *actual_milli, settlement: *settlement };
                if let Some(hold) = env.open.remove(&reservation.seq) {
                    self.open_total.fetch_sub(1, Ordering::Relaxed);
                    env.settle(tenant.as_deref_mut(), hold.draws, settlement).map_err(|e| e.to_string())?;
                    env.remember(reservation.seq, Resolved { hold, resolution }, now, retention, max_resolved);
                } else {
                    let record = env.resolved.get_mut(&reservation.seq).filter(|r| r.resolution == Resolution::Expired);
                    let record =
                        record.ok_or_else(|| format!("reservation {reservation} is neither open nor expired"))?;
                    record.resolution = resolution;
                    env.settle(tenant.as_deref_mut(), Draws::default(), settlement).map_err(|e| e.to_string())?;
                }
            }
            Event::Released { reservation } => {
                if env.release_open(tenant.as_deref_mut(), reservation.seq, now, retention, max_resolved).is_some() {
                    self.open_total.fetch_sub(1, Ordering::Relaxed);
                } else {
                    let record = env.resolved.get_mut(&reservation.seq).filter(|r| r.resolution == Resolution::Expired);
                    let record =
                        record.ok_or_else(|| format!("reservation {reservation} is neither open nor expired"))?;
                    record.resolution = Resolution::Released { released: 0 };
                }
            }
            Event::Expired { reservation } => {
                let hold = env
                    .open
                    .remove(&reservation.seq)
                    .ok_or_else(|| format!("reservation {reservation} is not open"))?;
                self.open_total.fetch_sub(1, Ordering::Relaxed);
                env.unhold(tenant.as_deref_mut(), hold.draws);
                env.remember(
                    reservation.seq,
                    Resolved { hold, resolution: Resolution::Expired },
                    now,
                    retention,
                    max_resolved,
                );
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
                    env.release_open(tenant.as_deref_mut(), seq, now, retention, max_resolved)
                        .expect("selected among the open holds");
                }
                self.open_total.fetch_sub(*count, Ordering::Relaxed);
            }
            Event::Purchased { .. } | Event::Linked { .. } => {
                unreachable!("tenant and link events do not apply to an environment's books")
            }
        }
        Ok(())
    }

    /// Checks every invariant across the whole ledger; for tests and assertions, not the hot path.
    pub fn verify(&self) -> Result<(), String> {
        let _admin = self.admin.lock();
        let mut per_tenant: std::collections::HashMap<TenantId, (Milli, Milli, Milli)> = Default::default();
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
            open += env.open.len() as u64;
            let sums = per_tenant.entry(env.tenant.clone()).or_default();
            sums.0 += env.allocated;
            sums.1 += env.used.get(Source::TenantPool);
            sums.2 += env.held.get(Source::TenantPool);
        }
        for entry in self.tenants.iter() {
            let tenant = entry.value().lock();
            let (allocated, pool_used, pool_held) = per_tenant.remove(entry.key()).unwrap_or_default();
            if (tenant.allocated, tenant.pool_used, tenant.pool_held) != (allocated, pool_used, pool_held) {
                return Err(format!("tenant {}: counters differ from the sums over its environments", entry.key()));
            }
            if tenant.allocated + tenant.pool_used + tenant.pool_held > tenant.purchased {
                return Err(format!("tenant {}: more allocated or drawn than purchased", entry.key()));
            }
        }
        if open != self.open_reservations() {
            return Err(format!("{open} open holds, but the server counts {}", self.open_reservations()));
        }
        Ok(())
    }
}

fn new_cell(environment: &EnvironmentId, tenant: &TenantId, tenant_cell: Arc<Mutex<Tenant>>) -> Arc<CapacityCell> {
    let books = Mutex::new(Environment::new(tenant.clone()));
    Arc::new(CapacityCell { id: environment.clone(), tenant: tenant_cell, books })
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
    }
}

/// The earlier grant for a retried idempotency key, if the retry asks for the same thing.
fn replay_grant(books: &Books<'_>, seq: u64, retry: &Hold, now: u64) -> Result<Grant, LedgerError> {
    let first = books
        .env
        .open
        .get(&seq)
        .or_else(|| books.env.resolved.get(&seq).map(|r| &r.hold))
        .expect("an idempotency key maps to a remembered reservation");
    if first.agent != retry.agent || first.amount != retry.amount {
        return Err(LedgerError::IdempotencyKeyReused {
            key: retry.idempotency_key.clone().expect("replays are looked up by key"),
            first: format!("agent {} reserving {} milli", first.agent, first.amount),
        });
    }
    Ok(Grant {
        reservation: ReservationId { environment: books.cell.id.clone(), seq },
        amount_milli: first.amount,
        draws: first.draws,
        expires_at_ms: first.expires_at_ms,
        balance: books.balance(now),
        replayed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            amount_milli,
            idempotency_key: None,
            expires_at_ms: 1_000,
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
