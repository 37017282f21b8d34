//! The open-hold admin calls through the real server: ListReservations (oldest first, by agent, paged,
//! through an app environment's link) and ReleaseAll (one agent's holds or all of them, resolved as a
//! Release resolves them), their refusals, and both across a restart that replays the log.

mod common;

use std::{collections::HashSet, path::Path, sync::Arc};

use common::*;
use quotad::{
    clock::ManualClock,
    durability::journal::Durability,
    proto::{
        CheckAndReserveRequest, ListReservationsRequest, ListReservationsResponse, ReleaseAllRequest,
        ReleaseAllResponse, Reservation, Source,
    },
};
use tonic::{Code, Status};
use tonic_types::StatusExt;

const OTHER_AGENT: &str = "support-triage-agent";

impl TestServer {
    async fn try_list(&self, request: ListReservationsRequest) -> Result<ListReservationsResponse, Status> {
        self.admin.clone().list_reservations(request).await.map(tonic::Response::into_inner)
    }

    /// The first page of up to 1,000 open holds of `environment`, of `agent` if not empty.
    async fn list(&self, environment: &str, agent: &str) -> Vec<Reservation> {
        let request = ListReservationsRequest {
            environment_id: environment.into(),
            agent_id: agent.into(),
            page_size: 1_000,
            page_token: String::new(),
        };
        let page = self.try_list(request).await.expect("ListReservations");
        assert_eq!(page.next_page_token, "", "one page holds them all");
        page.reservations
    }

    async fn try_release_all(&self, environment: &str, agent: &str) -> Result<ReleaseAllResponse, Status> {
        let request = ReleaseAllRequest { environment_id: environment.into(), agent_id: agent.into() };
        self.admin.clone().release_all(request).await.map(tonic::Response::into_inner)
    }

    async fn release_all(&self, environment: &str, agent: &str) -> ReleaseAllResponse {
        self.try_release_all(environment, agent).await.expect("ReleaseAll")
    }

    /// A hold of `messages` for `agent` with a TTL of `ttl_seconds`.
    async fn reserve_for(&self, environment: &str, agent: &str, messages: u64, ttl_seconds: u32) -> String {
        let request =
            CheckAndReserveRequest { agent_id: agent.into(), ttl_seconds, ..reserve_request(environment, messages) };
        self.try_reserve(request).await.expect("CheckAndReserve").reservation_id
    }
}

fn ids(reservations: &[Reservation]) -> Vec<&str> {
    reservations.iter().map(|r| r.reservation_id.as_str()).collect()
}

/// Asserts INVALID_ARGUMENT naming `field` (in the message and a `BadRequest`) and containing `limit`.
#[track_caller]
fn expect_invalid<T: std::fmt::Debug>(result: Result<T, Status>, field: &str, limit: &str) {
    let status = expect_code(result, Code::InvalidArgument);
    let message = status.message();
    assert!(message.starts_with(&format!("{field}: ")), "the message names {field}: {message}");
    assert!(message.contains(limit), "the message says {limit:?}: {message}");
    let bad_request = status.get_details_bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    let fields: Vec<_> = bad_request.field_violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, [field], "{status:?}");
}

#[tokio::test]
async fn open_holds_are_listed_oldest_first_with_what_each_one_holds() {
    // Proves that ListReservations lists exactly the open holds, oldest first, each with its agent,
    // amount, draws, creation and expiry times and rate card version; that an agent filter keeps only
    // that agent's; and that an app environment's name lists the holds of the environment it is linked to.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 10).await;
    server.set_payg("acme-prod", true, 0).await;
    server.link("acme-sales-app", "acme-prod").await;
    let first = server.reserve_for("acme-prod", AGENT, 6, 0).await;
    server.clock.advance_ms(1_500);
    let second = server.reserve_for("acme-sales-app", OTHER_AGENT, 7, 600).await;
    server.clock.advance_ms(1_500);
    let committed = server.reserve_for("acme-prod", AGENT, 1, 0).await;
    server.commit(&committed, 1).await;
    let third = server.reserve_for("acme-prod", AGENT, 2, 0).await;

    let all = server.list("acme-prod", "").await;
    assert_eq!(ids(&all), [&first, &second, &third]);
    let expected_second = Reservation {
        reservation_id: second.clone(),
        agent_id: OTHER_AGENT.into(),
        reserved_milli: milli(7),
        draws: all[1].draws.clone(),
        created_at_unix_ms: START_MS + 1_500,
        expires_at_unix_ms: START_MS + 1_500 + 600_000,
        rate_card_version: 1,
        api_key_id: String::new(),
    };
    assert_eq!(all[1], expected_second);
    assert_eq!(draws(&all[1].draws), [(Source::EnvironmentAllocation, milli(4)), (Source::PayAsYouGo, milli(3))]);
    assert_eq!((all[0].created_at_unix_ms, all[0].expires_at_unix_ms), (START_MS, START_MS + 60_000));
    let reserved: u64 = all.iter().map(|r| r.reserved_milli).sum();
    assert_eq!(reserved, server.balance("acme-prod").await.reserved_milli, "the list adds up to the balance");

    assert_eq!(ids(&server.list("acme-prod", AGENT).await), [&first, &third]);
    assert_eq!(ids(&server.list("acme-prod", OTHER_AGENT).await), [&second]);
    assert!(server.list("acme-prod", "nobody").await.is_empty());
    assert_eq!(server.list("acme-sales-app", "").await, all, "an app environment lists its capacity environment");
}

#[tokio::test]
async fn paging_through_250_holds_takes_three_pages_without_gaps_or_repeats() {
    // Proves that pages of 100 walk 250 holds in three pages, oldest first, each hold once, and that the
    // last page has no next token.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 250).await;
    let mut reserved = Vec::new();
    for _ in 0..250 {
        reserved.push(server.reserve("acme-prod", 1).await.reservation_id);
    }

    let mut listed = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListReservationsRequest {
            environment_id: "acme-prod".into(),
            agent_id: String::new(),
            page_size: 100,
            page_token: token,
        };
        let page = server.try_list(request).await.expect("ListReservations");
        page_sizes.push(page.reservations.len());
        listed.extend(page.reservations.into_iter().map(|r| r.reservation_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(page_sizes, [100, 100, 50]);
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), 250, "no hold is listed twice");
    assert_eq!(listed, reserved, "every hold, oldest first");

    // Page size 0 means 100.
    let default = ListReservationsRequest { environment_id: "acme-prod".into(), ..Default::default() };
    assert_eq!(server.try_list(default).await.unwrap().reservations.len(), 100);
}

#[tokio::test]
async fn bad_page_sizes_tokens_and_ids_are_refused_naming_the_field() {
    // Proves that page_size is accepted up to 1,000 and refused at 1,001, that a token the server did not
    // issue is refused, that ids are checked, each naming its field, and that unknown environments are
    // NOT_FOUND; no refusal changes anything.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 10).await;
    server.reserve("acme-prod", 1).await;
    server.link("acme-sales-app", "acme-prod").await;
    let before = server.balance("acme-prod").await;
    let request = |page_size, token: &str| ListReservationsRequest {
        environment_id: "acme-prod".into(),
        agent_id: String::new(),
        page_size,
        page_token: token.into(),
    };

    for size in [999, 1_000] {
        assert_eq!(server.try_list(request(size, "")).await.unwrap().reservations.len(), 1);
    }
    expect_invalid(server.try_list(request(1_001, "")).await, "page_size", "the limit is 1000");
    for token in ["abc", "-1", "+1", "1.0", "99999999999999999999"] {
        expect_invalid(server.try_list(request(10, token)).await, "page_token", "next_page_token");
    }
    let bad_agent = ListReservationsRequest { agent_id: "x".repeat(129), ..request(10, "") };
    expect_invalid(server.try_list(bad_agent).await, "agent_id", "128 bytes");
    let no_environment = ListReservationsRequest { environment_id: String::new(), ..request(10, "") };
    expect_invalid(server.try_list(no_environment).await, "environment_id", "empty");
    expect_invalid(server.try_release_all("", "").await, "environment_id", "empty");
    expect_invalid(server.try_release_all("acme-prod", "bad agent").await, "agent_id", "printable");

    let ghost = ListReservationsRequest { environment_id: "ghost".into(), ..request(10, "") };
    error_info(&expect_code(server.try_list(ghost).await, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    error_info(&expect_code(server.try_release_all("ghost", "").await, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    // ReleaseAll releases a whole capacity environment's holds, so it must be named, not an app of it.
    let status = expect_code(server.try_release_all("acme-sales-app", "").await, Code::FailedPrecondition);
    error_info(&status, "NOT_A_CAPACITY_ENVIRONMENT");
    assert_eq!(server.balance("acme-prod").await, before);
    assert_eq!(server.list("acme-prod", "").await.len(), 1);
}

#[tokio::test]
async fn releasing_one_agents_holds_leaves_the_others_and_the_balance_exact() {
    // Proves that ReleaseAll with an agent releases exactly that agent's holds, from every source they
    // drew on, and answers with what it released and the balance after; other agents' holds stay.
    let server = spawn_server_with(small_packs(10)).await;
    server.purchase("acme", 3).await;
    server.allocate("acme", "acme-prod", 10, true).await;
    let mine = [server.reserve_for("acme-prod", AGENT, 8, 0).await, server.reserve_for("acme-prod", AGENT, 5, 0).await];
    let theirs = server.reserve_for("acme-prod", OTHER_AGENT, 4, 0).await;
    let before = server.balance("acme-prod").await;
    assert_eq!((before.reserved_milli, before.available_milli), (milli(17), milli(13)));
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, milli(7));

    let released = server.release_all("acme-prod", AGENT).await;
    assert_eq!((released.released_count, released.released_milli), (2, milli(13)));
    let after = server.balance("acme-prod").await;
    assert_eq!(released.balance, Some(after.clone()));
    assert_eq!((after.reserved_milli, after.available_milli), (milli(4), milli(26)));
    assert_eq!(server.tenant("acme").await.tenant_pool_reserved_milli, milli(4), "only theirs holds the pool");
    assert_eq!(ids(&server.list("acme-prod", "").await), [&theirs]);
    for reservation in &mine {
        let status = expect_code(server.try_commit(commit_request(reservation, 1)).await, Code::FailedPrecondition);
        error_info(&status, "ALREADY_RELEASED");
    }
    assert_eq!(server.commit(&theirs, 4).await.charged_milli, milli(4));
}

#[tokio::test]
async fn releasing_everything_resolves_each_hold_as_a_release_and_repeats_as_nothing() {
    // Proves that ReleaseAll without an agent releases every open hold, that each then answers a Commit as
    // a released hold does (refused) and a Release with its first answer, and that a second ReleaseAll
    // releases nothing and changes nothing.
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let a = server.reserve_for("acme-prod", AGENT, 10, 0).await;
    let b = server.reserve_for("acme-prod", OTHER_AGENT, 20, 0).await;
    let committed = server.reserve("acme-prod", 5).await.reservation_id;
    server.commit(&committed, 5).await;

    let released = server.release_all("acme-prod", "").await;
    assert_eq!((released.released_count, released.released_milli), (2, milli(30)));
    let after = released.balance.unwrap();
    assert_eq!((after.reserved_milli, after.available_milli), (0, milli(95)));
    assert!(server.list("acme-prod", "").await.is_empty());

    let status = expect_code(server.try_commit(commit_request(&a, 10)).await, Code::FailedPrecondition);
    error_info(&status, "ALREADY_RELEASED");
    assert_eq!(server.release(&b).await.released_milli, milli(20), "a Release repeats what was released");

    let again = server.release_all("acme-prod", "").await;
    assert_eq!((again.released_count, again.released_milli), (0, 0));
    assert_eq!(again.balance, Some(server.balance("acme-prod").await));
    assert_eq!(server.balance("acme-prod").await, after);
}

/// Removes the newest snapshot, so that the next start restores the one before it and replays the log
/// written since.
fn remove_newest_snapshot(dir: &Path) {
    let covered = |name: &str| name.strip_prefix("snapshot-")?.strip_suffix(".snap")?.parse::<u64>().ok();
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| covered(&name).map(|seq| (seq, name)))
        .max()
        .expect("a snapshot was written at shutdown");
    std::fs::remove_file(dir.join(newest.1)).unwrap();
}

#[tokio::test]
async fn holds_and_a_release_all_survive_a_restart_from_the_snapshot_and_the_log() {
    // Proves that creation and expiry times survive a restart both from a snapshot and from replayed
    // reservations, and that a replayed ReleaseAll releases exactly the holds it released live.
    let dir = tempfile::Builder::new().prefix("holds-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    server.reserve_for("acme-prod", AGENT, 3, 600).await;
    clock.advance_ms(1_000);
    server.reserve_for("acme-prod", OTHER_AGENT, 4, 900).await;
    let in_snapshot = server.list("acme-prod", "").await;
    server.shutdown().await.unwrap();

    // Restored from the shutdown snapshot; what follows is logged after it.
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    assert_eq!(server.list("acme-prod", "").await, in_snapshot);
    clock.advance_ms(1_000);
    let logged = server.reserve_for("acme-prod", AGENT, 5, 300).await;
    server.reserve_for("acme-prod", "third-agent", 6, 0).await;
    let released = server.release_all("acme-prod", AGENT).await;
    assert_eq!((released.released_count, released.released_milli), (2, milli(8)));
    let open_after = server.list("acme-prod", "").await;
    assert_eq!(open_after.len(), 2);
    let balance_after = server.balance("acme-prod").await;
    server.shutdown().await.unwrap();

    remove_newest_snapshot(&dir);
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    let replayed = server.list("acme-prod", "").await;
    assert_eq!(replayed, open_after, "the same holds, with the same times");
    assert_eq!(replayed[1].created_at_unix_ms, START_MS + 2_000, "a replayed hold keeps its creation time");
    assert_eq!(replayed[0].expires_at_unix_ms, START_MS + 1_000 + 900_000);
    assert_eq!(server.balance("acme-prod").await, balance_after);
    let status = expect_code(server.try_commit(commit_request(&logged, 5)).await, Code::FailedPrecondition);
    error_info(&status, "ALREADY_RELEASED");
    assert_eq!(server.release_all("acme-prod", AGENT).await.released_count, 0);
    server.shutdown().await.unwrap();
}
