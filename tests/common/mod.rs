//! What every integration test shares: a real quotad server on an ephemeral port with a manual clock,
//! the generated clients connected to it, and short helpers for the admin bootstrap and the checks
//! that recur (status codes, `ErrorInfo` details, waiting for the expiry sweeper).
//!
//! Servers run with authentication off unless a test asks for it (`spawn_server_as_configured`, or
//! `--auth on` for the binary), so that tests of other features need no credentials.
//!
//! Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use quotad::{
    clock::ManualClock,
    config::{AuthConfig, Config, Settings},
    durability::{journal::Durability, store::StorageConfig},
    ledger::MILLI_PER_MESSAGE,
    proto::{
        AllocateCapacityRequest, Balance, CheckAndReserveBatchRequest, CheckAndReserveRequest, CheckAndReserveResponse,
        CommitBatchRequest, CommitRequest, CommitResponse, Draw, GetBalanceRequest, GetTenantRequest,
        LinkEnvironmentRequest, LinkEnvironmentResponse, PurchaseCapacityRequest, ReleaseBatchRequest, ReleaseRequest,
        ReleaseResponse, SetPayAsYouGoRequest, Source, TenantCapacity, UsageItem, check_and_reserve_result,
        commit_result, quota_admin_client::QuotaAdminClient, quota_client::QuotaClient, release_result,
    },
    server::ServeError,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_client::HealthClient;
use tonic_types::{ErrorInfo, StatusExt};

/// 2026-11-15T12:00:00Z: the middle of a billing period, so no test crosses a month by accident.
pub const START_MS: u64 = 1_794_744_000_000;
/// 2026-12-01T00:00:00Z, the first instant of the next period.
pub const NEXT_PERIOD_MS: u64 = 1_796_083_200_000;
/// How long a test waits for something the server does on its own (the expiry sweeper runs every
/// 200 ms). A bound on a wait, never an assertion about how long anything takes.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(5);
/// The agent that tests reserve for unless they say otherwise.
pub const AGENT: &str = "sales-qualification-agent";

pub fn milli(messages: u64) -> u64 {
    messages * MILLI_PER_MESSAGE
}

/// A quotad server running on a tokio task, with clients connected to it. Dropping it starts a
/// graceful shutdown; [`TestServer::shutdown`] also waits for `run` to return.
pub struct TestServer {
    pub addr: SocketAddr,
    pub quota: QuotaClient<Channel>,
    pub admin: QuotaAdminClient<Channel>,
    pub health: HealthClient<Channel>,
    pub clock: Arc<ManualClock>,
    /// Messages in one purchased pack, as configured.
    pub pack_messages: u64,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

/// A server with the embedded defaults and a clock at [`START_MS`].
pub async fn spawn_server() -> TestServer {
    spawn_server_with(Settings::default()).await
}

/// A server with `settings` (the config file's keys) and a clock at [`START_MS`].
pub async fn spawn_server_with(settings: Settings) -> TestServer {
    let config = Config::from_settings("127.0.0.1:0".parse().unwrap(), settings).expect("valid test settings");
    spawn_server_with_config(config, Arc::new(ManualClock::new(START_MS))).await
}

/// A server with a full `config`, authentication off, and a clock the test holds.
pub async fn spawn_server_with_config(config: Config, clock: Arc<ManualClock>) -> TestServer {
    spawn(Config { auth: AuthConfig::off(), ..config }, clock, None).await
}

/// A server like [`spawn_server_with_config`] that also serves metrics on an ephemeral port, returned
/// with it.
pub async fn spawn_server_with_metrics(config: Config, clock: Arc<ManualClock>) -> (TestServer, SocketAddr) {
    let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral metrics port");
    let metrics_addr = metrics.local_addr().unwrap();
    (spawn(Config { auth: AuthConfig::off(), ..config }, clock, Some(metrics)).await, metrics_addr)
}

/// A server with `config` exactly, its authentication included.
pub async fn spawn_server_as_configured(config: Config, clock: Arc<ManualClock>) -> TestServer {
    spawn(config, clock, None).await
}

/// [`spawn_server_as_configured`] with a metrics endpoint on an ephemeral port.
pub async fn spawn_server_as_configured_with_metrics(
    config: Config,
    clock: Arc<ManualClock>,
) -> (TestServer, SocketAddr) {
    let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral metrics port");
    let metrics_addr = metrics.local_addr().unwrap();
    (spawn(config, clock, Some(metrics)).await, metrics_addr)
}

/// The listener is bound before the server starts, so clients can connect as soon as this returns.
async fn spawn(config: Config, clock: Arc<ManualClock>, metrics: Option<TcpListener>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
    let addr = listener.local_addr().unwrap();
    let pack_messages = config.policy.pack_milli / MILLI_PER_MESSAGE;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(quotad::server::run_with_metrics(listener, metrics, config, clock.clone(), async move {
        let _ = shutdown_rx.await;
    }));
    let channel = connect(addr).await;
    TestServer {
        addr,
        quota: QuotaClient::new(channel.clone()),
        admin: QuotaAdminClient::new(channel.clone()),
        health: HealthClient::new(channel),
        clock,
        pack_messages,
        shutdown: Some(shutdown_tx),
        task: Some(task),
    }
}

/// The real `quotad` binary with none of the caller's `QUOTAD_*` variables, so the flags a test
/// passes are its whole configuration, except `QUOTAD_AUTH=off` (a test passes `--auth on` to turn
/// authentication on) and no metrics endpoint unless the test passes `--metrics-listen` (tests run in
/// parallel, and the default port would collide); `RUST_LOG=info` so that the `listening` line is
/// logged; stderr piped; killed if the test drops it.
pub fn quotad_binary() -> tokio::process::Command {
    use std::process::Stdio;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_quotad"));
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("QUOTAD_") {
            command.env_remove(var);
        }
    }
    command
        .env("QUOTAD_AUTH", "off")
        .env("QUOTAD_METRICS_LISTEN", "off")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A config that keeps its state in `dir` in `durability` mode, snapshots only at shutdown.
pub fn config_on(dir: &std::path::Path, durability: Durability) -> Config {
    let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    config.storage = Some(StorageConfig {
        dir: dir.to_owned(),
        durability,
        fsync_interval: Duration::from_millis(10),
        snapshot_interval: Duration::from_secs(3600),
        recover_from_older_snapshot: false,
        max_segment_bytes: 64 * 1024 * 1024,
    });
    config
}

/// A new HTTP/2 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect to the test server")
}

impl TestServer {
    /// A quota client on a connection of its own.
    pub async fn new_quota_client(&self) -> QuotaClient<Channel> {
        QuotaClient::new(connect(self.addr).await)
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts the server down gracefully and returns what `run` returned. The clients are dropped first,
    /// so their connections do not hold the drain open.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        let task = self.task.take().expect("not yet shut down");
        drop(self);
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the server stops within its grace period")
            .expect("the server task does not panic")
    }

    // Admin helpers. Each one expects success; tests of refusals call the clients directly.

    pub async fn purchase(&self, tenant: &str, packs: u64) -> TenantCapacity {
        let request = PurchaseCapacityRequest { tenant_id: tenant.into(), packs, idempotency_key: String::new() };
        self.admin.clone().purchase_capacity(request).await.expect("PurchaseCapacity").into_inner()
    }

    pub async fn allocate(&self, tenant: &str, environment: &str, messages: u64, from_pool: bool) -> Balance {
        self.admin
            .clone()
            .allocate_capacity(allocate_request(tenant, environment, messages, from_pool))
            .await
            .expect("AllocateCapacity")
            .into_inner()
    }

    pub async fn set_payg(&self, environment: &str, enabled: bool, budget_messages: u64) -> Balance {
        let request = SetPayAsYouGoRequest {
            environment_id: environment.into(),
            enabled,
            monthly_budget_messages: budget_messages,
        };
        self.admin.clone().set_pay_as_you_go(request).await.expect("SetPayAsYouGo").into_inner()
    }

    pub async fn link(&self, app: &str, environment: &str) -> LinkEnvironmentResponse {
        self.try_link(app, environment).await.expect("LinkEnvironment")
    }

    pub async fn try_link(&self, app: &str, environment: &str) -> Result<LinkEnvironmentResponse, Status> {
        let request = LinkEnvironmentRequest { app_environment_id: app.into(), environment_id: environment.into() };
        self.admin.clone().link_environment(request).await.map(tonic::Response::into_inner)
    }

    pub async fn tenant(&self, tenant: &str) -> TenantCapacity {
        self.try_tenant(tenant).await.expect("GetTenant")
    }

    pub async fn try_tenant(&self, tenant: &str) -> Result<TenantCapacity, Status> {
        let request = GetTenantRequest { tenant_id: tenant.into() };
        self.admin.clone().get_tenant(request).await.map(tonic::Response::into_inner)
    }

    /// A tenant with enough packs for `messages`, all of it allocated to `environment` (no pool draws,
    /// no pay-as-you-go).
    pub async fn bootstrap(&self, tenant: &str, environment: &str, messages: u64) -> Balance {
        let packs = messages.div_ceil(self.pack_messages).max(1);
        self.purchase(tenant, packs).await;
        self.allocate(tenant, environment, messages, false).await
    }

    // Quota helpers.

    pub async fn reserve(&self, environment: &str, messages: u64) -> CheckAndReserveResponse {
        self.try_reserve(reserve_request(environment, messages)).await.expect("CheckAndReserve")
    }

    pub async fn try_reserve(&self, request: CheckAndReserveRequest) -> Result<CheckAndReserveResponse, Status> {
        self.quota.clone().check_and_reserve(request).await.map(tonic::Response::into_inner)
    }

    pub async fn commit(&self, reservation: &str, messages: u64) -> CommitResponse {
        self.try_commit(commit_request(reservation, messages)).await.expect("Commit")
    }

    pub async fn try_commit(&self, request: CommitRequest) -> Result<CommitResponse, Status> {
        self.quota.clone().commit(request).await.map(tonic::Response::into_inner)
    }

    pub async fn release(&self, reservation: &str) -> ReleaseResponse {
        self.try_release(reservation).await.expect("Release")
    }

    pub async fn try_release(&self, reservation: &str) -> Result<ReleaseResponse, Status> {
        let request = ReleaseRequest { reservation_id: reservation.into() };
        self.quota.clone().release(request).await.map(tonic::Response::into_inner)
    }

    pub async fn balance(&self, environment: &str) -> Balance {
        self.try_balance(environment).await.expect("GetBalance")
    }

    pub async fn try_balance(&self, environment: &str) -> Result<Balance, Status> {
        let request = GetBalanceRequest { environment_id: environment.into() };
        self.quota.clone().get_balance(request).await.map(tonic::Response::into_inner)
    }

    /// Polls the balance of `environment` until `done` holds, for at most [`WAIT_DEADLINE`]; returns
    /// the balance that satisfied it. For effects the server brings about on its own, such as expiry.
    pub async fn wait_for_balance(&self, environment: &str, done: impl Fn(&Balance) -> bool) -> Balance {
        let mut last = None;
        let polled = tokio::time::timeout(WAIT_DEADLINE, async {
            loop {
                let balance = self.balance(environment).await;
                if done(&balance) {
                    return balance;
                }
                last = Some(balance);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        polled.unwrap_or_else(|_| panic!("the balance of {environment} never met the condition; last: {last:#?}"))
    }
}

// Batch helpers: each item's result as the unary call's answer or the `google.rpc.Status` of its refusal.

/// A batch item's refusal.
pub type ItemError = tonic_types::pb::Status;

impl TestServer {
    pub async fn try_reserve_batch(
        &self,
        items: Vec<CheckAndReserveRequest>,
    ) -> Result<Vec<Result<CheckAndReserveResponse, ItemError>>, Status> {
        let response = self.quota.clone().check_and_reserve_batch(CheckAndReserveBatchRequest { items }).await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|result| match result.outcome {
                Some(check_and_reserve_result::Outcome::Ok(ok)) => Ok(ok),
                Some(check_and_reserve_result::Outcome::Error(error)) => Err(error),
                None => panic!("a result without an outcome"),
            })
            .collect())
    }

    pub async fn reserve_batch(
        &self,
        items: Vec<CheckAndReserveRequest>,
    ) -> Vec<Result<CheckAndReserveResponse, ItemError>> {
        self.try_reserve_batch(items).await.expect("CheckAndReserveBatch")
    }

    pub async fn try_commit_batch(
        &self,
        items: Vec<CommitRequest>,
    ) -> Result<Vec<Result<CommitResponse, ItemError>>, Status> {
        let response = self.quota.clone().commit_batch(CommitBatchRequest { items }).await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|result| match result.outcome {
                Some(commit_result::Outcome::Ok(ok)) => Ok(ok),
                Some(commit_result::Outcome::Error(error)) => Err(error),
                None => panic!("a result without an outcome"),
            })
            .collect())
    }

    pub async fn commit_batch(&self, items: Vec<CommitRequest>) -> Vec<Result<CommitResponse, ItemError>> {
        self.try_commit_batch(items).await.expect("CommitBatch")
    }

    pub async fn try_release_batch(
        &self,
        items: Vec<ReleaseRequest>,
    ) -> Result<Vec<Result<ReleaseResponse, ItemError>>, Status> {
        let response = self.quota.clone().release_batch(ReleaseBatchRequest { items }).await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|result| match result.outcome {
                Some(release_result::Outcome::Ok(ok)) => Ok(ok),
                Some(release_result::Outcome::Error(error)) => Err(error),
                None => panic!("a result without an outcome"),
            })
            .collect())
    }

    pub async fn release_batch(&self, items: Vec<ReleaseRequest>) -> Vec<Result<ReleaseResponse, ItemError>> {
        self.try_release_batch(items).await.expect("ReleaseBatch")
    }
}

/// A detail of a refusal, decoded, so that two refusals compare whatever order their metadata maps
/// were encoded in.
#[derive(Debug, PartialEq)]
pub enum Detail {
    ErrorInfo(tonic_types::pb::ErrorInfo),
    BadRequest(tonic_types::pb::BadRequest),
    Other(String),
}

/// A refusal's code, message and details, decoded.
pub fn refusal_of(status: &ItemError) -> (i32, String, Vec<Detail>) {
    use prost::Message;
    let details = status
        .details
        .iter()
        .map(|any| match any.type_url.as_str() {
            "type.googleapis.com/google.rpc.ErrorInfo" => {
                Detail::ErrorInfo(tonic_types::pb::ErrorInfo::decode(any.value.as_slice()).unwrap())
            }
            "type.googleapis.com/google.rpc.BadRequest" => {
                Detail::BadRequest(tonic_types::pb::BadRequest::decode(any.value.as_slice()).unwrap())
            }
            other => Detail::Other(other.to_owned()),
        })
        .collect();
    (status.code, status.message.clone(), details)
}

/// Asserts that a batch item was refused exactly as its unary call was: code, message and details.
#[track_caller]
pub fn assert_same_refusal(item: &ItemError, unary: &Status) {
    use prost::Message;
    let unary = ItemError::decode(unary.details()).expect("a refusal carries a google.rpc.Status");
    assert_eq!(refusal_of(item), refusal_of(&unary));
}

/// The `ErrorInfo` of an item's refusal, checked to have `code` and, in quotad's domain, `reason`.
#[track_caller]
pub fn item_error_info(item: &ItemError, code: Code, reason: &str) -> tonic_types::pb::ErrorInfo {
    assert_eq!(item.code, code as i32, "{item:?}");
    let info = refusal_of(item).2.into_iter().find_map(|detail| match detail {
        Detail::ErrorInfo(info) => Some(info),
        _ => None,
    });
    let info = info.unwrap_or_else(|| panic!("no ErrorInfo in {item:?}"));
    assert_eq!((info.reason.as_str(), info.domain.as_str()), (reason, "quotad"), "{item:?}");
    info
}

/// The field an INVALID_ARGUMENT item's `BadRequest` names first.
#[track_caller]
pub fn item_bad_field(item: &ItemError) -> String {
    assert_eq!(item.code, Code::InvalidArgument as i32, "{item:?}");
    let bad_request = refusal_of(item).2.into_iter().find_map(|detail| match detail {
        Detail::BadRequest(bad_request) => Some(bad_request),
        _ => None,
    });
    bad_request.unwrap_or_else(|| panic!("no BadRequest in {item:?}")).field_violations[0].field.clone()
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

// Request builders with the fields most tests leave alone filled in.

pub fn reserve_request(environment: &str, messages: u64) -> CheckAndReserveRequest {
    CheckAndReserveRequest {
        environment_id: environment.into(),
        agent_id: AGENT.into(),
        messages: Some(messages),
        ..Default::default()
    }
}

pub fn reserve_usage_request(environment: &str, usage: &[(&str, u64)]) -> CheckAndReserveRequest {
    CheckAndReserveRequest {
        environment_id: environment.into(),
        agent_id: AGENT.into(),
        usage: usage_items(usage),
        ..Default::default()
    }
}

pub fn commit_request(reservation: &str, messages: u64) -> CommitRequest {
    CommitRequest { reservation_id: reservation.into(), messages: Some(messages), usage: Vec::new() }
}

pub fn allocate_request(tenant: &str, environment: &str, messages: u64, from_pool: bool) -> AllocateCapacityRequest {
    AllocateCapacityRequest {
        tenant_id: tenant.into(),
        environment_id: environment.into(),
        messages,
        draw_from_tenant_pool: from_pool,
    }
}

/// Draws as (source, milli) pairs, for comparing with a literal.
pub fn draws(draws: &[Draw]) -> Vec<(Source, u64)> {
    draws.iter().map(|draw| (draw.source(), draw.amount_milli)).collect()
}

pub fn usage_items(usage: &[(&str, u64)]) -> Vec<UsageItem> {
    usage.iter().map(|(scenario, quantity)| UsageItem { scenario: (*scenario).into(), quantity: *quantity }).collect()
}

// Checks on refusals.

/// The status of a call that must fail with `code`.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(value) => panic!("expected {code:?}, got a success: {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            status
        }
    }
}

/// The `google.rpc.ErrorInfo` of a refusal, checked to be in quotad's domain with `reason`.
#[track_caller]
pub fn error_info(status: &Status, reason: &str) -> ErrorInfo {
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "quotad", "{status:?}");
    info
}

/// An INVALID_ARGUMENT refusal whose `BadRequest` names `field` first.
#[track_caller]
pub fn expect_field<T: std::fmt::Debug>(result: Result<T, Status>, field: &str) -> Status {
    let status = expect_code(result, Code::InvalidArgument);
    let bad_request = status.get_details_bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    assert_eq!(bad_request.field_violations[0].field, field, "{status:?}");
    status
}

/// A metadata value of an `ErrorInfo`, parsed as a number.
#[track_caller]
pub fn metadata_u64(info: &ErrorInfo, key: &str) -> u64 {
    info.metadata
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {info:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {info:?}: {e}"))
}

/// Asserts a QUOTA_DEPLETED refusal with its metadata, and returns the status.
#[track_caller]
pub fn expect_depleted<T: std::fmt::Debug>(
    result: Result<T, Status>,
    environment: &str,
    requested_milli: u64,
    available_milli: u64,
) -> Status {
    let status = expect_code(result, Code::ResourceExhausted);
    let info = error_info(&status, "QUOTA_DEPLETED");
    assert_eq!(info.metadata.get("environment_id").map(String::as_str), Some(environment), "{info:?}");
    assert_eq!(metadata_u64(&info, "requested_milli"), requested_milli, "{info:?}");
    assert_eq!(metadata_u64(&info, "available_milli"), available_milli, "{info:?}");
    status
}

/// Runs `f`, bounded by a deadline so that a hang fails the test instead of stalling the suite.
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what} did not finish"))
}

/// The default settings with a small pack, so that tests of the draw order deal in a few messages.
pub fn small_packs(pack_messages: u64) -> Settings {
    Settings { pack_size_messages: pack_messages, ..Settings::default() }
}

/// The address in the `listening` log line: `address=127.0.0.1:PORT` in text logs,
/// `"address":"127.0.0.1:PORT"` in JSON logs.
pub fn listen_address(line: &str) -> SocketAddr {
    let text = line.split_whitespace().find_map(|word| word.strip_prefix("address="));
    let json = || line.split_once("\"address\":\"").and_then(|(_, rest)| rest.split_once('"')).map(|(a, _)| a);
    let address = text.or_else(json).unwrap_or_else(|| panic!("no address in {line:?}"));
    address.parse().unwrap_or_else(|e| panic!("{address:?} in {line:?}: {e}"))
}
