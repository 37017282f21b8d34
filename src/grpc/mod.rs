//! The `quota.v1` gRPC services. This is the only module that knows about protobuf: it decodes and
//! validates requests into ledger commands, and turns outcomes and errors into responses and statuses.

mod admin;
mod alerts;
mod api_keys;
mod auth;
mod batch;
mod billing;
pub(crate) mod codec;
mod convert;
mod deadline;
mod grpc_only;
mod holds;
mod quota;
mod reports;
mod status;

use std::sync::Arc;

pub use admin::AdminService;
pub use alerts::{AlertHub, DEFAULT_MAX_ALERT_WATCHES, DEFAULT_MAX_ALERT_WATCHES_PER_TENANT};
pub use api_keys::{MAX_API_KEY_DESCRIPTION_BYTES, MAX_API_KEY_ENVIRONMENTS};
pub use auth::{AdminGate, QuotaGate};
pub use deadline::RequestDeadlineLayer;
pub use grpc_only::GrpcOnlyLayer;
pub use quota::QuotaService;
use status::FieldError;

use crate::{
    clock::Clock,
    durability::store::Store,
    ledger::{ApiKeyId, Command, EnvironmentId, Ledger, LedgerError, Milli, Outcome},
    metrics::Metrics,
    proto,
};

/// What the transport checks before a request reaches the ledger.
#[derive(Debug, Clone)]
pub struct Policy {
    pub pack_milli: Milli,
    pub default_ttl_seconds: u32,
    pub max_ttl_seconds: u32,
    pub max_usage_items: usize,
    pub max_amount_milli: Milli,
    pub max_packs_per_purchase: u64,
    pub max_budget_milli: Milli,
    /// `WatchAlerts` streams open at once, across the server.
    pub max_alert_watches: usize,
    /// `WatchAlerts` streams one tenant may have open at once (within `max_alert_watches`).
    pub max_alert_watches_per_tenant: usize,
}

/// What every service shares: the ledger, the clock that stamps commands, the policy, and the store
/// that makes changes durable (none when state is kept in memory only).
pub struct Context {
    pub ledger: Ledger,
    pub clock: Arc<dyn Clock>,
    pub policy: Policy,
    pub store: Option<Arc<Store>>,
    pub alerts: Arc<alerts::AlertHub>,
    pub metrics: Arc<Metrics>,
}

/// Why a command was not applied, kept apart from its status until its reason has been counted (a
/// status holds it only encoded).
#[derive(Debug)]
enum Refusal {
    Field(FieldError),
    Ledger(LedgerError),
    LogUnavailable,
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Field(_) => status::INVALID_ARGUMENT,
            Refusal::Ledger(error) => status::reason(error),
            Refusal::LogUnavailable => status::LOG_UNAVAILABLE,
        }
    }
}

impl From<FieldError> for Refusal {
    fn from(error: FieldError) -> Self {
        Refusal::Field(error)
    }
}

impl From<LedgerError> for Refusal {
    fn from(error: LedgerError) -> Self {
        Refusal::Ledger(error)
    }
}

impl From<Refusal> for tonic::Status {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Field(error) => error.into(),
            Refusal::Ledger(error) => error.into(),
            Refusal::LogUnavailable => status::log_unavailable(),
        }
    }
}

impl Context {
    /// Stamps a command with the current time and applies it; see [`Context::execute_at`].
    async fn execute(&self, command: &Command) -> Result<Outcome, tonic::Status> {
        self.execute_at(command, self.clock.now_ms()).await
    }

    /// Applies a command at `now`, and answers once the change (or, for a retry, the change it
    /// repeats) is durable.
    async fn execute_at(&self, command: &Command, now: u64) -> Result<Outcome, tonic::Status> {
        Ok(self.apply_at(command, now).await?)
    }

    /// [`Context::execute_at`], refusing with a [`Refusal`].
    async fn apply_at(&self, command: &Command, now: u64) -> Result<Outcome, Refusal> {
        self.apply_counted(command, now, |_| {}).await
    }

    /// [`Context::apply_at`], handing the outcome to `applied` as soon as the ledger has applied it,
    /// before waiting for the log: a change whose log write then fails has happened all the same (the
    /// caller's retry returns it as a replay), so it is counted there, once.
    async fn apply_counted(
        &self,
        command: &Command,
        now: u64,
        applied: impl FnOnce(&Outcome),
    ) -> Result<Outcome, Refusal> {
        if let Some(store) = &self.store
            && !store.journal().is_healthy()
        {
            return Err(Refusal::LogUnavailable);
        }
        let outcome = self.ledger.apply(command, now)?;
        applied(&outcome);
        if let Some(store) = &self.store {
            store.wait_durable().await.map_err(|_| Refusal::LogUnavailable)?;
        }
        Ok(outcome)
    }

    /// Counts a refused reservation by its reason. A key's refusal counts under the key's own tenant,
    /// never under the tenant of the environment it named: that may be another tenant's, whose name and
    /// books a key must not reach, not even through the time its lookup takes.
    fn count_refused_reservation(&self, reason: &'static str, environment_id: &str, api_key: Option<&ApiKeyId>) {
        let ledger = &self.ledger;
        self.metrics.reservation_refused(reason, || match api_key {
            Some(id) => Some(ledger.api_key(id.as_str())?.tenant().clone()),
            None => {
                let environment = EnvironmentId::new(environment_id).ok()?;
                ledger.tenant_of(&environment)
            }
        });
    }
}

/// Every method the server serves, as `package.Service/Method`: the quota services, health and
/// reflection.
pub fn served_methods() -> Vec<String> {
    use prost::Message;
    let descriptor_sets = [
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = Vec::new();
    for encoded in descriptor_sets {
        let set = prost_types::FileDescriptorSet::decode(encoded).expect("built-in descriptor sets decode");
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!("{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_methods_include_every_service_the_server_adds() {
        let methods = served_methods();
        for method in [
            "quota.v1.Quota/CheckAndReserve",
            "quota.v1.Quota/CheckAndReserveBatch",
            "quota.v1.Quota/CommitBatch",
            "quota.v1.Quota/ReleaseBatch",
            "quota.v1.QuotaAdmin/WatchAlerts",
            "grpc.health.v1.Health/Check",
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(methods.iter().any(|m| m == method), "{method} missing from {methods:?}");
        }
    }
}
