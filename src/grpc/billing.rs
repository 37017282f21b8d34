//! `QuotaAdmin` calls that set billing policy: tenant grace and time zone, environment alerts, agent
//! limits.

use tonic::Status;

use super::{Context, admin::tenant_capacity, convert, status::FieldError};
use crate::{
    ledger::{
        AgentId, AgentLimit, AgentLimitView, Command, DEFAULT_LOW_PERCENT, EnvironmentId, MILLI_PER_MESSAGE, Outcome,
        TenantId,
        alerts::{DEFAULT_BUDGET_THRESHOLDS, MAX_BUDGET_THRESHOLDS},
        period::{self, DEFAULT_TIME_ZONE},
    },
    proto,
};

pub const MIN_GRACE_PERCENT: u32 = 100;
pub const MAX_GRACE_PERCENT: u32 = 1_000;
/// An agent's NEARING_LIMIT alert fires at this percentage of its limit unless set otherwise.
pub const DEFAULT_AGENT_NOTIFY_PERCENT: u32 = 80;
/// The largest agent limit, as for pay-as-you-go budgets.
pub const MAX_AGENT_LIMIT_MESSAGES: u64 = 1_000_000_000_000;

pub async fn set_tenant_policy(
    context: &Context,
    request: proto::SetTenantPolicyRequest,
) -> Result<proto::TenantCapacity, Status> {
    let grace_percent = match request.overage_grace_percent {
        0 => MIN_GRACE_PERCENT,
        percent @ MIN_GRACE_PERCENT..=MAX_GRACE_PERCENT => percent,
        percent => {
            return Err(FieldError::new(
                "overage_grace_percent",
                format!(
                    "is {percent}; it must be {MIN_GRACE_PERCENT} to {MAX_GRACE_PERCENT} (0 means {MIN_GRACE_PERCENT})"
                ),
            )
            .into());
        }
    };
    let time_zone = match request.time_zone.as_str() {
        "" => DEFAULT_TIME_ZONE.to_owned(),
        name => period::parse_time_zone(name).map_err(|e| FieldError::new("time_zone", e.to_string()))?,
    };
    let command = Command::SetTenantPolicy {
        tenant: convert::id("tenant_id", &request.tenant_id, TenantId::new)?,
        grace_percent,
        time_zone,
    };
    let Outcome::Tenant(capacity) = context.execute(&command).await? else {
        unreachable!("a tenant policy yields the tenant's capacity")
    };
    tracing::info!(grace_percent, time_zone = %capacity.time_zone, "tenant policy set");
    Ok(tenant_capacity(capacity))
}

pub async fn set_environment_alerts(
    context: &Context,
    request: proto::SetEnvironmentAlertsRequest,
) -> Result<proto::Balance, Status> {
    let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
    let low_percent = match request.low_percent {
        0 => DEFAULT_LOW_PERCENT,
        percent @ 1..=100 => percent,
        percent => {
            return Err(
                FieldError::new("low_percent", format!("is {percent}; it must be 1 to 100 (0 means 20)")).into()
            );
        }
    };
    let mut budget_thresholds = request.budget_threshold_percents;
    if budget_thresholds.len() > MAX_BUDGET_THRESHOLDS {
        return Err(FieldError::new(
            "budget_threshold_percents",
            format!("has {} values; at most {MAX_BUDGET_THRESHOLDS}", budget_thresholds.len()),
        )
        .into());
    }
    for (index, percent) in budget_thresholds.iter().enumerate() {
        if !(1..=100).contains(percent) {
            return Err(FieldError::new(
                format!("budget_threshold_percents[{index}]"),
                format!("is {percent}; it must be 1 to 100"),
            )
            .into());
        }
    }
    if budget_thresholds.is_empty() {
        budget_thresholds = DEFAULT_BUDGET_THRESHOLDS.to_vec();
    }
    budget_thresholds.sort_unstable();
    budget_thresholds.dedup();
    let command = Command::SetEnvironmentAlerts { environment, low_percent, budget_thresholds };
    let Outcome::Balance(balance) = context.execute(&command).await? else {
        unreachable!("environment alerts yield the balance")
    };
    tracing::info!(low_percent, "environment alerts set");
    Ok(convert::balance(balance))
}

pub async fn set_agent_limit(
    context: &Context,
    request: proto::SetAgentLimitRequest,
) -> Result<proto::AgentLimit, Status> {
    let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
    let agent = convert::id("agent_id", &request.agent_id, AgentId::new)?;
    if request.monthly_limit_messages > MAX_AGENT_LIMIT_MESSAGES {
        return Err(FieldError::new(
            "monthly_limit_messages",
            format!("is {}; the limit is {MAX_AGENT_LIMIT_MESSAGES} messages", request.monthly_limit_messages),
        )
        .into());
    }
    let notify_percent = match request.notify_percent {
        0 => DEFAULT_AGENT_NOTIFY_PERCENT,
        percent @ 1..=100 => percent,
        percent => {
            return Err(
                FieldError::new("notify_percent", format!("is {percent}; it must be 1 to 100 (0 means 80)")).into()
            );
        }
    };
    // No cap and not disabled: the agent has no limit, and its entry goes once it holds and uses nothing.
    let has_limit = request.monthly_limit_messages > 0 || request.disabled;
    let limit = has_limit.then_some(AgentLimit {
        limit_milli: request.monthly_limit_messages * MILLI_PER_MESSAGE,
        notify_percent,
        stop_when_exceeded: request.stop_when_exceeded,
        disabled: request.disabled,
    });
    let command = Command::SetAgentLimit { environment, agent, limit };
    let Outcome::AgentLimit(view) = context.execute(&command).await? else {
        unreachable!("an agent limit yields the agent's limit")
    };
    tracing::info!(
        limit_messages = request.monthly_limit_messages,
        stop = request.stop_when_exceeded,
        disabled = request.disabled,
        "agent limit set"
    );
    Ok(agent_limit(view))
}

pub fn list_agent_limits(
    context: &Context,
    request: proto::ListAgentLimitsRequest,
) -> Result<proto::ListAgentLimitsResponse, Status> {
    let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
    let agents = context.ledger.agent_limits(&environment, context.clock.now_ms())?;
    Ok(proto::ListAgentLimitsResponse { agents: agents.into_iter().map(agent_limit).collect() })
}

fn agent_limit(view: AgentLimitView) -> proto::AgentLimit {
    let limit = view.limit.unwrap_or(AgentLimit {
        limit_milli: 0,
        notify_percent: DEFAULT_AGENT_NOTIFY_PERCENT,
        stop_when_exceeded: false,
        disabled: false,
    });
    proto::AgentLimit {
        environment_id: view.environment.to_string(),
        agent_id: view.agent.to_string(),
        monthly_limit_messages: limit.limit_milli / MILLI_PER_MESSAGE,
        notify_percent: limit.notify_percent,
        stop_when_exceeded: limit.stop_when_exceeded,
        disabled: limit.disabled,
        used_milli: view.used_milli,
        reserved_milli: view.held_milli,
        period: view.period,
    }
}
