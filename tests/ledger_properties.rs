//! Property tests of the accounting core through its public API. Random sequences of admin and
//! hot-path commands are applied both to a `Ledger` and to a naive model (plain `HashMap`s that
//! implement the rules as the spec states them), and every outcome, balance and quote must match
//! exactly after every step. The model derives every total (held, allocated, pool used) from the
//! individual holds and environments instead of keeping counters, so a counter that drifts in the
//! ledger cannot drift the same way in the model.

use std::collections::{BTreeMap, HashMap};
use std::sync::Barrier;

use proptest::prelude::*;
use proptest::sample::Index;
use quotad::ledger::{
    AgentId, Balance, BalanceState, Command, Draws, EnvironmentId, IdempotencyKey, Ledger, LedgerError, Limits, Link,
    Milli, OVERDUE_HOLDS_EXAMINED, OpenReservationScope, Outcome, ReservationId, Source, TenantCapacity, TenantId,
    Usage, period,
    usage::{UsageQuery, UsageRange},
};

mod ledger_steps;
use ledger_steps::{
    Actual, Allocation, Amount, Pick, Resolve, START_MS, Shape, Step, TENANTS, agent, command, kept, next_month_start,
    retried, setup, tenant,
};

/// Per-source amounts in draw order: allocation, tenant pool, pay-as-you-go.
type Split = [Milli; 3];
const ALLOCATION: usize = 0;
const POOL: usize = 1;
const PAYG: usize = 2;

/// e0..e2 become capacity environments when allocated; `app` is meant to be linked; `ghost` is
/// never created, so commands naming it exercise the unknown-environment paths.
const ENVS: [&str; 5] = ["e0", "e1", "e2", "app", "ghost"];
const APP: usize = 3;
const GHOST: usize = 4;

/// Small open-hold caps so that sequences of 60 steps reach them and test the refusal at the cap.
/// Small open-hold caps, so that short sequences reach them. Resolved reservations are remembered
/// longer than any sequence lasts, months included: the model does not forget them (forgetting is part
/// of `restore_properties`).
fn limits() -> Limits {
    Limits {
        max_open_reservations_per_environment: 4,
        max_open_reservations_total: 6,
        resolved_retention_ms: 10 * 365 * 24 * 3_600 * 1_000,
        ..Limits::default()
    }
}

fn env(i: usize) -> EnvironmentId {
    EnvironmentId::new(ENVS[i]).unwrap()
}

fn split_of(draws: Draws) -> Split {
    Source::DRAW_ORDER.map(|source| draws.get(source))
}
fn add(a: Split, b: Split) -> Split {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
fn sum(a: Split) -> Milli {
    a.iter().sum()
}
fn saturating_sum(a: Split) -> Milli {
    a.iter().fold(0, |total, x| total.saturating_add(*x))
}

/// Takes as much of `amount` as `available` covers, in draw order; returns the take and the shortfall.
fn take(amount: Milli, available: Split) -> (Split, Milli) {
    let mut taken = [0; 3];
    let mut left = amount;
    for (i, free) in available.iter().enumerate() {
        taken[i] = left.min(*free);
        left -= taken[i];
    }
    (taken, left)
}

/// An outcome with `Draws` spelled as arrays, so that the model (which cannot build a `Draws`) can
/// say what it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Tenant(TenantCapacity),
    Balance(Balance),
    Linked(Link),
    Reserved {
        reservation: ReservationId,
        amount: Milli,
        draws: Split,
        expires_at_ms: u64,
        balance: Balance,
        replayed: bool,
    },
    Committed {
        settlement: Settle,
        balance: Balance,
        replayed: bool,
    },
    Released {
        released: Milli,
        balance: Balance,
        replayed: bool,
    },
    Expired(Option<Milli>),
    ReleasedAll {
        count: u64,
        released: Milli,
        balance: Balance,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settle {
    charged: Split,
    released: Milli,
    overage: Milli,
    late: bool,
}

fn seen(outcome: Outcome) -> Seen {
    match outcome {
        Outcome::Tenant(t) => Seen::Tenant(t),
        Outcome::Balance(b) => Seen::Balance(b),
        Outcome::Linked(l) => Seen::Linked(l),
        Outcome::AgentLimit(_) => unreachable!("the steps do not set agent limits"),
        Outcome::ApiKey(_) => unreachable!("the steps do not create API keys"),
        Outcome::Reserved(g) => Seen::Reserved {
            reservation: g.reservation,
            amount: g.amount_milli,
            draws: split_of(g.draws),
            expires_at_ms: g.expires_at_ms,
            balance: g.balance,
            replayed: g.replayed,
        },
        Outcome::Committed(s) => Seen::Committed {
            settlement: Settle {
                charged: split_of(s.result.charged),
                released: s.result.released_milli,
                overage: s.result.overage_milli,
                late: s.result.late,
            },
            balance: s.balance,
            replayed: s.replayed,
        },
        Outcome::Released(s) => Seen::Released { released: s.result, balance: s.balance, replayed: s.replayed },
        Outcome::Expired(e) => Seen::Expired(e),
        Outcome::RateCard(card) => unreachable!("the steps set no rate card, yet got {card:?}"),
        Outcome::ReleasedAll(s) => Seen::ReleasedAll { count: s.count, released: s.released_milli, balance: s.balance },
    }
}

/// The prose in `IdempotencyKeyReused::first` is for people; the test compares the variant and key.
fn normalize(result: Result<Seen, LedgerError>) -> Result<Seen, LedgerError> {
    result.map_err(|e| match e {
        LedgerError::IdempotencyKeyReused { key, .. } => {
            LedgerError::IdempotencyKeyReused { key, first: String::new() }
        }
        other => other,
    })
}

// ---------------------------------------------------------------------------------------------
// The naive model.

#[derive(Debug)]
struct ModelTenant {
    purchased: Milli,
    grace_percent: u32,
    purchase_keys: HashMap<IdempotencyKey, Milli>,
}

impl Default for ModelTenant {
    fn default() -> Self {
        Self { purchased: 0, grace_percent: 100, purchase_keys: HashMap::new() }
    }
}

impl ModelTenant {
    /// What allocations plus pool use and holds may reach.
    fn limit(&self) -> Milli {
        (u128::from(self.purchased) * u128::from(self.grace_percent) / 100) as Milli
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    Open,
    Committed { actual: Milli, settlement: Settle },
    Released(Milli),
    Expired,
}

#[derive(Debug)]
struct ModelHold {
    agent: AgentId,
    amount: Milli,
    draws: Split,
    expires_at_ms: u64,
    state: HoldState,
}

/// Only what the spec names; held amounts are summed from `holds` whenever they are needed.
#[derive(Debug)]
struct ModelEnv {
    tenant: TenantId,
    allocated: Milli,
    draw_from_tenant_pool: bool,
    payg_enabled: bool,
    payg_budget: Milli,
    used: Split,
    overage: Milli,
    holds: BTreeMap<u64, ModelHold>,
    reservation_keys: HashMap<IdempotencyKey, u64>,
}

impl ModelEnv {
    fn held(&self) -> Split {
        self.holds.values().filter(|h| h.state == HoldState::Open).fold([0; 3], |acc, h| add(acc, h.draws))
    }
    fn open(&self) -> usize {
        self.holds.values().filter(|h| h.state == HoldState::Open).count()
    }
}

#[derive(Debug)]
enum Slot {
    Capacity(ModelEnv),
    App(Option<EnvironmentId>),
}

struct Model {
    limits: Limits,
    tenants: HashMap<TenantId, ModelTenant>,
    envs: HashMap<EnvironmentId, Slot>,
    /// Every granted hold with its expiry; the sweep takes those that are due, once each.
    expiry_queue: Vec<(u64, ReservationId)>,
    /// Holds expired by refused reservations (the one change a refusal may make).
    overdue_expired: usize,
}

impl Model {
    fn new(limits: Limits) -> Self {
        Self { limits, tenants: HashMap::new(), envs: HashMap::new(), expiry_queue: Vec::new(), overdue_expired: 0 }
    }

    fn capacity(&self, id: &EnvironmentId) -> &ModelEnv {
        match &self.envs[id] {
            Slot::Capacity(e) => e,
            Slot::App(_) => panic!("{id} is not a capacity environment"),
        }
    }
    fn capacity_mut(&mut self, id: &EnvironmentId) -> &mut ModelEnv {
        match self.envs.get_mut(id) {
            Some(Slot::Capacity(e)) => e,
            _ => panic!("{id} is not a capacity environment"),
        }
    }
    fn capacities(&self) -> impl Iterator<Item = (&EnvironmentId, &ModelEnv)> {
        self.envs.iter().filter_map(|(id, slot)| match slot {
            Slot::Capacity(e) => Some((id, e)),
            Slot::App(_) => None,
        })
    }

    /// (sum of allocations, pool used, pool held) over the tenant's environments.
    fn tenant_sums(&self, tenant: &TenantId) -> (Milli, Milli, Milli) {
        self.capacities()
            .filter(|(_, e)| e.tenant == *tenant)
            .fold((0, 0, 0), |(a, u, h), (_, e)| (a + e.allocated, u + e.used[POOL], h + e.held()[POOL]))
    }

    fn pool_free(&self, tenant: &TenantId) -> Milli {
        let (allocated, used, held) = self.tenant_sums(tenant);
        // `checked_sub` rather than saturating: a pool below zero is a broken rule, not a value.
        self.tenants[tenant].limit().checked_sub(allocated + used + held).expect("tenant pool below zero")
    }

    fn available(&self, id: &EnvironmentId) -> Split {
        let e = self.capacity(id);
        let held = e.held();
        let allocation = e.allocated.checked_sub(e.used[ALLOCATION] + held[ALLOCATION]).expect("allocation below zero");
        let pool = if e.draw_from_tenant_pool { self.pool_free(&e.tenant) } else { 0 };
        let payg = match (e.payg_enabled, e.payg_budget) {
            (false, _) => 0,
            (true, 0) => Milli::MAX,
            // A budget may be lowered below what was already used; that leaves nothing, not a debt.
            (true, budget) => budget.saturating_sub(e.used[PAYG] + held[PAYG]),
        };
        [allocation, pool, payg]
    }

    fn balance_of(&self, id: &EnvironmentId, now: u64) -> Balance {
        let e = self.capacity(id);
        let available = saturating_sum(self.available(id));
        let state = if available == 0 {
            BalanceState::Depleted
        } else if e.payg_enabled && e.payg_budget == 0 {
            BalanceState::Ok
        } else {
            let budget = if e.payg_enabled { e.payg_budget } else { 0 };
            let base = u128::from(e.allocated) + u128::from(budget);
            if u128::from(available) * 5 <= base { BalanceState::Low } else { BalanceState::Ok }
        };
        Balance {
            environment: id.clone(),
            tenant: e.tenant.clone(),
            allocated_milli: e.allocated,
            allocation_used_milli: e.used[ALLOCATION],
            tenant_pool_used_milli: e.used[POOL],
            draw_from_tenant_pool: e.draw_from_tenant_pool,
            payg_enabled: e.payg_enabled,
            payg_budget_milli: e.payg_budget,
            payg_used_milli: e.used[PAYG],
            reserved_milli: sum(e.held()),
            overage_milli: e.overage,
            available_milli: available,
            state,
            period: period::period_of(now),
            low_percent: 20,
        }
    }

    /// The capacity environment a name refers to, following an app environment's link.
    fn resolve(&self, name: &EnvironmentId) -> Result<EnvironmentId, LedgerError> {
        match self.envs.get(name) {
            None => Err(LedgerError::UnknownEnvironment(name.clone())),
            Some(Slot::Capacity(_)) => Ok(name.clone()),
            Some(Slot::App(None)) => Err(LedgerError::AppEnvironmentNotLinked(name.clone())),
            Some(Slot::App(Some(target))) => Ok(target.clone()),
        }
    }

    /// A capacity environment named exactly, as admin commands require.
    fn named(&self, name: &EnvironmentId) -> Result<(), LedgerError> {
        match self.envs.get(name) {
            None => Err(LedgerError::UnknownEnvironment(name.clone())),
            Some(Slot::Capacity(_)) => Ok(()),
            Some(Slot::App(_)) => Err(LedgerError::NotACapacityEnvironment(name.clone())),
        }
    }

    fn balance(&self, name: &EnvironmentId, now: u64) -> Result<Balance, LedgerError> {
        let id = self.resolve(name)?;
        Ok(self.balance_of(&id, now))
    }

    fn quote(&self, name: &EnvironmentId, amount: Milli, now: u64) -> Result<(Split, Balance), LedgerError> {
        let id = self.resolve(name)?;
        let available = self.available(&id);
        match take(amount, available) {
            (draws, 0) => Ok((draws, self.balance_of(&id, now))),
            _ => Err(LedgerError::QuotaDepleted {
                environment: id,
                requested_milli: amount,
                available_milli: saturating_sum(available),
            }),
        }
    }

    fn tenant(&self, id: &TenantId, now: u64) -> Result<TenantCapacity, LedgerError> {
        let t = self.tenants.get(id).ok_or_else(|| LedgerError::UnknownTenant(id.clone()))?;
        let (allocated, pool_used, pool_held) = self.tenant_sums(id);
        Ok(TenantCapacity {
            tenant: id.clone(),
            purchased_milli: t.purchased,
            allocated_milli: allocated,
            pool_used_milli: pool_used,
            pool_reserved_milli: pool_held,
            grace_percent: t.grace_percent,
            time_zone: "UTC".to_owned(),
            period: period::period_of(now),
            grace_used_milli: (allocated + pool_used).saturating_sub(t.purchased),
        })
    }

    /// A new billing month: every environment's use and overage start again at zero; holds carry over.
    fn next_period(&mut self) {
        for slot in self.envs.values_mut() {
            if let Slot::Capacity(e) = slot {
                e.used = [0; 3];
                e.overage = 0;
            }
        }
    }

    fn open_total(&self) -> u64 {
        self.capacities().map(|(_, e)| e.open() as u64).sum()
    }

    fn hold(&self, r: &ReservationId) -> Option<&ModelHold> {
        match self.envs.get(&r.environment) {
            Some(Slot::Capacity(e)) => e.holds.get(&r.seq),
            _ => None,
        }
    }

    fn pop_due(&mut self, now: u64) -> Vec<ReservationId> {
        let (due, later) = self.expiry_queue.drain(..).partition(|(at, _)| *at <= now);
        self.expiry_queue = later;
        due.into_iter().map(|(_, r)| r).collect()
    }

    fn apply(&mut self, command: &Command, now: u64) -> Result<Seen, LedgerError> {
        match command {
            Command::PurchaseCapacity { tenant, amount_milli, idempotency_key } => {
                self.purchase(tenant, *amount_milli, idempotency_key.as_ref(), now)
            }
            Command::AllocateCapacity { tenant, environment, amount_milli, draw_from_tenant_pool } => {
                self.allocate(tenant, environment, *amount_milli, *draw_from_tenant_pool, now)
            }
            Command::SetPayAsYouGo { environment, enabled, budget_milli } => {
                self.named(environment)?;
                let e = self.capacity_mut(environment);
                e.payg_enabled = *enabled;
                e.payg_budget = *budget_milli;
                Ok(Seen::Balance(self.balance_of(environment, now)))
            }
            Command::LinkEnvironment { app_environment, environment } => {
                self.link(app_environment, environment.as_ref())
            }
            Command::Reserve {
                environment,
                agent,
                usage: Usage::Milli(amount),
                idempotency_key,
                expires_at_ms,
                api_key: None,
            } => self.reserve(environment, agent, *amount, idempotency_key.as_ref(), *expires_at_ms, now),
            Command::Commit { reservation, usage: Usage::Milli(actual), api_key: None } => {
                self.commit(reservation, *actual, now)
            }
            Command::Release { reservation, api_key: None } => self.release(reservation, now),
            Command::SetTenantPolicy { tenant, grace_percent, .. } => {
                let Some(t) = self.tenants.get(tenant) else {
                    return Err(LedgerError::UnknownTenant(tenant.clone()));
                };
                let (allocated, used, held) = self.tenant_sums(tenant);
                let limit =
                    ModelTenant { purchased: t.purchased, grace_percent: *grace_percent, ..Default::default() }.limit();
                if allocated + used + held > limit {
                    return Err(LedgerError::GraceBelowUse {
                        tenant: tenant.clone(),
                        grace_percent: *grace_percent,
                        limit_milli: limit,
                        taken_milli: allocated + used + held,
                    });
                }
                self.tenants.get_mut(tenant).unwrap().grace_percent = *grace_percent;
                Ok(Seen::Tenant(self.tenant(tenant, now)?))
            }
            Command::SetAgentLimit { .. } | Command::SetEnvironmentAlerts { .. } => {
                unreachable!("the steps do not set agent limits or alerts")
            }
            Command::Expire { reservation } => {
                if !matches!(self.envs.get(&reservation.environment), Some(Slot::Capacity(_))) {
                    return Ok(Seen::Expired(None));
                }
                Ok(Seen::Expired(self.expire_if_due(reservation, now)))
            }
            Command::ReleaseAll { environment, agent } => self.release_all(environment, agent.as_ref(), now),
            other => unreachable!("the steps make no {other:?}"),
        }
    }

    fn purchase(
        &mut self,
        id: &TenantId,
        amount: Milli,
        key: Option<&IdempotencyKey>,
        now: u64,
    ) -> Result<Seen, LedgerError> {
        let t = self.tenants.entry(id.clone()).or_default();
        match key.map(|k| (k, t.purchase_keys.get(k).copied())) {
            Some((k, Some(first))) if first != amount => {
                return Err(LedgerError::IdempotencyKeyReused { key: k.clone(), first: String::new() });
            }
            Some((_, Some(_))) => {}
            Some((k, None)) => {
                t.purchased += amount;
                t.purchase_keys.insert(k.clone(), amount);
            }
            None => t.purchased += amount,
        }
        Ok(Seen::Tenant(self.tenant(id, now)?))
    }

    fn allocate(
        &mut self,
        tenant: &TenantId,
        id: &EnvironmentId,
        amount: Milli,
        pool: bool,
        now: u64,
    ) -> Result<Seen, LedgerError> {
        let Some(t) = self.tenants.get(tenant) else {
            return Err(LedgerError::UnknownTenant(tenant.clone()));
        };
        let (purchased, limit) = (t.purchased, t.limit());
        let (current, taken) = match self.envs.get(id) {
            Some(Slot::App(_)) => return Err(LedgerError::NotACapacityEnvironment(id.clone())),
            Some(Slot::Capacity(e)) if e.tenant != *tenant => {
                return Err(LedgerError::EnvironmentOfAnotherTenant {
                    environment: id.clone(),
                    owner: e.tenant.clone(),
                });
            }
            Some(Slot::Capacity(e)) => (e.allocated, e.used[ALLOCATION] + e.held()[ALLOCATION]),
            None => (0, 0),
        };
        if amount < taken {
            return Err(LedgerError::AllocationBelowUse {
                environment: id.clone(),
                requested_milli: amount,
                taken_milli: taken,
            });
        }
        let (allocated, pool_used, pool_held) = self.tenant_sums(tenant);
        let allocated_after = allocated - current + amount;
        if allocated_after > purchased || allocated_after + pool_used + pool_held > limit {
            return Err(LedgerError::OverAllocation {
                tenant: tenant.clone(),
                environment: id.clone(),
                requested_milli: amount,
                allocated_after_milli: allocated_after,
                pool_taken_milli: pool_used + pool_held,
                purchased_milli: purchased,
            });
        }
        let e = self.envs.entry(id.clone()).or_insert_with(|| {
            Slot::Capacity(ModelEnv {
                tenant: tenant.clone(),
                allocated: 0,
                draw_from_tenant_pool: false,
                payg_enabled: false,
                payg_budget: 0,
                used: [0; 3],
                overage: 0,
                holds: BTreeMap::new(),
                reservation_keys: HashMap::new(),
            })
        });
        let Slot::Capacity(e) = e else { unreachable!("checked above") };
        e.allocated = amount;
        e.draw_from_tenant_pool = pool;
        Ok(Seen::Balance(self.balance_of(id, now)))
    }

    fn link(&mut self, app: &EnvironmentId, target: Option<&EnvironmentId>) -> Result<Seen, LedgerError> {
        match self.envs.get(app) {
            Some(Slot::Capacity(_)) => return Err(LedgerError::AlreadyACapacityEnvironment(app.clone())),
            None if target.is_none() => return Err(LedgerError::UnknownEnvironment(app.clone())),
            _ => {}
        }
        let target = match target {
            None => None,
            Some(t) => {
                self.named(t)?;
                Some((t.clone(), self.capacity(t).tenant.clone()))
            }
        };
        self.envs.insert(app.clone(), Slot::App(target.as_ref().map(|(t, _)| t.clone())));
        Ok(Seen::Linked(Link { app_environment: app.clone(), target }))
    }

    fn reserve(
        &mut self,
        name: &EnvironmentId,
        agent: &AgentId,
        amount: Milli,
        key: Option<&IdempotencyKey>,
        expires_at_ms: u64,
        now: u64,
    ) -> Result<Seen, LedgerError> {
        let id = self.resolve(name)?;
        let e = self.capacity(&id);
        if let Some(key) = key
            && let Some(&seq) = e.reservation_keys.get(key)
        {
            let first = &e.holds[&seq];
            if first.agent != *agent || first.amount != amount {
                return Err(LedgerError::IdempotencyKeyReused { key: key.clone(), first: String::new() });
            }
            return Ok(Seen::Reserved {
                reservation: ReservationId { environment: id.clone(), seq },
                amount,
                draws: first.draws,
                expires_at_ms: first.expires_at_ms,
                balance: self.balance_of(&id, now),
                replayed: true,
            });
        }
        // Every refusal here (capacity, the environment's cap, the server's) is one that ending holds
        // could lift: the environment's overdue holds expire first, and it is decided again.
        let plan_and_count = |model: &Self| {
            let draws = model.plan(&id, amount)?;
            let total = model.limits.max_open_reservations_total;
            if model.open_total() >= total {
                return Err(LedgerError::TooManyOpenReservations { scope: OpenReservationScope::Server, limit: total });
            }
            Ok(draws)
        };
        let draws = match plan_and_count(self) {
            Err(_) if self.expire_overdue(&id, now) => plan_and_count(self),
            planned => planned,
        }?;
        let e = self.capacity_mut(&id);
        // Sequence numbers start at 1 and count grants only.
        let seq = e.holds.len() as u64 + 1;
        let hold = ModelHold { agent: agent.clone(), amount, draws, expires_at_ms, state: HoldState::Open };
        e.holds.insert(seq, hold);
        if let Some(key) = key {
            e.reservation_keys.insert(key.clone(), seq);
        }
        let reservation = ReservationId { environment: id.clone(), seq };
        self.expiry_queue.push((expires_at_ms, reservation.clone()));
        Ok(Seen::Reserved {
            reservation,
            amount,
            draws,
            expires_at_ms,
            balance: self.balance_of(&id, now),
            replayed: false,
        })
    }

    /// The draws of a new hold of `amount`, or why the environment refuses it.
    fn plan(&self, id: &EnvironmentId, amount: Milli) -> Result<Split, LedgerError> {
        let per_environment = self.limits.max_open_reservations_per_environment;
        if self.capacity(id).open() as u64 >= per_environment {
            return Err(LedgerError::TooManyOpenReservations {
                scope: OpenReservationScope::Environment,
                limit: per_environment,
            });
        }
        let available = self.available(id);
        let (draws, short) = take(amount, available);
        if short > 0 {
            return Err(LedgerError::QuotaDepleted {
                environment: id.clone(),
                requested_milli: amount,
                available_milli: saturating_sum(available),
            });
        }
        Ok(draws)
    }

    /// A refused reservation first expires the due holds among the environment's
    /// `OVERDUE_HOLDS_EXAMINED` oldest open ones; true if any expired.
    fn expire_overdue(&mut self, id: &EnvironmentId, now: u64) -> bool {
        let e = self.capacity_mut(id);
        let due: Vec<u64> = (e.holds.iter().filter(|(_, hold)| hold.state == HoldState::Open))
            .take(OVERDUE_HOLDS_EXAMINED)
            .filter(|(_, hold)| hold.expires_at_ms <= now)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in &due {
            e.holds.get_mut(seq).expect("listed above").state = HoldState::Expired;
        }
        self.overdue_expired += due.len();
        !due.is_empty()
    }

    /// Expires the hold if it is open and due; returns what went back to available.
    fn expire_if_due(&mut self, r: &ReservationId, now: u64) -> Option<Milli> {
        let hold = self.capacity_mut(&r.environment).holds.get_mut(&r.seq)?;
        if hold.state != HoldState::Open || hold.expires_at_ms > now {
            return None;
        }
        hold.state = HoldState::Expired;
        Some(hold.amount)
    }

    fn commit(&mut self, r: &ReservationId, actual: Milli, now: u64) -> Result<Seen, LedgerError> {
        let unknown = || LedgerError::UnknownReservation(r.to_string());
        if !matches!(self.envs.get(&r.environment), Some(Slot::Capacity(_))) {
            return Err(unknown());
        }
        self.expire_if_due(r, now);
        let (state, draws) = self.hold(r).map(|h| (h.state, h.draws)).ok_or_else(unknown)?;
        let settlement = match state {
            HoldState::Open => self.settle(r, draws, actual, false),
            HoldState::Expired => self.settle(r, [0; 3], actual, true),
            HoldState::Released(_) => return Err(LedgerError::AlreadyReleased(r.clone())),
            HoldState::Committed { actual: first, .. } if first != actual => {
                return Err(LedgerError::AlreadyCommitted { reservation: r.clone(), committed_milli: first });
            }
            HoldState::Committed { settlement, .. } => {
                let balance = self.balance_of(&r.environment, now);
                return Ok(Seen::Committed { settlement, balance, replayed: true });
            }
        };
        Ok(Seen::Committed { settlement, balance: self.balance_of(&r.environment, now), replayed: false })
    }

    /// Charges `actual` against the hold's `draws` in draw order, then any excess against what is
    /// available once the hold has become use; the rest of the excess is overage.
    fn settle(&mut self, r: &ReservationId, draws: Split, actual: Milli, late: bool) -> Settle {
        let (from_hold, excess) = take(actual, draws);
        let e = self.capacity_mut(&r.environment);
        let placeholder = Settle { charged: [0; 3], released: 0, overage: 0, late };
        e.holds.get_mut(&r.seq).unwrap().state = HoldState::Committed { actual, settlement: placeholder };
        e.used = add(e.used, from_hold);
        let (from_available, overage) = take(excess, self.available(&r.environment));
        let settlement =
            Settle { charged: add(from_hold, from_available), released: sum(draws) - sum(from_hold), overage, late };
        let e = self.capacity_mut(&r.environment);
        e.used = add(e.used, from_available);
        e.overage += overage;
        e.holds.get_mut(&r.seq).unwrap().state = HoldState::Committed { actual, settlement };
        settlement
    }

    fn release(&mut self, r: &ReservationId, now: u64) -> Result<Seen, LedgerError> {
        if !matches!(self.envs.get(&r.environment), Some(Slot::Capacity(_))) {
            return Err(LedgerError::UnknownReservation(r.to_string()));
        }
        self.expire_if_due(r, now);
        let e = self.capacity_mut(&r.environment);
        let hold = e.holds.get_mut(&r.seq).ok_or_else(|| LedgerError::UnknownReservation(r.to_string()))?;
        let (released, replayed) = match hold.state {
            HoldState::Open => (hold.amount, false),
            // Expiry already returned the hold; the release only settles the reservation.
            HoldState::Expired => (0, false),
            HoldState::Released(first) => (first, true),
            HoldState::Committed { .. } => return Err(LedgerError::ReleaseAfterCommit(r.clone())),
        };
        hold.state = HoldState::Released(released);
        Ok(Seen::Released { released, balance: self.balance_of(&r.environment, now), replayed })
    }

    /// Releases every open hold of the environment (of `agent` only, if given) as a Release of each
    /// would, holds past their expiry that no sweep has reached included.
    fn release_all(&mut self, id: &EnvironmentId, agent: Option<&AgentId>, now: u64) -> Result<Seen, LedgerError> {
        self.named(id)?;
        let (mut count, mut released) = (0, 0);
        let of_agent = |hold: &ModelHold| agent.is_none_or(|agent| hold.agent == *agent);
        for hold in self.capacity_mut(id).holds.values_mut().filter(|h| h.state == HoldState::Open && of_agent(h)) {
            hold.state = HoldState::Released(hold.amount);
            count += 1;
            released += hold.amount;
        }
        Ok(Seen::ReleasedAll { count, released, balance: self.balance_of(id, now) })
    }
}

// ---------------------------------------------------------------------------------------------
// Generated steps (their vocabulary is in `ledger_steps`), leaning as this suite needs.

fn step() -> impl Strategy<Value = Step> {
    ledger_steps::step(Shape {
        admin: 1,
        tenant: (0..3usize).boxed(),
        allocation_env: (0..4usize).boxed(),
        link_env: prop_oneof![4 => Just(APP), 1 => 0..3usize].boxed(),
        reserve_env: prop_oneof![9 => 0..GHOST, 1 => Just(GHOST)].boxed(),
        envs: ENVS.len(),
        ttl_ms: 1..=300,
        near_low: true,
        // API keys are left out of this model; `restore_properties` and `tests/auth.rs` exercise them.
        api_keys: 0,
    })
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    (setup(APP), proptest::collection::vec(step(), 1..=52)).prop_map(|(mut all, rest)| {
        all.extend(rest);
        all
    })
}
// ---------------------------------------------------------------------------------------------
// The harness: applies each command to both sides and compares everything observable.

/// Everything a command could change, as seen through the public API.
#[derive(Debug, PartialEq)]
struct Snapshot {
    balances: Vec<Result<Balance, LedgerError>>,
    tenants: Vec<Result<TenantCapacity, LedgerError>>,
    open: u64,
}

struct Harness {
    ledger: Ledger,
    model: Model,
    now: u64,
    /// Every reservation the ledger granted (not replays), oldest first.
    issued: Vec<ReservationId>,
    /// The sum of `actual` over the commits the ledger accepted (not replays): what was used.
    committed_actual: Milli,
    /// Purchases and reservations sent with an idempotency key, with the reservation's TTL.
    keyed: Vec<(Command, u64)>,
}

impl Harness {
    fn new() -> Self {
        Self {
            ledger: Ledger::new(limits()),
            model: Model::new(limits()),
            now: START_MS,
            issued: Vec::new(),
            committed_actual: 0,
            keyed: Vec::new(),
        }
    }
}

impl Resolve for Harness {
    fn env(&self, i: usize) -> EnvironmentId {
        env(i)
    }

    fn now(&self) -> u64 {
        self.now
    }

    fn reservation(&self, pick: &Pick) -> ReservationId {
        let never_issued = |app| ReservationId { environment: env(if app { APP } else { 0 }), seq: 1_000_000 };
        match pick {
            _ if self.issued.is_empty() => never_issued(false),
            Pick::Recent(n) => self.issued[self.issued.len() - 1 - (*n).min(self.issued.len() - 1)].clone(),
            Pick::Any(i) => i.get(&self.issued).clone(),
            Pick::Unknown(app) => never_issued(*app),
        }
    }

    fn actual(&self, r: &ReservationId, actual: &Actual) -> Milli {
        let Some(hold) = self.model.hold(r) else { return 1_000 };
        match actual {
            Actual::Quarters(q) => hold.amount * q / 4,
            Actual::Above(extra) => hold.amount + extra,
            Actual::FirstAgain => match hold.state {
                HoldState::Committed { actual, .. } => actual,
                _ => hold.amount,
            },
            Actual::Any(a) => *a,
        }
    }

    fn allocation(&self, t: &TenantId, e: &EnvironmentId, amount: &Allocation) -> Milli {
        let (current, taken) = match self.model.envs.get(e) {
            Some(Slot::Capacity(e)) => (e.allocated, e.used[ALLOCATION] + e.held()[ALLOCATION]),
            _ => (0, 0),
        };
        let room = match self.model.tenant(t, self.now) {
            Ok(t) => (t.purchased_milli + current)
                .saturating_sub(t.allocated_milli + t.pool_used_milli + t.pool_reserved_milli),
            Err(_) => 0,
        };
        match amount {
            Allocation::Exactly(a) => *a,
            Allocation::NearUse(delta) => taken.saturating_add_signed(*delta),
            Allocation::NearRoom(delta) => room.saturating_add_signed(*delta),
        }
    }

    fn reserve_amount(&self, e: &EnvironmentId, amount: &Amount) -> Milli {
        let Ok(id) = self.model.resolve(e) else { return 1_000 };
        let available = saturating_sum(self.model.available(&id));
        let e = self.model.capacity(&id);
        let low_mark = (e.allocated + if e.payg_enabled { e.payg_budget } else { 0 }) / 5;
        // The edge refuses reservations of nothing, so the core never sees them.
        match amount {
            Amount::Exactly(a) => *a,
            // Uncapped pay-as-you-go has no boundary to stand near.
            Amount::NearAvailable(_) | Amount::NearLow(_) if available > 1_000_000 => 1_000,
            Amount::NearAvailable(delta) => available.saturating_add_signed(*delta).max(1),
            Amount::NearLow(delta) => available.saturating_sub(low_mark).saturating_add_signed(*delta).max(1),
        }
    }
}

impl Harness {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            balances: ENVS.iter().map(|e| self.ledger.balance(&EnvironmentId::new(e).unwrap(), self.now)).collect(),
            tenants: TENANTS.iter().map(|t| self.ledger.tenant(&TenantId::new(t).unwrap(), self.now)).collect(),
            open: self.ledger.open_reservations(),
        }
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let (ms, sweep) = match step {
            Step::Advance { ms, sweep } => (ms, sweep),
            Step::NextMonth { ms } => {
                self.now = next_month_start(self.now) + ms;
                self.model.next_period();
                // What was committed before belongs to the month that ended.
                self.committed_actual = 0;
                return self.check_state();
            }
            Step::Retry { pick, changed } => return self.retry(pick, *changed),
            _ => {
                let command = command(self, step);
                self.keyed.extend(kept(step, &command));
                return self.apply(&command);
            }
        };
        self.now += ms;
        if !*sweep {
            // Leaves due holds open, so that commits and releases meet them before the sweeper does.
            return self.check_state();
        }
        let mut expected = self.model.pop_due(self.now);
        expected.sort();
        if self.now.is_multiple_of(2) {
            // As the server's sweep: each environment's due holds at once, one event each.
            for reservation in &expected {
                let _ = self.model.apply(&Command::Expire { reservation: reservation.clone() }, self.now);
            }
            let taken = self.ledger.expire_due(self.now, usize::MAX);
            prop_assert_eq!(taken, expected.len(), "due expiries at {}", self.now);
            return self.check_state();
        }
        let mut due = self.ledger.due_expiries(self.now, usize::MAX);
        due.sort();
        prop_assert_eq!(&due, &expected, "due expiries at {}", self.now);
        for reservation in due {
            self.apply(&Command::Expire { reservation })?;
        }
        self.check_state()
    }

    fn retry(&mut self, pick: &Index, changed: bool) -> Result<(), TestCaseError> {
        match retried(&self.keyed, pick, changed, self.now) {
            Some(command) => self.apply(&command),
            None => self.check_state(),
        }
    }

    fn apply(&mut self, command: &Command) -> Result<(), TestCaseError> {
        let before = self.snapshot();
        let overdue_expired = self.model.overdue_expired;
        let got = normalize(self.ledger.apply(command, self.now).map(seen));
        let want = normalize(self.model.apply(command, self.now));
        prop_assert_eq!(&got, &want, "outcome of {:?} at {}", command, self.now);
        match (&got, command) {
            (Ok(Seen::Reserved { reservation, replayed: false, .. }), _) => self.issued.push(reservation.clone()),
            (Ok(Seen::Committed { replayed: false, .. }), Command::Commit { usage: Usage::Milli(actual), .. }) => {
                self.committed_actual += actual;
            }
            // Unless it expired overdue holds, which `check_state` compares with the model.
            (Err(_), _) if self.model.overdue_expired == overdue_expired => {
                prop_assert_eq!(before, self.snapshot(), "refused {:?} changed the books", command)
            }
            _ => {}
        }
        self.check_state()
    }

    /// Compares every balance, quote and tenant with the model, then checks the invariants on
    /// what the ledger itself reports, so they hold even where the model could share a mistake.
    fn check_state(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.ledger.verify(), Ok(()));
        for name in ENVS.map(|e| EnvironmentId::new(e).unwrap()) {
            prop_assert_eq!(
                self.ledger.balance(&name, self.now),
                self.model.balance(&name, self.now),
                "balance of {}",
                name
            );
            for amount in [1, 1_000, 5_000] {
                let quote = self.ledger.quote(&name, amount, self.now).map(|q| (split_of(q.draws), q.balance));
                prop_assert_eq!(quote, self.model.quote(&name, amount, self.now), "quote of {} on {}", amount, name);
            }
        }
        for id in TENANTS.map(|t| TenantId::new(t).unwrap()) {
            prop_assert_eq!(self.ledger.tenant(&id, self.now), self.model.tenant(&id, self.now), "tenant {}", id);
        }
        prop_assert_eq!(self.ledger.open_reservations(), self.model.open_total());

        let mut charged = 0;
        let mut per_tenant: HashMap<TenantId, (Milli, Milli)> = HashMap::new();
        let mut billed: HashMap<TenantId, (Milli, Milli, Milli)> = HashMap::new();
        for (id, e) in self.model.capacities() {
            let b = self.ledger.balance(id, self.now).unwrap();
            let open_holds: Milli = e.holds.values().filter(|h| h.state == HoldState::Open).map(|h| h.amount).sum();
            let listed = self.ledger.open_holds(id, None, 0, 1_000).unwrap();
            let listed: Vec<_> = listed
                .holds
                .iter()
                .map(|h| (h.reservation.seq, h.agent.clone(), h.amount_milli, split_of(h.draws), h.expires_at_ms))
                .collect();
            let expected: Vec<_> = e
                .holds
                .iter()
                .filter(|(_, h)| h.state == HoldState::Open)
                .map(|(seq, h)| (*seq, h.agent.clone(), h.amount, h.draws, h.expires_at_ms))
                .collect();
            prop_assert_eq!(listed, expected, "the open holds {} lists, oldest first", id);
            prop_assert_eq!(b.reserved_milli, open_holds, "{} reserves the sum of its open holds", id);
            prop_assert!(b.allocation_used_milli <= b.allocated_milli, "{} used more than its allocation", id);
            charged += b.allocation_used_milli + b.tenant_pool_used_milli + b.payg_used_milli + b.overage_milli;
            let sums = per_tenant.entry(b.tenant.clone()).or_default();
            sums.0 += b.allocated_milli;
            sums.1 += b.tenant_pool_used_milli;
            let bill = billed.entry(b.tenant.clone()).or_default();
            bill.0 += b.allocation_used_milli + b.tenant_pool_used_milli;
            bill.1 += b.payg_used_milli;
            bill.2 += b.overage_milli;
        }
        prop_assert_eq!(charged, self.committed_actual, "charges plus overage equal the use committed");
        // Every step runs within one month, so the month's usage report is everything charged.
        for (id, bill) in billed {
            let range = UsageRange::new(None, None, self.now).unwrap();
            let query = UsageQuery { tenant: id.clone(), environment: None, agent: None, range, group_by: Vec::new() };
            let rows = self.ledger.usage(&query).unwrap();
            let total = rows[0].totals;
            prop_assert_eq!(
                (total.prepaid_milli, total.payg_milli, total.overage_milli),
                bill,
                "the usage report of tenant {} adds up to its balances",
                id
            );
        }
        for (id, (allocated, pool_used)) in per_tenant {
            let t = self.ledger.tenant(&id, self.now).unwrap();
            prop_assert_eq!((t.allocated_milli, t.pool_used_milli), (allocated, pool_used), "tenant {} sums", id);
            let taken = t.allocated_milli + t.pool_used_milli + t.pool_reserved_milli;
            let limit = (u128::from(t.purchased_milli) * u128::from(t.grace_percent) / 100) as Milli;
            prop_assert!(
                t.allocated_milli <= t.purchased_milli && taken <= limit,
                "tenant {} allocated {} and drew {} of {} with {}% grace",
                id,
                t.allocated_milli,
                taken,
                t.purchased_milli,
                t.grace_percent
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    /// Proves that the ledger and the naive model agree on every outcome, balance, quote and tenant
    /// after every step of any sequence, and that the ledger's invariants hold throughout.
    #[test]
    fn ledger_matches_the_naive_model(steps in steps()) {
        let mut harness = Harness::new();
        for step in &steps {
            harness.step(step)?;
        }
    }
}

/// Proves that concurrent reservations never hold more than the allocation: exactly 100 of 1,000
/// one-message reservations are granted against 100 messages.
#[test]
fn concurrent_reservations_grant_exactly_the_allocation() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 125;
    const MESSAGE: Milli = 1_000;
    let ledger = Ledger::new(Limits::default());
    let (t, e) = (tenant(0), env(0));
    let purchase = Command::PurchaseCapacity { tenant: t.clone(), amount_milli: 100 * MESSAGE, idempotency_key: None };
    ledger.apply(&purchase, START_MS).unwrap();
    let allocate = Command::AllocateCapacity {
        tenant: t,
        environment: e.clone(),
        amount_milli: 100 * MESSAGE,
        draw_from_tenant_pool: false,
    };
    ledger.apply(&allocate, START_MS).unwrap();

    // The barrier lines the threads up so that their reservations really contend.
    let barrier = Barrier::new(THREADS);
    let granted: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    let reserve = Command::Reserve {
                        environment: e.clone(),
                        agent: agent(0),
                        usage: Usage::Milli(MESSAGE),
                        idempotency_key: None,
                        expires_at_ms: START_MS + 60_000,
                        api_key: None,
                    };
                    let mut granted = 0;
                    for _ in 0..PER_THREAD {
                        match ledger.apply(&reserve, START_MS) {
                            Ok(Outcome::Reserved(_)) => granted += 1,
                            Err(LedgerError::QuotaDepleted { .. }) => {}
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    granted
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });

    assert_eq!(granted, 100);
    assert_eq!(ledger.verify(), Ok(()));
    assert_eq!(ledger.open_reservations(), 100);
    let balance = ledger.balance(&e, START_MS).unwrap();
    assert_eq!((balance.reserved_milli, balance.available_milli), (100 * MESSAGE, 0));
}
