//! The limits that protect the server from its clients, through a real server on an ephemeral port and
//! a raw HTTP/2 peer that can misbehave: the advertised SETTINGS and the stream limit enforced, the
//! header size limit, keep-alive pings that a dead peer does not answer, the maximum connection age, a
//! handshake deadline for a peer that sends nothing (which holds up no one else), the connection cap,
//! and the server's own deadline on a call.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::*;
use quotad::{
    clock::ManualClock,
    config::{Config, Settings},
    proto::GetBalanceRequest,
    transport::HTTP2_PREFACE,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Request, metadata::MetadataValue};
use tonic_types::StatusExt;

// HTTP/2 frame types and flags (RFC 9113, section 6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;
const REFUSED_STREAM: u32 = 0x7;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A hand-written HTTP/2 client: it sends exactly the frames a test writes and answers nothing on
/// its own (not even pings), so it can be the peer that misbehaves.
struct RawPeer {
    tcp: TcpStream,
}

impl RawPeer {
    /// Connects and sends the client preface and an empty SETTINGS frame, as every client starts.
    async fn connect(addr: SocketAddr) -> Self {
        let mut peer = Self { tcp: TcpStream::connect(addr).await.expect("connect") };
        peer.tcp.write_all(HTTP2_PREFACE).await.unwrap();
        peer.send(SETTINGS, 0, 0, &[]).await;
        peer
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        // The server may already have closed the connection; the next read says so.
        let _ = self.tcp.write_all(&frame).await;
    }

    /// The next frame, or `None` once the server has closed the connection.
    async fn frame(&mut self) -> Option<Frame> {
        let mut header = [0; 9];
        self.tcp.read_exact(&mut header).await.ok()?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let stream = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0; length];
        self.tcp.read_exact(&mut payload).await.ok()?;
        Some(Frame { kind: header[3], flags: header[4], stream, payload })
    }

    /// Frames until one matches, bounded by [`WAIT_DEADLINE`]; `None` if the server closes first.
    async fn until(&mut self, what: &str, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let found = tokio::time::timeout(WAIT_DEADLINE, async {
            loop {
                match self.frame().await {
                    Some(frame) if wanted(&frame) => return Some(frame),
                    Some(_) => {}
                    None => return None,
                }
            }
        });
        found.await.unwrap_or_else(|_| panic!("no {what} within {WAIT_DEADLINE:?}"))
    }

    /// The server's SETTINGS as (identifier, value) pairs; acknowledges them, as a client must for the
    /// server to enforce them.
    async fn server_settings(&mut self) -> Vec<(u16, u32)> {
        let frame = self.until("SETTINGS", |f| f.kind == SETTINGS && f.flags & ACK == 0).await.expect("SETTINGS");
        self.send(SETTINGS, ACK, 0, &[]).await;
        frame
            .payload
            .chunks_exact(6)
            .map(|entry| {
                (u16::from_be_bytes([entry[0], entry[1]]), u32::from_be_bytes(entry[2..6].try_into().unwrap()))
            })
            .collect()
    }

    /// Opens stream `stream` with the headers of a `GetBalance` call and no body yet, so the call stays
    /// in flight until the body comes.
    async fn open_call(&mut self, stream: u32) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/quota.v1.Quota/GetBalance"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            // A literal header field without indexing, with a new name (RFC 7541, section 6.2.2).
            block.extend([0x00, name.len() as u8]);
            block.extend(name.as_bytes());
            block.push(value.len() as u8);
            block.extend(value.as_bytes());
        }
        self.send(HEADERS, END_HEADERS, stream, &block).await;
    }

    /// Waits until the server closes the connection, reading and discarding what it sends meanwhile.
    async fn closed(&mut self, why: &str) {
        let closed = self.until(why, |_| false).await;
        assert!(closed.is_none());
    }
}

/// A config with the default settings and `transport` changed by `change` (durations shorter than the
/// config file's whole seconds, so tests wait less).
fn config_with(change: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    change(&mut config);
    config
}

async fn spawn(config: Config) -> TestServer {
    spawn_server_with_config(config, Arc::new(ManualClock::new(START_MS))).await
}

#[tokio::test]
async fn the_server_advertises_its_stream_and_header_limits() {
    // Proves that the HTTP/2 SETTINGS a client receives carry the configured max_concurrent_streams and
    // header list size: first the defaults, then configured values.
    let server = spawn_server().await;
    let settings = RawPeer::connect(server.addr).await.server_settings().await;
    assert!(settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 100)), "{settings:?}");
    assert!(settings.contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 16_384)), "{settings:?}");

    let configured =
        Settings { max_concurrent_streams_per_connection: 7, max_header_list_bytes: 4_096, ..Settings::default() };
    let server = spawn_server_with(configured).await;
    let settings = RawPeer::connect(server.addr).await.server_settings().await;
    assert!(settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 7)), "{settings:?}");
    assert!(settings.contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 4_096)), "{settings:?}");
}

#[tokio::test]
async fn a_stream_beyond_the_concurrent_limit_is_refused_and_the_connection_keeps_serving() {
    // Proves max_concurrent_streams_per_connection = 3 is enforced on a peer that ignores it: with
    // three calls in flight a fourth stream is reset with REFUSED_STREAM (which gRPC clients retry),
    // and the connection stays open. The first three get no such reset.
    let server = spawn_server_with(Settings { max_concurrent_streams_per_connection: 3, ..Settings::default() }).await;
    let mut peer = RawPeer::connect(server.addr).await;
    peer.server_settings().await;
    peer.until("the SETTINGS acknowledgement", |f| f.kind == SETTINGS && f.flags & ACK != 0).await.expect("open");
    for stream in [1, 3, 5, 7] {
        peer.open_call(stream).await;
    }
    let reset = peer.until("a RST_STREAM", |f| f.kind == RST_STREAM).await.expect("the connection stays open");
    assert_eq!(reset.stream, 7, "the first three streams are within the limit: {reset:?}");
    assert_eq!(u32::from_be_bytes(reset.payload[..4].try_into().unwrap()), REFUSED_STREAM);

    peer.send(PING, 0, 0, b"still on").await;
    let pong = peer.until("the PING acknowledgement", |f| f.kind == PING && f.flags & ACK != 0).await;
    assert_eq!(pong.expect("the connection stays open").payload, b"still on");
}

/// GetBalance of an unknown environment with `padding` bytes of metadata.
fn padded_balance_request(padding: usize) -> Request<GetBalanceRequest> {
    let mut request = Request::new(GetBalanceRequest { environment_id: "nowhere".into() });
    let value = MetadataValue::try_from("p".repeat(padding)).unwrap();
    request.metadata_mut().insert("x-padding", value);
    request
}

#[tokio::test]
async fn a_call_whose_headers_exceed_the_limit_is_refused_and_the_server_keeps_serving() {
    // Proves max_header_list_bytes = 4096: a call with 3 KiB of metadata reaches the service (NOT_FOUND
    // for an unknown environment); one with 5 KiB is refused before it (HTTP 431, which gRPC clients
    // see as a non-OK status), and the same connection then serves the next call.
    let server = spawn_server_with(Settings { max_header_list_bytes: 4_096, ..Settings::default() }).await;
    let mut quota = server.quota.clone();
    expect_code(quota.get_balance(padded_balance_request(3 * 1_024)).await, Code::NotFound);

    let refused = quota.get_balance(padded_balance_request(5 * 1_024)).await.expect_err("over the header limit");
    assert_ne!(refused.code(), Code::NotFound, "the call reached the service: {refused:?}");
    assert!(refused.message().contains("431"), "{refused:?}");

    expect_code(quota.get_balance(padded_balance_request(0)).await, Code::NotFound);
    server.bootstrap("acme", "env", 10).await;
    assert_eq!(server.balance("env").await.allocated_milli, milli(10));
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    // Proves the HTTP/2 keep-alive: the server pings a quiet connection every interval, a peer that
    // answers keeps it open across pings, and once the peer stops answering, the server closes it.
    let config = config_with(|c| {
        c.transport.http2_keepalive_interval = Duration::from_millis(100);
        c.transport.http2_keepalive_timeout = Duration::from_millis(200);
    });
    let server = spawn(config).await;
    let mut peer = RawPeer::connect(server.addr).await;
    peer.server_settings().await;
    let is_ping = |f: &Frame| f.kind == PING && f.flags & ACK == 0;
    for _ in 0..3 {
        let ping = peer.until("a keep-alive PING", is_ping).await.expect("an answering peer stays connected");
        peer.send(PING, ACK, 0, &ping.payload).await;
    }
    peer.until("one more PING", is_ping).await.expect("an answering peer stays connected");
    peer.closed("the close of a peer that stopped answering").await;
    // The server itself goes on.
    server.bootstrap("acme", "env", 10).await;
}

#[tokio::test]
async fn a_connection_older_than_its_maximum_age_is_sent_away_and_closed() {
    // Proves max_connection_age: a connection past it is sent GOAWAY and then closed, even by a peer
    // that does not close it itself; a new connection is served.
    let server = spawn(config_with(|c| c.transport.max_connection_age = Some(Duration::from_millis(200)))).await;
    let mut peer = RawPeer::connect(server.addr).await;
    peer.server_settings().await;
    peer.until("a GOAWAY", |f| f.kind == GOAWAY).await.expect("GOAWAY before the close");
    // The server then pings to learn which calls the peer sent before it saw the GOAWAY; once
    // answered, with no call in flight, the connection closes.
    let ping = peer.until("the GOAWAY's PING", |f| f.kind == PING && f.flags & ACK == 0).await.expect("a PING");
    peer.send(PING, ACK, 0, &ping.payload).await;
    peer.closed("the close of a connection past its age").await;

    let mut fresh = server.new_quota_client().await;
    expect_code(fresh.get_balance(GetBalanceRequest { environment_id: "nowhere".into() }).await, Code::NotFound);
}

#[tokio::test]
async fn a_client_that_connects_and_sends_nothing_is_closed() {
    // Proves the handshake deadline on plaintext: a TCP connection that sends nothing, and one that sends
    // only part of the HTTP/2 preface, are both closed by the server; a client that handshakes is served.
    let server = spawn(config_with(|c| c.transport.handshake_timeout = Duration::from_millis(200))).await;
    let mut silent = RawPeer { tcp: TcpStream::connect(server.addr).await.unwrap() };
    let mut trickling = RawPeer { tcp: TcpStream::connect(server.addr).await.unwrap() };
    trickling.tcp.write_all(&HTTP2_PREFACE[..10]).await.unwrap();
    silent.closed("the close of a silent connection").await;
    trickling.closed("the close of a half-sent preface").await;

    let mut fresh = server.new_quota_client().await;
    expect_code(fresh.get_balance(GetBalanceRequest { environment_id: "nowhere".into() }).await, Code::NotFound);
}

#[tokio::test]
async fn a_silent_handshake_does_not_hold_up_other_clients() {
    // Proves that handshakes run side by side: while a connection that sends nothing and one that sent
    // half the preface wait out a handshake deadline far beyond the test's bound on any wait, another
    // client connects and is served.
    let server = spawn(config_with(|c| c.transport.handshake_timeout = Duration::from_secs(3_600))).await;
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let mut trickling = TcpStream::connect(server.addr).await.unwrap();
    trickling.write_all(&HTTP2_PREFACE[..10]).await.unwrap();
    let balance = GetBalanceRequest { environment_id: "nowhere".into() };
    let served = bounded("a call beside pending handshakes", async {
        server.new_quota_client().await.get_balance(balance).await
    });
    expect_code(served.await, Code::NotFound);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_a_closed_one_frees_its_slot() {
    // Proves max_connections = 3: the test server's own client holds one connection; a second and a
    // third connection are served (N-1, N), a fourth is closed at once (N+1); once a connection ends,
    // its slot serves a new one.
    let server = spawn_server_with(Settings { max_connections: 3, ..Settings::default() }).await;
    let balance = || GetBalanceRequest { environment_id: "nowhere".into() };
    expect_code(server.quota.clone().get_balance(balance()).await, Code::NotFound);
    let mut second = server.new_quota_client().await;
    expect_code(second.get_balance(balance()).await, Code::NotFound);
    let mut third = RawPeer::connect(server.addr).await;
    third.server_settings().await;

    let mut fourth = RawPeer::connect(server.addr).await;
    fourth.closed("the close of a connection over the cap").await;

    // The server closes its end of a connection when it lets the connection go, and its slot with it.
    third.tcp.shutdown().await.unwrap();
    third.closed("the close of a connection its client ended").await;
    let mut fresh = server.new_quota_client().await;
    expect_code(fresh.get_balance(balance()).await, Code::NotFound);
    drop(second);
}

#[tokio::test]
async fn a_call_whose_request_never_completes_is_answered_deadline_exceeded() {
    // Proves the server's own deadline on a call: a call whose body never comes is answered
    // DEADLINE_EXCEEDED with reason REQUEST_TIMEOUT and the limit, and an alert watch opened before it
    // goes on streaming after the deadline has passed (a stream's deadline ends when it starts).
    let config = config_with(|c| c.transport.request_timeout = Duration::from_millis(200));
    let server = spawn(config).await;
    server.bootstrap("acme", "env", 100).await;
    let request = quotad::proto::WatchAlertsRequest { tenant_id: "acme".into(), environment_id: String::new() };
    let mut watch = server.admin.clone().watch_alerts(request).await.unwrap().into_inner();
    bounded("the initial level", watch.message()).await.unwrap().expect("the current level");

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let call = http::Request::post(format!("http://{}/quota.v1.Quota/GetBalance", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (answer, _body_never_sent) = h2.send_request(call, false).expect("open the stream");
    let answer = bounded("the answer to an unfinished call", answer).await.expect("an answer");
    let status = tonic::Status::from_header_map(answer.headers()).expect("a trailers-only gRPC status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("request_timeout_seconds"), "{status:?}");
    let info = error_info(&status, "REQUEST_TIMEOUT");
    assert_eq!(metadata_u64(&info, "limit_ms"), 200);
    assert!(status.get_details_error_info().is_some());

    // The watch outlived the deadline: it still delivers the next alert.
    server.reserve("env", 85).await;
    let alert = bounded("an alert after the deadline", watch.message()).await.unwrap().expect("the watch is open");
    assert_eq!(alert.kind(), quotad::proto::AlertKind::EnvironmentLow);
}
