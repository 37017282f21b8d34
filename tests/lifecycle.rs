//! The server's life: health while serving and from the moment shutdown begins, reflection, graceful
//! shutdown in-process and of the real `quotad` binary on SIGTERM and SIGINT, bootstrap from a config
//! file, transparent huge pages off for the process, and exit code 64 for a bad configuration.

mod common;

use std::{net::SocketAddr, path::PathBuf};

use common::*;
use quotad::config::Settings;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
// tonic re-exports tokio-stream for generated code; reflection's bidirectional stream needs a request stream.
use tonic::codegen::tokio_stream;

async fn health_of(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let request = HealthCheckRequest { service: service.into() };
    client.check(request).await.expect("health check").into_inner().status()
}

#[tokio::test]
async fn health_reports_serving_while_running() {
    // Proves that the whole server ("") and each quota service report SERVING once the server runs.
    let server = spawn_server().await;
    let mut health = server.health.clone();
    for service in ["", "quota.v1.Quota", "quota.v1.QuotaAdmin"] {
        assert_eq!(health_of(&mut health, service).await, ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
    expect_code(unknown, Code::NotFound);
}

#[tokio::test]
async fn health_goes_not_serving_when_shutdown_begins_and_in_flight_calls_finish() {
    // Proves that a health watcher sees NOT_SERVING as soon as shutdown begins, that this in-flight stream
    // keeps being served during the drain, and that `run` then returns Ok.
    let mut server = spawn_server().await;
    let mut health = server.health.clone();
    let mut watch = health.watch(HealthCheckRequest { service: "quota.v1.Quota".into() }).await.unwrap().into_inner();
    let first = bounded("the first health update", watch.message()).await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.begin_shutdown();
    let next = bounded("the shutdown health update", watch.message()).await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);

    drop((watch, health));
    server.shutdown().await.expect("run returns Ok after a graceful shutdown");
}

#[tokio::test]
async fn a_call_that_never_finishes_does_not_hold_shutdown_past_the_grace_period() {
    // Proves that shutdown is bounded by the grace period: a watch stream left open does not keep `run`
    // from returning Ok.
    let settings = Settings { shutdown_grace_seconds: 0, ..Settings::default() };
    let server = spawn_server_with(settings).await;
    let mut health = server.health.clone();
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    bounded("the first health update", watch.message()).await.unwrap().unwrap();

    server.shutdown().await.expect("run returns Ok once the grace period is over");
    drop(watch);
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    // Proves that server reflection (v1 and v1alpha) lists the quota, admin and health services, so that
    // grpcurl and ghz need no proto files.
    use tonic_reflection::pb::{v1, v1alpha};
    let server = spawn_server().await;
    let channel = connect(server.addr).await;
    let expected = ["grpc.health.v1.Health", "quota.v1.Quota", "quota.v1.QuotaAdmin"];

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut responses = client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let response = bounded("reflection v1", responses.message()).await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = response.message_response
    else {
        panic!("not a service list: {response:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in expected {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut responses = client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let response = bounded("reflection v1alpha", responses.message()).await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("not a service list: {response:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in expected {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

// The real binary.

/// A `quotad` process started by a test; killed if the test fails before it exits.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    /// The rest of stderr after the `listening` line, collected until the process exits.
    stderr: JoinHandle<Vec<String>>,
}

/// `quotad` on a data directory of its own, kept under the target directory for a look after a failure.
fn quotad_command() -> Command {
    let data_dir = tempfile::Builder::new()
        .prefix("lifecycle-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary data directory")
        .keep();
    let mut command = quotad_binary();
    command.env("QUOTAD_DATA_DIR", data_dir);
    command
}

/// Starts `command` and waits for the line that says where it listens.
async fn start(mut command: Command) -> Daemon {
    let mut child = command.spawn().expect("start quotad");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = bounded("the listening line", async {
        loop {
            let Some(line) = lines.next_line().await.unwrap() else {
                panic!("quotad exited before listening; stderr: {seen:#?}");
            };
            if line.contains("listening") {
                return listen_address(&line);
            }
            seen.push(line);
        }
    })
    .await;
    let stderr = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    Daemon { child, addr, stderr }
}

impl Daemon {
    /// Sends `signal` (e.g. "TERM") with the `kill` command, and returns the exit status and the log after
    /// the `listening` line.
    async fn stop_with(mut self, signal: &str) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill").args([format!("-{signal}"), pid.to_string()]).status();
        assert!(status.expect("run kill").success(), "kill -{signal} {pid}");
        let exit = bounded("quotad's exit", self.child.wait()).await.expect("wait for quotad");
        let log = bounded("quotad's log", self.stderr).await.unwrap();
        (exit, log)
    }
}

async fn assert_serving(addr: SocketAddr) {
    let mut health = HealthClient::new(connect(addr).await);
    assert_eq!(health_of(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(health_of(&mut health, "quota.v1.Quota").await, ServingStatus::Serving);
}

#[tokio::test]
async fn the_binary_shuts_down_gracefully_on_sigterm() {
    // Proves that `quotad --listen 127.0.0.1:0` logs its address, serves, and on SIGTERM drains and exits 0.
    let mut command = quotad_command();
    command.args(["--listen", "127.0.0.1:0"]);
    let daemon = start(command).await;
    assert_ne!(daemon.addr.port(), 0);
    assert_serving(daemon.addr).await;

    let (exit, log) = daemon.stop_with("TERM").await;
    assert_eq!(exit.code(), Some(0), "{exit:?}; log: {log:#?}");
    assert!(log.iter().any(|l| l.contains("shutdown signal received")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:#?}");
}

#[tokio::test]
async fn a_sigterm_as_soon_as_the_address_is_logged_still_stops_gracefully() {
    // Proves that the signal handlers are in place before the address is logged: a SIGTERM sent at once
    // drains and exits 0 instead of meeting the default action.
    for _ in 0..5 {
        let mut command = quotad_command();
        command.args(["--listen", "127.0.0.1:0"]);
        let (exit, log) = start(command).await.stop_with("TERM").await;
        assert_eq!(exit.code(), Some(0), "{exit:?}; log: {log:#?}");
    }
}

#[tokio::test]
async fn the_binary_shuts_down_gracefully_on_sigint_with_a_client_connected() {
    // Proves that SIGINT also stops the binary with exit code 0, while a client connection is still open.
    let mut command = quotad_command();
    command.env("QUOTAD_LISTEN", "127.0.0.1:0");
    let daemon = start(command).await;
    let mut health = HealthClient::new(connect(daemon.addr).await);
    assert_eq!(health_of(&mut health, "").await, ServingStatus::Serving);

    let (exit, log) = daemon.stop_with("INT").await;
    assert_eq!(exit.code(), Some(0), "{exit:?}; log: {log:#?}");
    drop(health);
}

#[tokio::test]
async fn the_binary_bootstraps_the_example_config() {
    // Proves that `--config examples/quotad.toml` bootstraps the demo tenant, environment and linked app.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quotad.toml");
    let mut command = quotad_command();
    command.args(["--listen", "127.0.0.1:0", "--config"]).arg(&example).args(["--log-format", "json"]);
    let daemon = start(command).await;

    let mut quota = quotad::proto::quota_client::QuotaClient::new(connect(daemon.addr).await);
    let request = quotad::proto::GetBalanceRequest { environment_id: "demo-sales-app".into() };
    let balance = quota.get_balance(request).await.unwrap().into_inner();
    assert_eq!((balance.environment_id.as_str(), balance.tenant_id.as_str()), ("demo-env", "demo"));
    assert_eq!(balance.allocated_milli, milli(40_000));
    assert!(balance.draw_from_tenant_pool && balance.payg_enabled);
    assert_eq!(balance.payg_budget_milli, milli(5_000));
    assert_eq!(balance.available_milli, milli(40_000 + 10_000 + 5_000));

    let (exit, log) = daemon.stop_with("TERM").await;
    assert_eq!(exit.code(), Some(0), "{exit:?}; log: {log:#?}");
}

/// Runs `quotad` to its exit with a config file holding `contents`, and returns the exit code and stderr.
async fn run_with_config(name: &str, contents: &str, through_env: bool) -> (Option<i32>, String) {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{name}.toml"));
    std::fs::write(&path, contents).unwrap();
    let mut command = quotad_command();
    command.args(["--listen", "127.0.0.1:0"]);
    if through_env {
        command.env("QUOTAD_CONFIG", &path);
    } else {
        command.arg("--config").arg(&path);
    }
    let output = bounded("quotad with a bad config", command.output()).await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The `THP_enabled` line of a process's status: whether transparent huge pages may back its memory.
#[cfg(target_os = "linux")]
fn transparent_huge_pages_enabled(pid: &str) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|line| line.strip_prefix("THP_enabled:"));
    line.unwrap_or_else(|| panic!("no THP_enabled in the status of {pid}")).trim() == "1"
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_binary_turns_transparent_huge_pages_off_for_itself_unless_told_to_follow_the_system() {
    // Proves that quotad turns transparent huge pages off for its own process by default, and that with
    // `transparent_huge_pages = "system"` it keeps what it inherited (here, this test's own setting).
    let follow = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lifecycle-thp-system.toml");
    std::fs::write(&follow, "transparent_huge_pages = \"system\"\n").unwrap();
    let inherited = transparent_huge_pages_enabled("self");
    for (config, expected) in [(None, false), (Some(&follow), inherited)] {
        let mut command = quotad_command();
        command.args(["--listen", "127.0.0.1:0"]);
        if let Some(path) = config {
            command.arg("--config").arg(path);
        }
        let daemon = start(command).await;
        let pid = daemon.child.id().expect("running").to_string();
        assert_eq!(transparent_huge_pages_enabled(&pid), expected, "config {config:?}");
        let (exit, log) = daemon.stop_with("TERM").await;
        assert_eq!(exit.code(), Some(0), "{exit:?}; log: {log:#?}");
    }
}

#[tokio::test]
async fn an_invalid_config_file_exits_64_naming_the_key() {
    // Proves that a bad value, an unknown key and a missing file each make quotad exit 64 with a message
    // naming the key or the file, whether the file comes from --config or QUOTAD_CONFIG.
    let (code, stderr) = run_with_config("bad-value", "default_ttl_seconds = 7200\n", false).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    assert!(stderr.contains("default_ttl_seconds = 7200") && stderr.contains("max_ttl_seconds"), "{stderr}");

    let (code, stderr) = run_with_config("unknown-key", "pack_size = 10\n", true).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("pack_size"), "{stderr}");

    let (code, stderr) = run_with_config("bad-thp", "transparent_huge_pages = \"always\"\n", false).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("transparent_huge_pages") && stderr.contains("off") && stderr.contains("system"),
        "{stderr}"
    );

    let (code, stderr) = run_with_config("zero-cap", "max_open_reservations_total = 0\n", false).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("max_open_reservations_total"), "{stderr}");

    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lifecycle-no-such-file.toml");
    let mut command = quotad_command();
    command.args(["--listen", "127.0.0.1:0", "--config"]).arg(&missing);
    let output = bounded("quotad with a missing config", command.output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("cannot read config file") && stderr.contains("lifecycle-no-such-file.toml"), "{stderr}");
}

#[tokio::test]
async fn a_bad_flag_exits_64_and_help_exits_0() {
    // Proves that an unknown flag and a value the flag parser refuses are usage errors (64), like a bad
    // config value, and that --help prints to stdout and succeeds.
    for args in [&["--no-such-flag"][..], &["--listen", "not-an-address"], &["--durability", "sometimes"]] {
        let output = bounded("quotad with a bad flag", quotad_command().args(args).output()).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    let mut help = quotad_command();
    help.arg("--help").stdout(std::process::Stdio::piped());
    let output = bounded("quotad --help", help.output()).await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("--durability"));
}

#[tokio::test]
async fn state_is_served_until_shutdown_and_the_run_result_is_ok() {
    // Proves the in-process shutdown path used by every other test: calls succeed while running and
    // `run` returns Ok once the shutdown future resolves.
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 10).await;
    server.reserve("env", 1).await;
    server.shutdown().await.expect("run returns Ok");
}
