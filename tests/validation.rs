//! Bad input through the real server: every malformed field is INVALID_ARGUMENT naming the field and
//! the limit, with a `BadRequest` detail, and changes nothing. Each limit is tested at N−1 or N
//! (accepted) and N+1 (refused).

mod common;

use common::*;
use quotad::proto::{
    CheckAndReserveRequest, CommitRequest, GetTenantRequest, PurchaseCapacityRequest, SetPayAsYouGoRequest,
};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Asserts INVALID_ARGUMENT whose message names `field` and contains `limit`, with a matching
/// `BadRequest` field violation.
#[track_caller]
fn expect_invalid<T: std::fmt::Debug>(result: Result<T, Status>, field: &str, limit: &str) {
    let status = expect_code(result, Code::InvalidArgument);
    let message = status.message();
    assert!(message.starts_with(&format!("{field}: ")), "the message names {field}: {message}");
    assert!(message.contains(limit), "the message names the limit {limit:?}: {message}");
    let bad_request = status.get_details_bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    let fields: Vec<_> = bad_request.field_violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, [field], "{status:?}");
}

/// A server where `env` can grant the largest request: 100 messages allocated and uncapped pay-as-you-go.
async fn open_ended() -> TestServer {
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    server.set_payg("env", true, 0).await;
    server
}

#[tokio::test]
async fn ids_must_be_1_to_128_printable_bytes() {
    // Proves the id limits on every CheckAndReserve id field: 128 bytes accepted, 129 refused, empty and
    // non-printable refused, and no refusal changes the balance.
    let server = open_ended().await;
    let long_env = "e".repeat(128);
    server.allocate("acme", &long_env, 1, false).await;
    server.set_payg(&long_env, true, 0).await;
    let before = server.balance(&long_env).await;

    let at_limit = CheckAndReserveRequest {
        agent_id: "a".repeat(128),
        idempotency_key: "k".repeat(128),
        dry_run: true,
        ..reserve_request(&long_env, 1)
    };
    server.try_reserve(at_limit.clone()).await.expect("128-byte ids are accepted");

    let too_long = "x".repeat(129);
    let cases = [
        ("environment_id", CheckAndReserveRequest { environment_id: too_long.clone(), ..at_limit.clone() }),
        ("agent_id", CheckAndReserveRequest { agent_id: too_long.clone(), ..at_limit.clone() }),
        ("idempotency_key", CheckAndReserveRequest { idempotency_key: too_long.clone(), ..at_limit.clone() }),
    ];
    for (field, request) in cases {
        expect_invalid(
            server.try_reserve(CheckAndReserveRequest { dry_run: false, ..request }).await,
            field,
            "the limit is 128 bytes",
        );
    }

    let empty = [
        ("environment_id", CheckAndReserveRequest { environment_id: String::new(), ..at_limit.clone() }),
        ("agent_id", CheckAndReserveRequest { agent_id: String::new(), ..at_limit.clone() }),
    ];
    for (field, request) in empty {
        expect_invalid(
            server.try_reserve(CheckAndReserveRequest { dry_run: false, ..request }).await,
            field,
            "must not be empty",
        );
    }

    for bad in ["sales agent", "agent\n", "agent\t1", "agent\u{7f}", "agënt", "\0"] {
        let request = CheckAndReserveRequest { agent_id: bad.into(), dry_run: false, ..at_limit.clone() };
        expect_invalid(server.try_reserve(request).await, "agent_id", "printable ASCII");
    }
    assert_eq!(server.balance(&long_env).await, before);
}

#[tokio::test]
async fn admin_ids_are_validated_too() {
    // Proves the id limits on admin requests: 128 bytes accepted, 129 and empty refused, nothing created.
    let server = spawn_server().await;
    let tenant = "t".repeat(128);
    server.purchase(&tenant, 1).await;
    server.allocate(&tenant, &"e".repeat(128), 1, false).await;

    let purchase = |tenant_id: String| PurchaseCapacityRequest { tenant_id, packs: 1, idempotency_key: String::new() };
    expect_invalid(server.admin.clone().purchase_capacity(purchase("t".repeat(129))).await, "tenant_id", "128 bytes");
    expect_invalid(
        server.admin.clone().purchase_capacity(purchase(String::new())).await,
        "tenant_id",
        "must not be empty",
    );
    let keyed = PurchaseCapacityRequest { idempotency_key: "k".repeat(129), ..purchase("acme".into()) };
    expect_invalid(server.admin.clone().purchase_capacity(keyed).await, "idempotency_key", "128 bytes");
    expect_code(server.try_tenant("acme").await, Code::NotFound);

    let allocate = allocate_request(&tenant, &"e".repeat(129), 1, false);
    expect_invalid(server.admin.clone().allocate_capacity(allocate).await, "environment_id", "128 bytes");
    let allocate = allocate_request("", "env", 1, false);
    expect_invalid(server.admin.clone().allocate_capacity(allocate).await, "tenant_id", "must not be empty");
    expect_invalid(server.try_link(&"a".repeat(129), "env").await, "app_environment_id", "128 bytes");
    expect_invalid(server.try_link("app", "bad id").await, "environment_id", "printable");
    let get = GetTenantRequest { tenant_id: "t".repeat(129) };
    expect_invalid(server.admin.clone().get_tenant(get).await, "tenant_id", "128 bytes");
    expect_invalid(server.try_balance("").await, "environment_id", "must not be empty");

    assert_eq!(server.tenant(&tenant).await.allocated_milli, milli(1));
}

#[tokio::test]
async fn a_request_carries_exactly_one_of_messages_and_usage() {
    // Proves that both or neither of messages and usage is INVALID_ARGUMENT, for reserve and commit alike.
    let server = open_ended().await;
    let before = server.balance("env").await;

    let both = CheckAndReserveRequest { usage: usage_items(&[("classic_answer", 1)]), ..reserve_request("env", 1) };
    expect_invalid(server.try_reserve(both).await, "messages", "exactly one of messages and usage; both are set");
    let neither = CheckAndReserveRequest { messages: None, ..reserve_request("env", 1) };
    expect_invalid(server.try_reserve(neither).await, "messages", "exactly one of messages and usage; neither is set");
    assert_eq!(server.balance("env").await, before);

    let reservation = server.reserve("env", 5).await;
    let both = CommitRequest {
        usage: usage_items(&[("classic_answer", 1)]),
        ..commit_request(&reservation.reservation_id, 1)
    };
    expect_invalid(server.try_commit(both).await, "messages", "both are set");
    let neither = CommitRequest { messages: None, ..commit_request(&reservation.reservation_id, 1) };
    expect_invalid(server.try_commit(neither).await, "messages", "neither is set");
    // The reservation is still open and commits normally.
    assert_eq!(server.balance("env").await.reserved_milli, milli(5));
    assert_eq!(server.commit(&reservation.reservation_id, 5).await.charged_milli, milli(5));
}

#[tokio::test]
async fn zero_amounts_are_refused_for_reservations() {
    // Proves that a reservation of zero messages or a usage item of quantity zero is INVALID_ARGUMENT.
    let server = open_ended().await;
    let before = server.balance("env").await;
    expect_invalid(server.try_reserve(reserve_request("env", 0)).await, "messages", "must be at least 1");
    let zero_item = reserve_usage_request("env", &[("classic_answer", 1), ("generative_answer", 0)]);
    expect_invalid(server.try_reserve(zero_item).await, "usage[1].quantity", "at least 1");
    let dry_zero = CheckAndReserveRequest { dry_run: true, ..reserve_request("env", 0) };
    expect_invalid(server.try_reserve(dry_zero).await, "messages", "must be at least 1");
    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn amounts_are_limited_to_a_billion_messages() {
    // Proves the amount limit: 1,000,000,000 messages accepted (priced by messages or by usage), one more
    // refused, and amounts whose milli value overflows 64 bits refused without panicking.
    let server = open_ended().await;
    assert_eq!(server.reserve("env", 999_999_999).await.reserved_milli, milli(999_999_999));
    assert_eq!(server.reserve("env", 1_000_000_000).await.reserved_milli, milli(1_000_000_000));
    let by_usage = server.try_reserve(reserve_usage_request("env", &[("classic_answer", 1_000_000_000)])).await;
    assert_eq!(by_usage.unwrap().reserved_milli, milli(1_000_000_000));
    let before = server.balance("env").await;

    let limit = "the limit is 1000000000 messages";
    expect_invalid(server.try_reserve(reserve_request("env", 1_000_000_001)).await, "messages", limit);
    expect_invalid(server.try_reserve(reserve_request("env", u64::MAX / 1_000 + 1)).await, "messages", limit);
    expect_invalid(server.try_reserve(reserve_request("env", u64::MAX)).await, "messages", limit);
    let over = reserve_usage_request("env", &[("classic_answer", 1_000_000_001)]);
    expect_invalid(server.try_reserve(over).await, "usage", "limit of 1000000000 messages");
    let over_in_sum = reserve_usage_request("env", &[("classic_answer", 999_999_999), ("generative_answer", 1)]);
    expect_invalid(server.try_reserve(over_in_sum).await, "usage", "limit of 1000000000 messages");
    for overflowing in [
        vec![("ai_tools_premium", u64::MAX)],
        vec![("classic_answer", u64::MAX), ("classic_answer", u64::MAX)],
        vec![("agent_flow_actions", u64::MAX); 64],
    ] {
        let request = reserve_usage_request("env", &overflowing);
        expect_invalid(server.try_reserve(request).await, "usage", "limit of 1000000000 messages");
    }
    assert_eq!(server.balance("env").await, before);

    // Commits have the same limit; zero is a valid commit.
    let reservation = server.reserve("env", 1).await;
    let over = commit_request(&reservation.reservation_id, 1_000_000_001);
    expect_invalid(server.try_commit(over).await, "messages", limit);
    expect_invalid(server.try_commit(commit_request(&reservation.reservation_id, u64::MAX)).await, "messages", limit);
    let at_limit = server.commit(&reservation.reservation_id, 1_000_000_000).await;
    assert_eq!(at_limit.charged_milli, milli(1_000_000_000));
}

#[tokio::test]
async fn usage_is_limited_to_64_items() {
    // Proves the usage item limit: 63 and 64 items accepted, 65 refused naming the limit.
    let server = open_ended().await;
    for n in [63, 64] {
        let request = reserve_usage_request("env", &vec![("classic_answer", 1); n]);
        assert_eq!(server.try_reserve(request).await.unwrap().reserved_milli, milli(n as u64));
    }
    let before = server.balance("env").await;
    let request = reserve_usage_request("env", &vec![("classic_answer", 1); 65]);
    expect_invalid(server.try_reserve(request).await, "usage", "has 65 items; the limit is 64 items");

    let reservation = server.reserve("env", 1).await;
    let commit = CommitRequest {
        reservation_id: reservation.reservation_id.clone(),
        messages: None,
        usage: usage_items(&vec![("classic_answer", 1); 65]),
    };
    expect_invalid(server.try_commit(commit).await, "usage", "the limit is 64 items");
    let balance = server.balance("env").await;
    assert_eq!(balance.reserved_milli, before.reserved_milli + milli(1));
}

#[tokio::test]
async fn ttl_is_limited_to_an_hour() {
    // Proves the TTL limit: 0 means the default of 60 s, 3599 and 3600 s are accepted, 3601 s is refused.
    let server = open_ended().await;
    let ttl = |seconds| CheckAndReserveRequest { ttl_seconds: seconds, ..reserve_request("env", 1) };
    assert_eq!(server.try_reserve(ttl(0)).await.unwrap().expires_at_unix_ms, START_MS + 60_000);
    assert_eq!(server.try_reserve(ttl(3_599)).await.unwrap().expires_at_unix_ms, START_MS + 3_599_000);
    assert_eq!(server.try_reserve(ttl(3_600)).await.unwrap().expires_at_unix_ms, START_MS + 3_600_000);
    let before = server.balance("env").await;

    expect_invalid(server.try_reserve(ttl(3_601)).await, "ttl_seconds", "the limit is 3600 seconds");
    expect_invalid(server.try_reserve(ttl(u32::MAX)).await, "ttl_seconds", "the limit is 3600 seconds");
    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn reservation_ids_are_validated_before_lookup() {
    // Proves that an empty, non-printable or over-long reservation id is INVALID_ARGUMENT, while a
    // well-formed id the server never issued is NOT_FOUND.
    let server = open_ended().await;
    let max = quotad::ledger::MAX_RESERVATION_ID_BYTES;
    let at_limit = format!("{}/1", "e".repeat(max - 2));
    let over_limit = format!("{}/1", "e".repeat(max - 1));
    assert_eq!(at_limit.len(), max);

    expect_code(server.try_commit(commit_request(&at_limit, 1)).await, Code::NotFound);
    expect_code(server.try_release(&at_limit).await, Code::NotFound);
    let limit = format!("the limit is {max} bytes");
    expect_invalid(server.try_commit(commit_request(&over_limit, 1)).await, "reservation_id", &limit);
    expect_invalid(server.try_release(&over_limit).await, "reservation_id", &limit);
    expect_invalid(server.try_commit(commit_request("", 1)).await, "reservation_id", "must not be empty");
    expect_invalid(server.try_release("").await, "reservation_id", "must not be empty");
    expect_invalid(server.try_release("env/ 1").await, "reservation_id", "printable");
}

#[tokio::test]
async fn admin_amounts_are_limited() {
    // Proves the admin amount limits: packs 1 to 1,000,000, a budget up to 10^12 messages, and an
    // allocation whose milli value overflows, each refused naming the field and changing nothing.
    let server = spawn_server().await;
    let purchase = |packs| PurchaseCapacityRequest { tenant_id: "acme".into(), packs, idempotency_key: String::new() };
    expect_invalid(server.admin.clone().purchase_capacity(purchase(0)).await, "packs", "between 1 and 1000000 packs");
    expect_invalid(server.admin.clone().purchase_capacity(purchase(1_000_001)).await, "packs", "between 1 and 1000000");
    expect_code(server.try_tenant("acme").await, Code::NotFound);
    server.admin.clone().purchase_capacity(purchase(999_999)).await.unwrap();
    let tenant = server.admin.clone().purchase_capacity(purchase(1_000_000)).await.unwrap().into_inner();
    assert_eq!(tenant.purchased_milli, milli(1_999_999 * 25_000));

    server.allocate("acme", "env", 100, false).await;
    let budget = |messages| SetPayAsYouGoRequest {
        environment_id: "env".into(),
        enabled: true,
        monthly_budget_messages: messages,
    };
    let at_limit = server.admin.clone().set_pay_as_you_go(budget(1_000_000_000_000)).await.unwrap().into_inner();
    assert_eq!(at_limit.payg_budget_milli, milli(1_000_000_000_000));
    let before = server.balance("env").await;
    let limit = "the limit is 1000000000000 messages";
    expect_invalid(
        server.admin.clone().set_pay_as_you_go(budget(1_000_000_000_001)).await,
        "monthly_budget_messages",
        limit,
    );
    expect_invalid(server.admin.clone().set_pay_as_you_go(budget(u64::MAX)).await, "monthly_budget_messages", limit);

    let overflowing = allocate_request("acme", "env", u64::MAX / 1_000 + 1, false);
    expect_invalid(server.admin.clone().allocate_capacity(overflowing).await, "messages", "the limit is");
    assert_eq!(server.balance("env").await, before);
}
