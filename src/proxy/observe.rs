//! Accounting that must happen when a response is *finished*, not when its
//! headers leave: the access-log line, the request metrics, the in-flight gauge
//! and the concurrency permit all live in a [`RequestGuard`] carried by the
//! response body and settled when the body ends or is dropped (client gone).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use crate::telemetry::{Metrics, RequestLabels, RouteLabel, method_label, status_class};

/// One request's bookkeeping, settled on drop.
pub struct RequestGuard {
    metrics: Arc<Metrics>,
    start: Instant,
    method: Method,
    /// Route name once matched.
    pub route: Option<Arc<str>>,
    /// Status sent to the caller.
    pub status: StatusCode,
    /// Status the upstream answered, if it did.
    pub upstream_status: Option<StatusCode>,
    /// oboe's own error code, if oboe answered.
    pub error: Option<&'static str>,
    bytes: u64,
    complete: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl RequestGuard {
    /// Starts accounting for a request.
    pub fn new(
        metrics: Arc<Metrics>,
        method: Method,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            start: Instant::now(),
            method,
            route: None,
            status: StatusCode::OK,
            upstream_status: None,
            error: None,
            bytes: 0,
            complete: false,
            _permit: permit,
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let route = self.route.as_deref().unwrap_or("none");
        self.metrics.in_flight.dec();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method: method_label(&self.method),
                status: status_class(self.status),
            })
            .inc();
        if self.route.is_some() {
            self.metrics
                .request_duration
                .get_or_create(&RouteLabel {
                    route: route.to_owned(),
                })
                .observe(elapsed.as_secs_f64());
        }
        // Never the path's query, Authorization or cookies: only these fields.
        tracing::info!(
            target: "oboe::access",
            route,
            method = %self.method,
            status = self.status.as_u16(),
            upstream_status = self.upstream_status.map(|s| s.as_u16()),
            error = self.error,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes = self.bytes,
            complete = self.complete,
        );
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts what it sends and settles its guard at the end.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        guard: Option<RequestGuard>,
    }
}

impl<B> Observed<B> {
    /// Wraps `inner`; the guard is settled when the body ends or is dropped.
    pub fn new(inner: B, mut guard: RequestGuard) -> Self
    where
        B: Body,
    {
        guard.complete = inner.is_end_stream();
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(guard)) = (frame.data_ref(), this.guard.as_mut()) {
                    guard.bytes += data.len() as u64;
                }
                // A body of known length ends with its last frame; hyper will not poll again.
                if this.inner.is_end_stream()
                    && let Some(mut guard) = this.guard.take()
                {
                    guard.complete = true;
                }
            }
            Poll::Ready(None) => {
                if let Some(mut guard) = this.guard.take() {
                    guard.complete = true;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // Upstream died mid-body; settle now with what was sent.
                this.guard.take();
            }
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
