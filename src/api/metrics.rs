//! Counts every gRPC call the node answers, by method and final status
//! code, and times it from request to final status: a tower layer around
//! all services.
//!
//! A call's code is in the response headers when it failed before any
//! message (a trailers-only response), otherwise in the trailers at the end
//! of the body; a body dropped before its trailers is a call the client
//! cancelled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use crate::metrics::Metrics;

/// Wraps a service so that each call it answers is counted.
#[derive(Debug, Clone)]
pub(crate) struct CallMetricsLayer {
    metrics: Arc<Metrics>,
}

impl CallMetricsLayer {
    /// A layer recording into `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service whose calls are counted (see [`CallMetricsLayer`]).
#[derive(Debug, Clone)]
pub(crate) struct CallMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// A call not yet ended. Dropped unended (the client gave up before the
/// answer, or the answer's body before its trailers) it counts as
/// CANCELLED.
#[derive(Debug)]
struct Call {
    metrics: Option<Arc<Metrics>>,
    method: String,
    started: Instant,
}

impl Call {
    fn end(mut self, code: tonic::Code) {
        if let Some(metrics) = self.metrics.take() {
            metrics.grpc_call(&self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            metrics.grpc_call(&self.method, tonic::Code::Cancelled, self.started.elapsed());
        }
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for CallMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = Call {
            metrics: Some(self.metrics.clone()),
            method: request.uri().path().to_owned(),
            started: Instant::now(),
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let (parts, body) = answer.await?.into_parts();
            let call = match tonic::Status::from_header_map(&parts.headers) {
                Some(status) => {
                    call.end(status.code());
                    None
                }
                None => Some(call),
            };
            Ok(http::Response::from_parts(
                parts,
                MeteredBody { inner: body, call },
            ))
        })
    }
}

/// A response body that ends its call when the trailers pass (dropped
/// before them, the call counts as CANCELLED).
#[derive(Debug)]
pub(crate) struct MeteredBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| {
                tonic::Status::from_header_map(trailers)
                    .map_or(tonic::Code::Unknown, |status| status.code())
            }),
            Poll::Ready(Some(Err(_))) => Some(tonic::Code::Internal),
            // The body ended without trailers: no status was ever sent.
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(call) = this.call.take() {
                call.end(code);
            }
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
