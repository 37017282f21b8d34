//! The connection layer under the gRPC services: how connections are accepted (a cap on how many,
//! TLS or mutual TLS, a deadline for the handshake) and the HTTP/2 limits each one is served with
//! (concurrent streams, header size, keep-alive pings, connection age). Every limit here bounds what
//! one client can make the server hold, in memory or in time.
//!
//! - `incoming`: the accept loop, the handshake and its deadline, and the connection slot each
//!   connection holds until it closes.
//! - `tls`: server and client TLS configurations from PEM files, with errors naming the flag and file.

mod incoming;
pub mod tls;

use std::time::Duration;

use tonic::transport::Server;

pub use incoming::{HTTP2_PREFACE, Incoming, plaintext, secure};

pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024;
/// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: calls one connection may have open at once. Clients
/// queue further calls on their side until one ends.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`, the headers (metadata) of one call decoded, as HTTP/2
/// counts them (name + value + 32 per header).
pub const DEFAULT_MAX_HEADER_LIST_BYTES: u32 = 16 * 1_024;
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL_SECONDS: u64 = 60;
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECONDS: u64 = 20;
pub const DEFAULT_TCP_KEEPALIVE_SECONDS: u64 = 60;
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECONDS: u64 = 10;
pub const DEFAULT_REQUEST_TIMEOUT_SECONDS: u64 = 30;
/// 0: a connection may stay open as long as its peer answers keep-alive pings.
pub const DEFAULT_MAX_CONNECTION_AGE_SECONDS: u64 = 0;

/// Streams a connection may reset by its own errors before it is closed with GOAWAY. hyper's default,
/// which tonic clears unless it is set: without it a client could make the server reset streams
/// without end.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1_024;

/// What one connection, and all of them together, may hold. Validated by the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Connections open at once, in their handshake or served; more are closed as soon as accepted.
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    /// The server pings a connection after this long without a frame from its peer...
    pub http2_keepalive_interval: Duration,
    /// ...and closes it when the ping is not answered within this long.
    pub http2_keepalive_timeout: Duration,
    /// Idle time before the kernel probes a connection's peer (TCP keep-alive).
    pub tcp_keepalive: Duration,
    /// From accept to the client's HTTP/2 preface, TLS handshake included.
    pub handshake_timeout: Duration,
    /// How long the server works on one call, from its headers to its answer (a stream's answer is its
    /// start, so streams may stay open beyond it).
    pub request_timeout: Duration,
    /// After this long a connection is asked to go away (GOAWAY): it takes no new calls, and closes
    /// once its calls in flight end (a unary call within `request_timeout`; a stream such as
    /// `WatchAlerts` only when it ends, so it keeps its connection open past this age).
    pub max_connection_age: Option<Duration>,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_bytes: DEFAULT_MAX_HEADER_LIST_BYTES,
            http2_keepalive_interval: Duration::from_secs(DEFAULT_HTTP2_KEEPALIVE_INTERVAL_SECONDS),
            http2_keepalive_timeout: Duration::from_secs(DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECONDS),
            tcp_keepalive: Duration::from_secs(DEFAULT_TCP_KEEPALIVE_SECONDS),
            handshake_timeout: Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT_SECONDS),
            request_timeout: Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECONDS),
            max_connection_age: None,
        }
    }
}

impl TransportLimits {
    /// A server builder with the HTTP/2 limits applied. The socket options and the handshake are
    /// applied by [`Incoming`], since tonic ignores its own for an incoming stream.
    pub fn server_builder(&self) -> Server {
        let builder = Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(self.max_header_list_bytes)
            .http2_keepalive_interval(Some(self.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.http2_keepalive_timeout))
            .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS));
        // No `max_connection_age_grace`: with one, tonic 0.14 sends no GOAWAY at all, and cuts the
        // connection, calls and all, once the age and the grace have passed.
        match self.max_connection_age {
            None => builder,
            Some(age) => builder.max_connection_age(age),
        }
    }
}
