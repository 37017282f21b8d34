//! `quotad admin`, the admin command line, through the real binary against a real server on an
//! ephemeral port: the admin flow and what it prints in each format, errors and their exit codes,
//! the bearer token on every call, and API keys.

mod common;

use std::{collections::HashMap, net::SocketAddr, process::Stdio};

use common::*;
use quotad::proto::{
    Balance, CheckAndReserveBatchRequest, CheckAndReserveBatchResponse, CheckAndReserveRequest,
    CheckAndReserveResponse, CommitBatchRequest, CommitBatchResponse, CommitRequest, CommitResponse, GetBalanceRequest,
    ReleaseBatchRequest, ReleaseBatchResponse, ReleaseRequest, ReleaseResponse,
    quota_server::{Quota, QuotaServer},
};
use tokio::net::TcpListener;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

/// What one run of `quotad admin` did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `quotad admin --server <server> <args>` to completion, bounded.
async fn admin(server: &str, args: &[&str]) -> Run {
    admin_with_env(server, args, &[]).await
}

async fn admin_with_env(server: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let args: Vec<&str> = ["--server", server].iter().chain(args).copied().collect();
    admin_exactly(&args, env).await
}

/// Runs `quotad admin <args>` with no other flags, and `env` on top of an environment without
/// `QUOTAD_*` variables.
async fn admin_exactly(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = quotad_binary();
    command.arg("admin").args(args).envs(env.iter().copied()).stdout(Stdio::piped());
    let output = bounded("quotad admin", command.output()).await.expect("run quotad admin");
    Run {
        code: output.status.code().expect("quotad admin exits rather than being killed"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// Runs a command that must succeed, and returns its stdout.
async fn admin_ok(server: &str, args: &[&str]) -> String {
    let run = admin(server, args).await;
    assert_eq!(run.code, 0, "quotad admin {args:?}: {run:?}");
    assert!(run.stderr.is_empty(), "quotad admin {args:?} printed on stderr: {run:?}");
    run.stdout
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A record printed as a table: `field  value` lines.
fn table_record(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .map(|line| match line.split_once(' ') {
            Some((name, value)) => (name.to_owned(), value.trim_start().to_owned()),
            None => (line.to_owned(), String::new()),
        })
        .collect()
}

/// A record printed as CSV: a header row and one row (the values here need no quoting).
fn csv_record(stdout: &str) -> HashMap<String, String> {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one row: {stdout}");
    assert!(!stdout.contains('"'), "{stdout}");
    lines[0].split(',').map(str::to_owned).zip(lines[1].split(',').map(str::to_owned)).collect()
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn the_admin_flow_prints_each_answer_in_every_format() {
    // Proves that purchase → allocate → set-payg → link → tenant → balance work through the binary, and
    // that table and CSV show amounts in messages with 3 decimals and JSON the raw proto fields.
    let server = spawn_server().await;
    let url = url(server.addr);

    let purchased = table_record(&admin_ok(&url, &["purchase", "--tenant-id", "acme", "--packs", "2"]).await);
    assert_eq!(purchased["tenant_id"], "acme");
    assert_eq!(purchased["purchased"], "50000.000");

    let allocated = admin_ok(
        &url,
        &[
            "allocate",
            "--tenant",
            "acme",
            "--environment",
            "acme-prod",
            "--messages",
            "12000",
            "--draw-from-tenant-pool",
        ],
    )
    .await;
    let allocated = table_record(&allocated);
    assert_eq!((allocated["allocated"].as_str(), allocated["draw_from_tenant_pool"].as_str()), ("12000.000", "true"));

    let payg = args_of("set-payg --environment-id acme-prod --enabled true --monthly-budget-messages 500");
    let payg = table_record(&admin_ok(&url, &payg).await);
    assert_eq!((payg["payg_enabled"].as_str(), payg["payg_budget"].as_str()), ("true", "500.000"));

    let link = args_of("link --app-environment-id acme-sales-app --environment-id acme-prod --format csv");
    let link = csv_record(&admin_ok(&url, &link).await);
    assert_eq!((link["environment_id"].as_str(), link["tenant_id"].as_str()), ("acme-prod", "acme"));

    let tenant = json(&admin_ok(&url, &["tenant", "acme", "--format", "json"]).await);
    assert_eq!(tenant["purchased_milli"], milli(50_000));
    assert_eq!(tenant["allocated_milli"], milli(12_000));
    assert_eq!(tenant["unallocated_milli"], milli(38_000));

    // 50 flow actions at 13 messages per 100: 6.5 messages, a charge that is not whole.
    let hold = server.reserve("acme-sales-app", 10).await;
    let usage = usage_items(&[("agent_flow_actions", 50)]);
    server.try_commit(CommitRequest { reservation_id: hold.reservation_id, messages: None, usage }).await.unwrap();

    let table = table_record(&admin_ok(&url, &["balance", "acme-sales-app"]).await);
    assert_eq!(table["environment_id"], "acme-prod", "an app environment answers with its capacity environment");
    assert_eq!(table["tenant_id"], "acme");
    assert_eq!(table["allocated"], "12000.000");
    assert_eq!(table["allocation_used"], "6.500");
    assert_eq!(table["reserved"], "0.000");
    assert_eq!(table["available"], "50493.500", "12,000 − 6.5 allocated, the 38,000 pool, the 500 budget");
    assert_eq!(table["state"], "ok");

    let csv = csv_record(&admin_ok(&url, &["--format", "csv", "balance", "acme-sales-app"]).await);
    assert_eq!(csv, table, "CSV carries the same columns and cells as the table");

    let balance = json(&admin_ok(&url, &["balance", "acme-sales-app", "--format", "json"]).await);
    assert_eq!(balance["environment_id"], "acme-prod");
    assert_eq!(balance["allocated_milli"], milli(12_000));
    assert_eq!(balance["allocation_used_milli"], 6_500);
    assert_eq!(balance["available_milli"], 50_493_500);
    assert_eq!(balance["payg_enabled"], true);
    assert_eq!(balance["state"], "STATE_OK");
    assert_eq!(balance, json(&admin_ok(&url, &["balance", "acme-prod", "--format", "json"]).await));
}

fn args_of(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test]
async fn a_refusal_exits_1_naming_the_code_and_the_environment() {
    // Proves that a gRPC error is one line on stderr, `quotad admin: <command>: <CODE>: <message>`, with
    // exit code 1 and nothing on stdout.
    let server = spawn_server().await;
    let run = admin(&url(server.addr), &["balance", "no-such-env"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(run.stderr.starts_with("quotad admin: balance: NOT_FOUND: "), "{run:?}");
    assert!(run.stderr.contains("no-such-env"), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");

    let run = admin(&url(server.addr), &["purchase", "--tenant-id", "acme", "--packs", "0"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.starts_with("quotad admin: purchase: INVALID_ARGUMENT: packs"), "{run:?}");
}

#[tokio::test]
async fn billing_policy_usage_and_alerts_through_the_command_line() {
    // Proves that the policy, agent-limit, usage and alert commands reach the server and print what it
    // answers: a tenant's grace and time zone, an agent's limit and use (CSV), a usage report grouped by
    // agent (CSV), and the alert log (JSON).
    let server = spawn_server().await;
    let url = url(server.addr);
    server.bootstrap("acme", "acme-prod", 100).await;
    let policy = table_record(
        &admin_ok(
            &url,
            &[
                "set-tenant-policy",
                "--tenant-id",
                "acme",
                "--overage-grace-percent",
                "125",
                "--time-zone",
                "Europe/Paris",
            ],
        )
        .await,
    );
    assert_eq!((policy["overage_grace_percent"].as_str(), policy["time_zone"].as_str()), ("125", "Europe/Paris"));
    admin_ok(
        &url,
        &["set-agent-limit", "--environment-id", "acme-prod", "--agent-id", AGENT, "--monthly-limit-messages", "90"],
    )
    .await;
    let held = server.reserve("acme-prod", 85).await;
    server.commit(&held.reservation_id, 85).await;

    let limits =
        csv_record(&admin_ok(&url, &["agent-limits", "--environment-id", "acme-prod", "--format", "csv"]).await);
    assert_eq!((limits["agent_id"].as_str(), limits["used"].as_str()), (AGENT, "85.000"), "{limits:?}");
    let usage =
        csv_record(&admin_ok(&url, &["usage", "--tenant-id", "acme", "--group-by", "agent", "--format", "csv"]).await);
    assert_eq!((usage["agent_id"].as_str(), usage["charged"].as_str()), (AGENT, "85.000"), "{usage:?}");
    let alerts = json(&admin_ok(&url, &["alerts", "--tenant-id", "acme", "--format", "json"]).await);
    let kinds: Vec<&str> = alerts.as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"ALERT_KIND_ENVIRONMENT_LOW") && kinds.contains(&"ALERT_KIND_AGENT_NEARING_LIMIT"),
        "{alerts}"
    );

    let run = admin(&url, &["set-tenant-policy", "--tenant-id", "acme", "--time-zone", "Mars/Olympus"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.starts_with("quotad admin: set-tenant-policy: INVALID_ARGUMENT: time_zone"), "{run:?}");
}

#[tokio::test]
async fn watch_alerts_prints_the_current_level_then_each_alert_as_it_fires() {
    // Proves that `watch-alerts` prints one line per alert as it arrives: the initial level first, then a
    // live alert caused after the watch started.
    use tokio::io::{AsyncBufReadExt, BufReader};
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let mut command = quotad_binary();
    command
        .args(["admin", "--server", &url(server.addr), "watch-alerts", "--tenant-id", "acme", "--format", "json"])
        .stdout(Stdio::piped());
    let mut child = command.spawn().expect("start quotad admin watch-alerts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || bounded("a line from watch-alerts", lines.next_line()).await.unwrap().expect("a line");
    let initial = json(&next_line().await);
    assert_eq!(
        (initial["kind"].as_str(), initial["initial"].as_bool()),
        (Some("ALERT_KIND_ENVIRONMENT_RESTORED"), Some(true))
    );
    server.reserve("acme-prod", 100).await;
    let live = json(&next_line().await);
    assert_eq!(live["kind"].as_str(), Some("ALERT_KIND_ENVIRONMENT_DEPLETED"), "{live}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_server_nobody_listens_on_exits_69() {
    // Proves that an unreachable server is EX_UNAVAILABLE (69), with the address in the message.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let run = admin(&url(addr), &["balance", "acme-prod", "--timeout", "5s"]).await;
    assert_eq!(run.code, 69, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(run.stderr.starts_with("quotad admin: balance: UNAVAILABLE: cannot reach "), "{run:?}");
    assert!(run.stderr.contains(&addr.to_string()), "{run:?}");
}

#[tokio::test]
async fn usage_errors_exit_64_and_help_exits_0() {
    // Proves that clap's usage errors (unknown command, bad value, missing flag, bad format) exit 64 before
    // any connection is made, and that help goes to stdout with exit 0 and lists the exit codes.
    let nowhere = "http://127.0.0.1:9";
    for args in [
        &["frobnicate"][..],
        &[],
        &["purchase", "--tenant-id", "acme", "--packs", "many"],
        &["allocate", "--tenant-id", "acme"],
        &["balance", "x", "--format", "xml"],
        &["set-rate-card", "--rate", "agent_flow_actions=13"],
        &["set-rate-card", "--rate", "a=1/1", "--effective-at", "next tuesday"],
        &["balance", "x", "--timeout", "0s"],
    ] {
        let run = admin(nowhere, args).await;
        assert_eq!(run.code, 64, "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{args:?}: {run:?}");
    }
    let run = admin_exactly(&["balance", "x"], &[("QUOTAD_SERVER", "https://quotad.example")]).await;
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("TLS"), "{run:?}");

    let help = admin(nowhere, &["--help"]).await;
    assert_eq!(help.code, 0, "{help:?}");
    assert!(help.stdout.contains("Exit codes") && help.stdout.contains("69"), "{help:?}");
}

#[tokio::test]
async fn the_server_help_keeps_its_flags_and_names_the_admin_command_line() {
    // Proves that without `admin` first the server's own parser answers, and that its help points to
    // `quotad admin`. (tests/lifecycle.rs starts and stops the server binary itself.)
    let mut command = quotad_binary();
    command.arg("--help").stdout(Stdio::piped());
    let output = bounded("quotad --help", command.output()).await.unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--listen") && help.contains("quotad admin"), "{help}");
}

// The bearer token, against a stand-in Quota service that demands it.

const TOKEN: &str = "s3cret-t0ken";

/// Answers GetBalance with an empty balance of the environment asked for; the interceptor in front of
/// it refuses calls without the right token.
struct BalanceOnly;

#[tonic::async_trait]
impl Quota for BalanceOnly {
    async fn check_and_reserve(
        &self,
        _: Request<CheckAndReserveRequest>,
    ) -> Result<Response<CheckAndReserveResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn commit(&self, _: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn release(&self, _: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<Balance>, Status> {
        let environment_id = request.into_inner().environment_id;
        Ok(Response::new(Balance { environment_id, ..Balance::default() }))
    }

    async fn check_and_reserve_batch(
        &self,
        _: Request<CheckAndReserveBatchRequest>,
    ) -> Result<Response<CheckAndReserveBatchResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn commit_batch(&self, _: Request<CommitBatchRequest>) -> Result<Response<CommitBatchResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn release_batch(&self, _: Request<ReleaseBatchRequest>) -> Result<Response<ReleaseBatchResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }
}

fn require_token(request: Request<()>) -> Result<Request<()>, Status> {
    match request.metadata().get("authorization").map(|value| value.to_str()) {
        Some(Ok(value)) if value == format!("Bearer {TOKEN}") => Ok(request),
        Some(_) => Err(Status::permission_denied("wrong token")),
        None => Err(Status::unauthenticated("no authorization header")),
    }
}

#[tokio::test]
async fn the_token_is_sent_as_a_bearer_header_and_never_printed() {
    // Proves that `--token` and `QUOTAD_TOKEN` send `authorization: Bearer <token>`, that no header is
    // sent without one, and that the token appears in no output, help included.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = url(listener.local_addr().unwrap());
    let serving = tokio::spawn(
        Server::builder()
            .add_service(QuotaServer::with_interceptor(BalanceOnly, require_token))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let by_flag = admin(&url, &["balance", "acme-prod", "--token", TOKEN]).await;
    assert_eq!(by_flag.code, 0, "{by_flag:?}");
    assert_eq!(table_record(&by_flag.stdout)["environment_id"], "acme-prod");

    let by_env = admin_with_env(&url, &["balance", "acme-prod"], &[("QUOTAD_TOKEN", TOKEN)]).await;
    assert_eq!(by_env.code, 0, "{by_env:?}");

    let without = admin(&url, &["balance", "acme-prod"]).await;
    assert_eq!(without.code, 1, "{without:?}");
    assert!(without.stderr.starts_with("quotad admin: balance: UNAUTHENTICATED: "), "{without:?}");

    let wrong = admin(&url, &["balance", "acme-prod", "--token", "not-the-token"]).await;
    assert!(wrong.stderr.starts_with("quotad admin: balance: PERMISSION_DENIED: "), "{wrong:?}");

    let help = admin_with_env(&url, &["balance", "--help"], &[("QUOTAD_TOKEN", TOKEN)]).await;
    assert_eq!(help.code, 0, "{help:?}");
    for run in [&by_flag, &by_env, &without, &help] {
        assert!(!run.stdout.contains(TOKEN) && !run.stderr.contains(TOKEN), "the token was printed: {run:?}");
    }
    serving.abort();
}

#[tokio::test]
async fn api_keys_are_created_listed_and_revoked_and_the_secret_is_printed_once() {
    // Proves that against a server with authentication on, `api-key create` prints the new key with its
    // secret on stdout, that the secret works for agent calls (`balance --token`), that `api-key list`
    // shows the key without it, and that after `api-key revoke` the secret is refused; admin commands
    // without the admin token are UNAUTHENTICATED.
    use std::sync::Arc;

    use quotad::{
        auth::AdminToken,
        clock::ManualClock,
        config::{AuthConfig, Config, Settings},
    };
    const ADMIN_TOKEN: &str = "cli-admin-token-0123456789";
    let config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    let config = Config { auth: AuthConfig::on(Some(AdminToken::new(ADMIN_TOKEN).unwrap())), ..config };
    let server = spawn_server_as_configured(config, Arc::new(ManualClock::new(START_MS))).await;
    let url = url(server.addr);
    fn with_token<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [&["--token", ADMIN_TOKEN][..], args].concat()
    }
    admin_ok(&url, &with_token(&["purchase", "--tenant", "acme", "--packs", "1"])).await;
    admin_ok(&url, &with_token(&["allocate", "--tenant", "acme", "--environment", "acme-prod", "--messages", "10"]))
        .await;

    let created = admin_ok(
        &url,
        &with_token(&["api-key", "create", "--tenant", "acme", "--environment", "acme-prod", "--description", "cli"]),
    )
    .await;
    let created = table_record(&created);
    let (key_id, secret) = (created["key_id"].clone(), created["secret"].clone());
    assert!(secret.starts_with(&format!("qk_{key_id}_")), "{created:?}");
    assert_eq!((created["tenant_id"].as_str(), created["environment_ids"].as_str()), ("acme", "acme-prod"));

    let balance = table_record(&admin_ok(&url, &["balance", "acme-prod", "--token", &secret]).await);
    assert_eq!(balance["allocated"], "10.000");
    let listed = admin_ok(&url, &with_token(&["api-key", "list", "--tenant", "acme", "--format", "json"])).await;
    assert!(!listed.contains(&secret[20..]), "the list shows the secret: {listed}");
    let listed = json(&listed);
    assert_eq!(listed[0]["key_id"], key_id.as_str());
    assert_eq!(listed[0]["environment_ids"], serde_json::json!(["acme-prod"]));
    assert_eq!(listed[0]["last_used_unix_ms"], START_MS);
    assert!(listed[0].get("secret").is_none(), "{listed}");

    let without = admin(&url, &["api-key", "list", "--tenant", "acme"]).await;
    assert_eq!(without.code, 1, "{without:?}");
    assert!(without.stderr.starts_with("quotad admin: api-key: UNAUTHENTICATED: "), "{without:?}");
    let revoked = json(&admin_ok(&url, &with_token(&["api-key", "revoke", &key_id, "--format", "json"])).await);
    assert_eq!(revoked["key_id"], key_id.as_str());
    let refused = admin(&url, &["balance", "acme-prod", "--token", &secret]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.starts_with("quotad admin: balance: UNAUTHENTICATED: "), "{refused:?}");
    assert!(!refused.stderr.contains(&secret[20..]), "{refused:?}");
}
