//! The admin listener: `/healthz` for liveness, `/readyz` for readiness (false
//! until the proxy serves, and again while draining), `/metrics` for Prometheus.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::telemetry::Metrics;

/// Process health as the probes see it.
#[derive(Default)]
pub struct Health {
    serving: AtomicBool,
    draining: AtomicBool,
    /// A further condition for readiness (every issuer's keys loaded).
    gate: std::sync::Mutex<Option<ReadyGate>>,
}

/// A condition readiness waits for.
pub type ReadyGate = Arc<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Health {
    /// The proxy listener accepts requests.
    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::SeqCst);
    }

    /// Shutdown began: readiness goes false for good.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Sets (or clears) the further condition readiness waits for.
    pub fn set_gate(&self, gate: Option<ReadyGate>) {
        if let Ok(mut slot) = self.gate.lock() {
            *slot = gate;
        }
    }

    /// Ready for traffic.
    pub fn is_ready(&self) -> bool {
        let gate_open = self
            .gate
            .lock()
            .map(|g| g.as_ref().is_none_or(|gate| gate()))
            .unwrap_or(false);
        self.serving.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst) && gate_open
    }
}

/// Answers one admin request.
pub async fn handle(
    request: Request<Incoming>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
