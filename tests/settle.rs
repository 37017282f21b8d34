//! Commit and Release through the real server: charges below, at and above the hold, overage, late
//! commits after expiry, automatic expiry by the sweeper, and the once-only resolution of a
//! reservation (retries, conflicting retries, unknown ids).

mod common;

use common::*;
use quotad::proto::{CheckAndReserveRequest, Source, State};
use tonic::Code;

const ALLOCATION: Source = Source::EnvironmentAllocation;
const POOL: Source = Source::TenantPool;
const PAYG: Source = Source::PayAsYouGo;

#[tokio::test]
async fn a_commit_below_the_hold_charges_in_draw_order_and_releases_the_rest() {
    // Proves rule 2 for actual < reserved: the actual use is charged to the hold's draws in draw order
    // and the rest of the hold goes back to every source.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 2).await;
    server.allocate("acme", "env", 10, true).await;
    server.set_payg("env", true, 5).await;
    let reservation = server.reserve("env", 23).await;

    let committed = server.commit(&reservation.reservation_id, 15).await;
    assert_eq!(committed.charged_milli, milli(15));
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(10)), (POOL, milli(5))]);
    assert_eq!(committed.released_milli, milli(8));
    assert_eq!((committed.overage_milli, committed.late), (0, false));

    let balance = committed.balance.unwrap();
    assert_eq!(balance.allocation_used_milli, milli(10));
    assert_eq!(balance.tenant_pool_used_milli, milli(5));
    assert_eq!(balance.payg_used_milli, 0);
    assert_eq!(balance.reserved_milli, 0);
    assert_eq!(balance.available_milli, milli(10), "5 pool + 5 pay-as-you-go are left");
    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.tenant_pool_used_milli, tenant.tenant_pool_reserved_milli), (milli(5), 0));
}

#[tokio::test]
async fn a_commit_of_exactly_the_hold_releases_nothing() {
    // Proves that a commit equal to the reservation charges all of it and releases nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;

    let committed = server.commit(&reservation.reservation_id, 10).await;
    assert_eq!(committed.charged_milli, milli(10));
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(10))]);
    assert_eq!((committed.released_milli, committed.overage_milli), (0, 0));
    let balance = committed.balance.unwrap();
    assert_eq!((balance.allocation_used_milli, balance.reserved_milli), (milli(10), 0));
    assert_eq!(balance.available_milli, milli(90));
}

#[tokio::test]
async fn a_commit_of_zero_releases_the_whole_hold() {
    // Proves that committing zero use is valid and charges nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;

    let committed = server.commit(&reservation.reservation_id, 0).await;
    assert_eq!((committed.charged_milli, committed.released_milli), (0, milli(10)));
    assert!(committed.draws.is_empty());
    assert_eq!(committed.balance.unwrap().available_milli, milli(100));
}

#[tokio::test]
async fn a_commit_above_the_hold_takes_what_is_available_then_records_overage() {
    // Proves rule 2 for actual > reserved: the excess comes from what is available in draw order, and
    // what nothing covers is overage, so charged + overage is the actual use.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    let reservation = server.reserve("env", 4).await;

    let committed = server.commit(&reservation.reservation_id, 12).await;
    assert_eq!(committed.charged_milli, milli(10));
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(10))]);
    assert_eq!(committed.overage_milli, milli(2));
    assert_eq!(committed.released_milli, 0);
    assert_eq!(committed.charged_milli + committed.overage_milli, milli(12));
    let balance = committed.balance.unwrap();
    assert_eq!(balance.overage_milli, milli(2));
    assert_eq!(balance.allocation_used_milli, milli(10));
    assert_eq!((balance.available_milli, balance.state()), (0, State::Depleted));
}

#[tokio::test]
async fn the_excess_of_a_commit_follows_the_draw_order_into_pay_as_you_go() {
    // Proves that use beyond the hold is charged to the remaining allocation first, then pay-as-you-go.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    server.set_payg("env", true, 5).await;
    let reservation = server.reserve("env", 8).await;

    let committed = server.commit(&reservation.reservation_id, 14).await;
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(10)), (PAYG, milli(4))]);
    assert_eq!((committed.charged_milli, committed.overage_milli), (milli(14), 0));
    assert_eq!(committed.balance.unwrap().payg_used_milli, milli(4));
}

#[tokio::test]
async fn the_excess_of_a_commit_never_takes_another_reservations_hold() {
    // Proves that open holds count against every source: an over-commit cannot take capacity that another
    // open reservation holds, so the excess becomes overage instead.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    let first = server.reserve("env", 5).await;
    let second = server.reserve("env", 5).await;

    let committed = server.commit(&first.reservation_id, 8).await;
    assert_eq!((committed.charged_milli, committed.overage_milli), (milli(5), milli(3)));
    let balance = committed.balance.unwrap();
    assert_eq!(balance.reserved_milli, milli(5), "the second hold is untouched");

    let committed = server.commit(&second.reservation_id, 5).await;
    assert_eq!((committed.charged_milli, committed.overage_milli), (milli(5), 0));
}

#[tokio::test]
async fn expired_holds_are_released_without_a_client_call() {
    // Proves rule 4: once the clock passes a hold's expiry, the sweeper releases it on its own, and holds
    // not yet due stay held.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 2).await;
    server.allocate("acme", "env", 10, true).await;
    let short = server.try_reserve(CheckAndReserveRequest { ttl_seconds: 1, ..reserve_request("env", 12) }).await;
    let short = short.unwrap();
    assert_eq!(short.expires_at_unix_ms, START_MS + 1_000);
    assert_eq!(draws(&short.draws), [(ALLOCATION, milli(10)), (POOL, milli(2))]);
    let long = server.try_reserve(CheckAndReserveRequest { ttl_seconds: 30, ..reserve_request("env", 3) }).await;
    assert_eq!(long.unwrap().expires_at_unix_ms, START_MS + 30_000);
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, milli(5));

    server.clock.advance_ms(1_000);
    let balance = server.wait_for_balance("env", |b| b.reserved_milli < milli(15)).await;
    assert_eq!(balance.reserved_milli, milli(3), "only the hold that is due was released");
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, milli(3));

    server.clock.advance_ms(29_000);
    let balance = server.wait_for_balance("env", |b| b.reserved_milli == 0).await;
    assert_eq!(balance.available_milli, milli(20));
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, 0);
}

#[tokio::test]
async fn a_hold_is_open_until_its_expiry() {
    // Proves that a commit one millisecond before expiry is on time, with nothing late about it.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.try_reserve(CheckAndReserveRequest { ttl_seconds: 5, ..reserve_request("env", 5) });
    let reservation = reservation.await.unwrap();

    server.clock.set_ms(reservation.expires_at_unix_ms - 1);
    let committed = server.commit(&reservation.reservation_id, 5).await;
    assert!(!committed.late);
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(5))]);
}

#[tokio::test]
async fn a_commit_after_expiry_is_charged_from_what_is_available_and_marked_late() {
    // Proves rule 2 for late commits: after the sweeper released the hold, the commit still charges the use
    // from what is available, with late = true, and a retry gives the same answer.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let request = CheckAndReserveRequest { ttl_seconds: 10, ..reserve_request("env", 5) };
    let reservation = server.try_reserve(request).await.unwrap();

    server.clock.advance_ms(10_000);
    server.wait_for_balance("env", |b| b.reserved_milli == 0).await;
    let committed = server.commit(&reservation.reservation_id, 7).await;
    assert!(committed.late);
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(7))]);
    assert_eq!((committed.charged_milli, committed.released_milli, committed.overage_milli), (milli(7), 0, 0));
    assert_eq!(committed.balance.as_ref().unwrap().allocation_used_milli, milli(7));

    let retry = server.commit(&reservation.reservation_id, 7).await;
    assert_eq!(retry, committed);
    assert_eq!(server.balance("env").await.allocation_used_milli, milli(7), "charged once");
}

#[tokio::test]
async fn a_late_commit_that_nothing_covers_becomes_overage() {
    // Proves that a late commit whose capacity was taken by others meanwhile records the rest as overage.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    let request = CheckAndReserveRequest { ttl_seconds: 1, ..reserve_request("env", 10) };
    let expired = server.try_reserve(request).await.unwrap();
    server.clock.advance_ms(1_000);
    server.wait_for_balance("env", |b| b.reserved_milli == 0).await;
    server.reserve("env", 8).await;

    let committed = server.commit(&expired.reservation_id, 10).await;
    assert!(committed.late);
    assert_eq!((committed.charged_milli, committed.overage_milli), (milli(2), milli(8)));
    assert_eq!(committed.balance.unwrap().overage_milli, milli(8));
}

#[tokio::test]
async fn a_retried_commit_returns_the_first_answer_and_charges_nothing_again() {
    // Proves rule 3: a retried Commit with the same amount returns the first answer without charging twice.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;
    let first = server.commit(&reservation.reservation_id, 6).await;

    let retry = server.commit(&reservation.reservation_id, 6).await;
    assert_eq!(retry, first);
    let balance = server.balance("env").await;
    assert_eq!(balance.allocation_used_milli, milli(6));
    assert_eq!(balance.available_milli, milli(94));
}

#[tokio::test]
async fn a_retried_commit_with_a_different_amount_is_refused() {
    // Proves rule 3: a second Commit with another amount is FAILED_PRECONDITION naming the first commit,
    // and changes nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;
    server.commit(&reservation.reservation_id, 6).await;
    let before = server.balance("env").await;

    let status =
        expect_code(server.try_commit(commit_request(&reservation.reservation_id, 7)).await, Code::FailedPrecondition);
    error_info(&status, "ALREADY_COMMITTED");
    assert!(status.message().contains("already committed with 6000 milli"), "{}", status.message());
    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn a_commit_after_release_is_refused() {
    // Proves rule 3: committing a released reservation is FAILED_PRECONDITION saying it was released.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;
    server.release(&reservation.reservation_id).await;
    let before = server.balance("env").await;

    let status =
        expect_code(server.try_commit(commit_request(&reservation.reservation_id, 10)).await, Code::FailedPrecondition);
    error_info(&status, "ALREADY_RELEASED");
    assert!(status.message().contains("was released"), "{}", status.message());
    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn a_release_returns_the_hold_and_a_retry_returns_the_first_answer() {
    // Proves that Release returns the whole hold, and that a retried Release answers the same and
    // releases nothing more.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;
    server.reserve("env", 20).await;

    let released = server.release(&reservation.reservation_id).await;
    assert_eq!(released.released_milli, milli(10));
    let balance = released.balance.clone().unwrap();
    assert_eq!(
        (balance.reserved_milli, balance.available_milli, balance.allocation_used_milli),
        (milli(20), milli(80), 0)
    );

    let retry = server.release(&reservation.reservation_id).await;
    assert_eq!(retry, released);
}

#[tokio::test]
async fn a_release_after_commit_is_refused() {
    // Proves rule 3: releasing a committed reservation is FAILED_PRECONDITION and changes nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let reservation = server.reserve("env", 10).await;
    server.commit(&reservation.reservation_id, 4).await;
    let before = server.balance("env").await;

    let status = expect_code(server.try_release(&reservation.reservation_id).await, Code::FailedPrecondition);
    error_info(&status, "ALREADY_COMMITTED");
    assert!(status.message().contains("was committed"), "{}", status.message());
    assert_eq!(server.balance("env").await, before);
}

#[tokio::test]
async fn a_release_after_expiry_releases_nothing_more() {
    // Proves that releasing an expired reservation answers 0 released, and that it then counts as released.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let request = CheckAndReserveRequest { ttl_seconds: 1, ..reserve_request("env", 10) };
    let reservation = server.try_reserve(request).await.unwrap();
    server.clock.advance_ms(1_000);
    server.wait_for_balance("env", |b| b.reserved_milli == 0).await;

    let released = server.release(&reservation.reservation_id).await;
    assert_eq!(released.released_milli, 0);
    assert_eq!(released.balance.unwrap().available_milli, milli(100));
    assert_eq!(server.release(&reservation.reservation_id).await.released_milli, 0);
    expect_code(server.try_commit(commit_request(&reservation.reservation_id, 1)).await, Code::FailedPrecondition);
}

#[tokio::test]
async fn unknown_reservations_are_not_found() {
    // Proves that Commit and Release of an id this server never issued are NOT_FOUND, whatever its shape.
    let server = spawn_server().await;
    let balance = server.bootstrap("acme", "env", 100).await;
    let issued = server.reserve("env", 1).await.reservation_id;
    let unknown_seq = format!("{}9", issued);

    for id in [unknown_seq.as_str(), "env/999", "no-such-env/1", "env/01", "env", "not-a-reservation"] {
        let status = expect_code(server.try_commit(commit_request(id, 1)).await, Code::NotFound);
        error_info(&status, "UNKNOWN_RESERVATION");
        let status = expect_code(server.try_release(id).await, Code::NotFound);
        error_info(&status, "UNKNOWN_RESERVATION");
    }
    let after = server.balance("env").await;
    assert_eq!((after.reserved_milli, after.allocation_used_milli), (milli(1), balance.allocation_used_milli));
}

#[tokio::test]
async fn resolved_reservations_are_remembered_for_24_hours_then_forgotten() {
    // Proves rule 3's retention: a retry 24 h after a commit still gets the first answer, and once the
    // record is older than that (and pruned by a later resolution) the id is NOT_FOUND.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let first = server.reserve("env", 10).await.reservation_id;
    let committed = server.commit(&first, 4).await;
    let day_ms = 24 * 60 * 60 * 1_000;

    server.clock.advance_ms(day_ms);
    let other = server.reserve("env", 1).await.reservation_id;
    server.release(&other).await;
    let retry = server.commit(&first, 4).await;
    assert_eq!(retry.charged_milli, committed.charged_milli);
    assert_eq!(server.balance("env").await.allocation_used_milli, milli(4), "charged once");

    server.clock.advance_ms(1);
    let another = server.reserve("env", 1).await.reservation_id;
    server.release(&another).await;
    let status = expect_code(server.try_commit(commit_request(&first, 4)).await, Code::NotFound);
    error_info(&status, "UNKNOWN_RESERVATION");
    assert_eq!(server.balance("env").await.allocation_used_milli, milli(4), "forgetting charges nothing");
}

#[tokio::test]
async fn the_number_of_remembered_resolutions_is_bounded() {
    // Proves that resolved reservations kept for retries are capped per environment: past
    // max_resolved_per_environment the oldest record is forgotten first.
    let settings = quotad::config::Settings { max_resolved_per_environment: 2, ..Default::default() };
    let server = spawn_server_with(settings).await;
    server.bootstrap("acme", "env", 100).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = server.reserve("env", 1).await.reservation_id;
        server.commit(&id, 1).await;
        ids.push(id);
    }
    expect_code(server.try_commit(commit_request(&ids[0], 1)).await, Code::NotFound);
    server.commit(&ids[1], 1).await;
    server.commit(&ids[2], 1).await;
    assert_eq!(server.balance("env").await.allocation_used_milli, milli(3));
}
