//! Alerts through the real server: each level crossing fires once (environment low, depleted and
//! restored; agents nearing and over their limit; budget thresholds; a tenant's capacity and grace),
//! the recent-alerts log, live watches with their initial levels, a watcher that never reads, and
//! alerts across a restart.

mod common;

use std::sync::Arc;

use common::*;
use quotad::{
    clock::ManualClock,
    durability::journal::Durability,
    proto::{
        Alert, AlertKind, CheckAndReserveRequest, ListAlertsRequest, SetAgentLimitRequest, SetEnvironmentAlertsRequest,
        SetTenantPolicyRequest, WatchAlertsRequest, quota_admin_client::QuotaAdminClient,
    },
};
use tonic::{Code, Streaming};

async fn alerts(server: &TestServer, tenant: &str) -> Vec<Alert> {
    let request = ListAlertsRequest { tenant_id: tenant.into(), page_size: 1_000, ..Default::default() };
    server.admin.clone().list_alerts(request).await.unwrap().into_inner().alerts
}

fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, String, u32)> {
    alerts.iter().map(|a| (a.kind(), a.environment_id.clone(), a.threshold_percent)).collect()
}

async fn watch(server: &TestServer, tenant: &str, environment: &str) -> Streaming<Alert> {
    let request = WatchAlertsRequest { tenant_id: tenant.into(), environment_id: environment.into() };
    server.admin.clone().watch_alerts(request).await.unwrap().into_inner()
}

async fn next(stream: &mut Streaming<Alert>) -> Alert {
    bounded("the next alert", stream.message()).await.unwrap().expect("the watch is open")
}

/// `acme-payg`: no allocation, pay-as-you-go with a budget of 100 messages, and agent `bot` limited to
/// 50 messages a month.
async fn capped_bot_on_payg(server: &TestServer) {
    server.allocate("acme", "acme-payg", 0, false).await;
    server.set_payg("acme-payg", true, 100).await;
    let limit = SetAgentLimitRequest {
        environment_id: "acme-payg".into(),
        agent_id: "bot".into(),
        monthly_limit_messages: 50,
        ..Default::default()
    };
    server.admin.clone().set_agent_limit(limit).await.unwrap();
}

fn hold(environment: &str, agent: &str, messages: u64) -> CheckAndReserveRequest {
    CheckAndReserveRequest { agent_id: agent.into(), ttl_seconds: 3_600, ..reserve_request(environment, messages) }
}

#[tokio::test]
async fn environment_levels_alert_once_per_crossing() {
    // Proves: LOW fires when what is available falls to 20% of the allocation, DEPLETED when nothing is,
    // LOW again when some capacity comes back and RESTORED once it is above the threshold; nothing
    // repeats while a level holds, and a new crossing fires again. Each alert carries the balance, the time and a message.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let a = server.reserve("acme-prod", 79).await;
    assert!(alerts(&server, "acme").await.is_empty(), "21% left is not low");
    let b = server.reserve("acme-prod", 1).await;
    let c = server.reserve("acme-prod", 5).await;
    let d = server.reserve("acme-prod", 15).await;
    expect_code(server.try_reserve(reserve_request("acme-prod", 1)).await, Code::ResourceExhausted);
    for held in [&d, &c, &b] {
        server.release(&held.reservation_id).await;
    }
    server.release(&a.reservation_id).await;
    server.reserve("acme-prod", 85).await;

    let log = alerts(&server, "acme").await;
    use AlertKind::*;
    let env = || "acme-prod".to_owned();
    assert_eq!(
        kinds(&log),
        [
            (EnvironmentLow, env(), 20),
            (EnvironmentDepleted, env(), 0),
            (EnvironmentLow, env(), 20),
            (EnvironmentRestored, env(), 0),
            (EnvironmentLow, env(), 20)
        ],
        "{log:#?}"
    );
    let depleted = &log[1];
    assert_eq!(depleted.balance.as_ref().unwrap().available_milli, 0);
    assert_eq!(depleted.at_unix_ms, START_MS);
    assert!(depleted.message.contains("acme-prod") && depleted.message.contains("depleted"), "{}", depleted.message);
    assert!(!depleted.initial);
}

#[tokio::test]
async fn agents_budgets_and_tenants_alert_at_their_thresholds() {
    // Proves: an agent alerts when its use reaches notify_percent and again at its limit; pay-as-you-go
    // alerts at 80% and 100% of the budget (both, in order, when one commit crosses both); a tenant
    // alerts when its prepaid capacity is used and when its grace is exhausted; each once.
    let server = spawn_server().await;
    let pack = server.pack_messages;
    server.purchase("acme", 1).await;
    server.allocate("acme", "acme-prod", 0, true).await;
    capped_bot_on_payg(&server).await;

    for messages in [39, 1, 5, 10, 1] {
        let held = server.try_reserve(hold("acme-payg", "bot", messages)).await.unwrap();
        server.commit(&held.reservation_id, messages).await;
    }
    let other = server.try_reserve(hold("acme-payg", "other", 44)).await.unwrap();
    server.commit(&other.reservation_id, 44).await;

    let policy =
        SetTenantPolicyRequest { tenant_id: "acme".into(), overage_grace_percent: 110, time_zone: String::new() };
    server.admin.clone().set_tenant_policy(policy).await.unwrap();
    let all = server.reserve("acme-prod", pack).await;
    server.commit(&all.reservation_id, pack).await;
    server.reserve("acme-prod", pack / 10).await;

    let log = alerts(&server, "acme").await;
    use AlertKind::*;
    let summary: Vec<_> = log
        .iter()
        .filter(|a| !matches!(a.kind(), EnvironmentLow | EnvironmentDepleted | EnvironmentRestored))
        .map(|a| (a.kind(), a.agent_id.as_str(), a.threshold_percent, a.used_milli, a.limit_milli))
        .collect();
    assert_eq!(
        summary,
        [
            (AgentNearingLimit, "bot", 80, milli(40), milli(50)),
            (AgentOverLimit, "bot", 100, milli(55), milli(50)),
            (BudgetThreshold, "", 80, milli(100), milli(100)),
            (BudgetThreshold, "", 100, milli(100), milli(100)),
            (TenantCapacityUsed, "", 100, milli(pack), milli(pack)),
            (TenantGraceExhausted, "", 110, milli(pack + pack / 10), milli(pack + pack / 10)),
        ],
        "{log:#?}"
    );
    let tenant_alert = log.iter().find(|a| a.kind() == TenantCapacityUsed).unwrap();
    assert!(tenant_alert.environment_id.is_empty() && tenant_alert.balance.is_none());
}

#[tokio::test]
async fn agent_and_budget_thresholds_alert_again_in_the_next_period() {
    // Proves: a new billing period re-arms agent and budget alerts with the use they measure, so an
    // agent over its limit, or a budget past a threshold, in two months in a row alerts in both.
    let server = spawn_server().await;
    server.purchase("acme", 1).await;
    capped_bot_on_payg(&server).await;
    for (agent, messages) in [("bot", 60), ("other", 30)] {
        let held = server.try_reserve(hold("acme-payg", agent, messages)).await.unwrap();
        server.commit(&held.reservation_id, messages).await;
    }
    // Held just before the month ends and committed in the next: the first event of December is the
    // commit that crosses the thresholds again.
    server.clock.set_ms(NEXT_PERIOD_MS - 60_000);
    let mut grants = Vec::new();
    for (agent, messages) in [("bot", 60), ("other", 30)] {
        // A small hold; the commit takes the rest from what December has available.
        grants.push((server.try_reserve(hold("acme-payg", agent, 1)).await.unwrap().reservation_id, messages));
    }
    server.clock.set_ms(NEXT_PERIOD_MS);
    for (reservation, messages) in grants {
        server.commit(&reservation, messages).await;
    }
    let log = alerts(&server, "acme").await;
    let of = |kind: AlertKind| log.iter().filter(|a| a.kind() == kind).map(|a| a.threshold_percent).collect::<Vec<_>>();
    assert_eq!(of(AlertKind::AgentOverLimit), [100, 100], "{log:#?}");
    assert_eq!(of(AlertKind::BudgetThreshold), [80, 80], "90 of 100 in each month: {log:#?}");
}

#[tokio::test]
async fn a_lower_low_threshold_is_configurable_and_validated() {
    // Proves: SetEnvironmentAlerts moves the LOW threshold (and budget thresholds); bad values are
    // INVALID_ARGUMENT naming the field and change nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let request = |low_percent, budget: Vec<u32>| SetEnvironmentAlertsRequest {
        environment_id: "acme-prod".into(),
        low_percent,
        budget_threshold_percents: budget,
    };
    for (bad, field) in [
        (request(101, vec![]), "low_percent"),
        (request(50, vec![0]), "budget_threshold_percents[0]"),
        (request(50, vec![10, 20, 30, 40, 50]), "budget_threshold_percents"),
    ] {
        let status = expect_code(server.admin.clone().set_environment_alerts(bad).await, Code::InvalidArgument);
        assert!(status.message().starts_with(&format!("{field}:")), "{}", status.message());
    }
    let balance = server.admin.clone().set_environment_alerts(request(50, vec![])).await.unwrap().into_inner();
    assert_eq!(balance.low_percent, 50);
    server.reserve("acme-prod", 50).await;
    assert_eq!(kinds(&alerts(&server, "acme").await), [(AlertKind::EnvironmentLow, "acme-prod".into(), 50)]);
}

#[tokio::test]
async fn a_watch_starts_with_current_levels_then_streams_new_alerts() {
    // Proves: WatchAlerts first sends each matching environment's level (initial), then every new alert
    // as it fires; a filter on one environment sees only its alerts; several watches see the same;
    // unknown tenants and environments of another tenant are NOT_FOUND.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    server.allocate("acme", "acme-dev", 0, false).await;
    server.bootstrap("globex", "globex-prod", 100).await;

    let mut everything = watch(&server, "acme", "").await;
    let mut prod_only = watch(&server, "acme", "acme-prod").await;
    let first = [next(&mut everything).await, next(&mut everything).await];
    assert!(first.iter().all(|a| a.initial));
    let levels: Vec<_> = first.iter().map(|a| (a.environment_id.as_str(), a.kind())).collect();
    assert_eq!(levels, [("acme-dev", AlertKind::EnvironmentDepleted), ("acme-prod", AlertKind::EnvironmentRestored)]);
    let only = next(&mut prod_only).await;
    assert_eq!((only.environment_id.as_str(), only.initial), ("acme-prod", true));

    server.reserve("globex-prod", 90).await;
    server.reserve("acme-prod", 90).await;
    for stream in [&mut everything, &mut prod_only] {
        let live = next(stream).await;
        assert_eq!(
            (live.kind(), live.environment_id.as_str(), live.initial),
            (AlertKind::EnvironmentLow, "acme-prod", false)
        );
    }

    let request = WatchAlertsRequest { tenant_id: "nobody".into(), environment_id: String::new() };
    expect_code(server.admin.clone().watch_alerts(request).await, Code::NotFound);
    let request = WatchAlertsRequest { tenant_id: "acme".into(), environment_id: "globex-prod".into() };
    expect_code(server.admin.clone().watch_alerts(request).await, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_neither_blocks_reservations_nor_queues_without_bound() {
    // Proves: with one watch that is never read, thousands of alerts go on firing (reservations are
    // answered as usual), and when the watcher reads again it is told it lagged, then given the current
    // level, rather than an unbounded backlog.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    // A small HTTP/2 window, so that the transport's buffers fill after a few dozen alerts.
    let small_window = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .connect()
        .await
        .unwrap();
    let request = WatchAlertsRequest { tenant_id: "acme".into(), environment_id: "acme-prod".into() };
    let mut stalled = QuotaAdminClient::new(small_window).watch_alerts(request).await.unwrap().into_inner();
    let mut reading = watch(&server, "acme", "acme-prod").await;
    assert!(next(&mut stalled).await.initial);
    assert!(next(&mut reading).await.initial);

    let cycles = 3_000;
    bounded("reservations while a watcher stalls", async {
        for _ in 0..cycles {
            let held = server.reserve("acme-prod", 90).await;
            server.release(&held.reservation_id).await;
        }
    })
    .await;
    let mut received = 0;
    while received < 2 * cycles {
        let alert = next(&mut reading).await;
        if alert.kind() == AlertKind::Lagged {
            continue;
        }
        received += usize::from(!alert.initial);
    }

    let mut seen = Vec::new();
    loop {
        let alert = next(&mut stalled).await;
        let kind = alert.kind();
        seen.push(kind);
        if kind == AlertKind::Lagged {
            let level = next(&mut stalled).await;
            assert!(level.initial && level.kind() == AlertKind::EnvironmentRestored, "{level:?}");
            break;
        }
        assert!(seen.len() < 2 * cycles, "the stalled watch received every alert instead of a lag marker");
    }
}

#[tokio::test]
async fn alerts_are_neither_repeated_nor_lost_across_restarts() {
    // Proves: the recent-alerts log and the levels already alerted survive a restart from the log and
    // one from the shutdown snapshot: a level that held across the restart does not fire again, and a
    // new crossing after it does.
    let dir = tempfile::Builder::new().prefix("alerts-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(dir.path(), Durability::Write), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    server.reserve("acme-prod", 85).await;
    let before = alerts(&server, "acme").await;
    assert_eq!(before.len(), 1);
    server.shutdown().await.unwrap();

    let server = spawn_server_with_config(config_on(dir.path(), Durability::Write), clock.clone()).await;
    assert_eq!(alerts(&server, "acme").await, before, "the log survives");
    server.reserve("acme-prod", 5).await;
    assert_eq!(alerts(&server, "acme").await, before, "still low: nothing new");
    server.reserve("acme-prod", 10).await;
    let after = alerts(&server, "acme").await;
    assert_eq!(after.last().map(Alert::kind), Some(AlertKind::EnvironmentDepleted));
    server.shutdown().await.unwrap();

    let server = spawn_server_with_config(config_on(dir.path(), Durability::Write), clock).await;
    assert_eq!(alerts(&server, "acme").await, after);
    server.shutdown().await.unwrap();
}
