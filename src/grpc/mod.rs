//! The `quota.v1` gRPC services. This is the only module that knows about protobuf: it decodes and
//! validates requests into ledger commands, and turns outcomes and errors into responses and statuses.

mod admin;
mod alerts;
mod billing;
pub(crate) mod codec;
mod convert;
mod grpc_only;
mod holds;
mod quota;
mod reports;
mod status;

use std::sync::Arc;

pub use admin::AdminService;
pub use alerts::{AlertHub, DEFAULT_MAX_ALERT_WATCHES};
pub use grpc_only::GrpcOnlyLayer;
pub use quota::QuotaService;

use crate::{
    clock::Clock,
    durability::store::Store,
    ledger::{Command, Ledger, Milli, Outcome},
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
}

/// What every service shares: the ledger, the clock that stamps commands, the policy, and the store
/// that makes changes durable (none when state is kept in memory only).
pub struct Context {
    pub ledger: Ledger,
    pub clock: Arc<dyn Clock>,
    pub policy: Policy,
    pub store: Option<Arc<Store>>,
    pub alerts: Arc<alerts::AlertHub>,
}

impl Context {
    /// Stamps a command with the current time and applies it; see [`Context::execute_at`].
    async fn execute(&self, command: &Command) -> Result<Outcome, tonic::Status> {
        self.execute_at(command, self.clock.now_ms()).await
    }

    /// Applies a command at `now`, and answers once the change (or, for a retry, the change it
    /// repeats) is durable.
    async fn execute_at(&self, command: &Command, now: u64) -> Result<Outcome, tonic::Status> {
        if let Some(store) = &self.store
            && !store.journal().is_healthy()
        {
            return Err(status::log_unavailable());
        }
        let outcome = self.ledger.apply(command, now)?;
        if let Some(store) = &self.store {
            store.wait_durable().await.map_err(|_| status::log_unavailable())?;
        }
        Ok(outcome)
    }
}
