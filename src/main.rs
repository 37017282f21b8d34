//! The `quotad` binary: parses the configuration, sets up logging, binds, and runs the server until
//! SIGTERM or SIGINT. `quotad admin …` runs the admin command line instead.

use std::{io::IsTerminal, process::ExitCode, sync::Arc};

use clap::Parser;
use quotad::{
    clock::SystemClock,
    config::{Cli, Config, LogFormat, TransparentHugePages},
};
use tracing_subscriber::{EnvFilter, fmt::format::FmtSpan};

// Allocation is a large share of what a call costs the server (glibc's malloc and free were about 12% of
// the samples of a `reserve` profile); mimalloc's thread-local free lists make it cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// BSD's EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // The server takes no positional arguments, so a first argument `admin` can only mean the client.
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|first| first == "admin") {
        return quotad::admin_cli::main(args.skip(1));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print and succeed; anything else is a usage error, like a bad value.
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(cli.log_format);
    let config = match Config::load(cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("quotad: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.transparent_huge_pages == TransparentHugePages::Off {
        // Memory mapped before this (the allocator's first region) follows it too: the flag is the
        // process's, and the kernel checks it at each fault.
        if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
            tracing::warn!(%error, "cannot turn transparent huge pages off for this process; they stay as the system has them");
        }
    }
    tracing::info!(worker_threads = config.worker_threads, "starting");
    let runtime = runtime(config.worker_threads).enable_all().build().expect("tokio runtime");
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "quotad stopped on an error");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    // Signal handlers first, so that a SIGTERM as soon as the address is logged is a graceful stop.
    let shutdown = quotad::shutdown::signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    if let Some(storage) = &config.storage {
        tracing::info!(data_dir = %storage.dir.display(), durability = ?storage.durability, "state is kept on disk");
    }
    quotad::server::run(listener, config, Arc::new(SystemClock), shutdown).await?;
    Ok(())
}

/// A single-threaded runtime for one worker thread: the multi-threaded scheduler on one core still runs its
/// LIFO slot and work-stealing queues, and served 500 calls in flight unevenly (a longer tail at the same
/// median; README, "Performance").
fn runtime(worker_threads: usize) -> tokio::runtime::Builder {
    if worker_threads == 1 {
        return tokio::runtime::Builder::new_current_thread();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(worker_threads);
    builder
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A line as each enabled span closes, with its fields and timings: one line per call once the
    // filter enables the calls' spans (`quotad=debug`), whether or not anything was logged inside it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
