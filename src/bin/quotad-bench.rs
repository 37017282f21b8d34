//! `quotad-bench`: a gRPC load generator that knows the quota flow. It bootstraps a tenant and its
//! environments through `QuotaAdmin`, then drives one scenario (`reserve`, `reserve+commit`,
//! `reserve+release`, `balance`, or `health` for the transport's own cost) at a fixed concurrency over
//! a few HTTP/2 connections, with the unary calls or (`--batch-size`) their batch forms, and reports
//! throughput in calls and items, latency percentiles and errors by status code.
//!
//! `--window` adds latency per window of the wall clock, `--expire-at` makes holds expire in one chosen
//! second, and `--grpc-body` writes one call's framed body for HTTP/2 tools such as h2load.
//!
//! It sends traffic only to `--server`, for a bounded time or count: point it at a quotad on this
//! machine (loopback, e.g. `http://127.0.0.1:50051`). `bench/suite.sh` shows it in use.

#[path = "quotad_bench/cli.rs"]
mod cli;
#[path = "quotad_bench/grpc_body.rs"]
mod grpc_body;
#[path = "quotad_bench/load.rs"]
mod load;
#[path = "quotad_bench/report.rs"]
mod report;
#[path = "quotad_bench/setup.rs"]
mod setup;
#[path = "quotad_bench/windows.rs"]
mod windows;

use std::{process::ExitCode, time::Duration};

// The same allocator as the server: the load generator's own cost per call bounds what it can measure.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{
    cli::{Args, Plan, Scenario},
    report::Report,
    setup::SetupPlan,
};

/// One HTTP/2 connection whose every call carries `--token`, when one is given.
pub type Connection = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to a call; without a token, nothing.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// BSD's EX_USAGE, as quotad uses for a bad configuration.
const EXIT_USAGE: u8 = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    let plan = match Args::parse().into_plan() {
        Ok(plan) => plan,
        Err(reason) => {
            eprintln!("quotad-bench: {reason}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&plan).await {
        Ok(code) => code,
        Err(reason) => {
            eprintln!("quotad-bench: {reason}");
            ExitCode::FAILURE
        }
    }
}

async fn run(plan: &Plan) -> Result<ExitCode, String> {
    if let Some(path) = &plan.grpc_body {
        let (call_path, body) = grpc_body::request(plan).ok_or("--grpc-body: no fixed body for this scenario")?;
        std::fs::write(path, body).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("{call_path}");
        return Ok(ExitCode::SUCCESS);
    }
    let channels = connect(plan).await?;
    let mut stdout = std::io::stdout().lock();
    if let Some(environments) = plan.setup_only {
        let setup = setup::run(&setup_plan(plan, environments), &channels).await?;
        report::print_setup(&setup, &mut stdout).map_err(|e| e.to_string())?;
        if let Some(path) = &plan.json {
            report::write_json(path, &setup).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The health check touches no quota state, so it needs no tenant.
    let setup = if plan.setup && plan.scenario != Scenario::Health {
        let setup = setup::run(&setup_plan(plan, plan.environments), &channels).await?;
        report::print_setup(&setup, &mut stdout).map_err(|e| e.to_string())?;
        Some(setup)
    } else {
        None
    };
    let recorded = load::run(plan, &channels).await?;
    let report = Report::new(plan, recorded, setup);
    report.print(&mut stdout).map_err(|e| e.to_string())?;
    if let Some(path) = &plan.json {
        report::write_json(path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // A run in which nothing succeeded measured nothing; say so to the calling script.
    Ok(if report.ok > 0 && report.items_ok > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn setup_plan(plan: &Plan, environments: usize) -> SetupPlan {
    SetupPlan {
        tenant: plan.tenant.clone(),
        environments,
        allocation_messages: plan.allocation_messages,
        concurrency: plan.concurrency,
    }
}

/// Opens `--connections` HTTP/2 connections: each `connect` is its own TCP connection, and every clone
/// of a `Channel` multiplexes its streams on that one.
async fn connect(plan: &Plan) -> Result<Vec<Connection>, String> {
    let bearer = match &plan.token {
        None => Bearer(None),
        Some(token) => {
            let mut value: AsciiMetadataValue = format!("Bearer {token}")
                .parse()
                .map_err(|_| "--token: only visible ASCII characters can be sent in a header".to_owned())?;
            value.set_sensitive(true);
            Bearer(Some(value))
        }
    };
    let mut endpoint = Endpoint::from_shared(plan.server.clone())
        .map_err(|e| format!("--server {}: {e}", plan.server))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(plan.timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &plan.tls {
        endpoint = endpoint.tls_config(tls.config()).map_err(|e| format!("--tls-ca: {}", chain(&e)))?;
    }
    let mut channels = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        let channel =
            endpoint.connect().await.map_err(|e| format!("cannot connect to {}: {}", plan.server, chain(&e)))?;
        channels.push(InterceptedService::new(channel, bearer.clone()));
    }
    Ok(channels)
}

/// An error with its causes: tonic's transport error alone says only "transport error".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
