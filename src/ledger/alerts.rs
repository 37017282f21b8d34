//! Alerts: what admins are told when capacity runs low or out, comes back, or an agent, a budget or a
//! tenant crosses a threshold. Each kind of level is remembered in the books it belongs to, and an
//! alert fires only when the level rises past the one last alerted (or, for an environment, changes:
//! the alert names the new level, RESTORED for back to normal); a level that falls re-arms the alert
//! silently, so each crossing fires once.
//!
//! Alerts are raised after an event is applied, live and at replay alike, so a restart neither repeats
//! nor loses them: budget and agent alerts from the environment's own state, environment and tenant
//! alerts from the levels logged with the event ([`Levels`]), since those depend on the tenant pool
//! that sibling environments share. The recent alerts of each tenant are kept, bounded, in the ledger
//! (and in snapshots); new ones are also handed to an [`AlertSink`] for live watchers.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{
    AgentId, Balance, BalanceState, Books, EnvironmentId, Event, Ledger, Levels, MILLI_PER_MESSAGE, Milli, Source,
    TenantId, TenantLevels,
    account::{AgentBook, Tenant},
};

/// The most recent alerts kept per tenant.
pub const MAX_ALERTS_PER_TENANT: usize = 1_000;
/// Pay-as-you-go budget thresholds unless set otherwise.
pub const DEFAULT_BUDGET_THRESHOLDS: [u32; 2] = [80, 100];
/// At most this many budget thresholds per environment.
pub const MAX_BUDGET_THRESHOLDS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertKind {
    EnvironmentLow,
    EnvironmentDepleted,
    EnvironmentRestored,
    AgentNearingLimit,
    AgentOverLimit,
    BudgetThreshold,
    TenantCapacityUsed,
    TenantGraceExhausted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub tenant: TenantId,
    pub environment: Option<EnvironmentId>,
    pub agent: Option<AgentId>,
    pub kind: AlertKind,
    pub threshold_percent: u32,
    /// What crossed the threshold, and the amount the threshold is a percentage of.
    pub used_milli: Milli,
    pub limit_milli: Milli,
    /// The environment's balance as the alert fired; `None` for tenant alerts.
    pub balance: Option<Balance>,
    pub at_ms: u64,
    pub message: String,
    /// The logged event that raised it; 0 without a log.
    pub seq: u64,
}

/// Where new alerts go as they fire (not at replay): live watchers.
pub trait AlertSink: Send + Sync + 'static {
    fn publish(&self, alert: &Alert);
}

/// A tenant's recent alerts, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AlertLog {
    pub alerts: VecDeque<Alert>,
    /// The newest event whose alerts are in the log: replay skips what a snapshot already holds.
    pub last_seq: u64,
}

impl AlertLog {
    fn push(&mut self, alert: Alert) -> bool {
        if alert.seq != 0 && alert.seq <= self.last_seq {
            return false;
        }
        self.last_seq = self.last_seq.max(alert.seq);
        self.alerts.push_back(alert);
        while self.alerts.len() > MAX_ALERTS_PER_TENANT {
            self.alerts.pop_front();
        }
        true
    }
}

/// An environment's current level as an alert kind: what a new watcher is told first.
pub fn level_kind(state: BalanceState) -> AlertKind {
    match state {
        BalanceState::Ok => AlertKind::EnvironmentRestored,
        BalanceState::Low => AlertKind::EnvironmentLow,
        BalanceState::Depleted => AlertKind::EnvironmentDepleted,
    }
}

/// The message of an environment level alert.
pub fn level_message(balance: &Balance, kind: AlertKind) -> String {
    let environment = &balance.environment;
    let available = messages(balance.available_milli);
    match kind {
        AlertKind::EnvironmentLow => format!(
            "environment {environment} is low: {available} messages available, at or below {}% of its allocation \
             and budget",
            balance.low_percent
        ),
        AlertKind::EnvironmentDepleted => {
            format!("environment {environment} is depleted: AI calls are refused until capacity is added")
        }
        _ => format!("environment {environment} has capacity: {available} messages available"),
    }
}

fn messages(milli: Milli) -> String {
    if milli == Milli::MAX {
        return "unlimited".to_owned();
    }
    let (whole, fraction) = (milli / MILLI_PER_MESSAGE, milli % MILLI_PER_MESSAGE);
    if fraction == 0 { whole.to_string() } else { format!("{whole}.{fraction:03}") }
}

/// 0: below `notify_percent`; 1: nearing; 2: at or over the limit.
fn agent_level(book: &AgentBook) -> u8 {
    let Some(limit) = book.limit.filter(|l| l.limit_milli > 0) else { return 0 };
    if book.used >= limit.limit_milli {
        2
    } else if u128::from(book.used) * 100 >= u128::from(limit.limit_milli) * u128::from(limit.notify_percent) {
        1
    } else {
        0
    }
}

/// 0: neither; 1: allocations plus pool use reached the purchase; 2: they reached the grace limit.
pub fn tenant_level(tenant: &Tenant) -> u8 {
    let taken = tenant.allocated.saturating_add(tenant.pool_used);
    if tenant.purchased == 0 || taken < tenant.purchased {
        0
    } else if tenant.grace_percent > 100 && taken.saturating_add(tenant.pool_held) >= tenant.pool_limit() {
        2
    } else {
        1
    }
}

impl Ledger {
    /// Compares the levels after `event` with those last alerted, records and publishes what fired.
    /// The environment's and the tenant's levels are `levels`, decided live before the event was logged
    /// and read back from the log at replay; the budget's and agents' are the environment's own. The
    /// amounts an alert reports are the books' now: at replay the pool in them can hold a sibling's
    /// later change only for an event applied before the snapshot copied the alert log, whose alerts
    /// the restored log already holds and skips.
    pub(super) fn raise_alerts(&self, books: &mut Books<'_>, event: &Event, levels: Levels, now: u64, seq: u64) {
        let mut fired: Vec<(AlertKind, Option<AgentId>, u32, Milli, Milli, String)> = Vec::new();
        let environment = books.cell.id.clone();

        // On the hot path: no balance is built unless the level changed.
        let level = levels.environment;
        if level != books.env.alert_level {
            let balance = books.balance();
            // The alert names the new level: LOW also when a depleted environment gets some capacity back.
            let kind = level_kind(level);
            books.env.alert_level = level;
            let threshold = if kind == AlertKind::EnvironmentLow { balance.low_percent } else { 0 };
            fired.push((kind, None, threshold, balance.available_milli, 0, level_message(&balance, kind)));
        }

        let env = &mut *books.env;
        if env.payg_enabled && env.payg_budget > 0 {
            let used = env.used.get(Source::PayAsYouGo);
            let percent = u128::from(used) * 100 / u128::from(env.payg_budget);
            let crossed =
                env.budget_thresholds().iter().copied().filter(|t| u128::from(*t) <= percent).max().unwrap_or(0);
            if crossed > env.budget_alerted {
                let mut newly: Vec<u32> = env
                    .budget_thresholds()
                    .iter()
                    .copied()
                    .filter(|t| *t > env.budget_alerted && *t <= crossed)
                    .collect();
                newly.sort_unstable();
                for threshold in newly {
                    let message = format!(
                        "environment {environment} used {threshold}% of its pay-as-you-go budget: {} of {} messages",
                        messages(used),
                        messages(env.payg_budget)
                    );
                    fired.push((AlertKind::BudgetThreshold, None, threshold, used, env.payg_budget, message));
                }
            }
            env.budget_alerted = crossed;
        } else {
            env.budget_alerted = 0;
        }

        if let Some(agent) = event_agent(books, event)
            && let Some(book) = books.env.agents.get_mut(&agent)
        {
            let level = agent_level(book);
            if level > book.alerted
                && let Some(limit) = book.limit
            {
                let (kind, threshold, what) = if level == 2 {
                    (AlertKind::AgentOverLimit, 100, "reached its limit")
                } else {
                    (AlertKind::AgentNearingLimit, limit.notify_percent, "is nearing its limit")
                };
                let message = format!(
                    "agent {agent} {what} in environment {environment}: {} of {} messages this month",
                    messages(book.used),
                    messages(limit.limit_milli)
                );
                fired.push((kind, Some(agent.clone()), threshold, book.used, limit.limit_milli, message));
            }
            book.alerted = level;
        }

        let mut tenant_alert = None;
        if let (Some(tenant), Some(crossing)) = (books.tenant.as_deref_mut(), levels.tenant) {
            tenant_alert = tenant_crossing(tenant, &books.env.tenant, crossing);
        }

        if fired.is_empty() && tenant_alert.is_none() {
            return;
        }
        let balance = books.balance();
        let tenant = books.env.tenant.clone();
        let mut alerts: Vec<Alert> = fired
            .into_iter()
            .map(|(kind, agent, threshold_percent, used_milli, limit_milli, message)| Alert {
                tenant: tenant.clone(),
                environment: Some(environment.clone()),
                agent,
                kind,
                threshold_percent,
                used_milli,
                limit_milli,
                balance: Some(balance.clone()),
                at_ms: now,
                message,
                seq,
            })
            .collect();
        if let Some((kind, threshold_percent, used_milli, limit_milli, message)) = tenant_alert {
            alerts.push(Alert {
                tenant: tenant.clone(),
                environment: None,
                agent: None,
                kind,
                threshold_percent,
                used_milli,
                limit_milli,
                balance: None,
                at_ms: now,
                message,
                seq,
            });
        }
        self.keep_alerts(&tenant, alerts);
    }

    fn keep_alerts(&self, tenant: &TenantId, alerts: Vec<Alert>) {
        let log = self.alert_logs.entry(tenant.clone()).or_default().clone();
        let mut log = log.lock();
        for alert in alerts {
            if log.push(alert.clone())
                && let Some(sink) = self.alert_sink.get()
            {
                sink.publish(&alert);
            }
        }
    }

    /// The tenant's recent alerts, oldest first, optionally of one environment, at most `max`.
    pub fn recent_alerts(&self, tenant: &TenantId, environment: Option<&EnvironmentId>, max: usize) -> Vec<Alert> {
        let Some(log) = self.alert_logs.get(tenant).map(|log| log.clone()) else { return Vec::new() };
        let log = log.lock();
        let matching: Vec<&Alert> =
            log.alerts.iter().filter(|a| environment.is_none_or(|e| a.environment.as_ref() == Some(e))).collect();
        matching[matching.len().saturating_sub(max)..].iter().map(|a| (*a).clone()).collect()
    }

    /// Sends every alert fired from now on to `sink`; set once, after recovery.
    pub fn set_alert_sink(&self, sink: std::sync::Arc<dyn AlertSink>) {
        let _ = self.alert_sink.set(sink);
    }

    /// The capacity environments of a tenant, in id order.
    pub fn tenant_environments(&self, tenant: &TenantId) -> Vec<EnvironmentId> {
        let mut ids: Vec<EnvironmentId> = self
            .environments
            .iter()
            .filter_map(|slot| match slot.value() {
                super::Slot::Capacity(cell) if cell.books.lock().tenant == *tenant => Some(slot.key().clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }
}

/// The tenant alert that fires now, if its level rose from the one last alerted; re-arms it if the
/// level fell.
fn tenant_crossing(
    tenant: &mut Tenant,
    id: &TenantId,
    levels: TenantLevels,
) -> Option<(AlertKind, u32, Milli, Milli, String)> {
    let TenantLevels { before: previous, after: level } = levels;
    tenant.alerted = level;
    if level <= previous {
        return None;
    }
    let taken = tenant.allocated.saturating_add(tenant.pool_used);
    Some(if level == 2 {
        let message = format!(
            "tenant {id} reached its overage grace of {}%: environments drawing on its pool are refused until \
             capacity is added",
            tenant.grace_percent
        );
        let limit = tenant.pool_limit();
        (AlertKind::TenantGraceExhausted, tenant.grace_percent, taken.saturating_add(tenant.pool_held), limit, message)
    } else {
        let message = format!(
            "tenant {id} has allocated or used all {} messages of its prepaid capacity this month",
            messages(tenant.purchased)
        );
        (AlertKind::TenantCapacityUsed, 100, taken, tenant.purchased, message)
    })
}

/// Takes the level after a purchase, a policy change or a new period as alerted, without an alert: these
/// lower it, or (a lower grace) are the admin's own doing. So the level alerted is always the current
/// one, a function of the tenant's counters, which recovery recomputes like them.
pub fn rearm_tenant(tenant: &mut Tenant) {
    tenant.alerted = tenant_level(tenant);
}

/// The agent an event concerns, if any. Releases and expiries use nothing, so they leave every agent's
/// level as it was: one naming several holds needs no agent.
fn event_agent(books: &Books<'_>, event: &Event) -> Option<AgentId> {
    match event {
        Event::Reserved { agent, .. } | Event::AgentLimitSet { agent, .. } => Some(agent.clone()),
        Event::Committed { reservation, .. } | Event::Released { reservation } | Event::Expired { reservation } => {
            books.env.hold_of(reservation.seq).map(|h| h.agent.clone())
        }
        _ => None,
    }
}
