//! Server-side limits through the real server: the open-reservation caps per environment and in total
//! (RESOURCE_EXHAUSTED with reason TOO_MANY_OPEN_RESERVATIONS, distinct from QUOTA_DEPLETED), the
//! transport's request size limit, and alert watches across the server and per tenant, each at N−1, N
//! and N+1.

mod common;

use common::*;
use prost::Message;
use quotad::{
    config::Settings,
    proto::{
        CheckAndReserveRequest, ListAgentLimitsRequest, ListAlertsRequest, PurchaseCapacityRequest,
        SetAgentLimitRequest, WatchAlertsRequest,
    },
};
use tonic::{Code, Status};

const PER_ENVIRONMENT: u64 = 3;
const TOTAL: u64 = 5;

/// A server with open-reservation caps of 3 per environment and 5 in total, and three environments
/// with plenty of capacity.
async fn capped() -> TestServer {
    let settings = Settings {
        max_open_reservations_per_environment: PER_ENVIRONMENT,
        max_open_reservations_total: TOTAL,
        ..Settings::default()
    };
    let server = spawn_server_with(settings).await;
    server.bootstrap("acme", "env-a", 100).await;
    server.allocate("acme", "env-b", 100, false).await;
    server.allocate("acme", "env-c", 100, false).await;
    server
}

/// Asserts a TOO_MANY_OPEN_RESERVATIONS refusal for `scope` with `limit`.
#[track_caller]
fn expect_too_many<T: std::fmt::Debug>(result: Result<T, Status>, scope: &str, limit: u64) {
    let status = expect_code(result, Code::ResourceExhausted);
    let info = error_info(&status, "TOO_MANY_OPEN_RESERVATIONS");
    assert_eq!(info.metadata.get("scope").map(String::as_str), Some(scope), "{info:?}");
    assert_eq!(metadata_u64(&info, "limit"), limit, "{info:?}");
    assert!(status.message().contains("commit or release some first"), "{}", status.message());
}

#[tokio::test]
async fn open_reservations_are_capped_per_environment() {
    // Proves the per-environment cap: reservations N−1 and N are granted, N+1 is refused with
    // TOO_MANY_OPEN_RESERVATIONS holding nothing, other environments are unaffected, and resolving one
    // hold makes room again.
    let server = capped().await;
    let mut open = Vec::new();
    for n in 1..=PER_ENVIRONMENT {
        open.push(server.reserve("env-a", 1).await.reservation_id);
        assert_eq!(server.balance("env-a").await.reserved_milli, milli(n));
    }
    let before = server.balance("env-a").await;
    expect_too_many(server.try_reserve(reserve_request("env-a", 1)).await, "environment", PER_ENVIRONMENT);
    assert_eq!(server.balance("env-a").await, before);

    server.reserve("env-b", 1).await;

    server.release(&open.pop().unwrap()).await;
    open.push(server.reserve("env-a", 1).await.reservation_id);
    expect_too_many(server.try_reserve(reserve_request("env-a", 1)).await, "environment", PER_ENVIRONMENT);
    server.commit(&open.pop().unwrap(), 1).await;
    server.reserve("env-a", 1).await;
}

#[tokio::test]
async fn open_reservations_are_capped_in_total() {
    // Proves the server-wide cap: the 4th and 5th open reservations across environments are granted, the
    // 6th is refused with scope "server" holding nothing, and an expiry makes room again.
    let server = capped().await;
    for _ in 0..PER_ENVIRONMENT {
        server.reserve("env-a", 1).await;
    }
    server.reserve("env-b", 1).await; // N−1 = 4 open
    let short = CheckAndReserveRequest { ttl_seconds: 1, ..reserve_request("env-b", 1) };
    server.try_reserve(short).await.unwrap(); // N = 5 open

    let before = server.balance("env-c").await;
    expect_too_many(server.try_reserve(reserve_request("env-c", 1)).await, "server", TOTAL);
    assert_eq!(server.balance("env-c").await, before);

    server.clock.advance_ms(1_000);
    server.wait_for_balance("env-b", |b| b.reserved_milli == milli(1)).await;
    server.reserve("env-c", 1).await;
    expect_too_many(server.try_reserve(reserve_request("env-c", 1)).await, "server", TOTAL);
}

#[tokio::test]
async fn the_caps_are_distinct_from_quota_depletion() {
    // Proves that a depleted environment answers QUOTA_DEPLETED, not TOO_MANY_OPEN_RESERVATIONS, below the
    // cap, and that an idempotent retry at the cap still returns its first reservation.
    let server = capped().await;
    expect_depleted(server.try_reserve(reserve_request("env-a", 101)).await, "env-a", milli(101), milli(100));

    let keyed = CheckAndReserveRequest { idempotency_key: "call-1".into(), ..reserve_request("env-a", 1) };
    let first = server.try_reserve(keyed.clone()).await.unwrap();
    server.reserve("env-a", 1).await;
    server.reserve("env-a", 1).await;
    let retry = server.try_reserve(keyed).await.unwrap();
    assert_eq!(retry.reservation_id, first.reservation_id);
    assert_eq!(server.balance("env-a").await.reserved_milli, milli(3));
}

#[tokio::test]
async fn a_dry_run_at_the_cap_answers_that_it_would_be_refused() {
    // Proves that a dry run answers whether the reservation would be granted: at the cap it would not be,
    // so it is refused the same way a real reservation is.
    let server = capped().await;
    for _ in 0..PER_ENVIRONMENT {
        server.reserve("env-a", 1).await;
    }
    let dry_run = CheckAndReserveRequest { dry_run: true, ..reserve_request("env-a", 1) };
    expect_too_many(server.try_reserve(dry_run).await, "environment", PER_ENVIRONMENT);

    server.reserve("env-b", 1).await;
    server.reserve("env-b", 1).await;
    let dry_run = CheckAndReserveRequest { dry_run: true, ..reserve_request("env-c", 1) };
    expect_too_many(server.try_reserve(dry_run).await, "server", TOTAL);
}

/// A CheckAndReserve request for `env` whose encoded size is exactly `size` bytes, padded in the
/// agent id (so anything above 128 bytes is refused by validation once past the transport).
fn request_of_size(size: usize) -> CheckAndReserveRequest {
    let mut request = reserve_request("env", 1);
    let base = request.encoded_len() - request.agent_id.len();
    let mut padding = size.saturating_sub(base);
    loop {
        request.agent_id = "a".repeat(padding);
        match request.encoded_len().cmp(&size) {
            std::cmp::Ordering::Equal => return request,
            std::cmp::Ordering::Greater => padding -= 1,
            std::cmp::Ordering::Less => panic!("cannot build a request of exactly {size} bytes"),
        }
    }
}

#[tokio::test]
async fn requests_over_the_transport_limit_are_refused_and_the_server_keeps_serving() {
    // Proves the 64 KiB request limit: a request of exactly 64 KiB reaches validation, one byte more is
    // refused by the transport, and the server goes on serving on the same and on new connections.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let limit = quotad::config::DEFAULT_MAX_REQUEST_BYTES;

    for size in [limit - 1, limit] {
        let request = request_of_size(size);
        assert_eq!(request.encoded_len(), size);
        let status = expect_code(server.try_reserve(request).await, Code::InvalidArgument);
        assert!(status.message().starts_with("agent_id"), "{size} bytes pass the transport: {status:?}");
    }
    let status = expect_code(server.try_reserve(request_of_size(limit + 1)).await, Code::OutOfRange);
    assert!(status.message().contains("too large"), "{status:?}");
    let huge = request_of_size(4 * limit);
    expect_code(server.try_reserve(huge).await, Code::OutOfRange);

    // The admin service has the same limit.
    let purchase = PurchaseCapacityRequest { tenant_id: "t".repeat(limit), packs: 1, idempotency_key: String::new() };
    expect_code(server.admin.clone().purchase_capacity(purchase).await, Code::OutOfRange);

    assert_eq!(server.reserve("env", 1).await.reserved_milli, milli(1));
    let mut fresh = server.new_quota_client().await;
    fresh.check_and_reserve(reserve_request("env", 1)).await.unwrap();
    assert_eq!(server.balance("env").await.reserved_milli, milli(2));
}

#[tokio::test]
async fn the_transport_limit_is_configurable() {
    // Proves that max_request_bytes sets the transport limit: at the configured size a request passes, one
    // byte more is refused.
    let settings = Settings { max_request_bytes: 2_048, ..Settings::default() };
    let server = spawn_server_with(settings).await;
    server.bootstrap("acme", "env", 100).await;

    expect_code(server.try_reserve(request_of_size(2_048)).await, Code::InvalidArgument);
    expect_code(server.try_reserve(request_of_size(2_049)).await, Code::OutOfRange);
    server.reserve("env", 1).await;
}

#[tokio::test]
async fn alert_watches_are_capped_across_the_server_and_a_closed_one_frees_its_place() {
    // Proves that with max_alert_watches = 2, the first and second watches open and a third is
    // RESOURCE_EXHAUSTED with reason TOO_MANY_ALERT_WATCHES and the limit, and that closing a watch lets
    // a new one open.
    let server = spawn_server_with(Settings { max_alert_watches: 2, ..Settings::default() }).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let watch = || {
        let mut admin = server.admin.clone();
        async move {
            let request = WatchAlertsRequest { tenant_id: "acme".into(), environment_id: String::new() };
            admin.watch_alerts(request).await.map(tonic::Response::into_inner)
        }
    };
    let first = watch().await.expect("N-1 watches open");
    let _second = watch().await.expect("N watches open");
    let status = expect_code(watch().await, Code::ResourceExhausted);
    let info = error_info(&status, "TOO_MANY_ALERT_WATCHES");
    assert_eq!(metadata_u64(&info, "limit"), 2);
    assert_eq!(info.metadata.get("scope").map(String::as_str), Some("server"), "{info:?}");

    drop(first);
    let reopened = tokio::time::timeout(WAIT_DEADLINE, async {
        loop {
            match watch().await {
                Ok(stream) => return stream,
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed watch never freed its place");
}

#[tokio::test]
async fn agents_with_limits_are_capped_per_environment() {
    // Proves that with max_agents_per_environment = 2, limits for a first and a second agent are set and
    // one for a third is RESOURCE_EXHAUSTED with reason TOO_MANY_AGENTS, changing nothing.
    let server = spawn_server_with(Settings { max_agents_per_environment: 2, ..Settings::default() }).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let set = |agent: &'static str| {
        let mut admin = server.admin.clone();
        async move {
            let request = SetAgentLimitRequest {
                environment_id: "acme-prod".into(),
                agent_id: agent.into(),
                monthly_limit_messages: 10,
                ..Default::default()
            };
            admin.set_agent_limit(request).await
        }
    };
    set("a0").await.expect("N-1 agents");
    set("a1").await.expect("N agents");
    let status = expect_code(set("a2").await, Code::ResourceExhausted);
    assert_eq!(metadata_u64(&error_info(&status, "TOO_MANY_AGENTS"), "limit"), 2);
    let request = ListAgentLimitsRequest { environment_id: "acme-prod".into() };
    let listed = server.admin.clone().list_agent_limits(request).await.unwrap().into_inner();
    assert_eq!(listed.agents.len(), 2, "the refused limit changed nothing");
}

#[tokio::test]
async fn alert_pages_are_at_most_1000() {
    // Proves ListAlerts' page_size at its limit (1,000) and one over it (INVALID_ARGUMENT naming it).
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let list = |page_size| {
        let mut admin = server.admin.clone();
        async move {
            let request = ListAlertsRequest { tenant_id: "acme".into(), page_size, ..Default::default() };
            admin.list_alerts(request).await
        }
    };
    list(1_000).await.expect("the limit itself");
    let status = expect_code(list(1_001).await, Code::InvalidArgument);
    assert!(status.message().starts_with("page_size: is 1001"), "{}", status.message());
}

/// Opens a watch of `tenant`'s alerts on a connection of the server's admin client.
async fn watch_tenant(server: &TestServer, tenant: &str) -> Result<tonic::Streaming<quotad::proto::Alert>, Status> {
    let request = WatchAlertsRequest { tenant_id: tenant.into(), environment_id: String::new() };
    server.admin.clone().watch_alerts(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn alert_watches_are_capped_per_tenant_and_a_closed_one_frees_its_place() {
    // Proves that with max_alert_watches_per_tenant = 2 a tenant's first and second watches open and a
    // third is RESOURCE_EXHAUSTED with reason TOO_MANY_ALERT_WATCHES naming the tenant scope, the tenant
    // and the limit, while another tenant still opens one; closing one of the tenant's watches lets a
    // new one open.
    let server = spawn_server_with(Settings { max_alert_watches_per_tenant: 2, ..Settings::default() }).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    server.bootstrap("beta", "beta-prod", 100).await;
    let first = watch_tenant(&server, "acme").await.expect("N-1 watches open");
    let _second = watch_tenant(&server, "acme").await.expect("N watches open");
    let status = expect_code(watch_tenant(&server, "acme").await, Code::ResourceExhausted);
    let info = error_info(&status, "TOO_MANY_ALERT_WATCHES");
    assert_eq!(metadata_u64(&info, "limit"), 2);
    assert_eq!(info.metadata.get("scope").map(String::as_str), Some("tenant"), "{info:?}");
    assert_eq!(info.metadata.get("tenant_id").map(String::as_str), Some("acme"), "{info:?}");
    assert!(status.message().contains("max_alert_watches_per_tenant"), "{status:?}");
    let _other_tenant = watch_tenant(&server, "beta").await.expect("another tenant is not capped by acme's watches");

    drop(first);
    let reopened = tokio::time::timeout(WAIT_DEADLINE, async {
        loop {
            match watch_tenant(&server, "acme").await {
                Ok(stream) => return stream,
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed watch never freed its tenant's place");
}
