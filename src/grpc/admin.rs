//! `quota.v1.QuotaAdmin`: buying, allocating and linking capacity.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{
    Context, alerts, api_keys, billing,
    convert::{self, LogId},
    holds, reports,
};
use crate::{
    auth::LoggedKeyId,
    ledger::{Command, EnvironmentId, Outcome, TenantCapacity, TenantId},
    proto::{self, quota_admin_server::QuotaAdmin},
};

pub struct AdminService {
    context: Arc<Context>,
}

impl AdminService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }

    /// Applies an admin command that yields a balance.
    async fn balance_of(&self, command: &Command) -> Result<Response<proto::Balance>, Status> {
        let Outcome::Balance(balance) = self.context.execute(command).await? else {
            unreachable!("this admin command yields a balance")
        };
        Ok(Response::new(convert::balance(balance)))
    }
}

pub(super) fn tenant_capacity(capacity: TenantCapacity) -> proto::TenantCapacity {
    proto::TenantCapacity {
        tenant_id: capacity.tenant.to_string(),
        purchased_milli: capacity.purchased_milli,
        allocated_milli: capacity.allocated_milli,
        unallocated_milli: capacity.unallocated_milli(),
        tenant_pool_used_milli: capacity.pool_used_milli,
        tenant_pool_reserved_milli: capacity.pool_reserved_milli,
        overage_grace_percent: capacity.grace_percent,
        time_zone: capacity.time_zone,
        period: capacity.period,
        grace_used_milli: capacity.grace_used_milli,
    }
}

#[tonic::async_trait]
impl QuotaAdmin for AdminService {
    #[instrument(
        name = "PurchaseCapacity",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/PurchaseCapacity",
            tenant = %LogId(&request.get_ref().tenant_id),
            packs = request.get_ref().packs,
        )
    )]
    async fn purchase_capacity(
        &self,
        request: Request<proto::PurchaseCapacityRequest>,
    ) -> Result<Response<proto::TenantCapacity>, Status> {
        let request = request.into_inner();
        let command = Command::PurchaseCapacity {
            tenant: convert::id("tenant_id", &request.tenant_id, TenantId::new)?,
            amount_milli: self.context.policy.purchase_milli(request.packs)?,
            idempotency_key: convert::idempotency_key("idempotency_key", &request.idempotency_key)?,
        };
        let Outcome::Tenant(capacity) = self.context.execute(&command).await? else {
            unreachable!("a purchase yields the tenant's capacity")
        };
        tracing::info!(purchased_milli = capacity.purchased_milli, "capacity purchased");
        Ok(Response::new(tenant_capacity(capacity)))
    }

    #[instrument(
        name = "AllocateCapacity",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/AllocateCapacity",
            tenant = %LogId(&request.get_ref().tenant_id),
            environment = %LogId(&request.get_ref().environment_id),
        )
    )]
    async fn allocate_capacity(
        &self,
        request: Request<proto::AllocateCapacityRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        let request = request.into_inner();
        let command = Command::AllocateCapacity {
            tenant: convert::id("tenant_id", &request.tenant_id, TenantId::new)?,
            environment: convert::id("environment_id", &request.environment_id, EnvironmentId::new)?,
            amount_milli: convert::allocation_milli(request.messages)?,
            draw_from_tenant_pool: request.draw_from_tenant_pool,
        };
        let response = self.balance_of(&command).await?;
        tracing::info!(allocated_milli = response.get_ref().allocated_milli, "capacity allocated");
        Ok(response)
    }

    #[instrument(
        name = "SetPayAsYouGo",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/SetPayAsYouGo", environment = %LogId(&request.get_ref().environment_id))
    )]
    async fn set_pay_as_you_go(
        &self,
        request: Request<proto::SetPayAsYouGoRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        let request = request.into_inner();
        let command = Command::SetPayAsYouGo {
            environment: convert::id("environment_id", &request.environment_id, EnvironmentId::new)?,
            enabled: request.enabled,
            budget_milli: self.context.policy.budget_milli(request.monthly_budget_messages)?,
        };
        let response = self.balance_of(&command).await?;
        tracing::info!(
            enabled = request.enabled,
            budget_messages = request.monthly_budget_messages,
            "pay-as-you-go set"
        );
        Ok(response)
    }

    #[instrument(
        name = "LinkEnvironment",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/LinkEnvironment",
            app = %LogId(&request.get_ref().app_environment_id),
            environment = %LogId(&request.get_ref().environment_id),
        )
    )]
    async fn link_environment(
        &self,
        request: Request<proto::LinkEnvironmentRequest>,
    ) -> Result<Response<proto::LinkEnvironmentResponse>, Status> {
        let request = request.into_inner();
        let target = match request.environment_id.as_str() {
            "" => None,
            id => Some(convert::id("environment_id", id, EnvironmentId::new)?),
        };
        let command = Command::LinkEnvironment {
            app_environment: convert::id("app_environment_id", &request.app_environment_id, EnvironmentId::new)?,
            environment: target,
        };
        let Outcome::Linked(link) = self.context.execute(&command).await? else { unreachable!("a link yields a link") };
        tracing::info!(linked = link.target.is_some(), "environment link set");
        let (environment_id, tenant_id) =
            link.target.map(|(env, tenant)| (env.to_string(), tenant.to_string())).unwrap_or_default();
        Ok(Response::new(proto::LinkEnvironmentResponse {
            app_environment_id: link.app_environment.to_string(),
            environment_id,
            tenant_id,
        }))
    }

    #[instrument(
        level = "debug",
        name = "GetTenant",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/GetTenant", tenant = %LogId(&request.get_ref().tenant_id))
    )]
    async fn get_tenant(
        &self,
        request: Request<proto::GetTenantRequest>,
    ) -> Result<Response<proto::TenantCapacity>, Status> {
        let tenant = convert::id("tenant_id", &request.get_ref().tenant_id, TenantId::new)?;
        Ok(Response::new(tenant_capacity(self.context.ledger.tenant(&tenant, self.context.clock.now_ms())?)))
    }

    #[instrument(
        name = "SetTenantPolicy",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/SetTenantPolicy", tenant = %LogId(&request.get_ref().tenant_id))
    )]
    async fn set_tenant_policy(
        &self,
        request: Request<proto::SetTenantPolicyRequest>,
    ) -> Result<Response<proto::TenantCapacity>, Status> {
        billing::set_tenant_policy(&self.context, request.into_inner()).await.map(Response::new)
    }

    #[instrument(
        name = "SetEnvironmentAlerts",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/SetEnvironmentAlerts",
            environment = %LogId(&request.get_ref().environment_id),
        )
    )]
    async fn set_environment_alerts(
        &self,
        request: Request<proto::SetEnvironmentAlertsRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        billing::set_environment_alerts(&self.context, request.into_inner()).await.map(Response::new)
    }

    #[instrument(
        name = "SetAgentLimit",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/SetAgentLimit",
            environment = %LogId(&request.get_ref().environment_id),
            agent = %LogId(&request.get_ref().agent_id),
        )
    )]
    async fn set_agent_limit(
        &self,
        request: Request<proto::SetAgentLimitRequest>,
    ) -> Result<Response<proto::AgentLimit>, Status> {
        billing::set_agent_limit(&self.context, request.into_inner()).await.map(Response::new)
    }

    #[instrument(
        level = "debug",
        name = "ListAgentLimits",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/ListAgentLimits", environment = %LogId(&request.get_ref().environment_id))
    )]
    async fn list_agent_limits(
        &self,
        request: Request<proto::ListAgentLimitsRequest>,
    ) -> Result<Response<proto::ListAgentLimitsResponse>, Status> {
        billing::list_agent_limits(&self.context, request.into_inner()).map(Response::new)
    }

    #[instrument(
        level = "debug",
        name = "GetUsage",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/GetUsage",
            tenant = %LogId(&request.get_ref().tenant_id),
            environment = %LogId(&request.get_ref().environment_id),
            agent = %LogId(&request.get_ref().agent_id),
        )
    )]
    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        reports::get_usage(&self.context, request.into_inner()).map(Response::new)
    }

    #[instrument(level = "debug", name = "GetRateCard", skip_all, fields(rpc = "quota.v1.QuotaAdmin/GetRateCard"))]
    async fn get_rate_card(
        &self,
        request: Request<proto::GetRateCardRequest>,
    ) -> Result<Response<proto::RateCard>, Status> {
        reports::get_rate_card(&self.context, request.into_inner()).map(Response::new)
    }

    #[instrument(name = "SetRateCard", skip_all, fields(rpc = "quota.v1.QuotaAdmin/SetRateCard"))]
    async fn set_rate_card(
        &self,
        request: Request<proto::SetRateCardRequest>,
    ) -> Result<Response<proto::RateCard>, Status> {
        reports::set_rate_card(&self.context, request.into_inner()).await.map(Response::new)
    }

    #[instrument(
        level = "debug",
        name = "ListReservations",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/ListReservations",
            environment = %LogId(&request.get_ref().environment_id),
            agent = %LogId(&request.get_ref().agent_id),
        )
    )]
    async fn list_reservations(
        &self,
        request: Request<proto::ListReservationsRequest>,
    ) -> Result<Response<proto::ListReservationsResponse>, Status> {
        holds::list_reservations(&self.context, request.into_inner()).map(Response::new)
    }

    #[instrument(
        name = "ReleaseAll",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/ReleaseAll",
            environment = %LogId(&request.get_ref().environment_id),
            agent = %LogId(&request.get_ref().agent_id),
        )
    )]
    async fn release_all(
        &self,
        request: Request<proto::ReleaseAllRequest>,
    ) -> Result<Response<proto::ReleaseAllResponse>, Status> {
        holds::release_all(&self.context, request.into_inner()).await.map(Response::new)
    }

    #[instrument(
        level = "debug",
        name = "ListAlerts",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/ListAlerts",
            tenant = %LogId(&request.get_ref().tenant_id),
            environment = %LogId(&request.get_ref().environment_id),
        )
    )]
    async fn list_alerts(
        &self,
        request: Request<proto::ListAlertsRequest>,
    ) -> Result<Response<proto::ListAlertsResponse>, Status> {
        alerts::list_alerts(&self.context, request.into_inner()).map(Response::new)
    }

    type WatchAlertsStream = alerts::AlertStream;

    #[instrument(
        level = "debug",
        name = "WatchAlerts",
        skip_all,
        fields(
            rpc = "quota.v1.QuotaAdmin/WatchAlerts",
            tenant = %LogId(&request.get_ref().tenant_id),
            environment = %LogId(&request.get_ref().environment_id),
        )
    )]
    async fn watch_alerts(
        &self,
        request: Request<proto::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        alerts::watch_alerts(&self.context, request.into_inner()).map(Response::new)
    }

    // The answer carries the secret: the span records the tenant only.
    #[instrument(
        name = "CreateApiKey",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/CreateApiKey", tenant = %LogId(&request.get_ref().tenant_id))
    )]
    async fn create_api_key(
        &self,
        request: Request<proto::CreateApiKeyRequest>,
    ) -> Result<Response<proto::ApiKey>, Status> {
        api_keys::create_api_key(&self.context, request.into_inner()).await.map(Response::new)
    }

    // A secret sent as the key id is logged by its key id only.
    #[instrument(
        name = "RevokeApiKey",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/RevokeApiKey", key_id = %LoggedKeyId(&request.get_ref().key_id))
    )]
    async fn revoke_api_key(
        &self,
        request: Request<proto::RevokeApiKeyRequest>,
    ) -> Result<Response<proto::ApiKey>, Status> {
        api_keys::revoke_api_key(&self.context, request.into_inner()).await.map(Response::new)
    }

    #[instrument(
        level = "debug",
        name = "ListApiKeys",
        skip_all,
        fields(rpc = "quota.v1.QuotaAdmin/ListApiKeys", tenant = %LogId(&request.get_ref().tenant_id))
    )]
    async fn list_api_keys(
        &self,
        request: Request<proto::ListApiKeysRequest>,
    ) -> Result<Response<proto::ListApiKeysResponse>, Status> {
        api_keys::list_api_keys(&self.context, request.into_inner()).map(Response::new)
    }
}
