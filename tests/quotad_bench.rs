//! `quotad-bench`, the load generator, through the real binary against a real server on an ephemeral
//! port: the flags the benchmark suite (`bench/suite.sh`) relies on besides the plain load. The body
//! `--grpc-body` writes is a call quotad serves; `--window` splits a run's operations into windows that
//! add up to the run; `--expire-at` sends the TTLs that make holds expire in the second asked for.
//! Nothing here measures speed.

mod common;

use std::{net::SocketAddr, path::Path, process::Stdio, sync::Arc, time::SystemTime};

use bytes::Bytes;
use common::*;
use quotad::{
    clock::ManualClock,
    config::{Config, Settings},
    proto::ListReservationsRequest,
};
use tonic::{Code, Status};

/// What one run of `quotad-bench` did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `quotad-bench <args>` to completion, bounded, without the caller's `QUOTAD_*` variables.
async fn bench(args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_quotad-bench"));
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("QUOTAD_") {
            command.env_remove(var);
        }
    }
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let output = bounded("quotad-bench", command.output()).await.expect("run quotad-bench");
    Run {
        code: output.status.code().expect("quotad-bench exits rather than being killed"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

async fn bench_ok(args: &[&str]) -> String {
    let run = bench(args).await;
    assert_eq!(run.code, 0, "quotad-bench {args:?}: {run:?}");
    run.stdout
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("the JSON report")).expect("valid JSON")
}

/// Posts `body` to `path` as a gRPC call on a new HTTP/2 connection, as h2load does, and returns the
/// gRPC status of the answer.
async fn post(addr: SocketAddr, path: &str, body: Vec<u8>) -> Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    stream.send_data(Bytes::from(body), true).unwrap();
    let (parts, mut body) = bounded("the answer", response).await.expect("an HTTP/2 response").into_parts();
    assert_eq!(parts.status, http::StatusCode::OK);
    while let Some(data) = bounded("the body", body.data()).await {
        data.expect("the response body");
    }
    let trailers = bounded("the trailers", body.trailers()).await.expect("the trailers");
    Status::from_header_map(&parts.headers)
        .or_else(|| trailers.as_ref().and_then(Status::from_header_map))
        .expect("a grpc-status")
}

#[tokio::test]
async fn the_grpc_body_written_for_h2load_is_a_call_quotad_serves() {
    let server = spawn_server().await;
    server.bootstrap("acme", "acme-env-0000000", 100).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reserve.bin");
    let file_arg = file.to_str().unwrap();

    let printed = bench_ok(&["--grpc-body", file_arg, "--scenario", "reserve", "--tenant", "acme"]).await;
    assert_eq!(printed, "/quota.v1.Quota/CheckAndReserve\n");
    let status = post(server.addr, printed.trim_end(), std::fs::read(&file).unwrap()).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(server.balance("acme-env-0000000").await.reserved_milli, milli(1), "the body reserved 1 message");

    let printed = bench_ok(&["--grpc-body", file_arg, "--scenario", "health"]).await;
    assert_eq!(printed, "/grpc.health.v1.Health/Check\n");
    let status = post(server.addr, printed.trim_end(), std::fs::read(&file).unwrap()).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

#[tokio::test]
async fn no_grpc_body_is_written_for_a_pair_of_calls() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pair.bin");
    let run = bench(&["--grpc-body", file.to_str().unwrap(), "--scenario", "reserve+commit"]).await;
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("reserve+commit needs the reservation id"), "{run:?}");
    assert!(!file.exists());
}

#[tokio::test]
async fn windows_add_up_to_the_run() {
    let server = spawn_server().await;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("run.json");
    let server_url = format!("http://{}", server.addr);
    let args = ["--server", &server_url, "--scenario", "health", "-n", "300", "-c", "4", "--connections", "2"];
    let extra = ["--warmup", "0s", "--window", "10ms", "--json", report.to_str().unwrap()];
    let printed = bench_ok(&[&args[..], &extra[..]].concat()).await;
    assert!(printed.contains("(per window)"), "{printed}");

    let report = json(&report);
    assert_eq!(report["ok"], 300);
    assert_eq!(report["window_s"], 0.01);
    let windows = report["windows"].as_array().expect("windows");
    assert!(!windows.is_empty());
    let ok: u64 = windows.iter().map(|w| w["ok"].as_u64().unwrap()).sum();
    let failed: u64 = windows.iter().map(|w| w["failed"].as_u64().unwrap()).sum();
    assert_eq!((ok, failed), (300, 0), "every operation is in one window");
    let first_ms = windows[0]["start_unix_ms"].as_u64().unwrap();
    let first_s = windows[0]["start_s"].as_f64().unwrap();
    assert_eq!(first_ms % 10, 0, "windows start on the wall clock's multiples of their length");
    assert!((-0.01..=0.0).contains(&first_s), "the first window starts at or before the recording: {first_s}");
    for (i, window) in windows.iter().enumerate() {
        assert!((window["start_s"].as_f64().unwrap() - first_s - i as f64 * 0.01).abs() < 1e-9, "{window}");
        assert_eq!(window["start_unix_ms"].as_u64().unwrap(), first_ms + 10 * i as u64, "{window}");
        let (p50, p99, max) = (window["p50"].as_u64(), window["p99"].as_u64(), window["max"].as_u64());
        assert!(p50 <= p99 && p99 <= max, "{window}");
    }
}

#[tokio::test]
async fn expire_at_sends_the_ttl_that_ends_in_that_second() {
    // The server's clock stands at the time the test starts; quotad-bench reads the wall clock as it
    // sends, so each TTL is the distance from its own second to the one asked for.
    let now_s = |at: SystemTime| at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    let started_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
    let server = spawn_server_with_config(config, Arc::new(ManualClock::new(started_ms))).await;
    let server_url = format!("http://{}", server.addr);
    let expire_at = started_ms / 1_000 + 100;

    let before = now_s(SystemTime::now());
    let args = ["--server", &server_url, "--scenario", "reserve", "-n", "20", "-c", "2", "-e", "1", "--warmup", "0s"];
    bench_ok(&[&args[..], &["--ttl-seconds", "30", "--expire-at", &expire_at.to_string()]].concat()).await;
    let after = now_s(SystemTime::now());

    let request = ListReservationsRequest { environment_id: "bench-env-0000000".into(), ..Default::default() };
    let open = server.admin.clone().list_reservations(request).await.unwrap().into_inner().reservations;
    assert_eq!(open.len(), 20);
    for hold in open {
        let ttl_s = (hold.expires_at_unix_ms - hold.created_at_unix_ms) / 1_000;
        assert!((expire_at - after..=expire_at - before).contains(&ttl_s), "a TTL of {ttl_s} s: {hold:?}");
    }
}

#[tokio::test]
async fn expire_at_in_the_past_is_a_usage_error() {
    let run = bench(&["--expire-at", "1000", "--scenario", "reserve"]).await;
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("--expire-at 1000: must be 2 s to 86400 s ahead"), "{run:?}");
}
