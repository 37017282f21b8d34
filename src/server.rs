//! Startup and shutdown: builds the ledger from the config, serves the gRPC services with health and
//! reflection, runs the expiry sweeper, and drains gracefully when the shutdown future resolves.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    clock::Clock,
    config::Config,
    grpc::{AdminService, Context, QuotaService},
    ledger::{Command, Ledger},
    proto::{self, quota_admin_server::QuotaAdminServer, quota_server::QuotaServer},
};

/// How often expired holds are looked for. Holds are released within this long of their expiry
/// (the contract promises within a second).
pub const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// Expiries applied between two yields to the runtime, so a mass expiry does not starve requests.
const EXPIRY_CHUNK: usize = 1_024;

/// Health names that report the server's state; `""` is the whole server.
const HEALTH_SERVICES: [&str; 3] = ["", "quota.v1.Quota", "quota.v1.QuotaAdmin"];

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bootstrap command failed: {0}")]
    Bootstrap(#[from] crate::ledger::LedgerError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves quotad on `listener` until `shutdown` resolves, then drains in-flight calls for at most the
/// configured grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ledger = Ledger::new(config.limits);
    let now = clock.now_ms();
    for command in &config.bootstrap {
        ledger.apply(command, now)?;
    }
    if !config.bootstrap.is_empty() {
        tracing::info!(commands = config.bootstrap.len(), "bootstrap applied");
    }
    let context = Arc::new(Context { ledger, clock, policy: config.policy.clone() });

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let quota =
        QuotaServer::new(QuotaService::new(context.clone())).max_decoding_message_size(config.max_request_bytes);
    let admin =
        QuotaAdminServer::new(AdminService::new(context.clone())).max_decoding_message_size(config.max_request_bytes);

    let background = CancellationToken::new();
    let sweeper = tokio::spawn(sweep_expiries(context.clone(), background.clone()));
    let _stop_background = background.clone().drop_guard();

    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel();
    let signal = {
        let health = health.clone();
        async move {
            shutdown.await;
            set_health(&health, ServingStatus::NotServing).await;
            tracing::info!("draining in-flight calls");
            let _ = draining_tx.send(());
        }
    };
    let serve = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(quota)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);

    set_health(&health, ServingStatus::Serving).await;
    tracing::info!("serving");
    let grace = config.shutdown_grace;
    tokio::select! {
        result = serve => result?,
        () = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!(grace_seconds = grace.as_secs(), "calls still in flight after the grace period; closing"),
    }
    background.cancel();
    let _ = sweeper.await;
    tracing::info!("stopped");
    Ok(())
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Releases holds whose expiry has passed, without a client call.
async fn sweep_expiries(context: Arc<Context>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            let now = context.clock.now_ms();
            let due = context.ledger.due_expiries(now, EXPIRY_CHUNK);
            let done = due.len() < EXPIRY_CHUNK;
            for reservation in due {
                if let Err(error) = context.ledger.apply(&Command::Expire { reservation }, now) {
                    tracing::error!(%error, "expiry failed");
                }
            }
            if done {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
