//! `QuotaAdmin` alert calls: the recent-alerts log and live watches.
//!
//! Every alert the ledger fires goes to one broadcast channel with a bounded buffer. Each watch reads
//! it on a task of its own and forwards matching alerts into a small per-watch queue; a watch whose
//! client reads too slowly falls behind in the broadcast buffer instead of holding anything up, and is
//! then sent a LAGGED marker and the current levels, never an unbounded backlog.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use parking_lot::Mutex;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{
    Context, convert,
    status::{self, FieldError},
};
use crate::{
    ledger::{
        EnvironmentId, LedgerError, TenantId,
        alerts::{Alert, AlertKind, AlertSink, level_kind, level_message},
    },
    proto,
};

pub type AlertStream = Pin<Box<dyn Stream<Item = Result<proto::Alert, Status>> + Send>>;

/// Alerts a watch may fall behind by before it is told it lagged.
const BROADCAST_BUFFER: usize = 1_024;
/// Alerts queued for one watch's client.
const WATCH_QUEUE: usize = 64;
pub const DEFAULT_ALERTS_PAGE: u32 = 100;
pub const MAX_ALERTS_PAGE: u32 = 1_000;
/// Alert watches open at once, across the server, unless configured otherwise.
pub const DEFAULT_MAX_ALERT_WATCHES: usize = 1_024;
/// Alert watches one tenant may have open at once, unless configured otherwise: so that one tenant's
/// clients cannot take every watch the server allows.
pub const DEFAULT_MAX_ALERT_WATCHES_PER_TENANT: usize = 64;

/// Fans alerts out to watches, and caps how many watches are open, in all and per tenant.
pub struct AlertHub {
    alerts: broadcast::Sender<Arc<Alert>>,
    watches: Arc<Semaphore>,
    max_watches: usize,
    tenant_watches: Arc<TenantWatches>,
    /// Ends every watch when the server stops, so that open streams do not hold up the drain.
    stop: CancellationToken,
}

impl AlertHub {
    pub fn new(max_watches: usize, max_watches_per_tenant: usize, stop: CancellationToken) -> Self {
        Self {
            alerts: broadcast::Sender::new(BROADCAST_BUFFER),
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
            tenant_watches: Arc::new(TenantWatches { open: Mutex::default(), limit: max_watches_per_tenant }),
            stop,
        }
    }
}

/// Open watches per tenant. A tenant's count goes when its last watch ends, so there are never more
/// counts than open watches.
struct TenantWatches {
    open: Mutex<HashMap<TenantId, usize>>,
    limit: usize,
}

impl TenantWatches {
    fn acquire(self: &Arc<Self>, tenant: &TenantId) -> Result<TenantWatchSlot, Status> {
        let mut open = self.open.lock();
        let count = open.entry(tenant.clone()).or_default();
        if *count >= self.limit {
            return Err(status::too_many_tenant_alert_watches(tenant, self.limit));
        }
        *count += 1;
        Ok(TenantWatchSlot { watches: self.clone(), tenant: tenant.clone() })
    }
}

/// One of a tenant's watches, counted until it is dropped.
struct TenantWatchSlot {
    watches: Arc<TenantWatches>,
    tenant: TenantId,
}

impl Drop for TenantWatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock();
        if let Some(count) = open.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

impl AlertSink for AlertHub {
    fn publish(&self, alert: &Alert) {
        // No receiver means no watch is open: nothing to do.
        let _ = self.alerts.send(Arc::new(alert.clone()));
    }
}

pub fn list_alerts(context: &Context, request: proto::ListAlertsRequest) -> Result<proto::ListAlertsResponse, Status> {
    let (tenant, environment) = watch_scope(context, &request.tenant_id, &request.environment_id)?;
    let page_size = match request.page_size {
        0 => DEFAULT_ALERTS_PAGE,
        size @ 1..=MAX_ALERTS_PAGE => size,
        size => {
            return Err(FieldError::new("page_size", format!("is {size}; it must be 1 to {MAX_ALERTS_PAGE}")).into());
        }
    };
    let alerts = context.ledger.recent_alerts(&tenant, environment.as_ref(), page_size as usize);
    Ok(proto::ListAlertsResponse { alerts: alerts.iter().map(|a| alert(a, false)).collect() })
}

pub fn watch_alerts(context: &Arc<Context>, request: proto::WatchAlertsRequest) -> Result<AlertStream, Status> {
    let (tenant, environment) = watch_scope(context, &request.tenant_id, &request.environment_id)?;
    let hub = &context.alerts;
    let tenant_slot = hub.tenant_watches.acquire(&tenant)?;
    let permit =
        hub.watches.clone().try_acquire_owned().map_err(|_| status::too_many_alert_watches(hub.max_watches))?;
    // Subscribed before the current levels are read, so that nothing fired in between is missed.
    let live = hub.alerts.subscribe();
    let initial = current_levels(context, &tenant, environment.as_ref())?;
    let (queue, stream) = mpsc::channel(WATCH_QUEUE);
    let watch = Watch { tenant, environment, live, queue, _permit: permit, _tenant_slot: tenant_slot };
    tokio::spawn(forward(context.clone(), watch, initial));
    Ok(Box::pin(ReceiverStream::new(stream)))
}

struct Watch {
    tenant: TenantId,
    environment: Option<EnvironmentId>,
    live: broadcast::Receiver<Arc<Alert>>,
    queue: mpsc::Sender<Result<proto::Alert, Status>>,
    _permit: OwnedSemaphorePermit,
    _tenant_slot: TenantWatchSlot,
}

impl Watch {
    fn wants(&self, alert: &Alert) -> bool {
        alert.tenant == self.tenant && (self.environment.is_none() || alert.environment == self.environment)
    }

    /// Queues `alerts`; `false` once the client has gone or the server stops (a client that does not
    /// read must not keep the watch open past shutdown).
    async fn send_all(&self, alerts: Vec<proto::Alert>, stop: &CancellationToken) -> bool {
        for alert in alerts {
            let sent = tokio::select! {
                sent = self.queue.send(Ok(alert)) => sent.is_ok(),
                () = stop.cancelled() => false,
            };
            if !sent {
                return false;
            }
        }
        true
    }
}

/// Sends the current levels, then live alerts until the client goes or the server stops.
async fn forward(context: Arc<Context>, mut watch: Watch, initial: Vec<proto::Alert>) {
    if !watch.send_all(initial, &context.alerts.stop).await {
        return;
    }
    loop {
        let alert = tokio::select! {
            () = watch.queue.closed() => return,
            () = context.alerts.stop.cancelled() => return,
            received = watch.live.recv() => received,
        };
        match alert {
            Ok(alert) if watch.wants(&alert) => {
                if !watch.send_all(vec![self::alert(&alert, false)], &context.alerts.stop).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "an alert watch fell behind");
                let mut catch_up = vec![lagged(&watch.tenant, missed, context.clock.now_ms())];
                match current_levels(&context, &watch.tenant, watch.environment.as_ref()) {
                    Ok(levels) => catch_up.extend(levels),
                    Err(status) => {
                        let _ = watch.queue.try_send(Err(status));
                        return;
                    }
                }
                if !watch.send_all(catch_up, &context.alerts.stop).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The tenant and optional environment a list or watch is about, checked to exist and belong together.
fn watch_scope(
    context: &Context,
    tenant_id: &str,
    environment_id: &str,
) -> Result<(TenantId, Option<EnvironmentId>), Status> {
    let tenant = convert::id("tenant_id", tenant_id, TenantId::new)?;
    let now = context.clock.now_ms();
    context.ledger.tenant(&tenant, now)?;
    let environment = match environment_id {
        "" => None,
        id => {
            let environment = convert::id("environment_id", id, EnvironmentId::new)?;
            let balance = context.ledger.balance(&environment, now)?;
            if balance.tenant != tenant || balance.environment != environment {
                return Err(LedgerError::UnknownEnvironment(environment).into());
            }
            Some(environment)
        }
    };
    Ok((tenant, environment))
}

/// Each matching environment's level now, marked `initial`.
fn current_levels(
    context: &Context,
    tenant: &TenantId,
    environment: Option<&EnvironmentId>,
) -> Result<Vec<proto::Alert>, Status> {
    let now = context.clock.now_ms();
    let environments = match environment {
        Some(environment) => vec![environment.clone()],
        None => context.ledger.tenant_environments(tenant),
    };
    let mut levels = Vec::with_capacity(environments.len());
    for environment in environments {
        let balance = context.ledger.balance(&environment, now)?;
        let kind = level_kind(balance.state);
        let level = Alert {
            tenant: tenant.clone(),
            environment: Some(environment),
            agent: None,
            kind,
            threshold_percent: if kind == AlertKind::EnvironmentLow { balance.low_percent } else { 0 },
            used_milli: balance.available_milli,
            limit_milli: 0,
            message: level_message(&balance, kind),
            balance: Some(balance),
            at_ms: now,
            seq: 0,
        };
        levels.push(alert(&level, true));
    }
    Ok(levels)
}

fn lagged(tenant: &TenantId, missed: u64, now: u64) -> proto::Alert {
    proto::Alert {
        tenant_id: tenant.to_string(),
        kind: proto::AlertKind::Lagged as i32,
        at_unix_ms: now,
        message: format!("this watch fell behind and missed up to {missed} alerts; the current levels follow"),
        ..Default::default()
    }
}

pub fn alert(alert: &Alert, initial: bool) -> proto::Alert {
    proto::Alert {
        tenant_id: alert.tenant.to_string(),
        environment_id: alert.environment.as_ref().map(ToString::to_string).unwrap_or_default(),
        agent_id: alert.agent.as_ref().map(ToString::to_string).unwrap_or_default(),
        kind: kind(alert.kind) as i32,
        threshold_percent: alert.threshold_percent,
        balance: alert.balance.clone().map(convert::balance),
        at_unix_ms: alert.at_ms,
        message: alert.message.clone(),
        initial,
        used_milli: alert.used_milli,
        limit_milli: alert.limit_milli,
    }
}

fn kind(kind: AlertKind) -> proto::AlertKind {
    match kind {
        AlertKind::EnvironmentLow => proto::AlertKind::EnvironmentLow,
        AlertKind::EnvironmentDepleted => proto::AlertKind::EnvironmentDepleted,
        AlertKind::EnvironmentRestored => proto::AlertKind::EnvironmentRestored,
        AlertKind::AgentNearingLimit => proto::AlertKind::AgentNearingLimit,
        AlertKind::AgentOverLimit => proto::AlertKind::AgentOverLimit,
        AlertKind::BudgetThreshold => proto::AlertKind::BudgetThreshold,
        AlertKind::TenantCapacityUsed => proto::AlertKind::TenantCapacityUsed,
        AlertKind::TenantGraceExhausted => proto::AlertKind::TenantGraceExhausted,
    }
}
