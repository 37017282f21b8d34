//! Billing periods, tenant overage grace and agent limits, through the real server with an injected
//! clock: monthly rollover (UTC and a tenant's own time zone), grace on the tenant pool, and per-agent
//! caps and disabling, each kept across a restart.

mod common;

use std::sync::Arc;

use common::*;
use quotad::{
    clock::ManualClock,
    durability::journal::Durability,
    proto::{
        AgentLimit, CheckAndReserveRequest, ListAgentLimitsRequest, SetAgentLimitRequest, SetTenantPolicyRequest,
        TenantCapacity,
    },
};
use tonic::{Code, Status};

/// 2026-12-31T23:00:00Z: midnight on 1 January 2027 in Paris (UTC+1 in winter).
const PARIS_JANUARY_MS: u64 = 1_798_758_000_000;

async fn set_policy(server: &TestServer, tenant: &str, grace: u32, zone: &str) -> Result<TenantCapacity, Status> {
    let request =
        SetTenantPolicyRequest { tenant_id: tenant.into(), overage_grace_percent: grace, time_zone: zone.into() };
    server.admin.clone().set_tenant_policy(request).await.map(|r| r.into_inner())
}

async fn set_limit(server: &TestServer, request: SetAgentLimitRequest) -> Result<AgentLimit, Status> {
    server.admin.clone().set_agent_limit(request).await.map(|r| r.into_inner())
}

async fn agent_limits(server: &TestServer, environment: &str) -> Vec<AgentLimit> {
    let request = ListAgentLimitsRequest { environment_id: environment.into() };
    server.admin.clone().list_agent_limits(request).await.unwrap().into_inner().agents
}

fn limit_request(environment: &str, agent: &str, messages: u64, stop: bool) -> SetAgentLimitRequest {
    SetAgentLimitRequest {
        environment_id: environment.into(),
        agent_id: agent.into(),
        monthly_limit_messages: messages,
        stop_when_exceeded: stop,
        ..Default::default()
    }
}

fn reserve_for(environment: &str, agent: &str, messages: u64) -> CheckAndReserveRequest {
    CheckAndReserveRequest { agent_id: agent.into(), ttl_seconds: 3_600, ..reserve_request(environment, messages) }
}

#[tokio::test]
async fn the_first_request_after_the_month_boundary_starts_a_new_period() {
    // Proves: use, pool use and pay-as-you-go use start again at zero at 00:00 UTC on the first, for the
    // very first request after it and not a millisecond before; allocations, settings and open holds
    // carry over, and a hold open across the boundary is charged to the period it is committed in.
    let server = spawn_server().await;
    server.purchase("acme", 2).await;
    server.allocate("acme", "acme-prod", 1_000, true).await;
    server.set_payg("acme-prod", true, 500).await;
    let used = server.reserve("acme-prod", 1_000 + 300).await;
    server.commit(&used.reservation_id, 1_000 + 300).await;
    server.clock.set_ms(NEXT_PERIOD_MS - 60_000);
    let across = server.try_reserve(reserve_for("acme-prod", AGENT, 40)).await.unwrap();

    server.clock.set_ms(NEXT_PERIOD_MS - 1);
    let november = server.balance("acme-prod").await;
    assert_eq!(november.period, "2026-11");
    assert_eq!((november.allocation_used_milli, november.tenant_pool_used_milli), (milli(1_000), milli(300)));
    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.tenant_pool_used_milli, tenant.tenant_pool_reserved_milli), (milli(300), milli(40)));

    server.clock.set_ms(NEXT_PERIOD_MS);
    let december = server.balance("acme-prod").await;
    assert_eq!(december.period, "2026-12");
    assert_eq!((december.allocation_used_milli, december.tenant_pool_used_milli, december.payg_used_milli), (0, 0, 0));
    assert_eq!(
        (december.allocated_milli, december.payg_enabled, december.payg_budget_milli),
        (milli(1_000), true, milli(500))
    );
    assert_eq!(december.reserved_milli, milli(40), "the open hold carries over");
    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.period.as_str(), tenant.tenant_pool_used_milli), ("2026-12", 0));
    assert_eq!(tenant.tenant_pool_reserved_milli, milli(40), "the hold on the pool carries over");

    server.clock.set_ms(NEXT_PERIOD_MS + 1);
    assert!(!server.commit(&across.reservation_id, 40).await.late);
    let after = server.balance("acme-prod").await;
    assert_eq!(
        (after.allocation_used_milli, after.tenant_pool_used_milli),
        (0, milli(40)),
        "charged to December, and December started only once"
    );
    assert_eq!(server.tenant("acme").await.tenant_pool_used_milli, milli(40));
    assert_eq!(after.reserved_milli, 0);
}

#[tokio::test]
async fn a_tenant_time_zone_moves_its_period_boundaries() {
    // Proves: periods follow the tenant's IANA time zone from the next period on, while other tenants
    // keep UTC; a new time zone is checked and named in the answer.
    let server = spawn_server().await;
    server.bootstrap("paris", "paris-prod", 100).await;
    server.bootstrap("london", "london-prod", 100).await;
    let capacity = set_policy(&server, "paris", 0, "Europe/Paris").await.unwrap();
    assert_eq!((capacity.time_zone.as_str(), capacity.period.as_str()), ("Europe/Paris", "2026-11"));
    assert_eq!(capacity.overage_grace_percent, 100, "0 keeps no grace");

    server.clock.set_ms(NEXT_PERIOD_MS);
    for environment in ["paris-prod", "london-prod"] {
        let hold = server.reserve(environment, 10).await;
        server.commit(&hold.reservation_id, 10).await;
    }
    server.clock.set_ms(PARIS_JANUARY_MS - 1);
    assert_eq!(server.balance("paris-prod").await.period, "2026-12");
    server.clock.set_ms(PARIS_JANUARY_MS);
    let paris = server.balance("paris-prod").await;
    assert_eq!((paris.period.as_str(), paris.allocation_used_milli), ("2027-01", 0), "midnight in Paris");
    let london = server.balance("london-prod").await;
    assert_eq!((london.period.as_str(), london.allocation_used_milli), ("2026-12", milli(10)), "still December in UTC");

    let status = expect_code(set_policy(&server, "paris", 0, "Mars/Olympus_Mons").await, Code::InvalidArgument);
    assert!(status.message().starts_with("time_zone:"), "{}", status.message());
    let status = expect_code(set_policy(&server, "nobody", 0, "").await, Code::NotFound);
    error_info(&status, "UNKNOWN_TENANT");
}

#[tokio::test]
async fn a_time_zone_further_west_extends_the_month_instead_of_starting_it_again() {
    // Proves: when a tenant moves to a zone behind UTC, midnight UTC on the first does not start the
    // same month over (which would give it its capacity twice); the next month starts at midnight in
    // the new zone.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let all = server.reserve("acme-prod", 100).await;
    server.commit(&all.reservation_id, 100).await;
    set_policy(&server, "acme", 0, "Pacific/Honolulu").await.unwrap();

    server.clock.set_ms(NEXT_PERIOD_MS);
    let still_november = server.balance("acme-prod").await;
    assert_eq!((still_november.period.as_str(), still_november.allocation_used_milli), ("2026-11", milli(100)));
    expect_depleted(server.try_reserve(reserve_request("acme-prod", 1)).await, "acme-prod", milli(1), 0);
    // Midnight in Honolulu (UTC-10).
    server.clock.set_ms(NEXT_PERIOD_MS + 10 * 3_600_000);
    let december = server.balance("acme-prod").await;
    assert_eq!((december.period.as_str(), december.allocation_used_milli), ("2026-12", 0));
    assert_eq!(server.tenant("acme").await.period, "2026-12");
}

#[tokio::test]
async fn overage_grace_lets_the_pool_run_past_the_purchase_then_refuses() {
    // Proves: with 125% grace, environments drawing on the pool go on until allocations plus pool use
    // reach 125% of the purchase, what is drawn past 100% is reported as grace use, and then requests
    // are refused with QUOTA_DEPLETED; grace cannot be lowered below what is already taken.
    let server = spawn_server().await;
    let pack = server.pack_messages;
    server.purchase("acme", 1).await;
    server.allocate("acme", "acme-prod", 0, true).await;
    let all = server.reserve("acme-prod", pack).await;
    server.commit(&all.reservation_id, pack).await;
    expect_depleted(server.try_reserve(reserve_request("acme-prod", 1)).await, "acme-prod", milli(1), 0);

    let capacity = set_policy(&server, "acme", 125, "").await.unwrap();
    assert_eq!((capacity.overage_grace_percent, capacity.time_zone.as_str()), (125, "UTC"));
    let grace = pack / 4;
    let in_grace = server.reserve("acme-prod", grace).await;
    expect_depleted(server.try_reserve(reserve_request("acme-prod", 1)).await, "acme-prod", milli(1), 0);
    server.commit(&in_grace.reservation_id, grace).await;
    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.tenant_pool_used_milli, tenant.grace_used_milli), (milli(pack + grace), milli(grace)));

    let status = expect_code(set_policy(&server, "acme", 110, "").await, Code::FailedPrecondition);
    assert_eq!(metadata_u64(&error_info(&status, "GRACE_BELOW_USE"), "taken_milli"), milli(pack + grace));
    for bad in [99, 1_001] {
        let status = expect_code(set_policy(&server, "acme", bad, "").await, Code::InvalidArgument);
        assert!(status.message().starts_with("overage_grace_percent: is"), "{}", status.message());
    }
    assert_eq!(server.tenant("acme").await.overage_grace_percent, 125, "refused changes change nothing");

    server.clock.set_ms(NEXT_PERIOD_MS);
    let tenant = server.tenant("acme").await;
    assert_eq!((tenant.tenant_pool_used_milli, tenant.grace_used_milli), (0, 0), "grace use is per period");
    server.reserve("acme-prod", pack + grace).await;
}

#[tokio::test]
async fn an_agent_at_its_limit_is_refused_distinctly_and_others_are_not() {
    // Proves: with stop_when_exceeded, a reservation that would take the agent past its monthly limit
    // is refused with AGENT_LIMIT_REACHED (not QUOTA_DEPLETED), counting what it used and holds; other
    // agents are unaffected; without stop the agent may pass its limit; the limit starts again with the
    // next period; without pay-as-you-go a limit cannot exceed the allocation.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    let status =
        expect_code(set_limit(&server, limit_request("acme-prod", "bot", 1_001, true)).await, Code::FailedPrecondition);
    error_info(&status, "AGENT_LIMIT_ABOVE_ALLOCATION");

    let limit = set_limit(&server, limit_request("acme-prod", "bot", 100, true)).await.unwrap();
    assert_eq!((limit.monthly_limit_messages, limit.notify_percent, limit.used_milli), (100, 80, 0));
    let first = server.try_reserve(reserve_for("acme-prod", "bot", 60)).await.unwrap();
    server.commit(&first.reservation_id, 50).await;
    let held = server.try_reserve(reserve_for("acme-prod", "bot", 30)).await.unwrap();
    let status = expect_code(server.try_reserve(reserve_for("acme-prod", "bot", 21)).await, Code::ResourceExhausted);
    let info = error_info(&status, "AGENT_LIMIT_REACHED");
    assert_eq!(
        ["limit_milli", "used_milli", "held_milli", "requested_milli"].map(|key| metadata_u64(&info, key)),
        [milli(100), milli(50), milli(30), milli(21)]
    );
    let mut dry_run = reserve_for("acme-prod", "bot", 21);
    dry_run.dry_run = true;
    expect_code(server.try_reserve(dry_run).await, Code::ResourceExhausted);
    server.try_reserve(reserve_for("acme-prod", "bot", 20)).await.expect("exactly up to the limit");
    server.try_reserve(reserve_for("acme-prod", "other-agent", 500)).await.expect("other agents are not limited");
    server.release(&held.reservation_id).await;
    let listed = agent_limits(&server, "acme-prod").await;
    let bot = listed.iter().find(|a| a.agent_id == "bot").unwrap();
    assert_eq!((bot.used_milli, bot.reserved_milli), (milli(50), milli(20)));
    assert!(listed.iter().any(|a| a.agent_id == "other-agent" && a.reserved_milli == milli(500)));

    // A minute before the month ends, so that this hold is still open in the next one.
    server.clock.set_ms(NEXT_PERIOD_MS - 60_000);
    set_limit(&server, limit_request("acme-prod", "bot", 100, false)).await.unwrap();
    server.try_reserve(reserve_for("acme-prod", "bot", 200)).await.expect("without stop the limit only notifies");

    set_limit(&server, limit_request("acme-prod", "bot", 100, true)).await.unwrap();
    server.clock.set_ms(NEXT_PERIOD_MS);
    let december = agent_limits(&server, "acme-prod").await;
    let bot = december.iter().find(|a| a.agent_id == "bot").unwrap();
    assert_eq!((bot.used_milli, bot.period.as_str()), (0, "2026-12"), "use starts again; holds carry over");
    expect_code(server.try_reserve(reserve_for("acme-prod", "bot", 1)).await, Code::ResourceExhausted);
}

#[tokio::test]
async fn a_disabled_agent_is_refused_every_request_until_enabled() {
    // Proves: `disabled` refuses every reservation of that agent in that environment, dry runs included,
    // with PERMISSION_DENIED and reason AGENT_DISABLED, and nothing is held; enabling it again restores it.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    let disable = SetAgentLimitRequest { disabled: true, ..limit_request("acme-prod", "bot", 0, false) };
    assert!(set_limit(&server, disable).await.unwrap().disabled);
    let before = server.balance("acme-prod").await;
    for dry_run in [false, true] {
        let request = CheckAndReserveRequest { dry_run, ..reserve_for("acme-prod", "bot", 1) };
        let status = expect_code(server.try_reserve(request).await, Code::PermissionDenied);
        assert_eq!(error_info(&status, "AGENT_DISABLED").metadata.get("agent_id").map(String::as_str), Some("bot"));
    }
    assert_eq!(server.balance("acme-prod").await, before, "a refusal holds nothing");
    server.try_reserve(reserve_for("acme-prod", "other-agent", 1)).await.expect("only that agent is disabled");

    set_limit(&server, limit_request("acme-prod", "bot", 0, false)).await.unwrap();
    server.try_reserve(reserve_for("acme-prod", "bot", 1)).await.expect("enabled again");
}

#[tokio::test]
async fn agent_limit_requests_are_validated() {
    // Proves: each bad field is INVALID_ARGUMENT naming it, and unknown or app environments are refused.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    server.set_payg("acme-prod", true, 0).await;
    server.link("acme-app", "acme-prod").await;
    let cases = [
        (
            SetAgentLimitRequest { notify_percent: 101, ..limit_request("acme-prod", "bot", 10, false) },
            "notify_percent",
        ),
        (limit_request("acme-prod", "bot", 1_000_000_000_001, false), "monthly_limit_messages"),
        (limit_request("acme-prod", "", 10, false), "agent_id"),
        (limit_request("", "bot", 10, false), "environment_id"),
    ];
    for (request, field) in cases {
        let status = expect_code(set_limit(&server, request).await, Code::InvalidArgument);
        assert!(status.message().starts_with(&format!("{field}:")), "{field}: {}", status.message());
    }
    let limit = set_limit(&server, limit_request("acme-prod", "bot", 1_000_000, true)).await.unwrap();
    assert_eq!(limit.monthly_limit_messages, 1_000_000, "with pay-as-you-go a limit may exceed the allocation");
    expect_code(set_limit(&server, limit_request("nowhere", "bot", 10, false)).await, Code::NotFound);
    let status =
        expect_code(set_limit(&server, limit_request("acme-app", "bot", 10, false)).await, Code::FailedPrecondition);
    error_info(&status, "NOT_A_CAPACITY_ENVIRONMENT");
}

#[tokio::test]
async fn policies_limits_and_periods_survive_a_restart() {
    // Proves: a tenant's grace and time zone, agent limits and the agents' use, and the current period
    // are the same after a restart from the log alone and from the shutdown snapshot, and the next
    // boundary still starts a new period.
    let dir = tempfile::Builder::new().prefix("billing-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(dir.path(), Durability::Write), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    set_policy(&server, "acme", 150, "Europe/Paris").await.unwrap();
    set_limit(&server, limit_request("acme-prod", "bot", 300, true)).await.unwrap();
    let hold = server.try_reserve(reserve_for("acme-prod", "bot", 120)).await.unwrap();
    server.commit(&hold.reservation_id, 100).await;
    server.try_reserve(reserve_for("acme-prod", "bot", 50)).await.unwrap();
    let (tenant, limits, balance) =
        (server.tenant("acme").await, agent_limits(&server, "acme-prod").await, server.balance("acme-prod").await);
    server.shutdown().await.unwrap();

    for restart in ["from the shutdown snapshot", "again"] {
        let server = spawn_server_with_config(config_on(dir.path(), Durability::Write), clock.clone()).await;
        assert_eq!(server.tenant("acme").await, tenant, "{restart}");
        assert_eq!(agent_limits(&server, "acme-prod").await, limits, "{restart}");
        assert_eq!(server.balance("acme-prod").await, balance, "{restart}");
        let status =
            expect_code(server.try_reserve(reserve_for("acme-prod", "bot", 151)).await, Code::ResourceExhausted);
        error_info(&status, "AGENT_LIMIT_REACHED");
        server.shutdown().await.unwrap();
    }

    clock.set_ms(PARIS_JANUARY_MS);
    let server = spawn_server_with_config(config_on(dir.path(), Durability::Write), clock).await;
    let january = server.balance("acme-prod").await;
    assert_eq!((january.period.as_str(), january.allocation_used_milli), ("2027-01", 0));
    server.try_reserve(reserve_for("acme-prod", "bot", 250)).await.expect("the agent's use started again");
    server.shutdown().await.unwrap();
}
