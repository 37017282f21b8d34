//! `quota.v1.Quota`: what agent runtimes call around every AI call.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use super::{
    Context,
    auth::api_key_of,
    convert::{self, Zero},
};
use crate::{
    ledger::{AgentId, Command, EnvironmentId, Outcome},
    proto::{self, quota_server::Quota},
};

pub struct QuotaService {
    context: Arc<Context>,
}

impl QuotaService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl Quota for QuotaService {
    #[instrument(
        level = "debug",
        name = "CheckAndReserve",
        skip_all,
        fields(environment, agent, api_key, amount_milli, decision)
    )]
    async fn check_and_reserve(
        &self,
        request: Request<proto::CheckAndReserveRequest>,
    ) -> Result<Response<proto::CheckAndReserveResponse>, Status> {
        let api_key = api_key_of(&request)?;
        let request = request.into_inner();
        let policy = &self.context.policy;
        let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
        let agent = convert::id("agent_id", &request.agent_id, AgentId::new)?;
        let usage = policy.usage(request.messages, &request.usage, Zero::Refused)?;
        let idempotency_key = convert::idempotency_key("idempotency_key", &request.idempotency_key)?;
        let ttl_ms = policy.ttl_ms(request.ttl_seconds)?;
        let span = Span::current();
        span.record("environment", environment.as_str()).record("agent", agent.as_str());
        if let Some(id) = &api_key {
            span.record("api_key", id.as_str());
        }

        let now = self.context.clock.now_ms();
        if request.dry_run {
            let quote =
                self.context.ledger.dry_run(&environment, &agent, &usage, api_key.as_ref(), now).inspect_err(|_| {
                    span.record("decision", "refused");
                })?;
            span.record("decision", "would_grant").record("amount_milli", quote.amount_milli);
            return Ok(Response::new(proto::CheckAndReserveResponse {
                reservation_id: String::new(),
                reserved_milli: quote.amount_milli,
                draws: convert::draws(&quote.draws),
                expires_at_unix_ms: 0,
                balance: Some(convert::balance(quote.balance)),
            }));
        }
        let command = Command::Reserve {
            environment,
            agent,
            usage,
            idempotency_key,
            expires_at_ms: now.saturating_add(ttl_ms),
            api_key,
        };
        // The same instant stamps the command and starts its hold's lifetime.
        let outcome = self.context.execute_at(&command, now).await.inspect_err(|_| {
            span.record("decision", "refused");
        })?;
        let Outcome::Reserved(grant) = outcome else { unreachable!("a reserve yields a grant") };
        span.record("decision", if grant.replayed { "replayed" } else { "granted" })
            .record("amount_milli", grant.amount_milli);
        Ok(Response::new(proto::CheckAndReserveResponse {
            reservation_id: grant.reservation.to_string(),
            reserved_milli: grant.amount_milli,
            draws: convert::draws(&grant.draws),
            expires_at_unix_ms: grant.expires_at_ms,
            balance: Some(convert::balance(grant.balance)),
        }))
    }

    #[instrument(level = "debug", name = "Commit", skip_all, fields(reservation, actual_milli))]
    async fn commit(&self, request: Request<proto::CommitRequest>) -> Result<Response<proto::CommitResponse>, Status> {
        let api_key = api_key_of(&request)?;
        let request = request.into_inner();
        let reservation = convert::reservation_id(&request.reservation_id)?;
        let usage = self.context.policy.usage(request.messages, &request.usage, Zero::Allowed)?;
        let span = Span::current();
        span.record("reservation", request.reservation_id.as_str());
        let outcome = self.context.execute(&Command::Commit { reservation, usage, api_key }).await?;
        let Outcome::Committed(settled) = outcome else { unreachable!("a commit yields a settlement") };
        let settlement = settled.result;
        span.record("actual_milli", settlement.charged.total() + settlement.overage_milli);
        Ok(Response::new(proto::CommitResponse {
            charged_milli: settlement.charged.total(),
            draws: convert::draws(&settlement.charged),
            released_milli: settlement.released_milli,
            overage_milli: settlement.overage_milli,
            late: settlement.late,
            balance: Some(convert::balance(settled.balance)),
        }))
    }

    #[instrument(level = "debug", name = "Release", skip_all, fields(reservation))]
    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let api_key = api_key_of(&request)?;
        let request = request.into_inner();
        let reservation = convert::reservation_id(&request.reservation_id)?;
        Span::current().record("reservation", request.reservation_id.as_str());
        let outcome = self.context.execute(&Command::Release { reservation, api_key }).await?;
        let Outcome::Released(settled) = outcome else { unreachable!("a release yields a settlement") };
        Ok(Response::new(proto::ReleaseResponse {
            released_milli: settled.result,
            balance: Some(convert::balance(settled.balance)),
        }))
    }

    #[instrument(level = "debug", name = "GetBalance", skip_all, fields(environment))]
    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        let api_key = api_key_of(&request)?;
        let request = request.into_inner();
        let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
        Span::current().record("environment", environment.as_str());
        let balance = self.context.ledger.balance_for(&environment, api_key.as_ref(), self.context.clock.now_ms())?;
        Ok(Response::new(convert::balance(balance)))
    }
}
