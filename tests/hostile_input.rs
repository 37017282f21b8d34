//! Hostile input below the gRPC client libraries: raw bytes and raw HTTP/2 to an in-process server on
//! a loopback port. Each test sends one kind of malformed request on a connection of its own, checks
//! the exact HTTP or gRPC error the server answers with and that the request changed nothing, then that
//! a well-behaved client, on another connection, still gets a health check and a reservation served.
//!
//! Framing errors a gRPC library would never make (a message cut short, the compressed flag without an
//! encoding, no message at all) are answered INTERNAL, as tonic answers them and as the gRPC protocol
//! asks for the compressed flag; a body that is not the method's message is INVALID_ARGUMENT
//! `MALFORMED_REQUEST`, and a request that is not a gRPC call at all gets an HTTP error.

mod common;

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use h2::Reason;
use http::{HeaderMap, Method, StatusCode};
use prost::Message;
use quotad::proto::{CheckAndReserveRequest, GetBalanceRequest, ReleaseAllRequest};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_types::StatusExt;

const RESERVE: &str = "/quota.v1.Quota/CheckAndReserve";
const GRPC: &str = "application/grpc";
/// The request size limit of the test server (the default).
const MAX_REQUEST_BYTES: usize = quotad::config::DEFAULT_MAX_REQUEST_BYTES;
/// Streams a client may open and reset before the server accepts them, per connection, before the
/// server takes the connection for a rapid-reset attack (hyper's default, which quotad keeps).
const PENDING_RESETS_ALLOWED: usize = 20;

/// A server whose environment `env` has 100 messages.
async fn server() -> TestServer {
    let server = spawn_server().await;
    server.bootstrap("acme", "env", 100).await;
    server
}

/// A reservation of `messages` on `env`, as a length-prefixed gRPC message.
fn reserve_message(messages: u64) -> Bytes {
    let request = CheckAndReserveRequest { messages: Some(messages), ..reserve_request("env", messages) };
    framed(0, &request.encode_to_vec())
}

/// A gRPC message: the compressed flag, the length of `body`, then `body`.
fn framed(compressed: u8, body: &[u8]) -> Bytes {
    with_length(compressed, body.len() as u32, body)
}

/// A gRPC message whose prefix declares `len` bytes, whatever `body` holds.
fn with_length(compressed: u8, len: u32, body: &[u8]) -> Bytes {
    let mut message = BytesMut::with_capacity(5 + body.len());
    message.put_u8(compressed);
    message.put_u32(len);
    message.put_slice(body);
    message.freeze()
}

/// What the server answered to one request: the HTTP status, its headers, and the gRPC status from
/// the headers (a trailers-only answer) or the trailers.
#[derive(Debug)]
struct Answer {
    http: StatusCode,
    headers: HeaderMap,
    grpc: Option<Status>,
}

/// Sends one request on a new HTTP/2 connection: `method` to `path` with `headers`, and `body` as its
/// data (`None` ends the stream with the headers).
async fn send(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)], body: Option<Bytes>) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut stream) = client.send_request(request.body(()).unwrap(), body.is_none()).unwrap();
    if let Some(body) = body {
        stream.send_data(body, true).unwrap();
    }
    let response = bounded("the answer", response).await.expect("an HTTP/2 response");
    let (parts, mut body) = response.into_parts();
    while let Some(data) = bounded("the body", body.data()).await {
        data.expect("the response body");
    }
    let trailers = bounded("the trailers", body.trailers()).await.expect("the trailers");
    let grpc = Status::from_header_map(&parts.headers).or_else(|| trailers.as_ref().and_then(Status::from_header_map));
    Answer { http: parts.status, headers: parts.headers, grpc }
}

/// Sends `bytes` on a new TCP connection and reads what the server writes until it closes the
/// connection; a reset counts as closing it.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut received = Vec::new();
    match bounded("the server closing the connection", tcp.read_to_end(&mut received)).await {
        Ok(_) => {}
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
    }
    received
}

/// Whether `received` is empty or starts with an HTTP/2 frame of type SETTINGS (the server's first
/// frame), rather than anything else, such as an HTTP/1.1 answer.
fn is_settings_frame_or_nothing(received: &[u8]) -> bool {
    const FRAME_HEADER_LEN: usize = 9;
    const SETTINGS: u8 = 0x4;
    received.is_empty() || (received.len() >= FRAME_HEADER_LEN && received[3] == SETTINGS)
}

#[track_caller]
fn expect_grpc(answer: &Answer, code: Code, message: &str) {
    assert_eq!(answer.http, StatusCode::OK, "{answer:?}");
    let status = answer.grpc.as_ref().unwrap_or_else(|| panic!("no grpc-status in {answer:?}"));
    assert_eq!((status.code(), status.message()), (code, message), "{answer:?}");
}

/// A well-behaved client, on a connection of its own, gets a health check and a reservation served;
/// and the hostile request reserved nothing.
async fn still_served(server: &TestServer) {
    let health = server.health.clone().check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);
    let mut client = server.new_quota_client().await;
    let granted = client.check_and_reserve(reserve_request("env", 1)).await.unwrap().into_inner();
    assert_eq!(granted.balance.unwrap().reserved_milli, milli(1), "only the well-behaved reservation holds anything");
}

#[tokio::test]
async fn garbage_instead_of_the_http2_preface_closes_the_connection() {
    // Proves that bytes that are not the HTTP/2 connection preface get the connection closed, with
    // nothing written but the server's own HTTP/2 SETTINGS, and that other clients are still served.
    let server = server().await;
    let received = raw_exchange(server.addr, &[0xde, 0xad, 0xbe, 0xef].repeat(64)).await;
    assert!(is_settings_frame_or_nothing(&received), "only a SETTINGS frame: {received:?}");
    still_served(&server).await;
}

#[tokio::test]
async fn an_http1_request_closes_the_connection() {
    // Proves that an HTTP/1.1 request, even one shaped like a gRPC call, gets the connection closed
    // without an HTTP/1.1 answer (quotad speaks HTTP/2 only), and that other clients are still served.
    let server = server().await;
    let request = format!(
        "POST {RESERVE} HTTP/1.1\r\nHost: quotad\r\ncontent-type: application/grpc\r\ncontent-length: 0\r\n\r\n"
    );
    let received = raw_exchange(server.addr, request.as_bytes()).await;
    assert!(!received.starts_with(b"HTTP/1"), "{:?}", String::from_utf8_lossy(&received));
    assert!(is_settings_frame_or_nothing(&received), "only a SETTINGS frame: {received:?}");
    still_served(&server).await;
}

#[tokio::test]
async fn a_call_with_a_wrong_or_no_content_type_is_refused_with_415() {
    // Proves that a well-formed reservation sent as `application/json`, or with no content type, is
    // answered HTTP 415 with INVALID_ARGUMENT reason UNSUPPORTED_CONTENT_TYPE, and reserves nothing.
    let server = server().await;
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("content-type", "application/json")], "content-type \"application/json\" is not application/grpc"),
        (&[("content-type", "application/grpc-web")], "content-type \"application/grpc-web\" is not application/grpc"),
        (&[], "no content-type is not application/grpc"),
    ];
    for (headers, message) in cases {
        let answer = send(server.addr, Method::POST, RESERVE, headers, Some(reserve_message(5))).await;
        assert_eq!(answer.http, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{answer:?}");
        let status = answer.grpc.as_ref().expect("a gRPC status too");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), format!("{message}: quotad serves gRPC only"));
        error_info(status, "UNSUPPORTED_CONTENT_TYPE");
    }
    still_served(&server).await;
}

#[tokio::test]
async fn a_get_is_refused_with_405() {
    // Proves that a GET to a gRPC method is answered HTTP 405 with `allow: POST` and INVALID_ARGUMENT
    // reason METHOD_NOT_ALLOWED, where tonic would take it for a call that lost its message.
    let server = server().await;
    let answer = send(server.addr, Method::GET, RESERVE, &[("content-type", GRPC)], None).await;
    assert_eq!(answer.http, StatusCode::METHOD_NOT_ALLOWED, "{answer:?}");
    assert_eq!(answer.headers.get("allow").map(|v| v.as_bytes()), Some(&b"POST"[..]));
    let status = answer.grpc.as_ref().expect("a gRPC status too");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    error_info(status, "METHOD_NOT_ALLOWED");
    still_served(&server).await;
}

#[tokio::test]
async fn a_malformed_protobuf_body_is_invalid_argument() {
    // Proves that a body that does not decode as the method's message (a varint that never ends) is
    // INVALID_ARGUMENT with reason MALFORMED_REQUEST naming the message type, not prost's INTERNAL.
    let server = server().await;
    let answer =
        send(server.addr, Method::POST, RESERVE, &[("content-type", GRPC)], Some(framed(0, &[0x18; 11]))).await;
    let status = answer.grpc.as_ref().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{answer:?}");
    assert!(
        status.message().starts_with("the request is not a valid quota.v1.CheckAndReserveRequest: "),
        "{}",
        status.message()
    );
    let info = error_info(status, "MALFORMED_REQUEST");
    assert_eq!(info.metadata.get("message_type").map(String::as_str), Some("quota.v1.CheckAndReserveRequest"));
    // The same through GetBalance: every method decodes with the same codec.
    let body = framed(0, &[0x0a, 0x05, b'e']);
    let answer =
        send(server.addr, Method::POST, "/quota.v1.Quota/GetBalance", &[("content-type", GRPC)], Some(body)).await;
    error_info(answer.grpc.as_ref().unwrap(), "MALFORMED_REQUEST");
    still_served(&server).await;
}

#[tokio::test]
async fn a_message_larger_than_the_limit_is_out_of_range() {
    // Proves that a message one byte over max_request_bytes is OUT_OF_RANGE naming its size and the
    // limit, decided from its length prefix, and reserves nothing; and that one of exactly the limit
    // reaches the service (which refuses its padded agent id on its own terms).
    let server = server().await;
    let over = with_length(0, MAX_REQUEST_BYTES as u32 + 1, &vec![0; MAX_REQUEST_BYTES + 1]);
    let answer = send(server.addr, Method::POST, RESERVE, &[("content-type", GRPC)], Some(over)).await;
    let message = format!(
        "Error, decoded message length too large: found {} bytes, the limit is: {MAX_REQUEST_BYTES} bytes",
        MAX_REQUEST_BYTES + 1
    );
    expect_grpc(&answer, Code::OutOfRange, &message);

    let mut at_limit = CheckAndReserveRequest { agent_id: String::new(), ..reserve_request("env", 1) };
    // One byte of tag and three of length precede an agent id of this size.
    at_limit.agent_id = "a".repeat(MAX_REQUEST_BYTES - at_limit.encoded_len() - 4);
    assert_eq!(at_limit.encoded_len(), MAX_REQUEST_BYTES);
    let answer =
        send(server.addr, Method::POST, RESERVE, &[("content-type", GRPC)], Some(framed(0, &at_limit.encode_to_vec())))
            .await;
    let status = answer.grpc.as_ref().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{answer:?}");
    assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "agent_id");
    still_served(&server).await;
}

#[tokio::test]
async fn framing_errors_are_internal_and_change_nothing() {
    // Proves the answers to messages no gRPC library would send: a length prefix declaring more bytes
    // than arrive before the end of the stream, the compressed flag without a grpc-encoding, a
    // compressed flag of 2, and no message at all are each INTERNAL with tonic's description; and none
    // of them reserves anything.
    let server = server().await;
    let request = reserve_message(5);
    let cases = [
        (with_length(0, 100, &request[5..]), "Unexpected EOF decoding stream."),
        (
            with_length(1, request.len() as u32 - 5, &request[5..]),
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ),
        (
            with_length(2, request.len() as u32 - 5, &request[5..]),
            "protocol error: received message with invalid compression flag: 2 (valid flags are 0 and 1), while \
             sending request",
        ),
        (Bytes::new(), "Missing request message."),
    ];
    for (body, message) in cases {
        let answer = send(server.addr, Method::POST, RESERVE, &[("content-type", GRPC)], Some(body)).await;
        expect_grpc(&answer, Code::Internal, message);
    }
    still_served(&server).await;
}

#[tokio::test]
async fn an_unknown_grpc_encoding_is_unimplemented() {
    // Proves that a message compressed with an encoding quotad does not support is UNIMPLEMENTED, with
    // `grpc-accept-encoding` saying what it accepts, and reserves nothing.
    let server = server().await;
    let request = reserve_message(5);
    let body = with_length(1, request.len() as u32 - 5, &request[5..]);
    let headers = [("content-type", GRPC), ("grpc-encoding", "snappy")];
    let answer = send(server.addr, Method::POST, RESERVE, &headers, Some(body)).await;
    expect_grpc(&answer, Code::Unimplemented, "Content is compressed with `snappy` which isn't supported");
    assert_eq!(answer.headers.get("grpc-accept-encoding").map(|v| v.as_bytes()), Some(&b"identity"[..]));
    still_served(&server).await;
}

#[tokio::test]
async fn an_unknown_service_or_method_is_unimplemented() {
    // Proves that a well-formed call to a service or method quotad does not have is UNIMPLEMENTED.
    let server = server().await;
    for path in ["/quota.v1.Nope/CheckAndReserve", "/quota.v1.Quota/Nope", "/", "/quota.v1.Quota/"] {
        let answer = send(server.addr, Method::POST, path, &[("content-type", GRPC)], Some(reserve_message(5))).await;
        assert_eq!(answer.http, StatusCode::OK, "{path}: {answer:?}");
        assert_eq!(answer.grpc.as_ref().map(Status::code), Some(Code::Unimplemented), "{path}: {answer:?}");
    }
    still_served(&server).await;
}

/// Opens `count` streams on one connection, resetting each right after its headers, then sends a
/// well-formed call on the same connection; returns that call's answer (or why it failed) and how the
/// connection ended.
async fn rapid_reset(addr: SocketAddr, count: usize) -> (Result<StatusCode, h2::Error>, Result<(), h2::Error>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = || {
        http::Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}{RESERVE}"))
            .header("content-type", GRPC)
            .body(())
            .unwrap()
    };
    for _ in 0..count {
        let (_, mut stream) = client.send_request(request(), false).unwrap();
        stream.send_reset(Reason::CANCEL);
    }
    let after = match client.send_request(request(), false) {
        Ok((response, mut stream)) => {
            stream.send_data(reserve_message(1), true).unwrap();
            bounded("the call after the resets", response).await.map(|response| response.status())
        }
        Err(error) => Err(error),
    };
    drop(client);
    let ended = bounded("the connection to end", connection).await.unwrap();
    (after, ended)
}

#[tokio::test]
async fn streams_reset_right_after_opening_are_served_within_bounds_and_cut_off_beyond() {
    // Proves that a client resetting 10 streams right after opening them keeps its connection and gets
    // its next call served, and that one resetting 60 (a rapid-reset attack) has its connection closed
    // with GOAWAY ENHANCE_YOUR_CALM, while other clients are served throughout.
    let server = server().await;
    let (after, ended) = rapid_reset(server.addr, PENDING_RESETS_ALLOWED / 2).await;
    assert_eq!(after.expect("served on the same connection"), StatusCode::OK);
    assert!(ended.is_ok(), "{ended:?}");
    assert_eq!(server.balance("env").await.reserved_milli, milli(1), "the call after the resets reserved");
    let release_all = ReleaseAllRequest { environment_id: "env".into(), agent_id: String::new() };
    server.admin.clone().release_all(release_all).await.unwrap();

    // Few enough bytes that the server reads them all before it closes the connection, so that the
    // client reads the GOAWAY rather than a reset of a connection with unread data.
    let (after, ended) = rapid_reset(server.addr, PENDING_RESETS_ALLOWED * 3).await;
    assert!(after.is_err(), "{after:?}");
    let error = ended.expect_err("the server closes the connection");
    assert_eq!((error.is_go_away(), error.reason()), (true, Some(Reason::ENHANCE_YOUR_CALM)), "{error:?}");
    still_served(&server).await;
}

#[tokio::test]
async fn a_well_formed_raw_call_is_served() {
    // Proves that the raw HTTP/2 requests above differ from a served call only in what each test
    // breaks: the same request, well formed, reserves.
    let server = server().await;
    let answer = send(
        server.addr,
        Method::POST,
        RESERVE,
        &[("content-type", GRPC), ("te", "trailers")],
        Some(reserve_message(5)),
    )
    .await;
    expect_grpc(&answer, Code::Ok, "");
    let balance = GetBalanceRequest { environment_id: "env".into() };
    let balance = server.quota.clone().get_balance(balance).await.unwrap().into_inner();
    assert_eq!(balance.reserved_milli, milli(5));
}
