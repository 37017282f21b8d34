//! The Prometheus endpoint through the real server: counters that move as calls are made (requests by
//! RPC and status code, tonic's own errors included; latency; reservations granted and refused by
//! reason; charges by source and overage; open holds; alerts), the log and snapshot metrics of a
//! durable store, the optional `tenant` label, the HTTP answers besides `GET /metrics`, and, through
//! the binary, the `--metrics-listen` flag and per-call spans with their fields in JSON log lines.

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::*;
use quotad::{
    clock::ManualClock,
    config::{AuthConfig, Config, Settings},
    durability::journal::Durability,
    metrics::endpoint::{CONNECTION_LIFETIME, MAX_CONNECTIONS},
    proto::{Balance, CheckAndReserveRequest, CreateApiKeyRequest, ReleaseRequest},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tonic::{Code, codegen::http::uri::PathAndQuery};
use tonic_health::pb::HealthCheckRequest;

/// One sample of the text format: name, labels and value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape's samples.
struct Scrape(Vec<Sample>);

impl Scrape {
    /// The value of the sample `name` with exactly `labels`; 0 if there is none (a series not created yet).
    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let found: Vec<_> = self.0.iter().filter(|s| s.name == name && s.labels == wanted).collect();
        assert!(found.len() <= 1, "{name} {labels:?} appears more than once: {found:?}");
        found.first().map_or(0.0, |sample| sample.value)
    }

    /// Every sample of `name`, whatever its labels.
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.0.iter().filter(|s| s.name == name).collect()
    }
}

/// Parses the Prometheus text format: `name{label="value",...} value` lines; comments skipped.
fn parse(text: &str) -> Scrape {
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty() && !line.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            value => value.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("labels end with }"))),
        };
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    Scrape(samples)
}

/// `k="v",k2="v2"`, with the format's escapes (`\"`, `\\`, `\n`) in values.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels {text:?}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().unwrap_or_else(|| panic!("unterminated value in {text:?}")) {
                (i, '"') => break i,
                (_, '\\') => value.push(match chars.next().unwrap().1 {
                    'n' => '\n',
                    other => other,
                }),
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// An HTTP/1.1 answer: status, headers (names lower-cased) and body.
struct HttpAnswer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `request` (a whole HTTP/1.1 request) on a new connection and reads the answer until the
/// server closes it.
async fn http(addr: SocketAddr, request: &[u8]) -> HttpAnswer {
    bounded("an HTTP exchange", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).expect("a text answer");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {answer:?}"));
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|line| line.split_once(": ").unwrap())
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
            .collect();
        HttpAnswer { status, headers, body: body.to_owned() }
    })
    .await
}

async fn get(addr: SocketAddr, path: &str) -> HttpAnswer {
    http(addr, format!("GET {path} HTTP/1.1\r\nHost: quotad\r\nConnection: close\r\n\r\n").as_bytes()).await
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let answer = get(addr, "/metrics").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    parse(&answer.body)
}

/// A server with the default settings and a metrics endpoint on an ephemeral port.
async fn spawn_with_metrics(tenant_labels: bool) -> (TestServer, SocketAddr) {
    let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    config.metrics.tenant_labels = tenant_labels;
    spawn_server_with_metrics(config, Arc::new(ManualClock::new(START_MS))).await
}

const RESERVE: &str = "quota.v1.Quota/CheckAndReserve";
const COMMIT: &str = "quota.v1.Quota/Commit";

fn requests(scrape: &Scrape, rpc: &str, code: &str) -> f64 {
    scrape.value("quotad_rpc_requests_total", &[("rpc", rpc), ("code", code)])
}

fn calls_timed(scrape: &Scrape, rpc: &str) -> f64 {
    scrape.value("quotad_rpc_duration_seconds_count", &[("rpc", rpc)])
}

/// The business series of a scrape: every one must go without a `tenant` label unless it is asked for.
const BUSINESS: [&str; 5] = [
    "quotad_reservations_granted_total",
    "quotad_reservations_refused_total",
    "quotad_charged_milli_total",
    "quotad_overage_milli_total",
    "quotad_alerts_total",
];

#[tokio::test]
async fn reservations_charges_holds_and_alerts_are_counted_as_calls_are_made() {
    // Proves: a grant and a refusal (by its ErrorInfo reason) move their counters, requests are counted
    // by RPC and code with a latency observation each, open holds go up and down, commits add their
    // charges per source and their overage, and an alert is counted by kind, without tenant labels.
    let (server, metrics) = spawn_with_metrics(false).await;
    let before = scrape(metrics).await;
    assert_eq!(before.value("quotad_reservations_granted_total", &[]), 0.0);
    assert_eq!(before.value("quotad_open_holds", &[]), 0.0);
    server.bootstrap("acme", "acme-prod", 10).await;

    let first = server.reserve("acme-prod", 4).await;
    let after_grant = scrape(metrics).await;
    assert_eq!(after_grant.value("quotad_reservations_granted_total", &[]), 1.0);
    assert_eq!(after_grant.value("quotad_open_holds", &[]), 1.0);
    assert_eq!(requests(&after_grant, RESERVE, "OK"), 1.0);
    assert_eq!(calls_timed(&after_grant, RESERVE), 1.0);

    expect_depleted(server.try_reserve(reserve_request("acme-prod", 7)).await, "acme-prod", milli(7), milli(6));
    expect_field(server.try_reserve(reserve_request("", 1)).await, "environment_id");
    let after_refusals = scrape(metrics).await;
    let refused = |reason| after_refusals.value("quotad_reservations_refused_total", &[("reason", reason)]);
    assert_eq!(refused("QUOTA_DEPLETED"), 1.0);
    assert_eq!(refused("INVALID_ARGUMENT"), 1.0);
    assert_eq!(after_refusals.value("quotad_reservations_granted_total", &[]), 1.0, "a refusal grants nothing");
    assert_eq!(requests(&after_refusals, RESERVE, "RESOURCE_EXHAUSTED"), 1.0);
    assert_eq!(requests(&after_refusals, RESERVE, "INVALID_ARGUMENT"), 1.0);
    assert_eq!(calls_timed(&after_refusals, RESERVE), 3.0);

    // 6 used of a 4-message hold: 4 held plus 2 more from the allocation.
    server.commit(&first.reservation_id, 6).await;
    let after_commit = scrape(metrics).await;
    assert_eq!(after_commit.value("quotad_open_holds", &[]), 0.0);
    let charged = |scrape: &Scrape, source| scrape.value("quotad_charged_milli_total", &[("source", source)]);
    assert_eq!(charged(&after_commit, "allocation"), milli(6) as f64);
    assert_eq!(after_commit.value("quotad_overage_milli_total", &[]), 0.0);
    assert_eq!(after_commit.value("quotad_alerts_total", &[("kind", "environment_depleted")]), 0.0);

    // The last 4 messages: the environment is depleted; 5 are used, one more than anything covers.
    let second = server.reserve("acme-prod", 4).await;
    server.commit(&second.reservation_id, 5).await;
    let retry = server.commit(&second.reservation_id, 5).await;
    assert_eq!(retry.overage_milli, milli(1));
    let last = scrape(metrics).await;
    assert_eq!(charged(&last, "allocation"), milli(10) as f64, "a retried commit is not counted again");
    assert_eq!(charged(&last, "tenant_pool"), 0.0);
    assert_eq!(charged(&last, "payg"), 0.0);
    assert_eq!(last.value("quotad_overage_milli_total", &[]), milli(1) as f64);
    assert_eq!(last.value("quotad_alerts_total", &[("kind", "environment_depleted")]), 1.0);
    assert_eq!(last.value("quotad_reservations_granted_total", &[]), 2.0);
    assert_eq!(requests(&last, COMMIT, "OK"), 3.0);
    for name in BUSINESS {
        for sample in last.all(name) {
            assert!(!sample.labels.contains_key("tenant"), "{sample:?}");
        }
    }
}

#[tokio::test]
async fn a_batch_counts_as_one_call_and_each_item_as_its_unary_call_would() {
    // Proves: a batch call is counted once under its own RPC and code (a refused batch too), while each
    // item moves the business counters as its unary call would: grants, refusals by reason (a bad field
    // as INVALID_ARGUMENT), no dry run, commits' charges and overage, and a retried commit not again.
    let (server, metrics) = spawn_with_metrics(false).await;
    server.bootstrap("acme", "acme-prod", 10).await;
    let dry_run = CheckAndReserveRequest { dry_run: true, ..reserve_request("acme-prod", 1) };
    let reserves = vec![
        reserve_request("acme-prod", 4),
        reserve_request("acme-prod", 3),
        reserve_request("acme-prod", 7),
        reserve_request("", 1),
        dry_run,
        reserve_request("acme-prod", 3),
    ];
    let results = server.reserve_batch(reserves).await;
    let ids: Vec<String> = results.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.reservation_id.clone()).collect();
    assert_eq!(ids.len(), 4, "three grants and a dry run: {results:?}");
    // 4 used of a 4-message hold; 5 of a 3-message one with nothing left to cover the other 2.
    let commits = vec![commit_request(&ids[0], 4), commit_request(&ids[1], 5), commit_request(&ids[0], 4)];
    assert!(server.commit_batch(commits).await.iter().all(Result::is_ok));
    server.release_batch(vec![ReleaseRequest { reservation_id: ids[3].clone() }]).await[0].as_ref().unwrap();
    expect_field(server.try_reserve_batch(Vec::new()).await, "items");

    let scrape = scrape(metrics).await;
    assert_eq!(scrape.value("quotad_reservations_granted_total", &[]), 3.0);
    let refused = |reason| scrape.value("quotad_reservations_refused_total", &[("reason", reason)]);
    assert_eq!((refused("QUOTA_DEPLETED"), refused("INVALID_ARGUMENT")), (1.0, 1.0));
    assert_eq!(scrape.value("quotad_charged_milli_total", &[("source", "allocation")]), milli(7) as f64);
    assert_eq!(scrape.value("quotad_overage_milli_total", &[]), milli(2) as f64);
    assert_eq!(scrape.value("quotad_open_holds", &[]), 0.0);
    let batch = "quota.v1.Quota/CheckAndReserveBatch";
    assert_eq!((requests(&scrape, batch, "OK"), requests(&scrape, batch, "INVALID_ARGUMENT")), (1.0, 1.0));
    assert_eq!(calls_timed(&scrape, batch), 2.0);
    assert_eq!(requests(&scrape, "quota.v1.Quota/CommitBatch", "OK"), 1.0);
    assert_eq!(requests(&scrape, "quota.v1.Quota/ReleaseBatch", "OK"), 1.0);
    assert!(
        scrape.all("quotad_rpc_requests_total").iter().all(|s| s.labels["rpc"] != RESERVE && s.labels["rpc"] != COMMIT)
    );
}

#[tokio::test]
async fn each_call_is_counted_once_by_rpc_and_code_with_its_latency() {
    // Proves: health checks, admin calls and errors answered before a handler runs (an unknown method, a
    // request that does not decode) are counted under their RPC (`other` for an unknown path) and the
    // code the client saw, and the latency histogram's count and +Inf bucket match the calls.
    let (server, metrics) = spawn_with_metrics(false).await;
    let request = HealthCheckRequest { service: "quota.v1.Quota".into() };
    for _ in 0..3 {
        server.health.clone().check(request.clone()).await.unwrap();
    }
    let unknown = expect_code(raw_call(&server, "/quota.v1.Quota/Refund").await, Code::Unimplemented);
    let undecodable = raw_call(&server, &format!("/{RESERVE}")).await;
    let undecodable_code = expect_code(undecodable, Code::InvalidArgument).code();
    expect_code(server.try_tenant("nobody").await, Code::NotFound);

    let scrape = scrape(metrics).await;
    let health = "grpc.health.v1.Health/Check";
    assert_eq!(requests(&scrape, health, "OK"), 3.0);
    assert_eq!(calls_timed(&scrape, health), 3.0);
    assert_eq!(scrape.value("quotad_rpc_duration_seconds_bucket", &[("rpc", health), ("le", "+Inf")]), 3.0);
    assert_eq!(requests(&scrape, "other", "UNIMPLEMENTED"), 1.0, "{unknown:?}");
    assert_eq!(requests(&scrape, RESERVE, "INVALID_ARGUMENT"), 1.0, "{undecodable_code:?}");
    assert_eq!(requests(&scrape, "quota.v1.QuotaAdmin/GetTenant", "NOT_FOUND"), 1.0);
    assert_eq!(
        scrape.value("quotad_reservations_refused_total", &[("reason", "INVALID_ARGUMENT")]),
        0.0,
        "a request that never reached the handler is no refused reservation"
    );
    let total: f64 = scrape.all("quotad_rpc_requests_total").iter().map(|s| s.value).sum();
    assert_eq!(total, 6.0, "every call once, the scrape itself not at all");
}

#[tokio::test]
async fn a_call_the_client_abandons_counts_once_as_cancelled() {
    // Proves: a stream the client drops before its status (an alert watch) is counted once, as
    // CANCELLED, with its duration.
    let (server, metrics) = spawn_with_metrics(false).await;
    server.bootstrap("acme", "acme-prod", 10).await;
    let request = quotad::proto::WatchAlertsRequest { tenant_id: "acme".into(), environment_id: String::new() };
    let mut watch = server.admin.clone().watch_alerts(request).await.unwrap().into_inner();
    bounded("the first level", watch.message()).await.unwrap().expect("the current level");
    let watch_alerts = "quota.v1.QuotaAdmin/WatchAlerts";
    assert_eq!(calls_timed(&scrape(metrics).await, watch_alerts), 0.0, "an open stream has no status yet");
    drop(watch);

    let counted = wait_for_scrape(metrics, |s| calls_timed(s, watch_alerts) > 0.0).await;
    assert_eq!(requests(&counted, watch_alerts, "CANCELLED"), 1.0);
    assert_eq!(calls_timed(&counted, watch_alerts), 1.0);
}

/// A unary call to `path` whose body is a `google.protobuf.Duration`: a type no quotad method takes,
/// so a served method cannot decode it.
async fn raw_call(server: &TestServer, path: &str) -> Result<tonic::Response<Balance>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(connect(server.addr).await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<prost_types::Duration, Balance>::default();
    let body = prost_types::Duration { seconds: 7, nanos: 1 };
    grpc.unary(tonic::Request::new(body), PathAndQuery::try_from(path).unwrap(), codec).await
}

#[tokio::test]
async fn business_metrics_carry_a_tenant_label_only_when_asked() {
    // Proves: with tenant labels on, grants, refusals, charges, overage and alerts are counted per
    // tenant, and a refusal whose environment names no tenant goes without the label.
    let (server, metrics) = spawn_with_metrics(true).await;
    server.bootstrap("acme", "acme-prod", 10).await;
    server.bootstrap("globex", "globex-prod", 10).await;
    let hold = server.reserve("acme-prod", 10).await;
    server.commit(&hold.reservation_id, 11).await;
    server.reserve("globex-prod", 1).await;
    expect_depleted(server.try_reserve(reserve_request("acme-prod", 1)).await, "acme-prod", milli(1), 0);
    expect_code(server.try_reserve(reserve_request("nowhere", 1)).await, Code::NotFound);

    let scrape = scrape(metrics).await;
    let granted = |tenant| scrape.value("quotad_reservations_granted_total", &[("tenant", tenant)]);
    assert_eq!((granted("acme"), granted("globex")), (1.0, 1.0));
    let refused = |labels: &[(&str, &str)]| scrape.value("quotad_reservations_refused_total", labels);
    assert_eq!(refused(&[("tenant", "acme"), ("reason", "QUOTA_DEPLETED")]), 1.0);
    assert_eq!(refused(&[("reason", "UNKNOWN_ENVIRONMENT")]), 1.0);
    let charged = scrape.value("quotad_charged_milli_total", &[("tenant", "acme"), ("source", "allocation")]);
    assert_eq!(charged, milli(10) as f64);
    assert_eq!(scrape.value("quotad_overage_milli_total", &[("tenant", "acme")]), milli(1) as f64);
    let depleted = [("tenant", "acme"), ("kind", "environment_depleted")];
    assert_eq!(scrape.value("quotad_alerts_total", &depleted), 1.0);
    assert!(scrape.all("quotad_reservations_granted_total").iter().all(|s| s.labels.contains_key("tenant")));
}

#[tokio::test]
async fn an_api_keys_refusals_count_under_its_own_tenant_only() {
    // Proves: with authentication and tenant labels on, reservations an API key of acme makes on globex's
    // environment and on one that does not exist are both counted under acme, so that the series never
    // name globex for what acme's key did, and the two refusals stay alike down to their labels.
    let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    config.metrics.tenant_labels = true;
    config.auth = AuthConfig::on(None);
    let (server, metrics) = spawn_server_as_configured_with_metrics(config, Arc::new(ManualClock::new(START_MS))).await;
    server.bootstrap("acme", "acme-prod", 10).await;
    server.bootstrap("globex", "globex-prod", 10).await;
    let create = CreateApiKeyRequest { tenant_id: "acme".into(), ..Default::default() };
    let key = server.admin.clone().create_api_key(create).await.unwrap().into_inner();
    for environment in ["globex-prod", "nowhere"] {
        let mut request = tonic::Request::new(reserve_request(environment, 1));
        request.metadata_mut().insert("authorization", format!("Bearer {}", key.secret).parse().unwrap());
        expect_code(server.quota.clone().check_and_reserve(request).await, Code::PermissionDenied);
    }

    let scrape = scrape(metrics).await;
    let refused = scrape.all("quotad_reservations_refused_total");
    assert!(refused.iter().all(|s| s.labels.get("tenant").map(String::as_str) == Some("acme")), "{refused:?}");
    let outside = [("tenant", "acme"), ("reason", "OUTSIDE_KEY_SCOPE")];
    assert_eq!(scrape.value("quotad_reservations_refused_total", &outside), 2.0);
}

#[tokio::test]
async fn a_durable_store_reports_its_log_and_snapshots() {
    // Proves: with a log in fsync mode, records and bytes appended and each sync's latency are counted
    // and the log reports healthy; once a periodic snapshot is written, its count, size, items, time
    // and duration are reported. A store kept in memory reports none of them.
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_on(dir.path(), Durability::Fsync);
    let storage = config.storage.as_mut().unwrap();
    storage.snapshot_interval = Duration::from_millis(100);
    let (server, metrics) = spawn_server_with_metrics(config, Arc::new(ManualClock::new(START_MS))).await;
    let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    server.bootstrap("acme", "acme-prod", 10).await;
    server.reserve("acme-prod", 1).await;

    let durable = wait_for_scrape(metrics, |s| s.value("quotad_snapshots_written_total", &[]) >= 1.0).await;
    // A purchase, an allocation and a reservation.
    assert_eq!(durable.value("quotad_log_records_total", &[]), 3.0);
    assert!(durable.value("quotad_log_bytes_total", &[]) > 3.0 * 20.0, "each record has a 20-byte frame");
    assert!(durable.value("quotad_log_sync_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(durable.value("quotad_log_healthy", &[]), 1.0);
    assert_eq!(durable.value("quotad_snapshots_failed_total", &[]), 0.0);
    assert!(durable.value("quotad_snapshot_last_bytes", &[]) > 0.0);
    assert_eq!(durable.value("quotad_snapshot_last_items", &[]), 2.0, "a tenant and an environment");
    assert!(durable.value("quotad_snapshot_last_timestamp_seconds", &[]) >= started.floor());
    assert_eq!(durable.all("quotad_snapshot_last_duration_seconds").len(), 1);

    let (_memory, memory_metrics) = spawn_with_metrics(false).await;
    let memory = scrape(memory_metrics).await;
    assert!(
        memory.all("quotad_log_records_total").is_empty() && memory.all("quotad_snapshots_written_total").is_empty()
    );
}

/// Scrapes until `done` holds, for at most [`WAIT_DEADLINE`]: for what the server does on its own.
async fn wait_for_scrape(addr: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let polled = tokio::time::timeout(WAIT_DEADLINE, async {
        loop {
            let scrape = scrape(addr).await;
            if done(&scrape) {
                return scrape;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    polled.expect("the metrics never met the condition")
}

#[tokio::test]
async fn only_get_metrics_is_served_and_a_large_request_head_is_refused() {
    // Proves: another path is 404, another method 405 (naming GET), and a request head over the 8 KiB
    // buffer gets no metrics: the endpoint answers it with an error status and closes the connection.
    let (_server, metrics) = spawn_with_metrics(false).await;
    let not_found = get(metrics, "/").await;
    assert_eq!(not_found.status, 404, "{}", not_found.body);
    assert_eq!(get(metrics, "/metrics/x").await.status, 404);
    let post =
        http(metrics, b"POST /metrics HTTP/1.1\r\nHost: quotad\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "GET");

    let large = format!("GET /metrics HTTP/1.1\r\nHost: quotad\r\nX-Pad: {}\r\n\r\n", "a".repeat(16 * 1024));
    let refused = http(metrics, large.as_bytes()).await;
    assert!(refused.status >= 400, "{}", refused.status);
    assert!(!refused.body.contains("quotad_"), "{}", refused.body);
    assert_eq!(get(metrics, "/metrics").await.status, 200, "the endpoint still serves");
}

#[tokio::test]
async fn a_connection_over_the_cap_is_served_once_an_idle_one_reaches_its_lifetime() {
    // Proves: the endpoint serves at most MAX_CONNECTIONS connections at once, and closes one that sends
    // nothing after CONNECTION_LIFETIME, which gives its slot back: a scrape on one more connection is
    // answered only after an idle one was closed, and no sooner than that lifetime.
    let (_server, metrics) = spawn_with_metrics(false).await;
    let started = tokio::time::Instant::now();
    let mut idle_ends = tokio::task::JoinSet::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(metrics).await.unwrap();
        idle_ends.spawn(async move { stream.read(&mut [0u8; 1]).await.unwrap_or(0) });
    }
    // Connected after the idle ones, so accepted after them: the listen backlog is first in, first out.
    let mut scrape = tokio::spawn(get(metrics, "/metrics"));
    bounded("an idle connection's end", async {
        tokio::select! {
            biased;
            ended = idle_ends.join_next() => assert_eq!(ended.unwrap().unwrap(), 0, "closed without a byte sent"),
            answer = &mut scrape => {
                panic!("served while {MAX_CONNECTIONS} connections were open: {}", answer.unwrap().status)
            }
        }
    })
    .await;
    assert!(started.elapsed() >= CONNECTION_LIFETIME, "closed after {:?}", started.elapsed());
    let answer = bounded("the scrape", scrape).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
}

// The real binary.

type StderrLines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// Starts `quotad` with `args` and `RUST_LOG=filter` on a data directory of its own; returns it with
/// its stderr as lines.
fn start_binary(args: &[&str], filter: &str) -> (tokio::process::Child, StderrLines) {
    let data_dir = tempfile::Builder::new().prefix("metrics-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep();
    let mut command = quotad_binary();
    command.env("RUST_LOG", filter).arg("--data-dir").arg(data_dir).args(["--listen", "127.0.0.1:0"]).args(args);
    let mut child = command.spawn().expect("start quotad");
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

/// Reads lines until one satisfies `wanted`, and returns it (and the lines before it).
async fn line_where(lines: &mut StderrLines, what: &str, wanted: impl Fn(&str) -> bool) -> (String, Vec<String>) {
    let mut seen = Vec::new();
    let found = bounded(what, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if wanted(&line) {
                return Some(line);
            }
            seen.push(line);
        }
        None
    })
    .await;
    (found.unwrap_or_else(|| panic!("quotad exited before {what}; stderr: {seen:#?}")), seen)
}

/// The value of `"key":"value"` in a JSON log line.
fn json_address(line: &str, key: &str) -> SocketAddr {
    let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    value["fields"][key].as_str().unwrap_or_else(|| panic!("no {key} in {line}")).parse().unwrap()
}

#[tokio::test]
async fn the_binary_serves_metrics_and_logs_each_call_in_a_span_with_its_fields_as_json() {
    // Proves, through the binary: `--metrics-listen 127.0.0.1:0` serves metrics at the address it logs;
    // with `--log-format json` and call spans enabled, a CheckAndReserve's span appears in a JSON line
    // with its RPC, environment and agent; the authorization header is never logged.
    let args = ["--log-format", "json", "--metrics-listen", "127.0.0.1:0"];
    let (mut child, mut lines) = start_binary(&args, "info,quotad=debug");
    let (serving, _) = line_where(&mut lines, "the metrics line", |l| l.contains("serving metrics")).await;
    let metrics = json_address(&serving, "address");
    let (listening, _) = line_where(&mut lines, "the listening line", |l| l.contains("\"listening\"")).await;
    let addr = json_address(&listening, "address");
    assert_ne!(metrics.port(), 0);

    let mut quota = quotad::proto::quota_client::QuotaClient::new(connect(addr).await);
    let mut request = tonic::Request::new(CheckAndReserveRequest {
        environment_id: "env-7".into(),
        agent_id: "agent-7".into(),
        messages: Some(1),
        ..Default::default()
    });
    request.metadata_mut().insert("authorization", "Bearer not-to-be-logged".parse().unwrap());
    expect_code(quota.check_and_reserve(request).await, Code::NotFound);
    let scrape = scrape(metrics).await;
    assert_eq!(scrape.value("quotad_reservations_refused_total", &[("reason", "UNKNOWN_ENVIRONMENT")]), 1.0);

    let is_reserve_span = |line: &str| {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        value["span"]["name"] == "CheckAndReserve"
    };
    let (line, before) = line_where(&mut lines, "the CheckAndReserve span", is_reserve_span).await;
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    let span = &value["span"];
    assert_eq!(span["rpc"], RESERVE, "{line}");
    assert_eq!(span["environment"], "env-7", "{line}");
    assert_eq!(span["agent"], "agent-7", "{line}");
    assert_eq!(span["decision"], "refused", "{line}");
    assert_eq!(span["reason"], "UNKNOWN_ENVIRONMENT", "{line}");
    for logged in before.iter().chain([&line]) {
        assert!(!logged.contains("not-to-be-logged"), "{logged}");
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_batch_is_logged_in_one_span_with_its_item_counts() {
    // Proves, through the binary with call spans enabled: a CheckAndReserveBatch is one span named after
    // its RPC that gives its number of items, granted and refused, and its items open no span of their own.
    let (mut child, mut lines) = start_binary(&["--log-format", "json"], "info,quotad=debug");
    let (listening, _) = line_where(&mut lines, "the listening line", |l| l.contains("\"listening\"")).await;
    let channel = connect(json_address(&listening, "address")).await;
    let mut admin = quotad::proto::quota_admin_client::QuotaAdminClient::new(channel.clone());
    let purchase = quotad::proto::PurchaseCapacityRequest { tenant_id: "acme".into(), packs: 1, ..Default::default() };
    admin.purchase_capacity(purchase).await.unwrap();
    admin.allocate_capacity(allocate_request("acme", "env-7", 10, false)).await.unwrap();
    let items = vec![reserve_request("env-7", 1), reserve_request("env-7", 2), reserve_request("nowhere", 1)];
    let mut quota = quotad::proto::quota_client::QuotaClient::new(channel);
    quota.check_and_reserve_batch(quotad::proto::CheckAndReserveBatchRequest { items }).await.unwrap();

    let span_name = |line: &str| {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        value["span"]["name"].as_str().map(str::to_owned)
    };
    let closes_batch_span = |line: &str| {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        value["span"]["name"] == "CheckAndReserveBatch" && value["fields"]["message"] == "close"
    };
    let (line, before) = line_where(&mut lines, "the CheckAndReserveBatch span", closes_batch_span).await;
    let span = &serde_json::from_str::<serde_json::Value>(&line).unwrap()["span"];
    assert_eq!(span["rpc"], "quota.v1.Quota/CheckAndReserveBatch", "{line}");
    assert_eq!(
        (span["items"].as_u64(), span["granted"].as_u64(), span["refused"].as_u64()),
        (Some(3), Some(2), Some(1))
    );
    assert!(!before.iter().any(|l| span_name(l).as_deref() == Some("CheckAndReserve")), "{before:#?}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn an_api_key_secret_sent_as_a_key_id_is_logged_by_its_key_id_only() {
    // Proves, through the binary under the default filter: the spans of the API key calls name their
    // RPC, and a whole secret sent where a key id belongs (an operator revoking a leaked key by pasting
    // it) reaches the RevokeApiKey span's line, logged by default, as its key id and never its secret.
    let (mut child, mut lines) = start_binary(&["--log-format", "json"], "info");
    let (listening, _) = line_where(&mut lines, "the listening line", |l| l.contains("\"listening\"")).await;
    let mut admin =
        quotad::proto::quota_admin_client::QuotaAdminClient::new(connect(json_address(&listening, "address")).await);
    let secret_part = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";
    let key_id = format!("qk_0123456789abcdef_{secret_part}");
    let request = quotad::proto::RevokeApiKeyRequest { key_id };
    let refusal = expect_code(admin.revoke_api_key(request).await, Code::InvalidArgument);
    assert!(refusal.message().contains("key_id"), "{}", refusal.message());
    assert!(!format!("{refusal:?}").contains(&secret_part[..16]), "the answer carries the secret: {refusal:?}");

    let is_revoke_span = |line: &str| {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        value["span"]["name"] == "RevokeApiKey"
    };
    let (line, before) = line_where(&mut lines, "the RevokeApiKey span", is_revoke_span).await;
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["span"]["rpc"], "quota.v1.QuotaAdmin/RevokeApiKey", "{line}");
    let logged_id = value["span"]["key_id"].as_str().unwrap_or_else(|| panic!("no key_id in {line}"));
    assert!(logged_id.contains("0123456789abcdef"), "{line}");
    for logged in before.iter().chain([&line]) {
        assert!(!logged.contains(&secret_part[..16]), "{logged}");
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_metrics_address_in_use_stops_startup_naming_it() {
    // Proves: when the metrics address cannot be bound, quotad exits with an error that names it,
    // before it listens for gRPC.
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let (mut child, mut lines) = start_binary(&["--metrics-listen", &address], "info");
    let (error, seen) = line_where(&mut lines, "the error", |l| l.contains("cannot listen for metrics")).await;
    assert!(error.contains(&address), "{error}");
    let status = bounded("quotad's exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(1), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains("listening")), "{seen:#?}");
}
