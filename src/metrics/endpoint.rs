//! The metrics endpoint: `GET /metrics` over plain HTTP/1.1, answered with the Prometheus text format;
//! any other path is 404 and any other method 405.
//!
//! It is bounded so that no client can make it hold much: a request head over 8 KiB is refused (a
//! body is never read), at most [`MAX_CONNECTIONS`] connections are served at once (more wait in the
//! kernel's backlog), and each is closed after [`CONNECTION_LIFETIME`], whatever it is doing.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{encoding::prometheus_text, registry::Registry};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// Connections served at once. A Prometheus server scrapes over one; a few more leave room for
/// people looking by hand.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a connection may stay open, idle or not: a scrape takes milliseconds, and a client that
/// reads or writes slowly on purpose gives its slot back this soon.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// The largest request head read (hyper's smallest buffer); a larger one closes the connection.
const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// How long to wait after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

pub const METRICS_PATH: &str = "/metrics";

/// Serves `registry` on `listener` until `stop` is cancelled, then closes every connection.
pub async fn serve(listener: TcpListener, registry: Registry, stop: CancellationToken) {
    let registry = Arc::new(registry);
    let mut connections = JoinSet::new();
    loop {
        if connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = connections.join_next() => continue,
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(TokioIo::new(stream), registry.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "the metrics endpoint cannot accept a connection");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_RETRY_DELAY) => {}
                    }
                }
            },
        }
    }
    connections.shutdown().await;
}

async fn serve_connection(io: TokioIo<tokio::net::TcpStream>, registry: Arc<Registry>) {
    let service = service_fn(move |request| {
        let response = respond(&request, &registry);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new().max_buf_size(MAX_REQUEST_HEAD_BYTES).serve_connection(io, service);
    match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(error)) => tracing::debug!(%error, "metrics connection ended on an error"),
    }
}

fn respond(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if request.uri().path() != METRICS_PATH {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
    }
    if request.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return response;
    }
    let mut text = String::new();
    if let Err(error) = prometheus_text::encode(&mut text, registry) {
        tracing::error!(%error, "metrics cannot be encoded");
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "metrics cannot be encoded\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
