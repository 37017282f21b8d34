//! Authentication and tenant isolation through the real server: the admin token on admin calls, API
//! keys on agent calls (their scope, their revocation, their cap on open holds), keys across a restart,
//! and credentials kept out of answers and logs.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use prost::Message;
use quotad::{
    auth::AdminToken,
    clock::ManualClock,
    config::{AuthConfig, Config, Settings},
    durability::journal::Durability,
    proto::{
        ApiKey, Balance, CheckAndReserveRequest, CheckAndReserveResponse, CommitResponse, CreateApiKeyRequest,
        GetBalanceRequest, GetTenantRequest, ListApiKeysRequest, ListApiKeysResponse, ListReservationsRequest,
        PurchaseCapacityRequest, ReleaseAllRequest, ReleaseRequest, ReleaseResponse, RevokeApiKeyRequest,
    },
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
/// Open holds one key may have in these tests.
const KEY_CAP: u64 = 3;
/// API keys one tenant may have in these tests.
const KEYS_PER_TENANT: usize = 3;

fn settings() -> Settings {
    Settings {
        max_open_reservations_per_api_key: KEY_CAP,
        max_api_keys_per_tenant: KEYS_PER_TENANT,
        ..Settings::default()
    }
}

fn auth_on(admin_token: Option<&str>) -> AuthConfig {
    AuthConfig::on(admin_token.map(|token| AdminToken::new(token).unwrap()))
}

/// A server with authentication on. Without an admin token, admin calls are open to this loopback
/// client, which lets the common admin helpers set the world up.
async fn secured(admin_token: Option<&str>) -> TestServer {
    let config = Config::from_settings("127.0.0.1:0".parse().unwrap(), settings()).unwrap();
    let config = Config { auth: auth_on(admin_token), ..config };
    spawn_server_as_configured(config, Arc::new(ManualClock::new(START_MS))).await
}

/// `message` with `authorization: Bearer <credential>`.
fn bearer<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {credential}").parse().unwrap());
    request
}

/// What a refusal tells its caller, byte for byte: code, message and details.
fn answer_of(status: &Status) -> (Code, String, Vec<u8>) {
    (status.code(), status.message().to_owned(), status.details().to_vec())
}

fn answer<T: std::fmt::Debug>(result: Result<T, Status>) -> (Code, String, Vec<u8>) {
    answer_of(&result.expect_err("a refusal"))
}

/// acme has acme-prod (with acme-sales-app linked to it) and acme-dev; globex has globex-prod.
async fn two_tenants(server: &TestServer) {
    server.bootstrap("acme", "acme-prod", 100).await;
    server.allocate("acme", "acme-dev", 100, false).await;
    server.link("acme-sales-app", "acme-prod").await;
    server.bootstrap("globex", "globex-prod", 100).await;
}

fn create_request(tenant: &str, environments: &[&str]) -> CreateApiKeyRequest {
    CreateApiKeyRequest {
        tenant_id: tenant.into(),
        environment_ids: environments.iter().map(|e| (*e).to_owned()).collect(),
        description: String::new(),
    }
}

impl TestServer {
    /// Creates a key through the open admin API.
    async fn create_key(&self, tenant: &str, environments: &[&str]) -> ApiKey {
        self.admin
            .clone()
            .create_api_key(create_request(tenant, environments))
            .await
            .expect("CreateApiKey")
            .into_inner()
    }

    async fn revoke_key(&self, key: &ApiKey) -> Result<ApiKey, Status> {
        let request = RevokeApiKeyRequest { key_id: key.key_id.clone() };
        self.admin.clone().revoke_api_key(request).await.map(Response::into_inner)
    }

    async fn list_keys(&self, tenant: &str, page_size: u32, page_token: &str) -> Result<ListApiKeysResponse, Status> {
        let request = ListApiKeysRequest { tenant_id: tenant.into(), page_size, page_token: page_token.into() };
        self.admin.clone().list_api_keys(request).await.map(Response::into_inner)
    }

    async fn reserve_with(
        &self,
        secret: &str,
        environment: &str,
        messages: u64,
    ) -> Result<CheckAndReserveResponse, Status> {
        self.reserve_request_with(secret, reserve_request(environment, messages)).await
    }

    async fn reserve_request_with(
        &self,
        secret: &str,
        request: CheckAndReserveRequest,
    ) -> Result<CheckAndReserveResponse, Status> {
        self.quota.clone().check_and_reserve(bearer(request, secret)).await.map(Response::into_inner)
    }

    async fn dry_run_with(&self, secret: &str, environment: &str) -> Result<CheckAndReserveResponse, Status> {
        self.reserve_request_with(secret, CheckAndReserveRequest { dry_run: true, ..reserve_request(environment, 1) })
            .await
    }

    async fn balance_with(&self, secret: &str, environment: &str) -> Result<Balance, Status> {
        let request = GetBalanceRequest { environment_id: environment.into() };
        self.quota.clone().get_balance(bearer(request, secret)).await.map(Response::into_inner)
    }

    async fn commit_with(&self, secret: &str, reservation: &str, messages: u64) -> Result<CommitResponse, Status> {
        let request = bearer(commit_request(reservation, messages), secret);
        self.quota.clone().commit(request).await.map(Response::into_inner)
    }

    async fn release_with(&self, secret: &str, reservation: &str) -> Result<ReleaseResponse, Status> {
        let request = bearer(ReleaseRequest { reservation_id: reservation.into() }, secret);
        self.quota.clone().release(request).await.map(Response::into_inner)
    }
}

#[tokio::test]
async fn admin_calls_need_the_admin_token_when_one_is_configured() {
    // Proves that with an admin token configured, an admin call without it, with a wrong one, or with an
    // API key gets one UNAUTHENTICATED answer, that the token lets it through, that the token also
    // works on agent calls, and that health stays open for probes.
    let server = secured(Some(ADMIN_TOKEN)).await;
    let purchase = || PurchaseCapacityRequest { tenant_id: "acme".into(), packs: 1, idempotency_key: String::new() };
    let mut admin = server.admin.clone();

    let without = expect_code(admin.purchase_capacity(purchase()).await, Code::Unauthenticated);
    let info = error_info(&without, "INVALID_CREDENTIALS");
    assert!(info.metadata.is_empty(), "{info:?}");
    let wrong = admin.purchase_capacity(bearer(purchase(), "not-the-admin-token-at-all")).await;
    assert_eq!(answer(wrong), answer_of(&without));
    assert!(server.try_tenant("acme").await.is_err(), "nothing was bought");

    admin.purchase_capacity(bearer(purchase(), ADMIN_TOKEN)).await.expect("the admin token is accepted");
    let allocate = allocate_request("acme", "acme-prod", 10, false);
    admin.allocate_capacity(bearer(allocate, ADMIN_TOKEN)).await.unwrap();
    let key = admin.create_api_key(bearer(create_request("acme", &[]), ADMIN_TOKEN)).await.unwrap().into_inner();
    let with_key = admin.get_tenant(bearer(GetTenantRequest { tenant_id: "acme".into() }, &key.secret)).await;
    assert_eq!(answer(with_key), answer_of(&without), "an API key is no admin token");

    let balance = server.balance_with(ADMIN_TOKEN, "acme-prod").await.expect("operators may call Quota");
    assert_eq!(balance.allocated_milli, milli(10));
    expect_code(server.try_balance("acme-prod").await, Code::Unauthenticated);
    let health = server.health.clone().check(HealthCheckRequest { service: String::new() }).await;
    assert!(health.is_ok(), "health needs no credentials: {health:?}");
}

#[tokio::test]
async fn without_an_admin_token_admin_calls_are_served_on_loopback_only() {
    // Proves that with authentication on and no admin token, admin calls are served without credentials
    // on a loopback address while agent calls still need a key, and that the binary refuses to start
    // on any other address (exit 64, naming the fix) rather than serve admin calls to the network.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 10).await;
    expect_code(server.try_balance("acme-prod").await, Code::Unauthenticated);

    let data_dir = tempfile::tempdir().unwrap();
    let mut command = quotad_on("on", "0.0.0.0:0", data_dir.path());
    let output = bounded("quotad on 0.0.0.0 without a token", command.output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("not a loopback address") && stderr.contains("--admin-token-file"), "{stderr}");

    let mut command = quotad_on("on", "0.0.0.0:0", data_dir.path());
    let output =
        bounded("quotad with a short token", command.env("QUOTAD_ADMIN_TOKEN", "short-token").output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("QUOTAD_ADMIN_TOKEN") && !stderr.contains("short-token"), "{stderr}");
}

#[tokio::test]
async fn agent_calls_without_a_valid_key_are_all_refused_alike() {
    // Proves that no credential, another scheme, a malformed key, a key id that does not exist, a wrong
    // secret for a real key id and a wrong admin token get one and the same UNAUTHENTICATED answer, which
    // repeats none of what was sent, and that none of them holds anything.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let key = server.create_key("acme", &[]).await;
    let other = server.create_key("acme", &[]).await;
    let secret_part = |secret: &str| secret.rsplit_once('_').unwrap().1.to_owned();
    let wrong_secret = format!("qk_{}_{}", key.key_id, secret_part(&other.secret));
    let unknown_id = format!("qk_{}_{}", "0123456789abcdef", secret_part(&key.secret));
    assert!(key.key_id != "0123456789abcdef" && other.key_id != "0123456789abcdef");
    let malformed = key.secret[..key.secret.len() - 1].to_owned();

    let mut quota = server.quota.clone();
    let without = expect_code(quota.check_and_reserve(reserve_request("acme-prod", 1)).await, Code::Unauthenticated);
    error_info(&without, "INVALID_CREDENTIALS");
    let mut basic = Request::new(reserve_request("acme-prod", 1));
    basic.metadata_mut().insert("authorization", format!("Basic {}", key.secret).parse().unwrap());
    let mut refusals = vec![quota.check_and_reserve(basic).await.map(Response::into_inner)];
    for credential in [&malformed, &unknown_id, &wrong_secret, "not-the-admin-token-at-all"] {
        let refusal = server.reserve_with(credential, "acme-prod", 1).await;
        assert!(!refusal.as_ref().unwrap_err().message().contains(credential), "{refusal:?}");
        refusals.push(refusal);
    }
    for refusal in refusals {
        assert_eq!(answer(refusal), answer_of(&without));
    }
    let listed = server.list_keys("acme", 0, "").await.unwrap().api_keys;
    assert!(listed.iter().all(|k| k.last_used_unix_ms == 0 && k.open_reservations == 0), "no use: {listed:?}");
    assert_eq!(server.balance_with(&key.secret, "acme-prod").await.unwrap().reserved_milli, 0);
}

#[tokio::test]
async fn a_key_uses_the_environments_of_its_scope_and_no_other() {
    // Proves that a key without a list may use every environment of its tenant, that a key listing an app
    // environment may use the capacity environment it draws on under any of its names, and that
    // anything else is PERMISSION_DENIED with reason OUTSIDE_KEY_SCOPE and holds nothing.
    let server = secured(None).await;
    two_tenants(&server).await;
    let any = server.create_key("acme", &[]).await;
    for environment in ["acme-prod", "acme-sales-app", "acme-dev"] {
        let hold = server.reserve_with(&any.secret, environment, 1).await.unwrap();
        server.release_with(&any.secret, &hold.reservation_id).await.unwrap();
    }
    let sales = server.create_key("acme", &["acme-sales-app"]).await;
    let through_app = server.reserve_with(&sales.secret, "acme-sales-app", 2).await.unwrap();
    assert_eq!(through_app.balance.unwrap().environment_id, "acme-prod");
    let direct = server.reserve_with(&sales.secret, "acme-prod", 3).await.unwrap();
    server.commit_with(&sales.secret, &through_app.reservation_id, 1).await.unwrap();
    server.release_with(&sales.secret, &direct.reservation_id).await.unwrap();

    let before = server.balance_with(&any.secret, "acme-dev").await.unwrap();
    let refused = expect_code(server.reserve_with(&sales.secret, "acme-dev", 1).await, Code::PermissionDenied);
    let info = error_info(&refused, "OUTSIDE_KEY_SCOPE");
    assert_eq!(info.metadata.get("environment_id").map(String::as_str), Some("acme-dev"), "{info:?}");
    assert_eq!(refused.message(), "environment acme-dev does not exist or is outside this API key's scope");
    expect_code(server.balance_with(&sales.secret, "acme-dev").await, Code::PermissionDenied);
    expect_code(server.dry_run_with(&sales.secret, "acme-dev").await, Code::PermissionDenied);
    expect_code(server.reserve_with(&any.secret, "globex-prod", 1).await, Code::PermissionDenied);
    assert_eq!(server.balance_with(&any.secret, "acme-dev").await.unwrap(), before, "a refusal holds nothing");
}

/// What a key of acme is answered when it names `environment` in each agent call that takes one.
async fn environment_answers(server: &TestServer, secret: &str, environment: &str) -> Vec<(Code, String, Vec<u8>)> {
    vec![
        answer(server.reserve_with(secret, environment, 1).await),
        answer(server.dry_run_with(secret, environment).await),
        answer(server.balance_with(secret, environment).await),
    ]
}

#[tokio::test]
async fn another_tenants_environment_is_answered_as_one_that_does_not_exist() {
    // Proves that a key learns nothing about another tenant: its reservation, dry run and balance calls
    // on `globex-prod` and `globex-app` get exactly the same code, message and details before these
    // environments exist, once they do, and once the app environment is unlinked.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let key = server.create_key("acme", &[]).await;
    let before = environment_answers(&server, &key.secret, "globex-prod").await;
    let app_before = environment_answers(&server, &key.secret, "globex-app").await;
    assert_eq!(before[0].0, Code::PermissionDenied);

    server.bootstrap("globex", "globex-prod", 100).await;
    server.link("globex-app", "globex-prod").await;
    assert_eq!(environment_answers(&server, &key.secret, "globex-prod").await, before);
    assert_eq!(environment_answers(&server, &key.secret, "globex-app").await, app_before);
    server.try_link("globex-app", "").await.unwrap();
    assert_eq!(environment_answers(&server, &key.secret, "globex-app").await, app_before);
}

#[tokio::test]
async fn another_tenants_reservation_is_answered_as_one_that_does_not_exist() {
    // Proves that a key's commit and release of another tenant's reservation get the same answer as for
    // a reservation in an environment that does not exist, or that does not hold it, and leave it alone.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let acme = server.create_key("acme", &[]).await;
    let ask = || async {
        vec![
            answer(server.commit_with(&acme.secret, "globex-prod/1", 1).await),
            answer(server.release_with(&acme.secret, "globex-prod/1").await),
        ]
    };
    let no_environment = ask().await;
    assert_eq!(no_environment[0].0, Code::PermissionDenied);
    server.bootstrap("globex", "globex-prod", 100).await;
    assert_eq!(ask().await, no_environment, "an environment without the reservation");
    let globex = server.create_key("globex", &[]).await;
    let hold = server.reserve_with(&globex.secret, "globex-prod", 5).await.unwrap();
    assert_eq!(hold.reservation_id, "globex-prod/1");
    assert_eq!(ask().await, no_environment, "another tenant's reservation");

    let refused = expect_code(server.commit_with(&acme.secret, "globex-prod/1", 1).await, Code::PermissionDenied);
    let info = error_info(&refused, "OUTSIDE_KEY_SCOPE");
    assert_eq!(info.metadata.get("reservation_id").map(String::as_str), Some("globex-prod/1"), "{info:?}");
    assert_eq!(server.balance_with(&globex.secret, "globex-prod").await.unwrap().reserved_milli, milli(5));
    let committed = server.commit_with(&globex.secret, "globex-prod/1", 4).await.unwrap();
    assert_eq!(committed.charged_milli, milli(4));
}

#[tokio::test]
async fn a_revoked_key_is_refused_from_the_very_next_request() {
    // Proves that revocation takes effect for the next request, with the answer an unknown key gets;
    // that the holds the key made stay, for its tenant's other keys to settle; and that the key is
    // gone: no longer listed, and a second revocation is NOT_FOUND.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let key = server.create_key("acme", &[]).await;
    let other = server.create_key("acme", &[]).await;
    let hold = server.reserve_with(&key.secret, "acme-prod", 2).await.unwrap();
    let unknown = server.reserve_with(&format!("qk_0123456789abcdef_{}", &key.secret[20..]), "acme-prod", 1).await;

    let revoked = server.revoke_key(&key).await.unwrap();
    assert_eq!((revoked.key_id.as_str(), revoked.secret.as_str()), (key.key_id.as_str(), ""));
    assert_eq!(revoked.open_reservations, 1);
    assert_eq!(answer(server.reserve_with(&key.secret, "acme-prod", 1).await), answer(unknown));
    expect_code(server.balance_with(&key.secret, "acme-prod").await, Code::Unauthenticated);

    assert_eq!(server.balance_with(&other.secret, "acme-prod").await.unwrap().reserved_milli, milli(2));
    server.commit_with(&other.secret, &hold.reservation_id, 2).await.unwrap();
    let listed = server.list_keys("acme", 0, "").await.unwrap().api_keys;
    assert_eq!(listed.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>(), [other.key_id.as_str()]);
    let again = expect_code(server.revoke_key(&key).await, Code::NotFound);
    error_info(&again, "UNKNOWN_API_KEY");
}

#[tokio::test]
async fn listing_keys_shows_scope_creation_and_last_use_and_never_a_secret() {
    // Proves that ListApiKeys shows each key's id, tenant, scope, description, creation time, last use
    // (to the second, after an authenticated call) and open holds, ordered by id a page at a time, and
    // that no answer but CreateApiKey's carries the secret, its random part or its hash.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    server.link("acme-sales-app", "acme-prod").await;
    let first = server
        .admin
        .clone()
        .create_api_key(CreateApiKeyRequest {
            description: "sales runtime".into(),
            ..create_request("acme", &["acme-sales-app"])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.tenant_id.as_str(), first.created_at_unix_ms), ("acme", START_MS));
    assert!(first.secret.starts_with(&format!("qk_{}_", first.key_id)), "{first:?}");
    server.clock.advance_ms(1_000);
    let second = server.create_key("acme", &[]).await;

    let listed = server.list_keys("acme", 0, "").await.unwrap();
    let mut expected =
        vec![ApiKey { secret: String::new(), ..first.clone() }, ApiKey { secret: String::new(), ..second.clone() }];
    expected.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(listed.api_keys, expected);
    assert_eq!(listed.next_page_token, "");

    server.clock.advance_ms(5_000);
    server.reserve_with(&first.secret, "acme-sales-app", 1).await.unwrap();
    let listed = server.list_keys("acme", 0, "").await.unwrap();
    let used = listed.api_keys.iter().find(|k| k.key_id == first.key_id).unwrap();
    assert_eq!((used.last_used_unix_ms, used.open_reservations), (START_MS + 6_000, 1));
    assert_eq!(used.environment_ids, ["acme-sales-app"]);
    assert_eq!(used.description, "sales runtime");

    let bytes = listed.encode_to_vec();
    for key in [&first, &second] {
        let random_part = key.secret.rsplit_once('_').unwrap().1;
        let raw: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&random_part[2 * i..2 * i + 2], 16).unwrap()).collect();
        let hash = Sha256::digest(&raw);
        assert!(!contains(&bytes, random_part.as_bytes()) && !contains(&bytes, &hash), "the list leaks {key:?}");
    }

    let third = server.create_key("acme", &[]).await;
    let page = server.list_keys("acme", 2, "").await.unwrap();
    assert_eq!(page.api_keys.len(), 2);
    let rest = server.list_keys("acme", 2, &page.next_page_token).await.unwrap();
    assert_eq!((rest.api_keys.len(), rest.next_page_token.as_str()), (1, ""));
    let mut ids: Vec<String> = page.api_keys.iter().chain(&rest.api_keys).map(|k| k.key_id.clone()).collect();
    assert!(ids.is_sorted(), "{ids:?}");
    ids.sort();
    let mut created = vec![first.key_id, second.key_id, third.key_id];
    created.sort();
    assert_eq!(ids, created);
    expect_field(server.list_keys("acme", 1_001, "").await, "page_size");
    expect_field(server.list_keys("acme", 0, "not a token").await, "page_token");
    error_info(&expect_code(server.list_keys("nobody", 0, "").await, Code::NotFound), "UNKNOWN_TENANT");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[tokio::test]
async fn creating_a_key_checks_its_tenant_environments_fields_and_the_tenants_cap() {
    // Proves that a key's tenant must exist and each listed environment be one of its own, that the
    // environment list and description are bounded, and that a tenant may have `max_api_keys_per_tenant`
    // keys (N−1, N: granted; N+1: RESOURCE_EXHAUSTED TOO_MANY_API_KEYS until one is revoked); no refusal
    // creates a key.
    let server = secured(None).await;
    two_tenants(&server).await;
    let mut admin = server.admin.clone();
    let mut create = async |request: CreateApiKeyRequest| admin.create_api_key(request).await.map(Response::into_inner);

    error_info(&expect_code(create(create_request("nobody", &[])).await, Code::NotFound), "UNKNOWN_TENANT");
    let other =
        expect_code(create(create_request("acme", &["acme-prod", "globex-prod"])).await, Code::FailedPrecondition);
    error_info(&other, "ENVIRONMENT_OF_ANOTHER_TENANT");
    error_info(&expect_code(create(create_request("acme", &["ghost"])).await, Code::NotFound), "UNKNOWN_ENVIRONMENT");
    expect_field(create(create_request("acme", &["acme-prod", "acme-prod"])).await, "environment_ids[1]");
    let many: Vec<String> = (0..65).map(|i| format!("env-{i}")).collect();
    let many = CreateApiKeyRequest { environment_ids: many, ..create_request("acme", &[]) };
    let status = expect_field(create(many).await, "environment_ids");
    assert!(status.message().contains("limit is 64"), "{status:?}");
    let long = CreateApiKeyRequest { description: "d".repeat(257), ..create_request("acme", &[]) };
    let status = expect_field(create(long).await, "description");
    assert!(status.message().contains("limit is 256 bytes"), "{status:?}");
    assert!(server.list_keys("acme", 0, "").await.unwrap().api_keys.is_empty(), "no refusal created a key");

    let mut keys = Vec::new();
    for _ in 0..KEYS_PER_TENANT {
        let longest = CreateApiKeyRequest { description: "d".repeat(256), ..create_request("acme", &[]) };
        keys.push(create(longest).await.expect("up to the cap"));
    }
    let refused = expect_code(create(create_request("acme", &[])).await, Code::ResourceExhausted);
    let info = error_info(&refused, "TOO_MANY_API_KEYS");
    assert_eq!(metadata_u64(&info, "limit"), KEYS_PER_TENANT as u64);
    assert!(refused.message().contains("3 API keys, its limit"), "{refused:?}");
    assert_eq!(server.list_keys("acme", 0, "").await.unwrap().api_keys.len(), KEYS_PER_TENANT);
    create(create_request("globex", &["globex-prod"])).await.expect("the cap is per tenant");
    server.revoke_key(&keys[0]).await.unwrap();
    create(create_request("acme", &[])).await.expect("a revocation frees a place");
}

/// Polls the balance through `secret` until `done` holds, for at most [`WAIT_DEADLINE`].
async fn wait_for_balance_with(server: &TestServer, secret: &str, environment: &str, done: impl Fn(&Balance) -> bool) {
    let polled = tokio::time::timeout(WAIT_DEADLINE, async {
        loop {
            if done(&server.balance_with(secret, environment).await.unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    polled.await.unwrap_or_else(|_| panic!("the balance of {environment} never met the condition"));
}

#[tokio::test]
async fn a_keys_open_reservations_are_capped_and_freed_as_its_holds_resolve() {
    // Proves the per-key cap on open holds at N−1, N and N+1 (RESOURCE_EXHAUSTED TOO_MANY_OPEN_RESERVATIONS,
    // scope `api_key`, naming the limit, holding nothing), that it binds one key and not its tenant's
    // others, and that a commit, a release, an expiry and a release-all each give a place back.
    let server = secured(None).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    let key = server.create_key("acme", &[]).await;
    let other = server.create_key("acme", &[]).await;
    let mut holds = Vec::new();
    for _ in 0..KEY_CAP {
        holds.push(server.reserve_with(&key.secret, "acme-prod", 1).await.expect("up to the cap").reservation_id);
    }
    let before = server.balance_with(&key.secret, "acme-prod").await.unwrap();
    let refused = expect_code(server.reserve_with(&key.secret, "acme-prod", 1).await, Code::ResourceExhausted);
    let info = error_info(&refused, "TOO_MANY_OPEN_RESERVATIONS");
    assert_eq!(info.metadata.get("scope").map(String::as_str), Some("api_key"), "{info:?}");
    assert_eq!(metadata_u64(&info, "limit"), KEY_CAP);
    assert!(refused.message().contains("this API key has 3 open reservations, its limit"), "{refused:?}");
    expect_code(server.dry_run_with(&key.secret, "acme-prod").await, Code::ResourceExhausted);
    assert_eq!(server.balance_with(&key.secret, "acme-prod").await.unwrap(), before, "the refusal held nothing");
    let others = server.reserve_with(&other.secret, "acme-prod", 1).await.expect("another key has its own cap");
    server.release_with(&other.secret, &others.reservation_id).await.unwrap();

    server.commit_with(&key.secret, &holds[0], 1).await.unwrap();
    server.reserve_with(&key.secret, "acme-prod", 1).await.expect("a commit gives a place back");
    server.release_with(&key.secret, &holds[1]).await.unwrap();
    let short = CheckAndReserveRequest { ttl_seconds: 1, ..reserve_request("acme-prod", 1) };
    server.reserve_request_with(&key.secret, short).await.expect("a release gives a place back");
    expect_code(server.reserve_with(&key.secret, "acme-prod", 1).await, Code::ResourceExhausted);

    server.clock.advance_ms(1_000);
    wait_for_balance_with(&server, &key.secret, "acme-prod", |b| b.reserved_milli == milli(2)).await;
    server.reserve_with(&key.secret, "acme-prod", 1).await.expect("an expiry gives a place back");
    let listed = server.list_keys("acme", 0, "").await.unwrap().api_keys;
    assert_eq!(listed.iter().find(|k| k.key_id == key.key_id).unwrap().open_reservations, KEY_CAP);

    let release_all = ReleaseAllRequest { environment_id: "acme-prod".into(), agent_id: String::new() };
    server.admin.clone().release_all(release_all).await.unwrap();
    for _ in 0..KEY_CAP {
        server.reserve_with(&key.secret, "acme-prod", 1).await.expect("a release-all gives every place back");
    }
}

#[tokio::test]
async fn keys_and_revocations_survive_a_restart() {
    // Proves that keys, their scope and their holds are durable and a revocation too: after a restart
    // on the same data directory the kept key works and still counts its open hold, the revoked key is
    // refused, and the hold still names the key it was made with.
    let dir = tempfile::tempdir().unwrap();
    let config = Config { auth: auth_on(None), ..config_on(dir.path(), Durability::Write) };
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_as_configured(config.clone(), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 100).await;
    server.allocate("acme", "acme-dev", 100, false).await;
    let kept = server.create_key("acme", &["acme-prod"]).await;
    let revoked = server.create_key("acme", &[]).await;
    let hold = server.reserve_with(&kept.secret, "acme-prod", 2).await.unwrap();
    server.reserve_with(&revoked.secret, "acme-prod", 1).await.unwrap();
    server.revoke_key(&revoked).await.unwrap();
    let listed_before = server.list_keys("acme", 0, "").await.unwrap().api_keys;
    server.shutdown().await.unwrap();

    let server = spawn_server_as_configured(config, clock).await;
    expect_code(server.reserve_with(&revoked.secret, "acme-prod", 1).await, Code::Unauthenticated);
    let listed = server.list_keys("acme", 0, "").await.unwrap().api_keys;
    let restored = ApiKey { last_used_unix_ms: 0, ..listed_before[0].clone() };
    assert_eq!(listed, [restored], "the last use is kept in memory only");
    assert_eq!((listed[0].key_id.as_str(), listed[0].open_reservations), (kept.key_id.as_str(), 1));
    expect_code(server.reserve_with(&kept.secret, "acme-dev", 1).await, Code::PermissionDenied);
    assert!(server.try_balance("acme-dev").await.is_err(), "agent calls still need a key");
    let request = ListReservationsRequest { environment_id: "acme-prod".into(), ..Default::default() };
    let open = server.admin.clone().list_reservations(request).await.unwrap().into_inner().reservations;
    let kept_hold = open.iter().find(|r| r.reservation_id == hold.reservation_id).expect("the hold survives");
    assert_eq!(kept_hold.api_key_id, kept.key_id);
    server.commit_with(&kept.secret, &hold.reservation_id, 2).await.expect("the kept key works");
    assert_eq!(server.list_keys("acme", 0, "").await.unwrap().api_keys[0].open_reservations, 0);
}

/// The binary with `--auth <auth>`, listening on `listen`, keeping its data in `data_dir`.
fn quotad_on(auth: &str, listen: &str, data_dir: &std::path::Path) -> tokio::process::Command {
    let mut command = quotad_binary();
    command.args(["--auth", auth, "--listen", listen, "--data-dir"]).arg(data_dir);
    command
}

type LogLines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// Starts the binary and reads its log up to the line with the gRPC address: the child, the rest of
/// its log, the lines read, and the address.
async fn start_logging(
    mut command: tokio::process::Command,
) -> (tokio::process::Child, LogLines, Vec<String>, std::net::SocketAddr) {
    let mut child = command.spawn().expect("start quotad");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let addr = bounded("the listening line", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("quotad logs its address before exiting");
            log.push(line.clone());
            if line.contains("listening") {
                return listen_address(&line);
            }
        }
    })
    .await;
    (child, lines, log, addr)
}

#[tokio::test]
async fn an_admin_token_given_with_auth_off_is_reported_as_ignored() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut command = quotad_on("off", "127.0.0.1:0", data_dir.path());
    command.env("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN);
    let (mut child, _, log, _) = start_logging(command).await;
    child.kill().await.unwrap();
    let warning = log.iter().find(|line| line.contains("WARN") && line.contains("admin token given is ignored"));
    assert!(warning.is_some(), "no warning that the token is ignored in:\n{}", log.join("\n"));
    assert!(log.iter().all(|line| !line.contains(ADMIN_TOKEN)), "the token itself is never logged");
}

#[tokio::test]
async fn credentials_never_appear_in_the_log() {
    // Proves that the binary with authentication on, logging every request's span at debug level, writes
    // neither the admin token nor an API key's secret (nor its random part) in its log, while it logs
    // the key's creation by id.
    let data_dir = tempfile::tempdir().unwrap();
    let mut command = quotad_on("on", "127.0.0.1:0", data_dir.path());
    command.env("QUOTAD_ADMIN_TOKEN", ADMIN_TOKEN).env("RUST_LOG", "debug");
    let (mut child, mut lines, mut log, addr) = start_logging(command).await;
    let channel = connect(addr).await;
    let mut admin = quotad::proto::quota_admin_client::QuotaAdminClient::new(channel.clone());
    let mut quota = quotad::proto::quota_client::QuotaClient::new(channel);
    let purchase = PurchaseCapacityRequest { tenant_id: "acme".into(), packs: 1, idempotency_key: String::new() };
    admin.purchase_capacity(bearer(purchase, ADMIN_TOKEN)).await.unwrap();
    admin.allocate_capacity(bearer(allocate_request("acme", "acme-prod", 10, false), ADMIN_TOKEN)).await.unwrap();
    let key = admin.create_api_key(bearer(create_request("acme", &[]), ADMIN_TOKEN)).await.unwrap().into_inner();
    quota.check_and_reserve(bearer(reserve_request("acme-prod", 1), &key.secret)).await.unwrap();
    // The secret with its last character changed (to one it is not).
    let replacement = if key.secret.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{replacement}", &key.secret[..key.secret.len() - 1]);
    assert!(quota.check_and_reserve(bearer(reserve_request("acme-prod", 1), &wrong)).await.is_err());
    admin.revoke_api_key(bearer(RevokeApiKeyRequest { key_id: key.key_id.clone() }, ADMIN_TOKEN)).await.unwrap();

    child.start_kill().unwrap();
    bounded("the rest of the log", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line);
        }
    })
    .await;
    let _ = child.wait().await;
    let log = log.join("\n");
    assert!(log.contains("API key created") && log.contains(&key.key_id), "{log}");
    let random_part = key.secret.rsplit_once('_').unwrap().1;
    for secret in [ADMIN_TOKEN, random_part, &wrong] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}
