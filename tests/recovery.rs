//! Restarts on the same data directory: what a restart keeps (holds with their original expiry,
//! idempotency keys, resolved reservations for retries) and what it releases (holds that expired while
//! the server was down), in every durability mode that keeps a log.

mod common;

use std::sync::Arc;

use common::*;
use quotad::{
    clock::ManualClock,
    config::{Config, Settings},
    durability::journal::Durability,
};

fn data_dir() -> std::path::PathBuf {
    tempfile::Builder::new().prefix("recovery-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep()
}

/// Holds, charges, links and idempotency keys made before a graceful restart are all there after it.
async fn restart_keeps_everything(durability: Durability) {
    let dir = data_dir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(&dir, durability), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    server.link("acme-sales-app", "acme-prod").await;
    let mut keyed = reserve_request("acme-sales-app", 7);
    keyed.idempotency_key = "call-1".into();
    keyed.ttl_seconds = 600;
    let open = server.try_reserve(keyed.clone()).await.unwrap();
    let committed = server.reserve("acme-prod", 5).await;
    let first_commit = server.commit(&committed.reservation_id, 4).await;
    let before = server.balance("acme-prod").await;
    let tenant_before = server.tenant("acme").await;
    server.shutdown().await.unwrap();

    let server = spawn_server_with_config(config_on(&dir, durability), clock.clone()).await;
    assert_eq!(server.balance("acme-sales-app").await, before, "the link and the balance survive");
    assert_eq!(server.tenant("acme").await, tenant_before);
    let retried = server.try_reserve(keyed).await.unwrap();
    assert_eq!(retried.reservation_id, open.reservation_id, "the idempotency key survives");
    assert_eq!(retried.expires_at_unix_ms, open.expires_at_unix_ms, "with its original expiry");
    assert_eq!(server.balance("acme-prod").await.reserved_milli, milli(7), "held once");
    let again = server.commit(&committed.reservation_id, 4).await;
    assert_eq!(again.charged_milli, first_commit.charged_milli, "a retried commit gets the first answer");
    assert_eq!(server.balance("acme-prod").await.allocation_used_milli, milli(4), "and charges nothing twice");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_in_write_mode_keeps_everything() {
    // Proves that a graceful restart with the default durability keeps every kind of state.
    restart_keeps_everything(Durability::Write).await;
}

#[tokio::test]
async fn a_restart_in_fsync_mode_keeps_everything() {
    // Proves that a graceful restart in fsync mode keeps every kind of state.
    restart_keeps_everything(Durability::Fsync).await;
}

#[tokio::test]
async fn a_restart_in_none_mode_keeps_what_the_shutdown_snapshot_holds() {
    // Proves that without a log, the snapshot written at graceful shutdown still carries the state over.
    restart_keeps_everything(Durability::None).await;
}

#[tokio::test]
async fn holds_that_expired_while_the_server_was_down_are_released_before_it_serves() {
    // Proves that a restart keeps each hold's original expiry: one that passed while the server was down
    // is released before the first request, one that has not is still held.
    let dir = data_dir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 1_000).await;
    let mut short = reserve_request("acme-prod", 3);
    short.ttl_seconds = 10;
    let short = server.try_reserve(short).await.unwrap();
    let mut long = reserve_request("acme-prod", 5);
    long.ttl_seconds = 600;
    let long = server.try_reserve(long).await.unwrap();
    server.shutdown().await.unwrap();

    clock.advance_ms(60_000);
    let server = spawn_server_with_config(config_on(&dir, Durability::Write), clock.clone()).await;
    // The first answer already reflects the expiry: it ran before the server started serving.
    assert_eq!(server.balance("acme-prod").await.reserved_milli, milli(5));
    let late = server.commit(&short.reservation_id, 3).await;
    assert!(late.late, "the expired hold is committed late");
    let on_time = server.commit(&long.reservation_id, 5).await;
    assert!(!on_time.late);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_bootstrap_applies_only_to_an_empty_data_directory() {
    // Proves that a restart does not apply the config's bootstrap again on top of recovered state.
    let dir = data_dir();
    let settings: Settings = toml::from_str(include_str!("../examples/quotad.toml")).unwrap();
    let config = || {
        let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), settings.clone()).unwrap();
        config.storage = config_on(&dir, Durability::Write).storage;
        config
    };
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config(), clock.clone()).await;
    let first = server.tenant("demo").await;
    server.shutdown().await.unwrap();
    let server = spawn_server_with_config(config(), clock).await;
    assert_eq!(server.tenant("demo").await, first, "bought once, not twice");
    server.shutdown().await.unwrap();
}
