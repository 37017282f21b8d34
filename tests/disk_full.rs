//! A data directory on a disk that fills up: quotad refuses changes it cannot log, reports
//! NOT_SERVING, and recovers by itself once there is room, without losing what it acknowledged.
//! The disk is a small tmpfs mounted for the test, which needs root (as CI runs); elsewhere the test
//! says so and passes without running.

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use common::*;
use quotad::{
    clock::ManualClock,
    config::{Config, Settings},
    durability::{journal::Durability, store::StorageConfig},
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size_bytes: u64) -> Option<Self> {
        let path = tempfile::Builder::new()
            .prefix("disk-full-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("a mount point")
            .keep();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(&path)
            .status()
            .ok()?;
        status.success().then_some(Self { path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily, so that a test failing with the server still up leaves no mount behind either.
        let _ = Command::new("umount").arg("--lazy").arg(&self.path).status();
    }
}

/// Fills the file system holding `dir` until a write fails for lack of space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let block = vec![0u8; 4096];
    loop {
        match file.write_all(&block).and_then(|()| file.sync_all()) {
            Ok(()) => continue,
            Err(error) if error.raw_os_error() == Some(28) => return path, // ENOSPC
            Err(error) => panic!("filling the disk: {error}"),
        }
    }
}

fn newest_segment_len(dir: &Path) -> u64 {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().unwrap().to_str().unwrap().starts_with("wal-"))
        .collect();
    segments.sort();
    std::fs::metadata(segments.last().expect("a log segment")).unwrap().len()
}

fn config_on(dir: &Path, max_segment_bytes: u64) -> Config {
    let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    config.storage = Some(StorageConfig {
        dir: dir.to_owned(),
        durability: Durability::Write,
        fsync_interval: Duration::from_millis(10),
        snapshot_interval: Duration::from_secs(3600),
        recover_from_older_snapshot: false,
        max_segment_bytes,
    });
    config
}

async fn health(server: &TestServer) -> ServingStatus {
    let request = HealthCheckRequest { service: "quota.v1.Quota".into() };
    let response = server.health.clone().check(request).await.expect("health answers");
    ServingStatus::try_from(response.into_inner().status).unwrap()
}

/// Polls health until it reports `wanted`, for at most [`WAIT_DEADLINE`] twice over (the log retries
/// with a backoff of up to a second).
async fn wait_for_health(server: &TestServer, wanted: ServingStatus) {
    let waited = tokio::time::timeout(WAIT_DEADLINE * 2, async {
        while health(server).await != wanted {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "health never became {wanted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_changes_then_recovers_by_itself_losing_nothing() {
    // Proves: with no space left, a change is answered UNAVAILABLE (LOG_UNAVAILABLE) and health turns
    // NOT_SERVING; freeing space brings SERVING back without a restart; and after a restart the state
    // holds every acknowledged hold, and the refused-after-apply one at most once. Segments larger than
    // the disk cannot be preallocated, so every record is written with `pwrite`, which fails.
    full_disk_scenario(64 * 1024 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_once_the_preallocated_segment_is_used_up() {
    // Proves the same with small segments: the log goes on writing into the space it reserved, and
    // refuses once it needs a new segment that the disk cannot hold.
    full_disk_scenario(32 * 1024).await;
}

async fn full_disk_scenario(max_segment_bytes: u64) {
    const DISK_BYTES: u64 = 2 * 1024 * 1024;
    let Some(disk) = Tmpfs::mount(DISK_BYTES) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let dir = disk.path.join("data");
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = spawn_server_with_config(config_on(&dir, max_segment_bytes), clock.clone()).await;
    server.bootstrap("acme", "acme-prod", 10_000).await;
    let mut acknowledged = 0u64;
    for _ in 0..3 {
        server.reserve("acme-prod", 1).await;
        acknowledged += 1;
    }
    let segment_len = newest_segment_len(&dir);
    assert_eq!(segment_len == max_segment_bytes, max_segment_bytes < DISK_BYTES, "preallocated: {segment_len} bytes");

    let filler = fill(&disk.path);
    let mut refused = None;
    for attempt in 0..5_000 {
        let mut request = reserve_request("acme-prod", 1);
        request.idempotency_key = format!("during-full-{attempt}");
        match server.try_reserve(request).await {
            Ok(_) => acknowledged += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                error_info(&status, "LOG_UNAVAILABLE");
                refused = Some(format!("during-full-{attempt}"));
                break;
            }
        }
    }
    let refused_key = refused.expect("a full disk refuses a change within 5,000 small writes");
    wait_for_health(&server, ServingStatus::NotServing).await;
    let status = server.try_reserve(reserve_request("acme-prod", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "refused up front while the log cannot write");
    assert!(server.try_balance("acme-prod").await.is_ok(), "reads are still answered");

    std::fs::remove_file(filler).unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    server.reserve("acme-prod", 1).await;
    acknowledged += 1;
    let before = server.balance("acme-prod").await;
    server.shutdown().await.expect("a clean shutdown");

    let server = spawn_server_with_config(config_on(&dir, max_segment_bytes), clock).await;
    let after = server.balance("acme-prod").await;
    assert_eq!(after, before, "a restart restores exactly the state before it");
    let held = after.reserved_milli / milli(1);
    assert!(
        held == acknowledged || held == acknowledged + 1,
        "{held} holds after {acknowledged} acknowledged ones and one refused after it was applied"
    );
    // The refused request is safe to retry: it holds once, whether or not it had been applied.
    let mut retry = reserve_request("acme-prod", 1);
    retry.idempotency_key = refused_key;
    server.try_reserve(retry).await.expect("the retry is granted");
    let retried = server.balance("acme-prod").await.reserved_milli / milli(1);
    assert_eq!(retried, acknowledged + 1);
    server.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_applied_before_its_log_write_failed_is_counted_once() {
    // Proves: a commit and a reservation that the ledger applied but whose log write then failed (the
    // caller is answered UNAVAILABLE, and its retry returns the applied change) count their charge and
    // their grant once, as the change exists: the counters agree with the ledger.
    let Some(disk) = Tmpfs::mount(2 * 1024 * 1024) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let dir = disk.path.join("data");
    let config = config_on(&dir, 64 * 1024 * 1024);
    let (server, metrics) = spawn_server_with_metrics(config, Arc::new(ManualClock::new(START_MS))).await;
    server.bootstrap("acme", "acme-prod", 10_000).await;
    let mut holds = Vec::new();
    for _ in 0..200 {
        holds.push(server.reserve("acme-prod", 1).await.reservation_id);
    }

    // Commits until one is answered UNAVAILABLE after the ledger applied it.
    let filler = fill(&disk.path);
    let mut committed = 0u64;
    let refused_commit = loop {
        let hold = holds.pop().expect("a commit is refused within 200 small writes");
        match server.try_commit(commit_request(&hold, 1)).await {
            Ok(_) => committed += 1,
            Err(status) => {
                error_info(&status, "LOG_UNAVAILABLE");
                break hold;
            }
        }
    };
    std::fs::remove_file(filler).unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let retry = server.commit(&refused_commit, 1).await;
    assert_eq!(retry.charged_milli, milli(1), "the retry returns the applied commit");
    let charged = metric(metrics, "quotad_charged_milli_total{source=\"allocation\"}").await;
    assert_eq!(charged, milli(committed + 1) as f64, "{committed} commits answered, one more applied");

    // Reservations until one is answered UNAVAILABLE after the ledger applied it.
    let filler = fill(&disk.path);
    let mut granted = 200u64;
    let refused_key = 'reserving: {
        for attempt in 0..5_000 {
            let mut request = reserve_request("acme-prod", 1);
            request.idempotency_key = format!("during-full-{attempt}");
            match server.try_reserve(request.clone()).await {
                Ok(_) => granted += 1,
                Err(status) => {
                    error_info(&status, "LOG_UNAVAILABLE");
                    break 'reserving request.idempotency_key;
                }
            }
        }
        panic!("a full disk refuses a change within 5,000 small writes");
    };
    std::fs::remove_file(filler).unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut retry = reserve_request("acme-prod", 1);
    retry.idempotency_key = refused_key;
    server.try_reserve(retry).await.expect("the retry returns the applied hold");
    let open_holds = metric(metrics, "quotad_open_holds").await;
    assert_eq!(open_holds, (granted + 1 - committed - 1) as f64);
    assert_eq!(metric(metrics, "quotad_reservations_granted_total").await, (granted + 1) as f64);
    server.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_log_cannot_hold_is_refused_whole_and_its_retry_holds_each_item_once() {
    // Proves: on a full disk a CheckAndReserveBatch is answered UNAVAILABLE (LOG_UNAVAILABLE) as a whole,
    // with no item's result, and refused up front while health is NOT_SERVING; once there is room again,
    // retrying it with the same idempotency keys holds each of its items exactly once, whether or not it
    // had been applied before its log write failed.
    let Some(disk) = Tmpfs::mount(2 * 1024 * 1024) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let dir = disk.path.join("data");
    let server =
        spawn_server_with_config(config_on(&dir, 64 * 1024 * 1024), Arc::new(ManualClock::new(START_MS))).await;
    server.bootstrap("acme", "acme-prod", 100_000).await;
    let batch = |attempt: usize| -> Vec<_> {
        (0..5)
            .map(|i| quotad::proto::CheckAndReserveRequest {
                idempotency_key: format!("full-{attempt}-{i}"),
                ..reserve_request("acme-prod", 1)
            })
            .collect()
    };
    let filler = fill(&disk.path);
    let mut acknowledged = 0;
    let mut refused = None;
    for attempt in 0..2_000 {
        match server.try_reserve_batch(batch(attempt)).await {
            Ok(results) => {
                assert!(results.iter().all(Result::is_ok), "{results:?}");
                acknowledged += results.len();
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                error_info(&status, "LOG_UNAVAILABLE");
                refused = Some(attempt);
                break;
            }
        }
    }
    let refused = refused.expect("a full disk refuses a batch within 2,000 small ones");
    wait_for_health(&server, ServingStatus::NotServing).await;
    let up_front = server.try_reserve_batch(batch(refused + 1)).await.unwrap_err();
    assert_eq!(up_front.code(), Code::Unavailable, "refused before anything is applied: {up_front:?}");

    std::fs::remove_file(filler).unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let retried = server.reserve_batch(batch(refused)).await;
    assert!(retried.iter().all(Result::is_ok), "{retried:?}");
    let held = server.balance("acme-prod").await.reserved_milli;
    assert_eq!(held, milli(acknowledged as u64 + 5), "each item of the refused batch is held once");
    server.shutdown().await.expect("a clean shutdown");
}

/// The value of the sample `series` (its name and labels as the text format writes them) in a scrape.
async fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: quotad\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let line = answer.lines().find(|line| line.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')));
    let line = line.unwrap_or_else(|| panic!("no {series} in {answer}"));
    line[series.len()..].trim().parse().unwrap()
}
