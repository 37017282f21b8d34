//! `quotad admin …`: the admin command line, a gRPC client of a running quotad. The `quotad` binary
//! hands it every argument after `admin`; it makes the subcommand's calls, prints the answer as a
//! table, CSV or JSON, and exits with a code a shell script can branch on.
//!
//! - `args`: the flags, one subcommand per `QuotaAdmin` call, and the value parsers.
//! - `calls`: the connection and the calls, bounded by `--timeout`.
//! - `records`: the answers as printable records.
//! - `render`: table, CSV and JSON text from those records; pure.

mod args;
mod calls;
mod records;
mod render;

use std::{ffi::OsString, fmt, process::ExitCode};

use clap::{CommandFactory, FromArgMatches};
use tonic::{Status, metadata::AsciiMetadataValue};

use self::{args::AdminArgs, calls::Client, render::code_name};

/// The call ended with a gRPC status: the server's refusal, or DEADLINE_EXCEEDED.
const EXIT_STATUS: u8 = 1;
/// BSD's EX_USAGE, as the server uses for a bad configuration.
const EXIT_USAGE: u8 = 64;
/// BSD's EX_UNAVAILABLE: the server cannot be reached.
const EXIT_UNAVAILABLE: u8 = 69;
/// BSD's EX_IOERR: the output cannot be written.
const EXIT_OUTPUT: u8 = 74;

/// Why a command did not succeed; each kind has its exit code.
#[derive(Debug)]
enum Failure {
    Usage(String),
    Status(Status),
    Unreachable(String),
    Output(std::io::Error),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) => ExitCode::from(EXIT_USAGE),
            Failure::Status(_) => ExitCode::from(EXIT_STATUS),
            Failure::Unreachable(_) => ExitCode::from(EXIT_UNAVAILABLE),
            // A reader that stopped reading (`| head`) has what it wanted.
            Failure::Output(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Failure::Output(_) => ExitCode::from(EXIT_OUTPUT),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(reason) => f.write_str(reason),
            Failure::Status(status) => write!(f, "{}: {}", code_name(status.code()), status.message()),
            Failure::Unreachable(reason) => write!(f, "UNAVAILABLE: {reason}"),
            Failure::Output(error) => write!(f, "cannot write the output: {error}"),
        }
    }
}

/// Runs `quotad admin` with `args`, the arguments after `admin`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from("quotad admin")).chain(args);
    let parsed = AdminArgs::command().try_get_matches_from(argv).and_then(|matches| {
        let name = matches.subcommand_name().unwrap_or_default().to_owned();
        Ok((name, AdminArgs::from_arg_matches(&matches)?))
    });
    let (name, args) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            // Help and version go to stdout and succeed; every other parse error is a usage error.
            let _ = error.print();
            return if error.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !matches!(&failure, Failure::Output(error) if error.kind() == std::io::ErrorKind::BrokenPipe) {
                eprintln!("quotad admin: {name}: {failure}");
            }
            failure.exit_code()
        }
    }
}

async fn run(args: AdminArgs) -> Result<(), Failure> {
    let global = &args.global;
    let tls = crate::transport::tls::client_tls(
        global.tls_ca.as_deref(),
        global.tls_cert.as_deref(),
        global.tls_key.as_deref(),
    )
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let server = args::server_uri(global.server.as_deref(), tls.is_some()).map_err(Failure::Usage)?;
    let authorization = global.token.as_deref().map(bearer).transpose()?;
    let client = Client::connect(&server, tls, authorization, global.timeout).await?;
    calls::run(&client, args.command, args.global.format, &mut std::io::stdout().lock()).await
}

/// `Bearer <token>` as a header value. The reason for a refusal never includes the token.
fn bearer(token: &str) -> Result<AsciiMetadataValue, Failure> {
    let mut value: AsciiMetadataValue = format!("Bearer {token}")
        .parse()
        .map_err(|_| Failure::Usage("--token: only visible ASCII characters can be sent in a header".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}
