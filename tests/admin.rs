//! The QuotaAdmin service through the real server: purchases and their idempotency keys, allocations
//! and their limits, tenant ownership, GetTenant, pay-as-you-go settings, and linked app environments.

mod common;

use common::*;
use quotad::proto::{CheckAndReserveRequest, PurchaseCapacityRequest, SetPayAsYouGoRequest, Source};
use tonic::Code;

#[tokio::test]
async fn a_purchase_creates_the_tenant_and_adds_packs() {
    // Proves that PurchaseCapacity creates an unknown tenant and adds packs × pack size to its capacity.
    let server = spawn_server().await;
    let status = expect_code(server.try_tenant("acme").await, Code::NotFound);
    error_info(&status, "UNKNOWN_TENANT");

    let first = server.purchase("acme", 2).await;
    assert_eq!(first.tenant_id, "acme");
    assert_eq!(first.purchased_milli, milli(50_000), "2 packs of the default 25,000 messages");
    assert_eq!((first.allocated_milli, first.unallocated_milli), (0, milli(50_000)));

    let second = server.purchase("acme", 1).await;
    assert_eq!(second.purchased_milli, milli(75_000));
    assert_eq!(server.tenant("acme").await, second);
}

#[tokio::test]
async fn a_purchase_retried_with_its_idempotency_key_adds_nothing_again() {
    // Proves purchase idempotency: the same key adds once, the same key with other packs is refused, and
    // another key adds again.
    let server = spawn_server().await;
    let keyed =
        |packs, key: &str| PurchaseCapacityRequest { tenant_id: "acme".into(), packs, idempotency_key: key.into() };

    let first = server.admin.clone().purchase_capacity(keyed(2, "order-1")).await.unwrap().into_inner();
    let retry = server.admin.clone().purchase_capacity(keyed(2, "order-1")).await.unwrap().into_inner();
    assert_eq!(retry, first);
    assert_eq!(server.tenant("acme").await.purchased_milli, milli(50_000));

    let status =
        expect_code(server.admin.clone().purchase_capacity(keyed(3, "order-1")).await, Code::FailedPrecondition);
    error_info(&status, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(server.tenant("acme").await.purchased_milli, milli(50_000));

    server.admin.clone().purchase_capacity(keyed(1, "order-2")).await.unwrap();
    assert_eq!(server.tenant("acme").await.purchased_milli, milli(75_000));
}

#[tokio::test]
async fn an_allocation_sets_rather_than_adds() {
    // Proves that AllocateCapacity replaces the environment's allocation, and GetTenant sums allocations.
    let server = spawn_server().await;
    server.purchase("acme", 1).await;
    assert_eq!(server.allocate("acme", "env-a", 100, false).await.allocated_milli, milli(100));
    assert_eq!(server.allocate("acme", "env-a", 40, false).await.allocated_milli, milli(40));
    server.allocate("acme", "env-b", 60, false).await;

    let tenant = server.tenant("acme").await;
    assert_eq!(tenant.allocated_milli, milli(100));
    assert_eq!(tenant.unallocated_milli, milli(25_000 - 100));
    assert_eq!(tenant.purchased_milli - tenant.allocated_milli, tenant.unallocated_milli);
}

#[tokio::test]
async fn allocations_never_exceed_the_purchased_capacity() {
    // Proves that an allocation bringing the sum over the purchase is FAILED_PRECONDITION naming the limit,
    // at N, N+1 and on a raise, and that a refused allocation creates no environment.
    let server = spawn_server().await;
    server.purchase("acme", 1).await;
    server.allocate("acme", "env-a", 20_000, false).await;

    let status = expect_code(
        server.admin.clone().allocate_capacity(allocate_request("acme", "env-b", 5_001, false)).await,
        Code::FailedPrecondition,
    );
    let info = error_info(&status, "OVER_ALLOCATION");
    assert_eq!(metadata_u64(&info, "purchased_milli"), milli(25_000));
    assert!(status.message().contains("purchased capacity of 25000000 milli"), "{}", status.message());
    expect_code(server.try_balance("env-b").await, Code::NotFound);

    let status = expect_code(
        server.admin.clone().allocate_capacity(allocate_request("acme", "env-a", 25_001, false)).await,
        Code::FailedPrecondition,
    );
    error_info(&status, "OVER_ALLOCATION");
    assert_eq!(server.balance("env-a").await.allocated_milli, milli(20_000));

    server.allocate("acme", "env-b", 5_000, false).await;
    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.allocated_milli, tenant.unallocated_milli), (milli(25_000), 0));
}

#[tokio::test]
async fn an_allocation_cannot_take_what_the_tenant_pool_gave_out_or_holds() {
    // Proves rule 1's last sentence: capacity the pool has given out or holds is not free to allocate.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 2).await;
    server.allocate("acme", "env-a", 10, true).await;
    let held = server.reserve("env-a", 13).await;
    assert_eq!(draws(&held.draws)[1], (Source::TenantPool, milli(3)));
    let charged = server.reserve("env-a", 2).await;
    server.commit(&charged.reservation_id, 2).await;

    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.tenant_pool_used_milli, tenant.tenant_pool_reserved_milli), (milli(2), milli(3)));
    let status = expect_code(
        server.admin.clone().allocate_capacity(allocate_request("acme", "env-b", 6, false)).await,
        Code::FailedPrecondition,
    );
    error_info(&status, "OVER_ALLOCATION");
    server.allocate("acme", "env-b", 5, false).await;
}

#[tokio::test]
async fn an_allocation_never_drops_below_what_is_used_and_held() {
    // Proves that lowering an allocation below this period's use plus open holds is FAILED_PRECONDITION
    // naming the amount, and that lowering it to exactly that is allowed.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 10).await;
    let used = server.reserve("env", 4).await;
    server.commit(&used.reservation_id, 3).await;
    server.reserve("env", 2).await;

    let status = expect_code(
        server.admin.clone().allocate_capacity(allocate_request("acme", "env", 4, false)).await,
        Code::FailedPrecondition,
    );
    let info = error_info(&status, "ALLOCATION_BELOW_USE");
    assert_eq!(metadata_u64(&info, "used_and_held_milli"), milli(5));
    assert!(status.message().contains("5000 milli"), "{}", status.message());
    assert_eq!(server.balance("env").await.allocated_milli, milli(10));

    let balance = server.allocate("acme", "env", 5, false).await;
    assert_eq!((balance.allocated_milli, balance.available_milli), (milli(5), 0));
}

#[tokio::test]
async fn an_environment_belongs_to_one_tenant_for_good() {
    // Proves that another tenant cannot allocate to an existing environment, even zero messages.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    server.purchase("globex", 1).await;

    for messages in [100, 0] {
        let status = expect_code(
            server.admin.clone().allocate_capacity(allocate_request("globex", "env", messages, false)).await,
            Code::FailedPrecondition,
        );
        error_info(&status, "ENVIRONMENT_OF_ANOTHER_TENANT");
        assert!(status.message().contains("one tenant for good"), "{}", status.message());
    }
    let balance = server.balance("env").await;
    assert_eq!((balance.tenant_id.as_str(), balance.allocated_milli), ("acme", milli(100)));
    assert_eq!(server.tenant("globex").await.allocated_milli, 0);
}

#[tokio::test]
async fn unknown_tenants_and_environments_are_not_found() {
    // Proves NOT_FOUND for every admin and quota call naming a tenant or environment that does not exist.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;

    let status = expect_code(
        server.admin.clone().allocate_capacity(allocate_request("nobody", "env-x", 1, false)).await,
        Code::NotFound,
    );
    error_info(&status, "UNKNOWN_TENANT");
    assert!(status.message().contains("PurchaseCapacity"), "{}", status.message());
    error_info(&expect_code(server.try_tenant("nobody").await, Code::NotFound), "UNKNOWN_TENANT");

    let payg = SetPayAsYouGoRequest { environment_id: "env-x".into(), enabled: true, monthly_budget_messages: 0 };
    error_info(&expect_code(server.admin.clone().set_pay_as_you_go(payg).await, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    error_info(&expect_code(server.try_balance("env-x").await, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    let reserve = server.try_reserve(reserve_request("env-x", 1)).await;
    error_info(&expect_code(reserve, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    let dry_run = server.try_reserve(CheckAndReserveRequest { dry_run: true, ..reserve_request("env-x", 1) }).await;
    expect_code(dry_run, Code::NotFound);
}

#[tokio::test]
async fn get_tenant_reports_purchases_allocations_and_pool_use() {
    // Proves every GetTenant field: purchased, allocated, unallocated = purchased − allocated, and what the
    // pool gave out and holds.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 3).await;
    server.allocate("acme", "env-a", 10, true).await;
    server.allocate("acme", "env-b", 5, false).await;
    let used = server.reserve("env-a", 14).await;
    server.commit(&used.reservation_id, 12).await;
    server.reserve("env-a", 3).await;

    let tenant = server.tenant("acme").await;
    assert_eq!(tenant.tenant_id, "acme");
    assert_eq!(tenant.purchased_milli, milli(30));
    assert_eq!(tenant.allocated_milli, milli(15));
    assert_eq!(tenant.unallocated_milli, milli(15));
    assert_eq!(tenant.tenant_pool_used_milli, milli(2));
    assert_eq!(tenant.tenant_pool_reserved_milli, milli(3));
    let balance = server.balance("env-a").await;
    assert_eq!((balance.tenant_pool_used_milli, balance.available_milli), (milli(2), milli(10)));
}

#[tokio::test]
async fn set_pay_as_you_go_reports_its_settings_in_the_balance() {
    // Proves that SetPayAsYouGo answers with the balance showing the new setting and budget in milli.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let balance = server.set_payg("env", true, 250).await;
    assert!(balance.payg_enabled);
    assert_eq!(balance.payg_budget_milli, milli(250));
    assert_eq!(balance.available_milli, milli(350));
    let balance = server.set_payg("env", false, 0).await;
    assert!(!balance.payg_enabled);
    assert_eq!(balance.available_milli, milli(100));
}

#[tokio::test]
async fn a_linked_app_environment_draws_on_its_capacity_environment() {
    // Proves that an app environment linked to a capacity environment reserves from it, and that its
    // balance names the capacity environment.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;

    let link = server.link("sales-app", "env").await;
    assert_eq!(
        (link.app_environment_id.as_str(), link.environment_id.as_str(), link.tenant_id.as_str()),
        ("sales-app", "env", "acme")
    );
    let balance = server.balance("sales-app").await;
    assert_eq!((balance.environment_id.as_str(), balance.tenant_id.as_str()), ("env", "acme"));

    let reservation = server.reserve("sales-app", 10).await;
    assert!(reservation.reservation_id.starts_with("env/"), "{}", reservation.reservation_id);
    assert_eq!(reservation.balance.unwrap().environment_id, "env");
    server.commit(&reservation.reservation_id, 7).await;
    assert_eq!(server.balance("env").await.allocation_used_milli, milli(7));

    // Several apps draw on one environment.
    server.link("service-app", "env").await;
    server.reserve("service-app", 3).await;
    assert_eq!(server.balance("env").await.reserved_milli, milli(3));
}

#[tokio::test]
async fn an_unlinked_app_environment_must_be_linked_before_use() {
    // Proves that after unlinking, the app environment is still known and every call naming it is
    // FAILED_PRECONDITION saying it must be linked to a capacity environment; relinking restores it.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    server.link("sales-app", "env").await;

    let unlinked = server.link("sales-app", "").await;
    assert_eq!(
        (unlinked.app_environment_id.as_str(), unlinked.environment_id.as_str(), unlinked.tenant_id.as_str()),
        ("sales-app", "", "")
    );
    let status = expect_code(server.try_balance("sales-app").await, Code::FailedPrecondition);
    error_info(&status, "APP_ENVIRONMENT_NOT_LINKED");
    assert!(status.message().contains("link it to a capacity environment"), "{}", status.message());
    let status = expect_code(server.try_reserve(reserve_request("sales-app", 1)).await, Code::FailedPrecondition);
    error_info(&status, "APP_ENVIRONMENT_NOT_LINKED");
    assert_eq!(server.balance("env").await.reserved_milli, 0);

    server.link("sales-app", "env").await;
    assert_eq!(server.reserve("sales-app", 1).await.balance.unwrap().environment_id, "env");
}

#[tokio::test]
async fn an_app_environment_can_be_relinked_to_another_capacity_environment() {
    // Proves that relinking moves an app environment's reservations and balance to the new target, while
    // reservations made before keep resolving against the old one.
    let server = spawn_server().await;
    server.bootstrap("acme", "env-a", 100).await;
    server.allocate("acme", "env-b", 50, false).await;
    server.link("sales-app", "env-a").await;
    let before = server.reserve("sales-app", 10).await;

    server.link("sales-app", "env-b").await;
    assert_eq!(server.balance("sales-app").await.environment_id, "env-b");
    server.reserve("sales-app", 5).await;
    assert_eq!(server.balance("env-b").await.reserved_milli, milli(5));

    server.commit(&before.reservation_id, 10).await;
    assert_eq!(server.balance("env-a").await.allocation_used_milli, milli(10));
}

#[tokio::test]
async fn never_seen_environments_are_not_found_for_links() {
    // Proves NOT_FOUND for an app environment id never seen and for a link target that does not exist.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;

    error_info(&expect_code(server.try_balance("ghost-app").await, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    expect_code(server.try_link("ghost-app", "").await, Code::NotFound);
    expect_code(server.try_link("sales-app", "no-such-env").await, Code::NotFound);
    expect_code(server.try_balance("sales-app").await, Code::NotFound);
}

#[tokio::test]
async fn capacity_and_app_environments_do_not_change_kind() {
    // Proves that a capacity environment cannot be linked as an app, a link cannot target an app
    // environment, and an app environment cannot be allocated to or given pay-as-you-go.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    server.allocate("acme", "env-2", 0, false).await;
    server.link("sales-app", "env").await;

    let status = expect_code(server.try_link("env-2", "env").await, Code::FailedPrecondition);
    error_info(&status, "ALREADY_A_CAPACITY_ENVIRONMENT");
    let status = expect_code(server.try_link("other-app", "sales-app").await, Code::FailedPrecondition);
    error_info(&status, "NOT_A_CAPACITY_ENVIRONMENT");
    let status = expect_code(
        server.admin.clone().allocate_capacity(allocate_request("acme", "sales-app", 1, false)).await,
        Code::FailedPrecondition,
    );
    error_info(&status, "NOT_A_CAPACITY_ENVIRONMENT");
    let payg = SetPayAsYouGoRequest { environment_id: "sales-app".into(), enabled: true, monthly_budget_messages: 0 };
    let status = expect_code(server.admin.clone().set_pay_as_you_go(payg).await, Code::FailedPrecondition);
    error_info(&status, "NOT_A_CAPACITY_ENVIRONMENT");

    assert_eq!(server.balance("sales-app").await.environment_id, "env");
    assert!(!server.balance("env").await.payg_enabled);
}
