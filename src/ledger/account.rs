//! The per-environment and per-tenant books, and the arithmetic that moves capacity between
//! "available", "held" and "used". Everything here is plain data under the caller's locks.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque, btree_map},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    AgentId, ApiKeyId, BalanceState, DEFAULT_LOW_PERCENT, IdempotencyKey, LedgerError, Milli, Settlement, TenantId,
    alerts::DEFAULT_BUDGET_THRESHOLDS,
    period::{self, Period},
    usage::UsageBook,
};

/// Where capacity comes from. The declaration order is the draw order (and the sort order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Source {
    EnvironmentAllocation,
    TenantPool,
    PayAsYouGo,
}

impl Source {
    pub const DRAW_ORDER: [Source; 3] = [Source::EnvironmentAllocation, Source::TenantPool, Source::PayAsYouGo];

    fn index(self) -> usize {
        self as usize
    }
}

/// An amount per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draws([Milli; 3]);

impl Draws {
    pub fn get(&self, source: Source) -> Milli {
        self.0[source.index()]
    }

    fn set(&mut self, source: Source, amount: Milli) {
        self.0[source.index()] = amount;
    }

    /// Adds to one source, saturating: for sums that are bounded by counters checked elsewhere.
    pub fn add(&mut self, source: Source, amount: Milli) {
        self.0[source.index()] = self.0[source.index()].saturating_add(amount);
    }

    /// Cannot overflow: every caller keeps the per-source amounts within one u64 amount in total.
    pub fn total(&self) -> Milli {
        self.0.iter().sum()
    }

    /// The non-zero amounts, in draw order.
    pub fn iter(&self) -> impl Iterator<Item = (Source, Milli)> + '_ {
        Source::DRAW_ORDER.into_iter().map(|s| (s, self.get(s))).filter(|(_, amount)| *amount > 0)
    }

    /// The per-source sum. Callers keep every total within one amount, so no source can overflow.
    pub fn plus(self, other: Draws) -> Draws {
        Draws(std::array::from_fn(|i| self.0[i] + other.0[i]))
    }

    /// Takes `amount` from `available` in draw order; `Err` carries the total available when short.
    pub fn plan(amount: Milli, available: Draws) -> Result<Draws, Milli> {
        let (draws, shortfall) = Self::take_up_to(amount, available);
        if shortfall == 0 { Ok(draws) } else { Err(available.0.iter().fold(0u64, |a, b| a.saturating_add(*b))) }
    }

    /// Takes as much of `amount` as `available` covers in draw order; returns the draws and what is left.
    pub fn take_up_to(amount: Milli, available: Draws) -> (Draws, Milli) {
        let mut draws = Draws::default();
        let mut left = amount;
        for source in Source::DRAW_ORDER {
            let take = left.min(available.get(source));
            draws.set(source, take);
            left -= take;
        }
        (draws, left)
    }

    /// Splits `amount` across these draws in draw order: (charged per source, not charged).
    pub fn split(&self, amount: Milli) -> (Draws, Milli) {
        Self::take_up_to(amount, *self)
    }

    pub fn saturating_total(&self) -> Milli {
        self.0.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// A tenant's prepaid capacity.
///
/// Invariants: `allocated <= purchased` and `allocated + pool_used + pool_held <= pool_limit()`, where
/// `allocated` and `pool_held` are the sums over its environments, and `pool_used` the sum over its
/// environments in the tenant's period (an environment not touched since an earlier period has used
/// nothing in this one). The tenant's period is never earlier than any of its environments'.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    pub purchased: Milli,
    pub allocated: Milli,
    pub pool_used: Milli,
    pub pool_held: Milli,
    /// Environments drawing on the pool may take allocations plus pool use up to this percentage of
    /// `purchased`; 100 = no grace.
    pub grace_percent: u32,
    /// IANA name; billing periods are its calendar months.
    pub time_zone: String,
    pub period: Period,
    /// The capacity level last alerted: 0 none, 1 all used, 2 grace exhausted.
    pub alerted: u8,
    /// Purchase idempotency keys with the amount they bought, oldest first in `purchase_key_order`.
    pub purchase_keys: HashMap<IdempotencyKey, Milli>,
    pub purchase_key_order: VecDeque<IdempotencyKey>,
    /// Sequence number of the last logged event applied to this tenant.
    pub applied_seq: u64,
    /// Distinct usage keys in `usage_keys_month` (the newest month with use), summed over the
    /// tenant's environments. Recomputed from the environments' roll-ups at recovery, like the pool
    /// counters, so not kept in snapshots.
    #[serde(skip)]
    pub usage_keys_month: String,
    #[serde(skip)]
    pub usage_keys: u64,
}

impl Default for Tenant {
    fn default() -> Self {
        Self {
            purchased: 0,
            allocated: 0,
            pool_used: 0,
            pool_held: 0,
            grace_percent: 100,
            time_zone: period::DEFAULT_TIME_ZONE.to_owned(),
            period: Period::NONE,
            alerted: 0,
            purchase_keys: HashMap::new(),
            purchase_key_order: VecDeque::new(),
            applied_seq: 0,
            usage_keys_month: String::new(),
            usage_keys: 0,
        }
    }
}

impl Tenant {
    /// What allocations plus pool use and holds may reach: the purchased capacity plus the grace.
    pub fn pool_limit(&self) -> Milli {
        let limit = u128::from(self.purchased) * u128::from(self.grace_percent) / 100;
        Milli::try_from(limit).unwrap_or(Milli::MAX)
    }

    pub fn pool_available(&self) -> Milli {
        self.pool_limit().saturating_sub(self.allocated).saturating_sub(self.pool_used).saturating_sub(self.pool_held)
    }

    /// Pool use this period beyond the purchased capacity: drawn in grace, reported as overage.
    pub fn grace_used(&self) -> Milli {
        self.allocated.saturating_add(self.pool_used).saturating_sub(self.purchased)
    }

    /// Starts the period that contains `now` if the current one has ended: the pool's use starts again
    /// at zero; allocations, holds and policy carry over. Returns whether a new period started.
    pub fn roll_over(&mut self, now: u64) -> bool {
        if now < self.period.end_ms {
            return false;
        }
        let next = period::period_at(now, &self.time_zone);
        if next.month_index <= self.period.month_index {
            // A time zone further west took effect: the same month goes on until it ends there.
            self.period.end_ms = next.end_ms;
            return false;
        }
        self.period = next;
        self.pool_used = 0;
        super::alerts::rearm_tenant(self);
        true
    }
}

/// An admin's limit on one agent's monthly use within an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLimit {
    /// 0 = no cap.
    pub limit_milli: Milli,
    pub notify_percent: u32,
    pub stop_when_exceeded: bool,
    pub disabled: bool,
}

/// One agent's books within an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBook {
    pub limit: Option<AgentLimit>,
    /// Actual use committed this period (charged plus overage).
    pub used: Milli,
    /// Held by the agent's open reservations.
    pub held: Milli,
    /// The limit level last alerted: 0 none, 1 nearing, 2 over.
    pub alerted: u8,
}

impl AgentBook {
    /// Nothing to remember: no limit, no use this period, nothing held.
    fn is_idle(&self) -> bool {
        self.limit.is_none() && self.used == 0 && self.held == 0
    }
}

/// A granted hold, open or resolved. Kept whole after it resolves so that an idempotent retry can
/// return it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hold {
    pub agent: AgentId,
    pub amount: Milli,
    pub draws: Draws,
    /// When it was granted: the time of its `Reserved` event.
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The rate card version in force when the hold was made; its commit is priced with it.
    pub rate_card_version: u32,
    /// The API key the hold was made with, which counts it against its cap until it resolves.
    pub api_key: Option<ApiKeyId>,
}

/// How a reservation resolved. A commit's record is boxed: most records are of holds that expired
/// or were released, and a million of them are kept, so each costs its B-tree slot (two words here,
/// not nine) and no more. Serialized as before: a box is written as what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    Committed(Box<Commitment>),
    Released {
        released: Milli,
    },
    /// The hold was released by expiry; a late Commit or a Release may still resolve it.
    Expired,
}

/// What a commit charged: the fields of the `Committed` resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    pub actual: Milli,
    pub settlement: Settlement,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolved {
    pub hold: Box<Hold>,
    pub resolution: Resolution,
}

/// How an open hold ends without being used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Released,
    Expired,
}

/// A capacity environment's books for the current period.
///
/// Invariants: `held` is the per-source sum of the draws of `open`;
/// `used[allocation] + held[allocation] <= allocated`.
///
/// A million of these may be kept, most never used, so what an unused environment does not need is
/// boxed and made at first use (`records`, `usage`), and the default alert thresholds are no
/// allocation: 224 bytes and no allocation rather than 328 bytes and one (on 64-bit targets).
/// Snapshots keep the form the books had before: see [`EnvironmentForm`].
#[derive(Debug, Clone)]
pub struct Environment {
    pub tenant: TenantId,
    pub allocated: Milli,
    pub draw_from_tenant_pool: bool,
    pub payg_enabled: bool,
    /// 0 = no cap.
    pub payg_budget: Milli,
    pub used: Draws,
    pub held: Draws,
    pub overage: Milli,
    pub next_seq: u64,
    /// By sequence number, so that they can be listed oldest first and paged through without sorting.
    /// Boxed: a B-tree node then holds 11 pointers rather than 11 holds, and nodes filled by appending
    /// in sequence order are about half full.
    pub open: BTreeMap<u64, Box<Hold>>,
    /// Resolved reservations and idempotency keys: made at the first resolution or keyed reservation.
    records: Option<Box<Records>>,
    /// Sequence number of the last logged event applied to these books.
    pub applied_seq: u64,
    /// The period `used`, `overage` and the agents' use belong to.
    pub period: Period,
    /// Agents with a limit, use this period or open holds, at most the configured number.
    pub agents: BTreeMap<AgentId, AgentBook>,
    /// LOW is at or below this percentage of allocation plus budget.
    pub low_percent: u32,
    /// Pay-as-you-go budget thresholds that alert, in percent; `None` for the defaults.
    budget_thresholds: Option<Box<[u32]>>,
    /// The level and the highest budget threshold last alerted.
    pub alert_level: BalanceState,
    pub budget_alerted: u32,
    /// What was charged and reserved, by day and month.
    /// Made at the first reservation: the largest part of an environment that has not been used yet.
    /// Kept in snapshots as a whole book, empty when there is none.
    pub usage: Option<Box<UsageBook>>,
}

/// What an environment remembers beyond its open holds: how its reservations resolved, and which
/// idempotency key made which reservation.
#[derive(Debug, Clone, Default)]
struct Records {
    /// A B-tree, not a hash table: it grows a node at a time, where a table of up to
    /// `max_resolved_per_environment` records would rehash whole inside the environment's lock.
    resolved: BTreeMap<u64, Resolved>,
    /// (resolved at, seq), oldest first: resolved records are dropped from the front.
    resolved_order: VecDeque<(u64, u64)>,
    /// Idempotency key → seq of the open or resolved reservation it made.
    idempotency: HashMap<IdempotencyKey, u64>,
}

/// The snapshot form of [`Environment`]: its fields as they were before the rarely used ones were
/// boxed, in the same order, so that snapshots written before and after read the same. A part not made
/// yet is written as an empty one, and an empty part is read back as none.
#[derive(Serialize, Deserialize)]
#[serde(rename = "Environment")]
struct EnvironmentForm<'a> {
    tenant: Cow<'a, TenantId>,
    allocated: Milli,
    draw_from_tenant_pool: bool,
    payg_enabled: bool,
    payg_budget: Milli,
    used: Draws,
    held: Draws,
    overage: Milli,
    next_seq: u64,
    open: Cow<'a, BTreeMap<u64, Box<Hold>>>,
    resolved: Cow<'a, BTreeMap<u64, Resolved>>,
    resolved_order: Cow<'a, VecDeque<(u64, u64)>>,
    idempotency: Cow<'a, HashMap<IdempotencyKey, u64>>,
    applied_seq: u64,
    period: Period,
    agents: Cow<'a, BTreeMap<AgentId, AgentBook>>,
    low_percent: u32,
    budget_thresholds: Cow<'a, [u32]>,
    alert_level: BalanceState,
    budget_alerted: u32,
    usage: Cow<'a, UsageBook>,
}

impl Serialize for Environment {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (resolved, resolved_order, idempotency) = match self.records.as_deref() {
            Some(r) => (Cow::Borrowed(&r.resolved), Cow::Borrowed(&r.resolved_order), Cow::Borrowed(&r.idempotency)),
            None => Default::default(),
        };
        EnvironmentForm {
            tenant: Cow::Borrowed(&self.tenant),
            allocated: self.allocated,
            draw_from_tenant_pool: self.draw_from_tenant_pool,
            payg_enabled: self.payg_enabled,
            payg_budget: self.payg_budget,
            used: self.used,
            held: self.held,
            overage: self.overage,
            next_seq: self.next_seq,
            open: Cow::Borrowed(&self.open),
            resolved,
            resolved_order,
            idempotency,
            applied_seq: self.applied_seq,
            period: self.period,
            agents: Cow::Borrowed(&self.agents),
            low_percent: self.low_percent,
            budget_thresholds: Cow::Borrowed(self.budget_thresholds()),
            alert_level: self.alert_level,
            budget_alerted: self.budget_alerted,
            usage: self.usage.as_deref().map_or_else(Cow::default, Cow::Borrowed),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Environment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let form = EnvironmentForm::deserialize(deserializer)?;
        let records = Records {
            resolved: form.resolved.into_owned(),
            resolved_order: form.resolved_order.into_owned(),
            idempotency: form.idempotency.into_owned(),
        };
        let usage = form.usage.into_owned();
        let mut env = Environment {
            tenant: form.tenant.into_owned(),
            allocated: form.allocated,
            draw_from_tenant_pool: form.draw_from_tenant_pool,
            payg_enabled: form.payg_enabled,
            payg_budget: form.payg_budget,
            used: form.used,
            held: form.held,
            overage: form.overage,
            next_seq: form.next_seq,
            open: form.open.into_owned(),
            records: (!records.is_empty()).then(|| Box::new(records)),
            applied_seq: form.applied_seq,
            period: form.period,
            agents: form.agents.into_owned(),
            low_percent: form.low_percent,
            budget_thresholds: None,
            alert_level: form.alert_level,
            budget_alerted: form.budget_alerted,
            // An empty book is read back as none, so a restart keeps unused environments small.
            usage: (!usage.is_empty()).then(|| Box::new(usage)),
        };
        env.set_budget_thresholds(&form.budget_thresholds);
        Ok(env)
    }
}

impl Records {
    fn is_empty(&self) -> bool {
        self.resolved.is_empty() && self.resolved_order.is_empty() && self.idempotency.is_empty()
    }
}

impl Environment {
    pub fn usage_mut(&mut self) -> &mut UsageBook {
        self.usage.get_or_insert_default()
    }

    fn records_mut(&mut self) -> &mut Records {
        self.records.get_or_insert_default()
    }

    /// The hold of reservation `seq`, open or resolved and still remembered.
    pub fn hold_of(&self, seq: u64) -> Option<&Hold> {
        self.open.get(&seq).map(|hold| &**hold).or_else(|| self.resolved(seq).map(|r| &*r.hold))
    }

    /// How the reservation `seq` resolved, if it did and is still remembered.
    pub fn resolved(&self, seq: u64) -> Option<&Resolved> {
        self.records.as_deref()?.resolved.get(&seq)
    }

    pub fn resolved_mut(&mut self, seq: u64) -> Option<&mut Resolved> {
        self.records.as_deref_mut()?.resolved.get_mut(&seq)
    }

    /// The reservation, open or resolved, that `key` made.
    pub fn reservation_of(&self, key: &IdempotencyKey) -> Option<u64> {
        self.records.as_deref()?.idempotency.get(key).copied()
    }

    pub fn remember_key(&mut self, key: IdempotencyKey, seq: u64) {
        self.records_mut().idempotency.insert(key, seq);
    }

    pub fn budget_thresholds(&self) -> &[u32] {
        self.budget_thresholds.as_deref().unwrap_or(&DEFAULT_BUDGET_THRESHOLDS)
    }

    /// Keeps the defaults as none, which every environment shares.
    pub fn set_budget_thresholds(&mut self, thresholds: &[u32]) {
        self.budget_thresholds = (thresholds != DEFAULT_BUDGET_THRESHOLDS).then(|| thresholds.into());
    }

    pub fn new(tenant: TenantId) -> Self {
        Self {
            tenant,
            allocated: 0,
            draw_from_tenant_pool: false,
            payg_enabled: false,
            payg_budget: 0,
            used: Draws::default(),
            held: Draws::default(),
            overage: 0,
            next_seq: 1,
            open: BTreeMap::new(),
            records: None,
            applied_seq: 0,
            period: Period::NONE,
            agents: BTreeMap::new(),
            low_percent: DEFAULT_LOW_PERCENT,
            budget_thresholds: None,
            alert_level: BalanceState::Ok,
            budget_alerted: 0,
            usage: None,
        }
    }

    /// Starts the tenant's period if this environment's has ended (the tenant has rolled over first):
    /// use, overage and the agents' use start again at zero; allocations, holds, pay-as-you-go settings
    /// and agent limits carry over. Returns whether a new period started.
    pub fn roll_over(&mut self, tenant: &Tenant, now: u64) -> bool {
        if now < self.period.end_ms {
            return false;
        }
        // The tenant's period, unless the tenant is already past `now`: at recovery it may have been
        // copied into the snapshot after a period began that events still to replay precede.
        let next = if tenant.period.contains(now) { tenant.period } else { period::period_at(now, &tenant.time_zone) };
        if next.month_index <= self.period.month_index {
            // The month was extended (a time zone further west), not replaced.
            self.period = next;
            return false;
        }
        self.period = next;
        self.used = Draws::default();
        self.overage = 0;
        // Use starts again from zero, and so do the thresholds it crosses.
        self.budget_alerted = 0;
        for agent in self.agents.values_mut() {
            agent.used = 0;
            agent.alerted = 0;
        }
        self.agents.retain(|_, agent| !agent.is_idle());
        true
    }

    /// Counts a new hold against its agent, if the agent is tracked or there is room to track it, and
    /// returns the agent's id as its book holds it. The hold keeps that one: the id each request
    /// brings is a new string, and kept with each open or resolved hold, it would cost every hold an
    /// allocation of its own for as long as the hold is remembered.
    pub fn agent_held(&mut self, agent: &AgentId, amount: Milli, max_agents: usize) -> AgentId {
        match self.agent_book(agent, max_agents) {
            Some((id, book)) => {
                book.held = book.held.saturating_add(amount);
                id
            }
            None => agent.clone(),
        }
    }

    /// Takes a resolved hold off its agent and adds what the agent used.
    pub fn agent_resolved(&mut self, agent: &AgentId, held: Milli, used: Milli, max_agents: usize) {
        // One search of the agents for a book that exists: expiries and releases resolve holds by the
        // thousand, and agent ids compare as strings.
        let idle = match self.agents.get_mut(agent) {
            Some(book) => {
                book.held = book.held.saturating_sub(held);
                book.used = book.used.saturating_add(used);
                book.is_idle()
            }
            None => {
                if used > 0
                    && let Some((_, book)) = self.agent_book(agent, max_agents)
                {
                    book.used = book.used.saturating_add(used);
                }
                false
            }
        };
        if idle {
            self.agents.remove(agent);
        }
    }

    /// The agent's book, made if there is room to track one more agent, with the id its key holds;
    /// one search of the agents.
    fn agent_book(&mut self, agent: &AgentId, max_agents: usize) -> Option<(AgentId, &mut AgentBook)> {
        let full = self.agents.len() >= max_agents;
        match self.agents.entry(agent.clone()) {
            btree_map::Entry::Occupied(book) => Some((book.key().clone(), book.into_mut())),
            btree_map::Entry::Vacant(slot) if !full => Some((slot.key().clone(), slot.insert(AgentBook::default()))),
            btree_map::Entry::Vacant(_) => None,
        }
    }

    /// Whether an operation on these books may touch the tenant pool.
    pub fn touches_pool(&self) -> bool {
        self.draw_from_tenant_pool || self.held.get(Source::TenantPool) > 0
    }

    /// What each source could give a new reservation now. `tenant` is needed for the pool.
    pub fn available(&self, tenant: Option<&Tenant>) -> Draws {
        let mut available = Draws::default();
        let allocation = self
            .allocated
            .saturating_sub(self.used.get(Source::EnvironmentAllocation))
            .saturating_sub(self.held.get(Source::EnvironmentAllocation));
        available.set(Source::EnvironmentAllocation, allocation);
        if self.draw_from_tenant_pool {
            available.set(Source::TenantPool, tenant.map_or(0, Tenant::pool_available));
        }
        if self.payg_enabled {
            let payg = match self.payg_budget {
                0 => Milli::MAX,
                budget => budget
                    .saturating_sub(self.used.get(Source::PayAsYouGo))
                    .saturating_sub(self.held.get(Source::PayAsYouGo)),
            };
            available.set(Source::PayAsYouGo, payg);
        }
        available
    }

    /// Adds `draws` to the holds. The caller has checked them against `available` and the total
    /// already held, so no counter can overflow.
    pub fn hold(&mut self, tenant: Option<&mut Tenant>, draws: Draws) {
        for (source, amount) in draws.iter() {
            self.held.set(source, self.held.get(source) + amount);
        }
        let pool = draws.get(Source::TenantPool);
        if pool > 0 {
            let tenant = tenant.expect("a pool draw is planned with the tenant locked");
            tenant.pool_held += pool;
        }
    }

    /// Returns `draws` from the holds to available.
    pub fn unhold(&mut self, tenant: Option<&mut Tenant>, draws: Draws) {
        for (source, amount) in draws.iter() {
            self.held.set(source, self.held.get(source) - amount);
        }
        let pool = draws.get(Source::TenantPool);
        if pool > 0 {
            let tenant = tenant.expect("a pool hold is released with the tenant locked");
            tenant.pool_held -= pool;
        }
    }

    /// Adds `draws` to the period's use.
    pub fn charge(&mut self, tenant: Option<&mut Tenant>, draws: Draws) -> Result<(), LedgerError> {
        let overflow = || LedgerError::CounterOverflow { what: "the period's use" };
        let mut used = self.used;
        for (source, amount) in draws.iter() {
            used.set(source, used.get(source).checked_add(amount).ok_or_else(overflow)?);
        }
        let pool = draws.get(Source::TenantPool);
        if pool > 0 {
            let tenant = tenant.expect("a pool charge is made with the tenant locked");
            tenant.pool_used = tenant.pool_used.checked_add(pool).ok_or_else(overflow)?;
        }
        self.used = used;
        Ok(())
    }

    /// What committing `actual` against a hold of `draws` charges: `actual` is split across the hold
    /// in draw order, use beyond the hold is taken from what is available in draw order, and what
    /// nothing covers is overage. Changes nothing; refuses what would overflow a counter.
    pub fn settlement(
        &self,
        tenant: Option<&Tenant>,
        draws: Draws,
        actual: Milli,
        late: bool,
    ) -> Result<Settlement, LedgerError> {
        let (from_hold, excess) = draws.split(actual);
        let (from_available, overage) = Draws::take_up_to(excess, self.available(tenant));
        self.overage.checked_add(overage).ok_or(LedgerError::CounterOverflow { what: "the period's overage" })?;
        let charged = from_hold.plus(from_available);
        for (source, amount) in charged.iter() {
            self.used
                .get(source)
                .checked_add(amount)
                .ok_or(LedgerError::CounterOverflow { what: "the period's use" })?;
        }
        Ok(Settlement { charged, released_milli: draws.total() - from_hold.total(), overage_milli: overage, late })
    }

    /// Releases a hold of `draws` and charges a settlement computed by [`Self::settlement`].
    pub fn settle(
        &mut self,
        mut tenant: Option<&mut Tenant>,
        draws: Draws,
        settlement: &Settlement,
    ) -> Result<(), LedgerError> {
        let overage_after = self
            .overage
            .checked_add(settlement.overage_milli)
            .ok_or(LedgerError::CounterOverflow { what: "the period's overage" })?;
        self.unhold(tenant.as_deref_mut(), draws);
        self.charge(tenant, settlement.charged)?;
        self.overage = overage_after;
        Ok(())
    }

    /// The open holds of `agent` (of every agent if `None`) granted at or before `through_seq`, oldest
    /// first: the holds a release-all covers.
    pub fn open_holds_of<'a>(
        &'a self,
        agent: Option<&'a AgentId>,
        through_seq: u64,
    ) -> impl Iterator<Item = (u64, &'a Hold)> + 'a {
        let of_agent = move |hold: &Hold| agent.is_none_or(|agent| hold.agent == *agent);
        self.open.range(..=through_seq).filter(move |(_, hold)| of_agent(hold)).map(|(seq, hold)| (*seq, &**hold))
    }

    /// Ends the hold `seq`, already taken out of `open`, using nothing, and remembers how. The caller
    /// counts it off the server-wide open-hold count.
    pub fn end_taken(
        &mut self,
        tenant: Option<&mut Tenant>,
        seq: u64,
        hold: Box<Hold>,
        ending: Ending,
        now: u64,
        (retention_ms, max_resolved): (u64, usize),
    ) {
        self.unhold(tenant, hold.draws);
        // Using nothing, it never makes an agent's books: the bound on them does not apply.
        self.agent_resolved(&hold.agent, hold.amount, 0, usize::MAX);
        let resolution = match ending {
            Ending::Released => Resolution::Released { released: hold.amount },
            Ending::Expired => Resolution::Expired,
        };
        self.remember(seq, Resolved { hold, resolution }, now, retention_ms, max_resolved);
    }

    /// Records how a reservation resolved, then forgets the oldest records past `retention_ms` or
    /// over `max_resolved`.
    pub fn remember(&mut self, seq: u64, resolved: Resolved, now: u64, retention_ms: u64, max_resolved: usize) {
        let records = self.records_mut();
        records.resolved.insert(seq, resolved);
        records.resolved_order.push_back((now, seq));
        while let Some(&(at, oldest)) = records.resolved_order.front() {
            let expired = now.saturating_sub(at) > retention_ms;
            if !expired && records.resolved.len() <= max_resolved {
                break;
            }
            records.resolved_order.pop_front();
            if let Some(record) = records.resolved.remove(&oldest)
                && let Some(key) = record.hold.idempotency_key
                && records.idempotency.get(&key) == Some(&oldest)
            {
                records.idempotency.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(env: &Environment) -> Environment {
        postcard::from_bytes(&postcard::to_allocvec(env).unwrap()).unwrap()
    }

    #[test]
    fn a_new_hold_shares_the_agent_id_its_book_holds() {
        let mut env = Environment::new(TenantId::new("t").unwrap());
        let first = AgentId::new("agent").unwrap();
        env.agent_held(&first, 1, 10);
        // Each request brings its own string for the same id.
        let again = AgentId::new("agent").unwrap();
        let kept = env.agent_held(&again, 2, 10);
        assert_eq!(kept.as_str().as_ptr(), first.as_str().as_ptr(), "the book's id, not the request's");
        assert_eq!(env.agents[&first].held, 3);
        // Beyond the agents tracked, the hold keeps the request's id and no book is made.
        let untracked = AgentId::new("another-agent").unwrap();
        let kept = env.agent_held(&untracked, 1, 1);
        assert_eq!(kept.as_str().as_ptr(), untracked.as_str().as_ptr());
        assert!(!env.agents.contains_key(&untracked));
    }

    #[test]
    fn an_unused_environment_is_restored_without_a_usage_book() {
        let mut env = Environment::new(TenantId::new("t").unwrap());
        assert!(round_trip(&env).usage.is_none());
        env.usage_mut();
        assert!(round_trip(&env).usage.is_none(), "an empty book is no book");
        env.usage_mut().record_grant(0, &AgentId::new("agent").unwrap());
        assert!(round_trip(&env).usage.is_some_and(|usage| !usage.is_empty()));
    }

    /// Records and custom thresholds are made when first needed and survive a snapshot; empty records
    /// and the default thresholds are read back as none.
    #[test]
    fn rarely_used_parts_are_made_at_first_use_and_restored_only_when_used() {
        let mut env = Environment::new(TenantId::new("t").unwrap());
        env.set_budget_thresholds(&DEFAULT_BUDGET_THRESHOLDS);
        assert!(env.records.is_none() && env.budget_thresholds.is_none());
        env.records_mut();
        let restored = round_trip(&env);
        assert!(restored.records.is_none() && restored.budget_thresholds.is_none());

        let key = IdempotencyKey::new("k").unwrap();
        env.remember_key(key.clone(), 1);
        env.set_budget_thresholds(&[50, 90]);
        let restored = round_trip(&env);
        assert_eq!(restored.reservation_of(&key), Some(1));
        assert_eq!(restored.budget_thresholds(), [50, 90]);
    }

    fn draws(a: Milli, p: Milli, g: Milli) -> Draws {
        Draws([a, p, g])
    }

    #[test]
    fn plans_draw_in_order_and_refuse_when_short() {
        assert_eq!(Draws::plan(5, draws(3, 10, 10)), Ok(draws(3, 2, 0)));
        assert_eq!(Draws::plan(5, draws(0, 0, 5)), Ok(draws(0, 0, 5)));
        assert_eq!(Draws::plan(5, draws(1, 1, 1)), Err(3));
        assert_eq!(Draws::plan(1, draws(0, 0, Milli::MAX)), Ok(draws(0, 0, 1)));
    }

    #[test]
    fn settle_below_the_hold_charges_in_draw_order_and_releases_the_rest() {
        let mut env = Environment::new(TenantId::new("t").unwrap());
        env.allocated = 10;
        env.payg_enabled = true;
        env.payg_budget = 10;
        let hold = draws(10, 0, 5);
        env.hold(None, hold);
        let settlement = env.settlement(None, hold, 12, false).unwrap();
        env.settle(None, hold, &settlement).unwrap();
        assert_eq!(settlement.charged, draws(10, 0, 2));
        assert_eq!(settlement.released_milli, 3);
        assert_eq!(settlement.overage_milli, 0);
        assert_eq!(env.held, Draws::default());
        assert_eq!(env.used, draws(10, 0, 2));
    }

    #[test]
    fn settle_above_the_hold_takes_available_then_records_overage() {
        let mut env = Environment::new(TenantId::new("t").unwrap());
        env.allocated = 10;
        let hold = draws(4, 0, 0);
        env.hold(None, hold);
        let settlement = env.settlement(None, hold, 15, false).unwrap();
        env.settle(None, hold, &settlement).unwrap();
        assert_eq!(settlement.charged, draws(10, 0, 0));
        assert_eq!(settlement.overage_milli, 5);
        assert_eq!(settlement.released_milli, 0);
        assert_eq!(env.overage, 5);
    }
}
