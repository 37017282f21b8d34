//! `QuotaAdmin` calls that set billing policy: tenant grace and time zone, environment alerts, agent
//! limits.

use tonic::Status;

use super::Context;
use crate::proto;

pub async fn set_tenant_policy(
    context: &Context,
    request: proto::SetTenantPolicyRequest,
) -> Result<proto::TenantCapacity, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("SetTenantPolicy is not available yet"))
}

pub async fn set_environment_alerts(
    context: &Context,
    request: proto::SetEnvironmentAlertsRequest,
) -> Result<proto::Balance, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("SetEnvironmentAlerts is not available yet"))
}

pub async fn set_agent_limit(
    context: &Context,
    request: proto::SetAgentLimitRequest,
) -> Result<proto::AgentLimit, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("SetAgentLimit is not available yet"))
}

pub fn list_agent_limits(
    context: &Context,
    request: proto::ListAgentLimitsRequest,
) -> Result<proto::ListAgentLimitsResponse, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("ListAgentLimits is not available yet"))
}
