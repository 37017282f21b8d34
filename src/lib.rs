//! quotad: the quota authority that agent runtimes call before and after each AI call.
//!
//! - [`ledger`]: the accounting core; rules only, no I/O, no async, time passed in.
//! - [`durability`]: the write-ahead log and snapshot formats, and the log writer with group commit.
//! - [`grpc`]: the `quota.v1` services; decoding, validation and the one mapping of errors to statuses.
//! - [`auth`]: credentials: drawing API key secrets and reading them back, the admin token; hashes only.
//! - [`config`]: command-line flags, environment overrides and the TOML config file.
//! - [`server`]: startup, health, reflection, the expiry sweeper and graceful shutdown.
//! - [`metrics`]: Prometheus metrics: per-RPC calls and latency, business counters, the `/metrics` endpoint.
//! - [`transport`]: accepting connections (TLS, mutual TLS, a cap and a handshake deadline) and the
//!   HTTP/2 limits they are served with.
//! - [`clock`]: the wall clock, and a manual clock for tests.
//! - [`shutdown`]: the signal future that starts a graceful shutdown.
//! - [`admin_cli`]: `quotad admin`, the admin command line: a gRPC client of a running quotad.

pub mod admin_cli;
pub mod auth;
pub mod clock;
pub mod config;
pub mod durability;
pub mod grpc;
pub mod ledger;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod transport;

/// Code generated from `proto/quota/v1/quota.proto`.
pub mod proto {
    tonic::include_proto!("quota.v1");
    include!(concat!(env!("OUT_DIR"), "/server/quota.v1.rs"));

    /// The encoded descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("quota_descriptor");

    /// `google.rpc` error details, served by reflection so that generic clients can decode them.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("error_details_descriptor");
}
