//! Turns away HTTP/2 requests that are not gRPC calls before any service sees them: a method other
//! than POST is answered 405, a content type other than `application/grpc` 415, each with a gRPC status
//! for clients that read one. Without this check tonic serves a call whatever its content type says,
//! and answers a GET as a call that lost its message.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use tower::{Layer, Service};

use super::status;

/// Wraps every service of the server in [`GrpcOnly`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcOnlyLayer;

impl<S> Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> GrpcOnly<S> {
        GrpcOnly { inner }
    }
}

/// Passes gRPC calls to `inner` and answers anything else itself.
#[derive(Debug, Clone)]
pub struct GrpcOnly<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcOnly<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match refusal(&request) {
            Some(response) => Box::pin(std::future::ready(Ok(response))),
            None => Box::pin(self.inner.call(request)),
        }
    }
}

/// The answer to a request that is not a gRPC call, or `None` for a gRPC call.
fn refusal<ReqBody, ResBody: Default>(request: &Request<ReqBody>) -> Option<Response<ResBody>> {
    if request.method() != Method::POST {
        let mut response = status::method_not_allowed(request.method().as_str()).into_http();
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Some(response);
    }
    let content_type = request.headers().get(header::CONTENT_TYPE);
    if !content_type.is_some_and(is_grpc) {
        let found = content_type.map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let mut response = status::unsupported_content_type(found.as_deref()).into_http();
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Some(response);
    }
    None
}

/// `application/grpc`, alone or with a `+format` suffix or parameters, as the gRPC protocol writes it.
fn is_grpc(content_type: &HeaderValue) -> bool {
    let Some(rest) = content_type.as_bytes().strip_prefix(b"application/grpc") else { return false };
    rest.is_empty() || rest.starts_with(b"+") || rest.starts_with(b";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_recognised() {
        for good in ["application/grpc", "application/grpc+proto", "application/grpc; charset=utf-8"] {
            assert!(is_grpc(&HeaderValue::from_static(good)), "{good}");
        }
        for bad in ["application/json", "application/grpcx", "text/plain", "", "application/grpc-web"] {
            assert!(!is_grpc(&HeaderValue::from_static(bad)), "{bad}");
        }
    }
}
