//! Concurrent calls through the real server: many reservations racing for little capacity never grant
//! more than there is, whichever source they draw on, and concurrent retries of one idempotency key
//! hold once.

mod common;

use std::collections::HashSet;

use common::*;
use quotad::proto::{CheckAndReserveRequest, State, quota_client::QuotaClient};
use tokio::task::JoinSet;
use tonic::{Status, transport::Channel};

const CHANNELS: usize = 4;

/// Sends every request concurrently, spread over `CHANNELS` connections, and returns the results.
async fn race(
    server: &TestServer,
    requests: Vec<CheckAndReserveRequest>,
) -> Vec<Result<quotad::proto::CheckAndReserveResponse, Status>> {
    let mut clients: Vec<QuotaClient<Channel>> = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(server.new_quota_client().await);
    }
    let mut tasks = JoinSet::new();
    for (i, request) in requests.into_iter().enumerate() {
        let mut client = clients[i % CHANNELS].clone();
        tasks.spawn(async move { client.check_and_reserve(request).await.map(tonic::Response::into_inner) });
    }
    bounded("the concurrent reservations", tasks.join_all()).await
}

/// Splits results into granted reservation ids and refusals, checking every refusal is QUOTA_DEPLETED.
fn granted_ids(results: Vec<Result<quotad::proto::CheckAndReserveResponse, Status>>) -> Vec<String> {
    let mut granted = Vec::new();
    for result in results {
        match result {
            Ok(response) => granted.push(response.reservation_id),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                error_info(&status, "QUOTA_DEPLETED");
            }
        }
    }
    granted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_reservations_get_exactly_the_hundred_messages_there_are() {
    // Proves that 1,000 concurrent 1-message reservations against 100 messages grant exactly 100, each a
    // distinct reservation, and refuse the other 900 with QUOTA_DEPLETED.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;

    let requests = (0..1_000).map(|_| reserve_request("env", 1)).collect();
    let granted = granted_ids(race(&server, requests).await);
    assert_eq!(granted.len(), 100);
    assert_eq!(granted.iter().collect::<HashSet<_>>().len(), 100, "every grant is a distinct reservation");

    let balance = server.balance("env").await;
    assert_eq!((balance.reserved_milli, balance.available_milli), (milli(100), 0));
    assert_eq!(balance.state(), State::Depleted);

    // Committing them all concurrently charges exactly the allocation.
    let mut tasks = JoinSet::new();
    for id in granted {
        let mut client = server.quota.clone();
        tasks.spawn(async move { client.commit(commit_request(&id, 1)).await.map(|_| ()) });
    }
    for result in bounded("the concurrent commits", tasks.join_all()).await {
        result.expect("commit");
    }
    let balance = server.balance("env").await;
    assert_eq!((balance.reserved_milli, balance.allocation_used_milli), (0, milli(100)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn environments_racing_for_one_tenant_pool_never_share_its_capacity() {
    // Proves that holds on the tenant pool count for every environment at once: two environments racing
    // for a 100-message pool get exactly 100 between them.
    let server = spawn_server_with(small_packs(100)).await;
    server.purchase("acme", 1).await;
    server.allocate("acme", "env-a", 0, true).await;
    server.allocate("acme", "env-b", 0, true).await;

    let requests = (0..600).map(|i| reserve_request(if i % 2 == 0 { "env-a" } else { "env-b" }, 1)).collect();
    let granted = granted_ids(race(&server, requests).await);
    assert_eq!(granted.len(), 100);

    let tenant = server.tenant("acme").await;
    assert_eq!(tenant.tenant_pool_reserved_milli, milli(100));
    let held = server.balance("env-a").await.reserved_milli + server.balance("env-b").await.reserved_milli;
    assert_eq!(held, milli(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_exceed_the_pay_as_you_go_budget() {
    // Proves that a pay-as-you-go budget holds under concurrency: 500 racing 1-message reservations against
    // a 50-message budget get exactly 50.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 0).await;
    server.set_payg("env", true, 50).await;

    let granted = granted_ids(race(&server, (0..500).map(|_| reserve_request("env", 1)).collect()).await);
    assert_eq!(granted.len(), 50);
    assert_eq!(server.balance("env").await.reserved_milli, milli(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_idempotency_key_hold_once() {
    // Proves that 200 concurrent requests with the same idempotency key all answer the same reservation and
    // hold its amount once.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;

    let request = CheckAndReserveRequest { idempotency_key: "call-1".into(), ..reserve_request("env", 5) };
    let results = race(&server, vec![request; 200]).await;
    let ids: HashSet<String> = results.into_iter().map(|r| r.expect("granted").reservation_id).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(server.balance("env").await.reserved_milli, milli(5));
}
