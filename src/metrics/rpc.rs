//! Requests by RPC and status code, and their latency, counted by a tower layer around every gRPC
//! service: it reads the method from the request path and the status from the `grpc-status` of the
//! response headers (a trailers-only answer: errors, tonic's own included) or of its trailers.
//!
//! The hot path does no label lookup and no allocation: the RPC is found by a binary search of the
//! served paths, and each (RPC, code) series is looked up in its family once, on first use, then kept.
//! A call that ends without a status (the client went away) counts as `CANCELLED`.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tower::{Layer, Service};

use super::Metrics;

/// gRPC status codes by number, as the `code` label.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// The label of every path that names no served method, so that clients cannot add series at will.
pub const OTHER_RPC: &str = "other";

/// Upper bounds of the latency buckets, in seconds: a decision from memory takes tens of microseconds,
/// a batch synced to a slow disk milliseconds; streams (alert watches, health watches) last longer.
pub const DURATION_BUCKETS_SECONDS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcCodeLabels {
    rpc: String,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    rpc: String,
}

fn new_duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_SECONDS)
}

/// Calls and latencies per RPC.
#[derive(Debug)]
pub struct RpcMetrics {
    /// `/package.Service/Method`, sorted; index `i` is RPC `i`, and `paths.len()` is [`OTHER_RPC`].
    paths: Vec<String>,
    requests: Family<RpcCodeLabels, Counter>,
    durations: Family<RpcLabels, Histogram, fn() -> Histogram>,
    /// Per RPC (and [`OTHER_RPC`] last), per code: the member of `requests`, once used.
    request_series: Box<[[OnceLock<Counter>; CODES.len()]]>,
    duration_series: Box<[OnceLock<Histogram>]>,
}

impl RpcMetrics {
    pub(super) fn new(methods: impl IntoIterator<Item = String>) -> Self {
        let mut paths: Vec<String> = methods.into_iter().map(|method| format!("/{method}")).collect();
        paths.sort_unstable();
        paths.dedup();
        let rpcs = paths.len() + 1;
        Self {
            paths,
            requests: Family::default(),
            durations: Family::new_with_constructor(new_duration_histogram),
            request_series: (0..rpcs).map(|_| std::array::from_fn(|_| OnceLock::new())).collect(),
            duration_series: (0..rpcs).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The RPC a request path names, [`OTHER_RPC`]'s index if none.
    fn rpc(&self, path: &str) -> usize {
        self.paths.binary_search_by(|served| served.as_str().cmp(path)).unwrap_or(self.paths.len())
    }

    fn rpc_label(&self, rpc: usize) -> String {
        self.paths.get(rpc).map_or(OTHER_RPC, |path| &path[1..]).to_owned()
    }

    fn finished(&self, rpc: usize, code: usize, started: Instant) {
        let requests = self.request_series[rpc][code].get_or_init(|| {
            self.requests.get_or_create_owned(&RpcCodeLabels { rpc: self.rpc_label(rpc), code: CODES[code] })
        });
        requests.inc();
        let durations = self.duration_series[rpc]
            .get_or_init(|| self.durations.get_or_create_owned(&RpcLabels { rpc: self.rpc_label(rpc) }));
        durations.observe(started.elapsed().as_secs_f64());
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "rpc_requests",
            "gRPC calls answered, by RPC (package.Service/Method, or other) and status code",
            self.requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from a call's arrival to its status, by RPC; for a stream, how long it stayed open",
            self.durations.clone(),
        );
    }
}

/// The `grpc-status` in `headers`: its code's index, or `None` without one.
fn grpc_status(headers: &HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok().and_then(|code| code.parse::<usize>().ok()).filter(|code| *code < CODES.len());
    Some(code.unwrap_or(UNKNOWN))
}

/// Counts the calls of the service it wraps.
#[derive(Debug, Clone)]
pub struct CountCallsLayer {
    metrics: Arc<Metrics>,
}

impl CountCallsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls { inner, metrics: self.metrics.clone() }
    }
}

/// The service [`CountCallsLayer`] makes. It needs the wrapped service's future and body to be `Unpin`
/// (tonic's are), which spares pinning them by hand.
#[derive(Debug, Clone)]
pub struct CountCalls<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, RequestBody, ResponseBody> Service<Request<RequestBody>> for CountCalls<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Future: Unpin,
    ResponseBody: Body + Unpin,
{
    type Response = Response<CountedBody<ResponseBody>>;
    type Error = S::Error;
    type Future = CountedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let call = Call {
            rpc: self.metrics.rpcs.rpc(request.uri().path()),
            metrics: self.metrics.clone(),
            started: Instant::now(),
        };
        CountedCall { inner: self.inner.call(request), call: Some(call) }
    }
}

/// One call on its way: counted once, when its status is known or when it is dropped without one.
struct Call {
    metrics: Arc<Metrics>,
    rpc: usize,
    started: Instant,
}

impl Call {
    fn finish(self, code: usize) {
        self.metrics.rpcs.finished(self.rpc, code, self.started);
    }
}

/// The response future of a counted call.
pub struct CountedCall<F> {
    inner: F,
    /// Taken when the call is counted, or handed to the response body.
    call: Option<Call>,
}

impl<F, ResponseBody, E> Future for CountedCall<F>
where
    F: Future<Output = Result<Response<ResponseBody>, E>> + Unpin,
{
    type Output = Result<Response<CountedBody<ResponseBody>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = Pin::new(&mut self.inner).poll(cx);
        let Poll::Ready(result) = polled else { return Poll::Pending };
        let call = self.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                let call = match (call, grpc_status(response.headers())) {
                    (Some(call), Some(code)) => {
                        call.finish(code);
                        None
                    }
                    (call, _) => call,
                };
                Ok(response.map(|inner| CountedBody { inner, call }))
            }
            Err(error) => {
                if let Some(call) = call {
                    call.finish(UNKNOWN);
                }
                Err(error)
            }
        })
    }
}

impl<F> Drop for CountedCall<F> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(CANCELLED);
        }
    }
}

/// A response body whose trailers say how its call ended.
pub struct CountedBody<B> {
    inner: B,
    /// `None` once counted (or when the headers already held the status).
    call: Option<Call>,
}

impl<B> CountedBody<B> {
    fn finish(&mut self, code: usize) {
        if let Some(call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    self.finish(grpc_status(trailers).unwrap_or(UNKNOWN));
                }
            }
            // The stream broke, or ended without a status.
            Poll::Ready(Some(Err(_)) | None) => self.finish(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> RpcMetrics {
        RpcMetrics::new(
            ["quota.v1.Quota/Commit", "quota.v1.Quota/CheckAndReserve", "grpc.health.v1.Health/Check"]
                .map(String::from),
        )
    }

    #[test]
    fn a_path_names_its_rpc_and_any_other_path_is_other() {
        let metrics = metrics();
        for method in ["quota.v1.Quota/Commit", "quota.v1.Quota/CheckAndReserve", "grpc.health.v1.Health/Check"] {
            assert_eq!(metrics.rpc_label(metrics.rpc(&format!("/{method}"))), method);
        }
        for path in ["/", "", "/quota.v1.Quota/Commit2", "/quota.v1.Quota/", "quota.v1.Quota/Commit"] {
            assert_eq!(metrics.rpc_label(metrics.rpc(path)), OTHER_RPC, "{path:?}");
        }
    }

    #[test]
    fn a_status_header_gives_its_code_and_a_bad_one_unknown() {
        let status = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", value.parse().unwrap());
            grpc_status(&headers)
        };
        assert_eq!(status("0"), Some(0));
        assert_eq!(status("16"), Some(16));
        assert_eq!(status("17"), Some(UNKNOWN));
        assert_eq!(status("x"), Some(UNKNOWN));
        assert_eq!(grpc_status(&HeaderMap::new()), None);
    }
}
