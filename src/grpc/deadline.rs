//! The server's own deadline on each call (`request_timeout_seconds`), whatever deadline the client
//! sent: a client that sends its request slowly, or never finishes it, holds its stream for that
//! long at most. It covers reading the request and computing the answer; a stream's answer is its
//! start, so `WatchAlerts` streams stay open past it.
//!
//! tonic's `Server::timeout` does the same but answers CANCELLED "Timeout expired"; this answers
//! DEADLINE_EXCEEDED with the limit and an `ErrorInfo`.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tower::{Layer, Service};

use super::status;

#[derive(Debug, Clone, Copy)]
pub struct RequestDeadlineLayer {
    limit: Duration,
}

impl RequestDeadlineLayer {
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for RequestDeadlineLayer {
    type Service = RequestDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestDeadline { inner, limit: self.limit }
    }
}

#[derive(Debug, Clone)]
pub struct RequestDeadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, RequestBody> Service<http::Request<RequestBody>> for RequestDeadline<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let (call, limit) = (self.inner.call(request), self.limit);
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(status::request_timed_out(limit).into_http()),
            }
        })
    }
}
