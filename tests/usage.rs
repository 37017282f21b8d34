//! GetUsage through the real server: charges split exactly across scenarios and sources, grouping
//! and filters, totals equal to the balances, day and month boundaries on the injected clock,
//! retention, the per-tenant key cap, reservation counts, validation, and a restart that reproduces
//! the same report.

mod common;

use std::sync::Arc;

use common::*;
use quotad::{
    clock::ManualClock,
    durability::journal::Durability,
    proto::{CommitRequest, GetUsageRequest, GetUsageResponse, GroupBy, Source, UsageRow},
};
use tonic::{Code, Status};

const ALLOCATION: Source = Source::EnvironmentAllocation;
const POOL: Source = Source::TenantPool;
const PAYG: Source = Source::PayAsYouGo;
const NONE: Source = Source::Unspecified;
const DAY_MS: u64 = 86_400_000;

fn usage_request(tenant: &str, group_by: &[GroupBy]) -> GetUsageRequest {
    GetUsageRequest {
        tenant_id: tenant.into(),
        group_by: group_by.iter().map(|g| *g as i32).collect(),
        ..Default::default()
    }
}

async fn try_usage(server: &TestServer, request: GetUsageRequest) -> Result<GetUsageResponse, Status> {
    server.admin.clone().get_usage(request).await.map(tonic::Response::into_inner)
}

async fn usage(server: &TestServer, tenant: &str, group_by: &[GroupBy]) -> Vec<UsageRow> {
    try_usage(server, usage_request(tenant, group_by)).await.expect("GetUsage").rows
}

/// (scenario, source, charged, overage, granted) of each row.
fn by_scenario_and_source(rows: &[UsageRow]) -> Vec<(&str, Source, u64, u64, u64)> {
    rows.iter()
        .map(|r| (r.scenario.as_str(), r.source(), r.charged_milli, r.overage_milli, r.reservations_granted))
        .collect()
}

/// The sum over a tenant's rows must equal the sum of its environments' balances, to the milli.
async fn assert_totals_match_balances(server: &TestServer, tenant: &str, environments: &[&str]) {
    let total = usage(server, tenant, &[]).await;
    assert_eq!(total.len(), 1, "one total row without grouping");
    let (mut prepaid, mut payg, mut overage) = (0, 0, 0);
    for environment in environments {
        let balance = server.balance(environment).await;
        prepaid += balance.allocation_used_milli + balance.tenant_pool_used_milli;
        payg += balance.payg_used_milli;
        overage += balance.overage_milli;
    }
    let row = &total[0];
    assert_eq!((row.prepaid_milli, row.payg_milli, row.overage_milli), (prepaid, payg, overage));
    assert_eq!(row.charged_milli, prepaid + payg);
}

#[tokio::test]
async fn mixed_usage_items_split_exactly_across_scenarios_and_sources() {
    // Proves that a commit's sources, in draw order, go to its items in request order, so that each
    // scenario's share of each source adds up to exactly what the source was charged, and that use
    // given in messages is reported under `messages`.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 2).await;
    server.allocate("acme", "env", 10, true).await;
    server.set_payg("env", true, 10).await;
    let reservation = server.try_reserve(reserve_usage_request("env", &[("classic_answer", 20)])).await.unwrap();
    assert_eq!(draws(&reservation.draws), [(ALLOCATION, milli(10)), (POOL, milli(10))]);

    // 6 + 15 + 4 = 25 messages: the hold's 20, then 5 from pay-as-you-go.
    let items = usage_items(&[("generative_answer", 3), ("agent_action", 3), ("classic_answer", 4)]);
    let request = CommitRequest { reservation_id: reservation.reservation_id, messages: None, usage: items };
    let committed = server.try_commit(request).await.unwrap();
    assert_eq!(draws(&committed.draws), [(ALLOCATION, milli(10)), (POOL, milli(10)), (PAYG, milli(5))]);
    let by_messages = server.reserve("env", 2).await;
    let committed = server.commit(&by_messages.reservation_id, 3).await;
    assert_eq!(draws(&committed.draws), [(PAYG, milli(3))]);

    let rows = usage(&server, "acme", &[GroupBy::Scenario, GroupBy::Source]).await;
    assert_eq!(
        by_scenario_and_source(&rows),
        [
            ("", NONE, 0, 0, 2),
            ("agent_action", ALLOCATION, 4_000, 0, 0),
            ("agent_action", POOL, 10_000, 0, 0),
            ("agent_action", PAYG, 1_000, 0, 0),
            ("classic_answer", PAYG, 4_000, 0, 0),
            ("generative_answer", ALLOCATION, 6_000, 0, 0),
            ("messages", PAYG, 3_000, 0, 0),
        ]
    );
    assert!(rows.iter().all(|r| r.environment_id.is_empty() && r.agent_id.is_empty() && r.day.is_empty()));
    assert_eq!(rows[2].prepaid_milli, 10_000, "pool use is prepaid");
    assert_eq!(rows[3].payg_milli, 1_000);
    assert_totals_match_balances(&server, "acme", &["env"]).await;
}

#[tokio::test]
async fn overage_is_attributed_to_the_items_no_source_covered() {
    // Proves that use beyond every source is reported as overage of the items it belongs to, with no
    // source, and that totals still equal the balance.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    let reservation = server.reserve("env", 4).await;
    let items = usage_items(&[("agent_action", 1), ("generative_answer", 4)]);
    let request = CommitRequest { reservation_id: reservation.reservation_id, messages: None, usage: items };
    let committed = server.try_commit(request).await.unwrap();
    assert_eq!((committed.charged_milli, committed.overage_milli), (milli(10), milli(3)));

    let rows = usage(&server, "acme", &[GroupBy::Scenario, GroupBy::Source]).await;
    assert_eq!(
        by_scenario_and_source(&rows),
        [
            ("", NONE, 0, 0, 1),
            ("agent_action", ALLOCATION, 5_000, 0, 0),
            ("generative_answer", NONE, 0, 3_000, 0),
            ("generative_answer", ALLOCATION, 5_000, 0, 0),
        ]
    );
    assert_totals_match_balances(&server, "acme", &["env"]).await;
}

#[tokio::test]
async fn rows_group_and_filter_by_environment_and_agent() {
    // Proves grouping by several dimensions (ordered by them in the order asked), the environment
    // filter (an app environment standing for its capacity environment), the agent filter, and that
    // another tenant's use never shows.
    let server = spawn_server().await;
    server.bootstrap("acme", "prod", 1_000).await;
    server.allocate("acme", "dev", 0, true).await;
    server.link("sales-app", "prod").await;
    server.bootstrap("globex", "globex-prod", 100).await;
    for (environment, agent, messages) in [("prod", "b", 3), ("prod", "a", 2), ("dev", "a", 1), ("globex-prod", "a", 7)]
    {
        let mut request = reserve_request(environment, messages);
        request.agent_id = agent.into();
        let reservation = server.try_reserve(request).await.unwrap();
        server.commit(&reservation.reservation_id, messages).await;
    }

    let rows = usage(&server, "acme", &[GroupBy::Environment, GroupBy::Agent]).await;
    let keys: Vec<_> = rows.iter().map(|r| (r.environment_id.as_str(), r.agent_id.as_str(), r.charged_milli)).collect();
    assert_eq!(keys, [("dev", "a", milli(1)), ("prod", "a", milli(2)), ("prod", "b", milli(3))]);
    assert!(rows.iter().all(|r| r.reservations_granted == 1 && r.scenario.is_empty()));

    let rows = usage(&server, "acme", &[GroupBy::Agent, GroupBy::Environment]).await;
    let keys: Vec<_> = rows.iter().map(|r| (r.agent_id.as_str(), r.environment_id.as_str())).collect();
    assert_eq!(keys, [("a", "dev"), ("a", "prod"), ("b", "prod")]);

    let mut request = usage_request("acme", &[GroupBy::Agent]);
    request.environment_id = "sales-app".into();
    let rows = try_usage(&server, request).await.unwrap().rows;
    let keys: Vec<_> = rows.iter().map(|r| (r.agent_id.as_str(), r.charged_milli)).collect();
    assert_eq!(keys, [("a", milli(2)), ("b", milli(3))]);

    let mut request = usage_request("acme", &[]);
    request.agent_id = "a".into();
    let rows = try_usage(&server, request).await.unwrap().rows;
    assert_eq!((rows.len(), rows[0].charged_milli, rows[0].reservations_granted), (1, milli(3), 2));

    let mut request = usage_request("acme", &[]);
    request.environment_id = "globex-prod".into();
    let status = expect_code(try_usage(&server, request).await, Code::FailedPrecondition);
    error_info(&status, "ENVIRONMENT_OF_ANOTHER_TENANT");
    assert_totals_match_balances(&server, "acme", &["prod", "dev"]).await;
    assert_totals_match_balances(&server, "globex", &["globex-prod"]).await;
}

#[tokio::test]
async fn days_and_months_change_at_midnight_utc() {
    // Proves that a charge is reported on the UTC day of its commit, that the default range is the
    // current month so far, and that an explicit range spans months.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 1_000).await;
    // 2026-11-30T23:59:59.999Z, then 2026-12-01T00:00:00Z.
    server.clock.set_ms(NEXT_PERIOD_MS - 1);
    let first = server.reserve("env", 10).await;
    server.commit(&first.reservation_id, 1).await;
    server.clock.set_ms(NEXT_PERIOD_MS);
    let second = server.reserve("env", 10).await;
    server.commit(&second.reservation_id, 2).await;

    let response = try_usage(&server, usage_request("acme", &[GroupBy::Day])).await.unwrap();
    assert_eq!((response.from.as_str(), response.to.as_str()), ("2026-12-01", "2026-12-01"));
    let days: Vec<_> = response.rows.iter().map(|r| (r.day.as_str(), r.charged_milli)).collect();
    assert_eq!(days, [("2026-12-01", milli(2))]);

    let mut request = usage_request("acme", &[GroupBy::Day]);
    request.from = "2026-11-30".into();
    let rows = try_usage(&server, request).await.unwrap().rows;
    let days: Vec<_> = rows.iter().map(|r| (r.day.as_str(), r.charged_milli)).collect();
    assert_eq!(days, [("2026-11-30", milli(1)), ("2026-12-01", milli(2))]);
}

#[tokio::test]
async fn months_beyond_daily_retention_are_served_from_monthly_totals() {
    // Proves that daily rows are kept for the current and two previous months, that older months are
    // served whole from monthly totals (day `YYYY-MM`), and that a range older than twelve months is
    // refused.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 1_000).await;
    for messages in [1, 2] {
        let reservation = server.reserve("env", messages).await;
        server.commit(&reservation.reservation_id, messages).await;
        server.clock.advance_ms(DAY_MS);
    }
    // 2027-02-16: November 2026 is three months back, beyond daily retention.
    server.clock.set_ms(START_MS + 93 * DAY_MS);
    let reservation = server.reserve("env", 4).await;
    server.commit(&reservation.reservation_id, 4).await;

    let mut request = usage_request("acme", &[GroupBy::Day]);
    request.from = "2026-11-16".into();
    let response = try_usage(&server, request).await.unwrap();
    assert_eq!(response.from, "2026-11-01", "a month served from monthly totals is served whole");
    let days: Vec<_> = response.rows.iter().map(|r| (r.day.as_str(), r.charged_milli)).collect();
    assert_eq!(days, [("2026-11", milli(3)), ("2027-02-16", milli(4))]);

    let mut request = usage_request("acme", &[]);
    request.from = "2026-03-01".into();
    assert_eq!(try_usage(&server, request).await.unwrap().rows[0].charged_milli, milli(7));
    let mut request = usage_request("acme", &[]);
    request.from = "2026-02-28".into();
    let status = expect_field(try_usage(&server, request).await, "from");
    assert!(status.message().contains("2026-03-01"), "{status:?}");
}

#[tokio::test]
async fn granted_and_refused_reservations_are_counted_per_agent() {
    // Proves that grants and refusals (for lack of capacity) are counted per agent and day, and that
    // a dry run counts as neither.
    let server = spawn_server_with(small_packs(10)).await;
    server.bootstrap("acme", "env", 10).await;
    server.reserve("env", 6).await;
    let mut dry = reserve_request("env", 1);
    dry.dry_run = true;
    server.try_reserve(dry).await.unwrap();
    expect_depleted(server.try_reserve(reserve_request("env", 5)).await, "env", milli(5), milli(4));
    let mut other_agent = reserve_request("env", 50);
    other_agent.agent_id = "b".into();
    expect_depleted(server.try_reserve(other_agent).await, "env", milli(50), milli(4));

    let rows = usage(&server, "acme", &[GroupBy::Agent, GroupBy::Day]).await;
    let counts: Vec<_> = rows
        .iter()
        .map(|r| (r.agent_id.as_str(), r.day.as_str(), r.reservations_granted, r.reservations_refused))
        .collect();
    assert_eq!(counts, [("b", "2026-11-15", 0, 1), (AGENT, "2026-11-15", 1, 1)]);
}

#[tokio::test]
async fn use_beyond_the_tenants_key_cap_is_reported_under_other() {
    // Proves that once a tenant has used its distinct (environment, agent, scenario) keys for the month,
    // further keys are reported under the agent `other`, and that charges are never refused for it.
    let mut settings = small_packs(100);
    settings.max_usage_keys_per_tenant = 2;
    let server = spawn_server_with(settings).await;
    server.bootstrap("acme", "env", 100).await;
    for agent in ["a", "b"] {
        let mut request = reserve_request("env", 1);
        request.agent_id = agent.into();
        let reservation = server.try_reserve(request).await.unwrap();
        server.commit(&reservation.reservation_id, 1).await;
    }
    let rows = usage(&server, "acme", &[GroupBy::Agent]).await;
    let agents: Vec<_> = rows.iter().map(|r| (r.agent_id.as_str(), r.charged_milli, r.reservations_granted)).collect();
    assert_eq!(agents, [("a", milli(1), 1), ("other", milli(1), 1)]);
    assert_totals_match_balances(&server, "acme", &["env"]).await;
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    // Proves that every malformed request is refused with INVALID_ARGUMENT naming the field, and that an
    // unknown tenant is NOT_FOUND.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    let request = |f: fn(&mut GetUsageRequest)| {
        let mut request = usage_request("acme", &[]);
        f(&mut request);
        request
    };
    type Case = (fn(&mut GetUsageRequest), &'static str);
    let cases: [Case; 10] = [
        (|r| r.tenant_id = String::new(), "tenant_id"),
        (|r| r.environment_id = "x".repeat(129), "environment_id"),
        (|r| r.agent_id = "bad agent".into(), "agent_id"),
        (|r| r.from = "2026-02-30".into(), "from"),
        (|r| r.to = "2026/11/01".into(), "to"),
        (|r| (r.from, r.to) = ("2026-11-10".into(), "2026-11-09".into()), "from"),
        // Only `to`, before the start of the current month that `from` defaults to.
        (|r| r.to = "2026-10-31".into(), "to"),
        (|r| r.group_by = vec![GroupBy::Unspecified as i32], "group_by[0]"),
        (|r| r.group_by = vec![GroupBy::Day as i32, 42], "group_by[1]"),
        (|r| r.group_by = vec![GroupBy::Day as i32, GroupBy::Agent as i32, GroupBy::Day as i32], "group_by[2]"),
    ];
    for (change, field) in cases {
        expect_field(try_usage(&server, request(change)).await, field);
    }
    let status = expect_code(try_usage(&server, usage_request("nobody", &[])).await, Code::NotFound);
    error_info(&status, "UNKNOWN_TENANT");
    let all = [GroupBy::Environment, GroupBy::Agent, GroupBy::Scenario, GroupBy::Source, GroupBy::Day];
    assert!(try_usage(&server, usage_request("acme", &all)).await.is_ok(), "each dimension once is fine");
}

#[tokio::test]
async fn a_restart_reproduces_the_same_report_but_refusals_from_zero() {
    // Proves that the roll-ups are rebuilt exactly from the snapshot and the log, over two days, and that
    // refused counts (not logged) start again from zero, as documented.
    let dir = tempfile::Builder::new().prefix("usage-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    server.bootstrap("acme", "env", 1_000).await;
    let reservation = server.try_reserve(reserve_usage_request("env", &[("agent_action", 2)])).await.unwrap();
    let items = usage_items(&[("agent_action", 1), ("ai_tools_basic", 3)]);
    let request = CommitRequest { reservation_id: reservation.reservation_id, messages: None, usage: items };
    server.try_commit(request).await.unwrap();
    clock.advance_ms(DAY_MS);
    let reservation = server.reserve("env", 10).await;
    server.commit(&reservation.reservation_id, 12).await;
    expect_code(server.try_reserve(reserve_request("env", 5_000)).await, Code::ResourceExhausted);
    let all = [GroupBy::Environment, GroupBy::Agent, GroupBy::Scenario, GroupBy::Source, GroupBy::Day];
    let before = usage(&server, "acme", &all).await;
    assert_eq!(before.iter().map(|r| r.reservations_refused).sum::<u64>(), 1);
    server.shutdown().await.unwrap();

    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    let after = usage(&server, "acme", &all).await;
    let logged = |rows: &[UsageRow]| {
        rows.iter()
            .map(|r| UsageRow { reservations_refused: 0, ..r.clone() })
            .filter(|r| r.charged_milli + r.overage_milli + r.reservations_granted > 0)
            .collect::<Vec<_>>()
    };
    assert_eq!(logged(&after), logged(&before));
    assert_eq!(after.iter().map(|r| r.reservations_refused).sum::<u64>(), 0);
    assert_totals_match_balances(&server, "acme", &["env"]).await;

    // Once more, with the restored roll-ups added to before the next snapshot. (Replay of the log
    // after a snapshot is proved over random histories in `restore_properties`.)
    let reservation = server.reserve("env", 1).await;
    server.commit(&reservation.reservation_id, 1).await;
    let before = usage(&server, "acme", &all).await;
    server.shutdown().await.unwrap();
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    assert_eq!(logged(&usage(&server, "acme", &all).await), logged(&before));
    server.shutdown().await.unwrap();
}
