//! The batch calls through the real server: CheckAndReserveBatch, CommitBatch and ReleaseBatch answer
//! one result per item in request order; an item's refusal is exactly the unary call's and changes
//! nothing, for the others too; the size limit of 1,000 items at N−1, N and N+1; an API key's scope and
//! open-hold cap per item; commits and releases of unknown and already resolved reservations. (Crashes
//! after a batch are in `crash`, its metrics and span in `metrics`, a full disk in `disk_full`.)

mod common;

use std::sync::Arc;

use common::*;
use quotad::{
    auth::AdminToken,
    clock::ManualClock,
    config::{AuthConfig, Config, Settings},
    proto::{
        CheckAndReserveBatchRequest, CheckAndReserveRequest, CommitBatchRequest, CommitRequest, CreateApiKeyRequest,
        ReleaseBatchRequest, ReleaseRequest, ScenarioRate, SetAgentLimitRequest, SetRateCardRequest,
    },
};
use tonic::{Code, Request, Response, Status};

const MAX_ITEMS: usize = 1_000;

fn release_request(reservation: &str) -> ReleaseRequest {
    ReleaseRequest { reservation_id: reservation.into() }
}

/// The reservation id of a granted item.
#[track_caller]
fn granted(result: &Result<quotad::proto::CheckAndReserveResponse, ItemError>) -> String {
    match result {
        Ok(response) => response.reservation_id.clone(),
        Err(error) => panic!("expected a grant, got {:?}", refusal_of(error)),
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(result: &Result<T, ItemError>) -> &ItemError {
    result.as_ref().expect_err("a refused item")
}

#[tokio::test]
async fn results_come_in_request_order_and_each_item_sees_the_ones_before_it() {
    // Proves that results answer their items in request order across environments, that items are
    // applied in that order (a dry run quotes the holds of the items before it, and each environment's
    // ids follow the items), and that the balances hold exactly what was granted.
    let server = spawn_server().await;
    server.bootstrap("acme", "env-a", 100).await;
    server.allocate("acme", "env-b", 100, false).await;
    let dry_run = CheckAndReserveRequest { dry_run: true, ..reserve_request("env-a", 4) };
    let items = vec![
        reserve_request("env-a", 1),
        reserve_request("env-b", 2),
        reserve_request("env-a", 3),
        dry_run,
        reserve_request("env-b", 5),
    ];
    let results = server.reserve_batch(items).await;
    assert_eq!(results.len(), 5);
    let ids: Vec<String> = results.iter().map(granted).collect();
    assert_eq!(ids, ["env-a/1", "env-b/1", "env-a/2", "", "env-b/2"]);
    let reserved: Vec<u64> = results.iter().map(|result| result.as_ref().unwrap().reserved_milli).collect();
    assert_eq!(reserved, [milli(1), milli(2), milli(3), milli(4), milli(5)]);
    let quote = results[3].as_ref().unwrap();
    assert_eq!(quote.expires_at_unix_ms, 0, "a dry run holds nothing");
    assert_eq!(quote.balance.as_ref().unwrap().reserved_milli, milli(4), "the dry run sees items 0 and 2");
    assert_eq!(results[1].as_ref().unwrap().expires_at_unix_ms, START_MS + 60_000);
    assert_eq!(server.balance("env-a").await.reserved_milli, milli(4));
    assert_eq!(server.balance("env-b").await.reserved_milli, milli(7));
}

#[tokio::test]
async fn granted_and_refused_items_mix_and_each_refusal_is_the_unary_one() {
    // Proves that in one batch grants and refusals of every kind (capacity, a bad field, an unknown
    // environment, a disabled agent, a reused idempotency key, an unknown scenario) stand side by side,
    // that each refusal carries the code, message and details the unary call gives for the same request,
    // and that the refused items held nothing while the items after them were granted.
    let server = spawn_server().await;
    server.bootstrap("acme", "big", 100).await;
    server.allocate("acme", "small", 2, false).await;
    let disable = SetAgentLimitRequest {
        environment_id: "big".into(),
        agent_id: "disabled-agent".into(),
        disabled: true,
        ..Default::default()
    };
    server.admin.clone().set_agent_limit(disable).await.unwrap();
    let keyed = |messages, key: &str| CheckAndReserveRequest {
        idempotency_key: key.into(),
        ..reserve_request("big", messages)
    };
    let both = CheckAndReserveRequest { usage: usage_items(&[("classic_answer", 1)]), ..reserve_request("big", 1) };
    let unknown_scenario = reserve_usage_request("big", &[("no_such_scenario", 1)]);
    let disabled = CheckAndReserveRequest { agent_id: "disabled-agent".into(), ..reserve_request("big", 1) };
    let long_ttl = CheckAndReserveRequest { ttl_seconds: 3_601, ..reserve_request("big", 1) };
    let two_bad_fields = CheckAndReserveRequest { agent_id: String::new(), ..reserve_request("", 1) };
    let items = vec![
        reserve_request("big", 1),     // 0: granted
        reserve_request("small", 2),   // 1: granted, all of small
        reserve_request("small", 1),   // 2: QUOTA_DEPLETED
        reserve_request("", 1),        // 3: environment_id
        reserve_request("nowhere", 1), // 4: UNKNOWN_ENVIRONMENT
        both,                          // 5: messages
        unknown_scenario,              // 6: usage[0].scenario
        disabled,                      // 7: AGENT_DISABLED
        long_ttl,                      // 8: ttl_seconds
        two_bad_fields,                // 9: environment_id, the first field checked
        keyed(1, "call-1"),            // 10: granted
        keyed(2, "call-1"),            // 11: IDEMPOTENCY_KEY_REUSED
        keyed(1, "call-1"),            // 12: the retry of 10
        reserve_request("big", 3),     // 13: granted
    ];
    let results = server.reserve_batch(items.clone()).await;
    assert_eq!(results.len(), items.len());

    assert_eq!(granted(&results[0]), "big/1");
    assert_eq!(granted(&results[1]), "small/1");
    let depleted = item_error_info(refused(&results[2]), Code::ResourceExhausted, "QUOTA_DEPLETED");
    assert_eq!(depleted.metadata["available_milli"], "0");
    assert_eq!(item_bad_field(refused(&results[3])), "environment_id");
    item_error_info(refused(&results[4]), Code::NotFound, "UNKNOWN_ENVIRONMENT");
    assert_eq!(item_bad_field(refused(&results[5])), "messages");
    assert_eq!(item_bad_field(refused(&results[6])), "usage[0].scenario");
    item_error_info(refused(&results[7]), Code::PermissionDenied, "AGENT_DISABLED");
    assert_eq!(item_bad_field(refused(&results[8])), "ttl_seconds");
    assert_eq!(item_bad_field(refused(&results[9])), "environment_id");
    assert_eq!(granted(&results[10]), "big/2");
    item_error_info(refused(&results[11]), Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(results[12], results[10], "a retry in the same batch returns the first grant");
    assert_eq!(granted(&results[13]), "big/3", "refusals took no sequence number");

    for (index, result) in results.iter().enumerate() {
        if let Err(item) = result {
            let unary = server.try_reserve(items[index].clone()).await.expect_err("refused alone too");
            assert_same_refusal(item, &unary);
        }
    }
    assert_eq!(server.balance("big").await.reserved_milli, milli(1 + 1 + 3));
    assert_eq!(server.balance("small").await.reserved_milli, milli(2));
}

#[tokio::test]
async fn a_batch_holds_up_to_1000_items_and_a_larger_or_empty_one_changes_nothing() {
    // Proves the item limit at N−1, N and N+1 for the three calls: 999 and 1,000 items are served, 1,001
    // and none are INVALID_ARGUMENT naming `items` (and the limit) and change nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "e", 5_000).await;
    let reserves = |n| vec![reserve_request("e", 1); n];

    let over = expect_field(server.try_reserve_batch(reserves(MAX_ITEMS + 1)).await, "items");
    assert!(over.message().contains("1001") && over.message().contains("1000"), "{over:?}");
    let empty = expect_field(server.try_reserve_batch(Vec::new()).await, "items");
    assert!(empty.message().contains("empty"), "{empty:?}");
    let untouched = server.balance("e").await;
    assert_eq!(untouched.reserved_milli, 0);

    let full = server.reserve_batch(reserves(MAX_ITEMS)).await;
    let almost = server.reserve_batch(reserves(MAX_ITEMS - 1)).await;
    let ids: Vec<String> = full.iter().chain(&almost).map(granted).collect();
    assert_eq!(ids.len(), 2 * MAX_ITEMS - 1);
    assert_eq!(ids[MAX_ITEMS], format!("e/{}", MAX_ITEMS + 1));
    let held = server.balance("e").await;
    assert_eq!(held.reserved_milli, milli(2 * MAX_ITEMS as u64 - 1));

    let commits = |ids: &[String]| ids.iter().map(|id| commit_request(id, 1)).collect::<Vec<_>>();
    let releases = |ids: &[String]| ids.iter().map(|id| release_request(id)).collect::<Vec<_>>();
    expect_field(server.try_commit_batch(commits(&ids[..MAX_ITEMS + 1])).await, "items");
    expect_field(server.try_release_batch(releases(&ids[..MAX_ITEMS + 1])).await, "items");
    expect_field(server.try_commit_batch(Vec::new()).await, "items");
    expect_field(server.try_release_batch(Vec::new()).await, "items");
    assert_eq!(server.balance("e").await, held, "refused batches change nothing");

    let committed = server.commit_batch(commits(&ids[..MAX_ITEMS])).await;
    assert!(committed.iter().all(|result| result.as_ref().is_ok_and(|c| c.charged_milli == milli(1))));
    let released = server.release_batch(releases(&ids[MAX_ITEMS..])).await;
    assert_eq!(released.len(), MAX_ITEMS - 1);
    assert!(released.iter().all(|result| result.as_ref().is_ok_and(|r| r.released_milli == milli(1))));
    let settled = server.balance("e").await;
    assert_eq!((settled.reserved_milli, settled.allocation_used_milli), (0, milli(MAX_ITEMS as u64)));
}

#[tokio::test]
async fn commit_and_release_batches_settle_each_item_on_its_own() {
    // Proves that commit and release batches answer each item as Commit and Release would: unknown and
    // malformed ids, commits and releases of reservations already resolved (earlier in the same batch or
    // before it), retries that return the first answer, each refusal exactly the unary one.
    let server = spawn_server().await;
    server.bootstrap("acme", "e", 100).await;
    let holds = server.reserve_batch(vec![reserve_request("e", 2); 4]).await;
    let ids: Vec<String> = holds.iter().map(granted).collect();
    let both = CommitRequest { usage: usage_items(&[("classic_answer", 1)]), ..commit_request(&ids[2], 1) };
    let commits = vec![
        commit_request(&ids[0], 1),    // 0: charged 1, releases 1
        commit_request(&ids[1], 3),    // 1: charged 3, one more than held
        commit_request("e/99", 1),     // 2: UNKNOWN_RESERVATION
        commit_request("no-slash", 1), // 3: UNKNOWN_RESERVATION, never issued
        commit_request("", 1),         // 4: reservation_id
        commit_request(&ids[0], 1),    // 5: the retry of 0
        commit_request(&ids[1], 5),    // 6: ALREADY_COMMITTED with another amount
        both,                          // 7: messages
    ];
    let committed = server.commit_batch(commits.clone()).await;
    assert_eq!(committed.len(), commits.len());
    let first = committed[0].as_ref().unwrap();
    assert_eq!((first.charged_milli, first.released_milli), (milli(1), milli(1)));
    assert_eq!(committed[1].as_ref().unwrap().charged_milli, milli(3));
    item_error_info(refused(&committed[2]), Code::NotFound, "UNKNOWN_RESERVATION");
    item_error_info(refused(&committed[3]), Code::NotFound, "UNKNOWN_RESERVATION");
    assert_eq!(item_bad_field(refused(&committed[4])), "reservation_id");
    assert_eq!(committed[5].as_ref().unwrap().charged_milli, milli(1), "a retry answers the first commit");
    item_error_info(refused(&committed[6]), Code::FailedPrecondition, "ALREADY_COMMITTED");
    assert_eq!(item_bad_field(refused(&committed[7])), "messages");

    let releases = vec![
        release_request(&ids[2]), // 0: released 2
        release_request(&ids[0]), // 1: ALREADY_COMMITTED
        release_request(&ids[2]), // 2: the retry of 0
        release_request("e/99"),  // 3: UNKNOWN_RESERVATION
        release_request(&ids[3]), // 4: released 2
    ];
    let released = server.release_batch(releases.clone()).await;
    assert_eq!(released[0].as_ref().unwrap().released_milli, milli(2));
    item_error_info(refused(&released[1]), Code::FailedPrecondition, "ALREADY_COMMITTED");
    assert_eq!(released[2].as_ref().unwrap().released_milli, milli(2));
    item_error_info(refused(&released[3]), Code::NotFound, "UNKNOWN_RESERVATION");
    assert_eq!(released[4].as_ref().unwrap().released_milli, milli(2));
    let after_release = server.commit_batch(vec![commit_request(&ids[3], 1)]).await;
    item_error_info(refused(&after_release[0]), Code::FailedPrecondition, "ALREADY_RELEASED");

    for (index, result) in committed.iter().enumerate() {
        if let Err(item) = result {
            assert_same_refusal(item, &server.try_commit(commits[index].clone()).await.unwrap_err());
        }
    }
    for (index, result) in released.iter().enumerate() {
        if let Err(item) = result {
            assert_same_refusal(item, &server.try_release(&releases[index].reservation_id).await.unwrap_err());
        }
    }
    assert_same_refusal(refused(&after_release[0]), &server.try_commit(commit_request(&ids[3], 1)).await.unwrap_err());
    let balance = server.balance("e").await;
    assert_eq!((balance.reserved_milli, balance.allocation_used_milli), (0, milli(4)));
}

#[tokio::test]
async fn the_largest_answer_of_a_full_batch_is_delivered() {
    // Proves that a batch of 1,000 items each refused with the longest message there is (an unknown
    // scenario on a rate card of 256 scenarios with the longest names, a message and a BadRequest
    // description of 1 KiB each) is answered whole within what a gRPC client accepts by default (4 MiB).
    let server = spawn_server().await;
    server.bootstrap("acme", "e", 10).await;
    let rates = (0..256).map(|i| ScenarioRate { scenario: format!("{i:064}"), messages: 1, per: 1 }).collect();
    server.admin.clone().set_rate_card(SetRateCardRequest { rates, effective_at_unix_ms: 0 }).await.unwrap();
    let results = server.reserve_batch(vec![reserve_usage_request("e", &[("unknown", 1)]); MAX_ITEMS]).await;
    assert_eq!(results.len(), MAX_ITEMS);
    for result in &results {
        let item = refused(result);
        assert_eq!(item_bad_field(item), "usage[0].scenario");
        assert!(item.message.len() <= 1_024 && item.message.len() > 1_000, "{}", item.message.len());
    }
    assert_eq!(server.balance("e").await.reserved_milli, 0);
}

// An API key's scope and cap, item by item.

const KEY_CAP: u64 = 3;

/// acme has acme-prod (acme-sales-app linked to it) and acme-dev, globex has globex-prod; authentication
/// on, with admin calls open to this loopback client.
async fn secured() -> TestServer {
    let settings = Settings { max_open_reservations_per_api_key: KEY_CAP, ..Settings::default() };
    let config = Config::from_settings("127.0.0.1:0".parse().unwrap(), settings).unwrap();
    let config = Config { auth: AuthConfig::on(None::<AdminToken>), ..config };
    let server = spawn_server_as_configured(config, Arc::new(ManualClock::new(START_MS))).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    server.allocate("acme", "acme-dev", 100, false).await;
    server.link("acme-sales-app", "acme-prod").await;
    server.bootstrap("globex", "globex-prod", 100).await;
    server
}

async fn key_secret(server: &TestServer, tenant: &str, environments: &[&str]) -> String {
    let request = CreateApiKeyRequest {
        tenant_id: tenant.into(),
        environment_ids: environments.iter().map(|e| (*e).to_owned()).collect(),
        description: String::new(),
    };
    server.admin.clone().create_api_key(request).await.expect("CreateApiKey").into_inner().secret
}

fn bearer<T>(message: T, secret: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {secret}").parse().unwrap());
    request
}

#[tokio::test]
async fn an_api_keys_scope_and_open_hold_cap_apply_to_each_item() {
    // Proves, with authentication on: each item is checked against the calling key's scope on its own
    // (PERMISSION_DENIED OUTSIDE_KEY_SCOPE for another tenant's, an unlisted and a missing environment,
    // or another tenant's reservation), the key's open-hold cap refuses the items past it, each refusal
    // is the unary one, and a batch without credentials is refused whole.
    let server = secured().await;
    let acme = key_secret(&server, "acme", &["acme-prod"]).await;
    let globex = key_secret(&server, "globex", &[]).await;
    let items = vec![
        reserve_request("acme-prod", 1),      // 0: granted
        reserve_request("acme-dev", 1),       // 1: not in the key's list
        reserve_request("globex-prod", 1),    // 2: another tenant's
        reserve_request("nowhere", 1),        // 3: does not exist: the same answer
        reserve_request("acme-sales-app", 1), // 4: granted, drawing on acme-prod
        reserve_request("acme-prod", 1),      // 5: granted, the key's third hold
        reserve_request("acme-prod", 1),      // 6: TOO_MANY_OPEN_RESERVATIONS, scope api_key
    ];
    let mut quota = server.quota.clone();
    let request = bearer(CheckAndReserveBatchRequest { items: items.clone() }, &acme);
    let results = quota.check_and_reserve_batch(request).await.unwrap().into_inner().results;
    let results: Vec<_> = results
        .into_iter()
        .map(|result| match result.outcome.unwrap() {
            quotad::proto::check_and_reserve_result::Outcome::Ok(ok) => Ok(ok),
            quotad::proto::check_and_reserve_result::Outcome::Error(error) => Err(error),
        })
        .collect();
    assert_eq!(granted(&results[0]), "acme-prod/1");
    for (index, environment) in [(1, "acme-dev"), (2, "globex-prod"), (3, "nowhere")] {
        let info = item_error_info(refused(&results[index]), Code::PermissionDenied, "OUTSIDE_KEY_SCOPE");
        assert_eq!(info.metadata["environment_id"], environment);
    }
    assert_eq!(granted(&results[4]), "acme-prod/2");
    assert_eq!(granted(&results[5]), "acme-prod/3");
    let capped = item_error_info(refused(&results[6]), Code::ResourceExhausted, "TOO_MANY_OPEN_RESERVATIONS");
    assert_eq!((capped.metadata["scope"].as_str(), capped.metadata["limit"].as_str()), ("api_key", "3"));
    for (index, result) in results.iter().enumerate() {
        if let Err(item) = result {
            let unary = quota.check_and_reserve(bearer(items[index].clone(), &acme)).await.unwrap_err();
            assert_same_refusal(item, &unary);
        }
    }

    let theirs = quota.check_and_reserve(bearer(reserve_request("globex-prod", 1), &globex)).await.unwrap();
    let theirs = theirs.into_inner().reservation_id;
    let commits = vec![commit_request(&granted(&results[0]), 1), commit_request(&theirs, 1)];
    let request = bearer(CommitBatchRequest { items: commits.clone() }, &acme);
    let committed = quota.commit_batch(request).await.unwrap().into_inner().results;
    assert!(matches!(committed[0].outcome, Some(quotad::proto::commit_result::Outcome::Ok(_))));
    let Some(quotad::proto::commit_result::Outcome::Error(outside)) = &committed[1].outcome else {
        panic!("another tenant's reservation is refused: {committed:?}")
    };
    let info = item_error_info(outside, Code::PermissionDenied, "OUTSIDE_KEY_SCOPE");
    assert_eq!(info.metadata["reservation_id"], theirs);
    assert_same_refusal(outside, &quota.commit(bearer(commits[1].clone(), &acme)).await.unwrap_err());
    let request = bearer(ReleaseBatchRequest { items: vec![release_request(&theirs)] }, &acme);
    let released = quota.release_batch(request).await.unwrap().into_inner().results;
    assert!(matches!(released[0].outcome, Some(quotad::proto::release_result::Outcome::Error(_))));

    let anonymous = CheckAndReserveBatchRequest { items: vec![reserve_request("acme-prod", 1)] };
    let refused_whole: Result<Response<_>, Status> = quota.check_and_reserve_batch(anonymous).await;
    let status = expect_code(refused_whole, Code::Unauthenticated);
    error_info(&status, "INVALID_CREDENTIALS");
    let balance =
        quota.get_balance(bearer(quotad::proto::GetBalanceRequest { environment_id: "globex-prod".into() }, &globex));
    assert_eq!(balance.await.unwrap().into_inner().reserved_milli, milli(1), "the key's items left globex alone");
}
