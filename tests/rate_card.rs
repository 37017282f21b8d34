//! Rate card versions through the real server: the configured card is version 1, SetRateCard adds
//! versions that take effect now or later, a reservation and its commit are priced at the version in
//! force when the reservation was made, and every bad request is refused naming the field, changing
//! nothing.

mod common;

use std::sync::Arc;

use common::*;
use quotad::{
    clock::ManualClock,
    config::Settings,
    durability::journal::Durability,
    proto::{CommitRequest, GetRateCardRequest, RateCard, ScenarioRate, SetRateCardRequest},
};
use tonic::{Code, Status};

const HOUR_MS: u64 = 3_600_000;

fn rate(scenario: &str, messages: u64, per: u64) -> ScenarioRate {
    ScenarioRate { scenario: scenario.into(), messages, per }
}

async fn try_set(server: &TestServer, rates: Vec<ScenarioRate>, effective_at_unix_ms: u64) -> Result<RateCard, Status> {
    let request = SetRateCardRequest { rates, effective_at_unix_ms };
    server.admin.clone().set_rate_card(request).await.map(tonic::Response::into_inner)
}

async fn try_get(server: &TestServer, version: u32) -> Result<RateCard, Status> {
    server.admin.clone().get_rate_card(GetRateCardRequest { version }).await.map(tonic::Response::into_inner)
}

async fn commit_usage(server: &TestServer, reservation: &str, usage: &[(&str, u64)]) -> u64 {
    let request = CommitRequest { reservation_id: reservation.into(), messages: None, usage: usage_items(usage) };
    let committed = server.try_commit(request).await.unwrap();
    committed.charged_milli + committed.overage_milli
}

#[tokio::test]
async fn the_configured_card_is_version_one_in_force_from_time_zero() {
    // Proves that GetRateCard answers version 1, the configured card ordered by scenario, for 0 and 1,
    // and NOT_FOUND for a version that does not exist.
    let server = spawn_server().await;
    let now = try_get(&server, 0).await.unwrap();
    assert_eq!((now.version, now.effective_at_unix_ms), (1, 0));
    assert_eq!(try_get(&server, 1).await.unwrap(), now);
    let names: Vec<_> = now.rates.iter().map(|r| r.scenario.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    assert!(now.rates.contains(&rate("agent_flow_actions", 13, 100)));
    let status = expect_code(try_get(&server, 2).await, Code::NotFound);
    error_info(&status, "UNKNOWN_RATE_CARD_VERSION");
}

#[tokio::test]
async fn a_version_effective_now_prices_new_reservations() {
    // Proves that a version set with effective time 0 is in force at once and prices reservations, and
    // that a scenario it lacks is refused naming the item and the version.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 1_000).await;
    let added = try_set(&server, vec![rate("classic_answer", 3, 1), rate("summary", 1, 4)], 0).await.unwrap();
    assert_eq!((added.version, added.effective_at_unix_ms), (2, START_MS));
    assert_eq!(added.rates, [rate("classic_answer", 3, 1), rate("summary", 1, 4)]);
    assert_eq!(try_get(&server, 0).await.unwrap(), added);

    let reservation = server.try_reserve(reserve_usage_request("env", &[("classic_answer", 2), ("summary", 1)])).await;
    assert_eq!(reservation.unwrap().reserved_milli, 6_250);
    let status = expect_field(
        server.try_reserve(reserve_usage_request("env", &[("summary", 1), ("agent_action", 1)])).await,
        "usage[1].scenario",
    );
    assert!(status.message().contains("version 2"), "{status:?}");
}

#[tokio::test]
async fn a_hold_keeps_the_price_of_the_version_in_force_when_it_was_made() {
    // Proves that a version effective in the future leaves earlier reservations at the old price, that
    // reservations after its time get the new price, and that the commit of a hold made before the change
    // is charged at the old price even after it.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 1_000).await;
    let effective = START_MS + HOUR_MS;
    let added = try_set(&server, vec![rate("classic_answer", 3, 1)], effective).await.unwrap();
    assert_eq!((added.version, added.effective_at_unix_ms), (2, effective));
    assert_eq!(try_get(&server, 0).await.unwrap().version, 1, "not in force yet");

    let before = server.try_reserve(reserve_usage_request("env", &[("classic_answer", 2)])).await.unwrap();
    assert_eq!(before.reserved_milli, 2_000);
    server.clock.set_ms(effective - 1);
    let just_before = server.try_reserve(reserve_usage_request("env", &[("classic_answer", 1)])).await.unwrap();
    assert_eq!(just_before.reserved_milli, 1_000);
    server.clock.set_ms(effective);
    assert_eq!(try_get(&server, 0).await.unwrap().version, 2);
    let after = server.try_reserve(reserve_usage_request("env", &[("classic_answer", 2)])).await.unwrap();
    assert_eq!(after.reserved_milli, 6_000);

    assert_eq!(commit_usage(&server, &before.reservation_id, &[("classic_answer", 3)]).await, 3_000, "old price");
    assert_eq!(commit_usage(&server, &after.reservation_id, &[("classic_answer", 3)]).await, 9_000, "new price");
    assert_eq!(
        commit_usage(&server, &just_before.reservation_id, &[("agent_action", 1)]).await,
        5_000,
        "version 1 still knows a scenario that version 2 dropped"
    );
}

#[tokio::test]
async fn bad_rate_cards_are_refused_naming_the_field_and_change_nothing() {
    // Proves that every invalid card or effective time is refused with INVALID_ARGUMENT naming the field
    // and the limit, and that the card in force is unchanged afterwards.
    let server = spawn_server().await;
    let later = START_MS + HOUR_MS;
    try_set(&server, vec![rate("a", 1, 1)], later).await.unwrap();
    let too_many: Vec<_> = (0..257).map(|i| rate(&format!("s{i}"), 1, 1)).collect();
    expect_field(try_set(&server, too_many, 0).await, "rates");
    expect_field(try_set(&server, Vec::new(), 0).await, "rates");
    expect_field(try_set(&server, vec![rate("a", 1, 1), rate("b", 1, 0)], later).await, "rates[1].per");
    expect_field(try_set(&server, vec![rate("Bad", 1, 1)], later).await, "rates[0].scenario");
    expect_field(try_set(&server, vec![rate("messages", 1, 1)], later).await, "rates[0].scenario");
    expect_field(try_set(&server, vec![rate("a", 1, 1), rate("a", 2, 1)], later).await, "rates[1].scenario");
    expect_field(try_set(&server, vec![rate("a", 1_000_001, 1)], later).await, "rates[0].messages");
    let status = expect_field(try_set(&server, vec![rate("a", 1, 1)], later - 1).await, "effective_at_unix_ms");
    assert!(status.message().contains(&later.to_string()), "{status:?}");
    // 0 means now, which is before the newest version's time.
    expect_field(try_set(&server, vec![rate("a", 1, 1)], 0).await, "effective_at_unix_ms");
    let status = expect_field(try_set(&server, vec![rate("a", 1, 1)], START_MS - 1).await, "effective_at_unix_ms");
    assert!(status.message().contains("not in the past"), "{status:?}");
    assert!(try_set(&server, (0..256).map(|i| rate(&format!("s{i}"), 1, 1)).collect(), later).await.is_ok());
    assert_eq!(try_get(&server, 0).await.unwrap().version, 1);
    assert_eq!(try_get(&server, 3).await.unwrap().rates.len(), 256);
    expect_code(try_get(&server, 4).await, Code::NotFound);
}

#[tokio::test]
async fn the_number_of_versions_is_bounded() {
    // Proves the version cap at N−1, N and N+1: with a cap of 3, versions 2 and 3 are added and a fourth
    // is refused with RESOURCE_EXHAUSTED naming the limit.
    let settings = Settings { max_rate_card_versions: 3, ..Settings::default() };
    let server = spawn_server_with(settings).await;
    assert_eq!(try_set(&server, vec![rate("a", 1, 1)], 0).await.unwrap().version, 2);
    assert_eq!(try_set(&server, vec![rate("a", 2, 1)], 0).await.unwrap().version, 3);
    let status = expect_code(try_set(&server, vec![rate("a", 3, 1)], 0).await, Code::ResourceExhausted);
    assert_eq!(metadata_u64(&error_info(&status, "TOO_MANY_RATE_CARD_VERSIONS"), "limit"), 3);
    assert_eq!(try_get(&server, 0).await.unwrap().version, 3);
}

#[tokio::test]
async fn versions_and_the_versions_of_holds_survive_a_restart() {
    // Proves that added versions, and the version each open hold was priced at, are restored.
    let dir = tempfile::Builder::new().prefix("rate-card-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    server.bootstrap("acme", "env", 1_000).await;
    let mut request = reserve_usage_request("env", &[("classic_answer", 1)]);
    request.ttl_seconds = 3_600;
    let hold = server.try_reserve(request).await.unwrap();
    let added = try_set(&server, vec![rate("classic_answer", 4, 1)], START_MS + 1).await.unwrap();
    server.shutdown().await.unwrap();

    clock.advance_ms(10);
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    assert_eq!(try_get(&server, 2).await.unwrap(), added);
    assert_eq!(try_get(&server, 0).await.unwrap(), added);
    assert_eq!(commit_usage(&server, &hold.reservation_id, &[("classic_answer", 2)]).await, 2_000);
    assert_eq!(try_set(&server, vec![rate("a", 1, 1)], 0).await.unwrap().version, 3);
    server.shutdown().await.unwrap();
}
