//! CheckAndReserve through the real server: the draw order, all-or-nothing refusals, capacity that
//! takes effect for the very next request, dry runs, idempotency keys, the rate card, and the
//! balance's state and period.

mod common;

use common::*;
use quotad::proto::{CheckAndReserveRequest, Source, State};
use tonic::Code;

const ALLOCATION: Source = Source::EnvironmentAllocation;
const POOL: Source = Source::TenantPool;
const PAYG: Source = Source::PayAsYouGo;

/// A tenant of 2 packs of 10 messages: 10 allocated to `env` with pool draws on, so the pool holds the
/// other 10, plus pay-as-you-go up to 5 messages. 25 messages are available in all.
async fn three_sources() -> TestServer {
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 2).await;
    server.allocate("acme", "env", 10, true).await;
    let balance = server.set_payg("env", true, 5).await;
    assert_eq!(balance.available_milli, milli(25));
    server
}

#[tokio::test]
async fn reservations_draw_allocation_then_tenant_pool_then_pay_as_you_go() {
    // Proves the draw order: the allocation first, then the tenant pool, then pay-as-you-go within its budget.
    let server = three_sources().await;

    let first = server.reserve("env", 23).await;
    assert_eq!(first.reserved_milli, milli(23));
    assert_eq!(draws(&first.draws), [(ALLOCATION, milli(10)), (POOL, milli(10)), (PAYG, milli(3))]);
    assert!(!first.reservation_id.is_empty());
    assert_eq!(first.expires_at_unix_ms, START_MS + 60_000, "ttl_seconds = 0 is the default of 60 s");
    let balance = first.balance.unwrap();
    assert_eq!((balance.reserved_milli, balance.available_milli), (milli(23), milli(2)));
    let tenant = server.tenant("acme").await;
    assert_eq!(tenant.tenant_pool_reserved_milli, milli(10));

    // The budget has 2 messages left: 3 is refused, 2 comes from pay-as-you-go alone.
    expect_depleted(server.try_reserve(reserve_request("env", 3)).await, "env", milli(3), milli(2));
    let second = server.reserve("env", 2).await;
    assert_eq!(draws(&second.draws), [(PAYG, milli(2))]);
    let balance = second.balance.unwrap();
    assert_eq!(balance.available_milli, 0);
    assert_eq!(balance.state(), State::Depleted);
}

#[tokio::test]
async fn the_tenant_pool_is_drawn_only_with_draw_from_tenant_pool() {
    // Proves that an environment without draw_from_tenant_pool skips the pool and goes on to pay-as-you-go.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 2).await;
    let balance = server.allocate("acme", "env", 10, false).await;
    assert!(!balance.draw_from_tenant_pool);
    assert_eq!(balance.available_milli, milli(10), "the 10 unallocated messages are not this environment's");
    server.set_payg("env", true, 5).await;

    let granted = server.reserve("env", 12).await;
    assert_eq!(draws(&granted.draws), [(ALLOCATION, milli(10)), (PAYG, milli(2))]);
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, 0);
}

#[tokio::test]
async fn pay_as_you_go_with_a_budget_of_zero_has_no_cap() {
    // Proves that a pay-as-you-go budget of 0 means no cap: the largest request is granted, repeatedly.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 0).await;
    let balance = server.set_payg("env", true, 0).await;
    assert_eq!(balance.payg_budget_milli, 0);
    assert_eq!(balance.available_milli, u64::MAX, "available saturates with uncapped pay-as-you-go");
    assert_eq!(balance.state(), State::Ok);

    for _ in 0..3 {
        let granted = server.reserve("env", 1_000_000_000).await;
        assert_eq!(draws(&granted.draws), [(PAYG, milli(1_000_000_000))]);
    }
    let balance = server.balance("env").await;
    assert_eq!(balance.reserved_milli, milli(3_000_000_000));
    assert_eq!(balance.available_milli, u64::MAX);
}

#[tokio::test]
async fn a_refused_reservation_holds_nothing_from_any_source() {
    // Proves all-or-nothing: a request larger than all sources together is refused with QUOTA_DEPLETED
    // and its metadata, and leaves every source as it was.
    let server = three_sources().await;
    let before = server.balance("env").await;

    let status = expect_depleted(server.try_reserve(reserve_request("env", 26)).await, "env", milli(26), milli(25));
    assert!(status.message().contains("add capacity"), "a message a person can act on: {}", status.message());

    assert_eq!(server.balance("env").await, before);
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, 0);
    // Everything is still there to be granted.
    let granted = server.reserve("env", 25).await;
    assert_eq!(granted.reserved_milli, milli(25));
}

#[tokio::test]
async fn a_depleted_environment_refuses_until_capacity_is_added() {
    // Proves rule 5: a purchase plus allocation, enabling pay-as-you-go, raising its budget and turning on
    // pool draws each take effect for the very next request.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    server.reserve("env", 10).await;
    expect_depleted(server.try_reserve(reserve_request("env", 1)).await, "env", milli(1), 0);

    // Purchase and allocate.
    server.purchase("acme", 1).await;
    server.allocate("acme", "env", 12, false).await;
    assert_eq!(draws(&server.reserve("env", 2).await.draws), [(ALLOCATION, milli(2))]);
    expect_depleted(server.try_reserve(reserve_request("env", 1)).await, "env", milli(1), 0);

    // Pool draws: the tenant has 8 unallocated messages.
    server.allocate("acme", "env", 12, true).await;
    assert_eq!(draws(&server.reserve("env", 8).await.draws), [(POOL, milli(8))]);
    expect_depleted(server.try_reserve(reserve_request("env", 1)).await, "env", milli(1), 0);

    // Enable pay-as-you-go with a budget.
    server.set_payg("env", true, 3).await;
    assert_eq!(draws(&server.reserve("env", 3).await.draws), [(PAYG, milli(3))]);
    expect_depleted(server.try_reserve(reserve_request("env", 1)).await, "env", milli(1), 0);

    // Raise the budget.
    server.set_payg("env", true, 5).await;
    assert_eq!(draws(&server.reserve("env", 2).await.draws), [(PAYG, milli(2))]);
    expect_depleted(server.try_reserve(reserve_request("env", 1)).await, "env", milli(1), 0);

    // Remove the cap.
    server.set_payg("env", true, 0).await;
    assert_eq!(draws(&server.reserve("env", 100).await.draws), [(PAYG, milli(100))]);

    // Turning pay-as-you-go off takes effect at once too.
    server.set_payg("env", false, 0).await;
    expect_depleted(server.try_reserve(reserve_request("env", 1)).await, "env", milli(1), 0);
}

#[tokio::test]
async fn a_dry_run_answers_without_holding_anything() {
    // Proves that a dry run reports the draws it would take, or QUOTA_DEPLETED, and holds nothing either way.
    let server = three_sources().await;
    let before = server.balance("env").await;

    let quote =
        server.try_reserve(CheckAndReserveRequest { dry_run: true, ..reserve_request("env", 23) }).await.unwrap();
    assert_eq!(quote.reservation_id, "");
    assert_eq!(quote.expires_at_unix_ms, 0);
    assert_eq!(quote.reserved_milli, milli(23));
    assert_eq!(draws(&quote.draws), [(ALLOCATION, milli(10)), (POOL, milli(10)), (PAYG, milli(3))]);
    assert_eq!(quote.balance.unwrap(), before);

    let refused = server.try_reserve(CheckAndReserveRequest { dry_run: true, ..reserve_request("env", 26) }).await;
    expect_depleted(refused, "env", milli(26), milli(25));

    assert_eq!(server.balance("env").await, before);
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, 0);
    assert_eq!(server.reserve("env", 25).await.reserved_milli, milli(25), "the dry runs held nothing");
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_returns_the_same_reservation() {
    // Proves that a retried CheckAndReserve with the same key returns the first reservation and holds
    // nothing twice, before and after the reservation resolves.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let request = CheckAndReserveRequest { idempotency_key: "call-1".into(), ..reserve_request("env", 5) };

    let first = server.try_reserve(request.clone()).await.unwrap();
    server.clock.advance_ms(1_000);
    let retry = server.try_reserve(request.clone()).await.unwrap();
    assert_eq!(retry.reservation_id, first.reservation_id);
    assert_eq!(retry.reserved_milli, first.reserved_milli);
    assert_eq!(retry.draws, first.draws);
    assert_eq!(retry.expires_at_unix_ms, first.expires_at_unix_ms, "the retry does not extend the hold");
    assert_eq!(retry.balance.unwrap().reserved_milli, milli(5));

    // A different key is a different reservation.
    let other = server.try_reserve(CheckAndReserveRequest { idempotency_key: "call-2".into(), ..request.clone() });
    assert_ne!(other.await.unwrap().reservation_id, first.reservation_id);

    // After the commit, a retry still names the same reservation and holds nothing again.
    server.commit(&first.reservation_id, 4).await;
    let late_retry = server.try_reserve(request).await.unwrap();
    assert_eq!(late_retry.reservation_id, first.reservation_id);
    let balance = server.balance("env").await;
    assert_eq!(balance.reserved_milli, milli(5), "only the call-2 reservation is open");
    assert_eq!(balance.allocation_used_milli, milli(4));
}

#[tokio::test]
async fn an_idempotency_key_reused_for_a_different_request_is_refused() {
    // Proves that reusing a key with a different amount or agent is FAILED_PRECONDITION and changes nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let request = CheckAndReserveRequest { idempotency_key: "call-1".into(), ..reserve_request("env", 5) };
    server.try_reserve(request.clone()).await.unwrap();
    let before = server.balance("env").await;

    let other_amount = CheckAndReserveRequest { messages: Some(6), ..request.clone() };
    let status = expect_code(server.try_reserve(other_amount).await, Code::FailedPrecondition);
    error_info(&status, "IDEMPOTENCY_KEY_REUSED");
    assert!(status.message().contains("call-1"), "{}", status.message());

    let other_agent = CheckAndReserveRequest { agent_id: "another-agent".into(), ..request };
    let status = expect_code(server.try_reserve(other_agent).await, Code::FailedPrecondition);
    error_info(&status, "IDEMPOTENCY_KEY_REUSED");

    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_capacity_environment() {
    // Proves that a key is per capacity environment: a retry through a linked app environment finds the
    // same reservation, while the same key in another capacity environment is a new one.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    server.allocate("acme", "other-env", 100, false).await;
    server.link("sales-app", "env").await;
    let keyed = |environment: &str| CheckAndReserveRequest {
        idempotency_key: "call-1".into(),
        ..reserve_request(environment, 5)
    };

    let direct = server.try_reserve(keyed("env")).await.unwrap();
    let through_app = server.try_reserve(keyed("sales-app")).await.unwrap();
    assert_eq!(through_app.reservation_id, direct.reservation_id);
    assert_eq!(server.balance("env").await.reserved_milli, milli(5));

    let elsewhere = server.try_reserve(keyed("other-env")).await.unwrap();
    assert_ne!(elsewhere.reservation_id, direct.reservation_id);
    assert_eq!(server.balance("other-env").await.reserved_milli, milli(5));
}

#[tokio::test]
async fn usage_is_priced_with_the_default_rate_card() {
    // Proves every default rate, exactly in milli, including the fractional 13 per 100 flow actions.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 1_000).await;
    let rates = [
        ("classic_answer", 1, 1_000),
        ("generative_answer", 1, 2_000),
        ("agent_action", 1, 5_000),
        ("tenant_graph_grounding", 1, 10_000),
        ("agent_flow_actions", 1, 130),
        ("agent_flow_actions", 100, 13_000),
        ("agent_flow_actions", 7, 910),
        ("ai_tools_basic", 1, 100),
        ("ai_tools_standard", 1, 1_500),
        ("ai_tools_premium", 1, 10_000),
        ("content_processing", 3, 24_000),
    ];
    for (scenario, quantity, expected_milli) in rates {
        let request = CheckAndReserveRequest { dry_run: true, ..reserve_usage_request("env", &[(scenario, quantity)]) };
        let quote = server.try_reserve(request).await.unwrap();
        assert_eq!(quote.reserved_milli, expected_milli, "{quantity} × {scenario}");
    }

    // Several items add up, and a real reservation holds the priced amount.
    let mixed = [("generative_answer", 3), ("agent_flow_actions", 1), ("agent_action", 2)];
    let granted = server.try_reserve(reserve_usage_request("env", &mixed)).await.unwrap();
    assert_eq!(granted.reserved_milli, 6_000 + 130 + 10_000);
    assert_eq!(server.balance("env").await.reserved_milli, 16_130);

    // A commit priced by usage charges the priced amount.
    let commit = quotad::proto::CommitRequest {
        reservation_id: granted.reservation_id,
        messages: None,
        usage: usage_items(&[("agent_flow_actions", 1)]),
    };
    let committed = server.try_commit(commit).await.unwrap();
    assert_eq!(committed.charged_milli, 130);
    assert_eq!(committed.released_milli, 16_000);
}

#[tokio::test]
async fn an_unknown_scenario_is_refused_listing_the_known_ones() {
    // Proves that an unknown scenario is INVALID_ARGUMENT naming the item and listing every known scenario.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let before = server.balance("env").await;

    let request = reserve_usage_request("env", &[("classic_answer", 1), ("warp_drive", 1)]);
    let status = expect_code(server.try_reserve(request).await, Code::InvalidArgument);
    let message = status.message();
    assert!(message.starts_with("usage[1].scenario"), "{message}");
    assert!(message.contains("warp_drive"), "{message}");
    for known in [
        "classic_answer",
        "generative_answer",
        "agent_action",
        "tenant_graph_grounding",
        "agent_flow_actions",
        "ai_tools_basic",
        "ai_tools_standard",
        "ai_tools_premium",
        "content_processing",
    ] {
        assert!(message.contains(known), "{known} missing from: {message}");
    }
    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn the_rate_card_can_be_replaced_by_configuration() {
    // Proves that a configured rate card replaces the default one, for prices and for the known-scenario list.
    let rate_card = [("page", quotad::ledger::pricing::Rate { messages: 3, per: 2 })];
    let settings = quotad::config::Settings {
        rate_card: Some(rate_card.into_iter().map(|(name, rate)| (name.to_owned(), rate)).collect()),
        ..Default::default()
    };
    let server = spawn_server_with(settings).await;
    server.bootstrap("acme", "env", 100).await;

    let granted = server.try_reserve(reserve_usage_request("env", &[("page", 3)])).await.unwrap();
    assert_eq!(granted.reserved_milli, 4_500);
    let status = expect_code(
        server.try_reserve(reserve_usage_request("env", &[("classic_answer", 1)])).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("known scenarios: page"), "{}", status.message());
}

#[tokio::test]
async fn the_balance_state_is_low_at_20_percent_and_depleted_at_zero() {
    // Proves the state thresholds on the allocation alone: OK above 20% available, LOW at 20% or less,
    // DEPLETED at 0.
    let server = spawn_server().await;
    let balance = server.bootstrap("acme", "env", 100).await;
    assert_eq!(balance.state(), State::Ok);

    assert_eq!(server.reserve("env", 79).await.balance.unwrap().state(), State::Ok, "21% left");
    assert_eq!(server.reserve("env", 1).await.balance.unwrap().state(), State::Low, "20% left");
    assert_eq!(server.reserve("env", 19).await.balance.unwrap().state(), State::Low, "1% left");
    let last = server.reserve("env", 1).await.balance.unwrap();
    assert_eq!((last.available_milli, last.state()), (0, State::Depleted));
}

#[tokio::test]
async fn the_balance_state_counts_the_pay_as_you_go_budget() {
    // Proves that the LOW threshold is 20% of allocation plus pay-as-you-go budget, and that an uncapped
    // pay-as-you-go is never LOW.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 50).await;
    server.set_payg("env", true, 50).await;

    assert_eq!(server.reserve("env", 79).await.balance.unwrap().state(), State::Ok, "21 of 100 left");
    assert_eq!(server.reserve("env", 1).await.balance.unwrap().state(), State::Low, "20 of 100 left");
    assert_eq!(server.set_payg("env", true, 0).await.state(), State::Ok, "no cap");
    assert_eq!(server.set_payg("env", false, 50).await.state(), State::Depleted, "50 of 50 allocated are held");
}

#[tokio::test]
async fn the_balance_names_the_environment_tenant_and_period() {
    // Proves the identifying fields of a balance, and that the period is the UTC month of the clock.
    let server = spawn_server().await;
    let balance = server.bootstrap("acme", "env", 100).await;
    assert_eq!(balance.environment_id, "env");
    assert_eq!(balance.tenant_id, "acme");
    assert_eq!(balance.allocated_milli, milli(100));
    assert_eq!(balance.period, "2026-11");
    assert_eq!(server.reserve("env", 1).await.balance.unwrap().period, "2026-11");

    server.clock.set_ms(NEXT_PERIOD_MS - 1);
    assert_eq!(server.balance("env").await.period, "2026-11");
    server.clock.set_ms(NEXT_PERIOD_MS);
    assert_eq!(server.balance("env").await.period, "2026-12");
}
