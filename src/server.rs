//! Startup and shutdown: builds the ledger from the config, serves the gRPC services with health and
//! reflection (and the metrics endpoint), runs the expiry sweeper, and drains gracefully when the
//! shutdown future resolves.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rustix::time::ClockId;
use tokio::net::TcpListener;
use tokio_util::{either::Either, sync::CancellationToken};
use tonic::service::interceptor::InterceptedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    clock::Clock,
    config::Config,
    durability::store::{Store, StoreError},
    grpc::{
        self, AdminGate, AdminService, AlertHub, Context, GrpcOnlyLayer, QuotaGate, QuotaService, RequestDeadlineLayer,
    },
    ledger::{Discard, Ledger},
    metrics::{self, CountedAlerts, Metrics, ScrapeSources, StorageSources, rpc::CountCallsLayer},
    proto::{self, quota_admin_server::QuotaAdminServer, quota_server::QuotaServer},
    transport,
};

/// How often expired holds are looked for. Holds are released within this long of their expiry
/// (the contract promises within a second).
pub const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// Holds taken from the expiry queue at a time, between checks of the sweep's time slice: each
/// environment's due holds among them expire as one event.
const EXPIRY_CHUNK: usize = 256;
/// How a sweep with more to expire than one turn shares the core with requests. It runs in turns of
/// at most `EXPIRY_MAX_SLICE`, so a call in flight waits at most that long for it. Between turns it
/// pauses for `EXPIRY_PAUSE` and measures the CPU others used meanwhile (see [`OthersCpu`]). While requests
/// keep the core busy, the next turn is sized so that the sweep takes `EXPIRY_BUSY_SHARE` of the core: a
/// unary call costs about twenty times an expiry, so that share keeps up with them. While the core is
/// idle, the sweep takes what the requests leave.
const EXPIRY_BUSY_SHARE: f64 = 0.25;
const EXPIRY_MIN_SLICE: Duration = Duration::from_micros(100);
const EXPIRY_MAX_SLICE: Duration = Duration::from_micros(500);
/// Grants in batches cost less than an expiry each, so a quarter of the core can fall behind them for
/// good. Once the earliest due hold is `EXPIRY_LATE_AFTER` late, the share rises, to `EXPIRY_LATE_SHARE`
/// (with turns as much longer) when it is `EXPIRY_CATCH_UP` later still. A burst that a quarter clears
/// within `EXPIRY_LATE_AFTER` never takes more: live calls keep three quarters of the core meanwhile,
/// and a commit or release that meets a due hold expires it anyway. A million holds due at once took 4
/// to 7 s on the one core of the benchmark machine, 8 to 11 s on a slower day; at 5 s the rise came
/// within such a burst and raised live p99 with it (median 2.3× against 1.8× at 10 s, five runs each).
const EXPIRY_LATE_AFTER: Duration = Duration::from_secs(10);
const EXPIRY_CATCH_UP: Duration = Duration::from_secs(2);
const EXPIRY_LATE_SHARE: f64 = 0.75;
const EXPIRY_PAUSE: Duration = Duration::from_millis(1);
/// Below this share of a pause spent by others, the core counts as idle: the sweep then only yields
/// between turns, rather than sleeping.
const EXPIRY_IDLE_BELOW: f64 = 0.05;
/// A yield's pause lasts microseconds, in which the runtime's own polling alone looks like a busy core
/// (an idle server's sweep took under half the core). Less CPU than the cheapest call takes means that
/// nothing but that polling ran.
const EXPIRY_ONLY_POLLED: Duration = Duration::from_micros(10);

/// Health names that report the server's state; `""` is the whole server.
const HEALTH_SERVICES: [&str; 3] = ["", "quota.v1.Quota", "quota.v1.QuotaAdmin"];

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("cannot listen for metrics on {address}: {source}")]
    MetricsListener { address: SocketAddr, source: std::io::Error },
    #[error("bootstrap command failed: {0}")]
    Bootstrap(#[from] crate::ledger::LedgerError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0} is not a loopback address, so admin calls need a token; none is configured")]
    AdminTokenRequired(std::net::SocketAddr),
}

/// Serves quotad on `listener` until `shutdown` resolves, then drains in-flight calls for at most the
/// configured grace period. Serves metrics on the configured address, if any.
pub async fn run(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics_listener = match config.metrics.listen {
        None => None,
        Some(address) => {
            Some(TcpListener::bind(address).await.map_err(|source| ServeError::MetricsListener { address, source })?)
        }
    };
    run_with_metrics(listener, metrics_listener, config, clock, shutdown).await
}

/// [`run`], serving metrics on `metrics_listener` (if any) instead of the configured address: for a
/// caller that binds it itself, such as a test on an ephemeral port.
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let local_addr = listener.local_addr().map_err(ServeError::Listener)?;
    check_auth(&config, local_addr)?;
    let (ledger, store) = open_ledger(&config, clock.as_ref()).await?;
    let background = CancellationToken::new();
    let metrics = Arc::new(Metrics::new(&config.metrics, grpc::served_methods()));
    let alerts = Arc::new(AlertHub::new(
        config.policy.max_alert_watches,
        config.policy.max_alert_watches_per_tenant,
        background.clone(),
    ));
    ledger.set_alert_sink(Arc::new(CountedAlerts { metrics: metrics.clone(), next: alerts.clone() }));
    let context =
        Arc::new(Context { ledger, clock, policy: config.policy.clone(), store, alerts, metrics: metrics.clone() });
    // Expire what ran out while the server was down before the first request is served.
    expire_due(&context).await;

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let auth = Arc::new(config.auth.clone());
    let quota = InterceptedService::new(
        QuotaServer::new(QuotaService::new(context.clone())).max_decoding_message_size(config.max_request_bytes),
        QuotaGate::new(context.clone(), auth.clone()),
    );
    let admin = InterceptedService::new(
        QuotaAdminServer::new(AdminService::new(context.clone())).max_decoding_message_size(config.max_request_bytes),
        AdminGate::new(auth),
    );

    let sweeper = tokio::spawn(sweep_expiries(context.clone(), background.clone()));
    let snapshotter = tokio::spawn(take_snapshots(context.clone(), background.clone()));
    let log_health = tokio::spawn(follow_log_health(context.clone(), health.clone(), background.clone()));
    let metrics_endpoint = serve_metrics(metrics_listener, &context, background.clone())?;
    let _stop_background = background.clone().drop_guard();

    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel();
    let signal = {
        let health = health.clone();
        let background = background.clone();
        async move {
            shutdown.await;
            // Background tasks stop first, so nothing turns health back to SERVING during the drain.
            background.cancel();
            set_health(&health, ServingStatus::NotServing).await;
            tracing::info!("draining in-flight calls");
            let _ = draining_tx.send(());
        }
    };
    let limits = config.transport;
    let router = limits
        .server_builder()
        .layer(CountCallsLayer::new(metrics))
        .layer(GrpcOnlyLayer)
        .layer(RequestDeadlineLayer::new(limits.request_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(quota)
        .add_service(admin);
    // The accept path owns the listener: connection cap, handshake deadline, TLS when configured.
    let serve = match &config.tls {
        None => Either::Left(router.serve_with_incoming_shutdown(transport::plaintext(listener, &limits), signal)),
        Some(tls) => Either::Right(
            router.serve_with_incoming_shutdown(transport::secure(listener, &limits, tls.acceptor()), signal),
        ),
    };
    let tls = match &config.tls {
        None => "off",
        Some(tls) if tls.is_mutual() => "mutual",
        Some(_) => "on",
    };

    set_health(&health, ServingStatus::Serving).await;
    tracing::info!(address = %local_addr, tls = %tls, "listening");
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
    let _ = tokio::join!(sweeper, snapshotter, log_health, metrics_endpoint);
    close_store(context).await;
    tracing::info!("stopped");
    Ok(())
}

/// Refuses to serve admin calls without a token beyond loopback (the configuration refuses it too,
/// for the address it names; this checks the address actually bound), and says what is open.
fn check_auth(config: &Config, local_addr: std::net::SocketAddr) -> Result<(), ServeError> {
    if !config.auth.enabled {
        tracing::warn!("authentication is off: every call is served without credentials (for local development only)");
    } else if config.auth.admin_open() {
        if !local_addr.ip().is_loopback() {
            return Err(ServeError::AdminTokenRequired(local_addr));
        }
        tracing::warn!(
            "no admin token is configured: admin calls are served without credentials to local callers; set \
             --admin-token-file or QUOTAD_ADMIN_TOKEN"
        );
    }
    Ok(())
}

/// Starts the metrics endpoint on `listener`, if any, until `stop`.
fn serve_metrics(
    listener: Option<TcpListener>,
    context: &Arc<Context>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let Some(listener) = listener else { return Ok(tokio::spawn(async {})) };
    let address = listener.local_addr().map_err(ServeError::Listener)?;
    // A weak reference: the endpoint must not keep the ledger (and its data directory) alive.
    let weak = Arc::downgrade(context);
    let open_holds = Box::new(move || weak.upgrade().map_or(0, |context| context.ledger.open_reservations()));
    let storage = context.store.as_ref().map(|store| StorageSources {
        log: store.journal().stats(),
        snapshots: store.snapshot_stats(),
        log_healthy: store.journal().health(),
    });
    let registry = context.metrics.registry(ScrapeSources { open_holds, storage });
    tracing::info!(%address, path = metrics::endpoint::METRICS_PATH, "serving metrics");
    Ok(tokio::spawn(metrics::endpoint::serve(listener, registry, stop)))
}

/// The ledger recovered from the data directory (or a new one in memory), with the config's
/// bootstrap applied if it starts empty.
async fn open_ledger(config: &Config, clock: &dyn Clock) -> Result<(Ledger, Option<Arc<Store>>), ServeError> {
    let (ledger, store, fresh) = match config.storage.clone() {
        None => (Ledger::with_rate_card(config.limits, config.rate_card.clone(), Arc::new(Discard)), None, true),
        Some(storage) => {
            let (limits, rate_card) = (config.limits, config.rate_card.clone());
            let opened = tokio::task::spawn_blocking(move || Store::open(storage, limits, rate_card))
                .await
                .expect("recovery does not panic")?;
            (opened.ledger, Some(opened.store), opened.fresh)
        }
    };
    if fresh && !config.bootstrap.is_empty() {
        let now = clock.now_ms();
        for command in &config.bootstrap {
            ledger.apply(command, now)?;
        }
        tracing::info!(commands = config.bootstrap.len(), "bootstrap applied");
    }
    Ok((ledger, store))
}

/// Writes the last snapshot, which makes the next start fast (the log alone would also recover
/// everything), then flushes and syncs the log.
async fn close_store(context: Arc<Context>) {
    let Some(store) = context.store.clone() else { return };
    let result = tokio::task::spawn_blocking(move || {
        let snapshot = store.snapshot(&context.ledger);
        store.close();
        snapshot
    })
    .await
    .expect("the final snapshot does not panic");
    if let Err(error) = result {
        tracing::error!(%error, "the shutdown snapshot failed; the log still holds every change");
    }
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
            _ = tick.tick() => expire_due(&context).await,
        }
    }
}

/// Expires every hold that is due now, in turns paced by [`next_expiry_turn`].
async fn expire_due(context: &Context) {
    let mut turn = ExpiryTurn { slice: EXPIRY_MAX_SLICE, sleep: false };
    loop {
        let turn_started = Instant::now();
        let (mut done, mut expired_any) = (false, false);
        while !done && turn_started.elapsed() < turn.slice {
            let taken = context.ledger.expire_due(context.clock.now_ms(), EXPIRY_CHUNK);
            done = taken < EXPIRY_CHUNK;
            expired_any |= taken > 0;
        }
        // Waiting writes the expiries now, as a request's wait would; while the log fails, they are
        // written once it works again. The write is the sweep's own work: the pause starts after it.
        if expired_any && let Some(store) = &context.store {
            let _ = store.wait_durable().await;
        }
        if done {
            return;
        }
        let now = context.clock.now_ms();
        let behind = Duration::from_millis(context.ledger.earliest_expiry().map_or(0, |at| now.saturating_sub(at)));
        let (paused, others) = (Instant::now(), OthersCpu::start());
        if turn.sleep {
            tokio::time::sleep(EXPIRY_PAUSE).await;
        } else {
            tokio::task::yield_now().await;
        }
        turn = next_expiry_turn(paused.elapsed(), others.since_start(), expiry_share(behind));
    }
}

/// The length of a sweep's next turn, and whether to sleep or only yield after it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ExpiryTurn {
    slice: Duration,
    sleep: bool,
}

/// The share of a busy core the sweep takes when its earliest due hold is `behind` by that long.
fn expiry_share(behind: Duration) -> f64 {
    let late = behind.saturating_sub(EXPIRY_LATE_AFTER).as_secs_f64() / EXPIRY_CATCH_UP.as_secs_f64();
    EXPIRY_BUSY_SHARE + (EXPIRY_LATE_SHARE - EXPIRY_BUSY_SHARE) * late.min(1.0)
}

/// Sizes the next turn from the last pause: how long it lasted and how much CPU the rest of the process
/// used in it. Busy, the sweep takes `share` of the core (a turn of a third of the pause for a
/// quarter); idle, the longest turn. Turns may last longer in proportion as the share is above
/// `EXPIRY_BUSY_SHARE`.
fn next_expiry_turn(pause: Duration, others_cpu: Duration, share: f64) -> ExpiryTurn {
    let longest = EXPIRY_MAX_SLICE.mul_f64(share / EXPIRY_BUSY_SHARE);
    let busy = (others_cpu.as_secs_f64() / pause.as_secs_f64().max(1e-9)).min(1.0);
    if busy < EXPIRY_IDLE_BELOW || others_cpu < EXPIRY_ONLY_POLLED {
        return ExpiryTurn { slice: longest, sleep: false };
    }
    let busy_ratio = share / (1.0 - share);
    let slice = pause.mul_f64((1.0 - busy) + busy * busy_ratio).clamp(EXPIRY_MIN_SLICE, longest);
    ExpiryTurn { slice, sleep: true }
}

/// The CPU that others use while the sweep pauses: the other tasks of the runtime thread it pauses on
/// (requests, above all). The log's threads do not count, as the process's CPU would have them:
/// busy writing and syncing what the sweep itself expired, they made an idle core look busy. Should
/// the sweep resume on another worker thread, the whole process's CPU is all there is to go by.
struct OthersCpu {
    thread: std::thread::ThreadId,
    thread_cpu: Duration,
    process_cpu: Duration,
}

impl OthersCpu {
    fn start() -> Self {
        let thread = std::thread::current().id();
        Self { thread, thread_cpu: cpu_time(ClockId::ThreadCPUTime), process_cpu: cpu_time(ClockId::ProcessCPUTime) }
    }

    fn since_start(&self) -> Duration {
        if std::thread::current().id() == self.thread {
            cpu_time(ClockId::ThreadCPUTime).saturating_sub(self.thread_cpu)
        } else {
            cpu_time(ClockId::ProcessCPUTime).saturating_sub(self.process_cpu)
        }
    }
}

/// CPU time so far of the calling thread, or of the whole process.
fn cpu_time(clock: ClockId) -> Duration {
    let now = rustix::time::clock_gettime(clock);
    Duration::new(now.tv_sec.max(0) as u64, now.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// Writes a snapshot every snapshot interval, off the async runtime.
async fn take_snapshots(context: Arc<Context>, stop: CancellationToken) {
    let Some(store) = context.store.clone() else { return };
    let mut tick = tokio::time::interval(store.snapshot_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (store, context) = (store.clone(), context.clone());
        match in_background_thread(move || store.snapshot(&context.ledger)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "snapshot failed; the log keeps every change meanwhile"),
            Err(error) => tracing::error!(%error, "snapshot thread failed"),
        }
    }
}

/// The nice value of periodic snapshot threads: on a busy core the scheduler runs requests first and
/// gives a snapshot about a tenth of the time, so a snapshot takes longer instead of stalling requests
/// for whole scheduler slices.
const SNAPSHOT_NICE: i32 = 10;

/// Runs `work` on a new thread of lower scheduling priority (a thread of its own, because a thread's
/// priority cannot be raised back without privileges).
async fn in_background_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("quotad-snapshot".into()).spawn(move || {
        // Linux nice values are per thread. Failing to lower it only costs latency.
        if let Err(error) = rustix::process::setpriority_process(None, SNAPSHOT_NICE) {
            tracing::debug!(%error, "could not lower the snapshot thread's priority");
        }
        let _ = done.send(work());
    })?;
    result.await.map_err(|_| std::io::Error::other("the snapshot thread panicked"))
}

/// Turns health NOT_SERVING while the log cannot be written, and SERVING again once it can.
async fn follow_log_health(context: Arc<Context>, health: HealthReporter, stop: CancellationToken) {
    let Some(store) = context.store.clone() else { return };
    let mut healthy = store.journal().health();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = healthy.changed() => if changed.is_err() { return },
        }
        let ok = *healthy.borrow_and_update();
        if stop.is_cancelled() {
            return;
        }
        set_health(&health, if ok { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn assert_about(actual: Duration, expected: Duration) {
        let error = actual.abs_diff(expected);
        assert!(error <= Duration::from_micros(1), "{actual:?} is not about {expected:?}");
    }

    const ON_TIME: f64 = EXPIRY_BUSY_SHARE;

    #[test]
    fn a_busy_core_gives_expiries_a_quarter() {
        let turn = next_expiry_turn(MS * 6 / 5, MS * 6 / 5, ON_TIME);
        assert_about(turn.slice, MS * 2 / 5);
        assert!(turn.sleep);
        // More CPU than the pause lasted (other cores) is still a busy core, not a larger share.
        assert_eq!(next_expiry_turn(MS * 6 / 5, MS * 3, ON_TIME), turn);
    }

    #[test]
    fn an_idle_core_gives_expiries_the_longest_turn_without_sleeping() {
        let idle = ExpiryTurn { slice: EXPIRY_MAX_SLICE, sleep: false };
        assert_eq!(next_expiry_turn(MS, Duration::ZERO, ON_TIME), idle);
        assert_eq!(next_expiry_turn(Duration::from_micros(3), Duration::ZERO, ON_TIME), idle);
        assert_eq!(next_expiry_turn(Duration::ZERO, Duration::ZERO, ON_TIME), idle);
        // A yield in which the runtime only polled its driver.
        assert_eq!(next_expiry_turn(Duration::from_micros(3), Duration::from_micros(2), ON_TIME), idle);
    }

    #[test]
    fn a_partly_busy_core_gives_expiries_what_is_left_within_the_bounds() {
        // Half busy over 0.6 ms: the idle half (0.3 ms) and a third of the busy half (0.1 ms).
        let turn = next_expiry_turn(Duration::from_micros(600), Duration::from_micros(300), ON_TIME);
        assert_about(turn.slice, Duration::from_micros(400));
        assert!(turn.sleep);
        assert_eq!(next_expiry_turn(MS * 10, MS, ON_TIME).slice, EXPIRY_MAX_SLICE);
        let short = next_expiry_turn(Duration::from_micros(150), Duration::from_micros(150), ON_TIME);
        assert_eq!(short.slice, EXPIRY_MIN_SLICE);
    }

    #[test]
    fn a_sweep_that_falls_well_behind_takes_more_of_the_core() {
        assert_eq!(expiry_share(Duration::ZERO), EXPIRY_BUSY_SHARE);
        assert_eq!(expiry_share(EXPIRY_LATE_AFTER), EXPIRY_BUSY_SHARE);
        assert_about_share(expiry_share(EXPIRY_LATE_AFTER + EXPIRY_CATCH_UP / 2), 0.5);
        assert_eq!(expiry_share(EXPIRY_LATE_AFTER + EXPIRY_CATCH_UP), EXPIRY_LATE_SHARE);
        assert_eq!(expiry_share(Duration::from_secs(3600)), EXPIRY_LATE_SHARE);
        // Three quarters of a busy core: turns three times the pause, up to three times as long.
        let late = next_expiry_turn(Duration::from_micros(400), Duration::from_micros(400), EXPIRY_LATE_SHARE);
        assert_about(late.slice, Duration::from_micros(1_200));
        assert_about(next_expiry_turn(MS * 2, MS * 2, EXPIRY_LATE_SHARE).slice, EXPIRY_MAX_SLICE * 3);
    }

    fn assert_about_share(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} is not {expected}");
    }

    fn spin(how_long: Duration) {
        let (started, mut spin) = (Instant::now(), 0u64);
        while started.elapsed() < how_long {
            spin = std::hint::black_box(spin + 1);
        }
    }

    /// On the thread it started on, only that thread's CPU counts: not a thread of the log's.
    #[test]
    fn others_cpu_counts_the_cpu_of_the_thread_it_started_on() {
        let others = OthersCpu::start();
        std::thread::spawn(|| spin(MS * 50)).join().unwrap();
        let after_other_thread = others.since_start();
        spin(MS * 20);
        let after_own = others.since_start();
        // A preempted spin may spend less than its wall time, so the bounds leave room both ways.
        assert!(after_other_thread < MS * 10, "{after_other_thread:?}");
        assert!(after_own - after_other_thread >= MS * 5, "{after_own:?}");
    }
}
